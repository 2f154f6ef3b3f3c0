"""SmolLM2 through `edgeq compile` (the CLI, in a child process): compile time and peak
memory, then perplexity on the standard protocol, beside float, in one run.

    python tools/bench_smollm2_ptq.py [--variants w8-weight-only,w8a8-rotate-minmax,...]

Calibration is text: WikiText-2 windows 1000.. of 256 tokens (`--samples 18` by default: 16
calibrate, 2 are held out to verify; presets that want more tokens draw more windows and say so), tokenized with SmolLM2's tokenizer, disjoint from evaluation windows 0..31.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_SHARED, load_line, run_header  # noqa: E402

from edgeq.models import evaluation  # noqa: E402
from edgeq.models import catalog  # noqa: E402

VARIANTS = {
    "w8-weight-only": ["--weights", "int8", "--activations", "float"],
    "w8a8-minmax-no-smooth": ["--calib-method", "minmax", "--no-smooth"],
    "w8a8-minmax (default: smooth search)": ["--calib-method", "minmax"],
    "w8a8-minmax-two-digit-down_proj": ["--calib-method", "minmax", "--no-smooth", "--two-digit", "down_proj"],
    "w8a8-rotate (default calibration)": ["--rotate"],
    "w8a8-rotate-minmax": ["--rotate", "--calib-method", "minmax"],
    # The plain commands a user types (issue 16): the target decides rotation, smoothing and rounding.
    "plain-w8a8 (no flag)": [],
    "plain-w4a16": ["--weights", "int4", "--group", "128", "--activations", "float"],
    "plain-w4a8": ["--weights", "int4", "--group", "128", "--activations", "int8"],
}
# Variants that need no calibration data (weight-only int8 rounds to nearest).
WITHOUT_DATA = {"w8-weight-only"}


def run_compile(args: list[str]) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes, last output lines) of one `edgeq compile` child."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "edgeq.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise click.ClickException(f"edgeq compile failed:\n{output}")
    return seconds, usage.ru_maxrss * 1024, output


@click.command()
@click.option("--variants", default=",".join(VARIANTS), show_default=True)
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path), default=DEFAULT_SHARED)
@click.option("--threads", type=int, default=0)
@click.option("--samples", type=int, default=18, show_default=True,
              help="Calibration windows given to --samples (the compile holds 2 out to verify).")
def main(variants: str, shared: Path, threads: int, samples: int) -> None:
    header = run_header()
    float_path = catalog.cached("smollm2")
    text = shared / "data" / "wikitext-2-raw-test.txt"
    tokenizer = shared / "reference" / "smollm2_tokenizer.json"
    rows = []
    reference = evaluation.evaluate_smollm2(float_path, shared, threads)
    rows.append(("float32", "-", "-", reference))
    with tempfile.TemporaryDirectory(prefix="edgeq-smollm2-") as tmp:
        for name in variants.split(","):
            out = Path(tmp) / f"{name.split()[0]}.onnx"
            args = ["compile", str(float_path), "--target", "x86-vnni", "-o", str(out), *VARIANTS[name]]
            if name not in WITHOUT_DATA:
                args += ["--calib-text", str(text), "--tokenizer", str(tokenizer), "--seq-len", "256",
                         "--samples", str(samples), "--first-window", "1000"]
            seconds, peak, output = run_compile(args)
            click.echo(output, err=True)
            rows.append((name, f"{seconds:.0f}", f"{peak / 2**20:.0f}", evaluation.evaluate_smollm2(out, shared, threads)))
    click.echo("\n".join([*header, load_line("at end"), ""]))
    float_bytes = reference.file_bytes
    click.echo("| variant | compile s | compile peak MiB | perplexity | vs float | size vs float | eval s | eval peak MiB |")
    click.echo("|---|---|---|---|---|---|---|---|")
    base = reference.metrics["perplexity"]
    for name, seconds, peak, result in rows:
        ppl = result.metrics["perplexity"]
        click.echo(f"| {name} | {seconds} | {peak} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | "
                   f"{100 * result.file_bytes / float_bytes:.1f}% | {result.eval_s:.0f} | "
                   f"{result.peak_rss_bytes / 2**20:.0f} |")


if __name__ == "__main__":
    main()
