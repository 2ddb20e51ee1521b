"""Run configuration (cli.md §2): the ``key=value`` language of ``statetx tx train``.

A *run configuration* is the nested dict that ``statetx tx train`` resolves from ``key=value``
overrides (Hydra-style, as arc-state's ``state tx train``) on top of an optional base file and the
defaults: sections ``data.kwargs``, ``training``, ``model`` (``name`` = preset, ``kwargs``),
``wandb`` and the top-level keys ``use_wandb``, ``output_dir``, ``name``, ``overwrite``,
``resume``, ``dry_run``. Every key is honoured, rejected, or warned about as having no effect
(D7); an unknown key is an error with the closest valid keys.

At import time this module loads numpy (through :mod:`statetx._utils`) but neither torch nor
pandas (the CLI's argument errors must be fast); the presets and losses are imported inside the
functions that need them.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from statetx._options import ARCH_CHOICES, BATCH_COLS
from statetx._utils import (
    COMPILE_MODES,
    RESUMABLE_PARAMS,
    SET_LOSS_OPTIONS,
    TRAINING_LOSS_OPTIONS,
    json_default,
    warn,
)
from statetx.errors import ConfigError, SplitConfigError

if TYPE_CHECKING:  # pragma: no cover
    from statetx.model import StateTransitionModel

# ---------------------------------------------------------------------------------------------
# Value parsing
# ---------------------------------------------------------------------------------------------

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)


def parse_value(text: str) -> Any:
    """Parse an override value: bool, None, int, float (incl. ``1e-4``), ``[a,b]`` list, string.

    ``true``/``false`` (any case) → bool; ``null``/``none`` → None; quoted text → the string
    inside the quotes (unparsed); ``[a, b]`` → list with items parsed recursively.
    """
    s = text.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    if s.startswith("[") and s.endswith("]"):
        inner = s[1:-1].strip()
        return [] if not inner else [parse_value(item) for item in _split_items(inner)]
    if _INT.fullmatch(s):
        return int(s)
    if _FLOAT.fullmatch(s):
        return float(s)
    return s


def _split_items(text: str) -> list[str]:
    """Split at top-level commas (brackets and quotes respected)."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [i.strip() for i in items]


# ---------------------------------------------------------------------------------------------
# Key schema
# ---------------------------------------------------------------------------------------------

PRESET = "<preset>"  # default of architecture keys: taken from the preset
PRESET_NAMES = ("state", "state_sm", "state_lg", "tahoe_best", "pertsets", "tahoe_llama_62089464",
                "tahoe_llama_212693232", "tiny", "small")
PRESET_VERSIONS = ("0.9.12", "0.11.1")


@dataclass(frozen=True)
class Key:
    """One configuration key: its type, default and how statetx treats it.

    ``status``: ``ok`` (honoured), ``noeffect`` (accepted, warned about when set), ``default_only``
    (only the default value is supported; anything else is an error), ``reject_true`` (enabling
    it is an error).
    """

    path: str
    default: Any
    kind: str  # int | float | bool | str | list | intlist | any
    choices: tuple = ()
    optional: bool = False
    status: str = "ok"
    note: str = ""


ARCH_TYPES: dict[str, tuple[str, tuple, bool]] = {
    "cell_set_len": ("int", (), False), "hidden_dim": ("int", (), False),
    "n_encoder_layers": ("int", (), False), "n_decoder_layers": ("int", (), False),
    "dropout": ("float", (), False), "activation": ("str", ARCH_CHOICES["activation"], False),
    "use_basal_projection": ("bool", (), False),
    "backbone": ("str", ARCH_CHOICES["backbone"], False),
    "n_layers": ("int", (), False), "n_heads": ("int", (), False),
    "head_dim": ("int", (), False), "n_kv_heads": ("int", (), False),
    "intermediate_size": ("int", (), False),
    "attention": ("str", ARCH_CHOICES["attention"], False), "rope": ("float", (), True),
    "norm_eps": ("float", (), False), "predict_residual": ("bool", (), False),
    "residual_space": ("str", ARCH_CHOICES["residual_space"], False),
    "output_activation": ("str", ("auto", *ARCH_CHOICES["output_activation"]), True),
    "batch_encoder": ("bool", (), False), "gene_decoder_bool": ("bool", (), False),
    "decoder_hidden_dims": ("intlist", (), False), "decoder_dropout": ("float", (), False),
    "residual_decoder": ("bool", (), False), "confidence_token": ("bool", (), False),
    "pert_skip": ("str", ARCH_CHOICES["pert_skip"], False),
}
ARCH_KEYS = tuple(ARCH_TYPES)

_NO_EFFECT = "has no effect in statetx"
_NOT_YET = "is not supported by statetx yet"
_NO_WANDB = ("statetx does not log to Weights & Biases; metrics are written to "
             "<run>/metrics.csv, and to <run>/tensorboard/ when tensorboard is installed")


def _keys() -> dict[str, Key]:
    d = "data.kwargs."
    t = "training."
    m = "model.kwargs."
    b = "model.kwargs.transformer_backbone_kwargs."
    ks = [
        # data.kwargs
        Key(d + "toml_config_path", None, "str", optional=True),
        Key(d + "embed_key", None, "str", optional=True),
        Key(d + "output_space", "all", "str", ARCH_CHOICES["output_space"]),
        Key(d + "pert_col", "gene", "str"),
        Key(d + "cell_type_key", "cell_type", "str"),
        Key(d + "batch_col", "gem_group", "str", optional=True),
        Key(d + "control_pert", None, "str", optional=True),
        Key(d + "num_workers", "auto", "any", status="noeffect",
            note="statetx keeps the training data in memory and uses no loader workers"),
        Key(d + "pin_memory", "auto", "any", status="noeffect",
            note="batches are moved to the device directly"),
        Key(d + "basal_mapping_strategy", "random", "str", ("random", "batch")),
        Key(d + "should_yield_control_cells", True, "bool"),
        Key(d + "barcode", True, "bool", status="noeffect",
            note="barcodes are always kept"),
        Key(d + "perturbation_features_file", None, "str", optional=True),
        Key(d + "downsample", None, "float", optional=True),
        Key(d + "downsample_cells", None, "int", optional=True),
        Key(d + "val_subsample_fraction", 1.0, "float"),
        Key(d + "additional_obs", [], "list"),
        Key(d + "use_consecutive_loading", False, "bool", status="noeffect",
            note="the data are read into memory once, or (data_loading=stream) in contiguous "
            "chunks whatever their order: they need not be sorted by group"),
        Key(d + "cache_perturbation_control_pairs", False, "bool"),
        Key(d + "store_raw_basal", False, "bool", status="default_only"),
        Key(d + "exp_counts", False, "bool", status="default_only"),
        Key(d + "drop_last", False, "bool"),
        Key(d + "random_seed", 42, "int"),
        Key(d + "n_basal_samples", 1, "int", status="noeffect",
            note="every cell gets exactly one control"),
        Key(d + "map_controls", True, "bool", status="noeffect",
            note="every cell gets exactly one control"),
        Key(d + "normalize_counts", False, "bool", status="noeffect"),
        Key(d + "int_counts", None, "any", optional=True, status="noeffect"),
        Key(d + "pert_rep", "onehot", "str", ("onehot",)),
        Key(d + "basal_rep", "sample", "str", ("sample",)),
        Key(d + "counts_key", None, "str", optional=True),
        Key(d + "allow_counts", False, "bool"),
        Key(d + "gene_name_col", None, "str", optional=True),
        Key(d + "on_missing_perturbation", "error", "str", ("error", "warn")),
        Key(d + "on_missing_features", "zeros", "str", ("zeros", "error")),
        Key(d + "drop_missing_labels", False, "bool"),
        Key(d + "pad_from", "group", "str", ("group", "chunk")),
        Key(d + "heldout_controls_in_train", True, "bool"),
        Key(d + "val_from_test", False, "bool"),
        Key(d + "exclude_self", False, "bool"),
        Key(d + "dtype", "float32", "str", ("float32", "float16")),
        Key(d + "data_loading", "memory", "str", ("memory", "stream")),
        Key(d + "stream_chunk_size", 4096, "int"),
        Key(d + "stream_buffer_chunks", 16, "int"),
        Key(d + "stream_max_controls", None, "int", optional=True),
        # training
        Key(t + "max_steps", 40_000, "int"),
        Key(t + "batch_size", 16, "int"),
        Key(t + "lr", 1e-4, "float"),
        Key(t + "weight_decay", 0.0, "float"),
        Key(t + "val_freq", 2000, "int"),
        Key(t + "ckpt_every_n_steps", 2000, "int"),
        Key(t + "gradient_clip_val", 10.0, "float", optional=True),
        Key(t + "gradient_accumulation_steps", 1, "int"),
        Key(t + "train_seed", 42, "int"),
        Key(t + "devices", 1, "any",
            note="1 (or auto): one process; several GPUs or nodes: start it with torchrun"),
        Key(t + "strategy", "auto", "str", optional=True,
            note="auto only; data parallel training: start it with torchrun (docs: gpu.md)"),
        Key(t + "loss_fn", None, "any", optional=True, status="noeffect",
            note="the loss is model.kwargs.loss"),
        Key(t + "use_mfu", False, "any", status="noeffect"),
        Key(t + "mfu_kwargs", None, "any", optional=True, status="noeffect"),
        Key(t + "cumulative_flops_use_backward", None, "any", optional=True,
            status="noeffect"),
        Key(t + "optimizer", "adam", "str", ("adam", "adamw")),
        Key(t + "lr_schedule", "constant", "str", ("constant", "cosine")),
        Key(t + "warmup_steps", 0, "int"),
        Key(t + "matmul_precision", "medium", "str", ("highest", "high", "medium")),
        Key(t + "precision", "auto", "str", ("auto", "32", "bf16-mixed")),
        Key(t + "compile", False, "bool"),
        Key(t + "compile_mode", "default", "str", COMPILE_MODES),
        Key(t + "data_on_device", "auto", "str", ("auto", "always", "never")),
        Key(t + "weight_averaging", "auto", "str", ("auto", "none", "uniform")),
        Key(t + "averaging_start", 0.0, "float"),
        Key(t + "log_every_n_steps", 50, "int"),
        Key(t + "keep_step_checkpoints", "all", "any"),
        Key(t + "early_stopping_patience", None, "int", optional=True),
        Key(t + "device", "auto", "str"),
        # model
        Key("model.name", "state", "str"),
        Key("model.device", None, "any", optional=True, status="noeffect",
            note="use training.device"),
        Key("model.checkpoint", None, "any", optional=True, status="noeffect",
            note="use model.kwargs.init_from to start from a checkpoint"),
        # keys arc-state writes into its config.yaml (accepted so that --config reads one)
        Key("data.name", "PerturbationDataModule", "any", status="noeffect"),
        Key("data.output_dir", None, "any", optional=True, status="noeffect"),
        Key("data.debug", None, "any", optional=True, status="noeffect"),
        Key("return_adatas", None, "any", optional=True, status="noeffect"),
        Key("pred_adata_path", None, "any", optional=True, status="noeffect"),
        Key("true_adata_path", None, "any", optional=True, status="noeffect"),
        Key(m + "loss", "energy", "str", ("energy", "sinkhorn", "mse", "se")),
        Key(m + "train_pert_skip", True, "bool"),
        Key(m + "blur", 0.05, "float"),
        Key(m + "sinkhorn_weight", 0.01, "float"),
        Key(m + "energy_weight", 1.0, "float"),
        Key(m + "mmd_num_chunks", 1, "int"),
        Key(m + "randomize_mmd_chunks", False, "bool"),
        Key(m + "decoder_weight", 1.0, "float"),
        Key(m + "detach_decoder", False, "bool"),
        Key(m + "regularization", 0.0, "float"),
        Key(m + "init_from", None, "str", optional=True),
        Key(m + "freeze_pert_backbone", False, "bool"),
        Key(m + "softplus", None, "any", optional=True, status="noeffect",
            note="the reference never applied it either"),
        Key(m + "transformer_decoder", None, "any", optional=True, status="noeffect"),
        Key(m + "use_effect_gating_token", None, "any", optional=True, status="noeffect"),
        Key(m + "extra_tokens", None, "any", optional=True, status="noeffect"),
        Key(m + "llm_name", None, "any", optional=True, status="noeffect"),
        Key(m + "nb_decoder", False, "bool", status="reject_true"),
        Key(m + "mask_attn", False, "bool", status="reject_true"),
        Key(m + "finetune_vci_decoder", False, "bool", status="reject_true"),
        Key(m + "use_batch_token", False, "bool", status="reject_true"),
        Key(m + "lora.enable", False, "bool", status="reject_true"),
        Key(b + "bidirectional_attention", None, "bool", optional=True),
        Key(b + "max_position_embeddings", None, "int", optional=True),
        Key(b + "n_positions", None, "int", optional=True),
        Key(b + "attention_dropout", 0.0, "float", status="default_only"),
        Key(b + "resid_pdrop", 0.0, "float", status="default_only"),
        Key(b + "embd_pdrop", 0.0, "float", status="default_only"),
        Key(b + "attn_pdrop", 0.0, "float", status="default_only"),
        # wandb and top level
        Key("wandb.project", None, "str", optional=True, status="noeffect", note=_NO_WANDB),
        Key("wandb.entity", None, "str", optional=True, status="noeffect", note=_NO_WANDB),
        Key("wandb.tags", [], "list", status="noeffect", note=_NO_WANDB),
        Key("wandb.group", None, "str", optional=True, status="noeffect", note=_NO_WANDB),
        Key("wandb.notes", None, "str", optional=True, status="noeffect", note=_NO_WANDB),
        Key("wandb.dir", None, "str", optional=True, status="noeffect", note=_NO_WANDB),
        Key("use_wandb", False, "bool"),
        Key("output_dir", "./debugging", "str"),
        Key("name", "debug", "str"),
        Key("overwrite", False, "bool"),
        Key("resume", "auto", "str", ("auto", "force")),
        Key("dry_run", False, "bool"),
    ]
    for k in ("layer_norm_eps", "hidden_dropout", "rotary_dim", "use_rotary_embeddings",
              "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
              "tie_word_embeddings", "vocab_size", "hidden_act"):
        ks.append(Key(b + k, None, "any", optional=True, status="noeffect"))
    for k in ("r", "alpha", "dropout", "bias", "target", "adapt_mlp", "task_type",
              "merge_on_eval"):
        ks.append(Key(m + "lora." + k, None, "any", optional=True, status="noeffect",
                      note="LoRA is not supported (lora.enable must stay false)"))
    for name, (kind, choices, optional) in ARCH_TYPES.items():
        ks.append(Key(m + name, PRESET, kind, choices, optional))
    return {k.path: k for k in ks}


KEYS: dict[str, Key] = _keys()

_BACKBONE_MAP = {  # transformer_backbone_kwargs.<k> -> model.kwargs.<arch key>
    "hidden_size": "hidden_dim", "n_embd": "hidden_dim",
    "intermediate_size": "intermediate_size", "n_inner": "intermediate_size",
    "num_hidden_layers": "n_layers", "n_layer": "n_layers",
    "num_attention_heads": "n_heads", "n_head": "n_heads",
    "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim",
    "rms_norm_eps": "norm_eps", "layer_norm_epsilon": "norm_eps", "rope_theta": "rope",
}
ALIASES: dict[str, str] = {
    "model": "model.name",
    "model.kwargs.transformer_backbone_key": "model.kwargs.backbone",
    "model.kwargs.confidence_head": "model.kwargs.confidence_token",
    "model.kwargs.distributional_loss": "model.kwargs.loss",
    "model.kwargs.decoder_loss_weight": "model.kwargs.decoder_weight",
    "model.kwargs.freeze_pert": "model.kwargs.freeze_pert_backbone",
    "model.kwargs.num_hidden_layers": "model.kwargs.n_layers",
    "model.kwargs.n_layer": "model.kwargs.n_layers",
    "model.kwargs.num_attention_heads": "model.kwargs.n_heads",
    "model.kwargs.n_head": "model.kwargs.n_heads",
    "model.kwargs.num_key_value_heads": "model.kwargs.n_kv_heads",
    "model.kwargs.n_inner": "model.kwargs.intermediate_size",
    "model.kwargs.rms_norm_eps": "model.kwargs.norm_eps",
    "model.kwargs.layer_norm_epsilon": "model.kwargs.norm_eps",
    "data.kwargs.cell_sentence_len": "model.kwargs.cell_set_len",
    "training.wandb_track": "use_wandb",
    "wandb.local_wandb_dir": "wandb.dir",
    **{"model.kwargs.transformer_backbone_kwargs." + k: "model.kwargs." + v
       for k, v in _BACKBONE_MAP.items()},
}

# estimator parameter <- configuration key
PARAM_PATHS: dict[str, str] = {
    "preset": "model.name",
    "pert_col": "data.kwargs.pert_col",
    "cell_type_key": "data.kwargs.cell_type_key",
    "batch_col": "data.kwargs.batch_col",
    "control_pert": "data.kwargs.control_pert",
    "embed_key": "data.kwargs.embed_key",
    "output_space": "data.kwargs.output_space",
    "gene_name_col": "data.kwargs.gene_name_col",
    "counts_key": "data.kwargs.counts_key",
    "allow_counts": "data.kwargs.allow_counts",
    "basal_mapping_strategy": "data.kwargs.basal_mapping_strategy",
    "pert_features": "data.kwargs.perturbation_features_file",
    "heldout_controls_in_train": "data.kwargs.heldout_controls_in_train",
    "on_missing_perturbation": "data.kwargs.on_missing_perturbation",
    "on_missing_features": "data.kwargs.on_missing_features",
    "val_subsample_fraction": "data.kwargs.val_subsample_fraction",
    "drop_missing_labels": "data.kwargs.drop_missing_labels",
    "yield_controls": "data.kwargs.should_yield_control_cells",
    "drop_last": "data.kwargs.drop_last",
    "exclude_self": "data.kwargs.exclude_self",
    "cache_control_pairs": "data.kwargs.cache_perturbation_control_pairs",
    "downsample_cells": "data.kwargs.downsample_cells",
    "downsample": "data.kwargs.downsample",
    "pad_from": "data.kwargs.pad_from",
    "val_from_test": "data.kwargs.val_from_test",
    "additional_obs": "data.kwargs.additional_obs",
    "dtype": "data.kwargs.dtype",
    "data_loading": "data.kwargs.data_loading",
    "stream_chunk_size": "data.kwargs.stream_chunk_size",
    "stream_buffer_chunks": "data.kwargs.stream_buffer_chunks",
    "stream_max_controls": "data.kwargs.stream_max_controls",
    "batch_size": "training.batch_size",
    "max_steps": "training.max_steps",
    "lr": "training.lr",
    "optimizer": "training.optimizer",
    "weight_decay": "training.weight_decay",
    "lr_schedule": "training.lr_schedule",
    "warmup_steps": "training.warmup_steps",
    "gradient_clip_val": "training.gradient_clip_val",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "val_freq": "training.val_freq",
    "ckpt_every_n_steps": "training.ckpt_every_n_steps",
    "log_every_n_steps": "training.log_every_n_steps",
    "early_stopping_patience": "training.early_stopping_patience",
    "precision": "training.precision",
    "matmul_precision": "training.matmul_precision",
    "compile": "training.compile",
    "compile_mode": "training.compile_mode",
    "data_on_device": "training.data_on_device",
    "weight_averaging": "training.weight_averaging",
    "averaging_start": "training.averaging_start",
    "device": "training.device",
    "seed": "training.train_seed",
    "loss": "model.kwargs.loss",
    "train_pert_skip": "model.kwargs.train_pert_skip",
}


def reference_name_hint(name: str) -> str:
    """What an arc-state option name given to the estimator is called there, or why it has no
    effect ('' for names that are not arc-state options)."""
    params = {path: param for param, path in PARAM_PATHS.items()}
    for key in KEYS.values():
        if key.path.rsplit(".", 1)[-1] != name:
            continue
        if key.path in params:
            return f"{name!r} is arc-state's {key.path}: here it is {params[key.path]!r}."
        if key.status == "noeffect":
            why = f" ({key.note})" if key.note else ""
            return f"{name!r} is arc-state's {key.path}, which {_NO_EFFECT}{why}: leave it out."
        if key.path.startswith("model.kwargs.") and name in ARCH_TYPES:
            return (f"{name!r} is a setting of the network: pass model_kwargs={{{name!r}: ...}}"
                    " (it overrides the preset's).")
    return ""


# keys that may differ when a run is resumed: the estimator's resumable parameters, and the
# command line's own settings
RESUME_FREE = (*(PARAM_PATHS[p] for p in RESUMABLE_PARAMS if p in PARAM_PATHS),
               "use_wandb", "overwrite", "resume", "dry_run", "output_dir", "name",
               "data.kwargs.num_workers", "data.kwargs.pin_memory")

# arc-state's configs say weight_decay 5e-4 but never apply it (spec model.md §11)
REFERENCE_WEIGHT_DECAY = 5e-4

# model.kwargs keys that are loss options (StateTransitionModel(loss_kwargs=...))
LOSS_KEYS = SET_LOSS_OPTIONS + TRAINING_LOSS_OPTIONS


# ---------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------


@dataclass
class Resolved:
    """A validated flat configuration (dotted path → value) and what the user set explicitly."""

    values: dict[str, Any]
    given: set[str] = field(default_factory=set)
    sources: dict[str, str] = field(default_factory=dict)  # canonical path -> token as typed
    notices: list[str] = field(default_factory=list)

    def get(self, path: str) -> Any:
        return self.values[path]

    def nested(self) -> dict:
        """The configuration as nested sections (what ``config.yaml`` holds)."""
        return unflatten({k: v for k, v in self.values.items() if v != PRESET})


def default_values() -> dict[str, Any]:
    return {p: copy.deepcopy(k.default) for p, k in KEYS.items()}


def canonical(path: str) -> str:
    """The canonical dotted path of a (possibly aliased) key; raises on unknown keys."""
    p = path.strip()
    if p in KEYS:
        return p
    if p in ALIASES:
        return ALIASES[p]
    parts = p.split(".")
    for i in range(len(parts) - 1, 0, -1):  # an entry of a dict key that has no effect
        head = ".".join(parts[:i])
        if head in KEYS and KEYS[head].status == "noeffect" and KEYS[head].kind == "any":
            return head
    raise ConfigError(f"unknown configuration key '{p}'.{_suggest(p)}")


def _suggest(path: str) -> str:
    names = list(KEYS) + list(ALIASES)
    same_letters = [n for n in names if n.lower() == path.lower()]  # TRAINING.LR
    close = same_letters or difflib.get_close_matches(path, names, n=3, cutoff=0.6)
    if not close:  # compare the last component, within the same section when possible
        leaf = path.rsplit(".", 1)[-1]
        by_leaf = {n.rsplit(".", 1)[-1]: n for n in names}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=3,
                                                               cutoff=0.7)]
    section = path.split(".")[0]
    valid = sorted({n.split(".")[0] for n in KEYS})
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    if section not in valid and "." in path and not same_letters:
        hint += f" Known sections: {', '.join(valid)}."
    return hint + " (`statetx tx train --list-keys` lists every key.)"


def coerce(path: str, value: Any, raw: str | None = None) -> Any:
    """Check/convert ``value`` to the type of key ``path``; explain what is expected if it fails."""
    key = KEYS[path]
    shown = raw if raw is not None else repr(value)
    if isinstance(value, str) and key.kind not in ("str", "any", "list") and raw is None:
        value = parse_value(value)  # values read from a file (YAML keeps "1e-4" a string)
    if key.optional and key.kind == "str" and isinstance(value, str) and not value.strip():
        value = None  # (an empty value, e.g. data.kwargs.batch_col=, unsets an optional key)
    if value is None:
        if key.optional or key.kind == "any":
            return None
        raise ConfigError(f"{path}={shown}: a value is required here (null is not allowed); "
                          f"default {key.default!r}.")
    if key.kind == "any":
        return value
    if key.kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={shown} is not a boolean; use true or false.")
    if key.kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
            raise ConfigError(f"{path}={shown} is not an integer (e.g. {path}="
                              f"{key.default if isinstance(key.default, int) else 8}).")
        return int(value)
    if key.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={shown} is not a number (e.g. {path}=1e-4).")
        return float(value)
    if key.kind in ("list", "intlist"):
        items = value if isinstance(value, list) else [value]
        if key.kind == "intlist":
            bad = [v for v in items if isinstance(v, bool) or not isinstance(v, int)]
            if bad:
                raise ConfigError(f"{path}={shown} must be a list of integers, e.g. "
                                  f"{path}=[1024,1024,512].")
        return list(items)
    # str
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{path}={shown} must be a single value, not a list.")
    if isinstance(value, bool):
        value = str(raw if raw is not None else value).strip("'\"")
    elif isinstance(value, (int, float)):
        value = raw.strip().strip("'\"") if raw is not None else str(value)
    value = str(value)
    if key.choices:
        low = value.lower()
        if low not in key.choices:
            raise ConfigError(f"{path}={shown} is invalid; expected one of "
                              f"{', '.join(key.choices)}.{_close(value, key.choices)}")
        value = low
    return value


def _close(value: str, options: Iterable[str]) -> str:
    m = difflib.get_close_matches(value, list(options), n=3, cutoff=0.6)
    return f" Did you mean: {', '.join(m)}?" if m else ""


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested sections → dotted paths (lists are values; ``model: name`` → ``model.name``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if path == "model" and not isinstance(v, Mapping):
            out["model.name"] = v
        elif isinstance(v, Mapping) and not (path in KEYS and KEYS[path].kind == "any"):
            out.update(flatten(v, path + "."))
        else:
            out[path] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Dotted paths → nested sections (keys in schema order)."""
    root: dict = {}
    for path, value in flat.items():
        node = root
        parts = path.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return root


def parse_token(token: str) -> tuple[str, str]:
    """``key=value`` / ``+key=value`` → (key, raw value); ``~key`` and bare words are errors."""
    tok = token.strip()
    if tok.startswith("~"):
        raise ConfigError(f"'{token}': deleting keys (~key) is not supported; set the key to "
                          "the value you want instead.")
    if tok.startswith("++"):
        tok = tok[2:]
    elif tok.startswith("+"):
        tok = tok[1:]
    key, eq, raw = tok.partition("=")
    if not eq and tok.strip() in KEYS:
        raise ConfigError(f"'{token}' has no value: write {tok.strip()}=<value>.")
    if not eq or not key.strip():
        raise ConfigError(f"'{token}' is not a key=value override (e.g. training.max_steps=1000)."
                          + (_suggest(tok) if tok and "=" not in tok else ""))
    return key.strip(), raw


def resolve(tokens: Iterable[str], config_file: str | Path | None = None,
            base: Mapping | None = None) -> Resolved:
    """Defaults ← ``base`` / ``config_file`` ← ``key=value`` tokens, validated (no heavy imports).

    Unknown keys, type errors, unsupported values and contradictions between aliases raise
    :class:`ConfigError`; keys without effect produce a warning. The preset is resolved later
    (:func:`plan_training`), so token order never matters.
    """
    res = Resolved(default_values())
    if config_file is not None:
        base = read_config(config_file)
    if base is not None:
        where = f" (in {config_file})" if config_file else ""
        flat = flatten(base)
        from_arc_state = not {"resume", "training.matmul_precision"} & set(flat)  # statetx's own
        for path, value in flat.items():
            if value == PRESET:
                continue
            try:
                canon = canonical(path)
                value = coerce(canon, value)
            except ConfigError as exc:
                raise ConfigError(f"{exc}{where}") from None
            if (canon == "training.weight_decay" and value == REFERENCE_WEIGHT_DECAY
                    and from_arc_state):
                res.notices.append(
                    f"{path}: {value:g}{where} is arc-state's configured value, which it never "
                    "applied: kept at 0 for the same training (set training.weight_decay on the "
                    "command line to apply a weight decay).")
                continue
            res.values[canon] = value
            if value != KEYS[canon].default:
                res.given.add(canon)
                res.sources[canon] = f"{path}: {value!r}{where}"
    seen: dict[str, tuple[str, Any]] = {}
    for token in tokens:
        key, raw = parse_token(token)
        canon = canonical(key)
        value = coerce(canon, parse_value(raw), raw)
        if canon in seen and seen[canon][0] != key and seen[canon][1] != value:
            raise ConfigError(f"{key}={raw} contradicts {seen[canon][0]}={seen[canon][1]!r} "
                              f"(both set {canon}); give one.")
        if canon in seen and seen[canon][1] != value:  # (later wins, as OmegaConf's dotlist)
            res.notices.append(f"{key} is given twice: {raw} replaces {seen[canon][1]!r}.")
        seen[canon] = (key, value)
        res.values[canon] = value
        res.given.add(canon)
        res.sources[canon] = f"{key}={raw}"
    _check_values(res)
    return res


def _check_values(res: Resolved) -> None:
    v = res.values
    wandb = [res.sources.get(p, p) for p in sorted(res.given) if p.startswith("wandb.")]
    if wandb:  # (one warning for all of them)
        warn(f"{', '.join(wandb)}: wandb.* keys have no effect in statetx ({_NO_WANDB}). "
             f"{'They are' if len(wandb) > 1 else 'It is'} ignored.", UserWarning)
    for path in sorted(res.given):
        key = KEYS[path]
        val = v[path]
        shown = res.sources.get(path, path)
        if key.status == "noeffect" and not path.startswith("wandb."):
            warn(f"{shown}: {path} {_NO_EFFECT}"
                 + (f" ({key.note})." if key.note else ".") + " It is ignored.", UserWarning)
        elif key.status == "default_only" and val != key.default:
            raise ConfigError(f"{shown}: {path} {_NOT_YET} with a value other than "
                              f"{key.default!r}; remove the key or set it to that value.")
        elif key.status == "reject_true" and val:
            raise ConfigError(f"{shown}: enabling {path} {_NOT_YET}; remove it or set it to "
                              "false.")
    devices = v["training.devices"]
    if devices not in (1, "1", "auto", None) or str(v["training.strategy"]).lower() in (
            "ddp", "ddp_spawn", "fsdp", "deepspeed"):
        raise ConfigError(f"training.devices={devices!r} / training.strategy="
                          f"{v['training.strategy']!r}: these keys do not start processes; "
                          "leave them at 1 / auto and start several with torchrun for data "
                          "parallel training (torchrun --nproc_per_node=N -m statetx tx train "
                          "...; see the GPU and multi-GPU docs).")
    if "training.weight_decay" in res.given and v["training.weight_decay"]:
        res.notices.append(f"training.weight_decay={v['training.weight_decay']:g} is applied "
                           "(the reference accepted this key but never applied it).")
    kept = v["training.keep_step_checkpoints"]
    if not (kept == "all" or (isinstance(kept, int) and not isinstance(kept, bool) and kept >= 0)):
        raise ConfigError(f"training.keep_step_checkpoints={kept!r} is invalid; use 'all' or a "
                          "number of periodic checkpoints to keep.")
    name = str(v["model.name"])
    base_name, _, ver = name.partition("@")
    if base_name == "auto":
        raise ConfigError("model=auto is the Python estimator's default (preset='auto'); the "
                          "command line names its preset as arc-state does: model=small (what "
                          "'auto' picks for up to ~100k training cells) or model=state_sm "
                          "(beyond), or leave model= out for arc-state's default (state).")
    if base_name not in PRESET_NAMES or (ver and ver not in PRESET_VERSIONS):
        raise ConfigError(f"model={name} is not a known preset; available: "
                          f"{', '.join(PRESET_NAMES)} (optionally with @0.11.1)."
                          f"{_close(name, PRESET_NAMES)}")
    if v["use_wandb"]:
        raise ConfigError("use_wandb=true (or training.wandb_track=true): Weights & Biases "
                          "logging is not implemented in statetx; metrics are written to "
                          "<run>/metrics.csv (and to <run>/tensorboard/ when tensorboard is "
                          "installed). Leave both false.")
    if "data.kwargs.random_seed" in res.given and "training.train_seed" not in res.given:
        v["training.train_seed"] = v["data.kwargs.random_seed"]
    elif ("data.kwargs.random_seed" in res.given
          and v["data.kwargs.random_seed"] != v["training.train_seed"]):
        warn(f"data.kwargs.random_seed={v['data.kwargs.random_seed']} and "
             f"training.train_seed={v['training.train_seed']} differ; statetx uses one "
             "seed for sets, control pairing and initialisation: training.train_seed.", UserWarning)
    for path in ("data.kwargs.toml_config_path", "data.kwargs.perturbation_features_file",
                 "model.kwargs.init_from"):
        if isinstance(v[path], str) and v[path]:
            v[path] = str(Path(v[path]).expanduser().resolve())


# ---------------------------------------------------------------------------------------------
# From a resolved configuration to a training plan
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainPlan:
    """Everything ``tx train`` needs: estimator parameters, the run directory, the split file."""

    config: dict  # nested, fully resolved (architecture included)
    params: dict  # StateTransitionModel(**params)
    run_dir: Path
    toml: Path | None
    init_from: str | None
    freeze_backbone: bool
    notices: list[str]
    init_attention: str | None = None  # model.kwargs.attention when given (for arc-state init)
    replaced: Path | None = None  # overwrite=true: the earlier run, set aside by start_run


def _check_run_folder(output_dir: Path, name: str) -> None:
    """``name`` is one folder name and ``output_dir`` a folder (or one that can be made):
    checked before the data are read."""
    parts = Path(name).parts
    if not name.strip() or Path(name).is_absolute() or not parts or any(
            p in (".", "..") for p in parts):
        raise ConfigError(f"name={name!r} is invalid: the run folder's name (a path inside "
                          "output_dir, e.g. name=exp1), not empty, absolute, '.' or '..'.")
    for folder in (output_dir, *output_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"output_dir={str(output_dir)!r}: {str(folder)!r} is a file; "
                                  "give a folder to write the run to.")
            break


def plan_training(res: Resolved, *, check_data: bool = True) -> TrainPlan:
    """Resolve the preset and the data-dependent defaults; build the estimator parameters."""
    v = dict(res.values)
    _check_run_folder(Path(str(v["output_dir"])), str(v["name"]))
    # the split file and init_from are checked before the presets (which import torch, ~5 s)
    toml = v["data.kwargs.toml_config_path"]
    if not toml and check_data:
        raise ConfigError("data.kwargs.toml_config_path is required: the TOML split file that "
                          "lists the datasets and held-out cell types (e.g. "
                          "data.kwargs.toml_config_path=config.toml).")
    if check_data and not Path(toml).is_file():
        raise ConfigError(f"data.kwargs.toml_config_path={toml}: "
                          + ("a folder, not a file." if Path(toml).is_dir() else
                             "file not found."))
    init_from = v["model.kwargs.init_from"]
    if check_data and init_from and not Path(init_from).exists():
        raise ConfigError(f"model.kwargs.init_from={init_from}: not found (give a statetx "
                          "checkpoint, run or model folder, or an arc-state run).")
    from statetx.presets import resolve_architecture

    notices = list(res.notices)
    given_arch = {k.split(".", 2)[2]: v[k] for k in res.given
                  if k.startswith("model.kwargs.") and k.split(".", 2)[2] in ARCH_TYPES}
    if v.get("model.kwargs.intermediate_size") is None:
        given_arch.pop("intermediate_size", None)  # GPT-2's n_inner: null = 4h
    overrides = dict(given_arch)
    bidir = v["model.kwargs.transformer_backbone_kwargs.bidirectional_attention"]
    if bidir is not None:
        overrides["bidirectional_attention"] = bidir
    arch = resolve_architecture(str(v["model.name"]), overrides)
    for key in ("max_position_embeddings", "n_positions"):
        n = v[f"model.kwargs.transformer_backbone_kwargs.{key}"]
        if n is not None and n != arch["cell_set_len"]:
            raise ConfigError(
                f"model.kwargs.transformer_backbone_kwargs.{key}={n} differs from cell_set_len="
                f"{arch['cell_set_len']}; statetx takes the set length from "
                "model.kwargs.cell_set_len only: set that instead (or drop this key).")
    for name in ARCH_KEYS:
        v[f"model.kwargs.{name}"] = arch[name]
    if not toml:  # (--print-config without a split file)
        return TrainPlan(config=unflatten(v), params={}, run_dir=Path(v["output_dir"]) /
                         str(v["name"]), toml=None, init_from=v["model.kwargs.init_from"],
                         freeze_backbone=bool(v["model.kwargs.freeze_pert_backbone"]),
                         notices=notices)
    toml_path = Path(toml)
    if check_data and "data.kwargs.batch_col" not in res.given and v["data.kwargs.batch_col"]:
        col = v["data.kwargs.batch_col"]
        missing, present = _files_without_column(toml_path, col)
        if missing:
            other = [c for c in BATCH_COLS if c in present]
            needs = [k for k, on in (
                ("data.kwargs.basal_mapping_strategy=batch",
                 v["data.kwargs.basal_mapping_strategy"] == "batch"),
                ("model.kwargs.batch_encoder=true", v["model.kwargs.batch_encoder"] is True))
                if on]
            if needs:
                raise ConfigError(
                    f"{' and '.join(needs)} {'need' if len(needs) > 1 else 'needs'} a batch "
                    "column, but data.kwargs.batch_col "
                    f"was not given and its default, '{col}', is not in {missing}: set "
                    "data.kwargs.batch_col=<the obs column holding the batch>"
                    + (f" (obs has {', '.join(map(repr, other))})" if other else "") + ".")
            notices.append(f"data.kwargs.batch_col: the default column '{col}' is not in "
                           f"{missing}; the data are treated as one batch (set "
                           "data.kwargs.batch_col=<column> to use batches"
                           + (f"; obs has {', '.join(map(repr, other))}" if other else "")
                           + ").")
            v["data.kwargs.batch_col"] = None
    if check_data:
        notices += _schedule_notices(res, v, toml_path)
    params = {p: v[path] for p, path in PARAM_PATHS.items()}
    params["model_kwargs"] = dict(overrides) or None
    params["loss_kwargs"] = {k: v[f"model.kwargs.{k}"] for k in LOSS_KEYS
                             if f"model.kwargs.{k}" in res.given} or None
    kept = v["training.keep_step_checkpoints"]
    params["keep_last_n"] = None if kept == "all" else int(kept)
    if params["pert_features"] is None:
        params.pop("pert_features")
    run_dir = Path(v["output_dir"]) / str(v["name"])
    return TrainPlan(config=unflatten(v), params=params, run_dir=run_dir, toml=toml_path,
                     init_from=v["model.kwargs.init_from"],
                     freeze_backbone=bool(v["model.kwargs.freeze_pert_backbone"]),
                     notices=notices,
                     init_attention=v["model.kwargs.attention"]
                     if "model.kwargs.attention" in res.given else None)


def _schedule_notices(res: Resolved, v: dict[str, Any], toml: Path) -> list[str]:
    """What a short or ``model=small`` run should know about its schedule (``v``: the resolved
    values, the batch column checked against the data): the settings of Python's ``small``
    recipe not given, and a validation interval that leaves one validation, at the end."""
    out = []
    recipe = {"training.lr": "1e-3", "training.batch_size": "8", "training.max_steps": "N"}
    if v["data.kwargs.batch_col"]:
        recipe["data.kwargs.basal_mapping_strategy"] = "batch"
    missing = [k for k in recipe if k not in res.given]
    if v["model.name"].partition("@")[0] == "small" and missing:
        out.append(
            f"model=small trains with the command line's recipe (lr {v['training.lr']:g}, "
            f"batch {v['training.batch_size']}, {v['training.max_steps']:,} steps, "
            f"{v['data.kwargs.basal_mapping_strategy']} control pairing) where it is not "
            "given; Python's preset='small' uses lr 1e-3, batch 8, ~100 passes over the "
            "training cells (N = 300-3,000 steps)"
            + (" and pairs controls by batch" if v["data.kwargs.batch_col"] else "")
            + ": add " + " ".join(f"{k}={recipe[k]}" for k in missing) + " to train as it does.")
    steps, every = v["training.max_steps"], v["training.val_freq"]
    if every >= steps and "training.val_freq" not in res.given and _has_val(toml):
        out.append(
            f"training.val_freq={every:,} is not below training.max_steps={steps:,}: the run "
            "validates once, at its end, so best.ckpt holds the final weights and early "
            f"stopping cannot act; add training.val_freq={max(steps // 10, 1)} to validate "
            "every tenth of the run" + (" (every step here)." if steps < 20 else "."))
    return out


def _has_val(toml: Path) -> bool:
    """Whether the split file holds a validation part (an invalid one: as if not)."""
    cfg = _split_or_none(toml)
    return cfg is not None and ("val" in cfg.zeroshot.values()
                                or any(e.val for e in cfg.fewshot.values()))


def _split_or_none(toml: Path) -> Any:
    """The split file's :class:`~statetx.config.SplitConfig`, or None when it is invalid (the
    data layer reports why)."""
    from statetx.config import SplitConfig

    try:
        return SplitConfig.from_toml(toml)
    except (SplitConfigError, ConfigError):
        return None


def config_from_params(params: Mapping[str, Any], arch: Mapping[str, Any] | None = None,
                       split_path: str | Path | None = None,
                       run_dir: str | Path | None = None) -> dict:
    """The run configuration equivalent to estimator parameters (for Python-API runs);
    ``run_dir``: the run folder (its ``output_dir`` and ``name``)."""
    v = default_values()
    if run_dir is not None:  # as a CLI run's config.yaml: where the run is
        v["output_dir"], v["name"] = str(Path(run_dir).resolve().parent), Path(run_dir).name
    for p, path in PARAM_PATHS.items():
        if p in params and not (p == "pert_features" and not isinstance(params[p], (str, Path))):
            v[path] = str(params[p]) if isinstance(params[p], Path) else params[p]
    if params.get("additional_obs") is None:
        v["data.kwargs.additional_obs"] = []
    from statetx.losses import split_loss_kwargs

    for key, value in split_loss_kwargs(params.get("loss_kwargs")).items():
        for k, x in (value.items() if key == "loss_options" else [(key, value)]):
            v[f"model.kwargs.{k}"] = x
    n = params.get("keep_last_n")
    v["training.keep_step_checkpoints"] = "all" if n is None else int(n)
    if arch is not None:
        for name in ARCH_KEYS:
            if name in arch:
                v[f"model.kwargs.{name}"] = arch[name]
    if split_path is not None:
        v["data.kwargs.toml_config_path"] = str(split_path)
    return unflatten(v)


def files_obs_columns(toml: Path) -> dict[Path, set[str]]:
    """The obs column names of every data file the split file names (read from the files'
    HDF5 headers; empty when the split file is invalid: the data layer reports that)."""
    cfg = _split_or_none(toml)
    try:
        files = [] if cfg is None else [f for name in cfg.referenced_datasets()
                                        if name in cfg.datasets for f in cfg.resolve_paths(name)]
    except (SplitConfigError, ConfigError):
        return {}
    return {f: _obs_columns(f) for f in files}


def _files_without_column(toml: Path, col: str) -> tuple[str, set[str]]:
    """Data files of the split file whose obs lacks ``col`` (comma-joined; '' when none), and
    the obs columns all of those files have."""
    columns = files_obs_columns(toml)
    files = list(columns)
    missing = [f for f in files if col not in columns[f]]
    present = set.intersection(*(columns[f] for f in missing)) if missing else set()
    return ", ".join(f.name for f in missing), present


def _obs_columns(path: Path) -> set[str]:
    """obs column names of an .h5ad file, read from its HDF5 header only."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            obs = f.get("obs")
            if obs is None:
                return set()
            if isinstance(obs, h5py.Group):
                return set(obs.keys()) | {str(c) for c in obs.attrs.get("column-order", [])}
            return set(obs.dtype.names or ())
    except OSError:
        return set()


# ---------------------------------------------------------------------------------------------
# Configuration files
# ---------------------------------------------------------------------------------------------


def dump_config(cfg: Mapping) -> str:
    """YAML text of a configuration."""
    import yaml

    plain = json.loads(json.dumps(cfg, default=json_default))
    return yaml.safe_dump(plain, sort_keys=False, default_flow_style=False)


def read_config(path: str | Path) -> dict:
    """Read a YAML (or JSON) configuration file into nested dicts."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"configuration file {p} not found.")
    import yaml

    text = p.read_text()
    try:
        data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of sections (data, training, model, ...).")
    return data


def config_of_model(model: StateTransitionModel, run_dir: Path,
                    split_path: Path | None = None) -> dict:
    """The run configuration (``config.yaml``) of a fitted estimator: its parameters with the
    resolved values of its "auto"/None settings, so that the command line can rerun it (a model
    that no preset describes, e.g. an imported one: its network's settings)."""
    from statetx.presets import resolve_architecture

    params = {**model.get_params(), "preset": getattr(model, "preset_", model.preset),
              **getattr(model, "train_settings_", {}),
              "basal_mapping_strategy": model._pairing()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arch = resolve_architecture(params["preset"], model.model_kwargs)
    except ConfigError:
        arch = {k: v for k, v in model.network_config_.to_dict().items() if k in ARCH_KEYS}
    arch["cell_set_len"] = model.cell_set_len_
    return config_from_params(params, arch, split_path, run_dir=run_dir)


def config_differences(saved: Mapping, current: Mapping) -> list[str]:
    """``key: saved -> current`` for every setting that differs (resume-free keys excluded; a
    key the saved configuration lacks, added to statetx after it was written, has its default)."""
    a, b = flatten(saved), flatten(current)
    out = []
    for k in sorted(set(a) | set(b)):
        if k in RESUME_FREE or k.startswith("wandb."):
            continue
        if k not in a and k in KEYS:
            a[k] = KEYS[k].default
        if _norm(a.get(k)) != _norm(b.get(k)):
            out.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def _norm(x: Any) -> Any:
    if isinstance(x, float) and x.is_integer():
        return int(x)
    if isinstance(x, tuple):
        return list(x)
    return x
