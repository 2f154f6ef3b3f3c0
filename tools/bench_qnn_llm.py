"""Issue 13's decoder numbers on the Hexagon NPU (qnn-htp): SmolLM2-135M and the two Llama
fixtures at W8A16 and W4A16, on the HTP simulator that the onnxruntime-qnn wheel ships for
x86-64 Linux (CPU fallback disabled), with ONNX Runtime's CPU provider running the same QDQ
model as a second column.

    python tools/bench_qnn_llm.py --models smollm2 --weights int8 --htp-windows 8 --cpu-windows 32 --out OUT
    python tools/bench_qnn_llm.py --models smollm2 --weights int8 --compiled OUT/models/smollm2.int8.qnn-htp.onnx ...
    python tools/bench_qnn_llm.py --models llama_tiny_torchscript,llama_tiny_dynamo --weights int8,int4 --out OUT

SmolLM2: prefill at 1 x 256 (the standard windows, each alone, as the other SmolLM2 numbers),
compiled by `edgeq.compile(model, "qnn-htp", weights=...)` with calibration on --calibration
windows from window 1000 (two held out for the compile's own check), then the placement check
on the HTP (every node on QNNExecutionProvider, every quantized op in a QDQ node unit); then
perplexity per window: float (CPU), the QDQ model on the CPU provider (first --cpu-windows),
the QDQ model on the HTP (first --htp-windows; ~2 min a window on 2 loaded cores). OUT/results.json
is rewritten after every HTP window, so a stopped run keeps what it measured.

Llama fixtures (shared/fixtures/exports, random weights, vocabulary 1,000: perplexity means
nothing on them): compiled at 1 x 48 with 8 random-token calibration samples (the tests'
seed-0 samples), scored on the fixture's own input (llama_tiny_io.npz) and 3 more random
samples: logits cosine per position and relative L2 error against float, top-1 agreement, on
the HTP and on the CPU provider.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_SHARED, load_line, run_header

SMOLLM2_SEQ = 256
LLAMA_SEQ = 48


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def placement_text(path: Path, execution) -> str:
    from edgeq.runtime.placement import check_placement

    try:
        placement = check_placement(path, execution)
    except Exception as err:  # noqa: BLE001 - the row says what failed
        return one_line(err)
    return (f"{sum(placement.nodes_by_provider.values())} nodes, all on {', '.join(placement.nodes_by_provider)}; "
            f"{placement.check.split('; ')[-1]}" if not placement.unfused else f"left: {', '.join(placement.unfused)}")


def compile_model(source: Path, weights: str, shape_args, calibration, execution, out: Path,
                  group: int | None = None, rotate: bool | None = None) -> tuple[Path, dict]:
    import edgeq
    from edgeq.options import CompileOptions

    start = time.perf_counter()
    group = group if weights == "int4" else None
    compiled = edgeq.compile(source, "qnn-htp", CompileOptions(verify=False, weights=weights, group=group,
                                                               input_shapes=shape_args, rotate=rotate),
                             calibration=calibration, device=execution.device)
    info = {"compile_s": round(time.perf_counter() - start, 1), "scheme": compiled.report.scheme}
    return compiled.save(out), info


ROTATE = {"auto": None, "yes": True, "no": False}


def write(out: Path, header: list[str], rows: list[dict]) -> None:
    (out / "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))


def smollm2(args, execution, header, rows) -> None:
    from edgeq.models import catalog
    from edgeq.models.evaluation import (
        next_token_nll,
        smollm2_calibration_feeds,
        smollm2_eval_windows,
    )

    from edgeq.runtime.sessions import make_session

    source = catalog.cached("smollm2")
    windows = smollm2_eval_windows(args.shared)
    count = max(args.cpu_windows, args.htp_windows)
    feeds = [{"input_ids": w[None, :], "attention_mask": np.ones((1, w.size), np.int64)} for w in windows[:count]]
    float_session = make_session(source)
    float_nll = [next_token_nll(float_session.run(None, f)[0][0], w) for f, w in zip(feeds, windows)]
    del float_session
    for weights in args.weights:
        label = f"{weights} g{args.group}" if weights == "int4" and args.group else weights
        row: dict = {"model": "SmolLM2-135M prefill 1x256", "weights": label, "float_nll": float_nll}
        rows.append(row)
        try:
            if args.compiled:
                path = args.compiled
            else:
                print(f"[{time.strftime('%H:%M:%S')}] SmolLM2 {weights}: compiling", flush=True)
                path, info = compile_model(source, weights, (("input_ids", (1, SMOLLM2_SEQ)),),
                                           smollm2_calibration_feeds(args.shared, args.calibration), execution,
                                           args.out / "models" / f"smollm2.{weights}.qnn-htp.onnx", args.group,
                                           ROTATE[args.rotate])
                row.update(info)
            row["compiled"] = str(path)
            row["placement"] = placement_text(path, execution)
            write(args.out, header, rows)
            print(f"[{time.strftime('%H:%M:%S')}] {json.dumps({k: v for k, v in row.items() if k != 'float_nll'})}",
                  flush=True)
            cpu = make_session(path)
            row["cpu_nll"] = [next_token_nll(cpu.run(None, f)[0][0], w)
                              for f, w in zip(feeds[:args.cpu_windows], windows)]
            del cpu
            write(args.out, header, rows)
            print(f"[{time.strftime('%H:%M:%S')}] CPU provider: {summary(row, 'cpu_nll')}", flush=True)
            if args.htp_windows:
                start = time.perf_counter()
                htp = make_session(path, execution=execution)
                row["htp_load_s"] = round(time.perf_counter() - start, 1)
                row["htp_nll"], row["htp_s_per_window"] = [], []
                for f, w in zip(feeds[:args.htp_windows], windows):
                    start = time.perf_counter()
                    row["htp_nll"].append(next_token_nll(htp.run(None, f)[0][0], w))
                    row["htp_s_per_window"].append(round(time.perf_counter() - start, 1))
                    write(args.out, header, rows)
                    print(f"[{time.strftime('%H:%M:%S')}] HTP: {summary(row, 'htp_nll')}", flush=True)
        except Exception as err:  # noqa: BLE001 - the row says what failed
            row["error"] = one_line(err)
            write(args.out, header, rows)


def summary(row: dict, key: str) -> str:
    nll = row.get(key) or []
    if not nll:
        return "-"
    ppl = float(np.exp(np.mean(nll)))
    ref = float(np.exp(np.mean(row["float_nll"][:len(nll)])))
    return f"{ppl:.3f} (float {ref:.3f}, {100 * (ppl / ref - 1):+.2f}%, windows 0-{len(nll) - 1})"


def llama_samples(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, 1000, (1, LLAMA_SEQ)).astype(np.int64),
             "attention_mask": np.ones((1, LLAMA_SEQ), np.int64)} for _ in range(count)]


def logit_scores(reference: list[np.ndarray], got: list[np.ndarray]) -> dict:
    ref = np.concatenate([r.reshape(-1, r.shape[-1]) for r in reference]).astype(np.float64)
    out = np.concatenate([g.reshape(-1, g.shape[-1]) for g in got]).astype(np.float64)
    cos = np.sum(ref * out, -1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(out, axis=-1) + 1e-30)
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "rel_l2": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
            "top1": float(np.mean(ref.argmax(-1) == out.argmax(-1))), "positions": int(ref.shape[0])}


def llama(args, name: str, execution, header, rows) -> None:
    from edgeq.runtime.sessions import make_session

    source = args.shared / f"fixtures/exports/{name}.onnx"
    io = np.load(args.shared / "fixtures/exports/llama_tiny_io.npz")
    feeds = [{"input_ids": io["input_ids"].astype(np.int64),
              "attention_mask": np.ones(io["input_ids"].shape, np.int64)}] + llama_samples(3, seed=1)
    reference_session = make_session(source)
    reference = [reference_session.run(None, f)[0] for f in feeds]
    for weights in args.weights:
        row: dict = {"model": name, "weights": f"{weights} g{args.group}" if weights == "int4" and args.group else weights}
        rows.append(row)
        try:
            path, info = compile_model(source, weights, (("input_ids", (1, LLAMA_SEQ)),), llama_samples(8, seed=0),
                                       execution, args.out / "models" / f"{name}.{weights}.qnn-htp.onnx", args.group)
            row.update(info)
            row["placement"] = placement_text(path, execution)
            row["cpu"] = logit_scores(reference, [make_session(path).run(None, f)[0] for f in feeds])
            start = time.perf_counter()
            htp = make_session(path, execution=execution)
            row["htp_load_s"] = round(time.perf_counter() - start, 1)
            row["htp"] = logit_scores(reference, [htp.run(None, f)[0] for f in feeds])
        except Exception as err:  # noqa: BLE001
            row["error"] = one_line(err)
        write(args.out, header, rows)
        print(f"[{time.strftime('%H:%M:%S')}] {json.dumps(row)}", flush=True)


def markdown(rows: list[dict], header: list[str], execution) -> str:
    lines = [*(f"- {h}" for h in header), "",
             (f"HTP simulator, device {execution.device} (htp_arch {dict(execution.provider_options).get('htp_arch')}), "
              "CPU fallback disabled"), ""]
    llm = [r for r in rows if "float_nll" in r]
    if llm:
        lines += [("| model | weights | compile (s) | placement | perplexity on the HTP | same QDQ model on ORT's CPU "
                   "provider | s / window on the simulator | error |"), "|---|---|---|---|---|---|---|---|"]
        for r in llm:
            per = f"{np.median(r['htp_s_per_window']):.1f}" if r.get("htp_s_per_window") else "-"
            lines.append(f"| {r['model']} | {r['weights']} | {r.get('compile_s', '-')} | {r.get('placement', '-')} | "
                         f"{summary(r, 'htp_nll')} | {summary(r, 'cpu_nll')} | {per} | {r.get('error', '')} |")
        for r in llm:
            if r.get("cpu_nll") or r.get("htp_nll"):
                lines += ["", f"{r['model']} {r['weights']} per window (perplexity):", "",
                          "| window | float | HTP | CPU provider |", "|---:|---:|---:|---:|"]
                for i, f in enumerate(r["float_nll"]):
                    h = r.get("htp_nll") or []
                    c = r.get("cpu_nll") or []
                    if i >= max(len(h), len(c)):
                        break
                    lines.append(f"| {i} | {np.exp(f):.3f} | {np.exp(h[i]):.3f} | " if i < len(h) else
                                 f"| {i} | {np.exp(f):.3f} | - | ")
                    lines[-1] += f"{np.exp(c[i]):.3f} |" if i < len(c) else "- |"
    fixtures = [r for r in rows if "float_nll" not in r]
    if fixtures:
        lines += ["", ("| fixture | weights | compile (s) | placement | HTP: logits cosine mean / min, rel. L2, top-1 "
                       "| CPU provider: same | error |"), "|---|---|---|---|---|---|---|"]
        for r in fixtures:
            cells = []
            for key in ("htp", "cpu"):
                s = r.get(key)
                cells.append(f"{s['cos_mean']:.5f} / {s['cos_min']:.5f}, {s['rel_l2']:.4f}, {s['top1']:.3f} "
                             f"({s['positions']} positions)" if s else "-")
            lines.append(f"| {r['model']} | {r['weights']} | {r.get('compile_s', '-')} | {r.get('placement', '-')} | "
                         f"{cells[0]} | {cells[1]} | {r.get('error', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,llama_tiny_torchscript,llama_tiny_dynamo",
                        help="comma list of: smollm2, llama_tiny_torchscript, llama_tiny_dynamo")
    parser.add_argument("--weights", default="int8,int4", type=lambda s: [w for w in s.split(",") if w],
                        help="comma list of int8 (W8A16), int4 (W4A16)")
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--group", type=int, help="int4 block size along K (32, 64, 128); default per channel")
    parser.add_argument("--calibration", type=int, default=16, help="SmolLM2 calibration windows (from window 1000)")
    parser.add_argument("--cpu-windows", type=int, default=32, help="SmolLM2 windows scored on the CPU provider")
    parser.add_argument("--htp-windows", type=int, default=4, help="SmolLM2 windows scored on the HTP simulator")
    parser.add_argument("--compiled", type=Path, help="score this qnn-htp SmolLM2 model instead of compiling")
    parser.add_argument("--device", default="v73", help="qnn-htp device (v73: htp_arch 73)")
    parser.add_argument("--rotate", choices=sorted(ROTATE), default="auto",
                        help="Hadamard rotation: the target's choice (int4 rotates), or forced on/off")
    parser.add_argument("--out", type=Path, default=Path("build/bench-qnn-llm"))
    args = parser.parse_args()

    from edgeq.registry import get_target
    from edgeq.runtime.providers import for_device

    execution = for_device(get_target("qnn-htp").executions[0], args.device)
    header = run_header()
    (args.out / "models").mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for name in (n for n in args.models.split(",") if n):
        if name == "smollm2":
            smollm2(args, execution, header, rows)
        else:
            llama(args, name, execution, header, rows)
    header.append(load_line("at end"))
    write(args.out, header, rows)
    text = markdown(rows, header, execution)
    (args.out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
