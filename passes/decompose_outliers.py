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

The pass runs only when asked (--decompose-outliers [THRESHOLD]) and changes nothing where no
column of a quantized linear's input exceeds the threshold.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from edgeq.calibration.collection import channel_absmax
from edgeq.errors import CalibrationError
from edgeq.ir import Graph, Op, Value
from edgeq.ir.tensor import np_dtype
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.pipeline.artifacts import CALIBRATION_DATA, OUTLIER_COLUMNS, QUANT_PLAN
from edgeq.quant.plan import QuantPlan
from edgeq.quant.sharing import is_private_constant
from edgeq.registry import register_pass

LLM_INT8_THRESHOLD = 6.0  # the paper's: |x| >= 6 marks the emergent outlier features


@dataclass(frozen=True)
class OutlierColumns:
    """What the decomposition did: the float columns of each split linear (by op name, in graph
    order) and how many quantized linears with an activation input it looked at."""

    threshold: float
    columns: dict[str, int] = field(default_factory=dict)
    linears: int = 0

    def describe(self) -> str:
        if not self.columns:
            return (f"threshold {self.threshold:g}: no column of the {self.linears} quantized linear input(s) "
                    "above it, nothing split")
        per_layer = ", ".join(f"{name} {n}" for name, n in self.columns.items())
        return (f"threshold {self.threshold:g}: {len(self.columns)} of {self.linears} linear(s) split, "
                f"{sum(self.columns.values())} input column(s) in float ({per_layer})")


@register_pass
class DecomposeOutliers(Pass):
    name = "decompose-outliers"
    description = "LLM.int8-style decomposition: linear input columns above a threshold in float, the rest int8"

    def __init__(self, threshold: float | None = LLM_INT8_THRESHOLD, threads: int = 0):
        """threshold None: the pass does nothing (not requested)."""
        self.threshold = threshold
        self.threads = threads

    @classmethod
    def from_options(cls, options, target) -> DecomposeOutliers:
        return cls(options.decompose_outliers, threads=options.threads)

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
        split_groups = columns = widest = every_column = 0
        for source_name, ops in groups.items():
            outliers = np.flatnonzero(absmax[source_name] > self.threshold)
            if outliers.size == absmax[source_name].size:  # nothing would be left for the int8 path
                every_column += 1   # left as it was (counted: the threshold is too low for this layer)
                continue
            if outliers.size == 0:
                continue
            _decompose(graph, graph.value(source_name), ops, outliers)
            for op in ops:
                result.columns[op.name] = int(outliers.size)
            split_groups += 1
            columns += int(outliers.size)
            widest = max(widest, int(outliers.size))
        return PassResult(graph, split_groups > 0, {"linears": len(result.columns), "of_linears": linears,
                                                    "activations": split_groups, "columns": columns,
                                                    "max_columns": widest, "every_column_over": every_column})



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
