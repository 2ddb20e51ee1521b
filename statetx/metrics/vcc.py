"""Virtual Cell Challenge (metrics.md §10): cell-mean baseline, normalised scores and the
packaging of a prediction for submission."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from statetx._utils import (
    atomic_write,
    atomic_write_text,
    did_you_mean,
    file_sha256,
    log1p_depth,
    preview,
    repeated,
    same_file,
    warn,
)
from statetx.errors import ConfigError, DataError
from statetx.metrics._inputs import check_obs_col, check_scale, load, recorded_labels
from statetx.metrics.de import group_means

#: metrics whose best value is 0 (errors: lower is better), and counts that rank nothing;
#: higher is better for the others
BEST_ZERO = ("mse", "mae", "mse_delta", "mae_delta")
NO_BEST = ("de_nsig_counts_real", "de_nsig_counts_pred")


def cell_mean_baseline(
    adata: ad.AnnData,
    pert_col: str | None = None,
    control_pert: str | None = None,
    n_cells: Mapping[str, int] | pd.Series | None = None,
    controls: ad.AnnData | None = None,
    allow_discrete: bool = False,
) -> ad.AnnData:
    """The VCC cell-mean baseline of ``adata``, as an AnnData.

    b = unweighted mean of all group pseudobulks of ``adata`` (control group included); every
    perturbation gets identical rows b, followed by the control cells.

    Parameters
    ----------
    adata
        The cells b is computed from, control cells included.
    pert_col, control_pert
        Default to those statetx recorded in ``adata.uns``, else to cell-eval's ``target_gene``
        / ``non-targeting``.
    n_cells
        Rows per perturbation (``n_cells[p]``; an entry of the control is ignored); default:
        each perturbation's cell count in ``adata``.
    controls
        The AnnData whose control cells follow (default ``adata``).
    allow_discrete
        Keep integer (raw count) inputs as they are, as :func:`statetx.evaluate` does (by
        default they are first normalised and log1p-transformed, as cell-eval does).

    Returns
    -------
    AnnData
        The perturbations' rows (sorted by label), then the control cells; obs holds
        ``pert_col`` only.
    """
    pert_col, control_pert = recorded_labels(adata, pert_col, control_pert)
    check_obs_col(adata, pert_col, "baseline input", "perturbation")
    adata = check_scale(adata, "baseline input", allow_discrete)  # counts -> log1p, as cell-eval
    if controls is not None:
        controls = check_scale(controls, "baseline controls", allow_discrete)
    labels = adata.obs[pert_col].astype(str).to_numpy()
    groups = sorted(set(labels))
    if control_pert not in groups:
        raise DataError(f"control label {control_pert!r} not found in obs[{pert_col!r}] of the "
                        "baseline input; name the control label (control_pert= in Python, "
                        "--control-pert on the command line)."
                        f"{did_you_mean(str(control_pert), groups)}")
    codes = pd.Categorical(labels, categories=groups).codes.astype(np.int64)
    b = group_means(adata.X, codes, len(groups), float64=True).mean(axis=0).astype(np.float32)
    if n_cells is None:
        counts = pd.Series(labels).value_counts()
        n_cells = {p: int(counts[p]) for p in groups if p != control_pert}
    n_cells = {str(k): int(v) for k, v in dict(n_cells).items() if str(k) != control_pert}
    ctrl_src = controls if controls is not None else adata
    c_lab = ctrl_src.obs[pert_col].astype(str).to_numpy()
    ctrl = ctrl_src[c_lab == control_pert]
    cx = ctrl.X.toarray() if hasattr(ctrl.X, "toarray") else np.asarray(ctrl.X)
    perts = sorted(n_cells)
    rows = [np.broadcast_to(b, (n_cells[p], b.size)) for p in perts]
    X = np.vstack([*rows, np.asarray(cx, dtype=np.float32)]).astype(np.float32)
    lab = [p for p in perts for _ in range(n_cells[p])] + [control_pert] * ctrl.n_obs
    obs = pd.DataFrame({pert_col: pd.Categorical(lab)},
                       index=[f"baseline_{i}" for i in range(len(lab))])
    out = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=adata.var_names.copy()))
    out.uns["statetx"] = {"baseline": "cell_mean", "pert_col": pert_col,
                          "control_pert": str(control_pert),
                          # (count input is log1p-transformed above unless allow_discrete)
                          **({} if allow_discrete else {"scale": "log1p"})}
    return out


def _means(agg: pd.DataFrame | str | Path) -> pd.Series:
    if not isinstance(agg, pd.DataFrame):
        agg = pd.read_csv(agg)
    if "statistic" not in agg.columns:
        raise DataError("agg table lacks the 'statistic' column; pass agg_results.csv as written "
                        "by evaluate")
    rows = agg[agg["statistic"] == "mean"]
    if "celltype" in rows.columns:
        rows = rows.drop(columns="celltype").mean(numeric_only=True).to_frame().T
    return rows.drop(columns="statistic", errors="ignore").iloc[0].astype(float)


def score_agg(user_agg: pd.DataFrame | str | Path, base_agg: pd.DataFrame | str | Path
              ) -> pd.DataFrame:
    """``cell-eval score``: normalise the user's mean metrics (``user_agg``) by the baseline's
    (``base_agg``); both are agg tables of :func:`~statetx.metrics.evaluate` or their CSVs.

    best 0: 1 − u/b; best 1: (u − b)/(1 − b); NaN → 0; clipped below at 0; then ``avg_score``."""
    u, b = _means(user_agg), _means(base_agg)
    if list(u.index) != list(b.index):
        raise DataError(f"user and baseline agg tables have different metric columns: "
                        f"{list(u.index)} vs {list(b.index)}")
    cols = [c for c in u.index if c not in NO_BEST]
    order = [c for c in cols if c in BEST_ZERO] + [c for c in cols if c not in BEST_ZERO]
    scores = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for c in order:
            s = 1.0 - u[c] / b[c] if c in BEST_ZERO else (u[c] - b[c]) / (1.0 - b[c])
            s = 0.0 if not np.isfinite(s) else max(float(s), 0.0)
            scores.append(s)
    out = pd.DataFrame({"metric": order, "from_baseline": scores})
    avg = float(np.mean(scores)) if scores else float("nan")
    return pd.concat([out, pd.DataFrame({"metric": ["avg_score"], "from_baseline": [avg]})],
                     ignore_index=True)


def vcc_score(
    adata_pred: ad.AnnData | str | Path,
    adata_real: ad.AnnData | str | Path,
    pert_col: str | None = None,
    control_pert: str | None = None,
    *,
    train: ad.AnnData | str | Path | None = None,
    profile: str = "vcc",
    outdir: str | Path | None = None,
    **evaluate_kwargs,
) -> pd.DataFrame:
    """VCC score of a prediction: its metrics normalised by those of the cell-mean baseline.

    The prediction and the cell-mean baseline (:func:`cell_mean_baseline`, with the real cell
    counts per perturbation) are evaluated against ``adata_real``, then normalised with
    :func:`score_agg`.

    Parameters
    ----------
    adata_pred, adata_real
        The prediction and the real cells: AnnData or ``.h5ad`` paths.
    pert_col, control_pert
        As in :func:`~statetx.metrics.evaluate` (default: those recorded by statetx in the
        prediction, else ``target_gene`` / ``non-targeting``).
    train
        The baseline is built from these cells with their control cells, as ``statetx evaluate
        baseline`` / cell-eval's ``baseline``; default: from the real data.
    profile
        The metric set of both evaluations.
    outdir
        Receives the ``user/`` and ``baseline/`` evaluation folders and ``score.csv``.
    **evaluate_kwargs
        Passed to :func:`~statetx.metrics.evaluate` (both evaluations); ``celltype_col`` is
        not supported (score each cell type's subset of pred and real separately).

    Returns
    -------
    DataFrame
        The score table (``metric``, ``from_baseline``).
    """
    from statetx.metrics.evaluate import NoSpreadWarning, evaluate

    adata_pred = load(adata_pred, "pred")
    pert_col, control_pert = recorded_labels(adata_pred, pert_col, control_pert)
    if any(evaluate_kwargs.get(k) is not None for k in ("celltype_col", "cell_type_key")):
        raise ConfigError("vcc_score scores a prediction as a whole (the VCC score is defined "
                          "over all its perturbations); celltype_col is not supported: score each "
                          "cell type's subset of pred and real separately.")
    discrete = bool(evaluate_kwargs.get("allow_discrete", False))
    real = check_scale(load(adata_real, "real"), "real", discrete)
    src = real if train is None else check_scale(load(train, "train"), "train", discrete,
                                                 None if discrete else log1p_depth(real.X))
    counts = real.obs[pert_col].astype(str).value_counts()
    n_cells = {p: int(n) for p, n in counts.items() if p != control_pert}
    # (already on the evaluated scale: the baseline keeps it); with train, its own controls, as
    # cell-eval's `baseline` command (and statetx evaluate baseline) build it
    base = cell_mean_baseline(src, pert_col, control_pert, n_cells=n_cells,
                              controls=real if train is None else None, allow_discrete=discrete)
    out = Path(outdir) if outdir is not None else None
    _, u_agg = evaluate(adata_pred, real, pert_col, control_pert, profile=profile,
                        outdir=out / "user" if out else None, **evaluate_kwargs)
    with warnings.catch_warnings():  # (the baseline repeats one row by design: not said)
        warnings.simplefilter("ignore", NoSpreadWarning)
        _, b_agg = evaluate(base, real, pert_col, control_pert, profile=profile,
                            outdir=out / "baseline" if out else None, **evaluate_kwargs)
    score = score_agg(u_agg, b_agg)
    if out is not None:
        atomic_write_text(out / "score.csv", score.to_csv(index=False))
    return score


# ---------------------------------------------------------------------------------------------
# packaging a prediction for submission (``cell-eval prep``)
# ---------------------------------------------------------------------------------------------

VCC_GENE_DIM = 18080
VCC_MAX_CELLS = 200_000
WATERMARK_NAME = "watermark.txt"
ZSTD_LEVEL = 3
# -e/--encoding: float width of the values. scipy.sparse (and so anndata) cannot hold float16
# matrices, so 16 rounds the values to float16 precision and stores them as float32.
_ENCODINGS = {32: "float32 CSR", 16: "values rounded to float16, stored as float32 CSR"}
_OBS_COL = "target_gene"


def prep_vcc(
    adata_or_path: ad.AnnData | str | Path,
    gene_names: str | Path | Sequence[str],
    output: str | Path | None = None,
    *,
    pert_col: str | None = None,
    control_pert: str | None = None,
    encoding: int = 32,
    expected_gene_dim: int = VCC_GENE_DIM,
    max_cell_dim: int = VCC_MAX_CELLS,
) -> Path:
    """Package a prediction for the Virtual Cell Challenge (``cell-eval prep``); return the path.

    The genes are reordered to ``gene_names``, the evaluation's scale rule is applied (integer
    counts are converted to log1p(normalize_total), with a warning; see
    :func:`statetx.evaluate`), X is stored as float32 CSR and only the perturbation labels are
    kept, as ``obs['target_gene']``. The archive is an uncompressed tar holding
    ``<stem>.h5ad.zst`` (the zstd-compressed h5ad; ``<stem>`` is the output name without
    ``.vcc`` and ``.prep``) and ``watermark.txt`` (statetx version, cell and gene counts,
    columns, encoding, the sha256 of the compressed h5ad, UTC creation time). This layout is
    statetx's reading of the reference; acceptance by the VCC portal has not been verified.
    Compression uses the ``zstandard`` module when installed (``pip install 'statetx[vcc]'``),
    else the ``zstd`` program. The archive is written to a temporary file next to ``output``
    and renamed at the end.

    Parameters
    ----------
    adata_or_path
        The prediction: an AnnData or an ``.h5ad`` path.
    gene_names
        The gene order: a CSV/text file with one name per line (an optional header line) or a
        sequence of names; the gene sets must be equal.
    output
        The archive to write; default: ``<input stem>.prep.vcc`` next to an input file
        (required for an in-memory AnnData).
    pert_col, control_pert
        The perturbation column and the control label, which must be among its values; both
        default to those statetx recorded in the prediction, else ``target_gene`` /
        ``non-targeting``.
    encoding
        32 (float32) or 16: the values rounded to float16 precision (smaller archive); they are
        still stored as float32, because scipy.sparse and anndata cannot read float16 sparse
        matrices.
    expected_gene_dim, max_cell_dim
        Require exactly ``expected_gene_dim`` genes and at most ``max_cell_dim`` cells (``-1``
        disables either check).

    Returns
    -------
    Path
        The archive written.
    """
    _check_encoding(encoding)
    _check_limit("expected_gene_dim", expected_gene_dim)
    _check_limit("max_cell_dim", max_cell_dim)
    src = Path(adata_or_path) if isinstance(adata_or_path, (str, Path)) else None
    if output is None:
        if src is None:
            raise ConfigError("output= is required when the prediction is an in-memory AnnData: "
                              "name the .vcc file to write")
        output = prep_output_path(src)
    output = Path(output)
    if output.is_dir():
        raise ConfigError(f"output {str(output)!r} is a folder; give the .vcc file to write "
                          f"(e.g. {str(output / 'prediction.prep.vcc')!r})")
    if output.suffix.lower() in (".h5ad", ".h5", ".zst") or (
            src is not None and same_file(output, src)):
        raise ConfigError(f"output {str(output)!r} would be overwritten with a .vcc archive"
                          + (", and it is the input" if src is not None and same_file(output, src)
                             else "") + "; name the archive, e.g. "
                          f"{str(output.with_name(output.stem + '.prep.vcc'))!r}")
    compressor, compress = _zstd_compressor()  # fail before reading the data
    adata = load(adata_or_path, "prediction")
    pert_col, control_pert = recorded_labels(adata, pert_col, control_pert)
    labels = _pert_labels(adata, pert_col, control_pert)
    if max_cell_dim != -1 and adata.n_obs > max_cell_dim:
        raise DataError(f"the prediction has {adata.n_obs} cells, more than max_cell_dim="
                        f"{max_cell_dim} (the VCC limit is {VCC_MAX_CELLS}); predict fewer cells "
                        "per perturbation, or pass max_cell_dim=-1 to disable the check")
    genes, where = _gene_list(gene_names, adata.var_names)
    if expected_gene_dim != -1 and len(genes) != expected_gene_dim:
        raise DataError(f"the prediction and {where} have {len(genes)} genes, but "
                        f"expected_gene_dim={expected_gene_dim} (the VCC gene list has "
                        f"{VCC_GENE_DIM}); predict every gene of the challenge's list, or pass "
                        "expected_gene_dim=-1 to disable the check")
    x = _reordered_csr(adata, genes)
    obs = pd.DataFrame({_OBS_COL: pd.Categorical(labels)},
                       index=pd.Index(adata.obs_names.astype(str)))
    packed = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    scaled = check_scale(packed, "prediction")
    x = sp.csr_matrix(scaled.X, dtype=np.float32)
    if encoding == 16:
        x = sp.csr_matrix((x.data.astype(np.float16).astype(np.float32), x.indices, x.indptr),
                          shape=x.shape)
    stem = output.name.removesuffix(".vcc").removesuffix(".prep") or "prediction"
    info = {
        "n_cells": x.shape[0],
        "n_genes": x.shape[1],
        "n_perturbations": len(obs[_OBS_COL].cat.categories),
        "pert_col": f"{pert_col} (written as obs[{_OBS_COL!r}])",
        "control_pert": control_pert,
        "encoding": f"{encoding} ({_ENCODINGS[encoding]})",
        "scale": ("integer counts converted to log1p(normalize_total)" if scaled is not packed
                  else "as given (log1p)"),
        "compressor": compressor,
    }
    _write_archive(ad.AnnData(X=x, obs=obs, var=packed.var), output, stem, info, compress)
    return output


def prep_output_path(input_path: str | Path) -> Path:
    """The default archive of :func:`prep_vcc`: ``<input stem>.prep.vcc`` next to the input."""
    path = Path(input_path)
    return path.with_name(f"{path.stem}.prep.vcc")


def _check_encoding(encoding: int) -> None:
    if isinstance(encoding, bool) or not isinstance(encoding, (int, np.integer)) \
            or int(encoding) not in _ENCODINGS:
        raise ConfigError(f"encoding={encoding!r} is not supported; use 32 (float32, the VCC "
                          "default) or 16 (values rounded to float16 precision)")


def _check_limit(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or (value != -1 and value < 1):
        raise ConfigError(f"{name}={value!r}: give a positive whole number, or -1 to disable "
                          "the check")


def _pert_labels(adata: ad.AnnData, pert_col: str, control_pert: str) -> np.ndarray:
    """The perturbation labels as strings; errors for a missing column, label or control."""
    check_obs_col(adata, pert_col, "prediction", "perturbation")  # (labels complete, too)
    labels = adata.obs[pert_col].astype(str).to_numpy()
    present = set(labels)
    if control_pert not in present:
        raise DataError(f"control label {control_pert!r} not found in the prediction's "
                        f"obs[{pert_col!r}] (labels: {preview(sorted(present))})."
                        f"{did_you_mean(str(control_pert), present)} The prediction must hold "
                        "control cells; name their label (control_pert= in Python, --ntc-name "
                        "on the command line)")
    return labels


def _gene_list(gene_names: str | Path | Sequence[str], var_names: pd.Index
               ) -> tuple[list[str], str]:
    """The target gene order and a description of where it came from; checks that the list and
    the prediction hold the same genes, each once."""
    pred = [str(g) for g in var_names]
    dup = repeated(pred)
    if len(dup):
        raise DataError(f"the prediction's var_names hold duplicated genes: [{preview(dup, 10)}]; "
                        "give every gene one column (drop or merge the duplicates)")
    pred_set = set(pred)
    if isinstance(gene_names, (str, Path)):
        where = f"gene list {str(gene_names)!r}"
        genes = _read_gene_file(Path(gene_names), pred_set)
    else:
        where = "the gene list"
        genes = [str(g) for g in gene_names]
    if not genes:
        raise DataError(f"{where} is empty; pass the challenge's gene names, one per line")
    dup = repeated(genes)
    if len(dup):
        raise DataError(f"{where} names some genes more than once: [{preview(dup, 10)}]; "
                        "pass each gene once")
    listed = set(genes)
    if listed != pred_set:
        missing = [g for g in genes if g not in pred_set]
        extra = [g for g in pred if g not in listed]
        raise DataError(f"the prediction's genes differ from {where}: {len(missing)} listed genes "
                        f"are missing from the prediction [{preview(missing, 10)}], "
                        f"{len(extra)} genes of the prediction are not listed "
                        f"[{preview(extra, 10)}]. Predict exactly the listed genes")
    return genes, where


def _read_gene_file(path: Path, pred_genes: set[str]) -> list[str]:
    """Gene names of a CSV/text file, one per line; a first line that is not a gene of the
    prediction, when every other line is, is taken as a header (with a warning)."""
    if not path.is_file():
        raise DataError(f"gene list {str(path)!r} does not exist; pass a CSV/text file with one "
                        "gene name per line")
    names: list[str] = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        for i, row in enumerate(csv.reader(fh), 1):
            fields = [f.strip() for f in row if f.strip()]
            if len(fields) > 1:
                raise DataError(f"gene list {str(path)!r}, line {i}: {len(fields)} fields "
                                f"({preview(fields, 5)}); expected one gene name per line")
            names.extend(fields)
    if len(names) > 1 and names[0] not in pred_genes and all(n in pred_genes
                                                              for n in names[1:]):
        warn(f"gene list {str(path)!r}: the first line {names[0]!r} is not a gene of the "
             "prediction, unlike every other line; treating it as a header", UserWarning)
        names = names[1:]
    return names


def _reordered_csr(adata: ad.AnnData, genes: list[str]) -> sp.csr_matrix:
    """X as float32 CSR with its columns in ``genes`` order (sparse X is never densified; the
    input is left unchanged)."""
    x = adata.X
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float32)
    else:
        x = sp.csr_matrix(np.asarray(x), dtype=np.float32)
    pos = adata.var_names.astype(str).get_indexer(genes)
    if not np.array_equal(pos, np.arange(len(genes))):
        x = x[:, pos]
    if not x.has_sorted_indices:
        x = x.sorted_indices()
    return x


def _zstd_compressor() -> tuple[str, Callable[[Path, Path], None]]:
    """(description, compress(src, dst)) with the ``zstandard`` module or the ``zstd`` program."""
    try:
        import zstandard
    except ImportError:
        zstandard = None
    if zstandard is not None:
        def compress_module(src: Path, dst: Path) -> None:
            cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
            with open(src, "rb") as fi, open(dst, "wb") as fo:
                cctx.copy_stream(fi, fo, size=os.path.getsize(src))

        return f"zstandard {zstandard.__version__} (level {ZSTD_LEVEL})", compress_module
    exe = shutil.which("zstd")
    if exe is not None:
        def compress_program(src: Path, dst: Path) -> None:
            proc = subprocess.run([exe, "-q", "-f", f"-{ZSTD_LEVEL}", str(src), "-o", str(dst)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise DataError(f"{exe} could not compress {src.name} (exit status "
                                f"{proc.returncode}): {proc.stderr.strip()}")

        return f"zstd program {exe} (level {ZSTD_LEVEL})", compress_program
    raise ConfigError("packaging a VCC submission needs zstd compression, and neither the Python "
                      "module nor the program was found: pip install zstandard (or "
                      "pip install 'statetx[vcc]'), or install the zstd program (e.g. "
                      "apt install zstd, brew install zstd, conda install zstd)")


def _write_archive(adata: ad.AnnData, output: Path, stem: str, info: Mapping[str, object],
                   compress: Callable[[Path, Path], None]) -> None:
    """Write ``adata`` as ``<stem>.h5ad.zst`` plus the watermark into the tar ``output``; the
    intermediate files live in a temporary folder next to ``output`` and are always removed."""
    from statetx import __version__
    from statetx.io import write_h5ad

    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as tmp:
        h5ad = Path(tmp) / f"{stem}.h5ad"
        write_h5ad(adata, h5ad)
        zst = h5ad.with_name(f"{h5ad.name}.zst")
        compress(h5ad, zst)
        h5ad.unlink()
        now = time.time()
        fields = {"statetx_version": __version__, "file": zst.name, "sha256": file_sha256(zst),
                  **info,
                  "created_utc": datetime.fromtimestamp(now, timezone.utc).strftime(
                      "%Y-%m-%dT%H:%M:%SZ")}
        text = ("statetx VCC submission package (statetx evaluate prep)\n"
                + "".join(f"{k}: {v}\n" for k, v in fields.items())).encode("utf-8")

        def plain(ti: tarfile.TarInfo) -> tarfile.TarInfo:
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            ti.mode = 0o644
            ti.mtime = int(now)
            return ti

        def pack(tmp_tar: Path) -> None:
            with tarfile.open(tmp_tar, "w") as tar:
                tar.add(zst, arcname=zst.name, filter=plain)
                mark = plain(tarfile.TarInfo(WATERMARK_NAME))
                mark.size = len(text)
                tar.addfile(mark, io.BytesIO(text))

        atomic_write(output, pack)
