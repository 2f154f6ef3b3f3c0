"""edgeq: quantize ONNX transformers for edge targets, as QDQ ONNX that ONNX Runtime runs."""

from edgeq.errors import EdgeqError
from edgeq.ir import Graph, Op, Tensor, Value, load, save

__version__ = "0.1.0"
__all__ = ["EdgeqError", "Graph", "Op", "Tensor", "Value", "load", "save", "__version__"]
