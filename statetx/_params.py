"""scikit-learn parameter handling with helpful errors (shared by the estimators)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from sklearn.base import BaseEstimator

from statetx import __version__
from statetx._utils import did_you_mean
from statetx.errors import ConfigError, DataError


class ParameterError(ConfigError, TypeError):
    """An unknown keyword argument of an estimator (a TypeError, as Python's own)."""


#: scikit-learn's names for what statetx's estimators call otherwise
SKLEARN_NAMES = {"random_state": "seed"}


def _unknown(cls: type, keys: list[str], valid: list[str]) -> str:
    listing = (f"Parameters: {', '.join(valid)}." if len(valid) <= 15
               else f"help({cls.__name__}) lists its {len(valid)} parameters.")
    ours = SKLEARN_NAMES.get(keys[0])
    hint = (f"{keys[0]!r} is scikit-learn's name: here it is {ours!r} (an integer)."
            if ours in valid else cls._name_hint(keys[0]))
    return (f"{cls.__name__} has no parameter {', '.join(map(repr, keys))}."
            f"{f' {hint}' if hint else did_you_mean(keys[0], valid)} {listing}")


class Estimator(BaseEstimator):
    """``BaseEstimator`` whose constructor and ``set_params`` name a misspelled parameter with
    a did-you-mean, and whose ``set_params`` sets one entry of a dict parameter with
    ``name__key=value`` (e.g. ``model_kwargs__hidden_dim=64``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        params = inspect.signature(init).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return  # (**kwargs passed on: the parent's constructor checks them)
        names = [p for p in params if p != "self"]

        @functools.wraps(init)  # (the signature get_params reads stays the original's)
        def checked(self, *args: Any, **params: Any) -> None:
            unknown = [k for k in params if k not in names]
            if unknown:
                raise ParameterError(_unknown(type(self), unknown, names))
            init(self, *args, **params)

        cls.__init__ = checked

    @staticmethod
    def _name_hint(name: str) -> str:
        """What an unknown parameter name is called here (e.g. another tool's name), or ''."""
        return ""

    #: fitted attributes that a pickle of a fitted estimator must hold
    _PICKLED_FIT: tuple[str, ...] = ()
    #: how to move a fitted estimator between statetx versions (said when a pickle cannot)
    _MOVE_HINT = "refit it with this version"

    def _learned_state(self) -> dict[str, Any]:
        """What a fit learned (attributes ending in ``_``, and the prepared training data)."""
        return {k: v for k, v in vars(self).items() if k.endswith("_") or k == "_prepared"}

    def _restore_learned(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`_learned_state` took: a failed refit leaves the estimator as it
        was (fitted or not)."""
        for k in self._learned_state():
            delattr(self, k)
        vars(self).update(state)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_prepared", None)  # (the training data: not part of a model)
        state["_statetx_version"] = __version__
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        version = state.pop("_statetx_version", None)
        missing = [p for p in self._get_param_names() if p not in state]
        if any(k.endswith("_") and not k.startswith("_") for k in state):  # fitted
            missing += [a for a in self._PICKLED_FIT if a not in state]
        if missing:
            made = (f"made by statetx {version}" if version and version != __version__ else
                    "made by an earlier statetx" if not version else "damaged, or made by "
                    "another development state of this version")
            raise DataError(f"this pickle of a {type(self).__name__} ({made}) lacks "
                            f"{', '.join(missing)}, which statetx {__version__} needs: pickles "
                            f"do not move between versions; {self._MOVE_HINT}.")
        self.__dict__.update(state)

    @classmethod
    def _get_param_names(cls) -> list[str]:
        """scikit-learn's list, plus, for a subclass whose ``__init__`` passes ``**kwargs`` on,
        its parents' parameters (else ``clone``, ``save`` and ``get_params`` lose them)."""
        names = set(super()._get_param_names())
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            params = inspect.signature(init).parameters.values()
            names |= {p.name for p in params if p.name != "self" and p.kind not in (
                inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
                break  # (a constructor that takes no **kwargs ends the chain)
        return sorted(names)

    def set_params(self, **params: Any) -> Estimator:
        valid = list(self.get_params(deep=False))
        unknown = [k for k in params if k.split("__", 1)[0] not in valid]
        if unknown:
            raise ConfigError(_unknown(type(self), unknown, valid))
        plain = {k: v for k, v in params.items() if "__" not in k}
        if plain:  # (whole values first, then single entries on top, as scikit-learn)
            super().set_params(**plain)
        for key, value in params.items():
            name, sep, entry = key.partition("__")
            if not sep:
                continue
            if not entry:
                raise ConfigError(f"{key}=...: name the entry after '__' (e.g. "
                                  f"{name}__hidden_dim=64).")
            current = getattr(self, name)
            if not (isinstance(current, dict) or (current is None and name.endswith("kwargs"))):
                raise ConfigError(f"{key}=...: name__key sets one entry of a dict parameter "
                                  f"(e.g. model_kwargs__hidden_dim=64); {name} is "
                                  f"{type(current).__name__}, not a dict.")
            setattr(self, name, {**(current or {}), entry: value})
        return self
