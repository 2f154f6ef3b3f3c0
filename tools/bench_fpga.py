"""MiniLM compiled for the `fpga` target: accuracy, bit-exactness, op census and FPGA estimates.

    python tools/bench_fpga.py --threads 2 [--paragraphs 256] [--out DIR] [--weight-rounding rtn|gptq]

1. compiles all-MiniLM-L6-v2 for `fpga` with edgeq.compile, calibrated on
   edgeq.evaluation.minilm_calibration_feeds(shared, 16) (paragraphs after the evaluation ones);
2. embedding cosine of the integer model against the float model on the first 256 WikiText
   paragraphs (edgeq.evaluation: minilm_tokenize, minilm_eval_paragraphs, sentence_embeddings,
   cosine_rows), mean and min; run time of both (ratio);
3. ONNX Runtime against the numpy integer reference (edgeq.integer.program) on a sample of
   paragraphs: the output and the integer tensor standing for every lowered float tensor
   (all layers' linear outputs, scores, probabilities, norms, GELU), bit for bit;
4. the op census of the lowered graph, the ops between the first QuantizeLinear and the last
   DequantizeLinear that compute on float (must be none) and the host ops;
5. `edgeq estimate MODEL --target fpga --device D --json` for zcu102 and kv260: template,
   latency, throughput, resources, fit and every assumption.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from edgeq import evaluation as ev
from edgeq.compiler import compile as edgeq_compile
from edgeq.integer.program import check_against_onnxruntime
from edgeq.models import catalog
from edgeq.options import CalibrationOptions, CompileOptions
from edgeq.registry import get_target
from edgeq.targets.base import validate

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FLOAT_COMPUTE = {"MatMul", "Gemm", "Softmax", "LayerNormalization", "Erf", "Gelu", "Sqrt", "Pow", "Tanh",
                 "ReduceMean", "Sigmoid", "Exp"}


def embeddings(model: Path, inputs: dict[str, np.ndarray], threads: int) -> tuple[np.ndarray, float]:
    session = ev.session(model, threads)
    start = time.perf_counter()
    out = ev.sentence_embeddings(session, inputs)
    return out, time.perf_counter() - start


def census(model: onnx.ModelProto) -> tuple[Counter, list[str], list[dict], int]:
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    # ops strictly between a QuantizeLinear of an activation and a DequantizeLinear
    after, stack = set(), [n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"]
    while stack:
        for reader in consumers.get(stack.pop(), []):
            if id(reader) not in after:
                after.add(id(reader))
                stack.extend(reader.output)
    before, stack = set(), [n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in before:
            before.add(id(node))
            stack.extend(i for i in node.input if i)
    region = [n for n in graph.node if id(n) in after and id(n) in before]
    float_in_region = [f"{n.op_type} {n.name}" for n in region if n.op_type in FLOAT_COMPUTE]
    host = json.loads({p.key: p.value for p in model.metadata_props}.get("edgeq.host_ops", "[]"))
    return Counter(n.op_type for n in graph.node), float_in_region, host, len(region)


def estimate_cli(model: Path, device: str) -> dict:
    cmd = [sys.executable, "-m", "edgeq.cli", "estimate", str(model), "--target", "fpga", "--device", device,
           "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paragraphs", type=int, default=ev.MINILM_EVAL_PARAGRAPHS)
    parser.add_argument("--exact-sample", type=int, default=4, help="paragraphs for the bit-exact check")
    parser.add_argument("--weight-rounding", choices=["rtn", "gptq"], default="rtn")
    parser.add_argument("--out", type=Path, help="keep the compiled model here")
    args = parser.parse_args()

    float_path = catalog.cached("minilm")
    work = Path(tempfile.mkdtemp(prefix="bench-fpga-")) if args.out is None else args.out
    work.mkdir(parents=True, exist_ok=True)
    compiled_path = work / "minilm_fpga.onnx"
    options = CompileOptions(calibration=CalibrationOptions(), threads=args.threads,
                             weight_rounding=args.weight_rounding)
    start = time.perf_counter()
    compiled = edgeq_compile(float_path, "fpga", options,
                             calibration=ev.minilm_calibration_feeds(SHARED, 16))
    compile_s = time.perf_counter() - start
    compiled.save(compiled_path)
    validate(compiled.graph, get_target("fpga"))
    print(f"== compile: all-MiniLM-L6-v2 -> fpga in {compile_s:.1f} s (validate(graph, fpga): passed)")
    for line in compiled.report.summary_lines():
        print("  " + line)
    print(f"  model bytes: float {compiled.report.float_bytes:,} -> integer {compiled.report.compiled_bytes:,} "
          f"(ratio {compiled.report.size_ratio:.3f})")

    texts = ev.minilm_eval_paragraphs(SHARED)[:args.paragraphs]
    inputs = ev.minilm_tokenize(texts)
    reference, float_s = embeddings(float_path, inputs, args.threads)
    integer, integer_s = embeddings(compiled_path, inputs, args.threads)
    cosine = ev.cosine_rows(integer, reference)
    print(f"\n== accuracy: {len(texts)} WikiText paragraphs (max length {ev.MINILM_MAX_LENGTH}), "
          f"sentence-embedding cosine, integer vs float")
    print(f"  cosine mean {cosine.mean():.5f}  min {cosine.min():.5f}  (bound: mean >= 0.99; "
          f"deficit 1-mean {1 - cosine.mean():.5f})")
    print(f"  ONNX Runtime CPU time, {args.threads} threads: float {float_s:.1f} s, integer {integer_s:.1f} s "
          f"(integer/float ratio {integer_s / float_s:.2f})")

    model = onnx.load(str(compiled_path))
    sample = {k: v[:args.exact_sample] for k, v in inputs.items()}
    check = check_against_onnxruntime(model, sample, threads=args.threads)
    print(f"\n== bit-exactness: ONNX Runtime vs numpy integer reference (edgeq.integer.program), "
          f"{args.exact_sample} paragraphs")
    print(f"  {check.tensors} tensors ({check.elements:,} elements: the output and the integer tensor standing "
          f"for every lowered float tensor): "
          f"{'bit-identical' if check.bit_exact else 'MISMATCH in ' + ', '.join(check.mismatched)}")

    ops, float_ops, host, region = census(model)
    print("\n== op census of the lowered graph")
    print("  " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))
    print(f"  ops between the first QuantizeLinear and the last DequantizeLinear: {region}; "
          f"float compute among them: {len(float_ops)} {float_ops[:5]}")
    print(f"  host ops ({len(host)}): " + ", ".join(f"{h['op_type']} {h['name']}" for h in host))

    for device in ("zcu102", "kv260"):
        report = estimate_cli(compiled_path, device)
        print(f"\n== edgeq estimate {compiled_path.name} --target fpga --device {device}")
        print(f"  template {report['template']} on {report['board']} ({report['device']}) at "
              f"{report['clock_mhz']:g} MHz: latency {report['latency_ms']:.3f} ms "
              f"({report['latency_cycles']:,} cycles), {report['throughput_fps']:.1f} fps, fits={report['fits']}"
              + (f" (over limit: {', '.join(report['over_limit'])})" if report['over_limit'] else ""))
        used, avail = report["totals"], report["available"]
        print("  resources: " + ", ".join(
            f"{k} {used[k]:,.0f}/{avail[k]:,.0f} (ratio {report['utilisation'][k]:.3f})"
            if report['utilisation'][k] is not None else f"{k} {used[k]:,.0f}/{avail[k]:,.0f}" for k in used))
        kinds = Counter(layer["kind"] for layer in report["layers"])
        print("  layers: " + ", ".join(f"{k} {v}" for k, v in kinds.items()))
        print("  assumptions:")
        for line in report["assumptions"]:
            print(f"    - {line}")


if __name__ == "__main__":
    main()
