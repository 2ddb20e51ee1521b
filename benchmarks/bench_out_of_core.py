"""Out-of-core training: streaming a large on-disk h5ad vs training on an in-memory subset.

    python benchmarks/bench_out_of_core.py                       # 1M cells x 2,000 genes
    python benchmarks/bench_out_of_core.py --cells 50000 --steps 40 --memory-cells 20000

1. Writes (once; reused while its parameters match) a seeded synthetic log1p-like h5ad **in
   chunks** of ``--write-rows`` rows, never holding the matrix: X is CSR float32 (int32
   indices, int64 indptr, uncompressed), cells in random label order (the hard case for
   streaming: every chunk mixes every group) or sorted by cell type and perturbation (``--order
   sorted``). obs: ``gene`` (``--perts`` perturbations + ``non-targeting``, ``--controls``
   fraction), ``cell_type`` (``--cell-types``), ``gem_group``.
2. In a child process capped at ``--cap-gb`` (its RSS is polled every 0.1 s from /proc and it is
   killed above the cap), trains the ``state_sm`` preset (S ``--set-len``, B ``--batch-size``,
   ``--steps`` steps) with ``data_loading="stream"`` on the whole file.
3. In another child process, trains the same configuration with ``data_loading="memory"`` on
   the first ``--memory-cells`` cells, read into memory.
4. Optionally (``--sampler-batches``) times the data path alone in each mode (no model).

Prints cells/s of each mode (steady state: the training loop's own log windows after the first,
data reading included), start-up times and each child's peak RSS (``ru_maxrss``) against the
cap. Both children use ``--threads`` torch threads. Absolute numbers depend on the machine and
its load: compare the two modes measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

CONTROL = "non-targeting"


# ---------------------------------------------------------------------- writing the file
def _labels(n_cells: int, n_perts: int, n_cell_types: int, controls: float, order: str,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pert = rng.integers(1, n_perts + 1, n_cells)          # 0 = control
    pert[rng.random(n_cells) < controls] = 0
    ct = rng.integers(0, n_cell_types, n_cells)
    gem = rng.integers(0, 8, n_cells)
    if order == "sorted":
        idx = np.lexsort((pert, ct))
        pert, ct, gem = pert[idx], ct[idx], gem[idx]
    return pert, ct, gem


def write_h5ad(path: Path, n_cells: int, n_genes: int, n_perts: int, n_cell_types: int,
               controls: float, order: str, seed: int, write_rows: int) -> dict:
    """Write the synthetic file chunk by chunk; returns its description (also in uns)."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    pert, ct, gem = _labels(n_cells, n_perts, n_cell_types, controls, order, rng)
    names = np.array([CONTROL] + [f"P{i}" for i in range(n_perts)], dtype=object)
    obs = pd.DataFrame({
        "gene": pd.Categorical.from_codes(pert, names),
        "cell_type": pd.Categorical.from_codes(
            ct, np.array([f"CT{i}" for i in range(n_cell_types)], dtype=object)),
        "gem_group": pd.Categorical.from_codes(
            gem, np.array([f"g{i}" for i in range(8)], dtype=object)),
    }, index=pd.Index([f"c{i}" for i in range(n_cells)], dtype=object))
    var = pd.DataFrame(index=pd.Index([f"G{i}" for i in range(n_genes)], dtype=object))
    # (object dtype: pandas >= 3 makes str arrays nullable strings, which anndata refuses to write)
    # mean counts: gene base level x cell-type factor x perturbation effect (10% of genes)
    base = rng.gamma(0.6, 1.0, n_genes)
    ct_fac = np.exp(rng.normal(0, 0.3, (n_cell_types, n_genes)))
    eff = np.ones((n_perts + 1, n_genes))
    hit = rng.random((n_perts, n_genes)) < 0.1
    eff[1:][hit] = np.exp(rng.normal(0, 0.7, int(hit.sum())))
    lam = (base * ct_fac[:, None, :] * eff[None]).astype(np.float64)  # [ct, pert, G]
    desc = dict(cells=n_cells, genes=n_genes, perts=n_perts, cell_types=n_cell_types,
                controls=controls, order=order, seed=seed, format="csr float32")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    ad.AnnData(obs=obs, var=var, uns={"bench_out_of_core": json.dumps(desc)}).write_h5ad(tmp)
    del obs
    t0 = time.perf_counter()
    nnz = 0
    with h5py.File(tmp, "a") as f:
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = np.array([n_cells, n_genes], dtype=np.int64)
        data = g.create_dataset("data", (0,), dtype=np.float32, maxshape=(None,),
                                chunks=(1 << 20,))
        indices = g.create_dataset("indices", (0,), dtype=np.int32, maxshape=(None,),
                                   chunks=(1 << 20,))
        indptr = g.create_dataset("indptr", (n_cells + 1,), dtype=np.int64)
        indptr[0] = 0
        for lo in range(0, n_cells, write_rows):
            hi = min(lo + write_rows, n_cells)
            counts = rng.poisson(lam[ct[lo:hi], pert[lo:hi]]).astype(np.float32)
            block = sp.csr_matrix(np.log1p(counts, out=counts))
            n = block.nnz
            data.resize((nnz + n,))
            indices.resize((nnz + n,))
            data[nnz:nnz + n] = block.data
            indices[nnz:nnz + n] = block.indices.astype(np.int32)
            indptr[lo + 1:hi + 1] = block.indptr[1:].astype(np.int64) + nnz
            nnz += n
            if (lo // write_rows) % 25 == 0:
                print(f"  wrote {hi:,}/{n_cells:,} cells ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
    os.replace(tmp, path)
    desc.update(nnz=int(nnz), density=nnz / (n_cells * n_genes),
                write_s=time.perf_counter() - t0, bytes=path.stat().st_size,
                write_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    path.with_name(path.name + ".json").write_text(json.dumps(desc, indent=1))
    return desc


def ensure_file(args: argparse.Namespace) -> dict:
    path = Path(args.path)
    meta = path.with_name(path.name + ".json")
    want = dict(cells=args.cells, genes=args.genes, perts=args.perts,
                cell_types=args.cell_types, controls=args.controls, order=args.order,
                seed=args.seed)
    if path.is_file() and meta.is_file():
        desc = json.loads(meta.read_text())
        if all(desc.get(k) == v for k, v in want.items()) and not args.rewrite:
            print(f"reusing {path} ({desc['bytes'] / 2**30:.2f} GiB, written in "
                  f"{desc['write_s']:.0f} s)")
            return desc
    path.parent.mkdir(parents=True, exist_ok=True)
    est = args.cells * args.genes * 0.5 * 8  # CSR float32 + int32 at <= ~50 % density
    if shutil.disk_usage(path.parent).free < 1.2 * est:
        sys.exit(f"not enough free disk space for {path} (~{est / 2**30:.1f} GiB needed)")
    print(f"writing {path}: {args.cells:,} cells x {args.genes:,} genes, CSR float32, "
          f"order {args.order}")
    return write_h5ad(path, args.cells, args.genes, args.perts, args.cell_types, args.controls,
                      args.order, args.seed, args.write_rows)


# ---------------------------------------------------------------------- child processes
def _model(args: argparse.Namespace, mode: str):
    from statetx import StateTransitionModel

    return StateTransitionModel(
        "state_sm", pert_col="gene", cell_type_key="cell_type", control_pert=CONTROL,
        cell_set_len=args.set_len, batch_size=args.batch_size, max_steps=args.steps,
        val_freq=10**9, ckpt_every_n_steps=10**9, progress=True, device=args.device, seed=0,
        dtype=args.dtype, data_loading=mode, stream_chunk_size=args.chunk_size,
        stream_buffer_chunks=args.buffer_chunks, stream_max_controls=args.max_controls,
    )


def _in_memory_subset(path: Path, n: int):
    import anndata as ad

    backed = ad.read_h5ad(path, backed="r")
    try:
        sub = backed[: min(n, backed.n_obs)].to_memory()
    finally:
        backed.file.close()
    return sub


def child(args: argparse.Namespace) -> None:
    """Train in one mode and print one JSON line of results."""
    import torch

    torch.set_num_threads(args.threads)
    mode, path = args.child, Path(args.path)
    res: dict = {"mode": mode}
    t0 = time.perf_counter()
    model = _model(args, mode)
    if mode == "stream":
        data, spec = None, {"datasets": {"data": str(path)}, "training": {"data": "train"}}
    else:
        data, spec = _in_memory_subset(path, args.memory_cells), None
    if args.sampler_batches:
        ts = time.perf_counter()
        res["sampler_cells_per_s"] = _time_sampler(args, model, data, spec)
        res["sampler_s"] = time.perf_counter() - ts
    res["rss_before_fit_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model.fit(data, spec, dataset_name="data")
    wall = time.perf_counter() - t0
    h = model.history_.dropna(subset=["cells_per_s"])
    # steady state: log windows after the first (50 steps each), reading included
    per = h["cells_per_s"].to_numpy()[1:] if len(h) > 1 else h["cells_per_s"].to_numpy()
    cells_per_window = 50 * args.set_len * args.batch_size
    res.update(
        train_cells=int(model._prepared.splits["train"].is_target.sum()),
        steps=args.steps, wall_s=wall, training_s=model.training_time_,
        startup_s=wall - model.training_time_ - res.get("sampler_s", 0.0),
        cells_per_s=float(len(per) * cells_per_window / (cells_per_window / per).sum()),
        windows=[round(float(v)) for v in h["cells_per_s"]],
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    print("RESULT " + json.dumps(res), flush=True)


def _time_sampler(args: argparse.Namespace, model, data, spec) -> float:
    """Cells/s of the data path alone (batches drawn and gathered, no model)."""
    from statetx.data import prepare
    from statetx.stream import make_sampler, prepare_stream, stream_settings

    cols = model._columns()
    if args.child == "stream":
        st = stream_settings("stream", args.chunk_size, args.buffer_chunks, args.max_controls)
        prep = prepare_stream(data, spec, cols, chunk_size=args.chunk_size, dtype=args.dtype,
                              dataset_name="data")
    else:
        st, prep = None, prepare(data, spec, cols, dtype=args.dtype, dataset_name="data")
    s = make_sampler(prep.splits["train"], prep.vocab, args.set_len, args.batch_size, stream=st,
                     seed=123)
    t0, n = time.perf_counter(), 0
    for i, b in enumerate(s.batches(0)):
        n += b.n_cells
        if i + 1 >= args.sampler_batches:
            break
    rate = n / (time.perf_counter() - t0)
    if hasattr(s, "close"):
        s.close()
    return rate


def run_child(args: argparse.Namespace, mode: str, cap_mb: float | None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode] + args.forward
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    peak = {"mb": 0.0, "killed": False}

    def poll() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        mb = int(line.split()[1]) / 1024
                        peak["mb"] = max(peak["mb"], mb)
                        if cap_mb is not None and mb > cap_mb:
                            peak["killed"] = True
                            proc.kill()
            except (OSError, ValueError):
                pass
            time.sleep(0.1)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    result = None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
        elif args.verbose or line.startswith("statetx: streaming"):
            print(f"  [{mode}] {line.rstrip()}")
    proc.wait()
    t.join()
    if peak["killed"]:
        sys.exit(f"the {mode} run exceeded the cap of {cap_mb:.0f} MB and was killed")
    if proc.returncode != 0 or result is None:
        sys.exit(f"the {mode} run failed (exit {proc.returncode}); rerun with --verbose")
    result["polled_peak_rss_mb"] = peak["mb"]
    return result


# ---------------------------------------------------------------------- main
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", default="/tmp/statetx_ooc/synthetic.h5ad")
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--perts", type=int, default=50)
    p.add_argument("--cell-types", type=int, default=4)
    p.add_argument("--controls", type=float, default=0.1, help="fraction of control cells")
    p.add_argument("--order", choices=["random", "sorted"], default="random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-rows", type=int, default=8192)
    p.add_argument("--rewrite", action="store_true")
    p.add_argument("--memory-cells", type=int, default=100_000)
    p.add_argument("--set-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--buffer-chunks", type=int, default=16)
    p.add_argument("--max-controls", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="training device (cpu, cuda)")
    p.add_argument("--cap-gb", type=float, default=4.0)
    p.add_argument("--sampler-batches", type=int, default=0,
                   help="also time the data path alone for this many batches")
    p.add_argument("--only", choices=["write", "stream", "memory"], default=None)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--child", choices=["stream", "memory"], default=None,
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.forward = [a for i, a in enumerate(argv)
                    if a != "--child" and (i == 0 or argv[i - 1] != "--child")]
    return args


def main(argv: list[str]) -> None:
    args = parse(argv)
    if args.child:
        child(args)
        return
    desc = ensure_file(args)
    print(f"file: {desc['cells']:,} x {desc['genes']:,}, {desc['format']}, density "
          f"{desc['density']:.2f}, {desc['bytes'] / 2**30:.2f} GiB, {desc['order']} order; "
          f"written in {desc['write_s']:.0f} s"
          + (f" (writer peak RSS {desc['write_peak_rss_mb']:,.0f} MB)"
             if "write_peak_rss_mb" in desc else ""))
    if args.only == "write":
        return
    cap = args.cap_gb * 1024
    res = {}
    for mode in ("stream", "memory"):
        if args.only in (None, mode):
            print(f"training ({mode}) ...", flush=True)
            res[mode] = run_child(args, mode, cap if mode == "stream" else None)
    print(f"\nstate_sm, S {args.set_len}, B {args.batch_size}, {args.steps} steps, "
          f"{args.threads} torch thread(s), dtype {args.dtype}")
    for mode, r in res.items():
        cells = f"{desc['cells']:,} cells on disk" if mode == "stream" else \
            f"{min(args.memory_cells, desc['cells']):,} cells in memory"
        print(f"  {mode:6s} ({cells}): {r['cells_per_s']:,.0f} cells/s steady state "
              f"(log windows {r['windows']}), start-up {r['startup_s']:.1f} s, training "
              f"{r['training_s']:.1f} s, peak RSS {r['peak_rss_mb']:,.0f} MB (polled "
              f"{r['polled_peak_rss_mb']:,.0f} MB; before fit "
              f"{r['rss_before_fit_mb']:,.0f} MB)"
              + (f", data path alone {r['sampler_cells_per_s']:,.0f} cells/s"
                 if "sampler_cells_per_s" in r else ""))
    if len(res) == 2:
        ratio = res["stream"]["cells_per_s"] / res["memory"]["cells_per_s"]
        print(f"  stream / memory: {ratio:.2f}")
    if "stream" in res:
        ok = res["stream"]["peak_rss_mb"] < cap
        print(f"  streaming peak RSS {res['stream']['peak_rss_mb']:,.0f} MB vs cap {cap:,.0f} MB:"
              f" {'below' if ok else 'ABOVE'} the cap")


if __name__ == "__main__":
    main(sys.argv[1:])
