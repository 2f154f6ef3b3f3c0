"""Flags that several verbs share, each family handed to its command as one typed object: the
calibration-data flags (turned into what `open_source` takes), the device flags of a cost
model's estimate, `--input-shape`, and the JSON printer behind `--json`."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import click

from edgeq.errors import OptionError


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _flag_family(cls: type, parameter: str, options: list[Callable]) -> Callable:
    """A decorator that adds `options` to a click command and hands the command one `cls`
    object, as `parameter`, built from their values (the options' names are `cls`'s fields)."""
    names = [f.name for f in fields(cls)]

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def with_family(*args, **kwargs):
            kwargs[parameter] = cls(**{name: kwargs.pop(name) for name in names})
            return command(*args, **kwargs)

        for option in reversed(options):
            with_family = option(with_family)
        return with_family

    return decorate


# ---- calibration data -----------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationFlags:
    """The calibration-data flags of `compile` and `eval`."""

    calib: Path | None = None
    calib_text: Path | None = None
    tokenizer: Path | None = None
    seq_len: int = 256
    samples: int = 16
    first_window: int = 0

    def spec(self):
        """What `edgeq.calibration.sources.open_source` takes: None, a path, or text windows."""
        if self.calib is not None and self.calib_text is not None:
            raise OptionError("give either --calib or --calib-text, not both")
        if self.calib_text is not None:
            if self.tokenizer is None:
                raise OptionError("--calib-text needs --tokenizer tokenizer.json")
            from edgeq.calibration.sources import TextWindows

            return TextWindows(text=self.calib_text, tokenizer=self.tokenizer, seq_len=self.seq_len,
                               num_samples=self.samples, first_window=self.first_window)
        return str(self.calib) if self.calib is not None else None


calibration_flags = _flag_family(CalibrationFlags, "calibration", [
    click.option("--calib", type=click.Path(path_type=Path),
                 help="Calibration data: a directory of .npz (one sample each) or one .npz with a sample axis."),
    click.option("--calib-text", type=click.Path(path_type=Path), help="Text file to calibrate a language model."),
    click.option("--tokenizer", type=click.Path(path_type=Path), help="tokenizer.json for --calib-text."),
    click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per text window."),
    click.option("--samples", type=int, default=16, show_default=True, help="Text windows to use."),
    click.option("--first-window", type=int, default=0, show_default=True,
                 help="Index of the first text window (keep calibration apart from evaluation)."),
])


# ---- the device a cost model prices ----------------------------------------------------------


@dataclass(frozen=True)
class DeviceFlags:
    """The flags of a cost model that prices a device (`compile`, `estimate`)."""

    device: str | None = None
    fps: float | None = None
    folding: Path | None = None

    def given(self) -> dict[str, Any]:
        """The device flags the user gave, as keywords of the cost model's `estimate`."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def check(self, target, *, device_required: bool) -> None:
        """Fail before any work when the flags do not fit the target's cost model; with
        `device_required`, a cost model that prices a device needs --device."""
        needs_device = target.cost_model is not None and target.cost_model.needs_device
        # An NPU execution's devices (generation / SoC) are chosen with --device too.
        if self.device is not None and not needs_device and not any(e.devices for e in target.executions):
            raise OptionError(f"--device applies to targets whose cost model needs a device; target {target.name} "
                              "has none", fix="drop --device, or use a target whose cost model prices a device; "
                                              "`edgeq targets show T` describes each")
        if (self.fps is not None or self.folding is not None) and self.device is None:
            raise OptionError("--fps and --folding shape the device estimate", fix="add --device D")
        if self.fps is not None and self.folding is not None:
            raise OptionError("give either --fps or --folding, not both")
        if needs_device and self.device is None and device_required:
            raise OptionError(f"the cost model of target {target.name} prices a device", fix="add --device D")


device_flags = _flag_family(DeviceFlags, "device", [
    click.option("--device", help="Device or board for the target's cost model to price (targets whose cost "
                                  "model needs a device; an unknown name lists the known ones)."),
    click.option("--fps", type=float, help="Throughput target for the estimate's folding search (with --device)."),
    click.option("--folding", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="FINN-style folding JSON (PE/SIMD per layer) for the estimate (with --device)."),
])


# ---- input shapes ---------------------------------------------------------------------------


def parse_input_shapes(values: tuple[str, ...]) -> dict[str, list[int]]:
    """`--input-shape NAME=D0,D1,...` (repeatable) as {name: dims}."""
    shapes: dict[str, list[int]] = {}
    for value in values:
        name, _, dims = value.partition("=")
        try:
            shape = [int(d) for d in dims.split(",")] if name and dims else None
        except ValueError:
            shape = None
        if shape is None:
            raise click.BadParameter(f"'{value}' is not NAME=D0,D1,...", param_hint="--input-shape")
        shapes[name] = shape
    return shapes
