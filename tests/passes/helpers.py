"""Shared helpers of the pass tests: tiny hand-built models, ORT runs, validity checks, and
the PTQ pipeline built from a target's pass names with an explicit context."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgeq.ir import Graph, to_model_proto
from edgeq.ir.verify import check_with_onnx, verify
from edgeq.options import CompileOptions
from edgeq.pipeline import Pass, PassContext, PassManager
from edgeq.registry import get_pass, get_target
from edgeq.pipeline.artifacts import CALIBRATION_DATA

F = TensorProto.FLOAT
# The passes that need no target, calibration or plan.
GENERIC = ("shape-inference", "constant-folding", "dead-code-elimination", "identity-elimination",
           "topological-sort")
# The preprocessing every x86 pipeline starts with.
PREPROCESS = ("convert-opset", "identity-elimination", "constant-folding", "canonicalize-shapes",
              "dead-code-elimination", "shape-inference")


def session(model: onnx.ModelProto | Graph | str | Path, *, optimize: bool = True) -> ort.InferenceSession:
    """A single-threaded CPU session (the test machines are shared). `optimize=False` runs the
    graph as written: ORT's fusions pick other kernels once shapes are known, which changes
    float results in the last bits without any change of meaning."""
    if isinstance(model, Graph):
        model = to_model_proto(model)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(model) if isinstance(model, Path) else model, opts,
                                providers=["CPUExecutionProvider"])


def run(model, feeds: dict[str, np.ndarray], *, optimize: bool = True) -> list[np.ndarray]:
    return session(model, optimize=optimize).run(None, feeds)


def assert_valid(graph: Graph) -> None:
    """The IR invariants, onnx's full checker and an ORT session load."""
    verify(graph)
    check_with_onnx(graph)


def relative_l2(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref = np.asarray(reference, np.float64)
    diff = ref - np.asarray(candidate, np.float64)
    return float(np.sqrt(np.sum(diff**2) / np.sum(ref**2)))


def model(nodes, inputs, outputs, initializers=(), opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    """A checked model from onnx.helper parts; initializers as {name: array}."""
    inits = [numpy_helper.from_array(np.asarray(a), n) for n, a in dict(initializers).items()]
    m = helper.make_model(helper.make_graph(nodes, "test", inputs, outputs, inits),
                          opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    onnx.checker.check_model(m, full_check=True)
    return m


def vi(name: str, shape, elem_type: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def op_types(graph: Graph) -> list[str]:
    return [op.op_type for op in graph.topo_order()]


def ptq_pipeline(target_name: str, options: CompileOptions, *, stop_after: str | None = None,
                 skip: Sequence[str] = ()) -> PassManager:
    """The target's default pipeline as `edgeq.compile` builds it (typed options per pass),
    optionally cut after one pass or without some."""
    target = get_target(target_name)
    passes: list[Pass] = []
    for name in target.default_pipeline:
        if name in skip:
            continue
        cls = get_pass(name)
        factory = getattr(cls, "from_options", None)
        passes.append(factory(options, target) if factory else cls())
        if name == stop_after:
            break
    return PassManager(passes, name=f"{target_name}-test-pipeline")


def ptq_context(target_name: str, model_path: str | Path | None = None, feeds=None) -> PassContext:
    """A context with the target and, when feeds are given, checked calibration data."""
    ctx = PassContext(target=get_target(target_name))
    if feeds is not None:
        from edgeq.calibration.sources import open_source

        ctx.artifacts[CALIBRATION_DATA] = open_source(list(feeds), str(model_path))
    return ctx
