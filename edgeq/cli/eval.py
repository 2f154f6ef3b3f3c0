"""`edgeq eval`: a compiled model against its float model on data (error per output)."""

from __future__ import annotations

from pathlib import Path

import click

from edgeq.cli.flags import CalibrationFlags, calibration_flags, echo_json


@click.command(name="eval")
@click.argument("float_model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("compiled_model", type=click.Path(dir_okay=False, path_type=Path))
@calibration_flags
@click.option("--max-samples", type=int, default=8, show_default=True)
@click.option("--threads", type=int, default=0)
@click.option("--target", "-t", "target_name", help="Target whose runtime runs both (default: the one recorded).")
@click.option("--provider", help="The target's execution to run on (default: the one the compile recorded).")
@click.option("--json", "as_json", is_flag=True)
def eval_command(float_model: Path, compiled_model: Path, calibration: CalibrationFlags, max_samples: int,
                 threads: int, target_name: str | None, provider: str | None, as_json: bool) -> None:
    """Compare COMPILED_MODEL with FLOAT_MODEL on data (error per output): the float model at full
    precision and the compiled one with the deployment settings, on the same runtime. Without
    --calib/--calib-text both run on random inputs (a warning says so)."""
    from edgeq.calibration.sources import open_source
    from edgeq.ir import load
    from edgeq.runtime.feeds import synthetic_feeds
    from edgeq.runtime.verification import compare_with_float

    from edgeq.runtime.model_execution import for_model

    for path in (float_model, compiled_model):
        load(path)  # clear errors for missing or broken files before running anything
    metadata = dict(load(compiled_model).model.metadata_props)
    execution, where = for_model(metadata, target_name, provider)
    spec = calibration.spec()
    if spec is None:
        click.echo(no_data_warning(metadata), err=True)
        feeds, synthetic = synthetic_feeds(float_model, max_samples), True
    else:
        feeds = [f for _, f in zip(range(max_samples), open_source(spec, str(float_model)))]
        synthetic = False
    result = compare_with_float(float_model, compiled_model, feeds, threads=threads, synthetic=synthetic,
                                execution=execution)
    if as_json:
        echo_json({"samples": result.samples, "synthetic_inputs": result.synthetic_inputs,
                   "provider": execution.name, "runtime": where, "outputs": [o.__dict__ for o in result.outputs]})
        return
    click.echo(f"{result.samples} sample(s){' (synthetic inputs)' if synthetic else ''}")
    for o in result.outputs:
        click.echo(f"  {o.name}: rel L2 {o.relative_l2:.5f}  cosine mean {o.cosine_mean:.6f} min {o.cosine_min:.6f}"
                   f"  SQNR {o.sqnr_db:.2f} dB  max abs {o.max_abs:.4g}")
    click.echo(where)


def no_data_warning(metadata: dict[str, str]) -> str:
    """What eval says when it is given no data: random inputs, and how to give real ones (naming
    the data the compile calibrated on, where the model records it)."""
    import json

    from edgeq.metadata import CALIBRATION_KEY

    text = ("warning: no data given, so both models run on random inputs, whose error can be far from the error "
            "on real data (several times larger on text models); give --calib DIR|FILE.npz (samples keyed by the "
            "model's input names; one .npz whose arrays have a leading sample or batch axis works) or --calib-text "
            "FILE --tokenizer tokenizer.json [--seq-len N --first-window W]")
    try:
        record = json.loads(metadata.get(CALIBRATION_KEY, "null")) or {}
    except ValueError:
        record = {}
    if record.get("source"):
        text += f" (the compile calibrated on {record['source']}"
        text += f" with {record['tokenizer']})" if record.get("tokenizer") else ")"
    return text
