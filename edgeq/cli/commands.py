"""CLI verbs that do the work: compile, eval, estimate, models. Flags -> typed options -> library."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import click

from edgeq.cli import _echo_json, cli
from edgeq.errors import OptionError
from edgeq.options import SMOOTH_SEARCH_GRID, CompileOptions, PrecisionOverrides


def _check_writable(path: Path | None) -> None:
    """Fail before the long work when an output's folder cannot be created or written."""
    if path is None:
        return
    parent = path.resolve().parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise OptionError(f"cannot write {path}: {existing} is a file, not a folder", fix="check the paths given")
    if existing is not None and not os.access(existing, os.W_OK):
        raise OptionError(f"cannot write {path}: {existing} is not writable", fix="check the paths given")


def _calibration_spec(calib: Path | None, calib_text: Path | None, tokenizer: Path | None, seq_len: int,
                      samples: int, first_window: int):
    """What `open_source` takes, from the calibration flags."""
    if calib is not None and calib_text is not None:
        raise OptionError("give either --calib or --calib-text, not both")
    if calib_text is not None:
        if tokenizer is None:
            raise OptionError("--calib-text needs --tokenizer tokenizer.json")
        from edgeq.calibration.sources import TextWindows

        return TextWindows(text=calib_text, tokenizer=tokenizer, seq_len=seq_len, num_samples=samples,
                           first_window=first_window)
    return str(calib) if calib is not None else None


_calibration_flags = [
    click.option("--calib", type=click.Path(path_type=Path),
                 help="Calibration data: a directory of .npz (one sample each) or one .npz with a sample axis."),
    click.option("--calib-text", type=click.Path(path_type=Path), help="Text file to calibrate a language model."),
    click.option("--tokenizer", type=click.Path(path_type=Path), help="tokenizer.json for --calib-text."),
    click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per text window."),
    click.option("--samples", type=int, default=16, show_default=True, help="Text windows to use."),
    click.option("--first-window", type=int, default=0, show_default=True,
                 help="Index of the first text window (keep calibration apart from evaluation)."),
]


def _with_flags(flags):
    def decorate(fn):
        for flag in reversed(flags):
            fn = flag(fn)
        return fn
    return decorate


_device_flags = [
    click.option("--device", help="Device or board for a resource/latency estimate (targets whose cost model "
                                  "needs a device, e.g. fpga: zcu102, kv260, ...)."),
    click.option("--fps", type=float, help="Throughput target for the estimate's folding search (with --device)."),
    click.option("--folding", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="FINN-style folding JSON (PE/SIMD per layer) for the estimate (with --device)."),
]


def _check_device_flags(target, device: str | None, fps: float | None, folding: Path | None) -> None:
    """Device flags apply only to a target whose cost model prices a device; fail before any work."""
    needs_device = getattr(target.cost_model, "needs_device", False)
    if device is not None and not needs_device:
        raise OptionError(f"--device applies to targets whose cost model needs a device; target {target.name} "
                          "has none", fix="use --target fpga, or drop --device")
    if (fps is not None or folding is not None) and device is None:
        raise OptionError("--fps and --folding shape the device estimate", fix="add --device D")
    if fps is not None and folding is not None:
        raise OptionError("give either --fps or --folding, not both")
    if device is not None:
        target.cost_model.device(device)  # an unknown device fails now, not after compiling


@cli.command(name="compile")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--target", "-t", "target_name", required=True, help="Target name (see `edgeq targets`).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True)
@_with_flags(_calibration_flags)
@click.option("--weights", type=click.Choice(["int8", "int4"]), help="Weight precision (default: target's).")
@click.option("--group", type=int, help="Block size for block-wise weights (int4 default 128).")
@click.option("--activations", type=click.Choice(["int8", "int16", "float"]), help="Activation precision.")
@click.option("--calib-method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]),
              help="How activation ranges are chosen (default percentile 99.999).")
@click.option("--percentile", type=float, help="Percentile for --calib-method percentile.")
@click.option("--exclude", multiple=True, help="Keep this node high (name; repeatable).")
@click.option("--exclude-regex", multiple=True, help="Keep nodes whose name matches high.")
@click.option("--exclude-op", multiple=True, help="Keep every op of this type high.")
@click.option("--nodes-to-exclude", type=click.Path(path_type=Path),
              help="ONNX Runtime nodes_to_exclude list (JSON list or one name a line).")
@click.option("--tensor-overrides", type=click.Path(path_type=Path),
              help="ONNX Runtime TensorQuantOverrides JSON.")
@click.option("--keep-high", type=int, help="Keep the K most sensitive quantized ops high.")
@click.option("--sensitivity", is_flag=True, help="Rank quantized ops by their error in the report.")
@click.option("--smooth", "smooth_alpha", type=float, help="SmoothQuant with this alpha (e.g. 0.5).")
@click.option("--smooth-search", is_flag=True, help="SmoothQuant with alpha searched per layer (the default, except after a Hadamard rotation).")
@click.option("--no-smooth", is_flag=True, help="No SmoothQuant.")
@click.option("--two-digit", multiple=True, metavar="REGEX",
              help="Quantize these ops' activation input as two int8 digits (integer, 2x MACs, near-int16 accuracy).")
@click.option("--weight-rounding", type=click.Choice(["auto", "rtn", "gptq", "awq", "awq+gptq"]),
              help="Weight rounding: RTN, GPTQ, AWQ, AWQ scaling + GPTQ (these need calibration data); "
                   "default auto: GPTQ for int4 weights given calibration data, else RTN.")
@click.option("--act-order", is_flag=True, help="GPTQ: round input channels by decreasing Hessian diagonal.")
@click.option("--head-weights", type=click.Choice(["int8", "int4"]),
              help="LM head weight precision (default int8, also under --weights int4).")
@click.option("--rotate/--no-rotate", default=None,
              help="Hadamard rotation (QuaRot) of the residual stream/linear inputs first "
                   "(default: the target's choice; x86 rotates int4 presets).")
@click.option("--accuracy-budget", type=float, help="Max relative L2 error; keeps worst ops high until met.")
@click.option("--config", type=click.Path(path_type=Path), help="TOML file of options (flags win).")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), help="Write the report (.json or .md).")
@click.option("--threads", type=int, default=0, help="ONNX Runtime threads for calibration/verification.")
@click.option("--external-data/--no-external-data", default=None, help="Weights in a .data file (default: above 2 GB).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_with_flags(_device_flags)
def compile_command(model: Path, target_name: str, output: Path, calib, calib_text, tokenizer, seq_len, samples,
                    first_window, weights, group, activations, calib_method, percentile, exclude, exclude_regex,
                    exclude_op, nodes_to_exclude, tensor_overrides, keep_high, sensitivity, smooth_alpha,
                    smooth_search, no_smooth, two_digit, weight_rounding, act_order, head_weights, rotate, accuracy_budget, config, report, threads, external_data, as_json,
                    device=None, fps=None, folding=None) -> None:
    """Quantize MODEL for a target and write the QDQ ONNX model to OUTPUT."""
    from edgeq.compiler import compile as compile_model
    from edgeq.registry import get_target

    target = get_target(target_name)  # unknown targets fail before any work
    _check_device_flags(target, device, fps, folding)
    if output.resolve() == model.resolve():
        raise OptionError("the output would overwrite the input model", fix="choose another -o path")
    for path in (output, report):
        _check_writable(path)
    options = CompileOptions.from_toml(config) if config else CompileOptions()
    overrides = options.overrides
    overrides = replace(
        overrides,
        exclude_nodes=overrides.exclude_nodes + tuple(exclude) + (
            PrecisionOverrides.read_nodes_to_exclude(nodes_to_exclude) if nodes_to_exclude else ()),
        exclude_regex=overrides.exclude_regex + tuple(exclude_regex),
        exclude_op_types=overrides.exclude_op_types + tuple(exclude_op),
        tensors=overrides.tensors + (PrecisionOverrides.read_tensor_overrides(tensor_overrides)
                                     if tensor_overrides else ()))
    calibration = replace(options.calibration, **{k: v for k, v in
                                                  (("method", calib_method), ("percentile", percentile)) if v})
    options = replace(options, overrides=overrides, calibration=calibration,
                      **{k: v for k, v in (("weights", weights), ("group", group), ("activations", activations),
                                           ("keep_high", keep_high), ("accuracy_budget", accuracy_budget),
                                           ("threads", threads), ("sensitivity", sensitivity),
                                           ("smooth_alpha", smooth_alpha),
                                           ("weight_rounding", weight_rounding), ("act_order", act_order),
                                           ("head_weights", head_weights),
                                           ("smooth_alpha_grid", SMOOTH_SEARCH_GRID if smooth_search else None),
                                           ("two_digit", tuple(two_digit)))
                         if v})
    if rotate is not None:
        options = replace(options, rotate=rotate)
    if no_smooth:
        options = replace(options, smooth_alpha=None, smooth_alpha_grid=())
    spec = _calibration_spec(calib, calib_text, tokenizer, seq_len, samples, first_window)
    compiled = compile_model(model, target, options, calibration=spec)
    compiled.save(output, external_data=external_data)
    if report:
        compiled.report.write(report)
    estimate = target.cost_model.estimate(output, device, fps=fps, folding=folding) if device else None
    if as_json:
        if estimate is None:
            click.echo(compiled.report.to_json())
        else:
            _echo_json({"report": compiled.report.to_dict(), "estimate": estimate.to_dict()})
        return
    click.echo(f"wrote {output}")
    for line in compiled.report.summary_lines():
        click.echo("  " + line)
    if estimate is not None:
        click.echo(estimate.to_text())
    elif getattr(target.cost_model, "needs_device", False):
        click.echo(f"  (add --device D for the resources and latency of {target.name} on a device)")


@cli.command(name="eval")
@click.argument("float_model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("compiled_model", type=click.Path(dir_okay=False, path_type=Path))
@_with_flags(_calibration_flags)
@click.option("--max-samples", type=int, default=8, show_default=True)
@click.option("--threads", type=int, default=0)
@click.option("--json", "as_json", is_flag=True)
def eval_command(float_model: Path, compiled_model: Path, calib, calib_text, tokenizer, seq_len, samples,
                 first_window, max_samples, threads, as_json) -> None:
    """Compare COMPILED_MODEL with FLOAT_MODEL on data (error per output)."""
    from edgeq.calibration.sources import open_source
    from edgeq.ir import load
    from edgeq.runtime.sessions import synthetic_feeds, verify

    for path in (float_model, compiled_model):
        load(path)  # clear errors for missing or broken files before running anything
    spec = _calibration_spec(calib, calib_text, tokenizer, seq_len, samples, first_window)
    if spec is None:
        feeds, synthetic = synthetic_feeds(float_model, max_samples), True
    else:
        feeds = [f for _, f in zip(range(max_samples), open_source(spec, str(float_model)))]
        synthetic = False
    result = verify(float_model, compiled_model, feeds, threads=threads, synthetic=synthetic)
    if as_json:
        _echo_json({"samples": result.samples, "synthetic_inputs": result.synthetic_inputs,
                    "outputs": [o.__dict__ for o in result.outputs]})
        return
    click.echo(f"{result.samples} sample(s){' (synthetic inputs)' if synthetic else ''}")
    for o in result.outputs:
        click.echo(f"  {o.name}: rel L2 {o.relative_l2:.5f}  cosine mean {o.cosine_mean:.6f} min {o.cosine_min:.6f}"
                   f"  SQNR {o.sqnr_db:.2f} dB  max abs {o.max_abs:.4g}")


@cli.command(name="estimate")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--target", "-t", "target_name", required=True, help="Target whose cost model prices MODEL (fpga).")
@click.option("--device", required=True, help="Device or board (see `edgeq fpga devices`).")
@click.option("--fps", type=float, help="Throughput target for the folding search.")
@click.option("--folding", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="FINN-style folding JSON (PE/SIMD per layer).")
@click.option("--input-shape", multiple=True,
              help="NAME=D0,D1,... for symbolic inputs (default: the shapes recorded at compile time).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def estimate_command(model: Path, target_name: str, device: str, fps: float | None, folding: Path | None,
                     input_shape: tuple[str, ...], as_json: bool) -> None:
    """Resources and latency of a compiled (QDQ or integer) MODEL on a device, with the template and
    assumptions that produced them."""
    from edgeq.backends.fpga.cli import _parse_shapes
    from edgeq.registry import get_target

    target = get_target(target_name)
    _check_device_flags(target, device, fps, folding)
    report = target.cost_model.estimate(model, device, fps=fps, folding=folding,
                                        input_shapes=_parse_shapes(input_shape) or None)
    click.echo(report.to_json() if as_json else report.to_text())


def _attach_models_group() -> None:
    try:
        from edgeq.models.cli import models_group
    except ImportError:
        return
    cli.add_command(models_group, name="models")


def _attach_fpga_group() -> None:
    from edgeq.backends.fpga.cli import main as fpga_group

    cli.add_command(fpga_group, name="fpga")


_attach_models_group()
_attach_fpga_group()
