"""Bad inputs through the public surface (tracker issue 9, item 1): ``predict``, ``fit``,
``save``/``load``/``load_run``, the CLI commands (in-process and as ``python -m statetx``), the
``statetx.pp`` functions and ``statetx.metrics.evaluate``.

Every case asserts a clear message that names the offending column, value or file, and that no
partial output is left behind: no output file and no temporary file in the output folder, no
half-written saved model, no run directory from a ``tx train`` whose validation failed.
(The split-file / ``prepare`` checks themselves are in ``test_data_errors.py``.)
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import make_synthetic
from sklearn.exceptions import NotFittedError
from test_model import SMALL, SPEC, TINY_CLI

from statetx import StateTransitionModel
from statetx.cli import main
from statetx.errors import ConfigError, DataError
from statetx.train import TrainingError

TINY = [*TINY_CLI, "training.max_steps=2"]


def small_model(**kw) -> StateTransitionModel:
    opts = dict(pert_col="gene", cell_type_key="cell_type", control_pert="ctrl",
                model_kwargs=SMALL, cell_set_len=8, batch_size=4, max_steps=2, val_freq=2,
                ckpt_every_n_steps=2, progress=False, seed=0, device="cpu")
    opts.update(kw)
    return StateTransitionModel("tiny", **opts)


def leftovers(folder: Path) -> list[str]:
    """Everything in ``folder`` (an output folder that must stay empty after a failure)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("statetx: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A fitted tiny model, its training data, and its run directory (checkpoints)."""
    d = tmp_path_factory.mktemp("bad_inputs")
    adata = make_synthetic()
    model = small_model().fit(adata, output_dir=d / "run")
    adata.write_h5ad(d / "data.h5ad")
    return model, adata, d / "run", d


@pytest.fixture
def model(base):
    return base[0]


@pytest.fixture
def adata(base):
    return base[1].copy()


@pytest.fixture
def run(base):
    return base[2]


@pytest.fixture
def truncated_ckpt(run, tmp_path):
    """A copy of the run's final checkpoint cut in half (a crash or a copy that stopped)."""
    data = (run / "checkpoints" / "final.ckpt").read_bytes()
    path = run / "checkpoints" / "truncated.ckpt"
    path.write_bytes(data[: len(data) // 2])
    yield path
    path.unlink(missing_ok=True)


# =============================================================================================
# predict (Python API)


@pytest.mark.parametrize("edit,opts,match", [
    (lambda a: a.obs.rename(columns={"gene": "perturbation"}, inplace=True), {},
     r"obs column 'gene' not found in the input.*Set pert_col"),
    (lambda a: None, {"pert_col": "target_gene"},
     r"obs column 'target_gene' not found in the input \(available: gene, cell_type, batch\)"),
    # pooling every context's controls silently would pair cells across cell types
    (lambda a: None, {"cell_type_col": "celltype"},
     r"no obs column 'celltype'.*Did you mean: 'cell_type'.*Pass cell_type_key"),
    (lambda a: a.obs.rename(columns={"cell_type": "ct"}, inplace=True), {},
     r"no obs column 'cell_type'.*pass basal_pool='all'"),
], ids=["pert-column-renamed", "pert-col-option-wrong", "cell-type-col-option-wrong",
        "cell-type-column-absent"])
def test_predict_obs_columns(model, adata, edit, opts, match):
    edit(adata)
    with pytest.raises(DataError, match=match):
        model.predict(adata, **opts)


def test_predict_missing_column_gets_no_advice_meant_for_several_training_files(model, adata):
    """The message is shared with training, where 'rename the column in the odd one out' (of
    several files) applies; predict reads one input."""
    with pytest.raises(DataError) as err:
        model.predict(adata, pert_col="target_gene")
    assert str(err.value).endswith("Set pert_col=<column>."), err.value
    with pytest.raises(DataError, match=r"obs column 'target_gene' not found.*Set "
                                        r"pert_col=<column> \(one name for every dataset: .*"
                                        r"odd one out\)"):
        small_model(pert_col="target_gene").fit(adata)


def test_predict_without_cell_type_column_pools_every_control_when_asked(model, adata,
                                                                         capsys):
    ct = adata.obs["cell_type"].astype(str)
    one = model.predict(adata, cell_type_col=False, seed=1)  # the column is there: not read
    assert "cell_type_col=False: all cells form one context" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="cannot go with basal_pool='cell_type'"):
        model.predict(adata, cell_type_col=False, basal_pool="cell_type")
    del adata.obs["cell_type"]
    out = model.predict(adata, basal_pool="all", seed=1)
    assert "all cells form one context (basal_pool='all'" in capsys.readouterr().out
    np.testing.assert_array_equal(out.X, one.X)  # the same single context
    basal = out.obs["statetx_ctrl_barcode"].astype(str)
    assert set(basal) <= set(adata.obs_names[adata.obs["gene"] == "ctrl"])
    assert (ct[basal].to_numpy() != ct[out.obs_names].to_numpy()).any()  # across cell types


def test_predict_control_label_absent_everywhere(model, adata):
    adata.obs["gene"] = adata.obs["gene"].astype(str).replace({"ctrl": "non-targeting"})
    with pytest.raises(DataError, match=r"no control cells \(obs\['gene'\] == 'ctrl'\).*"
                                        "Values that look like controls: non-targeting"):
        model.predict(adata)
    # the input's own label as an option works
    out = model.predict(adata, control_pert="non-targeting", predict_controls=False)
    assert out.n_obs == adata.n_obs  # the controls are copied, not predicted


def test_predict_control_label_absent_in_one_cell_type(model, adata):
    keep = ~((adata.obs["cell_type"] == "CT1") & (adata.obs["gene"] == "ctrl")).to_numpy()
    adata = adata[keep].copy()
    with pytest.raises(DataError, match=r"context 'CT1' has no control cells.*"
                                        "basal_fallback='all_controls'"):
        model.predict(adata)
    out = model.predict(adata, basal_fallback="all_controls")
    assert np.isfinite(out.X).all()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_predict_non_finite_expression(model, adata, value):
    adata.X[7, 3] = value
    name = adata.obs_names[7]
    with pytest.raises(DataError, match=rf"1 input cell has NaN or Inf values .*e\.g\. {name}"):
        model.predict(adata)


def test_predict_scaled_input_is_refused(model, adata):
    """Scaled (centred) data on a log1p model is an error that says so, whatever its range;
    a model trained on another scale only warns."""
    import scanpy as sc

    scaled = adata.copy()
    sc.pp.scale(scaled, max_value=10)
    with pytest.raises(DataError, match=r"input \(X\) has negative values .*scanpy.pp.scale"):
        model.predict(scaled)
    one = adata.copy()
    one.X[2, 1] = -1.5
    with pytest.raises(DataError, match="down to -1.5"):
        model.predict(one)
    counts_model = pickle.loads(pickle.dumps(model))
    counts_model.is_log1p_ = False
    with pytest.warns(UserWarning, match="negative expression values"):
        counts_model.predict(one)


def test_predict_scale_mismatch_both_ways(model, adata):
    counts = adata.copy()
    counts.X = np.round(np.expm1(counts.X) * 20).astype(np.float32)
    with pytest.raises(DataError, match=r"looks like raw counts .*trained on log1p.*with T the "
                                        r"total the training data were normalised to\. The "
                                        r"model records no T"):  # (not recorded here)
        model.predict(counts)
    low = counts.copy()  # shallow data or a small panel: counts that never exceed 15
    low.X = np.minimum(low.X, 10)
    with pytest.raises(DataError, match=r"looks like raw counts \(integers, max 10\)"):
        model.predict(low)
    normalised = pickle.loads(pickle.dumps(model))
    normalised.target_sum_ = 188.0  # the total preprocess_train normalised the training data to
    with pytest.raises(DataError, match=r"preprocess_train\(adata, target_sum=188\), tx "
                                        r"preprocess_train --target-sum 188"):
        normalised.predict(counts)
    counts_model = pickle.loads(pickle.dumps(model))
    counts_model.is_log1p_ = False  # what a model trained on raw counts records
    with pytest.raises(DataError, match="looks log1p-normalised but the model was trained on raw"):
        counts_model.predict(adata)


def test_scale_is_judged_by_one_rule_everywhere(model, adata):
    """Counts carrying float noise (fractional parts up to 1e-3, e.g. written through float16 or
    a correction step) are counts for fit, pp, predict and evaluate alike (cell-eval's rule),
    and a maximum of exactly 15 is off log1p scale for predict as for evaluate."""
    from statetx._utils import looks_log1p
    from statetx.metrics._inputs import check_scale, has_fraction
    from statetx.pp import _count_problem

    rng = np.random.default_rng(0)
    counts = np.minimum(np.round(np.expm1(adata.X) * 3), 10).astype(np.float32)
    assert 0 < counts.max() < 15  # small counts: the range alone does not tell them from log1p
    noisy = adata.copy()
    noisy.X = counts + rng.uniform(-4e-4, 4e-4, counts.shape).astype(np.float32) * (counts > 0)
    assert not looks_log1p(noisy.X) and not has_fraction(noisy)
    assert _count_problem(noisy.X) is None
    with pytest.raises(DataError, match=r"looks like raw counts"):
        model.predict(noisy)
    high = adata.copy()
    high.X = adata.X.copy()
    high.X[0, 0] = 15.0
    with pytest.raises(DataError, match="far above log1p scale"):
        model.predict(high)
    with pytest.raises(DataError, match=r"maximum of 15 \(>= 15\)"):
        check_scale(high, "pred")


def test_predict_duplicate_gene_names(model, adata):
    """A name used twice is ambiguous only for the model's genes; extra genes may repeat."""
    want = model.predict(adata, seed=2)
    extra = ad.AnnData(np.hstack([adata.X, adata.X[:, :2]]), obs=adata.obs,
                       var=pd.DataFrame(index=[*adata.var_names, "EXTRA", "EXTRA"]))
    np.testing.assert_array_equal(model.predict(extra, seed=2).X, want.X)
    adata.var_names = ["G0"] + list(adata.var_names[1:-1]) + ["G0"]
    with pytest.raises(DataError, match=r"several genes alike in X.*model's gene\(s\) G0.*"
                                        r"var_names_make_unique"):
        model.predict(adata)


def test_loading_a_run_folder_as_a_saved_model_points_to_load_run(base):
    with pytest.raises(DataError, match=r"model\.safetensors not found.*training run's folder: "
                                        r"load it with StateTransitionModel\.load_run"):
        StateTransitionModel.load(base[2])


def test_no_x_and_a_layer_named_as_embedding_are_explained(model, adata):
    """AnnData with its matrix in a layer only: fit and predict say so (not a TypeError), and
    embed_key naming a layer says how to use it."""
    bare = ad.AnnData(obs=adata.obs.copy(), var=adata.var.copy(),
                      layers={"counts": np.asarray(adata.X)})
    with pytest.raises(DataError, match=r"has no X \(adata.X is None\).*layers\['counts'\]"):
        small_model().fit(bare)
    with pytest.raises(DataError, match=r"has no X \(adata.X is None\)"):
        model.predict(bare)
    with pytest.raises(DataError, match=r"obsm\['counts'\] not found.*'counts' is a layer"):
        small_model(embed_key="counts").fit(bare)


def test_predict_duplicate_cell_names(model, adata):
    adata.obs_names = ["cell0", "cell0"] + list(adata.obs_names[2:])
    with pytest.raises(DataError, match=r"duplicate cell names \(obs_names\): cell0.*"
                                        r"obs_names_make_unique"):
        model.predict(adata)


def test_predict_genes_do_not_match_training(base, adata, tmp_path):
    loaded = StateTransitionModel.load(base[0].save(tmp_path / "m"))
    adata.var_names = [f"g{i}" if i % 2 else n for i, n in enumerate(adata.var_names)]
    with pytest.raises(DataError, match=r"16 of the model's 32 genes are missing from the "
                                        r"input's X: G1, G3, G5.*missing_genes='zero'"):
        loaded.predict(adata)
    with pytest.raises(DataError, match=r"none of the model's 32 genes is in the input's X"):
        loaded.predict(adata[:, :0].copy())  # zero genes
    other = adata.copy()  # another panel: no gene in common, not even with missing_genes='zero'
    other.var_names = [f"other{i}" for i in range(other.n_vars)]
    with pytest.raises(DataError, match=r"none of the model's 32 genes is in the input's X.*"
                                        r"other0.*symbols vs Ensembl"):
        loaded.predict(other, missing_genes="zero")
    # Ensembl IDs as var_names, the model's symbols in a var column: named, and read with it
    ens = base[1].copy()
    ens.var["symbol"] = ens.var_names.astype(str)
    ens.var_names = [f"ENSG{i:05d}" for i in range(ens.n_vars)]
    with pytest.raises(DataError, match=r"var\['symbol'\] holds them: pass "
                                        r"gene_name_col='symbol' \(--gene-name-col symbol\)"):
        loaded.predict(ens)
    by_symbol = loaded.predict(ens, gene_name_col="symbol", seed=0)
    np.testing.assert_array_equal(by_symbol.X, loaded.predict(base[1], seed=0).X)
    assert loaded.score(ens, gene_name_col="symbol") == loaded.score(base[1])


def test_predict_zero_cells_and_unfitted(model, adata):
    with pytest.raises(DataError, match=r"no cells \(n_obs = 0\)"):
        model.predict(adata[:0].copy())
    with pytest.raises(NotFittedError, match="not fitted yet"):
        small_model().predict(adata)


def test_predict_missing_label_in_cell_type_column(model, adata):
    values = adata.obs["cell_type"].astype(object).to_numpy().copy()  # pandas >= 3: read-only
    values[40] = np.nan
    adata.obs["cell_type"] = pd.Categorical(values)
    with pytest.raises(DataError, match=r"obs\['cell_type'\] has 1 missing values"):
        model.predict(adata)


def test_predict_csc_matrix_is_accepted(model, adata):
    """Prediction only slices gene columns, so CSC input works (training rejects CSC files,
    see test_train_rejects_csc_file) and gives the same values as dense input."""
    dense = model.predict(adata)
    adata.X = sp.csc_matrix(adata.X)
    np.testing.assert_array_equal(model.predict(adata).X, dense.X)


def test_sparse_obsm_embedding_is_read_by_predict_as_by_fit(adata):
    """fit densifies a sparse obsm embedding; predict read it with np.asarray and failed with
    NumPy's "setting an array element with a sequence"."""
    adata.obsm["X_emb"] = sp.csr_matrix(np.abs(adata.X[:, :8]))
    dense = adata.copy()
    dense.obsm["X_emb"] = adata.obsm["X_emb"].toarray()
    m = small_model(embed_key="X_emb", output_space="embedding").fit(adata)
    sub = adata[:50].copy()
    np.testing.assert_array_equal(m.predict(sub, seed=0).X, m.predict(dense[:50].copy(),
                                                                      seed=0).X)


def test_predict_split_unknown_split(model):
    with pytest.raises(DataError, match=r"has no 'val' split \(available: train\)"):
        model.predict_split("val")


# =============================================================================================
# fit (Python API)


def test_cell_set_len_larger_than_every_group_trains():
    """Groups have 24-30 cells; sets of 64 are padded from their group (D2), not an error."""
    adata = make_synthetic(n_cell_types=2, n_perts=2)
    m = small_model(cell_set_len=64, max_steps=2).fit(adata)
    assert m.cell_set_len_ == 64
    assert np.isfinite(m.history_.drop(columns=["step"]).to_numpy(float)).all()
    pred = m.predict(adata)
    assert np.isfinite(pred.X).all() and pred.n_obs == adata.n_obs
    # at inference a group is one set, never padded: every set is a single group
    sets = pred.obs.groupby("statetx_set", observed=True)[["gene", "cell_type"]].nunique()
    assert (sets == 1).all().all()


def test_fit_validation_failure_writes_nothing(tmp_path):
    adata = make_synthetic()
    keep = ~((adata.obs["cell_type"] == "CT1") & (adata.obs["gene"] == "ctrl")).to_numpy()
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"cell type 'CT1'.*no control cells"):
        small_model().fit(adata[keep].copy(), output_dir=out)
    assert not out.exists()


@pytest.mark.parametrize("loading", ["memory", "stream"])
def test_fit_refuses_scaled_expression_as_predict_does(model, adata, tmp_path, loading):
    """Negative expression (sc.pp.scale, or one stray value) used to be warned about at fit
    only, while predict refuses it: a model could not predict on its own training data. fit
    refuses it with predict's advice and writes nothing; an embedding may be negative."""
    import scanpy as sc

    scaled = adata.copy()
    sc.pp.scale(scaled)
    advice = (r"it looks scaled or centred \(e\.g\. by scanpy\.pp\.scale\), but .* Pass the "
              r"log1p values from before scaling \(e\.g\. adata\.raw, or a layer saved before "
              r"sc\.pp\.scale\)")
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"^X has negative values \(down to -[\d.]+, e\.g\. cell "
                                        rf"\S+ \(row \d+\) of <AnnData 'data'>\): {advice}\. An "
                                        r"embedding, .* is given as embed_key\.$"):
        small_model(data_loading=loading).fit(scaled, output_dir=out)
    assert not out.exists()
    with pytest.raises(DataError, match=advice):
        model.predict(scaled)
    one = adata.copy()
    one.X[5, 3] = -0.5
    with pytest.raises(DataError, match=r"down to -0\.5, e\.g\. cell cell5 \(row 5\)"):
        small_model(data_loading=loading).fit(one)
    one.obsm["X_emb"] = np.asarray(scaled.X)[:, :6]  # an embedding: negative values are normal
    small_model(data_loading=loading, embed_key="X_emb", output_space="embedding",
                max_steps=1).fit(one)


def test_fit_resume_from_truncated_checkpoint(truncated_ckpt, tmp_path):
    adata = make_synthetic()
    with pytest.raises(TrainingError, match=rf"could not load checkpoint {truncated_ckpt}: it is "
                                            "truncated, corrupted"):
        small_model(max_steps=4).fit(adata, output_dir=tmp_path / "r",
                                     resume_from=truncated_ckpt)
    with pytest.raises(ConfigError, match=r"checkpoint .*nope\.ckpt does not exist"):
        small_model(max_steps=4).fit(adata, resume_from=tmp_path / "nope.ckpt")


# =============================================================================================
# save / load / load_run


def test_save_onto_a_file_is_refused(model, tmp_path):
    target = tmp_path / "model"
    target.write_text("not a directory")
    with pytest.raises(ConfigError, match=rf"the model folder '{target}' is a file"):
        model.save(target)
    assert target.read_text() == "not a directory"


def test_failed_save_leaves_no_half_written_model(model, adata, tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(state, filename, *a, **k):
        Path(filename).write_bytes(b"\x00" * 64)  # a partial file, then the device is full
        raise OSError(28, "No space left on device")

    # into a new folder: nothing is left, not even the folder
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        model.save(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    # over an existing model: the old one is untouched and still loads
    monkeypatch.undo()
    old = model.save(tmp_path / "old")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        model.save(old)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    monkeypatch.undo()
    np.testing.assert_array_equal(StateTransitionModel.load(old).predict(adata).X,
                                  model.predict(adata).X)


@pytest.mark.parametrize("damage,match", [
    (lambda d: (d / "model.json").unlink(), r"model\.json not found: .* is not a saved statetx"),
    (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:500]),
     r"could not read the saved model in .*: .*(incomplete|header|deserializ)"),
    (lambda d: (d / "model.json").write_text("{\"params\": {"),
     r"could not read the saved model in .*Expecting"),
    (lambda d: _edit_json(d, lambda m: m.pop("vocab")),
     r"metadata in .*model\.json is incomplete or invalid \(KeyError: 'vocab'\)"),
    (lambda d: _edit_json(d, lambda m: m["params"].__setitem__("bogus", 1)),
     r"metadata in .*model\.json is incomplete or invalid \(ParameterError: .*bogus"),
    (lambda d: (d / "model.json").write_text("[1, 2]"),
     r"metadata in .*model\.json is incomplete or invalid"),
    (lambda d: _edit_json(d, lambda m: m["network_config"].__setitem__("hidden_dim", 64)),
     r"(?s)saved weights do not fit the saved network configuration.*pert_encoder"),
], ids=["no-json", "truncated-weights", "bad-json", "json-without-vocab", "unknown-param",
        "json-not-a-mapping", "weights-of-another-shape"])
def test_load_damaged_model_directory(model, tmp_path, damage, match):
    d = model.save(tmp_path / "m")
    damage(d)
    with pytest.raises(DataError, match=match):
        StateTransitionModel.load(d)


def _edit_json(d: Path, edit) -> None:
    meta = json.loads((d / "model.json").read_text())
    edit(meta)
    (d / "model.json").write_text(json.dumps(meta))


def test_load_run_bad_checkpoints(run, truncated_ckpt, tmp_path):
    with pytest.raises(TrainingError, match=r"truncated\.ckpt: it is truncated, corrupted"):
        StateTransitionModel.load_run(run, "truncated.ckpt")
    with pytest.raises(TrainingError, match=r"truncated\.ckpt: it is truncated"):
        StateTransitionModel.load_run(truncated_ckpt)  # a checkpoint path as run_dir
    foreign = run / "checkpoints" / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    try:
        with pytest.raises(DataError, match=r"foreign\.ckpt is not a statetx checkpoint"):
            StateTransitionModel.load_run(run, "foreign.ckpt")
    finally:
        foreign.unlink()
    with pytest.raises(DataError, match=r"checkpoint 'best\.ckpt' not found .*available: "
                                        r"final\.ckpt, last\.ckpt, step=2\.ckpt"):
        StateTransitionModel.load_run(run, "best.ckpt")
    with pytest.raises(DataError, match=r"has no checkpoints/final\.ckpt or checkpoints/last"):
        StateTransitionModel.load_run(tmp_path)


# =============================================================================================
# CLI: tx infer / predict / info


def infer_args(run: Path, src: Path, out: Path, *extra: str) -> list[str]:
    return ["tx", "infer", "--model-dir", str(run), "--adata", str(src), "--output", str(out),
            *extra]


def _relabel(a, old: str, new: str) -> None:
    a.obs["gene"] = a.obs["gene"].astype(str).replace({old: new})


@pytest.mark.parametrize("edit,match", [
    (lambda a: a.obs.drop(columns=["gene"], inplace=True),
     r"perturbation column 'gene' is not in .*bad\.h5ad.*pass --pert-col"),
    (lambda a: a.X.__setitem__((5, 0), np.nan), r"1 input cell has NaN or Inf values"),
    (lambda a: a.X.__setitem__(slice(None), np.round(np.expm1(a.X) * 20)),
     r"looks like raw counts"),
    (lambda a: setattr(a, "var_names", [f"X{i}" for i in range(a.n_vars)]),
     r"none of the model's 32 genes is in the input's X \(model: G0, G1"),
    (lambda a: _relabel(a, "ctrl", "NT"), r"no control cells \(obs\['gene'\] == 'ctrl'\)"),
], ids=["pert-column-missing", "nan", "counts", "genes-mismatch", "no-controls"])
def test_infer_bad_input_leaves_no_output(run, adata, tmp_path, capsys, edit, match):
    edit(adata)
    src = tmp_path / "bad.h5ad"
    adata.write_h5ad(src)
    outdir = tmp_path / "out"
    outdir.mkdir()
    assert main(infer_args(run, src, outdir / "out.h5ad")) == 2
    assert re.search(match, last_error(capsys))
    assert leftovers(outdir) == []


def test_infer_unreadable_or_misnamed_files(run, base, tmp_path, capsys):
    outdir = tmp_path / "out"
    outdir.mkdir()
    garbage = tmp_path / "garbage.h5ad"
    garbage.write_bytes(b"this is not an HDF5 file" * 20)
    assert main(infer_args(run, garbage, outdir / "out.h5ad")) == 2
    assert f"could not read {garbage} as an AnnData (.h5ad) file" in last_error(capsys)
    assert main(infer_args(run, base[3] / "data.h5ad", outdir / "out.csv")) == 2
    assert "use a .h5ad or .npy file name" in last_error(capsys)
    assert main(infer_args(run, base[3] / "data.h5ad", outdir / "o.h5ad", "--output-dir",
                           str(outdir))) == 2
    assert "not both" in last_error(capsys)
    assert leftovers(outdir) == []


def test_predict_and_info_with_truncated_checkpoint(run, truncated_ckpt, capsys):
    """A damaged file is a runtime failure (exit 1, cli.md §1), named in one line."""
    assert main(["tx", "predict", "--output-dir", str(run), "--checkpoint",
                 "truncated.ckpt"]) == 1
    err = last_error(capsys)
    assert f"could not load checkpoint {truncated_ckpt}: it is truncated, corrupted" in err
    assert not list(run.glob("eval_*"))
    assert main(["info", str(truncated_ckpt)]) == 1
    assert "truncated.ckpt: it is truncated" in last_error(capsys)
    assert main(["tx", "predict", "--output-dir", str(run), "--checkpoint", "nope.ckpt"]) == 2
    assert "checkpoint 'nope.ckpt' not found" in last_error(capsys)


# =============================================================================================
# CLI: tx train validation failures leave no run directory


def _write_data(d: Path, name: str, adata) -> Path:
    path = d / f"{name}.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_inputs")
    a = make_synthetic(n_cell_types=2, n_perts=2)
    ok = _write_data(d, "ok", a)
    b = a.copy()
    b.X = sp.csc_matrix(b.X)
    csc = _write_data(d, "csc", b)
    b = a.copy()
    b.X[3, 3] = np.inf
    inf = _write_data(d, "inf", b)
    return {"ok": ok, "csc": csc, "inf": inf, "dir": d}


def _toml(d: Path, name: str, text: str) -> Path:
    p = d / f"{name}.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("case,extra,match", [
    ("malformed", [], r"malformed\.toml: invalid TOML: .*line 3, column"),
    ("csc", [], r"'X' in .*csc\.h5ad is stored as 'csc_matrix'.*CSC is not supported"),
    ("inf", [], r"1 cell of the train split has NaN or Inf expression values \(e\.g\. cell \S+ "
             r"\(row \d+\) of inf\.h5ad\)"),
    ("empty", ["data.kwargs.should_yield_control_cells=false"],
     r"the training split is empty"),
    ("absent-pert", [], r"\[fewshot\]\.\"data\.CT1\".*P9"),
    ("no-control", ["data.kwargs.control_pert=DMSO"],
     r"control_pert 'DMSO' is not a value of obs\['gene'\] in ok\.h5ad"),
    ("wrong-column", ["data.kwargs.cell_type_key=celltype"],
     r"obs column 'celltype' not found in ok\.h5ad.*Did you mean: 'cell_type'"),
])
def test_train_validation_failure_leaves_no_run_directory(train_inputs, tmp_path, capsys, case,
                                                          extra, match):
    d = train_inputs["dir"]
    data = train_inputs["csc" if case == "csc" else "inf" if case == "inf" else "ok"]
    body = {
        "malformed": f'[datasets]\ndata = "{data}"\n[training\ndata = "train"\n',
        "empty": f'[datasets]\ndata = "{data}"\n[zeroshot]\n"data.CT0" = "test"\n'
                 '"data.CT1" = "val"\n',
        "absent-pert": f'[datasets]\ndata = "{data}"\n[training]\ndata = "train"\n'
                       '[fewshot."data.CT1"]\ntest = ["P9"]\n',
    }.get(case, f'[datasets]\ndata = "{data}"\n[training]\ndata = "train"\n')
    toml = _toml(d, case, body)
    out = tmp_path / "out"
    rc = main(["tx", "train", f"data.kwargs.toml_config_path={toml}", f"output_dir={out}",
               f"name={case}", *TINY, *extra])
    assert rc == 2
    assert re.search(match, last_error(capsys))
    assert not (out / case).exists()


def test_train_failing_otherwise_before_a_checkpoint_leaves_no_run_directory(
        train_inputs, tmp_path, monkeypatch, capsys):
    """Any failure before training logs anything (here an unreadable file's OSError) removes the
    run folder the command created, as validation errors do; a run that logged keeps it."""
    from statetx.model import StateTransitionModel

    def broken(*args, **kwargs):
        raise OSError("Can't synchronously read data (filter returned failure during read)")

    monkeypatch.setattr(StateTransitionModel, "_fit_run", broken)  # (what tx train calls)
    toml = _toml(train_inputs["dir"], "plain2",
                 f'[datasets]\ndata = "{train_inputs["ok"]}"\n[training]\ndata = "train"\n')
    out = tmp_path / "out"
    assert main(["tx", "train", f"data.kwargs.toml_config_path={toml}", f"output_dir={out}",
                 "name=broken", *TINY]) == 1
    assert "OSError" in capsys.readouterr().err and not (out / "broken").exists()

    def failing_later(self, run, *args, output_dir=None, **kwargs):  # after logging steps
        (Path(output_dir) / "metrics.csv").write_text("step,train_loss\n50,0.5\n")
        raise RuntimeError("non-finite loss")

    monkeypatch.setattr(StateTransitionModel, "_fit_run", failing_later)
    assert main(["tx", "train", f"data.kwargs.toml_config_path={toml}", f"output_dir={out}",
                 "name=later", *TINY]) == 1
    assert (out / "later" / "metrics.csv").is_file()  # kept to look at


@pytest.mark.parametrize("token,match", [
    ("data.kwargs.pertcol=gene", r"unknown configuration key 'data\.kwargs\.pertcol'.*"
                                 r"Did you mean: data\.kwargs\.pert_col"),
    ("model.kwargs.hiden_dim=32", r"'model\.kwargs\.hiden_dim'.*model\.kwargs\.hidden_dim"),
    ("trainin.max_steps=5", r"'trainin\.max_steps'.*Known sections: .*training"),
    ("TRAINING.LR=1", r"'TRAINING\.LR'\. Did you mean: training\.lr\? \("),
    ("~training.lr", r"deleting keys \(~key\) is not supported"),
])
def test_train_unknown_override_keys(train_inputs, tmp_path, capsys, token, match):
    toml = _toml(train_inputs["dir"], "plain",
                 f'[datasets]\ndata = "{train_inputs["ok"]}"\n[training]\ndata = "train"\n')
    rc = main(["tx", "train", f"data.kwargs.toml_config_path={toml}", f"output_dir={tmp_path}",
               "name=r", *TINY, token])
    assert rc == 2
    assert re.search(match, last_error(capsys))
    assert leftovers(tmp_path) == []


def test_train_config_file_with_unknown_key(tmp_path, capsys):
    cfg = tmp_path / "base.yaml"
    cfg.write_text("training:\n  max_steps: 2\n  learning_rate: 0.1\n")
    assert main(["tx", "train", "--config", str(cfg), f"output_dir={tmp_path}", "name=r"]) == 2
    err = last_error(capsys)
    assert "unknown configuration key 'training.learning_rate'" in err and str(cfg) in err
    cfg.write_text("training: [1, 2\n")
    assert main(["tx", "train", "--config", str(cfg)]) == 2
    assert f"{cfg} is not valid YAML" in last_error(capsys)
    assert leftovers(tmp_path) == ["base.yaml"]


def test_train_resume_with_truncated_last_checkpoint_keeps_the_run(train_inputs, tmp_path,
                                                                   capsys):
    toml = _toml(train_inputs["dir"], "resume",
                 f'[datasets]\ndata = "{train_inputs["ok"]}"\n[training]\ndata = "train"\n')
    args = ["tx", "train", f"data.kwargs.toml_config_path={toml}", f"output_dir={tmp_path}",
            "name=r", *TINY, "training.ckpt_every_n_steps=1"]
    assert main(args) == 0
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    capsys.readouterr()
    assert main([*args, "training.max_steps=3"]) == 1
    assert f"could not load checkpoint {last}: it is truncated" in last_error(capsys)
    # the run and its intact checkpoints are kept: nothing is deleted on a failed resume
    ck = tmp_path / "r" / "checkpoints"
    assert {"final.ckpt", "step=2.ckpt", "last.ckpt"} <= {p.name for p in ck.iterdir()}


# =============================================================================================
# CLI: preprocessing, knock-down filter, evaluate; and ``python -m statetx``


def test_preprocess_commands_bad_inputs(base, tmp_path, capsys):
    src = base[3] / "data.h5ad"  # log1p data
    outdir = tmp_path / "out"
    outdir.mkdir()
    assert main(["tx", "preprocess_train", "--adata", str(src), "--output",
                 str(outdir / "pp.h5ad"), "--num-hvgs", "10"]) == 2
    assert "preprocess_train expects raw counts in X, but it looks log1p" in last_error(capsys)
    assert main(["tx", "preprocess_infer", "--adata", str(src), "--output",
                 str(outdir / "pi.h5ad"), "--control-condition", "DMSO", "--pert-col",
                 "gene"]) == 2
    assert "control label 'DMSO' is not a value of obs['gene']" in last_error(capsys)
    assert main(["tx", "preprocess_infer", "--adata", str(src), "--output",
                 str(outdir / "pi.h5ad"), "--control-condition", "ctrl", "--pert-col",
                 "drug"]) == 2
    assert "obs column 'drug'" in last_error(capsys)
    assert main(["filter_on_target_knockdown", str(src), "-o", str(outdir / "ko.h5ad"),
                 "--perturbation-column", "target_gene", "--control-label", "ctrl"]) == 2
    assert "obs column 'target_gene'" in last_error(capsys)
    assert leftovers(outdir) == []


@pytest.mark.filterwarnings("ignore:X looks log-transformed")
def test_pp_functions_bad_inputs(adata):
    from statetx.pp import filter_on_target_knockdown, make_control_template, preprocess_train

    with pytest.raises(DataError, match=r"expects raw counts in X, but it looks log1p"):
        preprocess_train(adata, 10)
    counts = adata.copy()
    counts.X = np.round(np.expm1(counts.X) * 20)
    counts.X[0, 0] = -3
    with pytest.raises(DataError, match="negative values"):
        preprocess_train(counts, 10)
    with pytest.raises(DataError, match=r"layer 'counts' not found"):
        preprocess_train(adata, 10, layer="counts")
    with pytest.raises(DataError, match=r"control label 'DMSO' is not a value of obs\['gene'\].*"
                                        "look like controls: ctrl"):
        make_control_template(adata, "gene", "DMSO", "cell_type")
    with pytest.raises(DataError, match=r"obs column 'target'"):
        filter_on_target_knockdown(adata, "target", "ctrl")


def test_evaluate_bad_inputs(model, adata, tmp_path, capsys):
    from statetx.metrics import evaluate

    real = adata[adata.obs["cell_type"] == "CT0"].copy()
    pred = model.predict(real)
    bad = pred.copy()
    bad.X[3, 2] = np.nan
    with pytest.raises(DataError, match="pred X contains NaN or infinite values"):
        evaluate(bad, real, pert_col="gene", control_pert="ctrl", outdir=tmp_path / "ev")
    with pytest.raises(DataError, match=r"column 'target_gene' not found in pred obs"):
        evaluate(pred, real, pert_col="target_gene", control_pert="ctrl", outdir=tmp_path / "ev")
    assert not (tmp_path / "ev").exists()
    bad.write_h5ad(tmp_path / "bad.h5ad")
    real.write_h5ad(tmp_path / "real.h5ad")
    assert main(["evaluate", "run", "-ap", str(tmp_path / "bad.h5ad"), "-ar",
                 str(tmp_path / "real.h5ad"), "--pert-col", "gene", "--control-pert", "ctrl",
                 "-o", str(tmp_path / "ev")]) == 2
    assert "pred X contains NaN" in last_error(capsys)
    assert not (tmp_path / "ev").exists()


def test_python_m_statetx_bad_split_file(tmp_path):
    """Through the real entry point: one line on stderr, exit 2, no run directory."""
    toml = _toml(tmp_path, "bad", '[datasets]\nd = "x.h5ad"\n[training]\nd = "tr"\n')
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "statetx", "tx", "train",
                        f"data.kwargs.toml_config_path={toml}", f"output_dir={out}", "name=r",
                        "training.device=cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("statetx: error:")]
    assert len(errors) == 1 and '[training].d = "tr" is not allowed' in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert leftovers(out) == []


# =============================================================================================
# fit: a failure leaves the estimator and the output folder as they were


@pytest.mark.parametrize("bad,match", [
    ({"lr": -1.0}, r"lr=-1.0 must be a non-negative"),
    ({"device": "tpu"}, r"device='tpu' is not a device"),
    ({"loss_kwargs": {"blurr": 0.1}}, r"unknown option 'blurr'"),
    ({"yield_controls": "no"}, r"yield_controls='no' must be True or False"),
    ({"progress": "yes"}, r"progress='yes' must be True or False"),
    ({"keep_last_n": -1}, r"keep_last_n=-1 is invalid; expected an integer >= 0 or None"),
    ({"early_stopping_patience": 0}, r"early_stopping_patience=0 is invalid; expected an integer "
                                     r">= 1 or None"),
    ({"warmup_steps": -3}, r"warmup_steps=-3 is invalid; expected an integer >= 0\."),
    ({"max_steps": 2.5}, r"max_steps=2.5 is invalid; expected an integer >= 1"),
    ({"val_freq": True}, r"val_freq=True is invalid"),
    ({"warmup_steps": "3"}, r"warmup_steps='3' is invalid"),
    ({"weight_decay": -1}, r"weight_decay=-1.0 must be a finite number >= 0"),
])
def test_failed_refit_keeps_the_fitted_model_and_writes_nothing(model, adata, tmp_path, bad,
                                                                match):
    m = pickle.loads(pickle.dumps(model))
    before = m.predict(adata, seed=1).X
    history = m.history_.copy()
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        m.set_params(**bad).fit(adata, output_dir=out)
    assert leftovers(out) == []
    np.testing.assert_array_equal(m.predict(adata, seed=1).X, before)
    pd.testing.assert_frame_equal(m.history_, history)


def test_failure_during_training_restores_the_previous_state(model, adata, monkeypatch):
    from statetx.train import Trainer

    m = pickle.loads(pickle.dumps(model))
    net = m.network_

    def boom(self, resume_from=None):
        raise TrainingError("interrupted")

    monkeypatch.setattr(Trainer, "fit", boom)
    with pytest.raises(TrainingError, match="interrupted"):
        m.fit(adata)
    assert m.network_ is net  # not the new, untrained network
    fresh = small_model()
    with pytest.raises(TrainingError, match="interrupted"):
        fresh.fit(adata)
    with pytest.raises(NotFittedError):
        fresh.predict(adata)


def test_count_scale_model_is_not_clipped_at_log1p_range(adata):
    counts = adata.copy()
    counts.X = np.round(np.expm1(counts.X) * 40).astype(np.float32)
    # the head predicts the change from the control cell: outputs start on the input's scale
    with pytest.warns(UserWarning, match=r"X of .* does not look log1p-normalised .*"
                                         "preprocess_train"):
        m = small_model(model_kwargs={**SMALL, "residual_space": "input"}).fit(counts)
    assert not m.is_log1p_
    pred = m.predict(counts)
    assert pred.X.max() > 14 and pred.X.min() >= 0
    assert m.predict(counts, clip=(0, 14)).X.max() <= 14


def test_normalised_but_not_log_transformed_input_is_refused(model, adata):
    scaled = adata.copy()
    scaled.X = np.expm1(scaled.X) * 40 + 0.5  # normalised-like, not integers, not log1p
    with pytest.raises(DataError, match=r"far above log1p scale.*scanpy.pp.log1p"):
        model.predict(scaled)


def test_clip_must_be_a_pair_of_numbers(model, adata):
    with pytest.raises(ConfigError, match=r"clip=\(0,\) is invalid"):
        model.predict(adata, clip=(0,))


@pytest.mark.parametrize("bad,match", [
    ({"batch_size": 0}, r"batch_size=0 is invalid; expected an integer >= 1"),
    ({"cell_set_len": 0}, r"cell_set_len=0 is invalid"),
    ({"seed": None}, r"seed=None is invalid; expected an integer >= 0\."),
    ({"seed": 2**64}, r"seed=18446744073709551616 is too large; use an integer below 2\*\*63"),
    ({"max_steps": 2.5}, r"max_steps=2.5 is invalid"),
])
def test_fit_integer_options_are_checked_before_loading(adata, tmp_path, bad, match):
    with pytest.raises(ConfigError, match=match):
        small_model(**bad).fit(adata, output_dir=tmp_path / "run")
    assert leftovers(tmp_path / "run") == []


@pytest.mark.parametrize("bad,match", [
    # (were a ValueError, TypeError or AttributeError from inside fit)
    ({"model_kwargs": "hidden_dim=8"}, r"model_kwargs='hidden_dim=8' is invalid; it must be a "
                                       r"dict \(e\.g\. model_kwargs=\{'hidden_dim': 8\}\)"),
    ({"model_kwargs": 64}, r"model_kwargs=64 is invalid; it must be a dict"),
    ({"loss_kwargs": "blur"}, r"loss_kwargs='blur' is invalid; it must be a dict"),
    # (the same column: fit said later that a cell type had no control cells)
    ({"cell_type_key": "gene"}, r"pert_col and cell_type_key both name the obs column 'gene'"),
    ({"batch_col": "gene"}, r"pert_col and batch_col both name the obs column 'gene'"),
    # (were accepted: '' paired at random, as None; '1e-3' kept as text in get_params)
    ({"batch_col": ""}, r"batch_col='' names no column; pass batch_col=None"),
    ({"lr": "1e-3"}, r"lr='1e-3' is invalid; expected a number \(e\.g\. lr=1e-3\)"),
    ({"weight_decay": "0"}, r"weight_decay='0' is invalid; expected a number"),
    ({"gradient_clip_val": True}, r"gradient_clip_val=True is invalid; expected a number"),
])
def test_fit_dict_number_and_column_options_are_checked_before_loading(adata, tmp_path, bad,
                                                                         match):
    with pytest.raises(ConfigError, match=match):
        small_model(**bad).fit(adata, output_dir=tmp_path / "run")
    assert leftovers(tmp_path / "run") == []


def test_predict_refuses_one_column_for_perturbation_and_cell_type(model, adata):
    with pytest.raises(ConfigError, match=r"pert_col and cell_type_col both name the obs column "
                                          r"'gene'"):
        model.predict(adata, cell_type_col="gene")


@pytest.mark.parametrize("opts,match", [
    ({"seed": -1}, r"seed=-1 is invalid"),
    ({"seed": 2**63}, r"seed=9223372036854775808 is too large"),
    ({"set_len": 0}, r"set_len=0 is invalid"),
    ({"all_perts": True, "n_cells_per_pert": 0}, r"n_cells_per_pert=0 is invalid"),
    ({"basal_fallback": "nearest"}, r"basal_fallback='nearest' is invalid"),
    ({"unknown_batch": "last"}, r"unknown_batch='last' is invalid.*'mean'"),
    ({"unknown_perturbation": "drop"}, r"unknown_perturbation='drop' is invalid"),
    ({"untrained_perturbation": "zeros"}, r"untrained_perturbation='zeros' is invalid.*'as_is'"),
])
def test_predict_options_are_checked_up_front(model, adata, opts, match):
    with pytest.raises(ConfigError, match=match):
        model.predict(adata, **opts)


def test_baseline_seed_is_checked(adata):
    from statetx.baselines import ContextMeanBaseline

    b = ContextMeanBaseline(pert_col="gene", cell_type_key="cell_type", control_pert="ctrl")
    b.fit(adata, SPEC)
    for seed in (-1, 1.5, "7"):
        with pytest.raises(ConfigError, match=f"seed={seed!r} is invalid; expected an integer"):
            b.predict(adata, seed=seed)
    with pytest.raises(ConfigError, match="seed=-2 is invalid"):
        b.set_params(seed=-2).predict_split("test")


def test_unknown_batch_mean_uses_the_mean_batch_embedding(adata):
    m = small_model(batch_col="batch", model_kwargs={**SMALL, "batch_encoder": True}).fit(adata)
    new = adata.copy()
    new.obs["batch"] = "unseen"
    with pytest.raises(DataError, match="batch label.*not seen in training: unseen.*'mean'"):
        m.predict(new)
    pred = m.predict(new, unknown_batch="mean", seed=3)
    # the same as a network whose first batch embedding is replaced by the mean one
    import copy

    net = copy.deepcopy(m.network_)
    with torch.no_grad():
        net.batch_encoder.weight[0] = m.network_.batch_encoder.weight.mean(0)
    ref = copy.copy(m)
    ref.network_ = net
    np.testing.assert_allclose(pred.X, ref.predict(new, unknown_batch="first", seed=3).X,
                               rtol=1e-5, atol=1e-6)


def test_virtual_cell_names_never_collide_with_input_names(model, adata):
    ctx, pert = adata.obs["cell_type"].iloc[0], "P1"
    adata.obs_names = [f"{ctx}_{pert}_{i}" for i in range(adata.n_obs)]  # the virtual scheme
    out = model.predict(adata, all_perts=True, n_cells_per_pert=2)
    assert out.obs_names.is_unique
    assert list(out.obs_names[:adata.n_obs]) == list(adata.obs_names)  # inputs keep theirs


def test_empty_spec_string_is_an_empty_spec(adata):
    m = small_model().fit(adata, "")
    assert set(m.split_summary_["split"]) == {"train"}


def test_wrong_control_label_in_predict_suggests_the_right_one(model, adata):
    with pytest.raises(DataError, match=r"no control cells.*Did you mean: 'ctrl'"):
        model.predict(adata, control_pert="ctr")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message on a machine without CUDA")
def test_load_onto_a_missing_gpu_names_the_device(model, tmp_path):
    model.save(tmp_path / "m")
    with pytest.raises(ConfigError, match=r"device='cuda:1' was requested but CUDA is not "
                                          "available"):
        StateTransitionModel.load(tmp_path / "m", device="cuda:1")


def test_moving_a_model_to_a_dtype_is_explained(model):
    with pytest.raises(ConfigError, match=r"torch.float64 is a dtype, not a device"):
        pickle.loads(pickle.dumps(model)).to(torch.float64)


def test_fit_refuses_an_output_folder_that_is_not_a_run(adata, tmp_path):
    (tmp_path / "metrics.csv").write_text("my numbers\n")
    with pytest.raises(ConfigError, match="holds files that are not a statetx run"):
        small_model().fit(adata, output_dir=tmp_path)
    assert leftovers(tmp_path) == ["metrics.csv"]
    assert (tmp_path / "metrics.csv").read_text() == "my numbers\n"


def test_checkpoint_of_another_run_is_refused(run, tmp_path, capsys):
    from statetx.run import load_run

    other = tmp_path / "other"
    small_model().fit(make_synthetic(n_perts=2), output_dir=other)
    foreign = other / "checkpoints" / "final.ckpt"
    with pytest.raises(DataError, match=r"does not belong to the run .*vocabulary or genes"):
        load_run(run, foreign, verbose=False)
    # the same data and settings but another learning rate: another run all the same
    twin = tmp_path / "twin"
    small_model(lr=1e-3).fit(make_synthetic(), output_dir=twin)
    with pytest.raises(DataError, match="does not belong to the run"):
        load_run(run, twin / "checkpoints" / "final.ckpt", verbose=False)
    assert main(["tx", "predict", "--output-dir", str(run), "--checkpoint", str(foreign)]) == 2
    assert "does not belong to the run" in last_error(capsys)
    assert not list(run.glob("eval_*"))
    # its own checkpoint by path is fine
    assert load_run(run, run / "checkpoints" / "final.ckpt", verbose=False).step_ == 2


def test_finetune_on_controls_needs_the_split(model, tmp_path):
    model.save(tmp_path / "m")
    loaded = StateTransitionModel.load(tmp_path / "m")
    with pytest.raises(DataError, match="finetune_on_controls needs the training data"):
        loaded.finetune_on_controls(2)
    with pytest.raises(ConfigError, match="steps=0 is invalid"):
        loaded.finetune_on_controls(0)


def test_reloaded_run_rebuilds_its_splits_with_the_data_options(tmp_path):
    """load_run + attach_data (tx predict) use the options the run trained with."""
    from statetx.run import attach_data, load_run

    a = make_synthetic()
    values = a.obs["gene"].astype(object).to_numpy().copy()
    values[[3, 40]] = np.nan
    a.obs["gene"] = pd.Categorical(values)
    spec = '[training]\ndata = "train"\n[zeroshot]\n"data.CT2" = "test"\n'
    m = small_model(drop_missing_labels=True).fit(a, spec, output_dir=tmp_path / "run")
    loaded = load_run(tmp_path / "run", verbose=False)
    attach_data(loaded, adata=a)
    pred, real = loaded.predict_split("test")
    want, _ = m.predict_split("test")
    np.testing.assert_array_equal(pred.X, want.X)


def test_save_into_a_run_folder_is_refused(model, run):
    before = (run / "model.json").read_bytes()
    with pytest.raises(ConfigError, match="is a training run's folder"):
        model.save(run)
    assert (run / "model.json").read_bytes() == before


def test_predict_with_the_inputs_own_control_label(model, adata):
    """control_pert names the input's control label; those cells are the model's control."""
    want = model.predict(adata, seed=3)
    relabelled = adata.copy()
    relabelled.obs["gene"] = relabelled.obs["gene"].astype(str).replace({"ctrl": "NT"})
    got = model.predict(relabelled, control_pert="NT", seed=3)
    np.testing.assert_allclose(got.X, want.X, atol=1e-6)
    assert (got.obs["gene"] == "NT").sum() == (adata.obs["gene"] == "ctrl").sum()
    with pytest.raises(DataError, match=r"no control cells.*control_pert=<label>.*look like "
                                        r"controls: NT\.$"):
        model.predict(relabelled, control_pert="zzz")
    assert got.uns["statetx"]["control_pert"] == "NT"  # the label of the output's obs
    assert model.score(relabelled, control_pert="NT", seed=3) == pytest.approx(
        model.score(adata, seed=3))
    sim = model.predict(relabelled, control_pert="NT", seed=3, all_perts=True,
                        n_cells_per_pert=2)
    assert "ctrl" not in set(sim.obs["gene"]) and (sim.obs["gene"] == "NT").sum() == \
        (adata.obs["gene"] == "ctrl").sum()  # simulated too: the input's controls keep "NT"
    numbered = adata.copy()  # an integer control label, as fit accepts it
    numbered.obs["gene"] = [0 if g == "ctrl" else g for g in adata.obs["gene"].astype(str)]
    got = model.predict(numbered, control_pert=0, seed=3)
    np.testing.assert_allclose(got.X, want.X, atol=1e-6)
    assert got.uns["statetx"]["control_pert"] == "0"


def test_duplicate_gene_names_are_refused_by_fit(adata):
    adata.var_names = ["G0", *adata.var_names[:-1]]  # G0 twice
    with pytest.raises(DataError, match=r"duplicate gene names in X: G0.*var_names_make_unique"):
        small_model().fit(adata)


def test_label_options_of_the_wrong_type(adata):
    with pytest.raises(ConfigError, match=r"cell_type_key=None: .*constant column"):
        small_model(cell_type_key=None).fit(adata)
    codes = adata.copy()  # an integer perturbation column whose control is 0
    codes.obs["gene"] = codes.obs["gene"].map({"ctrl": 0, "P0": 1, "P1": 2, "P2": 3})
    m = small_model(control_pert=0).fit(codes)
    assert m.vocab_.control_pert == "0"


def test_nan_label_in_predict_says_what_to_do(model, adata):
    adata.obs["gene"] = adata.obs["gene"].astype(object)
    adata.obs.iloc[0, adata.obs.columns.get_loc("gene")] = np.nan
    with pytest.raises(DataError, match=r"obs\['gene'\] has 1 missing values.*notna\(\)\]\.copy"
                       r"\(\)\)\.$"):
        model.predict(adata)


def test_normalize_log1p_on_an_anndata_points_to_the_anndata_functions(adata):
    from statetx.pp import normalize_log1p

    with pytest.raises(TypeError, match="takes a matrix.*preprocess_train"):
        normalize_log1p(adata)


def test_embedding_input_without_a_decoder_is_not_clipped(adata):
    """An embedding input with output 'all' on an architecture without gene decoder predicts
    the embedding (warned about), not clipped or named as expression."""
    x = np.asarray(adata.X, dtype=np.float64)
    u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    adata.obsm["X_pca"] = (u[:, :10] * s[:10]).astype(np.float32)
    with pytest.warns(UserWarning, match="no gene decoder.*gene_decoder_bool"):
        m = small_model(embed_key="X_pca", output_space="all").fit(adata)
    pred = m.predict(adata)
    assert pred.n_vars == 10 and list(pred.var_names) == [f"emb_{i}" for i in range(10)]
    assert (pred.X < 0).mean() > 0.2  # PCA coordinates keep their sign


def test_predict_reads_x_when_the_inputs_hvgs_differ(model, adata):
    """obsm['X_hvg'] chosen on other data: the model's genes are read from X by name."""
    hvg = adata.copy()
    hvg.obsm["X_hvg"] = np.asarray(hvg.X[:, :10])
    hvg.uns["X_hvg_var_names"] = list(hvg.var_names[:10])
    from statetx.predict import align_genes

    with pytest.warns(UserWarning, match="read from X by name"):
        got = align_genes(hvg, list(model.var_names_[::-1]), "X_hvg")
    np.testing.assert_array_equal(got, np.asarray(adata.X)[:, ::-1])
    hvg.X = np.round(np.expm1(np.asarray(hvg.X)))  # X as counts, X_hvg log1p: not read from X
    with pytest.raises(DataError, match=r"X has them all, but not on the scale of obsm"):
        align_genes(hvg, list(model.var_names_), "X_hvg")


# =============================================================================================
# scikit-learn parameters, and the helpers users call around the estimator


def test_misspelled_parameters_name_the_closest_one():
    from sklearn.base import clone

    from statetx.baselines import LinearBaseline, PerturbMeanBaseline, fit_all_baselines

    with pytest.raises(TypeError, match=r"no parameter 'max_step'.*Did you mean.*'max_steps'"):
        StateTransitionModel(max_step=5)
    with pytest.raises(ConfigError, match=r"PerturbMeanBaseline has no parameter 'pert_colz'.*"
                                          r"'pert_col'"):
        PerturbMeanBaseline(pert_colz="gene")
    with pytest.raises(ConfigError, match=r"'random_state'.*here it is 'seed'"):
        PerturbMeanBaseline().set_params(random_state=0)
    with pytest.raises(ConfigError, match="'ridge'"):
        fit_all_baselines(make_synthetic(), baselines={"linear": {"ridg": 1.0}},
                          pert_col="gene", control_pert="ctrl")
    m = StateTransitionModel("tiny", model_kwargs={"hidden_dim": 32})
    with pytest.raises(ConfigError, match="'max_steps'"):
        m.set_params(max_step=1)
    # arc-state's option names (what users copy from its configs) and scikit-learn's say what
    # they are here
    for name, said in (("random_state", "scikit-learn's name: here it is 'seed'"),
                       ("should_yield_control_cells", "here it is 'yield_controls'"),
                       ("train_seed", "here it is 'seed'"),
                       ("n_basal_samples", "has no effect in statetx .*leave it out"),
                       ("hidden_dim", r"model_kwargs=\{'hidden_dim': ...\}")):
        with pytest.raises(TypeError, match=f"no parameter '{name}'. '{name}' .*{said}"):
            StateTransitionModel(**{name: 1})
        with pytest.raises(ConfigError, match=said):
            m.set_params(**{name: 1})
    # one entry of a dict parameter; the estimator's own dict is not shared with its clone
    m.set_params(model_kwargs__n_layers=2, lr=1e-3)
    assert m.model_kwargs == {"hidden_dim": 32, "n_layers": 2} and m.lr == 1e-3
    c = clone(m).set_params(model_kwargs__n_layers=3)
    assert m.model_kwargs["n_layers"] == 2 and c.model_kwargs["n_layers"] == 3
    with pytest.raises(ConfigError, match="n_components"):
        LinearBaseline(n_components="10", pert_col="gene", control_pert="ctrl").fit(
            make_synthetic())


def test_column_option_typo_is_a_config_error():
    from statetx.splits import assign

    with pytest.raises(ConfigError, match=r"'pert_colum'.*Did you mean.*'pert_col'"):
        assign(make_synthetic(), None, {"pert_colum": "gene", "control_pert": "ctrl"})


def test_dataset_name_typo_suggests_the_datasets_entry(tmp_path, adata):
    adata.write_h5ad(tmp_path / "kang.h5ad")
    spec = f'[datasets]\nkang = "{tmp_path / "kang.h5ad"}"\n[training]\nkagn = "train"\n'
    with pytest.raises(Exception, match=r"'kagn'.*Did you mean.*'kang'"):
        small_model().fit(None, spec)


def test_predict_and_simulate_inputs(model, adata):
    with pytest.raises(DataError, match="must be an AnnData.*DataFrame"):
        model.predict(adata.to_df())
    controls = adata[adata.obs["gene"] == "ctrl"].copy()
    with pytest.raises(ConfigError, match=r"^n_cells=0"):
        model.simulate(controls, ["P0"], n_cells=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # (pandas: concat of empty frames)
        out = model.simulate(controls, {"P0": 0, "P1": 2})
    assert (out.obs["gene"] == "P1").sum() == 2 * controls.obs["cell_type"].nunique()
    assert (out.obs["gene"] == "P0").sum() == 0


def test_integer_perturbation_labels_simulate_by_value():
    a = make_synthetic(n_cell_types=1, n_perts=2)
    a.obs["code"] = a.obs["gene"].map({"ctrl": 0, "P0": 1, "P1": 2}).astype(int)
    m = small_model(pert_col="code", control_pert=0, max_steps=1).fit(a)
    out = m.simulate(a[a.obs["code"] == 0].copy(), [1], n_cells=3)
    assert (out.obs["code"].astype(str) == "1").sum() == 3


def test_newer_model_format_is_refused(model, tmp_path):
    path = model.save(tmp_path / "m")
    meta = json.loads((path / "model.json").read_text())
    meta["format_version"] = 99
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="format 99.*upgrade statetx"):
        StateTransitionModel.load(path)


def test_baselines_warn_on_raw_counts(adata):
    from statetx.baselines import PerturbMeanBaseline

    counts = adata.copy()
    counts.X = np.round(np.expm1(counts.X) * 40).astype(np.float32)
    with pytest.warns(UserWarning, match="the perturb_mean baseline trains on it as given"):
        PerturbMeanBaseline(pert_col="gene", control_pert="ctrl").fit(counts)


def test_preprocessing_refuses_nan_backed_and_empty_input(papalexi, tmp_path):
    from statetx import pp

    raw = papalexi[:400].copy()
    raw.X = np.asarray(raw.layers["counts"].todense(), dtype=np.float32)
    raw.X[3, 5] = np.nan
    view = raw[raw.obs["target_gene"] != "unassigned"]
    with pytest.raises(DataError, match=r"1 cell\(s\) have NaN or Inf values in X"):
        pp.preprocess_train(view, 50)
    assert view.is_view  # refused before the view was made its own object
    with pytest.raises(DataError, match="NaN or Inf"):
        pp.normalize_log1p(raw.X)
    with pytest.raises(DataError, match="no cells"):
        pp.preprocess_train(raw[:0], 50)
    raw.X[3, 5] = 0
    raw.write_h5ad(tmp_path / "p.h5ad")
    backed = ad.read_h5ad(tmp_path / "p.h5ad", backed="r")
    with pytest.raises(DataError, match="backed mode.*to_memory"):
        pp.filter_on_target_knockdown(backed, "target_gene", "non-targeting")
    with pytest.raises(DataError, match="include_genes: NOPE"):
        pp.preprocess_train(raw, 50, include_genes="NOPE")


def test_metrics_read_recorded_labels_and_refuse_empty_input():
    from statetx.metrics import ceiling, evaluate, vcc_score
    from statetx.metrics._synthetic import synthetic_log1p

    real, eff = synthetic_log1p(3, 20, 30, 30, seed=1)
    pred, _ = synthetic_log1p(3, 20, 30, 30, seed=2, effects=eff)
    for a in (pred, real):  # labelled as a statetx prediction with its own columns
        a.obs = a.obs.rename(columns={"target_gene": "gene"})
        a.obs["gene"] = a.obs["gene"].astype(str).replace({"non-targeting": "ctrl"})
        a.uns["statetx"] = {"pert_col": "gene", "control_pert": "ctrl"}
    score = vcc_score(pred, real, profile="minimal")
    assert len(score) > 0
    _, agg = ceiling(real, profile="minimal")
    assert len(agg) == 1
    with pytest.raises(DataError, match="pred AnnData has no cells"):
        evaluate(pred[:0], real)


def test_non_finite_weights_are_refused_where_they_are_loaded(model, tmp_path):
    """A diverged run saved (or a damaged file) would make every prediction NaN, silently.
    (A file changed after the save is refused before, by the digest model.json records.)"""
    import copy

    diverged = copy.deepcopy(model)
    name, weight = next((k, v) for k, v in diverged.network_.state_dict().items()
                        if v.is_floating_point())
    weight.view(-1)[0] = float("nan")
    diverged.save(tmp_path / "m")
    with pytest.raises(DataError, match=rf"model.safetensors: weights hold NaN or Inf.*{name}"):
        StateTransitionModel.load(tmp_path / "m")
    blob = pickle.dumps(model)
    twin = pickle.loads(blob)
    with torch.no_grad():
        next(twin.network_.parameters()).fill_(float("inf"))
    with pytest.raises(DataError, match="the pickled model: weights hold NaN or Inf"):
        pickle.loads(pickle.dumps(twin))


def test_arc_runs_with_non_finite_weights_or_vectors_are_refused(tmp_path):
    from conftest import FIXTURES, writable_copy

    src = FIXTURES / "arc_state" / "runs" / "model_a_llama_bidir"
    run = writable_copy(src, tmp_path / "run")
    maps = torch.load(run / "pert_onehot_map.pt", weights_only=False)  # (a fixture: trusted)
    first = next(iter(maps))
    maps[first] = maps[first].float().clone()
    maps[first][0] = float("nan")
    torch.save(maps, run / "pert_onehot_map.pt")
    with pytest.raises(DataError, match=rf"pert_onehot_map.pt: the vectors of {first} hold NaN"):
        StateTransitionModel.from_arc_state(run, verbose=False)
    (run / "pert_onehot_map.pt").write_bytes((src / "pert_onehot_map.pt").read_bytes())
    ckpt_path = run / "checkpoints" / "final.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    key = next(k for k in ckpt["state_dict"] if k.startswith("pert_encoder."))
    ckpt["state_dict"][key].view(-1)[0] = float("nan")
    torch.save(ckpt, ckpt_path)
    with pytest.raises(DataError, match="the checkpoint: weights hold NaN or Inf"):
        StateTransitionModel.from_arc_state(run, verbose=False)


def test_a_path_given_as_data_says_where_it_goes(tmp_path):
    toml = tmp_path / "split.toml"
    toml.write_text('[datasets]\nd = "x.h5ad"\n[training]\nd = "train"\n')
    m = StateTransitionModel("tiny", pert_col="gene", control_pert="ctrl", progress=False)
    with pytest.raises(ConfigError, match=r"a path is not data.*fit\(None, '.*split.toml'\)"):
        m.fit(toml)
    with pytest.raises(ConfigError, match="anndata.read_h5ad"):
        m.fit(str(tmp_path / "cells.h5ad"), toml)


def test_fit_on_data_without_genes_says_so(adata):
    with pytest.raises(DataError, match=r"has no genes \(n_vars = 0\)"):
        small_model(max_steps=1).fit(adata[:, :0].copy(), SPEC)


def test_output_paths_below_a_file_are_refused_before_any_work(model, run, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="below the file"):
        model.save(tmp_path / "afile" / "model")
    with pytest.raises(ConfigError, match="is a file"):
        model.save(tmp_path / "afile")
    src = tmp_path / "in.h5ad"
    model_input = make_synthetic()
    model_input.write_h5ad(src)
    assert main(["tx", "infer", "--model-dir", str(run), "--adata", str(src), "--output",
                 str(tmp_path / "afile" / "out.h5ad")]) == 2
    assert "afile' is a file" in capsys.readouterr().err
    # a folder named like the checkpoint is said to be one (not "not found ... available")
    from conftest import FIXTURES, writable_copy

    arc = writable_copy(FIXTURES / "arc_state" / "runs" / "model_a_llama_bidir", tmp_path / "r")
    (arc / "checkpoints" / "final.ckpt").unlink()
    (arc / "checkpoints" / "final.ckpt").mkdir()
    with pytest.raises(DataError, match="final.ckpt is a folder, not a checkpoint file"):
        StateTransitionModel.from_arc_state(arc, verbose=False)


def test_output_where_nothing_can_be_written_is_refused_before_any_work(run, tmp_path, capsys,
                                                                        monkeypatch):
    """A location where no file can be created (/proc here: root may write anywhere else) is
    said at once, naming --output, not after the prediction with an HDF5 temporary file."""
    import statetx.cli

    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc (a folder where no file can be created, even as root)")
    src = tmp_path / "in.h5ad"
    make_synthetic().write_h5ad(src)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr(statetx.cli, "load_any_model", no_model)
    for out in ("/proc/statetx_out.h5ad", "/proc/statetx_missing/out.h5ad"):
        assert main(["tx", "infer", "--model-dir", str(run), "--adata", str(src), "--output",
                     out]) == 2
        assert re.search(rf"--output {out}: cannot write there \(No such file or directory",
                         last_error(capsys))
    assert main(["tx", "preprocess_train", "--adata", str(src), "--num-hvgs", "10", "--output",
                 "/proc/statetx_pp.h5ad"]) == 2
    assert "--output /proc/statetx_pp.h5ad: cannot write there" in last_error(capsys)
    assert not list(Path("/proc").glob(".statetx_*"))


@pytest.mark.parametrize("section,value", [("history", {"a": 1}), ("split_summary", {"x": 1}),
                                           ("fit", [1])])
def test_a_damaged_optional_record_in_model_json_is_named(model, tmp_path, section, value):
    model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    meta[section] = value
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"model.json is damaged"):
        StateTransitionModel.load(tmp_path / "m")


def test_a_run_record_that_is_not_a_mapping_is_ignored(run, tmp_path):
    from conftest import writable_copy

    from statetx.run import load_run

    copy = writable_copy(run, tmp_path / "run")
    (copy / "statetx_run.json").write_text("[1]")
    damaged, whole = load_run(copy, verbose=False), load_run(run, verbose=False)
    for a, b in zip(damaged.network_.parameters(), whole.network_.parameters()):
        assert torch.equal(a, b)


def test_a_pickle_from_another_version_is_named(model):
    from statetx.baselines import PerturbMeanBaseline

    state = pickle.loads(pickle.dumps(model)).__getstate__()
    assert state["_statetx_version"]
    for drop in ("seed", "columns_"):
        broken = {k: v for k, v in state.items() if k != drop}
        twin = StateTransitionModel.__new__(StateTransitionModel)
        with pytest.raises(DataError, match=rf"lacks {drop}, which statetx .* needs"):
            twin.__setstate__(broken)
    weights = dict(state["_network_state"])
    weights.pop(next(iter(weights)))
    twin = StateTransitionModel.__new__(StateTransitionModel)
    with pytest.raises(DataError, match="pickled weights do not fit"):
        twin.__setstate__({**state, "_network_state": weights})
    base = PerturbMeanBaseline(pert_col="gene", control_pert="ctrl")
    bstate = base.__getstate__()
    bstate.pop("pert_col")
    with pytest.raises(DataError, match="PerturbMeanBaseline .*lacks pert_col"):
        PerturbMeanBaseline.__new__(PerturbMeanBaseline).__setstate__(bstate)


def test_arc_runs_with_malformed_files_are_named(tmp_path):
    from conftest import FIXTURES, need, writable_copy

    src = FIXTURES / "arc_state" / "runs" / "model_a_llama_bidir"
    dims = pickle.loads(need(src / "var_dims.pkl").read_bytes())  # (our own fixture)
    cases = {
        "var_dims": lambda r: (r / "var_dims.pkl").write_bytes(pickle.dumps([1, 2, 3])),
        "yaml": lambda r: (r / "config.yaml").write_text("data:\n  kwargs: hello\n"),
        "genes": lambda r: (r / "var_dims.pkl").write_bytes(pickle.dumps(
            {**dims, "gene_names": ["G1"] * len(dims["gene_names"])})),
    }
    said = {"var_dims": "var_dims.pkl: the file should be a mapping",
            "yaml": r"config.yaml: data.kwargs should be a mapping",
            "genes": "gene names .* repeat G1"}
    for name, damage in cases.items():
        run = writable_copy(src, tmp_path / name)
        damage(run)
        with pytest.raises(DataError, match=said[name]):
            StateTransitionModel.from_arc_state(run, verbose=False, trust_pickle=True)
    run = writable_copy(src, tmp_path / "ckpt")
    ckpt = torch.load(run / "checkpoints" / "final.ckpt", weights_only=False)
    ckpt["hyper_parameters"] = "junk"
    torch.save(ckpt, run / "checkpoints" / "final.ckpt")
    with pytest.raises(DataError, match="'hyper_parameters' should be a mapping"):
        StateTransitionModel.from_arc_state(run, verbose=False)


def test_missing_feature_vectors_follow_on_missing_features(tmp_path, capsys):
    """A perturbation without a vector in pert_features: a zero vector with a warning
    (default, the reference), or an error with on_missing_features='error' (estimator and
    tx train's data.kwargs.on_missing_features)."""
    a = make_synthetic()
    feats = {"P0": np.ones(4), "P1": np.full(4, 2.0)}  # (P2 has none)
    with pytest.raises(ConfigError, match=r"on_missing_features='skip' is invalid"):
        small_model(pert_features=feats, on_missing_features="skip").fit(a, SPEC)
    with pytest.raises(DataError, match=r"1 perturbation\(s\) have no feature vector: P2"):
        small_model(pert_features=feats, on_missing_features="error").fit(a, SPEC)
    with pytest.warns(UserWarning, match="P2"):
        m = small_model(pert_features=feats, max_steps=1).fit(a, SPEC)
    np.testing.assert_array_equal(m.pert_feature_table_["P2"], np.zeros(4))
    path = tmp_path / "a.h5ad"
    a.write_h5ad(path)
    toml = tmp_path / "split.toml"
    toml.write_text(f'[datasets]\ndata = "{path}"\n{SPEC}')
    from statetx.vocab import save_pert_features

    save_pert_features(feats, tmp_path / "f.csv")
    args = ["tx", "train", *TINY_CLI, "training.max_steps=1", f"output_dir={tmp_path}",
            "name=run", f"data.kwargs.toml_config_path={toml}", "data.kwargs.pert_col=gene",
            f"data.kwargs.perturbation_features_file={tmp_path / 'f.csv'}",
            "data.kwargs.on_missing_features=error"]
    assert main(args) == 2 and not (tmp_path / "run").exists()
    assert "no feature vector: P2" in capsys.readouterr().err
