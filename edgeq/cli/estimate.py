"""`edgeq estimate`: what a compiled model costs on a target, from the target's cost model
(`cost_model.estimate(model, input_shapes=..., **device flags given)`), for any target that has
one; a cost model that prices a device needs `--device`."""

from __future__ import annotations

from pathlib import Path

import click

from edgeq.cli.flags import DeviceFlags, device_flags, parse_input_shapes
from edgeq.errors import OptionError


def _cost_model(target):
    """The target's cost model; a target without one is a user error naming those that have one."""
    if target.cost_model is not None:
        return target.cost_model
    from edgeq.registry import targets

    priced = [name for name, t in targets().items() if t.cost_model is not None]
    raise OptionError(f"target {target.name} has no cost model",
                      fix=f"use a target that has one: {', '.join(priced) or 'none is installed'}")


@click.command(name="estimate")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--target", "-t", "target_name", required=True,
              help="Target whose cost model prices MODEL (see `edgeq targets`).")
@device_flags
@click.option("--input-shape", multiple=True,
              help="NAME=D0,D1,... for symbolic inputs (default: the shapes recorded at compile time).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def estimate_command(model: Path, target_name: str, device: DeviceFlags, input_shape: tuple[str, ...],
                     as_json: bool) -> None:
    """Cost of a compiled (QDQ or integer) MODEL on a target, from the target's cost model (for a
    cost model that prices a device: resources and latency on --device, with the template and
    assumptions that produced them)."""
    from edgeq.registry import get_target

    target = get_target(target_name)
    cost_model = _cost_model(target)
    device.check(target, device_required=True)
    report = cost_model.estimate(model, input_shapes=parse_input_shapes(input_shape) or None, **device.given())
    click.echo(report.to_json() if as_json else report.to_text())
