"""The fusion check: let ONNX Runtime optimise a QDQ model as it would run it, and read its
optimised graph for the integer kernels the quantized ops became and the float compute ops
that still read a DequantizeLinear output (QDQ groups ORT did not fuse)."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import onnx
import onnxruntime as ort

from edgeq.runtime.sessions import make_session

# Kernels ONNX Runtime runs quantized ops on once it has fused the QDQ groups.
INTEGER_KERNELS = frozenset({
    "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "MatMulNBits", "QLinearConv", "ConvInteger",
    "QGemm", "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QAttention", "QLinearSoftmax",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearAveragePool",
    "QLinearReduceMean", "QLinearWhere", "QEmbedLayerNormalization", "GatherBlockQuantized",
})
_COMPUTE = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "FusedMatMul", "FusedConv", "FusedGemm"})


@dataclass
class FusionReport:
    integer_kernels: dict[str, int]
    unfused: list[str]          # float compute ops that still read a DequantizeLinear output
    dequantize_left: int

    @property
    def all_fused(self) -> bool:
        return not self.unfused


def fusion_report(model_path: str | os.PathLike, *, providers=("CPUExecutionProvider",),
                  config: Iterable[tuple[str, str]] = ()) -> FusionReport:
    """Let ORT optimize the model as it would run it, and read its optimized graph."""
    with tempfile.TemporaryDirectory(prefix="edgeq-ort-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        make_session(str(model_path), providers=providers, config=config, optimized_path=str(optimized),
                     level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        model = onnx.load(str(optimized), load_external_data=False)
    return _fusion_from_graph(model.graph)


def _fusion_from_graph(graph: onnx.GraphProto) -> FusionReport:
    producers = {o: n for n in graph.node for o in n.output}
    kernels = Counter(n.op_type for n in graph.node if n.op_type in INTEGER_KERNELS)
    unfused = []
    for node in graph.node:
        if node.op_type not in _COMPUTE:
            continue
        if any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input):
            unfused.append(node.name or node.op_type)
    dq_left = sum(1 for n in graph.node if n.op_type == "DequantizeLinear")
    return FusionReport(dict(sorted(kernels.items())), unfused, dq_left)
