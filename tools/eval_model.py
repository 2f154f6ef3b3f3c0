"""Evaluate one ONNX file on an edgeq task: accuracy, file size, time and peak memory.

    python tools/eval_model.py MODEL.onnx --task smollm2
    python tools/eval_model.py MODEL.onnx --task minilm [--reference FLOAT.onnx]

SmolLM2: perplexity on WikiText-2 windows 0..31 of 256 tokens. MiniLM: cosine of 256 paragraph
embeddings to the reference model's (default: the float MiniLM edgeq builds, cached).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_SHARED, load_line, markdown_table, run_header  # noqa: E402

from edgeq.models import evaluation  # noqa: E402
from edgeq.errors import EdgeqError  # noqa: E402
from edgeq.models import catalog  # noqa: E402


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--task", type=click.Choice(["smollm2", "minilm"]), required=True)
@click.option("--reference", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="MiniLM only: the float model whose embeddings are the reference.")
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=DEFAULT_SHARED, show_default=True, help="The team's shared/ folder.")
@click.option("--threads", type=int, default=0, show_default=True,
              help="ONNX Runtime intra-op threads (0: its default).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def main(model: Path, task: str, reference: Path | None, shared: Path, threads: int,
         as_json: bool) -> None:
    """Accuracy, file size, time and peak memory of MODEL on the edgeq task."""
    try:
        result = _evaluate(model, task, reference, shared, threads)
    except EdgeqError as err:
        raise click.ClickException(str(err)) from err
    if as_json:
        click.echo(json.dumps(result.row(), indent=2))
        return
    click.echo("\n".join([*run_header(), load_line("at end")]) + "\n")
    click.echo(markdown_table([(task, model.name, result)]))


def _evaluate(model: Path, task: str, reference: Path | None, shared: Path,
              threads: int) -> evaluation.EvalResult:
    if task == "smollm2":
        return evaluation.evaluate_smollm2(model, shared, threads)
    float_model = reference or catalog.cached("minilm")
    ref = evaluation.evaluate_minilm(float_model, shared, threads=threads).outputs
    return evaluation.evaluate_minilm(model, shared, ref, threads)


if __name__ == "__main__":
    main()
