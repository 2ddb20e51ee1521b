"""Persistence of :class:`~statetx.model.StateTransitionModel`: the saved-model folder
(``model.json``, ``model.safetensors`` and, for models with perturbation feature vectors,
``pert_features.safetensors``; read back without executing code), the metadata that checkpoints
and run folders also store, the import of arc-state runs, and the pickled state. The estimator's
``save`` / ``load`` / ``from_arc_state`` / ``__getstate__`` / ``__setstate__`` delegate here. This
module never imports :mod:`statetx.model`: a function that builds a model takes the estimator
class as an argument.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from statetx._utils import (
    check_folder,
    file_sha256,
    history_frame,
    json_default,
    remove_dead_temporaries,
    say,
    temporary_name,
    umask_mode,
)
from statetx.config import ColumnMap, SplitConfig
from statetx.distributed import resolve_device
from statetx.errors import ConfigError, DataError, StatetxError
from statetx.nn import NetworkConfig, StateTransitionNetwork, check_finite_weights
from statetx.vocab import FEATURES_FILE, Vocab, read_features, write_features

if TYPE_CHECKING:  # pragma: no cover
    from statetx.model import StateTransitionModel

FORMAT_VERSION = 2  # 2: perturbation feature vectors in pert_features.safetensors

# fitted attributes (without their trailing "_") that save/load keep besides the network
FIT_RECORD = ("preset", "train_settings", "best_step", "training_time", "arc_import",
              "finetuned")


@dataclass
class _FeatureRows:
    """A pickled model's ``pert_features`` dict: the names of its rows in ``vocab_``."""

    names: list[str]


def metadata(model: StateTransitionModel) -> dict:
    """Everything but the weights, JSON-able (also stored inside checkpoints)."""
    params = {k: v for k, v in model.get_params().items()
              if not isinstance(v, dict) or k in ("model_kwargs", "loss_kwargs")}
    # plain JSON values (paths as text, NumPy numbers as Python ones): checkpoints load with
    # the weights-only unpickler, which refuses NumPy scalars
    if not isinstance(params.get("pert_features"), (str, Path, type(None))):
        params["pert_features"] = None  # vectors are stored in the vocabulary
    elif params.get("pert_features") is not None:  # (a clone of a loaded model finds it)
        params["pert_features"] = str(Path(params["pert_features"]).absolute())
    params = json.loads(json.dumps(params, default=json_default))
    return {
        "format_version": FORMAT_VERSION,
        "params": params,
        # JSON has no tuples: named here so that get_params() compares equal after load
        "tuple_params": [k for k, v in model.get_params().items() if isinstance(v, tuple)],
        "network_config": model.network_config_.to_dict(),
        "vocab": model.vocab_.to_dict(),
        "columns": model.columns_.model_dump(),
        "var_names": list(model.var_names_),
        "gene_names": model.gene_names_,
        "cell_set_len": model.cell_set_len_,
        "is_log1p": model.is_log1p_,
        "is_counts": getattr(model, "is_counts_", None),
        "trained_perturbations": getattr(model, "trained_perturbations_", None),
        "trained_batches": getattr(model, "trained_batches_", None),
        "target_sum": getattr(model, "target_sum_", None),
        "expression_depth": getattr(model, "expression_depth_", None),
        # rows of the vocabulary a pert_features dict did not give (the control's, those
        # without a vector): left out of the parameter again on load
        "pert_features_added": ([n for n in model.vocab_.perturbations
                                 if n not in model.pert_features]
                                if isinstance(model.pert_features, Mapping) else None),
    }


def save(model: StateTransitionModel, path: str | Path) -> Path:
    """Write the fitted ``model`` into the folder ``path`` (see ``StateTransitionModel.save``):
    all files complete in temporaries first, so a failure leaves no partial model."""
    from safetensors.torch import save_file

    model._check_fitted()
    path = Path(path)
    check_folder(path, "save: the model folder")
    if (path / "statetx_run.json").exists() or (path / "checkpoints").exists():
        raise ConfigError(f"cannot save the model to {path}: it is a training run's folder "
                          "(its model.json describes the run). Save into another folder.")
    meta = metadata(model)
    if hasattr(model, "history_"):
        # (NaN as null: model.json stays strict JSON)
        meta["history"] = {k: [None if isinstance(v, float) and v != v else v for v in vals]
                           for k, vals in model.history_.to_dict(orient="list").items()}
    meta["fit"] = fit_record(model)
    if hasattr(model, "split_summary_"):
        meta["split_summary"] = model.split_summary_.to_dict(orient="split")
    if getattr(model, "split_config_", None) is not None:
        meta["split_config"] = model.split_config_.model_dump(mode="json", exclude={"source"})
    json.dumps(meta, default=json_default)  # (fails before any write)
    state = {k: v.detach().cpu().contiguous() for k, v in model.network_.state_dict().items()}
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(path)
    tmp_w, tmp_j, tmp_f = (temporary_name(path / name) for name in (
        "model.safetensors", "model.json", FEATURES_FILE))
    try:  # all files complete in temporaries first; a failure leaves no partial model
        save_file(state, str(tmp_w))
        umask_mode(tmp_w)  # safetensors writes 0600
        if model.vocab_.pert_features is not None:
            write_features(model.vocab_, tmp_f)
        # the files are renamed into place one by one: the weights' digest in model.json (and
        # the feature table's, in its vocabulary record) lets load tell an interrupted save
        # (new weights next to an earlier model.json) from a whole one
        meta["weights_sha256"] = file_sha256(tmp_w)
        tmp_j.write_text(json.dumps(meta, indent=1, default=json_default))
        tmp_w.replace(path / "model.safetensors")
        if model.vocab_.pert_features is not None:
            tmp_f.replace(path / FEATURES_FILE)
        else:  # (a model saved here before may have left its table)
            (path / FEATURES_FILE).unlink(missing_ok=True)
        tmp_j.replace(path / "model.json")
    except BaseException:
        for tmp in (tmp_w, tmp_j, tmp_f):
            tmp.unlink(missing_ok=True)
        if created and not any(path.iterdir()):
            path.rmdir()
        raise
    return path


def load(cls: type[StateTransitionModel], path: str | Path,
         device: str = "cpu") -> StateTransitionModel:
    """A ``cls`` model from the folder :func:`save` wrote, moved to ``device``; no pickled code
    is executed."""
    from safetensors.torch import load_file

    path = Path(path)
    target = resolve_device(device)  # a device that is not there: say so before reading
    for name in ("model.json", "model.safetensors"):
        if not (path / name).is_file():
            run = (path / "checkpoints").is_dir() or (path / "statetx_run.json").is_file()
            raise DataError(f"{path / name} not found: {path} is not a saved statetx model "
                            "(expected model.json and model.safetensors)."
                            + (" It is a training run's folder: load it with "
                               "StateTransitionModel.load_run(path) (from_arc_state "
                               "for an arc-state run)." if run else ""))
    try:
        meta = json.loads((path / "model.json").read_text())
        state = load_file(str(path / "model.safetensors"), device="cpu")
        check_weights_digest(path, meta)
        features = read_features(path / FEATURES_FILE)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"could not read the saved model in {path}: {exc}") from exc
    model = from_metadata(cls, meta, state, source=path / "model.json", features=features)
    try:  # (the optional records: a damaged one is named, not a pandas or pydantic error)
        if "history" in meta:
            model.history_ = history_frame(meta["history"])
        restore_fit_record(model, meta.get("fit") or {})
        if "split_summary" in meta:
            model.split_summary_ = pd.DataFrame(**meta["split_summary"])
        if "split_config" in meta:
            model.split_config_ = SplitConfig.from_toml(meta["split_config"])
    except (KeyError, TypeError, ValueError, AttributeError, StatetxError) as exc:
        raise DataError(f"the saved model's record in {path / 'model.json'} is damaged "
                        f"({type(exc).__name__}: {exc}); save the model again from its "
                        "source, or load its run folder.") from None
    return model.to(target)


def fit_record(model: StateTransitionModel) -> dict:
    """``preset_``, ``train_settings_``, ... (:data:`FIT_RECORD`), as far as they are set."""
    return {k: getattr(model, k + "_") for k in FIT_RECORD if hasattr(model, k + "_")}


def restore_fit_record(model: StateTransitionModel, fit: Mapping) -> None:
    """Set the recorded ``preset_``, ``train_settings_``, ... (:data:`FIT_RECORD`) on ``model``."""
    if not isinstance(fit, Mapping):
        raise DataError(f"the fit record is a {type(fit).__name__}, not a mapping.")
    for k, v in fit.items():
        if k in FIT_RECORD:
            setattr(model, k + "_", v)


def from_metadata(cls: type[StateTransitionModel], meta: dict, state: dict[str, torch.Tensor],
                  source: str | Path | None = None,
                  features: Any = None) -> StateTransitionModel:
    """The ``cls`` model ``meta`` describes with the weights ``state`` (and the perturbation
    feature table, for models trained with one); a malformed ``meta`` is a :class:`DataError`."""
    try:
        return _build(cls, meta, state, features, source)
    except DataError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        where = f" in {source}" if source is not None else ""
        raise DataError(f"the saved model metadata{where} is incomplete or invalid "
                        f"({type(exc).__name__}: {exc}); it was edited, damaged or written "
                        "by an incompatible statetx version.") from None


def _build(cls: type[StateTransitionModel], meta: dict, state: dict[str, torch.Tensor],
           features: Any, source: str | Path | None) -> StateTransitionModel:
    """:func:`from_metadata` without its error wrapping."""
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        from statetx import __version__

        raise DataError(f"{source or 'the saved model'} is in model format {version!r}, "
                        f"newer than this statetx ({__version__}) reads (up to "
                        f"{FORMAT_VERSION}): upgrade statetx to load it.")
    params = dict(meta["params"])
    for k in meta.get("tuple_params", ()):
        params[k] = tuple(params[k])
    model = cls(**params)
    cfg = NetworkConfig.from_dict(meta["network_config"])
    net = StateTransitionNetwork.for_loading(cfg)
    if "final_down_then_up.0.weight" in state and net.final_down_then_up is None:
        raise DataError("this model was saved by an earlier statetx whose input-space "
                        "residual (the 'small' preset) with output_space='all' went through "
                        "a bottleneck and skipped the per-perturbation skip; that network is "
                        "no longer built. Retrain the model.")
    check_finite_weights(state, str(  # (a model folder's weights: its safetensors file)
        Path(source).with_name("model.safetensors") if source is not None
        and Path(source).name == "model.json" else source or "the saved model"))
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(f"saved weights do not fit the saved network configuration: {exc}") \
            from None
    net.eval()
    model.network_ = net
    model.network_config_ = cfg
    model.vocab_ = Vocab.from_dict(meta["vocab"], None if features is None
                                   else np.asarray(features, dtype=np.float32),
                                   str(source or "the saved model"))
    model.columns_ = ColumnMap(**meta["columns"])
    model.var_names_ = list(meta["var_names"])
    model.gene_names_ = meta["gene_names"]
    model.cell_set_len_ = int(meta["cell_set_len"])
    model.is_log1p_ = bool(meta["is_log1p"])
    counts = meta.get("is_counts")  # (absent: saved before it was recorded, not checked)
    model.is_counts_ = None if counts is None else bool(counts)
    if meta.get("trained_perturbations") is not None:
        model.trained_perturbations_ = list(meta["trained_perturbations"])
    if meta.get("trained_batches") is not None:
        model.trained_batches_ = list(meta["trained_batches"])
    model.target_sum_ = meta.get("target_sum")
    model.expression_depth_ = meta.get("expression_depth")
    model.n_features_in_ = len(model.var_names_)
    mark_trained_batches(model)
    v = model.vocab_
    if model.pert_features is None and v.pert_features is not None:
        # vectors given as a dict are stored in the vocabulary only: the parameter again,
        # so that clone(model).fit(...) trains on the same features
        added = set(meta.get("pert_features_added") or ())
        model.pert_features = v.vectors([n for n in v.perturbations if n not in added])
    return model


def from_arc_state(cls: type[StateTransitionModel], run_dir: str | Path,
                   checkpoint: str | Path = "final.ckpt", *, attention: str | None = None,
                   rope: Any = ..., verbose: bool = True,
                   **options: Any) -> StateTransitionModel:
    """A fitted ``cls`` model from an arc-state run directory and checkpoint (see
    ``StateTransitionModel.from_arc_state``), read by :func:`statetx.arc.load_arc_run`."""
    from statetx.arc import (
        CELL_SET_LEN,
        CONTROL_PERT,
        STATETX_ORIGIN_KEY,
        load_arc_run,
        unrecorded,
    )

    imp = load_arc_run(run_dir, checkpoint, attention=attention, rope=rope, **options)
    dk = imp.data_kwargs
    for key, what in (("control_pert", CONTROL_PERT), ("cell_set_len", CELL_SET_LEN)):
        if dk[key] is None:
            raise unrecorded(imp.provenance["source"], key, what)
    if verbose:
        for note in imp.notes:
            say(note)
    cfg = imp.config
    model = cls(pert_col=dk.get("pert_col", "gene"),
                cell_type_key=dk.get("cell_type_key", "cell_type"),
                batch_col=dk.get("batch_col"), control_pert=dk["control_pert"],
                embed_key=dk.get("embed_key"), output_space=cfg.output_space,
                cell_set_len=dk["cell_set_len"], device="cpu", **imp.training,
                # the run's control pairing (arc-state: "random" = within the cell type)
                basal_mapping_strategy="batch" if dk.get("basal_mapping_strategy") == "batch"
                else "random")
    vectors = np.asarray(imp.pert_vectors, dtype=np.float32)
    one_hot = vectors.shape[0] == vectors.shape[1] and np.array_equal(
        vectors, np.eye(len(vectors), dtype=np.float32))
    control = dk["control_pert"]
    model.vocab_ = Vocab(list(imp.perturbations), list(imp.cell_types), list(imp.batches),
                         control, None if one_hot else vectors)
    model.network_ = imp.network.eval()
    model.network_config_ = cfg
    model.columns_ = ColumnMap(
        pert_col=model.pert_col, cell_type_key=model.cell_type_key,
        batch_col=model.batch_col, control_pert=control, embed_key=model.embed_key,
        output_space=cfg.output_space)
    genes = [str(g) for g in imp.gene_names]
    inputs = [str(g) for g in imp.var_dims.get("statetx_input_names") or []]  # (exports)
    if cfg.gene_dim:
        model.gene_names_ = genes if len(genes) == cfg.gene_dim else None
        model.var_names_ = (inputs if len(inputs) == cfg.input_dim else
                            [f"{model.embed_key}_{i}" for i in range(cfg.input_dim)])
    else:
        model.gene_names_ = None
        model.var_names_ = (genes if len(genes) == cfg.input_dim else
                            [f"{model.embed_key or 'X'}_{i}" for i in range(cfg.input_dim)])
    model.cell_set_len_ = int(dk["cell_set_len"])
    model.is_log1p_ = True
    model.n_features_in_ = cfg.input_dim
    model.arc_import_ = {"notes": list(imp.notes), "unused": list(imp.unused),
                         "provenance": dict(imp.provenance)}
    origin = imp.provenance.get(STATETX_ORIGIN_KEY) or {}
    if cfg.batch_encoder and origin.get("trained_batches") is not None:  # (statetx's export)
        model.trained_batches_ = [b for b in origin["trained_batches"] if b in imp.batches]
        mark_trained_batches(model)
    return model


def check_weights_digest(path: Path, meta: object) -> None:
    """DataError when the model folder's weights are not those its ``model.json`` recorded
    (``weights_sha256``; folders saved before it was recorded pass)."""
    digest = meta.get("weights_sha256") if isinstance(meta, dict) else None
    if digest is not None and file_sha256(path / "model.safetensors") != digest:
        raise DataError(f"{path}: model.json and model.safetensors are from different saves (a "
                        "save into this folder was interrupted, or a file was replaced or "
                        "damaged since); the weights do not match the digest model.json "
                        "records. Save the model again.")


def pickled_state(state: dict) -> dict:
    """``state`` (the estimator's ``__getstate__`` dict) made ready to pickle: the network as
    CPU tensors, and a ``pert_features`` dict that equals the vocabulary's rows stored by name
    only."""
    if "network_" in state:
        net = state.pop("network_")
        state["_network_state"] = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    feats, vocab = state.get("pert_features"), state.get("vocab_")
    if (isinstance(feats, Mapping) and vocab is not None and vocab.pert_features is not None
            and set(map(str, feats)) <= set(vocab.perturbations)):
        rows = vocab.vectors(feats)
        if all(np.array_equal(np.asarray(v, dtype=np.float32).reshape(-1), rows[str(n)])
               for n, v in feats.items()):
            # the vectors are rows of the vocabulary's table: pickled once, by name
            state["pert_features"] = _FeatureRows([str(n) for n in feats])
    return state


def restore_pickled(model: StateTransitionModel, state: dict,
                    set_state: Callable[[dict], None]) -> None:
    """Undo :func:`pickled_state` on ``model``: ``set_state`` (the estimator's own
    ``__setstate__``) takes the rest of ``state``, then the network is rebuilt."""
    state = dict(state)
    weights = state.pop("_network_state", None)
    set_state(state)
    if isinstance(model.pert_features, _FeatureRows):
        model.pert_features = model.vocab_.vectors(model.pert_features.names)
    if weights is not None:
        net = StateTransitionNetwork.for_loading(model.network_config_)
        check_finite_weights(weights, "the pickled model")
        try:
            net.load_state_dict(weights)
        except RuntimeError as exc:
            raise DataError(f"the pickled weights do not fit the pickled network "
                            f"configuration (a pickle of another statetx version?): {exc}"
                            ) from None
        net.eval()
        model.network_ = net
        mark_trained_batches(model)


def mark_trained_batches(model: StateTransitionModel) -> None:
    """Give a batch-encoder network the rows of the batches with training cells
    (``trained_batches_``; not recorded: every row), whose mean embedding the batches without
    training cells and unknown ones get (``unknown_batch="mean"``). The network does not save
    them with its weights: fit, load and unpickling call this."""
    net, names = model.network_, getattr(model, "trained_batches_", None)
    if net.batch_encoder is None:
        return
    net.trained_batches = None if names is None else torch.as_tensor(
        model.vocab_.encode("batch", names), device=net.batch_encoder.weight.device)
