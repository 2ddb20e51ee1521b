"""Faults during training (tracker issue 9, item 2).

* Checkpoints are written atomically (temporary file + rename): a failed write leaves the previous
  file intact and no temporary file behind.
* A training process SIGKILLed in the middle of a checkpoint write leaves every ``*.ckpt``
  loadable, and resuming (``tx train`` on the existing run, or ``fit(..., resume_from=...)``)
  finishes with weights, optimiser state and history bit-identical to an uninterrupted run (CPU).
* A non-finite loss stops training with the step number; the checkpoint kept is the last one
  written before the failure, complete, loadable and finite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_synthetic
from test_model import SMALL, TINY_CLI

from statetx import StateTransitionModel
from statetx._utils import atomic_write, atomic_write_text
from statetx.cli import main
from statetx.run import load_run
from statetx.train import Trainer, TrainingError, atomic_torch_save, load_checkpoint_file

TINY = TINY_CLI

# Runs `statetx` with torch.save wrapped: the KILL_NTH-th write of a checkpoint named KILL_ON
# writes half of the serialised bytes to its temporary file, syncs it, and SIGKILLs the process.
KILLER = textwrap.dedent("""
    import io, os, signal, sys
    from pathlib import Path
    import torch

    target, nth = os.environ["KILL_ON"], int(os.environ["KILL_NTH"])
    real_save, seen = torch.save, []

    def save(obj, f, *args, **kwargs):
        name = Path(f).name if isinstance(f, (str, os.PathLike)) else ""
        if name.startswith(f".{target}.tmp"):
            seen.append(name)
            if len(seen) == nth:
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                data = buf.getvalue()
                with open(f, "wb") as fh:
                    fh.write(data[: len(data) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
    from statetx.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def small_model(**kw) -> StateTransitionModel:
    opts = dict(pert_col="gene", cell_type_key="cell_type", control_pert="ctrl",
                model_kwargs=SMALL, cell_set_len=8, batch_size=4, progress=False, seed=0,
                device="cpu")
    opts.update(kw)
    return StateTransitionModel("tiny", **opts)


def state_equal(a: dict, b: dict) -> bool:
    """Exact equality of nested checkpoint content (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and np.isnan(a) and np.isnan(b))


def logged(ckpt: dict) -> dict:
    """The logged values of a checkpoint's history, without the timing-dependent ones."""
    return {(h["step"], k): v for h in ckpt["history"] for k, v in h.items()
            if k not in ("step", "cells_per_s", "steps_per_s")}


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def loop_state(ckpt: dict) -> dict:
    """A checkpoint's training position (its wall-clock seconds left out)."""
    return {k: v for k, v in ckpt["train_state"].items() if k != "seconds"}


# =============================================================================================
# atomic writes


def test_save_clears_a_killed_saves_temporaries_only(tmp_path):
    """A save killed mid-way leaves its per-process temporaries; the next save removes those
    of processes that are gone, not a live writer's (another torchrun rank saving there)."""
    from test_model import small_model

    model = small_model(max_steps=1).fit(make_synthetic())
    folder = model.save(tmp_path / "m")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_tmp = folder / f".model.json.tmp{gone.pid}-1"
        live_tmp = folder / f".model.safetensors.tmp{live.pid}-1"
        dead_tmp.write_text("{")
        live_tmp.write_text("partial")
        model.save(folder)
        assert not dead_tmp.exists() and live_tmp.exists()
    finally:
        live.kill()
        live.wait()


def test_a_save_interrupted_between_its_renames_is_refused_by_load(tmp_path, monkeypatch):
    """save renames its files into place one by one: interrupted after the weights, the folder
    holds new weights next to the earlier model.json, which load refused to take for a model
    only when the shapes differed. The weights' digest in model.json names the mix-up; a folder
    saved before the digest was recorded still loads."""
    import copy
    import json

    from test_model import small_model

    from statetx.errors import DataError

    model = small_model(max_steps=1).fit(make_synthetic())
    folder = model.save(tmp_path / "m")
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.network_.parameters()).add_(1.0)
    real_replace = Path.replace

    def interrupted(self, target):
        if Path(target).name == "model.json":
            raise KeyboardInterrupt
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        other.save(folder)
    monkeypatch.setattr(Path, "replace", real_replace)
    assert temporaries(folder) == []
    with pytest.raises(DataError, match=r"model\.json and model\.safetensors are from different "
                                        r"saves .*Save the model again"):
        StateTransitionModel.load(folder)
    from statetx.run import _state_dict_of  # (init_from=<model folder> reads it as load does)

    with pytest.raises(DataError, match="are from different saves"):
        _state_dict_of(folder, None)
    model.save(folder)
    meta = json.loads((folder / "model.json").read_text())
    del meta["weights_sha256"]  # (as saved by earlier versions)
    (folder / "model.json").write_text(json.dumps(meta))
    StateTransitionModel.load(folder)


def test_atomic_torch_save_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:  # the device filled up half-way through
            fh.truncate(os.path.getsize(f) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_torch_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert temporaries(tmp_path) == []
    old = torch.load(path, weights_only=True)
    assert old["step"] == 1 and torch.equal(old["w"], torch.ones(3))


def test_atomic_text_writes_failure_keeps_the_old_file(tmp_path):
    path = atomic_write_text(tmp_path / "config.yaml", "old: 1\n")

    def failing(tmp: Path) -> None:
        tmp.write_text("new: partial")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        atomic_write(path, failing)
    assert path.read_text() == "old: 1\n" and temporaries(tmp_path) == []
    with pytest.raises(RuntimeError, match="writer failed"):
        atomic_write(tmp_path / "new.h5ad", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_checkpoint_write_failure_during_training(tmp_path, monkeypatch):
    """The disk fills up while step=2.ckpt is written: training stops with the OS error, every
    checkpoint on disk is complete, and no temporary file is left."""
    real_save = torch.save

    def save(obj, f, *a, **k):
        if Path(f).name.startswith(".step=2.ckpt.tmp"):
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match="No space left"):
        small_model(max_steps=2, ckpt_every_n_steps=1, val_freq=2).fit(
            make_synthetic(n_cell_types=2, n_perts=2), output_dir=tmp_path)
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["last.ckpt", "step=1.ckpt"]
    assert load_checkpoint_file(ck / "last.ckpt")["train_state"]["step"] == 1


# =============================================================================================
# SIGKILL in the middle of a checkpoint write, then resume


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """`tx train` (4 steps, a checkpoint after each) killed while writing last.ckpt at step 3."""
    d = tmp_path_factory.mktemp("killed")
    make_synthetic(n_cell_types=2, n_perts=2).write_h5ad(d / "data.h5ad")
    (d / "split.toml").write_text(f'[datasets]\ndata = "{d / "data.h5ad"}"\n'
                                  '[training]\ndata = "train"\n')
    (d / "killer.py").write_text(KILLER)

    def args(name: str) -> list[str]:
        return ["tx", "train", f"data.kwargs.toml_config_path={d / 'split.toml'}",
                f"output_dir={d / 'out'}", f"name={name}", "training.max_steps=4",
                "training.ckpt_every_n_steps=1", "training.val_freq=2", *TINY]

    env = {**os.environ, "KILL_ON": "last.ckpt", "KILL_NTH": "3"}
    r = subprocess.run([sys.executable, str(d / "killer.py"), *args("run")], env=env,
                       capture_output=True, text=True, timeout=600, cwd=d)
    assert r.returncode == -9, r.stderr[-3000:]  # SIGKILL
    run = d / "out" / "run"
    # keep a pristine copy of the killed run for the Python-API resume
    shutil.copytree(run, d / "out" / "api")
    return {"run": run, "api": d / "out" / "api", "args": args, "dir": d}


@pytest.fixture(scope="module")
def reference(killed):
    """The same training, uninterrupted."""
    assert main(killed["args"]("ref")) == 0
    return load_checkpoint_file(killed["dir"] / "out" / "ref" / "checkpoints" / "last.ckpt")


def test_killed_write_leaves_every_checkpoint_loadable(killed):
    ck = killed["run"] / "checkpoints"
    names = sorted(p.name for p in ck.iterdir())
    partial = [n for n in names if n.startswith(".last.ckpt.tmp")]
    assert len(partial) == 1, names  # the process really died inside the write
    assert sorted(n for n in names if n.endswith(".ckpt")) == [
        "last.ckpt", "step=1.ckpt", "step=2.ckpt", "step=3.ckpt"]
    with pytest.raises(TrainingError, match="truncated, corrupted"):
        load_checkpoint_file(ck / partial[0])
    steps = {}
    for p in ck.glob("*.ckpt"):
        ckpt = load_checkpoint_file(p)
        steps[p.name] = ckpt["train_state"]["step"]
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    # last.ckpt still holds the previous complete state (step 2); step=3.ckpt is complete
    assert steps == {"last.ckpt": 2, "step=1.ckpt": 1, "step=2.ckpt": 2, "step=3.ckpt": 3}
    model = load_run(killed["api"], "last.ckpt", verbose=False)
    assert model.step_ == 2


def test_cli_resume_after_kill_is_bit_identical(killed, reference, capsys):
    capsys.readouterr()
    assert main(killed["args"]("run")) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "(step 2)" in out and "at step 4" in out
    final = load_checkpoint_file(killed["run"] / "checkpoints" / "last.ckpt")  # full state
    assert loop_state(final) == loop_state(reference)
    assert state_equal(final["state_dict"], reference["state_dict"])
    assert state_equal(final["optimizer"], reference["optimizer"])
    assert logged(final) == logged(reference)


def test_api_resume_from_last_complete_checkpoint_is_bit_identical(killed, reference):
    """fit(resume_from=last.ckpt) — the newest complete training state — finishes identically, and
    history_ holds the steps before the resume too (Trainer.fit used to return the history of
    the state that the resume had replaced, i.e. nothing)."""
    from statetx import runconfig as R

    tokens = killed["args"]("api")[2:]
    plan = R.plan_training(R.resolve(tokens))
    api = killed["api"]
    model = StateTransitionModel(**{**plan.params, "progress": False})
    model.fit(None, plan.toml, output_dir=api, resume_from=api / "checkpoints" / "last.ckpt")
    final = load_checkpoint_file(api / "checkpoints" / "last.ckpt")
    assert state_equal(final["state_dict"], reference["state_dict"])
    assert state_equal(final["optimizer"], reference["optimizer"])
    assert loop_state(final) == loop_state(reference)
    assert logged(final) == logged(reference)
    assert sorted(model.history_["step"]) == [2, 4]
    weights = {k: v for k, v in model.network_.state_dict().items()}
    assert state_equal(weights, reference["state_dict"])


# =============================================================================================
# non-finite loss


def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A NaN loss at step 3: TrainingError names step 3; last.ckpt is the step-2 state (the last
    written before the failure), complete, finite and loadable; nothing after it was written;
    resuming from it (once the cause is gone) finishes the run."""
    real_total = Trainer.total

    def total(self, parts):
        loss = real_total(self, parts)
        if self.net.training and self.state.step == 2:  # computing step 3
            loss = loss * float("nan")
        return loss

    monkeypatch.setattr(Trainer, "total", total)
    adata = make_synthetic(n_cell_types=2, n_perts=2)
    model = small_model(max_steps=4, ckpt_every_n_steps=1, val_freq=2)
    with pytest.raises(TrainingError, match=r"non-finite training loss \(nan\) at step 3; training "
                                            r"stopped\. The last complete checkpoint is kept"):
        model.fit(adata, output_dir=tmp_path)
    monkeypatch.undo()
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["last.ckpt", "step=1.ckpt", "step=2.ckpt"]
    last = load_checkpoint_file(ck / "last.ckpt")
    assert last["train_state"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert all(torch.isfinite(v).all() for s in last["optimizer"]["state"].values()
               for v in s.values())
    assert state_equal(last["state_dict"], load_checkpoint_file(ck / "step=2.ckpt")["state_dict"])
    pred = load_run(tmp_path, "last.ckpt", verbose=False).predict(adata)
    assert np.isfinite(pred.X).all()
    resumed = small_model(max_steps=4, ckpt_every_n_steps=1, val_freq=2)
    resumed.fit(adata, output_dir=tmp_path, resume_from=ck / "last.ckpt")
    assert load_checkpoint_file(ck / "final.ckpt")["train_state"]["step"] == 4
    assert list(resumed.history_["step"]) == [2, 4]
