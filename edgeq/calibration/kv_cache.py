"""Calibration of decoders that take a KV cache: prefill and decode steps from token windows.

A decoder exported with its cache takes `past_key_values.N.key/value` [batch, kv_heads, past,
head_dim] beside `input_ids` and returns `present.N.key/value` (past + new tokens). It runs in two
phases that see different activations: the prefill of a prompt (many tokens, empty cache) and
decode steps (one token, a cache of earlier tokens; attention over long key sequences, the cache
tensors' own ranges). Calibration shows it both: each token window of `seq_len` tokens gives

- one prefill sample: the first `seq_len - decode_steps` tokens with an empty cache, then
- `decode_steps` one-token samples, token t with the cache of tokens 0..t-1, which the float model
  computes (the prefill, then each step, run in ONNX Runtime as the samples are read).

`find_cache` tells a cache model from its inputs and outputs (names, as the exporters and
onnxruntime-genai's builder write them, else the order of rank-4 float inputs and outputs;
a quantized cache's integer codes and per-token scales included);
`CacheSteps` makes the samples. This module reads only the model's inputs and outputs and
runs the float model; `edgeq.calibration.sources` wires it into the token-window sources.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeq.errors import CalibrationError

Feed = dict[str, np.ndarray]

DEFAULT_DECODE_STEPS = 4
SCALE_SUFFIX = "_scale"  # a quantized cache's per-token scales: `<cache input>_scale`
# Inputs a token window fills beside the cache.
TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
_PAST = re.compile(r"past", re.IGNORECASE)


@dataclass(frozen=True)
class CacheEntry:
    """One cache tensor: the graph input that takes it and the output that returns it grown."""

    past: str
    present: str
    dims: tuple[int | str | None, ...]   # the input's declared dims
    dtype: np.dtype


@dataclass(frozen=True)
class CacheLayout:
    """The cache tensors of a decoder; `axis` is their sequence axis (2 in [B, H, T, D]).
    `scales` are the per-token scale tensors a quantized cache carries beside its codes
    (inputs named `<cache input>_scale`, edgeq's quantize-kv-cache pass)."""

    entries: tuple[CacheEntry, ...]
    axis: int = 2
    scales: tuple[CacheEntry, ...] = ()

    @property
    def past_names(self) -> tuple[str, ...]:
        return tuple(e.past for e in (*self.entries, *self.scales))

    def empty(self, batch: int = 1) -> Feed:
        """Zero-length caches: the first (prefill) step."""
        feeds = {}
        for entry in (*self.entries, *self.scales):
            shape = [batch if a == 0 else 0 if a == self.axis else _static(entry, a) for a in range(len(entry.dims))]
            feeds[entry.past] = np.zeros(shape, entry.dtype)
        return feeds


def _static(entry: CacheEntry, axis: int) -> int:
    dim = entry.dims[axis]
    if isinstance(dim, int) and dim > 0:
        return dim
    raise CalibrationError(f"cache input '{entry.past}' has a dynamic dim on axis {axis} ({dim!r}) besides "
                           "batch and sequence", fix="export the cache with static head count and head size")


def head_size_of(model: onnx.ModelProto) -> int | None:
    """The head size a com.microsoft GroupQueryAttention implies (onnxruntime-genai's builder
    leaves it symbolic in the cache dims): its packed query's projection width over the heads
    (a float MatMul's weight, or the N of the int4 graph's MatMulNBits)."""
    weights = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        heads, kv_heads = attrs.get("num_heads", 0), attrs.get("kv_num_heads", 0)
        packed = len(node.input) < 2 or not node.input[1]
        projection = producers.get(node.input[0])
        if projection is not None and projection.op_type == "MatMulNBits":  # the builder's int4 graph
            width = next((a.i for a in projection.attribute if a.name == "N"), 0)
        elif projection is not None and projection.op_type == "MatMul" and projection.input[1] in weights:
            width = int(weights[projection.input[1]].dims[-1])
        else:
            continue
        parts = heads + 2 * kv_heads if packed else heads
        if parts and width % parts == 0:
            return width // parts
    return None


def with_head_size(layout: CacheLayout, head_size: int) -> CacheLayout:
    """The layout with a symbolic head-size dim (axis 3) set to `head_size`."""
    def fixed(entry: CacheEntry) -> CacheEntry:
        dims = list(entry.dims)
        if len(dims) == 4 and not (isinstance(dims[3], int) and dims[3] > 0):
            dims[3] = head_size
        return CacheEntry(entry.past, entry.present, tuple(dims), entry.dtype)
    return CacheLayout(tuple(fixed(e) for e in layout.entries), layout.axis, layout.scales)


def find_cache(inputs: Sequence[Any], outputs: Sequence[str]) -> CacheLayout | None:
    """The cache of a decoder with `input_ids`, from its input specs (name, dtype, shape,
    required) and output names; None for a model without one. Past inputs are the rank-4 float
    inputs named `past...` (or, without such names, every rank-4 float input); each pairs with the
    output of the same name with `present` for `past_key_values`/`past` (else outputs in order)."""
    names = [spec.name for spec in inputs]
    if "input_ids" not in names:
        return None
    rank4 = [s for s in inputs if s.shape is not None and len(s.shape) == 4]
    past = [s for s in rank4 if _PAST.search(s.name)] or [s for s in rank4 if np.dtype(s.dtype).kind == "f"]
    if not past:
        return None
    matched = {spec.name: next((o for o in _present_names(spec.name) if o in outputs), None) for spec in past}
    missing = [spec.name for spec in past if matched[spec.name] is None]
    if missing:  # no names to go by: the k-th past input returns as the k-th output after logits
        rest = [o for o in outputs[1:] if o not in matched.values()]
        if len(rest) < len(missing):
            raise CalibrationError(f"cannot tell which output returns cache input '{missing[0]}'",
                                   fix="name the cache outputs present.N.key/value after past_key_values.N.key/value")
        matched.update(zip(missing, rest))
    entries = [CacheEntry(spec.name, matched[spec.name], tuple(spec.shape), np.dtype(spec.dtype)) for spec in past]
    scales = tuple(e for e in entries if e.past.endswith(SCALE_SUFFIX))
    return CacheLayout(tuple(e for e in entries if e not in scales), scales=scales)


def _present_names(past: str) -> list[str]:
    return [past.replace("past_key_values", "present"), past.replace("past_key_values", "present_key_values"),
            past.replace("past", "present"), re.sub(r"^past_?", "present_", past)]


def cache_kind(name: str) -> str | None:
    """'key' or 'value' from a cache tensor's name (`past_key_values.3.value`, `past.3.v`): the
    last word of the name that says either, or None."""
    for word in reversed(re.findall(r"[a-z]+", name.lower())):
        if word in ("key", "keys", "k"):
            return "key"
        if word in ("value", "values", "v"):
            return "value"
    return None


def model_outputs(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


@dataclass(frozen=True)
class StepIndex:
    """Sample `index` of a cache source: window `window`, step 0 the prefill, k > 0 decode step k."""

    window: int
    step: int


class CacheSteps:
    """Prefill and decode samples of token windows for a model with a KV cache (see the module
    docstring). The float model runs on ONNX Runtime's CPU provider to make the caches."""

    def __init__(self, model: str | os.PathLike[str], layout: CacheLayout, input_names: Sequence[str],
                 decode_steps: int = DEFAULT_DECODE_STEPS, threads: int = 0):
        if decode_steps < 0:
            raise CalibrationError(f"decode_steps must be >= 0, got {decode_steps}", fix="use 0 or more decode steps")
        self.model = Path(model)
        self.layout = layout
        self.input_names = tuple(input_names)
        self.decode_steps = decode_steps
        self.threads = threads
        self._session = None

    def per_window(self) -> int:
        return 1 + self.decode_steps

    def check_window(self, seq_len: int) -> None:
        if seq_len <= self.decode_steps:
            raise CalibrationError(
                f"windows of {seq_len} tokens leave no prefill before {self.decode_steps} decode steps",
                fix=f"use --seq-len above {self.decode_steps}")

    def locate(self, index: int) -> StepIndex:
        return StepIndex(index // self.per_window(), index % self.per_window())

    def window_feeds(self, ids: np.ndarray, steps: Sequence[int]) -> Iterator[tuple[int, Feed]]:
        """(step, feed) for the asked steps (ascending) of one window of token ids; the float
        model runs only as far as the last asked decode step needs."""
        ids = np.asarray(ids, np.int64)
        prefill = len(ids) - self.decode_steps
        wanted = sorted(set(steps))
        if not wanted:
            return
        feed = self._feed(ids[:prefill], 0, self.layout.empty())
        if wanted[0] == 0:
            yield 0, feed
        last = wanted[-1]
        for step in range(1, last + 1):
            past = self._presents(feed)
            position = prefill + step - 1
            feed = self._feed(ids[position:position + 1], position, past)
            if step in wanted:
                yield step, feed

    def _feed(self, tokens: np.ndarray, start: int, past: Mapping[str, np.ndarray]) -> Feed:
        length = len(tokens)
        sample = {"input_ids": tokens[None, :],
                  "attention_mask": np.ones((1, start + length), np.int64),
                  "position_ids": np.arange(start, start + length, dtype=np.int64)[None, :],
                  "token_type_ids": np.zeros((1, length), np.int64)}
        feed = {n: a for n, a in sample.items() if n in self.input_names}
        feed.update(past)
        return feed

    def _presents(self, feed: Feed) -> Feed:
        session = self._open()
        entries = [*self.layout.entries, *self.layout.scales]
        out = session.run([e.present for e in entries], feed)
        return {e.past: np.ascontiguousarray(a, dtype=e.dtype) for e, a in zip(entries, out)}

    def _open(self):
        if self._session is None:
            from edgeq.runtime.sessions import make_session

            if not self.model.is_file():
                raise CalibrationError(f"the KV-cache model '{self.model}' is not a file to run",
                                       fix="give the model's path so that decode-step caches can be computed")
            self._session = make_session(str(self.model), threads=self.threads)
        return self._session


def model_path(model: Any) -> str | None:
    """The model's path when it is a file (a ModelProto of inputs only cannot be run)."""
    if isinstance(model, (str, os.PathLike)) and Path(model).is_file():
        return os.fspath(model)
    return None
