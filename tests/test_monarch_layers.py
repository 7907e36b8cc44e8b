"""MonarchLinear, dense -> Monarch projection, replace_linear."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kernelkit
from kernelkit.monarch import MonarchLinear, monarch_to_dense, project, project_factors
from helpers import assert_close, rel_err


@pytest.mark.parametrize("in_f, out_f, nb", [(64, 64, 4), (100, 37, 4), (37, 100, 4), (768, 3072, 16), (30, 30, 3)])
def test_monarch_linear_equals_its_dense_weight(in_f, out_f, nb):
    torch.manual_seed(0)
    layer = MonarchLinear(in_f, out_f, nblocks=nb, dtype=torch.float64)
    x = torch.randn(3, 5, in_f, dtype=torch.float64)
    want = x @ layer.to_dense().T + layer.bias
    assert layer.to_dense().shape == (out_f, in_f)
    assert_close(layer(x), want, torch.float64, "MonarchLinear vs to_dense")


def test_monarch_linear_saving_matches_fly_table():
    assert MonarchLinear(1024, 4096, 4).saving == pytest.approx(0.3125)
    assert MonarchLinear(4096, 1024, 4).saving == pytest.approx(0.3125)
    assert MonarchLinear(768, 768, 4).saving == pytest.approx(0.5)
    assert MonarchLinear(768, 3072, 16).saving == pytest.approx(0.078, abs=1e-3)


def test_monarch_linear_init_follows_fly():
    torch.manual_seed(0)
    layer = MonarchLinear(1024, 4096, 4)
    for w in (layer.blkdiag1, layer.blkdiag2):
        bound = 1 / w.shape[-1] ** 0.5
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
        assert w.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)  # uniform(-b, b)
    assert layer.bias.abs().max() <= 1 / 4096 ** 0.5


def test_monarch_linear_state_dict_round_trip_and_fly_names():
    a = MonarchLinear(100, 37, 4)
    sd = a.state_dict()
    assert set(sd) == {"blkdiag1", "blkdiag2", "bias"}  # HazyResearch/fly parameter names
    b = MonarchLinear(100, 37, 4)
    b.load_state_dict(sd)
    x = torch.randn(4, 100)
    assert torch.equal(a(x), b(x))


def test_monarch_linear_trains_on_the_cpu_backend():
    torch.manual_seed(0)
    layer = MonarchLinear(48, 40, nblocks=4)
    target = MonarchLinear(48, 40, nblocks=4)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(256, 48)
    with torch.no_grad():
        y = target(x)
    first = None
    for _ in range(150):
        loss = (layer(x) - y).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


def test_monarch_linear_bad_arguments():
    with pytest.raises(ValueError, match="nblocks"):
        MonarchLinear(3, 8, nblocks=4)
    with pytest.raises(ValueError, match="in_features"):
        MonarchLinear(0, 8)
    with pytest.raises(ValueError, match="x.shape\\[-1\\] must be in_features=16"):
        MonarchLinear(16, 16)(torch.randn(2, 15))


# ---- projection -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 16, 16, 4, 16, 16), (4, 8, 8, 4, 24, 8), (3, 10, 7, 5, 9, 6), (2, 9, 4, 6, 5, 3)])
def test_projection_recovers_a_monarch_matrix(shape):
    k, q, p, l, s, r = shape
    torch.manual_seed(1)
    w1, w2 = torch.randn(k, q, p, dtype=torch.float64), torch.randn(l, s, r, dtype=torch.float64)
    M = monarch_to_dense(w1, w2)
    p1, p2 = project_factors(M, w1.shape, w2.shape)
    assert rel_err(monarch_to_dense(p1, p2), M) < 1e-10


@pytest.mark.parametrize("in_f, out_f, nb", [(64, 64, 4), (96, 48, 4), (48, 96, 4), (50, 30, 4)])
def test_projection_is_no_worse_than_200_adam_steps(in_f, out_f, nb):
    torch.manual_seed(2)
    W = torch.randn(out_f, in_f, dtype=torch.float64)
    w1, w2 = project(W, nb)
    proj_err = (MonarchLinear.from_linear(_linear(W), nb).to_dense() - W).norm().item()
    assert (monarch_to_dense(w1, w2)[:out_f, :in_f] - W).norm().item() == pytest.approx(proj_err)
    layer = MonarchLinear(in_f, out_f, nb, bias=False, dtype=torch.float64)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
    for _ in range(200):
        loss = (monarch_to_dense(layer.blkdiag1, layer.blkdiag2)[:out_f, :in_f] - W).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    adam_err = (monarch_to_dense(layer.blkdiag1, layer.blkdiag2)[:out_f, :in_f] - W).norm().item()
    assert proj_err <= adam_err * (1 + 1e-9), f"projection {proj_err:.4f} worse than Adam {adam_err:.4f}"


def _linear(W, bias=None):
    lin = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def test_from_linear_keeps_bias_and_projects():
    torch.manual_seed(3)
    lin = nn.Linear(40, 24)
    m = MonarchLinear.from_linear(lin, nblocks=4)
    w1, w2 = project(lin.weight, 4)
    assert torch.equal(m.bias, lin.bias.detach())
    assert torch.allclose(m.blkdiag1, w1) and torch.allclose(m.blkdiag2, w2)


def test_project_bad_input():
    with pytest.raises(ValueError, match="W must be 2-D"):
        project(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="nblocks"):
        project(torch.randn(8, 3), nblocks=4)


def test_replace_linear_swaps_matching_layers():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 2)))
    x = torch.randn(5, 32)
    out = kernelkit.nn.replace_linear(model, nblocks=4, filter=lambda name, mod: mod.out_features > 2)
    assert out is model
    assert isinstance(model[0], MonarchLinear) and isinstance(model[2][0], MonarchLinear)
    assert type(model[2][1]) is nn.Linear  # filtered out (and too narrow for 4 blocks)
    assert model(x).shape == (5, 2)
    with pytest.raises(TypeError, match="parent module"):
        kernelkit.nn.replace_linear(nn.Linear(8, 8))


def test_example_monarch_mlp_runs_and_fine_tuning_helps(capsys):
    from kernelkit.examples import monarch_mlp
    assert monarch_mlp.main(["--width", "32", "--steps", "30", "--batch", "128", "--quiet"]) == 0
    out = capsys.readouterr().out
    losses = {line.split(":")[0].strip(): float(line.split("loss ")[1].split(",")[0]) for line in out.splitlines()
              if "loss " in line}
    assert losses["monarch, tuned"] < losses["monarch, projected"]


def test_square_case_is_the_papers_P_L_Pt_R():
    """monarch.md: with k = l = m = sqrt(n) and m x m blocks, fly's product is exactly P L P^T R with
    R = blockdiag(w1), L = blockdiag(w2) and P the reshape-(m, m)-transpose permutation."""
    m = 5
    n = m * m
    torch.manual_seed(7)
    w1, w2 = torch.randn(m, m, m, dtype=torch.float64), torch.randn(m, m, m, dtype=torch.float64)
    R, L = torch.block_diag(*w1), torch.block_diag(*w2)
    perm = torch.arange(n).reshape(m, m).T.reshape(-1)
    P = torch.eye(n, dtype=torch.float64)[perm]
    assert torch.equal(P, P.T)  # the transpose permutation is its own inverse
    assert rel_err(monarch_to_dense(w1, w2), P @ L @ P.T @ R) < 1e-14
