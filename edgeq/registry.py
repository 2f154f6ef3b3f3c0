"""Registries of passes and targets.

Built-ins are listed explicitly (no folder scanning); third parties register through the entry
point groups `edgeq.passes` (a Pass subclass) and `edgeq.targets` (a Target instance).
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from edgeq.errors import UnknownPassError, UnknownTargetError

if TYPE_CHECKING:
    from edgeq.pass_infra import Pass
    from edgeq.targets.base import Target

# Module paths of the built-in passes and targets; each module registers what it defines.
BUILTIN_PASS_MODULES = (
    "edgeq.passes.shape_inference",
    "edgeq.passes.constant_folding",
    "edgeq.passes.dead_code_elimination",
    "edgeq.passes.identity_elimination",
    "edgeq.passes.topological_sort",
    "edgeq.passes.linear_to_gemm",
    "edgeq.passes.select_precision",
    "edgeq.passes.smooth_quant",
    "edgeq.passes.calibrate",
    "edgeq.passes.sensitivity",
    "edgeq.passes.insert_qdq",
    "edgeq.passes.fold_scalar_into_dequantize",
)
BUILTIN_TARGET_MODULES: tuple[str, ...] = ("edgeq.targets.x86",)

_PASSES: dict[str, type["Pass"]] = {}
_TARGETS: dict[str, "Target"] = {}


def register_pass(cls: type["Pass"]) -> type["Pass"]:
    """Class decorator: make a pass available by its `name`."""
    existing = _PASSES.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"two passes are named {cls.name!r}: {existing.__module__} and {cls.__module__}")
    _PASSES[cls.name] = cls
    return cls


def register_target(target: "Target") -> "Target":
    existing = _TARGETS.get(target.name)
    if existing is not None and existing is not target:
        raise ValueError(f"two targets are named {target.name!r}")
    _TARGETS[target.name] = target
    return target


@lru_cache(maxsize=None)
def _load_plugins() -> None:
    for module in BUILTIN_PASS_MODULES + BUILTIN_TARGET_MODULES:
        importlib.import_module(module)
    for entry in entry_points(group="edgeq.passes"):
        register_pass(entry.load())
    for entry in entry_points(group="edgeq.targets"):
        register_target(entry.load())


def passes() -> dict[str, type["Pass"]]:
    _load_plugins()
    return dict(sorted(_PASSES.items()))


def targets() -> dict[str, "Target"]:
    _load_plugins()
    return dict(sorted(_TARGETS.items()))


def get_pass(name: str) -> type["Pass"]:
    known = passes()
    if name not in known:
        raise UnknownPassError(f"unknown pass {name!r}", fix=f"known passes: {', '.join(known)}")
    return known[name]


def get_target(name: str) -> "Target":
    known = targets()
    if name not in known:
        hint = f"known targets: {', '.join(known)}" if known else "no targets are installed"
        raise UnknownTargetError(f"unknown target {name!r}", fix=f"{hint}; see 'edgeq targets'")
    return known[name]
