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
  value path is not pure data movement the fold is refused and only the online Hadamard is used.
  Through a KV cache (`present = Concat(past, new)`, a graph output) the fold stays and the cache
  keeps the float basis: the new values are rotated back per head before the Concat and the
  attention output is rotated per head after it (two online per-head Hadamards of the new
  tokens only), so the cache inputs and outputs are the float model's.
- **queries and keys** (`qk=True`): an online per-head Hadamard on q and k of every
  attention score MatMul (q H (k H)^T = q k^T), after RoPE so it cannot be folded.

The online Hadamards are `Reshape -> (Einsum on the last axis, Transpose)* -> Einsum -> Reshape`,
one Einsum per Kronecker factor (H = F1 (x) F2 ...; 1536 = 12 (x) 128 costs 140 MACs per element
instead of 1536 for a dense MatMul); contracting only last axes leaves the output in a cycled
axis order, a permutation P folded into the weights with H (x H P is as orthogonal as x H).
They stay float (high precision): their input is exactly the outlier-laden activation the
rotation is there to fix, so quantizing it would reintroduce the error. Einsum has no integer
kernel on the x86 targets, so select-precision keeps them high without any special case.

Layout: this module holds the pass (its options, planning and driver); beside it, `structure`
and `attention` find what can be rotated (by patterns), `smoothing_search` chooses SmoothRot's
smoothing, `weights` transforms the weights and `edits` makes the graph edits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from typing import Literal

import numpy as np

from edgeq.calibration.layer_inputs import ActivationStream
from edgeq.errors import EdgeqError
from edgeq.frontend.patterns import find_roles
from edgeq.ir import Graph, Op, Value
from edgeq.passes.hadamard_rotation.attention import (match_value_path, qk_head_dim, reads_attention,
                                                      score_matmuls)
from edgeq.passes.hadamard_rotation.edits import insert_cache_fold, insert_online, insert_qk, make_scale_free
from edgeq.passes.hadamard_rotation.smoothing_search import PROBE_CHUNK, activation_samples, search_smoothing
from edgeq.passes.hadamard_rotation.structure import (Linear, Refuse, Stream, linear_groups, match_stream,
                                                      norm_gain, scalable_producer)
from edgeq.passes.hadamard_rotation.weights import WeightPlan
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.pipeline.artifacts import CALIBRATION_DATA, ROTATION, ROTATION_DECLINED
from edgeq.quant.hadamard import HadamardOrderError, Rotation, factor_orders
from edgeq.registry import register_pass
from edgeq.targets.base import Granularity, QSpec


NAME = "hadamard-rotation"


class RotationError(EdgeqError):
    """The graph has no structure the rotation pass can rotate exactly."""


@dataclass
class _Online:
    """An explicit Hadamard before a group of linears reading x (optionally smoothed first:
    x / s, with s folded into the readers and 1/s into x's producer or an explicit Mul)."""

    x: Value
    ops: list[Op]
    rotation: Rotation
    attention: bool = False
    smooth: np.ndarray | None = None
    fold: Linear | None = None


@dataclass
class _CacheFold:
    """A per-head V/o_proj fold whose value path runs through a KV cache (see insert_cache_fold)."""

    context: Value          # o_proj's input (the merged attention output)
    o_proj: Op
    caches: list[Op]        # the Concat(past, new) ops on the value path
    block: np.ndarray       # H (one head's rotation, dense)
    rows: int


@dataclass
class RotationSummary:
    """What the pass did (ctx.artifacts[ROTATION]): the mode, the orders, and every
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
                 activation_spec: QSpec | None = None, weight_spec: QSpec | None = None,
                 only_with_stream: bool = False, online_op: Literal["Einsum", "MatMul"] = "Einsum"):
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
        takes them from the target and options).
        only_with_stream: rotate only a graph whose residual stream folds (mode 'auto'); any
        other graph is left as it is, with the reason in the stats (`no_stream`) and in
        ctx.artifacts[ROTATION_DECLINED] (the target's default for W8A8 on x86: folding costs
        almost no run time, online Hadamards before every linear group do).
        online_op: the op the online Hadamards are written as (Target.online_rotation_op):
        Einsum stays float on every target; MatMul is quantized like a linear (NPUs)."""
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
        self._cache_folds: list[_CacheFold] = []      # per run: folds through a KV cache
        self.activation_spec = activation_spec or QSpec("uint8", symmetric=False)
        self.weight_spec = weight_spec or QSpec("int8", symmetric=True, granularity=Granularity.CHANNEL)
        self.random_signs = random_signs
        self.max_factor = max_factor
        self.only_with_stream = only_with_stream
        if online_op not in ("Einsum", "MatMul"):
            raise ValueError(f"unknown online rotation op {online_op!r}")
        self.online_op = online_op

    @classmethod
    def from_options(cls, options, target) -> "HadamardRotation":
        from edgeq.quant.plan import Scheme, rotates

        rotate = rotates(options, target)
        if rotate == "no" or target is None:
            return cls(enabled=rotate != "no")
        rule = Scheme.resolve(target, options).rules.get("MatMul")
        activation = rule.activations[0] if rule is not None and rule.activations else None
        weight = rule.weight if rule is not None else None
        # q/k rotations only change the scores' quantization: they pay where q and k are 8-bit,
        # and under float or 16-bit activations are two products per layer for nothing.
        eight_bit = activation is not None and not activation.is_float and activation.bits <= 8
        online = options.online_rotations
        return cls(enabled=True, activation_spec=activation, weight_spec=weight,
                   smooth_grid=(0.0, 0.5, 0.7, 0.85) if activation is not None else (),
                   only_with_stream=rotate == "if-stream" or not online, qk=eight_bit and online,
                   online_op=target.online_rotation_op,
                   online_mlp=online, attention="fold+online" if online else "fold")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if not self.enabled:
            return PassResult(graph, False, {"rotated": 0})
        self._cache_folds = []
        roles = find_roles(graph)
        plan = WeightPlan(graph)
        stream: Stream | None = None
        why_not_stream = ""
        if self.mode in ("auto", "stream"):
            try:
                stream = match_stream(graph, roles)
                factor_orders(stream.width, self.max_factor)
            except (Refuse, HadamardOrderError) as err:
                why_not_stream = str(err)
                stream = None
                if self.mode == "stream":
                    raise RotationError(f"cannot rotate the residual stream: {err}",
                                        fix="use mode='online' (explicit rotations before the linears)") from None
        if stream is None and self.only_with_stream:
            ctx.artifacts[ROTATION_DECLINED] = (
                f"not rotated: the graph has no pre-norm residual stream to fold a rotation into "
                f"({why_not_stream or 'mode ' + self.mode}); --rotate adds online Hadamards before "
                "every linear group instead, often more accurate but slower (MiniLM W8A8 on ONNX Runtime's "
                "CPU provider: cosine 0.9965 -> 0.9984, int8 speed-up over float 1.6x -> 1.0x)")
            return PassResult(graph, False, {"rotated": 0, "no_stream": 1})
        summary = RotationSummary(mode="stream" if stream is not None else "online")
        if stream is None and why_not_stream:
            summary.notes.append(f"residual stream not folded: {why_not_stream}")
        online: list[_Online] = []
        if stream is not None:
            self._plan_stream(graph, stream, ctx, plan, summary)
            handled = {r.op for n in stream.norms for r in n.readers}
            groups = {x: ops for x, ops in linear_groups(graph).items() if not set(ops) & handled}
            for x, ops in groups.items():
                writer = len(ops) == 1 and any(w.op is ops[0] for w in stream.writers)
                if not writer:
                    summary.skipped.append((x.name, "not a stream writer's input"))
                    continue
                if reads_attention(graph, x):
                    self._plan_attention(graph, x, ops, plan, summary, online)
                elif self.online_mlp:
                    self._plan_online(x, ops, plan, summary, online)
                else:
                    summary.skipped.append((x.name, "MLP down-projection input (online_mlp off)"))
        else:
            groups = linear_groups(graph)
            for x, ops in groups.items():
                if reads_attention(graph, x):
                    self._plan_attention(graph, x, ops, plan, summary, online)
                else:
                    self._plan_online(x, ops, plan, summary, online)
        scores = score_matmuls(graph) if self.qk else []
        qk_rotations = []
        for op in scores:
            try:
                qk_rotations.append((op, qk_head_dim(graph, op)))
            except (Refuse, HadamardOrderError) as err:
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
                make_scale_free(graph, norm)
        for fold in self._cache_folds:
            context = insert_cache_fold(graph, fold.context, fold.o_proj, fold.caches, fold.block, fold.rows,
                                        self.online_op)
            for entry in online:
                if entry.x is fold.context:
                    entry.x = context
        self._cache_folds.clear()
        for entry in online:
            scale = None if entry.smooth is None or entry.fold is not None else 1.0 / entry.smooth
            insert_online(graph, entry.x, entry.ops, entry.rotation, inv_scale=scale, op_type=self.online_op)
        for op, head_dim in qk_rotations:
            insert_qk(graph, op, head_dim, self.online_op)
        ctx.artifacts[ROTATION] = summary
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

    def _plan_stream(self, graph: Graph, stream: Stream, ctx: PassContext, plan: WeightPlan,
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
            gain = norm_gain(graph, norm, stream.width)
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

    def _plan_online(self, x: Value, ops: list[Op], plan: WeightPlan, summary: RotationSummary,
                     online: list, attention: bool = False) -> None:
        width = plan.weight_of(ops[0]).const.dims[0]
        try:
            rotation = self._online_rotation(width)
        except HadamardOrderError as err:
            summary.skipped.append((x.name, str(err)))
            return
        online.append(_Online(x, ops, rotation, attention=attention))
        summary.online.append((x.name, tuple(f.shape[0] for f in rotation.factors)))

    def _plan_attention(self, graph: Graph, x: Value, ops: list[Op], plan: WeightPlan,
                        summary: RotationSummary, online: list) -> None:
        if self.attention == "none":
            summary.skipped.append((x.name, "attention output (attention rotation off)"))
            return
        if self.attention in ("fold", "fold+online") and len(ops) == 1:
            try:
                caches: list[Op] = []
                value_linear, head_dim = match_value_path(graph, x, ops[0], caches)
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
                if caches:  # the cache stays unrotated: new values rotated back, the context rotated
                    self._cache_folds.append(_CacheFold(x, ops[0], caches, per_head.block_matrix(np.float64), rows))
                    summary.notes.append(f"{x.name}: per-head fold through the KV cache (cache kept unrotated)")
                if self.attention == "fold":
                    return
            except (Refuse, HadamardOrderError) as err:
                if self.attention == "fold":  # fold only: no online Hadamard in its place
                    summary.skipped.append((x.name, f"per-head fold refused ({err})"))
                    return
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
        with ActivationStream(graph, list(islice(data, self.smooth_samples))) as stream, \
                ctx.task("smoothing probes", len(candidates), "group") as advance:
            for start in range(0, len(candidates), PROBE_CHUNK):
                chunk = candidates[start:start + PROBE_CHUNK]
                samples = activation_samples(stream, [e.x.name for e in chunk])
                for entry in chunk:
                    advance()
                    weights = [np.asarray(graph.inputs_of(op)[1].const.numpy(), np.float64) for op in entry.ops]
                    alpha, scale = search_smoothing(samples.pop(entry.x.name), weights, entry.rotation,
                                                    self.smooth_grid, self.activation_spec, self.weight_spec)
                    summary.smoothing.append((entry.x.name, alpha))
                    if alpha:
                        entry.smooth = scale
                        entry.fold = scalable_producer(graph, entry.x)


def _first_column_signs(rotation: Rotation) -> np.ndarray:
    """Row signs making the first column of kron(factors) positive."""
    signs = np.ones(1)
    for factor in rotation.factors:
        signs = np.kron(signs, np.sign(factor[:, 0]).astype(np.float64))
    return np.tile(signs, rotation.blocks)
