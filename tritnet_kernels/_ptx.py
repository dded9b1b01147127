"""Inline-PTX device helpers for the tensor-core kernels, each with a simulator twin.

Numba exposes no tensor-core instruction, but it lowers LLVM inline assembly, which NVVM
passes to PTX unchanged. The packed-trit matmul (matmul.py) decodes trits straight into
mma fragments in registers, so one warp-wide `mma.sync.m16n8k16` replaces 4096 scalar
multiply-adds: at M <= 16 this is what makes the GEMV faster than streaming fp16 weights
through cuBLAS (docs/kernels.md#packed-trit-matmul).

Helpers (all take and return uint32 / float32 scalars):

- `mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)`  D = A·B + C, A 16x16 and B 16x8 in
  fp16 pairs, C and D fp32 (fragment layout: PTX ISA, "mma.m16n8k16" for .f16: lane
  l = 4*g + t holds A[g|g+8][2t,2t+1|2t+8,2t+9], B[2t,2t+1|2t+8,2t+9][g],
  C[g|g+8][2t,2t+1]);
- `mma_bf16(...)`  the same with bf16 pairs (used to carry fp32 values as hi+mid+lo);
- `f16_bits(v)`, `bf16_bits(v)`  float32 -> 16-bit pattern, round to nearest even;
- `f32_from_bits(u)`  reinterpret a 32-bit pattern as float32.

Under NUMBA_ENABLE_CUDASIM=1 the same names are plain Python. The simulator has no warp
shuffles, so the mma twin exchanges fragments through a per-warp slot and two block
barriers: every thread of a block must reach each mma call (the kernels keep their mma
calls under block-uniform conditions for this reason).
"""

from . import _numba_compat  # noqa: F401  (must precede numba.cuda)

import threading

import numpy as np

from ._launch import simulator

__all__ = ["mma_f16", "mma_bf16", "f16_bits", "bf16_bits", "f32_from_bits"]


if simulator():

    _slots = {}

    def _halves(reg, kind):
        lo, hi = int(reg) & 0xFFFF, int(reg) >> 16
        if kind == "f16":
            return np.array([lo, hi], np.uint16).view(np.float16).astype(np.float64)
        return (np.array([lo, hi], np.uint32) << 16).view(np.float32).astype(np.float64)

    def _mma_sim(kind, a, b, c):
        th = threading.current_thread()
        lane = th.thread_id % 32
        key = (th.blockIdx.x, th.blockIdx.y, th.blockIdx.z, th.thread_id // 32)
        th.syncthreads()  # every lane has finished reading the previous call's slot
        slot = _slots.setdefault(key, [None] * 32)
        slot[lane] = (a, b)
        th.syncthreads()
        A = np.zeros((16, 16))
        B = np.zeros((16, 8))
        for ln, ((a0, a1, a2, a3), (b0, b1)) in enumerate(slot):
            g, t = ln >> 2, ln & 3
            for reg, row, k in ((a0, g, 2 * t), (a1, g + 8, 2 * t), (a2, g, 2 * t + 8),
                                (a3, g + 8, 2 * t + 8)):
                A[row, k:k + 2] = _halves(reg, kind)
            for reg, k in ((b0, 2 * t), (b1, 2 * t + 8)):
                B[k:k + 2, g] = _halves(reg, kind)
        D = A @ B
        g, t = lane >> 2, lane & 3
        return (np.float32(c[0] + D[g, 2 * t]), np.float32(c[1] + D[g, 2 * t + 1]),
                np.float32(c[2] + D[g + 8, 2 * t]), np.float32(c[3] + D[g + 8, 2 * t + 1]))

    def mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        return _mma_sim("f16", (a0, a1, a2, a3), (b0, b1), (c0, c1, c2, c3))

    def mma_bf16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        return _mma_sim("bf16", (a0, a1, a2, a3), (b0, b1), (c0, c1, c2, c3))

    def f16_bits(v):
        return np.uint32(np.float32(v).astype(np.float16).view(np.uint16))

    def bf16_bits(v):
        u = int(np.float32(v).view(np.uint32))
        return np.uint32(((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF)

    def f32_from_bits(u):
        return np.uint32(u).view(np.float32)

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    _u32, _f32 = types.uint32, types.float32

    def _mma(ab):
        asm = (f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32 "
               "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};")

        @intrinsic
        def mma(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            sig = types.UniTuple(_f32, 4)(*([_u32] * 6 + [_f32] * 4))

            def codegen(context, builder, sig, args):
                i32, f32 = ir.IntType(32), ir.FloatType()
                fnty = ir.FunctionType(ir.LiteralStructType([f32] * 4), [i32] * 6 + [f32] * 4)
                # Not side-effecting: LLVM may schedule loads across it.
                call = ir.InlineAsm(fnty, asm, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")
                res = builder.call(call, args)
                vals = [builder.extract_value(res, i) for i in range(4)]
                return context.make_tuple(builder, sig.return_type, vals)

            return sig, codegen

        return mma

    mma_f16 = _mma("f16")
    mma_bf16 = _mma("bf16")

    def _cvt16(ptx_type):
        @intrinsic
        def cvt(typingctx, v):
            def codegen(context, builder, sig, args):
                fnty = ir.FunctionType(ir.IntType(16), [ir.FloatType()])
                call = ir.InlineAsm(fnty, f"cvt.rn.{ptx_type}.f32 $0, $1;", "=h,f")
                return builder.zext(builder.call(call, args), ir.IntType(32))

            return _u32(_f32), codegen

        return cvt

    f16_bits = _cvt16("f16")
    bf16_bits = _cvt16("bf16")

    @intrinsic
    def f32_from_bits(typingctx, u):
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.FloatType())

        return _f32(_u32), codegen
