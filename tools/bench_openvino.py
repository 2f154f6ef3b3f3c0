"""Every number of issue 12 on this machine, in one command: float and edgeq models on ONNX
Runtime's CPU provider and on OpenVINO, ORT's quantize_dynamic and (optionally) NNCF, speed and
accuracy.

    python tools/bench_openvino.py --threads 2,16 --out build/bench-openvino
    python tools/bench_openvino.py --models minilm --threads 2 --nncf-minilm build/minilm.nncf.onnx

What it does:
1. Builds the models (edgeq[models]): MiniLM and/or SmolLM2 float; edgeq compiles of each for
   the x86 target of this CPU (x86-amx with AMX-INT8, else x86-vnni) on OpenVINO (the OpenVINO
   QDQ layout: needs edgeq[openvino]) and on ORT's CPU provider (its own layout); MiniLM W8A8
   default options, SmolLM2 W8A8 `--rotate` with 18 calibration windows, as the README;
   ORT's quantize_dynamic (per-channel int8, after quant_pre_process). NNCF's output comes from
   tools/nncf_baseline.py (a scratch venv; see there) via --nncf-minilm / --nncf-smollm2.
2. Accuracy of every quantized model on its runtime against the float model in fp32 on ORT's
   CPU provider: MiniLM sentence-embedding cosine over the 256 WikiText paragraphs (mean, min),
   SmolLM2 perplexity on the standard 32 windows (models/evaluation.py's protocols).
3. Speed per thread count, each in a child process pinned to that many cores (as taskset):
   MiniLM batch 16 x 128, SmolLM2 prefill 1 x 256; rows interleaved round robin after a
   warm-up (edgeq.runtime.benchmark), median and IQR of --repeats rounds; ratios against ORT's
   fp32 CPU float and against the fastest float path of the run (OpenVINO bf16 where the CPU
   has bf16). OpenVINO runs through ONNX Runtime's OpenVINO provider where its plugin lists this
   CPU (Intel), else through the openvino package (same CPU plugin; the table says which).
Writes OUT/results.json and OUT/results.md and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_SHARED, load_line, machine_line, run_header  # noqa: E402

SHAPES = {"minilm": (16, 128), "smollm2": (1, 256)}


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def host_target() -> str:
    return "x86-amx" if "amx_int8" in cpu_flags() else "x86-vnni"


# ---- 1. models -------------------------------------------------------------------------------

def build_models(model: str, out: Path, shared: Path, threads: int, nncf: Path | None) -> list[dict]:
    """The rows' models: float, edgeq on OpenVINO and on the CPU provider, ORT dynamic, NNCF."""
    from onnxruntime.quantization import quant_pre_process
    from ort_baselines import dynamic_int8

    from edgeq.compiler import compile as edgeq_compile
    from edgeq.models import catalog, evaluation
    from edgeq.options import CompileOptions
    from edgeq.registry import get_target
    from edgeq.runtime.providers import availability

    float_path = catalog.cached(model)
    target = host_target()
    rows = [{"model": model, "name": "float", "path": str(float_path), "kind": "float"}]
    if model == "minilm":
        calibration, options = evaluation.minilm_calibration_feeds(shared, 18), CompileOptions(threads=threads)
    else:
        calibration = evaluation.smollm2_calibration_feeds(shared, 18)
        options = CompileOptions(threads=threads, rotate=True)
    openvino = get_target(target).execution_named("openvino")
    providers = ["openvino", "cpu"] if availability(openvino).runs else ["cpu"]
    for provider in providers:
        start = time.perf_counter()
        compiled = edgeq_compile(float_path, target, options, calibration=calibration, provider=provider)
        path = out / f"{model}.{target}.{provider}.onnx"
        compiled.save(path)
        report = compiled.report
        name = f"edgeq {target} {report.scheme}" + (" --rotate" if options.rotate else "")
        rows.append({"model": model, "name": name,
                     "path": str(path), "kind": "compiled", "target": target, "provider": provider,
                     "compile_s": time.perf_counter() - start, "summary": report.summary_lines()})
        print(f"[{model}] compiled for {target} on {provider} in {rows[-1]['compile_s']:.0f} s", file=sys.stderr)
    preprocessed = out / f"{model}.preprocessed.onnx"
    quant_pre_process(float_path, preprocessed, auto_merge=True)
    dynamic = out / f"{model}.ort-dynamic.onnx"
    dynamic_int8(float_path, preprocessed, dynamic)
    rows.append({"model": model, "name": "ORT quantize_dynamic int8", "path": str(dynamic), "kind": "other",
                 "target": target, "provider": "cpu"})
    if nncf is not None:
        rows.append({"model": model, "name": "NNCF W8A8 (TRANSFORMER, SmoothQuant)", "path": str(nncf),
                     "kind": "other", "target": target, "provider": providers[0]})
    return rows


# ---- 2. accuracy -----------------------------------------------------------------------------

def accuracy(rows: list[dict], shared: Path, threads: int) -> None:
    """Each quantized model on its runtime against the float model (fp32, ORT CPU provider)."""
    from edgeq.models import evaluation
    from edgeq.registry import get_target

    by_model: dict[str, list[dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    for model, group in by_model.items():
        float_row = next(r for r in group if r["kind"] == "float")
        if model == "minilm":
            inputs = evaluation.minilm_tokenize(evaluation.minilm_eval_paragraphs(shared))
            reference = evaluation.sentence_embeddings(evaluation.session(Path(float_row["path"]), threads), inputs)
        for row in group:
            if row["kind"] == "float":
                continue
            execution = get_target(row["target"]).execution_named(row["provider"])
            start = time.perf_counter()
            session = evaluation.session(Path(row["path"]), threads, execution)
            if model == "minilm":
                cos = evaluation.cosine_rows(evaluation.sentence_embeddings(session, inputs), reference)
                row["accuracy"] = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
            else:
                nll = evaluation.lm_window_nll(session, evaluation.smollm2_eval_windows(shared))
                row["accuracy"] = {"perplexity": evaluation.perplexity(nll)}
            row["accuracy_s"] = time.perf_counter() - start
            print(f"[{model}] {row['name']} on {row['provider']}: {row['accuracy']}", file=sys.stderr)
        if model == "smollm2":
            nll = evaluation.lm_window_nll(evaluation.session(Path(float_row["path"]), threads),
                                           evaluation.smollm2_eval_windows(shared))
            float_row["accuracy"] = {"perplexity": evaluation.perplexity(nll)}


# ---- 3. speed (in a pinned child) --------------------------------------------------------------

def speed_rows(rows: list[dict]):
    """RowSpecs: float on every float path, each quantized model on its runtime (OpenVINO rows
    of edgeq's output with both precision hints)."""
    from edgeq.registry import get_target
    from edgeq.runtime.benchmark import RowSpec, cpu_has_bf16, with_hint
    from edgeq.runtime.providers import CPU, availability

    specs = []
    for row in rows:
        path = Path(row["path"])
        target = get_target(row.get("target") or host_target())
        openvino = target.execution_named("openvino")
        ov_runs = availability(openvino).runs
        if row["kind"] == "float":
            specs.append(RowSpec(f"{row['model']} float", path, "float", CPU, "fp32"))
            if ov_runs:
                specs.append(RowSpec(f"{row['model']} float", path, "float", openvino, "f32", reference=True))
                if cpu_has_bf16():
                    specs.append(RowSpec(f"{row['model']} float", path, "float", with_hint(openvino, "bf16"), "bf16"))
            continue
        execution = target.execution_named(row["provider"])
        if execution.device_config is None:
            specs.append(RowSpec(f"{row['model']} {row['name']}", path, "compiled", execution, "fp32"))
            continue
        hints = ["f32", "bf16"] if cpu_has_bf16() else ["f32"]
        for hint in hints:
            specs.append(RowSpec(f"{row['model']} {row['name']}", path, "compiled", with_hint(execution, hint), hint))
    return specs


def speed_child(plan: Path, threads: int, repeats: int, result_path: Path) -> None:
    from edgeq.runtime.benchmark import ModelInfo, make_feed, run_rows

    rows = json.loads(plan.read_text())
    specs = speed_rows(rows)
    results = []
    for model in dict.fromkeys(r["model"] for r in rows):
        model_specs = [s for s in specs if s.label.startswith(model + " ")]
        info = ModelInfo.read(next(r["path"] for r in rows if r["model"] == model and r["kind"] == "float"))
        batch, seq = SHAPES[model]
        shapes = {name: [batch, seq] for name, _, _ in info.inputs}
        feeds = {s.model: make_feed(ModelInfo.read(s.model), shapes) for s in model_specs}
        timed = run_rows(model_specs, feeds, threads=threads, warmup=2, repeats=repeats, progress=False)
        cpu_float = next(t for t in timed if t.spec.kind == "float" and t.spec.precision == "fp32")
        best = min((t for t in timed if t.spec.kind == "float"), key=lambda t: t.median)
        for t in timed:
            results.append({"model": model, "label": t.spec.label, "provider": t.spec.execution.provider,
                            "precision": t.spec.precision, "via": t.via, "path": str(t.spec.model),
                            "median_ms": 1e3 * t.median, "q1_ms": 1e3 * t.stat(0.25), "q3_ms": 1e3 * t.stat(0.75),
                            "vs_cpu_float": cpu_float.median / t.median, "vs_best_float": best.median / t.median,
                            "best_float": f"{best.spec.execution.provider} {best.spec.precision}",
                            "shape": f"{batch}x{seq}", "runs_ms": [1e3 * s for s in t.seconds]})
    result_path.write_text(json.dumps({"threads": threads, "cpus": sorted(os.sched_getaffinity(0)),
                                       "machine": machine_line(), "load": load_line("after"), "rows": results},
                                      indent=2))


def run_speed(plan: Path, threads: int, repeats: int, out: Path) -> dict:
    cpus = sorted(os.sched_getaffinity(0))
    pinned = set(cpus[:threads]) if threads < len(cpus) else set(cpus)
    result = out / f"speed-{threads}.json"
    cmd = [sys.executable, __file__, "speed", "--plan", str(plan), "--threads", str(threads),
           "--repeats", str(repeats), "--result", str(result)]
    subprocess.run(cmd, check=True, preexec_fn=lambda: os.sched_setaffinity(0, pinned))
    return json.loads(result.read_text())


# ---- report ---------------------------------------------------------------------------------

def markdown(header: list[str], rows: list[dict], speeds: list[dict]) -> str:
    lines = [f"- {h}" for h in header] + [""]
    lines += ["## Accuracy (against the float model in fp32 on ORT's CPU provider)", "",
              "| model | method | runtime | metric |", "|---|---|---|---|"]
    for row in rows:
        acc = row.get("accuracy")
        if not acc:
            continue
        metric = (f"ppl {acc['perplexity']:.3f}" if "perplexity" in acc
                  else f"cos mean {acc['cosine_mean']:.5f} / min {acc['cosine_min']:.5f}")
        lines.append(f"| {row['model']} | {row['name']} | {row.get('provider', 'cpu')} | {metric} |")
    for speed in speeds:
        lines += ["", f"## Speed, {speed['threads']} threads on cores {speed['cpus']} ({speed['load']})", "",
                  "| model | runtime | shape | median ms | IQR ms | vs ORT CPU float | vs best float |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for r in speed["rows"]:
            via = "" if r["via"] in ("", "onnxruntime") else f" via {r['via']}"
            lines.append(f"| {r['label']} | {r['provider']} {r['precision']}{via} | {r['shape']} | "
                         f"{r['median_ms']:.1f} | {r['q1_ms']:.1f}-{r['q3_ms']:.1f} | {r['vs_cpu_float']:.2f}x | "
                         f"{r['vs_best_float']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("speed", help="(internal) one pinned speed run")
    child.add_argument("--plan", type=Path, required=True)
    child.add_argument("--threads", type=int, required=True)
    child.add_argument("--repeats", type=int, default=9)
    child.add_argument("--result", type=Path, required=True)
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--threads", default="2", help="comma-separated thread counts, each pinned to that many cores")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("build/bench-openvino"))
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--nncf-minilm", type=Path, help="NNCF's MiniLM output (tools/nncf_baseline.py)")
    parser.add_argument("--nncf-smollm2", type=Path, help="NNCF's SmolLM2 output (tools/nncf_baseline.py)")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="reuse OUT/models.json from an earlier run")
    args = parser.parse_args(argv)
    if args.command == "speed":
        speed_child(args.plan, args.threads, args.repeats, args.result)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    header = run_header()
    threads = [int(t) for t in args.threads.split(",")]
    plan = args.out / "models.json"
    if args.reuse and plan.exists():
        rows = json.loads(plan.read_text())
    else:
        rows = []
        nncf = {"minilm": args.nncf_minilm, "smollm2": args.nncf_smollm2}
        for model in args.models.split(","):
            rows += build_models(model, args.out, args.shared, threads[0], nncf.get(model))
        if not args.skip_accuracy:
            accuracy(rows, args.shared, threads[0])
        plan.write_text(json.dumps(rows, indent=2))
    speeds = [run_speed(plan, n, args.repeats, args.out) for n in threads]
    text = markdown(header + [load_line("at end")], rows, speeds)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps({"header": header, "models": rows, "speed": speeds},
                                                      indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
