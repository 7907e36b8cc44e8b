"""Dense -> Monarch fine-tuning on a toy regression task (the paper's "D2S" mode, in miniature).

1. Train a dense 2-layer MLP on data from a random teacher.
2. kernelkit.nn.replace_linear swaps its nn.Linear layers for MonarchLinear, each projected
   optimally from the trained weight (per-block SVD).
3. Fine-tune the Monarch model for a few steps and report loss, parameters and forward time.

    python -m kernelkit.examples.monarch_mlp [--width 1024] [--nblocks 4] [--steps 200] [--quiet]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn
from tqdm import tqdm

import kernelkit
from kernelkit.monarch import MonarchLinear


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))


def fit(model, x, y, steps, lr, desc, quiet):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in tqdm(range(steps), desc=desc, disable=quiet, leave=False):
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (model(x) - y).pow(2).mean().item()


def fwd_ms(model, x, reps=5):
    with torch.no_grad():
        model(x)
        t = time.perf_counter()
        for _ in range(reps):
            model(x)
    return (time.perf_counter() - t) / reps * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--nblocks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    teacher = mlp(a.width)
    x = torch.randn(a.batch, a.width)
    with torch.no_grad():
        y = teacher(x) + 0.01 * torch.randn(a.batch, a.width)

    dense = mlp(a.width)
    dense_loss = fit(dense, x, y, a.steps, 1e-3, "dense", a.quiet)
    mon = kernelkit.nn.replace_linear(copy.deepcopy(dense), nblocks=a.nblocks)
    layers = [m for m in mon.modules() if isinstance(m, MonarchLinear)]
    with torch.no_grad():
        proj_loss = (mon(x) - y).pow(2).mean().item()
    tuned_loss = fit(mon, x, y, a.steps, 1e-3, "monarch", a.quiet)
    n_dense = sum(p.numel() for p in dense.parameters())
    n_mon = sum(p.numel() for p in mon.parameters())
    print(f"backends: {kernelkit.backends()}")
    print(f"dense MLP        : loss {dense_loss:.4f}, {n_dense:,} params, forward {fwd_ms(dense, x):.2f} ms")
    print(f"monarch, projected: loss {proj_loss:.4f}, {n_mon:,} params ({n_mon / n_dense:.2f}x), "
          f"{len(layers)} layers of nblocks={a.nblocks}")
    print(f"monarch, tuned    : loss {tuned_loss:.4f}, forward {fwd_ms(mon, x):.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
