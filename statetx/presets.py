"""Named architecture presets (model.md §9) and their resolution into a NetworkConfig.

A preset is a fully explicit dict of architecture options (the keys of ``ARCH_KEYS``) plus
``cell_set_len``. Data-dependent widths (input/output/perturbation/batch/gene) are added by
``build_network_config``. A bare name is the arc-state 0.9.12 definition that the tutorials
document (``state`` = 696 wide, 12 x 58 heads, 4/4 MLP layers); ``name@0.11.1`` selects the newer
definition (``state@0.11.1`` = 768 wide, 1/1 MLP layers). For presets that did not change between
versions both spellings give the same dict.

``output_activation: "auto"`` means the statetx rule: ``relu`` when the network's direct output is
an expression vector (embed_key None or "X_hvg"), ``none`` for embeddings.
``gene_decoder_bool: false`` means no gene decoder is ever built (``state_sm``); when true, one is
built only if the caller passes ``gene_dim > 0`` (i.e. gene-space targets exist).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from statetx._utils import did_you_mean, unknown_option_message, warn
from statetx.errors import ConfigError
from statetx.netconfig import NetworkConfig

if TYPE_CHECKING:  # pragma: no cover
    from statetx.data import PreparedData
    from statetx.nn import StateTransitionNetwork

ARCH_KEYS = (
    "cell_set_len", "hidden_dim", "n_encoder_layers", "n_decoder_layers", "dropout", "activation",
    "use_basal_projection", "backbone", "n_layers", "n_heads", "head_dim", "n_kv_heads",
    "intermediate_size", "attention", "rope", "norm_eps", "predict_residual", "residual_space",
    "output_activation", "batch_encoder", "gene_decoder_bool", "decoder_hidden_dims",
    "decoder_dropout", "residual_decoder", "confidence_token", "pert_skip",
)

# reference spellings accepted as overrides (arc-state model.kwargs / backbone kwargs)
ALIASES = {
    "transformer_backbone_key": "backbone",
    "num_hidden_layers": "n_layers",
    "n_layer": "n_layers",
    "num_attention_heads": "n_heads",
    "n_head": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "n_inner": "intermediate_size",
    "rms_norm_eps": "norm_eps",
    "layer_norm_epsilon": "norm_eps",
    "confidence_head": "confidence_token",
}


def _llama(**kw: object) -> dict:
    base = {
        "dropout": 0.1, "activation": "gelu", "backbone": "llama", "attention": "bidirectional",
        "rope": None, "norm_eps": 1e-6, "predict_residual": True, "residual_space": "hidden",
        "output_activation": "auto",
        "batch_encoder": False, "gene_decoder_bool": True,
        "decoder_hidden_dims": [1024, 1024, 512], "decoder_dropout": 0.1,
        "residual_decoder": False, "confidence_token": False, "pert_skip": "none",
    }
    base.update(kw)
    return {k: base[k] for k in ARCH_KEYS}


PRESETS: dict[str, dict] = {
    "state": _llama(
        cell_set_len=512, hidden_dim=696, n_encoder_layers=4, n_decoder_layers=4,
        use_basal_projection=True, n_layers=8, n_heads=12, head_dim=58, n_kv_heads=12,
        intermediate_size=2784,
    ),
    "state@0.11.1": _llama(
        cell_set_len=512, hidden_dim=768, n_encoder_layers=1, n_decoder_layers=1,
        use_basal_projection=True, n_layers=8, n_heads=12, head_dim=64, n_kv_heads=12,
        intermediate_size=3072,
    ),
    "state_sm": _llama(
        cell_set_len=128, hidden_dim=672, n_encoder_layers=4, n_decoder_layers=4,
        use_basal_projection=False, n_layers=4, n_heads=8, head_dim=84, n_kv_heads=8,
        intermediate_size=2688, gene_decoder_bool=False,
    ),
    "state_lg": _llama(
        cell_set_len=512, hidden_dim=1488, n_encoder_layers=4, n_decoder_layers=4,
        use_basal_projection=False, n_layers=6, n_heads=12, head_dim=124, n_kv_heads=12,
        intermediate_size=5952,
    ),
    "tahoe_best": _llama(
        cell_set_len=512, hidden_dim=1440, n_encoder_layers=4, n_decoder_layers=4,
        use_basal_projection=True, n_layers=4, n_heads=12, head_dim=120, n_kv_heads=12,
        intermediate_size=4416,
    ),
    "pertsets": _llama(
        cell_set_len=512, hidden_dim=328, n_encoder_layers=4, n_decoder_layers=4,
        use_basal_projection=False, backbone="gpt2", n_layers=8, n_heads=8, head_dim=41,
        n_kv_heads=8, intermediate_size=1312, norm_eps=1e-5,
    ),
    "tiny": _llama(
        cell_set_len=64, hidden_dim=128, n_encoder_layers=4, n_decoder_layers=4,
        use_basal_projection=False, n_layers=4, n_heads=4, head_dim=32, n_kv_heads=4,
        intermediate_size=512, gene_decoder_bool=False,
    ),
    # statetx's default for data of up to ~100k cells (preset="auto"): tiny's dimensions, the head
    # predicts the change of the basal cell in input space on top of a per-perturbation skip that
    # starts at the training contexts' mean response, no dropout (chosen on validation folds,
    # benchmarks/quality/README.md)
    "small": _llama(
        cell_set_len=64, hidden_dim=128, n_encoder_layers=4, n_decoder_layers=4,
        use_basal_projection=False, n_layers=4, n_heads=4, head_dim=32, n_kv_heads=4,
        intermediate_size=512, gene_decoder_bool=False, residual_space="input", dropout=0.0,
        pert_skip="mean_affine",
    ),
}
PRESETS["tahoe_llama_62089464"] = copy.deepcopy(PRESETS["state"])
PRESETS["tahoe_llama_212693232"] = copy.deepcopy(PRESETS["state_lg"])

# "@<version>" spellings: 0.9.12 is the bare definition; only `state` changed in 0.11.1
VERSIONS = ("0.9.12", "0.11.1")


def list_presets() -> list[str]:
    """Names accepted by ``resolve_architecture`` (besides ``name@0.9.12`` / ``name@0.11.1``)."""
    return list(PRESETS)


def _lookup(preset: str) -> dict:
    if preset in PRESETS:
        return copy.deepcopy(PRESETS[preset])
    name, _, version = str(preset).partition("@")
    if version and version in VERSIONS and name in PRESETS and "@" not in name:
        key = f"{name}@{version}"
        return copy.deepcopy(PRESETS[key] if key in PRESETS else PRESETS[name])
    if version and name in PRESETS:
        raise ConfigError(
            f"unknown preset version {version!r} in {preset!r}; known versions: "
            f"{', '.join(VERSIONS)}."
        )
    raise ConfigError(
        f"unknown preset {preset!r}.{did_you_mean(str(preset), PRESETS)} "
        f"Available presets: {', '.join(PRESETS)}."
    )


def resolve_architecture(preset: str, overrides: dict | None = None) -> dict:
    """The preset's architecture dict with ``overrides`` applied and validated.

    Overriding ``hidden_dim`` on a Llama preset keeps its heads, head width and FFN width (as the
    reference does) and warns when H*d != h or the FFN/h ratio changes; on a GPT-2 preset the head
    width becomes h / n_heads and the FFN width 4h unless given. Overriding ``n_heads`` alone keeps
    n_kv_heads = n_heads (no grouped-query attention), and on GPT-2 (whose own configuration
    derives the head width, n_embd / n_head) sets head_dim = h / n_heads: an error when n_heads
    does not divide h. ``bidirectional_attention``
    (0.11.1 flag) maps to attention/rope: true -> bidirectional, no rope; false -> causal, rope
    10000. ``use_batch_token: true`` is rejected (not supported).
    """
    arch = _lookup(preset)
    base = copy.deepcopy(arch)
    ov = dict(overrides or {})
    bidir = ov.pop("bidirectional_attention", None)
    if ov.pop("use_batch_token", False):
        raise ConfigError(
            "use_batch_token=true (arc-state 0.11.1 batch token) is not supported by statetx; "
            "remove it (use batch_encoder=true for a batch embedding)."
        )
    for k in list(ov):
        if k in ALIASES:
            canon = ALIASES[k]
            if canon in ov and ov[canon] != ov[k]:
                raise ConfigError(f"{k}={ov[k]!r} contradicts {canon}={ov[canon]!r}; give one.")
            ov[canon] = ov.pop(k)
    unknown = [k for k in ov if k not in ARCH_KEYS]
    if unknown:
        raise ConfigError(unknown_option_message("architecture option", unknown[0], ARCH_KEYS,
                                                 [*ARCH_KEYS, *ALIASES]))
    if isinstance(ov.get("backbone"), str):
        ov["backbone"] = ov["backbone"].lower()
    if bidir is not None:
        flag_att, flag_rope = ("bidirectional", None) if bidir else ("causal", 10000.0)
        if "attention" in ov and ov["attention"] != flag_att:
            raise ConfigError(
                f"bidirectional_attention={bidir} contradicts attention={ov['attention']!r}; "
                "give only attention (and rope)."
            )
        ov.setdefault("attention", flag_att)
        ov.setdefault("rope", flag_rope)
    arch.update(ov)
    if "n_heads" in ov and "n_kv_heads" not in ov and base["n_kv_heads"] == base["n_heads"]:
        arch["n_kv_heads"] = arch["n_heads"]  # presets have K = H; keep it so

    h, n_heads = arch["hidden_dim"], arch["n_heads"]
    new_width = "hidden_dim" in ov and ov["hidden_dim"] != base["hidden_dim"]
    if (arch["backbone"] == "gpt2" and "head_dim" not in ov and (new_width or "n_heads" in ov)
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                    for x in (h, n_heads))):
        if h % n_heads:
            fits = [k for k in range(1, min(h, 64) + 1) if h % k == 0]
            raise ConfigError(
                f"n_heads={n_heads} does not divide hidden_dim={h}: the gpt2 backbone's heads "
                f"are hidden_dim / n_heads wide (GPT-2's n_embd / n_head); choose n_heads among "
                f"{', '.join(map(str, fits))} (or change hidden_dim).")
        arch["head_dim"] = h // n_heads
    if new_width:
        if arch["backbone"] == "gpt2":
            if "intermediate_size" not in ov and isinstance(h, int):
                arch["intermediate_size"] = 4 * h
        else:
            attn_width = arch["n_heads"] * arch["head_dim"]
            ratio_old = base["intermediate_size"] / base["hidden_dim"]
            ratio_new = arch["intermediate_size"] / h if isinstance(h, int) and h > 0 else 0
            chosen = {"n_heads", "head_dim", "intermediate_size"} <= set(ov)
            if not chosen and (attn_width != h or abs(ratio_old - ratio_new) > 1e-9):
                warn(
                    f"hidden_dim={h} overrides preset {preset!r} (hidden_dim "
                    f"{base['hidden_dim']}) but keeps n_heads={arch['n_heads']}, "
                    f"head_dim={arch['head_dim']} (attention width {attn_width}) and "
                    f"intermediate_size={arch['intermediate_size']} (ratio {ratio_new:.3g} instead "
                    f"of {ratio_old:.3g}); set n_heads/head_dim/intermediate_size to change them.",
                    UserWarning,
                )
    _validate(arch)
    return arch


def _validate(arch: dict) -> None:
    s = arch["cell_set_len"]
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
        raise ConfigError(f"cell_set_len must be an integer >= 1, got {s!r}.")
    if not isinstance(arch["gene_decoder_bool"], bool):
        raise ConfigError(f"gene_decoder_bool must be true or false, got "
                          f"{arch['gene_decoder_bool']!r}.")
    if arch["output_activation"] not in ("auto", "relu", "none", None):
        raise ConfigError(f"output_activation must be 'auto', 'relu' or 'none', got "
                          f"{arch['output_activation']!r}.")
    # the network-level checks, with placeholder data widths
    build_network_config(arch, input_dim=8, output_dim=8, pert_dim=1,
                         batch_dim=1 if arch["batch_encoder"] is True else 0)


def default_output_activation(embed_key: str | None) -> str:
    """statetx rule: relu for expression outputs (embed_key None / X_hvg), none for embeddings."""
    return "relu" if embed_key in (None, "X_hvg") else "none"


def network_config_for(arch: dict, prepared: PreparedData) -> NetworkConfig:
    """:func:`build_network_config` with the widths of prepared training data
    (:class:`statetx.data.PreparedData`: input and gene widths, vocabulary, output space)."""
    vocab = prepared.vocab
    return build_network_config(
        arch, input_dim=prepared.input_dim, output_dim=prepared.input_dim,
        pert_dim=vocab.pert_dim, batch_dim=len(vocab.batches) if arch["batch_encoder"] else 0,
        gene_dim=prepared.gene_dim, output_space=prepared.columns.output_space,
        embed_key=prepared.columns.embed_key)


def build_network_config(arch: dict, *, input_dim: int, output_dim: int, pert_dim: int,
                         batch_dim: int = 0, gene_dim: int = 0, output_space: str = "gene",
                         embed_key: str | None = None) -> NetworkConfig:
    """Combine an architecture dict with the data widths into a NetworkConfig.

    ``gene_dim > 0`` requests a gene decoder (pass it only when gene-space targets exist); it is
    dropped when the architecture says ``gene_decoder_bool: false``.
    """
    missing = [k for k in ARCH_KEYS if k not in arch]
    if missing:
        raise ConfigError(f"architecture is missing {', '.join(repr(k) for k in missing)}; "
                          "start from statetx.presets.resolve_architecture(<preset>).")
    out_act = arch["output_activation"]
    if out_act in (None, "auto"):
        out_act = default_output_activation(embed_key)
    return NetworkConfig(
        input_dim=input_dim, output_dim=output_dim, pert_dim=pert_dim,
        hidden_dim=arch["hidden_dim"], n_encoder_layers=arch["n_encoder_layers"],
        n_decoder_layers=arch["n_decoder_layers"], dropout=arch["dropout"],
        activation=arch["activation"], use_basal_projection=arch["use_basal_projection"],
        backbone=arch["backbone"], n_layers=arch["n_layers"], n_heads=arch["n_heads"],
        head_dim=arch["head_dim"], n_kv_heads=arch["n_kv_heads"],
        intermediate_size=arch["intermediate_size"], attention=arch["attention"],
        rope=arch["rope"], norm_eps=arch["norm_eps"], predict_residual=arch["predict_residual"],
        residual_space=arch["residual_space"],
        output_space=output_space, output_activation=out_act,
        batch_encoder=arch["batch_encoder"], batch_dim=batch_dim,
        gene_dim=gene_dim if arch["gene_decoder_bool"] else 0,
        decoder_hidden_dims=list(arch["decoder_hidden_dims"]),
        decoder_dropout=arch["decoder_dropout"], residual_decoder=arch["residual_decoder"],
        confidence_token=arch["confidence_token"], pert_skip=arch["pert_skip"],
    )


def count_parameters(config: NetworkConfig) -> tuple[int, int]:
    """(trainable parameters, backbone parameters), computed without allocating weights."""
    import torch

    from statetx.nn import StateTransitionNetwork

    with torch.device("meta"):
        net = StateTransitionNetwork(config)
    return net.num_parameters(), net.backbone_parameters()


def describe(config: NetworkConfig, network: StateTransitionNetwork | None = None) -> str:
    """One-paragraph summary of a network configuration (printed at training start); its
    parameter counts from ``network`` when built (else from a weightless copy: the first one
    costs ~1 s of PyTorch's meta-device set-up)."""
    c = config
    total, backbone = (count_parameters(c) if network is None else
                       (network.num_parameters(), network.backbone_parameters()))
    attn_width = c.n_heads * c.head_dim
    kv = f", {c.n_kv_heads} kv heads" if c.n_kv_heads != c.n_heads else ""
    ffn = "SwiGLU" if c.backbone == "llama" else "GELU-tanh"
    basal = (f"{c.n_encoder_layers}-layer MLP" if c.use_basal_projection else "Linear")
    if not c.predict_residual:
        head = "no residual"
    elif c.residual_space == "input":
        head = "change of the basal cell in input space" + {
            "none": "", "shift": " + per-perturbation shift",
            "mean_affine": " + per-perturbation shift and set-mean scale"}[c.pert_skip]
    elif c.output_space == "all":
        head = "residual on the basal cell + D/8 bottleneck"
    else:
        head = "residual in hidden space"
    dec = (f"gene decoder {c.output_dim}->{c.decoder_hidden_dims}->{c.gene_dim}"
           + (" (residual)" if c.residual_decoder else "")) if c.gene_dim else "no gene decoder"
    rope = "none" if c.rope is None else f"rotary theta={c.rope:g}"
    return (
        f"State Transition network: {c.backbone} backbone, {c.n_layers} blocks, h={c.hidden_dim}, "
        f"{c.n_heads} heads x {c.head_dim} (attention width {attn_width}{kv}), {ffn} FFN "
        f"{c.intermediate_size}, norm eps {c.norm_eps:g}; attention {c.attention}, positions "
        f"{rope}. Inputs: pert {c.pert_dim} ({c.n_encoder_layers}-layer MLP), basal "
        f"{c.input_dim} ({basal})"
        + (f", batch embedding {c.batch_dim}x{c.hidden_dim}" if c.batch_encoder else "")
        + f". Output: {c.n_decoder_layers}-layer MLP -> {c.output_dim} ({c.output_space}, {head}, "
        f"output activation {c.output_activation}); {dec}"
        + ("; confidence token" if c.confidence_token else "")
        + f"; activation {c.activation}, dropout {c.dropout:g}. Parameters: {total:,} trainable "
        f"(backbone {backbone:,})."
    )
