"""Entropic OT on point clouds: a Wasserstein gradient flow, then Sinkhorn against SNS on one hard problem.

Part 1, gradient flow.  A source cloud (a Gaussian blob, n points in 2-D) moves toward a target cloud (a
ring with a bar through it, m points) by gradient descent on the Sinkhorn divergence
S(x, y) = OT_reg(x, y) - OT_reg(x, x) / 2 - OT_reg(y, y) / 2, each term a kernelkit.ot.sinkhorn_points
call (the regularized cost alone is minimized by a shrunken cloud, its entropic bias; the divergence is
not).  Gradients with respect to x come from the envelope theorem (one kernel pass, no differentiation
through the iterations); each step's solves are warm-started from the previous potentials.  Printed:
the divergence, the exact (unregularized) OT cost W2^2 of the current cloud (POT's exact solver when
installed, else kernelkit SNS at a small reg), iterations, time.

Part 2, one problem at small reg (n points, reg 1e-3, squared-Euclidean on [0,1]^2): kernelkit's
log-domain Sinkhorn against SNS (Sinkhorn-Newton-Sparse) to an L1 marginal error of 1e-8, with the
iterations, time and keep sizes (and POT's sinkhorn_log per-iteration time when POT is installed).

    python -m kernelkit.examples.ot_flow [--n 600] [--steps 30] [--reg 0.01] [--seed 0] [--quiet]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

import kernelkit.ot as kot
from kernelkit.ot import Cost, solvers


def clouds(n: int, m: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = 0.15 * torch.randn(n, 2, generator=g, dtype=torch.float64) + torch.tensor([-0.6, 0.4], dtype=torch.float64)
    t = torch.rand(m, generator=g, dtype=torch.float64) * 2 * math.pi
    ring = torch.stack([0.5 * t.cos(), 0.5 * t.sin()], 1)
    k = m // 4
    bar = torch.stack([torch.linspace(-0.45, 0.45, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)], 1)
    y = torch.cat([ring[: m - k], bar]) + 0.01 * torch.randn(m, 2, generator=g, dtype=torch.float64)
    return x, y


def exact_cost(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unregularized OT cost: POT's network simplex when installed, else <C, P> at reg 1e-3 of the mean
    cost by SNS (within ~reg * log(n) of it)."""
    C = ((x[:, None] - y[None]) ** 2).sum(-1)
    try:
        import ot  # POT
        return float(ot.emd2([], [], C.numpy()))
    except ImportError:
        reg = 1e-3 * float(C.mean())
        return float(kot.sinkhorn2([], [], C, reg, method="sns", numItermax=1000, stopThr=1e-9, progress=False,
                                   warn=True))


def flow(n: int, steps: int, reg: float, seed: int, quiet: bool) -> None:
    x0, y = clouds(n, n, seed)
    x = x0.clone().requires_grad_()
    ws_xy = ws_xx = None
    lr = 0.1
    print(f"Part 1: Sinkhorn-divergence flow of {n} points toward a ring+bar of {n} points, reg {reg}, lr {lr} (x n)")
    print(f"{'step':>4} {'S(x,y)':>10} {'exact W2^2':>10} {'iters':>6} {'ms':>7}")
    kw = dict(method="sinkhorn_log", stopThr=1e-7, numItermax=2000, log=True, progress=not quiet, warn=False)
    _, log_yy = kot.sinkhorn_points(y, y, reg, **kw)
    oyy = float(kot.sinkhorn_points(y, y, reg, warmstart=(log_yy["f"], log_yy["g"]), **kw)[0])
    first = last = None
    for s in range(steps + 1):
        t0 = time.perf_counter()
        oxy, log_xy = kot.sinkhorn_points(x, y, reg, warmstart=ws_xy, **kw)
        oxx, log_xx = kot.sinkhorn_points(x, x, reg, warmstart=ws_xx, **kw)
        ws_xy = (log_xy["f"].detach(), log_xy["g"].detach())
        ws_xx = (log_xx["f"].detach(), log_xx["g"].detach())
        div = oxy - 0.5 * oxx - 0.5 * oyy
        show = s % max(1, steps // 8) == 0 or s == steps
        x_start = x.detach().clone() if show else None  # the cloud this step starts from
        if s < steps:
            (gx,) = torch.autograd.grad(div, x)
            with torch.no_grad():
                x -= lr * n * gx  # a point of a uniform cloud carries mass 1/n: its gradient is 1/n of the force
        ms = (time.perf_counter() - t0) * 1e3
        if show:
            ex = exact_cost(x_start, y)
            first = ex if first is None else first
            last = ex
            print(f"{s:>4} {float(div.detach()):>10.5f} {ex:>10.5f} {log_xy['niter'] + log_xx['niter'] + 2:>6} {ms:>7.1f}")
    print(f"exact OT cost {first:.5f} -> {last:.5f} ({first / max(last, 1e-300):.0f}x lower)\n")


def hard_problem(n: int, seed: int, quiet: bool) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(n, 2, generator=g, dtype=torch.float64)
    y = torch.rand(n, 2, generator=g, dtype=torch.float64)
    a = torch.full((1, n), 1.0 / n, dtype=torch.float64)
    reg = 1e-3
    cost = Cost.points(x, y)
    print(f"Part 2: {n} x {n} points in [0,1]^2, squared Euclidean, reg {reg}, to L1 marginal error 1e-8")
    rows = []
    t0 = time.perf_counter()
    sk = solvers.sinkhorn_loop(cost, a, a, reg, 100000, 1e-8, a.new_zeros(1, n), a.new_zeros(1, n),
                               progress=not quiet, err_norm=1)
    rows.append(("kernelkit sinkhorn_log", sk.niter[0] + 1, (time.perf_counter() - t0) * 1e3, ""))
    t0 = time.perf_counter()
    res = solvers.solve(cost, a, a, reg, method="sns", numItermax=200, stopThr=1e-8 / math.sqrt(2 * n),
                        progress=not quiet)
    rows.append(("kernelkit sns", res.n_sinkhorn + res.n_newton, (time.perf_counter() - t0) * 1e3,
                 f"{res.n_sinkhorn} Sinkhorn + {res.n_newton} Newton, keep per row {res.keep}"))
    for name, it, ms, note in rows:
        print(f"  {name:<24} {it:>6} iterations {ms:>9.1f} ms  {note}")
    r, c, _ = kot.marginals(cost, reg, res.f, res.g)
    print(f"  SNS L1 marginal error {float((r - a).abs().sum() + (c - a).abs().sum()):.2e}; "
          f"speed-up over Sinkhorn {rows[0][2] / rows[1][2]:.1f}x")
    try:
        import ot  # noqa: F401  (POT)
        C = cost.dense()[0].numpy()
        an = a[0].numpy()
        t0 = time.perf_counter()
        ot.sinkhorn(an, an, C, reg, method="sinkhorn_log", numItermax=20, stopThr=0.0, warn=False)
        per = (time.perf_counter() - t0) / 20 * 1e3
        ours = rows[0][2] / rows[0][1]
        print(f"  POT sinkhorn_log: {per:.1f} ms per iteration (kernelkit {ours:.1f} ms: {per / ours:.1f}x); "
              f"at kernelkit's iteration count POT would take {per * rows[0][1] / 1e3:.1f} s")
    except ImportError:
        print("  (POT not installed: pip install pot to compare)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--reg", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    flow(a.n, a.steps, a.reg, a.seed, a.quiet)
    hard_problem(2 * a.n, a.seed, a.quiet)


if __name__ == "__main__":
    main()
