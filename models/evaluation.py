"""Accuracy, time, size and peak memory of any ONNX file on edgeq's two standard tasks.

- SmolLM2 perplexity, the standard protocol of shared/README.md: windows 0..31 of 256 tokens
  of `reference/wikitext2_test_smollm2_ids.npy`, each scored alone, no BOS.
- MiniLM sentence-embedding cosine against a reference (the float model): 256 WikiText
  paragraphs, MiniLM's tokenizer (max length 128), mean pooling over the mask, L2 normalised;
  mean and minimum cosine.

The model runs in a child process (`python -m edgeq.models.evaluation`) that reports its own peak RSS
(VmHWM), so nothing of the caller's memory is in it: interpreter, numpy, ONNX Runtime and the
model are. Calibration samples come from data disjoint
from the evaluation data: SmolLM2 windows 1000 and later, MiniLM paragraphs after the 256.
`shared` is the team's read-only folder (`../shared` beside the repository).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeq.errors import EdgeqError

if TYPE_CHECKING:  # onnxruntime is imported where a model runs, not on import
    from onnxruntime import InferenceSession

    from edgeq.targets.base import Execution

SMOLLM2_IDS = "reference/wikitext2_test_smollm2_ids.npy"
WIKITEXT = "data/wikitext-2-raw-test.txt"
WINDOW_TOKENS = 256
EVAL_WINDOWS = range(0, 32)
CALIBRATION_FIRST_WINDOW = 1000  # shared/README.md: calibration never overlaps evaluation
MINILM_EVAL_PARAGRAPHS = 256
MINILM_MAX_LENGTH = 128
MINILM_BATCH = 32

Feeds = dict[str, np.ndarray]


class EvaluationError(EdgeqError):
    """The model could not be evaluated (it failed to load or run, or misses inputs/outputs)."""


# --- data ------------------------------------------------------------------------------------

def smollm2_windows(shared: Path, first: int, count: int, length: int = WINDOW_TOKENS) -> np.ndarray:
    """Non-overlapping windows first..first+count-1 of the token ids, int64 [count, length]."""
    ids = np.load(Path(shared) / SMOLLM2_IDS, mmap_mode="r")
    if (first + count) * length > len(ids):
        raise EvaluationError(f"the token file has only {len(ids) // length} windows of {length}")
    return np.asarray(ids[first * length:(first + count) * length], dtype=np.int64).reshape(count, length)


def smollm2_eval_windows(shared: Path) -> np.ndarray:
    return smollm2_windows(shared, EVAL_WINDOWS.start, len(EVAL_WINDOWS))


def smollm2_calibration_feeds(shared: Path, count: int = 16,
                              first: int = CALIBRATION_FIRST_WINDOW) -> list[Feeds]:
    """Calibration samples: one window each (batch 1), from window `first` (>= 1000) on."""
    if first < CALIBRATION_FIRST_WINDOW:
        raise EvaluationError(f"calibration window {first} may overlap evaluation data",
                              fix=f"start at window {CALIBRATION_FIRST_WINDOW} or later")
    return [_lm_feeds(window[None, :]) for window in smollm2_windows(shared, first, count)]


def wikitext_paragraphs(shared: Path) -> list[str]:
    """The WikiText-2 test paragraphs in file order: non-empty lines that are not ` = headings = `."""
    lines = (Path(shared) / WIKITEXT).read_text(encoding="utf-8").splitlines()
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("=")]


def minilm_eval_paragraphs(shared: Path) -> list[str]:
    return wikitext_paragraphs(shared)[:MINILM_EVAL_PARAGRAPHS]


def minilm_calibration_paragraphs(shared: Path, count: int = 16) -> list[str]:
    """Paragraphs following the evaluation ones, so the two never share a paragraph."""
    return wikitext_paragraphs(shared)[MINILM_EVAL_PARAGRAPHS:MINILM_EVAL_PARAGRAPHS + count]


def minilm_tokenize(texts: Sequence[str], tokenizer_json: Path | None = None,
                    max_length: int = MINILM_MAX_LENGTH) -> Feeds:
    """MiniLM's inputs for `texts`: int64 [n, max_length] each, truncated and padded."""
    from edgeq.models import minilm
    from edgeq.models._optional import require

    tokenizers = require("tokenizers", "tokenizing text for MiniLM")
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_json or minilm.tokenizer_path()))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(list(texts))
    return {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}


def minilm_calibration_feeds(shared: Path, count: int = 16) -> list[Feeds]:
    """Calibration samples (batch 1), from paragraphs disjoint from the evaluation ones."""
    inputs = minilm_tokenize(minilm_calibration_paragraphs(shared, count))
    return [{name: array[i:i + 1] for name, array in inputs.items()} for i in range(count)]


# --- metrics ---------------------------------------------------------------------------------

def next_token_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean negative log-likelihood of ids[1:] given logits[:-1] ([S, V] and [S])."""
    predicted = logits[:-1].astype(np.float64)
    top = predicted.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(predicted - top).sum(axis=-1)) + top[:, 0]
    target = predicted[np.arange(len(predicted)), ids[1:]]
    return float(np.mean(log_norm - target))


def perplexity(window_nll: np.ndarray) -> float:
    """exp of the mean NLL; the windows have equal length, so this is the token-level mean."""
    return math.exp(float(np.mean(window_nll)))


def mean_pool_normalize(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence-transformers' recipe: mean over the unmasked tokens, then L2 normalise."""
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


# --- running a model (in the child process) ----------------------------------------------------

def session(model: Path, threads: int = 0, execution: "Execution | None" = None, *,
            reference: bool = False) -> InferenceSession:
    """A session from edgeq's factory on `execution` (default: ONNX Runtime's CPU provider);
    threads=0 lets the runtime pick (one per physical core). `reference`: the execution's
    full-precision settings (the float model as the reference)."""
    from edgeq.runtime.sessions import make_session

    return make_session(str(model), threads, execution=execution, reference=reference)


def execution_of(target: str | None, provider: str | None) -> "Execution | None":
    """The execution `provider` of `target` (None: ONNX Runtime's CPU provider)."""
    if target is None or provider is None:
        return None
    from edgeq.registry import get_target

    return get_target(target).execution_named(provider)


def lm_window_nll(sess: InferenceSession, windows: np.ndarray) -> np.ndarray:
    """Each window scored on its own (batch 1): mean next-token NLL per window."""
    nll = []
    for window in windows:
        (logits,) = sess.run(["logits"], _lm_feeds(window[None, :]))
        nll.append(next_token_nll(logits[0], window))
    return np.array(nll)


def sentence_embeddings(sess: InferenceSession, inputs: Feeds, batch: int = MINILM_BATCH) -> np.ndarray:
    """Mean-pooled, normalised last_hidden_state for every row of `inputs`."""
    names = {i.name for i in sess.get_inputs()}
    rows = len(inputs["input_ids"])
    out = []
    for start in range(0, rows, batch):
        feeds = {k: v[start:start + batch] for k, v in inputs.items() if k in names}
        (hidden,) = sess.run(["last_hidden_state"], feeds)
        out.append(mean_pool_normalize(hidden, feeds["attention_mask"]))
    return np.concatenate(out)


def _lm_feeds(ids: np.ndarray) -> Feeds:
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


_RUNNERS = {"lm-nll": lambda sess, data: lm_window_nll(sess, data["windows"]),
            "embeddings": lambda sess, data: sentence_embeddings(sess, dict(data))}


def _child_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description="Run one model on prepared inputs (internal).")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--runner", choices=sorted(_RUNNERS), required=True)
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--outputs", type=Path, required=True)
    parser.add_argument("--timings", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--target")
    parser.add_argument("--provider")
    parser.add_argument("--reference", action="store_true")
    args = parser.parse_args(argv)
    data = dict(np.load(args.inputs))
    start = time.perf_counter()
    sess = session(args.model, args.threads, execution_of(args.target, args.provider), reference=args.reference)
    loaded = time.perf_counter()
    np.save(args.outputs, _RUNNERS[args.runner](sess, data))
    done = time.perf_counter()
    args.timings.write_text(json.dumps({"load_s": loaded - start, "eval_s": done - loaded,
                                        "peak_rss_bytes": _own_peak_rss_bytes()}))


def _own_peak_rss_bytes() -> int:
    """This process's peak RSS since exec (VmHWM).

    Not getrusage/wait4's ru_maxrss: Linux carries the parent's high-water mark over fork+exec
    into it, so a large caller would inflate the child's number."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- measured evaluation (in the caller) ------------------------------------------------------

@dataclass(frozen=True)
class Measurement:
    """What one child run produced: its outputs, times and peak resident memory."""
    outputs: np.ndarray
    load_s: float
    eval_s: float
    peak_rss_bytes: int


@dataclass(frozen=True)
class EvalResult:
    """One model on one task. Times are the child's session creation and evaluation loop;
    `peak_rss_bytes` is the child's VmHWM (interpreter, numpy and ONNX Runtime included)."""
    model: Path
    task: str
    metrics: dict[str, float]
    file_bytes: int
    load_s: float
    eval_s: float
    peak_rss_bytes: int
    outputs: np.ndarray = field(repr=False, compare=False)  # window NLLs or sentence embeddings

    def row(self) -> dict[str, object]:
        """JSON-ready summary (without the outputs)."""
        return {"model": str(self.model), "task": self.task, "metrics": self.metrics,
                "file_mb": self.file_bytes / 1e6, "load_s": self.load_s, "eval_s": self.eval_s,
                "peak_rss_mib": self.peak_rss_bytes / 2**20}


def measure(model: Path, runner: str, inputs: Feeds, threads: int = 0, *, target: str | None = None,
            provider: str | None = None, reference: bool = False) -> Measurement:
    """Run `model` on `inputs` in a child process; return its outputs, times and peak RSS. The
    child's session runs on `provider` of `target` (default: ONNX Runtime's CPU provider), with
    the full-precision settings if `reference`.

    runner "lm-nll": inputs {"windows": int64 [n, S]} -> mean next-token NLL per window [n];
    runner "embeddings": MiniLM's feeds -> normalised mean-pooled embeddings [n, hidden]."""
    model = Path(model)
    if not model.is_file():
        raise EvaluationError(f"model file not found: {model}")
    with tempfile.TemporaryDirectory(prefix="edgeq-eval-") as tmp:
        work = Path(tmp)
        np.savez(work / "inputs.npz", **inputs)
        cmd = [sys.executable, "-m", "edgeq.models.evaluation", "--model", str(model), "--runner", runner,
               "--inputs", str(work / "inputs.npz"), "--outputs", str(work / "outputs.npy"),
               "--timings", str(work / "timings.json"), "--threads", str(threads)]
        if target and provider:
            cmd += ["--target", target, "--provider", provider] + (["--reference"] if reference else [])
        _run_child(cmd, work / "log.txt", model)
        timings = json.loads((work / "timings.json").read_text())
        return Measurement(outputs=np.load(work / "outputs.npy"), load_s=timings["load_s"],
                           eval_s=timings["eval_s"], peak_rss_bytes=timings["peak_rss_bytes"])


def evaluate_smollm2(model: Path, shared: Path, threads: int = 0, *, target: str | None = None,
                     provider: str | None = None) -> EvalResult:
    """Perplexity on the standard protocol (windows 0..31 of 256 tokens), on `provider` of
    `target` (default ONNX Runtime's CPU provider)."""
    run = measure(model, "lm-nll", {"windows": smollm2_eval_windows(shared)}, threads, target=target,
                  provider=provider)
    return _result(model, "smollm2-wikitext2-ppl", {"perplexity": perplexity(run.outputs)}, run)


def evaluate_minilm(model: Path, shared: Path, reference: np.ndarray | None = None,
                    threads: int = 0, *, target: str | None = None, provider: str | None = None) -> EvalResult:
    """Cosine of the 256 paragraph embeddings to `reference` (None: the model is its own
    reference, as for the float model whose outputs then serve the others, run at full
    precision). `provider` of `target`: the runtime (default ONNX Runtime's CPU provider)."""
    run = measure(model, "embeddings", minilm_tokenize(minilm_eval_paragraphs(shared)), threads,
                  target=target, provider=provider, reference=reference is None)
    cosines = cosine_rows(run.outputs, run.outputs if reference is None else reference)
    return _result(model, "minilm-wikitext2-cosine",
                   {"cosine_mean": float(cosines.mean()), "cosine_min": float(cosines.min())}, run)


def model_file_bytes(model: Path) -> int:
    """The model file plus any external-data files it names."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    locations = {entry.value for tensor in _all_initializers(proto.graph)
                 for entry in tensor.external_data if entry.key == "location"}
    return model.stat().st_size + sum((model.parent / loc).stat().st_size for loc in locations)


def _all_initializers(graph):  # subgraphs (If/Loop bodies) may hold initializers too
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_initializers(sub)


def _result(model: Path, task: str, metrics: dict[str, float], run: Measurement) -> EvalResult:
    return EvalResult(model=Path(model), task=task, metrics=metrics,
                      file_bytes=model_file_bytes(Path(model)), load_s=run.load_s,
                      eval_s=run.eval_s, peak_rss_bytes=run.peak_rss_bytes, outputs=run.outputs)


def _run_child(cmd: list[str], log: Path, model: Path) -> None:
    with open(log, "w") as log_file:
        returncode = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT).returncode
    if returncode != 0:
        last = (log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise EvaluationError(f"evaluating {model} failed: {last}")


if __name__ == "__main__":
    _child_main(sys.argv[1:])
