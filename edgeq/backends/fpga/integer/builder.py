"""`IntGraphBuilder`: collects the ONNX nodes and constant initializers that integer kernels emit,
with unique names, so a pass can splice them into a graph; plus wrapping into a ModelProto.

Kernels receive and return `QTensor`s (a tensor name with its integer dtype and scale) and never
see ONNX protos beyond the builder.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.errors import OptionError

OPSET = 21
# The integer dtypes a kernel may receive or produce (int64/uint64 stay internal).
IO_DTYPES = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32))
# QuantizeLinear (opset 21) cannot produce int32, so int32 inputs stay integer graph inputs.
_QUANTIZABLE = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16))
_COMPARISONS = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or"}

Dim = int | str


@dataclass(frozen=True)
class QTensor:
    """A quantized tensor: `real = value * scale` (symmetric, zero point 0)."""

    name: str
    dtype: np.dtype
    scale: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.dtype not in IO_DTYPES:
            raise OptionError(f"tensor '{self.name}' has dtype {self.dtype}; integer kernels take "
                              f"{', '.join(str(d) for d in IO_DTYPES)}")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise OptionError(f"tensor '{self.name}' has scale {self.scale!r}; it must be positive and finite")


def onnx_type(dtype: np.dtype | type) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class IntGraphBuilder:
    """Accumulates nodes and initializers under a name prefix; tracks every value's dtype."""

    def __init__(self, prefix: str = "eqi", reserved: Sequence[str] = ()):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._scopes = [prefix]
        self._taken = set(reserved)
        self._dtypes: dict[str, np.dtype] = {}
        self._consts: dict[tuple[str, tuple[int, ...], bytes], str] = {}
        self._const_names: set[str] = set()

    # ---- names and dtypes ---------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Names made inside carry `name` (e.g. one scope per kernel instance)."""
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()

    def fresh(self, hint: str) -> str:
        """A name no node, initializer or reserved name of this builder uses yet."""
        base = "/".join(self._scopes + [hint])
        name, i = base, 1
        while name in self._taken:
            name, i = f"{base}_{i}", i + 1
        self._taken.add(name)
        return name

    def declare(self, tensor: QTensor) -> str:
        """Make an externally produced tensor known (its dtype) to the builder."""
        return self.declare_value(tensor.name, tensor.dtype)

    def declare_value(self, name: str, dtype: np.dtype | type) -> str:
        """Like `declare`, for any integer value (int64/uint64 intermediates included)."""
        self._dtypes[name] = np.dtype(dtype)
        self._taken.add(name)
        return name

    def dtype(self, name: str) -> np.dtype:
        return self._dtypes[name]

    def knows(self, name: str) -> bool:
        """Whether `name` has a dtype here (declared, emitted or a constant)."""
        return name in self._dtypes

    def is_constant(self, name: str) -> bool:
        """Whether `name` is one of this builder's initializers."""
        return name in self._const_names

    # ---- emission -----------------------------------------------------------------------
    def const(self, value: np.ndarray | int | Sequence[int], dtype: np.dtype | type, hint: str = "c") -> str:
        """An initializer holding `value`; identical constants are shared."""
        array = np.asarray(value).astype(dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.fresh(hint)
            self.initializers.append(numpy_helper.from_array(array, name))
            self._dtypes[name] = array.dtype
            self._consts[key] = name
            self._const_names.add(name)
        return self._consts[key]

    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, **attrs: object) -> str:
        """Append one single-output node; returns its output name."""
        out = self.fresh(hint or op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.fresh(f"{hint or op_type}_node"),
                                           **attrs))
        self._dtypes[out] = self._output_dtype(op_type, inputs, attrs)
        return out

    def _output_dtype(self, op_type: str, inputs: Sequence[str], attrs: dict[str, object]) -> np.dtype:
        if op_type == "Cast":
            return np.dtype(helper.tensor_dtype_to_np_dtype(int(attrs["to"])))  # type: ignore[arg-type]
        if op_type in _COMPARISONS:
            return np.dtype(bool)
        if op_type == "Where":
            return self._dtypes[inputs[1]]
        return self._dtypes[inputs[0]]

    # ---- wrapping -----------------------------------------------------------------------
    def to_model(self, inputs: Sequence[tuple[QTensor, Sequence[Dim]]], outputs: Sequence[QTensor], *,
                 float_io: bool = False, graph_name: str = "edgeq_integer", check: bool = True) -> onnx.ModelProto:
        """A complete opset-21 model of what was emitted.

        float_io=False: graph inputs/outputs are the integer tensors themselves (for bit-exact
        tests). float_io=True: float32 inputs pass through QuantizeLinear (int32 inputs, which
        QuantizeLinear cannot produce, stay integer) and outputs through DequantizeLinear, so the
        graph is integer from the input QuantizeLinear to the final DequantizeLinear.
        """
        head: list[onnx.NodeProto] = []
        tail: list[onnx.NodeProto] = []
        graph_inputs, graph_outputs, inits = [], [], list(self.initializers)
        for tensor, shape in inputs:
            if float_io and tensor.dtype in _QUANTIZABLE:
                float_name = f"{tensor.name}_float"
                inits += _qparams(tensor, f"{tensor.name}_qparams")
                head.append(helper.make_node("QuantizeLinear", [float_name, f"{tensor.name}_qparams_scale",
                                                                f"{tensor.name}_qparams_zp"], [tensor.name]))
                graph_inputs.append(helper.make_tensor_value_info(float_name, TensorProto.FLOAT, list(shape)))
            else:
                graph_inputs.append(helper.make_tensor_value_info(tensor.name, onnx_type(tensor.dtype), list(shape)))
        for tensor in outputs:
            if float_io:
                float_name = f"{tensor.name}_float"
                inits += _qparams(tensor, f"{tensor.name}_qparams")
                tail.append(helper.make_node("DequantizeLinear", [tensor.name, f"{tensor.name}_qparams_scale",
                                                                  f"{tensor.name}_qparams_zp"], [float_name]))
                graph_outputs.append(helper.make_tensor_value_info(float_name, TensorProto.FLOAT, None))
            else:
                graph_outputs.append(helper.make_tensor_value_info(tensor.name, onnx_type(tensor.dtype), None))
        graph = helper.make_graph(head + self.nodes + tail, graph_name, graph_inputs, graph_outputs, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="edgeq.integer")
        model.ir_version = 10  # what onnxruntime 1.18+ loads for opset 21
        # Strict inference types every value and fills the outputs' shapes (full_check needs them).
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model


def _qparams(tensor: QTensor, prefix: str) -> list[TensorProto]:
    return [numpy_helper.from_array(np.array(tensor.scale, np.float32), f"{prefix}_scale"),
            numpy_helper.from_array(np.zeros((), tensor.dtype), f"{prefix}_zp")]


def kernel_model(emit: Callable[[IntGraphBuilder, QTensor], QTensor], x: QTensor, shape: Sequence[Dim], *,
                 float_io: bool = False) -> onnx.ModelProto:
    """One kernel as a complete, checked model: graph input `x` of `shape`, the kernel's output out."""
    builder = IntGraphBuilder()
    return builder.to_model([(x, shape)], [emit(builder, x)], float_io=float_io)
