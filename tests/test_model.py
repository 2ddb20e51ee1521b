"""The estimator: fit / predict / persistence / sklearn protocol, on synthetic and real data."""

from __future__ import annotations

import pickle
import re
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from statetx import StateTransitionModel
from statetx.distributed import resolve_device
from statetx.errors import ConfigError, DataError

SMALL = {"hidden_dim": 32, "n_heads": 2, "head_dim": 16, "n_kv_heads": 2,
         "intermediate_size": 128, "n_layers": 2}
# `tx train` overrides for the same tiny network
TINY_CLI = ["model=tiny", *(f"model.kwargs.{k}={v}" for k, v in SMALL.items()),
            "model.kwargs.cell_set_len=8", "training.batch_size=4", "training.device=cpu",
            "data.kwargs.control_pert=ctrl", "data.kwargs.batch_col=batch"]
SPEC = '[training]\ndata = "train"\n[zeroshot]\n"data.CT2" = "test"\n'


def small_model(**kw) -> StateTransitionModel:
    """A tiny estimator on the CPU (exact comparisons hold on any machine; GPU tests pass
    ``device="cuda"``)."""
    opts = dict(pert_col="gene", cell_type_key="cell_type", control_pert="ctrl",
                model_kwargs=SMALL, cell_set_len=8, batch_size=4, max_steps=6, val_freq=3,
                progress=False, seed=0, device="cpu")
    opts.update(kw)
    return StateTransitionModel("tiny", **opts)


@pytest.fixture(scope="module")
def fitted():
    from conftest import make_synthetic

    adata = make_synthetic()
    return small_model().fit(adata, SPEC), adata


def test_init_only_stores_params_and_clone():
    m = small_model(lr=3e-4)
    assert not hasattr(m, "feature_names_in_")
    assert m.get_params()["lr"] == 3e-4
    c = clone(m).set_params(lr=1e-3, max_steps=2)
    assert c.lr == 1e-3 and m.lr == 3e-4
    assert not hasattr(m, "network_")
    with pytest.raises(NotFittedError):
        m.predict_sets(np.zeros((2, 4)), "P0")


def test_fit_restores_the_random_state_of_its_own_gpu_only(monkeypatch):
    """(Forking every visible GPU's state would open a CUDA context on each, in every rank.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert small_model(device="cpu")._cuda_devices() == []
    assert small_model(device="cuda:1")._cuda_devices() == [1]
    assert small_model(device="auto")._cuda_devices() == [0]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert small_model(device="auto")._cuda_devices() == [3]
    assert small_model(device="cuda:1")._cuda_devices() == [1]  # an explicit GPU stays
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # 4 processes on 2 GPUs
    assert small_model(device="cuda")._cuda_devices() == [1]
    assert resolve_device("cuda", 3) == torch.device("cuda", 1)  # the rule init_distributed uses


def test_flags_take_0_and_1(synth):
    m = small_model(max_steps=1, progress=0, drop_last=1).fit(synth, SPEC)
    assert m.history_["step"].max() == 1


def test_fit_leaves_torchs_global_random_state_alone(synth):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    small_model(max_steps=2).fit(synth, SPEC)
    assert torch.equal(torch.get_rng_state(), state)


def test_fit_returns_self_and_fitted_attributes(fitted):
    model, adata = fitted
    assert model.network_ is not None and model.vocab_.control_pert == "ctrl"
    assert model.var_names_ == list(adata.var_names)
    assert model.vocab_.perturbations == ["P0", "P1", "P2", "ctrl"]
    assert list(model.history_["step"])[-1] == 6
    assert {"train", "test"} <= set(model.split_summary_["split"])


def test_predict_preserves_obs_and_pairs_within_cell_type(fitted):
    model, adata = fitted
    sub = adata[adata.obs["cell_type"] == "CT2"].copy()
    pred = model.predict(sub)
    assert pred.shape == sub.shape
    assert (pred.obs_names == sub.obs_names).all()
    assert (pred.obs["gene"] == sub.obs["gene"]).all()
    ctrl = pred.obs["statetx_ctrl_barcode"]
    assert set(ctrl) <= set(sub.obs_names[sub.obs["gene"] == "ctrl"])
    assert list(pred.var_names) == list(adata.var_names)
    assert pred.X.min() >= 0  # expression output, clipped at 0
    again = model.predict(sub)
    np.testing.assert_array_equal(pred.X, again.X)  # seeded
    other = model.predict(sub, seed=1)
    assert not np.array_equal(pred.X, other.X)


def test_predict_sets_shapes_and_consistency(fitted):
    model, adata = fitted
    x = np.asarray(adata.X[:24]).reshape(3, 8, -1)
    out = model.predict_sets(x, ["P0", "P1", "P2"])
    assert out.shape == (3, 8, adata.n_vars)
    one = model.predict_sets(x[1, :5], "P1")  # a single set of any length
    assert one.shape == (5, adata.n_vars)
    alone = model.predict_sets(x[1], "P1")
    np.testing.assert_allclose(alone, out[1], atol=1e-5)
    onehot = np.eye(len(model.vocab_.perturbations), dtype=np.float32)
    assert model.vocab_.perturbations[:3] == ["P0", "P1", "P2"]
    np.testing.assert_allclose(model.predict_sets(x, onehot[[0, 1, 2]]), out, atol=1e-6)
    # one vector or name per cell
    np.testing.assert_allclose(model.predict_sets(x[1], onehot[[1] * 8]), out[1], atol=1e-5)
    np.testing.assert_allclose(model.predict_sets(x, [["P0"] * 8, ["P1"] * 8, ["P2"] * 8]), out,
                               atol=1e-5)


def test_predict_split_same_cells_in_pred_and_real(fitted):
    model, _ = fitted
    pred, real = model.predict_split("test")
    assert pred.shape == real.shape
    assert (pred.obs["pert_cell_barcode"] == real.obs["pert_cell_barcode"]).all()
    assert set(pred.obs["cell_type"]) == {"CT2"}
    for a in (pred, real):  # what the plots and metrics need to pair them
        info = {k: v for k, v in a.uns["statetx"].items() if k != "model_id"}
        assert info == {"split": "test", "seed": 0, "pert_col": "gene",  # the model's
                        "control_pert": "ctrl", "celltype_col": "cell_type", "scale": "log1p"}
    assert "model_id" in pred.uns["statetx"] and "model_id" not in real.uns["statetx"]
    with pytest.raises(DataError, match="no 'val' split"):
        model.predict_split("val")


def test_split_of_two_datasets_sharing_a_cell_type_name(fitted):
    """predict_split marks each cell's dataset and keeps the datasets apart in pseudobulks
    (one row per dataset, cell type and perturbation), warning about the shared name."""
    _, adata = fitted
    spec = ('[training]\na = "train"\nb = "train"\n[zeroshot]\n"a.CT2" = "test"\n'
            '"b.CT2" = "test"\n')
    b = adata[::2].copy()
    model = small_model(max_steps=2).fit({"a": adata, "b": b}, spec)
    with pytest.warns(UserWarning, match=r"'CT2' in a, b"):
        pred, _ = model.predict_split("test")
    counts = pred.obs.groupby(["dataset", "gene"], observed=True).size()
    with pytest.warns(UserWarning, match=r"'CT2' in a, b"):
        bulk, real = model.predict_split("test", pseudobulk=True)
    assert len(bulk) == len(counts) and set(bulk.obs["dataset"]) == {"a", "b"}
    got = bulk.obs.set_index(["dataset", "gene"])["n_cells"]
    assert all(got[k] == n for k, n in counts.items())
    assert (real.obs["dataset"] == bulk.obs["dataset"]).all()


def test_basal_groups_keys_pools_and_order():
    """The grouping every prediction path shares (its keys seed the basal draws): sorted
    (context, perturbation[, batch]) groups, pools by mode, fallbacks, and the seed keys."""
    from statetx.predict import basal_groups, group_key

    ctx = np.array(["B", "A", "A", "A", "A", "B", "C"], dtype=object)
    pert = np.array(["p", "ctrl", "p", "ctrl", "p", "ctrl", "p"], dtype=object)
    batch = np.array(["1", "1", "2", "2", "3", "1", "1"], dtype=object)
    rows, ctrl = np.array([0, 2, 4, 6]), np.array([1, 3, 5])
    got = basal_groups(ctx, pert, batch, rows, ctrl, ctx, batch, "batch",
                       fallback="all_controls")
    assert [g.key for g in got] == [("A", "p", "2"), ("A", "p", "3"), ("B", "p", "1"),
                                    ("C", "p", "1")]
    assert [list(g.rows) for g in got] == [[2], [4], [0], [6]]
    # same batch where the context has controls there, else the context's; C has none: all
    assert [list(g.pool) for g in got] == [[3], [1, 3], [5], [1, 3, 5]]
    assert [list(g.ctx_pool) for g in got] == [[1, 3], [1, 3], [5], [1, 3, 5]]
    assert got[0].ctx_pool is got[1].ctx_pool  # one array per context, shared by its groups
    assert group_key(*got[0].key) == "A\x00p\x002"
    assert group_key("test", 3, 7) == "test\x003\x007"
    flat = basal_groups(ctx, pert, None, rows[:3], ctrl, ctx, None, "cell_type")
    assert [g.key for g in flat] == [("A", "p"), ("B", "p")]
    assert [list(g.rows) for g in flat] == [[2, 4], [0]]
    with pytest.raises(DataError, match="context 'C' has no control cells"):
        basal_groups(ctx, pert, None, rows, ctrl, ctx, None, "cell_type")


def test_pickle_roundtrip_identical_predictions(fitted, tmp_path):
    model, adata = fitted
    assert list(model.feature_names_in_) == list(adata.var_names)  # (scikit-learn's name)
    clone_ = pickle.loads(pickle.dumps(model))
    a = model.predict(adata).X
    b = clone_.predict(adata).X
    np.testing.assert_array_equal(a, b)
    # loading leaves the caller's random state alone (the throw-away init is not drawn from it)
    path, blob = model.save(tmp_path / "m"), pickle.dumps(model)
    for load in (lambda: pickle.loads(blob), lambda: StateTransitionModel.load(path)):
        torch.manual_seed(7)
        load()
        after = torch.rand(3)
        torch.manual_seed(7)
        assert torch.equal(after, torch.rand(3))


def test_deepcopy_is_independent_and_keeps_the_split_data(fitted):
    import copy

    model, _ = fitted
    twin = copy.deepcopy(model)
    assert twin.network_ is not model.network_
    for got, want in zip(twin.predict_split("test"), model.predict_split("test")):
        np.testing.assert_array_equal(got.X, want.X)
    # predictions draw their controls with the estimator's seed unless given one
    reseeded = twin.set_params(seed=7).predict_split("test")[0]
    assert reseeded.uns["statetx"]["seed"] == 7
    np.testing.assert_array_equal(reseeded.X, model.predict_split("test", seed=7)[0].X)
    assert not np.array_equal(reseeded.X, model.predict_split("test")[0].X)
    with torch.no_grad():
        next(twin.network_.parameters()).add_(1.0)  # the original's weights are its own
    assert not torch.equal(next(twin.network_.parameters()), next(model.network_.parameters()))


def test_saved_model_keeps_feature_vectors_given_as_a_dict(fitted, tmp_path):
    """pert_features passed as a dict survive save/load as the parameter (rebuilt from the
    stored vocabulary), so a clone of the loaded model trains on the same features."""
    from sklearn.base import clone

    _, adata = fitted
    rng = np.random.default_rng(0)
    feats = {p: rng.normal(size=6).astype(np.float32) for p in ("P0", "P1", "P2", "ctrl")}
    model = small_model(max_steps=2, pert_features=feats).fit(adata, SPEC)
    loaded = StateTransitionModel.load(model.save(tmp_path / "m"))
    # (pickled, the dict is stored once, as names of the vocabulary's rows)
    unpickled = pickle.loads(pickle.dumps(model))
    for again in (loaded, unpickled):
        assert set(again.pert_features) == set(feats)
        for name, vec in feats.items():
            np.testing.assert_array_equal(again.pert_features[name], vec)
    again = clone(loaded).fit(adata, SPEC)
    assert again.network_config_.pert_dim == 6
    a, b = model.network_.state_dict(), again.network_.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("reload", ["pickle", "save"])
def test_reloaded_model_reattaches_its_in_memory_data(fitted, tmp_path, reload):
    """A model fitted on in-memory data with a TOML string keeps its split spec: after pickling
    or save/load, attach_data(adata=...) alone restores predict_split."""
    from statetx.run import attach_data

    model, adata = fitted
    if reload == "pickle":
        other = pickle.loads(pickle.dumps(model))
    else:
        other = StateTransitionModel.load(model.save(tmp_path / "m"))
    assert other.split_config_.to_toml() == model.split_config_.to_toml()
    check_is_fitted(other)  # (fitted: the missing data are a DataError, not NotFittedError)
    with pytest.raises(DataError, match="attach_data"):
        other.predict_split("test")
    attach_data(other, adata=adata)
    pred, real = model.predict_split("test", seed=3)
    pred2, real2 = other.predict_split("test", seed=3)
    np.testing.assert_array_equal(pred.X, pred2.X)
    np.testing.assert_array_equal(np.asarray(real.X), np.asarray(real2.X))
    # another spec can be given as a string too
    attach_data(other, adata=adata, toml=SPEC.replace('"test"', '"val"'))
    assert "val" in other._prepared.splits and "test" not in other._prepared.splits


def test_fine_tuning_estimator_starts_from_weights_and_pickles(fitted, tmp_path):
    """estimator_class(init_from=...): the docs' fine-tuning recipe; it starts from the given
    weights, can freeze the backbone, and pickles and clones like the plain estimator."""
    from statetx.run import estimator_class

    model, adata = fitted
    FineTuned = estimator_class(init_from=str(model.save(tmp_path / "m")), freeze_backbone=True)
    ft = FineTuned(**{**model.get_params(), "max_steps": 2})
    unfitted = pickle.loads(pickle.dumps(ft))
    assert type(unfitted) is type(ft) and unfitted.get_params() == ft.get_params()
    ft.fit(adata, SPEC)
    before = model.network_.transformer_backbone.state_dict()
    after = ft.network_.transformer_backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # loaded and frozen
    again = pickle.loads(pickle.dumps(ft))
    np.testing.assert_array_equal(again.predict(adata).X, ft.predict(adata).X)
    assert type(clone(again)) is type(ft)


def test_refit_forgets_the_earlier_run(synth, tmp_path):
    """Refitting a loaded run keeps nothing of it: no stale provenance, and the split the model
    re-attaches is the one it was refitted on."""
    from statetx.run import attach_data

    small_model(max_steps=2).fit(synth, SPEC, output_dir=tmp_path / "a")
    loaded = StateTransitionModel.load_run(tmp_path / "a")
    assert loaded.run_dir_ == tmp_path / "a" and loaded.checkpoint_path_ is not None
    loaded.fit(synth, SPEC.replace("CT2", "CT1"))
    assert not any(hasattr(loaded, k) for k in ("run_dir_", "checkpoint_path_", "step_"))
    assert "model" not in loaded.predict(synth).uns["statetx"]
    other = pickle.loads(pickle.dumps(loaded))
    attach_data(other, adata=synth)
    assert set(other.predict_split("test")[1].obs["cell_type"]) == {"CT1"}
    loaded.fit(synth, SPEC, output_dir=tmp_path / "b")
    assert loaded.run_dir_ == tmp_path / "b"


def test_resume_refuses_other_data_or_another_runs_folder(synth, tmp_path):
    """A resume continues the run it belongs to: changed data or split spec, or a folder that
    holds another run, are refused before anything is written."""
    from statetx.train import TrainingError

    kw = dict(max_steps=4, ckpt_every_n_steps=2, val_freq=2)
    small_model(**kw).fit(synth, SPEC, output_dir=tmp_path / "a")
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    scaled = synth.copy()
    scaled.X = scaled.X * 1.5
    shuffled = synth[np.random.default_rng(0).permutation(synth.n_obs)].copy()  # same cells
    relabelled = synth.copy()  # two cells of one context swap perturbations: same counts
    obs = relabelled.obs
    ct = obs["cell_type"] == obs["cell_type"].iloc[0]
    a, b = (np.flatnonzero(ct & (obs["gene"] == g))[0] for g in obs["gene"][ct].unique()[:2])
    obs.iloc[[a, b], obs.columns.get_loc("gene")] = obs["gene"].iloc[[b, a]].to_numpy()
    cases = [(scaled, SPEC, "expression values of the test split"),
             (synth, SPEC.replace("CT2", "CT1"), r"only before: .*CT2 test \(72 perturbed"),
             *((changed, SPEC, "labels, barcodes or order of the cells of the train split")
               for changed in (shuffled, relabelled))]
    for data, spec, match in cases:
        with pytest.raises(TrainingError, match="training data differ from the run's.*" + match):
            small_model(**{**kw, "max_steps": 6}).fit(data, spec, output_dir=tmp_path / "a",
                                                      resume_from=last)
        assert last.read_bytes() == before
    small_model(**kw).fit(synth, SPEC, output_dir=tmp_path / "b")
    with pytest.raises(ConfigError, match=r"holds the checkpoints of another run.*nothing"):
        small_model(**{**kw, "max_steps": 6}).fit(synth, SPEC, output_dir=tmp_path / "b",
                                                  resume_from=last)
    m = small_model(**{**kw, "max_steps": 6}).fit(synth, SPEC, output_dir=tmp_path / "c",
                                                  resume_from=last)  # a new folder: fine
    assert m.history_["step"].max() == 6


def test_resume_accepts_the_same_cells_from_a_file_or_in_memory_and_another_dtype(
        synth, tmp_path):
    path = tmp_path / "data.h5ad"
    synth.write_h5ad(path)
    kw = dict(max_steps=4, ckpt_every_n_steps=2, val_freq=2)
    small_model(**kw).fit(None, f'[datasets]\ndata = "{path}"\n' + SPEC,
                          output_dir=tmp_path / "a")
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    m = small_model(**{**kw, "max_steps": 6}).fit(synth, SPEC, output_dir=tmp_path / "a",
                                                  resume_from=last)
    assert m.history_["step"].max() == 6
    with pytest.warns(UserWarning, match="changed settings: dtype: 'float32' -> 'float16'"):
        m = small_model(**{**kw, "max_steps": 8, "dtype": "float16"}).fit(
            synth, SPEC, output_dir=tmp_path / "a", resume_from=last)
    assert m.history_["step"].max() == 8
    # a changed split is refused unless forced
    other = SPEC.replace("CT2", "CT1")
    m = small_model(**{**kw, "max_steps": 10, "dtype": "float16"}).fit(
        synth, other, output_dir=tmp_path / "a", resume_from=last, force_resume=True)
    assert m.history_["step"].max() == 10


def test_device_is_where_the_network_is(fitted, tmp_path):
    """device_ was set by fit only: dropped by pickling, absent after load, and left as it was
    by to(); it is now read from the network."""
    model, _ = fitted
    cpu = torch.device("cpu")
    assert model.device_ == cpu and model.to("cpu").device_ == cpu
    for other in (pickle.loads(pickle.dumps(model)),
                  StateTransitionModel.load(model.save(tmp_path / "m"))):
        assert other.device_ == cpu
    moved = pickle.loads(pickle.dumps(model))
    moved.network_.to("meta")  # (a device without data: the CPU alone tells nothing)
    assert moved.device_ == torch.device("meta")
    assert not hasattr(small_model(), "device_")


def test_save_load_roundtrip(fitted, tmp_path):
    model, adata = fitted
    model.save(tmp_path / "m")
    loaded = StateTransitionModel.load(tmp_path / "m")
    np.testing.assert_array_equal(model.predict(adata).X, loaded.predict(adata).X)
    assert loaded.get_params() == model.get_params()
    # what fit resolved and measured is kept too
    assert (loaded.preset_, loaded.train_settings_, loaded.best_step_) == (
        model.preset_, model.train_settings_, model.best_step_)
    pd.testing.assert_frame_equal(loaded.split_summary_, model.split_summary_, check_dtype=False)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="could not read"):
        StateTransitionModel.load(tmp_path / "m")


@pytest.fixture
def synth_embedding():
    from conftest import make_synthetic

    adata = make_synthetic()
    x = np.asarray(adata.X, dtype=np.float64)
    u, sv, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    adata.obsm["X_pca"] = (u[:, :8] * sv[:8]).astype(np.float32)  # negative values, as PCA
    return adata


def test_decoder_options_without_gene_targets_are_said_to_do_nothing(synth):
    a = synth.copy()
    a.obsm["X_hvg"] = a.X.copy()
    m = small_model(max_steps=1, embed_key="X_hvg", output_space="gene",
                    model_kwargs={**SMALL, "gene_decoder_bool": True, "decoder_dropout": 0.3})
    with pytest.warns(UserWarning, match=r"gene_decoder_bool, decoder_dropout have no effect "
                                         r"here.*embed_key='X_hvg', output_space='gene'"):
        m.fit(a, SPEC)
    assert m.network_.gene_decoder is None


def test_embedding_input_with_log1p_gene_output(synth_embedding):
    """output_space='all' checks the scale of X (its target), not of the embedding input."""
    model = small_model(embed_key="X_pca", output_space="all", max_steps=2)
    model.fit(synth_embedding, SPEC)
    assert model.is_log1p_
    raw = synth_embedding.copy()
    raw.X = np.round(np.expm1(raw.X) * 40)
    with pytest.raises(DataError, match=r"expects log1p-normalised X, but X of.*allow_counts"):
        small_model(embed_key="X_pca", output_space="all", max_steps=2).fit(raw, SPEC)
    counts = small_model(embed_key="X_pca", output_space="all", max_steps=2, allow_counts=True)
    assert not counts.fit(raw, SPEC).is_log1p_  # (the override, data.md §2)


@pytest.mark.parametrize("loading", ["memory", "stream"])
def test_bad_gene_space_targets_and_negative_embeddings(synth_embedding, loading):
    """The gene-space target (X, with an embedding input) is checked for NaN in memory as when
    streamed; an embedding's negative values are not warned about either way."""
    opts = dict(embed_key="X_pca", output_space="all", max_steps=1, data_loading=loading,
                model_kwargs={**SMALL, "gene_decoder_bool": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*padding")
        small_model(**opts).fit(synth_embedding, SPEC)
    bad = synth_embedding.copy()
    row = int(np.flatnonzero((bad.obs["cell_type"] != "CT2").to_numpy())[0])
    bad.X[row, 3] = np.nan
    with pytest.raises(DataError, match=r"NaN or Inf (gene-space target )?values"):
        small_model(**opts).fit(bad, SPEC)


def test_perturbations_without_training_cells_are_flagged(synth, tmp_path):
    """A perturbation held out in every cell type was never trained: predict, predict_split and
    a reloaded model say so; trained ones do not warn."""
    from statetx.metrics import evaluate

    held = {"test": ["P0"]}
    spec = {"training": {"data": "train"},
            "fewshot": {f"data.CT{i}": held for i in range(3)}}
    model = small_model(max_steps=2).fit(synth, spec)
    assert model.trained_perturbations_ == ["P1", "P2"]
    with pytest.warns(UserWarning, match=r"1 perturbation\(s\) of the test split had no "
                                         "training cells: P0"):
        split_pred, split_real = model.predict_split("test")
    # recorded with the prediction (in the file too): evaluate says P0's metrics are no model's
    assert list(split_pred.uns["statetx"]["untrained_perturbations"]) == ["P0"]
    split_pred.write_h5ad(tmp_path / "pred.h5ad")
    with pytest.warns(UserWarning, match=r"pred records 1 perturbation\(s\) predicted without "
                                         r"training cells: P0\. .*context_mean"):
        evaluate(tmp_path / "pred.h5ad", split_real, profile="minimal")
    trained = model.predict(synth[synth.obs["gene"] != "P0"].copy())
    assert "untrained_perturbations" not in trained.uns["statetx"]
    loaded = StateTransitionModel.load(model.save(tmp_path / "m"))
    assert loaded.trained_perturbations_ == ["P1", "P2"]
    with pytest.warns(UserWarning, match="of the input had no training cells: P0.*predicted "
                                         "as the control"):
        pred = loaded.predict(synth)
    with pytest.warns(UserWarning, match="of the input had no training cells: P0.*not learned"):
        as_is = loaded.predict(synth, untrained_perturbation="as_is")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded.predict(synth[synth.obs["gene"] != "P0"].copy())
    # P0's cells ran as control sets (its embedding is the random start); the rest as before
    p0 = (synth.obs["gene"] == "P0").to_numpy()
    np.testing.assert_array_equal(pred.X[~p0], as_is.X[~p0])
    assert not np.array_equal(pred.X[p0], as_is.X[p0])
    sets = pred.obs["statetx_set"].to_numpy()
    for sid in np.unique(sets[p0]):
        rows = np.flatnonzero(sets == sid)
        basal = synth[pred.obs["statetx_ctrl_barcode"].to_numpy()[rows]].X
        expect = np.clip(loaded.predict_sets(basal, "ctrl"), 0, 14)
        np.testing.assert_allclose(pred.X[rows], expect, atol=1e-5)
    with pytest.raises(ConfigError, match="untrained_perturbation='zero'.*'as_is'"):
        loaded.predict(synth, untrained_perturbation="zero")
    # without control targets the control's embedding did not train either: nothing to route to
    no_ctrl = small_model(max_steps=2, yield_controls=False).fit(synth, spec)
    with pytest.warns(UserWarning, match=r"nor was the control's \(yield_controls=False"):
        kept = no_ctrl.predict(synth)
    np.testing.assert_array_equal(kept.X, no_ctrl.predict(synth, untrained_perturbation="as_is").X)
    with pytest.raises(ConfigError, match="untrained_perturbation='zero'.*'as_is'"):
        model.predict_split("test", untrained_perturbation="zero")


def test_prediction_keeps_the_input_gene_annotations(fitted):
    model, adata = fitted
    a = adata[:, ::-1].copy()  # other gene order
    a.var["gene_id"] = [f"ENSG{i:05d}" for i in range(a.n_vars)]
    a.var["highly_variable"] = np.arange(a.n_vars) % 2 == 0
    out = model.predict(a)
    assert list(out.var_names) == list(model.var_names_)
    pd.testing.assert_frame_equal(out.var, a.var.loc[model.var_names_], check_names=False)
    b = a[:, 1:].copy()  # a gene filled with zeros: no annotation to take (missing values)
    filled = model.predict(b, missing_genes="zero").var
    assert list(filled.columns) == ["gene_id", "highly_variable"]
    assert filled.loc[a.var_names[0]].isna().all() and filled.iloc[:, 0].notna().sum() == b.n_vars


def test_prediction_with_filled_genes_writes_and_reads_back(fitted, tmp_path):
    """missing_genes='zero' keeps var columns in types anndata writes: float columns with NaN
    (preprocess_train / scanpy HVG output) once became pandas' Float64, which it cannot write."""
    model, adata = fitted
    a = adata[:, 1:].copy()
    a.var["means"] = np.linspace(0.0, 1.0, a.n_vars)
    a.var["dispersions_norm"] = np.where(np.arange(a.n_vars) % 3 == 0, np.nan, 1.0)
    a.var["n_cells"] = np.arange(a.n_vars)
    a.var["highly_variable"] = np.arange(a.n_vars) % 2 == 0
    a.var["symbol"] = [f"S{i}" for i in range(a.n_vars)]
    out = model.predict(a, missing_genes="zero")
    assert out.var["means"].dtype == np.float64 and out.var["dispersions_norm"].dtype == np.float64
    out.write_h5ad(tmp_path / "pred.h5ad")
    back = ad.read_h5ad(tmp_path / "pred.h5ad")
    missing = adata.var_names[0]
    assert back.var.loc[missing].isna().all()
    np.testing.assert_allclose(back.var.loc[a.var_names, "means"], a.var["means"])
    assert back.var.loc[a.var_names, "n_cells"].tolist() == list(range(a.n_vars))
    assert (back.var.loc[a.var_names, "highly_variable"].tolist()
            == a.var["highly_variable"].tolist())


def test_input_normalised_to_another_total_is_flagged(synth, tmp_path):
    """preprocess_train records the counts per cell it normalised to; a model remembers the
    training data's and warns when the input was normalised to another total."""
    a = synth.copy()
    a.uns["statetx_preprocess"] = {"target_sum": 1000.0}
    model = small_model(max_steps=1).fit(a, SPEC)
    assert model.target_sum_ == 1000.0
    b = a.copy()
    b.uns["statetx_preprocess"] = {"target_sum": 500.0}
    loaded = StateTransitionModel.load(model.save(tmp_path / "m"))
    with pytest.warns(UserWarning, match=r"normalised to 500 counts per cell .* training data to "
                                         r"1,000.*log\(0.5\) = -0.69.*target_sum=1000"):
        loaded.predict(b)
    c = a.copy()  # preprocessed apart with the default (median) total: a few % off is fine
    c.uns["statetx_preprocess"] = {"target_sum": 1030.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded.predict(a)
        loaded.predict(c)
        model.predict(synth)  # nothing recorded: nothing to compare


def test_batch_paired_model_on_input_without_batches(synth):
    model = small_model(batch_col="batch", max_steps=2).fit(synth, SPEC)
    bare = synth.copy()
    del bare.obs["batch"]
    with pytest.raises(DataError, match=r"no obs column 'batch'.*basal_pool='cell_type'"):
        model.predict(bare)
    out = model.predict(bare, basal_pool="cell_type")
    assert out.n_obs == bare.n_obs and out.uns["statetx"]["basal_pool"] == "cell_type"


def test_score_is_a_correlation(fitted):
    model, adata = fitted
    s = model.score(adata[adata.obs["cell_type"] == "CT2"].copy())
    assert -1.0 <= s <= 1.0
    with pytest.raises(ConfigError, match="predict_controls cannot be set"):
        model.score(adata, predict_controls=True)
    with pytest.raises(ConfigError, match="options that add cells"):  # clones are not scored
        model.score(adata, min_cells=100)


def test_gene_mismatch_lists_missing_genes(fitted, tmp_path):
    model, adata = fitted
    sub = adata[:, 3:].copy()
    sub.var["symbol"] = [f"S{name}" for name in sub.var_names]
    with pytest.raises(DataError, match="3 of the model's 32 genes are missing.*G0, G1, G2"):
        model.predict(sub)
    with pytest.warns(UserWarning, match="3 of 32 model genes are missing.*filled with 0: "
                                         "G0") as said:
        filled = model.predict(sub, missing_genes="zero")
    assert [w.filename for w in said if "filled with 0" in str(w.message)] == [__file__]
    assert filled.n_vars == 32  # (the input's gene annotations kept; missing for the 3)
    assert filled.var["symbol"].isna().sum() == 3
    assert filled.var.loc["G5", "symbol"] == "SG5"
    sub.var["highly_variable"] = True  # (a bool column with missing values still writes)
    with pytest.warns(UserWarning, match="3 of 32 model genes are missing"):
        zero = model.predict(sub, missing_genes="zero")
    assert zero.var["highly_variable"].isna().sum() == 3
    zero.write_h5ad(tmp_path / "zero.h5ad")
    reordered = adata[:, ::-1].copy()  # order fixed by name
    np.testing.assert_allclose(model.predict(reordered).X, model.predict(adata).X, atol=1e-6)


def test_counts_input_is_detected(fitted):
    model, adata = fitted
    counts = adata.copy()
    counts.X = np.round(np.expm1(counts.X) * 40)
    with pytest.raises(DataError, match="raw counts"):
        model.predict(counts)


def test_unknown_perturbation_is_an_error(fitted):
    model, adata = fitted
    sub = adata.copy()
    sub.obs["gene"] = sub.obs["gene"].astype(str)
    sub.obs.iloc[-1, sub.obs.columns.get_loc("gene")] = "NOVEL"
    with pytest.raises(DataError, match=r"NOVEL \(1 cells\).*'unassigned' guides\) should be "
                                        r"dropped first.*unknown_perturbation='control'"):
        model.predict(sub)
    assert model.predict(sub, unknown_perturbation="control").n_obs == sub.n_obs


def test_all_perts_simulates_every_perturbation(fitted):
    model, adata = fitted
    ctrl = adata[adata.obs["gene"] == "ctrl"].copy()
    ctrl.uns["log1p"] = {"base": None}  # a virtual experiment keeps the input's uns
    out = model.predict(ctrl, all_perts=True, n_cells_per_pert=5)
    n_ct = ctrl.obs["cell_type"].nunique()
    assert out.n_obs == ctrl.n_obs + n_ct * 3 * 5
    assert set(out.obs["gene"]) == {"ctrl", "P0", "P1", "P2"}
    assert out.uns["log1p"] == {"base": None} and "statetx" in out.uns


def test_training_reduces_loss_on_synthetic():
    from conftest import make_synthetic

    adata = make_synthetic(seed=3)
    m = small_model(max_steps=80, val_freq=1, lr=2e-3,
                    model_kwargs={**SMALL, "dropout": 0.0}).fit(adata, SPEC)
    h = m.history_.dropna(subset=["train_loss_eval"])
    assert h["train_loss_eval"].iloc[-1] < 0.6 * h["train_loss_eval"].iloc[0]


def test_weight_decay_is_applied(synth):
    a = small_model(max_steps=3, weight_decay=0.0, optimizer="adamw", lr=0.0).fit(synth)
    b = small_model(max_steps=3, weight_decay=0.5, optimizer="adamw", lr=0.0).fit(synth)
    wa = a.network_.basal_encoder.weight
    wb = b.network_.basal_encoder.weight
    assert torch.equal(wa, wb)  # lr 0: weight decay of AdamW scales with lr, nothing moves
    c = small_model(max_steps=3, weight_decay=0.5, optimizer="adamw", lr=1e-2).fit(synth)
    d = small_model(max_steps=3, weight_decay=0.0, optimizer="adamw", lr=1e-2).fit(synth)
    assert c.network_.basal_encoder.weight.norm() < d.network_.basal_encoder.weight.norm()


@pytest.mark.slow
def test_kang_heldout_b_cells_end_to_end(kang_log):
    spec = '[training]\nkang = "train"\n[zeroshot]\n"kang.B cells" = "test"\n'
    m = StateTransitionModel("tiny", pert_col="target_gene", cell_type_key="cell_type",
                             batch_col="batch", control_pert="control", max_steps=30,
                             batch_size=4, val_freq=30, progress=False)
    m.fit(kang_log, spec)
    b = kang_log[kang_log.obs["cell_type"] == "B cells"].copy()
    pred = m.predict(b)
    assert pred.n_obs == b.n_obs and (pred.obs_names == b.obs_names).all()
    assert list(pred.obs.columns[: b.obs.shape[1]]) == list(b.obs.columns)


def test_auto_preset_and_training_defaults(synth):
    m = StateTransitionModel(pert_col="gene", cell_type_key="cell_type", control_pert="ctrl",
                             max_steps=2, progress=False, model_kwargs=SMALL)
    assert m.get_params()["preset"] == "auto"
    m.fit(synth)
    assert m.preset_ == "small"
    assert m.train_settings_ == {"batch_size": 8, "max_steps": 2, "lr": 1e-3,
                                 "val_freq": 1,
                                 "weight_averaging": "uniform", "pairing": "random",
                                 "yield_controls": True}
    assert m.network_config_.residual_space == "input" and m.network_config_.dropout == 0.0
    auto = StateTransitionModel()
    assert auto._resolve_preset(50_000) == "small" and auto._resolve_preset(10**6) == "state_sm"
    steps = auto._training_defaults("small", 10_000, 64)["max_steps"]
    assert steps == round(100 * 10_000 / (8 * 64))
    small = auto._training_defaults("small", 100, 64)
    assert (small["max_steps"], small["val_freq"]) == (300, 30)
    assert auto._training_defaults("state_sm", 10**6, 128) == {
        "batch_size": 16, "max_steps": 40_000, "lr": 1e-4, "val_freq": 2000,
        "weight_averaging": "none",
        "pairing": "random", "yield_controls": True}
    given = StateTransitionModel(max_steps=100, val_freq=7)._training_defaults("small", 100, 64)
    assert given["val_freq"] == 7


def test_a_checkpoint_from_before_the_val_freq_default_still_resumes():
    """Runs written when val_freq defaulted to 2,000 record it; the new default (None) is no
    change a resume refuses or warns about (val_freq only schedules validation)."""
    from statetx._utils import changed_params

    before = {"params": {"val_freq": 2000, "lr": 1e-3}}
    assert changed_params(before, {"params": {"val_freq": None, "lr": 1e-3}}) == []
    assert changed_params(before, {"params": {"val_freq": None, "lr": 1e-4}}) == [
        "lr: 0.001 -> 0.0001"]


def test_default_val_freq_validates_a_short_run_several_times(synth):
    """Left unset, val_freq is a tenth of max_steps (the reference's 2,000 would validate a
    300-3,000-step ``small`` run only at its end: best.ckpt = the last weights)."""
    m = StateTransitionModel("tiny", pert_col="gene", cell_type_key="cell_type",
                             control_pert="ctrl", model_kwargs=SMALL, cell_set_len=8,
                             batch_size=4, max_steps=20, progress=False, seed=0)
    spec = '[training]\ndata = "train"\n[zeroshot]\n"data.CT1" = "val"\n"data.CT2" = "test"\n'
    m.fit(synth, spec)
    assert m.train_settings_["val_freq"] == 2
    val = m.history_.dropna(subset=["val_loss"])
    assert list(val["step"]) == list(range(2, 21, 2))


def test_sets_per_pass_changes_memory_not_results(fitted):
    model, adata = fitted
    np.testing.assert_allclose(model.predict(adata, sets_per_pass=1).X, model.predict(adata).X,
                               rtol=1e-5, atol=1e-6)


def test_simulate_virtual_experiments(fitted, tmp_path):
    model, adata = fitted
    controls = adata[adata.obs["gene"] == "ctrl"].copy()
    n_ctx = controls.obs["cell_type"].nunique()
    every = model.simulate(controls)  # every known perturbation, as many as the controls
    counts = every.obs["gene"].value_counts()
    perts = [p for p in model.vocab_.perturbations if p != "ctrl"]
    assert set(counts.index) == {"ctrl", *perts}
    assert all(counts[p] == controls.n_obs for p in perts)
    assert every.obs_names.is_unique and list(every.obs_names[:controls.n_obs]) == list(
        controls.obs_names)
    controls.var["note"] = [f"g{i}" for i in range(controls.n_vars)]
    controls.uns["study"] = "synthetic"
    kept = model.simulate(controls, ["P1"], n_cells=1)
    assert list(kept.var["note"]) == list(controls.var.loc[kept.var_names, "note"])
    assert kept.uns["study"] == "synthetic" and "statetx" in kept.uns
    controls.uns["pca"] = {"variance": np.arange(3.0)}  # (the output's uns is its own copy)
    own = model.simulate(controls, ["P1"], n_cells=1)
    own.uns["pca"]["variance"][0] = 99.0
    assert controls.uns["pca"]["variance"][0] == 0.0
    some = model.simulate(controls, ["P1"], n_cells=5, seed=3)
    assert some.obs["gene"].value_counts().to_dict() == {"ctrl": controls.n_obs, "P1": 5 * n_ctx}
    # the same cells as predict(all_perts=True) with the same options
    same = model.predict(controls, all_perts=True, perturbations=["P1"], n_cells_per_pert=5,
                         seed=3)
    np.testing.assert_array_equal(some.X, same.X)
    table = pd.DataFrame({"perturbation": ["P0", "P2"], "num_cells": [2, 1]})
    by_table = model.simulate(controls, tsv=table)
    assert by_table.obs["gene"].value_counts().to_dict() == {
        "ctrl": controls.n_obs, "P0": 2 * n_ctx, "P2": n_ctx}
    # a clone keeps its context's columns; the control's own annotations are left empty
    # (not copied: a virtual P1 cell is no control), with their types, and it writes; a flag
    # of the control cells says False (a constant flag of another name says nothing)
    controls.obs["is_control"] = True
    controls.obs["passed_qc"] = True
    controls.obs["condition"] = pd.Categorical(["ctrl"] * controls.n_obs)
    controls.obs["n_genes"] = 2**60 + np.arange(controls.n_obs)  # (exact: no float detour)
    sim = model.simulate(controls, ["P1"], n_cells=2)
    virtual = sim.obs.iloc[controls.n_obs:]
    assert virtual[["passed_qc", "condition", "n_genes"]].isna().all().all()
    assert sim.obs["passed_qc"].dtype == "boolean" and sim.obs["n_genes"].dtype == "Int64"
    assert sim.obs["is_control"].dtype == bool and not virtual["is_control"].any()
    assert len(sim[~sim.obs["is_control"]]) == len(virtual)
    mixed = adata.copy()  # (controls and perturbed cells: any flag of the controls counts)
    mixed.obs["perturbed"] = (mixed.obs["gene"] != "ctrl").to_numpy()
    out = model.simulate(mixed, ["P1"], n_cells=1)
    assert out.obs["perturbed"].dtype == bool and out.obs["perturbed"].iloc[mixed.n_obs:].all()
    assert (sim.obs["n_genes"].iloc[:controls.n_obs].to_numpy()
            == controls.obs["n_genes"].to_numpy()).all()
    assert list(sim.obs["condition"].cat.categories) == ["ctrl"]
    assert (sim.obs["is_control"].iloc[:controls.n_obs] == True).all()  # noqa: E712
    assert (virtual["cell_type"].to_numpy() == controls[virtual["statetx_ctrl_barcode"]]
            .obs["cell_type"].to_numpy()).all() and set(virtual["gene"]) == {"P1"}
    sim.write_h5ad(tmp_path / "sim.h5ad")
    with pytest.raises(DataError, match="not in the model's vocabulary.*P9"):
        model.simulate(controls, ["P9"])
    with pytest.raises(ConfigError, match="n_cells is given twice: .*perturbations mapping"):
        model.simulate(controls, {"P0": 2}, n_cells=5)
    with pytest.raises(ConfigError, match="n_cells is given twice: .*tsv"):
        model.simulate(controls, tsv=table, n_cells=5)
    # table rows of one perturbation add up; a count of 0 is allowed
    dup = pd.DataFrame({"perturbation": ["P0", "P0", "P2"], "num_cells": [1, 2, 0]})
    assert model.simulate(controls, tsv=dup).obs["gene"].value_counts().to_dict() == {
        "ctrl": controls.n_obs, "P0": 3 * n_ctx}
    with pytest.raises(Exception, match="count for each of the perturbations"):
        model.predict(controls, all_perts=True, perturbations=["P0", "P1"],
                      n_cells_per_pert={"P0": 2})


def test_prediction_provenance_is_written_with_the_output(fitted, tmp_path):
    import statetx

    model, adata = fitted
    pred = model.predict(adata, seed=5)
    info = pred.uns["statetx"]
    assert info["version"] == statetx.__version__ and info["seed"] == 5
    assert info["attention"] == model.network_config_.attention
    assert info["matmul_precision"] == "highest"
    pred.write_h5ad(tmp_path / "p.h5ad")  # every value is h5ad-writable


def test_predict_split_without_a_decoder_compares_in_the_prediction_space():
    """output_space="all" with X_hvg input and a preset without gene decoder (tiny): the real
    cells are given in the space of the prediction (X_hvg), not all of X's genes."""
    from conftest import make_synthetic

    adata = make_synthetic()
    adata.obsm["X_hvg"] = np.asarray(adata.X[:, :10], dtype=np.float32)
    model = small_model(embed_key="X_hvg", output_space="all", max_steps=2).fit(adata, SPEC)
    assert model.network_.gene_decoder is None
    pred, real = model.predict_split("test")
    assert pred.shape == real.shape == (pred.n_obs, 10)
    assert list(pred.var_names) == list(real.var_names)


def test_min_and_max_cells_per_group(fitted):
    model, adata = fitted
    sizes = lambda out: out.obs.groupby(["cell_type", "gene"], observed=True).size()  # noqa: E731
    n_in = sizes(adata)
    out = model.predict(adata, min_cells=40, max_cells=50, seed=3)
    got = sizes(out)
    for (ct, g), n in n_in.items():
        want = n if g == "ctrl" else min(max(n, 40), 50)
        assert got[(ct, g)] == want
    assert out.obs_names.is_unique
    kept = out.obs_names[out.obs_names.isin(adata.obs_names)]
    assert list(kept) == [c for c in adata.obs_names if c in set(kept)]  # input order kept
    again = model.predict(adata, min_cells=40, max_cells=50, seed=3)
    np.testing.assert_array_equal(out.X, again.X)
    controls = adata[adata.obs["gene"] == "ctrl"].copy()
    sim = model.simulate(controls, ["P1"], n_cells=3, min_cells=5)
    assert (sizes(sim).xs("P1", level="gene") == 5).all()
    with pytest.raises(Exception, match="min_cells=9 is above max_cells=2"):
        model.predict(adata, min_cells=9, max_cells=2)


def _train_cli(adata, tmp_path, *extra: str) -> dict:
    """``tx train`` (tiny, 2 steps) on ``adata`` written with the SPEC split into
    ``tmp_path/run``; returns the run's estimator parameters."""
    from statetx.cli import main
    from statetx.run import load_run

    data = tmp_path / "data"
    data.mkdir()
    adata.write_h5ad(data / "data.h5ad")
    (data / "split.toml").write_text(f'[datasets]\ndata = "{data}"\n{SPEC}')
    assert main(["tx", "train", f"data.kwargs.toml_config_path={data / 'split.toml'}",
                 "data.kwargs.pert_col=gene", *TINY_CLI, "training.max_steps=2",
                 f"output_dir={tmp_path}", "name=run", *extra]) == 0
    return load_run(tmp_path / "run").get_params()


def test_sampler_options_reach_training(synth, tmp_path):
    """downsample_cells / drop_last / exclude_self: estimator parameters and `tx train` keys."""
    from statetx.errors import ConfigError

    def epochs(**kw) -> int:
        m = small_model(max_steps=12, val_freq=100, **kw).fit(synth)
        return int(m.history_["epoch"].max())

    full, capped = epochs(), epochs(downsample_cells=8)
    assert capped > full  # one set per group: epochs are shorter
    assert epochs(drop_last=True, exclude_self=True) >= full
    with pytest.raises(ConfigError, match="downsample_cells=0"):
        small_model(downsample_cells=0).fit(synth)
    params = _train_cli(synth, tmp_path, "data.kwargs.downsample_cells=8",
                        "data.kwargs.drop_last=true", "data.kwargs.exclude_self=true")
    assert (params["downsample_cells"], params["drop_last"], params["exclude_self"]) == (
        8, True, True)


def test_additional_obs_reach_predict_split(synth, tmp_path):
    """additional_obs: obs columns of the training data in predict_split's outputs (and tx
    predict's files), matched to each cell by barcode; checked at fit."""
    from statetx.cli import main
    from statetx.errors import ConfigError, DataError

    synth.obs["dose"] = np.random.default_rng(0).integers(0, 5, synth.n_obs)
    synth.obs["plate"] = pd.Categorical([f"p{i % 3}" for i in range(synth.n_obs)])
    synth.obs["flag"] = pd.array([None if i % 7 == 0 else i % 2 == 0
                                  for i in range(synth.n_obs)], dtype="boolean")
    synth.var["symbol"] = [f"SYM{i}" for i in range(synth.n_vars)]
    m = small_model(max_steps=2, additional_obs=["dose", "plate", "flag"]).fit(synth, SPEC)
    pred, real = m.predict_split("test")
    src = synth.obs.loc[pred.obs["pert_cell_barcode"]]
    for a in (pred, real):  # the training data's gene annotations
        assert list(a.var["symbol"]) == list(synth.var.loc[a.var_names, "symbol"])
    bulk, _ = m.predict_split("test", pseudobulk=True)
    assert list(bulk.var["symbol"]) == list(pred.var["symbol"])
    # more columns for one call (a model's own column named again is kept once)
    synth.obs["obs_only"] = np.arange(synth.n_obs)
    m2 = small_model(max_steps=2, additional_obs=["dose"]).fit(synth, SPEC)
    p2, r2 = m2.predict_split("test", additional_obs=["obs_only", "dose"])
    assert list(p2.obs.columns[-2:]) == ["dose", "obs_only"]
    np.testing.assert_array_equal(r2.obs["obs_only"].to_numpy(), synth.obs.loc[
        r2.obs["pert_cell_barcode"], "obs_only"].to_numpy())
    with pytest.raises(ConfigError, match="'gene' is written to the outputs already"):
        m2.predict_split("test", additional_obs=["gene"])
    with pytest.raises(ConfigError, match="pseudobulk rows are groups of cells"):
        m2.predict_split("test", additional_obs=["obs_only"], pseudobulk=True)
    np.testing.assert_array_equal(pred.obs["dose"].to_numpy(), src["dose"].to_numpy())
    np.testing.assert_array_equal(real.obs["plate"].to_numpy(), src["plate"].to_numpy())
    assert isinstance(pred.obs["plate"].dtype, pd.CategoricalDtype)  # dtypes kept
    assert pred.obs["flag"].dtype == "boolean" and pred.obs["flag"].isna().any()
    pd.testing.assert_series_equal(pred.obs["flag"].reset_index(drop=True),
                                   src["flag"].reset_index(drop=True))
    for bad, match in (("dose", r"must be a list of obs column names \(write \['dose'\]\)"),
                       (["dose", "dose"], "'dose' listed twice"),
                       (["cell_type"], "'cell_type' is written to the outputs already")):
        with pytest.raises(ConfigError, match=match):
            small_model(additional_obs=bad).fit(synth, SPEC)
    with pytest.raises(DataError, match=r"additional_obs: obs column\(s\) 'dos' not found.*"
                       "Did you mean: 'dose'"):
        small_model(additional_obs=["dos"]).fit(synth, SPEC)
    _train_cli(synth, tmp_path, "data.kwargs.additional_obs=[plate,flag]")
    assert main(["tx", "predict", "--output-dir", str(tmp_path / "run"), "--predict-only"]) == 0
    import anndata as ad

    out = ad.read_h5ad(tmp_path / "run" / "eval_final.ckpt" / "adata_pred.h5ad")
    np.testing.assert_array_equal(out.obs["plate"].astype(str).to_numpy(), synth.obs.loc[
        out.obs["pert_cell_barcode"], "plate"].to_numpy())


def test_read_depth_pad_from_and_val_from_test(synth, tmp_path, capsys):
    """downsample (read depth), pad_from and val_from_test: estimator parameters and keys."""
    from statetx.errors import ConfigError

    spec = {"training": {"data": "train"}, "zeroshot": {"data.CT2": "test"}}
    plain = small_model(max_steps=4, val_freq=2).fit(synth, spec)
    assert "val_loss" not in plain.history_  # no validation part: skipped
    thinned = small_model(max_steps=4, val_freq=2, downsample=0.5, pad_from="chunk",
                          val_from_test=True, progress=True).fit(synth, spec)
    assert "validating on the test split" in capsys.readouterr().out
    assert thinned.history_["val_loss"].notna().sum() == 2  # validated on the test cells
    assert not np.allclose(thinned.history_["train_loss"].dropna(),
                           plain.history_["train_loss"].dropna())
    again = small_model(max_steps=4, val_freq=2, downsample=0.5, pad_from="chunk",
                        val_from_test=True).fit(synth, spec)
    np.testing.assert_array_equal(again.history_["train_loss"], thinned.history_["train_loss"])
    with pytest.raises(ConfigError, match="downsample=0.5 thins counts read from X.*embed_key"):
        small_model(downsample=0.5, embed_key="X_pca", output_space="embedding").fit(synth)
    with pytest.raises(ConfigError, match="pad_from='first'"):
        small_model(pad_from="first").fit(synth)
    params = _train_cli(synth, tmp_path, "data.kwargs.downsample=0.5",
                        "data.kwargs.pad_from=chunk", "data.kwargs.val_from_test=true")
    assert (params["downsample"], params["pad_from"], params["val_from_test"]) == (
        0.5, "chunk", True)


def _cell_means(adata, c, key=None):
    """(pert, cell type) -> mean row of X (or obsm[key]) and cell count."""
    groups = adata.obs.groupby([c.pert_col, c.cell_type_key], observed=True).indices
    x = adata.X if key is None else adata.obsm[key]
    return {k: (np.asarray(x[i]).mean(0), len(i)) for k, i in groups.items()}


@pytest.mark.parametrize("decoder", [False, True])
def test_predict_split_pseudobulk_equals_cell_means(fitted, synth_embedding, decoder):
    if decoder:  # embedding in, genes out: X = decoded genes, obsm = latent predictions
        model = small_model(embed_key="X_pca", output_space="all", max_steps=2,
                            model_kwargs={**SMALL, "gene_decoder_bool": True})
        model.fit(synth_embedding, SPEC)
        assert model.network_.gene_decoder is not None
    else:
        model = fitted[0]
    c = model.columns_
    pred, real = model.predict_split("test", seed=3)
    pb_pred, pb_real = model.predict_split("test", seed=3, pseudobulk=True)
    assert pb_pred.n_obs == pb_real.n_obs == len(_cell_means(pred, c))
    assert list(pb_pred.var_names) == list(pred.var_names)
    for cells, pb in ((pred, pb_pred), (real, pb_real)):
        means = _cell_means(cells, c)
        for i, (p, ct, n) in enumerate(pb.obs[[c.pert_col, c.cell_type_key, "n_cells"]].values):
            mean, count = means[(p, ct)]
            assert n == count
            np.testing.assert_allclose(pb.X[i], mean, rtol=1e-5, atol=1e-5)
    if decoder:  # the latents where the reference writes them, real ones too
        key = c.embed_key
        assert real.obsm[key].shape == pred.obsm[key].shape and pb_real.obsm[key].shape[0] == \
            pb_real.n_obs
        latent = _cell_means(pred, c, key)
        for i, (p, ct) in enumerate(pb_pred.obs[[c.pert_col, c.cell_type_key]].values):
            np.testing.assert_allclose(pb_pred.obsm[key][i], latent[(p, ct)][0], rtol=1e-5,
                                       atol=1e-5)
    # controls="real": the control cells (and pseudobulks) are the real ones, in every output
    cells, real = model.predict_split("test", controls="real")
    is_ctrl = (cells.obs[c.pert_col] == c.control_pert).to_numpy()
    np.testing.assert_array_equal(cells.X[is_ctrl], real.X[is_ctrl])
    pb_pred, pb_real = model.predict_split("test", pseudobulk=True, controls="real")
    ctrl = (pb_pred.obs[c.pert_col] == c.control_pert).to_numpy()
    np.testing.assert_array_equal(pb_pred.X[ctrl], pb_real.X[ctrl])
    if decoder:
        key = c.embed_key
        test = synth_embedding[cells.obs["pert_cell_barcode"].to_numpy()[is_ctrl]]
        np.testing.assert_allclose(cells.obsm[key][is_ctrl], test.obsm["X_pca"], atol=1e-6)
        np.testing.assert_allclose(pb_pred.obsm[key][ctrl][0], test.obsm["X_pca"].mean(0),
                                   rtol=1e-5, atol=1e-5)


def test_predict_controls_false_copies_the_controls(fitted):
    model, adata = fitted
    ct2 = adata[adata.obs["cell_type"] == "CT2"].copy()
    full = model.predict(ct2, seed=4)
    kept = model.predict(ct2, seed=4, predict_controls=False)
    assert list(kept.obs_names) == list(ct2.obs_names)
    ctrl = (ct2.obs["gene"] == "ctrl").to_numpy()
    np.testing.assert_array_equal(kept.X[ctrl], np.clip(ct2.X[ctrl], 0, 14))
    assert (kept.obs["statetx_ctrl_barcode"][ctrl] == ct2.obs_names[ctrl]).all()
    assert (kept.obs["statetx_set"][ctrl] == -1).all()
    np.testing.assert_array_equal(kept.X[~ctrl], full.X[~ctrl])  # per-group seeding
    assert not np.array_equal(full.X[ctrl], kept.X[ctrl])
    # simulate: the original controls kept + the virtual cells
    sim = model.simulate(ct2[ctrl].copy(), n_cells=5, predict_controls=False)
    np.testing.assert_array_equal(sim.X[: ctrl.sum()], np.clip(ct2.X[ctrl], 0, 14))
    assert sim.n_obs == ctrl.sum() + 5 * 3
    with pytest.raises(DataError, match="control cells only and predict_controls=False"):
        model.predict(ct2[ctrl].copy(), predict_controls=False)


def test_counts_key_chooses_the_decoder_target(synth_embedding):
    dec = {**SMALL, "gene_decoder_bool": True}
    opts = dict(embed_key="X_pca", output_space="gene", max_steps=2, model_kwargs=dec)
    with pytest.raises(DataError, match=r"obsm\['X_hvg'\] not found"):  # arc-state's key
        small_model(**opts).fit(synth_embedding, SPEC)
    genes = small_model(counts_key="X", **opts).fit(synth_embedding, SPEC)
    assert genes.gene_names_ == list(synth_embedding.var_names)
    a = synth_embedding.copy()
    a.obsm["X_sub"] = np.asarray(a.X)[:, :10]
    sub = small_model(counts_key="X_sub", **opts).fit(a, SPEC)
    assert sub.gene_names_ == [f"X_sub_{i}" for i in range(10)]
    assert sub.predict(a[:30].copy()).n_vars == 10
    with pytest.raises(DataError, match=r"obsm\['X_sbu'\] not found.*X_sub.*a layer"):
        small_model(counts_key="X_sbu", **opts).fit(a, SPEC)
    with pytest.warns(UserWarning, match="counts_key='X' has no effect"):
        small_model(counts_key="X", max_steps=1).fit(a, SPEC)


def test_drop_last_never_hangs_and_validation_keeps_every_set(synth):
    from statetx.errors import DataError as DE

    with pytest.raises(DE, match=r"yields no batch of 64 sets of 8 cells \(drop_last=True"):
        small_model(drop_last=True, downsample_cells=8, batch_size=64).fit(synth, SPEC)
    spec_val = '[training]\ndata = "train"\n[zeroshot]\n"data.CT1" = "val"\n"data.CT2" = "test"\n'
    m = small_model(drop_last=True, batch_size=16, max_steps=2, val_freq=2).fit(synth, spec_val)
    val = m.history_["val_loss"]
    assert np.isfinite(val.dropna()).all() and val.notna().any()


def test_predict_controls_false_copies_controls_into_decoded_outputs(synth_embedding):
    a = synth_embedding
    model = small_model(embed_key="X_pca", output_space="all", max_steps=2,
                        model_kwargs={**SMALL, "gene_decoder_bool": True}).fit(a, SPEC)
    ct2 = a[a.obs["cell_type"] == "CT2"].copy()
    ctrl = (ct2.obs["gene"] == "ctrl").to_numpy()
    kept = model.predict(ct2, predict_controls=False)
    assert kept.n_obs == ct2.n_obs
    np.testing.assert_array_equal(kept.X[ctrl], np.clip(ct2.X[ctrl], 0, 14))  # decoded genes
    np.testing.assert_array_equal(kept.obsm["X_pca_pred"][ctrl], ct2.obsm["X_pca"][ctrl])
    arc = model.predict(ct2, predict_controls=False, layout="arc")
    np.testing.assert_array_equal(arc.X[ctrl], np.clip(ct2.X[ctrl], 0, 14))
    no_genes = ct2[:, :5].copy()  # the decoder's genes are not all there: left out, said so
    with pytest.warns(UserWarning, match="control cells are left out"):
        out = model.predict(no_genes, predict_controls=False)
    assert out.n_obs == (~ctrl).sum()


def test_numpy_numbers_as_parameters_keep_runs_loadable(synth, tmp_path):
    from statetx.run import load_run

    m = small_model(max_steps=np.int64(2), batch_size=np.int32(4), seed=np.int64(3),
                    downsample_cells=np.int64(12), lr=np.float32(1e-3), drop_last=np.bool_(False),
                    device=torch.device("cpu"))
    m.fit(synth, SPEC, output_dir=tmp_path)
    loaded = load_run(tmp_path, verbose=False)
    assert loaded.get_params()["downsample_cells"] == 12 and loaded.get_params()["seed"] == 3
    np.testing.assert_array_equal(loaded.predict(synth, seed=1).X, m.predict(synth, seed=1).X)


def test_x_hvg_inputs_without_matching_names_are_clear_errors(synth):
    a = synth.copy()
    a.obsm["X_hvg"] = np.asarray(a.X[:, :10], dtype=np.float32)
    a.uns["X_hvg_var_names"] = np.asarray(a.var_names[:10])
    model = small_model(embed_key="X_hvg", max_steps=1).fit(a, SPEC)
    assert model.var_names_ == list(a.var_names[:10])
    unnamed = a.copy()
    del unnamed.uns["X_hvg_var_names"]
    with pytest.warns(UserWarning, match="read from X by name"):  # the genes are in X
        np.testing.assert_array_equal(model.predict(unnamed).X, model.predict(a).X)
    unnamed.var_names = [f"other{i}" for i in range(unnamed.n_vars)]
    with pytest.raises(DataError, match=r"none of the model's 10 genes is in the input's"):
        model.predict(unnamed)
    wrong = unnamed.copy()
    wrong.var["highly_variable"] = np.arange(wrong.n_vars) < 12  # 12 flags for 10 columns
    with pytest.raises(DataError, match=r"has 10 columns but 12 gene names"):
        model.predict(wrong)


def test_small_preset_keeps_its_skip_with_output_space_all(synth):
    """embed_key None: output_space 'all' and 'gene' are the same data; the 'small' network
    (input-space residual + per-perturbation skip) must be the same too (no bottleneck)."""
    opts = dict(pert_col="gene", cell_type_key="cell_type", control_pert="ctrl", max_steps=3,
                progress=False, seed=0, device="cpu")
    a = StateTransitionModel(output_space="all", **opts).fit(synth, SPEC)
    g = StateTransitionModel(output_space="gene", **opts).fit(synth, SPEC)
    assert a.network_.final_down_then_up is None and a.network_.pert_bias is not None
    test = synth[synth.obs["cell_type"] == "CT2"].copy()
    np.testing.assert_allclose(a.predict(test).X, g.predict(test).X, rtol=1e-5, atol=1e-5)


def test_history_survives_save_and_load_and_csv_has_one_row_per_step(synth, tmp_path):
    import json

    import pandas as pd

    m = small_model(max_steps=6, val_freq=3, log_every_n_steps=2)
    m.fit(synth, SPEC, output_dir=tmp_path / "run")
    logged = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert logged["step"].is_unique  # step 6: training and validation values in one row
    assert logged.loc[logged["step"] == 6, ["train_loss", "train_loss_eval"]].notna().all(1).all()
    m.save(tmp_path / "model")
    json.loads((tmp_path / "model" / "model.json").read_text(),  # strict JSON: no NaN literal
               parse_constant=lambda c: pytest.fail(f"{c} in model.json"))
    loaded = StateTransitionModel.load(tmp_path / "model")
    pd.testing.assert_frame_equal(loaded.history_, m.history_)


def test_evaluate_knows_pseudobulk_outputs(fitted, capsys):
    from statetx.metrics import evaluate

    model, _ = fitted
    pb, rb = model.predict_split("test", pseudobulk=True)
    res, _ = evaluate(pb, rb, pert_col="gene", control_pert="ctrl", profile="full")
    assert "pearson_delta" in res.columns and "overlap_at_N" not in res.columns
    assert "metrics that need the cells are skipped" in capsys.readouterr().out
    # the columns and control label statetx recorded are the defaults (not cell-eval's)
    pd.testing.assert_frame_equal(evaluate(pb, rb, profile="full")[0], res)


def test_tuple_params_and_finetuning_survive_save_and_load(synth, tmp_path, capsys):
    from statetx.cli import main

    # JSON has no tuples; get_params() must still compare equal after a reload, and a
    # fine-tuned network must not reload looking like the plain fit
    synth = synth.copy()
    synth.obs["plate"] = synth.obs["batch"].astype(str) + "p"
    m = small_model(max_steps=2, additional_obs=("plate",)).fit(synth, SPEC)
    m.finetune_on_controls(2, lr=1e-4, seed=3)
    assert m.finetuned_ == [{"steps": 2, "split": "test", "lr": 1e-4, "seed": 3}]
    m.save(tmp_path / "m")
    loaded = StateTransitionModel.load(tmp_path / "m")
    assert loaded.get_params() == m.get_params()
    assert loaded.additional_obs == ("plate",)
    assert loaded.finetuned_ == m.finetuned_
    np.testing.assert_array_equal(loaded.predict(synth).X, m.predict(synth).X)
    capsys.readouterr()
    assert main(["info", str(tmp_path / "m")]) == 0
    assert "fine-tuned on controls: 2 steps on the 'test' split" in capsys.readouterr().out
    # a refit is no longer fine-tuned
    assert not hasattr(m.fit(synth, SPEC), "finetuned_")


def test_a_groups_control_draws_do_not_depend_on_the_other_groups_of_the_split(synth):
    """predict_split seeds each group from its labels: re-splitting with a spec that holds only
    one of the test cell types draws that cell type's controls (and predictions) unchanged."""
    from statetx.baselines import PerturbMeanBaseline
    from statetx.run import attach_data

    both = '[training]\ndata = "train"\n[zeroshot]\n"data.CT1" = "test"\n"data.CT2" = "test"\n'
    only = '[training]\ndata = "train"\n[zeroshot]\n"data.CT2" = "test"\n'
    cols = dict(pert_col="gene", cell_type_key="cell_type", control_pert="ctrl", seed=0)
    for model in (small_model(max_steps=2), PerturbMeanBaseline(**cols)):
        model.fit(synth, both)
        full = model.predict_split("test")[0]
        attach_data(model, adata=synth, toml=only)
        part = model.predict_split("test")[0]
        ct2 = full[full.obs["cell_type"] == "CT2"]
        assert part.n_obs == ct2.n_obs and ct2.n_obs > 0
        part = part[pd.Index(part.obs["pert_cell_barcode"]).get_indexer(
            ct2.obs["pert_cell_barcode"])]
        np.testing.assert_array_equal(part.obs["ctrl_cell_barcode"], ct2.obs["ctrl_cell_barcode"])
        np.testing.assert_allclose(part.X, ct2.X, atol=1e-6)


def test_predict_split_obs_keep_barcodes_and_the_context_column(synth):
    """The cells keep their own names, and a context column named 'batch' (no batch_col) is
    neither overwritten nor joined by an invented batch column."""
    a = synth.copy()
    a.obs = a.obs.rename(columns={"cell_type": "batch", "batch": "donor"})
    spec = '[training]\ndata = "train"\n[zeroshot]\n"data.CT2" = "test"\n'
    m = small_model(max_steps=2, cell_type_key="batch").fit(a, spec)
    pred, real = m.predict_split("test")
    assert set(pred.obs["batch"]) == {"CT2"} and "donor" not in pred.obs
    assert list(pred.obs_names) == list(pred.obs["pert_cell_barcode"])
    assert list(real.obs_names) == list(pred.obs_names)
    assert a.obs.loc[pred.obs_names, "gene"].tolist() == pred.obs["gene"].astype(str).tolist()


def test_fit_says_when_held_out_perturbations_have_no_training_cells(synth):
    a = synth[~((synth.obs["gene"] == "P2") & (synth.obs["cell_type"] != "CT1"))].copy()
    spec = ('[training]\ndata = "train"\n[fewshot]\n[fewshot."data.CT1"]\nval = ["P1"]\n'
            'test = ["P2"]\n')
    with pytest.warns(UserWarning, match=r"held-out splits \(test: 1 \('P2'\)\): with one-hot"):
        small_model(max_steps=1).fit(a, spec)
    # labels are quoted: an empty one is seen
    b = a.copy()
    b.obs["gene"] = b.obs["gene"].astype(str).replace({"P2": ""})
    with pytest.warns(UserWarning, match=r"held-out splits \(test: 1 \(''\)\)"):
        small_model(max_steps=1).fit(b, spec.replace('"P2"', '""'))
    with warnings.catch_warnings():  # P1 trains in the other cell types: nothing to say
        warnings.simplefilter("error")
        small_model(max_steps=1).fit(a, spec.replace('"P2"', '"P0"'))


def test_validation_on_untrained_perturbations_only_is_skipped(synth, tmp_path, capsys):
    """Papalexi (one cell type) with IRF7 as the few-shot val perturbation: with one-hot
    perturbations nothing about IRF7 is learned, so its val_loss cannot guide best.ckpt or
    early stopping. fit and tx train do not validate then (said in the held-out warning): no
    best.ckpt, the final model. A val split that also holds trained perturbations is kept."""
    import anndata as ad
    import scanpy as sc
    from conftest import PAPALEXI, need

    from statetx.cli import main

    a = ad.read_h5ad(need(PAPALEXI))
    a = a[a.obs["target_gene"] != "unassigned"].copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    spec = ('[training]\npapalexi = "train"\n[fewshot."papalexi.THP-1"]\nval = ["IRF7"]\n'
            'test = ["IFNGR2", "JAK2"]\n')
    said = (r"held-out splits \(val: 1 \('IRF7'\); test: 2 .*measures nothing: the val split "
            r"holds only such perturbations, so fit does not validate \(no best\.ckpt")
    idle = r"early_stopping_patience=1: validation is skipped \(its perturbations have no"
    with pytest.warns(UserWarning, match=said), pytest.warns(UserWarning, match=idle):
        m = small_model(pert_col="target_gene", control_pert="non-targeting", max_steps=4,
                        val_freq=2, early_stopping_patience=1).fit(
            a, spec, output_dir=tmp_path / "api")
    assert m.best_step_ == -1 and m.history_["step"].max() == 4
    assert "val_loss" not in m.history_ and m.history_["train_loss_eval"].notna().sum() == 2
    assert not (tmp_path / "api" / "checkpoints" / "best.ckpt").exists()
    # the command line trains through the same fit
    data = tmp_path / "data"
    data.mkdir()
    a.write_h5ad(data / "papalexi.h5ad")
    (data / "split.toml").write_text(f'[datasets]\npapalexi = "{data}"\n{spec}')
    capsys.readouterr()
    assert main(["tx", "train", f"data.kwargs.toml_config_path={data / 'split.toml'}",
                 "data.kwargs.pert_col=target_gene", *TINY_CLI[:-2],
                 "data.kwargs.control_pert=non-targeting", "training.max_steps=4",
                 "training.val_freq=2", f"output_dir={tmp_path}", "name=cli"]) == 0
    assert re.search(said, capsys.readouterr().err)  # (the command line prints warnings)
    ck = tmp_path / "cli" / "checkpoints"
    assert (ck / "final.ckpt").exists() and not (ck / "best.ckpt").exists()
    assert "val_loss" not in pd.read_csv(tmp_path / "cli" / "metrics.csv")
    # P0 (val) trains in the other cell types, P2 (val) nowhere: validated on, still warned
    b = synth[~((synth.obs["gene"] == "P2") & (synth.obs["cell_type"] != "CT1"))].copy()
    mixed = '[training]\ndata = "train"\n[fewshot."data.CT1"]\nval = ["P0", "P2"]\n'
    with pytest.warns(UserWarning, match=r"held-out splits \(val: 1 \('P2'\)\).*measures "
                                         r"nothing\. To predict"):
        m = small_model(max_steps=4, val_freq=2).fit(b, mixed, output_dir=tmp_path / "mixed")
    assert m.history_["val_loss"].notna().sum() == 2
    assert (tmp_path / "mixed" / "checkpoints" / "best.ckpt").exists()


def test_cells_of_a_batch_without_controls_are_said_to_draw_from_other_batches(synth):
    m = small_model(max_steps=1, batch_col="batch").fit(synth)
    a = synth.copy()
    a.obs["batch"] = a.obs["batch"].astype(str)
    a.obs.loc[(a.obs["gene"] == "P1") & (a.obs["cell_type"] == "CT0"), "batch"] = "b9"
    with pytest.warns(UserWarning, match=r"24 cells are in batches without control cells of "
                                         r"their context \(b9 in CT0\)"):
        m.predict(a, unknown_batch="mean")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.predict(synth)


@pytest.mark.parametrize("loading", ["memory", "stream"])
def test_fit_says_when_batch_pairing_falls_back_to_the_cell_types_controls(synth, loading):
    """Perturbed training cells in a batch without controls of their cell type are paired with
    the cell type's controls of every batch: fit says so (as predict does); a batch column
    confounded with the perturbation (no control in any perturbed cell's batch) is named."""
    a = synth.copy()
    a.obs["batch"] = a.obs["batch"].astype(str)
    a.obs.loc[(a.obs["gene"] == "P1") & (a.obs["cell_type"] == "CT0"), "batch"] = "b9"
    opts = dict(max_steps=1, batch_col="batch", data_loading=loading)
    with pytest.warns(UserWarning, match=r"^24 perturbed training cells are in batches without "
                                         r"control cells of their context \(b9 in CT0\): their "
                                         r"basal cells are drawn .* every batch\.$"):
        small_model(**opts).fit(a)
    a.obs["batch"] = np.where(a.obs["gene"] == "ctrl", "sample_ctrl", "sample_stim")
    n = int((a.obs["gene"] != "ctrl").sum())
    with pytest.warns(UserWarning, match=(
            rf"{n} perturbed training cells are in batches without control cells.*sample_stim in "
            r"CT0.*obs\['batch'\] looks confounded with the perturbation .*Pass "
            r"basal_mapping_strategy='random' \(batch pairing is the default with a "
            r"batch_col\), or a batch_col whose batches hold both")):
        small_model(**opts).fit(a)
    with warnings.catch_warnings():  # random pairing does not look at batches
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*padding")
        small_model(**opts, basal_mapping_strategy="random").fit(a)


def test_input_normalised_to_another_total_is_said_from_the_values():
    """Papalexi's knockouts trained at the data's median depth, predicted after scanpy's
    normalize_total(1e4): the log1p values are shifted and nothing recorded it in uns."""
    import anndata as ad
    import scanpy as sc
    from conftest import SHARED, need

    a = ad.read_h5ad(need(SHARED / "data" / "papalexi2021_thp1_lowmoi_sceptredata.h5ad"))
    a = a[a.obs["target_gene"].isin(["non-targeting", "STAT1", "IFNGR1"]), :60].copy()
    a.X = a.layers["counts"].copy()
    train = a.copy()
    sc.pp.normalize_total(train)  # the median total of these 60 genes
    sc.pp.log1p(train)
    m = small_model(max_steps=1, pert_col="target_gene", control_pert="non-targeting").fit(train)
    assert m.expression_depth_["THP-1"] == pytest.approx(np.median(np.asarray(a.X.sum(1))),
                                                         rel=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.predict(train)
    other = a.copy()
    sc.pp.normalize_total(other, target_sum=1e4)
    sc.pp.log1p(other)
    with pytest.warns(UserWarning, match="normalised to another total"):
        m.predict(other)


def test_cell_types_whose_controls_express_none_of_the_genes_are_not_compared(synth, tmp_path):
    """A depth of 0 (most controls of a cell type express none of the model's genes) has
    nothing to compare: no division by zero, no log(0) (was a ZeroDivisionError in predict)."""
    a = synth.copy()
    ctrl = (a.obs["gene"] == "ctrl").to_numpy()
    a.X[ctrl & (a.obs["cell_type"] == "CT0").to_numpy()] = 0
    m = small_model(max_steps=1).fit(a)
    assert set(m.expression_depth_) == {"CT1", "CT2"}
    m.expression_depth_["CT0"] = 0.0  # (as earlier versions recorded it)
    b = a.copy()
    b.X[ctrl & (b.obs["cell_type"] == "CT1").to_numpy()] = 0  # input controls of none either
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.predict(a)
        m.predict(b)


def test_a_model_trained_on_normalised_values_refuses_raw_counts(synth, tmp_path):
    """Linear-normalised training data (not integers, not log1p): raw counts at predict are
    refused as a log1p model refuses them (were predicted silently); a counts model is not
    checked."""
    counts = synth.copy()
    counts.X = np.round(np.expm1(counts.X) * 3).astype(np.float32)
    linear = counts.copy()
    linear.X = (linear.X / linear.X.sum(1, keepdims=True) * 1e4).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (not log1p: said)
        m = small_model(max_steps=1).fit(linear)
        on_counts = small_model(max_steps=1).fit(counts)
    assert m.is_counts_ is False and on_counts.is_counts_ is True
    loaded = StateTransitionModel.load(m.save(tmp_path / "m"))
    for model in (m, loaded, pickle.loads(pickle.dumps(m))):
        with pytest.raises(DataError, match=r"looks like raw counts .*trained on normalised "
                                            r"values .*sc\.pp\.normalize_total"):
            model.predict(counts)
        model.predict(linear)
    on_counts.predict(counts)


def test_a_new_split_spec_may_hold_cell_types_and_batches_never_trained(synth, capsys):
    """Re-splitting (attach_data / tx predict --toml) with a cell type and a batch the model
    never saw: neither is a network input (no batch encoder), so the cells are predicted."""
    from statetx.baselines import PerturbMeanBaseline
    from statetx.run import attach_data

    new = synth.copy()
    new.obs["cell_type"] = new.obs["cell_type"].astype(str).replace({"CT2": "CT7"})
    new.obs["batch"] = new.obs["batch"].astype(str).replace({"b0": "b9"})
    spec = '[training]\ndata = "train"\n[zeroshot]\n"data.CT7" = "test"\n'
    cols = dict(pert_col="gene", cell_type_key="cell_type", control_pert="ctrl", seed=0)
    for model in (small_model(max_steps=2, batch_col="batch"),
                  PerturbMeanBaseline(batch_col="batch", **cols)):
        model.fit(synth, SPEC)
        attach_data(model, adata=new, toml=spec)
        assert "cell type label(s) not in the model's data: CT7" in capsys.readouterr().out
        pred, real = model.predict_split("test")
        assert set(pred.obs["cell_type"]) == {"CT7"} and "b9" in set(pred.obs["batch"])
        assert pred.n_obs == (new.obs["cell_type"] == "CT7").sum()
        assert "CT7" not in model.vocab_.cell_types  # the fitted vocabulary is unchanged
        if isinstance(model, StateTransitionModel):  # (tx predict --toml --test-time-finetune)
            model.finetune_on_controls(1, "test")


def test_held_out_cell_types_are_not_taken_for_another_normalisation():
    """Kang, 100 HVGs, normalised alike: CD14+ monocytes express ~6x the counts of CD4 T cells
    over those genes, and stimulated cells more again; neither is a normalisation change."""
    import anndata as ad
    import scanpy as sc
    from conftest import SHARED, need

    a = ad.read_h5ad(need(SHARED / "data" / "kang2018_pbmc_ifnb_muscat_counts.h5ad"))
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=100)
    a = a[:, a.var["highly_variable"]].copy()
    train = a[a.obs["cell_type"] == "CD4 T cells"].copy()
    m = small_model(max_steps=1, pert_col="target_gene", control_pert="control").fit(train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.predict(a[a.obs["cell_type"].isin(["CD14+ Monocytes", "CD4 T cells"])].copy())


def test_split_draws_are_the_same_from_memory_and_from_the_spec_files(synth, tmp_path):
    """fit(adata, spec) (a notebook) and fit(None, spec with the file) (the CLI) draw the same
    controls for the same split cells."""
    synth.write_h5ad(tmp_path / "data.h5ad")
    spec = f'[datasets]\ndata = "{tmp_path / "data.h5ad"}"\n' + SPEC
    a = small_model(max_steps=1).fit(synth, spec).predict_split("test")[0]
    b = small_model(max_steps=1).fit(None, spec).predict_split("test")[0]
    assert list(a.obs_names) == list(b.obs_names)
    np.testing.assert_array_equal(a.obs["ctrl_cell_barcode"], b.obs["ctrl_cell_barcode"])


def test_a_python_runs_config_names_its_own_folder(synth, tmp_path):
    from statetx.run import read_config

    small_model(max_steps=1).fit(synth, SPEC, output_dir=tmp_path / "runs" / "mine")
    cfg = read_config(tmp_path / "runs" / "mine" / "config.yaml")
    assert (cfg["output_dir"], cfg["name"]) == (str((tmp_path / "runs").resolve()), "mine")


def test_a_run_loaded_from_its_folder_reads_its_split_files_when_asked(synth, tmp_path, capsys):
    """load_run(run).predict_split() works when the run's split.toml names files that exist."""
    synth.write_h5ad(tmp_path / "data.h5ad")
    spec = f'[datasets]\ndata = "{tmp_path / "data.h5ad"}"\n' + SPEC
    fitted = small_model(max_steps=1).fit(None, spec, output_dir=tmp_path / "run")
    loaded = StateTransitionModel.load_run(tmp_path / "run", verbose=False)
    pred = loaded.predict_split("test")[0]
    assert "reading the split data from" in capsys.readouterr().out
    np.testing.assert_array_equal(pred.X, fitted.predict_split("test")[0].X)
    (tmp_path / "data.h5ad").unlink()
    gone = StateTransitionModel.load_run(tmp_path / "run", verbose=False)
    with pytest.raises(DataError, match="reading the run's split.toml files failed"):
        gone.predict_split("test")


def test_predict_says_which_cell_types_it_never_trained_on(fitted, capsys):
    model, adata = fitted
    a = adata.copy()
    a.obs["cell_type"] = a.obs["cell_type"].astype(str).replace({"CT0": "ct0", "CT2": "CT9"})
    with pytest.warns(UserWarning, match=r"'ct0' \(trained: 'CT0'\) differ from the model's "
                                         "only in case"):
        model.predict(a)
    assert "cell type(s) not in the model's data: CT9 (predicted zero-shot)" in \
        capsys.readouterr().out


# ----------------------------------------------------------------- perturbation feature vectors
def _pair_features(perts, genes):
    """Norman-style combinatorial features: one dimension per target gene, a pair 'A+B' = e_A +
    e_B."""
    out = {}
    for p in perts:
        v = np.zeros(len(genes), dtype=np.float32)
        for g in p.split("+"):
            v[genes.index(g)] = 1.0
        out[p] = v
    return out


def test_predict_unseen_perturbations_from_their_feature_vectors(perturbench, tmp_path):
    """perturbench K562 (Norman 2019): a model trained with gene-wise features predicts pairs
    outside its feature table from vectors given to predict (inference.md §3.2 step 8); the
    vectors reach the network (same output as predict_sets with them), survive save/load in
    pert_features.safetensors (not in model.json), and cannot replace a trained one."""
    import json

    k562 = perturbench[perturbench.obs["cell_type"] == "k562"].copy()
    held = ["KLF1+TGFBR2", "MAPK1+TGFBR2"]
    labels = k562.obs["target_gene"].astype(str)
    genes = sorted({g for p in labels.unique() if p != "control" for g in p.split("+")})
    train = k562[~labels.isin(held).to_numpy()].copy()
    feats = _pair_features([p for p in train.obs["target_gene"].unique() if p != "control"],
                           genes)
    model = StateTransitionModel(
        "tiny", pert_col="target_gene", cell_type_key="cell_type", control_pert="control",
        pert_features=feats, model_kwargs=SMALL, cell_set_len=16, batch_size=4, max_steps=4,
        progress=False, seed=0, device="cpu").fit(train)
    test = k562[labels.isin([*held, "control"]).to_numpy()].copy()
    with pytest.raises(DataError, match="pert_features="):
        model.predict(test)
    given = _pair_features(held, genes)
    pred = model.predict(test, pert_features=given)
    # the given vectors are what the network read: re-run one set of each pair by hand
    x = np.asarray(test.X.todense())
    rows = {b: i for i, b in enumerate(test.obs_names)}
    for p in held:
        cells = pred.obs[pred.obs["target_gene"] == p]
        first = cells[cells["statetx_set"] == cells["statetx_set"].iloc[0]]
        basal = x[[rows[b] for b in first["statetx_ctrl_barcode"]]]
        by_hand = model.predict_sets(basal, given[p][None, :])
        np.testing.assert_allclose(pred[first.index].X, np.clip(by_hand, 0, 14), atol=1e-5)
    zero = model.predict(test, unknown_perturbation="zeros")
    assert not np.allclose(zero.X, pred.X)
    # persistence: the table is a tensor file, model.json names it by shape and digest only
    path = model.save(tmp_path / "m")
    meta = json.loads((path / "model.json").read_text())
    assert meta["vocab"]["pert_features"]["shape"] == list(model.vocab_.pert_features.shape)
    assert (path / "pert_features.safetensors").stat().st_size > 0
    loaded = StateTransitionModel.load(path)
    np.testing.assert_array_equal(loaded.vocab_.pert_features, model.vocab_.pert_features)
    np.testing.assert_array_equal(loaded.predict(test, pert_features=given).X, pred.X)
    # a trained perturbation keeps its vector; a one-hot model takes none
    with pytest.raises(DataError, match="KLF1"):
        model.predict(test, pert_features={"KLF1": np.ones(len(genes), np.float32)})
    with pytest.raises(DataError, match="length"):
        model.predict(test, pert_features={held[0]: np.ones(3, np.float32)})
    (path / "pert_features.safetensors").unlink()
    with pytest.raises(DataError, match="pert_features.safetensors"):
        StateTransitionModel.load(path)
    onehot = StateTransitionModel(
        "tiny", pert_col="target_gene", cell_type_key="cell_type", control_pert="control",
        model_kwargs=SMALL, cell_set_len=16, batch_size=4, max_steps=1, progress=False,
        device="cpu").fit(train)
    with pytest.raises(ConfigError, match="one-hot"):
        onehot.predict(test, pert_features=given)


def test_run_folder_and_checkpoints_carry_the_feature_table(synth, tmp_path, capsys):
    """A run with feature vectors writes pert_features.safetensors (not JSON lists) and its
    checkpoints carry the table as a tensor: load_run gives the same vectors back."""
    import json

    rng = np.random.default_rng(1)
    feats = {p: rng.normal(size=5).astype(np.float32) for p in ("P0", "P1", "P2")}
    model = small_model(max_steps=2, pert_features=feats).fit(synth, SPEC,
                                                              output_dir=tmp_path / "run")
    assert (tmp_path / "run" / "pert_features.safetensors").is_file()
    vocab = json.loads((tmp_path / "run" / "vocab.json").read_text())
    assert set(vocab["pert_features"]) == {"shape", "sha256"}
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "final.ckpt", weights_only=True)
    assert isinstance(ckpt["pert_features"], torch.Tensor)
    again = StateTransitionModel.load_run(tmp_path / "run")
    np.testing.assert_array_equal(again.vocab_.pert_features, model.vocab_.pert_features)
    from statetx.cli import main

    assert main(["info", str(tmp_path / "run")]) == 0
    assert "+ the control (feature vectors of 5 values)" in capsys.readouterr().out


def test_held_out_perturbations_get_their_vectors_in_predict_split(perturbench):
    """perturbench K562: pairs held out of training (few-shot test) with no row in the training
    feature table are predicted as the control unless given vectors: predict_split says so, and
    takes pert_features= (tx predict --pert-features) as predict does. An ill-conditioned table
    (more random feature dimensions than trained perturbations) still starts the small preset's
    skip at sane weights (audit: a plain least-squares start gave weights ~1e7 and a broken
    model)."""
    k562 = perturbench[perturbench.obs["cell_type"] == "k562"].copy()
    held = ["KLF1+TGFBR2", "MAPK1+TGFBR2"]
    labels = k562.obs["target_gene"].astype(str)
    genes = sorted({g for p in labels.unique() if p != "control" for g in p.split("+")})
    rng = np.random.default_rng(0)
    gene_vec = {g: rng.normal(size=48).astype(np.float32) for g in genes}

    def vec(p):
        return np.sum([gene_vec[g] for g in p.split("+")], axis=0)

    feats = {p: vec(p) for p in labels.unique() if p != "control" and p not in held}
    spec = {"training": {"k": "train"}, "fewshot": {"k.k562": {"test": held}}}
    with pytest.warns(UserWarning, match="no feature vector"):
        model = StateTransitionModel(
            "small", pert_col="target_gene", cell_type_key="cell_type", control_pert="control",
            pert_features=feats, cell_set_len=16, batch_size=4, max_steps=3, progress=False,
            seed=0, device="cpu").fit({"k": k562}, spec)
    assert float(model.network_.pert_bias.weight.detach().abs().max()) < 10
    with pytest.warns(UserWarning, match=r"2 perturbation\(s\) of the test split had no "
                                         r"training cells.*pert_features="):
        zero, real = model.predict_split("test")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        given, _ = model.predict_split("test", pert_features={p: vec(p) for p in held})
    rows = zero.obs["target_gene"].isin(held).to_numpy()
    assert not np.allclose(zero.X[rows], given.X[rows])
    np.testing.assert_array_equal(zero.X[~rows], given.X[~rows])  # the others are unchanged


def test_a_network_far_too_large_for_the_data_is_flagged(zhao_raw):
    """Zhao (5,000 cells) with the reference's state_sm preset: 32M parameters, warned about
    (the tutorial's command line picks such presets); the small preset is not."""
    import scanpy as sc

    a = zhao_raw.copy()
    sc.pp.normalize_total(a)
    sc.pp.log1p(a)
    opts = dict(pert_col="target_gene", cell_type_key="cell_type", control_pert="DMSO",
                max_steps=1, batch_size=2, cell_set_len=16, progress=False, device="cpu")
    with pytest.warns(UserWarning, match=r"'state_sm' network has 3\d\.\dM parameters for "
                                         r"5,000 training cells.*preset='small'"):
        StateTransitionModel("state_sm", **opts).fit(a)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        StateTransitionModel("small", **opts).fit(a)


def test_feature_runs_checkpointed_before_format_2_resume(synth, tmp_path):
    """A feature model's checkpoint written by the previous statetx (vectors as JSON lists in
    the metadata, no world_size/seconds in the training state) still resumes."""
    from statetx.train import load_checkpoint_file

    rng = np.random.default_rng(2)
    feats = {p: rng.normal(size=5).astype(np.float32) for p in ("P0", "P1", "P2")}
    small_model(max_steps=2, pert_features=feats).fit(synth, SPEC, output_dir=tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint_file(last)
    meta = ckpt["statetx_model"]
    meta["vocab"]["pert_features"] = ckpt.pop("pert_features").tolist()
    meta["format_version"] = 1
    for key in ("world_size", "seconds"):
        ckpt["train_state"].pop(key)
    torch.save(ckpt, last)
    resumed = small_model(max_steps=4, pert_features=feats).fit(synth, SPEC, output_dir=tmp_path,
                                                                resume_from=last)
    assert resumed.history_["step"].max() == 4


def test_set_params_entries_and_pickled_feature_dicts(synth, tmp_path):
    """name__key entries go on top of whole values given in the same call, only into dict
    parameters; subclasses taking **kwargs pass them on; a feature dict changed after fit
    survives pickling (it is stored by name only while it equals the fitted table)."""
    m = small_model().set_params(model_kwargs={"n_layers": 1}, model_kwargs__hidden_dim=16)
    assert m.model_kwargs == {"n_layers": 1, "hidden_dim": 16}
    with pytest.raises(ConfigError, match="counts_key is NoneType, not a dict"):
        m.set_params(counts_key__x=1)

    class Custom(StateTransitionModel):
        def __init__(self, extra: int = 0, **kwargs) -> None:
            super().__init__(**kwargs)
            self.extra = extra

    assert Custom(extra=1, lr=1e-3).lr == 1e-3
    with pytest.raises(TypeError, match="'lr_x'"):
        Custom(lr_x=1)
    rng = np.random.default_rng(3)
    feats = {p: rng.normal(size=4).astype(np.float32) for p in ("P0", "P1", "P2")}
    fitted = small_model(max_steps=1, pert_features=feats).fit(synth, SPEC)
    other = {p: v + 1 for p, v in feats.items()}
    again = pickle.loads(pickle.dumps(fitted.set_params(pert_features=other)))
    np.testing.assert_array_equal(again.pert_features["P0"], other["P0"])
    # saved and loaded: the parameter holds the names given (not the control's zero row too)
    saved = small_model(max_steps=1, pert_features=feats).fit(synth, SPEC)
    loaded = StateTransitionModel.load(saved.save(tmp_path / "m"))
    assert list(loaded.pert_features) == ["P0", "P1", "P2"]
    assert "ctrl" in loaded.vocab_.perturbations
    np.testing.assert_array_equal(loaded.pert_features["P1"], feats["P1"])


def test_held_out_knockout_is_predicted_as_control_not_a_random_effect(papalexi):
    """Papalexi THP-1: JAK2 knockout held out of training (one-hot perturbations). Its
    embedding never trained, so by default it is predicted as the control (no shift), where its
    random start would add an effect unrelated to the real one (STAT1 falls in the knockout)."""
    import scanpy as sc

    keep = ["non-targeting", "IFNGR1", "IFNGR2", "JAK2", "STAT1", "IRF1"]
    a = papalexi[papalexi.obs["target_gene"].isin(keep)].copy()
    a.X = a.layers["counts"].copy()
    sc.pp.normalize_total(a)
    sc.pp.log1p(a)
    spec = {"training": {"papalexi": "train"},
            "fewshot": {"papalexi.THP-1": {"test": ["JAK2"]}}}
    m = StateTransitionModel("small", pert_col="target_gene", cell_type_key="cell_type",
                             control_pert="non-targeting", cell_set_len=32, batch_size=8,
                             max_steps=40, progress=False, seed=0,
                             device="cpu").fit(a, spec, dataset_name="papalexi")
    stat1 = list(a.var_names).index("STAT1")
    preds = {}
    for mode in ("control", "as_is"):
        with pytest.warns(UserWarning, match="no training cells: JAK2"):
            preds[mode], real = m.predict_split("test", untrained_perturbation=mode)
    jak2 = (real.obs["target_gene"] == "JAK2").to_numpy()
    real_delta = np.asarray(real.X[jak2].mean(0) - real.X[~jak2].mean(0)).ravel()
    assert real_delta[stat1] < -0.5  # the knockout's known effect
    pred = preds["control"].X
    delta = np.asarray(pred[jak2].mean(0) - pred[~jak2].mean(0)).ravel()
    assert abs(delta[stat1]) < 0.1 * abs(real_delta[stat1])  # no shift (controls drawn alike)
    # the same basal draws: only the knockout's cells change with the mode
    np.testing.assert_array_equal(preds["as_is"].X[~jak2], pred[~jak2])
    assert not np.allclose(preds["as_is"].X[jak2], pred[jak2], atol=1e-4)


def test_small_recipe_counts_the_cells_that_train(capsys):
    """The small preset's 100 passes are over the cells that train: with downsample_cells, the
    groups' capped sizes; with gradient accumulation, k batches make one step."""
    from conftest import make_synthetic

    a = make_synthetic(n_cells=200)
    kw = dict(pert_col="gene", cell_type_key="cell_type", control_pert="ctrl", device="cpu",
              cell_set_len=8)
    StateTransitionModel("small", downsample_cells=20, max_steps=1, progress=True,
                         **kw).fit(a, SPEC)
    from statetx.splits import assign

    train = a.obs[assign(a, SPEC, {k: kw[k] for k in ("pert_col", "cell_type_key",
                                                       "control_pert")})["train"]]
    n_train = len(train)  # (the held-out cell type's controls train too)
    used = int(np.minimum(train.groupby(["cell_type", "gene"], observed=True).size(), 20).sum())
    assert f"({n_train:,} training cells, {used:,} used: at most 20 per group)" in (
        capsys.readouterr().out)

    def steps(n_cells: int, **opts) -> int:
        return StateTransitionModel("small", **kw, **opts)._training_defaults(
            "small", n_cells, 8)["max_steps"]

    assert steps(n_train) == round(100 * n_train / (8 * 8))  # (within the 300-3,000 bounds)
    assert steps(used) == 300 < steps(n_train)
    assert steps(n_train, gradient_accumulation_steps=2) == round(100 * n_train / (2 * 8 * 8))


def test_outputs_for_scanpy_backed_arc_layout_log1p_and_categories(fitted, tmp_path):
    """A backed file (or a view of one) predicts in arc-state's layout too; log1p outputs say so
    in uns['log1p'] (scanpy then warns on a second log1p); a virtual experiment keeps the
    input's categorical perturbation column categorical."""
    import anndata as ad

    model, adata = fitted
    a = adata.copy()
    a.obs["gene"] = a.obs["gene"].astype("category")
    a.write_h5ad(tmp_path / "in.h5ad")
    backed = ad.read_h5ad(tmp_path / "in.h5ad", backed="r")
    want = model.predict(a, layout="arc", seed=1)
    np.testing.assert_array_equal(want.X, model.predict(a, seed=1).X)
    for src in (backed, backed[(backed.obs["cell_type"] != "CT0").to_numpy()]):
        got = model.predict(src, layout="arc", seed=1)
        rows = want.obs_names.get_indexer(got.obs_names)
        np.testing.assert_array_equal(got.X, want.X[rows])  # (the predictions, in X here)
    backed.file.close()
    pred = model.predict(a)
    assert pred.uns["log1p"] == {"base": None} and pred.uns["statetx"]["scale"] == "log1p"
    for out in model.predict_split("test"):
        assert out.uns["log1p"] == {"base": None}
    sim = model.predict(a, all_perts=True, n_cells_per_pert=2)
    assert sim.uns["log1p"] == {"base": None}  # (kept next to the input's uns)
    assert isinstance(sim.obs["gene"].dtype, pd.CategoricalDtype)
    assert set(sim.obs["gene"].cat.categories) == set(a.obs["gene"].cat.categories)


def test_x_hvg_columns_out_of_var_order_are_refused():
    """obsm does not follow a reordering of var: X_hvg named by var['highly_variable'] would
    give genes each other's values. Caught by comparing with X; other scales pass as before."""
    from conftest import make_synthetic

    adata = make_synthetic()
    adata.var["highly_variable"] = np.arange(adata.n_vars) < 10
    adata.obsm["X_hvg"] = np.asarray(adata.X[:, :10], dtype=np.float32)
    model = small_model(embed_key="X_hvg", output_space="gene", max_steps=2).fit(adata, SPEC)
    want = model.predict(adata, seed=1).X
    perm = np.random.default_rng(0).permutation(adata.n_vars)
    moved = adata[:, perm].copy()  # the same data, var reordered; X_hvg is not
    with pytest.raises(DataError, match=r"obsm\['X_hvg'\] holds X's highly variable genes in "
                                        r"another order"):
        model.predict(moved)
    as64 = moved.copy()  # X in float64, X_hvg its float32 copy: still compared
    as64.X = np.asarray(as64.X, dtype=np.float64)
    with pytest.raises(DataError, match="another order"):
        model.predict(as64)
    moved.obsm["X_hvg"] = np.asarray(moved[:, moved.var["highly_variable"]].X)  # rebuilt
    np.testing.assert_allclose(model.predict(moved, seed=1).X, want, atol=1e-6)
    twice = adata.copy()  # a gene name used twice in var: not compared (it was a crash)
    twice.var_names = [*twice.var_names[:-1], twice.var_names[-2]]
    np.testing.assert_allclose(model.predict(twice, seed=1).X, want, atol=1e-6)
    counts = adata.copy()  # X on another scale than X_hvg: not compared
    counts.X = np.round(np.expm1(np.asarray(counts.X)) * 10)
    np.testing.assert_allclose(model.predict(counts, seed=1).X, want, atol=1e-6)


def test_predictions_name_the_model_that_made_them(fitted, tmp_path):
    """uns['statetx']['model_id']: a hash of the weights, the same after pickling, saving and
    loading, different once the weights change; a run's model names its folder absolutely."""
    model, adata = fitted
    mid = model.predict(adata).uns["statetx"]["model_id"]
    assert len(mid) == 16 and model.predict_split("test")[0].uns["statetx"]["model_id"] == mid
    back = pickle.loads(pickle.dumps(model))
    model.save(tmp_path / "m")
    loaded = StateTransitionModel.load(tmp_path / "m")
    assert back.predict(adata).uns["statetx"]["model_id"] == mid
    assert loaded.predict(adata).uns["statetx"]["model_id"] == mid
    with torch.no_grad():
        next(back.network_.parameters()).add_(1e-3)  # (in place: the cached id is dropped)
    assert back.predict(adata).uns["statetx"]["model_id"] != mid
    run = small_model(max_steps=1).fit(adata, SPEC, output_dir=tmp_path / "run")
    assert run.predict(adata).uns["statetx"]["model"] == str((tmp_path / "run").absolute())


def test_notices_can_be_silenced_with_logging(fitted, capsys):
    """The 'statetx: ...' notices go through the 'statetx' logger: printed by default,
    silenced by raising its level (warnings are not affected)."""
    import logging

    model, adata = fitted
    new_ct = adata.copy()
    new_ct.obs["cell_type"] = new_ct.obs["cell_type"].astype(str) + "_new"  # said: zero-shot
    model.predict(new_ct)
    assert "statetx: cell type(s) not in the model's data" in capsys.readouterr().out
    log = logging.getLogger("statetx")
    level = log.level
    try:
        log.setLevel(logging.WARNING)
        model.predict(new_ct)
        assert "statetx:" not in capsys.readouterr().out
    finally:
        log.setLevel(level)
    # set before statetx's submodules are imported (the usual order): the level stays
    import subprocess
    import sys

    code = ("import logging; logging.getLogger('statetx').setLevel('WARNING'); "
            "import statetx; from statetx._utils import say; say('hello')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "hello" not in out.stdout


def test_cell_type_key_names_the_cell_type_column_everywhere(fitted):
    """The estimators' ``cell_type_key`` is accepted by predict, score, the baselines,
    evaluate, ceiling and the plots (which also take their own names for it)."""
    import matplotlib

    matplotlib.use("Agg")
    from statetx import pl
    from statetx.baselines import PerturbMeanBaseline
    from statetx.metrics import ceiling, evaluate

    model, adata = fitted
    other = adata.copy()
    other.obs = other.obs.rename(columns={"cell_type": "ct"})
    a = model.predict(other, cell_type_key="ct")
    b = model.predict(other, cell_type_col="ct")
    np.testing.assert_array_equal(a.X, b.X)
    with pytest.raises(ConfigError, match="cell_type_col='cell_type' and cell_type_key='ct'"):
        model.predict(other, cell_type_col="cell_type", cell_type_key="ct")
    with pytest.raises(DataError, match="no obs column 'cell_type'.*columns: gene, ct, batch"):
        model.predict(other)  # the training column is missing: the key is not ignored
    assert model.score(other, cell_type_key="ct") == model.score(other, cell_type_col="ct")
    base = PerturbMeanBaseline(pert_col="gene", cell_type_key="cell_type", control_pert="ctrl")
    base.fit(adata, SPEC)
    np.testing.assert_array_equal(base.predict(other, cell_type_key="ct", seed=1).X,
                                  base.predict(other, cell_type_col="ct", seed=1).X)
    pred = b.copy()
    res_key, _ = evaluate(pred, other, cell_type_key="ct", profile="minimal")
    res_col, _ = evaluate(pred, other, celltype_col="ct", profile="minimal")
    assert sorted(res_key["celltype"].unique()) == ["CT0", "CT1", "CT2"]
    pd.testing.assert_frame_equal(res_key, res_col)
    with pytest.raises(ConfigError, match="pass one"):
        evaluate(pred, other, celltype_col="gene", cell_type_key="ct")
    _, agg = ceiling(other, "gene", "ctrl", cell_type_key="ct", profile="minimal")
    assert list(agg["celltype"]) == ["CT0", "CT1", "CT2"]
    ax = pl.delta_scatter(pred, other, cell_type_key="ct", perts=["P0"])
    assert len(ax.collections) == 3  # one series per cell type
    pl.top_genes(pred, other, "P0", cell_type_key="ct", cell_type="CT1")
    matplotlib.pyplot.close("all")


def test_basal_self_predicts_each_cell_from_its_own_expression(fitted):
    """basal='self': "these cells, perturbed" (spec inference §3.4) — no control draws, the
    output's ctrl barcode is the cell itself, and no controls are needed."""
    model, adata = fitted
    ctrl = adata[adata.obs["gene"] == "ctrl"].copy()
    relabelled = ctrl.copy()
    relabelled.obs["gene"] = "P1"  # every control, with P1 applied
    out = model.predict(relabelled, basal="self")
    assert (out.obs["statetx_ctrl_barcode"] == out.obs_names).all()
    assert out.uns["statetx"]["basal"] == "self" and "basal_pool" not in out.uns["statetx"]
    # the same as running the network on each cell's own set of cells
    one_ct = relabelled[relabelled.obs["cell_type"] == "CT0"]
    sets = out[one_ct.obs_names]
    for s in np.unique(sets.obs["statetx_set"]):
        cells = sets.obs_names[sets.obs["statetx_set"] == s]
        direct = model.predict_sets(np.asarray(one_ct[cells].X)[None], "P1")[0]
        np.testing.assert_allclose(sets[cells].X, np.clip(direct, 0, 14), atol=1e-5)
    # seeds do not matter (nothing is drawn); sampled basal cells do depend on them
    np.testing.assert_array_equal(model.predict(relabelled, basal="self", seed=3).X, out.X)
    mixed = adata.copy()
    a = model.predict(mixed, seed=1, predict_controls=False)
    b = model.predict(mixed, seed=2, predict_controls=False)
    assert not np.allclose(a.X, b.X)
    # simulate: every control once per perturbation, each clone from the control it copies
    sim = model.simulate(ctrl, ["P0", "P2"], basal="self")
    virtual = sim[sim.obs["gene"] != "ctrl"]
    assert virtual.n_obs == 2 * ctrl.n_obs
    assert sorted(virtual.obs["statetx_ctrl_barcode"]) == sorted(2 * list(ctrl.obs_names))
    as_p0 = ctrl.copy()
    as_p0.obs["gene"] = "P0"
    direct = model.predict(as_p0, basal="self")
    sim_p0 = virtual[virtual.obs["gene"] == "P0"]
    np.testing.assert_allclose(sim_p0.X, direct[sim_p0.obs["statetx_ctrl_barcode"]].X,
                               atol=1e-6)
    with pytest.raises(ConfigError, match="basal='self' draws none"):
        model.predict(relabelled, basal="self", basal_pool="all")
    with pytest.raises(ConfigError, match="basal='self'"):
        model.score(adata, basal="self")
    with pytest.raises(ConfigError, match="basal='bogus' is invalid"):
        model.predict(relabelled, basal="bogus")
    with pytest.raises(DataError, match="basal='self' predicts each cell from itself"):
        model.predict(relabelled)  # sampled basal cells need controls


def test_predictions_pair_and_hash_as_the_fitted_model(synth):
    """Changing parameters after fit does not change how the fitted model pairs controls; a
    fine-tune (fused Adam: no version bump) gives a new model_id."""
    m = small_model(batch_col="batch", max_steps=2).fit(synth, SPEC)
    before = m.predict(synth, seed=3)
    m.set_params(basal_mapping_strategy="random", batch_col=None)
    after = m.predict(synth, seed=3)
    assert after.uns["statetx"]["basal_pool"] == "batch"
    np.testing.assert_array_equal(after.X, before.X)
    m.finetune_on_controls(2, lr=1e-2)
    tuned = m.predict(synth, seed=3)
    assert not np.allclose(tuned.X, before.X)
    assert tuned.uns["statetx"]["model_id"] != before.uns["statetx"]["model_id"]


def test_subclass_with_kwargs_keeps_the_parents_parameters(tmp_path):
    class Custom(StateTransitionModel):
        def __init__(self, extra=0, **kwargs):
            super().__init__(**kwargs)
            self.extra = extra

    c = Custom(extra=1, lr=3e-3, seed=7)
    params = c.get_params()
    assert (params["extra"], params["lr"], params["seed"]) == (1, 3e-3, 7)
    d = clone(c)
    assert (d.extra, d.lr, d.seed) == (1, 3e-3, 7)
    with pytest.raises(ConfigError, match="name the entry after '__'"):
        StateTransitionModel().set_params(model_kwargs__=5)


def test_init_from_rebuilds_the_pert_encoder_and_decoder_whole(fitted, tmp_path, capsys):
    """As the reference: another perturbation width rebuilds the whole perturbation encoder
    (not only its first layer); other tensors load where they fit."""
    import dataclasses

    from statetx.nn import StateTransitionNetwork
    from statetx.run import partial_load

    model, _ = fitted
    src = model.save(tmp_path / "m")
    c = model.network_config_

    def net(pert_dim: int) -> StateTransitionNetwork:
        torch.manual_seed(1)
        return StateTransitionNetwork(dataclasses.replace(c, pert_dim=pert_dim))

    loaded, reinit, _ = partial_load(net(c.pert_dim), src)
    assert not reinit and any(k.startswith("pert_encoder.") for k in loaded)
    wider = net(c.pert_dim + 3)
    fresh = {k: v.clone() for k, v in wider.state_dict().items()}
    loaded, reinit, _ = partial_load(wider, src)
    pe = [k for k in fresh if k.startswith("pert_encoder.")]
    assert len(pe) > 2 and set(pe) <= set(reinit) and not set(pe) & set(loaded)
    for k in pe:  # left at their fresh initialisation
        torch.testing.assert_close(wider.state_dict()[k], fresh[k])
    assert "rebuilt whole: pert_encoder" in capsys.readouterr().out
    assert any(k.startswith("transformer") for k in loaded)


@pytest.fixture(scope="module")
def held_out_batch(tmp_path_factory):
    """A batch-encoder model whose test cell type (CT2) is a batch of its own, "a_held" (first
    in the vocabulary), with its controls out of training too: no training cells, so its
    embedding row never trained."""
    from conftest import make_synthetic

    adata = make_synthetic()
    adata.obs["batch"] = np.where(adata.obs["cell_type"] == "CT2", "a_held", adata.obs["batch"])
    run = tmp_path_factory.mktemp("held") / "run"
    m = small_model(batch_col="batch", model_kwargs={**SMALL, "batch_encoder": True},
                    heldout_controls_in_train=False).fit(adata, SPEC, output_dir=run)
    return m, adata


def _with_batch_row(model, name: str, row: torch.Tensor):
    """A copy of ``model`` whose embedding of batch ``name`` is ``row`` and whose every batch
    counts as trained (the old behaviour: that row is used as it is)."""
    import copy

    from statetx import persist

    ref = copy.deepcopy(model)
    ref.trained_batches_ = None
    persist.mark_trained_batches(ref)
    with torch.no_grad():
        ref.network_.batch_encoder.weight[ref.vocab_.batches.index(name)] = row
    return ref


def test_a_batch_without_training_cells_is_not_predicted_from_its_untrained_row(held_out_batch):
    m, adata = held_out_batch
    assert m.vocab_.batches == ["a_held", "b0", "b1"]
    assert m.trained_batches_ == ["b0", "b1"]
    table = m.network_.batch_encoder.weight.detach().clone()
    # its row never received a gradient: the same after 1 training step as after 6
    one = m.__class__(**{**m.get_params(), "max_steps": 1}).fit(adata, SPEC)
    torch.testing.assert_close(one.network_.batch_encoder.weight[0], table[0], rtol=0, atol=0)
    assert not torch.allclose(one.network_.batch_encoder.weight[1:], table[1:])
    mean = _with_batch_row(m, "a_held", table[1:].mean(0))

    # predict_split (held-out evaluation): the mean embedding of the trained batches, warned
    with pytest.warns(UserWarning, match=r"1 batch\(es\) of the test split had no training "
                                         r"cells: a_held\..*mean embedding of the trained") as w:
        pred, _ = m.predict_split("test")
    assert w[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(pred.X, mean.predict_split("test")[0].X)

    # predict: an error naming the batch, else the chosen policy over the trained batches
    test = adata[adata.obs["cell_type"] == "CT2"].copy()
    with pytest.raises(DataError, match=r"batch\(es\) a_held had no training cells \(e\.g\. "
                                        r"held out.*unknown_batch='mean'.*'first'"):
        m.predict(test)
    got = m.predict(test, unknown_batch="mean", seed=1).X
    np.testing.assert_allclose(got, mean.predict(test, seed=1).X, rtol=1e-5, atol=1e-6)
    every = _with_batch_row(m, "a_held", table.mean(0))  # (the untrained row in the mean)
    assert not np.allclose(got, every.predict(test, seed=1).X, atol=1e-3)
    first = _with_batch_row(m, "a_held", table[1])  # "first": the first *trained* batch, b0
    np.testing.assert_allclose(m.predict(test, unknown_batch="first", seed=1).X,
                               first.predict(test, seed=1).X, rtol=1e-5, atol=1e-6)
    # (simulate and score go through predict)
    with pytest.raises(DataError, match="a_held had no training cells"):
        m.simulate(test, ["P1"], n_cells=2)
    with pytest.raises(DataError, match="a_held had no training cells"):
        m.score(test)
    assert np.isfinite(m.score(test, unknown_batch="mean"))


def test_finetuning_a_held_out_batch_starts_it_at_the_mean_and_uses_its_row(held_out_batch):
    """Test-time fine-tuning on the held-out batch's controls: its row starts at the trained
    batches' mean (not its random start), then counts as trained, so predictions read the tuned
    row (the network's evaluation path would otherwise discard the fine-tuning of that row)."""
    import copy

    m, _ = held_out_batch
    tuned = copy.deepcopy(m)
    table = m.network_.batch_encoder.weight.detach().clone()
    # zero steps at lr 0 would be refused; one step at a tiny lr leaves the start visible
    tuned.finetune_on_controls(1, "test", lr=1e-12)
    assert tuned.trained_batches_ == ["a_held", "b0", "b1"]
    assert tuned.network_.trained_batches.tolist() == [0, 1, 2]
    torch.testing.assert_close(tuned.network_.batch_encoder.weight[0], table[1:].mean(0))
    with torch.no_grad():  # the row is read now: moving it moves the predictions
        tuned.network_.batch_encoder.weight[0] += 100.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no held-out-batch warning any more)
        moved = tuned.predict_split("test")[0].X
    assert not np.allclose(moved, m.predict_split("test")[0].X, atol=1e-3)


@pytest.mark.parametrize("reload", ["pickle", "save", "run", "arc"])
def test_reloaded_model_keeps_its_trained_batches(held_out_batch, tmp_path, reload):
    m, adata = held_out_batch
    if reload == "pickle":
        other = pickle.loads(pickle.dumps(m))
    elif reload == "save":
        other = StateTransitionModel.load(m.save(tmp_path / "m"))
    elif reload == "arc":  # (export-arc records them beside who trained the weights)
        other = StateTransitionModel.from_arc_state(m.to_arc_state(tmp_path / "arc"),
                                                    verbose=False)
    else:
        other = StateTransitionModel.load_run(m.run_dir_, verbose=False)
    assert other.trained_batches_ == ["b0", "b1"]
    assert other.network_.trained_batches.tolist() == [1, 2]
    test = adata[adata.obs["cell_type"] == "CT2"].copy()
    with pytest.raises(DataError, match="a_held had no training cells"):
        other.predict(test)
    np.testing.assert_array_equal(other.predict(test, unknown_batch="mean", seed=2).X,
                                  m.predict(test, unknown_batch="mean", seed=2).X)


def test_a_model_without_the_record_counts_every_batch_as_trained(held_out_batch):
    """Models saved before trained_batches_ (and imported ones) keep the old behaviour."""
    import copy

    from statetx import persist

    m, adata = held_out_batch
    old = copy.deepcopy(m)
    del old.trained_batches_
    persist.mark_trained_batches(old)
    assert old.network_.trained_batches is None
    test = adata[adata.obs["cell_type"] == "CT2"].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        old.predict(test)
        old.predict_split("test")


def test_a_model_without_batch_encoder_ignores_held_out_batches(held_out_batch):
    _, adata = held_out_batch
    m = small_model(batch_col="batch", max_steps=1, heldout_controls_in_train=False).fit(
        adata, SPEC)
    assert m.trained_batches_ is None and m.network_.batch_encoder is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.predict_split("test")
        m.predict(adata[adata.obs["cell_type"] == "CT2"].copy())


def test_batch_encoder_without_a_batch_column_and_group_independent_clones(synth):
    m = small_model(model_kwargs={**SMALL, "batch_encoder": True}, batch_col="batch",
                    basal_mapping_strategy="random", max_steps=2).fit(synth, SPEC)
    bare = synth.copy()
    del bare.obs["batch"]
    with pytest.raises(DataError, match="batch encoder, which takes each cell's batch.*"
                                        "unknown_batch='mean'"):
        m.predict(bare)
    mean = m.predict(bare, unknown_batch="mean", seed=0)
    assert np.isfinite(mean.X).all()
    assert not np.allclose(mean.X, m.predict(bare, unknown_batch="first", seed=0).X)
    # a group's clones / subsample do not depend on the other groups in the input
    model = small_model(max_steps=2).fit(synth, SPEC)
    ct2 = synth[synth.obs["cell_type"] == "CT2"].copy()
    for opts in ({"max_cells": 10}, {"min_cells": 40}):
        every = model.predict(synth, seed=1, **opts)
        alone = model.predict(ct2, seed=1, **opts)
        sub = every[every.obs["cell_type"] == "CT2"]
        assert list(sub.obs["statetx_ctrl_barcode"]) == list(alone.obs["statetx_ctrl_barcode"])
        np.testing.assert_allclose(sub.X, alone.X, atol=1e-6)
        assert every.uns["statetx"]["set_len"] == model.cell_set_len_
    ctrl = synth[synth.obs["gene"] == "ctrl"].copy()
    one = model.simulate(ctrl, ["P1"], n_cells=5)
    two = model.simulate(ctrl, ["P0", "P1"], n_cells=5)
    names = one.obs_names[one.obs["gene"] == "P1"]
    np.testing.assert_array_equal(one[names].obs["statetx_ctrl_barcode"],
                                  two[names].obs["statetx_ctrl_barcode"])
    # basal='self' clones control cells: an input without any is an error, not an empty result
    relabelled = ctrl.copy()
    relabelled.obs["gene"] = "P1"
    with pytest.raises(DataError, match="virtual cells are clones of the input's control cells"):
        model.simulate(relabelled, ["P0"], n_cells=5, basal="self")


def test_predict_inplace_writes_the_arc_layout_into_the_input(fitted):
    model, adata = fitted
    copy = model.predict(adata, layout="arc", seed=2)
    target = adata.copy()
    assert model.predict(target, inplace=True, seed=2) is None
    assert not np.allclose(np.asarray(target.X), np.asarray(adata.X))  # (the prediction is in X)
    np.testing.assert_array_equal(np.asarray(target.X), np.asarray(copy.X))
    assert set(target.obsm) == set(copy.obsm)
    for k in copy.obsm:
        np.testing.assert_array_equal(np.asarray(target.obsm[k]), np.asarray(copy.obsm[k]))
    pd.testing.assert_frame_equal(target.obs, copy.obs)
    assert target.uns["statetx"]["model_id"] == copy.uns["statetx"]["model_id"]
    with pytest.raises(ConfigError, match="inplace=True writes one prediction per input cell"):
        model.predict(adata.copy(), inplace=True, all_perts=True)
    # .raw holds the measured cells, which scanpy's tools read first: left out of a new AnnData
    # (X predicted), kept with a warning in the input itself
    with_raw = adata.copy()
    with_raw.raw = with_raw
    assert model.predict(with_raw, layout="arc", seed=2).raw is None
    with pytest.warns(UserWarning, match=r"\.raw still holds the measured values"):
        model.predict(with_raw, inplace=True, seed=2)
    assert with_raw.raw is not None
    parent = adata.copy()
    view = parent[parent.obs["cell_type"] == parent.obs["cell_type"].iloc[0]]
    with pytest.warns(UserWarning, match="the AnnData it was taken from is not changed"):
        model.predict(view, inplace=True, seed=2)
    np.testing.assert_array_equal(np.asarray(parent.X), np.asarray(adata.X))


def test_predict_inplace_into_obsm_leaves_x_and_layers_the_inputs(synth):
    """An X_hvg model predicts into obsm['X_hvg'] (where arc-state writes): X and the layers
    still hold the input, as in arc-state's layout; nothing is renamed."""
    a = synth.copy()
    a.obsm["X_hvg"] = np.asarray(a.X[:, :16], dtype=np.float32)
    a.uns["X_hvg_var_names"] = np.asarray(a.var_names[:16])
    a.layers["counts"] = np.expm1(a.X)
    m = small_model(embed_key="X_hvg", max_steps=1).fit(a, SPEC)
    target = a.copy()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert m.predict(target, inplace=True, seed=1) is None
    assert not [w for w in said if "inplace" in str(w.message)]
    assert list(target.layers) == ["counts"] and set(target.obsm) == {"X_hvg"}
    np.testing.assert_array_equal(target.X, a.X)
    assert not np.allclose(target.obsm["X_hvg"], a.obsm["X_hvg"])


def test_training_draws_do_not_replay_the_initialisation(synth, monkeypatch):
    """The network is built right after seeding the CPU generator with ``seed``; the first
    training step (dropout) draws from a stream derived from it, not from ``seed`` again (its
    masks would be cut from the very words that initialised the weights)."""
    from statetx.train import Trainer

    states = []
    original = Trainer._train_step

    def recording(self, batches):
        states.append(torch.default_generator.get_state())
        return original(self, batches)

    monkeypatch.setattr(Trainer, "_train_step", recording)
    small_model(max_steps=2, seed=5).fit(synth, SPEC)
    fresh = torch.Generator().manual_seed(5).get_state()  # (what initialised the weights)
    assert not torch.equal(states[0], fresh)
    first = list(states)
    states.clear()
    small_model(max_steps=2, seed=5).fit(synth, SPEC)
    assert all(torch.equal(a, b) for a, b in zip(first, states))  # (from the seed alone)


def test_fit_warnings_point_at_the_callers_line(synth):
    """Every warning fit gives (here: a perturbation without training cells, a validation on
    it skipped, an idle early-stopping option) names the line that called fit, not statetx's."""
    from pathlib import Path

    import statetx

    held = {"val": ["P0"]}
    spec = {"training": {"data": "train"},
            "fewshot": {f"data.CT{i}": held for i in range(3)}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small_model(max_steps=2, early_stopping_patience=2).fit(synth, spec)
    ours = [w for w in caught if issubclass(w.category, UserWarning)]
    assert any("without training cells" in str(w.message) for w in ours)
    inside = Path(statetx.__file__).parent
    assert not [(w.filename, w.lineno, str(w.message)[:60]) for w in ours
                if Path(w.filename).is_relative_to(inside)]
