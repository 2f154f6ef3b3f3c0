"""The fusion check: let ONNX Runtime optimise a QDQ model as it would run it, and read its
optimised graph for the integer kernels the quantized ops became and the float compute ops
that still read a DequantizeLinear output (QDQ groups ORT did not fuse)."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import onnx
import onnxruntime as ort

from edgeq.runtime.sessions import make_session
from edgeq.runtime.execution import Execution

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
    """Where a compiled model ran and whether its quantized ops became integer kernels there
    (edgeq.runtime.placement fills in the provider's part)."""

    integer_kernels: dict[str, int]
    unfused: list[str]          # quantized compute ops left in float (ORT: a float op reading a DQ output)
    dequantize_left: int
    provider: str = "CPUExecutionProvider"
    via: str = "onnxruntime"                # or the runtime used directly ("openvino package")
    check: str = "ort-optimized-graph"      # how the kernels were read
    nodes_by_provider: dict[str, int] = field(default_factory=dict)  # ORT's node assignment
    float_layers: dict[str, int] = field(default_factory=dict)       # OpenVINO: compute layers by precision

    @property
    def all_fused(self) -> bool:
        return not self.unfused


def fusion_report(model_path: str | os.PathLike, *, providers=("CPUExecutionProvider",),
                  config: Iterable[tuple[str, str]] = (), execution: Execution | None = None,
                  threads: int = 0) -> FusionReport:
    """Let ORT optimize the model as it would run it (on `execution`, default the CPU provider,
    or the built-in `providers`), and read its optimized graph."""
    if execution is None:
        execution = Execution(name=providers[0], provider=providers[0])
    with tempfile.TemporaryDirectory(prefix="edgeq-ort-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        make_session(str(model_path), threads, config=config, execution=execution, optimized_path=str(optimized),
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
