"""Out-of-core training (data_loading="stream"): streamed sets, resume, memory bounds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import make_synthetic
from test_model import SMALL
from test_train import weights

import statetx.io
from statetx import StateTransitionModel
from statetx.config import ColumnMap
from statetx.data import prepare
from statetx.errors import ConfigError, DataError
from statetx.sets import CellSetSampler
from statetx.stream import StreamingCellSetSampler, StreamSplit, prepare_stream

COLUMNS = ColumnMap.build(pert_col="gene", cell_type_key="cell_type", control_pert="ctrl")
CHUNK, BUFFER = 16, 3


def _spec(path, extra: str = "") -> str:
    return (f'[datasets]\ndata = "{path}"\n[training]\ndata = "train"\n'
            f'[zeroshot]\n"data.CT2" = "test"\n{extra}')


@pytest.fixture(scope="module")
def adata():
    a = make_synthetic(n_cells=40, n_controls=40, n_genes=16, seed=3)
    # a file in random cell order (the hard case for streaming), CSR as h5ad files usually are
    perm = np.random.default_rng(0).permutation(a.n_obs)
    a = a[perm].copy()
    a.X = sp.csr_matrix(a.X)
    return a


@pytest.fixture(scope="module")
def h5(adata, tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "data.h5ad"
    adata.write_h5ad(path)
    return path


def model(**kw) -> StateTransitionModel:
    opts = dict(pert_col="gene", cell_type_key="cell_type", control_pert="ctrl",
                model_kwargs=SMALL, cell_set_len=8, batch_size=4, max_steps=8, val_freq=4,
                progress=False, seed=0, data_loading="stream", stream_chunk_size=CHUNK,
                stream_buffer_chunks=BUFFER)
    opts.update(kw)
    return StateTransitionModel("tiny", **opts)


def sampler(h5, **kw) -> StreamingCellSetSampler:
    prepared = prepare_stream(None, _spec(h5), COLUMNS, chunk_size=kw.pop("chunk_size", CHUNK))
    opts = dict(seed=1, buffer_chunks=BUFFER)
    opts.update(kw)
    return StreamingCellSetSampler(prepared.splits["train"], prepared.vocab, 8, 4, **opts)


def test_streamed_fit_trains_and_predicts(h5, adata):
    m = model(max_steps=60, val_freq=20, lr=3e-3, model_kwargs={**SMALL, "dropout": 0.0})
    m.fit(None, _spec(h5, '[fewshot."data.CT1"]\nval = ["P0"]\n'))
    h = m.history_.dropna(subset=["val_loss"])
    assert h["val_loss"].iloc[-1] < h["val_loss"].iloc[0]
    assert h["train_loss_eval"].iloc[-1] < h["train_loss_eval"].iloc[0]
    pred, real = m.predict_split("test")
    assert pred.shape == real.shape and pred.n_obs > 0 and np.isfinite(pred.X).all()
    out = m.predict(adata[:50].copy())
    assert out.shape == (50, adata.n_vars)
    with pytest.raises(DataError, match=r"streamed \(data_loading=.stream.\).*"
                                        r"attach_data\(model, stream=False"):
        m.predict_split("train")
    from statetx.run import attach_data

    attach_data(m, stream=False)  # the split spec the model was fitted with, in memory
    pred, real = m.predict_split("train")
    assert pred.n_obs == real.n_obs > 0


def test_same_seed_same_weights_and_resume_is_exact(h5, tmp_path):
    spec = _spec(h5, '[fewshot."data.CT1"]\nval = ["P0"]\n')
    full = model(max_steps=10, val_freq=5, ckpt_every_n_steps=5)
    full.fit(None, spec, output_dir=tmp_path / "a")
    again = model(max_steps=10, val_freq=5, ckpt_every_n_steps=5).fit(None, spec)
    wa = weights(full)
    assert all(torch.equal(wa[k], v) for k, v in weights(again).items())
    model(max_steps=5, val_freq=5, ckpt_every_n_steps=5).fit(None, spec, output_dir=tmp_path / "b")
    part = model(max_steps=10, val_freq=5, ckpt_every_n_steps=5)
    part.fit(None, spec, output_dir=tmp_path / "b",
             resume_from=tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert all(torch.equal(wa[k], v) for k, v in weights(part).items())
    other = model(max_steps=10, val_freq=5, seed=1).fit(None, spec)
    assert not all(torch.equal(wa[k], v) for k, v in weights(other).items())


def test_a_streamed_resume_refuses_changed_values(adata, tmp_path):
    """The values of a streamed split are checked on resume too (rows read from the file), as
    in memory: a changed training value is refused."""
    from statetx.train import TrainingError

    path = tmp_path / "d.h5ad"
    adata.write_h5ad(path)
    model(max_steps=4, val_freq=4).fit(None, _spec(path), output_dir=tmp_path / "run")
    changed = adata.copy()
    train = np.flatnonzero(changed.obs["cell_type"].to_numpy() != "CT2")
    changed.X = changed.X.toarray()
    changed.X[train] = changed.X[train] * 2 + 1  # (every train row: whichever rows are sampled)
    changed.X = sp.csr_matrix(changed.X)
    changed.write_h5ad(path)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(TrainingError, match="the expression values of the train split"):
        model(max_steps=8, val_freq=4).fit(None, _spec(path), output_dir=tmp_path / "run",
                                           resume_from=last)
    adata.write_h5ad(path)  # the same values again: the resume goes on
    m = model(max_steps=8, val_freq=4).fit(None, _spec(path), output_dir=tmp_path / "run",
                                           resume_from=last)
    assert m.history_["step"].max() == 8


def test_batches_resume_and_match_the_in_memory_layout(h5):
    s = sampler(h5)
    full = list(s.batches(2))
    assert len(full) == s.n_batches(2) and s.n_batches(2) > 3
    tail = list(s.batches(2, start=3))
    assert len(tail) == len(full) - 3
    for a, b in zip(full[3:], tail):
        assert np.array_equal(a.target_rows, b.target_rows)
        assert torch.equal(a.target, b.target) and torch.equal(a.basal, b.basal)
    # same fields and dtypes as the in-memory sampler
    mem = prepare(None, _spec(h5), COLUMNS)
    ref = next(CellSetSampler(mem.splits["train"], mem.vocab, 8, 4).batches(0))
    got = full[0]
    for name in ("basal", "target", "pert", "pert_index", "batch_index", "cell_type_index"):
        assert getattr(got, name).dtype == getattr(ref, name).dtype, name
        assert getattr(got, name).shape == getattr(ref, name).shape, name
    assert got.counts is None
    # values are the file's rows; sets are one group; basal cells are controls of that context
    d, x = s.data, mem.splits["train"].X  # both order the split's rows by file row
    for batch in full:
        assert torch.equal(batch.target, x[torch.from_numpy(batch.target_rows)])
        assert torch.equal(batch.basal, x[torch.from_numpy(batch.basal_rows)])
        for t, b in zip(batch.target_rows, batch.basal_rows):
            assert len(set(d.pert[t])) == 1 and len(set(d.context[t])) == 1
            assert d.is_control[b].all() and (d.context[b] == d.context[t[0]]).all()


def test_every_training_cell_once_per_epoch_without_padding(h5):
    s = sampler(h5, drop_last=False)
    seen = np.concatenate([b.target_rows.reshape(-1) for b in s.batches(0)])
    assert set(seen) == set(np.flatnonzero(s.data.is_target))
    pad = s.padding_fraction(0)
    assert 0 < pad < 1  # random cell order: short groups per window are padded
    n_unique = len(np.unique(seen))
    assert len(seen) - n_unique <= round(pad * len(seen))
    assert s.padding_fraction(0) > sampler(h5, buffer_chunks=1000).padding_fraction(0)
    other = [b.target_rows for b in s.batches(1)]
    assert not np.array_equal(other[0], next(iter(s.batches(0))).target_rows)


@pytest.mark.filterwarnings("ignore:.*are padding")  # 3 cells per group, sets of 8
def test_downsample_cells_keeps_the_in_memory_subset(h5):
    s = sampler(h5, downsample_cells=3, buffer_chunks=1000)
    seen = np.unique(np.concatenate([b.target_rows.reshape(-1) for b in s.batches(0)]))
    mem = prepare(None, _spec(h5), COLUMNS)
    ref = CellSetSampler(mem.splits["train"], mem.vocab, 8, 4, seed=1, downsample_cells=3)
    ref_seen = np.unique(np.concatenate([b.target_rows.reshape(-1) for b in ref.batches(0)]))
    assert np.array_equal(seen, ref_seen)
    d = s.data
    groups = pd.Series(list(zip(d.context[seen], d.pert[seen]))).value_counts()
    assert (groups <= 3).all() and len(seen) < d.is_target.sum()


def test_the_whole_matrix_is_never_loaded(tmp_path, monkeypatch):
    big = make_synthetic(n_cells=100, n_controls=100, n_genes=8, seed=1)  # 1,200 cells
    big.X = sp.csr_matrix(big.X)
    h5 = tmp_path / "big.h5ad"
    big.write_h5ad(h5)
    requested = []
    real = statetx.io.read_h5_rows

    def spy(path, key, rows, dtype=np.float32):
        requested.append(len(rows))
        return real(path, key, rows, dtype)

    monkeypatch.setattr(statetx.io, "read_h5_rows", spy)
    prepared = prepare_stream(None, _spec(h5), COLUMNS, chunk_size=CHUNK)
    train = prepared.splits["train"]
    assert isinstance(train, StreamSplit) and "val" not in prepared.splits
    # reads: the scale check's 500-row sample and the (in-memory) test split, never training
    assert sorted(requested) == [400, 500] and train.n_obs == 900
    with pytest.raises(DataError, match="streamed"):
        _ = train.X
    s = StreamingCellSetSampler(train, prepared.vocab, 8, 4, seed=0, buffer_chunks=BUFFER)
    for _ in s.batches(0):
        pass
    assert s.reader.max_block_rows <= CHUNK
    assert 0 < s.peak_rows_held <= 2 * BUFFER * CHUNK < train.n_obs
    assert s.windows_read == -(-len(s.chunks) // BUFFER)
    # an epoch reads each chunk once, plus the reservoir once at start-up
    assert s.reader.rows_read <= 2 * big.n_obs


def test_streamed_context_means_match_memory_and_shift_init_trains(h5):
    stream = prepare_stream(None, _spec(h5), COLUMNS, chunk_size=CHUNK)
    mem = prepare(None, _spec(h5), COLUMNS)
    a, b = stream.splits["train"].context_means(), mem.splits["train"].context_means()
    assert sorted(a) == sorted(b)
    for p in a:
        assert len(a[p]) == len(b[p])
        for (ca, ta), (cb, tb) in zip(a[p], b[p]):
            np.testing.assert_allclose(ca, cb, atol=1e-10)
            np.testing.assert_allclose(ta, tb, atol=1e-10)
    kw = {**SMALL, "pert_skip": "shift", "residual_space": "input", "predict_residual": True}
    m = model(max_steps=2, model_kwargs=kw).fit(None, _spec(h5))
    assert m.network_.pert_bias.weight.abs().sum() > 0


def test_the_mean_response_pass_checks_the_values_once(h5, monkeypatch):
    """A skip started at the mean response reads every training cell before training: that
    pass checks them for NaN/Inf, and the sampler does not read them again to do so."""
    checked = []
    check = StreamSplit.check_values
    monkeypatch.setattr(StreamSplit, "check_values", lambda self, reader, rows: (
        checked.append(reader.source), check(self, reader, rows))[1])
    kw = {**SMALL, "pert_skip": "shift", "residual_space": "input", "predict_residual": True}
    model(max_steps=1, model_kwargs=kw).fit(None, _spec(h5))
    assert checked == []
    model(max_steps=1).fit(None, _spec(h5))
    assert checked == [None]  # no mean-response pass: the sampler checks X


def test_reservoir_cap_batch_pairing_and_float16(h5):
    s = sampler(h5, max_controls=5)
    d = s.data
    ctx = d.context[s.reservoir_rows]
    assert np.bincount(ctx).max() == 5
    for b in s.batches(0):
        assert np.isin(b.basal_rows, s.reservoir_rows).all()
    prepared = prepare_stream(None, _spec(h5), COLUMNS.model_copy(update={"batch_col": "batch"}),
                              chunk_size=CHUNK, dtype="float16")
    with pytest.warns(UserWarning, match=r"padding.*Raise stream_buffer_chunks"):
        # groups split by batch too: few cells of a group per window of 48 random cells
        sb = StreamingCellSetSampler(prepared.splits["train"], prepared.vocab, 8, 4,
                                     pairing="batch", buffer_chunks=BUFFER)
    assert sb.reservoir_x.dtype == torch.float16
    batch = next(iter(sb.batches(0)))
    assert batch.target.dtype == torch.float32
    d = sb.data
    for t, b in zip(batch.target_rows, batch.basal_rows):
        assert len(set(d.batch[t])) == 1
        if (d.is_control & (d.context == d.context[t[0]]) & (d.batch == d.batch[t[0]])).any():
            assert (d.batch[b] == d.batch[t[0]]).all()


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharding_splits_one_process_epoch_without_overlap(h5, world_size):
    one = sampler(h5)._plan(0)
    ranks = [sampler(h5, rank=r, world_size=world_size) for r in range(world_size)]
    plans = [r._plan(0) for r in ranks]
    assert len({r.n_batches(0) for r in ranks}) == 1
    sets = [tuple(t) for p in plans for t in p.targets]
    want = [tuple(t) for t in one.targets]
    # the ranks' sets are the one-process epoch's sets, each in one rank, and at most
    # world_size - 1 of the first ones wrapped round to fill the last rank
    n = len(want)
    assert sets[:n] == want and sets[n:] == want[:len(sets) - n]
    assert len(sets) - n < world_size
    # each rank trains its share in order, reading only the windows it touches
    for r, p in zip(ranks, plans):
        got = np.concatenate([b.target_rows for b in r.batches(0)])
        np.testing.assert_array_equal(got, p.targets)
        r.close()
    assert sum(r.windows_read for r in ranks) <= len(one.windows) + 2 * (world_size - 1)
    with pytest.raises(ConfigError, match="rank"):
        sampler(h5, rank=world_size, world_size=world_size)


@pytest.mark.parametrize("opts, match", [
    ({"data_loading": "disk"}, "data_loading='disk' is invalid"),
    ({"stream_chunk_size": 0}, "stream_chunk_size=0 is invalid"),
    ({"stream_buffer_chunks": 2.5}, "stream_buffer_chunks=2.5 is invalid"),
    ({"stream_max_controls": -1}, "stream_max_controls=-1 is invalid"),
])
def test_bad_options_fail_before_reading_data(opts, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        model(**opts).fit(None, _spec(tmp_path / "missing.h5ad"))


def test_non_finite_rows_are_reported_with_the_file(adata, tmp_path):
    bad = adata.copy()
    x = bad.X.toarray()
    row = int(np.flatnonzero(bad.obs["cell_type"].to_numpy() != "CT2")[0])  # a training cell
    x[row, 3] = np.nan
    bad.X = sp.csr_matrix(x)
    path = tmp_path / "bad.h5ad"
    bad.write_h5ad(path)
    # found by the pass over the training cells before training: nothing is written
    name = bad.obs_names[row]
    out = tmp_path / "run"
    with pytest.raises(DataError, match=rf"bad.h5ad: cell {name} \(row {row}\) has NaN or Inf "
                                        "values in X"):
        model(max_steps=30).fit(None, _spec(path), output_dir=out)
    assert not out.exists() or not any(out.iterdir())
    skip = {**SMALL, "pert_skip": "shift", "residual_space": "input", "predict_residual": True}
    with pytest.raises(DataError, match=rf"cell {name} \(row {row}\) has NaN or Inf"):
        model(max_steps=30, model_kwargs=skip).fit(None, _spec(path))  # (the mean-response pass)
    big = adata.copy()  # a value float16 cannot hold becomes Inf when read as float16
    x = big.X.toarray()
    x[row, 3] = 7e4
    big.X = sp.csr_matrix(x)
    big.write_h5ad(tmp_path / "big.h5ad")
    with pytest.raises(DataError, match=rf"cell {name} \(row {row}\) has NaN or Inf"):
        model(max_steps=30, model_kwargs=skip, dtype="float16").fit(
            None, _spec(tmp_path / "big.h5ad"))
    # under torchrun the check is shared out: the process whose share holds the cell fails
    prepared = prepare_stream(None, _spec(path), COLUMNS, chunk_size=CHUNK)
    split = prepared.splits["train"]
    found = []
    for r in range(2):
        try:
            StreamingCellSetSampler(split, prepared.vocab, 8, 4, rank=r, world_size=2,
                                    buffer_chunks=BUFFER).close()
        except DataError:
            found.append(r)
    assert len(found) == 1
    # a dry run of the command line finds it too
    from statetx.cli import main

    (tmp_path / "bad.toml").write_text(_spec(path))
    assert main(["tx", "train", f"data.kwargs.toml_config_path={tmp_path / 'bad.toml'}",
                 "data.kwargs.pert_col=gene", "data.kwargs.control_pert=ctrl",
                 "data.kwargs.data_loading=stream", "data.kwargs.stream_chunk_size=16",
                 "model=tiny", "model.kwargs.cell_set_len=8", f"output_dir={tmp_path}",
                 "name=dry", "dry_run=true"]) == 2
    # NaN in a cell of a cell type no split uses is no error (as in memory)
    ct = bad.obs["cell_type"].iloc[row]
    others = sorted(set(adata.obs["cell_type"]) - {ct, "CT2"})
    spec = (f'[datasets]\ndata = "{path}"\n[zeroshot]\n"data.CT2" = "test"\n'
            + "".join(f'"data.{c}" = "train"\n' for c in others))
    model(max_steps=2).fit(None, spec)


def test_dense_h5ad_and_in_memory_anndata_stream(adata, tmp_path):
    dense = adata.copy()
    dense.X = dense.X.toarray()
    path = tmp_path / "dense.h5ad"
    dense.write_h5ad(path)
    a = model(max_steps=3).fit(None, _spec(path))
    b = model(max_steps=3).fit(dense, '[training]\ndata = "train"\n[zeroshot]\n"data.CT2" = '
                                      '"test"\n', dataset_name="data")
    assert all(torch.equal(v, weights(b)[k]) for k, v in weights(a).items())


def test_window_memory_counts_a_wider_gene_space_target(adata, tmp_path):
    """X_hvg input (4 columns) with output_space='all' (targets from X, 16 columns): a window
    holds both, and the device estimate counts four windows."""
    a = adata.copy()
    a.obsm["X_hvg"] = np.asarray(a.X[:, :4].toarray())
    path = tmp_path / "hvg.h5ad"
    a.write_h5ad(path)
    cols = ColumnMap.build(pert_col="gene", cell_type_key="cell_type", control_pert="ctrl",
                           embed_key="X_hvg", output_space="all")
    prepared = prepare_stream(None, _spec(path), cols, chunk_size=CHUNK)
    s = StreamingCellSetSampler(prepared.splits["train"], prepared.vocab, 8, 4, seed=1,
                                buffer_chunks=BUFFER)
    assert s.row_bytes == (4 + 16) * 4
    res = s.reservoir_x.numel() * s.reservoir_x.element_size()
    assert s.nbytes == res + 4 * s.window_rows * (4 + 16) * 4
    s.close()


def test_streaming_options_without_streaming_are_said_to_have_no_effect():
    from statetx.stream import stream_settings

    with pytest.warns(UserWarning, match=r"stream_buffer_chunks=3, stream_max_controls=10 has "
                      "no effect with data_loading='memory'"):
        assert stream_settings("memory", buffer_chunks=3, max_controls=10) is None


def test_streamed_fit_with_mostly_padded_sets_warns_once(h5):
    """Sets far longer than the groups: the streaming sampler says so itself (the in-memory
    padding check is not applied to it; it once crashed on the streamed sampler)."""
    with pytest.warns(UserWarning, match="padding") as said:
        model(cell_set_len=64, max_steps=1, progress=False).fit(None, _spec(h5))
    assert sum("padding" in str(w.message) for w in said) == 1


def test_streaming_an_in_memory_anndata_says_it_saves_nothing(adata, capsys):
    m = model(max_steps=1)
    m.fit(adata, '[training]\ndata = "train"\n')
    assert "saves no memory: give file paths in [datasets], or backed AnnData" in \
        capsys.readouterr().out
