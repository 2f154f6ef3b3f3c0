"""`edgeq bench`: latency and throughput of float and compiled models on the target's runtimes,
interleaved in one run, with the best float path on this machine as the baseline
(edgeq.runtime.benchmark)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from edgeq.cli.flags import echo_json
from edgeq.errors import OptionError


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """One `--shape NAME=DIMS` (DIMS as 16x128 or 16,128)."""
    name, _, dims = text.partition("=")
    parts = [p for p in re.split(r"[x,]", dims.strip()) if p]
    if not name.strip() or not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise OptionError(f"--shape {text!r} is not NAME=DIMS", fix="e.g. --shape input_ids=16x128")
    return name.strip(), tuple(int(p) for p in parts)


@click.command(name="bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--target", "-t", "target_name", help="Target whose runtimes to measure on (default: the one the "
                                                    "compiled models recorded).")
@click.option("--provider", "providers", multiple=True,
              help="Run the compiled models on this execution of the target (repeatable; default: the one "
                   "each was compiled for).")
@click.option("--threads", type=int, default=0, show_default=True,
              help="Threads per session (0: each runtime's default).")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=DIMS",
              help="Input shape, e.g. input_ids=16x128 (repeatable; inputs sharing dims follow only if given). "
                   "Default: the shapes the compile recorded, else batch 1 x 128 tokens for text models.")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed runs per row first.")
@click.option("--repeats", type=int, default=9, show_default=True, help="Timed rounds (one run of every row each).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench_command(models: tuple[Path, ...], target_name: str | None, providers: tuple[str, ...], threads: int,
                  shapes: tuple[str, ...], warmup: int, repeats: int, as_json: bool) -> None:
    """Latency and throughput of MODELS (float and compiled) on their runtimes."""
    from edgeq.ir import load
    from edgeq.registry import get_target
    from edgeq.runtime.benchmark import bench

    target = get_target(target_name) if target_name else None
    given = dict(parse_shape(text) for text in shapes)
    for path in models:
        load(path)  # clear errors for missing or broken files before running anything
    result = bench(models, target, providers=providers, threads=threads, shapes=given, warmup=warmup,
                   repeats=repeats)
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(result.table())
