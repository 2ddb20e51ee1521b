"""Cost of the perturbation input at genome-wide scale: per-cell one-hot vectors vs per-set codes.

    python benchmarks/bench_pert_input.py                     # state_sm, S 64, B 8
    python benchmarks/bench_pert_input.py --perts 50,2000,10000,20000 --rounds 6

arc-state feeds every cell a dense one-hot perturbation vector ``[B, S, P]``, so the pert
encoder's first layer is a ``B·S × P × h`` product (forward and weight gradient) and the sampler
keeps a ``P × P`` identity to gather from. statetx passes one code per set (``[B]``): the
network looks the columns up and runs the encoder once per set (up to its first dropout, which
still draws per cell). This script times a state_sm training step (network forward, energy loss,
backward, fused Adam; bf16 matmuls as in training) both ways at several numbers of perturbations,
alternating the two in one process (``--rounds`` pairs, median ms/step), and prints the memory of
the old path's identity matrix and per-step input tensor.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from statetx._heap import retained_heap
from statetx.losses import energy_distance
from statetx.nn import StateTransitionNetwork
from statetx.presets import build_network_config, resolve_architecture


def step_fn(net: StateTransitionNetwork, opt: torch.optim.Optimizer, basal: torch.Tensor,
            target: torch.Tensor, pert: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    pred = net(basal, pert).pred
    energy_distance(pred, target).mean().backward()
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="state_sm")
    ap.add_argument("--perts", default="50,2000,10000")
    ap.add_argument("--set-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    a = ap.parse_args()
    torch.set_float32_matmul_precision("medium")
    print(f"{a.preset}, B {a.batch_size} x S {a.set_len}, {a.genes} genes, "
          f"{torch.get_num_threads()} threads; median ms/step over {a.rounds} alternated rounds "
          f"of {a.steps} steps")
    print(f"{'P':>7} {'per-cell one-hot':>17} {'per-set codes':>14} {'speed-up':>9} "
          f"{'identity P x P':>15} {'input / step':>13}")
    with retained_heap():  # as a CPU fit
        for n_perts in (int(p) for p in a.perts.split(",")):
            run(a, n_perts)


def run(a: argparse.Namespace, n_perts: int) -> None:
    """Alternate the two inputs on one network with ``n_perts`` perturbations; print a row."""
    b, s, g = a.batch_size, a.set_len, a.genes
    torch.manual_seed(0)
    cfg = build_network_config(resolve_architecture(a.preset), input_dim=g, output_dim=g,
                               pert_dim=n_perts)
    net = StateTransitionNetwork(cfg).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    basal, target = torch.rand(b, s, g), torch.rand(b, s, g)
    codes = torch.randint(n_perts, (b,))
    eye = torch.eye(n_perts)  # what a one-hot sampler gathers from
    times: dict[str, list[float]] = {"cells": [], "codes": []}
    for _ in range(a.rounds + 1):  # the first round warms up
        for name in times:
            t0 = time.perf_counter()
            for _ in range(a.steps):  # the old path gathers its [B, S, P] input every step
                pert = (codes if name == "codes" else
                        eye[codes][:, None, :].expand(b, s, -1).contiguous())
                step_fn(net, opt, basal, target, pert)
            times[name].append((time.perf_counter() - t0) / a.steps * 1e3)
    old, new = (statistics.median(times[k][1:]) for k in ("cells", "codes"))
    print(f"{n_perts:>7} {old:>14.1f} ms {new:>11.1f} ms {old / new:>8.2f}x "
          f"{eye.numel() * 4 / 2**20:>12.0f} MB {b * s * n_perts * 4 / 2**20:>10.1f} MB")


if __name__ == "__main__":
    main()
