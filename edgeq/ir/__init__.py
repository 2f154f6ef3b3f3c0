"""The edgeq IR: a networkx graph of ONNX ops and values with typed accessors."""

from edgeq.ir.graph import Graph, ModelInfo, Op, Value
from edgeq.ir.onnx_io import load, save
from edgeq.ir.tensor import Tensor

__all__ = ["Graph", "ModelInfo", "Op", "Value", "Tensor", "load", "save"]
