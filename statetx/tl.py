"""Tools in scanpy style: evaluation, the baselines every ST result is compared with, and
perturbation feature tables."""

from __future__ import annotations

from statetx.baselines import (
    AdditiveBaseline,
    CellMeanBaseline,
    ContextMeanBaseline,
    ControlMeanBaseline,
    LinearBaseline,
    PerturbMeanBaseline,
    fit_all_baselines,
)
from statetx.metrics import evaluate, vcc_score
from statetx.vocab import combination_features

__all__ = [
    "AdditiveBaseline",
    "CellMeanBaseline",
    "ContextMeanBaseline",
    "ControlMeanBaseline",
    "LinearBaseline",
    "PerturbMeanBaseline",
    "combination_features",
    "evaluate",
    "fit_all_baselines",
    "vcc_score",
]
