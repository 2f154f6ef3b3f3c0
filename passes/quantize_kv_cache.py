"""Quantize a decoder's KV cache to int8 or int4 (KIVI-style: keys per channel, values per token;
or QuaRot-style: both per token after a head-dim Hadamard; `edgeq.quant.kv_cache` has the scheme
and the graph pieces).

The cache of layer l is `present = Concat(past, new, axis=2)`, a graph output that attention
also reads. The pass makes the cache integer where it crosses the graph boundary: the new
keys/values are quantized as they are written, `past`/`present` become int8 (int4: packed
uint8) tensors, and attention reads `Dequantize(present)`. Per-token scales (and offsets) travel
with the cache as extra inputs/outputs `<past>_scale` / `<present>_scale` (float16, [B, H, T, P]);
static per-channel scales are constants calibrated here: the graph runs on the calibration data
(prefill and decode steps) and each channel's absmax over every cached token sets its scale.

Options: `rotate` multiplies the new keys/values by a normalized head-dim Hadamard before they are
quantized and again after they are read (exact in float; spreads one channel's outlier over the
token); `centered` makes static scales span each channel's calibrated [min, max] around its
midpoint (subtracted before quantizing, added back after); `keys="token"`, `asymmetric` and
`group` are the scheme's (per-token keys; a scale and an offset per token; one per group of
channels). On SmolLM2's int4 cache static keys cost +7 to +13% perplexity; keys and values per
token, asymmetric, after the rotation +5.0%, and in groups of 32 +4.3% (BENCHMARKS.md, issue 15).

Works on the float or the compiled graph (run it last, after `insert-qdq`). A generation loop
feeds the new caches as it fed the float ones: it allocates them from the model's input types
(int8/uint8 and, for values per token, float16 scales) and carries present -> past.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx

from edgeq.calibration.kv_cache import SCALE_SUFFIX, cache_kind, find_cache
from edgeq.errors import CalibrationError, PreconditionError
from edgeq.ir import Graph, Op, Value, save
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.pipeline.artifacts import CALIBRATION_DATA
from edgeq.quant import kv_cache as kv
from edgeq.registry import register_pass

METADATA_KEY = "edgeq.kv_cache"


class _Spec:
    """A graph input seen as find_cache's input spec."""

    def __init__(self, value: Value):
        self.name = value.name
        self.shape = value.shape
        self.dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.elem_type or onnx.TensorProto.FLOAT))
        self.required = True


@register_pass
class QuantizeKvCache(Pass):
    name = "quantize-kv-cache"
    description = "int8/int4 KV cache: keys per channel (calibrated) or per token, values per token, QDQ around the cache"

    def __init__(self, bits: int = 8, values: str = "token", threads: int = 0, rotate: bool = False,
                 centered: bool = False, keys: str = "channel", asymmetric: bool = False, group: int = 0):
        """`rotate`: the keys and values are multiplied by a normalized Hadamard matrix over the head
        dim before they are quantized into the cache and by it again (its own inverse) after they
        are read back, so no one channel's outlier sets a token's scale (QuaRot's rotated cache;
        exact in float)."""
        self.scheme = kv.KvCacheScheme(bits=bits, values=values, keys=keys, asymmetric=asymmetric, group=group)
        self.threads = threads
        self.rotate = rotate
        # `centered`: a static (per-channel) scale spans the channel's calibrated [min, max] around
        # its midpoint, subtracted before quantizing and added back after (asymmetric: a channel
        # with an offset spends no codes on values it never takes).
        self.centered = centered
        self._hadamard: np.ndarray | None = None

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        static = not (self.scheme.per_token("key") and self.scheme.per_token("value"))
        if static and ctx.artifacts.get(CALIBRATION_DATA) is None:
            raise PreconditionError("the key scales need calibration data", fix="give calibration samples (--calib)")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        layers = self._cache_concats(graph)
        if not layers:
            return PassResult(graph, False, {"caches": 0})
        if self.rotate:
            self._hadamard = hadamard(layers[0][0].shape[3])
        kinds = {e.past: cache_kind(e.past) for e in self._layout(graph).entries}
        static = [(p, c, o) for p, c, o in layers if not self.scheme.per_token(kinds[p.name])]
        absmax = self._absmax(graph, [c for _, c, _ in static], ctx) if static else {}
        kv_heads, head_dim = layers[0][0].shape[1], layers[0][0].shape[3]
        self.scheme.groups(head_dim)  # a group size that does not divide the head dim fails here
        n_layers = len(layers) // 2
        for past, concat, present in layers:
            per_token = self.scheme.per_token(kinds[past.name])
            if per_token:
                center, extent = None, None
            else:
                low, high = absmax[present.name]
                if self.centered:
                    center, extent = (high + low) / 2, (high - low) / 2
                else:
                    center, extent = None, np.maximum(np.abs(low), np.abs(high))
            self._rewrite(graph, past, concat, present, extent, per_token, center)
        per_token_bytes = self.scheme.bytes_per_token(n_layers, kv_heads, head_dim)
        float_bytes = kv.float_bytes_per_token(n_layers, kv_heads, head_dim)
        self._record(graph, per_token_bytes, float_bytes)
        return PassResult(graph, True, {"caches": len(layers), "bits": self.scheme.bits,
                                        "bytes_per_token": round(per_token_bytes, 1),
                                        "float_bytes_per_token": float_bytes})

    # ---- finding the caches ----------------------------------------------------------------

    def _layout(self, graph: Graph):
        inputs = [_Spec(v) for v in graph.inputs if v.const is None and v.shape is not None]
        layout = find_cache(inputs, [v.name for v in graph.outputs])
        if layout is None:
            raise PreconditionError("the graph has no KV cache (past_key_values inputs, present outputs)",
                                    fix="compile the decoder with its cache, e.g. `edgeq models build smollm2-kv`")
        return layout

    def _cache_concats(self, graph: Graph) -> list[tuple[Value, Op, Value]]:
        """(past input, its Concat, the present output) of every cache tensor."""
        found = []
        for entry in self._layout(graph).entries:
            past = graph.value(entry.past)
            if past.elem_type != onnx.TensorProto.FLOAT:
                raise PreconditionError(f"cache input '{past.name}' is already {onnx.TensorProto.DataType.Name(past.elem_type)}",
                                        fix="quantize the cache once, from a float cache")
            concat = next((op for op in graph.consumers(past) if op.op_type == "Concat"
                           and graph.inputs_of(op)[0] is past and len(graph.inputs_of(op)) == 2), None)
            if concat is None:
                raise PreconditionError(f"cache input '{past.name}' does not feed Concat(past, new)",
                                        fix="export the cache as Concat(past, new) along the sequence axis")
            out = graph.outputs_of(concat)[0]
            present = out if graph.is_graph_output(out) else next(
                (graph.outputs_of(op)[0] for op in graph.consumers(out)
                 if op.op_type == "Identity" and graph.is_graph_output(graph.outputs_of(op)[0])), None)
            if present is None or present.name != entry.present:
                raise PreconditionError(f"the Concat of '{past.name}' does not write the output '{entry.present}'",
                                        fix="export present = Concat(past, new) as the graph output")
            axis = concat.attr("axis")
            if axis not in (2, -2) or len(past.shape or ()) != 4:
                raise PreconditionError(f"cache '{past.name}' is not [batch, heads, sequence, head_dim]",
                                        fix="export the cache in BNSH layout")
            found.append((past, concat, present))
        return found

    # ---- calibration -----------------------------------------------------------------------

    def _absmax(self, graph: Graph, concats: list[Op], ctx: PassContext) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(min, max) over batch and tokens of each present output, per (head, channel)."""
        from edgeq.runtime.sessions import make_session

        data = ctx.artifacts.get(CALIBRATION_DATA)
        names = [graph.outputs_of(op)[0].name for op in concats]
        presents = {name: self._present_name(graph, name) for name in names}
        with tempfile.TemporaryDirectory(prefix="edgeq-kv-") as tmp:
            path = Path(tmp) / "model.onnx"
            save(graph, path, external_data=True)
            session = make_session(str(path), threads=self.threads)
            wanted = list(presents.values())
            absmax: dict[str, np.ndarray] = {}
            for feed in data:
                for name, array in zip(wanted, session.run(wanted, feed)):
                    if array.shape[2] == 0:
                        continue
                    if self._hadamard is not None:
                        array = array @ self._hadamard
                    low, high = array.min(axis=(0, 2)), array.max(axis=(0, 2))
                    if name in absmax:
                        low, high = np.minimum(absmax[name][0], low), np.maximum(absmax[name][1], high)
                    absmax[name] = (low, high)
        missing = [n for n in wanted if n not in absmax]
        if missing:
            raise CalibrationError(f"no calibration sample gave cache '{missing[0]}' a token",
                                   fix="give samples with at least one token")
        return absmax

    @staticmethod
    def _present_name(graph: Graph, concat_out: str) -> str:
        value = graph.value(concat_out)
        if graph.is_graph_output(value):
            return value.name
        return next(graph.outputs_of(op)[0].name for op in graph.consumers(value) if op.op_type == "Identity")

    # ---- rewriting -------------------------------------------------------------------------

    def _rewrite(self, graph: Graph, past: Value, concat: Op, present: Value, absmax: np.ndarray | None,
                 per_token: bool, center: np.ndarray | None = None) -> None:
        scheme = self.scheme
        batch, heads, past_len, head_dim = past.shape
        prefix = f"/kv_cache/{past.name}"
        new = graph.inputs_of(concat)[1]
        old_out = graph.outputs_of(concat)[0]
        rotation = None
        if self._hadamard is not None:
            rotation = graph.add_constant(graph.unique_name("/kv_cache/hadamard"), self._hadamard)
            new = graph.outputs_of(graph.add_op("MatMul", [new, rotation], [f"{prefix}/rotated"]))[0]
        offset = None
        if center is not None:
            offset = graph.add_constant(graph.unique_name(f"{prefix}/center"), center.astype(np.float32)[None, :, None, :])
            new = graph.outputs_of(graph.add_op("Sub", [new, offset], [f"{prefix}/centered"]))[0]
        token_offset = None
        if per_token:
            params = kv.token_params(graph, new, scheme, head_dim, prefix)
            scale, token_offset, stored = params.scale, params.offset, params.stored
        else:
            scale = graph.add_constant(graph.unique_name(f"{prefix}/scale"), kv.channel_scales(absmax, scheme))
        codes = kv.quantize_into_cache(graph, new, scale, scheme, prefix, token_offset,
                                       head_dim if per_token else None)
        # The cache input/output become integer; attention reads their dequantized values.
        past.set_type(kv.cache_dtype(scheme), [batch, heads, past_len, kv.cache_width(head_dim, scheme)])
        out_name = present.name
        cached = graph.outputs_of(graph.add_op("Concat", [past, codes], [f"{prefix}/cache"], attrs={"axis": 2}))[0]
        params_width = scheme.params_per_token(head_dim)
        if per_token:
            past_scale = self._scale_input(graph, past, batch, heads, past_len, params_width)
            all_scales = graph.outputs_of(graph.add_op("Concat", [past_scale, stored], [f"{prefix}/scales"],
                                                       attrs={"axis": 2}))[0]
            read_scale, read_offset = kv.split_token_params(graph, all_scales, scheme, f"{prefix}/read", head_dim)
        else:
            read_scale, read_offset = scale, None
        values = kv.dequantize_from_cache(graph, cached, read_scale, scheme, head_dim, prefix, read_offset, per_token)
        if offset is not None:
            values = graph.outputs_of(graph.add_op("Add", [values, offset], [f"{prefix}/uncentered"]))[0]
        if rotation is not None:  # the symmetric normalized Hadamard is its own inverse
            values = graph.outputs_of(graph.add_op("MatMul", [values, rotation], [f"{prefix}/unrotated"]))[0]
        slot = graph.outputs.index(present)
        present_dims = list(present.shape) if present.shape is not None else [batch, heads, None, head_dim]
        graph.replace_all_uses(old_out, values)
        if present is not old_out:  # Concat -> Identity -> output: the Identity now copies floats
            graph.replace_all_uses(present, values)
            graph.remove_op(graph.producer(present))
        graph.outputs[slot] = cached  # the output keeps its place and name, now integer
        graph.remove_op(concat)
        graph.rename_value(cached, out_name)
        cached.set_type(kv.cache_dtype(scheme), present_dims[:3] + [kv.cache_width(head_dim, scheme)])
        if per_token:
            graph.rename_value(all_scales, out_name + SCALE_SUFFIX)
            all_scales.set_type(onnx.TensorProto.FLOAT16, present_dims[:3] + [params_width])
            graph.outputs.append(all_scales)

    @staticmethod
    def _scale_input(graph: Graph, past: Value, batch, heads, past_len, width: int) -> Value:
        value = graph.add_value(Value(past.name + SCALE_SUFFIX))
        value.set_type(onnx.TensorProto.FLOAT16, [batch, heads, past_len, width])
        graph.inputs.append(value)
        return value

    def _record(self, graph: Graph, per_token_bytes: float, float_bytes: int) -> None:
        if graph.model is None:
            return
        per_token = self.scheme.per_token("key") or self.scheme.per_token("value")
        entry = json.dumps({"bits": self.scheme.bits, "keys": self.scheme.keys, "values": self.scheme.values,
                            "asymmetric": self.scheme.asymmetric, "group": self.scheme.group,
                            "hadamard": self.rotate, "centered": self.centered,
                            "scale_suffix": SCALE_SUFFIX if per_token else None,
                            "bytes_per_token": per_token_bytes, "float_bytes_per_token": float_bytes})
        graph.model.metadata_props = [(k, v) for k, v in graph.model.metadata_props if k != METADATA_KEY] + \
            [(METADATA_KEY, entry)]


def hadamard(n: int) -> np.ndarray:
    """The normalized Sylvester Hadamard matrix of order n (a power of 2): symmetric, H H = I."""
    if n < 1 or n & (n - 1):
        raise PreconditionError(f"head dim {n} is not a power of 2: no Sylvester Hadamard rotation of the cache",
                                fix="quantize the cache without rotate")
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)
