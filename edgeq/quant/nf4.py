"""4-bit NormalFloat (NF4, QLoRA: Dettmers et al. 2023) block quantization in the layout of ONNX
Runtime's com.microsoft `MatMulBnb4` (its CPU kernel dequantizes then runs an fp32 GEMM).

MatMulBnb4(A, B, absmax) with attributes K, N, block_size and quant_type (1 = NF4) computes
A @ W for W [K, N]: the weight is transposed to [N, K] and flattened, split into blocks of
`block_size` consecutive values (K of one output column per block when block_size divides K),
each block scaled by its absolute maximum (`absmax`, one float per block) and every value
replaced by the index of the nearest of the 16 NF4 levels; two codes per byte, the first in the
high nibble (onnxruntime contrib_ops/cpu/quantization/blockwise_quant_block_bnb4.h).
"""

from __future__ import annotations

import numpy as np

from edgeq.errors import OptionError

# The 16 NF4 levels (bitsandbytes' NF4 table, as ONNX Runtime's kernel has it): quantiles of a
# standard normal, normalized to [-1, 1], with an exact 0.
NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=np.float32)

# Decision thresholds between neighbouring levels (the kernel's dQuantizeNF4 tree: a value
# strictly above a threshold takes the upper level).
_THRESHOLDS = np.array([
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011], dtype=np.float32)

QUANT_TYPE_NF4 = 1  # MatMulBnb4's quant_type for NF4 (0 is FP4)


def nf4_codes(x: np.ndarray) -> np.ndarray:
    """The NF4 code (0..15) of each value of `x`, already divided by its block's absmax."""
    return np.searchsorted(_THRESHOLDS, np.asarray(x, np.float32), side="left").astype(np.uint8)


def quantize_nf4(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """NF4-quantize a [K, N] weight as MatMulBnb4 stores it: (packed uint8 [ceil(K*N/2)],
    absmax float32 [ceil(K*N/block_size)])."""
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise OptionError(f"nf4 weights must be 2-D [K, N], not {w.shape}")
    if block_size < 16 or block_size & (block_size - 1):
        raise OptionError(f"nf4 block size must be a power of two >= 16, not {block_size}")
    flat = np.ascontiguousarray(w.T).reshape(-1)
    numel = flat.size
    blocks = -(-numel // block_size)
    padded = np.zeros(blocks * block_size, np.float32)
    padded[:numel] = flat
    padded = padded.reshape(blocks, block_size)
    absmax = np.abs(padded).max(axis=1).astype(np.float32)
    with np.errstate(divide="ignore"):
        reciprocal = np.where(absmax > 0, np.float32(1.0) / absmax, np.float32(0.0)).astype(np.float32)
    # An odd count pads the last byte with the code of 0.0 (7), as the kernel's quantizer does.
    codes = nf4_codes(padded * reciprocal[:, None]).reshape(-1)[:numel + numel % 2]
    return pack_nibbles(codes), absmax


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte, the first in the high nibble (an odd count pads a zero code)."""
    codes = np.asarray(codes, np.uint8).reshape(-1)
    if codes.size % 2:
        codes = np.concatenate([codes, np.zeros(1, np.uint8)])
    return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    packed = np.asarray(packed, np.uint8).reshape(-1)
    codes = np.empty(packed.size * 2, np.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0x0F
    return codes[:count]


def dequantize_nf4(packed: np.ndarray, absmax: np.ndarray, k: int, n: int, block_size: int) -> np.ndarray:
    """The [K, N] float32 weight MatMulBnb4 multiplies by."""
    codes = unpack_nibbles(packed, k * n)
    scales = np.repeat(np.asarray(absmax, np.float32), block_size)[:k * n]
    return (NF4_TABLE[codes] * scales).reshape(n, k).T.copy()
