"""``StateTransitionModel.from_arc_state`` on the arc-state fixture runs (end-to-end infer)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import FIXTURES, need

from statetx import StateTransitionModel
from statetx.errors import ConfigError

ARC = FIXTURES / "arc_state"
RUNS = ["model_a_llama_bidir", "model_b_gpt2", "model_c_llama_all", "model_d_llama_causal_rope"]


@pytest.fixture(scope="module")
def model_a():
    return StateTransitionModel.from_arc_state(need(ARC / "runs" / RUNS[0]), verbose=False)


@pytest.mark.parametrize("run", RUNS)
def test_every_fixture_run_imports_as_a_fitted_estimator(run):
    m = StateTransitionModel.from_arc_state(need(ARC / "runs" / run), verbose=False)
    assert m.vocab_.perturbations[-1] == "non-targeting"
    assert m.cell_set_len_ == 16
    assert m.arc_import_["notes"]
    x = np.random.default_rng(0).random((2, 5, m.n_features_in_), dtype=np.float32)
    out = m.predict_sets(x, ["GENE005", "GENE016"], batch=["batch1", "batch2"]
                         if m.network_config_.batch_encoder else None)
    assert out.shape[:2] == (2, 5) and np.isfinite(out).all()


def test_infer_windows_reproduced_exactly(model_a):
    """Every forward window arc-state ran during `tx infer` gives the same raw output."""
    w = np.load(need(ARC / "infer" / "infer_windows_model_a.npz"))
    inp = ad.read_h5ad(ARC / "infer" / "infer_input.h5ad")
    x = np.asarray(inp.obsm["X_hvg"])
    pos = 0
    for n, pert in zip(w["window_len"], w["window_pert_name"]):
        rows = w["ctrl_row_index"][pos:pos + n]
        out = model_a.predict_sets(x[rows], str(pert), batch=w["batch_idx"][pos:pos + n])
        np.testing.assert_allclose(out, w["preds_raw"][pos:pos + n], atol=1e-5)
        pos += n
    assert pos == 100


@pytest.mark.parametrize("run", RUNS[:4])
def test_imported_runs_pair_controls_as_they_trained(run):
    """The fixture runs trained with basal_mapping_strategy 'random' (controls of the same cell
    type, any batch); predict cuts each cell type's cells into the reference's windows."""
    m = StateTransitionModel.from_arc_state(need(ARC / "runs" / run), verbose=False)
    assert m.basal_mapping_strategy == "random"
    inp = ad.read_h5ad(ARC / "infer" / "infer_input.h5ad")
    pred = m.predict(inp, windows="reference")
    assert pred.uns["statetx"]["basal_pool"] == "cell_type"
    sets = pred.obs.groupby(["cell_type", "statetx_set"], observed=True).size()
    w = np.load(need(ARC / "infer" / "infer_windows_model_a.npz"))
    assert sorted(sets.tolist()) == sorted(int(n) for n in w["window_len"])


def test_infer_end_to_end_matches_in_distribution(model_a):
    """statetx.predict draws its own controls, so only group means are compared.

    Tolerance: 0.15 (max over genes of |mean difference|) for log1p values around 1; the two
    runs differ only in which control cells are drawn as basal states.
    """
    inp = ad.read_h5ad(need(ARC / "infer" / "infer_input.h5ad"))
    ref = ad.read_h5ad(ARC / "infer" / "infer_output_model_a.h5ad")
    pred = model_a.predict(inp, windows="reference")
    assert list(pred.obs_names) == list(inp.obs_names)
    key = (inp.obs["cell_type"].astype(str) + "|" + inp.obs["gene"].astype(str)).to_numpy()
    for k in np.unique(key):
        sel = key == k
        diff = np.abs(pred.X[sel].mean(0) - ref.obsm["X_hvg"][sel].mean(0)).max()
        assert diff < 0.15, (k, diff)
    assert pred.X.min() >= 0 and pred.X.max() <= 14


def test_saved_import_keeps_its_licence_notice(model_a, tmp_path, capsys):
    from statetx.cli import main

    model_a.save(tmp_path / "m")
    loaded = StateTransitionModel.load(tmp_path / "m")
    assert loaded.arc_import_ == model_a.arc_import_
    notice = model_a.arc_import_["provenance"]["license_notice"]
    assert main(["info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert f"licence: {notice}" in out and "MIT code" not in out
    step = model_a.arc_import_["provenance"]["global_step"]
    assert f"training step: {step}" in out and "128 output genes" in out


def test_info_describes_a_run_that_did_not_record_its_attention(capsys):
    from statetx.cli import main

    legacy = need(ARC / "legacy_v0912" / "model_e_v0912_llama")
    assert main(["info", str(legacy)]) == 0
    out = capsys.readouterr().out
    assert "attention not recorded by the checkpoint" in out and "attention ?" in out
    assert "vocabulary: 6 perturbations" in out


def test_from_arc_run_is_the_spec_name(model_a):
    m = StateTransitionModel.from_arc_run(need(ARC / "runs" / RUNS[0]), verbose=False)
    assert m.network_config_.to_dict() == model_a.network_config_.to_dict()


def test_probe_attention_reports_both_modes_on_real_cells(capsys):
    import statetx

    data = ad.read_h5ad(need(ARC / "data" / "synth" / "synth.h5ad"))
    legacy = need(ARC / "legacy_v0912" / "model_e_v0912_llama")  # trained bidirectional
    table = statetx.probe_attention(legacy, data, n_groups=6)
    assert list(table["mode"]) == ["bidirectional", "causal"]  # lowest energy first
    assert (table["n_groups"] == 6).all() and (table["energy"] > 0).all()
    assert "a report, not a choice" in capsys.readouterr().out
    # a fitted model works too: its attention is switched on a copy
    model = StateTransitionModel.from_arc_state(legacy, attention="causal", verbose=False)
    again = statetx.probe_attention(model, data, n_groups=6)
    np.testing.assert_allclose(again.set_index("mode").loc[table["mode"], "energy"],
                               table["energy"], rtol=1e-5)
    assert model.network_config_.attention == "causal"
    with pytest.raises(ConfigError, match="sets predict_controls itself"):
        statetx.probe_attention(model, data, predict_controls=True)


def test_arc_layout_places_predictions_where_arc_state_does(model_a):
    """layout="arc": a copy of the input, X untouched, predictions in obsm['X_hvg'] as in
    arc-state's own tx infer output for this model (same keys, shapes, values in distribution)."""
    inp = ad.read_h5ad(need(ARC / "infer" / "infer_input.h5ad"))
    ref = ad.read_h5ad(ARC / "infer" / "infer_output_model_a.h5ad")
    out = model_a.predict(inp, layout="arc", windows="reference")
    assert set(out.obsm) == set(ref.obsm) and list(out.var_names) == list(ref.var_names)
    np.testing.assert_array_equal(np.asarray(out.X.todense() if hasattr(out.X, "todense")
                                             else out.X),
                                  np.asarray(ref.X.todense() if hasattr(ref.X, "todense")
                                             else ref.X))
    default = model_a.predict(inp, windows="reference")
    np.testing.assert_array_equal(out.obsm["X_hvg"], default.X)  # the same prediction
    assert set(inp.uns) <= set(out.uns) and "statetx" in out.uns
    kept = model_a.predict(inp, keep_input=True)  # the input's obsm next to the prediction
    np.testing.assert_array_equal(kept.obsm["X_hvg"], inp.obsm["X_hvg"])
    assert "X_hvg" not in default.obsm


def test_arc_layout_matches_genes_by_name(model_a):
    """Input genes in another order: predictions land under the right gene names."""
    inp = ad.read_h5ad(need(ARC / "infer" / "infer_input.h5ad"))
    ref = model_a.predict(inp, layout="arc", seed=1)
    names = list(inp.var_names)
    rev = inp[:, names[::-1]].copy()
    rev.obsm["X_hvg"] = np.ascontiguousarray(inp.obsm["X_hvg"][:, ::-1])  # hvg names follow var
    out = model_a.predict(rev, layout="arc", seed=1)
    got = pd.DataFrame(out.obsm["X_hvg"], columns=rev.var_names[rev.var["highly_variable"]])
    want = pd.DataFrame(ref.obsm["X_hvg"], columns=inp.var_names[inp.var["highly_variable"]])
    pd.testing.assert_frame_equal(got[want.columns], want, check_exact=False, rtol=1e-5)
