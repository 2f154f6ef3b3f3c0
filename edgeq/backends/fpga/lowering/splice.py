"""Splicing a finished lowering into the graph: the emitted integer nodes and constants (each node
tagged with its hardware unit), the graph outputs pointed at their dequantized values, the host's
pre-rotated embedding tables, the opset raised to the integer kernels', and the model metadata
(edgeq.backends.fpga.metadata) describing the datapath."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import numpy_helper

from edgeq.backends.fpga.integer.builder import OPSET
from edgeq.backends.fpga.integer.program import IntegerProgram
from edgeq.backends.fpga.lowering.state import Lowering
from edgeq.backends.fpga.metadata import HOST_OPS_KEY, PROGRAM_KEY, UNIT_KEY
from edgeq.errors import OptionError
from edgeq.ir import Graph, Op, Tensor


def splice(graph: Graph, lowering: Lowering) -> int:
    """Add the builder's initializers and nodes to the graph (names kept), tag each node with
    its unit, point the graph outputs at the dequantized values, store the pre-rotated
    embedding tables. Returns the outputs replaced."""
    b, program = lowering.b, lowering.program
    for proto in b.initializers:
        value = graph.add_constant(proto.name, Tensor.from_array(numpy_helper.to_array(proto)))
        if value.name != proto.name:
            raise OptionError(f"integer constant {proto.name!r} collides with a graph value")
    unit_of = {}
    for step, (start, end) in zip(program.steps, program.spans):
        for i in range(start, end):
            unit_of[i] = step.unit
    for i, node in enumerate(b.nodes):
        ins = [graph.value(n) if n else None for n in node.input]
        op = graph.add_op(node.op_type, ins, list(node.output), name=node.name)
        for attr in node.attribute:
            op.attributes[attr.name] = attr
        if unit_of.get(i):
            op.metadata_props = ((UNIT_KEY, unit_of[i]),)
        for out in graph.outputs_of(op):
            if out.name not in node.output:
                raise OptionError(f"integer value {out.name!r} collides with a graph value")
            out.set_type(onnx.helper.np_dtype_to_tensor_dtype(b.dtype(out.name)), None)
    for float_value, name in lowering.outputs:
        new = graph.value(name)
        new.type = float_value.type
        graph.replace_all_uses(float_value, new)
        graph.rename_value(float_value, graph.unique_name(f"{float_value.name}_float"))
        graph.rename_value(new, _original_name(program, name))
    for table, rows in lowering.table_updates:   # the host's embedding tables, pre-rotated
        graph.set_const(table, rows)
    return len(lowering.outputs)


def _original_name(program: IntegerProgram, name: str) -> str:
    return next(graph_name for out, graph_name in program.outputs if out == name)


def raise_opset(graph: Graph, host: set[Op]) -> None:
    """The integer kernels are opset OPSET; the host ops that stay must mean the same there."""
    imports = graph.model.opset_imports
    key = "" if "" in imports or "ai.onnx" not in imports else "ai.onnx"
    old = imports.get(key, OPSET)
    if old < OPSET:
        for op in host:
            if op.domain:
                continue
            try:
                before, after = onnx.defs.get_schema(op.op_type, old), onnx.defs.get_schema(op.op_type, OPSET)
            except onnx.defs.SchemaError:
                continue
            # Later versions mostly add types; a changed input or attribute list changes meaning
            # (e.g. axes moving from an attribute to an input).
            if _signature(before) != _signature(after):
                raise OptionError(f"host op {op.op_type} '{op.name}' changes meaning between opset {old} and {OPSET}",
                                  fix=f"re-export the model at opset {OPSET}")
    imports[key] = max(old, OPSET)
    graph.model.ir_version = max(graph.model.ir_version, 10)


def _signature(schema) -> tuple:
    return tuple(i.name for i in schema.inputs), tuple(sorted(schema.attributes))


def record_metadata(graph: Graph, lowering: Lowering, calibration_data) -> None:
    """The program and the host ops, in the model metadata (the input shapes an estimate
    assumes are recorded by every compile: edgeq.metadata.INPUT_SHAPES_KEY)."""
    _set_metadata(graph, {
        PROGRAM_KEY: lowering.program.to_json(),
        HOST_OPS_KEY: json.dumps([{"name": op.name, "op_type": op.op_type, "why": why}
                                  for op, why in lowering.host_ops()]),
    })


def _set_metadata(graph: Graph, entries: dict[str, str]) -> None:
    kept = [(k, v) for k, v in graph.model.metadata_props if k not in entries]
    graph.model.metadata_props = kept + list(entries.items())


def sample_shapes(data) -> dict[str, list[int]]:
    """Input shapes of the first calibration sample (what the FPGA estimate assumes by default)."""
    if data is None:
        return {}
    for feed in data:
        return {name: [int(d) for d in np.shape(array)] for name, array in feed.items()}
    return {}
