"""kernelkit.jax.sparse: sparse_linear as an XLA FFI custom call on kk_sparse_linear_{fwd,bwd}_cpu,
against the torch op (backend="cpu", the sparse kernels forced with min_sparsity=0) and the float64
reference, under jax.jit and jax.vmap, with custom_vjp gradients against torch autograd."""
import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
pytest.importorskip("kernelkit.jax")  # skips when kernelkit was built without its JAX module
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

from helpers import assert_close  # noqa: E402
from kernelkit.jax.sparse import SparseLayout, sparse_linear  # noqa: E402
from kernelkit.sparse import SparseLayout as TorchLayout  # noqa: E402
from kernelkit.sparse import sparse_linear as torch_sparse_linear  # noqa: E402
from kernelkit.sparse import sparse_linear_reference  # noqa: E402

N_OUT, N_IN = 13, 19  # odd sizes; one layout shape for the whole file (JAX compiles per shape)
TORCH = {np.float32: torch.float32, np.float64: torch.float64}


def _mask(seed=0, density=0.3):
    m = np.random.default_rng(seed).random((N_OUT, N_IN)) < density
    m[3] = False  # an empty row
    m[:, 5] = False  # an empty column
    return m


MASK = _mask()
NNZ = int(MASK.sum())


def _data(dtype, lead=(2, 3), seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, N_IN)).astype(dtype)
    v = rng.standard_normal(NNZ).astype(dtype)
    b = rng.standard_normal(N_OUT).astype(dtype)
    return x, v, b


def _t(a):
    return torch.from_numpy(np.array(a))


def _torch_fwd_bwd(x, v, b, g):
    """(out, dx, dvalues, dbias) of the torch op on the cpu backend (sparse kernels forced)."""
    tl = TorchLayout.from_mask(torch.from_numpy(MASK))
    xt, vt, bt = (_t(a).requires_grad_() for a in (x, v, b))
    out = torch_sparse_linear(xt, vt, tl, bt, backend="cpu", min_sparsity=0.0)
    out.backward(_t(g))
    return out.detach(), xt.grad, vt.grad, bt.grad


def _reference64(x, v, b, g):
    """The float64 reference (dense W, torch autograd): out and the three gradients."""
    tl = TorchLayout.from_mask(torch.from_numpy(MASK))
    xt, vt, bt = (_t(a).double().requires_grad_() for a in (x, v, b))
    out = sparse_linear_reference(xt, vt, tl, bt)
    out.backward(_t(g).double())
    return out.detach(), xt.grad, vt.grad, bt.grad


def _dense64(v):
    """W in float64 from the mask and the values (row-major order of the mask = CSR order)."""
    w = torch.zeros(N_OUT, N_IN, dtype=torch.float64)
    w[torch.from_numpy(MASK)] = _t(v).double()
    return w


def _layout():
    return SparseLayout.from_mask(MASK)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_and_grads_match_torch_and_reference(dtype):
    with jax.enable_x64(dtype == np.float64):
        layout = _layout()
        # without x64 the offsets are int32 (widened by the handler), with x64 int64 (passed as is)
        assert layout.row_ptr.dtype == (jnp.int64 if dtype == np.float64 else jnp.int32)
        x, v, b = _data(dtype)
        g = np.random.default_rng(7).standard_normal((2, 3, N_OUT)).astype(dtype)
        out = jax.jit(sparse_linear)(x, v, layout, b)
        assert out.dtype == dtype and out.shape == (2, 3, N_OUT)
        loss = jax.jit(jax.grad(lambda x, v, b: jnp.vdot(sparse_linear(x, v, layout, b), g), argnums=(0, 1, 2)))
        dx, dv, db = loss(x, v, b)
    tdt = TORCH[dtype]
    t_out, t_dx, t_dv, t_db = _torch_fwd_bwd(x, v, b, g)
    r_out, r_dx, r_dv, r_db = _reference64(x, v, b, g)
    for what, mine, theirs, ref in (("out", out, t_out, r_out), ("dx", dx, t_dx, r_dx), ("dvalues", dv, t_dv, r_dv),
                                    ("dbias", db, t_db, r_db)):
        assert_close(_t(mine), theirs, tdt, f"{what} vs torch")
        assert_close(_t(mine), ref, tdt, f"{what} vs float64 reference")


def test_no_bias_and_check_grads_float64():
    with jax.enable_x64(True):
        layout = _layout()
        x, v, _ = _data(np.float64, lead=(4,), seed=3)
        f = jax.jit(lambda x, v: sparse_linear(x, v, layout))
        out = f(x, v)
        ref = _t(x) @ _dense64(v).T
        assert_close(_t(out), ref, torch.float64, "no-bias out")
        check_grads(f, (x, v), order=1, modes=["rev"])
        check_grads(jax.jit(lambda x, v, b: sparse_linear(x, v, layout, b)), _data(np.float64, lead=(4,), seed=4),
                    order=1, modes=["rev"])


def test_empty_batch():
    layout = _layout()
    x, v, b = _data(np.float32, lead=(0,))
    out = jax.jit(sparse_linear)(x, v, layout, b)
    assert out.shape == (0, N_OUT)
    dx, dv, db = jax.grad(lambda x, v, b: sparse_linear(x, v, layout, b).sum(), argnums=(0, 1, 2))(x, v, b)
    assert dx.shape == (0, N_IN)
    assert np.array_equal(np.asarray(dv), np.zeros(NNZ, np.float32))
    assert np.array_equal(np.asarray(db), np.zeros(N_OUT, np.float32))


def test_vmap_equals_loop():
    layout = _layout()
    B = 3
    xs, _, b = _data(np.float32, lead=(B, 5), seed=5)
    vs = np.random.default_rng(6).standard_normal((B, NNZ)).astype(np.float32)
    f = jax.jit(lambda x, v: sparse_linear(x, v, layout, b))
    loop = np.stack([np.asarray(f(xs[i], vs[i])) for i in range(B)])
    # x batched only (the handler folds the batch into the rows), and x and values batched (one call each)
    only_x = jax.jit(jax.vmap(lambda x: sparse_linear(x, vs[0], layout, b)))(xs)
    both = jax.jit(jax.vmap(f))(xs, vs)
    assert_close(_t(only_x[0]), _t(loop[0]), torch.float32, "vmap over x")
    assert_close(_t(only_x), _t(np.stack([np.asarray(f(xs[i], vs[0])) for i in range(B)])), torch.float32, "vmap x")
    assert_close(_t(both), _t(loop), torch.float32, "vmap over x and values")
    # per-example gradients: the backward under vmap (dvalues per batch element, not summed)
    grad = jax.grad(lambda x, v: sparse_linear(x, v, layout, b).sum(), argnums=(0, 1))
    gx, gv = jax.jit(jax.vmap(grad, in_axes=(0, None)))(xs, vs[0])
    for i in range(B):
        lx, lv = grad(xs[i], vs[0])
        assert_close(_t(gx[i]), _t(lx), torch.float32, "vmap grad x")
        assert_close(_t(gv[i]), _t(lv), torch.float32, "vmap grad values")
    assert not np.allclose(np.asarray(gv[0]), np.asarray(gv[1]))  # really per example
    # the gradient of a vmapped loss w.r.t. the unbatched values: the per-element cotangents summed
    xj = jnp.asarray(xs)
    gsum = jax.jit(jax.grad(lambda v: jax.vmap(lambda x: sparse_linear(x, v, layout, b).sum())(xj).sum()))(vs[0])
    assert_close(_t(gsum), _t(np.asarray(gv).sum(0)), torch.float32, "grad of vmap, summed")


def test_from_csr_and_to_dense():
    tl = TorchLayout.from_mask(torch.from_numpy(MASK))
    a = SparseLayout.from_csr(tl.row_ptr.numpy(), tl.col_idx.numpy(), (N_OUT, N_IN))
    b = _layout()
    for name in ("row_ptr", "col_idx", "col_ptr", "row_idx", "perm"):
        assert np.array_equal(np.asarray(getattr(a, name)), getattr(tl, name).numpy()), name
        assert np.array_equal(np.asarray(getattr(b, name)), getattr(tl, name).numpy()), name
    v = np.arange(1, NNZ + 1, dtype=np.float32)
    assert np.array_equal(np.asarray(b.to_dense(v)), tl.to_dense(_t(v)).numpy())
    rp, ci = tl.row_ptr.numpy().copy(), tl.col_idx.numpy().copy()
    k = int(rp[1]) + 1  # the second entry of row 1 (row 1 has >= 2 entries)
    assert rp[2] - rp[1] >= 2
    bad = ci.copy()
    bad[k] = bad[k - 1]
    with pytest.raises(ValueError, match=r"col_idx must be strictly increasing.*row 1"):
        SparseLayout.from_csr(rp, bad, (N_OUT, N_IN))
    with pytest.raises(ValueError, match="row_ptr must have n_out"):
        SparseLayout.from_csr(rp[:-1], ci, (N_OUT, N_IN))
    with pytest.raises(TypeError, match="col_idx must be int32 or int64"):
        SparseLayout.from_csr(rp, ci.astype(np.float32), (N_OUT, N_IN))
    with pytest.raises(TypeError, match="mask must be concrete"):
        jax.jit(SparseLayout.from_mask)(jnp.asarray(MASK))


def test_bad_arguments_name_the_argument():
    layout = _layout()
    x, v, b = _data(np.float32, lead=(4,))
    cases = [
        ((x[:, :-1], v, layout, b), ValueError, r"x\.shape\[-1\]"),
        ((x, v[:-1], layout, b), ValueError, "values must have the layout's nnz"),
        ((x, v, layout, b[:-1]), ValueError, "bias must have n_out"),
        ((x.astype(np.int32), v, layout, b), TypeError, "x must have dtype"),
        ((x, v.astype(np.float64), layout, b), TypeError, "values must have x's dtype"),
        ((x, v, "layout", b), TypeError, "layout must be a kernelkit.jax.sparse.SparseLayout"),
        ((x, v, SparseLayout(layout.shape, layout.row_ptr, layout.col_idx.astype(jnp.int16), layout.col_ptr,
                             layout.row_idx, layout.perm), b), TypeError, "layout.col_idx must be int32"),
        ((x, v.reshape(1, -1), layout, b), ValueError, "values must have 1 dimensions"),
    ]
    for args, err, msg in cases:
        with pytest.raises(err, match=msg):
            sparse_linear(*args)


def test_bad_index_contents_fail_in_the_kernel_check():
    layout = _layout()
    x, v, b = _data(np.float32, lead=(4,))
    ci = np.asarray(layout.col_idx).copy()
    ci[0] = N_IN  # out of range: the CPU entry point's index check refuses it, as an XLA error
    broken = SparseLayout(layout.shape, layout.row_ptr, jnp.asarray(ci), layout.col_ptr, layout.row_idx, layout.perm)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"sparse_linear_fwd: invalid argument: col_idx\[0\] = 19"):
        jax.block_until_ready(jax.jit(sparse_linear)(x, v, broken, b))
