"""Prediction on real data: Kang 2018 PBMCs, IFN-beta, one cell type held out."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from statetx import StateTransitionModel
from statetx.errors import DataError

SPEC = '[training]\nkang = "train"\n[zeroshot]\n"kang.B cells" = "test"\n'


@pytest.fixture(scope="module")
def kang_model(kang_log):
    m = StateTransitionModel(
        "tiny", pert_col="target_gene", cell_type_key="cell_type", batch_col="batch",
        control_pert="control", max_steps=120, batch_size=8, cell_set_len=32, lr=2e-3,
        model_kwargs={"residual_space": "input", "dropout": 0.0}, progress=False, seed=0)
    return m.fit(kang_log, SPEC)


def test_heldout_cell_type_learns_interferon_response(kang_model, kang_log):
    b = kang_log[kang_log.obs["cell_type"] == "B cells"].copy()
    pred = kang_model.predict(b)
    g = list(kang_log.var_names).index("ISG15")
    stim = (pred.obs["target_gene"] == "IFNB").to_numpy()
    ctrl_real = np.asarray(b.X[(b.obs["target_gene"] == "control").to_numpy(), g]).mean()
    stim_pred = pred.X[stim, g].mean()
    stim_real = np.asarray(b.X[(b.obs["target_gene"] == "IFNB").to_numpy(), g]).mean()
    # log1p scale: control ≈ 0.23, real stimulated ≈ 4.35
    assert stim_pred > ctrl_real + 0.5 * (stim_real - ctrl_real)


def test_prediction_for_every_cell_type(kang_model, kang_log):
    pred = kang_model.predict(kang_log)
    assert set(pred.obs["cell_type"]) == set(kang_log.obs["cell_type"])
    for ct in set(kang_log.obs["cell_type"]):  # basal controls always from the same cell type
        cells = pred.obs["cell_type"] == ct
        src = kang_log.obs.loc[pred.obs.loc[cells, "statetx_ctrl_barcode"], "cell_type"]
        assert (src == ct).all()
        assert np.isfinite(pred.X[cells.to_numpy()]).all()


def test_gene_mismatch_on_real_data_lists_genes(kang_model, kang_log):
    sub = kang_log[:, [g for g in kang_log.var_names if g not in ("ISG15", "IFI6")]].copy()
    with pytest.raises(DataError, match="2 of the model's 1267 genes are missing.*(ISG15|IFI6)"):
        kang_model.predict(sub)


def test_raw_counts_rejected_for_a_log1p_model(kang_model, kang_raw):
    with pytest.raises(DataError, match="raw counts"):
        kang_model.predict(kang_raw)


def _delta_corr(pred, real, cell_type="B cells") -> float:
    """Correlation of the predicted and real mean shift (IFNB − control) of one cell type."""
    def shift(a):
        a = a[(a.obs["cell_type"] == cell_type).to_numpy()]
        stim = (a.obs["target_gene"] == "IFNB").to_numpy()
        return np.asarray(a.X[stim]).mean(0) - np.asarray(a.X[~stim]).mean(0)
    return float(np.corrcoef(shift(pred), shift(real))[0, 1])


@pytest.mark.parametrize("skip", ["shift", "mean_affine"])
def test_pert_skip_starts_at_the_training_mean_response(kang_log, skip):
    """Before training, the skip alone predicts the held-out type: ``shift`` exactly the perturb-
    mean baseline, ``mean_affine`` the contexts' regression of perturbed on control means."""
    from statetx.baselines import PerturbMeanBaseline

    cols = dict(pert_col="target_gene", cell_type_key="cell_type", control_pert="control")
    m = StateTransitionModel(max_steps=1, lr=1e-12, progress=False, seed=0,
                             model_kwargs={"pert_skip": skip}, **cols).fit(kang_log, SPEC)
    pred, real = m.predict_split("test", controls="real")
    x, obs = kang_log.X, kang_log.obs
    train_types = sorted(set(obs["cell_type"]) - {"B cells"})

    def mean(ct, stim):
        return np.asarray(x[((obs["cell_type"] == ct) & ((obs["target_gene"] == "IFNB") == stim))
                            .to_numpy()]).mean(0, dtype=np.float64)

    ctrl = np.stack([mean(ct, False) for ct in train_types])
    stim = np.stack([mean(ct, True) for ct in train_types])
    held = mean("B cells", False)
    a = 0.0
    if skip == "shift":
        bp, br = PerturbMeanBaseline(**cols).fit(kang_log, SPEC).predict_split("test")
        expect = _delta_corr(bp, br)
    else:
        dx, dy = ctrl - ctrl.mean(0), stim - stim.mean(0)
        a = (dx * dy).sum() / (dx * dx).sum() - 1
        w = m.network_.pert_mean_scale.weight.detach()
        assert float(w.max()) == pytest.approx(0.0, abs=1e-9)  # the control label: no change
        assert a == pytest.approx(float(w.min()), abs=1e-4)
        closed = stim.mean(0) + (1 + a) * (held - ctrl.mean(0)) - held
        expect = float(np.corrcoef(closed, mean("B cells", True) - held)[0, 1])
    # the skip alone, through the output ReLU, on the control cells each prediction was paired with
    b = (stim - ctrl).mean(0) - a * ctrl.mean(0)
    stim_rows = (pred.obs["target_gene"] == "IFNB").to_numpy()
    cells = np.asarray(kang_log[pred.obs["ctrl_cell_barcode"][stim_rows].to_numpy()].X,
                       dtype=np.float64)
    ref = np.maximum(cells + b + a * cells.mean(0), 0).mean(0)
    assert np.corrcoef(pred[stim_rows].X.mean(0), ref)[0, 1] > 0.999
    assert _delta_corr(pred, real) == pytest.approx(expect, abs=0.02)


def test_matmul_precision_scoped_to_prediction(kang_model, kang_log):
    """Prediction runs in full fp32 whatever the global setting; ``matmul_precision="medium"``
    (bf16 products on CPUs with AMX) stays within a fraction of a percent on real data."""
    import torch

    from statetx.errors import ConfigError

    b = kang_log[kang_log.obs["cell_type"] == "B cells"].copy()
    exact = kang_model.predict(b).X
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        np.testing.assert_array_equal(kang_model.predict(b).X, exact)  # the default is scoped
    finally:
        torch.set_float32_matmul_precision(prev)
    fast = kang_model.predict(b, matmul_precision="medium")
    assert torch.get_float32_matmul_precision() == prev
    rms = np.sqrt(((fast.X - exact) ** 2).mean() / (exact ** 2).mean())
    assert rms < 0.01
    exact_split, real_split = kang_model.predict_split("test")
    fast_split = kang_model.predict_split("test", matmul_precision="medium")[0]
    assert _delta_corr(fast_split, real_split) == pytest.approx(
        _delta_corr(exact_split, real_split), abs=0.005)
    with pytest.raises(ConfigError, match="matmul_precision='bf16'.*'highest', 'high', 'medium'"):
        kang_model.predict(b, matmul_precision="bf16")


def test_inplace_prediction_renames_the_measured_expression_kept_beside_x(kang_raw, kang_log):
    """predict(inplace=True) puts the predictions in X; the input's measured counts
    (layers['counts']) and HVG expression (obsm['X_hvg']) are renamed ``<name>_input``, so
    that e.g. normalize_total(layer='counts') cannot read the real cells as the prediction."""
    import scanpy as sc

    m = StateTransitionModel(
        "tiny", pert_col="target_gene", cell_type_key="cell_type", control_pert="control",
        max_steps=2, batch_size=4, cell_set_len=32, progress=False, seed=0).fit(kang_log, SPEC)
    b = kang_log[kang_log.obs["cell_type"] == "B cells"].copy()
    counts = kang_raw[b.obs_names].X.copy()
    b.layers["counts"] = counts
    b.obsm["X_hvg"] = np.asarray(b.X[:, :50], dtype=np.float32)
    hvg = b.obsm["X_hvg"].copy()
    expect = m.predict(b, layout="arc", seed=3).X
    with pytest.warns(UserWarning, match=r"X holds the predictions now; the input's own "
                      r"expression.*layers\['counts'\] -> layers\['counts_input'\], "
                      r"obsm\['X_hvg'\] -> obsm\['X_hvg_input'\]\.$"):
        assert m.predict(b, inplace=True, seed=3) is None
    np.testing.assert_array_equal(b.X, expect)
    assert list(b.layers) == ["counts_input"] and list(b.obsm) == ["X_hvg_input"]
    assert (b.layers["counts_input"] != counts).nnz == 0
    np.testing.assert_array_equal(b.obsm["X_hvg_input"], hvg)
    with pytest.raises(KeyError, match="counts"):  # not silently the measured counts
        sc.pp.normalize_total(b, layer="counts")
    with warnings.catch_warnings(record=True) as said:  # again: nothing more to set aside
        warnings.simplefilter("always")
        m.predict(b, inplace=True, seed=3)
    assert not [w for w in said if "inplace" in str(w.message)]
    assert list(b.layers) == ["counts_input"] and list(b.obsm) == ["X_hvg_input"]
