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
    "make_synthetic",
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
    ``X`` = log1p(normalize_total to 1e4) as in the source (CSR float64, ``uns["log1p"]``),
    normalised over all genes before the 500 were selected (so a cell's ``expm1(X)`` sums to
    less than 1e4: a median of ~180); ``layers["counts"]`` = integer counts (CSR float32).

    Source: altoslabs/perturbench ``devel.h5ad``, BSD-3-Clause. Natural task: held-out cell line
    (``example_toml("perturbench_devel")``, U87MG as test). Each call reads a fresh copy.
    """
    a = _read("perturbench_devel")
    a.layers["counts"] = _f32_csr(a.layers["counts"])
    return a


_LOADERS = {"zhao2021": load_zhao2021, "perturbench_devel": load_perturbench_devel}


def make_synthetic(n_cell_types: int = 3, n_perts: int = 5, n_cells: int = 60,
                   n_controls: int = 80, n_genes: int = 200, n_batches: int = 2, *,
                   counts: bool = False, seed: int = 0) -> AnnData:
    """A small seeded synthetic perturbation screen (for tutorials, tests, bug reports).

    Not a biological model: Poisson counts around per-gene means with a cell-type offset; each
    perturbation ``G00i`` knocks its own gene ``G00i`` down and shifts a few others, more
    strongly in later cell types (so held-out cell types differ). ``obs``: ``target_gene``
    (control ``"non-targeting"``), ``cell_type`` (``CT0``, ``CT1``, ...), ``batch``
    (``b0``, ``b1``, ...). X: log1p(normalize_total to 1e4) as float32 with ``uns["log1p"]``, or
    the raw counts with ``counts=True``. A split that holds the last cell type out:
    ``{"training": {"data": "train"}, "zeroshot": {f"data.CT{n_cell_types - 1}": "test"}}``.

    Parameters
    ----------
    n_cell_types, n_perts, n_cells, n_controls, n_genes, n_batches
        Cell types; perturbations (at most ``n_genes``); cells per (cell type, perturbation);
        control cells per cell type; genes; batches (assigned at random).
    counts
        Return raw counts instead of log1p values.
    seed
        Seeds every draw: the same arguments give the same data.
    """
    import anndata as ad
    import pandas as pd

    for name, value, low in (("n_cell_types", n_cell_types, 1), ("n_perts", n_perts, 1),
                             ("n_cells", n_cells, 1), ("n_controls", n_controls, 1),
                             ("n_genes", n_genes, 2), ("n_batches", n_batches, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(f"{name}={value!r} is invalid; expected an integer >= {low}.")
    if n_perts > n_genes:
        raise ConfigError(f"n_perts={n_perts} exceeds n_genes={n_genes}: each perturbation "
                          "targets a gene of its own.")
    rng = np.random.default_rng(seed)
    genes = [f"G{i:03d}" for i in range(n_genes)]
    base = rng.lognormal(0.0, 1.0, n_genes)
    effects = np.zeros((n_perts, n_genes))
    for i in range(n_perts):
        hit = rng.choice(n_genes, size=max(2, n_genes // 20), replace=False)
        effects[i, hit] = rng.normal(0.0, 1.0, hit.size)
        effects[i, i] = -2.5  # its own gene knocked down
    rows, obs = [], []
    for c in range(n_cell_types):
        offset = rng.normal(0.0, 0.3, n_genes)
        for p, n in [(-1, n_controls), *((i, n_cells) for i in range(n_perts))]:
            shift = 0.0 if p < 0 else effects[p] * (1.0 + 0.25 * c)
            mu = base * np.exp(offset + shift) * rng.lognormal(0.0, 0.3, (n, 1))
            rows.append(rng.poisson(mu))
            label = "non-targeting" if p < 0 else genes[p]
            obs += [(label, f"CT{c}", f"b{rng.integers(n_batches)}") for _ in range(n)]
    x = np.vstack(rows).astype(np.float32)
    frame = pd.DataFrame(obs, columns=["target_gene", "cell_type", "batch"],
                         index=[f"cell{i}" for i in range(len(obs))]).astype("category")
    adata = ad.AnnData(X=x, obs=frame, var=pd.DataFrame(index=genes))
    if not counts:
        total = np.maximum(x.sum(axis=1, keepdims=True), 1.0)
        adata.X = np.log1p(x / total * np.float32(1e4)).astype(np.float32)
        adata.uns["log1p"] = {"base": None}
    return adata
