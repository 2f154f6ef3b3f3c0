"""FPGA resource and latency estimation: dataflow (FINN MVAU) and overlay templates.

Public API:
    layers_from_onnx(model, input_shapes=None)   -> list of layers (edgeq.backends.fpga.layers)
    estimate(layers, device, template="auto", fps=None, folding=None, overlay=None, ...)
    estimate_onnx(model_or_path, device, ...)
    EstimateReport (.to_json(), .to_markdown(), .to_text())
    LayerFolding, folding_from_json, search_folding, OverlayConfig
Devices live in edgeq.backends.fpga.devices (get_device, device_names).
"""

from edgeq.backends.fpga.dataflow import LayerFolding, folding_from_json, search_folding
from edgeq.backends.fpga.errors import FoldingError, UnpricedOpError
from edgeq.backends.fpga.estimate import estimate, estimate_onnx
from edgeq.backends.fpga.layers import (
    AttentionMatMul,
    Layer,
    LayoutOp,
    MatVecLayer,
    NonlinearUnit,
    layers_from_onnx,
)
from edgeq.backends.fpga.overlay import OverlayConfig
from edgeq.backends.fpga.primitives import Resources
from edgeq.backends.fpga.report import EstimateReport, Row

__all__ = [
    "AttentionMatMul",
    "EstimateReport",
    "FoldingError",
    "Layer",
    "LayerFolding",
    "LayoutOp",
    "MatVecLayer",
    "NonlinearUnit",
    "OverlayConfig",
    "Resources",
    "Row",
    "UnpricedOpError",
    "estimate",
    "estimate_onnx",
    "folding_from_json",
    "layers_from_onnx",
    "search_folding",
]
