"""Command line of the FPGA estimator: `python -m edgeq.backends.fpga estimate|devices|reference`.

Only argument handling lives here; the work is done by edgeq.backends.fpga.estimate. The group can be
mounted as `edgeq estimate` by the main CLI.
"""

from __future__ import annotations

import sys

import click

from edgeq.errors import EdgeqError
from edgeq.backends.fpga.estimate import TEMPLATES, estimate_onnx
from edgeq.backends.fpga.devices import CATALOG, device_names


def _parse_shapes(values: tuple[str, ...]) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for value in values:
        name, _, dims = value.partition("=")
        if not name or not dims:
            raise click.BadParameter(f"'{value}' is not NAME=D0,D1,...", param_hint="--input-shape")
        shapes[name] = [int(d) for d in dims.split(",")]
    return shapes


@click.group()
def main() -> None:
    """FPGA resource and latency estimates (dataflow / overlay templates)."""


@main.command("estimate")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--device", required=True, help="device or board: " + ", ".join(device_names()))
@click.option("--template", type=click.Choice(TEMPLATES), default="auto", show_default=True)
@click.option("--fps", type=float, default=None, help="throughput target for the folding search")
@click.option("--folding", type=click.Path(exists=True, dir_okay=False), default=None,
              help="FINN-style folding JSON (PE/SIMD per layer)")
@click.option("--clock-mhz", type=float, default=None, help="override the device clock")
@click.option("--input-shape", multiple=True, help="NAME=D0,D1,... for symbolic inputs")
@click.option("--json", "as_json", is_flag=True, help="machine-readable report")
@click.option("--markdown", is_flag=True, help="markdown report")
def estimate_command(model: str, device: str, template: str, fps: float | None,
                     folding: str | None, clock_mhz: float | None, input_shape: tuple[str, ...],
                     as_json: bool, markdown: bool) -> None:
    """Estimate LUT/FF/DSP/BRAM/URAM and latency of a quantized ONNX MODEL on a device."""
    try:
        report = estimate_onnx(model, device, input_shapes=_parse_shapes(input_shape) or None,
                               template=template, fps=fps, folding=folding, clock_mhz=clock_mhz)
    except EdgeqError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    if as_json:
        click.echo(report.to_json())
    elif markdown:
        click.echo(report.to_markdown())
    else:
        click.echo(report.to_text())


@main.command("devices")
def devices_command() -> None:
    """List the device catalog with its sources."""
    for device in CATALOG.values():
        counts = {k: getattr(device, k).value for k in ("lut", "ff", "bram18", "uram", "dsp")}
        click.echo(f"{device.key} ({device.board}, {device.part}): {counts}, clock "
                   f"{device.clock_mhz.value} MHz, DRAM {device.dram_gbps.value} GB/s")
        for field, source in device.sources().items():
            click.echo(f"    {field}: {source}")


@main.command("reference")
def reference_command() -> None:
    """Print the UNSW-NB15 (FINN) and FQ-BERT comparisons against published measurements."""
    from edgeq.backends.fpga.reference import must_show_text

    click.echo(must_show_text())
