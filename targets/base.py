"""Targets as data: what a device's integer kernels accept (QSpec, OpRule), what stays in high
precision, how to execute, and a cost model over target-independent work counts.

Shaped after torchao's quantization specs and torch's backend configs: a target module only
declares instances of these classes; all logic that reads them is generic (`validate` here,
the quantization passes elsewhere).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Mapping

import numpy as np
import onnx

from edgeq.errors import CostModelError, OptionError, ValidationError

if TYPE_CHECKING:
    from edgeq.ir import Graph

_DTYPES = {
    "int8": (onnx.TensorProto.INT8, -128, 127),
    "uint8": (onnx.TensorProto.UINT8, 0, 255),
    "int16": (onnx.TensorProto.INT16, -32768, 32767),
    "uint16": (onnx.TensorProto.UINT16, 0, 65535),
    "int4": (onnx.TensorProto.INT4, -8, 7),
    "uint4": (onnx.TensorProto.UINT4, 0, 15),
    "int32": (onnx.TensorProto.INT32, -(2**31), 2**31 - 1),
}
if hasattr(onnx.TensorProto, "INT2"):
    _DTYPES["int2"] = (onnx.TensorProto.INT2, -2, 1)
    _DTYPES["uint2"] = (onnx.TensorProto.UINT2, 0, 3)
_DTYPE_OF_ELEM = {elem: name for name, (elem, _, _) in _DTYPES.items()}


def dtype_name(elem_type: int) -> str:
    return _DTYPE_OF_ELEM.get(elem_type) or onnx.TensorProto.DataType.Name(elem_type).lower()


class Granularity(str, Enum):
    TENSOR = "tensor"
    CHANNEL = "channel"
    BLOCK = "block"


@dataclass(frozen=True)
class QSpec:
    """How one tensor is quantized."""

    dtype: str = "int8"
    symmetric: bool = True
    granularity: Granularity = Granularity.TENSOR
    axis: int | None = None          # channel axis, or the blocked axis for BLOCK
    block_size: int | None = None
    qrange: tuple[int, int] | None = None   # narrower than the dtype (e.g. 7-bit weights, -127..127)
    scale_pow2: bool = False          # scales must be 2^k (shift-only requantization)
    fixed: tuple[float, int] | None = None  # (scale, zero point) imposed, e.g. softmax output

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise OptionError(f"unknown quantized dtype {self.dtype!r}", fix=f"use one of {', '.join(_DTYPES)}")
        if self.granularity == Granularity.BLOCK and not self.block_size:
            raise OptionError("block granularity needs a block_size")

    @property
    def elem_type(self) -> int:
        return _DTYPES[self.dtype][0]

    @property
    def qmin(self) -> int:
        return self.qrange[0] if self.qrange else _DTYPES[self.dtype][1]

    @property
    def qmax(self) -> int:
        return self.qrange[1] if self.qrange else _DTYPES[self.dtype][2]

    @property
    def bits(self) -> int:
        return int(math.log2(self.qmax - self.qmin + 1) + 0.5)

    @property
    def signed(self) -> bool:
        return self.dtype.startswith("int")

    def replace(self, **changes) -> "QSpec":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        parts = [self.dtype, "sym" if self.symmetric else "asym", self.granularity.value]
        if self.block_size:
            parts.append(f"block {self.block_size}")
        if self.qrange:
            parts.append(f"range {self.qrange[0]}..{self.qrange[1]}")
        if self.scale_pow2:
            parts.append("pow2 scale")
        if self.fixed:
            parts.append(f"fixed scale {self.fixed[0]:g}")
        return " ".join(parts)


@dataclass(frozen=True)
class OpRule:
    """What the target's integer kernel for one op kind takes: specs per input role."""

    activations: tuple[QSpec | None, ...] = ()  # spec per input slot when that input is an activation
    weight: QSpec | None = None           # a constant input in `weight_slots`
    weight_slots: tuple[int, ...] = (1,)
    bias: QSpec | None = None             # int32 bias of Conv/Gemm, scale = s_x * s_w
    output: QSpec | None = None           # imposed output spec (e.g. fixed softmax scale)
    shares_input_qparams: bool = False    # data movement: output keeps the input's quantization


@dataclass(frozen=True)
class Execution:
    """How ONNX Runtime should run the target's output."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    session_config: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class CostModel:
    """Prices of target-independent work counts (qonnx-style keys such as
    `op_mac_int8_int8`, `weight_bytes`), in `unit`; any count without a price raises."""

    unit: str
    prices: Mapping[str, float]
    source: str = ""

    def cost(self, counts: Mapping[str, float]) -> dict[str, float]:
        missing = sorted(k for k, v in counts.items() if v and k not in self.prices)
        if missing:
            raise CostModelError(f"no price for {', '.join(missing)} in this cost model",
                                 fix="add them to the target's cost model")
        return {k: v * self.prices[k] for k, v in counts.items() if v}


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    ops: Mapping[str, OpRule]                  # op kinds the target runs in integer
    activation: QSpec                          # default activation spec
    weight: QSpec                              # default weight spec
    weight_dtypes: frozenset[str] = frozenset({"int8"})
    activation_dtypes: frozenset[str] = frozenset({"int8", "uint8"})
    keep_high: frozenset[str] = frozenset({"LayerNorm", "RMSNorm", "Softmax", "ResidualAdd"})
    high_dtype: str = "float32"
    default_pipeline: tuple[str, ...] = ()
    opset: int = 21
    execution: Execution = field(default_factory=Execution)
    cost_model: CostModel | None = None
    notes: tuple[str, ...] = ()
    # Integer-only datapath: between the first QuantizeLinear and the last DequantizeLinear no
    # value is float (no float compute, no DQ -> Q round trip), every Q/DQ follows the target's
    # default activation/weight spec, and integer matmul weights are stored in a weight dtype.
    integer_only: bool = False
    # Weight dtypes whose presets rotate by default (Hadamard rotation when neither --rotate nor
    # --no-rotate is given): where the rotation is what the accuracy needs.
    rotate_weights: frozenset[str] = frozenset()
    # Symmetric signed weights may map their largest magnitude to qmin (-8 for int4: 16 levels)
    # with a negative scale, as ONNX Runtime's own int4 quantizer does: its CPU kernels accept
    # it; runtimes that require positive scales (WebNN) do not.
    signed_weight_scales: bool = False

    def rule(self, op_kind: str) -> OpRule | None:
        return self.ops.get(op_kind)


# ---- validation -------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    node: str
    problem: str


def validate(graph: "Graph", target: Target, *, raise_on_error: bool = True) -> list[Violation]:
    """Check every Q/DQ (and integer embedding table) of `graph` against the target's rules."""
    violations: list[Violation] = []
    allowed = target.weight_dtypes | target.activation_dtypes | {"int32"}
    for op in graph.topo_order():
        if op.op_type == "Gather" and graph.is_const(graph.inputs_of(op)[0]):
            table = graph.constant(graph.inputs_of(op)[0])
            name = dtype_name(table.elem_type)
            if table.dtype.kind in "iu" and name not in target.weight_dtypes:
                violations.append(Violation(op.name, f"embedding dtype {name} is not supported by {target.name}"))
        if op.op_type not in ("QuantizeLinear", "DequantizeLinear") or op.domain:
            continue
        ins = graph.inputs_of(op)
        zero_point = graph.constant(ins[2]) if len(ins) > 2 and ins[2] is not None else None
        scale = graph.constant(ins[1])
        elem = zero_point.elem_type if zero_point is not None else op.attr("output_dtype") or onnx.TensorProto.UINT8
        if op.op_type == "DequantizeLinear" and graph.constant(ins[0]) is not None:
            elem = graph.constant(ins[0]).elem_type
        name = dtype_name(elem)
        if name not in allowed:
            violations.append(Violation(op.name, f"dtype {name} is not supported by target {target.name}"))
        specs = _specs_for(graph, op, target)
        if not specs and target.integer_only:
            specs = [target.weight if graph.is_const(ins[0]) else target.activation]
        if scale is not None and any(s.scale_pow2 for s in specs):
            values = np.asarray(scale.numpy(), dtype=np.float64)
            if not np.all(np.exp2(np.round(np.log2(values))) == values):
                violations.append(Violation(op.name, "scale is not a power of two"))
        if zero_point is not None and any(s.symmetric for s in specs) and np.any(zero_point.numpy().astype(np.int64)):
            violations.append(Violation(op.name, "zero point is not 0 but the target needs symmetric quantization"))
    if target.integer_only:
        violations.extend(_integer_only_violations(graph, target))
    if violations and raise_on_error:
        first = violations[0]
        raise ValidationError(f"{len(violations)} violation(s) of target {target.name}; first: "
                              f"{first.node}: {first.problem}")
    return violations


# Model metadata listing ops that run on the host (JSON list of {"name": ...}); they are exempt
# from the integer-only rule (e.g. an embedding lookup).
HOST_OPS_KEY = "edgeq.host_ops"
_FLOAT_ELEMS = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                          onnx.TensorProto.DOUBLE})
_INTEGER_MATMULS = {"MatMulInteger": (1, 3), "ConvInteger": (1, 3)}  # weight slot, its zero-point slot


def _integer_only_violations(graph: "Graph", target: Target) -> list[Violation]:
    """The integer-only rule: the region between a QuantizeLinear and a DequantizeLinear of
    activations (ops with a Q upstream and a DQ downstream) holds no float value except in the
    listed host ops, and no float value enters it other than through a QuantizeLinear."""
    def is_q(op, kind):
        return op.op_type == kind and not op.domain and not graph.is_const(graph.inputs_of(op)[0])

    order = graph.topo_order()
    quantizers = [op for op in order if is_q(op, "QuantizeLinear")]
    dequantizers = [op for op in order if is_q(op, "DequantizeLinear")]
    if not quantizers or not dequantizers:
        return [Violation(graph.name, f"target {target.name} is integer-only but the graph has no "
                                      "QuantizeLinear/DequantizeLinear pair around an integer datapath")]
    after_q: set = set()
    stack = [v for op in quantizers for v in graph.outputs_of(op) if v is not None]
    while stack:
        for reader in graph.consumers(stack.pop()):
            if reader not in after_q:
                after_q.add(reader)
                stack.extend(v for v in graph.outputs_of(reader) if v is not None)
    before_dq: set = set()
    stack = [graph.inputs_of(op)[0] for op in dequantizers]
    while stack:
        producer = graph.producer(stack.pop())
        if producer is not None and producer not in before_dq:
            before_dq.add(producer)
            stack.extend(v for v in graph.inputs_of(producer) if v is not None)
    region = after_q & before_dq
    props = dict(graph.model.metadata_props) if graph.model is not None else {}
    host = {entry["name"] for entry in json.loads(props.get(HOST_OPS_KEY, "[]"))}
    elem = _elem_types(graph, region)
    violations = []
    for op in order:
        if op not in region or op.name in host:
            continue
        if op.op_type in ("QuantizeLinear", "DequantizeLinear"):
            violations.append(Violation(op.name, f"{op.op_type} inside the integer datapath (a float round trip)"))
            continue
        values = [v for v in graph.inputs_of(op) + graph.outputs_of(op) if v is not None]
        floats = [v.name for v in values if elem(v) in _FLOAT_ELEMS]
        if floats:
            violations.append(Violation(op.name, f"{op.op_type} computes on float ({floats[0]}) inside the "
                                                 "integer datapath"))
        for value in graph.inputs_of(op):
            producer = graph.producer(value) if value is not None else None
            if producer is None or producer in region or producer.op_type in ("QuantizeLinear", "Shape", "Size") \
                    or producer.name in host:
                continue
            if any(elem(v) in _FLOAT_ELEMS for v in graph.inputs_of(producer) if v is not None):
                violations.append(Violation(producer.name, f"{producer.op_type} turns float into integer without "
                                                           "QuantizeLinear at the datapath's edge"))
    for op in quantizers + dequantizers:  # the datapath's edges carry the target's activation dtypes
        ins = graph.inputs_of(op)
        zero = graph.constant(ins[2]) if len(ins) > 2 and ins[2] is not None else None
        dtype = dtype_name(zero.elem_type if zero is not None else onnx.TensorProto.UINT8)
        if dtype not in target.activation_dtypes:
            violations.append(Violation(op.name, f"activation dtype {dtype} is not one of "
                                                 f"{', '.join(sorted(target.activation_dtypes))}"))
        scale = graph.constant(ins[1]) if len(ins) > 1 else None
        if target.activation.granularity == Granularity.TENSOR and scale is not None and scale.numpy().size > 1:
            violations.append(Violation(op.name, "activation quantized with one scale per channel; the target "
                                                 "takes one scale per tensor"))
    for op in order:
        if op.op_type == "DequantizeLinear" and graph.is_const(graph.inputs_of(op)[0]) and op.attr("block_size"):
            violations.append(Violation(op.name, "block-wise weight scales; the target takes per-channel or "
                                                 "per-tensor weights"))
        slots = _INTEGER_MATMULS.get(op.op_type) if not op.domain else None
        if slots is None:
            continue
        ins = graph.inputs_of(op)
        weight = graph.constant(ins[slots[0]]) if len(ins) > slots[0] else None
        if weight is not None and dtype_name(weight.elem_type) not in target.weight_dtypes:
            violations.append(Violation(op.name, f"weight dtype {dtype_name(weight.elem_type)} is not one of "
                                                 f"{', '.join(sorted(target.weight_dtypes))}"))
        for slot in (2, 3):
            zero = graph.constant(ins[slot]) if len(ins) > slot and ins[slot] is not None else None
            if zero is not None and np.any(zero.numpy().astype(np.int64)):
                violations.append(Violation(op.name, "integer matmul with a non-zero zero point (the target is "
                                                     "symmetric)"))
    return violations


def _elem_types(graph: "Graph", region: set):
    """value -> element type, from the IR's types, with onnx shape inference filling gaps."""
    inferred: dict[str, int] = {}
    if any(v is not None and v.elem_type is None for op in region
           for v in graph.inputs_of(op) + graph.outputs_of(op)):
        from edgeq.passes.shape_inference import model_for_analysis

        model = onnx.shape_inference.infer_shapes(model_for_analysis(graph))
        for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
            inferred[vi.name] = vi.type.tensor_type.elem_type

    def elem(value) -> int | None:
        return value.elem_type if value.elem_type is not None else inferred.get(value.name)

    return elem


def _specs_for(graph: "Graph", qdq_op, target: Target) -> list[QSpec]:
    """The specs that the ops reading this Q/DQ's tensor demand, by the slot they read it in."""
    if qdq_op.op_type == "QuantizeLinear":
        return [spec for dq in _dequantizers_of(graph, graph.outputs_of(qdq_op)[0])
                for spec in _specs_for(graph, dq, target)]
    source = graph.inputs_of(qdq_op)[0]
    specs = []
    producer = graph.producer(source)
    if producer is not None and producer.op_type == "Gather" and graph.is_const(graph.inputs_of(producer)[0]):
        rule = target.rule("Gather")  # embedding: Gather(int table) -> DQ
        return [rule.weight] if rule is not None and rule.weight is not None else []
    weight = graph.is_const(source)
    for reader, slot in graph.uses(graph.outputs_of(qdq_op)[0]):
        rule = target.rule(reader.kind)
        if rule is None:
            continue
        if weight and slot in rule.weight_slots and rule.weight is not None:
            specs.append(rule.weight)
        elif not weight and slot < len(rule.activations) and rule.activations[slot] is not None:
            specs.append(rule.activations[slot])
        elif weight and rule.bias is not None and slot == 2:
            specs.append(rule.bias)
    return specs


def _dequantizers_of(graph: "Graph", value) -> list:
    """DequantizeLinear ops reading `value`, directly or through data movement."""
    found, stack = [], [value]
    while stack:
        current = stack.pop()
        for reader in graph.consumers(current):
            if reader.op_type == "DequantizeLinear":
                found.append(reader)
            elif reader.op_type in ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice",
                                    "Gather", "Expand", "Identity"):
                stack.extend(v for v in graph.outputs_of(reader) if v is not None)
    return found
