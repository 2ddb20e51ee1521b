"""Side-by-side training benchmark: arc-state 0.11.1 (``state tx train``) vs statetx.

    python benchmarks/bench_vs_arc_state.py                     # ~5-10 min on a 2-core machine
    python benchmarks/bench_vs_arc_state.py --venv /tmp/arcbench_venv --short 20 --long 120

Not part of CI. What it does:

1. Creates a virtualenv for arc-state (``--venv``, default ``/tmp/arcbench_venv``) unless it
   already has the ``state`` command, and ``pip install torch==2.13.0 arc-state==0.11.1`` there.
2. Writes a seeded synthetic dataset (``--cells`` x 2,000 genes, log1p-like; obs ``gene``,
   ``cell_type``, ``gem_group``; control ``non-targeting``; ``obsm['X_hvg'] = X``) and a cell-load
   TOML (all cell types train except one zero-shot test cell type; no validation split).
3. Runs both trainers as black boxes with the *same* Hydra-style overrides (``model=state_sm``,
   ``model.kwargs.cell_set_len=64``, ``training.batch_size=8``, ``embed_key=X_hvg``,
   ``output_space=gene``, validation and periodic checkpoints pushed past the end): arc-state as
   ``<venv>/bin/state tx train ...``, statetx as ``python -m statetx tx train ...``. Everything
   else is each tool's default (arc-state's DataLoader workers included).
4. Each tool runs twice, ``--short`` and ``--long`` steps. **Steady-state cells/s** =
   ``(long - short) * S * B / (wall_long - wall_short)``: the difference cancels start-up
   (imports, data loading, model construction, sanity checks, final checkpoint), so it is the rate
   of the extra steps alone, measured identically for both tools from wall-clock time.
5. **Memory** of the long run: peak RSS of the largest process (``/usr/bin/time -v``, "Maximum
   resident set size") and the peak of the summed PSS of the whole process tree (polled every
   second from ``/proc``; counts DataLoader workers without double-counting shared pages).

``--statetx-bf16`` adds a third, interleaved run: statetx with ``training.precision=bf16-mixed``
(bf16 autocast, an option; both tools' default is fp32 with ``matmul_precision="medium"``).

Both sides run back to back in one invocation; on a shared machine compare the ratio, not the
absolute numbers. Each tool's own speed log is printed too where it has one (arc-state's
``batches_per_second`` times the step only, not data loading, and 0.11.1 does not write it to its
CSV log in this configuration: "n/a"; statetx's ``cells_per_s`` is the last log window).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ environment
def ensure_venv(venv: Path, torch_version: str, arc_version: str) -> Path:
    """The ``state`` executable of ``venv``, installing arc-state there when missing."""
    state = venv / "bin" / "state"
    if state.exists():
        return state
    print(f"creating {venv} and installing torch=={torch_version} arc-state=={arc_version} "
          "(several minutes)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    log = venv / "pip-install.log"
    with log.open("w") as fh:
        rc = subprocess.run([str(venv / "bin" / "pip"), "install", f"torch=={torch_version}",
                             f"arc-state=={arc_version}"], stdout=fh, stderr=subprocess.STDOUT)
    if rc.returncode != 0 or not state.exists():
        raise SystemExit(f"arc-state did not install (see {log}):\n"
                         + "\n".join(log.read_text().splitlines()[-15:]))
    return state


# ------------------------------------------------------------------ data
def write_dataset(folder: Path, n_cells: int, n_genes: int, n_perts: int, n_cell_types: int,
                  seed: int = 0) -> Path:
    """Seeded synthetic h5ad + cell-load TOML; returns the TOML path."""
    import anndata as ad
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    h5 = folder / "data" / "bench.h5ad"
    toml = folder / "split.toml"
    if h5.exists() and toml.exists():
        return toml
    h5.parent.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = np.array(["non-targeting"] + [f"P{i}" for i in range(n_perts)])
    pert = labels[rng.integers(0, len(labels), n_cells)]
    pert[: n_cells // 5] = "non-targeting"
    cts = [f"CT{i}" for i in range(n_cell_types)]
    ct = np.array(cts)[rng.integers(0, n_cell_types, n_cells)]
    effect = (rng.normal(0, 0.5, size=(len(labels), n_genes))
              * (rng.random((len(labels), n_genes)) < 0.05)).astype(np.float32)
    effect[0] = 0.0  # controls
    base = np.exp(rng.normal(-0.5, 0.8, n_genes)).astype(np.float32)
    lam = base[None] * np.exp(effect[pd.Index(labels).get_indexer(pert)])
    x = np.log1p(rng.poisson(lam).astype(np.float32))
    obs = pd.DataFrame({"gene": pert, "cell_type": ct,
                        "gem_group": rng.choice(["g1", "g2", "g3"], n_cells)},
                       index=[f"c{i}" for i in range(n_cells)])
    a = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]))
    a.obsm["X_hvg"] = x.copy()
    a.write_h5ad(h5)
    toml.write_text(f'[datasets]\nbench = "{h5.parent}"\n\n[training]\nbench = "train"\n\n'
                    f'[zeroshot]\n"bench.{cts[-1]}" = "test"\n')
    return toml


# ------------------------------------------------------------------ measurement
def _tree(root: int) -> list[int]:
    parent: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parent.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += parent.get(pid, [])
    return out


def _pss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


def run_measured(cmd: list[str], log: Path, env: dict[str, str]) -> dict[str, float]:
    """Run ``cmd`` under ``/usr/bin/time -v``; wall time, max RSS and peak tree PSS (MB)."""
    timed = ["/usr/bin/time", "-v", *cmd] if Path("/usr/bin/time").exists() else cmd
    peak = {"pss": 0}
    with log.open("w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(timed, stdout=fh, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                peak["pss"] = max(peak["pss"], sum(_pss_kb(p) for p in _tree(proc.pid)))
                done.wait(1.0)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        done.set()
        th.join()
    text = log.read_text(errors="replace")
    if rc != 0:
        raise SystemExit(f"command failed (exit {rc}), see {log}:\n  {' '.join(cmd)}\n"
                         + "\n".join(text.splitlines()[-25:]))
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"wall_s": wall, "max_rss_mb": int(m.group(1)) / 1024 if m else float("nan"),
            "peak_pss_mb": peak["pss"] / 1024, "load": os.getloadavg()[0]}


def overrides(toml: Path, out: Path, name: str, steps: int, set_len: int, batch: int) -> list[str]:
    return [
        f"data.kwargs.toml_config_path={toml}", "data.kwargs.embed_key=X_hvg",
        "data.kwargs.output_space=gene", "data.kwargs.pert_col=gene",
        "data.kwargs.cell_type_key=cell_type", "data.kwargs.batch_col=gem_group",
        "data.kwargs.control_pert=non-targeting", "model=state_sm",
        f"model.kwargs.cell_set_len={set_len}", f"training.batch_size={batch}",
        f"training.max_steps={steps}", "training.val_freq=1000000",
        "training.ckpt_every_n_steps=1000000", f"output_dir={out}", f"name={name}",
        "use_wandb=false",
    ]


def arc_logged_speed(run_dir: Path) -> float | None:
    """arc-state's own ``batches_per_second`` (last logged value) from its CSV log."""
    for path in sorted(run_dir.rglob("metrics.csv")):
        with path.open() as fh:
            vals = [r["batches_per_second"] for r in csv.DictReader(fh)
                    if r.get("batches_per_second")]
        if vals:
            return float(vals[-1])
    return None


def statetx_logged_speed(run_dir: Path) -> float | None:
    """statetx's own ``cells_per_s`` (last log window) from its metrics.csv."""
    for path in sorted(run_dir.rglob("metrics.csv")):
        with path.open() as fh:
            vals = [r["cells_per_s"] for r in csv.DictReader(fh) if r.get("cells_per_s")]
        if vals:
            return float(vals[-1])
    return None


# ------------------------------------------------------------------ main
def _fmt(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.0f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--venv", type=Path, default=Path(os.environ.get("ARCBENCH_VENV",
                                                                      "/tmp/arcbench_venv")))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/arcbench"))
    p.add_argument("--torch-version", default="2.13.0")
    p.add_argument("--arc-version", default="0.11.1")
    p.add_argument("--cells", type=int, default=20000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--perts", type=int, default=50)
    p.add_argument("--cell-types", type=int, default=4)
    p.add_argument("--set-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--short", type=int, default=20, help="steps of the short run")
    p.add_argument("--long", type=int, default=120, help="steps of the long run")
    p.add_argument("--only", choices=["arc", "statetx"], default=None)
    p.add_argument("--rounds", type=int, default=2,
                   help="repeat the interleaved schedule; rates are medians over rounds")
    p.add_argument("--statetx-bf16", action="store_true",
                   help="also run statetx with training.precision=bf16-mixed (bf16 autocast)")
    p.add_argument("--pause", type=float, default=30.0,
                   help="seconds of idle machine before every run (default 30): a run right "
                   "after arc-state's 13 busy processes is measured slower on a shared VM")
    args = p.parse_args(argv)
    if args.long <= args.short:
        p.error("--long must exceed --short")
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")

    toml = write_dataset(args.workdir, args.cells, args.genes, args.perts, args.cell_types)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    tools: dict[str, list[str]] = {}
    if args.only in (None, "arc"):
        tools["arc-state"] = [str(ensure_venv(args.venv, args.torch_version, args.arc_version)),
                              "tx", "train"]
    if args.only in (None, "statetx"):
        tools["statetx"] = [sys.executable, "-m", "statetx", "tx", "train"]
        if args.statetx_bf16:
            tools["statetx-bf16"] = tools["statetx"]
    extra = {"statetx-bf16": ["training.precision=bf16-mixed"]}

    cells_per_step = args.set_len * args.batch_size
    rates: dict[str, list[float]] = {tool: [] for tool in tools}
    results: dict[str, dict[str, float]] = {}
    for rnd in range(1, args.rounds + 1):
        runs: dict[str, dict[int, dict[str, float]]] = {tool: {} for tool in tools}
        # the tools take turns at going first (round r starts with tool r - 1)
        names = list(tools)
        order = names[(rnd - 1) % len(names):] + names[:(rnd - 1) % len(names)]
        for steps in (args.short, args.long):  # interleaved: both tools see similar machine load
            for tool in order:
                cmd = tools[tool]
                time.sleep(args.pause)
                out = args.workdir / "runs" / tool
                name = f"steps{steps}"
                shutil.rmtree(out / name, ignore_errors=True)
                log = args.workdir / f"{tool}_{name}.log"
                print(f"[round {rnd}, {tool}] {steps} steps ...", flush=True)
                r = runs[tool][steps] = run_measured(
                    cmd + overrides(toml, out, name, steps, args.set_len, args.batch_size)
                    + extra.get(tool, []), log, env)
                print(f"    wall {r['wall_s']:.1f} s, max RSS {r['max_rss_mb']:.0f} MB, peak "
                      f"tree PSS {r['peak_pss_mb']:.0f} MB, 1-min load average at the end "
                      f"{r['load']:.1f}  (log: {log})", flush=True)
        for tool in tools:
            short, long = runs[tool][args.short], runs[tool][args.long]
            dt = long["wall_s"] - short["wall_s"]
            rates[tool].append((args.long - args.short) * cells_per_step / dt if dt > 0
                               else np.nan)
            long_dir = args.workdir / "runs" / tool / f"steps{args.long}"
            if tool == "arc-state":
                bps = arc_logged_speed(long_dir)
                own = None if bps is None else bps * cells_per_step
            else:
                own = statetx_logged_speed(long_dir)
            results[tool] = {  # memory and start-up: the last round
                "startup_s": short["wall_s"] - args.short * dt / (args.long - args.short),
                "max_rss_mb": long["max_rss_mb"],
                "peak_pss_mb": long["peak_pss_mb"],
                "own_log_cells_per_s": np.nan if own is None else own,
            }
        print("    cells/s this round: " + ", ".join(f"{t} {v[-1]:.0f}" for t, v in rates.items()),
              flush=True)
    for tool in tools:
        results[tool]["cells_per_s"] = float(np.median(rates[tool]))

    print(f"\nstate_sm, S={args.set_len}, B={args.batch_size}, {args.genes} genes, "
          f"{args.cells} cells; steady state = steps {args.short}..{args.long}, median of "
          f"{args.rounds} round(s) ({os.cpu_count()} CPUs)")
    print(f"{'':12s} {'cells/s':>9s} {'start-up s':>10s} {'max RSS MB':>10s} "
          f"{'tree PSS MB':>11s} {'own log cells/s':>15s}")
    for tool, r in results.items():
        print(f"{tool:12s} {r['cells_per_s']:9.0f} {r['startup_s']:10.1f} {r['max_rss_mb']:10.0f} "
              f"{r['peak_pss_mb']:11.0f} {_fmt(r['own_log_cells_per_s']):>15s}")
    if "arc-state" in results:
        a = results["arc-state"]
        for tool in (t for t in results if t != "arc-state"):
            s = results[tool]
            ratios = np.array(rates[tool]) / np.array(rates["arc-state"])
            print(f"{tool} / arc-state cells/s per round: "
                  + ", ".join(f"{r:.2f}x" for r in ratios) + f" (median {np.median(ratios):.2f}x)")
            print(f"{tool} / arc-state: {s['cells_per_s'] / a['cells_per_s']:.2f}x cells/s "
                  f"(medians), {s['max_rss_mb'] / a['max_rss_mb']:.2f}x max RSS, "
                  f"{s['peak_pss_mb'] / a['peak_pss_mb']:.2f}x tree PSS")

if __name__ == "__main__":
    main(sys.argv[1:])
