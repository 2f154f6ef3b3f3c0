"""Speed of edgeq's x86 outputs against float and ONNX Runtime's own quantizers, in one run.

    python tools/bench_x86_speed.py --model minilm --target x86-vnni --threads 2
    python tools/bench_x86_speed.py --model minilm-shaped --target x86-amx --threads 2 16

`--model minilm` builds the real all-MiniLM-L6-v2 (needs edgeq[models]) and calibrates on
WikiText paragraphs; `minilm-shaped` is a random BERT of MiniLM's shape (6 layers, 384 wide,
12 heads, 1536 FFN, 30522 vocab), for machines without the model wheel: speed does not depend
on weight values. Every model is timed interleaved with the others, batch x sequence tokens,
median of --repeats runs after a warm-up; a speedup is a ratio of medians from this one run.
Also reports the CPU's AMX/VNNI flags and a single-thread int8 GEMM throughput probe (far
above the AVX-512 VNNI peak means MLAS runs AMX tiles).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgeq.compiler import compile as edgeq_compile
from edgeq.models.bert import BertConfig
from edgeq.options import CalibrationOptions, CompileOptions
from edgeq.runtime.sessions import make_session

MINILM_SHAPE = BertConfig(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                          intermediate_size=1536, max_positions=512)


def cpu_flags() -> dict[str, bool]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                      if line.startswith("flags")), []))
    return {f: f in flags for f in ("avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")}


def amx_permission() -> str:
    """Whether the kernel grants this process AMX tile state (Linux arch_prctl), which every
    AMX user (MLAS, oneDNN) must request before the first tile instruction."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    sys_arch_prctl, arch_req_xcomp_perm, arch_get_xcomp_perm, xtiledata = 158, 0x1023, 0x1022, 18
    granted = libc.syscall(sys_arch_prctl, arch_req_xcomp_perm, xtiledata)
    mask = ctypes.c_ulong(0)
    libc.syscall(sys_arch_prctl, arch_get_xcomp_perm, ctypes.byref(mask))
    tiles = bool(mask.value & (1 << xtiledata))
    return f"request {'granted' if granted == 0 else 'refused (errno %d)' % ctypes.get_errno()}, tile data {'permitted' if tiles else 'not permitted'}"


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def gemm_probe(tmp: Path, size: int = 2048, repeats: int = 5) -> float:
    """Single-thread u8 x s8 MatMulInteger throughput in GMAC/s."""
    from onnx import TensorProto, helper

    node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
    graph = helper.make_graph([node], "probe",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size]),
                               helper.make_tensor_value_info("b", TensorProto.INT8, [size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [size, size])])
    path = tmp / "gemm_probe.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    session = make_session(path, threads=1)
    rng = np.random.default_rng(0)
    feed = {"a": rng.integers(0, 255, (size, size), dtype=np.uint8),
            "b": rng.integers(-127, 127, (size, size), dtype=np.int8)}
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return size**3 / float(np.median(times)) / 1e9


def build_models(kind: str, tmp: Path) -> tuple[Path, list[dict[str, np.ndarray]]]:
    if kind == "minilm":
        from edgeq.models import evaluation
        from edgeq.models import minilm

        path = tmp / "minilm.onnx"
        minilm.build(path)
        shared = Path(__file__).resolve().parents[1].parent / "shared"
        return path, evaluation.minilm_calibration_feeds(shared, 16)
    from edgeq.models.bert import build_bert
    from edgeq.models.synthetic import _bert_weights

    weights = _bert_weights(MINILM_SHAPE, np.random.default_rng(0))
    path = tmp / "minilm_shaped.onnx"
    onnx.save(build_bert(MINILM_SHAPE, weights, name="minilm-shaped"), str(path))
    rng = np.random.default_rng(1)
    feeds = [{"input_ids": rng.integers(1000, 30000, (1, 128)).astype(np.int64),
              "attention_mask": np.ones((1, 128), np.int64),
              "token_type_ids": np.zeros((1, 128), np.int64)} for _ in range(16)]
    return path, feeds


class _Reader:
    """ONNX Runtime's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def ort_variants(float_path: Path, feeds, tmp: Path) -> dict[str, Path]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / "pre.onnx"
    quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
    dynamic = tmp / "ort_dynamic.onnx"
    quantize_dynamic(str(pre), str(dynamic), per_channel=True, weight_type=QuantType.QInt8)
    static = tmp / "ort_static_qdq.onnx"
    quantize_static(str(pre), str(static), _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return {"ort quantize_dynamic": dynamic, "ort quantize_static QDQ": static}


def time_models(models: dict[str, Path], threads: int, batch: int, seq: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(1000, 20000, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq), np.int64),
            "token_type_ids": np.zeros((batch, seq), np.int64)}
    sessions = {name: make_session(path, threads=threads) for name, path in models.items()}
    for session in sessions.values():
        session.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, session in sessions.items():  # interleaved: drift hits every model alike
            start = time.perf_counter()
            session.run(None, feed)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def profile_models(models: dict[str, Path], threads: int, batch: int, seq: int, top: int = 8) -> dict[str, dict]:
    """Kernel time per op type (ORT's profiler), to see where each model's time goes."""
    from collections import Counter

    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(1000, 20000, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq), np.int64),
            "token_type_ids": np.zeros((batch, seq), np.int64)}
    result = {}
    for name, path in models.items():
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = str(path.with_suffix("")) + f"_prof{threads}"
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for _ in range(3):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
        per_op: Counter = Counter()
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                per_op[event["args"]["op_name"]] += event["dur"] / 3 / 1000
        result[name] = {op: round(ms, 1) for op, ms in per_op.most_common(top)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["minilm", "minilm-shaped"], default="minilm")
    parser.add_argument("--target", action="append", default=None, help="edgeq target(s); default x86-vnni")
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smooth", type=float, default=None, help="SmoothQuant alpha for edgeq")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--profile", action="store_true", help="also print kernel time per op type")
    args = parser.parse_args()
    targets = args.target or ["x86-vnni"]
    with tempfile.TemporaryDirectory(prefix="edgeq-speed-") as tmp_name:
        tmp = Path(tmp_name)
        float_path, feeds = build_models(args.model, tmp)
        models = {"float": float_path}
        options = CompileOptions(calibration=CalibrationOptions(method="minmax"), smooth_alpha=args.smooth,
                                 verify=False)
        for target in targets:
            compiled = edgeq_compile(float_path, target, options, calibration=feeds)
            path = tmp / f"edgeq_{target}.onnx"
            compiled.save(path)
            models[f"edgeq {target} ({compiled.report.scheme})"] = path
        models.update(ort_variants(float_path, feeds, tmp))
        result = {"cpu": cpu_model(), "flags": cpu_flags(), "cores": os.cpu_count(), "ort": ort.__version__,
                  "amx_permission": amx_permission() if platform.system() == "Linux" else "n/a",
                  "model": args.model, "batch": args.batch, "seq": args.seq,
                  "gemm_probe_gmacs_1thread": round(gemm_probe(tmp), 1), "runs": {}}
        for threads in args.threads:
            medians = time_models(models, threads, args.batch, args.seq, args.repeats)
            result["runs"][threads] = {name: {"median_s": round(t, 4), "speedup": round(medians["float"] / t, 3)}
                                       for name, t in medians.items()}
            if args.profile:
                result.setdefault("profile", {})[threads] = profile_models(models, threads, args.batch, args.seq)
    print(f"CPU: {result['cpu']} ({result['cores']} cores), flags {result['flags']}, onnxruntime {result['ort']}")
    print(f"single-thread u8s8 GEMM probe: {result['gemm_probe_gmacs_1thread']} GMAC/s; AMX: {result['amx_permission']}")
    for threads, rows in result["runs"].items():
        print(f"\n{args.model}, batch {args.batch} x {args.seq} tokens, {threads} threads:")
        print("| model | median ms | speedup vs float |\n|---|---|---|")
        for name, row in rows.items():
            print(f"| {name} | {row['median_s'] * 1000:.1f} | {row['speedup']:.2f}x |")
    for threads, per_model in result.get("profile", {}).items():
        print(f"\nkernel ms per op type, {threads} threads:")
        for name, ops in per_model.items():
            print(f"  {name}: " + ", ".join(f"{op} {ms}" for op, ms in ops.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
