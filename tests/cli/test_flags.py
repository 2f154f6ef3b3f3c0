"""edgeq.cli.flags: the shared flag families as typed objects, and --input-shape."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click
import pytest

from edgeq.cli.flags import CalibrationFlags, DeviceFlags, parse_input_shapes
from edgeq.errors import OptionError
from edgeq.registry import get_target


def test_calibration_spec_from_the_flags(tmp_path):
    from edgeq.calibration.sources import TextWindows

    assert CalibrationFlags().spec() is None
    assert CalibrationFlags(calib=tmp_path / "c").spec() == str(tmp_path / "c")
    spec = CalibrationFlags(calib_text=Path("t.txt"), tokenizer=Path("tok.json"), seq_len=32, samples=4,
                            first_window=7).spec()
    assert spec == TextWindows(text=Path("t.txt"), tokenizer=Path("tok.json"), seq_len=32, num_samples=4,
                               first_window=7)


@pytest.mark.parametrize("flags, words", [
    (CalibrationFlags(calib=Path("c"), calib_text=Path("t.txt")), "either --calib or --calib-text"),
    (CalibrationFlags(calib_text=Path("t.txt")), "--calib-text needs --tokenizer"),
])
def test_calibration_flags_that_do_not_fit_are_user_errors(flags, words):
    with pytest.raises(OptionError, match=words):
        flags.spec()


def test_device_flags_given_holds_only_what_the_user_gave(tmp_path):
    assert DeviceFlags().given() == {}
    assert DeviceFlags(device="d").given() == {"device": "d"}
    assert DeviceFlags(device="d", fps=30.0).given() == {"device": "d", "fps": 30.0}
    assert DeviceFlags(device="d", folding=tmp_path).given() == {"device": "d", "folding": tmp_path}


def _device_target(needs_device: bool):
    """A registered target whose cost model does (or does not) price a device."""
    target = get_target("x86-vnni")
    return replace(target, name="test-device-target", cost_model=replace(target.cost_model, needs_device=needs_device))


@pytest.mark.parametrize("flags, needs_device, required, words", [
    (DeviceFlags(device="d"), False, False, "--device applies to targets whose cost model needs a device"),
    (DeviceFlags(fps=10.0), True, False, "--fps and --folding shape the device estimate (add --device D)"),
    (DeviceFlags(device="d", fps=10.0, folding=Path("f.json")), True, False, "either --fps or --folding"),
    (DeviceFlags(), True, True, "the cost model of target test-device-target prices a device (add --device D)"),
])
def test_device_flags_that_do_not_fit_the_cost_model(flags, needs_device, required, words):
    with pytest.raises(OptionError) as info:
        flags.check(_device_target(needs_device), device_required=required)
    assert words in str(info.value)


def test_device_flag_errors_name_no_target_but_the_capability():
    with pytest.raises(OptionError) as info:
        DeviceFlags(device="d").check(_device_target(False), device_required=False)
    assert info.value.fix == ("drop --device, or use a target whose cost model prices a device; "
                              "`edgeq targets show T` describes each")


def test_device_flags_that_fit_pass():
    DeviceFlags().check(_device_target(False), device_required=True)
    DeviceFlags().check(_device_target(True), device_required=False)  # compile: the estimate is optional
    DeviceFlags(device="d", fps=10.0).check(_device_target(True), device_required=True)


def test_input_shapes():
    assert parse_input_shapes(()) == {}
    assert parse_input_shapes(("input_ids=1,16", "mask=1,16")) == {"input_ids": [1, 16], "mask": [1, 16]}
    for bad in ("input_ids", "=1,16", "input_ids=", "input_ids=1,x"):
        with pytest.raises(click.BadParameter, match="is not NAME=D0,D1"):
            parse_input_shapes((bad,))
