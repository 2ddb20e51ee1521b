"""Baselines (metrics.md §13): API, zero-shot rules and numbers on synthetic and real data."""

from __future__ import annotations

import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import make_synthetic
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from statetx.baselines import (
    BASELINES,
    DEFAULT_BASELINES,
    AdditiveBaseline,
    CellMeanBaseline,
    ContextMeanBaseline,
    ControlMeanBaseline,
    LinearBaseline,
    PerturbMeanBaseline,
    fit_all_baselines,
)
from statetx.errors import ConfigError, DataError
from statetx.metrics import evaluate
from statetx.run import attach_data

SPEC = '[training]\ndata = "train"\n[zeroshot]\n"data.CT2" = "test"\n'
SYN = dict(pert_col="gene", cell_type_key="cell_type", control_pert="ctrl", seed=0)
KANG_SPEC = '[training]\nkang = "train"\n[zeroshot]\n"kang.B cells" = "test"\n'
KANG = dict(pert_col="target_gene", cell_type_key="cell_type", batch_col="batch",
            control_pert="control")


def constant_shift_data(seed: int = 0):
    """Perturbed cells = the cell type's control cells + δ_p, the same δ_p in every cell type."""
    a = make_synthetic(n_cells=30, n_controls=30, seed=seed)
    rng = np.random.default_rng(seed)
    x = np.asarray(a.X).copy()
    deltas = {p: rng.uniform(0, 2, a.n_vars).astype(np.float32) for p in ("P0", "P1", "P2")}
    for ct in ("CT0", "CT1", "CT2"):
        ctrl = np.flatnonzero((a.obs["cell_type"] == ct) & (a.obs["gene"] == "ctrl"))
        for p, d in deltas.items():
            rows = np.flatnonzero((a.obs["cell_type"] == ct) & (a.obs["gene"] == p))
            x[rows] = x[ctrl] + d
    a.X = x
    return a, deltas


def mean_shift_r(pred, real, pert_col: str, control: str, pert: str) -> tuple[float, float]:
    """(pearson, |pred shift| / |real shift|) of the mean shift vs the same split's controls."""
    g = real.obs[pert_col].astype(str).to_numpy()
    pred, real = pred.copy(), real.copy()
    pred.X, real.X = pred.X.astype(np.float64), real.X.astype(np.float64)
    real_shift = real.X[g == pert].mean(0) - real.X[g == control].mean(0)
    pred_shift = pred.X[g == pert].mean(0) - pred.X[g == control].mean(0)
    ratio = float(np.linalg.norm(pred_shift) / np.linalg.norm(real_shift))
    r = np.nan if pred_shift.std() < 1e-5 else float(np.corrcoef(real_shift, pred_shift)[0, 1])
    return r, ratio


# ---------------------------------------------------------------------- sklearn protocol
@pytest.mark.parametrize("cls", list(BASELINES.values()))
def test_init_stores_params_clone_and_not_fitted(cls):
    m = cls(pert_col="target_gene", control_pert="control", seed=3)
    params = m.get_params()
    assert {"pert_col", "cell_type_key", "batch_col", "control_pert", "embed_key", "seed"} <= \
        set(params)
    c = clone(m).set_params(seed=7)
    assert c.seed == 7 and m.seed == 3 and c.pert_col == "target_gene"
    with pytest.raises(NotFittedError):
        m.predict(make_synthetic())
    with pytest.raises(NotFittedError):
        m.predict_split()


def test_bad_options_are_config_errors(synth):
    for m, word in [(ControlMeanBaseline("median", **SYN), "mode"),
                    (ContextMeanBaseline("zero", **SYN), "zeroshot_fallback"),
                    (LinearBaseline(cell_mode="x", **SYN), "cell_mode"),
                    (LinearBaseline(on_missing="x", **SYN), "on_missing"),
                    (LinearBaseline(pert_embedding=3, **SYN), "pert_embedding"),
                    (AdditiveBaseline("", **SYN), "sep"),
                    (PerturbMeanBaseline(**{**SYN, "seed": -1}), "seed=-1"),
                    (CellMeanBaseline(**{**SYN, "seed": "abc"}), "seed='abc'")]:
        with pytest.raises(ConfigError, match=word):
            m.fit(synth, SPEC)


# ---------------------------------------------------------------------- synthetic behaviour
def test_perfect_recovery_of_a_shift_shared_by_all_cell_types():
    a, deltas = constant_shift_data()
    x_by_barcode = pd.DataFrame(np.asarray(a.X), index=a.obs_names)
    for m in (PerturbMeanBaseline(**SYN), LinearBaseline(ridge=0.0, **SYN),
              LinearBaseline(ridge=0.0, cell_mode="constant", **SYN)):
        m.fit(a, SPEC)
        pred, real = m.predict_split("test")
        g = pred.obs["gene"].astype(str).to_numpy()
        for p, d in deltas.items():
            rows = g == p
            if m.get_params().get("cell_mode") == "constant":
                ctrl = real.X[g == "ctrl"].mean(0)
                np.testing.assert_allclose(pred.X[rows], np.tile(ctrl + d, (rows.sum(), 1)),
                                           atol=1e-4)
            else:
                basal = x_by_barcode.loc[pred.obs["ctrl_cell_barcode"][rows]].to_numpy()
                np.testing.assert_allclose(pred.X[rows] - basal, np.tile(d, (rows.sum(), 1)),
                                           atol=1e-4)


def test_predict_layout_seeding_and_controls_unchanged(synth):
    m = PerturbMeanBaseline(**SYN).fit(synth, SPEC)
    sub = synth[synth.obs["cell_type"] == "CT2"].copy()
    pred = m.predict(sub)
    assert pred.shape == sub.shape and (pred.obs_names == sub.obs_names).all()
    assert list(pred.obs.columns) == list(sub.obs.columns) + ["statetx_ctrl_barcode",
                                                             "statetx_set"]
    assert list(pred.var_names) == list(synth.var_names) and pred.X.dtype == np.float32
    is_ctrl = (sub.obs["gene"] == "ctrl").to_numpy()
    np.testing.assert_array_equal(pred.X[is_ctrl], np.asarray(sub.X)[is_ctrl])
    assert set(pred.obs["statetx_ctrl_barcode"]) <= set(sub.obs_names[is_ctrl])
    assert pred.X.min() >= 0 and pred.X.max() <= 14
    np.testing.assert_array_equal(pred.X, m.predict(sub).X)
    assert not np.array_equal(pred.X, m.predict(sub, seed=1).X)
    np.testing.assert_array_equal(m.predict(sub, predict_controls=False).X, pred.X)
    assert 0.5 < m.score(sub) <= 1.0


@pytest.mark.parametrize("batch_col", [None, "batch"])
def test_basal_draws_match_the_st_model(synth, batch_col):
    """Same seed, same cells: with a batch column both pair within the batch (ST's default)."""
    from statetx import StateTransitionModel

    data = synth.copy()
    data.obs["batch"] = np.random.default_rng(0).choice(["b1", "b2", "b3"], data.n_obs)
    ctrl = (data.obs["gene"] == "ctrl").to_numpy()
    no_b3 = ctrl & (data.obs["cell_type"] == "CT0").to_numpy() & (data.obs["batch"] == "b3")
    data.obs.loc[no_b3, "batch"] = "b1"  # CT0's b3 cells have no b3 controls: the cell type's
    cols = {**SYN, "batch_col": batch_col}
    st = StateTransitionModel("tiny", **cols, max_steps=1, batch_size=2, cell_set_len=8,
                              progress=False,
                              model_kwargs={"hidden_dim": 32, "n_heads": 2, "head_dim": 16,
                                            "n_kv_heads": 2, "intermediate_size": 128,
                                            "n_layers": 1})
    st.fit(data, SPEC)
    bl = ControlMeanBaseline(**cols).fit(data, SPEC)
    pert = (data.obs["gene"] != "ctrl").to_numpy()
    a = st.predict(data, seed=5).obs["statetx_ctrl_barcode"][pert]
    bl_out = bl.predict(data, seed=5)
    b = bl_out.obs["statetx_ctrl_barcode"][pert]
    assert (a == b).all()
    same = data.obs["batch"][pert].to_numpy() == data.obs["batch"][b].to_numpy()
    orphan = ((data.obs["cell_type"] == "CT0") & (data.obs["batch"] == "b3")).to_numpy()[pert]
    assert orphan.any() and not same[orphan].any()  # no b3 controls in CT0: the cell type's
    assert (data.obs["cell_type"][b].to_numpy() == data.obs["cell_type"][pert].to_numpy()).all()
    assert same[~orphan].all() if batch_col else same.mean() < 0.6
    assert bl_out.uns["statetx"]["basal_pool"] == ("batch" if batch_col else "cell_type")
    # the default pairing is fixed at fit (as ST's): naming the input's batch column keeps it
    assert bl.predict(data, seed=5, batch_col="batch").uns["statetx"]["basal_pool"] == \
        bl_out.uns["statetx"]["basal_pool"]
    st_pred, _ = st.predict_split("test", seed=5)
    bl_pred, _ = bl.predict_split("test", seed=5)
    assert (st_pred.obs["pert_cell_barcode"] == bl_pred.obs["pert_cell_barcode"]).all()
    p = (bl_pred.obs["gene"] != "ctrl").to_numpy()
    assert (st_pred.obs["ctrl_cell_barcode"][p] == bl_pred.obs["ctrl_cell_barcode"][p]).all()
    # a cell type without controls draws from every control (basal_fallback), alike
    lone = data[~(ctrl & (data.obs["cell_type"] == "CT1").to_numpy())].copy()
    p1 = (lone.obs["gene"] != "ctrl").to_numpy()
    a = st.predict(lone, seed=5, basal_fallback="all_controls").obs["statetx_ctrl_barcode"]
    b = bl.predict(lone, seed=5, basal_fallback="all_controls").obs["statetx_ctrl_barcode"]
    assert (a[p1] == b[p1]).all()
    if batch_col:  # choosing the pool at predict time
        pooled = bl.predict(data, seed=5, basal_pool="cell_type").obs["statetx_ctrl_barcode"]
        assert (pooled[pert] == st.predict(data, seed=5, basal_pool="cell_type")
                .obs["statetx_ctrl_barcode"][pert]).all()
        with pytest.raises(DataError, match="no obs column 'batch'.*basal_pool='cell_type'"):
            bl.predict(ad.AnnData(data.X, obs=data.obs.drop(columns="batch"), var=data.var))


def test_two_datasets_sharing_a_cell_type_name_are_told_apart(synth):
    """predict_split marks each cell's dataset, and warns that a cell-type name shared by two
    datasets would pool them wherever cells are grouped by cell type alone."""
    spec = ('[training]\na = "train"\nb = "train"\n[zeroshot]\n"a.CT2" = "test"\n'
            '"b.CT2" = "test"\n')
    m = ControlMeanBaseline(**SYN).fit({"a": synth, "b": synth[::2].copy()}, spec)
    with pytest.warns(UserWarning, match=r"'CT2' in a, b.*obs\['dataset'\]"):
        pred, real = m.predict_split("test")
    n_a = int((synth.obs["cell_type"] == "CT2").sum())
    assert (pred.obs["dataset"] == "a").sum() == n_a
    assert (real.obs["dataset"] == "b").sum() == len(pred) - n_a


def test_context_mean_and_cell_mean_constants(synth):
    ctx = ContextMeanBaseline("control_mean", **SYN).fit(synth, SPEC)
    x, obs = np.asarray(synth.X, dtype=np.float64), synth.obs
    ct0 = ((obs["cell_type"] == "CT0") & (obs["gene"] != "ctrl")).to_numpy()
    sub = synth[obs["cell_type"].isin(["CT0", "CT2"]).to_numpy()].copy()
    pred = ctx.predict(sub)
    rows = ((pred.obs["cell_type"] == "CT0") & (pred.obs["gene"] != "ctrl")).to_numpy()
    np.testing.assert_allclose(pred.X[rows], np.tile(x[ct0].mean(0), (rows.sum(), 1)), atol=1e-5)
    zs = ((pred.obs["cell_type"] == "CT2") & (pred.obs["gene"] != "ctrl")).to_numpy()
    ct2_ctrl = ((obs["cell_type"] == "CT2") & (obs["gene"] == "ctrl")).to_numpy()
    np.testing.assert_allclose(pred.X[zs], np.tile(x[ct2_ctrl].mean(0), (zs.sum(), 1)),
                               atol=1e-5)  # zero-shot fallback: the control mean
    assert "zero-shot" in pred.uns["statetx"]["notes"]
    cm = CellMeanBaseline(**SYN).fit(synth, SPEC)
    train = ~((obs["cell_type"] == "CT2") & (obs["gene"] != "ctrl")).to_numpy()
    groups = pd.DataFrame(x[train]).groupby(
        [obs["cell_type"].to_numpy()[train], obs["gene"].to_numpy()[train]]).mean()
    assert len(groups) == 3 * 4 - 3  # CT2's controls are training groups too
    np.testing.assert_allclose(cm.cell_mean_, groups.mean().to_numpy(), atol=1e-6)


def test_linear_gene_embedding_predicts_unseen_gene_perturbations():
    a = make_synthetic(seed=1)
    names = {"P0": "G3", "P1": "G10", "P2": "G20", "ctrl": "ctrl"}
    a.obs["gene"] = a.obs["gene"].map(names)
    m = LinearBaseline(**SYN).fit(a, SPEC)
    assert m.embedding_source_ == "genes" and m.gene_embedding_.shape[0] == a.n_vars
    sub = a[a.obs["cell_type"] == "CT2"].copy()
    sub.obs["gene"] = sub.obs["gene"].replace({"G3": "G5"})  # G5 was never perturbed
    pred = m.predict(sub)  # G5 has a vector (its gene's row): no unknown_perturbation needed
    rows = (sub.obs["gene"] == "G5").to_numpy()
    basal = np.asarray(sub[pred.obs["statetx_ctrl_barcode"][rows]].X)
    np.testing.assert_allclose(pred.X[rows], np.clip(basal + m.delta("G5"), 0, 14), atol=1e-5)
    with pytest.raises(DataError, match="NOPE"):  # a label without any vector still is checked
        m.predict(sub.obs.assign(gene=sub.obs["gene"].replace({"G5": "NOPE"})).pipe(
            lambda o: ad.AnnData(sub.X, obs=o, var=sub.var)))
    # one-hot vectors never cover an unseen perturbation: the average delta, said (as
    # on_missing="mean"), not an error that stops a loop over the baselines
    onehot = LinearBaseline(pert_embedding="onehot", **SYN).fit(a, SPEC)
    said = onehot.predict(sub, unknown_perturbation="zeros")
    assert "no one-hot vector: G5" in said.uns["statetx"]["notes"]
    fallback = LinearBaseline(pert_embedding="onehot", on_missing="mean", **SYN).fit(a, SPEC)
    out = fallback.predict(sub, unknown_perturbation="zeros")
    np.testing.assert_array_equal(out.X, said.X)
    basal = np.asarray(sub[out.obs["statetx_ctrl_barcode"][rows]].X)
    np.testing.assert_allclose(out.X[rows], np.clip(basal + fallback.bias_, 0, 14), atol=1e-5)


def test_linear_external_embedding_and_missing_vectors(synth):
    rng = np.random.default_rng(0)
    emb = {p: rng.normal(size=4) for p in ("P0", "P1", "P2")}
    m = LinearBaseline(pert_embedding=emb, **SYN).fit(synth, SPEC)
    assert m.embedding_source_ == "external" and m.coef_.shape[1] == 4
    assert np.isfinite(m.predict_split("test")[0].X).all()
    partial = {p: emb[p] for p in ("P0", "P1")}
    with pytest.raises(DataError, match="P2"):
        LinearBaseline(pert_embedding=partial, **SYN).fit(synth, SPEC)
    cm = LinearBaseline(pert_embedding=partial, on_missing="context_mean", **SYN).fit(synth, SPEC)
    sub = synth[synth.obs["cell_type"] == "CT0"].copy()
    pred = cm.predict(sub)
    rows = (sub.obs["gene"] == "P2").to_numpy()
    ctx = ContextMeanBaseline(**SYN).fit(synth, SPEC).predict(sub)
    np.testing.assert_allclose(pred.X[rows], ctx.X[rows], atol=1e-5)


def test_bad_input_errors_name_the_problem(synth):
    m = PerturbMeanBaseline(**SYN).fit(synth, SPEC)
    bad = synth.copy()
    bad.obs = bad.obs.rename(columns={"gene": "guide"})
    with pytest.raises(DataError, match="'gene'"):
        m.predict(bad)
    with pytest.raises(DataError, match="'gene'"):
        PerturbMeanBaseline(pert_col="gene", control_pert="ctrl").fit(bad, SPEC)
    with pytest.raises(DataError, match="cell_type"):
        m.predict(synth, cell_type_col="celltype")
    twins = synth.copy()
    twins.obs_names = ["same"] * twins.n_obs  # statetx_ctrl_barcode would be ambiguous
    with pytest.raises(DataError, match="duplicate cell names"):
        m.predict(twins)
    odd = synth.copy()
    odd.obs["gene"] = odd.obs["gene"].replace({"P1": "P9"})
    with pytest.raises(DataError, match="P9"):
        m.predict(odd)
    zero = m.predict(odd, unknown_perturbation="zeros")
    rows = (odd.obs["gene"] == "P9").to_numpy()
    basal = np.asarray(synth[zero.obs["statetx_ctrl_barcode"][rows]].X)
    np.testing.assert_allclose(zero.X[rows], basal)  # unseen perturbation: zero shift
    assert "zero shift" in zero.uns["statetx"]["notes"]
    with pytest.raises(DataError, match="no control cells.*Did you mean: 'ctrl'"):
        m.predict(synth, control_pert="ctr")
    nan = synth.copy()
    nan.X[3, 0] = np.nan
    with pytest.raises(DataError, match="1 input cell has NaN or Inf values"):
        m.predict(nan)
    with pytest.raises(DataError, match="no 'val' split"):
        m.predict_split("val")


def test_a_one_context_model_needs_no_cell_type_column(synth, capsys):
    """Without the cell-type column, a baseline or ST fitted on one cell type predicts every
    input cell in that cell type (as with the column)."""
    from test_model import small_model

    one = synth[synth.obs["cell_type"] == "CT0"].copy()
    bare = one.copy()
    del bare.obs["cell_type"]
    for model in (ContextMeanBaseline(**SYN).fit(one), small_model(max_steps=2).fit(one)):
        np.testing.assert_allclose(model.predict(bare).X, model.predict(one).X)
        assert model.score(bare) == pytest.approx(model.score(one))
        assert "the model's only one ('CT0')" in capsys.readouterr().out
        with pytest.raises(DataError, match="no obs column 'celltype'"):
            model.predict(bare, cell_type_col="celltype")


@pytest.mark.filterwarnings("ignore:the .* split has negative expression values")
def test_pickle_embedding_space_and_fit_all(synth):
    m = ContextMeanBaseline(**SYN).fit(synth, SPEC)
    back = pickle.loads(pickle.dumps(m))
    np.testing.assert_array_equal(back.predict(synth).X, m.predict(synth).X)
    with pytest.raises(DataError, match="attach_data"):  # (fitted: not NotFittedError)
        back.predict_split("test")
    with pytest.raises(ConfigError, match="reads its split data into memory"):
        attach_data(back, adata=synth, stream=True)
    attach_data(back, adata=synth)  # the split spec it was fitted with, the data again
    assert list(back.feature_names_in_) == list(synth.var_names)
    for got, want in zip(back.predict_split("test"), m.predict_split("test")):
        np.testing.assert_array_equal(got.X, want.X)
        pd.testing.assert_frame_equal(got.obs, want.obs)
    a = synth.copy()
    a.obsm["X_emb"] = np.asarray(a.X)[:, :5] - 1.0  # negative values: never clipped
    e = PerturbMeanBaseline(**SYN, embed_key="X_emb").fit(a, SPEC)
    pred = e.predict(a)
    assert list(pred.var_names) == [f"emb_{i}" for i in range(5)] and pred.X.min() < 0
    models = fit_all_baselines(synth, SPEC, baselines={"linear": {"ridge": 1.0},
                                                       "cell_mean": {}}, **SYN)
    assert set(models) == {"linear", "cell_mean"} and models["linear"].ridge == 1.0
    with pytest.raises(ConfigError, match="ridge"):
        fit_all_baselines(synth, SPEC, ridge=1.0, **SYN)
    with pytest.raises(ConfigError, match="'median'"):
        fit_all_baselines(synth, SPEC, baselines=["median"], **SYN)


# ---------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def kang_fitted(kang_log):
    models = fit_all_baselines(kang_log, KANG_SPEC, **KANG)
    models["control_mean@mean"] = ControlMeanBaseline("mean", **KANG).fit(kang_log, KANG_SPEC)
    models["context_mean@train_mean"] = ContextMeanBaseline("train_mean", **KANG).fit(
        kang_log, KANG_SPEC)
    return models, {n: m.predict_split("test") for n, m in models.items()}


def test_kang_heldout_b_cells_mean_shift(kang_fitted, kang_log):
    _, preds = kang_fitted
    res = {n: mean_shift_r(*preds[n], "target_gene", "control", "IFNB") for n in preds}
    assert res["perturb_mean"][0] > 0.7  # ≈ 0.82
    np.testing.assert_allclose(preds["linear"][0].X, preds["perturb_mean"][0].X, atol=1e-4)
    assert res["control_mean"][1] < 0.3  # the identity model predicts (almost) no shift
    assert abs(res["control_mean"][0]) < 0.3
    for name in ("control_mean@mean", "context_mean"):  # no shift: r undefined
        assert np.isnan(res[name][0]) and res[name][1] < 1e-3
    assert 0.3 < res["context_mean@train_mean"][0] < res["perturb_mean"][0]
    assert 0.2 < res["cell_mean"][0] < res["perturb_mean"][0]


def test_kang_context_mean_zero_shot_fallbacks(kang_fitted, kang_log):
    models, preds = kang_fitted
    obs, x = kang_log.obs, np.asarray(kang_log.X, dtype=np.float64)
    pred, _ = preds["context_mean"]  # default: arc-state's control-mean fallback
    ifnb = (pred.obs["target_gene"] == "IFNB").to_numpy()
    b_ctrl = ((obs["cell_type"] == "B cells") & (obs["target_gene"] == "control")).to_numpy()
    np.testing.assert_allclose(pred.X[ifnb], np.tile(x[b_ctrl].mean(0), (ifnb.sum(), 1)),
                               atol=1e-5)
    assert "B cells" in pred.uns["statetx"]["notes"]
    train_means = [x[((obs["cell_type"] == ct) & (obs["target_gene"] == "IFNB")).to_numpy()]
                   .mean(0) for ct in sorted(set(obs["cell_type"]) - {"B cells"})]
    tm, _ = preds["context_mean@train_mean"]
    np.testing.assert_allclose(tm.X[ifnb][0], np.mean(train_means, 0), atol=1e-5)
    trained = sorted(set(obs["cell_type"]) - {"B cells"})
    assert models["context_mean"].perturbed_cell_types_ == trained


def test_kang_predict_split_aligned(kang_fitted, kang_log):
    _, preds = kang_fitted
    pred, real = preds["perturb_mean"]
    b = kang_log.obs["cell_type"] == "B cells"
    assert pred.n_obs == real.n_obs == b.sum()
    pd.testing.assert_frame_equal(pred.obs, real.obs)
    pd.testing.assert_frame_equal(pred.var, kang_log.var)  # the gene annotations (ENSEMBL, ...)
    pd.testing.assert_frame_equal(real.var, kang_log.var)
    assert list(pred.var_names) == list(kang_log.var_names)
    np.testing.assert_array_equal(real.X, np.asarray(kang_log[pred.obs["pert_cell_barcode"]].X))
    ctrl_barcodes = set(kang_log.obs_names[b & (kang_log.obs["target_gene"] == "control")])
    assert set(pred.obs["ctrl_cell_barcode"]) <= ctrl_barcodes
    assert {"target_gene", "cell_type", "batch"} <= set(pred.obs.columns)


def test_zhao_raw_counts_are_not_clipped_and_scale_is_checked(zhao_raw):
    spec = '[training]\nzhao = "train"\n[zeroshot]\n"zhao.glioblastoma_PW034" = "test"\n'
    m = PerturbMeanBaseline(pert_col="target_gene", control_pert="DMSO").fit(zhao_raw, spec)
    assert not m.is_log1p_
    pred, real = m.predict_split("test")
    assert pred.X.min() >= 0 and pred.X.max() > 14 and real.X.max() > 14
    r, _ = mean_shift_r(pred, real, "target_gene", "DMSO", "panobinostat")
    assert r > 0.4
    logged = zhao_raw[:400].copy()
    logged.X = np.log1p(logged.X.toarray() / 7.0)
    with pytest.raises(DataError, match="log1p"):
        m.predict(logged)


# ---------------------------------------------------------------------- combinations
PAIRS = ["KLF1+MAP2K6", "KLF1+TGFBR2", "MAP2K3+MAP2K6", "MAP2K3+SLC38A2", "MAPK1+TGFBR2"]
PB = dict(pert_col="target_gene", cell_type_key="cell_type", control_pert="control")


@pytest.fixture(scope="module")
def norman_pairs_fitted():
    """Norman 2019 K562 (bundled perturbench subset): the five pairs whose two singles were
    measured in K562 held out few-shot; everything else trains."""
    from statetx.datasets import load_perturbench_devel
    a = load_perturbench_devel()
    spec = {"training": {"pb": "train"}, "fewshot": {"pb.k562": {"test": PAIRS}}}
    models = fit_all_baselines(a, spec, dataset_name="pb",
                               baselines=["additive", "perturb_mean", "context_mean"], **PB)
    return a, models


def test_additive_pair_is_its_basal_cell_plus_the_singles_shifts(norman_pairs_fitted):
    a, models = norman_pairs_fitted
    pred, _ = models["additive"].predict_split("test", clip=None)
    x = a.to_df().astype(np.float64)  # (X is sparse here)
    k562 = a.obs["cell_type"] == "k562"

    def mean(label):
        return x[(k562 & (a.obs["target_gene"] == label)).to_numpy()].to_numpy().mean(0)

    for pair in PAIRS:
        rows = (pred.obs["target_gene"] == pair).to_numpy()
        one, two = pair.split("+")
        want = mean(one) + mean(two) - 2 * mean("control")  # K562's own single shifts
        basal = x.loc[pred.obs["ctrl_cell_barcode"][rows]].to_numpy()
        got = pred.X[rows] - basal
        np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), atol=2e-5)
    # the sum of singles is the reference pairs are judged against: on the real pairs it is far
    # ahead of the single-perturbation baselines
    scores = {}
    for name, m in models.items():
        res, _ = evaluate(*m.predict_split("test"), pert_col="target_gene",
                          control_pert="control", profile="minimal")
        scores[name] = res.set_index("perturbation")
    add = scores["additive"]
    assert add["pearson_delta"].mean() > 0.7  # (0.77-0.87 over seeds 0-7; basal draws vary)
    for other in ("perturb_mean", "context_mean"):
        assert add["pearson_delta"].mean() > scores[other]["pearson_delta"].mean() + 0.3
        assert add["mse"].mean() < 0.5 * scores[other]["mse"].mean()


def test_additive_new_labels_unknown_parts_and_defaults(norman_pairs_fitted, capsys):
    a, models = norman_pairs_fitted
    m = models["additive"]
    k = a[(a.obs["cell_type"] == "k562").to_numpy()
          & a.obs["target_gene"].isin(["control", "MAP2K6+KLF1"]).to_numpy()].copy()
    k.obs["target_gene"] = k.obs["target_gene"].astype(str)
    k.obs.loc[k.obs_names[-3:], "target_gene"] = "TGFBR2 + KLF1"  # unseen order and spacing
    k.obs.loc[k.obs_names[-6:-3], "target_gene"] = "KLF1+NOTAGENE"
    with pytest.raises(DataError, match="NOTAGENE"):  # unknown labels raise as for any baseline
        m.predict(k)
    out = m.predict(k, unknown_perturbation="zeros", clip=None)
    assert "NOTAGENE" in out.uns["statetx"]["notes"] and "NOTAGENE" in capsys.readouterr().out
    x = k.to_df().to_numpy(np.float64)
    basal = x[k.obs_names.get_indexer(out.obs["statetx_ctrl_barcode"])]
    shift = out.X - basal
    pair, swapped = (k.obs["target_gene"] == "MAP2K6+KLF1").to_numpy(), \
        (k.obs["target_gene"] == "TGFBR2 + KLF1").to_numpy()
    klf1_only = (k.obs["target_gene"] == "KLF1+NOTAGENE").to_numpy()
    d = m.part_deltas_
    np.testing.assert_allclose(shift[pair], np.broadcast_to(
        d[("k562", "MAP2K6")] + d[("k562", "KLF1")], shift[pair].shape), atol=2e-5)
    np.testing.assert_allclose(shift[swapped], np.broadcast_to(
        d[("k562", "TGFBR2")] + d[("k562", "KLF1")], shift[swapped].shape), atol=2e-5)
    np.testing.assert_allclose(shift[klf1_only], np.broadcast_to(
        d[("k562", "KLF1")], shift[klf1_only].shape), atol=2e-5)
    assert "additive" not in DEFAULT_BASELINES and set(DEFAULT_BASELINES) < set(BASELINES)


def test_additive_gears_labels_borrowed_shifts_and_separator_hint(capsys):
    """GEARS' 'A+ctrl' singles are parts too; a part without single cells in the predicted cell
    type takes its shift from the others (said); labels joined otherwise get a sep hint."""
    from statetx.datasets import load_perturbench_devel

    a = load_perturbench_devel()
    gears = a.copy()
    lab = gears.obs["target_gene"].astype(str)
    gears.obs["target_gene"] = np.where(lab == "control", "ctrl",
                                        np.where(lab.str.contains("+", regex=False), lab,
                                                 lab + "+ctrl"))
    spec = {"training": {"pb": "train"}, "fewshot": {"pb.k562": {"test": PAIRS}}}
    cols = {**PB, "control_pert": "ctrl"}
    plain = AdditiveBaseline(**PB).fit(a, spec, dataset_name="pb")
    g = AdditiveBaseline(**cols).fit(gears, spec, dataset_name="pb")
    assert set(g.part_shifts_) == set(plain.part_shifts_) and "KLF1" in g.part_shifts_
    np.testing.assert_allclose(g.predict_split("test", clip=None)[0].X,
                               plain.predict_split("test", clip=None)[0].X, atol=1e-6)
    # no K562 MAPK1 single: MAPK1+TGFBR2 in K562 borrows the glioblastoma lines' MAPK1 shift
    no_single = a[~((a.obs["cell_type"] == "k562") & (a.obs["target_gene"] == "MAPK1"))
                  .to_numpy()].copy()
    m = AdditiveBaseline(**PB).fit(no_single, spec, dataset_name="pb")
    capsys.readouterr()
    pred, _ = m.predict_split("test")
    said = capsys.readouterr().out
    assert "MAPK1 in k562 (from A172, T98G, U87MG)" in said
    assert "MAPK1 in k562" in pred.uns["statetx"]["notes"]
    under = a.copy()
    under.obs["target_gene"] = under.obs["target_gene"].astype(str).str.replace("+", "_")
    u = AdditiveBaseline(**PB).fit(under, {"training": {"pb": "train"}, "fewshot": {
        "pb.k562": {"test": [p.replace("+", "_") for p in PAIRS]}}}, dataset_name="pb")
    u.predict_split("test")
    assert "pass sep='_'" in capsys.readouterr().out


def test_a_failed_refit_keeps_the_fitted_baseline_and_options_are_checked_at_predict(synth):
    a = synth.copy()
    a.obs["gene"] = a.obs["gene"].replace({"P0": "G1", "P1": "G2", "P2": "G3"})
    lb = LinearBaseline(pert_col="gene", cell_type_key="cell_type", control_pert="ctrl",
                        pert_embedding="genes").fit(a, SPEC)
    before = lb.predict(a, seed=0).X
    b = make_synthetic(n_genes=20, seed=1)
    b.var_names = [f"H{i}" for i in range(20)]
    with pytest.raises(DataError):
        lb.fit(b, SPEC)  # its perturbations are not among the genes
    assert lb.n_features_in_ == 32
    np.testing.assert_array_equal(lb.predict(a, seed=0).X, before)
    c = ControlMeanBaseline(**SYN).fit(synth, SPEC)
    c.set_params(mode="bogus")
    with pytest.raises(ConfigError, match="bogus"):
        c.predict(synth)
