"""From inputs and a split spec to per-split, in-memory training matrices.

``prepare`` runs every check that needs the data (before any model is built), builds the
vocabularies, and stores each split's expression as **one contiguous matrix** (float32, or float16
to halve memory) together with integer label codes. The sampler (:mod:`statetx.sets`) only indexes
these arrays: nothing is read from disk in the training hot path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import torch

from statetx._utils import all_integers, looks_log1p, preview, repeated, say, warn
from statetx.config import SPLITS, ColumnMap, SplitConfig
from statetx.errors import ConfigError, DataError
from statetx.io import (
    DataFile,
    DataInput,
    check_source,
    feature_names,
    load_files,
    resolve_control,
)
from statetx.splits import (
    Assignment,
    assign_files,
    subsample_validation,
    summarize,
    warn_unassigned_labels,
)
from statetx.vocab import Vocab, load_pert_features

if TYPE_CHECKING:  # pragma: no cover
    from statetx.stream import StreamSplit


@dataclass
class SplitData:
    """All rows one split needs (its cells and its control pools), as arrays."""

    name: str
    X: torch.Tensor                 # [n, D] model input/target representation
    pert: np.ndarray                # [n] int64 vocabulary index
    cell_type: np.ndarray           # [n] int64
    batch: np.ndarray               # [n] int64
    is_control: np.ndarray          # [n] bool
    is_target: np.ndarray           # [n] bool: rows that form cell sets
    context: np.ndarray             # [n] int64: (file, cell type) id — pools never cross it
    file_index: np.ndarray          # [n] int64 into PreparedData.files
    barcodes: np.ndarray            # [n] str
    counts: torch.Tensor | None = None  # [n, G] gene-space target for a gene decoder
    file_row: np.ndarray | None = None  # [n] int64: the row in its file
    datasets: tuple[str, ...] = ()  # the dataset name of each file (by file_index)

    @property
    def n_obs(self) -> int:
        return len(self.pert)

    def context_means(self) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
        """Per perturbation (vocabulary index): ``(control mean, perturbed mean)`` of every
        context where it has cells and the context has controls (float64 ``[D]`` vectors)."""
        x = self.X
        out: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        perturbed = self.is_target & ~self.is_control
        for c in np.unique(self.context[perturbed]):
            ctrl = np.flatnonzero(self.is_control & (self.context == c))
            if not len(ctrl):
                continue
            base = x[torch.from_numpy(ctrl)].double().mean(0).numpy()
            rows = np.flatnonzero(perturbed & (self.context == c))
            rows = rows[np.argsort(self.pert[rows], kind="stable")]  # one run per perturbation
            perts, starts = np.unique(self.pert[rows], return_index=True)
            for p, sel in zip(perts, np.split(rows, starts[1:])):
                out.setdefault(int(p), []).append(
                    (base, x[torch.from_numpy(sel)].double().mean(0).numpy()))
        return out


FINGERPRINT_VERSION = 2  # (PreparedData.fingerprint: what a resume compares)


@dataclass
class PreparedData:
    """Everything the trainer needs, plus bookkeeping for prediction and reports."""

    vocab: Vocab
    splits: dict[str, SplitData]
    columns: ColumnMap
    files: list[DataFile]
    assignments: list[Assignment]
    summary: pd.DataFrame
    feature_names: list[str]       # names of the X columns (input = output space)
    gene_names: list[str] | None   # names of the gene-space target (decoder), if any
    is_log1p: bool
    # the expression read (X or obsm['X_hvg']) not log1p: integers only (raw counts)? None for
    # log1p or embedding inputs
    is_counts: bool | None = None
    notes: list[str] = field(default_factory=list)
    config: SplitConfig | None = None  # the split spec as the caller gave it

    @property
    def input_dim(self) -> int:
        return len(self.feature_names)

    @property
    def gene_dim(self) -> int:
        return 0 if self.gene_names is None else len(self.gene_names)

    def fingerprint(self) -> dict:
        """What a resumed run must train on again: the cells of every split (per dataset and
        cell type, whichever files or in-memory objects hold them), a digest of every row's
        labels and barcode in row order (sets are cut in row order), and checksums of evenly
        spaced input rows, plain and weighted by position (rounded to float16, the coarsest
        storage ``dtype``, so that a changed dtype alone is not a change of data; a streamed
        split's rows are read from its files)."""
        values, labels, positions = {}, {}, {}
        for name, d in self.splits.items():
            if not d.n_obs:
                continue
            labels[name] = _row_digest(d)
            pick = np.linspace(0, d.n_obs - 1, min(d.n_obs, 2048)).astype(np.int64)
            if isinstance(d, SplitData):
                rows = d.X.index_select(0, torch.from_numpy(pick).to(d.X.device)).cpu()
            else:  # (streamed: those rows only, one short read each)
                reader, _ = d.readers()
                out = np.empty((len(pick), d.files[0].width(d.source)), dtype=d.dtype)
                try:
                    rows = torch.from_numpy(d.read_rows(reader, pick, out, check=False))
                finally:
                    reader.close()
            rows = rows.half().double()
            values[name] = [d.n_obs, f"{float(rows.sum()):.10g}",
                            f"{float(rows.square().sum()):.10g}"]
            weight = torch.arange(1, len(pick) + 1, dtype=torch.float64)
            positions[name] = f"{float(weight @ rows.sum(1)):.10g}"
        keys = ["dataset", "cell_type", "split"]
        cells = self.summary.groupby(keys, sort=True)[["n_perturbed_cells", "n_controls"]].sum()
        return {"version": FINGERPRINT_VERSION, "values": values, "labels": labels,
                "positions": positions, "cells": cells.reset_index().astype(str).values.tolist()}

    def x_is_log1p(self) -> bool:
        """Whether X (sampled rows of every file, which must agree) looks log1p-normalised."""
        return _common_scale(self.files, None)


def prepare(
    data: DataInput,
    split_config: SplitConfig | dict | str | Path | None,
    columns: ColumnMap,
    *,
    dataset_name: str | None = None,
    vocab: Vocab | None = None,
    pert_features: str | Path | Mapping[str, np.ndarray] | None = None,
    on_missing_features: str = "zeros",
    heldout_controls_in_train: bool = True,
    yield_controls: bool = True,
    on_missing_perturbation: str = "error",
    val_subsample_fraction: float = 1.0,
    drop_missing_labels: bool = False,
    counts_key: str | None = None,
    allow_counts: bool = False,
    dtype: str = "float32",
    splits: tuple[str, ...] = SPLITS,
    new_labels: tuple[str, ...] = (),
    keep_row_copies: bool = False,
) -> PreparedData:
    """Validate the data against the split spec and build the per-split matrices.

    ``data``: an AnnData (the dataset the spec names, or ``dataset_name``), a dict of them by
    dataset name, or None to read the spec's ``[datasets]`` files. ``split_config``: a
    :class:`~statetx.config.SplitConfig`, dict, TOML path or string (None: every cell trains).
    ``columns``: a :class:`~statetx.config.ColumnMap` (obs columns, control label, input and
    output space). ``vocab``: reuse a fitted vocabulary (label codes as in training);
    ``pert_features`` (a file or a name → vector mapping) replaces the one-hot perturbation
    vectors, ``on_missing_features`` says what a perturbation without one gets. The other
    options are the estimator's parameters of the same names (``allow_counts``: accept count
    data with ``output_space='all'``; ``splits``: build only these; ``new_labels``: the label
    kinds, ``cell_type`` / ``batch``, whose labels unknown to a given ``vocab`` are added to
    it, said, rather than refused; ``keep_row_copies``: keep the CSR copies of in-memory CSC
    matrices, made once for row reads, for reads after this, as a streamed split's). Returns a
    :class:`PreparedData`: vocabulary, one :class:`SplitData` per non-empty split, the split
    summary and the feature names.
    """
    np_dtype = {"float32": np.float32, "float16": np.float16}.get(dtype)
    if np_dtype is None:
        raise ConfigError(f"dtype={dtype!r} is invalid; expected 'float32' or 'float16'.")
    given = SplitConfig.from_toml(split_config if split_config is not None else {})
    config = given.model_copy(deep=True)  # load_files may fill [training]; keep the caller's
    files = load_files(data, config, columns, dataset_name, drop_missing_labels)
    control = resolve_control(files, columns.control_pert, columns.pert_col)
    columns = columns.model_copy(update={"control_pert": control})
    if vocab is None:  # (before the split checks, whose errors such labels may explain)
        warn_unassigned_labels(files, columns, control)
    assignments = assign_files(
        files, config, control, pert_col=columns.pert_col, cell_type_key=columns.cell_type_key,
        heldout_controls_in_train=heldout_controls_in_train,
        on_missing_perturbation=on_missing_perturbation,
    )
    if val_subsample_fraction != 1.0:
        subsample_validation(assignments, val_subsample_fraction)
    src, counts_src, names, gene_names = input_sources(files, columns, counts_key)
    # the scale (log1p or counts) of the expression the model reads or predicts
    expr = src if src in (None, "X_hvg") else counts_src
    samples = None if expr is False else [_sample_matrix(f, expr) for f in files]
    is_log1p = True if samples is None else _common_scale(files, expr, samples)
    # (raw counts, as opposed to other normalised values: what predict checks its input against)
    is_counts = (None if is_log1p or columns.embed_key not in (None, "X_hvg") else
                 all(all_integers(x) for x in samples))  # (expr is embed_key here)
    del samples
    if columns.output_space == "all" and not (is_log1p or allow_counts):
        where = "X" if expr is None else f"obsm['{expr}']"
        raise DataError(
            f"output_space='all' expects log1p-normalised {where}, but {where} of "
            f"{files[0].label} does not look like it (integers, or values of 15 and more). Run "
            "statetx.pp.preprocess_train (or scanpy normalize_total + log1p) first, or pass "
            "allow_counts=True (data.kwargs.allow_counts=true; tx split --allow-counts) to "
            "train on counts."
        )
    if vocab is None:
        feats = pert_features
        if isinstance(feats, (str, Path)):
            feats = load_pert_features(feats)
        kept = [slice(None) if f.dropped is None else ~f.dropped for f in files]
        vocab = Vocab.build(
            np.concatenate([f.pert[k] for f, k in zip(files, kept)]),
            np.concatenate([f.cell_type[k] for f, k in zip(files, kept)]),
            np.concatenate([f.batch[k] for f, k in zip(files, kept)]),
            control, features=feats, on_missing_features=on_missing_features,
        )
    for kind in new_labels:  # (rows dropped for a missing label add nothing)
        vocab, added = vocab.extended(kind, np.concatenate(
            [(f.cell_type if kind == "cell_type" else f.batch)[
                slice(None) if f.dropped is None else ~f.dropped] for f in files]))
        if added:
            say(f"{kind.replace('_', ' ')} label(s) not in the model's data: "
                f"{preview(added)} (their cells are predicted as any held-out cells).")
    built = {}
    for split in splits:
        sd = _build_split(split, assignments, vocab, src, counts_src, yield_controls, np_dtype)
        if sd is not None:
            built[split] = sd
    if not keep_row_copies:  # (every row read of the in-memory splits is done)
        for f in files:
            f.release_row_copies()
    if "train" in splits:
        check_training_split(built.get("train"), config, yield_controls, assignments, columns)
    return PreparedData(vocab, built, columns, files, assignments, summarize(assignments),
                        names, gene_names, is_log1p, is_counts, config=given)


def _row_digest(d: SplitData | StreamSplit) -> str:
    """A digest of a split's rows in order: perturbation, cell type, batch, control flag,
    context and barcode of each (a relabelled, moved or reordered cell changes it)."""
    h = hashlib.blake2b(digest_size=12)
    for codes in (d.pert, d.cell_type, d.batch, d.is_control, d.context):
        h.update(np.ascontiguousarray(codes, dtype=np.int64).tobytes())
    h.update("\0".join(map(str, d.barcodes)).encode())
    return h.hexdigest()


def warn_training_scale(prepared: PreparedData, model: str = "the model") -> None:
    """Warn when expression input does not look log1p-normalised (it is used as given)."""
    embed_key = prepared.columns.embed_key
    if prepared.is_log1p or embed_key not in (None, "X_hvg"):
        return
    where = "X" if embed_key is None else "obsm['X_hvg']"
    warn(
        f"{where} of {prepared.files[0].label} does not look log1p-normalised (integers, "
        f"negative values, or values of 15 and more): {model} trains on it as given and "
        "predicts on that scale. ST and its baselines are usually compared on log1p-normalised "
        "expression (statetx.pp.preprocess_train, or scanpy normalize_total + log1p).", UserWarning)


def check_training_split(train: SplitData | StreamSplit | None, config: SplitConfig,
                         yield_controls: bool, assignments: Sequence[Assignment],
                         columns: ColumnMap) -> None:
    """A training split (in memory or streamed; None = no cells) must hold perturbed cells.
    ``assignments`` and ``columns`` (the resolved control label): to tell data without any
    perturbed cell (a wrong pert_col or control_pert) from perturbed cells all held out."""
    no_training = "" if config.training or not config.referenced_datasets() else (
        " The split spec has no [training] section, so only the held-out cell types' controls "
        "train: list the datasets that train, e.g. [training] " + ", ".join(
            f'{n} = "train"' for n in config.referenced_datasets()) + ".")
    if assignments and not any(
            (~a.is_control if a.file.dropped is None else ~a.is_control & ~a.file.dropped).any()
            for a in assignments):
        n = sum(int(a.is_control.sum()) for a in assignments)
        raise DataError(
            f"the data hold no perturbed cells: all {n:,} cells are controls (obs"
            f"['{columns.pert_col}'] == {columns.control_pert!r}), so no perturbation could be "
            "learned. Check pert_col (the obs column naming each cell's perturbation) and "
            "control_pert (the control label), or give data with perturbed cells.")
    if train is None:
        raise DataError(
            "the training split is empty (every cell type is held out"
            + ("" if yield_controls else " and yield_controls is false")
            + "). Add a [training] entry or hold out fewer cell types." + no_training
        )
    if train.is_control.all():
        raise DataError(
            "the training split has control cells only: every perturbed cell is held out (in "
            "[zeroshot] or [fewshot]), so no perturbation could be learned. Hold out fewer "
            "cell types or perturbations." + no_training
        )


def counts_source(output_space: str, counts_key: str | None) -> str | None:
    """Where the gene-space targets of an embedding input live: None = X, else an obsm key
    (``counts_key``; default X for output space ``all``, ``obsm['X_hvg']`` for ``gene``)."""
    if output_space == "all":
        return None if counts_key in (None, "X") else counts_key
    return None if counts_key == "X" else (counts_key or "X_hvg")


def input_sources(files: list[DataFile], c: ColumnMap, counts_key: str | None
                  ) -> tuple[str | None, str | None | bool, list[str], list[str] | None]:
    """Input source, gene-space target source, and their column names (checked across files)."""
    src = c.embed_key
    if c.output_space == "embedding" and src is None:
        raise ConfigError("output_space='embedding' requires embed_key (an obsm key holding the "
                          "cell embedding).")
    counts_src: str | None | bool = False  # False = no gene-space target (None = X)
    if src is not None and (c.output_space == "all"
                            or (c.output_space == "gene" and src != "X_hvg")):
        counts_src = counts_source(c.output_space, counts_key)
    for f in files:
        check_source(f, src)
        if counts_src not in (False, None):
            try:
                check_source(f, counts_src)
            except DataError as err:
                raise DataError(f"{err} It holds the gene-space targets of output_space "
                                f"'{c.output_space}' for an embedding input (choose another "
                                "source with counts_key: an obsm key or 'X'; a layer has to be "
                                "copied into obsm first; a network without gene decoder does "
                                "not use them: output_space='embedding').") from None
    names = _agree(files, src, "input")
    gene_names = None if counts_src is False else _agree(files, counts_src, "gene-space target")
    return src, counts_src, names, gene_names


def _agree(files: list[DataFile], source: str | None, what: str) -> list[str]:
    ref = feature_names(files[0], source)
    where = "X" if source is None else f"obsm['{source}']"
    dup = pd.Index(ref)
    if dup.has_duplicates:  # predictions could not be matched to genes by name later
        raise DataError(f"{files[0].label} has duplicate gene names in {where}: "
                        f"{preview(repeated(dup))}. Make them unique "
                        "(adata.var_names_make_unique()) or choose unique names with "
                        "gene_name_col.")
    for f in files[1:]:
        other = feature_names(f, source)
        if other == ref:
            continue
        first = f"{files[0].label} (dataset '{files[0].dataset}')"
        this = f"{f.label} (dataset '{f.dataset}')"
        fix = ("Every file must have the same genes in the same order: subset and order them "
               "alike, e.g. adata = adata[:, genes].copy() with one shared gene list.")
        if len(other) == len(ref) and set(other) == set(ref):
            diff = next(i for i, (a, b) in enumerate(zip(ref, other)) if a != b)
            raise DataError(f"files disagree on the order of the {what} genes in {where}: "
                            f"{first} has '{ref[diff]}' at column {diff}, {this} has "
                            f"'{other[diff]}' (same genes, other order). {fix}")
        shared = len(set(ref) & set(other))
        raise DataError(f"files disagree on the {what} genes in {where}: {first} has "
                        f"{len(ref)}, {this} has {len(other)}, {shared} of them shared. {fix}")
    return ref


def _common_scale(files: list[DataFile], source: str | None,
                  samples: list[np.ndarray] | None = None) -> bool:
    """Whether the files' expression (X or ``obsm[source]``; ``samples``: rows of it already
    read by :func:`_sample_matrix`) is log1p; every file must agree (raw counts next to log1p
    values would be one model's inputs on two scales)."""
    if samples is None:
        samples = [_sample_matrix(f, source) for f in files]
    scales = [looks_log1p(x) for x in samples]
    if len(set(scales)) > 1:
        where = "X" if source is None else f"obsm['{source}']"
        kind = {True: "log1p values", False: "not log1p (raw counts: integers or values of 15 "
                "and more; or negative, scaled values)"}
        listing = "; ".join(f"{f.label} (dataset '{f.dataset}'): {kind[s]}"
                            for f, s in zip(files, scales))
        raise DataError(f"the datasets' {where} are on different scales: {listing}. Bring them to "
                        "one scale first (statetx.pp.preprocess_train, or scanpy normalize_total "
                        "+ log1p, on the raw counts).")
    return scales[0]


def _sample_matrix(f: DataFile, source: str | None) -> np.ndarray:
    rows = np.linspace(0, f.n_obs - 1, min(f.n_obs, 500)).astype(np.int64)
    return f.read_rows(np.unique(rows), source)


def split_labels(split: str, assignments: list[Assignment], vocab: Vocab
                 ) -> tuple[list[tuple[Assignment, np.ndarray]], dict[str, np.ndarray]] | None:
    """The encoded labels of one split's rows over all files (None when it has no rows).

    Returns the ``(assignment, file rows)`` of each file in order and the concatenated arrays
    ``pert``, ``cell_type``, ``batch``, ``is_control``, ``context`` (per file and cell type),
    ``file_index``, ``file_row`` and ``barcodes``.
    """
    parts, files, ctx_offset = [], [], 0
    for fi, a in enumerate(assignments):
        m = a.mask(split)
        if not m.any():
            continue
        rows = np.flatnonzero(m)
        f = a.file
        ct_codes = vocab.encode("cell_type", f.cell_type[rows])
        ctx_local = np.unique(ct_codes, return_inverse=True)[1].reshape(-1)
        parts.append(dict(
            pert=vocab.encode("pert", f.pert[rows]), cell_type=ct_codes,
            batch=vocab.encode("batch", f.batch[rows]), is_control=a.is_control[rows],
            context=ctx_local + ctx_offset, file_index=np.full(len(rows), fi, dtype=np.int64),
            file_row=rows.astype(np.int64), barcodes=f.barcodes[rows],
        ))
        files.append((a, rows))
        ctx_offset += int(ctx_local.max()) + 1
    if not parts:
        return None
    return files, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _build_split(split, assignments, vocab, src, counts_src, yield_controls, np_dtype):
    labels = split_labels(split, assignments, vocab)
    if labels is None:
        return None
    files, cat = labels
    x = np.concatenate([a.file.read_rows(rows, src, np_dtype) for a, rows in files])
    counts = None if counts_src is False else np.concatenate(
        [a.file.read_rows(rows, counts_src, np_dtype) for a, rows in files])
    def cell(i: int) -> str:
        f = assignments[int(cat["file_index"][i])].file
        return f"cell {cat['barcodes'][i]} (row {cat['file_row'][i]}) of {f.label}"

    _check_finite(x, split, expression=src in (None, "X_hvg"), cell=cell,
                  refuse_negative="X" if src is None else f"obsm['{src}']")
    if counts is not None:
        _check_finite(counts, split, expression=True, what="gene-space target", cell=cell)
    is_target = ~cat["is_control"] | bool(yield_controls)
    if not is_target.any():
        return None
    return SplitData(
        name=split, X=torch.from_numpy(x), pert=cat["pert"], cell_type=cat["cell_type"],
        batch=cat["batch"], is_control=cat["is_control"], is_target=is_target,
        context=cat["context"], file_index=cat["file_index"], barcodes=cat["barcodes"],
        counts=None if counts is None else torch.from_numpy(counts), file_row=cat["file_row"],
        datasets=tuple(a.file.dataset for a in assignments),
    )


def split_obs(prepared: PreparedData, split: SplitData, rows: np.ndarray,
              columns: Sequence[str]) -> pd.DataFrame:
    """obs ``columns`` of the split's ``rows`` (read from their files; option
    ``additional_obs``), in the order of ``rows``."""
    out = None
    fi = split.file_index[rows]
    for i in np.unique(fi):
        sel = np.flatnonzero(fi == i)
        part = prepared.files[int(i)].obs_columns(columns).iloc[split.file_row[rows[sel]]]
        part.index = sel
        out = part if out is None else pd.concat([out, part])
    return out.sort_index().reset_index(drop=True)


def with_training_var(pred: ad.AnnData, prepared: PreparedData) -> ad.AnnData:
    """``pred`` with the training data's gene annotations (its first file's var), when that
    file holds every gene of ``pred``."""
    var = prepared.files[0].var_frame()
    if var.index.is_unique and pred.var_names.isin(var.index).all():
        pred.var = var.loc[list(pred.var_names)]
    return pred


def group_labels(prepared: PreparedData, split: SplitData, row: int, by_batch: bool) -> tuple:
    """The labels (split, dataset, cell type, perturbation[, batch]) of the group of the
    split's ``row``: what seeds the group's control draws, so that they do not depend on which
    other groups the split holds (integer context ids do), nor on whether the data were given
    in memory or read from the spec's files (file labels do)."""
    v = prepared.vocab
    labels = (split.name, prepared.files[split.file_index[row]].dataset,
              v.cell_types[split.cell_type[row]], v.perturbations[split.pert[row]])
    return (*labels, v.batches[split.batch[row]]) if by_batch else labels


def batch_in_context(prepared: PreparedData, split: SplitData) -> Callable[[int, int], str]:
    """Names a split's (context id, batch code) pair as 'batch in cell type', for messages."""
    cell_type = dict(zip(split.context.tolist(), split.cell_type.tolist()))
    v = prepared.vocab
    return lambda cx, bt: f"{v.batches[bt]} in {v.cell_types[cell_type[cx]]}"


def split_cell_obs(prepared: PreparedData, split: SplitData, rows: np.ndarray,
                   basal_rows: np.ndarray, datasets: np.ndarray | None) -> pd.DataFrame:
    """obs of the predictions for a split's ``rows``: the perturbation, cell type and (with a
    ``batch_col``) batch labels, ``pert_cell_barcode`` and ``ctrl_cell_barcode`` (the control
    each cell was predicted from: ``basal_rows``), ``dataset`` when ``datasets`` names each
    row's; indexed by the cells' own barcodes (made unique across files)."""
    v, c = prepared.vocab, prepared.columns
    labels = {c.pert_col: (v.perturbations, split.pert),
              c.cell_type_key: (v.cell_types, split.cell_type)}
    if c.batch_col is not None:  # (no invented column, none that replaces the cell type's)
        labels.setdefault(c.batch_col, (v.batches, split.batch))
    obs = pd.DataFrame(
        {col: pd.Categorical(np.asarray(names, dtype=object)[codes[rows]])
         for col, (names, codes) in labels.items()}
        | {"pert_cell_barcode": split.barcodes[rows],
           "ctrl_cell_barcode": split.barcodes[basal_rows]},
        index=ad.utils.make_index_unique(pd.Index(split.barcodes[rows].astype(str))))
    if datasets is not None and "dataset" not in obs:
        obs["dataset"] = pd.Categorical(datasets)
    return obs


def split_datasets(prepared: PreparedData, split: SplitData, rows: np.ndarray,
                   cell_types: np.ndarray) -> np.ndarray | None:
    """The dataset of each of the split's ``rows`` when the spec has several datasets (None
    otherwise); warns when datasets share a cell-type name there, since whatever groups these
    cells by cell type alone (evaluation per cell type) pools them."""
    if len({f.dataset for f in prepared.files}) < 2:
        return None
    names = np.asarray([f.dataset for f in prepared.files], dtype=object)[split.file_index[rows]]
    pairs = pd.DataFrame({"cell_type": cell_types, "dataset": names}).drop_duplicates()
    shared = pairs.groupby("cell_type")["dataset"].agg(sorted)
    shared = shared[shared.map(len) > 1]
    if len(shared):
        listing = "; ".join(f"'{ct}' in {', '.join(ds)}" for ct, ds in shared.items())
        warn(f"datasets share cell-type names in these cells ({listing}): grouping by "
             "cell type alone (evaluate's celltype_col, tx predict's per-cell-type "
             "files) pools them; obs['dataset'] tells them apart.", UserWarning)
    return names


def negative_values_message(where: str, lowest: float, but: str, example: str = "") -> str:
    """Negative expression values (scaled or centred data): the error fit and predict give."""
    return (f"{where} has negative values (down to {lowest:.4g}"
            + (f", e.g. {example}" if example else "") + "): it looks scaled or centred (e.g. "
            f"by scanpy.pp.scale), but {but}. Pass the log1p values from before scaling (e.g. "
            "adata.raw, or a layer saved before sc.pp.scale).")


def negative_training_input(where: str, lowest: float, example: str) -> DataError:
    """The error for negative values in the expression a model trains on (fit refuses what
    predict would refuse); an embedding may be negative and is given as embed_key."""
    return DataError(negative_values_message(
        where, lowest, "ST trains on non-negative expression (log1p-normalised values, or "
        "counts), and a scaled input shifts its predictions", example)
        + " An embedding, whose values may well be negative (e.g. obsm['X_pca']), is given as "
        "embed_key.")


def _check_finite(x: np.ndarray, split: str, expression: bool, what: str | None = None,
                  cell: Callable[[int], str] | None = None,
                  refuse_negative: str | None = None) -> None:
    """Refuse NaN/Inf rows (``cell(i)`` names row i, e.g. its file and barcode). Negative
    expression values are refused when ``refuse_negative`` names the matrix (the model's
    input: predict would refuse them), else warned about."""
    what = what or ("expression" if expression else "input")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        n = int(bad.sum())
        first = f" (e.g. {cell(int(np.argmax(bad)))})" if cell is not None else ""
        raise DataError(f"{n} cell{'s' if n > 1 else ''} of the {split} split "
                        f"{'have' if n > 1 else 'has'} NaN or Inf {what} values{first}. Remove "
                        "or repair them before training.")
    if expression and (x < 0).any():  # embeddings (PCA, scVI, ...) may well be negative
        if refuse_negative is not None:
            row = int(np.argmax((x < 0).any(axis=1)))
            raise negative_training_input(refuse_negative, float(x.min()),
                                          cell(row) if cell is not None else "")
        warn(f"the {split} split has negative {what} values; ST expects non-negative "
             "log1p expression unless an embedding is used.")
