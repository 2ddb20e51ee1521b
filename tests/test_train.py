"""The training loop: checkpoints, exact resume, schedules, stopping rules."""

from __future__ import annotations

import math
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_model import SMALL, SPEC, small_model

from statetx import StateTransitionModel
from statetx.errors import ConfigError, DataError
from statetx.train import (
    TrainConfig,
    Trainer,
    TrainingError,
    clip_and_step,
    clip_gradients,
    load_checkpoint_file,
)

FEWSHOT = ('[training]\ndata = "train"\n[fewshot."data.CT1"]\nval = ["P0"]\n'
           '[zeroshot]\n"data.CT2" = "test"\n')


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.network_.state_dict().items()}


def test_checkpoints_written_and_last_is_latest(synth, tmp_path):
    m = small_model(max_steps=8, val_freq=4, ckpt_every_n_steps=2, keep_last_n=2)
    m.fit(synth, FEWSHOT, output_dir=tmp_path)
    ck = tmp_path / "checkpoints"
    names = sorted(p.name for p in ck.iterdir())
    assert names == ["best.ckpt", "final.ckpt", "last.ckpt", "step=6.ckpt", "step=8.ckpt"]
    small_model(max_steps=4, val_freq=2, ckpt_every_n_steps=2, keep_last_n=0).fit(
        synth, FEWSHOT, output_dir=tmp_path / "none")  # no periodic checkpoint kept
    assert not list((tmp_path / "none" / "checkpoints").glob("step=*"))
    last = load_checkpoint_file(ck / "last.ckpt")
    best = load_checkpoint_file(ck / "best.ckpt")
    assert last["train_state"]["step"] == 8
    assert best["train_state"]["step"] == best["train_state"]["best_step"] in (4, 8)
    logged = pd.read_csv(tmp_path / "metrics.csv")
    assert logged["val_loss"].notna().sum() == 2 and logged["step"].max() == 8
    for name in ("vocab.json", "var_dims.json", "split.toml", "split_summary.csv"):
        assert (tmp_path / name).is_file()


def test_no_validation_split_means_no_best_checkpoint(synth, tmp_path):
    small_model(max_steps=4, val_freq=2).fit(synth, output_dir=tmp_path)
    assert not (tmp_path / "checkpoints" / "best.ckpt").exists()
    assert (tmp_path / "checkpoints" / "final.ckpt").exists()


def _resumed(synth, tmp_path, **kw) -> tuple:
    """A 10-step run, and the same run stopped at step 5 and resumed from its last.ckpt."""
    full = small_model(max_steps=10, **kw).fit(synth, FEWSHOT, output_dir=tmp_path / "a")
    small_model(max_steps=5, **kw).fit(synth, FEWSHOT, output_dir=tmp_path / "b")
    part = small_model(max_steps=10, **kw).fit(
        synth, FEWSHOT, output_dir=tmp_path / "b",
        resume_from=tmp_path / "b" / "checkpoints" / "last.ckpt")
    return full, part


def test_resume_is_bit_identical(synth, tmp_path):
    full, part = _resumed(synth, tmp_path, val_freq=5, ckpt_every_n_steps=5,
                          log_every_n_steps=2)
    wa, wb = weights(full), weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the training time counts the steps before the resume too (as the checkpoint records it)
    before = load_checkpoint_file(tmp_path / "b" / "checkpoints" / "step=5.ckpt")
    assert part.training_time_ > before["train_state"]["seconds"] > 0
    # metrics.csv: one column per value, and the resumed run's file is the full run's
    a, b = (pd.read_csv(tmp_path / r / "metrics.csv") for r in ("a", "b"))
    assert {"step", "epoch", "train_loss", "val_loss", "grad_norm", "lr"} <= set(a.columns)
    same = [c for c in a.columns if "per_s" not in c]
    # (the stopped run also logged its last step, 5: its own history, kept)
    after = [r[r["step"] != 5].reset_index(drop=True)[same] for r in (a, b)]
    pd.testing.assert_frame_equal(*after)
    assert list(a["step"]) == [2, 4, 5, 6, 8, 10] and a["step"].dtype == b["step"].dtype
    other_seed = small_model(max_steps=10, val_freq=5, seed=1).fit(synth, FEWSHOT)
    assert not all(torch.equal(wa[k], v) for k, v in weights(other_seed).items())


def test_only_last_checkpoint_holds_the_training_state(synth, tmp_path):
    small_model(max_steps=4, val_freq=2, ckpt_every_n_steps=2).fit(synth, FEWSHOT,
                                                                   output_dir=tmp_path)
    ck = tmp_path / "checkpoints"
    last = load_checkpoint_file(ck / "last.ckpt")
    assert {"optimizer", "rng"} <= set(last)
    for name in ("step=2.ckpt", "best.ckpt", "final.ckpt"):
        c = load_checkpoint_file(ck / name)
        assert "optimizer" not in c and "rng" not in c and c["state_dict"]
        assert (ck / name).stat().st_size < 0.6 * (ck / "last.ckpt").stat().st_size
    with pytest.raises(TrainingError, match=r"cannot resume from .*step=2.ckpt: it holds "
                                            r"weights only.*last.ckpt"):
        small_model(max_steps=6).fit(synth, FEWSHOT, output_dir=tmp_path / "r",
                                     resume_from=ck / "step=2.ckpt")


def test_stale_temporary_checkpoints_are_removed(synth, tmp_path):
    """A process killed in torch.save leaves ``.last.ckpt.tmp<pid>-<thread>``; resuming deletes
    it, and leaves a live process's temporary alone."""
    import subprocess

    small_model(max_steps=2).fit(synth, output_dir=tmp_path)
    ck = tmp_path / "checkpoints"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = ck / f".last.ckpt.tmp{gone.pid}-0"
    stale.write_bytes(b"half a checkpoint")
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        writing = ck / f".step=9.ckpt.tmp{live.pid}-0"
        writing.write_bytes(b"being written")
        small_model(max_steps=3).fit(synth, output_dir=tmp_path, resume_from=ck / "last.ckpt")
        live.kill()
    assert not stale.exists() and (ck / "final.ckpt").is_file()
    assert [p.name for p in ck.glob(".*")] == [writing.name]


def test_same_seed_same_weights(synth):
    a = small_model(max_steps=4).fit(synth)
    b = small_model(max_steps=4).fit(synth)
    assert all(torch.equal(v, weights(b)[k]) for k, v in weights(a).items())


def test_weight_averaging_returns_the_mean_of_the_steps(synth, tmp_path):
    """``uniform``: the network, final.ckpt and best.ckpt hold the mean of the weights after
    the steps past ``averaging_start``; training follows the same path as without averaging."""
    raw = small_model(max_steps=4, ckpt_every_n_steps=1, val_freq=4)
    raw.fit(synth, FEWSHOT, output_dir=tmp_path / "raw")
    steps = [load_checkpoint_file(tmp_path / "raw" / "checkpoints" / f"step={i}.ckpt")
             for i in range(1, 5)]
    avg = small_model(max_steps=4, val_freq=4, weight_averaging="uniform", averaging_start=0.25)
    avg.fit(synth, FEWSHOT, output_dir=tmp_path / "avg")
    got = weights(avg)
    final = load_checkpoint_file(tmp_path / "avg" / "checkpoints" / "final.ckpt")
    best = load_checkpoint_file(tmp_path / "avg" / "checkpoints" / "best.ckpt")
    last = load_checkpoint_file(tmp_path / "avg" / "checkpoints" / "last.ckpt")
    assert final["train_state"]["n_averaged"] == 3  # steps 2, 3, 4 (after 0.25 * 4)
    moved = False
    for k, v in got.items():
        mean = torch.stack([s["state_dict"][k] for s in steps[1:]]).mean(0)
        torch.testing.assert_close(v, mean)
        assert torch.equal(final["state_dict"][k], v) and torch.equal(best["state_dict"][k], v)
        assert torch.equal(last["train_weights"][k], steps[-1]["state_dict"][k])  # resumes
        moved |= not torch.allclose(v, steps[-1]["state_dict"][k])
    assert moved  # the average is not the last step
    # validation scored the averaged weights: the same loss as the raw run's is not expected
    assert avg.history_["val_loss"].dropna().iloc[-1] != raw.history_["val_loss"].dropna().iloc[-1]


def test_estimator_names_the_weight_averaging_choices(synth):
    with pytest.raises(ConfigError, match="weight_averaging='ema' is invalid; expected 'auto'"):
        small_model(weight_averaging="ema").fit(synth)


def test_weight_averaging_resume_is_bit_identical(synth, tmp_path):
    full, part = _resumed(synth, tmp_path, val_freq=5, ckpt_every_n_steps=5,
                          weight_averaging="uniform")
    wa, wb = weights(full), weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_with_a_new_max_steps_warns_when_the_schedule_moves(synth, tmp_path):
    """Extending a run is exact with a constant schedule; a cosine decay (or a late averaging
    start) is laid out over max_steps, so a resumed longer run says it differs."""
    for schedule in ("constant", "cosine"):
        out = tmp_path / schedule
        small_model(max_steps=3, lr_schedule=schedule).fit(synth, FEWSHOT, output_dir=out)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            small_model(max_steps=5, lr_schedule=schedule).fit(
                synth, FEWSHOT, output_dir=out, resume_from=out / "checkpoints" / "last.ckpt")
        moved = [w for w in caught if "max_steps 3 -> 5: the cosine learning-rate decay"
                 in str(w.message)]
        assert len(moved) == (schedule == "cosine")


def test_early_stopping(synth, tmp_path, capsys):
    kw = dict(max_steps=200, val_freq=1, early_stopping_patience=2, lr=0.5)
    m = small_model(**kw).fit(synth, FEWSHOT, output_dir=tmp_path)
    stop = m.history_["step"].max()
    assert stop < 200
    # said, with where the best weights are (the model keeps the last step's)
    assert (f"stopped early at step {stop}: no better val_loss in 2 validations. The model "
            f"keeps this step's weights; the best, step {m.best_step_}" in capsys.readouterr().out)
    # with weight averaging the model keeps the average, and the message says so
    small_model(**kw, weight_averaging="uniform").fit(synth, FEWSHOT)
    assert "The model keeps the running average of the weights up to this step" in \
        capsys.readouterr().out
    # resuming the stopped run stays stopped, and says so (a larger patience continues it)
    last = tmp_path / "checkpoints" / "last.ckpt"
    again = small_model(**kw).fit(synth, FEWSHOT, output_dir=tmp_path, resume_from=last)
    assert again.history_["step"].max() == stop
    assert (f"nothing to train: the resumed run is at step {stop}, where it stopped early"
            in capsys.readouterr().out)
    more = small_model(**{**kw, "early_stopping_patience": 50, "max_steps": stop + 2})
    with pytest.warns(UserWarning, match="early_stopping_patience: 2 -> 50"):
        more.fit(synth, FEWSHOT, output_dir=tmp_path, resume_from=last)
    assert more.history_["step"].max() == stop + 2


def test_non_finite_loss_stops_with_step(synth, tmp_path):
    m = small_model(max_steps=6, val_freq=3, ckpt_every_n_steps=2, lr=1e30,
                    gradient_clip_val=None)
    with pytest.raises(TrainingError, match=r"non-finite training loss .* at step \d+"):
        m.fit(synth, output_dir=tmp_path)
    ckpts = list((tmp_path / "checkpoints").glob("*.ckpt"))
    for c in ckpts:  # every checkpoint that exists is complete and finite
        state = load_checkpoint_file(c)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values())


def test_lr_schedule_warmup_cosine():
    net = torch.nn.Linear(2, 2)
    cfg = TrainConfig(max_steps=100, lr=1.0, warmup_steps=10, lr_schedule="cosine",
                      progress=False)

    class _S:  # a stand-in sampler: only lr_at is exercised here
        pass

    t = Trainer(net, _S(), None, cfg)
    assert t.lr_at(0) == pytest.approx(0.1)
    assert t.lr_at(9) == pytest.approx(1.0)
    assert t.lr_at(10) == pytest.approx(1.0)
    assert t.lr_at(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert t.lr_at(100) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("bad", [{"optimizer": "sgd"}, {"lr_schedule": "linear"},
                                 {"precision": "16"}, {"max_steps": 0},
                                 {"weight_averaging": "ema"}, {"averaging_start": 1.0},
                                 {"gradient_clip_val": -3.0},
                                 {"gradient_clip_val": float("nan")},
                                 {"lr": -1.0}, {"regularization": -0.1}])
def test_train_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        TrainConfig(**bad)


def test_gradient_clip_val_zero_means_no_clipping():  # as in Lightning (model.md §11)
    assert TrainConfig(gradient_clip_val=0).gradient_clip_val is None


def test_string_lr_is_parsed():
    assert TrainConfig(lr="1e-4").lr == 1e-4
    assert TrainConfig(gradient_clip_val="10").gradient_clip_val == 10.0  # (it crashed at step 1)
    with pytest.raises(ConfigError, match="gradient_clip_val='ten' must be a number"):
        TrainConfig(gradient_clip_val="ten")


def test_gradient_accumulation_matches_bigger_batch(synth):
    kw = dict(max_steps=2, model_kwargs={**SMALL, "dropout": 0.0})
    a = small_model(batch_size=4, gradient_accumulation_steps=2, **kw).fit(synth)
    b = small_model(batch_size=8, **kw).fit(synth)
    wb = weights(b)
    for k, v in weights(a).items():
        torch.testing.assert_close(v, wb[k], atol=1e-5, rtol=1e-4)


def test_tensorboard_log_when_installed(synth, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is optional")
    small_model(max_steps=2, val_freq=1).fit(synth, output_dir=tmp_path)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("clip", [None, 1e9, 0.5])
def test_clip_gradients_matches_torch(clip):
    """The CPU fast path (one dot product per gradient) gives clip_grad_norm_'s norm and grads."""
    torch.manual_seed(0)
    shapes = [(300, 40), (40,), (7, 3, 5)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, ref):
        a.grad = torch.randn(a.shape)
        b.grad = a.grad.clone()
    norm = clip_gradients(ours, clip)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, clip if clip else float("inf"))
    assert torch.allclose(norm, ref_norm, rtol=1e-6)
    for a, b in zip(ours, ref):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-9)
    after = torch.cat([p.grad.flatten() for p in ours]).norm()
    assert after == pytest.approx(min(float(norm), clip or math.inf), rel=1e-4)


@pytest.mark.parametrize("old_torch", [False, True])
@pytest.mark.parametrize("clip", [None, 1e9, 0.5])
@pytest.mark.parametrize("fused", [False, True])
def test_clip_and_step_matches_clip_grad_norm_then_adam(clip, fused, old_torch, monkeypatch):
    """With fused Adam on the CPU the clipping rides on the kernel's grad_scale input (its own
    rescaling pass is never run): the step equals clip_grad_norm_ followed by an ordinary Adam
    step; also without torch 2.6's get_total_norm / clip_grads_with_norm_ (torch 2.3 - 2.5)."""
    utils = torch.nn.utils
    ref_clip = utils.clip_grad_norm_
    if old_torch:
        monkeypatch.delattr(utils, "get_total_norm")
        monkeypatch.delattr(utils, "clip_grads_with_norm_")
    elif fused:
        def no_pass(*args, **kwargs):
            raise AssertionError("a separate rescaling pass ran")
        monkeypatch.setattr(utils, "clip_grads_with_norm_", no_pass)
    torch.manual_seed(0)
    shapes = [(300, 40), (40,), (7, 3, 5)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = torch.optim.Adam(ours, lr=0.1, fused=fused)
    ref_opt = torch.optim.Adam(ref, lr=0.1)
    for _ in range(3):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape) * 3
            b.grad = a.grad.clone()
        norm = clip_and_step(opt, ours, clip)
        ref_norm = ref_clip(ref, clip if clip else float("inf"))
        ref_opt.step()
        assert torch.allclose(norm, ref_norm, rtol=1e-6)
        for a, b in zip(ours, ref):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert not hasattr(opt, "grad_scale")
    if clip == 0.5:  # the clip was binding: the update is not the unclipped one
        assert float(norm) > 1.0


def test_compile_mode_is_validated():
    with pytest.raises(ConfigError, match="compile_mode='fast'.*reduce-overhead"):
        TrainConfig(compile=True, compile_mode="fast")


def test_compiled_bf16_training_compiles_network_and_loss_together(synth):
    """compile=True under bf16 autocast traces forward + loss as one graph (CPU here, the same
    path as CUDA's default precision), trains like eager and restores the matmul precision."""
    from torch._dynamo.utils import counters

    counters.clear()
    prev = torch.get_float32_matmul_precision()
    a = small_model(max_steps=6, compile=True, precision="bf16-mixed").fit(synth, SPEC)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert torch.get_float32_matmul_precision() == prev
    b = small_model(max_steps=6, precision="bf16-mixed").fit(synth, SPEC)
    la, lb = (m.history_["train_loss"].dropna() for m in (a, b))
    assert np.allclose(la, lb, rtol=1e-2)


def test_retained_heap_reuses_freed_memory(monkeypatch):
    """Freed blocks stay in the heap while retained_heap is active (no page faults when they
    are allocated again) and go back to the kernel after it. Measured in a fresh process: how
    a test run's earlier allocations left the heap decides whether a freed block lies at its
    top (and is trimmed) in this one."""
    import json
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import json, resource, torch
        from statetx._heap import retained_heap

        def faults_of_big_allocations():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(4):
                torch.empty(48 << 20, dtype=torch.uint8).fill_(1)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        with retained_heap() as active:
            for _ in range(4):  # the heap grows (glibc settles after a few rounds)
                faults_of_big_allocations()
            inside = faults_of_big_allocations()
        after = faults_of_big_allocations()  # thresholds back to 32 / 64 MiB: handed back
        print(json.dumps({"active": active, "inside": inside, "after": after}))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("STATETX_MALLOC_TUNING", None)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    if not got["active"]:
        pytest.skip("malloc tuning needs Linux with glibc")
    assert got["inside"] < 2000  # 4 x 12,288 pages when each block is handed back
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not (thp.exists() and "[always]" in thp.read_text()):  # 2 MiB pages: few faults anyway
        assert got["after"] > 4 * got["inside"] + 10_000
    from statetx._heap import retained_heap

    monkeypatch.setenv("STATETX_MALLOC_TUNING", "0")
    with retained_heap() as active:
        assert not active


# ---- loss options (spec model.md §10.3-10.5) -------------------------------------------------
def test_loss_kwargs_configure_the_set_loss(synth):
    a = small_model(loss="se", loss_kwargs={"sinkhorn_weight": 0.0}, max_steps=3).fit(synth)
    b = small_model(loss="energy", max_steps=3).fit(synth)
    c = small_model(loss="se", loss_kwargs={"sinkhorn_weight": 0.5, "blur": 0.1},
                    max_steps=3).fit(synth)
    # se with a zero Sinkhorn weight is the energy loss: same training
    np.testing.assert_allclose(a.history_["main_loss"], b.history_["main_loss"], rtol=1e-5)
    assert not np.allclose(c.history_["main_loss"], b.history_["main_loss"])
    assert c.get_params()["loss_kwargs"] == {"sinkhorn_weight": 0.5, "blur": 0.1}


def test_loss_kwargs_unknown_option_is_named(synth):
    with pytest.raises(ConfigError, match="'blurr'.*Did you mean: 'blur'"):
        small_model(loss_kwargs={"blurr": 0.1}).fit(synth)
    # values are checked before any data are read (here: no data at all)
    for bad, match in (({"blur": -1}, "blur must be positive"),
                       ({"mmd_num_chunks": 0}, "mmd_num_chunks must be an integer"),
                       ({"blur": "abc"}, "blur='abc' is not a number"),
                       ({"sinkhorn_weight": -1}, "sinkhorn_weight must be a finite number"),
                       ({"energy_weight": float("nan")}, "energy_weight must be a finite"),
                       ({"regularization": float("inf")}, "must be finite numbers")):
        with pytest.raises(ConfigError, match=match):
            small_model(loss_kwargs=bad).fit(None, "[datasets]\nx = 'nowhere.h5ad'\n")
    small_model(loss_kwargs={"mmd_num_chunks": np.int64(2)}, max_steps=1).fit(synth)
    with pytest.raises(ConfigError, match="mmd_num_chunks=1000 is more than the 32 output"):
        small_model(loss_kwargs={"mmd_num_chunks": 1000}, max_steps=1).fit(synth)


def test_architecture_errors_come_before_any_data_is_read():
    nowhere = "[datasets]\nx = 'nowhere.h5ad'\n[training]\nx = 'train'\n"
    for params, match in (({"preset": "state_smm"}, "state_smm.*Did you mean: 'state_sm'"),
                          ({"model_kwargs": {"hiden_dim": 8}}, "hiden_dim"),
                          ({"basal_mapping_strategy": "batch"}, "needs batch_col"),
                          ({"basal_mapping_strategy": "nearest"}, "is invalid")):
        with pytest.raises(ConfigError, match=match):
            StateTransitionModel(pert_col="gene", **params).fit(None, nowhere)


def test_loss_options_without_effect_are_said(synth):
    with pytest.warns(UserWarning, match="blur, energy_weight, decoder_weight have no effect"):
        small_model(loss_kwargs={"blur": 0.1, "energy_weight": 2.0, "decoder_weight": 0.5},
                    max_steps=1).fit(synth)


def test_randomized_chunks_only_while_training(synth):
    model = small_model(loss_kwargs={"mmd_num_chunks": 4, "randomize_mmd_chunks": True},
                        max_steps=2, val_freq=1)
    model.fit(synth)
    assert np.isfinite(model.history_["main_loss"].dropna()).all()
    # validation (fixed sets, fixed chunks) is repeatable; training draws feature permutations
    cfg = TrainConfig(max_steps=1, loss_options={"mmd_num_chunks": 4,
                                                 "randomize_mmd_chunks": True})
    pred, target = torch.randn(2, 8, 32), torch.randn(2, 8, 32)
    loss = Trainer(model.network_, None, None, cfg).loss_fn
    assert torch.equal(loss(pred, target), loss(pred, target))
    torch.manual_seed(0)
    assert not torch.equal(loss(pred, target, training=True), loss(pred, target, training=True))


def test_regularization_adds_mean_abs_change(synth):
    model = small_model(loss_kwargs={"regularization": 0.5}, max_steps=2).fit(synth)
    reg = model.history_["regularization"]
    assert (reg > 0).all()
    np.testing.assert_allclose(model.history_["train_loss"],
                               model.history_["main_loss"] + 0.5 * reg, rtol=1e-5)


def test_regularization_needs_equal_widths(synth):
    from dataclasses import replace

    from statetx.nn import StateTransitionNetwork

    cfg = small_model(max_steps=1).fit(synth).network_config_
    net = StateTransitionNetwork(replace(cfg, output_dim=cfg.input_dim + 1))
    with pytest.raises(ConfigError, match="regularization=0.5.*input and output widths"):
        Trainer(net, None, None, TrainConfig(regularization=0.5))


def _decoder_data(synth):
    emb = synth.copy()
    emb.obsm["X_emb"] = np.random.default_rng(0).normal(size=(emb.n_obs, 6)).astype(np.float32)
    emb.obsm["X_hvg"] = np.asarray(emb.X, dtype=np.float32)  # the decoder's gene-space target
    kw = {**SMALL, "gene_decoder_bool": True, "decoder_hidden_dims": [16]}
    return emb, dict(embed_key="X_emb", output_space="gene", model_kwargs=kw)


@pytest.mark.parametrize("alias", ["decoder_weight", "decoder_loss_weight"])
def test_decoder_weight_and_alias(synth, alias):
    emb, kw = _decoder_data(synth)
    model = small_model(**kw, loss_kwargs={alias: 0.25}, max_steps=2).fit(emb)
    h = model.history_
    assert (h["decoder_loss"] > 0).all()
    np.testing.assert_allclose(h["train_loss"], h["main_loss"] + 0.25 * h["decoder_loss"],
                               rtol=1e-5)


def test_detach_decoder_keeps_decoder_gradients_out_of_the_network(synth):
    emb, kw = _decoder_data(synth)
    model = small_model(**kw, loss_kwargs={"detach_decoder": True}, max_steps=2).fit(emb)
    net = model.network_
    basal, pert = torch.randn(2, 8, 6), torch.zeros(2, 8, net.config.pert_dim)
    for detach in (False, True):
        net.zero_grad()
        net(basal, pert, detach_decoder=detach).counts.sum().backward()
        encoder = net.basal_encoder.weight.grad
        assert (encoder is None or not encoder.any()) == detach
        assert net.gene_decoder.decoder[0].weight.grad.abs().sum() > 0
    # decoder_input replaces the prediction as the decoder's input
    z = torch.randn(2, 8, net.config.output_dim)
    with torch.no_grad():
        torch.testing.assert_close(net(basal, pert, decoder_input=z).counts,
                                   net.gene_decoder(z))


def test_fresh_fit_into_a_used_folder_replaces_the_earlier_run(synth, tmp_path):
    spec_val = ('[training]\ndata = "train"\n[zeroshot]\n"data.CT2" = "test"\n'
                '"data.CT1" = "val"\n')
    small_model(max_steps=4, val_freq=2, ckpt_every_n_steps=2).fit(synth, spec_val,
                                                                   output_dir=tmp_path)
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()
    (tmp_path / "eval_final.ckpt").mkdir()  # e.g. an evaluation of the earlier model
    small_model(max_steps=3, seed=1).fit(synth, output_dir=tmp_path)  # no spec: all train
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "best.ckpt" not in names and "step=4.ckpt" not in names
    steps = pd.read_csv(tmp_path / "metrics.csv")["step"]
    assert steps.is_monotonic_increasing and steps.max() == 3
    # nothing of the earlier run survives to be mistaken for this one's
    assert not (tmp_path / "split.toml").exists() and not (tmp_path / "eval_final.ckpt").exists()
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.replaced-*"))


def test_failed_fit_leaves_the_earlier_run_in_its_folder(synth, tmp_path):
    small_model(max_steps=4, ckpt_every_n_steps=2).fit(synth, SPEC, output_dir=tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(TrainingError, match="non-finite"):  # fails before its first checkpoint
        small_model(max_steps=4, ckpt_every_n_steps=2, lr=1e38).fit(
            synth, output_dir=tmp_path / "run")
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before
    with pytest.raises(TrainingError, match="non-finite"):  # a new folder is not left behind
        small_model(max_steps=4, ckpt_every_n_steps=2, lr=1e38).fit(
            synth, output_dir=tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_logging_interval_and_throughput_columns(synth):
    m = small_model(max_steps=6, log_every_n_steps=2, val_freq=100).fit(synth)
    logged = m.history_.dropna(subset=["train_loss"])
    assert list(logged["step"]) == [2, 4, 6]
    assert (logged["steps_per_s"] > 0).all() and (logged["cells_per_s"] > 0).all()
    # cells per step = batch_size * cell_set_len
    np.testing.assert_allclose(logged["cells_per_s"] / logged["steps_per_s"], 4 * 8, rtol=1e-6)


def test_logged_training_values_are_means_over_the_logging_window(synth, tmp_path):
    """train_loss, its parts and grad_norm in history_ / metrics.csv are means over the steps
    since the previous log (a single batch's value draws false spikes in pl.history); a last
    step off the schedule reports its window so far, and a run resumed from there logs as the
    uninterrupted one."""
    every = small_model(max_steps=7, log_every_n_steps=1, val_freq=100).fit(synth)
    per_step = every.history_.set_index("step")
    m = small_model(max_steps=7, log_every_n_steps=3, val_freq=100).fit(
        synth, output_dir=tmp_path / "a")
    logged = m.history_.set_index("step")
    assert list(logged.index) == [3, 6, 7]
    for key in ("train_loss", "main_loss", "grad_norm"):
        want = [per_step.loc[1:3, key].mean(), per_step.loc[4:6, key].mean(),
                per_step.loc[7, key]]
        np.testing.assert_allclose(logged[key], want, rtol=1e-6)
    assert not np.allclose(logged.loc[[3, 6], "train_loss"], per_step.loc[[3, 6], "train_loss"])
    csv = pd.read_csv(tmp_path / "a" / "metrics.csv").set_index("step")
    np.testing.assert_allclose(csv["train_loss"], logged["train_loss"], rtol=1e-6)
    small_model(max_steps=7, log_every_n_steps=3, val_freq=100).fit(
        synth, output_dir=tmp_path / "b")
    more = small_model(max_steps=9, log_every_n_steps=3, val_freq=100).fit(
        synth, output_dir=tmp_path / "b", resume_from=tmp_path / "b" / "checkpoints" / "last.ckpt")
    np.testing.assert_allclose(more.history_.set_index("step").loc[9, "train_loss"],
                               small_model(max_steps=9, log_every_n_steps=3, val_freq=100)
                               .fit(synth).history_.set_index("step").loc[9, "train_loss"])


def test_a_validation_between_logged_steps_does_not_show_an_old_train_loss(synth, monkeypatch,
                                                                            capsys):
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    small_model(max_steps=6, log_every_n_steps=2, val_freq=3, progress=True).fit(synth, FEWSHOT)
    lines = {int(ln.split(",")[0].split()[-1].split("/")[0]): ln
             for ln in capsys.readouterr().err.splitlines() if ln.startswith("training:")}
    assert sorted(lines) == [2, 3, 4, 6]
    assert ", val " in lines[3] and "loss" not in lines[3] and "cells/s" not in lines[3]
    assert all("loss" in lines[n] and "cells/s" in lines[n] for n in (2, 4, 6))


def test_resume_from_another_runs_checkpoint_is_refused(synth, tmp_path):
    from conftest import make_synthetic

    small_model(max_steps=2).fit(make_synthetic(n_perts=2), output_dir=tmp_path / "other")
    with pytest.raises(TrainingError, match="cannot resume from .*another vocabulary"):
        small_model(max_steps=3).fit(synth, output_dir=tmp_path / "mine",
                                     resume_from=tmp_path / "other" / "checkpoints" / "last.ckpt")
    # the same network and data, other settings: they are named
    small_model(max_steps=2).fit(synth, output_dir=tmp_path / "same")
    with pytest.raises(TrainingError, match=r"with other settings \(lr: .* -> 0\.001\) than this "
                                            r"run asks for \(a checkpoint of another run\?\)"):
        small_model(max_steps=3, lr=1e-3).fit(
            synth, output_dir=tmp_path / "mine2",
            resume_from=tmp_path / "same" / "checkpoints" / "last.ckpt")


def test_resume_with_changed_settings_says_which(synth, tmp_path):
    run = tmp_path / "run"
    small_model(max_steps=2).fit(synth, output_dir=run)
    with pytest.warns(UserWarning, match=r"changed settings: downsample_cells: None -> 30; "
                      r"pad_from: 'group' -> 'chunk'\. The steps so far"):
        small_model(max_steps=3, downsample_cells=30, pad_from="chunk").fit(
            synth, output_dir=run, resume_from=run / "checkpoints" / "last.ckpt")
    # model_kwargs: a set length is a change (said); the preset's own values spelled out are not
    with pytest.warns(UserWarning, match="changed settings: .*model_kwargs: .*'cell_set_len': 4"):
        small_model(max_steps=4, cell_set_len=None, model_kwargs={**SMALL, "cell_set_len": 4}
                    ).fit(synth, output_dir=run, resume_from=run / "checkpoints" / "last.ckpt")


def test_refitting_into_the_current_folder_is_refused(synth, tmp_path, monkeypatch):
    small_model(max_steps=1).fit(synth, output_dir=tmp_path / "run")
    monkeypatch.chdir(tmp_path / "run")
    with pytest.raises(ConfigError, match="is \\(or contains\\) the current folder"):
        small_model(max_steps=1).fit(synth, output_dir=".")
    assert (tmp_path / "run" / "checkpoints" / "final.ckpt").is_file()


def test_setting_aside_never_touches_other_folders(synth, tmp_path):
    """Earlier asides (a killed process) survive; symbolic links and folders holding other
    runs are refused; a refused resume writes nothing into the run."""
    run = tmp_path / "run"
    small_model(max_steps=2, ckpt_every_n_steps=1).fit(synth, SPEC, output_dir=run)
    leftover = tmp_path / ".run.replaced-3"  # what a killed process of PID 3 left
    leftover.mkdir()
    (leftover / "statetx_run.json").write_text("{}")
    with pytest.raises(TrainingError):
        small_model(max_steps=2, lr=1e38).fit(synth, output_dir=run)
    assert (leftover / "statetx_run.json").is_file() and (run / "checkpoints").is_dir()
    link = tmp_path / "link"
    link.symlink_to(run, target_is_directory=True)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        small_model(max_steps=1).fit(synth, output_dir=link)
    small_model(max_steps=1).fit(synth, output_dir=run / "nested")  # a run inside the run
    with pytest.raises(ConfigError, match="holds other runs \\(nested\\)"):
        small_model(max_steps=1).fit(synth, output_dir=run)
    shutil.rmtree(run / "nested")
    before = {p: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(TrainingError, match="cannot resume"):
        small_model(max_steps=4, model_kwargs={**SMALL, "hidden_dim": 48}).fit(
            synth, SPEC, output_dir=run, resume_from=run / "checkpoints" / "last.ckpt")
    assert {p: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_sigterm_unwinds_while_an_earlier_run_is_aside():
    import os
    import signal

    from statetx._utils import sigterm_unwinds

    restore = sigterm_unwinds()
    try:
        with pytest.raises(SystemExit) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            import time

            time.sleep(1)
        assert stop.value.code == 128 + signal.SIGTERM
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) is not None


def test_resume_rewrites_metrics_from_the_checkpoint_history(synth, tmp_path):
    small_model(max_steps=4, log_every_n_steps=2).fit(synth, output_dir=tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    with (tmp_path / "metrics.csv").open("a") as fh:  # a row logged after the checkpoint
        fh.write("5,0,9.9,9.9,1.0,1.0,1.0,0.0001\n")
    # a checkpoint of an older statetx: the training loss logged as "loss"
    ckpt = torch.load(last, weights_only=True)
    ckpt["history"] = [{("loss" if k == "train_loss" else k): v for k, v in h.items()}
                       for h in ckpt["history"]]
    torch.save(ckpt, last)
    m = small_model(max_steps=4, log_every_n_steps=2).fit(synth, output_dir=tmp_path,
                                                          resume_from=last)
    logged = pd.read_csv(tmp_path / "metrics.csv")
    assert 5 not in set(logged["step"]) and logged["step"].max() == 4
    assert "loss" not in logged.columns and logged["train_loss"].notna().sum() == 2
    assert "loss" not in m.history_.columns and m.history_["train_loss"].notna().sum() == 2


def test_empty_epochs_are_skipped_but_never_loop_forever(synth, monkeypatch):
    """Streamed epochs differ in size (with drop_last one may hold no batch): training goes on
    over an empty epoch, and stops with an error when epochs stay empty."""
    from statetx.sets import CellSetSampler

    real = CellSetSampler.batches

    def odd_epochs_empty(self, epoch, start=0):
        return iter(()) if epoch % 2 else real(self, epoch, start)

    monkeypatch.setattr(CellSetSampler, "batches", odd_epochs_empty)
    m = small_model(max_steps=40, val_freq=1000).fit(synth)
    assert m.history_["epoch"].max() >= 2 and m.history_["step"].max() == 40

    monkeypatch.setattr(CellSetSampler, "batches",
                        lambda self, epoch, start=0: real(self, epoch, start) if epoch == 0
                        else iter(()))
    with pytest.raises(DataError, match="10 epochs in a row of the training split yielded no"):
        small_model(max_steps=1000, val_freq=10_000).fit(synth)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_interrupt_finishes_the_step_writes_last_and_resumes_exactly(synth, tmp_path,
                                                                     monkeypatch, signame):
    """Ctrl-C (or a scheduler's SIGTERM) mid-training: the step completes, last.ckpt is
    written, training stops; resuming gives the weights of an uninterrupted run."""
    import os
    import signal

    kw = dict(max_steps=8, ckpt_every_n_steps=100, val_freq=100)
    full = small_model(**kw).fit(synth, SPEC)
    sig = getattr(signal, signame)
    step = Trainer._train_step

    def send_once(self, pending):
        if self.state.step == 2 and not getattr(self, "_sent", False):
            self._sent = True
            os.kill(os.getpid(), sig)
        return step(self, pending)

    monkeypatch.setattr(Trainer, "_train_step", send_once)
    stops = KeyboardInterrupt if sig == signal.SIGINT else SystemExit
    with pytest.raises(stops):
        small_model(**kw).fit(synth, SPEC, output_dir=tmp_path)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert load_checkpoint_file(last)["train_state"]["step"] == 3
    resumed = small_model(**kw).fit(synth, SPEC, output_dir=tmp_path, resume_from=last)
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _signal_at(monkeypatch, at_step: int) -> None:
    """Send SIGINT to this process once, while step ``at_step + 1`` runs."""
    import os
    import signal

    step = Trainer._train_step

    def send_once(self, pending):
        if self.state.step == at_step and not getattr(self, "_sent", False):
            self._sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, pending)

    monkeypatch.setattr(Trainer, "_train_step", send_once)


def test_interrupt_says_how_to_resume_in_the_callers_terms(synth, tmp_path, monkeypatch,
                                                           capsys):
    """After Ctrl-C, Python is told fit(..., resume_from=<its last.ckpt>); the command line
    only its own command (tx train has no resume_from)."""
    from statetx._context import command_line

    kw = dict(max_steps=6, ckpt_every_n_steps=100, val_freq=100, progress=True)
    _signal_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        small_model(**kw).fit(synth, SPEC, output_dir=tmp_path / "py")
    err = capsys.readouterr().err
    last = tmp_path / "py" / "checkpoints" / "last.ckpt"
    assert f"fit(..., resume_from='{last}') to continue from it exactly" in err
    monkeypatch.undo()
    _signal_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt), command_line("tx train"):
        small_model(**kw).fit(synth, SPEC, output_dir=tmp_path / "cli")
    err = capsys.readouterr().err
    assert "run the same tx train command again to continue" in err and "fit(" not in err


def test_interrupt_before_a_replacing_runs_first_checkpoint_keeps_the_earlier_run(
        synth, tmp_path, monkeypatch):
    small_model(max_steps=4, ckpt_every_n_steps=2, val_freq=2).fit(synth, SPEC,
                                                                   output_dir=tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    _signal_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        small_model(max_steps=6, ckpt_every_n_steps=100, val_freq=100).fit(
            synth, SPEC, output_dir=tmp_path)
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()} == before


def test_interrupt_in_the_last_step_lets_the_run_finish(synth, tmp_path, monkeypatch):
    _signal_at(monkeypatch, 3)
    m = small_model(max_steps=4, ckpt_every_n_steps=100, val_freq=100).fit(
        synth, SPEC, output_dir=tmp_path)
    assert m.history_["step"].max() == 4
    assert load_checkpoint_file(tmp_path / "checkpoints" / "final.ckpt")["train_state"][
        "step"] == 4


def test_resume_with_another_number_of_processes_keeps_the_epoch_position(synth, tmp_path):
    """A checkpoint records how many processes trained it; resuming with another number goes
    on after the sets already trained (each rank's sets are every W-th of the epoch's order, so
    W ranks at batch k have trained the first k·W batches) and says that the batch changed."""
    full = small_model(max_steps=6).fit(synth, FEWSHOT, output_dir=tmp_path / "a")
    small_model(max_steps=2).fit(synth, FEWSHOT, output_dir=tmp_path / "b")
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint_file(last)
    assert ckpt["train_state"]["world_size"] == 1 and ckpt["train_state"]["batch_in_epoch"] == 2
    ckpt["train_state"].update(world_size=2, batch_in_epoch=1)  # 2 ranks x 1 batch = 2 batches
    torch.save(ckpt, last)
    with pytest.warns(UserWarning, match=r"trained by 2 process\(es\), with 1.*8 -> 4 sets"):
        part = small_model(max_steps=6).fit(synth, FEWSHOT, output_dir=tmp_path / "b",
                                            resume_from=last)
    wa, wb = weights(full), weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_log_file_gets_one_progress_line_per_logged_step(synth, monkeypatch, capsys):
    """A batch job's log (stderr not a terminal) gets one line per log_every_n_steps (spec
    cli.md §2.3 step 4) with the step, losses, speed and ETA; a terminal gets the bar."""
    from statetx.train import _progress

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    small_model(max_steps=6, log_every_n_steps=2, val_freq=4, progress=True).fit(synth, FEWSHOT)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("training:")]
    assert [ln.split(",")[0] for ln in lines] == [f"training: step {n}/6" for n in (2, 4, 6)]
    assert "loss" in lines[0] and "cells/s" in lines[0] and "ETA" in lines[0]
    assert "val" in lines[1]  # (the validation at step 4 is on its line)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = _progress(True, 0, 10)
    assert bar.mininterval == 0.1
    bar.close()
    assert _progress(False, 0, 10) is None


def test_options_without_effect_are_said(synth):
    """Early stopping without validation, a warmup longer than the run and an averaging start
    without averaging would be silently ignored: they are warned about."""
    with pytest.warns(UserWarning, match=r"without effect in this run: early_stopping_patience=2:"
                                         r" the split spec has no validation part.*warmup_steps="
                                         r"50 > max_steps=3.*averaging_start=0.5: weight "
                                         r"averaging is off"):
        small_model(max_steps=3, early_stopping_patience=2, warmup_steps=50,
                    averaging_start=0.5, weight_averaging="none").fit(synth)
    # (the last step's validation, off the schedule, does not count towards stopping)
    with pytest.warns(UserWarning, match=r"validation runs 1 time\(s\), and stopping needs 3 "
                                         r"\(lower val_freq\)"):
        small_model(max_steps=4, val_freq=3, early_stopping_patience=2).fit(synth, FEWSHOT)


def test_a_run_resumed_to_more_steps_validates_and_stops_as_one_that_never_stopped(synth,
                                                                                    tmp_path):
    """The extra validation at a run's last step (off the val_freq schedule) does not count
    towards early stopping: a resumed run trains and stops as the uninterrupted run (its best
    checkpoint may differ: that validation can be its best)."""
    opts = dict(val_freq=3, ckpt_every_n_steps=3, lr=3e-2, early_stopping_patience=2)
    whole = small_model(max_steps=20, **opts).fit(synth, FEWSHOT, output_dir=tmp_path / "a")
    small_model(max_steps=8, **opts).fit(synth, FEWSHOT, output_dir=tmp_path / "b")
    resumed = small_model(max_steps=20, **opts).fit(
        synth, FEWSHOT, output_dir=tmp_path / "b",
        resume_from=tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert resumed.history_["step"].max() == whole.history_["step"].max()  # (stopped alike)
    wa, wb = weights(whole), weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # a run shorter than the schedule: its last validation is its best (a best.ckpt exists)
    short = small_model(max_steps=4, val_freq=10).fit(synth, FEWSHOT, output_dir=tmp_path / "c")
    assert short.best_step_ == 4 and (tmp_path / "c" / "checkpoints" / "best.ckpt").is_file()


def test_the_last_steps_validation_can_be_the_best(synth, tmp_path):
    """best.ckpt holds the lowest val_loss the run logged, the extra validation after the last
    step (off the val_freq schedule) included."""
    for steps in (7, 8):
        m = small_model(max_steps=steps, val_freq=3, lr=3e-2).fit(
            synth, FEWSHOT, output_dir=tmp_path / str(steps))
        val = m.history_.dropna(subset=["val_loss"]).set_index("step")["val_loss"]
        assert list(val.index) == [3, 6, steps]
        assert m.best_step_ == val.idxmin()
        best = load_checkpoint_file(tmp_path / str(steps) / "checkpoints" / "best.ckpt")
        assert best["train_state"]["step"] == val.idxmin()
