"""Optional dependencies of the real-model builders (the `edgeq[models]` extra)."""

from __future__ import annotations

import importlib
from types import ModuleType

from edgeq.errors import EdgeqError


class MissingDependencyError(EdgeqError):
    """A package of the `edgeq[models]` extra is not installed."""


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` or raise a MissingDependencyError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(f"{purpose} needs the '{module}' package ({err})",
                                     fix="pip install 'edgeq[models]'") from err
