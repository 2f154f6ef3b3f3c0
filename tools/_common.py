"""Helpers shared by the scripts in tools/ (not installed): paths, machine line, tables."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from edgeq.models.evaluation import EvalResult

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO_ROOT.parent / "shared"


def machine_line() -> str:
    """CPU model, core count and the x86 features that matter for int8 kernels."""
    model, flags = platform.processor() or "unknown CPU", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    features = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                if f in flags]
    return f"{model}, {os.cpu_count()} cores, {' '.join(features) or 'no AVX2'}"


def run_header() -> list[str]:
    import onnxruntime

    return [f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}",
            f"date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"machine: {machine_line()}",
            f"onnxruntime {onnxruntime.__version__}, python {platform.python_version()}",
            load_line("at start")]


def load_line(when: str) -> str:
    """Timings mean little on a loaded machine: say how loaded it was."""
    one, five, fifteen = os.getloadavg()
    return f"load average {when} (1/5/15 min): {one:.1f} / {five:.1f} / {fifteen:.1f}"


def metric_text(result: EvalResult) -> str:
    m = result.metrics
    if "perplexity" in m:
        return f"ppl {m['perplexity']:.3f}"
    return f"cos mean {m['cosine_mean']:.5f} / min {m['cosine_min']:.5f}"


def markdown_table(rows: Sequence[tuple[str, str, EvalResult]]) -> str:
    """Rows of (model, method, result) as a markdown table."""
    lines = ["| model | method | metric | size (MB) | load (s) | eval (s) | peak RSS (MiB) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for model, method, r in rows:
        lines.append(f"| {model} | {method} | {metric_text(r)} | {r.file_bytes / 1e6:.1f} | "
                     f"{r.load_s:.1f} | {r.eval_s:.1f} | {r.peak_rss_bytes / 2**20:.0f} |")
    return "\n".join(lines)
