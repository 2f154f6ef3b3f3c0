"""LLM.int8-style outlier decomposition against the rotation (issue 17): SmolLM2 W8A8 perplexity on
the standard protocol and prefill latency on ONNX Runtime's CPU provider, in one run.

    python tools/bench_decompose.py --out /tmp/decompose [--variants ...] [--speed] [--minilm]

Every variant is an `edgeq compile` child (x86-vnni), calibrated as tools/bench_smollm2_ptq.py does:
WikiText-2 windows 1000.. of 256 tokens (`--samples 18`: 16 calibrate, 2 are held out to verify),
disjoint from the evaluation windows 0..31. The compile report's outlier-decomposition line (how
many input columns of each linear run in float) is printed per variant. `--speed`: prefill 1x256
latency of float and the compiled models, interleaved rounds in one process
(edgeq.runtime.benchmark), ORT CPU provider, `--bench-threads` threads. `--minilm`: MiniLM W8A8
cosine with and without the decomposition (bench_nf4_fp8.py's protocol: 18 windows of 128
tokens from window 1000 calibrate, 256 paragraphs evaluate).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_SHARED, load_line, run_header
from bench_smollm2_ptq import run_compile
from edgeq.models import catalog, evaluation

VARIANTS = {
    "w8a8 (no flag: rotated)": [],
    "w8a8 --no-rotate": ["--no-rotate"],
    "w8a8 --decompose-outliers": ["--decompose-outliers"],
    "w8a8 --decompose-outliers --no-smooth": ["--decompose-outliers", "--no-smooth"],
}


def _flags(name: str) -> list[str]:
    """A variant's compile flags: the table's, or the words after "w8a8" ("w8a8 --decompose-outliers 3")."""
    if name in VARIANTS:
        return VARIANTS[name]
    words = name.split()
    if not words or words[0] != "w8a8":
        raise click.BadParameter(f"unknown variant {name!r}: one of {list(VARIANTS)}, or 'w8a8 FLAGS...'")
    return words[1:]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def _compile(model: Path, out: Path, flags: list[str], calib: list[str], threads: int, reuse: bool) -> dict:
    """Compile (unless `reuse` and the model and its report exist); the report as a dict."""
    report = out.with_suffix(".json")
    seconds = None
    if not (reuse and out.exists() and report.exists()):
        args = ["compile", str(model), "--target", "x86-vnni", "-o", str(out), "--report", str(report), *flags,
                *calib, "--threads", str(threads)]
        seconds, _, output = run_compile(args)
        click.echo(output, err=True)
    data = json.loads(report.read_text())
    data["_seconds"] = seconds
    return data


def _columns_line(report: dict) -> str:
    """The outlier decomposition in short: linears split and float columns (stats of the pass)."""
    stats = next((p["stats"] for p in report["passes"] if p["name"] == "decompose-outliers"), {})
    if not stats.get("linears"):
        return "-"
    return (f"{stats['linears']} of {stats['of_linears']} linears, {stats['columns']} columns "
            f"(max {stats['max_columns']})")


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder of the compiled models and reports (kept for --speed and reruns).")
@click.option("--variants", default=",".join(VARIANTS), show_default=True)
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path), default=DEFAULT_SHARED)
@click.option("--threads", type=int, default=2, show_default=True, help="Threads of compile and perplexity runs.")
@click.option("--samples", type=int, default=18, show_default=True)
@click.option("--reuse", is_flag=True, help="Keep compiled models already in --out (same flags).")
@click.option("--no-ppl", is_flag=True, help="Skip the perplexity runs.")
@click.option("--float-ppl", type=float, help="The float perplexity measured before (skips its run).")
@click.option("--speed", is_flag=True, help="Prefill 1x256 latency of float and every variant, interleaved.")
@click.option("--bench-threads", type=int, default=2, show_default=True)
@click.option("--repeats", type=int, default=15, show_default=True)
@click.option("--minilm", is_flag=True, help="MiniLM W8A8 cosine with and without the decomposition.")
def main(out: Path, variants: str, shared: Path, threads: int, samples: int, reuse: bool, no_ppl: bool,
         speed: bool, bench_threads: int, repeats: int, minilm: bool, float_ppl: float | None) -> None:
    header = run_header()
    out.mkdir(parents=True, exist_ok=True)
    float_path = catalog.cached("smollm2")
    calib = ["--calib-text", str(shared / "data" / "wikitext-2-raw-test.txt"), "--tokenizer",
             str(shared / "reference" / "smollm2_tokenizer.json"), "--seq-len", "256", "--samples", str(samples),
             "--first-window", "1000"]
    names = [n for n in variants.split(",") if n]
    compiled: dict[str, tuple[Path, dict]] = {}
    for name in names:
        path = out / f"smollm2-{_slug(name)}.onnx"
        compiled[name] = (path, _compile(float_path, path, _flags(name), calib, threads, reuse))
    lines = [*header, ""]
    if not no_ppl:
        float_bytes = evaluation.model_file_bytes(float_path)
        base = float_ppl if float_ppl is not None else \
            evaluation.evaluate_smollm2(float_path, shared, threads).metrics["perplexity"]
        lines += ["SmolLM2-135M W8A8, x86-vnni, perplexity on windows 0..31 of 256 tokens (ORT CPU):", "",
                  "| variant | perplexity | vs float | float side path | rotation | size vs float | compile s |",
                  "|---|---|---|---|---|---|---|", f"| float32{' (given)' if float_ppl else ''} | {base:.3f} | - | - | - | 100.0% | - |"]
        for name, (path, report) in compiled.items():
            result = evaluation.evaluate_smollm2(path, shared, threads)
            ppl = result.metrics["perplexity"]
            seconds = report["_seconds"]
            lines.append(f"| {name} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | {_columns_line(report)} | "
                         f"{report['settings'].get('Hadamard rotation', '-')} | "
                         f"{100 * result.file_bytes / float_bytes:.1f}% | "
                         f"{'reused' if seconds is None else f'{seconds:.0f}'} |")
            click.echo(lines[-1], err=True)
    if speed:
        from edgeq.registry import get_target
        from edgeq.runtime.benchmark import bench

        paths = [float_path, *(path for path, _ in compiled.values())]
        result = bench(paths, get_target("x86-vnni"), providers=["cpu"], threads=bench_threads,
                       shapes={"input_ids": [1, 256], "attention_mask": [1, 256]}, warmup=2, repeats=repeats,
                       progress=False)
        lines += ["", f"Prefill 1x256, ORT CPU provider, {bench_threads} threads, interleaved rounds:", "",
                  result.table(), "", "rows: " + "; ".join(f"{path.name} = {name}" for name, (path, _) in
                                                          compiled.items())]
    if minilm:
        lines += ["", *_minilm(out, shared, threads, reuse)]
    lines.append(load_line("at end"))
    click.echo("\n".join(lines))


def _minilm(out: Path, shared: Path, threads: int, reuse: bool) -> list[str]:
    """MiniLM W8A8 cosine to float (256 paragraphs), without and with the decomposition."""
    from edgeq.models import minilm

    float_path = catalog.cached("minilm")
    calib = ["--calib-text", str(shared / "data" / "wikitext-2-raw-test.txt"), "--tokenizer",
             str(minilm.tokenizer_path()), "--seq-len", "128", "--samples", "18", "--first-window", "1000"]
    reference = evaluation.evaluate_minilm(float_path, shared, threads=threads)  # its own outputs: the reference
    rows = ["MiniLM W8A8, x86-vnni, cosine to float on 256 paragraphs (ORT CPU):", "",
            "| variant | cosine mean | cosine min | float side path |", "|---|---|---|---|"]
    for name, flags in (("w8a8 (no flag)", []), ("w8a8 --decompose-outliers", ["--decompose-outliers"])):
        path = out / f"minilm-{_slug(name)}.onnx"
        report = _compile(float_path, path, flags, calib, threads, reuse)
        result = evaluation.evaluate_minilm(path, shared, reference.outputs, threads=threads)
        rows.append(f"| {name} | {result.metrics['cosine_mean']:.5f} | {result.metrics['cosine_min']:.5f} | "
                    f"{_columns_line(report)} |")
    return rows


if __name__ == "__main__":
    main()
