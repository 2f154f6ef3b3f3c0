"""Low-bit presets on SmolLM2: W4A16 (RTN, GPTQ, AWQ, AWQ+GPTQ), W4A8 and W8A8, beside ONNX
Runtime's own int4 quantizer, in one run.

    python tools/bench_low_bit.py --out /tmp/low-bit --speed    # the default rows, ~40 min on 2 cores
    python tools/bench_low_bit.py --rows w4-rtn,w4-gptq,ort-int4 --speed

Every edgeq row is the CLI (`edgeq compile ... --calib calib.npz`) run in a child process that
reports its wall time and its own peak RSS (VmHWM, read in the child: getrusage's
RUSAGE_CHILDREN would carry this parent's high-water mark over fork+exec). Calibration:
windows 1000..1065 of the WikiText-2 token ids (the compile sets the last 2 aside to verify);
perplexity: `edgeq.models.evaluation.evaluate_smollm2`, the standard protocol (windows 0..31).
int4 is symmetric with blocks of 128 along K (the GGUF source is already on an asymmetric
block-32 grid, which an asymmetric block-32 int4 would reproduce).

`--speed`: the W4A16 QDQ output (DequantizeLinear int4 block 128 -> MatMul, which ORT fuses
into MatMulNBits), the same weights written as com.microsoft MatMulNBits directly (accuracy
level 4, as the fusion sets it, and 0), and ORT's quantizer output, timed interleaved on one
256-token window and on one token (median of --repeats), with the fused graph's kernels and
the largest output difference between the QDQ and the direct form.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_SHARED, load_line, run_header  # noqa: E402

FLOAT_PPL_REFERENCE = 43.997
# name -> (label, compile flags after MODEL)
_W4 = ["--weights", "int4", "--group", "128"]
ROWS = {
    "w4-rtn": ("W4A16 int4 sym g128, RTN, no rotation", [*_W4, "--activations", "float", "--weight-rounding", "rtn",
                                                        "--no-rotate"]),
    "w4-rtn-head-int4": ("W4A16 RTN, no rotation, LM head int4 too", [*_W4, "--activations", "float",
                                                                     "--weight-rounding", "rtn", "--no-rotate",
                                                                     "--head-weights", "int4"]),
    "w4-gptq-no-rotate": ("W4A16 GPTQ, no rotation", [*_W4, "--activations", "float", "--no-rotate"]),
    "w4-gptq": ("W4A16 preset (x86 default: rotation + GPTQ, LM head int8)", [*_W4, "--activations", "float"]),
    "w4-awq-gptq": ("W4A16 rotation + AWQ scaling + GPTQ", [*_W4, "--activations", "float",
                                                          "--weight-rounding", "awq+gptq"]),
    "w4a8": ("W4A8 preset (int4 g128 weights, uint8 activations, rotation + GPTQ)", [*_W4, "--activations", "int8"]),
    "w8a8-rotate": ("W8A8 with --rotate (uint8 activations, int8 channel weights)", ["--weights", "int8", "--rotate"]),
}
DEFAULT_ROWS = ("float", "ort-int4", "w4-rtn", "w4-rtn-head-int4", "w4-gptq-no-rotate", "w4-gptq", "w4a8",
                "w8a8-rotate")


# --- child processes -------------------------------------------------------------------------

def _own_peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_main(kind: str, result: Path, argv: list[str]) -> None:
    """Runs one compile (the edgeq CLI) or ORT's int4 quantizer, then records time and peak RSS."""
    start = time.perf_counter()
    if kind == "edgeq":
        from edgeq.cli import main as cli_main

        code = cli_main(argv)
        if code:
            raise SystemExit(code)
    else:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        source, out = argv
        quantizer = MatMulNBitsQuantizer(onnx.load(source), bits=4, block_size=128, is_symmetric=True)
        quantizer.process()
        quantizer.model.save_model_to_file(out, use_external_data_format=False)
    result.write_text(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": _own_peak_rss_mb()}))


def run_child(kind: str, argv: list[str], work: Path) -> dict:
    result = work / "child.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", kind, "--child-result", str(result), "--", *argv]
    wall = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - wall
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return {**json.loads(result.read_text()), "wall_s": wall}


# --- models and data -------------------------------------------------------------------------

def calibration_file(shared: Path, out: Path, samples: int) -> Path:
    from edgeq.models.evaluation import smollm2_calibration_feeds

    feeds = smollm2_calibration_feeds(shared, samples)
    np.savez(out, **{name: np.stack([f[name] for f in feeds]) for name in feeds[0]})  # [samples, 1, seq]
    return out


def pass_summary(report: dict) -> str:
    """Which passes changed something, with their main numbers."""
    keep = ("awq", "gptq", "calibrate", "smooth-quant", "insert-qdq")
    parts = []
    for record in report.get("passes", []):
        name, stats = record["name"], record["stats"]
        if name not in keep or (name in ("awq", "gptq") and not stats.get("groups")):
            continue
        if name == "gptq":
            text = (f"gptq: {stats['layers']} layers, rel. output error {stats['mean_error_rtn']:.4f} (RTN) -> "
                    f"{stats['mean_error_gptq']:.4f}")
        elif name == "awq":
            text = (f"awq: {stats['scaled']}/{stats['groups']} groups scaled ({stats['folded']} into norms, "
                    f"{stats['folded_gated']} into up_proj, {stats['explicit_mul']} explicit Mul), error "
                    f"{stats['mean_error_rtn']:.4f} -> {stats['mean_error_scaled']:.4f}"
                    + (f" -> clipped {stats['mean_error_clipped']:.4f}" if "mean_error_clipped" in stats else ""))
        elif name == "calibrate":
            if not stats.get("tensors"):
                continue
            text = f"calibrate: {stats['tensors']} tensors"
        elif name == "insert-qdq":
            text = (f"insert-qdq: {stats['weights_quantized']} weights, {stats['activation_quantizers']} "
                    f"activation Q")
        else:
            text = f"{name}: {stats}"
        parts.append(f"{text} ({record['seconds']:.0f} s)")
    return "; ".join(parts)


# --- MatMulNBits written directly ------------------------------------------------------------

def to_matmulnbits(qdq_path: Path, out: Path, accuracy_level: int) -> int:
    """The same int4 weights as com.microsoft MatMulNBits nodes (what ORT's fusion builds)."""
    import ml_dtypes

    from edgeq.ir import load, save

    graph = load(qdq_path)
    replaced = 0
    for matmul in graph.ops_of_type("MatMul"):
        a, b = graph.inputs_of(matmul)
        dq = graph.producer(b)
        if dq is None or dq.op_type != "DequantizeLinear" or not dq.attr("block_size") or dq.attr("axis") != 0:
            continue
        q_value, s_value, z_value = graph.inputs_of(dq)
        q = graph.constant(q_value).numpy()
        if q.dtype != ml_dtypes.int4:
            continue
        scale, zero = graph.constant(s_value).numpy(), graph.constant(z_value).numpy()
        block = int(dq.attr("block_size"))
        k, n = q.shape
        blocks = -(-k // block)
        unsigned = q.astype(np.int16) + 8  # zero point 8 (MatMulNBits' default) = signed zero 0
        inputs = [a]
        if np.any(zero.astype(np.int16)):
            zp = (zero.astype(np.int16) + 8).astype(np.uint8).T  # [N, blocks]
            zp = np.pad(zp, ((0, 0), (0, blocks % 2)))
            packed_zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
        else:
            packed_zp = None
        padded = np.full((blocks * block, n), 8, np.uint8)
        padded[:k] = unsigned.astype(np.uint8)
        rows = padded.T.reshape(n, blocks, block)
        packed = (rows[..., 0::2] | (rows[..., 1::2] << 4)).astype(np.uint8)
        inputs += [graph.add_constant(f"{q_value.name}_nbits", packed),
                   graph.add_constant(f"{s_value.name}_nbits", np.ascontiguousarray(scale.T).reshape(-1))]
        if packed_zp is not None:
            inputs.append(graph.add_constant(f"{z_value.name}_nbits", packed_zp))
        out_value = graph.outputs_of(matmul)[0]
        graph.remove_op(matmul, remove_outputs=False)
        graph.add_op("MatMulNBits", inputs, [out_value], domain="com.microsoft", name=matmul.name,
                     attrs={"K": k, "N": n, "bits": 4, "block_size": block, "accuracy_level": accuracy_level})
        if not graph.consumers(graph.outputs_of(dq)[0]):
            graph.remove_op(dq)
            for value in (q_value, s_value, z_value):
                if not graph.consumers(value):
                    graph.remove_value(value)
        replaced += 1
    graph.model.opset_imports.setdefault("com.microsoft", 1)
    save(graph, out)
    return replaced


def speed(models: dict[str, Path], threads: int, repeats: int) -> tuple[list[str], dict]:
    import onnxruntime as ort

    from edgeq.models.evaluation import smollm2_eval_windows
    from edgeq.runtime.fusion import fusion_report
    from edgeq.runtime.sessions import make_session

    window = smollm2_eval_windows(DEFAULT_SHARED)[0][None, :]
    inputs = {"256 tokens": window, "1 token": window[:, :1]}
    sessions, load_s = {}, {}
    for name, path in models.items():
        start = time.perf_counter()
        sessions[name] = make_session(path, threads)
        load_s[name] = time.perf_counter() - start
    times = {(name, label): [] for name in models for label in inputs}
    outputs = {}
    for _ in range(repeats + 1):  # the first round warms up
        for label, ids in inputs.items():
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            for name, sess in sessions.items():
                start = time.perf_counter()
                (logits,) = sess.run(["logits"], feed)
                times[(name, label)].append(time.perf_counter() - start)
                outputs[(name, label)] = logits
    lines = ["| model | kernels after ORT optimisation | load (s) | " + " | ".join(f"{k} (ms)" for k in inputs)
             + " |", "|---|---|---:|" + "---:|" * len(inputs)]
    for name, path in models.items():
        fusion = fusion_report(path)
        kernels = ", ".join(f"{k} {v}" for k, v in fusion.integer_kernels.items()) or "-"
        cells = " | ".join(f"{1000 * np.median(times[(name, label)][1:]):.1f}" for label in inputs)
        lines.append(f"| {name} | {kernels} | {load_s[name]:.1f} | {cells} |")
    return lines, {"outputs": outputs, "ort": ort.__version__}


def fused_attributes(path: Path) -> list[dict]:
    """Attributes of the MatMulNBits nodes in the graph ORT runs (saved optimised model)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        model = onnx.load(so.optimized_model_filepath, load_external_data=False)
    seen = []
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            attrs["inputs"] = len(node.input)
            if attrs not in seen:
                seen.append(attrs)
    return seen


# --- the run ---------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                        help=f"comma-separated, from: float, ort-int4, {', '.join(ROWS)}")
    parser.add_argument("--out", type=Path, help="keep models here (default: a temporary folder)")
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--samples", type=int, default=66,
                        help="calibration windows from window 1000 (the compile holds the last 2 out to verify)")
    parser.add_argument("--threads", type=int, default=2, help="ORT threads for compile and evaluation")
    parser.add_argument("--speed", action="store_true", help="MatMulNBits vs int4 QDQ timing (needs w4-gptq)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--child", choices=["edgeq", "ort"], help=argparse.SUPPRESS)
    parser.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child, args.child_result, args.rest)
        return

    from edgeq.models.evaluation import evaluate_smollm2
    from edgeq.models import catalog

    header = run_header()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - set(ROWS) - {"float", "ort-int4"}
    if unknown:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
    tmp = tempfile.TemporaryDirectory(prefix="edgeq-low-bit-")
    out = args.out or Path(tmp.name)
    out.mkdir(parents=True, exist_ok=True)
    float_path = catalog.cached("smollm2")
    calib = calibration_file(args.shared, out / "calib.npz", args.samples)
    table = ["| row | perplexity | vs float | size (MB) | % of float | compile (s) | compile peak RSS (MiB) | "
             "what the passes did |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    float_bytes = None
    results: dict[str, dict] = {}

    def add(label: str, path: Path, compiled: dict | None, passes: str) -> None:
        nonlocal float_bytes
        result = evaluate_smollm2(path, args.shared, args.threads)
        ppl = result.metrics["perplexity"]
        float_bytes = float_bytes or result.file_bytes
        results[label] = {"ppl": ppl, "bytes": result.file_bytes, **(compiled or {})}
        compile_cells = (f"{compiled['wall_s']:.0f} | {compiled['peak_rss_mb']:.0f}" if compiled else "- | -")
        table.append(f"| {label} | {ppl:.3f} | {100 * (ppl / FLOAT_PPL_REFERENCE - 1):+.1f}% | "
                     f"{result.file_bytes / 1e6:.1f} | {100 * result.file_bytes / float_bytes:.1f}% | "
                     f"{compile_cells} | {passes} |")
        print(table[-1], flush=True)

    add("float32", float_path, None, "-")
    if "ort-int4" in rows:
        path = out / "ort-int4.onnx"
        measured = run_child("ort", [str(float_path), str(path)], out)
        add("ORT MatMulNBitsQuantizer int4 sym block 128", path, measured, "MatMulNBits (accuracy level unset)")
    for name in (r for r in rows if r in ROWS):
        (label, flags), = (ROWS[name],)
        path, report = out / f"{name}.onnx", out / f"{name}.report.json"
        argv = ["compile", str(float_path), "--target", "x86-vnni", "-o", str(path),
                "--calib", str(calib), "--threads", str(args.threads), "--report", str(report), *flags]
        measured = run_child("edgeq", argv, out)
        data = json.loads(report.read_text())
        kernels = (data.get("fusion") or {}).get("integer_kernels", {})
        summary = pass_summary(data) + f"; ORT kernels: {', '.join(f'{k} {v}' for k, v in kernels.items())}"
        add(label, path, measured, summary)
    speed_lines: list[str] = []
    if args.speed and (out / "w4-gptq.onnx").exists():
        qdq = out / "w4-gptq.onnx"
        direct4, direct0 = out / "w4-gptq-matmulnbits-acc4.onnx", out / "w4-gptq-matmulnbits-acc0.onnx"
        count = to_matmulnbits(qdq, direct4, 4)
        to_matmulnbits(qdq, direct0, 0)
        models = {"edgeq W4A16 QDQ (DQ int4 -> MatMul)": qdq, "same weights, MatMulNBits accuracy 4": direct4,
                  "same weights, MatMulNBits accuracy 0": direct0}
        if (out / "ort-int4.onnx").exists():
            models["ORT MatMulNBitsQuantizer output"] = out / "ort-int4.onnx"
        speed_lines, extra = speed(models, args.threads, args.repeats)
        names = list(models)
        for label in ("256 tokens", "1 token"):
            diff = np.max(np.abs(extra["outputs"][(names[0], label)] - extra["outputs"][(names[1], label)]))
            speed_lines.append(f"\nmax |logits(QDQ) - logits(MatMulNBits acc 4)| on {label}: {diff:.3g}")
        speed_lines.append(f"\nMatMulNBits written directly: {count}; fused from QDQ, attributes: "
                           f"{fused_attributes(qdq)}; written directly (acc 4): {fused_attributes(direct4)}")
        acc0_ppl = evaluate_smollm2(direct0, args.shared, args.threads).metrics["perplexity"]
        speed_lines.append(f"\nperplexity of the same weights at accuracy level 0 (fp32 activations): {acc0_ppl:.3f}")
    print("\n".join([*header, load_line("at end"), f"threads: {args.threads}, calibration windows: "
                     f"1000..{999 + args.samples} ({args.samples - 2} used, 2 verify)", ""]))
    print("\n".join(table))
    if speed_lines:
        print("\n" + "\n".join(speed_lines))
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
