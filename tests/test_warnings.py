"""statetx's warnings name the user's line: the first frame outside the package, however deep
inside statetx the warning is raised (statetx._utils.warn)."""

from __future__ import annotations

import os
import re
import sys
import textwrap
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
from conftest import make_synthetic
from test_data_errors import COLS, TRAIN, make_adata
from test_model import SPEC, small_model
from test_pp import _toy

import statetx._utils
from statetx import pp
from statetx._utils import warn


@contextmanager
def said(match: str, category: type[Warning] = UserWarning):
    """The block's statement (on the line after the ``with``) gives a warning matching
    ``match``; every such warning names that line of this file."""
    line = sys._getframe(2).f_lineno + 1  # (the with statement's frame, under contextlib's)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    hits = [w for w in caught if re.search(match, str(w.message))]
    assert hits, f"no warning matches {match!r}: {[str(w.message)[:80] for w in caught]}"
    assert [(w.filename, w.lineno, w.category) for w in hits] == [
        (__file__, line, category)] * len(hits)


@pytest.fixture(scope="module")
def hvg_flagged():
    """obsm['X_hvg'] of 10 genes (uns['X_hvg_var_names']), var['highly_variable'] flags 11."""
    a = make_synthetic()
    hvg = list(a.var_names[:10])
    a.var["highly_variable"] = a.var_names.isin(hvg)
    a.obsm["X_hvg"] = a[:, hvg].X.copy()
    a.uns["X_hvg_var_names"] = np.asarray(hvg)
    a.var.loc["G20", "highly_variable"] = True
    return a


def test_estimator_warnings_name_the_callers_line(hvg_flagged):
    """One warning reached at several depths (io.hvg_names: from fit's data loading, from
    predict's gene alignment, called directly), and fit's and predict's own."""
    from statetx.io import hvg_names

    hvg = r"flags 11 \(also G20\): X_hvg is read as it is"
    with said(hvg):
        model = small_model(embed_key="X_hvg", max_steps=1).fit(hvg_flagged, SPEC)
    with said(hvg):
        model.predict(hvg_flagged)
    with said(hvg):
        hvg_names(hvg_flagged)
    a = make_synthetic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = small_model(max_steps=1).fit(a, SPEC)
    with said(r"3 of 32 model genes are missing from the input and are filled with 0: G0"):
        plain.predict(a[:, 3:].copy(), missing_genes="zero")
    many = make_synthetic(n_cell_types=1, n_perts=2, n_cells=40, n_controls=60, batches=20)
    with said(r"of the training set positions are padding"):
        small_model(batch_col="batch", max_steps=1).fit(many)


def test_streamed_fit_warning_names_the_callers_line(tmp_path):
    a = make_synthetic(n_cells=40, n_controls=40, n_genes=16, seed=3)
    a.write_h5ad(tmp_path / "d.h5ad")
    spec = f'[datasets]\ndata = "{tmp_path / "d.h5ad"}"\n' + SPEC
    opts = dict(cell_set_len=64, max_steps=1, data_loading="stream", stream_chunk_size=16,
                stream_buffer_chunks=2)
    with said(r"cell-set positions of a streamed epoch are padding"):
        small_model(**opts).fit(None, spec)


def test_preprocessing_warnings_name_the_callers_line():
    counts = make_synthetic()
    counts.X = np.round(np.expm1(counts.X) * 5).astype(np.float32)
    with said(r"n_top_genes=500 exceeds the number of genes \(32\)"):
        pp.preprocess_train(counts, n_top_genes=500, copy=True)
    view = counts[counts.obs["cell_type"] != "CT2"]
    with said(r"preprocess_train \(in place, copy=False\) on a view"):
        pp.preprocess_train(view, n_top_genes=10)
    with said(r"duplicated names; these targets resolve to their first occurrence: G0"):
        pp.filter_on_target_knockdown(_toy(dup=True), "gene", "ctrl", var_gene_name="gene_name")


def test_split_warnings_name_the_callers_line():
    from statetx.data import prepare
    from statetx.splits import assign

    spec = {**TRAIN, "fewshot": {"d.A": {"test": ["P1", "FOO", "BAR"]}}}
    with said(r"lists 2 perturbation\(s\) that no A cell carries.*FOO, BAR"):
        assign(make_adata(), spec, COLS, on_missing_perturbation="warn")
    a = make_adata()
    a.obs["cell_type"] = a.obs["cell_type"].astype(str).where(np.arange(a.n_obs) % 4 > 0, "nan")
    with said(r"obs\['cell_type'\] label\(s\) 'nan' .* look like missing values"):
        prepare(a, TRAIN, COLS)


def test_metrics_warnings_name_the_callers_line():
    """Warnings of evaluate's phase helpers and of the data ceiling it computes."""
    from statetx.metrics import evaluate
    from statetx.metrics._synthetic import synthetic_log1p

    real, effects = synthetic_log1p(6, 40, 80, 60, seed=1)
    pred = synthetic_log1p(6, 30, 70, 60, seed=2, effects=effects)[0]
    labels = real.obs["target_gene"].astype(str).to_numpy()
    first = {lab: i for i, lab in reversed(list(enumerate(labels)))}
    keep = np.isin(np.arange(len(labels)), list(first.values())) | (labels == "non-targeting")
    one = real[keep].copy()  # one cell per perturbation: no ceiling
    with said(r"ceiling: 6 group\(s\) have a single cell|the data ceiling could not be computed"):
        evaluate(pred, one, profile="minimal", num_threads=1, ceiling=True)
    few = real[np.isin(labels, ["non-targeting", "G000", "G001"])].copy()
    with said(r"rank each prediction among the real deltas of only 2 perturbation"):
        evaluate(few, few.copy(), profile="pds", num_threads=1)


# ------------------------------------------------------------------------------ warn itself
PACKAGE = os.path.dirname(os.path.abspath(statetx._utils.__file__))


def _in_statetx(folder: str = PACKAGE) -> dict:
    """Functions whose code claims a file inside the statetx package (as its modules' do)."""
    src = textwrap.dedent("""
        from statetx._utils import warn

        def inner(msg, category=UserWarning):
            warn(msg, category)

        def outer(msg, category=UserWarning):
            inner(msg, category)

        def through(callback):
            return callback()
    """)
    ns: dict = {}
    exec(compile(src, os.path.join(folder, "_warn_probe.py"), "exec"), ns)  # noqa: S102
    return ns


def test_warn_names_the_first_frame_outside_statetx():
    ns = _in_statetx()
    with said("deep", DeprecationWarning):
        ns["outer"]("deep", DeprecationWarning)
    with said("shallow"):
        ns["inner"]("shallow")
    with said("direct"):
        warn("direct")  # (called from outside: this line)
    realpath = _in_statetx(os.path.realpath(PACKAGE))  # (frames may name files either way)
    with said("resolved"):
        realpath["outer"]("resolved")

    def callback():  # outside statetx, called from inside it: the first frame outside
        with said("callback"):
            ns["outer"]("callback")

    ns["through"](callback)


def test_warn_without_a_frame_outside_names_the_outermost(monkeypatch):
    monkeypatch.setattr(statetx._utils, "_PACKAGE_DIRS", ("",))  # every file counts as inside
    frame = sys._getframe()
    while frame.f_back is not None:
        frame = frame.f_back
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _in_statetx()["outer"]("nowhere")
    assert [(w.filename, w.lineno) for w in caught] == [(frame.f_code.co_filename,
                                                         frame.f_lineno)]
