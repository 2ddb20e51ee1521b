"""statetx.pl conventions shared with scanpy: genes paired by name, figures closed once saved,
``save`` checked before drawing, list-valued ``color``, argument-order mistakes named, and
every parameter documented."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import inspect  # noqa: E402
import warnings  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from statetx import pl  # noqa: E402
from statetx.errors import ConfigError, DataError  # noqa: E402
from statetx.metrics._synthetic import synthetic_log1p  # noqa: E402

CTRL = "non-targeting"


@pytest.fixture(scope="module")
def pair():
    real, eff = synthetic_log1p(4, 20, 30, 30, seed=1)
    pred, _ = synthetic_log1p(4, 15, 30, 30, seed=2, effects=eff)
    return pred, real


@pytest.fixture(autouse=True)
def _no_open_figures():
    plt.close("all")
    yield
    plt.close("all")


def _delta(a, pert, genes):
    """Hand-computed pseudobulk Δ of ``pert`` on ``genes`` (by name, in that order)."""
    x = np.asarray(a[:, list(genes)].X, dtype=np.float64)
    lab = a.obs["target_gene"].astype(str).to_numpy()
    return x[lab == pert].mean(0) - x[lab == CTRL].mean(0)


def _mismatched(pair):
    """pred on 20 of real's genes, shuffled, plus 2 genes real lacks; real in reverse order."""
    pred, real = pair
    rng = np.random.default_rng(0)
    pick = rng.permutation(real.n_vars)[:22]
    pred = pred[:, pick].copy()
    pred.var_names = list(pred.var_names[:20]) + ["PRED_ONLY_1", "PRED_ONLY_2"]
    real = real[:, ::-1].copy()
    return pred, real, list(pred.var_names[:20])


# ---------------------------------------------------------------------------------------------
# genes paired by name
# ---------------------------------------------------------------------------------------------


def test_delta_scatter_draws_the_shared_genes_in_preds_order(pair, capsys):
    pred, real, shared = _mismatched(pair)
    ax = pl.delta_scatter(pred, real, perts=["G001", "G002"])
    out = capsys.readouterr().out
    assert out.count("genes pred and real share") == 1  # said once
    assert "drawn on the 20 genes pred and real share (by name); left out: 2 only in pred, " \
           "10 only in real" in out
    for coll, p in zip(ax.collections, ("G001", "G002")):
        xy = coll.get_offsets()
        np.testing.assert_allclose(xy[:, 0], _delta(real, p, shared), atol=1e-5)
        np.testing.assert_allclose(xy[:, 1], _delta(pred, p, shared), atol=1e-5)
    # the same as the pair subset by hand
    ref = pl.delta_scatter(pred[:, shared].copy(), real[:, shared].copy(), perts=["G001", "G002"])
    for a, b in zip(ax.collections, ref.collections):
        np.testing.assert_allclose(a.get_offsets(), b.get_offsets(), atol=1e-6)
    assert "share" not in capsys.readouterr().out  # nothing left out: nothing said


def test_same_genes_in_another_order_are_paired_silently(pair, capsys):
    pred, real = pair
    shuffled = real[:, np.random.default_rng(1).permutation(real.n_vars)].copy()
    ref = pl.delta_scatter(pred, real, perts=["G000"])
    got = pl.delta_scatter(pred, shuffled, perts=["G000"])
    np.testing.assert_allclose(got.collections[0].get_offsets(),
                               ref.collections[0].get_offsets(), atol=1e-6)
    bars = pl.top_genes(pred, shuffled, "G000", n_genes=5)
    assert [t.get_text() for t in bars.get_yticklabels()] == [
        t.get_text() for t in pl.top_genes(pred, real, "G000", n_genes=5).get_yticklabels()]
    assert "share" not in capsys.readouterr().out


def test_top_genes_pairs_genes_by_name(pair, capsys):
    pred, real, shared = _mismatched(pair)
    real.var["symbol"] = [f"SYM_{g}" for g in real.var_names]
    ax = pl.top_genes(pred, real, "G001", n_genes=6, gene_symbols="symbol")
    assert capsys.readouterr().out.count("genes pred and real share") == 1
    dr, dp = _delta(real, "G001", shared), _delta(pred, "G001", shared)
    top = np.argsort(-np.abs(dr), kind="stable")[:6]
    real_bars, pred_bars = ax.containers
    np.testing.assert_allclose([b.get_width() for b in real_bars], dr[top], atol=1e-5)
    np.testing.assert_allclose([b.get_width() for b in pred_bars], dp[top], atol=1e-5)
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"SYM_{shared[i]}" for i in top]
    assert f"r={np.corrcoef(dr, dp)[0, 1]:.2f}" in ax.get_title()  # over the shared genes


def test_no_shared_gene_is_an_error_naming_both_counts(pair):
    pred, real = pair
    other = real[:, :25].copy()
    other.var_names = [f"ENSG{i:05d}" for i in range(other.n_vars)]
    for draw in (lambda: pl.delta_scatter(pred, other), lambda: pl.top_genes(pred, other, "G000"),
                 lambda: pl.embedding(pred, other)):
        with pytest.raises(DataError, match=r"share no gene name: pred has 30 genes .*real has "
                                            r"25 \(e\.g\. ENSG00000") as err:
            draw()
        assert "align_genes" not in str(err.value)
    dup = real.copy()
    dup.var_names = ["g0"] * 2 + list(real.var_names[2:])
    with pytest.raises(DataError, match=r"real var_names hold duplicated genes: \[g0\]"):
        pl.delta_scatter(pred, dup)
    assert plt.get_fignums() == []


def test_embedding_says_the_genes_it_leaves_out(pair, capsys):
    pred, real, _ = _mismatched(pair)
    pl.embedding(pred, real)
    assert capsys.readouterr().out.count(
        "embedding: drawn on the 20 genes pred and real share (by name); left out: 2 only in "
        "pred, 10 only in real") == 1


# ---------------------------------------------------------------------------------------------
# figures: closed once saved, save= checked first
# ---------------------------------------------------------------------------------------------


def _draws(pair):
    pred, real = pair
    table = pd.DataFrame({"perturbation": ["x"], "pearson_delta": [0.5]})
    history = pd.DataFrame({"step": [1, 2], "train_loss": [1.0, 0.5]})
    return {"delta_scatter": lambda **kw: pl.delta_scatter(pred, real, perts=["G000"], **kw),
            "top_genes": lambda **kw: pl.top_genes(pred, real, "G000", **kw),
            "metric_bars": lambda **kw: pl.metric_bars(table, metrics=["pearson_delta"], **kw),
            "history": lambda **kw: pl.history(history, **kw),
            "embedding": lambda **kw: pl.embedding(pred, real, max_cells=50, **kw)}


def test_saved_figures_are_closed_so_a_loop_leaves_none_open(pair, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # matplotlib's "More than 20 figures"
        for i in range(25):
            ax = pl.delta_scatter(*pair, perts=["G000"], save=tmp_path / f"d{i}.png")
            assert ax.collections  # the Axes is still returned, with what was drawn
    assert plt.get_fignums() == []
    assert len(list(tmp_path.glob("d*.png"))) == 25
    for name, draw in _draws(pair).items():
        draw(save=tmp_path / f"{name}.pdf")
        assert plt.get_fignums() == [], name
        assert (tmp_path / f"{name}.pdf").stat().st_size > 1000


def test_figures_stay_open_when_not_saved_shown_or_not_their_own(pair, tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append(plt.get_fignums()))
    for name, draw in _draws(pair).items():
        ax = draw()  # not saved: left open (a notebook shows it)
        assert plt.get_fignums() == [ax.figure.number], name
        plt.close("all")
        # shown: open while shown, and None is returned (scanpy's convention: no
        # "<Axes: ...>" printed under the figure in a notebook)
        assert draw(save=tmp_path / f"{name}.png", show=True) is None, name
        assert len(shown[-1]) == 1 and plt.get_fignums() == shown[-1]
        plt.close("all")
        assert draw(show=True) is None and len(shown[-1]) == 1, name  # shown, not saved
        plt.close("all")
        ax = draw(show=False)
        assert plt.get_fignums() == [ax.figure.number], name
        plt.close("all")
        fig, mine = plt.subplots()  # the caller's figure: never closed
        assert draw(ax=mine, save=tmp_path / f"{name}_mine.png") is mine
        assert plt.get_fignums() == [fig.number], name
        plt.close("all")
    # in a notebook (inline backend), a figure saved with show left as None is shown, then closed
    monkeypatch.setattr(plt, "get_backend", lambda: "module://matplotlib_inline.backend_inline")
    shown.clear()
    assert pl.delta_scatter(*pair, perts=["G000"], save=tmp_path / "inline.png") is None
    assert len(shown) == 1 and len(shown[0]) == 1 and plt.get_fignums() == []
    ax = pl.delta_scatter(*pair, perts=["G000"], save=tmp_path / "quiet.png", show=False)
    assert len(shown) == 1 and plt.get_fignums() == [] and ax.collections  # not shown: the Axes
    ax = pl.delta_scatter(*pair, perts=["G000"])  # not saved: left for the notebook to show
    assert len(shown) == 1 and plt.get_fignums() == [ax.figure.number]


def test_bad_save_values_are_refused_before_drawing(pair, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    bad = {True: "give the file", ".png": "only a suffix", "figs/.pdf": "only a suffix",
           "": "no file name", "adir": "is a folder", "nope/x.png": "does not exist",
           "x.docx": "cannot write 'docx'"}
    for name, draw in _draws(pair).items():
        for save, said in bad.items():
            with pytest.raises(ConfigError, match=said):
                draw(save=save)
            assert plt.get_fignums() == [], (name, save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]  # no .png.png
    # a name without a suffix: matplotlib's default format is added (documented)
    _draws(pair)["history"](save="curves")
    assert (tmp_path / "curves.png").is_file() and plt.get_fignums() == []


def test_a_failed_save_or_draw_leaves_no_figure(pair, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def fail(self, *a, **k):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(Figure, "savefig", fail)
        with pytest.raises(OSError, match="disk full"):
            pl.delta_scatter(*pair, save=tmp_path / "x.png")
    assert plt.get_fignums() == []
    text = pd.DataFrame({"step": [1, 2], "train_loss": [1.0, 0.5], "note": ["a", "b"]})
    with pytest.raises(DataError, match="no numeric values"):
        pl.history(text, keys=["train_loss", "note"])
    assert plt.get_fignums() == []


# ---------------------------------------------------------------------------------------------
# embedding(color=[...])
# ---------------------------------------------------------------------------------------------


def test_embedding_takes_a_one_element_color_list(pair):
    pred, real = pair
    ref = pl.embedding(pred, real, color="target_gene", perts=["G002"])
    for color in (["target_gene"], ("target_gene",), pd.Index(["target_gene"])):
        got = pl.embedding(pred, real, color=color, perts=["G002"])
        assert [t.get_text() for t in got.get_legend().get_texts()] == [
            t.get_text() for t in ref.get_legend().get_texts()]
        assert got.get_legend().get_title().get_text() == "target_gene"
        for a, b in zip(got.collections, ref.collections):
            np.testing.assert_allclose(a.get_offsets(), b.get_offsets())
    plt.close("all")
    with pytest.raises(ConfigError, match=r"one column per call.*plt.subplots\(1, 2\)"):
        pl.embedding(pred, real, color=["target_gene", "source"])
    with pytest.raises(ConfigError, match=r"color=\[\]: embedding colours by one column"):
        pl.embedding(pred, real, color=[])
    with pytest.raises(ConfigError, match="color=3"):
        pl.embedding(pred, real, color=3)
    assert plt.get_fignums() == []


# ---------------------------------------------------------------------------------------------
# argument order
# ---------------------------------------------------------------------------------------------


def test_top_genes_says_when_the_perturbation_is_a_column_name(pair):
    pred, real = pair
    with pytest.raises(ConfigError, match=r"perturbation='target_gene' is an obs column, not a "
                                          r"perturbation label.*pert_col=.*e\.g\. top_genes\("
                                          r"pred, real, 'G000', pert_col='target_gene'\)"):
        pl.top_genes(pred, real, "target_gene")
    # delta_scatter's order (pert_col, control_pert) given to top_genes
    with pytest.raises(ConfigError, match=r"top_genes\(pred, real, 'G000', pert_col="
                                          r"'target_gene', control_pert='non-targeting'\)"):
        pl.top_genes(pred, real, "target_gene", CTRL)
    # the example label is a perturbation, never the control (here sorting first)
    relabel = [a.copy() for a in (pred, real)]
    for a in relabel:
        a.obs["target_gene"] = a.obs["target_gene"].astype(str).replace(CTRL, "A_ctrl")
    with pytest.raises(ConfigError, match=r"e\.g\. top_genes\(pred, real, 'G000', pert_col="
                                          r"'target_gene'\)"):
        pl.top_genes(*relabel, "target_gene", control_pert="A_ctrl")
    assert plt.get_fignums() == []
    # the documented positional order keeps working, and a label that is also a column name
    # is a label
    ref = pl.top_genes(pred, real, "G001", "target_gene", CTRL, n_genes=5)
    real2 = real.copy()
    real2.obs["G001"] = 1
    got = pl.top_genes(pred, real2, "G001", n_genes=5)
    np.testing.assert_allclose([b.get_width() for b in got.containers[0]],
                               [b.get_width() for b in ref.containers[0]])


def test_options_after_the_documented_positional_ones_are_keyword_only():
    positional = {"delta_scatter": ["adata_pred", "adata_real", "pert_col", "control_pert"],
                  "top_genes": ["adata_pred", "adata_real", "perturbation", "pert_col",
                                "control_pert"],
                  "embedding": ["adata_pred", "adata_real", "pert_col", "control_pert"],
                  "history": ["model_or_history", "keys", "ax"],  # (ax third, as released)
                  "metric_bars": ["tables", "metrics", "ax"]}
    for name, first in positional.items():
        params = inspect.signature(getattr(pl, name)).parameters.values()
        assert [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] == first, name
        keyword = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
        assert {"show", "save"} <= keyword and ("ax" in keyword) != ("ax" in first), name
    h = pd.DataFrame({"step": [1, 2], "train_loss": [1.0, 0.5]})
    fig, ax = plt.subplots()
    assert pl.history(h, None, ax) is ax
    plt.close(fig)


def test_every_parameter_is_documented():
    for name in pl.__all__:
        func = getattr(pl, name)
        doc = inspect.getdoc(func)
        section = doc.split("Parameters\n----------\n")[1].split("\n\nReturns")[0]
        documented = {n.strip() for line in section.splitlines()
                      if line and not line.startswith(" ") for n in line.split(",")}
        assert documented == set(inspect.signature(func).parameters), name


# ---------------------------------------------------------------------------------------------
# the scale rule of evaluate
# ---------------------------------------------------------------------------------------------


def _as_counts(a, scale, seed):
    """Integer counts of the log1p ``a`` at about ``scale`` × its depth (cell totals varying)."""
    rng = np.random.default_rng(seed)
    out = a.copy()
    lib = rng.lognormal(0.0, 0.4, (a.n_obs, 1))
    out.X = rng.poisson(np.expm1(np.asarray(a.X, dtype=np.float64)) * scale * lib).astype(
        np.float32)
    return out


def _log1p_to(x, target):
    """log1p(normalize_total(x, target)) by hand."""
    x = np.asarray(x, dtype=np.float64)
    tot = x.sum(1, keepdims=True)
    return np.log1p(x / np.where(tot > 0, tot, 1.0) * target)


def test_counts_are_brought_to_the_other_sides_scale_as_evaluate_does(pair):
    """A log1p prediction against real counts: the counts are normalised to the total the
    prediction's log1p values stand for (evaluate's pair-aware rule), not to their own median
    total, so the deltas drawn are those evaluate measures."""
    from statetx._utils import log1p_depth
    from statetx.metrics import evaluate

    pred, real = pair
    counts = _as_counts(real, 0.03, seed=5)  # ~300 counts per cell; pred stands for 1e4
    target = log1p_depth(pred.X)
    own = float(np.median(np.asarray(counts.X).sum(1)))
    assert target > 10 * own  # (each side on its own median would differ visibly)
    conv = counts.copy()
    conv.X = _log1p_to(counts.X, target)
    with pytest.warns(UserWarning, match="real X holds integer values only") as caught:
        ax = pl.delta_scatter(pred, counts, perts=["G000", "G001"])
    assert {w.filename for w in caught if "integer values only" in str(w.message)} == {__file__}
    for coll, p in zip(ax.collections, ("G000", "G001")):
        np.testing.assert_allclose(coll.get_offsets()[:, 0], _delta(conv, p, conv.var_names),
                                   atol=1e-4)
        np.testing.assert_allclose(coll.get_offsets()[:, 1], _delta(pred, p, pred.var_names),
                                   atol=1e-5)
    with pytest.warns(UserWarning, match="real X holds integer values only") as caught:
        bars = pl.top_genes(pred, counts, "G001", n_genes=30)
    assert {w.filename for w in caught if "integer values only" in str(w.message)} == {__file__}
    dr = _delta(conv, "G001", conv.var_names)
    top = np.argsort(-np.abs(dr), kind="stable")
    np.testing.assert_allclose([b.get_width() for b in bars.containers[0]], dr[top], atol=1e-4)
    # the title's r is evaluate's pearson_delta of the perturbation on the same inputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res, _ = evaluate(pred, counts, "target_gene", CTRL, profile="minimal")
    r = res.set_index("perturbation").loc["G001", "pearson_delta"]
    assert f"r={r:.2f} " in bars.get_title()
    # the embedding fits its PCA on the same converted values
    from sklearn.decomposition import PCA

    with pytest.warns(UserWarning, match="real X holds integer values only") as caught:
        emb = pl.embedding(pred, counts)
    assert {w.filename for w in caught if "integer values only" in str(w.message)} == {__file__}
    pca = PCA(n_components=30, random_state=0).fit(conv.X.astype(np.float32))
    np.testing.assert_allclose(np.abs(emb.collections[0].get_offsets()),
                               np.abs(pca.transform(conv.X.astype(np.float32))[:, :2]),
                               atol=1e-3)
    plt.close("all")


def test_two_count_sides_and_count_scale_predictions_share_one_total(pair, capsys):
    """Both sides counts: both to the real cells' median total; a count-scale prediction
    (uns['statetx']['scale'] == 'counts', fractional values) with real counts: both normalised
    to the real median total, as evaluate (the plots refused it before)."""
    pred, real = pair
    cr, cp = _as_counts(real, 0.03, seed=5), _as_counts(pred, 0.3, seed=6)
    total = float(np.median(np.asarray(cr.X).sum(1)))
    with pytest.warns(UserWarning, match="integer values only"):
        ax = pl.delta_scatter(cp, cr, perts=["G002"])
    xy = ax.collections[0].get_offsets()
    for a, col in ((cr, 0), (cp, 1)):
        conv = a.copy()
        conv.X = _log1p_to(a.X, total)
        np.testing.assert_allclose(xy[:, col], _delta(conv, "G002", conv.var_names), atol=1e-4)
    model = cp.copy()
    model.X = np.asarray(cp.X) * 1.37 + 0.25  # a model's count-scale output: fractional
    model.uns["statetx"] = {"scale": "counts"}
    ax = pl.delta_scatter(model, cr, perts=["G002"])
    assert ("statetx.pl: count-scale prediction: predictions and real cells are normalised to "
            f"{total:g} counts per cell and log1p-transformed for the plot"
            ) in capsys.readouterr().out
    xy = ax.collections[0].get_offsets()
    for a, col in ((cr, 0), (model, 1)):
        conv = a.copy()
        conv.X = _log1p_to(a.X, total)
        np.testing.assert_allclose(xy[:, col], _delta(conv, "G002", conv.var_names), atol=1e-4)
    with pytest.raises(DataError, match=r"real is not on the count scale: pass the real "
                                        r"counts\.$"):
        pl.top_genes(model, real, "G002")
    plt.close("all")


def test_evaluates_count_warning_still_names_the_callers_line(pair):
    from statetx.metrics import evaluate

    pred, real = pair
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(pred, _as_counts(real, 0.03, seed=5), "target_gene", CTRL, profile="minimal",
                 skip_metrics=["discrimination_score_l1"])
    said = [w for w in caught if "integer values only" in str(w.message)]
    assert [w.filename for w in said] == [__file__]
    assert "counts per cell the other file's log1p values stand for" in str(said[0].message)


# ---------------------------------------------------------------------------------------------
# colours
# ---------------------------------------------------------------------------------------------


def _rgb(c):
    from matplotlib.colors import to_rgb

    return tuple(round(v, 6) for v in to_rgb(c))


def test_the_palette_gives_distinct_colours_for_any_number():
    for n in (1, 10, 11, 20, 21, 34, 60, 61, 150, 400):
        cols = pl._palette(n)
        assert len(cols) == n and len({_rgb(c) for c in cols}) == n, n
    assert pl._palette(20) == pl._colours(20)  # tab20's dark ten, then its light ten
    assert pl._palette(34)[:20] == pl._colours(20)
    assert pl._colours(10) is None  # (the default cycle)


@pytest.fixture(scope="module")
def many():
    """33 perturbations and the controls: 34 categories."""
    real, eff = synthetic_log1p(33, 6, 20, 30, seed=1)
    pred, _ = synthetic_log1p(33, 5, 20, 30, seed=2, effects=eff)
    return pred, real


def _category_colours(ax):
    """Legend label -> colour of the category handles (the markers' squares)."""
    leg = ax.get_legend()
    return {t.get_text(): _rgb(h.get_color()) for t, h in zip(leg.get_texts(), leg.legend_handles)
            if h.get_marker() == "s"}


def test_embedding_colours_many_categories_apart(many):
    pred, real = many
    ax = pl.embedding(pred, real, color="target_gene")
    colours = {_rgb(c.get_facecolor()[0][:3]) for c in ax.collections}
    assert len(colours) == 34  # one per category (the old j % 20 colouring repeated 14)
    leg = ax.get_legend()
    assert "34 values" in leg.get_title().get_text()
    assert "own colour" in leg.get_title().get_text()
    # 12 categories: _colours' order (tab20's dark ten first), listed beside the axes
    keep = ["non-targeting"] + [f"G{i:03d}" for i in range(11)]
    sub = [a[a.obs["target_gene"].isin(keep)].copy() for a in (pred, real)]
    ax = pl.embedding(*sub, color="target_gene")
    got = _category_colours(ax)
    assert list(got) == sorted(keep)
    assert list(got.values()) == [_rgb(c) for c in pl._colours(12)]
    leg = ax.get_legend()
    ax.figure.canvas.draw()
    assert leg.get_window_extent().x0 >= ax.get_window_extent().x1  # (beside, not over, the data)
    plt.close("all")


def test_embedding_takes_scanpys_colours_from_uns(pair):
    pred, real = pair
    real = real.copy()
    cats = list(real.obs["target_gene"].cat.categories)
    mine = ["#112233", "#445566", "#778899", "#aabbcc", "#ddeeff"]
    real.uns["target_gene_colors"] = np.array(mine, dtype=object)
    ax = pl.embedding(pred, real, color="target_gene")
    assert _category_colours(ax) == {c: _rgb(m) for c, m in zip(cats, mine)}
    real.uns["target_gene_colors"] = mine[:3]  # stale (not one per category): not used
    assert list(_category_colours(pl.embedding(pred, real, color="target_gene")).values()) == [
        _rgb(c) for c in pl._palette(5)]
    plt.close("all")


def test_delta_scatter_keeps_a_perturbations_uns_colour(pair):
    pred, real = pair
    real = real.copy()
    cats = list(real.obs["target_gene"].cat.categories)
    mine = dict(zip(cats, ["#112233", "#445566", "#778899", "#aabbcc", "#ddeeff"]))
    real.uns["target_gene_colors"] = list(mine.values())

    def drawn(ax):
        return {t.get_text().split(" ")[0]: _rgb(c.get_facecolor()[0][:3])
                for t, c in zip(ax.get_legend().get_texts(), ax.collections)}

    a = drawn(pl.delta_scatter(pred, real, perts=["G001", "G003"]))
    b = drawn(pl.delta_scatter(pred, real, perts=["G003"]))
    assert a == {p: _rgb(mine[p]) for p in ("G001", "G003")} and b["G003"] == a["G003"]
    del real.uns["target_gene_colors"]  # none: colours in the order drawn, as before
    assert drawn(pl.delta_scatter(pred, real, perts=["G003"]))["G003"] == _rgb("C0")
    plt.close("all")


def test_metric_bars_colours_every_model_apart():
    models = [f"model{i}" for i in range(14)]
    long = pd.DataFrame({"model": models, "metric": "pearson_delta",
                         "value": np.linspace(0.1, 0.9, 14)})
    ax = pl.metric_bars(long, metrics=["pearson_delta"])
    assert len({_rgb(p.get_facecolor()) for p in ax.patches}) == 14
    plt.close("all")


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------


def _inside(artist, fig):
    box = artist.get_window_extent(fig.canvas.get_renderer())
    return (box.x0 >= -1 and box.y0 >= -1 and box.x1 <= fig.bbox.x1 + 1
            and box.y1 <= fig.bbox.y1 + 1)


def test_metric_bars_draws_metrics_of_other_scales_in_panels(tmp_path):
    table = pd.DataFrame({"model": ["st"] * 3 + ["baseline"] * 3,
                          "metric": ["mse", "pearson_delta", "de_nsig_counts_pred"] * 2,
                          "value": [0.01, 0.6, 390.0, 0.02, 0.3, 120.0]})
    metrics = ["mse", "pearson_delta", "de_nsig_counts_pred"]
    axes = pl.metric_bars(table, metrics=metrics)
    assert isinstance(axes, np.ndarray) and axes.shape == (3,)
    assert len({a.figure for a in axes}) == 1 and len(axes[0].figure.axes) == 3
    for a, m, want in zip(axes, metrics, ([0.01, 0.02], [0.6, 0.3], [390.0, 120.0])):
        assert a.get_title().startswith(m)
        np.testing.assert_allclose([p.get_height() for p in a.patches], want)
        assert a.get_ylim()[1] < 2 * max(want)  # its own y axis: not flattened
    assert axes[0].figure.legends  # one legend of the models for the figure
    assert pl.metric_bars(table, metrics=metrics, show=False) is not None
    # metrics of one scale: one Axes, as before
    like = pd.DataFrame({"model": ["st", "st"], "metric": ["mae", "pearson_delta"],
                         "value": [0.08, 0.6]})
    ax = pl.metric_bars(like, metrics=["mae", "pearson_delta"])
    assert not isinstance(ax, np.ndarray) and len(ax.patches) == 2
    # the caller's Axes: drawn on it, with a warning that the small metrics are flattened
    fig, mine = plt.subplots()
    with pytest.warns(UserWarning, match="differ 19500-fold.*leave ax out") as caught:
        assert pl.metric_bars(table, metrics=metrics, ax=mine) is mine
    assert caught[0].filename == __file__
    assert len(mine.patches) == 6
    plt.close("all")
    # saved with a plain savefig (no tight bounding box), the y label is whole
    default = pd.DataFrame({"model": "st", "metric": ["pearson_delta", "discrimination_score_l1"],
                            "value": [0.6, 0.9]})
    for draw in (lambda: pl.metric_bars(default, metrics=["pearson_delta",
                                                          "discrimination_score_l1"]),
                 lambda: pl.metric_bars(table, metrics=metrics)[0]):
        ax = draw()
        fig = ax.figure
        fig.savefig(tmp_path / "bars.png")
        label = fig._supylabel if fig._supylabel is not None else ax.yaxis.label
        assert label.get_text().startswith("mean over perturbations") and _inside(label, fig)
        plt.close("all")


def test_delta_scatter_keeps_its_axes_square_beside_a_long_legend():
    real, eff = synthetic_log1p(9, 10, 20, 30, seed=1)
    pred, _ = synthetic_log1p(9, 10, 20, 30, seed=2, effects=eff)
    for perts in (["G000"], None):  # legend inside; 9 series: legend outside
        ax = pl.delta_scatter(pred, real, perts=perts)
        ax.figure.canvas.draw()
        box = ax.get_window_extent()
        assert box.width == pytest.approx(box.height, rel=0.01)  # the identity line at 45°
        assert _inside(ax.get_legend(), ax.figure)
        plt.close("all")
