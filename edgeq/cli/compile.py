"""`edgeq compile`: flags -> typed options (edgeq.cli.option_flags) -> `edgeq.compile`, then the
model, the report, the device estimate of a cost model that prices one, and pass times.

Progress goes to stderr: on a terminal each pass as it runs and a bar for its long steps
(calibration runs, GPTQ layers, rotation probes, verification); elsewhere nothing, unless
--verbose (one plain line per pass and step, with the passes' stats). --quiet shows neither
progress nor the summary. The outputs are written at the end, with Ctrl-C/SIGTERM held until
they are complete (edgeq.cli.interrupts)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from edgeq.cli.flags import CalibrationFlags, DeviceFlags, calibration_flags, device_flags, echo_json
from edgeq.cli.option_flags import compile_options
from edgeq.errors import OptionError


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


# The flags between --weights and --accuracy-budget (and --threads) set CompileOptions fields:
# edgeq.cli.option_flags.FLAG_FIELDS says which.
@click.command(name="compile")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--target", "-t", "target_name", required=True, help="Target name (see `edgeq targets`).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True)
@calibration_flags
@click.option("--weights", type=click.Choice(["int8", "int4", "nf4", "fp8"]),
              help="Weight precision (default: target's); nf4: 4-bit NormalFloat blocks (MatMulBnb4), "
                   "fp8: float8 E4M3FN.")
@click.option("--group", type=int, help="Block size for block-wise weights (int4 default 128).")
@click.option("--activations", type=click.Choice(["int8", "int16", "float", "fp8"]),
              help="Activation precision (fp8: float8 E4M3FN, with --weights fp8).")
@click.option("--calib-method", type=click.Choice(["auto", "minmax", "percentile", "entropy", "mse"]),
              help="How activation ranges are chosen (default auto: percentile 99.999 for 8-bit activations, "
                   "min/max for 16-bit ones; a method named here is used at every width).")
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
@click.option("--weight-group", multiple=True, metavar="REGEX=N[:asym|:sym]",
              help="Linears whose name matches REGEX take block-wise weights in blocks of N instead of --group's, "
                   "with zero points (:asym) or without (:sym) (repeatable; the first match wins), "
                   "e.g. 'down_proj|lm_head=32:asym'.")
@click.option("--weight-zero-points", is_flag=True,
              help="Weights with a zero point per block (asymmetric int4, as llama.cpp's Q4_1), where the "
                   "target's runtime takes them (x86, ARM: int4).")
@click.option("--no-online-rotations", is_flag=True,
              help="Rotate only where the rotation folds into weights (a decoder's residual stream, the per-head "
                   "V/O fold): no online Hadamard before o_proj/down_proj, nothing added to a decode step.")
@click.option("--rotate/--no-rotate", default=None,
              help="Hadamard rotation (QuaRot) of the residual stream/linear inputs first "
                   "(default: the target's choice; some targets rotate int4 presets).")
# An optional value: a bare --decompose-outliers takes LLM.int8's 6.0; the text is parsed by
# edgeq.options (a bad threshold is a one-line OptionError, not a click usage error).
@click.option("--decompose-outliers", "decompose_outliers", is_flag=False, flag_value="6.0", default=None,
              metavar="[THRESHOLD]",
              help="LLM.int8-style decomposition: input columns of quantized linears with calibrated |x| above "
                   "THRESHOLD (default 6.0) run in float, the rest in int8; instead of the rotation unless "
                   "--rotate is given too.")
@click.option("--decompose-scales", "decompose_scales", type=click.Choice(["token", "tensor"]), default=None,
              help="With --decompose-outliers: the int8 part's activation scales, per token at run time "
                   "(token, LLM.int8's vector-wise int8; the default) or the target's static per-tensor QDQ (tensor).")
@click.option("--accuracy-budget", type=float, help="Max relative L2 error; keeps worst ops high until met.")
@click.option("--size-budget", metavar="MB|RATIO",
              help="Compiled model size: megabytes (120) or a ratio of the float model (0.22 or 22%); each "
                   "linear's weights go to int4, int8 or float to meet it at the least error (with --weights int4).")
@click.option("--latency-budget", metavar="MS",
              help="Latency on --device as the target's cost model estimates it (fpga), in milliseconds; each "
                   "linear's weights go to int4 or int8 to meet it at the least error (with --weights int4).")
@click.option("--input-shape", multiple=True, metavar="NAME=D0,D1,...",
              help="Fix an input's dynamic dims (repeatable); inputs sharing a dim name follow. Recorded for "
                   "estimates (default: the first calibration sample's shapes).")
@click.option("--config", type=click.Path(path_type=Path), help="TOML file of options (flags win).")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), help="Write the report (.json or .md).")
@click.option("--threads", type=int, default=0, help="ONNX Runtime threads for calibration/verification.")
@click.option("--provider", help="Where the output runs: one of the target's executions (`edgeq targets show T`; "
                                 "default: the first that runs here, e.g. openvino, else cpu).")
@click.option("--external-data/--no-external-data", default=None, help="Weights in a .data file (default: above 2 GB).")
@click.option("--ep-context", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the provider's precompiled model (ONNX Runtime EP context: one node holding the NPU's "
                   "compiled graph, loaded without compiling on the device; qnn-htp).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--time-passes", is_flag=True, help="Print each pass's wall time (with --json: a pass_seconds list).")
@click.option("--quiet", "-q", is_flag=True, help="No progress and no summary (errors only).")
@click.option("--verbose", "-v", is_flag=True,
              help="Progress as plain lines also when not on a terminal, each pass's stats, the options "
                   "as decided and the pass times.")
@device_flags
def compile_command(model: Path, target_name: str, output: Path, *, calibration: CalibrationFlags,
                    device: DeviceFlags, config: Path | None, report: Path | None, external_data: bool | None,
                    as_json: bool, time_passes: bool, provider: str | None, quiet: bool, verbose: bool,
                    ep_context: Path | None = None, **option_flags) -> None:
    """Quantize MODEL for a target and write the QDQ ONNX model to OUTPUT."""
    from edgeq.cli.interrupts import committing, note_written
    from edgeq.cli.pass_times import PassTimes
    from edgeq.compiler import compile as compile_model
    from edgeq.pipeline import ProgressInstrument
    from edgeq.registry import get_target
    from edgeq.report import report_format

    from edgeq.runtime.providers import for_device, resolve

    if quiet and verbose:
        raise OptionError("give either --quiet or --verbose, not both")
    if report is not None:
        report_format(report)  # an unknown suffix fails before any work
    target = get_target(target_name)  # unknown targets fail before any work
    execution = resolve(target, provider)  # so does a provider that cannot run here
    device.check(target, device_required=False)
    # --device of an NPU execution picks the generation/SoC it compiles for (an unknown one fails now)
    npu_device = for_device(execution, device.device).device if execution.devices else None
    name_device = getattr(target.cost_model, "device", None)  # a device cost model's catalog lookup
    if device.device is not None and name_device is not None:
        name_device(device.device)  # an unknown device fails now, not after compiling
    if output.resolve() == model.resolve():
        raise OptionError("the output would overwrite the input model", fix="choose another -o path")
    if ep_context is not None and ep_context.resolve() in (output.resolve(), model.resolve()):
        raise OptionError("--ep-context would overwrite the input or the output model", fix="choose another path")
    for path in (output, report, ep_context):
        _check_writable(path)
    options = compile_options(option_flags, config)
    timing = PassTimes() if time_passes or verbose else None
    progress = None if quiet else ProgressInstrument(verbose=verbose)
    instruments = tuple(i for i in (progress, timing) if i is not None)
    spec = calibration.spec()
    if progress is not None and (progress.live or progress.verbose):
        progress.write(f"compiling {model.name} for {target.name}"
                       + (f" ({provider})" if provider else "") + _calibration_text(spec, options.calibration.holdout))
    try:
        compiled = compile_model(model, target, options, calibration=spec, instruments=instruments,
                                 provider=provider, device=npu_device,
                                 cost_device=device.device if name_device is not None else None)
    finally:
        if progress is not None:
            progress.close()
    with committing():  # Ctrl-C/SIGTERM wait until both files are complete
        compiled.save(output, external_data=external_data)
        note_written(output)
        if report:
            compiled.report.write(report)
            note_written(report)
        if ep_context is not None:
            from edgeq.runtime.ep_context import write_ep_context

            write_ep_context(output, compiled.target.execution, ep_context, threads=options.threads)
            note_written(ep_context)
    estimate = (target.cost_model.estimate(output, input_shapes=None, **device.given())
                if device.device is not None and npu_device is None else None)
    if as_json:
        if estimate is None and timing is None:
            click.echo(compiled.report.to_json())
            return
        data = (json.loads(compiled.report.to_json()) if estimate is None else
                {"report": compiled.report.to_dict(), "estimate": json.loads(estimate.to_json())})
        if timing is not None:
            data["pass_seconds"] = timing.to_json()
        echo_json(data)
        return
    if quiet:
        return
    click.echo(f"wrote {output}")
    if report:
        click.echo(f"  report: {report}")
    if ep_context is not None:
        click.echo(f"  EP context model: {ep_context}")
    click.echo(f"  time: {compiled.report.total_seconds:.1f} s")
    for line in compiled.report.summary_lines():
        click.echo("  " + line)
    if verbose:
        click.echo("options as decided:")
        for key, value in compiled.report.settings.items():
            click.echo(f"  {key}: {value}")
    if timing is not None:
        for line in timing.text_lines():
            click.echo(line)
    if estimate is not None:
        click.echo(estimate.to_text())
    elif target.cost_model is not None and target.cost_model.needs_device:
        click.echo(f"  (add --device D for the resources and latency of {target.name} on a device)")


def _calibration_text(spec, holdout: int) -> str:
    """The calibration data in the first progress line."""
    from edgeq.calibration.sources import TextWindows

    if spec is None:
        return ", no calibration data"
    if isinstance(spec, TextWindows):
        return (f", calibrating on {spec.num_samples} windows of {spec.seq_len} tokens of {Path(spec.text).name} "
                f"(the last {holdout} held out to verify)")
    return f", calibrating on {spec}"
