"""LLM.int8-style outlier decomposition (Dettmers et al., 2022), as standard ONNX.

A quantized linear y = x W whose input has outlier feature columns O (calibrated |x_c| above a
threshold, 6.0 in the paper, on any sample and token) is split by columns:

    y = (x * m) W' + Gather(x, O, axis=-1) W[O, :]

m is a constant 0/1 mask zeroing O, W' is W with the rows O zeroed (when W is read by this
linear only; otherwise W, which the mask makes exact anyway). The first product stays the
usual QDQ int8 linear at full width (the integer kernel keeps its shape), and since the pass
runs before `calibrate`, its activation range comes from x * m, without the outliers; the
second runs in float on the |O| outlier columns only. In float the sum equals x W up to the
order of the additions. Linears reading one activation (q/k/v, gate/up, through a flattening
Reshape too) share the mask Mul and the Gather.

The int8 part is quantized one of two ways (`scales`):
- "token" (LLM.int8's vector-wise quantization, the default): each token's inlier activations get
  their own scale, absmax / 127, computed at run time, and each weight column its own (absmax per
  output channel, RTN). Every planned 8-bit linear of the graph runs so, split or not:
      s = max(|x * m|, axis=-1) / 127;  q = QuantizeLinear(x * m, s, 128)  (per-token block)
      y = Cast(MatMulInteger(q, W_q, 128)) * s * s_w  [+ Gather(x, O) W[O, :]]
  all standard ONNX (opset 21); the linear leaves the quantization plan (no static activation
  range, no QDQ). A static per-tensor range cannot do this: after the outlier columns go, what
  stays int8 still spans tokens whose ranges differ by orders of magnitude.
- "tensor": the int8 part stays the target's static QDQ linear (calibrated per tensor on x * m).

The pass runs only when asked (--decompose-outliers [THRESHOLD]) and changes nothing where no
column of a quantized linear's input exceeds the threshold (and, with "token", no linear is 8-bit).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np
from edgeq.targets.base import Granularity
from onnx import TensorProto

from edgeq.calibration.collection import channel_absmax
from edgeq.errors import CalibrationError
from edgeq.ir import Graph, Op, Value
from edgeq.ir.tensor import np_dtype
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.pipeline.artifacts import CALIBRATION_DATA, OUTLIER_COLUMNS, QUANT_PLAN
from edgeq.quant.plan import OpPlan, QuantPlan
from edgeq.quant.rounding import quantize_kn
from edgeq.quant.sharing import is_private_constant
from edgeq.registry import register_pass

LLM_INT8_THRESHOLD = 6.0  # the paper's: |x| >= 6 marks the emergent outlier features
_TOKEN_QMAX = 127.0       # symmetric int8 codes of a token's absmax
_TINY = 1e-30             # floor of a token's absmax: an all-zero token gets codes 0, not 0/0
_CODE_OFFSET = 128        # the int8 codes stored as uint8 (code + 128), the GEMM's activation zero point


@dataclass(frozen=True)
class OutlierColumns:
    """What the decomposition did: the float columns of each split linear (by op name, in graph
    order) and how many quantized linears with an activation input it looked at."""

    threshold: float
    columns: dict[str, int] = field(default_factory=dict)
    linears: int = 0
    per_token: int = 0   # linears whose int8 part quantizes each token's activations (scales "token")

    def describe(self) -> str:
        int8 = (f"; {self.per_token} linear(s) int8 with per-token activation scales (vector-wise)"
                if self.per_token else "")
        if not self.columns:
            return (f"threshold {self.threshold:g}: no column of the {self.linears} quantized linear input(s) "
                    f"above it, nothing split{int8}")
        per_layer = ", ".join(f"{name} {n}" for name, n in self.columns.items())
        return (f"threshold {self.threshold:g}: {len(self.columns)} of {self.linears} linear(s) split, "
                f"{sum(self.columns.values())} input column(s) in float{int8} ({per_layer})")


@register_pass
class DecomposeOutliers(Pass):
    name = "decompose-outliers"
    description = "LLM.int8-style decomposition: linear input columns above a threshold in float, the rest int8"

    def __init__(self, threshold: float | None = LLM_INT8_THRESHOLD, threads: int = 0,
                 scales: str = "token"):
        """threshold None: the pass does nothing (not requested). scales: "token" (vector-wise
        int8, LLM.int8's) or "tensor" (the target's static QDQ on the inliers)."""
        if scales not in ("token", "tensor"):
            raise ValueError(f"scales must be 'token' or 'tensor', not {scales!r}")
        self.threshold = threshold
        self.threads = threads
        self.scales = scales

    @classmethod
    def from_options(cls, options, target) -> DecomposeOutliers:
        return cls(options.decompose_outliers, threads=options.threads, scales=options.decompose_scales)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if self.threshold is None:
            return PassResult(graph, False, {"linears": 0})
        plan: QuantPlan = ctx.artifact(QUANT_PLAN, self.name)
        groups = _linear_groups(graph, plan)
        linears = sum(len(ops) for ops in groups.values())
        result = OutlierColumns(self.threshold, {}, linears)
        ctx.artifacts[OUTLIER_COLUMNS] = result
        if not groups:
            return PassResult(graph, False, {"linears": 0, "of_linears": 0, "columns": 0})
        data = ctx.artifacts.get(CALIBRATION_DATA)
        if data is None:
            raise CalibrationError("decompose-outliers finds the outlier columns on calibration data, and none "
                                   "was given", fix="pass --calib or --calib-text")
        absmax = channel_absmax(graph, data, list(groups), threads=self.threads, progress=ctx)
        plans = {id(p.op): p for p in plan.ops}
        split_groups = columns = widest = every_column = per_token = 0
        for source_name, ops in groups.items():
            outliers = np.flatnonzero(absmax[source_name] > self.threshold)
            if outliers.size == absmax[source_name].size:  # nothing would be left for the int8 path
                every_column += 1   # left as it was (counted: the threshold is too low for this layer)
                outliers = outliers[:0]
            source = graph.value(source_name)
            vector_wise = [op for op in ops if self.scales == "token" and _vector_wise_ok(plans[id(op)])]
            if outliers.size == 0 and not vector_wise:
                continue
            if vector_wise:
                _per_token_int8(graph, source, vector_wise, [plans[id(op)] for op in vector_wise], outliers)
                plan.ops[:] = [p for p in plan.ops if not any(p.op is op for op in vector_wise)]
                per_token += len(vector_wise)
            static = [op for op in ops if op not in vector_wise]
            if static and outliers.size:
                _decompose(graph, source, static, outliers)
            if outliers.size:
                for op in ops:
                    result.columns[op.name] = int(outliers.size)
                split_groups += 1
                columns += int(outliers.size)
                widest = max(widest, int(outliers.size))
        ctx.artifacts[OUTLIER_COLUMNS] = replace(result, per_token=per_token)
        return PassResult(graph, split_groups > 0 or per_token > 0,
                          {"linears": len(result.columns), "of_linears": linears, "activations": split_groups,
                           "columns": columns, "max_columns": widest, "every_column_over": every_column,
                           "per_token_int8": per_token})


def _linear_groups(graph: Graph, plan: QuantPlan) -> dict[str, list[Op]]:
    """Linears whose activation input and constant 2-D weight are both quantized (MatMul, or
    Gemm without transA and with alpha 1), grouped by the activation they read (through a
    flattening Reshape, which keeps the last axis), in graph order."""
    groups: dict[str, list[Op]] = defaultdict(list)
    for op_plan in plan.ops:
        op = op_plan.op
        if 0 not in op_plan.activations or 1 not in op_plan.weights or not _plain_linear(op):
            continue
        weight = graph.inputs_of(op)[1]
        if weight is None or weight.const is None or len(weight.const.dims) != 2:
            continue
        source = _source(graph, op)
        if source.shape is None or not isinstance(source.shape[-1], int):
            continue
        groups[source.name].append(op)
    return dict(groups)


def _plain_linear(op: Op) -> bool:
    if op.op_type == "MatMul" and not op.domain:
        return True
    return (op.op_type == "Gemm" and not op.domain and not op.attr("transA", 0)
            and op.attr("alpha", 1.0) == 1.0)


def _source(graph: Graph, op: Op) -> Value:
    """The activation a linear reads, before a flattening Reshape read by it alone (same last axis)."""
    x = graph.inputs_of(op)[0]
    producer = graph.producer(x)
    if producer is not None and producer.op_type == "Reshape" and graph.consumers(x) == [op]:
        source = graph.inputs_of(producer)[0]
        if source.shape is not None and x.shape is not None and len(x.shape) == 2 \
                and source.shape[-1] == x.shape[-1]:
            return source
    return x


def _decompose(graph: Graph, source: Value, ops: list[Op], outliers: np.ndarray) -> None:
    """x -> x * mask for the linears' int8 path, Gather(x, outliers) @ W[outliers] in float added
    to each linear's output."""
    width = source.shape[-1]
    dtype = np_dtype(source.elem_type)
    readers = [op if graph.inputs_of(op)[0] is source else graph.producer(graph.inputs_of(op)[0]) for op in ops]
    first = min(readers, key=lambda r: r.order)
    mask = np.ones(width, dtype)
    mask[outliers] = 0
    mask_value = graph.add_constant(f"{source.name}_inlier_mask", mask)
    masked = graph.outputs_of(graph.add_op("Mul", [source, mask_value], [f"{source.name}_inliers"],
                                           before=first))[0]
    masked.type = source.type
    for reader in readers:
        graph.set_input(reader, 0, masked)
    index = graph.add_constant(f"{source.name}_outlier_columns", outliers.astype(np.int64))
    gathered = graph.outputs_of(graph.add_op("Gather", [source, index], [f"{source.name}_outliers"],
                                             attrs={"axis": -1}, before=first))[0]
    if source.shape is not None:
        gathered.set_type(source.elem_type, [*source.shape[:-1], int(outliers.size)])
    flat: Value | None = None  # the gathered columns flattened like the Reshape before a Gemm
    for op in ops:
        x_outliers = gathered
        if graph.inputs_of(op)[0] is not masked:  # read through a flattening Reshape
            if flat is None:
                shape = graph.add_constant(f"{source.name}_outliers_flat_shape",
                                           np.array([-1, outliers.size], np.int64))
                flat = graph.outputs_of(graph.add_op("Reshape", [gathered, shape], [f"{source.name}_outliers_2d"],
                                                     before=first))[0]
                flat.set_type(source.elem_type, [None, int(outliers.size)])
            x_outliers = flat
        _split_linear(graph, op, x_outliers, outliers)


def _split_linear(graph: Graph, op: Op, x_outliers: Value, outliers: np.ndarray) -> None:
    weight = graph.inputs_of(op)[1]
    w = weight.const.numpy()
    transposed = op.op_type == "Gemm" and bool(op.attr("transB", 0))  # W stored [N, K]
    rows = (w[:, outliers].T if transposed else w[outliers, :]).astype(w.dtype)  # [outliers, N]
    if is_private_constant(graph, weight, op):
        # The int8 path never sees these rows (its input is zero there): dropping them keeps them
        # out of the per-channel weight scales.
        inliers = w.copy()
        if transposed:
            inliers[:, outliers] = 0
        else:
            inliers[outliers, :] = 0
        graph.set_const(weight, inliers)
    rows_value = graph.add_constant(f"{weight.name}_outlier_rows", rows)
    y = graph.outputs_of(op)[0]
    part = graph.outputs_of(graph.add_op("MatMul", [x_outliers, rows_value], [f"{y.name}_outlier_part"],
                                         name=f"{op.name}_outliers", after=op))[0]
    part.type = y.type
    add = graph.add_op("Add", [y, part], [f"{y.name}_decomposed"], name=f"{op.name}_outlier_add", after=op)
    total = graph.outputs_of(add)[0]
    total.type = y.type
    graph.take_over(y, total, "int8_part")  # readers and graph outputs keep the linear's output name
    graph.set_input(add, 0, y)


# ---- vector-wise int8 (scales "token") --------------------------------------------------------

def _vector_wise_ok(op_plan: OpPlan) -> bool:
    """An 8-bit activation and an int8 weight per tensor or per output channel: what
    MatMulInteger with per-token activation scales computes (other widths keep the plan's QDQ)."""
    activation, weight = op_plan.activations.get(0), op_plan.weights.get(1)
    if activation is None or weight is None or activation.dtype not in ("int8", "uint8"):
        return False
    gemm_bias_scaled = op_plan.op.op_type == "Gemm" and op_plan.op.attr("beta", 1.0) != 1.0
    return (weight.dtype == "int8" and weight.granularity in (Granularity.TENSOR, Granularity.CHANNEL)
            and not gemm_bias_scaled)


def _per_token_int8(graph: Graph, source: Value, ops: list[Op], plans: list[OpPlan], outliers: np.ndarray) -> None:
    """The linears reading `source` (directly or through a flattening Reshape) become per-token
    int8 products; with outlier columns, those are zeroed on the int8 side and added back in float."""
    width = source.shape[-1]
    dtype = np_dtype(source.elem_type)
    readers = [op if graph.inputs_of(op)[0] is source else graph.producer(graph.inputs_of(op)[0]) for op in ops]
    first = min(readers, key=lambda r: r.order)
    base = source.name
    inliers = source
    if outliers.size:
        mask = np.ones(width, dtype)
        mask[outliers] = 0
        inliers = _op(graph, "Mul", [source, graph.add_constant(f"{base}_inlier_mask", mask)], f"{base}_inliers",
                      first, source.elem_type, source.shape)
    token_shape = [*source.shape[:-1], 1]
    magnitude = _op(graph, "Abs", [inliers], f"{base}_abs", first, source.elem_type, source.shape)
    axes = graph.add_constant(f"{base}_last_axis", np.array([-1], np.int64))
    peak = _op(graph, "ReduceMax", [magnitude, axes], f"{base}_token_absmax", first, source.elem_type, token_shape,
               attrs={"keepdims": 1})
    peak = _op(graph, "Max", [peak, graph.add_constant(f"{base}_absmax_floor", np.array(_TINY, dtype))],
               f"{base}_token_absmax_floored", first, source.elem_type, token_shape)
    scale = _op(graph, "Mul", [peak, graph.add_constant(f"{base}_inv_qmax", np.array(1 / _TOKEN_QMAX, dtype))],
                f"{base}_token_scale", first, source.elem_type, token_shape)
    # The symmetric codes are stored as uint8 around 128: ONNX Runtime's u8 x s8 integer GEMM
    # (VNNI) is 16x faster than its s8 x s8 one (a 256 x 576 x 1536 product: 1.4 vs 23.6 ms).
    # QuantizeLinear per token (one block the width of the row) takes a zero point shaped like its scale.
    middle = graph.add_constant(f"{base}_code_offset", np.array([_CODE_OFFSET], np.uint8))
    scale_shape = _op(graph, "Shape", [scale], f"{base}_token_scale_shape", first, TensorProto.INT64,
                      [len(token_shape)])
    offsets = _op(graph, "Expand", [middle, scale_shape], f"{base}_token_offset", first, TensorProto.UINT8,
                  token_shape)
    codes = _op(graph, "QuantizeLinear", [inliers, scale, offsets], f"{base}_token_codes", first,
                TensorProto.UINT8, source.shape, attrs={"axis": -1, "block_size": int(width)})
    gathered = flat_gathered = flat_codes = flat_scale = None
    if outliers.size:
        index = graph.add_constant(f"{base}_outlier_columns", outliers.astype(np.int64))
        gathered = _op(graph, "Gather", [source, index], f"{base}_outliers", first, source.elem_type,
                       [*source.shape[:-1], int(outliers.size)], attrs={"axis": -1})
    for op, reader, op_plan in zip(ops, readers, plans):
        x_codes, x_scale, x_outliers = codes, scale, gathered
        if reader is not op:  # a flattening Reshape [.., K] -> [M, K] before a Gemm: flatten the codes too
            if flat_codes is None:
                flat = graph.add_constant(f"{base}_token_codes_2d_shape", np.array([-1, width], np.int64))
                flat_codes = _op(graph, "Reshape", [codes, flat], f"{base}_token_codes_2d",
                                 first, TensorProto.UINT8, [None, int(width)])
                one = graph.add_constant(f"{base}_token_scale_2d_shape", np.array([-1, 1], np.int64))
                flat_scale = _op(graph, "Reshape", [scale, one], f"{base}_token_scale_2d", first,
                                 source.elem_type, [None, 1])
                if gathered is not None:
                    shape = graph.add_constant(f"{base}_outliers_flat_shape", np.array([-1, outliers.size], np.int64))
                    flat_gathered = _op(graph, "Reshape", [gathered, shape], f"{base}_outliers_2d", first,
                                        source.elem_type, [None, int(outliers.size)])
            x_codes, x_scale, x_outliers = flat_codes, flat_scale, flat_gathered
        _int8_linear(graph, op, op_plan, x_codes, x_scale, x_outliers, outliers)
        if reader is not op and not graph.consumers(graph.outputs_of(reader)[0]):
            graph.remove_op(reader)


def _int8_linear(graph: Graph, op: Op, op_plan: OpPlan, codes: Value, scale: Value, x_outliers: Value | None,
                 outliers: np.ndarray) -> None:
    """Replace `op` by Cast(MatMulInteger(codes, W_q)) * scale * w_scale [+ C] [+ x_outliers @ W[O]]."""
    weight = graph.inputs_of(op)[1]
    w = weight.const.numpy()
    if op.op_type == "Gemm" and op.attr("transB", 0):
        w = w.T
    w = np.asarray(w, np.float32)
    rows = w[outliers, :] if outliers.size else None
    if outliers.size:
        w = w.copy()
        w[outliers, :] = 0  # the int8 side reads zeros there: keep these rows out of the column scales
    spec = op_plan.weights[1]
    if spec.granularity == Granularity.TENSOR:
        spec = spec.replace(granularity=Granularity.CHANNEL, axis=1)
    q, w_scale, _ = quantize_kn(w, spec.replace(symmetric=True))
    y = graph.outputs_of(op)[0]
    dtype = np_dtype(y.elem_type)
    name = op.name
    offset = graph.add_constant(f"{weight.name}_code_offset", np.array(_CODE_OFFSET, np.uint8))
    product = _op(graph, "MatMulInteger", [codes, graph.add_constant(f"{weight.name}_int8", q.astype(np.int8)), offset],
                  f"{y.name}_int32", op, TensorProto.INT32, y.shape, name=f"{name}_int8")
    real = _op(graph, "Cast", [product], f"{y.name}_int32_float", op, y.elem_type, y.shape, attrs={"to": y.elem_type})
    real = _op(graph, "Mul", [real, scale], f"{y.name}_token_scaled", op, y.elem_type, y.shape)
    total = _op(graph, "Mul", [real, graph.add_constant(f"{weight.name}_column_scale",
                                                         np.asarray(w_scale, dtype).reshape(-1))],
                f"{y.name}_int8_part", op, y.elem_type, y.shape)
    inputs = graph.inputs_of(op)
    if op.op_type == "Gemm" and len(inputs) > 2 and inputs[2] is not None:
        total = _op(graph, "Add", [total, inputs[2]], f"{y.name}_biased", op, y.elem_type, y.shape)
    if rows is not None:
        part = _op(graph, "MatMul", [x_outliers, graph.add_constant(f"{weight.name}_outlier_rows", rows.astype(dtype))],
                   f"{y.name}_outlier_part", op, y.elem_type, y.shape, name=f"{name}_outliers")
        total = _op(graph, "Add", [total, part], f"{y.name}_decomposed", op, y.elem_type, y.shape,
                    name=f"{name}_outlier_add")
    graph.take_over(y, total, "float")
    graph.remove_op(op)


def _op(graph: Graph, op_type: str, inputs: list[Value], output: str, anchor: Op, elem_type: int, shape,
        *, attrs: dict | None = None, name: str = "") -> Value:
    """One new op placed before `anchor` in the saved order, its output typed."""
    new = graph.add_op(op_type, inputs, [output], attrs=attrs, before=anchor, name=name or "")
    out = graph.outputs_of(new)[0]
    out.set_type(elem_type, list(shape) if shape is not None else None)
    return out
