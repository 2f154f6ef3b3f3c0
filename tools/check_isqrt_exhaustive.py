"""Check the integer square root graph on every int32 value, in chunks, under ONNX Runtime.

Every non-negative n must give floor(sqrt(n)); every negative n gives 0 (the kernel clamps).
The expected root comes from float64 sqrt (correctly rounded) with an integer fix-up, not from
the kernel's own numpy reference. Usage:

    python tools/check_isqrt_exhaustive.py [--chunk-bits 23] [--threads 2] [--non-negative-only]
           [--with-reference]   # also check the numpy reference (about 10x slower)
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnxruntime as ort

from edgeq.backends.fpga.integer import IntGraphBuilder, ISqrt, QTensor


def exact_isqrt(n: np.ndarray) -> np.ndarray:
    """floor(sqrt(n)) for 0 <= n < 2^53, independent of the kernel: float sqrt, then fix by one."""
    n = n.astype(np.int64)
    root = np.floor(np.sqrt(n.astype(np.float64))).astype(np.int64)
    root -= (root * root > n).astype(np.int64)
    root += ((root + 1) * (root + 1) <= n).astype(np.int64)
    return root


def build_session(threads: int) -> ort.InferenceSession:
    builder = IntGraphBuilder(prefix="isqrt_check")
    n = QTensor("n", np.int32, 1.0)
    root = ISqrt(value_bits=31).emit(builder, builder.declare(n))
    model = builder.to_model([(n, ["N"])], [QTensor(root, np.int32, 1.0)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def check_chunk(session: ort.InferenceSession, start: int, stop: int, with_reference: bool) -> int:
    """Number of mismatches in [start, stop); prints the first one."""
    n = np.arange(start, stop, dtype=np.int64).astype(np.int32)
    got = session.run(None, {"n": n})[0].astype(np.int64)
    expected = exact_isqrt(np.maximum(n, 0))
    bad = got != expected
    if with_reference:
        bad |= ISqrt(31).reference(n).astype(np.int64) != expected
    if bad.any():
        i = int(np.argmax(bad))
        print(f"MISMATCH n={int(n[i])}: got {int(got[i])}, expected {int(expected[i])}", flush=True)
    return int(bad.sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunk-bits", type=int, default=23, help="2^k values per ORT call")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    parser.add_argument("--non-negative-only", action="store_true", help="check 0..2^31-1 only")
    parser.add_argument("--with-reference", action="store_true", help="also check the numpy reference")
    args = parser.parse_args(argv)

    session = build_session(args.threads)
    low = 0 if args.non_negative_only else -(1 << 31)
    high, chunk = 1 << 31, 1 << args.chunk_bits
    began, mismatches, checked = time.perf_counter(), 0, 0
    for start in range(low, high, chunk):
        stop = min(start + chunk, high)
        mismatches += check_chunk(session, start, stop, args.with_reference)
        checked += stop - start
        if (start - low) // chunk % 64 == 63:
            print(f"  {checked:,} values checked, {time.perf_counter() - began:.0f} s", flush=True)
    elapsed = time.perf_counter() - began
    verdict = "PASS" if mismatches == 0 else "FAIL"
    print(f"{verdict}: {checked:,} int32 values in [{low}, {high - 1}], {mismatches} mismatches, "
          f"{elapsed:.1f} s ({args.threads} ORT threads, {ISqrt(31).iterations} Newton iterations)")
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
