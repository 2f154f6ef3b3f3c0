"""`edgeq passes` and `edgeq targets [show T]`: what is registered (built in or from plugins)."""

from __future__ import annotations

import click

from edgeq.cli.flags import echo_json


@click.command(name="passes")
@click.option("--json", "as_json", is_flag=True)
def passes_command(as_json: bool) -> None:
    """List the registered passes."""
    from edgeq.registry import passes

    rows = {name: cls.description for name, cls in passes().items()}
    if as_json:
        echo_json(rows)
        return
    for name, description in rows.items():
        click.echo(f"{name:<28} {description}")


@click.group(name="targets", invoke_without_command=True)
@click.pass_context
def targets_group(ctx: click.Context) -> None:
    """List the registered targets (`edgeq targets show T` for one)."""
    if ctx.invoked_subcommand is None:
        from edgeq.registry import targets

        found = targets()
        if not found:
            click.echo("no targets installed")
        for name, target in found.items():
            click.echo(f"{name:<14} {target.description}")


@targets_group.command(name="show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def targets_show(name: str, as_json: bool) -> None:
    """Describe target NAME: integer ops and their specs, what stays high, pipeline."""
    from edgeq.registry import get_target
    from edgeq.report import describe_target

    description = describe_target(get_target(name))
    if as_json:
        echo_json(description)
    else:
        click.echo(description["text"])
