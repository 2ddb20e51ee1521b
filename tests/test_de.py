"""DE engine: SciPy's Mann–Whitney U is the oracle; BH and fold-change rules of metrics.md §6."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import false_discovery_control, mannwhitneyu

from statetx.errors import DataError
from statetx.metrics.de import DE_COLUMNS, bh_fdr, wilcoxon_de


def _data(seed: int, negative: bool = False, zeros: float = 0.6):
    rng = np.random.default_rng(seed)
    n = {"ctrl": 60, "A": 25, "B": 40, "C": 7}
    x = rng.integers(0, 6, size=(sum(n.values()), 30)).astype(np.float32) * 0.37
    x[rng.random(x.shape) < zeros] = 0.0
    if negative:
        x -= 0.74
    x[n["ctrl"]:n["ctrl"] + n["A"], :5] += 1.3  # a real effect
    lab = np.repeat(list(n), list(n.values()))
    perm = rng.permutation(lab.size)  # cells need not be grouped
    return x[perm], lab[perm]


@pytest.mark.parametrize("use_numba", [True, False])
@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_matches_scipy(negative, sparse, use_numba, monkeypatch):
    import statetx.metrics.de as de_mod

    monkeypatch.setattr(de_mod, "USE_NUMBA", use_numba)
    x, lab = _data(1, negative)
    de = wilcoxon_de(sp.csr_matrix(x) if sparse else x, lab, "ctrl", num_threads=2)
    assert list(de.columns) == DE_COLUMNS
    assert list(de["target"].unique()) == ["A", "B", "C"]
    for t in ("A", "B", "C"):
        sub = de[de["target"] == t]
        r = mannwhitneyu(x[lab == t].astype(np.float64), x[lab == "ctrl"].astype(np.float64),
                         method="asymptotic", use_continuity=True, axis=0)
        np.testing.assert_allclose(sub["statistic"], r.statistic, rtol=0, atol=1e-9)
        np.testing.assert_allclose(sub["p_value"], r.pvalue, rtol=1e-10, atol=1e-300)
        np.testing.assert_allclose(sub["fdr"], false_discovery_control(r.pvalue), rtol=1e-10)
        assert (sub["target_membership"] == (lab == t).sum()).all()
        assert (sub["ref_membership"] == (lab == "ctrl").sum()).all()


def test_constant_gene_gives_p_one_and_zero_fold_change():
    x, lab = _data(2)
    x[:, 3] = 0.0
    de = wilcoxon_de(x, lab, "ctrl", genes=[f"g{i}" for i in range(30)])
    g = de[de["feature"] == "g3"]
    assert (g["p_value"] == 1.0).all() and (g["log2_fold_change"] == 0.0).all()
    n1 = g["target_membership"].to_numpy()
    np.testing.assert_allclose(g["statistic"], n1 * 60 / 2)


def test_infinite_fold_changes():
    x, lab = _data(3, zeros=0.0)
    x += 0.1
    x[lab == "ctrl", 0] = 0.0  # x/0 → +inf
    x[lab == "A", 1] = 0.0  # 0/x → -inf
    de = wilcoxon_de(x, lab, "ctrl", genes=[f"g{i}" for i in range(30)])
    assert (de[de["feature"] == "g0"]["log2_fold_change"] == np.inf).all()
    a = de[de["target"] == "A"].set_index("feature")
    assert a.loc["g1", "log2_fold_change"] == -np.inf
    assert a.loc["g1", "percent_change"] == -1.0
    assert np.isinf(a.loc["g0", "percent_change"])


def test_bh_matches_scipy():
    p = np.random.default_rng(0).random((3, 50)) ** 3
    np.testing.assert_allclose(bh_fdr(p), false_discovery_control(p, axis=1), rtol=1e-12)


def test_missing_control_is_an_error():
    x, lab = _data(4)
    with pytest.raises(DataError, match="non-targeting"):
        wilcoxon_de(x, lab, "non-targeting")


def test_epsilon():
    x, lab = _data(5)
    de = wilcoxon_de(x, lab, "ctrl", epsilon=1e-9)
    assert np.isfinite(de["log2_fold_change"]).all()


def test_vcc_2025_mode_matches_scipy_auto_and_global_bh():
    """de_mode "vcc-2025" (cell-eval <= 0.6.7): SciPy's method="auto" p-values (exact for a
    group of <= 8 cells without ties), BH over every row at once, clipped fold changes."""
    x, lab = _data(2, zeros=0.3)
    x[lab == "C", 10] = np.arange(7) + 100.0  # gene 10: no ties with the 7-cell group C ...
    x[lab == "ctrl", 10] = np.arange(60) * 0.5 + 0.01
    de = wilcoxon_de(x, lab, "ctrl", num_threads=2, mode="vcc-2025")
    p = []
    for t in ("A", "B", "C"):
        sub = de[de["target"] == t]
        xt, xc = x[lab == t].astype(np.float64), x[lab == "ctrl"].astype(np.float64)
        r = np.array([mannwhitneyu(xt[:, g], xc[:, g], method="auto").pvalue  # gene by gene
                      for g in range(x.shape[1])])
        np.testing.assert_allclose(sub["p_value"], r, rtol=1e-6, atol=1e-300)
        p.append(r)
    exact = de[(de["target"] == "C")]["p_value"].to_numpy()[10]
    asymptotic = wilcoxon_de(x, lab, "ctrl", num_threads=2)
    assert exact != asymptotic[asymptotic["target"] == "C"]["p_value"].to_numpy()[10]
    np.testing.assert_allclose(de["fdr"], false_discovery_control(np.concatenate(p)),
                               rtol=1e-6)
    # fold changes: ratio of expm1 means, with 0 clipped to 20 / 1/20 and 0/0 = 1
    zero = np.zeros((4, 3), dtype=np.float32)
    zero[2:, 0] = 1.0  # gene 0: target > 0, control 0 -> log2(20)
    zero[:2, 1] = 1.0  # gene 1: target 0, control > 0 -> log2(1/20); gene 2: both 0 -> 0
    clipped = wilcoxon_de(zero, np.array(["c", "c", "t", "t"]), "c", mode="vcc-2025")
    np.testing.assert_allclose(clipped["log2_fold_change"], [np.log2(20), -np.log2(20), 0.0])
    with pytest.raises(Exception, match="de_mode 'vcc-2024' is not supported"):
        wilcoxon_de(zero, np.array(["c", "c", "t", "t"]), "c", mode="vcc-2024")


def test_fold_changes_of_means_whose_expm1_overflows_float32():
    """Counts scored as they are (allow_discrete): expm1 of a mean above ~88.7 overflows float32
    (and above ~709.8 float64). Those fold changes come from the logs, in float64, and follow the
    usual rules (x/0 → +inf, 0/x → -inf; clipped in vcc-2025); the others are unchanged."""
    rng = np.random.default_rng(0)
    x = rng.poisson(5, size=(40, 6)).astype(np.float32)
    x[:20, 0], x[20:, 0] = rng.poisson(100, 20), rng.poisson(140, 20)  # both sides overflow
    x[:20, 1], x[20:, 1] = rng.poisson(3, 20), rng.poisson(120, 20)  # the target side only
    x[:, 2] = rng.poisson(900, 40)  # beyond float64's expm1 too
    x[:20, 3], x[20:, 3] = 0.0, rng.poisson(120, 20)  # x/0
    x[:20, 4], x[20:, 4] = rng.poisson(120, 20), 0.0  # 0/x
    lab = np.array(["c"] * 20 + ["A"] * 20)
    mt, mr = x[20:].mean(0).astype(np.float64), x[:20].mean(0).astype(np.float64)  # (as DE's)
    de = wilcoxon_de(x, lab, "c")
    lfc, pc = de["log2_fold_change"].to_numpy(), de["percent_change"].to_numpy()
    assert not np.isnan(lfc).any() and not np.isnan(pc).any()
    with np.errstate(all="ignore"):
        t, r = np.expm1(mt), np.expm1(mr)
        np.testing.assert_allclose(lfc[:2], np.log2(t / r)[:2], atol=1e-9)
        np.testing.assert_allclose(pc[:2], ((t - r) / r)[:2], rtol=1e-9)
    np.testing.assert_allclose(lfc[2], (mt[2] - mr[2]) / np.log(2), atol=1e-4)  # (≈ for big m)
    # the means keep one dtype whatever the data (float32; inf where expm1 overflows it)
    assert de["target_mean"].dtype == np.float32 and np.isinf(de["target_mean"][:2]).all()
    assert (lfc[3], lfc[4], pc[3], pc[4]) == (np.inf, -np.inf, np.inf, -1.0)
    np.testing.assert_array_equal(lfc[5], np.float64(np.log2(
        np.float64(np.float32(t[5])) / np.float64(np.float32(r[5])))))  # (float32 means as ever)
    vcc = wilcoxon_de(x, lab, "c", mode="vcc-2025")["log2_fold_change"].to_numpy()
    np.testing.assert_allclose(vcc[[0, 1, 3, 4]], [lfc[0], lfc[1], np.log2(20), -np.log2(20)],
                               atol=1e-5)
    eps = wilcoxon_de(x, lab, "c", epsilon=1e-9)["log2_fold_change"].to_numpy()
    np.testing.assert_allclose(eps[3], np.log2(t[3] / 1e-9), rtol=1e-9)
