"""statetx: State Transition perturbation-response models in pure PyTorch.

>>> from statetx import StateTransitionModel
>>> model = StateTransitionModel(preset="state_sm", pert_col="gene", control_pert="non-targeting")

Submodules and names are imported on first use, so ``import statetx`` (and the command line's
``--help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "StateTransitionModel": "statetx.model",
    "SplitConfig": "statetx.config",
    "ColumnMap": "statetx.config",
    "StatetxError": "statetx.errors",
    "SplitConfigError": "statetx.errors",
    "DataError": "statetx.errors",
    "ConfigError": "statetx.errors",
    "evaluate": "statetx.metrics",
    "ControlMeanBaseline": "statetx.baselines",
    "ContextMeanBaseline": "statetx.baselines",
    "PerturbMeanBaseline": "statetx.baselines",
    "CellMeanBaseline": "statetx.baselines",
    "LinearBaseline": "statetx.baselines",
    "AdditiveBaseline": "statetx.baselines",
    "probe_attention": "statetx.probe",
}
_SUBMODULES = ("pp", "tl", "pl", "datasets", "metrics", "baselines", "presets", "splits", "arc",
               "run")

__all__ = sorted([*_LAZY, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"statetx.{name}")
    raise AttributeError(f"module 'statetx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
