"""NF4 and FP8 against edgeq's integer schemes (issue 17, items 2 and 3), in one run per model.

    python tools/bench_nf4_fp8.py minilm [--variants "A;B"]  # cosine over the 256 paragraphs
    python tools/bench_nf4_fp8.py smollm2 [--variants "A;B"] # perplexity, standard protocol

Every variant is an `edgeq compile` child process of the cached float model for x86-vnni (run
on ONNX Runtime's CPU provider here). FP8 on the CPU is an accuracy study: ONNX Runtime has
no float8 kernel on x86, the float8 QDQ pairs run as fp32 (the numbers say what E4M3 costs in
accuracy, not what it would run at). NF4 runs as com.microsoft MatMulBnb4 (dequantize + fp32
GEMM). MiniLM calibration: 18 WikiText-2 windows of 128 tokens from window 1000 (2 held out);
SmolLM2: 18 windows of 256 tokens from window 1000.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_SHARED, load_line, run_header  # noqa: E402
from edgeq.models import catalog, evaluation  # noqa: E402

MINILM = {
    "int8 W8A8 (no flag)": [],
    "fp8 E4M3 W8A8": ["--weights", "fp8", "--activations", "fp8"],
    "fp8 E4M3 W8A8 --rotate": ["--weights", "fp8", "--activations", "fp8", "--rotate"],
    "fp8 E4M3 W8 weight-only": ["--weights", "fp8", "--activations", "float"],
    "int8 W8 weight-only": ["--weights", "int8", "--activations", "float"],
    "nf4 g64": ["--weights", "nf4", "--group", "64", "--activations", "float"],
    "int4 sym g64 RTN, no rotation": ["--weights", "int4", "--group", "64", "--activations", "float",
                                      "--no-rotate", "--weight-rounding", "rtn"],
    "int4 sym g64 (default: rotation + GPTQ)": ["--weights", "int4", "--group", "64", "--activations", "float"],
    "nf4 g64 --rotate": ["--weights", "nf4", "--group", "64", "--activations", "float", "--rotate"],
    "int4 sym g64 RTN --rotate": ["--weights", "int4", "--group", "64", "--activations", "float", "--rotate",
                                  "--weight-rounding", "rtn"],
}
SMOLLM2 = {
    "nf4 g64": ["--weights", "nf4", "--group", "64", "--activations", "float"],
    "int4 sym g64 RTN, no rotation": ["--weights", "int4", "--group", "64", "--activations", "float",
                                      "--no-rotate", "--weight-rounding", "rtn"],
    "int4 sym g64 (default: rotation + GPTQ)": ["--weights", "int4", "--group", "64", "--activations", "float"],
    "int4 sym g128 (default: rotation + GPTQ)": ["--weights", "int4", "--group", "128", "--activations", "float"],
    "fp8 E4M3 W8A8": ["--weights", "fp8", "--activations", "fp8"],
    "fp8 E4M3 W8A8 --rotate": ["--weights", "fp8", "--activations", "fp8", "--rotate"],
    "int8 W8A8 (no flag)": [],
    "nf4 g64 --rotate": ["--weights", "nf4", "--group", "64", "--activations", "float", "--rotate"],
    "int4 sym g64 RTN --rotate": ["--weights", "int4", "--group", "64", "--activations", "float", "--rotate",
                                  "--weight-rounding", "rtn"],
}


def _compile(model: Path, out: Path, flags: list[str], calib: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "edgeq.cli", "compile", str(model), "--target", "x86-vnni",
                           "-o", str(out), *calib, *flags], capture_output=True, text=True)
    if done.returncode != 0:
        raise click.ClickException(f"edgeq compile {' '.join(flags)} failed:\n{done.stdout}\n{done.stderr}")
    scheme = next((line.strip() for line in done.stdout.splitlines() if line.strip().startswith("target ")), "")
    return time.perf_counter() - start, scheme


@click.command()
@click.argument("model", type=click.Choice(["minilm", "smollm2"]))
@click.option("--variants", default="", help="Semicolon-separated variant names (default: all of the model's).")
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path), default=DEFAULT_SHARED)
def main(model: str, variants: str, threads: int, shared: Path) -> None:
    header_lines = run_header()   # the machine and its load at the start
    table = MINILM if model == "minilm" else SMOLLM2
    names = [v.strip() for v in variants.split(";") if v.strip()] or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise click.BadParameter(f"unknown variant(s) {unknown}; known: {list(table)}")
    float_path = catalog.cached(model)
    text = shared / "data" / "wikitext-2-raw-test.txt"
    if model == "minilm":
        from edgeq.models import minilm
        tokenizer = minilm.tokenizer_path()
        calib = ["--calib-text", str(text), "--tokenizer", str(tokenizer), "--seq-len", "128", "--samples", "18",
                 "--first-window", "1000"]
        paragraphs = evaluation.minilm_tokenize(evaluation.minilm_eval_paragraphs(shared))
        reference = evaluation.measure(float_path, "embeddings", paragraphs, threads, reference=True).outputs
        header = "| variant | scheme (compile summary) | cosine mean | cosine min | size vs float | compile s |"
    else:
        calib = ["--calib-text", str(text), "--tokenizer", str(shared / "reference" / "smollm2_tokenizer.json"),
                 "--seq-len", "256", "--samples", "18", "--first-window", "1000"]
        base = evaluation.evaluate_smollm2(float_path, shared, threads)
        header = "| variant | scheme (compile summary) | perplexity | vs float | size vs float | compile s |"
    float_bytes = evaluation.model_file_bytes(float_path)
    rows = []
    if model == "smollm2":
        rows.append(f"| float32 | - | {base.metrics['perplexity']:.3f} | - | 100.0% | - |")
    with tempfile.TemporaryDirectory(prefix="edgeq-nf4-fp8-") as tmp:
        for i, name in enumerate(names):
            out = Path(tmp) / f"v{i}.onnx"
            seconds, scheme = _compile(float_path, out, table[name], calib)
            size = f"{100 * evaluation.model_file_bytes(out) / float_bytes:.1f}%"
            if model == "minilm":
                result = evaluation.evaluate_minilm(out, shared, reference=reference, threads=threads)
                rows.append(f"| {name} | {scheme} | {result.metrics['cosine_mean']:.5f} | "
                            f"{result.metrics['cosine_min']:.5f} | {size} | {seconds:.0f} |")
            else:
                ppl = evaluation.evaluate_smollm2(out, shared, threads).metrics["perplexity"]
                rows.append(f"| {name} | {scheme} | {ppl:.3f} | "
                            f"{100 * (ppl / base.metrics['perplexity'] - 1):+.2f}% | {size} | {seconds:.0f} |")
            click.echo(rows[-1], err=True)
    click.echo("\n".join([*header_lines, "", header,
                          "|---|---|---|---|---|---|", *rows, "", load_line("at end")]))


if __name__ == "__main__":
    main()
