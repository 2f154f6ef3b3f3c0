"""FPGA device catalog: the resources an estimate is checked against, each number with its source.

Targets are data (DESIGN.md). Every field is a `Sourced` value that names the document the
number comes from *and* what was actually read to confirm it, so a reviewer can re-check it.
Where a number could not be confirmed from a readable source it is stored as `None` with the
reason; a cost model that needs it raises instead of guessing (see `require`).

Counts are for the programmable logic only (no PS). BRAM is counted in RAMB18 halves
(one RAMB36 tile = two RAMB18), the unit FINN's estimates use.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Generic, TypeVar

from edgeq.errors import CostModelError, UnknownTargetError

T = TypeVar("T", int, float)


class UnknownDeviceError(UnknownTargetError):
    """No FPGA device of that name or alias is in the catalog."""


@dataclass(frozen=True)
class Sourced(Generic[T]):
    """A number and where it comes from; `value is None` means not confirmed from a source."""

    value: T | None
    source: str

    def require(self, what: str, device: str) -> T:
        """The value, or a CostModelError that says which number is missing and why."""
        if self.value is None:
            raise CostModelError(
                f"{device}: {what} is not in the catalog ({self.source})",
                fix=f"pass the {what} explicitly",
            )
        return self.value


@dataclass(frozen=True)
class FpgaDevice:
    """One FPGA part on one board, as far as a resource/latency estimate needs it."""

    key: str
    part: str
    board: str
    dsp_slice: str  # "DSP48E1" (7 series, 25x18 multiplier) or "DSP48E2" (UltraScale+, 27x18)
    lut: Sourced[int]
    ff: Sourced[int]
    bram18: Sourced[int]
    uram: Sourced[int]
    dsp: Sourced[int]
    clock_mhz: Sourced[float]
    dram_gbps: Sourced[float]

    def resource_counts(self) -> dict[str, int]:
        """LUT/FF/BRAM18/URAM/DSP as plain ints (all of them must be sourced)."""
        names = ("lut", "ff", "bram18", "uram", "dsp")
        return {name: getattr(self, name).require(name, self.key) for name in names}

    def sources(self) -> dict[str, str]:
        """Field name -> source text, for reports."""
        return {
            f.name: getattr(self, f.name).source
            for f in fields(self)
            if isinstance(getattr(self, f.name), Sourced)
        }


@dataclass(frozen=True)
class UtilisationLimits:
    """Fractions of each resource a design may use and still be expected to close timing."""

    lut: float
    ff: float
    bram18: float
    uram: float
    dsp: float
    source: str


# FINN src/finn/util/platforms.py, DEFAULT_RES_LIMITS = [0.7, 0.5, 0.80, 0.80, 0.80] for
# LUT, FF, BRAM_18K, URAM, DSP: "recommended resource limits from Xilinx for timing closure".
FINN_UTILISATION_LIMITS = UtilisationLimits(
    lut=0.7,
    ff=0.5,
    bram18=0.8,
    uram=0.8,
    dsp=0.8,
    source="FINN src/finn/util/platforms.py DEFAULT_RES_LIMITS (Xilinx timing-closure guideline)",
)

# --- sources, named once --------------------------------------------------------------------
_PYNQ_Z1_RM = (
    "Digilent PYNQ-Z1 Reference Manual (XC7Z020-1CLG400C): 13,300 slices of four 6-input "
    "LUTs and 8 flip-flops, 630 KB block RAM, 220 DSP slices, 512 MB DDR3 16-bit @ 1050 MT/s"
)
_DS190 = "Xilinx DS190 Zynq-7000 SoC overview (XC7Z020 device table)"
_FINN_Z7020 = "FINN src/finn/util/platforms.py Zynq7020_Platform: 280 BRAM_18K, 0 URAM, 220 DSP"
_FINN_NB = (
    "FINN notebooks/end2end_example/cybersecurity/3-build-accelerator-with-finn.ipynb: "
    "synth_clk_period_ns=10.0 for xc7z020clg400-1 / Pynq-Z1"
)
_DS891 = "Xilinx DS891 Zynq UltraScale+ MPSoC data sheet: overview (device table)"
_FQBERT_T3 = (
    "Liu, Li, Cheng, 'Hardware Acceleration of Fully Quantized BERT', DATE 2021 (FQ-BERT), "
    "Table III device rows"
)
_FQBERT_CLK = (
    "FQ-BERT (Liu et al., DATE 2021) Sec. IV-A: FPGA part clocked at 214 MHz on ZCU102 and ZCU111"
)
_FINN_EX_ZYNQ_CLK = (
    "finn-examples build/bnn-pynq/build.py: synth_clk_period_ns=10.0 for Pynq-Z1, ZCU104, U250"
)
_FINN_EX_ALVEO_CLK = (
    "finn-examples build/mobilenet-v1/build.py select_clk_period: 3.0 ns for Alveo (U250)"
)
_ZU7EV_REPORTS = (
    "DS891 XCZU7EV; confirmed from the 'Available' column of public Vivado/Vitis HLS "
    "utilisation reports for the ZCU104 part (LUT 230400, FF 460800, BRAM_18K 624, "
    "DSP 1728, URAM 96)"
)
_K26_DOCS = (
    "Kria KV260 app docs (smartcamera/nlp-smartvision hw_arch_accel): K26 available "
    "CLB LUTs 117120, BRAM 144 (36 Kb), DSP 1248, URAM 64"
)
_K26_FF = (
    "Vitis HLS csynth report for xck26-sfvc784-2LV-c (public report, 'Available' column): "
    "FF 234240; DS987 Kria K26 SOM data sheet"
)
_K26_DDR = "Xilinx DS987 Kria K26 SOM data sheet: 4 GB 64-bit wide, 2400 Mb/s memory"
_K26_CLK = "Kria KV260 NLP SmartVision docs: 'The DPU is assumed to run at 300 MHz'"
_ZU28DR_URAM = (
    "FINN src/finn/util/platforms.py ZU28DR_Platform: 80 URAM; DS889 Zynq UltraScale+ RFSoC "
    "overview"
)
_U250_UG1120 = (
    "AMD UG1120 Alveo platforms (xilinx_u250_xdma_201830_2 dynamic region, 4 SLRs), per-SLR "
    "counts as transcribed in ThunderGP automation/devices/xilinx_u250_xdma_201830_2.h "
    "(FINN platforms.py quotes the same UG1120 row: 345000 LUT, 2x500 BRAM18, 320 URAM, "
    "2877 DSP per SLR); user-region budget, not the whole XCU250 die"
)
_U250_DDR = (
    "UG1120 DMA configurations: U250 4x DDR4 16 GB; 19 GB/s per channel "
    "(ThunderGP platform_memory_bandwidth_per_channel = 19)"
)
# PS DDR4 of the Zynq UltraScale+ evaluation boards, from AMD's Vivado board files (the
# processing-system preset every design built "for the board" starts from): a 64-bit bus at
# DDR4-2133 (1067 MHz clock), i.e. 64/8 bytes x 2133 MT/s = 17.06 GB/s peak. The PS DDR is what
# the PL reaches through the S_AXI_HP ports (the PL-side SODIMM of ZCU104 needs a MIG in fabric).
_PS_DDR_2133_64 = 64 / 8 * 2133e6 / 1e9


def _board_preset(board: str, version: str, commit: str, guide: str) -> str:
    return (f"AMD Vivado board file Xilinx/XilinxBoardStore boards/Xilinx/{board}/{version}/preset.xml "
            f"(commit {commit}), zynq_ultra_ps_e preset: PSU__DDRC__BUS_WIDTH '64 Bit', "
            f"PSU__DDRC__SPEED_BIN 'DDR4_2133P', PSU__CRF_APB__DDR_CTRL__FREQMHZ 1067; 64-bit x 2133 MT/s "
            f"= 17.06 GB/s peak (theoretical; sustained AXI throughput is lower); {guide}")


_ZCU102_DDR = _board_preset("zcu102", "3.4", "6cb55a9f", "PSU__DDRC__COMPONENTS 'UDIMM' (the board's PS DDR4 "
                            "module; the board guide UG1182 was not readable in this session)")
_ZCU104_DDR = _board_preset("zcu104", "1.1", "1143dec6", "PSU__DDRC__COMPONENTS 'Components'; PYNQ docs "
                            "pynq_overlays/zcu104.rst: 'PS DDR4 64-bit Component' (board guide UG1267)")
_ZCU111_DDR = _board_preset("zcu111", "1.4", "1ab1c3f1", "PSU__DDRC__COMPONENTS 'UDIMM' (the board's PS DDR4 "
                            "module; the board guide UG1271 was not readable in this session)")

# U250 user region: ThunderGP xilinx_u250_xdma_201830_2.h per-SLR rows, summed over 4 SLRs.
_U250_SLR_LUTS = (345171, 344533, 344878, 345158)
_U250_SLR_FFS = (704801, 702517, 703253, 703761)


def _src(value: T | None, source: str) -> Sourced[T]:
    return Sourced(value, source)


XC7Z020 = FpgaDevice(
    key="xc7z020",
    part="xc7z020clg400-1",
    board="Pynq-Z1",
    dsp_slice="DSP48E1",
    lut=_src(13_300 * 4, _PYNQ_Z1_RM + "; " + _DS190),
    ff=_src(13_300 * 8, _PYNQ_Z1_RM + "; " + _DS190),
    # 630 KB / 4.5 KB per RAMB36 = 140 RAMB36 = 280 RAMB18
    bram18=_src(280, _PYNQ_Z1_RM + " (630 KB = 140 x 36 Kb); " + _FINN_Z7020),
    uram=_src(0, _FINN_Z7020 + " (7 series has no UltraRAM)"),
    dsp=_src(220, _PYNQ_Z1_RM),
    clock_mhz=_src(100.0, _FINN_NB),
    # 16-bit bus x 1050 MT/s = 2.1 GB/s
    dram_gbps=_src(16 / 8 * 1050e6 / 1e9, _PYNQ_Z1_RM),
)

XCZU9EG = FpgaDevice(
    key="xczu9eg",
    part="xczu9eg-ffvb1156-2-e",
    board="ZCU102",
    dsp_slice="DSP48E2",
    lut=_src(274_080, _FQBERT_T3 + " (ZCU102: LUT 274080); " + _DS891),
    ff=_src(548_160, _FQBERT_T3 + " (ZCU102: FF 548160); " + _DS891),
    bram18=_src(1_824, _FQBERT_T3 + " (ZCU102: BRAM18K 1824); " + _DS891),
    uram=_src(0, "FINN src/finn/util/platforms.py ZU9EG_Platform: 0 URAM; " + _DS891),
    dsp=_src(2_520, _FQBERT_T3 + " (ZCU102: DSP48E 2520); " + _DS891),
    clock_mhz=_src(214.0, _FQBERT_CLK),
    dram_gbps=_src(_PS_DDR_2133_64, _ZCU102_DDR),
)

XCZU7EV = FpgaDevice(
    key="xczu7ev",
    part="xczu7ev-ffvc1156-2-e",
    board="ZCU104",
    dsp_slice="DSP48E2",
    lut=_src(230_400, _ZU7EV_REPORTS),
    ff=_src(460_800, _ZU7EV_REPORTS),
    bram18=_src(624, _ZU7EV_REPORTS + " (312 RAMB36 tiles)"),
    uram=_src(96, _ZU7EV_REPORTS),
    dsp=_src(1_728, _ZU7EV_REPORTS),
    clock_mhz=_src(100.0, _FINN_EX_ZYNQ_CLK),
    dram_gbps=_src(_PS_DDR_2133_64, _ZCU104_DDR),
)

XCK26 = FpgaDevice(
    key="xck26",
    part="xck26-sfvc784-2LV-c",
    board="KV260",
    dsp_slice="DSP48E2",
    lut=_src(117_120, _K26_DOCS),
    ff=_src(234_240, _K26_FF),
    bram18=_src(288, _K26_DOCS + " (144 x 36 Kb = 288 RAMB18)"),
    uram=_src(64, _K26_DOCS),
    dsp=_src(1_248, _K26_DOCS),
    clock_mhz=_src(300.0, _K26_CLK),
    # 64-bit x 2400 MT/s = 19.2 GB/s
    dram_gbps=_src(64 / 8 * 2400e6 / 1e9, _K26_DDR),
)

XCZU28DR = FpgaDevice(
    key="xczu28dr",
    part="xczu28dr-ffvg1517-2-e",
    board="ZCU111",
    dsp_slice="DSP48E2",
    lut=_src(425_280, _FQBERT_T3 + " (ZCU111: LUT 425280)"),
    ff=_src(850_560, _FQBERT_T3 + " (ZCU111: FF 850560)"),
    bram18=_src(2_160, _FQBERT_T3 + " (ZCU111: BRAM18K 2160)"),
    uram=_src(80, _ZU28DR_URAM),
    dsp=_src(4_272, _FQBERT_T3 + " (ZCU111: DSP48E 4272)"),
    clock_mhz=_src(214.0, _FQBERT_CLK),
    dram_gbps=_src(_PS_DDR_2133_64, _ZCU111_DDR),
)

XCU250 = FpgaDevice(
    key="xcu250",
    part="xcu250-figd2104-2L-e",
    board="Alveo U250",
    dsp_slice="DSP48E2",
    lut=_src(sum(_U250_SLR_LUTS), _U250_UG1120),
    ff=_src(sum(_U250_SLR_FFS), _U250_UG1120),
    bram18=_src(4 * 2 * 500, _U250_UG1120 + " (500 RAMB36 per SLR)"),
    uram=_src(4 * 320, _U250_UG1120),
    dsp=_src(4 * 2877, _U250_UG1120),
    clock_mhz=_src(1000.0 / 3.0, _FINN_EX_ALVEO_CLK),
    dram_gbps=_src(4 * 19.0, _U250_DDR),
)

CATALOG: dict[str, FpgaDevice] = {
    d.key: d for d in (XC7Z020, XCZU9EG, XCZU7EV, XCK26, XCZU28DR, XCU250)
}

ALIASES: dict[str, str] = {
    "pynq-z1": "xc7z020",
    "pynqz1": "xc7z020",
    "zcu102": "xczu9eg",
    "zcu104": "xczu7ev",
    "kv260": "xck26",
    "k26": "xck26",
    "zcu111": "xczu28dr",
    "u250": "xcu250",
    "alveo-u250": "xcu250",
}


def device_names() -> list[str]:
    """Every name `get_device` accepts (catalog keys and aliases), sorted."""
    return sorted({*CATALOG, *ALIASES})


def get_device(name: str | FpgaDevice) -> FpgaDevice:
    """Look a device up by part key or board alias (case-insensitive)."""
    if isinstance(name, FpgaDevice):
        return name
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in CATALOG:
        known = ", ".join(device_names())
        raise UnknownDeviceError(f"unknown FPGA device '{name}'", fix=f"use one of: {known}")
    return CATALOG[key]
