"""Run a graph at a few probe sizes of its dynamic input axes and read back the shapes of
chosen values, so that shape rewrites are decided from what the graph computes.

`dynamic_axes(graph)` names the dynamic dims of the graph inputs: a named dim is one symbol
wherever it appears (`batch`, `seq`); an unnamed one is a symbol per axis position, shared by
inputs of the same rank. `probe_shapes(graph, values)` runs ONNX Runtime once per probe and
returns the shape of every value asked for. Each probe gives every symbol its own size, and
the sizes differ from probe to probe (primes, so no size is another's multiple or equal to a
static dim by accident), except that a decoder's total sequence length is the sum of its past
and new lengths (`sequence_sums`): the attention mask spans the cached and the new tokens, so
a probe that sized it alone would not run. The probe model holds only the ops the asked values need; weights
over 1 MiB become `ConstantOfShape` zeros of their dtype and shape (shapes do not depend on
weight values), so probing never copies a model's weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from edgeq.errors import EdgeqError
from edgeq.ir import Graph, Value
from edgeq.ir.tensor import np_dtype
from edgeq.ir.to_proto import graph_to_proto, model_header
from edgeq.runtime.sessions import make_session

# Sizes of the k-th symbol in probes 0, 1, 2: PROBE_PRIMES[3k + p].
PROBE_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61)
PROBE_COUNT = 3
_REAL_WEIGHT_BYTES = 1 << 20


class ProbeError(EdgeqError):
    """The graph could not be run at the probe sizes (the pass then leaves the graph alone)."""


@dataclass(frozen=True)
class Probe:
    sizes: dict[str, int]                 # symbol -> size in this probe
    feeds: dict[str, np.ndarray]


def dim_symbol(value: Value, axis: int) -> str | None:
    """The symbol of a dynamic dim of a graph input (None for a static dim)."""
    dim = value.shape[axis]
    if isinstance(dim, int) and dim > 0:
        return None
    return dim if isinstance(dim, str) and dim else f"?{len(value.shape)}:{axis}"


def dynamic_axes(graph: Graph) -> dict[str, list[tuple[str, int]]]:
    """symbol -> [(input name, axis)] for every dynamic dim of the (non-constant) graph inputs."""
    axes: dict[str, list[tuple[str, int]]] = {}
    for value in graph.inputs:
        if value.const is not None or value.shape is None:
            continue
        for axis in range(len(value.shape)):
            symbol = dim_symbol(value, axis)
            if symbol is not None:
                axes.setdefault(symbol, []).append((value.name, axis))
    return axes


def sequence_sums(graph: Graph) -> dict[str, tuple[str, ...]]:
    """symbol -> the symbols whose sizes it adds up to (one symbol: the same size). A named dim
    written as a sum of other dims (`past_sequence + sequence`) is that sum; in a decoder with a
    KV cache (rank-4 float inputs named `past...`), dim 1 of the 2-D integer attention mask, when
    it is neither the new tokens' dim (dim 1 of input_ids / inputs_embeds) nor the cache's
    (dim 2), is their sum, and the mask's and the cache's batch dims are the tokens' batch."""
    axes = dynamic_axes(graph)
    sums: dict[str, tuple[str, ...]] = {}
    for symbol in axes:
        parts = tuple(part.strip() for part in symbol.split("+"))
        if len(parts) > 1 and all(part in axes for part in parts):
            sums[symbol] = parts
    live = [v for v in graph.inputs if v.const is None and v.shape is not None]
    past = [v for v in live if "past" in v.name.lower() and len(v.shape) == 4
            and v.elem_type in _FLOATS and dim_symbol(v, 2) is not None]
    tokens = next((v for v in live if v.name in ("input_ids", "inputs_embeds") and len(v.shape) >= 2), None)
    mask = next((v for v in live if "mask" in v.name.lower() and len(v.shape) == 2 and v.elem_type in _INTS), None)
    if past and tokens is not None and mask is not None:
        past_dim, new_dim, total_dim = dim_symbol(past[0], 2), dim_symbol(tokens, 1), dim_symbol(mask, 1)
        if None not in (past_dim, new_dim, total_dim) and len({past_dim, new_dim, total_dim}) == 3 \
                and total_dim not in sums:
            sums[total_dim] = (past_dim, new_dim)
        # One batch: exporters that name dims per input (dynamo's s0, s1, ...) give it several names.
        batch = dim_symbol(tokens, 0)
        for value in [mask, *past]:
            other = dim_symbol(value, 0)
            if batch is not None and other is not None and other != batch and other not in sums:
                sums[other] = (batch,)
        for value in past[1:]:  # every cache tensor holds the same past tokens
            other = dim_symbol(value, 2)
            if other is not None and other != past_dim and other not in sums:
                sums[other] = (past_dim,)
    return {total: parts for total, parts in sums.items() if not any(part in sums for part in parts)}


_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
_INTS = (TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL)


def make_probes(graph: Graph, count: int = PROBE_COUNT, seed: int = 0) -> list[Probe]:
    """Feeds for `count` probes: N(0,1) floats, ones for integer and boolean inputs (a valid
    token id, type id and full attention mask for text models)."""
    sums = sequence_sums(graph)
    symbols = [s for s in dynamic_axes(graph) if s not in sums]
    if len(symbols) * 3 > len(PROBE_PRIMES):
        raise ProbeError(f"{len(symbols)} dynamic input dims are more than probing supports")
    rng = np.random.default_rng(seed)
    probes = []
    for p in range(count):
        sizes = {s: PROBE_PRIMES[3 * k + p] for k, s in enumerate(symbols)}
        sizes.update({total: sum(sizes[part] for part in parts) for total, parts in sums.items()})
        feeds = {}
        for value in graph.inputs:
            if value.const is not None:
                continue
            if value.shape is None or value.elem_type is None:
                raise ProbeError(f"graph input {value.name!r} has no declared type or rank")
            shape = [sizes[dim_symbol(value, a)] if dim_symbol(value, a) else value.shape[a]
                     for a in range(len(value.shape))]
            dtype = np_dtype(value.elem_type)
            if np.issubdtype(dtype, np.floating):
                feeds[value.name] = rng.standard_normal(shape).astype(dtype)
            else:
                feeds[value.name] = np.ones(shape, dtype)
        probes.append(Probe(sizes, feeds))
    return probes


def probe_shapes(graph: Graph, values: list[Value], probes: list[Probe]) -> list[dict[str, tuple[int, ...]]]:
    """For each probe, the shape of each value in `values` (by name), from one ORT run."""
    return [shapes for shapes, _ in run_probes(graph, probes, shapes_of=values)]


def run_probes(graph: Graph, probes: list[Probe], *, shapes_of: list[Value] = (),
               values_of: list[Value] = ()) -> list[tuple[dict[str, tuple[int, ...]], dict[str, np.ndarray]]]:
    """For each probe: the shapes of `shapes_of` and the values of `values_of` (by name). Values
    of unknown element type cannot be asked for (ORT needs the output's type)."""
    shapes_of, values_of = list(shapes_of), list(values_of)
    if not shapes_of and not values_of:
        return [({}, {}) for _ in probes]
    model = _probe_model(graph, shapes_of, values_of)
    try:
        session = make_session(model.SerializeToString(), threads=1,
                               level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        names = [o.name for o in model.graph.output]
        needed = {i.name for i in session.get_inputs()}
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a graph that refuses a probe size is reported, not logged
        results = []
        for probe in probes:
            out = session.run(names, {k: v for k, v in probe.feeds.items() if k in needed}, quiet)
            shapes = {v.name: tuple(int(d) for d in arr) for v, arr in zip(shapes_of, out)}
            values = {v.name: arr for v, arr in zip(values_of, out[len(shapes_of):])}
            results.append((shapes, values))
        return results
    except Exception as err:  # ORT's own message says which op refused the probe sizes
        raise ProbeError(f"the graph does not run at probe sizes: {str(err).splitlines()[0][:300]}") from None


def _probe_model(graph: Graph, shapes_of: list[Value], values_of: list[Value]) -> onnx.ModelProto:
    """The ops the asked values need; outputs Shape(v) of each of `shapes_of`, then `values_of`."""
    needed_ops = set()
    for value in shapes_of + values_of:
        needed_ops |= graph.ancestors(value)
        producer = graph.producer(value)
        if producer is not None:
            needed_ops.add(producer)
    model = model_header(graph)
    full = graph_to_proto(graph, with_data=False)
    proto = model.graph
    proto.name = full.name
    keep_nodes = {id(op) for op in needed_ops}
    proto.node.extend(n for op, n in zip(graph.topo_order(), full.node) if id(op) in keep_nodes)
    proto.input.extend(full.input)
    input_names = {v.name for v in graph.inputs}
    read = {v.name for op in needed_ops for v in [*graph.inputs_of(op), *graph.implicit_inputs(op)] if v is not None}
    read |= {v.name for v in shapes_of + values_of}
    for value in graph.initializers:
        if value.name not in read and value.name not in input_names:
            continue  # only what the kept ops read
        tensor = value.const
        if tensor.nbytes > _REAL_WEIGHT_BYTES and value.name not in input_names and _zero_fillable(tensor.elem_type):
            dims = value.name + "__probe_dims"
            proto.initializer.append(onnx.numpy_helper.from_array(np.asarray(tensor.dims, np.int64), dims))
            zero = helper.make_tensor("value", tensor.elem_type, [1], np.zeros(1, np_dtype(tensor.elem_type)))
            proto.node.insert(0, helper.make_node("ConstantOfShape", [dims], [value.name], value=zero))
        else:
            proto.initializer.append(tensor.to_proto(value.name))
    proto.sparse_initializer.extend(full.sparse_initializer)
    for k, value in enumerate(shapes_of):
        out = f"__probe_shape_{k}"
        proto.node.append(helper.make_node("Shape", [value.name], [out]))
        proto.output.append(helper.make_tensor_value_info(out, TensorProto.INT64, [None]))
    for value in values_of:
        if value.elem_type is None:
            raise ProbeError(f"value {value.name!r} has no known element type to probe")
        proto.output.append(helper.make_tensor_value_info(value.name, value.elem_type, None))
    return model


def _zero_fillable(elem_type: int) -> bool:
    return elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE,
                         TensorProto.INT8, TensorProto.UINT8, TensorProto.INT32, TensorProto.INT64)
