"""Calibration data sources: every kind of input, and every bad-data case naming its input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnxruntime.quantization import CalibrationDataReader

from edgeq.calibration.sources import (
    NpzDirectorySource,
    NpzStackedSource,
    SpooledSource,
    TextWindows,
    TokenWindows,
    open_source,
    split,
)
from edgeq.errors import CalibrationError
from tests.calibration.models import identity, mlp, tiny_lm


def _mlp_samples(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(2, 32)).astype(np.float32)} for _ in range(count)]


def _write_dir(folder: Path, samples: list[dict[str, np.ndarray]]) -> Path:
    folder.mkdir(exist_ok=True)
    for index, sample in enumerate(samples):
        np.savez(folder / f"{index:03d}.npz", **sample)
    return folder


def _assert_same_samples(source, samples) -> None:
    got = list(source)
    assert len(got) == len(samples) == len(source)
    for have, want in zip(got, samples, strict=True):
        assert have.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(have[name], want[name])


# --- each kind of source -------------------------------------------------------------------

def test_npz_directory_in_file_name_order(tmp_path):
    samples = _mlp_samples(3)
    folder = _write_dir(tmp_path / "calib", samples)
    (folder / "notes.txt").write_text("ignored")
    source = open_source(folder, mlp())
    assert isinstance(source, NpzDirectorySource)
    _assert_same_samples(source, samples)
    _assert_same_samples(source, samples)  # re-iterable


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_stacked_npz(tmp_path, save):
    samples = _mlp_samples(4)
    path = tmp_path / "calib.npz"
    save(path, x=np.stack([s["x"] for s in samples]))
    source = open_source(path, mlp())
    assert isinstance(source, NpzStackedSource)
    _assert_same_samples(source, samples)


def test_list_is_used_in_place():
    samples = _mlp_samples(3)
    source = open_source(samples, mlp())
    _assert_same_samples(source, samples)
    _assert_same_samples(source, samples)


def test_generator_is_spooled_and_re_iterable():
    samples = _mlp_samples(3)
    source = open_source((s for s in samples), mlp())
    assert isinstance(source, SpooledSource)
    _assert_same_samples(source, samples)
    _assert_same_samples(source, samples)


class _Reader(CalibrationDataReader):
    def __init__(self, samples):
        self.samples = iter(samples)

    def get_next(self):
        return next(self.samples, None)


def test_calibration_data_reader():
    samples = _mlp_samples(3)
    source = open_source(_Reader(samples), mlp())
    _assert_same_samples(source, samples)


def test_spool_folder_lives_as_long_as_a_split_view():
    source = open_source((s for s in _mlp_samples(3)), mlp())
    folder = source.spool.path
    calibration, _ = split(source, 1)
    del source
    assert folder.is_dir() and len(list(calibration)) == 2
    del calibration, _
    assert not folder.exists()


def test_token_windows_feed_only_the_model_inputs():
    ids = np.arange(1000, dtype=np.int32) % 100
    source = open_source(TokenWindows(ids, seq_len=8, num_samples=3, first_window=5), tiny_lm())
    feeds = list(source)
    assert len(feeds) == 3
    assert set(feeds[0]) == {"input_ids", "attention_mask"}
    np.testing.assert_array_equal(feeds[1]["input_ids"], ids[48:56][None].astype(np.int64))
    assert feeds[1]["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(feeds[2]["attention_mask"], np.ones((1, 8), np.int64))


def test_token_windows_make_position_ids_when_the_model_has_them():
    source = open_source(TokenWindows(np.arange(64), 8, 2), tiny_lm(with_positions=True))
    feed = next(iter(source))
    np.testing.assert_array_equal(feed["position_ids"], np.arange(8)[None])


def test_token_windows_from_npy(tmp_path):
    np.save(tmp_path / "ids.npy", np.arange(100, dtype=np.int32))
    feeds = list(open_source(TokenWindows(tmp_path / "ids.npy", 10, 2, first_window=8), tiny_lm()))
    np.testing.assert_array_equal(feeds[1]["input_ids"][0], np.arange(90, 100))


def test_text_windows_match_the_reference_token_ids(shared_dir):
    pytest.importorskip("tokenizers")
    reference = np.load(shared_dir / "reference" / "wikitext2_test_smollm2_ids.npy")
    spec = TextWindows(shared_dir / "data" / "wikitext-2-raw-test.txt",
                       shared_dir / "reference" / "smollm2_tokenizer.json", seq_len=256, num_samples=2,
                       first_window=1000)
    feeds = list(open_source(spec, tiny_lm(vocab=49152)))
    np.testing.assert_array_equal(feeds[0]["input_ids"][0], reference[1000 * 256:1001 * 256])
    np.testing.assert_array_equal(feeds[1]["input_ids"][0], reference[1001 * 256:1002 * 256])


def test_split_holds_out_the_last_samples():
    samples = _mlp_samples(5)
    calibration, holdout = split(open_source(samples, mlp()), 2)
    _assert_same_samples(calibration, samples[:3])
    _assert_same_samples(holdout, samples[3:])
    again, none = split(calibration, 0)
    assert len(again) == 3 and list(none) == []


@pytest.mark.parametrize("n_holdout", [-1, 5, 6])
def test_split_keeps_a_calibration_sample(n_holdout):
    with pytest.raises(CalibrationError, match="hold out"):
        split(open_source(_mlp_samples(5), mlp()), n_holdout)


# --- casts that are allowed ----------------------------------------------------------------

def test_int32_ids_and_float64_data_are_cast():
    feed = next(iter(open_source([{"input_ids": np.ones((1, 4), np.int32),
                                   "attention_mask": np.ones((1, 4), np.uint8)}], tiny_lm())))
    assert feed["input_ids"].dtype == np.int64 and feed["attention_mask"].dtype == np.int64
    feed = next(iter(open_source([{"x": np.ones((1, 32))}], mlp())))
    assert feed["x"].dtype == np.float32


# --- bad data: each names the input --------------------------------------------------------

def _ids(shape=(1, 4), dtype=np.int64):
    return np.ones(shape, dtype)


BAD_SAMPLES = {
    "missing input": ({"input_ids": _ids()}, "attention_mask"),
    "extra input": ({"input_ids": _ids(), "attention_mask": _ids(), "labels": _ids()}, "labels"),
    "float for int": ({"input_ids": _ids(dtype=np.float32), "attention_mask": _ids()}, "input_ids"),
    "bool for int": ({"input_ids": _ids(), "attention_mask": _ids(dtype=bool)}, "attention_mask"),
    "wrong rank": ({"input_ids": _ids((4,)), "attention_mask": _ids()}, "input_ids"),
    "shared dim differs": ({"input_ids": _ids((1, 4)), "attention_mask": _ids((1, 5))}, "attention_mask"),
    "not a dict": ([1, 2], "dict"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_bad_sample_names_the_input(case):
    sample, name = BAD_SAMPLES[case]
    with pytest.raises(CalibrationError, match=name):
        open_source([sample], tiny_lm())


def test_out_of_range_is_an_error_for_an_int32_input():
    import onnx

    model = tiny_lm()
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT32
    with pytest.raises(CalibrationError, match="input_ids.*outside int32"):
        open_source([{"input_ids": np.full((1, 4), 2**40), "attention_mask": _ids()}], model)


@pytest.mark.parametrize("value, reason", [(np.nan, "NaN"), (np.inf, "Inf"), (1e300, "after the cast")])
def test_non_finite_values_name_the_input(value, reason):
    x = np.zeros((1, 32))
    x[0, 3] = value
    with pytest.raises(CalibrationError, match=f"'x'.*{reason}"):
        open_source([{"x": x}], mlp())


def test_int_data_for_a_float_input():
    with pytest.raises(CalibrationError, match="'x' is int64 but the model takes float32"):
        open_source([{"x": np.ones((1, 32), np.int64)}], mlp())


def test_static_dim_mismatch():
    with pytest.raises(CalibrationError, match="'x' has size 31 on axis 1.*fixes it at 32"):
        open_source([{"x": np.ones((1, 31), np.float32)}], mlp())


def test_directory_headers_are_checked_before_any_sample_is_read(tmp_path):
    samples = _mlp_samples(4)
    samples[3] = {"x": samples[3]["x"].astype(np.int64)}
    folder = _write_dir(tmp_path / "calib", samples)
    with pytest.raises(CalibrationError, match=r"003\.npz: input 'x' is int64"):
        open_source(folder, mlp())


def test_nan_in_a_file_is_caught_as_streamed(tmp_path):
    samples = _mlp_samples(3)
    samples[2]["x"][0, 0] = np.nan
    source = open_source(_write_dir(tmp_path / "calib", samples), mlp())  # headers are fine
    with pytest.raises(CalibrationError, match=r"002\.npz: input 'x' has 1 NaN/Inf"):
        list(source)


def test_stacked_npz_needs_a_sample_axis(tmp_path):
    # x [batch, 32]: a [2, 32] array is two samples along its batch axis (test_batch_axis.py), but a
    # [32] one has neither a sample nor a batch axis
    np.savez(tmp_path / "calib.npz", x=np.ones((32,), np.float32))
    with pytest.raises(CalibrationError, match="'x' has rank 0"):
        open_source(tmp_path / "calib.npz", mlp())


def test_stacked_npz_sample_counts_must_agree(tmp_path):
    np.savez(tmp_path / "calib.npz", input_ids=_ids((3, 1, 4)), attention_mask=_ids((2, 1, 4)))
    with pytest.raises(CalibrationError, match="different sample counts"):
        open_source(tmp_path / "calib.npz", tiny_lm())


@pytest.mark.parametrize("make", ["empty dir", "zero samples", "no arrays", "missing", "not npz",
                                  "empty list", "empty generator", "one dict"])
def test_empty_or_wrong_data(tmp_path, make):
    if make == "empty dir":
        (tmp_path / "d").mkdir()
        spec = tmp_path / "d"
    elif make == "zero samples":
        np.savez(tmp_path / "z.npz", x=np.ones((0, 2, 32), np.float32))
        spec = tmp_path / "z.npz"
    elif make == "no arrays":
        np.savez(tmp_path / "n.npz")
        spec = tmp_path / "n.npz"
    elif make == "missing":
        spec = tmp_path / "nothing.npz"
    elif make == "not npz":
        (tmp_path / "data.txt").write_text("1 2 3")
        spec = tmp_path / "data.txt"
    elif make == "empty list":
        spec = []
    elif make == "empty generator":
        spec = (s for s in [])
    else:
        spec = {"x": np.ones((1, 32), np.float32)}
    with pytest.raises(CalibrationError):
        open_source(spec, mlp())


def test_token_windows_beyond_the_text():
    with pytest.raises(CalibrationError, match="gives 12 windows of 8 tokens but windows 10..12"):
        open_source(TokenWindows(np.arange(100), 8, 3, first_window=10), tiny_lm())


def test_token_windows_against_a_static_sequence_length():
    with pytest.raises(CalibrationError, match="'input_ids' has size 8 on axis 1.*fixes it at 16"):
        open_source(TokenWindows(np.arange(100), 8, 2), tiny_lm(seq=16))


def test_text_cannot_feed_a_float_model():
    with pytest.raises(CalibrationError, match="no 'input_ids'"):
        open_source(TokenWindows(np.arange(100), 8, 2), identity())


def test_iterable_whose_len_lies():
    class Liar:
        def __len__(self):
            return 3

        def __iter__(self):
            return iter(_mlp_samples(2))

    source = open_source(Liar(), mlp())
    with pytest.raises(CalibrationError, match="len 3 but yielded 2"):
        list(source)
