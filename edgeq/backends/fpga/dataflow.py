"""Dataflow template: one engine per layer, weights on chip, FINN MVAU folding (PE x SIMD).

Each matrix-vector layer becomes a FINN Matrix-Vector-Activation Unit (MVAU): PE processing
elements (output parallelism) each with SIMD lanes (input parallelism), weights in on-chip
memory, a threshold unit implementing the quantized activation. Resource formulas are FINN's
published estimates, read from finn `src/finn/custom_op/fpgadataflow/matrixvectoractivation.py`
(`bram_estimation`, `uram_estimation`) and `hls/matrixvectoractivation_hls.py` (`lut_estimation`,
`dsp_estimation`), which cite FINN-R (Blott et al., ACM TRETS 2018); cycles are FINN's
`get_exp_cycles` (Umuroglu et al., FPGA 2017): MH/PE · MW/SIMD · vectors.

Latency is not the sum of layer cycles: the engines run concurrently and a layer starts as soon
as its input starts to arrive (hls4ml's 'Fused' strategy docs describe the same overlap: "each
starting as soon as the layer before it produces its first output"). An MVAU consumes its input
vector SIMD elements per cycle during its first output fold and buffers it for the others, so
its first output group is ready at max(start + MW/SIMD, arrival of the last input chunk).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeq.backends.fpga.errors import FoldingError
from edgeq.backends.fpga.layers import AttentionMatMul, Layer, LayoutOp, MatVecLayer, NonlinearUnit
from edgeq.backends.fpga.nonlinear import row_cycles, unit_cycles, unit_price, unit_resources
from edgeq.backends.fpga.primitives import (
    Resources,
    accumulator_bits,
    bram18_for_memory,
    divisors,
    uram_for_memory,
)
from edgeq.backends.fpga.report import Row, TemplateResult

RAM_STYLES = ("block", "ultra", "distributed")
MULT_STYLES = ("lut", "dsp")

# FINN-R LUT model constants "from experiments in paper" (finn lut_estimation): base cost c0 and
# the per-PE overhead factor c1.
FINN_LUT_BASE = 300
FINN_LUT_FACTOR = 1.1


@dataclass(frozen=True)
class LayerFolding:
    """Folding of one layer: PE (outputs in parallel), SIMD (inputs in parallel), memory style."""

    pe: int = 1
    simd: int = 1
    ram_style: str = "block"
    mult_style: str | None = None  # None: edgeq policy (default_mult_style)

    def __post_init__(self) -> None:
        if self.pe < 1 or self.simd < 1:
            raise FoldingError(f"PE and SIMD must be >= 1, got PE={self.pe} SIMD={self.simd}")
        if self.ram_style not in RAM_STYLES:
            raise FoldingError(f"ram_style '{self.ram_style}' not in {RAM_STYLES}")
        if self.mult_style is not None and self.mult_style not in MULT_STYLES:
            raise FoldingError(f"mult_style '{self.mult_style}' not in {MULT_STYLES}")


Folding = Mapping[str, LayerFolding]


def default_mult_style(w_bits: int, a_bits: int) -> str:
    """edgeq policy: products up to 4x4 bits in LUTs, wider ones on DSP slices.

    FINN's LUT multiplier model costs SIMD·(2·ceil((W+A)/6)-1)·(W+A) LUTs: 24 LUTs for a 4x4
    product, cheap next to a DSP slice; wider products grow quadratically in LUTs.
    """
    return "lut" if w_bits * a_bits <= 16 else "dsp"


# --- engines (MVAU view of matvec and attention layers) ----------------------------------------
@dataclass(frozen=True)
class _Engine:
    name: str
    mh: int
    mw: int
    vectors: int
    w_bits: int
    a_bits: int
    a_signed: bool
    out_bits: int | None
    stored_words: int  # words of the weight/operand memory (MH·MW, · heads for attention)


def _engine(layer: MatVecLayer | AttentionMatMul) -> _Engine:
    if isinstance(layer, MatVecLayer):
        return _Engine(layer.name, layer.mh, layer.mw, layer.vectors, layer.weight_bits,
                       layer.act_bits, layer.act_signed, layer.out_bits, layer.mh * layer.mw)
    # Q·Kᵀ / P·V as a streaming MVAU whose "weights" (Kᵀ or V) are written into a buffer.
    return _Engine(layer.name, layer.cols, layer.depth, layer.heads * layer.rows, layer.b_bits,
                   layer.a_bits, layer.a_signed, layer.out_bits,
                   layer.heads * layer.cols * layer.depth)


def _check_divides(e: _Engine, f: LayerFolding) -> None:
    if e.mh % f.pe or e.mw % f.simd:
        raise FoldingError(
            f"layer '{e.name}': MH={e.mh} % PE={f.pe} and MW={e.mw} % SIMD={f.simd} must be 0",
            fix=f"choose PE from {divisors(e.mh)[:12]}... and SIMD from {divisors(e.mw)[:12]}...")


def engine_cycles(e: _Engine, f: LayerFolding) -> int:
    """FINN get_exp_cycles: MH/PE · MW/SIMD · vectors."""
    return e.vectors * (e.mh // f.pe) * (e.mw // f.simd)


def _memory(e: _Engine, f: LayerFolding) -> Resources:
    depth = e.stored_words // (f.pe * f.simd)  # FINN omega = MW·MH/(PE·SIMD)
    width = f.pe * f.simd * e.w_bits
    if f.ram_style == "block":
        return Resources(bram18=bram18_for_memory(depth, width))
    if f.ram_style == "ultra":
        return Resources(uram=uram_for_memory(depth, width))
    # distributed: FINN c2 term, PE·SIMD·W LUTs per 64 words of depth (LUTRAM)
    return Resources(lut=width * math.ceil(depth / 64))


def engine_resources(e: _Engine, f: LayerFolding) -> tuple[Resources, str]:
    """LUT/FF/DSP/BRAM18/URAM of one MVAU (FINN lut/dsp/bram/uram_estimation)."""
    _check_divides(e, f)
    p, q, w, a = f.pe, f.simd, e.w_bits, e.a_bits
    style = f.mult_style or default_mult_style(w, a)
    acc = accumulator_bits(e.mw, w, a, e.a_signed)
    mult_luts = q * (2 * math.ceil((w + a) / 6) - 1) * (w + a) if style == "lut" else 0
    adder_luts = (w + a) * (2 * q - 1)
    thresholds = (2 ** e.out_bits - 1) if e.out_bits else 0
    tmem = e.mh // p
    # thresholds in LUTRAM (FINN thr_luts/comp_luts with distributed threshold memory)
    thr_luts = thresholds * acc * math.ceil(tmem / 64)
    comp_luts = thresholds * acc
    per_pe = mult_luts + adder_luts + acc + thr_luts + comp_luts
    lut = FINN_LUT_BASE + FINN_LUT_FACTOR * p * per_pe
    dsp = p * q * math.ceil((w + a) / 48) if style == "dsp" else 0
    # FF: architecture count (FINN has no FF model): shared input register, per PE a weight
    # register, a product register per lane, the accumulator and the output register.
    ff = q * a + p * (q * w + q * (w + a) + acc + (e.out_bits or acc))
    res = Resources(lut=lut, ff=ff, dsp=dsp) + _memory(e, f)
    detail = (f"PE={p} SIMD={q} W{w}A{a} acc={acc}b mult={style} mem={f.ram_style}"
              + (f" thr={thresholds}" if thresholds else ""))
    return res, detail


# --- folding: from a file, or searched for a throughput target ---------------------------------
_FINN_IGNORED_KEYS = frozenset({"mem_mode", "runtime_writeable_weights", "ram_style_thresholds",
                                "depth", "impl_style", "preferred_impl_style", "inFIFODepths",
                                "outFIFODepths"})
_FINN_RAM_STYLES = {"auto": "block", "block": "block", "ultra": "ultra",
                    "distributed": "distributed"}
_FINN_RES_TYPES = {"auto": None, "lut": "lut", "dsp": "dsp"}


def _layer_folding_from_entry(name: str, entry: Mapping[str, Any]) -> LayerFolding:
    unknown = set(entry) - {"PE", "SIMD", "ram_style", "resType"} - _FINN_IGNORED_KEYS
    if unknown:
        raise FoldingError(f"folding entry '{name}' has unknown keys {sorted(unknown)}")
    try:
        return LayerFolding(
            pe=int(entry.get("PE", 1)),
            simd=int(entry.get("SIMD", 1)),
            ram_style=_FINN_RAM_STYLES[entry.get("ram_style", "auto")],
            mult_style=_FINN_RES_TYPES[entry.get("resType", "auto")],
        )
    except KeyError as exc:
        raise FoldingError(f"folding entry '{name}': unsupported value {exc}") from None


def folding_from_json(source: str | Path | Mapping[str, Any]) -> dict[str, LayerFolding]:
    """Read a FINN-style folding config: {"Defaults": {...}, "<layer>": {"PE", "SIMD", ...}}."""
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FoldingError(f"folding file '{path}' not found")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise FoldingError(f"folding file '{path}' is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise FoldingError("a folding config is a JSON object of layer name -> attributes")
    folding = {name: _layer_folding_from_entry(name, entry)
               for name, entry in data.items() if name != "Defaults"}
    if data.get("Defaults"):
        folding["Defaults"] = _layer_folding_from_entry("Defaults", data["Defaults"])
    return folding


def _compute_layers(layers: Sequence[Layer]) -> list[Layer]:
    return [layer for layer in layers if not isinstance(layer, LayoutOp)]


def resolve_folding(layers: Sequence[Layer], folding: Folding) -> dict[str, LayerFolding]:
    """Folding for every compute layer; names in the folding must match the model's layers."""
    names = [layer.name for layer in _compute_layers(layers)]
    extra = set(folding) - set(names) - {"Defaults"}
    if extra:
        raise FoldingError(f"folding names layers the model does not have: {sorted(extra)}",
                           fix=f"model layers are: {names}")
    default = folding.get("Defaults")
    missing = [n for n in names if n not in folding and default is None]
    if missing:
        raise FoldingError(f"folding has no entry (and no Defaults) for layers {missing}")
    return {n: folding.get(n, default) for n in names}


def minimal_folding(layers: Sequence[Layer]) -> dict[str, LayerFolding]:
    """PE = SIMD = 1 everywhere: the smallest dataflow engine of each layer."""
    return {layer.name: LayerFolding() for layer in _compute_layers(layers)}


def _cheapest_engine_folding(e: _Engine, target: int) -> LayerFolding | None:
    options = [(p * q, -q, p, q) for p in divisors(e.mh) for q in divisors(e.mw)
               if e.vectors * (e.mh // p) * (e.mw // q) <= target]
    if not options:
        return None
    _, _, p, q = min(options)  # fewest lanes; among equals prefer wide SIMD (FINN's order)
    return LayerFolding(pe=p, simd=q)


def _cheapest_unit_folding(unit: NonlinearUnit, target: int) -> LayerFolding | None:
    for lanes in divisors(unit.row_length):
        if unit_cycles(unit, lanes) <= target:
            return LayerFolding(pe=lanes)
    return None


def _max_folding(layer: Layer) -> LayerFolding:
    if isinstance(layer, NonlinearUnit):
        return LayerFolding(pe=layer.row_length)
    e = _engine(layer)
    return LayerFolding(pe=e.mh, simd=e.mw)


def search_folding(layers: Sequence[Layer], fps: float,
                   clock_mhz: float) -> tuple[dict[str, LayerFolding], list[str]]:
    """Cheapest legal folding per layer whose cycles per frame meet `fps` at `clock_mhz`.

    Returns the folding and notes for layers that cannot reach the target even fully unfolded.
    """
    if fps <= 0:
        raise FoldingError(f"target fps must be positive, got {fps}")
    target = math.floor(clock_mhz * 1e6 / fps)
    folding: dict[str, LayerFolding] = {}
    notes: list[str] = []
    for layer in _compute_layers(layers):
        if isinstance(layer, NonlinearUnit):
            chosen = _cheapest_unit_folding(layer, target)
        else:
            chosen = _cheapest_engine_folding(_engine(layer), target)
        if chosen is None:
            chosen = _max_folding(layer)
            notes.append(f"fps target not reachable for '{layer.name}' even fully unfolded")
        folding[layer.name] = chosen
    return folding, notes


# --- timing: concurrent engines with per-vector overlap ----------------------------------------
@dataclass(frozen=True)
class _Stream:
    """Per vector: when its first and its last output chunk is available."""

    first: tuple[float, ...]
    last: tuple[float, ...]


def _source(vectors: int, chunks: int) -> _Stream:
    # The input DMA delivers one SIMD-wide chunk per cycle.
    return _Stream(tuple(v * chunks for v in range(vectors)),
                   tuple((v + 1) * chunks for v in range(vectors)))


def _regroup(stream: _Stream, vectors: int) -> _Stream:
    """Same stream seen as `vectors` vectors; when the granularity changes, wait for all of it."""
    if len(stream.first) == vectors:
        return stream
    return _Stream((min(stream.first),) * vectors, (max(stream.last),) * vectors)


def _engine_timing(stream: _Stream, sf: int, nf: int) -> _Stream:
    first, last, busy = [], [], 0.0
    for arrive_first, arrive_last in zip(stream.first, stream.last):
        start = max(busy, arrive_first)
        group0 = max(start + sf, arrive_last)  # first fold consumes the input as it arrives
        end = group0 + (nf - 1) * sf
        first.append(group0)
        last.append(end)
        busy = end
    return _Stream(tuple(first), tuple(last))


def _unit_timing(stream: _Stream, per_row: int, passes: int, pipelined: bool,
                 row_buffered: bool) -> _Stream:
    first, last, busy = [], [], 0.0
    for arrive_first, arrive_last in zip(stream.first, stream.last):
        start = max(busy, arrive_first)
        consumed = max(start + per_row, arrive_last)
        out_last = consumed + (passes - 1) * per_row
        if not row_buffered:
            out_first = start  # streaming: outputs follow the inputs
        else:  # outputs come in the last pass (a one-pass reduction emits one value at the end)
            out_first = out_last - per_row if passes > 1 else out_last
        first.append(out_first)
        last.append(out_last)
        busy = consumed if pipelined else out_last
    return _Stream(tuple(first), tuple(last))


def _layer_row(layer: Layer, f: LayerFolding, stream: _Stream | None) -> tuple[Row, _Stream]:
    if isinstance(layer, NonlinearUnit):
        price = unit_price(layer)
        if f.simd != 1:
            raise FoldingError(f"nonlinear unit '{layer.name}' takes PE (lanes) only, not SIMD")
        if layer.row_length % f.pe:
            raise FoldingError(f"unit '{layer.name}': row length {layer.row_length} % PE={f.pe}")
        per_row = row_cycles(layer, f.pe)
        stream = _regroup(stream or _source(layer.rows, per_row), layer.rows)
        out = _unit_timing(stream, per_row, price.passes, price.pipelined, price.row_buffered)
        detail = f"lanes={f.pe} {price.op}: {price.rationale}"
        return Row(layer.name, layer.op, unit_cycles(layer, f.pe),
                   unit_resources(price, f.pe), detail), out
    e = _engine(layer)
    res, detail = engine_resources(e, f)
    sf, nf = e.mw // f.simd, e.mh // f.pe
    stream = _regroup(stream or _source(e.vectors, sf), e.vectors)
    row = Row(layer.name, layer.kind, engine_cycles(e, f), res, detail)
    return row, _engine_timing(stream, sf, nf)


def _assumptions(layers: Sequence[Layer], layout: list[LayoutOp], no_overlap: int) -> list[str]:
    notes = [
        "template dataflow: one engine per layer, all weights in on-chip memory, engines run "
        "concurrently (FINN streaming dataflow; Umuroglu et al. 2017, Blott et al. 2018)",
        "LUT per MVAU = 300 + 1.1·PE·(mult + adder tree + accumulator + thresholds + comparators)"
        " (finn matrixvectoractivation_hls.py lut_estimation, FINN-R constants)",
        "multipliers: LUT for W·A <= 16 product bits, DSP otherwise (edgeq policy); DSP = "
        "PE·SIMD·ceil((W+A)/48) (finn dsp_estimation)",
        "weight memory: RAMB18 per finn bram_estimation (SDP aspect ratios, UG573); URAM per "
        "finn uram_estimation when ram_style=ultra",
        "thresholds of the activation unit in LUTRAM (finn thr_luts/comp_luts); accumulator width "
        "from the data-type bound (finn lut_estimation, Colbert et al. arXiv 2301.13376)",
        "FF: architecture count (FINN has no FF model) = SIMD·A + PE·(SIMD·W + SIMD·(W+A) + "
        "acc + out)",
        "cycles per layer = MH/PE · MW/SIMD · vectors (finn get_exp_cycles); latency: engines "
        "overlap, an engine's first output fold waits for its last input chunk; input DMA "
        "delivers one SIMD chunk per cycle",
        "not modelled: per-engine pipeline register depth, FIFOs, data-width converters, "
        "input/output DMA logic",
        f"no-overlap bound on latency (FINN critical_path_cycles style, sum of layer cycles) = "
        f"{no_overlap} cycles",
    ]
    if any(isinstance(layer, NonlinearUnit) for layer in layers):
        notes.append("nonlinear units: SIMD datapaths of PE lanes, per-lane LUT/FF/DSP are "
                     "architecture counts for 8-bit data (edgeq.backends.fpga.nonlinear), not calibrated")
    if layout:
        kinds = sorted({op.op_type for op in layout})
        notes.append(f"{len(layout)} layout/Q-DQ ops priced at zero cycles (no arithmetic): "
                     + ", ".join(kinds))
    return notes


def dataflow_estimate(layers: Sequence[Layer], folding: Folding) -> TemplateResult:
    """Per-layer resources and cycles, totals, and chain latency of the dataflow template."""
    chosen = resolve_folding(layers, folding)
    rows: list[Row] = []
    stream: _Stream | None = None
    for layer in _compute_layers(layers):
        row, stream = _layer_row(layer, chosen[layer.name], stream)
        rows.append(row)
    if not rows:
        raise FoldingError("the model has no compute layers to estimate")
    totals = Resources()
    for row in rows:
        totals = totals + row.resources
    layout = [layer for layer in layers if isinstance(layer, LayoutOp)]
    latency = math.ceil(max(stream.last))
    interval = max(row.cycles for row in rows)
    assumptions = _assumptions(layers, layout, sum(row.cycles for row in rows))
    return TemplateResult("dataflow", tuple(rows), (), totals, latency, interval,
                          tuple(assumptions))
