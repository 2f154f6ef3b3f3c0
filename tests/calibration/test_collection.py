"""calibrate(): samples streamed one at a time, deterministic for any order and output grouping,
every data source, and errors in requests, data and options caught before the long run."""

from __future__ import annotations

import weakref

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import CalibrationDataReader

from edgeq.calibration.collection import CollectionOptions, calibrate
from edgeq.calibration.sources import TokenWindows
from edgeq.errors import CalibrationError, OptionError
from tests.calibration.helpers import MLP_TENSORS, assert_same_stats, mlp_samples
from tests.calibration.models import mlp, tiny_lm


class _CountingSamples:
    """A sized re-iterable that makes each sample on demand and counts the ones alive."""

    def __init__(self, count: int):
        self.count, self.alive, self.most_alive, self.made = count, 0, 0, 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for index in range(self.count):
            x = np.full((2, 32), index % 7, np.float32)
            self.alive += 1
            self.made += 1
            self.most_alive = max(self.most_alive, self.alive)
            weakref.finalize(x, self._gone)
            yield {"x": x}
            del x

    def _gone(self) -> None:
        self.alive -= 1


def test_samples_stream_one_at_a_time():
    samples = _CountingSamples(200)
    result = calibrate(mlp(), samples, MLP_TENSORS, CollectionOptions(outputs_per_run=2))
    assert result["x"].count == 200 * 64 and (result["x"].min, result["x"].max) == (0.0, 6.0)
    assert samples.made == 1 + 3 * 200  # the first sample is checked up front; 3 passes
    assert samples.most_alive <= 2


def test_generator_is_never_materialised():
    alive = {"now": 0, "most": 0}

    def generate():
        for index in range(100):
            x = np.full((1, 32), index, np.float32)
            alive["now"] += 1
            alive["most"] = max(alive["most"], alive["now"])
            weakref.finalize(x, lambda: alive.__setitem__("now", alive["now"] - 1))
            yield {"x": x}
            del x

    result = calibrate(mlp(), generate(), ["x", "h"])
    assert result["x"].max == 99.0 and result.num_samples == 100
    assert alive["most"] <= 2


def test_deterministic_across_runs_chunks_and_sample_order(mlp_case):
    model, samples, result, _ = mlp_case
    options = CollectionOptions(channel_axis=-1)
    assert_same_stats(result, calibrate(model, samples, MLP_TENSORS, options))
    chunked = CollectionOptions(channel_axis=-1, outputs_per_run=2)
    assert_same_stats(result, calibrate(model, samples, MLP_TENSORS, chunked))
    assert_same_stats(result, calibrate(model, samples[::-1], MLP_TENSORS, options))


def test_reader_directory_and_path_model_give_the_same_stats(mlp_case, tmp_path):
    model, samples, _, _ = mlp_case
    expected = calibrate(model, samples, ["h", "y"])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(samples)

        def get_next(self):
            return next(self.items, None)

    assert_same_stats(expected, calibrate(model, Reader(), ["h", "y"]))
    folder = tmp_path / "calib"
    folder.mkdir()
    for index, sample in enumerate(samples):
        np.savez(folder / f"{index:02d}.npz", **sample)
    onnx.save(model, tmp_path / "mlp.onnx", save_as_external_data=True, location="mlp.data",
              size_threshold=0)
    assert_same_stats(expected, calibrate(tmp_path / "mlp.onnx", folder, ["h", "y"]))


def test_token_windows_into_a_language_model():
    result = calibrate(tiny_lm(), TokenWindows(np.arange(640) % 100, 16, 4), ["embedded", "logits"])
    assert result["embedded"].count == 4 * 16 * 16 and result.num_samples == 4


def test_calibration_errors_from_data_surface_before_running():
    bad = mlp_samples(3)
    bad[0]["x"] = bad[0]["x"].astype(np.int32)
    with pytest.raises(CalibrationError, match="'x' is int32"):
        calibrate(mlp(), bad, ["h"])


# --- requests and options -------------------------------------------------------------------

@pytest.mark.parametrize("tensors, message", [
    (["hh"], "'hh' is not a tensor.*did you mean 'h'"),
    (["w1"], "'w1' is a weight"),
    ([], "no tensors"),
    ("h", "is one string"),
])
def test_bad_tensor_requests(tensors, message):
    with pytest.raises(OptionError, match=message):
        calibrate(mlp(), mlp_samples(2), tensors)


def test_integer_tensor_request():
    with pytest.raises(OptionError, match="'input_ids' is int64"):
        calibrate(tiny_lm(), TokenWindows(np.arange(64), 8, 2), ["input_ids"])


def test_channel_axis_out_of_range():
    with pytest.raises(OptionError, match="channel_axis=2 is out of range for tensor 'h' of rank 2"):
        calibrate(mlp(), mlp_samples(2), ["h"], CollectionOptions(channel_axis=2))


@pytest.mark.parametrize("options", [dict(histogram_bins=4), dict(threads=0), dict(outputs_per_run=0)])
def test_bad_options(options):
    with pytest.raises(OptionError):
        CollectionOptions(**options)
