"""An integer program: the datapath of a model lowered for an integer-only target, as a list of
steps whose ONNX emission and numpy reference come from the same data.

Every step reads and writes named integer tensors (real = int * scale, symmetric):

    Quantize       float host tensor -> int8 (QuantizeLinear: round half to even, saturate)
    MatMulInt      MatMulInteger (int8/uint8 x int8 -> int32), plus an int32 bias constant
    Shift          y = saturate(x * 2^e): the shift-only requantization, e per tensor or per
                   last-axis channel, right shifts rounding half up
    Digit          high or low 8-bit digit of a wide non-negative integer (two-pass products)
    AddInt         a + b in int64, saturated (residual adds on scales aligned by Shift first)
    Move           Reshape / Transpose of integer data
    AttentionMask  0/1 attention mask -> additive int32 mask (0 or -2^31)
    SoftmaxInt     edgeq.backends.fpga.integer.Softmax (I-BERT i-exp) with the additive mask
    LayerNormInt   edgeq.backends.fpga.integer.Normalization (exact isqrt)
    GeluInt        edgeq.backends.fpga.integer.Gelu (I-BERT i-erf)
    HadamardInt    y = x @ blockdiag(H_b): Sylvester's +-1 Walsh-Hadamard matrix of order b = 2^m
                   on each block of b last-axis channels, as m butterfly stages of adds and
                   subtracts (no multiplier); spreads outlier channels before an int8 requantization
    Dequantize     int8 -> float (DequantizeLinear) at the datapath's end
    (decoders)     RmsNormInt, SiluInt, MulInt, NegInt, SliceInt, ConcatInt, UnsqueezeInt,
                   ExpandInt, CausalMask: edgeq.backends.fpga.integer.decoder

`IntegerProgram.add(step, builder)` appends the step's ONNX nodes to an `IntGraphBuilder` and
records the step under the name of its output; `IntegerProgram.reference(feeds, constants)`
runs the same steps in numpy, composed from the kernels' own references (fixedpoint's np_*
mirrors, `Softmax.reference`, `Normalization.reference`, `Gelu.reference`), never calling
ONNX Runtime. The program serialises to JSON (weights are referenced by initializer name), so
a saved model carries the functional model of its own datapath.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from edgeq.errors import OptionError
import edgeq.backends.fpga.integer.ops as ops
from edgeq.backends.fpga.integer.builder import IntGraphBuilder, QTensor
from edgeq.backends.fpga.integer.decoder import STEPS as DECODER_STEPS
from edgeq.backends.fpga.integer.fixedpoint import np_saturate, np_shift_by
from edgeq.backends.fpga.integer.gelu import Gelu
from edgeq.backends.fpga.integer.norm import Normalization
from edgeq.backends.fpga.integer.softmax import Softmax
from edgeq.backends.fpga.integer.step import F32, Scale, Step
from edgeq.backends.fpga.integer.step import dtype_of as _dtype
from edgeq.backends.fpga.metadata import PROGRAM_KEY

MASKED = -(1 << 31)   # additive mask of a masked key: int32 minimum, exp() of it is exactly 0


def _qdq_params(b: IntGraphBuilder, scale: Scale, dtype: np.dtype) -> tuple[list[str], dict]:
    """Scale and zero-point constants of a Q/DQ, with axis=-1 when the scale is per channel."""
    array = np.asarray(scale, F32)
    zero = np.zeros(array.shape, dtype)
    names = [b.const(array, F32, "scale"), b.const(zero, dtype, "zero_point")]
    return names, ({"axis": -1} if array.ndim else {})


@dataclass(frozen=True)
class Quantize(Step):
    x: str
    scale: Scale
    dtype: str = "int8"
    out: str = ""
    unit: str = ""
    kind: ClassVar[str] = "Quantize"

    def inputs(self):
        return (self.x,)

    def emit(self, b):
        b.declare_value(self.x, F32)
        params, attrs = _qdq_params(b, self.scale, _dtype(self.dtype))
        out = b.op("QuantizeLinear", [self.x, *params], "quantized", **attrs)
        return b.declare_value(out, _dtype(self.dtype))

    def run(self, env):
        q = np.round(np.asarray(env[self.x], F32) / np.asarray(self.scale, F32))  # half to even
        return np_saturate(q.astype(np.int64), _dtype(self.dtype))


@dataclass(frozen=True)
class Dequantize(Step):
    x: str
    scale: Scale
    out: str = ""
    unit: str = ""
    kind: ClassVar[str] = "Dequantize"

    def inputs(self):
        return (self.x,)

    def emit(self, b):
        params, attrs = _qdq_params(b, self.scale, b.dtype(self.x))
        out = b.op("DequantizeLinear", [self.x, *params], "dequantized", **attrs)
        return b.declare_value(out, F32)

    def run(self, env):
        return env[self.x].astype(F32) * np.asarray(self.scale, F32)


@dataclass(frozen=True)
class MatMulInt(Step):
    a: str
    b: str
    bias: str | None = None
    out: str = ""
    unit: str = ""
    kind: ClassVar[str] = "MatMulInt"

    def inputs(self):
        return (self.a, self.b) + ((self.bias,) if self.bias else ())

    def emit(self, b):
        acc = b.declare_value(b.op("MatMulInteger", [self.a, self.b], "acc"), np.int32)
        if self.bias:
            acc = b.op("Add", [acc, self.bias], "acc_bias")
        return acc

    def run(self, env):
        acc = np.matmul(env[self.a].astype(np.int64), env[self.b].astype(np.int64))
        if self.bias:
            acc = acc + env[self.bias].astype(np.int64)
        info = np.iinfo(np.int32)
        if acc.size and (acc.min() < info.min or acc.max() > info.max):
            raise OptionError(f"accumulator {self.out!r} overflows int32", fix="narrow the weights or inputs")
        return acc.astype(np.int32)


@dataclass(frozen=True)
class Shift(Step):
    """y = saturate(x * 2^e) (right shifts round half up): every requantization and scale
    alignment of the datapath. `exponent` is one int or one int per last-axis channel."""

    x: str
    exponent: int | tuple[int, ...]
    dtype: str
    out: str = ""
    unit: str = ""
    kind: ClassVar[str] = "Shift"

    def inputs(self):
        return (self.x,)

    def _exponents(self) -> np.ndarray:
        return np.asarray(self.exponent, np.int64)

    def emit(self, b):
        e = self._exponents()
        x = ops.cast(b, self.x, ops.I64)
        left, right = np.maximum(e, 0), np.maximum(-e, 0)
        if np.any(left):
            x = ops.shift_left(b, x, int(left) if left.ndim == 0 else left)
        if np.any(right):
            x = ops.shift_right_rounding(b, x, int(right) if right.ndim == 0 else right)
        return ops.saturate(b, x, _dtype(self.dtype))

    def run(self, env):
        return np_saturate(np_shift_by(env[self.x], self._exponents()), _dtype(self.dtype))


@dataclass(frozen=True)
class Digit(Step):
    """One 8-bit digit of a non-negative integer: `high` = floor(x / 2^bits), `low` = x mod
    2^bits, as uint8 (x = high * 2^bits + low): a wide operand of an 8-bit product in two
    passes."""

    x: str
    bits: int
    high: bool
    out: str = ""
    unit: str = ""
    kind: ClassVar[str] = "Digit"

    def inputs(self):
        return (self.x,)

    def emit(self, b):
        x = ops.cast(b, self.x, ops.I64)
        if self.high:
            digit = ops.shift_right_floor(b, x, self.bits)
        else:
            digit = b.op("BitwiseAnd", [x, b.const((1 << self.bits) - 1, ops.I64, "digit_mask")], "low_digit")
        return ops.saturate(b, digit, np.uint8)

    def run(self, env):
        x = env[self.x].astype(np.int64)
        digit = np.right_shift(x, self.bits) if self.high else np.bitwise_and(x, (1 << self.bits) - 1)
        return np_saturate(digit, np.dtype(np.uint8))


@dataclass(frozen=True)
class AddInt(Step):
    a: str
    b: str
    dtype: str = "int32"
    out: str = ""
    unit: str = ""
    kind: ClassVar[str] = "AddInt"

    def inputs(self):
        return (self.a, self.b)

    def emit(self, b):
        total = b.op("Add", [ops.cast(b, self.a, ops.I64), ops.cast(b, self.b, ops.I64)], "sum")
        return ops.saturate(b, total, _dtype(self.dtype))

    def run(self, env):
        return np_saturate(env[self.a].astype(np.int64) + env[self.b].astype(np.int64), _dtype(self.dtype))


@dataclass(frozen=True)
class Move(Step):
    """Reshape (ONNX semantics: 0 copies the input dim, -1 is inferred), Transpose, or Gather
    of last-axis channels `indices`."""

    x: str
    op: str
    shape: tuple[int, ...] = ()
    perm: tuple[int, ...] = ()
    indices: tuple[int, ...] = ()
    out: str = ""
    unit: str = ""
    kind: ClassVar[str] = "Move"

    def inputs(self):
        return (self.x,)

    def emit(self, b):
        if self.op == "Reshape":
            return b.op("Reshape", [self.x, b.const(np.asarray(self.shape, np.int64), ops.I64, "shape")], "reshaped")
        if self.op == "Transpose":
            return b.op("Transpose", [self.x], "transposed", perm=list(self.perm))
        if self.op == "Gather":
            return b.op("Gather", [self.x, b.const(np.asarray(self.indices, np.int64), ops.I64, "channels")],
                        "channels", axis=-1)
        raise OptionError(f"unknown data movement {self.op!r}")

    def run(self, env):
        x = env[self.x]
        if self.op == "Reshape":
            shape = [x.shape[i] if d == 0 else d for i, d in enumerate(self.shape)]
            return x.reshape(shape)
        if self.op == "Gather":
            return np.take(x, np.asarray(self.indices, np.int64), axis=-1)
        return np.transpose(x, self.perm)


@dataclass(frozen=True)
class AttentionMask(Step):
    """A 0/1 key mask (graph input) -> additive int32 mask: 0 where 1, -2^31 where 0,
    unsqueezed on `axes` (the float graph's (1 - mask) * float32.min, saturated to int32)."""

    x: str
    axes: tuple[int, ...]
    out: str = ""
    unit: str = ""
    kind: ClassVar[str] = "AttentionMask"

    def inputs(self):
        return (self.x,)

    def emit(self, b):
        if not b.knows(self.x):
            b.declare_value(self.x, np.int64)
        mask = ops.cast(b, self.x, ops.I64)
        mask = b.op("Unsqueeze", [mask, b.const(np.asarray(self.axes, np.int64), ops.I64, "axes")], "mask")
        mask = b.op("Sub", [mask, b.const(1, ops.I64, "one")], "mask_minus_one")
        mask = b.op("Mul", [mask, b.const(-MASKED, ops.I64, "mask_unit")], "additive_mask")
        return ops.saturate(b, mask, np.int32)

    def run(self, env):
        mask = np.expand_dims(env[self.x].astype(np.int64), self.axes)
        return np_saturate((mask - 1) * -MASKED, np.dtype(np.int32))


@dataclass(frozen=True)
class SoftmaxInt(Step):
    x: str
    in_scale: float
    mask: str | None = None
    out_dtype: str = "uint8"
    out: str = ""
    unit: str = ""
    kind: ClassVar[str] = "SoftmaxInt"

    def inputs(self):
        return (self.x,) + ((self.mask,) if self.mask else ())

    def plan(self) -> Softmax:
        return Softmax.plan(self.in_scale, _dtype(self.out_dtype))

    def emit(self, b):
        mask = QTensor(self.mask, b.dtype(self.mask), self.in_scale) if self.mask else None
        return self.plan().emit(b, QTensor(self.x, b.dtype(self.x), self.in_scale), mask).name

    def run(self, env):
        return self.plan().reference(env[self.x], env[self.mask] if self.mask else None)


@dataclass(frozen=True)
class LayerNormInt(Step):
    x: str
    in_scale: float
    in_dtype: str
    gamma: tuple[float, ...]
    beta: tuple[float, ...] | None
    eps: float
    out_scale: Scale
    out: str = ""
    unit: str = ""
    out_dtype: str = "int8"      # int16: a residual-stream output (post-norm encoders)
    kind: ClassVar[str] = "LayerNormInt"

    def inputs(self):
        return (self.x,)

    def plan(self) -> Normalization:
        """Per-channel output scales s_c are the kernel's scale s = max(s_c) with gamma and beta
        multiplied by s / s_c (powers of two, exact): the output integers are y_c / s_c."""
        scales = np.asarray(self.out_scale, np.float64)
        coarsest = float(scales.max())
        factor = coarsest / scales
        gamma = np.asarray(self.gamma, np.float64) * factor
        beta = None if self.beta is None else np.asarray(self.beta, np.float64) * factor
        return Normalization.plan(centered=True, in_scale=self.in_scale, in_dtype=_dtype(self.in_dtype),
                                  gamma=gamma, beta=beta, eps=self.eps, out_scale=coarsest,
                                  out_dtype=_dtype(self.out_dtype))

    def emit(self, b):
        return self.plan().emit(b, QTensor(self.x, b.dtype(self.x), self.in_scale)).name

    def run(self, env):
        return self.plan().reference(env[self.x])


@dataclass(frozen=True)
class GeluInt(Step):
    x: str
    in_scale: float
    out_scale: Scale
    out: str = ""
    unit: str = ""
    out_dtype: str = "int8"      # int16: read by a HadamardInt before its int8 requantization
    kind: ClassVar[str] = "GeluInt"

    def inputs(self):
        return (self.x,)

    def plan(self) -> Gelu:
        return Gelu.plan(self.in_scale, np.asarray(self.out_scale, np.float64) if isinstance(self.out_scale, tuple)
                         else self.out_scale, _dtype(self.out_dtype))

    def emit(self, b):
        return self.plan().emit(b, QTensor(self.x, b.dtype(self.x), self.in_scale)).name

    def run(self, env):
        return self.plan().reference(env[self.x])


@dataclass(frozen=True)
class HadamardInt(Step):
    """y = x @ blockdiag(H_block), H_block Sylvester's +-1 matrix (edgeq.quant.hadamard.sylvester):
    the fast Walsh-Hadamard transform, log2(block) stages of a + b, a - b on channel pairs at
    stride 1, 2, .., block/2 (exact in int64; |y| <= block * max|x|, saturated to `dtype`)."""

    x: str
    block: int
    dtype: str = "int32"
    out: str = ""
    unit: str = ""
    kind: ClassVar[str] = "HadamardInt"

    def inputs(self):
        return (self.x,)

    def emit(self, b):
        shape = b.declare_value(b.op("Shape", [self.x], "shape"), ops.I64)
        y = ops.cast(b, self.x, ops.I64)
        axis, zero, one, two = (b.const(np.asarray([v], np.int64), ops.I64, name)
                                for v, name in ((1, "axis"), (0, "zero"), (1, "one"), (2, "two")))
        half = 1
        while half < self.block:
            # [pairs, 2, half]: the two halves of every 2*half block -> a + b, a - b
            parts = b.op("Reshape", [y, b.const(np.asarray([-1, 2, half], np.int64), ops.I64, "butterfly")],
                         "butterfly_in")
            lo = b.op("Slice", [parts, zero, one, axis], "lo")
            hi = b.op("Slice", [parts, one, two, axis], "hi")
            y = b.op("Concat", [b.op("Add", [lo, hi], "sum"), b.op("Sub", [lo, hi], "difference")], "butterfly_out",
                     axis=1)
            half *= 2
        return ops.saturate(b, b.op("Reshape", [y, shape], "transformed"), _dtype(self.dtype))

    def run(self, env):
        from edgeq.quant.hadamard import sylvester

        x = env[self.x].astype(np.int64)
        blocks = x.reshape(*x.shape[:-1], -1, self.block)
        y = np.matmul(blocks, sylvester(self.block).astype(np.int64))   # exact: int64 matmul
        return np_saturate(y.reshape(x.shape), _dtype(self.dtype))


STEP_TYPES: dict[str, type] = {cls.kind: cls for cls in (Quantize, Dequantize, MatMulInt, Shift, Digit, AddInt, Move,
                                                          AttentionMask, SoftmaxInt, LayerNormInt, GeluInt,
                                                          HadamardInt, *DECODER_STEPS)}


@dataclass
class IntegerProgram:
    """The steps of a lowered datapath, in execution order.

    `inputs`: names the program reads from outside (float host tensors before their Quantize,
    integer graph inputs such as the attention mask). `outputs`: (program tensor, graph output
    name) pairs. `spans`: for each step, the [start, end) range of builder nodes it emitted.
    """

    steps: list[Step] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[tuple[str, str]] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    # float tensor of the source model -> (integer tensor, scale): where each float tensor lives
    # in the datapath, for per-layer error analysis (scale per tensor, or per last-axis channel).
    probes: dict[str, tuple[str, float | list[float]]] = field(default_factory=dict)

    def add(self, step: Step, b: IntGraphBuilder) -> str:
        """Emit `step` into `b`; record it with its output name; return that name."""
        start = len(b.nodes)
        out = step.emit(b)
        self.steps.append(dataclasses.replace(step, out=out))
        self.spans.append((start, len(b.nodes)))
        produced = {s.out for s in self.steps}
        for name in step.inputs():
            if name not in self.inputs and name not in produced and not b.is_constant(name):
                self.inputs.append(name)
        return out

    def reference(self, feeds: Mapping[str, np.ndarray], constants: Mapping[str, np.ndarray], *,
                  keep: bool = False) -> dict[str, np.ndarray]:
        """Run the datapath in numpy. `feeds` holds the program inputs (host float tensors,
        the attention mask), `constants` the weights by initializer name. Returns the outputs
        by graph output name (with keep=True also every intermediate by its tensor name)."""
        env: dict[str, np.ndarray] = {}
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise OptionError(f"the integer reference needs inputs {missing}")
        lookup = _Lookup(env, feeds, constants)
        for step in self.steps:
            env[step.out] = step.run(lookup)
        result = {graph_name: env[name] for name, graph_name in self.outputs}
        if keep:
            result.update(env)
        return result

    def channel_scaled(self) -> list[str]:
        """Steps that give an activation more than one scale: a per-channel Quantize/Dequantize
        or norm/GELU output scale, a Gather of channel groups. Empty for a datapath with one
        power-of-two scale per activation tensor. (A Shift with per-channel exponents is the
        requantization of an accumulator of per-output-channel weights: the weights' scales.)"""
        found = []
        for step in self.steps:
            fields = [getattr(step, name, None) for name in ("scale", "out_scale")]
            if any(isinstance(v, (tuple, list)) for v in fields) or (isinstance(step, Move) and step.op == "Gather"):
                found.append(f"{step.kind} {step.out}")
        return found

    def to_json(self) -> str:
        steps = []
        for step in self.steps:
            data = {"kind": step.kind}
            for f in dataclasses.fields(step):
                value = getattr(step, f.name)
                data[f.name] = list(value) if isinstance(value, tuple) else value
            steps.append(data)
        return json.dumps({"version": 1, "inputs": self.inputs, "outputs": [list(o) for o in self.outputs],
                           "probes": {k: list(v) for k, v in self.probes.items()},
                           "steps": steps}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> IntegerProgram:
        data = json.loads(text)
        if data.get("version") != 1:
            raise OptionError(f"unknown integer program version {data.get('version')!r}")
        steps = []
        for raw in data["steps"]:
            kind = raw.pop("kind")
            if kind not in STEP_TYPES:
                raise OptionError(f"unknown integer program step {kind!r}")
            steps.append(STEP_TYPES[kind](**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}))
        probes = {k: (v[0], v[1]) for k, v in data.get("probes", {}).items()}
        return cls(steps, list(data["inputs"]), [tuple(o) for o in data["outputs"]], probes=probes)


    @classmethod
    def from_model(cls, model) -> IntegerProgram:
        """The program a lowered model (onnx.ModelProto or edgeq Graph) carries in its metadata."""
        props = dict(model.model.metadata_props) if hasattr(model, "model") else {
            p.key: p.value for p in model.metadata_props}
        if PROGRAM_KEY not in props:
            raise OptionError("the model carries no integer program", fix="compile it for the fpga target")
        return cls.from_json(props[PROGRAM_KEY])


@dataclass
class ReferenceCheck:
    """ONNX Runtime's execution of a lowered model against the program's numpy reference."""

    tensors: int                 # tensors compared (graph outputs and, optionally, every probe)
    elements: int                # their elements
    mismatched: list[str]        # tensors whose values differ in any element

    @property
    def bit_exact(self) -> bool:
        return not self.mismatched


def check_against_onnxruntime(model, feeds: Mapping[str, np.ndarray], *, intermediates: bool = True,
                              threads: int = 1) -> ReferenceCheck:
    """Run the lowered `model` (onnx.ModelProto) in ONNX Runtime on `feeds`, also fetching the
    host tensors the datapath starts from; run the program's numpy reference from those; compare
    the outputs and (with `intermediates`) every integer tensor of the datapath, bit for bit."""
    import onnx
    from onnx import numpy_helper

    from edgeq.runtime.sessions import make_session

    program = IntegerProgram.from_model(model)
    graph_inputs = {i.name for i in model.graph.input}
    host = [n for n in program.inputs if n not in graph_inputs]
    probes = sorted({name for name, _ in program.probes.values()}) if intermediates else []
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    present = {o.name for o in extended.graph.output}
    for name in host + probes:
        if name not in present:
            extended.graph.output.append(onnx.helper.make_tensor_value_info(
                name, types.get(name, onnx.TensorProto.FLOAT), None))
    session = make_session(extended.SerializeToString(), threads)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in graph_inputs})))
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    reference = program.reference({n: got[n] if n in got else feeds[n] for n in program.inputs}, constants,
                                  keep=True)
    compared = [graph_name for _, graph_name in program.outputs] + probes
    mismatched = [n for n in compared if not np.array_equal(reference[n], got[n])
                  or reference[n].dtype != got[n].dtype]
    return ReferenceCheck(len(compared), int(sum(got[n].size for n in compared)), mismatched)


class _Lookup(Mapping[str, np.ndarray]):
    """Tensors by name: computed ones first, then program inputs, then constants."""

    def __init__(self, env, feeds, constants):
        self.env, self.feeds, self.constants = env, feeds, constants

    def __getitem__(self, name):
        for source in (self.env, self.feeds, self.constants):
            if name in source:
                return np.asarray(source[name])
        raise KeyError(f"integer reference: no tensor named {name!r}")

    def __iter__(self):
        return iter({**self.constants, **self.feeds, **self.env})

    def __len__(self):
        return len(set(self.env) | set(self.feeds) | set(self.constants))
