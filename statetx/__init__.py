"""statetx: State Transition perturbation-response models in pure PyTorch.

>>> from statetx import StateTransitionModel
>>> model = StateTransitionModel(preset="state_sm", pert_col="gene", control_pert="non-targeting")
"""

from __future__ import annotations

from statetx import pl, pp, tl
from statetx.baselines import (
    CellMeanBaseline,
    ContextMeanBaseline,
    ControlMeanBaseline,
    LinearBaseline,
    PerturbMeanBaseline,
)
from statetx.config import ColumnMap, SplitConfig
from statetx.errors import ConfigError, DataError, SplitConfigError, StatetxError
from statetx.metrics import evaluate
from statetx.model import StateTransitionModel

__version__ = "0.1.0"

__all__ = [
    "CellMeanBaseline",
    "ColumnMap",
    "ContextMeanBaseline",
    "ControlMeanBaseline",
    "LinearBaseline",
    "PerturbMeanBaseline",
    "evaluate",
    "pl",
    "pp",
    "tl",
    "ConfigError",
    "DataError",
    "SplitConfig",
    "SplitConfigError",
    "StateTransitionModel",
    "StatetxError",
    "__version__",
]
