"""Hadamard rotation (QuaRot / SpinQuant computational invariance): spread activation outliers
over all channels with orthogonal Hadamard matrices folded into the weights, so that per-tensor
activation quantization loses less. Before quantization the rotated model computes the same
function (exactly in real arithmetic; float32 rounding apart: 2e-6 relative on SmolLM2).

Two ways to rotate, chosen by the graph's structure (found by patterns, never by names):

- **stream** (pre-norm decoders, Llama/SmolLM2): the residual stream x becomes x Q, Q = D H a
  randomized Hadamard of the hidden size (D random signs). RMSNorm is invariant
  (||x Q|| = ||x||) once its gain gamma is fused into the linears that read it, so:
  embedding tables E -> E Q; every linear reading a norm (q/k/v, gate/up, lm_head)
  W -> Q^T diag(gamma) W and the norm's gamma Mul is removed; every linear writing to the
  stream (o_proj, down_proj) W -> W Q, bias b -> b Q. Nothing is added to the graph for it.
  Pre-norm *LayerNorm* streams (GPT-2/OPT style, fused LayerNormalization) are handled too:
  with Q's first column constant (no random signs), 1^T Q = sqrt(d) e_0^T, so mean-centring
  in the rotated basis is zeroing channel 0 and LayerNorm(x) Q = RMSNorm((x Q) * [0, 1, .., 1])
  (mean of squares over all d channels, as LayerNorm's variance); the LayerNormalization
  becomes that masked RMSNorm, gamma goes into the readers and beta becomes their bias beta W.
- **online** (everything else, in particular post-norm encoders such as BERT/MiniLM): the
  input x of each group of linears reading the same activation is rotated by an explicit
  x -> x H (H a Hadamard of x's width) and H^T is folded into their weights. This is exact
  whatever produced x, so LayerNorm's mean-centring, gamma and beta stay as they are.
  A post-norm stream cannot be rotated by folding alone: the LayerNorm output *is* the
  stream (it feeds the residual Add), so its gamma would have to act in the rotated basis,
  i.e. become a dense d x d matrix Q^T diag(gamma) Q after every LayerNorm (d^2 MACs per
  token per norm, float) - the online form costs d (f1 + f2) per token instead.

In both modes:
- **MLP down-projection**: the activation between the MLP's up and down projections has its
  own outliers and no norm to fold into, so it gets an online Hadamard (QuaRot's
  "online Hadamard before down_proj"), H^T folded into down_proj.
- **smoothing before the online Hadamards** (SmoothRot): LLM MLPs have "massive activations",
  a few channels of a few tokens hundreds of times larger than the rest; a rotation spreads
  them over the whole token, whose norm then sets the static per-tensor range. Dividing x
  per channel by s = max|x|^a / max|W|^(1-a) first (s into the readers, 1/s into SwiGLU's up
  projection or an explicit float Mul), with a chosen per group by simulated quantized error
  on calibration samples (0 = none), removes most of that (+8..12 dB on SmolLM2's worst layers).
- **attention** (`attention="fold+online"`, the default): a per-head Hadamard of the head
  dimension is folded into the value projection's output columns and the output projection's
  input rows (V -> V (I (x) H_hd) commutes with softmax(QK^T) V and with the head reshapes and
  transposes), then an online Hadamard of o_proj's full input mixes across heads. Where the
  value path is not pure data movement (a KV cache Concat: the cache outputs would change) the
  fold is refused and only the online Hadamard is used.
- **queries and keys** (`qk=True`): an online per-head Hadamard on q and k of every
  attention score MatMul (q H (k H)^T = q k^T), after RoPE so it cannot be folded.

The online Hadamards are `Reshape -> (Einsum on the last axis, Transpose)* -> Einsum -> Reshape`,
one Einsum per Kronecker factor (H = F1 (x) F2 ...; 1536 = 12 (x) 128 costs 140 MACs per element
instead of 1536 for a dense MatMul); contracting only last axes leaves the output in a cycled
axis order, a permutation P folded into the weights with H (x H P is as orthogonal as x H).
They stay float (high precision): their input is exactly the outlier-laden activation the
rotation is there to fix, so quantizing it would reintroduce the error. Einsum has no integer
kernel on the x86 targets, so select-precision keeps them high without any special case.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import islice
from typing import Literal

import numpy as np
import onnx

from edgeq.errors import EdgeqError
from edgeq.quant.hadamard import HadamardOrderError, Rotation, factor_orders
from edgeq.quant.linears import ActivationStream
from edgeq.ir import Graph, Op, Value
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.frontend.patterns import DATA_MOVEMENT, Role, Roles, find_roles
from edgeq.registry import register_pass
from edgeq.targets.base import Granularity, QSpec

CALIBRATION_DATA = "calibration-data"

NAME = "hadamard-rotation"


class RotationError(EdgeqError):
    """The graph has no structure the rotation pass can rotate exactly."""


class _Refuse(Exception):
    """A structure does not match; the message says why (reported, or raised as RotationError)."""


@dataclass
class _Linear:
    """MatMul(x, W) [+ Add(b)] with W a private [in, out] initializer."""

    op: Op
    weight: Value
    bias_op: Op | None = None
    bias: Value | None = None

    def output(self, graph: Graph) -> Value:
        return graph.outputs_of(self.bias_op or self.op)[0]


@dataclass
class _Norm:
    """A scale-invariant normalisation reading the stream, and the linears reading it."""

    ops: list[Op]
    output: Value
    normed: Value                  # output before the gain
    gamma_op: Op | None            # Mul(gamma, normed) of a decomposed RMSNorm
    gamma: Value | None
    fused: Op | None               # RMSNormalization / SimplifiedLayerNormalization (gain = input 1)
    readers: list[_Linear] = field(default_factory=list)
    beta: Value | None = None      # LayerNormalization's bias (pre-norm LayerNorm streams)
    layer_norm: bool = False       # centring LayerNorm: rewritten as RMSNorm of the masked rotated stream
    bias_adds: list[tuple[Op, np.ndarray]] = field(default_factory=list)  # (reader, beta W) without a bias


@dataclass
class _Stream:
    width: int
    embeddings: list[Value]        # tables [vocab, width]
    values: list[Value]
    norms: list[_Norm]
    writers: list[_Linear]


@dataclass
class _Online:
    """An explicit Hadamard before a group of linears reading x (optionally smoothed first:
    x / s, with s folded into the readers and 1/s into x's producer or an explicit Mul)."""

    x: Value
    ops: list[Op]
    rotation: Rotation
    attention: bool = False
    smooth: np.ndarray | None = None
    fold: _Linear | None = None


@dataclass
class RotationSummary:
    """What the pass did (ctx.artifacts['hadamard-rotation']): the mode, the orders, and every
    structure it left alone with the reason."""

    mode: str
    stream_order: int | None = None
    stream_factors: tuple[int, ...] = ()
    online: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)   # (input, factors)
    attention_folds: list[tuple[str, int]] = field(default_factory=list)     # (v weight, head dim)
    smoothing: list[tuple[str, float]] = field(default_factory=list)          # (input, alpha) before rotation
    skipped: list[tuple[str, str]] = field(default_factory=list)              # (what, why)
    notes: list[str] = field(default_factory=list)


@register_pass
class HadamardRotation(Pass):
    name = NAME
    description = "rotate the residual stream / linear inputs by Hadamard matrices folded into weights (QuaRot)"

    def __init__(self, enabled: bool = True, *, mode: Literal["auto", "stream", "online"] = "auto",
                 online_mlp: bool = True, attention: Literal["fold", "online", "fold+online", "none"] = "fold+online",
                 qk: bool = True, random_signs: bool = True, max_factor: int = 128,
                 smooth_grid: tuple[float, ...] = (0.0, 0.5, 0.7, 0.85), smooth_samples: int = 6,
                 activation_spec: QSpec | None = None, weight_spec: QSpec | None = None):
        """mode: 'stream' folds the rotation of a pre-norm residual stream (refuses other graphs),
        'online' rotates every linear input group explicitly, 'auto' tries stream then online.
        online_mlp: online Hadamard before the MLP down-projection (stream mode; online mode
        always rotates it). attention: for the o_proj input, the per-head fold into V/o_proj,
        an online Hadamard of its full width, both (fold, then online), or nothing.
        qk: online per-head Hadamard on the query and key of every attention score MatMul
        (q H (k H)^T = q k^T; after RoPE, so it cannot be folded into weights).
        random_signs: Q = diag(+-1) H for the stream (seeded by the context's seed).
        smooth_grid: SmoothRot - before an online Hadamard that is not on an attention output,
        divide x per channel by s = max|x|^a / max|W|^(1-a) (s folded into the readers, 1/s into
        x's producer when exact, else an explicit float Mul), with a chosen per group from the
        grid (0: no smoothing) by the simulated quantized output error on `smooth_samples`
        calibration samples. It tames token outliers concentrated in few channels (the
        "massive activations" of LLM MLPs), which a rotation alone spreads over the whole
        token. Needs calibration data in the context; skipped (and noted) without.
        activation_spec/weight_spec: the quantization simulated by that search (from_options
        takes them from the target and options)."""
        if mode not in ("auto", "stream", "online"):
            raise ValueError(f"unknown rotation mode {mode!r}")
        if attention not in ("fold", "online", "fold+online", "none"):
            raise ValueError(f"unknown attention rotation {attention!r}")
        self.enabled = enabled
        self.mode = mode
        self.online_mlp = online_mlp
        self.attention = attention
        self.qk = qk
        self.smooth_grid = tuple(smooth_grid)
        self.smooth_samples = smooth_samples
        self._rotations: dict[tuple, Rotation] = {}   # shared per run (see _shared)
        self.activation_spec = activation_spec or QSpec("uint8", symmetric=False)
        self.weight_spec = weight_spec or QSpec("int8", symmetric=True, granularity=Granularity.CHANNEL)
        self.random_signs = random_signs
        self.max_factor = max_factor

    @classmethod
    def from_options(cls, options, target) -> "HadamardRotation":
        from edgeq.quant.plan import Scheme, rotates

        rotate = rotates(options, target)
        if not rotate or target is None:
            return cls(enabled=rotate)
        rule = Scheme.resolve(target, options).rules.get("MatMul")
        activation = rule.activations[0] if rule is not None and rule.activations else None
        weight = rule.weight if rule is not None else None
        return cls(enabled=True, activation_spec=activation, weight_spec=weight,
                   smooth_grid=(0.0, 0.5, 0.7, 0.85) if activation is not None else ())

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if not self.enabled:
            return PassResult(graph, False, {"rotated": 0})
        roles = find_roles(graph)
        plan = _WeightPlan(graph)
        stream: _Stream | None = None
        why_not_stream = ""
        if self.mode in ("auto", "stream"):
            try:
                stream = _match_stream(graph, roles)
                factor_orders(stream.width, self.max_factor)
            except (_Refuse, HadamardOrderError) as err:
                why_not_stream = str(err)
                stream = None
                if self.mode == "stream":
                    raise RotationError(f"cannot rotate the residual stream: {err}",
                                        fix="use mode='online' (explicit rotations before the linears)") from None
        summary = RotationSummary(mode="stream" if stream is not None else "online")
        if stream is None and why_not_stream:
            summary.notes.append(f"residual stream not folded: {why_not_stream}")
        online: list[_Online] = []
        if stream is not None:
            self._plan_stream(graph, stream, ctx, plan, summary)
            handled = {r.op for n in stream.norms for r in n.readers}
            groups = {x: ops for x, ops in _linear_groups(graph).items() if not set(ops) & handled}
            for x, ops in groups.items():
                writer = len(ops) == 1 and any(w.op is ops[0] for w in stream.writers)
                if not writer:
                    summary.skipped.append((x.name, "not a stream writer's input"))
                    continue
                if _reads_attention(graph, x):
                    self._plan_attention(graph, x, ops, plan, summary, online)
                elif self.online_mlp:
                    self._plan_online(x, ops, plan, summary, online)
                else:
                    summary.skipped.append((x.name, "MLP down-projection input (online_mlp off)"))
        else:
            groups = _linear_groups(graph)
            for x, ops in groups.items():
                if _reads_attention(graph, x):
                    self._plan_attention(graph, x, ops, plan, summary, online)
                else:
                    self._plan_online(x, ops, plan, summary, online)
        scores = _score_matmuls(graph) if self.qk else []
        qk_rotations = []
        for op in scores:
            try:
                qk_rotations.append((op, _qk_head_dim(graph, op)))
            except (_Refuse, HadamardOrderError) as err:
                summary.skipped.append((op.name, f"q/k rotation: {err}"))
        self._choose_smoothing(graph, online, ctx, summary)
        for entry in online:
            for op in entry.ops:
                if entry.smooth is not None:
                    plan.add_scale(plan.weight_of(op), 0, entry.smooth)   # diag(s) W
                plan.add(plan.weight_of(op), 0, entry.rotation)           # H^T (.)
            if entry.smooth is not None and entry.fold is not None:       # producer / s
                plan.add_scale(entry.fold.weight, 1, 1.0 / entry.smooth)
                if entry.fold.bias is not None:
                    plan.add_scale(entry.fold.bias, 0, 1.0 / entry.smooth)
        if stream is None and not online and not summary.attention_folds:
            reasons = "; ".join([why_not_stream] + [f"{w}: {r}" for w, r in summary.skipped[:3]])
            raise RotationError(f"nothing to rotate in this graph ({reasons or 'no linear layers'})",
                                fix="the rotation pass needs transformer linears with constant weights")
        # ---- mutate: weights first (all checks are done), then the graph ----------------------
        plan.apply(graph)
        if stream is not None:
            for norm in stream.norms:
                _make_scale_free(graph, norm)
        for entry in online:
            scale = None if entry.smooth is None or entry.fold is not None else 1.0 / entry.smooth
            _insert_online(graph, entry.x, entry.ops, entry.rotation, inv_scale=scale)
        for op, head_dim in qk_rotations:
            _insert_qk(graph, op, head_dim)
        ctx.artifacts[self.name] = summary
        stats = {"rotated": 1, "stream": int(stream is not None),
                 "hidden": stream.width if stream else 0,
                 "norms_fused": len(stream.norms) if stream else 0,
                 "embeddings": len(stream.embeddings) if stream else 0,
                 "writers": len(stream.writers) if stream else 0,
                 "online_hadamards": len(online), "attention_folds": len(summary.attention_folds),
                 "qk_rotations": len(qk_rotations), "smoothed": sum(1 for _, alpha in summary.smoothing if alpha),
                 "weights_changed": len(plan.transforms), "skipped": len(summary.skipped)}
        self._rotations.clear()
        return PassResult(graph, True, stats)

    # ---- planning -------------------------------------------------------------------------

    def _plan_stream(self, graph: Graph, stream: _Stream, ctx: PassContext, plan: "_WeightPlan",
                     summary: RotationSummary) -> None:
        centring = any(n.layer_norm for n in stream.norms)
        q = Rotation.of_order(stream.width, seed=ctx.seed if self.random_signs and not centring else None,
                              max_factor=self.max_factor)
        if centring:   # first column constant: 1^T Q = sqrt(d) e_0^T, so centring = zeroing channel 0
            q = Rotation(q.factors, signs=_first_column_signs(q))
            summary.notes.append("LayerNorm stream: Q has a constant first column (no random signs); "
                                 "LayerNorm(x) Q = RMSNorm((x Q) * [0, 1, ..., 1])")
        summary.stream_order = stream.width
        summary.stream_factors = tuple(f.shape[0] for f in q.factors)
        for table in stream.embeddings:
            plan.add(table, 1, q)                       # E -> E Q
        for norm in stream.norms:
            gain = _gain(graph, norm, stream.width)
            for reader in norm.readers:
                if norm.beta is not None:                   # beta W joins the reader's bias
                    shift = np.asarray(norm.beta.const.numpy(), np.float64).reshape(-1) @ \
                        np.asarray(reader.weight.const.numpy(), np.float64)
                    if reader.bias is not None:
                        plan.add_offset(reader.bias, shift)
                    else:
                        norm.bias_adds.append((reader.op, shift))
                if gain is not None:
                    plan.add_scale(reader.weight, 0, gain)  # diag(gamma) W
                plan.add(reader.weight, 0, q)           # Q^T (.)
        for writer in stream.writers:
            plan.add(writer.weight, 1, q)               # W Q
            if writer.bias is not None:
                plan.add(writer.bias, 0, q)             # b Q

    def _plan_online(self, x: Value, ops: list[Op], plan: "_WeightPlan", summary: RotationSummary,
                     online: list, attention: bool = False) -> None:
        width = plan.weight_of(ops[0]).const.dims[0]
        try:
            rotation = self._online_rotation(width)
        except HadamardOrderError as err:
            summary.skipped.append((x.name, str(err)))
            return
        online.append(_Online(x, ops, rotation, attention=attention))
        summary.online.append((x.name, tuple(f.shape[0] for f in rotation.factors)))

    def _plan_attention(self, graph: Graph, x: Value, ops: list[Op], plan: "_WeightPlan",
                        summary: RotationSummary, online: list) -> None:
        if self.attention == "none":
            summary.skipped.append((x.name, "attention output (attention rotation off)"))
            return
        if self.attention in ("fold", "fold+online") and len(ops) == 1:
            try:
                value_linear, head_dim = _match_value_path(graph, x, ops[0])
                rows = plan.weight_of(ops[0]).const.dims[0]
                cols = value_linear.weight.const.dims[1]
                per_head = self._shared(("per-head", head_dim, cols // head_dim), lambda: Rotation.of_order(
                    head_dim, blocks=cols // head_dim, max_factor=self.max_factor))
                plan.add(value_linear.weight, 1, per_head)                  # W_v (I (x) H)
                if value_linear.bias is not None:
                    plan.add(value_linear.bias, 0, per_head)                # b_v (I (x) H)
                plan.add(plan.weight_of(ops[0]), 0,
                         Rotation(per_head.factors, rows // head_dim))      # (I (x) H)^T W_o
                summary.attention_folds.append((value_linear.weight.name, head_dim))
                if self.attention == "fold":
                    return
            except (_Refuse, HadamardOrderError) as err:
                summary.notes.append(f"{x.name}: per-head fold refused ({err}); online Hadamard instead")
        self._plan_online(x, ops, plan, summary, online, attention=True)


    def _online_rotation(self, width: int) -> Rotation:
        return self._shared(("online", width),
                            lambda: Rotation.of_order(width, max_factor=self.max_factor).last_axis_form())

    def _shared(self, key: tuple, build) -> Rotation:
        """One Rotation per shape within a run: each caches its dense block (SmolLM2's 1536 online
        Hadamard: 19 MB in float64), which 30 separate instances would hold 30 times."""
        if key not in self._rotations:
            self._rotations[key] = build()
        return self._rotations[key]

    def _choose_smoothing(self, graph: Graph, online: list[_Online], ctx: PassContext,
                          summary: RotationSummary) -> None:
        candidates = [e for e in online if not e.attention]
        if not self.smooth_grid or not candidates or not any(self.smooth_grid):
            return
        data = ctx.artifacts.get(CALIBRATION_DATA)
        if data is None:
            summary.notes.append("no calibration data: no smoothing before the online Hadamards")
            return
        # A few tensors per pass over the samples: the probes of all 60 SmolLM2 inputs together
        # would hold ~0.8 GB of float64 activations.
        with ActivationStream(graph, list(islice(data, self.smooth_samples))) as stream:
            for start in range(0, len(candidates), _PROBE_CHUNK):
                chunk = candidates[start:start + _PROBE_CHUNK]
                samples = _activation_samples(stream, [e.x.name for e in chunk])
                for entry in chunk:
                    weights = [np.asarray(graph.inputs_of(op)[1].const.numpy(), np.float64) for op in entry.ops]
                    alpha, scale = _search_smoothing(samples.pop(entry.x.name), weights, entry.rotation,
                                                     self.smooth_grid, self.activation_spec, self.weight_spec)
                    summary.smoothing.append((entry.x.name, alpha))
                    if alpha:
                        entry.smooth = scale
                        entry.fold = _scalable_producer(graph, entry.x)


_PROBE_CHUNK = 8


# ---- smoothing before an online rotation (SmoothRot) ------------------------------------------


def _activation_samples(stream, names: list[str]) -> dict[str, np.ndarray]:
    """The tensors `names` on every sample of `stream` (an edgeq.quant.linears.ActivationStream: the
    graph in ONNX Runtime, weights fed from a memory-mapped side file), float64 [tokens, channels]."""
    rows: dict[str, list[np.ndarray]] = defaultdict(list)
    for arrays in stream.samples(names):
        for name, value in zip(names, arrays):
            rows[name].append(value.astype(np.float64))
    return {name: np.concatenate(parts) for name, parts in rows.items()}


def _fake_quant_weight(w: np.ndarray, spec: QSpec) -> np.ndarray:
    from edgeq.quant.numerics import quantize_weight

    q, scale, zero = quantize_weight(w.astype(np.float32), spec, channel_axis=1)
    q = q.astype(np.float64)
    if spec.granularity == Granularity.BLOCK:
        block = int(spec.block_size)
        scale = np.repeat(scale, block, axis=0)[: w.shape[0]]
        zero = np.repeat(zero, block, axis=0)[: w.shape[0]]
    elif np.ndim(scale) == 1:
        scale, zero = scale.reshape(1, -1), zero.reshape(1, -1)
    return (q - zero.astype(np.float64)) * scale.astype(np.float64)


def _search_smoothing(x: np.ndarray, weights: list[np.ndarray], rotation: Rotation, grid: tuple[float, ...],
                      act_spec: QSpec, w_spec: QSpec) -> tuple[float, np.ndarray | None]:
    """The alpha of `grid` (0: none) whose smoothing + rotation gives the lowest simulated
    quantized output error of the group (activation range: min/max over the samples)."""
    from edgeq.quant.numerics import dequantize, qparams, quantize

    act_max = np.abs(x).max(axis=0)
    w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    probe = x[:: max(1, len(x) // 2048)]
    reference = [probe @ w for w in weights]
    best, best_err, best_scale = 0.0, np.inf, None
    for alpha in sorted(grid):
        scale = np.ones_like(act_max) if not alpha else np.clip(
            np.maximum(act_max, 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1.0 - alpha), 1e-4, 1e4)
        rotated = rotation.apply(x / scale, -1)
        s, z = qparams(rotated.min(), rotated.max(), act_spec)
        probe_rot = rotation.apply(probe / scale, -1)
        xq = dequantize(quantize(probe_rot, s, z, act_spec), s, z).astype(np.float64)
        err = 0.0
        for w, ref in zip(weights, reference):
            wq = _fake_quant_weight(rotation.apply(w * scale[:, None], 0), w_spec)
            err += float(np.sum((xq @ wq - ref) ** 2) / max(np.sum(ref**2), 1e-30))
        if err < best_err * (0.98 if alpha else 1.0):   # smoothing must earn its keep
            best, best_err, best_scale = alpha, err, (scale if alpha else None)
    return best, best_scale


def _scalable_producer(graph: Graph, x: Value) -> _Linear | None:
    """The linear whose output columns can take 1/s exactly: x = Mul(a, b) with b (or a) a
    linear's output read only by that Mul - SwiGLU's up projection."""
    producer = graph.producer(x)
    if producer is None or producer.op_type != "Mul" or producer.domain:
        return None
    ins = graph.inputs_of(producer)
    if len(ins) != 2 or any(v is None or graph.is_const(v) for v in ins) or ins[0] is ins[1]:
        return None
    for value in ins:
        if graph.consumers(value) != [producer] or graph.is_graph_output(value):
            continue
        linear = _linear_producing(graph, value)
        if linear is not None:
            return linear
    return None


def _linear_producing(graph: Graph, value: Value) -> _Linear | None:
    source = graph.producer(value)
    if source is None:
        return None
    if source.op_type == "MatMul":
        return _as_linear(graph, source)
    if source.op_type == "Add":
        data = next((i for i in graph.inputs_of(source) if i is not None and i.const is None), None)
        matmul = graph.producer(data) if data is not None else None
        linear = _as_linear(graph, matmul) if matmul is not None else None
        if linear is None:
            return None
        try:
            linear = _with_bias(graph, linear, linear.weight.const.dims[1])
        except _Refuse:
            return None
        return linear if linear.bias_op is source else None
    return None


# ---- weight transforms ------------------------------------------------------------------------


class _WeightPlan:
    """Per weight, the transforms to apply in order: ('scale', axis, vector) multiplies along the
    axis, ('rotate', axis, Rotation) right-multiplies that axis by the rotation (for W [in, out]:
    axis 0 gives Q^T W, axis 1 gives W Q). Applied once per weight in float64."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.transforms: dict[Value, list[tuple[str, int, object]]] = defaultdict(list)

    def add(self, value: Value, axis: int, rotation: Rotation) -> None:
        self.transforms[value].append(("rotate", axis, rotation))

    def add_scale(self, value: Value, axis: int, vector: np.ndarray) -> None:
        self.transforms[value].append(("scale", axis, vector))

    def add_offset(self, value: Value, vector: np.ndarray) -> None:
        self.transforms[value].append(("offset", 0, vector))

    def weight_of(self, op: Op) -> Value:
        return self.graph.inputs_of(op)[1]

    def apply(self, graph: Graph) -> None:
        for value, steps in self.transforms.items():
            graph.set_const(value, _transformed(value.const.numpy(), steps))


_SLICE_ELEMENTS = 1 << 22


def _transformed(original: np.ndarray, steps: list[tuple[str, int, object]]) -> np.ndarray:
    """The steps applied in float64; a large 2-D weight whose steps all act along one axis
    (embedding table, LM head: 28M values, 226 MB each in float64) in slices along the other."""
    axes = {axis for kind, axis, _ in steps if kind != "offset"}
    if original.ndim != 2 or original.size <= _SLICE_ELEMENTS or len(axes) != 1 or \
            any(kind == "offset" for kind, _, _ in steps):
        return _apply_steps(original, steps).astype(original.dtype)
    free = 1 - axes.pop()
    out = np.empty(original.shape, original.dtype)
    width = max(1, _SLICE_ELEMENTS // original.shape[1 - free])
    for start in range(0, original.shape[free], width):
        index = (slice(start, start + width), slice(None)) if free == 0 else (slice(None), slice(start, start + width))
        out[index] = _apply_steps(original[index], steps)
    return out


def _apply_steps(original: np.ndarray, steps: list[tuple[str, int, object]]) -> np.ndarray:
    array = np.asarray(original, dtype=np.float64)
    for kind, axis, arg in steps:
        if kind == "offset":
            array = array + np.asarray(arg, dtype=np.float64).reshape(array.shape)
        elif kind == "scale":
            shape = [1] * array.ndim
            shape[axis] = -1
            array = array * np.asarray(arg, dtype=np.float64).reshape(shape)
        else:
            array = arg.apply(array, axis)
    return array


# ---- structure ----------------------------------------------------------------------------------


def _private_const(graph: Graph, value: Value | None, reader: Op) -> bool:
    return (value is not None and value.const is not None and graph.consumers(value) == [reader]
            and not graph.is_graph_output(value) and all(v is not value for v in graph.inputs))


def _as_linear(graph: Graph, op: Op, slot_of_x: int = 0) -> _Linear | None:
    """MatMul(x, W) with W a private 2-D float initializer, as a _Linear (bias not searched)."""
    if op.op_type != "MatMul" or op.domain:
        return None
    ins = graph.inputs_of(op)
    if len(ins) != 2 or ins[0] is None or graph.is_const(ins[0]):
        return None
    w = ins[1]
    if not _private_const(graph, w, op) or len(w.const.dims) != 2 or w.const.dtype.kind != "f":
        return None
    return _Linear(op, w)


def _linear_groups(graph: Graph) -> dict[Value, list[Op]]:
    """Linears (private [in, out] weights) grouped by the activation they read."""
    groups: dict[Value, list[Op]] = defaultdict(list)
    for op in graph.topo_order():
        linear = _as_linear(graph, op)
        if linear is not None:
            groups[graph.inputs_of(op)[0]].append(op)
    return dict(groups)


def _with_bias(graph: Graph, linear: _Linear, width: int) -> _Linear:
    """Extend a linear by its bias Add (const [width]) when the MatMul feeds only that Add."""
    out = graph.outputs_of(linear.op)[0]
    readers = graph.consumers(out)
    if len(readers) == 1 and readers[0].op_type == "Add" and not graph.is_graph_output(out):
        add = readers[0]
        ins = graph.inputs_of(add)
        other = ins[1] if ins[0] is out else ins[0]
        if other is not None and other.const is not None:
            if not _private_const(graph, other, add) or tuple(other.const.dims) != (width,):
                raise _Refuse(f"bias {other.name!r} of a linear is shared or not a [{width}] vector")
            return _Linear(linear.op, linear.weight, add, other)
    return linear


def _match_stream(graph: Graph, roles: Roles) -> _Stream:
    """The residual stream of a pre-norm decoder: embedding -> (norm -> readers; Add writer)* ->
    final norm -> readers. Raises _Refuse naming the first thing that does not fit."""
    block_of = {op: block for role in (Role.RMS_NORM, Role.LAYER_NORM) for block in roles.blocks.get(role, [])
                for op in block}
    norm_blocks = [b for role in (Role.RMS_NORM, Role.LAYER_NORM) for b in roles.blocks.get(role, [])]
    if not norm_blocks:
        raise _Refuse("no normalisation found")
    order = {op: i for i, op in enumerate(graph.topo_order())}
    first = min(norm_blocks, key=lambda b: min(order[op] for op in b))
    x0 = _block_input(graph, first)
    embeddings = _embedding_tables(graph, x0)
    width = embeddings[0].const.dims[1]
    values, norms, writers = [x0], [], []
    seen_norm_ops: set[Op] = set()
    while True:
        v = values[-1]
        if graph.is_graph_output(v):
            raise _Refuse(f"stream value {v.name!r} is a graph output")
        adds = []
        for reader in graph.consumers(v):
            if reader in seen_norm_ops:
                continue
            if reader in block_of:
                norm = _match_norm(graph, roles.role(reader), block_of[reader], v, width)
                seen_norm_ops.update(norm.ops)
                norms.append(norm)
            elif reader.op_type == "Add" and not any(graph.is_const(i) for i in graph.inputs_of(reader)):
                adds.append(reader)
            else:
                raise _Refuse(f"stream value {v.name!r} is read by {reader.op_type} {reader.name!r}, which "
                              "is neither a normalisation nor a residual Add")
        if not adds:
            break
        if len(adds) > 1:
            raise _Refuse(f"stream value {v.name!r} feeds {len(adds)} residual Adds")
        add = adds[0]
        ins = graph.inputs_of(add)
        other = ins[1] if ins[0] is v else ins[0]
        if ins[0] is ins[1]:
            raise _Refuse(f"residual Add {add.name!r} adds the stream to itself")
        writers.append(_match_writer(graph, other, add, width))
        values.append(graph.outputs_of(add)[0])
    last_norms = [n for n in norms if n.ops and any(r in n.ops for r in graph.consumers(values[-1]))]
    if not last_norms:
        raise _Refuse(f"the stream's last value {values[-1].name!r} is not normalised (no final norm)")
    if not writers:
        raise _Refuse("no residual Add on the stream (not a pre-norm residual network)")
    return _Stream(width, embeddings, values, norms, writers)


def _block_input(graph: Graph, block: list[Op]) -> Value:
    inside = set(block)
    sources = {v for op in block for v in graph.inputs_of(op)
               if v is not None and not graph.is_const(v) and graph.producer(v) not in inside}
    if len(sources) != 1:
        raise _Refuse("a normalisation reads more than one activation")
    return sources.pop()


def _embedding_tables(graph: Graph, v: Value) -> list[Value]:
    """The constant tables whose Gathers (summed, or scaled by a constant scalar) make v."""
    producer = graph.producer(v)
    if producer is None:
        raise _Refuse(f"the stream starts at graph input {v.name!r}, not at an embedding")
    if producer.op_type == "Gather" and not producer.domain:
        table = graph.inputs_of(producer)[0]
        if producer.attr("axis", 0) != 0 or table is None or table.const is None or len(table.const.dims) != 2:
            raise _Refuse(f"{producer.name!r} is not an embedding lookup of a 2-D table")
        if not _private_const(graph, table, producer):
            raise _Refuse(f"embedding table {table.name!r} is read elsewhere too (tied weights?)")
        return [table]
    if producer.op_type == "Add":
        ins = graph.inputs_of(producer)
        if any(graph.is_const(i) for i in ins):
            raise _Refuse(f"the stream starts at an Add with a constant ({producer.name!r})")
        tables = []
        for i in ins:
            if graph.consumers(i) != [producer]:
                raise _Refuse(f"embedding part {i.name!r} is read elsewhere too")
            tables += _embedding_tables(graph, i)
        return tables
    if producer.op_type == "Mul":
        ins = graph.inputs_of(producer)
        consts = [i for i in ins if graph.is_const(i)]
        if len(consts) == 1 and graph.constant(consts[0]).size == 1:
            data = ins[1] if ins[0] is consts[0] else ins[0]
            return _embedding_tables(graph, data)
    raise _Refuse(f"the stream starts at {producer.op_type} {producer.name!r}, not at an embedding lookup")


def _reduce_axes(graph: Graph, op: Op) -> list[int] | None:
    axes = op.attr("axes")
    ins = graph.inputs_of(op)
    if axes is None and len(ins) > 1 and ins[1] is not None:
        tensor = graph.constant(ins[1])
        axes = None if tensor is None else [int(a) for a in np.asarray(tensor.numpy()).ravel()]
    return None if axes is None else list(axes)


def _is_last_axis(axes: list[int] | None, rank: int | None) -> bool:
    if axes is None or len(axes) != 1:
        return False
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


def _match_norm(graph: Graph, role: Role | None, block: list[Op], x: Value, width: int) -> _Norm:
    """A normalisation reading stream value x that rotations commute with once its gain is
    folded out: RMSNorm (decomposed or fused). LayerNorm in a pre-norm stream is refused."""
    rank = len(x.shape) if x.shape is not None else None
    if role == Role.LAYER_NORM:
        inside = set(block)
        outputs = [v for op in block for v in graph.outputs_of(op)
                   if v is not None and any(r not in inside for r in graph.consumers(v))]
        if any(r.op_type == "Add" and not any(graph.is_const(i) for i in graph.inputs_of(r))
               for v in outputs for r in graph.consumers(v)):
            raise _Refuse(f"LayerNorm {block[0].name!r} is post-norm (its output feeds a residual Add, so "
                          "the stream carries its gamma/beta, which cannot be folded into the readers)")
        if len(block) != 1 or block[0].op_type != "LayerNormalization" or block[0].domain:
            raise _Refuse(f"LayerNorm at {block[0].name!r} is decomposed; only a fused LayerNormalization "
                          "can be rewritten for a rotated stream")
        op = block[0]
        ins = graph.inputs_of(op)
        outs = graph.outputs_of(op)
        if ins[0] is not x or not (op.attr("axis", -1) == -1 or (rank is not None and op.attr("axis") == rank - 1)):
            raise _Refuse(f"{op.name!r} does not normalise the stream's last axis")
        if any(v is not None and (graph.consumers(v) or graph.is_graph_output(v)) for v in outs[1:]):
            raise _Refuse(f"{op.name!r}: its mean/inv-std outputs are used")
        beta = ins[2] if len(ins) > 2 else None
        for const in (ins[1], beta):
            if const is not None and (not _private_const(graph, const, op) or
                                      int(np.prod(const.const.dims)) != width):
                raise _Refuse(f"{op.name!r}: gamma/beta are not private [{width}] constants")
        norm = _Norm([op], outs[0], outs[0], None, ins[1], op, beta=beta, layer_norm=True)
        _attach_readers(graph, norm, width, with_bias=True)
        return norm
    if len(block) == 1 and block[0].op_type in ("RMSNormalization", "SimplifiedLayerNormalization"):
        op = block[0]
        ins = graph.inputs_of(op)
        outs = graph.outputs_of(op)
        if ins[0] is not x or len(ins) > 2 and ins[2] is not None:
            raise _Refuse(f"{op.name!r}: unexpected inputs")
        if not (op.attr("axis", -1) == -1 or (rank is not None and op.attr("axis") == rank - 1)):
            raise _Refuse(f"{op.name!r} does not normalise the last axis")
        if any(v is not None and (graph.consumers(v) or graph.is_graph_output(v)) for v in outs[1:]):
            raise _Refuse(f"{op.name!r}: its statistics outputs are used")
        scale = ins[1]
        if not _private_const(graph, scale, op):
            raise _Refuse(f"{op.name!r}: gain is not a private constant")
        norm = _Norm([op], outs[0], outs[0], None, scale, op)
    else:
        inside = set(block)
        direct = [op for op in graph.consumers(x) if op in inside]
        pows = [op for op in direct if op.op_type == "Pow"]
        scalers = [op for op in direct if op.op_type in ("Mul", "Div")]
        if len(pows) != 1 or len(scalers) != 1 or len(direct) != 2:
            raise _Refuse(f"normalisation at {block[0].name!r} is not x * rsqrt(mean(x^2) + eps)")
        exponent = graph.constant(graph.inputs_of(pows[0])[1])
        if exponent is None or exponent.size != 1 or float(np.asarray(exponent.numpy()).ravel()[0]) != 2.0:
            raise _Refuse(f"{pows[0].name!r} is not x^2")
        means = [op for op in block if op.op_type == "ReduceMean"]
        if len(means) != 1 or not _is_last_axis(_reduce_axes(graph, means[0]), rank):
            raise _Refuse(f"normalisation at {block[0].name!r} does not reduce over the last axis only")
        if scalers[0].op_type == "Div" and graph.inputs_of(scalers[0])[0] is not x:
            raise _Refuse(f"{scalers[0].name!r} divides by the stream")
        normed = graph.outputs_of(scalers[0])[0]
        gamma_op = gamma = None
        output = normed
        readers = graph.consumers(normed)
        if len(readers) == 1 and readers[0] in inside and readers[0].op_type == "Mul":
            gamma_op = readers[0]
            ins = graph.inputs_of(gamma_op)
            gamma = ins[0] if ins[1] is normed else ins[1]
            if not _private_const(graph, gamma, gamma_op) or gamma.const.dims[-1:] != (width,) or \
                    int(np.prod(gamma.const.dims)) != width:
                raise _Refuse(f"RMSNorm gain {getattr(gamma, 'name', None)!r} is not a private [{width}] constant")
            output = graph.outputs_of(gamma_op)[0]
        if any(op in inside for op in graph.consumers(output)):
            raise _Refuse(f"RMSNorm at {block[0].name!r} has a bias (unsupported)")
        norm = _Norm(list(block), output, normed, gamma_op, gamma, None)
    _attach_readers(graph, norm, width, with_bias=False)
    return norm


def _attach_readers(graph: Graph, norm: _Norm, width: int, *, with_bias: bool) -> None:
    if graph.is_graph_output(norm.output):
        raise _Refuse(f"normalised stream {norm.output.name!r} is a graph output")
    for reader in graph.consumers(norm.output):
        linear = _as_linear(graph, reader)
        if linear is None or graph.inputs_of(reader)[0] is not norm.output:
            raise _Refuse(f"normalised stream {norm.output.name!r} is read by {reader.op_type} {reader.name!r}, "
                          "not only by linears with private weights")
        if linear.weight.const.dims[0] != width:
            raise _Refuse(f"{reader.name!r} weight has {linear.weight.const.dims[0]} rows, the stream {width}")
        if with_bias:
            linear = _with_bias(graph, linear, linear.weight.const.dims[1])
        norm.readers.append(linear)


def _match_writer(graph: Graph, value: Value, add: Op, width: int) -> _Linear:
    """The linear (MatMul [+ bias]) whose output the residual Add adds to the stream."""
    if graph.consumers(value) != [add] or graph.is_graph_output(value):
        raise _Refuse(f"residual branch {value.name!r} is read elsewhere too")
    producer = graph.producer(value)
    if producer is None:
        raise _Refuse(f"residual Add {add.name!r} adds graph input {value.name!r}")
    if producer.op_type == "Add":
        ins = graph.inputs_of(producer)
        bias = next((i for i in ins if i is not None and i.const is not None), None)
        data = next((i for i in ins if i is not bias), None)
        matmul = graph.producer(data) if data is not None and bias is not None else None
        linear = _as_linear(graph, matmul) if matmul is not None else None
        if linear is None or graph.consumers(data) != [producer]:
            raise _Refuse(f"residual branch {value.name!r} is not a linear layer's output")
        linear = _with_bias(graph, linear, width)
    else:
        linear = _as_linear(graph, producer)
        if linear is None:
            raise _Refuse(f"residual branch {value.name!r} comes from {producer.op_type} {producer.name!r}, "
                          "not from a linear with a private weight")
    if linear.weight.const.dims[1] != width:
        raise _Refuse(f"{linear.op.name!r} writes {linear.weight.const.dims[1]} channels, the stream has {width}")
    return linear


def _gain(graph: Graph, norm: _Norm, width: int) -> np.ndarray | None:
    if norm.gamma is None:
        return None
    return np.asarray(norm.gamma.const.numpy(), dtype=np.float64).reshape(width)


def _reads_attention(graph: Graph, x: Value) -> bool:
    """x is an attention context: data movement back to a MatMul of two activations."""
    value = x
    while True:
        producer = graph.producer(value)
        if producer is None:
            return False
        if producer.op_type in DATA_MOVEMENT and not producer.domain:
            value = graph.inputs_of(producer)[0]
            continue
        ins = graph.inputs_of(producer)
        return producer.op_type == "MatMul" and not any(graph.is_const(i) for i in ins)


def _single_reader(graph: Graph, value: Value, reader: Op) -> None:
    if graph.consumers(value) != [reader] or graph.is_graph_output(value):
        raise _Refuse(f"{value.name!r} is read by more than the attention value path")


def _match_value_path(graph: Graph, context: Value, o_proj: Op) -> tuple[_Linear, int]:
    """From o_proj's input back to the value projection: data movement, the attention
    MatMul(probs, V), data movement, the V linear [+ bias]. Returns (V linear, head_dim) when a
    per-head rotation of V's last axis commutes with everything on the path."""
    after: list[Op] = []          # movement ops between the attention MatMul and o_proj
    value, reader = context, o_proj
    while True:
        _single_reader(graph, value, reader)
        producer = graph.producer(value)
        if producer is None:
            raise _Refuse("attention path starts at a graph input")
        if producer.op_type == "MatMul":
            break
        if producer.op_type not in DATA_MOVEMENT or producer.domain:
            raise _Refuse(f"{producer.op_type} {producer.name!r} between attention and o_proj")
        after.append(producer)
        value, reader = graph.inputs_of(producer)[0], producer
    attention = producer
    probs, v = graph.inputs_of(attention)
    if graph.is_const(probs) or graph.is_const(v) or probs is v:
        raise _Refuse(f"{attention.name!r} is not probs x V")
    before: list[Op] = []
    value, reader = v, attention
    while True:
        _single_reader(graph, value, reader)
        producer = graph.producer(value)
        if producer is None:
            raise _Refuse("V comes from a graph input (a cache?)")
        if producer.op_type == "Concat":
            raise _Refuse("V is concatenated with a cache input; rotating it would change the cache outputs")
        if producer.op_type in ("MatMul", "Add"):
            break
        if producer.op_type not in DATA_MOVEMENT or producer.domain:
            raise _Refuse(f"{producer.op_type} {producer.name!r} on the value path")
        before.append(producer)
        value, reader = graph.inputs_of(producer)[0], producer
    if producer.op_type == "Add":
        ins = graph.inputs_of(producer)
        bias = next((i for i in ins if i is not None and i.const is not None), None)
        data = next((i for i in ins if i is not bias), None)
        if bias is None or data is None or graph.producer(data) is None:
            raise _Refuse("value path starts at an Add that is not a bias")
        linear = _as_linear(graph, graph.producer(data))
        if linear is None:
            raise _Refuse("V is not a linear layer's output")
        linear = _with_bias(graph, linear, linear.weight.const.dims[1])
        if linear.bias_op is not producer:
            raise _Refuse("V's bias Add is shared")
    else:
        linear = _as_linear(graph, producer)
        if linear is None:
            raise _Refuse("V is not a linear layer's output")
    head_dim = _last_dim(graph, v)
    if head_dim is None:
        raise _Refuse("head dimension unknown")
    width = linear.weight.const.dims[1]
    for op in reversed(before):   # forward order: V linear -> attention
        width = _check_movement(graph, op, width, head_dim)
    if width != head_dim:
        raise _Refuse(f"V reaches attention with last dim {width}, not the head dim {head_dim}")
    for op in reversed(after):    # forward order: attention -> o_proj
        width = _check_movement(graph, op, width, head_dim)
    rows = graph.inputs_of(o_proj)[1].const.dims[0]
    if width != rows or rows % head_dim:
        raise _Refuse(f"o_proj reads {rows} channels, the merged heads have {width}")
    return linear, head_dim


def _last_dim(graph: Graph, value: Value) -> int | None:
    shape = value.shape
    if shape and isinstance(shape[-1], int) and shape[-1] > 0:
        return shape[-1]
    return None


def _check_movement(graph: Graph, op: Op, width: int, block: int) -> int:
    """The last-axis width after `op`, if `op` keeps blocks of `block` channels of the last axis
    together (so a block-diagonal rotation of the last axis commutes with it); else _Refuse."""
    ins = graph.inputs_of(op)
    out = graph.outputs_of(op)[0]
    if op.op_type == "Identity":
        return width
    if op.op_type == "Transpose":
        perm = op.attr("perm")
        if perm is None or perm[-1] != len(perm) - 1:
            raise _Refuse(f"{op.name!r} moves the last axis")
        return width
    if op.op_type == "Reshape":
        target = graph.constant(ins[1])
        if target is None:
            raise _Refuse(f"{op.name!r} has a computed shape")
        last = int(np.asarray(target.numpy()).ravel()[-1])
        if last <= 0:
            last = _last_dim(graph, out) or 0
        if last <= 0 or width % block or last % block:
            raise _Refuse(f"{op.name!r} splits the last axis across the head blocks")
        return last
    if op.op_type in ("Unsqueeze", "Squeeze"):
        axes = op.attr("axes")
        if axes is None and len(ins) > 1 and ins[1] is not None:
            tensor = graph.constant(ins[1])
            axes = None if tensor is None else [int(a) for a in np.asarray(tensor.numpy()).ravel()]
        rank = len(out.shape) if op.op_type == "Unsqueeze" and out.shape is not None else (
            len(ins[0].shape) if ins[0].shape is not None else None)
        if axes is None or rank is None or any(a == -1 or a == rank - 1 for a in axes):
            raise _Refuse(f"{op.name!r} may touch the last axis")
        return width
    if op.op_type == "Expand":
        shape = graph.constant(ins[1])
        if shape is None or int(np.asarray(shape.numpy()).ravel()[-1]) not in (1, width):
            raise _Refuse(f"{op.name!r} expands the last axis")
        return width
    raise _Refuse(f"{op.op_type} {op.name!r} on the attention value path")


# ---- graph edits --------------------------------------------------------------------------------


def _make_scale_free(graph: Graph, norm: _Norm) -> None:
    """Remove the norm's gain now that the readers carry it."""
    if norm.layer_norm:
        _layer_norm_to_masked_rms(graph, norm)
        return
    if norm.fused is not None:
        scale = norm.gamma
        graph.set_const(scale, np.ones(scale.const.dims, dtype=scale.const.dtype))
        return
    if norm.gamma_op is None:
        return
    out = graph.outputs_of(norm.gamma_op)[0]
    graph.replace_all_uses(out, norm.normed)
    graph.remove_op(norm.gamma_op)
    if not graph.consumers(norm.gamma) and not graph.is_graph_output(norm.gamma):
        graph.remove_value(norm.gamma)


def _insert_online(graph: Graph, x: Value, readers: list[Op], rotation: Rotation,
                   inv_scale: np.ndarray | None = None) -> Value:
    """x -> Reshape [.., f1, .., fk] -> (Einsum on the last axis, Transpose it to the front of
    the factor axes)* -> Einsum -> Reshape [.., n]: x K P with K = kron(normalised factors) and P
    the axis cycle (`Rotation.last_axis_form`); ORT's Einsum is several times slower on any other
    axis. The readers read the result."""
    orders = [f.shape[0] for f in rotation.factors]
    width = rotation.order
    first = min(readers, key=lambda op: op.order)
    base = f"{x.name}_hadamard"
    elem = x.elem_type or onnx.TensorProto.FLOAT
    if x.shape is not None:   # rank known: keep the leading dims (Reshape's 0 copies them)
        rank = len(x.shape)
        lead: list | None = list(x.shape[:-1])
        split = graph.add_constant(f"{base}_split", np.array([0] * (rank - 1) + orders, dtype=np.int64))
        merge = graph.add_constant(f"{base}_merge", np.array([0] * (rank - 1) + [width], dtype=np.int64))
    else:                     # rank unknown: flatten the leading dims, restore x's own shape
        lead = None
        rank = 2
        split = graph.add_constant(f"{base}_split", np.array([-1] + orders, dtype=np.int64))
        merge = graph.outputs_of(graph.add_op("Shape", [x], [f"{base}_shape"], before=first))[0]
        merge.set_type(onnx.TensorProto.INT64, [None])
    y = x
    if inv_scale is not None:   # smoothing: x / s, in float like the rotation
        factor = graph.add_constant(f"{base}_smooth_inv_scale",
                                    inv_scale.astype(np.float16 if elem == onnx.TensorProto.FLOAT16 else np.float32))
        y = graph.outputs_of(graph.add_op("Mul", [x, factor], [f"{base}_smoothed"], before=first))[0]
        y.set_type(elem, None if x.shape is None else list(x.shape))
    if len(orders) > 1:
        reshape = graph.add_op("Reshape", [y, split], [f"{base}_split_out"], before=first)
        y = graph.outputs_of(reshape)[0]
        y.set_type(elem, None if lead is None else lead + orders)
    dtype = np.float16 if elem == onnx.TensorProto.FLOAT16 else np.float32
    factors = rotation.normalised_factors(dtype)
    layout = list(orders)
    n_lead = (rank - 1) if lead is not None else 1
    for step, i in enumerate(reversed(range(len(factors)))):
        factor = factors[i]
        matrix = graph.add_constant(f"{base}_factor{i}_{factor.shape[0]}", factor)
        einsum = graph.add_op("Einsum", [y, matrix], [f"{base}_{step}"], attrs={"equation": "...a,az->...z"},
                              before=first)
        y = graph.outputs_of(einsum)[0]
        y.set_type(elem, None if lead is None else lead + layout)
        if i > 0:   # bring the next factor's axis last: move the contracted one to the front
            k = len(layout)
            perm = list(range(n_lead)) + [n_lead + k - 1] + [n_lead + j for j in range(k - 1)]
            transpose = graph.add_op("Transpose", [y], [f"{base}_{step}_t"], attrs={"perm": perm}, before=first)
            layout = [layout[-1]] + layout[:-1]
            y = graph.outputs_of(transpose)[0]
            y.set_type(elem, None if lead is None else lead + layout)
    if len(orders) > 1:
        back = graph.add_op("Reshape", [y, merge], [f"{base}_out"], before=first)
        y = graph.outputs_of(back)[0]
    y.set_type(elem, None if x.shape is None else list(x.shape))
    for reader in readers:
        for slot, value in enumerate(graph.inputs_of(reader)):
            if value is x and slot == 0:
                graph.set_input(reader, slot, y)
    return y


def _score_matmuls(graph: Graph) -> list[Op]:
    """MatMul(q, k^T) of two activations whose output reaches a Softmax through scaling,
    masking and adding only."""
    found = []
    for op in graph.ops_of_type("MatMul"):
        ins = graph.inputs_of(op)
        if op.domain or len(ins) != 2 or any(v is None or graph.is_const(v) for v in ins):
            continue
        value = graph.outputs_of(op)[0]
        for _ in range(4):
            readers = graph.consumers(value)
            if len(readers) != 1:
                break
            reader = readers[0]
            if reader.op_type == "Softmax":
                found.append(op)
                break
            if reader.op_type not in ("Mul", "Div", "Add", "Where"):
                break
            value = graph.outputs_of(reader)[0]
    return found


def _qk_head_dim(graph: Graph, op: Op) -> int:
    q, kt = graph.inputs_of(op)
    head_dim = _last_dim(graph, q)
    k_shape = kt.shape
    if head_dim is None or k_shape is None or len(k_shape) < 2 or k_shape[-2] != head_dim:
        raise _Refuse("head dimension of q/k unknown")
    factor_orders(head_dim)   # raises HadamardOrderError when there is no Hadamard matrix
    return head_dim


def _insert_qk(graph: Graph, op: Op, head_dim: int) -> None:
    """q -> q H (last axis) and k^T -> H^T k^T (second-to-last axis): scores unchanged."""
    q, kt = graph.inputs_of(op)
    h = graph.add_constant(f"{op.name}_qk_hadamard", Rotation.of_order(head_dim).dense().astype(np.float32))
    targets = [(op, 0, q, "...a,az->...z"), (op, 1, kt, "...dt,dz->...zt")]
    transpose = graph.producer(kt)
    if transpose is not None and transpose.op_type == "Transpose" and not transpose.domain:
        perm = list(transpose.attr("perm") or [])
        k = graph.inputs_of(transpose)[0]
        rank = len(perm)
        if rank >= 2 and perm == list(range(rank - 2)) + [rank - 1, rank - 2] and \
                graph.consumers(k) == [transpose] and not graph.is_graph_output(k):
            # rotate k on its last axis before the transpose: ORT's Einsum is slow on axis -2
            targets[1] = (transpose, 0, k, "...a,az->...z")
    for reader, slot, value, equation in targets:
        einsum = graph.add_op("Einsum", [value, h], [f"{value.name}_hadamard"], attrs={"equation": equation},
                              before=reader)
        out = graph.outputs_of(einsum)[0]
        out.set_type(value.elem_type or onnx.TensorProto.FLOAT, value.shape)
        graph.set_input(reader, slot, out)


def _first_column_signs(rotation: Rotation) -> np.ndarray:
    """Row signs making the first column of kron(factors) positive."""
    signs = np.ones(1)
    for factor in rotation.factors:
        signs = np.kron(signs, np.sign(factor[:, 0]).astype(np.float64))
    return np.tile(signs, rotation.blocks)


def _layer_norm_to_masked_rms(graph: Graph, norm: _Norm) -> None:
    """LayerNormalization(x) on the stream, now x' = x Q with Q's first column constant:
    channel 0 of x' is sqrt(d) mean(x), the others are the centred x rotated, so
    LayerNorm(x) Q = m / sqrt(mean(m^2) + eps) with m = x' * [0, 1, ..., 1] (mean over all d
    channels, as LayerNorm's variance). gamma/beta are already in the readers."""
    op = norm.fused
    x = graph.inputs_of(op)[0]
    out = graph.outputs_of(op)[0]
    width = int(np.prod(norm.gamma.const.dims))
    dtype = norm.gamma.const.dtype
    eps = float(op.attr("epsilon", 1e-5))
    elem = x.elem_type or onnx.TensorProto.FLOAT
    base = f"{op.name}_rotated"
    mask = np.ones(width, dtype=dtype)
    mask[0] = 0
    mask_v = graph.add_constant(f"{base}_mask", mask)
    two = graph.add_constant(f"{base}_two", np.array(2.0, dtype=dtype))
    eps_v = graph.add_constant(f"{base}_eps", np.array(eps, dtype=dtype))

    def new(op_type, inputs, **attrs):
        created = graph.add_op(op_type, inputs, [f"{base}_{op_type}"], attrs=attrs or None, before=op)
        value = graph.outputs_of(created)[0]
        value.set_type(elem, x.shape if op_type not in ("ReduceMean", "Add", "Sqrt", "Reciprocal")
                       else (None if x.shape is None else list(x.shape[:-1]) + [1]))
        return value

    masked = new("Mul", [x, mask_v])
    square = new("Pow", [masked, two])
    opset = graph.model.opset_imports.get("", graph.model.opset_imports.get("ai.onnx", 17)) if graph.model else 17
    if opset >= 18:
        axes = graph.add_constant(f"{base}_axes", np.array([-1], dtype=np.int64))
        mean = new("ReduceMean", [square, axes], keepdims=1)
    else:
        mean = new("ReduceMean", [square], axes=[-1], keepdims=1)
    inv = new("Reciprocal", [new("Sqrt", [new("Add", [mean, eps_v])])])
    normed = graph.add_op("Mul", [masked, inv], [f"{base}_out"], before=op)
    result = graph.outputs_of(normed)[0]
    result.type = out.type
    graph.replace_all_uses(out, result)
    graph.remove_op(op)
    for const in (norm.gamma, norm.beta):
        if const is not None and not graph.consumers(const):
            graph.remove_value(const)
    for reader, shift in norm.bias_adds:   # the Add takes over the reader's output name
        reader_out = graph.outputs_of(reader)[0]
        name = reader_out.name
        graph.rename_value(reader_out, graph.unique_name(f"{name}_unbiased"))
        weight = graph.inputs_of(reader)[1]
        bias = graph.add_constant(f"{weight.name}_bias", shift.astype(weight.const.dtype))
        add = graph.add_op("Add", [reader_out, bias], [name], after=reader)
        biased = graph.outputs_of(add)[0]
        biased.type = reader_out.type
        for consumer, slot in graph.uses(reader_out):
            if consumer is not add:
                graph.set_input(consumer, slot, biased)
        graph.outputs = [biased if v is reader_out else v for v in graph.outputs]
