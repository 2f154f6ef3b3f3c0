"""Per-layer weight widths under a size budget: the stored bytes of each width and the choice of
widths that meets a byte budget at the least summed error (a multiple-choice knapsack).

A *unit* is one weight tensor with the ops that read it (a weight read by two ops is stored,
and chosen, once); its choices are the widths it may take (int4, int8, float), each with the
bytes insert-qdq stores for it and an error estimate (`passes/size_budget.py` says which).
`choose` solves the knapsack exactly on a grid of `GRID_CELLS` cells spanning the model's
whole range (all narrowest .. all float), sizes rounded up to whole cells: the choice never
exceeds the budget, and since the grid does not depend on the budget, a larger budget can
only lower the summed error (every choice that fit the smaller one still fits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgeq.errors import OptionError
from edgeq.pipeline.artifacts import ArtifactKey
from edgeq.targets.base import Granularity, LinearLatencies, QSpec

# Cells of the knapsack grid: a unit's size is rounded up to a cell, so the bytes left unused
# are at most one cell per unit (SmolLM2: 212 units, ~7 KB cells, under 1.5 MB of 651 MB).
GRID_CELLS = 1 << 16
# Upper estimates of the protos around the arrays: a node with its names (a compiled tiny Llama:
# 255 bytes a node, SmolLM2's float export 173), the provenance metadata edgeq records.
PROTO_BYTES_PER_OP = 320
METADATA_BYTES = 8192


@dataclass(frozen=True)
class Width:
    """One way to store a unit's weight: `dtype` int4/int8 (spec set) or float (spec None)."""

    dtype: str
    spec: QSpec | None
    nbytes: int
    error: float = 0.0


@dataclass
class Unit:
    """A weight tensor, the planned ops reading it and the widths it may take (narrowest first)."""

    weight: str
    ops: list[str]
    widths: list[Width] = field(default_factory=list)
    kind: str = "linear"          # "linear" or "embedding"
    transposed: bool = False      # a linear's weight is stored [N, K] (Gemm transB)


@dataclass
class BudgetChoice:
    """The outcome, for the report: budget and bytes, and each unit's width."""

    budget_bytes: int
    fixed_bytes: int              # constants the budget does not choose (norms, biases, rotations) and protos
    weight_bytes: int             # the chosen units' stored bytes
    reachable: tuple[int, int]    # all narrowest .. all float (with the fixed bytes)
    error: float                  # summed error estimate of the choice
    widths: dict[str, str] = field(default_factory=dict)   # the unit's first op's name -> dtype

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.weight_bytes

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for dtype in self.widths.values():
            out[dtype] = out.get(dtype, 0) + 1
        return out


SIZE_BUDGET: ArtifactKey[BudgetChoice] = ArtifactKey("size budget choice", "size-budget")


@dataclass
class LatencyChoice:
    """The outcome, for the report: budget and estimated latency (seconds), each linear's width."""

    budget_s: float
    estimated_s: float
    reachable_s: tuple[float, float]   # every priced linear at its narrowest .. at its widest width
    device: str
    how: str
    error: float
    widths: dict[str, str] = field(default_factory=dict)   # the unit's first op's name -> dtype

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for dtype in self.widths.values():
            out[dtype] = out.get(dtype, 0) + 1
        return out

    def describe(self) -> str:
        counts = ", ".join(f"{n} {dtype}" for dtype, n in sorted(self.counts().items()))
        return (f"{1e3 * self.budget_s:g} ms on {self.device}: {1e3 * self.estimated_s:.3f} ms estimated "
                f"({counts} linears; reachable {1e3 * self.reachable_s[0]:.3f}..{1e3 * self.reachable_s[1]:.3f} ms; "
                f"{self.how})")


LATENCY_BUDGET: ArtifactKey[LatencyChoice] = ArtifactKey("latency budget choice", "latency-budget")
# Each linear's latency at each width on the device, put in the context by the compile (which
# prices a compile at the preset's widths) for the latency-budget pass.
LINEAR_LATENCIES: ArtifactKey[LinearLatencies] = ArtifactKey("linear latencies on the device", "compile")
# The float model file's bytes (.onnx and external data), put in the context by the compile so a
# budget given as a ratio is a ratio of the file the user has.
FLOAT_FILE_BYTES: ArtifactKey[int] = ArtifactKey("float model file bytes", "compile")


# Linear widths a budget offers, narrowest first: the preset's width and the wider ones.
LINEAR_DTYPES = ("int4", "int8")


def offered_dtypes(target, weight_dtype: str) -> tuple[str, ...]:
    """The linear weight dtypes a budget chooses from for a preset of `weight_dtype` on `target`."""
    if weight_dtype not in LINEAR_DTYPES:
        return ()
    return tuple(d for d in LINEAR_DTYPES[LINEAR_DTYPES.index(weight_dtype):] if target.weight_spec(d) is not None)


def budget_bytes(budget: float, float_bytes: int) -> int:
    """--size-budget as bytes: a value up to 1 is a ratio of the float model, above 1 megabytes (10^6)."""
    return int(budget * float_bytes) if budget <= 1 else int(budget * 1e6)


def proto_bytes(ops: int, units: int) -> int:
    """Bytes of the compiled file beyond its arrays: the graph's ops, and per chosen weight the
    DequantizeLinear op and its three initializers that insert-qdq adds (an upper estimate)."""
    return PROTO_BYTES_PER_OP * (ops + 2 * units) + METADATA_BYTES


def stored_bytes(dims: tuple[int, ...], spec: QSpec | None, channel_axis: int, *, embedding: bool = False,
                 float_itemsize: int = 4) -> int:
    """Bytes of a weight as insert-qdq stores it: the integer array (int4 packed two a byte),
    float32 scales and zero points of the weight's dtype (per channel, or per block along K);
    an embedding table has no zero points; `spec` None: the float weight as it is."""
    count = math.prod(dims)
    if spec is None:
        return count * float_itemsize
    bits = spec.bits
    if spec.granularity == Granularity.BLOCK:
        k_axis = 1 - channel_axis % 2
        params = count // dims[k_axis] * -(-dims[k_axis] // int(spec.block_size))
    elif spec.granularity == Granularity.CHANNEL:
        params = dims[channel_axis % len(dims)]
    else:
        params = 1
    packed = lambda n: -(-n * bits // 8)
    return packed(count) + 4 * params + (0 if embedding else packed(params))


def choose(units: list[Unit], capacity: int, costs: list[list[int]] | None = None) -> tuple[list[int], float]:
    """Index of the width of each unit minimising the summed error with the summed cost beyond
    the narrowest widths at most `capacity` (a multiple-choice knapsack, exact on the grid);
    ties go to the narrower width. The cost of a width is its bytes, or `costs[unit][width]`
    (integers, e.g. nanoseconds of latency). Returns (indices, summed error)."""
    costs = costs if costs is not None else [[w.nbytes for w in u.widths] for u in units]
    extras = [[c - unit_costs[0] for c in unit_costs] for unit_costs in costs]
    span = sum(max(e) for e in extras)
    cell = max(1, -(-span // GRID_CELLS))
    # every unit's size is rounded up to whole cells: the widest choice of all takes this many
    cells = min(capacity // cell, sum(-(-max(e) // cell) for e in extras))
    best = np.zeros(cells + 1)
    picks = np.zeros((len(units), cells + 1), np.uint8)
    for index, (unit, extra) in enumerate(zip(units, extras)):
        trial = np.full((len(unit.widths), cells + 1), np.inf)
        for j, (width, more) in enumerate(zip(unit.widths, extra)):
            size = -(-more // cell)
            if size <= cells:
                trial[j, size:] = best[: cells + 1 - size] + width.error
        picks[index] = np.argmin(trial, axis=0)  # first minimum: the narrower width on a tie
        best = trial[picks[index], np.arange(cells + 1)]
    chosen = [0] * len(units)
    left = cells
    for index in range(len(units) - 1, -1, -1):
        j = int(picks[index, left])
        chosen[index] = j
        left -= -(-extras[index][j] // cell)
    return chosen, float(best[cells])


def infeasible(budget: int, reachable: tuple[int, int], float_bytes: int, given: str, narrowest: str
               ) -> OptionError:
    """The one-line error of a budget outside what the widths can reach (`narrowest`: the
    narrowest linear width offered)."""
    low, high = reachable
    span = (f"{low / 1e6:.1f} MB ({100 * low / float_bytes:.1f}% of float) to {high / 1e6:.1f} MB "
            f"({100 * high / float_bytes:.1f}%)")
    if budget < low:
        return OptionError(f"--size-budget {given} ({budget / 1e6:.1f} MB) is below the smallest model the "
                           f"weight widths reach; reachable: {span}",
                           fix="give a larger budget" + (", or --weights int4 (layers may go to 4 bits)"
                                                          if narrowest != "int4" else ""))
    return OptionError(f"--size-budget {given} ({budget / 1e6:.1f} MB) leaves nothing to choose: the float model "
                       f"is {float_bytes / 1e6:.1f} MB; reachable: {span}",
                       fix="give a smaller budget, or no --size-budget")
