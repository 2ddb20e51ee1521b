"""Tests of the cell-set sampler (statetx.sets): shapes, grouping, pairing, determinism, epochs,
padding, drop_last, sharding, the reference flat dict and float16 storage.

Most tests use a small synthetic AnnData (no ../shared needed); the pairing tests also run on
Kang 2018 (5 cell types, 2 donors).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from statetx.config import ColumnMap
from statetx.data import PreparedData, prepare
from statetx.errors import ConfigError, DataError
from statetx.sets import CellSetBatch, CellSetSampler, ReadDepthThinning, check_read_depth

SYN_COLS = ColumnMap.build(pert_col="gene", cell_type_key="cell_type", batch_col="batch",
                           control_pert="ctrl")
KANG_COLS = ColumnMap.build(pert_col="target_gene", cell_type_key="cell_type", batch_col="batch",
                            control_pert="control")

# (cell type, batch, perturbation) -> number of cells. B/b1 has no controls (batch fallback).
SIZES = {
    ("A", "b1", "P1"): 9, ("A", "b1", "P2"): 5, ("A", "b1", "ctrl"): 6,
    ("A", "b2", "P1"): 4, ("A", "b2", "P3"): 8, ("A", "b2", "ctrl"): 5,
    ("B", "b1", "P1"): 7, ("B", "b1", "P2"): 16,
    ("B", "b2", "P2"): 3, ("B", "b2", "ctrl"): 4,
}
# groups of the random strategy, (cell type, perturbation) -> size (controls form groups too)
RANDOM_GROUPS = {("A", "P1"): 13, ("A", "P2"): 5, ("A", "P3"): 8, ("A", "ctrl"): 11,
                 ("B", "P1"): 7, ("B", "P2"): 19, ("B", "ctrl"): 4}
D = 6


def synth_adata(seed: int = 0) -> ad.AnnData:
    rows = [k for k, n in SIZES.items() for _ in range(n)]
    rng = np.random.default_rng(seed)
    rng.shuffle(rows)  # groups are not contiguous in the input
    obs = pd.DataFrame(rows, columns=["cell_type", "batch", "gene"],
                       index=[f"cell{i}" for i in range(len(rows))])
    X = rng.random((len(rows), D), dtype=np.float32) * 3
    return ad.AnnData(X, obs=obs)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Row gathers are tiny; on a shared, oversubscribed CPU intra-op threads only add waiting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def syn() -> PreparedData:
    return prepare(synth_adata(), {"training": {"syn": "train"}}, SYN_COLS)


@pytest.fixture(scope="module")
def kang_prep(kang_log) -> PreparedData:
    return prepare(kang_log, {"training": {"kang": "train"}}, KANG_COLS)


def sampler(prep: PreparedData, S: int = 4, B: int = 3, **kw) -> CellSetSampler:
    return CellSetSampler(prep.splits["train"], prep.vocab, S, B, **kw)


def all_sets(s: CellSetSampler, epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Target and basal rows of every set actually yielded in an epoch."""
    bs = list(s.batches(epoch))
    return (np.concatenate([b.target_rows for b in bs]),
            np.concatenate([b.basal_rows for b in bs]))


def n_sets(sizes, S: int, drop_last: bool = False) -> int:
    return sum(n // S if drop_last else -(-n // S) for n in sizes)


# ---------------------------------------------------------------------------------------------
# shapes and contents


def test_batch_shapes_and_contents(syn):
    s = sampler(syn, S=4, B=3, seed=1)
    d = syn.splits["train"]
    P = len(syn.vocab.perturbations)
    b = next(iter(s.batches(0)))
    assert isinstance(b, CellSetBatch)
    assert b.basal.shape == b.target.shape == (3, 4, D)
    assert b.pert.shape == (3,) and b.pert.dtype == torch.int64  # one-hot positions, per set
    for t in (b.pert_index, b.batch_index, b.cell_type_index):
        assert t.shape == (3, 4) and t.dtype == torch.int64
    assert b.target_rows.shape == b.basal_rows.shape == (3, 4)
    assert b.basal.dtype == b.target.dtype == torch.float32
    assert b.n_cells == 12 and b.counts is None
    # tensors are the rows the indices name
    torch.testing.assert_close(b.target, d.X[torch.from_numpy(b.target_rows)])
    torch.testing.assert_close(b.basal, d.X[torch.from_numpy(b.basal_rows)])
    np.testing.assert_array_equal(b.pert_index.numpy(), d.pert[b.target_rows])
    np.testing.assert_array_equal(b.batch_index.numpy(), d.batch[b.target_rows])
    # every set is one perturbation: its one-hot position is each cell's perturbation index
    np.testing.assert_array_equal(b.pert[:, None].expand(3, 4).numpy(), b.pert_index.numpy())
    assert int(b.pert.max()) < P
    assert b.pert_name == [syn.vocab.perturbations[i] for i in b.pert_index[:, 0].tolist()]
    assert b.cell_type == [syn.vocab.cell_types[i] for i in b.cell_type_index[:, 0].tolist()]


@pytest.mark.parametrize("S,B,drop_last", [(4, 3, False), (4, 3, True), (8, 2, False),
                                           (8, 2, True), (1, 5, False), (32, 1, False)])
def test_len_equals_batches_yielded(syn, S, B, drop_last):
    s = sampler(syn, S=S, B=B, drop_last=drop_last)
    for epoch in (0, 1):
        bs = list(s.batches(epoch))
        assert len(s) == len(bs)
    n = n_sets(RANDOM_GROUPS.values(), S, drop_last)
    assert sum(b.target.shape[0] for b in bs) == (n // B * B if drop_last else n)
    assert s.n_groups == len(RANDOM_GROUPS)


@pytest.mark.parametrize("data", ["syn", "kang_prep"])
@pytest.mark.parametrize("pairing", ["random", "batch"])
def test_every_set_is_one_group(request, data, pairing):
    prep = request.getfixturevalue(data)
    d = prep.splits["train"]
    targets, _ = all_sets(sampler(prep, S=16, B=4, pairing=pairing, seed=3))
    for key in (d.context, d.pert, d.cell_type) + ((d.batch,) if pairing == "batch" else ()):
        v = key[targets]
        assert (v == v[:, :1]).all()
    # and every target cell is visited in the epoch
    assert set(np.flatnonzero(d.is_target)) <= set(targets.ravel())


@pytest.mark.parametrize("data", ["syn", "kang_prep"])
def test_random_pairing_within_cell_type(request, data):
    prep = request.getfixturevalue(data)
    d = prep.splits["train"]
    targets, basal = all_sets(sampler(prep, S=16, B=4, seed=0))
    assert d.is_control[basal].all()
    np.testing.assert_array_equal(d.context[basal], d.context[targets])
    np.testing.assert_array_equal(d.cell_type[basal], d.cell_type[targets])
    # random pairing ignores the batch: some pairs cross batches (donors on Kang)
    assert (d.batch[basal] != d.batch[targets]).any()


def test_batch_pairing_within_cell_type_and_batch_on_kang(kang_prep):
    d = kang_prep.splits["train"]
    # every (cell type, donor) of Kang has controls: all pairs share both
    targets, basal = all_sets(sampler(kang_prep, S=16, B=4, pairing="batch", seed=0))
    assert d.is_control[basal].all()
    np.testing.assert_array_equal(d.cell_type[basal], d.cell_type[targets])
    np.testing.assert_array_equal(d.batch[basal], d.batch[targets])
    assert len(np.unique(d.batch[targets])) == 2


def test_batch_pairing_falls_back_to_cell_type(syn):
    d = syn.splits["train"]
    targets, basal = all_sets(sampler(syn, S=4, B=3, pairing="batch", seed=0))
    b1 = syn.vocab.batches.index("b1")
    ct_b = syn.vocab.cell_types.index("B")
    np.testing.assert_array_equal(d.cell_type[basal], d.cell_type[targets])
    no_pool = (d.cell_type[targets] == ct_b) & (d.batch[targets] == b1)
    assert no_pool.any()
    # B/b1 has no controls: fall back to B's controls (all in b2)
    assert (d.batch[basal[no_pool]] != b1).all()
    # everywhere else the batch matches
    np.testing.assert_array_equal(d.batch[basal[~no_pool]], d.batch[targets[~no_pool]])


def test_exclude_self(syn):
    d = syn.splits["train"]
    hits = 0
    for seed in range(5):
        t0, b0 = all_sets(sampler(syn, S=4, B=3, seed=seed))
        hits += int((t0 == b0).sum())
        t1, b1 = all_sets(sampler(syn, S=4, B=3, seed=seed, exclude_self=True))
        assert not (t1 == b1).any()
        assert d.is_control[b1].all()
    assert hits > 0  # without the option a control is sometimes its own basal cell


# ---------------------------------------------------------------------------------------------
# determinism and epochs


def batch_key(bs: list[CellSetBatch]) -> list[tuple]:
    return [(b.target_rows.tobytes(), b.basal_rows.tobytes()) for b in bs]


def test_same_seed_same_batches(syn):
    s1, s2 = sampler(syn, seed=7), sampler(syn, seed=7)
    for epoch in (0, 3):
        b1, b2 = list(s1.batches(epoch)), list(s2.batches(epoch))
        assert batch_key(b1) == batch_key(b2)
        for x, y in zip(b1, b2):
            assert torch.equal(x.basal, y.basal) and torch.equal(x.target, y.target)
            assert torch.equal(x.pert, y.pert)


def test_different_seeds_differ(syn):
    a, b = list(sampler(syn, seed=1).batches(0)), list(sampler(syn, seed=2).batches(0))
    assert batch_key(a) != batch_key(b)


def test_epochs_reshuffle_set_membership(syn):
    s = sampler(syn, S=4, B=3, seed=0)
    members = [{frozenset(r) for r in s.epoch_sets(e)[0].tolist()} for e in range(3)]
    assert members[0] != members[1] and members[1] != members[2]
    # the set order changes too
    t0, t1 = s.epoch_sets(0)[0], s.epoch_sets(1)[0]
    assert not np.array_equal(t0, t1)
    # but the epoch itself is a pure function of (seed, epoch)
    np.testing.assert_array_equal(s.epoch_sets(1)[0], t1)


def test_resume_from_start(syn):
    s = sampler(syn, S=4, B=3, seed=5)
    full = list(s.batches(2))
    assert batch_key(list(s.batches(2, start=3))) == batch_key(full[3:])


# ---------------------------------------------------------------------------------------------
# padding and drop_last


def test_short_sets_padded_from_the_whole_group(syn):
    d = syn.splits["train"]
    S = 12
    a_p1 = np.flatnonzero(d.is_target & (d.pert == syn.vocab.perturbations.index("P1"))
                          & (d.cell_type == syn.vocab.cell_types.index("A")))
    assert len(a_p1) == 13  # one full set of 12 and a remainder of 1
    distinct = []
    for seed in range(4):
        targets, _ = sampler(syn, S=S, B=2, seed=seed).epoch_sets(0)
        group_sets = [r for r in targets if set(r) <= set(a_p1)]
        assert len(group_sets) == 2
        full, short = sorted(group_sets, key=lambda r: len(set(r)), reverse=True)
        assert len(set(full)) == S  # a full chunk has distinct cells
        assert set(full) | set(short) == set(a_p1)  # the remainder cell is in the padded set
        distinct.append(len(set(short)))
    # padding draws from the whole group (13 cells), not from the 1-cell remainder
    assert min(distinct) > 3
    # pad_from="chunk" (the reference): the 1-cell remainder is repeated S times
    for seed in range(3):
        targets, _ = sampler(syn, S=S, B=2, seed=seed, pad_from="chunk").epoch_sets(0)
        short = [r for r in targets if set(r) <= set(a_p1) and len(set(r)) < S]
        assert len(short) == 1 and len(set(short[0])) == 1
    with pytest.raises(ConfigError, match="pad_from='cell'.*'group'.*'chunk'"):
        sampler(syn, pad_from="cell")


def test_drop_last(syn):
    S, B = 4, 3
    s = sampler(syn, S=S, B=B, drop_last=True, seed=0)
    bs = list(s.batches(0))
    n = n_sets(RANDOM_GROUPS.values(), S, drop_last=True)  # sets shorter than S are dropped
    assert len(bs) == n // B == len(s)
    for b in bs:
        assert b.target_rows.shape == (B, S)  # only full batches
        for r in b.target_rows:
            assert len(set(r)) == S  # no padding, no duplicates
    # B/ctrl has 4 cells -> one set; A/P2 has 5 -> one set (remainder dropped)
    # without drop_last the last batch is partial and short sets are padded
    s2 = sampler(syn, S=S, B=B, drop_last=False, seed=0)
    bs2 = list(s2.batches(0))
    n2 = n_sets(RANDOM_GROUPS.values(), S)
    assert n2 % B != 0
    assert bs2[-1].target_rows.shape[0] == n2 % B
    assert all(b.target_rows.shape == (B, S) for b in bs2[:-1])


def test_drop_last_keeps_a_full_last_batch(syn):
    S = 4
    n = n_sets(RANDOM_GROUPS.values(), S, drop_last=True)
    B = next(b for b in range(2, n) if n % b == 0)  # a batch size that divides the set count
    s = sampler(syn, S=S, B=B, drop_last=True)
    bs = list(s.batches(0))
    assert len(bs) == len(s) == n // B
    assert sum(b.target_rows.shape[0] for b in bs) == n  # the last (full) batch is kept


# ---------------------------------------------------------------------------------------------
# distributed sharding


def sets_of(rows: np.ndarray) -> list[tuple]:
    return [tuple(r) for r in rows.tolist()]


@pytest.mark.parametrize("S", [4, 3])
def test_distributed_shards(syn, S):
    single = sampler(syn, S=S, B=2, seed=11)
    r0 = sampler(syn, S=S, B=2, seed=11, rank=0, world_size=2)
    r1 = sampler(syn, S=S, B=2, seed=11, rank=1, world_size=2)
    assert len(r0) == len(r1)  # equal step counts avoid a collective hang
    for epoch in (0, 1):
        every = sets_of(single.epoch_sets(epoch)[0])
        s0 = sets_of(np.concatenate([b.target_rows for b in r0.batches(epoch)]))
        s1 = sets_of(np.concatenate([b.target_rows for b in r1.batches(epoch)]))
        assert len(s0) == len(s1) == -(-len(every) // 2)
        assert set(s0) | set(s1) == set(every)  # together they cover the epoch
        overlap = set(s0) & set(s1)
        if len(every) % 2 == 0:
            assert not overlap  # disjoint
        else:  # one set repeated to even the ranks out
            assert len(overlap) == 1
            assert len(s0) + len(s1) == len(every) + 1
    # the partition depends on the epoch
    e0 = sets_of(r0.epoch_sets(0)[0])
    e1 = sets_of(r0.epoch_sets(1)[0])
    assert e0 != e1


@pytest.mark.parametrize("drop_last", [False, True])
def test_distributed_len_matches_yield(syn, drop_last):
    for rank in (0, 1, 2):
        s = sampler(syn, S=3, B=2, seed=4, rank=rank, world_size=3, drop_last=drop_last)
        bs = list(s.batches(0))
        assert len(bs) == len(s) > 0
        if drop_last:
            assert all(b.target_rows.shape == (2, 3) for b in bs)


def test_distributed_sets_are_disjoint_with_even_count(syn):
    # pick S so that the total number of sets is even, then require exact disjointness
    S = next(s for s in range(2, 10) if n_sets(RANDOM_GROUPS.values(), s) % 2 == 0)
    sh = [sampler(syn, S=S, B=3, seed=0, rank=r, world_size=2) for r in (0, 1)]
    rows = [np.concatenate([b.target_rows for b in s.batches(0)]) for s in sh]
    assert not set(sets_of(rows[0])) & set(sets_of(rows[1]))
    assert len(rows[0]) + len(rows[1]) == n_sets(RANDOM_GROUPS.values(), S)


# ---------------------------------------------------------------------------------------------
# reference flat dict


def test_reference_dict(kang_prep, kang_log):
    v = kang_prep.vocab
    s = sampler(kang_prep, S=8, B=2, pairing="batch", seed=0)
    b = next(iter(s.batches(0)))
    flat = b.to_reference_dict(v)
    n = 16
    assert flat["pert_cell_emb"].shape == flat["ctrl_cell_emb"].shape == (n, 1267)
    torch.testing.assert_close(flat["pert_cell_emb"], b.target.reshape(n, -1))
    torch.testing.assert_close(flat["ctrl_cell_emb"], b.basal.reshape(n, -1))
    assert flat["pert_emb"].shape == (n, len(v.perturbations))
    assert flat["batch"].shape == (n, len(v.batches)) and flat["batch"].dtype == torch.float32
    assert (flat["batch"].sum(1) == 1).all()  # one-hot, not an integer
    np.testing.assert_array_equal(flat["batch"].argmax(1).numpy(), b.batch_index.reshape(-1))
    d = kang_prep.splits["train"]
    rows = b.target_rows.reshape(-1)
    assert flat["pert_name"] == [v.perturbations[i] for i in d.pert[rows]]
    assert flat["cell_type"] == [v.cell_types[i] for i in d.cell_type[rows]]
    assert flat["batch_name"] == [v.batches[i] for i in d.batch[rows]]
    assert set(flat["pert_name"]) <= {"IFNB", "control"}
    assert all(isinstance(x, str) for x in flat["pert_name"] + flat["batch_name"])
    # per set: its dataset; per cell: the target's and its basal control's obs names
    assert b.dataset_name == ["kang", "kang"] and flat["dataset_name"] == ["kang"] * n
    file_row = kang_prep.splits["train"].file_row  # rows of the AnnData given
    names = np.asarray(kang_log.obs_names)
    assert flat["pert_cell_barcode"] == list(names[file_row[b.target_rows.reshape(-1)]])
    assert flat["ctrl_cell_barcode"] == list(names[file_row[b.basal_rows.reshape(-1)]])
    ctrl = set(kang_prep.splits["train"].barcodes[kang_prep.splits["train"].is_control])
    assert set(flat["ctrl_cell_barcode"]) <= ctrl



# ---------------------------------------------------------------------------------------------
# float16 storage


def test_float16_storage(kang_log):
    spec = {"training": {"kang": "train"}}
    p32 = prepare(kang_log, spec, KANG_COLS)
    p16 = prepare(kang_log, spec, KANG_COLS, dtype="float16")
    assert p16.splits["train"].X.dtype == torch.float16
    assert p32.splits["train"].X.dtype == torch.float32
    assert p16.splits["train"].X.element_size() * 2 == p32.splits["train"].X.element_size()
    b32 = next(iter(sampler(p32, S=8, B=4, seed=2).batches(0)))
    b16 = next(iter(sampler(p16, S=8, B=4, seed=2).batches(0)))
    np.testing.assert_array_equal(b16.target_rows, b32.target_rows)  # same sampling
    assert b16.target.dtype == b16.basal.dtype == torch.float32  # upcast in the batch
    torch.testing.assert_close(b16.target, b32.target, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(b16.basal, b32.basal, rtol=1e-3, atol=1e-3)
    with pytest.raises(ConfigError, match="dtype='float64'"):
        prepare(kang_log, spec, KANG_COLS, dtype="float64")


# ---------------------------------------------------------------------------------------------
# downsample_cells


def group_of(prep: PreparedData, rows: np.ndarray) -> list[tuple[int, int]]:
    d = prep.splits["train"]
    return list(zip(d.context[rows].tolist(), d.pert[rows].tolist()))


@pytest.mark.parametrize("cap", [1, 3, 6])
def test_downsample_cells_fixed_subset_per_group(syn, cap):
    s = sampler(syn, S=4, B=3, seed=5, downsample_cells=cap)
    kept = {}
    for epoch in range(4):
        targets, basal = all_sets(s, epoch)
        cells = np.unique(targets)
        counts = pd.Series(group_of(syn, cells)).value_counts()
        # at most `cap` distinct cells of each group, every group still present
        assert len(counts) == len(RANDOM_GROUPS)
        assert (counts <= cap).all()
        assert sorted(counts.tolist()) == sorted(min(cap, n) for n in RANDOM_GROUPS.values())
        kept.setdefault("first", set(cells))
        assert set(cells) == kept["first"]  # the same subset in every epoch
        assert len(list(s.batches(epoch))) == len(s)
    # the number of batches follows the capped groups; basal cells come from all controls
    assert len(s) == -(-n_sets([min(cap, n) for n in RANDOM_GROUPS.values()], 4) // 3)
    d = syn.splits["train"]
    basal_seen = np.unique(np.concatenate([all_sets(s, e)[1].ravel() for e in range(6)]))
    assert len(basal_seen) > len(np.intersect1d(basal_seen, list(kept["first"])))
    assert d.is_control[basal_seen].all()


def test_downsample_cells_seeded_and_above_group_size_is_a_no_op(syn):
    a = np.unique(all_sets(sampler(syn, seed=1, downsample_cells=2))[0])
    b = np.unique(all_sets(sampler(syn, seed=1, downsample_cells=2))[0])
    c = np.unique(all_sets(sampler(syn, seed=2, downsample_cells=2))[0])
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    full, capped = sampler(syn, seed=1), sampler(syn, seed=1, downsample_cells=10_000)
    for e in range(2):
        assert np.array_equal(all_sets(full, e)[0], all_sets(capped, e)[0])


# ---------------------------------------------------------------------------------------------
# option validation


def test_invalid_options(syn):
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="downsample_cells="):
            sampler(syn, downsample_cells=bad)
    with pytest.raises(ConfigError, match="basal_mapping_strategy='batches'"):
        sampler(syn, pairing="batches")
    with pytest.raises(ConfigError, match="cell_set_len \\(0\\)"):
        sampler(syn, S=0)


# ---------------------------------------------------------------------------------------------
# read-depth downsampling (option downsample)


def test_read_depth_thinning_on_kang(kang_raw, kang_prep):
    """Kang 2018 (log1p of normalised counts, and raw UMI counts): a rate keeps that share of
    each cell's counts, a target depth caps the depth, zeros stay zero, draws are seeded."""
    s = sampler(kang_prep, S=16, B=8, seed=0)
    plain = next(iter(s.batches(0)))
    thin = ReadDepthThinning(0.5, True, ("basal", "target"))
    half = thin.apply(plain, 0, 0, 0)
    before = torch.expm1(plain.target).round().sum(-1)
    after = torch.expm1(half.target).round().sum(-1)
    assert torch.allclose(half.target, torch.log1p(torch.expm1(half.target).round()), atol=1e-5)
    ratio = float(after.sum() / before.sum())
    assert 0.47 < ratio < 0.53
    assert ((plain.target == 0) <= (half.target == 0)).all()  # zeros stay zero
    assert not torch.equal(half.basal, plain.basal)
    assert torch.equal(half.pert, plain.pert) and half.target_rows is plain.target_rows
    assert torch.equal(thin.apply(plain, 0, 0, 0).target, half.target)  # seeded
    assert not torch.equal(thin.apply(plain, 0, 0, 1).target, half.target)  # per batch
    # a target depth on raw counts: cells above it come down to about it, others are kept
    raw = prepare(kang_raw, {"training": {"kang": "train"}}, KANG_COLS, allow_counts=True)
    counts = next(iter(sampler(raw, S=16, B=8, seed=0).batches(0)))
    depth = counts.target.sum(-1)
    target = float(depth.median())
    capped = ReadDepthThinning(target, False, ("target",)).apply(counts, 0, 0, 0)
    new = capped.target.sum(-1)
    assert torch.equal(capped.target, capped.target.round()) and torch.equal(
        capped.basal, counts.basal)
    low = depth <= target
    assert torch.equal(new[low], depth[low])
    assert (new[~low] - target).abs().max() < 5 * target**0.5
    # through the sampler: every batch thinned, reproducibly
    s2 = sampler(kang_prep, S=16, B=8, seed=0, thinning=thin)
    a, b = list(s2.batches(1)), list(s2.batches(1))
    assert all(torch.equal(x.target, y.target) for x, y in zip(a, b))
    assert torch.equal(next(iter(s2.batches(1, start=2))).target, a[2].target)  # resume
    assert check_read_depth(1.0) is None and check_read_depth(0.25) == 0.25
    assert check_read_depth(np.float32(0.5)) == 0.5 and check_read_depth(np.int64(900)) == 900
    for bad in (0, -1.0, float("nan"), "half", True):
        with pytest.raises(ConfigError, match="downsample=.*must be a number > 0"):
            check_read_depth(bad)


def test_batch_pairing_with_many_small_batches_warns_about_padding():
    """Many batches (gem groups) split the (cell type, perturbation) groups into a few cells
    each under batch pairing, and sets become mostly redrawn copies: fit says so, and that
    random pairing builds sets per (cell type, perturbation)."""
    import warnings

    from conftest import make_synthetic
    from test_model import small_model

    a = make_synthetic(n_cell_types=1, n_perts=2, n_cells=40, n_controls=60, batches=20)
    with pytest.warns(UserWarning, match=r"padding .*median of 2 cells for "
                                         r"sets of 8.*basal_mapping_strategy='random'"):
        small_model(batch_col="batch", max_steps=1).fit(a)
    prepared = prepare(a, None, ColumnMap.build(pert_col="gene", control_pert="ctrl",
                                                batch_col="batch"))
    random = CellSetSampler(prepared.splits["train"], prepared.vocab, 8, 4)
    by_batch = CellSetSampler(prepared.splits["train"], prepared.vocab, 8, 4, pairing="batch")
    assert random.padding_fraction() < 0.2 < 0.5 < by_batch.padding_fraction()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small_model(batch_col="batch", basal_mapping_strategy="random", max_steps=1).fit(a)


def test_fixed_pairs_keep_each_cells_control_for_the_run():
    """cache_control_pairs (reference cache_perturbation_control_pairs): every target cell has
    one control for the whole run, distinct within its group, from its own cell type; sets
    still change between epochs. A group larger than its pool is an error naming it."""
    from conftest import make_synthetic
    from test_model import small_model

    a = make_synthetic(n_cells=20, n_controls=40)
    prepared = prepare(a, None, ColumnMap.build(pert_col="gene", control_pert="ctrl"))
    d = prepared.splits["train"]
    s = CellSetSampler(d, prepared.vocab, 8, 4, fixed_pairs=True)
    pairs = []
    for epoch in (0, 1):
        targets, basal = s.epoch_sets(epoch)
        pairs.append(dict(zip(targets.ravel().tolist(), basal.ravel().tolist())))
    assert pairs[0] == pairs[1]
    assert not np.array_equal(s.epoch_sets(0)[0], s.epoch_sets(1)[0])  # sets reshuffled
    for g in s.groups:
        controls = s.fixed_basal[g]
        assert len(set(controls.tolist())) == len(g)
        assert (d.context[controls] == d.context[g[0]]).all() and d.is_control[controls].all()
    own = CellSetSampler(d, prepared.vocab, 8, 4, fixed_pairs=True, exclude_self=True)
    ctrl = np.flatnonzero(d.is_target & d.is_control)
    assert len(ctrl) and not (own.fixed_basal[ctrl] == ctrl).any()  # no control with itself
    free = CellSetSampler(d, prepared.vocab, 8, 4)  # default: fresh draws every epoch
    assert not np.array_equal(free.epoch_sets(0)[1], free.epoch_sets(1)[1])
    few = make_synthetic(n_cells=20, n_controls=10)
    with pytest.raises(DataError, match=r"has \d+ cells but its control pool only \d+"):
        small_model(cache_control_pairs=True, max_steps=1).fit(few)
    small_model(cache_control_pairs=True, max_steps=2).fit(a)
    with pytest.raises(ConfigError, match="in memory"):
        small_model(cache_control_pairs=True, data_loading="stream").fit(a)
