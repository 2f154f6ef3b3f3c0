"""ONNX Runtime sessions: the options edgeq runs models with, and `make_session`, the one
factory every session edgeq opens comes from (calibration, verification against float, eval,
the placement check, bench, the IR's runtime checks).

A session runs on an `Execution` (a target's data: the provider, how to get it, its options,
session settings and device settings). `reference=True` is the float reference: the same
provider at full precision (fp32), where the deployment may run float ops in bf16.
"""

from __future__ import annotations

import os
from typing import Iterable

import onnxruntime as ort

from edgeq.runtime.execution import Execution
from edgeq.runtime.providers import CPU, ProviderError, ep_devices, provider_options, require


def session_options(threads: int = 0, *, optimized_path: str | None = None,
                    config: Iterable[tuple[str, str]] = (),
                    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                    ) -> ort.SessionOptions:
    """Warnings silenced; `threads` intra-op threads (0: ONNX Runtime picks, one per physical
    core) and nodes run one at a time; ORT's optimised graph written to `optimized_path`;
    `config` as session config entries."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = level
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    for key, value in config:
        so.add_session_config_entry(key, value)
    return so


def make_session(model: str | os.PathLike | bytes, threads: int = 0, providers=None,
                 config: Iterable[tuple[str, str]] = (), *, execution: Execution | None = None,
                 reference: bool = False,
                 level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                 optimized_path: str | None = None):
    """A session for `model` (a path or serialized bytes) on `execution` (default: the CPU
    provider), with `session_options` plus the execution's session settings and `config`.
    `providers` (names of built-in providers) is the older way to pick one.

    A plugin provider that is not installed, or lists no device here, raises a one-line
    ProviderError; where its runtime runs without ONNX Runtime (OpenVINO on a CPU the plugin
    does not list) the session is that runtime's (edgeq.runtime.openvino_direct)."""
    model = str(model) if isinstance(model, os.PathLike) else model
    if execution is None:
        execution = CPU if not providers else Execution(name=providers[0], provider=providers[0])
    if reference and execution.reference_on_cpu:  # the runtime has no float path (an NPU)
        execution = CPU
    found = require(execution)
    entries = [*execution.session_config, *config]
    if found.via == "direct":
        from edgeq.runtime.openvino_direct import OpenVINOSession

        return OpenVINOSession(model, execution, threads, reference=reference)
    options = session_options(threads, optimized_path=optimized_path, config=entries, level=level)
    if execution.plugin is None:  # built in: the CPU provider stays behind it for what it leaves
        names = list(dict.fromkeys([execution.provider, "CPUExecutionProvider"]))
        opts = [provider_options(execution, threads, reference=reference)] + [{}] * (len(names) - 1)
        return ort.InferenceSession(model, options, providers=names, provider_options=opts)
    options.add_provider_for_devices(ep_devices(execution)[:1], provider_options(execution, threads,
                                                                                  reference=reference))
    try:
        return ort.InferenceSession(model, options)
    except Exception as err:  # noqa: BLE001 - ORT raises its own types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if dict(entries).get("session.disable_cpu_ep_fallback") == "1":
            left = nodes_left_to_cpu(model, execution, threads, config)
            if left:
                shown = ", ".join(left[:6]) + (f" and {len(left) - 6} more" if len(left) > 6 else "")
                raise ProviderError(f"{len(left)} node(s) do not run on {execution.provider} and CPU fallback is "
                                    f"disabled: {shown}",
                                    fix="check the target's op rules for these ops, or compile for another target") \
                    from err
        raise ProviderError(f"{execution.provider} cannot run the model: {first}",
                            fix="use --provider cpu") from err


def nodes_left_to_cpu(model: str | bytes, execution: Execution, threads: int = 0,
                      config: Iterable[tuple[str, str]] = ()) -> list[str]:
    """The nodes (as 'name (OpType)') a plugin provider leaves to the CPU provider when fallback
    is allowed: what fails a session with fallback disabled. Empty when that session fails too."""
    entries = [(k, v) for k, v in [*execution.session_config, *config] if k != "session.disable_cpu_ep_fallback"]
    options = session_options(threads, config=[*entries, ("session.record_ep_graph_assignment_info", "1")])
    options.add_provider_for_devices(ep_devices(execution)[:1], provider_options(execution, threads))
    try:
        session = ort.InferenceSession(model, options)
    except Exception:  # noqa: BLE001 - the provider fails the model as a whole: no node list
        return []
    if not hasattr(session, "get_provider_graph_assignment_info"):
        return []
    left = [node for subgraph in session.get_provider_graph_assignment_info()
            if subgraph.ep_name != execution.provider for node in subgraph.get_nodes()]
    left.sort(key=lambda node: node.op_type in ("QuantizeLinear", "DequantizeLinear"))  # the ops themselves first
    return [f"{node.name or '(unnamed)'} ({node.op_type})" for node in left]
