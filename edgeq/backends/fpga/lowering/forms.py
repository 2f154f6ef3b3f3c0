"""The integer form of a float tensor (its integer tensor, dtype and power-of-two scale) and the
exponent arithmetic between forms: every change of scale is a shift by an exact power of two."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.backends.fpga.integer.fixedpoint import pow2_exponent
from edgeq.errors import OptionError

INT8 = np.dtype(np.int8)
UINT8 = np.dtype(np.uint8)
INT16 = np.dtype(np.int16)
INT32 = np.dtype(np.int32)
INT64 = np.dtype(np.int64)
UINT16 = np.dtype(np.uint16)


@dataclass(frozen=True)
class Form:
    """The integer representation of a float tensor: real = int * scale."""

    name: str
    dtype: np.dtype
    scale: np.ndarray           # float64, () per tensor or (C,) per last-axis channel
    unit: str = ""              # hardware unit that produced it
    mask: str | None = None     # additive attention mask still to be applied (masked scores)

    @property
    def per_tensor(self) -> bool:
        return self.scale.ndim == 0


def scale_field(scale: np.ndarray) -> float | tuple[float, ...]:
    """A step's scale field: a float per tensor, a tuple per channel."""
    return float(scale) if np.ndim(scale) == 0 else tuple(float(s) for s in scale)


def exponent(ratio: np.ndarray, what: str) -> int | tuple[int, ...]:
    """e with ratio == 2^e exactly (per element); a non-power-of-two ratio is an error."""
    flat = np.ravel(ratio)
    ks = [pow2_exponent(float(r)) for r in flat]
    if any(k is None for k in ks):
        raise OptionError(f"{what}: scale ratio {flat[[k is None for k in ks]][0]!r} is not a power of two, "
                          "so requantizing would need a multiplier",
                          fix="the fpga target is shift-only; this pattern is not supported")
    exps = [-k for k in ks]
    return exps[0] if np.ndim(ratio) == 0 else tuple(exps)
