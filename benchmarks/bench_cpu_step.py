"""Where a training step's time goes on the CPU: matrix products, optimiser, the rest.

    python benchmarks/bench_cpu_step.py                   # state_sm, S 64, B 8: fp32, then bf16
    python benchmarks/bench_cpu_step.py --precisions 32 --set-len 128

Fits the preset for two steps on seeded synthetic data (``bench_train.synthetic``), then runs
the trainer's own step (forward, energy loss, backward, gradient clipping, fused Adam) on fresh
sampled batches under the training-time settings (matmul precision, retained heap), three ways:

1. **plain**: the median ms per step;
2. **per op**: every ATen op timed (``TorchDispatchMode``), grouped into matrix products (with
   their FLOPs, i.e. the GFLOP/s they reach inside a step), the optimiser (fused Adam and the
   ``_foreach`` ops of clipping) and everything else;
3. **products hot**: each product re-run right after its first call, operands now in cache: the
   rate the same products reach in isolation.

The last lines give the ceilings these imply: the cells/s if a step were its products alone, and
if it were its products plus the optimiser. Compare numbers from one invocation only: this
script's per-op timing adds dispatch overhead, and shared VMs drift between runs.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import synthetic  # noqa: E402

PRODUCTS = {"mm", "addmm", "bmm", "baddbmm"}


def product_flops(name: str, args: tuple) -> float:
    """FLOPs of one mm / addmm / bmm / baddbmm call (2·M·N·K per matrix)."""
    a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
    batch = a.shape[0] if a.dim() == 3 else 1
    return 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


class OpTimer(TorchDispatchMode):
    """Seconds and FLOPs per op name; with ``repeat_products`` each product also runs twice more
    right away and its fastest repeat is recorded under ``hot``."""

    def __init__(self, repeat_products: bool = False) -> None:
        super().__init__()
        self.repeat = repeat_products
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()
        self.flops: dict[str, float] = collections.defaultdict(float)
        self.hot: dict[str, float] = collections.defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        t = time.perf_counter()
        out = func(*args, **kwargs)
        dt = time.perf_counter() - t
        if name in PRODUCTS:
            name = f"{name} {' x '.join(str(tuple(a.shape)) for a in args[-2:])}" \
                if name in ("addmm", "baddbmm") else \
                f"{name} {' x '.join(str(tuple(a.shape)) for a in args[:2])}"
            self.flops[name] += product_flops(func.overloadpacket.__name__, args)
            if self.repeat:
                best = float("inf")
                for _ in range(2):
                    t = time.perf_counter()
                    func(*args, **kwargs)
                    best = min(best, time.perf_counter() - t)
                self.hot[name] += best
        self.seconds[name] += dt
        self.calls[name] += 1
        return out


def group(name: str) -> str:
    if name.split(" ")[0] in PRODUCTS:
        return "products"
    if name.startswith(("_fused_adam", "_foreach")):
        return "optimiser"
    return "other"


def measure(trainer, batches, steps: int) -> dict:
    """Plain, per-op and products-hot passes of ``steps`` trainer steps each."""
    from statetx._heap import retained_heap
    from statetx._utils import matmul_precision_scope

    def run(n: int, mode: TorchDispatchMode | None = None) -> list[float]:
        times = []
        for _ in range(n):
            batch = next(batches)
            t = time.perf_counter()
            with mode if mode is not None else contextlib.nullcontext():
                trainer._train_step([batch])
            times.append(time.perf_counter() - t)
        return times

    timed, hot = OpTimer(), OpTimer(repeat_products=True)
    with matmul_precision_scope(trainer.cfg.matmul_precision), retained_heap():
        run(3)  # warm-up: allocator, oneDNN primitive cache
        plain = statistics.median(run(steps))
        run(steps, timed)
        run(steps, hot)
    return {"plain": plain, "timed": timed, "hot": hot}


def report(label: str, m: dict, cells: int, steps: int) -> None:
    timed, hot, plain = m["timed"], m["hot"], m["plain"]
    per_step = {g: 0.0 for g in ("products", "optimiser", "other")}
    for name, s in timed.seconds.items():
        per_step[group(name)] += s / steps
    flops = sum(timed.flops.values()) / steps
    hot_s = sum(hot.hot.values()) / steps
    print(f"\n== {label}: plain step {plain * 1e3:.1f} ms = {cells / plain:,.0f} cells/s "
          f"(median of {steps})")
    print(f"{'per op (timed pass)':<28}{'ms/step':>9}{'share':>8}")
    total = sum(per_step.values())
    for g, s in per_step.items():
        extra = ""
        if g == "products":
            extra = (f"   {flops / 1e9:.1f} GFLOP: {flops / s / 1e9:,.0f} GFLOP/s in the step, "
                     f"{flops / hot_s / 1e9:,.0f} GFLOP/s hot ({hot_s * 1e3:.1f} ms)")
        print(f"{g:<28}{s * 1e3:>9.1f}{s / total:>8.0%}{extra}")
    print(f"{'sum of ops':<28}{total * 1e3:>9.1f}")
    print("largest products (ms/step, calls/step, GFLOP/s in the step / hot):")
    products = [k for k in timed.seconds if group(k) == "products"]
    for k in sorted(products, key=lambda k: -timed.seconds[k])[:8]:
        s, c = timed.seconds[k] / steps, timed.calls[k] / steps
        rate, rate_hot = timed.flops[k] / timed.seconds[k], hot.flops[k] / hot.hot[k]
        print(f"  {s * 1e3:7.1f} {c:5.1f}x  {rate / 1e9:5.0f} / {rate_hot / 1e9:5.0f}  {k}")
    print("largest other ops (ms/step, calls/step):")
    others = [k for k in timed.seconds if group(k) != "products"]
    for k in sorted(others, key=lambda k: -timed.seconds[k])[:8]:
        print(f"  {timed.seconds[k] / steps * 1e3:7.1f} {timed.calls[k] / steps:5.1f}x  {k}")
    opt = per_step["optimiser"]
    print(f"ceilings: products alone {cells / per_step['products']:,.0f} cells/s in the step "
          f"({cells / hot_s:,.0f} hot); products + optimiser "
          f"{cells / (per_step['products'] + opt):,.0f} cells/s "
          f"({cells / (hot_s + opt):,.0f} hot)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="state_sm")
    p.add_argument("--set-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cells", type=int, default=20_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--precisions", default="32,bf16-mixed",
                   help="training precisions, measured one after the other on the same network "
                   "(default 32,bf16-mixed)")
    p.add_argument("--steps", type=int, default=6, help="steps per measurement (default 6)")
    args = p.parse_args(argv)

    from statetx import StateTransitionModel
    from statetx.sets import CellSetSampler
    from statetx.train import Trainer

    model = StateTransitionModel(
        args.preset, pert_col="gene", cell_type_key="cell_type", control_pert="non-targeting",
        cell_set_len=args.set_len, batch_size=args.batch_size, max_steps=2, val_freq=10**9,
        progress=False, device="cpu",
    ).fit(synthetic(args.cells, args.genes, 50, 4))
    sampler = CellSetSampler(model._prepared.splits["train"], model.vocab_, model.cell_set_len_,
                             args.batch_size, seed=0)
    batches = (b for epoch in range(10**6) for b in sampler.batches(epoch))
    cells = args.set_len * args.batch_size
    cfg = model._train_config(model.train_settings_)
    print(f"{args.preset}, {args.set_len} cells x {args.batch_size} sets = {cells} cells/step, "
          f"{model.network_.num_parameters() / 1e6:.1f} M parameters, matmul precision "
          f"{cfg.matmul_precision}, {torch.get_num_threads()} threads")
    for precision in args.precisions.split(","):
        trainer = Trainer(model.network_, sampler, None,
                          dataclasses.replace(cfg, precision=precision))
        report(f"precision {precision}", measure(trainer, batches, args.steps), cells, args.steps)


if __name__ == "__main__":
    main()
