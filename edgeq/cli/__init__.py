"""The `edgeq` command line: builds typed options from flags and calls the library.

Exit codes: 0 ok, 2 bad input or usage (one-line message, no traceback), 1 internal error.
`--debug` shows tracebacks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

import edgeq
from edgeq.errors import EdgeqError

_DEBUG = {"on": False}


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(edgeq.__version__, prog_name="edgeq")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def cli(debug: bool) -> None:
    """edgeq: compile float ONNX transformers into quantized QDQ ONNX for edge targets."""
    _DEBUG["on"] = debug


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(model: Path, as_json: bool) -> None:
    """Show what edgeq sees in MODEL: opsets, ops, parameters, inputs/outputs, subgraphs."""
    from edgeq.frontend.inspect import summarize

    summary = summarize(edgeq.load(model, check_runtime=False))
    if as_json:
        _echo_json(summary)
        return
    click.echo(f"{model}  (IR {summary['ir_version']}, {summary['producer'] or 'unknown producer'})")
    click.echo("opsets:   " + ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in summary["opsets"].items()))
    click.echo(f"nodes:    {summary['nodes']} ({summary['subgraphs']} subgraphs)")
    for kind, count in summary["ops"].items():
        click.echo(f"  {kind:<28} {count:>6}")
    click.echo(f"parameters: {summary['parameters_total']:,} ({summary['parameter_bytes_total']:,} bytes)")
    for dtype, entry in summary["parameters"].items():
        click.echo(f"  {dtype:<10} {entry['tensors']:>5} tensors {entry['elements']:>14,} elements "
                   f"{entry['bytes']:>14,} bytes")
    for kind in ("inputs", "outputs"):
        click.echo(f"{kind}:")
        for v in summary[kind]:
            click.echo(f"  {v['name']}: {v['dtype']} {v['shape']}")
    if summary["custom_domains"]:
        click.echo("custom domains: " + ", ".join(f"{d} ({n} ops)" for d, n in summary["custom_domains"].items()))
    if summary["functions"]:
        click.echo("local functions: " + ", ".join(summary["functions"]))
    if summary["recognised_blocks"]:
        click.echo("recognised blocks: " + ", ".join(f"{role} {n}" for role, n in summary["recognised_blocks"].items()))


@cli.command(name="passes")
@click.option("--json", "as_json", is_flag=True)
def list_passes(as_json: bool) -> None:
    """List the registered passes."""
    from edgeq.registry import passes

    rows = {name: cls.description for name, cls in passes().items()}
    if as_json:
        _echo_json(rows)
        return
    for name, description in rows.items():
        click.echo(f"{name:<28} {description}")


@cli.group(name="targets", invoke_without_command=True)
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
        _echo_json(description)
    else:
        click.echo(description["text"])


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps errors to exit codes (2 user error, 1 internal)."""
    _DEBUG["on"] = False  # set again by --debug; never left over from an earlier in-process call
    try:
        _attach_optional_groups()
        cli.main(args=argv, prog_name="edgeq", standalone_mode=False)
        return 0
    except EdgeqError as err:
        if _DEBUG["on"]:
            raise
        click.echo(f"error: {err}", err=True)
        return err.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 2
    except click.ClickException as err:
        err.show()
        return 2 if err.exit_code == 2 or isinstance(err, click.UsageError) else err.exit_code
    except click.exceptions.Exit as err:
        return err.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except OSError as err:  # the file system refused: a path that clashes, permissions, a full disk
        if _DEBUG["on"]:
            raise
        where = f"{err.filename}: " if err.filename else ""
        click.echo(f"error: {where}{err.strerror or err} (check the paths given)", err=True)
        return 2
    except Exception as err:  # a bug: say so, point at --debug
        if _DEBUG["on"]:
            raise
        click.echo(f"internal error: {type(err).__name__}: {err} (run with --debug for the traceback)", err=True)
        return 1


def _attach_optional_groups() -> None:
    """Commands whose modules pull optional dependencies are attached lazily."""
    from edgeq.cli import commands  # noqa: F401  (registers compile/eval/estimate on `cli`)


if __name__ == "__main__":
    # `python -m edgeq.cli` runs this file as __main__, a second copy of the module: the
    # commands register on the imported edgeq.cli, so run that one.
    from edgeq.cli import main as _main

    sys.exit(_main())
