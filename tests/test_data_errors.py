"""Bad inputs (data.md §2.10): each raises the documented error class with a message that names the
offending key, file or value. Everything here is synthetic; nothing needs ../shared.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from statetx.config import ColumnMap, SplitConfig
from statetx.data import prepare
from statetx.errors import ConfigError, DataError, SplitConfigError
from statetx.io import from_anndata, resolve_control
from statetx.sets import CellSetSampler
from statetx.splits import assign
from statetx.stream import BlockReader, prepare_stream
from statetx.vocab import load_pert_features

COLS = ColumnMap.build(pert_col="gene", cell_type_key="cell_type", batch_col="gem_group",
                       control_pert="ctrl")
TRAIN = {"training": {"d": "train"}}


def make_adata(cell_types=("A", "B"), perts=("P1", "P2", "ctrl"), n: int = 3, genes: int = 5,
               seed: int = 0, var_prefix: str = "g") -> ad.AnnData:
    rows = [(ct, p, f"gg{i % 2}") for ct in cell_types for p in perts for i in range(n)]
    obs = pd.DataFrame(rows, columns=["cell_type", "gene", "gem_group"],
                       index=[f"c{i}" for i in range(len(rows))])
    X = np.random.default_rng(seed).random((len(rows), genes), dtype=np.float32)
    a = ad.AnnData(X, obs=obs)
    a.var_names = [f"{var_prefix}{i}" for i in range(genes)]
    return a


def write(a: ad.AnnData, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a.write_h5ad(path)
    return path


def toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "split.toml"
    p.write_text(text)
    return p


# ---------------------------------------------------------------------------------------------
# the split file itself (SplitConfigError)


def test_missing_dataset_path(tmp_path):
    path = toml(tmp_path, '[datasets]\nreplogle = "no/such/dir"\n[training]\nreplogle = "train"\n')
    with pytest.raises(SplitConfigError,
                       match=r'\[datasets\]\.replogle = "no/such/dir" matched no \.h5 or \.h5ad') \
            as exc:
        prepare(None, path, COLS)
    assert str(tmp_path.resolve()) in str(exc.value)  # says where it searched


def test_empty_glob(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "notes.txt").write_text("not data")
    path = toml(tmp_path, '[datasets]\nreplogle = "raw/*.h5ad"\n[training]\nreplogle = "train"\n')
    with pytest.raises(SplitConfigError, match=r'"raw/\*\.h5ad" matched no .*not searched '
                                               "recursively"):
        SplitConfig.from_toml(path).resolve_paths("replogle")


def test_absolute_pattern_matching_nothing_is_not_said_relative_to_a_folder(tmp_path):
    """An absolute pattern was said to be "searched relative to <cwd>": it is looked for where
    it is, and the first folder (or file) of it that does not exist is named."""
    (tmp_path / "raw").mkdir()
    for pattern, said in [(f"{tmp_path}/nonexist/*.h5ad", f" (not found: {tmp_path}/nonexist)."),
                          (f"{tmp_path}/raw/*.h5ad", " files. Directories"),
                          (f"{{{tmp_path}/raw,{tmp_path}/gone}}/x.h5ad",
                           f" (not found: {tmp_path}/raw/x.h5ad, {tmp_path}/gone).")]:
        spec = SplitConfig.from_toml({"datasets": {"d": pattern}, "training": {"d": "train"}})
        with pytest.raises(SplitConfigError) as err:
            spec.resolve_paths("d")
        assert said in str(err.value) and "relative to" not in str(err.value), err.value


@pytest.mark.parametrize("section,body", [
    ("zeroshot", '[zeroshot]\n"replogle.hepg2" = "test"\n'),
    ("fewshot", '[fewshot."replogle.hepg2"]\ntest = ["MYC"]\n'),
])
def test_dataset_referenced_but_not_declared(tmp_path, section, body):
    path = toml(tmp_path, '[datasets]\nother = "x.h5ad"\n' + body)
    with pytest.raises(SplitConfigError,
                       match=rf"dataset 'replogle' is used in \[{section}\] \"replogle.hepg2\" "
                             r"but has no entry in \[datasets\].*replogle = "):
        prepare(None, path, COLS)


def test_one_anndata_and_a_misspelt_dataset_name():
    spec = {"training": {"d": "train"}, "zeroshot": {"dd.A": "test"}}
    with warnings.catch_warnings():  # (the error is the message: no warning of a dataset
        warnings.simplefilter("error")  # 'data' the user never named before it)
        with pytest.raises(SplitConfigError, match=r"one AnnData was given, but the split spec "
                           r"uses 2 dataset names.*'d' \(\[training\] \"d\"\), 'dd' "
                           r"\(\[zeroshot\] \"dd.A\"\)\. A typo\?.*dataset_name="):
            prepare(make_adata(), spec, COLS)


def test_anndata_named_otherwise_than_the_spec():
    spec = {"training": {"kang": "train"}}
    with pytest.raises(SplitConfigError, match=r"given in memory is named 'kangg' .*name it "
                                               r"'kang' \(dataset_name=...\)"):
        prepare(make_adata(), spec, COLS, dataset_name="kangg")
    with pytest.raises(SplitConfigError, match=r"named 'x' .*name it 'kang'\.$"):
        prepare({"x": make_adata()}, spec, COLS)


def test_training_value_other_than_train():
    with pytest.raises(SplitConfigError,
                       match=r'\[training\]\.replogle = "val" is not allowed.*only accepted value '
                             'is "train"'):
        SplitConfig.from_toml('[training]\nreplogle = "val"\n')


@pytest.mark.parametrize("text,key", [
    ('[zeroshot]\nreplogle_hepg2 = "test"\n', "replogle_hepg2"),
    ('[zeroshot]\n"replogle." = "test"\n', "replogle."),
    ('[fewshot.K562]\nval = ["MYC"]\n', "K562"),
])
def test_heldout_key_without_a_dot(text, key):
    with pytest.raises(SplitConfigError,
                       match=rf'key "{key}" must have the form "<dataset>.<cell type>"'):
        SplitConfig.from_toml(text)


def test_zeroshot_value_not_a_split():
    with pytest.raises(SplitConfigError,
                       match=r'\[zeroshot\]\."replogle.hepg2" = "testing": the split must be'):
        SplitConfig.from_toml('[zeroshot]\n"replogle.hepg2" = "testing"\n')


def test_unknown_fewshot_key():
    with pytest.raises(SplitConfigError,
                       match=r"\[fewshot\]\.\"replogle.K562\" has an unknown key 'train'; only "
                             "'val' and 'test'"):
        SplitConfig.from_toml('[fewshot."replogle.K562"]\ntrain = ["A"]\ntest = ["B"]\n')


def test_unknown_section_with_did_you_mean():
    with pytest.raises(SplitConfigError,
                       match=r"unknown section \[zeroshoot\].*Did you mean: 'zeroshot'"):
        SplitConfig.from_toml('[zeroshoot]\n"a.b" = "test"\n')


def test_a_missing_column_suggests_the_column_it_is_a_word_of():
    a = make_adata()
    a.obs = a.obs.rename(columns={"gene": "target_gene"}).assign(gender="f")
    with pytest.raises(DataError, match=r"'gene'.*Did you mean: 'target_gene', 'gender'\?"):
        prepare(a, TRAIN, COLS)


def test_toml_syntax_error_reports_line_and_column(tmp_path):
    text = '[datasets]\nkang = "k.h5ad"\n[training]\nkang = train\n'
    with pytest.raises(SplitConfigError, match=r"invalid TOML: .*line 4, column 8"):
        SplitConfig.from_toml(text)
    path = toml(tmp_path, text)
    with pytest.raises(SplitConfigError, match=rf"{path.name}: invalid TOML: .*line 4"):
        SplitConfig.from_toml(path)


def test_perturbation_in_both_val_and_test():
    with pytest.raises(SplitConfigError,
                       match=r"perturbation 'MYC' is listed in both val and test of "
                             r"\[fewshot\]\.\"replogle.K562\""):
        SplitConfig.from_toml('[fewshot."replogle.K562"]\nval = ["MYC", "A"]\ntest = ["MYC"]\n')


def test_same_cell_type_in_zeroshot_and_fewshot():
    text = '[zeroshot]\n"replogle.K562" = "test"\n[fewshot."replogle.K562"]\nval = ["MYC"]\n'
    with pytest.raises(SplitConfigError,
                       match=r'"replogle.K562" appears in both \[zeroshot\] and \[fewshot\]'):
        SplitConfig.from_toml(text)


def test_dataset_name_with_a_dot_and_bad_path_value():
    with pytest.raises(SplitConfigError, match=r"\[datasets\] name 'rep.logle' contains a dot"):
        SplitConfig.from_toml({"datasets": {"rep.logle": "x"}})
    with pytest.raises(SplitConfigError, match=r"\[training\] name 'my.data' contains a dot"):
        SplitConfig.from_toml({"training": {"my.data": "train"},
                               "zeroshot": {"my.data.K562": "test"}})
    with pytest.raises(SplitConfigError, match=r"\[datasets\]\.d = 3 must be a path"):
        SplitConfig.from_toml({"datasets": {"d": 3}})


# ---------------------------------------------------------------------------------------------
# data contradicting the file (DataError)


def test_cell_type_absent_lists_available():
    spec = {**TRAIN, "zeroshot": {"d.hepg2": "test"}}
    with pytest.raises(DataError,
                       match=r"cell type 'hepg2' \(\[zeroshot\]\.\"d.hepg2\"\) does not occur in "
                             r"obs\['cell_type'\] of any file of dataset 'd'\. Available: A, B"):
        prepare(make_adata(), spec, COLS)


def test_tutorial_three_part_fewshot_key_gets_a_hint():
    spec = {**TRAIN, "fewshot": {"d.A.target_gene": {"test": ["P1"]}}}
    with pytest.raises(DataError, match=r"cell type 'A.target_gene' .*did you mean \"d.A\"\? "
                                        r"\(The perturbation column is set by pert_col"):
        prepare(make_adata(), spec, COLS)


def test_fewshot_perturbation_absent():
    spec = {**TRAIN, "fewshot": {"d.A": {"test": ["P1", "FOO", "BAR"]}}}
    with pytest.raises(DataError, match=r"\[fewshot\]\.\"d.A\"\.test lists 2 perturbation\(s\) "
                                        r"that no A cell carries in obs\['gene'\]: FOO, BAR"):
        prepare(make_adata(), spec, COLS)
    # the documented escape hatch turns it into a warning naming them
    with pytest.warns(UserWarning, match="FOO, BAR"):
        df = assign(make_adata(), spec, COLS, on_missing_perturbation="warn")
    assert df["test"].any()


def test_fewshot_listing_the_control_label():
    spec = {**TRAIN, "fewshot": {"d.A": {"val": ["ctrl"]}}}
    with pytest.raises(DataError, match=r"\[fewshot\]\.\"d.A\" lists the control label 'ctrl'"):
        assign(make_adata(), spec, COLS)


def test_obs_column_absent_suggests_close_match():
    cols = COLS.model_copy(update={"pert_col": "gen"})
    with pytest.raises(DataError, match=r"obs column 'gen' not found in <AnnData 'd'> "
                                        r"\(available: .*gene.*Did you mean: 'gene'.*pert_col"):
        prepare(make_adata(), TRAIN, cols)
    cols = COLS.model_copy(update={"cell_type_key": "celltype"})
    with pytest.raises(DataError, match=r"'celltype' not found.*Did you mean: 'cell_type'"):
        prepare(make_adata(), TRAIN, cols)


def test_control_label_absent_in_a_file(tmp_path):
    good = write(make_adata(), tmp_path / "data" / "a.h5ad")
    bad = make_adata(perts=("P1", "NT", "ctrl_like"))
    write(bad, tmp_path / "data" / "k562.h5ad")
    path = toml(tmp_path, '[datasets]\nd = "data"\n[training]\nd = "train"\n')
    with pytest.raises(DataError, match=r"control_pert 'ctrl' is not a value of obs\['gene'\] in "
                                        r"k562\.h5ad\. Values that look like controls: NT, "
                                        "ctrl_like"):
        prepare(None, path, COLS)
    assert good.exists()


def test_control_label_not_given_and_not_detectable():
    a = make_adata(perts=("P1", "NT", "vehicle"))
    cols = COLS.model_copy(update={"control_pert": None})
    with pytest.raises(ConfigError, match=r"control_pert was not given, and obs\['gene'\] has "
                       r"neither of the labels detected automatically \('non-targeting' and "
                       r"'DMSO_TF'\).*look like controls: NT, vehicle\. Pass control_pert="
                       r"<label>\.$"):
        prepare(a, TRAIN, cols)
    with pytest.raises(ConfigError, match=r"look like controls: control\. Pass control_pert="
                       r"<label> \(e\.g\. control_pert='control'\)\.$"):
        prepare(make_adata(perts=("P1", "control")), TRAIN, cols)
    # exactly one reference default present -> detected
    b = make_adata(perts=("P1", "non-targeting"))
    prep = prepare(b, TRAIN, cols)
    assert prep.columns.control_pert == "non-targeting"
    # both reference defaults present -> ambiguous, named in the error
    with pytest.raises(ConfigError, match=r"has both of the labels.*look like controls: "
                       r".*DMSO_TF.*non-targeting"):
        resolve_control([from_anndata(make_adata(perts=("P1", "non-targeting", "DMSO_TF")), "d",
                                      "gene", "cell_type", None)], None, "gene")
    # detected in one dataset, absent from another: named, not taken for a perturbation there
    files = [from_anndata(b, "x", "gene", "cell_type", None),
             from_anndata(make_adata(perts=("P1", "control")), "y", "gene", "cell_type", None)]
    with pytest.raises(DataError, match=r"'non-targeting' is not a value .* \(dataset 'y'\)\. "
                                        r"Values that look like controls: control\..*relabel"):
        resolve_control(files, None, "gene")


def test_tahoe_control_rule(capsys):
    """pert_col drugname_drugconc: the DMSO tuple string is the control when it is present."""
    tahoe = "[('DMSO_TF', 0.0, 'uM')]"
    a = make_adata(perts=("[('Drug', 1.0, 'uM')]", tahoe))
    a.obs = a.obs.rename(columns={"gene": "drugname_drugconc"})
    f = from_anndata(a, "d", "drugname_drugconc", "cell_type", None)
    assert resolve_control([f], None, "drugname_drugconc") == tahoe
    assert f"using control_pert={tahoe!r}" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="control_pert was not given"):  # only for that column
        resolve_control([from_anndata(make_adata(perts=("P1", tahoe)), "d", "gene", "cell_type",
                                      None)], None, "gene")


def test_cell_type_with_perturbed_cells_but_no_controls():
    a = make_adata()
    a = a[~((a.obs["cell_type"] == "B") & (a.obs["gene"] == "ctrl"))].copy()
    with pytest.raises(DataError, match=r"cell type 'B' of dataset 'd' .*split train\) has 6 "
                                        "perturbed cells and no control cells"):
        prepare(a, TRAIN, COLS)
    # held out to test: the error names that split
    with pytest.raises(DataError, match=r"cell type 'B' .*split test\)"):
        prepare(a, {**TRAIN, "zeroshot": {"d.B": "test"}}, COLS)


def test_empty_train_split():
    spec = {"zeroshot": {"d.A": "test", "d.B": "val"}}
    with pytest.raises(DataError, match="the training split is empty"):
        prepare(make_adata(), spec, COLS, heldout_controls_in_train=False)
    with pytest.raises(DataError, match="training split is empty.*yield_controls is false"):
        prepare(make_adata(), spec, COLS, yield_controls=False)
    # default: the held-out cell types' controls would train, but no perturbation could
    with pytest.raises(DataError, match="control cells only: every perturbed cell is held out"):
        prepare(make_adata(), spec, COLS)


@pytest.mark.parametrize("streamed", [False, True])
def test_control_only_train_split_is_refused_in_memory_and_streamed(tmp_path, streamed):
    write(make_adata(), tmp_path / "d.h5ad")
    spec = toml(tmp_path, '[datasets]\nd = "d.h5ad"\n[zeroshot]\n"d.A" = "test"\n'
                          '"d.B" = "val"\n')
    build = prepare_stream if streamed else prepare
    with pytest.raises(DataError, match="control cells only: .* no \\[training\\] section"):
        build(None, spec, COLS)


@pytest.mark.parametrize("streamed", [False, True])
def test_data_without_perturbed_cells_are_said_so_not_held_out(tmp_path, streamed):
    """Nothing was held out: the error said "every perturbed cell is held out (in [zeroshot]
    or [fewshot])". It says the data hold no perturbed cell and points at pert_col /
    control_pert."""
    a = make_adata(perts=("ctrl",))
    build = prepare_stream if streamed else prepare
    for spec in (TRAIN, None):
        with pytest.raises(DataError, match=r"^the data hold no perturbed cells: all 6 cells are "
                                            r"controls \(obs\['gene'\] == 'ctrl'\).*Check "
                                            r"pert_col .* and control_pert") as err:
            build(a, spec, COLS)
        assert "held out" not in str(err.value)
    with pytest.raises(DataError, match="no perturbed cells"):  # (also without controls to train)
        prepare(a, TRAIN, COLS, yield_controls=False)


@pytest.mark.parametrize("col", ["gene", "cell_type", "gem_group"])
def test_nan_labels(col):
    a = make_adata()
    values = a.obs[col].astype(object).to_numpy().copy()  # pandas >= 3: a read-only view
    values[[1, 4]] = np.nan
    a.obs[col] = pd.Categorical(values)
    with pytest.raises(DataError, match=rf"obs\['{col}'\] has 2 missing values in <AnnData 'd'>"
                                        r".*drop_missing_labels=True"):
        prepare(a, TRAIN, COLS)
    # drop_missing_labels: those cells are left out (said once), the rest trains unchanged
    kept = prepare(a, TRAIN, COLS, drop_missing_labels=True)
    ref = prepare(a[a.obs[col].notna().to_numpy()].copy(), TRAIN, COLS)
    np.testing.assert_array_equal(kept.splits["train"].X.numpy(), ref.splits["train"].X.numpy())
    assert kept.vocab.to_dict() == ref.vocab.to_dict()
    pd.testing.assert_frame_equal(kept.summary, ref.summary)


@pytest.mark.parametrize("col,kind", [("cell_type", "cell type"), ("gem_group", "batch")])
def test_nan_written_as_text_in_cell_type_or_batch_is_said(col, kind):
    """NaN / None through .astype(str) become 'nan' / 'None': a cell type (batch) of their own
    that mixes cells of every one; said as for an 'unassigned' perturbation, and what to do."""
    a = make_adata()
    values = a.obs[col].astype(object).to_numpy().copy()
    values[[1, 6]], values[[7]] = np.nan, None  # ('nan' has a control: it is a context)
    a.obs[col] = pd.Series(values, index=a.obs_names).astype(str)
    with pytest.warns(UserWarning, match=(
            rf"obs\['{col}'\] label\(s\) 'nan' \(2 cells\), 'None' \(1 cells\) look like "
            rf"missing values written as text .*one {kind} of their own.*"
            rf"replace\(\{{'nan': None, 'None': None\}}\)\) and pass drop_missing_labels=True")):
        prep = prepare(a, TRAIN, COLS)
    assert "nan" in (prep.vocab.cell_types if col == "cell_type" else prep.vocab.batches)
    # the advice works: missing again, then dropped
    a.obs[col] = a.obs[col].astype(object).replace({"nan": None, "None": None})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prepare(a, TRAIN, COLS, drop_missing_labels=True).splits["train"].n_obs == 15


def test_nan_labels_dropped_from_a_file(tmp_path, capsys):
    a = make_adata()
    values = a.obs["gene"].astype(object).to_numpy().copy()
    values[[0, 5, 7]] = np.nan
    a.obs["gene"] = pd.Categorical(values)
    write(a, tmp_path / "d" / "x.h5ad")
    path = toml(tmp_path, '[datasets]\nd = "d"\n[training]\nd = "train"\n')
    prep = prepare(None, path, COLS, drop_missing_labels=True)
    assert "3 cells with a missing label are left out (obs['gene']: 3)" in capsys.readouterr().out
    assert prep.splits["train"].n_obs == a.n_obs - 3
    assert prep.summary["n_perturbed_cells"].sum() + prep.summary["n_controls"].sum() == a.n_obs - 3


def test_obsm_key_absent():
    a = make_adata()
    a.obsm["X_pca"] = np.zeros((a.n_obs, 2), dtype=np.float32)
    cols = COLS.model_copy(update={"embed_key": "X_state"})
    with pytest.raises(DataError, match=r"obsm\['X_state'\] not found in <AnnData 'd'> "
                                        r"\(available: X_pca\)"):
        prepare(a, TRAIN, cols)


def test_files_disagree_on_width(tmp_path):
    write(make_adata(genes=5), tmp_path / "d" / "k562.h5ad")
    write(make_adata(genes=4), tmp_path / "d" / "rpe1.h5ad")
    path = toml(tmp_path, '[datasets]\nd = "d"\n[training]\nd = "train"\n')
    with pytest.raises(DataError, match=r"k562\.h5ad \(dataset 'd'\) has 5, rpe1\.h5ad "
                                        r"\(dataset 'd'\) has 4, 4 of them shared\. Every file"):
        prepare(None, path, COLS)


def test_files_disagree_on_gene_names():
    data = {"a": make_adata(), "b": make_adata(var_prefix="h")}
    spec = {"training": {"a": "train", "b": "train"}}
    with pytest.raises(DataError, match=r"genes in X: <AnnData 'a'> \(dataset 'a'\) has 5, "
                                        r"<AnnData 'b'> \(dataset 'b'\) has 5, 0 of them shared"):
        prepare(data, spec, COLS)
    extra = make_adata(genes=6)
    extra.var_names = [*extra.var_names[:5], "g0"]  # a repeated name, one gene more
    with pytest.raises(DataError, match=r"has 5, <AnnData 'b'> \(dataset 'b'\) has 6"):
        prepare({"a": make_adata(), "b": extra}, spec, COLS)
    b = make_adata()
    data = {"a": make_adata(), "b": b[:, b.var_names[::-1]].copy()}
    with pytest.raises(DataError, match=r"order of the input genes in X: .* has 'g0' at column "
                                        r"0, .* has 'g4' \(same genes, other order\)"):
        prepare(data, spec, COLS)


def test_one_file_in_two_datasets_and_mixed_scales_are_refused(tmp_path):
    """A file matched by two datasets' patterns would have its cells assigned twice (held-out
    cells training); datasets on different scales (counts next to log1p) would be one input."""
    write(make_adata(), tmp_path / "d" / "a.h5ad")
    write(make_adata(), tmp_path / "d" / "b.h5ad")
    spec = ('[datasets]\nx = "d/a.h5ad"\ny = "d/*.h5ad"\n[training]\nx = "train"\n'
            'y = "train"\n[zeroshot]\n"y.A" = "test"\n')
    with pytest.raises(SplitConfigError, match=r"a\.h5ad belongs to two datasets, 'x' and 'y'"):
        prepare(None, toml(tmp_path, spec), COLS)
    logged = make_adata()
    counts = make_adata()
    counts.X = np.round(np.asarray(counts.X) * 40 + 20).astype(np.float32)
    with pytest.raises(DataError, match=r"different scales: .*'a'\): log1p values; .*'b'\): "
                                        r"not log1p \(raw counts"):
        prepare({"a": logged, "b": counts}, {"training": {"a": "train", "b": "train"}}, COLS)


def test_heldout_cell_type_spelled_otherwise_in_another_file_is_warned(tmp_path):
    """A file annotated with another spelling of a held-out cell type ('a', ' A', 'A-') would
    have its cells train silently: said, naming both labels, their files, cells and splits."""
    write(make_adata(), tmp_path / "d" / "d1.h5ad")
    write(make_adata(cell_types=("a", "B")), tmp_path / "d" / "d2.h5ad")
    spec = '[datasets]\nd = "d"\n[training]\nd = "train"\n[zeroshot]\n"d.A" = "val"\n'
    with pytest.warns(UserWarning, match=(
            r"held-out cell type\(s\) in other ways .*'A' \(\[zeroshot\]\.\"d\.A\" in "
            r".*split\.toml; 9 cells in d1\.h5ad, split val\) vs 'a' \(9 cells in d2\.h5ad, "
            r"split train\)\..*replace\(\{'a': 'A'\}\)")):
        prep = prepare(None, toml(tmp_path, spec), COLS)
    trained = prep.summary.query("split == 'train' and n_perturbed_cells > 0")
    assert set(trained["cell_type"]) == {"a", "B"}  # (said, not changed)
    with warnings.catch_warnings():  # distinct labels are not said
        warnings.simplefilter("error")
        assign(make_adata(cell_types=("A", "AB", "A B C")), {**TRAIN, "zeroshot": {"d.A": "test"}},
               COLS)


def test_same_named_files_in_two_folders_are_told_apart(tmp_path):
    write(make_adata(), tmp_path / "k562" / "data.h5ad")
    write(make_adata(), tmp_path / "rpe1" / "data.h5ad")
    spec = '[datasets]\nd = "*/data.h5ad"\n[training]\nd = "train"\n'
    files = set(prepare(None, toml(tmp_path, spec), COLS).summary["file"])
    assert files == {str(tmp_path / "k562" / "data.h5ad"), str(tmp_path / "rpe1" / "data.h5ad")}


def test_csc_matrix_in_memory_is_read_on_disk_rejected(tmp_path):
    a = make_adata()
    dense = np.asarray(a.X).copy()
    a.X = sp.csc_matrix(a.X)  # in memory: converted for row reads, same values
    prep = prepare(a, TRAIN, COLS)
    np.testing.assert_allclose(prep.splits["train"].X.numpy(), dense)
    write(a, tmp_path / "d" / "x.h5ad")  # on disk: row reads of CSC would read every column
    path = toml(tmp_path, '[datasets]\nd = "d"\n[training]\nd = "train"\n')
    with pytest.raises(DataError, match=r"'X' in .*x\.h5ad is stored as 'csc_matrix'"):
        prepare(None, path, COLS)
    a.X = sp.csr_matrix(a.X)  # a CSR group without anndata's encoding attributes (old files)
    write(a, tmp_path / "d" / "x.h5ad")
    with h5py.File(tmp_path / "d" / "x.h5ad", "r+") as f:
        del f["X"].attrs["encoding-type"]
    with pytest.raises(DataError, match=r"'X' in .*x\.h5ad is a group without anndata's "
                                        r"encoding-type attribute .*write_h5ad"):
        prepare(None, path, COLS)


@pytest.mark.parametrize("streamed", [False, True])
def test_csc_matrix_in_memory_is_converted_once_and_said(monkeypatch, capsys, streamed):
    """Every row read (the scale check, each split, each streamed block) converted the whole
    CSC matrix to CSR again, unsaid: now one copy per prepare, said with its size and the fix."""
    a = make_adata(n=40)
    dense = np.asarray(a.X).copy()
    a.X = sp.csc_matrix(a.X)
    calls = []
    tocsr = sp.csc_matrix.tocsr
    monkeypatch.setattr(sp.csc_matrix, "tocsr", lambda m, *k, **kw: calls.append(1) or
                        tocsr(m, *k, **kw))
    spec = {**TRAIN, "fewshot": {"d.A": {"val": ["P1"], "test": ["P2"]}}}
    if streamed:
        prep = prepare_stream(a, spec, COLS, chunk_size=8)
        train = prep.splits["train"]
        got = np.concatenate([train.read_rows(BlockReader(prep.files, None), rows,
                                              np.empty((len(rows), dense.shape[1]), np.float32))
                              for rows in np.array_split(np.arange(train.n_obs), 5)])
        np.testing.assert_array_equal(got, dense[train.file_row])
    else:
        prep = prepare(a, spec, COLS)
    assert set(prep.splits) == {"train", "val", "test"}
    for split in ("val", "test") + (() if streamed else ("train",)):
        d = prep.splits[split]
        np.testing.assert_array_equal(d.X.numpy(), dense[d.file_row])
    assert len(calls) == 1
    out = capsys.readouterr().out
    assert out.count("is a CSC matrix") == 1
    assert re.search(r"X of <AnnData 'd'> is a CSC matrix.* CSR copy of it, made once "
                     r"\(\d[\d.,]* MiB more memory\).*adata\.X = adata\.X\.tocsr\(\)", out), out
    # kept for the streamed reads; freed once the in-memory splits are built
    assert bool(prep.files[0].row_copies) == streamed


def test_csc_counts_are_converted_once_with_the_counts_check(monkeypatch, capsys):
    """Whether the input holds raw counts (what predict checks its input against) is decided
    inside prepare, on its one CSR copy, which is then freed: not by a second conversion after."""
    a = make_adata(n=40)
    a.X = sp.csc_matrix(np.round(np.expm1(np.asarray(a.X))).astype(np.float32))
    calls = []
    tocsr = sp.csc_matrix.tocsr
    monkeypatch.setattr(sp.csc_matrix, "tocsr", lambda m, *k, **kw: calls.append(1) or
                        tocsr(m, *k, **kw))
    prep = prepare(a, TRAIN, COLS)
    assert prep.is_counts is True and not prep.is_log1p
    assert len(calls) == 1 and not prep.files[0].row_copies
    assert capsys.readouterr().out.count("is a CSC matrix") == 1


def test_backed_anndata_reads_x_from_its_file(tmp_path):
    a = make_adata()
    a.X = sp.csr_matrix(a.X)
    write(a, tmp_path / "x.h5ad")
    backed = ad.read_h5ad(tmp_path / "x.h5ad", backed="r")
    try:
        prep = prepare(backed, TRAIN, COLS)
    finally:
        backed.file.close()
    np.testing.assert_allclose(prep.splits["train"].X.numpy(),
                               prepare(a, TRAIN, COLS).splits["train"].X.numpy())


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_backed_view_reads_its_own_rows(tmp_path):
    """A view of a backed AnnData (a subset of a large file) reads the view's cells, in memory
    and streamed, whatever its cell names."""
    from statetx.stream import prepare_stream

    a = make_adata(n=5)
    a.X = sp.csr_matrix(a.X)
    write(a, tmp_path / "x.h5ad")
    keep = (a.obs["cell_type"] == "B").to_numpy()
    backed = ad.read_h5ad(tmp_path / "x.h5ad", backed="r")
    try:
        view = backed[keep]
        got = prepare(view, TRAIN, COLS).splits["train"]
        streamed = prepare_stream(view, TRAIN, COLS, chunk_size=4).splits["train"]
        rows = streamed.file_row[np.argsort(streamed.file_row)]
        block = np.concatenate([streamed.readers()[0].read(0, int(r), int(r) + 1) for r in rows])
    finally:
        backed.file.close()
    want = prepare(a[keep].copy(), TRAIN, COLS).splits["train"]
    np.testing.assert_array_equal(got.barcodes, want.barcodes)
    np.testing.assert_allclose(got.X.numpy(), want.X.numpy())
    np.testing.assert_allclose(block, a[keep].X.toarray()[rows])
    # rows are positions in the file: duplicate or renamed cell names do not matter
    dup = make_adata(n=5)
    dup.obs_names = ["same"] * dup.n_obs
    write(dup, tmp_path / "dup.h5ad")
    backed = ad.read_h5ad(tmp_path / "dup.h5ad", backed="r")
    try:
        backed.obs_names = [f"c{i}" for i in range(backed.n_obs)][::-1]
        got = prepare(backed[keep], TRAIN, COLS).splits["train"]
    finally:
        backed.file.close()
    np.testing.assert_allclose(got.X.numpy(), want.X.numpy())


def test_backed_view_reads_its_own_genes_in_its_order(tmp_path):
    """A backed view that keeps some genes, reordered, trains on those genes' values (in memory
    and streamed), not on the file's first columns under the view's gene names."""
    from statetx.stream import prepare_stream

    a = make_adata(n=5)
    a.X = sp.csr_matrix(a.X)
    write(a, tmp_path / "x.h5ad")
    genes = np.random.default_rng(0).permutation(a.n_vars)[: a.n_vars - 2]
    want = prepare(a[:, genes].copy(), TRAIN, COLS)
    backed = ad.read_h5ad(tmp_path / "x.h5ad", backed="r")
    try:
        for view in (backed[:, genes], backed[a.obs_names[::-1], a.var_names[genes]]):
            got = prepare(view, TRAIN, COLS)
            assert list(got.feature_names) == list(want.feature_names)
            order = np.argsort(got.splits["train"].barcodes)
            ref = np.argsort(want.splits["train"].barcodes)
            np.testing.assert_allclose(got.splits["train"].X.numpy()[order],
                                       want.splits["train"].X.numpy()[ref])
        streamed = prepare_stream(backed[:, genes], TRAIN, COLS, chunk_size=4).splits["train"]
        block = streamed.readers()[0].read(0, 0, 3)
    finally:
        backed.file.close()
    np.testing.assert_allclose(block, a.X.toarray()[:3][:, genes])


def test_pert_feature_lengths_differ():
    feats = {"P1": np.ones(3), "P2": np.ones(4), "ctrl": np.zeros(3)}
    with pytest.raises(DataError, match=r"different lengths: 'P1' has 3, 'P2' has 4"):
        prepare(make_adata(), TRAIN, COLS, pert_features=feats)


def test_pert_feature_table_empty():
    with pytest.raises(DataError, match="perturbation feature table is empty"):
        prepare(make_adata(), TRAIN, COLS, pert_features={})


def test_pert_feature_non_finite_and_missing_file(tmp_path):
    feats = {"P1": np.ones(3), "P2": np.array([1.0, np.nan, 0.0])}
    with pytest.raises(DataError, match=r"NaN/Inf for: P2"):
        prepare(make_adata(), TRAIN, COLS, pert_features=feats)
    with pytest.raises(DataError, match=r"feature file .*esm2\.pt does not exist"):
        load_pert_features(tmp_path / "esm2.pt")
    with pytest.raises(DataError, match=r"1 perturbation\(s\) have no feature vector: P2\. Add"):
        prepare(make_adata(), TRAIN, COLS, pert_features={"P1": np.ones(3)},
                on_missing_features="error")  # (P1 is another gene: no "did you mean")
    with pytest.raises(DataError, match=r"no feature vector: P2\. Did you mean: 'p_2' for 'P2'"):
        prepare(make_adata(), TRAIN, COLS, pert_features={"P1": np.ones(3), "p_2": np.ones(3)},
                on_missing_features="error")


def test_feature_tables_with_or_without_a_header(tmp_path):
    from statetx.vocab import save_pert_features

    (tmp_path / "plain.csv").write_text("MAPK1,0.1,0.2\nPLK4,0.3,0.4\n")  # no header row
    assert list(load_pert_features(tmp_path / "plain.csv")) == ["MAPK1", "PLK4"]
    (tmp_path / "onehot.csv").write_text("A,1.0,0.0,0.0\nB,0.0,1.0,0.0\nC,0.0,0.0,1.0\n")
    hot = load_pert_features(tmp_path / "onehot.csv")  # (repeated values in the first row)
    assert list(hot) == ["A", "B", "C"]
    np.testing.assert_array_equal(hot["A"], [1, 0, 0])
    (tmp_path / "named.tsv").write_text("gene\tesm_0\tesm_1\nMAPK1\t0.1\t0.2\n")
    np.testing.assert_allclose(load_pert_features(tmp_path / "named.tsv")["MAPK1"], [0.1, 0.2])
    save_pert_features({"A": np.array([1.0, 2.0]), "B": np.array([3.0, 4.0])},
                       tmp_path / "ours.csv")  # header ",0,1": read as a header
    assert list(load_pert_features(tmp_path / "ours.csv")) == ["A", "B"]
    (tmp_path / "text.csv").write_text("gene,model,v\nMAPK1,esm,0.2\n")
    with pytest.raises(DataError, match="text.csv: column 'model' is not numeric"):
        load_pert_features(tmp_path / "text.csv")


def test_counts_for_output_space_all():
    a = make_adata()
    a.X = np.round(a.X * 10)
    a.obsm["X_hvg"] = a.X.copy()
    cols = COLS.model_copy(update={"embed_key": "X_hvg", "output_space": "all"})
    with pytest.raises(DataError, match=r"output_space='all' expects log1p.*<AnnData 'd'>"):
        prepare(a, TRAIN, cols)


# ---------------------------------------------------------------------------------------------
# invalid options (ConfigError)


def test_invalid_option_values():
    with pytest.raises(ConfigError, match=r"output_space='genes' is invalid"):
        ColumnMap.build(output_space="genes")
    prep = prepare(make_adata(), TRAIN, COLS)
    with pytest.raises(ConfigError, match=r"basal_mapping_strategy='batches' is invalid"):
        CellSetSampler(prep.splits["train"], prep.vocab, 4, 2, pairing="batches")
    with pytest.raises(ConfigError, match=r"on_missing_features='skip'"):
        prepare(make_adata(), TRAIN, COLS, pert_features={"P1": np.ones(2)},
                on_missing_features="skip")
    with pytest.raises(ConfigError, match=r"output_space='embedding' requires embed_key"):
        prepare(make_adata(), TRAIN, COLS.model_copy(update={"output_space": "embedding"}))


@pytest.mark.filterwarnings("ignore:Observation names are not unique")  # (anndata)
def test_duplicate_cell_names_are_warned_about_at_fit(tmp_path):
    """Names repeated within one input: said with the dataset, the count and the fix (the file
    is to be written again); names shared across files are common and not said."""
    a = make_adata()
    a.obs_names = ["c0", "c0", "c0", "c1", "c1", *a.obs_names[5:]]
    with pytest.warns(UserWarning, match=r"^<AnnData 'd'> has 2 duplicate cell name\(s\) "
                      r"\(obs_names\), on 5 cells: c0, c1\. .*pert_cell_barcode.*"
                      r"\(adata\.obs_names_make_unique\(\)\)\.$"):
        prepare(a, TRAIN, COLS)
    write(a, tmp_path / "d" / "x.h5ad")
    spec = toml(tmp_path, '[datasets]\nd = "d"\n[training]\nd = "train"\n')
    with pytest.warns(UserWarning, match=r"^x\.h5ad \(dataset 'd'\) has 2 duplicate cell "
                      r"name\(s\).*obs_names_make_unique\(\), then write the file again\)"):
        prepare(None, spec, COLS)
    write(make_adata(), tmp_path / "d" / "x.h5ad")  # the same names in two files: not said
    write(make_adata(perts=("P2", "P1", "ctrl")), tmp_path / "d" / "y.h5ad")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*duplicate cell name")
        prepare(None, spec, COLS)


def test_unassigned_like_perturbation_labels_are_said_at_fit():
    """Papalexi's guide screen keeps 4,537 'unassigned' cells: training them as a perturbation
    is said, with the count."""
    from conftest import SHARED, need

    path = need(SHARED / "data" / "papalexi2021_thp1_lowmoi_sceptredata.h5ad")
    a = ad.read_h5ad(path)
    a = a[:, :20].copy()
    cols = ColumnMap(pert_col="target_gene", cell_type_key="cell_type",
                     control_pert="non-targeting", output_space="gene")
    with pytest.warns(UserWarning, match=r"'unassigned' \(4,537 cells\) look like cells"):
        prepare(a, None, cols, allow_counts=True)


def test_feature_tables_of_the_wrong_kind_or_names_are_said():
    from statetx.vocab import feature_table

    with pytest.raises(DataError, match="must map perturbation names to vectors.*not a ndarray"):
        feature_table(np.zeros((3, 4)), ["A"], "ctrl")
    with pytest.raises(DataError, match=r"must be 1-D; A have shape \(2, 2\)"):
        feature_table({"A": np.zeros((2, 2))}, ["A"], "ctrl")
    with pytest.warns(UserWarning, match=r"no feature vector: A\+B\. Did you mean: 'A_B'.*"
                                         r"cannot tell them apart"):
        feature_table({"A_B": np.ones(3), "C": np.ones(3)}, ["A+B", "C"], "ctrl")


def test_damaged_compressed_chunk_names_the_file(tmp_path):
    """A gzip chunk of X damaged on disk: a DataError naming the file and rows, in memory and
    streaming (it was h5py's bare OSError)."""
    import h5py

    a = make_adata(n=40, genes=50)
    path = tmp_path / "data" / "d.h5ad"
    path.parent.mkdir()
    a.write_h5ad(path, compression="gzip")
    with h5py.File(path, "r") as f:
        info = f["X"].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(b"\xff" * 64)
    spec = toml(tmp_path, '[datasets]\nd = "data/d.h5ad"\n[training]\nd = "train"\n')
    for load in (lambda: prepare(None, spec, COLS),
                 lambda: prepare_stream(None, spec, COLS, chunk_size=8)):
        with pytest.raises(DataError, match=r"could not read rows 0-\d+ of 'X' in .*d\.h5ad.*"
                                            "looks damaged"):
            load()


def test_a_copy_of_a_file_is_said(tmp_path):
    """Two files holding the same cells (a copy in the dataset's folder) count them twice: said.
    Files that merely share their obs names (default or 10x barcodes) are not."""
    a = make_adata()
    write(a, tmp_path / "data" / "d.h5ad")
    write(a, tmp_path / "data" / "d_copy.h5ad")
    spec = toml(tmp_path, '[datasets]\nd = "data"\n[training]\nd = "train"\n')
    with pytest.warns(UserWarning, match=r"d_copy\.h5ad holds the same cells as d\.h5ad"):
        prepare(None, spec, COLS)
    other = make_adata(cell_types=("C", "D"))  # the same default obs names, other cells
    write(other, tmp_path / "data" / "d_copy.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        prepare(None, spec, COLS)


def test_a_data_frame_in_a_files_obsm_is_named(tmp_path):
    a = make_adata()
    a.obsm["X_df"] = pd.DataFrame(np.asarray(a.X)[:, :3], index=a.obs_names,
                                  columns=["c0", "c1", "c2"])
    a.write_h5ad(tmp_path / "d.h5ad")
    spec = {"datasets": {"d": str(tmp_path / "d.h5ad")}, "training": {"d": "train"}}
    with pytest.raises(DataError, match=r"obsm\['X_df'\] of .*d.h5ad is stored as a dataframe"):
        prepare(None, spec, ColumnMap.build(**{**COLS.model_dump(), "embed_key": "X_df",
                                               "output_space": "embedding"}))
