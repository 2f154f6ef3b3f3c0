"""MiniLM on the fpga target under a latency budget (`--latency-budget`, issue 17): the device
estimate and the embedding cosine of budgets between the all-int4 and all-int8 models, beside
those two uniform presets, in one run.

    python tools/bench_latency_budget.py [--device zcu104] [--budgets 14,16,18] [--paragraphs 256]

Every model is compiled with edgeq.compile for `fpga` (int8 activations, the target's integer
datapath), calibrated on edgeq.models.evaluation.minilm_calibration_feeds(shared, 16) as
tools/bench_fpga.py does; `--weights int4` for the int4 preset and the budgets, which choose int4 or
int8 per linear from the fpga cost model's latency of each (the overlay array for --device).
Latency: the fpga estimate of the compiled model on --device (`edgeq estimate`'s numbers).
Accuracy: cosine of the mean-pooled embeddings of the first --paragraphs evaluation paragraphs to
the float model's, ONNX Runtime's CPU provider (the integer model is the datapath's functional model).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_SHARED, run_header
from edgeq.models import catalog
from edgeq.models import evaluation as ev

from edgeq.compiler import compile as edgeq_compile
from edgeq.ir import to_model_proto
from edgeq.options import CompileOptions
from edgeq.registry import get_target


@click.command()
@click.option("--device", default="zcu104", show_default=True, help="FPGA part or board the estimate prices.")
@click.option("--budgets", default="14,16,18", show_default=True, help="Latency budgets in ms, comma-separated.")
@click.option("--paragraphs", type=int, default=256, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path), default=DEFAULT_SHARED)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Keep the compiled models here.")
def main(device: str, budgets: str, paragraphs: int, threads: int, shared: Path, out: Path | None) -> None:
    for line in run_header():
        click.echo(line)
    float_path = catalog.cached("minilm")
    calibration = ev.minilm_calibration_feeds(shared, 16)
    inputs = ev.minilm_tokenize(ev.minilm_eval_paragraphs(shared)[:paragraphs])
    reference = ev.sentence_embeddings(ev.session(float_path, threads), inputs)
    cost = get_target("fpga").cost_model
    variants = [("W8 (int8 weights, the default)", CompileOptions(threads=threads)),
                ("W4 (--weights int4)", CompileOptions(weights="int4", threads=threads))]
    variants += [(f"--weights int4 --latency-budget {b}", CompileOptions(weights="int4", latency_budget=float(b),
                                                                          threads=threads))
                 for b in budgets.split(",") if b.strip()]
    rows = []
    for name, options in variants:
        start = time.perf_counter()
        compiled = edgeq_compile(float_path, "fpga", options, calibration=calibration, cost_device=device)
        seconds = time.perf_counter() - start
        estimate = cost.estimate(to_model_proto(compiled.graph), device=device)
        latency_ms = 1e3 * estimate.latency_cycles / (estimate.clock_mhz * 1e6)
        path = (out or Path("/tmp")) / f"minilm-fpga-{len(rows)}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        compiled.save(path)
        embeddings = ev.sentence_embeddings(ev.session(path, threads), inputs)
        cosines = ev.cosine_rows(embeddings, reference)
        widths = compiled.report.weight_widths
        counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(widths.items())) or "-"
        rows.append((name, latency_ms, estimate.template, "yes" if estimate.fits else "no", counts,
                     float(cosines.mean()), float(cosines.min()), compiled.report.compiled_bytes, seconds))
        click.echo(f"{name}: {latency_ms:.3f} ms, cosine {cosines.mean():.5f} / {cosines.min():.5f}, widths {counts}, "
                   f"compile {seconds:.0f} s", err=True)
        if out is None:
            path.unlink()
    click.echo(f"\nMiniLM (all-MiniLM-L6-v2) on fpga, estimate on {device}; cosine over {paragraphs} paragraphs\n")
    click.echo("| model | latency ms (estimate) | template | fits | linears by width | cosine mean | cosine min "
               "| bytes | compile s |")
    click.echo("|---|---:|---|---|---|---:|---:|---:|---:|")
    for name, ms, template, fits, counts, mean, low, size, seconds in rows:
        click.echo(f"| {name} | {ms:.3f} | {template} | {fits} | {counts} | {mean:.5f} | {low:.5f} | {size:,} "
                   f"| {seconds:.0f} |")


if __name__ == "__main__":
    main()
