"""Triton kernels for the vector-quantized linear layer (additive codebooks), forward, backward,
dequantize and the k-means assignment step.

Source: VQ4DiT (Deng et al., AAAI 2025; d = 4, K = 256, M = 1) and AQLM (Egiazarian et al., ICML 2024;
M additive codebooks, e.g. 1x16g8, 2x8g8).  Format and math: the C ABI csrc/include/kernelkit/vq.h.
Float64 reference: python/kernelkit/vq/reference.py.

Shapes (nothing is transposed or dequantized in global memory by the matmul launchers):
    x          (B, n_in)          unit inner stride, row stride stride_x >= n_in
    dout       (B, n_out)         unit inner stride, row stride >= n_out
    codes      (n_out, G, M)      contiguous, uint8 or int16 (read as unsigned: `& 0xFFFF`), G = n_in / d
    codebooks  (S, M, K, d)       contiguous, x's dtype; output row o uses set o // rows_per_codebook
    scales     (n_out,) or None;  bias (n_out,) or None
    out (B, n_out), dx (B, n_in), dcodebooks (S, M, K, d), dscales (n_out,), W (n_out, n_in): fresh, contiguous
Math (U = W without the scale):
    U[o, g*d + t] = sum_m codebooks[o // rpc, m, codes[o, g, m], t],     W[o, i] = scales[o] * U[o, i]
    forward   out[b, o]  = bias[o] + scales[o] * sum_i x[b, i] U[o, i]
    backward  dx[b, i]   = sum_o dout[b, o] W[o, i]
              dW[o, i]   = sum_b dout[b, o] x[b, i]
              dcodebooks[s, m, k, t] = sum over (o in set s, g) with codes[o, g, m] = k of scales[o] dW[o, g*d + t]
              dscales[o] = sum_i dW[o, i] U[o, i]
    assign    for each vector v (n, d): the topn centroids c (K, d) of smallest sum_t (v_t - c_t)^2,
              nearest first, ties to the smaller index.

Dequantizing a tile (_codeword_tile): element (o, i) of a tile reads the code at codes[o, i >> log2 d, m]
and the codeword value codebooks[set, m, code, i & (d - 1)] for each m, summed in the accumulation dtype.
The d entries of one group read the same code (one L1 line, broadcast); the codebooks (256 x 4 values
for VQ4DiT, 2 x 256 x 8 for AQLM 2x8, up to 65536 x 8 for 1x16) are read through L1 / L2 with computed
addresses -- Triton has no explicit shared-memory gather, so "codebooks on chip" means cache-resident
here.  d is passed as log2(d) (a runtime argument, shifts and masks), so one compiled kernel serves every
d in {1, 2, 4, 8, 16}; M is a runtime loop bound.

Kernels (all grids are 1-D, so no launch ever meets CUDA's 65535 limit on grid axes 1 / 2):
    _gemv_kernel      (row blocks x batch tiles, batch tile fastest so the programs that share a block
        of codes run together).  A program owns BO output rows and BB (1, 2 or 4) batch rows; per
        input chunk of BI it dequantizes the (BO, BI) tile of U once and reduces the (BB, BO, BI)
        broadcast product x[b, i] U[o, i] over i in registers.  The small-batch path (B <= 16).
    _gemm_fwd_kernel  (batch tiles x row tiles, grouped ordering for L2 reuse).  Per chunk of BK inputs:
        the (BM, BK) x tile and the (BK, BN) U^T tile dequantized in registers, then tl.dot.
    _gemm_dx_kernel   (batch tiles x input tiles): dx = dout (s U) with the K loop over output rows;
        the (BK outputs, BN inputs) tile of U is dequantized, scaled per row, and fed to tl.dot.
    _dw_kernel        (row tiles x input tiles): the (BO, BI) tile of dW = dout^T x by tl.dot over the
        batch in chunks of BB; then, as asked, (a) dscales partials rowsum(dW * U) into a
        (n_out, input tiles) buffer that torch sums in a fixed order, (b) s[o] dW[o, i] added with
        tl.atomic_add into an fp32 (fp64) copy of dcodebooks at each entry's codeword, for each m.
    _dequant_kernel   (row tiles x input tiles): W = s U stored.
    _assign_kernel    (vector blocks): rank r = 0 .. topn-1 is a pass over all centroids in chunks of BK
        that takes the lexicographically smallest (distance, index) strictly after rank r-1's; the
        distances are recomputed each pass in the same order (bitwise the same), so the ranks are exact
        and ties go to the smaller index.  topn <= 8 passes (1 for k-means).

Numerics: accumulation in fp32 for float16 / bfloat16 / float32, fp64 for float64 (which runs only under
the interpreter, for gradcheck).  The dequantized U is summed over m in the accumulation dtype; the GEMM
paths round it (times the scale in dx) to the input dtype for tl.dot (fp16 / bf16 tensor cores, fp32 with
input_precision="ieee", i.e. exact fp32 FMA, no tf32).  The forward applies the scale to the fp32
accumulator.  dcodebooks accumulates with float32 (float64) atomics, so its last bits may vary from run
to run; everything else has a fixed sum order and is bitwise reproducible.  (Under the interpreter,
Triton 3.9 truncates fp32->bf16 casts instead of rounding, so bf16 errors there are ~2x the GPU's.)

Only plain pointer arithmetic + masks are used (no block pointers / descriptors), so the same source runs
on Triton 3.6 .. 3.9 and under TRITON_INTERPRET=1.  Offsets that scale with a batch row (b * stride), an
output row (o * G * M, o * n_in) or a codebook entry ((set * M + m) * K * d) are int64; in-row offsets are
int32.  Tile choices depend on shapes and dtypes only; the interpreter runs the GPU's tiles.
"""
from __future__ import annotations

import contextlib
import itertools
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_UPCAST_BF16 = _INTERPRET   # the interpreter's tl.dot multiplies bf16's raw uint16 storage (Triton 3.9)
# path 0 (auto) takes the GEMV path up to this batch (python/kernelkit/vq/ops.py TRITON_GEMV_MAX_BATCH)
GEMV_MAX_BATCH = 16
GROUP_SIZES = (1, 2, 4, 8, 16)
_PROGRAMS_MAX = 2 ** 31 - 1   # grid axis 0
_INF = tl.constexpr(float("inf"))
_BIG = tl.constexpr(2 ** 31 - 1)   # "no index yet" in the assignment step


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _codeword_tile(codes_ptr, cb_ptr, o, i, mask, G, M, K, rpc, LOG2D, ACC_DT: tl.constexpr):
    # U[o, i] for index tensors o, i broadcast to the tile's shape (e.g. o[:, None], i[None, :]).
    # Masked-off elements read nothing and are 0.
    g = (i >> LOG2D).to(tl.int64)
    t = i & ((1 << LOG2D) - 1)
    code_pos = o.to(tl.int64) * G * M + g * M              # codes[o, g, 0]
    set_base = (o // rpc).to(tl.int64) * M                  # first codebook of the row's set
    d = 1 << LOG2D
    c = tl.load(codes_ptr + code_pos, mask=mask, other=0).to(tl.int32) & 0xFFFF
    u = tl.load(cb_ptr + ((set_base * K + c) * d + t), mask=mask, other=0.0).to(ACC_DT)
    for m in range(1, M):
        c = tl.load(codes_ptr + code_pos + m, mask=mask, other=0).to(tl.int32) & 0xFFFF
        u += tl.load(cb_ptr + (((set_base + m) * K + c) * d + t), mask=mask, other=0.0).to(ACC_DT)
    return u


@triton.jit(do_not_specialize=["LOG2D"])
def _gemv_kernel(x_ptr, codes_ptr, cb_ptr, scale_ptr, bias_ptr, out_ptr,
                 B, n_out, n_in, G, M, K, rpc, LOG2D, stride_xb, stride_ob,
                 BB: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DT: tl.constexpr):
    # program (o block, batch tile) writes out[tile rows, BO rows] completely (bias / zeros when n_in = 0)
    pid = tl.program_id(0)
    n_bt = tl.cdiv(B, BB)
    pid_b = pid % n_bt
    pid_o = pid // n_bt
    offs_b = pid_b.to(tl.int64) * BB + tl.arange(0, BB)
    offs_o = pid_o * BO + tl.arange(0, BO)
    mask_b = offs_b < B
    mask_o = offs_o < n_out
    acc = tl.zeros((BB, BO), dtype=ACC_DT)
    for i0 in range(0, n_in, BI):
        offs_i = i0 + tl.arange(0, BI)
        mask_i = offs_i < n_in
        u = _codeword_tile(codes_ptr, cb_ptr, offs_o[:, None], offs_i[None, :],
                           mask_o[:, None] & mask_i[None, :], G, M, K, rpc, LOG2D, ACC_DT)   # (BO, BI)
        xt = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_i[None, :],
                     mask=mask_b[:, None] & mask_i[None, :], other=0.0).to(ACC_DT)          # (BB, BI)
        acc += tl.sum(xt[:, None, :] * u[None, :, :], axis=2)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + offs_o, mask=mask_o, other=0.0).to(ACC_DT)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0).to(ACC_DT)[None, :]
    tl.store(out_ptr + offs_b[:, None] * stride_ob + offs_o[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_b[:, None] & mask_o[None, :])


@triton.jit
def _grouped(pid, n_m, n_n, GROUP: tl.constexpr):
    # the matmul tutorial's ordering: GROUP row tiles sweep the column tiles together (L2 reuse)
    in_group = GROUP * n_n
    first = (pid // in_group) * GROUP
    size = tl.minimum(n_m - first, GROUP)
    pid_m = first + (pid % in_group) % size
    pid_n = (pid % in_group) // size
    return pid_m, pid_n


@triton.jit(do_not_specialize=["LOG2D"])
def _gemm_fwd_kernel(x_ptr, codes_ptr, cb_ptr, scale_ptr, bias_ptr, out_ptr,
                     B, n_out, n_in, G, M, K, rpc, LOG2D, stride_xb, stride_ob,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                     HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DT: tl.constexpr,
                     DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(B, BM), tl.cdiv(n_out, BN), GROUP)
    offs_b = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    offs_o = pid_n * BN + tl.arange(0, BN)
    mask_b = offs_b < B
    mask_o = offs_o < n_out
    acc = tl.zeros((BM, BN), dtype=ACC_DT)
    for k0 in range(0, n_in, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < n_in
        xt = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :],
                     mask=mask_b[:, None] & mask_k[None, :], other=0.0)                      # (BM, BK)
        # the transposed tile U^T (BK, BN), dequantized in registers
        ut = _codeword_tile(codes_ptr, cb_ptr, offs_o[None, :], offs_k[:, None],
                            mask_k[:, None] & mask_o[None, :], G, M, K, rpc, LOG2D, ACC_DT)
        acc += _dot(xt, ut.to(x_ptr.dtype.element_ty), DOT_PREC, UPCAST)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + offs_o, mask=mask_o, other=0.0).to(ACC_DT)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0).to(ACC_DT)[None, :]
    tl.store(out_ptr + offs_b[:, None] * stride_ob + offs_o[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_b[:, None] & mask_o[None, :])


@triton.jit(do_not_specialize=["LOG2D"])
def _gemm_dx_kernel(dout_ptr, codes_ptr, cb_ptr, scale_ptr, dx_ptr,
                    B, n_out, n_in, G, M, K, rpc, LOG2D, stride_db, stride_dxb,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                    HAS_SCALE: tl.constexpr, ACC_DT: tl.constexpr,
                    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # dx (BM batch rows, BN inputs) = sum over output chunks of dout (BM, BK) @ W (BK, BN)
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(B, BM), tl.cdiv(n_in, BN), GROUP)
    offs_b = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    offs_i = pid_n * BN + tl.arange(0, BN)
    mask_b = offs_b < B
    mask_i = offs_i < n_in
    acc = tl.zeros((BM, BN), dtype=ACC_DT)
    for k0 in range(0, n_out, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < n_out
        dt = tl.load(dout_ptr + offs_b[:, None] * stride_db + offs_k[None, :],
                     mask=mask_b[:, None] & mask_k[None, :], other=0.0)                      # (BM, BK)
        w = _codeword_tile(codes_ptr, cb_ptr, offs_k[:, None], offs_i[None, :],
                           mask_k[:, None] & mask_i[None, :], G, M, K, rpc, LOG2D, ACC_DT)   # (BK, BN)
        if HAS_SCALE:
            w *= tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0).to(ACC_DT)[:, None]
        acc += _dot(dt, w.to(dout_ptr.dtype.element_ty), DOT_PREC, UPCAST)
    tl.store(dx_ptr + offs_b[:, None] * stride_dxb + offs_i[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=mask_b[:, None] & mask_i[None, :])


@triton.jit(do_not_specialize=["LOG2D"])
def _dw_kernel(x_ptr, dout_ptr, codes_ptr, cb_ptr, scale_ptr, dcb_ptr, part_ptr,
               B, n_out, n_in, G, M, K, rpc, LOG2D, stride_xb, stride_db,
               BO: tl.constexpr, BI: tl.constexpr, BB: tl.constexpr, GROUP: tl.constexpr,
               NEED_DCB: tl.constexpr, NEED_DS: tl.constexpr, HAS_SCALE: tl.constexpr,
               ACC_DT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # program (o tile, i tile): dW tile (BO, BI) = sum over batch chunks of dout^T (BO, BB) @ x (BB, BI)
    n_it = tl.cdiv(n_in, BI)
    pid_o, pid_i = _grouped(tl.program_id(0), tl.cdiv(n_out, BO), n_it, GROUP)
    offs_o = pid_o * BO + tl.arange(0, BO)
    offs_i = pid_i * BI + tl.arange(0, BI)
    mask_o = offs_o < n_out
    mask_i = offs_i < n_in
    mask = mask_o[:, None] & mask_i[None, :]
    acc = tl.zeros((BO, BI), dtype=ACC_DT)
    for b0 in range(0, B, BB):
        offs_b = b0 + tl.arange(0, BB).to(tl.int64)
        mask_b = offs_b < B
        dt = tl.load(dout_ptr + offs_b[None, :] * stride_db + offs_o[:, None],
                     mask=mask_o[:, None] & mask_b[None, :], other=0.0)                      # (BO, BB)
        xt = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_i[None, :],
                     mask=mask_b[:, None] & mask_i[None, :], other=0.0)                      # (BB, BI)
        acc += _dot(dt, xt, DOT_PREC, UPCAST)
    if NEED_DS:
        u = _codeword_tile(codes_ptr, cb_ptr, offs_o[:, None], offs_i[None, :], mask,
                           G, M, K, rpc, LOG2D, ACC_DT)
        # a per-(o, input tile) partial: summed afterwards in a fixed order (deterministic)
        tl.store(part_ptr + offs_o.to(tl.int64) * n_it + pid_i, tl.sum(acc * u, axis=1), mask=mask_o)
    if NEED_DCB:
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + offs_o, mask=mask_o, other=0.0).to(ACC_DT)[:, None]
        g = (offs_i >> LOG2D).to(tl.int64)
        t = offs_i & ((1 << LOG2D) - 1)
        code_pos = offs_o.to(tl.int64)[:, None] * G * M + (g * M)[None, :]
        set_base = (offs_o // rpc).to(tl.int64) * M
        d = 1 << LOG2D
        for m in range(0, M):
            c = tl.load(codes_ptr + code_pos + m, mask=mask, other=0).to(tl.int32) & 0xFFFF
            dst = ((set_base[:, None] + m) * K + c) * d + t[None, :]
            tl.atomic_add(dcb_ptr + dst, acc, mask=mask, sem="relaxed")


@triton.jit(do_not_specialize=["LOG2D"])
def _dequant_kernel(codes_ptr, cb_ptr, scale_ptr, w_ptr, n_out, n_in, G, M, K, rpc, LOG2D,
                    BO: tl.constexpr, BI: tl.constexpr, HAS_SCALE: tl.constexpr, ACC_DT: tl.constexpr):
    pid = tl.program_id(0)
    n_it = tl.cdiv(n_in, BI)
    pid_o = pid // n_it
    pid_i = pid % n_it
    offs_o = pid_o * BO + tl.arange(0, BO)
    offs_i = pid_i * BI + tl.arange(0, BI)
    mask_o = offs_o < n_out
    mask = mask_o[:, None] & (offs_i < n_in)[None, :]
    u = _codeword_tile(codes_ptr, cb_ptr, offs_o[:, None], offs_i[None, :], mask, G, M, K, rpc, LOG2D, ACC_DT)
    if HAS_SCALE:
        u *= tl.load(scale_ptr + offs_o, mask=mask_o, other=0.0).to(ACC_DT)[:, None]
    tl.store(w_ptr + offs_o.to(tl.int64)[:, None] * n_in + offs_i[None, :], u.to(w_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _assign_kernel(v_ptr, c_ptr, idx_ptr, dist_ptr, n, K, d, topn,
                   BN: tl.constexpr, BK: tl.constexpr, ACC_DT: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid.to(tl.int64) * BN + tl.arange(0, BN)
    mask_n = offs_n < n
    # rank r - 1's (distance, index); before rank 0 everything is "after" it
    prev_d = tl.full((BN,), -_INF, dtype=ACC_DT)
    prev_i = tl.full((BN,), -1, dtype=tl.int32)
    for r in range(0, topn):
        best_d = tl.full((BN,), _INF, dtype=ACC_DT)
        best_i = tl.full((BN,), _BIG, dtype=tl.int32)
        for k0 in range(0, K, BK):
            offs_k = k0 + tl.arange(0, BK)
            mask_k = offs_k < K
            dist = tl.zeros((BN, BK), dtype=ACC_DT)
            for t in range(0, d):
                v = tl.load(v_ptr + offs_n * d + t, mask=mask_n, other=0.0).to(ACC_DT)
                c = tl.load(c_ptr + offs_k.to(tl.int64) * d + t, mask=mask_k, other=0.0).to(ACC_DT)
                diff = v[:, None] - c[None, :]
                dist += diff * diff
            # candidates: in range and strictly after the previous rank in (distance, index) order
            ok = mask_k[None, :] & ((dist > prev_d[:, None]) |
                                    ((dist == prev_d[:, None]) & (offs_k[None, :] > prev_i[:, None])))
            dm = tl.where(ok, dist, _INF)
            cd = tl.min(dm, axis=1)
            ci = tl.min(tl.where(ok & (dm == cd[:, None]), offs_k[None, :], _BIG), axis=1)
            take = (cd < best_d) | ((cd == best_d) & (ci < best_i))
            best_d = tl.where(take, cd, best_d)
            best_i = tl.where(take, ci, best_i)
        tl.store(idx_ptr + offs_n * topn + r, best_i, mask=mask_n)
        tl.store(dist_ptr + offs_n * topn + r, best_d.to(dist_ptr.dtype.element_ty), mask=mask_n)
        prev_d = best_d
        prev_i = best_i


# ----------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------
def _dot_cfg(dtype: torch.dtype):
    """(accumulator dtype, tl.dot input_precision, interpreter bf16 upcast flag)."""
    if dtype == torch.float64:
        return tl.float64, "ieee", False
    if dtype == torch.float32:
        return tl.float32, "ieee", False            # exact fp32 FMA, no tf32
    if dtype in (torch.float16, torch.bfloat16):
        # precision is ignored for 16-bit operands (tensor cores, fp32 accumulation)
        return tl.float32, "tf32", _UPCAST_BF16 and dtype == torch.bfloat16
    raise TypeError(f"vq triton kernels: unsupported dtype {dtype}")


def _np2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# Tiles.  GEMV by batch tile BB (1, 2, 4 rows): (BO, BI, num_warps), keeping the (BB, BO, BI) product
# at 4096 fp32.  The gathered tiles carry int64 addresses, so registers run high (~200-250 a thread at 4
# warps in tests/triton_aot.py); BB = 1's (32, 128) tile spilled 24-32 bytes on sm_80 at 4 warps and
# runs at 8.  Matmul tiles (BM, BN, BK, num_warps) by mode:
# 16-bit operands go to tensor cores; exact fp32 (fp64) lowers tl.dot to FMAs, which want small tiles.
# BK / BI are multiples of every d (16), so a chunk holds whole groups.
_GEMV_CFGS = {1: (32, 128, 8), 2: (32, 64, 4), 4: (16, 64, 4)}
_GEMM_CFGS = {"16": (64, 64, 32, 4), "fma": (32, 32, 32, 4)}
_DW_CFGS = {"16": (64, 64, 32, 8), "fma": (32, 32, 32, 4)}      # (BO, BI, BB, num_warps); 16-bit
# at 4 warps spilled 50-560 bytes with Triton 3.6 (255 registers a thread with 3.9)
_DEQUANT_CFG = (32, 64, 4)
_ASSIGN_CFG = (64, 32, 4)   # (64, 64) spilled 8 bytes on sm_80
_GROUP = 8


def _mode(dtype: torch.dtype) -> str:
    return "16" if dtype in (torch.float16, torch.bfloat16) else "fma"


def _gemv_bb(B: int) -> int:
    return min(_np2(B), 4)


def _device_ctx(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _unit_inner(t: torch.Tensor) -> torch.Tensor:
    assert t.dim() == 2
    if t.stride(1) != 1 and t.shape[1] > 1:
        t = t.contiguous()
    return t


def _format(codes: torch.Tensor, codebooks: torch.Tensor, scales, rows_per_codebook: int, dtype):
    """(n_out, G, M, K, d, log2 d), after the checks that would otherwise corrupt memory (the ops
    validate the arguments with messages; codes are range-checked there, before any kernel)."""
    assert codes.dim() == 3 and codes.dtype in (torch.uint8, torch.int16), "vq: codes must be uint8/int16 (n_out, G, M)"
    assert codebooks.dim() == 4 and codebooks.dtype == dtype, "vq: codebooks must be (S, M, K, d) in x's dtype"
    n_out, G, M = codes.shape
    S, Mc, K, d = codebooks.shape
    assert Mc == M and d in GROUP_SIZES and 1 <= K <= (1 << (8 * codes.element_size())), "vq: format mismatch"
    assert rows_per_codebook >= 1 and S == max(1, -(-n_out // rows_per_codebook)), "vq: wrong number of sets"
    if scales is not None:
        assert scales.shape == (n_out,) and scales.dtype == dtype, "vq: scales must be (n_out,) in x's dtype"
    return n_out, G, M, K, d, d.bit_length() - 1


def _grid1(*counts) -> tuple:
    n = 1
    for c in counts:
        n *= c
    assert n <= _PROGRAMS_MAX, "vq: too many programs for one launch"
    return (n,)


# ----------------------------------------------------------------------------------------------------
# Public launchers (plain tensors, no autograd; kernelkit.vq.ops validates the arguments and checks
# the codes against K)
# ----------------------------------------------------------------------------------------------------
def vq_linear_fwd(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales, bias,
                  rows_per_codebook: int, path: int) -> torch.Tensor:
    """out (B, n_out) = x W^T + bias, W from the codes (never materialized); path 0 auto (GEMV for
    B <= GEMV_MAX_BATCH, else GEMM), 1 GEMV, 2 GEMM.  Fresh, contiguous."""
    x = _unit_inner(x)
    codes, codebooks = codes.contiguous(), codebooks.contiguous()
    scales = None if scales is None else scales.contiguous()
    n_out, G, M, K, d, log2d = _format(codes, codebooks, scales, rows_per_codebook, x.dtype)
    B, n_in = x.shape
    assert n_in == G * d, "vq: x's width must be n_in = G * d"
    if bias is not None:
        bias = bias.contiguous()
        assert bias.shape == (n_out,) and bias.dtype == x.dtype, "vq: bias must be (n_out,) in x's dtype"
    assert path in (0, 1, 2), "vq: path must be 0 (auto), 1 (GEMV) or 2 (GEMM)"
    out = torch.empty((B, n_out), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    gemv = path == 1 or (path == 0 and B <= GEMV_MAX_BATCH)
    acc_dt, prec, up = _dot_cfg(x.dtype)
    # dummies for the pointers a configuration never reads (HAS_SCALE / HAS_BIAS off)
    s_arg = scales if scales is not None else codebooks
    b_arg = bias if bias is not None else codebooks
    common = (B, n_out, n_in, G, M, K, rows_per_codebook, log2d, x.stride(0), out.stride(0))
    with _device_ctx(x.device):
        if gemv:
            BB = _gemv_bb(B)
            BO, BI, nw = _GEMV_CFGS[BB]
            grid = _grid1(triton.cdiv(n_out, BO), triton.cdiv(B, BB))
            _gemv_kernel[grid](x, codes, codebooks, s_arg, b_arg, out, *common, BB=BB, BO=BO, BI=BI,
                               HAS_SCALE=scales is not None, HAS_BIAS=bias is not None, ACC_DT=acc_dt,
                               num_warps=nw, num_stages=2)
        else:
            BM, BN, BK, nw = _GEMM_CFGS[_mode(x.dtype)]
            grid = _grid1(triton.cdiv(B, BM), triton.cdiv(n_out, BN))
            _gemm_fwd_kernel[grid](x, codes, codebooks, s_arg, b_arg, out, *common, BM=BM, BN=BN, BK=BK,
                                   GROUP=_GROUP, HAS_SCALE=scales is not None, HAS_BIAS=bias is not None,
                                   ACC_DT=acc_dt, DOT_PREC=prec, UPCAST=up, num_warps=nw, num_stages=3)
    return out


def vq_linear_bwd(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales, dout: torch.Tensor,
                  rows_per_codebook: int, *, need_dx: bool = True, need_dcodebooks: bool = True,
                  need_dscales: bool = True):
    """(dx (B, n_in) | None, dcodebooks (S, M, K, d) | None, dscales (n_out,) | None), vq.h's math.
    dscales is None without scales.  Outputs are fresh; batch 0 gives zero dcodebooks / dscales."""
    x = _unit_inner(x)
    dout = _unit_inner(dout)
    codes, codebooks = codes.contiguous(), codebooks.contiguous()
    scales = None if scales is None else scales.contiguous()
    n_out, G, M, K, d, log2d = _format(codes, codebooks, scales, rows_per_codebook, x.dtype)
    B, n_in = x.shape
    assert n_in == G * d and dout.shape == (B, n_out) and dout.dtype == x.dtype, "vq: shape / dtype mismatch"
    need_dscales = need_dscales and scales is not None
    acc_dt, prec, up = _dot_cfg(x.dtype)
    pdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device
    s_arg = scales if scales is not None else codebooks
    dx = dcb = ds = None
    with _device_ctx(dev):
        if need_dx:
            dx = torch.empty((B, n_in), device=dev, dtype=x.dtype)
            if dx.numel():
                BM, BN, BK, nw = _GEMM_CFGS[_mode(x.dtype)]
                grid = _grid1(triton.cdiv(B, BM), triton.cdiv(n_in, BN))
                _gemm_dx_kernel[grid](dout, codes, codebooks, s_arg, dx, B, n_out, n_in, G, M, K,
                                      rows_per_codebook, log2d, dout.stride(0), dx.stride(0),
                                      BM=BM, BN=BN, BK=BK, GROUP=_GROUP, HAS_SCALE=scales is not None,
                                      ACC_DT=acc_dt, DOT_PREC=prec, UPCAST=up, num_warps=nw, num_stages=3)
        if need_dcodebooks or need_dscales:
            BO, BI, BB, nw = _DW_CFGS[_mode(x.dtype)]
            n_it = triton.cdiv(n_in, BI)
            # the codebook gradient accumulates in fp32 (fp64) and is cast once at the end
            dcb_acc = torch.zeros(codebooks.shape, device=dev, dtype=pdt) if need_dcodebooks else None
            part = torch.zeros((n_out, n_it), device=dev, dtype=pdt) if need_dscales else None
            if B > 0 and n_out > 0 and n_in > 0:   # else dW = 0: zero gradients
                grid = _grid1(triton.cdiv(n_out, BO), n_it)
                _dw_kernel[grid](x, dout, codes, codebooks, s_arg,
                                 dcb_acc if dcb_acc is not None else codebooks,
                                 part if part is not None else codebooks,
                                 B, n_out, n_in, G, M, K, rows_per_codebook, log2d, x.stride(0), dout.stride(0),
                                 BO=BO, BI=BI, BB=BB, GROUP=_GROUP, NEED_DCB=need_dcodebooks,
                                 NEED_DS=need_dscales, HAS_SCALE=scales is not None, ACC_DT=acc_dt,
                                 DOT_PREC=prec, UPCAST=up, num_warps=nw, num_stages=3)
            if need_dcodebooks:
                dcb = dcb_acc.to(x.dtype)
            if need_dscales:
                ds = part.sum(1).to(x.dtype)
    return dx, dcb, ds


def vq_dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales, rows_per_codebook: int) -> torch.Tensor:
    """W (n_out, n_in) in the codebooks' dtype, contiguous."""
    codes, codebooks = codes.contiguous(), codebooks.contiguous()
    scales = None if scales is None else scales.contiguous()
    n_out, G, M, K, d, log2d = _format(codes, codebooks, scales, rows_per_codebook, codebooks.dtype)
    n_in = G * d
    w = torch.empty((n_out, n_in), device=codes.device, dtype=codebooks.dtype)
    if w.numel() == 0:
        return w
    BO, BI, nw = _DEQUANT_CFG
    acc_dt = _dot_cfg(codebooks.dtype)[0]
    with _device_ctx(codes.device):
        _dequant_kernel[_grid1(triton.cdiv(n_out, BO), triton.cdiv(n_in, BI))](
            codes, codebooks, scales if scales is not None else codebooks, w, n_out, n_in, G, M, K,
            rows_per_codebook, log2d, BO=BO, BI=BI, HAS_SCALE=scales is not None, ACC_DT=acc_dt,
            num_warps=nw, num_stages=2)
    return w


def vq_assign(vectors: torch.Tensor, centroids: torch.Tensor, topn: int):
    """(idx int32 (n, topn), dist (n, topn) in the vectors' dtype): the topn nearest centroids, nearest
    first, ties to the smaller index, distances sum_t (v_t - c_t)^2 (fp32, fp64 for float64)."""
    vectors, centroids = vectors.contiguous(), centroids.contiguous()
    n, d = vectors.shape
    K = centroids.shape[0]
    assert centroids.shape == (K, d) and centroids.dtype == vectors.dtype, "vq: centroids must be (K, d), same dtype"
    assert d >= 1 and 1 <= topn <= K, "vq: need d >= 1 and 1 <= topn <= K"
    idx = torch.empty((n, topn), device=vectors.device, dtype=torch.int32)
    dist = torch.empty((n, topn), device=vectors.device, dtype=vectors.dtype)
    if n == 0:
        return idx, dist
    assert K < 2 ** 31 - 1, "vq: too many centroids"
    BN, BK, nw = _ASSIGN_CFG
    acc_dt = tl.float64 if vectors.dtype == torch.float64 else tl.float32
    with _device_ctx(vectors.device):
        _assign_kernel[_grid1(triton.cdiv(n, BN))](vectors, centroids, idx, dist, n, K, d, topn,
                                                    BN=BN, BK=BK, ACC_DT=acc_dt, num_warps=nw, num_stages=2)
    return idx, dist


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile coverage (tests/triton_aot.py)
# ----------------------------------------------------------------------------------------------------
# The dtypes kernelkit.vq.ops sends to these kernels on a GPU (float64 only runs here, under the
# interpreter), and those of the assignment step.  Keep them in step with ops._SUPPORTED /
# _ASSIGN_SUPPORTED["triton"].
AOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
AOT_ASSIGN_DTYPES = (torch.float32,)
# Sweep: a 1024 x 1024 layer (multiples of 16 like real shapes, so Triton specializes the arguments as
# it would for them) at every d, both code widths, M = 1 / 2 / 8, scales and bias on / off, 4 sets of
# codebooks, batch 1 / 2 / 16 (every GEMV batch tile) and 256 (GEMM) through path auto, and the other
# path forced at each batch size as well.
_AOT_N = 1024
_AOT_BATCHES = (1, 2, 16, 256)
_AOT_FORMATS = ((8, 256), (16, 65536))   # (code bits, K)


def aot_sweep() -> int:
    """Drive every launcher over every dtype and configuration on meta tensors (nothing is allocated or
    run).  tests/triton_aot.py intercepts the kernel launches this makes and compiles each distinct one
    for the GPU targets.  Returns the number of points driven."""
    if _INTERPRET:
        raise RuntimeError("aot_sweep: TRITON_INTERPRET=1 selects the interpreter, not the GPU's compiler")
    meta = dict(device="meta")
    n = 0
    rpc = 256   # 4 sets of codebooks (rows_per_codebook is a runtime argument)
    S = -(-_AOT_N // rpc)
    for dtype, d, (bits, K), M, with_scale, with_bias in itertools.product(
            AOT_DTYPES, GROUP_SIZES, _AOT_FORMATS, (1, 2, 8), (False, True), (False, True)):
        codes = torch.empty(_AOT_N, _AOT_N // d, M, dtype=torch.uint8 if bits == 8 else torch.int16, **meta)
        cb = torch.empty(S, M, K, d, dtype=dtype, **meta)
        scales = torch.empty(_AOT_N, dtype=dtype, **meta) if with_scale else None
        bias = torch.empty(_AOT_N, dtype=dtype, **meta) if with_bias else None
        for B in _AOT_BATCHES:
            x = torch.empty(B, _AOT_N, dtype=dtype, **meta)
            vq_linear_fwd(x, codes, cb, scales, bias, rpc, 0)
            # the other path forced: GEMM at a GEMV batch, GEMV at a GEMM batch
            vq_linear_fwd(x, codes, cb, scales, bias, rpc, 2 if B <= GEMV_MAX_BATCH else 1)
            if not with_bias:   # the backward has no bias argument
                dout = torch.empty(B, _AOT_N, dtype=dtype, **meta)
                vq_linear_bwd(x, codes, cb, scales, dout, rpc)
                vq_linear_bwd(x, codes, cb, scales, dout, rpc, need_dx=False, need_dscales=False)
                if with_scale:
                    vq_linear_bwd(x, codes, cb, scales, dout, rpc, need_dx=False, need_dcodebooks=False)
            n += 1
        if not with_bias:
            vq_dequantize(codes, cb, scales, rpc)
    for dtype in AOT_ASSIGN_DTYPES:
        for d, topn in ((4, 1), (8, 3)):
            vq_assign(torch.empty(4096, d, dtype=dtype, **meta), torch.empty(256, d, dtype=dtype, **meta), topn)
            n += 1
    return n


__all__ = ["vq_linear_fwd", "vq_linear_bwd", "vq_dequantize", "vq_assign", "aot_sweep"]
