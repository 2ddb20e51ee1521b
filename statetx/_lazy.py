"""Lazy attributes for package namespaces (PEP 562): a name is imported on first use, so that
importing a namespace does not import torch, scipy or scanpy before they are needed."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, names: Mapping[str, str], submodules: tuple[str, ...] = (),
                    defined: tuple[str, ...] = ()
                    ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``: ``names`` maps an attribute to the
    module that defines it; ``submodules`` are ``package``'s own submodules; ``defined`` are
    public names the package defines itself."""
    public = sorted([*names, *submodules, *defined])

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:  # (the module's own names too: __doc__, __file__, ...)
        return sorted({*vars(sys.modules[package]), *public})

    return __getattr__, __dir__, public
