"""Statistics from calibrate(): exact against numpy, streamed, deterministic, saved and loaded."""

from __future__ import annotations

import weakref

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnxruntime.quantization import CalibrationDataReader

from edgeq.calibration.sources import TokenWindows
from edgeq.calibration.collect import (
    CalibrationOptions,
    CalibrationResult,
    Histogram,
    _FloatModel,
    _needed_nodes,
    _StreamingHistogram,
    calibrate,
    float_activation_names,
)
from edgeq.errors import CalibrationError, ExternalDataError, OptionError
from tests.calibration.models import identity, mlp, tiny_lm

MLP_TENSORS = ["x", "h", "r", "m", "y"]


def _samples(count: int, seed: int = 0, rows: int | None = None) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1 + i % 3, size=(rows or 1 + i % 4, 32)).astype(np.float32)}
            for i in range(count)]


def _reference(model: onnx.ModelProto, samples, names) -> dict[str, np.ndarray]:
    """Every value of each tensor over all samples, as calibrate's ONNX Runtime session computes
    them (weights fed as inputs), kept in full for numpy."""
    run = _FloatModel(model, None, threads=1).runner(names)
    runs = [run(sample) for sample in samples]
    return {name: np.concatenate([values[i].ravel() for values in runs]) for i, name in enumerate(names)}


def test_activations_match_a_plain_onnx_runtime_session():
    """Weights fed as inputs take other MLAS kernels than constant (prepacked) ones: the values
    agree to float32 rounding, not bit for bit."""
    model, samples = mlp(), _samples(12)
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    extended.graph.output.extend(onnx.ValueInfoProto(name=n) for n in ["h", "m"])
    session = ort.InferenceSession(extended.SerializeToString(), providers=["CPUExecutionProvider"])
    plain = [dict(zip(["y", "h", "m"], session.run(["y", "h", "m"], s), strict=True)) for s in samples]
    ours = _reference(model, samples, ["h", "m", "y"])
    for name in ["h", "m", "y"]:
        expected = np.concatenate([run[name].ravel() for run in plain])
        np.testing.assert_allclose(ours[name], expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def mlp_case():
    model, samples = mlp(), _samples(12)
    result = calibrate(model, samples, MLP_TENSORS, CalibrationOptions(channel_axis=-1))
    return model, samples, result, _reference(model, samples, MLP_TENSORS)


def test_min_max_and_counts_are_exact(mlp_case):
    _, _, result, reference = mlp_case
    assert list(result) == MLP_TENSORS and result.num_samples == 12
    for name, values in reference.items():
        stats = result[name]
        assert (stats.min, stats.max) == (float(values.min()), float(values.max())), name
        assert stats.count == values.size and stats.nonfinite == 0 and stats.dtype == "float32"


def test_histogram_equals_numpy_on_its_grid(mlp_case):
    _, _, result, reference = mlp_case
    for name, values in reference.items():
        hist = result[name].histogram
        counts, _ = np.histogram(values.astype(np.float64), bins=hist.edges())
        np.testing.assert_array_equal(hist.counts, counts, err_msg=name)
        assert 4096 // 2 <= len(hist.counts) <= 4096  # the grid keeps at least half the bins


@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.99])
def test_percentiles_match_numpy_within_a_bin(mlp_case, percentile):
    """The histogram's quantile lies in the bin of the order statistic numpy picks."""
    _, _, result, reference = mlp_case

    def order_statistic(values: np.ndarray, q: float) -> float:
        return float(np.sort(values)[max(int(np.ceil(q * values.size)) - 1, 0)])

    for name in ["x", "h", "y"]:
        values, stats = reference[name], result[name]
        width = stats.histogram.width
        tail = (100 - percentile) / 200
        lo, hi = stats.range("percentile", percentile=percentile)
        assert lo == pytest.approx(min(order_statistic(values, tail), 0), abs=width)
        assert hi == pytest.approx(max(order_statistic(values, 1 - tail), 0), abs=width)
        neg, pos = stats.range("percentile", symmetric=True, percentile=percentile)
        assert pos == -neg == pytest.approx(order_statistic(np.abs(values), percentile / 100), abs=width)


def test_per_channel_min_max(mlp_case):
    _, samples, result, _ = mlp_case
    from tests.calibration.models import mlp_reference

    model = mlp()
    hidden = np.concatenate([mlp_reference(model, s["x"])["r"] for s in samples])
    stats = result["r"]
    assert stats.channel_axis == 1
    np.testing.assert_allclose(stats.channel_min, hidden.min(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.channel_max, hidden.max(axis=0), rtol=1e-5, atol=1e-5)
    assert stats.channel_max.max() == stats.max and stats.channel_min.min() == stats.min
    lo, hi = stats.channel_range(symmetric=True)
    np.testing.assert_array_equal(hi, -lo)
    assert (hi >= 0).all()


def test_per_channel_along_the_batch_axis_is_exact():
    samples = _samples(5, rows=3)
    result = calibrate(mlp(), samples, ["x"], CalibrationOptions(channel_axis=0, histogram=False))
    stacked = np.stack([s["x"] for s in samples])  # [sample, row, 32]
    np.testing.assert_array_equal(result["x"].channel_min, stacked.min(axis=(0, 2)))
    np.testing.assert_array_equal(result["x"].channel_max, stacked.max(axis=(0, 2)))
    assert result["x"].histogram is None


def test_channel_count_must_not_change():
    with pytest.raises(CalibrationError, match="'x' has 2 channels on axis 0"):
        calibrate(mlp(), _samples(3), ["x"], CalibrationOptions(channel_axis=0))


def test_ranges_always_contain_zero(mlp_case):
    result = mlp_case[2]
    for method in ["minmax", "percentile", "entropy", "mse"]:
        for symmetric in (False, True):
            for name, (lo, hi) in result.ranges(method, symmetric).items():
                assert lo <= 0 <= hi, (method, name)
                if symmetric:
                    assert lo == -hi
    assert result["r"].range("minmax") == (0.0, result["r"].max)


# --- ranges on a known distribution ---------------------------------------------------------

@pytest.fixture(scope="module")
def gaussian_with_outliers():
    rng = np.random.default_rng(7)
    samples = [{"x": rng.normal(0, 1, 100_000).astype(np.float32)} for _ in range(10)]
    samples[3]["x"][17] = 100.0
    samples[8]["x"][5] = -100.0
    values = np.concatenate([s["x"] for s in samples]).astype(np.float64)
    return calibrate(identity(), samples, ["x", "y"]), values


def _fake_quant_mse(values: np.ndarray, lo: float, hi: float, symmetric: bool) -> float:
    if symmetric:
        scale = hi / 127
        quantized = np.clip(np.round(values / scale), -127, 127) * scale
    else:
        scale = (hi - lo) / 255
        zero_point = np.round(-lo / scale)
        quantized = (np.clip(np.round(values / scale) + zero_point, 0, 255) - zero_point) * scale
    return float(np.mean((values - quantized) ** 2))


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_range_is_near_the_true_optimum(gaussian_with_outliers, symmetric):
    result, values = gaussian_with_outliers
    lo, hi = result["y"].range("mse", symmetric)
    assert 2.5 < hi < 50 and lo < 0  # clips the two outliers at +-100
    ours = _fake_quant_mse(values, lo, hi, symmetric)
    grid = np.linspace(0.02, 1, 200)  # shrink factors of [-100, 100]
    best = min(_fake_quant_mse(values, -100 * s, 100 * s, symmetric) for s in grid)
    assert ours <= 1.05 * best
    assert ours < 0.5 * _fake_quant_mse(values, -100, 100, symmetric)


def test_entropy_and_percentile_clip_outliers(gaussian_with_outliers):
    stats = gaussian_with_outliers[0]["y"]
    assert (stats.min, stats.max) == (-100.0, 100.0)
    lo, hi = stats.range("entropy", symmetric=True)
    assert 2.5 < hi < 10  # well inside the outliers, beyond the Gaussian's bulk
    lo, hi = stats.range("entropy")
    assert -10 < lo < -2.5 and 2.5 < hi < 10
    _, p9999 = stats.range("percentile", symmetric=True, percentile=99.99)
    assert 3.5 < p9999 < 4.5  # |N(0,1)| 99.99th percentile is 3.89


def test_mse_keeps_the_range_of_a_uniform_tensor():
    rng = np.random.default_rng(3)
    result = calibrate(identity(), [{"x": rng.uniform(-1, 1, 50_000).astype(np.float32)}], ["x"])
    lo, hi = result["x"].range("mse", symmetric=True)
    assert 0.98 < hi <= 1.0


def test_graph_input_and_identity_output_agree(gaussian_with_outliers):
    x, y = gaussian_with_outliers[0]["x"], gaussian_with_outliers[0]["y"]
    np.testing.assert_array_equal(x.histogram.counts, y.histogram.counts)


def test_one_sided_entropy_uses_all_levels():
    rng = np.random.default_rng(5)
    result = calibrate(identity(), [{"x": np.abs(rng.normal(0, 1, 200_000)).astype(np.float32)}], ["x"])
    lo, hi = result["x"].range("entropy")
    assert lo == 0 and 2 < hi <= result["x"].max


# --- the streaming histogram ------------------------------------------------------------------

def _histogram_in_blocks(blocks: list[np.ndarray]) -> Histogram:
    stream = _StreamingHistogram(256)
    for block in blocks:
        if block.size:
            stream.add(block.astype(np.float64), float(block.min()), float(block.max()))
    return stream.result()


@pytest.mark.parametrize("seed", range(5))
def test_histogram_is_independent_of_order_and_blocks(seed):
    rng = np.random.default_rng(seed)
    rest = np.concatenate([rng.normal(0, 1e-6, 100), rng.standard_cauchy(1000),
                           [-1e-30, 5e-39, 3.0]]).astype(np.float32)
    zeros = np.zeros(7, np.float32)
    whole = _histogram_in_blocks([np.concatenate([rest, zeros])])
    cuts = np.sort(rng.choice(np.arange(1, rest.size), 20, replace=False))
    streamed = _histogram_in_blocks([zeros, *np.split(rng.permutation(rest), cuts)])  # zeros first
    assert (streamed.exponent, streamed.first_bin) == (whole.exponent, whole.first_bin)
    np.testing.assert_array_equal(streamed.counts, whole.counts)
    assert whole.counts.sum() == rest.size + 7 and whole.counts[0] and whole.counts[-1]
    assert 128 <= len(whole.counts) <= 256


def test_all_zero_tensor():
    result = calibrate(identity(), [{"x": np.zeros(10, np.float32)}], ["x"])
    stats = result["x"]
    assert (stats.min, stats.max, stats.count) == (0.0, 0.0, 10)
    assert list(stats.histogram.counts) == [10]
    for method in ["minmax", "percentile", "entropy", "mse"]:
        assert stats.range(method) == (0.0, 0.0)


def test_non_finite_activations_are_counted_apart():
    graph = helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "log",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = calibrate(model, [{"x": np.array([0, 1, np.e, 0], np.float32)}], ["y"],
                       CalibrationOptions(channel_axis=0))
    stats = result["y"]
    assert (stats.count, stats.nonfinite, stats.min) == (2, 2, 0.0)
    assert stats.max == pytest.approx(1.0)
    assert np.isnan(stats.channel_min[0]) and stats.channel_min[1] == 0.0


# --- bounded streaming ----------------------------------------------------------------------

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
    result = calibrate(mlp(), samples, MLP_TENSORS, CalibrationOptions(outputs_per_run=2))
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


# --- determinism, chunks, sources, save/load ---------------------------------------------

def _assert_same_stats(a: CalibrationResult, b: CalibrationResult) -> None:
    assert list(a) == list(b) and a.num_samples == b.num_samples
    for name in a:
        x, y = a[name], b[name]
        assert (x.min, x.max, x.count, x.nonfinite, x.dtype, x.channel_axis) == \
               (y.min, y.max, y.count, y.nonfinite, y.dtype, y.channel_axis), name
        assert (x.histogram is None) == (y.histogram is None)
        if x.histogram is not None:
            assert (x.histogram.exponent, x.histogram.first_bin) == (y.histogram.exponent, y.histogram.first_bin)
            np.testing.assert_array_equal(x.histogram.counts, y.histogram.counts)
        for field in ("channel_min", "channel_max"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field))


def test_deterministic_across_runs_chunks_and_sample_order(mlp_case):
    model, samples, result, _ = mlp_case
    options = CalibrationOptions(channel_axis=-1)
    _assert_same_stats(result, calibrate(model, samples, MLP_TENSORS, options))
    chunked = CalibrationOptions(channel_axis=-1, outputs_per_run=2)
    _assert_same_stats(result, calibrate(model, samples, MLP_TENSORS, chunked))
    _assert_same_stats(result, calibrate(model, samples[::-1], MLP_TENSORS, options))


def test_save_and_load_round_trip(mlp_case, tmp_path):
    result = mlp_case[2]
    result.save(tmp_path / "stats.npz")
    loaded = CalibrationResult.load(tmp_path / "stats.npz")
    _assert_same_stats(result, loaded)
    for method in ["minmax", "percentile", "entropy", "mse"]:
        assert loaded.ranges(method, True) == result.ranges(method, True)
    with pytest.raises(ValueError):
        loaded["x"].histogram.counts[0] = 1  # frozen arrays


def test_load_rejects_other_files(tmp_path):
    np.savez(tmp_path / "other.npz", a=np.ones(3))
    with pytest.raises(CalibrationError, match="not an edgeq calibration file"):
        CalibrationResult.load(tmp_path / "other.npz")


def test_reader_directory_and_path_model_give_the_same_stats(mlp_case, tmp_path):
    model, samples, _, _ = mlp_case
    expected = calibrate(model, samples, ["h", "y"])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(samples)

        def get_next(self):
            return next(self.items, None)

    _assert_same_stats(expected, calibrate(model, Reader(), ["h", "y"]))
    folder = tmp_path / "calib"
    folder.mkdir()
    for index, sample in enumerate(samples):
        np.savez(folder / f"{index:02d}.npz", **sample)
    onnx.save(model, tmp_path / "mlp.onnx", save_as_external_data=True, location="mlp.data",
              size_threshold=0)
    _assert_same_stats(expected, calibrate(tmp_path / "mlp.onnx", folder, ["h", "y"]))


def test_missing_external_data(tmp_path):
    onnx.save(mlp(), tmp_path / "mlp.onnx", save_as_external_data=True, location="mlp.data", size_threshold=0)
    (tmp_path / "mlp.data").unlink()
    with pytest.raises(ExternalDataError, match="w1"):
        calibrate(tmp_path / "mlp.onnx", _samples(2), ["h"])


def test_token_windows_into_a_language_model():
    result = calibrate(tiny_lm(), TokenWindows(np.arange(640) % 100, 16, 4), ["embedded", "logits"])
    assert result["embedded"].count == 4 * 16 * 16 and result.num_samples == 4


def test_calibration_errors_from_data_surface_before_running():
    bad = _samples(3)
    bad[0]["x"] = bad[0]["x"].astype(np.int32)
    with pytest.raises(CalibrationError, match="'x' is int32"):
        calibrate(mlp(), bad, ["h"])


# --- requests and options -------------------------------------------------------------------

@pytest.mark.parametrize("tensors, message", [
    (["hh"], "'hh' is not a tensor.*did you mean 'h'"),
    (["w1"], "'w1' is a weight"),
    ([], "no tensors"),
])
def test_bad_tensor_requests(tensors, message):
    with pytest.raises(OptionError, match=message):
        calibrate(mlp(), _samples(2), tensors)


def test_integer_tensor_request():
    with pytest.raises(OptionError, match="'input_ids' is int64"):
        calibrate(tiny_lm(), TokenWindows(np.arange(64), 8, 2), ["input_ids"])


def test_histogram_ranges_need_histograms():
    result = calibrate(mlp(), _samples(2), ["h"], CalibrationOptions(histogram=False))
    assert result["h"].range("minmax")[1] == result["h"].max
    with pytest.raises(OptionError, match="needs a histogram"):
        result["h"].range("entropy")
    with pytest.raises(OptionError, match="unknown range method"):
        result["h"].range("kl")


@pytest.mark.parametrize("options", [dict(histogram_bins=4), dict(threads=0), dict(outputs_per_run=0)])
def test_bad_options(options):
    with pytest.raises(OptionError):
        CalibrationOptions(**options)


def test_float_activation_names():
    assert float_activation_names(mlp()) == MLP_TENSORS
    assert float_activation_names(tiny_lm()) == ["embedded", "mask_float", "mask_3d", "masked", "logits"]


def test_only_the_nodes_leading_to_the_outputs_run():
    graph = mlp().graph
    assert [n.output[0] for n in _needed_nodes(graph, ["r"])] == ["h", "r"]
    assert len(_needed_nodes(graph, ["y"])) == 4
