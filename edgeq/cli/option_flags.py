"""Compile flags -> CompileOptions, declared in one table: which flag sets which field (of
CompileOptions, its CalibrationOptions or its PrecisionOverrides), applied over the TOML config
of `--config`, flags winning."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from edgeq.options import (SMOOTH_SEARCH_GRID, CompileOptions, PrecisionOverrides, parse_input_shape,
                           parse_latency_budget, parse_outlier_threshold, parse_size_budget,
                           parse_weight_group)


def _unchanged(value: Any) -> Any:
    return value


def _constant(field_value: Any) -> Callable[[Any], Any]:
    return lambda _flag_value: field_value


def _given_unless_none(value: Any) -> bool:
    return value is not None


@dataclass(frozen=True)
class FlagField:
    """Compile flag `flag` (its click parameter name) sets options field `field`: a CompileOptions
    field, or "calibration.<field>" / "overrides.<field>" of the nested options."""

    flag: str
    field: str
    value: Callable[[Any], Any] = _unchanged     # the flag's value -> the field's (a file read, a constant)
    append: bool = False                          # add to the config's tuple instead of replacing it
    # Whether the flag counts as given: by default a value that is not falsy, so an empty list
    # and an unset switch leave the config's value (and the default) alone; value flags whose
    # 0 means something (`--smooth 0`, `--keep-high 0`) count when they are not None.
    given: Callable[[Any], bool] = bool


# In application order: a later row setting the same field wins (--no-smooth over --smooth and
# --smooth-search), appended values follow the config's and each other in this order.
FLAG_FIELDS: tuple[FlagField, ...] = (
    FlagField("exclude", "overrides.exclude_nodes", tuple, append=True),
    FlagField("nodes_to_exclude", "overrides.exclude_nodes", PrecisionOverrides.read_nodes_to_exclude, append=True),
    FlagField("exclude_regex", "overrides.exclude_regex", tuple, append=True),
    FlagField("exclude_op", "overrides.exclude_op_types", tuple, append=True),
    FlagField("tensor_overrides", "overrides.tensors", PrecisionOverrides.read_tensor_overrides, append=True),
    FlagField("calib_method", "calibration.method"),
    FlagField("percentile", "calibration.percentile", given=_given_unless_none),  # 0 is a value, not "not given"
    FlagField("weights", "weights"),
    FlagField("group", "group", given=_given_unless_none),
    FlagField("activations", "activations"),
    FlagField("keep_high", "keep_high", given=_given_unless_none),
    FlagField("accuracy_budget", "accuracy_budget", given=_given_unless_none),
    FlagField("size_budget", "size_budget", parse_size_budget, given=_given_unless_none),
    FlagField("latency_budget", "latency_budget", parse_latency_budget, given=_given_unless_none),
    FlagField("threads", "threads"),
    FlagField("sensitivity", "sensitivity"),
    FlagField("smooth_alpha", "smooth_alpha", given=_given_unless_none),
    FlagField("weight_rounding", "weight_rounding"),
    FlagField("act_order", "act_order"),
    FlagField("head_weights", "head_weights"),
    FlagField("weight_group", "weight_groups", lambda texts: tuple(parse_weight_group(t) for t in texts), append=True),
    FlagField("weight_zero_points", "weight_zero_points"),
    FlagField("smooth_search", "smooth_alpha_grid", _constant(SMOOTH_SEARCH_GRID)),
    FlagField("two_digit", "two_digit", tuple),
    FlagField("rotate", "rotate", given=_given_unless_none),   # --no-rotate is given too
    FlagField("no_online_rotations", "online_rotations", _constant(False)),
    FlagField("decompose_outliers", "decompose_outliers", parse_outlier_threshold, given=_given_unless_none),
    FlagField("decompose_scales", "decompose_scales"),
    FlagField("no_smooth", "smooth_alpha", _constant(None)),
    FlagField("no_smooth", "smooth_alpha_grid", _constant(())),
    # --input-shape (repeatable) replaces the config's input_shapes.
    FlagField("input_shape", "input_shapes", lambda texts: tuple(parse_input_shape(t) for t in texts)),
)

OPTION_FLAGS = frozenset(row.flag for row in FLAG_FIELDS)
_NESTED = ("overrides", "calibration")


def compile_options(flags: Mapping[str, Any], config: Path | None = None) -> CompileOptions:
    """The options of `config` (defaults without one) with every given flag of `flags` (click
    parameter name -> value) applied as FLAG_FIELDS says."""
    options = CompileOptions.from_toml(config) if config else CompileOptions()
    # Every flag value is read first (files included), then the nested options are built, then
    # CompileOptions: each validates its own fields, in that order.
    updates: dict[str, dict[str, Any]] = {"": {}, **{nested: {} for nested in _NESTED}}
    for row in FLAG_FIELDS:
        flag_value = flags[row.flag]
        if not row.given(flag_value):
            continue
        owner, _, name = row.field.rpartition(".")
        value = row.value(flag_value)
        if row.append:
            configured = getattr(getattr(options, owner) if owner else options, name)
            value = updates[owner].get(name, configured) + value
        updates[owner][name] = value
    nested = {owner: replace(getattr(options, owner), **updates[owner]) for owner in _NESTED}
    return replace(options, **nested, **updates[""])
