"""Tools in scanpy style: evaluation and the baselines every ST result is compared with."""

from __future__ import annotations

from statetx.baselines import (
    CellMeanBaseline,
    ContextMeanBaseline,
    ControlMeanBaseline,
    LinearBaseline,
    PerturbMeanBaseline,
    fit_all_baselines,
)
from statetx.metrics import evaluate, vcc_score

__all__ = [
    "CellMeanBaseline",
    "ContextMeanBaseline",
    "ControlMeanBaseline",
    "LinearBaseline",
    "PerturbMeanBaseline",
    "evaluate",
    "fit_all_baselines",
    "vcc_score",
]
