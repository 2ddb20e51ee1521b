"""Tests of the arc-state importer against the fixtures made by the real arc-state code."""

from __future__ import annotations

import os
import pickle
import re
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
    # the same from the command line: the error names the flag, which then imports it
    from statetx.cli import main

    assert main(["import-arc", str(run), "--out", str(tmp_path / "m")]) == 2
    assert main(["import-arc", str(run), "--out", str(tmp_path / "m"), "--n-heads", "4"]) == 0
    from statetx import StateTransitionModel

    assert StateTransitionModel.load(tmp_path / "m").network_config_.n_heads == 4
    vd = load_pickle(run / "var_dims.pkl")  # files that disagree: --no-strict trusts the weights
    vd["pert_dim"] = 9
    (run / "var_dims.pkl").write_bytes(pickle.dumps(vd))
    out = tmp_path / "infer.h5ad"
    args = ["tx", "infer", "--model_dir", str(run), "--adata",
            str(ARC / "infer" / "infer_input.h5ad"), "--output", str(out), "--n-heads", "4"]
    assert main(args) == 2 and not out.exists()
    assert main([*args, "--no-strict"]) == 0 and out.exists()


def test_inconsistent_files_are_errors(tmp_path):
    run = copy_run("model_a_llama_bidir", tmp_path / "run")
    vd = load_pickle(run / "var_dims.pkl")
    vd["pert_dim"] = 9
    (run / "var_dims.pkl").write_bytes(pickle.dumps(vd))
    with pytest.raises(DataError, match="pert_dim.*var_dims"):
        load_arc_run(run)
    imp = load_arc_run(run, strict=False)
    assert any("pert_dim" in n for n in imp.notes)


@pytest.mark.parametrize("name, edit, match", [
    ("model_a_llama_bidir", lambda c: [c["state_dict"].pop(k) for k in list(c["state_dict"])
                                       if ".layers.1." in k],
     r"n_layers: the weights say 1 but .*\['num_hidden_layers'\] says 2"),
    ("model_a_llama_bidir", lambda c: c["hyper_parameters"]["transformer_backbone_kwargs"]
     .update(intermediate_size=99), r"intermediate_size: .*says 99"),
    ("model_b_gpt2", lambda c: c["hyper_parameters"]["transformer_backbone_kwargs"]
     .update(n_embd=48), r"hidden_dim: .*\['n_embd'\] says 48"),
])
def test_backbone_settings_must_fit_the_weights(tmp_path, name, edit, match):
    """A truncated checkpoint (a transformer block missing) or backbone settings that do not fit
    the shapes are refused, not loaded as another network; strict=False trusts the weights."""
    run = copy_run(name, tmp_path / "run")
    edit_checkpoint(run, edit)
    (run / "config.yaml").unlink()  # (only the checkpoint's settings)
    with pytest.raises(DataError, match=match):
        load(run)
    assert any(re.search(match, n) for n in load(run, strict=False).notes)


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


# ---------------------------------------------------------------------------------------------
# damaged files, contradicting config.yaml, unknown versions (audit findings)


def _entry_data_offset(path: Path, name: str) -> tuple[int, int]:
    """(offset of the stored bytes, size) of a zip entry (torch archives are uncompressed)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    n_name, n_extra = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + n_name + n_extra, info.compress_size


def _flip_bytes(path: Path, name: str, n: int = 16) -> None:
    start, size = _entry_data_offset(path, name)
    data = bytearray(path.read_bytes())
    mid = start + size // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def test_damaged_weights_fail_the_crc_check(tmp_path):
    """Flipped bytes inside a weight tensor load silently with torch's reader (outputs off by
    ~46); the zip CRC check reports the file and the entry instead."""
    run = copy_run("model_a_llama_bidir", tmp_path / "run")
    ckpt = run / "checkpoints" / "final.ckpt"
    _flip_bytes(ckpt, "final/data/14")
    with pytest.raises(DataError, match=r"final\.ckpt: its entry 'final/data/14' fails the zip "
                                        r"CRC check.*damaged.*Copy it again"):
        load_arc_run(run)
    with pytest.raises(DataError, match="'final/data/14' fails the zip CRC check"):
        load_torch(ckpt)


def test_damaged_map_fails_the_crc_check(tmp_path):
    run = copy_run("model_a_llama_bidir", tmp_path / "run")
    _flip_bytes(run / "pert_onehot_map.pt", "pert_onehot_map/data.pkl", n=4)
    with pytest.raises(DataError, match=r"pert_onehot_map\.pt: its entry "
                                        r"'pert_onehot_map/data\.pkl' fails the zip CRC check"):
        load_arc_run(run)


def _edit_config(run: Path, edit) -> None:
    import yaml

    path = run / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def _tb(cfg: dict) -> dict:
    return cfg["model"]["kwargs"]["transformer_backbone_kwargs"]


@pytest.mark.parametrize("name,edit,key,yaml_value,ckpt_value", [
    ("model_a_llama_bidir", lambda c: _tb(c).__setitem__("bidirectional_attention", False),
     "model.kwargs.transformer_backbone_kwargs.bidirectional_attention", "False", "True"),
    ("model_a_llama_bidir", lambda c: _tb(c).__setitem__("num_attention_heads", 8),
     "model.kwargs.transformer_backbone_kwargs.num_attention_heads", "8", "4"),
    ("model_a_llama_bidir", lambda c: c["model"]["kwargs"].__setitem__("cell_set_len", 32),
     "model.kwargs.cell_set_len", "32", "16"),
    ("model_a_llama_bidir", lambda c: c["data"]["kwargs"].__setitem__("control_pert", "ctrl"),
     "data.kwargs.control_pert", "'ctrl'", "'non-targeting'"),
    ("model_a_llama_bidir", lambda c: c["model"]["kwargs"].__setitem__("n_encoder_layers", 3),
     "model.kwargs.n_encoder_layers", "3", "2"),
    ("model_b_gpt2", lambda c: _tb(c).__setitem__("n_head", 8),
     "model.kwargs.transformer_backbone_kwargs.n_head", "8", "4"),
    ("model_a_llama_bidir", lambda c: c["model"]["kwargs"].__setitem__("use_batch_token", True),
     "model.kwargs.use_batch_token", "True", "False"),
], ids=["bidirectional", "heads", "cell_set_len", "control_pert", "n_encoder_layers",
        "gpt2_n_head", "use_batch_token"])
def test_config_yaml_contradicting_the_checkpoint_is_an_error(tmp_path, name, edit, key,
                                                              yaml_value, ckpt_value):
    run = copy_run(name, tmp_path / "run")
    _edit_config(run, edit)
    with pytest.raises(DataError) as info:
        load(run)
    msg = str(info.value)
    assert f"{key}: {yaml_value} in config.yaml, {ckpt_value} in the checkpoint" in msg
    assert str(run / "config.yaml") in msg and "final.ckpt" in msg
    assert "belongs to another run" in msg and "strict=False" in msg
    imp = load(run, strict=False)  # the checkpoint's values win, with a note
    assert any(key in n and "checkpoint's values used" in n for n in imp.notes)
    assert imp.config == load(name).config
    assert imp.data_kwargs == load(name).data_kwargs


def test_config_yaml_may_differ_where_arc_state_itself_differs(tmp_path):
    """n_positions (arc-state adds extra_tokens) and keys without effect may differ; config.yaml
    fills in backbone settings the checkpoint lacks."""
    run = copy_run("model_a_llama_bidir", tmp_path / "run")

    def edit(c):
        _tb(c)["n_positions"] = 99
        c["model"]["kwargs"]["softplus"] = False

    _edit_config(run, edit)
    edit_checkpoint(run, lambda ck: ck["hyper_parameters"]["transformer_backbone_kwargs"].pop(
        "num_attention_heads"))
    imp = load(run)
    assert imp.config.n_heads == 4


@pytest.mark.parametrize("key,prefix", [("use_batch_token", "batch_token"),
                                        ("confidence_token", "confidence_token.")])
def test_token_flags_without_token_weights_are_errors(tmp_path, key, prefix):
    run = copy_run("model_a_llama_bidir", tmp_path / "run")
    edit_checkpoint(run, lambda ck: ck["hyper_parameters"].__setitem__(key, True))
    (run / "config.yaml").unlink()
    with pytest.raises(DataError, match=rf"{key} \({re.escape(prefix)}\* weights present\): the "
                                        rf"weights say False but hyper_parameters\['{key}'\] "
                                        "says True"):
        load(run)
    imp = load(run, strict=False)
    assert any(key in n for n in imp.notes)


def test_unknown_versions_and_keys_are_said(tmp_path):
    run = copy_run("model_a_llama_bidir", tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the known fixture: no such warning
        assert load_arc_run(run).provenance["unknown_to_importer"] == []

    def edit(ck):
        ck["pytorch-lightning_version"] = "3.1.0"
        ck["hyper_parameters"]["fancy_new_head"] = True
        ck["hyper_parameters"]["transformer_backbone_kwargs"]["fancy_kwarg"] = 1

    edit_checkpoint(run, edit)
    with pytest.warns(UserWarning, match=r"does not know \(pytorch-lightning_version 3\.1\.0, "
                                         r"hyper_parameters\['fancy_new_head'\], "
                                         r"transformer_backbone_kwargs\['fancy_kwarg'\]"):
        imp = load_arc_run(run)
    assert imp.provenance["unknown_to_importer"] == [
        "pytorch-lightning_version 3.1.0", "hyper_parameters['fancy_new_head']",
        "transformer_backbone_kwargs['fancy_kwarg']"]
    assert any("does not know" in n for n in imp.notes)


class _System:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_refused_global_is_named_without_weights_only_advice(tmp_path):
    run = copy_run("model_a_llama_bidir", tmp_path / "run")
    marker = tmp_path / "pwned"
    torch.save({"P0": _System(str(marker))}, run / "pert_onehot_map.pt")
    with pytest.raises(DataError, match="trust_pickle=True") as info:
        load_arc_run(run)
    msg = str(info.value)
    assert f"{os.system.__module__}.system" in msg and "weights_only" not in msg
    assert "safe_globals" not in msg
    assert not marker.exists()


def test_damaged_pickle_inside_a_valid_zip_gives_no_weights_only_advice(tmp_path):
    """data.pkl rewritten with a correct CRC but broken opcodes: reported as damaged, without
    torch's advice to re-run with weights_only=False."""
    import zipfile

    run = copy_run("model_a_llama_bidir", tmp_path / "run")
    path = run / "pert_onehot_map.pt"
    with zipfile.ZipFile(path) as zf:
        entries = [(i.filename, zf.read(i)) for i in zf.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries:
            if name.endswith("data.pkl"):
                data = data[:2] + b"\0" * 8 + data[10:]
            zf.writestr(name, data)
    with pytest.raises(DataError, match=r"pert_onehot_map\.pt .*damaged or truncated") as info:
        load_arc_run(run)
    assert "weights_only" not in str(info.value) and "trust" not in str(info.value)


def test_invalid_config_yaml_is_a_data_error_naming_the_line(tmp_path, capsys):
    from statetx.cli import main

    run = copy_run("model_a_llama_bidir", tmp_path / "run")
    lines = (run / "config.yaml").read_text().splitlines()
    lines[4] = "    output_space: [gene"  # line 5: an unclosed flow sequence
    (run / "config.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"config\.yaml is not valid YAML at line 6, column 17 "
                                        r"\(.*flow sequence that starts at line 5\)"):
        load_arc_run(run)
    assert main(["import-arc", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "config.yaml is not valid YAML at line" in err and "Traceback" not in err


def test_missing_cell_type_map_is_explained(tmp_path, capsys):
    run = copy_run("model_a_llama_bidir", tmp_path / "run")
    (run / "cell_type_onehot_map.torch").unlink()
    imp = load(run)
    assert imp.cell_types == []
    assert any("cell types are unknown" in n and "changes no prediction" in n for n in imp.notes)
    import anndata as ad

    from statetx import StateTransitionModel

    model = StateTransitionModel.from_arc_state(run, verbose=False)
    inp = ad.read_h5ad(ARC / "infer" / "infer_input.h5ad")
    full = StateTransitionModel.from_arc_state(copy_run("model_a_llama_bidir", tmp_path / "r2"),
                                               verbose=False)
    np.testing.assert_array_equal(model.predict(inp, seed=0).X, full.predict(inp, seed=0).X)
    assert "not in the model's data" not in capsys.readouterr().out  # (nothing to compare with)
