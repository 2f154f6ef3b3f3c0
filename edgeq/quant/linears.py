"""Layer-input statistics for weight rounding (GPTQ, AWQ) and the GPTQ rounding itself.

Both passes look at one thing per quantized linear layer y = x W: the second moment of its
input, H = 2/n * sum_t x_t x_t^T (K x K, float64; GPTQ's normalisation), plus for AWQ the
mean |x| per input channel. The layer's output error on the calibration data for any weight
error E = W_q - W is exactly tr(E^T H E) / 2 per token, so GPTQ's compensation, AWQ's scale
search and AWQ's clip search all work from H: no activations are kept.

Streaming: the float graph runs in ONNX Runtime (weights memory-mapped and fed, only the
nodes leading to the requested tensors, see `edgeq.calibration.collect`), one calibration sample at a
time; the requested inputs are folded into their H and dropped. The inputs are taken a few
at a time (`hessian_chunks`), so at most `budget_bytes` of Hessians exist at once; the
caller consumes each chunk's statistics before the next chunk is computed.

Linears that share an input (q/k/v, gate/up) share one H: `linear_groups` groups them.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.ir import Graph, Op, save
from edgeq.quant.numerics import np_storage_dtype, qparams
from edgeq.quant.plan import QuantPlan, is_float
from edgeq.targets.base import Granularity, QSpec


# --------------------------------------------------------------------------------------------
# Which linears, grouped by the activation they read.

@dataclass
class Linear:
    """One quantized linear layer: y = x @ W with W seen as [K, N] (K = reduction axis)."""

    op: Op
    spec: QSpec             # the plan's weight spec (slot 1)
    transposed: bool        # the stored weight is [N, K] (Gemm transB=1)

    def weight_kn(self, graph: Graph) -> np.ndarray:
        w = graph.constant(graph.inputs_of(self.op)[1]).numpy().astype(np.float32)
        return w.T if self.transposed else w

    def set_weight_kn(self, graph: Graph, w_kn: np.ndarray) -> None:
        value = graph.inputs_of(self.op)[1]
        dtype = graph.constant(value).numpy().dtype
        w = w_kn.T if self.transposed else w_kn
        graph.set_const(value, np.ascontiguousarray(w).astype(dtype))

    def to_stored(self, q: np.ndarray, scale: np.ndarray, zero: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(q, scale, zero) computed in [K, N] layout, in the stored weight's layout
        (the shapes `quantize_weight` gives for the plan's spec and `weight_key`'s axes)."""
        if not self.transposed:
            return q, scale, zero
        if scale.ndim == 2:  # blocks: [G, N] -> [N, G]
            return np.ascontiguousarray(q.T), np.ascontiguousarray(scale.T), np.ascontiguousarray(zero.T)
        return np.ascontiguousarray(q.T), scale, zero


@dataclass
class LinearGroup:
    """Quantized linears reading one activation `source` (they share one Hessian). A linear
    may read it through reshapes that keep the channel axis last (linear-to-gemm's flatten to
    2-D): `readers` are the ops reading `source` itself (the linears or those reshapes)."""

    source: str
    linears: list[Linear] = field(default_factory=list)
    readers: list[Op] = field(default_factory=list)

    @property
    def ops(self) -> list[Op]:
        return [lin.op for lin in self.linears]


# Ops that keep every row of channels intact when the channel axis stays last.
_ROW_PRESERVING = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


def _channel_source(graph: Graph, value, width: int):
    """Walk up from a linear's input through reshapes that keep `width` channels last."""
    reader = None
    while True:
        producer = graph.producer(value)
        if producer is None or producer.domain or producer.op_type not in _ROW_PRESERVING:
            return value, reader
        data = graph.inputs_of(producer)[0]
        if data is None or graph.is_const(data) or not _last_dim_is(data, width) or not _last_dim_is(value, width):
            return value, reader
        value, reader = data, producer


def _last_dim_is(value, width: int) -> bool:
    shape = value.shape
    return bool(shape) and shape[-1] == width


def linear_groups(graph: Graph, plan: QuantPlan) -> tuple[list[LinearGroup], dict[str, str]]:
    """Quantized MatMul/Gemm layers with a private 2-D float weight in slot 1, grouped by the
    activation they read, in graph order; and {op name: why it was left out} for the others
    (those keep round-to-nearest)."""
    groups: dict[str, LinearGroup] = {}
    skipped: dict[str, str] = {}
    for op_plan in plan.ops:
        op = op_plan.op
        if op.op_type not in ("MatMul", "Gemm") or op.domain or 1 not in op_plan.weights:
            continue
        ins = graph.inputs_of(op)
        weight = ins[1]
        tensor = graph.constant(weight)
        reason = None
        if op.op_type == "Gemm" and op.attr("transA", 0):
            reason = "Gemm with transA"
        elif tensor is None or len(tensor.dims) != 2 or weight.const is None:
            reason = "weight is not a 2-D initializer"
        elif graph.consumers(weight) != [op]:
            reason = "weight shared with other ops"
        elif ins[0] is None or graph.is_const(ins[0]) or not is_float(ins[0]):
            reason = "input is not a float activation"
        if reason:
            skipped[op.name] = reason
            continue
        transposed = op.op_type == "Gemm" and bool(op.attr("transB", 0))
        width = int(tensor.dims[1] if transposed else tensor.dims[0])
        source, reader = _channel_source(graph, ins[0], width)
        group = groups.setdefault(source.name, LinearGroup(source.name))
        group.linears.append(Linear(op, op_plan.weights[1], transposed))
        reader = reader or op
        if reader not in group.readers:
            group.readers.append(reader)
    order = {op: i for i, op in enumerate(graph.topo_order())}
    return sorted(groups.values(), key=lambda g: order[g.linears[0].op]), skipped


# --------------------------------------------------------------------------------------------
# Streaming the layer inputs.

@dataclass
class InputStats:
    """Second moment of one layer input over the calibration tokens."""

    hessian: np.ndarray          # float64 [K, K]: 2/n * X^T X
    abs_mean: np.ndarray | None  # float64 [K]: mean |x| per channel (when asked for)
    tokens: int


class ActivationStream:
    """The float graph in ONNX Runtime, able to return any of its tensors per calibration
    sample. The graph is saved once (weights to a side file, memory-mapped and fed to ORT)."""

    def __init__(self, graph: Graph, data, threads: int = 0):
        from edgeq.calibration.collect import _FloatModel, _load_model

        self.data = data
        self._tmp = tempfile.TemporaryDirectory(prefix="edgeq-rounding-")
        path = Path(self._tmp.name) / "model.onnx"
        save(graph, path, external_data=True)
        proto, base_dir = _load_model(path)
        self._model = _FloatModel(proto, base_dir, threads)
        self.passes = 0

    def samples(self, names: Sequence[str]) -> Iterator[list[np.ndarray]]:
        """Per calibration sample, the requested tensors as float32 [tokens, channels]."""
        run = self._model.runner(list(names))
        self.passes += 1
        for feed in self.data:
            yield [np.asarray(a, np.float32).reshape(-1, a.shape[-1]) for a in run(feed)]

    def substitute(self, name: str, array: np.ndarray) -> bool:
        """Feed `array` for the weight `name` from now on (e.g. its quantized value, so later
        layers see the error of earlier ones); False if that weight is not fed but inline."""
        weights = self._model.weights
        if name not in weights or weights[name].shape != array.shape:
            return False
        weights[name] = np.ascontiguousarray(array, dtype=weights[name].dtype)
        return True

    def close(self) -> None:
        self._model = None
        self._tmp.cleanup()

    def __enter__(self) -> "ActivationStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def hessian_chunks(groups: Sequence[LinearGroup], graph: Graph, budget_bytes: int) -> list[list[LinearGroup]]:
    """Consecutive groups whose float64 Hessians together fit `budget_bytes` (at least one each)."""
    chunks: list[list[LinearGroup]] = []
    used = budget_bytes + 1
    for group in groups:
        k = input_width(graph, group)
        size = 8 * k * k
        if used + size > budget_bytes and (not chunks or chunks[-1]):
            chunks.append([])
            used = 0
        chunks[-1].append(group)
        used += size
    return [c for c in chunks if c]


def input_width(graph: Graph, group: LinearGroup) -> int:
    lin = group.linears[0]
    dims = graph.constant(graph.inputs_of(lin.op)[1]).dims
    return int(dims[1] if lin.transposed else dims[0])


def input_statistics(stream: ActivationStream, names: Sequence[str], *, abs_mean: bool = False
                     ) -> dict[str, InputStats]:
    """H (and mean |x|) of each named tensor over every calibration sample, in one pass."""
    names = list(dict.fromkeys(names))
    sums: dict[str, np.ndarray] = {}
    abs_sums: dict[str, np.ndarray] = {}
    tokens = defaultdict(int)
    for arrays in stream.samples(names):
        for name, x in zip(names, arrays):
            gram = x.T @ x  # float32 GEMM per sample, accumulated in float64
            if name in sums:
                sums[name] += gram
            else:
                sums[name] = gram.astype(np.float64)
            if abs_mean:
                part = np.abs(x).sum(axis=0, dtype=np.float64)
                abs_sums[name] = abs_sums[name] + part if name in abs_sums else part
            tokens[name] += x.shape[0]
        del arrays
    out = {}
    for name in names:
        n = max(tokens[name], 1)
        hessian = sums.pop(name)
        hessian *= 2.0 / n
        out[name] = InputStats(hessian, abs_sums[name] / n if abs_mean else None, tokens[name])
    return out


_COLUMNS_PER_GEMM = 8192

# Range shrink ratios tried per output channel and group (AWQ's grid: max_shrink 0.5, 20 steps).
CLIP_RATIOS = tuple(1.0 - i / 20 for i in range(11))   # 1.0, 0.95, ..., 0.5


# --------------------------------------------------------------------------------------------
# Quantization helpers in the [K, N] layout (K = reduction axis, N = output channels).

def quantize_kn(w: np.ndarray, spec: QSpec, clip_ratio: float | np.ndarray = 1.0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`quantize_weight` for a [K, N] weight: blocks along K, channels along N."""
    from edgeq.quant.numerics import quantize_weight

    if spec.granularity == Granularity.BLOCK:
        spec = spec.replace(axis=0)
    return quantize_weight(w, spec, channel_axis=1, clip_ratio=clip_ratio)


def dequantize_kn(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: QSpec) -> np.ndarray:
    """The float weight [K, N] that DequantizeLinear gives for `quantize_kn`'s output."""
    k = q.shape[0]
    if spec.granularity == Granularity.BLOCK:
        scale = np.repeat(scale, spec.block_size, axis=0)[:k]
        zero = np.repeat(zero, spec.block_size, axis=0)[:k]
    return (q.astype(np.float32) - np.asarray(zero).astype(np.float32)) * np.asarray(scale, np.float32)


def output_errors(hessian: np.ndarray, w: np.ndarray, *approximations: np.ndarray) -> list[float]:
    """Relative output error of replacing w by each approximation on the calibration inputs:
    tr(E^T H E) / tr(W^T H W), E = w_q - w (all [K, N]); one GEMM for all of them."""
    h = hessian.astype(np.float32)
    sums = np.zeros(1 + len(approximations))
    step = max(1, _COLUMNS_PER_GEMM // (1 + len(approximations)))
    for start in range(0, w.shape[1], step):  # bounded temporaries for wide layers (LM head)
        cols = slice(start, start + step)
        part = w[:, cols].astype(np.float32)
        stacked = np.concatenate([part, *[(a[:, cols] - part) for a in approximations]], axis=1)
        per_column = np.sum((h @ stacked) * stacked, axis=0, dtype=np.float64)
        sums += per_column.reshape(1 + len(approximations), -1).sum(axis=1)
    den = float(sums[0])
    return [float(v) / den if den > 0 else float(v) for v in sums[1:]]


# --------------------------------------------------------------------------------------------
# GPTQ (Frantar et al., 2023): column-by-column rounding with Hessian-based error compensation.

def gptq_quantize(w: np.ndarray, hessian: np.ndarray, spec: QSpec, *, damp: float = 0.01,
                  act_order: bool = False, block: int = 128, clip_ratios: Sequence[float] = (1.0,),
                  full_range: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round w [K, N] (K = reduction axis) to `spec` minimising tr(E^T H E).

    Rows of w (input channels) are rounded one at a time; each row's rounding error, scaled
    by the inverse Hessian (its upper Cholesky factor U), is spread over the rows not yet
    rounded, lazily in blocks of `block` rows (GPTQ's "lazy batch" updates).

    Quantization parameters, as GPTQ computes them:
    - tensor / channel granularity: from the whole original weight, before rounding;
    - block granularity (groups of g rows along K): from the group's current (already
      error-compensated) rows when rounding reaches the group's first row; with `act_order`
      the groups are static instead: from the original weight, per contiguous group, so the
      blocks DequantizeLinear reads stay contiguous along K while rows are rounded in order
      of decreasing Hessian diagonal.

    With several `clip_ratios`, each set of parameters (per output channel) is the one among
    the ranges shrunk by those ratios whose rounding error, weighted by the Hessian diagonal
    (sum_k H_kk d_k^2), is lowest. `full_range` (signed symmetric specs) also tries mapping the
    value of largest magnitude to qmin (-8 for int4: 16 levels instead of 15, the scale then
    carries the sign, as ONNX Runtime's own int4 quantizer does).

    Channels that never fire (H_kk = 0) keep their rounded-to-nearest value and spread no
    error. Returns (q, scale, zero) shaped like `quantize_weight`'s for [K, N]: q [K, N],
    scale/zero () / [N] / [ceil(K/g), N].
    """
    w = np.array(w, dtype=np.float32, copy=True)
    rows, cols = w.shape
    h = np.array(hessian, dtype=np.float64, copy=True)
    if h.shape != (rows, rows):
        raise ValueError(f"Hessian {h.shape} does not match weight {w.shape}")
    dead = np.diag(h) <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0

    blocked = spec.granularity == Granularity.BLOCK
    group = int(spec.block_size) if blocked else 0
    n_groups = -(-rows // group) if blocked else 0
    dtype = np_storage_dtype(spec)
    diag = np.diag(h).astype(np.float32)
    ratios = tuple(clip_ratios)

    def params(part: np.ndarray, weights: np.ndarray):
        return search_params(part, weights, spec, ratios, full_range)

    if spec.granularity == Granularity.TENSOR:
        s, z = params(w.reshape(-1, 1), np.repeat(diag, cols))
        scale, zero = s.reshape(()), z.reshape(())
    elif spec.granularity == Granularity.CHANNEL:
        scale, zero = params(w, diag)
    else:
        scale = np.zeros((n_groups, cols), np.float32)
        zero = np.zeros((n_groups, cols), dtype)
        if act_order:  # static groups from the original weight
            for g in range(n_groups):
                rows_g = slice(g * group, (g + 1) * group)
                scale[g], zero[g] = params(w[rows_g], diag[rows_g])

    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(rows)
    w = w[perm]
    h = h[np.ix_(perm, perm)]
    h[np.diag_indices(rows)] += damp * float(np.mean(np.diag(h)))
    u = _inverse_cholesky_upper(h).astype(np.float32)
    del h

    if blocked and not act_order:  # groups must not straddle blocks: a multiple of the group
        block = group * max(1, round(block / group))
    q_rows = np.empty((rows, cols), np.float32)
    qmin, qmax = np.float32(spec.qmin), np.float32(spec.qmax)
    for i1 in range(0, rows, block):
        i2 = min(i1 + block, rows)
        w1 = w[i1:i2]  # a view: updated in place
        err1 = np.empty((i2 - i1, cols), np.float32)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            source = perm[row]
            if blocked:
                g = source // group
                if not act_order and row % group == 0:
                    scale[g], zero[g] = params(w1[i:i + group], diag[row:row + group])
                s, z = scale[g], zero[g].astype(np.float32)
            else:
                s, z = scale, np.asarray(zero).astype(np.float32)
            x = w1[i]
            qi = np.clip(np.round(x / s) + z, qmin, qmax)
            q_rows[row] = qi
            e = (x - (qi - z) * s) / u1[i, i]
            if i + 1 < i2 - i1:
                w1[i + 1:] -= np.outer(u1[i, i + 1:], e)
            err1[i] = e
        if i2 < rows:
            w[i2:] -= u[i1:i2, i2:].T @ err1
    q = np.empty_like(q_rows)
    q[perm] = q_rows
    return q.astype(dtype), scale.astype(np.float32), zero.astype(dtype)


def search_params(part: np.ndarray, weights: np.ndarray, spec: QSpec, ratios: Sequence[float] = (1.0,),
                  full_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per column of `part` [rows, N]: the range shrunk by the ratio (and,
    with `full_range`, the signed 16-level mapping) whose rounding error sum_k weights_k d_k^2
    is lowest. One ratio and no full_range: exactly `qparams` of the column's min and max."""
    lo, hi = part.min(axis=0), part.max(axis=0)
    if len(ratios) == 1 and not full_range:
        return qparams(lo * ratios[0], hi * ratios[0], spec)
    signed_full = full_range and spec.symmetric and spec.signed and spec.fixed is None and not spec.scale_pow2
    extreme = np.where(-lo >= hi, lo, hi).astype(np.float64)  # the signed value of largest magnitude
    best = None
    for ratio in ratios:
        candidates = [qparams(lo * ratio, hi * ratio, spec)]
        if signed_full:
            s = (extreme * ratio / spec.qmin).astype(np.float32)
            s = np.where(s != 0, s, np.float32(2.0**-24))
            candidates.append((s, np.zeros_like(candidates[0][1])))
        for s, z in candidates:
            zf = z.astype(np.float32)
            q = np.clip(np.round(part / s) + zf, spec.qmin, spec.qmax)
            d = part - (q - zf) * s
            err = weights.astype(np.float32) @ (d * d)
            if best is None:
                best = [err, s.astype(np.float32).copy(), np.array(z, copy=True)]
            else:
                better = err < best[0]
                best[0] = np.where(better, err, best[0])
                best[1] = np.where(better, s, best[1]).astype(np.float32)
                best[2] = np.where(better, z, best[2]).astype(z.dtype)
    return best[1], best[2]


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper triangular U with U^T U = H^-1 (GPTQ's Hinv), adding damping if H is not
    numerically positive definite. With J the reversal permutation and J H J = L L^T,
    U = J L^-1 J: one Cholesky factorisation and one triangular inverse."""
    flip = np.arange(len(h))[::-1]
    reversed_h = h[np.ix_(flip, flip)]
    extra = 0.0
    mean_diag = float(np.mean(np.diag(h)))
    for _ in range(6):
        try:
            lower = np.linalg.cholesky(reversed_h + extra * np.eye(len(h)))
            break
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-4 * mean_diag)
    else:
        raise np.linalg.LinAlgError("the layer's input Hessian is not positive definite even with damping")
    inverse = np.tril(np.linalg.inv(lower))
    return inverse[np.ix_(flip, flip)]
