"""Data-parallel M-FAC: 2 processes on the gloo backend (torch.multiprocessing spawn, rendezvous through
a file), each rank holding half of the gradient buffer's columns.  The sharded MFAC steps equal a
single-process MFAC's on the same gradients, and the sharded SlidingWindowIHVP.mul equals the unsharded
one.  Bounded: the workers are killed after TIMEOUT seconds."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

TIMEOUT = 120
WORLD = 2


def _gloo_reason() -> str | None:
    import torch.distributed as dist
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "the gloo backend is not available in this torch build"
    return None


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from kernelkit.mfac import SlidingWindowIHVP
    from kernelkit.mfac.optim import MFAC

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
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
    finally:
        dist.destroy_process_group()


def test_mfac_sharded_steps_equal_single_process(tmp_path):
    reason = _gloo_reason()
    if reason:
        pytest.skip(reason)
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} gloo workers did not finish within {TIMEOUT} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
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
