"""Tests of statetx.pp: preprocess_train, control templates and the knock-down filter."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from statetx import pp
from statetx.errors import ConfigError, DataError

pytestmark = pytest.mark.filterwarnings("ignore:.*match no gene:UserWarning")

# ------------------------------------------------------------------------------------------------
# toy data for exact threshold semantics


def _toy(n_ctrl: int = 40, dup: bool = False) -> ad.AnnData:
    """Controls express each target at 10; perturbations carry chosen target levels."""
    genes = ["G0", "G1", "G2", "G3", "G4", "OTHER"]
    groups = {
        "G0": [0.0] * 35,  # strong knock-down: kept
        "G1": [3.0] * 35,  # ratio exactly 0.30: fails (strict)
        "G2": [0.0] * 30 + [5.0] * 5,  # ratio 0.0714; 5 cells at exactly 0.5 removed
        "G3": [0.0] * 29 + [6.0] * 20,  # passes level 2 (0.245), only 29 cells < 0.5: removed
        "G4": [1.0] * 31,  # target not expressed in controls: stage 1
        "A_B": [0.0] * 31,  # matches no gene: stage 0
    }
    labels = ["ctrl"] * n_ctrl
    rows = [np.array([10, 10, 10, 10, 0, 7], float)] * n_ctrl
    for p, levels in groups.items():
        for v in levels:
            r = np.array([10, 10, 10, 10, 0, 7], float)
            if p in genes:
                r[genes.index(p)] = v
            rows.append(r)
            labels.append(p)
    a = ad.AnnData(
        X=sp.csr_matrix(np.vstack(rows).astype(np.float32)),
        obs=pd.DataFrame(
            {"gene": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))]
        ),
        var=pd.DataFrame(
            {"gene_name": ["G0", "G1", "G2", "G3", "G4", "G0" if dup else "OTHER"]},
            index=[f"ENSG{i}" for i in range(6)],
        ),
    )
    return a


def test_knockdown_thresholds_are_strict_and_ordered():
    a = _toy()
    out, rep = pp.filter_on_target_knockdown(
        a, "gene", "ctrl", var_gene_name="gene_name", return_report=True
    )
    rep = rep.set_index("perturbation")
    assert rep.loc["G0", "status"] == "kept" and rep.loc["G0", "n_cells_kept"] == 35
    assert rep.loc["G1", "ratio"] == pytest.approx(0.3)
    assert rep.loc["G1", "stage_removed"] == 2  # exactly 0.30 fails
    assert rep.loc["G2", "status"] == "kept" and rep.loc["G2", "n_cells_kept"] == 30
    assert rep.loc["G3", "stage_removed"] == 4 and "min_cells" in rep.loc["G3", "reason"]
    assert rep.loc["G4", "stage_removed"] == 1
    assert rep.loc["A_B", "stage_removed"] == 0
    counts = out.obs["gene"].value_counts()
    assert counts["ctrl"] == 40 and counts["G0"] == 35 and counts["G2"] == 30
    assert set(out.obs["gene"].cat.categories) == {"ctrl", "G0", "G2"}  # unused removed
    assert list(out.var_names) == ["G0", "G1", "G2", "G3", "G4", "OTHER"]
    st = out.uns["statetx_knockdown_filter"]["stages"].set_index("stage")
    assert st.loc[0, "cells_removed"] == 31 and st.loc[2, "perturbations_removed"] == 1
    assert st.loc[3, "cells_removed"] == 5 + 20  # G2's 5 cells and G3's 20 cells
    assert st.loc[4, "cells_removed"] == 29
    # exactly min_cells knocked-down cells are kept
    out2 = pp.filter_on_target_knockdown(a, "gene", "ctrl", min_cells=29, var_gene_name="gene_name")
    assert (out2.obs["gene"] == "G3").sum() == 29


def test_knockdown_options_and_errors():
    a = _toy()
    kept = pp.filter_on_target_knockdown(
        a, "gene", "ctrl", var_gene_name="gene_name", on_unmatched="keep"
    )
    assert (kept.obs["gene"] == "A_B").sum() == 31
    with pytest.raises(DataError, match="A_B"):
        pp.filter_on_target_knockdown(a, "gene", "ctrl", var_gene_name="gene_name",
                                      on_unmatched="error")
    with pytest.raises(ConfigError, match="on_unmatched"):
        pp.filter_on_target_knockdown(a, "gene", "ctrl", on_unmatched="skip")
    # var_names are Ensembl IDs: nothing matches -> error instead of a controls-only result
    with pytest.raises(DataError, match="matches a gene"):
        pp.filter_on_target_knockdown(a, "gene", "ctrl", var_gene_name=None)
    with pytest.raises(DataError, match="symbol"):
        pp.filter_on_target_knockdown(a, "gene", "ctrl", var_gene_name="symbol")
    with pytest.raises(DataError, match="'control'.*Values that look like controls: ctrl\\."):
        pp.filter_on_target_knockdown(a, "gene", "control", var_gene_name="gene_name")
    # gene symbols holding "nt" are not control-like (token match, as the training loader's)
    b = a.copy()
    b.obs["gene"] = b.obs["gene"].astype(str).replace({"ctrl": "NT"})
    b.obs.loc[b.obs_names[:2], "gene"] = ["NTRK1", "ANTXR1"]
    with pytest.raises(DataError, match=r"Values that look like controls: NT\.$"):
        pp.filter_on_target_knockdown(b, "gene", "control", var_gene_name="gene_name")
    with pytest.raises(DataError, match="layer 'counts'"):
        pp.filter_on_target_knockdown(a, "gene", "ctrl", layer="counts")
    # layer option: filter on the layer, X untouched
    b = a.copy()
    b.layers["counts"] = b.X.copy()
    b.X = sp.csr_matrix(np.zeros(b.shape, np.float32))
    out = pp.filter_on_target_knockdown(b, "gene", "ctrl", layer="counts",
                                        var_gene_name="gene_name")
    assert (out.obs["gene"] == "G0").sum() == 35 and out.X.nnz == 0
    # dense input gives the same result as sparse
    d = a.copy()
    d.X = d.X.toarray()
    _, rd = pp.filter_on_target_knockdown(d, "gene", "ctrl", var_gene_name="gene_name",
                                          return_report=True)
    _, rs = pp.filter_on_target_knockdown(a, "gene", "ctrl", var_gene_name="gene_name",
                                          return_report=True)
    pd.testing.assert_frame_equal(rd, rs)


def test_knockdown_duplicate_gene_names_use_first_occurrence():
    a = _toy(dup=True)  # last column is also called G0 (and not knocked down)
    with pytest.warns(UserWarning, match="first occurrence: G0"):
        out = pp.filter_on_target_knockdown(a, "gene", "ctrl", var_gene_name="gene_name")
    assert (out.obs["gene"] == "G0").sum() == 35
    assert list(out.var_names) == ["G0", "G1", "G2", "G3", "G4", "G0-1"]


def test_knockdown_preprocess_marks_log1p_and_blocks_double_normalisation():
    a = _toy()
    out = pp.filter_on_target_knockdown(a, "gene", "ctrl", var_gene_name="gene_name",
                                        preprocess=True)
    assert "log1p" in out.uns and "counts" in out.layers
    tot = np.expm1(out.X.toarray()).sum(axis=1)
    np.testing.assert_allclose(tot, 1e4, rtol=1e-4)
    with pytest.raises(DataError, match="normalising twice|Normalising twice"):
        pp.preprocess_train(out, n_top_genes=3)
    # the filter's total is recorded and kept by the HVG step: a model trained on it knows it
    assert out.uns["statetx_preprocess"]["target_sum"] == 1e4
    done = pp.preprocess_train(out, n_top_genes=3, already_normalized=True, copy=True)
    assert done.uns["statetx_preprocess"]["target_sum"] == 1e4
    with pytest.warns(UserWarning, match="log"):
        pp.filter_on_target_knockdown(out, "gene", "ctrl")


def test_knockdown_papalexi(papalexi):
    a = papalexi[papalexi.obs["target_gene"] != "unassigned"]
    n_in = a.n_obs
    with pytest.warns(UserWarning, match=r"16 perturbation labels .* IFNGR1 \(1064\)"):
        out, rep = pp.filter_on_target_knockdown(
            a, "target_gene", "non-targeting", return_report=True
        )
    assert a.n_obs == n_in and "statetx_knockdown_filter" not in papalexi.uns
    rep = rep.set_index("perturbation")
    kept = set(rep.index[rep["status"] == "kept"])
    assert {"JAK2", "STAT1"} <= kept
    counts = out.obs["target_gene"].value_counts()
    assert counts["non-targeting"] == (a.obs["target_gene"] == "non-targeting").sum()
    assert counts["JAK2"] >= 30 and counts["STAT1"] >= 30
    # the kept cells are knocked down
    for g in ("JAK2", "STAT1"):
        x = out[out.obs["target_gene"] == g, g].X.toarray().ravel()
        assert x.mean() / rep.loc[g, "ctrl_mean"] < 0.3
        assert np.all(x / rep.loc[g, "ctrl_mean"] < 0.5)
        assert rep.loc[g, "ratio"] < 0.25
    # STAT3 is measured but barely reduced: removed at the perturbation level, with the reason
    assert rep.loc["STAT3", "status"] == "removed" and rep.loc["STAT3", "stage_removed"] == 2
    assert "residual" in rep.loc["STAT3", "reason"]
    assert rep.loc["STAT3", "ratio"] > 0.5
    # IFNGR1 is not among the 299 genes: dropped at stage 0 and reported
    assert rep.loc["IFNGR1", "stage_removed"] == 0
    assert "IFNGR1" not in set(out.obs["target_gene"])
    uns = out.uns["statetx_knockdown_filter"]
    assert uns["scale"] == "linear" and uns["residual_expression"] == 0.3
    assert uns["stages"]["cells_removed"].sum() == n_in - out.n_obs


# ------------------------------------------------------------------------------------------------
# preprocess_train


def test_preprocess_train_sparse_dense_identical(kang_raw):
    sparse = pp.preprocess_train(kang_raw, n_top_genes=300, copy=True)
    dense_in = kang_raw.copy()
    dense_in.X = kang_raw.X.toarray()
    dense = pp.preprocess_train(dense_in, n_top_genes=300, copy=True)
    assert sp.issparse(kang_raw.X) and "X_hvg" not in kang_raw.obsm  # input untouched
    assert sparse.obsm["X_hvg"].dtype == np.float32 and sparse.obsm["X_hvg"].shape[1] == 300
    np.testing.assert_array_equal(sparse.obsm["X_hvg"], dense.obsm["X_hvg"])
    names = list(sparse.uns["X_hvg_var_names"])
    assert names == list(dense.uns["X_hvg_var_names"])
    assert names == list(sparse.var_names[sparse.var["highly_variable"]])
    assert "ISG15" in names and "log1p" in sparse.uns
    # X_hvg is the HVG columns of the log-normalised X, in var order
    np.testing.assert_array_equal(sparse.obsm["X_hvg"], sparse[:, names].X.toarray())
    # default target: median of the per-cell totals
    totals = np.asarray(kang_raw.X.sum(axis=1)).ravel()
    np.testing.assert_allclose(np.expm1(sparse.X.toarray()).sum(1), np.median(totals), rtol=1e-4)


def test_preprocess_train_matches_scanpy(kang_raw):
    import scanpy as sc

    ref = kang_raw.copy()
    sc.pp.normalize_total(ref)
    sc.pp.log1p(ref)
    sc.pp.highly_variable_genes(ref, n_top_genes=300)
    ours = pp.preprocess_train(kang_raw, n_top_genes=300, copy=True)
    np.testing.assert_array_equal(ours.var["highly_variable"], ref.var["highly_variable"])
    np.testing.assert_allclose(ours.X.toarray(), ref.X.toarray(), atol=1e-5)


def test_preprocess_train_refuses_log_input(kang_log, kang_raw):
    with pytest.raises(DataError, match="already_normalized=True"):
        pp.preprocess_train(kang_log, n_top_genes=100, copy=True)
    no_marker = kang_log.copy()
    del no_marker.uns["log1p"]
    with pytest.raises(DataError, match="log1p-transformed"):
        pp.preprocess_train(no_marker, n_top_genes=100)
    out = pp.preprocess_train(kang_log, n_top_genes=100, already_normalized=True, copy=True)
    np.testing.assert_array_equal(out.X, kang_log.X)
    assert out.obsm["X_hvg"].shape == (kang_log.n_obs, 100)
    # starting from a counts layer while X holds log values is fine
    both = kang_log.copy()
    both.layers["counts"] = kang_raw.X.copy()
    with pytest.raises(DataError, match="layer='counts'"):
        pp.preprocess_train(both, n_top_genes=100)
    assert pp.preprocess_train(both, n_top_genes=100, layer="counts") is None  # in place
    ref = pp.preprocess_train(kang_raw, n_top_genes=100, copy=True)
    np.testing.assert_array_equal(both.obsm["X_hvg"], ref.obsm["X_hvg"])


def test_preprocess_train_options():
    rng = np.random.default_rng(0)
    a = ad.AnnData(X=rng.poisson(2.0, size=(60, 40)).astype(np.float32))
    with pytest.raises(ConfigError, match="n_top_genes"):
        pp.preprocess_train(a, n_top_genes=0)
    with pytest.raises(ConfigError, match="flavor"):
        pp.preprocess_train(a, n_top_genes=5, flavor="seurat_v2")
    import importlib.util

    if importlib.util.find_spec("skmisc") is None:  # said up front, not scanpy's ImportError
        with pytest.raises(ConfigError, match="pip install scikit-misc"):
            pp.preprocess_train(a.copy(), n_top_genes=5, flavor="seurat_v3")
    b = pp.preprocess_train(a, n_top_genes=5, target_sum=100, counts_layer="counts", copy=True)
    np.testing.assert_array_equal(b.layers["counts"], a.X)
    np.testing.assert_allclose(np.expm1(b.X).sum(1), 100, rtol=1e-5)
    assert b.uns["statetx_preprocess"]["target_sum"] == 100
    with pytest.warns(UserWarning, match="exceeds"):
        c = pp.preprocess_train(a, n_top_genes=500, copy=True)
    assert c.obsm["X_hvg"].shape == (60, 40)


# ------------------------------------------------------------------------------------------------
# control template


def test_in_place_functions_on_a_view_leave_its_parent_alone(kang_raw):
    """As in scanpy, in-place preprocessing of a view (adata[mask]) turns the view into its own
    AnnData; the parent keeps its counts (anndata would write a view's new X into it). That is
    said, in predict(inplace=True)'s words; copy=True on a view changes nothing and is not."""
    import warnings

    parent = kang_raw.copy()
    before = parent.X.copy()
    keep = parent.obs["cell_type"].isin(["B cells", "CD4 T cells"]).to_numpy()
    view = parent[keep]
    said = (r"{} \(in place, copy=False\) on a view \(adata\[\.\.\.\]\): the view becomes a copy "
            r"holding the result, and the AnnData it was taken from is not changed .*copy=True")
    with pytest.warns(UserWarning, match=said.format("preprocess_train")) as caught:
        pp.preprocess_train(view, n_top_genes=100)
    assert [w.filename for w in caught if "on a view" in str(w.message)] == [__file__]
    assert not view.is_view and "log1p" in view.uns and view.n_obs == keep.sum()
    tmpl = parent[keep]
    with pytest.warns(UserWarning, match=said.format("make_control_template")):
        pp.make_control_template(tmpl, "target_gene", "control", "cell_type", seed=0)
    assert not tmpl.is_view and "template_ctrl_barcode" in tmpl.obs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pp.make_control_template(parent[keep], "target_gene", "control", "cell_type", copy=True)
    assert (before != parent.X).nnz == 0  # the parent's counts are untouched
    assert "log1p" not in parent.uns and "template_ctrl_barcode" not in parent.obs
    ref = kang_raw[keep].copy()
    pp.preprocess_train(ref, n_top_genes=100)
    np.testing.assert_allclose(view.X.toarray(), ref.X.toarray())


def test_backed_input_is_refused_with_the_way_out(tmp_path, kang_raw):
    kang_raw[:200].copy().write_h5ad(tmp_path / "k.h5ad")
    backed = ad.read_h5ad(tmp_path / "k.h5ad", backed="r")
    try:
        for copy in (False, True):
            with pytest.raises(DataError, match=r"k\.h5ad is opened in backed mode.*to_memory"):
                pp.preprocess_train(backed, n_top_genes=50, copy=copy)
    finally:
        backed.file.close()


def test_control_template_keeps_cell_types(kang_raw):
    a = kang_raw.copy()
    a.obsm["X_pca"] = np.arange(a.n_obs * 3, dtype=np.float32).reshape(-1, 3)
    t = pp.make_control_template(a, "target_gene", "control", "cell_type", seed=1, copy=True)
    assert "template_ctrl_barcode" not in a.obs  # copy=True leaves the input alone
    src = a.obs_names.get_indexer(t.obs["template_ctrl_barcode"])
    assert (src >= 0).all()
    pert = (a.obs["target_gene"] != "control").to_numpy()
    assert (a.obs["target_gene"].to_numpy()[src[pert]] == "control").all()
    np.testing.assert_array_equal(
        a.obs["cell_type"].to_numpy()[src], a.obs["cell_type"].to_numpy()
    )
    assert (src[~pert] == np.flatnonzero(~pert)).all()  # controls unchanged
    assert (t.obs["target_gene"] == a.obs["target_gene"]).all()  # labels kept
    np.testing.assert_array_equal(t.X.toarray(), a.X[src].toarray())
    np.testing.assert_array_equal(t.layers["counts"].toarray(), a.layers["counts"][src].toarray())
    np.testing.assert_array_equal(t.obsm["X_pca"], a.obsm["X_pca"][src])
    # seeded
    t2 = pp.control_template(a, "target_gene", "control", "cell_type", seed=1, copy=True)
    t3 = pp.control_template(a, "target_gene", "control", "cell_type", seed=2, copy=True)
    assert (t2.obs["template_ctrl_barcode"] == t.obs["template_ctrl_barcode"]).all()
    assert (t3.obs["template_ctrl_barcode"] != t.obs["template_ctrl_barcode"]).any()


def test_control_template_batch_embed_key_and_errors(kang_raw):
    a = kang_raw.copy()
    a.obsm["X_hvg"] = np.ones((a.n_obs, 2), np.float32) * np.arange(a.n_obs)[:, None]
    t = pp.make_control_template(a, "target_gene", "control", "cell_type", batch_col="batch",
                                 embed_key="X_hvg", copy=True)
    src = a.obs_names.get_indexer(t.obs["template_ctrl_barcode"])
    assert (a.obs["batch"].to_numpy()[src] == a.obs["batch"].to_numpy()).all()
    np.testing.assert_array_equal(t.obsm["X_hvg"][:, 0], src)
    assert (t.X != a.X).nnz == 0  # only the chosen representation is replaced
    with pytest.raises(DataError, match="embed_key 'X_state'"):
        pp.make_control_template(a, "target_gene", "control", "cell_type", embed_key="X_state")
    b = a[~((a.obs["cell_type"] == "B cells") & (a.obs["target_gene"] == "control"))].copy()
    with pytest.raises(DataError, match="'B cells'"):
        pp.make_control_template(b, "target_gene", "control", "cell_type")
    # the global pool (reference behaviour) still works
    assert pp.make_control_template(b, "target_gene", "control", None) is None
    with pytest.raises(DataError, match="cell_typ"):
        pp.make_control_template(a, "target_gene", "control", "celltype")


def test_outputs_write_to_h5ad(tmp_path):
    a = _toy()
    a.obs["cell_type"] = "ct"
    out = pp.filter_on_target_knockdown(a, "gene", "ctrl", var_gene_name="gene_name")
    pp.make_control_template(out, "gene", "ctrl", "cell_type")
    out.X = np.random.default_rng(0).poisson(3.0, size=out.shape).astype(np.float32)
    pp.preprocess_train(out, n_top_genes=3)
    out.write_h5ad(tmp_path / "out.h5ad")
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    rep = back.uns["statetx_knockdown_filter"]["perturbations"]
    assert isinstance(rep, pd.DataFrame) and len(rep) == 6
    assert list(back.uns["X_hvg_var_names"]) == list(out.uns["X_hvg_var_names"])
    assert "template_ctrl_barcode" in back.obs


def test_template_seed_default_matches_the_command_line():
    """make_control_template and tx preprocess_infer draw the same template by default."""
    import inspect

    from statetx.cli import build_parser

    ns = build_parser().parse_args(["tx", "preprocess_infer", "--adata", "a.h5ad", "--output",
                                    "b.h5ad", "--control-condition", "ctrl", "--pert-col", "g"])
    default = inspect.signature(pp.make_control_template).parameters["seed"].default
    assert ns.seed == default == 42


def test_include_genes_given_as_symbols_names_the_var_column_and_ids():
    """Zhao's var names are Ensembl ids, the symbols are in var['symbol']: the error says so
    and names the ids to pass."""
    from statetx.datasets import load_zhao2021

    a = load_zhao2021()[:300].copy()
    assert "MT1X" not in a.var_names and "MT1X" in set(a.var["symbol"])
    ident = a.var_names[a.var["symbol"] == "MT1X"][0]
    with pytest.raises(DataError, match=r"var\['symbol'\] holds MT1X: pass their var names "
                       rf"\({ident}\)"):
        pp.preprocess_train(a, 20, include_genes=["MT1X"], copy=True)
    out = pp.preprocess_train(a, 20, include_genes=[ident], copy=True)
    assert ident in list(out.uns["X_hvg_var_names"])


def test_include_genes_are_added_to_the_hvgs(tmp_path):
    """Papalexi: keep the knocked-out targets and their readout (STAT1) whatever their rank."""
    from conftest import SHARED, need

    from statetx.cli import main

    path = need(SHARED / "data" / "papalexi2021_thp1_lowmoi_sceptredata.h5ad")
    a = ad.read_h5ad(path)
    a = a[:2000].copy()
    a.X = a.layers["counts"].copy()
    plain = pp.preprocess_train(a, 20, copy=True)
    wanted = [g for g in ("STAT1", "JAK2", "IFNGR2") if g not in plain.uns["X_hvg_var_names"]]
    assert wanted  # (otherwise the test shows nothing)
    out = pp.preprocess_train(a, 20, include_genes=wanted, copy=True)
    names = list(out.uns["X_hvg_var_names"])
    assert set(wanted) <= set(names) and set(plain.uns["X_hvg_var_names"]) <= set(names)
    assert out.obsm["X_hvg"].shape[1] == len(names) == int(out.var["highly_variable"].sum())
    with pytest.raises(DataError, match="include_genes: STAT9 are not var names.*STAT1"):
        pp.preprocess_train(a, 20, include_genes=["STAT9"], copy=True)
    a.write_h5ad(tmp_path / "in.h5ad")
    assert main(["tx", "preprocess_train", "--adata", str(tmp_path / "in.h5ad"), "--output",
                 str(tmp_path / "out.h5ad"), "--num-hvgs", "20", "--include-genes",
                 ",".join(wanted)]) == 0
    assert set(wanted) <= set(ad.read_h5ad(tmp_path / "out.h5ad").uns["X_hvg_var_names"])


def test_already_normalized_counts_duplicates_and_the_log_base(kang_raw):
    """already_normalized=True on raw counts is refused (it crashed in the HVG step, or marked
    counts as log1p); a base-2 log selects scanpy's genes; duplicated genes are refused first."""
    import scanpy as sc

    with pytest.raises(DataError, match="look like raw counts.*already_normalized=False"):
        pp.preprocess_train(kang_raw, 100, already_normalized=True, copy=True)
    assert "log1p" not in kang_raw.uns
    log2 = kang_raw.copy()
    sc.pp.normalize_total(log2)
    sc.pp.log1p(log2, base=2)
    ref = log2.copy()
    sc.pp.highly_variable_genes(ref, n_top_genes=200)
    ours = pp.preprocess_train(log2, 200, already_normalized=True, copy=True)
    np.testing.assert_array_equal(ours.var["highly_variable"], ref.var["highly_variable"])
    dup = kang_raw.copy()
    dup.var_names = [dup.var_names[1], *dup.var_names[1:]]
    with pytest.raises(DataError, match=f"duplicate gene names.*{dup.var_names[1]}.*"
                                        "var_names_make_unique"):
        pp.preprocess_train(dup, 100, copy=True)


def test_knockdown_takes_cell_loads_keyword_names():
    a = _toy()
    ours = pp.filter_on_target_knockdown(a, "gene", "ctrl", var_gene_name="gene_name")
    theirs = pp.filter_on_target_knockdown(a, perturbation_column="gene", control_label="ctrl",
                                           var_gene_name="gene_name")
    assert list(ours.obs_names) == list(theirs.obs_names)
    with pytest.raises(ConfigError, match="pert_col='x' and perturbation_column='gene'"):
        pp.filter_on_target_knockdown(a, "x", perturbation_column="gene")


def test_knockdown_matches_var_gene_name_by_default_as_the_reference(capsys):
    """The default matches labels against var['gene_name'] when var has it (the reference's
    default; here var_names are Ensembl ids), else against var_names, said."""
    a = _toy()
    out = pp.filter_on_target_knockdown(a, "gene", "ctrl")
    ref = pp.filter_on_target_knockdown(a, "gene", "ctrl", var_gene_name="gene_name")
    assert list(out.obs_names) == list(ref.obs_names) and (out.obs["gene"] == "G0").sum() == 35
    a.var_names = a.var["gene_name"].to_numpy()
    del a.var["gene_name"]
    capsys.readouterr()
    assert list(pp.filter_on_target_knockdown(a, "gene", "ctrl").obs_names) == list(ref.obs_names)
    assert "var has no column 'gene_name': matching perturbation labels against var_names" in (
        capsys.readouterr().out)
