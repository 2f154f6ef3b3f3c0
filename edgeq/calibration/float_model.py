"""The float model in ONNX Runtime, run for any of its tensors with its weights held once.

Works on an `onnx.ModelProto` or a path, independent of edgeq's graph IR.

Large weights are not copied into ONNX Runtime: the session gets a weight-less copy of the graph
in which each large initializer is a graph input, and the weight arrays (views of the proto's
bytes, or memory maps of external data) are fed with every run. ORT reads CPU numpy inputs in
place, so the weights exist once, not three times (proto, serialized bytes, ORT). Loading an
.onnx with inline weights briefly holds them twice (file bytes and protobuf, then protobuf and
arrays; the protobuf is freed before the first run); external data is memory-mapped and never
held twice. Fed weights take other MLAS kernels than constant, prepacked ones, so activations
equal a plain ORT session's to float32 rounding, not bit for bit.

A session's graph outputs are exactly the requested tensors, and nodes that do not lead to them
are pruned (a model's logits are not computed unless asked for). ONNX Runtime runs on the CPU
with graph optimizations disabled (so every intermediate tensor keeps its name) and a fixed
thread count, so the same feed gives the same values bit for bit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgeq.calibration.sources import Feed, ModelLike
from edgeq.errors import EdgeqError, ModelLoadError
from edgeq.ir.files import read_external
from edgeq.runtime.sessions import make_session
from edgeq.runtime.execution import Execution

_MIN_WEIGHT_ELEMENTS = 1024  # smaller initializers (shapes, scalars) stay in the graph
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
_FEEDABLE_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BOOL,
                   TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
                   TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64)


def load_model(model: ModelLike) -> tuple[onnx.ModelProto, Path | None]:
    """The proto (external data left on disk) and the folder its external data lives in."""
    if isinstance(model, onnx.ModelProto):
        return model, None
    path = Path(model)
    if not path.is_file():
        raise ModelLoadError(f"model '{path}' does not exist", fix="give the path of an .onnx file")
    try:
        return onnx.load(os.fspath(path), load_external_data=False), path.parent
    except Exception as exc:  # noqa: BLE001 - onnx raises several unrelated types
        raise ModelLoadError(f"cannot read model '{path}': {exc}", fix="give a valid .onnx file") from exc


class FloatModel:
    """The float model ready to run with extra outputs; weights held once (see module notes).

    `weights` maps each fed initializer to its array; replacing an entry changes what later
    runs compute."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None, threads: int,
                 execution: Execution | None = None):
        fed = {t.name for t in model.graph.initializer if _is_feedable_weight(t)}
        self.weights = {t.name: _weight_array(t, base_dir) for t in model.graph.initializer if t.name in fed}
        self.shell = _weight_less_graph(model, fed, base_dir)
        self.graph_inputs = {value.name for value in self.shell.graph.input} - set(self.weights)
        self.threads = threads
        self.execution = execution  # where the float model runs (at full precision); None: ORT's CPU provider

    def runner(self, outputs: Sequence[str]) -> Callable[[Feed], list[np.ndarray]]:
        """A function feed -> arrays of `outputs` (graph inputs are passed through)."""
        computed = [name for name in outputs if name not in self.graph_inputs]
        session = self._session(computed) if computed else None

        def run(feed: Feed) -> list[np.ndarray]:
            fetched = session.run(computed, {**feed, **self.weights}) if session else []
            values = dict(zip(computed, fetched, strict=True))
            return [feed[name] if name in self.graph_inputs else values[name] for name in outputs]

        return run

    def _session(self, outputs: Sequence[str]) -> ort.InferenceSession:
        model = onnx.ModelProto()
        model.CopyFrom(self.shell)  # small: no weights
        graph = model.graph
        nodes = needed_nodes(graph, outputs)
        graph.ClearField("node")
        graph.node.extend(nodes)
        graph.ClearField("output")
        graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)  # ORT infers types
        try:  # unoptimised: the statistics are those of the float graph as written
            return make_session(model.SerializeToString(), self.threads, execution=self.execution, reference=True,
                                level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        except EdgeqError:  # the provider's own one-line error
            raise
        except Exception as exc:  # noqa: BLE001 - ORT raises its own unrelated types
            raise ModelLoadError(f"ONNX Runtime cannot run the model for calibration: {exc}",
                                 fix="check that onnxruntime runs the float model as it is") from exc


def needed_nodes(graph: onnx.GraphProto, outputs: Sequence[str]) -> list[onnx.NodeProto]:
    """Nodes that the outputs depend on, in graph order (the rest is not computed)."""
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
    needed: set[int] = set()
    pending = [producer[name] for name in outputs if name in producer]
    while pending:
        index = pending.pop()
        if index in needed:
            continue
        needed.add(index)
        pending.extend(producer[name] for name in _node_reads(graph.node[index]) if name in producer)
    return [node for index, node in enumerate(graph.node) if index in needed]


def _node_reads(node: onnx.NodeProto) -> list[str]:
    """The node's inputs plus every name its subgraphs read (over-approximates outer-scope use)."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        for subgraph in [*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs]:
            for inner in subgraph.node:
                names.extend(_node_reads(inner))
    return names


def float_activation_names(model: ModelLike) -> list[str]:
    """Every float graph input and node output of the main graph (not weights, not Constant
    outputs), in graph order. Types come from ONNX shape inference; a tensor whose type
    cannot be inferred is left out."""
    proto, _ = load_model(model)
    graph = proto.graph
    fed = {t.name for t in graph.initializer if _is_feedable_weight(t)}
    # For shape inference only: external tensors stay graph inputs (nothing is read).
    fed |= {t.name for t in graph.initializer if t.data_location == TensorProto.EXTERNAL}
    shell = _weight_less_graph(proto, fed, None)
    try:
        inferred = onnx.shape_inference.infer_shapes(shell, strict_mode=False).graph
    except Exception:  # noqa: BLE001 - inference is best effort; declared types remain
        inferred = shell.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.input, *inferred.value_info, *inferred.output)}
    weights = {t.name for t in graph.initializer}
    candidates = [v.name for v in graph.input if v.name not in weights]
    candidates += [name for node in graph.node if node.op_type != "Constant" for name in node.output if name]
    return [name for name in dict.fromkeys(candidates) if types.get(name) in _FLOAT_TYPES]


# --------------------------------------------------------------------------------------------
# The weight-less graph and the fed weights.

def _is_feedable_weight(tensor: TensorProto) -> bool:
    return tensor.data_type in _FEEDABLE_TYPES and math.prod(tensor.dims) >= _MIN_WEIGHT_ELEMENTS


def _weight_less_graph(model: onnx.ModelProto, fed: set[str], base_dir: Path | None) -> onnx.ModelProto:
    """A copy of `model` whose initializers named in `fed` are graph inputs instead (built field
    by field so the weight bytes are never copied)."""
    shell = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name,
                            producer_version=model.producer_version, domain=model.domain,
                            model_version=model.model_version)
    shell.opset_import.extend(model.opset_import)
    shell.functions.extend(model.functions)
    source, graph = model.graph, shell.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    graph.sparse_initializer.extend(source.sparse_initializer)
    declared = {value.name for value in source.input}
    for tensor in source.initializer:
        if tensor.name in fed:
            if tensor.name not in declared:
                graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            graph.initializer.append(_inline(tensor, base_dir))
    return shell


def _inline(tensor: TensorProto, base_dir: Path | None) -> TensorProto:
    """The tensor with any external data read in: a session made from bytes has no folder."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return tensor
    inlined = numpy_helper.from_array(np.asarray(read_external(tensor, base_dir)), tensor.name)
    inlined.data_type = tensor.data_type
    return inlined


def _weight_array(tensor: TensorProto, base_dir: Path | None) -> np.ndarray:
    """The weight to feed: a memory map of external data, else a view of the proto's bytes."""
    if tensor.data_location == TensorProto.EXTERNAL:
        return read_external(tensor, base_dir)  # aligned, as ORT wants (a copy only where not)
    raw = tensor.raw_data  # one copy of the bytes, owned by the array from here on
    if raw:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        return np.frombuffer(raw, dtype).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)
