"""Benchmark: cell-set sampling from memory vs one model training step (data.md §10).

Measures the time to draw ``--steps`` training batches of ``--sets`` sets x ``--set-len`` cells x
``--genes`` genes from an in-memory, seeded synthetic split (~20k cells), and for comparison the
forward + backward time of one ``state_sm``-architecture step (energy loss) at the same shape.
The data path must be a small fraction of a model step.

Usage::

    python benchmarks/bench_sampler.py [--cells 20000] [--genes 2000] [--steps 1000]
        [--sets 8] [--set-len 64] [--model-steps 3] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import anndata as ad
import numpy as np
import pandas as pd
import torch

from statetx.config import ColumnMap
from statetx.data import PreparedData, prepare
from statetx.sets import CellSetSampler


def synthetic_split(n_cells: int, n_genes: int, seed: int = 0, n_perts: int = 60,
                    n_cell_types: int = 4) -> PreparedData:
    """Seeded log1p-like data: ``n_cell_types`` contexts, ``n_perts`` perturbations + controls."""
    rng = np.random.default_rng(seed)
    perts = np.array([f"P{i:03d}" for i in range(n_perts)] + ["ctrl"])
    p = np.full(len(perts), 0.9 / n_perts)
    p[-1] = 0.1  # ~10% controls
    obs = pd.DataFrame(
        {"gene": rng.choice(perts, n_cells, p=p),
         "cell_type": rng.choice([f"CT{i}" for i in range(n_cell_types)], n_cells),
         "batch": rng.choice(["b0", "b1", "b2"], n_cells)},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    X = rng.random((n_cells, n_genes), dtype=np.float32)
    X[X < 0.7] = 0.0
    X = np.log1p(X * 20, out=X)
    adata = ad.AnnData(X, obs=obs)
    cols = ColumnMap.build(pert_col="gene", cell_type_key="cell_type", batch_col="batch",
                           control_pert="ctrl")
    return prepare(adata, {"training": {"synth": "train"}}, cols)


def time_sampler(sampler: CellSetSampler, steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` batches (crossing epochs as needed), incl. the gather."""
    done, epoch = 0, 0
    t0 = time.perf_counter()
    while done < steps:
        for batch in sampler.batches(epoch):
            if device.type != "cpu":
                batch = batch.to(device, non_blocking=True)
            done += 1
            if done == steps:
                break
        epoch += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def time_model_step(prep: PreparedData, sampler: CellSetSampler, steps: int,
                    device: torch.device) -> float | None:
    """Seconds per forward+backward of a state_sm network with the energy loss (None if the
    model modules are not importable)."""
    try:
        from statetx.losses import get_loss
        from statetx.nn import StateTransitionNetwork
        from statetx.presets import build_network_config, resolve_architecture
    except ImportError as exc:  # pragma: no cover - model code not present
        print(f"model modules not importable ({exc}); timing the sampler only")
        return None
    arch = resolve_architecture("state_sm")
    cfg = build_network_config(arch, input_dim=prep.input_dim, output_dim=prep.input_dim,
                               pert_dim=prep.vocab.pert_dim)
    torch.manual_seed(0)
    net = StateTransitionNetwork(cfg).to(device).train()
    loss_fn = get_loss("energy")
    batch = next(iter(sampler.batches(0))).to(device)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        out = net(batch.basal, batch.pert)
        loss = loss_fn(out.pred, batch.target).mean()
        loss.backward()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    n_params = sum(p.numel() for p in net.parameters())
    print(f"model: state_sm, {n_params / 1e6:.1f}M parameters, hidden {cfg.hidden_dim}, "
          f"{cfg.n_layers} layers")
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> dict[str, float | None]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=20_000)
    ap.add_argument("--genes", type=int, default=2_000)
    ap.add_argument("--steps", type=int, default=1_000)
    ap.add_argument("--sets", type=int, default=8, help="B, sets per batch")
    ap.add_argument("--set-len", type=int, default=64, help="S, cells per set")
    ap.add_argument("--model-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    t0 = time.perf_counter()
    prep = synthetic_split(args.cells, args.genes, seed=args.seed)
    t_prep = time.perf_counter() - t0
    train = prep.splits["train"]
    sampler = CellSetSampler(train, prep.vocab, args.set_len, args.sets, seed=args.seed)
    print(f"data: {train.n_obs:,} cells x {prep.input_dim:,} genes in memory "
          f"({train.X.element_size() * train.X.numel() / 2**20:.0f} MiB), "
          f"{sampler.n_groups} groups, {len(sampler)} batches/epoch; prepare {t_prep:.2f} s")
    print(f"shape: B={args.sets} sets x S={args.set_len} cells x D={prep.input_dim}; "
          f"device {device}; torch threads {torch.get_num_threads()}")

    s_step = time_sampler(sampler, args.steps, device)
    print(f"sampler: {args.steps} steps in {s_step * args.steps:.3f} s = "
          f"{s_step * 1e3:.3f} ms/step")
    m_step = time_model_step(prep, sampler, args.model_steps, device)
    if m_step is None:
        print("model step: not measured (model modules missing)")
        return {"sampler_ms": s_step * 1e3, "model_ms": None, "ratio": None}
    ratio = s_step / m_step
    print(f"model fwd+bwd: {m_step * 1e3:.1f} ms/step (mean of {args.model_steps})")
    print(f"ratio sampler/model: {ratio:.4f} ({ratio * 100:.2f}% of a model step)")
    return {"sampler_ms": s_step * 1e3, "model_ms": m_step * 1e3, "ratio": ratio}


if __name__ == "__main__":
    main()
