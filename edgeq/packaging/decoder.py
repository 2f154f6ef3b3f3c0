"""The input/output layout of a compiled decoder with a KV cache, and renaming it to the names a
generation runtime expects (`input_ids`, `attention_mask`, `position_ids`,
`past_key_values.N.key/value` -> `present.N.key/value`, `logits`: Hugging Face's, Optimum's and
onnxruntime-genai's names).

The cache tensors are found as calibration finds them (`edgeq.calibration.kv_cache.find_cache`);
each is assigned a layer and key/value from its name (the first number in it, and `key`/`value`
or `k`/`v`), else from its position (inputs in order: layer 0 key, layer 0 value, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx

from edgeq.calibration.kv_cache import CacheEntry, cache_kind, find_cache
from edgeq.calibration.sources import model_inputs
from edgeq.ir import Graph
from edgeq.packaging.folder import PackageError

PAST = "past_key_values.{layer}.{kind}"
PRESENT = "present.{layer}.{kind}"
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class CacheLayer:
    key: CacheEntry
    value: CacheEntry


@dataclass(frozen=True)
class DecoderLayout:
    """Names of a decoder's inputs and outputs and the sizes a generation loop needs."""

    input_ids: str
    attention_mask: str | None
    position_ids: str | None
    logits: str
    layers: tuple[CacheLayer, ...]
    kv_heads: int
    head_size: int
    vocab_size: int
    cache_dtype: np.dtype

    def standard_names(self) -> dict[str, str]:
        """old name -> the standard name, for every input and output that differs."""
        names = {self.input_ids: "input_ids", self.logits: "logits"}
        if self.attention_mask:
            names[self.attention_mask] = "attention_mask"
        if self.position_ids:
            names[self.position_ids] = "position_ids"
        for i, layer in enumerate(self.layers):
            for kind, entry in (("key", layer.key), ("value", layer.value)):
                names[entry.past] = PAST.format(layer=i, kind=kind)
                names[entry.present] = PRESENT.format(layer=i, kind=kind)
        return {old: new for old, new in names.items() if old != new}


def decoder_layout(model: onnx.ModelProto) -> DecoderLayout:
    """The layout of a decoder with a KV cache; a `PackageError` names what is missing."""
    inputs = model_inputs(model)
    outputs = [o.name for o in model.graph.output]
    names = [spec.name for spec in inputs]
    if "input_ids" not in names:
        raise PackageError("the model has no 'input_ids' input", fix="package a decoder that takes token ids")
    cache = find_cache(inputs, outputs)
    if cache is None:
        raise PackageError("the model has no KV cache (past_key_values inputs, present outputs)",
                           fix="build or export the decoder with its cache, e.g. `edgeq models build smollm2-kv`")
    if cache.scales:
        raise PackageError(f"the cache carries per-token scales ('{cache.scales[0].past}'), which onnxruntime-genai "
                           "does not feed to a model's regular cache",
                           fix="quantize the cache with per-channel value scales (quantize-kv-cache values='channel')")
    if len(cache.entries) % 2:
        raise PackageError(f"the model has {len(cache.entries)} cache inputs, not key/value pairs",
                           fix="export one key and one value cache per layer")
    cache_outputs = {e.present for e in cache.entries}
    logits = next((o for o in outputs if o not in cache_outputs), None)
    if logits is None:
        raise PackageError("the model has no logits output besides its cache", fix="export the logits")
    layers = _layers(cache.entries)
    first = layers[0].key
    kv_heads, head_size = _static(first, 1), _static(first, 3)
    vocab = _vocab(model, logits)
    mask = next((n for n in names if n == "attention_mask"), None) or next(
        (s.name for s in inputs if "mask" in s.name.lower() and s.shape is not None and len(s.shape) == 2), None)
    positions = next((n for n in names if n == "position_ids"), None) or next(
        (n for n in names if "position" in n.lower()), None)
    extra = [s.name for s in inputs if s.required and s.name not in {"input_ids", mask, positions, *cache.past_names}]
    if extra:
        raise PackageError(f"the model takes '{extra[0]}', which a generation loop does not feed",
                           fix="export the decoder with input_ids, attention_mask, position_ids and its cache only")
    return DecoderLayout("input_ids", mask, positions, logits, layers, kv_heads, head_size, vocab, first.dtype)


def _layers(entries: tuple[CacheEntry, ...]) -> tuple[CacheLayer, ...]:
    parsed = [(_layer_index(e.past), cache_kind(e.past)) for e in entries]
    by_name = all(i is not None and k is not None for i, k in parsed) and \
        len({(i, k) for i, k in parsed}) == len(entries)
    if by_name:
        table = {(i, k): e for (i, k), e in zip(parsed, entries)}
        indices = sorted({i for i, _ in parsed})
        if all((i, "key") in table and (i, "value") in table for i in indices):
            return tuple(CacheLayer(table[(i, "key")], table[(i, "value")]) for i in indices)
    return tuple(CacheLayer(entries[j], entries[j + 1]) for j in range(0, len(entries), 2))


def _layer_index(name: str) -> int | None:
    found = _NUMBER.findall(name)
    return int(found[0]) if found else None


def _static(entry: CacheEntry, axis: int) -> int:
    dim = entry.dims[axis]
    if not (isinstance(dim, int) and dim > 0):
        raise PackageError(f"cache input '{entry.past}' has no static size on axis {axis}",
                           fix="export the cache with static head count and head size")
    return dim


def _vocab(model: onnx.ModelProto, logits: str) -> int:
    out = next(o for o in model.graph.output if o.name == logits)
    dims = out.type.tensor_type.shape.dim
    if dims and dims[-1].HasField("dim_value"):
        return int(dims[-1].dim_value)
    raise PackageError(f"output '{logits}' has no static vocabulary size", fix="export the logits with a static last dim")


def attention_heads(graph: Graph, head_size: int, kv_heads: int) -> int | None:
    """The query head count: the largest H of a head split `Reshape(x, [0, 0, H, head_size])`
    (canonical form), None when the graph has none."""
    found = []
    for op in graph.ops():
        if op.op_type != "Reshape" or op.domain or len(graph.inputs_of(op)) < 2:
            continue
        tensor = graph.constant(graph.inputs_of(op)[1])
        shape = tensor.numpy() if tensor is not None else None
        if shape is not None and shape.ndim == 1 and len(shape) == 4 and int(shape[3]) == head_size \
                and int(shape[2]) >= kv_heads:
            found.append(int(shape[2]))
    return max(found) if found else None


def rename(graph: Graph, names: dict[str, str]) -> None:
    """Rename values of `graph` (old -> new), through temporary names so that swaps work; a new
    name another value already has is refused."""
    taken = {v.name for v in graph.values()}
    clash = [new for new in names.values() if new in taken and new not in names]
    if clash:
        raise PackageError(f"cannot rename to '{clash[0]}': the model already has a value of that name",
                           fix="rename that value in the export")
    staged = []
    for i, (old, new) in enumerate(names.items()):
        value = graph.value(old)
        graph.rename_value(value, f"__edgeq_rename_{i}")
        staged.append((value, new))
    for value, new in staged:
        graph.rename_value(value, new)
