"""Data-parallel training (torchrun, gloo on CPU) equals one process with a W-times larger batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_model import SMALL, small_model

from statetx.config import ColumnMap
from statetx.data import prepare
from statetx.distributed import init_distributed, rank_seed, world
from statetx.sets import CellSetSampler

pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

FEWSHOT = ('[training]\ndata = "train"\n[fewshot."data.CT1"]\nval = ["P0"]\n'
           '[zeroshot]\n"data.CT2" = "test"\n')
B, W, STEPS = 2, 2, 3  # sets per rank, ranks, steps (all inside epoch 0's full batches)
NODROP = {**SMALL, "dropout": 0.0}

WORKER = textwrap.dedent('''
    import json, pickle, sys
    from pathlib import Path

    import anndata as ad
    import torch
    import torch.distributed as dist

    sys.path.insert(0, sys.argv[3])
    from test_model import SMALL, small_model

    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    spec = sys.argv[4]
    adata = ad.read_h5ad(data)
    rank = int(__import__("os").environ["RANK"])

    # 1. equivalence run: no dropout, a validation split
    m = small_model(batch_size=%(B)d, max_steps=%(STEPS)d, val_freq=%(STEPS)d, device="cpu",
                    model_kwargs={**SMALL, "dropout": 0.0})
    m.fit(adata, spec, output_dir=out / "run")
    assert dist.is_initialized() and dist.get_world_size() == 2
    m2 = pickle.loads(pickle.dumps(m))  # un-wrapped: pickles and predicts
    pred = m2.predict_sets(adata.X[:8], "P1")
    torch.save({k: v.clone() for k, v in m.network_.state_dict().items()},
               out / f"weights{rank}.pt")

    # 2. resume with dropout: per-rank RNG streams restored from the checkpoint
    kw = dict(batch_size=%(B)d, max_steps=4, val_freq=2, ckpt_every_n_steps=2, device="cpu",
              model_kwargs={**SMALL, "dropout": 0.3})
    full = small_model(**kw).fit(adata, spec, output_dir=out / "full")
    small_model(**{**kw, "max_steps": 2}).fit(adata, spec, output_dir=out / "part")
    part = small_model(**kw).fit(adata, spec, output_dir=out / "part",
                                 resume_from=out / "part" / "checkpoints" / "last.ckpt")
    wf, wp = full.network_.state_dict(), part.network_.state_dict()
    res = {
        "history": m.history_.to_dict("list"),
        "resume_equal": all(torch.equal(wf[k], wp[k]) for k in wf),
        "pred_shape": list(pred.shape),
        "requires_grad": all(p.requires_grad for p in m.network_.parameters()),
    }
    torch.save({k: v.clone() for k, v in wf.items()}, out / f"dropout{rank}.pt")

    # 3. ranks given different settings: refused on every rank before training (a rank that
    # stopped earlier would leave the other waiting at a collective forever)
    try:
        small_model(batch_size=%(B)d, max_steps=3 + rank, device="cpu").fit(adata, spec)
        res["mismatch"] = ""
    except Exception as exc:
        res["mismatch"] = f"{type(exc).__name__}: {exc}"
    # 4. ranks given different data (rank 1's values scaled): refused on every rank too
    other = adata.copy()
    if rank == 1:
        other.X = other.X * 3
    try:
        small_model(batch_size=%(B)d, max_steps=2, device="cpu").fit(other, spec)
        res["data_mismatch"] = ""
    except Exception as exc:
        res["data_mismatch"] = f"{type(exc).__name__}: {exc}"
    # 5. an output_dir only rank 0 checks (a folder of other files): every rank raises
    foreign = out / "foreign"
    foreign.mkdir(exist_ok=True)
    (foreign / "notes.txt").write_text("mine")
    try:
        small_model(batch_size=%(B)d, max_steps=2, device="cpu").fit(adata, spec,
                                                                     output_dir=foreign)
        res["foreign"] = ""
    except Exception as exc:
        res["foreign"] = f"{type(exc).__name__}: {exc}"
    (out / f"result{rank}.json").write_text(json.dumps(res, default=float))
''') % {"B": B, "STEPS": STEPS}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sampler(adata, batch_size: int, rank: int = 0, world_size: int = 1) -> CellSetSampler:
    cols = ColumnMap.build(pert_col="gene", cell_type_key="cell_type", control_pert="ctrl")
    prep = prepare(adata, FEWSHOT, cols)
    return CellSetSampler(prep.splits["train"], prep.vocab, 8, batch_size, seed=0,
                          rank=rank, world_size=world_size)


def test_sharded_batches_union_equals_single_process_batch(synth):
    """Step k on W ranks (B sets each) sees exactly the single process's W·B sets of step k."""
    single = list(_sampler(synth, W * B).batches(0))
    ranks = [list(_sampler(synth, B, r, W).batches(0)) for r in range(W)]
    n_full = sum(b.target.shape[0] == W * B for b in single)
    assert n_full >= STEPS
    for k in range(n_full):
        union = np.concatenate([ranks[r][k].target_rows for r in range(W)])
        ref = single[k].target_rows
        assert sorted(map(tuple, union)) == sorted(map(tuple, ref))
        # rank r holds every W-th set of the single-process batch, basal controls included
        for r in range(W):
            np.testing.assert_array_equal(ranks[r][k].target_rows, ref[r::W])
            np.testing.assert_array_equal(ranks[r][k].basal_rows, single[k].basal_rows[r::W])
    # every rank knows the epoch's sets over all ranks (a warning compares them with W)
    one = _sampler(synth, W * B)
    total = sum(b.target.shape[0] for b in one.batches(0))
    assert one.total_sets == total == _sampler(synth, B, 1, W).total_sets


def test_single_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("cpu") is None and world() == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed("cpu") is None
    assert rank_seed(42, 1) != rank_seed(42, 2) and 0 <= rank_seed(42, 1) < 2**63


def test_torchrun_two_ranks_match_one_process_with_double_batch(synth, tmp_path):
    data = tmp_path / "synth.h5ad"
    synth.write_h5ad(data)
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONWARNINGS": "ignore"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={W}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           str(tmp_path / "worker.py"), str(data), str(tmp_path),
           str(Path(__file__).parent), FEWSHOT]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:  # a hang: end torchrun and both workers (its session)
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail("torchrun timed out after 240 s:\n" + out[-2000:] + err[-2000:])
    assert proc.returncode == 0, out[-3000:] + err[-3000:]

    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(W)]
    w = [torch.load(tmp_path / f"weights{r}.pt") for r in range(W)]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])  # ranks stay in sync
    ref = small_model(batch_size=W * B, max_steps=STEPS, val_freq=STEPS, device="cpu",
                      model_kwargs=NODROP).fit(synth, FEWSHOT)
    # (a) the same steps in one process as gradient accumulation over W micro-batches of B sets
    # (same gradient up to summation order): every weight agrees to 1e-5
    kw = dict(max_steps=STEPS, val_freq=STEPS, device="cpu", model_kwargs=NODROP)
    acc = small_model(batch_size=B, gradient_accumulation_steps=W, **kw).fit(synth, FEWSHOT)
    for k, v in acc.network_.state_dict().items():
        torch.testing.assert_close(w[0][k], v, atol=1e-5, rtol=1e-4)
    # (b) one process with batch_size W·B: Adam normalises each update, so a few elements whose
    # gradient is cancellation noise (|g| ~ eps) may differ by up to lr per step; the bulk agrees
    # to float precision (single-process accumulation vs the big batch shows the same pattern)
    ref = small_model(batch_size=W * B, **kw).fit(synth, FEWSHOT)
    ref_w = ref.network_.state_dict()
    diff = torch.cat([(w[0][k] - v).abs().flatten() for k, v in ref_w.items()])
    assert diff.mean() < 1e-6 and (diff > 1e-5).float().mean() < 5e-3, diff.mean()
    assert diff.max() <= STEPS * 1e-4 * 1.01
    # ... while training on the per-rank batch alone differs far beyond that
    alone = small_model(batch_size=B, **kw).fit(synth, FEWSHOT).network_.state_dict()
    other = torch.cat([(alone[k] - v).abs().flatten() for k, v in ref_w.items()])
    assert other.mean() > 20 * diff.mean() and (other > 1e-5).float().mean() > 0.05
    hist = results[0]["history"]
    ref_val = ref.history_["val_loss"].dropna().iloc[-1]
    val = [v for v in hist["val_loss"] if v == v][-1]
    assert val == pytest.approx(ref_val, rel=1e-4, abs=1e-5)
    assert results[1]["history"]["val_loss"] == hist["val_loss"]  # same decision on each rank
    ref_loss = ref.history_["train_loss"].dropna().iloc[-1]
    assert [v for v in hist["train_loss"] if v == v][-1] == pytest.approx(ref_loss, rel=1e-4)

    # exact resume on every rank (dropout on: per-rank RNG streams come from the checkpoint)
    assert all(r["resume_equal"] for r in results)
    d = [torch.load(tmp_path / f"dropout{r}.pt") for r in range(W)]
    assert all(torch.equal(d[0][k], d[1][k]) for k in d[0])
    assert results[0]["pred_shape"] == [8, synth.n_vars] and results[0]["requires_grad"]
    for r in results:
        assert r["mismatch"].startswith("ConfigError: the data-parallel ranks differ from rank "
                                        "0: settings on rank(s) 1: {'max_steps': 4} (rank 0: "
                                        "{'max_steps': 3})"), r["mismatch"]
        assert "training data on rank(s) 1: the expression values" in r["data_mismatch"], (
            r["data_mismatch"])
        assert "holds files that are not a statetx run" in r["foreign"], r["foreign"]

    # rank 0 alone wrote the run: one metrics file with each step logged once
    run = tmp_path / "run"
    assert (run / "checkpoints" / "final.ckpt").is_file() and (run / "vocab.json").is_file()
    rows = pd.read_csv(run / "metrics.csv")
    assert rows["val_loss"].notna().sum() == 1 and rows["step"].is_monotonic_increasing
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(ckpt["rng"]["ranks"]) == W


def _torchrun_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONWARNINGS": "ignore"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={W}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "statetx", *args]
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail("torchrun timed out after 240 s:\n" + out[-2000:] + err[-2000:])
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_torchrun_command_line_run_folder_is_rank_0s(synth, tmp_path):
    """tx train under torchrun: rank 0 alone prepares, replaces and records the run folder; a
    failed overwrite=true puts the earlier run back (no hidden copies left behind)."""
    from test_model import TINY_CLI

    from statetx.cli import main

    synth.write_h5ad(tmp_path / "data.h5ad")
    (tmp_path / "split.toml").write_text(f'[datasets]\ndata = "{tmp_path / "data.h5ad"}"\n'
                                         + FEWSHOT)
    args = ["tx", "train", f"data.kwargs.toml_config_path={tmp_path / 'split.toml'}",
            "data.kwargs.pert_col=gene", *TINY_CLI, "training.max_steps=2",
            f"output_dir={tmp_path / 'out'}", "name=r"]
    assert main(args) == 0
    run = tmp_path / "out" / "r"
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    failed = _torchrun_cli([*args, "overwrite=true", "model.kwargs.cell_set_len=1000",
                            "data.kwargs.drop_last=true"], tmp_path)
    assert failed.returncode != 0 and "yields no" in failed.stderr, failed.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["r"]  # nothing hidden left
    done = _torchrun_cli([*args, "overwrite=true", "training.max_steps=3"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[:3000]
    assert done.stdout.count("training done") == 1 and done.stdout.count("run directory") == 1
    assert "data parallel over 2 processes: 2 x batch_size 4 = 8 sets per step" in done.stdout
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["r"]
    info = json.loads((run / "statetx_run.json").read_text())
    assert info["final_step"] == 3
    # streaming under torchrun: the ranks split the streamed epoch and step together
    stream = _torchrun_cli([*args, "name=s", "training.max_steps=4",
                            "data.kwargs.data_loading=stream",
                            "data.kwargs.stream_chunk_size=8"], tmp_path)
    assert stream.returncode == 0, stream.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "s" / "statetx_run.json").read_text()
                      )["final_step"] == 4
    # a NaN that only the last rank's share of the streamed cells holds: every rank raises it
    # (not rank 0 a broken connection), and no run folder is left
    bad = synth.copy()
    last = np.flatnonzero((bad.obs["cell_type"] == "CT0").to_numpy())[-1]
    bad.X[last, 0] = np.nan
    bad.write_h5ad(tmp_path / "bad.h5ad")
    (tmp_path / "bad.toml").write_text(f'[datasets]\ndata = "{tmp_path / "bad.h5ad"}"\n'
                                       + FEWSHOT)
    nan = _torchrun_cli([*args[:2], f"data.kwargs.toml_config_path={tmp_path / 'bad.toml'}",
                         *args[3:-1], "name=nan", "data.kwargs.data_loading=stream",
                         "data.kwargs.stream_chunk_size=8"], tmp_path)
    assert nan.returncode != 0
    assert nan.stderr.count("NaN or Inf") == W, nan.stderr[-3000:]
    assert nan.stderr.count("statetx: error:") == 1 and "statetx [rank 1]: error:" in nan.stderr
    assert "Connection closed" not in nan.stderr
    assert not (tmp_path / "out" / "nan").exists()
