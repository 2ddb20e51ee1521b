"""statetx's h5ad writer: pandas string dtypes are written as plain strings, the input untouched."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from statetx.io import write_h5ad


def test_nullable_strings_written_as_plain_strings(tmp_path, monkeypatch):
    if hasattr(ad.settings, "allow_write_nullable_strings"):
        monkeypatch.setattr(ad.settings, "allow_write_nullable_strings", False)
    obs = pd.DataFrame(
        {"gene": pd.array(["a", "b", "a"], dtype="string"),
         "cell_type": pd.Categorical(pd.array(["x", "y", "x"], dtype="string")),
         "n": [1, 2, 3]},
        index=pd.Index(["c0", "c1", "c2"], dtype="string"))
    var = pd.DataFrame(index=pd.Index(["g0", "g1"], dtype="string"))
    adata = ad.AnnData(X=np.arange(6, dtype=np.float32).reshape(3, 2), obs=obs, var=var)
    adata.raw = adata
    write_h5ad(adata, tmp_path / "ours.h5ad")
    assert adata.obs["gene"].dtype == "string"  # the input is not modified
    back = ad.read_h5ad(tmp_path / "ours.h5ad")
    assert list(back.obs["gene"]) == ["a", "b", "a"] and list(back.obs_names) == ["c0", "c1", "c2"]
    assert list(back.obs["cell_type"].cat.categories) == ["x", "y"]
    assert list(back.var_names) == ["g0", "g1"] and back.raw is not None
    np.testing.assert_array_equal(back.X, adata.X)
    if hasattr(ad.settings, "allow_write_nullable_strings"):
        with pytest.raises(RuntimeError, match="nullable"):  # anndata alone refuses
            adata.write_h5ad(tmp_path / "plain.h5ad")


def test_result_tables_are_readable_like_any_new_file(tmp_path):
    """Metric tables are written atomically (a temporary file renamed over the result); the
    result gets the umask's mode, like any new file, and no temporary file is left."""
    import os
    import stat

    import pandas as pd

    from statetx.metrics._table import write_de_csv

    write_de_csv(pd.DataFrame({"a": [1.0]}), tmp_path / "de.csv")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    mode = stat.S_IMODE(os.stat(tmp_path / "de.csv").st_mode)
    assert mode == stat.S_IMODE(os.stat(plain).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["de.csv", "plain.txt"]


def test_saved_model_weights_get_the_umask_mode(tmp_path):
    import os
    import stat

    from conftest import make_synthetic
    from test_model import small_model

    small_model(max_steps=1).fit(make_synthetic()).save(tmp_path / "m")
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in (tmp_path / "m").iterdir()}
    assert modes["model.safetensors"] == modes["model.json"]


def test_atomic_folder_puts_the_earlier_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    from pathlib import Path

    from statetx._utils import atomic_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("earlier")
    rename = Path.rename

    def failing(self, target):
        if ".tmp" in self.name and ".old" not in self.name:  # the new folder into place
            raise OSError("cross-device link")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="cross-device"):
        atomic_folder(out, lambda tmp: (tmp / "new.txt").write_text("new"))
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporaries left
