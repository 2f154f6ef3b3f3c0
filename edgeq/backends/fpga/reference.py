"""Published designs the estimator is checked against, built as edgeq layer lists.

* FINN's UNSW-NB15 MLP (network intrusion detection): 600-64-64-64-1, 2-bit weights, 2-bit ReLU
  activations, bipolar (1-bit) input and output, dataflow on XC7Z020 (Pynq-Z1) at 100 MHz.
  Model from FINN notebooks/end2end_example/cybersecurity/1-train-mlp-with-brevitas.ipynb
  (593 inputs padded to 600, QuantLinear weight_bit_width=2, QuantReLU bit_width=2, input mapped
  to bipolar {-1,+1}, bipolar output quantizer).
* FQ-BERT (Liu, Li, Cheng, DATE 2021): BERT-base encoder, sequence 128, W4A8, on ZCU102 with
  12 PUs x (N, M) = (8, 16) = 1,536 8x4 multipliers at 214 MHz; embedding and task layers on the
  CPU (paper Sec. III-A). Measured: 43.89 ms, 1,751 DSP (Table III/IV).

The measured numbers are the ones to compare with; nothing in the estimators was fitted to them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from edgeq.backends.fpga.dataflow import LayerFolding
from edgeq.backends.fpga.estimate import estimate
from edgeq.backends.fpga.layers import AttentionMatMul, Layer, MatVecLayer, NonlinearUnit
from edgeq.backends.fpga.overlay import OverlayConfig
from edgeq.backends.fpga.report import EstimateReport


@dataclass(frozen=True)
class Measured:
    value: float
    source: str


@dataclass(frozen=True)
class Comparison:
    """An estimate next to a measurement, with the ratio and the accepted band."""

    quantity: str
    estimated: float
    measured: float
    low: float
    high: float
    source: str

    @property
    def ratio(self) -> float:
        return self.estimated / self.measured

    @property
    def within(self) -> bool:
        return self.low <= self.ratio <= self.high

    def line(self) -> str:
        if self.high == float("inf"):  # context only, no band claimed
            return (f"{self.quantity}: estimated {self.estimated:,.6g} vs measured "
                    f"{self.measured:,.6g} -> ratio {self.ratio:.3f} (no band claimed)")
        mark = "ok" if self.within else "OUTSIDE"
        return (f"{self.quantity}: estimated {self.estimated:,.6g} vs measured "
                f"{self.measured:,.6g} -> ratio {self.ratio:.3f} (band {self.low:g}-{self.high:g}:"
                f" {mark})")


# --- FINN UNSW-NB15 MLP ------------------------------------------------------------------------
_UNSW_SOURCE = ("FINN UNSW-NB15 cybersecurity MLP, folding (16,40),(1,64),(1,64),(1,1) on "
                "xc7z020 at 100 MHz: out-of-context synthesis and rtlsim numbers as given in the "
                "edgeq FPGA issue")
UNSW_MEASURED = {
    "lut": Measured(7234, _UNSW_SOURCE + " (LUT)"),
    "bram18": Measured(44, _UNSW_SOURCE + " (BRAM18)"),
    "latency_cycles": Measured(213, _UNSW_SOURCE + " (latency cycles)"),
}
UNSW_FOLDING = {
    "fc0": LayerFolding(pe=16, simd=40),
    "fc1": LayerFolding(pe=1, simd=64),
    "fc2": LayerFolding(pe=1, simd=64),
    "fc3": LayerFolding(pe=1, simd=1),
}


def unsw_nb15_layers() -> list[Layer]:
    """600-64-64-64-1: bipolar input, W2 weights, 2-bit unsigned ReLU, bipolar output."""
    return [
        MatVecLayer("fc0", mh=64, mw=600, weight_bits=2, act_bits=1, out_bits=2,
                    act_signed=True),  # bipolar {-1,+1} input: FINN BIPOLAR, 1 bit, signed
        MatVecLayer("fc1", mh=64, mw=64, weight_bits=2, act_bits=2, out_bits=2),
        MatVecLayer("fc2", mh=64, mw=64, weight_bits=2, act_bits=2, out_bits=2),
        MatVecLayer("fc3", mh=1, mw=64, weight_bits=2, act_bits=2, out_bits=1),
    ]


def unsw_nb15_report() -> EstimateReport:
    return estimate(unsw_nb15_layers(), "pynq-z1", template="dataflow", folding=UNSW_FOLDING,
                    clock_mhz=100.0)


def unsw_nb15_comparisons(report: EstimateReport | None = None) -> list[Comparison]:
    report = report or unsw_nb15_report()
    m = UNSW_MEASURED
    return [
        Comparison("UNSW-NB15 LUT", report.totals.lut, m["lut"].value, 0.5, 1.6, m["lut"].source),
        Comparison("UNSW-NB15 BRAM18", report.totals.bram18, m["bram18"].value, 0.8, 1.2,
                   m["bram18"].source),
        Comparison("UNSW-NB15 latency cycles", report.latency_cycles,
                   m["latency_cycles"].value, 0.7, 1.3, m["latency_cycles"].source),
    ]


# --- FQ-BERT -----------------------------------------------------------------------------------
_FQBERT_SOURCE = "Liu, Li, Cheng, FQ-BERT, DATE 2021, ZCU102 (N, M) = (8, 16)"
FQBERT_MEASURED = {
    "latency_ms": Measured(43.89, _FQBERT_SOURCE + ", Table III/IV latency"),
    "dsp": Measured(1751, _FQBERT_SOURCE + ", Table III DSP48E"),
    "lut": Measured(123157, _FQBERT_SOURCE + ", Table III LUT"),
    "ff": Measured(124433, _FQBERT_SOURCE + ", Table III FF"),
    "bram18": Measured(838, _FQBERT_SOURCE + ", Table III BRAM18K"),
}

# Table III: 12 PUs, N = 8 PEs per PU, M = 16 multipliers per BIM; Sec. III-B: each BIM
# multiplier is an independent signed 8x4 multiplier (no DSP packing is described); Sec. IV-A:
# 214 MHz; Sec. III-A: weights reach the FPGA "through AXI4 interface" (one 128-bit port, the
# widest Zynq UltraScale+ PS-PL data port, e.g. PG338's DPU M_AXI_DATA ports). The paper gives
# no SIMD width for its Softmax/LN cores; 16 lanes (= M, one BIM-wide vector per cycle) is our
# assumption and is stated in the report.
FQBERT_OVERLAY = OverlayConfig(
    pus=12, pes_per_pu=8, mults_per_pe=16, clock_mhz=214.0, lane_a_bits=8, lane_w_bits=4,
    pack_two_per_dsp=False, nonlinear_lanes=16, axi_ports=1, axi_port_bits=128,
    source="FQ-BERT ZCU102: 12 PU x (N, M) = (8, 16) 8x4 multipliers, 214 MHz, no DSP packing "
           "(Table III, Sec. III-B, IV-A); nonlinear cores 16 lanes (assumed)",
)


def fq_bert_layers(seq: int = 128, hidden: int = 768, heads: int = 12, ffn: int = 3072,
                   encoders: int = 12) -> list[Layer]:
    """BERT-base encoder stack, W4A8; embedding, pooler and classifier stay on the host."""
    dh = hidden // heads
    layers: list[Layer] = []
    for i in range(encoders):
        p = f"enc{i}."
        layers += [
            MatVecLayer(p + "q", hidden, hidden, 4, 8, seq, out_bits=8, act_signed=True),
            MatVecLayer(p + "k", hidden, hidden, 4, 8, seq, out_bits=8, act_signed=True),
            MatVecLayer(p + "v", hidden, hidden, 4, 8, seq, out_bits=8, act_signed=True),
            AttentionMatMul(p + "qk", heads, seq, seq, dh, 8, 8, out_bits=8),
            NonlinearUnit(p + "softmax", "softmax", heads * seq, seq),
            AttentionMatMul(p + "av", heads, seq, dh, seq, 8, 8, a_signed=False, out_bits=8),
            MatVecLayer(p + "o", hidden, hidden, 4, 8, seq, out_bits=8, act_signed=True),
            NonlinearUnit(p + "ln1", "residual_layernorm", seq, hidden),
            MatVecLayer(p + "ffn1", ffn, hidden, 4, 8, seq, out_bits=8, act_signed=True),
            NonlinearUnit(p + "gelu", "gelu", seq, ffn),
            MatVecLayer(p + "ffn2", hidden, ffn, 4, 8, seq, out_bits=8, act_signed=True),
            NonlinearUnit(p + "ln2", "residual_layernorm", seq, hidden),
        ]
    return layers


def fq_bert_report(overlay: OverlayConfig = FQBERT_OVERLAY) -> EstimateReport:
    return estimate(fq_bert_layers(), "zcu102", template="overlay", overlay=overlay)


def fq_bert_comparisons(report: EstimateReport | None = None) -> list[Comparison]:
    report = report or fq_bert_report()
    m = FQBERT_MEASURED
    return [
        Comparison("FQ-BERT latency ms", report.latency_ms, m["latency_ms"].value, 0.7, 1.4,
                   m["latency_ms"].source),
        Comparison("FQ-BERT DSP", report.totals.dsp, m["dsp"].value, 0.7, 1.3, m["dsp"].source),
    ]


def fq_bert_context(report: EstimateReport | None = None) -> list[Comparison]:
    """Further Table III numbers, for information (no band is claimed for them)."""
    report = report or fq_bert_report()
    m = FQBERT_MEASURED
    return [Comparison(f"FQ-BERT {k}", getattr(report.totals, k), m[k].value, 0.0, float("inf"),
                       m[k].source) for k in ("lut", "ff", "bram18")]


def must_show_text() -> str:
    """The two must-show comparisons, with the reports that produced them."""
    unsw = unsw_nb15_report()
    fq = fq_bert_report()
    packed_cfg = replace(FQBERT_OVERLAY, pack_two_per_dsp=True,
                         source=FQBERT_OVERLAY.source + "; what-if: W4A8 packing")
    packed = fq_bert_report(packed_cfg)
    out = ["# UNSW-NB15 (FINN) on Pynq-Z1", unsw.to_text(), ""]
    out += [c.line() for c in unsw_nb15_comparisons(unsw)]
    no_overlap = sum(r.cycles for r in unsw.rows)
    out += [f"(for reference: no-overlap sum of layer cycles = {no_overlap}, ratio "
            f"{no_overlap / UNSW_MEASURED['latency_cycles'].value:.3f})", ""]
    out += ["# FQ-BERT on ZCU102 (first encoder layer shown)", fq.to_text(max_layers=12), ""]
    out += [c.line() for c in fq_bert_comparisons(fq)]
    out += [c.line() for c in fq_bert_context(fq)]
    out += ["", "# FQ-BERT what-if: same array with W4A8 packing (two 8x4 products per DSP48E2)",
            f"DSP {packed.totals.dsp:.0f} (ratio to measured "
            f"{packed.totals.dsp / FQBERT_MEASURED['dsp'].value:.3f}), latency "
            f"{packed.latency_ms:.4g} ms (packing changes DSP count, not lanes or cycles)"]
    return "\n".join(out)
