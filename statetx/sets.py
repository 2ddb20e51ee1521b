"""Cell sets ("cell sentences"), control pairing and batches.

A cell set is ``S`` cells of one (context, perturbation) group — context = (file, cell type), plus
batch with ``pairing="batch"`` — each paired with a *basal* control cell drawn from the control
pool of its context. Every epoch ``e`` re-shuffles cells within groups, re-chunks them into sets,
pads short sets by drawing from the whole group (or from the short chunk, ``pad_from``), shuffles
the set order and draws basal cells, all from one generator seeded with ``(seed, e)``. A batch
therefore depends only on ``(seed, epoch, position)``: not on worker count, process, or rank.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Protocol

import numpy as np
import torch

from statetx.data import SplitData
from statetx.errors import ConfigError, DataError
from statetx.vocab import Vocab

PAIRINGS = ("random", "batch")
PAD_FROM = ("group", "chunk")


def check_sampler_options(pairing: str, cell_set_len: int, batch_size: int,
                          downsample_cells: int | None = None, pad_from: str = "group") -> None:
    """ConfigError for an unknown pairing or ``pad_from``, a non-positive set length or batch
    size, or a ``downsample_cells`` below 1."""
    if pairing not in PAIRINGS:
        raise ConfigError(f"basal_mapping_strategy={pairing!r} is invalid; expected 'random' "
                          "or 'batch'.")
    if pad_from not in PAD_FROM:
        raise ConfigError(f"pad_from={pad_from!r} is invalid; expected 'group' (pad a short set "
                          "with cells of its whole group) or 'chunk' (with its own cells, as "
                          "the reference).")
    if cell_set_len < 1 or batch_size < 1:
        raise ConfigError(f"cell_set_len ({cell_set_len}) and batch_size ({batch_size}) must "
                          "be positive integers.")
    if downsample_cells is not None and (isinstance(downsample_cells, bool)
                                         or int(downsample_cells) != downsample_cells
                                         or downsample_cells < 1):
        raise ConfigError(f"downsample_cells={downsample_cells!r} must be a positive integer "
                          "(cells kept per group) or None (all cells).")


def cap_group_cells(group: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """Boolean mask keeping at most ``cap`` entries of each distinct value of ``group``: a
    random subset drawn once from ``seed`` (option ``downsample_cells``; None keeps all)."""
    keep = np.ones(len(group), dtype=bool)
    if cap is None or len(group) == 0:
        return keep
    priority = np.random.default_rng([int(seed), 0, 11]).random(len(group))
    order = np.lexsort((priority, group))
    sorted_group = group[order]
    starts = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
    rank = np.arange(len(group)) - np.repeat(starts, np.diff(np.r_[starts, len(group)]))
    keep[order[rank >= int(cap)]] = False
    return keep


def check_read_depth(downsample: float | None) -> float | None:
    """The read-depth option normalised: None (also for 1.0) = off, a rate in (0, 1) or a
    target depth > 1; ConfigError otherwise."""
    if downsample is None:
        return None
    if isinstance(downsample, (bool, np.bool_)) or not isinstance(
            downsample, numbers.Real) or not (np.isfinite(downsample) and downsample > 0):
        raise ConfigError(f"downsample={downsample!r} must be a number > 0: a rate below 1 (keep "
                          "each count with that probability), a target depth per cell above 1, "
                          "or None / 1.0 (off).")
    return None if float(downsample) == 1.0 else float(downsample)


@dataclass(frozen=True)
class ReadDepthThinning:
    """Read-depth downsampling of the expression rows a batch reads from X (option
    ``downsample``, the reference's arithmetic): counts (``expm1`` and rounded when ``log1p``)
    are thinned binomially with probability ``rate`` (< 1), or ``min(1, rate / depth)`` per cell
    (``rate`` > 1: a target depth), then ``log1p`` again. A fresh draw every time a cell is read,
    from a generator seeded by (seed, epoch, batch number)."""

    rate: float
    log1p: bool
    fields: tuple[str, ...]  # the CellSetBatch tensors read from X

    def thin(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        counts = (torch.expm1(x) if self.log1p else x).round().clamp_min(0.0)
        if self.rate < 1:
            p = torch.full_like(counts, self.rate)
        else:
            depth = counts.sum(-1, keepdim=True).clamp_min(1.0)
            p = (self.rate / depth).clamp(max=1.0).expand_as(counts).contiguous()
        out = torch.binomial(counts, p, generator=generator)
        return torch.log1p(out) if self.log1p else out

    def apply(self, batch: CellSetBatch, seed: int, epoch: int, number: int,
              rank: int = 0) -> CellSetBatch:
        """``batch`` with its X-read tensors thinned (batch ``number`` of ``epoch`` on
        distributed ``rank``)."""
        key = np.random.SeedSequence([int(seed), int(epoch), int(number), int(rank),
                                      11]).generate_state(1)
        g = torch.Generator(device=batch.target.device).manual_seed(int(key[0]))
        new = {f: self.thin(getattr(batch, f), g) for f in self.fields
               if getattr(batch, f) is not None}
        return replace(batch, **new)


def pert_table(vocab: Vocab) -> torch.Tensor | None:
    """The vocabulary's feature table as a float32 tensor, None for one-hot perturbations (see
    :func:`pert_inputs`)."""
    feats = vocab.pert_features
    return None if feats is None else torch.from_numpy(np.asarray(feats, dtype=np.float32))


def pert_inputs(table: torch.Tensor | None, codes: torch.Tensor) -> torch.Tensor:
    """The network's per-set perturbation input for codes ``[B]`` (-1 = no perturbation): the
    codes themselves for one-hot perturbations (the network looks their columns up, no P x P
    identity), else the rows of the feature ``table`` ``[B, P]`` (zeros for -1)."""
    if table is None:
        return codes
    rows = table.index_select(0, codes.clamp(min=0))
    return rows.masked_fill((codes < 0).unsqueeze(-1), 0.0)


def cut_group(rng: np.random.Generator, cells: np.ndarray, S: int, drop_last: bool,
              pad_from: str) -> np.ndarray:
    """One group's cells shuffled and cut into ``[n, S]`` sets. A short last set is dropped
    (``drop_last``) or padded with cells drawn again from the group (``pad_from="group"``) or
    from the short set itself (``"chunk"``)."""
    perm = rng.permutation(cells)
    n_full = len(perm) // S
    sets = [perm[: n_full * S].reshape(n_full, S)]
    rest = perm[n_full * S:]
    if len(rest) and not drop_last:
        pad = rng.choice(cells if pad_from == "group" else rest, size=S - len(rest), replace=True)
        sets.append(np.concatenate([rest, pad])[None])
    return np.concatenate(sets)


@dataclass
class CellSetBatch:
    """One training batch of ``B`` sets of ``S`` cells; tensors are ``[B, S, ·]`` (``pert`` one
    per set)."""

    basal: torch.Tensor            # [B,S,D] paired control cells (model input)
    target: torch.Tensor           # [B,S,D] real cells of the group (loss target)
    pert: torch.Tensor             # per set: [B] one-hot positions or [B,P] feature vectors
    pert_index: torch.Tensor       # [B,S] int64
    batch_index: torch.Tensor      # [B,S] int64
    cell_type_index: torch.Tensor  # [B,S] int64
    counts: torch.Tensor | None    # [B,S,G] gene-space target (gene decoder), optional
    target_rows: np.ndarray        # [B,S] row indices into the split's arrays
    basal_rows: np.ndarray         # [B,S]
    pert_name: list[str]           # per set
    cell_type: list[str]           # per set
    dataset_name: list[str]        # per set: its [datasets] name
    # the split's obs names, shared (not copied, not per set): indexed by the rows on demand
    barcodes: np.ndarray = field(metadata={"shared": True})

    @property
    def target_barcode(self) -> np.ndarray:
        """``[B, S]`` obs names of the target cells."""
        return self.barcodes[self.target_rows]

    @property
    def basal_barcode(self) -> np.ndarray:
        """``[B, S]`` obs names of their basal cells."""
        return self.barcodes[self.basal_rows]

    @property
    def n_cells(self) -> int:
        return int(self.target.shape[0] * self.target.shape[1])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CellSetBatch:
        """Move every tensor to ``device``."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(
                v, torch.Tensor) else v
        return CellSetBatch(**moved)

    def _pert_vectors(self, n_perts: int) -> torch.Tensor:
        """``pert`` as the reference's per-cell vectors ``[B, S, P]``."""
        vec = self.pert if self.pert.dtype.is_floating_point else torch.nn.functional.one_hot(
            self.pert, n_perts).float()
        return vec[:, None, :].expand(-1, self.pert_index.shape[1], -1)

    def to_reference_dict(self, vocab: Vocab) -> dict:
        """The reference's flat layout ([N, ·] rows, one-hot ``batch``), for parity tests."""
        b, s = self.target.shape[:2]
        flat = {
            "pert_cell_emb": self.target.reshape(b * s, -1),
            "ctrl_cell_emb": self.basal.reshape(b * s, -1),
            "pert_emb": self._pert_vectors(len(vocab.perturbations)).reshape(b * s, -1),
            "pert_name": [vocab.perturbations[i] for i in self.pert_index.reshape(-1).tolist()],
            "cell_type": [vocab.cell_types[i] for i in self.cell_type_index.reshape(-1).tolist()],
            "cell_type_onehot": torch.nn.functional.one_hot(
                self.cell_type_index.reshape(-1), len(vocab.cell_types)).float(),
            "batch": torch.nn.functional.one_hot(self.batch_index.reshape(-1),
                                                 max(1, len(vocab.batches))).float(),
            "batch_name": [vocab.batches[i] for i in self.batch_index.reshape(-1).tolist()],
        }
        flat["dataset_name"] = [n for n in self.dataset_name for _ in range(s)]
        flat["pert_cell_barcode"] = self.target_barcode.reshape(-1).tolist()
        flat["ctrl_cell_barcode"] = self.basal_barcode.reshape(-1).tolist()
        if self.counts is not None:
            flat["pert_cell_counts"] = self.counts.reshape(b * s, -1)
        return flat


class BatchSource(Protocol):
    """What :class:`statetx.train.Trainer` reads from a sampler (:class:`CellSetSampler`, or
    :class:`statetx.stream.StreamingCellSetSampler`): batches of ``B`` sets of ``S`` cells."""

    B: int
    S: int

    def __len__(self) -> int: ...

    def batches(self, epoch: int, start: int = 0) -> Iterator[CellSetBatch]: ...

    @property
    def nbytes(self) -> int: ...  # the cells it would move to the accelerator

    def to(self, device: torch.device | str) -> BatchSource: ...


class CellSetSampler:
    """Deterministic, epoch-reshuffled cell-set batches over one split.

    Parameters
    ----------
    data
        The split's arrays (:class:`statetx.data.SplitData`).
    vocab
        Vocabulary (its feature table, if any, gives the ``pert`` vectors; else one-hot codes).
    cell_set_len, batch_size
        ``S`` cells per set and ``B`` sets per batch.
    seed
        Seeds every random choice together with the epoch number.
    pairing
        ``"random"``: basal controls from the same (file, cell type); ``"batch"``: also the same
        batch, falling back to the cell type when that batch has no controls (sets are then
        grouped by batch too).
    drop_last
        Drop sets shorter than ``S`` (instead of padding) and an incomplete last batch.
    exclude_self
        Never pair a control target with itself (when its pool has another cell).
    downsample_cells
        Use at most this many cells of each group (a seeded random subset, the same in every
        epoch; the control pools keep all their cells). None = all.
    pad_from
        Pad a short set with cells drawn from its whole group (``"group"``, default) or from
        the short set's own cells (``"chunk"``, the reference's padding).
    thinning
        Read-depth downsampling of every batch (:class:`ReadDepthThinning`), or None.
    rank, world_size
        Shard the sets of each epoch across distributed ranks without overlap.
    fixed_pairs
        One basal control per target cell for the whole run (drawn once, without replacement
        within the group's pool; a pool smaller than its group is an error) instead of fresh
        draws every epoch (reference ``cache_perturbation_control_pairs``).
    """

    def __init__(self, data: SplitData, vocab: Vocab, cell_set_len: int, batch_size: int, *,
                 seed: int = 42, pairing: str = "random", drop_last: bool = False,
                 exclude_self: bool = False, downsample_cells: int | None = None,
                 pad_from: str = "group", thinning: ReadDepthThinning | None = None,
                 rank: int = 0, world_size: int = 1, fixed_pairs: bool = False) -> None:
        check_sampler_options(pairing, cell_set_len, batch_size, downsample_cells, pad_from)
        self.data, self.vocab = data, vocab
        self.S, self.B, self.seed = int(cell_set_len), int(batch_size), int(seed)
        self.pairing, self.drop_last, self.exclude_self = pairing, drop_last, exclude_self
        self.downsample_cells, self.pad_from, self.thinning = downsample_cells, pad_from, thinning
        self.rank, self.world_size = rank, world_size
        self.pert_table = pert_table(vocab)
        self.groups, self.group_pool = self._groups()
        self.pools = self._pools()
        self.fixed_basal = self._fixed_pairs() if fixed_pairs else None
        self.device = torch.device("cpu")
        self._X, self._counts = data.X, data.counts

    def to(self, device: torch.device | str) -> CellSetSampler:
        """Keep the split's matrices on ``device`` and gather batches there (no per-step host
        copy of the cells; only the ``[B, S]`` row indices travel). Returns ``self``."""
        self.device = torch.device(device)
        d = self.data
        self._X = d.X.to(self.device)
        self._counts = None if d.counts is None else d.counts.to(self.device)
        if self.pert_table is not None:
            self.pert_table = self.pert_table.to(self.device)
        return self

    @property
    def nbytes(self) -> int:
        """Bytes of the split's cell matrices (what :meth:`to` moves)."""
        d = self.data
        return sum(t.numel() * t.element_size() for t in (d.X, d.counts) if t is not None)

    # ------------------------------------------------------------------ structure
    def _groups(self) -> tuple[list[np.ndarray], np.ndarray]:
        d = self.data
        rows = np.flatnonzero(d.is_target)
        keys = [d.context[rows], d.pert[rows]]
        if self.pairing == "batch":
            keys.insert(1, d.batch[rows])
        order = np.lexsort(keys[::-1])
        stacked = np.stack([k[order] for k in keys], axis=1)
        cut = np.flatnonzero((np.diff(stacked, axis=0) != 0).any(axis=1)) + 1
        groups = np.split(rows[order], cut)
        if self.downsample_cells is not None:  # drawn in row order, as the streaming sampler
            gid = np.empty(len(d.is_target), dtype=np.int64)
            gid[np.concatenate(groups)] = np.repeat(np.arange(len(groups)), np.diff(
                np.r_[0, cut, len(rows)]))
            keep = np.zeros(len(gid), dtype=bool)
            keep[rows] = cap_group_cells(gid[rows], self.downsample_cells, self.seed)
            groups = [g[keep[g]] for g in groups]
        first = np.array([g[0] for g in groups], dtype=np.int64)
        pool_key = d.context[first] if self.pairing == "random" else (
            d.context[first] * (len(self.vocab.batches) + 1) + d.batch[first])
        return groups, pool_key

    def _pools(self) -> dict[int, np.ndarray]:
        d = self.data
        ctrl = np.flatnonzero(d.is_control)
        by_ctx = {int(c): ctrl[d.context[ctrl] == c] for c in np.unique(d.context[ctrl])}
        pools: dict[int, np.ndarray] = {}
        for g, key in zip(self.groups, self.group_pool):
            key = int(key)
            if key in pools:
                continue
            ctx = int(d.context[g[0]])
            pool = by_ctx.get(ctx, np.empty(0, dtype=np.int64))
            if self.pairing == "batch":
                same = pool[d.batch[pool] == d.batch[g[0]]]
                pool = same if len(same) else pool
            if len(pool) == 0:
                ct = self.vocab.cell_types[int(d.cell_type[g[0]])]
                raise DataError(f"cell type '{ct}' (split {d.name}) has perturbed cells but no "
                                "control cells, so basal cells cannot be drawn.")
            pools[key] = pool
        return pools

    def _fixed_pairs(self) -> np.ndarray:
        """Row -> its control for the run: each group's cells get distinct controls of its
        pool, drawn once (seeded)."""
        d = self.data
        rng = np.random.default_rng([self.seed, 11])
        fixed = np.full(len(d.is_target), -1, dtype=np.int64)
        for g, key in zip(self.groups, self.group_pool):
            pool = self.pools[int(key)]
            if len(pool) < len(g):
                v = self.vocab
                raise DataError(
                    f"cache_control_pairs: the group of perturbation "
                    f"'{v.perturbations[int(d.pert[g[0]])]}' in cell type "
                    f"'{v.cell_types[int(d.cell_type[g[0]])]}' (split {d.name}) has {len(g)} "
                    f"cells but its control pool only {len(pool)}: pairs without replacement "
                    f"need as many controls. Pass downsample_cells={len(pool)} (or less), or "
                    "leave cache_control_pairs off.")
            fixed[g] = rng.choice(pool, size=len(g), replace=False)
            for _ in range(100 if self.exclude_self and len(pool) > 1 else 0):
                if not (fixed[g] == g).any():  # (exclude_self: no control paired with itself)
                    break
                fixed[g] = rng.choice(pool, size=len(g), replace=False)
        return fixed

    @property
    def total_sets(self) -> int:
        """Sets per epoch over all ranks."""
        sizes = np.array([len(g) for g in self.groups])
        return int(((sizes // self.S) if self.drop_last else -(-sizes // self.S)).sum())

    def _n_sets(self) -> int:
        total = self.total_sets
        return -(-total // self.world_size) if self.world_size > 1 else total

    def padding_fraction(self) -> float:
        """Share of an epoch's set positions filled by drawing a short group's cells again."""
        if self.drop_last:  # (short sets are dropped, not padded)
            return 0.0
        sizes = np.array([len(g) for g in self.groups])
        positions = int((-(-sizes // self.S)).sum()) * self.S
        return 1 - int(sizes.sum()) / positions if positions else 0.0

    def __len__(self) -> int:
        """Batches per epoch (per rank)."""
        n = self._n_sets()
        return n // self.B if self.drop_last else -(-n // self.B)

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    # ------------------------------------------------------------------ sampling
    def epoch_sets(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(target_rows, basal_rows)``, each ``[n_sets, S]``, for this rank in epoch order."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        S = self.S
        sets, pool_keys = [], []
        for g, key in zip(self.groups, self.group_pool):
            cut = cut_group(rng, g, S, self.drop_last, self.pad_from)
            sets.append(cut)
            pool_keys += [key] * len(cut)
        targets = np.concatenate(sets)
        if not len(targets):
            raise DataError(f"the {self.data.name} split yields no cell set of {S} cells "
                            "(drop_last=True and every group is smaller)."
                            + (f" Raise downsample_cells (now {self.downsample_cells} cells "
                               "per group)." if self.downsample_cells is not None else ""))
        pool_keys = np.asarray(pool_keys)
        basal = np.empty_like(targets)
        if self.fixed_basal is not None:  # (the run's pairs: no draws)
            basal[:] = self.fixed_basal[targets]
        for key in np.unique(pool_keys) if self.fixed_basal is None else ():
            sel = np.flatnonzero(pool_keys == key)
            pool = self.pools[int(key)]
            basal[sel] = pool[rng.integers(len(pool), size=(len(sel), S))]
            if self.exclude_self and len(pool) > 1:
                self._redraw_self(rng, targets, basal, sel, pool)
        order = rng.permutation(len(targets))
        targets, basal = targets[order], basal[order]
        if self.world_size > 1:
            n = self._n_sets() * self.world_size
            idx = np.resize(np.arange(len(targets)), n)[self.rank::self.world_size]
            targets, basal = targets[idx], basal[idx]
        return targets, basal

    @staticmethod
    def _redraw_self(rng, targets, basal, sel, pool) -> None:
        for _ in range(100):
            same = basal[sel] == targets[sel]
            if not same.any():
                return
            sub = basal[sel]
            sub[same] = pool[rng.integers(len(pool), size=int(same.sum()))]
            basal[sel] = sub

    def batches(self, epoch: int, start: int = 0) -> Iterator[CellSetBatch]:
        """Yield the batches of ``epoch`` from batch number ``start`` on (for exact resume)."""
        targets, basal = self.epoch_sets(epoch)
        n = len(self) * self.B if self.drop_last else len(targets)
        dev = None
        if self.device.type != "cpu":  # the epoch's indices travel once, not once per step
            d = self.data
            rows = np.stack([targets, basal, d.pert[targets], d.batch[targets],
                             d.cell_type[targets]], axis=1)  # [n_sets, 5, S]
            dev = torch.from_numpy(rows).to(self.device)
        for lo in range(start * self.B, n, self.B):
            batch = self.make_batch(targets[lo:lo + self.B], basal[lo:lo + self.B],
                                    None if dev is None else dev[lo:lo + self.B])
            if self.thinning is not None:
                batch = self.thinning.apply(batch, self.seed, epoch, lo // self.B, self.rank)
            yield batch

    def make_batch(self, target_rows: np.ndarray, basal_rows: np.ndarray,
                   device_rows: torch.Tensor | None = None) -> CellSetBatch:
        """Gather the arrays of the given ``[B, S]`` row indices into a batch.

        ``device_rows`` ``[B, 5, S]``: the same indices (targets, basal, perturbation, batch, cell
        type) already on the sampler's device (see :meth:`batches`)."""
        d = self.data
        b, s = target_rows.shape
        if device_rows is None:
            ints = torch.from_numpy(np.stack([target_rows, basal_rows, d.pert[target_rows],
                                              d.batch[target_rows], d.cell_type[target_rows]]))
            ints = ints.to(self.device)
        else:
            ints = device_rows.transpose(0, 1)
        t_idx, c_idx = ints[0].reshape(-1), ints[1].reshape(-1)
        pert_index = ints[2]
        first = target_rows[:, 0]
        return CellSetBatch(
            basal=self._X.index_select(0, c_idx).view(b, s, -1).float(),
            target=self._X.index_select(0, t_idx).view(b, s, -1).float(),
            pert=pert_inputs(self.pert_table, pert_index[:, 0]),
            pert_index=pert_index,
            batch_index=ints[3],
            cell_type_index=ints[4],
            counts=None if self._counts is None else self._counts.index_select(0, t_idx).view(
                b, s, -1).float(),
            target_rows=target_rows,
            basal_rows=basal_rows,
            pert_name=[self.vocab.perturbations[i] for i in d.pert[first]],
            cell_type=[self.vocab.cell_types[i] for i in d.cell_type[first]],
            dataset_name=[d.datasets[i] for i in d.file_index[first]],
            barcodes=d.barcodes,
        )
