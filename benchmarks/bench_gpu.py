"""GPU throughput and model-FLOPs utilisation (MFU) of statetx's full training loop.

    python benchmarks/bench_gpu.py                          # state preset, 16 sets x 512 cells
    python benchmarks/bench_gpu.py --preset state_lg --profile

Trains ``StateTransitionModel.fit`` (sampling, energy loss, fused Adam, logging: the whole loop) on
seeded synthetic log1p data with 2,000 genes, in eager bf16 autocast and with ``compile=True``, with
the cells kept on the GPU (the default on CUDA) and, for comparison, gathered on the host. Next to
it, a bare step (network + loss + backward + Adam on one fixed batch) shows what the loop costs.
FLOPs per step come from ``torch.utils.flop_counter`` on one forward + backward (matmuls, attention
and the loss's distance matrices); MFU is measured FLOP/s over the card's bf16 dense matmul rate,
measured here on an 8192^3 product. Needs CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import synthetic  # noqa: E402


def matmul_peak(n: int = 8192, reps: int = 20) -> float:
    """Measured bf16 dense matmul TFLOP/s (random data, after warm-up)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


LOG_WINDOW = 50  # the loop's default log_every_n_steps: one cells_per_s per window
MIN_STEPS = LOG_WINDOW + 1  # the first window is dropped; at least one more must remain


def fit_rate(adata, args, *, compile: bool, data_on_device: str, steps: int,
             mode: str = "default", device: str = "cuda") -> dict:
    """Steady-state cells/s of the full loop (median of the 50-step log windows after the
    first, which holds start-up and compilation)."""
    from statetx import StateTransitionModel

    model = StateTransitionModel(
        args.preset, pert_col="gene", cell_type_key="cell_type", control_pert="non-targeting",
        cell_set_len=args.set_len, batch_size=args.batch_size, max_steps=steps,
        val_freq=10**9, ckpt_every_n_steps=10**9, progress=False, device=device,
        compile=compile, compile_mode=mode, data_on_device=data_on_device,
    )
    t0 = time.perf_counter()
    model.fit(adata)
    wall = time.perf_counter() - t0
    rates = model.history_["cells_per_s"].dropna().tolist()[1:]
    rate = statistics.median(rates)
    return {"cells_per_s": rate, "ms_per_step": args.set_len * args.batch_size / rate * 1e3,
            "wall_s": wall, "model": model}


def one_batch(model, device: str = "cuda"):
    """A training batch of the fitted model's shape, on ``device``."""
    from statetx.sets import CellSetSampler

    split = model._prepared.splits["train"]
    s = CellSetSampler(split, model.vocab_, model.cell_set_len_, model.train_settings_[
        "batch_size"], seed=0).to(device)
    return next(iter(s.batches(0)))


def step_flops(model, batch) -> float:
    """FLOPs of one forward + backward (network and energy loss) on ``batch``."""
    from torch.utils.flop_counter import FlopCounterMode

    from statetx.losses import get_loss

    net, loss_fn = model.network_.to(batch.basal.device).train(), get_loss("energy")
    with FlopCounterMode(display=False) as fc:
        with torch.autocast(batch.basal.device.type, dtype=torch.bfloat16):
            out = net(batch.basal, batch.pert, batch_index=batch.batch_index)
        loss_fn(out.pred.float(), batch.target).mean().backward()
    net.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def bare_step_ms(model, batch, *, mode: str | None, reps: int = 30, profile: bool = False
                 ) -> float:
    """Median ms of network + loss + backward + fused Adam on one fixed batch (no sampling).
    ``mode``: None = eager, else the torch.compile mode of forward + loss (as the trainer does
    under bf16 autocast, at full fp32 matmul precision outside autocast)."""
    from statetx.losses import get_loss

    net = model.network_.cuda().train()
    loss_fn = get_loss("energy")
    opt = torch.optim.Adam(net.parameters(), lr=1e-5, fused=True)

    def fwd_loss(b):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = net(b.basal, b.pert, batch_index=b.batch_index)
        return loss_fn(out.pred.float(), b.target).mean()

    if mode is not None:
        fwd_loss = torch.compile(fwd_loss, mode=None if mode == "default" else mode)

    def step():
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        fwd_loss(batch).backward()
        opt.step()

    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        if profile:
            _profile(step, f"bare step, {mode or 'eager'}")
    finally:
        torch.set_float32_matmul_precision(prev)
    return statistics.median(times)


def _profile(step, label: str, n: int = 5) -> None:
    """Top CUDA kernels of ``n`` steps and the GPU-busy time per step (kernels summed)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n * 1e3
    events = p.key_averages()
    busy = sum(e.self_device_time_total for e in events) / n / 1e3
    print(f"\n--- profile: {label}: {wall:.2f} ms/step under the profiler, kernels "
          f"{busy:.2f} ms/step ({busy / wall:.0%} busy)")
    print(events.table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=70))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="state")
    p.add_argument("--set-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--cells", type=int, default=60000)
    p.add_argument("--steps", type=int, default=250,
                   help=f"training steps per loop variant, at least {MIN_STEPS}: the first "
                        f"{LOG_WINDOW}-step log window (start-up, compilation) is dropped")
    p.add_argument("--modes", default="default,reduce-overhead",
                   help="torch.compile modes to measure (comma-separated; 'none' for none)")
    p.add_argument("--profile", action="store_true",
                   help="CUDA kernel tables of the eager and compiled bare steps")
    p.add_argument("--quick", action="store_true", help="only the eager loop and bare step")
    args = p.parse_args(argv)
    if args.steps < MIN_STEPS:
        p.error(f"--steps must be at least {MIN_STEPS} (the first {LOG_WINDOW}-step log window "
                f"is dropped; {2 * LOG_WINDOW}+ gives a whole window to measure), got {args.steps}")
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU.")
    modes = [] if args.quick or args.modes == "none" else args.modes.split(",")
    name = torch.cuda.get_device_name()
    peak = matmul_peak()
    adata = synthetic(args.cells, args.genes, 50, 4)
    print(f"\n{name}; torch {torch.__version__}; bf16 matmul peak measured {peak:.0f} TFLOP/s; "
          f"preset {args.preset}, {args.batch_size} sets x {args.set_len} cells, "
          f"{args.genes} genes", flush=True)
    variants = [("loop eager, cells on GPU", False, "always", "default")]
    if not args.quick:
        variants.append(("loop eager, cells on host", False, "never", "default"))
    variants += [(f"loop compiled ({m}), cells on GPU", True, "always", m) for m in modes]
    model, flops = None, None
    for label, comp, place, mode in variants:
        r = fit_rate(adata, args, compile=comp, data_on_device=place, steps=args.steps, mode=mode)
        if model is None:
            model = r["model"]
            batch = one_batch(model)
            flops = step_flops(model, batch)
            print(f"{flops / 1e12:.2f} TFLOP per step (fwd + bwd, network + energy loss)")
            print(f"{'variant':44s} {'ms/step':>8s} {'cells/s':>10s} {'TFLOP/s':>8s} "
                  f"{'MFU':>6s} {'wall s':>7s}")
        _row(label, r["ms_per_step"], r["cells_per_s"], r["wall_s"], flops, peak)
    for mode in [None, *modes]:
        ms = bare_step_ms(model, batch, mode=mode, profile=args.profile)
        _row(f"bare step {mode or 'eager'} (no sampling)", ms,
             args.set_len * args.batch_size / ms * 1e3, float("nan"), flops, peak)


def _row(label: str, ms: float, rate: float, wall: float, flops: float, peak: float) -> None:
    tf = flops / (ms / 1e3) / 1e12
    print(f"{label:44s} {ms:8.2f} {rate:10.0f} {tf:8.0f} {tf / peak:6.1%} {wall:7.1f}",
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
