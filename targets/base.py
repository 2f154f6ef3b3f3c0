"""Targets as data: what a device's integer kernels accept (QSpec, OpRule), what stays in high
precision, how to execute, and a cost model over target-independent work counts.

Shaped after torchao's quantization specs and torch's backend configs: a target module only
declares instances of these classes; all logic that reads them is generic (`validate` and
`CostModel.estimate` here, the quantization passes elsewhere).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import numpy as np
import onnx

from edgeq.cost import CostReport, count_work
from edgeq.errors import CostModelError, OptionError, ValidationError
from edgeq.metadata import HOST_OPS_KEY  # host ops are exempt from the integer-only rule
# Where a target's output runs (target data, defined beside the runtime that reads it).
from edgeq.runtime.execution import (ActivationPlacement, DeviceConfig, Execution, ExecutionDevice,  # noqa: F401
                                      PluginLibrary)

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
# Float8 (E4M3FN: 448 at most, no infinities; E5M2) through float8 QuantizeLinear/DequantizeLinear
# (opset 19+): qmin..qmax is the finite range, the zero point 0.
_DTYPES["float8e4m3fn"] = (onnx.TensorProto.FLOAT8E4M3FN, -448, 448)
_DTYPES["float8e5m2"] = (onnx.TensorProto.FLOAT8E5M2, -57344, 57344)
# 4-bit NormalFloat codes (QLoRA): 16 indices into a fixed table of normal quantiles, times a
# block absmax; stored packed in uint8 by ONNX Runtime's com.microsoft MatMulBnb4, not as a tensor
# type (so no element type maps back to it).
_DTYPES["nf4"] = (onnx.TensorProto.UINT8, 0, 15)
_CODEBOOK_DTYPES = frozenset({"nf4"})
# Bits per stored value where the range does not say it (float dtypes).
_DTYPE_BITS = {"float8e4m3fn": 8, "float8e5m2": 8}
_DTYPE_OF_ELEM = {elem: name for name, (elem, _, _) in _DTYPES.items() if name not in _CODEBOOK_DTYPES}


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
    # Block sizes the kernel accepts when this tensor is quantized block-wise: a BLOCK spec's
    # alternatives to its default `block_size`, or the blocks a TENSOR/CHANNEL spec may take
    # instead (--group). Empty: a BLOCK spec takes only `block_size`, others take no blocks.
    block_sizes: tuple[int, ...] = ()
    # A symmetric signed activation whose calibrated range has no negative values is stored in
    # the unsigned type of the same width with zero point 0 instead (softmax probabilities keep
    # all 256 levels), as NNCF and OpenVINO quantize activations: no zero point either way.
    unsigned_when_nonnegative: bool = False
    # Per-channel scales are at least this fraction of the tensor's largest channel scale (0: no
    # floor). QNN's HTP computes a Conv output channel wrongly when its weight scale is below
    # ~2^-16 of the largest (PP-OCRv4 det's dead channels, 1e-31 .. 1e-9 of it: outputs 0 where
    # the bias says otherwise); weights below the floor round to 0, as they count for nothing.
    channel_scale_floor: float = 0.0

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
        if self.dtype in _DTYPE_BITS:
            return _DTYPE_BITS[self.dtype]
        return int(math.log2(self.qmax - self.qmin + 1) + 0.5)

    @property
    def is_float(self) -> bool:
        """A float8 dtype: QuantizeLinear casts x / scale (no integer rounding)."""
        return self.dtype in _DTYPE_BITS

    @property
    def signed(self) -> bool:
        return self.dtype.startswith("int") or self.is_float

    @property
    def symmetric_zero_point(self) -> int:
        """The zero point of symmetric quantization: 0, or the centre of an unsigned range."""
        return 0 if self.signed else (self.qmin + self.qmax + 1) // 2

    @property
    def accepted_block_sizes(self) -> tuple[int, ...]:
        """Every block size the kernel takes for this tensor (none: it cannot be block-wise)."""
        default = (self.block_size,) if self.granularity == Granularity.BLOCK else ()
        return tuple(sorted(set(default) | set(self.block_sizes)))

    def replace(self, **changes) -> "QSpec":
        return dataclasses.replace(self, **changes)

    def blocked(self, block_size: int) -> "QSpec":
        """This spec block-wise with `block_size`, one the kernel accepts. Blocks run along the
        reduction axis K (axis 0 of a [K, N] MatMul weight; insert-qdq maps it onto each op's K)."""
        if not self.accepted_block_sizes:
            raise OptionError(f"{self.dtype} weights are {self.granularity.value}-wise on this target, not blocks",
                              fix="drop --group")
        if block_size not in self.accepted_block_sizes:
            accepted = ", ".join(map(str, self.accepted_block_sizes))
            raise OptionError(f"{self.dtype} weights take no block size {block_size} on this target "
                              f"(accepted: {accepted})", fix="choose an accepted --group, or drop it")
        axis = self.axis if self.granularity == Granularity.BLOCK else 0
        return self.replace(granularity=Granularity.BLOCK, axis=axis, block_size=block_size)

    def describe(self) -> str:
        parts = [self.dtype, "sym" if self.symmetric else "asym", self.granularity.value]
        if self.block_size:
            parts[-1] = f"block {self.block_size}"
        if self.block_sizes:
            sizes = self.block_sizes
            parts.append("block sizes " + (f"{sizes[0]}..{sizes[-1]}" if len(sizes) > 4 else ",".join(map(str, sizes))))
        if self.qrange:
            parts.append(f"range {self.qrange[0]}..{self.qrange[1]}")
        if self.scale_pow2:
            parts.append("pow2 scale")
        if self.fixed:
            parts.append(f"fixed scale {self.fixed[0]:g}")
        if self.unsigned_when_nonnegative:
            parts.append(f"u{self.dtype} zero point 0 when >= 0")
        return " ".join(parts)


@dataclass(frozen=True)
class OpRule:
    """What the target's integer kernel for one op kind takes: specs per input role, and what it
    imposes on its output."""

    activations: tuple[QSpec | None, ...] = ()  # spec per input slot when that input is an activation
    weight: QSpec | None = None           # a constant input in `weight_slots`
    weight_slots: tuple[int, ...] = (1,)
    bias: QSpec | None = None             # int32 bias of Conv/Gemm, scale = s_x * s_w
    # The last activation spec applies to every further input slot (Concat, Sum: any input count).
    variadic: bool = False
    # Output quantization the kernel imposes, one spec per activation dtype it runs in, each with
    # `fixed` (scale, zero point): sigmoid, tanh, softmax on an NPU. Read by insert-qdq (the output's
    # quantization) and validate (the output's Q/DQ carry exactly these).
    output: tuple[QSpec, ...] = ()
    # The output carries its input 0's scale and zero point (data movement, max pooling: the kernel
    # moves stored integers and cannot requantize). Read by insert-qdq and validate.
    shared: bool = False
    # Block-wise weights only where the op's input is one matrix (its leading dims all 1); on a
    # batch of matrices the weight is per channel instead (QNN's block-quantized MatMul).
    blocks_need_one_matrix: bool = False

    def activation(self, slot: int) -> QSpec | None:
        """The spec of input `slot` when it is an activation (None: not quantized)."""
        if slot < len(self.activations):
            return self.activations[slot]
        return self.activations[-1] if self.variadic and self.activations else None

    def output_spec(self, dtype: str) -> QSpec | None:
        """The fixed output spec for outputs stored in `dtype`, if the kernel imposes one."""
        return next((s for s in self.output if s.dtype == dtype), None)


@dataclass(frozen=True)
class CostModel:
    """Prices of target-independent work counts (qonnx-style keys such as `op_mac_uint8_int8`,
    see edgeq.cost.count_work), in `unit` per count. `estimate` counts the work of a compiled
    model and prices the counts whose key starts with one of `priced`; any such count without
    a price raises, nothing silently costs zero. The other counts (bytes) are reported unpriced."""

    unit: str
    prices: Mapping[str, float]
    source: str = ""
    priced: tuple[str, ...] = ("op_mac_",)   # the kinds of work this model prices (key prefixes)
    clock_hz: float | None = None            # turns `unit` (cycles) into seconds, when declared
    assumptions: tuple[str, ...] = ()        # what the prices assume, stated in every report
    needs_device: bool = False               # `estimate` needs `device=` (a named part or board)

    def cost(self, counts: Mapping[str, float]) -> dict[str, float]:
        missing = sorted(k for k, v in counts.items() if v and k not in self.prices)
        if missing:
            raise CostModelError(f"no price for {', '.join(missing)} in this cost model",
                                 fix="add them to the target's cost model")
        return {k: v * self.prices[k] for k, v in counts.items() if v}

    def linear_latencies(self, model: onnx.ModelProto, *, device: str | None,
                         dtypes: Sequence[str]) -> LinearLatencies:
        """Each linear's latency at each weight dtype of `dtypes` on `device` (a device cost
        model's); work-count models price cycles on no device and refuse."""
        raise CostModelError("this target's cost model prices work counts, not a layer's latency on a device",
                             fix="--latency-budget needs a target whose cost model prices a device "
                                 "(`edgeq targets`: fpga, with --device)")

    def estimate(self, model: str | os.PathLike | onnx.ModelProto, *,
                 input_shapes: Mapping[str, Sequence[int]] | None = None, **options: Any) -> CostReport:
        """The work counts of a compiled `model` and their price. Symbolic input dims take
        `input_shapes`, else the shapes a compile recorded in the model's metadata."""
        if options:
            raise OptionError(f"this cost model takes no {', '.join(sorted(options))} option",
                              fix="drop the device options (they apply to targets whose cost model needs a device)")
        work = count_work(model, input_shapes=input_shapes)
        priced = {k: v for k, v in work.counts.items() if k.startswith(self.priced)}
        return CostReport(unit=self.unit, counts=dict(work.counts), costs=self.cost(priced),
                          input_shapes={k: list(v) for k, v in work.input_shapes.items()},
                          shapes_from=work.shapes_from, clock_hz=self.clock_hz,
                          assumptions=self.assumptions, source=self.source)


@dataclass(frozen=True)
class LinearLatencies:
    """A device cost model's latency of a compiled model's linear layers at each weight dtype
    (seconds, by the linear's op name) and of everything else (which weight widths do not
    change), on `device`: what --latency-budget chooses widths from."""

    seconds: Mapping[str, Mapping[str, float]]
    as_compiled: Mapping[str, float]   # each linear at the width the priced model has
    other_seconds: float
    device: str
    how: str   # the template and array that priced them, for the report


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    ops: Mapping[str, OpRule]                  # op kinds the target runs in integer
    activation: QSpec                          # default activation spec
    weight: QSpec                              # default weight spec (the linears' and the rules')
    # The linears' weight spec for every other dtype `--weights` may choose (e.g. int4 block-wise);
    # `weight` is the spec of its own dtype.
    weight_specs: Mapping[str, QSpec] = field(default_factory=dict)
    activation_dtypes: frozenset[str] = frozenset({"int8", "uint8"})
    keep_high: frozenset[str] = frozenset({"LayerNorm", "RMSNorm", "Softmax", "ResidualAdd"})
    default_pipeline: tuple[str, ...] = ()
    opset: int = 21
    # Where the output runs, in order of preference (the first whose provider is available here
    # unless --provider names one); `on(execution)` is the target as compiled for one of them.
    executions: tuple[Execution, ...] = (Execution(),)
    runs_on: Execution | None = None           # set by `on(execution)`: the one compiled for
    cost_model: CostModel | None = None
    notes: tuple[str, ...] = ()
    # Integer-only datapath: between the first QuantizeLinear and the last DequantizeLinear no
    # value is float (no float compute, no DQ -> Q round trip), every Q/DQ follows the target's
    # default activation/weight spec, and integer matmul weights are stored in a weight dtype.
    integer_only: bool = False
    # Weight dtypes whose presets rotate by default (Hadamard rotation when neither --rotate nor
    # --no-rotate is given): where the rotation is what the accuracy needs.
    rotate_weights: frozenset[str] = frozenset()
    # Weight dtypes whose presets rotate by default only where the graph has a pre-norm residual
    # stream the rotation folds into (decoder LLMs: no online transform on the stream, so little
    # run time); other graphs (post-norm encoders) would need online Hadamards and are left alone.
    rotate_stream_weights: frozenset[str] = frozenset()
    # The op the rotation's online Hadamards are written as: "Einsum", which no target quantizes
    # (they run in float, where the outliers they spread would otherwise cost range), or
    # "MatMul" by the factor, quantized like any linear (targets with no float path: the
    # factors' +-1/sqrt(n) entries are exact at any weight width with per-channel scales).
    online_rotation_op: Literal["Einsum", "MatMul"] = "Einsum"
    # Symmetric signed weights may map their largest magnitude to qmin (-8 for int4: 16 levels)
    # with a negative scale, as ONNX Runtime's own int4 quantizer does: its CPU kernels accept
    # it; runtimes that require positive scales (WebNN) do not.
    signed_weight_scales: bool = False
    # The runtime needs static input shapes (NPU compilers): a compile fixes the graph inputs'
    # dynamic dims (--input-shape, else the first calibration sample's) before the pipeline.
    # False: dynamic batch/sequence axes stay (x86, and the FPGA's functional model).
    static_shapes: bool = False
    # Every op runs quantized (NPUs without a float path): each op's float inputs come from
    # DequantizeLinear (constants included, stored as integers) and its float outputs go only to
    # QuantizeLinear, the node units ONNX Runtime's QNN provider lowers op by op. select-precision
    # plans every op, insert-qdq quantizes every tensor once where it is produced (graph outputs
    # too), and validate names any op outside a node unit.
    whole_graph: bool = False
    # Weight dtypes besides int4 that --weight-rounding auto rounds with GPTQ when calibration
    # data is given (int8 weights where their rounding dominates the error, as on an NPU with
    # 16-bit activations).
    gptq_weights: frozenset[str] = frozenset()
    # Weight dtypes the runtime also takes with a zero point per block (--weight-zero-points:
    # asymmetric blocks, 16 levels over each block's [min, max]; ONNX Runtime's MatMulNBits and
    # OpenVINO's compressed weights read them). Not declared: symmetric only.
    zero_point_weights: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.weight.dtype in self.weight_specs:
            raise OptionError(f"target {self.name}: weight_specs repeats the default weight dtype "
                              f"{self.weight.dtype}", fix="declare the default dtype's spec as `weight` only")

    @property
    def weight_dtypes(self) -> frozenset[str]:
        return frozenset({self.weight.dtype, *self.weight_specs})

    def weight_spec(self, dtype: str) -> QSpec | None:
        """The linears' weight spec for `dtype` (None: the target takes no such weights)."""
        return self.weight if dtype == self.weight.dtype else self.weight_specs.get(dtype)

    def rule(self, op_kind: str) -> OpRule | None:
        return self.ops.get(op_kind)

    @property
    def execution(self) -> Execution:
        """The execution this target is compiled for (`on`), else the first of its executions
        that runs the target's own op rules (no QDQ layout of its own)."""
        if self.runs_on is not None:
            return self.runs_on
        return next((e for e in self.executions if e.ops is None), self.executions[0])

    def execution_named(self, name: str) -> Execution:
        for execution in self.executions:
            if execution.name == name:
                return execution
        names = ", ".join(e.name for e in self.executions)
        raise OptionError(f"target {self.name} runs on no provider {name!r}", fix=f"use --provider {names}")

    def on(self, execution: Execution) -> "Target":
        """This target compiled for `execution`: its op rules where the runtime declares its own."""
        return dataclasses.replace(self, ops=execution.ops if execution.ops is not None else self.ops,
                                   runs_on=execution)


# ---- validation -------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    node: str
    problem: str


def validate(graph: "Graph", target: Target, *, raise_on_error: bool = True) -> list[Violation]:
    """Check every Q/DQ (and integer embedding table) of `graph` against what the target
    declares: dtype, range (stored weights and zero points), granularity (scale shapes),
    block size, power-of-two and positive scales, symmetry, fixed (scale, zero point); and,
    for an integer-only target, that nothing between its Q and DQ edges is float."""
    violations: list[Violation] = []
    for op in graph.topo_order():
        if op.domain:
            continue
        if op.op_type == "Gather" and graph.is_const(graph.inputs_of(op)[0]):
            problems = _embedding_problems(graph, op, target)
        elif op.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems = _qdq_problems(graph, op, target)
        else:
            continue
        violations.extend(Violation(op.name, p) for p in problems)
    if target.integer_only:
        violations.extend(_integer_only_violations(graph, target))
    if target.whole_graph:
        violations.extend(_node_unit_violations(graph, target))
    if violations and raise_on_error:
        first = violations[0]
        raise ValidationError(f"{len(violations)} violation(s) of target {target.name}; first: "
                              f"{first.node}: {first.problem}")
    return violations


def _embedding_problems(graph: "Graph", gather, target: Target) -> list[str]:
    table = graph.constant(graph.inputs_of(gather)[0])
    name = dtype_name(table.elem_type)
    if table.dtype.kind not in "iu":
        return []
    if name not in target.weight_dtypes:
        return [f"embedding dtype {name} is not supported by {target.name}"]
    rule = target.rule("Gather")
    spec = rule.weight if rule is not None and rule.weight is not None and rule.weight.dtype == name else None
    return _range_problems("stored embedding values", table.numpy(), spec) if spec is not None else []


# The roles a Q/DQ's tensor plays for the ops reading it, and so which spec applies.
_WEIGHT, _ACTIVATION, _BIAS = "weight", "activation", "bias"


def _qdq_problems(graph: "Graph", op, target: Target) -> list[str]:
    ins = graph.inputs_of(op)
    scale = graph.constant(ins[1]) if len(ins) > 1 and ins[1] is not None else None
    zero = graph.constant(ins[2]) if len(ins) > 2 and ins[2] is not None else None
    stored = graph.constant(ins[0]) if op.op_type == "DequantizeLinear" else None
    elem = zero.elem_type if zero is not None else op.attr("output_dtype") or onnx.TensorProto.UINT8
    if stored is not None:
        elem = stored.elem_type
    dtype = dtype_name(elem)
    if dtype not in target.weight_dtypes | target.activation_dtypes | {"int32"}:
        return [f"dtype {dtype} is not supported by target {target.name}"]
    demands = _specs_for(graph, op, target)
    if not demands and target.integer_only:
        demands = [(_WEIGHT, target.weight) if stored is not None else (_ACTIVATION, target.activation)]
    tensor = _QuantizedTensor.of(op, ins, scale, zero, stored)
    problems: list[str] = []
    for role, spec in dict.fromkeys(demands):
        candidates, problem = _stored_specs(role, spec, dtype, target)
        if role == _WEIGHT:  # weights the target also takes with zero points
            candidates += [c.replace(symmetric=False) for c in candidates
                           if c.symmetric and c.dtype in target.zero_point_weights]
        if problem:
            found = [problem]
        else:  # accepted when one of the specs the target takes for this dtype holds
            found = []
            for candidate in candidates:
                found = tensor.problems(role, candidate, target)
                if not found:
                    break
        problems.extend(p for p in found if p not in problems)
    return problems


def _stored_specs(role: str, spec: QSpec, dtype: str, target: Target) -> tuple[list[QSpec], str | None]:
    """The specs that apply to a tensor stored in `dtype` where a reader demands `spec`: a
    weight in another dtype takes the target's weight spec(s) of that storage dtype; an
    activation in another of the target's activation dtypes (--activations int16, an override,
    a two-digit residual) keeps the rule's constraints over that dtype's full range."""
    if spec.dtype == dtype:
        return [spec], None
    if role == _WEIGHT:
        specs = [s for s in target.weight_specs.values() if s.dtype == dtype]
        return specs, None if specs else f"weight dtype {dtype} is not one of {', '.join(sorted(target.weight_dtypes))}"
    if role == _ACTIVATION:
        if dtype not in target.activation_dtypes:
            return [], (f"activation dtype {dtype} is not one of "
                        f"{', '.join(sorted(target.activation_dtypes))}")
        if spec.unsigned_when_nonnegative and dtype == "u" + spec.dtype:  # stored unsigned, zero point 0
            return [spec.replace(dtype=dtype, symmetric=False, qrange=None)], None
        return [spec.replace(dtype=dtype, qrange=None)], None
    return [], f"{role} dtype {dtype} where the target takes {spec.dtype}"


@dataclass(frozen=True)
class _QuantizedTensor:
    """What one Q/DQ says about its tensor: scale, zero point, stored values, layout."""

    scale: np.ndarray | None
    zero: np.ndarray | None           # None: the implicit zero point 0
    stored: np.ndarray | None         # a DQ's constant input (weights, biases)
    dims: tuple[int, ...] | None      # the quantized tensor's shape, where known
    axis: int
    block_size: int

    @classmethod
    def of(cls, op, ins, scale, zero, stored) -> "_QuantizedTensor":
        dims = tuple(stored.dims) if stored is not None else _static_dims(ins[0])
        return cls(scale=np.asarray(scale.numpy(), np.float64) if scale is not None else None,
                   zero=zero.numpy().astype(np.int64) if zero is not None else None,
                   stored=stored.numpy() if stored is not None else None,
                   dims=dims, axis=op.attr("axis", 1), block_size=op.attr("block_size") or 0)

    def granularity(self) -> Granularity:
        if self.block_size:
            return Granularity.BLOCK
        if self.scale is None or self.scale.ndim == 0:
            return Granularity.TENSOR
        if self.scale.size == 1 and not (self.dims and self.scale.ndim == 1 and self._channels() == 1):
            return Granularity.TENSOR
        return Granularity.CHANNEL

    def _channels(self) -> int | None:
        if self.dims is None or not -len(self.dims) <= self.axis < len(self.dims):
            return None
        return self.dims[self.axis]

    def problems(self, role: str, spec: QSpec, target: Target) -> list[str]:
        problems = self._granularity_problems(role, spec)
        if self.stored is not None and role != _BIAS:
            problems += _range_problems("stored values", self.stored, spec)
        zero = self.zero if self.zero is not None else np.zeros((), np.int64)
        if self.zero is not None and (zero.min() < spec.qmin or zero.max() > spec.qmax):
            bad = int(zero.min()) if zero.min() < spec.qmin else int(zero.max())
            problems.append(f"zero point {bad} is outside the target's range {spec.qmin}..{spec.qmax}")
        scale = self.scale
        if scale is not None:
            with np.errstate(divide="ignore"):  # a zero scale: log2 -> -inf, reported as not positive
                pow2 = np.all(np.exp2(np.round(np.log2(np.abs(scale)))) == np.abs(scale))
            if spec.scale_pow2 and not pow2:
                problems.append("scale is not a power of two")
            if np.any(scale <= 0) and not (role == _WEIGHT and target.signed_weight_scales and np.all(scale != 0)):
                problems.append("scale is not positive; the target takes positive scales only")
        if spec.unsigned_when_nonnegative and not spec.signed and np.any(zero != 0):
            problems.append("zero point is not 0 but the target takes unsigned activations without one")
        if spec.symmetric and np.any(zero != spec.symmetric_zero_point):
            problems.append(f"zero point is not {spec.symmetric_zero_point} but the target needs symmetric "
                            "quantization")
        if spec.fixed is not None:
            fixed_scale, fixed_zero = spec.fixed
            if scale is None or np.any(scale.astype(np.float32) != np.float32(fixed_scale)) \
                    or np.any(zero != fixed_zero):
                problems.append(f"scale and zero point are not the fixed ({fixed_scale:g}, {fixed_zero}) the "
                                "target imposes")
        return problems

    def _granularity_problems(self, role: str, spec: QSpec) -> list[str]:
        observed = self.granularity()
        if observed == Granularity.BLOCK:
            if not spec.accepted_block_sizes:
                return [f"block-wise {role} scales (block {self.block_size}); the target takes one scale per "
                        f"{spec.granularity.value}"]
            problems = []
            if self.block_size not in spec.accepted_block_sizes:
                problems.append(f"block size {self.block_size} is not one the target accepts "
                                f"({', '.join(map(str, spec.accepted_block_sizes))})")
            if self.dims is not None and self.scale is not None and \
                    self.scale.shape != _blocked_shape(self.dims, self.axis, self.block_size):
                problems.append(f"scale shape {self.scale.shape} is not the blocked shape "
                                f"{_blocked_shape(self.dims, self.axis, self.block_size)} of block size "
                                f"{self.block_size} along axis {self.axis}")
            return problems
        if spec.granularity == Granularity.BLOCK:
            return [f"{role} quantized with one scale per {observed.value}; the target takes block-wise scales"]
        if observed != spec.granularity:
            return [f"{role} quantized with one scale per {observed.value}; the target takes one scale per "
                    f"{spec.granularity.value}"]
        channels = self._channels()
        if observed == Granularity.CHANNEL and (self.scale.ndim != 1 or (channels is not None
                                                                         and self.scale.shape[0] != channels)):
            return [f"scale shape {self.scale.shape} is not one scale per channel of axis {self.axis}"
                    + (f" ({channels})" if channels is not None else "")]
        return []


def _range_problems(what: str, values: np.ndarray, spec: QSpec) -> list[str]:
    if values.size == 0:
        return []
    values = values.astype(np.int64)
    lo, hi = int(values.min()), int(values.max())
    if lo < spec.qmin or hi > spec.qmax:
        return [f"{what} {lo}..{hi} are outside the target's range {spec.qmin}..{spec.qmax}"]
    return []


def _blocked_shape(dims: tuple[int, ...], axis: int, block: int) -> tuple[int, ...]:
    shape = list(dims)
    if -len(shape) <= axis < len(shape):
        shape[axis] = -(-shape[axis] // block)
    return tuple(shape)


def _static_dims(value) -> tuple[int, ...] | None:
    shape = value.shape if value is not None else None
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(shape)


_FLOAT_ELEMS = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                          onnx.TensorProto.DOUBLE})
_INTEGER_MATMULS = {"MatMulInteger": (1, 3), "ConvInteger": (1, 3)}  # weight slot, its zero-point slot


def _integer_only_violations(graph: "Graph", target: Target) -> list[Violation]:
    """The integer-only rule: the region between a QuantizeLinear and a DequantizeLinear of
    activations (ops with a Q upstream and a DQ downstream) holds no float value except in the
    listed host ops, and no float value enters it other than through a QuantizeLinear. (The
    edges' own specs are checked with every other Q/DQ.)"""
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
    for op in order:
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
    """value -> element type, from the IR's types, with onnx type inference (on a weight-less
    copy of the graph) filling gaps."""
    inferred: dict[str, int] = {}
    if any(v is not None and v.elem_type is None for op in region
           for v in graph.inputs_of(op) + graph.outputs_of(op)):
        from edgeq.ir import graph_to_proto

        opsets = graph.model.opset_imports if graph.model is not None else {"": 21}
        model = onnx.helper.make_model(graph_to_proto(graph, with_data=False),
                                       opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()])
        model = onnx.shape_inference.infer_shapes(model)
        for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
            inferred[vi.name] = vi.type.tensor_type.elem_type

    def elem(value) -> int | None:
        return value.elem_type if value.elem_type is not None else inferred.get(value.name)

    return elem


def _specs_for(graph: "Graph", qdq_op, target: Target) -> list[tuple[str, QSpec]]:
    """(role, spec) that the ops reading this Q/DQ's tensor demand, by the slot they read it in."""
    if qdq_op.op_type == "QuantizeLinear":
        return [demand for dq in _dequantizers_of(graph, graph.outputs_of(qdq_op)[0])
                for demand in _specs_for(graph, dq, target)]
    source = graph.inputs_of(qdq_op)[0]
    specs = []
    producer = graph.producer(source)
    if producer is not None and producer.op_type == "Gather" and graph.is_const(graph.inputs_of(producer)[0]):
        rule = target.rule("Gather")  # embedding: Gather(int table) -> DQ
        return [(_WEIGHT, rule.weight)] if rule is not None and rule.weight is not None else []
    weight = graph.is_const(source)
    for reader, slot in graph.uses(graph.outputs_of(qdq_op)[0]):
        rule = target.rule(reader.kind)
        if rule is None:
            continue
        if weight and slot in rule.weight_slots and rule.weight is not None:
            specs.append((_WEIGHT, rule.weight))
        elif weight and rule.bias is not None and slot == 2 and rule.weight is not None:
            specs.append((_BIAS, rule.bias))
        elif rule.activation(slot) is not None:  # an activation, or a constant stored as one (whole graph)
            specs.append((_ACTIVATION, rule.activation(slot)))
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


def _node_unit_violations(graph: "Graph", target: Target) -> list[Violation]:
    """The whole-graph rule: every op other than Q/DQ reads its float inputs from a
    DequantizeLinear (constants the op's rule does not quantize, such as Clip bounds, excepted)
    and writes float outputs that only a QuantizeLinear reads; an output the rule fixes carries
    the fixed scale and zero point, and a shared op's output carries its input's."""
    def dq_of(value):
        producer = graph.producer(value) if value is not None else None
        return producer if producer is not None and producer.op_type == "DequantizeLinear" else None

    def qparams_of(op) -> tuple[np.ndarray | None, np.ndarray | None, int]:
        ins = graph.inputs_of(op)
        scale = graph.constant(ins[1]) if len(ins) > 1 and ins[1] is not None else None
        zero = graph.constant(ins[2]) if len(ins) > 2 and ins[2] is not None else None
        elem = zero.elem_type if zero is not None else onnx.TensorProto.UINT8
        return (scale.numpy().astype(np.float32) if scale is not None else None,
                zero.numpy().astype(np.int64) if zero is not None else np.zeros((), np.int64), elem)

    elem = _elem_types(graph, set(graph.ops()))
    violations: list[Violation] = []
    for op in graph.topo_order():
        if op.op_type in ("QuantizeLinear", "DequantizeLinear") and not op.domain:
            continue
        rule = target.rule(op.kind)
        # An op without float inputs (a Cast of integers) enters the datapath like a graph input: its
        # float outputs are checked below.
        if rule is None and any(v is not None and elem(v) in _FLOAT_ELEMS for v in graph.inputs_of(op)):
            violations.append(Violation(op.name, f"{op.op_type} would compute in float: the target has no quantized "
                                                 f"{op.op_type}"))
            continue
        for slot, value in enumerate(graph.inputs_of(op) if rule is not None else ()):
            if value is None or elem(value) not in _FLOAT_ELEMS or dq_of(value) is not None:
                continue
            quantized_slot = rule.activation(slot) is not None or (
                slot in rule.weight_slots and rule.weight is not None) or (slot == 2 and rule.bias is not None)
            if graph.is_const(value) and not quantized_slot:
                continue  # a constant the kernel reads as a parameter (Clip bounds, Resize scales)
            violations.append(Violation(op.name, f"{op.op_type} would compute in float: input {slot} ({value.name}) "
                                                 "is float, not read from a DequantizeLinear"))
            break
        for value in graph.outputs_of(op):
            if value is None or elem(value) not in _FLOAT_ELEMS:
                continue
            readers = graph.consumers(value)
            if graph.is_graph_output(value) or any(r.op_type != "QuantizeLinear" for r in readers):
                violations.append(Violation(op.name, f"{op.op_type} output {value.name} is float: it reaches "
                                                     "something other than a QuantizeLinear"))
                continue
            for q in readers if rule is not None else ():
                scale, zero, zero_elem = qparams_of(q)
                fixed = rule.output_spec(dtype_name(zero_elem))
                if fixed is not None and fixed.fixed is not None and (
                        scale is None or np.any(scale != np.float32(fixed.fixed[0])) or np.any(zero != fixed.fixed[1])):
                    violations.append(Violation(op.name, f"{op.op_type} output {value.name}: scale and zero point "
                                                         f"are not the fixed ({fixed.fixed[0]:g}, {fixed.fixed[1]}) "
                                                         "the target imposes"))
                source = dq_of(graph.inputs_of(op)[0]) if rule.shared and graph.inputs_of(op) else None
                if source is not None:
                    in_scale, in_zero, in_elem = qparams_of(source)
                    if in_elem != zero_elem or in_scale is None or scale is None or in_scale.shape != scale.shape \
                            or np.any(in_scale != scale) or np.any(in_zero != zero):
                        violations.append(Violation(op.name, f"{op.op_type} output {value.name} is not quantized "
                                                             "like its input (the target's kernel shares them)"))
    return violations
