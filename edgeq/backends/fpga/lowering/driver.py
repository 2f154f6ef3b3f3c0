"""One lowering run over a graph: where the datapath starts, its ops lowered in topological order
by their rules, and where it ends.

The entry is the first norm's input (first_norm="integer") or output ("host"): the first
LayerNormalization of an encoder, or the first canonical RMSNorm of a decoder, whose input also
starts its pre-norm residual stream; the entry's ancestors stay on the host, and the entry tensor
is quantized to int8 (or enters rotated, its embedding tables pre-rotated). Every op reading an integer tensor is then lowered; each graph
output the datapath computes is dequantized from int8; every unmasked integer tensor is
recorded as a probe of the program.
"""

from __future__ import annotations

from edgeq.backends.fpga.integer.program import Dequantize, Quantize
from edgeq.backends.fpga.lowering.forms import INT8, Form, scale_field
from edgeq.backends.fpga.lowering.options import LoweringOptions
from edgeq.backends.fpga.lowering.ranges import Ranges
from edgeq.backends.fpga.lowering.rmsnorm import match_rms_norm
from edgeq.backends.fpga.lowering.rotation import rotatable_tables, rotated_entry
from edgeq.backends.fpga.lowering.rules import lower
from edgeq.backends.fpga.lowering.state import Lowering
from edgeq.errors import OptionError
from edgeq.ir import Graph, Op, Value


def lower_datapath(graph: Graph, options: LoweringOptions, ranges: Ranges) -> Lowering:
    """Lower `graph` (left untouched) against `ranges`; the result holds what to splice in."""
    lowering = Lowering(graph, options, ranges)
    order = graph.topo_order()
    first, norm_ops, norm_in, norm_out = first_norm(graph, order)
    entry = norm_in if options.first_norm == "integer" else norm_out
    if options.first_norm == "host" and any(reader not in norm_ops for reader in graph.consumers(norm_in)):
        raise OptionError(f"first_norm='host' runs the first norm '{first.name}' on the host, but its input is "
                          "also read past it (a pre-norm residual stream)",
                          fix="use first_norm='integer' (the default) for pre-norm decoders")
    lowering.host = graph.ancestors(entry)
    lowering.done |= lowering.host
    tables = rotatable_tables(lowering, entry, norm_ops) if options.rotate and options.first_norm == "integer" \
        else None
    if tables:
        rotated_entry(lowering, entry, tables)
    else:
        scale = lowering.scales.out_scale(entry)
        name = lowering.emit(Quantize(entry.name, scale_field(scale), unit=""))
        lowering.forms[entry.name] = Form(name, INT8, scale)
    for op in order:
        if op in lowering.done:
            continue
        if not any(v is not None and v.name in lowering.forms for v in graph.inputs_of(op)):
            continue
        lower(lowering, op)
    for value in graph.outputs:
        if value.name not in lowering.forms:
            continue
        form = lowering.forms[value.name]
        if form.dtype != INT8:
            form = lowering.int8(value.name)
        out = lowering.emit(Dequantize(form.name, scale_field(form.scale), unit=""))
        lowering.outputs.append((value, out))
        lowering.program.outputs.append((out, value.name))
    if not lowering.outputs:
        raise OptionError("no graph output is computed by the integer datapath")
    for name, form in lowering.forms.items():
        if form.mask is None:
            scale = float(form.scale) if form.per_tensor else [float(s) for s in form.scale]
            lowering.program.probes[name] = (form.name, scale)
    return lowering


def first_norm(graph: Graph, order: list[Op]) -> tuple[Op, frozenset[Op], Value, Value]:
    """The first norm of the model (a LayerNormalization, or a canonical RMSNorm starting at its
    Pow), its ops, input and output."""
    for op in order:
        if op.domain:
            continue
        if op.op_type == "LayerNormalization":
            return op, frozenset([op]), graph.inputs_of(op)[0], graph.outputs_of(op)[0]
        if op.op_type == "Pow":
            block = match_rms_norm(graph, op)
            if block is not None:
                return op, frozenset(block.ops), block.x, block.out
    raise OptionError("the fpga lowering found no LayerNormalization or RMSNorm: it lowers transformer encoders "
                      "and decoders (embedding, then norm, attention and MLP blocks)",
                      fix="export the model with fused LayerNormalization (opset >= 17), or run the front end's "
                          "canonicalize pass (RMSNorm in its canonical form)")
