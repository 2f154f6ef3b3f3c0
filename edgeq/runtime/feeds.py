"""Synthetic inputs for running a model when no data was given: N(0,1) floats, ones for
integer and boolean inputs (a valid token id and a full attention mask for text models)."""

from __future__ import annotations

import os

import numpy as np

from edgeq.runtime.sessions import make_session

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
              "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def synthetic_feeds(model_path: str | os.PathLike, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` feeds for the model's inputs, drawn with `seed`; dynamic dims become 1 (the
    first) or 16 (the others)."""
    session = make_session(model_path)
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for inp in session.get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else (1 if i == 0 else 16) for i, d in enumerate(inp.shape)]
            dtype = _ORT_TYPES.get(inp.type, np.float32)
            if np.issubdtype(dtype, np.floating):
                feed[inp.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_:
                feed[inp.name] = np.ones(shape, np.bool_)
            else:
                feed[inp.name] = np.ones(shape, dtype)
        feeds.append(feed)
    return feeds
