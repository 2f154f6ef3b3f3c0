"""Insert QuantizeLinear/DequantizeLinear as ONNX Runtime fuses them into integer kernels.

- Activations: one Q per (source tensor, spec) right after the source; data movement between
  the source and the quantized op (Reshape, Transpose, ...) is replayed on the integer tensor,
  so quantization is shared, not repeated; a DQ sits directly before the op (DQ -> MatMul).
- Weights: stored as integer initializers (no float copy left) with DQ before the op, per
  tensor, per channel or per block (int4 blocks along K become MatMulNBits in ORT).
- NF4 weights (a codebook, not a DequantizeLinear dtype): the linear becomes ONNX Runtime's
  com.microsoft MatMulBnb4 on the packed codes and block absmax (edgeq.quant.nf4); a Gemm's
  bias follows as an Add.
- Float8 weights and activations: float8 QuantizeLinear/DequantizeLinear (opset 19+): weights
  stored as float8 with a float8 zero point 0; activations quantized by a QuantizeLinear with
  `output_dtype` and no zero point, its DQ right after it (data movement stays float).
- Embedding tables: Gather on the integer table, then dequantization per hidden channel.
- Gemm/Conv biases: int32 with scale s_x * s_w.
- Whole-graph targets (an NPU without a float path): every tensor is quantized once, Q -> DQ
  right after its producer, in the producer's output spec (fixed where the kernel imposes one,
  input 0's scale and zero point for shared ops such as data movement); a reader wanting
  another dtype reads a conversion DQ -> Q -> DQ; constants are stored as integers; graph
  outputs leave through Q -> DQ too.
"""

from __future__ import annotations

import numpy as np
import onnx

from edgeq.errors import CalibrationError, GraphError, OptionError
from edgeq.ir import Graph, Op, Value
from edgeq.options import PrecisionOverrides
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.pipeline.artifacts import ACTIVATION_RANGES, QUANT_PLAN, WEIGHT_ROUNDING
from edgeq.quant.nf4 import QUANT_TYPE_NF4, quantize_nf4
from edgeq.quant.numerics import qparams, quantize_weight, stored
from edgeq.quant.plan import OpPlan, QuantPlan, quant_source
from edgeq.registry import register_pass
from edgeq.targets.base import ActivationPlacement, Granularity, QSpec



def weight_key(graph: Graph, op: Op, slot: int, spec: QSpec) -> tuple[str, QSpec, int]:
    """Key of a quantized weight: (weight name, spec with its blocked axis, channel axis).
    Passes that round weights themselves store (q, scale, zero point) under this key in
    ctx.artifacts[WEIGHT_ROUNDING]; the arrays have `quantize_weight`'s shapes."""
    value = graph.inputs_of(op)[slot]
    channel_axis, k_axis = _weight_axes(op, len(graph.constant(value).dims))
    if spec.granularity == Granularity.BLOCK:
        spec = spec.replace(axis=k_axis)
    return value.name, spec, channel_axis


@register_pass
class InsertQDQ(Pass):
    name = "insert-qdq"
    description = "insert QuantizeLinear/DequantizeLinear pairs and integer weights per the plan"

    def __init__(self, overrides: PrecisionOverrides | None = None,
                 weight_cache: dict | None = None):
        """weight_cache: shared between runs (e.g. sensitivity variants) so each weight is
        quantized once: (weight name, spec, axis) -> (q, scale, zero point) arrays."""
        self.overrides = overrides or PrecisionOverrides()
        self.weight_cache = weight_cache if weight_cache is not None else {}

    @classmethod
    def from_options(cls, options, target) -> "InsertQDQ":
        return cls(options.overrides)

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        plan: QuantPlan = ctx.artifact(QUANT_PLAN, self.name)
        specs = [s for p in plan.ops for s in (*p.activations.values(), *p.weights.values())]
        needs = 21 if any(s.dtype in ("int4", "uint4", "int16", "uint16") or s.granularity == Granularity.BLOCK
                          for s in specs if s.dtype != "nf4") else 19 if any(s.is_float for s in specs) else 13
        opset = graph.model.opset_imports.get("", graph.model.opset_imports.get("ai.onnx", 1))
        if opset < needs:
            raise GraphError(f"these quantization specs need opset {needs}, the graph is at {opset}",
                             fix="run the convert-opset pass first")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        plan: QuantPlan = ctx.artifact(QUANT_PLAN, self.name)
        ranges = ctx.artifacts.get(ACTIVATION_RANGES, {})
        # Weights already rounded by GPTQ/AWQ (same keys as `weight_key`) are used as they are.
        self.weight_cache.update(ctx.artifacts.get(WEIGHT_ROUNDING, {}))
        emitter = _Emitter(graph, ranges, self.overrides, self.weight_cache,
                           placement=ActivationPlacement(ctx.target.execution.activation_placement),
                           whole_graph=plan.whole_graph)
        if plan.whole_graph:
            emitter.primary.update({graph.outputs_of(p.op)[slot].name: spec for p in plan.ops
                                    for slot, spec in p.outputs.items()})
        for op_plan in plan.ops:
            emitter.quantize_op(op_plan)
        if plan.whole_graph:
            emitter.quantize_outputs(plan)
        stats = {"activation_quantizers": len(emitter.q_cache), "weights_quantized": emitter.weights,
                 "weight_bytes_before": emitter.bytes_before, "weight_bytes_after": emitter.bytes_after}
        return PassResult(graph, bool(plan.ops), stats)


class _Emitter:
    def __init__(self, graph: Graph, ranges: dict[str, tuple[float, float]], overrides: PrecisionOverrides,
                 arrays: dict, *, placement: ActivationPlacement = ActivationPlacement.SOURCE,
                 whole_graph: bool = False):
        self.graph = graph
        self.whole_graph = whole_graph
        self.primary: dict[str, QSpec] = {}     # whole graph: tensor -> the spec it is quantized in
        self.shared: dict[str, tuple[Value, Value]] = {}  # tensor -> (scale, zero point) of a shared op's input
        self.converted: dict[tuple[str, QSpec], tuple[Value, np.ndarray]] = {}
        self.placement = placement  # where an activation's Q (and DQ) go around data movement
        self.arrays = arrays
        self.ranges = ranges
        self.overrides = overrides
        self.q_cache: dict[tuple[str, QSpec], tuple[Value, Value, Value]] = {}
        self.moved_cache: dict[tuple[int, int], Value] = {}
        self.dq_cache: dict[tuple[int, QSpec], Value] = {}
        self.weight_values: dict[tuple[str, QSpec, int], tuple[Value, np.ndarray]] = {}
        self.weights = 0
        self.bytes_before = 0
        self.bytes_after = 0

    # ---- ops ---------------------------------------------------------------------------
    def quantize_op(self, plan: OpPlan) -> None:
        graph, op = self.graph, plan.op
        ins = graph.inputs_of(op)
        if any(spec.dtype == "nf4" for spec in plan.weights.values()):
            self.nf4_linear(plan)
            return
        weight_scales: dict[int, np.ndarray] = {}
        act_scales: dict[int, np.ndarray] = {}
        for slot, spec in plan.activations.items():
            dq, scale = self.activation(ins[slot], spec, op)
            graph.set_input(op, slot, dq)
            act_scales[slot] = scale
        for slot, spec in plan.weights.items():
            if op.op_type == "Gather" and not self.whole_graph:
                self.embedding(op, ins[slot], spec)
                continue
            channel_axis, k_axis = _weight_axes(op, len(graph.constant(ins[slot]).dims))
            dq, scale = self.weight(ins[slot], spec, channel_axis, k_axis, op)
            graph.set_input(op, slot, dq)
            weight_scales[slot] = scale
        if plan.two_digit:
            self.second_digit(op, ins[0], act_scales[0])
        if plan.bias is not None and 0 in act_scales and 1 in weight_scales:
            self.bias(op, ins[2], act_scales[0] * weight_scales[1])
        if plan.shared:
            self._share_input(plan)

    # ---- whole graph -------------------------------------------------------------------------
    def _share_input(self, plan: OpPlan) -> None:
        """A shared op's outputs take the scale and zero point its input 0 is read with."""
        graph, op = self.graph, plan.op
        dq = graph.producer(graph.inputs_of(op)[0])
        spec = plan.activations.get(0) or plan.weights.get(0)
        if dq is None or dq.op_type != "DequantizeLinear" or spec is None:
            return
        _, scale, zero = graph.inputs_of(dq)[:3]
        for out in graph.outputs_of(op):
            if out is not None:
                self.shared[out.name] = (scale, zero)
                self.primary[out.name] = spec

    def _tensor(self, source: Value, spec: QSpec, reader: Op | None) -> tuple[Value, np.ndarray]:
        """`source` quantized once where it is produced, in its producer's output spec (or the
        first reader's); a reader wanting another dtype reads a conversion DQ -> Q -> DQ."""
        graph = self.graph
        primary = self.primary.setdefault(source.name, spec)
        key = (source.name, primary)
        if key not in self.q_cache:
            if source.name in self.shared:
                s, z = self.shared[source.name]
            else:
                qspec, lo_hi = self._activation_spec(source, primary)
                scale, zero = qparams(*lo_hi, qspec)
                s = graph.add_constant(f"{source.name}_scale", scale)
                z = graph.add_constant(f"{source.name}_zero_point", zero)
            producer = graph.producer(source)
            q_op = graph.add_op("QuantizeLinear", [source, s, z], [f"{source.name}_quantized"],
                                after=producer, before=None if producer else reader)
            q_value = graph.outputs_of(q_op)[0]
            q_value.set_type(z.const.elem_type, source.shape)
            dq_op = graph.add_op("DequantizeLinear", [q_value, s, z], [f"{source.name}_dequantized"], after=q_op)
            graph.outputs_of(dq_op)[0].type = source.type
            self.q_cache[key] = (q_value, s, z)
            self.dq_cache[(id(q_value), primary)] = graph.outputs_of(dq_op)[0]
        q_value, s, z = self.q_cache[key]
        dq = self.dq_cache[(id(q_value), primary)]
        if spec.dtype == primary.dtype:
            return dq, s.const.numpy()
        convert_key = (source.name, spec)
        if convert_key not in self.converted:
            qspec, lo_hi = self._activation_spec(source, spec)
            scale, zero = qparams(*lo_hi, qspec)
            s2 = graph.add_constant(f"{source.name}_{spec.dtype}_scale", scale)
            z2 = graph.add_constant(f"{source.name}_{spec.dtype}_zero_point", zero)
            q2 = graph.add_op("QuantizeLinear", [dq, s2, z2], [f"{source.name}_{spec.dtype}_quantized"],
                              after=graph.producer(dq))
            graph.outputs_of(q2)[0].set_type(z2.const.elem_type, source.shape)
            dq2 = graph.add_op("DequantizeLinear", [graph.outputs_of(q2)[0], s2, z2],
                               [f"{source.name}_{spec.dtype}_dequantized"], after=q2)
            graph.outputs_of(dq2)[0].type = source.type
            self.converted[convert_key] = (graph.outputs_of(dq2)[0], scale)
        return self.converted[convert_key]

    def quantize_outputs(self, plan: QuantPlan) -> None:
        """Graph outputs of quantized ops leave through Q -> DQ (and keep their names)."""
        graph = self.graph
        for op_plan in plan.ops:
            for slot in op_plan.outputs:
                value = graph.outputs_of(op_plan.op)[slot]
                if value is None or not graph.is_graph_output(value):
                    continue
                dq, _ = self._tensor(value, self.primary.get(value.name, op_plan.outputs[slot]), None)
                graph.outputs = [dq if v is value else v for v in graph.outputs]
                name = value.name
                graph.rename_value(value, graph.unique_name(f"{name}_float"))
                graph.rename_value(dq, name)

    # ---- activations ----------------------------------------------------------------------------
    def activation(self, value: Value, spec: QSpec, reader: Op) -> tuple[Value, np.ndarray]:
        graph = self.graph
        if self.whole_graph:
            return self._tensor(quant_source(graph, value, movement=False)[0], spec, reader)
        source, chain = quant_source(graph, value)
        spec, lo_hi = self._activation_spec(source, spec)
        if self.placement == ActivationPlacement.READER:  # the moved tensor has the source's values and range
            source, chain = value, []
        key = (source.name, spec)
        if key not in self.q_cache:
            scale, zero = qparams(*lo_hi, spec)
            s = graph.add_constant(f"{source.name}_scale", scale)
            # Float8: no zero point (it is 0), the type from output_dtype. ONNX Runtime 1.32's
            # ReluQuantTransformer drops a Relu before a QuantizeLinear whose zero point is neither
            # int8 nor uint8 (relu_quantizelinear.cc), which would let negative values through.
            z = None if spec.is_float else graph.add_constant(f"{source.name}_zero_point", stored(zero))
            producer = graph.producer(source)
            q_op = graph.add_op("QuantizeLinear", [source, s] + ([z] if z is not None else []),
                                [f"{source.name}_quantized"], after=producer, before=None if producer else reader,
                                attrs={"output_dtype": spec.elem_type} if z is None else None)
            q_value = graph.outputs_of(q_op)[0]
            q_value.set_type(spec.elem_type, source.shape)
            self.q_cache[key] = (q_value, s, z)
        current, s, z = self.q_cache[key]
        # Float8 tensors take no data movement (Expand, ... have no float8 type): DQ right after Q.
        adjacent = self.placement == ActivationPlacement.SOURCE_QDQ or spec.is_float
        if adjacent:  # DQ right after Q at the source; the movement below runs on its float output
            if (id(current), spec) not in self.dq_cache:
                dq_op = graph.add_op("DequantizeLinear", [current, s] + ([z] if z is not None else []),
                                     [f"{source.name}_dequantized"], after=graph.producer(current))
                graph.outputs_of(dq_op)[0].type = source.type
                self.dq_cache[(id(current), spec)] = graph.outputs_of(dq_op)[0]
            current = self.dq_cache[(id(current), spec)]
        for mover in chain:  # replay data movement on the integer (or dequantized) tensor, once per mover
            memo = (id(mover), id(current))
            if memo not in self.moved_cache:
                others = graph.inputs_of(mover)[1:]
                clone = graph.add_op(mover.op_type, [current, *others], [f"{graph.outputs_of(mover)[0].name}_q"],
                                     domain=mover.domain, after=mover)
                clone.attributes = dict(mover.attributes)
                out = graph.outputs_of(clone)[0]
                float_out = graph.outputs_of(mover)[0]
                if adjacent:
                    out.type = float_out.type
                else:
                    out.set_type(spec.elem_type, float_out.shape)
                # Shape readers get the same answer from the integer copy, so the float
                # chain is not kept alive just to be measured.
                for shape_reader in [r for r in graph.consumers(float_out) if r.op_type == "Shape"]:
                    graph.set_input(shape_reader, 0, out)
                self.moved_cache[memo] = out
            current = self.moved_cache[memo]
        if adjacent:
            return current, s.const.numpy()
        dq_key = (id(current), spec)
        if dq_key not in self.dq_cache:
            dq_op = graph.add_op("DequantizeLinear", [current, s] + ([z] if z is not None else []),
                                 [f"{value.name}_dequantized"], before=reader)
            dq_out = graph.outputs_of(dq_op)[0]
            if value.type is not None:
                dq_out.type = value.type
            self.dq_cache[dq_key] = dq_out
        return self.dq_cache[dq_key], s.const.numpy()

    def second_digit(self, op: Op, value: Value, scale: np.ndarray) -> None:
        """x = DQ(q1) + r; r lies within +-s/2 (plus clipping), so int8 with scale s/254 carries
        it. A second MatMul on the same integer weights adds r's contribution."""
        graph = self.graph
        first = graph.inputs_of(op)[0]
        sub = graph.add_op("Sub", [value, first], [f"{value.name}_residual"], before=op)
        residual = graph.outputs_of(sub)[0]
        residual.type = value.type
        digit = QSpec("int8", symmetric=True)
        s2 = graph.add_constant(f"{value.name}_residual_scale", np.float32(scale) / np.float32(254.0))
        z2 = graph.add_constant(f"{value.name}_residual_zero_point", np.int8(0))
        q2 = graph.add_op("QuantizeLinear", [residual, s2, z2], [f"{value.name}_residual_quantized"], before=op)
        dq2 = graph.add_op("DequantizeLinear", [graph.outputs_of(q2)[0], s2, z2],
                           [f"{value.name}_residual_dequantized"], before=op)
        graph.outputs_of(q2)[0].set_type(digit.elem_type, value.shape)
        graph.outputs_of(dq2)[0].type = value.type
        # ORT fuses a DQ -> MatMul pair only when the DQ has that one reader: own weight DQ.
        weight_dq = graph.producer(graph.inputs_of(op)[1])
        own_dq = graph.add_op("DequantizeLinear", graph.inputs_of(weight_dq), [f"{op.name}_second_weight"],
                              before=op)
        own_dq.attributes = dict(weight_dq.attributes)
        graph.outputs_of(own_dq)[0].type = graph.inputs_of(op)[1].type
        second = graph.add_op("MatMul", [graph.outputs_of(dq2)[0], graph.outputs_of(own_dq)[0]],
                              [f"{op.name}_second_digit"], after=op)
        out = graph.outputs_of(op)[0]
        total = graph.add_op("Add", [out, graph.outputs_of(second)[0]], [f"{out.name}_two_digit"], after=second)
        total_out = graph.outputs_of(total)[0]
        total_out.type = out.type
        for reader, slot in graph.uses(out):
            if reader is not total:
                graph.set_input(reader, slot, total_out)
        if graph.is_graph_output(out):
            _redirect(graph, out, total_out)

    def _activation_spec(self, source: Value, spec: QSpec) -> tuple[QSpec, tuple[float, float]]:
        override = self.overrides.tensor(source.name)
        if override is not None:
            if override.dtype:
                spec = spec.replace(dtype=override.dtype, qrange=None)
            if override.symmetric is not None:
                spec = spec.replace(symmetric=override.symmetric)
            if override.scale is not None and override.zero_point is not None:
                return spec.replace(fixed=(override.scale, override.zero_point)), (0.0, 0.0)
            if override.rmin is not None and override.rmax is not None:
                return spec, (override.rmin, override.rmax)
        if spec.fixed is not None:
            return spec, (0.0, 0.0)
        if source.name not in self.ranges:
            raise CalibrationError(f"no calibration range for tensor {source.name!r}",
                                   fix="pass calibration data (--calib) or a TensorQuantOverrides range")
        lo, hi = self.ranges[source.name]
        if spec.unsigned_when_nonnegative and spec.signed and np.all(np.asarray(lo) >= 0):
            spec = spec.replace(dtype="u" + spec.dtype, symmetric=False, qrange=None)  # zero point 0
        return spec, (lo, hi)

    def weight(self, value: Value, spec: QSpec, channel_axis: int, k_axis: int, reader: Op
               ) -> tuple[Value, np.ndarray]:
        graph = self.graph
        if spec.granularity == Granularity.BLOCK:
            spec = spec.replace(axis=k_axis)
        key = (value.name, spec, channel_axis)
        if key not in self.weight_values:
            tensor = graph.constant(value)
            if key not in self.arrays:
                self.arrays[key] = quantize_weight(tensor.numpy(), spec, channel_axis)
            q, scale, zero = self.arrays[key]
            q_init = graph.add_constant(f"{value.name}_quantized", stored(q))
            s = graph.add_constant(f"{value.name}_scale", scale)
            z = graph.add_constant(f"{value.name}_zero_point", stored(zero))
            attrs = {}
            if spec.granularity == Granularity.CHANNEL:
                attrs["axis"] = channel_axis
            elif spec.granularity == Granularity.BLOCK:
                attrs.update(axis=k_axis, block_size=int(spec.block_size))
            dq_op = graph.add_op("DequantizeLinear", [q_init, s, z], [f"{value.name}_dequantized"],
                                 attrs=attrs, before=reader)
            dq_out = graph.outputs_of(dq_op)[0]
            dq_out.set_type(onnx.TensorProto.FLOAT, tensor.dims)
            self.weights += 1
            self.bytes_before += tensor.nbytes
            self.bytes_after += q_init.const.nbytes + s.const.nbytes + z.const.nbytes
            self.weight_values[key] = (dq_out, scale)
        return self.weight_values[key]

    def nf4_linear(self, plan: OpPlan) -> None:
        """MatMul(x, W) or Gemm(x, W, bias) with NF4 weights -> MatMulBnb4(x, codes, absmax)
        (+ bias). The activation stays float (MatMulBnb4 is weight-only)."""
        graph, op = self.graph, plan.op
        ins = graph.inputs_of(op)
        spec = plan.weights[1]
        if plan.activations or op.op_type not in ("MatMul", "Gemm") or set(plan.weights) != {1} or (
                op.op_type == "Gemm" and (op.attr("transA", 0) or op.attr("alpha", 1.0) != 1.0
                                          or op.attr("beta", 1.0) != 1.0)):
            raise OptionError(f"{op.name}: nf4 weights take weight-only MatMul/Gemm linears (MatMulBnb4), "
                              f"not this {op.op_type}", fix="use --activations float, or int4 weights")
        tensor = graph.constant(ins[1])
        w = tensor.numpy().astype(np.float32)
        if op.op_type == "Gemm" and op.attr("transB", 0):
            w = w.T
        k, n = w.shape
        key = (ins[1].name, spec, bool(op.op_type == "Gemm" and op.attr("transB", 0)))
        if key not in self.weight_values:
            packed, absmax = quantize_nf4(w, int(spec.block_size))
            codes = graph.add_constant(f"{ins[1].name}_nf4", packed)
            scales = graph.add_constant(f"{ins[1].name}_absmax", absmax)
            self.weights += 1
            self.bytes_before += tensor.nbytes
            self.bytes_after += codes.const.nbytes + scales.const.nbytes
            self.weight_values[key] = (codes, scales)
        codes, scales = self.weight_values[key]
        if graph.model is not None:
            graph.model.opset_imports.setdefault("com.microsoft", 1)
        out = graph.outputs_of(op)[0]
        bnb = graph.add_op("MatMulBnb4", [ins[0], codes, scales], [f"{out.name}_nf4"], domain="com.microsoft",
                           name=f"{op.name}_nf4", attrs={"K": k, "N": n, "block_size": int(spec.block_size),
                                                         "quant_type": QUANT_TYPE_NF4}, after=op)
        result = graph.outputs_of(bnb)[0]
        result.type = out.type
        if op.op_type == "Gemm" and len(ins) > 2 and ins[2] is not None:
            add = graph.add_op("Add", [result, ins[2]], [f"{out.name}_bias"], after=bnb)
            result = graph.outputs_of(add)[0]
            result.type = out.type
        graph.remove_op(op, remove_outputs=False)
        graph.replace_all_uses(out, result)
        graph.remove_value(out)
        graph.rename_value(result, out.name)  # downstream names (and graph outputs) are unchanged

    def embedding(self, gather: Op, table: Value, spec: QSpec) -> None:
        """Gather(int8 table) -> Cast -> Mul(per-hidden-channel scale): only the gathered rows are
        dequantized. For a symmetric table this is exactly DequantizeLinear(axis=-1), written as
        Cast+Mul because ORT's per-axis DequantizeLinear is a slow scalar path."""
        graph = self.graph
        tensor = graph.constant(table)
        spec = spec.replace(symmetric=True)
        q, scale, _ = quantize_weight(tensor.numpy(), spec, channel_axis=-1)
        q_init = graph.add_constant(f"{table.name}_quantized", q)
        s = graph.add_constant(f"{table.name}_scale", scale)
        ids = graph.inputs_of(gather)[1]
        out = graph.outputs_of(gather)[0]
        new_gather = graph.add_op("Gather", [q_init, ids], [f"{out.name}_quantized"], after=gather)
        new_gather.attributes = dict(gather.attributes)
        cast = graph.add_op("Cast", [graph.outputs_of(new_gather)[0]], [f"{out.name}_cast"],
                            attrs={"to": onnx.TensorProto.FLOAT}, after=new_gather)
        mul = graph.add_op("Mul", [graph.outputs_of(cast)[0], s], [f"{out.name}_dq"], after=cast)
        dq_out = graph.outputs_of(mul)[0]
        dq_out.type = out.type
        _redirect(graph, out, dq_out, keep_name=True)  # the embedding's output name stays meaningful
        self.weights += 1
        self.bytes_before += tensor.nbytes
        self.bytes_after += q_init.const.nbytes + s.const.nbytes

    def bias(self, op: Op, bias: Value, scale: np.ndarray) -> None:
        graph = self.graph
        data = graph.constant(bias).numpy().astype(np.float64)
        scale = np.broadcast_to(np.asarray(scale, np.float32), data.shape).astype(np.float32)
        q = np.clip(np.round(data / scale.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
        q_init = graph.add_constant(f"{bias.name}_quantized", q)
        s = graph.add_constant(f"{bias.name}_scale", scale)
        z = graph.add_constant(f"{bias.name}_zero_point", np.zeros(q.shape, np.int32))
        dq = graph.add_op("DequantizeLinear", [q_init, s, z], [f"{bias.name}_dequantized"],
                          attrs={"axis": 0}, before=op)
        graph.set_input(op, 2, graph.outputs_of(dq)[0])


def _weight_axes(op: Op, ndim: int) -> tuple[int, int]:
    """(output-channel axis, reduction axis K) of an op's weight input."""
    if op.op_type == "Gemm":
        return (0, 1) if op.attr("transB", 0) else (1, 0)
    if op.op_type == "Conv":
        return 0, 1
    if op.op_type == "ConvTranspose":  # weight [C_in, C_out / group, kH, kW]: outputs along axis 1
        return 1, 0
    return ndim - 1, ndim - 2  # MatMul: [..., K, N]


def _redirect(graph: Graph, old: Value, new: Value, *, keep_name: bool = False) -> None:
    """Readers of `old` read `new`; a graph output (or, with keep_name, any value) keeps its name."""
    graph.replace_all_uses(old, new)
    if keep_name or graph.is_graph_output(new):
        name = old.name
        graph.rename_value(old, graph.unique_name(f"{name}_float"))
        graph.rename_value(new, name)
