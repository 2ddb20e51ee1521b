"""Tests of split assignment (statetx.splits) on the real datasets, plus rule-precedence tests on
synthetic data (those do not need ../shared).

The leakage property (data.md §2.9) is checked for every split spec used here: no perturbed cell
assigned to val/test is in train, and the perturbed cells over all splits are exactly the
perturbed cells of the groups the spec refers to.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import PAPALEXI, PERTURBENCH, need

from statetx.config import ColumnMap, FewshotEntry, SplitConfig
from statetx.data import load_files, prepare
from statetx.errors import ConfigError, DataError, SplitConfigError
from statetx.io import from_anndata, resolve_control
from statetx.splits import (
    Assignment,
    assign,
    assign_files,
    membership_frame,
    summarize,
    summarize_config,
)

PB_COLS = ColumnMap.build(pert_col="condition", cell_type_key="cell_type", batch_col="batch",
                          control_pert="control")
KANG_COLS = ColumnMap.build(pert_col="target_gene", cell_type_key="cell_type", batch_col="batch",
                            control_pert="control")
PB_SINGLES = ["MAP2K3", "MAP2K6", "MAP3K21", "MAP4K3", "MAP4K5", "MAPK1", "PLK4", "SGK1",
              "TGFBR2"]


def pb_toml(tmp_dir: Path, body: str) -> Path:
    """A split file in ``tmp_dir`` naming the real perturbench file by its absolute path."""
    path = tmp_dir / "split.toml"
    path.write_text(f'[datasets]\nperturbench = "{need(PERTURBENCH).as_posix()}"\n{body}')
    return path


def assign_from_toml(path: Path, cols: ColumnMap = PB_COLS, **options) -> list[Assignment]:
    cfg = SplitConfig.from_toml(path)
    files = load_files(None, cfg, cols)
    control = resolve_control(files, cols.control_pert, cols.pert_col)
    return assign_files(files, cfg, control, pert_col=cols.pert_col,
                        cell_type_key=cols.cell_type_key, **options)


def check_no_leak(assignments: list[Assignment], config: SplitConfig) -> None:
    """The leak property of data.md §2.9, with the referenced groups computed independently."""
    for a in assignments:
        f = a.file
        pert = ~a.is_control
        # 1. no perturbed val/test cell is in train
        assert not (pert & a.train & (a.val | a.test)).any()
        # 2. union of perturbed cells over splits == perturbed cells of the referenced groups
        zs = {k.partition(".")[2] for k in config.zeroshot if k.partition(".")[0] == f.dataset}
        fs = {k.partition(".")[2] for k in config.fewshot if k.partition(".")[0] == f.dataset}
        referenced = np.isin(f.cell_type, sorted(zs | fs)) | (f.dataset in config.training)
        union = a.train | a.val | a.test
        np.testing.assert_array_equal(union & pert, referenced & pert)
        # perturbed cells never belong to two splits (only controls are shared)
        n_splits = a.train.astype(int) + a.val + a.test
        assert (n_splits[pert] <= 1).all()


# ---------------------------------------------------------------------------------------------
# (a) perturbench zero-shot U87MG, from a TOML file


@pytest.fixture(scope="module")
def pb_zeroshot(tmp_path_factory):
    path = pb_toml(tmp_path_factory.mktemp("zs"),
                   '[training]\nperturbench = "train"\n[zeroshot]\n"perturbench.U87MG" = "test"\n')
    return path, assign_from_toml(path)


def test_zeroshot_u87mg_all_perturbed_in_test_none_in_train(pb_zeroshot, perturbench):
    path, (a,) = pb_zeroshot
    obs = perturbench.obs
    # the lazily opened file's labels line up with the file's rows
    np.testing.assert_array_equal(a.file.barcodes, obs.index.to_numpy())
    u87 = (obs["cell_type"] == "U87MG").to_numpy()
    ctrl = (obs["condition"] == "control").to_numpy()
    pert = u87 & ~ctrl
    assert pert.sum() == 765 and (u87 & ctrl).sum() == 100
    assert a.test[pert].all()
    assert not a.train[pert].any() and not a.val[pert].any()
    # U87MG controls: train and test (heldout_controls_in_train default)
    assert a.train[u87 & ctrl].all() and a.test[u87 & ctrl].all()
    assert not a.val.any()
    # the test split is exactly U87MG
    np.testing.assert_array_equal(a.test, u87)
    # every other cell line trains, controls included; nothing else is in test
    others = ~u87
    assert a.train[others].all()
    np.testing.assert_array_equal(a.is_control, ctrl)


def test_zeroshot_u87mg_through_prepare(pb_zeroshot, perturbench):
    """The same acceptance property on the built per-split matrices (barcodes and rows)."""
    path, _ = pb_zeroshot
    prep = prepare(None, path, PB_COLS)
    assert set(prep.splits) == {"train", "test"}
    obs = perturbench.obs
    u87_pert = set(obs.index[(obs["cell_type"] == "U87MG") & (obs["condition"] != "control")])
    train, test = prep.splits["train"], prep.splits["test"]
    train_pert = set(train.barcodes[~train.is_control])
    test_pert = set(test.barcodes[~test.is_control])
    assert test_pert == u87_pert
    assert not (train_pert & u87_pert)
    assert len(train_pert) == (obs["condition"] != "control").sum() - 765
    # the rows of X are those cells: compare a few against the file
    X = perturbench.X
    for i in (0, 17, len(test.barcodes) - 1):
        row = perturbench.obs_names.get_loc(test.barcodes[i])
        np.testing.assert_allclose(test.X[i].numpy(), X[row].toarray().ravel(), rtol=1e-6)


def test_zeroshot_heldout_controls_in_train_off(pb_zeroshot):
    path, _ = pb_zeroshot
    (a,) = assign_from_toml(path, heldout_controls_in_train=False)
    u87 = a.file.cell_type == "U87MG"
    assert not a.train[u87].any()
    assert a.test[u87 & a.is_control].all()


# ---------------------------------------------------------------------------------------------
# (b) perturbench few-shot on k562


FEWSHOT = """[training]
perturbench = "train"
[fewshot."perturbench.k562"]
val = ["KLF1", "SGK1+TBX3"]
test = ["HK2", "MAPK1"]
"""


@pytest.fixture(scope="module")
def pb_fewshot(tmp_path_factory):
    path = pb_toml(tmp_path_factory.mktemp("fs"), FEWSHOT)
    return path, assign_from_toml(path)


def test_fewshot_listed_perturbations_only_in_their_split(pb_fewshot):
    _, (a,) = pb_fewshot
    f = a.file
    k562 = f.cell_type == "k562"
    for split, listed in (("val", ["KLF1", "SGK1+TBX3"]), ("test", ["HK2", "MAPK1"])):
        cells = k562 & np.isin(f.pert, listed)
        assert cells.sum() == 200
        assert a.mask(split)[cells].all()
        others = [s for s in ("train", "val", "test") if s != split]
        assert not any(a.mask(s)[cells].any() for s in others)
        # the split holds nothing perturbed except the listed perturbations of k562
        in_split = a.mask(split) & ~a.is_control
        np.testing.assert_array_equal(in_split, cells)
    # unlisted k562 perturbations train
    unlisted = k562 & ~a.is_control & ~np.isin(f.pert, ["KLF1", "SGK1+TBX3", "HK2", "MAPK1"])
    assert a.train[unlisted].all() and unlisted.sum() == 3275 - 400
    # the few-shot rule is per cell type: MAPK1 of the glioblastoma lines still trains
    gbm_mapk1 = ~k562 & (f.pert == "MAPK1")
    assert gbm_mapk1.sum() == 274 and a.train[gbm_mapk1].all() and not a.test[gbm_mapk1].any()


def test_fewshot_controls_in_every_created_split(pb_fewshot):
    _, (a,) = pb_fewshot
    f = a.file
    k562_ctrl = (f.cell_type == "k562") & a.is_control
    assert k562_ctrl.sum() == 100
    assert a.train[k562_ctrl].all() and a.val[k562_ctrl].all() and a.test[k562_ctrl].all()
    # controls of the other cell lines only train
    other_ctrl = (f.cell_type != "k562") & a.is_control
    assert a.train[other_ctrl].all()
    assert not (a.val | a.test)[other_ctrl].any()


def test_fewshot_val_only_creates_no_test_part(tmp_path):
    path = pb_toml(tmp_path, '[fewshot."perturbench.A172"]\nval = ["SGK1"]\n')
    (a,) = assign_from_toml(path)
    a172 = a.file.cell_type == "A172"
    assert not a.test.any()  # no test perturbation => no test part, so no test controls
    assert a.val[a172 & a.is_control].all()
    assert a.train[a172 & a.is_control].all()
    # perturbench is referenced only through [fewshot]: the other cell lines are ignored
    assert not (a.train | a.val)[~a172].any()
    check_no_leak([a], SplitConfig.from_toml(path))


# ---------------------------------------------------------------------------------------------
# (c) kang, B cells held out, in memory


KANG_SPEC = {"training": {"kang": "train"}, "zeroshot": {"kang.B cells": "test"}}


def test_kang_b_cells_zeroshot_in_memory(kang_raw):
    df = assign(kang_raw, KANG_SPEC, KANG_COLS)
    assert list(df.columns) == ["train", "val", "test", "split", "is_control"]
    assert (df.index == kang_raw.obs_names).all()
    obs = kang_raw.obs
    b = (obs["cell_type"] == "B cells").to_numpy()
    stim = (obs["target_gene"] == "IFNB").to_numpy()
    np.testing.assert_array_equal(df["is_control"].to_numpy(), ~stim)
    assert (df["split"][b & stim] == "test").all() and (b & stim).sum() == 154
    assert (df["split"][b & ~stim] == "train+test").all() and (b & ~stim).sum() == 144
    assert (df["split"][~b] == "train").all()
    assert not df["val"].any()


def test_kang_heldout_cell_type_spelled_otherwise_is_warned(kang_raw, recwarn):
    """One donor's B cells annotated in lower case form another cell type that trains: the
    held-out 'B cells' leak unless the spelling variant is said (labels, cells, splits, fix)."""
    a = kang_raw.copy()
    ct = a.obs["cell_type"].astype(str)
    a.obs["cell_type"] = ct.where(a.obs["batch"] == "donor101", ct.str.lower())
    lower = int((a.obs["cell_type"] == "b cells").sum())
    upper = int((a.obs["cell_type"] == "B cells").sum())
    with pytest.warns(UserWarning, match=(
            rf"obs\['cell_type'\] of dataset 'kang' spells held-out cell type\(s\) in other "
            rf"ways.*'B cells' \(\[zeroshot\]\.\"kang\.B cells\"; {upper} cells, split test\) "
            rf"vs 'b cells' \({lower} cells, split train\).*adata\.obs\['cell_type'\] = "
            r"adata\.obs\['cell_type'\]\.replace\(\{'b cells': 'B cells'\}\)")):
        df = assign(a, KANG_SPEC, KANG_COLS)
    assert df["train"][a.obs["cell_type"] == "b cells"].all()  # (warned, not changed)
    # '_', '-' and spaces count as one separator; labels held out alike are not said
    a.obs["cell_type"] = ct.where(a.obs["batch"] == "donor101", ct.str.replace(" ", "_"))
    with pytest.warns(UserWarning, match=r"'B cells' .* vs 'B_cells' \(\d+ cells, split train"):
        assign(a, KANG_SPEC, KANG_COLS)
    recwarn.clear()
    both = {**KANG_SPEC, "zeroshot": {"kang.B cells": "test", "kang.B_cells": "test"}}
    assign(a, both, KANG_COLS)
    assert not [w for w in recwarn if "spells" in str(w.message)]
    # a [fewshot] perturbation spelled otherwise in some cells of its cell type trains there
    a = kang_raw.copy()
    pert = a.obs["target_gene"].astype(str)
    a.obs["target_gene"] = pert.where((a.obs["batch"] == "donor101") | (pert != "IFNB"), "ifnb")
    spec = {"training": {"kang": "train"}, "fewshot": {"kang.B cells": {"test": ["IFNB"]}}}
    b = (a.obs["cell_type"] == "B cells").to_numpy()
    n_lower = int((b & (a.obs["target_gene"] == "ifnb").to_numpy()).sum())
    with pytest.warns(UserWarning, match=(
            rf"\[fewshot\]\.\"kang\.B cells\" holds out perturbation\(s\) that other labels "
            rf"of obs\['target_gene'\] in cell type 'B cells' spell.*test 'IFNB' \(\d+ cells\) "
            rf"vs 'ifnb' \({n_lower} cells, split train\).*replace\(\{{'ifnb': 'IFNB'\}}\)")):
        assign(a, spec, KANG_COLS)


def test_kang_fewshot_typo_in_the_spec_is_fixed_in_the_spec_not_the_data(kang_raw):
    """A [fewshot] label that no cell carries ('IFNb') next to the data's 'IFNB': the advice
    was .replace({'IFNB': 'IFNb'}), renaming the real cells to the typo. The spec is to fix."""
    spec = {"training": {"kang": "train"}, "fewshot": {"kang.B cells": {"test": ["IFNb"]}}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assign(kang_raw, spec, KANG_COLS, on_missing_perturbation="warn")
    said = [str(w.message) for w in caught if "spell" in str(w.message)]
    assert len(said) == 1, said
    assert re.search(r"test 'IFNb' \(0 cells\) vs 'IFNB' \(154 cells, split train\)\. .* No cell "
                     r"is labelled 'IFNb': if it means 'IFNB', write 'IFNB' instead of 'IFNb' "
                     r"in the split spec\.$", said[0]), said[0]
    assert ".replace(" not in said[0]


def test_kang_dataset_name_is_configurable(kang_raw, capsys):
    spec = {"training": {"pbmc": "train"}, "zeroshot": {"pbmc.CD8 T cells": "val"}}
    df = assign(kang_raw, spec, KANG_COLS)  # the only dataset of the spec
    assert df["val"].sum() == (kang_raw.obs["cell_type"] == "CD8 T cells").sum()
    # referenced only through [zeroshot]: the other cell types are ignored
    df2 = assign(kang_raw, {"zeroshot": {"pbmc.CD8 T cells": "val"}}, KANG_COLS, dataset="pbmc")
    np.testing.assert_array_equal(df2["val"].to_numpy(), df["val"].to_numpy())
    assert set(df2["split"][kang_raw.obs["cell_type"] != "CD8 T cells"]) == {""}
    b_cells = (kang_raw.obs["cell_type"] == "B cells").sum()
    assert (f"cells in no split, left out: pbmc.B cells ({b_cells:,} cells), "
            in capsys.readouterr().out)
    # a spec naming a second dataset that was not given is an error naming it
    with pytest.raises(SplitConfigError, match=r"dataset 'x' is used in \[training\] \"x\" but "
                                               r"has no entry in \[datasets\] and was not passed "
                                               r"in memory"):
        assign(kang_raw, {"zeroshot": {"pbmc.CD8 T cells": "val"}, "training": {"x": "train"}},
               KANG_COLS, dataset="pbmc")
    # one AnnData and two unknown names: both named with where they are used, and the name
    # used least is the likely typo
    spec = {"training": {"kang": "train"}, "zeroshot": {"knag.B cells": "test"}}
    with pytest.raises(SplitConfigError, match=r"2 dataset names without a \[datasets\] path: "
                                               r"'kang' \(\[training\] \"kang\"\), 'knag' "
                                               r"\(\[zeroshot\] \"knag.B cells\"\)\. A typo\? Use"):
        assign(kang_raw, spec, KANG_COLS)
    spec["fewshot"] = {"kang.CD8 T cells": {"val": ["STIM"]}}
    with pytest.raises(SplitConfigError, match=r"'knag' is used least: Did you mean: 'kang'"):
        assign(kang_raw, spec, KANG_COLS)


def test_assign_warns_about_unassigned_like_labels_as_fit_does():
    """Papalexi keeps 4,537 'unassigned' cells: inspecting a split with assign (what the docs
    recommend before fit) says so, in fit's words and pointing at the caller."""
    a = ad.read_h5ad(need(PAPALEXI))
    spec = ('[training]\npapalexi = "train"\n[fewshot."papalexi.THP-1"]\nval = ["IRF7"]\n'
            'test = ["IFNGR2", "JAK2"]\n')
    cols = {"pert_col": "target_gene", "cell_type_key": "cell_type",
            "control_pert": "non-targeting"}
    said = (r"obs\['target_gene'\] label\(s\) 'unassigned' \(4,537 cells\) look like cells "
            r"without an assigned perturbation; they train as a perturbation of their own")
    with pytest.warns(UserWarning, match=said) as caught:
        df = assign(a, spec, cols)
    assert [w.filename for w in caught if "unassigned" in str(w.message)] == [__file__]
    assert df["train"][(a.obs["target_gene"] == "unassigned").to_numpy()].all()  # (said only)
    with pytest.warns(UserWarning, match=said):  # (the same words as fit's)
        prepare(a, spec, ColumnMap.build(**cols, output_space="gene"), allow_counts=True)
    with warnings.catch_warnings():  # dropped first: nothing to say
        warnings.simplefilter("error")
        assign(a[a.obs["target_gene"] != "unassigned"].copy(), spec, cols)


@pytest.mark.parametrize("spec", [{}, None, ""], ids=["dict", "none", "string"])
def test_empty_spec_trains_on_every_cell_as_fit_does(kang_raw, spec):
    df = assign(kang_raw, spec, KANG_COLS)
    assert df["train"].all() and not (df["val"] | df["test"]).any()
    assert (df["split"] == "train").all()


# ---------------------------------------------------------------------------------------------
# (d) leakage property for the three real specs


def test_no_leak_perturbench_zeroshot(pb_zeroshot):
    path, assignments = pb_zeroshot
    check_no_leak(assignments, SplitConfig.from_toml(path))


def test_no_leak_perturbench_fewshot(pb_fewshot):
    path, assignments = pb_fewshot
    check_no_leak(assignments, SplitConfig.from_toml(path))


def test_no_leak_kang(kang_raw):
    cfg = SplitConfig.from_toml(KANG_SPEC)
    f = from_anndata(kang_raw, "kang", "target_gene", "cell_type", "batch")
    assignments = assign_files([f], cfg, "control", pert_col="target_gene")
    check_no_leak(assignments, cfg)


def test_leak_check_detects_a_leak(pb_zeroshot):
    """The checker itself is not vacuous: a single leaked cell makes it fail."""
    path, (a,) = pb_zeroshot
    leaked = Assignment(a.file, a.is_control, a.train.copy(), a.val, a.test)
    leaked.train[np.flatnonzero(a.test & ~a.is_control)[0]] = True
    with pytest.raises(AssertionError):
        check_no_leak([leaked], SplitConfig.from_toml(path))


# ---------------------------------------------------------------------------------------------
# (e) summary table


def test_summary_zeroshot(pb_zeroshot, perturbench):
    _, assignments = pb_zeroshot
    s = summarize(assignments)
    assert list(s.columns) == ["dataset", "file", "cell_type", "split", "n_perturbations",
                               "n_perturbed_cells", "n_controls"]
    assert set(s["dataset"]) == {"perturbench"}
    assert set(s["file"]) == {PERTURBENCH.name}
    got = {(r.cell_type, r.split): (r.n_perturbations, r.n_perturbed_cells, r.n_controls)
           for r in s.itertuples()}
    obs = perturbench.obs
    expect = {}
    for ct, sub in obs.groupby("cell_type", observed=True):
        p = sub[sub["condition"] != "control"]
        n = (p["condition"].nunique(), len(p), int((sub["condition"] == "control").sum()))
        expect[(ct, "test" if ct == "U87MG" else "train")] = n
    expect[("U87MG", "train")] = (0, 0, 100)  # controls-only train part
    assert got == expect
    assert got[("U87MG", "test")] == (9, 765, 100)
    assert got[("k562", "train")] == (33, 3275, 100)


def test_summary_fewshot(pb_fewshot):
    _, assignments = pb_fewshot
    s = summarize(assignments).set_index(["cell_type", "split"])
    assert tuple(s.loc[("k562", "val")][["n_perturbations", "n_perturbed_cells",
                                         "n_controls"]]) == (2, 200, 100)
    assert tuple(s.loc[("k562", "test")][["n_perturbations", "n_perturbed_cells",
                                          "n_controls"]]) == (2, 200, 100)
    assert tuple(s.loc[("k562", "train")][["n_perturbations", "n_perturbed_cells",
                                           "n_controls"]]) == (29, 2875, 100)
    assert ("A172", "val") not in s.index


# ---------------------------------------------------------------------------------------------
# (f) precedence and "ignored" (synthetic, no ../shared needed)


def synth(n_per: int = 6) -> ad.AnnData:
    """Cell types A, B, C; perturbations P1, P2 and controls in each."""
    rows = [(ct, p) for ct in "ABC" for p in ("P1", "P2", "ctrl") for _ in range(n_per)]
    obs = pd.DataFrame(rows, columns=["cell_type", "gene"],
                       index=[f"c{i}" for i in range(len(rows))])
    rng = np.random.default_rng(0)
    return ad.AnnData(rng.random((len(rows), 4), dtype=np.float32), obs=obs)


def synth_assign(config: SplitConfig, adata: ad.AnnData | None = None, **options) -> pd.DataFrame:
    a = adata if adata is not None else synth()
    f = from_anndata(a, "d", "gene", "cell_type", None)
    (res,) = assign_files([f], config, "ctrl", **options)
    df = membership_frame(res)
    df["cell_type"], df["gene"] = f.cell_type, f.pert
    return df


def splits_of(df: pd.DataFrame, ct: str, pert: str) -> set[str]:
    return set(df["split"][(df["cell_type"] == ct) & (df["gene"] == pert)])


def test_precedence_zeroshot_over_fewshot_over_training():
    # from_toml refuses a cell type in both sections; build the conflicting spec directly to
    # prove the assignment order itself (zeroshot -> fewshot -> training)
    cfg = SplitConfig.model_construct(
        datasets={}, training={"d": "train"}, zeroshot={"d.A": "val"},
        fewshot={"d.A": FewshotEntry(test=["P1"]), "d.B": FewshotEntry(test=["P1"])},
        base_dir=None, source=None,
    )
    df = synth_assign(cfg)
    # A: zeroshot val wins over the fewshot rule
    assert splits_of(df, "A", "P1") == {"val"} and splits_of(df, "A", "P2") == {"val"}
    assert splits_of(df, "A", "ctrl") == {"train+val"}
    # B: fewshot wins over training
    assert splits_of(df, "B", "P1") == {"test"} and splits_of(df, "B", "P2") == {"train"}
    assert splits_of(df, "B", "ctrl") == {"train+test"}
    # C: training
    assert {s for p in ("P1", "P2", "ctrl") for s in splits_of(df, "C", p)} == {"train"}


def test_zeroshot_train_value_and_ignored_cell_types():
    cfg = SplitConfig.from_toml({"zeroshot": {"d.A": "train", "d.B": "test"}})
    df = synth_assign(cfg)
    assert {s for p in ("P1", "P2", "ctrl") for s in splits_of(df, "A", p)} == {"train"}
    assert splits_of(df, "B", "P1") == {"test"} and splits_of(df, "B", "ctrl") == {"train+test"}
    # C is in no rule and d is not in [training]: ignored entirely
    assert (df["split"][df["cell_type"] == "C"] == "").all()


def test_fewshot_cell_type_without_perturbed_cells_creates_nothing():
    a = synth()
    a = a[~((a.obs["cell_type"] == "B") & (a.obs["gene"] != "ctrl"))].copy()
    cfg = SplitConfig.from_toml({"training": {"d": "train"}, "fewshot": {"d.B": {"val": []}}})
    df = synth_assign(cfg, a)
    assert (df["split"][df["cell_type"] == "B"] == "").all()  # B controls dropped
    assert (df["split"][df["cell_type"] != "B"] == "train").all()


def test_fewshot_train_part_always_created_even_if_controls_only():
    cfg = SplitConfig.from_toml({"fewshot": {"d.A": {"val": ["P1"], "test": ["P2"]}}})
    df = synth_assign(cfg)
    assert splits_of(df, "A", "ctrl") == {"train+val+test"}
    assert splits_of(df, "A", "P1") == {"val"} and splits_of(df, "A", "P2") == {"test"}
    assert not (df["train"] & (df["gene"] != "ctrl")).any()


def test_in_memory_without_references_trains_everything_and_keeps_config():
    """An empty spec trains every in-memory dataset, without editing the caller's SplitConfig."""
    cfg = SplitConfig.from_toml({})
    cols = ColumnMap.build(control_pert="ctrl")
    prep = prepare(synth(), cfg, cols)
    assert set(prep.splits) == {"train"} and prep.splits["train"].n_obs == 54
    assert cfg.training == {}
    # the same object can be reused with differently named data
    prep2 = prepare({"other": synth()}, cfg, cols)
    assert prep2.splits["train"].n_obs == 54 and prep2.files[0].dataset == "other"


def test_split_config_summarize_matches_the_training_summary():
    """summarize_config prints without training what fit writes to split_summary.csv."""
    from statetx.datasets import example_toml

    cols = {"pert_col": "target_gene", "cell_type_key": "cell_type", "control_pert": "DMSO"}
    spec = SplitConfig.from_toml(example_toml("zhao2021"))
    table = summarize_config(spec, columns=cols)
    ref = prepare(None, example_toml("zhao2021"), ColumnMap.build(**cols), allow_counts=True,
                  splits=("train",)).summary
    pd.testing.assert_frame_equal(table, ref)
    assert set(table["split"]) == {"train", "val", "test"}
    assert table.loc[table["split"] == "test", "n_perturbed_cells"].sum() == 500


def test_val_subsample_fraction_keeps_the_first_parts(capsys):
    """Reference semantics: validation parts (dataset, file, cell type) sorted, the first
    max(1, ceil(n * fraction)) kept, deterministically."""
    from statetx.datasets import example_toml, load_zhao2021

    cols = ColumnMap.build(pert_col="target_gene", cell_type_key="cell_type", control_pert="DMSO")
    spec = SplitConfig.from_toml(example_toml("zhao2021")).model_dump()
    spec["datasets"] = {}
    zs = spec["zeroshot"]
    for ct in ("zhao.glioblastoma_PW030", "zhao.glioblastoma_PW032"):
        zs[ct] = "val"
    adata = load_zhao2021()
    full = prepare(adata, spec, cols, allow_counts=True)
    capsys.readouterr()
    half = prepare(adata, spec, cols, allow_counts=True, val_subsample_fraction=0.5)
    left_out = sorted(set(full.summary.loc[full.summary["split"] == "val", "cell_type"]))[-1]
    assert (f"val_subsample_fraction=0.5: 2 of 3 validation part(s) kept; left out of "
            f"validation: zhao.{left_out} (") in capsys.readouterr().out  # said, not silent
    val_cts = lambda p: sorted(p.summary.loc[p.summary["split"] == "val", "cell_type"])  # noqa: E731
    assert len(val_cts(full)) == 3
    assert val_cts(half) == val_cts(full)[:2]  # ceil(3 * 0.5) = 2, in sorted order
    summary = summarize_config(SplitConfig.from_toml(spec), adata, cols, val_subsample_fraction=0.5)
    pd.testing.assert_frame_equal(summary, half.summary)  # tx split shows what fit will use
    assert val_cts(prepare(adata, spec, cols, allow_counts=True,
                           val_subsample_fraction=0.01)) == val_cts(full)[:1]
    # the training split is untouched
    np.testing.assert_array_equal(half.splits["train"].X.numpy(), full.splits["train"].X.numpy())
    with pytest.raises(ConfigError, match="val_subsample_fraction=1.5"):
        prepare(adata, spec, cols, allow_counts=True, val_subsample_fraction=1.5)


def test_assign_several_datasets_in_memory_and_from_files(perturbench, tmp_path):
    """perturbench as two labs' files (K562; the glioblastoma lines): assign takes a dict of
    AnnData or, with [datasets] paths, None, like fit; one row per cell with its dataset."""
    k562 = perturbench[perturbench.obs["cell_type"] == "k562"].copy()
    gbm = perturbench[perturbench.obs["cell_type"] != "k562"].copy()
    spec = ('[training]\nnorman = "train"\nmcfaline = "train"\n'
            '[zeroshot]\n"mcfaline.U87MG" = "test"\n'
            '[fewshot."norman.k562"]\ntest = ["MAPK1+TGFBR2"]\n')
    cols = {"pert_col": "target_gene", "cell_type_key": "cell_type", "control_pert": "control"}
    m = assign({"norman": k562, "mcfaline": gbm}, spec, cols)
    assert len(m) == perturbench.n_obs and set(m["dataset"]) == {"norman", "mcfaline"}
    test = m[m["test"] & ~m["is_control"]]
    u87 = (gbm.obs["cell_type"] == "U87MG") & (gbm.obs["target_gene"] != "control")
    pair = (k562.obs["target_gene"] == "MAPK1+TGFBR2").sum()
    assert len(test) == u87.sum() + pair
    k562.write_h5ad(tmp_path / "k562.h5ad")
    gbm.write_h5ad(tmp_path / "gbm.h5ad")
    files = (f'[datasets]\nnorman = "{tmp_path / "k562.h5ad"}"\n'
             f'mcfaline = "{tmp_path / "gbm.h5ad"}"\n' + spec)
    with pytest.raises(DataError, match=r"dataset='mine' names the AnnData, but the spec does "
                                        r"not use that dataset \(it uses 'mcfaline', 'norman'\)"):
        assign(k562, spec, cols, dataset="mine")
    # the columns as keywords, as fit_all_baselines takes them
    pd.testing.assert_frame_equal(assign({"norman": k562, "mcfaline": gbm}, spec, **cols), m)
    # a misspelt dataset: the typo hint fit gives
    typo = '[training]\nnorman = "train"\n[fewshot."normann.k562"]\ntest = ["MAPK1+TGFBR2"]\n'
    with pytest.raises(SplitConfigError, match=r"'norman' \(\[training\] \"norman\"\), 'normann' "
                                               r"\(\[fewshot\] \"normann.k562\"\)\. A typo\?"):
        assign(k562, typo, cols)
    with pytest.raises(ConfigError, match="dataset= names a single AnnData"):
        assign({"norman": k562, "mcfaline": gbm}, spec, cols, dataset="norman")
    on_disk = assign(None, files, cols)
    assert set(on_disk["file"]) == {"k562.h5ad", "gbm.h5ad"}
    pd.testing.assert_frame_equal(on_disk.drop(columns="file").sort_index(),
                                  m.drop(columns="file").sort_index())


def test_a_pair_named_in_the_other_order_is_suggested(perturbench):
    """perturbench K562: a few-shot pair written B+A is not silently empty; the error suggests
    the data's A+B first."""
    k562 = perturbench[perturbench.obs["cell_type"] == "k562"].copy()
    spec = '[training]\nnorman = "train"\n[fewshot."norman.k562"]\ntest = ["TGFBR2+MAPK1"]\n'
    cols = {"pert_col": "target_gene", "cell_type_key": "cell_type", "control_pert": "control"}
    with pytest.raises(DataError, match=r"TGFBR2\+MAPK1.*Did you mean: 'MAPK1\+TGFBR2'"):
        assign(k562, spec, cols, dataset="norman")


def test_in_memory_datasets_the_spec_does_not_use_are_said(kang_raw, capsys):
    cols = ColumnMap.build(pert_col="target_gene", cell_type_key="cell_type",
                           control_pert="control")
    a, b = kang_raw[:800].copy(), kang_raw[800:].copy()
    with pytest.warns(UserWarning, match="in-memory dataset\\(s\\) 'b' are not used.*left out"):
        files = load_files({"a": a, "b": b}, SplitConfig.from_toml({"training": {"a": "train"}}),
                           cols)
    assert [f.dataset for f in files] == ["a"]
    capsys.readouterr()
    spec = SplitConfig.from_toml({"datasets": {"a": "elsewhere.h5ad"}, "training": {"a": "train"}})
    load_files({"a": a}, spec, cols)
    assert "used instead of the [datasets] path for 'a' (elsewhere.h5ad)" in (
        capsys.readouterr().out)


def test_the_moved_summarize_says_where_it_went():
    from statetx.config import SplitConfig

    with pytest.raises(AttributeError, match=r"statetx.splits.summarize_config\(config, data"):
        SplitConfig.from_toml({"training": {"d": "train"}}).summarize(None)
