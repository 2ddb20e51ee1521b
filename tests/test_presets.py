"""Tests of the presets: exact dimensions / parameter counts of model.md §9 and resolution rules."""

from __future__ import annotations

import warnings

import pytest

from statetx.errors import ConfigError
from statetx.presets import (
    ARCH_KEYS,
    PRESETS,
    build_network_config,
    count_parameters,
    describe,
    list_presets,
    resolve_architecture,
)

DECODER = 4_654_544  # gene decoder 2000 -> [1024, 1024, 512] -> 2000

# preset: (backbone params, total trainable incl. decoder where built, decoder built, S, h)
TABLE = {
    "state": (62_017_080, 73_894_624, True, 512, 696),
    "state@0.11.1": (75_510_528, 83_317_408, True, 512, 768),
    "state_sm": (28_907_424, 34_379_504, False, 128, 672),
    "state_lg": (212_577_168, 236_631_280, True, 512, 1488),
    "tahoe_best": (109_499_040, 138_737_824, True, 512, 1440),
    "pertsets": (10_362_832, 17_012_304, True, 512, 328),
    "tahoe_llama_62089464": (62_017_080, 73_894_624, True, 512, 696),
    "tahoe_llama_212693232": (212_577_168, 236_631_280, True, 512, 1488),
}


@pytest.mark.parametrize("name", list(TABLE))
def test_parameter_counts_match_spec_table(name):
    backbone, total, has_decoder, s, h = TABLE[name]
    arch = resolve_architecture(name)
    assert arch["cell_set_len"] == s and arch["hidden_dim"] == h
    # statetx builds no dead decoder (X_hvg, gene space): subtract it
    c = build_network_config(arch, input_dim=2000, output_dim=2000, pert_dim=100,
                             embed_key="X_hvg")
    n, nb = count_parameters(c)
    assert nb == backbone
    assert n == total - (DECODER if has_decoder else 0)
    # with gene-space targets the decoder is built where the preset has one
    c2 = build_network_config(arch, input_dim=2000, output_dim=2000, pert_dim=100,
                              gene_dim=2000, embed_key="X_state")
    assert count_parameters(c2)[0] == total
    assert c2.gene_dim == (2000 if has_decoder else 0)


def test_tiny_preset_matches_reference_count():
    arch = resolve_architecture("tiny")
    assert arch["cell_set_len"] == 64
    assert (arch["hidden_dim"], arch["intermediate_size"], arch["n_heads"], arch["head_dim"],
            arch["n_layers"]) == (128, 512, 4, 32, 4)
    c = build_network_config(arch, input_dim=2000, output_dim=2000, pert_dim=21)
    assert count_parameters(c)[0] == 1_665_744
    sm = build_network_config(resolve_architecture("state_sm", {"cell_set_len": 64}),
                              input_dim=2000, output_dim=2000, pert_dim=21)
    assert count_parameters(sm)[0] == 34_326_416


def test_presets_fully_explicit_and_defaults():
    assert set(list_presets()) >= {"state", "state@0.11.1", "state_sm", "state_lg",
                                   "tahoe_best", "pertsets", "tiny"}
    for name, p in PRESETS.items():
        assert tuple(p) == ARCH_KEYS, name
        assert p["attention"] == "bidirectional" and p["rope"] is None, name
        assert p["dropout"] == (0.0 if name == "small" else 0.1), name
        assert p["activation"] == "gelu" and p["predict_residual"]
        assert p["residual_space"] == ("input" if name == "small" else "hidden"), name
        assert p["batch_encoder"] is False and p["confidence_token"] is False
        assert isinstance(p["use_basal_projection"], bool)
    assert PRESETS["pertsets"]["backbone"] == "gpt2" and PRESETS["pertsets"]["norm_eps"] == 1e-5
    assert PRESETS["state"]["use_basal_projection"] is True
    assert PRESETS["state_sm"]["use_basal_projection"] is False


def test_version_suffixes():
    assert resolve_architecture("state@0.9.12") == resolve_architecture("state")
    assert resolve_architecture("state_sm@0.11.1") == resolve_architecture("state_sm")
    assert resolve_architecture("state@0.11.1")["hidden_dim"] == 768
    with pytest.raises(ConfigError, match="version"):
        resolve_architecture("state@0.10")


def test_unknown_preset_and_key_suggest():
    with pytest.raises(ConfigError, match="state_sm"):
        resolve_architecture("state_smm")
    with pytest.raises(ConfigError, match="hidden_dim"):
        resolve_architecture("tiny", {"hiden_dim": 64})


def test_hidden_dim_override_keeps_heads_and_warns():
    with pytest.warns(UserWarning, match="n_heads=12"):
        a = resolve_architecture("state", {"hidden_dim": 128})
    assert (a["hidden_dim"], a["n_heads"], a["head_dim"], a["intermediate_size"]) == (
        128, 12, 58, 2784)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = resolve_architecture("tiny", {"hidden_dim": 256, "head_dim": 64,
                                           "intermediate_size": 1024})
    assert ok["hidden_dim"] == 256
    g = resolve_architecture("pertsets", {"hidden_dim": 32, "n_head": 4})
    assert (g["head_dim"], g["intermediate_size"], g["n_heads"]) == (8, 128, 4)


def test_gpt2_n_heads_override_derives_head_width():
    """GPT-2 derives its head width (n_embd / n_head): overriding only n_heads on pertsets (328
    wide, 8 x 41) keeps the width and splits it, instead of keeping Llama's head width."""
    g = resolve_architecture("pertsets", {"n_head": 4})
    assert (g["hidden_dim"], g["n_heads"], g["head_dim"], g["n_kv_heads"]) == (328, 4, 82, 4)
    assert g["intermediate_size"] == PRESETS["pertsets"]["intermediate_size"]
    assert resolve_architecture("pertsets", {"num_attention_heads": 2})["head_dim"] == 164
    with pytest.raises(ConfigError, match=r"n_heads=3 does not divide hidden_dim=328.*"
                                          r"1, 2, 4, 8, 41"):
        resolve_architecture("pertsets", {"n_head": 3})
    # an explicit head_dim is kept (and checked by the network)
    with pytest.raises(ConfigError, match="n_heads \\* head_dim == hidden_dim"):
        resolve_architecture("pertsets", {"n_head": 4, "head_dim": 41})
    # Llama presets keep their head width (attention width H*d may differ from h)
    a = resolve_architecture("tiny", {"n_heads": 8})
    assert (a["n_heads"], a["head_dim"]) == (8, 32)


def test_bidirectional_flag_and_aliases():
    a = resolve_architecture("tiny", {"bidirectional_attention": False})
    assert a["attention"] == "causal" and a["rope"] == 10000.0
    b = resolve_architecture("tiny", {"bidirectional_attention": False, "rope": None})
    assert b["attention"] == "causal" and b["rope"] is None
    with pytest.raises(ConfigError, match="contradicts"):
        resolve_architecture("tiny", {"bidirectional_attention": True, "attention": "causal"})
    c = resolve_architecture("tiny", {"num_hidden_layers": 2, "transformer_backbone_key": "GPT2",
                                      "num_attention_heads": 4, "n_inner": 256,
                                      "norm_eps": 1e-5})
    assert (c["n_layers"], c["backbone"], c["intermediate_size"]) == (2, "gpt2", 256)
    with pytest.raises(ConfigError, match="not supported"):
        resolve_architecture("tiny", {"use_batch_token": True})
    with pytest.raises(ConfigError, match="attention"):
        resolve_architecture("tiny", {"attention": "full"})


@pytest.mark.parametrize("embed_key,expected", [(None, "relu"), ("X_hvg", "relu"),
                                                ("X_state", "none"), ("X_uce", "none")])
def test_output_activation_rule(embed_key, expected):
    c = build_network_config(resolve_architecture("tiny"), input_dim=10, output_dim=10,
                             pert_dim=3, embed_key=embed_key)
    assert c.output_activation == expected
    explicit = build_network_config(resolve_architecture("tiny", {"output_activation": "relu"}),
                                    input_dim=10, output_dim=10, pert_dim=3,
                                    embed_key=embed_key)
    assert explicit.output_activation == "relu"


def test_build_network_config_missing_key():
    arch = resolve_architecture("tiny")
    del arch["rope"]
    with pytest.raises(ConfigError, match="rope"):
        build_network_config(arch, input_dim=1, output_dim=1, pert_dim=1)


def test_describe_mentions_the_essentials():
    c = build_network_config(resolve_architecture("state"), input_dim=2000, output_dim=2000,
                             pert_dim=100)
    text = describe(c)
    for s in ("llama", "h=696", "12 heads x 58", "2784", "bidirectional", "positions none",
              "69,240,080", "62,017,080"):
        assert s in text, s
