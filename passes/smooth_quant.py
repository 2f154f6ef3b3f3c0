"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights.

For the linear layers reading one activation x[..., K], per input channel k
    s_k = max|x_k|^alpha / max|W_k,:|^(1 - alpha),   x' = x / s,   W' = diag(s) W,
so x'W' = xW exactly in float while x' has a flatter range to quantize. 1/s is folded into
the op producing x when that is a normalisation whose scale/bias are constants read nowhere
else and whose output feeds only these linears (LayerNormalization gamma/beta, RMSNorm's
gamma Mul), or into a preceding linear (MatMul [+ bias Add]) read only by them; otherwise an
explicit Mul by 1/s is inserted before them and reported.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

from edgeq.calibration.collection import channel_absmax
from edgeq.errors import CalibrationError
from edgeq.ir import Graph, Op, Value, save
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.pipeline.artifacts import CALIBRATION_DATA, QUANT_PLAN, ROTATION, SMOOTHING
from edgeq.options import SMOOTH_SEARCH_GRID
from edgeq.quant.plan import QuantPlan, rotates
from edgeq.quant.channel_scaling import fold_channel_scale_into_producer, insert_channel_mul
from edgeq.quant.sharing import is_private_constant
from edgeq.registry import register_pass



@register_pass
class SmoothQuant(Pass):
    name = "smooth-quant"
    description = "SmoothQuant: per-channel activation/weight balancing folded into norms or linears"

    def __init__(self, alpha: float | None = 0.5, alpha_grid: tuple[float, ...] = (), search_samples: int = 4,
                 threads: int = 0, after_rotation: bool = True):
        """alpha None disables the pass. A non-empty `alpha_grid` chooses alpha per group of
        linears (0 in the grid means "leave this group alone"): the value whose simulated W8A8
        output error on `search_samples` calibration samples is lowest. after_rotation False:
        the pass does nothing when the hadamard-rotation pass rotated the graph (which searches
        its own smoothing; the default search, whether rotation runs being known only then)."""
        self.alpha = alpha
        self.alpha_grid = tuple(alpha_grid)
        self.search_samples = search_samples
        self.threads = threads
        self.after_rotation = after_rotation

    @classmethod
    def from_options(cls, options, target) -> "SmoothQuant":
        grid = options.smooth_alpha_grid
        after_rotation = True
        if grid is None:  # the default: search, unless the rotation pass already smoothed
            rotation = rotates(options, target)
            # --decompose-outliers: its float columns take the outliers, and a search on top costs
            # accuracy (SmolLM2 W8A8 threshold 6: 47.15 with it, 46.83 without; BENCHMARKS.md issue 17)
            grid = () if rotation == "yes" or options.decompose_outliers is not None else SMOOTH_SEARCH_GRID
            # "if-stream": the rotation runs only on a graph with a pre-norm residual stream; whether
            # it did is known when this pass runs
            after_rotation = rotation != "if-stream"
        if options.smooth_alpha is not None:  # a fixed alpha wins
            grid = ()
        return cls(options.smooth_alpha, grid, threads=options.threads, after_rotation=after_rotation)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if self.alpha is None and not self.alpha_grid:
            return PassResult(graph, False, {"groups": 0})
        if not self.after_rotation and ctx.artifacts.get(ROTATION) is not None:
            return PassResult(graph, False, {"groups": 0, "after_rotation": 1})
        plan: QuantPlan = ctx.artifact(QUANT_PLAN, self.name)
        groups = _linear_groups(graph, plan)
        if not groups:
            return PassResult(graph, False, {"groups": 0})
        data = ctx.artifacts.get(CALIBRATION_DATA)
        if data is None:
            raise CalibrationError("smooth-quant needs calibration data", fix="pass --calib or --calib-text")
        channel_max = channel_absmax(graph, data, list(groups), threads=self.threads, progress=ctx)
        samples = self._activation_samples(graph, data, list(groups)) if self.alpha_grid else {}
        folded = explicit = skipped = 0
        chosen: dict[str, float] = {}
        with ctx.task("alpha per group", len(groups), "group") as advance:
            for source_name, ops in groups.items():
                kind = self._smooth_group(graph, plan, source_name, ops, channel_max, samples, chosen)
                advance()
                folded += kind == "folded"
                explicit += kind == "explicit"
                skipped += kind == "left alone"
        ctx.artifacts[SMOOTHING] = chosen
        return PassResult(graph, folded + explicit > 0, {"groups": len(groups), "folded": folded,
                                                         "explicit_mul": explicit, "left_alone": skipped})

    def _smooth_group(self, graph: Graph, plan: QuantPlan, source_name: str, ops: list[Op], channel_max, samples,
                      chosen: dict[str, float]) -> str:
        """Smooth one group of linears: "folded" (1/s into the producer), "explicit" (a Mul) or
        "left alone"."""
        source = graph.value(source_name)
        weights = [graph.constant(graph.inputs_of(op)[1]).numpy() for op in ops]
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        alpha = self.alpha if not self.alpha_grid else _search_alpha(
            samples[source_name], weights, channel_max[source_name], w_max, self.alpha_grid, plan, ops)
        chosen[source_name] = alpha
        if not alpha:
            return "left alone"
        scale = _smoothing_factors(channel_max[source_name], w_max, alpha)
        for op, w in zip(ops, weights):
            graph.set_const(graph.inputs_of(op)[1], (w * scale[:, None]).astype(w.dtype))
        readers = [graph.producer(graph.inputs_of(op)[0]) if smoothing_source(graph, op) is not
                   graph.inputs_of(op)[0] else op for op in ops]
        if fold_channel_scale_into_producer(graph, source, readers, 1.0 / scale):
            return "folded"
        insert_channel_mul(graph, source, readers, 1.0 / scale)
        return "explicit"

    def _activation_samples(self, graph: Graph, data, names: list[str]) -> dict[str, np.ndarray]:
        """The group inputs on the first few calibration samples, as [tokens, channels]."""
        from edgeq.runtime.sessions import make_session

        with tempfile.TemporaryDirectory(prefix="edgeq-smooth-") as tmp:
            path = Path(tmp) / "model.onnx"
            save(graph, path, external_data=True)  # weights copied file to file, not into a proto
            model = onnx.load(str(path), load_external_data=False)
            del model.graph.output[:]
            for name in names:
                model.graph.output.add().name = name
            onnx.save(model, str(path))  # the outputs changed; the weights stay in model.onnx.data
            session = make_session(path, threads=self.threads)
            rows: dict[str, list[np.ndarray]] = defaultdict(list)
            for index, feed in enumerate(data):
                if index >= self.search_samples:
                    break
                for name, value in zip(names, session.run(names, dict(feed))):
                    rows[name].append(value.reshape(-1, value.shape[-1]).astype(np.float32))
        return {name: np.concatenate(parts) for name, parts in rows.items()}



def _linear_groups(graph: Graph, plan: QuantPlan) -> dict[str, list[Op]]:
    """Quantized linears (MatMul, or Gemm without transposes) with a 2-D weight, grouped by the
    activation they read (looking through a flattening Reshape, which keeps the last axis)."""
    groups: dict[str, list[Op]] = defaultdict(list)
    for op_plan in plan.ops:
        op = op_plan.op
        if 0 not in op_plan.activations or 1 not in op_plan.weights or not _plain_linear(op):
            continue
        weight = graph.constant(graph.inputs_of(op)[1])
        if weight is None or len(weight.dims) != 2 or graph.inputs_of(op)[1].const is None:
            continue
        groups[smoothing_source(graph, op).name].append(op)
    # W' = diag(s) W changes the weight in place: a weight read by another op (which would
    # see the scaling, or take a second one) or seen by the caller (graph input or output)
    # leaves its whole group alone.
    return {name: ops for name, ops in groups.items()
            if all(is_private_constant(graph, graph.inputs_of(op)[1], op) for op in ops)}


def _plain_linear(op: Op) -> bool:
    if op.op_type == "MatMul":
        return True
    return op.op_type == "Gemm" and not op.attr("transA", 0) and not op.attr("transB", 0)


def smoothing_source(graph: Graph, op: Op) -> Value:
    """The activation a linear reads, before a flattening Reshape (same last axis)."""
    x = graph.inputs_of(op)[0]
    producer = graph.producer(x)
    if producer is not None and producer.op_type == "Reshape" and len(graph.consumers(x)) == 1:
        source = graph.inputs_of(producer)[0]
        if source.shape is not None and x.shape is not None and source.shape[-1] == x.shape[-1]:
            return source
    return x


def _search_alpha(x: np.ndarray, weights: list[np.ndarray], act_max: np.ndarray, w_max: np.ndarray,
                  grid: tuple[float, ...], plan: QuantPlan, ops: list[Op]) -> float:
    """The alpha (0 = no smoothing) minimising the group's simulated quantized output error."""
    from edgeq.quant.numerics import dequantize, qparams, quantize, quantize_weight

    op_plan = next(p for p in plan.ops if p.op is ops[0])
    act_spec, w_spec = op_plan.activations[0], op_plan.weights[1]
    reference = [x @ w for w in weights]
    best, best_err = 0.0, np.inf
    for alpha in grid:
        scale = _smoothing_factors(act_max, w_max, alpha) if alpha else np.ones_like(act_max, np.float32)
        xs = x / scale
        s, z = qparams(xs.min(), xs.max(), act_spec)
        xq = dequantize(quantize(xs, s, z, act_spec), s, z)
        err = 0.0
        for w, ref in zip(weights, reference):
            q, ws, wz = quantize_weight(w * scale[:, None], w_spec, channel_axis=1)
            shape = (1, -1) if ws.ndim == 1 else ws.shape
            wq = dequantize(q, _expand(ws, w.shape, w_spec), _expand(wz, w.shape, w_spec)) if ws.ndim > 1 \
                else dequantize(q, ws.reshape(shape), wz.reshape(shape))
            err += float(np.sum((xq @ wq - ref) ** 2) / max(np.sum(ref**2), 1e-30))
        if err < best_err * 0.98 or (alpha == 0.0 and err <= best_err):  # prefer no Mul unless it helps
            best, best_err = alpha, err
    return best


def _expand(param: np.ndarray, shape: tuple[int, ...], spec) -> np.ndarray:
    """Block-wise params repeated to the weight's shape (blocks along axis 0)."""
    return np.repeat(param, spec.block_size, axis=0)[: shape[0]]


def _smoothing_factors(act_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    act_max = np.maximum(act_max.astype(np.float64), 1e-5)
    w_max = np.maximum(w_max.astype(np.float64), 1e-5)
    scale = act_max**alpha / w_max ** (1.0 - alpha)
    return np.clip(scale, 1e-4, 1e4).astype(np.float32)


