"""Does ONNX Runtime run its AMX int8 GEMM on this CPU, and how fast is it? (issue 4, x86-amx)

    python tools/ort_amx_probe.py          # Linux x86-64; compare with tools/amx_probe.c

MLAS calls MlasInitAMX() only on its AMX dispatch path (CPUID AMX-TILE/AMX-INT8 and the XCR0 tile
bits set); it asks Linux for the tile state with arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA), which
shows as bit 18 of ARCH_GET_XCOMP_PERM for the whole process. The GEMM rows are single u8 x s8
MatMulInteger nodes (B a constant, so ORT pre-packs it), median of 7 runs after a warm-up.
"""
import ctypes
import time

import numpy as np

libc = ctypes.CDLL(None, use_errno=True)
def perm():
    v = ctypes.c_ulong(0); libc.syscall(158, 0x1022, ctypes.byref(v)); return v.value
print(f"before onnxruntime: xcomp perm 0x{perm():x} (XTILEDATA {bool(perm() >> 18 & 1)})")
import onnxruntime as ort
from onnx import helper, TensorProto, numpy_helper
print(f"after import {ort.__version__}: 0x{perm():x}")
for M, K, N, threads in ((2048, 1024, 1024, 1), (8192, 4096, 4096, 1), (2048, 384, 1536, 1), (8192, 4096, 4096, 16)):
    rng = np.random.default_rng(0)
    b = rng.integers(-127, 128, (K, N), dtype=np.int8)
    g = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.UINT8, [M, K])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [M, N])], [numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]); m.ir_version = 8
    so = ort.SessionOptions(); so.intra_op_num_threads = threads
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 256, (M, K), dtype=np.uint8)
    s.run(None, {"a": a})
    ts = []
    for _ in range(7):
        t = time.perf_counter(); s.run(None, {"a": a}); ts.append(time.perf_counter() - t)
    print(f"{M}x{K}x{N} {threads} thread(s): {M*K*N/np.median(ts)/1e9:.0f} GMAC/s; xcomp perm now 0x{perm():x} (XTILEDATA {bool(perm() >> 18 & 1)})")
