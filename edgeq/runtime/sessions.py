"""ONNX Runtime sessions: the options edgeq runs models with, and `make_session`, the one
factory every session edgeq opens comes from (calibration, verification against float, eval,
the fusion check, the IR's runtime checks)."""

from __future__ import annotations

import os
from typing import Iterable

import onnxruntime as ort


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


def make_session(model: str | os.PathLike | bytes, threads: int = 0, providers=("CPUExecutionProvider",),
                 config: Iterable[tuple[str, str]] = (), *,
                 level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                 optimized_path: str | None = None) -> ort.InferenceSession:
    """A session for `model` (a path or serialized bytes) on `providers`, with `session_options`."""
    model = str(model) if isinstance(model, os.PathLike) else model
    options = session_options(threads, optimized_path=optimized_path, config=config, level=level)
    return ort.InferenceSession(model, options, providers=list(providers))
