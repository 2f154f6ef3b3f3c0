"""One stacked .npz whose arrays have the model inputs' own rank: the leading axis is the batch
axis and each row is a sample (batch 1), as `../shared/reference/minilm_inputs.npz` ([32, 128]
token ids for a model taking [batch, sequence]) is written; arrays with one more axis keep the
sample-axis reading. Views name their samples (the report's held-out samples)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.calibration.sources import NpzStackedSource, open_source, split, subset
from tests.calibration.models import mlp, tiny_lm


def test_a_batch_axis_of_the_inputs_rank_gives_one_sample_per_row(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)   # mlp takes x [batch, 32]
    np.savez(tmp_path / "rows.npz", x=x)
    source = open_source(tmp_path / "rows.npz", mlp())
    assert isinstance(source, NpzStackedSource) and source.batch_axis and len(source) == 5
    samples = list(source)
    assert [s["x"].shape for s in samples] == [(1, 32)] * 5
    np.testing.assert_array_equal(np.concatenate([s["x"] for s in samples]), x)


def test_a_sample_axis_in_front_is_still_read_as_before(tmp_path):
    x = np.random.default_rng(0).normal(size=(3, 2, 32)).astype(np.float32)
    np.savez(tmp_path / "stacked.npz", x=x)
    source = open_source(tmp_path / "stacked.npz", mlp())
    assert not source.batch_axis and [s["x"].shape for s in source] == [(2, 32)] * 3


def test_token_ids_with_a_batch_axis_like_the_shared_minilm_inputs(tmp_path):
    ids = np.random.default_rng(1).integers(0, 100, (32, 128)).astype(np.int64)
    np.savez(tmp_path / "inputs.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    source = open_source(tmp_path / "inputs.npz", tiny_lm())
    assert len(source) == 32
    first = next(iter(source))
    assert first["input_ids"].shape == (1, 128)
    np.testing.assert_array_equal(first["input_ids"][0], ids[0])


def test_the_shared_minilm_inputs_open_as_32_samples(shared_dir):
    source = open_source(shared_dir / "reference" / "minilm_inputs.npz", _minilm_like_inputs())
    assert len(source) == 32 and next(iter(source))["input_ids"].shape == (1, 128)


def _minilm_like_inputs():
    import onnx
    from onnx import TensorProto, helper

    names = ("input_ids", "attention_mask", "token_type_ids")
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in names]
    nodes = [helper.make_node("Cast", [n], [f"{n}_f"], to=TensorProto.FLOAT) for n in names]
    nodes.append(helper.make_node("Sum", [f"{n}_f" for n in names], ["y"]))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_mixed_ranks_are_an_error_naming_the_input(tmp_path):
    ids = np.zeros((4, 8), np.int64)
    np.savez(tmp_path / "mixed.npz", input_ids=ids, attention_mask=ids[:, None, :])
    from edgeq.errors import CalibrationError

    with pytest.raises(CalibrationError, match="attention_mask|input_ids"):
        list(open_source(tmp_path / "mixed.npz", tiny_lm()))


def test_views_name_their_samples_and_subsets_keep_the_order(tmp_path):
    np.savez(tmp_path / "rows.npz", x=np.zeros((6, 32), np.float32))
    source = open_source(tmp_path / "rows.npz", mlp())
    calib, held = split(source, 2)
    assert held.sample_names() == [f"{tmp_path / 'rows.npz'} sample 4", f"{tmp_path / 'rows.npz'} sample 5"]
    picked = subset(source, [0, 2, 5])
    assert len(picked) == 3 and picked.sample_names()[-1].endswith("sample 5")
    with pytest.raises(ValueError):
        subset(source, [3, 1])
