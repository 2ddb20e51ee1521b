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


def fit_rate(adata, args, *, compile: bool, data_on_device: str, steps: int,
             device: str = "cuda") -> dict:
    """Steady-state cells/s of the full loop (median of the 50-step log windows after the
    first, which holds start-up and compilation)."""
    from statetx import StateTransitionModel

    model = StateTransitionModel(
        args.preset, pert_col="gene", cell_type_key="cell_type", control_pert="non-targeting",
        cell_set_len=args.set_len, batch_size=args.batch_size, max_steps=steps,
        val_freq=10**9, ckpt_every_n_steps=10**9, progress=False, device=device,
        compile=compile, data_on_device=data_on_device,
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


def bare_step_ms(model, batch, *, compile: bool, reps: int = 30, profile: bool = False) -> float:
    """Median ms of network + loss + backward + fused Adam on one fixed batch (no sampling)."""
    from statetx.losses import get_loss

    net = model.network_.cuda().train()
    fwd = torch.compile(net) if compile else net
    loss_fn = get_loss("energy")
    opt = torch.optim.Adam(net.parameters(), lr=1e-5, fused=True)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fwd(batch.basal, batch.pert, batch_index=batch.batch_index)
        loss_fn(out.pred.float(), batch.target).mean().backward()
        opt.step()

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
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="state")
    p.add_argument("--set-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--cells", type=int, default=60000)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--quick", action="store_true", help="only the eager loop and bare step")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU.")
    name = torch.cuda.get_device_name()
    peak = matmul_peak()
    adata = synthetic(args.cells, args.genes, 50, 4)
    print(f"\n{name}; bf16 matmul peak measured {peak:.0f} TFLOP/s; preset {args.preset}, "
          f"{args.batch_size} sets x {args.set_len} cells, {args.genes} genes", flush=True)
    variants = [("loop eager, cells on GPU", False, "always")]
    if not args.quick:
        variants.append(("loop eager, cells on host", False, "never"))
    if not (args.no_compile or args.quick):
        variants.append(("loop compiled, cells on GPU", True, "always"))
    model, flops = None, None
    for label, comp, place in variants:
        r = fit_rate(adata, args, compile=comp, data_on_device=place, steps=args.steps)
        if model is None:
            model = r["model"]
            batch = one_batch(model)
            flops = step_flops(model, batch)
            print(f"{flops / 1e12:.2f} TFLOP per step (fwd + bwd, network + energy loss)")
            print(f"{'variant':40s} {'ms/step':>8s} {'cells/s':>10s} {'TFLOP/s':>8s} "
                  f"{'MFU':>6s} {'wall s':>7s}")
        _row(label, r["ms_per_step"], r["cells_per_s"], r["wall_s"], flops, peak)
    for comp in ([False] if args.no_compile or args.quick else [False, True]):
        ms = bare_step_ms(model, batch, compile=comp, profile=args.profile and not comp)
        _row(f"bare step {'compiled' if comp else 'eager'} (no sampling)", ms,
             args.set_len * args.batch_size / ms * 1e3, float("nan"), flops, peak)


def _row(label: str, ms: float, rate: float, wall: float, flops: float, peak: float) -> None:
    tf = flops / (ms / 1e3) / 1e12
    print(f"{label:40s} {ms:8.2f} {rate:10.0f} {tf:8.0f} {tf / peak:6.1%} {wall:7.1f}",
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
