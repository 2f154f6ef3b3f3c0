"""The choices one lowering run takes: the target's activation and weight specs made
power-of-two and symmetric, and the lower-to-integer pass's options (checked by the pass)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from edgeq.targets.base import QSpec


@dataclass(frozen=True)
class LoweringOptions:
    """act/weight: the int8 activation and the weight specs (power-of-two scales, symmetric).
    first_norm: "integer" (the first LayerNorm in the datapath) or "host".
    equalization: None for one scale per tensor, else alpha of the per-channel power-of-two factors,
    capped at 2^-max_channel_shift.
    probability_bits: 8 or 16 (softmax output). residual_bits: 8 or 16 (LayerNorm outputs).
    rotate: online Walsh-Hadamard transforms before linear layers' int8 requantization.
    scale_choice: "cover" (range rounded up to a power of two) or "mse" (least expected error).
    weights_by_op: a linear's own weight spec where a budget chose its width (by op name)."""

    act: QSpec
    weight: QSpec
    first_norm: str
    equalization: float | None
    max_channel_shift: int
    probability_bits: int
    residual_bits: int
    rotate: bool
    scale_choice: str
    weights_by_op: Mapping[str, QSpec] = field(default_factory=dict)

    def weight_for(self, op_name: str) -> QSpec:
        return self.weights_by_op.get(op_name, self.weight)
