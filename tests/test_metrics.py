"""statetx.metrics.evaluate: properties, input checks, outputs and profiles (synthetic data)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest

from statetx.errors import ConfigError, DataError
from statetx.metrics import PROFILES, evaluate
from statetx.metrics._synthetic import synthetic_log1p
from statetx.metrics._table import MetricTable

MINIMAL_COLS = ["perturbation", "overlap_at_N", "precision_at_N", "de_nsig_counts_real",
                "de_nsig_counts_pred", "pearson_delta", "mse", "mae", "discrimination_score_l1"]


@pytest.fixture(scope="module")
def real():
    return synthetic_log1p(6, 40, 80, 60, seed=1)


@pytest.fixture(scope="module")
def pred(real):
    return synthetic_log1p(6, 30, 70, 60, seed=2, effects=real[1])[0]


def test_perfect_prediction(real):
    res, agg = evaluate(real[0], real[0].copy(), profile="full",
                        skip_metrics=["clustering_agreement"], num_threads=1)
    assert np.allclose(res["pearson_delta"], 1.0)
    for m in ("discrimination_score_l1", "discrimination_score_l2",
              "discrimination_score_cosine"):
        assert (res[m] == 1.0).all(), m
    assert (res["mae"] == 0).all() and (res["mse_delta"] == 0).all()
    assert (res["overlap_at_N"][res["de_nsig_counts_real"] > 0] == 1.0).all()
    assert np.isclose(res["pearson_edistance"].iloc[0], 1.0)
    assert list(agg["statistic"]) == ["count", "null_count", "mean", "std", "min", "25%", "50%",
                                      "75%", "max"]


def test_good_prediction_beats_shuffled_labels(real, pred):
    good, _ = evaluate(pred, real[0], profile="minimal", num_threads=1)
    assert list(good.columns) == MINIMAL_COLS
    shuf = pred.copy()
    lab = shuf.obs["target_gene"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    pert = lab != "non-targeting"
    lab[pert] = rng.permutation(lab[pert])
    perts = sorted(set(lab[pert]))
    ren = dict(zip(perts, perts[1:] + perts[:1]))  # also rotate names so groups are wrong
    shuf.obs["target_gene"] = [ren.get(x, x) for x in lab]
    bad, _ = evaluate(shuf, real[0], profile="minimal", num_threads=1)
    assert good["pearson_delta"].mean() > 0.5
    assert bad["pearson_delta"].mean() < good["pearson_delta"].mean()
    assert bad["discrimination_score_l1"].mean() < good["discrimination_score_l1"].mean()
    assert good["discrimination_score_l1"].mean() == 1.0


def test_profiles_and_skip(real, pred):
    for prof in ("vcc", "pds", "de", "anndata"):
        res, _ = evaluate(pred, real[0], profile=prof, num_threads=1,
                          skip_metrics=["clustering_agreement"] if prof == "anndata" else ())
        want = [c for m in PROFILES[prof] if m != "clustering_agreement"
                for c in (["de_nsig_counts_real", "de_nsig_counts_pred"]
                          if m == "de_nsig_counts" else [m])]
        assert list(res.columns) == ["perturbation", *want], prof
    res, _ = evaluate(pred, real[0], profile="minimal", skip_metrics=["mse"], num_threads=1)
    assert "mse" not in res.columns
    with pytest.raises(ConfigError, match="msee"):
        evaluate(pred, real[0], skip_metrics=["msee"])
    with pytest.raises(ConfigError, match="profile"):
        evaluate(pred, real[0], profile="fulll")


def test_gene_order_mismatch(real, pred):
    p = pred[:, list(reversed(pred.var_names))].copy()
    with pytest.raises(DataError, match="different order.*position 0"):
        evaluate(p, real[0], profile="pds")
    res, _ = evaluate(p, real[0], profile="pds", align_genes=True)
    ref, _ = evaluate(pred, real[0], profile="pds")
    pd.testing.assert_frame_equal(res, ref)
    q = pred[:, :-1].copy()
    with pytest.raises(DataError, match="only in real: \\[G059\\]"):
        evaluate(q, real[0], profile="pds")


def test_missing_control_and_column(real, pred):
    p = pred[pred.obs["target_gene"] != "non-targeting"].copy()
    with pytest.raises(DataError, match="control label 'non-targeting' not found in pred"):
        evaluate(p, real[0], profile="pds")
    with pytest.raises(DataError, match="'gene' not found in pred.*target_gene"):
        evaluate(pred, real[0], pert_col="gene", profile="pds")
    with pytest.raises(DataError, match=r"'NT' not found in pred.*look like controls: "
                                        r"non-targeting\."):
        evaluate(pred, real[0], control_pert="NT", profile="pds")
    r = real[0].copy()
    labels = r.obs["target_gene"].astype(object)
    labels.iloc[:3] = np.nan  # a missing label is an error, not a perturbation called "nan"
    r.obs["target_gene"] = labels
    with pytest.raises(DataError, match=r"real obs\['target_gene'\] has 3 cell\(s\) without"):
        evaluate(pred, r, profile="pds")


def test_label_sets_must_match(real, pred):
    p = pred[pred.obs["target_gene"] != "G001"].copy()
    with pytest.raises(DataError, match=r"only in real: \[G001\]"):
        evaluate(p, real[0], profile="pds")
    res, _ = evaluate(p, real[0], profile="pds", shared_only=True)
    assert "G001" not in set(res["perturbation"])


def test_scale_checks(real, pred):
    p = pred.copy()
    p.X = np.expm1(p.X) * 3.3  # normalised counts without log1p
    with pytest.raises(DataError, match="pred X has a maximum.*log1p"):
        evaluate(p, real[0], profile="pds")
    p.X = pred.X - 1.0
    with pytest.raises(DataError, match="pred X has negative values"):
        evaluate(p, real[0], profile="pds")
    p.X = np.round(np.expm1(pred.X))  # integer counts: converted, with a notice
    with pytest.warns(UserWarning, match="raw counts"):
        res, _ = evaluate(p, real[0], profile="pds")
    assert res["discrimination_score_l1"].mean() > 0.5
    p.X = pred.X.copy()
    p.X[0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        evaluate(p, real[0], profile="pds")


def test_outdir_files_and_celltypes(tmp_path, real, pred):
    r, p = real[0].copy(), pred.copy()
    r.obs["ct"] = np.where(np.arange(r.n_obs) % 2, "a/b", "c")
    p.obs["ct"] = np.where(np.arange(p.n_obs) % 2, "a/b", "c")
    res, agg = evaluate(p, r, celltype_col="ct", profile="minimal", outdir=tmp_path,
                        num_threads=1)
    assert list(res.columns[:2]) == ["celltype", "perturbation"]
    assert set(res["celltype"]) == {"a/b", "c"}
    names = sorted(f.name for f in tmp_path.iterdir())
    assert names == sorted([".statetx_evaluate", *(f"{c}_{f}.csv" for c in ("a-b", "c")
                           for f in ("results", "agg_results", "real_de", "pred_de"))])
    back = pd.read_csv(tmp_path / "c_results.csv")
    assert list(back.columns) == MINIMAL_COLS
    de = pd.read_csv(tmp_path / "c_real_de.csv")
    assert list(de.columns[:2]) == ["target", "feature"]
    r.obs.loc[r.obs_names[0], "ct"] = "zzz"
    with pytest.raises(DataError, match="zzz"):
        evaluate(p, r, celltype_col="ct", profile="pds")


def test_failed_write_leaves_no_partial_file(tmp_path, real, pred, monkeypatch):
    import statetx.metrics._table as tb

    def boom(self, path, **kw):
        with open(path, "w") as fh:
            fh.write("half")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", boom)
    monkeypatch.setattr(tb, "_write_csv_fast", boom)  # (the DE tables' own writer)
    with pytest.raises(OSError):
        evaluate(pred, real[0], profile="minimal", outdir=tmp_path, num_threads=1)
    assert not any(f.name.endswith("_de.csv") or ".tmp" in f.name for f in tmp_path.iterdir())
    assert tb  # module used


def test_supplied_de_tables(tmp_path, real, pred):
    res, _ = evaluate(pred, real[0], profile="minimal", outdir=tmp_path, num_threads=1)
    res2, _ = evaluate(pred, real[0], profile="minimal", de_pred=tmp_path / "pred_de.csv",
                       de_real=tmp_path / "real_de.csv", num_threads=1)
    pd.testing.assert_frame_equal(res, res2)
    shuffled = pd.read_csv(tmp_path / "pred_de.csv").sample(frac=1.0, random_state=0)
    res3, _ = evaluate(pred, real[0], profile="full", de_pred=shuffled, num_threads=1,
                       de_real=tmp_path / "real_de.csv", skip_metrics=["clustering_agreement"])
    full, _ = evaluate(pred, real[0], profile="full", num_threads=1,
                       skip_metrics=["clustering_agreement"])
    pd.testing.assert_frame_equal(res3, full)
    bad = pd.read_csv(tmp_path / "real_de.csv").drop(columns=["fdr"])
    with pytest.raises(DataError, match="fdr"):
        evaluate(pred, real[0], de_real=bad)


def test_describe_null_and_nan_rules():
    t = MetricTable(["a", "b", "c", "d", "e"])
    t.add("x", [0.975, float("nan"), 0.85, 0.4856, 0.1724])
    t.add("y", [1.0, None, 0.5, 0.25, 0.0])
    agg, nulls = t.describe()
    x = dict(zip(agg["statistic"], agg["x"]))
    y = dict(zip(agg["statistic"], agg["y"]))
    assert x["count"] == 5 and x["null_count"] == 0 and np.isnan(x["mean"]) and np.isnan(x["std"])
    assert x["min"] == 0.1724 and x["max"] == 0.975
    assert (x["25%"], x["50%"], x["75%"]) == (0.4856, 0.85, 0.975)
    assert y["count"] == 4 and y["null_count"] == 1 and y["mean"] == 0.4375
    assert (y["25%"], y["50%"], y["75%"]) == (0.25, 0.5, 0.5)  # index floor(q(n-1) + 0.5)
    assert not nulls["y"].any()


def test_sparse_input_gives_the_same_results(real, pred):
    import scipy.sparse as sp

    r, p = real[0].copy(), pred.copy()
    dense, _ = evaluate(p, r, profile="full", skip_metrics=["clustering_agreement"], num_threads=1)
    r.X, p.X = sp.csr_matrix(r.X), sp.csr_matrix(p.X)
    sparse, _ = evaluate(p, r, profile="full", skip_metrics=["clustering_agreement"],
                         num_threads=1)
    pd.testing.assert_frame_equal(dense, sparse, atol=1e-6, rtol=0)


def test_de_mode_vcc_2025_is_recorded_and_changes_fdr(real, pred, tmp_path):
    res, agg = evaluate(pred, real[0], profile="minimal", num_threads=1)
    res25, _ = evaluate(pred, real[0], profile="minimal", num_threads=1, de_mode="vcc-2025",
                        outdir=tmp_path)
    assert res.attrs["de_mode"] == "pdex-0.3" and res25.attrs["de_mode"] == "vcc-2025"
    assert (tmp_path / "de_mode.txt").read_text().strip() == "vcc-2025"
    # global BH over all perturbations is stricter: no more significant genes than per target
    assert (res25["de_nsig_counts_real"] <= res["de_nsig_counts_real"]).all()
    with pytest.raises(ConfigError, match="de_mode 'x' is not supported"):
        evaluate(pred, real[0], profile="minimal", de_mode="x")


def test_extended_profile_extras(real, pred):
    """pearson_delta_centroid and centroid_accuracy (statetx extras, metrics.md §12)."""
    res, _ = evaluate(real[0], real[0].copy(), profile="extended", num_threads=1,
                      skip_metrics=["clustering_agreement", "pearson_edistance"])
    assert np.allclose(res["pearson_delta_centroid"], 1.0)
    assert (res["centroid_accuracy"] == 1.0).all()
    # a prediction that only gets the shared perturbed-vs-control shift right
    x = real[0].copy()
    labels = x.obs["target_gene"].astype(str).to_numpy()
    ctrl = labels == "non-targeting"
    shared = np.asarray(x.X[~ctrl]).mean(0)
    x.X = np.asarray(x.X, dtype=np.float32)
    x.X[~ctrl] = shared
    shift, _ = evaluate(x, real[0], profile="extended", num_threads=1,
                        skip_metrics=["clustering_agreement", "pearson_edistance"])
    assert shift["pearson_delta"].mean() > 0.3  # against the control, the shift scores
    assert shift["pearson_delta_centroid"].isna().all()  # against the centroids: nothing
    assert "pearson_delta_centroid" not in evaluate(pred, real[0], profile="full",
                                                    num_threads=1)[0].columns


def test_pred_and_real_of_different_cell_types_are_flagged(real, pred):
    """Real cells of cell types the prediction does not cover would be pooled into the
    comparison: a warning names them (the metrics themselves stay cell-eval's)."""
    import warnings

    r, p = real[0].copy(), pred.copy()
    r.obs["cell_type"] = np.where(np.arange(r.n_obs) % 2, "B cells", "T cells")
    p.obs["cell_type"] = "B cells"
    with pytest.warns(UserWarning, match=r"real cells of T cells are pooled.*celltype_col="
                                         "'cell_type'"):
        evaluate(p, r, profile="minimal", num_threads=1)
    r.obs["cell_type"] = "B cells"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(p, r, profile="minimal", num_threads=1)


def test_a_count_mark_is_dropped_once_the_data_are_log_transformed(real):
    from statetx.metrics._inputs import is_count_scale

    a = real[0].copy()
    a.uns["statetx"] = {"scale": "counts"}
    assert is_count_scale(a)
    a.uns["log1p"] = {"base": None}  # what scanpy.pp.log1p leaves
    assert not is_count_scale(a)


def test_few_perturbations_make_discrimination_scores_coarse(real):
    """With fewer than five perturbations the rank-based scores are said to be coarse; with six,
    nothing is said."""
    a = real[0]
    labels = a.obs["target_gene"].astype(str)
    keep = labels.isin(["non-targeting", *sorted(set(labels) - {"non-targeting"})[:2]])
    few = a[keep.to_numpy()].copy()
    with pytest.warns(UserWarning, match=r"discrimination_score_l1 rank each prediction among "
                                         r"the real deltas of only 2 perturbation\(s\)"):
        evaluate(few, few.copy(), profile="pds")
    with pytest.warns(UserWarning, match=r"pearson_edistance and clustering_agreement compare "
                                         r"the perturbations with each other, and there are "
                                         r"only 2"):
        evaluate(few, few.copy(), profile="full", skip_metrics=[
            m for m in PROFILES["full"] if m not in ("pearson_edistance", "clustering_agreement")])
    one = a[labels.isin(["non-targeting", sorted(set(labels) - {"non-targeting"})[0]])
            .to_numpy()].copy()  # (pearson_edistance is omitted with one: not named)
    with pytest.warns(UserWarning) as said:
        evaluate(one, one.copy(), profile="full", skip_metrics=[
            m for m in PROFILES["full"] if m not in ("pearson_edistance", "clustering_agreement")])
    across = [str(w.message) for w in said if "with each other" in str(w.message)]
    assert len(across) == 1 and across[0].startswith("clustering_agreement compares the")
    assert "pearson_edistance" not in across[0] and "Do not read this value." in across[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(a, a.copy(), profile="pds")


# ------------------------------------------------------------------ predictions of other models
def test_counts_prediction_is_brought_to_the_real_cells_scale(kang_raw, kang_log):
    """Kang 2018: a prediction given as raw counts against log1p(1e4) real cells is normalised to
    the total the real cells stand for (1e4), not to its own median: the real counts score as a
    perfect prediction (and alike the other way round). Both sides as counts share the real
    median."""
    real = kang_log.copy()
    pred = kang_raw.copy()
    pred.X = np.asarray(pred.layers["counts"].toarray(), dtype=np.float32)
    kw = dict(pert_col="target_gene", control_pert="control", celltype_col="cell_type",
              profile="minimal", skip_metrics=["overlap_at_N", "precision_at_N",
                                               "de_nsig_counts", "discrimination_score_l1"])
    with pytest.warns(UserWarning, match=r"pred X holds integer values only .*target_sum=10000\)\)"
                                         r", the counts per cell the other file's log1p values"):
        res, _ = evaluate(pred, real, **kw)
    assert np.allclose(res["mae"], 0, atol=1e-4) and np.allclose(res["pearson_delta"], 1)
    # the mirror case: real counts take the total the log1p prediction stands for, said
    with pytest.warns(UserWarning, match=r"real X holds integer values only .*target_sum=10000\)"
                                         r"\).* The truth then takes its scale from pred"):
        mirror, _ = evaluate(real, pred, **kw)
    assert np.allclose(mirror["mae"], 0, atol=1e-4)
    both = real.copy()
    both.X = pred.X.copy()
    with pytest.warns(UserWarning, match="the real cells' median total \\(both files hold"):
        res2, _ = evaluate(pred, both, **kw)
    assert np.allclose(res2["mae"], 0, atol=1e-6)
    # real values far above log1p scale are refused before the counts are brought to them
    # (no overflow in the total they would stand for, no normalisation warning)
    wrong = real.copy()
    wrong.X = np.expm1(np.asarray(real.X.toarray() if hasattr(real.X, "toarray") else real.X))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="real X has a maximum of"):
            evaluate(pred, wrong, **kw)


def test_shared_only_per_cell_type_and_said(perturbench):
    """perturbench: a prediction lacking PLK4 in T98G only: shared_only drops it there (said),
    and keeps it in the other cell lines."""
    real = perturbench
    shared = real.obs.groupby("target_gene", observed=True)["cell_type"].nunique()
    keep = real.obs["target_gene"].isin(shared[shared == 4].index).to_numpy()
    real = real[keep].copy()
    drop = ((real.obs["cell_type"] == "T98G") & (real.obs["target_gene"] == "PLK4")).to_numpy()
    pred = real[~drop].copy()
    kw = dict(pert_col="target_gene", control_pert="control", celltype_col="cell_type",
              profile="pds")
    with pytest.raises(DataError, match=r"cell type 'T98G'.*only in real: \[PLK4\]"):
        evaluate(pred, real, **kw)
    with pytest.warns(UserWarning, match=r"shared_only: 1 perturbation\(s\) are not in both "
                                         r"files.*only in real: \[PLK4\]"):
        res, _ = evaluate(pred, real, **kw, shared_only=True)
    per_ct = res.groupby("celltype")["perturbation"].apply(set)
    assert "PLK4" not in per_ct["T98G"] and all("PLK4" in per_ct[c] for c in per_ct.index
                                                   if c != "T98G")


def test_mismatched_inputs_say_how_to_fix_them(perturbench, tmp_path):
    """Errors for a prediction of another model: a column named otherwise, another control label,
    no control cells, labels differing in case, DE tables of other data."""
    real = perturbench[perturbench.obs["cell_type"] == "k562"].copy()
    kw = dict(pert_col="target_gene", control_pert="control", profile="pds")
    renamed = real.copy()
    renamed.obs = renamed.obs.rename(columns={"target_gene": "perturbation"})
    with pytest.raises(DataError, match=r"'target_gene' not found in pred obs.*one column name "
                                        r"from both files and real has it: rename pred's"):
        evaluate(renamed, real, **kw)

    def relabelled(mapping: dict):
        a = real.copy()
        a.obs["target_gene"] = a.obs["target_gene"].astype(str).replace(mapping)
        return a

    with pytest.raises(DataError, match=r"relabel pred's, e.g. pred.obs\['target_gene'\] = .*"
                                        r"replace\(\{'ctrl': 'control'\}\)"):
        evaluate(relabelled({"control": "ctrl"}), real, **kw)
    no_ctrl = real[real.obs["target_gene"] != "control"].copy()
    with pytest.raises(DataError, match="pred needs control cells too: copy the real control"):
        evaluate(no_ctrl, real, **kw)
    with pytest.raises(DataError, match=r"1 differ only in case \(e.g. pred 'plk4' vs real "
                                        r"'PLK4'\)"):
        evaluate(relabelled({"PLK4": "plk4"}), real, **kw)
    de = pd.DataFrame({"target": ["P1"], "feature": ["G1"], "log2_fold_change": [1.0],
                       "p_value": [0.01], "fdr": [0.01]})
    with pytest.raises(DataError, match=r"supplied real DE table \(de_real\) has no rows for 33 "
                                        r"of the 33 evaluated perturbation"):
        evaluate(real, real.copy(), pert_col="target_gene", control_pert="control",
                 profile="minimal", de_real=de)


def test_no_real_de_gene_is_said(perturbench):
    """perturbench U87MG (CRISPRi, weak effects): no perturbation has a significant real DE gene,
    so the DE overlap is 0 whatever the prediction; evaluate says so."""
    u87 = perturbench[perturbench.obs["cell_type"] == "U87MG"].copy()
    with pytest.warns(UserWarning, match=r"none of the 9 perturbation\(s\) has a significant "
                                         r"real DE gene"):
        res, _ = evaluate(u87, u87.copy(), "target_gene", "control", profile="minimal",
                          skip_metrics=["discrimination_score_l1"])
    assert (res["de_nsig_counts_real"] == 0).all() and (res["overlap_at_N"] == 0).all()
    assert np.allclose(res["pearson_delta"], 1)


def test_recorded_labels_are_the_defaults_and_aliases_are_not_doubled(real):
    """cell_mean_baseline reads the column and control statetx recorded (as evaluate does);
    evaluate refuses a prediction given twice (adata_pred and its alias pred)."""
    from statetx.metrics import cell_mean_baseline

    a = real[0].copy()
    a.obs = a.obs.rename(columns={"target_gene": "gene"})
    a.obs["gene"] = a.obs["gene"].astype(str).replace({"non-targeting": "ctrl"})
    a.uns["statetx"] = {"pert_col": "gene", "control_pert": "ctrl"}
    base = cell_mean_baseline(a)
    assert base.uns["statetx"]["pert_col"] == "gene"
    assert (base.obs["gene"] == "ctrl").sum() == (a.obs["gene"] == "ctrl").sum()
    with pytest.raises(ConfigError, match="adata_pred and its alias pred were both given"):
        evaluate(a, a, pred=a)


def test_duplicated_gene_names_are_refused(real, pred):
    """The DE lists compare genes by name: repeated names would count once (a perfect
    prediction scored overlap 0.5)."""
    r = real[0].copy()
    r.var_names = ["G000"] * 3 + list(r.var_names[3:])
    with pytest.raises(DataError, match=r"real var_names hold duplicated genes: \[G000\] \(2 "
                                        r"extra.*var_names_make_unique"):
        evaluate(real[0], r, profile="minimal", align_genes=True)
    # the discrimination score leaves out every column named like the perturbation
    from statetx.metrics.expression import discrimination_score

    d_real = np.array([[5.0, 5, 0, 0], [0, 0, 1, 1]])
    d_pred = np.array([[0.0, 0, 0, 0], [0, 0, 1, 1]])
    np.testing.assert_array_equal(
        discrimination_score(d_real, d_pred, ["D", "B"], ["D", "D", "x", "y"], "l1"), [1.0, 1.0])


def test_skip_one_column_of_de_nsig_counts(real, pred):
    res, _ = evaluate(pred, real[0], profile="minimal", num_threads=1,
                      skip_metrics=["de_nsig_counts_real"])
    assert "de_nsig_counts_real" not in res.columns
    assert list(res.columns[:4]) == ["perturbation", "overlap_at_N", "precision_at_N",
                                     "de_nsig_counts_pred"]
    nsig = ["de_nsig_counts_real", "de_nsig_counts_pred"]
    both, _ = evaluate(pred, real[0], profile="minimal", num_threads=1, skip_metrics=nsig)
    assert not set(nsig) & set(both.columns)
    ext, _ = evaluate(pred, real[0], profile="extended", num_threads=1,
                      skip_metrics=["clustering_agreement", "centroid_accuracy"])
    assert "centroid_accuracy" not in ext.columns and "pearson_delta_centroid" in ext.columns


def test_de_tables_written_in_every_profile_but_pds(real, pred, tmp_path):
    for prof in ("anndata", "pds"):
        out = tmp_path / prof
        evaluate(pred, real[0], profile=prof, outdir=out, num_threads=1,
                 skip_metrics=["clustering_agreement"] if prof == "anndata" else ())
        assert (out / "real_de.csv").is_file() == (prof != "pds")
        assert (out / "pred_de.csv").is_file() == (prof != "pds")
    de = pd.read_csv(tmp_path / "anndata" / "real_de.csv")
    assert set(de["target"]) == set(real[0].obs["target_gene"]) - {"non-targeting"}


def test_one_perturbation_omits_pearson_edistance(real, tmp_path):
    r = real[0][real[0].obs["target_gene"].isin(["non-targeting", "G000"])].copy()
    with pytest.warns(UserWarning, match="metrics omitted .*pearson_edistance") as said:
        res, _ = evaluate(r, r.copy(), profile="anndata", outdir=tmp_path, num_threads=1,
                          skip_metrics=["clustering_agreement"])
    assert sum("omitted" in str(w.message) for w in said) == 1  # once, however many tables
    r.obs["ct"] = np.where(np.arange(r.n_obs) % 2, "a", "b")
    with pytest.warns(UserWarning) as said:
        evaluate(r, r.copy(), profile="anndata", celltype_col="ct", num_threads=1,
                 skip_metrics=["clustering_agreement"])
    assert sum("omitted" in str(w.message) for w in said) == 1
    assert "pearson_edistance" not in res.columns
    assert "pearson_edistance" in (tmp_path / "skipped_metrics.txt").read_text()


def test_real_data_without_controls_is_not_told_to_copy_them(real, pred):
    r = real[0][real[0].obs["target_gene"] != "non-targeting"].copy()
    with pytest.raises(DataError, match="not found in real.*real data need their own control"):
        evaluate(pred, r, profile="pds")


def test_clustering_agreement_is_never_below_zero():
    from statetx.metrics.clustering import clustering_agreement

    rng = np.random.default_rng(0)
    vals = [clustering_agreement(rng.normal(size=(12, 5)), rng.normal(size=(12, 5)))
            for _ in range(30)]
    assert min(vals) >= 0.0 and max(vals) > 0.0


def test_ranks_match_scipy_with_ties_and_nan():
    st = pytest.importorskip("scipy.stats")
    from statetx.metrics.de_metrics import rankdata, roc_auc

    rng = np.random.default_rng(3)
    for x in (rng.integers(0, 4, 200), rng.normal(size=300).round(1), np.array([2.5]),
              np.array([], dtype=float), np.array([1.0, np.nan, 1.0]), np.array(["b", "a", "b"])):
        np.testing.assert_array_equal(rankdata(x), st.rankdata(x))
    y, s = rng.random(500) < 0.3, rng.integers(0, 6, 500)
    fpr_tpr = st.mannwhitneyu(s[y], s[~y]).statistic / (y.sum() * (~y).sum())
    assert roc_auc(y, s) == pytest.approx(fpr_tpr, rel=1e-12)


def test_an_outdir_holds_one_evaluation_and_bad_options_fail_first(tmp_path, real, pred):
    r, p = real[0].copy(), pred.copy()
    for a in (r, p):
        a.obs["ct"] = np.where(np.arange(a.n_obs) % 2, "a", "b")
    evaluate(p, r, celltype_col="ct", profile="minimal", outdir=tmp_path, de_mode="vcc-2025",
             num_threads=1)
    (tmp_path / "notes.txt").write_text("mine")
    evaluate(p, r, profile="minimal", outdir=tmp_path, num_threads=1)
    # the per-cell-type tables and de_mode.txt of the first evaluation are gone; not notes.txt
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        ".statetx_evaluate", "agg_results.csv", "notes.txt", "pred_de.csv", "real_de.csv",
        "results.csv"]
    # cell types whose file names coincide ('/' becomes '-') are refused before any work
    for a in (r, p):
        a.obs["ct"] = np.where(np.arange(a.n_obs) % 2, "a/b", "a-b")
    with pytest.raises(DataError, match=r"cell types .*a-b.*a/b.*same files"):
        evaluate(p, r, celltype_col="ct", profile="minimal", outdir=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    for bad in (float("nan"), -1.0, float("inf"), "0"):
        with pytest.raises(ConfigError, match="epsilon="):
            evaluate(p, r, profile="minimal", epsilon=bad)
    with pytest.raises(ConfigError, match="num_threads="):
        evaluate(p, r, profile="minimal", num_threads=-2)
    for out in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "sub"):
        with pytest.raises(ConfigError, match="notes.txt"):
            evaluate(p, r, profile="minimal", outdir=out)
    (tmp_path / "bad.h5ad").write_text("not hdf5")
    with pytest.raises(DataError, match="pred file .*bad.h5ad.* could not be read"):
        evaluate(tmp_path / "bad.h5ad", r, profile="minimal")


def _constant(pred, perts, label="non-targeting"):
    """``pred`` with the cells of ``perts`` all set to the mean of the ``label`` cells (what
    ControlMeanBaseline(mode="mean") predicts)."""
    out = pred.copy()
    lab = out.obs["target_gene"].astype(str).to_numpy()
    row = np.asarray(out.X[lab == label]).mean(axis=0)
    for p in perts:
        out.X[lab == p] = row
    return out


def _identical_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "all identical" in str(w.message)]


def test_a_prediction_without_spread_is_said_and_scored_as_cell_eval(real, pred, monkeypatch):
    """Identical predicted cells (a mean repeated) make the Wilcoxon DE of the prediction call
    many genes significant: one warning names them; the values stay cell-eval's."""
    import sys

    import scipy.sparse as sp

    ev = sys.modules["statetx.metrics.evaluate"]  # (the module: the package names the function)
    const = _constant(pred, ["G000", "G001", "G002"])
    for x in (const, ad_sparse(const)):
        with pytest.warns(UserWarning) as rec:
            res, _ = evaluate(x, real[0], profile="minimal", num_threads=1)
        said = _identical_warnings(rec)
        assert len(said) == 1
        assert re.search(r"3 of the 6 perturbation\(s\) are all identical .*G000, G001, G002\. "
                         r"The DE-based metrics \(overlap_at_N, precision_at_N, de_nsig_counts\)"
                         r" are not meaningful", said[0]), said[0]
        assert (res.loc[:2, "de_nsig_counts_pred"]
                > res.loc[3:, "de_nsig_counts_pred"].max()).all()
        # the values are those computed without the check
        with monkeypatch.context() as mp, warnings.catch_warnings():
            mp.setattr(ev, "constant_groups", lambda *a, **k: np.array([], dtype=np.int64))
            warnings.simplefilter("ignore")
            plain, _ = evaluate(x, real[0], profile="minimal", num_threads=1)
        pd.testing.assert_frame_equal(res, plain)
    assert sp.issparse(ad_sparse(const).X)


def ad_sparse(a):
    import scipy.sparse as sp

    out = a.copy()
    out.X = sp.csr_matrix(out.X)
    return out


def test_no_spread_warning_for_normal_pseudobulk_or_non_de_inputs(real, pred):
    for kw in (dict(adata_pred=pred), dict(adata_pred=_constant(pred, ["G000"]), profile="pds"),
               dict(adata_pred=_constant(pred, ["G000"]), de_pred=evaluate_de(pred, real))):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            evaluate(real=real[0], num_threads=1, **{"profile": "minimal", **kw})
        assert not _identical_warnings(rec), kw
    # one row per group (a pseudobulk without the flag): no group of two cells to judge
    lab = pred.obs["target_gene"].astype(str).to_numpy()
    first = pd.Series(np.arange(len(lab))).groupby(lab).first().to_numpy()
    one = pred[np.sort(first)].copy()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        evaluate(one, real[0], profile="minimal", num_threads=1)
    assert not _identical_warnings(rec)


def evaluate_de(pred, real):
    from statetx.metrics import wilcoxon_de

    return wilcoxon_de(pred.X, pred.obs["target_gene"].astype(str).to_numpy(), "non-targeting",
                       pred.var_names.astype(str), num_threads=1)


def test_constant_controls_and_cell_types_are_named(real, pred):
    ct = pred.copy()
    ct.obs["cell_type"] = np.where(np.arange(ct.n_obs) % 2 == 0, "A", "B")
    rl = real[0].copy()
    rl.obs["cell_type"] = np.where(np.arange(rl.n_obs) % 2 == 0, "A", "B")
    is_a = (ct.obs["cell_type"] == "A").to_numpy()
    lab = ct.obs["target_gene"].astype(str).to_numpy()
    ct.X[is_a & (lab == "G004")] = ct.X[is_a & (lab == "G004")][0]
    ct.X[is_a & (lab == "non-targeting")] = ct.X[is_a & (lab == "non-targeting")][0]
    with pytest.warns(UserWarning) as rec:
        evaluate(ct, rl, profile="de", celltype_col="cell_type", num_threads=1)
    said = _identical_warnings(rec)
    assert len(said) == 1
    assert "1 of the 12 perturbation(s)" in said[0] and "G004 (A)" in said[0]
    assert "control cells 'non-targeting' of cell type(s) A are all identical" in said[0]


def test_constant_groups_compares_every_row_with_its_groups_first():
    import scipy.sparse as sp

    from statetx.metrics.evaluate import constant_groups

    rng = np.random.default_rng(0)
    x = rng.poisson(0.5, (50, 30)).astype(np.float32)
    codes = np.repeat(np.arange(5), 10)
    codes[[5, 17]] = -1  # ignored rows
    x[codes == 2] = x[np.flatnonzero(codes == 2)[0]]
    x[codes == 4] = 0
    x[np.flatnonzero(codes == 3)[-1], 7] += 1  # one cell of group 3 differs, in one gene
    for m in (x, sp.csr_matrix(x), sp.csc_matrix(x)):
        for chunk in (1, 1 << 22):
            assert list(constant_groups(m, codes, 6, chunk_elems=chunk)) == [2, 4]


def test_evaluate_ceiling_is_the_command_lines(tmp_path, real, pred):
    """ceiling=True: ceiling() with the same options, its files listed with the results', and
    the ceiling and the fraction of it in agg.attrs."""
    from statetx.metrics import ceiling, fraction_of_ceiling

    res, agg = evaluate(pred, real[0], profile="minimal", num_threads=1, ceiling=True,
                        ceiling_seed=3, outdir=tmp_path)
    c_res, c_agg = ceiling(real[0], profile="minimal", num_threads=1, seed=3)
    got = pd.read_csv(tmp_path / "ceiling_results.csv")
    pd.testing.assert_frame_equal(got, c_res, check_dtype=False)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "agg_ceiling_results.csv"), c_agg,
                                  check_dtype=False)
    pd.testing.assert_frame_equal(pd.DataFrame(agg.attrs["ceiling"]), c_agg)
    frac = pd.DataFrame(agg.attrs["fraction_of_ceiling"])
    pd.testing.assert_frame_equal(frac, fraction_of_ceiling(agg, c_agg))
    assert 0 < frac["pearson_delta"].iloc[0] < 1.5
    manifest = (tmp_path / ".statetx_evaluate").read_text()
    assert "ceiling_results.csv" in manifest and "agg_ceiling_results.csv" in manifest
    other, _ = ceiling(real[0], profile="minimal", num_threads=1, seed=4)
    assert not np.allclose(other["pearson_delta"], c_res["pearson_delta"])
    pd.concat([agg, agg])  # (the attrs are lists, which pd.concat can compare)
    # without ceiling=True: none, and an earlier ceiling's files in outdir are removed
    _, agg2 = evaluate(pred, real[0], profile="minimal", num_threads=1, outdir=tmp_path)
    assert "ceiling" not in agg2.attrs and not (tmp_path / "ceiling_results.csv").exists()
    # per cell type: one pair of files per cell type; a profile without correlations: no fraction
    ct_p, ct_r = pred.copy(), real[0].copy()
    for a in (ct_p, ct_r):
        a.obs["cell_type"] = np.where(np.arange(a.n_obs) % 2 == 0, "A", "B")
    _, agg3 = evaluate(ct_p, ct_r, profile="vcc", num_threads=1, ceiling=True,
                       celltype_col="cell_type", outdir=tmp_path / "ct")
    assert {"A_ceiling_results.csv", "B_agg_ceiling_results.csv"} <= {
        p.name for p in (tmp_path / "ct").iterdir()}
    assert agg3.attrs["ceiling"]["celltype"] == ["A", "B"]
    assert "fraction_of_ceiling" not in agg3.attrs


def test_the_ceiling_halves_what_was_evaluated_and_its_failure_keeps_the_results(real, pred,
                                                                                   tmp_path):
    """With shared_only the ceiling covers the perturbations evaluated (a like-for-like
    fraction); a ceiling that cannot be computed is warned about, the results are kept."""
    lab = pred.obs["target_gene"].astype(str)
    part = pred[(lab != "G005").to_numpy()].copy()
    with pytest.warns(UserWarning, match="G005"):
        res, agg = evaluate(part, real[0], profile="minimal", num_threads=1, ceiling=True,
                            shared_only=True, outdir=tmp_path)
    halves = pd.read_csv(tmp_path / "ceiling_results.csv")
    assert set(halves["perturbation"]) == set(res["perturbation"]) and "G005" not in set(
        halves["perturbation"])
    one = real[0].copy()  # one cell per perturbation: nothing to halve
    rl = one.obs["target_gene"].astype(str).to_numpy()
    first = pd.Series(np.arange(len(rl))).groupby(rl).first()
    keep = np.zeros(len(rl), bool)
    keep[first.to_numpy()] = True
    keep |= rl == "non-targeting"
    one = one[keep].copy()
    with pytest.warns(UserWarning, match="the data ceiling could not be computed"):
        res, agg = evaluate(pred, one, profile="minimal", num_threads=1, ceiling=True)
    assert len(res) and "ceiling" not in agg.attrs


def test_evaluate_ceiling_options_are_checked(real, pred):
    from statetx.metrics import ceiling

    for kw, msg in ((dict(ceiling_seed=2), "needs ceiling=True"),
                    (dict(ceiling=True, ceiling_seed=-1), "integer >= 0"),
                    (dict(ceiling=True, ceiling_seed=1.5), "integer >= 0"),
                    (dict(ceiling="yes"), "True or False")):
        with pytest.raises(ConfigError, match=msg):
            evaluate(pred, real[0], **kw)
    with pytest.raises(ConfigError, match="no ceiling= option"):
        ceiling(real[0], ceiling=True)


def test_counts_target_own_median_is_cell_evals_rule(real, pred, tmp_path):
    """counts_target="own_median": each count file normalised to its own median total, then
    log1p (cell-eval: sc.pp.normalize_total without a target), unlike the shared default."""
    import scanpy as sc

    rng = np.random.default_rng(0)

    def counts(a, depth):
        out = a.copy()
        out.X = rng.poisson(np.expm1(np.asarray(a.X)) / 1e4 * depth).astype(np.float32)
        return out

    def reference(a):
        a = a.copy()
        sc.pp.normalize_total(a)
        sc.pp.log1p(a)
        return a

    rc, pc = counts(real[0], 300), counts(pred, 900)  # the prediction sequenced deeper
    kw = dict(profile="full", skip_metrics=["clustering_agreement"], num_threads=1)
    with pytest.warns(UserWarning, match="its median cell total, as cell-eval does"):
        own, _ = evaluate(pc, rc, counts_target="own_median", **kw)
    want, _ = evaluate(reference(pc), reference(rc), **kw)
    pd.testing.assert_frame_equal(own, want, atol=1e-6)
    with pytest.warns(UserWarning, match="the real cells' median total"):
        shared, _ = evaluate(pc, rc, **kw)
    assert own["mae"].mean() > 2 * shared["mae"].mean()
    with pytest.raises(ConfigError, match="counts_target='own'.*own_median"):
        evaluate(pc, rc, counts_target="own")
    # the command line's --counts-target
    from statetx.cli import main

    pc.write_h5ad(tmp_path / "p.h5ad")
    rc.write_h5ad(tmp_path / "r.h5ad")
    assert main(["evaluate", "run", "-ap", str(tmp_path / "p.h5ad"), "-ar",
                 str(tmp_path / "r.h5ad"), "-o", str(tmp_path / "ev"), "--profile", "minimal",
                 "--num-threads", "1", "--counts-target", "own_median"]) == 0
    cli = pd.read_csv(tmp_path / "ev" / "results.csv")
    np.testing.assert_allclose(cli["mae"], own["mae"], atol=1e-6)


def test_vcc_score_does_not_warn_about_its_own_constant_baseline(real, pred):
    from statetx.metrics import vcc_score

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        vcc_score(pred, real[0], num_threads=1)
    assert not _identical_warnings(rec)
    with pytest.warns(UserWarning, match=r"1 of the 6 perturbation\(s\) are all identical"):
        vcc_score(_constant(pred, ["G003"]), real[0], num_threads=1)


def test_clustering_agreement_tells_unrelated_predictions_apart():
    """Leiden-style communities: a second iteration starts from the first's communities and never
    lowers the modularity; blobs are found; an unrelated prediction scores near 0, not 1."""
    from sklearn.metrics import adjusted_rand_score

    from statetx.metrics.clustering import clustering_agreement, knn_graph, leiden_like

    def modularity(w: np.ndarray, lab: np.ndarray, gamma: float) -> float:
        k = w.sum(1)
        return float(((w - gamma * np.outer(k, k) / k.sum()) * (lab[:, None] == lab)).sum()
                     / k.sum())

    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(20, 60))
        centres = rng.normal(size=(int(rng.integers(2, 7)), 10)) * 3
        x = centres[rng.integers(0, len(centres), n)] + rng.normal(size=(n, 10))
        g = knn_graph(x, min(15, n - 1))
        w = g.toarray()
        for gamma in (0.2, 1.0, 2.0):
            once, twice = leiden_like(g, gamma, 1), leiden_like(g, gamma, 2)
            assert modularity(w, twice, gamma) >= modularity(w, once, gamma) - 1e-12
    truth = np.repeat(np.arange(6), 12)
    blobs = rng.normal(size=(6, 10))[truth] * 4 + rng.normal(size=(72, 10))
    assert adjusted_rand_score(truth, leiden_like(knn_graph(blobs, 15), 1.0)) == 1.0
    assert clustering_agreement(blobs, blobs + rng.normal(size=blobs.shape) * 0.3) == 1.0
    assert clustering_agreement(blobs, rng.normal(size=blobs.shape) * 4) < 0.2


# ------------------------------------------------------------------ audit fixes (evaluation)
def test_a_non_finite_embedding_is_refused(real, pred):
    """NaN distances compare False: a NaN embedding ranked first everywhere (a perfect
    discrimination score). It is refused as non-finite X is, naming file, key and cells."""
    w = np.random.default_rng(0).normal(size=(real[0].n_vars, 4))
    p, r = pred.copy(), real[0].copy()
    p.obsm["X_e"], r.obsm["X_e"] = np.asarray(p.X) @ w, np.asarray(r.X) @ w
    kw = dict(profile="anndata", embed_key="X_e", skip_metrics=["clustering_agreement"],
              num_threads=1)
    res, _ = evaluate(p, r, **kw)
    assert res["discrimination_score_l2"].mean() > 0.5
    p.obsm["X_e"][[0, 5, 9]] = np.nan
    p.obsm["X_e"][5, 1] = np.inf
    with pytest.raises(DataError, match=rf"pred obsm\['X_e'\] contains NaN or infinite values "
                                        rf"in 3 of {p.n_obs} cell\(s\)"):
        evaluate(p, r, **kw)
    p.obsm["X_e"][:] = 0.0
    r.obsm["X_e"][2, 0] = -np.inf
    with pytest.raises(DataError, match=r"real obsm\['X_e'\] contains NaN .* in 1 of"):
        evaluate(p, r, **kw)


def test_a_sparse_embedding_scores_as_its_dense_copy(real, pred):
    """A sparse obsm embedding (as fit and predict accept) is read, not turned into a 0-d
    object array."""
    import scipy.sparse as sp

    w = np.abs(np.random.default_rng(1).normal(size=(real[0].n_vars, 4)))
    p, r = pred.copy(), real[0].copy()
    p.obsm["X_e"], r.obsm["X_e"] = np.asarray(p.X) @ w, np.asarray(r.X) @ w
    kw = dict(profile="anndata", embed_key="X_e", skip_metrics=["clustering_agreement"],
              num_threads=1)
    dense, _ = evaluate(p, r, **kw)
    p.obsm["X_e"], r.obsm["X_e"] = sp.csr_matrix(p.obsm["X_e"]), sp.csr_matrix(r.obsm["X_e"])
    sparse, _ = evaluate(p, r, **kw)
    for m in ("discrimination_score_l2", "discrimination_score_cosine"):
        np.testing.assert_allclose(sparse[m], dense[m])


def test_counts_with_allow_discrete_keep_finite_fold_changes(kang_raw, tmp_path):
    """Kang 2018 counts scored as they are (allow_discrete): expm1 of the mean counts of FTH1
    (~144) and MALAT1 (~93) overflows float32; their fold changes stay finite (float64, from
    the logs), so de_spearman_lfc_sig is a number, not NaN."""
    real = kang_raw.copy()
    real.X = real.layers["counts"].copy()
    pred = real.copy()
    pred.X = pred.X.copy()
    pred.X.data = np.random.default_rng(0).poisson(pred.X.data).astype(np.float32)
    res, _ = evaluate(pred, real, "target_gene", "control", profile="de", allow_discrete=True,
                      outdir=tmp_path, num_threads=1)
    assert np.isfinite(res["de_spearman_lfc_sig"]).all() and res["de_spearman_lfc_sig"][0] > 0.9
    de = pd.read_csv(tmp_path / "real_de.csv").set_index("feature")
    assert not de[["log2_fold_change", "percent_change"]].isna().to_numpy().any()
    x = real.X.toarray().astype(np.float64)
    lab = real.obs["target_gene"].astype(str).to_numpy()
    for g in ("FTH1", "MALAT1"):
        j = real.var_names.get_loc(g)
        mt, mr = x[lab == "IFNB", j].mean(), x[lab == "control", j].mean()
        assert max(mt, mr) > 88.8  # (beyond float32's expm1)
        t, r_ = np.expm1(mt), np.expm1(mr)
        np.testing.assert_allclose(de.loc[g, "log2_fold_change"], np.log2(t / r_), atol=1e-4)
        np.testing.assert_allclose(de.loc[g, "percent_change"], (t - r_) / r_, rtol=1e-4)
        assert np.isinf(de.loc[g, ["target_mean", "ref_mean"]].to_numpy(float)).any()
    # every mean is written as the float32 it is (no table-wide switch to float64 text)
    text = pd.read_csv(tmp_path / "real_de.csv", dtype=str)["target_mean"]
    finite = text[~text.isin(["inf", "-inf", "NaN"])]
    assert (finite == finite.astype(np.float32).astype(str)).all()


def test_a_cell_type_with_controls_only_is_left_out_and_said(real, pred):
    r, p = real[0].copy(), pred.copy()
    for a in (r, p):
        ctrl = np.flatnonzero(a.obs["target_gene"].astype(str) == "non-targeting")
        ct = np.full(a.n_obs, "A", dtype=object)
        ct[ctrl[:12]] = "B"
        a.obs["ct"] = ct
    with pytest.warns(UserWarning, match=r"1 cell type\(s\) of obs\['ct'\] hold only control "
                                         r"cells .*'B' \(12 pred / 12 real cells\)\. They are "
                                         r"left out"):
        res, agg = evaluate(p, r, celltype_col="ct", profile="minimal", num_threads=1)
    assert set(res["celltype"]) == set(agg["celltype"]) == {"A"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone, _ = evaluate(p[p.obs["ct"] == "A"], r[r.obs["ct"] == "A"], profile="minimal",
                            num_threads=1)
    pd.testing.assert_frame_equal(res.drop(columns="celltype"), alone)
    b_p, b_r = p[p.obs["ct"] == "B"], r[r.obs["ct"] == "B"]
    with pytest.raises(DataError, match=r"hold only control cells .*'B'.* no cell type is left"):
        evaluate(b_p, b_r, celltype_col="ct", profile="minimal", num_threads=1)


def _few(a, n_by: dict[str, int]):
    """``a`` with only the first ``n`` cells of each perturbation in ``n_by``."""
    lab = a.obs["target_gene"].astype(str).to_numpy()
    keep = np.concatenate([np.flatnonzero(lab == t)[:n_by.get(t, lab.size)]
                           for t in np.unique(lab)])
    return a[np.sort(keep)].copy()


def test_de_groups_of_fewer_than_three_cells_are_said_once(real, pred):
    """Groups of one or two cells get unreliable asymptotic DE p-values (kept, cell-eval's):
    one warning lists them with their cells, real and pred apart; a two-cell predicted group
    of identical cells is named there and not again as a group without spread."""
    from statetx.metrics import FewCellsWarning, NoSpreadWarning  # (public names)

    r = _few(real[0], {"G000": 1, "G001": 2})
    p = _few(pred, {"G000": 1, "G001": 2, "G002": 2})
    lab = p.obs["target_gene"].astype(str).to_numpy()
    p.X[lab == "G001"] = p.X[lab == "G001"][0]  # no spread, and too few cells
    p.X[lab == "G003"] = p.X[lab == "G003"][0]  # no spread only
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        evaluate(p, r, profile="minimal", num_threads=1)
    few = [str(w.message) for w in rec if w.category is FewCellsWarning]
    assert len(few) == 1, few
    assert ("real: G000 (1 cell), G001 (2 cells); pred: G000 (1 cell), G001 (2 cells), G002 "
            "(2 cells). Their DE p-values are unreliable") in few[0]
    assert issubclass(FewCellsWarning, NoSpreadWarning)
    spread = _identical_warnings(rec)
    assert len(spread) == 1 and "G003" in spread[0] and "G001" not in spread[0]
    # no warning for groups of three cells, without DE, or with both DE tables supplied
    for kw in (dict(adata_pred=_few(pred, {"G000": 3}), adata_real=_few(real[0], {"G000": 3})),
               dict(adata_pred=p, adata_real=r, profile="pds"),
               dict(adata_pred=p, adata_real=r, de_pred=evaluate_de(p, (r,)),
                    de_real=evaluate_de(r, (r,)))):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            evaluate(**{"profile": "minimal", "num_threads": 1, **kw})
        assert not [w for w in rec if w.category is FewCellsWarning], kw


def test_supplied_de_csv_keeps_labels_pandas_reads_as_missing(real, pred, tmp_path):
    """A perturbation called "NA" and genes called "None" / "nan" stay text when statetx's own
    DE CSVs are read back (pandas' default turns them into NaN)."""
    r, p = real[0].copy(), pred.copy()
    names = {"G001": "NA", "G004": "None"}
    for a in (r, p):
        a.obs["target_gene"] = a.obs["target_gene"].astype(str).replace({"G002": "NA"})
        a.var_names = [names.get(g, "nan" if g == "G007" else g) for g in a.var_names]
    res, _ = evaluate(p, r, profile="de", outdir=tmp_path, num_threads=1)
    assert "NA" in set(res["perturbation"])
    back, _ = evaluate(p, r, profile="de", de_pred=tmp_path / "pred_de.csv",
                       de_real=tmp_path / "real_de.csv", num_threads=1)
    pd.testing.assert_frame_equal(res, back)


def test_de_csv_bytes_are_pandas_to_csv(papalexi, tmp_path):
    """The DE tables' writer gives the bytes of ``to_csv(index=False, na_rep="NaN")``: on a real
    DE table (Papalexi 2021: 26 perturbations × 299 genes, log1p counts), and on every awkward
    value (NaN, ±inf, -0.0, subnormals, float32 and float64 bit patterns, labels to quote)."""
    from statetx.metrics import wilcoxon_de
    from statetx.metrics._table import _fast_csv_ok, write_de_csv

    x = papalexi.X
    x = np.log1p(x.toarray() if hasattr(x, "toarray") else np.asarray(x)).astype(np.float32)
    de = wilcoxon_de(x, papalexi.obs["target_gene"].astype(str).to_numpy(), "non-targeting",
                     papalexi.var_names, num_threads=1)
    rng = np.random.default_rng(0)
    n = 3000
    odd = ["NA", "a,b", 'q"uote', "new\nline", "cr\rx", " lead", "", "日本", "None", "nan"]
    f64 = rng.integers(0, 2**64, n, dtype=np.uint64).view(np.float64)
    f32 = rng.integers(0, 2**31, n).astype(np.int32).view(np.float32)
    special = [np.nan, np.inf, -np.inf, -0.0, 0.0, 5e-324, 1e16, 9.999999999999998e15, 1e-5,
               0.0001, 1.5]
    f64[:len(special)], f32[:len(special)] = special, np.array(special, dtype=np.float32)
    torture = pd.DataFrame({"target": rng.choice(odd, n).astype(object),
                            "feature": np.array([f"g{i % 7}" for i in range(n)], dtype=object),
                            "f32": f32, "f64": f64, "i": rng.integers(-5, 5, n),
                            "u": rng.integers(0, 9, n).astype(np.uint16)})
    for name, df in (("papalexi", de), ("torture", torture)):
        assert _fast_csv_ok(df), name
        write_de_csv(df, tmp_path / f"{name}.csv")
        df.to_csv(tmp_path / f"{name}_pandas.csv", index=False, na_rep="NaN")
        assert (tmp_path / f"{name}.csv").read_bytes() == \
            (tmp_path / f"{name}_pandas.csv").read_bytes(), name
    # frames the fast path does not take go to pandas (same bytes by construction)
    for other in (torture.assign(b=True), torture.assign(target=[None] + odd * 299 + odd[:9]),
                  torture[["f64"]], torture.iloc[:0]):
        assert not _fast_csv_ok(other)
