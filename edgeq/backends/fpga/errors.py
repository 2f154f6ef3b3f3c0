"""Errors of the FPGA estimator, as subclasses of the edgeq hierarchy (edgeq/errors.py)."""

from __future__ import annotations

from edgeq.errors import CostModelError, OptionError


class UnpricedOpError(CostModelError):
    """A compute op (ONNX node or layer kind) has no price in the FPGA cost model."""

    def __init__(self, op_type: str, name: str, why: str, *, fix: str | None = None):
        self.op_type = op_type
        self.node_name = name
        super().__init__(f"cannot price {op_type} '{name}': {why}", fix=fix)


class FoldingError(OptionError):
    """A folding (PE/SIMD) is invalid for a layer, or a folding file does not match the model."""
