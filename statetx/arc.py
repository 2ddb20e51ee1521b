"""Import arc-state 0.9.12 / 0.11.1 run directories and Lightning checkpoints (arc-checkpoints.md).

``load_arc_run`` reads a run directory safely (no pickled code is executed unless
``trust_pickle=True``), infers the architecture from tensor shapes, cross-checks it with the saved
hyper-parameters, resolves the attention mode without guessing, maps the state_dict onto
:class:`statetx.nn.StateTransitionNetwork` (skipping frozen token/position tables, transposing GPT-2
Conv1D weights) and returns the network with vocabularies, gene names and data settings.

Imported weights keep their original licence (Arc's released weights: Arc Research Institute State
Model Non-Commercial License); statetx never downloads or bundles them.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import EllipsisType
from typing import Any, NamedTuple

import numpy as np
import torch

from statetx._options import ARCH_CHOICES
from statetx._utils import file_sha256, preview, repeated, warn
from statetx.errors import ConfigError, DataError
from statetx.losses import LOSS_NAMES
from statetx.nn import NetworkConfig, StateTransitionNetwork, check_finite_weights

LICENSE_NOTICE = (
    "imported weights keep their original licence (arc-state code: CC BY-NC-SA 4.0; Arc's released "
    "weights: Arc Research Institute State Model Non-Commercial License)"
)
STATETX_ORIGIN_KEY = "statetx_origin"  # (checkpoint entry written by statetx.arc_export)
_NP_CORE = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1


def license_notice(origin: Any = None) -> str:
    """The licence line of imported weights: :data:`LICENSE_NOTICE`, unless the checkpoint's
    ``statetx_origin`` entry (a run that :func:`statetx.arc_export.export_arc` wrote) says that
    statetx trained them (then the training data's licence, and an ``init_from`` checkpoint's
    when they started from one)."""
    if not isinstance(origin, dict) or origin.get("trained_by") != "statetx":
        return LICENSE_NOTICE
    start = origin.get("init_from")
    if start:
        return (f"trained with statetx (MIT code), starting from the weights of {start} "
                "(model.kwargs.init_from): those weights' licence applies (Arc's released "
                "weights: Arc Research Institute State Model Non-Commercial License)")
    return ("trained with statetx (MIT code) and exported as an arc-state run; the weights "
            "follow the licence of the training data")


class AmbiguousAttentionError(ConfigError):
    """The checkpoint does not record whether it was trained with causal or bidirectional attention.
    """


class UnsupportedCheckpointError(DataError):
    """The checkpoint holds modules statetx cannot rebuild (batch/confidence token, LoRA, ...)."""


@dataclass
class ArcImport:
    """Everything ``load_arc_run`` recovers from an arc-state run directory."""

    network: StateTransitionNetwork  # weights loaded, eval mode
    config: NetworkConfig
    perturbations: list[str]  # pert map order
    cell_types: list[str]
    batches: list[str]
    pert_vectors: np.ndarray  # [n_pert, P] rows of the pert map (one-hot or features)
    var_dims: dict
    gene_names: list[str]  # genes of the model's gene-space output
    data_kwargs: dict  # pert_col, cell_type_key, batch_col, control_pert, embed_key, ...
    notes: list[str] = field(default_factory=list)  # human-readable resolution notes
    unused: list[str] = field(default_factory=list)  # modules present but never trained
    hyper_parameters: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)  # loss, loss_kwargs (for fine-tuning)
    provenance: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Safe reading
# --------------------------------------------------------------------------------------------


def _safe_load_from_bytes(b: bytes) -> Any:
    """Replacement for torch.storage._load_from_bytes that never unpickles code."""
    return torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")


def _np_dtype_classes() -> list[type]:
    mod = getattr(np, "dtypes", None)
    return [getattr(mod, n) for n in dir(mod) if n.endswith("DType")] if mod else []


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only plain containers, NumPy scalar/array reconstruction and torch
    tensor reconstruction (storages re-read with ``weights_only=True``)."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in (
                "scalar", "_reconstruct"):
            return getattr(_NP_CORE.multiarray, name)
        if (module, name) in (("numpy", "dtype"), ("numpy", "ndarray")):
            return getattr(np, name)
        if module == "numpy.dtypes" and name.endswith("DType") and hasattr(np.dtypes, name):
            return getattr(np.dtypes, name)
        if (module, name) in (("builtins", "set"), ("builtins", "frozenset"),
                              ("builtins", "complex"), ("builtins", "bytearray"),
                              ("collections", "OrderedDict")):
            return super().find_class(module, name)
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"),
                              ("torch._utils", "_rebuild_tensor")):
            return super().find_class(module, name)
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _safe_load_from_bytes
        raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")


_GLOBAL_RE = re.compile(r"GLOBAL\s+([A-Za-z_][\w.]*[\w])|refusing to load the global "
                        r"([A-Za-z_][\w.]*[\w])")
# sentences of torch's message that give advice (weights_only=False, allow-listing): never quoted
_ADVICE_RE = re.compile(r"weights_only|safe_globals|trust|documentation of torch\.load|"
                        r"file an issue|two options|Weights only load failed", re.IGNORECASE)
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


def _loader_detail(err: Exception, limit: int = 300) -> str:
    """The informative part of a loader error: the refused global named first (so no cut can
    lose it), torch's advice (re-run with weights_only=False, allow-list the global) left out."""
    text = _ANSI_RE.sub("", str(err))
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]
    kept = " ".join(s for s in sentences if not _ADVICE_RE.search(s))
    m = _GLOBAL_RE.search(text)
    name = (m.group(1) or m.group(2)) if m else None
    head = f"refused global {name}" if name and name not in kept[:limit] else ""
    detail = "; ".join(x for x in (head, kept[:limit]) if x)
    return f"{type(err).__name__}: {detail or 'no detail'}"


def _needs_trust(path: Path, err: Exception) -> DataError:
    return DataError(
        f"{path} cannot be read with the restricted loader ({_loader_detail(err)}). Reading it "
        "needs full unpickling, which executes code stored in the file; do this only if you "
        "trust its source, by passing trust_pickle=True."
    )


def _refused_global(err: Exception) -> bool:
    """Whether a restricted load failed on a global it may not resolve (rather than on a
    damaged file)."""
    text = str(err)
    return isinstance(err, pickle.UnpicklingError) and (
        "refusing to load the global" in text or "Unsupported global" in text
        or "GLOBAL" in text)


def _damaged(path: Path, err: Exception) -> DataError:
    return DataError(f"could not read {path} ({_loader_detail(err, 200)}): the file "
                     "looks damaged or truncated. Copy it again from the run that wrote it.")


_ZIPS_CHECKED: set[tuple[str, int, int]] = set()  # (path, size, mtime) of files found intact


def _check_zip(path: Path) -> None:
    """Verify the CRC-32 of every entry of a zip container (torch's own reader does not), so
    damaged weights are reported instead of loaded: one sequential read of the file, once per
    file version in a process."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key in _ZIPS_CHECKED or not zipfile.is_zipfile(path):
        return  # a legacy (non-zip) torch file, or one torch will report as damaged
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as err:
        raise _damaged(path, err) from err
    if bad is not None:
        raise DataError(f"could not read {path}: its entry {bad!r} fails the zip CRC check, so "
                        "the file is damaged (its data differ from what was written). Copy it "
                        "again from the run that wrote it.")
    _ZIPS_CHECKED.add(key)


def load_pickle(path: str | Path, trust_pickle: bool = False) -> Any:
    """Read a plain pickle (.pkl) with :class:`RestrictedUnpickler` (full pickle if trusted)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except Exception as err:  # noqa: BLE001 - any failure of the restricted path
        if not _refused_global(err):
            raise _damaged(path, err) from err
        if not trust_pickle:
            raise _needs_trust(path, err) from err
        warn(f"fully unpickling {path} (trust_pickle=True)", UserWarning)
        return pickle.loads(data)  # noqa: S301 - explicitly trusted by the caller


def load_torch(path: str | Path, trust_pickle: bool = False) -> Any:
    """``torch.load(weights_only=True)``, NumPy scalars/strings allow-listed (full if trusted)."""
    path = Path(path)
    if path.suffix == ".pkl":
        return load_pickle(path, trust_pickle)
    mc = _NP_CORE.multiarray
    allowed: list[Any] = [mc.scalar, np.dtype, mc._reconstruct, np.ndarray,
                          (mc.scalar, "numpy.core.multiarray.scalar"),
                          (mc._reconstruct, "numpy.core.multiarray._reconstruct"),
                          *_np_dtype_classes()]
    _check_zip(path)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise DataError(f"{path} not found.") from None
    except Exception as err:  # noqa: BLE001 - a refused global, or a damaged file
        if not _refused_global(err):
            raise _damaged(path, err) from err
        if not trust_pickle:
            raise _needs_trust(path, err) from err
        warn(f"fully unpickling {path} (trust_pickle=True)", UserWarning)
        return torch.load(path, weights_only=False, map_location="cpu")


def _plain(obj: Any) -> Any:
    """NumPy scalars/strings/arrays and tensors inside containers -> plain Python values."""
    if isinstance(obj, dict):
        return {str(k) if isinstance(k, np.str_) else k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def _mapping(value: Any, path: Path, what: str) -> dict:
    """``value`` as a dict (None: empty); anything else is a DataError naming the file."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise DataError(f"{path}: {what} should be a mapping (key: value), not a "
                        f"{type(value).__name__}; the file is not an arc-state run's.")
    return dict(value)


def _read_map(path: Path, trust_pickle: bool) -> tuple[list[str], np.ndarray]:
    """A label -> vector map in file order: (labels, float32 matrix)."""
    m = load_torch(path, trust_pickle)
    if not isinstance(m, dict) or not m:
        raise DataError(f"{path} should hold a non-empty dict label -> vector, got "
                        f"{type(m).__name__}.")
    labels = [str(k) for k in m]
    rows = [np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v,
                       dtype=np.float32).reshape(-1) for v in m.values()]
    if len({r.shape for r in rows}) != 1:
        raise DataError(f"{path}: vectors have different lengths.")
    bad = [lab for lab, r in zip(labels, rows) if not np.isfinite(r).all()]
    if bad:
        raise DataError(f"{path}: the vectors of {preview(bad)} hold NaN or Inf; their cells "
                        "would be predicted as NaN. Repair the map (or the run it came from).")
    return labels, np.stack(rows)


_NUMERIC_KEYS = {"lr", "weight_decay", "blur", "dropout", "decoder_dropout", "rms_norm_eps",
                 "layer_norm_eps", "layer_norm_epsilon", "regularization", "sinkhorn_weight",
                 "energy_weight", "val_subsample_fraction", "rope_theta", "decoder_weight",
                 "decoder_loss_weight"}
_NUM_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(obj: Any) -> Any:
    """Parse numeric strings (YAML 1.1 reads ``1e-4`` as a string) under known numeric keys."""
    if isinstance(obj, dict):
        return {k: (float(v) if k in _NUMERIC_KEYS and isinstance(v, str) and _NUM_RE.match(v)
                    else _coerce(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_coerce(v) for v in obj]
    return obj


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        ctx, ctx_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
        if ctx and ctx_mark is not None and ctx_mark is not mark:
            problem += f"; {ctx} that starts at line {ctx_mark.line + 1}"
        raise DataError(f"{path} is not valid YAML{where} ({problem}); fix the file, or "
                        "remove it to take the settings from the checkpoint.") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not a UTF-8 text file ({err}); it looks damaged.") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} does not hold a YAML mapping.")
    return _coerce(data)


# --------------------------------------------------------------------------------------------
# Architecture inference
# --------------------------------------------------------------------------------------------

_SKIP_RE = re.compile(
    r"transformer_backbone\.(embed_tokens\.weight|wte\.weight|wpe\.weight"
    r"|h\.\d+\.attn\.(bias|masked_bias))$|.*rotary_emb\.inv_freq$"
)
_CONV1D_RE = re.compile(r"transformer_backbone\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc"
                        r"|mlp\.c_proj)\.weight$")
_UNSUPPORTED = (
    (re.compile(r"^confidence_token\."), "confidence-token checkpoints are not yet supported "
     "(the projection layout is unverified; dropping the token would change the predictions)"),
    (re.compile(r"^(batch_token|batch_classifier\.)"), "the arc-state 0.11.1 batch token is not "
     "supported"),
    (re.compile(r"lora_[AB]|lora_embedding|\.base_layer\."), "LoRA-wrapped weights are not "
     "supported; merge the adapters first"),
)


def _indexed(sd: dict, prefix: str, suffix: str = ".weight") -> list[tuple[int, torch.Tensor]]:
    pat = re.compile(re.escape(prefix) + r"\.(\d+)" + re.escape(suffix) + "$")
    out = [(int(m.group(1)), v) for k, v in sd.items() if (m := pat.match(k))]
    return sorted(out, key=lambda t: t[0])


def _mlp_layers(sd: dict, prefix: str) -> list[torch.Tensor]:
    """Linear weights of an arc MLP container (indices 0, 3, 6, ...)."""
    layers = [(i, w) for i, w in _indexed(sd, prefix) if w.dim() == 2]
    idx = [i for i, _ in layers]
    if idx != [3 * k for k in range(len(idx))]:
        raise DataError(f"unexpected layout of {prefix}: Linear layers at indices {idx} "
                        "(expected 0, 3, 6, ...).")
    return [w for _, w in layers]


def _matching_presets(h: int, attn_width: int, inter: int, backbone: str) -> list[str]:
    from statetx.presets import PRESETS

    return [f"{n} ({p['n_heads']} heads x {p['head_dim']})" for n, p in PRESETS.items()
            if p["hidden_dim"] == h and p["n_heads"] * p["head_dim"] == attn_width
            and p["intermediate_size"] == inter and p["backbone"] == backbone]


class _Checker:
    """Collects hyper-parameter / shape disagreements (errors when strict, else notes)."""

    def __init__(self, strict: bool, notes: list[str]) -> None:
        self.strict, self.notes = strict, notes

    def same(self, what: str, from_shapes: Any, declared: Any, source: str) -> None:
        if declared is None or declared == from_shapes:
            return
        msg = (f"{what}: the weights say {from_shapes!r} but {source} says {declared!r}")
        if self.strict:
            raise DataError(msg + "; the files do not belong together (pass strict=False, "
                            "--no-strict on the command line, to trust the weights).")
        self.notes.append(msg + " (weights trusted, strict=False)")


# hyper-parameter keys arc-state 0.9.12 / 0.11.1 write (arc-checkpoints.md §4; anything else is
# unknown to this importer and said, since it may change the model in a way statetx cannot see)
_IGNORED_KEYS = frozenset({
    "softplus", "loss_fn", "weight_decay", "transformer_decoder", "use_effect_gating_token",
    "mask_attn", "decoder_loss_weight", "layer_norm_eps", "hidden_dropout", "rotary_dim",
    "use_rotary_embeddings", "wandb_track", "use_mfu", "mfu_kwargs",
    "cumulative_flops_use_backward", "devices", "strategy", "val_freq", "ckpt_every_n_steps",
    "max_steps", "train_seed", "batch_size",
})
_KNOWN_HP_KEYS = _IGNORED_KEYS | {
    "input_dim", "output_dim", "pert_dim", "batch_dim", "hidden_dim", "gene_dim", "hvg_dim",
    "gene_names", "embed_key", "output_space", "control_pert", "cell_set_len", "extra_tokens",
    "n_encoder_layers", "n_decoder_layers", "use_basal_projection", "predict_residual",
    "activation", "dropout", "batch_encoder", "gene_decoder_bool", "decoder_cfg",
    "decoder_hidden_dims", "decoder_dropout", "decoder_weight", "loss", "distributional_loss",
    "blur", "sinkhorn_weight", "energy_weight", "mmd_num_chunks", "randomize_mmd_chunks",
    "regularization", "transformer_backbone_key", "transformer_backbone_kwargs",
    "confidence_token", "confidence_head", "basal_mapping_strategy", "use_batch_token", "lora",
    "init_from", "freeze_pert_backbone", "freeze_pert", "residual_decoder",
    "finetune_vci_decoder", "nb_decoder", "llm_name", "lr", "log_every_n_steps",
    "val_subsample_fraction",
}
_KNOWN_BACKBONE_KEYS = frozenset({
    # Llama
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
    "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id",
    "eos_token_id", "pretraining_tp", "tie_word_embeddings", "rope_theta", "rope_scaling",
    "rope_parameters", "attention_bias", "attention_dropout", "mlp_bias",
    "bidirectional_attention",
    # arc-state extras without effect
    "hidden_dropout", "layer_norm_eps", "rotary_dim", "use_rotary_embeddings",
    # GPT-2
    "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention",
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    "summary_first_dropout",
    # generic transformers config entries
    "torch_dtype", "dtype", "attn_implementation", "_attn_implementation", "model_type",
    "architectures", "transformers_version", "output_attentions", "output_hidden_states",
    "return_dict", "is_decoder",
})
_KNOWN_LIGHTNING_MAJOR = "2"  # arc-state 0.9.12 / 0.11.1 write Lightning 2.x checkpoints


def _warn_noted(msg: str, notes: list[str], label: str = "note: ") -> None:
    """A warning for the caller of :func:`load_arc_run` that the import notes keep too."""
    warn(msg, UserWarning)
    notes.append(label + msg)


def _unknown_format(hp: dict, kw: dict, lightning: Any, ckpt_path: Path,
                    notes: list[str]) -> list[str]:
    """Warn about what this importer does not know (a newer Lightning or arc-state writing keys
    statetx may not rebuild); returns the items named, for the provenance."""
    items = [f"hyper_parameters['{k}']" for k in hp
             if k not in _KNOWN_HP_KEYS and not str(k).startswith("gradient_")]
    items += [f"transformer_backbone_kwargs['{k}']" for k in kw if k not in _KNOWN_BACKBONE_KEYS]
    if lightning is None:
        notes.append("the checkpoint records no pytorch-lightning_version")
    elif str(lightning).split(".")[0] != _KNOWN_LIGHTNING_MAJOR:
        items.insert(0, f"pytorch-lightning_version {lightning}")
    if items:
        msg = (f"{ckpt_path} was written by a version this importer does not know ("
               f"{preview(items, 12)}; known: Lightning 2.x checkpoints of arc-state 0.9.12 / "
               "0.11.1): the import proceeds, but check the imported model's predictions "
               "against the source, since settings statetx does not read may change them")
        _warn_noted(msg, notes)
    return items


# config.yaml entries that may differ from the checkpoint's hyper-parameters: no effect on the
# model (arc-checkpoints.md §4), n_positions (arc-state adds extra_tokens to it when it builds a
# GPT-2 backbone), training-only options and generic transformers entries
_MAY_DIFFER = _IGNORED_KEYS | {
    "n_positions", "init_from", "freeze_pert_backbone", "freeze_pert", "llm_name",
    "log_every_n_steps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
    "vocab_size", "tie_word_embeddings", "attention_dropout", "resid_pdrop", "embd_pdrop",
    "attn_pdrop", "torch_dtype", "dtype", "attn_implementation", "_attn_implementation",
}


def _norm(v: Any) -> Any:
    """A value as compared between config.yaml and the hyper-parameters."""
    if isinstance(v, str) and _NUM_RE.match(v.strip()):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v


def _same_value(a: Any, b: Any) -> bool:
    a, b = _norm(a), _norm(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return all(_same_value(a[k], b[k]) for k in a.keys() & b.keys())
    return a == b


def _config_disagreements(hp: dict, section: dict, prefix: str) -> list[tuple[str, Any, Any]]:
    """(key path, checkpoint value, config.yaml value) for every model-defining key both carry
    with different values (nested mappings such as transformer_backbone_kwargs compared key by
    key)."""
    out: list[tuple[str, Any, Any]] = []
    for key, yv in section.items():
        if key not in hp or key in _MAY_DIFFER:
            continue
        hv = hp[key]
        if isinstance(hv, dict) and isinstance(yv, dict):
            out += _config_disagreements(hv, yv, f"{prefix}{key}.")
        elif key == "transformer_backbone_key" and isinstance(hv, str) and isinstance(yv, str):
            if hv.lower() != yv.lower():
                out.append((prefix + key, hv, yv))
        elif not _same_value(hv, yv):
            out.append((prefix + key, hv, yv))
    return out


def _check_config_yaml(hp: dict, cfg_yaml: dict, yaml_path: Path, ckpt_path: Path,
                       strict: bool, notes: list[str]) -> None:
    """config.yaml must describe the same model as the checkpoint's hyper-parameters
    (arc-checkpoints.md §6); the hyper-parameters win (they are what the weights were built
    with), config.yaml only fills in what they lack."""
    diffs: list[tuple[str, Any, Any]] = []
    for section in ("model", "data"):
        kwargs = (cfg_yaml.get(section) or {}).get("kwargs") or {}
        if isinstance(kwargs, dict):
            diffs += _config_disagreements(hp, kwargs, f"{section}.kwargs.")
    if not diffs:
        return
    listed = "; ".join(f"{key}: {yv!r} in config.yaml, {hv!r} in the checkpoint"
                       for key, hv, yv in diffs[:8])
    if len(diffs) > 8:
        listed += f"; and {len(diffs) - 8} more"
    msg = (f"{yaml_path} contradicts the hyper-parameters saved in {ckpt_path} ({listed})")
    if strict:
        raise DataError(msg + ". The checkpoint's hyper-parameters are what the weights were "
                        "trained with, so this config.yaml probably belongs to another run: put "
                        "the run's own config.yaml next to the checkpoint or remove it (the "
                        "settings then come from the checkpoint), or pass strict=False "
                        "(--no-strict) to use the checkpoint's values.")
    notes.append(msg + " (the checkpoint's values used, strict=False)")


# what the unrecorded settings mean, for the error that asks for them
CONTROL_PERT = "the control label the model was trained with"
CELL_SET_LEN = "the cells per set it was trained with"


def load_arc_run(
    run_dir: str | Path,
    checkpoint: str | Path = "final.ckpt",
    attention: str | None = None,
    rope: float | None | EllipsisType = ...,
    *,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
    control_pert: str | None = None,
    embed_key: str | None | EllipsisType = ...,
    cell_set_len: int | None = None,
    trust_pickle: bool = False,
    strict: bool = True,
    keep_unused_decoder: bool = False,
    verbose: bool = False,
) -> ArcImport:
    """Load an arc-state run directory (or a checkpoint file inside one) into statetx.

    ``attention`` ("bidirectional" | "causal") and ``rope`` (None or a rotary base; ``...`` = not
    given) override what the checkpoint records. A 0.9.x Llama checkpoint records no attention mode:
    ``attention`` is then required (AmbiguousAttentionError otherwise). GPT-2 checkpoints default to
    causal without positions (as they were trained), with a warning. ``n_heads``/``n_kv_heads``/
    ``head_dim`` are needed only when the hyper-parameters lack them; likewise ``control_pert``,
    ``embed_key`` (``...`` = not given; None = X) and ``cell_set_len`` when neither the
    checkpoint nor config.yaml records them (a value that contradicts the record is an error,
    and none is ever guessed silently). A gene decoder that the
    reference never trained is dropped unless ``keep_unused_decoder`` (then listed in ``unused``).
    ``verbose`` prints the resolution notes (real checkpoint file, attention, licence, ...).
    """
    notes: list[str] = []
    run, ckpt_path = _resolve_paths(Path(run_dir), checkpoint, notes)
    ckpt, hp, sd = _read_checkpoint(ckpt_path, trust_pickle)
    data_yaml, model_yaml = _read_config_yaml(run, hp, ckpt_path, strict, notes)
    check = _Checker(strict, notes)
    var_dims = _read_var_dims(run, trust_pickle, notes)

    # ---- shapes -> architecture (arc-checkpoints.md §6) ------------------------------------
    enc = _encoder_shapes(sd, ckpt_path)
    # the checkpoint's backbone settings win; config.yaml fills in only what they lack
    kw = {**dict(model_yaml.get("transformer_backbone_kwargs") or {}),
          **dict(hp.get("transformer_backbone_kwargs") or {})}
    unknown = _unknown_format(hp, kw, ckpt.get("pytorch-lightning_version"), ckpt_path, notes)
    bb = _backbone_shapes(sd, kw, hp, enc.hidden_dim, n_heads, n_kv_heads, head_dim, ckpt_path,
                          check)
    dec = _infer_gene_decoder(sd)
    _cross_check_shapes(enc, hp, var_dims, check)

    # ---- settings shapes cannot tell ----------------------------------------------------------
    setting = _setting_lookup(hp, model_yaml, data_yaml)
    _check_token_flags(setting, hp, sd, check)
    embed_key = _embed_key(hp, data_yaml, embed_key, ckpt_path, check)
    output_space, predict_residual = _output_space(hp, data_yaml, setting, enc.has_all_block,
                                                   ckpt_path, check)
    activation = str(setting("activation", "gelu")).lower()
    set_len = _cell_set_len(hp, model_yaml, kw, setting, cell_set_len, ckpt_path, notes)
    gene_dim, dec_dims, dec_residual, dec_dropout, unused = _gene_decoder_settings(
        dec, enc.output_dim, embed_key, output_space, keep_unused_decoder, hp, setting, check,
        notes)
    # reference ReLU rule for imported models
    out_act = "relu" if (embed_key in (None, "X_hvg") or dec is None) else "none"
    notes.append(f"output activation {out_act} (arc-state rule: ReLU iff embed_key is None/X_hvg "
                 "or there is no gene decoder)")

    att, rp = _resolve_attention(bb.backbone, kw, attention, rope, notes)

    config = NetworkConfig(
        input_dim=enc.input_dim, output_dim=enc.output_dim, pert_dim=enc.pert_dim,
        hidden_dim=enc.hidden_dim, n_encoder_layers=enc.n_encoder_layers,
        n_decoder_layers=enc.n_decoder_layers, dropout=float(setting("dropout", 0.1)),
        activation=activation, use_basal_projection=enc.use_basal_projection,
        backbone=bb.backbone, n_layers=bb.n_layers, n_heads=bb.n_heads, head_dim=bb.head_dim,
        n_kv_heads=bb.n_kv_heads, intermediate_size=bb.intermediate_size,
        attention=att, rope=rp, norm_eps=bb.norm_eps, predict_residual=predict_residual,
        residual_space="hidden",
        output_space=output_space, output_activation=out_act, batch_encoder=enc.batch_dim > 0,
        batch_dim=enc.batch_dim, gene_dim=gene_dim, decoder_hidden_dims=dec_dims,
        decoder_dropout=dec_dropout, residual_decoder=dec_residual, confidence_token=False,
    )
    network = StateTransitionNetwork.for_loading(config)
    _load_weights(network, sd, drop_decoder=dec is not None and gene_dim == 0)
    network.eval()

    # ---- vocabularies, genes, data settings --------------------------------------------------
    gene_width = gene_dim if (gene_dim and "gene_decoder" not in unused) else enc.output_dim
    perturbations, pert_vectors, cell_types, batches, gene_names = _vocabularies(
        run, var_dims, hp, enc, output_space, gene_width, trust_pickle, check, notes)
    data_kwargs = _data_kwargs(data_yaml, hp, setting, control_pert, embed_key, output_space,
                               set_len, perturbations, ckpt_path, notes)
    training = _loss_settings(setting, notes)
    provenance = _provenance(ckpt, ckpt_path, run, hp, kw, unknown, att, rp)
    notes.append(provenance["license_notice"])
    if verbose:
        for note in notes:
            print(f"[arc import] {note}")
    return ArcImport(
        network=network, config=config, perturbations=perturbations, cell_types=cell_types,
        batches=batches, pert_vectors=pert_vectors, var_dims=var_dims, gene_names=gene_names,
        data_kwargs=data_kwargs, notes=notes, unused=unused, hyper_parameters=hp,
        training=training, provenance=provenance,
    )


# --------------------------------------------------------------------------------------------
# helpers of load_arc_run
# --------------------------------------------------------------------------------------------


def _read_checkpoint(ckpt_path: Path, trust_pickle: bool) -> tuple[dict, dict, dict]:
    """The Lightning checkpoint, its hyper-parameters (plain values) and its tensors (the
    ``model.`` prefix removed); modules statetx cannot rebuild are refused."""
    ckpt = load_torch(ckpt_path, trust_pickle)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise DataError(f"{ckpt_path} is not a Lightning checkpoint (no 'state_dict' entry).")
    hp = _plain(_mapping(ckpt.get("hyper_parameters"), ckpt_path, "its 'hyper_parameters'"))
    sd = {k: v for k, v in _mapping(ckpt["state_dict"], ckpt_path, "its 'state_dict'").items()
          if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items()}
    _reject_unsupported(sd, hp, ckpt_path)
    return ckpt, hp, sd


def _read_config_yaml(run: Path, hp: dict, ckpt_path: Path, strict: bool,
                      notes: list[str]) -> tuple[dict, dict]:
    """config.yaml's ``(data.kwargs, model.kwargs)`` (empty without the file), checked against
    the hyper-parameters."""
    yaml_path = run / "config.yaml"
    cfg_yaml = _read_yaml(yaml_path) if yaml_path.exists() else {}
    data_yaml, model_yaml = (_mapping(_mapping(cfg_yaml.get(part), yaml_path, part).get(
        "kwargs"), yaml_path, f"{part}.kwargs") for part in ("data", "model"))
    if not cfg_yaml:
        notes.append("config.yaml not found: settings taken from the checkpoint's hyper-parameters")
    else:
        _check_config_yaml(hp, cfg_yaml, yaml_path, ckpt_path, strict, notes)
    return data_yaml, model_yaml


def _read_var_dims(run: Path, trust_pickle: bool, notes: list[str]) -> dict:
    """var_dims.pkl as plain values (empty without the file)."""
    var_dims_path = run / "var_dims.pkl"
    var_dims = _plain(_mapping(load_pickle(var_dims_path, trust_pickle), var_dims_path,
                               "the file")) if var_dims_path.exists() else {}
    if not var_dims:
        notes.append("var_dims.pkl not found: dimensions and gene names from the checkpoint")
    return var_dims


class _Encoders(NamedTuple):
    """Widths and depths read off the weights around the backbone."""

    hidden_dim: int
    pert_dim: int
    input_dim: int
    output_dim: int
    n_encoder_layers: int
    n_decoder_layers: int
    use_basal_projection: bool
    has_all_block: bool  # final_down_then_up (output_space "all" with predict_residual)
    batch_dim: int  # 0: no batch encoder


class _Backbone(NamedTuple):
    """The transformer backbone as inferred by :func:`_infer_backbone`."""

    backbone: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float


def _encoder_shapes(sd: dict, ckpt_path: Path) -> _Encoders:
    """The pert / basal encoders, project_out and the batch encoder, from their weights."""
    pert_w = _mlp_layers(sd, "pert_encoder")
    if not pert_w:
        raise DataError(f"{ckpt_path}: no pert_encoder weights; not an arc-state ST checkpoint.")
    h, p_dim = pert_w[0].shape
    n_enc = len(pert_w)
    if "basal_encoder.weight" in sd:
        use_basal_projection, d_in = False, sd["basal_encoder.weight"].shape[1]
    else:
        basal_w = _mlp_layers(sd, "basal_encoder")
        if not basal_w:
            raise DataError(f"{ckpt_path}: no basal_encoder weights found.")
        if len(basal_w) != n_enc:
            raise DataError(f"basal_encoder has {len(basal_w)} Linear layers but pert_encoder has "
                            f"{n_enc}; statetx builds both with n_encoder_layers.")
        use_basal_projection, d_in = True, basal_w[0].shape[1]
    proj_w = _mlp_layers(sd, "project_out")
    if not proj_w:
        raise DataError(f"{ckpt_path}: no project_out weights found.")
    n_dec, d_out = len(proj_w), proj_w[-1].shape[0]
    batch_n = sd["batch_encoder.weight"].shape[0] if "batch_encoder.weight" in sd else 0
    return _Encoders(h, p_dim, d_in, d_out, n_enc, n_dec, use_basal_projection,
                     "final_down_then_up.0.weight" in sd, batch_n)


def _backbone_shapes(sd: dict, kw: dict, hp: dict, h: int, n_heads: int | None,
                     n_kv_heads: int | None, head_dim: int | None, ckpt_path: Path,
                     check: _Checker) -> _Backbone:
    """The backbone inferred from the shapes, checked against the backbone settings recorded."""
    bb = _Backbone(*_infer_backbone(sd, kw, h, n_heads, n_kv_heads, head_dim, ckpt_path))
    check.same("backbone", bb.backbone,
               {"llama": "llama", "gpt2": "gpt2"}.get(str(hp.get("transformer_backbone_key",
                                                                 "")).lower()),
               "hyper_parameters['transformer_backbone_key']")
    # the backbone's own settings against the shapes (a block missing, another FFN width)
    keys = ("num_hidden_layers", "intermediate_size", "hidden_size") if bb.backbone == "llama" \
        else ("n_layer", "n_inner", "n_embd")
    for what, key, value in zip(("n_layers", "intermediate_size", "hidden_dim"), keys,
                                (bb.n_layers, bb.intermediate_size, h)):
        check.same(what, value, kw.get(key), f"transformer_backbone_kwargs['{key}']")
    return bb


def _cross_check_shapes(enc: _Encoders, hp: dict, var_dims: dict, check: _Checker) -> None:
    """The shapes against the hyper-parameters and var_dims.pkl."""
    for name, value in (("hidden_dim", enc.hidden_dim), ("pert_dim", enc.pert_dim),
                        ("input_dim", enc.input_dim), ("output_dim", enc.output_dim),
                        ("n_encoder_layers", enc.n_encoder_layers),
                        ("n_decoder_layers", enc.n_decoder_layers)):
        check.same(name, value, hp.get(name), f"hyper_parameters['{name}']")
    for name, value in (("pert_dim", enc.pert_dim), ("input_dim", enc.input_dim),
                        ("output_dim", enc.output_dim)):
        check.same(name, value, var_dims.get(name), f"var_dims.pkl['{name}']")
    check.same("use_basal_projection", enc.use_basal_projection, hp.get("use_basal_projection"),
               "hyper_parameters['use_basal_projection']")
    if "batch_encoder" in hp:
        check.same("batch_encoder", enc.batch_dim > 0, bool(hp["batch_encoder"]),
                   "hyper_parameters['batch_encoder']")
    if enc.batch_dim:
        check.same("batch_dim", enc.batch_dim, hp.get("batch_dim"),
                   "hyper_parameters['batch_dim']")


def _setting_lookup(hp: dict, model_yaml: dict, data_yaml: dict) -> Callable[[str, Any], Any]:
    """``setting(key, default)``: the hyper-parameters' value, else config.yaml's (model, then
    data kwargs), else ``default``."""

    def setting(key: str, default: Any) -> Any:
        for src in (hp, model_yaml, data_yaml):
            if key in src:
                return src[key]
        return default

    return setting


def _check_token_flags(setting: Callable[[str, Any], Any], hp: dict, sd: dict,
                       check: _Checker) -> None:
    """Tokens statetx rejects when their weights are present: declared without weights, the
    hyper-parameters and the weights do not belong together."""
    for key, prefix in (("confidence_token", "confidence_token."),
                        ("use_batch_token", "batch_token")):
        declared = setting(key, None)
        if declared is not None:
            check.same(f"{key} ({prefix}* weights present)",
                       any(k.startswith(prefix) for k in sd), bool(declared),
                       f"hyper_parameters['{key}']" if key in hp else "config.yaml")


def _embed_key(hp: dict, data_yaml: dict, given: str | None | EllipsisType, ckpt_path: Path,
               check: _Checker) -> str | None:
    """The input embedding the run records, or the caller's (``...``: not given)."""
    recorded = [src["embed_key"] for src in (hp, data_yaml) if "embed_key" in src]
    if "embed_key" in hp and "embed_key" in data_yaml:
        check.same("embed_key", hp["embed_key"], data_yaml["embed_key"], "config.yaml")
    return _fill_in("embed_key", recorded[0] if recorded else ..., given, ckpt_path,
                    "None for X, or an obsm key such as 'X_hvg'")


def _output_space(hp: dict, data_yaml: dict, setting: Callable[[str, Any], Any],
                  has_all_block: bool, ckpt_path: Path, check: _Checker) -> tuple[str, bool]:
    """``(output_space, predict_residual)``; the output space must be recorded."""
    output_space = hp.get("output_space", data_yaml.get("output_space"))
    predict_residual = bool(setting("predict_residual", True))
    if output_space is None:
        raise DataError(f"{ckpt_path}: the output space is recorded neither in the checkpoint nor "
                        "in config.yaml (data.kwargs.output_space); put config.yaml next to it.")
    if output_space not in ARCH_CHOICES["output_space"]:
        raise DataError(f"unknown output_space {output_space!r} in the checkpoint.")
    check.same("final_down_then_up present", has_all_block,
               output_space == "all" and predict_residual, "output_space/predict_residual")
    return output_space, predict_residual


def _cell_set_len(hp: dict, model_yaml: dict, kw: dict, setting: Callable[[str, Any], Any],
                  cell_set_len: int | None, ckpt_path: Path, notes: list[str]) -> int | None:
    """The cells per set the run records (GPT-2: from n_positions), or the caller's."""
    set_len = (hp.get("cell_set_len") or model_yaml.get("cell_set_len")
               or kw.get("max_position_embeddings") or ...)
    extra = setting("extra_tokens", None)
    if set_len is ... and kw.get("n_positions") and (extra is not None or cell_set_len is None):
        # GPT-2: n_positions = cell_set_len + extra_tokens (model.md §9)
        set_len = kw["n_positions"] - int(extra or 0)
        if extra is None:
            notes.append(f"cell_set_len {set_len} from n_positions (extra_tokens is not "
                         "recorded: taken as 0); pass cell_set_len=... if it differs")
    return _fill_in("cell_set_len", set_len, cell_set_len or ..., ckpt_path, CELL_SET_LEN,
                    required=False)


def _gene_decoder_settings(
    dec: tuple[int, list[int], int, bool] | None, d_out: int, embed_key: str | None,
    output_space: str, keep_unused_decoder: bool, hp: dict,
    setting: Callable[[str, Any], Any], check: _Checker, notes: list[str],
) -> tuple[int, list[int], bool, float, list[str]]:
    """``(gene_dim, hidden widths, residual, dropout, unused)`` of the gene decoder to build:
    trained only with gene-space targets (model.md §7), else dropped (or kept, marked unused)."""
    gene_dim, dec_dims, dec_residual, dec_dropout = 0, [], False, 0.1
    unused: list[str] = []
    if dec is not None:
        latent, dims, g_dim, dec_residual = dec
        check.same("gene decoder input width", latent, d_out, "project_out")
        dec_cfg = hp.get("decoder_cfg") or {}
        dec_dropout = float(dec_cfg.get("dropout", setting("decoder_dropout", 0.1)) or 0.1)
        trained = embed_key is not None and (
            (embed_key != "X_hvg" and output_space == "gene") or output_space == "all")
        if trained or keep_unused_decoder:
            gene_dim, dec_dims = g_dim, dims
        if not trained:
            unused.append("gene_decoder")
            notes.append(
                f"gene_decoder ({d_out}->{dims}->{g_dim}) is in the checkpoint but was never "
                f"trained (embed_key={embed_key!r}, output_space={output_space!r}): "
                + ("loaded, marked unused" if keep_unused_decoder else "not loaded")
            )
    return gene_dim, dec_dims, dec_residual, dec_dropout, unused


def _vocabularies(
    run: Path, var_dims: dict, hp: dict, enc: _Encoders, output_space: str, gene_width: int,
    trust_pickle: bool, check: _Checker, notes: list[str],
) -> tuple[list[str], np.ndarray, list[str], list[str], list[str]]:
    """``(perturbations, pert_vectors, cell_types, batches, gene_names)`` of the run, checked
    against the network (``gene_width``: its gene-space output width)."""
    pert_map = run / "pert_onehot_map.pt"
    if not pert_map.exists():
        raise DataError(f"{pert_map} not found: the perturbation vocabulary is needed to use the "
                        "model (copy pert_onehot_map.pt next to the checkpoint).")
    perturbations, pert_vectors = _read_map(pert_map, trust_pickle)
    check.same("pert_dim", enc.pert_dim, pert_vectors.shape[1],
               "pert_onehot_map.pt (vector length)")
    cell_types = _optional_map(run, "cell_type_onehot_map", trust_pickle, notes)
    batches = _optional_map(run, "batch_onehot_map", trust_pickle, notes)
    if enc.batch_dim:
        if not batches:
            raise DataError("the checkpoint has a batch encoder but batch_onehot_map.{torch,pkl} "
                            f"is missing from {run}; it is needed to map batch labels.")
        check.same("number of batches", enc.batch_dim, len(batches), "batch_onehot_map")

    gene_names = [str(g) for g in (var_dims.get("gene_names") or hp.get("gene_names") or [])]
    twice = repeated(gene_names) if output_space != "embedding" else []
    if twice:  # (predictions are matched to the input's genes by name)
        raise DataError(f"the run's gene names (var_dims.pkl, or the checkpoint) repeat "
                        f"{preview(twice)}: genes could not be matched by name. Repair "
                        "var_dims.pkl['gene_names'].")
    twins = len(pert_vectors) - len(np.unique(pert_vectors, axis=0))
    if twins:
        warn(f"pert_onehot_map.pt gives {twins} perturbation(s) the vector of another: "
             "the model cannot tell those apart (a damaged map?).", UserWarning)
    if gene_names and output_space != "embedding" and len(gene_names) != gene_width:
        check.same("number of gene names", gene_width, len(gene_names), "var_dims.pkl")
    return perturbations, pert_vectors, cell_types, batches, gene_names


def _data_kwargs(
    data_yaml: dict, hp: dict, setting: Callable[[str, Any], Any], control_pert: str | None,
    embed_key: str | None, output_space: str, set_len: int | None, perturbations: list[str],
    ckpt_path: Path, notes: list[str],
) -> dict:
    """The data settings the model was trained with (arc-state defaults for the obs columns a
    run without config.yaml does not record, said)."""
    data_kwargs = {
        "pert_col": data_yaml.get("pert_col"),
        "cell_type_key": data_yaml.get("cell_type_key"),
        "batch_col": data_yaml.get("batch_col"),
        "control_pert": _fill_in(
            "control_pert", hp.get("control_pert", data_yaml.get("control_pert", ...)),
            control_pert or ..., ckpt_path, CONTROL_PERT, required=False),
        "embed_key": embed_key,
        "output_space": output_space,
        "cell_set_len": None if set_len is None else int(set_len),
        "basal_mapping_strategy": setting("basal_mapping_strategy", "random"),
        "perturbation_features_file": data_yaml.get("perturbation_features_file"),
    }
    for key, default in (("pert_col", "gene"), ("cell_type_key", "cell_type"),
                         ("batch_col", "gem_group")):
        if data_kwargs[key] is None:
            data_kwargs[key] = default
            notes.append(f"{key} not recorded (no config.yaml): using the arc-state default "
                         f"{default!r}")
    for key in ("control_pert", "cell_set_len"):
        if data_kwargs[key] is None:
            notes.append(f"{key} is not recorded (needed to predict, not to load the weights)")
    if data_kwargs["control_pert"] not in (None, *perturbations):
        raise DataError(f"{ckpt_path}: the control label {data_kwargs['control_pert']!r} is not "
                        f"among the model's perturbations {perturbations[:8]}; pass "
                        "control_pert=<the label> (import-arc / tx infer: --control-pert).")
    return data_kwargs


def _provenance(ckpt: dict, ckpt_path: Path, run: Path, hp: dict, kw: dict, unknown: list[str],
                att: str, rp: float | None) -> dict:
    """Where the imported weights come from (file, hash, versions, attention, licence; who
    trained them when statetx exported the run)."""
    origin = _plain(ckpt.get(STATETX_ORIGIN_KEY))
    if not isinstance(origin, dict):
        origin = None
    return {
        "source": str(ckpt_path),
        "run_dir": str(run),
        "checkpoint_file": ckpt_path.name,
        "sha256": file_sha256(ckpt_path),
        "global_step": _plain(ckpt.get("global_step")),
        "epoch": _plain(ckpt.get("epoch")),
        "lightning_version": ckpt.get("pytorch-lightning_version"),
        "arc_state_version": _guess_version(hp, kw, run),
        "unknown_to_importer": unknown,
        "attention": att,
        "rope": rp,
        "license": _license(run),
        "license_notice": license_notice(origin),
        **({"trained_by": origin.get("trained_by"), STATETX_ORIGIN_KEY: origin} if origin
           else {}),
    }


def _resolve_paths(run_dir: Path, checkpoint: str | Path, notes: list[str]) -> tuple[Path, Path]:
    """(run directory, real checkpoint file); a checkpoint file may be given as run_dir."""
    if run_dir.is_file():
        ckpt = run_dir
        run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    else:
        if not run_dir.is_dir():
            raise DataError(f"run directory {run_dir} does not exist.")
        run = run_dir
        c = Path(checkpoint)
        candidates = [c] if c.is_absolute() else [run / "checkpoints" / c, run / c, c]
        found = [p for p in candidates if p.is_file()]
        if not found and str(checkpoint) == "final.ckpt":
            found = [p for p in (run / "checkpoints" / "last.ckpt",) if p.is_file()]
            if found:
                notes.append("final.ckpt not found: using last.ckpt")
        if not found:
            odd = [p for p in candidates if p.exists()]  # (a folder named like a checkpoint)
            if odd:
                raise DataError(f"{odd[0]} is a folder, not a checkpoint file.")
            avail = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) if (
                run / "checkpoints").is_dir() else []
            raise DataError(f"checkpoint {str(checkpoint)!r} not found in {run}/checkpoints "
                            f"(available: {preview(avail) or 'none'}).")
        ckpt = found[0]
    if ckpt.is_symlink():
        real = ckpt.resolve()
        notes.append(f"{ckpt.name} is a symlink to {real.name}"
                     + (" (arc-state 0.9.x: the best checkpoint, not the latest)"
                        if ckpt.name == "last.ckpt" else ""))
        ckpt = real
    notes.append(f"checkpoint: {ckpt}")
    return run, ckpt


def _reject_unsupported(sd: dict, hp: dict, path: Path) -> None:
    for pat, why in _UNSUPPORTED:
        keys = [k for k in sd if pat.search(k)]
        if keys:
            raise UnsupportedCheckpointError(f"{path}: {why} (keys: {preview(keys, 8)}).")
    for key, why in (("finetune_vci_decoder", "it embeds an external embedding model"),
                     ("nb_decoder", "the negative-binomial decoder is not implemented")):
        if hp.get(key):
            raise UnsupportedCheckpointError(f"{path}: {key}=true is not supported ({why}).")
    lora = hp.get("lora")
    if isinstance(lora, dict) and lora.get("enable"):
        raise UnsupportedCheckpointError(f"{path}: LoRA (lora.enable=true) is not supported.")


def _infer_backbone(sd: dict, kw: dict, h: int, n_heads: int | None, n_kv_heads: int | None,
                    head_dim: int | None, path: Path
                    ) -> tuple[str, int, int, int, int, int, float]:
    """(backbone, n_layers, H, K, d, I, norm eps) from shapes + backbone kwargs + user values."""
    tb = "transformer_backbone."
    if tb + "layers.0.self_attn.q_proj.weight" in sd:
        backbone = "llama"
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"transformer_backbone\.layers\."
                                                               r"(\d+)\.", k))}
        q_rows = sd[tb + "layers.0.self_attn.q_proj.weight"].shape[0]
        k_rows = sd[tb + "layers.0.self_attn.k_proj.weight"].shape[0]
        inter = sd[tb + "layers.0.mlp.gate_proj.weight"].shape[0]
        act = kw.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedCheckpointError(f"{path}: Llama hidden_act={act!r} is not supported "
                                             "(only SwiGLU with silu).")
        if kw.get("rope_scaling"):
            raise UnsupportedCheckpointError(f"{path}: rope_scaling is not supported.")
        eps = float(kw.get("rms_norm_eps", 1e-6))
        heads = n_heads or kw.get("num_attention_heads")
        if heads is None:
            cands = [n for n in range(1, q_rows + 1) if q_rows % n == 0]
            match = _matching_presets(h, q_rows, inter, "llama")
            raise ConfigError(
                f"{path}: the number of attention heads is not recorded and cannot be read from "
                f"the shapes (q_proj has {q_rows} rows = heads x head_dim). Pass n_heads= "
                f"(--n-heads; and head_dim= if heads x head_dim differs from hidden_dim). "
                f"Candidates: "
                f"{preview(cands, 30)}."
                + (f" Presets with these dimensions: {', '.join(match)}." if match else "")
            )
        heads = int(heads)
        hd = int(head_dim or kw.get("head_dim") or q_rows // heads)
        kv = int(n_kv_heads or kw.get("num_key_value_heads") or heads)
        if heads * hd != q_rows or kv * hd != k_rows:
            raise ConfigError(
                f"{path}: n_heads={heads}, n_kv_heads={kv}, head_dim={hd} do not fit the weights "
                f"(q_proj rows {q_rows} = n_heads*head_dim, k_proj rows {k_rows} = "
                "n_kv_heads*head_dim); pass matching n_heads/n_kv_heads/head_dim."
            )
        return backbone, max(blocks) + 1, heads, kv, hd, inter, eps
    if tb + "h.0.attn.c_attn.weight" in sd:
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"transformer_backbone\.h\.(\d+)"
                                                               r"\.", k))}
        c_attn = sd[tb + "h.0.attn.c_attn.weight"]  # Conv1D [in, out] = [h, 3h]
        if tuple(c_attn.shape) != (h, 3 * h):
            raise DataError(f"{path}: GPT-2 c_attn weight has shape {tuple(c_attn.shape)}, "
                            f"expected [{h}, {3 * h}] for hidden width {h}.")
        inter = sd[tb + "h.0.mlp.c_fc.weight"].shape[1]
        act = kw.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UnsupportedCheckpointError(f"{path}: GPT-2 activation_function={act!r} is not "
                                             "supported (only the tanh GELU).")
        heads = n_heads or kw.get("n_head") or kw.get("num_attention_heads")
        if heads is None:
            cands = [n for n in range(1, h + 1) if h % n == 0]
            match = _matching_presets(h, h, inter, "gpt2")
            raise ConfigError(
                f"{path}: the number of attention heads (n_head) is not recorded; pass n_heads= "
                f"(--n-heads). Candidates dividing {h}: {preview(cands, 30)}."
                + (f" Presets with these dimensions: {', '.join(match)}." if match else ""))
        heads = int(heads)
        if h % heads or (head_dim is not None and head_dim * heads != h):
            raise ConfigError(f"{path}: n_heads={heads} does not divide the GPT-2 width {h}.")
        eps = float(kw.get("layer_norm_epsilon", 1e-5))
        return "gpt2", max(blocks) + 1, heads, heads, h // heads, inter, eps
    raise DataError(f"{path}: no transformer backbone found (neither Llama "
                    "'transformer_backbone.layers.0...' nor GPT-2 'transformer_backbone.h.0...' "
                    "keys).")


def _infer_gene_decoder(sd: dict) -> tuple[int, list[int], int, bool] | None:
    """(latent width, hidden widths, G, residual) of the gene decoder, or None."""
    if any(k.startswith("gene_decoder.decoder.") for k in sd):
        lin = [(i, w) for i, w in _indexed(sd, "gene_decoder.decoder") if w.dim() == 2]
        ws = [w for _, w in lin]
        if [i for i, _ in lin] != [4 * j for j in range(len(lin))]:
            raise DataError("unexpected gene_decoder layout: Linear layers at "
                            f"{[i for i, _ in lin]} (expected 0, 4, 8, ...).")
        return ws[0].shape[1], [w.shape[0] for w in ws[:-1]], ws[-1].shape[0], False
    if any(k.startswith("gene_decoder.blocks.") for k in sd):
        blocks = _indexed(sd, "gene_decoder.blocks", ".0.weight")
        final = sd.get("gene_decoder.final_layer.0.weight")
        if final is None or not blocks:
            raise DataError("residual gene_decoder without final_layer.0 / blocks weights.")
        return blocks[0][1].shape[1], [w.shape[0] for _, w in blocks], final.shape[0], True
    return None


def unrecorded(ckpt_path: str | Path, key: str, what: str) -> DataError:
    """The error for a setting that neither the checkpoint nor config.yaml records."""
    flag = "--" + key.replace("_", "-")
    return DataError(f"{ckpt_path}: {key} is recorded neither in the checkpoint nor in "
                     f"config.yaml; put the run's config.yaml next to it, or pass {key}=... "
                     f"({what}; command line: statetx import-arc RUN {flag} VALUE --out DIR, "
                     "then use DIR).")


def _loss_settings(setting: Callable[[str, Any], Any], notes: list[str]) -> dict:
    """The run's training loss and those of its options that act for it (for fine-tuning)."""
    loss = str(setting("loss", setting("distributional_loss", "energy"))).lower()
    if loss not in LOSS_NAMES:
        notes.append(f"training loss {loss!r} is not one statetx has: fine-tuning uses energy")
        loss = "energy"
    acts = {"energy": (), "mse": (), "sinkhorn": ("blur",),
            "se": ("blur", "sinkhorn_weight", "energy_weight")}[loss]
    options = {k: setting(k, None) for k in (*acts, "mmd_num_chunks")}
    options = {k: v for k, v in options.items()
               if v is not None and not (k == "mmd_num_chunks" and int(v) == 1)}
    return {"loss": loss, "loss_kwargs": options or None}


def _fill_in(key: str, recorded: Any, given: Any, ckpt_path: Path, what: str,
             required: bool = True) -> Any:
    """A setting the run records (``...`` when it does not), or the caller's fill-in: never a
    guess (unrecorded and not given: an error, or None when not ``required`` to build the
    network), and a fill-in that contradicts the record is an error."""
    if recorded is ...:
        if given is ... and required:
            raise unrecorded(ckpt_path, key, what)
        return None if given is ... else given
    if given is not ... and given != recorded:
        raise ConfigError(f"{key}={given!r} contradicts the run, which records {recorded!r}; "
                          "leave it out.")
    return recorded


def _resolve_attention(backbone: str, kw: dict, attention: str | None,
                       rope: float | None | EllipsisType, notes: list[str]
                       ) -> tuple[str, float | None]:
    """Attention mode and rotary base per arc-checkpoints.md §7 (never a silent guess)."""
    if attention is not None and attention not in ARCH_CHOICES["attention"]:
        raise ConfigError(f"attention must be 'bidirectional' or 'causal', got {attention!r}.")
    flag = kw.get("bidirectional_attention") if backbone == "llama" else None
    theta = float(kw.get("rope_theta", 10000.0))
    if flag is not None:
        flag_att, flag_rope = ("bidirectional", None) if flag else ("causal", theta)
        att = attention or flag_att
        rp = flag_rope if rope is ... else rope
        notes.append(f"attention {att}, rope {rp}: "
                     + ("given explicitly" if attention or rope is not ... else
                        f"from bidirectional_attention={flag} in the checkpoint"))
        if (att, rp) != (flag_att, flag_rope):  # a network the run never trained: said loudly
            msg = (f"the checkpoint records bidirectional_attention={flag} (= {flag_att}, rope "
                   f"{flag_rope}) but attention {att}, rope {rp} were given: the network will "
                   "not compute what was trained (leave attention / rope out to follow the "
                   "checkpoint; rope=None means no positions)")
            _warn_noted(msg, notes)
        return att, rp
    if backbone == "gpt2":
        att = attention or "causal"
        rp = None if rope is ... else rope
        if attention is None:
            msg = ("GPT-2 (pertsets) checkpoint: using attention='causal', rope=None, the way "
                   "arc-state trained such models (its default attention kernel is causal); pass "
                   "attention='bidirectional' if it was trained with the eager kernel")
            _warn_noted(msg, notes, label="")
        else:
            notes.append(f"attention {att}, rope {rp}: given explicitly")
        return att, rp
    if attention is None:
        raise AmbiguousAttentionError(
            "this checkpoint was written by an arc-state version that did not record the attention "
            "mode; depending on the transformers version used for training it is either "
            "bidirectional or causal (both without positions). Pass attention=\"bidirectional\" "
            "or attention=\"causal\" (command line: --attention for import-arc and tx infer, "
            "model.kwargs.attention=... for tx train with init_from), or run "
            "statetx.probe_attention(run_dir, adata) to compare both on real cells. "
            "(To reproduce what "
            "arc-state 0.11.1 computes for it, pass attention=\"causal\", rope=10000.0; on the "
            "command line: statetx import-arc RUN --attention causal --rope 10000 --out DIR, "
            "then use DIR.)"
        )
    rp = None if rope is ... else rope
    notes.append(f"attention {attention}, rope {rp}: given explicitly (the checkpoint does not "
                 "record the attention mode)")
    return attention, rp


def conv1d_layout(key: str, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` transposed when ``key`` is a GPT-2 projection (Hugging Face's Conv1D stores
    them [in, out]; a Linear [out, in]): the same swap both ways, import and export."""
    return weight.t() if _CONV1D_RE.match(key) else weight


def _load_weights(net: StateTransitionNetwork, sd: dict, drop_decoder: bool) -> None:
    """Map arc keys onto the network and load strictly; any key problem is an error naming it."""
    mapped: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if _SKIP_RE.match(k) or (drop_decoder and k.startswith("gene_decoder.")):
            continue
        mapped[k] = conv1d_layout(k, v).float().contiguous()
    check_finite_weights(mapped, "the checkpoint")
    own = net.state_dict()
    missing = [k for k in own if k not in mapped]
    extra = [k for k in mapped if k not in own]
    shaped = [f"{k} {tuple(mapped[k].shape)} (expected {tuple(own[k].shape)})"
              for k in own if k in mapped and mapped[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {preview(missing, 10)}")
    if extra:
        problems.append(f"unexpected keys: {preview(extra, 10)}")
    if shaped:
        problems.append(f"misshaped keys: {preview(shaped, 10)}")
    if problems:
        raise DataError("the checkpoint's weights do not match the inferred architecture — "
                        + "; ".join(problems) + ".")
    net.load_state_dict(mapped, strict=True)


def _optional_map(run: Path, stem: str, trust_pickle: bool, notes: list[str]) -> list[str]:
    for ext in (".torch", ".pkl", ".pt"):
        p = run / f"{stem}{ext}"
        if p.exists():
            return _read_map(p, trust_pickle)[0]
    if stem == "cell_type_onehot_map":
        notes.append(f"{stem} not found: the run's cell types are unknown; this changes no "
                     "prediction (the network takes no cell-type input; controls are paired by "
                     "the input's own cell-type column)")
    else:
        notes.append(f"{stem} not found: vocabulary unknown")
    return []


def _guess_version(hp: dict, kw: dict, run: Path) -> str:
    if "bidirectional_attention" in kw or "basal_mapping_strategy" in hp or any(
            run.glob("*_onehot_map.torch")):
        return "0.11.x (inferred from the run layout)"
    if "confidence_head" in hp or "freeze_pert" in hp or any(run.glob("*_onehot_map.pkl")):
        return "0.9.x (inferred from the run layout)"
    return "unknown"


def _license(run: Path) -> str | None:
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md", "license.txt"):
        p = run / name
        if p.is_file():
            first = p.read_text(errors="replace").strip().splitlines()
            return first[0][:200] if first else None
    return None
