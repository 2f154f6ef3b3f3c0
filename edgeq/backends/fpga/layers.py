"""Target-independent layer description for FPGA estimates, and its ONNX extractor.

A model is a list of layers in execution order:

* `MatVecLayer` — a weight matrix times activation vectors (MatMul/Gemm/Conv with constant
  quantized weights): MH outputs, MW inputs, `vectors` input vectors (tokens, pixels), weight and
  activation bit widths, and an optional threshold (quantized activation) unit of `out_bits`.
  This is FINN's MVAU view of a layer (Umuroglu et al. 2017, FINN-R Blott et al. 2018).
* `AttentionMatMul` — activation x activation (Q·Kᵀ, P·V), no stored weights.
* `NonlinearUnit` — elementwise / row-wise units (softmax, GELU, LayerNorm, residual add, ...)
  with their element counts.
* `LayoutOp` — ops that move or relabel data and do no arithmetic (Reshape, Transpose, Q/DQ
  boundaries whose scaling is folded into the neighbouring unit). They are kept in the list, so
  nothing disappears silently; estimators price them at zero and say so in the assumptions.

`layers_from_onnx` reads a quantized QDQ model (DequantizeLinear of integer initializers feeding
MatMul/Gemm/Conv, Q/DQ on activations) or an integer-only model (MatMulInteger/ConvInteger) and
takes bit widths from the Q/DQ dtypes (int8/uint8/int4/uint4/int2/uint2). Any compute op it can't
price raises `UnpricedOpError` (a `CostModelError`) naming the node.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
import json
from dataclasses import dataclass, field, replace
from typing import Union

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from edgeq.cost import static_types
from edgeq.errors import CostModelError
from edgeq.backends.fpga.errors import UnpricedOpError
from edgeq.backends.fpga.metadata import HOST_OPS_KEY, UNIT_KEY


# ---------------------------------------------------------------------------------------------
# Layer description
# ---------------------------------------------------------------------------------------------
def _require_positive(owner: str, **values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise CostModelError(
                f"layer '{owner}': {key} must be a positive integer, got {value!r}")


def _require_bits(owner: str, **values: int | None) -> None:
    for key, value in values.items():
        if value is not None and not (1 <= value <= 32):
            raise CostModelError(f"layer '{owner}': {key} must be 1..32 bits, got {value!r}")


@dataclass(frozen=True)
class MatVecLayer:
    """y = act(W·x) for `vectors` input vectors; W is MH x MW with `weight_bits` integers."""

    name: str
    mh: int
    mw: int
    weight_bits: int
    act_bits: int
    vectors: int = 1
    out_bits: int | None = None  # threshold (quantized activation) bits; None: accumulators out
    weight_signed: bool = True
    act_signed: bool = False
    absorbed: tuple[str, ...] = ()  # ONNX nodes folded into this layer (bias, scale, ReLU, Q)

    kind = "matvec"

    def __post_init__(self) -> None:
        _require_positive(self.name, mh=self.mh, mw=self.mw, vectors=self.vectors)
        _require_bits(self.name, weight_bits=self.weight_bits, act_bits=self.act_bits,
                      out_bits=self.out_bits)

    @property
    def macs(self) -> int:
        return self.mh * self.mw * self.vectors

    @property
    def weight_count(self) -> int:
        return self.mh * self.mw

    @property
    def weight_bits_total(self) -> int:
        return self.weight_count * self.weight_bits


@dataclass(frozen=True)
class AttentionMatMul:
    """`heads` independent (rows x depth)·(depth x cols) products of two activation tensors."""

    name: str
    heads: int
    rows: int
    cols: int
    depth: int
    a_bits: int
    b_bits: int
    a_signed: bool = True
    b_signed: bool = True
    out_bits: int | None = None
    absorbed: tuple[str, ...] = ()

    kind = "attention"

    def __post_init__(self) -> None:
        _require_positive(self.name, heads=self.heads, rows=self.rows, cols=self.cols,
                          depth=self.depth)
        _require_bits(self.name, a_bits=self.a_bits, b_bits=self.b_bits, out_bits=self.out_bits)

    @property
    def macs(self) -> int:
        return self.heads * self.rows * self.cols * self.depth

    @property
    def operand_b_bits_total(self) -> int:
        """Bits of the second operand (Kᵀ or V) that must be buffered on chip."""
        return self.heads * self.depth * self.cols * self.b_bits


@dataclass(frozen=True)
class NonlinearUnit:
    """An elementwise or row-wise unit: `rows` rows of `row_length` elements, op `op`."""

    name: str
    op: str
    rows: int
    row_length: int
    bits: int | None = 8  # input precision; None = not known from Q/DQ

    kind = "nonlinear"

    def __post_init__(self) -> None:
        _require_positive(self.name, rows=self.rows, row_length=self.row_length)
        _require_bits(self.name, bits=self.bits)

    @property
    def elements(self) -> int:
        return self.rows * self.row_length


@dataclass(frozen=True)
class LayoutOp:
    """An op that does no arithmetic on the FPGA (data movement, Q/DQ boundary, host-side)."""

    name: str
    op_type: str
    reason: str = "data movement"

    kind = "layout"


Layer = Union[MatVecLayer, AttentionMatMul, NonlinearUnit, LayoutOp]


# ---------------------------------------------------------------------------------------------
# ONNX extraction
# ---------------------------------------------------------------------------------------------
# Integer element types and their (bits, signed); ONNX 1.23 has INT2/UINT2 (opset 25+ Q/DQ).
_INT_DTYPES: dict[int, tuple[int, bool]] = {
    TensorProto.INT2: (2, True),
    TensorProto.UINT2: (2, False),
    TensorProto.INT4: (4, True),
    TensorProto.UINT4: (4, False),
    TensorProto.INT8: (8, True),
    TensorProto.UINT8: (8, False),
    TensorProto.INT16: (16, True),
    TensorProto.UINT16: (16, False),
    TensorProto.INT32: (32, True),
}

MATMUL_OPS = frozenset({"MatMul", "Gemm", "Conv", "MatMulInteger", "ConvInteger"})
# Ops that move or relabel data only. Q/DQ are listed because their arithmetic is folded into
# the neighbouring unit (threshold of an MVAU, output scaling of a nonlinear unit) or done on the
# host (quantizing the graph input); the bit widths they carry are read by their neighbours.
LAYOUT_OPS = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Constant", "Shape",
    "Concat", "Split", "Slice", "Cast", "Expand", "QuantizeLinear", "DequantizeLinear",
})
# ONNX op type -> nonlinear unit kind priced in edgeq.backends.fpga.nonlinear.
NONLINEAR_OPS: dict[str, str] = {
    "Softmax": "softmax",
    "LayerNormalization": "layernorm",
    "Gelu": "gelu",
    "Erf": "erf",
    "Relu": "relu",
    "Clip": "clip",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "Exp": "exp",
    "Sqrt": "sqrt",
    "Reciprocal": "reciprocal",
    "Pow": "pow",
    "Add": "add",
    "Sub": "sub",
    "Mul": "mul",
    "Div": "div",
    "Max": "max",
    "Min": "min",
    "ReduceMean": "reduce_mean",
    "ReduceSum": "reduce_sum",
    "ReduceMax": "reduce_max",
    "DynamicQuantizeLinear": "dynamic_quantize",
}
_REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax"})
# Ops that may follow a matmul and be folded into its accumulator / threshold unit
# (FINN streamlining absorbs bias, scale and ReLU into the MultiThreshold of an MVAU).
_SCALE_BIAS_OPS = frozenset({"Add", "Sub", "Mul", "Div"})
_ACTIVATION_OPS = frozenset({"Relu", "Clip"})
_SMALL_CONSTANT = 4096  # elements; constants kept for shape inference (shape tensors etc.)


@dataclass
class _Graph:
    """Read-only index of an ONNX graph: producers, consumers, constants, dtypes, shapes."""

    nodes: list[onnx.NodeProto]
    names: dict[int, str]
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    constants: dict[str, onnx.TensorProto]
    dtypes: dict[str, int]
    shapes: dict[str, tuple[int | None, ...]]
    graph_inputs: set[str]
    graph_outputs: set[str]
    _arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def name(self, node: onnx.NodeProto) -> str:
        return self.names[id(node)]

    def array(self, tensor: str) -> np.ndarray:
        if tensor not in self._arrays:
            self._arrays[tensor] = numpy_helper.to_array(self.constants[tensor])
        return self._arrays[tensor]

    def static_shape(self, tensor: str, node: onnx.NodeProto) -> tuple[int, ...]:
        shape = self.shapes.get(tensor)
        if shape is None or any(d is None for d in shape):
            raise CostModelError(
                f"{node.op_type} '{self.name(node)}': shape of '{tensor}' is not static ({shape})",
                fix="pass --input-shape NAME=D0,D1,... for the model's inputs (to `edgeq estimate`, or to "
                    "`edgeq compile`, which records them in the model)",
            )
        return tuple(int(d) for d in shape)


def _node_names(nodes: Sequence[onnx.NodeProto]) -> dict[int, str]:
    return {id(n): (n.name or f"{n.op_type}_{i}") for i, n in enumerate(nodes)}


def _constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = attr.t
    return constants


def _index_graph(model: onnx.ModelProto,
                 input_shapes: Mapping[str, Sequence[int]] | None) -> _Graph:
    graph = model.graph
    unknown = sorted(set(input_shapes or {}) - {vi.name for vi in graph.input})
    if unknown:
        raise CostModelError(f"input_shapes names unknown graph inputs: {unknown}")
    dtypes, shapes = static_types(model, input_shapes)
    constants = _constant_tensors(graph)
    for name, tensor in constants.items():
        dtypes.setdefault(name, tensor.data_type)
        shapes[name] = tuple(tensor.dims)
    producer: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for out in node.output:
            producer[out] = node
        for inp in node.input:
            if inp:
                consumers.setdefault(inp, []).append(node)
    initializer_names = {t.name for t in graph.initializer}
    return _Graph(
        nodes=list(graph.node),
        names=_node_names(graph.node),
        producer=producer,
        consumers=consumers,
        constants=constants,
        dtypes=dtypes,
        shapes=shapes,
        graph_inputs={vi.name for vi in graph.input} - initializer_names,
        graph_outputs={vi.name for vi in graph.output},
    )


def _int_type(g: _Graph, tensor: str) -> tuple[int, bool] | None:
    return _INT_DTYPES.get(g.dtypes.get(tensor, TensorProto.UNDEFINED))


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _bits_for_range(lo: int, hi: int) -> tuple[int, bool]:
    """Smallest two's-complement (or unsigned when lo >= 0) width holding [lo, hi]."""
    if lo >= 0:
        return max(1, int(hi).bit_length()), False
    magnitude = max(-int(lo), int(hi) + 1)
    return max(1, math.ceil(math.log2(magnitude)) + 1), True


@dataclass(frozen=True)
class _Weight:
    values: np.ndarray  # integer weights after zero-point subtraction, as stored (not transposed)
    bits: int
    signed: bool
    transposed: bool


def _zero_point(g: _Graph, name: str | None, ndim: int, axis: int) -> np.ndarray | int:
    if not name or name not in g.constants:
        return 0
    zp = g.array(name).astype(np.int64)
    if zp.ndim == 1 and ndim > 1:
        shape = [1] * ndim
        shape[axis % ndim] = zp.shape[0]
        zp = zp.reshape(shape)
    return zp


def _weight_from_constant(g: _Graph, node: onnx.NodeProto, tensor: str, zp_name: str | None,
                          axis: int, narrow: bool) -> _Weight:
    int_type = _int_type(g, tensor)
    if int_type is None:
        raise UnpricedOpError(node.op_type, g.name(node),
                              f"weight '{tensor}' is not an integer tensor",
                              fix="quantize the weights (QDQ or integer initializers) first")
    raw = g.array(tensor).astype(np.int64)
    values = raw - _zero_point(g, zp_name, raw.ndim, axis)
    bits, signed = int_type
    if narrow and values.size:
        # The stored dtype is an upper bound; constants tell the true width (FINN
        # minimize_weight_bit_width does the same), e.g. int8 storage of 2-bit weights.
        needed, needed_signed = _bits_for_range(int(values.min()), int(values.max()))
        if needed < bits:
            bits, signed = needed, needed_signed
    return _Weight(values=values, bits=bits, signed=signed, transposed=False)


def _weight_source(g: _Graph, node: onnx.NodeProto, tensor: str, narrow: bool,
                   integer_zp: str | None = None) -> _Weight | None:
    """The constant integer weight behind `tensor` (directly, via DQ, or via DQ->Transpose)."""
    transposed = False
    producer = g.producer.get(tensor)
    if producer is not None and producer.op_type == "Transpose":
        transposed = True
        tensor = producer.input[0]
        producer = g.producer.get(tensor)
    if producer is not None and producer.op_type == "DequantizeLinear":
        x = producer.input[0]
        if x not in g.constants:
            return None
        zp = producer.input[2] if len(producer.input) > 2 else None
        w = _weight_from_constant(g, node, x, zp, _attr(producer, "axis", 1), narrow)
        return _Weight(w.values, w.bits, w.signed, transposed)
    if tensor in g.constants and (producer is None or producer.op_type == "Constant"):
        if g.dtypes.get(tensor) in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16,
                                    TensorProto.DOUBLE):
            raise UnpricedOpError(node.op_type, g.name(node),
                                  f"weight '{tensor}' is floating point",
                                  fix="quantize the weights (QDQ or integer initializers) first")
        w = _weight_from_constant(g, node, tensor, integer_zp, 1, narrow)
        return _Weight(w.values, w.bits, w.signed, transposed)
    return None


def _activation_type(g: _Graph, node: onnx.NodeProto, tensor: str) -> tuple[int, bool]:
    """(bits, signed) of an activation input: the integer type behind its DequantizeLinear."""
    producer = g.producer.get(tensor)
    if producer is not None and producer.op_type == "DequantizeLinear":
        int_type = _int_type(g, producer.input[0])
    else:
        int_type = _int_type(g, tensor)  # integer-only graphs (MatMulInteger inputs)
    if int_type is None:
        raise UnpricedOpError(node.op_type, g.name(node),
                              f"activation '{tensor}' is not quantized (no DequantizeLinear of an "
                              "integer tensor, no integer type)",
                              fix="insert QuantizeLinear/DequantizeLinear on the activation")
    return int_type


def _fold_following(g: _Graph, out: str) -> tuple[list[onnx.NodeProto], int | None]:
    """Nodes after a matmul that fold into its accumulator/threshold, and the threshold bits.

    Bias/scale ops with a constant operand fold into the accumulator or thresholds, ReLU/Clip and
    the final QuantizeLinear become the threshold unit (FINN MultiThreshold). Without a final
    QuantizeLinear only the bias/scale ops are folded and ReLU stays a separate unit.
    """
    chain: list[onnx.NodeProto] = []
    tensor = out
    while tensor not in g.graph_outputs:
        users = g.consumers.get(tensor, [])
        if len(users) != 1:
            break
        user = users[0]
        others = [i for i in user.input if i and i != tensor]
        if user.op_type in _SCALE_BIAS_OPS and others and all(i in g.constants for i in others):
            chain.append(user)
        elif user.op_type in _ACTIVATION_OPS or user.op_type == "Cast":
            chain.append(user)
        elif user.op_type == "QuantizeLinear":
            int_type = _int_type(g, user.output[0])
            if int_type is None:
                break
            chain.append(user)
            return chain, int_type[0]
        else:
            break
        tensor = user.output[0]
    first_activation = next((i for i, n in enumerate(chain) if n.op_type in _ACTIVATION_OPS),
                            len(chain))
    return chain[:first_activation], None


def _shape_numel(shape: Iterable[int]) -> int:
    return int(np.prod(list(shape), dtype=np.int64)) if shape else 1


def _matvec_from_matmul(g: _Graph, node: onnx.NodeProto, weight: _Weight, act: str,
                        weight_first: bool) -> tuple[int, int, int]:
    """(MH, MW, vectors) of x·W (weight second) or W·x (weight first)."""
    a_shape = g.static_shape(act, node)
    w = weight.values.T if weight.transposed else weight.values
    if w.ndim != 2:
        raise UnpricedOpError(node.op_type, g.name(node), f"weight of rank {w.ndim} (expected 2)")
    if weight_first:  # y = W[N, K] · x[..., K, M]
        mh, mw = w.shape
        return int(mh), int(mw), _shape_numel(a_shape) // int(mw)
    mw, mh = w.shape  # y = x[..., K] · W[K, N]
    if a_shape[-1] != mw:
        raise CostModelError(f"MatMul '{g.name(node)}': activation width {a_shape[-1]} != weight "
                             f"rows {mw}")
    return int(mh), int(mw), _shape_numel(a_shape[:-1])


def _matmul_layer(g: _Graph, node: onnx.NodeProto, narrow: bool) -> tuple[Layer, list]:
    a, b = node.input[0], node.input[1]
    integer = node.op_type == "MatMulInteger"
    zp_b = node.input[3] if integer and len(node.input) > 3 else None
    zp_a = node.input[2] if integer and len(node.input) > 2 else None
    w_b = _weight_source(g, node, b, narrow, zp_b)
    w_a = None if w_b is not None else _weight_source(g, node, a, narrow, zp_a)
    folded, out_bits = _fold_following(g, node.output[0])
    absorbed = tuple(g.name(n) for n in folded)
    name = g.name(node)
    if w_b is not None or w_a is not None:
        weight = w_b if w_b is not None else w_a
        act = a if w_b is not None else b
        act_bits, act_signed = _activation_type(g, node, act)
        mh, mw, vectors = _matvec_from_matmul(g, node, weight, act, weight_first=w_a is not None)
        layer = MatVecLayer(name, mh, mw, weight.bits, act_bits, vectors, out_bits,
                            weight.signed, act_signed, absorbed)
        return layer, folded
    a_bits, a_signed = _activation_type(g, node, a)
    b_bits, b_signed = _activation_type(g, node, b)
    a_shape, b_shape = g.static_shape(a, node), g.static_shape(b, node)
    if len(a_shape) < 2 or len(b_shape) < 2:
        raise UnpricedOpError(node.op_type, name, "activation x activation product below rank 2")
    heads = _shape_numel(g.static_shape(node.output[0], node)[:-2])
    layer = AttentionMatMul(name, heads, a_shape[-2], b_shape[-1], a_shape[-1], a_bits, b_bits,
                            a_signed, b_signed, out_bits, absorbed)
    return layer, folded


def _gemm_layer(g: _Graph, node: onnx.NodeProto, narrow: bool) -> tuple[Layer, list]:
    name = g.name(node)
    weight = _weight_source(g, node, node.input[1], narrow)
    if weight is None:
        raise UnpricedOpError("Gemm", name, "input B is not a constant quantized weight")
    w = weight.values.T if (weight.transposed ^ bool(_attr(node, "transB", 0))) else weight.values
    a_shape = g.static_shape(node.input[0], node)
    vectors = a_shape[1] if _attr(node, "transA", 0) else a_shape[0]
    act_bits, act_signed = _activation_type(g, node, node.input[0])
    folded, out_bits = _fold_following(g, node.output[0])
    layer = MatVecLayer(name, int(w.shape[1]), int(w.shape[0]), weight.bits, act_bits,
                        int(vectors), out_bits, weight.signed, act_signed,
                        tuple(g.name(n) for n in folded))
    return layer, folded


def _conv_layer(g: _Graph, node: onnx.NodeProto, narrow: bool) -> tuple[Layer, list]:
    name = g.name(node)
    zp_w = node.input[3] if node.op_type == "ConvInteger" and len(node.input) > 3 else None
    weight = _weight_source(g, node, node.input[1], narrow, zp_w)
    if weight is None:
        raise UnpricedOpError(node.op_type, name, "weight is not a constant quantized tensor")
    out_shape = g.static_shape(node.output[0], node)
    oc, icg, *kernel = weight.values.shape
    act_bits, act_signed = _activation_type(g, node, node.input[0])
    folded, out_bits = _fold_following(g, node.output[0])
    # Convolution as matrix-vector products (FINN lowers Conv to im2col + MVAU): one vector
    # per output pixel, MW = IC/groups · kernel area.
    vectors = out_shape[0] * _shape_numel(out_shape[2:])
    layer = MatVecLayer(name, int(oc), int(icg) * _shape_numel(kernel), weight.bits, act_bits,
                        int(vectors), out_bits, weight.signed, act_signed,
                        tuple(g.name(n) for n in folded))
    return layer, folded


def _row_geometry(g: _Graph, node: onnx.NodeProto) -> tuple[int, int]:
    """(rows, row_length) a nonlinear unit processes."""
    if node.op_type in _REDUCE_OPS:
        shape = g.static_shape(node.input[0], node)
        axes = _attr(node, "axes", None)
        if axes is None and len(node.input) > 1 and node.input[1] in g.constants:
            axes = g.array(node.input[1]).tolist()
        axes = list(range(len(shape))) if axes is None else [a % len(shape) for a in axes]
        row = _shape_numel(shape[a] for a in axes)
        return _shape_numel(shape) // row, row
    shape = g.static_shape(node.output[0], node)
    if not shape:
        return 1, 1
    if node.op_type == "Softmax":
        axis = _attr(node, "axis", -1) % len(shape)
        row = shape[axis]
    elif node.op_type == "LayerNormalization":
        axis = _attr(node, "axis", -1) % len(shape)
        row = _shape_numel(shape[axis:])
    else:
        row = shape[-1]
    return _shape_numel(shape) // row, row


def _nonlinear_layer(g: _Graph, node: onnx.NodeProto) -> NonlinearUnit:
    rows, row = _row_geometry(g, node)
    bits = None
    producer = g.producer.get(node.input[0])
    if producer is not None and producer.op_type == "DequantizeLinear":
        int_type = _int_type(g, producer.input[0])
        bits = int_type[0] if int_type else None
    return NonlinearUnit(g.name(node), NONLINEAR_OPS[node.op_type], rows, row, bits)


def _layout_reason(g: _Graph, node: onnx.NodeProto) -> str:
    if node.op_type == "QuantizeLinear" and node.input[0] in g.graph_inputs:
        return "quantizes the graph input: done by the host driver"
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        return "Q/DQ boundary: bit width read by neighbours, scaling folded into them"
    return "data movement"


# Integer-lowered models (edgeq.backends.fpga.lower_to_integer) tag every node they emit with the
# hardware unit it belongs to, as node metadata UNIT_KEY = "kind@instance"; a unit's nodes form
# one layer. Ops the host runs are listed in the model metadata HOST_OPS_KEY.
_MATMUL_UNITS = frozenset({"linear", "attention"})
_NONLINEAR_UNITS = frozenset({"softmax", "layernorm", "residual_layernorm", "gelu", "add", "hadamard",
                              "rmsnorm", "silu", "mul", "neg"})


def _unit_label(node: onnx.NodeProto) -> str | None:
    return next((p.value for p in node.metadata_props if p.key == UNIT_KEY), None)


def _unit_layer(g: _Graph, label: str, members: list[onnx.NodeProto], narrow: bool) -> Layer:
    """One layer for the nodes of one emitted unit: an integer matmul absorbs its bias and
    requantization shifts (FINN's MVAU threshold stage); a nonlinear unit spans its nodes."""
    kind, _, instance = label.partition("@")
    last = members[-1]
    if kind in _MATMUL_UNITS:
        matmuls = [n for n in members if n.op_type in ("MatMulInteger", "MatMul")]
        if not matmuls:
            raise UnpricedOpError(kind, instance, "unit without an integer matmul")
        parts = [_matmul_layer(g, n, narrow)[0] for n in matmuls]
        layer = parts[0]
        if len(parts) > 1 and all(isinstance(p, MatVecLayer) for p in parts):
            # input channels split by scale (partial sums shifted): one engine over all of them
            if any((p.mh, p.vectors) != (layer.mh, layer.vectors) for p in parts):
                raise UnpricedOpError(kind, instance, "integer matmuls of one unit do not share outputs")
            layer = replace(layer, mw=sum(p.mw for p in parts), weight_bits=max(p.weight_bits for p in parts))
        elif len(parts) > 1 and all(isinstance(p, AttentionMatMul) for p in parts):
            # a wide first operand as 8-bit digits, one product each: a product of their widths
            if any((p.heads, p.rows, p.cols, p.depth) != (layer.heads, layer.rows, layer.cols, layer.depth)
                   for p in parts):
                raise UnpricedOpError(kind, instance, "integer matmuls of one unit do not share operands")
            layer = replace(layer, a_bits=sum(p.a_bits for p in parts), a_signed=False)
        elif len(parts) > 1:
            raise UnpricedOpError(kind, instance, "a unit mixes weight and activation products")
        # The unit's requantization is a shift (round, saturate), not an activation: no
        # threshold stage is priced (out_bits None), whatever the output width.
        return replace(layer, name=instance, out_bits=None,
                       absorbed=tuple(g.name(n) for n in members if n is not matmuls[0]))
    if kind in _NONLINEAR_UNITS:
        shape = g.static_shape(last.output[0], last)
        row = int(shape[-1]) if shape else 1
        in_type = _int_type(g, members[0].input[0])
        return NonlinearUnit(instance, kind, _shape_numel(shape) // row, row,
                             in_type[0] if in_type is not None else None)
    if kind == "mask":
        return LayoutOp(instance, "AttentionMask", "additive attention mask from the 0/1 key mask (and, causal, "
                                                   "from position counters compared): a select in the softmax "
                                                   "unit, not priced separately")
    raise UnpricedOpError(kind, instance, "no FPGA price for this integer unit kind",
                          fix=f"known units: {', '.join(sorted(_MATMUL_UNITS | _NONLINEAR_UNITS | {'mask'}))}")


def _host_ops(model: onnx.ModelProto) -> set[str]:
    raw = next((p.value for p in model.metadata_props if p.key == HOST_OPS_KEY), "[]")
    return {entry["name"] for entry in json.loads(raw)}


def _layer_for(g: _Graph, node: onnx.NodeProto, narrow: bool) -> tuple[Layer, list]:
    op = node.op_type
    if op in ("MatMul", "MatMulInteger"):
        return _matmul_layer(g, node, narrow)
    if op == "Gemm":
        return _gemm_layer(g, node, narrow)
    if op in ("Conv", "ConvInteger"):
        return _conv_layer(g, node, narrow)
    if op in LAYOUT_OPS:
        return LayoutOp(g.name(node), op, _layout_reason(g, node)), []
    if op in NONLINEAR_OPS:
        return _nonlinear_layer(g, node), []
    if op == "Gather" and node.input[0] in g.constants:
        return LayoutOp(g.name(node), op, "embedding lookup: a table read, not priced"), []
    if op == "Gather" and node.input[1] in g.constants:
        return LayoutOp(g.name(node), op, "data movement (a fixed selection of elements)"), []
    raise UnpricedOpError(op, g.name(node), "no FPGA price for this op type",
                          fix="extend edgeq.backends.fpga (layers.NONLINEAR_OPS / nonlinear.PRICES) or "
                              "remove the op")


def layers_from_onnx(model: onnx.ModelProto, *,
                     input_shapes: Mapping[str, Sequence[int]] | None = None,
                     narrow_weight_bits: bool = True) -> list[Layer]:
    """The layer list of a quantized ONNX model, in graph order.

    `input_shapes` fixes symbolic input dims (batch, sequence) so every layer has static sizes.
    With `narrow_weight_bits`, constant weights stored wider than their values need (int8 holding
    2-bit values) are priced at the width their values need; activations keep their Q/DQ dtype.
    """
    g = _index_graph(model, input_shapes)
    layers: list[Layer] = []
    folded_ids: set[int] = set()
    host = _host_ops(model)
    units: dict[str, list[onnx.NodeProto]] = {}
    for node in g.nodes:
        label = _unit_label(node)
        if label is not None:
            units.setdefault(label, []).append(node)
    for node in g.nodes:
        if id(node) in folded_ids:
            continue
        label = _unit_label(node)
        if g.name(node) in host:
            layer, folded = LayoutOp(g.name(node), node.op_type, "host op (model metadata edgeq.host_ops): runs "
                                                                 "on the host CPU, not priced"), []
        elif label is not None:
            layer, folded = _unit_layer(g, label, units[label], narrow_weight_bits), units[label]
        else:
            layer, folded = _layer_for(g, node, narrow_weight_bits)
        folded_ids.update(id(n) for n in folded)
        layers.append(layer)
    return layers
