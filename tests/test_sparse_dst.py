"""Dynamic sparse training (kernelkit.sparse.dst): RigL's and SET's mask updates checked entry by entry
against an independent computation (the drop set, the regrown set, the values, the optimizer state
of SGD-momentum and Adam), the schedule, when the dense gradient is captured, checkpoints, bad
arguments, and RigL training a 90%-sparse Sparse-Wide MLP to the dense model's loss."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kernelkit.sparse import SET, RigL, SparseLinear, SparseParallelLinear, mask_from_scores, remap_state, sparsify_


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _layer(n_out=24, n_in=40, sparsity=0.8, seed=0, dtype=torch.float64):
    g = _gen(seed)
    mask = mask_from_scores(torch.rand(n_out, n_in, generator=g), sparsity)
    layer = SparseLinear(n_in, n_out, mask=mask, dtype=dtype)
    with torch.no_grad():
        layer.values.copy_(torch.randn(layer.nnz, generator=g, dtype=dtype))
    return layer


def _entries(layer):
    """{(row, col): CSR position} of a layer's nonzeros."""
    flat = layer.layout.flat_index().tolist()
    return {divmod(f, layer.in_features): k for k, f in enumerate(flat)}


def _train_step(layer, opt, x, target):
    loss = (layer(x) - target).pow(2).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _dense_grad_reference(layer_values, layer, x, target):
    """dL/dW of L = ||x W^T + b - target||^2 with W dense (float64 autograd): what RigL must rank."""
    w = layer.layout.to_dense(layer_values.detach()).clone().requires_grad_()
    loss = (x @ w.T + layer.bias.detach() - target).pow(2).sum()
    loss.backward()
    return w.grad


# ---- schedule ---------------------------------------------------------------------------------------------

def test_rigl_drop_fraction_is_the_cosine_schedule():
    layer = _layer()
    rigl = RigL(layer, torch.optim.SGD(layer.parameters(), lr=0.1), alpha=0.3, t_end=1000)
    assert rigl.drop_fraction(0) == pytest.approx(0.3)
    assert rigl.drop_fraction(250) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert rigl.drop_fraction(500) == pytest.approx(0.15)
    assert rigl.drop_fraction(900) == pytest.approx(0.15 * (1 + math.cos(0.9 * math.pi)))
    assert rigl.drop_fraction(1000) == 0.0 and rigl.drop_fraction(5000) == 0.0
    other = _layer()
    rigl = RigL(other, torch.optim.SGD(other.parameters(), lr=0.1), total_steps=1000)
    assert rigl.t_end == 750 and rigl.delta_t == 100 and rigl.alpha == 0.3  # the defaults


def test_rigl_updates_every_delta_t_steps_until_t_end_and_never_after():
    torch.manual_seed(0)
    layer = _layer(sparsity=0.7, dtype=torch.float32)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    rigl = RigL(layer, opt, delta_t=5, t_end=23)
    x, y = torch.randn(16, 40), torch.randn(16, 24)
    masks, updated = [], []
    for _ in range(40):
        _train_step(layer, opt, x, y)
        updated.append(rigl.step())
        masks.append(layer.mask.clone())
        assert layer.nnz == round(0.3 * 24 * 40)  # exact sparsity after every step
    assert [t + 1 for t, u in enumerate(updated) if u] == [5, 10, 15, 20]
    assert [u.step for u in rigl.history] == [5, 10, 15, 20]
    assert all(not torch.equal(masks[t - 2], masks[t - 1]) for t in (5, 10, 15, 20))  # it did change them
    assert all(torch.equal(masks[19], m) for m in masks[20:])  # nothing after t_end
    assert [u.fraction for u in rigl.history] == pytest.approx([0.15 * (1 + math.cos(math.pi * t / 23))
                                                                for t in (5, 10, 15, 20)])


def test_rigl_captures_the_dense_gradient_only_before_an_update():
    layer = _layer(dtype=torch.float32)
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    rigl = RigL(layer, opt, delta_t=4, t_end=100)
    x, y = torch.randn(8, 40), torch.randn(8, 24)
    armed = []
    for _ in range(9):
        armed.append(layer._dense_grad_hook is not None)
        _train_step(layer, opt, x, y)
        rigl.step()
    # armed during steps 4 and 8 (the forward/backward before the updates after them)
    assert armed == [False, False, False, True, False, False, False, True, False]
    rigl.detach()
    assert layer._dense_grad_hook is None


# ---- RigL: one update checked entry by entry ------------------------------------------------------------

@pytest.mark.parametrize("optim", ["sgd_momentum", "adam"])
def test_rigl_update_drops_smallest_regrows_top_gradient_and_resets_state(optim):
    torch.manual_seed(0)
    layer = _layer(sparsity=0.8)
    if optim == "adam":
        opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
        keys = ["exp_avg", "exp_avg_sq"]
    else:
        opt = torch.optim.SGD(layer.parameters(), lr=1e-2, momentum=0.9)
        keys = ["momentum_buffer"]
    rigl = RigL(layer, opt, delta_t=3, alpha=0.3, t_end=100)
    x, y = torch.randn(32, 40, dtype=torch.float64), torch.randn(32, 24, dtype=torch.float64)
    for _ in range(2):
        _train_step(layer, opt, x, y)
        assert not rigl.step()
    # step 3: remember what the update must see, then run it
    values_before_step = layer.values.detach().clone()
    grad_ref = _dense_grad_reference(values_before_step, layer, x, y)
    _train_step(layer, opt, x, y)
    old = _entries(layer)
    old_vals = layer.values.detach().clone()
    old_state = {k: opt.state[layer.values][k].clone() for k in keys}
    step_state = opt.state[layer.values].get("step")
    step_state = None if step_state is None else step_state.clone()
    nnz = layer.nnz
    assert rigl.step()

    n = int(0.15 * (1 + math.cos(math.pi * 3 / 100)) * nnz)
    assert n > 0 and layer.nnz == nnz
    by_mag = sorted(old, key=lambda rc: abs(old_vals[old[rc]].item()))
    want_dropped = set(by_mag[:n])
    inactive = [(r, c) for r in range(24) for c in range(40) if (r, c) not in old]
    want_grown = set(sorted(inactive, key=lambda rc: -abs(grad_ref[rc].item()))[:n])
    new = _entries(layer)
    assert set(old) - set(new) == want_dropped
    assert set(new) - set(old) == want_grown
    rec = rigl.history[-1].layers[""]
    assert sorted(rec.dropped.tolist()) == sorted(r * 40 + c for r, c in want_dropped)
    assert sorted(rec.grown.tolist()) == sorted(r * 40 + c for r, c in want_grown)
    for rc, k in new.items():
        st = opt.state[layer.values]
        if rc in want_grown:
            assert layer.values[k] == 0
            assert all(st[key][k] == 0 for key in keys)
        else:
            assert layer.values[k] == old_vals[old[rc]]
            assert all(st[key][k] == old_state[key][old[rc]] for key in keys)
    if step_state is not None:
        assert torch.equal(opt.state[layer.values]["step"], step_state)
    assert layer.values.grad is None
    # and training goes on with the new mask
    _train_step(layer, opt, x, y)
    assert torch.isfinite(layer.values).all()


def test_rigl_sums_the_dense_gradient_over_accumulation_steps_and_handles_3d_inputs():
    torch.manual_seed(1)
    layer = _layer(n_out=6, n_in=10, sparsity=0.6)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)  # lr 0: the values stay put, only the mask moves
    rigl = RigL(layer, opt, delta_t=1, alpha=0.5, t_end=10)
    x1, x2 = torch.randn(2, 3, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    y1, y2 = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    g = (_dense_grad_reference(layer.values, layer, x1.reshape(-1, 10), y1.reshape(-1, 6))
         + _dense_grad_reference(layer.values, layer, x2, y2))
    old = _entries(layer)
    opt.zero_grad()
    (layer(x1) - y1).pow(2).sum().backward()
    (layer(x2) - y2).pow(2).sum().backward()
    opt.step()
    rigl.step()
    n = int(0.25 * (1 + math.cos(math.pi / 10)) * len(old))
    inactive = [(r, c) for r in range(6) for c in range(10) if (r, c) not in old]
    assert set(_entries(layer)) - set(old) == set(sorted(inactive, key=lambda rc: -abs(g[rc].item()))[:n])


def test_rigl_caps_the_drop_count_at_the_inactive_positions():
    layer = _layer(n_out=10, n_in=10, sparsity=0.1)  # 90 active, 10 inactive, f = 0.3 would drop 26
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    rigl = RigL(layer, opt, delta_t=1, t_end=1000)
    _train_step(layer, opt, torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64))
    before = layer.mask.clone()
    rigl.step()
    assert layer.nnz == 90 and (before & ~layer.mask).sum() == 10 and (layer.mask & ~before).sum() == 10


def test_rigl_without_a_forward_before_the_update_says_so():
    layer = _layer()
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    rigl = RigL(layer, opt, delta_t=1, t_end=10)
    with pytest.raises(RuntimeError, match="no dense gradient"):
        rigl.step()


def test_rigl_finds_every_sparse_matrix_of_a_model():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), SparseParallelLinear(16, 16, 3, 0.75, norm=None),
                          nn.ReLU(), SparseLinear(16, 4, sparsity=0.5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rigl = RigL(model, opt, delta_t=2, t_end=10)
    assert [n for n, _ in rigl.layers] == ["2.branches.0", "2.branches.1", "2.branches.2", "4"]
    x, y = torch.randn(8, 8), torch.randn(8, 4)
    nnz = [m.nnz for _, m in rigl.layers]
    for _ in range(4):
        _train_step(model, opt, x, y)
        rigl.step()
    assert len(rigl.history) == 2 and [m.nnz for _, m in rigl.layers] == nnz
    assert all(u.dropped.numel() == u.grown.numel() > 0 for u in rigl.history[0].layers.values())


def test_rigl_state_dict_round_trip():
    layer = _layer(dtype=torch.float32)
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    a = RigL(layer, opt, delta_t=3, t_end=100)
    x, y = torch.randn(4, 40), torch.randn(4, 24)
    for _ in range(2):
        _train_step(layer, opt, x, y)
        a.step()
    state = a.state_dict()
    a.detach()
    b = RigL(layer, opt, delta_t=3, t_end=100)
    b.load_state_dict(state)
    assert b.t == 2 and layer._dense_grad_hook is not None  # step 3 is next: armed
    _train_step(layer, opt, x, y)
    assert b.step()


# ---- SET ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("optim", ["sgd_momentum", "adam"])
def test_set_drops_smallest_positives_and_largest_negatives_and_regrows_randomly(optim):
    torch.manual_seed(0)
    layer = _layer(sparsity=0.8)
    if optim == "adam":
        opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
        keys = ["exp_avg", "exp_avg_sq"]
    else:
        opt = torch.optim.SGD(layer.parameters(), lr=1e-2, momentum=0.9)
        keys = ["momentum_buffer"]
    x, y = torch.randn(16, 40, dtype=torch.float64), torch.randn(16, 24, dtype=torch.float64)
    set_ = SET(layer, opt, delta_t=2, zeta=0.3, generator=_gen(7))
    _train_step(layer, opt, x, y)
    assert not set_.step()
    _train_step(layer, opt, x, y)
    with torch.no_grad():  # exact zeros count with the positives (the smallest of them)
        layer.values[:5] = 0.0
    old = _entries(layer)
    old_vals = layer.values.detach().clone()
    old_state = {k: opt.state[layer.values][k].clone() for k in keys}
    nnz = layer.nnz
    assert set_.step()

    pos = [rc for rc in old if old_vals[old[rc]] >= 0]
    neg = [rc for rc in old if old_vals[old[rc]] < 0]
    n_pos, n_neg = int(0.3 * len(pos)), int(0.3 * len(neg))
    want = (set(sorted(pos, key=lambda rc: old_vals[old[rc]].item())[:n_pos])
            | set(sorted(neg, key=lambda rc: -old_vals[old[rc]].item())[:n_neg]))
    new = _entries(layer)
    assert layer.nnz == nnz
    assert set(old) - set(new) == want
    assert {rc for rc in old if old_vals[old[rc]] == 0} <= want  # the zeros went first
    grown = set(new) - set(old)
    assert len(grown) == n_pos + n_neg
    bound = 1 / math.sqrt(40)
    for rc, k in new.items():
        st = opt.state[layer.values]
        if rc in grown:
            assert 0 < abs(layer.values[k]) <= bound  # fresh U(+-1/sqrt(in)) init
            assert all(st[key][k] == 0 for key in keys)
        else:
            assert layer.values[k] == old_vals[old[rc]]
            assert all(st[key][k] == old_state[key][old[rc]] for key in keys)


def test_set_regrowth_is_random_over_inactive_positions_and_reproducible():
    def run(seed):
        layer = _layer(sparsity=0.9, seed=3)
        opt = torch.optim.SGD(layer.parameters(), lr=0.0)
        s = SET(layer, opt, delta_t=1, generator=_gen(seed))
        before = layer.mask.clone()
        n = int(0.3 * int((layer.values >= 0).sum())) + int(0.3 * int((layer.values < 0).sum()))
        s.step()
        return before, layer.mask.clone(), layer.values.detach().clone(), n

    b1, m1, v1, n = run(1)
    _, m2, v2, _ = run(1)
    _, m3, _, _ = run(2)
    assert torch.equal(m1, m2) and torch.equal(v1, v2)  # the generator decides everything
    assert not torch.equal(m1, m3)
    # as many positions left as arrived: no dropped weight came straight back (only inactive ones grow)
    assert int((b1 & ~m1).sum()) == int((m1 & ~b1).sum()) == n > 0


def test_set_never_ends_unless_told():
    layer = _layer(dtype=torch.float32)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    s = SET(layer, opt, delta_t=1)
    assert all(s.step() for _ in range(5)) and s.drop_fraction(10**6) == 0.3
    s = SET(layer, opt, delta_t=1, t_end=3, generator=_gen())
    assert [s.step() for _ in range(5)] == [True, True, False, False, False]


# ---- remap_state ----------------------------------------------------------------------------------------------

def test_remap_state_moves_kept_entries_and_zeroes_new_ones():
    p = nn.Parameter(torch.zeros(4))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.tensor([1.0, 2.0, 3.0, 4.0])
    opt.step()
    ea, step = opt.state[p]["exp_avg"].clone(), opt.state[p]["step"].clone()
    assert remap_state(opt, p, torch.tensor([2, -1, 0, 3])) == 2
    assert torch.equal(opt.state[p]["exp_avg"], torch.stack([ea[2], torch.tensor(0.0), ea[0], ea[3]]))
    assert torch.equal(opt.state[p]["step"], step)
    assert remap_state(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1), p, torch.tensor([0, 1, 2, 3])) == 0
    with pytest.raises(ValueError, match="src"):
        remap_state(opt, p, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="src entries"):
        remap_state(opt, p, torch.tensor([0, 1, 2, 4]))


# ---- bad arguments -----------------------------------------------------------------------------------------

def test_dynamic_sparsity_rejects_bad_arguments():
    layer = _layer()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="t_end.*total_steps"):
        RigL(layer, opt)
    with pytest.raises(ValueError, match="not both"):
        RigL(layer, opt, t_end=10, total_steps=100)
    for kw, what in (({"delta_t": 0}, "delta_t"), ({"delta_t": 2.5}, "delta_t"), ({"alpha": 1.5}, "alpha"),
                     ({"alpha": 0}, "alpha"), ({"t_end": -3}, "t_end")):
        with pytest.raises(ValueError, match=what):
            RigL(layer, opt, **{"t_end": 10, **kw})
    with pytest.raises(ValueError, match="total_steps"):
        RigL(layer, opt, total_steps=0)
    with pytest.raises(ValueError, match="zeta"):
        SET(layer, opt, zeta=1.0)
    with pytest.raises(TypeError, match="optimizer"):
        RigL(layer, "sgd", t_end=10)
    with pytest.raises(ValueError, match="does not hold the values"):
        RigL(layer, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), t_end=10)
    with pytest.raises(TypeError, match="SparseLinear"):
        RigL([layer, nn.Linear(2, 2)], opt, t_end=10)
    with pytest.raises(ValueError, match="no SparseLinear"):
        RigL(nn.Sequential(nn.Linear(2, 2)), opt, t_end=10)
    with pytest.raises(TypeError, match="generator"):
        SET(layer, opt, generator=1)
    RigL(layer, opt, t_end=10, delta_t=1)
    with pytest.raises(ValueError, match="already has a _dense_grad_hook"):
        RigL(layer, opt, t_end=10)


# ---- RigL trains a 90%-sparse Sparse-Wide MLP to the dense model's loss ----------------------------------

def test_rigl_sparse_wide_mlp_matches_dense_loss_at_90_percent():
    """Teacher-student regression.  Teacher: a random MLP 32 -> 256 -> 256 -> 8 (ReLU, weights
    N(0, 1/fan_in)); 1024 training inputs x ~ N(0, I), 4096 held out.  Students (same seeds, full
    batch, Adam lr 3e-3 with cosine decay, 1000 steps):
      * dense: 32 -> 32 -> 32 -> 8;
      * Sparse Wide at s = 0.9 (all three layers sparse): hidden width int(32 sqrt(10)) = 101, the
        uniform sparsity searched to the dense FLOPs (about 0.85), trained with RigL (delta_t = 100,
        alpha = 0.3, t_end = 750);
      * control: the dense student's shape at 90% sparsity (static), a tenth of the FLOPs.
    The RigL student must reach a training and a held-out loss within 10% of the dense student's
    (measured: 0.85-0.92x train, 0.92-0.98x held out over four seeds); the control must not (it is
    ~4x train, ~1.6-2x held out), which shows the comparison can fail.  Small matrices: one thread is
    faster than several here, so the test pins one (about 15 s on the cpu backend, 40 s on torch)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_teacher_student()
    finally:
        torch.set_num_threads(threads)


def _run_teacher_student():
    d_in, d_out, steps = 32, 8, 1000

    def mlp(h):
        return nn.Sequential(nn.Linear(d_in, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d_out))

    g = _gen(0)
    teacher = mlp(256)
    for p in teacher.parameters():
        nn.init.normal_(p, 0.0, 1.0 / p.shape[-1] ** 0.5, generator=g)
    x, x_test = torch.randn(1024, d_in, generator=g), torch.randn(4096, d_in, generator=g)
    with torch.no_grad():
        y, y_test = teacher(x), teacher(x_test)

    def train(model, dst=None):
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
        rigl = RigL(model, opt, delta_t=100, alpha=0.3, total_steps=steps) if dst else None
        for _ in range(steps):
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if rigl is not None:
                rigl.step()
        with torch.no_grad():
            return (model(x) - y).pow(2).mean().item(), (model(x_test) - y_test).pow(2).mean().item(), rigl

    torch.manual_seed(1)
    dense = mlp(32)
    wide, control = mlp(32), mlp(32)
    rep = sparsify_(wide, "wide", 0.9, dense_first_last=False, generator=_gen(2))
    sparsify_(control, "sparse", 0.9, dense_first_last=False, generator=_gen(2))
    assert abs(rep.deviation) < 1e-3 and rep.layers[1].shape_after == (101, 101)
    nnz = [m.nnz for m in wide if isinstance(m, SparseLinear)]

    d_train, d_test, _ = train(dense)
    r_train, r_test, rigl = train(wide, dst=True)
    c_train, c_test, _ = train(control)
    assert len(rigl.history) == 7  # steps 100, ..., 700 (t_end = 750)
    assert [m.nnz for m in wide if isinstance(m, SparseLinear)] == nnz
    msg = (f"dense {d_train:.4f}/{d_test:.4f}, RigL wide {r_train:.4f}/{r_test:.4f}, "
           f"static narrow 90% {c_train:.4f}/{c_test:.4f} (train/held out)")
    assert r_train <= 1.1 * d_train and r_test <= 1.1 * d_test, msg
    assert c_train > 1.1 * d_train and c_test > 1.1 * d_test, msg
