"""The M-FAC optimizer (kernelkit.mfac.optim.MFAC): the paper's steps (against
kernelkit.mfac.reference.PaperWindow + mfac_step_reference in float64), the window before it fills, the
bfloat16 buffer, training a small model, the state_dict round trip, bad arguments, NaN gradients."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernelkit.mfac import reference as R
from kernelkit.mfac.optim import MFAC
from helpers import rel_err


def _flat(ps):
    return torch.cat([p.detach().reshape(-1) for p in ps])


# ---- the paper's steps -------------------------------------------------------------------------------
CASES = {
    "plain": dict(momentum=0.0, weight_decay=0.0, groups=False, nograd=False),
    "momentum_wd": dict(momentum=0.9, weight_decay=0.05, groups=False, nograd=False),
    "two_groups": dict(momentum=0.5, weight_decay=0.01, groups=True, nograd=False),
    "nograd_param": dict(momentum=0.5, weight_decay=0.0, groups=True, nograd=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mfac_steps_match_paper(case):
    """Step for step equal to the published algorithm (PaperWindow, float64) on the same gradients:
    m = 4 over 11 steps, so the window fills, wraps and replaces."""
    c = CASES[case]
    torch.manual_seed(0)
    sizes, lrs = [(3, 4), (5,), (2, 3)], [0.1, 0.03, 0.1]
    ps = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in sizes]
    if c["groups"]:
        opt = MFAC([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.03}], lr=0.1, ngrads=4, damp=1e-2,
                   momentum=c["momentum"], weight_decay=c["weight_decay"])
        lrs = [0.1, 0.1, 0.03]
    else:
        opt = MFAC(ps, lr=0.1, ngrads=4, damp=1e-2, momentum=c["momentum"], weight_decay=c["weight_decay"])
        lrs = [0.1, 0.1, 0.1]
    d = sum(p.numel() for p in ps)
    lr_vec = torch.cat([torch.full((p.numel(),), lr, dtype=torch.float64) for p, lr in zip(ps, lrs)])
    paper = R.PaperWindow(d, 4, 1e-2, dtype=torch.float64)
    w, buf, worst = _flat(ps).clone(), None, 0.0
    for step in range(11):
        grads = [torch.randn_like(p) for p in ps]
        if c["nograd"]:
            grads[1] = torch.zeros_like(ps[1])     # the reference's view of a parameter without .grad
        for i, (p, g) in enumerate(zip(ps, grads)):
            p.grad = None if (c["nograd"] and i == 1) else g.clone()
        opt.step()
        # the reference with lr 1 gives the direction; each group's lr scales its slice
        w1 = w.clone()
        buf = R.mfac_step_reference(paper, (w1, torch.cat([g.reshape(-1) for g in grads])), 1.0, c["momentum"],
                                    c["weight_decay"], buf)
        w = w - lr_vec * (w - w1)
        err = rel_err(_flat(ps), w)
        worst = max(worst, err)
    print(f"\n{case}: worst relative difference from the paper over 11 steps {worst:.2e}")
    assert worst < 1e-9, f"{case}: differs from the paper's steps by {worst:.2e}"
    if c["nograd"]:
        assert opt.window.G.shape[1] == d


def test_mfac_window_before_it_fills_keeps_one_over_m():
    """Two steps into an m = 8 window, the step is the explicit (damp I + G^T G / 8)^-1 g with six zero
    rows in G (not a 1/2)."""
    torch.manual_seed(1)
    p = torch.randn(6, dtype=torch.float64, requires_grad=True)
    opt = MFAC([p], lr=1.0, ngrads=8, damp=0.1)
    G = torch.zeros(8, 6, dtype=torch.float64)
    for k in range(2):
        g = torch.randn(6, dtype=torch.float64)
        G[k] = g
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        want = R.ihvp_explicit(G, 0.1, g)
        assert rel_err(before - p.detach(), want) < 1e-12
        half = R.ihvp_explicit(G[:k + 1], 0.1, g)            # what a 1/(k+1) would give
        assert rel_err(before - p.detach(), half) > 1e-3


def test_mfac_bf16_buffer_steps_close_to_f32():
    torch.manual_seed(2)
    p32 = torch.randn(300, requires_grad=True)
    p16 = p32.detach().clone().requires_grad_()
    o32 = MFAC([p32], lr=0.01, ngrads=8, damp=1e-3)
    o16 = MFAC([p16], lr=0.01, ngrads=8, damp=1e-3, buffer_dtype=torch.bfloat16)
    start = p32.detach().clone()
    for _ in range(12):
        g = torch.randn(300)
        p32.grad, p16.grad = g.clone(), g.clone()
        o32.step()
        o16.step()
    assert o16.window.G.dtype == torch.bfloat16 and o32.window.G.dtype == torch.float32
    err = rel_err(p16.detach() - start, p32.detach() - start)
    assert err < 2e-2, f"bf16 buffer: the summed steps differ from float32's by {err:.2e}"


def test_mfac_float64_params_get_a_float64_buffer():
    p = torch.randn(5, dtype=torch.float64, requires_grad=True)
    opt = MFAC([p], lr=0.1, ngrads=2, buffer_dtype=torch.bfloat16)
    p.grad = torch.randn(5, dtype=torch.float64)
    opt.step()
    assert opt.window.G.dtype == torch.float64


# ---- training ---------------------------------------------------------------------------------------
def _task():
    g = torch.Generator().manual_seed(0)
    n, din, k = 1024, 16, 4
    scale = torch.logspace(0, 1, din)
    X = torch.randn(n, din, generator=g) * scale
    W = torch.randn(din, k, generator=g) / scale[:, None]
    y = (X @ W + 0.3 * torch.randn(n, k, generator=g)).argmax(1)
    return X, y


def _train(make, X, y, steps):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(X.shape[1], 32), nn.Tanh(), nn.Linear(32, int(y.max()) + 1))
    opt = make(model.parameters())
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (64,), generator=g)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), y[idx])
            loss.backward()
            return loss
        try:
            opt.step(closure)
        except ValueError:   # a diverged run (non-finite gradient): MFAC refuses the step
            return math.inf
    with torch.no_grad():
        return F.cross_entropy(model(X), y).item()


def test_mfac_trains_better_than_sgd():
    """A small MLP on a synthetic 4-class task (inputs scaled over a decade), 80 steps of batch 64; each
    optimizer gets the same lr budget (the best of 3 lrs, a factor 3 apart, bracketing its optimum).
    MFAC's best full-data loss is below half the initial one and below SGD's best."""
    X, y = _task()
    with torch.no_grad():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
        start = F.cross_entropy(model(X), y).item()
    steps = 80
    sgd = {lr: _train(lambda p: torch.optim.SGD(p, lr), X, y, steps) for lr in (0.1, 0.3, 1.0)}
    mfac = {lr: _train(lambda p: MFAC(p, lr, ngrads=32, damp=1e-4), X, y, steps) for lr in (3e-3, 1e-2, 3e-2)}
    print(f"\nstart {start:.4f}; SGD {sgd}; MFAC {mfac}")
    best_sgd, best_mfac = min(sgd.values()), min(mfac.values())
    assert best_mfac < 0.5 * start
    assert best_mfac < best_sgd, f"MFAC {best_mfac:.4f} >= SGD {best_sgd:.4f}"


# ---- state ------------------------------------------------------------------------------------------
def _model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _steps(model, opt, batches):
    for X, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()


def test_mfac_state_dict_round_trip_resumes_bit_identically():
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(14)]
    model = _model()
    kw = dict(lr=0.01, ngrads=5, damp=1e-3, momentum=0.9, weight_decay=1e-3, refresh=3)
    opt = MFAC(model.parameters(), **kw)
    _steps(model, opt, batches[:7])                     # k = 7: the window has wrapped and rebuilt
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _steps(model, opt, batches[7:])
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model2 = _model()
    model2.load_state_dict(saved["model"])
    opt2 = MFAC(model2.parameters(), **kw)
    opt2.load_state_dict(saved["opt"])
    assert opt2.window.count == 7 and opt2.window.slot == 2
    _steps(model2, opt2, batches[7:])
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    w1, w2 = opt.state_dict()["mfac"], opt2.state_dict()["mfac"]
    assert torch.equal(w1["momentum"], w2["momentum"])
    for key in ("G", "gram", "kinv"):
        assert torch.equal(w1["window"][key], w2["window"][key]), key


def test_mfac_load_rejects_another_configuration():
    model = _model()
    opt = MFAC(model.parameters(), lr=0.01, ngrads=5)
    _steps(model, opt, [(torch.randn(4, 6), torch.randint(0, 3, (4,)))])
    sd = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="ngrads"):
        MFAC(_model().parameters(), lr=0.01, ngrads=6).load_state_dict(sd)
    with pytest.raises(ValueError, match="float32"):
        MFAC(_model().parameters(), lr=0.01, ngrads=5, buffer_dtype=torch.bfloat16).load_state_dict(sd)
    with pytest.raises(ValueError, match="'mfac'"):
        MFAC(_model().parameters(), lr=0.01, ngrads=5).load_state_dict(torch.optim.SGD(_model().parameters(),
                                                                                        0.1).state_dict())


# ---- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, exc, word", [
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(ngrads=0), ValueError, "ngrads"),
    (dict(ngrads=2.5), TypeError, "ngrads"),
    (dict(damp=0.0), ValueError, "damp"),
    (dict(momentum=1.0), ValueError, "momentum"),
    (dict(momentum=-0.1), ValueError, "momentum"),
    (dict(weight_decay=-1e-3), ValueError, "weight_decay"),
    (dict(buffer_dtype=torch.float16), TypeError, "buffer_dtype"),
    (dict(refresh=-1), ValueError, "refresh"),
])
def test_mfac_rejects_bad_arguments(kw, exc, word):
    args = dict(lr=0.1) | kw
    with pytest.raises(exc, match=word):
        MFAC([torch.zeros(3, requires_grad=True)], **args)


@pytest.mark.parametrize("key, value", [("momentum", 0.5), ("weight_decay", 0.1), ("damp", 1e-3), ("ngrads", 4)])
def test_mfac_groups_may_differ_only_in_lr(key, value):
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=key):
        MFAC([{"params": [a]}, {"params": [b], key: value}], lr=0.1, ngrads=8)


def test_mfac_nan_gradient_rejected_nothing_changed():
    model = _model()
    opt = MFAC(model.parameters(), lr=0.01, ngrads=4, damp=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(5)
    _steps(model, opt, [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)])
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(8, 6, generator=g)), torch.randint(0, 3, (8,), generator=g)).backward()
    model[2].weight.grad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite gradient.*param_groups\[0\]\['params'\]\[2\]"):
        opt.step()
    after = (model.state_dict(), opt.state_dict())
    for k, v in before[0].items():
        assert torch.equal(v, after[0][k]), k
    m0, m1 = before[1]["mfac"], after[1]["mfac"]
    assert torch.equal(m0["momentum"], m1["momentum"])
    for key in ("G", "gram", "kinv", "slot", "count", "since_rebuild"):
        a, b = m0["window"][key], m1["window"][key]
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key
