"""Prediction on real data: Kang 2018 PBMCs, IFN-beta, one cell type held out."""

from __future__ import annotations

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
