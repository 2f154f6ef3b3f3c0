"""Overlay template: one shared multiplier array, weights streamed from DRAM, layers in sequence.

The array follows FQ-BERT's accelerator (Liu, Li, Cheng, DATE 2021): PUs of PEs, each PE a
dot-product unit of M multiplier lanes feeding an adder tree and an accumulator, a requantiser,
and separate Softmax / LayerNorm cores. A lane multiplies an 8-bit activation by a 4-bit weight;
wider products combine lanes by bit-splitting (FQ-BERT's Bit-split Inner-product Module, after
Bit Fusion), so an 8x8 product (Q·Kᵀ) takes two lanes.

W4A8 packing on DSP48 (two 4x8 products per DSP slice), when enabled: the PEs of a PU share the
broadcast activation `a`, so two PEs' weights w_hi and w_lo can share one slice. w_hi·2^18 + w_lo
(22 bits) goes into the 25/27-bit pre-adder port, `a` into the 18-bit port, and the 48-bit product
w_hi·a·2^18 + w_lo·a holds both 12-bit products in disjoint fields (6 guard bits; the sign borrow
of the low product into the high field is corrected in fabric). This is the technique Xilinx WP486
("Deep Learning with INT8 Optimization on Xilinx Devices") uses for two INT8 products sharing an
operand; 4-bit weights leave more room than 8-bit ones.

Per layer, latency = max(compute cycles, weight-streaming cycles) + pipeline fill; nonlinear
units follow the matmul that feeds them. Nothing here is fitted to a measurement: every count
comes from the array geometry, the layer shapes, or a cited source, and `assumptions` says which.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from edgeq.errors import CostModelError
from edgeq.backends.fpga.layers import AttentionMatMul, Layer, LayoutOp, MatVecLayer, NonlinearUnit
from edgeq.backends.fpga.nonlinear import PRICES, unit_cycles, unit_price, unit_resources
from edgeq.backends.fpga.primitives import (
    DSP_PORTS,
    Resources,
    bram18_for_memory,
    dsp_slices_per_product,
    uram_for_memory,
)
from edgeq.backends.fpga.report import Row, TemplateResult
from edgeq.backends.fpga.devices import FpgaDevice, UtilisationLimits

_PACK_FIELD = 18  # bit offset of the high product in the packed DSP operand (WP486 uses 18)


@dataclass(frozen=True)
class OverlayConfig:
    """Geometry and clock of a shared multiplier array (FQ-BERT style)."""

    pus: int
    pes_per_pu: int
    mults_per_pe: int
    clock_mhz: float
    lane_a_bits: int = 8
    lane_w_bits: int = 4
    pack_two_per_dsp: bool = True
    nonlinear_lanes: int = 16
    axi_ports: int = 1
    axi_port_bits: int = 128
    acc_bits: int = 32
    scale_bits: int = 32
    source: str = "edgeq default overlay"
    activation_memory: str = "bram"   # "uram": the activation ping-pong buffer in UltraRAM

    def __post_init__(self) -> None:
        for name in ("pus", "pes_per_pu", "mults_per_pe", "nonlinear_lanes", "axi_ports",
                     "axi_port_bits", "lane_a_bits", "lane_w_bits"):
            if getattr(self, name) < 1:
                raise CostModelError(f"overlay {name} must be >= 1")
        if self.clock_mhz <= 0:
            raise CostModelError("overlay clock must be positive")
        if self.activation_memory not in ("bram", "uram"):
            raise CostModelError(f"overlay activation_memory must be 'bram' or 'uram', not {self.activation_memory!r}")

    @property
    def pes(self) -> int:
        return self.pus * self.pes_per_pu

    @property
    def lanes(self) -> int:
        return self.pes * self.mults_per_pe


def packing_fits(dsp_slice: str, lane_a_bits: int, lane_w_bits: int) -> bool:
    """Whether two lane_w x lane_a products sharing the activation fit one DSP slice."""
    wide, narrow = DSP_PORTS[dsp_slice]
    product_bits = lane_a_bits + lane_w_bits
    return (lane_w_bits + _PACK_FIELD <= wide and lane_a_bits <= narrow
            and product_bits < _PACK_FIELD and _PACK_FIELD + product_bits <= 48)


def _lanes_per_product(cfg: OverlayConfig, a_bits: int, w_bits: int) -> int:
    return math.ceil(a_bits / cfg.lane_a_bits) * math.ceil(w_bits / cfg.lane_w_bits)


def _reduction_lanes(cfg: OverlayConfig, name: str, a_bits: int, w_bits: int) -> int:
    """Dot-product terms a PE adds per cycle for a_bits x w_bits products."""
    per_product = _lanes_per_product(cfg, a_bits, w_bits)
    k = cfg.mults_per_pe // per_product
    if k < 1:
        raise CostModelError(f"'{name}': a {a_bits}x{w_bits} product needs {per_product} lanes "
                             f"but a PE has {cfg.mults_per_pe}")
    return k


def _matvec_compute(cfg: OverlayConfig, layer: MatVecLayer) -> tuple[int, str]:
    k = _reduction_lanes(cfg, layer.name, layer.act_bits, layer.weight_bits)
    out_tiles, red_tiles = math.ceil(layer.mh / cfg.pes), math.ceil(layer.mw / k)
    return layer.vectors * out_tiles * red_tiles, f"{out_tiles} out x {red_tiles} red tiles/vec"


def _attention_compute(cfg: OverlayConfig, layer: AttentionMatMul) -> tuple[int, str]:
    k = _reduction_lanes(cfg, layer.name, layer.a_bits, layer.b_bits)
    red = math.ceil(layer.depth / k)
    # heads spread over PUs (each PU its own query/key operands) or all PUs on one head
    by_pu = math.ceil(layer.heads / cfg.pus) * layer.rows * math.ceil(layer.cols / cfg.pes_per_pu)
    flat = layer.heads * layer.rows * math.ceil(layer.cols / cfg.pes)
    if by_pu <= flat:
        return by_pu * red, f"heads over PUs, {red} red tiles"
    return flat * red, f"one head at a time, {red} red tiles"


def _fill_cycles(cfg: OverlayConfig) -> int:
    # multiply + adder-tree levels + accumulate, paid once per layer (partial sums are
    # double-buffered so tiles pipeline back to back, FQ-BERT Sec. III-B)
    return 2 + math.ceil(math.log2(cfg.mults_per_pe))


def _bandwidth_gbps(cfg: OverlayConfig, device: FpgaDevice,
                    dram_gbps: float | None) -> tuple[float, str]:
    axi = cfg.axi_ports * cfg.axi_port_bits / 8 * cfg.clock_mhz * 1e6 / 1e9
    dram = dram_gbps if dram_gbps is not None else device.dram_gbps.value
    if dram is None:
        return axi, (f"{axi:.3g} GB/s = {cfg.axi_ports}x{cfg.axi_port_bits}-bit AXI at "
                     f"{cfg.clock_mhz:g} MHz (board DRAM bandwidth not in catalog: "
                     f"{device.dram_gbps.source})")
    bw = min(axi, dram)
    return bw, (f"{bw:.3g} GB/s = min(DRAM {dram:.3g} GB/s, {cfg.axi_ports}x{cfg.axi_port_bits}"
                f"-bit AXI at {cfg.clock_mhz:g} MHz = {axi:.3g} GB/s)")


def _layer_row(cfg: OverlayConfig, layer: Layer, bytes_per_cycle: float) -> Row:
    if isinstance(layer, NonlinearUnit):
        price = unit_price(layer)
        return Row(layer.name, layer.op, unit_cycles(layer, cfg.nonlinear_lanes), None,
                   f"{cfg.nonlinear_lanes} lanes, {price.passes} pass(es)"
                   + (" (pipelined)" if price.pipelined else ""))
    if isinstance(layer, MatVecLayer):
        compute, tiles = _matvec_compute(cfg, layer)
        memory = math.ceil(layer.weight_bits_total / 8 / bytes_per_cycle)
    else:
        compute, tiles = _attention_compute(cfg, layer)
        memory = 0  # both operands are on-chip intermediates
    bound = "memory" if memory > compute else "compute"
    cycles = max(compute, memory) + _fill_cycles(cfg)
    return Row(layer.name, layer.kind, cycles, None,
               f"compute {compute} / weights {memory} cycles: {bound}-bound; {tiles}")


# --- shared hardware ---------------------------------------------------------------------------
def _array_unit(cfg: OverlayConfig, dsp_slice: str) -> Row:
    m, lane_bits = cfg.mults_per_pe, cfg.lane_a_bits + cfg.lane_w_bits
    per_dsp = 2 if cfg.pack_two_per_dsp else 1
    dsp = math.ceil(cfg.lanes / per_dsp) * dsp_slices_per_product(cfg.lane_a_bits,
                                                                   cfg.lane_w_bits, dsp_slice)
    tree = lane_bits * (2 * m - 1)  # FINN-R adder-tree LUT model, per PE
    shift_add = (m // 2) * (lane_bits + cfg.lane_w_bits)  # bit-split recombination
    unpack = math.ceil(cfg.lanes / 2) * 2 * lane_bits if cfg.pack_two_per_dsp else 0
    lut = cfg.pes * (tree + shift_add + cfg.acc_bits) + unpack
    levels = math.ceil(math.log2(m))
    ff = (cfg.lanes * 2 * lane_bits
          + cfg.pes * ((m - 1) * (lane_bits + levels) + 3 * cfg.acc_bits))
    detail = (f"{cfg.pus} PU x {cfg.pes_per_pu} PE x {m} lanes of {cfg.lane_a_bits}x"
              f"{cfg.lane_w_bits} = {cfg.lanes} lanes, {per_dsp} product(s) per {dsp_slice}")
    return Row("pe_array", "array", 0, Resources(lut=lut, ff=ff, dsp=dsp), detail)


def _cycles_per_output(cfg: OverlayConfig, layer: Layer) -> int | None:
    if isinstance(layer, MatVecLayer):
        return math.ceil(layer.mw / _reduction_lanes(cfg, layer.name, layer.act_bits,
                                                     layer.weight_bits))
    if isinstance(layer, AttentionMatMul):
        return math.ceil(layer.depth / _reduction_lanes(cfg, layer.name, layer.a_bits,
                                                        layer.b_bits))
    return None


def requantizers_per_pu(cfg: OverlayConfig, layers: Sequence[Layer]) -> int:
    """Pipelined requantisers (acc x 32-bit scale, FQ-BERT eq. 5) a PU needs to keep up with the
    fastest layer: a PU emits at most PEs/ceil(K/k) outputs per cycle. Depends on the PU's
    geometry, not on the PU count (sizing and pricing both use this one count)."""
    cycles = [_cycles_per_output(cfg, layer) for layer in layers]
    rates = [cfg.pes_per_pu / c for c in cycles if c]
    return max(1, math.ceil(max(rates, default=1)))


def _requant_unit(cfg: OverlayConfig, layers: Sequence[Layer], dsp_slice: str) -> Row:
    per_pu = requantizers_per_pu(cfg, layers)
    units = cfg.pus * per_pu
    dsp = units * dsp_slices_per_product(cfg.acc_bits, cfg.scale_bits, dsp_slice)
    res = Resources(lut=units * 2 * cfg.acc_bits, ff=units * (cfg.acc_bits + cfg.scale_bits + 8),
                    dsp=dsp)
    return Row("requant", "requant", 0, res,
               f"{per_pu} per PU x {cfg.pus} PUs, {cfg.acc_bits}x{cfg.scale_bits} multiply")


def _nonlinear_units(cfg: OverlayConfig, layers: Sequence[Layer]) -> list[Row]:
    kinds = sorted({layer.op for layer in layers if isinstance(layer, NonlinearUnit)})
    rows = []
    for kind in kinds:
        price = PRICES[kind]
        rows.append(Row(f"{kind}_unit", "nonlinear", 0,
                        unit_resources(price, cfg.nonlinear_lanes),
                        f"{cfg.nonlinear_lanes} lanes: {price.rationale}"))
    return rows


def _tensor_bits(cfg: OverlayConfig, layer: Layer) -> tuple[int, int]:
    """(largest activation tensor, attention operand + score bits) a layer keeps on chip."""
    out_bits = getattr(layer, "out_bits", None) or cfg.lane_a_bits  # requantized outputs
    if isinstance(layer, MatVecLayer):
        return max(layer.mw * layer.vectors * layer.act_bits,
                   layer.mh * layer.vectors * out_bits), 0
    if isinstance(layer, AttentionMatMul):
        scores = layer.heads * layer.rows * layer.cols * out_bits
        return layer.heads * layer.rows * layer.depth * layer.a_bits, \
            layer.operand_b_bits_total + scores
    if isinstance(layer, NonlinearUnit):
        return layer.elements * (layer.bits or cfg.lane_a_bits), 0
    return 0, 0


def _buffer_unit(cfg: OverlayConfig, layers: Sequence[Layer]) -> Row:
    matvecs = [layer for layer in layers if isinstance(layer, MatVecLayer)]
    w_width = cfg.pes * cfg.mults_per_pe * cfg.lane_w_bits
    w_depth = max((math.ceil(mv.mw / _reduction_lanes(cfg, mv.name, mv.act_bits, mv.weight_bits))
                   for mv in matvecs), default=0)
    weight_bram = 2 * bram18_for_memory(w_depth, w_width)  # double-buffered weight tile
    sizes = [_tensor_bits(cfg, layer) for layer in layers]
    act_bits = 2 * max((s[0] for s in sizes), default=0) + max((s[1] for s in sizes), default=0)
    a_width = cfg.pus * cfg.mults_per_pe * cfg.lane_a_bits  # one input slice per PU per cycle
    a_depth = math.ceil(act_bits / a_width)
    what = f"({act_bits / 8e6:.3g} MB: ping-pong of the largest tensor + attention operands)"
    if cfg.activation_memory == "uram":
        act_uram = uram_for_memory(a_depth, a_width)
        detail = f"weights {weight_bram} RAMB18 (2 x {w_depth} x {w_width} b), activations {act_uram} URAM {what}"
        return Row("buffers", "buffer", 0, Resources(bram18=weight_bram, uram=act_uram), detail)
    act_bram = bram18_for_memory(a_depth, a_width)
    detail = f"weights {weight_bram} (2 x {w_depth} x {w_width} b), activations {act_bram} {what}"
    return Row("buffers", "buffer", 0, Resources(bram18=weight_bram + act_bram), detail)


def _assumptions(cfg: OverlayConfig, device: FpgaDevice, bw_note: str,
                 layers: Sequence[Layer]) -> list[str]:
    fill = _fill_cycles(cfg)
    lane = f"{cfg.lane_w_bits}x{cfg.lane_a_bits}"
    if cfg.pack_two_per_dsp:
        pack = (f"DSP packing: two {lane}-bit lane products per DSP slice sharing the broadcast activation "
                f"(w_hi·2^18 + w_lo on the pre-adder port, activation on the 18-bit port, both "
                f"{cfg.lane_w_bits + cfg.lane_a_bits}-bit products in disjoint fields of P; Xilinx WP486 technique)")
    else:
        pack = "no DSP packing: one lane product per DSP slice"
    notes = [
        f"template overlay ({cfg.source}): one shared array of {cfg.lanes} multiplier lanes "
        f"({cfg.pus} PU x {cfg.pes_per_pu} PE x {cfg.mults_per_pe}) at {cfg.clock_mhz:g} MHz; "
        "layers run one after another; weights streamed from DRAM",
        f"a lane multiplies {cfg.lane_a_bits}-bit by {cfg.lane_w_bits}-bit; wider products "
        "combine lanes by bit-splitting (FQ-BERT BIM, Bit Fusion): 8x8 takes 2 lanes",
        _model_products(cfg, layers),
        pack,
        "tiling: outputs over PU·PE, dot-product terms over the PE's lanes; partial tiles are "
        "padded (ceil); attention heads spread over PUs when that is faster",
        f"per layer: max(compute, weight streaming) + {fill} fill cycles (multiply, adder tree, "
        "accumulate), fill paid once per layer because partial sums are double-buffered",
        f"weight bandwidth {bw_note}; activations and attention operands stay on chip; the next "
        "layer's weights prefetch during the current one (double-buffered weight buffer, "
        "FQ-BERT Sec. III-C)",
        f"nonlinear units: {cfg.nonlinear_lanes} lanes each, run after the matmul that feeds "
        "them (not overlapped); per-lane LUT/FF/DSP are architecture counts for 8-bit data",
        f"requantisation: pipelined {cfg.acc_bits}x{cfg.scale_bits} multipliers (FQ-BERT eq. 5), "
        "enough per PU for the fastest layer, DSPs by 27x18 tiling",
        "array LUT/FF are architecture counts (FINN-R adder-tree model per PE, operand and "
        "product registers); control, AXI/DMA and host interface logic are not modelled, so "
        "LUT/FF are lower bounds",
        "buffers in RAMB18 (finn bram_estimation aspect ratios); URAM not used" if cfg.activation_memory == "bram"
        else "weight tiles in RAMB18 (finn bram_estimation aspect ratios), the activation buffer in URAM288 "
             "(finn uram_estimation: 4096 x 72 per block)",
    ]
    if any(isinstance(u, NonlinearUnit) and (u.bits or 0) > 8 for u in layers):
        notes.append("some nonlinear units have inputs wider than 8 bits: priced as 8-bit units")
    layout = [op for op in layers if isinstance(op, LayoutOp)]
    if layout:
        notes.append(f"{len(layout)} layout/Q-DQ ops priced at zero cycles (no arithmetic): "
                     + ", ".join(sorted({op.op_type for op in layout})))
    return notes


def _model_products(cfg: OverlayConfig, layers: Sequence[Layer]) -> str:
    """What this model's products are and how many lanes each takes on the array."""
    kinds: dict[tuple[int, int], int] = {}
    for layer in layers:
        if isinstance(layer, MatVecLayer):
            key = (layer.weight_bits, layer.act_bits)
        elif isinstance(layer, AttentionMatMul):
            key = (layer.b_bits, layer.a_bits)
        else:
            continue
        kinds[key] = kinds.get(key, 0) + 1
    if not kinds:
        return "this model has no matmuls for the array"
    parts = [f"{count} W{w}A{a} ({_lanes_per_product(cfg, a, w)} lane(s) per product)"
             for (w, a), count in sorted(kinds.items(), key=lambda item: -item[1])]
    return "this model's matmuls: " + ", ".join(parts)


def _shared_units(cfg: OverlayConfig, compute: Sequence[Layer], dsp_slice: str) -> tuple[Row, ...]:
    return (_array_unit(cfg, dsp_slice), _requant_unit(cfg, compute, dsp_slice),
            *_nonlinear_units(cfg, compute), _buffer_unit(cfg, compute))


def overlay_estimate(layers: Sequence[Layer], device: FpgaDevice, cfg: OverlayConfig,
                     dram_gbps: float | None = None) -> TemplateResult:
    """Per-layer cycles, shared-unit resources and sequential latency of the overlay."""
    if cfg.pack_two_per_dsp and not packing_fits(device.dsp_slice, cfg.lane_a_bits,
                                                 cfg.lane_w_bits):
        raise CostModelError(f"{cfg.lane_w_bits}x{cfg.lane_a_bits} products cannot be packed two "
                             f"per {device.dsp_slice}", fix="set pack_two_per_dsp=False")
    compute = [layer for layer in layers if not isinstance(layer, LayoutOp)]
    bw, bw_note = _bandwidth_gbps(cfg, device, dram_gbps)
    bytes_per_cycle = bw * 1e9 / (cfg.clock_mhz * 1e6)
    rows = tuple(_layer_row(cfg, layer, bytes_per_cycle) for layer in compute)
    units = _shared_units(cfg, compute, device.dsp_slice)
    totals = Resources()
    for unit in units:
        totals = totals + unit.resources
    latency = sum(row.cycles for row in rows)
    return TemplateResult("overlay", rows, units, totals, latency, latency,
                          tuple(_assumptions(cfg, device, bw_note, layers)))


def _over_limits(cfg: OverlayConfig, compute: Sequence[Layer], device: FpgaDevice,
                 limits: UtilisationLimits) -> list[str]:
    """Resources of the array `cfg` above the device's utilisation limits (names)."""
    totals = Resources()
    for unit in _shared_units(cfg, compute, device.dsp_slice):
        totals = totals + unit.resources
    available = device.resource_counts()
    return [name for name, used in totals.as_dict().items()
            if used > math.floor(available[name] * getattr(limits, name))]


def default_overlay(device: FpgaDevice, layers: Sequence[Layer], limits: UtilisationLimits,
                    clock_mhz: float) -> OverlayConfig:
    """An array in FQ-BERT's (N, M) = (8, 16) PU layout with as many PUs as fit: at most what the
    DSP limit allows (the lanes and the requantisers each PU instantiates), then fewer until
    every shared unit (array, requantisers, nonlinear units, buffers) is within the limits, the
    activation buffer in BRAM or, where the device has UltraRAM and BRAM is short, in URAM. When
    no PU count fits, the DSP-bound array is returned and its report says what is over."""
    pes_per_pu, m, lanes_nl = 8, 16, 16
    pack = packing_fits(device.dsp_slice, 8, 4)
    compute = [layer for layer in layers if not isinstance(layer, LayoutOp)]

    def config(pus: int, source: str, memory: str = "bram") -> OverlayConfig:
        return OverlayConfig(pus=pus, pes_per_pu=pes_per_pu, mults_per_pe=m, clock_mhz=clock_mhz,
                             pack_two_per_dsp=pack, nonlinear_lanes=lanes_nl, source=source,
                             activation_memory=memory)

    requantizers = requantizers_per_pu(config(1, ""), compute)
    per_pu_dsp = math.ceil(pes_per_pu * m / (2 if pack else 1)) \
        + requantizers * dsp_slices_per_product(32, 32, device.dsp_slice)
    one_per_kind = {u.op: u for u in compute if isinstance(u, NonlinearUnit)}
    nonlinear_dsp = sum(unit_price(u).dsp_per_lane * lanes_nl for u in one_per_kind.values())
    budget = math.floor(device.dsp.require("DSP count", device.key) * limits.dsp) - nonlinear_dsp
    dsp_pus = max(1, budget // per_pu_dsp)
    layout = (f"edgeq default: FQ-BERT (N, M) = (8, 16) PUs ({per_pu_dsp} DSPs per PU: "
              f"{math.ceil(pes_per_pu * m / (2 if pack else 1))} for the lanes, {requantizers} requantiser(s))")
    # the activation buffer in BRAM, else (devices with UltraRAM) in URAM, at the same PU count
    memories = ("bram", "uram") if device.uram.value else ("bram",)
    for pus in range(dsp_pus, 0, -1):
        for memory in memories:
            if not _over_limits(config(pus, "", memory), compute, device, limits):
                bound = ("as many PUs as the DSP limit allows" if pus == dsp_pus else
                         f"the most PUs whose LUT/FF/BRAM18/URAM/DSP fit the limits ({dsp_pus} by DSPs alone)")
                where = "" if memory == "bram" else "; activation buffer in URAM (it does not fit the BRAM)"
                return config(pus, f"{layout}, {pus} PUs: {bound}{where}", memory)
    over = "; ".join(f"activation buffer in {memory.upper()}: over in "
                     + ", ".join(_over_limits(config(1, "", memory), compute, device, limits)) for memory in memories)
    return config(dsp_pus, f"{layout}, {dsp_pus} PUs by the DSP limit: no PU count fits the device "
                           f"(even 1 PU: {over})")
