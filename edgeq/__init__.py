"""edgeq: quantize ONNX transformers for edge targets, as QDQ ONNX that ONNX Runtime runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeq.errors import EdgeqError
from edgeq.ir import Graph, Op, Tensor, Value, load, save

if TYPE_CHECKING:
    from edgeq.compiler import Compiled

from edgeq.version import __version__
__all__ = ["EdgeqError", "Graph", "Op", "Tensor", "Value", "compile", "load", "save", "__version__"]


def compile(model, target, options=None, *, calibration=None, instruments=(), provider=None,
            device=None, cost_device=None) -> "Compiled":  # noqa: A001
    """Quantize `model` for `target` (see `edgeq.compiler.compile`)."""
    from edgeq.compiler import compile as compile_model

    return compile_model(model, target, options, calibration=calibration, instruments=instruments,
                         provider=provider, device=device, cost_device=cost_device)
