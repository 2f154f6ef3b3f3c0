"""Which rule lowers an op: tables from role and op kind to rule functions.

A rule is `rule(lowering, op)`: it reads the integer forms of the op's inputs from `lowering`,
emits integer steps, and records the form of its output (a rule for a multi-op block also marks
the block's other ops lowered). A role the front end's patterns found (a decomposed GELU, ...)
takes precedence over the op kind; an op in a non-default domain, or with neither, has no rule.
Adding a rule is one function in a module of its family and one entry here.

Encoder rules: linear.py, rotation.py, attention.py, residual.py, norms.py, gelu.py, movement.py;
decoder rules: rmsnorm.py, silu.py, products.py (SwiGLU and rotary products), rotary.py
(Slice/Neg/Concat), host.py (position tables computed on the host), gqa.py (Unsqueeze/Expand),
masks.py (the causal mask, reached from attention.py's mask rule).
"""

from __future__ import annotations

from collections.abc import Callable

from edgeq.backends.fpga.lowering.attention import act_matmul, masked_scores, softmax
from edgeq.backends.fpga.lowering.gelu import gelu
from edgeq.backends.fpga.lowering.gqa import expand, unsqueeze
from edgeq.backends.fpga.lowering.host import host_shape
from edgeq.backends.fpga.lowering.linear import constant_weight, linear
from edgeq.backends.fpga.lowering.movement import move, rescale
from edgeq.backends.fpga.lowering.norms import layer_norm
from edgeq.backends.fpga.lowering.products import product
from edgeq.backends.fpga.lowering.residual import residual_add
from edgeq.backends.fpga.lowering.rmsnorm import rms_norm
from edgeq.backends.fpga.lowering.rotary import concat, neg, slice_
from edgeq.backends.fpga.lowering.silu import silu
from edgeq.backends.fpga.lowering.state import Lowering, unsupported
from edgeq.frontend.patterns import Role
from edgeq.ir import Op

Rule = Callable[[Lowering, Op], None]


def matmul(lowering: Lowering, op: Op) -> None:
    """A constant second operand (or the Transpose of one: a tied LM head) is a linear layer's
    weight; else both are activations."""
    weight = lowering.graph.inputs_of(op)[1]
    if constant_weight(lowering.graph, weight) is not None:
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


def mul(lowering: Lowering, op: Op) -> None:
    """A constant operand is a scale (a scalar folds into the tensor's scale); else the product
    of two integer tensors (SwiGLU), or of one and a host-computed table (rotary cos/sin)."""
    if any(lowering.graph.is_const(v) for v in lowering.graph.inputs_of(op)):
        rescale(lowering, op)
    else:
        product(lowering, op)


RULES_BY_ROLE: dict[Role, Rule] = {
    Role.GELU: gelu,
    Role.RMS_NORM: rms_norm,
    Role.SILU: silu,
}

RULES_BY_KIND: dict[str, Rule] = {
    "Gelu": gelu,
    "MatMul": matmul,
    "Add": add,
    "Div": rescale,
    "Mul": mul,
    "Softmax": softmax,
    "Reshape": move,
    "Transpose": move,
    "LayerNormalization": layer_norm,
    "Pow": rms_norm,           # the canonical RMSNorm starts with Pow(x, 2), also without its role
    "Sigmoid": silu,           # the canonical SiLU is x * Sigmoid(x), also without its role
    "Neg": neg,
    "Slice": slice_,
    "Concat": concat,
    "Unsqueeze": unsqueeze,
    "Expand": expand,
    "Shape": host_shape,       # of the embedding sum: a host op, like the positions it feeds
}


def lower(lowering: Lowering, op: Op) -> None:
    """Lower `op` with its rule and mark it lowered; an op without a rule is an error naming it."""
    rule = None if op.domain else RULES_BY_ROLE.get(lowering.roles.role(op)) or RULES_BY_KIND.get(op.op_type)
    if rule is None:
        raise unsupported(op)
    rule(lowering, op)
    if op not in lowering.host:   # a rule may leave an op to the host (the Shape of a host tensor)
        lowering.mark_lowered(op)
