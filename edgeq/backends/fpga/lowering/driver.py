"""One lowering run over a graph: where the datapath starts, its ops lowered in topological order
by their rules, and where it ends.

The entry is the first LayerNorm's input (first_norm="integer") or output ("host"): its
ancestors stay on the host, and the entry tensor is quantized to int8 (or enters rotated, its
embedding tables pre-rotated). Every op reading an integer tensor is then lowered; each graph
output the datapath computes is dequantized from int8; every unmasked integer tensor is
recorded as a probe of the program.
"""

from __future__ import annotations

from edgeq.backends.fpga.integer.program import Dequantize, Quantize
from edgeq.backends.fpga.lowering.forms import INT8, Form, scale_field
from edgeq.backends.fpga.lowering.options import LoweringOptions
from edgeq.backends.fpga.lowering.ranges import Ranges
from edgeq.backends.fpga.lowering.rotation import rotatable_tables, rotated_entry
from edgeq.backends.fpga.lowering.rules import lower
from edgeq.backends.fpga.lowering.state import Lowering
from edgeq.errors import OptionError
from edgeq.ir import Graph


def lower_datapath(graph: Graph, options: LoweringOptions, ranges: Ranges) -> Lowering:
    """Lower `graph` (left untouched) against `ranges`; the result holds what to splice in."""
    lowering = Lowering(graph, options, ranges)
    order = graph.topo_order()
    norms = [op for op in order if op.op_type == "LayerNormalization" and not op.domain]
    if not norms:
        raise OptionError("the fpga lowering found no LayerNormalization: it lowers transformer encoders "
                          "(embedding, then norm, attention and MLP blocks)",
                          fix="export the model with fused LayerNormalization (opset >= 17)")
    first = norms[0]
    entry = graph.inputs_of(first)[0] if options.first_norm == "integer" else graph.outputs_of(first)[0]
    lowering.host = graph.ancestors(entry)
    lowering.done |= lowering.host
    tables = rotatable_tables(lowering, entry, first) if options.rotate and options.first_norm == "integer" else None
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
