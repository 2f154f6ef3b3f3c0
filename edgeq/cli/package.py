"""`edgeq package COMPILED -o DIR --genai | --platform android|ios`: the folder an app's runtime
loads (edgeq.packaging).

Each packaging mode is one flag, its typed options and one function of edgeq.packaging;
`--genai` writes the folder onnxruntime-genai generates with; `--platform android|ios` a mobile
app's package (edgeq.packaging.mobile: the .ort model, the operator config of a reduced build, the
mobile providers' usability report, the app's facts, the EP-context model of an NPU target)."""

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


def _only_for(chosen: str, mode: str, given: dict[str, bool]) -> None:
    """Options of another mode are an error, not silently ignored."""
    stray = [name for name, on in given.items() if on]
    if chosen != mode and stray:
        raise OptionError(f"{', '.join(stray)} applies to --{mode} only", fix=f"drop it, or package with --{mode}")


@click.command(name="package")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write (new, empty, or with --overwrite an earlier package).")
@click.option("--genai", "genai", is_flag=True,
              help="An onnxruntime-genai folder: model.onnx, genai_config.json, tokenizer files.")
@click.option("--platform", type=click.Choice(["android", "ios"]), default=None,
              help="A mobile app's package: model.ort, the operator config of a reduced build, the mobile "
                   "providers' usability report, model facts, README with Kotlin/Swift calls.")
@click.option("--target", "-t", "mobile_target", default=None,
              help="--platform: the target it is packaged for (default: the one compiled for; another must "
                   "accept the model's Q/DQ).")
@click.option("--static-shapes", is_flag=True,
              help="--platform: fix dynamic input dims to the shapes the compile recorded (NNAPI needs them).")
@click.option("--input-shape", "input_shape", multiple=True,
              help="--platform: NAME=D0,D1,... for a dynamic input (repeatable; default: the shapes the compile "
                   "recorded).")
@click.option("--ep-context/--no-ep-context", "ep_context", default=None,
              help="--platform: write the EP-context model (default: where the target's provider writes one, "
                   "e.g. qnn-htp).")
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="tokenizer.json to ship (a tokenizer_config.json / config.json beside it is read too).")
@click.option("--context-length", type=click.IntRange(min=2), default=2048, show_default=True,
              help="Longest sequence the generation loop runs.")
@click.option("--provider", default=None,
              help="--genai: provider in the session options (cpu, openvino, qnn, ...); --platform: the provider "
                   "the app adds (nnapi, qnn, coreml, xnnpack, cpu). Default: the one compiled for.")
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
                    as_json: bool, platform: str | None = None, mobile_target: str | None = None,
                    static_shapes: bool = False, ep_context: bool | None = None,
                    input_shape: tuple[str, ...] = ()) -> None:
    """Package a compiled MODEL for the runtime an app uses: --genai for onnxruntime-genai (a
    decoder with a KV cache, e.g. compiled from `edgeq models build smollm2-kv`); --platform
    android|ios for a mobile app (ONNX Runtime's .ort format)."""
    chosen = _modes(genai=genai, platform=platform is not None)
    _only_for(chosen, "platform", {"--target": mobile_target is not None, "--static-shapes": static_shapes,
                                   "--ep-context/--no-ep-context": ep_context is not None,
                                   "--input-shape": bool(input_shape)})
    _only_for(chosen, "genai", {"--bos-token-id": bos_token_id is not None, "--eos-token-id": eos_token_id is not None,
                                "--pad-token-id": pad_token_id is not None,
                                "--num-attention-heads": num_attention_heads is not None, "--no-fuse": not fuse})
    if chosen == "genai":
        from edgeq.packaging.genai import GenaiOptions, package_genai

        options = GenaiOptions(context_length=context_length, provider=provider, bos_token_id=bos_token_id,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                               num_attention_heads=num_attention_heads, fuse=fuse, overwrite=overwrite)
        package = package_genai(model, output, options, tokenizer=tokenizer)
    if chosen == "platform":
        from edgeq.cli.flags import parse_input_shapes
        from edgeq.packaging.mobile import MobileOptions, package_mobile

        shapes = tuple((name, tuple(dims)) for name, dims in parse_input_shapes(input_shape).items())
        options = MobileOptions(platform=platform, target=mobile_target, provider=provider,
                                static_shapes=static_shapes, ep_context=ep_context, input_shapes=shapes,
                                overwrite=overwrite)
        package = package_mobile(model, output, options, tokenizer=tokenizer)
    if as_json:
        echo_json(package.to_dict())
    else:
        click.echo(package.to_text())
