"""Decode-mode measurements of decoders with a KV cache (not installed; used by bench_genai.py).

- `full_window_nll`: the standard protocol on a cache model: each window in one run, empty cache.
- `teacher_forced_nll`: the same windows decoded token by token through the cache (a prefill of
  `prefill` tokens, then one token a step, the true next token fed each time), so every logit after
  the prefill reads keys/values back from the cache, quantized if the cache is.
- `ort_decode_speed`: greedy generation with ONNX Runtime at batch 1: prefill tokens/s (the prompt
  in one run) and decode tokens/s (one token a step, the cache carried present -> past).
- `genai_decode_speed`: the same through onnxruntime-genai's generation loop on a package folder.
- `cache_bytes_per_token`: what one token adds to the cache tensors, measured on the outputs.

Every loop feeds the cache inputs in their own dtypes (float, int8/uint8 codes, float16 scales), so a
quantized cache runs as the model declares it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
          "tensor(uint8)": np.uint8, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def past_inputs(session) -> list:
    return [i for i in session.get_inputs() if i.name.startswith("past")]


def empty_past(session, batch: int = 1, head_size: int | None = None) -> dict[str, np.ndarray]:
    """Zero-length cache inputs in the model's own dtypes ([B, H, 0, D]); `head_size` for a
    graph that leaves D symbolic (onnxruntime-genai's builder)."""
    def dim(d):
        return d if isinstance(d, int) else head_size
    return {i.name: np.zeros([batch, dim(i.shape[1]), 0, dim(i.shape[3])], _TYPES[i.type]) for i in past_inputs(session)}


def next_past(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name.replace("present", "past_key_values", 1): value for name, value in outputs.items()
            if name.startswith("present")}


def _feeds(session, ids: np.ndarray, start: int, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = {i.name for i in session.get_inputs()}
    feeds = {"input_ids": ids[None, :].astype(np.int64),
             "attention_mask": np.ones((1, start + len(ids)), np.int64), **past}
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(start, start + len(ids), dtype=np.int64)[None, :]
    return feeds


def next_token_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    predicted = logits[:-1].astype(np.float64)
    top = predicted.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(predicted - top).sum(axis=-1)) + top[:, 0]
    return float(np.mean(log_norm - predicted[np.arange(len(predicted)), ids[1:]]))


def full_window_nll(session, windows: np.ndarray, head_size: int | None = None) -> np.ndarray:
    out = []
    for window in windows:
        (logits,) = session.run(["logits"], _feeds(session, window, 0, empty_past(session, head_size=head_size)))
        out.append(next_token_nll(logits[0], window))
    return np.array(out)


def teacher_forced_logits(session, window: np.ndarray, prefill: int = 1) -> np.ndarray:
    names = [o.name for o in session.get_outputs()]
    past = empty_past(session)
    chunks, start = [], 0
    for end in [prefill, *range(prefill + 1, len(window) + 1)]:
        outputs = dict(zip(names, session.run(names, _feeds(session, window[start:end], start, past))))
        chunks.append(outputs["logits"][0])
        past = next_past(outputs)
        start = end
    return np.concatenate(chunks)


def teacher_forced_nll(session, windows: np.ndarray, prefill: int = 1) -> np.ndarray:
    return np.array([next_token_nll(teacher_forced_logits(session, w, prefill), w) for w in windows])


def cache_bytes_per_token(session, tokens: int = 8) -> float:
    """Bytes the present outputs grow by per token (all layers, codes and scales)."""
    names = [o.name for o in session.get_outputs()]
    ids = np.arange(1, tokens + 1, dtype=np.int64)
    outputs = dict(zip(names, session.run(names, _feeds(session, ids, 0, empty_past(session)))))
    return sum(v.nbytes for n, v in outputs.items() if n.startswith("present")) / tokens


def decode_weight_bytes(model_path: str | Path) -> dict[str, int]:
    """Weight bytes one decode step reads: every initializer a non-gather op consumes (MatMul,
    MatMulNBits, norms...), against the tables only gathered from (an embedding: one row a token).
    A table both gathered from and multiplied with (a tied LM head) counts once, as read."""
    import onnx

    model = onnx.load(str(model_path))
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    read = gathered = 0
    for tensor in model.graph.initializer:
        size = len(tensor.raw_data) if tensor.raw_data else onnx.numpy_helper.to_array(tensor).nbytes
        ops = consumers.get(tensor.name, set())
        if ops and ops <= {"Gather", "GatherBlockQuantized", "GatherElements"}:
            gathered += size
        else:
            read += size
    return {"read_per_decode_step": read, "gathered_tables": gathered}


@dataclass
class Speed:
    prefill_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    tokens: list[int]

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_s

    @property
    def decode_tps(self) -> float:
        return self.new_tokens / self.decode_s

    def row(self) -> dict:
        return {"prefill_tokens": self.prefill_tokens, "new_tokens": self.new_tokens,
                "prefill_tokens_per_s": round(self.prefill_tps, 1), "decode_tokens_per_s": round(self.decode_tps, 2),
                "prefill_s": round(self.prefill_s, 4), "decode_s": round(self.decode_s, 4)}


def ort_greedy(session, prompt: np.ndarray, new_tokens: int) -> Speed:
    """Greedy generation through the cache; the first token comes from the prefill's logits."""
    names = [o.name for o in session.get_outputs()]
    t0 = time.perf_counter()
    outputs = dict(zip(names, session.run(names, _feeds(session, prompt, 0, empty_past(session)))))
    t1 = time.perf_counter()
    tokens = [int(outputs["logits"][0, -1].argmax())]
    length = len(prompt)
    for _ in range(new_tokens - 1):
        outputs = dict(zip(names, session.run(names, _feeds(session, np.array(tokens[-1:]), length,
                                                            next_past(outputs)))))
        length += 1
        tokens.append(int(outputs["logits"][0, -1].argmax()))
    t2 = time.perf_counter()
    return Speed(len(prompt), new_tokens - 1, t1 - t0, t2 - t1, tokens)


def full_sequence_greedy(session, prompt: np.ndarray, new_tokens: int) -> list[int]:
    """Greedy tokens from running the whole sequence every step (no cache carried): the
    reference a cache path must reproduce."""
    sequence = list(prompt)
    tokens = []
    for _ in range(new_tokens):
        ids = np.array(sequence, np.int64)
        (logits,) = session.run(["logits"], _feeds(session, ids, 0, empty_past(session)))
        tokens.append(int(logits[0, -1].argmax()))
        sequence.append(tokens[-1])
    return tokens


def genai_model(folder: str | Path, threads: int = 0):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og.Model(config)


def genai_greedy(model, prompt: np.ndarray, new_tokens: int, *, force_length: bool = False) -> Speed:
    """onnxruntime-genai's loop: the prompt appended (the prefill: its logits give the first
    token), then one token a step. `force_length`: no end-of-sequence stop before `new_tokens`
    (a speed run; it changes the output only where EOS would win)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = len(prompt) + new_tokens
    params.set_search_options(max_length=total, min_length=total if force_length else 0, do_sample=False)
    generator = og.Generator(model, params)
    t0 = time.perf_counter()
    generator.append_tokens(np.asarray(prompt, np.int32))
    t1 = time.perf_counter()
    tokens = [int(generator.get_next_tokens()[0])] if generator.token_count() > len(prompt) else []
    while not generator.is_done() and len(tokens) < new_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    t2 = time.perf_counter()
    return Speed(len(prompt), max(len(tokens) - 1, 1), t1 - t0, t2 - t1, tokens)


def emulated_greedy(model: str | Path, prompt: np.ndarray, new_tokens: int, cpu: str, timeout: float = 3600) -> dict:
    """`ort_greedy`'s tokens from the aarch64 ONNX Runtime under QEMU (tools/aarch64_ort.py's
    emulation, set up): this file's `main` run by the emulated Python."""
    import tempfile

    from aarch64_ort import Emulator

    emulator = Emulator.load()
    with tempfile.TemporaryDirectory(prefix="edgeq-kv-arm-") as tmp:
        ids = Path(tmp) / "prompt.npy"
        np.save(ids, np.asarray(prompt, np.int64))
        args = [str(Path(model).resolve()), str(ids), str(new_tokens)]
        script = (f"import sys, runpy; sys.path.insert(0, {str(emulator.site)!r}); sys.argv = {['kv_decode.py', *args]!r}; "
                  f"runpy.run_path({str(Path(__file__).resolve())!r}, run_name='__main__')")
        out = emulator.python_call(cpu, "-c", script, timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """`python kv_decode.py MODEL PROMPT.npy TOKENS [--threads N]`: greedy tokens through the cache
    with ONNX Runtime (`ort_greedy`), printed as one JSON line. Needs only numpy and onnxruntime,
    so the emulated aarch64 Python runs it (`emulated_greedy`)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("prompt", help=".npy of token ids")
    parser.add_argument("tokens", type=int)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import platform

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    speed = ort_greedy(session, np.load(args.prompt).astype(np.int64), args.tokens)
    print(json.dumps({"machine": platform.machine(), "onnxruntime": ort.__version__, "tokens": speed.tokens}))


if __name__ == "__main__":
    main()
