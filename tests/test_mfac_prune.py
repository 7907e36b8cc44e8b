"""The OBS pruner (kernelkit.mfac.prune.OBSPruner): better than magnitude pruning on a small trained MLP,
exact sparsity of the masks, the one-weight OBS update against its closed form with the explicit float64
inverse, gradual pruning helpers, to_sparse (kernelkit.sparse.SparseLinear), bad input, the example."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernelkit.mfac import reference as R
from kernelkit.mfac.prune import OBSPruner, magnitude_masks, to_sparse
from helpers import assert_close, rel_err


def _data():
    g = torch.Generator().manual_seed(0)
    n, din, k = 1024, 16, 4
    X = torch.randn(n, din, generator=g)
    W = torch.randn(din, k, generator=g)
    y = (torch.tanh(X @ W) + 0.3 * torch.randn(n, k, generator=g)).argmax(1)
    return X, y


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


@pytest.fixture(scope="module")
def trained():
    X, y = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 4))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(250):
        idx = torch.randint(0, X.shape[0], (128,), generator=g)
        opt.zero_grad()
        _loss(model, (X[idx], y[idx])).backward()
        opt.step()
    batches = [(X[i:i + 32], y[i:i + 32]) for i in range(0, X.shape[0], 32)]
    return model, (X, y), batches


def _full_loss(model, data):
    with torch.no_grad():
        return _loss(model, data).item()


def test_obs_beats_magnitude_without_retraining(trained, record_property):
    model, data, batches = trained
    dense = _full_loss(model, data)
    rows = []
    for sparsity in (0.5, 0.75, 0.9):
        mag = copy.deepcopy(model)
        masks = magnitude_masks(mag, sparsity)
        with torch.no_grad():
            for name, p in mag.named_parameters():
                if name in masks:
                    p.mul_(masks[name])
        obs = copy.deepcopy(model)
        OBSPruner(obs, ngrads=64, damp=1e-4, block_size=128, progress=False).prune(sparsity, batches, _loss)
        lm, lo = _full_loss(mag, data), _full_loss(obs, data)
        rows.append((sparsity, lm, lo))
        record_property(f"loss_{int(sparsity * 100)}", {"magnitude": lm, "obs": lo})
    print(f"\ndense loss {dense:.4f}; sparsity, magnitude loss, OBS loss: "
          + "; ".join(f"{s:.2f} {a:.4f} {b:.4f}" for s, a, b in rows))
    for s, lm, lo in rows:
        assert lo < lm, f"sparsity {s}: OBS loss {lo:.4f} >= magnitude loss {lm:.4f}"


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_obs_masks_have_exact_sparsity_and_stay_pruned(trained, scope):
    model, data, batches = trained
    model = copy.deepcopy(model)
    pr = OBSPruner(model, ngrads=8, damp=1e-4, block_size=64, scope=scope, progress=False)
    named = dict(model.named_parameters())
    first = pr.prune(0.5, batches, _loss)
    masks = pr.prune(0.8, batches, _loss, nrecomps=2)
    assert set(masks) == {"0.weight", "2.weight", "4.weight"}
    sizes = {n: named[n].numel() for n in masks}
    dropped = {n: int((~m).sum()) for n, m in masks.items()}
    if scope == "global":
        assert sum(dropped.values()) == round(0.8 * sum(sizes.values()))
    else:
        assert all(dropped[n] == round(0.8 * sizes[n]) for n in masks)
    for n, m in masks.items():
        assert not bool((m & ~first[n]).any()), "a weight pruned at 50% came back at 80%"
        assert bool((named[n][~m] == 0).all())
        assert m.shape == named[n].shape and m.dtype == torch.bool


def test_obs_update_one_weight_matches_closed_form():
    """Dropping one weight q: w <- w - w_q / [F^-1]_qq F^-1 e_q (then w_q = 0), with q the lowest
    w_q^2 / [F^-1]_qq, against the explicit float64 inverse of the same gradients."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    X, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    batches = [(X[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)]
    pr = OBSPruner(model, ngrads=8, damp=1e-2, block_size=None, progress=False)
    G = pr.collect(batches, _loss)
    w = pr._flat_weights().double()
    Finv = R.explicit_inverse(G, 1e-2)
    dq = Finv.diagonal()
    q = int(torch.argmin(w.square() / dq))
    want = w - w[q] / dq[q] * Finv[:, q]
    assert abs(float(want[q])) < 1e-9 * float(w.abs().max())
    pr.step(G, [1])
    got = pr._flat_weights()
    assert int((~pr._flat_mask()).sum()) == 1 and not bool(pr._flat_mask()[q])
    assert float(got[q]) == 0.0
    assert rel_err(got, want) < 1e-4


def test_obs_closure_and_helpers(trained):
    model, data, batches = trained
    model = copy.deepcopy(model)
    X, y = data
    pr = OBSPruner(model, ngrads=4, damp=1e-4, params=["2.weight"], progress=False)
    masks = pr.prune(0.6, lambda: _loss(model, (X[:64], y[:64])))    # a closure: () -> loss
    assert list(masks) == ["2.weight"] and abs(pr.sparsity - 0.6) < 1e-3
    w = model[2].weight
    grads_before = [p.grad for p in model.parameters()]
    assert all(g is None for g in grads_before)                       # collect does not touch .grad
    opt = torch.optim.SGD(model.parameters(), 0.1)
    _loss(model, (X, y)).backward()
    pr.mask_gradients()
    assert bool((w.grad[~masks["2.weight"]] == 0).all())
    with torch.no_grad():
        w.add_(1.0)
    pr.apply_masks()
    assert bool((w[~masks["2.weight"]] == 0).all()) and bool((w[masks["2.weight"]] != 0).any())
    opt.zero_grad()


def test_obs_to_sparse_matches_pruned_dense(trained):
    model, data, batches = trained
    model = copy.deepcopy(model)
    pr = OBSPruner(model, ngrads=8, damp=1e-4, progress=False)
    masks = pr.prune(0.75, batches, _loss)
    X = data[0][:100]
    with torch.no_grad():
        want = model(X)
    sparse = to_sparse(copy.deepcopy(model), masks)
    from kernelkit.sparse import SparseLinear
    assert all(isinstance(sparse[i], SparseLinear) for i in (0, 2, 4))
    for i in (0, 2, 4):
        assert torch.equal(sparse[i].mask, masks[f"{i}.weight"])
    with torch.no_grad():
        assert_close(sparse(X), want, torch.float32, "to_sparse")
    assert isinstance(pr.to_sparse(copy.deepcopy(model))[2], SparseLinear)


def test_obs_rejects_bad_input(trained):
    model, data, batches = trained
    model = copy.deepcopy(model)
    with pytest.raises(ValueError, match="ngrads"):
        OBSPruner(model, ngrads=0)
    with pytest.raises(ValueError, match="damp"):
        OBSPruner(model, damp=0.0)
    with pytest.raises(ValueError, match="scope"):
        OBSPruner(model, scope="row")
    with pytest.raises(ValueError, match="no prunable parameter"):
        OBSPruner(nn.Sequential(nn.ReLU(), nn.Embedding(3, 4)))
    with pytest.raises(ValueError, match="no parameter named"):
        OBSPruner(model, params=["9.weight"])
    pr = OBSPruner(model, ngrads=4, progress=False)
    for s in (1.0, -0.1):
        with pytest.raises(ValueError, match="sparsity"):
            pr.prune(s, batches, _loss)
    with pytest.raises(ValueError, match="nrecomps"):
        pr.prune(0.5, batches, _loss, nrecomps=0)
    with pytest.raises(ValueError, match="no batch"):
        pr.prune(0.5, [], _loss)
    before = copy.deepcopy(model.state_dict())
    X, y = data
    nan_loss = lambda m, b: _loss(m, b) * float("nan")  # noqa: E731
    with pytest.raises(ValueError, match="non-finite"):
        pr.prune(0.5, batches, nan_loss)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert pr.sparsity == 0.0


def test_obs_cycles_a_short_loader():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 2))
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(2)]
    G = OBSPruner(model, ngrads=5, progress=False).collect(batches, _loss)
    assert G.shape == (5, 6) and torch.equal(G[0], G[2]) and torch.equal(G[1], G[3])
    assert torch.equal(G[0], G[4]) and not torch.equal(G[0], G[1])


def test_mfac_obs_example_quick(capsys):
    from kernelkit.examples.mfac_obs import main
    res = main(["--quick"])
    out = capsys.readouterr().out
    assert "Part 2" in out and set(res["prune"]) == {0.5, 0.75, 0.9}
    for r in res["train"].values():
        assert r["test_loss"] == r["test_loss"]   # finite, not NaN
