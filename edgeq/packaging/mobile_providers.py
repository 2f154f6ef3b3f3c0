"""The execution providers a mobile app adds to ONNX Runtime, as data, and which nodes of a model
each would take (the usability report of `edgeq package --platform`).

What each provider takes comes from where ONNX Runtime itself says it, per provider:

- NNAPI (Android) and CoreML (iOS, ML Program and NeuralNetwork formats): ONNX Runtime's own
  usability checker (`onnxruntime.tools.check_onnx_model_mobile_usability`; its op tables
  onnxruntime/tools/mobile_helpers/*_supported_ops.md and its partitioning, which mirrors the
  C++ `CreateSupportedPartitionNodeGroups`): by op type, values of dynamic shape refused, the
  caveats it lists left for the app to check on a device.
- XNNPACK: the same partitioning with the node-unit rules of the provider's GetCapability
  (onnxruntime/core/providers/xnnpack/xnnpack_execution_provider.cc and
  detail/node_support_checker.cc, main branch as stored): float Conv/ConvTranspose/MaxPool/
  AveragePool/Softmax/Resize, float MatMul/Gemm with a constant 2-D B, and QDQ node units only
  around Conv, ConvTranspose, AveragePool, MaxPool and Softmax (a QDQ MatMul stays on the CPU).
- QNN (Android, Snapdragon's Hexagon NPU): measured, by creating a session on ONNX Runtime's QNN
  provider with the HTP backend (the simulator on x86-64, onnxruntime-qnn) with CPU fallback
  allowed, and reading ONNX Runtime's record of which node went where. The device is the qnn-htp
  target's first SoC (sm8550: HTP v73 with its soc_model): with htp_arch alone the simulator
  fails to finalize any graph holding float ops (QNN_COMMON_ERROR_MEM_ALLOC, measured on the
  float and x86-vnni BERT fixtures with fixed shapes); with the SoC it takes them.
- CPU: takes every node.

Every provider that lowers QDQ node units itself gets the .ort at the "basic" level (every Q/DQ
kept, edgeq.packaging.ort_format); the CPU provider gets "all" (MLAS's fused integer kernels).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import onnx

PLATFORMS = ("android", "ios")


@dataclass(frozen=True)
class MobileProvider:
    """One execution provider of ONNX Runtime's mobile packages (onnxruntime-android from Maven,
    onnxruntime-c / onnxruntime-objc from CocoaPods), and how an app adds it."""

    name: str                        # what --provider picks
    ort_name: str                    # ONNX Runtime's provider name
    description: str
    platforms: tuple[str, ...]
    level: str                       # the .ort optimization level a package for it gets
    kotlin: str | None = None        # the OrtSession.SessionOptions call (None: not on Android)
    swift: str | None = None         # the ORTSessionOptions call (None: not on iOS)
    source: str = ""                 # where what it takes comes from


PROVIDERS: tuple[MobileProvider, ...] = (
    MobileProvider("nnapi", "NnapiExecutionProvider", "Android's Neural Networks API (the device's NPU, GPU or DSP "
                   "drivers)", ("android",), "basic", kotlin="options.addNnapi()",
                   source="ONNX Runtime's usability checker (mobile_helpers/nnapi_supported_ops.md)"),
    MobileProvider("qnn", "QNNExecutionProvider", "Qualcomm's Hexagon NPU (HTP) through QNN", ("android",), "basic",
                   kotlin='options.addQnn(mapOf("backend_path" to "libQnnHtp.so"))',
                   source="measured: a session on ONNX Runtime's QNN provider (HTP backend, simulator on x86-64), "
                          "CPU fallback allowed"),
    MobileProvider("coreml", "CoreMLExecutionProvider", "Apple's Core ML, ML Program format (Neural Engine, GPU, "
                   "CPU)", ("ios",), "basic",
                   swift='try options.appendCoreMLExecutionProvider(with: ORTCoreMLExecutionProviderOptions())',
                   source="ONNX Runtime's usability checker (mobile_helpers/coreml_supported_mlprogram_ops.md)"),
    MobileProvider("xnnpack", "XnnpackExecutionProvider", "XNNPACK's CPU kernels", ("android", "ios"), "basic",
                   kotlin='options.addXnnpack(mapOf("intra_op_num_threads" to "2"))',
                   swift='try options.appendXnnpackExecutionProvider(with: ORTXnnpackExecutionProviderOptions())',
                   source="edgeq's table of the XNNPACK provider's GetCapability (onnxruntime/core/providers/xnnpack)"),
    MobileProvider("cpu", "CPUExecutionProvider", "ONNX Runtime's CPU provider (MLAS; KleidiAI kernels on ARM64)",
                   ("android", "ios"), "all", kotlin="", swift="", source="takes every node"),
)
# Reported beside CoreML's ML Program: its older NeuralNetwork format (not a provider choice).
_COREML_NEURALNETWORK = "coreml-neuralnetwork"


def providers_for(platform: str) -> tuple[MobileProvider, ...]:
    return tuple(p for p in PROVIDERS if platform in p.platforms)


def provider_named(name: str) -> MobileProvider | None:
    return next((p for p in PROVIDERS if p.name == name or p.ort_name == name), None)


@dataclass
class ProviderUse:
    """What one provider would take of a graph."""

    provider: str
    source: str
    nodes: int
    taken: int | None                # None: not checked (the reason in `not_checked`)
    partitions: int | None = None
    suitability: str | None = None   # ONNX Runtime's rule: YES / MAYBE / NO
    ops_not_taken: list[str] = dataclasses.field(default_factory=list)
    dynamic_shape_nodes: int = 0     # refused only because a value's shape is dynamic
    caveats: list[str] = dataclasses.field(default_factory=list)
    not_checked: str | None = None

    @property
    def share(self) -> float | None:
        return None if self.taken is None or not self.nodes else self.taken / self.nodes

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["share"] = None if self.share is None else round(self.share, 4)
        return out

    def to_line(self) -> str:
        if self.taken is None:
            return f"{self.provider}: not checked ({self.not_checked})"
        text = (f"{self.provider}: {self.taken}/{self.nodes} nodes ({100 * self.share:.1f}%) in "
                f"{self.partitions} partition(s), suitability {self.suitability}")
        if self.dynamic_shape_nodes:
            text += f"; {self.dynamic_shape_nodes} refused for a dynamic shape"
        failed = [c for c in self.caveats if c.startswith("the QNN session failed")]
        if failed:
            text += f"; {failed[0]}"
        if self.ops_not_taken:
            more = " ..." if len(self.ops_not_taken) > 8 else ""
            text += f"; not taken: {', '.join(self.ops_not_taken[:8])}{more}"
        return text


def suitability(taken: int, nodes: int, partitions: int) -> str:
    """ONNX Runtime's rule (usability_checker.PartitioningInfo.suitability): one partition over 75%
    of the nodes YES, over 50% MAYBE; two partitions over 75% MAYBE; else NO."""
    share = 100 * taken / nodes if nodes else 0.0
    if partitions == 1:
        return "YES" if share > 75 else "MAYBE" if share > 50 else "NO"
    if partitions == 2 and share > 75:
        return "MAYBE"
    return "NO"


def with_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """`model` with ONNX's inferred value shapes (with data propagation); False when shape
    inference failed (then shapes are not checked)."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True), True
    except Exception:  # noqa: BLE001 - onnx raises several types for graphs it cannot infer
        return model, False


def usability(model: onnx.ModelProto, model_path: Path, platform: str) -> list[ProviderUse]:
    """What each of `platform`'s providers would take of `model` (an ONNX model as ONNX Runtime
    optimized it at the basic level; `model_path` is that model on disk, for the measured ones)."""
    shaped, inferred = with_shapes(model)
    uses = []
    for provider in providers_for(platform):
        if provider.name == "cpu":
            uses.append(ProviderUse("cpu", provider.source, len(model.graph.node), len(model.graph.node), 1, "YES"))
        elif provider.name in ("nnapi", "coreml", "xnnpack"):
            uses.append(_table_check(provider, shaped, inferred))
            if provider.name == "coreml":
                uses.append(_table_check(dataclasses.replace(provider, name=_COREML_NEURALNETWORK,
                                                             source=provider.source.replace("mlprogram",
                                                                                            "neuralnetwork")),
                                         shaped, inferred))
        elif provider.name == "qnn":
            uses.append(_qnn_check(provider, model_path, len(model.graph.node)))
    return uses


def _table_check(provider: MobileProvider, model: onnx.ModelProto, inferred: bool) -> ProviderUse:
    from onnxruntime.tools.mobile_helpers import usability_checker as checker

    fixed = inferred and (len(model.graph.value_info) > 0 or len(model.graph.node) <= 1)
    if provider.name == "nnapi":
        info = checker.check_nnapi_partitions(model, fixed)
    elif provider.name == "coreml":
        info = checker.check_coreml_partitions(model, fixed, "coreml_supported_mlprogram_ops.md")
    elif provider.name == _COREML_NEURALNETWORK:
        info = checker.check_coreml_partitions(model, fixed, "coreml_supported_neuralnetwork_ops.md")
    else:
        info = checker.check_partitioning(model.graph, _XnnpackChecker(model.graph), fixed)
    caveats = info.supported_ops_checker.get_caveats()
    if not fixed:
        caveats = ["value shapes were not inferred: dynamic shapes not checked", *caveats]
    return ProviderUse(provider.name, provider.source, info.num_nodes, info.num_supported_nodes, info.num_partitions,
                       info.suitability().name, sorted(info.unsupported_ops),
                       info.nodes_unsupported_due_to_dynamic_input,
                       caveats)


class _XnnpackChecker:
    """The XNNPACK provider's node-unit rules, as the usability checker's op-table interface
    (is_op_supported(node), get_caveats())."""

    FLOAT_OPS = frozenset({"Conv", "ConvTranspose", "MaxPool", "AveragePool", "Softmax", "Resize", "MatMul", "Gemm"})
    QDQ_OPS = frozenset({"Conv", "ConvTranspose", "MaxPool", "AveragePool", "Softmax"})
    CAVEATS = MappingProxyType({"ai.onnx:MatMul": "B must be a constant 2-D initializer (float)",
               "ai.onnx:Gemm": "B (and C) constant, float",
               "ai.onnx:Conv": "2-D, constant weights",
               "ai.onnx:Resize": "4-D, constant scales/sizes"})

    def __init__(self, graph: onnx.GraphProto):
        self._producer = {o: n for n in graph.node for o in n.output}
        self._consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self._consumers.setdefault(name, []).append(node)
        self._constants = {t.name: len(t.dims) for t in graph.initializer}
        self._seen: set[str] = set()
        self._taken: set[int] = set()
        for node in graph.node:
            if self._unit_taken(node):
                self._taken.add(id(node))
                if not self._in_qdq_unit(node):
                    continue
                for name in node.input:
                    producer = self._producer.get(name)
                    if producer is not None and producer.op_type == "DequantizeLinear":
                        self._taken.add(id(producer))
                for name in node.output:
                    for consumer in self._consumers.get(name, []):
                        if consumer.op_type == "QuantizeLinear":
                            self._taken.add(id(consumer))

    def _in_qdq_unit(self, node: onnx.NodeProto) -> bool:
        return any((p := self._producer.get(name)) is not None and p.op_type == "DequantizeLinear"
                   for name in node.input)

    def _unit_taken(self, node: onnx.NodeProto) -> bool:
        if node.domain not in ("", "ai.onnx") or node.op_type not in self.FLOAT_OPS:
            return False
        if self._in_qdq_unit(node):
            return node.op_type in self.QDQ_OPS
        if node.op_type in ("MatMul", "Gemm"):
            return len(node.input) > 1 and self._constants.get(node.input[1]) == 2
        return True

    def is_op_supported(self, node: onnx.NodeProto) -> bool:
        taken = id(node) in self._taken
        if taken:
            self._seen.add(f"{node.domain or 'ai.onnx'}:{node.op_type}")
        return taken

    def get_caveats(self) -> list[str]:
        return [f"{op}:{self.CAVEATS[op]}" for op in sorted(self._seen) if op in self.CAVEATS]


def _execution_for(ort_name: str):
    """The execution data (plugin library, backend, devices) of the first registered target that
    runs on provider `ort_name`: how to reach it here."""
    from edgeq.registry import targets
    from edgeq.runtime.providers import ProviderError

    found = next((e for t in targets().values() for e in t.executions if e.provider == ort_name), None)
    if found is None:
        raise ProviderError(f"no registered target runs on {ort_name}", fix="install the extra of a target that does")
    return found


def _qnn_check(provider: MobileProvider, model_path: Path, nodes: int) -> ProviderUse:
    import onnxruntime as ort

    from edgeq.errors import EdgeqError
    from edgeq.runtime.providers import availability, ep_devices, for_device, provider_options
    from edgeq.runtime.sessions import session_options

    try:
        execution = _execution_for(provider.ort_name)
        # A SoC device (htp_arch with soc_model): without a soc_model the simulator fails to finalize
        # any graph holding float ops (QNN_COMMON_ERROR_MEM_ALLOC); with one it takes them.
        soc = next((d.name for d in execution.devices if any(k == "soc_model" for k, _ in d.provider_options)), None)
        execution = for_device(execution, soc)
        found = availability(execution)
        if found.via != "onnxruntime":
            return ProviderUse(provider.name, provider.source, nodes, None,
                               not_checked=found.reason or "not in ONNX Runtime")
        entries = [(k, v) for k, v in execution.session_config if k != "session.disable_cpu_ep_fallback"]
        options = session_options(config=[*entries, ("session.record_ep_graph_assignment_info", "1")],
                                  level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        options.add_provider_for_devices(ep_devices(execution)[:1], provider_options(execution))
        session = ort.InferenceSession(str(model_path), options)
    except EdgeqError as err:
        return ProviderUse(provider.name, provider.source, nodes, None, not_checked=err.problem)
    except Exception as err:  # noqa: BLE001 - the provider refuses the model as a whole
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return ProviderUse(provider.name, provider.source, nodes, 0, 0, "NO", not_checked=None,
                           caveats=[f"the QNN session failed: {first}"])
    counted = 0
    taken = partitions = 0
    left: Counter[str] = Counter()
    for subgraph in session.get_provider_graph_assignment_info():
        members = subgraph.get_nodes()
        counted += len(members)
        if subgraph.ep_name == provider.ort_name:
            taken += len(members)
            partitions += 1
        else:
            left.update(f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in members)
    source = provider.source + (f", device {execution.device}" if execution.device else "")
    return ProviderUse(provider.name, source, counted, taken, partitions, suitability(taken, counted, partitions),
                       sorted(left))
