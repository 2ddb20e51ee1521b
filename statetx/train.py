"""The training loop: plain PyTorch, readable top to bottom.

One optimiser step = ``gradient_accumulation_steps`` batches of ``B`` cell sets. The loop validates
every ``val_freq`` steps (evaluation mode, fixed validation sets), writes ``step=N.ckpt`` every
``ckpt_every_n_steps``, ``last.ckpt`` (always the latest state), ``best.ckpt`` (lowest validation
loss) and ``final.ckpt``, and can resume from any checkpoint exactly: weights, optimiser moments,
step, epoch, position in the epoch and random-number state are restored.

``weight_averaging="uniform"`` keeps the running mean of the weights over the optimiser steps from
``averaging_start`` on (Polyak / stochastic weight averaging): validation, ``best.ckpt``,
``final.ckpt`` and the trained network use the averaged weights, while training goes on from the
raw ones (checkpoints hold both, so a resume is still exact).

When a process group with more than one rank is initialised (torchrun), the same loop runs data
parallel: the network is wrapped in DDP for the duration of :meth:`Trainer.fit`, validation losses
and logged values are all-reduced, and only rank 0 writes; see :mod:`statetx.distributed`.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import inspect
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from statetx._context import on_command_line
from statetx._heap import retained_heap
from statetx._utils import (
    COMPILE_MODES,
    MATMUL_PRECISIONS,
    as_count,
    atomic_write,
    changed_params,
    comparable,
    data_differences,
    matmul_precision_scope,
    remove_dead_temporaries,
    same_run,
    say,
    warn,
)
from statetx.distributed import (
    all_gather_objects,
    all_reduce_sum,
    barrier,
    rank_seed,
    resolve_device,
    world,
)
from statetx.errors import ConfigError, DataError, StatetxError
from statetx.losses import full_fp32_matmul, get_loss, nanmean
from statetx.sets import BatchSource, CellSetBatch, CellSetSampler

if TYPE_CHECKING:  # pragma: no cover
    from statetx.data import SplitData
    from statetx.nn import StateTransitionNetwork
    from statetx.stream import StreamSplit
    from statetx.vocab import Vocab

MAX_EMPTY_EPOCHS = 10  # a training split whose epochs stay empty this long is an error


class TrainingError(StatetxError, RuntimeError):
    """Training cannot continue (e.g. a non-finite loss)."""


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings (defaults follow the reference, see model.md §11).

    Parameters
    ----------
    max_steps, lr
        Optimiser steps and learning rate.
    optimizer, weight_decay
        ``"adam"`` or ``"adamw"``; weight decay, applied when non-zero (the reference ignored
        it).
    lr_schedule, warmup_steps, min_lr_ratio
        ``"constant"`` or ``"cosine"`` (decaying to ``min_lr_ratio`` × ``lr``), after a linear
        warm-up of ``warmup_steps``.
    gradient_clip_val
        Largest gradient norm; 0 or None: no clipping.
    gradient_accumulation_steps
        Batches whose gradients are summed into one optimiser step.
    loss, loss_options
        Training loss (``"energy"``, ``"sinkhorn"``, ``"mse"``, ``"se"``; see
        :func:`statetx.losses.get_loss`) and its options (blur, weights, chunks).
    decoder_weight, detach_decoder
        Weight of the gene decoder's loss; ``detach_decoder``: that loss trains the decoder
        only.
    regularization
        Weight of the mean ``|pred - basal|`` term (input and output of the same width).
    val_freq, ckpt_every_n_steps, log_every_n_steps
        Validate (and keep ``best.ckpt``), write the periodic checkpoints, and log the metrics
        every this many steps (the training losses and ``grad_norm``: their means over the
        steps since the previous log).
    keep_last_n
        Periodic ``step=N`` checkpoints kept (None: all).
    early_stopping_patience
        Stop after this many validations without improvement (None: never).
    precision, matmul_precision
        ``"auto"`` (bf16-mixed on CUDA, 32 on the CPU), ``"32"`` or ``"bf16-mixed"``; the
        ``torch.set_float32_matmul_precision`` setting while training (restored after).
    seed, progress
        Seed of the initialisation and dropout; a progress bar.
    n_train_eval_batches
        Training batches for the eval-mode train loss computed at each validation.
    compile, compile_mode
        ``torch.compile`` the step's forward, with this mode (e.g. ``"reduce-overhead"``: CUDA
        graphs); see :class:`Trainer`.
    data_on_device
        Keep the cells on the GPU: ``"auto"`` (CUDA, when they fit), ``"always"``, ``"never"``.
    weight_averaging, averaging_start
        ``"uniform"``: train and validate the running mean of the weights after the fraction
        ``averaging_start`` of ``max_steps``; ``"none"``: the last weights.
    """

    max_steps: int = 40_000
    lr: float = 1e-4
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    gradient_clip_val: float | None = 10.0
    gradient_accumulation_steps: int = 1
    loss: str = "energy"
    loss_options: dict = field(default_factory=dict)
    decoder_weight: float = 1.0
    detach_decoder: bool = False
    regularization: float = 0.0
    val_freq: int = 2000
    ckpt_every_n_steps: int = 2000
    keep_last_n: int | None = None
    early_stopping_patience: int | None = None
    log_every_n_steps: int = 50
    precision: str = "auto"
    matmul_precision: str = "medium"
    seed: int = 42
    progress: bool = True
    n_train_eval_batches: int = 2
    compile: bool = False
    compile_mode: str = "default"
    data_on_device: str = "auto"
    weight_averaging: str = "none"
    averaging_start: float = 0.0

    def __post_init__(self) -> None:
        checks = {
            "optimizer": ("adam", "adamw"), "lr_schedule": ("constant", "cosine"),
            "precision": ("auto", "32", "bf16-mixed"),
            "matmul_precision": MATMUL_PRECISIONS,
            "data_on_device": ("auto", "always", "never"),
            "weight_averaging": ("none", "uniform"),
            "compile_mode": COMPILE_MODES,
        }
        for key, allowed in checks.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r} is invalid; expected one of "
                                  f"{', '.join(map(repr, allowed))}.")
        self.lr = float(self.lr)
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ConfigError(f"lr={self.lr!r} must be a non-negative finite number (e.g. 1e-4).")
        self.averaging_start = float(self.averaging_start)
        if not 0.0 <= self.averaging_start < 1.0:
            raise ConfigError(f"averaging_start={self.averaging_start!r} must be a fraction of "
                              "max_steps in [0, 1).")
        self.weight_decay = float(self.weight_decay)
        self.decoder_weight = float(self.decoder_weight)
        self.regularization = float(self.regularization)
        if not all(math.isfinite(w) and w >= 0 for w in (self.regularization,
                                                           self.decoder_weight)):
            raise ConfigError("decoder_weight and regularization must be finite numbers >= 0, "
                              f"got {self.decoder_weight!r} and {self.regularization!r}.")
        if self.gradient_clip_val is not None:
            clip = self.gradient_clip_val
            try:
                self.gradient_clip_val = float(clip)  # ("10" from a config, as lr)
            except (TypeError, ValueError):
                self.gradient_clip_val = math.nan
            if not self.gradient_clip_val >= 0:
                raise ConfigError(f"gradient_clip_val={clip!r} must be a number >= 0 (0 or "
                                  "None: no clipping).")
        if self.gradient_clip_val == 0:  # (Lightning's meaning of 0)
            self.gradient_clip_val = None
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay={self.weight_decay!r} must be a finite number >= 0.")
        for key, low, optional in (
                ("max_steps", 1, False), ("val_freq", 1, False), ("ckpt_every_n_steps", 1, False),
                ("gradient_accumulation_steps", 1, False), ("log_every_n_steps", 1, False),
                ("warmup_steps", 0, False), ("keep_last_n", 0, True),
                ("early_stopping_patience", 1, True)):
            setattr(self, key, as_count(key, getattr(self, key), low, optional))
        for key in ("progress", "compile", "detach_decoder"):
            check_flag(key, getattr(self, key))


@dataclass
class TrainState:
    """Where training is: restored exactly on resume."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_val: float = math.inf
    best_step: int = -1
    stop_val: float = math.inf  # early stopping's reference: the best on the val_freq schedule
    bad_validations: int = 0
    n_averaged: int = 0  # optimiser steps in the weight average
    history: list[dict[str, Any]] = field(default_factory=list)


def check_flag(name: str, value: object) -> None:
    """A True/False option (0 and 1 accepted)."""
    if not (isinstance(value, (bool, np.bool_))
            or (isinstance(value, (int, np.integer)) and value in (0, 1))):
        raise ConfigError(f"{name}={value!r} must be True or False.")


def start_at_mean_response(network: StateTransitionNetwork, train: SplitData | StreamSplit,
                           vocab: Vocab) -> None:
    """Start the ``pert_skip`` parameters of ``network`` at the mean response of the training
    split ``train`` (in memory or streamed): what ``StateTransitionModel.fit`` does before
    training a network with a skip (the ``small`` preset); a hand-built network starts at zero.

    ``shift``: b_p = the mean over contexts of (perturbed mean − control mean), the perturb-mean
    baseline. ``mean_affine``: one scalar k_p per perturbation from the least-squares fit, pooled
    over genes, of the contexts' perturbed means on their control means (both centred over the
    contexts); a_p = k_p − 1 (clipped to [−1, 0.5]; 0 with fewer than 2 contexts) and b_p = the
    mean shift − a_p · the mean control, so a context whose controls sit at the mean gets the
    mean shift and one off the mean keeps the fraction k_p of its deviation. Both go through the
    perturbation vectors by least squares (exact for one-hot features).
    """
    n = len(vocab.perturbations)
    dim = network.config.output_dim
    shift, scale = np.zeros((n, dim)), np.zeros((n, 1))
    observed = np.zeros(n, dtype=bool)
    observed[np.unique(train.pert[train.is_control])] = True  # controls: no change
    for p, pairs in train.context_means().items():
        ctrl = np.stack([c for c, _ in pairs])
        pert = np.stack([t for _, t in pairs])
        a = 0.0
        if network.pert_mean_scale is not None and len(pairs) >= 2:
            dx, dy = ctrl - ctrl.mean(0), pert - pert.mean(0)
            denom = float((dx * dx).sum())
            a = float(np.clip((dx * dy).sum() / denom - 1.0, -1.0, 0.5)) if denom > 0 else 0.0
        shift[p] = (pert - ctrl).mean(0) - a * ctrl.mean(0)
        scale[p] = a
        observed[p] = True

    def solve(target: np.ndarray) -> np.ndarray:  # [P, ·] weights giving ``target`` rows
        if vocab.pert_features is None:  # one-hot: the rows themselves (lstsq's min-norm answer)
            return np.where(observed[:, None], target, 0.0)
        feats = vocab.pert_features.astype(np.float64)[observed]
        # truncated at 1e-6 of the largest singular value: an ill-conditioned table (e.g. more
        # feature dimensions than trained perturbations) would otherwise give huge weights
        return np.linalg.lstsq(feats, target[observed], rcond=1e-6)[0]

    with torch.no_grad():
        network.pert_bias.weight.copy_(torch.from_numpy(solve(shift).T))  # [D, P]
        if network.pert_mean_scale is not None:
            network.pert_mean_scale.weight.copy_(torch.from_numpy(solve(scale).T))


class Trainer:
    """Trains a network on cell-set batches from a sampler (:class:`~statetx.sets.BatchSource`).

    ``compile=True``: under bf16 autocast the network's matmuls are bf16 whatever the fp32 matmul
    precision, so training runs at "highest" and the forward pass *and* the loss are compiled as
    one graph; in fp32 (``matmul_precision`` lowered for the network, the loss exact) only the
    network is compiled.
    """

    def __init__(self, network: torch.nn.Module, train: BatchSource,
                 val: BatchSource | None, config: TrainConfig, *,
                 device: torch.device | str = "cpu", output_dir: str | Path | None = None,
                 checkpoint_extra: dict | None = None) -> None:
        self.net, self.train_sampler, self.val_sampler, self.cfg = network, train, val, config
        if hasattr(train, "__len__") and len(train) == 0:  # training could never take a step
            short = " (drop_last=True keeps full sets and full batches only)" if getattr(
                train, "drop_last", False) else ""
            cap = getattr(train, "downsample_cells", None)
            raise DataError(f"the training split yields no batch of {train.B} sets of {train.S} "
                            f"cells{short}; lower batch_size or cell_set_len"
                            + (f", raise downsample_cells (now {cap} cells per group)"
                               if cap is not None else "")
                            + (", or set drop_last=False." if short else "."))
        self.device = resolve_device(device)
        self.out = Path(output_dir) if output_dir is not None else None
        self.extra = checkpoint_extra or {}
        self.loss_fn = get_loss(config.loss, **config.loss_options)
        c = getattr(network, "config", None)
        chunks = config.loss_options.get("mmd_num_chunks", 1)
        if c is not None and chunks > c.output_dim:
            raise ConfigError(f"mmd_num_chunks={chunks} is more than the {c.output_dim} output "
                              "features; use at most that many chunks.")
        if config.regularization > 0 and c is not None and c.input_dim != c.output_dim:
            raise ConfigError(f"regularization={config.regularization} adds mean |pred - basal| "
                              f"and needs the input and output widths to match (here "
                              f"{c.input_dim} and {c.output_dim}); set it to 0 or train in the "
                              "input's space.")
        self.net.to(self.device)
        self.opt = self._optimizer()
        self.state = TrainState()
        self.amp = (config.precision == "bf16-mixed"
                    or (config.precision == "auto" and self.device.type == "cuda"))
        self.rank, self.world_size = world()
        self.on_first_checkpoint: Callable[[], None] | None = None  # e.g. drop a replaced run
        self._resume: tuple[str, dict] | None = None  # a checked checkpoint (check_resume)
        # training seconds: those of the run before a resume, and this process's start
        self._earlier, self._started = 0.0, time.perf_counter()
        self._ddp: torch.nn.Module | None = None  # the DDP wrapper, only while fit() runs
        self._ddp_forward: torch.nn.Module | None = None  # the same, compiled when asked
        self._frozen: list[torch.nn.Parameter] = []
        # the forward pass that training runs (compiled, or wrapped in DDP during fit)
        self._compile_loss = config.compile and self.amp
        self._forward: torch.nn.Module = self.net if self._compile_loss else self._compiled(
            self.net)
        self._losses = self._compiled(self.losses) if self._compile_loss else self.losses
        # CUDA: checked lazily (no host sync per step), see _check_finite
        self._first_bad_step: torch.Tensor | None = None
        # the training values summed since the last log_every_n_steps multiple, per set of
        # names (one vector each), and their steps
        self._window: dict[tuple[str, ...], tuple[torch.Tensor, int]] = {}
        # weight averaging: the running mean of every parameter (None = off)
        self._avg: list[torch.Tensor] | None = (
            [p.detach().clone() for p in self.net.parameters()]
            if config.weight_averaging != "none" else None)
        self._place_data()

    def _place_data(self) -> None:
        """Keep the training/validation cells on the accelerator when they fit (``auto``: at
        most half of the free device memory), so a step gathers its sets on the device."""
        mode = self.cfg.data_on_device
        samplers = [s for s in (self.train_sampler, self.val_sampler) if s is not None]
        if mode == "never" or self.device.type == "cpu" or not samplers:
            return
        if mode == "auto":
            if self.device.type != "cuda":
                return
            free, _ = torch.cuda.mem_get_info(self.device)
            if sum(s.nbytes for s in samplers) > free // 2:
                return
        for s in samplers:
            s.to(self.device)

    # ------------------------------------------------------------------ setup
    def _optimizer(self) -> torch.optim.Optimizer:
        c = self.cfg
        params = [p for p in self.net.parameters() if p.requires_grad]
        kw: dict[str, Any] = {"lr": c.lr, "betas": (0.9, 0.999), "eps": 1e-8,
                              "weight_decay": c.weight_decay}
        cls = torch.optim.AdamW if c.optimizer == "adamw" else torch.optim.Adam
        # fused: one kernel per tensor (CUDA; CPU since torch 2.4), ~10x faster than the
        # default per-op loop on CPU, where the optimiser otherwise dominates a step
        if self.device.type in ("cuda", "cpu"):
            try:
                return cls(params, fused=True, **kw)
            except (RuntimeError, TypeError, ValueError):
                pass
        return cls(params, **kw)

    def lr_at(self, step: int) -> float:
        """Learning rate for optimiser step ``step`` (0-based): warm-up, then constant or cosine."""
        c = self.cfg
        if c.warmup_steps and step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.lr_schedule == "constant":
            return c.lr
        span = max(1, c.max_steps - c.warmup_steps)
        t = min(1.0, (step - c.warmup_steps) / span)
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    # ------------------------------------------------------------------ one step
    def _compiled(self, fn: Any) -> Any:
        """``fn`` compiled as configured (``compile``, ``compile_mode``)."""
        if not self.cfg.compile:
            return fn
        mode = None if self.cfg.compile_mode == "default" else self.cfg.compile_mode
        return torch.compile(fn, mode=mode)

    def _mark_graph_step(self) -> None:
        """CUDA graphs (compile modes ``reduce-overhead``, ``max-autotune``): a new iteration
        starts, so the previous replay's outputs may be overwritten."""
        if self.cfg.compile and self.cfg.compile_mode in ("reduce-overhead", "max-autotune"):
            torch.compiler.cudagraph_mark_step_begin()

    def _autocast(self):
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def losses(self, batch: CellSetBatch, module: torch.nn.Module | None = None, *,
               training: bool = False) -> dict[str, torch.Tensor]:
        """Per-set loss terms: the main loss, the decoder loss (when the network decodes to genes),
        the confidence and regularisation terms (when configured).

        ``module`` runs the forward pass instead of the network (the DDP wrapper when training).
        ``training``: randomised feature chunks, and with ``detach_decoder`` the decoder is fed
        the true target latents for 10 % of the batches.
        """
        cfg = self.cfg
        options: dict[str, Any] = {}
        if cfg.detach_decoder and getattr(self.net, "gene_decoder", None) is not None:
            options["detach_decoder"] = True
            if training and float(torch.rand(())) < 0.1:
                options["decoder_input"] = batch.target
        with self._autocast():
            net = self.net if module is None else module
            out = net(batch.basal, batch.pert, batch_index=batch.batch_index, **options)
        pred = out.pred.float()
        main = self.loss_fn(pred, batch.target, training=training)
        result = {"main_loss": main}
        if out.counts is not None and batch.counts is not None:
            result["decoder_loss"] = self.loss_fn(out.counts.float(), batch.counts,
                                                  training=training)
        if getattr(out, "confidence", None) is not None:
            target = 10.0 * main.detach()
            result["confidence_loss"] = (out.confidence.float() - target) ** 2
        if cfg.regularization > 0:
            result["regularization"] = (pred - batch.basal.float()).abs().mean(dim=(1, 2))
        return result

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = nanmean(parts["main_loss"])
        if "decoder_loss" in parts:
            loss = loss + self.cfg.decoder_weight * nanmean(parts["decoder_loss"])
        if "confidence_loss" in parts:
            loss = loss + 0.01 * nanmean(parts["confidence_loss"])
        if "regularization" in parts:
            loss = loss + self.cfg.regularization * nanmean(parts["regularization"])
        return loss

    def _train_step(self, batches: list[CellSetBatch]) -> dict[str, torch.Tensor | float]:
        """One optimiser step over the micro-batches ``batches``. One process: the logged values
        stay tensors (no host sync on CUDA). Data parallel: DDP averages the gradients
        (synchronised on the last micro-batch only); the logged values are the mean over
        ranks, checked for finiteness on every rank."""
        ddp, n = self._ddp, len(batches)
        self.net.train()
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.state.step)
        self.opt.zero_grad(set_to_none=True)
        logs: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            self._mark_graph_step()
            sync = ddp.no_sync() if ddp is not None and i < n - 1 else contextlib.nullcontext()
            with sync:
                parts = self._losses(batch.to(self.device, non_blocking=True), training=True,
                                     module=self._forward if ddp is None else self._ddp_forward)
                loss = self.total(parts) / n
                if ddp is None:
                    self._note_finite(loss)
                loss.backward()
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + nanmean(v.detach()).float() / n
            logs["train_loss"] = logs.get("train_loss", 0.0) + loss.detach().float()
        params = [p for p in self.net.parameters() if p.grad is not None]
        if ddp is None:
            logs["grad_norm"] = clip_and_step(self.opt, params, self.cfg.gradient_clip_val)
        else:
            means = all_reduce_sum(torch.stack(list(logs.values()))) / self.world_size
            logs = dict(zip(logs, means.tolist()))
            if not math.isfinite(logs["train_loss"]):
                self._raise_nonfinite(logs["train_loss"], self.state.step + 1)
            logs["grad_norm"] = float(clip_and_step(self.opt, params,
                                                    self.cfg.gradient_clip_val))
        self._update_average()
        return logs

    def _note_finite(self, loss: torch.Tensor) -> None:
        """Stop on a non-finite loss, naming the step. On the CPU at once; on an accelerator the
        first bad step is recorded on the device and raised by :meth:`_check_finite` at the next
        log, validation or checkpoint (before anything is written), avoiding a sync per step."""
        if loss.device.type == "cpu":
            if not torch.isfinite(loss):
                self._raise_nonfinite(float(loss.detach()), self.state.step + 1)
            return
        step = torch.full((), self.state.step + 1, device=loss.device, dtype=torch.int64)
        if self._first_bad_step is None:
            self._first_bad_step = torch.zeros((), device=loss.device, dtype=torch.int64)
        bad = ~torch.isfinite(loss) & (self._first_bad_step == 0)
        self._first_bad_step = torch.where(bad, step, self._first_bad_step)

    def _check_finite(self) -> None:
        if self._first_bad_step is not None and int(self._first_bad_step):
            self._raise_nonfinite(math.nan, int(self._first_bad_step))

    def _raise_nonfinite(self, value: float, step: int) -> None:
        kept = self.out is not None and any((self.out / "checkpoints").glob("*.ckpt"))
        raise TrainingError(
            f"non-finite training loss ({value}) at step {step}; training stopped."
            + (" The last complete checkpoint is kept." if kept else "")
            + " Lower the learning rate or check the input for extreme values."
        )

    # ------------------------------------------------------------------ weight averaging
    @torch.no_grad()
    def _update_average(self) -> None:
        """Fold the weights after optimiser step ``state.step + 1`` into the running mean."""
        c = self.cfg
        if self._avg is None or self.state.step + 1 <= c.averaging_start * c.max_steps:
            return
        self.state.n_averaged += 1
        # one fused update; the weight is a Python float: no host sync on an accelerator
        torch._foreach_lerp_(self._avg, [p.detach() for p in self.net.parameters()],
                             1.0 / self.state.n_averaged)

    @contextlib.contextmanager
    def averaged_weights(self):
        """Within the block the network holds the averaged weights (when there are any)."""
        if self._avg is None or self.state.n_averaged == 0:
            yield
            return
        params = list(self.net.parameters())
        raw = [p.detach().clone() for p in params]
        _copy_into(params, self._avg)
        try:
            yield
        finally:
            _copy_into(params, raw)

    def _use_average(self) -> None:
        """End of training: the network keeps the averaged weights."""
        if self._avg is not None and self.state.n_averaged > 0:
            _copy_into(list(self.net.parameters()), self._avg)

    # ------------------------------------------------------------------ data parallel
    def _unused_parameters(self) -> list[torch.nn.Parameter]:
        """Trainable parameters the training loss does not reach (one set, evaluation mode)."""
        batch = next(iter(self.train_sampler.batches(self.state.epoch)))
        def first_set(f: Any) -> Any:  # (shared fields, e.g. the split's barcodes, stay whole)
            v = getattr(batch, f.name)
            return v if v is None or f.metadata.get("shared") else v[:1]

        one = CellSetBatch(**{f.name: first_set(f) for f in fields(batch)})
        params = [p for p in self.net.parameters() if p.requires_grad]
        devices = [self.device] if self.device.type == "cuda" else []
        self.net.eval()
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            loss = self.total(self.losses(one.to(self.device)))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [p for p, g in zip(params, grads) if g is None]

    def _check_ranks_agree(self) -> None:
        """Data parallel: every rank must train the same settings on the same data (else a rank
        waits at a collective the others never reach, or the ranks drift apart silently)."""
        shapes = ";".join(f"{n}{tuple(p.shape)}" for n, p in self.net.named_parameters())
        mine = {"settings": {k: v for k, v in asdict(self.cfg).items() if k != "progress"},
                "batches per epoch": len(self.train_sampler),
                "training groups": getattr(self.train_sampler, "n_groups", None),
                "validation batches": (None if self.val_sampler is None
                                       else len(self.val_sampler)),
                "network": hashlib.sha256(shapes.encode()).hexdigest()[:16],
                "training data": self.extra.get("training_data")}
        every = all_gather_objects(mine)
        total = getattr(self.train_sampler, "total_sets", None)
        if total is not None and total < self.world_size and _is_main():
            warn(f"an epoch has {total} training set(s) for {self.world_size} "
                 "processes: some processes train the same sets (wrapped round), so "
                 "the extra processes add no data. Use fewer processes or a smaller "
                 "cell_set_len.", UserWarning)
        said = []
        for key, ours in mine.items():
            ranks = [r for r, other in enumerate(every) if other[key] != every[0][key]]
            if not ranks:
                continue
            theirs, ours = every[ranks[0]][key], every[0][key]
            if key == "settings":  # only the settings that differ
                theirs = {k: v for k, v in theirs.items() if ours.get(k) != v}
                ours = {k: ours.get(k) for k in theirs}
            if key == "training data":  # (what differs, not two fingerprints)
                said.append(f"training data on rank(s) {', '.join(map(str, ranks))}: " + "; ".join(
                    data_differences(ours, theirs, ("only on rank 0", f"on rank {ranks[0]}"))
                    or ["another fingerprint (other cells, or another statetx version)"]))
                continue
            said.append(f"{key} on rank(s) {', '.join(map(str, ranks))}: {theirs} (rank 0: "
                        f"{ours})")
        if said:
            raise ConfigError(f"the data-parallel ranks differ from rank 0: {'; '.join(said)}. "
                              "Every process must get the same settings and the same data (a "
                              "shared config and files); otherwise they wait on each other "
                              "forever or train out of step.")

    def _wrap(self) -> None:
        """Wrap the network in DDP; unused parameters are frozen meanwhile (no unused-parameter
        search on every step; as in one process they get no gradient and no update)."""
        from torch.nn.parallel import DistributedDataParallel

        self._frozen = self._unused_parameters()
        for p in self._frozen:
            p.requires_grad_(False)
        cuda = self.device.type == "cuda"
        # (buffers are synced at every forward only if there are any; newer PyTorch renames
        # the option and warns on the old name)
        sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel).parameters else "broadcast_buffers")
        self._ddp = DistributedDataParallel(
            self.net, device_ids=[self.device.index] if cuda else None,
            output_device=self.device.index if cuda else None,
            gradient_as_bucket_view=True, **{sync: any(True for _ in self.net.buffers())},
        )
        self._ddp_forward = self._ddp if self._compile_loss else self._compiled(self._ddp)

    def _unwrap(self) -> None:
        self._ddp = self._ddp_forward = None
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def evaluate(self, sampler: BatchSource, epoch: int = 0,
                 max_batches: int | None = None) -> float:
        """Mean per-set main loss in evaluation mode over fixed sets (``epoch`` seeds them)."""
        self.net.eval()
        if self.world_size > 1:
            return self._evaluate_ddp(sampler, epoch, max_batches)
        per_set = []
        for i, batch in enumerate(sampler.batches(epoch)):
            if max_batches is not None and i >= max_batches:
                break
            per_set.append(self.losses(batch.to(self.device))["main_loss"].float().cpu())
        return float(nanmean(torch.cat(per_set))) if per_set else math.nan

    def _evaluate_ddp(self, sampler: BatchSource, epoch: int,
                      max_batches: int | None) -> float:
        """:meth:`evaluate` over ranks: an unsharded sampler's batches are dealt round-robin,
        a sharded one's are each rank's own; per-set sums and counts are all-reduced."""
        stride = self.world_size if getattr(sampler, "world_size", 1) == 1 else 1
        offset = self.rank if stride > 1 else 0
        acc = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i, batch in enumerate(sampler.batches(epoch)):
            if max_batches is not None and i >= max_batches:
                break
            if i % stride != offset:
                continue
            v = self.losses(batch.to(self.device))["main_loss"].double()
            ok = ~torch.isnan(v)
            acc[0] += v[ok].sum()
            acc[1] += ok.sum()
        total, count = all_reduce_sum(acc).tolist()
        return total / count if count else math.nan

    def _validate(self) -> dict[str, float]:
        with self.averaged_weights():  # what training would return if it stopped now
            logs = {"train_loss_eval": self.evaluate(self.train_sampler, epoch=10**6,
                                                     max_batches=self.cfg.n_train_eval_batches)}
            if self.val_sampler is not None:
                logs["val_loss"] = self.evaluate(self.val_sampler)
        return logs

    # ------------------------------------------------------------------ loop
    def fit(self, resume_from: str | Path | None = None) -> list[dict[str, Any]]:
        """Train until ``max_steps`` (or early stopping); returns the logged history."""
        c = self.cfg
        scope = contextlib.ExitStack()
        # a compiled loss cannot switch precision inside its graph: run it all at full fp32
        scope.enter_context(matmul_precision_scope(
            "highest" if self._compile_loss else c.matmul_precision))
        if self.device.type == "cpu" and isinstance(self.train_sampler, CellSetSampler):
            scope.enter_context(retained_heap())  # in-memory data: no page faults per step
        self._started = time.perf_counter()
        try:
            self._remove_stale_temporaries()
            if resume_from is not None:
                self.load_checkpoint(resume_from)
            else:
                # dropout: a stream of its own on each rank, none replaying the draws that
                # initialised the weights (an estimator builds its network after seeding with
                # the seed itself)
                self._seed(rank_seed(c.seed, self.rank))
                if self.val_sampler is not None:  # fail fast on a broken validation set
                    self.evaluate(self.val_sampler, max_batches=1)
                self._clear_previous_run()
            if self.world_size > 1:
                self._check_ranks_agree()
                self._wrap()
            self._loop()
            self._use_average()
        finally:
            self._unwrap()
            scope.close()
            # fused Adam updates weights without bumping their version counters: the cached
            # weights hash (predictions' model_id) would not see the change
            self.net.__dict__.pop("_statetx_digest", None)
        return self.state.history  # not `st`: a resume replaced self.state

    def _seed(self, seed: int) -> None:
        """Seed the generators training draws from: the CPU's, and on a GPU every CUDA
        generator (as ``torch.manual_seed``); a CPU run leaves the CUDA generators alone."""
        if self.device.type == "cpu":
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)

    def _clear_previous_run(self) -> None:
        """A fresh run in a folder that holds an earlier one: the earlier checkpoints, metrics
        and TensorBoard log are removed, not mixed with this run's."""
        if self.out is None or not _is_main():
            return
        old = [*sorted((self.out / "checkpoints").glob("*.ckpt")), self.out / "metrics.csv",
               self.out / "tensorboard"]
        old = [p for p in old if p.exists()]
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if old and self.cfg.progress:
            say(f"{self.out} held an earlier run: its checkpoints and metrics were "
                "removed (this run starts afresh; resume from its last.ckpt to continue one).")

    def _progress_fields(self, logs: dict[str, float] | None) -> dict[str, str]:
        """The progress line: train loss (the logged mean), last validation loss, gradient
        norm, cells/s; ``logs`` None (a validation between logged steps): the validation loss
        alone, no earlier train loss shown again."""
        val = next((h["val_loss"] for h in reversed(self.state.history)
                    if not math.isnan(h.get("val_loss", math.nan))), None)
        fields = {} if logs is None else {"loss": f"{logs['train_loss']:.4f}"}
        if val is not None:
            fields["val"] = f"{val:.4f}"
        if logs is not None and "grad_norm" in logs:
            fields["gnorm"] = f"{logs['grad_norm']:.3g}"
        if logs is not None:
            fields["cells/s"] = f"{logs['cells_per_s']:,.0f}"
        return fields

    def _add_to_window(self, logs: dict[str, torch.Tensor | float]) -> None:
        """Add a step's training values to the logging window: one float32 vector on their
        device (no host sync; data parallel: numbers on the CPU)."""
        keys, values = tuple(logs), list(logs.values())
        row = (torch.stack(values).float() if all(isinstance(v, torch.Tensor) for v in values)
               else torch.tensor([float(v) for v in values]))
        total, n = self._window.get(keys, (0.0, 0))
        self._window[keys] = (total + row, n + 1)

    def _window_means(self, reset: bool) -> dict[str, float]:
        """Each training value's mean over the steps since the last ``log_every_n_steps``
        multiple; ``reset`` starts the next window (not at a last step off that schedule, so
        that a run resumed from there logs as the uninterrupted one)."""
        sums: dict[str, float] = {}
        steps: dict[str, int] = {}
        for keys, (total, n) in self._window.items():
            for k, v in zip(keys, total.tolist()):
                sums[k], steps[k] = sums.get(k, 0.0) + v, steps.get(k, 0) + n
        if reset:
            self._window = {}
        return {k: sums[k] / steps[k] for k in sums}

    def _loop(self) -> None:
        c, st = self.cfg, self.state
        bar = _progress(c.progress and _is_main(), st.step, c.max_steps)
        accum, window_cells, t0 = c.gradient_accumulation_steps, 0, time.perf_counter()
        window_steps = 0
        pending: list[CellSetBatch] = []
        empty = 0  # epochs in a row without a batch
        p = c.early_stopping_patience  # (a resumed run that had stopped early stays stopped)
        stopped = p is not None and st.bad_validations >= p
        if _is_main() and (stopped or st.step >= c.max_steps) and st.step > 0:
            say(f"nothing to train: the resumed run is at step {st.step}, "
                + (f"where it stopped early (early_stopping_patience={p}; raise it, or pass "
                     "None, to train on)." if stopped else
                     f"max_steps={c.max_steps} (raise max_steps to train on)."))
        signals = contextlib.ExitStack()
        try:
            signals.enter_context(self._stop_signals())
            while st.step < c.max_steps and not stopped:
                first = st.batch_in_epoch
                for batch in self.train_sampler.batches(st.epoch, start=st.batch_in_epoch):
                    st.batch_in_epoch += 1
                    pending.append(batch)
                    if len(pending) < accum:
                        continue
                    self._add_to_window(self._train_step(pending))
                    window_cells += sum(b.n_cells for b in pending)
                    window_steps += 1
                    pending = []
                    st.step += 1
                    logs = None  # (this step's logged values, if it logs)
                    if st.step % c.log_every_n_steps == 0 or st.step == c.max_steps:
                        self._check_finite()  # the one host sync of the window
                        logs = self._window_means(reset=st.step % c.log_every_n_steps == 0)
                        dt = max(time.perf_counter() - t0, 1e-9)
                        logs.update(cells_per_s=window_cells * self.world_size / dt,
                                    steps_per_s=window_steps / dt, lr=self.lr_at(st.step - 1))
                        self._log(logs)
                        window_cells, window_steps, t0 = 0, 0, time.perf_counter()
                    stop = self._after_step()  # (validation first: the line shows its loss)
                    if bar is not None:
                        fields = (self._progress_fields(logs)
                                  if logs is not None or st.step % c.val_freq == 0 else None)
                        if fields:
                            bar.set_postfix(fields, refresh=False)
                        bar.update(1)
                    if stop or st.step >= c.max_steps:
                        break  # (a stop asked for in this step: the run ends as it would have)
                    if self._stop_signal is not None:
                        self._stop_after_signal()
                else:
                    # (streamed epochs differ in size: an empty one is skipped, endless ones not)
                    empty = empty + 1 if first == 0 and st.batch_in_epoch == 0 else 0
                    if empty == MAX_EMPTY_EPOCHS:
                        raise DataError(
                            f"{empty} epochs in a row of the training split yielded no batch "
                            f"(up to epoch {st.epoch}); lower batch_size or cell_set_len, set "
                            "drop_last=False, or (streaming) raise stream_buffer_chunks.")
                    st.epoch += 1
                    st.batch_in_epoch = 0
                    continue
                break
            self._check_finite()
            if self.out is not None:
                self._checkpoint("final.ckpt")
                self._checkpoint("last.ckpt")
            if self._stop_signal is not None and self.cfg.progress:
                print("statetx: the interrupted step was the run's last: training is complete.",
                      file=sys.stderr, flush=True)
        finally:
            signals.close()
            if bar is not None:
                bar.close()
        if self.world_size > 1:
            barrier()  # every rank returns once rank 0 has written its checkpoints

    @contextlib.contextmanager
    def _stop_signals(self) -> Iterator[None]:
        """Ctrl-C (SIGINT) or SIGTERM while training: the current step finishes, ``last.ckpt``
        is written, then training stops (KeyboardInterrupt, or SystemExit(128 + signal)); a
        second signal stops at once. One process in the main thread only (under torchrun the
        ranks would stop at different steps), and not for a signal that was being ignored."""
        import signal
        import threading

        self._stop_signal = None
        if self.world_size > 1 or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:
                self._raise_for(signum)
            self._stop_signal = signum
            if self.cfg.progress:
                then = ("" if self.out is None else
                        " (nothing of this run is kept: the earlier run in its folder comes back)"
                        if self.on_first_checkpoint is not None else
                        " and writing checkpoints/last.ckpt")
                print(f"\nstatetx: interrupted: finishing this step{then}; once more to stop "
                      "at once", file=sys.stderr, flush=True)

        # (not for a signal being ignored, nor one whose handler was not set from Python)
        previous = {s: h for s in (signal.SIGINT, signal.SIGTERM)
                    if (h := signal.getsignal(s)) is not None and h is not signal.SIG_IGN}
        for s in previous:
            signal.signal(s, handler)
        try:
            yield
        finally:  # (a stop asked for in the last step: training ends as it would have)
            for s, h in previous.items():
                signal.signal(s, h)

    @staticmethod
    def _raise_for(signum: int) -> None:
        import signal

        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def _stop_after_signal(self) -> None:
        """A stop was asked for (:meth:`_stop_signals`): checkpoint the completed step, stop.
        Before the run's first checkpoint, while an earlier run in the folder waits to be
        replaced (``on_first_checkpoint``), nothing is written: the earlier run comes back."""
        self._check_finite()
        if self.out is not None and self.on_first_checkpoint is None:
            self._checkpoint("last.ckpt")
            if self.cfg.progress:
                command = on_command_line()
                how = (f"run the same {command} command again" if command else
                       f"fit(..., resume_from='{self.out / 'checkpoints' / 'last.ckpt'}')")
                print(f"\nstatetx: wrote checkpoints/last.ckpt at step {self.state.step}; {how} "
                      "to continue from it exactly.", file=sys.stderr, flush=True)
        self._raise_for(self._stop_signal)

    def _after_step(self) -> bool:
        """Validation, checkpoints and early stopping after a completed step; True = stop."""
        c, st = self.cfg, self.state
        stop = False
        due_ckpt = self.out is not None and (st.step % c.ckpt_every_n_steps == 0 or st.step % min(
            c.val_freq, c.ckpt_every_n_steps) == 0)
        if due_ckpt or st.step % c.val_freq == 0 or st.step == c.max_steps:
            self._check_finite()  # nothing is validated or written after a non-finite step
        if st.step % c.val_freq == 0 or st.step == c.max_steps:
            logs = self._validate()
            self._log(logs)
            val = logs.get("val_loss", math.nan)
            if math.isfinite(val) and val < st.best_val:
                st.best_val, st.best_step = val, st.step
                if self.out is not None:
                    self._checkpoint("best.ckpt")
            # the last step's extra validation (off the val_freq schedule) can make the best
            # checkpoint but is not one of early stopping's: a run resumed to more steps stops
            # as one that never stopped
            scheduled = st.step % c.val_freq == 0 or st.step < c.val_freq
            if math.isfinite(val) and scheduled and val < st.stop_val:
                st.stop_val, st.bad_validations = val, 0
            elif math.isfinite(val) and scheduled:
                st.bad_validations += 1
                p = c.early_stopping_patience
                stop = p is not None and st.bad_validations >= p
                if stop and _is_main():
                    best = ("is checkpoints/best.ckpt (StateTransitionModel.load_run(run_dir, "
                            "'best.ckpt'))" if self.out is not None else
                            "is not kept without an output_dir")
                    kept = ("the running average of the weights up to this step" if
                            self._avg is not None and st.n_averaged > 0 else "this step's weights")
                    say(f"stopped early at step {st.step}: no better val_loss in {p} "
                        f"validations. The model keeps {kept}; the best, step "
                        f"{st.best_step} (val_loss {st.best_val:.4g}), {best}.")
        if self.out is not None:
            if st.step % c.ckpt_every_n_steps == 0:
                self._checkpoint(f"step={st.step}.ckpt")
                if _is_main():
                    self._prune()
            if st.step % min(c.val_freq, c.ckpt_every_n_steps) == 0:
                self._checkpoint("last.ckpt")
        return stop

    def _log(self, logs: dict[str, float]) -> None:
        history = self.state.history
        last = history[-1] if history else None
        # values of a step logged twice (training, then validation) share one row
        merge = (last is not None and last["step"] == self.state.step
                 and not set(logs) & set(last))
        row = last if merge else {"step": self.state.step, "epoch": self.state.epoch}
        row.update(logs)
        if not merge:
            history.append(row)
        if self.out is not None and _is_main():
            self._write_metrics(None if merge else row)
            writer = self._tensorboard()
            if writer is not None:
                for k, v in logs.items():
                    writer.add_scalar(k, v, row["step"])
                writer.flush()

    def _write_metrics(self, row: dict[str, float] | None = None) -> None:
        """``metrics.csv``, one column per logged value (blank where a row has none): ``row`` is
        appended, or the file is rewritten from the history when a new column appears, once
        per fit, and without ``row`` (a resumed run's file then holds exactly its history)."""
        path = self.out / "metrics.csv"
        columns = getattr(self, "_csv_columns", None)
        if row is not None and columns is not None and set(row) <= set(columns):
            with path.open("a", newline="") as fh:
                csv.DictWriter(fh, columns).writerow(row)
            return
        columns = list(dict.fromkeys(k for r in self.state.history for k in r))
        self._csv_columns = columns

        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as fh:
                w = csv.DictWriter(fh, columns)
                w.writeheader()
                w.writerows(self.state.history)

        atomic_write(path, write)

    def _tensorboard(self):
        """A TensorBoard writer on ``<output_dir>/tensorboard`` when tensorboard is installed."""
        if not hasattr(self, "_tb"):
            self._tb = None
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional: metrics.csv is always written
                return None
            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        return self._tb

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, rank_rng: list[dict] | None = None,
                         full: bool = True) -> dict[str, Any]:
        """What a checkpoint holds; ``rank_rng``: every rank's RNG state (data parallel).

        ``full=False`` (``step=N``, ``best`` and ``final``): the weights to predict with, the
        configuration, the step and the history, without optimiser and random states (a third
        of the size with Adam); only ``last.ckpt`` is full and resumes.
        """
        st = self.state
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        if rank_rng is not None:
            rng["ranks"] = rank_rng
        weights = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        averaging: dict[str, Any] = {}
        if self._avg is not None:  # state_dict: the weights to predict with; the raw ones resume
            with self.averaged_weights():
                used = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
            averaging = {"train_weights": weights}
            weights = used
        state = {
            "state_dict": weights,
            "train_state": {**{k: v for k, v in asdict(st).items() if k != "history"},
                            "world_size": self.world_size, "seconds": self.elapsed(),
                            "log_window": [[list(keys), total.tolist(), n] for keys,
                                           (total, n) in self._window.items()]},
            "history": [{k: int(v) if k in ("step", "epoch") else float(v) if isinstance(
                v, (int, float, np.floating)) else v for k, v in h.items()} for h in st.history],
            "train_config": asdict(self.cfg),
            **self.extra,
        }
        if full:
            state.update(averaging, optimizer=self.opt.state_dict(), rng=rng)
        return state

    def save_checkpoint(self, name: str, rank_rng: list[dict] | None = None) -> Path:
        """Write ``checkpoints/<name>`` atomically (temp file, then rename); only ``last.ckpt``
        holds the full training state."""
        path = self.out / "checkpoints" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(self.checkpoint_state(rank_rng, full=name == "last.ckpt"), path)
        return path

    def _rank_rng(self) -> dict[str, torch.Tensor]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _checkpoint(self, name: str) -> None:
        """Save on rank 0; data parallel, every rank calls this (its RNG state is gathered)."""
        if self.world_size > 1:
            rank_rng = all_gather_objects(self._rank_rng())
            if self.rank == 0:
                self.save_checkpoint(name, rank_rng)
        else:
            self.save_checkpoint(name)
        if self.on_first_checkpoint is not None and _is_main():
            callback, self.on_first_checkpoint = self.on_first_checkpoint, None
            callback()

    def check_resume(self, path: str | Path, force: bool = False) -> dict[str, Any]:
        """Load a checkpoint to resume from and check that it can continue this run (full
        training state; the same settings, network, vocabulary and genes; the same training
        data unless ``force``). Kept for :meth:`load_checkpoint`, so that a refused resume is
        known before anything is written."""
        if self._resume is not None and self._resume[0] == str(path):
            return self._resume[1]
        ckpt = load_checkpoint_file(path)
        if "optimizer" not in ckpt:
            raise TrainingError(
                f"cannot resume from {path}: it holds weights only (step=N, best and final "
                "checkpoints do); resume from the run's checkpoints/last.ckpt, or start a new "
                "run from these weights (tx train model.kwargs.init_from=<checkpoint>).")
        mine, theirs = self.extra.get("statetx_model"), ckpt.get("statetx_model")
        if mine is not None and theirs is not None:
            mine = comparable(json.loads(json.dumps(mine, default=str)))
            theirs = comparable(theirs)
            # a run's own last.ckpt may continue with changed settings (e.g. a lower lr; the
            # CLI asks for resume=force); a checkpoint from elsewhere must be of the same run
            own = self.out is None or Path(path).resolve().parent == (
                self.out / "checkpoints").resolve()
            differs = [what for k, what in (("network_config", "another network"),
                                            ("vocab", "another vocabulary"),
                                            ("var_names", "other genes"))
                       if mine.get(k) != theirs.get(k)]
            if differs or not (own or same_run(mine, theirs)):
                settings = [] if own else changed_params(theirs, mine)
                if settings:
                    differs.append(f"other settings ({'; '.join(settings[:6])})")
                raise TrainingError(
                    f"cannot resume from {path}: it was trained with "
                    + (", ".join(differs) or "other settings")
                    + " than this run asks for" + ("" if own else " (a checkpoint of another "
                                                   "run?)") + ". Resume with the run's own "
                    "settings and checkpoints/last.ckpt, or start afresh.")
            data = data_differences(ckpt.get("training_data"), self.extra.get("training_data"))
            if data and not force:
                raise TrainingError(
                    f"cannot resume from {path}: the training data differ from the run's ("
                    + "; ".join(data) + "). Resume with the data and split spec the run started "
                    "with, or start afresh (fit(..., force_resume=True), or tx train "
                    "resume=force, continues anyway).")
            # model_kwargs that build the same network and sets (e.g. a run's config.yaml given
            # again, every key spelled out at the preset's value) change nothing
            same_net = mine.get("cell_set_len") == theirs.get("cell_set_len")
            changed = [c for c in changed_params(theirs, mine)
                       if not (same_net and c.startswith("model_kwargs:"))]
            if changed and _is_main():
                warn(f"resuming {path} with changed settings: {'; '.join(changed)}. "
                     "The steps so far were trained with the earlier ones (the run's "
                     "record now shows the new ones).", UserWarning)
        self._warn_rescheduled(path, (ckpt.get("train_config") or {}).get("max_steps"))
        self._resume = (str(path), ckpt)
        return ckpt

    def _warn_rescheduled(self, path: str | Path, before: int | None) -> None:
        """A new ``max_steps`` moves what is laid out over it (the cosine decay, the averaging
        window): the resumed run is then neither the first run continued nor one straight run."""
        c = self.cfg
        moves = [what for what, used in (
            ("the cosine learning-rate decay", c.lr_schedule == "cosine"),
            ("the start of weight averaging (averaging_start x max_steps)",
             c.weight_averaging != "none" and c.averaging_start > 0)) if used]
        if before is None or int(before) == c.max_steps or not moves or not _is_main():
            return
        warn(f"resuming {path} with max_steps {before} -> {c.max_steps}: "
             f"{' and '.join(moves)} follow(s) the new max_steps from here on, so the "
             f"result differs from one uninterrupted run of {c.max_steps} steps (exact "
             "with a constant schedule and averaging_start=0).", UserWarning)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, optimiser, loop position and RNG state from a checkpoint."""
        ckpt = self.check_resume(path)
        self._resume = None
        try:
            self.net.load_state_dict(ckpt.get("train_weights", ckpt["state_dict"]))
        except RuntimeError as err:
            raise TrainingError(f"cannot resume from {path}: its weights do not fit this network "
                                f"({str(err).splitlines()[0]}).") from None
        self.net.to(self.device)
        if self._avg is not None:  # the average so far (the weights themselves if none)
            _copy_into(self._avg, [ckpt["state_dict"][name]
                                   for name, _ in self.net.named_parameters()])
        self.opt.load_state_dict(ckpt["optimizer"])
        # (histories written before the wide metrics.csv call the training loss "loss")
        history = [{("train_loss" if k == "loss" else k): int(v) if k in ("step", "epoch")
                    else v for k, v in h.items()} for h in ckpt.get("history", [])]
        saved = dict(ckpt["train_state"])
        ranks = ckpt["rng"].get("ranks")  # (checkpoints before world_size was recorded)
        before = int(saved.pop("world_size", 0) or (len(ranks) if ranks else 1))
        self._earlier = float(saved.pop("seconds", 0.0))
        saved.setdefault("stop_val", saved.get("best_val", math.inf))  # (earlier checkpoints)
        window = saved.pop("log_window", [])
        where = "cpu" if self.world_size > 1 else self.device  # (as _add_to_window's rows)
        self._window = {tuple(keys): (torch.tensor(total, device=where), int(n))
                        for keys, total, n in window}
        self.state = TrainState(**saved, history=history)
        if before != self.world_size:
            self._rescale_position(path, before)
        if self.out is not None and _is_main():  # rows logged after the checkpoint go
            self._write_metrics()
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        if self.world_size > 1:
            if ranks is not None and len(ranks) == self.world_size:
                mine = ranks[self.rank]
                torch.set_rng_state(mine["torch"])
                if "cuda" in mine and self.device.type == "cuda":
                    torch.cuda.set_rng_state(mine["cuda"], self.device)
            elif self.rank > 0:  # saved by another world size: a fresh stream per rank
                self._seed(rank_seed(self.cfg.seed, self.rank, self.state.step))

    def elapsed(self) -> float:
        """Seconds of training so far, those before a resume included."""
        return self._earlier + time.perf_counter() - self._started

    def _rescale_position(self, path: str | Path, before: int) -> None:
        """Resuming with another number of processes: the epoch goes on at the point the
        ``before`` processes had reached (in memory, after exactly the sets they trained on:
        each rank's sets are every world-size-th of the epoch's order), and the step's batch
        changes size, said."""
        st, now = self.state, self.world_size
        done = st.batch_in_epoch * before  # global batches of B sets trained in this epoch
        interleaved = isinstance(self.train_sampler, CellSetSampler)
        # (a streamed epoch deals contiguous slices to the processes: no common position)
        st.batch_in_epoch = done // now if interleaved else 0
        again = done - st.batch_in_epoch * now
        if _is_main():
            b = getattr(self.train_sampler, "B", None)
            size = f" ({b * before} -> {b * now} sets)" if b else ""
            warn(
                f"resuming {path}, trained by {before} process(es), with {now}: batch_size is "
                f"per process, so each step now trains on {now}/{before} of the earlier batch"
                f"{size} (scale lr, or batch_size, to keep the run's recipe); "
                + ("the epoch continues where it was" if interleaved else
                   "the streamed epoch starts again (its slices per process change)")
                + (f" ({again} batch(es) of it are trained again)" if again else "") + ".",
                UserWarning)

    def _remove_stale_temporaries(self) -> None:
        """Delete half-written checkpoints (``.<name>.tmp<pid>-<thread>``) left by a killed
        process."""
        folder = None if self.out is None else self.out / "checkpoints"
        if folder is not None and folder.is_dir() and _is_main():
            remove_dead_temporaries(folder)  # (a live writer's, e.g. another process's, stay)

    def _prune(self) -> None:
        n = self.cfg.keep_last_n
        if n is None:
            return
        ckpts = sorted((self.out / "checkpoints").glob("step=*.ckpt"),
                       key=lambda p: int(p.stem.split("=")[1]))
        for p in ckpts[:max(len(ckpts) - int(n), 0)]:
            p.unlink(missing_ok=True)


@torch.no_grad()
def _copy_into(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """Copy each tensor of ``src`` into the matching one of ``dst`` in place."""
    for d, s in zip(dst, src):
        d.copy_(s)


def gradient_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Total 2-norm of the parameters' gradients (as ``clip_grad_norm_`` computes it)."""
    grads = [p.grad for p in params]
    if grads and all(g.device.type == "cpu" and g.is_contiguous() for g in grads):
        # 3x faster than get_total_norm's per-tensor vector norms on the CPU, and more accurate;
        # at full precision (a lowered fp32 matmul precision makes dot products bf16 and slow)
        with full_fp32_matmul():
            norm = torch.stack([torch.dot(g.view(-1), g.view(-1)).float() for g in grads])
        return norm.sum().sqrt()
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g.detach(), dtype=torch.float32) for g in grads]))


def _clips(norm: torch.Tensor, clip: float | None) -> bool:
    """Whether ``clip_grad_norm_`` would rescale: off the CPU always when clipping (its
    coefficient is clamped to 1 on the device, no host sync); on the CPU only when
    clip / (norm + 1e-6) is below 1."""
    return bool(clip) and (norm.device.type != "cpu" or float(norm) + 1e-6 > clip)


def clip_gradients(params: list[torch.nn.Parameter], clip: float | None) -> torch.Tensor:
    """``clip_grad_norm_`` that skips the (identity) rescaling pass when nothing is clipped."""
    norm = gradient_norm(params)
    if not _clips(norm, clip):
        return norm
    if hasattr(torch.nn.utils, "clip_grads_with_norm_"):  # torch >= 2.6
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    else:  # the same rule: scale by clip / (norm + 1e-6), at most 1
        coef = (clip / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
    return norm


def clip_and_step(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                  clip: float | None) -> torch.Tensor:
    """Clip the gradients' total norm to ``clip`` (``clip_grad_norm_``), take the optimiser step
    and return the norm before clipping. A fused optimiser on the CPU divides the gradients by
    (norm + 1e-6) / clip through its ``grad_scale`` input (there for loss scaling) inside its own
    kernel, which saves the rescaling's pass over 34 M gradients (state_sm) in most steps."""
    fused_cpu = bool(opt.defaults.get("fused")) and all(p.device.type == "cpu" for p in params)
    norm = gradient_norm(params) if fused_cpu else clip_gradients(params, clip)
    if fused_cpu and _clips(norm, clip):
        opt.grad_scale = (norm + 1e-6) / clip  # type: ignore[attr-defined]
        try:
            opt.step()
        finally:
            del opt.grad_scale  # type: ignore[attr-defined]
    else:
        opt.step()
    return norm


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Load a statetx checkpoint with ``weights_only=True`` (no code is executed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise TrainingError(f"could not load checkpoint {path}: it is truncated, corrupted or "
                            f"not a statetx checkpoint ({type(exc).__name__}: {exc}).") from exc


def _is_main() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_rank() != 0)


class _LineProgress:
    """The progress of a run whose output goes to a log file (a batch job): one line per
    logged step (log_every_n_steps, validations, the last step), where a terminal gets a bar."""

    def __init__(self, start: int, total: int) -> None:
        self.n, self.start, self.total = start, start, total
        self.t0 = time.perf_counter()
        self.fields: dict[str, str] | None = None

    def set_postfix(self, fields: dict[str, str], refresh: bool = False) -> None:
        self.fields = fields

    def update(self, k: int) -> None:
        self.n += k
        if self.fields is None:
            return
        rate = (self.n - self.start) / max(time.perf_counter() - self.t0, 1e-9)
        minutes, seconds = divmod(round((self.total - self.n) / max(rate, 1e-9)), 60)
        print(f"training: step {self.n}/{self.total}, "
              + ", ".join(f"{k} {v}" for k, v in self.fields.items())
              + f", ETA {minutes // 60}:{minutes % 60:02d}:{seconds:02d}",
              file=sys.stderr, flush=True)
        self.fields = None

    def close(self) -> None:
        pass


def _progress(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    if not (sys.stderr.isatty() or "ipykernel" in sys.modules):
        return _LineProgress(start, total)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True,
                mininterval=0.1)
