"""Small helpers shared across modules (they import nothing of statetx but its errors)."""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import re
import shutil
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from statetx.errors import ConfigError

if TYPE_CHECKING:  # (scipy is imported where used: the CLI's argument errors stay fast)
    import scipy.sparse as sp

# loss options (spec model.md §10): the set loss's own, and those of the whole training loss
SET_LOSS_OPTIONS = ("blur", "sinkhorn_weight", "energy_weight", "mmd_num_chunks",
                    "randomize_mmd_chunks")
TRAINING_LOSS_OPTIONS = ("decoder_weight", "detach_decoder", "regularization")
LOSS_OPTION_ALIASES = {"decoder_loss_weight": "decoder_weight"}

# ``torch.compile`` modes accepted by training (here: the CLI's key table must not import torch)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# ``torch.set_float32_matmul_precision`` values ("medium": bf16 products on CPUs with AMX, TF32
# on GPUs; "high": TF32 on GPUs)
MATMUL_PRECISIONS = ("highest", "high", "medium")


@contextmanager
def matmul_precision_scope(value: str) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(value)`` inside the block, the previous value after."""
    import torch

    prev = torch.get_float32_matmul_precision()
    if prev != value:
        torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        if prev != value:
            torch.set_float32_matmul_precision(prev)


class _Say(logging.Handler):
    """Print a notice as ``<who>: message`` on the current ``sys.stdout`` (looked up when
    printed, so notebooks and captured output get it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{getattr(record, 'who', 'statetx')}: {record.getMessage()}", flush=True)


LOG = logging.getLogger("statetx")
if not LOG.handlers:
    LOG.addHandler(_Say())
    if LOG.level == logging.NOTSET:  # (a level the user set before this import stays)
        LOG.setLevel(logging.INFO)
    LOG.propagate = False


def say(msg: str, who: str = "statetx") -> None:
    """A notice for the user (what was chosen, assumed or left out), printed as
    ``statetx: msg``. Silence them with ``logging.getLogger("statetx").setLevel("WARNING")``;
    warnings and errors are not affected."""
    LOG.info(msg, extra={"who": who})


# this package's folder, as the raw and the resolved path (frames name their files either way)
_PACKAGE_DIRS = tuple({os.path.dirname(os.path.abspath(__file__)) + os.sep,
                       os.path.dirname(os.path.realpath(__file__)) + os.sep})


def _in_package(filename: str) -> bool:
    return filename.startswith(_PACKAGE_DIRS)


def _importlib_frame(frame: Any) -> bool:
    """A frame that ``warnings.warn`` does not count in ``stacklevel`` (its own rule)."""
    name = frame.f_code.co_filename
    return "importlib" in name and "_bootstrap" in name


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame outside statetx (the
    user's line), however deep inside statetx it is called from; the outermost frame if every
    frame is statetx's. importlib's frames are skipped as ``warnings.warn`` skips them."""
    frame, level = sys._getframe(1), 2
    while _in_package(frame.f_code.co_filename):
        outer = frame.f_back
        while outer is not None and _importlib_frame(outer):
            outer = outer.f_back
        if outer is None:
            break
        frame, level = outer, level + 1
    warnings.warn(message, category, stacklevel=level)


def warn_view_becomes_copy(what: str, holding: str, advice: str = "") -> None:
    """Writing into a view (``adata[...]``) in place: the view becomes a copy and its parent is
    not changed (anndata's rule), said in the same words wherever statetx writes in place."""
    warn(f"{what} on a view (adata[...]): the view becomes a copy holding the "
         f"{holding}, and the AnnData it was taken from is not changed (as anndata "
         f"does on writes to views).{advice}", UserWarning)


def did_you_mean(name: str, options: Iterable[str], n: int = 3) -> str:
    """Return ' Did you mean: a, b?' for close matches of ``name`` in ``options`` (or ''):
    the same combination in another order first (``B+A`` → ``A+B``), then options of which
    ``name`` is a whole word (``gene`` → ``target_gene``), then spelling neighbours."""
    opts = [str(o) for o in options]
    word = str(name).lower()

    def parts(label: str) -> list[str]:
        return sorted(re.split(r"[^0-9a-z]+", label.lower()))

    reordered = [o for o in opts if o != name and "+" in o and parts(o) == parts(str(name))]
    worded = [o for o in opts if o != name and word in re.split(r"[^0-9a-z]+", o.lower())]
    close = difflib.get_close_matches(str(name), opts, n=n, cutoff=0.6)
    matches = list(dict.fromkeys(reordered + worded + close))[:n]
    return f" Did you mean: {', '.join(repr(m) for m in matches)}?" if matches else ""


def unknown_option_message(what: str, key: str, valid: Iterable[str],
                           suggest_from: Iterable[str] | None = None) -> str:
    """``unknown <what> 'key'. Did you mean …? Valid options: …`` for option-dict errors."""
    valid = list(valid)
    hints = did_you_mean(key, list(suggest_from) if suggest_from is not None else valid)
    return f"unknown {what} {key!r}.{hints} Valid options: {', '.join(valid)}."


def as_count(name: str, value: object, minimum: int = 1, optional: bool = False) -> int | None:
    """An integer option (steps, a seed, a cell count) of at least ``minimum`` as an int (a
    float only when integral, e.g. ``1e5``); None passes when ``optional``."""
    if value is None and optional:
        return None
    integral = isinstance(value, (int, np.integer)) or (
        isinstance(value, (float, np.floating)) and float(value).is_integer())
    if isinstance(value, bool) or not integral or value < minimum:
        raise ConfigError(f"{name}={value!r} is invalid; expected an integer >= {minimum}"
                          + (" or None." if optional else "."))
    return int(value)


def check_number(name: str, value: object, example: str, optional: bool = False) -> None:
    """ConfigError unless ``value`` is a real number (not text, not a bool; None passes when
    ``optional``), naming ``example`` as a valid value: its range is checked where it is used."""
    if value is None and optional:
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                      np.floating)):
        raise ConfigError(f"{name}={value!r} is invalid; expected a number (e.g. "
                          f"{name}={example})" + (" or None." if optional else "."))


def as_seed(value: object) -> int:
    """A seed option: an integer in [0, 2**63) (what torch's generators take)."""
    seed = as_count("seed", value, 0)
    if seed >= 2**63:
        raise ConfigError(f"seed={value!r} is too large; use an integer below 2**63.")
    return seed


def cell_type_option(name: str, value: Any, cell_type_key: Any) -> Any:
    """The cell-type column given as ``name`` or as ``cell_type_key`` (the estimators' name for
    it, accepted everywhere); two different columns are an error."""
    if cell_type_key is None:
        return value
    if value is not None and value != cell_type_key:
        raise ConfigError(f"{name}={value!r} and cell_type_key={cell_type_key!r} both name the "
                          "cell-type column; pass one of them.")
    return cell_type_key


def names_list(names: str | Iterable[object]) -> list[str]:
    """A list of names from one name or several (a bare string is one name, not its letters)."""
    return [names] if isinstance(names, str) else [str(n) for n in names]


def preview(values: Iterable[object], limit: int = 20) -> str:
    """Comma-joined preview of at most ``limit`` values, with a count of the rest."""
    vals = [str(v) for v in values]
    head = ", ".join(vals[:limit])
    return head + (f", … ({len(vals) - limit} more)" if len(vals) > limit else "")


def repeated(names: Iterable[object]) -> list[str]:
    """The names that occur more than once, each once, in order of first occurrence."""
    counts = Counter(map(str, names))
    return [n for n, k in counts.items() if k > 1]


def to_dense_f32(x: np.ndarray | sp.spmatrix) -> np.ndarray:
    """Dense, C-contiguous float32 copy-if-needed of a dense or sparse matrix."""
    import scipy.sparse as sp

    if sp.issparse(x):
        x = x.toarray()
    return np.ascontiguousarray(np.asarray(x), dtype=np.float32)


def sample_rows(x: np.ndarray | sp.spmatrix, max_rows: int = 1000) -> np.ndarray:
    """A dense float64 sample of at most ``max_rows`` rows (evenly spread, deterministic)."""
    import scipy.sparse as sp

    n = x.shape[0]
    if n > max_rows:
        idx = np.linspace(0, n - 1, max_rows).astype(np.int64)
        x = x[idx]
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def log1p_depth(x: np.ndarray | sp.spmatrix, max_rows: int = 1000) -> float:
    """The counts per cell log1p-normalised values ``x`` stand for: the median over (up to
    ``max_rows`` evenly spread) rows of the sum of ``expm1`` (a model's training depth per cell
    type; the total evaluate brings count files to)."""
    with np.errstate(over="ignore"):  # (values far above log1p scale are refused elsewhere)
        return float(np.median(np.expm1(sample_rows(x, max_rows)).sum(axis=1)))


#: values within this of an integer count as integers: a matrix without a larger fractional part
#: holds counts (cell-eval's rule, used for every scale decision in statetx)
INTEGER_TOLERANCE = 1e-3
#: log1p-normalised expression stays below this; 15 and more is counts or linear normalised values
LOG1P_MAX = 15.0


def all_integers(values: np.ndarray) -> bool:
    """Whether no value of ``values`` has a fractional part above :data:`INTEGER_TOLERANCE`."""
    return not bool(np.any(np.abs(values - np.round(values)) > INTEGER_TOLERANCE))


def looks_log1p(x: np.ndarray | sp.spmatrix, max_rows: int = 1000) -> bool:
    """True when ``x`` looks log1p-normalised: non-negative, some non-integer value, max < 15.

    Raw counts (all integers, see :func:`all_integers`) or values of :data:`LOG1P_MAX` and more
    are reported as not log1p. Only ``max_rows`` rows are inspected, so this is cheap on large
    matrices.
    """
    s = sample_rows(x, max_rows)
    if s.size == 0:
        return False
    finite = s[np.isfinite(s)]
    if finite.size == 0:
        return False
    return (not all_integers(finite) and float(finite.max()) < LOG1P_MAX
            and float(finite.min()) >= 0.0)


def umask_mode(path: str | os.PathLike) -> None:
    """Give a file written through a private temporary (mode 0600) the mode of any new file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a cluster job's share), not the
    machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def temporary_name(path: Path, suffix: str = "") -> Path:
    """``.<name>.tmp<pid>-<thread><suffix>`` next to ``path``: this writer's own (processes
    writing the same file, e.g. every rank of a torchrun job, do not share temporaries)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}{suffix}")


def remove_dead_temporaries(folder: Path) -> None:
    """Delete the :func:`temporary_name` files in ``folder`` of processes that no longer run
    (a killed writer's leftovers; a live writer's, e.g. another torchrun rank's, stay)."""
    for tmp in folder.glob(".*.tmp*-*"):
        pid = re.search(r"\.tmp(\d+)-\d+", tmp.name)
        if pid is None or int(pid.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(pid.group(1)), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:  # (alive, another user's)
            pass


def atomic_write(path: str | os.PathLike, writer: Any, suffix: str = "") -> Path:
    """Call ``writer(tmp)`` on ``.<name>.tmp<pid>-<thread><suffix>`` next to ``path`` (a
    ``suffix`` for writers that need one, e.g. ``np.save``), then rename it over ``path``; the
    temporary file never outlives the call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path, suffix)
    try:
        writer(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_folder(path: Path, what: str) -> None:
    """ConfigError unless ``path`` is a folder or can be created as one (checked before the
    work whose results go there, not after it)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a file; give a folder to write to.")
    up = next((p for p in path.parents if p.exists()), None)
    if up is not None and not up.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is below the file {str(up)!r}; give a folder "
                          "to write to.")


def atomic_folder(path: str | os.PathLike, writer: Any) -> Path:
    """Call ``writer(tmp)`` on a new temporary folder next to ``path``, then put it in place of
    ``path`` (an earlier folder there is removed only then; a symbolic link's target is the
    folder replaced): a failed writer leaves ``path`` as it was and nothing half-written."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = temporary_name(path), temporary_name(path, ".old")
    try:
        tmp.mkdir()
        writer(tmp)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
    except BaseException:  # (Ctrl-C included) the earlier folder back, if it was moved
        if old.exists() and not path.exists():
            old.rename(path)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if path.exists():  # (the earlier folder, once the new one is in place)
            shutil.rmtree(old, ignore_errors=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, line ends as given) to ``path`` through :func:`atomic_write`."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)

    return atomic_write(path, write)


def deepcopy_sharing(obj: Any, memo: dict, shared: tuple[str, ...] = ("_prepared",)) -> Any:
    """``copy.deepcopy`` of an estimator whose ``shared`` attributes (the attached split data,
    read-only and possibly large) the copy refers to instead of copying."""
    import copy

    new = obj.__class__.__new__(obj.__class__)
    memo[id(obj)] = new
    for k, v in obj.__dict__.items():
        setattr(new, k, v if k in shared else copy.deepcopy(v, memo))
    return new


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)``: NumPy / torch numbers and arrays as Python values, sets as
    lists, anything else (paths, devices) as text."""
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=str)
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def history_frame(history: Iterable[dict] | Any) -> Any:
    """A training history (rows of ``step``, ``epoch`` and logged values, or a frame of them,
    e.g. a read ``metrics.csv``) as a pandas frame with one row per step, sorted."""
    import pandas as pd

    if not isinstance(history, pd.DataFrame):  # rows, or columns ({name: values}, as saved)
        history = pd.DataFrame(history if isinstance(history, dict) else list(history))
    frame = history
    if frame.empty:
        return pd.DataFrame(columns=["step"])
    # runs written before the CSV became wide logged the training loss as "loss"
    if "loss" in frame.columns and "train_loss" not in frame.columns:
        frame = frame.rename(columns={"loss": "train_loss"})
    if "step" not in frame.columns:
        return frame
    return frame.groupby("step", as_index=False, sort=True).first()


# estimator parameters a resumed run may change (a checkpoint from before still belongs to it)
RESUMABLE_PARAMS = ("max_steps", "device", "compile", "compile_mode", "data_on_device",
                    "progress", "log_every_n_steps", "val_freq")


# estimator parameters added after runs were first written, with their defaults (a record
# without one was written with the default)
LATER_PARAMS = {"drop_last": False, "exclude_self": False, "downsample_cells": None,
                "gene_name_col": None, "counts_key": None, "allow_counts": False,
                "cache_control_pairs": False,
                "downsample": None,
                "pad_from": "group", "val_from_test": False, "additional_obs": None,
                "on_missing_features": "zeros"}


def features_digest(table: np.ndarray) -> str:
    """SHA-256 of a perturbation feature table's float32 values (and shape)."""
    a = np.ascontiguousarray(table, dtype=np.float32)
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()


def comparable(meta: dict) -> dict:
    """A model metadata record as resumes compare it: its parameters with the later-added
    ones filled in and a feature file's path made absolute, and a feature table named by shape
    and digest (records before statetx format 2 hold the vectors as lists)."""
    params = {**LATER_PARAMS, **(meta.get("params") or {})}
    if isinstance(params.get("pert_features"), str):
        params["pert_features"] = str(Path(params["pert_features"]).absolute())
    vocab = meta.get("vocab")
    if isinstance(vocab, dict) and isinstance(vocab.get("pert_features"), list):
        table = np.asarray(vocab["pert_features"], dtype=np.float32)
        vocab = {**vocab, "pert_features": {"shape": list(table.shape),
                                            "sha256": features_digest(table)}}
    return {**meta, "params": params, "vocab": vocab}


def changed_params(before: dict, after: dict) -> list[str]:
    """``name: old -> new`` for the estimator settings that differ between two model metadata
    records (those a resume may change freely left out)."""
    a, b = comparable(before)["params"], comparable(after)["params"]
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in RESUMABLE_PARAMS and a.get(k) != b.get(k)]


def data_differences(before: dict | None, after: dict | None,
                     names: tuple[str, str] = ("only before", "now")) -> list[str]:
    """What differs between two training-data fingerprints (``PreparedData.fingerprint``; a
    checkpoint written before they were recorded has none: nothing to compare); ``names``
    label the cells only one side has."""
    if not before or not after or before.get("version") != after.get("version"):
        return []  # (none recorded, or recorded another way: nothing to compare)
    out = []
    old, new = (Counter(tuple(r) for r in d.get("cells", [])) for d in (before, after))
    if old != new:
        def rows(c: Counter) -> str:
            return preview(sorted(" ".join(r[:3]) + f" ({r[3]} perturbed cells)" for r in c), 3)

        gone, added = old - new, new - old
        out.append("cells per dataset, cell type and split: "
                   + (f"{names[0]}: {rows(gone)}" if gone else "")
                   + ("; " if gone and added else "")
                   + (f"{names[1]}: {rows(added)}" if added else ""))

    def differing(key: str) -> list[str]:  # (labels, positions: older runs lack them)
        a, b = before.get(key, {}), after.get(key, {})
        return [k for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]

    changed = {key: differing(key) for key in ("labels", "values", "positions")}
    out += [f"the labels, barcodes or order of the cells of the {k} split"
            for k in changed["labels"]]
    out += [f"the expression values of the {k} split" for k in changed["values"]]
    out += [f"the order of the expression rows of the {k} split" for k in changed["positions"]
            if k not in changed["labels"] + changed["values"]]  # (said once per split)
    return out


def same_run(mine: dict, theirs: dict) -> bool:
    """Whether two model metadata records (``model.json`` / a checkpoint's ``statetx_model``)
    describe the same run: settings (those a resume may change aside), network, vocabulary
    and genes."""
    def key(m: dict) -> list:
        m = comparable(m)
        params = {k: v for k, v in m["params"].items() if k not in RESUMABLE_PARAMS}
        return [params, m.get("network_config"), m.get("vocab"), m.get("var_names")]

    return key(mine) == key(theirs)


def sigterm_unwinds() -> Callable[[], None] | None:
    """Turn SIGTERM into ``SystemExit(143)`` (so ``finally``/``except`` blocks run) until the
    returned function restores the previous handler; None outside the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):  # noqa: ANN001
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, previous)


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one existing file (links and relative paths resolved)."""
    return Path(a).exists() and Path(b).exists() and os.path.samefile(a, b)
