"""SmolLM2 under a size budget (`--size-budget`, issue 17): perplexity of budgets given as ratios
of the float file, beside the uniform W4A16 and W8 weight-only presets, in one run.

    python tools/bench_size_budget.py [--budgets 20%,22%,25%] [--windows 16] [--keep DIR]

Each model is compiled by `edgeq compile` in a child process (x86-vnni, weight-only:
`--weights int4 --group 128 --activations float [--size-budget B]`, or `--weights int8
--activations float`), calibrated as tools/bench_smollm2_ptq.py does (WikiText-2 windows 1000..
of 256 tokens, `--samples 18`; int4 compiles draw more windows for GPTQ and say so). Perplexity
on the first `--windows` of the standard protocol's windows 0..31 (all 32: the standard number).
Sizes are the files' bytes (.onnx and external data); each compile's report (per-layer widths)
is kept in --keep.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_SHARED, load_line, run_header
from bench_smollm2_ptq import run_compile
from edgeq.models import catalog, evaluation

W4A16 = ["--weights", "int4", "--group", "128", "--activations", "float"]
BASELINES = {"plain-w4a16": W4A16, "w8-weight-only": ["--weights", "int8", "--activations", "float"]}


def perplexity(model: Path, shared: Path, windows: int, threads: int) -> tuple[float, float]:
    """(perplexity, seconds) on the first `windows` standard evaluation windows."""
    run = evaluation.measure(model, "lm-nll", {"windows": evaluation.smollm2_eval_windows(shared)[:windows]},
                             threads)
    return evaluation.perplexity(run.outputs), run.eval_s


def widths_by_kind(report: Path) -> str:
    """A compile report's per-layer widths as a table row per layer kind (q/k/v/o, gate/up/down,
    LM head, embedding: the last name component before the op's own)."""
    widths = json.loads(report.read_text()).get("weight_widths", {})
    kinds: dict[str, dict[str, int]] = {}
    for dtype, ops in widths.items():
        for op in ops:
            parts = [p for p in op.split("/") if p]
            kind = "embedding" if "Gather" in parts[-1] else parts[-2] if len(parts) > 1 else parts[0]
            kinds.setdefault(kind, {}).setdefault(dtype, 0)
            kinds[kind][dtype] += 1
    return "; ".join(f"{kind}: " + ", ".join(f"{d} {n}" for d, n in sorted(counts.items()))
                     for kind, counts in sorted(kinds.items()))


@click.command()
@click.option("--summarize", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Only print a compile report's per-layer widths by layer kind.")
@click.option("--budgets", default="20%,22%,25%", show_default=True, help="--size-budget values, comma-separated.")
@click.option("--baselines", default=",".join(BASELINES), show_default=True)
@click.option("--windows", type=int, default=16, show_default=True, help="Evaluation windows (standard: 32).")
@click.option("--samples", type=int, default=18, show_default=True)
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path), default=DEFAULT_SHARED)
@click.option("--threads", type=int, default=0)
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), help="Keep reports (and models) here.")
@click.option("--float-ppl", type=float, help="The float model's perplexity on these windows, from an earlier run "
                                             "(skips evaluating it; variants run as parallel invocations).")
def main(summarize: Path | None, budgets: str, baselines: str, windows: int, samples: int, shared: Path,
         threads: int, keep: Path | None, float_ppl: float | None) -> None:
    if summarize is not None:
        click.echo(widths_by_kind(summarize))
        return
    header = run_header()
    click.echo("\n".join([*header, load_line("at start")]), err=True)
    float_path = catalog.cached("smollm2")
    text = shared / "data" / "wikitext-2-raw-test.txt"
    tokenizer = shared / "reference" / "smollm2_tokenizer.json"
    calib = ["--calib-text", str(text), "--tokenizer", str(tokenizer), "--seq-len", "256",
             "--samples", str(samples), "--first-window", "1000"]
    variants = [(f"budget {b}", [*W4A16, "--size-budget", b]) for b in budgets.split(",") if b]
    variants += [(name, BASELINES[name]) for name in baselines.split(",") if name]
    float_bytes = evaluation.model_file_bytes(float_path)
    base, base_s = (float_ppl, 0.0) if float_ppl else perplexity(float_path, shared, windows, threads)
    rows = [("float32", "-", float_bytes, base, base_s, "")]
    click.echo(f"float32: {base:.3f} ({base_s:.0f} s) {load_line('')}", err=True)
    with tempfile.TemporaryDirectory(prefix="edgeq-budget-") as tmp:
        out_dir = keep or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, flags in variants:
            slug = name.replace(" ", "-").replace("%", "pct")
            out, report = out_dir / f"{slug}.onnx", out_dir / f"{slug}.json"
            args = ["compile", str(float_path), "--target", "x86-vnni", "-o", str(out), "--report", str(report),
                    *flags, *calib]
            seconds, _, output = run_compile(args)
            click.echo(output, err=True)
            ppl, eval_s = perplexity(out, shared, windows, threads)
            widths = json.loads(report.read_text()).get("weight_widths", {})
            counts = ", ".join(f"{d} {len(widths[d])}" for d in ("int4", "int8", "float") if d in widths)
            rows.append((name, f"{seconds:.0f}", evaluation.model_file_bytes(out), ppl, eval_s, counts))
            click.echo(f"{name}: {ppl:.3f} {rows[-1][2]} bytes {counts} {load_line('')}", err=True)
            if keep is None:
                out.unlink(missing_ok=True)
                Path(f"{out}.data").unlink(missing_ok=True)
    evaluated = f"evaluation: the first {windows} of the 32 standard windows of 256 tokens"
    click.echo("\n".join([*header, load_line("at end"), evaluated, ""]))
    click.echo("| variant | weights (linears + embedding) | file bytes | vs float file | perplexity | vs float "
               "| compile s | eval s |")
    click.echo("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, seconds, size, ppl, eval_s, counts in rows:
        click.echo(f"| {name} | {counts or '-'} | {size:,} | {100 * size / float_bytes:.2f}% | {ppl:.3f} | "
                   f"{100 * (ppl / base - 1):+.2f}% | {seconds} | {eval_s:.0f} |")


if __name__ == "__main__":
    main()
