"""Verification against float: run the float and the compiled model on the same feeds in ONNX
Runtime and measure, per output, how far the compiled one is (max and mean absolute error,
relative L2, cosine per row, SQNR), accumulated over samples."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from edgeq.progress import follow
from edgeq.runtime.sessions import make_session
from edgeq.runtime.execution import Execution


@dataclass
class OutputError:
    name: str
    max_abs: float
    mean_abs: float
    relative_l2: float
    cosine_min: float
    cosine_mean: float
    sqnr_db: float


@dataclass
class Verification:
    samples: int
    synthetic_inputs: bool
    outputs: list[OutputError] = field(default_factory=list)
    ran_on: str = ""    # where the compiled model ran: the provider (and device), e.g. the HTP

    @property
    def worst_relative_l2(self) -> float:
        return max((o.relative_l2 for o in self.outputs), default=0.0)


def compare_with_float(float_model: str | os.PathLike, compiled_model: str | os.PathLike,
                       feeds: list[Mapping[str, np.ndarray]], *, threads: int = 0,
                       synthetic: bool = False, execution: Execution | None = None,
                       progress: Any = None) -> Verification:
    """Run both models on the same feeds on `execution` (default: ORT's CPU provider): the float
    model at full precision (fp32) as the reference, the compiled one with the deployment
    settings; error of the compiled model per output. `progress` (see edgeq.progress) follows
    the runs."""
    with follow(progress, "verification runs", 2 * len(feeds), "run") as advance:
        # One session at a time: the float model's weights need not share the peak with the
        # compiled model's (the reference outputs are small beside them).
        reference = make_session(float_model, threads, execution=execution, reference=True)
        names = [o.name for o in reference.get_outputs()]
        expected = []
        for feed in feeds:
            expected.append(reference.run(names, dict(feed)))
            advance()
        del reference
        candidate = make_session(compiled_model, threads, execution=execution)

        def actual():
            for feed in feeds:
                outputs = candidate.run(names, dict(feed))
                advance()
                yield outputs

        result = Verification(samples=len(feeds), synthetic_inputs=synthetic, ran_on=_where(execution))
        result.outputs = output_errors(names, expected, actual())
    return result


def output_errors(names: Sequence[str], expected: Iterable[Sequence[np.ndarray]],
                  actual: Iterable[Sequence[np.ndarray]]) -> list[OutputError]:
    """The error of `actual` against `expected` per output name, over every sample (one list of
    arrays per sample, in the order of `names`); `actual` may be a generator."""
    acc: dict[str, dict[str, list[float]]] = {n: {"max": [], "abs": [], "num": [], "den": [], "cos": []}
                                              for n in names}
    for ref_out, cand_out in zip(expected, actual):
        for name, r, c in zip(names, ref_out, cand_out):
            r64, c64 = np.asarray(r, np.float64), np.asarray(c, np.float64)
            diff = r64 - c64
            a = acc[name]
            a["max"].append(float(np.max(np.abs(diff))) if diff.size else 0.0)
            a["abs"].append(float(np.mean(np.abs(diff))) if diff.size else 0.0)
            a["num"].append(float(np.sum(diff**2)))
            a["den"].append(float(np.sum(r64**2)))
            a["cos"].extend(row_cosines(r64, c64))
    errors = []
    for name in names:
        a = acc[name]
        num, den = sum(a["num"]), sum(a["den"])
        errors.append(OutputError(
            name=name, max_abs=max(a["max"], default=0.0), mean_abs=float(np.mean(a["abs"])) if a["abs"] else 0.0,
            relative_l2=float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num)),
            cosine_min=min(a["cos"], default=1.0), cosine_mean=float(np.mean(a["cos"])) if a["cos"] else 1.0,
            sqnr_db=10 * np.log10(den / num) if num > 0 and den > 0 else float("inf")))
    return errors


def row_cosines(ref: np.ndarray, cand: np.ndarray) -> list[float]:
    """Cosine per last-axis vector (per token/position), the usual per-row fidelity measure;
    rows where either vector is zero are left out."""
    if ref.ndim == 0 or ref.size == 0:
        return []
    r = ref.reshape(-1, ref.shape[-1])
    c = cand.reshape(-1, cand.shape[-1])
    norms = np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1)
    ok = norms > 0
    return list((np.sum(r[ok] * c[ok], axis=1) / norms[ok]).astype(float))


def _where(execution: Execution | None) -> str:
    if execution is None:
        return "CPUExecutionProvider"
    return execution.provider + (f" ({execution.device})" if execution.device else "")
