"""The package folder every mode writes: built in a temporary folder beside the destination and
moved into place at the end (an interrupted package never leaves half a folder), and the list
of files with their sizes and roles."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from edgeq.errors import EdgeqError


class PackageError(EdgeqError):
    """The compiled model cannot be packaged in the asked form (its inputs/outputs, a missing
    tokenizer, a folder in the way)."""


@dataclass(frozen=True)
class PackagedFile:
    name: str
    bytes: int
    role: str          # model, weights, config, tokenizer, readme


@dataclass
class Package:
    """What a mode wrote: the folder and its files."""

    folder: Path
    mode: str
    files: list[PackagedFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, role: str) -> None:
        self.files.append(PackagedFile(name, (self.folder / name).stat().st_size, role))

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def bytes_by_role(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.files:
            out[f.role] = out.get(f.role, 0) + f.bytes
        return out

    def to_text(self) -> str:
        lines = [f"{self.mode} package: {self.folder}"]
        lines += [f"  {f.name:<32} {f.bytes:>12,d} B  {f.role}" for f in self.files]
        lines.append(f"  {'total':<32} {self.total_bytes:>12,d} B")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"folder": str(self.folder), "mode": self.mode, "total_bytes": self.total_bytes,
                "files": [{"name": f.name, "bytes": f.bytes, "role": f.role} for f in self.files],
                "notes": list(self.notes)}


@contextmanager
def package_folder(destination: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder to fill; on success it replaces `destination` (which must not exist
    or be an empty folder, or, with `overwrite`, may be an earlier package)."""
    destination = Path(destination)
    if destination.exists():
        if not destination.is_dir():
            raise PackageError(f"'{destination}' exists and is not a folder", fix="give -o a folder path")
        if any(destination.iterdir()) and not overwrite:
            raise PackageError(f"folder '{destination}' is not empty", fix="give an empty or new folder, or --overwrite")
    destination.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        yield work
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(work, destination)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
