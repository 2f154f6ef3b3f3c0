"""Synthetic feeds: shapes from the model's inputs (dynamic dims 1 then 16), ones for integer
and boolean inputs, seeded normal floats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto as T
from onnx import helper

from edgeq.runtime.feeds import synthetic_feeds
from tests.runtime.models import write_model


def _text_model(path: Path) -> Path:
    """input_ids int64 [batch, seq], attention_mask bool [batch, seq], x float16 [batch, 3]."""
    inputs = [helper.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", T.BOOL, ["batch", "seq"]),
              helper.make_tensor_value_info("x", T.FLOAT16, ["batch", 3])]
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids_f"], to=T.FLOAT16),
             helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=T.FLOAT16),
             helper.make_node("Mul", ["ids_f", "mask_f"], ["y"]),
             helper.make_node("Identity", ["x"], ["x_out"])]
    outputs = [helper.make_tensor_value_info("y", T.FLOAT16, None),
               helper.make_tensor_value_info("x_out", T.FLOAT16, None)]
    return write_model(helper.make_graph(nodes, "text", inputs, outputs), path)


def test_shapes_dtypes_and_values(tmp_path: Path):
    feeds = synthetic_feeds(_text_model(tmp_path / "m.onnx"), 2)
    assert len(feeds) == 2
    for feed in feeds:
        assert feed["input_ids"].dtype == np.int64 and feed["input_ids"].shape == (1, 16)
        assert (feed["input_ids"] == 1).all()
        assert feed["attention_mask"].dtype == np.bool_ and feed["attention_mask"].all()
        assert feed["x"].dtype == np.float16 and feed["x"].shape == (1, 3)
    assert not np.array_equal(feeds[0]["x"], feeds[1]["x"])  # a new draw per sample


def test_same_seed_same_feeds(tmp_path: Path):
    path = _text_model(tmp_path / "m.onnx")
    first, again, other = (synthetic_feeds(path, 1, seed=s)[0]["x"] for s in (3, 3, 4))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
