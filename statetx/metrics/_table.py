"""Metric tables that keep nulls (undefined) apart from NaN (computed NaN), their aggregation and
atomic CSV writing in cell-eval's layout (metrics.md §8)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

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


def write_de_csv(df: pd.DataFrame, path: str | Path) -> None:
    """Write a DE table (``inf``/``-inf`` for infinities, ``NaN`` for NaN), atomically."""
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, na_rep="NaN"))


def file_prefix(ct: str | None) -> str:
    """The prefix of a cell type's result files (``<celltype>_``; none when pooled)."""
    return "" if ct is None else str(ct).replace("/", "-") + "_"
