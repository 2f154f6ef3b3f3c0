"""What the plain command gives on MiniLM (issue 16): each float export compiled for x86 with no
flag but the calibration data, and with `--rotate`; cosine of the 256 evaluation paragraph
embeddings to that export's own float model, then the speed of float / plain / rotated in one
interleaved `edgeq bench` run.

    python tools/bench_defaults.py EXPORT.onnx... --calib DIR [--target x86-vnni] [--threads 2]

EXPORT: any float MiniLM (the `torch.onnx` exports, ORT's fused graph, `edgeq models build minilm`).
DIR: calibration samples (.npz per sample, e.g. 16 WikiText paragraphs of 128 tokens).
The SmolLM2 side of the issue (plain W8A8, W4A16, W4A8 with 16 windows) is
`tools/bench_smollm2_ptq.py --variants "plain-w8a8 (no flag),plain-w4a16,plain-w4a8"`.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_SHARED, load_line, run_header  # noqa: E402

from edgeq.models import evaluation  # noqa: E402

VARIANTS = {"plain": [], "--rotate": ["--rotate"]}


def _edgeq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeq.cli", *args], capture_output=True, text=True)


@click.command()
@click.argument("exports", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--calib", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--target", default="x86-vnni", show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path), default=DEFAULT_SHARED)
def main(exports: tuple[Path, ...], calib: Path, target: str, threads: int, shared: Path) -> None:
    lines = [*run_header(), ""]
    paragraphs = evaluation.minilm_tokenize(evaluation.minilm_eval_paragraphs(shared))
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeq-defaults-") as tmp:
        for export in exports:
            reference = evaluation.measure(export, "embeddings", paragraphs, 1, reference=True).outputs
            compiled = {}
            for name, flags in VARIANTS.items():
                out = Path(tmp) / f"{export.stem}.{name.strip('-')}.onnx"
                done = _edgeq("compile", str(export), "--target", target, "--calib", str(calib), "-o", str(out), *flags)
                notes = [line.strip() for line in done.stdout.splitlines() if line.strip().startswith("rotation:")]
                if done.returncode != 0:
                    rows.append((export.name, name, f"compile failed: {done.stderr.strip()[-300:]}", ""))
                    continue
                result = evaluation.evaluate_minilm(out, shared, reference=reference, threads=1)
                rows.append((export.name, name, f"{result.metrics['cosine_mean']:.5f} "
                             f"(min {result.metrics['cosine_min']:.5f})", "; ".join(notes)))
                compiled[name] = out
            shapes = [f"{n}=16x128" for n in ("input_ids", "attention_mask", "token_type_ids")]
            bench = _edgeq("bench", str(export), *map(str, compiled.values()), "--threads", str(threads), "--repeats", "9",
                           *(arg for s in shapes for arg in ("--shape", s)))
            lines += [f"### {export.name}: speed (`edgeq bench`, 16 x 128, {threads} threads)", "",
                      bench.stdout.strip() or bench.stderr.strip(), ""]
    table = ["| export | variant | cosine over 256 paragraphs | rotation (compile summary) |", "|---|---|---|---|"]
    table += [f"| {e} | {v} | {c} | {n} |" for e, v, c, n in rows]
    click.echo("\n".join([*lines, *table, "", load_line("at end")]))


if __name__ == "__main__":
    main()
