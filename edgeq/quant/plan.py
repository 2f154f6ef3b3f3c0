"""The quantization plan: which ops run in integer, with which specs per input, and why the
others stay high. Built by the `select-precision` pass, read by calibration and QDQ insertion."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import onnx

from edgeq.errors import OptionError
from edgeq.ir import Graph, Op, Value
from edgeq.options import CompileOptions
from edgeq.frontend.patterns import DATA_MOVEMENT, Roles
from edgeq.targets.base import Granularity, OpRule, QSpec, Target

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


@dataclass(frozen=True)
class Scheme:
    """The target's op rules specialised by --weights/--group/--activations."""

    rules: dict[str, OpRule]
    label: str
    head_weight: QSpec | None = None   # the LM head's weights where they differ from the others'
    weight_dtype: str = "int8"          # the linears' weight dtype (as --weights names it)

    @classmethod
    def resolve(cls, target: Target, options: CompileOptions) -> "Scheme":
        """Every constant comes from the target: the spec of the chosen weight dtype, its
        block sizes (--group), and the LM head's wider spec."""
        dtype = WEIGHT_DTYPES.get(options.weights, options.weights) or target.weight.dtype
        weight = target.weight_spec(dtype)
        if weight is None:
            raise OptionError(f"target {target.name} does not support {dtype} weights",
                              fix=f"use one of {', '.join(sorted(target.weight_dtypes))}")
        if options.group:
            weight = weight.blocked(options.group)
        for pattern, block, zero_points in options.weight_groups:  # what the kernel rejects fails before any work
            if weight.granularity != Granularity.BLOCK:
                raise OptionError(f"--weight-group {pattern}={block}: {dtype} weights are "
                                  f"{weight.granularity.value}-wise on target {target.name}, not blocks",
                                  fix="use it with block-wise weights (--weights int4)")
            if block not in weight.accepted_block_sizes:
                raise OptionError(f"--weight-group {pattern}={block}: {dtype} weights take no block size {block} "
                                  f"on target {target.name}",
                                  fix=f"use one of {', '.join(map(str, weight.accepted_block_sizes))}")
            if zero_points and weight.dtype not in target.zero_point_weights:
                raise OptionError(f"--weight-group {pattern}={block}:asym: target {target.name} takes {dtype} "
                                  "weights without zero points", fix="drop :asym")
        if options.weight_zero_points:
            if weight.dtype not in target.zero_point_weights:
                raise OptionError(f"target {target.name} takes {dtype} weights without zero points",
                                  fix="drop --weight-zero-points" + (
                                      f" (or use --weights {' / '.join(sorted(target.zero_point_weights))})"
                                      if target.zero_point_weights else ""))
            weight = weight.replace(symmetric=False)
        if weight.dtype in _WEIGHT_ONLY and options.activations != "float":
            raise OptionError(f"{dtype} weights are weight-only (MatMulBnb4 computes with float activations)",
                              fix="add --activations float")
        if weight.dtype in _RTN_ONLY and options.weight_rounding not in ("auto", "rtn"):
            raise OptionError(f"--weight-rounding {options.weight_rounding} rounds integer grids; {dtype} weights "
                              "are rounded to nearest", fix="drop --weight-rounding (or use rtn)")
        # The LM head keeps `head_weights` where that spec is wider than the other linears'.
        head = target.weight_spec(options.head_weights)
        head_weight = head if head is not None and head.bits > weight.bits else None
        if head_weight is not None and options.weight_zero_points and head_weight.dtype in target.zero_point_weights:
            head_weight = head_weight.replace(symmetric=False)
        act_label = options.activations or ("int16" if target.activation.bits == 16 else "int8")
        rules = {}
        for kind, rule in target.ops.items():
            acts = rule.activations
            if options.activations == "float":
                acts = ()
            elif options.activations == "int16":
                acts = tuple(None if s is None else _widen(s) for s in acts)
            elif options.activations == "int8":  # a target whose activations default to 16 bits
                acts = tuple(None if s is None else _narrow(s) for s in acts)
            elif options.activations in ACTIVATION_DTYPES:  # float8: symmetric, zero point 0
                acts = tuple(None if s is None else _to_float(s, ACTIVATION_DTYPES[options.activations])
                             for s in acts)
            for spec in acts:
                if spec is not None and spec.dtype not in target.activation_dtypes:
                    raise OptionError(f"target {target.name} does not support {spec.dtype} activations")
            rule_weight = rule.weight
            # The linears' weights (the rules declaring the target's default weight spec) take the
            # chosen one; other constants keep their own (embedding tables, norm weights).
            if rule_weight is not None and kind != "Gather" and rule_weight == target.weight:
                rule_weight = weight
            rules[kind] = replace(rule, activations=acts, weight=rule_weight)
        activation_bits = {"int8": "A8", "int16": "A16", "float": " weight-only", "fp8": "A8"}[act_label]
        label = f"W{weight.bits}{activation_bits}" + (f" g{weight.block_size}" if weight.block_size else "")
        if options.weight_zero_points:
            label += " zero points"
        if weight.dtype in _LABELS:  # not integer: say which format
            label += f" {_LABELS[weight.dtype]}"
        return cls(rules, label, head_weight, dtype)


# --weights/--activations names of dtypes whose QSpec dtype differs (float8 E4M3FN by default).
WEIGHT_DTYPES = {"fp8": "float8e4m3fn"}
ACTIVATION_DTYPES = {"fp8": "float8e4m3fn"}
_LABELS = {"nf4": "NF4", "float8e4m3fn": "FP8 E4M3FN", "float8e5m2": "FP8 E5M2"}
# Weight dtypes GPTQ/AWQ do not round (not a uniform integer grid, or not validated on one).
_RTN_ONLY = frozenset({"nf4", "float8e4m3fn", "float8e5m2"})
# Weight dtypes whose linears run as weight-only kernels (insert-qdq emits MatMulBnb4 for nf4).
_WEIGHT_ONLY = frozenset({"nf4"})

RotationChoice = Literal["yes", "no", "if-stream"]


def rotates(options: CompileOptions, target: Target | None) -> RotationChoice:
    """Whether the Hadamard rotation runs: --rotate/--no-rotate, else the target's choice for
    the preset's weight dtype: always ("yes": `rotate_weights`), only where the graph has a
    pre-norm residual stream to fold the rotation into ("if-stream": `rotate_stream_weights`;
    decoder LLMs, where it costs almost no run time), or not ("no")."""
    if options.rotate is not None:
        return "yes" if options.rotate else "no"
    if target is None or options.decompose_outliers is not None:  # the decomposition handles the outliers
        return "no"
    dtype = Scheme.resolve(target, options).weight_dtype
    if dtype in target.rotate_weights:
        return "yes"
    return "if-stream" if dtype in target.rotate_stream_weights else "no"


def _widen(spec: QSpec) -> QSpec:
    return spec.replace(dtype="uint16" if spec.dtype == "uint8" else "int16", qrange=None)


def _to_float(spec: QSpec, dtype: str) -> QSpec:
    return spec.replace(dtype=dtype, symmetric=True, qrange=None, scale_pow2=False, unsigned_when_nonnegative=False)


def _narrow(spec: QSpec) -> QSpec:
    if spec.bits <= 8:
        return spec
    return spec.replace(dtype="uint8" if spec.dtype == "uint16" else "int8", qrange=None)


@dataclass
class OpPlan:
    op: Op
    activations: dict[int, QSpec] = field(default_factory=dict)   # slot -> spec
    weights: dict[int, QSpec] = field(default_factory=dict)       # slot -> spec
    bias: QSpec | None = None
    two_digit: bool = False   # activation of slot 0 as two int8 digits (see CompileOptions.two_digit)
    # Output slot -> spec where the op's output is quantized where it is produced (whole-graph
    # targets: every float output; a spec with `fixed` is the one the kernel imposes).
    outputs: dict[int, QSpec] = field(default_factory=dict)
    shared: bool = False      # the outputs carry input 0's scale and zero point (OpRule.shared)


@dataclass
class QuantPlan:
    scheme: Scheme
    roles: Roles
    ops: list[OpPlan] = field(default_factory=list)
    kept_high: list[tuple[Op, str]] = field(default_factory=list)
    # Every tensor is quantized where it is produced and data movement is an op of its own
    # (Target.whole_graph): no look-through of movement, op outputs calibrated too.
    whole_graph: bool = False

    def activation_sources(self, graph: Graph) -> dict[str, list[tuple[OpPlan, int, QSpec]]]:
        """Tensors to calibrate: the source of every quantized activation input (looking
        through data movement, which shares its input's quantization), and every quantized op
        output whose quantization is not fixed or shared (slot -1 - output slot)."""
        sources: dict[str, list[tuple[OpPlan, int, QSpec]]] = {}
        for plan in self.ops:
            ins = graph.inputs_of(plan.op)
            for slot, spec in plan.activations.items():
                source, _ = quant_source(graph, ins[slot], movement=not self.whole_graph)
                sources.setdefault(source.name, []).append((plan, slot, spec))
            if plan.shared:
                continue
            outs = graph.outputs_of(plan.op)
            for slot, spec in plan.outputs.items():
                if spec.fixed is None and outs[slot] is not None:
                    sources.setdefault(outs[slot].name, []).append((plan, -1 - slot, spec))
        return sources


def is_float(value: Value | None) -> bool:
    return value is not None and value.elem_type in _FLOAT_TYPES


def quant_source(graph: Graph, value: Value, *, movement: bool = True) -> tuple[Value, list[Op]]:
    """Walk up through data-movement ops to the tensor whose quantization `value` shares.
    Returns (source, chain of movement ops from source down to value). `movement=False`: data
    movement is a quantized op of its own (whole-graph targets), `value` is its own source."""
    chain: list[Op] = []
    while movement:
        producer = graph.producer(value)
        if producer is None or producer.op_type not in DATA_MOVEMENT or producer.domain:
            break
        data = graph.inputs_of(producer)[0]
        if data is None or graph.is_const(data) or len(graph.outputs_of(producer)) != 1:
            break
        chain.append(producer)
        value = data
    chain.reverse()
    return value, chain
