"""Tests of the arc-state importer against the fixtures made by the real arc-state code."""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES

from statetx.arc import (
    AmbiguousAttentionError,
    UnsupportedCheckpointError,
    load_arc_run,
    load_pickle,
    load_torch,
)
from statetx.errors import ConfigError, DataError

ARC = FIXTURES / "arc_state"
RUNS = {
    "model_a_llama_bidir": ARC / "runs" / "model_a_llama_bidir",
    "model_b_gpt2": ARC / "runs" / "model_b_gpt2",
    "model_c_llama_all": ARC / "runs" / "model_c_llama_all",
    "model_d_llama_causal_rope": ARC / "runs" / "model_d_llama_causal_rope",
    "model_e_v0912_llama": ARC / "legacy_v0912" / "model_e_v0912_llama",
}
# (model, reference output suffix, load_arc_run options); model e: same weights, three runtimes
CASES = [
    ("model_a_llama_bidir", "output", {}),
    ("model_b_gpt2", "output", {}),
    ("model_c_llama_all", "output", {}),
    ("model_d_llama_causal_rope", "output", {}),
    ("model_e_v0912_llama", "output", {"attention": "bidirectional"}),
    ("model_e_v0912_llama", "output_v0912code_tf4.57.6", {"attention": "causal"}),
    ("model_e_v0912_llama", "output_arcstate0.11.1_tf5.24.0",
     {"attention": "causal", "rope": 10000.0}),
]


@pytest.fixture(autouse=True)
def _need_fixtures():
    if not (ARC / "README.md").exists():
        pytest.skip(f"{ARC} not found: the shared arc-state fixtures (../shared) are absent")


def load(name: str | Path, **kw):
    """A fixture run by name (or a run folder), its warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_arc_run(RUNS.get(name, name), **kw)


def copy_run(name: str, dst: Path) -> Path:
    """Writable copy of a fixture run directory (files copied without their read-only mode)."""
    src = RUNS[name]
    for f in src.rglob("*"):
        if f.is_file():
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
    return dst


def edit_checkpoint(run: Path, edit) -> None:
    path = run / "checkpoints" / "final.ckpt"
    ckpt = load_torch(path)
    edit(ckpt)
    torch.save(ckpt, path)


# ---------------------------------------------------------------------------------------------
# parity with arc-state's forward pass


@pytest.mark.parametrize("name,suffix,kw", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_forward_parity_with_arc_state(name, suffix, kw):
    ref = np.load(ARC / "reference" / f"{name}.npz")
    imp = load(name, keep_unused_decoder=True, **kw)
    assert not imp.network.training
    for mode in ("padded", "unpadded"):
        basal = torch.from_numpy(ref[f"{mode}_ctrl_cell_emb"])
        pert = torch.from_numpy(ref[f"{mode}_pert_emb"])
        batch = torch.from_numpy(ref[f"{mode}_batch_onehot"])
        with torch.no_grad():
            out = imp.network.forward_flat(basal, pert, batch, set_len=16,
                                           padded=mode == "padded")
        diff = np.abs(out.pred.numpy() - ref[f"{mode}_{suffix}"]).max()
        assert diff <= 1e-5, (name, suffix, mode, diff)
        if suffix == "output" and f"{mode}_gene_decoder_output" in ref:
            d = np.abs(out.counts.numpy() - ref[f"{mode}_gene_decoder_output"]).max()
            assert d <= 1e-5, (name, mode, "gene decoder", d)
        if "batch_idx" in ref and mode == "padded":  # integer batch indices give the same
            with torch.no_grad():
                alt = imp.network.forward_flat(basal, pert, torch.from_numpy(
                    ref[f"{mode}_batch_idx"]), set_len=16)
            assert torch.equal(alt.pred, out.pred)


# ---------------------------------------------------------------------------------------------
# metadata


def test_model_a_metadata():
    imp = load("model_a_llama_bidir")
    c = imp.config
    assert (c.backbone, c.attention, c.rope, c.hidden_dim, c.n_heads, c.head_dim) == (
        "llama", "bidirectional", None, 32, 4, 8)
    assert c.batch_encoder and c.batch_dim == 2 and c.use_basal_projection
    assert (c.n_encoder_layers, c.n_decoder_layers, c.output_activation) == (2, 3, "relu")
    # the never-trained decoder is dropped by default and reported
    assert c.gene_dim == 0 and imp.network.gene_decoder is None
    assert imp.unused == ["gene_decoder"] and any("never" in n for n in imp.notes)
    assert imp.perturbations == ["GENE005", "GENE016", "GENE027", "GENE038", "GENE049",
                                 "GENE060", "non-targeting"]
    assert np.array_equal(imp.pert_vectors, np.eye(7, dtype=np.float32))
    assert imp.cell_types == ["CT1", "CT2"] and imp.batches == ["batch1", "batch2"]
    assert len(imp.gene_names) == 128 and all(isinstance(g, str) for g in imp.gene_names)
    dk = imp.data_kwargs
    assert (dk["pert_col"], dk["cell_type_key"], dk["batch_col"], dk["control_pert"]) == (
        "gene", "cell_type", "gem_group", "non-targeting")
    assert (dk["embed_key"], dk["output_space"], dk["cell_set_len"]) == ("X_hvg", "gene", 16)
    assert dk["basal_mapping_strategy"] == "random"
    assert imp.var_dims["gene_dim"] == 200 and isinstance(imp.var_dims["gene_dim"], int)
    prov = imp.provenance
    assert prov["global_step"] == 50 and len(prov["sha256"]) == 64
    assert prov["attention"] == "bidirectional" and "licence" in prov["license_notice"]


def test_model_b_gpt2_defaults_to_causal_with_warning():
    with pytest.warns(UserWarning, match="causal"):
        imp = load_arc_run(RUNS["model_b_gpt2"])
    c = imp.config
    assert (c.backbone, c.attention, c.rope, c.norm_eps, c.intermediate_size) == (
        "gpt2", "causal", None, 1e-5, 128)
    assert not c.use_basal_projection and c.gene_dim == 0


def test_model_c_all_and_model_d_rope():
    c = load("model_c_llama_all").config
    assert c.output_space == "all" and c.n_encoder_layers == 1 and c.use_basal_projection
    d = load("model_d_llama_causal_rope").config
    assert (d.attention, d.rope) == ("causal", 10000.0)


def test_legacy_checkpoint_requires_attention():
    with pytest.raises(AmbiguousAttentionError, match='attention="bidirectional"'):
        load_arc_run(RUNS["model_e_v0912_llama"])
    imp = load("model_e_v0912_llama", attention="causal")
    assert imp.config.rope is None
    assert imp.cell_types == ["CT1", "CT2"] and imp.batches == ["batch1", "batch2"]  # .pkl maps
    assert imp.provenance["arc_state_version"].startswith("0.9")


def test_attention_override_and_bad_value():
    imp = load("model_a_llama_bidir", attention="causal")
    assert imp.config.attention == "causal" and imp.config.rope is None
    with pytest.raises(ConfigError, match="attention"):
        load("model_a_llama_bidir", attention="full")


# ---------------------------------------------------------------------------------------------
# safety and errors


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused(tmp_path):
    run = copy_run("model_a_llama_bidir", tmp_path / "run")
    marker = tmp_path / "pwned.txt"
    (run / "var_dims.pkl").write_bytes(pickle.dumps({"input_dim": _Evil(str(marker))}))
    with pytest.raises(DataError, match="trust_pickle=True"):
        load_arc_run(run)
    assert not marker.exists()
    with pytest.raises(DataError, match="refusing to load the global io.open"):
        load_pickle(run / "var_dims.pkl")
    assert not marker.exists()


def test_malicious_checkpoint_is_refused(tmp_path):
    run = copy_run("model_a_llama_bidir", tmp_path / "run")
    marker = tmp_path / "pwned_ckpt.txt"
    torch.save({"state_dict": {}, "x": _Evil(str(marker))}, run / "checkpoints" / "final.ckpt")
    with pytest.raises(DataError, match="executes code"):
        load_arc_run(run)
    assert not marker.exists()


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.__setitem__("transformer_backbone.layers.1.mlp.up_proj.weight",
                               torch.zeros(63, 32)),
     r"misshaped keys: transformer_backbone\.layers\.1\.mlp\.up_proj\.weight \(63, 32\)"),
    (lambda sd: sd.pop("transformer_backbone.layers.1.self_attn.v_proj.weight"),
     r"missing keys: transformer_backbone\.layers\.1\.self_attn\.v_proj\.weight"),
    (lambda sd: sd.__setitem__("foo.weight", torch.zeros(3)), r"unexpected keys: foo\.weight"),
], ids=["misshaped", "missing", "unexpected"])
def test_key_problems_are_named(tmp_path, edit, match):
    run = copy_run("model_a_llama_bidir", tmp_path / "run")
    edit_checkpoint(run, lambda ck: edit(ck["state_dict"]))
    with pytest.raises(DataError, match=match):
        load_arc_run(run)


@pytest.mark.parametrize("key,match", [
    ("confidence_token.confidence_token", "confidence-token checkpoints are not yet supported"),
    ("batch_token", "batch_token"),
])
def test_unsupported_modules(tmp_path, key, match):
    run = copy_run("model_a_llama_bidir", tmp_path / "run")
    edit_checkpoint(run, lambda ck: ck["state_dict"].__setitem__(key, torch.zeros(1, 1, 32)))
    with pytest.raises(UnsupportedCheckpointError, match=match):
        load_arc_run(run)


def test_missing_heads_need_user_values(tmp_path):
    run = copy_run("model_a_llama_bidir", tmp_path / "run")

    def drop(ck):
        for k in ("num_attention_heads", "head_dim", "num_key_value_heads"):
            ck["hyper_parameters"]["transformer_backbone_kwargs"].pop(k)

    edit_checkpoint(run, drop)
    (run / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="n_heads=.*Candidates: 1, 2, 4, 8, 16, 32"):
        load_arc_run(run)
    imp = load_arc_run(run, n_heads=4)
    assert (imp.config.n_heads, imp.config.head_dim, imp.config.n_kv_heads) == (4, 8, 4)
    assert any("config.yaml not found" in n for n in imp.notes)
    assert imp.data_kwargs["pert_col"] == "gene"  # reference default, with a note


def test_inconsistent_files_are_errors(tmp_path):
    run = copy_run("model_a_llama_bidir", tmp_path / "run")
    vd = load_pickle(run / "var_dims.pkl")
    vd["pert_dim"] = 9
    (run / "var_dims.pkl").write_bytes(pickle.dumps(vd))
    with pytest.raises(DataError, match="pert_dim.*var_dims"):
        load_arc_run(run)
    imp = load_arc_run(run, strict=False)
    assert any("pert_dim" in n for n in imp.notes)


def test_checkpoint_resolution(tmp_path):
    run = copy_run("model_a_llama_bidir", tmp_path / "run")
    ck = run / "checkpoints"
    os.rename(ck / "final.ckpt", ck / "step=step=50-val_loss=val_loss=2.2.ckpt")
    os.symlink("step=step=50-val_loss=val_loss=2.2.ckpt", ck / "last.ckpt")
    imp = load_arc_run(run)  # no final.ckpt: falls back to last.ckpt, a symlink to the best
    assert imp.provenance["checkpoint_file"].startswith("step=step=50")
    assert any("best checkpoint, not the latest" in n for n in imp.notes)
    imp2 = load_arc_run(ck / "last.ckpt")  # a checkpoint file as run_dir
    assert imp2.perturbations == imp.perturbations
    with pytest.raises(DataError, match="available: last.ckpt, step=step=50"):
        load_arc_run(run, checkpoint="best.ckpt")


def test_trained_gene_decoder_is_loaded_and_relu_rule(tmp_path):
    run = copy_run("model_a_llama_bidir", tmp_path / "run")
    edit_checkpoint(run, lambda ck: ck["hyper_parameters"].__setitem__("embed_key", "X_state"))
    (run / "config.yaml").unlink()
    imp = load_arc_run(run)
    c = imp.config
    assert c.gene_dim == 128 and c.decoder_hidden_dims == [16, 16] and imp.unused == []
    assert c.output_activation == "none"  # embedding output with a decoder: no ReLU
    assert imp.network.gene_decoder is not None


def test_unrecorded_settings_are_asked_for_never_guessed(tmp_path):
    """control_pert / embed_key / cell_set_len recorded nowhere: an error naming the fill-in
    (arc-checkpoints.md §4), never 'non-targeting', X or 512 silently."""
    from statetx import StateTransitionModel

    run = copy_run("model_b_gpt2", tmp_path / "run")

    def drop(ck):
        for k in ("control_pert", "cell_set_len"):
            ck["hyper_parameters"].pop(k)
        ck["hyper_parameters"]["transformer_backbone_kwargs"].pop("max_position_embeddings")

    edit_checkpoint(run, drop)
    (run / "config.yaml").unlink()
    imp = load(run)  # the weights alone load (init_from needs no more)
    assert imp.data_kwargs["control_pert"] is None
    # GPT-2: n_positions = cell_set_len + extra_tokens (17 = 16 + 1)
    assert imp.data_kwargs["cell_set_len"] == 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"control_pert is recorded neither.*--control-pert"):
            StateTransitionModel.from_arc_state(run, verbose=False)
        m = StateTransitionModel.from_arc_state(run, verbose=False, control_pert="non-targeting")
        assert m.vocab_.control_pert == "non-targeting" and m.cell_set_len_ == 16
        with pytest.raises(DataError, match="'ctrl' is not among the model's perturbations"):
            StateTransitionModel.from_arc_state(run, verbose=False, control_pert="ctrl")
        with pytest.raises(ConfigError, match="cell_set_len=8 contradicts the run"):
            load_arc_run(run, cell_set_len=8)

    edit_checkpoint(run, lambda ck: ck["hyper_parameters"].pop("embed_key"))
    with pytest.raises(DataError, match="embed_key is recorded neither"):
        load(run)
    assert load(run, embed_key="X_hvg").data_kwargs["embed_key"] == "X_hvg"


def test_training_loss_is_carried_for_fine_tuning(tmp_path):
    from statetx import StateTransitionModel

    run = copy_run("model_a_llama_bidir", tmp_path / "run")
    default = StateTransitionModel.from_arc_state(run, verbose=False)
    assert (default.loss, default.loss_kwargs) == ("energy", None)

    def se(ck):
        ck["hyper_parameters"].update(loss="se", blur=0.1, sinkhorn_weight=0.5)

    edit_checkpoint(run, se)
    (run / "config.yaml").unlink()
    m = StateTransitionModel.from_arc_state(run, verbose=False)
    assert m.loss == "se" and m.loss_kwargs == {"blur": 0.1, "sinkhorn_weight": 0.5}


def test_explicit_rope_against_the_checkpoint_flag_warns():
    with pytest.warns(UserWarning, match="will not compute what was trained"):
        imp = load_arc_run(RUNS["model_d_llama_causal_rope"], rope=None)
    assert imp.config.rope is None


def test_gpt2_set_length_from_n_positions_without_extra_tokens_is_a_default(tmp_path):
    """n_positions = cell_set_len + extra_tokens: with extra_tokens recorded nowhere the set
    length derived from n_positions is said, and a given cell_set_len is taken, not refused."""
    run = copy_run("model_b_gpt2", tmp_path / "run")

    def drop(ck):
        for k in ("cell_set_len", "extra_tokens"):
            ck["hyper_parameters"].pop(k, None)
        ck["hyper_parameters"]["transformer_backbone_kwargs"].pop("max_position_embeddings")

    edit_checkpoint(run, drop)
    (run / "config.yaml").unlink()
    imp = load(run)
    assert imp.data_kwargs["cell_set_len"] == 17
    assert any("extra_tokens is not recorded" in n for n in imp.notes)
    assert load(run, cell_set_len=16).data_kwargs["cell_set_len"] == 16
