"""Calibration data: the samples fed to the float model, checked against the model's inputs.

`open_source(spec, model)` turns what a user has into a `CalibrationSource`, a re-iterable,
sized stream of feed dicts ({graph input name: array}) that fit the model:

- a directory of `.npz` files, one sample per file, keyed by input name (files in name order);
- one `.npz` file whose arrays have a leading sample axis (in front of the inputs' shape, or
  the inputs' own batch axis when the arrays have the inputs' rank: one row per sample);
- `TextWindows` (text + `tokenizer.json`) or `TokenWindows` (token ids): consecutive
  non-overlapping windows of `seq_len` tokens, fed as `input_ids` [1, seq_len] plus
  `attention_mask` (ones), `position_ids` and `token_type_ids` where the model has them; a
  decoder with a KV cache gets each window as a prefill and `decode_steps` decode steps
  (`edgeq.calibration.kv_cache`);
- in Python, a sized re-iterable of feed dicts (a list) is used as it is; a one-shot iterable
  (generator, iterator, ONNX Runtime `CalibrationDataReader`) is read once, checked, and spooled
  to a temporary directory so it can be re-read (statistics may need several passes) while
  memory holds one sample at a time.

Checks happen before any long work: `.npz` headers (names, dtypes, shapes) of every sample are
read up front without loading arrays; values (NaN/Inf, integer range) are checked as samples
stream. Every mismatch raises `CalibrationError` naming the input and the fix.

Dtype policy: integers are cast to the model's integer type when every value fits (int32 token
ids for an int64 input are the common case), floats to the model's float type (float64 from
numpy defaults for a float32 input) when the result stays finite. Anything across kinds (float
data for an integer input, integers for a float input, anything for a bool input) is an error:
such a cast usually hides a bug (token ids stored as floats, images never normalised).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx
from onnx import helper

from edgeq.calibration import kv_cache
from edgeq.errors import CalibrationError

Feed = dict[str, np.ndarray]
ModelLike = Union[onnx.ModelProto, str, "os.PathLike[str]"]

# Inputs a token-window source can make, beside input_ids.
_TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


# --------------------------------------------------------------------------------------------
# The model's side: what each graph input takes.

@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype, dims (int static, str symbolic, None unknown)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None  # None: rank unknown
    required: bool = True  # False for an input that has an initializer as its default

    def shape_text(self) -> str:
        if self.shape is None:
            return "[any rank]"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


def model_inputs(model: ModelLike) -> tuple[InputSpec, ...]:
    """The graph inputs of `model` (a ModelProto or a path; weights are not loaded)."""
    proto = model if isinstance(model, onnx.ModelProto) else _load_graph_only(model)
    defaults = {init.name for init in proto.graph.initializer}
    return tuple(_input_spec(value, value.name not in defaults) for value in proto.graph.input)


def _load_graph_only(path: str | os.PathLike[str]) -> onnx.ModelProto:
    from edgeq.ir.loader import read_skeleton

    return read_skeleton(path)


def _input_spec(value: onnx.ValueInfoProto, required: bool) -> InputSpec:
    tensor_type = value.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    if not tensor_type.HasField("shape"):
        return InputSpec(value.name, dtype, None, required)
    dims = tuple(_dim(d) for d in tensor_type.shape.dim)
    return InputSpec(value.name, dtype, dims, required)


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    return dim.dim_param or None


# --------------------------------------------------------------------------------------------
# Checking samples against the inputs.

class FeedChecker:
    """Checks samples' names, dtypes and shapes (cheap, from metadata) and values (as streamed)."""

    def __init__(self, inputs: Sequence[InputSpec]):
        self.inputs = {spec.name: spec for spec in inputs}

    def check_metadata(self, meta: Mapping[str, tuple[tuple[int, ...], np.dtype]], where: str) -> None:
        """Names, dtype kinds, ranks, static dims and shared symbolic dims of one sample."""
        self._check_names(meta.keys(), where)
        symbols: dict[str, tuple[int, str]] = {}
        for name, (shape, dtype) in meta.items():
            spec = self.inputs[name]
            _cast_kind(np.dtype(dtype), spec, where)
            self._check_shape(spec, tuple(shape), where, symbols)

    def check_feed(self, sample: Any, where: str) -> Feed:
        """Full check of one sample; returns it with arrays cast to the model's dtypes."""
        if not isinstance(sample, Mapping):
            raise CalibrationError(f"{where} is a {type(sample).__name__}, not a dict of input arrays",
                                   fix="give each sample as {input name: array}")
        arrays = {str(name): _as_array(value, str(name), where) for name, value in sample.items()}
        self.check_metadata({n: (a.shape, a.dtype) for n, a in arrays.items()}, where)
        return {name: _cast_values(array, self.inputs[name], where) for name, array in arrays.items()}

    def _check_names(self, names: Iterable[str], where: str) -> None:
        given = list(names)
        extra = [n for n in given if n not in self.inputs]
        if extra:
            raise CalibrationError(
                f"{where}: '{extra[0]}' is not an input of the model",
                fix=f"rename or drop it; the model's inputs are {_name_list(self.inputs)}")
        missing = [s.name for s in self.inputs.values() if s.required and s.name not in given]
        if missing:
            raise CalibrationError(f"{where}: input '{missing[0]}' is missing",
                                   fix=f"give every input: {_name_list(self.inputs)}")

    @staticmethod
    def _check_shape(spec: InputSpec, shape: tuple[int, ...], where: str,
                     symbols: dict[str, tuple[int, str]]) -> None:
        if spec.shape is None:
            return
        if len(shape) != len(spec.shape):
            raise CalibrationError(
                f"{where}: input '{spec.name}' has rank {len(shape)} (shape {list(shape)}) but the "
                f"model takes rank {len(spec.shape)} {spec.shape_text()}",
                fix="reshape the data to the model's input shape (keep any batch axis)")
        for axis, (have, want) in enumerate(zip(shape, spec.shape, strict=True)):
            if isinstance(want, int) and have != want:
                raise CalibrationError(
                    f"{where}: input '{spec.name}' has size {have} on axis {axis} but the model "
                    f"fixes it at {want} {spec.shape_text()}",
                    fix=f"give '{spec.name}' the shape {spec.shape_text()}")
            if isinstance(want, str):
                seen = symbols.setdefault(want, (have, spec.name))
                if seen[0] != have:
                    raise CalibrationError(
                        f"{where}: input '{spec.name}' has size {have} on axis {axis} ('{want}') "
                        f"but input '{seen[1]}' has {seen[0]} there",
                        fix=f"inputs sharing the dim '{want}' must agree in each sample")


def _name_list(inputs: Mapping[str, InputSpec]) -> str:
    return ", ".join(f"'{n}'" for n in inputs)


def _as_array(value: Any, name: str, where: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - any conversion failure is the data's fault
        raise CalibrationError(f"{where}: input '{name}' is not array-like ({exc})",
                               fix="give numpy arrays") from exc


def _cast_kind(have: np.dtype, spec: InputSpec, where: str) -> str:
    """'same', 'int' or 'float' (the cast allowed); raises for any cross-kind cast."""
    want = spec.dtype
    if have == want:
        return "same"
    if _is_int(have) and _is_int(want):
        return "int"
    if _is_float(have) and _is_float(want):
        return "float"
    if _is_float(have) and _is_int(want):
        fix = f"store '{spec.name}' as integers (e.g. token ids), not floats"
    elif _is_int(have) and _is_float(want):
        fix = f"convert (and normalise) '{spec.name}' to {want} yourself; only int->int and float->float are cast"
    else:
        fix = f"give '{spec.name}' as {want}"
    raise CalibrationError(f"{where}: input '{spec.name}' is {have} but the model takes {want}", fix=fix)


def _is_int(dtype: np.dtype) -> bool:
    return dtype.kind in "iu"


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f"


def _cast_values(array: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    kind = _cast_kind(array.dtype, spec, where)
    if kind == "int" and array.size:
        info = np.iinfo(spec.dtype)
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            raise CalibrationError(
                f"{where}: input '{spec.name}' has values {low}..{high}, outside {spec.dtype}",
                fix=f"give '{spec.name}' values that fit {spec.dtype}")
    with np.errstate(over="ignore"):  # a float overflow becomes Inf, reported just below
        cast = array.astype(spec.dtype, copy=False) if kind != "same" else array
    if _is_float(cast.dtype) and not np.isfinite(cast).all():
        bad = int(cast.size - np.count_nonzero(np.isfinite(cast)))
        source = "after the cast to " + str(spec.dtype) if kind == "float" else "in the data"
        raise CalibrationError(f"{where}: input '{spec.name}' has {bad} NaN/Inf values {source}",
                               fix=f"replace or drop the non-finite values of '{spec.name}'")
    return np.ascontiguousarray(cast).reshape(cast.shape)  # ascontiguousarray makes scalars 1-D


# --------------------------------------------------------------------------------------------
# Sources.

class CalibrationSource(ABC):
    """A re-iterable, sized stream of checked feed dicts; one sample in memory at a time.

    A source is a view of some samples of its data: `split` makes two views of one source.
    """

    def __init__(self, inputs: Sequence[InputSpec], size: int):
        self.inputs = tuple(inputs)
        self.checker = FeedChecker(self.inputs)
        self._indices: Sequence[int] = range(size)

    def __len__(self) -> int:
        return len(self._indices)

    def __iter__(self) -> Iterator[Feed]:
        for where, sample in self._samples(self._indices):
            yield self.checker.check_feed(sample, where)

    @abstractmethod
    def _samples(self, indices: Sequence[int]) -> Iterator[tuple[str, Mapping[str, Any]]]:
        """(where, raw sample) for the given sample indices (ascending), for messages and checks."""

    def sample_names(self) -> list[str]:
        """Where each sample of this view comes from (file, row, token window), as messages
        name it; reads the samples (meant for a few, e.g. the held-out ones a report names)."""
        return [where for where, _ in self._samples(self._indices)]

    def _view(self, indices: Sequence[int]) -> CalibrationSource:
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._indices = indices
        return view


def split(source: CalibrationSource, n_holdout: int) -> tuple[CalibrationSource, CalibrationSource]:
    """(calibration, holdout): the last `n_holdout` samples are set aside for verification."""
    total = len(source)
    if not 0 <= n_holdout < total:
        raise CalibrationError(
            f"cannot hold out {n_holdout} of {total} samples and keep at least one for calibration",
            fix=f"pick n_holdout between 0 and {total - 1}, or give more samples")
    indices = source._indices
    cut = total - n_holdout
    return source._view(indices[:cut]), source._view(indices[cut:])


def subset(source: CalibrationSource, positions: Sequence[int]) -> CalibrationSource:
    """A view of the samples of `source` at `positions` (ascending, as len/iter count them)."""
    indices = source._indices
    if any(not 0 <= p < len(indices) for p in positions) or list(positions) != sorted(set(positions)):
        raise ValueError(f"positions must be ascending and within 0..{len(indices) - 1}")
    return source._view([indices[p] for p in positions])


class NpzDirectorySource(CalibrationSource):
    """A directory of `.npz` files, one sample each, read in file-name order."""

    def __init__(self, directory: Path, inputs: Sequence[InputSpec]):
        self.files = sorted(p for p in directory.iterdir() if p.suffix == ".npz" and p.is_file())
        if not self.files:
            raise CalibrationError(f"calibration directory '{directory}' has no .npz files",
                                   fix="save one sample per file with numpy.savez(path, **feed)")
        super().__init__(inputs, len(self.files))
        for path in self.files:  # all headers up front: a bad file fails now, not hours in
            self.checker.check_metadata(_npz_headers(path), str(path))

    def _samples(self, indices: Sequence[int]) -> Iterator[tuple[str, Mapping[str, Any]]]:
        for index in indices:
            path = self.files[index]
            with np.load(path, allow_pickle=False) as npz:
                sample = {name: npz[name] for name in npz.files}
            yield str(path), sample


class NpzStackedSource(CalibrationSource):
    """One `.npz` file; each array's leading axis indexes samples.

    The leading axis is either a sample axis added in front of the model's input shape (arrays
    of rank r + 1 for inputs of rank r: each sample drops it) or the model's own batch axis
    (arrays of the inputs' rank, e.g. input_ids [32, 128] for a model taking [batch, seq]:
    each sample is one row, batch 1), as the inputs' ranks say.

    Members stored uncompressed (numpy.savez) are memory-mapped, so a pass touches one sample
    at a time; compressed members (savez_compressed) are decompressed once per pass.
    """

    def __init__(self, path: Path, inputs: Sequence[InputSpec]):
        self.path = path
        headers = _npz_headers(path)
        if not headers:
            raise CalibrationError(f"calibration file '{path}' holds no arrays",
                                   fix="save the inputs with numpy.savez(path, **{name: stacked_array})")
        size = self._sample_count(headers)
        super().__init__(inputs, size)
        self.batch_axis = _leading_axis_is_batch(headers, inputs)
        # Every sample of a stacked file shares its metadata: check it once.
        if self.batch_axis:
            self.checker.check_metadata({n: ((1, *s[1:]), d) for n, (s, d) in headers.items()},
                                        f"{path} (a sample: one row of the leading batch axis)")
        else:
            self.checker.check_metadata({n: (s[1:], d) for n, (s, d) in headers.items()},
                                        f"{path} (a sample, after the leading sample axis)")

    def _sample_count(self, headers: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> int:
        counts = {name: shape[0] if shape else None for name, (shape, _) in headers.items()}
        for name, count in counts.items():
            if count is None:
                raise CalibrationError(f"{self.path}: input '{name}' is a scalar, with no sample axis",
                                       fix="stack samples along a new first axis: shape (num_samples, *input_shape)")
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"'{n}': {c}" for n, c in counts.items())
            raise CalibrationError(f"{self.path}: inputs have different sample counts ({listed})",
                                   fix="give every input the same leading sample axis")
        count = next(iter(counts.values()))
        if count == 0:
            raise CalibrationError(f"calibration file '{self.path}' has 0 samples",
                                   fix="give at least one sample along the leading axis")
        return int(count)

    def _samples(self, indices: Sequence[int]) -> Iterator[tuple[str, Mapping[str, Any]]]:
        stacked = _open_npz_members(self.path)
        for index in indices:
            rows = slice(index, index + 1) if self.batch_axis else index
            yield f"{self.path} sample {index}", {name: array[rows] for name, array in stacked.items()}


def _leading_axis_is_batch(headers: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                           inputs: Sequence[InputSpec]) -> bool:
    """Whether a stacked file's arrays have the model inputs' own rank (the leading axis is the
    batch axis) rather than one more (a sample axis in front); inputs of unknown rank do not vote."""
    ranks = {spec.name: len(spec.shape) for spec in inputs if spec.shape is not None}
    votes = {len(shape) == ranks[name] for name, (shape, _) in headers.items() if name in ranks}
    return votes == {True}


@dataclass(frozen=True)
class TokenWindows:
    """Consecutive non-overlapping windows of `seq_len` tokens from a 1-D array (or .npy) of ids.

    Window w covers tokens [w * seq_len, (w + 1) * seq_len); windows first_window ..
    first_window + num_samples - 1 are used. A model with a KV cache gets each window as a
    prefill of seq_len - decode_steps tokens and decode_steps one-token steps.
    """

    ids: np.ndarray | str | os.PathLike[str]
    seq_len: int
    num_samples: int
    first_window: int = 0
    decode_steps: int = kv_cache.DEFAULT_DECODE_STEPS


@dataclass(frozen=True)
class TextWindows:
    """Text tokenized with a Hugging Face `tokenizer.json` (no special tokens added), then
    windowed like `TokenWindows`. The text is read with universal newlines (CRLF -> LF)."""

    text: str | os.PathLike[str]
    tokenizer: str | os.PathLike[str]
    seq_len: int
    num_samples: int
    first_window: int = 0
    decode_steps: int = kv_cache.DEFAULT_DECODE_STEPS


class TokenWindowSource(CalibrationSource):
    """Feeds input_ids [1, seq_len] plus whichever of attention_mask (ones), position_ids
    (0..seq_len-1) and token_type_ids (zeros) the model has; for a model with a KV cache,
    the prefill and decode steps of each window (`kv_cache.CacheSteps`)."""

    def __init__(self, ids: np.ndarray, windows: TokenWindows, inputs: Sequence[InputSpec],
                 model: ModelLike | None = None):
        _check_window_request(windows, len(ids))
        self.ids = ids
        self.windows = windows
        self.cache = _cache_steps(model, inputs, windows) if model is not None else None
        self._check_model_takes_text(inputs, self.cache)
        per_window = self.cache.per_window() if self.cache else 1
        super().__init__(inputs, windows.num_samples * per_window)
        if self.cache is None:
            shape = (1, windows.seq_len)
            meta = {spec.name: (shape, np.dtype(np.int64)) for spec in inputs}
        else:  # the prefill sample; decode steps share its dims but for the sequence lengths
            prefill = (1, windows.seq_len - self.cache.decode_steps)
            meta = {spec.name: (prefill, np.dtype(np.int64)) for spec in inputs}
            meta.update({n: (a.shape, a.dtype) for n, a in self.cache.layout.empty().items()})
        self.checker.check_metadata(meta, f"token windows of {windows.seq_len}")

    @staticmethod
    def _check_model_takes_text(inputs: Sequence[InputSpec], cache: kv_cache.CacheSteps | None = None) -> None:
        names = [spec.name for spec in inputs]
        if "input_ids" not in names:
            raise CalibrationError("the model has no 'input_ids' input, so text cannot feed it",
                                   fix="give .npz samples keyed by the model's input names")
        cached = set(cache.layout.past_names) if cache else set()
        for spec in inputs:
            if spec.name not in _TEXT_INPUTS and spec.required and spec.name not in cached:
                raise CalibrationError(
                    f"input '{spec.name}' cannot be made from text (only {', '.join(_TEXT_INPUTS)})",
                    fix="export the model without it (e.g. no KV cache) or give .npz samples")

    def _samples(self, indices: Sequence[int]) -> Iterator[tuple[str, Mapping[str, Any]]]:
        seq_len = self.windows.seq_len
        names = {spec.name for spec in self.inputs}
        if self.cache is not None:
            yield from self._cache_samples(indices)
            return
        for index in indices:
            window = self.windows.first_window + index
            ids = np.asarray(self.ids[window * seq_len:(window + 1) * seq_len], dtype=np.int64)
            sample = {"input_ids": ids[None, :],
                      "attention_mask": np.ones((1, seq_len), np.int64),
                      "position_ids": np.arange(seq_len, dtype=np.int64)[None, :],
                      "token_type_ids": np.zeros((1, seq_len), np.int64)}
            yield f"token window {window}", {n: a for n, a in sample.items() if n in names}


    def _cache_samples(self, indices: Sequence[int]) -> Iterator[tuple[str, Mapping[str, Any]]]:
        seq_len = self.windows.seq_len
        by_window: dict[int, list[int]] = {}
        for index in indices:
            at = self.cache.locate(index)
            by_window.setdefault(at.window, []).append(at.step)
        for offset, steps in by_window.items():
            window = self.windows.first_window + offset
            ids = np.asarray(self.ids[window * seq_len:(window + 1) * seq_len], dtype=np.int64)
            for step, feed in self.cache.window_feeds(ids, steps):
                yield f"token window {window} {'prefill' if step == 0 else f'decode step {step}'}", feed


def _cache_steps(model: ModelLike, inputs: Sequence[InputSpec], windows: TokenWindows) -> kv_cache.CacheSteps | None:
    """Prefill/decode samples for a model with a KV cache (None for one without)."""
    proto = model if isinstance(model, onnx.ModelProto) else _load_graph_only(model)
    layout = kv_cache.find_cache(inputs, kv_cache.model_outputs(proto))
    if layout is None:
        return None
    head_size = kv_cache.head_size_of(proto) if any(not isinstance(e.dims[-1], int) for e in layout.entries) else None
    if head_size:
        layout = kv_cache.with_head_size(layout, head_size)
    path = kv_cache.model_path(model)
    if path is None:
        raise CalibrationError("token windows for a model with a KV cache need the model file (decode steps run it)",
                               fix="give the model as a path, or .npz samples with the cache inputs")
    steps = kv_cache.CacheSteps(path, layout, [spec.name for spec in inputs], windows.decode_steps)
    steps.check_window(windows.seq_len)
    return steps


def _check_window_request(windows: TokenWindows, num_tokens: int) -> None:
    if windows.seq_len < 1 or windows.num_samples < 1 or windows.first_window < 0:
        raise CalibrationError(
            f"bad token windows: seq_len={windows.seq_len}, num_samples={windows.num_samples}, "
            f"first_window={windows.first_window}", fix="use seq_len >= 1, num_samples >= 1, first_window >= 0")
    available = num_tokens // windows.seq_len
    last = windows.first_window + windows.num_samples
    if last > available:
        raise CalibrationError(
            f"the text gives {available} windows of {windows.seq_len} tokens but windows "
            f"{windows.first_window}..{last - 1} were asked for",
            fix="use fewer or shorter windows, an earlier first_window, or more text")


def _load_token_ids(ids: np.ndarray | str | os.PathLike[str]) -> np.ndarray:
    if not isinstance(ids, np.ndarray):
        path = Path(ids)
        if not path.is_file():
            raise CalibrationError(f"token id file '{path}' does not exist", fix="give a .npy of token ids")
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    if ids.ndim != 1 or not _is_int(ids.dtype):
        raise CalibrationError(f"token ids must be a 1-D integer array, got {ids.dtype} {list(ids.shape)}",
                               fix="give the tokenized text as one 1-D array of ids")
    return ids


def _tokenize(spec: TextWindows) -> np.ndarray:
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise CalibrationError("text calibration data needs the 'tokenizers' package",
                               fix="pip install 'edgeq[models]'") from exc
    for path, what in ((spec.text, "text"), (spec.tokenizer, "tokenizer")):
        if not Path(path).is_file():
            raise CalibrationError(f"{what} file '{path}' does not exist", fix=f"give the path of the {what} file")
    try:
        tokenizer = Tokenizer.from_file(os.fspath(spec.tokenizer))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception
        raise CalibrationError(f"cannot load tokenizer '{spec.tokenizer}': {exc}",
                               fix="give a Hugging Face tokenizer.json") from exc
    # Windows are cut from the whole text: a tokenizer.json that truncates or pads (BERT's do,
    # to max_length) must not shorten it.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    text = Path(spec.text).read_text(encoding="utf-8")
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)


class IterableSource(CalibrationSource):
    """A sized re-iterable of feed dicts (a list, or an object with __iter__ and __len__),
    used in place: each pass calls iter() again. The first sample is checked at once."""

    def __init__(self, samples: Any, inputs: Sequence[InputSpec]):
        self.samples = samples
        size = len(samples)
        if size == 0:
            raise CalibrationError("the calibration iterable is empty", fix="give at least one sample")
        super().__init__(inputs, size)
        first = next(iter(samples), None)
        if first is None:
            raise CalibrationError(f"the calibration iterable has len {size} but yields nothing",
                                   fix="make __iter__ return a fresh iterator on every call")
        self.checker.check_feed(first, "sample 0")

    def _samples(self, indices: Sequence[int]) -> Iterator[tuple[str, Mapping[str, Any]]]:
        wanted = iter(indices)
        target = next(wanted, None)
        if target is None:
            return
        position = -1
        for position, sample in enumerate(self.samples):
            if position == target:
                yield f"sample {position}", sample
                target = next(wanted, None)
                if target is None:
                    return
        raise CalibrationError(
            f"the calibration iterable has len {len(self.samples)} but yielded {position + 1} samples",
            fix="make __len__ match what __iter__ yields, and __iter__ restart on every call")


class SpooledSource(NpzDirectorySource):
    """A one-shot iterable (generator, iterator, CalibrationDataReader) read once, each sample
    checked and written to a temporary directory that lives as long as this source."""

    def __init__(self, samples: Iterable[Any], inputs: Sequence[InputSpec]):
        # Views made by split() copy this reference, so the folder lives while any view does.
        self.spool = _TemporaryFolder()
        checker = FeedChecker(inputs)
        count = 0
        for count, sample in enumerate(samples, start=1):
            feed = checker.check_feed(sample, f"sample {count - 1}")
            np.savez(self.spool.path / f"{count - 1:08d}.npz", **feed)
        if count == 0:
            raise CalibrationError("the calibration iterable gave no samples", fix="give at least one sample")
        super().__init__(self.spool.path, inputs)


class _TemporaryFolder:
    """A folder removed when the last reference to this object goes."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="edgeq-calib-"))
        weakref.finalize(self, shutil.rmtree, self.path, True)


def _reader_samples(reader: Any) -> Iterator[Any]:
    """ONNX Runtime's CalibrationDataReader protocol: get_next() until None."""
    while (sample := reader.get_next()) is not None:
        yield sample


def open_source(spec: Any, model: ModelLike) -> CalibrationSource:
    """A `CalibrationSource` for `model` from a path (directory of .npz, or one stacked .npz),
    `TokenWindows`/`TextWindows`, an ORT CalibrationDataReader, or an iterable of feed dicts."""
    if isinstance(spec, CalibrationSource):
        return spec
    inputs = model_inputs(model)
    if isinstance(spec, (str, os.PathLike)):
        return _open_path(Path(spec), inputs)
    if isinstance(spec, TokenWindows):
        return TokenWindowSource(_load_token_ids(spec.ids), spec, inputs, model)
    if isinstance(spec, TextWindows):
        windows = TokenWindows(np.empty(0, np.int64), spec.seq_len, spec.num_samples, spec.first_window,
                               spec.decode_steps)
        _check_window_request(windows, 1 << 62)  # argument check before the slow tokenization
        ids = _tokenize(spec)
        return TokenWindowSource(ids, TokenWindows(ids, spec.seq_len, spec.num_samples, spec.first_window,
                                                   spec.decode_steps), inputs, model)
    if callable(getattr(spec, "get_next", None)):
        return SpooledSource(_reader_samples(spec), inputs)
    if isinstance(spec, Mapping):
        raise CalibrationError("calibration data is one dict, i.e. one sample",
                               fix="give a list of feed dicts, or a stacked .npz file")
    if isinstance(spec, Iterable):
        if hasattr(spec, "__len__") and iter(spec) is not spec:
            return IterableSource(spec, inputs)
        return SpooledSource(spec, inputs)
    raise CalibrationError(f"cannot use a {type(spec).__name__} as calibration data",
                           fix="give a .npz path or directory, TokenWindows/TextWindows, "
                               "a CalibrationDataReader, or a list of feed dicts")


def _open_path(path: Path, inputs: Sequence[InputSpec]) -> CalibrationSource:
    if path.is_dir():
        return NpzDirectorySource(path, inputs)
    if not path.exists():
        raise CalibrationError(f"calibration data '{path}' does not exist",
                               fix="give a directory of .npz files or one stacked .npz file")
    if path.suffix != ".npz":
        raise CalibrationError(f"calibration data '{path}' is not an .npz file",
                               fix="save samples with numpy.savez, or use TokenWindows for token ids")
    return NpzStackedSource(path, inputs)


# --------------------------------------------------------------------------------------------
# .npz internals: headers without loading, and memory-mapped members.

def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{array name: (shape, dtype)} read from each member's .npy header only."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                with archive.open(member) as stream:
                    shape, _, dtype = _read_npy_header(stream)
                headers[member[:-4]] = (shape, dtype)
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CalibrationError(f"cannot read '{path}' as .npz: {exc}",
                               fix="write it with numpy.savez or numpy.savez_compressed") from exc
    if not headers:
        raise CalibrationError(f"calibration file '{path}' holds no arrays",
                               fix="write it with numpy.savez(path, **feed)")
    return headers


def _read_npy_header(stream: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    return np.lib.format.read_array_header_2_0(stream)


def _open_npz_members(path: Path) -> dict[str, np.ndarray]:
    """Each member as an array: memory-mapped when stored uncompressed, else loaded."""
    arrays = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[:-4]
            mapped = _map_stored_member(path, raw, info) if info.compress_type == zipfile.ZIP_STORED else None
            if mapped is None:
                with archive.open(info) as stream:
                    mapped = np.lib.format.read_array(stream, allow_pickle=False)
            arrays[name] = mapped
    return arrays


def _map_stored_member(path: Path, raw: Any, info: zipfile.ZipInfo) -> np.ndarray | None:
    # The member's bytes follow its local header (30 bytes + file name + extra field).
    raw.seek(info.header_offset)
    local = raw.read(30)
    name_len = int.from_bytes(local[26:28], "little")
    extra_len = int.from_bytes(local[28:30], "little")
    raw.seek(info.header_offset + 30 + name_len + extra_len)
    shape, fortran, dtype = _read_npy_header(raw)
    if dtype.hasobject or 0 in shape:  # numpy cannot map zero bytes
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=raw.tell(), shape=shape,
                     order="F" if fortran else "C")
