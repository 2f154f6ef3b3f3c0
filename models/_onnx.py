"""A small graph writer over `onnx.helper` that names things the way `torch.onnx` does.

Node names follow the exporter's module paths (`/encoder/layer.0/attention/self/query/MatMul`),
values are `<node>_output_<i>`, parameters keep their module names (`encoder.layer.0...weight`).
Real and synthetic builders share it, so every model edgeq tests on has the same shape.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import onnx
from onnx import helper

OPSET = 17  # LayerNormalization needs 17; what torch.onnx (TorchScript) emits for these models
IR_VERSION = 8  # the IR that goes with opset 17, so older runtimes load the files too
# Bump whenever any builder's output changes: built models are cached on disk under this key.
BUILDER_VERSION = "1"

Dims = Sequence[int | str]


class GraphBuilder:
    """Collects nodes, initializers, inputs and outputs; `model()` assembles the ModelProto."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        # Initializers are written straight into the final proto: each weight is serialised
        # once and never copied again (make_graph would copy every tensor).
        self._model = onnx.ModelProto()
        self._module = ""
        self._node_names: Counter[str] = Counter()
        self._constants: dict[tuple[str, tuple[int, ...], bytes], str] = {}
        self._renames: dict[str, str] = {}  # value -> graph output name, applied in model()

    @contextmanager
    def module(self, path: str) -> Iterator[None]:
        """Name nodes and parameters after a module path ("encoder.layer.0.attention.self").

        Absolute, not nested: blocks are always given the full path of their module."""
        saved = self._module
        self._module = path
        try:
            yield
        finally:
            self._module = saved

    def input(self, name: str, elem_type: int, dims: Dims) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(dims)))
        return name

    def output(self, value: str, name: str, elem_type: int, dims: Dims) -> str:
        """Expose `value` as a graph output called `name` (renamed in place, as exporters do)."""
        self._renames[value] = name
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(dims)))
        return name

    def op(self, op_type: str, *inputs: str, **attrs: object) -> str:
        """Add a one-output node named after the current module; return its output."""
        name = self._node_name(op_type)
        output = f"{name}_output_0"
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=name, **attrs))
        return output

    def weight(self, suffix: str, array: np.ndarray) -> str:
        """A parameter initializer named `<module path>.<suffix>`."""
        name = f"{self._module}.{suffix}" if self._module else suffix
        self._add_initializer(name, array)
        return name

    def constant(self, value: float | int | Sequence[float] | Sequence[int] | np.ndarray,
                 dtype: type | np.dtype = np.float32) -> str:
        """A small constant initializer, shared by every use of the same value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = _constant_name(array, len(self._constants))
            self._add_initializer(name, array)
            self._constants[key] = name
        return self._constants[key]

    def model(self, *, opset: int = OPSET, metadata: Mapping[str, str] | None = None,
              producer: str = "edgeq.models") -> onnx.ModelProto:
        """The finished model. Call once: the builder hands its initializers over."""
        model, self._model = self._model, onnx.ModelProto()
        model.ir_version = IR_VERSION
        model.producer_name = producer
        model.opset_import.append(helper.make_opsetid("", opset))
        model.graph.name = self.name
        self._apply_renames()
        model.graph.node.extend(self.nodes)
        model.graph.input.extend(self.inputs)
        model.graph.output.extend(self.outputs)
        helper.set_model_props(model, {"edgeq.builder_version": BUILDER_VERSION, **(metadata or {})})
        return model

    def _add_initializer(self, name: str, array: np.ndarray) -> None:
        tensor = self._model.graph.initializer.add()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        # tobytes() writes C order, so a transposed view is laid out in this one copy.
        tensor.raw_data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()

    def _node_name(self, op_type: str) -> str:
        base = "/" + "/".join([*_node_path(self._module), op_type])
        count = self._node_names[base]
        self._node_names[base] += 1
        return base if count == 0 else f"{base}_{count}"

    def _apply_renames(self) -> None:
        for node in self.nodes:
            for slots in (node.input, node.output):
                for i, value in enumerate(slots):
                    if value in self._renames:
                        slots[i] = self._renames[value]


def _constant_name(array: np.ndarray, index: int) -> str:
    """Readable names for small constants (`const.float32.0.5`, `const.int64.[0, 0, 12, 32]`),
    numbered ones for anything larger."""
    if array.size > 8:
        return f"const.{array.dtype.name}.{index}"
    return f"const.{array.dtype.name}.{array.tolist()}"


def _node_path(module: str) -> list[str]:
    """torch.onnx keeps a ModuleList index with its list: "encoder.layer.0.x" -> encoder/layer.0/x."""
    parts: list[str] = []
    for part in module.split(".") if module else []:
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}.{part}"
        else:
            parts.append(part)
    return parts
