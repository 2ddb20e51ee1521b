"""Rebuild the bundled example files from the shared source files (maintainers only).

Usage: ``python -m statetx.datasets._build /path/to/shared/data``. The output is written to
``statetx/datasets/data/``. Compaction (values are unchanged):

* counts stored as int32 CSR, gzip level 9 with the HDF5 shuffle filter;
* Zhao: X *is* the counts, so ``layers/counts`` is an HDF5 hard link to the ``X`` group;
* perturbench: CSR indices sorted, and ``layers/counts`` shares ``indices``/``indptr`` with X
  through hard links; X keeps its float64 log1p values exactly.

The results are standard ``.h5ad`` files readable by ``anndata.read_h5ad``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

DATA_DIR = Path(__file__).resolve().parent / "data"
SOURCES = {
    "zhao2021": "zhao2021_glioblastoma_panobinostat_lemur_counts.h5ad",
    "perturbench_devel": "perturbench_devel_norman19_mcfaline23.h5ad",
}
TARGETS = {
    "zhao2021": "zhao2021_glioblastoma.h5ad",
    "perturbench_devel": "perturbench_devel.h5ad",
}


def _int_csr(m: sp.spmatrix) -> sp.csr_matrix:
    m = sp.csr_matrix(m, copy=True)
    m.sort_indices()
    rounded = np.round(m.data)
    if not np.array_equal(rounded, m.data):
        raise ValueError("counts are not integers")
    m.data = rounded.astype(np.int32)
    return m


def _all_ascii(values: np.ndarray) -> bool:
    try:
        for v in values.ravel():
            (v if isinstance(v, bytes) else str(v).encode()).decode("ascii")
    except UnicodeDecodeError:
        return False
    return True


def _repack(src: Path, dst: Path, links: dict[str, str]) -> None:
    """Copy ``src`` to ``dst`` with gzip-9 (+ shuffle when smaller); ``links``: path -> target."""

    def copy_attrs(a: h5py.AttributeManager, b: h5py.AttributeManager) -> None:
        for k, v in a.items():
            b[k] = v

    with h5py.File(src, "r") as fi, h5py.File(dst, "w") as fo:
        copy_attrs(fi.attrs, fo.attrs)

        def visit(name: str, obj: h5py.Group | h5py.Dataset) -> None:
            if name in links or any(name.startswith(p + "/") for p in links):
                return
            if isinstance(obj, h5py.Group):
                copy_attrs(obj.attrs, fo.require_group(name).attrs)
                return
            data = obj[()]
            dtype = obj.dtype
            if dtype.kind == "O" and obj.shape != () and _all_ascii(data):
                # fixed-length ASCII strings compress; variable-length ones sit in the global heap
                data = np.array([x if isinstance(x, bytes) else x.encode() for x in data])
                dtype = data.dtype
            if obj.shape == () or obj.size < 64:
                ds = fo.create_dataset(name, data=data, dtype=dtype)
            else:
                kw = {"compression": "gzip", "compression_opts": 9, "dtype": dtype}
                sizes = {}
                for shuffle in (False, True):
                    with h5py.File("probe.h5", "w", driver="core", backing_store=False) as pf:
                        d = pf.create_dataset("a", data=data, shuffle=shuffle, **kw)
                        sizes[shuffle] = d.id.get_storage_size()
                ds = fo.create_dataset(name, data=data, shuffle=sizes[True] < sizes[False], **kw)
            copy_attrs(obj.attrs, ds.attrs)

        fi.visititems(visit)
        for name, target in links.items():
            fo[name] = fo[target]


def build(shared: Path, out_dir: Path = DATA_DIR) -> dict[str, Path]:
    """Write both bundled files from the shared originals; returns their paths."""
    import anndata as ad

    out_dir.mkdir(parents=True, exist_ok=True)
    done: dict[str, Path] = {}
    tmp = out_dir / "_tmp_build.h5ad"

    z = ad.read_h5ad(shared / SOURCES["zhao2021"])
    if (z.layers["counts"] != z.X).nnz:
        raise ValueError("Zhao X differs from layers['counts']")
    z.X = _int_csr(z.X)
    del z.layers["counts"]
    z.write_h5ad(tmp)
    done["zhao2021"] = out_dir / TARGETS["zhao2021"]
    _repack(tmp, done["zhao2021"], {"layers/counts": "X"})

    p = ad.read_h5ad(shared / SOURCES["perturbench_devel"])
    x = sp.csr_matrix(p.X, copy=True)
    x.sort_indices()
    c = _int_csr(p.layers["counts"])
    if not (np.array_equal(x.indices, c.indices) and np.array_equal(x.indptr, c.indptr)):
        raise ValueError("perturbench X and counts have different sparsity patterns")
    p.X = x
    p.layers["counts"] = c
    p.write_h5ad(tmp)
    done["perturbench_devel"] = out_dir / TARGETS["perturbench_devel"]
    _repack(
        tmp,
        done["perturbench_devel"],
        {"layers/counts/indices": "X/indices", "layers/counts/indptr": "X/indptr"},
    )
    tmp.unlink()
    return done


if __name__ == "__main__":
    for key, path in build(Path(sys.argv[1])).items():
        print(f"{key}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
