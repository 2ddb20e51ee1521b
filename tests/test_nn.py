"""Tests of the ST network (statetx.nn): shapes, attention semantics, masking, naming, config."""

from __future__ import annotations

import json

import pytest
import torch

from statetx.errors import ConfigError, DataError
from statetx.losses import energy_distance
from statetx.nn import (
    MLP,
    Dropout,
    NetworkConfig,
    RMSNorm,
    StateTransitionNetwork,
    math_attention,
)


def small_config(**kw: object) -> NetworkConfig:
    d = dict(
        input_dim=12, output_dim=12, pert_dim=5, hidden_dim=32, n_encoder_layers=2,
        n_decoder_layers=2, dropout=0.1, activation="gelu", use_basal_projection=True,
        backbone="llama", n_layers=2, n_heads=4, head_dim=8, n_kv_heads=4, intermediate_size=64,
        attention="bidirectional", rope=None, norm_eps=1e-6, predict_residual=True,
        residual_space="hidden",
        output_space="gene", output_activation="relu", batch_encoder=False, batch_dim=0,
        gene_dim=0, decoder_hidden_dims=[16, 16], decoder_dropout=0.1, residual_decoder=False,
        confidence_token=False,
    )
    if kw.get("backbone") == "gpt2":
        d.update(norm_eps=1e-5, intermediate_size=128)
    d.update(kw)
    return NetworkConfig(**d)


def make(seed: int = 0, **kw: object) -> StateTransitionNetwork:
    torch.manual_seed(seed)
    return StateTransitionNetwork(small_config(**kw)).eval()


def inputs(b: int = 2, s: int = 7, d_in: int = 12, p: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    basal = torch.rand(b, s, d_in, generator=g) * 3
    pert = torch.zeros(b, s, p)
    pert[:, :, 1] = 1.0
    return basal, pert


# ---------------------------------------------------------------------------------------------
# shapes and variants


@pytest.mark.parametrize("space", ["gene", "all", "embedding"])
def test_forward_shapes_per_output_space(space):
    act = "none" if space == "embedding" else "relu"
    net = make(output_space=space, output_activation=act, output_dim=12)
    basal, pert = inputs()
    out = net(basal, pert)
    assert out.pred.shape == (2, 7, 12)
    assert out.counts is None and out.confidence is None
    assert (net.final_down_then_up is not None) == (space == "all")
    if act == "relu":
        assert out.pred.min() >= 0
    else:
        assert (out.pred < 0).any()


def test_output_space_all_head_math():
    net = make(output_space="all")
    basal, pert = inputs()
    with torch.no_grad():
        e_b = net.basal_encoder(basal)
        r = net.transformer_backbone(net.pert_encoder(pert) + e_b, None, False, None)
        expect = torch.relu(net.final_down_then_up(net.project_out(r) + basal))
        assert torch.allclose(net(basal, pert).pred, expect, atol=1e-6)


def test_embedding_output_dim_differs_from_input():
    net = make(output_space="embedding", output_dim=9, output_activation="none")
    assert net(*inputs()).pred.shape == (2, 7, 9)


def test_no_residual_head():
    net = make(predict_residual=False, output_activation="none")
    basal, pert = inputs()
    with torch.no_grad():
        r = net.transformer_backbone(net.pert_encoder(pert) + net.basal_encoder(basal), None,
                                     False, None)
        assert torch.allclose(net(basal, pert).pred, net.project_out(r), atol=1e-6)


@pytest.mark.parametrize("residual", [False, True])
def test_gene_decoder(residual):
    net = make(gene_dim=20, residual_decoder=residual)
    out = net(*inputs())
    assert out.counts.shape == (2, 7, 20)
    assert out.counts.min() >= 0  # final ReLU
    names = [k for k in net.state_dict() if k.startswith("gene_decoder")]
    if residual:
        assert "gene_decoder.blocks.1.1.weight" in names
        assert "gene_decoder.final_layer.0.weight" in names
    else:
        assert {"gene_decoder.decoder.0.weight", "gene_decoder.decoder.1.weight",
                "gene_decoder.decoder.4.weight", "gene_decoder.decoder.5.bias",
                "gene_decoder.decoder.8.weight"} <= set(names)


def test_confidence_token():
    net = make(confidence_token=True)
    out = net(*inputs(b=3))
    assert out.confidence.shape == (3,)
    keys = set(net.state_dict())
    assert "confidence_token.confidence_token" in keys
    for i in (0, 1, 4, 5, 8):
        assert f"confidence_token.confidence_projection.{i}.weight" in keys


def test_batch_encoder():
    net = make(batch_encoder=True, batch_dim=3)
    basal, pert = inputs()
    idx = torch.tensor([[0, 1, 2, 0, 1, 2, 0], [2, 2, 2, 1, 1, 1, 0]])
    out = net(basal, pert, batch_index=idx)
    assert out.pred.shape == (2, 7, 12)
    assert not torch.allclose(out.pred, net(basal, pert, batch_index=torch.zeros_like(idx)).pred)
    assert net.state_dict()["batch_encoder.weight"].shape == (3, 32)
    with pytest.raises(DataError, match="batch_index"):
        net(basal, pert)


def test_batch_mean_row_averages_the_trained_batches_only():
    net = make(batch_encoder=True, batch_dim=3)
    basal, pert = inputs()
    mean, row = torch.full((2, 7), -1), torch.zeros(2, 7, dtype=torch.long)
    keys = set(net.state_dict())
    net.trained_batches = torch.tensor([0, 2])  # (row 1: a batch without training cells)
    assert set(net.state_dict()) == keys  # not a weight: checkpoints are unchanged
    ref = make(batch_encoder=True, batch_dim=3)
    with torch.no_grad():
        ref.batch_encoder.weight[0] = net.batch_encoder.weight[[0, 2]].mean(0)
    torch.testing.assert_close(net(basal, pert, batch_index=mean).pred,
                               ref(basal, pert, batch_index=row).pred)
    # evaluation (validation in fit included) reads an untrained row as the trained mean
    torch.testing.assert_close(net(basal, pert, batch_index=torch.ones_like(row)).pred,
                               ref(basal, pert, batch_index=row).pred)
    with torch.no_grad():  # None: the mean of every row (the old behaviour)
        ref.batch_encoder.weight[0] = net.batch_encoder.weight.mean(0)
    net.trained_batches = None
    torch.testing.assert_close(net(basal, pert, batch_index=mean).pred,
                               ref(basal, pert, batch_index=row).pred)
    # (the case tells the two rules apart: the untrained row moves the mean of every row)
    table = net.batch_encoder.weight
    assert not torch.allclose(table.mean(0), table[[0, 2]].mean(0))
    ref.load_state_dict(net.state_dict())  # (strict: the same keys)


def test_bad_input_widths():
    net = make()
    basal, pert = inputs()
    with pytest.raises(DataError, match="input_dim"):
        net(basal[..., :5], pert)
    with pytest.raises(DataError, match="forward_flat"):
        net(basal[0], pert[0])


def test_gpt2_forward_and_names():
    net = make(backbone="gpt2")
    assert net(*inputs()).pred.shape == (2, 7, 12)
    sd = net.state_dict()
    assert sd["transformer_backbone.h.0.attn.c_attn.weight"].shape == (96, 32)
    assert sd["transformer_backbone.h.1.mlp.c_fc.weight"].shape == (128, 32)
    assert "transformer_backbone.ln_f.bias" in sd
    assert not any("wte" in k or "wpe" in k for k in sd)


def test_llama_names_and_no_tables():
    sd = make().state_dict()
    for k in ("pert_encoder.0.weight", "pert_encoder.3.bias", "basal_encoder.3.weight",
              "transformer_backbone.layers.1.self_attn.o_proj.weight",
              "transformer_backbone.layers.0.mlp.gate_proj.weight",
              "transformer_backbone.layers.0.input_layernorm.weight",
              "transformer_backbone.layers.0.post_attention_layernorm.weight",
              "transformer_backbone.norm.weight", "project_out.3.weight"):
        assert k in sd, k
    assert not any("embed_tokens" in k or k.endswith("q_proj.bias") for k in sd)
    sd_lin = make(use_basal_projection=False).state_dict()
    assert "basal_encoder.weight" in sd_lin and "basal_encoder.0.weight" not in sd_lin


def test_mlp_layout():
    m = MLP(3, 5, 7, 4, 0.1, "gelu")
    assert [type(x).__name__ for x in m][:3] == ["Linear", "GELU", "Dropout"]
    assert [i for i, x in enumerate(m) if isinstance(x, torch.nn.Linear)] == [0, 3, 6, 9]
    assert len(m) == 10
    one = MLP(3, 5, 7, 1, 0.1, "relu")
    assert list(one.state_dict()) == ["0.weight", "0.bias"]
    assert isinstance(MLP(3, 5, 7, 2, 0.0, "silu")[1], torch.nn.SiLU)
    n = 4
    assert sum(p.numel() for p in m.parameters()) == (3 * 7 + 7) + (n - 2) * (49 + 7) + (7 * 5 + 5)


def test_backbone_init():
    net = make(seed=3, n_layers=4)
    w = net.transformer_backbone.layers[0].self_attn.q_proj.weight
    assert abs(w.std().item() - 0.02) < 0.004
    assert torch.all(net.transformer_backbone.norm.weight == 1)
    g = make(seed=3, backbone="gpt2", n_layers=4).transformer_backbone
    std_proj = g.h[0].mlp.c_proj.weight.std().item()
    assert abs(std_proj - 0.02 / (2 * 4) ** 0.5) < 0.002
    assert torch.all(g.h[0].attn.c_attn.bias == 0)


# ---------------------------------------------------------------------------------------------
# attention semantics


@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
def test_permutation_equivariance_bidirectional(backbone):
    net = make(backbone=backbone, confidence_token=False)
    basal, pert = inputs(b=2, s=9)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = net(basal, pert).pred
        out_p = net(basal[:, perm], pert[:, perm]).pred
    inv = torch.argsort(perm)
    assert (out_p[:, inv] - out).abs().max().item() <= 1e-5


@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
def test_causal_first_position_ignores_last(backbone):
    basal, pert = inputs(b=1, s=8)
    basal2 = basal.clone()
    basal2[:, -1] += 2.0
    with torch.no_grad():
        causal = make(backbone=backbone, attention="causal")
        d = (causal(basal, pert).pred - causal(basal2, pert).pred).abs()
        assert d[:, 0].max() == 0 and d[:, -1].max() > 0
        bidir = make(backbone=backbone, attention="bidirectional")
        d = (bidir(basal, pert).pred - bidir(basal2, pert).pred).abs()
        assert d[:, 0].max() > 1e-6


def test_rope_breaks_permutation_equivariance():
    net = make(rope=10000.0)
    basal, pert = inputs(b=1, s=9)
    perm = torch.arange(8, -1, -1)
    with torch.no_grad():
        d = (net(basal[:, perm], pert[:, perm]).pred[:, perm] - net(basal, pert).pred).abs()
    assert d.max() > 1e-5


def test_grouped_query_attention_equals_repeated_heads():
    gqa = make(n_kv_heads=2)
    full = make(n_kv_heads=4)
    sd = gqa.state_dict()
    for i in range(2):
        for name in ("k_proj", "v_proj"):
            key = f"transformer_backbone.layers.{i}.self_attn.{name}.weight"
            sd[key] = sd[key].view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    full.load_state_dict(sd)
    basal, pert = inputs()
    with torch.no_grad():
        assert torch.allclose(gqa(basal, pert).pred, full(basal, pert).pred, atol=1e-6)


VARIANTS = [
    dict(),
    dict(attention="causal"),
    dict(attention="causal", rope=10000.0),
    dict(rope=500.0),
    dict(confidence_token=True),
    dict(confidence_token=True, attention="causal", rope=10000.0),
    dict(backbone="gpt2"),
    dict(backbone="gpt2", attention="causal"),
    dict(batch_encoder=True, batch_dim=2, output_space="all"),
]


@pytest.mark.parametrize("kw", VARIANTS, ids=[str(v) for v in VARIANTS])
def test_valid_mask_equals_running_each_set_alone(kw):
    net = make(**kw)
    b, s = 3, 10
    basal, pert = inputs(b=b, s=s)
    batch = torch.randint(0, 2, (b, s), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, [0, 3, 4, 8, 9]] = False  # non-prefix holes
    with torch.no_grad():
        out = net(basal, pert, batch, valid_mask=mask)
        assert torch.isfinite(out.pred).all()
        assert out.pred[~mask].abs().max() == 0
        for i in range(b):
            m = mask[i]
            alone = net(basal[i:i + 1, m], pert[i:i + 1, m], batch[i:i + 1, m])
            assert (out.pred[i, m] - alone.pred[0]).abs().max().item() <= 1e-5
            if out.confidence is not None:
                assert abs(out.confidence[i] - alone.confidence[0]).item() <= 1e-5


def test_fully_masked_set_is_finite():
    net = make(attention="causal")
    basal, pert = inputs(b=2, s=4)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    with torch.no_grad():
        out = net(basal, pert, valid_mask=mask)
    assert torch.isfinite(out.pred).all()


def test_forward_flat_matches_forward():
    net = make(batch_encoder=True, batch_dim=3, gene_dim=6)
    basal, pert = inputs(b=3, s=4)
    idx = torch.randint(0, 3, (3, 4), generator=torch.Generator().manual_seed(0))
    onehot = torch.nn.functional.one_hot(idx, 3).float()
    with torch.no_grad():
        ref = net(basal, pert, idx)
        flat = net.forward_flat(basal.reshape(12, -1), pert.reshape(12, -1),
                                onehot.reshape(12, 3), set_len=4)
        assert torch.equal(flat.pred, ref.pred.reshape(12, -1))
        assert flat.counts.shape == (12, 6)
        one = net.forward_flat(basal[0], pert[0], idx[0], padded=False)
        assert torch.allclose(one.pred, ref.pred[0], atol=1e-6)
    with pytest.raises(DataError, match="set_len"):
        net.forward_flat(basal.reshape(12, -1), pert.reshape(12, -1), idx.reshape(12), set_len=5)


# ---------------------------------------------------------------------------------------------
# configuration


def test_config_roundtrip_json():
    c = small_config(rope=10000, gene_dim=3)
    d = json.loads(json.dumps(c.to_dict()))
    assert NetworkConfig.from_dict(d) == c
    assert isinstance(c.rope, float)


def test_config_errors_name_the_field():
    d = small_config().to_dict()
    with pytest.raises(ConfigError, match="hiden_dim.*hidden_dim"):
        NetworkConfig.from_dict({**d, "hiden_dim": 3})
    d2 = dict(d)
    del d2["rope"]
    with pytest.raises(ConfigError, match="'rope'"):
        NetworkConfig.from_dict(d2)
    bad = [("activation", "gelu2"), ("attention", "full"), ("backbone", "bert"),
           ("hidden_dim", 0), ("n_layers", True), ("dropout", 1.5), ("rope", -1.0),
           ("output_activation", "softplus"), ("output_space", "genes")]
    for key, value in bad:
        with pytest.raises(ConfigError, match=key):
            small_config(**{key: value})
    with pytest.raises(ConfigError, match="n_kv_heads"):
        small_config(n_kv_heads=3)
    with pytest.raises(ConfigError, match="batch_dim"):
        small_config(batch_encoder=True, batch_dim=0)
    with pytest.raises(ConfigError, match="input_dim"):
        small_config(output_space="all", output_dim=10)
    with pytest.raises(ConfigError, match="head_dim"):
        small_config(backbone="gpt2", head_dim=5)
    with pytest.raises(ConfigError, match="decoder_hidden_dims"):
        small_config(gene_dim=4, residual_decoder=True, decoder_hidden_dims=[16, 8])


def test_num_parameters():
    net = make(gene_dim=4)
    total = sum(p.numel() for p in net.parameters())
    assert net.num_parameters() == total
    net.pert_encoder.requires_grad_(False)
    frozen = sum(p.numel() for p in net.pert_encoder.parameters())
    assert net.num_parameters() == total - frozen
    assert net.num_parameters(trainable_only=False) == total


# ---------------------------------------------------------------------------------------------
# learning


def test_tiny_network_overfits_a_few_sets():
    torch.manual_seed(0)
    net = StateTransitionNetwork(small_config(dropout=0.0, n_layers=1))
    g = torch.Generator().manual_seed(0)
    basal = torch.rand(4, 16, 12, generator=g)
    pert = torch.zeros(4, 16, 5)
    for i in range(4):
        pert[i, :, i] = 1.0
    shift = torch.rand(4, 1, 12, generator=g) * 2
    target = basal * 1.5 + shift
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = energy_distance(net(basal, pert).pred, target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_input_space_residual_starts_as_identity_and_learns_a_change():
    net = make(residual_space="input", output_activation="none", dropout=0.0)
    basal, pert = torch.rand(2, 5, net.config.input_dim), torch.rand(2, 5, net.config.pert_dim)
    torch.testing.assert_close(net(basal, pert).pred, basal)
    with pytest.raises(ConfigError, match="residual_space 'input'"):
        make(residual_space="input", output_dim=net.config.input_dim + 1)


def test_pert_skip_shift_and_mean_affine_math():
    net = make(residual_space="input", output_activation="none", dropout=0.0,
               pert_skip="mean_affine")
    basal, pert = inputs(s=6)
    b = torch.randn(12)
    with torch.no_grad():
        net.pert_bias.weight.zero_()
        net.pert_bias.weight[:, 1] = b  # perturbation 1 (the one-hot in inputs())
        net.pert_mean_scale.weight.zero_()
        net.pert_mean_scale.weight[0, 1] = -0.4
    expect = basal + b - 0.4 * basal.mean(dim=1, keepdim=True)
    torch.testing.assert_close(net(basal, pert).pred, expect)
    # padded positions do not enter the set mean
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    out = net(basal, pert, valid_mask=mask).pred
    first = basal[0, :4] + b - 0.4 * basal[0, :4].mean(0)
    torch.testing.assert_close(out[0, :4], first)
    assert (out[0, 4:] == 0).all()
    # a permutation of the set permutes the output (the skip is a set function)
    perm = torch.randperm(6)
    torch.testing.assert_close(net(basal[:, perm], pert[:, perm]).pred, expect[:, perm])


@pytest.mark.parametrize("kw", [{}, {"residual_space": "input", "pert_skip": "mean_affine",
                                      "output_activation": "none"}])
def test_per_set_perturbation_inputs_equal_per_cell_vectors(kw):
    """[B] one-hot positions and [B,P] vectors give what [B,S,P] per-cell vectors give: in
    evaluation, and in training with the same dropout draws (one per cell) and gradients."""
    net = make(n_encoder_layers=3, **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # pert_skip starts at zero
    basal = inputs(b=3, s=5)[0]
    codes = torch.tensor([1, 4, -1])  # -1: no perturbation (the zero vector)
    per_cell = torch.zeros(3, 5, 5)
    per_cell[0, :, 1] = per_cell[1, :, 4] = 1.0
    vectors = torch.randn(3, 5)
    for train in (False, True):
        net.train(train)
        outs = {}
        forms = [("cells", per_cell), ("codes", codes), ("vectors", vectors),
                 ("vector cells", vectors[:, None].expand(3, 5, 5))]
        for name, pert in forms:
            net.zero_grad()
            torch.manual_seed(3)
            pred = net(basal, pert).pred
            pred.square().sum().backward()
            outs[name] = (pred, [p.grad.clone() for p in net.parameters()])
        for a, b in [("cells", "codes"), ("vector cells", "vectors")]:
            torch.testing.assert_close(outs[a][0], outs[b][0], rtol=1e-5, atol=1e-6)
            for ga, gb in zip(outs[a][1], outs[b][1]):
                torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
        if train:  # dropout draws differ per cell of a set
            enc = net._encode_pert(codes, 5)
            assert enc.shape == (3, 5, 32) and not torch.equal(enc[0, 0], enc[0, 1])
        else:
            assert net._encode_pert(codes, 5).shape == (3, 1, 32)  # once per set
    with pytest.raises(DataError, match=r"one-hot pert positions must lie in \[-1, 5\)"):
        net(basal, torch.tensor([0, 5, 1]))
    with pytest.raises(DataError, match="int64"):
        net(basal, codes[:2])


def test_per_set_one_hot_positions_follow_autocast():
    """Under bf16 autocast the looked-up encoding has the dtype a Linear would give, so a
    one-layer pert encoder keeps the residual stream in bf16, as per-cell one-hot input does."""
    net = make(n_encoder_layers=1).train()
    codes = torch.tensor([1, 4, -1])
    per_cell = torch.nn.functional.one_hot(codes.clamp(min=0), 5).float()[:, None].expand(3, 7, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net._encode_pert(codes, 7).dtype == net._encode_pert(per_cell, 7).dtype
        assert net._encode_pert(codes, 7).dtype == torch.bfloat16
    assert net._encode_pert(codes, 7).dtype == torch.float32


def test_pert_skip_needs_input_residual_and_a_known_value():
    with pytest.raises(ConfigError, match="pert_skip 'shift'.*residual_space 'input'"):
        make(pert_skip="shift")
    with pytest.raises(ConfigError, match="pert_skip"):
        make(residual_space="input", pert_skip="affine")
    assert make(residual_space="input", pert_skip="shift").pert_mean_scale is None


def test_cpu_dropout_rate_scale_gradient_and_seed():
    drop = Dropout(0.1)
    x = torch.randn(64, 1000, requires_grad=True)
    torch.manual_seed(3)
    y = drop(x)
    keep = y != 0
    assert abs(keep.float().mean().item() - 0.9) < 0.005  # 64k draws: sd 0.0012
    scale = 65536 / (65536 - round(0.1 * 65536))
    torch.testing.assert_close(y[keep], x.detach()[keep] * scale)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, keep.float() * scale)
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)  # the global seed decides the mask
    assert not torch.equal(drop(x), y)  # and it moves on
    # the mask is uniform over positions (no lane of the packed random words is biased)
    lanes = keep.reshape(-1, 4).float().mean(0)
    assert (lanes - 0.9).abs().max() < 0.01
    drop.eval()
    assert torch.equal(drop(x), x)


def test_cpu_dropout_bf16_and_edge_rates():
    x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    y = Dropout(0.5)(x)
    assert y.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert set(x.grad.unique().tolist()) <= {0.0, 2.0}
    z = torch.randn(8, 8)
    assert torch.equal(Dropout(0.0)(z), z)
    assert not Dropout(1.0)(z).any()


def test_rmsnorm_keeps_input_dtype():
    norm = RMSNorm(16, 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 16)
    ref = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * norm.weight
    torch.testing.assert_close(norm(x), ref)
    xb = x.bfloat16()
    out = norm(xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rmsnorm_hand_written_backward_matches_autograd(dtype):
    """The CPU RMSNorm (hand-written backward) gives the composite formula's output and
    gradients for the input and the weight, in every input dtype and under bf16 autocast."""
    torch.manual_seed(0)
    norm = RMSNorm(24, 1e-6).to(torch.float64 if dtype == torch.float64 else torch.float32)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(3, 5, 24, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    g = torch.randn(3, 5, 24, dtype=torch.float64).to(dtype)

    def reference(x, w):
        x64, w64 = x.double(), w.double()
        return x64 * x64.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt() * w64

    ref_x = x.detach().double().requires_grad_()
    ref_w = norm.weight.detach().double().requires_grad_()
    reference(ref_x, ref_w).backward(g.double())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # normalised in fp32 for every dtype
    for autocast in (False, True):
        x.grad = norm.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = norm(x)
        assert out.dtype == dtype
        out.backward(g)
        torch.testing.assert_close(out.double(), reference(x, norm.weight).detach(),
                                   rtol=tol, atol=tol)
        assert x.grad.dtype == dtype and norm.weight.grad.dtype == norm.weight.dtype
        torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=tol, atol=tol)
        torch.testing.assert_close(norm.weight.grad.double(), ref_w.grad, rtol=tol,
                                   atol=tol * 10)


@pytest.mark.parametrize("masked,causal", [(False, False), (True, False), (False, True)])
def test_math_attention_matches_sdpa(masked, causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = None
    if masked:
        mask = torch.rand(2, 1, 7, 7) > 0.4
        mask |= torch.eye(7, dtype=torch.bool)  # every row keeps itself, as the network's masks
    out = math_attention(q, k, v, mask, causal)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                           is_causal=causal)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_cpu_attention_kernel_choice():
    """Written-out attention on the CPU only where it beats SDPA's fused kernel: under bf16
    products ("medium") up to 256 cells when training, up to 128 in inference; never at full
    fp32 precision."""
    from statetx._utils import matmul_precision_scope
    from statetx.nn import _math_attention_is_faster

    def q(s, grad):
        return torch.zeros(1, 1, s, 4, requires_grad=grad)

    with matmul_precision_scope("highest"):
        assert not _math_attention_is_faster(q(64, True))
        assert not _math_attention_is_faster(q(64, False))
    with matmul_precision_scope("medium"):
        assert _math_attention_is_faster(q(256, True))
        assert not _math_attention_is_faster(q(512, True))
        assert _math_attention_is_faster(q(128, False))
        assert not _math_attention_is_faster(q(256, False))
    bf16 = torch.zeros(1, 1, 512, 4, dtype=torch.bfloat16, requires_grad=True)
    assert _math_attention_is_faster(bf16)


def test_the_option_table_names_every_activation():
    from statetx._options import ARCH_CHOICES
    from statetx.nn import ACTIVATIONS

    assert tuple(ACTIVATIONS) == ARCH_CHOICES["activation"]
