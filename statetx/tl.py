"""Tools in scanpy style: evaluation, the baselines every ST result is compared with, and
perturbation feature tables. Names are imported on first use (``import statetx.tl`` is fast).

Unlike ``scanpy.tl``, nothing here annotates the AnnData it is given (no ``key_added``): the
estimators return new AnnData objects of predictions and ``evaluate`` returns tables."""

from __future__ import annotations

from typing import TYPE_CHECKING

from statetx._lazy import lazy_attributes

if TYPE_CHECKING:
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
_HOME = {"evaluate": "statetx.metrics", "vcc_score": "statetx.metrics",
         "combination_features": "statetx.vocab"}
__getattr__, __dir__ = lazy_attributes(
    __name__, {n: _HOME.get(n, "statetx.baselines") for n in __all__})[:2]
