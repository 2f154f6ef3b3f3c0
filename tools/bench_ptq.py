"""MiniLM W8A8 side by side in one run: float, edgeq variants, ONNX Runtime's quantizers.

    python tools/bench_ptq.py [--threads 2] [--repeats 7] [--variants default,smooth0.7,smooth-search]

For each model: sentence-embedding cosine against float over the 256 WikiText evaluation
paragraphs (mean and minimum), file size as a share of the float file, and speed at batch
16 x 128 tokens as a ratio of medians to float, all models timed interleaved in this one
process. edgeq and ORT calibrate on the same 16 paragraphs (disjoint from evaluation).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_SHARED, load_line, run_header  # noqa: E402
from ort_baselines import dynamic_int8, static_qdq  # noqa: E402

from edgeq.models import evaluation  # noqa: E402
from edgeq.compiler import compile as edgeq_compile  # noqa: E402
from edgeq.models import catalog  # noqa: E402
from edgeq.options import SMOOTH_SEARCH_GRID, CalibrationOptions, CompileOptions  # noqa: E402
from edgeq.runtime.fusion import fusion_report  # noqa: E402
from edgeq.runtime.sessions import make_session  # noqa: E402

VARIANTS = {
    "default": CompileOptions(calibration=CalibrationOptions(method="minmax")),
    "smooth0.7": CompileOptions(calibration=CalibrationOptions(method="minmax"), smooth_alpha=0.7),
    "smooth-search": CompileOptions(calibration=CalibrationOptions(method="minmax"),
                                    smooth_alpha_grid=SMOOTH_SEARCH_GRID),
}


def speed(models: dict[str, Path], threads: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(1000, 20000, (16, 128)).astype(np.int64),
            "attention_mask": np.ones((16, 128), np.int64), "token_type_ids": np.zeros((16, 128), np.int64)}
    sessions = {name: make_session(path, threads=threads) for name, path in models.items()}
    for session in sessions.values():
        session.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


@click.command()
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--repeats", type=int, default=7, show_default=True)
@click.option("--variants", default="default,smooth0.7,smooth-search", show_default=True)
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path), default=DEFAULT_SHARED)
def main(threads: int, repeats: int, variants: str, shared: Path) -> None:
    header = run_header()
    float_path = catalog.cached("minilm")
    calibration = evaluation.minilm_calibration_feeds(shared, 16)
    inputs = evaluation.minilm_tokenize(evaluation.minilm_eval_paragraphs(shared))
    reference = evaluation.sentence_embeddings(evaluation.session(float_path, threads), inputs)
    with tempfile.TemporaryDirectory(prefix="edgeq-ptq-") as tmp_name:
        tmp = Path(tmp_name)
        models: dict[str, Path] = {"float": float_path}
        notes: dict[str, str] = {}
        for name in variants.split(","):
            start = time.perf_counter()
            compiled = edgeq_compile(float_path, "x86-vnni", VARIANTS[name], calibration=calibration)
            path = tmp / f"edgeq-{name}.onnx"
            compiled.save(path)
            fusion = fusion_report(path)
            label = f"edgeq x86-vnni {compiled.report.scheme} ({name})"
            models[label] = path
            notes[label] = (f"compile {time.perf_counter() - start:.1f} s; ORT kernels "
                            f"{', '.join(f'{k} {v}' for k, v in fusion.integer_kernels.items())}; "
                            f"unfused {len(fusion.unfused)}")
        preprocessed = tmp / "pre.onnx"
        from onnxruntime.quantization import quant_pre_process

        quant_pre_process(float_path, preprocessed, auto_merge=True)
        for label, quantize in (("ORT quantize_dynamic int8 per-channel", dynamic_int8),
                                ("ORT quantize_static QDQ U8S8 MinMax per-channel, all ops",
                                 static_qdq(calibration, None)),
                                ("ORT quantize_static QDQ U8S8 MinMax per-channel, MatMul only",
                                 static_qdq(calibration, ["MatMul"]))):
            path = tmp / f"ort-{len(models)}.onnx"
            quantize(float_path, preprocessed, path)
            models[label] = path
        timings = speed(models, threads, repeats)
        rows = []
        for label, path in models.items():
            embeddings = evaluation.sentence_embeddings(evaluation.session(path, threads), inputs)
            cosine = evaluation.cosine_rows(reference, embeddings)
            size = evaluation.model_file_bytes(path) / evaluation.model_file_bytes(float_path)
            rows.append(f"| {label} | {cosine.mean():.5f} | {cosine.min():.5f} | {100 * size:.1f}% | "
                        f"{timings[label] * 1000:.0f} | {timings['float'] / timings[label]:.2f}x | "
                        f"{notes.get(label, '')} |")
    click.echo("\n".join([*header, load_line("at end"), ""]))
    click.echo(f"MiniLM (all-MiniLM-L6-v2), 256 WikiText paragraphs; speed: batch 16 x 128, {threads} threads, "
               f"median of {repeats}, interleaved\n")
    click.echo("| model | cos mean | cos min | size vs float | ms | speedup | notes |\n|---|---|---|---|---|---|---|")
    click.echo("\n".join(rows))


if __name__ == "__main__":
    main()
