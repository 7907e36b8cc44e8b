"""Triton kernels for the generalized Monarch (block-diagonal) product, forward and backward.

Source: Dao et al., "Monarch: Expressive Structured Matrices for Efficient and Accurate Training",
ICML 2022; layout of HazyResearch/fly (`blockdiag_butterfly_multiply`).  Float64 reference:
python/kernelkit/monarch/reference.py.

Shapes (everything is read through strides, nothing is permuted in memory):
    x    (B, k*p)   unit inner stride, row stride stride_x >= k*p
    w1   (k, q, p)  contiguous; viewed as w1f (k*q, p), row J = a*q + i
    w2   (l, s, r)  contiguous, l*r == k*q
    out  (B, l*s)   freshly allocated, contiguous
Math:
    t[b, a*q + i]   = sum_j w1[a, i, j] x[b, a*p + j]
    h[b, c, m]      = t[b, m*l + c]             (h[b,c,m] = <x[b, a*p : a*p+p], w1f[J]>, J = m*l+c, a = J//q)
    out[b, n*l + c] = sum_m w2[c, n, m] h[b, c, m]
Backward (no saved intermediates; h is recomputed from x, w1):
    dO[b, c, n]  = dout[b, n*l + c]
    dw2[c, n, m] = sum_b dO[b, c, n] h[b, c, m]
    dh[b, c, m]  = sum_n dO[b, c, n] w2[c, n, m]        dt[b, m*l + c] = dh[b, c, m]
    dx[b, a*p+j] = sum_i dt[b, a*q + i] w1[a, i, j]
    dw1[a, i, j] = sum_b dt[b, a*q + i] x[b, a*p + j]

Kernels (grids):
    forward   _monarch_fwd_kernel  (batch tiles, l, n tiles): fused; per m-chunk, stage 1 builds the
              [BM, BR] h tile in registers, stage 2 contracts it with w2[c] into the [BM, BN] out tile,
              stored at columns n*l + c.  No intermediate touches memory.  Used while s fits one
              n tile (_FUSED_MAX_S); for wider s (e.g. 4096 -> 4096 nb4, s = 1024) the forward is
              _monarch_h_kernel (h once, stored in block layout) + _block_mm_kernel (out = h w2^T
              stored at n*l + c), instead of recomputing stage 1 per n tile.
    backward  _monarch_h_kernel    (batch tiles, l, r tiles): recompute h -> workspace (B, l*r)   [dw2]
              _batch_reduce_kernel (l*tiles, batch splits): dw2 = dO^T h                         [dw2]
              _block_mm_kernel     (batch tiles, l, r tiles): dt = dO w2, scattered to m*l + c   [dx|dw1]
              _block_mm_kernel     (batch tiles, k, p tiles): dx = dt w1                         [dx]
              _batch_reduce_kernel (k*tiles, batch splits): dw1 = dt^T x                         [dw1]
    Workspaces: h and dt, each B*k*q in the input dtype, only when needed; fp32 partials
    (splits, *w.shape) when the batch reduction is split.

Numerics: every tl.dot accumulates in fp32 (fp64 for float64 inputs).  fp16/bf16 operands go to the
tensor cores; fp32 uses input_precision="ieee" (exact fp32 FMA) unless allow_tf32.  The intermediate h
(and dt in backward) is rounded to the input dtype before it feeds the next matmul, like fly under
autocast.  Weight gradients are reduced over the batch in fp32 (per-split fp32 partials, summed by
torch deterministically — no atomics) and cast to the weight dtype at the end.  (Under the
interpreter, Triton 3.9 truncates fp32->bf16 casts instead of rounding, so bf16 errors there are ~2x
the GPU's.)

Only plain pointer arithmetic + masks are used (no block pointers / descriptors) so the same source
runs on Triton 3.6 .. 3.9 and under TRITON_INTERPRET=1.  Row offsets are int64 (B * width may exceed
2^31); in-row offsets (< k*p, l*s, k*q*p) stay int32.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # small tiles (tests may flip this)
_UPCAST_BF16 = _INTERPRET                                  # interpreter bf16 tl.dot workaround


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST is only set under TRITON_INTERPRET for bf16: the interpreter's tl.dot multiplies the raw
    # uint16 storage of bf16 (Triton 3.9), so there the operands go through fp32 (exact products).
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


# ----------------------------------------------------------------------------------------------------
# Stage 1 (shared by the forward and the backward h-recompute): one [BM, BR] tile of h for output
# block c and rows m0 .. m0+BR of h_c.
#
# Row m of h_c reads input block a(m) = (m*l + c) // q, so the rows of a chunk are a few contiguous
# segments (length ~ q/l) that each use a different input block.  Rather than a masked GEMM per block,
# the chunk is one GEMM over the contiguous x columns [a_lo*p, (a_hi+1)*p) that the chunk touches,
# against a virtual (K, BR) matrix W'[a*p + j, m] = w1f[m*l + c, j] if a == a(m) else 0 built by the
# masked load.  This packs small blocks (p < BK) densely into K tiles.  Cost: the K span covers
# (#blocks touched) * p, i.e. about (BR*l/q + 1) times the useful work when segments are short.  For
# the paper's square Monarch (q == l, segments of length 1) this is up to 16x tensor-core waste in
# stage 1 (BR = 16); the launcher picks BR dividing q/l when it can so that chunks never straddle.
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _stage1_tile(x_ptr, w1_ptr, offs_b, mask_b, stride_xb, c, m0, q, p, l, r,
                 BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                 ACC_DT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    offs_m = m0 + tl.arange(0, BR)
    mask_m = offs_m < r
    J = offs_m.to(tl.int64) * l + c                 # w1f row used by h row m
    a_m = J // q                                      # its input block
    m_last = tl.minimum(m0 + BR, r) - 1
    a_lo = (m0 * l + c) // q
    a_hi = (m_last * l + c) // q
    k_lo = a_lo * p
    k_hi = (a_hi + 1) * p
    acc = tl.zeros((BM, BR), dtype=ACC_DT)
    x_rows = x_ptr + offs_b[:, None] * stride_xb
    n_k = tl.cdiv(k_hi - k_lo, BK)
    for it in range(0, n_k):
        kk = k_lo + it * BK + tl.arange(0, BK)
        mask_k = kk < k_hi
        a_k = kk // p
        j = kk - a_k * p
        xt = tl.load(x_rows + kk[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        # zero every (column, row) pair whose input block is not the row's block: the masked
        # "block-diagonal" W' above; masked lanes may point anywhere, they are never dereferenced
        wmask = mask_k[:, None] & mask_m[None, :] & (a_k[:, None] == a_m[None, :])
        wt = tl.load(w1_ptr + J[None, :] * p + j[:, None], mask=wmask, other=0.0)
        acc += _dot(xt, wt, DOT_PREC, UPCAST)
    return acc


@triton.jit
def _monarch_fwd_kernel(x_ptr, w1_ptr, w2_ptr, out_ptr, B, stride_xb, stride_ob,
                        q, p, l, s, r,
                        BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                        ACC_DT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # grid = (batch tiles, output block c, n tiles).  h never leaves registers: each m-chunk of h is
    # computed (stage 1) and immediately contracted with w2[c] (stage 2).  With several n tiles the
    # stage-1 work is recomputed per n tile; the launcher makes BN cover s when s <= 256.
    tl.static_assert(BM >= 16)  # tl.dot needs every tile dim >= 16
    tl.static_assert(BN >= 16)
    tl.static_assert(BR >= 16)
    tl.static_assert(BK >= 16)
    pid_b = tl.program_id(0)
    c = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs_b = pid_b.to(tl.int64) * BM + tl.arange(0, BM)
    mask_b = offs_b < B
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < s
    w2_blk = w2_ptr + c.to(tl.int64) * s * r
    acc = tl.zeros((BM, BN), dtype=ACC_DT)
    n_m = tl.cdiv(r, BR)
    for im in range(0, n_m):
        m0 = im * BR
        h = _stage1_tile(x_ptr, w1_ptr, offs_b, mask_b, stride_xb, c, m0, q, p, l, r,
                         BM, BR, BK, ACC_DT, DOT_PREC, UPCAST)
        offs_m = m0 + tl.arange(0, BR)
        # w2[c, n, m] read as a [BR, BN] tile (m rows, n columns) so that out += h @ w2[c]^T
        w2t = tl.load(w2_blk + offs_n[None, :] * r + offs_m[:, None],
                      mask=(offs_m < r)[:, None] & mask_n[None, :], other=0.0)
        acc += _dot(h.to(w2t.dtype), w2t, DOT_PREC, UPCAST)
    # output column of (c, n) is n*l + c: the P2 permutation is just this strided store
    o_ptrs = out_ptr + offs_b[:, None] * stride_ob + (offs_n * l + c)[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_n[None, :])


@triton.jit
def _monarch_h_kernel(x_ptr, w1_ptr, h_ptr, B, stride_xb, stride_hb, q, p, l, r,
                      BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                      ACC_DT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # Stage 1 alone: h into a (B, l, r) workspace (input dtype), for the two-pass forward (wide s)
    # and for the backward's recompute before the dw2 reduction.
    tl.static_assert(BM >= 16)
    tl.static_assert(BR >= 16)
    tl.static_assert(BK >= 16)
    pid_b = tl.program_id(0)
    c = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_b = pid_b.to(tl.int64) * BM + tl.arange(0, BM)
    mask_b = offs_b < B
    m0 = pid_m * BR
    h = _stage1_tile(x_ptr, w1_ptr, offs_b, mask_b, stride_xb, c, m0, q, p, l, r,
                     BM, BR, BK, ACC_DT, DOT_PREC, UPCAST)
    offs_m = m0 + tl.arange(0, BR)
    h_ptrs = h_ptr + offs_b[:, None] * stride_hb + c * r + offs_m[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask_b[:, None] & (offs_m < r)[None, :])


@triton.jit
def _block_mm_kernel(a_ptr, w_ptr, o_ptr, B, U, V,
                     stride_ab, sga, sua, wg, wu, wv, stride_ob, sgo, svo,
                     BM: tl.constexpr, BU: tl.constexpr, BV: tl.constexpr,
                     ACC_DT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # Generic per-block matmul with strided column maps, used for dh (-> dt) and dx:
    #   o[b, g*sgo + v*svo] = sum_u a[b, g*sga + u*sua] * w[g*wg + u*wu + v*wv]
    # grid = (batch tiles, block g, v tiles).  Strided column maps implement the permutations.
    tl.static_assert(BM >= 16)
    tl.static_assert(BU >= 16)
    tl.static_assert(BV >= 16)
    pid_b = tl.program_id(0)
    g = tl.program_id(1)
    pid_v = tl.program_id(2)
    offs_b = pid_b.to(tl.int64) * BM + tl.arange(0, BM)
    mask_b = offs_b < B
    offs_v = pid_v * BV + tl.arange(0, BV)
    mask_v = offs_v < V
    a_rows = a_ptr + offs_b[:, None] * stride_ab + g * sga
    w_blk = w_ptr + g.to(tl.int64) * wg
    acc = tl.zeros((BM, BV), dtype=ACC_DT)
    n_u = tl.cdiv(U, BU)
    for iu in range(0, n_u):
        offs_u = iu * BU + tl.arange(0, BU)
        mask_u = offs_u < U
        at = tl.load(a_rows + (offs_u * sua)[None, :], mask=mask_b[:, None] & mask_u[None, :], other=0.0)
        wt = tl.load(w_blk + offs_u[:, None] * wu + offs_v[None, :] * wv,
                     mask=mask_u[:, None] & mask_v[None, :], other=0.0)
        acc += _dot(at, wt, DOT_PREC, UPCAST)
    o_ptrs = o_ptr + offs_b[:, None] * stride_ob + (g * sgo + offs_v * svo)[None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_v[None, :])


@triton.jit
def _batch_reduce_kernel(a_ptr, b_ptr, o_ptr, B, rows_per_split, U, V, n_ut, n_vt, out_split_stride,
                         stride_ab, sga, sua, stride_bb, sgb, svb,
                         BB: tl.constexpr, BU: tl.constexpr, BV: tl.constexpr,
                         ACC_DT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # Weight gradients, reduced over the batch:
    #   o[split, g, u, v] = sum_{b in split} a[b, g*sga + u*sua] * b[b, g*sgb + v*svb]
    # grid = (G * u tiles * v tiles, batch splits).  Each program owns one output tile and loops over
    # its batch range, so the fp32 accumulator stays in registers; splits (for parallelism when
    # G*tiles is small) write separate fp32 partials that the launcher sums.
    tl.static_assert(BB >= 16)
    tl.static_assert(BU >= 16)
    tl.static_assert(BV >= 16)
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    g = pid // (n_ut * n_vt)
    rem = pid - g * (n_ut * n_vt)
    pid_u = rem // n_vt
    pid_v = rem - pid_u * n_vt
    offs_u = pid_u * BU + tl.arange(0, BU)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mask_u = offs_u < U
    mask_v = offs_v < V
    b_start = sp.to(tl.int64) * rows_per_split
    b_end = tl.minimum(b_start + rows_per_split, B)
    acc = tl.zeros((BU, BV), dtype=ACC_DT)
    a_cols = a_ptr + g * sga + offs_u * sua
    b_cols = b_ptr + g * sgb + offs_v * svb
    # int32 trip count, int64 row offsets (avoid 64-bit loop induction variables)
    n_it = tl.cdiv(tl.minimum(rows_per_split, B - b_start).to(tl.int32), BB)
    for it in range(0, n_it):
        offs_b = b_start + it * BB + tl.arange(0, BB)
        mask_b = offs_b < b_end
        # a is loaded already transposed ([BU, BB]) so the batch is the contraction dim
        at = tl.load(a_cols[:, None] + offs_b[None, :] * stride_ab,
                     mask=mask_u[:, None] & mask_b[None, :], other=0.0)
        bt = tl.load(b_cols[None, :] + offs_b[:, None] * stride_bb,
                     mask=mask_b[:, None] & mask_v[None, :], other=0.0)
        acc += _dot(at, bt, DOT_PREC, UPCAST)
    o_ptrs = (o_ptr + sp.to(tl.int64) * out_split_stride + g.to(tl.int64) * U * V
              + offs_u[:, None] * V + offs_v[None, :])
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=mask_u[:, None] & mask_v[None, :])


# ----------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------
def _np2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _dot_cfg(dtype: torch.dtype, allow_tf32: bool):
    """(accumulator dtype, tl.dot input_precision, interpreter bf16 upcast flag)."""
    up = _UPCAST_BF16 and dtype == torch.bfloat16
    if dtype == torch.float64:
        return tl.float64, "ieee", up
    if dtype == torch.float32:
        return tl.float32, ("tf32" if allow_tf32 else "ieee"), up
    if dtype in (torch.float16, torch.bfloat16):
        return tl.float32, "tf32", up  # precision is ignored for 16-bit operands (default value)
    raise TypeError(f"monarch triton kernels: unsupported dtype {dtype}")


def _mode(dtype: torch.dtype, allow_tf32: bool) -> str:
    """Tile-size family: "16" (fp16/bf16 tensor cores), "tf32", "fma" (exact fp32 / fp64)."""
    if dtype in (torch.float16, torch.bfloat16):
        return "16"
    if dtype == torch.float32 and allow_tf32:
        return "tf32"
    return "fma"


def _tile(n: int, cap: int) -> int:
    """Power-of-two tile >= 16 (tl.dot minimum) covering n, capped."""
    return max(16, min(cap, _np2(n)))


def _pick_br(q: int, l: int, r: int, cap: int) -> int:
    # Prefer the largest chunk that divides the segment length q/l so that a chunk of h rows never
    # straddles two input blocks (stage-1 K span == p exactly).  Short or irregular segments: 16,
    # the smallest legal tile, minimises the masked waste (see _stage1_tile).
    hi = _tile(r, cap)
    if q % l == 0:
        g = q // l
        br = hi
        while br >= 16:
            if g % br == 0:
                return br
            br //= 2
    return 16


@functools.lru_cache(maxsize=None)
def _sm_count_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count_cuda(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "meta":
        return _AOT_SM_COUNT   # aot_sweep: size the batch splits as for a real GPU
    return 2


def _device_ctx(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _unit_inner(t: torch.Tensor) -> torch.Tensor:
    assert t.dim() == 2
    if t.stride(1) != 1 and t.shape[1] > 1:
        t = t.contiguous()
    return t


# Widest s (rows per w2 block) the fused forward covers with one n tile, per mode.  Past it the fused
# kernel would recompute stage 1 once per n tile (4x for 4096 -> 4096 nb4, more than the FLOPs a
# dense layer needs), so the forward runs in two passes instead: h written once, directly in block
# layout (B, l, r) -- no permuted copy, the permutation is in the store -- then a per-block matmul
# whose output stride l is the second permutation.  Tests lower these to exercise both paths.
_FUSED_MAX_S = {"interpret": 32, "fma": 64, "tc": 256}


def _fwd_two_pass(s: int, mode: str) -> bool:
    key = "interpret" if _INTERPRET else ("fma" if mode == "fma" else "tc")
    return s > _FUSED_MAX_S[key]


def _launch_fwd(x, w1, w2, out, allow_tf32):
    B = x.shape[0]
    k, q, p = w1.shape
    l, s, r = w2.shape
    acc_dt, prec, up = _dot_cfg(x.dtype, allow_tf32)
    mode = _mode(x.dtype, allow_tf32)
    if _fwd_two_pass(s, mode):
        h = torch.empty((B, k * q), device=x.device, dtype=x.dtype)
        _launch_h(x, w1, h, l, r, (acc_dt, prec, up), mode)
        # out[b, n*l + c] = sum_m h[b, c*r + m] * w2[c, n, m]
        _launch_block_mm(h, h.stride(0), r, 1, w2, s * r, 1, r, out, out.stride(0), 1, l,
                         B, l, r, s, (acc_dt, prec, up), mode)
        return
    if _INTERPRET:
        BM, BN, BR, BK, nw = 64, 16, 16, 16, 4
    elif mode == "fma":
        # exact fp32 / fp64: tl.dot lowers to FMAs, whose operand layouts need small tiles
        BM, BN, BR, BK, nw = 64, _tile(s, 64), 16, 16, 4
    else:
        # tensor cores.  BN covers s up to 256 so stage 1 runs once per (batch tile, c); beyond
        # that stage 1 is recomputed cdiv(s, 256) times.  BR/BK = 32: BR = 64 spills on sm_90.
        BN = _tile(s, 256)
        BM = 64 if BN >= 256 else 128
        BR = _pick_br(q, l, r, 32)
        BK = _tile(p, 32)
        nw = 8 if BN >= 64 else 4
    grid = (triton.cdiv(B, BM), l, triton.cdiv(s, BN))
    _monarch_fwd_kernel[grid](x, w1, w2, out, B, x.stride(0), out.stride(0), q, p, l, s, r,
                              BM=BM, BN=BN, BR=BR, BK=BK, ACC_DT=acc_dt, DOT_PREC=prec, UPCAST=up,
                              num_warps=nw, num_stages=3)


def _launch_h(x, w1, h, l, r, cfg, mode):
    """h[b, c*r + m] = t[b, m*l + c]: stage 1 of the forward, stored in block layout."""
    acc_dt, prec, up = cfg
    B = x.shape[0]
    k, q, p = w1.shape
    if _INTERPRET:
        BM, BR, BK, nw = 64, 16, 16, 4
    elif mode == "fma":
        BM, BR, BK, nw = 64, _pick_br(q, l, r, 32), 32, 4
    else:
        BM, BR, BK = 128, _pick_br(q, l, r, 32), _tile(p, 32)
        nw = 8 if mode == "tf32" else 4
    grid = (triton.cdiv(B, BM), l, triton.cdiv(r, BR))
    _monarch_h_kernel[grid](x, w1, h, B, x.stride(0), h.stride(0), q, p, l, r,
                            BM=BM, BR=BR, BK=BK, ACC_DT=acc_dt, DOT_PREC=prec, UPCAST=up,
                            num_warps=nw, num_stages=3)


def _launch_block_mm(a, stride_ab, sga, sua, w, wg, wu, wv, o, stride_ob, sgo, svo, B, G, U, V,
                     cfg, mode):
    acc_dt, prec, up = cfg
    if _INTERPRET:
        BM, BU, BV, nw = 64, 16, 16, 4
    elif mode == "fma":
        BM, BU, BV, nw = 64, _tile(U, 32), _tile(V, 64), 4
    elif mode == "tf32":
        BM, BU, BV, nw = 128, _tile(U, 32), _tile(V, 64), 8
    else:
        BM, BU, BV = 128, _tile(U, 64), _tile(V, 128)
        nw = 8 if BV >= 64 else 4
    grid = (triton.cdiv(B, BM), G, triton.cdiv(V, BV))
    _block_mm_kernel[grid](a, w, o, B, U, V, stride_ab, sga, sua, wg, wu, wv, stride_ob, sgo, svo,
                           BM=BM, BU=BU, BV=BV, ACC_DT=acc_dt, DOT_PREC=prec, UPCAST=up,
                           num_warps=nw, num_stages=3)


def _launch_reduce(a, stride_ab, sga, sua, bmat, stride_bb, sgb, svb, out, B, G, U, V,
                   cfg, mode):
    """out (G, U, V) in its own dtype <- batch reduction, via fp32 partials when split."""
    acc_dt, prec, up = cfg
    if _INTERPRET:
        BB, BU, BV, nw, target = 16, 16, 16, 4, 4
    else:
        if mode == "fma":
            BB, BU, BV, nw = 32, _tile(U, 64), _tile(V, 64), 4
        else:
            BB = 64 if mode == "16" else 32
            BU, BV = _tile(U, 128), _tile(V, 128)
            nw = 8 if BU * BV >= 64 * 128 else 4
        target = 2 * _sm_count(a.device)
    n_ut, n_vt = triton.cdiv(U, BU), triton.cdiv(V, BV)
    tiles = G * n_ut * n_vt
    nb = triton.cdiv(B, BB)
    # split the batch only as far as needed to fill the machine; each split keeps >= 1 batch tile
    split = max(1, min(nb, triton.cdiv(target, tiles), 65535))
    rows = triton.cdiv(nb, split) * BB
    split = triton.cdiv(B, rows)
    if split == 1:
        dst = out
    else:
        pdt = torch.float64 if acc_dt == tl.float64 else torch.float32
        dst = torch.empty((split, G, U, V), device=out.device, dtype=pdt)
    _batch_reduce_kernel[(tiles, split)](a, bmat, dst, B, rows, U, V, n_ut, n_vt, G * U * V,
                                         stride_ab, sga, sua, stride_bb, sgb, svb,
                                         BB=BB, BU=BU, BV=BV, ACC_DT=acc_dt, DOT_PREC=prec, UPCAST=up,
                                         num_warps=nw, num_stages=3)
    if split > 1:
        out.copy_(dst.sum(0))   # fp32 sum of partials, then one cast to the weight dtype


# ----------------------------------------------------------------------------------------------------
# Public launchers (plain tensors, no autograd)
# ----------------------------------------------------------------------------------------------------
def monarch_fwd(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, *, allow_tf32: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """out (B, l*s) = Monarch(x (B, k*p), w1 (k, q, p), w2 (l, s, r)).

    `out` (internal/testing): a preallocated contiguous (B, l*s) buffer to write into.
    """
    x = _unit_inner(x)
    w1 = w1.contiguous()
    w2 = w2.contiguous()
    B = x.shape[0]
    k, q, p = w1.shape
    l, s, r = w2.shape
    assert x.shape[1] == k * p and l * r == k * q, "monarch: shape mismatch"
    if out is None:
        out = torch.empty((B, l * s), device=x.device, dtype=x.dtype)
    if B == 0:
        return out
    with _device_ctx(x.device):
        _launch_fwd(x, w1, w2, out, allow_tf32)
    return out


def monarch_bwd(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, dout: torch.Tensor, *,
                need_dx: bool = True, need_dw1: bool = True, need_dw2: bool = True,
                allow_tf32: bool = False, dx: torch.Tensor | None = None,
                dw1: torch.Tensor | None = None, dw2: torch.Tensor | None = None):
    """Gradients (dx, dw1, dw2) of monarch_fwd; entries not requested are None.

    Kernels: [h workspace, if dw2]  [dt workspace via dh = dO @ w2, if dx or dw1]
             [dx = dt @ w1]  [dw1 = dt^T x]  [dw2 = dO^T h]   (workspaces are B*k*q, input dtype)
    `dx`, `dw1`, `dw2` (internal/testing): preallocated output buffers.
    """
    x = _unit_inner(x)
    dout = _unit_inner(dout)
    w1 = w1.contiguous()
    w2 = w2.contiguous()
    B = x.shape[0]
    k, q, p = w1.shape
    l, s, r = w2.shape
    assert x.shape[1] == k * p and l * r == k * q and tuple(dout.shape) == (B, l * s)
    dev = x.device
    if need_dx and dx is None:
        dx = torch.empty((B, k * p), device=dev, dtype=x.dtype)
    if need_dw1 and dw1 is None:
        dw1 = torch.empty((k, q, p), device=dev, dtype=w1.dtype)
    if need_dw2 and dw2 is None:
        dw2 = torch.empty((l, s, r), device=dev, dtype=w2.dtype)
    dx = dx if need_dx else None
    dw1 = dw1 if need_dw1 else None
    dw2 = dw2 if need_dw2 else None
    if B == 0:
        for g in (dw1, dw2):
            if g is not None:
                g.zero_()
        return dx, dw1, dw2

    cfg = _dot_cfg(x.dtype, allow_tf32)
    acc_dt, prec, up = cfg
    mode = _mode(x.dtype, allow_tf32)
    kq = k * q
    with _device_ctx(dev):
        if need_dw2:
            # recompute h once (stage 1 of the forward) into a (B, l, r) workspace
            h = torch.empty((B, kq), device=dev, dtype=x.dtype)
            _launch_h(x, w1, h, l, r, cfg, mode)
            # dw2[c, n, m] = sum_b dout[b, n*l + c] * h[b, c*r + m]
            _launch_reduce(dout, dout.stride(0), 1, l, h, h.stride(0), r, 1, dw2, B, l, s, r,
                           cfg, mode)
            del h
        if need_dx or need_dw1:
            # dt[b, m*l + c] = sum_n dout[b, n*l + c] * w2[c, n, m]   (un-permute folded into the store)
            dt = torch.empty((B, kq), device=dev, dtype=x.dtype)
            _launch_block_mm(dout, dout.stride(0), 1, l, w2, s * r, r, 1, dt, dt.stride(0), 1, l,
                             B, l, s, r, cfg, mode)
            if need_dx:
                # dx[b, a*p + j] = sum_i dt[b, a*q + i] * w1[a, i, j]
                _launch_block_mm(dt, dt.stride(0), q, 1, w1, q * p, p, 1, dx, dx.stride(0), p, 1,
                                 B, k, q, p, cfg, mode)
            if need_dw1:
                # dw1[a, i, j] = sum_b dt[b, a*q + i] * x[b, a*p + j]
                _launch_reduce(dt, dt.stride(0), q, 1, x, x.stride(0), p, 1, dw1, B, k, q, p,
                               cfg, mode)
    return dx, dw1, dw2


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile coverage (tests/triton_aot.py)
# ----------------------------------------------------------------------------------------------------
# The dtypes kernelkit.monarch.ops sends to these kernels on a GPU (_SUPPORTED["triton"]; float64 only
# runs here under the interpreter).  Keep the two in step.
AOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Sweep sizes: powers of two from the tl.dot minimum (16) to one past the largest tile cap and fused-
# forward limit (256), so every size-dependent choice above (_tile, _pick_br, _fwd_two_pass, the
# per-mode caps and num_warps) takes each of its values for some shape.  Extend it when a cap grows.
# Multiples of 16 keep every size-derived kernel argument 16-divisible and != 1, i.e. specialized by
# Triton as for real layer shapes; the only arguments equal to 1 are the launchers' literal unit
# strides, which are constexpr 1 in every real launch too.
_AOT_SIZES = (16, 32, 64, 128, 256, 512)
_AOT_BATCHES = (16, 4096)   # one batch tile (never split) / many (split weight-gradient reductions)
_AOT_SM_COUNT = 132         # the meta tensors' stand-in GPU (H100 / H200) for _launch_reduce's splits


def aot_sweep() -> int:
    """Drive the GPU launch paths over every dtype, allow_tf32 and a shape sweep that reaches every
    tile choice, on meta tensors (nothing is allocated or run).  tests/triton_aot.py intercepts the
    kernel launches this makes and compiles each distinct one for the GPU targets, so the checked
    configurations are the launchers' own choices and cannot drift from them.  Returns the number of
    (shape, dtype, flag) points driven."""
    if _INTERPRET:
        raise RuntimeError("aot_sweep: TRITON_INTERPRET=1 selects the interpreter's tiles, not the GPU's")
    n = 0
    sizes = _AOT_SIZES
    for dtype, allow_tf32, k, q, p, l, s, B in itertools.product(
            AOT_DTYPES, (False, True), (1, 4), sizes, sizes, (2, 4), sizes, _AOT_BATCHES):
        r, rem = divmod(k * q, l)
        if rem or r % 16:     # l*r == k*q, and r a multiple of 16 like the other sizes
            continue
        meta = dict(device="meta", dtype=dtype)
        x = torch.empty(B, k * p, **meta)
        w1 = torch.empty(k, q, p, **meta)
        w2 = torch.empty(l, s, r, **meta)
        monarch_fwd(x, w1, w2, allow_tf32=allow_tf32)
        monarch_bwd(x, w1, w2, torch.empty(B, l * s, **meta), allow_tf32=allow_tf32)
        n += 1
    return n


__all__ = ["monarch_fwd", "monarch_bwd"]
