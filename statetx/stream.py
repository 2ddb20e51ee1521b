"""Out-of-core training: the training split stays on disk and is streamed in contiguous chunks.

``data_loading="stream"`` (see :class:`statetx.StateTransitionModel`) replaces the in-memory
training matrix by a :class:`StreamSplit` (obs labels, codes and the file position of every cell,
no expression values) and the in-memory sampler by a :class:`StreamingCellSetSampler`, which has
the interface of :class:`statetx.sets.CellSetSampler` and yields the same
:class:`~statetx.sets.CellSetBatch` fields and dtypes.

How an epoch is streamed
------------------------
* The split's cells are cut into **chunks** of at most ``chunk_size`` consecutive file rows (each
  read with one contiguous slice: a dense block or the CSR ``data``/``indices`` span).
* Epoch ``e`` visits the chunks in an order drawn from ``(seed, e)``, ``buffer_chunks`` at a time:
  one **window** (buffer) of chunks is read into memory, its cells are grouped by the keys the
  in-memory sampler uses (context and perturbation, plus batch with ``pairing="batch"``),
  shuffled, cut into sets of ``S`` cells (a group's last short set is padded by resampling the
  group's cells *in the window*), the window's sets are shuffled and the window is trained on
  while the next one is read on a background thread. At most two windows are held (the current
  one and the next, or the two that a batch at a window boundary spans), plus one chunk while
  reading, and two more while validation evaluates a few training batches: memory ≈ reservoir
  + 4 · ``buffer_chunks`` · ``chunk_size`` rows (input and gene-space target).
* Basal cells are drawn from a **control reservoir** kept in memory for the whole run: every
  control cell of the split, or at most ``max_controls`` per context (a seeded subset fixed for
  the run), pooled exactly as in memory (same context; same batch with ``pairing="batch"``,
  falling back to the context).

Difference from the in-memory sampler: a set is drawn from the cells of one window, not from the
whole group. A group with fewer than ``S`` cells in a window gives one padded set there, so a file
in random cell order needs a window holding well over ``S`` cells per group (raise
``buffer_chunks``), while a file sorted by perturbation (and context) streams with almost no
padding. ``padding_fraction(epoch)`` reports the share of padded set positions. Everything is
drawn from ``(seed, epoch)``, so ``batches(epoch, start)`` resumes exactly (the epoch's plan is
rebuilt from the labels, and only the windows from ``start`` on are read).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import torch

from statetx._utils import preview, say, warn
from statetx.config import SPLITS, ColumnMap, SplitConfig
from statetx.data import (
    DataInput,
    PreparedData,
    SplitData,
    check_training_split,
    input_sources,
    negative_training_input,
    prepare,
    split_labels,
)
from statetx.distributed import raise_together
from statetx.errors import ConfigError, DataError
from statetx.io import DataFile, H5Matrix
from statetx.sets import (
    CellSetBatch,
    CellSetSampler,
    ReadDepthThinning,
    cap_group_cells,
    check_sampler_options,
    cut_group,
    pert_inputs,
    pert_table,
)
from statetx.vocab import Vocab

DATA_LOADINGS = ("memory", "stream")
DEFAULT_CHUNK_SIZE = 4096
DEFAULT_BUFFER_CHUNKS = 16
PADDING_WARN = 0.5  # warn when more of an epoch's set positions are padding
_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class StreamSettings:
    """Validated streaming options (see :func:`stream_settings`)."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    buffer_chunks: int = DEFAULT_BUFFER_CHUNKS
    max_controls: int | None = None


def stream_settings(data_loading: str, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    buffer_chunks: int = DEFAULT_BUFFER_CHUNKS,
                    max_controls: int | None = None) -> StreamSettings | None:
    """Check the estimator's data-loading options; None for ``"memory"``."""
    if data_loading not in DATA_LOADINGS:
        raise ConfigError(f"data_loading={data_loading!r} is invalid; expected 'memory' (the "
                          "training cells are read into memory) or 'stream' (they are read from "
                          "disk in contiguous chunks during training).")
    for name, value, optional in (("stream_chunk_size", chunk_size, False),
                                  ("stream_buffer_chunks", buffer_chunks, False),
                                  ("stream_max_controls", max_controls, True)):
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name}={value!r} is invalid; expected a positive integer"
                              + (" or None." if optional else "."))
    if data_loading == "memory":
        idle = [f"{n}={v!r}" for n, v, d in (
            ("stream_chunk_size", chunk_size, DEFAULT_CHUNK_SIZE),
            ("stream_buffer_chunks", buffer_chunks, DEFAULT_BUFFER_CHUNKS),
            ("stream_max_controls", max_controls, None)) if v != d]
        if idle:
            warn(f"{', '.join(idle)} has no effect with data_loading='memory' (the "
                 "streaming options act with data_loading='stream').", UserWarning)
        return None
    return StreamSettings(int(chunk_size), int(buffer_chunks),
                          None if max_controls is None else int(max_controls))


# ---------------------------------------------------------------------- reading blocks
class BlockReader:
    """Dense blocks of consecutive rows ``[lo, hi)`` of X (``source`` None) or ``obsm[source]``.

    An ``.h5ad`` file is kept open and read with one slice per block (dense dataset, or the
    ``indptr``/``data``/``indices`` spans of a CSR group); an in-memory AnnData is sliced.
    :meth:`check` tests blocks for NaN/Inf (the split's reads and the pre-training pass call it).
    ``max_block_rows`` and ``rows_read`` record what was read.
    """

    def __init__(self, files: list[DataFile], source: str | None, dtype=np.float32,
                 expression: bool | None = None, target: bool = False) -> None:
        self.files, self.source, self.dtype = files, source, dtype
        self.key = "X" if source is None else f"obsm/{source}"
        # negative values matter in expression only (embeddings may well be negative): refused
        # in the model's input, warned about in a gene-space ``target``
        self.expression = source in (None, "X_hvg") if expression is None else expression
        self.target = target
        self._h5: dict[int, tuple[h5py.File, H5Matrix]] = {}
        self.rows_read = 0
        self.max_block_rows = 0
        self._warned_negative = False

    def read(self, fi: int, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``lo``..``hi-1`` of file ``fi`` as a dense ``[hi-lo, width]`` array, written
        into ``out`` (C-contiguous, of the reader's dtype) when given."""
        f = self.files[fi]
        if f.adata is not None:
            block = f.read_rows(np.arange(lo, hi), self.source, self.dtype)
        else:
            block = self._read_h5(fi, lo, hi, out)
        if out is not None and block is not out:
            out[...] = block
            block = out
        self.rows_read += hi - lo
        self.max_block_rows = max(self.max_block_rows, hi - lo)
        return block

    def _read_h5(self, fi: int, lo: int, hi: int, out: np.ndarray | None) -> np.ndarray:
        """The dense block (``out`` itself when it could be filled in place)."""
        if fi not in self._h5:
            path = self.files[fi].path
            h = h5py.File(path, "r")
            try:
                self._h5[fi] = (h, H5Matrix(h, self.key, path))
            except DataError:
                h.close()
                raise
        return self._h5[fi][1].rows(lo, hi, self.dtype, out)

    def check(self, values: np.ndarray, split: StreamSplit, rows: np.ndarray) -> None:
        """NaN/Inf in the dense ``values`` of split ``rows``: an error naming the first such
        cell; negative expression values: an error in the input, one warning per target
        reader."""
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            i = rows[int(np.flatnonzero(bad)[0])]
            f = split.files[int(split.file_index[i])]
            raise DataError(f"{f.label}: cell {split.barcodes[i]} (row {split.file_row[i]}) has "
                            f"NaN or Inf values in {self.key}"
                            + (f" ({int(bad.sum())} such cells among {len(rows)} read together)"
                               if bad.sum() > 1 else "")
                            + ". Remove or repair those cells.")
        if (self.expression and not self._warned_negative and values.size
                and values.min() < 0):
            i = rows[int(np.flatnonzero((values < 0).any(axis=1))[0])]
            label = split.files[int(split.file_index[i])].label
            if not self.target:  # the model's input: refused (predict would refuse it)
                where = "X" if self.source is None else f"obsm['{self.source}']"
                raise negative_training_input(where, float(values.min()),
                                              f"cell {split.barcodes[i]} (row "
                                              f"{split.file_row[i]}) of {label}")
            self._warned_negative = True
            warn(f"{label} has negative values in {self.key}; ST expects non-negative "
                 "log1p expression unless an embedding is used.")

    def close(self) -> None:
        """Close the open files (they reopen on the next read)."""
        for h, _ in self._h5.values():
            h.close()
        self._h5.clear()


# ---------------------------------------------------------------------- the streamed split
@dataclass
class StreamSplit:
    """A split whose expression stays on disk: labels, codes and file positions only.

    Rows are ordered by (file, file row), as :func:`statetx.data.prepare` orders a split, so a
    chunk of consecutive file rows is a run of consecutive split rows. Fields are those of
    :class:`statetx.data.SplitData` without ``X``/``counts`` (accessing them raises), plus
    ``file_row`` and what is needed to read the rows.
    """

    name: str
    pert: np.ndarray
    cell_type: np.ndarray
    batch: np.ndarray
    is_control: np.ndarray
    is_target: np.ndarray
    context: np.ndarray
    file_index: np.ndarray
    file_row: np.ndarray             # [n] int64 row in its file
    barcodes: np.ndarray
    files: list[DataFile]
    source: str | None               # X (None) or the obsm key of the model input
    counts_source: str | None | bool  # gene-space target source; False = none
    dtype: type = np.float32
    chunk_size: int = DEFAULT_CHUNK_SIZE
    # matrices (sources) whose every split row has been read and checked for NaN/Inf
    checked: set[str | None] = dataclasses.field(default_factory=set)

    def __post_init__(self) -> None:
        key = self.file_index * (int(self.file_row.max(initial=0)) // self.chunk_size + 1) \
            + self.file_row // self.chunk_size
        if len(key) > 1 and (np.diff(key) < 0).any():
            raise DataError("internal: streamed split rows are not in file order.")
        starts = np.flatnonzero(np.r_[True, np.diff(key) != 0]) if len(key) else np.zeros(0, int)
        self.chunk_start = starts.astype(np.int64)
        self.chunk_end = np.r_[starts[1:], len(key)].astype(np.int64)

    @property
    def n_obs(self) -> int:
        return len(self.pert)

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_start)

    @property
    def has_counts(self) -> bool:
        return self.counts_source is not False

    @property
    def X(self) -> torch.Tensor:  # noqa: N802 - mirrors SplitData.X
        raise DataError(f"the {self.name} split was streamed (data_loading='stream'), so its "
                        "expression matrix is not held as a whole. Predict it with "
                        "predict(adata) on the cells you need, or read it into memory (if it "
                        "fits) with statetx.run.attach_data(model, stream=False) (tx predict "
                        "--eval_train_data does).")

    @property
    def counts(self) -> torch.Tensor | None:
        return self.X

    def readers(self) -> tuple[BlockReader, BlockReader | None]:
        """Readers of the input representation and of the gene-space target (or None)."""
        counts = (BlockReader(self.files, self.counts_source, self.dtype, expression=True,
                              target=True)
                  if self.has_counts else None)
        return BlockReader(self.files, self.source, self.dtype), counts

    def chunk_of(self, rows: np.ndarray) -> np.ndarray:
        """Chunk index of each split row."""
        return np.searchsorted(self.chunk_end, rows, side="right")

    def iter_blocks(self, reader: BlockReader, rows: np.ndarray
                    ) -> Iterator[tuple[slice, np.ndarray]]:
        """For sorted split ``rows``: ``(positions in rows, dense rows)``, one chunk at a time;
        each chunk costs one contiguous read spanning its first to last requested row."""
        for a, b, fi, fr in self._segments(rows):
            block = reader.read(fi, int(fr[0]), int(fr[-1]) + 1)
            block = block if len(block) == b - a else block[fr - fr[0]]
            reader.check(block, self, rows[a:b])  # (only the requested rows)
            yield slice(a, b), block

    def check_values(self, reader: BlockReader, rows: np.ndarray) -> None:
        """One streamed pass over the sorted split ``rows``: NaN/Inf is an error naming the
        first such cell (so that bad values stop a run before it trains, as in memory)."""
        for _ in self.iter_blocks(reader, rows):
            pass

    def check_all_values(self, rows: np.ndarray | None = None) -> None:
        """:meth:`check_values` for each matrix the split reads (the input, the gene-space
        target) that no full pass has checked yet; ``rows`` (sorted) limits the pass, default
        every row (the matrices are then recorded in ``checked``)."""
        for reader in self.readers():
            if reader is None or reader.source in self.checked:
                continue
            try:
                self.check_values(reader, np.arange(self.n_obs) if rows is None else rows)
            finally:
                reader.close()
            if rows is None:
                self.checked.add(reader.source)

    def read_rows(self, reader: BlockReader, rows: np.ndarray, out: np.ndarray,
                  check: bool = True) -> np.ndarray:
        """Fill ``out`` ``[len(rows), width]`` with the sorted split ``rows``, one contiguous
        read per chunk; a chunk whose requested rows are consecutive is decoded in place.
        ``check``: refuse NaN/Inf (off for rows :meth:`check_values` has passed)."""
        for a, b, fi, fr in self._segments(rows):
            if int(fr[-1]) - int(fr[0]) + 1 == b - a:
                reader.read(fi, int(fr[0]), int(fr[-1]) + 1, out=out[a:b])
            else:
                out[a:b] = reader.read(fi, int(fr[0]), int(fr[-1]) + 1)[fr - fr[0]]
            if check:
                reader.check(out[a:b], self, rows[a:b])
        return out

    def _segments(self, rows: np.ndarray) -> Iterator[tuple[int, int, int, np.ndarray]]:
        """``(start, stop, file index, file rows)`` of the runs of ``rows`` in one chunk."""
        if not len(rows):
            return
        cid = self.chunk_of(rows)
        cuts = np.r_[0, np.flatnonzero(np.diff(cid)) + 1, len(rows)]
        for a, b in zip(cuts[:-1], cuts[1:]):
            yield int(a), int(b), int(self.file_index[rows[a]]), self.file_row[rows[a:b]]

    def context_means(self) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
        """:meth:`statetx.data.SplitData.context_means` (per perturbation, ``(control mean,
        perturbed mean)`` of each context with controls), accumulated over one streamed pass of
        the perturbed and control cells: float64 sums, one chunk in memory at a time."""
        perturbed = self.is_target & ~self.is_control
        n_p = int(self.pert.max(initial=0)) + 1
        keys = self.context * n_p + self.pert
        uniq, inv = np.unique(keys[perturbed], return_inverse=True)
        key_of = np.full(self.n_obs, -1, dtype=np.int64)
        key_of[perturbed] = inv.reshape(-1)
        n_ctx = int(self.context.max(initial=-1)) + 1
        reader, _ = self.readers()
        reader.dtype = np.float32
        p_sum = c_sum = None
        rows = np.flatnonzero(perturbed | self.is_control)  # every row of the split
        try:
            for pos, block in self.iter_blocks(reader, rows):
                if p_sum is None:
                    p_sum = torch.zeros(len(uniq), block.shape[1], dtype=torch.float64)
                    c_sum = torch.zeros(n_ctx, block.shape[1], dtype=torch.float64)
                r = rows[pos]
                x = torch.from_numpy(np.asarray(block, dtype=np.float64))
                for mask, index, acc in ((perturbed[r], key_of, p_sum),
                                         (self.is_control[r], self.context, c_sum)):
                    if mask.any():
                        acc.index_add_(0, torch.from_numpy(index[r[mask]]),
                                       x[torch.from_numpy(mask)])
        finally:
            reader.close()
        if np.dtype(self.dtype) == np.float32:  # (float16 reads can overflow: checked then)
            self.checked.add(self.source)  # the sampler need not read them again to check them
        out: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        if p_sum is None:
            return out
        p_n = np.bincount(inv.reshape(-1), minlength=len(uniq)).astype(np.float64)
        c_n = np.bincount(self.context[self.is_control], minlength=n_ctx).astype(np.float64)
        p_mean = p_sum.numpy() / np.maximum(p_n, 1)[:, None]
        c_mean = c_sum.numpy() / np.maximum(c_n, 1)[:, None]
        for k, key in enumerate(uniq):  # context-major, as in memory
            c, p = divmod(int(key), n_p)
            if c_n[c] > 0:
                out.setdefault(p, []).append((c_mean[c], p_mean[k]))
        return out


def prepare_stream(
    data: DataInput,
    split_config: SplitConfig | dict | str | Path | None,
    columns: ColumnMap,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    counts_key: str | None = None,
    dtype: str = "float32",
    yield_controls: bool = True,
    splits: tuple[str, ...] = SPLITS,
    **options,
) -> PreparedData:
    """:func:`statetx.data.prepare` with the training split as a :class:`StreamSplit`.

    Only obs labels (and the file position of every training cell) are read for the training
    split; validation and test splits are read into memory as usual (they are usually small).
    ``options`` are passed on to :func:`~statetx.data.prepare`.
    """
    stream_settings("stream", chunk_size)
    prepared = prepare(data, split_config, columns, counts_key=counts_key, dtype=dtype,
                       yield_controls=yield_controls,
                       splits=tuple(s for s in splits if s != "train"), keep_row_copies=True,
                       **options)
    if "train" not in splits:
        return prepared
    in_memory = [f.label for f in prepared.files
                 if f.path is None and f.adata is not None and not f.adata.isbacked]
    if in_memory:
        say(f"data_loading='stream' on AnnData already in memory "
            f"({preview(in_memory)}) saves no memory: give file paths in [datasets], or "
            "backed AnnData (anndata.read_h5ad(path, backed='r')), to train out of core.")
    src, counts_src, _, _ = input_sources(prepared.files, prepared.columns, counts_key)
    train = _stream_split("train", prepared, src, counts_src, yield_controls, _DTYPES[dtype],
                          int(chunk_size))
    check_training_split(train, prepared.config, yield_controls, prepared.assignments,
                         prepared.columns)
    return dataclasses.replace(prepared, splits={"train": train, **prepared.splits})


def _stream_split(split: str, prepared: PreparedData, src, counts_src, yield_controls: bool,
                  np_dtype, chunk_size: int) -> StreamSplit | None:
    """The labels of one split, built as :func:`statetx.data.prepare` builds them."""
    labels = split_labels(split, prepared.assignments, prepared.vocab)
    if labels is None:
        return None
    cat = labels[1]
    is_target = ~cat["is_control"] | bool(yield_controls)
    if not is_target.any():
        return None
    return StreamSplit(name=split, is_target=is_target, files=prepared.files, source=src,
                       counts_source=counts_src, dtype=np_dtype, chunk_size=chunk_size, **cat)


# ---------------------------------------------------------------------- the sampler
@dataclass
class _Plan:
    """One epoch, for one rank: sets in training order and the windows they come from."""

    targets: np.ndarray        # [n_sets, S] split rows
    basal: np.ndarray          # [n_sets, S] indices into the control reservoir
    window: np.ndarray         # [n_sets] window id
    windows: list[np.ndarray]  # chunk ids of each window (sorted)
    padded: int                # padded set positions (over all ranks)
    positions: int             # set positions (over all ranks)


@dataclass
class _Window:
    rows: np.ndarray           # sorted split rows held
    x: torch.Tensor            # [len(rows), D]
    counts: torch.Tensor | None


class StreamingCellSetSampler:
    """Cell-set batches streamed from disk, with the interface of
    :class:`statetx.sets.CellSetSampler` (see the module docstring for the semantics).

    Parameters
    ----------
    data
        The training split (:class:`StreamSplit`).
    vocab, cell_set_len, batch_size, seed, pairing, drop_last, exclude_self, downsample_cells,
    pad_from, thinning, rank, world_size
        As for :class:`~statetx.sets.CellSetSampler`. With ``world_size > 1`` every rank trains
        on its own contiguous share of the epoch's sets (window after window), with no set in
        two ranks; at most ``world_size - 1`` sets wrap round so that every rank yields the same
        number of batches.
    buffer_chunks
        Chunks per window: sets are formed within the cells of one window.
    max_controls
        At most this many control cells per context in the in-memory control reservoir (a
        seeded subset fixed for the run); None = all of them.
    prefetch
        Read the next window on a background thread while the current one trains (the
        batches do not depend on it).
    """

    def __init__(self, data: StreamSplit, vocab: Vocab, cell_set_len: int, batch_size: int, *,
                 seed: int = 42, pairing: str = "random", drop_last: bool = False,
                 exclude_self: bool = False, downsample_cells: int | None = None,
                 pad_from: str = "group", thinning: ReadDepthThinning | None = None,
                 rank: int = 0, world_size: int = 1,
                 buffer_chunks: int = DEFAULT_BUFFER_CHUNKS,
                 max_controls: int | None = None, prefetch: bool = True) -> None:
        check_sampler_options(pairing, cell_set_len, batch_size, downsample_cells, pad_from)
        stream_settings("stream", data.chunk_size, buffer_chunks, max_controls)
        if not (0 <= rank < world_size):
            raise ConfigError(f"rank={rank} must lie in [0, world_size={world_size}).")
        self.data, self.vocab = data, vocab
        self.S, self.B, self.seed = int(cell_set_len), int(batch_size), int(seed)
        self.pairing, self.drop_last, self.exclude_self = pairing, drop_last, exclude_self
        self.downsample_cells, self.pad_from, self.thinning = downsample_cells, pad_from, thinning
        self.rank, self.world_size = int(rank), int(world_size)
        self.buffer_chunks, self.max_controls = int(buffer_chunks), max_controls
        self.pert_table = pert_table(vocab)
        self.device = torch.device("cpu")
        self.reader, self.counts_reader = data.readers()
        self._width: dict[str | None, int] = {}
        self._groups()
        self._reservoir()
        # bad values stop the run before it trains (as in memory): one pass over its cells per
        # matrix read, shared out between the processes under torchrun (all raise what one
        # finds)
        found = None
        try:
            data.check_all_values(np.array_split(self.target_rows, self.world_size)[self.rank])
        except DataError as err:
            found = err
        raise_together(found)
        self._plans: OrderedDict[int, _Plan] = OrderedDict()
        self.peak_rows_held = 0      # most window rows held at once (reservoir excluded)
        self.windows_read = 0
        self.prefetch = bool(prefetch)
        self._pool: ThreadPoolExecutor | None = None
        pad = self.padding_fraction(0)
        if pad > PADDING_WARN:
            warn(
                f"{100 * pad:.0f}% of the cell-set positions of a streamed epoch are padding: a "
                f"window ({self.buffer_chunks} chunks of {data.chunk_size} rows) holds few cells "
                f"of each group (context, perturbation) for sets of {self.S}. Raise "
                "stream_buffer_chunks, or store the file sorted by perturbation.")

    # ------------------------------------------------------------------ structure
    def _groups(self) -> None:
        d = self.data
        rows = np.flatnonzero(d.is_target)
        n_b = len(self.vocab.batches) + 1 if self.pairing == "batch" else 1
        n_p = len(self.vocab.perturbations)
        batch = d.batch[rows] if self.pairing == "batch" else 0
        key = (d.context[rows] * n_b + batch) * n_p + d.pert[rows]
        if self.downsample_cells is not None:
            keep = cap_group_cells(key, self.downsample_cells, self.seed)
            rows, key = rows[keep], key[keep]
        uniq, inv = np.unique(key, return_inverse=True)
        self.target_rows = rows                          # sorted split rows that form sets
        self.target_group = inv.reshape(-1).astype(np.int64)
        first = rows[np.unique(self.target_group, return_index=True)[1]]
        self.group_context = d.context[first]
        self.group_batch = d.batch[first]
        self.group_cell_type = d.cell_type[first]
        # target rows of each chunk: target_rows[chunk_lo[c]:chunk_hi[c]]
        t_chunk = d.chunk_of(rows)
        self.chunk_lo = np.searchsorted(t_chunk, np.arange(d.n_chunks), side="left")
        self.chunk_hi = np.searchsorted(t_chunk, np.arange(d.n_chunks), side="right")
        self.chunks = np.flatnonzero(self.chunk_hi > self.chunk_lo)  # chunks with targets

    def _reservoir(self) -> None:
        """Choose, read and pool the control cells (read chunk by chunk, once)."""
        d = self.data
        ctrl = np.flatnonzero(d.is_control)
        rng = np.random.default_rng([self.seed, 0, 7])
        keep = []
        for c in np.unique(self.group_context):
            pool = ctrl[d.context[ctrl] == c]
            if self.max_controls is not None and len(pool) > self.max_controls:
                pool = np.sort(rng.choice(pool, self.max_controls, replace=False))
            keep.append(pool)
        res = np.unique(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
        self.reservoir_rows = res
        self.reservoir_x, _ = self._read(res, with_counts=False)
        self.group_pool: list[np.ndarray] = []
        cache: dict[tuple[int, int], np.ndarray] = {}
        for g in range(len(self.group_context)):
            c, b = int(self.group_context[g]), int(self.group_batch[g])
            key = (c, b if self.pairing == "batch" else -1)
            if key not in cache:
                pool = np.flatnonzero(d.context[res] == c)
                if self.pairing == "batch":
                    same = pool[d.batch[res[pool]] == b]
                    pool = same if len(same) else pool
                if not len(pool):
                    ct = self.vocab.cell_types[int(self.group_cell_type[g])]
                    raise DataError(f"cell type '{ct}' (split {d.name}) has perturbed cells but "
                                    "no control cells, so basal cells cannot be drawn.")
                cache[key] = pool
            self.group_pool.append(cache[key])

    def _read(self, rows: np.ndarray, with_counts: bool = True, check: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The given sorted split rows, read chunk by chunk into ``[len(rows), ·]`` tensors."""
        def read(reader: BlockReader) -> torch.Tensor:
            if reader.source not in self._width:
                self._width[reader.source] = self.data.files[0].width(reader.source)
            x = torch.from_numpy(np.empty((len(rows), self._width[reader.source]),
                                          dtype=reader.dtype))
            self.data.read_rows(reader, rows, x.numpy(), check=check)
            return x

        counts = self.counts_reader if with_counts else None
        return read(self.reader), None if counts is None else read(counts)

    def to(self, device: torch.device | str) -> StreamingCellSetSampler:
        """Keep the control reservoir on ``device`` and move each window there once, when it is
        read (only the ``[B, S]`` indices travel per step). Returns ``self``."""
        self.device = torch.device(device)
        self.reservoir_x = self.reservoir_x.to(self.device)
        if self.pert_table is not None:
            self.pert_table = self.pert_table.to(self.device)
        return self

    @property
    def window_rows(self) -> int:
        """Largest number of training cells one window can hold."""
        sizes = (self.chunk_hi - self.chunk_lo)[self.chunks]
        return int(np.sort(sizes)[::-1][: self.buffer_chunks].sum())

    @property
    def row_bytes(self) -> int:
        """Bytes one window holds per cell: the input row, plus the gene-space target row."""
        size = np.dtype(self.reader.dtype).itemsize
        return sum(self.data.files[0].width(r.source) * size
                   for r in (self.reader, self.counts_reader) if r is not None)

    @property
    def nbytes(self) -> int:
        """Bytes of device memory :meth:`to` implies: the reservoir plus four windows (the
        current and the next one of training, and two of the evaluation pass over training
        batches that validation makes while training holds its own)."""
        return int(self.reservoir_x.numel() * self.reservoir_x.element_size()
                   + 4 * self.window_rows * self.row_bytes)

    @property
    def n_groups(self) -> int:
        return len(self.group_context)

    def __len__(self) -> int:
        """Batches per epoch for this rank (of epoch 0: the count varies a little per epoch,
        with the windows' group composition)."""
        return self.n_batches(0)

    def n_batches(self, epoch: int) -> int:
        """Batches of ``epoch`` for this rank."""
        n = len(self._plan(epoch).targets)
        return n // self.B if self.drop_last else -(-n // self.B)

    def padding_fraction(self, epoch: int = 0) -> float:
        """Share of the set positions of ``epoch`` filled by resampling (short groups)."""
        p = self._plan(epoch)
        return p.padded / max(p.positions, 1)

    def describe(self) -> str:
        """One line: what is streamed and what is held in memory."""
        d = self.data
        res_mb = self.reservoir_x.numel() * self.reservoir_x.element_size() / 2**20
        per_row = self.row_bytes
        return (f"streaming {len(self.target_rows):,} training cells in {len(self.chunks):,} "
                f"chunks of <= {d.chunk_size:,} rows, {self.buffer_chunks} chunks per window "
                f"(<= {self.window_rows * per_row / 2**20:,.1f} MB), control reservoir "
                f"{len(self.reservoir_rows):,} cells ({res_mb:,.0f} MB); "
                f"{100 * self.padding_fraction(0):.1f}% of epoch 0's set positions are padding")

    # ------------------------------------------------------------------ the epoch plan
    def _plan(self, epoch: int) -> _Plan:
        epoch = int(epoch)
        if epoch in self._plans:
            self._plans.move_to_end(epoch)
            return self._plans[epoch]
        plan = self._make_plan(epoch)
        self._plans[epoch] = plan
        while len(self._plans) > 2:
            self._plans.popitem(last=False)
        return plan

    def _make_plan(self, epoch: int) -> _Plan:
        rng = np.random.default_rng([self.seed, epoch])
        S = self.S
        order = rng.permutation(self.chunks)
        windows = [np.sort(order[i:i + self.buffer_chunks])
                   for i in range(0, len(order), self.buffer_chunks)]
        t_parts, b_parts, w_parts = [], [], []
        padded = positions = 0
        for w, chunk_ids in enumerate(windows):
            idx = np.concatenate([np.arange(self.chunk_lo[c], self.chunk_hi[c])
                                  for c in chunk_ids])
            grp = self.target_group[idx]
            by_group = np.argsort(grp, kind="stable")
            idx, grp = idx[by_group], grp[by_group]
            cuts = np.r_[0, np.flatnonzero(np.diff(grp)) + 1, len(grp)]
            sets, basal = [], []
            for a, b in zip(cuts[:-1], cuts[1:]):
                rows = self.target_rows[idx[a:b]]
                g_sets = cut_group(rng, rows, S, self.drop_last, self.pad_from)
                padded += max(g_sets.size - len(rows), 0)
                if not len(g_sets):
                    continue
                pool = self.group_pool[int(grp[a])]
                g_basal = pool[rng.integers(len(pool), size=g_sets.shape)]
                if self.exclude_self and len(pool) > 1:
                    self._redraw_self(rng, g_sets, g_basal, pool)
                sets.append(g_sets)
                basal.append(g_basal)
            if not sets:
                continue
            sets_w, basal_w = np.concatenate(sets), np.concatenate(basal)
            perm = rng.permutation(len(sets_w))
            t_parts.append(sets_w[perm])
            b_parts.append(basal_w[perm])
            w_parts.append(np.full(len(sets_w), w, dtype=np.int64))
            positions += sets_w.size
        if not t_parts:
            raise DataError(f"the {self.data.name} split yields no cell set of {S} cells "
                            "(drop_last=True and every group is smaller in every window): raise "
                            "stream_buffer_chunks (a window then holds more cells of a group), "
                            "store the file sorted by perturbation, lower cell_set_len, or set "
                            "drop_last=False."
                            + (f" Raise downsample_cells (now {self.downsample_cells} cells "
                               "per group)." if self.downsample_cells is not None else ""))
        targets, basal = np.concatenate(t_parts), np.concatenate(b_parts)
        window = np.concatenate(w_parts)
        if self.world_size > 1:
            sel = self._shard(len(targets))
            targets, basal, window = targets[sel], basal[sel], window[sel]
        return _Plan(targets, basal, window, windows, padded, positions)

    def _shard(self, n_sets: int) -> np.ndarray:
        """This rank's sets: a contiguous ``1/world_size`` slice of the epoch's sets in plan
        order (window after window), so the ranks share no set and each reads only the windows
        its slice touches (a window at a slice boundary is read in part by two ranks: the rows
        of their own sets). The epoch's first sets wrap round to make the slices equal: at most
        ``world_size - 1`` sets repeat, as in memory."""
        W = self.world_size
        k = -(-n_sets // W)
        return np.resize(np.arange(n_sets), k * W)[self.rank * k:(self.rank + 1) * k]

    def _redraw_self(self, rng, targets: np.ndarray, basal: np.ndarray, pool: np.ndarray) -> None:
        for _ in range(100):
            same = self.reservoir_rows[basal] == targets
            if not same.any():
                return
            basal[same] = pool[rng.integers(len(pool), size=int(same.sum()))]

    # ------------------------------------------------------------------ batches
    def batches(self, epoch: int, start: int = 0) -> Iterator[CellSetBatch]:
        """Yield the batches of ``epoch`` from batch number ``start`` on (for exact resume);
        windows are read when their first batch is due, and dropped after their last."""
        plan = self._plan(epoch)
        n = self.n_batches(epoch) * self.B if self.drop_last else len(plan.targets)
        first = start * self.B
        if first >= n:
            return
        win = plan.window
        run_start = np.r_[first, first + 1 + np.flatnonzero(np.diff(win[first:n]))]
        held: dict[int, _Window] = {}
        pending: dict[int, tuple[Future, int]] = {}
        try:
            for lo in range(first, n, self.B):
                hi = min(lo + self.B, n)
                need = [int(w) for w in np.unique(win[lo:hi])]
                for w in [w for w in held if w not in need]:
                    del held[w]
                for w in need:
                    if w not in held:
                        job = pending.pop(w, None) or self._submit(plan, w)
                        held[w] = job[0].result()
                # read the next window while this one trains (at most two windows held)
                nxt = int(np.searchsorted(run_start, hi - 1, side="right"))
                if self.prefetch and len(held) == 1 and not pending and nxt < len(run_start):
                    w = int(win[run_start[nxt]])
                    pending[w] = self._submit(plan, w)
                self.peak_rows_held = max(self.peak_rows_held,
                                          sum(len(h.rows) for h in held.values())
                                          + sum(k for _, k in pending.values()))
                batch = self._make_batch(plan.targets[lo:hi], plan.basal[lo:hi], win[lo:hi], held)
                if self.thinning is not None:
                    batch = self.thinning.apply(batch, self.seed, epoch, lo // self.B,
                                                self.rank)
                yield batch
        finally:
            for job, _ in pending.values():
                job.cancel()

    def _submit(self, plan: _Plan, w: int) -> tuple[Future, int]:
        """Read window ``w`` on the sampler's reader thread (every read happens there)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="statetx-stream")
        rows = np.unique(plan.targets[plan.window == w])
        return self._pool.submit(self._load_window, rows), len(rows)

    def _load_window(self, rows: np.ndarray) -> _Window:
        x, counts = self._read(rows, check=False)  # (checked before training)
        self.windows_read += 1
        if self.device.type != "cpu":
            x = x.to(self.device)
            counts = None if counts is None else counts.to(self.device)
        return _Window(rows, x, counts)

    def _gather(self, held: dict[int, _Window], targets: np.ndarray, window: np.ndarray,
                attr: str) -> torch.Tensor:
        b, s = targets.shape
        if len(held) == 1 or (window == window[0]).all():
            h = held[int(window[0])]
            loc = torch.from_numpy(np.searchsorted(h.rows, targets.reshape(-1))).to(self.device)
            return getattr(h, attr).index_select(0, loc).view(b, s, -1)
        first = getattr(held[int(window[0])], attr)
        out = torch.empty(b, s, first.shape[1], dtype=first.dtype, device=self.device)
        for w in np.unique(window):
            h = held[int(w)]
            sel = np.flatnonzero(window == w)
            loc = torch.from_numpy(np.searchsorted(h.rows, targets[sel].reshape(-1)))
            out[torch.from_numpy(sel).to(self.device)] = getattr(h, attr).index_select(
                0, loc.to(self.device)).view(len(sel), s, -1)
        return out

    def _make_batch(self, targets: np.ndarray, basal: np.ndarray, window: np.ndarray,
                    held: dict[int, _Window]) -> CellSetBatch:
        d = self.data
        b, s = targets.shape
        ints = torch.from_numpy(np.stack([basal, d.pert[targets], d.batch[targets],
                                          d.cell_type[targets]])).to(self.device)
        pert_index = ints[1]
        first = targets[:, 0]
        has_counts = next(iter(held.values())).counts is not None
        return CellSetBatch(
            basal=self.reservoir_x.index_select(0, ints[0].reshape(-1)).view(b, s, -1).float(),
            target=self._gather(held, targets, window, "x").float(),
            pert=pert_inputs(self.pert_table, pert_index[:, 0]),
            pert_index=pert_index,
            batch_index=ints[2],
            cell_type_index=ints[3],
            counts=self._gather(held, targets, window, "counts").float() if has_counts else None,
            target_rows=targets,
            basal_rows=self.reservoir_rows[basal],
            pert_name=[self.vocab.perturbations[i] for i in d.pert[first]],
            cell_type=[self.vocab.cell_types[i] for i in d.cell_type[first]],
            dataset_name=[d.files[i].dataset for i in d.file_index[first]],
            barcodes=d.barcodes,
        )

    def close(self) -> None:
        """Stop the reader thread and close the open input files."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.reader.close()
        if self.counts_reader is not None:
            self.counts_reader.close()


def preparer(chunk_size: int | None) -> Callable[..., PreparedData]:
    """:func:`statetx.data.prepare`, or :func:`prepare_stream` (the training split stays on
    disk) in chunks of ``chunk_size`` cells when one is given."""
    return prepare if chunk_size is None else partial(prepare_stream, chunk_size=chunk_size)


def make_sampler(split: SplitData | StreamSplit, vocab: Vocab, cell_set_len: int,
                 batch_size: int, *, stream: StreamSettings | None = None,
                 **options) -> CellSetSampler | StreamingCellSetSampler:
    """The sampler for a split: streaming for a :class:`StreamSplit`, else in memory.

    ``options`` go to the sampler (``seed``, ``pairing``, ``rank``, ``world_size``, …)."""
    if isinstance(split, StreamSplit):
        s = stream or StreamSettings(chunk_size=split.chunk_size)
        return StreamingCellSetSampler(split, vocab, cell_set_len, batch_size,
                                       buffer_chunks=s.buffer_chunks,
                                       max_controls=s.max_controls, **options)
    return CellSetSampler(split, vocab, cell_set_len, batch_size, **options)


__all__ = [
    "DATA_LOADINGS", "BlockReader", "StreamSettings", "StreamSplit", "StreamingCellSetSampler",
    "make_sampler", "prepare_stream", "stream_settings",
]
