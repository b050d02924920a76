"""Lazy package attributes: ``from pkg import Name`` imports ``pkg.<module>`` only on first use.

Keeps ``bilalora.export``, ``bilalora.runtime`` and ``bilalora.bench`` cheap to import
(and ``bilalora.runtime`` free of torch)::

    __getattr__, __dir__ = lazy_exports(__name__, globals(), {"Dehazer": "dehazer", ...})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, namespace: dict[str, Any], exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module-level ``__getattr__`` and ``__dir__`` for ``package``.

    Args:
        package: the package's ``__name__``.
        namespace: the package's ``globals()``; a resolved name is cached there.
        exports: public name -> submodule (relative to ``package``) that defines it.
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
