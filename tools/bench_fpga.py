"""MiniLM compiled for the `fpga` target: accuracy, bit-exactness, op census and FPGA estimates.

    python tools/bench_fpga.py --threads 1 [--paragraphs 256] [--out DIR] [--weight-rounding rtn|gptq]
                               [--per-channel] [--ablation N] [--sqnr N]

1. compiles all-MiniLM-L6-v2 for `fpga` with edgeq.compile, calibrated on
   edgeq.models.evaluation.minilm_calibration_feeds(shared, 16) (paragraphs after the evaluation ones);
2. embedding cosine of the integer model against the float model on the first 256 WikiText
   paragraphs (edgeq.models.evaluation: minilm_tokenize, minilm_eval_paragraphs, sentence_embeddings,
   cosine_rows), mean and min; run time of both (ratio);
3. ONNX Runtime against the numpy integer reference (edgeq.backends.fpga.integer.program) on a sample of
   paragraphs: the output and the integer tensor standing for every lowered float tensor
   (all layers' linear outputs, scores, probabilities, norms, GELU), bit for bit;
4. the op census of the lowered graph, the ops between the first QuantizeLinear and the last
   DequantizeLinear that compute on float (must be none) and the host ops; the per-tensor rule:
   program steps with channel scales (must be none), the scale sizes of the edge Q/DQ, the
   input dtypes of every MatMulInteger;
5. `edgeq estimate MODEL --target fpga --device D --json` for zcu102 and kv260: template,
   latency, throughput, resources, fit and every assumption;
6. with --per-channel, the earlier variant for comparison: LowerToInteger(equalization=1.0,
   rotate=False, residual_bits=8) (per-channel power-of-two factors, channel-grouped linears),
   its cosine on the same paragraphs; with --ablation N, the lowering's accuracy devices added one
   at a time (VARIANTS) on the first N paragraphs; with --sqnr N, where the error is: the SQNR of
   every integer tensor against its float tensor, summarised by kind.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from edgeq.models import evaluation as ev
from edgeq.compiler import compile as edgeq_compile
from edgeq.backends.fpga.integer.program import IntegerProgram, check_against_onnxruntime
from edgeq.ir import load, save
from edgeq.models import catalog
from edgeq.options import CalibrationOptions, CompileOptions
from edgeq.pipeline import PassContext, PassManager
from edgeq.registry import get_pass, get_target
from edgeq.targets.base import validate
from edgeq.pipeline.artifacts import CALIBRATION_DATA

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


def per_tensor_evidence(model: onnx.ModelProto) -> list[str]:
    """The per-tensor rule checked on the compiled graph."""
    program = IntegerProgram.from_model(model)
    constants = {t.name: t for t in model.graph.initializer}
    edges = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
             and n.input[0] not in constants]
    sizes = Counter(int(np.prod(constants[n.input[1]].dims)) if constants[n.input[1]].dims else 1 for n in edges)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    names = {v: k for k, v in onnx.TensorProto.DataType.items()}
    operands = Counter(names.get(types.get(i), "?") for n in model.graph.node if n.op_type == "MatMulInteger"
                       for i in n.input[:2])
    kinds = Counter(step.kind for step in program.steps)
    return [f"program steps with channel scales: {len(program.channel_scaled())}",
            f"edge Q/DQ scale sizes: {dict(sizes)} (1 = one scale per tensor)",
            f"MatMulInteger operand dtypes: {dict(operands)}",
            f"online Hadamard transforms: {kinds['HadamardInt']}; LayerNorm outputs "
            f"{dict(Counter(s.out_dtype for s in program.steps if s.kind == 'LayerNormInt'))}"]


# The lowering's accuracy devices, one added at a time (all with one scale per activation tensor
# except the last, the earlier per-channel variant kept as an explicit option).
VARIANTS = {
    "per-tensor int8 only": dict(equalization=None, rotate=False, residual_bits=8, scale_choice="cover"),
    "+ int16 residual stream": dict(equalization=None, rotate=False, residual_bits=16, scale_choice="cover"),
    "+ online Hadamard": dict(equalization=None, rotate=True, residual_bits=16, scale_choice="cover"),
    "+ MSE pow2 scales (default)": dict(equalization=None, rotate=True, residual_bits=16, scale_choice="mse"),
    "per-channel factors (option)": dict(equalization=1.0, rotate=False, residual_bits=8),
}


def variant_cosine(float_path: Path, work: Path, inputs: dict, reference: np.ndarray, threads: int,
                   **lowering) -> np.ndarray:
    """Cosine of a lowering variant, compiled with the target's pipeline and calibration."""
    from edgeq.backends.fpga.lower_to_integer import LowerToInteger

    target = get_target("fpga")
    options = CompileOptions(calibration=CalibrationOptions(), threads=threads)
    passes = []
    for name in target.default_pipeline:
        cls = get_pass(name)
        if name == "lower-to-integer":
            passes.append(LowerToInteger(CalibrationOptions(), threads=threads, **lowering))
        else:
            factory = getattr(cls, "from_options", None)
            passes.append(factory(options, target) if factory else cls())
    ctx = PassContext(target=target)
    ctx.artifacts[CALIBRATION_DATA] = ev.minilm_calibration_feeds(SHARED, 16)
    graph = PassManager(passes)(load(float_path), ctx).graph
    # the per-channel variant breaks the target's one-scale-per-tensor rule (for comparison only)
    problems = validate(graph, target, raise_on_error=False)
    if any("one scale per channel" not in v.problem for v in problems):
        raise SystemExit(f"variant {lowering}: {problems[0].node}: {problems[0].problem}")
    path = work / "minilm_fpga_variant.onnx"
    save(graph, path)
    integer, _ = embeddings(path, inputs, threads)
    return ev.cosine_rows(integer, reference)


def probe_sqnr(float_path: Path, model: onnx.ModelProto, inputs: dict, threads: int) -> list[tuple[float, str, str]]:
    """SQNR (dB, over the real tokens) of every integer tensor standing for a float tensor,
    against that float tensor in the float model (errors accumulated up to that point)."""
    import onnxruntime as ort

    program = IntegerProgram.from_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3

    def run(proto: onnx.ModelProto, names: list[str], elem: dict[str, int]) -> dict[str, np.ndarray]:
        extended = onnx.ModelProto()
        extended.CopyFrom(proto)
        have = {o.name for o in extended.graph.output}
        extended.graph.output.extend(onnx.helper.make_tensor_value_info(n, elem.get(n, 1), None)
                                     for n in names if n not in have)
        session = ort.InferenceSession(extended.SerializeToString(), options, providers=["CPUExecutionProvider"])
        graph_inputs = {i.name for i in proto.graph.input}
        return dict(zip(names, session.run(names, {k: v for k, v in inputs.items() if k in graph_inputs})))

    float_model = onnx.load(str(float_path))
    float_values = run(float_model, [n for n in program.probes if n in _value_names(float_model)], {})
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
    ints = run(model, sorted({name for name, _ in program.probes.values()}), types)
    mask = inputs["attention_mask"].astype(bool)
    rows = []
    for name, (integer, scale) in program.probes.items():
        if name not in float_values:
            continue
        real, approx = float_values[name], ints[integer].astype(np.float64) * np.asarray(scale)
        if real.shape[:2] == mask.shape:
            real, approx = real[mask], approx[mask]
        error = float(((approx - real) ** 2).mean())
        rows.append((10 * np.log10(float((real**2).mean()) / max(error, 1e-30)), name, str(ints[integer].dtype)))
    return rows


def _value_names(model: onnx.ModelProto) -> set[str]:
    return {o for n in model.graph.node for o in n.output}


def estimate_cli(model: Path, device: str) -> dict:
    cmd = [sys.executable, "-m", "edgeq.cli", "estimate", str(model), "--target", "fpga", "--device", device,
           "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--paragraphs", type=int, default=ev.MINILM_EVAL_PARAGRAPHS)
    parser.add_argument("--exact-sample", type=int, default=4, help="paragraphs for the bit-exact check")
    parser.add_argument("--weight-rounding", choices=["rtn", "gptq"], default="rtn")
    parser.add_argument("--out", type=Path, help="keep the compiled model here")
    parser.add_argument("--per-channel", action="store_true",
                        help="also measure the earlier per-channel variant (explicit option, not the default)")
    parser.add_argument("--ablation", type=int, default=0, metavar="N",
                        help="cosine of the lowering variants (VARIANTS) on the first N paragraphs")
    parser.add_argument("--sqnr", type=int, default=0, metavar="N",
                        help="SQNR of every integer tensor against float on the first N paragraphs")
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
    print(f"\n== bit-exactness: ONNX Runtime vs numpy integer reference (edgeq.backends.fpga.integer.program), "
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
    print("\n== per-tensor activation scales (the fpga target's rule)")
    for line in per_tensor_evidence(model):
        print("  " + line)

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

    if args.sqnr:
        sample = {k: v[:args.sqnr] for k, v in inputs.items()}
        rows = probe_sqnr(float_path, model, sample, args.threads)
        print(f"\n== SQNR of the integer tensors against float ({args.sqnr} paragraphs, real tokens; errors "
              "accumulated up to each tensor), by kind: min / median dB")
        kinds: dict[str, list[float]] = {}
        for db, name, _ in rows:
            kind = re.sub(r"_output_0$", "", re.sub(r"^/encoder/layer\.\d+/", "", name))
            kinds.setdefault(kind, []).append(db)
        for kind, values in sorted(kinds.items(), key=lambda kv: min(kv[1])):
            print(f"  {kind:28s} {min(values):6.2f} / {float(np.median(values)):6.2f}  ({len(values)} tensors)")

    if args.ablation:
        count = min(args.ablation, len(texts))
        sub = {k: v[:count] for k, v in inputs.items()}
        print(f"\n== lowering variants (LowerToInteger options), {count} paragraphs: cosine mean / min")
        for label, lowering in VARIANTS.items():
            cos = variant_cosine(float_path, work, sub, reference[:count], args.threads, **lowering)
            print(f"  {label:30s} {cos.mean():.5f} / {cos.min():.5f}   {lowering}", flush=True)

    if args.per_channel:
        other = variant_cosine(float_path, work, inputs, reference, args.threads, **VARIANTS["per-channel factors (option)"])
        print(f"\n== per-channel variant (LowerToInteger(equalization=1.0, rotate=False, residual_bits=8), "
              f"explicit option): cosine mean {other.mean():.5f} min {other.min():.5f} on {len(texts)} paragraphs")


if __name__ == "__main__":
    main()
