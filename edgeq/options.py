"""Typed, frozen compile options (no option dicts), built by the CLI from flags or a TOML file."""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

from edgeq.errors import OptionError

RangeMethod = Literal["minmax", "percentile", "entropy", "mse"]
# "auto" (the default): percentile up to 8 bits, min/max on wider grids (see range_method).
CalibrationMethod = Literal["auto", "minmax", "percentile", "entropy", "mse"]


def range_method(method: str, bits: int) -> str:
    """The range method a tensor of `bits` bits takes under --calib-method `method`: "auto" is
    percentile up to 8 bits and min/max above. Percentile clips the tails whatever the width; on a
    16-bit grid (256x finer than 8 bits) the clipping costs far more than the resolution it buys:
    the rare outliers of an LLM's MLP and residual stream (SmolLM2 A16W8: perplexity +7.1% with
    percentile ranges, +2.1% with min/max on the CPU simulation, issue 13). A method given by name
    is used at every width."""
    if method == "auto":
        return "percentile" if bits <= 8 else "minmax"
    return method
# Alphas tried per layer by --smooth-search (0: leave the layer unsmoothed).
SMOOTH_SEARCH_GRID = (0.0, 0.4, 0.5, 0.6, 0.7, 0.8)


@dataclass(frozen=True)
class TensorOverride:
    """One entry of ONNX Runtime's TensorQuantOverrides: how one tensor is quantized."""

    dtype: str | None = None            # int8/uint8/int16/uint16/int4/uint4
    symmetric: bool | None = None
    scale: float | None = None          # with zero_point: fixed quantization parameters
    zero_point: int | None = None
    rmin: float | None = None           # range override
    rmax: float | None = None
    axis: int | None = None


_ORT_QUANT_TYPES = {"QInt8": "int8", "QUInt8": "uint8", "QInt16": "int16", "QUInt16": "uint16",
                    "QInt4": "int4", "QUInt4": "uint4"}


@dataclass(frozen=True)
class PrecisionOverrides:
    """Which ops stay high precision, by name, regex or op type, plus per-tensor overrides."""

    exclude_nodes: tuple[str, ...] = ()
    exclude_regex: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    tensors: tuple[tuple[str, TensorOverride], ...] = ()

    def __post_init__(self) -> None:
        for pattern in self.exclude_regex:
            try:
                re.compile(pattern)
            except re.error as err:
                raise OptionError(f"invalid --exclude-regex {pattern!r}: {err}") from None

    def excludes(self, op_name: str, op_type: str) -> str | None:
        """The reason an op is excluded, or None."""
        if op_name in self.exclude_nodes:
            return "excluded by name"
        if op_type in self.exclude_op_types:
            return f"op type {op_type} excluded"
        for pattern in self.exclude_regex:
            if re.search(pattern, op_name):
                return f"name matches /{pattern}/"
        return None

    def tensor(self, name: str) -> TensorOverride | None:
        return dict(self.tensors).get(name)

    @staticmethod
    def read_nodes_to_exclude(path: Path) -> tuple[str, ...]:
        """ORT's `nodes_to_exclude`: a JSON list of node names, or one name a line."""
        text = _read_text(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return tuple(line.strip() for line in text.splitlines() if line.strip())
        if isinstance(data, dict):
            data = data.get("nodes_to_exclude", [])
        if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
            raise OptionError(f"{path}: expected a JSON list of node names")
        return tuple(data)

    @staticmethod
    def read_tensor_overrides(path: Path) -> tuple[tuple[str, TensorOverride], ...]:
        """ORT's TensorQuantOverrides JSON: {tensor: [{quant_type, symmetric, scale, ...}]}."""
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as err:
            raise OptionError(f"{path} is not valid JSON: {err}") from None
        if isinstance(data, dict) and "TensorQuantOverrides" in data:
            data = data["TensorQuantOverrides"]
        if not isinstance(data, dict):
            raise OptionError(f"{path}: expected an object mapping tensor names to override lists")
        out = []
        for tensor, entries in sorted(data.items()):
            entry = entries[0] if isinstance(entries, list) and entries else entries
            if not isinstance(entry, dict):
                raise OptionError(f"{path}: override of {tensor!r} must be an object or a list of objects")
            quant_type = entry.get("quant_type")
            if quant_type is not None and quant_type not in _ORT_QUANT_TYPES:
                raise OptionError(f"{path}: {tensor!r} has unknown quant_type {quant_type!r}",
                                  fix=f"use one of {', '.join(_ORT_QUANT_TYPES)}")
            symmetric = entry.get("symmetric")
            if symmetric is not None and not isinstance(symmetric, bool):
                raise OptionError(f"{path}: 'symmetric' of {tensor!r} must be true or false, not {symmetric!r}")
            numbers = {}
            for key, kind in (("scale", float), ("zero_point", int), ("rmin", float), ("rmax", float)):
                try:
                    numbers[key] = _scalar(entry.get(key), kind)
                except (TypeError, ValueError):
                    raise OptionError(f"{path}: '{key}' of {tensor!r} must be a number, not {entry.get(key)!r}") \
                        from None
            out.append((tensor, TensorOverride(
                dtype=_ORT_QUANT_TYPES.get(quant_type) if quant_type else None, symmetric=symmetric,
                axis=entry.get("axis"), **numbers)))
        return tuple(out)


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """One `--input-shape NAME=D0,D1,...` as (name, dims)."""
    name, _, dims = text.partition("=")
    try:
        shape = tuple(int(d) for d in dims.split(",")) if name.strip() and dims.strip() else None
    except ValueError:
        shape = None
    if shape is None:
        raise OptionError(f"--input-shape {text!r} is not NAME=D0,D1,...", fix="e.g. --input-shape input_ids=1,128")
    return name.strip(), shape


def parse_size_budget(value: str | float) -> float:
    """--size-budget: megabytes above 1 (`120`, `120MB`), or a ratio of the float model (`0.22`,
    `22%`); returned as a number, a ratio when at most 1."""
    text = str(value).strip()
    try:
        if text.endswith("%"):
            number = float(text[:-1]) / 100
            if number > 1:
                raise ValueError
        elif text.upper().endswith("MB"):
            number = float(text[:-2])
            if number <= 1:  # megabytes are told from ratios by being above 1
                raise ValueError
        else:
            number = float(text)
    except ValueError:
        number = float("nan")
    if not number > 0 or number == float("inf"):
        raise OptionError(f"--size-budget must be megabytes or a ratio of the float model, not {value!r}",
                          fix="e.g. --size-budget 120 (MB, above 1), 0.22 or 22%")
    return number


def parse_latency_budget(value: str | float) -> float:
    """--latency-budget: milliseconds, a positive number (`12.5` or `12.5ms`)."""
    text = str(value).strip().lower().removesuffix("ms").strip()
    try:
        number = float(text) if not isinstance(value, bool) else float("nan")
    except ValueError:
        number = float("nan")
    if not number > 0 or number == float("inf"):
        raise OptionError(f"--latency-budget must be a positive number of milliseconds, not {value!r}",
                          fix="e.g. --latency-budget 15 (ms on the --device the target's cost model prices)")
    return number


def parse_outlier_threshold(value: str | float) -> float:
    """The --decompose-outliers threshold (|x| above it marks an outlier column): a positive number."""
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        threshold = None
    if threshold is None or not math.isfinite(threshold) or threshold <= 0 or isinstance(value, bool):
        raise OptionError(f"--decompose-outliers threshold must be a positive number, not {value!r}",
                          fix="e.g. --decompose-outliers 6.0 (LLM.int8's threshold, the default)")
    return threshold


def parse_weight_group(text: str) -> tuple[str, int, bool | None]:
    """One `--weight-group REGEX=N[:asym|:sym]` as (regex, N, zero points: True/False, None: as
    --weight-zero-points says)."""
    pattern, _, rest = text.rpartition("=")
    block, _, kind = rest.partition(":")
    try:
        size = int(block) if pattern else None
    except ValueError:
        size = None
    if size is None or kind not in ("", "asym", "sym"):
        raise OptionError(f"--weight-group {text!r} is not REGEX=BLOCK[:asym|:sym]",
                          fix="e.g. --weight-group 'down_proj|lm_head=32:asym'")
    return pattern, size, {"": None, "asym": True, "sym": False}[kind]


def _typed_weight_groups(value) -> tuple[tuple[str, int, bool | None], ...]:
    """weight_groups as ((regex, block, zero points), ...), from that form, (regex, block) pairs, a
    {regex: block or "block:asym"} table or REGEX=N[:asym|:sym] texts."""
    items = value.items() if isinstance(value, dict) else value
    out: list[tuple[str, int, bool | None]] = []
    for item in items:
        if isinstance(item, str):
            entry = parse_weight_group(item)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str):
            entry = parse_weight_group(f"{item[0]}={item[1]}")
        else:
            entry = (*item, None) if len(item) == 2 else tuple(item)
        pattern, block, zero_points = entry
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise OptionError(f"invalid --weight-group regex {pattern!r}: {err}") from None
        if not isinstance(block, int) or block < 1:
            raise OptionError(f"--weight-group {pattern}={block}: the block size must be a positive integer")
        out.append((pattern, block, zero_points))
    return tuple(out)


def _typed_input_shapes(value) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """input_shapes as ((name, dims), ...), from that form, a {name: dims} table or NAME=D0,.. texts."""
    items = value.items() if isinstance(value, dict) else value
    out: list[tuple[str, tuple[int, ...]]] = []
    for item in items:
        name, dims = parse_input_shape(item) if isinstance(item, str) else item
        try:
            dims = tuple(int(d) for d in dims)
        except (TypeError, ValueError):
            raise OptionError(f"input shape of {name!r} must be a list of sizes, not {dims!r}") from None
        if not isinstance(name, str) or not name:
            raise OptionError(f"input shape names must be input names, not {name!r}")
        if any(d < 1 for d in dims):
            raise OptionError(f"--input-shape {name}={','.join(map(str, dims))} has a size below 1",
                              fix="give every axis a positive size")
        if any(n == name for n, _ in out):
            raise OptionError(f"--input-shape gives {name} twice", fix="give each input once")
        out.append((name, dims))
    return tuple(out)


def _scalar(value, kind=float):
    if value is None:
        return None
    if isinstance(value, list):
        if len(value) != 1:
            raise OptionError("per-channel scale/zero_point overrides are not supported; give one value")
        value = value[0]
    return kind(value)


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text()
    except OSError as err:
        raise OptionError(f"cannot read {path}: {err.strerror}") from None


@dataclass(frozen=True)
class CalibrationOptions:
    method: CalibrationMethod = "auto"
    percentile: float = 99.999
    max_samples: int | None = None
    holdout: int = 2                     # samples set aside to verify the compiled model
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("auto", "minmax", "percentile", "entropy", "mse"):
            raise OptionError(f"--calib-method must be auto, minmax, percentile, entropy or mse, not {self.method!r}",
                              fix="auto (the default) takes percentile ranges for 8-bit activations, min/max for wider")


@dataclass(frozen=True)
class CompileOptions:
    # nf4: 4-bit NormalFloat codes with block absmax scales; fp8: float8 E4M3FN. None: the target's default.
    weights: Literal["int8", "int4", "nf4", "fp8"] | None = None
    group: int | None = None                                # block size for int4 (and int8 if set)
    # Per-linear block sizes (--weight-group REGEX=N[:asym|:sym], repeatable): a quantized op whose
    # name matches REGEX (the first that does) takes block-wise weights in blocks of N instead of
    # --group's, with zero points (asym), without (sym) or as --weight-zero-points says (finer
    # blocks where a layer needs them: an LM head, an unrotated down_proj).
    weight_groups: tuple[tuple[str, int, bool | None], ...] = ()
    activations: Literal["int8", "int16", "float", "fp8"] | None = None
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    overrides: PrecisionOverrides = field(default_factory=PrecisionOverrides)
    keep_high: int = 0                   # keep the K most sensitive quantized ops high
    sensitivity: bool = False            # rank ops by error in the report (implied by keep_high/budget)
    # Ops whose activation input is quantized as two int8 digits (x = s*q1 + (s/254)*q2): still
    # integer kernels, twice the MACs, near-int16 precision; by op-name regex, or the K worst.
    two_digit: tuple[str, ...] = ()
    # SmoothQuant: by default (grid None) alpha is searched per layer over SMOOTH_SEARCH_GRID
    # (0 = leave the layer alone), which only smooths where the simulated W8A8 error drops,
    # except after a Hadamard rotation, whose pass searches its own smoothing (a second round
    # costs accuracy: SmolLM2 W4A8 49.57 with it, 48.14 without); a given grid always searches;
    # a fixed smooth_alpha overrides the search; an empty grid and no alpha turn it off.
    smooth_alpha: float | None = None
    smooth_alpha_grid: tuple[float, ...] | None = None
    rotate: bool | None = None            # Hadamard rotation (QuaRot); None: the target's choice
    # False: the rotation only folds into weights (a pre-norm residual stream, the per-head V/O
    # fold) and adds no online Hadamard (before o_proj/down_proj, on q/k): no kernel a decode step
    # launches, at some accuracy (SmolLM2 W4A16 g128: 47.38 -> 48.66). Graphs without a stream
    # to fold into are left unrotated.
    online_rotations: bool = True
    # LLM.int8-style decomposition (--decompose-outliers [THRESHOLD]): the input columns of a
    # quantized linear whose calibrated |x| exceeds the threshold run in float, the rest in int8.
    # An alternative to the rotation: given, the rotation is off unless --rotate asks for both.
    decompose_outliers: float | None = None
    # Its int8 part: "token" quantizes each token's inlier activations with its own scale at run
    # time (LLM.int8's vector-wise int8, MatMulInteger); "tensor" keeps the target's static QDQ.
    decompose_scales: Literal["token", "tensor"] = "token"
    # How weights are rounded: round-to-nearest, GPTQ, AWQ (scaling + clipping), AWQ scaling then
    # GPTQ rounding; "auto": GPTQ for int4 weights when calibration data is given, else
    # round-to-nearest.
    weight_rounding: Literal["auto", "rtn", "gptq", "awq", "awq+gptq"] = "auto"
    act_order: bool = False              # GPTQ: round input channels by decreasing Hessian diagonal
    # The LM head (the linear writing a graph output: logits) keeps int8 weights under int4
    # presets, as llama.cpp (Q6_K output tensor) and GPTQ/AWQ tools (lm_head unquantized) do:
    # its error reaches every logit directly. "int4" quantizes it like the other linears.
    head_weights: Literal["int8", "int4"] = "int8"
    # Weights with a zero point per block (asymmetric: 16 levels over each block's [min, max])
    # where the target's runtime takes them (Target.zero_point_weights: int4 on x86/ARM), as
    # onnxruntime-genai's builder and llama.cpp's Q4_1 store them; default symmetric.
    weight_zero_points: bool = False
    accuracy_budget: float | None = None  # max relative output error; keeps worst ops high until met
    # --size-budget: the compiled model's bytes at most this ratio of the float model (<= 1) or
    # these megabytes (> 1); each linear's weights go to int4/int8/float (passes/size_budget.py).
    size_budget: float | None = None
    # Latency budget in milliseconds on the device a target's cost model prices (--latency-budget
    # MS with --device): each linear's weights go to int4 or int8 (passes/latency_budget.py).
    latency_budget: float | None = None
    quantize_embeddings: bool = True
    verify: bool = True
    threads: int = 0                     # ORT intra-op threads for calibration/verification (0: default)
    # Input shapes to fix before the pipeline (--input-shape NAME=D0,D1,...): ((name, dims), ...).
    # A TOML table {name = [dims]} is taken too. Without them a target that needs static shapes
    # takes the first calibration sample's (edgeq.frontend.shapes).
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shapes", _typed_input_shapes(self.input_shapes))
        object.__setattr__(self, "weight_groups", _typed_weight_groups(self.weight_groups))
        if self.weights not in (None, "int8", "int4", "nf4", "fp8"):
            raise OptionError(f"--weights must be int8, int4, nf4 or fp8, not {self.weights!r}")
        if self.activations not in (None, "int8", "int16", "float", "fp8"):
            raise OptionError(f"--activations must be int8, int16, float or fp8, not {self.activations!r}")
        if self.activations == "fp8" and self.weights != "fp8":
            raise OptionError("--activations fp8 needs --weights fp8 (float8 x float8 products)",
                              fix="add --weights fp8")
        if self.group is not None and self.group < 1:  # which block sizes work is the target's data
            raise OptionError(f"--group must be a positive block size, not {self.group}")
        if self.head_weights not in ("int8", "int4"):
            raise OptionError(f"--head-weights must be int8 or int4, not {self.head_weights!r}")
        if self.keep_high < 0:
            raise OptionError("--keep-high must be >= 0")
        if self.decompose_outliers is not None:
            object.__setattr__(self, "decompose_outliers", parse_outlier_threshold(self.decompose_outliers))
        if self.decompose_scales not in ("token", "tensor"):
            raise OptionError(f"--decompose-scales must be token or tensor, not {self.decompose_scales!r}",
                              fix="token: per-token int8 activations (LLM.int8's); tensor: the static QDQ")
        if self.size_budget is not None:
            object.__setattr__(self, "size_budget", parse_size_budget(self.size_budget))
        if self.latency_budget is not None:
            object.__setattr__(self, "latency_budget", parse_latency_budget(self.latency_budget))
            if self.size_budget is not None:
                raise OptionError("give --size-budget or --latency-budget, not both",
                                  fix="one budget chooses the widths: drop one of them")
        if self.weight_rounding not in ("auto", "rtn", "gptq", "awq", "awq+gptq"):
            raise OptionError(f"--weight-rounding must be auto, rtn, gptq, awq or awq+gptq, "
                              f"not {self.weight_rounding!r}")

    @classmethod
    def from_toml(cls, path: Path, **overrides) -> "CompileOptions":
        """Options from a TOML file ([compile], [calibration], [precision] tables), then flags."""
        try:
            data = tomllib.loads(_read_text(path))
        except tomllib.TOMLDecodeError as err:
            raise OptionError(f"{path}: invalid TOML: {err}") from None
        calib = _typed(CalibrationOptions, data.get("calibration", {}), path)
        precision = data.get("precision", {})
        prec = PrecisionOverrides(
            exclude_nodes=tuple(precision.get("exclude_nodes", ())),
            exclude_regex=tuple(precision.get("exclude_regex", ())),
            exclude_op_types=tuple(precision.get("exclude_op_types", ())))
        base = _typed(cls, {k: v for k, v in data.get("compile", {}).items()}, path,
                      calibration=calib, overrides=prec)
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _typed(cls, table: dict, path: Path, **extra):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise OptionError(f"{path}: unknown option(s) {', '.join(unknown)} for {cls.__name__}")
    return cls(**table, **extra)
