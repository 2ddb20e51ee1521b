"""``prep_vcc`` / ``statetx evaluate prep``: packaging a prediction for the Virtual Cell
Challenge (metrics.md §10) — round trip through the archive, the checks, atomic writing."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import shutil
import subprocess
import sys
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from statetx.errors import ConfigError, DataError
from statetx.metrics import prep_vcc
from statetx.metrics import vcc as vcc_module

HAVE_ZSTANDARD = importlib.util.find_spec("zstandard") is not None
HAVE_ZSTD_PROGRAM = shutil.which("zstd") is not None
needs_zstd = pytest.mark.skipif(
    not (HAVE_ZSTANDARD or HAVE_ZSTD_PROGRAM),
    reason="neither the zstandard module nor the zstd program is installed "
    "(pip install zstandard, or install zstd)")
PERTS = ["control", "MAPK1", "PLK4", "SGK1"]


@pytest.fixture
def small(perturbench) -> ad.AnnData:
    """Real log1p data (Norman 2019 K562, float64 CSR): 4 labels x 30 cells x 60 genes."""
    k562 = perturbench[perturbench.obs["cell_type"] == "k562"]
    keep = np.concatenate([np.flatnonzero(k562.obs["target_gene"].to_numpy() == p)[:30]
                           for p in PERTS])
    return k562[keep, :60].copy()


def _genes_file(path: Path, genes: list[str], header: str | None = None) -> Path:
    path.write_text("".join(f"{g}\n" for g in ([header] if header else []) + genes))
    return path


def _shuffled(adata: ad.AnnData, seed: int = 0) -> list[str]:
    genes = list(map(str, adata.var_names))
    return [genes[i] for i in np.random.default_rng(seed).permutation(len(genes))]


def _decompress(data: bytes) -> bytes:
    try:
        import zstandard
    except ImportError:  # absent, or hidden by _force_backend
        zstandard = None
    if zstandard is not None:
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    return subprocess.run(["zstd", "-d", "-q", "-c"], input=data, capture_output=True,
                          check=True).stdout


def _unpack(archive: Path, tmp: Path) -> tuple[list[str], ad.AnnData, dict[str, str], bytes]:
    """(member names, the packaged AnnData, watermark fields, the compressed h5ad bytes)."""
    with tarfile.open(archive, "r:") as tar:  # "r:": an uncompressed tar
        names = tar.getnames()
        zst_name = next(n for n in names if n.endswith(".h5ad.zst"))
        zst = tar.extractfile(zst_name).read()
        mark = tar.extractfile("watermark.txt").read().decode("utf-8")
    h5ad = tmp / "unpacked.h5ad"
    h5ad.write_bytes(_decompress(zst))
    fields = dict(line.split(": ", 1) for line in mark.splitlines() if ": " in line)
    return names, ad.read_h5ad(h5ad), fields, zst


def _force_backend(monkeypatch, backend: str) -> None:
    if backend == "zstandard":
        if not HAVE_ZSTANDARD:
            pytest.skip("the zstandard module is not installed (pip install zstandard)")
    else:
        if not HAVE_ZSTD_PROGRAM:
            pytest.skip("the zstd program is not installed")
        monkeypatch.setitem(sys.modules, "zstandard", None)  # import fails -> the program


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("backend", ["zstd", "zstandard"])
def test_round_trip_real_data(small, tmp_path, monkeypatch, backend):
    _force_backend(monkeypatch, backend)
    src = tmp_path / "pred.h5ad"
    small.write_h5ad(src)
    genes = _shuffled(small)
    gfile = _genes_file(tmp_path / "genes.csv", genes)
    before = datetime.now(timezone.utc).replace(microsecond=0)
    out = prep_vcc(src, gfile, control_pert="control", expected_gene_dim=60)
    assert out == tmp_path / "pred.prep.vcc" and out.is_file()
    assert _files(tmp_path) == {"pred.h5ad", "genes.csv", "pred.prep.vcc"}  # no leftovers
    names, got, mark, zst = _unpack(out, tmp_path)
    assert sorted(names) == ["pred.h5ad.zst", "watermark.txt"]
    assert list(got.var_names) == genes
    assert sp.isspmatrix_csr(got.X) and got.X.dtype == np.float32
    want = small[:, genes].X.toarray().astype(np.float32)
    np.testing.assert_array_equal(got.X.toarray(), want)
    assert list(got.obs.columns) == ["target_gene"]
    assert list(got.obs_names) == list(small.obs_names)
    assert list(got.obs["target_gene"].astype(str)) == list(small.obs["target_gene"].astype(str))
    assert mark["sha256"] == hashlib.sha256(zst).hexdigest()
    assert mark["file"] == "pred.h5ad.zst"
    assert (mark["n_cells"], mark["n_genes"]) == ("120", "60")
    assert mark["n_perturbations"] == "4"
    assert mark["control_pert"] == "control" and mark["pert_col"].startswith("target_gene")
    assert mark["encoding"].startswith("32 (float32")
    assert mark["scale"].startswith("as given")
    assert mark["compressor"].startswith("zstandard" if backend == "zstandard" else "zstd")
    from statetx import __version__

    assert mark["statetx_version"] == __version__
    created = datetime.strptime(mark["created_utc"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=timezone.utc)
    assert before <= created <= datetime.now(timezone.utc)


@needs_zstd
def test_dense_input_other_column_left_unchanged(tmp_path):
    from conftest import make_synthetic

    a = make_synthetic(n_cell_types=1, n_perts=2, n_cells=10, n_genes=12, n_controls=10)
    x0, obs0 = a.X.copy(), a.obs.copy()
    genes = _shuffled(a, seed=1)
    out = prep_vcc(a, genes, tmp_path / "sub" / "dense.vcc", pert_col="gene",
                   control_pert="ctrl", expected_gene_dim=-1)
    _, got, mark, _ = _unpack(out, tmp_path)
    assert list(got.obs.columns) == ["target_gene"]  # written under the VCC name
    assert list(got.obs["target_gene"].astype(str)) == list(a.obs["gene"])
    np.testing.assert_array_equal(got.X.toarray(), a[:, genes].X)
    assert mark["pert_col"].startswith("gene (written as obs['target_gene'])")
    np.testing.assert_array_equal(a.X, x0)  # the input is not modified
    pd.testing.assert_frame_equal(a.obs, obs0)


@needs_zstd
def test_counts_are_converted_to_log1p(zhao_raw, tmp_path):
    import scanpy as sc

    a = zhao_raw[:200, :50].copy()
    a.obs["target_gene"] = np.where(np.arange(200) < 100, "DMSO", "panobinostat")
    with pytest.warns(UserWarning, match="raw counts"):
        out = prep_vcc(a, list(a.var_names), tmp_path / "z.vcc", control_pert="DMSO",
                       expected_gene_dim=-1)
    _, got, mark, _ = _unpack(out, tmp_path)
    ref = a.copy()
    ref.X = ref.X.astype(np.float32)
    sc.pp.normalize_total(ref)
    sc.pp.log1p(ref)
    np.testing.assert_allclose(got.X.toarray(), ref.X.toarray(), rtol=1e-6, atol=1e-6)
    assert got.X.max() < 15
    assert mark["scale"].startswith("integer counts converted")


@needs_zstd
def test_encoding_16_rounds_to_half_precision(small, tmp_path):
    out = prep_vcc(small, list(small.var_names), tmp_path / "h.vcc", control_pert="control",
                   encoding=16, expected_gene_dim=-1)
    _, got, mark, _ = _unpack(out, tmp_path)
    want = small.X.toarray().astype(np.float16).astype(np.float32)
    assert got.X.dtype == np.float32  # anndata cannot read float16 sparse matrices
    np.testing.assert_array_equal(got.X.toarray(), want)
    assert not np.array_equal(want, small.X.toarray().astype(np.float32))  # really rounded
    assert mark["encoding"].startswith("16")


# ------------------------------------------------------------------------------ checks
@needs_zstd
def test_gene_set_mismatch_names_the_genes(small, tmp_path):
    genes = list(map(str, small.var_names))
    dropped = genes[7]
    genes[7] = "NOT_A_GENE"
    with pytest.raises(DataError, match="NOT_A_GENE") as err:
        prep_vcc(small, genes, tmp_path / "x.vcc", control_pert="control",
                 expected_gene_dim=-1)
    assert dropped in str(err.value) and "missing from the prediction" in str(err.value)
    with pytest.raises(DataError, match="missing from the prediction"):
        prep_vcc(small, genes[:-1] + ["ALSO_MISSING"], tmp_path / "x.vcc",
                 control_pert="control", expected_gene_dim=-1)
    assert not (tmp_path / "x.vcc").exists()


@needs_zstd
def test_duplicated_genes_are_rejected(small, tmp_path):
    genes = list(map(str, small.var_names))
    with pytest.raises(DataError, match=f"more than once.*{genes[0]}"):
        prep_vcc(small, genes + [genes[0]], tmp_path / "x.vcc", control_pert="control",
                 expected_gene_dim=-1)
    dup = small.copy()
    dup.var_names = [genes[0]] + genes[1:-1] + [genes[0]]
    with pytest.raises(DataError, match=f"var_names hold duplicated genes.*{genes[0]}"):
        prep_vcc(dup, genes, tmp_path / "x.vcc", control_pert="control", expected_gene_dim=-1)


@needs_zstd
def test_gene_count_limit(small, tmp_path):
    genes = list(map(str, small.var_names))
    with pytest.raises(DataError, match="60 genes.*expected_gene_dim=18080"):
        prep_vcc(small, genes, tmp_path / "x.vcc", control_pert="control")
    with pytest.raises(DataError, match="expected_gene_dim=61"):
        prep_vcc(small, genes, tmp_path / "x.vcc", control_pert="control", expected_gene_dim=61)
    assert not (tmp_path / "x.vcc").exists()
    assert prep_vcc(small, genes, tmp_path / "a.vcc", control_pert="control",
                    expected_gene_dim=60).is_file()
    assert prep_vcc(small, genes, tmp_path / "b.vcc", control_pert="control",
                    expected_gene_dim=-1).is_file()


@needs_zstd
def test_cell_count_limit(small, tmp_path):
    genes = list(map(str, small.var_names))
    kw = {"control_pert": "control", "expected_gene_dim": -1}
    with pytest.raises(DataError, match="120 cells, more than max_cell_dim=119"):
        prep_vcc(small, genes, tmp_path / "x.vcc", max_cell_dim=119, **kw)
    assert not (tmp_path / "x.vcc").exists()
    assert prep_vcc(small, genes, tmp_path / "a.vcc", max_cell_dim=120, **kw).is_file()
    assert prep_vcc(small, genes, tmp_path / "b.vcc", max_cell_dim=-1, **kw).is_file()


@needs_zstd
def test_missing_control_label(small, tmp_path):
    with pytest.raises(DataError, match="control label 'non-targeting' not found.*target_gene"):
        prep_vcc(small, list(small.var_names), tmp_path / "x.vcc", expected_gene_dim=-1)
    assert not (tmp_path / "x.vcc").exists()


@needs_zstd
def test_missing_perturbation_column(small, tmp_path):
    with pytest.raises(DataError, match="perturbation column 'guide' not found"):
        prep_vcc(small, list(small.var_names), tmp_path / "x.vcc", pert_col="guide",
                 control_pert="control", expected_gene_dim=-1)
    unlabeled = small.copy()
    unlabeled.obs["target_gene"] = unlabeled.obs["target_gene"].astype(object)
    unlabeled.obs.iloc[3, unlabeled.obs.columns.get_loc("target_gene")] = None
    with pytest.raises(DataError, match=r"prediction obs\['target_gene'\] has 1 cell\(s\) "
                                        "without a perturbation label"):
        prep_vcc(unlabeled, list(small.var_names), tmp_path / "x.vcc",
                 control_pert="control", expected_gene_dim=-1)


@needs_zstd
def test_header_line_of_the_gene_file(small, tmp_path):
    genes = _shuffled(small)
    with pytest.warns(UserWarning, match="first line 'gene_name'.*header"):
        out = prep_vcc(small, _genes_file(tmp_path / "h.csv", genes, header="gene_name"),
                       tmp_path / "h.vcc", control_pert="control", expected_gene_dim=-1)
    assert list(_unpack(out, tmp_path)[1].var_names) == genes
    # two names that are not genes: not a header, a mismatch naming both
    bad = _genes_file(tmp_path / "bad.csv", ["BOGUS1"] + genes[1:] + ["BOGUS2"])
    with pytest.raises(DataError, match="BOGUS1.*BOGUS2"):
        prep_vcc(small, bad, tmp_path / "x.vcc", control_pert="control", expected_gene_dim=-1)
    two_cols = tmp_path / "two.csv"
    two_cols.write_text("0,A\n1,B\n")
    with pytest.raises(DataError, match="line 1: 2 fields"):
        prep_vcc(small, two_cols, tmp_path / "x.vcc", control_pert="control",
                 expected_gene_dim=-1)
    with pytest.raises(DataError, match="does not exist"):
        prep_vcc(small, tmp_path / "nope.csv", tmp_path / "x.vcc", control_pert="control")


def test_bad_options(small, tmp_path):
    genes = list(small.var_names)
    with pytest.raises(ConfigError, match="encoding=8 is not supported"):
        prep_vcc(small, genes, tmp_path / "x.vcc", encoding=8)
    with pytest.raises(ConfigError, match="max_cell_dim=0"):
        prep_vcc(small, genes, tmp_path / "x.vcc", max_cell_dim=0)
    with pytest.raises(ConfigError, match="expected_gene_dim=-2"):
        prep_vcc(small, genes, tmp_path / "x.vcc", expected_gene_dim=-2)
    with pytest.raises(ConfigError, match="output= is required"):
        prep_vcc(small, genes)
    assert _files(tmp_path) == set()


def test_no_zstd_available(small, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)
    monkeypatch.setattr(vcc_module.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="pip install zstandard.*install the zstd program"):
        prep_vcc(small, list(small.var_names), tmp_path / "x.vcc", control_pert="control",
                 expected_gene_dim=-1)
    assert _files(tmp_path) == set()


@needs_zstd
def test_failure_leaves_no_output_or_temporary_files(small, tmp_path, monkeypatch):
    out = tmp_path / "x.vcc"
    out.write_bytes(b"previous archive")

    def broken(src: Path, dst: Path) -> None:
        dst.write_bytes(b"half a frame")
        raise OSError("disk full")

    monkeypatch.setattr(vcc_module, "_zstd_compressor", lambda: ("broken", broken))
    with pytest.raises(OSError, match="disk full"):
        prep_vcc(small, list(small.var_names), out, control_pert="control",
                 expected_gene_dim=-1)
    assert _files(tmp_path) == {"x.vcc"}  # no temporary folder or file left
    assert out.read_bytes() == b"previous archive"  # the old file is untouched

    def failing_write(path: Path, writer) -> None:  # the archive step fails after packing
        raise OSError("rename failed")

    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.setattr(vcc_module, "atomic_write", failing_write)
    with pytest.raises(OSError, match="rename failed"):
        prep_vcc(small, list(small.var_names), fresh / "y.vcc", control_pert="control",
                 expected_gene_dim=-1)
    assert _files(fresh) == set()


# ------------------------------------------------------------------------------ CLI
@needs_zstd
def test_cli_prep(small, tmp_path, capsys):
    from statetx.cli import main

    src = tmp_path / "pred.h5ad"
    small.write_h5ad(src)
    genes = _shuffled(small)
    gfile = _genes_file(tmp_path / "genes.csv", genes)
    assert main(["evaluate", "prep", "-i", str(src), "-g", str(gfile), "--ntc-name", "control",
                 "--expected-gene-dim", "60", "-e", "32"]) == 0
    out = tmp_path / "pred.prep.vcc"
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "120 cells x 60 genes" in printed and "MB" in printed
    assert list(_unpack(out, tmp_path)[1].var_names) == genes
    # the column and control statetx recorded in the prediction are the defaults
    recorded = small.copy()
    recorded.obs = recorded.obs.rename(columns={"target_gene": "gene"})
    recorded.uns["statetx"] = {"pert_col": "gene", "control_pert": "control"}
    recorded.write_h5ad(tmp_path / "rec.h5ad")
    assert main(["evaluate", "prep", "-i", str(tmp_path / "rec.h5ad"), "-g", str(gfile),
                 "--expected-gene-dim", "60"]) == 0
    assert "pert_col='gene', control='control'" in capsys.readouterr().out
    # errors: exit status 2, one line naming the flag; nothing written
    assert main(["evaluate", "prep", "-i", str(src), "-g", str(gfile), "-o",
                 str(tmp_path / "bad.vcc"), "--max-cell-dim", "10",
                 "--expected_gene_dim", "-1", "--ntc_name", "control"]) == 2
    err = capsys.readouterr().err
    assert "max_cell_dim=10" in err and "--max-cell-dim" in err
    assert main(["evaluate", "prep", "-i", str(src), "-g", str(gfile), "-o",
                 str(tmp_path / "bad.vcc"), "-e", "8"]) == 2
    assert "--encoding: invalid choice: 8" in capsys.readouterr().err
    assert not (tmp_path / "bad.vcc").exists()


@needs_zstd
def test_backed_sparse_input_and_a_folder_as_output(small, tmp_path):
    small.X = sp.csr_matrix(small.X, dtype=np.float32)
    path = tmp_path / "pred.h5ad"
    small.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    genes = _shuffled(small)
    out = prep_vcc(backed, genes, tmp_path / "b.vcc", control_pert="control",
                   expected_gene_dim=-1)
    backed.file.close()
    packed = _unpack(out, tmp_path)[1]
    assert list(packed.var_names) == genes
    np.testing.assert_array_equal(packed.X.toarray(), small[:, genes].X.toarray())
    with pytest.raises(ConfigError, match="is a folder"):
        prep_vcc(path, genes, tmp_path, control_pert="control", expected_gene_dim=-1)
