"""kernelkit.jax.monarch_matmul (XLA FFI custom calls on kk_monarch_{fwd,bwd}_cpu) against the torch
op on the same inputs and against the float64 reference: under jax.jit, jax.vmap (each argument
batched), jax.grad (custom_vjp), in float32 and float64, odd sizes and an empty batch; bad arguments
raise errors that name them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
kj = pytest.importorskip("kernelkit.jax", reason="kernelkit built without its JAX module")

import kernelkit  # noqa: E402
from kernelkit.monarch.reference import monarch_reference  # noqa: E402

from helpers import TOL, rel_err  # noqa: E402

SHAPES = [  # (batch dims of x, (k, q, p), (l, s, r))
    ((7,), (4, 6, 3), (3, 5, 8)),
    ((2, 5), (3, 5, 7), (5, 4, 3)),
    ((0,), (2, 3, 4), (3, 2, 2)),
]


def _data(bshape, f1, f2, dtype, seed=0):
    rng = np.random.default_rng(seed)
    k, q, p = f1
    x = rng.standard_normal((*bshape, k * p)).astype(dtype)
    return x, rng.standard_normal(f1).astype(dtype), rng.standard_normal(f2).astype(dtype)


def _torch(x, w1, w2, grad=False):
    ts = [torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(grad) for a in (x, w1, w2)]
    return ts, kernelkit.monarch.monarch_matmul(*ts, backend="cpu")


def _ref(x, w1, w2):
    t = [torch.from_numpy(np.asarray(a, np.float64)) for a in (x, w1, w2)]
    return monarch_reference(*t)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_jit_forward_matches_torch_and_reference(case, dtype):
    bshape, f1, f2 = SHAPES[case]
    x, w1, w2 = _data(bshape, f1, f2, dtype)
    with jax.enable_x64(dtype == "float64"):
        y = np.array(jax.jit(kj.monarch_matmul)(x, w1, w2))
    assert y.dtype == np.dtype(dtype) and y.shape == (*bshape, f2[0] * f2[1])
    _, t = _torch(x, w1, w2)
    if y.size:
        # the same C kernel on the same rows: equal up to the thread split of the reduction
        assert rel_err(torch.from_numpy(y), t.detach()) <= TOL[getattr(torch, dtype)]
        assert rel_err(torch.from_numpy(y).double(), _ref(x, w1, w2)) <= TOL[getattr(torch, dtype)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_grad_matches_torch_autograd(dtype):
    bshape, f1, f2 = SHAPES[1]
    x, w1, w2 = _data(bshape, f1, f2, dtype, seed=1)
    rng = np.random.default_rng(2)
    gout = rng.standard_normal((*bshape, f2[0] * f2[1])).astype(dtype)
    with jax.enable_x64(dtype == "float64"):
        loss = jax.jit(jax.grad(lambda a, b, c: (kj.monarch_matmul(a, b, c) * gout).sum(), argnums=(0, 1, 2)))
        gs = [np.array(g) for g in loss(x, w1, w2)]
    ts, t = _torch(x, w1, w2, grad=True)
    t.backward(torch.from_numpy(gout))
    for g, tt, name in zip(gs, ts, ("dx", "dw1", "dw2")):
        assert g.shape == tuple(tt.shape), name
        assert rel_err(torch.from_numpy(g), tt.grad) <= TOL[getattr(torch, dtype)], name


def test_check_grads_float64():
    from jax.test_util import check_grads
    x, w1, w2 = _data((3,), (2, 3, 2), (3, 2, 2), "float64", seed=3)
    with jax.enable_x64(True):
        check_grads(kj.monarch_matmul, (x, w1, w2), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("axes", [(0, None, None), (None, 0, 0), (0, 0, None), (0, 0, 0)])
def test_vmap_equals_a_loop(axes):
    x, w1, w2 = _data((5,), (4, 6, 3), (3, 5, 8), "float32", seed=4)
    B = 3
    rng = np.random.default_rng(5)
    args = [x, w1, w2]
    batched = [np.stack([a + 0.1 * i * rng.standard_normal(a.shape).astype(a.dtype) for i in range(B)])
               if ax == 0 else a for a, ax in zip(args, axes)]
    y = np.array(jax.jit(jax.vmap(kj.monarch_matmul, in_axes=axes))(*batched))
    for i in range(B):
        one = [b[i] if ax == 0 else b for b, ax in zip(batched, axes)]
        _, t = _torch(*one)
        assert rel_err(torch.from_numpy(y[i]), t.detach()) <= 1e-5, i


def test_grad_through_vmap_sums_over_the_batch():
    # grad of a vmapped loss w.r.t. unbatched weights: the per-element cotangents are summed
    x, w1, w2 = _data((4, 2), (2, 3, 2), (3, 2, 2), "float32", seed=6)
    xj = jnp.asarray(x)  # (jax 0.10 asserts on a raw numpy array vmapped into a custom_vjp under jit)
    f = lambda b, c: jax.vmap(lambda xi: kj.monarch_matmul(xi, b, c).sum())(xj).sum()  # noqa: E731
    g1, g2 = jax.jit(jax.grad(f, argnums=(0, 1)))(w1, w2)
    ts, t = _torch(x, w1, w2, grad=True)
    t.sum().backward()
    assert rel_err(torch.from_numpy(np.array(g1)), ts[1].grad) <= 1e-5
    assert rel_err(torch.from_numpy(np.array(g2)), ts[2].grad) <= 1e-5


def test_bad_arguments_name_themselves():
    x, w1, w2 = _data((3,), (2, 3, 2), (3, 2, 2), "float32")
    with pytest.raises(ValueError, match="x.shape"):
        kj.monarch_matmul(x[:, :3], w1, w2)
    with pytest.raises(ValueError, match="w1"):
        kj.monarch_matmul(x, w1[0], w2)
    with pytest.raises(ValueError, match="w2"):
        kj.monarch_matmul(x, w1, w2[:2])
    with pytest.raises(TypeError, match="w2"):
        kj.monarch_matmul(x, w1, w2.astype(np.float16))
    with pytest.raises(TypeError, match="x"):
        kj.monarch_matmul(x.astype(np.int32), w1, w2)
    with pytest.raises(TypeError, match="w1"):
        kj.monarch_matmul(x, [[1.0]], w2)
