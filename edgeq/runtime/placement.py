"""The placement and lowering check, per provider: where each node of a compiled model runs and
whether its quantized ops (a MatMul/Gemm/Conv reading a DequantizeLinear output) became integer
kernels there. Which check applies is target data (`Execution.placement_check`):

- "ort-optimized-graph" (ONNX Runtime's CPU provider): the graph ORT optimizes for the
  provider; its integer kernels (QGemm, MatMulIntegerToFloat, MatMulNBits, ...) and the float
  compute ops still reading a DQ output (edgeq.runtime.fusion);
- "openvino-runtime-precision" (OpenVINO): the runtime model OpenVINO's CPU plugin compiled
  with the deployment settings, and the precision each layer runs in; a quantized ONNX op whose
  layer runs in f32/bf16 was not lowered to int8 (LPT did not take its QDQ pattern);
- "qnn-htp-nodes" (QNN's HTP, CPU fallback disabled): the session on the provider holds every
  node or fails naming those it does not take (edgeq.runtime.sessions); every quantized op must
  be in a QDQ node unit (from the provider's verbose log: an op validated alone reads DQ outputs
  and runs in float on the NPU, a one-line error naming it); the report counts the ops it took
  by type, Q/DQ apart.

Both also count the nodes ONNX Runtime assigned to each provider, where it ran the session.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import onnx

from edgeq.runtime.fusion import FusionReport, fusion_report
from edgeq.runtime.providers import ProviderError, require
from edgeq.runtime.execution import Execution

_COMPUTE = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
_INTEGER_PRECISIONS = frozenset({"u8", "i8", "I8", "U8", "i4", "u4"})
# OpenVINO layers that compute (the rest moves, converts or normalizes data).
_OPENVINO_COMPUTE = frozenset({"FullyConnected", "MatMul", "Convolution", "Deconvolution", "Subgraph",
                               "ScaledDotProductAttention", "GroupConvolution"})


def check_placement(model_path: str | os.PathLike, execution: Execution, threads: int = 0) -> FusionReport:
    """The placement of `model_path` on `execution` (see the module notes)."""
    available = require(execution)
    report = _CHECKS[execution.placement_check](Path(model_path), execution, threads)
    report.provider = execution.provider + (f" ({execution.device})" if execution.device else "")
    report.via = "onnxruntime" if available.via == "onnxruntime" else f"{execution.plugin.direct_runtime} package"
    if available.via == "onnxruntime":
        report.nodes_by_provider = nodes_by_provider(model_path, execution, threads)
    return report


def nodes_by_provider(model_path: str | os.PathLike, execution: Execution, threads: int = 0) -> dict[str, int]:
    """How many of the (optimized) graph's nodes ONNX Runtime assigned to each provider."""
    from edgeq.runtime.sessions import make_session

    session = make_session(str(model_path), threads, execution=execution,
                           config=[("session.record_ep_graph_assignment_info", "1")])
    if not hasattr(session, "get_provider_graph_assignment_info"):
        return {}
    counts: Counter[str] = Counter()
    for subgraph in session.get_provider_graph_assignment_info():
        counts[subgraph.ep_name] += len(subgraph.get_nodes())
    return dict(sorted(counts.items()))


def quantized_compute_ops(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The compute ops that read a DequantizeLinear output (the quantized ones)."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    return [n for n in graph.node if n.op_type in _COMPUTE
            and any(i in producers and producers[i].op_type == "DequantizeLinear" for i in n.input)]


def _ort_graph(model_path: Path, execution: Execution, threads: int) -> FusionReport:
    return fusion_report(model_path, execution=execution, threads=threads)


def _openvino(model_path: Path, execution: Execution, threads: int) -> FusionReport:
    import importlib.util

    from edgeq.runtime.openvino_direct import runtime_layers

    if importlib.util.find_spec("openvino") is None:  # the provider alone: no runtime model to read
        return FusionReport({}, [], 0, check="openvino-runtime-precision: not checked, the openvino package is "
                                              f"missing ({execution.install_hint})")
    layers = runtime_layers(model_path, execution, threads)
    model = onnx.load(str(model_path), load_external_data=False)
    compute_names = {name for n in model.graph.node if n.op_type in _COMPUTE for name in (n.name, *n.output)}
    # OpenVINO names a layer after the ONNX node or its output, and the parts of a decomposed op
    # NAME/part (a Gemm's matmul is NAME/WithoutBiases); a Subgraph computes if it holds a MatMul.
    layer_of: dict[str, object] = {}
    computing = []
    for layer in layers:
        # Every NAME/part names NAME too; a matmul merged into another layer keeps its weight's
        # NAME/.../transpose_b feeding it.
        sources = [*layer.original, *(n for n in layer.input_original if n.endswith("/transpose_b"))]
        names = {"/".join(parts[:k]) for n in sources for parts in [n.split("/")] for k in range(2, len(parts) + 1)}
        names |= set(layer.original)
        if layer.type in _OPENVINO_COMPUTE and (layer.type != "Subgraph" or names & compute_names):
            computing.append(layer)
            for name in names:
                layer_of.setdefault(name, layer)
    kernels: Counter[str] = Counter()
    floats: Counter[str] = Counter()
    for layer in computing:
        (kernels if layer.precision in _INTEGER_PRECISIONS else floats)[f"{layer.type} {layer.precision}"] += 1
    unfused = []
    for node in quantized_compute_ops(model):
        layer = next((layer_of[n] for n in (node.name, *node.output) if n in layer_of), None)
        if layer is None:
            unfused.append(f"{node.name or node.op_type} (no layer)")
        elif layer.precision not in _INTEGER_PRECISIONS:
            unfused.append(node.name or node.op_type)
    return FusionReport(dict(sorted(kernels.items())), unfused, 0, check="openvino-runtime-precision",
                        float_layers=dict(sorted(floats.items())))


def _npu_nodes(model_path: Path, execution: Execution, threads: int) -> FusionReport:
    """The ops the provider took (by type, Q/DQ apart) and those it left, from ONNX Runtime's
    record of the assignment; with fallback disabled a node left fails the session first. A
    quantized op the provider took outside a QDQ node unit (its DQ inputs and Q output not
    grouped with it) computes in float on the NPU: also a one-line error naming it."""
    from edgeq.runtime.sessions import make_session

    config = [("session.record_ep_graph_assignment_info", "1")]
    with _provider_log() as log:
        session = _verbose_session(model_path, execution, threads, config)
    if session is None:  # the provider refused the model: make_session's one-line error names the nodes
        session = make_session(str(model_path), threads, execution=execution, config=config)
    floating = float_units(onnx.load(str(model_path), load_external_data=False), log.text)
    if floating:
        shown = ", ".join(floating[:6]) + (f" and {len(floating) - 6} more" if len(floating) > 6 else "")
        raise ProviderError(f"{len(floating)} quantized node(s) run in float on {execution.provider}, outside a QDQ "
                            f"node unit: {shown}",
                            fix="give each op's inputs and output one dtype (and the target's op rule its spec)")
    taken: Counter[str] = Counter()
    left = []
    for subgraph in session.get_provider_graph_assignment_info():
        for node in subgraph.get_nodes():
            if subgraph.ep_name != execution.provider:
                left.append(f"{node.name or '(unnamed)'} ({node.op_type})")
            elif node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                taken[node.op_type] += 1
    qdq = sum(1 for subgraph in session.get_provider_graph_assignment_info() if subgraph.ep_name == execution.provider
              for node in subgraph.get_nodes() if node.op_type in ("QuantizeLinear", "DequantizeLinear"))
    units = "every quantized op in a QDQ node unit" if log.text and _UNIT_LINE.search(log.text) else \
        "node units not checked (no provider log)"
    return FusionReport(dict(sorted(taken.items())), left, 0, check=f"{execution.placement_check}: ops on the NPU, "
                                                                      f"besides {qdq} Q/DQ; {units}")


# ONNX Runtime's QNN provider logs each node unit it validates (verbose level): one of a single
# node is an op on its own, outside any DQ -> op -> Q group.
_UNIT_LINE = re.compile(r"Validation PASSED for (\d+) nodes in \w+ \((\w+)\) :\s*\n\s*Operator type: (\S+) "
                        r"Node name: (.*?) Node index")


def float_units(model: onnx.ModelProto, log: str) -> list[str]:
    """`NAME (OP)` of each op of `model` the provider log shows validated on its own though it
    reads a DequantizeLinear output (a quantized op computed in float)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    found = []
    for count, _, op_type, name in _UNIT_LINE.findall(log):
        node = by_name.get(name)
        if count != "1" or node is None or op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(i in producers and producers[i].op_type == "DequantizeLinear" for i in node.input):
            found.append(f"{name} ({op_type})")
    return list(dict.fromkeys(found))


def _verbose_session(model_path: Path, execution: Execution, threads: int, config: list[tuple[str, str]]):
    """A session on the execution's plugin provider logging at verbose level (None if it fails)."""
    import onnxruntime as ort

    from edgeq.runtime.providers import ep_devices, provider_options
    from edgeq.runtime.sessions import session_options

    options = session_options(threads, config=[*execution.session_config, *config])
    options.log_severity_level = 0
    options.add_provider_for_devices(ep_devices(execution)[:1], provider_options(execution, threads))
    try:
        return ort.InferenceSession(str(model_path), options)
    except Exception:  # noqa: BLE001 - ORT raises its own types; make_session words the error
        return None


class _Log:
    text = ""


@contextmanager
def _provider_log() -> Iterator[_Log]:
    """ONNX Runtime's log at verbose level while the block runs (it writes to the process's
    stderr): captured, not shown."""
    log = _Log()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield log
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            log.text = sink.read().decode("utf-8", errors="replace")


_CHECKS: dict[str, Callable[[Path, Execution, int], FusionReport]] = {
    "ort-optimized-graph": _ort_graph,
    "openvino-runtime-precision": _openvino,
    "qnn-htp-nodes": _npu_nodes,
}

