"""Dense vs Sparse Wide at the same FLOPs (Sparse-IFT), static masks and RigL, on a synthetic task.

Task: 10-way classification of x ~ N(0, I) in 32 dimensions, labelled by the argmax of a random
teacher MLP (32 -> 512 -> 512 -> 10, ReLU), generated locally; 131072 training and 16384 test points.
Models, trained alike (Adam, lr 2e-3 with cosine decay, batches of 256, cross-entropy):

- dense:         MLP 32 -> 128 -> 128 -> 128 -> 10;
- sparse:        the same shape at sparsity s (the baseline: fewer FLOPs), static random masks;
- wide static:   kernelkit.sparse.sparsify_(dense, "wide", s): hidden widths x sqrt(k_s), the first and
                 last layers dense (widened on their hidden side), the sparsity searched so that the
                 forward FLOPs equal the dense model's; static random masks;
- wide RigL:     the same, masks updated by kernelkit.sparse.RigL (delta_t 100, alpha 0.3, t_end 75%).
- wide SET:      the same, masks updated by kernelkit.sparse.SET (delta_t 100, zeta 0.3).

    python -m kernelkit.examples.sparse_ift [--steps 3000] [--sparsity 0.9] [--seed 0] [--threads 1] [--quiet]
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from torch import nn
from tqdm import tqdm

import kernelkit
from kernelkit.sparse import SET, RigL, SparseLinear, forward_flops, sparsify_


def mlp(d_in: int, width: int, classes: int, depth: int = 3) -> nn.Sequential:
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, classes))


def make_task(seed: int, d_in=32, classes=10, n_train=131072, n_test=16384):
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(d_in, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, classes))
    for p in teacher.parameters():
        nn.init.normal_(p, 0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)
    x = torch.randn(n_train + n_test, d_in, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(-1)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


@torch.no_grad()
def evaluate(model, x, y):
    model.eval()
    logits = torch.cat([model(xb) for xb in x.split(4096)])
    model.train()
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


def train(model, data, steps, batch, seed, dst, desc, quiet):
    (x, y), _ = data
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    mask_opt = None
    if dst == "rigl":
        mask_opt = RigL(model, opt, delta_t=100, alpha=0.3, total_steps=steps)
    elif dst == "set":
        mask_opt = SET(model, opt, delta_t=100, zeta=0.3, total_steps=steps,
                       generator=torch.Generator().manual_seed(seed + 7))
    g = torch.Generator().manual_seed(seed + 3)  # the same batches for every model
    t0 = time.perf_counter()
    for _ in tqdm(range(steps), desc=desc, disable=quiet, leave=False):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if mask_opt is not None:
            mask_opt.step()
    return time.perf_counter() - t0, mask_opt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--width", type=int, default=128, help="the dense model's hidden width")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's; these matrices are small, 1 is often fastest)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars, no per-layer report")
    a = ap.parse_args(argv)
    if a.steps <= 0 or a.batch <= 0 or a.width <= 0 or (a.threads is not None and a.threads <= 0):
        ap.error("--steps, --batch, --width and --threads must be positive")
    if a.threads is not None:
        torch.set_num_threads(a.threads)

    data = make_task(a.seed)
    torch.manual_seed(a.seed)
    dense = mlp(32, a.width, 10)
    models = [("dense", dense, None)]
    sparse = copy.deepcopy(dense)
    sparsify_(sparse, "sparse", a.sparsity, generator=torch.Generator().manual_seed(a.seed + 1))
    models.append((f"sparse {a.sparsity:g} (fewer FLOPs)", sparse, None))
    report = None
    for dst in (None, "rigl", "set"):
        wide = copy.deepcopy(dense)
        # the same masks and initial weights for the three wide models: only the training differs
        report = sparsify_(wide, "wide", a.sparsity, generator=torch.Generator().manual_seed(a.seed + 2))
        models.append((f"wide {dst or 'static'}", wide, dst))

    rows = []
    for name, model, dst in models:
        seconds, mask_opt = train(model, data, a.steps, a.batch, a.seed, dst, name, a.quiet)
        tr_loss, tr_acc = evaluate(model, *data[0])
        te_loss, te_acc = evaluate(model, *data[1])
        nnz = sum(m.nnz for m in model.modules() if isinstance(m, SparseLinear))
        nnz += sum(m.weight.numel() for m in model.modules() if type(m) is nn.Linear)
        widths = "-".join(str(m.out_features) for m in model if hasattr(m, "out_features"))
        rows.append((name, widths, sum(p.numel() for p in model.parameters()), nnz, forward_flops(model),
                     tr_loss, te_loss, te_acc, seconds, len(mask_opt.history) if mask_opt else 0))

    if not a.quiet:
        print(report)
        print()
    print(f"backends: {kernelkit.backends()}")
    print(f"task: 10-way teacher-MLP classification, 32-d inputs; {a.steps} steps of batch {a.batch}; "
          f"s = {a.sparsity:g} (k_s = {round(1 / (1 - a.sparsity))}); wide: uniform sparsity after the FLOP "
          f"search {report.sparsity_used:.4f}")
    head = ("model", "widths", "params", "nnz", "fwd MACs/sample", "train loss", "test loss", "test acc",
            "time s", "mask updates")
    cells = [head] + [(r[0], r[1], f"{r[2]:,}", f"{r[3]:,}", f"{r[4]:,}", f"{r[5]:.4f}", f"{r[6]:.4f}",
                       f"{100 * r[7]:.2f}%", f"{r[8]:.1f}", str(r[9])) for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(head))]
    for c in cells:
        print("  ".join(x.ljust(w[i]) if i < 2 else x.rjust(w[i]) for i, x in enumerate(c)))
    rigl_train = report.train_flops(delta_t=100)
    print(f"training MACs/sample/step: dense {3 * report.flops_before:,}, wide static {report.train_flops():,.0f}, "
          f"wide RigL {rigl_train:,.0f} (+{100 * (rigl_train / report.train_flops() - 1):.2f}% for its dense "
          f"gradients)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
