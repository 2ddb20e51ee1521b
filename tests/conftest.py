"""Shared test fixtures. Tests that need ``../shared`` skip with a clear reason when it is absent."""

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
        pytest.skip(f"{path} not found: the shared data folder (../shared next to the repo) is absent")
    return path


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
