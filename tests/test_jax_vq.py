"""kernelkit.jax.vq: vq_linear as an XLA FFI custom call on kk_vq_linear_{fwd,bwd}_cpu, against the
torch op (backend="cpu") and the float64 reference, under jax.jit and jax.vmap, with custom_vjp
gradients (x, codebooks, scales, bias) against torch autograd."""
import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
pytest.importorskip("kernelkit.jax")  # skips when kernelkit was built without its JAX module
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

from helpers import assert_close  # noqa: E402
from kernelkit.jax.vq import check_codes, vq_linear  # noqa: E402
from kernelkit.vq import vq_linear as torch_vq_linear  # noqa: E402
from kernelkit.vq import vq_linear_reference  # noqa: E402

# odd sizes: 11 output rows in 2 sets of rows_per_codebook = 6, n_in = 3 groups of d = 4, M = 2
# additive codebooks of K = 5 codewords (K < 256: the CPU kernels check the codes)
N_OUT, D, G, M, K, RPC = 11, 4, 3, 2, 5, 6
S = 2
N_IN = G * D
TORCH = {np.float32: torch.float32, np.float64: torch.float64}


def _format(dtype, seed=0, code_dtype=np.uint8, k=K):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, k, (N_OUT, G, M)).astype(code_dtype)
    cb = rng.standard_normal((S, M, k, D)).astype(dtype)
    scales = (0.5 + rng.random(N_OUT)).astype(dtype)
    bias = rng.standard_normal(N_OUT).astype(dtype)
    return codes, cb, scales, bias


def _t(a):
    return torch.from_numpy(np.array(a))


def _torch_fwd_bwd(x, codes, cb, s, b, g, path="auto"):
    xt, ct, st, bt = (_t(a).requires_grad_() for a in (x, cb, s, b))
    out = torch_vq_linear(xt, _t(codes), ct, st, bt, rows_per_codebook=RPC, path=path, backend="cpu")
    out.backward(_t(g))
    return out.detach(), xt.grad, ct.grad, st.grad, bt.grad


def _reference64(x, codes, cb, s, b, g):
    xt, ct, st, bt = (_t(a).double().requires_grad_() for a in (x, cb, s, b))
    out = vq_linear_reference(xt, _t(codes), ct, st, bt, rows_per_codebook=RPC)
    out.backward(_t(g).double())
    return out.detach(), xt.grad, ct.grad, st.grad, bt.grad


@pytest.mark.parametrize("dtype,path", [(np.float32, "gemv"), (np.float32, "gemm"), (np.float64, "auto")])
def test_forward_and_grads_match_torch_and_reference(dtype, path):
    rng = np.random.default_rng(1)
    codes, cb, s, b = _format(dtype)
    x = rng.standard_normal((2, 3, N_IN)).astype(dtype)
    g = rng.standard_normal((2, 3, N_OUT)).astype(dtype)
    with jax.enable_x64(dtype == np.float64):
        f = jax.jit(lambda x, cb, s, b: vq_linear(x, codes, cb, s, b, rows_per_codebook=RPC, path=path))
        out = f(x, cb, s, b)
        assert out.dtype == dtype and out.shape == (2, 3, N_OUT)
        grads = jax.jit(jax.grad(lambda *a: jnp.vdot(f(*a), g), argnums=(0, 1, 2, 3)))(x, cb, s, b)
    tdt = TORCH[dtype]
    theirs = _torch_fwd_bwd(x, codes, cb, s, b, g, path)
    ref = _reference64(x, codes, cb, s, b, g)
    for i, (what, mine) in enumerate(zip(("out", "dx", "dcodebooks", "dscales", "dbias"), (out, *grads))):
        assert_close(_t(mine), theirs[i], tdt, f"{what} vs torch")
        assert_close(_t(mine), ref[i], tdt, f"{what} vs float64 reference")


def test_int16_codes_one_codebook_no_scales():
    # int16 codes read as unsigned (K = 300 > 256), codes 2-D (M = 1), codebooks 3-D (S = 1), no scales/bias
    rng = np.random.default_rng(2)
    k = 300
    codes = rng.integers(0, k, (N_OUT, G)).astype(np.int16)
    codes[0, 0] = 299
    cb = rng.standard_normal((1, k, D)).astype(np.float32)
    x = rng.standard_normal((5, N_IN)).astype(np.float32)
    out = jax.jit(lambda x, cb: vq_linear(x, codes, cb))(x, cb)
    theirs = torch_vq_linear(_t(x), _t(codes), _t(cb), backend="cpu")
    ref = vq_linear_reference(_t(x).double(), _t(codes)[:, :, None], _t(cb).double())
    assert_close(_t(out), theirs, torch.float32, "int16 out vs torch")
    assert_close(_t(out), ref, torch.float32, "int16 out vs reference")


def test_check_grads_float64():
    with jax.enable_x64(True):
        codes, cb, s, b = _format(np.float64, seed=3)
        x = np.random.default_rng(4).standard_normal((3, N_IN))
        f = jax.jit(lambda x, cb, s, b: vq_linear(x, codes, cb, s, b, rows_per_codebook=RPC))
        check_grads(f, (x, cb, s, b), order=1, modes=["rev"])


def test_empty_batch_and_no_rows():
    codes, cb, s, b = _format(np.float32)
    x = np.zeros((0, N_IN), np.float32)
    f = lambda x, cb, s, b: vq_linear(x, codes, cb, s, b, rows_per_codebook=RPC)  # noqa: E731
    assert jax.jit(f)(x, cb, s, b).shape == (0, N_OUT)
    dx, dcb, ds, db = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2, 3))(x, cb, s, b)
    assert dx.shape == (0, N_IN)
    for what, z in (("dcodebooks", dcb), ("dscales", ds), ("dbias", db)):
        assert not np.asarray(z).any(), what
    # n_out = 0: an empty output, zero gradients, no kernel call
    y = vq_linear(np.ones((2, N_IN), np.float32), codes[:0], cb[:1])
    assert y.shape == (2, 0)


def test_vmap_equals_loop():
    B = 3
    rng = np.random.default_rng(5)
    codes, cb, s, b = _format(np.float32)
    xs = rng.standard_normal((B, 4, N_IN)).astype(np.float32)
    cbs = rng.standard_normal((B, S, M, K, D)).astype(np.float32)
    codess = rng.integers(0, K, (B, N_OUT, G, M)).astype(np.uint8)
    f = lambda x, c, cb: vq_linear(x, c, cb, s, b, rows_per_codebook=RPC)  # noqa: E731
    fj = jax.jit(f)
    for in_axes, args in (((0, None, None), (xs, codes, cb)),   # x only: folded into the rows
                          ((0, None, 0), (xs, codes, cbs)),     # x and codebooks
                          ((None, 0, None), (xs[0], codess, cb))):  # the codes
        got = jax.jit(jax.vmap(f, in_axes=in_axes))(*args)
        loop = np.stack([np.asarray(fj(*[a if ax is None else a[i] for a, ax in zip(args, in_axes)]))
                         for i in range(B)])
        assert_close(_t(got), _t(loop), torch.float32, f"vmap in_axes={in_axes}")
    # per-example gradients of the codebooks and scales
    grad = jax.grad(lambda x, cb, s: vq_linear(x, codes, cb, s, b, rows_per_codebook=RPC).sum(), argnums=(1, 2))
    gcb, gs = jax.jit(jax.vmap(grad, in_axes=(0, None, None)))(xs, cb, s)
    for i in range(B):
        lcb, ls = grad(xs[i], cb, s)
        assert_close(_t(gcb[i]), _t(lcb), torch.float32, "vmap grad codebooks")
        assert_close(_t(gs[i]), _t(ls), torch.float32, "vmap grad scales")
    assert not np.allclose(np.asarray(gcb[0]), np.asarray(gcb[1]))  # really per example
    # the gradient of a vmapped loss w.r.t. the unbatched codebooks: the per-element cotangents summed
    xj = jnp.asarray(xs)
    gsum = jax.jit(jax.grad(lambda cb: jax.vmap(lambda x: vq_linear(x, codes, cb, s, b, rows_per_codebook=RPC).sum())(
        xj).sum()))(cb)
    assert_close(_t(gsum), _t(np.asarray(gcb).sum(0)), torch.float32, "grad of vmap, summed")


def test_bad_arguments_name_the_argument():
    codes, cb, s, b = _format(np.float32)
    x = np.ones((4, N_IN), np.float32)
    kw = {"rows_per_codebook": RPC}
    cases = [
        ((x, codes.astype(np.float32), cb, s, b), kw, TypeError, "codes must be uint8"),
        ((x, codes[:, :, :1], cb, s, b), kw, ValueError, r"codes has 1 code\(s\) per group"),
        ((x, codes, cb[..., :3], s, b), kw, ValueError, "group size d"),
        ((x[:, :-1], codes, cb, s, b), kw, ValueError, r"x has 11 features"),
        ((x, codes, cb, s, b), {"rows_per_codebook": 11}, ValueError, "codebooks has 2 set"),
        ((x, codes, cb, s[:-1], b), kw, ValueError, "scales must have n_out"),
        ((x, codes, cb, s, b[:-1]), kw, ValueError, "bias must have n_out"),
        ((x, codes, cb, s, b), {**kw, "path": "fast"}, ValueError, "path must be one of"),
        ((x.astype(np.int32), codes, cb, s, b), kw, TypeError, "x must have dtype"),
        ((x, codes, np.zeros((S, M, 257, D), np.float32), s, b), kw, ValueError, "K = 257 does not fit uint8"),
        ((x, codes, cb.astype(np.int32), s, b), kw, TypeError, "codebooks must have dtype"),
    ]
    for args, kwargs, err, msg in cases:
        with pytest.raises(err, match=msg):
            vq_linear(*args, **kwargs)


def test_bad_code_fails_in_the_kernel_check():
    codes, cb, s, b = _format(np.float32)
    codes = codes.copy()
    codes[4, 1, 1] = K  # out of range for K codewords
    x = np.ones((2, N_IN), np.float32)
    with pytest.raises(ValueError, match=r"codes\[4, 1, 1\] = 5"):
        check_codes(codes, K)
    check_codes(codes, K + 1)  # passes
    msg = r"vq_linear_fwd: invalid argument: codes\[row 4, group 1, codebook 1\] = 5"
    with pytest.raises(jax.errors.JaxRuntimeError, match=msg):
        jax.block_until_ready(jax.jit(lambda x: vq_linear(x, codes, cb, s, b, rows_per_codebook=RPC))(x))
