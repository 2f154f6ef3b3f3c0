"""Weights read on demand, so a builder holds one tensor at a time beside the ONNX proto."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np


class LazyWeights(Mapping[str, np.ndarray]):
    """A read-only mapping name -> array whose values are loaded when looked up (not cached)."""

    def __init__(self, names: Iterable[str], load: Callable[[str], np.ndarray]):
        self._names = frozenset(names)
        self._load = load

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        return self._load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._names))

    def __len__(self) -> int:
        return len(self._names)
