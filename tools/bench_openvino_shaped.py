"""Speed of issue 12's rows on a machine without the real models or a network (the lent Xeon):
random-weight models of MiniLM's and SmolLM2's shapes (speed does not depend on the weight
values; accuracy comes from tools/bench_openvino.py on the real models), compiled here for the
host's x86 target on OpenVINO and on ONNX Runtime's CPU provider, ORT's quantize_dynamic, and
`edgeq.runtime.benchmark.bench` in a child pinned to the first N cores per thread count.

    python tools/bench_openvino_shaped.py --threads 2,16 --out OUT [--models minilm,smollm2]

Writes OUT/shaped.md (tables, machine line) and OUT/shaped.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load_line, run_header  # noqa: E402

SHAPES = {"minilm": {"input_ids": [16, 128], "attention_mask": [16, 128], "token_type_ids": [16, 128]},
          "smollm2": {"input_ids": [1, 256], "attention_mask": [1, 256]}}


def host_target() -> str:
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return "x86-amx" if "amx_int8" in flags else "x86-vnni"


def float_model(name: str, path: Path) -> None:
    import onnx

    from edgeq.models import synthetic
    from edgeq.models.bert import BertConfig
    from edgeq.models.llama import LlamaConfig

    if name == "minilm":
        config = BertConfig(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                            max_positions=512)
        onnx.save(synthetic.bert(0, config, outlier_channels=0, weight_outliers=0), str(path))
    else:  # SmolLM2-135M's shape; the embedding is written twice (tied in the real model)
        config = LlamaConfig(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                             intermediate_size=1536)
        onnx.save(synthetic.llama(0, config, outlier_channels=0, weight_outliers=0), str(path),
                  save_as_external_data=True, location=path.name + ".data")


def feeds(name: str, count: int) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(1)
    batch, seq = (1, 128) if name == "minilm" else (1, 256)
    vocab = 30522 if name == "minilm" else 49152
    out = []
    for _ in range(count):
        ids = rng.integers(0, vocab, (batch, seq)).astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if name == "minilm":
            feed["token_type_ids"] = np.zeros_like(ids)
        out.append(feed)
    return out


def build(name: str, out: Path, target: str) -> list[Path]:
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    from edgeq.compiler import compile as edgeq_compile
    from edgeq.options import CompileOptions
    from edgeq.runtime.providers import availability
    from edgeq.registry import get_target

    base = out / f"{name}.float.onnx"
    float_model(name, base)
    options = CompileOptions(rotate=True) if name == "smollm2" else CompileOptions()
    calibration = feeds(name, 18 if name == "smollm2" else 16)
    paths = [base]
    for execution in get_target(target).executions:
        if not availability(execution).runs:
            print(f"{name}: {execution.name} cannot run here ({availability(execution).reason})", flush=True)
            continue
        path = out / f"{name}.{target}.{execution.name}.onnx"
        compiled = edgeq_compile(base, target, options, calibration=calibration, provider=execution.name)
        compiled.save(path)
        print(f"{name}: compiled for {target} on {execution.name}", flush=True)
        paths.append(path)
    pre = out / f"{name}.pre.onnx"
    quant_pre_process(str(base), str(pre), skip_symbolic_shape=True)
    dynamic = out / f"{name}.dynamic.onnx"
    quantize_dynamic(str(pre), str(dynamic), per_channel=True, weight_type=QuantType.QInt8)
    paths.append(dynamic)
    return paths


def measure(paths: list[Path], name: str, threads: int, repeats: int, target: str) -> dict:
    """One bench in a child pinned to cores 0..threads-1 (as `taskset`)."""
    code = ("import json, sys; from edgeq.runtime.benchmark import bench; from edgeq.registry import get_target;"
            f"r = bench({[str(p) for p in paths]!r}, get_target({target!r}), threads={threads}, "
            f"shapes={SHAPES[name]!r}, repeats={repeats}, progress=False); print('RESULT' + json.dumps(r.to_dict()))")
    cmd = ["taskset", "-c", f"0-{threads - 1}", sys.executable, "-c", code]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"bench failed:\n{proc.stderr[-4000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def table(result: dict) -> str:
    lines = ["| model | runtime | precision | median ms | IQR ms | vs ORT CPU float | vs fastest float |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        vs_cpu, vs_best = r.get("vs_cpu_float"), r.get("vs_best_float")
        lines.append(f"| {r['label']} | {r['execution']} ({r['via'] or r['provider']}) | {r['precision']} | "
                     f"{r['median_ms']:.1f} | {r['q3_ms'] - r['q1_ms']:.1f} | "
                     f"{vs_cpu:.2f}x | {vs_best:.2f}x |" if vs_cpu and vs_best else
                     f"| {r['label']} | {r['execution']} | {r['precision']} | not measured | | | |")
    lines.append(f"\nbaseline (fastest float): {result.get('baseline')}; notes: {'; '.join(result.get('notes', []))}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="2,16")
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.pop("EDGEQ_PROVIDER", None)
    target = host_target()
    header = run_header()
    text, data = [*header, f"target: {target}", ""], {"header": header, "target": target, "runs": []}
    for name in args.models.split(","):
        paths = build(name, args.out, target)
        for threads in (int(t) for t in args.threads.split(",")):
            result = measure(paths, name, threads, args.repeats, target)
            data["runs"].append({"model": name, "threads": threads, "result": result})
            text += [f"### {name}-shaped, {threads} threads, shapes {SHAPES[name]}", "", table(result), ""]
            print("\n".join(text[-4:]), flush=True)
    text.append(load_line("at end"))
    (args.out / "shaped.md").write_text("\n".join(text) + "\n")
    (args.out / "shaped.json").write_text(json.dumps(data, indent=2, default=str))
    print("\n".join(text))


if __name__ == "__main__":
    main()
