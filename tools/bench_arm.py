"""ARM64 targets on a real aarch64 ONNX Runtime (QEMU user-mode, tools/aarch64_ort.py), next to
the x86 run of the same compiled file, and the targets' cost models per core.

    python tools/bench_arm.py minilm [--paragraphs 8]        # W8A8 for each ARM target
    python tools/bench_arm.py smollm2 --model W4A16.onnx [--windows 2]
    python tools/bench_arm.py estimate --model W8A8.onnx [--input-shape input_ids=1,128 ...]

minilm: compiles MiniLM (catalog.cached('minilm')) W8A8 for each ARM target, calibrated on 16
WikiText paragraphs disjoint from the evaluation ones; runs the first N evaluation paragraphs
(128 tokens) under the emulated CPU of each target's kernel family and on x86 ORT (CPU
provider, 1 thread, both); prints the cosine of the aarch64 outputs to the x86 ones and the
sentence-embedding cosine of both to the float model's.

smollm2: a compiled SmolLM2 file (e.g. the README's W4A16 preset) on the first N perplexity
windows under each emulated CPU and on x86: per-window NLL, logits cosine and max |diff|.

Emulated time is printed only to show what a run costs here: QEMU translates every instruction,
it is not a speed figure. Speed comes from the cost models (`estimate`).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aarch64_ort  # noqa: E402
from _common import DEFAULT_SHARED, run_header  # noqa: E402

from edgeq.compiler import compile as edgeq_compile  # noqa: E402
from edgeq.models import catalog, evaluation  # noqa: E402
from edgeq.options import CompileOptions  # noqa: E402

FAMILY_CPU = {"arm-neon": "cortex-a53", "arm-dotprod": "cortex-a76", "arm-i8mm": "neoverse-n2"}


def x86_outputs(model: Path, samples: list[dict], names: list[str] | None = None) -> list[dict]:
    """The same file on x86 ORT, with the session options the aarch64 runner uses."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    names = names or [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, feed))) for feed in samples]


def cosine_per_row(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return evaluation.cosine_rows(a.reshape(len(a), -1), b.reshape(len(b), -1))


@click.group()
def main() -> None:
    pass


@main.command()
@click.option("--paragraphs", type=int, default=16, show_default=True)
@click.option("--targets", default="arm-neon,arm-dotprod,arm-i8mm", show_default=True)
@click.option("--all-cpus/--family-cpu", default=True, show_default=True,
              help="run every target's file on each emulated CPU, or on its family's only")
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path), default=DEFAULT_SHARED)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/edgeq-arm"))
def minilm(paragraphs: int, targets: str, all_cpus: bool, shared: Path, out: Path) -> None:
    """MiniLM W8A8 for each ARM target under the emulated CPUs, against x86 and float."""
    print("\n".join(run_header()))
    emulator = aarch64_ort.setup()
    print(f"aarch64: {emulator.info['qemu_version']}; onnxruntime {emulator.info['onnxruntime']} "
          f"(PyPI manylinux aarch64 wheel), numpy {emulator.info['numpy']}, Debian {emulator.info['debian']} "
          f"python {emulator.info['python_version']}")
    out.mkdir(parents=True, exist_ok=True)
    float_path = catalog.cached("minilm")
    calibration = evaluation.minilm_calibration_feeds(shared, 16)
    inputs = evaluation.minilm_tokenize(evaluation.minilm_eval_paragraphs(shared)[:paragraphs])
    sample = [inputs]                                   # one batch of N paragraphs x 128 tokens
    mask = inputs["attention_mask"]
    (reference,) = x86_outputs(float_path, sample, ["last_hidden_state"])
    float_embeddings = evaluation.mean_pool_normalize(reference["last_hidden_state"], mask)
    rows = []
    for target in targets.split(","):
        start = time.perf_counter()
        compiled = edgeq_compile(float_path, target, CompileOptions(), calibration=calibration)
        path = out / f"minilm.{target}.onnx"
        compiled.save(path)
        print(f"\n{target}: compiled in {time.perf_counter() - start:.0f} s; "
              + "; ".join(compiled.report.summary_lines()[:3]))
        (x86,) = x86_outputs(path, sample)
        emb_x86 = evaluation.mean_pool_normalize(x86["last_hidden_state"], mask)
        x86_float = evaluation.cosine_rows(emb_x86, float_embeddings)
        first_arm = None
        for cpu in (FAMILY_CPU.values() if all_cpus else [FAMILY_CPU[target]]):
            start = time.perf_counter()
            (arm,), meta = aarch64_ort.run_samples(emulator, cpu, path, sample, timeout=3600)
            wall = time.perf_counter() - start
            hidden = arm["last_hidden_state"]
            first_arm = hidden if first_arm is None else first_arm
            token_cos = evaluation.cosine_rows(hidden[mask.astype(bool)], x86["last_hidden_state"][mask.astype(bool)])
            emb_arm = evaluation.mean_pool_normalize(hidden, mask)
            vs_x86 = evaluation.cosine_rows(emb_arm, emb_x86)
            arm_float = evaluation.cosine_rows(emb_arm, float_embeddings)
            rows.append((target, cpu, vs_x86.mean(), vs_x86.min(), token_cos.min(),
                         float(np.abs(hidden - x86["last_hidden_state"]).max()),
                         float(np.abs(hidden - first_arm).max()), arm_float.mean(), arm_float.min(),
                         x86_float.mean(), x86_float.min(), meta["run_s"]))
            print(f"  {cpu}: run {meta['run_s']:.1f} s emulated ({wall:.0f} s with start-up)", flush=True)
    print(f"\nMiniLM W8A8, first {paragraphs} WikiText evaluation paragraphs (128 tokens, one batch):\n")
    print("| target | emulated CPU | embedding cos vs x86 (mean / min) | token cos vs x86 (min) | max abs diff vs x86 "
          "| max abs diff vs the first aarch64 CPU | embedding cos vs float, aarch64 (mean / min) | same, x86 "
          "(mean / min) | emulated run s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for t, cpu, em, en, tok, diff, arm_diff, am, an, xm, xn, run_s in rows:
        print(f"| {t} | {cpu} | {em:.6f} / {en:.6f} | {tok:.5f} | {diff:.3g} | {arm_diff:.3g} | {am:.5f} / {an:.5f} "
              f"| {xm:.5f} / {xn:.5f} | {run_s:.1f} |")


@main.command()
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--windows", type=int, default=1, show_default=True)
@click.option("--cpus", default="cortex-a53,cortex-a76,neoverse-n2", show_default=True)
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path), default=DEFAULT_SHARED)
def smollm2(model: Path, windows: int, cpus: str, shared: Path) -> None:
    """A compiled SmolLM2 on the first N perplexity windows under each emulated CPU, against x86
    at MatMulNBits accuracy level 4 (ORT's default) and 1 (fp32 compute: what a CPU without the
    dot product runs, MLAS having no CompInt8 kernel for it)."""
    import onnxruntime as ort

    print("\n".join(run_header()))
    emulator = aarch64_ort.setup()
    print(f"aarch64: {emulator.info['qemu_version']}; onnxruntime {emulator.info['onnxruntime']}")
    ids = evaluation.smollm2_eval_windows(shared)[:windows]
    samples = [{"input_ids": w[None, :], "attention_mask": np.ones((1, len(w)), np.int64)} for w in ids]
    reference = {}
    for level in ("4", "1"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", level)
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        reference[level] = [session.run(["logits"], feed)[0] for feed in samples]
        nll = [evaluation.next_token_nll(lg[0], w) for lg, w in zip(reference[level], ids)]
        print(f"x86, accuracy level {level}: window NLL {', '.join(f'{v:.5f}' for v in nll)}")
    print("\n| emulated CPU | window NLL (aarch64) | logits cos vs x86 level 4 / level 1 (min over tokens) | "
          "max abs diff vs level 4 / level 1 | emulated run s |")
    print("|---|---|---:|---:|---:|")
    for cpu in cpus.split(","):
        start = time.perf_counter()
        outs, meta = aarch64_ort.run_samples(emulator, cpu, model, samples, timeout=3600)
        nll = [evaluation.next_token_nll(o["logits"][0], w) for o, w in zip(outs, ids)]
        cos = {level: min(evaluation.cosine_rows(o["logits"][0], r[0]).min() for o, r in zip(outs, ref))
               for level, ref in reference.items()}
        diff = {level: max(float(np.abs(o["logits"] - r).max()) for o, r in zip(outs, ref))
                for level, ref in reference.items()}
        print(f"| {cpu} | {', '.join(f'{v:.5f}' for v in nll)} | {cos['4']:.6f} / {cos['1']:.6f} | "
              f"{diff['4']:.3g} / {diff['1']:.3g} | {meta['run_s']:.0f} ({time.perf_counter() - start:.0f} with "
              f"start-up) |", flush=True)


@main.command()
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--input-shape", "shapes", multiple=True, help="NAME=D0,D1,...")
@click.option("--square-einsums-as-identity", is_flag=True,
              help="count a rotated model: its online Hadamards ('...a,az->...z' Einsums, which edgeq.cost "
                   "cannot count) are left out of the count (they keep the shape)")
def estimate(model: Path, shapes: tuple[str, ...], square_einsums_as_identity: bool) -> None:
    """Peak-rate cycles of one core of each type in CORE_RATES for a compiled model."""
    import onnx

    from edgeq.targets.arm import CORE_RATES, cost_model

    input_shapes = {k: [int(d) for d in v.split(",")] for k, v in (s.split("=", 1) for s in shapes)} or None
    if square_einsums_as_identity:
        proto = onnx.load(str(model), load_external_data=False)
        dropped = 0
        for node in proto.graph.node:
            equation = next((a.s.decode() for a in node.attribute if a.name == "equation"), "")
            if node.op_type == "Einsum" and equation.replace(" ", "") == "...a,az->...z":
                del node.input[1:]
                del node.attribute[:]
                node.op_type, dropped = "Identity", dropped + 1
        print(f"{dropped} online Hadamard Einsums left out of the count")
        onnx.save(proto, str(model.with_suffix(".einsum-free.onnx")))   # the weights stay external: same folder
        model = model.with_suffix(".einsum-free.onnx")
    print(f"{model.name}: cost model estimate, one core at peak issue rate")
    print("| core | family | MACs | cycles (peak) | by pair |")
    print("|---|---|---:|---:|---|")
    for core, rates in CORE_RATES.items():
        report = cost_model(core).estimate(model, input_shapes=input_shapes)
        macs = sum(v for k, v in report.counts.items() if k.startswith("op_mac_"))
        pairs = ", ".join(f"{k[7:]} {v / 1e6:.1f}M" for k, v in report.costs.items())
        print(f"| {core} | {rates['family']} | {macs / 1e9:.3f} G | {report.total / 1e6:.1f} M | {pairs} |")
    weights = {k[len("weight_bytes_"):]: v for k, v in report.counts.items() if k.startswith("weight_bytes_")}
    print("weight bytes read per inference (not priced): "
          + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in weights.items()) + f"; total {sum(weights.values()) / 1e6:.1f} MB")


def kernel_models(directory: Path) -> dict[str, tuple[Path, dict]]:
    """Small single-op models that reach each MLAS kernel family: MatMulInteger U8S8 / S8S8 / U8U8
    (64x256x96), DequantizeLinear(int4, block 32) -> MatMul (ORT fuses it into MatMulNBits) without
    and with an explicit zero point, at M = 64 (GEMM) and M = 1 (GEMV), and an fp32 MatMul."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    m, k, n = 64, 256, 96
    models: dict[str, tuple[Path, dict]] = {}

    def save(name, nodes, x, y_type, inits, feed):
        graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", x, list(feed.shape))],
                                  [helper.make_tensor_value_info("y", y_type, None)], inits)
        path = directory / (re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + ".onnx")
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
        models[name] = (path, {"x": feed})

    for a, b in (("u8", "s8"), ("s8", "s8"), ("u8", "u8")):
        kinds = {"u8": (TensorProto.UINT8, np.uint8, 0), "s8": (TensorProto.INT8, np.int8, -128)}
        (a_elem, a_np, a_lo), (_, b_np, b_lo) = kinds[a], kinds[b]
        weight = rng.integers(b_lo, b_lo + 256, (k, n)).astype(b_np)
        save(f"MatMulInteger {a.upper()}{b.upper()}", [helper.make_node("MatMulInteger", ["x", "w"], ["y"])], a_elem,
             TensorProto.INT32, [numpy_helper.from_array(weight, "w")],
             rng.integers(a_lo, a_lo + 256, (m, k)).astype(a_np))
    q = rng.integers(-8, 8, (k, n)).astype(np.int8)
    scale = (rng.random((k // 32, n)) * 0.02 + 0.01).astype(np.float32)
    for zero in (False, True):
        inits = [helper.make_tensor("wq", TensorProto.INT4, [k, n], q.flatten().tolist()),
                 numpy_helper.from_array(scale, "ws")]
        inputs = ["wq", "ws"]
        if zero:
            inits.append(helper.make_tensor("wz", TensorProto.INT4, [k // 32, n], [0] * (k // 32 * n)))
            inputs.append("wz")
        for rows in (64, 1):
            save(f"int4 g32 {'with' if zero else 'no'} zero point, M={rows}",
                 [helper.make_node("DequantizeLinear", inputs, ["wf"], axis=0, block_size=32),
                  helper.make_node("MatMul", ["x", "wf"], ["y"])], TensorProto.FLOAT, TensorProto.FLOAT, inits,
                 rng.standard_normal((rows, k)).astype(np.float32))
    save("fp32 MatMul", [helper.make_node("MatMul", ["x", "w"], ["y"])], TensorProto.FLOAT, TensorProto.FLOAT,
         [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")],
         rng.standard_normal((m, k)).astype(np.float32))
    return models


@main.command()
@click.option("--cpus", default="cortex-a53,cortex-a76,neoverse-n2,max", show_default=True)
@click.option("--model", "extra", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True,
              help="also probe this model (an LM with input_ids/attention_mask gets 16 tokens)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/edgeq-arm/kernels"))
def kernels(cpus: str, extra: tuple[Path, ...], out: Path) -> None:
    """Which kernel instructions each model's run executed on each emulated CPU, and whether its
    outputs equal the x86 run's."""
    print("\n".join(run_header()))
    emulator = aarch64_ort.setup()
    out.mkdir(parents=True, exist_ok=True)
    models = kernel_models(out)
    for path in extra:
        ids = np.arange(1000, 1016, dtype=np.int64)[None, :]
        models[path.name] = (path, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    cpu_list = cpus.split(",")
    print("\n| model | " + " | ".join(cpu_list) + " |")
    print("|---|" + "---|" * len(cpu_list))
    for name, (path, feed) in models.items():
        (x86,) = x86_outputs(path, [feed])
        cells = []
        for cpu in cpu_list:
            counts = aarch64_ort.probe(emulator, cpu, path, [feed])
            family = ", ".join(k for k in ("sdot", "udot", "usdot", "smmla", "ummla", "usmmla", "smopa", "fmopa")
                               if counts.get(k))
            if not family:
                family = "NEON " + "/".join(k for k in ("smull", "smlal", "sadalp", "umlal", "fmla.4s") if counts.get(k))
            (arm,), _ = aarch64_ort.run_samples(emulator, cpu, path, [feed])
            first = next(iter(x86))
            same = np.array_equal(arm[first], x86[first])
            rel = float(np.abs(arm[first].astype(np.float64) - x86[first]).max() / (np.abs(x86[first]).max() or 1))
            cells.append(f"{family}; {'= x86' if same else f'rel diff {rel:.1e}'}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


# Published ONNX Runtime figures on ARM64 (MatMulNBits CompInt8, 4 threads), from
# https://github.com/microsoft/onnxruntime/pull/21380 (MLAS AArch64 SQNBitGemm CompInt8, 4x2 tiles, 2024-07):
# - microbenchmark M=128, K=4096, N=4096, block 32 symmetric: 25,812,083 ns on an "Azure VM (ARM64 Linux)";
# - onnxruntime-genai Phi-3 mini prompt processing: 17.93 tokens/s (Samsung Galaxy S21), 21.84 (Azure VM).
PUBLISHED = (
    ("MatMulNBits 128x4096x4096 g32 (PR 21380, Azure ARM64 VM)", 128 * 4096 * 4096, 25.812083e-3),
    # Phi-3 mini: about 3.7e9 MACs a token in its linear layers (3.8B parameters, embedding not a MatMul)
    ("Phi-3 mini prompt, 1 token (PR 21380, Galaxy S21)", 3.7e9, 1 / 17.93),
    ("Phi-3 mini prompt, 1 token (PR 21380, Azure ARM64 VM)", 3.7e9, 1 / 21.84),
)


@main.command()
@click.option("--threads", type=int, default=4, show_default=True)
def published(threads: int) -> None:
    """The cost model's peak next to published ORT ARM64 MatMulNBits figures (4 threads)."""
    from edgeq.targets.arm import cost_model

    print(f"| workload | MACs | published time | achieved GMAC/s per core ({threads} threads) | "
          "model: Cortex-A76 cycles per core | model: Neoverse N2 cycles per core | "
          "achieved MAC/cycle if 2.4 / 3.0 GHz |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, macs, seconds in PUBLISHED:
        per_core = macs / threads
        a76, n2 = (cost_model(core).cost({"op_mac_int8_int4": per_core})["op_mac_int8_int4"]
                   for core in ("cortex-a76", "neoverse-n2"))
        achieved = per_core / seconds
        print(f"| {name} | {macs / 1e9:.2f} G | {seconds * 1e3:.1f} ms | {achieved / 1e9:.1f} | {a76 / 1e6:.1f} M "
              f"| {n2 / 1e6:.1f} M | {achieved / 2.4e9:.1f} / {achieved / 3.0e9:.1f} |")


if __name__ == "__main__":
    main()
