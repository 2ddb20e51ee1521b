"""Tests of the bundled example datasets (statetx.datasets); they need no ../shared."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from statetx import datasets
from statetx.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

COLS = ("target_gene", "is_control", "cell_type", "batch")


def test_bundled_files_are_compact_and_documented():
    assert set(datasets.available()) == {"zhao2021", "perturbench_devel"}
    for name in datasets.available():
        path = datasets.data_path(name)
        assert path.parent == datasets.DATA_DIR and path.suffix == ".h5ad"
        assert path.stat().st_size < 2_000_000
    readme = (datasets.DATA_DIR / "README.md").read_text()
    for word in ("MIT", "BSD-3-Clause", "const-ae/lemur", "altoslabs/perturbench", "Changes"):
        assert word in readme


def test_load_zhao2021():
    a = datasets.load_zhao2021()
    assert a.shape == (5000, 300)
    assert all(c in a.obs for c in (*COLS, "patient_id", "treatment", "sample_id"))
    assert a.obs["target_gene"].value_counts().to_dict() == {"DMSO": 2500, "panobinostat": 2500}
    assert (a.obs["is_control"] == (a.obs["target_gene"] == "DMSO")).all()
    assert a.obs["cell_type"].value_counts().to_dict() == {
        f"glioblastoma_PW0{p}": 1000 for p in (30, 32, 34, 36, 40)
    }
    assert sp.issparse(a.X) and a.X.dtype == np.float32
    assert (a.layers["counts"] != a.X).nnz == 0
    assert np.array_equal(a.X.data, np.round(a.X.data))
    assert "MT2A" in set(a.var["symbol"])
    b = datasets.load("zhao")  # alias; a fresh copy each call
    b.X.data[:] = 0
    assert datasets.load_zhao2021().X.sum() > 0


def test_load_perturbench_devel():
    a = datasets.load_perturbench_devel()
    assert a.shape == (5961, 500)
    assert all(c in a.obs for c in (*COLS, "perturbation_type", "ncounts"))
    assert a.obs["cell_type"].value_counts().to_dict() == {
        "k562": 3375, "T98G": 871, "U87MG": 865, "A172": 850
    }
    assert (a.obs["target_gene"] == "control").sum() == 400
    assert a.obs["target_gene"].nunique() == 34 and "log1p" in a.uns
    assert a.X.dtype == np.float64 and a.layers["counts"].dtype == np.float32
    c = a.layers["counts"]
    assert np.array_equal(c.data, np.round(c.data))
    # X = log1p of counts scaled per cell, same sparsity pattern
    x = sp.csr_matrix(a.X)
    ratio = np.expm1(x.data) / c.data
    rows = np.repeat(np.arange(a.n_obs), np.diff(x.indptr))
    per_row = np.bincount(rows, ratio) / np.bincount(rows)
    np.testing.assert_allclose(ratio, per_row[rows], rtol=1e-9)


@pytest.mark.parametrize(
    ("name", "fixture"), [("zhao2021", "zhao_raw"), ("perturbench_devel", "perturbench")]
)
def test_bundled_equal_originals(name, fixture, request):
    orig = request.getfixturevalue(fixture)  # skips when ../shared is absent
    a = datasets.load(name)
    assert a.shape == orig.shape
    assert (a.X != orig.X).nnz == 0 and a.X.dtype == orig.X.dtype
    assert (a.layers["counts"] != orig.layers["counts"]).nnz == 0
    assert a.layers["counts"].dtype == orig.layers["counts"].dtype
    assert a.obs.equals(orig.obs) and a.var.equals(orig.var)
    assert (a.obs.dtypes == orig.obs.dtypes).all()
    assert a.uns["source"] == orig.uns["source"]


@pytest.mark.parametrize(
    ("name", "dataset", "test_ct"),
    [("zhao2021", "zhao", "glioblastoma_PW034"), ("perturbench_devel", "perturbench", "U87MG")],
)
def test_example_tomls(name, dataset, test_ct):
    path = datasets.example_toml(name)
    cfg = tomllib.loads(path.read_text())
    assert cfg["training"] == {dataset: "train"}
    assert cfg["zeroshot"][f"{dataset}.{test_ct}"] == "test"
    assert list(cfg["zeroshot"].values()).count("val") == 1
    target = path.parent / cfg["datasets"][dataset]
    assert target.resolve() == datasets.data_path(name).resolve()
    cell_types = set(datasets.load(name).obs["cell_type"])
    for key in cfg["zeroshot"]:
        assert key.split(".", 1)[1] in cell_types


def test_example_tomls_parse_with_splitconfig():
    config = pytest.importorskip("statetx.config")
    for name in datasets.available():
        cfg = config.SplitConfig.from_toml(datasets.example_toml(name))
        (ds,) = cfg.datasets
        assert [p.resolve() for p in cfg.resolve_paths(ds)] == [datasets.data_path(name).resolve()]


def test_unknown_name():
    with pytest.raises(ConfigError, match="zhao2021"):
        datasets.example_toml("zhao2012")


def test_make_synthetic_is_a_seeded_screen_the_tools_accept():
    from statetx import pp
    from statetx.baselines import PerturbMeanBaseline
    from statetx.datasets import make_synthetic

    a = make_synthetic(n_cell_types=3, n_perts=4, n_cells=30, n_controls=40, n_genes=50)
    assert a.shape == (3 * (40 + 4 * 30), 50) and "log1p" in a.uns
    np.testing.assert_array_equal(a.X, make_synthetic(n_cell_types=3, n_perts=4, n_cells=30,
                                                      n_controls=40, n_genes=50).X)
    assert not np.array_equal(a.X, make_synthetic(n_cell_types=3, n_perts=4, n_cells=30,
                                                  n_controls=40, n_genes=50, seed=1).X)
    ctrl = a[a.obs["target_gene"] == "non-targeting"]
    g1 = a[a.obs["target_gene"] == "G001"]
    assert g1[:, "G001"].X.mean() < 0.5 * ctrl[:, "G001"].X.mean()  # its own gene knocked down
    counts = make_synthetic(n_genes=50, n_perts=4, counts=True)
    assert np.array_equal(counts.X, np.round(counts.X)) and "log1p" not in counts.uns
    kept = pp.filter_on_target_knockdown(counts, "target_gene", "non-targeting", min_cells=10)
    assert set(kept.obs["target_gene"]) == {"non-targeting", "G000", "G001", "G002", "G003"}
    spec = {"training": {"data": "train"}, "zeroshot": {"data.CT2": "test"}}
    pred, real = PerturbMeanBaseline(pert_col="target_gene", cell_type_key="cell_type",
                                     control_pert="non-targeting").fit(a, spec).predict_split()
    assert set(real.obs["cell_type"]) == {"CT2"} and pred.shape == real.shape
    with pytest.raises(ConfigError, match="n_perts=60 exceeds n_genes=50"):
        make_synthetic(n_perts=60, n_genes=50)
