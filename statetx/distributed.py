"""Data-parallel training over several processes (``torchrun``, one or many nodes) with DDP.

Launch the same script on every process; ``StateTransitionModel.fit`` does the rest::

    torchrun --nproc_per_node=4 train.py                        # one node, 4 GPUs (or CPU procs)
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 \\
        --master_addr=HOST --master_port=29500 train.py          # two nodes

How it works (see :class:`statetx.train.Trainer` for the loop):

* **Process group.** ``fit`` reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun) and
  initialises the default group (NCCL on CUDA, gloo on CPU) unless one is already initialised, in
  which case it is used as is. A group ``fit`` created stays up for later fits in the process
  (re-creating the default group under torchrun can hang on stale rendezvous keys) and is
  destroyed at interpreter exit.
  Without these variables (or with a world size of 1) nothing here runs: the single-process path
  has no distributed code in it.
* **Device.** ``device="auto"``/``"cuda"`` → ``cuda:LOCAL_RANK`` (modulo the node's GPU count;
  an explicit ``"cuda:N"`` is kept); ``"cpu"`` → CPU with gloo.
* **Data.** Every rank loads the data; the training sets of each epoch are sharded across ranks
  without overlap (``CellSetSampler(rank=, world_size=)``): batch ``k`` of rank ``r`` holds sets
  ``k·B·W + r, k·B·W + r + W, …`` of the single-process order, so one step on ``W`` ranks with
  ``batch_size=B`` sees the same ``W·B`` sets as one process with ``batch_size=W·B`` (except at an
  epoch's end, where the last sets are padded by wrapping round). ``batch_size`` is per rank.
* **Initialisation and randomness.** The network is built with the same seed on every rank (and DDP
  broadcasts rank 0's weights). Dropout draws from a per-rank stream: rank 0 uses ``seed`` like a
  single process, rank ``r > 0`` a stream seeded from ``(seed, r)``.
* **Gradients** are averaged by DDP (bucketed all-reduce overlapped with backward, skipped on all
  but the last micro-batch of gradient accumulation). Parameters that the loss never reaches are
  frozen while DDP runs, so there is no ``find_unused_parameters`` overhead.
* **Validation.** Each rank evaluates every ``W``-th validation batch (the validation sampler is
  not sharded); per-set loss sums and counts are all-reduced, so ``val_loss`` equals the
  single-process value and every rank takes the same best-checkpoint / early-stopping decision.
  Logged training losses are the mean over ranks; ``cells_per_s`` is the global rate.
* **Checkpoints, metrics, progress bar, run files**: rank 0 only. A checkpoint holds rank 0's RNG
  state as usual plus every rank's (``rng["ranks"]``), gathered when it is written.
* **Resume.** Every rank loads the same checkpoint (on multi-node runs it must be on a shared file
  system) and restores its own RNG state; with a different world size ranks ``r > 0`` reseed from
  ``(seed, r, step)``.
* **After fit** the network is the plain module again (DDP only wrapped it during training), so the
  estimator pickles, saves and predicts as before.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from statetx.errors import ConfigError

__all__ = ["DistInfo", "all_gather_objects", "all_reduce_sum", "barrier", "env_local_rank",
           "init_distributed", "rank_seed", "resolve_device", "world"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a multi-process run."""

    rank: int
    world_size: int
    device: torch.device


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer.") from exc


def env_local_rank() -> int | None:
    """This process's ``LOCAL_RANK`` when torchrun started several, else None."""
    if _env_world_size() > 1 and "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return None


def resolve_device(device: str | torch.device, local_rank: int | None = None) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU. A GPU without an index is ``cuda:LOCAL_RANK``
    (modulo the node's GPU count) under torchrun (``local_rank``), else the current one."""
    if isinstance(device, torch.dtype):
        raise ConfigError(f"{device} is a dtype, not a device: statetx models keep float32 "
                          "weights (predict(matmul_precision=...) lowers the product precision).")
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device={device!r} is not a device; use 'auto', 'cpu', 'cuda' or "
                          "'cuda:N'.") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} was requested but CUDA is not available; use "
                          "device='cpu' or 'auto'.")
    if dev.type == "cuda" and dev.index is None and local_rank is not None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())  # one GPU per process
    return dev


def init_distributed(device: str | torch.device = "auto") -> DistInfo | None:
    """Join (or create) the default process group; ``None`` when running as one process.

    Uses an already-initialised group as is; otherwise initialises one from the torchrun
    environment (``env://``: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) with NCCL
    for CUDA devices and gloo for the CPU.
    """
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised and _env_world_size() <= 1:
        return None
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed.")
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if not initialised:
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} "
                              "is not set: launch with torchrun (or set the env:// variables).")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
        atexit.register(_destroy)
        owns = True
    rank, size = dist.get_rank(), dist.get_world_size()
    if size <= 1:
        if owns:
            dist.destroy_process_group()
        return None
    if dev.type == "cpu" and dist.get_backend() == "nccl":
        raise ConfigError("the initialised process group uses NCCL, which needs CUDA tensors, "
                          "but device='cpu'; use device='cuda'/'auto' or a gloo group.")
    return DistInfo(rank=rank, world_size=size, device=dev)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from ``seed`` and ``keys`` (e.g. rank, step)."""
    state = np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum of ``t`` over all ranks; returns ``t``."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def raise_together(error: Exception | None) -> None:
    """Data parallel, after a check each rank made of its own share: the error of the first
    rank that found one is raised by every rank (not by one, leaving the others to fail at
    their next collective); one process: ``error`` itself, if any."""
    _, size = world()
    if size > 1:
        error = next((e for e in all_gather_objects(error) if e is not None), None)
    if error is not None:
        raise error


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
