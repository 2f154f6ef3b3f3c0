"""Work counts of a compiled ONNX model, and the report of their price on a target.

`count_work` counts target-independent work, keyed as qonnx's inference-cost analysis keys it
(`analysis/inference_cost.py`: op_mac_INT8_INT8, mem_w_..., in lower case here):

    op_mac_<activation dtype>_<weight dtype>  multiply-accumulates of MatMul, Gemm and Conv (and
                                              their integer forms: MatMulInteger, QLinearMatMul,
                                              ConvInteger, QLinearConv, com.microsoft QGemm,
                                              MatMulIntegerToFloat, MatMulNBits)
    weight_bytes_<dtype>                      stored bytes of those ops' constant weights and of
                                              embedding tables (Gather on a constant), once each
    activation_bytes_<dtype>                  bytes of the non-constant operands those ops read,
                                              per inference

The dtype of an operand is the dtype it is stored in: looking through DequantizeLinear (and
the data movement between it and the op) to its integer input, else the operand's own dtype
(float32 for a float MatMul, so float ops count as op_mac_float32_float32). One rule follows
ONNX Runtime instead of the storage, because its CPU provider computes differently from what
is stored: a MatMul (or untransposed Gemm) of a float activation and a dequantized 2-D constant
4- or 8-bit weight is fused into MatMulNBits, which at ORT's default accuracy level (4, CompInt8) quantizes the
activation to int8 on the fly, so it counts as op_mac_int8_<weight dtype> (e.g. W4A16 as
op_mac_int8_int4); an explicit MatMulNBits counts as int8 x uint<bits> at accuracy level 4,
else as <activation float dtype> x uint<bits>. How each pair then runs (at what rate) is the
target's price table's business (targets/base.py `CostModel`).

Shapes: the model's static dims, else the `input_shapes` given, else those a compile recorded
in the model metadata (edgeq.metadata.INPUT_SHAPES_KEY); dims inside the graph come from ONNX shape
inference on a weight-less copy, with shape arithmetic folded.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from edgeq.errors import CostModelError
from edgeq.metadata import recorded_input_shapes

_DTYPE_NAMES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
                TensorProto.DOUBLE: "float64", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8",
                TensorProto.INT16: "int16", TensorProto.UINT16: "uint16", TensorProto.INT32: "int32",
                TensorProto.UINT32: "uint32", TensorProto.INT64: "int64", TensorProto.UINT64: "uint64",
                TensorProto.INT4: "int4", TensorProto.UINT4: "uint4", TensorProto.BOOL: "bool"}
_BITS = {"int4": 4, "uint4": 4, "int8": 8, "uint8": 8, "bool": 8, "int16": 16, "uint16": 16, "float16": 16,
         "bfloat16": 16, "int32": 32, "uint32": 32, "float32": 32, "int64": 64, "uint64": 64, "float64": 64}
if hasattr(TensorProto, "INT2"):
    _DTYPE_NAMES.update({TensorProto.INT2: "int2", TensorProto.UINT2: "uint2"})
    _BITS.update(int2=2, uint2=2)

# MAC ops: op type -> (activation slot, weight slot, kind of MAC count).
_MAC_OPS = {
    ("", "MatMul"): (0, 1, "matmul"), ("", "MatMulInteger"): (0, 1, "matmul"),
    ("", "QLinearMatMul"): (0, 3, "matmul"), ("com.microsoft", "MatMulIntegerToFloat"): (0, 1, "matmul"),
    ("com.microsoft", "MatMulNBits"): (0, 1, "nbits"), ("com.microsoft", "MatMulBnb4"): (0, 1, "bnb4"),
    ("", "Gemm"): (0, 1, "gemm"), ("com.microsoft", "QGemm"): (0, 3, "gemm"),
    ("", "Conv"): (0, 1, "conv"), ("", "ConvInteger"): (0, 1, "conv"), ("", "QLinearConv"): (0, 3, "conv"),
}
# Ops that multiply-accumulate in ways not counted here: they raise rather than count zero.
_UNCOUNTED_MAC_OPS = frozenset({"ConvTranspose", "Attention", "MultiHeadAttention", "GroupQueryAttention",
                                "QAttention", "FusedMatMul", "FusedConv", "NhwcConv", "QLinearConvTranspose",
                                "DynamicQuantizeMatMul", "LSTM", "GRU", "RNN", "DeformConv"})
_LOOK_THROUGH = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
# MatMulNBits' accuracy level that ORT's DQ -> MatMul fusion gives by default
# (session.qdq_matmulnbits_accuracy_level, "4" if unset): CompInt8, the activation as int8.
ORT_MATMULNBITS_ACCURACY_LEVEL = 4
_SMALL_CONSTANT = 4096  # elements: constants that keep their data for shape inference


@dataclass(frozen=True)
class WorkCounts:
    """Target-independent work of one inference, with the input shapes it was counted at."""

    counts: dict[str, int]
    input_shapes: dict[str, tuple[int, ...]]
    shapes_from: str     # "the model", "given", "recorded at compile time" (joined when mixed)

    @property
    def macs(self) -> int:
        return sum(v for k, v in self.counts.items() if k.startswith("op_mac_"))


@dataclass(frozen=True)
class CostReport:
    """Work counts of a model and their price in a target's unit (cycles on one core, ...)."""

    unit: str
    counts: Mapping[str, int]
    costs: Mapping[str, float]          # priced counts only
    input_shapes: Mapping[str, list[int]]
    shapes_from: str
    clock_hz: float | None = None
    assumptions: tuple[str, ...] = ()
    source: str = ""

    @property
    def total(self) -> float:
        return float(sum(self.costs.values()))

    @property
    def seconds(self) -> float | None:
        return self.total / self.clock_hz if self.clock_hz else None

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "total": self.total, "costs": dict(self.costs), "counts": dict(self.counts),
                "input_shapes": {k: list(v) for k, v in self.input_shapes.items()}, "shapes_from": self.shapes_from,
                "clock_hz": self.clock_hz, "seconds": self.seconds, "assumptions": list(self.assumptions),
                "source": self.source}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        macs = sum(v for k, v in self.counts.items() if k.startswith("op_mac_"))
        shapes = ", ".join(f"{k}={list(v)}" for k, v in self.input_shapes.items()) or "none"
        lines = [f"work: {macs:,} MACs at input shapes {shapes} ({self.shapes_from})"]
        width = max((len(k) for k in self.counts), default=0)
        for key, count in sorted(self.counts.items()):
            priced = f"{_number(self.costs[key])} {self.unit}" if key in self.costs else "not priced"
            lines.append(f"  {key:<{width}}  {count:>16,}  {priced}")
        total = f"total: {_number(self.total)} {self.unit}"
        if self.seconds is not None:
            total += f" = {self.seconds * 1e3:.4g} ms at {self.clock_hz / 1e9:g} GHz"
        else:
            total += " (the target declares no clock: no time)"
        lines.append(total)
        lines += [f"assumes: {a}" for a in self.assumptions]
        if self.source:
            lines.append(f"source: {self.source}")
        return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def count_work(model: str | os.PathLike | onnx.ModelProto, *,
               input_shapes: Mapping[str, Sequence[int]] | None = None) -> WorkCounts:
    """The work counts of one inference of `model` (see the module docstring for the keys and
    the dtype rule). Symbolic input dims take `input_shapes`, else the recorded ones."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model), load_external_data=False)
    shapes, shapes_from = _input_shapes(model, input_shapes)
    elems, dims = static_types(model, shapes if shapes_from != "the model" else None)
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output if out}
    constants = {t.name for t in graph.initializer} | {
        node.output[0] for node in graph.node if node.op_type == "Constant" and node.output}
    counter = _Counter(elems, dims, producers, constants)
    for node in graph.node:
        counter.count(node)
    return WorkCounts(dict(sorted(counter.counts.items())), shapes, shapes_from)


def _input_shapes(model: onnx.ModelProto, given: Mapping[str, Sequence[int]] | None
                  ) -> tuple[dict[str, tuple[int, ...]], str]:
    initializers = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in initializers]
    given = {k: tuple(int(d) for d in v) for k, v in (given or {}).items()}
    unknown = sorted(set(given) - {vi.name for vi in inputs})
    if unknown:
        raise CostModelError(f"--input-shape names no input of the model: {', '.join(unknown)}",
                             fix=f"use one of {', '.join(vi.name for vi in inputs)}")
    props = {p.key: p.value for p in model.metadata_props}
    recorded = {k: tuple(v) for k, v in recorded_input_shapes(props).items()}
    shapes: dict[str, tuple[int, ...]] = {}
    sources: list[str] = []
    for vi in inputs:
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in vi.type.tensor_type.shape.dim]
        if vi.name in given:
            shape = given[vi.name]
            if len(shape) != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims, shape)):
                raise CostModelError(f"--input-shape {vi.name}={','.join(map(str, shape))} does not fit the "
                                     f"input's dims {dims}", fix="give one dim per axis, equal to the static ones")
            source = "given"
        elif all(isinstance(d, int) for d in dims):
            shape, source = tuple(dims), "the model"
        elif vi.name in recorded:
            shape, source = recorded[vi.name], "recorded at compile time"
        else:
            raise CostModelError(f"input {vi.name} has symbolic dims {dims} and the model records no shape for it",
                                 fix=f"pass --input-shape {vi.name}=D0,D1,...")
        shapes[vi.name] = shape
        if source not in sources:
            sources.append(source)
    return shapes, ", ".join(sources) or "the model"


def static_types(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None
                 ) -> tuple[dict[str, int], dict[str, tuple[int | None, ...]]]:
    """Element types and dims of every value, by ONNX shape inference on a weight-less copy of
    `model` with `input_shapes` set and shape arithmetic folded into constants."""
    lean = weightless_copy(model, input_shapes)
    _as_plain_matmuls(lean)
    for _ in range(8):  # each round folds what the previous inference made static
        inferred = _infer(lean)
        lean, folded = _fold_shape_arithmetic(lean, inferred)
        if not folded:
            break
    elems, dims = _value_types(inferred)
    for tensor in model.graph.initializer:
        elems[tensor.name], dims[tensor.name] = tensor.data_type, tuple(tensor.dims)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    elems[node.output[0]], dims[node.output[0]] = attr.t.data_type, tuple(attr.t.dims)
    return elems, dims


def weightless_copy(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None) -> onnx.ModelProto:
    """`model` for shape inference: large initializers become typed graph inputs (no weight is
    copied); inputs named in `input_shapes` get those dims."""
    graph, lean = model.graph, onnx.ModelProto()
    lean.ir_version = model.ir_version
    lean.opset_import.extend(model.opset_import)
    lean.functions.extend(model.functions)
    g = lean.graph
    g.name = graph.name
    g.node.extend(graph.node)
    g.output.extend(graph.output)
    if not input_shapes:  # stale symbolic value_info would hold back the given dims
        g.value_info.extend(graph.value_info)
    initializers = {t.name for t in graph.initializer}
    for vi in graph.input:
        if vi.name in initializers:
            continue
        if input_shapes and vi.name in input_shapes:
            vi = onnx.helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, list(input_shapes[vi.name]))
        g.input.append(vi)
    for tensor in graph.initializer:
        if math.prod(tensor.dims) <= _SMALL_CONSTANT and not tensor.data_location:
            g.initializer.append(tensor)
        else:
            g.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return lean


def _infer(lean: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(lean, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CostModelError(f"ONNX shape inference failed on the model: {first}",
                             fix="check the model with onnx.checker, or pass --input-shape for its inputs") from None


def _value_types(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, tuple[int | None, ...]]]:
    elems: dict[str, int] = {}
    dims: dict[str, tuple[int | None, ...]] = {}
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if not vi.type.HasField("tensor_type"):
            continue
        elems[vi.name] = vi.type.tensor_type.elem_type
        if vi.type.tensor_type.HasField("shape"):
            dims[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                  for d in vi.type.tensor_type.shape.dim)
    return elems, dims


# Ops evaluated here when all their inputs are known small integer constants: the shape
# arithmetic exporters write (Shape -> Gather -> Concat -> Reshape, position ids sliced to a
# sequence length), which onnx's data propagation does not always carry through.
_SHAPE_ARITHMETIC = frozenset({"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Add", "Sub",
                               "Mul", "Div", "Range", "Equal", "Where", "ConstantOfShape", "Reshape", "Expand"})


def _fold_shape_arithmetic(lean: onnx.ModelProto, inferred: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """`lean` with shape arithmetic on static shapes replaced by constants (nothing larger than
    _SMALL_CONSTANT elements), and whether anything was folded."""
    from onnx.reference import ReferenceEvaluator

    _, dims = _value_types(inferred)
    values = {t.name: numpy_helper.to_array(t) for t in lean.graph.initializer}
    kept, folded = [], []
    for node in lean.graph.node:
        value = None
        if node.domain in ("", "ai.onnx") and node.op_type == "Shape" and dims.get(node.input[0]) is not None \
                and all(d is not None for d in dims[node.input[0]]):
            shape = np.array(dims[node.input[0]], np.int64)
            attrs = {a.name: a.i for a in node.attribute}
            value = shape[attrs.get("start", 0):attrs.get("end", len(shape))]
        elif node.domain in ("", "ai.onnx") and node.op_type in _SHAPE_ARITHMETIC and len(node.output) == 1 \
                and node.input and all(not i or (i in values and values[i].size <= _SMALL_CONSTANT
                                                 and values[i].dtype.kind in "iub") for i in node.input):
            single = onnx.helper.make_model(
                onnx.helper.make_graph([node], "fold", [], [onnx.helper.make_tensor_value_info(
                    node.output[0], TensorProto.UNDEFINED, None)],
                    [numpy_helper.from_array(values[i], i) for i in dict.fromkeys(node.input) if i]),
                opset_imports=lean.opset_import)
            try:
                value = np.asarray(ReferenceEvaluator(single).run(None, {})[0])
            except Exception:  # noqa: BLE001 - not foldable here: inference decides as before
                value = None
            if value is not None and value.size > _SMALL_CONSTANT:
                value = None
        if value is None:
            kept.append(node)
            continue
        values[node.output[0]] = value
        folded.append(numpy_helper.from_array(value, node.output[0]))
    if not folded:
        return lean, False
    out = onnx.ModelProto()
    out.CopyFrom(lean)
    del out.graph.node[:]
    out.graph.node.extend(kept)
    out.graph.initializer.extend(folded)
    return out, True


# com.microsoft linears with a packed weight, which ONNX shape inference does not know: for
# inference alone they stand in `lean` as a MatMul of A by a weightless [K, N] input.
_PACKED_LINEARS = frozenset({"MatMulBnb4", "MatMulNBits"})


def _as_plain_matmuls(lean: onnx.ModelProto) -> None:
    """Replace (in place) each packed-weight linear of `lean` by MatMul(A, W) with W a typed
    [K, N] graph input (no data): the same output shape, which inference then carries on."""
    nodes = list(lean.graph.node)
    for index, node in enumerate(nodes):
        if node.domain != "com.microsoft" or node.op_type not in _PACKED_LINEARS or not node.output:
            continue
        attrs = {a.name: a.i for a in node.attribute if a.name in ("K", "N")}
        if set(attrs) != {"K", "N"}:
            continue
        weight = f"{node.output[0]}__shape_of_packed_weight"
        lean.graph.input.append(onnx.helper.make_tensor_value_info(weight, TensorProto.FLOAT, [attrs["K"], attrs["N"]]))
        nodes[index] = onnx.helper.make_node("MatMul", [node.input[0], weight], [node.output[0]], name=node.name)
    del lean.graph.node[:]
    lean.graph.node.extend(nodes)


class _Counter:
    """Adds up the counts node by node."""

    def __init__(self, elems: dict[str, int], dims: dict[str, tuple], producers: dict[str, onnx.NodeProto],
                 constants: set[str]):
        self.elems, self.dims, self.producers, self.constants = elems, dims, producers, constants
        self.counts: dict[str, int] = {}
        self.weights_seen: set[str] = set()

    def add(self, key: str, amount: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + int(amount)

    def count(self, node: onnx.NodeProto) -> None:
        domain = "" if node.domain == "ai.onnx" else node.domain
        if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute) \
                and _has_mac_ops(node):
            raise CostModelError(f"{node.op_type} '{node.name}' holds MatMul/Gemm/Conv ops in a subgraph, which are "
                                 "not counted", fix="estimate a model without control flow around its linears")
        if node.op_type in _UNCOUNTED_MAC_OPS:
            raise CostModelError(f"cannot count the MACs of {node.op_type} '{node.name}'",
                                 fix="estimate the compiled model (its front end rewrites fused ops into "
                                     "MatMul/Softmax forms)")
        if node.op_type == "Gather" and domain == "" and node.input[0] in self.constants \
                and len(self.dims.get(node.input[0]) or ()) == 2:  # an embedding table
            self._weight_bytes(node.input[0], _dtype(self.elems.get(node.input[0])))
            return
        if node.op_type == "Einsum" and domain == "":
            self._count_einsum(node)
            return
        spec = _MAC_OPS.get((domain, node.op_type))
        if spec is None:
            return
        a_slot, w_slot, kind = spec
        a_name, w_name = node.input[a_slot], node.input[w_slot]
        a_source, a_dtype = self._stored(a_name)
        w_source, w_dtype = self._stored(w_name)
        out = self._static(node, node.output[0])
        if kind == "conv":
            macs = math.prod(out) * math.prod(self._static(node, w_name)[1:])
        else:
            a_dims = self._static(node, a_name)
            if kind == "gemm":
                trans_a = any(a.name == "transA" and a.i for a in node.attribute)
                k = a_dims[0] if trans_a else a_dims[-1]
            else:
                k = a_dims[-1]
            macs = math.prod(out) * k
        if kind == "bnb4":  # 4-bit NormalFloat (quant_type 1) or FP4 (0) codes, float activations
            attrs = {a.name: a.i for a in node.attribute}
            w_dtype = "nf4" if attrs.get("quant_type", 1) == 1 else "fp4"
        elif kind == "nbits":
            attrs = {a.name: a.i for a in node.attribute}
            w_dtype = f"uint{attrs.get('bits', 4)}"
            if attrs.get("accuracy_level", 0) == ORT_MATMULNBITS_ACCURACY_LEVEL:
                a_dtype = "int8"
        elif _fused_into_matmulnbits(node, domain, a_source, a_dtype, w_source, w_dtype, self):
            a_dtype = "int8"  # ORT: DQ -> MatMul/Gemm becomes MatMulNBits, the activation quantized to int8
        self.add(f"op_mac_{a_dtype}_{w_dtype}", macs)
        for name, source, dtype in ((a_name, a_source, a_dtype), (w_name, w_source, w_dtype)):
            stored = source or name
            if stored in self.constants:
                self._weight_bytes(stored, dtype)
            else:  # bytes as stored in memory (a weight-only linear reads float activations)
                stored_dtype = _dtype(self.elems.get(stored))
                self.add(f"activation_bytes_{stored_dtype}", _nbytes(self._static(node, name), stored_dtype))

    def _count_einsum(self, node: onnx.NodeProto) -> None:
        """An Einsum multiplies once per combination of its index letters (output and summed
        ones): the product of every letter's size, times the output's broadcast (`...`) size.
        Online Hadamards are Einsums of an activation with a constant factor (edgeq's rotation)."""
        equation = next(a.s.decode() for a in node.attribute if a.name == "equation").replace(" ", "")
        operands = equation.split("->")[0].split(",")
        if len(operands) != len(node.input) or len(operands) > 2:
            raise CostModelError(f"Einsum '{node.name}' with {len(node.input)} operands ({equation}) is not counted",
                                 fix="estimate a model whose Einsums take one or two operands")
        sizes: dict[str, int] = {}
        broadcast = 1
        for operand, name in zip(operands, node.input):
            dims = self._static(node, name)
            letters = operand.replace("...", "")
            tail = dims[len(dims) - len(letters):] if letters else ()
            if "..." in operand:
                ellipsis = dims[:len(dims) - len(letters)]
                broadcast = max(broadcast, math.prod(ellipsis))
            for letter, size in zip(letters, tail):
                sizes[letter] = max(sizes.get(letter, 1), size)
        macs = math.prod(sizes.values()) * broadcast
        stored = [self._stored(name) for name in node.input]
        a_dtype = stored[0][1]
        w_dtype = stored[1][1] if len(stored) > 1 else a_dtype
        self.add(f"op_mac_{a_dtype}_{w_dtype}", macs)
        for name, (source, dtype) in zip(node.input, stored):
            if (source or name) in self.constants:
                self._weight_bytes(source or name, dtype)
            else:
                self.add(f"activation_bytes_{dtype}", _nbytes(self._static(node, name), dtype))

    def _stored(self, name: str) -> tuple[str | None, str]:
        """(integer tensor a DequantizeLinear reads, its dtype) behind operand `name`, looking
        through data movement; (None, the operand's own dtype) when no DQ feeds it."""
        current = name
        while True:
            producer = self.producers.get(current)
            if producer is None:
                break
            if producer.op_type == "DequantizeLinear" and producer.domain in ("", "ai.onnx"):
                source = producer.input[0]
                return source, _dtype(self.elems.get(source))
            if producer.op_type not in _LOOK_THROUGH or producer.domain not in ("", "ai.onnx"):
                break
            current = producer.input[0]
        return None, _dtype(self.elems.get(name))

    def _static(self, node: onnx.NodeProto, name: str) -> tuple[int, ...]:
        dims = self.dims.get(name)
        if dims is None or any(d is None for d in dims):
            raise CostModelError(f"{node.op_type} '{node.name}': the shape of '{name}' is not static "
                                 f"({'unknown' if dims is None else list(dims)})",
                                 fix="pass --input-shape NAME=D0,D1,... for the model's symbolic inputs")
        return tuple(dims)

    def _weight_bytes(self, name: str, dtype: str) -> None:
        """Bytes of constant `name` as stored (a MatMulNBits' packed uint8 blob included), under
        the dtype its op reads it as."""
        if name in self.weights_seen:
            return
        self.weights_seen.add(name)
        self.add(f"weight_bytes_{dtype}", _nbytes(self.dims.get(name) or (), _dtype(self.elems.get(name))))


def _fused_into_matmulnbits(node: onnx.NodeProto, domain: str, a_source: str | None, a_dtype: str,
                            w_source: str | None, w_dtype: str, counter: _Counter) -> bool:
    """Whether ONNX Runtime's CPU provider turns this weight-only linear into MatMulNBits: a float
    activation times a dequantized 2-D constant 4- or 8-bit weight, in a MatMul or an
    untransposed Gemm (as onnxruntime 1.32's optimized graphs show)."""
    if domain or node.op_type not in ("MatMul", "Gemm") or a_source is not None:
        return False
    if node.op_type == "Gemm" and any(a.name in ("transA", "transB") and a.i for a in node.attribute):
        return False
    return (a_dtype.startswith(("float", "bfloat")) and w_source in counter.constants
            and w_dtype.startswith(("int", "uint")) and _BITS.get(w_dtype) in (4, 8)
            and len(counter.dims.get(w_source) or ()) == 2)


def _has_mac_ops(node: onnx.NodeProto) -> bool:
    for attr in node.attribute:
        for graph in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            for inner in graph.node:
                if (inner.domain if inner.domain != "ai.onnx" else "", inner.op_type) in _MAC_OPS \
                        or inner.op_type in _UNCOUNTED_MAC_OPS or _has_mac_ops(inner):
                    return True
    return False


def _dtype(elem: int | None) -> str:
    if not elem:
        return "unknown"
    return _DTYPE_NAMES.get(elem) or TensorProto.DataType.Name(elem).lower()


def _nbytes(dims: Sequence[int], dtype: str) -> int:
    return math.ceil(math.prod(dims) * _BITS.get(dtype, 8) / 8)
