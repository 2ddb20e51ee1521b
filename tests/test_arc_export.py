"""Export to arc-state run directories (statetx.arc_export): what arc-state writes, read back.

Parity with arc-state itself (its `state tx infer` on an export) was measured outside CI (it
needs arc-state installed): see docs/arc-import.md.
"""

from __future__ import annotations

import pickle
import shutil

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import FIXTURES, make_synthetic, need
from test_model import SMALL, SPEC, small_model

from statetx import StateTransitionModel
from statetx.cli import main
from statetx.errors import ConfigError

ARC = FIXTURES / "arc_state"
RUNS = ["model_a_llama_bidir", "model_b_gpt2", "model_c_llama_all", "model_d_llama_causal_rope"]
# hyper-parameters that describe the network and its data: the export writes arc-state's values
NETWORK_KEYS = ["input_dim", "output_dim", "pert_dim", "hidden_dim", "cell_set_len",
                "n_encoder_layers", "n_decoder_layers", "use_basal_projection",
                "predict_residual", "batch_encoder", "batch_dim", "embed_key",
                "output_space", "control_pert", "transformer_backbone_key", "gene_names"]


def _torch(path):
    return torch.load(path, map_location="cpu", weights_only=False)  # (our own fixtures)


@pytest.mark.parametrize("name", RUNS)
def test_an_imported_run_exported_again_is_the_same_run(name, tmp_path):
    run = need(ARC / "runs" / name)
    model = StateTransitionModel.from_arc_state(run, verbose=False)
    out = model.to_arc_state(tmp_path / "again")
    theirs, ours = _torch(run / "checkpoints" / "final.ckpt"), _torch(
        out / "checkpoints" / "final.ckpt")
    hp, mine = theirs["hyper_parameters"], ours["hyper_parameters"]
    for key in (k for k in NETWORK_KEYS if k in hp):
        assert np.array_equal(np.asarray(mine[key], dtype=object),
                              np.asarray(hp[key], dtype=object)), key
    kw, my_kw = hp["transformer_backbone_kwargs"], mine["transformer_backbone_kwargs"]
    for key in ("bidirectional_attention", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "n_embd", "n_layer", "n_head", "n_positions"):
        if key in kw:
            assert my_kw[key] == kw[key], key
    # the weights under arc-state's names (GPT-2 in Conv1D layout), token tables included
    for k in set(theirs["state_dict"]) & set(ours["state_dict"]):
        if "embed_tokens" in k or k.endswith(("wte.weight", "wpe.weight")):  # zero tables:
            assert ours["state_dict"][k].shape == theirs["state_dict"][k].shape, k  # shapes
            continue
        torch.testing.assert_close(ours["state_dict"][k], theirs["state_dict"][k].float(),
                                   msg=k)
    assert {k for k in ours["state_dict"] if "gene_decoder" not in k} == {
        k for k in theirs["state_dict"] if "gene_decoder" not in k}
    vd, my_vd = (pickle.loads((d / "var_dims.pkl").read_bytes()) for d in (run, out))
    assert my_vd["pert_names"] == [str(p) for p in vd["pert_names"]]
    assert my_vd["gene_names"] == list(vd["gene_names"])
    back = StateTransitionModel.from_arc_state(out, verbose=False)
    inp = ad.read_h5ad(need(ARC / "infer" / "infer_input.h5ad"))
    np.testing.assert_array_equal(back.predict(inp, seed=3).X, model.predict(inp, seed=3).X)


def test_a_trained_model_and_a_run_on_the_command_line(tmp_path, capsys):
    adata = make_synthetic()
    model = small_model(max_steps=3, model_kwargs={**SMALL, "attention": "causal",
                                                   "rope": 10000.0},
                        batch_col="batch").fit(adata, SPEC, output_dir=tmp_path / "run")
    back = StateTransitionModel.from_arc_state(model.to_arc_state(tmp_path / "arc"),
                                               verbose=False)
    assert (back.network_config_.attention, back.network_config_.rope) == ("causal", 10000.0)
    np.testing.assert_array_equal(back.predict(adata, seed=1).X, model.predict(adata, seed=1).X)
    assert main(["export-arc", str(tmp_path / "run"), "--out", str(tmp_path / "cli")]) == 0
    assert "state tx infer --model-dir" in capsys.readouterr().out
    cli = StateTransitionModel.from_arc_state(tmp_path / "cli", verbose=False)
    np.testing.assert_array_equal(cli.predict(adata, seed=1).X, model.predict(adata, seed=1).X)
    assert main(["export-arc", str(tmp_path / "run"), "--out", str(tmp_path / "cli")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    # --overwrite replaces an earlier export whole (no file of it is kept) ...
    (tmp_path / "cli" / "version_0").mkdir()
    assert main(["export-arc", str(tmp_path / "run"), "--out", str(tmp_path / "cli"),
                 "--overwrite"]) == 0
    assert not (tmp_path / "cli" / "version_0").exists()
    # ... and only an arc-state run: a folder of other files is not replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["export-arc", str(tmp_path / "run"), "--out", str(tmp_path / "mine"),
                 "--overwrite"]) == 2
    assert "not an arc-state run" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    # a statetx run (here the model's own) is never replaced by an export
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert main(["export-arc", str(tmp_path / "run"), "--out", str(tmp_path / "run"),
                 "--overwrite"]) == 2
    assert "model's own run folder" in capsys.readouterr().err
    shutil.copytree(tmp_path / "run", tmp_path / "copy_of_run")
    with pytest.raises(ConfigError, match="statetx_run.json.*a statetx run"):
        model.to_arc_state(tmp_path / "copy_of_run", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    # a symbolic link to an earlier export: its folder is replaced, the link kept
    (tmp_path / "link").symlink_to(tmp_path / "cli", target_is_directory=True)
    assert main(["export-arc", str(tmp_path / "run"), "--out", str(tmp_path / "link"),
                 "--overwrite"]) == 0
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link" / "config.yaml").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_an_export_of_a_statetx_trained_model_does_not_claim_arcs_licence(tmp_path, capsys):
    """export-arc records that statetx trained the weights; import-arc, info and the importer's
    notes then say so instead of the arc-state / Arc weights licence line. An arc-state run
    exported again keeps that line."""
    from statetx.arc import LICENSE_NOTICE

    adata = make_synthetic()
    small_model(max_steps=1, model_kwargs=SMALL).fit(adata, SPEC, output_dir=tmp_path / "run")
    assert main(["export-arc", str(tmp_path / "run"), "--out", str(tmp_path / "arc")]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "arc")]) == 0
    out = capsys.readouterr().out
    assert "licence: trained with statetx" in out and "Non-Commercial" not in out
    assert main(["import-arc", str(tmp_path / "arc"), "--out", str(tmp_path / "imp")]) == 0
    out = capsys.readouterr().out
    assert "trained with statetx" in out and LICENSE_NOTICE not in out
    assert main(["info", str(tmp_path / "imp")]) == 0
    assert "licence: trained with statetx" in capsys.readouterr().out
    back = StateTransitionModel.from_arc_state(tmp_path / "arc", verbose=False)
    prov = back.arc_import_["provenance"]
    assert prov["trained_by"] == "statetx" and LICENSE_NOTICE not in back.arc_import_["notes"]
    # exported again, it stays statetx's
    again = StateTransitionModel.from_arc_state(back.to_arc_state(tmp_path / "arc2"),
                                                verbose=False)
    assert again.arc_import_["provenance"]["trained_by"] == "statetx"
    # arc-state's own run, re-exported by statetx: its licence line stays
    theirs = StateTransitionModel.from_arc_state(need(ARC / "runs" / RUNS[0]), verbose=False)
    re = StateTransitionModel.from_arc_state(theirs.to_arc_state(tmp_path / "arc3"),
                                             verbose=False)
    assert re.arc_import_["provenance"]["license_notice"] == LICENSE_NOTICE
    assert "trained_by" not in re.arc_import_["provenance"]


def test_an_imported_model_is_not_exported_over_the_run_it_came_from(tmp_path):
    from conftest import writable_copy

    run = writable_copy(ARC / "runs" / RUNS[0], tmp_path / "run")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    model = StateTransitionModel.from_arc_state(run, verbose=False)
    with pytest.raises(ConfigError, match="the model's own run folder"):
        model.to_arc_state(run, overwrite=True)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_a_failed_export_leaves_nothing_half_written(tmp_path, monkeypatch):
    import statetx.arc_export as ae

    model = small_model(max_steps=2).fit(make_synthetic(), SPEC)
    model.to_arc_state(tmp_path / "arc")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ae, "dump_config", full)  # the last file written
    for out in (tmp_path / "new", tmp_path / "arc"):
        with pytest.raises(OSError, match="No space"):
            ae.export_arc(model, out, overwrite=True)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == ["arc"]


def test_networks_arc_state_cannot_rebuild_are_refused(tmp_path):
    adata = make_synthetic()
    small = StateTransitionModel("small", pert_col="gene", cell_type_key="cell_type",
                                 control_pert="ctrl", max_steps=2, progress=False,
                                 model_kwargs={"hidden_dim": 32, "n_heads": 2, "head_dim": 16,
                                               "n_kv_heads": 2, "intermediate_size": 64,
                                               "n_layers": 1}).fit(adata, SPEC)
    with pytest.raises(ConfigError, match="pert_skip.*reference preset"):
        small.to_arc_state(tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing half-written
    causal = small_model(max_steps=2, model_kwargs={**SMALL, "attention": "causal"}).fit(
        adata, SPEC)
    with pytest.raises(ConfigError, match="causal with no positions"):
        causal.to_arc_state(tmp_path / "y")


def test_an_x_hvg_model_with_all_genes_out_reads_back(tmp_path):
    """Input genes (obsm['X_hvg']) other than the output genes: their names travel with the
    export (var_dims' statetx_input_names), so the model reads its input back by name."""
    adata = make_synthetic()
    adata.obsm["X_hvg"] = np.asarray(adata.X[:, :10], dtype=np.float32)
    adata.uns["X_hvg_var_names"] = np.asarray(adata.var_names[:10])
    model = small_model(embed_key="X_hvg", output_space="all", max_steps=2).fit(adata, SPEC)
    back = StateTransitionModel.from_arc_state(model.to_arc_state(tmp_path / "arc"),
                                               verbose=False)
    assert back.var_names_ == model.var_names_ == list(adata.var_names[:10])
    np.testing.assert_array_equal(back.predict(adata, seed=0).X, model.predict(adata, seed=0).X)
