"""Registries of passes and targets.

Built-ins are listed explicitly (no folder scanning); third parties register through the entry
point groups `edgeq.passes` (a Pass subclass) and `edgeq.targets` (a Target instance).
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from edgeq.errors import EdgeqError, UnknownPassError, UnknownTargetError

if TYPE_CHECKING:
    from edgeq.pipeline import Pass
    from edgeq.targets.base import Target

# Module paths of the built-in passes and targets; each module registers what it defines.
BUILTIN_PASS_MODULES = (
    "edgeq.passes.convert_opset",
    "edgeq.passes.shape_inference",
    "edgeq.passes.constant_folding",
    "edgeq.passes.canonicalize",
    "edgeq.passes.canonicalize_shapes",
    "edgeq.passes.dead_code_elimination",
    "edgeq.passes.identity_elimination",
    "edgeq.passes.topological_sort",
    "edgeq.passes.linear_to_gemm",
    "edgeq.passes.fuse_rms_norm",
    "edgeq.passes.fold_batch_norm",
    "edgeq.passes.fold_conv_affine",
    "edgeq.passes.constant_first_after_conv_transpose",
    "edgeq.passes.split_norm_affine",
    "edgeq.passes.tile_norm_input_constants",
    "edgeq.passes.mixed_precision",
    "edgeq.passes.select_precision",
    "edgeq.passes.size_budget",
    "edgeq.passes.latency_budget",
    "edgeq.passes.decompose_outliers",
    "edgeq.passes.smooth_quant",
    "edgeq.passes.hadamard_rotation",
    "edgeq.passes.awq",
    "edgeq.passes.calibrate",
    "edgeq.passes.gptq",
    "edgeq.passes.bias_correction",
    "edgeq.passes.sensitivity",
    "edgeq.passes.insert_qdq",
    "edgeq.passes.fold_scalar_into_dequantize",
    "edgeq.passes.quantize_kv_cache",
    "edgeq.backends.fpga.lower_to_integer",
)
BUILTIN_TARGET_MODULES: tuple[str, ...] = ("edgeq.targets.x86", "edgeq.targets.arm", "edgeq.targets.fpga",
                                            "edgeq.targets.qnn_htp")

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
    for group, register in (("edgeq.passes", _register_plugin_pass), ("edgeq.targets", _register_plugin_target)):
        for entry in entry_points(group=group):
            try:
                register(entry.load())
            except Exception as err:  # noqa: BLE001 (a broken plugin is the environment's problem, not a bug)
                detail = str(err) or type(err).__name__
                raise EdgeqError(f"plugin {entry.name!r} ({group} entry point {getattr(entry, 'value', '?')!r}) "
                                 f"cannot be used: {type(err).__name__}: {detail}",
                                 fix="fix, reinstall or uninstall the package that provides it") from err


def _register_plugin_pass(obj: object) -> None:
    from edgeq.pipeline import Pass

    if not (isinstance(obj, type) and issubclass(obj, Pass) and isinstance(getattr(obj, "name", None), str)):
        raise TypeError(f"{obj!r} is not a Pass subclass with a `name`")
    register_pass(obj)


def _register_plugin_target(obj: object) -> None:
    from edgeq.targets.base import Target

    if not isinstance(obj, Target):
        raise TypeError(f"{obj!r} is not an edgeq.targets.base.Target")
    register_target(obj)


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
