"""`edgeq package COMPILED -o DIR --genai`: the folder an app's runtime loads (edgeq.packaging).

Each packaging mode is one flag, its typed options and one function of edgeq.packaging;
`--genai` writes the folder onnxruntime-genai generates with. A mode for mobile apps
(`--platform android|ios`: the .ort model, the operator config, the mobile providers' usability
report) is added beside it: its flag in `_modes`, its options and its call in `package_command`."""

from __future__ import annotations

from pathlib import Path

import click

from edgeq.cli.flags import echo_json
from edgeq.errors import OptionError


def _modes(**flags: bool) -> str:
    """The one mode asked for."""
    chosen = [name for name, on in flags.items() if on]
    if len(chosen) != 1:
        raise OptionError("choose one packaging mode" if not chosen else f"choose one packaging mode, not {', '.join(chosen)}",
                          fix=f"pass one of {', '.join('--' + name for name in flags)}")
    return chosen[0]


@click.command(name="package")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write (new, empty, or with --overwrite an earlier package).")
@click.option("--genai", "genai", is_flag=True,
              help="An onnxruntime-genai folder: model.onnx, genai_config.json, tokenizer files.")
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="tokenizer.json to ship (a tokenizer_config.json / config.json beside it is read too).")
@click.option("--context-length", type=click.IntRange(min=2), default=2048, show_default=True,
              help="Longest sequence the generation loop runs.")
@click.option("--provider", default=None,
              help="Provider in the session options (cpu, openvino, qnn, ...; default: the one compiled for).")
@click.option("--bos-token-id", type=int, default=None, help="Default: from the tokenizer.")
@click.option("--eos-token-id", type=int, default=None, help="Default: from the tokenizer.")
@click.option("--pad-token-id", type=int, default=None, help="Default: from the tokenizer, else the EOS id.")
@click.option("--num-attention-heads", type=click.IntRange(min=1), default=None,
              help="Query heads (default: read from the head split in the graph).")
@click.option("--fuse/--no-fuse", default=True, show_default=True,
              help="Lay RMSNorm and attention with its cache out as ONNX Runtime's fused kernels.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier package in the folder.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable list of the files written.")
def package_command(model: Path, output: Path, genai: bool, tokenizer: Path | None, context_length: int,
                    provider: str | None, bos_token_id: int | None, eos_token_id: int | None,
                    pad_token_id: int | None, num_attention_heads: int | None, fuse: bool, overwrite: bool,
                    as_json: bool) -> None:
    """Package a compiled MODEL for the runtime an app uses: --genai for onnxruntime-genai (a
    decoder with a KV cache, e.g. compiled from `edgeq models build smollm2-kv`)."""
    chosen = _modes(genai=genai)
    if chosen == "genai":
        from edgeq.packaging.genai import GenaiOptions, package_genai

        options = GenaiOptions(context_length=context_length, provider=provider, bos_token_id=bos_token_id,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                               num_attention_heads=num_attention_heads, fuse=fuse, overwrite=overwrite)
        package = package_genai(model, output, options, tokenizer=tokenizer)
    if as_json:
        echo_json(package.to_dict())
    else:
        click.echo(package.to_text())
