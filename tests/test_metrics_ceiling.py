"""The data ceiling (spec metrics.md §9) on real data: Kang 2018 PBMCs, IFN-β vs control."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import KANG, need

from statetx.errors import ConfigError
from statetx.metrics import ceiling, evaluate, fraction_of_ceiling
from statetx.metrics.ceiling import RELIABILITY_METRICS, split_halves

OPTS = dict(pert_col="target_gene", control_pert="control", celltype_col="cell_type")


@pytest.fixture(scope="module")
def kang():
    import scanpy as sc

    a = sc.read_h5ad(need(KANG))
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return a


def test_halves_are_disjoint_balanced_and_seeded(kang):
    a, b = split_halves(kang, "target_gene", "cell_type", seed=0)
    assert not set(a.obs_names) & set(b.obs_names)
    sizes = kang.obs.groupby(["cell_type", "target_gene"], observed=True).size() // 2
    for half in (a, b):
        got = half.obs.groupby(["cell_type", "target_gene"], observed=True).size()
        pd.testing.assert_series_equal(got, sizes, check_names=False)
    again, _ = split_halves(kang, "target_gene", "cell_type", seed=0)
    other, _ = split_halves(kang, "target_gene", "cell_type", seed=1)
    assert list(again.obs_names) == list(a.obs_names) != list(other.obs_names)
    # a group of one cell cannot be halved: said, not dropped silently
    one = kang[(kang.obs["target_gene"] == "control") | (kang.obs_names == kang.obs_names[
        (kang.obs["target_gene"] != "control").to_numpy()][0])].copy()
    with pytest.warns(UserWarning, match="1 group.*single cell.*IFNB"):
        split_halves(one, "target_gene", "cell_type", seed=0)


def test_ceiling_is_spearman_brown_of_half_against_half(kang, tmp_path):
    results, agg = ceiling(kang, **OPTS, profile="minimal", num_threads=2, outdir=tmp_path)
    # per cell type, one pair of files prefixed as evaluate's, NaN written as NaN (not null)
    assert not (tmp_path / "ceiling_results.csv").exists()
    for ct in agg["celltype"]:
        pre = str(ct).replace("/", "-") + "_"
        res_ct = pd.read_csv(tmp_path / f"{pre}ceiling_results.csv")
        assert list(res_ct["perturbation"]) == list(
            results.loc[results["celltype"] == ct, "perturbation"])
        text = (tmp_path / f"{pre}agg_ceiling_results.csv").read_text().splitlines()
        assert text[0].split(",")[0] == "overlap_at_N" and ",NaN," in text[1]
    for _, row in agg.iterrows():
        r = results.loc[results["celltype"] == row["celltype"], "pearson_delta"].mean()
        assert row["pearson_delta"] == pytest.approx(2 * r / (1 + r))
        assert r < row["pearson_delta"] <= 1  # the full data are more reliable than a half
        others = [m for m in agg.columns if m not in ("celltype", *RELIABILITY_METRICS)]
        assert all(np.isnan(row[m]) for m in others)
    # the strong monocyte response is more reproducible than the weak CD8 T-cell one
    by_ct = agg.set_index("celltype")["pearson_delta"]
    assert by_ct["CD14+ Monocytes"] > by_ct["CD8 T cells"]


def test_fraction_of_ceiling(kang):
    a, b = split_halves(kang, "target_gene", "cell_type", seed=0)
    _, agg = evaluate(a, b, **OPTS, profile="minimal", num_threads=2)
    _, ceil = ceiling(kang, **OPTS, profile="minimal", num_threads=2, seed=0)
    frac = fraction_of_ceiling(agg, ceil).set_index("celltype")["pearson_delta"]
    mean = agg[agg["statistic"] == "mean"].set_index("celltype")["pearson_delta"]
    np.testing.assert_allclose(frac.loc[mean.index], (1 + mean) / 2, rtol=1e-9)  # r / SB(r)
    no_corr = agg.drop(columns="pearson_delta")  # nothing left to divide: said, not empty
    with pytest.raises(ConfigError, match="no metric has both a score and a ceiling"):
        fraction_of_ceiling(no_corr, ceil)
