"""GPTQ (Frantar et al., 2023): round each quantized linear weight so that the layer's output
on the calibration data changes least, compensating every rounding error on the weights not
yet rounded through the inverse Hessian of the layer input.

Per group of linears sharing an input x (q/k/v, gate/up, ...): H = 2/n X^T X is streamed from
the float graph in ONNX Runtime over the calibration data (`CALIBRATION_DATA`, a few inputs at a
time, `hessian_budget_mb` of Hessians at most, see `edgeq.calibration.layer_inputs`), dampened by `damp` times
its mean diagonal, and the group's weights (concatenated along their outputs, which GPTQ
treats independently) are rounded column by column along K to the spec the select-precision
plan gives them: int4 blocks along K (groups 32/64/128: scales per group from the
error-compensated weights, as GPTQ does; with `act_order`, static groups so the DequantizeLinear
blocks stay contiguous), int8 per channel, or per tensor. Each group's range is clipped per
output channel by the ratio in `clip_ratios` (1.0 .. 0.5) whose rounding error, weighted by
the Hessian diagonal, is lowest (GPTQ's own min/max is ratio 1.0 alone).

By default all Hessians come from the float model, which makes the rounding of each layer
independent of the others and bounds memory by one chunk of Hessians. With `sequential`, each
chunk of layers is rounded before the next chunk's inputs are measured, with the rounded
weights fed to the model, so later layers compensate the error of earlier ones (GPTQ's
sequential mode, at the granularity of the Hessian chunks).

Once a layer's codes are final, its scales are solved again by least squares on the same
Hessian (`refit_rounds`, `edgeq.quant.rounding.refit_scales`): GPTQ picks each group's scale
before it rounds the group, so the codes it ends with are rarely best served by that scale.

The rounded weights (q, scale, zero point) are stored under `weight_key(...)` in
`ctx.artifacts[WEIGHT_ROUNDING]`; insert-qdq emits exactly those. The pass changes no graph
node. Stats: the mean relative layer-output error on the calibration data with
round-to-nearest and with GPTQ (tr(E^T H E) / tr(W^T H W)); per-layer values are in
`ctx.artifacts[GPTQ_ERRORS]`.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from edgeq.errors import CalibrationError
from edgeq.calibration.layer_inputs import ActivationStream, hessian_chunks, input_statistics
from edgeq.quant.linears import LinearGroup, linear_groups
from edgeq.quant.rounding import CLIP_RATIOS, dequantize_kn, gptq_quantize, output_errors, quantize_kn
from edgeq.ir import Graph
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.pipeline.artifacts import CALIBRATION_DATA, GPTQ_ERRORS, QUANT_PLAN, WEIGHT_ROUNDING
from edgeq.quant.plan import QuantPlan
from edgeq.passes.insert_qdq import weight_key
from edgeq.registry import register_pass

# Calibration tokens GPTQ's Hessians were measured to need: SmolLM2 W4A16 g128 with rotation
# reaches 47.38 perplexity (+7.7% over float) from 64 windows of 256 tokens and 50.24 (+14.2%)
# from 16 (BENCHMARKS.md, issue 16). The compile draws more windows of the same text up to this
# many tokens, or says how many samples to give (edgeq.compiler).
WANTED_TOKENS = 64 * 256
# Least-squares refits of the scales once the codes are final (`gptq_quantize`'s refit_rounds),
# SmolLM2 W4A16 perplexity, paired: 47.80 -> 47.69 (no online Hadamards; o/down/head g32 with zero
# points), 47.50 -> 47.12 (g32 with zero points everywhere), 46.98 -> 46.88 (all but q/k/v), the
# preset 47.46 -> 47.49; lower held-out error in all four. More rounds gave no more. BENCHMARKS.md,
# issue 15.
REFIT_ROUNDS = 1


@register_pass
class GPTQ(Pass):
    name = "gptq"
    description = "GPTQ weight rounding: Hessian-based error compensation (groups, optional act-order)"

    def __init__(self, enabled: bool = True, *, act_order: bool = False, damp: float = 0.01, block: int = 128,
                 clip_ratios: tuple[float, ...] = CLIP_RATIOS, signed_scales: bool = False,
                 sequential: bool = False, required: bool = True, hessian_budget_mb: int = 256,
                 threads: int = 0, refit_rounds: int = REFIT_ROUNDS):
        """enabled False: the pass does nothing. required False (the target's automatic choice):
        without calibration data the weights keep round-to-nearest instead of failing.
        clip_ratios: each group's range is the min/max shrunk by the ratio whose rounding error,
        weighted by the Hessian diagonal, is lowest ((1.0,): GPTQ's plain min/max).
        signed_scales: symmetric signed specs may map the value of largest magnitude to qmin
        (16 int4 levels instead of 15) with a negative scale where that is better, as ONNX
        Runtime's int4 quantizer does; valid ONNX and run by ORT's CPU kernels, but rejected by
        some runtimes (WebNN requires positive scales), hence off by default.
        sequential: after each chunk of layers is rounded, the float model runs with those
        layers' rounded weights, so later layers' Hessians include the earlier layers' error
        (GPTQ's sequential mode at the granularity of the Hessian chunks; a smaller
        hessian_budget_mb makes it finer and costs one more pass over the data per chunk).
        refit_rounds: R > 0: once a layer's codes are final, its scales are solved again by least
        squares on the same Hessian, R times, GPTQ rounding the rows again on the refit scales in
        between (`edgeq.quant.rounding.gptq_quantize`); 0: GPTQ's own scales."""
        if not clip_ratios or any(not 0 < r <= 1 for r in clip_ratios):
            raise ValueError("clip_ratios: give ratios in (0, 1]")
        if not 0 <= damp < 1:
            raise ValueError(f"damp={damp}: use a fraction of the mean Hessian diagonal in [0, 1)")
        self.enabled = enabled
        self.act_order = act_order
        self.damp = damp
        self.block = block
        self.clip_ratios = tuple(clip_ratios)
        self.signed_scales = signed_scales
        self.sequential = sequential
        self.required = required
        self.hessian_budget = hessian_budget_mb * 2**20
        self.threads = threads
        self.refit_rounds = refit_rounds
        # What the compile should give this pass: calibration tokens (0: no wish).
        self.wanted_tokens = WANTED_TOKENS if enabled else 0

    @classmethod
    def from_options(cls, options, target) -> "GPTQ":
        mode = options.weight_rounding
        # "auto": int4 weights are rounded with GPTQ (SmolLM2 W4A16 g128 with rotation: 47.39
        # without act-order, 48.71 with its static groups; RTN, AWQ and AWQ+GPTQ are worse, see
        # BENCHMARKS.md); int8 weights keep round-to-nearest. Without calibration data "auto"
        # falls back to RTN.
        # A target may round other weight dtypes with GPTQ too (`Target.gptq_weights`).
        dtype = options.weights or (target.weight.dtype if target is not None else "int8")
        auto = mode == "auto" and (dtype == "int4" or (target is not None and dtype in target.gptq_weights))
        return cls(mode in ("gptq", "awq+gptq") or auto, act_order=options.act_order, required=not auto,
                   signed_scales=target is not None and target.signed_weight_scales, threads=options.threads)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if not self.enabled:
            return PassResult(graph, False, {"layers": 0})
        plan: QuantPlan = ctx.artifact(QUANT_PLAN, self.name)
        groups, skipped = linear_groups(graph, plan)
        if not groups:
            return PassResult(graph, False, {"layers": 0, "skipped": len(skipped)})
        data = ctx.artifacts.get(CALIBRATION_DATA)
        if data is None:
            if self.required:
                raise CalibrationError("GPTQ needs calibration data to measure the layer inputs",
                                       fix="pass --calib or --calib-text (also with --activations float), "
                                           "or --weight-rounding rtn")
            return PassResult(graph, False, {"layers": 0, "no_calibration_data": 1})
        rounding = ctx.artifacts.setdefault(WEIGHT_ROUNDING, {})
        per_layer: list[dict] = []
        with ActivationStream(graph, data, self.threads) as stream, \
                ctx.task("layer groups", len(groups), "group") as advance:
            for chunk in hessian_chunks(groups, graph, self.hessian_budget):
                stats = input_statistics(stream, [g.source for g in chunk])
                for group in chunk:
                    per_layer += self._round_group(graph, group, stats.pop(group.source).hessian, rounding)
                    advance()
                    if self.sequential:
                        for lin in group.linears:
                            q, scale, zero = rounding[weight_key(graph, lin.op, 1, lin.spec)]
                            stored = dequantize_kn(*_kn(lin, q, scale, zero), lin.spec)
                            stream.substitute(graph.inputs_of(lin.op)[1].name, stored.T if lin.transposed else stored)
            passes = stream.passes
        ctx.artifacts[GPTQ_ERRORS] = per_layer
        rtn = [r["rtn_error"] for r in per_layer]
        gptq = [r["gptq_error"] for r in per_layer]
        return PassResult(graph, False, {
            "layers": len(per_layer), "groups": len(groups), "skipped": len(skipped), "hessian_passes": passes,
            "mean_error_rtn": round(float(np.mean(rtn)), 6), "mean_error_gptq": round(float(np.mean(gptq)), 6),
            "layers_improved": int(sum(g < r for g, r in zip(gptq, rtn)))})

    def _round_group(self, graph: Graph, group: LinearGroup, hessian: np.ndarray, rounding: dict) -> list[dict]:
        by_spec = defaultdict(list)  # linears of one spec are rounded together (same H, same order)
        for lin in group.linears:
            by_spec[lin.spec].append(lin)
        results = []
        for spec, linears in by_spec.items():
            weights = [lin.weight_kn(graph) for lin in linears]
            # Per-tensor parameters would change if outputs were concatenated.
            parts = [weights] if spec.granularity.value != "tensor" else [[w] for w in weights]
            outputs = []
            for part in parts:
                w = np.concatenate(part, axis=1) if len(part) > 1 else part[0]
                q, scale, zero = gptq_quantize(w, hessian, spec, damp=self.damp, act_order=self.act_order,
                                               block=self.block, clip_ratios=self.clip_ratios,
                                               full_range=self.signed_scales, refit_rounds=self.refit_rounds)
                outputs += _split_columns(q, scale, zero, [p.shape[1] for p in part])
            for lin, w, (q, scale, zero) in zip(linears, weights, outputs):
                rounding[weight_key(graph, lin.op, 1, spec)] = lin.to_stored(q, scale, zero)
                rtn_error, gptq_error = output_errors(hessian, w, dequantize_kn(*quantize_kn(w, spec), spec),
                                                      dequantize_kn(q, scale, zero, spec))
                results.append({"op": lin.op.name, "input": group.source, "rtn_error": rtn_error,
                                "gptq_error": gptq_error})
        return results


def _kn(lin, q, scale, zero):
    """Stored-layout arrays back in the [K, N] layout."""
    if not lin.transposed:
        return q, scale, zero
    return q.T, (scale.T if scale.ndim == 2 else scale), (zero.T if zero.ndim == 2 else zero)


def _split_columns(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, widths: list[int]):
    """Undo the concatenation along the output axis (params: [N] or [G, N]; scalars stay)."""
    out, start = [], 0
    for width in widths:
        cols = slice(start, start + width)
        out.append((np.ascontiguousarray(q[:, cols]),
                    np.ascontiguousarray(scale[..., cols]) if scale.ndim else scale,
                    np.ascontiguousarray(zero[..., cols]) if zero.ndim else zero))
        start += width
    return out
