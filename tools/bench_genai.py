"""SmolLM2 with a KV cache in a generation loop: edgeq's W4A16 package in onnxruntime-genai against
the genai builder's own int4 and fp32 outputs, and the KV cache quantized to int8/int4 (issue 15).

    python tools/bench_genai.py --compiled W4A16_KV.onnx --builder-int4 DIR --builder-fp32 DIR --out OUT

`--compiled`: `edgeq compile smollm2-kv.onnx -t x86-vnni --weights int4 --group 128 --activations float
--calib-text ... --samples 18` (the README's W4A16 preset on the cache graph; calibration windows give
prefill and decode steps), or its decode-speed layout (`--head-weights int4 --no-online-rotations
--weight-group 'o_proj|down_proj|gate_proj|up_proj|lm_head=32:asym'`). The builder folders: `python -m onnxruntime_genai.models.builder -i HF -o DIR
-p int4|fp32 -e cpu` on the same GGUF weights saved as a Hugging Face folder. Parts (`--parts`):

- package: `edgeq package COMPILED -o OUT/genai --genai --tokenizer ...` (the CLI, a child process); the
  folder loads in onnxruntime_genai, its tokenizer round-trips a sentence;
- greedy: 32 tokens after a 64-token prompt (window 0 of the evaluation ids) from the package in
  onnxruntime-genai, against the argmax chain of the same compiled model run on the full sequence
  each step (no cache) and against the float model's;
- ppl: the standard protocol (windows 0..31 of 256 tokens, each alone) on the compiled cache model
  (empty cache), the float one and the builder outputs given;
- speed: 128 new tokens after a 64-token prompt at batch 1, `--threads` threads, through
  onnxruntime-genai for the edgeq package and both builder outputs, interleaved, median of
  `--repeats`; prefill and decode tokens/s, the weight bytes each decode step reads (model files)
  and the cache bytes per token (the packages take turns within each repeat, the order rotated);
- kv: the float cache model with its cache quantized by the `quantize-kv-cache` pass (int8 and int4;
  values per token, and per channel as onnxruntime-genai can carry them; `-rotated`: keys and values
  multiplied by a head-dim Hadamard before they are quantized, and back after; `-centered`: static
  scales span each channel's calibrated [min, max] around its midpoint; `int4-token...`: keys per
  token too, `-asym` with an offset per token, `-gN` one scale per N channels of the head dim),
  static scales calibrated on windows 1000.. (prefill + decode steps); perplexity over the
  standard 32 windows, and by teacher-forced decode through the cache (the first `--kv-windows`
  windows: a prefill of 1 token, then one token a step). The cache is quantized as each token is
  written, so both compute the same thing (the tests check it at 2e-4 on the logits of a small
  decoder); on SmolLM2 at int4 the float noise between a 1-token and a 256-token run flips a
  rounding now and then (one code step, 1/7 of a token's range at int4) and the two drift apart
  by a few percent on one window. The full-window run covers all 32 windows. Cache bytes per
  token from the present outputs.
- arm: `--arm-compiled` (an `--target arm-dotprod` compile of the cache graph) packaged with
  `--genai`; its model.onnx decodes `--arm-tokens` greedy tokens on the aarch64 ONNX Runtime under
  QEMU (`--arm-cpu`, tools/aarch64_ort.py, set up) and on the host; the tokens are compared.

The speed part also reports the weight bytes each decode step reads (`decode_weight_bytes`: every
initializer but tables only gathered from, such as an int8 embedding).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kv_decode as kd
from _common import DEFAULT_SHARED, load_line, run_header

PROMPT_TOKENS = 64
NEW_TOKENS = 128
GREEDY_TOKENS = 32
# label -> the quantize-kv-cache pass's options: bits, value scales ("token"/"channel"), `rotate`
# (a head-dim Hadamard on the cached keys/values), `centered` (static scales around each channel's
# calibrated midpoint).
KV_VARIANTS = {
    "int8": {"bits": 8, "values": "token"}, "int4": {"bits": 4, "values": "token"},
    "int8-channel": {"bits": 8, "values": "channel"}, "int4-channel": {"bits": 4, "values": "channel"},
    "int8-centered": {"bits": 8, "values": "token", "centered": True},
    "int4-centered": {"bits": 4, "values": "token", "centered": True},
    "int4-rotated": {"bits": 4, "values": "token", "rotate": True},
    "int4-rotated-centered": {"bits": 4, "values": "token", "rotate": True, "centered": True},
    "int4-channel-centered": {"bits": 4, "values": "channel", "centered": True},
    # keys per token too (QuaRot: rotated keys quantize well per token); `asym`: a scale and an
    # offset per token; `gN`: one per N channels of the head dim
    "int4-token": {"bits": 4, "values": "token", "keys": "token"},
    "int4-token-rotated": {"bits": 4, "values": "token", "keys": "token", "rotate": True},
    "int4-token-asym": {"bits": 4, "values": "token", "keys": "token", "asymmetric": True},
    "int4-token-asym-rotated": {"bits": 4, "values": "token", "keys": "token", "asymmetric": True, "rotate": True},
    "int4-token-asym-g32": {"bits": 4, "values": "token", "keys": "token", "asymmetric": True, "group": 32},
    "int4-token-asym-rotated-g32": {"bits": 4, "values": "token", "keys": "token", "asymmetric": True,
                                    "rotate": True, "group": 32},
    "int4-token-asym-rotated-g16": {"bits": 4, "values": "token", "keys": "token", "asymmetric": True,
                                    "rotate": True, "group": 16},
    "int8-token-asym-rotated": {"bits": 8, "values": "token", "keys": "token", "asymmetric": True, "rotate": True},
}


def _session(path: Path, threads: int):
    from edgeq.runtime.sessions import make_session

    return make_session(str(path), threads)


def _ids(shared: Path) -> np.ndarray:
    return np.load(shared / "reference/wikitext2_test_smollm2_ids.npy").astype(np.int64)


def _windows(ids: np.ndarray, first: int, count: int, length: int = 256) -> np.ndarray:
    return ids[first * length:(first + count) * length].reshape(count, length)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data"))


def part_package(args, out: dict) -> Path:
    folder = args.out / "genai"
    cmd = [sys.executable, "-m", "edgeq.cli", "package", str(args.compiled), "-o", str(folder), "--genai",
           "--tokenizer", str(args.shared / "reference/smollm2_tokenizer.json"), "--overwrite", "--json"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out["package"] = {"command": " ".join(["edgeq", *cmd[3:-1]]), "seconds": round(time.perf_counter() - t0, 1),
                      **json.loads(done.stdout)}
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    text = "The Roman Empire was the post-Republican state of ancient Rome."
    out["package"]["loads"] = True
    out["package"]["tokenizer_round_trip"] = tokenizer.decode(tokenizer.encode(text)) == text
    return folder


def part_greedy(args, out: dict, folder: Path) -> None:
    prompt = _ids(args.shared)[:PROMPT_TOKENS]
    genai = kd.genai_greedy(kd.genai_model(folder, args.threads), prompt, GREEDY_TOKENS).tokens[:GREEDY_TOKENS]
    compiled_full = kd.full_sequence_greedy(_session(args.compiled, args.threads), prompt, GREEDY_TOKENS)
    float_full = kd.full_sequence_greedy(_session(args.float_model, args.threads), prompt, GREEDY_TOKENS)
    agree = lambda a, b: sum(x == y for x, y in zip(a, b))
    first_diff = lambda a, b: next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    out["greedy"] = {"prompt_tokens": PROMPT_TOKENS, "tokens": GREEDY_TOKENS, "genai": genai,
                     "compiled_full_sequence": compiled_full, "float_full_sequence": float_full,
                     "genai_vs_compiled_full_agree": agree(genai, compiled_full),
                     "genai_vs_float_agree": agree(genai, float_full),
                     "genai_vs_float_first_difference": first_diff(genai, float_full)}


def part_ppl(args, out: dict) -> None:
    windows = _windows(_ids(args.shared), 0, args.ppl_windows)
    rows = {}
    for name, path in (("float", args.float_model), ("compiled", args.compiled)):
        if name not in args.ppl_rows:
            continue
        t0 = time.perf_counter()
        nll = kd.full_window_nll(_session(path, args.threads), windows)
        rows[name] = {"perplexity": round(float(np.exp(nll.mean())), 3), "seconds": round(time.perf_counter() - t0, 1)}
    for name, folder in (("builder int4", args.builder_int4), ("builder fp32", args.builder_fp32)):
        if folder is None or name not in args.ppl_rows:
            continue
        import onnx

        from edgeq.calibration.kv_cache import head_size_of

        path = Path(folder) / "model.onnx"
        head_size = head_size_of(onnx.load(path, load_external_data=False))
        t0 = time.perf_counter()
        nll = kd.full_window_nll(_session(path, args.threads), windows, head_size)
        rows[name] = {"perplexity": round(float(np.exp(nll.mean())), 3), "seconds": round(time.perf_counter() - t0, 1)}
    for name, row in rows.items():
        if name != "float" and "float" in rows:
            row["vs_float"] = round(row["perplexity"] / rows["float"]["perplexity"] - 1, 4)
    out["ppl"] = {"windows": args.ppl_windows, **rows}


def part_speed(args, out: dict, folder: Path) -> None:
    prompt = _ids(args.shared)[:PROMPT_TOKENS]
    candidates = {"edgeq W4A16 package": folder, "builder int4": args.builder_int4, "builder fp32": args.builder_fp32}
    candidates = {k: v for k, v in candidates.items() if v is not None}
    models = {name: kd.genai_model(path, args.threads) for name, path in candidates.items()}
    runs: dict[str, list] = {name: [] for name in models}
    for name, model in models.items():  # warm-up
        kd.genai_greedy(model, prompt, 8, force_length=True)
    names = list(models)
    for repeat in range(args.repeats):  # interleaved, the order rotated each repeat (no seat favoured)
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            runs[name].append(kd.genai_greedy(models[name], prompt, NEW_TOKENS, force_length=True))
    rows = {}
    for name, speeds in runs.items():
        rows[name] = {"prefill_tokens_per_s": round(statistics.median(s.prefill_tps for s in speeds), 1),
                      "decode_tokens_per_s": round(statistics.median(s.decode_tps for s in speeds), 2),
                      "weight_bytes": _folder_bytes(Path(candidates[name])),
                      "decode_weight_bytes": kd.decode_weight_bytes(Path(candidates[name]) / "model.onnx"),
                      "runs": [s.row() for s in speeds]}
    if "builder int4" in runs:  # interleaved: repeat i of each ran in the same round
        out_ratio = [round(a.decode_tps / b.decode_tps, 3) for a, b in zip(runs["edgeq W4A16 package"], runs["builder int4"])]
        rows["edgeq W4A16 package"]["decode_vs_builder_int4_per_repeat"] = out_ratio
        rows["edgeq W4A16 package"]["decode_vs_builder_int4_median"] = statistics.median(out_ratio)
    compiled = _session(args.compiled, 1)
    rows["edgeq W4A16 package"]["cache_bytes_per_token"] = kd.cache_bytes_per_token(compiled)
    out["speed"] = {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "threads": args.threads,
                    "repeats": args.repeats, "rows": rows, "load": load_line("after speed")}


def part_kv(args, out: dict) -> None:
    from edgeq.calibration.sources import TokenWindows, open_source
    from edgeq.ir import load, save
    from edgeq.pipeline import PassContext, PassManager
    from edgeq.pipeline.artifacts import CALIBRATION_DATA
    from edgeq.registry import get_pass, get_target

    ids = _ids(args.shared)
    windows = _windows(ids, 0, 32)
    decoded = windows[:args.kv_windows]
    calibration = TokenWindows(ids, 256, args.kv_calib_windows, first_window=1000)
    rows = {}

    def measure(label: str, session) -> dict:
        t0 = time.perf_counter()
        full = kd.full_window_nll(session, windows)
        forced = kd.teacher_forced_nll(session, decoded)
        row = {"perplexity": round(float(np.exp(full.mean())), 3),
               "teacher_forced_perplexity": round(float(np.exp(forced.mean())), 3),
               "same_windows_full_perplexity": round(float(np.exp(full[:len(decoded)].mean())), 3),
               "cache_bytes_per_token": kd.cache_bytes_per_token(session),
               "seconds": round(time.perf_counter() - t0, 1)}
        print(label, row, flush=True)
        return row

    rows["float cache"] = measure("float cache", _session(args.float_model, args.threads))
    for label, options in KV_VARIANTS.items():
        if label not in args.kv_variants:
            continue
        graph = load(args.float_model)
        ctx = PassContext(target=get_target("x86-vnni"))
        ctx.artifacts[CALIBRATION_DATA] = open_source(calibration, str(args.float_model))
        graph = PassManager([get_pass("quantize-kv-cache")(threads=args.threads, **options)])(graph, ctx).graph
        path = args.out / f"kv-{label}.onnx"
        save(graph, path)
        rows[label] = measure(label, _session(path, args.threads))
        base = rows["float cache"]
        rows[label]["vs_float_cache"] = round(rows[label]["perplexity"] / base["perplexity"] - 1, 4)
        rows[label]["teacher_forced_vs_float_cache"] = round(
            rows[label]["teacher_forced_perplexity"] / base["teacher_forced_perplexity"] - 1, 4)
        rows[label]["bytes_ratio"] = round(base["cache_bytes_per_token"] / rows[label]["cache_bytes_per_token"], 2)
    out["kv"] = {"windows": 32, "teacher_forced_windows": args.kv_windows,
                 "calibration_windows": args.kv_calib_windows, "rows": rows}


def part_arm(args, out: dict) -> None:
    """The ARM compile's package: its model.onnx decodes greedily on the aarch64 ONNX Runtime under
    QEMU (tools/aarch64_ort.py) and on the host's x86 ONNX Runtime; the tokens are compared, and with
    the compiled model's full-sequence argmax chain."""
    folder = args.out / "genai-arm"
    cmd = [sys.executable, "-m", "edgeq.cli", "package", str(args.arm_compiled), "-o", str(folder), "--genai",
           "--tokenizer", str(args.shared / "reference/smollm2_tokenizer.json"), "--overwrite", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    prompt = _ids(args.shared)[:PROMPT_TOKENS]
    host = kd.ort_greedy(_session(folder / "model.onnx", args.threads), prompt, args.arm_tokens).tokens
    full = kd.full_sequence_greedy(_session(args.arm_compiled, args.threads), prompt, args.arm_tokens)
    t0 = time.perf_counter()
    emulated = kd.emulated_greedy(folder / "model.onnx", prompt, args.arm_tokens, args.arm_cpu)
    agree = lambda a, b: sum(x == y for x, y in zip(a, b))
    out["arm"] = {"compiled": str(args.arm_compiled), "package": json.loads(done.stdout), "cpu": args.arm_cpu,
                  "tokens": args.arm_tokens, "emulated": emulated, "emulated_seconds": round(time.perf_counter() - t0, 1),
                  "host_x86": host, "compiled_full_sequence": full,
                  "emulated_vs_host_agree": agree(emulated["tokens"], host),
                  "emulated_vs_full_sequence_agree": agree(emulated["tokens"], full)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compiled", type=Path, help="edgeq's W4A16 compile of smollm2-kv.onnx")
    parser.add_argument("--float-model", type=Path, help="smollm2-kv.onnx (default: the edgeq cache's build)")
    parser.add_argument("--builder-int4", type=Path)
    parser.add_argument("--builder-fp32", type=Path)
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-windows", type=int, default=4, help="windows also decoded token by token")
    parser.add_argument("--kv-calib-windows", type=int, default=16)
    parser.add_argument("--kv-variants", default="int8,int4,int8-channel,int4-channel,int4-centered",
                        help="labels: " + ", ".join(KV_VARIANTS))
    parser.add_argument("--arm-compiled", type=Path, help="an `--target arm-dotprod` compile of smollm2-kv.onnx")
    parser.add_argument("--arm-cpu", default="cortex-a76", help="QEMU -cpu for the arm part")
    parser.add_argument("--arm-tokens", type=int, default=GREEDY_TOKENS)
    parser.add_argument("--ppl-windows", type=int, default=32, help="the standard protocol's 32, or fewer")
    parser.add_argument("--ppl-rows", default="float,compiled,builder int4,builder fp32",
                        help="which models the ppl part measures (comma-separated)")
    parser.add_argument("--parts", default="package,greedy,ppl,speed,kv")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.float_model is None:
        from edgeq.models.catalog import cached

        args.float_model = cached("smollm2-kv")
    parts = args.parts.split(",")
    args.kv_variants = args.kv_variants.split(",")
    args.ppl_rows = args.ppl_rows.split(",")
    unknown = [v for v in args.kv_variants if v not in KV_VARIANTS]
    if unknown:
        parser.error(f"unknown --kv-variants {unknown}: pick from {', '.join(KV_VARIANTS)}")
    out: dict = {"header": run_header()}
    result = args.out / "bench_genai.json"
    folder = args.out / "genai"
    for part in parts:
        t0 = time.perf_counter()
        if part == "package":
            folder = part_package(args, out)
        elif part == "greedy":
            part_greedy(args, out, folder)
        elif part == "ppl":
            part_ppl(args, out)
        elif part == "speed":
            part_speed(args, out, folder)
        elif part == "kv":
            part_kv(args, out)
        elif part == "arm":
            part_arm(args, out)
        else:
            raise SystemExit(f"unknown part {part}")
        out.setdefault("part_seconds", {})[part] = round(time.perf_counter() - t0, 1)
        out["load_end"] = load_line(f"after {part}")
        result.write_text(json.dumps(out, indent=1, default=float))
        print(part, json.dumps({k: v for k, v in out.get(part, {}).items() if k != "runs"}, default=float)[:1500], flush=True)


if __name__ == "__main__":
    main()
