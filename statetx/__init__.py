"""statetx: State Transition perturbation-response models in pure PyTorch.

>>> from statetx import StateTransitionModel
>>> model = StateTransitionModel(preset="state_sm", pert_col="gene", control_pert="non-targeting")
"""

from __future__ import annotations

from statetx.config import ColumnMap, SplitConfig
from statetx.errors import ConfigError, DataError, SplitConfigError, StatetxError
from statetx.model import StateTransitionModel

__version__ = "0.1.0"

__all__ = [
    "ColumnMap",
    "ConfigError",
    "DataError",
    "SplitConfig",
    "SplitConfigError",
    "StateTransitionModel",
    "StatetxError",
    "__version__",
]
