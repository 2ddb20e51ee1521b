"""Shared test fixtures. Tests that need ``../shared`` skip with a clear reason without it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
FIXTURES = SHARED / "fixtures"

KANG = DATA / "kang2018_pbmc_ifnb_muscat_counts.h5ad"
PERTURBENCH = DATA / "perturbench_devel_norman19_mcfaline23.h5ad"
PAPALEXI = DATA / "papalexi2021_thp1_lowmoi_sceptredata.h5ad"
ZHAO = DATA / "zhao2021_glioblastoma_panobinostat_lemur_counts.h5ad"


def need(path: Path) -> Path:
    """Skip the calling test unless ``path`` (a file in ../shared) exists."""
    if not path.exists():
        pytest.skip(f"{path} not found: the shared data folder (../shared next to the repo) "
                    "is absent")
    return path


def writable_copy(src: Path, dst: Path) -> Path:
    """A copy of a (read-only) fixture folder whose files and folders can be changed."""
    import shutil

    shutil.copytree(need(src), dst, copy_function=shutil.copyfile)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    return dst


@pytest.fixture(scope="session")
def kang_raw():
    import anndata as ad

    return ad.read_h5ad(need(KANG))


@pytest.fixture(scope="session")
def kang_log(kang_raw):
    """Kang 2018 normalised (target 1e4) and log1p-transformed, dense float32 X."""
    import numpy as np
    import scanpy as sc

    a = kang_raw.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    a.X = np.asarray(a.X.toarray(), dtype=np.float32)
    return a


@pytest.fixture(scope="session")
def perturbench():
    import anndata as ad

    return ad.read_h5ad(need(PERTURBENCH))


@pytest.fixture(scope="session")
def papalexi():
    import anndata as ad

    return ad.read_h5ad(need(PAPALEXI))


@pytest.fixture(scope="session")
def zhao_raw():
    import anndata as ad

    return ad.read_h5ad(need(ZHAO))


def make_synthetic(n_cell_types: int = 3, n_perts: int = 3, n_cells: int = 24, n_genes: int = 32,
                   n_controls: int = 30, seed: int = 0, batches: int = 2):
    """A small log1p-like perturbation AnnData: each perturbation shifts a few genes."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 0.5, size=n_genes)
    effects = {f"P{i}": np.where(rng.random(n_genes) < 0.2, rng.normal(0, 1.5, n_genes), 0.0)
               for i in range(n_perts)}
    rows, obs = [], []
    for c in range(n_cell_types):
        ct_shift = rng.normal(0, 0.3, n_genes)
        for pert, n in [("ctrl", n_controls)] + [(p, n_cells) for p in effects]:
            eff = 0.0 if pert == "ctrl" else effects[pert] * (1 + 0.3 * c)
            mu = np.clip(base + ct_shift + eff, 0.05, None)
            rows.append(np.log1p(rng.poisson(np.expm1(mu) * 3, size=(n, n_genes)) / 3.0))
            obs += [{"gene": pert, "cell_type": f"CT{c}", "batch": f"b{rng.integers(batches)}"}
                    for _ in range(n)]
    x = np.vstack(rows).astype(np.float32)
    obs = pd.DataFrame(obs, index=[f"cell{i}" for i in range(len(obs))])
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]))


@pytest.fixture
def synth():
    return make_synthetic()


def pytest_configure(config):
    """Test data are written by the tests themselves: under pandas >= 3 their string columns are
    nullable strings, which anndata writes only on opt-in (statetx's own writers convert them)."""
    import anndata as ad

    if hasattr(ad.settings, "allow_write_nullable_strings"):
        ad.settings.allow_write_nullable_strings = True
