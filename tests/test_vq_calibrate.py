"""VQ4DiT zero-data calibration (kernelkit.vq.calibrate) on a small DiT (kernelkit.examples.vq4dit).

The figure (issue 7, section 4): calibrated 2-bit block outputs have >= 20% lower MSE than k-means-only
2-bit at the same bits, measured on a held-out teacher trajectory.  Then the pieces: candidates and
ratio init, the soft weight, locking, the hard switch (and that codebooks train only after it), the
regulariser and its running-minimum rule, reproducibility, valid codes and unchanged bits afterwards.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernelkit.examples.vq4dit import DDPM, TinyDiT, teacher_trajectory
from kernelkit.vq import VQLinear, quantize_
from kernelkit.vq.calibrate import CalibrationReport, SoftVQLinear, block_mse, calibrate, default_blocks

CLASSES = 4
STEPS = 50  # DDPM sampling steps per trajectory


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these matrices are tiny, and on a shared 2-core machine OpenMP's team of 2
    spends most of its time waiting (10-15x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dit(one_thread):
    """A random-init TinyDiT (hidden 64, 3 blocks, 4x4 patches of 4x16x16 latents), its 2-bit k-means
    copy (preset "dit": the 15 Linear layers of the blocks, d = 4, K = 256), the calibration trajectory
    (2 teacher trajectories of 50 steps, batch 4 + CFG) and a held-out one (another seed)."""
    torch.manual_seed(0)
    fp = TinyDiT(hidden=64, depth=3, heads=4, num_classes=CLASSES, init="random").eval()
    q = copy.deepcopy(fp)
    quantize_(q, bits=2, preset="dit", iters=30, seed=0, progress=False)
    cal = teacher_trajectory(fp, STEPS, 4, CLASSES, 4.0, seed=1, n_trajectories=2)
    held = teacher_trajectory(fp, STEPS, 4, CLASSES, 4.0, seed=2, n_trajectories=1)
    return fp, q, cal, held


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, VQLinear)}


# ---- the figure --------------------------------------------------------------------------------------
def test_vq_calibrate_lowers_block_mse_by_20_percent(dit, record_property):
    """Calibrated vs k-means-only 2-bit, block-output MSE on a held-out trajectory.  The published
    schedule runs up to 1000 trajectories x 50 steps; here 100 steps, so the ratio learning rate is 0.5
    instead of 5e-2 (every other setting as published) to let the sub-vectors lock within the run."""
    fp, q0, cal, held = dit
    q = copy.deepcopy(q0)
    bits_before = {n: m.bits_per_weight for n, m in _layers(q).items()}
    rep = calibrate(fp, q, cal, lr_ratio=0.5, eval_inputs=held, progress=False)
    kmeans_mse = block_mse(fp, q0, held)
    calibrated_mse = block_mse(fp, q, held)
    print()
    print(rep)
    print(f"held-out block-output MSE: k-means 2-bit {kmeans_mse:.4e}, calibrated 2-bit {calibrated_mse:.4e} "
          f"({100 * (1 - calibrated_mse / kmeans_mse):.1f}% lower)")
    record_property("kmeans_block_mse", kmeans_mse)
    record_property("calibrated_block_mse", calibrated_mse)
    assert len(_layers(q)) == 15
    assert {n: m.bits_per_weight for n, m in _layers(q).items()} == bits_before == {n: 2.0 for n in bits_before}
    assert rep.eval_held_out and rep.steps == len(cal)
    assert math.isclose(rep.mse_before, kmeans_mse, rel_tol=1e-6)
    assert math.isclose(rep.mse_after, calibrated_mse, rel_tol=1e-6)
    assert calibrated_mse <= 0.8 * kmeans_mse
    assert all(h is not None for h in rep.hard_step.values()), "every layer should go hard within the run"


# ---- the pieces --------------------------------------------------------------------------------------
def _layer(n_out=24, n_in=32, K=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g))
    return lin, VQLinear.from_linear(lin, bits=2, K=K, iters=10, seed=seed)


@pytest.mark.parametrize("n", [2, 3])
def test_vq_calibrate_candidates_and_ratio_init(n):
    lin, layer = _layer()
    s = SoftVQLinear(layer, lin.weight, n_candidates=n)
    C = layer.codebooks.detach()[0, 0].double()
    w = lin.weight.detach().double().reshape(-1, 4)
    dist = torch.cdist(w, C)                                          # Euclidean, float64
    order = dist.argsort(dim=1)[:, :n]
    assert torch.equal(s.candidates, order), "candidates: the n nearest codewords, nearest first"
    dn = dist.gather(1, order)
    z = torch.log(dn[:, -1:] / (dn + 1e-5))
    z[:, -1] = 0
    assert torch.allclose(s.logits.double(), z, rtol=1e-5, atol=1e-5)
    r = s.ratios().double()
    assert torch.allclose(r.sum(1), torch.ones(r.shape[0], dtype=torch.float64))
    if n == 2:  # r proportional to 1/distance: r_0 (d_0 + 1e-5) = r_1 d_1
        assert torch.allclose(r[:, 0] * (dn[:, 0] + 1e-5), r[:, 1] * dn[:, 1], rtol=1e-4)


def test_vq_calibrate_soft_weight_is_the_ratio_blend():
    lin, layer = _layer()
    s = SoftVQLinear(layer, lin.weight, n_candidates=2)
    with torch.no_grad():
        s.logits.normal_()
    C = s.codebook.detach().double()
    r = torch.softmax(s.logits.detach().double(), -1)
    ref = (r.unsqueeze(-1) * C[s.candidates]).sum(1).reshape(24, 32)
    assert torch.allclose(s.weight().double(), ref, rtol=1e-6, atol=1e-7)
    x = torch.randn(5, 32)
    assert torch.allclose(s(x).double(), x.double() @ ref.T + lin.bias.detach().double(), rtol=1e-5, atol=1e-5)
    s.harden_()
    assert torch.equal(s.weight(), s.codebook.detach()[s.codes].reshape(24, 32))


def test_vq_calibrate_lock_makes_one_hot_and_freezes_the_gradient():
    lin, layer = _layer()
    s = SoftVQLinear(layer, lin.weight, n_candidates=2)
    with torch.no_grad():
        s.logits.zero_()
        s.logits[0] = torch.tensor([0.0, 5.3])    # r_1 = 0.995 > 0.99: locks to candidate 1
        s.logits[1] = torch.tensor([4.5, 0.0])    # r_0 = 0.989: stays free
    assert s.lock_(0.99) == 1
    assert s.locked[0] and not s.locked[1:].any()
    assert torch.equal(s.logits[0].detach(), torch.tensor([0.0, 1e4]))
    assert torch.equal(s.ratios()[0].detach(), torch.tensor([0.0, 1.0]))
    opt = torch.optim.RMSprop([s.logits], lr=5e-2, alpha=0.9)
    before = s.logits.detach().clone()
    out = s(torch.randn(8, 32))
    (out.square().mean() + s.reg).backward()
    s.zero_locked_grad_()
    assert torch.equal(s.logits.grad[0], torch.zeros(2)) and s.logits.grad[1:].abs().sum() > 0
    opt.step()
    assert torch.equal(s.logits[0].detach(), before[0]) and not torch.equal(s.logits[1:], before[1:])


def test_vq_calibrate_regulariser_over_unlocked_subvectors():
    lin, layer = _layer()
    s = SoftVQLinear(layer, lin.weight, n_candidates=3)
    with torch.no_grad():
        s.logits.normal_()
        s.logits[:10] = F.one_hot(torch.arange(10) % 3, 3).float() * 1e4
    s.locked[:10] = True
    s.weight()
    r = torch.softmax(s.logits.detach().double(), -1)[10:]
    assert math.isclose(float(s.reg), float(3 * (r * (1 - r)).mean()), rel_tol=1e-5)
    s.locked[:] = True
    s.weight()
    assert float(s.reg) == 0.0


def test_vq_calibrate_regulariser_only_above_its_running_minimum(dit):
    fp, q0, cal, _ = dit
    rep = calibrate(fp, copy.deepcopy(q0), cal[:30], progress=False)
    assert rep.steps == 30 and len(rep.reg) == len(rep.reg_added) == 30
    low = math.inf
    for r, added in zip(rep.reg, rep.reg_added):
        assert added == (r > low)
        low = min(low, r)
    assert not rep.eval_held_out


def test_vq_calibrate_hard_switch_then_codebook_trains(dit):
    fp, q0, cal, _ = dit
    # lock_threshold 0.5: every sub-vector locks at the initial ratios (the nearest candidate has r > 0.5),
    # so every layer goes hard after step 0 with the k-means (nearest) codes, and then its codebook trains
    q = copy.deepcopy(q0)
    rep = calibrate(fp, q, cal[:5], lock_threshold=0.5, progress=False)
    assert all(step == 0 for step in rep.hard_step.values())
    for name, m in _layers(q).items():
        m0 = q0.get_submodule(name)
        w = fp.get_submodule(name).weight.detach().reshape(-1, 4)
        dist = torch.cdist(w.double(), m0.codebooks.detach()[0, 0].double())
        codes = m.codes.long().view(-1)
        gap = dist.gather(1, codes[:, None])[:, 0] - dist.min(1).values
        # the nearest codeword, but for near-ties, where the 1e-5 of the init favours the farther one
        assert (gap <= 1e-4).all() and (gap == 0).double().mean() > 0.99, name
        assert not torch.equal(m.codebooks, m0.codebooks), f"{name}: the codebook should train once hard"
    # a threshold no ratio reaches in 3 steps: no layer goes hard, the codebooks do not train, and the
    # end forces the argmax codes
    q = copy.deepcopy(q0)
    rep = calibrate(fp, q, cal[:3], lock_threshold=0.999999, progress=False)
    assert all(step is None for step in rep.hard_step.values())
    for name, m in _layers(q).items():
        assert torch.equal(m.codebooks, q0.get_submodule(name).codebooks), name
    assert any(not torch.equal(m.bias, q0.get_submodule(n).bias) for n, m in _layers(q).items()), \
        "biases train from the first step"
    assert "end (argmax)" in str(rep)


def test_vq_calibrate_is_reproducible(dit):
    fp, q0, cal, _ = dit
    runs = []
    for _ in range(2):
        q = copy.deepcopy(q0)
        calibrate(fp, q, cal[:20], lr_ratio=0.5, seed=3, progress=False)
        runs.append(q)
    for (name, a), b in zip(_layers(runs[0]).items(), _layers(runs[1]).values()):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks), name
        assert torch.equal(a.bias, b.bias), name


def test_vq_calibrate_writes_valid_codes_and_restores_the_model(dit):
    fp, q0, cal, held = dit
    q = copy.deepcopy(q0)
    q.train()
    flags = {n: p.requires_grad for n, p in q.named_parameters()}
    before = {n: (m.codes.dtype, tuple(m.codes.shape), m.K, m.d, m.bits_per_weight) for n, m in _layers(q).items()}
    changed = 0
    rep = calibrate(fp, q, cal[:40], lr_ratio=0.5, progress=False)
    assert isinstance(rep, CalibrationReport) and "block-output MSE" in str(rep)
    assert q.training and not fp.training
    assert {n: p.requires_grad for n, p in q.named_parameters()} == flags
    layers = _layers(q)
    assert set(layers) == set(before)
    for name, m in layers.items():
        assert (m.codes.dtype, tuple(m.codes.shape), m.K, m.d, m.bits_per_weight) == before[name]
        assert int(m.codes.long().max()) < m.K and int(m.codes.long().min()) >= 0
        changed += int((m.codes != q0.get_submodule(name).codes).sum())
        x = torch.randn(7, m.in_features)
        ref = x.double() @ m.dequantize().double().T + m.bias.double()
        assert torch.allclose(m(x).double(), ref, rtol=1e-4, atol=1e-4)
    assert changed > 0, "calibration should move some codes off the nearest codeword"
    q.eval()
    out = q(*held[0])
    assert torch.isfinite(out).all()


def test_vq_calibrate_rejects_bad_inputs(dit):
    fp, q0, cal, _ = dit
    with pytest.raises(ValueError, match="no VQLinear"):
        calibrate(fp, copy.deepcopy(fp), cal[:1], progress=False)
    with pytest.raises(ValueError, match="no module named"):
        calibrate(fp, copy.deepcopy(q0), cal[:1], blocks=["blocks.9"], progress=False)
    with pytest.raises(ValueError, match="lock_threshold"):
        calibrate(fp, copy.deepcopy(q0), cal[:1], lock_threshold=1.5, progress=False)
    with pytest.raises(ValueError, match="n_candidates"):
        calibrate(fp, copy.deepcopy(q0), cal[:1], n_candidates=9, progress=False)
    with pytest.raises(ValueError, match="blocks"):
        default_blocks(nn.Sequential(nn.Linear(4, 4)))
    q = copy.deepcopy(q0)
    with pytest.raises(ValueError, match="no module named"):  # a failure leaves the VQLinear layers in place
        calibrate(fp, q, cal[:1], blocks=["nope"], progress=False)
    assert len(_layers(q)) == 15


def test_vq4dit_teacher_trajectory_is_the_cfg_sampling_inputs():
    torch.manual_seed(0)
    fp = TinyDiT(hidden=32, depth=1, heads=2, num_classes=CLASSES, init="random").eval()
    a = teacher_trajectory(fp, 10, 3, CLASSES, 4.0, seed=5, n_trajectories=2)
    b = teacher_trajectory(fp, 10, 3, CLASSES, 4.0, seed=5, n_trajectories=2)
    assert len(a) == 20
    ts = DDPM().timesteps(10)
    for i, ((x, t, y), (x2, t2, y2)) in enumerate(zip(a, b)):
        assert torch.equal(x, x2) and torch.equal(t, t2) and torch.equal(y, y2)
        assert x.shape == (6, 4, 16, 16) and torch.equal(x[:3], x[3:])
        assert (t == ts[::-1][i % 10]).all()
        assert (y[:3] < CLASSES).all() and (y[3:] == CLASSES).all()
    assert not torch.equal(a[0][0], a[10][0]), "each trajectory starts from fresh N(0, I) latents"
