"""What one lowering run has built so far, and the helpers every rule uses.

`Lowering` holds the integer graph builder and the program being recorded, the integer form of
every float tensor lowered so far, the ops done, lowered and left to the host, and the results
the pass splices into the graph (pre-rotated embedding tables, dequantized outputs). Rules
(edgeq.backends.fpga.lowering.rules) read and extend it through `emit`, `form`, `int8` and `align`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from edgeq.backends.fpga.integer.builder import IntGraphBuilder
from edgeq.backends.fpga.integer.program import IntegerProgram, Shift, Step
from edgeq.backends.fpga.lowering.forms import INT8, INT16, INT32, UINT8, Form, exponent
from edgeq.backends.fpga.lowering.options import LoweringOptions
from edgeq.backends.fpga.lowering.ranges import Ranges
from edgeq.backends.fpga.lowering.scales import Scales
from edgeq.errors import OptionError
from edgeq.frontend.patterns import find_roles
from edgeq.ir import Graph, Op, Value
from edgeq.quant.hadamard import Rotation


class Lowering:
    """The state of lowering `graph` with `options` against `ranges`."""

    def __init__(self, graph: Graph, options: LoweringOptions, ranges: Ranges):
        self.graph = graph
        self.options = options
        self.ranges = ranges
        self.b = IntGraphBuilder("fpga", reserved=[v.name for v in graph.values()])
        self.program = IntegerProgram()
        self.forms: dict[str, Form] = {}
        self.narrow: dict[str, Form] = {}     # int8 per-tensor forms of wider tensors
        self.wide: dict[str, Form] = {}       # int16 per-tensor forms of wider or channel-scaled tensors
        self.rotations: dict[str, tuple[Form, Rotation]] = {}   # wide tensor -> its rotated int8 form
        self.table_updates: list[tuple[Value, np.ndarray]] = []   # host embedding tables, rotated
        self.done: set[Op] = set()
        self.lowered: list[Op] = []
        self.host: set[Op] = set()
        self.host_why: dict[Op, str] = {}      # host ops other than the entry's, and why they are there
        self.masks: dict[str, str] = {}       # additive-mask float value -> its integer mask
        # linear input x = factor * t per channel (an RMSNorm's gamma folded into the reading
        # layers' weights) -> (t, factor): linears read t and multiply W's rows by the factor
        self.folded: dict[str, tuple[str, np.ndarray]] = {}
        self.gathered: dict[tuple[str, bytes], str] = {}   # (tensor, channel rows) -> their Gather
        self.outputs: list[tuple[Value, str]] = []   # (float graph output, its dequantized value)
        self.roles = find_roles(graph)
        self.scales = Scales(graph, self.roles, ranges, options)

    def emit(self, step: Step) -> str:
        return self.program.add(step, self.b)

    def mark_lowered(self, op: Op) -> None:
        self.done.add(op)
        self.lowered.append(op)

    def form(self, value: Value) -> Form:
        try:
            return self.forms[value.name]
        except KeyError:
            raise OptionError(f"'{value.name}' is read inside the integer datapath but is not integer",
                              fix="the fpga lowering supports inputs from the datapath, constants and the "
                                  "attention mask only") from None

    def int8(self, name: str) -> Form:
        """The form of float tensor `name` as int8 per tensor (a shift when it is not yet)."""
        form = self.forms[name]
        if form.mask is not None:
            raise OptionError(f"masked scores '{name}' must go to a Softmax")
        if form.dtype in (INT8, UINT8) and form.per_tensor:
            return form
        if name not in self.narrow:  # kept apart: a residual add still reads the wide form
            scale = self.scales.act_scale(name)
            shift = exponent(form.scale / scale, f"requantizing '{name}'")
            out = self.emit(Shift(form.name, shift, "int8", unit=form.unit))
            self.narrow[name] = Form(out, INT8, np.asarray(scale, np.float64), form.unit)
        return self.narrow[name]

    def int16(self, name: str) -> Form:
        """The form of float tensor `name` as int16 per tensor, covering its calibrated bound
        (a shift when it is not yet 8 or 16 bits wide with one scale)."""
        form = self.forms[name]
        if form.mask is not None:
            raise OptionError(f"masked scores '{name}' must go to a Softmax")
        if form.dtype in (INT8, INT16) and form.per_tensor:
            return form
        if name not in self.wide:
            scale = self.scales.int16_scale(name)
            shift = exponent(form.scale / scale, f"requantizing '{name}' to int16")
            out = self.emit(Shift(form.name, shift, "int16", unit=form.unit))
            self.wide[name] = Form(out, INT16, np.asarray(scale, np.float64), form.unit)
        return self.wide[name]

    def align(self, form: Form, scale: float, unit: str, what: str) -> Form:
        """`form` on the int32 grid `scale`."""
        if form.dtype == INT32 and form.per_tensor and float(form.scale) == scale:
            return form
        shift = exponent(form.scale / scale, what)
        out = self.emit(Shift(form.name, shift, "int32", unit=unit))
        return Form(out, INT32, np.asarray(scale, np.float64), unit)

    def host_ops(self) -> Iterable[tuple[Op, str]]:
        for op in self.graph.topo_order():
            if op in self.host_why:
                yield op, self.host_why[op]
            elif op in self.host:
                yield op, ("host op: embedding lookup and sum before the first QuantizeLinear"
                           if op.op_type != "LayerNormalization" else
                           "host op: first LayerNorm, before the first QuantizeLinear (first_norm='host')")


def unsupported(op: Op) -> OptionError:
    return OptionError(f"the fpga lowering has no integer rule for {op.kind} '{op.name}'",
                       fix="the fpga target lowers BERT-style encoders and Llama-style decoders in the front "
                           "end's canonical forms: MatMul (linear layers, tied LM heads through a Transpose, "
                           "attention), Add (residual, rotary, attention mask), Mul/Div (a constant scale, SwiGLU, "
                           "rotary), Softmax, LayerNormalization, RMSNorm, GELU, SiLU, Reshape/Transpose, "
                           "Slice/Neg/Concat (rotary), Unsqueeze/Expand (GQA repeat)")
