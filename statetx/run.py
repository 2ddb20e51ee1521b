"""Run configuration and run directories (cli.md §2–§3): loading a run into an estimator.

The run configuration (the ``key=value`` language of ``statetx tx train``) lives in
:mod:`statetx.runconfig` and the run-folder lifecycle (creating, replacing, resuming, the files
of a run directory) in :mod:`statetx.rundir`; their public helpers (``read_config``,
``read_run_info``, ``attach_data``, ``resolve_checkpoint``) are re-exported here. This module
adds what needs the estimator class: :func:`load_run` turns a run directory back into a fitted
:class:`~statetx.model.StateTransitionModel` (weights-only loading), :func:`estimator_class`
builds the fine-tuning estimator, :func:`model_from_arc` reads an arc-state run.

At import time this module loads numpy (through :mod:`statetx._utils`) but neither torch nor
pandas nor anndata (the CLI's argument errors must be fast); those and the model are imported
inside the functions that need them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from statetx._utils import say
from statetx.errors import ConfigError
from statetx.runconfig import read_config  # noqa: F401 (public here, as documented)
from statetx.rundir import (  # noqa: F401 (attach_data, read_run_info: public here)
    CHECKPOINT_DIR,
    RUN_INFO_FILE,
    attach_data,
    load_model,
    looks_like_run,
    read_run_info,
    resolve_checkpoint,
)

if TYPE_CHECKING:  # pragma: no cover
    from statetx.model import StateTransitionModel

# ---------------------------------------------------------------------------------------------
# Loading a run
# ---------------------------------------------------------------------------------------------


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

    return load_model(StateTransitionModel, run_dir, checkpoint, device=device, verbose=verbose)


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
    from statetx.nn import check_finite_weights

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
    check_finite_weights(use, f"init_from {source}")
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

        from statetx.persist import check_weights_digest

        meta = json.loads((path / "model.json").read_text()) if (
            path / "model.json").is_file() else {}
        check_weights_digest(path, meta)  # (as load does)
        space = meta.get("network_config", {}).get("output_space")
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
