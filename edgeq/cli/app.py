"""The `edgeq` command group, the one place where every verb is joined to it, and `main`, which
maps errors to exit codes: 0 ok, 2 bad input or usage (one-line message, no traceback),
1 internal error, 130 after Ctrl-C and 143 after SIGTERM (temporary files removed, one line
saying whether anything was written: edgeq.cli.interrupts). `--debug` shows tracebacks."""

from __future__ import annotations

import importlib

import click

import edgeq
from edgeq.cli.bench import bench_command
from edgeq.cli.catalog import passes_command, targets_group
from edgeq.cli.compile import compile_command
from edgeq.cli.estimate import estimate_command
from edgeq.cli.eval import eval_command
from edgeq.cli.inspect import inspect_command
from edgeq.cli.interrupts import Terminated, handling_signals
from edgeq.cli import interrupts
from edgeq.cli.package import package_command
from edgeq.errors import EdgeqError

# Command groups of the backend packages (edgeq.backends.<family>), as "module:attribute"; each
# is mounted as `edgeq <family>` and imported only when named or listed.
BACKEND_COMMAND_GROUPS = ("edgeq.backends.fpga.cli:main",)
MODELS_COMMAND_GROUP = "edgeq.models.cli:models_group"

_DEBUG = {"on": False}


class _VerbGroup(click.Group):
    """A click group that imports some of its commands only when they are named or listed: the
    models and backend groups pull in numpy, onnx and backend code that most verbs never need."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands: dict[str, str] = {}

    def add_lazy_command(self, name: str, import_path: str) -> None:
        self.lazy_commands[name] = import_path

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy_commands and name not in self.commands:
            module, _, attribute = self.lazy_commands[name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name=name)
        return super().get_command(ctx, name)


@click.group(cls=_VerbGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(edgeq.__version__, prog_name="edgeq")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def cli(debug: bool) -> None:
    """edgeq: compile float ONNX transformers into quantized QDQ ONNX for edge targets."""
    _DEBUG["on"] = debug


def _backend_family(import_path: str) -> str:
    """The verb a backend's command group is mounted as: its package's name (edgeq.backends.<family>)."""
    return import_path.split(":")[0].removeprefix("edgeq.backends.").split(".")[0]


cli.add_command(inspect_command)
cli.add_command(passes_command)
cli.add_command(targets_group)
cli.add_command(compile_command)
cli.add_command(eval_command)
cli.add_command(estimate_command)
cli.add_command(bench_command)
cli.add_command(package_command)
cli.add_lazy_command("models", MODELS_COMMAND_GROUP)
for _group in BACKEND_COMMAND_GROUPS:
    cli.add_lazy_command(_backend_family(_group), _group)


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps errors to exit codes (2 user error, 1 internal, 130/143 interrupted)."""
    _DEBUG["on"] = False  # set again by --debug; never left over from an earlier in-process call
    with handling_signals():
        return _run(argv)


def _run(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name="edgeq", standalone_mode=False)
        return 0
    except EdgeqError as err:
        if _DEBUG["on"]:
            raise
        click.echo(f"error: {err}", err=True)
        return err.exit_code
    except (KeyboardInterrupt, Terminated) as interruption:
        click.echo(interrupts.message(interruption), err=True)
        return interrupts.exit_code(interruption)
    except click.exceptions.Abort as err:
        if isinstance(err.__cause__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            click.echo(interrupts.message(err.__cause__), err=True)
            return interrupts.exit_code(err.__cause__)
        click.echo("aborted", err=True)
        return 2
    except click.ClickException as err:
        err.show()
        return 2 if err.exit_code == 2 or isinstance(err, click.UsageError) else err.exit_code
    except click.exceptions.Exit as err:
        return err.exit_code
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
