"""Reading AnnData inputs (obs labels, gene names, rows of X / obsm / layers) and writing outputs.

Two back ends share one interface (:class:`DataFile`): an in-memory ``AnnData`` (dense or CSR) and a
lazily read ``.h5ad`` / ``.h5`` file, whose rows are read in contiguous blocks with h5py (never
row by row, never with an unbounded cache), so only the rows a split needs are held in memory.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from statetx._utils import did_you_mean, preview, repeated, say, warn
from statetx.errors import ConfigError, DataError, SplitConfigError

if TYPE_CHECKING:  # pragma: no cover
    from statetx.config import ColumnMap, SplitConfig

CONTROL_DEFAULTS = ("non-targeting", "DMSO_TF")
# Tahoe-100M convention: drug-dose labels in obs['drugname_drugconc'], DMSO as this tuple string
TAHOE_PERT_COL, TAHOE_CONTROL = "drugname_drugconc", "[('DMSO_TF', 0.0, 'uM')]"
_CONTROL_HINT = re.compile(
    r"non.?targeting|control|ctrl|dmso|pbs|vehicle|(^|[^a-z])nt([^a-z]|$)", re.I
)
READ_BLOCK_ROWS = 4096
DataInput = ad.AnnData | Mapping[str, ad.AnnData] | None


def control_like(labels: Iterable[object]) -> list[str]:
    """The labels that look like controls (non-targeting, control, DMSO, NT, ...), sorted."""
    return sorted(str(x) for x in set(labels) if _CONTROL_HINT.search(str(x)))


def _plain_strings(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with pandas string-dtype columns, categories and index as object (a new frame)."""
    def plain(index: pd.Index) -> pd.Index:
        is_new_str = index.dtype != object and pd.api.types.is_string_dtype(index.dtype)
        return index.astype(object) if is_new_str else index

    out = df.copy(deep=False)
    out.index = plain(out.index)
    for name, col in out.items():
        if isinstance(col.dtype, pd.CategoricalDtype):
            cats = col.cat.categories
            if plain(cats) is not cats:
                out[name] = col.cat.rename_categories(plain(cats))
        elif col.dtype != object and pd.api.types.is_string_dtype(col.dtype):
            out[name] = col.astype(object)
    return out


def write_h5ad(adata: ad.AnnData, path: str | Path) -> None:
    """``adata.write_h5ad(path)`` with obs / var strings stored the classic way.

    pandas >= 3 gives string columns a nullable string dtype, which anndata writes only on
    opt-in and anndata < 0.11 cannot read; they are written as plain (object) strings instead.
    ``adata`` itself is not modified.
    """
    raw = None
    if adata.raw is not None:
        raw = adata.raw.to_adata()
        raw.var = _plain_strings(raw.var)
    out = ad.AnnData(X=adata.X, obs=_plain_strings(adata.obs), var=_plain_strings(adata.var),
                     obsm=dict(adata.obsm), varm=dict(adata.varm), layers=dict(adata.layers),
                     uns=dict(adata.uns), obsp=dict(adata.obsp), varp=dict(adata.varp), raw=raw)
    out.write_h5ad(path)


@dataclass
class DataFile:
    """One input file (or in-memory AnnData) with its labels as plain string arrays."""

    dataset: str
    label: str
    pert: np.ndarray
    cell_type: np.ndarray
    batch: np.ndarray
    barcodes: np.ndarray
    var_names: np.ndarray
    adata: ad.AnnData | None = None
    path: Path | None = None
    obsm_keys: list[str] = field(default_factory=list)
    gene_name_col: str | None = None  # var column the gene names (var_names above) came from
    dropped: np.ndarray | None = None  # rows left out for a missing label (drop_missing_labels)
    file_rows: np.ndarray | None = None  # a backed view's rows in its file (None = the same)
    file_cols: np.ndarray | None = None  # a backed view's genes in its file (None = all of X)
    target_sum: float | None = None  # counts per cell X was normalised to (statetx.pp record)
    # in-memory sparse matrices other than CSR (CSC), converted once for row reads, by source
    row_copies: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_obs(self) -> int:
        return len(self.pert)

    def width(self, source: str | None) -> int:
        """Number of columns of ``X`` (source None) or ``obsm[source]``."""
        if self.adata is not None:  # (n_vars: a backed view's X is not read for its shape)
            return self.adata.n_vars if source is None else _matrix(self, source).shape[1]
        return self._h5_width(source)

    def _h5_width(self, source: str | None) -> int:
        with h5py.File(self.path, "r") as f:
            node = f["X"] if source is None else f["obsm"][source]
            if isinstance(node, h5py.Dataset):
                return int(node.shape[1])
            if "shape" not in node.attrs:  # (a data frame, or another group)
                kind = node.attrs.get("encoding-type", "group")
                raise DataError(f"{'X' if source is None else f'obsm[{source!r}]'} of "
                                f"{self.path} is stored as a {kind}, not a matrix; store it as "
                                "an array (adata.obsm[key] = df.to_numpy()) or a sparse "
                                "matrix.")
            return int(node.attrs["shape"][1])

    def _annotations(self, which: str) -> pd.DataFrame:
        """``obs`` or ``var`` (an in-memory object's own; a file's read from it: that group
        only, not the whole file's annotations)."""
        if self.adata is not None:
            return getattr(self.adata, which)
        try:
            from anndata.io import read_elem
        except ImportError:  # (anndata < 0.11)
            from anndata.experimental import read_elem
        with h5py.File(self.path, "r") as f:
            return read_elem(f[which])

    def obs_columns(self, columns: Sequence[str]) -> pd.DataFrame:
        """The given obs columns of every cell (in file order); DataError naming the file and
        the missing column(s)."""
        obs = self._annotations("obs")
        missing = [c for c in columns if c not in obs.columns]
        if missing:
            raise DataError(f"additional_obs: obs column(s) {', '.join(map(repr, missing))} not "
                            f"found in {self.label} (available: {preview(obs.columns, 50)})."
                            f"{did_you_mean(missing[0], obs.columns)}")
        return obs[list(columns)].reset_index(drop=True)

    def var_frame(self) -> pd.DataFrame:
        """The file's var annotations, indexed by the gene names it was read with."""
        var = self._annotations("var").copy()
        var.index = pd.Index(self.var_names, dtype=str,
                             name=None if self.gene_name_col else var.index.name)
        return var

    def read_rows(self, rows: np.ndarray, source: str | None, dtype=np.float32) -> np.ndarray:
        """Dense ``[len(rows), width]`` array of the given rows of X (None) or ``obsm[source]``."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.adata is not None and not (source is None and self.adata.isbacked):
            return _dense(self._row_matrix(source), rows, dtype)
        if self.adata is not None:  # backed AnnData: read its X from the file, in blocks
            if self.file_rows is not None:
                rows = self.file_rows[rows]
            x = read_h5_rows(Path(self.adata.filename), "X", rows, dtype)
            return x if self.file_cols is None else x[:, self.file_cols]
        return read_h5_rows(self.path, "X" if source is None else f"obsm/{source}", rows, dtype)


    def _row_matrix(self, source: str | None):
        """The in-memory X / ``obsm[source]``, in a form whose rows are read cheaply: a sparse
        matrix other than CSR (CSC, COO, ...) is converted to CSR once, said, and the copy kept
        (``row_copies``) until :meth:`release_row_copies`, so its reads (the scale check, each
        split, each streamed block) do not convert the whole matrix again every time."""
        m = _matrix(self, source)
        if not sp.issparse(m) or m.format == "csr":
            return m
        if source not in self.row_copies:
            csr = m.tocsr()
            size = csr.data.nbytes + csr.indices.nbytes + csr.indptr.nbytes
            where = "X" if source is None else f"obsm[{source!r}]"
            say(f"{where} of {self.label} is a {m.format.upper()} matrix, whose rows are slow to "
                f"read: they are read from a CSR copy of it, made once ({size / 2**20:,.1f} MiB "
                f"more memory). To skip the copy, store it as CSR first (adata.{where} = "
                f"adata.{where}.tocsr()).")
            self.row_copies[source] = csr
        return self.row_copies[source]

    def release_row_copies(self) -> None:
        """Free the CSR copies :meth:`read_rows` made (the matrices themselves are not changed)."""
        self.row_copies.clear()


def _matrix(f: DataFile, source: str | None):
    return f.adata.X if source is None else f.adata.obsm[source]


def _dense(m, rows: np.ndarray, dtype) -> np.ndarray:
    if isinstance(m, pd.DataFrame):
        m = m.to_numpy()
    if sp.issparse(m):
        m = m.tocsr()  # row reads (CSC, COO, ... converted; a CSR matrix is not copied)
        out = np.empty((len(rows), m.shape[1]), dtype=dtype)
        for start in range(0, len(rows), READ_BLOCK_ROWS):
            block = rows[start : start + READ_BLOCK_ROWS]
            out[start : start + len(block)] = m[block].toarray()
        return out
    if hasattr(m, "to_memory"):  # anndata backed dataset
        m = m.to_memory()
    return np.asarray(m[rows], dtype=dtype)


# ---------------------------------------------------------------------- h5 reading
class H5Matrix:
    """A dense dataset or a CSR group of an open .h5ad file, read in blocks of rows."""

    def __init__(self, f: h5py.File, key: str, path: object) -> None:
        if key not in f:
            raise DataError(f"'{key}' not found in {path}.")
        self.key, self.path = key, path
        node = f[key]
        if isinstance(node, h5py.Dataset):
            self.dense: h5py.Dataset | None = node
            self.width = int(node.shape[1])
            return
        enc = node.attrs.get("encoding-type", "")
        enc = enc.decode() if isinstance(enc, bytes) else enc
        if not enc:
            raise DataError(
                f"'{key}' in {path} is a group without anndata's encoding-type attribute (a file "
                "written by an old anndata, or by another tool): statetx reads it only through "
                "the current format. Read and write it again with anndata "
                "(anndata.read_h5ad(path).write_h5ad(path)).")
        if enc != "csr_matrix":
            raise DataError(
                f"'{key}' in {path} is stored as '{enc}'; statetx reads dense or CSR "
                "matrices (CSC is not supported). Rewrite the file with a CSR matrix, e.g. "
                "adata.X = adata.X.tocsr(); adata.write_h5ad(...)."
            )
        self.dense = None
        self.data, self.indices, self.indptr = node["data"], node["indices"], node["indptr"]
        self.width = int(node.attrs["shape"][1])

    def rows(self, lo: int, hi: int, dtype=np.float32, out: np.ndarray | None = None
             ) -> np.ndarray:
        """Rows ``lo``..``hi-1`` as a dense array (``out`` itself when it could be filled in
        place: C-contiguous, of the stored values' dtype)."""
        try:
            return self._rows(lo, hi, dtype, out)
        except OSError as exc:  # a damaged compressed chunk, a file truncated after opening
            raise DataError(f"could not read rows {lo}-{hi - 1} of '{self.key}' in "
                            f"{Path(str(self.path)).absolute()} ({exc}): the file looks damaged. "
                            "Copy or write it again.") from None

    def _rows(self, lo: int, hi: int, dtype, out: np.ndarray | None) -> np.ndarray:
        if self.dense is not None:
            return np.asarray(self.dense[lo:hi]).astype(dtype, copy=False)
        ptr = np.asarray(self.indptr[lo:hi + 1], dtype=np.int64)
        vals = np.asarray(self.data[ptr[0]:ptr[-1]])
        m = sp.csr_matrix((vals, np.asarray(self.indices[ptr[0]:ptr[-1]]), ptr - ptr[0]),
                          shape=(hi - lo, self.width))
        if out is not None and out.dtype == vals.dtype:
            return m.toarray(out=out)  # no intermediate dense copy
        return m.toarray().astype(dtype, copy=False)


def read_h5_rows(path: Path, key: str, rows: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Read ``rows`` of a dense dataset or a CSR group in an h5ad file, in contiguous blocks.

    Rows are visited in sorted order in windows of :data:`READ_BLOCK_ROWS` consecutive file rows;
    each window costs one slice read. The result is in the order of ``rows``.
    """
    order = np.argsort(rows, kind="stable")
    srows = rows[order]
    with h5py.File(path, "r") as f:
        m = H5Matrix(f, key, path)
        out = np.empty((len(rows), m.width), dtype=dtype)
        i = 0
        while i < len(srows):
            lo = srows[i]
            j = int(np.searchsorted(srows, lo + READ_BLOCK_ROWS, side="left"))
            block = m.rows(int(lo), int(srows[j - 1]) + 1, dtype)
            out[order[i:j]] = block[srows[i:j] - lo]
            i = j
    return out


# ---------------------------------------------------------------------- opening inputs
def _warn_duplicate_cells(adata: ad.AnnData, label: str, dataset: str) -> None:
    """Cell names used twice within one input: predict_split's barcodes cannot tell those cells
    apart (only a warning: the labels, not the names, decide the splits; names shared across
    files are common and fine, the outputs carry each cell's dataset)."""
    names = repeated(adata.obs_names)
    cells = int(adata.obs_names.duplicated(keep=False).sum())
    rewrite = ", then write the file again" if adata.isbacked else ""
    where = label if label == f"<AnnData '{dataset}'>" else f"{label} (dataset '{dataset}')"
    warn(f"{where} has {len(names):,} duplicate cell name(s) (obs_names), on {cells:,} cells: "
         f"{preview(names, 5)}. The barcodes in predict_split's outputs (pert_cell_barcode, "
         "ctrl_cell_barcode) cannot tell those cells apart (predict refuses such input). Make "
         f"them unique first (adata.obs_names_make_unique(){rewrite}).", UserWarning)


MISSING_LABEL = "\x00missing"  # the label of a dropped cell (never a real label)


def from_anndata(adata: ad.AnnData, dataset: str, pert_col: str, cell_type_key: str,
                 batch_col: str | None, label: str | None = None,
                 drop_missing: bool = False, gene_name_col: str | None = None) -> DataFile:
    """Wrap an in-memory AnnData (labels are copied, the matrix is not). ``drop_missing``:
    cells with a missing (NaN) label are left out (said once) instead of being an error.
    ``gene_name_col``: the var column naming the genes (default: var_names)."""
    label = label or f"<AnnData '{dataset}'>"
    if adata.n_obs == 0:
        raise DataError(f"{label} has no cells (n_obs = 0).")
    if adata.n_vars == 0:
        raise DataError(f"{label} has no genes (n_vars = 0); give the expression matrix it was "
                        "subset from.")
    obs = adata.obs
    cols = [(pert_col, "pert_col"), (cell_type_key, "cell_type_key")] + (
        [(batch_col, "batch_col")] if batch_col else [])
    dropped = None
    if drop_missing:
        missing = {c: obs[c].isna().to_numpy() for c, _ in cols if c in obs.columns}
        dropped = np.logical_or.reduce([*missing.values(), np.zeros(adata.n_obs, bool)])
        if dropped.any():
            parts = ", ".join(f"obs['{c}']: {int(m.sum())}" for c, m in missing.items() if m.any())
            say(f"{label}: {int(dropped.sum())} cells with a missing label are left "
                f"out ({parts}).")
    labels = [obs_labels(obs, c, label, opt, keep=dropped, droppable=True, training=True)
              for c, opt in cols]
    if not adata.obs_names.is_unique:
        _warn_duplicate_cells(adata, label, dataset)
    view_rows, view_cols = backed_view_index(adata, label)
    return DataFile(
        dataset=dataset,
        label=label,
        pert=labels[0],
        cell_type=labels[1],
        batch=labels[2] if batch_col else np.full(adata.n_obs, "0", dtype=object),
        dropped=dropped if dropped is not None and dropped.any() else None,
        barcodes=np.asarray(adata.obs_names, dtype=object),
        var_names=gene_names(adata, gene_name_col, label),
        adata=adata,
        obsm_keys=list(adata.obsm.keys()),
        gene_name_col=gene_name_col,
        file_rows=view_rows,
        file_cols=view_cols,
        target_sum=recorded_target_sum(adata),
    )


def recorded_target_sum(adata: ad.AnnData) -> float | None:
    """The counts per cell ``statetx.pp.preprocess_train`` normalised X to (its record in
    ``uns["statetx_preprocess"]``), or None when not recorded."""
    record = adata.uns.get("statetx_preprocess")
    try:
        value = float(record["target_sum"])
    except (TypeError, KeyError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def backed_view_index(adata: ad.AnnData, label: str
                      ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The file rows and the file columns of a view of a backed AnnData (its cells' and genes'
    positions in the file, matched by name where anndata does not expose them); None for
    anything but a backed view, and for columns when the view keeps every gene in file order."""
    if not (adata.isbacked and adata.is_view):
        return None, None
    base = getattr(adata, "_adata_ref", None)
    oidx, vidx = getattr(adata, "_oidx", None), getattr(adata, "_vidx", None)
    if base is not None and not base.is_view and oidx is not None and vidx is not None:
        rows, cols = np.arange(base.n_obs)[oidx], np.arange(base.n_vars)[vidx]
        if len(rows) == adata.n_obs and len(cols) == adata.n_vars:
            return rows.astype(np.int64), _unless_all(cols, base.n_vars)
    whole = ad.read_h5ad(adata.filename, backed="r")
    try:
        obs_names, var_names = pd.Index(whole.obs_names), pd.Index(whole.var_names)
    finally:
        whole.file.close()
    located = []
    for names, wanted, what in ((obs_names, adata.obs_names, "cells"),
                                (var_names, adata.var_names, "genes")):
        pos = names.get_indexer(wanted) if names.is_unique else None
        if pos is None or (pos < 0).any():
            raise DataError(f"{label} is a view of a backed AnnData ({adata.filename}) whose "
                            f"{what} cannot be located in the file by name (duplicate names). "
                            "Load the view into memory first (view.to_memory()).")
        located.append(pos.astype(np.int64))
    return located[0], _unless_all(located[1], len(var_names))


def _unless_all(cols: np.ndarray, n: int) -> np.ndarray | None:
    """``cols`` as int64, or None when it is every column in order."""
    if len(cols) == n and np.array_equal(cols, np.arange(n)):
        return None
    return np.asarray(cols, dtype=np.int64)


def open_file(path: Path, dataset: str, pert_col: str, cell_type_key: str,
              batch_col: str | None, drop_missing: bool = False,
              gene_name_col: str | None = None) -> DataFile:
    """Open an .h5ad/.h5 file lazily: obs and var are read, matrices stay on disk."""
    try:
        backed = ad.read_h5ad(path, backed="r")
    except Exception as exc:  # noqa: BLE001 - any reader failure is a data problem
        raise DataError(f"could not read {path} as an AnnData file: {exc}") from exc
    try:
        f = from_anndata(backed, dataset, pert_col, cell_type_key, batch_col,
                         label=Path(path).name, drop_missing=drop_missing,
                         gene_name_col=gene_name_col)
        f.adata, f.path = None, Path(path)
    finally:
        backed.file.close()
    return f


def obs_labels(obs: pd.DataFrame, col: str, where: str, option: str,
               keep: np.ndarray | None = None, droppable: bool = False,
               training: bool = False) -> np.ndarray:
    """A column of obs as an object array of strings; errors for a missing column or NaNs.

    ``keep`` (drop_missing_labels): rows flagged there may be NaN; they get
    :data:`MISSING_LABEL`. ``droppable``: the NaN error mentions ``drop_missing_labels``.
    ``training``: one input of training data, which may span several files (the missing-column
    error says that one name serves them all).
    """
    if col not in obs.columns:
        raise DataError(
            f"obs column '{col}' not found in {where} (available: {preview(obs.columns, 50)})."
            f"{did_you_mean(col, obs.columns)} Set {option}=<column>" + (
                " (one name for every dataset: where files name it differently, rename the "
                "column in the odd one out)." if training else ".")
        )
    s = obs[col]
    isna = s.isna().to_numpy()
    missing = int(isna.sum())
    if missing and keep is None:
        raise DataError(
            f"obs['{col}'] has {missing} missing values in {where}. Remove those cells (e.g. "
            f"adata = adata[adata.obs['{col}'].notna()].copy())"
            + (" or pass drop_missing_labels=True (tx train: "
               "data.kwargs.drop_missing_labels=true)." if droppable else ".")
        )
    if isinstance(s.dtype, pd.CategoricalDtype):
        cats = np.asarray([_label_str(c) for c in s.cat.categories], dtype=object)
        out = cats[np.maximum(s.cat.codes.to_numpy(), 0)]
    else:
        out = np.asarray([_label_str(v) for v in s.to_numpy()], dtype=object)
    if missing:
        out[isna] = MISSING_LABEL
    return out


def _label_str(v: object) -> str:
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    return str(v)


def resolve_control(files: Sequence[DataFile], control_pert: str | None, pert_col: str) -> str:
    """Return the control label, auto-detecting ``non-targeting``/``DMSO_TF`` when not given."""
    labels = set().union(*(set(np.unique(f.pert)) for f in files))
    if control_pert is None:
        found = [c for c in CONTROL_DEFAULTS if c in labels]
        if pert_col == TAHOE_PERT_COL and TAHOE_CONTROL in labels:
            found = [TAHOE_CONTROL]  # the Tahoe rule (as arc-state's training command)
        hint = control_like(labels)
        if len(found) == 1:
            say(f"using control_pert={found[0]!r} (found in obs['{pert_col}']).")
            control_pert = found[0]  # (every file must have it: checked below)
        else:
            raise ConfigError(
                f"control_pert was not given, and obs['{pert_col}'] has "
                + ("both" if len(found) > 1 else "neither") + " of the labels detected "
                f"automatically ({' and '.join(map(repr, CONTROL_DEFAULTS))}). "
                + (f"Values that look like controls: {preview(hint)}. " if hint else "")
                + "Pass control_pert=<label>"
                + (f" (e.g. control_pert={hint[0]!r})." if len(hint) == 1 else ".")
            )
    datasets = {f.dataset for f in files}
    for f in files:
        if control_pert not in set(f.pert):
            hint = control_like(f.pert)
            raise DataError(
                f"control_pert '{control_pert}' is not a value of obs['{pert_col}'] in {f.label}"
                + (f" (dataset '{f.dataset}')." if len(datasets) > 1 else ".")
                + (f" Values that look like controls: {preview(hint)}." if hint else "")
                + did_you_mean(control_pert, set(f.pert))
                + (" One control label applies to every dataset: relabel the controls of the "
                   "others alike (e.g. adata.obs[col] = adata.obs[col].replace(...))."
                   if len(datasets) > 1 else "")
            )
    return control_pert


def check_source(f: DataFile, embed_key: str | None) -> None:
    """Error when ``obsm[embed_key]`` (or, without one, an in-memory AnnData's X) is absent."""
    if embed_key is None and f.adata is not None and f.adata.X is None:
        raise DataError(f"{f.label} has no X (adata.X is None). Put the expression matrix in X, "
                        "e.g. adata.X = adata.layers['counts'], or name an obsm embedding with "
                        "embed_key.")
    if embed_key is not None and embed_key not in f.obsm_keys:
        layers = [] if f.adata is None else list(f.adata.layers.keys())
        raise DataError(
            f"obsm['{embed_key}'] not found in {f.label} (available: "
            f"{preview(f.obsm_keys) or 'none'}).{did_you_mean(embed_key, f.obsm_keys)}"
            + (" statetx.pp.preprocess_train writes it (log1p expression of the highly "
               "variable genes); or leave embed_key unset to use X." if embed_key == "X_hvg"
               else "") + layer_hint(embed_key, layers)
        )


def layer_hint(key: str, layers: Sequence[str]) -> str:
    """When an embedding key names a layer: how to use that layer instead."""
    if key not in layers:
        return ""
    return (f" '{key}' is a layer: embed_key names an obsm embedding. To use the layer's "
            f"genes, set adata.X = adata.layers['{key}'] and leave embed_key unset.")


def feature_names(f: DataFile, source: str | None) -> list[str]:
    """Names of the columns of X (var names) or of an obsm source.

    ``X_hvg`` columns are named from ``uns['X_hvg_var_names']`` (written by statetx preprocessing)
    or from ``var['highly_variable']`` (see :func:`hvg_names`); other obsm matrices get
    ``<key>_<i>``.
    """
    if source is None:
        return [str(v) for v in f.var_names]
    width = f.width(source)
    names: list[str] | None = None
    if source == "X_hvg":
        names = _hvg_names(f)
        if names is not None and len(names) != width:
            raise DataError(
                f"{f.label}: obsm['X_hvg'] has {width} columns but {len(names)} HVG names were "
                "found (uns['X_hvg_var_names'] or var['highly_variable']). Re-run preprocess_train."
            )
    return names if names is not None else [f"{source}_{i}" for i in range(width)]


def _hvg_names(f: DataFile) -> list[str] | None:
    a = f.adata if f.adata is not None else ad.read_h5ad(f.path, backed="r")
    try:
        return hvg_names(a, f.gene_name_col, f.label)
    finally:
        if f.adata is None:
            a.file.close()


def gene_names(adata: ad.AnnData, gene_name_col: str | None = None,
               where: str = "the input", unique: bool = True) -> np.ndarray:
    """Names of the genes of X: ``var_names``, or the var column ``gene_name_col`` (which must
    exist, be complete and, with ``unique``, be unique)."""
    if gene_name_col is None:
        return np.asarray(adata.var_names, dtype=object)
    var = adata.var
    if gene_name_col not in var.columns:
        raise DataError(f"var column '{gene_name_col}' (gene_name_col) not found in {where} "
                        f"(available: {preview(var.columns, 50) or 'none'})."
                        f"{did_you_mean(gene_name_col, var.columns)} Genes are matched by this "
                        f"column; when var_names already hold these names, add it: "
                        f"adata.var['{gene_name_col}'] = adata.var_names.")
    col = var[gene_name_col]
    if col.isna().any():
        raise DataError(f"var['{gene_name_col}'] of {where} has {int(col.isna().sum())} missing "
                        f"gene names (genes {preview(var.index[col.isna().to_numpy()])}); fill "
                        "them, or leave gene_name_col unset to use var_names.")
    names = pd.Index(col.astype(str))
    if unique and names.has_duplicates:
        raise DataError(f"var['{gene_name_col}'] of {where} names several genes alike: "
                        f"{preview(repeated(names))}. Make them unique, or "
                        "leave gene_name_col unset to use var_names.")
    return np.asarray(names, dtype=object)


def hvg_names(adata: ad.AnnData, gene_name_col: str | None = None,
              where: str = "the input") -> list[str] | None:
    """Gene names of the columns of ``obsm['X_hvg']``: ``uns['X_hvg_var_names']`` or the genes
    flagged in ``var['highly_variable']`` (None when neither is there), named by
    ``gene_name_col`` when given."""
    if "X_hvg_var_names" in adata.uns:
        names = [str(x) for x in np.asarray(adata.uns["X_hvg_var_names"])]
        if "highly_variable" in adata.var.columns:  # the selection changed after X_hvg was made?
            flagged = set(map(str, adata.var_names[adata.var["highly_variable"].to_numpy(bool)]))
            added, dropped = sorted(flagged - set(names)), sorted(set(names) - flagged)
            if added or dropped:
                warn(
                    f"obsm['X_hvg'] of {where} holds the {len(names):,} genes of "
                    f"uns['X_hvg_var_names'], but var['highly_variable'] flags {len(flagged):,}"
                    + (f" (also {preview(added)})" if added else "")
                    + (f" (not {preview(dropped)})" if dropped else "")
                    + ": X_hvg is read as it is. If the selection changed, rebuild X_hvg (e.g. "
                    "statetx.pp.preprocess_train).", UserWarning)
        if gene_name_col is None:
            return names
        pos = adata.var_names.get_indexer(names)
        if (pos < 0).any():
            raise DataError(f"uns['X_hvg_var_names'] of {where} names genes that are not var "
                            f"names ({preview(np.asarray(names)[pos < 0])}), so they cannot be "
                            f"renamed by var['{gene_name_col}'].")
        return [str(x) for x in gene_names(adata, gene_name_col, where)[pos]]
    if "highly_variable" in adata.var.columns:
        flags = adata.var["highly_variable"].to_numpy(bool)
        return [str(x) for x in gene_names(adata, gene_name_col, where)[flags]]
    return None


def load_files(data: DataInput, config: SplitConfig, columns: ColumnMap,
               dataset_name: str | None = None, drop_missing: bool = False) -> list[DataFile]:
    """Open every file (or in-memory AnnData) of the datasets the spec refers to, sorted."""
    memory: dict[str, ad.AnnData] = {}
    if isinstance(data, ad.AnnData):
        memory[dataset_name or default_dataset_name(config)] = data
    elif isinstance(data, Mapping):
        memory = dict(data)
    elif isinstance(data, (str, Path)):
        raise ConfigError(f"data={str(data)!r}: a path is not data. A split file that names "
                          "its data files ([datasets]) goes second: fit(None, "
                          f"{str(data)!r}); an .h5ad file is read with anndata.read_h5ad "
                          "(or backed='r' for a file larger than memory).")
    elif data is not None:
        raise ConfigError(f"data must be an AnnData, a dict of AnnData or None, got "
                          f"{type(data).__name__}.")
    names = config.referenced_datasets()
    if not names:  # nothing referenced: every in-memory dataset trains
        if not memory:
            raise DataError("the split spec references no dataset and no AnnData was given.")
        config.training.update({n: "train" for n in memory})
        names = sorted(memory)
    unused = sorted(set(config.datasets) - set(names))
    if unused:
        say(f"datasets listed only in [datasets] are not used: {', '.join(unused)}")
    idle = sorted(set(memory) - set(names))
    unresolved = [n for n in names if n not in memory and n not in config.datasets]
    if idle and not unresolved:  # (a dict of AnnData: each one not named is left out; with a
        # name that has no data, the error below names both)
        warn(f"in-memory dataset(s) {', '.join(map(repr, idle))} are not used by the "
             f"split spec (it uses {', '.join(map(repr, names))}): their cells are "
             "left out. Name them in [training], [zeroshot] or [fewshot].", UserWarning)
    shadowed = sorted(set(memory) & set(names) & set(config.datasets))
    if shadowed:
        say("the AnnData given in memory is used instead of the [datasets] path for "
            + ", ".join(f"'{n}' ({config.datasets[n]})" for n in shadowed))
    files: list[DataFile] = []
    owner: dict[Path, str] = {}  # resolved file -> its dataset
    c = columns
    for name in names:
        if name in memory:
            files.append(from_anndata(memory[name], name, c.pert_col, c.cell_type_key,
                                      c.batch_col, drop_missing=drop_missing,
                                      gene_name_col=c.gene_name_col))
            continue
        if name not in config.datasets:
            used = [(s, k) for s in ("training", "zeroshot", "fewshot") for k in getattr(config, s)]
            first = {n: next(f'[{s}] "{k}"' for s, k in used if k.split(".")[0] == n)
                     for n in unresolved}
            if isinstance(data, ad.AnnData) and dataset_name is None and len(unresolved) > 1:
                uses = Counter(k.split(".")[0] for _, k in used)
                rare = sorted(unresolved, key=lambda n: (uses[n], n))
                typo = ("" if uses[rare[0]] == uses[rare[1]] else f" '{rare[0]}' is used "
                        f"least:{did_you_mean(rare[0], rare[1:])}")
                raise SplitConfigError(
                    f"one AnnData was given, but the split spec uses {len(rare)} dataset names "
                    "without a [datasets] path: " + ", ".join(f"'{n}' ({first[n]})" for n in rare)
                    + f". A typo?{typo} Use one name for it, or pass dataset_name= (or a dict "
                    "of AnnData).")
            hint = (did_you_mean(name, list(config.datasets)).strip()
                    or f'Add a line such as: {name} = "/path/to/{name}/"')
            if memory:
                given = ", ".join(f"'{n}'" for n in sorted(memory) if n not in names)
                if given:
                    hint = (f"The AnnData given in memory is named {given} (dataset_name or the "
                            f"dict's keys), which the spec does not use: name it '{name}'"
                            + (" (dataset_name=...)." if isinstance(data, ad.AnnData) else "."))
            raise SplitConfigError(
                f"dataset '{name}' is used in {first[name]} but has no entry in [datasets] "
                f"and was not passed in memory. {hint}"
            )
        for path in config.resolve_paths(name):
            if path in owner:  # its cells would be in both datasets' splits (e.g. train and test)
                raise SplitConfigError(
                    f"{path} belongs to two datasets, '{owner[path]}' and '{name}' (their "
                    "[datasets] patterns both match it), so its cells would be assigned twice "
                    "and held-out cells could train. Make the patterns disjoint.")
            owner[path] = name
            files.append(open_file(path, name, c.pert_col, c.cell_type_key, c.batch_col,
                                   drop_missing, c.gene_name_col))
    named = Counter(f.label for f in files)
    for f in files:  # same-named files in different folders: labelled by their whole path
        if named[f.label] > 1 and f.path is not None:
            f.label = str(f.path)
    _warn_copies(files)
    return files


def _warn_copies(files: Sequence[DataFile]) -> None:
    """Say when two inputs hold the same cells (obs names, perturbation and cell-type labels,
    in the same order): a copy of a file would make its cells count twice. (Barcodes merely
    shared across files are common and not said.)"""
    def same(a: np.ndarray, b: np.ndarray) -> bool:
        return np.array_equal(np.asarray(a, dtype=str), np.asarray(b, dtype=str))

    seen: dict[tuple[int, int], DataFile] = {}
    for f in files:
        key = (len(f.barcodes), hash(tuple(map(str, f.barcodes[:1000]))))
        first = seen.setdefault(key, f)
        if first is not f and all(same(getattr(first, k), getattr(f, k))
                                  for k in ("barcodes", "pert", "cell_type")):
            warn(f"{f.label} holds the same cells as {first.label} (all "
                 f"{len(f.barcodes):,} obs names, in the same order): a copy? Its cells "
                 "are used twice. Leave one of them out of [datasets].", UserWarning)


def default_dataset_name(config: SplitConfig) -> str:
    """The dataset name an in-memory AnnData takes: the only one the spec uses, else the only
    one it uses without a [datasets] path, else ``"data"``."""
    names = config.referenced_datasets()
    unlisted = [n for n in names if n not in config.datasets]
    return names[0] if len(names) == 1 else unlisted[0] if len(unlisted) == 1 else "data"
