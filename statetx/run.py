"""Run configuration and run directories (cli.md §2–§3).

A *run configuration* is the nested dict that ``statetx tx train`` resolves from ``key=value``
overrides (Hydra-style, as arc-state's ``state tx train``) on top of an optional base file and the
defaults: sections ``data.kwargs``, ``training``, ``model`` (``name`` = preset, ``kwargs``),
``wandb`` and the top-level keys ``use_wandb``, ``output_dir``, ``name``, ``overwrite``,
``resume``, ``dry_run``. Every key is honoured, rejected, or warned about as having no effect
(D7); an unknown key is an error with the closest valid keys.

A *run directory* (``output_dir/name``) holds ``config.yaml`` (the whole resolved configuration;
YAML via PyYAML when installed, else JSON text, which YAML parsers read too), ``statetx_run.json``,
``split.toml`` (dataset paths made absolute), ``split_summary.csv``, ``vocab.json``,
``var_dims.json``, ``model.json``, ``metrics.csv`` and ``checkpoints/``. :func:`load_run` turns it
back into a fitted :class:`~statetx.model.StateTransitionModel` (weights-only loading).

This module imports only the standard library at import time (the CLI's ``--help`` and argument
errors must be fast); torch, anndata and the model are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
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
    atomic_write,
    atomic_write_text,
    history_frame,
    json_default,
    same_run,
    say,
)
from statetx.errors import ConfigError, DataError, SplitConfigError
from statetx.vocab import FEATURES_FILE, write_features

if TYPE_CHECKING:  # pragma: no cover
    from statetx.config import SplitConfig
    from statetx.data import PreparedData
    from statetx.model import StateTransitionModel

CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "statetx_run.json"
CHECKPOINT_DIR = "checkpoints"

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
        Key("wandb.project", None, "str", optional=True),
        Key("wandb.entity", None, "str", optional=True),
        Key("wandb.tags", [], "list"),
        Key("wandb.group", None, "str", optional=True),
        Key("wandb.notes", None, "str", optional=True),
        Key("wandb.dir", None, "str", optional=True),
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
        seen[canon] = (key, value)
        res.values[canon] = value
        res.given.add(canon)
        res.sources[canon] = f"{key}={raw}"
    _check_values(res)
    return res


def _check_values(res: Resolved) -> None:
    v = res.values
    for path in sorted(res.given):
        key = KEYS[path]
        val = v[path]
        shown = res.sources.get(path, path)
        if key.status == "noeffect":
            warnings.warn(f"{shown}: {path} {_NO_EFFECT}"
                          + (f" ({key.note})." if key.note else ".") + " It is ignored.",
                          UserWarning, stacklevel=3)
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
    recipe = ("training.lr", "training.batch_size", "training.max_steps")
    if base_name == "small" and not any(k in res.given for k in recipe):
        res.notices.append(
            f"model={base_name} trains with the command line's recipe (lr "
            f"{v['training.lr']:g}, batch {v['training.batch_size']}, "
            f"{v['training.max_steps']:,} steps); Python's preset='{base_name}' uses lr 1e-3, "
            "batch 8 and ~100 passes over the training cells (300-3,000 steps): add "
            "training.lr=1e-3 training.batch_size=8 training.max_steps=N to train as it does.")
    if v["use_wandb"]:
        raise ConfigError("use_wandb=true (or training.wandb_track=true): Weights & Biases "
                          "logging is not implemented in statetx; metrics are written to "
                          "<run>/metrics.csv (and to <run>/tensorboard/ when tensorboard is "
                          "installed). Leave both false.")
    if "data.kwargs.random_seed" in res.given and "training.train_seed" not in res.given:
        v["training.train_seed"] = v["data.kwargs.random_seed"]
    elif ("data.kwargs.random_seed" in res.given
          and v["data.kwargs.random_seed"] != v["training.train_seed"]):
        warnings.warn(f"data.kwargs.random_seed={v['data.kwargs.random_seed']} and "
                      f"training.train_seed={v['training.train_seed']} differ; statetx uses one "
                      "seed for sets, control pairing and initialisation: training.train_seed.",
                      UserWarning, stacklevel=3)
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


def finish_replacement(plan: TrainPlan, started: bool) -> None:
    """After ``overwrite=true``: delete the earlier run once the new one has started training
    (it has checkpoints), else remove the new folder and put the earlier run back."""
    if plan.replaced is not None and plan.replaced.exists():
        settle_aside(plan.run_dir, plan.replaced, started, existed=True)
    plan.replaced = None


def set_aside(folder: Path) -> Path | None:
    """Move a non-empty run ``folder`` to a new hidden sibling ``.<name>.replaced-<id>`` (see
    :func:`settle_aside`); refused for the current folder, a symbolic link, a folder holding
    other runs, and where the rename is impossible (a mount point)."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    if folder.is_symlink():
        raise ConfigError(f"{folder} holds an earlier run and is a symbolic link; give the folder "
                          "it points to (or resume the run).")
    real = folder.resolve()
    cwd = Path.cwd().resolve()
    if cwd == real or real in cwd.parents:
        raise ConfigError(f"{folder} holds an earlier run and is (or contains) the current "
                          "folder, so it cannot be replaced; give a run folder below it, or "
                          "resume it.")
    nested = [p.name for p in real.iterdir() if p.is_dir() and looks_like_run(p)]
    if nested:
        raise ConfigError(f"{folder} holds other runs ({', '.join(sorted(nested))}); it is not "
                          "replaced. Choose another folder.")
    aside = Path(tempfile.mkdtemp(prefix=f".{real.name}.replaced-", dir=real.parent))
    try:
        real.rename(aside)  # onto the new empty folder: atomic, never onto an earlier aside
    except OSError as err:
        aside.rmdir()
        raise ConfigError(f"{folder} holds an earlier run that cannot be set aside ({err}); "
                          "give a subfolder (e.g. of a mounted volume) or resume it.") from None
    say(f"the earlier run in {folder} is kept at {aside} until this run writes its "
        "first checkpoint (it comes back if this run fails before).")
    return aside


def leftover_asides(folder: Path) -> list[Path]:
    """Earlier runs of ``folder`` left set aside by a process that was killed."""
    folder = Path(folder)
    return sorted(folder.parent.glob(f".{folder.name}.replaced-*"))


def settle_aside(folder: Path, aside: Path | None, started: bool, existed: bool) -> None:
    """After a new run in ``folder``: when it started training (wrote checkpoints), delete the
    earlier run set aside; otherwise remove what the new run wrote and put the earlier run
    (or the empty folder that was there) back."""
    if started:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return
    shutil.rmtree(folder, ignore_errors=True)
    if aside is not None and aside.exists():
        aside.rename(folder)
        say(f"the new run stopped before writing a checkpoint; {folder} is as it "
            "was.")
    elif existed:
        folder.mkdir(parents=True, exist_ok=True)


def has_checkpoints(folder: Path) -> bool:
    """Whether a run folder holds a checkpoint (training has started)."""
    return any((Path(folder) / CHECKPOINT_DIR).glob("*.ckpt"))


def plan_training(res: Resolved, *, check_data: bool = True) -> TrainPlan:
    """Resolve the preset and the data-dependent defaults; build the estimator parameters."""
    from statetx.presets import resolve_architecture

    v = dict(res.values)
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
    toml = v["data.kwargs.toml_config_path"]
    if not toml and not check_data:
        return TrainPlan(config=unflatten(v), params={}, run_dir=Path(v["output_dir"]) /
                         str(v["name"]), toml=None, init_from=v["model.kwargs.init_from"],
                         freeze_backbone=bool(v["model.kwargs.freeze_pert_backbone"]),
                         notices=notices)
    if not toml:
        raise ConfigError("data.kwargs.toml_config_path is required: the TOML split file that "
                          "lists the datasets and held-out cell types (e.g. "
                          "data.kwargs.toml_config_path=config.toml).")
    toml_path = Path(toml)
    if check_data and not toml_path.is_file():
        raise ConfigError(f"data.kwargs.toml_config_path={toml}: file not found.")
    init_from = v["model.kwargs.init_from"]
    if check_data and init_from and not Path(init_from).exists():
        raise ConfigError(f"model.kwargs.init_from={init_from}: not found (give a statetx "
                          "checkpoint, run or model folder, or an arc-state run).")
    if check_data and "data.kwargs.batch_col" not in res.given and v["data.kwargs.batch_col"]:
        col = v["data.kwargs.batch_col"]
        missing, present = _files_without_column(toml_path, col)
        if missing:
            other = [c for c in BATCH_COLS if c in present]
            notices.append(f"data.kwargs.batch_col: the default column '{col}' is not in "
                           f"{missing}; the data are treated as one batch (set "
                           "data.kwargs.batch_col=<column> to use batches"
                           + (f"; obs has {', '.join(map(repr, other))}" if other else "")
                           + ").")
            v["data.kwargs.batch_col"] = None
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


def _files_without_column(toml: Path, col: str) -> tuple[str, set[str]]:
    """Data files of the split file whose obs lacks ``col`` (comma-joined; '' when none), and
    the obs columns all of those files have."""
    from statetx.config import SplitConfig

    try:
        cfg = SplitConfig.from_toml(toml)
        files = [f for name in cfg.referenced_datasets() if name in cfg.datasets
                 for f in cfg.resolve_paths(name)]
    except (SplitConfigError, ConfigError):
        return "", set()  # the data layer reports the real problem
    columns = {f: _obs_columns(f) for f in files}
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
# Files of a run directory
# ---------------------------------------------------------------------------------------------


def dump_config(cfg: Mapping) -> str:
    """YAML text of a configuration (JSON text when PyYAML is not installed)."""
    plain = json.loads(json.dumps(cfg, default=json_default))
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with scanpy's dependencies
        return json.dumps(plain, indent=2) + "\n"
    return yaml.safe_dump(plain, sort_keys=False, default_flow_style=False)


def read_config(path: str | Path) -> dict:
    """Read a YAML (or JSON) configuration file into nested dicts."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"configuration file {p} not found.")
    text = p.read_text()
    try:
        import yaml

        data = yaml.safe_load(text)
    except ImportError:  # pragma: no cover
        data = json.loads(text)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of sections (data, training, model, ...).")
    return data


def absolute_split(split_config: Any) -> SplitConfig | None:
    """The split spec with every dataset path made absolute (so the copy in the run directory
    still finds the data); None when there is no spec."""
    from statetx.config import SplitConfig

    if split_config is None:
        return None
    return SplitConfig.from_toml(split_config).absolute()


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


def write_run_files(model: StateTransitionModel, out: Path, prepared: PreparedData,
                    split_config: Any) -> None:
    """Write the run directory's description files (called by ``fit`` before training)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    v = model.vocab_
    atomic_write_text(out / "vocab.json", json.dumps(v.to_dict(), indent=1))
    if v.pert_features is not None:  # (inference needs no external file, data.md §8)
        atomic_write(out / FEATURES_FILE, lambda tmp: write_features(v, tmp))
    from statetx.io import feature_names

    first = prepared.files[0]  # the reference's meaning (data.md §8): genes in X, X_hvg's width
    var_dims = {
        "input_dim": prepared.input_dim, "output_dim": prepared.input_dim,
        "gene_dim": len(first.var_names),
        "hvg_dim": len(feature_names(first, "X_hvg")) if "X_hvg" in first.obsm_keys else 0,
        "pert_dim": v.pert_dim, "batch_dim": len(v.batches),
        "gene_names": prepared.gene_names or prepared.feature_names,
        "pert_names": v.perturbations,
    }
    atomic_write_text(out / "var_dims.json", json.dumps(var_dims, indent=1))
    split = absolute_split(split_config)
    if split is not None:
        atomic_write_text(out / "split.toml", split.to_toml())
    atomic_write_text(out / "split_summary.csv", prepared.summary.to_csv(index=False))
    atomic_write_text(out / "model.json",
                      json.dumps(model._metadata(), indent=1, default=json_default))
    cfg = getattr(model, "_run_config", None)
    if cfg is None:
        cfg = config_of_model(model, out, (out / "split.toml").resolve()
                              if split is not None else None)
    atomic_write_text(out / CONFIG_FILE, dump_config(cfg))
    info = read_run_info(out)
    info.setdefault("statetx_version", _version())
    info.setdefault("command", None)
    info["config"] = json.loads(json.dumps(cfg, default=json_default))
    info["seed"] = model.seed
    info["data"] = [_fingerprint(f.path) for f in prepared.files
                    if getattr(f, "path", None) is not None]
    info["columns"] = model.columns_.model_dump()
    write_run_info(out, info)


def read_run_info(run_dir: Path) -> dict:
    p = Path(run_dir) / RUN_INFO_FILE
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return {}


def write_run_info(run_dir: Path, info: Mapping) -> None:
    atomic_write_text(Path(run_dir) / RUN_INFO_FILE,
                      json.dumps(info, indent=1, default=json_default))


def _fingerprint(path: Any) -> dict:
    p = Path(path)
    try:
        st = p.stat()
        return {"path": str(p.resolve()), "bytes": st.st_size, "mtime": st.st_mtime}
    except OSError:
        return {"path": str(p)}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("statetx")
    except Exception:  # noqa: BLE001
        return "unknown"


class RunComplete(Exception):
    """``tx train`` into a run that already reached its ``max_steps``: nothing to do."""


def resume_point(plan: TrainPlan) -> Path | None:
    """The checkpoint :func:`start_run` resumes from, decided without writing anything (the
    ranks of a torchrun job other than rank 0, which alone prepares the run folder)."""
    last = plan.run_dir / CHECKPOINT_DIR / "last.ckpt"
    if plan.config["overwrite"] or not last.is_file():
        return None
    _check_complete(plan, last)
    return last


def start_run(plan: TrainPlan, argv: list[str] | None = None) -> Path | None:
    """Prepare ``plan.run_dir`` (cli.md §2.3) and return the checkpoint to resume from, if any.

    An existing directory is deleted with ``overwrite=true`` (only if it looks like a statetx run),
    resumed from ``checkpoints/last.ckpt`` when its configuration matches (except max_steps and
    logging keys; ``resume=force`` skips the check), else used in place with a notice.
    """
    run = plan.run_dir
    cfg = plan.config
    resume_from = None
    if run.exists():
        if not run.is_dir():
            raise ConfigError(f"run directory {run} exists and is not a directory.")
        if cfg["overwrite"]:
            if any(run.iterdir()) and not looks_like_run(run):
                raise ConfigError(f"overwrite=true would delete {run}, which does not look like a "
                                  "statetx run directory (no statetx_run.json); choose another "
                                  "output_dir/name.")
            # set aside, deleted once the new run has passed its checks (see finish_replacement)
            plan.replaced = set_aside(run)
        elif (run / CHECKPOINT_DIR / "last.ckpt").is_file():
            last = run / CHECKPOINT_DIR / "last.ckpt"
            if cfg["resume"] != "force" and (run / CONFIG_FILE).is_file():
                diffs = config_differences(read_config(run / CONFIG_FILE), cfg)
                diffs += input_differences(run, plan.toml)
                if diffs:
                    raise ConfigError(
                        f"{run} already holds a run with a different configuration: "
                        + "; ".join(diffs) + ". Use another name=, overwrite=true to start "
                        "again, or resume=force to continue anyway.")
            resume_from = last
            step = _check_complete(plan, last)
            say(f"resuming {run} from {last} (step {step}); "
                "pass overwrite=true to start again.")
        elif any(run.iterdir()) and not looks_like_run(run):
            raise ConfigError(f"{run} exists and holds files that are not a statetx run; choose "
                              "another output_dir/name (nothing was written).")
        elif has_checkpoints(run):
            raise ConfigError(f"{run} holds checkpoints of an earlier run but no "
                              "checkpoints/last.ckpt to resume from; pass overwrite=true to "
                              "replace that run, or choose another name.")
        else:
            say(f"{run} exists but has no checkpoints/last.ckpt: training starts in "
                "place (its files are replaced).")
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / CONFIG_FILE, dump_config(cfg))
    info = read_run_info(run) if resume_from is not None else {}
    info.update({"statetx_version": _version(),
                 "command": list(argv) if argv is not None else sys.argv,
                 "config": cfg, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "resumed_from": str(resume_from) if resume_from else None})
    write_run_info(run, info)
    return resume_from


def finish_run(run_dir: Path, model: StateTransitionModel, seconds: float) -> None:
    """Record timings and the final step in ``statetx_run.json``."""
    info = read_run_info(run_dir)
    hist = getattr(model, "history_", None)
    step = int(hist["step"].max()) if hist is not None and len(hist) else None
    final = Path(run_dir) / CHECKPOINT_DIR / "final.ckpt"
    if step is None and final.is_file():
        step = _checkpoint_step(final)
    info.update({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "train_seconds": seconds,
                 "final_step": step, "best_step": getattr(model, "best_step_", None),
                 "fit": model._fit_record()})
    write_run_info(run_dir, info)


def _restore_fit_record(model: StateTransitionModel, run: Path) -> None:
    """What a finished run recorded about its fit (preset, settings, best step, time), its split
    spec and summary, as :meth:`StateTransitionModel.load` restores them from a saved model."""
    from statetx.config import SplitConfig

    model._restore_fit_record(read_run_info(run).get("fit") or {})
    if (run / "split_summary.csv").is_file():
        import pandas as pd

        model.split_summary_ = pd.read_csv(run / "split_summary.csv")
    if (run / "split.toml").is_file():
        with contextlib.suppress(SplitConfigError):  # (attach_data says so when it is needed)
            model.split_config_ = SplitConfig.from_toml(run / "split.toml")


def input_differences(run: Path, toml: Any) -> list[str]:
    """What changed in the split spec (against the run's ``split.toml``) and in its data files
    (size, modification time, files added or gone, against ``statetx_run.json``) since the run
    was started: resuming across such a change would mix two splits or two datasets."""
    from statetx.config import SplitConfig

    out: list[str] = []
    current = absolute_split(toml)
    saved_file = Path(run) / "split.toml"
    if current is not None and saved_file.is_file():
        saved = SplitConfig.from_toml(saved_file)
        for section in ("datasets", "training", "zeroshot", "fewshot"):
            a, b = getattr(saved, section), getattr(current, section)
            if section == "datasets":  # (runs written before paths were normalised)
                a, b = ({k: os.path.normpath(v) if isinstance(v, str) else [
                    os.path.normpath(x) for x in v] for k, v in d.items()} for d in (a, b))
            if _norm_section(a) != _norm_section(b):
                out.append(f"split [{section}]: {_norm_section(a)} -> {_norm_section(b)}")
    recorded = {d["path"]: d for d in read_run_info(run).get("data") or [] if "path" in d}
    if current is None or not recorded or out:
        return out
    now = {}
    for name in current.referenced_datasets():
        try:
            now.update({str(p.resolve()): _fingerprint(p) for p in current.resolve_paths(name)})
        except SplitConfigError:
            return out  # (the data's own error comes when it is loaded)
    for path in sorted(set(recorded) | set(now)):
        old, new = recorded.get(path), now.get(path)
        if old is None or new is None:
            out.append(f"data file {path}: {'added' if old is None else 'gone'}")
        elif (old.get("bytes"), old.get("mtime")) != (new.get("bytes"), new.get("mtime")):
            out.append(f"data file {path}: modified since the run started ("
                       + (f"{old.get('bytes')} -> {new.get('bytes')} bytes)"
                          if old.get("bytes") != new.get("bytes") else "same size)"))
    return out


def _norm_section(section: Any) -> Any:
    return json.loads(json.dumps(section, default=lambda o: o.model_dump()
                                 if hasattr(o, "model_dump") else str(o), sort_keys=True))


def looks_like_run(run: Path) -> bool:
    """Whether a folder holds a statetx run: its run record ``statetx_run.json`` (a
    ``config.yaml``, ``vocab.json`` or ``checkpoints/`` alone may be anything else)."""
    return (Path(run) / RUN_INFO_FILE).is_file()


def config_differences(saved: Mapping, current: Mapping) -> list[str]:
    """``key: saved -> current`` for every setting that differs (resume-free keys excluded)."""
    a, b = flatten(saved), flatten(current)
    out = []
    for k in sorted(set(a) | set(b)):
        if k in RESUME_FREE or k.startswith("wandb."):
            continue
        if _norm(a.get(k)) != _norm(b.get(k)):
            out.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def _norm(x: Any) -> Any:
    if isinstance(x, float) and x.is_integer():
        return int(x)
    if isinstance(x, tuple):
        return list(x)
    return x


def _check_complete(plan: TrainPlan, last: Path) -> Any:
    """RunComplete when the run of ``last`` reached ``max_steps`` or stopped early; else its
    step."""
    state = _checkpoint_state(last)
    step, max_steps = state.get("step", "?"), plan.params.get("max_steps")
    patience = plan.params.get("early_stopping_patience")
    if isinstance(step, int) and isinstance(max_steps, int) and step >= max_steps:
        raise RunComplete(f"{plan.run_dir} is already trained to step {step} (max_steps "
                          f"{max_steps}): nothing to do, the run is left as it is. Raise "
                          "training.max_steps to continue it, or pass overwrite=true to start "
                          "again.")
    if patience is not None and state.get("bad_validations", 0) >= patience:
        raise RunComplete(f"{plan.run_dir} stopped early at step {step} (no better validation "
                          f"loss in {patience} validations, training.early_stopping_patience): "
                          "nothing to do, the run is left as it is. To continue it, raise the "
                          "patience with resume=force; overwrite=true starts again.")
    return step


def _checkpoint_state(path: Path) -> dict:
    """The ``train_state`` of a checkpoint file ({} when it cannot be read)."""
    try:
        from statetx.train import load_checkpoint_file

        return dict(load_checkpoint_file(path).get("train_state", {}))
    except Exception:  # noqa: BLE001
        return {}


def _checkpoint_step(path: Path) -> Any:
    return _checkpoint_state(path).get("step", "?")


# ---------------------------------------------------------------------------------------------
# Loading a run
# ---------------------------------------------------------------------------------------------


def resolve_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None,
                       verbose: bool = True) -> Path:
    """The checkpoint file of a run: ``final.ckpt``, else ``last.ckpt`` (printed).

    ``checkpoint`` may be a file name inside ``checkpoints/`` (``best.ckpt``, ``step=2000.ckpt``),
    a name without ``.ckpt``, or a path.
    """
    run = Path(run_dir)
    ckdir = run / CHECKPOINT_DIR
    if checkpoint is None:
        for name in ("final.ckpt", "last.ckpt"):
            if (ckdir / name).is_file():
                if verbose:
                    say(f"using checkpoint {ckdir / name}")
                return ckdir / name
        left = leftover_asides(run)
        raise DataError(f"{run} has no checkpoints/final.ckpt or checkpoints/last.ckpt"
                        + _available(ckdir) + "; pass --checkpoint or check the run directory."
                        + (f" An earlier run of this folder was set aside by a process that "
                           f"stopped before its first checkpoint: {left[-1]} (move it back "
                           f"to restore it)." if left else ""))
    p = Path(checkpoint)
    candidates = [p] if p.is_absolute() else [ckdir / p, ckdir / f"{p}.ckpt", run / p, p]
    for c in candidates:
        if c.is_file():
            if verbose:
                say(f"using checkpoint {c}")
            return c
    raise DataError(f"checkpoint '{checkpoint}' not found in {ckdir}" + _available(ckdir) + ".")


def _available(ckdir: Path) -> str:
    names = sorted(p.name for p in ckdir.glob("*.ckpt")) if ckdir.is_dir() else []
    return f" (available: {', '.join(names)})" if names else " (no checkpoints there)"


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, *,
             device: str = "cpu", verbose: bool = True) -> StateTransitionModel:
    """A fitted :class:`~statetx.model.StateTransitionModel` from a statetx run directory.

    Checkpoints are read with PyTorch's weights-only loader. The model can ``predict`` at once;
    call :func:`attach_data` (or ``tx predict``) for ``predict_split``.

    Parameters
    ----------
    run_dir
        The run directory, or a checkpoint file path (its run: the folder above
        ``checkpoints/``, else the file's folder); a directory written by ``model.save`` also
        loads.
    checkpoint
        File name in ``checkpoints/`` (``best.ckpt``, ``step=2000.ckpt``; ``.ckpt`` may be left
        out) or a path (of a checkpoint of this run); default ``final.ckpt``, else
        ``last.ckpt``.
    device
        Where the model is moved (default the CPU).
    verbose
        Print the checkpoint used.

    Returns
    -------
    StateTransitionModel
        The fitted model, with ``run_dir_`` (and, from a checkpoint, ``checkpoint_path_``).
    """
    from statetx.model import StateTransitionModel
    from statetx.train import load_checkpoint_file

    run = Path(run_dir)
    if run.is_file():
        checkpoint, run = run, (run.parent.parent if run.parent.name == CHECKPOINT_DIR
                                else run.parent)
    elif not run.is_dir():
        raise DataError(f"run directory {run} does not exist.")
    elif (checkpoint is None and not (run / CHECKPOINT_DIR).is_dir()
          and (run / "model.safetensors").is_file()):
        model = StateTransitionModel.load(run, device=device)
        model.run_dir_ = run
        return model
    path = resolve_checkpoint(run, checkpoint, verbose=verbose)
    ckpt = load_checkpoint_file(path)
    meta = ckpt.get("statetx_model") if isinstance(ckpt, dict) else None
    if meta is None or "state_dict" not in ckpt:
        raise DataError(f"{path} is not a statetx checkpoint (no 'statetx_model' metadata). For "
                        "an arc-state run: tx infer --model-dir RUN predicts new cells; to "
                        "evaluate its test split, statetx import-arc RUN --out DIR, then tx "
                        "predict --output-dir DIR --toml <the run's split TOML>.")
    _check_same_run(run, path, meta)
    model = StateTransitionModel._from_metadata(meta, ckpt["state_dict"], source=path,
                                                features=ckpt.get("pert_features"))
    if ckpt.get("history"):
        model.history_ = history_frame(list(ckpt["history"]))
    model.run_dir_ = run
    model.checkpoint_path_ = path
    model.step_ = (ckpt.get("train_state") or {}).get("step")
    _restore_fit_record(model, run)
    if str(device) != "cpu":
        model.to(device)
    return model


def _check_same_run(run: Path, path: Path, meta: Mapping) -> None:
    """A checkpoint given by path must belong to ``run`` (same settings, vocabulary and
    genes as the run's model.json): results are written into ``run``, so another run's model
    would overwrite them."""
    if path.resolve().parent == (run / CHECKPOINT_DIR).resolve():
        return
    try:
        mine = json.loads((run / "model.json").read_text())
        theirs = json.loads(json.dumps(meta, default=json_default))
    except (OSError, ValueError):
        return
    if not same_run(mine, theirs):
        raise DataError(f"checkpoint {path} does not belong to the run {run} (its settings, "
                        "vocabulary or genes differ from the run's model.json); results would "
                        "be written into the wrong run. Name the checkpoint's own run folder.")


def _free_labels(model: Any) -> tuple[str, ...]:
    """Label kinds the model's network does not read, so that a new split spec may bring labels
    it never trained on: cell types always, batches without a batch encoder."""
    cfg = getattr(model, "network_config_", None)
    return ("cell_type",) if cfg is not None and cfg.batch_encoder else ("cell_type", "batch")


def attach_data(model: Any, run_dir: str | Path | None = None, *,
                toml: str | Path | dict | SplitConfig | None = None,
                data_root: str | Path | None = None, adata: Any = None,
                stream: bool | None = None) -> PreparedData:
    """Rebuild the split data of a loaded or unpickled model, which ``predict_split`` needs.

    The model's vocabulary is reused, so label codes match training.

    Parameters
    ----------
    model
        A ``StateTransitionModel`` or a baseline.
    run_dir
        The run whose ``split.toml`` is read (default: the model's ``run_dir_``).
    toml
        The split spec (a path, TOML string, dict or :class:`SplitConfig`); default: the run's
        ``split.toml``, else the spec the model was fitted with (kept by pickling and
        :meth:`~statetx.StateTransitionModel.save`).
    data_root
        Replaces the directory part of every dataset path (for a run whose data moved).
    adata
        In-memory data, instead of the spec's files.
    stream
        Keep the training split on disk (labels only); default: as the model trained
        (``data_loading``); False reads it into memory, for ``predict_split("train")``.
        Without effect with ``adata``; a baseline reads it into memory (leave ``stream``
        unset).

    Returns
    -------
    PreparedData
        The split data, also kept by the model for ``predict_split``.
    """
    from statetx.config import SplitConfig

    run = Path(run_dir) if run_dir is not None else getattr(model, "run_dir_", None)
    if toml is not None:
        cfg = SplitConfig.from_toml(toml)
    elif run is not None and (run / "split.toml").is_file():
        cfg = SplitConfig.from_toml(run / "split.toml")
    elif getattr(model, "split_config_", None) is not None:
        cfg = model.split_config_
    else:
        where = f" ({run / 'split.toml'} not found)" if run is not None else ""
        raise DataError(f"the model does not know its split spec{where}: pass the split spec "
                        "used for training (toml=..., --toml FILE).")
    src = cfg.source if cfg.source not in (None, "<dict>") else "the split spec"
    if data_root is not None:
        root = Path(data_root).expanduser().resolve()

        def move(p: str) -> str:
            return str(root / Path(p).name)

        cfg = cfg.model_copy(update={"datasets": {
            k: move(v) if isinstance(v, str) else [move(x) for x in v]
            for k, v in cfg.datasets.items()}})
    if adata is None:
        for name in cfg.referenced_datasets():
            try:
                cfg.resolve_paths(name)
            except SplitConfigError as exc:
                raise DataError(f"{exc} The run's data cannot be found (from {src}): pass the "
                                "training data in memory (adata=...), or the folder the files "
                                "moved to (data_root=..., --data-root DIR), or another split "
                                "file (toml=..., --toml FILE).") from None
    if stream is None:
        stream = getattr(model, "data_loading", "memory") == "stream"
    if stream and not hasattr(model, "stream_chunk_size"):
        raise ConfigError(f"{type(model).__name__} reads its split data into memory; leave "
                          "stream unset.")
    from statetx.stream import preparer

    prepared = preparer(model.stream_chunk_size if adata is None and stream else None)(
        adata, cfg, model.columns_, vocab=model.vocab_, new_labels=_free_labels(model),
        **model._data_options())
    if list(prepared.feature_names) != list(model.var_names_):
        raise DataError(f"the data of {src} have different features than the model was trained "
                        f"on ({prepared.input_dim} vs {len(model.var_names_)} columns).")
    model._prepared = prepared
    model.split_summary_ = prepared.summary
    return prepared


# ---------------------------------------------------------------------------------------------
# Fine-tuning from a checkpoint (model.kwargs.init_from)
# ---------------------------------------------------------------------------------------------


def estimator_class(init_from: str | Path | None = None, freeze_backbone: bool = False,
                    attention: str | None = None) -> type:
    """``StateTransitionModel``, or a subclass that initialises from ``init_from`` (partial load:
    tensors of matching name and shape; the rest keep their fresh initialisation) and optionally
    freezes the transformer backbone. The same settings give the same class; its models pickle
    and clone like the plain estimator's."""
    return _estimator_class(None if init_from is None else str(init_from),
                            bool(freeze_backbone), attention)


@functools.cache  # one class per setting (pickling, isinstance)
def _estimator_class(init_from: str | None, freeze_backbone: bool,
                     attention: str | None) -> type:
    from statetx.model import StateTransitionModel

    if init_from is None and not freeze_backbone:
        return StateTransitionModel

    class FineTunedModel(StateTransitionModel):
        _fine_tunes = init_from is not None

        def _set_fitted(self, network, *args, **kwargs):  # type: ignore[override]
            if init_from is not None:
                partial_load(network, init_from, attention=attention)
            if freeze_backbone:
                for p in network.transformer_backbone.parameters():
                    p.requires_grad_(False)
                say("freeze_pert_backbone=true: the transformer backbone is frozen.")
            return super()._set_fitted(network, *args, **kwargs)

        def __reduce__(self):  # a class made here: pickled as how to make it again
            return (_fine_tuned, ((init_from, freeze_backbone, attention), self.__getstate__()))

    FineTunedModel.__qualname__ = FineTunedModel.__name__ = "FineTunedModel"
    return FineTunedModel


def _fine_tuned(settings: tuple, state: dict) -> StateTransitionModel:
    """Unpickle an :func:`estimator_class` model."""
    cls = _estimator_class(*settings)
    model = cls.__new__(cls)
    model.__setstate__(state)
    return model


def partial_load(network: Any, source: str | Path, attention: str | None = None
                 ) -> tuple[list[str], list[str], list[str]]:
    """Load the tensors of ``source`` that fit ``network``; print what was re-initialised/dropped.

    ``source``: a statetx checkpoint, a statetx model directory, or an arc-state ``.ckpt`` /
    run directory (via :func:`statetx.arc.load_arc_run`; ``attention`` resolves its mode).
    Returns (loaded, re-initialised, dropped) tensor names. As the reference, the perturbation
    encoder is rebuilt whole when its input width differs, and the gene decoder when the output
    space differs from the source's; other tensors load where their shapes fit.
    """
    state, space = _state_dict_of(Path(source), attention)
    own = network.state_dict()
    fits = {k for k, t in state.items() if k in own and tuple(t.shape) == tuple(own[k].shape)}
    rebuilt = []
    if any(k.startswith("pert_encoder.") and k not in fits for k in own):
        rebuilt.append("pert_encoder.")  # (another perturbation width: no layer of it is kept)
    if space is not None and space != network.config.output_space:
        rebuilt.append("gene_decoder.")
    use = {k: state[k] for k in fits if not k.startswith(tuple(rebuilt))}
    reinit = sorted(set(own) - set(use))
    dropped = sorted(set(state) - set(use))
    network.load_state_dict(use, strict=False)
    say(f"init_from {source}: loaded {len(use)} tensors"
        + (f"; re-initialised {len(reinit)}: {', '.join(reinit[:12])}"
             + (" ..." if len(reinit) > 12 else "") if reinit else "")
        + (f"; dropped {len(dropped)}: {', '.join(dropped[:12])}"
             + (" ..." if len(dropped) > 12 else "") if dropped else "")
        + (f" (rebuilt whole: {', '.join(r.rstrip('.') for r in rebuilt)})" if rebuilt else ""))
    if not use:
        raise ConfigError(f"model.kwargs.init_from={source}: no tensor of the checkpoint fits the "
                          "new network (different architecture?).")
    return sorted(use), reinit, dropped


def _state_dict_of(path: Path, attention: str | None) -> tuple[dict, str | None]:
    """The weights of a checkpoint, model folder or run, and its output space (None: unknown)."""
    if not path.exists():
        raise ConfigError(f"model.kwargs.init_from={path}: file not found.")
    if path.is_dir() and (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        meta = path / "model.json"
        space = (json.loads(meta.read_text()).get("network_config", {}).get("output_space")
                 if meta.is_file() else None)
        return load_file(str(path / "model.safetensors")), space
    if path.is_dir() and path.name == CHECKPOINT_DIR and looks_like_run(path.parent):
        path = path.parent  # a run's checkpoints folder: the run
    if path.is_dir() and looks_like_run(path):  # a statetx run folder: its default checkpoint
        path = resolve_checkpoint(path, verbose=True)
    if path.is_file():
        import torch

        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - arc-state checkpoints hold pickled objects
            ckpt = None
        if isinstance(ckpt, dict) and "statetx_model" in ckpt:
            return (dict(ckpt["state_dict"]),
                    ckpt["statetx_model"].get("network_config", {}).get("output_space"))
    from statetx.arc import load_arc_run

    imp = load_arc_run(path, attention=attention)
    return imp.network.state_dict(), imp.network.config.output_space


# ---------------------------------------------------------------------------------------------
# arc-state runs as statetx models
# ---------------------------------------------------------------------------------------------


def is_arc_run(path: str | Path) -> bool:
    """True for an arc-state run directory (or a Lightning checkpoint outside a statetx run)."""
    p = Path(path)
    if p.is_file():
        return not (p.parent.parent / RUN_INFO_FILE).exists() and not (
            p.parent.parent / "vocab.json").exists()
    return (p / "var_dims.pkl").exists() or (p / "pert_onehot_map.pt").exists()


def model_from_arc(run_dir: str | Path, checkpoint: str | Path | None = None, *,
                   attention: str | None = None, rope: Any = ..., verbose: bool = True,
                   **options: Any) -> StateTransitionModel:
    """A fitted ``StateTransitionModel`` from an arc-state run directory (via the importer;
    ``options``: more of :func:`statetx.arc.load_arc_run`'s, e.g. ``trust_pickle``)."""
    from statetx.model import StateTransitionModel

    model = StateTransitionModel.from_arc_state(run_dir, checkpoint or "final.ckpt",
                                                attention=attention, rope=rope, verbose=verbose,
                                                **options)
    model.run_dir_ = Path(run_dir)
    return model
