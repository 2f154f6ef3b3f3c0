"""Which rule lowers an op: tables from role and op kind to rule functions.

A rule is `rule(lowering, op)`: it reads the integer forms of the op's inputs from `lowering`,
emits integer steps, and records the form of its output (a rule for a multi-op block also marks
the block's other ops lowered). A role the front end's patterns found (a decomposed GELU, ...)
takes precedence over the op kind; an op in a non-default domain, or with neither, has no rule.
Adding a rule is one function in a module of its family and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable

from edgeq.backends.fpga.lowering.attention import act_matmul, masked_scores, softmax
from edgeq.backends.fpga.lowering.gelu import gelu
from edgeq.backends.fpga.lowering.linear import linear
from edgeq.backends.fpga.lowering.movement import move, rescale
from edgeq.backends.fpga.lowering.norms import layer_norm
from edgeq.backends.fpga.lowering.residual import residual_add
from edgeq.backends.fpga.lowering.state import Lowering, unsupported
from edgeq.frontend.patterns import Role
from edgeq.ir import Op

Rule = Callable[[Lowering, Op], None]


def matmul(lowering: Lowering, op: Op) -> None:
    """A constant second operand is a linear layer's weight; else both are activations."""
    weight = lowering.graph.inputs_of(op)[1]
    if lowering.graph.is_const(weight):
        linear(lowering, op)
    else:
        act_matmul(lowering, op)


def add(lowering: Lowering, op: Op) -> None:
    """Two integer operands are a residual add; else one is the attention scores and the other
    their additive mask."""
    if all(v.name in lowering.forms for v in lowering.graph.inputs_of(op)):
        residual_add(lowering, op)
    else:
        masked_scores(lowering, op)


RULES_BY_ROLE: dict[Role, Rule] = {
    Role.GELU: gelu,
}

RULES_BY_KIND: dict[str, Rule] = {
    "Gelu": gelu,
    "MatMul": matmul,
    "Add": add,
    "Div": rescale,
    "Mul": rescale,
    "Softmax": softmax,
    "Reshape": move,
    "Transpose": move,
    "LayerNormalization": layer_norm,
}


def lower(lowering: Lowering, op: Op) -> None:
    """Lower `op` with its rule and mark it lowered; an op without a rule is an error naming it."""
    rule = None if op.domain else RULES_BY_ROLE.get(lowering.roles.role(op)) or RULES_BY_KIND.get(op.op_type)
    if rule is None:
        raise unsupported(op)
    rule(lowering, op)
    lowering.mark_lowered(op)
