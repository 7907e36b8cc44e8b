"""Data-parallel M-FAC: 2 processes on the gloo backend (dist_harness.spawn, the harness test_dist.py
uses too), each rank holding half of the gradient buffer's columns.  The sharded MFAC steps equal a
single-process MFAC's on the same gradients, and the sharded SlidingWindowIHVP.mul equals the unsharded
one.  Bounded: the workers are killed after TIMEOUT seconds."""
from __future__ import annotations

import json
import os

import pytest
import torch

from dist_harness import WORLD, gloo_reason, spawn

TIMEOUT = 120


def _worker(rank: int, world: int, out_dir: str) -> None:
    from kernelkit.mfac import SlidingWindowIHVP
    from kernelkit.mfac.optim import MFAC

    torch.manual_seed(0)                      # the same parameters and gradients on every rank
    shapes = [(7, 5), (9,), (3, 4)]           # d = 56
    init = [torch.randn(*s) for s in shapes]
    grads = [[torch.randn(*s) for s in shapes] for _ in range(9)]
    runs = {}
    for name, shard in (("sharded", None), ("single", False)):   # None: automatic (world > 1 -> shard)
        ps = [w.clone().requires_grad_() for w in init]
        opt = MFAC(ps, lr=0.05, ngrads=4, damp=1e-3, momentum=0.5, weight_decay=1e-3, shard=shard)
        for step in grads:
            for p, g in zip(ps, step):
                p.grad = g.clone()
            opt.step()
        runs[name] = (torch.cat([p.detach().reshape(-1) for p in ps]), opt.window)
    w_sh, win_sh = runs["sharded"]
    w_one, win_one = runs["single"]
    step_err = ((w_sh - w_one).norm() / w_one.norm()).item()
    d = w_one.numel()
    # the window itself: a batch of vectors through the sharded and the unsharded IHVP
    V = torch.randn(3, d)
    mul_err = ((win_sh.mul(V) - win_one.mul(V)).norm() / win_one.mul(V).norm()).item()
    # a bare sharded SlidingWindowIHVP (odd d, float64) against an unsharded one
    a = SlidingWindowIHVP(37, 5, 1e-2, torch.float64)
    b = SlidingWindowIHVP(37, 5, 1e-2, torch.float64, shard=False)
    for _ in range(7):
        g = torch.randn(37, dtype=torch.float64)
        a.update(g)
        b.update(g)
    v = torch.randn(37, dtype=torch.float64)
    bare_err = ((a.mul(v) - b.mul(v)).norm() / b.mul(v).norm()).item()
    res = {"rank": rank, "step_err": step_err, "mul_err": mul_err, "bare_err": bare_err, "d": d,
           "local_cols": win_sh.G.shape[1], "single_cols": win_one.G.shape[1], "shard": win_sh.shard,
           "bare_cols": a.G.shape[1]}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


def test_mfac_sharded_steps_equal_single_process(tmp_path):
    reason = gloo_reason()
    if reason:
        pytest.skip(reason)
    spawn(_worker, tmp_path, world=WORLD, timeout=TIMEOUT)
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    print("\n" + "; ".join(f"rank {r['rank']}: step rel. diff {r['step_err']:.2e}, mul {r['mul_err']:.2e}, "
                           f"bare float64 {r['bare_err']:.2e}, {r['local_cols']} of {r['d']} columns" for r in res))
    for r in res:
        assert r["shard"] and r["single_cols"] == r["d"]
        assert r["local_cols"] in (r["d"] // 2, (r["d"] + 1) // 2)
        assert r["bare_cols"] in (18, 19)
        assert r["step_err"] < 1e-5, r
        assert r["mul_err"] < 1e-5, r
        assert r["bare_err"] < 1e-12, r
    assert sum(r["local_cols"] for r in res) == res[0]["d"]
    assert sum(r["bare_cols"] for r in res) == 37
