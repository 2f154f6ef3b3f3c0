"""The edgeq IR: a networkx graph of ONNX ops and values with typed accessors.

Modules: `graph` (Graph, Op, Value, ModelInfo), `tensor` (weights), `verify` (invariants),
`from_proto` / `to_proto` (Graph <-> ONNX protos, `clone_graph`), `loader` (load, read_skeleton),
`writer` (save), `wire` (the protobuf wire format of model files), `files` (atomic writes,
memory maps, external data), `runtime_support` (the opsets onnxruntime runs).
"""

from edgeq.ir.files import read_external, release_file_pages
from edgeq.ir.from_proto import clone_graph, graph_from_proto
from edgeq.ir.graph import Graph, ModelInfo, Op, Value
from edgeq.ir.loader import load, read_skeleton
from edgeq.ir.tensor import Tensor
from edgeq.ir.to_proto import graph_to_proto, to_model_proto
from edgeq.ir.writer import save

__all__ = ["Graph", "ModelInfo", "Op", "Value", "Tensor", "load", "save", "read_skeleton", "clone_graph",
           "graph_from_proto", "graph_to_proto", "to_model_proto", "read_external", "release_file_pages"]
