"""Run directories (cli.md §2.3): creating, replacing, resuming and reading a run folder.

A *run directory* (``output_dir/name``) holds ``config.yaml`` (the whole resolved configuration;
YAML via PyYAML when installed, else JSON text, which YAML parsers read too), ``statetx_run.json``,
``split.toml`` (dataset paths made absolute), ``split_summary.csv``, ``vocab.json``,
``var_dims.json``, ``model.json``, ``metrics.csv`` and ``checkpoints/``.

This module never imports the estimator (:mod:`statetx.model` imports it); a function that needs
the estimator class takes it as an argument. At import time only numpy is loaded (through
:mod:`statetx._utils`); torch, anndata and the data layer are imported inside the functions
that need them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from statetx._utils import (
    atomic_write,
    atomic_write_text,
    history_frame,
    json_default,
    preview,
    same_run,
    say,
)
from statetx.errors import ConfigError, DataError, SplitConfigError
from statetx.runconfig import (
    TrainPlan,
    config_differences,
    config_of_model,
    dump_config,
    read_config,
)

if TYPE_CHECKING:  # pragma: no cover
    from statetx.config import SplitConfig
    from statetx.data import PreparedData
    from statetx.model import StateTransitionModel

CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "statetx_run.json"
CHECKPOINT_DIR = "checkpoints"


# ---------------------------------------------------------------------------------------------
# Replacing a run folder
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManagedRun:
    """A run folder prepared by ``tx train`` (not by ``fit``): the resolved configuration its
    config.yaml records, and what to do once the new run has written a checkpoint (the earlier
    run that ``overwrite=true`` set aside goes)."""

    config: dict
    on_first_checkpoint: Callable[[], None] | None = None


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


# ---------------------------------------------------------------------------------------------
# Files of a run directory
# ---------------------------------------------------------------------------------------------


def absolute_split(split_config: Any) -> SplitConfig | None:
    """The split spec with every dataset path made absolute (so the copy in the run directory
    still finds the data); None when there is no spec."""
    from statetx.config import SplitConfig

    if split_config is None:
        return None
    return SplitConfig.from_toml(split_config).absolute()


def write_run_files(model: StateTransitionModel, out: Path, prepared: PreparedData,
                    split_config: Any, config: dict | None = None) -> None:
    """Write the run directory's description files (called by ``fit`` before training);
    ``config``: the command line's resolved configuration (else one made from the model)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    v = model.vocab_
    atomic_write_text(out / "vocab.json", json.dumps(v.to_dict(), indent=1))
    if v.pert_features is not None:  # (inference needs no external file, data.md §8)
        from statetx.vocab import FEATURES_FILE, write_features  # (anndata: not at import)

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
    from statetx.persist import metadata

    atomic_write_text(out / "model.json",
                      json.dumps(metadata(model), indent=1, default=json_default))
    cfg = config if config is not None else config_of_model(
        model, out, (out / "split.toml").resolve() if split is not None else None)
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
    """The run's record (statetx_run.json); empty when it is missing or unreadable (the run
    is then described by its checkpoints alone)."""
    p = Path(run_dir) / RUN_INFO_FILE
    if not p.is_file():
        return {}
    try:
        info = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


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
    for left in leftover_asides(run):  # (a killed overwrite: its earlier run is still there)
        say(f"an earlier run of {run} was set aside by a process that stopped before its first "
            f"checkpoint: {left} (move it back to restore it, or delete it).")
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
                changes = input_differences(run, plan.toml)
                diffs = _split_file_moved(run, diffs, changes) + changes
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
    from statetx.persist import fit_record

    info = read_run_info(run_dir)
    hist = getattr(model, "history_", None)
    step = int(hist["step"].max()) if hist is not None and len(hist) else None
    final = Path(run_dir) / CHECKPOINT_DIR / "final.ckpt"
    if step is None and final.is_file():
        step = _checkpoint_step(final)
    info.update({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "train_seconds": seconds,
                 "final_step": step, "best_step": getattr(model, "best_step_", None),
                 "fit": fit_record(model)})
    write_run_info(run_dir, info)


def _restore_fit_record(model: StateTransitionModel, run: Path) -> None:
    """What a finished run recorded about its fit (preset, settings, best step, time), its split
    spec and summary, as :meth:`StateTransitionModel.load` restores them from a saved model."""
    from statetx.config import SplitConfig
    from statetx.persist import restore_fit_record

    restore_fit_record(model, read_run_info(run).get("fit") or {})
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


def _split_file_moved(run: Path, diffs: list[str], changes: list[str]) -> list[str]:
    """``diffs`` without the split file's path when only the path changed: the run's
    ``split.toml`` holds the same split as the file given now (``changes``, from
    :func:`input_differences`, names no ``split [...]`` section; the data files are checked
    there too), so a copy of the file, or the same file reached by another path, resumes,
    with a notice."""
    key = "data.kwargs.toml_config_path: "
    moved = [d for d in diffs if d.startswith(key)]
    if (not moved or not (Path(run) / "split.toml").is_file()
            or any(c.startswith("split [") for c in changes)):
        return diffs
    say(f"the split file's path changed ({moved[0][len(key):]}) but it holds the same split "
        f"as the run's {Path(run) / 'split.toml'}: resuming with it.")
    return [d for d in diffs if d not in moved]


def _norm_section(section: Any) -> Any:
    return json.loads(json.dumps(section, default=lambda o: o.model_dump()
                                 if hasattr(o, "model_dump") else str(o), sort_keys=True))


def looks_like_run(run: Path) -> bool:
    """Whether a folder holds a statetx run: its run record ``statetx_run.json`` (a
    ``config.yaml``, ``vocab.json`` or ``checkpoints/`` alone may be anything else)."""
    return (Path(run) / RUN_INFO_FILE).is_file()


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


def load_model(estimator: type, run_dir: str | Path, checkpoint: str | Path | None = None, *,
               device: str = "cpu", verbose: bool = True) -> StateTransitionModel:
    """A fitted ``estimator`` (:class:`~statetx.model.StateTransitionModel`) from a statetx run
    directory; the work of :func:`statetx.run.load_run`, whose docstring says what is read."""
    from statetx.persist import from_metadata
    from statetx.train import load_checkpoint_file

    run = Path(run_dir)
    if run.is_file():
        checkpoint, run = run, (run.parent.parent if run.parent.name == CHECKPOINT_DIR
                                else run.parent)
    elif not run.is_dir():
        raise DataError(f"run directory {run} does not exist.")
    elif (checkpoint is None and not (run / CHECKPOINT_DIR).is_dir()
          and (run / "model.safetensors").is_file()):
        model = estimator.load(run, device=device)
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
    model = from_metadata(estimator, meta, ckpt["state_dict"], source=path,
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


def trained_in_run(run: str | Path, prepared: PreparedData, split: str) -> list[str]:
    """``dataset.cell type: perturbations`` of the perturbed cells that ``prepared`` (data
    attached with another split file, ``tx predict --toml``) puts in ``split`` but that the
    run's own ``split.toml`` put in training: their scores measure memorisation. Files are
    matched to the run's datasets by path (else by file name, else dataset name); only labels
    are compared, no data are read. Empty without the run's ``split.toml``."""
    import numpy as np

    from statetx.config import SplitConfig

    saved_file = Path(run) / "split.toml"
    if split == "train" or not saved_file.is_file():
        return []
    try:
        saved = SplitConfig.from_toml(saved_file)
    except (SplitConfigError, ConfigError):
        return []
    by_path: dict[Path, str] = {}
    by_file: dict[str, str] = {}
    for name in saved.referenced_datasets():
        with contextlib.suppress(SplitConfigError):
            for p in saved.resolve_paths(name):
                by_path.setdefault(p.resolve(), name)
                by_file.setdefault(p.name, name)
    found: dict[str, list[str]] = {}
    for asg in prepared.assignments:
        f = asg.file
        rows = asg.mask(split) & ~asg.is_control
        if not rows.any():
            continue
        ds = (by_path.get(f.path.resolve()) or by_file.get(f.path.name)) if f.path else None
        ds = ds or (f.dataset if f.dataset in saved.datasets else None)
        if ds is None:
            continue
        zs, fs = saved.heldout(ds)
        for ct in np.unique(f.cell_type[rows]):
            perts = [str(p) for p in np.unique(f.pert[rows & (f.cell_type == ct)])]
            if ct in zs:
                trained = perts if zs[ct] == "train" else []
            elif ct in fs:
                trained = [p for p in perts if p not in fs[ct].val and p not in fs[ct].test]
            else:
                trained = perts if ds in saved.training else []
            if trained:
                have = found.setdefault(f"{f.dataset}.{ct}", [])
                have += [p for p in trained if p not in have]
    return [f"{k} ({preview(v, 5)})" for k, v in found.items()]
