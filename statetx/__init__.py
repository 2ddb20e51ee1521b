"""statetx: State Transition perturbation-response models in pure PyTorch.

>>> from statetx import StateTransitionModel
>>> model = StateTransitionModel(preset="state_sm", pert_col="gene", control_pert="non-targeting")

Submodules and names are imported on first use, so ``import statetx`` (and the command line's
``--help``) stays fast.
"""

from __future__ import annotations

from statetx._lazy import lazy_attributes

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

__getattr__, __dir__, __all__ = lazy_attributes(__name__, _LAZY, _SUBMODULES, ("__version__",))
