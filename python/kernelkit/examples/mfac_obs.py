"""M-FAC on a small MLP: train with the M-FAC optimizer against SGD-momentum and Adam, then prune with OBS.

Part 1, training.  A seeded synthetic classification task (inputs with scales spread over a decade,
labels from a random teacher MLP plus noise) and a 2-hidden-layer MLP; each optimizer runs the same
number of steps from the same initialisation on the same batches.  Printed: train loss, test loss and
accuracy, and time per step (MFAC: the sliding window's update + IHVP inside it).

Part 2, pruning without retraining.  The best-trained model (lowest test loss) is pruned with
kernelkit.mfac.OBSPruner (OBS scores w^2 / (2 [F^-1]_qq) and the OBS weight update, the Fisher from
``--ngrads`` gradients, block-diagonal over ``--block`` coordinates, ``--nrecomps`` re-estimations) and
with global magnitude pruning at 50 / 75 / 90 % of the Linear weights.  Printed: test loss and accuracy
of both, and the pruner's time split (gradients, static setup, scores, update).

    python -m kernelkit.examples.mfac_obs [--steps 400] [--ngrads 64] [--window 32] [--seed 0] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from kernelkit.mfac.optim import MFAC
from kernelkit.mfac.prune import OBSPruner, magnitude_masks


def task(n: int, din: int, classes: int, seed: int):
    """Train / test splits of a seeded synthetic task: a random tanh teacher on scaled Gaussian inputs."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, 1, din)
    X = torch.randn(2 * n, din, generator=g) * scale
    W1 = torch.randn(din, 32, generator=g) / (scale[:, None] * din ** 0.5)
    W2 = torch.randn(32, classes, generator=g)
    logits = torch.tanh(X @ W1 * 2) @ W2 + 0.3 * torch.randn(2 * n, classes, generator=g)
    y = logits.argmax(1)
    return (X[:n], y[:n]), (X[n:], y[n:])


def mlp(din: int, hidden: int, classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(din, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


@torch.no_grad()
def evaluate(model: nn.Module, data) -> tuple[float, float]:
    X, y = data
    out = model(X)
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def train(name: str, make, model: nn.Module, train_data, steps: int, batch: int, seed: int):
    X, y = train_data
    opt = make(model.parameters())
    g = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (batch,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4096, help="training (and test) examples")
    ap.add_argument("--din", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--window", type=int, default=32, help="MFAC ngrads (the window size m)")
    ap.add_argument("--ngrads", type=int, default=64, help="OBS gradients per Fisher estimate")
    ap.add_argument("--block", type=int, default=128, help="OBS block size (0 = the full Fisher)")
    ap.add_argument("--nrecomps", type=int, default=8, help="re-estimations per pruning (the paper: 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a small, fast run (the tests)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.din, args.hidden, args.steps, args.window, args.ngrads, args.nrecomps = 256, 8, 16, 30, 8, 8, 1
    train_data, test_data = task(args.n, args.din, args.classes, args.seed)
    init = mlp(args.din, args.hidden, args.classes, args.seed)
    d = sum(p.numel() for p in init.parameters())

    optimizers = {
        "MFAC": lambda p: MFAC(p, lr=1e-2, ngrads=args.window, damp=1e-4),
        "SGD-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        "Adam": lambda p: torch.optim.Adam(p, lr=3e-3),
    }
    print(f"Part 1: {args.steps} steps of batch {args.batch}, MLP {args.din}-{args.hidden}-{args.hidden}-"
          f"{args.classes} (d = {d}), MFAC window m = {args.window}")
    print(f"{'optimizer':<14} {'train loss':>10} {'test loss':>10} {'test acc':>9} {'ms/step':>8}")
    models, results = {}, {"train": {}, "prune": {}}
    for name, make in optimizers.items():
        model = copy.deepcopy(init)
        per_step = train(name, make, model, train_data, args.steps, args.batch, args.seed)
        tr, _ = evaluate(model, train_data)
        te, acc = evaluate(model, test_data)
        models[name] = model
        results["train"][name] = {"train_loss": tr, "test_loss": te, "test_acc": acc, "ms_per_step": per_step * 1e3}
        print(f"{name:<14} {tr:>10.4f} {te:>10.4f} {acc:>9.3f} {per_step * 1e3:>8.2f}")

    best = min(results["train"], key=lambda k: results["train"][k]["test_loss"])
    base = models[best]
    te, acc = evaluate(base, test_data)
    X, y = train_data
    batches = [(X[i:i + 32], y[i:i + 32]) for i in range(0, X.shape[0], 32)]
    loss_fn = lambda model, b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    block = args.block or None
    print(f"\nPart 2: pruning the {best}-trained model (test loss {te:.4f}, acc {acc:.3f}) without retraining; "
          f"OBS with {args.ngrads} gradients, block {block}, {args.nrecomps} recomputation(s)")
    print(f"{'sparsity':>8} {'magnitude loss':>14} {'acc':>6} {'OBS loss':>9} {'acc':>6} "
          f"{'grads s':>8} {'setup s':>8} {'score s':>8} {'update s':>8}")
    for sparsity in (0.5, 0.75, 0.9):
        mag = copy.deepcopy(base)
        masks = magnitude_masks(mag, sparsity)
        with torch.no_grad():
            for name, p in mag.named_parameters():
                if name in masks:
                    p.mul_(masks[name])
        obs = copy.deepcopy(base)
        pruner = OBSPruner(obs, ngrads=args.ngrads, damp=1e-4, block_size=block, progress=False)
        pruner.prune(sparsity, batches, loss_fn, nrecomps=args.nrecomps)
        ml, ma = evaluate(mag, test_data)
        ol, oa = evaluate(obs, test_data)
        s = pruner.stats
        results["prune"][sparsity] = {"magnitude_loss": ml, "magnitude_acc": ma, "obs_loss": ol, "obs_acc": oa,
                                      **{f"{k}_s": v for k, v in s.items()}}
        print(f"{sparsity:>8.2f} {ml:>14.4f} {ma:>6.3f} {ol:>9.4f} {oa:>6.3f} {s['gradients']:>8.3f} "
              f"{s['setup']:>8.3f} {s['scores']:>8.3f} {s['update']:>8.3f}")
    return results


if __name__ == "__main__":
    main()
