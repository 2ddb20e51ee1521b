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
