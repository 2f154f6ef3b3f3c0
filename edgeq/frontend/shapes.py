"""Input shapes: fixing a graph's dynamic input dims (`--input-shape`, or a target that needs
static shapes), and the shapes a compile records for estimates (`edgeq.metadata.INPUT_SHAPES_KEY`).

`resolve_input_shapes` decides what a compile fixes and records:
- `--input-shape NAME=D0,...` given: those shapes are checked against the graph (an unknown
  input, a wrong rank, a dim contradicting a static one or two inputs disagreeing on a shared
  dim name are one-line `OptionError`s), completed through shared dim names (`input_ids=1,128`
  fixes `attention_mask[batch, seq]` too), fixed in the graph and recorded;
- else, for a target with `static_shapes`, the first calibration sample's shapes are fixed
  (and said in the report notes); with no calibration data either, an error names
  `--input-shape`;
- else nothing is fixed (the graph keeps its dynamic axes) and the first calibration sample's
  shapes are recorded, the shapes a resource estimate assumes by default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Mapping

import onnx

from edgeq.errors import OptionError
from edgeq.ir import Graph, Value
from edgeq.metadata import INPUT_SHAPES_KEY

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class InputShapes:
    """What a compile does with input shapes."""

    fixed: Shapes          # dims set in the graph before the pipeline ({} : none)
    recorded: Shapes       # written to the model metadata for estimates ({} : none)
    note: str | None = None


def dynamic_inputs(graph: Graph) -> list[Value]:
    """Graph inputs (not overridable initializers) with a dim that is not a positive int."""
    return [v for v in graph.inputs if v.const is None and v.shape is not None
            and any(not (isinstance(d, int) and d > 0) for d in v.shape)]


def first_sample_shapes(samples: Iterable[Mapping] | None) -> Shapes:
    """Input shapes of the first calibration sample ({} without samples)."""
    if samples is None:
        return {}
    for feed in samples:
        return {name: tuple(int(d) for d in getattr(array, "shape", ())) for name, array in feed.items()}
    return {}


def resolve_input_shapes(graph: Graph, given: Mapping[str, tuple[int, ...]], *, static: bool,
                         sample: Shapes, target_name: str) -> InputShapes:
    """See the module docstring. `static`: the target needs static shapes."""
    if given:
        shapes = complete_shapes(graph, given)
        if static:
            _require_static(graph, shapes, "the given --input-shape", target_name)
        return InputShapes(fixed=shapes, recorded=dict(shapes))
    recorded = {k: v for k, v in sample.items() if any(k == i.name for i in graph.inputs)}
    if not static or not dynamic_inputs(graph):
        return InputShapes(fixed={}, recorded=recorded)
    if not sample:
        names = ", ".join(f"{v.name}{_dims_text(v.shape)}" for v in dynamic_inputs(graph))
        raise OptionError(f"target {target_name} needs static input shapes and the model's inputs have dynamic "
                          f"dims ({names})", fix="pass --input-shape NAME=D0,D1,... (repeatable) or calibration data")
    shapes = complete_shapes(graph, recorded)
    _require_static(graph, shapes, "the first calibration sample", target_name)
    text = ", ".join(f"{k}={list(v)}" for k, v in shapes.items())
    note = (f"static shapes: target {target_name} needs them, so the inputs are fixed to the first calibration "
            f"sample's shapes ({text}); give --input-shape to choose others")
    return InputShapes(fixed=shapes, recorded=dict(shapes), note=note)


def complete_shapes(graph: Graph, given: Mapping[str, tuple[int, ...]]) -> Shapes:
    """`given` checked against the graph inputs, plus every other dynamic input whose dims all
    follow from dim names shared with a given one."""
    inputs = {v.name: v for v in graph.inputs if v.const is None}
    unknown = sorted(set(given) - set(inputs))
    if unknown:
        raise OptionError(f"--input-shape names no input of the model: {', '.join(unknown)}",
                          fix=f"use one of {', '.join(inputs)}")
    sizes: dict[str, tuple[int, str]] = {}  # dim name -> (size, the input that set it)
    for name, shape in given.items():
        value = inputs[name]
        dims = value.shape
        if dims is None:
            continue
        if len(shape) != len(dims):
            raise OptionError(f"--input-shape {name}={_csv(shape)} has {len(shape)} dims but input {name} has "
                              f"rank {len(dims)} {_dims_text(dims)}", fix="give one size per axis")
        for axis, (want, have) in enumerate(zip(shape, dims)):
            if isinstance(have, int) and have > 0 and want != have:
                raise OptionError(f"--input-shape {name}={_csv(shape)} sets axis {axis} to {want} but the model fixes "
                                  f"it at {have} {_dims_text(dims)}", fix=f"give {name} size {have} on axis {axis}")
            if isinstance(have, str) and have:
                seen = sizes.setdefault(have, (want, name))
                if seen[0] != want:
                    raise OptionError(f"--input-shape gives dim '{have}' size {want} for {name} but {seen[0]} for "
                                      f"{seen[1]}", fix=f"inputs sharing the dim '{have}' take one size")
    shapes = {name: tuple(int(d) for d in shape) for name, shape in given.items()}
    for name, value in inputs.items():
        if name in shapes or value.shape is None or value not in dynamic_inputs(graph):
            continue
        dims = [d if isinstance(d, int) and d > 0 else sizes.get(d, (None,))[0] if isinstance(d, str) else None
                for d in value.shape]
        if all(d is not None for d in dims):
            shapes[name] = tuple(dims)
    return shapes


def fix_input_shapes(graph: Graph, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Set the graph inputs' dims to `shapes` (checked by `complete_shapes`) and forget the
    declared shapes of intermediate values, which the symbolic dims may have fixed too loosely
    (shape inference and the folder derive them again). Returns the inputs changed."""
    changed = 0
    for value in graph.inputs:
        if value.const is not None or value.name not in shapes or value.elem_type is None:
            continue
        if tuple(value.shape or ()) != tuple(shapes[value.name]):
            value.set_type(value.elem_type, list(shapes[value.name]))
            changed += 1
    if changed:
        boundary = {id(v) for v in graph.inputs} | {id(v) for v in graph.outputs}
        for value in graph.values():
            if id(value) not in boundary and value.const is None and value.type is not None \
                    and value.type.HasField("tensor_type"):
                elem = value.type.tensor_type.elem_type
                value.type = onnx.TypeProto()
                value.type.tensor_type.elem_type = elem
    return changed


def record_input_shapes(graph: Graph, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Store `shapes` in the model metadata under INPUT_SHAPES_KEY (replacing an older entry)."""
    if graph.model is None or not shapes:
        return
    entry = json.dumps({k: list(v) for k, v in shapes.items()})
    kept = [(k, v) for k, v in graph.model.metadata_props if k != INPUT_SHAPES_KEY]
    graph.model.metadata_props = kept + [(INPUT_SHAPES_KEY, entry)]


def inputs_model(graph: Graph) -> onnx.ModelProto:
    """A ModelProto holding only the graph's inputs (and initializer names): what calibration
    sources check samples against."""
    from edgeq.ir.to_proto import graph_to_proto, model_header

    model = model_header(graph)
    full = graph_to_proto(graph, with_data=False)
    model.graph.input.extend(full.input)
    model.graph.initializer.extend(t for t in full.initializer if t.name in {v.name for v in graph.inputs})
    return model


def _require_static(graph: Graph, shapes: Shapes, source: str, target_name: str) -> None:
    left = [v for v in dynamic_inputs(graph) if v.name not in shapes]
    if left:
        names = ", ".join(f"{v.name}{_dims_text(v.shape)}" for v in left)
        raise OptionError(f"target {target_name} needs static input shapes; {source} leaves {names} dynamic",
                          fix="pass --input-shape NAME=D0,D1,... for it")


def _csv(shape) -> str:
    return ",".join(str(d) for d in shape)


def _dims_text(dims) -> str:
    return "[" + ", ".join("?" if d is None or d == "" else str(d) for d in dims) + "]"
