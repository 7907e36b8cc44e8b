"""Pure-torch references of the mfac kernels (csrc/include/kernelkit/mfac.h), in float64 where it
matters, plus two slow but transparent things the tests and benchmarks compare against:

* :func:`explicit_inverse` / :func:`ihvp_explicit`: the damped empirical Fisher formed and inverted
  as a d x d float64 matrix (small d only);
* :class:`PaperWindow`: the published dynamic algorithm (Frantar et al. 2021, ``optim.py:
  HInvFastUpMulti``) in plain torch: the D and B coefficient matrices rebuilt in O(m^3) per update,
  with the Cholesky route for the unpivoted LU (torch has no unpivoted LU on the CPU).  It is the
  benchmarks' "paper" baseline and the optimizer tests' check of "the same steps as the paper".

Conventions: G (m, d) holds one gradient per row; F = damp I + (1/m) G^T G; blocks of `block`
consecutive coordinates, nblocks = ceil(d / block); q (nvec, nblocks, r) and c likewise.
"""
from __future__ import annotations

import torch
from torch import Tensor


def nblocks(d: int, block: int) -> int:
    return 0 if d == 0 else -(-d // block)


def static_rows(m: int, d: int, block: int) -> int:
    """r, the rows of the static factor: m for the W form (m <= min(block, d)), else min(block, d)."""
    if m == 0 or d == 0:
        return 0
    B = min(block, d)
    return m if m <= B else B


def vector_dtype(gdtype: torch.dtype) -> torch.dtype:
    """float64 vectors with a float64 buffer, float32 otherwise."""
    return torch.float64 if gdtype == torch.float64 else torch.float32


def _blocked(t: Tensor, block: int) -> Tensor:
    """(..., d) -> (..., nblocks, block), zero padded."""
    d = t.shape[-1]
    nb = nblocks(d, block)
    pad = nb * block - d
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.reshape(*t.shape[:-1], nb, block)


def dots_reference(G: Tensor, x: Tensor, block: int) -> Tensor:
    """q[v, b, i] = sum_{j in block b} G[i, j] x[v, j], float64."""
    Gb = _blocked(G.double(), block)          # (r, nb, B)
    xb = _blocked(x.double(), block)          # (nvec, nb, B)
    return torch.einsum("ibk,vbk->vbi", Gb, xb).contiguous()


def insert_dots_reference(G: Tensor, x: Tensor, row: int) -> tuple[Tensor, Tensor]:
    """Writes G[row] = x (rounded to G's dtype) in place; returns q = G x and qr = G round(x), each
    (1, 1, r) float64 (one block)."""
    G[row] = x.to(G.dtype)
    Gd = G.double()
    q = Gd @ x.double()
    qr = Gd @ Gd[row]
    return q.reshape(1, 1, -1), qr.reshape(1, 1, -1)


def combine_reference(G: Tensor, c: Tensor, x: Tensor | None, alpha: float, block: int,
                      out_dtype: torch.dtype | None = None) -> Tensor:
    """out[v, j] = alpha x[v, j] + sum_i c[v, b(j), i] G[i, j]; float64 math, out_dtype result
    (default: x's dtype, or the vector dtype of G)."""
    d = G.shape[1]
    Gb = _blocked(G.double(), block)          # (r, nb, B)
    nb, B = Gb.shape[1], Gb.shape[2]
    out = torch.einsum("vbi,ibk->vbk", c.double(), Gb).reshape(c.shape[0], nb * B)[:, :d]
    if x is not None:
        out = out + alpha * x.double()
    dt = out_dtype or (x.dtype if x is not None else vector_dtype(G.dtype))
    return out.to(dt)


def diag_reference(Z: Tensor, alpha: float, beta: float, out_dtype: torch.dtype | None = None) -> Tensor:
    out = alpha + beta * Z.double().square().sum(0)
    return out.to(out_dtype or vector_dtype(Z.dtype))


def static_setup_reference(G: Tensor, damp: float, block: int) -> Tensor:
    """The static factor Z (r, d) of csrc/include/kernelkit/mfac.h: float64 math, cast to float32
    (float64 for a float64 G)."""
    m, d = G.shape
    r = static_rows(m, d, block)
    zdtype = vector_dtype(G.dtype)
    Z = torch.zeros(r, d, dtype=torch.float64, device=G.device)
    if r == 0:
        return Z.to(zdtype)
    Gd = G.double()
    w_form = m <= min(block, d)
    for lo in range(0, d, block):
        hi = min(d, lo + block)
        Gb = Gd[:, lo:hi]
        if w_form:
            K = Gb @ Gb.T + m * damp * torch.eye(m, dtype=torch.float64, device=G.device)
            L = torch.linalg.cholesky(K)
            Z[:, lo:hi] = torch.linalg.solve_triangular(L, Gb, upper=False)
        else:
            w = hi - lo
            A = Gb.T @ Gb + m * damp * torch.eye(w, dtype=torch.float64, device=G.device)
            L = torch.linalg.cholesky(A)
            eye = torch.eye(w, dtype=torch.float64, device=G.device)
            Z[:w, lo:hi] = torch.linalg.solve_triangular(L, eye, upper=False)
    return Z.to(zdtype)


def static_coefficients(m: int, d: int, block: int, damp: float) -> tuple[float, float]:
    """(alpha, beta) of F_b^-1 = alpha I + beta Z_b^T Z_b for the form that (m, d, block) selects."""
    if m <= min(block, d):
        return 1.0 / damp, -1.0 / damp
    return 0.0, float(m)


def window_rebuild_reference(gram: Tensor, damp: float) -> Tensor:
    """kinv = (m damp I + gram)^-1, gram's lower triangle mirrored (what the kernels read)."""
    m = gram.shape[0]
    L = torch.tril(gram.double())
    K = L + torch.tril(L, -1).T + m * damp * torch.eye(m, dtype=torch.float64, device=gram.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(K)).contiguous()


def window_update_reference(gram: Tensor, kinv: Tensor, row: int, newcol: Tensor, damp: float) -> None:
    """In place: gram's row and column `row` = newcol; kinv = the exact inverse of the new K."""
    gram[row, :] = newcol
    gram[:, row] = newcol
    kinv.copy_(window_rebuild_reference(gram, damp))


def window_coef_reference(kinv: Tensor, q: Tensor, scale: float) -> Tensor:
    """c[v] = scale * kinv q[v]."""
    return (scale * (q.double() @ kinv.double().T)).contiguous()


# ---- explicit float64 inverses (tests, small d) ----------------------------------------------------
def explicit_inverse(G: Tensor, damp: float, block: int | None = None) -> Tensor:
    """(damp I + G^T G / m)^-1 as a d x d float64 matrix, block-diagonal over blocks of `block`."""
    m, d = G.shape
    Gd = G.double()
    F = damp * torch.eye(d, dtype=torch.float64, device=G.device) + Gd.T @ Gd / m
    if block is not None and block < d:
        mask = torch.zeros(d, d, dtype=torch.bool, device=G.device)
        for lo in range(0, d, block):
            mask[lo:lo + block, lo:lo + block] = True
        F = torch.where(mask, F, torch.zeros((), dtype=F.dtype, device=F.device))
    return torch.linalg.inv(F)


def ihvp_explicit(G: Tensor, damp: float, x: Tensor, block: int | None = None) -> Tensor:
    return x.double() @ explicit_inverse(G, damp, block).T


# ---- the published dynamic algorithm, in plain torch -----------------------------------------------
class PaperWindow:
    """M-FAC's sliding-window IHVP as published (optim.py: HInvFastUpMulti, one device): the ring
    buffer G (m, d), G G^T, and the coefficient matrices D (upper) and B (lower) recomputed in
    O(m^3) after each replacement; IHVP in O(d m + m^2).  ``dtype`` is the buffer's (the paper's is
    float32); the m x m matrices use ``coef_dtype`` (the paper: the buffer's dtype).  Empty slots are
    zero gradients (the 1/m stays 1/m before the window fills)."""

    def __init__(self, d: int, m: int, damp: float, dtype=torch.float32, device=None, coef_dtype=None):
        self.d, self.m, self.damp = d, m, float(damp)
        self.lambd = 1.0 / float(damp)
        self.G = torch.zeros(m, d, dtype=dtype, device=device)
        self.cdt = coef_dtype or dtype
        self.GGT = torch.zeros(m, m, dtype=self.cdt, device=device)
        self.last = 0
        self._setup()

    def _setup(self) -> None:
        m, dev, dt = self.m, self.GGT.device, self.cdt
        A = self.lambd * self.GGT + m * torch.eye(m, dtype=dt, device=dev)
        C = torch.linalg.cholesky(A)                       # A = C C^T; unpivoted LU: U = diag(C) C^T
        U = torch.diag(torch.diagonal(C)) @ C.T
        self.D = U - m * torch.eye(m, dtype=dt, device=dev)   # D_ij = g_i^T F_{i-1}^-1 g_j (i <= j)
        self.dd = m + torch.diagonal(self.D)                   # d_i = m + D_ii
        B = torch.zeros(m, m, dtype=dt, device=dev)
        B.diagonal().fill_(self.lambd)
        coef = -self.D / self.dd[:, None]                      # coef[j, i] = -D_ji / d_j
        for i in range(1, m):
            B[i, :i] = coef[:i, i] @ B[:i, :i]
        self.B = B
        # q_k <- q_k - sum_{j<k} D_jk q_j / d_j, in order of k: a lower-triangular solve
        self.Tq = torch.eye(m, dtype=dt, device=dev) + (torch.triu(self.D, 1) / self.dd[:, None]).T

    def update(self, g: Tensor) -> None:
        self.G[self.last] = g.to(self.G.dtype)
        col = (self.G.to(self.cdt) @ self.G[self.last].to(self.cdt))
        self.GGT[self.last, :] = col
        self.GGT[:, self.last] = col
        self.last = (self.last + 1) % self.m
        self._setup()

    def mul(self, x: Tensor) -> Tensor:
        q = self.lambd * (self.G.to(self.cdt) @ x.to(self.cdt))
        q = torch.linalg.solve_triangular(self.Tq, q[:, None], upper=False)[:, 0]
        coef = self.B.T @ (q / self.dd)
        return (self.lambd * x.to(self.cdt) - self.G.to(self.cdt).T @ coef).to(x.dtype)

    def update_mul(self, g: Tensor) -> Tensor:
        self.update(g)
        return self.mul(g)


def mfac_step_reference(window, params_and_grads, lr: float, momentum: float, weight_decay: float,
                        buf: Tensor | None) -> Tensor | None:
    """One step of the paper's M-FAC optimizer on a flat parameter vector w (in place) with gradient
    g: g += wd w; u = F^-1 g with g in the window; v = beta v + (1 - beta) u (v starts at 0);
    w -= lr v.  ``params_and_grads`` = (w, g) flat float tensors; returns the momentum buffer."""
    w, g = params_and_grads
    g = g + weight_decay * w if weight_decay else g
    u = window.update_mul(g)
    if momentum:
        buf = torch.zeros_like(u) if buf is None else buf
        buf.mul_(momentum).add_(u, alpha=1 - momentum)
        u = buf
    w.sub_(lr * u)
    return buf
