"""Tests of the TOML split specification (statetx.config): loading, round trip, path resolution.

None of these need ../shared: the data files are tiny h5ad files written into tmp_path.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from statetx.config import ColumnMap, FewshotEntry, SplitConfig, expand_braces, split_key
from statetx.errors import ConfigError, SplitConfigError

SPEC = """
[datasets]
replogle = "data/replogle"
kang = ["kang.h5ad", "more/*.h5ad"]

[training]
replogle = "train"
kang = "train"

[zeroshot]
"replogle.hepg2" = "test"
"kang.B cells" = "val"

[fewshot."replogle.K562"]
val = ["MYC"]
test = ["TP53", "KRAS"]

[fewshot."kang.CD4 T cells"]
test = ["IFNB"]
"""


def write_h5ad(path: Path, n: int = 4) -> Path:
    """A minimal valid AnnData file (the resolver only needs it to exist)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    obs = pd.DataFrame({"gene": ["ctrl"] * n, "cell_type": ["A"] * n},
                       index=[f"{path.stem}_{i}" for i in range(n)])
    ad.AnnData(np.zeros((n, 3), dtype=np.float32), obs=obs).write_h5ad(path)
    return path


def cfg_with(datasets: dict, base: Path) -> SplitConfig:
    return SplitConfig.from_toml({"datasets": datasets, "base_dir": str(base)})


# ---------------------------------------------------------------------------------------------
# loading


def check_spec(cfg: SplitConfig) -> None:
    assert cfg.datasets == {"replogle": "data/replogle", "kang": ["kang.h5ad", "more/*.h5ad"]}
    assert cfg.training == {"replogle": "train", "kang": "train"}
    assert cfg.zeroshot == {"replogle.hepg2": "test", "kang.B cells": "val"}
    assert set(cfg.fewshot) == {"replogle.K562", "kang.CD4 T cells"}
    assert cfg.fewshot["replogle.K562"] == FewshotEntry(val=["MYC"], test=["TP53", "KRAS"])
    # an absent list defaults to empty
    assert cfg.fewshot["kang.CD4 T cells"].val == []
    assert cfg.fewshot["kang.CD4 T cells"].test == ["IFNB"]


def test_from_toml_path(tmp_path):
    path = tmp_path / "cfgs" / "split.toml"
    path.parent.mkdir()
    path.write_text(SPEC)
    for arg in (path, str(path)):
        cfg = SplitConfig.from_toml(arg)
        check_spec(cfg)
        assert cfg.base_dir == path.parent.resolve()
        assert cfg.source == str(path)


def test_from_toml_path_with_brackets_or_equals(tmp_path):
    """A path string is a path when the file exists, even if it contains '[' or '='."""
    for name in ("run[1]", "lr=0.1"):
        path = tmp_path / name / "split.toml"
        path.parent.mkdir()
        path.write_text(SPEC)
        cfg = SplitConfig.from_toml(str(path))
        check_spec(cfg)
        assert cfg.base_dir == path.parent.resolve()
    # a long one-line TOML string is still TOML (not a file name that is too long)
    line = '"zeroshot" = {"a.b" = "test"}' + " " * 5000
    assert SplitConfig.from_toml(line).zeroshot == {"a.b": "test"}


def test_from_toml_string_and_dict():
    cfg = SplitConfig.from_toml(SPEC)
    check_spec(cfg)
    assert cfg.base_dir is None and cfg.source == "<toml string>"

    import tomllib

    raw = tomllib.loads(SPEC)
    cfg2 = SplitConfig.from_toml(raw)
    check_spec(cfg2)
    assert cfg2.source == "<dict>"
    # a SplitConfig passes through unchanged
    assert SplitConfig.from_toml(cfg2) == cfg2
    # one built directly gets the same checks when it is used
    for kw, msg in ((dict(training={"kang": "train"}, zeroshot={"kang.B": "test"},
                          fewshot={"kang.B": {"val": ["IFNB"]}}), "both \\[zeroshot\\] and"),
                    (dict(fewshot={"kang.B": {"val": ["X"], "test": ["X"]}}), "both val and test"),
                    (dict(training={"ka.ng": "train"}), "contains a dot")):
        with pytest.raises(SplitConfigError, match=msg):
            SplitConfig.from_toml(SplitConfig(**kw))
    # dict with a base_dir
    cfg3 = SplitConfig.from_toml({**raw, "base_dir": "/some/where"})
    assert cfg3.base_dir == Path("/some/where")


def test_empty_spec_is_valid():
    cfg = SplitConfig.from_toml({})
    assert cfg.datasets == {} and cfg.training == {} and cfg.zeroshot == {} and cfg.fewshot == {}
    assert cfg.referenced_datasets() == []
    assert SplitConfig.from_toml("[datasets]\n").datasets == {}


def test_missing_split_file_is_an_error(tmp_path):
    with pytest.raises(SplitConfigError, match="nope.toml"):
        SplitConfig.from_toml(tmp_path / "nope.toml")


def test_to_toml_round_trip():
    cfg = SplitConfig.from_toml(SPEC)
    text = cfg.to_toml()
    back = SplitConfig.from_toml(text)
    keep = {"datasets", "training", "zeroshot", "fewshot"}
    assert back.model_dump(include=keep) == cfg.model_dump(include=keep)
    # and the text is stable under a second round trip
    assert back.to_toml() == text


def test_to_toml_round_trip_awkward_names():
    """Quotes, backslashes and tabs in names must survive the round trip."""
    odd_ct = 'B "naive"\\memory\tcells'
    cfg = SplitConfig.from_toml({
        "datasets": {"d": "C:\\data\\d.h5ad"},
        "training": {"d": "train"},
        "zeroshot": {f"d.{odd_ct}": "test"},
        "fewshot": {"d.x.y": {"val": ['a"b'], "test": ["c\\d"]}},
    })
    back = SplitConfig.from_toml(cfg.to_toml())
    assert back.datasets == {"d": "C:\\data\\d.h5ad"}
    assert back.zeroshot == {f"d.{odd_ct}": "test"}
    assert back.fewshot["d.x.y"] == FewshotEntry(val=['a"b'], test=["c\\d"])


def test_referenced_datasets_and_heldout():
    cfg = SplitConfig.from_toml({
        "datasets": {"a": "x", "b": "y", "unused": "z"},
        "training": {"b": "train"},
        "zeroshot": {"a.T cells": "test", "c.HepG2": "val"},
        "fewshot": {"a.cell.with.dots": {"test": ["P1"]}},
    })
    # [datasets]-only entries are not loaded; the result is sorted
    assert cfg.referenced_datasets() == ["a", "b", "c"]
    zs, fs = cfg.heldout("a")
    assert zs == {"T cells": "test"}
    # split at the FIRST dot: the cell type may contain dots
    assert set(fs) == {"cell.with.dots"}
    assert split_key("ds.ct.with.dot") == ("ds", "ct.with.dot")


def test_expand_braces():
    assert expand_braces("d/{a, b}/x.h5ad") == ["d/a/x.h5ad", "d/b/x.h5ad"]
    assert expand_braces("{p,q}/{1,2}") == ["p/1", "p/2", "q/1", "q/2"]
    assert expand_braces("plain/path") == ["plain/path"]


def test_column_map_build():
    c = ColumnMap.build(pert_col="target_gene", control_pert=None, output_space=None)
    assert c.pert_col == "target_gene" and c.control_pert is None and c.output_space == "gene"
    with pytest.raises(ConfigError, match="output_space='genes'"):
        ColumnMap.build(output_space="genes")


# ---------------------------------------------------------------------------------------------
# path resolution


def test_resolve_single_file(tmp_path):
    f = write_h5ad(tmp_path / "one.h5ad")
    assert cfg_with({"d": "one.h5ad"}, tmp_path).resolve_paths("d") == [f.resolve()]
    # absolute path works regardless of base_dir
    assert cfg_with({"d": str(f)}, tmp_path / "elsewhere").resolve_paths("d") == [f.resolve()]


def test_resolve_directory_sorted_h5_and_h5ad_not_recursive(tmp_path):
    d = tmp_path / "dir"
    files = [write_h5ad(d / n) for n in ("b.h5ad", "a.h5ad", "c.h5", "a.h5")]
    (d / "notes.txt").write_text("ignored")
    write_h5ad(d / "sub" / "deep.h5ad")  # not recursive
    got = cfg_with({"d": "dir"}, tmp_path).resolve_paths("d")
    assert got == sorted(f.resolve() for f in files)
    assert [p.name for p in got] == ["a.h5", "a.h5ad", "b.h5ad", "c.h5"]
    # trailing slash is the same directory
    assert cfg_with({"d": "dir/"}, tmp_path).resolve_paths("d") == got


def test_resolve_glob(tmp_path):
    for n in ("p1.h5ad", "p2.h5ad", "q1.h5ad", "p3.h5"):
        write_h5ad(tmp_path / "data" / n)
    got = cfg_with({"d": "data/p*.h5ad"}, tmp_path).resolve_paths("d")
    assert [p.name for p in got] == ["p1.h5ad", "p2.h5ad"]
    # a pattern without a data suffix is a directory pattern: <pattern>/*.h5 and *.h5ad
    got = cfg_with({"d": "dat?"}, tmp_path).resolve_paths("d")
    assert [p.name for p in got] == ["p1.h5ad", "p2.h5ad", "p3.h5", "q1.h5ad"]


def test_resolve_braces(tmp_path):
    write_h5ad(tmp_path / "d" / "a" / "x.h5ad")
    write_h5ad(tmp_path / "d" / "b" / "x.h5ad")  # same stem, different file: both kept
    write_h5ad(tmp_path / "d" / "c" / "y.h5ad")
    got = cfg_with({"d": "d/{a,b}"}, tmp_path).resolve_paths("d")
    assert got == [(tmp_path / "d" / s / "x.h5ad").resolve() for s in ("a", "b")]
    got = cfg_with({"d": "d/{a,c}/*.h5ad"}, tmp_path).resolve_paths("d")
    assert [p.relative_to(tmp_path.resolve()).as_posix() for p in got] == ["d/a/x.h5ad",
                                                                           "d/c/y.h5ad"]
    # an alternative that matches nothing is an error (its files would be left out silently)
    with pytest.raises(SplitConfigError, match=r"alternative\(s\) 'd/z' match no \.h5"):
        cfg_with({"d": "d/{a,z}"}, tmp_path).resolve_paths("d")


def test_relative_to_toml_folder_not_cwd(tmp_path, monkeypatch):
    cfgdir, other = tmp_path / "configs", tmp_path / "other"
    mine = write_h5ad(cfgdir / "data" / "mine.h5ad")
    write_h5ad(other / "data" / "decoy.h5ad")
    toml = cfgdir / "split.toml"
    toml.write_text('[datasets]\nd = "data"\n[training]\nd = "train"\n')
    monkeypatch.chdir(other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # found next to the TOML: no fallback warning
        got = SplitConfig.from_toml(toml).resolve_paths("d")
        # to_toml round-trips from another folder: the relative path is written absolute
        again = SplitConfig.from_toml(SplitConfig.from_toml(toml).to_toml())
        assert again.resolve_paths("d") == [mine.resolve()]
    assert got == [mine.resolve()]


def test_relative_falls_back_to_cwd_with_warning(tmp_path, monkeypatch):
    cfgdir, cwd = tmp_path / "configs", tmp_path / "work"
    cfgdir.mkdir()
    only_here = write_h5ad(cwd / "data" / "x.h5ad")
    toml = cfgdir / "split.toml"
    toml.write_text('[datasets]\nd = "data/x.h5ad"\n')
    monkeypatch.chdir(cwd)
    with pytest.warns(UserWarning, match="current directory") as rec:
        got = SplitConfig.from_toml(toml).resolve_paths("d")
    assert got == [only_here.resolve()]
    assert str(cfgdir.resolve()) in str(rec[0].message)
    # the absolute spec a run writes (split.toml) names the file actually used
    written = SplitConfig.from_toml(toml).absolute()
    assert written.datasets["d"] == str(only_here.resolve())


def test_same_file_reached_twice_is_used_once(tmp_path):
    f = write_h5ad(tmp_path / "d" / "x.h5ad")
    g = write_h5ad(tmp_path / "d" / "y.h5ad")
    os.symlink(f, tmp_path / "link.h5ad")
    cfg = cfg_with({"d": ["d/x.h5ad", "d/*.h5ad", "d", str(f), "link.h5ad",
                          "d/{x,x}.h5ad"]}, tmp_path)
    assert cfg.resolve_paths("d") == [f.resolve(), g.resolve()]


def test_resolution_is_a_sorted_list_whatever_the_pattern_order(tmp_path):
    for n in ("a.h5ad", "b.h5ad", "c.h5ad"):
        write_h5ad(tmp_path / n)
    got = cfg_with({"d": ["c.h5ad", "a.h5ad", "b.h5ad"]}, tmp_path).resolve_paths("d")
    assert [p.name for p in got] == ["a.h5ad", "b.h5ad", "c.h5ad"]


def test_undeclared_dataset_resolution_names_it(tmp_path):
    cfg = cfg_with({"d": "x"}, tmp_path)
    with pytest.raises(SplitConfigError, match="'replogle' has no entry in \\[datasets\\]"):
        cfg.resolve_paths("replogle")


def test_unquoted_dotted_heldout_key_says_to_quote_it():
    """kang.B = "test" (unquoted) is a nested TOML table: the error says to quote the key."""
    for text in ('[zeroshot]\nkang.B = "test"\n', '[fewshot]\nkang.B = {val = ["X"]}\n'):
        with pytest.raises(SplitConfigError, match=r'key "kang" must have the form.*write the '
                           r'key in quotes, e\.g\. "kang\.B" = '):
            SplitConfig.from_toml(text)
    with pytest.raises(SplitConfigError, match=r'form "<dataset>.<cell type>"\.$'):
        SplitConfig.from_toml('[zeroshot]\nkang = "test"\n')
