"""Peak memory of calibration: edgeq.calibration.collection beside ONNX Runtime's quantize_static.

Each measurement runs in its own child process and reports that process's peak RSS
(ru_maxrss) and wall time; the table also shows the RSS right after imports. Data: windows
1000.. of the shared WikiText-2 token ids (the evaluation windows 0..31 are never used).
edgeq collects the inputs of every linear layer (MatMul/Gemm with a weight); ORT quantizes
the `--ort-ops` op types (default MatMul and Gemm) and so calibrates their inputs and outputs.

    python tools/bench_calibration_memory.py --model synthetic   # 30 blocks, SmolLM2-sized
    python tools/bench_calibration_memory.py --model smollm2     # needs edgeq.models.smollm2
    ... --external-data   # the same model with its weights in a side file (memory-mapped by edgeq)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKEN_IDS = SHARED / "reference" / "wikitext2_test_smollm2_ids.npy"
MODES = ("edgeq-minmax", "edgeq-histogram", "ort-minmax", "ort-percentile")


# --- the synthetic model -------------------------------------------------------------------

def build_synthetic_lm(path: Path, layers: int = 30, hidden: int = 576, kv: int = 192, ffn: int = 1536,
                       vocab: int = 49152, seed: int = 0) -> Path:
    """A SmolLM2-shaped decoder with random weights (538 MB float32 at the defaults): token
    embedding, `layers` pre-norm blocks (RMSNorm, q/k/v/o with one shared 192-wide kv head for
    3 query heads, SwiGLU 576x1536x576), final norm and a tied lm_head (Gemm on the embedding)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes: list = []
    inits: list = []
    heads = hidden // kv

    def weight(name: str, shape: tuple[int, ...], scale: float | None = None) -> str:
        scale = scale if scale is not None else shape[0] ** -0.5
        inits.append(numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name))
        return name

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    const("two", np.array(2.0, np.float32))
    const("eps", np.array(1e-5, np.float32))
    const("scale", np.array(kv ** -0.5, np.float32))
    const("split_heads", np.array([0, 0, heads, kv], np.int64))
    const("merge_heads", np.array([0, 0, hidden], np.int64))
    const("rows", np.array([-1, hidden], np.int64))
    const("last", np.array([-1], np.int64))
    const("one", np.array([1], np.int64))

    def rms_norm(x: str, prefix: str) -> str:
        mean = node("ReduceMean", [node("Pow", [x, "two"], f"{prefix}.sq")], f"{prefix}.mean", axes=[-1])
        root = node("Sqrt", [node("Add", [mean, "eps"], f"{prefix}.var")], f"{prefix}.root")
        gain = weight(f"{prefix}.weight", (hidden,), 0.1)
        return node("Mul", [node("Div", [x, root], f"{prefix}.normed"), gain], f"{prefix}.out")

    embedding = weight("embed_tokens", (vocab, hidden), 1.0)
    x = node("Gather", [embedding, "input_ids"], "embedded")
    mask = node("Unsqueeze", [node("Cast", ["attention_mask"], "mask_float", to=TensorProto.FLOAT), "last"], "mask_3d")
    x = node("Mul", [x, mask], "hidden.0")
    for i in range(layers):
        p = f"layers.{i}"
        n = rms_norm(x, f"{p}.input_norm")
        q = node("MatMul", [n, weight(f"{p}.q_proj", (hidden, hidden))], f"{p}.q")
        k = node("MatMul", [n, weight(f"{p}.k_proj", (hidden, kv))], f"{p}.k")
        v = node("MatMul", [n, weight(f"{p}.v_proj", (hidden, kv))], f"{p}.v")
        q = node("Transpose", [node("Reshape", [q, "split_heads"], f"{p}.q4")], f"{p}.qh", perm=[0, 2, 1, 3])
        kt = node("Unsqueeze", [node("Transpose", [k], f"{p}.kt3", perm=[0, 2, 1]), "one"], f"{p}.kt")
        scores = node("Mul", [node("MatMul", [q, kt], f"{p}.qk"), "scale"], f"{p}.scores")
        probs = node("Softmax", [scores], f"{p}.probs", axis=-1)
        attn = node("MatMul", [probs, node("Unsqueeze", [v, "one"], f"{p}.vh")], f"{p}.attn4")
        attn = node("Transpose", [attn], f"{p}.attn_t", perm=[0, 2, 1, 3])
        attn = node("Reshape", [attn, "merge_heads"], f"{p}.attn")
        o = node("MatMul", [attn, weight(f"{p}.o_proj", (hidden, hidden))], f"{p}.o")
        x = node("Add", [x, o], f"{p}.mid")
        n2 = rms_norm(x, f"{p}.post_norm")
        gate = node("MatMul", [n2, weight(f"{p}.gate_proj", (hidden, ffn))], f"{p}.gate")
        up = node("MatMul", [n2, weight(f"{p}.up_proj", (hidden, ffn))], f"{p}.up")
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}.sig")], f"{p}.silu")
        h = node("Mul", [silu, up], f"{p}.h")
        down = node("MatMul", [h, weight(f"{p}.down_proj", (ffn, hidden))], f"{p}.down")
        x = node("Add", [x, down], f"hidden.{i + 1}")
    final = node("Reshape", [rms_norm(x, "final_norm"), "rows"], "final_rows")
    node("Gemm", [final, embedding], "logits", transB=1)
    graph = helper.make_graph(
        nodes, "synthetic_lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["tokens", vocab])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def linear_input_names(model_path: Path) -> list[str]:
    """First inputs of MatMul/Gemm nodes whose second input is a weight (initializer)."""
    import onnx

    graph = onnx.load(os.fspath(model_path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    names = [n.input[0] for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    return list(dict.fromkeys(names))


# --- children ------------------------------------------------------------------------------

def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _windows(first: int, count: int, seq_len: int) -> list[dict[str, np.ndarray]]:
    ids = np.load(TOKEN_IDS, mmap_mode="r")
    return [{"input_ids": np.asarray(ids[w * seq_len:(w + 1) * seq_len], np.int64)[None],
             "attention_mask": np.ones((1, seq_len), np.int64)} for w in range(first, first + count)]


def child(mode: str, model: Path, first: int, count: int, seq_len: int, threads: int, ort_ops: list[str]) -> dict:
    import onnxruntime  # noqa: F401 - imported before the baseline, as every mode needs it

    from edgeq.calibration.sources import TokenWindows
    from edgeq.calibration.collection import CollectionOptions, calibrate

    baseline = _rss_mb()
    start = time.perf_counter()
    extra: dict = {}
    if mode.startswith("edgeq"):
        tensors = linear_input_names(model)
        histogram = mode == "edgeq-histogram"
        options = CollectionOptions(histogram=histogram, threads=threads, progress=False)
        result = calibrate(model, TokenWindows(TOKEN_IDS, seq_len, count, first), tensors, options)
        method = "percentile" if histogram else "minmax"
        ranges = result.ranges(method, symmetric=True, percentile=99.999)
        if histogram:
            for other in ("entropy", "mse"):
                result.ranges(other, symmetric=True)
        extra = {"tensors": len(result), "example_range": ranges[tensors[-1]]}
    else:
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.samples = iter(_windows(first, count, seq_len))

            def get_next(self):
                return next(self.samples, None)

        method = CalibrationMethod.MinMax if mode == "ort-minmax" else CalibrationMethod.Percentile
        with tempfile.TemporaryDirectory() as folder:
            quantize_static(model, Path(folder) / "quantized.onnx", Reader(), op_types_to_quantize=ort_ops,
                            calibrate_method=method)
    return {"mode": mode, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "baseline_rss_mb": baseline, "seconds": time.perf_counter() - start, **extra}


# --- parent --------------------------------------------------------------------------------

def measure(mode: str, args: argparse.Namespace, model: Path) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--model-path", str(model),
               "--first-window", str(args.first_window), "--windows", str(args.windows),
               "--seq-len", str(args.seq_len), "--threads", str(args.threads), "--ort-ops", *args.ort_ops]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"mode": mode, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare_model(args: argparse.Namespace, folder: Path) -> Path:
    model = Path(args.model_path) if args.model_path else _built_model(args, folder)
    if not args.external_data:
        return model
    external = folder / f"{model.stem}_external.onnx"
    if not external.exists():
        code = ("import onnx, sys; onnx.save(onnx.load(sys.argv[1]), sys.argv[2], save_as_external_data=True, "
                "location=sys.argv[3])")
        subprocess.run([sys.executable, "-c", code, str(model), str(external), external.stem + ".data"], check=True)
    return external


def _built_model(args: argparse.Namespace, folder: Path) -> Path:
    path = folder / f"{args.model}.onnx"
    if path.exists():
        return path
    # Built in a child so the builder's memory never mixes with the measurements.
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            + ("from bench_calibration_memory import build_synthetic_lm as b; b(Path(sys.argv[2]))"
               if args.model == "synthetic" else
               "from edgeq.models.smollm2 import build; build(Path(sys.argv[2]))"))
    subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(path)], check=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["synthetic", "smollm2"], default="synthetic")
    parser.add_argument("--model-path", help="use this .onnx instead of building one")
    parser.add_argument("--work-dir", help="where built models are kept (default: a temporary folder)")
    parser.add_argument("--external-data", action="store_true", help="save the weights beside the model first")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--first-window", type=int, default=1000)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="edgeq's ORT threads")
    parser.add_argument("--ort-ops", nargs="+", default=["MatMul", "Gemm"])
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.model_path), args.first_window, args.windows,
                               args.seq_len, args.threads, args.ort_ops)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.work_dir or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        model = prepare_model(args, folder)
        size_mb = sum(p.stat().st_size for p in model.parent.glob(f"{model.stem}.*")) / 2**20
        print(f"model {model} ({size_mb:.0f} MB), windows {args.first_window}..{args.first_window + args.windows - 1}"
              f" of {args.seq_len} tokens")
        print(f"{'mode':<17}{'peak RSS MB':>12}{'after imports MB':>18}{'seconds':>9}  note")
        for mode in args.modes:
            row = measure(mode, args, model)
            if "error" in row:
                print(f"{mode:<17}{'failed':>12}  {row['error']}")
                continue
            note = f"{row['tensors']} tensors" if "tensors" in row else f"quantize_static({', '.join(args.ort_ops)})"
            print(f"{mode:<17}{row['peak_rss_mb']:>12.0f}{row['baseline_rss_mb']:>18.0f}{row['seconds']:>9.1f}  {note}",
                  flush=True)


if __name__ == "__main__":
    main()
