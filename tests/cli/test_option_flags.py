"""edgeq.cli.option_flags: compile flags -> CompileOptions through one table, over the TOML
config, flags winning; the options are those the hand-written merge before the table built, for
every flag combination tried."""

from __future__ import annotations

import random
from dataclasses import fields, is_dataclass, replace
from pathlib import Path

import click
import pytest

import edgeq.compiler
from edgeq.cli import main
from edgeq.cli.compile import compile_command
from edgeq.cli.option_flags import FLAG_FIELDS, OPTION_FLAGS, compile_options
from edgeq.errors import OptionError
from edgeq.options import SMOOTH_SEARCH_GRID, CalibrationOptions, CompileOptions, PrecisionOverrides, TensorOverride

# compile's flags that are not CompileOptions fields (or are read elsewhere).
OTHER_FLAGS = {"model", "target_name", "output", "calib", "calib_text", "tokenizer", "seq_len", "samples",
               "first_window", "config", "report", "external_data", "as_json", "time_passes", "device", "fps",
               "folding", "provider", "quiet", "verbose", "ep_context"}


def _legacy_options(p: dict) -> CompileOptions:
    """The merge `compile_command` did by hand before the table (kept verbatim as the oracle)."""
    options = CompileOptions.from_toml(p["config"]) if p["config"] else CompileOptions()
    overrides = options.overrides
    overrides = replace(
        overrides,
        exclude_nodes=overrides.exclude_nodes + tuple(p["exclude"]) + (
            PrecisionOverrides.read_nodes_to_exclude(p["nodes_to_exclude"]) if p["nodes_to_exclude"] else ()),
        exclude_regex=overrides.exclude_regex + tuple(p["exclude_regex"]),
        exclude_op_types=overrides.exclude_op_types + tuple(p["exclude_op"]),
        tensors=overrides.tensors + (PrecisionOverrides.read_tensor_overrides(p["tensor_overrides"])
                                     if p["tensor_overrides"] else ()))
    # A value flag given as 0 is given (`--smooth 0`, `--keep-high 0`); switches and lists only when set.
    valued = {"percentile", "group", "keep_high", "accuracy_budget", "smooth_alpha"}
    calibration = replace(options.calibration, **{k: v for k, v in
                                                  (("method", p["calib_method"]), ("percentile", p["percentile"]))
                                                  if (v is not None if k in valued else v)})
    options = replace(options, overrides=overrides, calibration=calibration,
                      **{k: v for k, v in (("weights", p["weights"]), ("group", p["group"]),
                                           ("activations", p["activations"]), ("keep_high", p["keep_high"]),
                                           ("accuracy_budget", p["accuracy_budget"]), ("threads", p["threads"]),
                                           ("sensitivity", p["sensitivity"]), ("smooth_alpha", p["smooth_alpha"]),
                                           ("weight_rounding", p["weight_rounding"]), ("act_order", p["act_order"]),
                                           ("head_weights", p["head_weights"]),
                                           ("smooth_alpha_grid", SMOOTH_SEARCH_GRID if p["smooth_search"] else None),
                                           ("two_digit", tuple(p["two_digit"])))
                         if (v is not None if k in valued else v)})
    if p["rotate"] is not None:
        options = replace(options, rotate=p["rotate"])
    if p["no_smooth"]:
        options = replace(options, smooth_alpha=None, smooth_alpha_grid=())
    return options


def _assert_same_fields(actual, expected, where: str = "options") -> None:
    """Field by field, nested options included, so a mismatch names the field."""
    assert type(actual) is type(expected), where
    for f in fields(expected):
        a, e = getattr(actual, f.name), getattr(expected, f.name)
        if is_dataclass(e):
            _assert_same_fields(a, e, f"{where}.{f.name}")
        else:
            assert a == e, f"{where}.{f.name}: {a!r} != {e!r}"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "config.toml").write_text(
        '[compile]\nweights = "int4"\ngroup = 64\nkeep_high = 2\nthreads = 3\ntwo_digit = ["down_proj"]\n'
        'rotate = true\nsmooth_alpha = 0.7\n'
        '[calibration]\nmethod = "minmax"\nholdout = 1\n'
        '[precision]\nexclude_nodes = ["n1"]\nexclude_regex = ["^r1"]\nexclude_op_types = ["Softmax"]\n')
    (tmp_path / "exclude.json").write_text('["n3", "n4"]')
    (tmp_path / "exclude.txt").write_text("n5\n\nn6\n")
    (tmp_path / "overrides.json").write_text(
        '{"TensorQuantOverrides": {"t1": [{"quant_type": "QInt16", "symmetric": true}],'
        ' "t0": [{"scale": 0.5, "zero_point": 3}]}}')
    return {"config": tmp_path / "config.toml", "exclude_json": tmp_path / "exclude.json",
            "exclude_txt": tmp_path / "exclude.txt", "overrides": tmp_path / "overrides.json"}


def _params(argv: list) -> dict:
    """compile's click parameters for `argv` (after MODEL -t T -o OUT), as click parses them."""
    ctx = compile_command.make_context("compile", ["m.onnx", "-t", "x86-vnni", "-o", "o.onnx", *map(str, argv)])
    return dict(ctx.params)


class _Captured(Exception):
    pass


def _options_through_the_cli(monkeypatch, tmp_path: Path, argv: list) -> CompileOptions:
    seen: list[CompileOptions] = []

    def fake_compile(model, target, options, **kwargs):
        seen.append(options)
        raise _Captured

    monkeypatch.setattr(edgeq.compiler, "compile", fake_compile)
    code = main(["compile", str(tmp_path / "m.onnx"), "-t", "x86-vnni", "-o", str(tmp_path / "o.onnx"),
                 *map(str, argv)])
    assert code == 1 and len(seen) == 1  # stopped by the fake compile, after the options were built
    return seen[0]


def test_every_compile_flag_is_in_the_table_or_named_as_another_kind():
    params = {p.name for p in compile_command.params}
    assert OPTION_FLAGS == params - OTHER_FLAGS
    assert OTHER_FLAGS <= params
    for row in FLAG_FIELDS:
        owner, _, name = row.field.rpartition(".")
        options = getattr(CompileOptions(), owner) if owner else CompileOptions()
        assert hasattr(options, name), row


def test_no_flags_give_the_defaults(capsys, monkeypatch, tmp_path):
    _assert_same_fields(_options_through_the_cli(monkeypatch, tmp_path, []), CompileOptions())
    capsys.readouterr()


def test_flags_over_the_config(capsys, monkeypatch, tmp_path, files):
    argv = ["--config", files["config"], "--exclude", "n2", "--nodes-to-exclude", files["exclude_json"],
            "--exclude-regex", "r2", "--exclude-op", "Gelu", "--two-digit", "o_proj", "--keep-high", "0",
            "--calib-method", "entropy", "--no-rotate", "--smooth-search"]
    expected = CompileOptions(
        weights="int4", group=64, keep_high=0, threads=3, two_digit=("o_proj",), rotate=False, smooth_alpha=0.7,
        smooth_alpha_grid=SMOOTH_SEARCH_GRID,
        calibration=CalibrationOptions(method="entropy", holdout=1),
        overrides=PrecisionOverrides(exclude_nodes=("n1", "n2", "n3", "n4"), exclude_regex=("^r1", "r2"),
                                     exclude_op_types=("Softmax", "Gelu")))
    _assert_same_fields(_options_through_the_cli(monkeypatch, tmp_path, argv), expected)
    capsys.readouterr()


def test_no_smooth_wins_over_smooth_and_the_config(capsys, monkeypatch, tmp_path, files):
    argv = ["--config", files["config"], "--smooth", "0.5", "--smooth-search", "--no-smooth"]
    options = _options_through_the_cli(monkeypatch, tmp_path, argv)
    assert options.smooth_alpha is None and options.smooth_alpha_grid == ()
    assert options.rotate is True  # from the config: no --rotate/--no-rotate given
    capsys.readouterr()


def test_every_field_flag(capsys, monkeypatch, tmp_path, files):
    argv = ["--weights", "int8", "--group", "32", "--activations", "int16", "--calib-method", "percentile",
            "--percentile", "99.9", "--keep-high", "3", "--sensitivity", "--smooth", "0.6",
            "--weight-rounding", "gptq", "--act-order", "--head-weights", "int4", "--weight-zero-points", "--weight-group", "down_proj|lm_head=32",
            "--weight-group", "o_proj=64:sym", "--no-online-rotations", "--rotate",
            "--accuracy-budget", "0.05", "--threads", "2", "--tensor-overrides", files["overrides"],
            "--nodes-to-exclude", files["exclude_txt"]]
    expected = CompileOptions(
        weights="int8", group=32, activations="int16", keep_high=3, sensitivity=True, smooth_alpha=0.6,
        weight_rounding="gptq", act_order=True, head_weights="int4", weight_zero_points=True, rotate=True,
        weight_groups=(("down_proj|lm_head", 32, None), ("o_proj", 64, False)), online_rotations=False,
        accuracy_budget=0.05, threads=2,
        calibration=CalibrationOptions(method="percentile", percentile=99.9),
        overrides=PrecisionOverrides(
            exclude_nodes=("n5", "n6"),
            tensors=(("t0", TensorOverride(scale=0.5, zero_point=3)),
                     ("t1", TensorOverride(dtype="int16", symmetric=True)))))
    _assert_same_fields(_options_through_the_cli(monkeypatch, tmp_path, argv), expected)
    capsys.readouterr()


def test_input_shape_flags_over_the_config(capsys, monkeypatch, tmp_path):
    (tmp_path / "shapes.toml").write_text('[compile]\ninput_shapes = {input_ids = [1, 64], attention_mask = [1, 64]}\n')
    from_config = CompileOptions.from_toml(tmp_path / "shapes.toml")
    assert from_config.input_shapes == (("input_ids", (1, 64)), ("attention_mask", (1, 64)))
    argv = ["--config", tmp_path / "shapes.toml", "--input-shape", "input_ids=2,128", "--input-shape", "x=3"]
    options = _options_through_the_cli(monkeypatch, tmp_path, argv)
    assert options.input_shapes == (("input_ids", (2, 128)), ("x", (3,)))  # the flags replace the config's
    capsys.readouterr()


@pytest.mark.parametrize("texts,words", [
    (("input_ids",), "is not NAME=D0,D1,..."), (("=1,2",), "is not NAME=D0,D1,..."),
    (("ids=1,x",), "is not NAME=D0,D1,..."), (("ids=1,0",), "size below 1"), (("a=1", "a=2"), "gives a twice"),
])
def test_bad_input_shapes_are_one_line_option_errors(texts, words):
    with pytest.raises(OptionError) as err:
        compile_options({**{row.flag: None for row in FLAG_FIELDS}, "input_shape": texts})
    assert words in str(err.value) and "\n" not in str(err.value)


def _vocabulary(files: dict[str, Path]) -> list[list]:
    """Flag groups a random combination draws from (values include 0s, which count as not given)."""
    return [["--config", files["config"]], ["--weights", "int4"], ["--weights", "int8"], ["--group", "128"],
            ["--activations", "float"], ["--activations", "int8"], ["--calib-method", "mse"],
            ["--calib-method", "minmax"], ["--percentile", "99.0"], ["--percentile", "0"],
            ["--exclude", "a"], ["--exclude", "b"], ["--exclude-regex", "x.*"], ["--exclude-op", "MatMul"],
            ["--nodes-to-exclude", files["exclude_json"]], ["--nodes-to-exclude", files["exclude_txt"]],
            ["--tensor-overrides", files["overrides"]], ["--keep-high", "1"], ["--keep-high", "0"],
            ["--sensitivity"], ["--smooth", "0.5"], ["--smooth", "0"], ["--smooth-search"], ["--no-smooth"],
            ["--two-digit", "q"], ["--two-digit", "k"], ["--weight-rounding", "awq+gptq"],
            ["--weight-rounding", "auto"], ["--act-order"], ["--head-weights", "int8"], ["--rotate"],
            ["--no-rotate"], ["--accuracy-budget", "0.1"], ["--accuracy-budget", "0"], ["--threads", "4"],
            ["--threads", "0"]]


def test_random_combinations_match_the_hand_written_merge(capsys, monkeypatch, tmp_path, files):
    vocabulary = _vocabulary(files)
    rng = random.Random(0)
    for _ in range(150):
        argv = [word for group in rng.sample(vocabulary, rng.randint(1, 12)) for word in group]
        params = _params(argv)
        expected = _legacy_options(params)
        _assert_same_fields(compile_options({k: params[k] for k in OPTION_FLAGS}, params["config"]), expected)
    # and through the command line, for a few of them
    for _ in range(10):
        argv = [word for group in rng.sample(vocabulary, rng.randint(1, 12)) for word in group]
        _assert_same_fields(_options_through_the_cli(monkeypatch, tmp_path, argv), _legacy_options(_params(argv)))
    capsys.readouterr()


@pytest.mark.parametrize("argv", [
    ["--exclude-regex", "(", "--group", "33"],
    ["--group", "33", "--keep-high", "-1"],
    ["--nodes-to-exclude", "missing.json", "--tensor-overrides", "missing.json"],
])
def test_invalid_combinations_fail_with_the_same_first_error(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = _params(argv)
    with pytest.raises(OptionError) as legacy:
        _legacy_options(params)
    with pytest.raises(OptionError) as table:
        compile_options({k: params[k] for k in OPTION_FLAGS}, params["config"])
    assert str(table.value) == str(legacy.value)


def test_flags_not_given_leave_the_config_alone(files):
    params = _params(["--config", files["config"]])
    options = compile_options({k: params[k] for k in OPTION_FLAGS}, params["config"])
    _assert_same_fields(options, CompileOptions.from_toml(files["config"]))


def test_a_bad_choice_is_a_usage_error_before_the_table():
    with pytest.raises(click.BadParameter):
        _params(["--weights", "int3"])


@pytest.mark.parametrize("flag, value, field", [("smooth_alpha", 0.0, "smooth_alpha"),
                                                ("keep_high", 0, "keep_high"),
                                                ("accuracy_budget", 0.0, "accuracy_budget")])
def test_a_zero_value_counts_as_given(flag, value, field, tmp_path):
    """`--smooth 0` sets alpha 0 (it used to read as "not given" and leave the search on)."""
    config = tmp_path / "c.toml"
    config.write_text(f"{field} = {1 if isinstance(value, int) else 0.5}\n")
    flags = {**{row.flag: None for row in FLAG_FIELDS}, flag: value}
    assert getattr(compile_options(flags, config), field) == value
