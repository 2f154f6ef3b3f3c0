"""AWQ (Lin et al., 2024): activation-aware weight quantization.

Per group of quantized linears reading one activation x[..., K] (q/k/v, gate/up, o, down, the
LM head):
1. Scaling: s = mean|x|^alpha (normalised so that max(s) * min(s) = 1), W' = diag(s) W,
   x' = x / s. alpha is searched over `alpha_grid` (0 = leave the group alone) for the lowest
   output error of the group with W' rounded to nearest and scaled back, summed over the
   group's linears: tr(E^T H E), E = diag(1/s) Q(diag(s) W) - W, H = 2/n X^T X streamed from the
   float graph (`edgeq.calibration.layer_inputs`), i.e. exactly the squared output error on every calibration
   token. 1/s is folded into the producer of x (`edgeq.quant.channel_scaling`: LayerNorm gamma/beta, RMSNorm's
   gamma Mul, a preceding linear's bias Add), or through a gated Mul (SwiGLU's act(gate) * up)
   into the columns of the linear producing one factor (AWQ's up_proj -> down_proj), or,
   failing all, into an explicit Mul before the group (counted in the stats as explicit_mul).
2. Clipping (when this pass rounds the weights, `round_weights`): per output channel and
   quantization group along K, the range is shrunk by the ratio in `clip_ratios` (1.0 .. 0.5)
   whose rounding error on the group's partial outputs, d^T H_gg d, is lowest; the weights are
   then rounded to nearest with those ranges and stored under `weight_key(...)` in
   `ctx.artifacts[WEIGHT_ROUNDING]`, which insert-qdq emits.

With --weight-rounding awq+gptq this pass only scales (round_weights=False) and the gptq pass
rounds the scaled weights, measuring its Hessians on the rescaled graph.

The scaling keeps the float function (exact up to float rounding) and changes the activation
that the group reads, so this pass runs before calibration: activation ranges are measured
on the rescaled graph. Every scale search uses the original weights and the float model's
inputs (AWQ's recipe): folding only changes the scaled tensor itself, so the Hessians of the
other groups are unaffected and the graph is streamed once.
"""

from __future__ import annotations

import numpy as np

from edgeq.errors import CalibrationError
from edgeq.quant.channel_scaling import fold_channel_scale_into_producer, insert_channel_mul
from edgeq.quant.sharing import is_owned_by_match, is_private_constant
from edgeq.calibration.layer_inputs import ActivationStream, InputStats, hessian_chunks, input_statistics
from edgeq.quant.linears import LinearGroup, linear_groups
from edgeq.quant.rounding import dequantize_kn, quantize_kn
from edgeq.ir import Graph, Op, Value
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.pipeline.artifacts import AWQ_CHOICES, CALIBRATION_DATA, QUANT_PLAN, WEIGHT_ROUNDING
from edgeq.quant.plan import QuantPlan
from edgeq.registry import register_pass
from edgeq.targets.base import Granularity, QSpec

ALPHA_GRID = tuple(i / 20 for i in range(20))          # AWQ's n_grid = 20: 0, 0.05, ..., 0.95
CLIP_RATIOS = tuple(1.0 - i / 20 for i in range(11))   # 1.0, 0.95, ..., 0.5 (max_shrink 0.5)


@register_pass
class AWQ(Pass):
    name = "awq"
    description = "AWQ: activation-aware per-channel weight scaling (folded) and clipping search"

    def __init__(self, enabled: bool = True, *, round_weights: bool = True,
                 alpha_grid: tuple[float, ...] = ALPHA_GRID, clip_ratios: tuple[float, ...] = CLIP_RATIOS,
                 explicit_mul: bool = True, search_columns: int = 8192, hessian_budget_mb: int = 256,
                 threads: int = 0):
        """explicit_mul False: a group whose 1/s cannot be folded stays unscaled.
        search_columns: the alpha search of a linear with more outputs uses this many of its
        columns, evenly spaced."""
        if not alpha_grid or any(a < 0 for a in alpha_grid):
            raise ValueError("alpha_grid: give one or more alphas >= 0")
        if not clip_ratios or any(not 0 < r <= 1 for r in clip_ratios):
            raise ValueError("clip_ratios: give ratios in (0, 1]")
        self.enabled = enabled
        self.round_weights = round_weights
        self.alpha_grid = tuple(alpha_grid)
        self.clip_ratios = tuple(clip_ratios)
        self.explicit_mul = explicit_mul
        self.search_columns = search_columns
        self.hessian_budget = hessian_budget_mb * 2**20
        self.threads = threads

    @classmethod
    def from_options(cls, options, target) -> "AWQ":
        mode = options.weight_rounding
        return cls(mode in ("awq", "awq+gptq"), round_weights=mode == "awq", threads=options.threads)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if not self.enabled:
            return PassResult(graph, False, {"groups": 0})
        plan: QuantPlan = ctx.artifact(QUANT_PLAN, self.name)
        groups, skipped = linear_groups(graph, plan)
        if not groups:
            return PassResult(graph, False, {"groups": 0, "skipped": len(skipped)})
        data = ctx.artifacts.get(CALIBRATION_DATA)
        if data is None:
            raise CalibrationError("AWQ needs calibration data to measure the layer inputs",
                                   fix="pass --calib or --calib-text (also with --activations float)")
        counts = {"scaled": 0, "folded": 0, "folded_gated": 0, "explicit_mul": 0, "left_alone": 0}
        per_group: list[dict] = []
        clip_data: list[tuple[LinearGroup, np.ndarray]] = []  # (group, Hessian pieces of x')
        with ActivationStream(graph, data, self.threads) as stream, \
                ctx.task("layer groups", len(groups), "group") as advance:
            for chunk in hessian_chunks(groups, graph, self.hessian_budget):
                stats = input_statistics(stream, [g.source for g in chunk], abs_mean=True)
                for group in chunk:
                    advance()
                    record, hessian = self._scale_group(graph, group, stats.pop(group.source), counts)
                    per_group.append(record)
                    if self.round_weights:
                        clip_data.append((group, _clip_pieces(hessian, group)))
                    del hessian
            passes = stream.passes
        stats_out = {"groups": len(groups), **counts, "skipped": len(skipped), "hessian_passes": passes,
                     "mean_error_rtn": _mean(r["rtn_error"] for r in per_group),
                     "mean_error_scaled": _mean(r["scaled_error"] for r in per_group)}
        if self.round_weights:
            rounding = ctx.artifacts.setdefault(WEIGHT_ROUNDING, {})
            errors = [self._clip_and_round(graph, group, pieces, rounding) for group, pieces in clip_data]
            stats_out["mean_error_clipped"] = _mean(e for e in errors)
            stats_out["layers"] = sum(len(g.linears) for g, _ in clip_data)
        ctx.artifacts[AWQ_CHOICES] = per_group
        return PassResult(graph, counts["scaled"] > 0 or self.round_weights, stats_out)

    # ---- scaling ------------------------------------------------------------------------
    def _scale_group(self, graph: Graph, group: LinearGroup, stats: InputStats, counts: dict
                     ) -> tuple[dict, np.ndarray]:
        """Search alpha, apply the scaling and fold 1/s; the Hessian of the group's new input."""
        weights = [lin.weight_kn(graph) for lin in group.linears]
        specs = [lin.spec for lin in group.linears]
        hessian = stats.hessian
        h32 = hessian.astype(np.float32)
        # The error sums over output channels: a wide layer (the LM head) is searched on an
        # evenly spaced subset of its columns (every quantization group spans whole columns).
        sampled = [w[:, _columns(w.shape[1], self.search_columns)] for w in weights]
        norm = sum(_quadratic(h32, w) for w in sampled)
        errors = {}
        for alpha in self.alpha_grid:
            s = _scales(stats.abs_mean, alpha)
            errors[alpha] = sum(_quadratic(h32, dequantize_kn(*quantize_kn(w * s[:, None], spec), spec)
                                           / s[:, None] - w) for w, spec in zip(sampled, specs))
        alpha = min(errors, key=lambda a: (errors[a], a))
        rtn = errors.get(0.0, _rtn_error(h32, sampled, specs))
        record = {"input": group.source, "ops": [op.name for op in group.ops], "alpha": alpha,
                  "rtn_error": rtn / norm if norm else rtn, "scaled_error": errors[alpha] / norm if norm else 0.0,
                  "fold": "none"}
        if alpha == 0.0 or errors[alpha] >= rtn:
            counts["left_alone"] += 1
            record["alpha"] = 0.0
            record["scaled_error"] = record["rtn_error"]
            return record, hessian
        s = _scales(stats.abs_mean, alpha)
        inv = (1.0 / s).astype(np.float32)
        source = graph.value(group.source)
        for lin, w in zip(group.linears, weights):
            lin.set_weight_kn(graph, w * s[:, None])
        if fold_channel_scale_into_producer(graph, source, group.readers, inv):
            counts["folded"] += 1
            record["fold"] = "producer"
        elif _fold_through_gate(graph, source, group.readers, inv):
            counts["folded_gated"] += 1
            record["fold"] = "gated linear"
        elif self.explicit_mul:
            insert_channel_mul(graph, source, group.readers, inv)
            counts["explicit_mul"] += 1
            record["fold"] = "explicit Mul"
        else:
            for lin, w in zip(group.linears, weights):
                lin.set_weight_kn(graph, w)
            counts["left_alone"] += 1
            record["alpha"], record["scaled_error"] = 0.0, record["rtn_error"]
            return record, hessian
        counts["scaled"] += 1
        # x' = x / s: H' = diag(1/s) H diag(1/s)
        return record, hessian * np.outer(inv, inv).astype(np.float64)

    # ---- clipping and rounding -------------------------------------------------------------
    def _clip_and_round(self, graph: Graph, group: LinearGroup, pieces: np.ndarray, rounding: dict) -> float:
        """Rounds every linear of the group with its best clip ratios; the group's relative error."""
        from edgeq.passes.insert_qdq import weight_key

        num = den = 0.0
        for lin in group.linears:
            w = lin.weight_kn(graph)
            ratios = _best_clip(w, lin.spec, pieces, self.clip_ratios)
            q, scale, zero = quantize_kn(w, lin.spec, clip_ratio=ratios)
            rounding[weight_key(graph, lin.op, 1, lin.spec)] = lin.to_stored(q, scale, zero)
            num += float(np.sum(_piece_errors(w - dequantize_kn(q, scale, zero, lin.spec), lin.spec, pieces)))
            den += float(np.sum(_piece_errors(w, lin.spec, pieces)))
        return num / den if den else num


def _columns(width: int, limit: int) -> slice | np.ndarray:
    if width <= limit:
        return slice(None)
    return np.linspace(0, width - 1, limit).round().astype(np.int64)


def _scales(abs_mean: np.ndarray, alpha: float) -> np.ndarray:
    if alpha == 0.0:
        return np.ones(len(abs_mean), np.float32)
    s = np.maximum(np.asarray(abs_mean, np.float64) ** alpha, 1e-4)
    s = s / np.sqrt(s.max() * s.min())
    return s.astype(np.float32)


def _quadratic(h32: np.ndarray, e: np.ndarray) -> float:
    """tr(E^T H E)."""
    e = np.asarray(e, np.float32)
    return float(np.sum((h32 @ e) * e, dtype=np.float64))


def _rtn_error(h32, weights, specs) -> float:
    return sum(_quadratic(h32, dequantize_kn(*quantize_kn(w, spec), spec) - w) for w, spec in zip(weights, specs))


def _mean(values) -> float:
    values = list(values)
    return round(float(np.mean(values)), 6) if values else 0.0


def _clip_pieces(hessian: np.ndarray, group: LinearGroup) -> np.ndarray:
    """What the clip search needs of H (float32): the diagonal blocks [G, g, g] (zero-padded)
    when the group's weights are blocked along K, else the whole H [K, K]."""
    specs = {lin.spec for lin in group.linears}
    spec = next(iter(specs))
    if len(specs) == 1 and spec.granularity == Granularity.BLOCK:
        g = int(spec.block_size)
        k = len(hessian)
        n = -(-k // g)
        padded = np.zeros((n * g, n * g), np.float32)
        padded[:k, :k] = hessian
        return np.stack([padded[i * g:(i + 1) * g, i * g:(i + 1) * g] for i in range(n)])
    return hessian.astype(np.float32)


def _piece_errors(d: np.ndarray, spec: QSpec, pieces: np.ndarray) -> np.ndarray:
    """Output error of a weight error d [K, N] per (block, output channel) [G, N] when blocked,
    per output channel [N] otherwise."""
    d = np.asarray(d, np.float32)
    if pieces.ndim == 3:
        n_blocks, g, _ = pieces.shape
        padded = np.zeros((n_blocks * g, d.shape[1]), np.float32)
        padded[:len(d)] = d
        blocks = padded.reshape(n_blocks, g, -1)
        return np.sum(np.matmul(pieces, blocks) * blocks, axis=1)
    return np.sum((pieces @ d) * d, axis=0)


def _best_clip(w: np.ndarray, spec: QSpec, pieces: np.ndarray, ratios: tuple[float, ...]):
    """Clip ratio per (block, channel) / channel / tensor with the lowest output error."""
    if spec.granularity == Granularity.BLOCK and pieces.ndim != 3:  # mixed specs: no per-block Hessian
        return 1.0
    best_err, best = None, None
    for ratio in ratios:
        d = w - dequantize_kn(*quantize_kn(w, spec, clip_ratio=ratio), spec)
        err = _piece_errors(d, spec, pieces)
        if spec.granularity == Granularity.TENSOR:
            err = np.sum(err)
        if best_err is None:
            best_err, best = err, np.full(np.shape(err), ratio, np.float32)
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best = np.where(better, np.float32(ratio), best)
    if spec.granularity == Granularity.TENSOR:
        return float(best)
    return best


def _fold_through_gate(graph: Graph, source: Value, readers: list[Op], inv: np.ndarray) -> bool:
    """x = a * b (a gated MLP: act(gate) * up) with b = MatMul(h, W_b): scale W_b's columns by
    inv, which scales x by inv exactly. Refuses unless W_b, b and x are private to the match."""
    if not is_owned_by_match(graph, source, readers):
        return False
    mul = graph.producer(source)
    if mul is None or mul.op_type != "Mul" or mul.domain:
        return False
    a, b = graph.inputs_of(mul)
    if a is None or b is None or a is b or graph.is_const(a) or graph.is_const(b):
        return False
    width = len(inv)
    for operand, other in ((b, a), (a, b)):
        linear = graph.producer(operand)
        if linear is None or linear.op_type != "MatMul" or linear.domain:
            continue
        weight = graph.inputs_of(linear)[1]
        if weight is None or weight.const is None or len(weight.const.dims) != 2 or weight.const.dims[1] != width:
            continue
        if not is_private_constant(graph, weight, linear) or not is_owned_by_match(graph, operand, [mul]):
            continue
        if not (_last_dim(operand) == width and _last_dim(other) == width):
            continue  # a broadcast factor would spread one channel's scale over others
        graph.set_const(weight, (weight.const.numpy() * inv[None, :]).astype(weight.const.numpy().dtype))
        return True
    return False


def _last_dim(value: Value):
    shape = value.shape
    return shape[-1] if shape else None
