"""Triton kernels for the unstructured-sparse linear layer (CSR weight), forward and backward.

Source: Sparse-IFT (Thangarasa et al., ICML 2024) trains layers whose weight W (n_out x n_in) is
unstructured-sparse (RigL / SET masks); these kernels skip the zeros.  Index layout and math: the C ABI
csrc/include/kernelkit/sparse.h (the same CSR / CSC-through-perm index is used here).  Float64
reference: python/kernelkit/sparse/reference.py.

Shapes (everything is read through strides, nothing is transposed in memory):
    x        (B, n_in)    unit inner stride, row stride stride_x >= n_in
    dout     (B, n_out)   unit inner stride, row stride >= n_out
    values   (nnz,)       same dtype as x
    row_ptr  int64 (n_out + 1), col_idx int32 (nnz)         CSR of W, columns increasing in a row
    col_ptr  int64 (n_in + 1),  row_idx int32 (nnz),        CSC of W as an index into values:
    perm     int64 (nnz)                                     the k-th entry in column order is values[perm[k]]
    bias     (n_out,) or None
    out (B, n_out), dx (B, n_in), dvalues (nnz,): freshly allocated, contiguous
Math:
    forward   out[b, r]  = bias[r] + sum_{k in row r} values[k] * x[b, col_idx[k]]            (SpMM)
    backward  dx[b, c]   = sum_{k in col c} values[perm[k]] * dout[b, row_idx[k]]           (SpMM on W^T)
              dvalues[k] = sum_b dout[b, r_k] * x[b, col_idx[k]]      r_k: the row of k   (SDDMM)

Kernels (grids):
    _spmm_rows_kernel  (row groups, batch tiles).  Computes o[b, i] = bias[i] + sum_{k in row i of an
        index (ptr, idx)} v(k) * src[b, idx[k]], v(k) = values[k] or values[perm[k]]: the forward on
        (row_ptr, col_idx) and dx on (col_ptr, row_idx, perm) (W^T by rows, so no atomics).  A program
        owns ROWS consecutive rows and BB batch rows, and walks the rows' nonzeros -- one contiguous
        range of the index -- in chunks of BK: it loads BK indices and values once and gathers the
        (BB x BK) tile src[b, idx[k]] from BB rows of src, so each index/value load is shared by BB batch
        rows.  ROWS = 1 (rows of >= 16 nonzeros on average): the products accumulate elementwise in a
        (BB x BK) tile, reduced over k once at the end.  ROWS = 4 or 8 (short rows, e.g. 99% sparsity):
        a chunk spans several rows; each product goes to its row through a one-hot (BK x ROWS) mask of
        the rows' [ptr[i], ptr[i+1]) ranges, i.e. a segmented sum over a (BB x BK x ROWS) tile, so short
        rows do not leave most of the BK lanes idle.  Batch tiles sit on grid axis 1 (at most 65535):
        a larger batch is launched in slices of 65535 * BB rows.
    _sddmm_kernel      (nonzero chunks, batch splits).  A program owns BK consecutive nonzeros (any mix
        of rows: uniform work however the row lengths vary), finds each one's row r_k by a binary
        search of row_ptr (ceil(log2 n_out) steps), and loops over its batch range in tiles of BB:
        acc (BB x BK) += dout[b, r_k] * x[b, col_idx[k]], reduced over the batch at the end.  When
        there are too few chunks to fill the GPU, the batch is split over grid axis 1 into fp32
        partials (split, nnz) that torch sums in a fixed order: deterministic, no float atomics.

Memory access: the gathered tiles read, per nonzero, BB rows of x (strided by stride_x); within a
chunk the columns are increasing, so the BK lanes of one batch row hit a few nearby cache lines and the
BB rows of the tile are reused by every row group of the same batch tile (adjacent programs, L2).  No
transposed copy of x is made.  (Unmeasured on a GPU here.)

Numerics: products and sums in fp32 for float16 / bfloat16 and float32 (plain fp32 FMA, no tensor
cores, so no tf32), in fp64 for float64 (which runs under the interpreter, for gradcheck); one rounding
to the output dtype at the store.  The sum order is fixed by the launch configuration (no atomics), so
results are bitwise reproducible run to run.  (Under the interpreter, Triton 3.9 truncates fp32->bf16
casts instead of rounding, so bf16 errors there are ~2x the GPU's.)

Only plain pointer arithmetic + masks are used (no block pointers / descriptors), so the same source
runs on Triton 3.6 .. 3.9 and under TRITON_INTERPRET=1.  Batch-row offsets and nonzero positions are
int64 (B * stride and nnz may exceed 2^31); row / column numbers fit int32 (col_idx / row_idx are int32).
The tile choices depend on shapes only, never on index contents, and the interpreter runs the GPU's.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_GRID_YZ_MAX = 65535   # CUDA's limit on grid axes 1 and 2 (tests lower it to exercise the slicing)


@triton.jit
def _spmm_rows_kernel(src_ptr, val_ptr, ptr_ptr, idx_ptr, perm_ptr, bias_ptr, out_ptr,
                      B, n_rows, stride_sb, stride_ob,
                      ROWS: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr,
                      HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DT: tl.constexpr):
    # grid = (cdiv(n_rows, ROWS), batch tiles).  Program (g, t) writes out[t*BB : t*BB+BB, g*ROWS :
    # g*ROWS+ROWS] completely (zeros + bias for empty rows / nnz = 0): the output needs no init.
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_b = pid_b.to(tl.int64) * BB + tl.arange(0, BB)
    mask_b = offs_b < B
    src_rows = src_ptr + offs_b[:, None] * stride_sb        # int64 row offsets
    r0 = pid_r * ROWS
    r_end = tl.minimum(r0 + ROWS, n_rows)
    # the group's nonzeros are the contiguous range [ptr[r0], ptr[r_end]) of the index
    k_lo = tl.load(ptr_ptr + r0)
    k_hi = tl.load(ptr_ptr + r_end)
    n_it = tl.cdiv(k_hi - k_lo, BK).to(tl.int32)
    k0 = k_lo
    if ROWS == 1:
        acc = tl.zeros((BB, BK), dtype=ACC_DT)
        for _ in range(0, n_it):
            kk = k0 + tl.arange(0, BK)
            mask_k = kk < k_hi
            cols = tl.load(idx_ptr + kk, mask=mask_k, other=0)
            if HAS_PERM:
                vpos = tl.load(perm_ptr + kk, mask=mask_k, other=0)
            else:
                vpos = kk
            v = tl.load(val_ptr + vpos, mask=mask_k, other=0.0).to(ACC_DT)
            xt = tl.load(src_rows + cols[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)
            # elementwise FMA into the (BB, BK) tile; the k reduction happens once, after the loop
            acc += xt.to(ACC_DT) * v[None, :]
            k0 += BK
        res = tl.sum(acc, axis=1)
        if HAS_BIAS:
            res += tl.load(bias_ptr + r0).to(ACC_DT)
        tl.store(out_ptr + offs_b * stride_ob + r0, res.to(out_ptr.dtype.element_ty), mask=mask_b)
    else:
        rows = r0 + tl.arange(0, ROWS)
        mask_r = rows < n_rows
        # row i of the group owns the nonzeros [starts[i], ends[i]); rows past n_rows own none
        starts = tl.load(ptr_ptr + rows, mask=mask_r, other=0)
        ends = tl.load(ptr_ptr + rows + 1, mask=mask_r, other=0)
        acc = tl.zeros((BB, ROWS), dtype=ACC_DT)
        for _ in range(0, n_it):
            kk = k0 + tl.arange(0, BK)
            mask_k = kk < k_hi
            cols = tl.load(idx_ptr + kk, mask=mask_k, other=0)
            if HAS_PERM:
                vpos = tl.load(perm_ptr + kk, mask=mask_k, other=0)
            else:
                vpos = kk
            v = tl.load(val_ptr + vpos, mask=mask_k, other=0.0).to(ACC_DT)
            xt = tl.load(src_rows + cols[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)
            prod = xt.to(ACC_DT) * v[None, :]                                        # (BB, BK)
            # segmented sum: nonzero kk belongs to the row whose [start, end) holds it (exactly one
            # of the group's rows for kk < k_hi, none for the masked tail)
            onehot = (kk[:, None] >= starts[None, :]) & (kk[:, None] < ends[None, :])  # (BK, ROWS)
            acc += tl.sum(prod[:, :, None] * onehot.to(ACC_DT)[None, :, :], axis=1)  # (BB, ROWS)
            k0 += BK
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=mask_r, other=0.0).to(ACC_DT)[None, :]
        o_ptrs = out_ptr + offs_b[:, None] * stride_ob + rows[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_r[None, :])


@triton.jit
def _sddmm_kernel(x_ptr, dout_ptr, row_ptr, col_ptr_idx, dv_ptr, B, nnz, n_rows, n_search,
                  rows_per_split, out_split_stride, stride_xb, stride_db,
                  BB: tl.constexpr, BK: tl.constexpr, ACC_DT: tl.constexpr):
    # grid = (cdiv(nnz, BK), batch splits).  Program (c, s) writes dv[s, c*BK : c*BK+BK] (zeros when its
    # batch range is empty, e.g. B = 0).
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    kk = pid.to(tl.int64) * BK + tl.arange(0, BK)
    mask_k = kk < nnz
    cols = tl.load(col_ptr_idx + kk, mask=mask_k, other=0)
    # r_k = the largest r < n_rows with row_ptr[r] <= k (empty rows repeat a row_ptr value; the last of
    # them is the row that holds k).  Invariant: row_ptr[lo] <= k, and hi == n_rows or row_ptr[hi] > k;
    # each step halves hi - lo, so n_search = ceil(log2 n_rows) steps leave hi == lo + 1.
    lo = tl.zeros((BK,), dtype=tl.int32)
    hi = tl.zeros((BK,), dtype=tl.int32) + n_rows
    for _ in range(0, n_search):
        mid = (lo + hi) // 2
        go = tl.load(row_ptr + mid, mask=mask_k, other=0) <= kk
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    b_start = sp.to(tl.int64) * rows_per_split
    b_end = tl.minimum(b_start + rows_per_split, B)
    # int32 trip count, int64 row offsets (avoid 64-bit loop induction variables)
    n_it = tl.cdiv((b_end - b_start).to(tl.int32), BB)
    acc = tl.zeros((BB, BK), dtype=ACC_DT)
    for it in range(0, n_it):
        offs_b = b_start + it * BB + tl.arange(0, BB)
        m = (offs_b < b_end)[:, None] & mask_k[None, :]
        xt = tl.load(x_ptr + offs_b[:, None] * stride_xb + cols[None, :], mask=m, other=0.0)
        # the BK lanes of a chunk mostly share one row r_k: these loads are mostly broadcasts
        dt = tl.load(dout_ptr + offs_b[:, None] * stride_db + lo[None, :], mask=m, other=0.0)
        acc += xt.to(ACC_DT) * dt.to(ACC_DT)
    res = tl.sum(acc, axis=0)
    tl.store(dv_ptr + sp.to(tl.int64) * out_split_stride + kk, res.to(dv_ptr.dtype.element_ty), mask=mask_k)


# ----------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------
def _acc_dt(dtype: torch.dtype):
    if dtype == torch.float64:
        return tl.float64
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return tl.float32
    raise TypeError(f"sparse triton kernels: unsupported dtype {dtype}")


# Row-kernel tiles (ROWS, BB, BK, num_warps) by the mean number of nonzeros per row of the index.
# Long rows: one row per program, BK = 64 lanes of nonzeros.  Rows of 16..48: BK = 32 wastes less of
# the last chunk.  Short rows (< 16, e.g. n_in = 768 at 99%): 4 or 8 rows share a chunk (segmented
# sum), BB = 16 keeps the (BB, BK, ROWS) product tile at <= 4096 fp32 (32 registers a thread).
_ROWS_CFGS = ((48, (1, 32, 64, 4)), (16, (1, 32, 32, 4)), (6, (4, 16, 32, 4)), (0, (8, 16, 32, 4)))
_SDDMM_CFG = (32, 64, 4)   # (BB, BK, num_warps): a (32, 64) fp32 accumulator, 16 registers a thread


def _rows_cfg(nnz: int, n_rows: int):
    avg = nnz / max(n_rows, 1)
    for lo, cfg in _ROWS_CFGS:
        if avg >= lo:
            return cfg
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=None)
def _sm_count_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count_cuda(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "meta":
        return _AOT_SM_COUNT   # aot_sweep: size the batch splits as for a real GPU
    return 2                   # interpreter: small, so that the tests' small shapes split too


def _device_ctx(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _unit_inner(t: torch.Tensor) -> torch.Tensor:
    assert t.dim() == 2
    if t.stride(1) != 1 and t.shape[1] > 1:
        t = t.contiguous()
    return t


def _launch_rows(src, values, ptr, idx, perm, bias, out, n_rows, nnz):
    """out[b, i] = bias[i] + sum_{k in row i of (ptr, idx)} v(k) src[b, idx[k]]; out is fully written."""
    B = src.shape[0]
    ROWS, BB, BK, nw = _rows_cfg(nnz, n_rows)
    acc_dt = _acc_dt(src.dtype)
    n_groups = triton.cdiv(n_rows, ROWS)
    # dummies for the pointers a configuration never reads (HAS_PERM / HAS_BIAS off)
    perm_arg = perm if perm is not None else ptr
    bias_arg = bias if bias is not None else values
    chunk = _GRID_YZ_MAX * BB   # batch rows per launch (grid axis 1 holds the batch tiles)
    for b0 in range(0, B, chunk):
        b1 = min(B, b0 + chunk)
        s, o = src[b0:b1], out[b0:b1]
        grid = (n_groups, triton.cdiv(b1 - b0, BB))
        _spmm_rows_kernel[grid](s, values, ptr, idx, perm_arg, bias_arg, o,
                                b1 - b0, n_rows, s.stride(0), o.stride(0),
                                ROWS=ROWS, BB=BB, BK=BK, HAS_PERM=perm is not None,
                                HAS_BIAS=bias is not None, ACC_DT=acc_dt, num_warps=nw, num_stages=3)


def _launch_sddmm(x, dout, row_ptr, col_idx, dvalues, n_out, nnz):
    """dvalues[k] = sum_b dout[b, r_k] x[b, col_idx[k]], via fp32 (fp64) partials when split."""
    B = x.shape[0]
    BB, BK, nw = _SDDMM_CFG
    acc_dt = _acc_dt(x.dtype)
    tiles = triton.cdiv(nnz, BK)
    assert tiles < 2 ** 31, "sparse: nnz too large for one launch"
    nbt = triton.cdiv(B, BB)
    target = 2 * _sm_count(x.device)
    # split the batch only as far as needed to fill the machine; each split keeps >= 1 batch tile
    split = max(1, min(nbt, triton.cdiv(target, tiles), _GRID_YZ_MAX))
    rows = max(1, triton.cdiv(nbt, split)) * BB
    split = max(1, triton.cdiv(B, rows))
    if split == 1:
        dst = dvalues
    else:
        pdt = torch.float64 if acc_dt == tl.float64 else torch.float32
        dst = torch.empty((split, nnz), device=x.device, dtype=pdt)
    n_search = (n_out - 1).bit_length()   # ceil(log2 n_out)
    _sddmm_kernel[(tiles, split)](x, dout, row_ptr, col_idx, dst, B, nnz, n_out, n_search,
                                  rows, nnz, x.stride(0), dout.stride(0),
                                  BB=BB, BK=BK, ACC_DT=acc_dt, num_warps=nw, num_stages=3)
    if split > 1:
        dvalues.copy_(dst.sum(0))   # fixed-order sum of the fp32 partials, then one cast


def _check_index(ptr, idx, n_rows, nnz, what):
    assert ptr.dtype == torch.int64 and ptr.shape == (n_rows + 1,), f"sparse: {what} ptr must be int64 ({n_rows + 1},)"
    assert idx.dtype == torch.int32 and idx.shape == (nnz,), f"sparse: {what} idx must be int32 ({nnz},)"


# ----------------------------------------------------------------------------------------------------
# Public launchers (plain tensors, no autograd; kernelkit.sparse.ops validates the arguments)
# ----------------------------------------------------------------------------------------------------
def sparse_linear_fwd(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                      bias: torch.Tensor | None, n_out: int) -> torch.Tensor:
    """out (B, n_out) = x (B, n_in) @ W^T + bias, W in CSR (row_ptr, col_idx, values); fresh, contiguous."""
    x = _unit_inner(x)
    values, row_ptr, col_idx = values.contiguous(), row_ptr.contiguous(), col_idx.contiguous()
    B = x.shape[0]
    nnz = values.numel()
    assert values.dtype == x.dtype, "sparse: values and x must have the same dtype"
    _check_index(row_ptr, col_idx, n_out, nnz, "row")
    if bias is not None:
        bias = bias.contiguous()
        assert bias.shape == (n_out,), "sparse: bias must be (n_out,)"
    out = torch.empty((B, n_out), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    with _device_ctx(x.device):
        _launch_rows(x, values, row_ptr, col_idx, None, bias, out, n_out, nnz)
    return out


def sparse_linear_bwd(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                      col_ptr: torch.Tensor, row_idx: torch.Tensor, perm: torch.Tensor, dout: torch.Tensor, *,
                      need_dx: bool = True, need_dvalues: bool = True):
    """(dx (B, n_in) | None, dvalues (nnz,) | None): gradients of sparse_linear_fwd (bias: dout.sum(0)).

    dx runs the row kernel on the CSC index (W^T by rows, values through perm); dvalues is the SDDMM.
    """
    x = _unit_inner(x)
    dout = _unit_inner(dout)
    values, row_ptr, col_idx = values.contiguous(), row_ptr.contiguous(), col_idx.contiguous()
    col_ptr, row_idx, perm = col_ptr.contiguous(), row_idx.contiguous(), perm.contiguous()
    B, n_in = x.shape
    n_out = dout.shape[1]
    nnz = values.numel()
    assert dout.shape[0] == B and values.dtype == x.dtype == dout.dtype, "sparse: shape / dtype mismatch"
    _check_index(row_ptr, col_idx, n_out, nnz, "row")
    _check_index(col_ptr, row_idx, n_in, nnz, "column")
    assert perm.dtype == torch.int64 and perm.shape == (nnz,), "sparse: perm must be int64 (nnz,)"
    dx = dvalues = None
    with _device_ctx(x.device):
        if need_dx:
            dx = torch.empty((B, n_in), device=x.device, dtype=x.dtype)
            if dx.numel():
                _launch_rows(dout, values, col_ptr, row_idx, perm, None, dx, n_in, nnz)
        if need_dvalues:
            dvalues = torch.empty((nnz,), device=x.device, dtype=values.dtype)
            if nnz:
                _launch_sddmm(x, dout, row_ptr, col_idx, dvalues, n_out, nnz)
    return dx, dvalues


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile coverage (tests/triton_aot.py)
# ----------------------------------------------------------------------------------------------------
# The dtypes kernelkit.sparse.ops sends to these kernels on a GPU (float64 only runs here, under the
# interpreter).  Keep the two in step.
AOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Sweep: a 1024 x 1024 weight at nonzeros per row 1 .. 512 (one point inside each _ROWS_CFGS bucket,
# for both the forward's rows and dx's columns), batch 16 (SDDMM not split for the larger nnz) and
# 4096 (split for the smaller): every (ROWS, BB, BK) and both SDDMM output kinds (direct / fp32
# partials), with and without bias.  Sizes are multiples of 16, like real layer shapes, so Triton
# specializes the arguments as it would for them.
_AOT_N = 1024
_AOT_NNZ_PER_ROW = (2, 8, 32, 512)
_AOT_BATCHES = (16, 4096)
_AOT_SM_COUNT = 132   # the meta tensors' stand-in GPU (H100 / H200) for the SDDMM's batch splits


def aot_sweep() -> int:
    """Drive the GPU launch paths over every dtype, bias / no bias and a shape sweep that reaches every
    tile choice, on meta tensors (nothing is allocated or run).  tests/triton_aot.py intercepts the
    kernel launches this makes and compiles each distinct one for the GPU targets.  Returns the number
    of (dtype, shape, bias) points driven."""
    if _INTERPRET:
        raise RuntimeError("aot_sweep: TRITON_INTERPRET=1 selects the interpreter, not the GPU's compiler")
    n = 0
    for dtype, per_row, B, with_bias in itertools.product(AOT_DTYPES, _AOT_NNZ_PER_ROW, _AOT_BATCHES,
                                                          (False, True)):
        nnz = _AOT_N * per_row
        meta = dict(device="meta")
        x = torch.empty(B, _AOT_N, dtype=dtype, **meta)
        values = torch.empty(nnz, dtype=dtype, **meta)
        ptr = torch.empty(_AOT_N + 1, dtype=torch.int64, **meta)
        idx = torch.empty(nnz, dtype=torch.int32, **meta)
        perm = torch.empty(nnz, dtype=torch.int64, **meta)
        bias = torch.empty(_AOT_N, dtype=dtype, **meta) if with_bias else None
        sparse_linear_fwd(x, values, ptr, idx, bias, _AOT_N)
        if not with_bias:
            sparse_linear_bwd(x, values, ptr, idx, ptr, idx, perm, torch.empty(B, _AOT_N, dtype=dtype, **meta))
        n += 1
    return n


__all__ = ["sparse_linear_fwd", "sparse_linear_bwd"]
