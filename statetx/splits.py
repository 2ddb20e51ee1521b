"""Assigning cells to train / val / test from a :class:`~statetx.config.SplitConfig`.

Rules, per (dataset, file, cell type); the first matching rule wins (zeroshot, then fewshot, then
training):

=====================  =====================================  ===============================
rule                   perturbed cells                        control cells
=====================  =====================================  ===============================
zeroshot ``= train``   train                                  train
zeroshot ``= val``     that split                             that split **and** train
/ ``test``                                                    (``heldout_controls_in_train``)
fewshot                val / test if listed there, else train every split that is created
training ``= train``   train                                  train
none of the above      ignored                                ignored
=====================  =====================================  ===============================

A fewshot val (test) part exists only if it has a perturbed cell; a cell type without perturbed
cells creates nothing. Controls are shared between splits, so membership is one boolean per split.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd

from statetx._utils import did_you_mean, preview, say, warn
from statetx.config import SPLITS, ColumnMap, SplitConfig
from statetx.errors import ConfigError, DataError
from statetx.io import (
    MISSING_LABEL,
    DataFile,
    default_dataset_name,
    load_files,
    resolve_control,
)


@dataclass
class Assignment:
    """Split membership of every cell of one file (controls may belong to several splits)."""

    file: DataFile
    is_control: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def mask(self, split: str) -> np.ndarray:
        return getattr(self, split)


def assign_files(
    files: Sequence[DataFile],
    config: SplitConfig,
    control_pert: str,
    *,
    pert_col: str = "gene",
    cell_type_key: str = "cell_type",
    heldout_controls_in_train: bool = True,
    on_missing_perturbation: str = "error",
) -> list[Assignment]:
    """Assign every cell of ``files`` (all files of the referenced datasets) to splits."""
    if on_missing_perturbation not in ("error", "warn"):
        raise ConfigError(f"on_missing_perturbation={on_missing_perturbation!r} is invalid; "
                          "expected 'error' or 'warn'.")
    _check_heldout_names(files, config, control_pert, pert_col, cell_type_key,
                         on_missing_perturbation)
    out = []
    for f in files:
        zs, fs = config.heldout(f.dataset)
        training = f.dataset in config.training
        is_ctrl = f.pert == control_pert
        masks = {s: np.zeros(f.n_obs, dtype=bool) for s in SPLITS}
        for ct in np.unique(f.cell_type):
            in_ct = f.cell_type == ct
            ctrl, pert = in_ct & is_ctrl, in_ct & ~is_ctrl
            if ct in zs:
                split = zs[ct]
                masks[split] |= in_ct
                if split != "train" and heldout_controls_in_train:
                    masks["train"] |= ctrl
            elif ct in fs:
                if not pert.any():
                    continue
                entry = fs[ct]
                to_val = pert & np.isin(f.pert, entry.val)
                to_test = pert & np.isin(f.pert, entry.test)
                masks["train"] |= (pert & ~to_val & ~to_test) | ctrl
                for split, part in (("val", to_val), ("test", to_test)):
                    if part.any():
                        masks[split] |= part | ctrl
            elif training:
                masks["train"] |= in_ct
        if f.dropped is not None:  # cells left out for a missing label belong to no split
            for m in masks.values():
                m &= ~f.dropped
        _check_control_pools(f, is_ctrl, masks, cell_type_key)
        out.append(Assignment(f, is_ctrl, masks["train"], masks["val"], masks["test"]))
    _say_unassigned(out)
    return out


def _say_unassigned(assignments: Sequence[Assignment]) -> None:
    """Print the (dataset, cell type) groups whose cells fall in no split (e.g. the other cell
    types of a dataset used only in [zeroshot] / [fewshot]): left out, as documented, but said."""
    counts: dict[str, int] = {}
    for a in assignments:
        f = a.file
        none = ~(a.train | a.val | a.test)
        if f.dropped is not None:
            none &= ~f.dropped  # (said where they are dropped)
        for ct, n in zip(*np.unique(f.cell_type[none], return_counts=True)):
            key = f"{f.dataset}.{ct}"
            counts[key] = counts.get(key, 0) + int(n)
    if counts:
        say("cells in no split, left out: "
            + ", ".join(f"{k} ({n:,} cells)" for k, n in sorted(counts.items()))
            + ". A dataset's cell types train only when the dataset is in [training].")


#: perturbation labels that usually mark cells without an assigned perturbation
UNASSIGNED_LABELS = frozenset({"unassigned", "multiplet", "multiplets", "doublet", "doublets",
                               "nan", "none", "na", "n/a", "unknown", "undetermined", ""})
#: cell-type and batch labels that usually are a missing value written as text (NaN or None
#: through .astype(str), an empty field of a CSV)
MISSING_LIKE_LABELS = frozenset({"nan", "none", "na", "n/a", "<na>", "null", ""})


def _labels_like(files: Sequence[DataFile], attr: str, like: frozenset[str],
                 skip: str | None = None) -> pd.Series:
    """The labels (``attr`` of the files: ``pert``, ``cell_type``, ``batch``) that read as one of
    ``like`` (stripped, lower case) and their numbers of cells; only unique labels are
    compared."""
    counts = pd.Series(np.concatenate([getattr(f, attr) for f in files])).value_counts()
    return counts[counts.index.str.strip().str.lower().isin(like) & (counts.index != skip)]


def _listing(found: pd.Series) -> str:
    return ", ".join(f"{k!r} ({v:,} cells)" for k, v in found.items())


def warn_unassigned_labels(files: Sequence[DataFile], columns: ColumnMap, control: str) -> None:
    """Cells whose perturbation label reads like 'not assigned' would train as a perturbation
    of their own: said, with the cells counted (a guide screen's 'unassigned' cells). Cell-type
    and batch labels that read like a missing value ('nan', 'None', '') are said alike: those
    cells form one context of their own, mixing cells of every cell type (batch). Said by
    ``fit`` (``prepare``) and :func:`assign`."""
    pert_col = columns.pert_col
    found = _labels_like(files, "pert", UNASSIGNED_LABELS, skip=control)
    if len(found):
        warn(f"obs['{pert_col}'] label(s) {_listing(found)} look like cells without an "
             "assigned perturbation; they train as a perturbation of their own. Drop "
             f"them first (adata[~adata.obs['{pert_col}'].isin([...])]) unless they "
             "are one.", UserWarning)
    for kind, col, attr in (("cell type", columns.cell_type_key, "cell_type"),
                            ("batch", columns.batch_col, "batch")):
        found = _labels_like(files, attr, MISSING_LIKE_LABELS) if col else ()
        if len(found):
            missing = "{" + ", ".join(f"{k!r}: None" for k in found.index) + "}"
            warn(
                f"obs['{col}'] label(s) {_listing(found)} look like missing values written as "
                f"text (NaN or None through .astype(str)); those cells form one {kind} of their "
                f"own, mixing cells (and controls) of different {kind}s. Drop them first "
                f"(adata[~adata.obs['{col}'].isin([...])]), or make them missing again "
                f"(adata.obs['{col}'] = adata.obs['{col}'].astype(object).replace({missing})) "
                "and pass drop_missing_labels=True, unless they are one.", UserWarning)


def assign(
    adata: ad.AnnData | Mapping[str, ad.AnnData] | None,
    config: SplitConfig | dict | str | None,
    columns: ColumnMap | dict | None = None,
    dataset: str | None = None,
    **options,
) -> pd.DataFrame:
    """Split membership of each cell, as a DataFrame, without training.

    The data are read as :meth:`~statetx.StateTransitionModel.fit` reads them, with its
    warnings on labels that read like unassigned cells ('unassigned', 'doublet', ...) or
    missing values.

    Parameters
    ----------
    adata
        One AnnData (``dataset`` names it in the spec, by default the single dataset the spec
        refers to), a dict name → AnnData, or None for the spec's [datasets] files.
    config
        The split spec: a :class:`~statetx.config.SplitConfig`, a dict, a TOML path or string;
        None (or an empty spec) trains every cell of the in-memory data, as ``fit``.
    columns
        The obs columns (``pert_col``, ``cell_type_key``, ``control_pert``, ...): a
        :class:`~statetx.config.ColumnMap` or a dict; they may also come as keywords.
    dataset
        The spec's name for a single ``adata``.
    **options
        Column keywords, ``heldout_controls_in_train`` and ``on_missing_perturbation``.

    Returns
    -------
    DataFrame
        Columns ``train``, ``val``, ``test`` (bool), ``split`` (e.g. ``"train"``,
        ``"train+test"`` for controls shared by two splits, ``""`` for ignored cells),
        ``is_control``. One AnnData: rows indexed like its obs; otherwise one row per cell of
        each dataset, with ``dataset`` and ``file`` columns.
    """
    config = SplitConfig.from_toml(config if config is not None else {}).model_copy(deep=True)
    named = {k: options.pop(k) for k in list(options) if k in ColumnMap.model_fields}
    if named:  # (columns given as keywords, as fit_all_baselines takes them)
        given = columns.model_dump() if isinstance(columns, ColumnMap) else dict(columns or {})
        columns = {**given, **named}
    cols = columns if isinstance(columns, ColumnMap) else ColumnMap.build(**(columns or {}))
    single, given = isinstance(adata, ad.AnnData), dataset
    if single:
        dataset = dataset or default_dataset_name(config)
        used = config.referenced_datasets()
        if not used:  # an empty spec trains on every cell, as in fit
            config.training[dataset] = "train"
        elif dataset not in used and given is not None:  # (else fit's loader says what is wrong)
            raise DataError(f"dataset={dataset!r} names the AnnData, but the spec does not use "
                            f"that dataset (it uses {', '.join(map(repr, used))}).")
    elif dataset is not None:
        raise ConfigError("dataset= names a single AnnData; a dict's keys (or the spec's "
                          "[datasets]) name several.")
    files = load_files(adata, config, cols, given if single else None)
    control = resolve_control(files, cols.control_pert, cols.pert_col)
    warn_unassigned_labels(files, cols, control)  # (as fit says them)
    done = assign_files(files, config, control, pert_col=cols.pert_col,
                        cell_type_key=cols.cell_type_key, **options)
    if single:
        (mine,) = [a for a in done if a.file.dataset == dataset and a.file.path is None]
        return membership_frame(mine, index=adata.obs_names)
    return pd.concat([membership_frame(a).assign(dataset=a.file.dataset, file=a.file.label)
                      for a in done])


def subsample_validation(assignments: Sequence[Assignment], fraction: float) -> None:
    """``val_subsample_fraction`` (reference semantics): the validation parts — (dataset, file,
    cell type) — sorted by dataset and file, and only the first max(1, ⌈n · fraction⌉) kept."""
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"val_subsample_fraction={fraction!r} must be in (0, 1].")
    parts = sorted(
        ((a.file.dataset, str(a.file.path or a.file.label), str(ct)), i)
        for i, a in enumerate(assignments) for ct in np.unique(a.file.cell_type[a.val]))
    keep = {key for key, _ in parts[:max(1, math.ceil(len(parts) * fraction))]} if parts else set()
    dropped = []
    for key, i in parts:
        if key not in keep:
            a = assignments[i]
            gone = a.val & (a.file.cell_type == key[2])
            a.val &= ~gone
            dropped.append(f"{key[0]}.{key[2]} ({int(gone.sum()):,} cells)")
    if dropped:  # (cells of val only are then in no split)
        say(f"val_subsample_fraction={fraction:g}: {len(parts) - len(dropped)} of {len(parts)} "
            f"validation part(s) kept; left out of validation: {preview(dropped, 10)}")


def membership_frame(a: Assignment, index=None) -> pd.DataFrame:
    """One row per cell: bool membership columns and a readable ``split`` label."""
    labels = np.full(a.file.n_obs, "", dtype=object)
    for split in SPLITS:
        m = a.mask(split)
        labels[m] = np.where(labels[m] == "", split, labels[m] + "+" + split)
    return pd.DataFrame(
        {"train": a.train, "val": a.val, "test": a.test, "split": labels,
         "is_control": a.is_control},
        index=index if index is not None else a.file.barcodes,
    )


def summarize(assignments: Sequence[Assignment]) -> pd.DataFrame:
    """Cells per (dataset, file, cell type, split): #perturbations, #perturbed cells, #controls."""
    rows = []
    for a in assignments:
        f = a.file
        for split in SPLITS:
            m = a.mask(split)
            if not m.any():
                continue
            for ct in np.unique(f.cell_type[m]):
                sel = m & (f.cell_type == ct)
                pert = sel & ~a.is_control
                rows.append({
                    "dataset": f.dataset, "file": f.label, "cell_type": ct, "split": split,
                    "n_perturbations": len(np.unique(f.pert[pert])),
                    "n_perturbed_cells": int(pert.sum()),
                    "n_controls": int((sel & a.is_control).sum()),
                })
    cols = ["dataset", "file", "cell_type", "split", "n_perturbations", "n_perturbed_cells",
            "n_controls"]
    return pd.DataFrame(rows, columns=cols)


def summarize_config(config: SplitConfig, data: ad.AnnData | Mapping[str, ad.AnnData] | None = None,
                     columns: ColumnMap | dict | None = None, *, dataset_name: str | None = None,
                     drop_missing_labels: bool = False, val_subsample_fraction: float = 1.0,
                     **options) -> pd.DataFrame:
    """The split summary of ``config`` without training: cells per (dataset, file, cell type,
    split) with #perturbations, #perturbed cells and #controls (a DataFrame; ``tx split`` prints
    it).

    ``data``: an AnnData (or a dict name → AnnData) for in-memory datasets, None for the
    [datasets] files (only their labels are read); ``columns``: a :class:`ColumnMap` or
    its fields (``pert_col``, ``cell_type_key``, ``control_pert``, ...); ``options`` as
    :func:`assign_files` (``heldout_controls_in_train``, ``on_missing_perturbation``);
    ``drop_missing_labels`` and ``val_subsample_fraction`` as in the estimator.
    """
    cols = columns if isinstance(columns, ColumnMap) else ColumnMap.build(**(columns or {}))
    config = config.model_copy(deep=True)  # load_files may fill [training]
    files = load_files(data, config, cols, dataset_name, drop_missing_labels)
    control = resolve_control(files, cols.control_pert, cols.pert_col)
    assignments = assign_files(files, config, control, pert_col=cols.pert_col,
                               cell_type_key=cols.cell_type_key, **options)
    if val_subsample_fraction != 1.0:
        subsample_validation(assignments, val_subsample_fraction)
    return summarize(assignments)


# ---------------------------------------------------------------------- checks
def _check_heldout_names(files, config, control_pert, pert_col, cell_type_key, on_missing):
    by_ds: dict[str, list[DataFile]] = {}
    for f in files:
        by_ds.setdefault(f.dataset, []).append(f)
    for ds in config.referenced_datasets():
        if ds not in by_ds:
            given = ", ".join(f"'{d}'" for d in sorted(by_ds)) or "none"
            raise DataError(f"dataset '{ds}' is referenced by the split spec but no data was "
                            f"given for it (datasets given: {given}). Give it in memory under "
                            f"that name (a dict of AnnData, or dataset_name='{ds}'), or a "
                            "[datasets] path.")
        ds_files = by_ds[ds]
        cts = sorted(set().union(*(set(f.cell_type) for f in ds_files)) - {MISSING_LABEL})
        zs, fs = config.heldout(ds)
        for section, table in (("zeroshot", zs), ("fewshot", fs)):
            for ct in table:
                if ct not in cts:
                    head = ct.rsplit(".", 1)[0]
                    extra = (f' Keys are "dataset.celltype": did you mean "{ds}.{head}"? (The '
                             "perturbation column is set by pert_col, not in the key.)"
                             if "." in ct and head in cts else "")
                    raise DataError(
                        f"cell type '{ct}' ({config.where(section, f'{ds}.{ct}')}) does not occur "
                        f"in obs['{cell_type_key}'] of any file of dataset '{ds}'. Available: "
                        f"{preview(cts)} (matching is case-sensitive).{extra}"
                    )
        _warn_spelling_variants(ds, ds_files, config, cts, cell_type_key)
        for ct, entry in fs.items():
            present = set().union(*(set(f.pert[f.cell_type == ct]) for f in ds_files))
            _warn_pert_spelling_variants(ds, ct, entry, present - {control_pert}, ds_files,
                                         config, pert_col)
            for part in ("val", "test"):
                absent = [p for p in getattr(entry, part) if p not in present]
                if not absent:
                    continue
                msg = (f"{config.where('fewshot', f'{ds}.{ct}', part)} lists {len(absent)} "
                       f"perturbation(s) that no {ct} cell carries in obs['{pert_col}']: "
                       f"{preview(absent)}.{did_you_mean(absent[0], sorted(map(str, present)))}")
                if on_missing == "error":
                    raise DataError(msg + " Fix the names or pass on_missing_perturbation='warn' "
                                    "(tx train: data.kwargs.on_missing_perturbation=warn).")
                warn(msg)
            listed = [p for part in ("val", "test") for p in getattr(entry, part)]
            if control_pert in listed:
                raise DataError(
                    f"{config.where('fewshot', f'{ds}.{ct}')} lists the control label "
                    f"'{control_pert}'; controls cannot be held out as a perturbation."
                )


def spelling_key(label: object) -> str:
    """``label`` compared loosely: case, and runs of whitespace, ``_`` and ``-``, ignored."""
    return re.sub(r"[\s_-]+", " ", str(label).casefold()).strip()


def _clashes(wanted: Mapping[str, str], labels: Iterable[str], split_of: Callable[[str], str],
             cells: Callable[[str], str]
             ) -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    """Labels spelled like a ``wanted`` one (label → its description) but for
    :func:`spelling_key`, and assigned to another split: one line per wanted label, the
    ``replace()`` mapping that harmonises the data's labels, and the wanted labels that no cell
    carries (label → the data's spellings): for those the split spec is what to fix, not the
    data. Only unique labels are compared."""
    groups: dict[str, list[str]] = {}
    present = set(labels)
    for lab in sorted(present):
        groups.setdefault(spelling_key(lab), []).append(lab)
    found, fix, respell = [], {}, {}
    for label, described in wanted.items():
        others = [v for v in groups.get(spelling_key(label), ())
                  if v != label and split_of(v) != split_of(label)]
        if others:
            found.append(f"{described} vs " + ", ".join(f"{v!r} ({cells(v)}, {split_of(v)})"
                                                        for v in others))
            if label in present:
                fix.update({v: label for v in others})
            else:  # renaming the data's cells to the spec's typo would be the wrong way round
                respell[label] = others
    return found, fix, respell


def _cells_of(files: Sequence[DataFile], column: str, label: str,
              within: str | None = None) -> str:
    """'N cells' of ``label`` in a files' ``column`` (``pert`` or ``cell_type``; ``within``:
    cells of that cell type only), with the files holding them when there are several."""
    counts = {}
    for f in files:
        hit = getattr(f, column) == label
        if within is not None:
            hit &= f.cell_type == within
        if hit.any():
            counts[f.label] = int(hit.sum())
    where = ("" if len(files) < 2 or not counts else f" in {next(iter(counts))}"
             if len(counts) == 1 else ": " + preview([f"{n:,} in {k}" for k, n in
                                                      counts.items()], 5))
    return f"{sum(counts.values()):,} cells{where}"


def _spelling_warning(what: str, kind: str, found: list[str], column: str,
                      fix: Mapping[str, str], respell: Mapping[str, list[str]]) -> None:
    """Warn of ``found`` clashes; advice: harmonise the data's labels (``fix``), or, for split-spec
    labels that no cell carries (``respell``: label → the data's spellings), fix the spec."""
    advice = []
    if respell:
        advice.append("; ".join(
            f"no cell is labelled {label!r}: if it means "
            + " or ".join(map(repr, others)) + ", write "
            + " or ".join(map(repr, others)) + f" instead of {label!r} in the split spec"
            for label, others in respell.items()))
    if fix:
        mapping = ", ".join(f"{k!r}: {v!r}" for k, v in fix.items())
        advice.append(
            f"if they are one {kind}, harmonise the labels before splitting, "
            f"e.g. adata.obs[{column!r}] = adata.obs[{column!r}].replace({{{mapping}}}) (in "
            "every file of the dataset); if not, rename one so they differ clearly")
    advice[0] = advice[0][0].upper() + advice[0][1:]
    warn(
        f"{what}: {'; '.join(found)}. Each label is assigned by its exact spelling, so cells of a "
        f"held-out {kind} train (or are left out) under the other spelling. "
        + ". ".join(advice) + ".",
        UserWarning)


def _warn_spelling_variants(ds: str, files: Sequence[DataFile], config: SplitConfig,
                            cell_types: Sequence[str], cell_type_key: str) -> None:
    """A held-out cell type ([zeroshot] / [fewshot]) spelled differently elsewhere in its dataset
    (another donor or file annotated in lower case, with '_' for spaces, ...): those cells are
    assigned by their own label, so held-out cells would train (or be left out) unsaid."""
    zs, fs = config.heldout(ds)

    def split_of(ct: str) -> str:
        if ct in zs:
            return f"split {zs[ct]}"
        if ct in fs:
            return "[fewshot]: split train but for its val/test perturbations"
        return "split train" if ds in config.training else "no split (left out)"

    def cells(ct: str) -> str:
        return _cells_of(files, "cell_type", ct)

    wanted = {ct: f"'{ct}' ({config.where(section, f'{ds}.{ct}')}; {cells(ct)}, {split_of(ct)})"
              for section, table in (("zeroshot", zs), ("fewshot", fs)) for ct in table}
    found, fix, respell = _clashes(wanted, cell_types, split_of, cells)
    if found:
        _spelling_warning(f"obs['{cell_type_key}'] of dataset '{ds}' spells held-out cell "
                          "type(s) in other ways too (equal but for case, spaces, '_' or '-')",
                          "cell type", found, cell_type_key, fix, respell)


def _warn_pert_spelling_variants(ds: str, ct: str, entry, present: set[str],
                                 files: Sequence[DataFile], config: SplitConfig,
                                 pert_col: str) -> None:
    """A [fewshot] val/test perturbation spelled differently among the cell type's other
    perturbations: those cells train (they are not listed), unsaid otherwise."""
    listed = {p: part for part in ("val", "test") for p in getattr(entry, part)}

    def cells(p: str) -> str:
        return _cells_of(files, "pert", p, ct)

    wanted = {p: f"{part} '{p}' ({cells(p)})" for p, part in listed.items()}
    found, fix, respell = _clashes(wanted, present, lambda p: f"split {listed.get(p, 'train')}",
                                   cells)
    if found:
        _spelling_warning(f"{config.where('fewshot', f'{ds}.{ct}')} holds out perturbation(s) "
                          f"that other labels of obs['{pert_col}'] in cell type '{ct}' spell in "
                          "other ways (equal but for case, spaces, '_' or '-')",
                          "perturbation", found, pert_col, fix, respell)


def _check_control_pools(f: DataFile, is_ctrl, masks, cell_type_key) -> None:
    for split, m in masks.items():
        if not m.any():
            continue
        for ct in np.unique(f.cell_type[m]):
            sel = m & (f.cell_type == ct)
            n_pert = int((sel & ~is_ctrl).sum())
            if n_pert and not (sel & is_ctrl).any():
                raise DataError(
                    f"cell type '{ct}' of dataset '{f.dataset}' ({f.label}, split {split}) has "
                    f"{n_pert:,} perturbed cells and no control cells, so basal cells cannot be "
                    f"drawn. Add controls for it or hold it out (obs['{cell_type_key}'])."
                )
