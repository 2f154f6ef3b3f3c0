"""The edgeq error hierarchy.

Every error a user can cause is an `EdgeqError`: the CLI prints its one-line message and exits
with `exit_code` (2: bad input or usage). Anything else escaping is a bug (exit 1).
"""

from __future__ import annotations


class EdgeqError(Exception):
    """Base of all errors caused by input, options or environment; one line, names the fix."""

    exit_code = 2

    def __init__(self, message: str, *, fix: str | None = None):
        self.problem = message
        self.fix = fix
        super().__init__(f"{message} ({fix})" if fix else message)


class ModelLoadError(EdgeqError):
    """The model file is missing, is not ONNX, or is truncated."""


class ExternalDataError(ModelLoadError):
    """A tensor's external-data file is missing or too short."""


class UnsupportedOpsetError(EdgeqError):
    """The model needs an opset newer than the installed onnxruntime runs."""


class GraphError(EdgeqError):
    """The graph is structurally invalid: a cycle, a dangling input, two producers of a value."""


class UnknownTargetError(EdgeqError):
    """No target of that name is registered."""


class UnknownPassError(EdgeqError):
    """No pass of that name is registered."""


class OptionError(EdgeqError):
    """An option or option combination is invalid."""


class CalibrationError(EdgeqError):
    """Calibration data do not fit the model (names, dtypes, ranks, NaN, empty)."""


class ValidationError(EdgeqError):
    """The compiled graph breaks a rule of its target."""


class CostModelError(EdgeqError):
    """An op has no price in the target's cost model (nothing silently costs zero)."""


class PreconditionError(EdgeqError):
    """A pass cannot run on this graph or context (a missing artifact, a graph it does not take):
    the input or the pipeline is wrong, not the pass."""


class PostconditionError(EdgeqError):
    """A pass broke its own promise about the graph it returns: a bug in edgeq (exit 1)."""

    exit_code = 1


class PassError(EdgeqError):
    """A pass failed; the message names it and the passes that ran before it."""

    def __init__(self, pass_name: str, ran_before: list[str], cause: BaseException):
        self.pass_name = pass_name
        self.ran_before = list(ran_before)
        self.cause = cause
        before = ", ".join(ran_before) if ran_before else "none"
        detail = str(cause) or type(cause).__name__
        if not isinstance(cause, EdgeqError):
            detail = f"{type(cause).__name__}: {detail}"
        msg = f"pass '{pass_name}' failed: {detail} [passes run before it: {before}]"
        super().__init__(msg)
        # A user error inside a pass stays a user error; anything else is internal.
        self.exit_code = cause.exit_code if isinstance(cause, EdgeqError) else 1
