"""The `edgeq` command line: builds typed options from flags and calls the library.

app.py holds the command group, joins every verb to it and maps errors to exit codes (0 ok,
2 bad input or usage, 1 internal error); one module per verb or verb family (compile, eval,
estimate, inspect, catalog: passes/targets); flags.py the flags several verbs share;
option_flags.py the table of which compile flag sets which option; pass_times.py the
`--time-passes` table.
"""

from edgeq.cli.app import cli, main

__all__ = ["cli", "main"]
