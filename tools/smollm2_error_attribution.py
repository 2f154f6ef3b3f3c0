"""Which ops make SmolLM2 W8A8 lose accuracy: keep one group of ops high at a time.

    python tools/smollm2_error_attribution.py [--windows 8] [--method minmax]

Compiles SmolLM2 for x86-vnni W8A8 (static per-tensor int8 activations, per-channel int8
weights, calibration windows 1000-1017 with 2 held out), once with everything quantized and
once per group with that group kept in float (`--exclude-regex`), and scores each on the first
--windows windows of the standard perplexity protocol. The drop from "all quantized" when a
group stays high is that group's share of the error.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_SHARED, load_line, run_header  # noqa: E402

from edgeq.models import evaluation  # noqa: E402
from edgeq.compiler import compile as edgeq_compile  # noqa: E402
from edgeq.models import catalog  # noqa: E402
from edgeq.options import CalibrationOptions, CompileOptions, PrecisionOverrides  # noqa: E402

GROUPS = {
    "none (all quantized)": (),
    "q/k/v projections": (r"/(q|k|v)_proj/",),
    "attention matmuls (QK^T, PV)": (r"self_attn/MatMul(_1)?$",),
    "o_proj": (r"/o_proj/",),
    "gate/up projections": (r"/(gate|up)_proj/",),
    "down_proj": (r"/down_proj/",),
    "lm_head": (r"lm_head",),
}


def window_perplexity(path: Path, shared: Path, windows: int) -> float:
    session = evaluation.session(path)
    nll = evaluation.lm_window_nll(session, evaluation.smollm2_eval_windows(shared)[:windows])
    return evaluation.perplexity(nll)


@click.command()
@click.option("--windows", type=int, default=8, show_default=True)
@click.option("--method", type=click.Choice(["minmax", "percentile", "mse"]), default="minmax", show_default=True)
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path), default=DEFAULT_SHARED)
def main(windows: int, method: str, shared: Path) -> None:
    header = run_header()
    float_path = catalog.cached("smollm2")
    calibration = evaluation.smollm2_calibration_feeds(shared, 18)
    rows = [("float", window_perplexity(float_path, shared, windows))]
    with tempfile.TemporaryDirectory(prefix="edgeq-attr-") as tmp:
        for label, patterns in GROUPS.items():
            options = CompileOptions(calibration=CalibrationOptions(method=method), verify=False,
                                     overrides=PrecisionOverrides(exclude_regex=patterns))
            path = Path(tmp) / "model.onnx"
            edgeq_compile(float_path, "x86-vnni", options, calibration=calibration).save(path)
            rows.append((f"W8A8, kept high: {label}", window_perplexity(path, shared, windows)))
    click.echo("\n".join([*header, load_line("at end"), ""]))
    click.echo(f"SmolLM2 W8A8 ({method} ranges), perplexity on windows 0..{windows - 1}\n")
    click.echo("| variant | perplexity |\n|---|---|")
    click.echo("\n".join(f"| {label} | {ppl:.2f} |" for label, ppl in rows))


if __name__ == "__main__":
    main()
