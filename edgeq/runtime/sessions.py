"""Running models in ONNX Runtime: sessions for a target, verification against the float
model, and the check that quantized ops were fused into integer kernels."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx
import onnxruntime as ort

from edgeq.quant.numerics import sqnr_db

# Kernels ONNX Runtime runs quantized ops on once it has fused the QDQ groups.
INTEGER_KERNELS = frozenset({
    "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "MatMulNBits", "QLinearConv", "ConvInteger",
    "QGemm", "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QAttention", "QLinearSoftmax",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearAveragePool",
    "QLinearReduceMean", "QLinearWhere", "QEmbedLayerNormalization", "GatherBlockQuantized",
})
_COMPUTE = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "FusedMatMul", "FusedConv", "FusedGemm"})


def session_options(threads: int = 0, *, optimized_path: str | None = None,
                    config: Iterable[tuple[str, str]] = (),
                    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                    ) -> ort.SessionOptions:
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
                 config: Iterable[tuple[str, str]] = ()) -> ort.InferenceSession:
    model = str(model) if isinstance(model, os.PathLike) else model
    return ort.InferenceSession(model, session_options(threads, config=config), providers=list(providers))


# ---- verification ---------------------------------------------------------------------


@dataclass
class OutputError:
    name: str
    max_abs: float
    mean_abs: float
    relative_l2: float
    cosine_min: float
    cosine_mean: float
    sqnr_db: float


@dataclass
class Verification:
    samples: int
    synthetic_inputs: bool
    outputs: list[OutputError] = field(default_factory=list)

    @property
    def worst_relative_l2(self) -> float:
        return max((o.relative_l2 for o in self.outputs), default=0.0)


def verify(float_model: str | os.PathLike, compiled_model: str | os.PathLike,
           feeds: list[Mapping[str, np.ndarray]], *, threads: int = 0, synthetic: bool = False) -> Verification:
    """Run both models on the same feeds; error per output, accumulated over samples."""
    # One session at a time: the float model's weights need not share the peak with the
    # compiled model's (the reference outputs are small beside them).
    reference = make_session(float_model, threads)
    names = [o.name for o in reference.get_outputs()]
    expected = [reference.run(names, dict(feed)) for feed in feeds]
    del reference
    candidate = make_session(compiled_model, threads)
    acc: dict[str, dict[str, list[float]]] = {n: {"max": [], "abs": [], "num": [], "den": [], "cos": []}
                                              for n in names}
    for feed, ref_out in zip(feeds, expected):
        cand_out = candidate.run(names, dict(feed))
        for name, r, c in zip(names, ref_out, cand_out):
            r64, c64 = np.asarray(r, np.float64), np.asarray(c, np.float64)
            diff = r64 - c64
            a = acc[name]
            a["max"].append(float(np.max(np.abs(diff))) if diff.size else 0.0)
            a["abs"].append(float(np.mean(np.abs(diff))) if diff.size else 0.0)
            a["num"].append(float(np.sum(diff**2)))
            a["den"].append(float(np.sum(r64**2)))
            a["cos"].extend(_row_cosines(r64, c64))
    result = Verification(samples=len(feeds), synthetic_inputs=synthetic)
    for name in names:
        a = acc[name]
        num, den = sum(a["num"]), sum(a["den"])
        result.outputs.append(OutputError(
            name=name, max_abs=max(a["max"], default=0.0), mean_abs=float(np.mean(a["abs"])) if a["abs"] else 0.0,
            relative_l2=float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num)),
            cosine_min=min(a["cos"], default=1.0), cosine_mean=float(np.mean(a["cos"])) if a["cos"] else 1.0,
            sqnr_db=10 * np.log10(den / num) if num > 0 and den > 0 else float("inf")))
    return result


def _row_cosines(ref: np.ndarray, cand: np.ndarray) -> list[float]:
    """Cosine per last-axis vector (per token/position), the usual per-row fidelity measure."""
    if ref.ndim == 0 or ref.size == 0:
        return []
    r = ref.reshape(-1, ref.shape[-1])
    c = cand.reshape(-1, cand.shape[-1])
    norms = np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1)
    ok = norms > 0
    return list((np.sum(r[ok] * c[ok], axis=1) / norms[ok]).astype(float))


def synthetic_feeds(model_path: str | os.PathLike, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Inputs for verification when no data was given: N(0,1) floats; ones for integer inputs
    (a valid token id and a full attention mask for text models); dynamic dims become 1 or 16."""
    session = make_session(model_path)
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for inp in session.get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else (1 if i == 0 else 16) for i, d in enumerate(inp.shape)]
            dtype = _ORT_TYPES.get(inp.type, np.float32)
            if np.issubdtype(dtype, np.floating):
                feed[inp.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_:
                feed[inp.name] = np.ones(shape, np.bool_)
            else:
                feed[inp.name] = np.ones(shape, dtype)
        feeds.append(feed)
    return feeds


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
              "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


# ---- fusion check ---------------------------------------------------------------------


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
        so = session_options(optimized_path=str(optimized), config=config,
                             level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        ort.InferenceSession(str(model_path), so, providers=list(providers))
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
