"""Lazy package exports (PEP 562): a core package's names are imported on first use.

The configs import the core's vocabulary (``adre_ray.smoothing.params``, ``adre_ray.data.info``, ...),
which are plain Python; a package ``__init__`` that imported torch eagerly would make every config, and
``adre-ray <command> --help``, pay for torch. ``exports`` maps a public name to the submodule that
defines it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

LazyHooks = tuple[Callable[[str], Any], Callable[[], list[str]]]


def lazy_exports(package: str, exports: Mapping[str, str]) -> LazyHooks:
    """``(__getattr__, __dir__)`` for ``package``: ``name`` is read from ``package.<exports[name]>`` the
    first time it is asked for (then cached in the package's namespace); a submodule by its own name."""

    def get_attribute(name: str) -> Any:
        module = importlib.import_module(package)
        if name in exports:
            value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        else:
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as err:
                if err.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        setattr(module, name, value)
        return value

    def names() -> list[str]:
        return sorted(exports)

    return get_attribute, names
