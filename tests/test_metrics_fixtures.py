"""statetx.metrics against every cell-eval 0.8.2 fixture case (tolerances of its README)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FIXTURES

from statetx.metrics import cell_mean_baseline, evaluate, score_agg, wilcoxon_de
from statetx.metrics._table import MetricTable
from statetx.metrics.expression import _dist

CE = FIXTURES / "cell_eval"

# (case, output folder, profile, celltype column, control label)
CASES = {
    "case_edge": ("out_full", "full", None, "non-targeting"),
    "case_papalexi": ("out_full", "full", None, "non-targeting"),
    "case_synth_manyde": ("out_full", "full", None, "non-targeting"),
    "case_perturbench_celltypes": ("out_minimal", "minimal", "cell_type", "control"),
    "case_vcc": ("out_vcc_user", "vcc", None, "non-targeting"),
}
EXPR_TOL = {"mse", "mae", "mse_delta", "mae_delta"}
DISCRIM = {"discrimination_score_l1", "discrimination_score_l2", "discrimination_score_cosine"}


def _case_dir(case: str) -> Path:
    d = CE / case
    if not (d / "real.h5ad").exists():
        pytest.skip(f"{d} not found: the cell-eval fixtures (../shared/fixtures) are absent")
    return d


def _raw(path: Path) -> pd.DataFrame:
    """CSV as strings: '' = null, 'NaN' = computed NaN."""
    return pd.read_csv(path, keep_default_na=False, dtype=str)


def _num(s: pd.Series) -> np.ndarray:
    return np.array([np.nan if v in ("", "NaN") else float(v) for v in s])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Evaluate each case once, writing the outputs, and return {case: (outdir, results)}."""
    cache: dict[str, tuple[Path, pd.DataFrame]] = {}

    def get(case: str) -> tuple[Path, pd.DataFrame]:
        if case not in cache:
            d = _case_dir(case)
            _, profile, ct, ctrl = CASES[case]
            out = tmp_path_factory.mktemp(case)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res, _ = evaluate(d / "pred.h5ad", d / "real.h5ad", "target_gene", ctrl,
                                  celltype_col=ct, profile=profile, outdir=out, num_threads=2)
            cache[case] = (out, res)
        return cache[case]

    return get


def _prefixes(case: str) -> list[str]:
    return ["k562_", "U87MG_"] if case == "case_perturbench_celltypes" else [""]


def _tie_interval(case: str, pert: str, metric: str) -> tuple[float, float]:
    """[lowest, highest] discrimination score allowed by exact distance ties (fixture README)."""
    import anndata as ad

    d = _case_dir(case)
    deltas = []
    for f in ("real", "pred"):
        a = ad.read_h5ad(d / f"{f}.h5ad")
        lab = a.obs["target_gene"].astype(str).to_numpy()
        x = np.asarray(a.X, dtype=np.float64)
        perts = sorted(set(lab) - {"non-targeting"})
        m = np.array([x[lab == p].mean(0) for p in perts], dtype=np.float32)
        deltas.append(m - x[lab == "non-targeting"].mean(0).astype(np.float32))
        genes = list(a.var_names)
    i = perts.index(pert)
    keep = np.array([g != pert for g in genes])
    dist = _dist(deltas[0][:, keep].astype(np.float64), deltas[1][i, keep].astype(np.float64),
                 metric.rsplit("_", 1)[1])
    less, ties = int(np.sum(dist < dist[i])), int(np.sum(dist == dist[i]))
    n = len(perts)
    return 1 - (less + ties - 1) / n, 1 - less / n


@pytest.mark.parametrize("case", list(CASES))
def test_results_match(case, runs):
    out, _ = runs(case)
    folder = CASES[case][0]
    for pre in _prefixes(case):
        ref = _raw(_case_dir(case) / folder / f"{pre}results.csv")
        mine = _raw(out / f"{pre}results.csv")
        assert list(mine.columns) == list(ref.columns)
        assert list(mine["perturbation"]) == list(ref["perturbation"])
        for col in ref.columns[1:]:
            rn, mn = ref[col] == "", mine[col] == ""
            assert (rn == mn).all(), f"{pre}{col}: null pattern differs"
            rnan, mnan = ref[col] == "NaN", mine[col] == "NaN"
            a, b = _num(mine[col]), _num(ref[col])
            if col == "clustering_agreement":  # igraph's Leiden is not reproduced step by step,
                # but on these cases the communities, and so the score, come out the same
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-12, err_msg=col)
                continue
            assert (rnan == mnan).all(), f"{pre}{col}: NaN pattern differs"
            ok = ~np.isnan(b)
            if col in DISCRIM:
                for i in np.flatnonzero(a != b):
                    lo, hi = _tie_interval(case, ref["perturbation"][i], col)
                    assert lo - 1e-12 <= b[i] <= hi + 1e-12 and lo - 1e-12 <= a[i] <= hi + 1e-12, (
                        f"{col} {ref['perturbation'][i]}: {a[i]} vs {b[i]} not in [{lo}, {hi}]")
            elif col == "pearson_delta":
                np.testing.assert_allclose(a[ok], b[ok], rtol=0, atol=1e-6, err_msg=col)
            elif col in EXPR_TOL:
                np.testing.assert_allclose(a[ok], b[ok], rtol=1e-6, atol=1e-7, err_msg=col)
            elif col == "pearson_edistance":
                np.testing.assert_allclose(a[ok], b[ok], rtol=0, atol=1e-5, err_msg=col)
            else:
                np.testing.assert_allclose(a[ok], b[ok], rtol=0, atol=1e-12, err_msg=col)


def _table_from_raw(df: pd.DataFrame) -> MetricTable:
    t = MetricTable(df["perturbation"])
    for c in df.columns[1:]:
        t.add(c, [None if v == "" else float(v) for v in df[c]])
    return t


@pytest.mark.parametrize("case", list(CASES))
def test_agg_match(case, runs):
    out, _ = runs(case)
    folder = CASES[case][0]
    for pre in _prefixes(case):
        ref = _raw(_case_dir(case) / folder / f"{pre}agg_results.csv")
        mine = _raw(out / f"{pre}agg_results.csv")
        assert list(mine.columns) == list(ref.columns)
        assert list(mine["statistic"]) == list(ref["statistic"])
        # aggregation rules, exactly: describe() of the reference's own results
        ref_res = _raw(_case_dir(case) / folder / f"{pre}results.csv")
        agg, nulls = _table_from_raw(ref_res).describe()
        for col in ref.columns[1:]:
            b = _num(ref[col])
            assert ((ref[col] == "") == nulls[col]).all(), col
            np.testing.assert_allclose(agg[col].to_numpy(float), b, atol=1e-12, rtol=0,
                                       equal_nan=True, err_msg=col)
        # our own values: counts exact, statistics within the per-metric tolerance
        for col in ref.columns[1:]:
            a, b = _num(mine[col]), _num(ref[col])
            assert (np.isnan(a) == np.isnan(b)).all() or col == "clustering_agreement", col
            assert a[0] == b[0] and a[1] == b[1], f"{col}: count/null_count"
            if col == "clustering_agreement" or (case == "case_edge" and col in DISCRIM):
                continue
            tol = 1e-5 if col == "pearson_edistance" else 1e-6 if col in EXPR_TOL | {
                "pearson_delta"} else 1e-12
            np.testing.assert_allclose(a, b, atol=tol, rtol=0, equal_nan=True, err_msg=col)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1] != "vcc"] + ["case_vcc"])
def test_de_tables_match(case, runs):
    out, _ = runs(case)
    folder = CASES[case][0]
    for pre in _prefixes(case):
        for which in ("real", "pred"):
            ref = pd.read_csv(_case_dir(case) / folder / f"{pre}{which}_de.csv")
            mine = pd.read_csv(out / f"{pre}{which}_de.csv")
            _compare_de(mine, ref, lfc_atol=1e-6)


def _compare_de(mine: pd.DataFrame, ref: pd.DataFrame, lfc_atol: float) -> None:
    assert list(mine.columns) == list(ref.columns)
    assert (mine["target"].astype(str).to_numpy() == ref["target"].astype(str).to_numpy()).all()
    assert (mine["feature"].astype(str).to_numpy() == ref["feature"].astype(str).to_numpy()).all()
    for c in ("target_membership", "ref_membership"):
        assert (mine[c].to_numpy() == ref[c].to_numpy()).all(), c
    np.testing.assert_allclose(mine["statistic"], ref["statistic"], atol=1e-9, rtol=0)
    for c in ("p_value", "fdr"):
        np.testing.assert_allclose(mine[c], ref[c], rtol=1e-8, atol=0, err_msg=c)
    la, lb = mine["log2_fold_change"].to_numpy(), ref["log2_fold_change"].to_numpy()
    fin = np.isfinite(lb)
    assert (la[~fin] == lb[~fin]).all() and np.isfinite(la[fin]).all()
    np.testing.assert_allclose(la[fin], lb[fin], atol=lfc_atol, rtol=0)
    for c in ("target_mean", "ref_mean", "percent_change"):
        a, b = mine[c].to_numpy(), ref[c].to_numpy()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=c)
    sig_a = mine["fdr"].to_numpy(np.float32) < np.float32(0.05)
    sig_b = ref["fdr"].to_numpy(np.float32) < np.float32(0.05)
    assert (sig_a == sig_b).all()


def test_vcc_baseline_and_score(tmp_path):
    import anndata as ad

    d = _case_dir("case_vcc")
    real = ad.read_h5ad(d / "real.h5ad")
    base = cell_mean_baseline(real, "target_gene", "non-targeting")
    ref = ad.read_h5ad(d / "baseline.h5ad")
    assert base.shape == ref.shape
    rl = ref.obs["target_gene"].astype(str).to_numpy()
    bl = base.obs["target_gene"].astype(str).to_numpy()
    assert pd.Series(rl).value_counts().to_dict() == pd.Series(bl).value_counts().to_dict()
    bx, rx = np.asarray(base.X), np.asarray(ref.X)
    np.testing.assert_allclose(bx[bl != "non-targeting"], rx[rl != "non-targeting"], atol=1e-6)
    np.testing.assert_array_equal(bx[bl == "non-targeting"], rx[rl == "non-targeting"])
    # baseline DE table
    de = wilcoxon_de(base.X, bl, "non-targeting", base.var_names)
    _compare_de(de, pd.read_csv(d / "baseline_de.csv"), lfc_atol=1e-5)
    # baseline evaluation
    res, _ = evaluate(base, real, "target_gene", "non-targeting", profile="vcc",
                      outdir=tmp_path / "base", num_threads=1)
    ref_res = pd.read_csv(d / "out_vcc_base" / "results.csv")
    np.testing.assert_allclose(res["mae"], ref_res["mae"], atol=1e-7, rtol=1e-6)
    for c in ("overlap_at_N", "discrimination_score_l1"):
        np.testing.assert_allclose(res[c], ref_res[c], atol=1e-12, rtol=0)
    # score.csv from the reference agg files, and end to end
    ref_score = pd.read_csv(d / "score.csv")
    for s in (score_agg(d / "out_vcc_user" / "agg_results.csv",
                        d / "out_vcc_base" / "agg_results.csv"),
              score_agg(d / "out_vcc_user" / "agg_results.csv",
                        tmp_path / "base" / "agg_results.csv")):
        assert list(s["metric"]) == list(ref_score["metric"])
        np.testing.assert_allclose(s["from_baseline"], ref_score["from_baseline"], atol=1e-12)


def test_vcc_baseline_from_raw_counts_and_a_counts_table(tmp_path):
    """Raw counts are normalised and log1p-transformed first (cell-eval's rule), and the
    command line's counts table is read by column name."""
    import anndata as ad
    import scanpy as sc

    from statetx.cli import main

    real = ad.read_h5ad(_case_dir("case_vcc") / "real.h5ad")
    counts = real.copy()
    counts.X = np.round(np.expm1(np.asarray(real.X.todense() if hasattr(real.X, "todense")
                                            else real.X)) * 3).astype(np.float32)
    logged = counts.copy()
    sc.pp.normalize_total(logged)
    sc.pp.log1p(logged)
    with pytest.warns(UserWarning, match="integer values only"):
        base = cell_mean_baseline(counts, "target_gene", "non-targeting")
    np.testing.assert_allclose(np.asarray(base.X), np.asarray(
        cell_mean_baseline(logged, "target_gene", "non-targeting").X), atol=1e-5)
    counts.write_h5ad(tmp_path / "counts.h5ad")
    perts = sorted(set(real.obs["target_gene"].astype(str)) - {"non-targeting"})
    pd.DataFrame({"n_cells": [3] * len(perts), "target_gene": perts}).to_csv(
        tmp_path / "n.csv", index=False)  # columns in the other order
    out = tmp_path / "b.h5ad"
    assert main(["evaluate", "baseline", "-a", str(tmp_path / "counts.h5ad"), "-c",
                 str(tmp_path / "n.csv"), "-o", str(out)]) == 0
    b = ad.read_h5ad(out)
    assert (b.obs["target_gene"] != "non-targeting").sum() == 3 * len(perts)
    assert float(np.max(b.X)) < 15
    pd.DataFrame({"n_cells": ["x"], "target_gene": ["p"]}).to_csv(tmp_path / "bad.csv",
                                                                index=False)
    assert main(["evaluate", "baseline", "-a", str(tmp_path / "counts.h5ad"), "-c",
                 str(tmp_path / "bad.csv"), "-o", str(tmp_path / "c.h5ad")]) == 2


def test_vcc_score_end_to_end(tmp_path):
    from statetx.metrics import vcc_score

    d = _case_dir("case_vcc")
    s = vcc_score(d / "pred.h5ad", d / "real.h5ad", "target_gene", "non-targeting",
                  outdir=tmp_path, num_threads=1)
    ref = pd.read_csv(d / "score.csv")
    assert list(s["metric"]) == list(ref["metric"])
    np.testing.assert_allclose(s["from_baseline"], ref["from_baseline"], atol=1e-12)
    assert (tmp_path / "score.csv").exists()
    assert (tmp_path / "user" / "agg_results.csv").exists()


def test_vcc_score_with_train_matches_the_command_line_flow(tmp_path):
    """vcc_score(train=...) builds the baseline as `statetx evaluate baseline` (cell-eval's
    `baseline`) does, with the training file's controls: the same score both ways. A training
    file of raw counts is normalised to the total the real log1p cells stand for; per cell type
    scoring is refused up front."""
    import anndata as ad

    from statetx.cli import main
    from statetx.errors import ConfigError
    from statetx.metrics import vcc_score

    d = _case_dir("case_vcc")
    real = ad.read_h5ad(d / "real.h5ad")
    train = real.copy()  # a training set: the real cells with other control cells
    ctrl = (train.obs["target_gene"] == "non-targeting").to_numpy()
    rng = np.random.default_rng(0)
    train = train[np.r_[np.flatnonzero(~ctrl), rng.choice(np.flatnonzero(ctrl), ctrl.sum() // 2,
                                                          replace=False)]].copy()
    train.write_h5ad(tmp_path / "train.h5ad")
    counts = real.obs["target_gene"].astype(str).value_counts().rename_axis("target_gene")
    counts.rename("n_cells").reset_index().to_csv(tmp_path / "n.csv", index=False)
    assert main(["evaluate", "baseline", "-a", str(tmp_path / "train.h5ad"), "-c",
                 str(tmp_path / "n.csv"), "-o", str(tmp_path / "base.h5ad"),
                 "--control-pert", "non-targeting"]) == 0
    kw = dict(pert_col="target_gene", control_pert="non-targeting", profile="vcc",
              num_threads=1)
    _, u = evaluate(d / "pred.h5ad", real, **kw)
    _, b = evaluate(tmp_path / "base.h5ad", real, **kw)
    cli = score_agg(u, b)
    py = vcc_score(d / "pred.h5ad", real, train=train, **kw)
    np.testing.assert_allclose(py["from_baseline"], cli["from_baseline"], atol=1e-12)
    raw = train.copy()  # the same training cells as counts, sequenced 3x deeper
    raw.X = np.round(3 * np.expm1(np.asarray(raw.X.toarray() if hasattr(raw.X, "toarray")
                                             else raw.X, dtype=np.float64)))
    with pytest.warns(UserWarning, match="train X holds integer values only"):
        from_raw = vcc_score(d / "pred.h5ad", real, train=raw, **kw)
    np.testing.assert_allclose(from_raw["from_baseline"], py["from_baseline"], atol=0.02)
    for key in ("celltype_col", "cell_type_key"):  # (the alias too: it reached evaluate)
        with pytest.raises(ConfigError, match="celltype_col is not supported"):
            vcc_score(d / "pred.h5ad", real, train=train, **{key: "cell_type"}, **kw)
