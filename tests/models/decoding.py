"""Step-by-step decoding with a KV-cache graph, for comparing against the full-sequence graph."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


def empty_past(sess: ort.InferenceSession, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero-length past_key_values, shaped from the graph's static dims [B, kv_heads, P, d]."""
    return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
            for i in sess.get_inputs() if i.name.startswith("past_key_values.")}


def decode_with_cache(sess: ort.InferenceSession, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Logits [len(ids), V]: a prefill of `prefill` tokens, then one token per step."""
    past = empty_past(sess)
    out_names = [o.name for o in sess.get_outputs()]
    chunks, start = [], 0
    for end in [prefill, *range(prefill + 1, len(ids) + 1)]:
        feeds = {"input_ids": ids[None, start:end].astype(np.int64),
                 "attention_mask": np.ones((1, end), np.int64)}
        outputs = dict(zip(out_names, sess.run(out_names, feeds | past)))
        chunks.append(outputs["logits"][0])
        past = {name.replace("present.", "past_key_values."): value
                for name, value in outputs.items() if name.startswith("present.")}
        start = end
    return np.concatenate(chunks)
