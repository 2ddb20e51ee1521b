"""Metric tables that keep nulls (undefined) apart from NaN (computed NaN), their aggregation and
atomic CSV writing in cell-eval's layout (metrics.md §8)."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from statetx._utils import atomic_write, atomic_write_text

AGG_STATS = ["count", "null_count", "mean", "std", "min", "25%", "50%", "75%", "max"]


class MetricTable:
    """Per-perturbation metric columns (float64) with a null mask per column."""

    def __init__(self, perturbations: Sequence[str]):
        self.index = [str(p) for p in perturbations]
        self.values: dict[str, np.ndarray] = {}
        self.nulls: dict[str, np.ndarray] = {}

    @property
    def columns(self) -> list[str]:
        return list(self.values)

    def add(self, name: str, values: Sequence[float | None] | np.ndarray | float) -> None:
        """Add a column; ``None`` entries are nulls, a scalar is repeated on every row."""
        n = len(self.index)
        if np.isscalar(values) or values is None:
            values = [values] * n
        vals = list(values)
        if len(vals) != n:
            raise ValueError(f"metric {name!r}: {len(vals)} values for {n} perturbations")
        null = np.array([v is None for v in vals], dtype=bool)
        self.values[name] = np.array([np.nan if v is None else float(v) for v in vals])
        self.nulls[name] = null

    def to_frame(self) -> pd.DataFrame:
        """pandas view: first column ``perturbation``; nulls and NaN both become NaN."""
        df = pd.DataFrame({"perturbation": self.index})
        for c in self.values:
            df[c] = self.values[c]
        return df

    def describe(self) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
        """polars-style ``describe()``: (frame with a ``statistic`` column, null masks)."""
        vals: dict[str, list[float | None]] = {c: _describe(self.values[c], self.nulls[c])
                                                for c in self.values}
        df = pd.DataFrame({"statistic": AGG_STATS})
        nulls: dict[str, np.ndarray] = {}
        for c, v in vals.items():
            df[c] = [np.nan if x is None else x for x in v]
            nulls[c] = np.array([x is None for x in v])
        return df, nulls

    def write(self, path: str | Path) -> None:
        """Write ``results.csv`` (empty field = null, ``NaN`` = computed NaN)."""
        header = ["perturbation", *self.values]
        rows = [[p] + [_fmt(self.values[c][i], self.nulls[c][i]) for c in self.values]
                for i, p in enumerate(self.index)]
        atomic_write_text(path, _csv(header, rows))


def _describe(v: np.ndarray, null: np.ndarray) -> list[float | None]:
    x = v[~null]
    n = x.size
    if n == 0:
        return [0.0, float(null.sum())] + [None] * 7
    mean = float(np.mean(x))
    std: float | None = float(np.std(x, ddof=1)) if n > 1 else None
    fin = x[~np.isnan(x)]
    mn = float(fin.min()) if fin.size else math.nan
    mx = float(fin.max()) if fin.size else math.nan
    srt = np.concatenate([np.sort(fin), x[np.isnan(x)]])  # NaN last
    qs = [float(srt[int(math.floor(q * (n - 1) + 0.5))]) for q in (0.25, 0.5, 0.75)]
    return [float(n), float(null.sum()), mean, std, mn, *qs, mx]


def write_agg(agg: pd.DataFrame, nulls: dict[str, np.ndarray], path: str | Path) -> None:
    """Write ``agg_results.csv`` from :meth:`MetricTable.describe` output."""
    cols = [c for c in agg.columns if c != "statistic"]
    rows = [[agg["statistic"].iloc[i]] + [_fmt(agg[c].iloc[i], bool(nulls[c][i])) for c in cols]
            for i in range(len(agg))]
    atomic_write_text(path, _csv(["statistic", *cols], rows))


def _fmt(x: float, null: bool) -> str:
    if null:
        return ""
    x = float(x)
    if math.isnan(x):
        return "NaN"
    return repr(x)


def _quote(s: str) -> str:
    return '"' + s.replace('"', '""') + '"' if any(ch in s for ch in ',"\n') else s


def _csv(header: list[str], rows: list[list[str]]) -> str:
    lines = [",".join(_quote(str(h)) for h in header)]
    lines += [",".join(_quote(str(v)) for v in r) for r in rows]
    return "\n".join(lines) + "\n"


# rows of a DE table formatted and written at a time (bounds the memory of the strings)
_CSV_CHUNK_ROWS = 1 << 18


def write_de_csv(df: pd.DataFrame, path: str | Path) -> None:
    """Write a DE table (``inf``/``-inf`` for infinities, ``NaN`` for NaN), atomically.

    The bytes are those of ``df.to_csv(path, index=False, na_rep="NaN")``; for the usual columns
    (str, float32/64, integers) each distinct value of a chunk of rows is formatted once, several
    times faster than pandas, which formats every float on its own. Other frames go to pandas."""
    if _fast_csv_ok(df):
        atomic_write(path, lambda tmp: _write_csv_fast(df, tmp))
    else:
        atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, na_rep="NaN"))


def _fast_csv_ok(df: pd.DataFrame) -> bool:
    """Whether :func:`_write_csv_fast` writes ``df`` as pandas would: plain str column names,
    at least one row and two columns (a lone empty field is quoted), and every column float32,
    float64, a numpy integer, or str values without missing ones."""
    if len(df) == 0 or df.shape[1] < 2 or isinstance(df.columns, pd.MultiIndex) or not all(
            type(c) is str for c in df.columns):
        return False
    for j in range(df.shape[1]):
        col = df.iloc[:, j]
        kind = col.dtype.kind if isinstance(col.dtype, np.dtype) else ""
        if kind in ("i", "u") or kind == "f" and col.dtype.itemsize in (4, 8):
            continue
        if not (kind == "O" or isinstance(col.dtype, pd.StringDtype)) or col.hasnans or \
                pd.api.types.infer_dtype(col, skipna=False) != "string":
            return False
    return True


def _csv_strings(x: np.ndarray, quote: Any, buf: io.StringIO) -> np.ndarray:
    """The CSV fields (an object array) of the entries of ``x``, each distinct value formatted once:
    floats as pandas writes them (float64 as ``repr``, float32 as NumPy's shortest text, ``NaN``
    for NaN; compared by bits, so ``-0.0`` stays apart from ``0.0``), integers as ``str``, text
    quoted by ``quote`` (a ``csv.writer`` on ``buf`` with pandas' settings)."""
    if x.dtype.kind == "f":
        codes, uniq = pd.factorize(x.view(np.int32 if x.dtype.itemsize == 4 else np.int64))
        u = np.asarray(uniq).view(x.dtype)
        text = np.array(list(map(repr, u.tolist())) if x.dtype.itemsize == 8
                        else u.astype(str).tolist(), dtype=object)
        text[np.isnan(u)] = "NaN"
    elif x.dtype.kind in "iu":
        codes, uniq = pd.factorize(x)
        text = np.array([str(v) for v in uniq.tolist()], dtype=object)
    else:
        codes, uniq = pd.factorize(x)
        text = np.empty(len(uniq), dtype=object)
        for i, v in enumerate(uniq):  # the writer's own quoting (a row [v, "x"], cut after v)
            buf.seek(0)
            buf.truncate()
            quote.writerow([v, "x"])
            text[i] = buf.getvalue()[:-2 - len(os.linesep)]
    return text[codes]


def _write_csv_fast(df: pd.DataFrame, path: str | Path) -> None:
    """``df.to_csv(path, index=False, na_rep="NaN")`` for a frame :func:`_fast_csv_ok` accepts."""
    opts = dict(lineterminator=os.linesep, quoting=csv.QUOTE_MINIMAL)  # (pandas' defaults)
    buf = io.StringIO()
    quote = csv.writer(buf, **opts)
    cols = [df.iloc[:, j].to_numpy(dtype=object if df.iloc[:, j].dtype.kind not in "fiu"
                                   else None) for j in range(df.shape[1])]
    with open(path, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh, **opts).writerow(list(df.columns))
        for start in range(0, len(df), _CSV_CHUNK_ROWS):
            part = [_csv_strings(c[start:start + _CSV_CHUNK_ROWS], quote, buf) for c in cols]
            fh.write(os.linesep.join(map(",".join, zip(*part))))
            fh.write(os.linesep)


def file_prefix(ct: str | None) -> str:
    """The prefix of a cell type's result files (``<celltype>_``; none when pooled)."""
    return "" if ct is None else str(ct).replace("/", "-") + "_"
