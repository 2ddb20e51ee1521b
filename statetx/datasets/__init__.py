"""Small real perturbation datasets bundled with statetx, with matching example split files.

* :func:`load_zhao2021` — Zhao et al. 2021 glioblastoma slices, panobinostat vs DMSO in five
  patients (MIT, via the lemur package); X = raw counts.
* :func:`load_perturbench_devel` — perturbench's development set: Norman 2019 K562 CRISPRa +
  McFaline-Figueroa 2023 CRISPRi in three glioblastoma lines (BSD-3-Clause); X = log1p values.

Sources, licences and what was changed: ``statetx/datasets/data/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from .._utils import did_you_mean
from ..errors import ConfigError, DataError

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "DATA_DIR",
    "available",
    "data_path",
    "example_toml",
    "load",
    "load_perturbench_devel",
    "load_zhao2021",
]

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class _Entry:
    file: str
    toml: str
    aliases: tuple[str, ...]
    description: str


_DATASETS: dict[str, _Entry] = {
    "zhao2021": _Entry(
        "zhao2021_glioblastoma.h5ad",
        "zhao2021.toml",
        ("zhao", "zhao2021_glioblastoma"),
        "Zhao 2021 glioblastoma slices, panobinostat vs DMSO, 5 patients (5,000 x 300; MIT)",
    ),
    "perturbench_devel": _Entry(
        "perturbench_devel.h5ad",
        "perturbench_devel.toml",
        ("perturbench", "perturbench-devel"),
        "perturbench devel: Norman 2019 K562 CRISPRa + McFaline-Figueroa 2023 CRISPRi in "
        "A172/T98G/U87MG (5,961 x 500; BSD-3-Clause)",
    ),
}


def available() -> dict[str, str]:
    """Names of the bundled datasets with a one-line description."""
    return {k: v.description for k, v in _DATASETS.items()}


def _entry(name: str) -> tuple[str, _Entry]:
    key = str(name).lower()
    for k, e in _DATASETS.items():
        if key == k or key in e.aliases:
            return k, e
    names = list(_DATASETS) + [a for e in _DATASETS.values() for a in e.aliases]
    raise ConfigError(
        f"unknown bundled dataset {name!r}; available: {', '.join(_DATASETS)}."
        f"{did_you_mean(name, names)}"
    )


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise DataError(
            f"bundled file {path} is missing: the statetx installation is incomplete. Reinstall "
            "statetx (the package data 'datasets/data/*' must be installed with it)."
        )
    return path


def data_path(name: str) -> Path:
    """Path of the bundled ``.h5ad`` file of dataset ``name`` (e.g. ``"zhao2021"``)."""
    return _existing(DATA_DIR / _entry(name)[1].file)


def example_toml(name: str) -> Path:
    """Path of the example split file (TOML) for dataset ``name``.

    The file lies next to the data; its ``[datasets]`` path is relative to its own folder, so
    ``SplitConfig.from_toml(example_toml("zhao2021"))`` finds the bundled ``.h5ad``.
    """
    return _existing(DATA_DIR / _entry(name)[1].toml)


def load(name: str) -> AnnData:
    """Load a bundled dataset by name (see :func:`available`)."""
    key, _ = _entry(name)
    return _LOADERS[key]()


def _read(name: str) -> AnnData:
    import anndata as ad

    return ad.read_h5ad(data_path(name))


def _f32_csr(m: np.ndarray | sp.spmatrix) -> sp.csr_matrix:
    return sp.csr_matrix(m, dtype=np.float32)


def load_zhao2021() -> AnnData:
    """Zhao et al. 2021 acute glioblastoma slices: panobinostat vs DMSO in five patients.

    5,000 cells × 300 genes. ``obs``: ``target_gene`` (``"panobinostat"`` / ``"DMSO"``),
    ``is_control``, ``cell_type`` (``"glioblastoma_<patient>"``; the patient is the context as
    there are no cell-type labels), ``batch`` (patient) and the source's metadata
    (``patient_id``, ``treatment``, ``condition``, ``sample_id``, ``age``, ``gender``, …).
    ``X`` and ``layers["counts"]`` hold the raw UMI counts (CSR float32, integer values).
    ``var`` has Ensembl IDs as index and ``symbol`` with gene symbols.

    Source: lemur (const-ae/lemur) example data, MIT. Natural task: held-out patient
    (``example_toml("zhao2021")``). Each call reads a fresh copy.
    """
    a = _read("zhao2021")
    a.X = _f32_csr(a.X)
    a.layers["counts"] = _f32_csr(a.layers["counts"])
    return a


def load_perturbench_devel() -> AnnData:
    """perturbench's development set: CRISPRa in K562 plus CRISPRi in three glioblastoma lines.

    5,961 cells × 500 HVGs. ``obs``: ``target_gene`` (33 perturbations incl. ``A+B`` pairs,
    control ``"control"``), ``is_control``, ``cell_type`` (k562, A172, T98G, U87MG), ``batch``
    (source study) and the source's columns (``perturbation_type``, ``ncounts``, …).
    ``X`` = log1p(normalize_total to 1e4) as in the source (CSR float64, ``uns["log1p"]``);
    ``layers["counts"]`` = integer counts (CSR float32).

    Source: altoslabs/perturbench ``devel.h5ad``, BSD-3-Clause. Natural task: held-out cell line
    (``example_toml("perturbench_devel")``, U87MG as test). Each call reads a fresh copy.
    """
    a = _read("perturbench_devel")
    a.layers["counts"] = _f32_csr(a.layers["counts"])
    return a


_LOADERS = {"zhao2021": load_zhao2021, "perturbench_devel": load_perturbench_devel}
