"""statetx.pl: the plots render with the Agg backend and draw the values they claim."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from statetx import pl  # noqa: E402
from statetx.errors import ConfigError, DataError  # noqa: E402
from statetx.metrics._synthetic import synthetic_log1p  # noqa: E402


@pytest.fixture(scope="module")
def pair():
    real, eff = synthetic_log1p(4, 20, 30, 30, seed=1)
    pred, _ = synthetic_log1p(4, 15, 30, 30, seed=2, effects=eff)
    return pred, real


def test_delta_scatter(pair):
    ax = pl.delta_scatter(pair[0], pair[1], "target_gene", "non-targeting", perts=["G000", "G002"])
    assert len(ax.collections) == 2
    assert "G000" in ax.get_legend().get_texts()[0].get_text()
    fig, ax2 = plt.subplots()
    assert pl.delta_scatter(*pair, ax=ax2) is ax2
    with pytest.raises(DataError, match="nope"):
        pl.delta_scatter(*pair, perts=["nope"])
    with pytest.raises(ConfigError, match="perts is empty"):
        pl.delta_scatter(*pair, perts=[])
    plt.close("all")


def test_delta_scatter_draws_the_strongest_responses_in_distinct_colours(capsys):
    real, eff = synthetic_log1p(24, 20, 30, 30, seed=1)
    pred, _ = synthetic_log1p(24, 15, 30, 30, seed=2, effects=eff)
    ax = pl.delta_scatter(pred, real, max_perts=12)
    assert "12 of 24 series drawn, those with the largest real shift" in capsys.readouterr().out
    drawn = [t.get_text().split(" ")[0] for t in ax.get_legend().get_texts()]
    deltas = {p: np.linalg.norm(np.asarray(real[real.obs["target_gene"] == p].X).mean(0)
                                - np.asarray(real[real.obs["target_gene"] == "non-targeting"]
                                             .X).mean(0)) for p in sorted(set(
                                                 real.obs["target_gene"]) - {"non-targeting"})}
    assert set(drawn) == set(sorted(deltas, key=deltas.get)[-12:])
    colours = {tuple(c.get_facecolor()[0]) for c in ax.collections}
    assert len(colours) == 12  # (the default cycle has 10)
    with pytest.raises(ConfigError, match="at most 20 series"):
        pl.delta_scatter(pred, real, max_perts=21)
    plt.close("all")


def test_metric_bars():
    a = pd.DataFrame({"perturbation": ["x", "y"], "pearson_delta": [0.5, 0.7], "mae": [0.1, 0.2]})
    b = pd.DataFrame({"statistic": ["count", "mean"], "pearson_delta": [2, 0.2], "mae": [2, 0.3]})
    ax = pl.metric_bars({"st": a, "baseline": b}, metrics=["pearson_delta", "mae"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["pearson_delta ↑", "mae ↓"]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == [0.15, 0.2, 0.3, 0.6]
    long = pd.DataFrame({"model": ["m1", "m2"], "metric": ["mae", "mae"], "value": [1.0, 2.0]})
    assert len(pl.metric_bars(long, metrics=["mae"]).patches) == 2
    with pytest.raises(ConfigError, match="pds"):
        pl.metric_bars(long, metrics=["pds"])
    # an undefined mean (e.g. pearson_delta of a prediction with no shift) is marked "n/a"
    nan = pd.DataFrame({"model": ["m1", "m2"], "metric": ["pearson_delta"] * 2,
                        "value": [0.4, np.nan]})
    ax = pl.metric_bars(nan, metrics=["pearson_delta"])
    assert [t.get_text() for t in ax.texts] == ["n/a"]
    plt.close("all")


def test_delta_plots_put_both_objects_on_the_log1p_scale(pair):
    """Raw counts on one side are converted as evaluate converts them (with its warning), not
    plotted against log1p values; scaled values are refused."""
    pred, real = pair
    counts = real.copy()
    counts.X = np.round(np.expm1(np.asarray(real.X)) * 10)
    with pytest.warns(UserWarning, match="real X holds integer values only"):
        pl.delta_scatter(pred, counts, perts=["G000"])
    scaled = real.copy()
    scaled.X = np.asarray(real.X) - 1.0
    with pytest.raises(DataError, match="real"):
        pl.top_genes(pred, scaled, "G000")
    plt.close("all")


def test_metric_bars_takes_the_tables_users_build(pair):
    """Results / agg tables concatenated with a ``model`` column (pd.concat), one table alone,
    and score tables (score_agg) plot as their dict form does; a bare metric name is one name."""
    from statetx.metrics import evaluate, score_agg

    pred, real = pair
    res, agg = evaluate(pred, real, "target_gene", "non-targeting", profile="minimal")
    res_b, agg_b = evaluate(real, real, "target_gene", "non-targeting", profile="minimal")

    def heights(ax):
        return [round(p.get_height(), 9) for p in ax.patches]

    metrics = ["pearson_delta", "mae"]
    want = heights(pl.metric_bars({"st": res, "real": res_b}, metrics=metrics))
    both = pd.concat([res.assign(model="st"), res_b.assign(model="real")])
    assert heights(pl.metric_bars(both, metrics=metrics)) == want
    aggs = pd.concat([agg.assign(model="st"), agg_b.assign(model="real")])
    assert heights(pl.metric_bars(aggs, metrics=metrics)) == want
    assert heights(pl.metric_bars(res, metrics="pearson_delta")) == [round(
        res["pearson_delta"].mean(), 9)]
    score = score_agg(agg, agg_b)
    m = score["metric"].iloc[0]
    ax = pl.metric_bars({"st": score}, metrics=m)
    assert heights(ax) == [round(float(score["from_baseline"].iloc[0]), 9)]
    # scores against a baseline: higher is better for every metric, mae included
    ax = pl.metric_bars({"st": score}, metrics=["mae"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["mae ↑"]
    assert "score vs the baseline" in ax.get_ylabel()
    plt.close("all")


def test_metric_bars_per_cell_type_agg_is_the_mean_over_all_perturbations(perturbench):
    """perturbench: evaluate(..., celltype_col=) agg tables of cell types with 9 and 33
    perturbations plot the mean over all 42, as the results table does (not the mean of the two
    cell types' means)."""
    from statetx.metrics import evaluate

    real = perturbench[perturbench.obs["cell_type"].isin(["k562", "U87MG"])].copy()
    rng = np.random.default_rng(0)
    pred = real.copy()
    pred.X = np.clip(np.asarray(pred.X.toarray() if hasattr(pred.X, "toarray") else pred.X)
                     + rng.normal(0, 0.3, pred.shape), 0, None).astype(np.float32)
    res, agg = evaluate(pred, real, "target_gene", "control", celltype_col="cell_type",
                        profile="minimal", skip_metrics=["overlap_at_N", "precision_at_N",
                                                         "de_nsig_counts"])
    m = "pearson_delta"
    assert res.groupby("celltype")[m].count().to_dict() == {"U87MG": 9, "k562": 33}
    height = pl.metric_bars(agg, metrics=m).patches[0].get_height()
    assert height == pytest.approx(res[m].mean())
    assert height != pytest.approx(res.groupby("celltype")[m].mean().mean())
    plt.close("all")


# ---------------------------------------------------------------------------------------------
# history
# ---------------------------------------------------------------------------------------------


def _curves(ax):
    return {ln.get_label(): (ln.get_xdata(), ln.get_ydata()) for ln in ax.lines}


def test_history_from_frame_skips_nans_and_marks_best_val():
    nan = np.nan
    h = pd.DataFrame({"step": [1, 2, 3, 4, 5, 6], "epoch": [0] * 6,
                      "train_loss": [5.0, 4.0, nan, 3.0, 2.5, nan],
                      "val_loss": [nan, nan, 3.5, nan, nan, 3.7],
                      "grad_norm": [1.0, 0.9, nan, 0.8, 0.7, nan]})
    ax = pl.history(h)
    curves = _curves(ax)
    assert list(curves) == ["train_loss", "val_loss"]  # the defaults present, in order
    np.testing.assert_array_equal(curves["train_loss"][0], [1, 2, 4, 5])
    np.testing.assert_array_equal(curves["val_loss"][0], [3, 6])
    np.testing.assert_array_equal(curves["val_loss"][1], [3.5, 3.7])
    (best,) = ax.collections  # the star at the lowest val_loss
    np.testing.assert_array_equal(best.get_offsets(), [[3, 3.5]])
    assert "step 3" in best.get_label()
    ax = pl.history(h, keys=["grad_norm"], logy=True)
    assert list(_curves(ax)) == ["grad_norm"] and not ax.collections
    assert ax.get_yscale() == "log"
    fig, ax2 = plt.subplots()
    assert pl.history(h, ax=ax2) is ax2
    with pytest.raises(ConfigError, match=r"grad_nrom.*grad_norm.*Available columns.*val_loss"):
        pl.history(h, keys=["grad_nrom"])
    with pytest.raises(DataError, match="available columns: grad_norm"):
        pl.history(h[["step", "grad_norm"]])
    with pytest.raises(ConfigError, match="fit the model first"):
        pl.history(object())
    with pytest.raises(DataError, match="does not exist"):
        pl.history("/nonexistent/metrics.csv")
    plt.close("all")


def test_history_of_a_fitted_model_and_its_metrics_csv(tmp_path, request):
    import torch
    from conftest import make_synthetic

    from statetx import StateTransitionModel

    adata = make_synthetic()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads on a busy machine only slow it down
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    model = StateTransitionModel(
        "tiny", pert_col="gene", cell_type_key="cell_type", control_pert="ctrl",
        model_kwargs={"hidden_dim": 32, "n_heads": 2, "head_dim": 16, "n_kv_heads": 2,
                      "intermediate_size": 128, "n_layers": 1},
        cell_set_len=8, batch_size=4, max_steps=6, val_freq=3, log_every_n_steps=2,
        progress=False, device="cpu",
    ).fit(adata, '[training]\ndata = "train"\n[zeroshot]\n"data.CT1" = "val"\n'
          '"data.CT2" = "test"\n', output_dir=tmp_path)
    # a validation step that is also a logging step (6) is one row of metrics.csv
    assert pd.read_csv(tmp_path / "metrics.csv")["step"].is_unique
    a = _curves(pl.history(model))
    assert list(a) == ["train_loss", "train_loss_eval", "val_loss"]
    np.testing.assert_array_equal(a["train_loss"][0], [2, 4, 6])  # log_every_n_steps=2
    np.testing.assert_array_equal(a["val_loss"][0], [3, 6])  # val_freq=3
    assert np.isfinite(a["val_loss"][1]).all()
    for src in (tmp_path / "metrics.csv", str(tmp_path)):  # the file, or the run directory
        b = _curves(pl.history(src))
        assert list(b) == list(a)
        for k in a:
            np.testing.assert_array_equal(b[k][0], a[k][0])
            np.testing.assert_allclose(b[k][1], a[k][1], rtol=1e-12)
    hist = model.history_
    ax = pl.history(model)
    v = hist.dropna(subset=["val_loss"])
    best = v.loc[v["val_loss"].idxmin()]
    np.testing.assert_allclose(ax.collections[0].get_offsets(), [[best["step"], best["val_loss"]]])
    plt.close("all")


# ---------------------------------------------------------------------------------------------
# top genes
# ---------------------------------------------------------------------------------------------


def _delta(a, pert, pert_col="target_gene", control="non-targeting"):
    x = np.asarray(a.X, dtype=np.float64)
    lab = a.obs[pert_col].astype(str).to_numpy()
    return x[lab == pert].mean(0) - x[lab == control].mean(0)


def test_top_genes_bars_are_the_top_real_deltas(pair):
    pred, real = pair
    ax = pl.top_genes(pred, real, "G001", n_genes=8)
    dr, dp = _delta(real, "G001"), _delta(pred, "G001")
    top = np.argsort(-np.abs(dr), kind="stable")[:8]
    real_bars, pred_bars = ax.containers
    assert len(real_bars) == len(pred_bars) == 8 and len(ax.patches) == 16
    w_real = np.array([p.get_width() for p in real_bars])
    w_pred = np.array([p.get_width() for p in pred_bars])
    np.testing.assert_allclose(w_real, dr[top], atol=1e-5)
    np.testing.assert_allclose(w_pred, dp[top], atol=1e-5)
    assert np.all(np.diff(np.abs(w_real)) <= 1e-6)  # ordered by |real delta|
    assert [t.get_text() for t in ax.get_yticklabels()] == list(real.var_names[top])
    # a saved figure (savefig, no tight bounding box) keeps its gene labels and title
    pred, real = pred.copy(), real.copy()
    pred.var_names = real.var_names = [f"ENSG00000{i:06d}_LONGNAME" for i in range(real.n_vars)]
    ax = pl.top_genes(pred, real, "G001", n_genes=20)
    ax.figure.canvas.draw()
    drawn = ax.get_tightbbox(ax.figure.canvas.get_renderer())  # (display units, as fig.bbox)
    assert drawn.x0 >= 0 and drawn.x1 <= ax.figure.bbox.x1
    y = [p.get_y() + p.get_height() / 2 for p in real_bars]
    assert ax.get_ylim()[0] > ax.get_ylim()[1] and y == sorted(y)  # first gene at the top
    r = np.corrcoef(dr, dp)[0, 1]
    assert f"r={r:.2f}" in ax.get_title()
    assert len(pl.top_genes(pred, real, "G001", n_genes=100).containers[0]) == min(
        100, real.n_vars)
    with pytest.raises(DataError, match=r"G0001.*Did you mean.*Available: G000, G001"):
        pl.top_genes(pred, real, "G0001")
    for bad in (0, 500):  # (one bar pair per gene: 500 would be a 140-inch figure)
        with pytest.raises(ConfigError, match="n_genes"):
            pl.top_genes(pred, real, "G001", n_genes=bad)
    with pytest.raises(ConfigError, match="draws one perturbation.*delta_scatter"):
        pl.top_genes(pred, real, ["G000", "G001"])
    with pytest.raises(ConfigError, match="is the control label"):
        pl.top_genes(pred, real, "non-targeting")
    # genes labelled by a var column (symbols next to Ensembl IDs); one perturbation: implied
    real.var["symbol"] = [f"SYM{i}" for i in range(real.n_vars)]
    ax = pl.top_genes(pred, real, "G001", n_genes=8, gene_symbols="symbol")
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"SYM{i}" for i in top]
    with pytest.raises(DataError, match="gene_symbols='sym'.*Did you mean.*symbol"):
        pl.top_genes(pred, real, "G001", gene_symbols="sym")
    with pytest.raises(ConfigError, match="name one"):
        pl.top_genes(pred, real)
    one = [a[a.obs["target_gene"].isin(["G001", "non-targeting"])].copy() for a in (pred, real)]
    assert "G001" in pl.top_genes(*one).get_title()
    plt.close("all")


# ---------------------------------------------------------------------------------------------
# embedding
# ---------------------------------------------------------------------------------------------


def test_embedding_real_pca_and_projected_predictions(pair):
    from sklearn.decomposition import PCA

    pred, real = pair
    ax = pl.embedding(pred, real)
    real_pts, pred_pts = ax.collections
    assert len(real_pts.get_offsets()) == real.n_obs and len(pred_pts.get_offsets()) == pred.n_obs
    pca = PCA(n_components=30, random_state=0).fit(np.asarray(real.X))  # 30 genes < 50
    np.testing.assert_allclose(real_pts.get_offsets(), pca.transform(real.X)[:, :2], atol=1e-4)
    np.testing.assert_allclose(pred_pts.get_offsets(), pca.transform(pred.X)[:, :2], atol=1e-4)
    assert ax.get_xlabel().startswith("PC1")
    plt.close("all")


def test_embedding_shared_genes_perts_and_colour(pair):
    from sklearn.decomposition import PCA

    pred, real = pair
    pred = pred[:, ::-1][:, 2:].copy()  # other order, two genes fewer
    ax = pl.embedding(pred, real, color="target_gene", perts=["G002"])
    # one real (dots) and one predicted (crosses) collection per category: control and G002
    assert len(ax.collections) == 4
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "G002", "non-targeting", "real", "predicted"]
    keep = real.obs["target_gene"].isin(["G002", "non-targeting"]).to_numpy()
    genes = [g for g in real.var_names if g in set(pred.var_names)]
    xr = np.asarray(real[keep, genes].X)
    pca = PCA(n_components=28, random_state=0).fit(xr)
    lab = real.obs["target_gene"].to_numpy()[keep]
    np.testing.assert_allclose(ax.collections[0].get_offsets(),
                               pca.transform(xr[lab == "G002"])[:, :2], atol=1e-4)
    with pytest.raises(DataError, match=r"color column 'cell_line'.*'source'.*target_gene"):
        pl.embedding(pred, real, color="cell_line")
    with pytest.raises(DataError, match=r"\['G999'\].*Available"):
        pl.embedding(pred, real, perts=["G999"])
    with pytest.raises(ConfigError, match="basis 'tsne'"):
        pl.embedding(pred, real, basis="tsne")
    with pytest.raises(ConfigError, match="perts is empty"):
        pl.embedding(pred, real, perts=[])
    # the same scale rule as the other plots: counts on one side are converted (said), and
    # pseudobulk rows are no cells
    counts = real.copy()
    counts.X = np.round(np.expm1(np.asarray(real.X)) * 10)
    with pytest.warns(UserWarning, match="real X holds integer values only"):
        pl.embedding(pred, counts)
    emb_pred, emb_real = pred.copy(), real[:, pred.var_names].copy()  # a model's embedding
    for a in (emb_pred, emb_real):                                      # outputs: any sign
        a.X = np.asarray(a.X) - 1.0
        a.uns["statetx"] = {"scale": "embedding"}
    assert len(pl.embedding(emb_pred, emb_real).collections) == 2
    bulk = real.copy()
    bulk.uns["statetx_pseudobulk"] = True
    with pytest.raises(DataError, match="real holds pseudobulks"):
        pl.embedding(pred, bulk)
    plt.close("all")


def test_plots_take_the_labels_statetx_recorded(pair):
    """Predictions record pert_col and the control (uns["statetx"]); the plots use them, and a
    control label that is not in the data is an error, not a silent drop of the controls."""
    def relabel(a):
        a = a.copy()
        a.obs["gene"] = a.obs.pop("target_gene").astype(str).replace("non-targeting", "ctrl")
        return a

    pred, real = relabel(pair[0]), relabel(pair[1])
    pred.uns["statetx"] = {"pert_col": "gene", "control_pert": "ctrl"}
    ax = pl.embedding(pred, real, color="gene", perts=["G002"])
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["G002", "ctrl"]
    ref = pl.delta_scatter(pair[0], pair[1], perts=["G002"])
    got = pl.delta_scatter(pred, real, perts=["G002"])
    np.testing.assert_allclose(got.collections[0].get_offsets(), ref.collections[0].get_offsets())
    pl.top_genes(pred, real, "G002")
    with pytest.raises(DataError, match=r"control label 'non-targeting' is not in obs\['gene'\]"):
        pl.embedding(pred, real, perts=["G002"], control_pert="non-targeting")
    plt.close("all")


def test_deltas_are_taken_against_each_cell_types_own_controls():
    """With several cell types, each (cell type, perturbation) is a series whose Δ subtracts the
    controls of its own cell type (column given, or recorded by statetx), not all controls."""
    from conftest import make_synthetic

    real = make_synthetic(n_cell_types=2, seed=3)
    x = real.X.copy()
    x[(real.obs["cell_type"] == "CT1").to_numpy()] += 2.0  # a cell-type offset: pooled Δ ≠ own Δ
    real.X = x
    pred = real.copy()
    obs, xr = real.obs, real.X.astype(np.float64)

    def own_delta(ct, p):
        sel = lambda g: ((obs["cell_type"] == ct) & (obs["gene"] == g)).to_numpy()  # noqa: E731
        return xr[sel(p)].mean(0) - xr[sel("ctrl")].mean(0)

    ax = pl.delta_scatter(pred, real, "gene", "ctrl", perts=["P1"], celltype_col="cell_type")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("P1 · CT0") and labels[1].startswith("P1 · CT1")
    for coll, ct in zip(ax.collections, ("CT0", "CT1")):
        np.testing.assert_allclose(coll.get_offsets()[:, 0], own_delta(ct, "P1"), atol=1e-5)
    pred.uns["statetx"] = {"pert_col": "gene", "control_pert": "ctrl", "celltype_col": "cell_type"}
    recorded = pl.delta_scatter(pred, real, perts=["P1"])
    np.testing.assert_allclose(recorded.collections[1].get_offsets(),
                               ax.collections[1].get_offsets())
    bars = pl.top_genes(pred, real, "P1", n_genes=5, cell_type="CT1")
    top = np.argsort(-np.abs(own_delta("CT1", "P1")), kind="stable")[:5]
    np.testing.assert_allclose([b.get_width() for b in bars.containers[0]],
                               own_delta("CT1", "P1")[top], atol=1e-5)
    assert "in CT1" in bars.get_title()
    assert "mean of 2 cell types" in pl.top_genes(pred, real, "P1").get_title()
    no_ctrl = real[~((obs["cell_type"] == "CT1") & (obs["gene"] == "ctrl")).to_numpy()].copy()
    no_ctrl.uns = pred.uns
    with pytest.raises(DataError, match="CT1.*no control cells"):
        pl.delta_scatter(no_ctrl, no_ctrl, perts=["P1"])
    with pytest.raises(DataError, match="no real cells of cell type 'CT9'"):
        pl.top_genes(pred, real, "P1", cell_type="CT9")
    pooled = pl.delta_scatter(no_ctrl, no_ctrl, perts=["P1"], celltype_col=False)  # opt out
    assert len(pooled.collections) == 1
    part = pred[~((obs["cell_type"] == "CT1") & (obs["gene"] == "P1")).to_numpy()].copy()
    with pytest.raises(DataError, match=r"pred has no cells of P1 \(CT1\)"):
        pl.delta_scatter(part, real, perts=["P1"])
    plt.close("all")


@pytest.mark.slow  # umap-learn compiles its kernels on first use (~30 s)
def test_embedding_umap_places_predictions_with_the_real_cells_fit(pair):
    import umap
    from sklearn.decomposition import PCA

    pred, real = pair
    ax = pl.embedding(pred, real, basis="umap", seed=1)
    real_pts, pred_pts = (c.get_offsets() for c in ax.collections)
    scores = PCA(n_components=30, random_state=1).fit(np.asarray(real.X))
    fitted = umap.UMAP(random_state=1, n_jobs=1, n_neighbors=15)
    np.testing.assert_allclose(real_pts, fitted.fit_transform(scores.transform(real.X)),
                               atol=1e-3)
    np.testing.assert_allclose(pred_pts, fitted.transform(scores.transform(pred.X)), atol=1e-3)
    assert ax.get_xlabel() == "UMAP1"
    plt.close("all")


def test_embedding_subsampling_is_capped_and_seeded(pair):
    pred, real = pair

    def points(**kw):
        ax = pl.embedding(pred, real, max_cells=40, **kw)
        return [c.get_offsets().copy() for c in ax.collections]

    a, b, c = points(seed=0), points(seed=0), points(seed=1)
    assert [len(p) for p in a] == [40, 40] and [len(p) for p in c] == [40, 40]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a[0], c[0], atol=1e-3)
    with pytest.raises(ConfigError, match="max_cells"):
        pl.embedding(pred, real, max_cells=1)
    plt.close("all")


def test_history_reads_the_long_metrics_csv_of_earlier_runs(tmp_path):
    rows = [(2, 0, "loss", 5.0), (2, 0, "grad_norm", 1.0), (4, 0, "loss", 4.0),
            (4, 0, "val_loss", 4.5), (6, 1, "loss", 3.0), (6, 1, "val_loss", 4.2)]
    pd.DataFrame(rows, columns=["step", "epoch", "key", "value"]).to_csv(
        tmp_path / "metrics.csv", index=False)
    ax = pl.history(tmp_path)
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["train_loss"].get_xdata()) == [2, 4, 6]
    assert list(lines["train_loss"].get_ydata()) == [5.0, 4.0, 3.0]
    assert list(lines["val_loss"].get_xdata()) == [4, 6]
    plt.close("all")


def test_every_plot_saves_and_shows_as_scanpy(pair, tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append(1))
    pred, real = pair
    table = pd.DataFrame({"perturbation": ["x"], "pearson_delta": [0.5]})
    history = pd.DataFrame({"step": [1, 2], "train_loss": [1.0, 0.5]})
    for name, draw in (("ds", lambda **kw: pl.delta_scatter(pred, real, **kw)),
                       ("tg", lambda **kw: pl.top_genes(pred, real, "G000", **kw)),
                       ("mb", lambda **kw: pl.metric_bars(table, metrics=["pearson_delta"],
                                                          **kw)),
                       ("hi", lambda **kw: pl.history(history, **kw)),
                       ("em", lambda **kw: pl.embedding(pred, real, **kw))):
        assert draw(save=tmp_path / f"{name}.png", show=True) is None  # shown: None, as scanpy
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert len(shown) == 5
    for bad, said in ((True, "give the file"), (tmp_path / "nope" / "x.png", "does not exist")):
        with pytest.raises(ConfigError, match=said):
            pl.history(history, save=bad)
    plt.close("all")
