"""Decide which ops run in integer on the target and which stay high precision.

An op is quantized when the target has an integer rule for its kind, its inputs are float, its
role is not one the target keeps high (LayerNorm/RMSNorm, softmax, residual adds, ...) and no
user override excludes it. Everything else stays high, with the reason recorded for the report.
"""

from __future__ import annotations

import re
from dataclasses import replace

import onnx

from edgeq.errors import PreconditionError
from edgeq.ir import Graph, Op
from edgeq.options import CompileOptions, PrecisionOverrides
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.pipeline.artifacts import QUANT_PLAN
from edgeq.frontend.patterns import Role, find_roles, lm_heads
from edgeq.quant.plan import OpPlan, QuantPlan, Scheme, is_float
from edgeq.registry import register_pass
from edgeq.targets.base import Granularity, QSpec, Target



@register_pass
class SelectPrecision(Pass):
    name = "select-precision"
    description = "choose the ops that run in integer (target rules, kept-high roles, user overrides)"

    def __init__(self, options: CompileOptions | None = None):
        self.options = options or CompileOptions()

    @classmethod
    def from_options(cls, options: CompileOptions, target: Target) -> "SelectPrecision":
        return cls(options)

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        if ctx.target is None:
            raise PreconditionError("select-precision needs a target in the pass context")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        target = ctx.target
        scheme = Scheme.resolve(target, self.options)
        roles = find_roles(graph)
        plan = QuantPlan(scheme=scheme, roles=roles, whole_graph=target.whole_graph)
        heads = set(lm_heads(graph, roles)) if scheme.head_weight is not None else set()
        regrouped: dict[str, int] = {}
        for op in graph.topo_order():
            if not op.name:
                op.name = graph.unique_op_name(op.op_type)
            reason = self._reason_kept_high(graph, op, roles.role(op), scheme, target, self.options.overrides)
            if reason is None:
                head = scheme.head_weight if op in heads else None
                op_plan = (_plan_whole_graph_op(graph, op, scheme, head) if target.whole_graph
                           else self._plan_op(graph, op, scheme, head))
                op_plan.two_digit = self._two_digit(op, op_plan)
                self._regroup(op, op_plan, regrouped)
                if op_plan.activations or op_plan.weights:
                    plan.ops.append(op_plan)
                    continue
                reason = "nothing to quantize"
            if reason != "no integer kernel" or op.op_type in _REPORTED_HIGH:
                plan.kept_high.append((op, reason))
        ctx.artifacts[QUANT_PLAN] = plan
        stats = {"ops_quantized": len(plan.ops), "ops_kept_high": len(plan.kept_high)}
        if heads:
            stats["lm_head_weights"] = f"{scheme.head_weight.dtype} ({', '.join(sorted(op.name for op in heads))})"
        for pattern, block, zero_points in self.options.weight_groups:
            kind = {None: "", True: " with zero points", False: " without zero points"}[zero_points]
            stats[f"weights in blocks of {block}{kind} (/{pattern}/)"] = regrouped.get(pattern, 0)
        return PassResult(graph, False, stats)

    def _reason_kept_high(self, graph: Graph, op: Op, role: Role | None, scheme: Scheme, target: Target,
                          overrides: PrecisionOverrides) -> str | None:
        user = overrides.excludes(op.name, op.op_type)
        if user:
            return user
        if role is not None and role.value in target.keep_high:
            return f"{role.value} stays {_float_dtype(graph, op)}"
        rule = scheme.rules.get(op.kind)
        if rule is None:
            return "no integer kernel"
        if op.op_type == "Gather" and not target.whole_graph and (
                role != Role.EMBEDDING or not self.options.quantize_embeddings):
            return "not an embedding table"
        return None

    def _regroup(self, op: Op, plan: OpPlan, counts: dict[str, int]) -> None:
        """--weight-group: the first pattern matching the op's name sets its weights' block size
        (and zero points, where it says)."""
        for pattern, block, zero_points in self.options.weight_groups:
            if re.search(pattern, op.name):
                blocked = {slot: spec for slot, spec in plan.weights.items() if spec.granularity == Granularity.BLOCK}
                for slot, spec in blocked.items():
                    spec = spec.blocked(block)
                    plan.weights[slot] = spec if zero_points is None else spec.replace(symmetric=not zero_points)
                counts[pattern] = counts.get(pattern, 0) + bool(blocked)
                return

    def _two_digit(self, op: Op, plan: OpPlan) -> bool:
        if 0 not in plan.activations or 1 not in plan.weights or op.op_type != "MatMul":
            return False
        return any(re.search(pattern, op.name) for pattern in self.options.two_digit)

    @staticmethod
    def _plan_op(graph: Graph, op: Op, scheme: Scheme, weight: QSpec | None = None) -> OpPlan:
        rule = scheme.rules[op.kind]
        if weight is not None and rule.weight is not None:
            rule = replace(rule, weight=weight)
        plan = OpPlan(op)
        ins = graph.inputs_of(op)
        for slot, value in enumerate(ins):
            if value is None:
                continue
            tensor = graph.constant(value)
            if slot in rule.weight_slots and tensor is not None and rule.weight is not None:
                if tensor.dtype.kind == "f" and _fits_granularity(tensor.dims, rule.weight):
                    plan.weights[slot] = rule.weight
            elif tensor is None and slot < len(rule.activations) and rule.activations[slot] is not None:
                if is_float(value):
                    plan.activations[slot] = rule.activations[slot]
        if rule.bias is not None and len(ins) > 2 and ins[2] is not None and plan.weights and \
                slot_is_const(graph, ins[2]) and 0 in plan.activations:
            plan.bias = rule.bias
        # An op of activations only keeps all-or-nothing: a MatMul with one float input stays high.
        needed = [s for s, v in enumerate(ins) if v is not None and s < len(rule.activations)
                  and rule.activations[s] is not None and graph.constant(v) is None]
        if any(s not in plan.activations for s in needed):
            return OpPlan(op)
        if op.op_type != "Gather" and rule.weight is not None and any(
                s in rule.weight_slots and graph.constant(ins[s]) is not None for s in range(len(ins))) \
                and not plan.weights:
            return OpPlan(op)
        return plan


def _plan_whole_graph_op(graph: Graph, op: Op, scheme: Scheme, head: QSpec | None = None) -> OpPlan:
    """The plan of one op on a whole-graph target: every float input quantized (weights by the
    weight spec, Conv/Gemm biases in int32, other constants stored as activations of their
    slot's spec), every float output quantized where it is produced. An op with a float input
    its rule cannot quantize is planned empty (it stays float, and validate names it)."""
    rule = scheme.rules[op.kind]
    if head is not None and rule.weight is not None:
        rule = replace(rule, weight=head)
    plan = OpPlan(op, shared=rule.shared)
    ins = graph.inputs_of(op)
    for slot, value in enumerate(ins):
        if not is_float(value):
            continue
        tensor = graph.constant(value)
        spec = rule.activation(slot)
        if tensor is not None and slot in rule.weight_slots and rule.weight is not None \
                and _fits_granularity(tensor.dims, rule.weight) and not _blocks_refused(graph, op, rule):
            plan.weights[slot] = rule.weight
        elif tensor is not None and slot in rule.weight_slots and rule.weight is not None \
                and rule.weight.granularity == Granularity.BLOCK and len(tensor.dims) == 2:
            # shorter along K than one block (a 12-wide Hadamard factor under --group 32), or blocks
            # the kernel refuses here: per output channel, the spec's unblocked form
            plan.weights[slot] = rule.weight.replace(granularity=Granularity.CHANNEL, axis=None, block_size=None)
        elif tensor is not None and slot == 2 and rule.bias is not None and rule.weight is not None:
            continue  # planned below, once the weight is
        elif spec is not None:
            (plan.weights if tensor is not None else plan.activations)[slot] = spec
        elif tensor is None:
            return OpPlan(op)
    if rule.bias is not None and len(ins) > 2 and is_float(ins[2]) and slot_is_const(graph, ins[2]) \
            and 1 in plan.weights and 0 in plan.activations:
        plan.bias = rule.bias
    if not (plan.activations or plan.weights):
        return OpPlan(op)
    default = next((s for s in (*plan.activations.values(), *plan.weights.values()) if s.dtype in
                    ("uint16", "uint8", "int16", "int8") and s.granularity == Granularity.TENSOR), None)
    for slot, value in enumerate(graph.outputs_of(op)):
        if is_float(value) and default is not None:
            plan.outputs[slot] = rule.output_spec(default.dtype) or default
    return plan


_FLOAT_NAMES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.DOUBLE: "float64"}


def _float_dtype(graph: Graph, op: Op) -> str:
    """The precision an op kept high runs in: its output's float dtype, as the model states it."""
    for value in graph.outputs_of(op):
        if value is not None and value.elem_type in _FLOAT_NAMES:
            return _FLOAT_NAMES[value.elem_type]
    return "float"


def slot_is_const(graph: Graph, value) -> bool:
    return graph.constant(value) is not None


def _blocks_refused(graph: Graph, op: Op, rule) -> bool:
    """Block-wise weights on a batch of matrices where the kernel takes one matrix only."""
    if not rule.blocks_need_one_matrix or rule.weight is None or rule.weight.granularity != Granularity.BLOCK:
        return False
    shape = graph.inputs_of(op)[0].shape
    if shape is None:
        return True
    return any(d != 1 for d in shape[:-2])


def _fits_granularity(dims: tuple[int, ...], spec) -> bool:
    if spec.granularity == Granularity.BLOCK:
        return len(dims) == 2 and dims[(spec.axis or 0) % 2] >= spec.block_size
    return len(dims) >= 1


# Ops worth naming in the report when they stay high although the target has no kernel.
_REPORTED_HIGH = {"LayerNormalization", "Softmax", "Add", "Mul", "Erf", "Sigmoid", "Div", "ReduceMean"}
