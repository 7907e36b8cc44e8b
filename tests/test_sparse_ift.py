"""Sparse-IFT transformations (kernelkit.sparse.transforms): the width/rank formulas against the
published code's numbers, iso-FLOP accounting of every family on an MLP and on a transformer's MLP
blocks, the layers' forward against a float64 dense reference, sparsify_'s layer selection and its
Sparse Wide chain rule, the report, bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernelkit.sparse import (RowBatchNorm1d, SparseDopedLinear, SparseFactorizedLinear, SparseLinear,
                              SparseParallelLinear, dense_grad_flops, doped_rank, factorized_width, forward_flops,
                              iso_flop_scale, sparsify_, wide_width)
from helpers import assert_close

SPARSITIES = [0.5, 0.75, 0.9]
K_S = {0.5: 2, 0.75: 4, 0.9: 10}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def mlp(dtype=torch.float32, widths=(256, 512, 512, 256)):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, dtype=dtype))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MLPBlock(nn.Module):
    """A transformer MLP block as usually written: fc1, act, fc2, dropout."""

    def __init__(self, d):
        super().__init__()
        self.fc1, self.act, self.fc2, self.drop = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2, self.mlp = nn.LayerNorm(d), MLPBlock(d)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=64, d=256, heads=4, depth=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(depth))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def _mlp_filter(name, _):
    return ".mlp." in name


# ---- the formulas -----------------------------------------------------------------------------------

def test_formulas_reproduce_the_fact_sheet_table():
    # 3x3 conv 256 -> 256 is a linear layer with D_in = 9 * 256; values from the published code's formulas
    # (Factorized 2305 at s = 0.9, not 2304: the code's 1 - 0.9 = 0.09999999999999998)
    assert [factorized_width(9 * 256, 256, s) for s in SPARSITIES] == [461, 922, 2305]
    assert [doped_rank(9 * 256, 256, s) for s in SPARSITIES] == [115, 172, 207]
    assert [4 * wide_width(64, s) for s in SPARSITIES] == [360, 512, 808]  # ResNet base width 64, x4
    assert [iso_flop_scale(s) for s in SPARSITIES] == [2, 4, 10]
    assert iso_flop_scale(0.99) == 100 and iso_flop_scale(0.0) == 1 and iso_flop_scale(0.2) == 1


def test_formulas_on_linear_shapes_equal_hand_computed_values():
    # 512 x 512: ceil(512*512 / ((1-s) 1024)) and floor(s 512*512 / 1024) = floor(256 s)
    assert [factorized_width(512, 512, s) for s in SPARSITIES] == [512, 1024, 2561]
    assert [doped_rank(512, 512, s) for s in SPARSITIES] == [128, 192, 230]
    # 256 -> 512: ceil(131072 / ((1-s) 768)) = ceil(170.67 / (1-s)), floor(170.67 s)
    assert [factorized_width(256, 512, s) for s in SPARSITIES] == [342, 683, 1707]
    assert [doped_rank(256, 512, s) for s in SPARSITIES] == [85, 128, 153]
    assert [wide_width(512, s) for s in SPARSITIES] == [724, 1024, 1619]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True, None])
def test_formulas_reject_a_bad_sparsity(bad):
    for fn, args in ((iso_flop_scale, ()), (wide_width, (64,)), (factorized_width, (64, 64)), (doped_rank, (64, 64))):
        with pytest.raises(ValueError, match="sparsity"):
            fn(*args, bad)


# ---- iso-FLOP on an MLP 256-512-512-256 ---------------------------------------------------------------

@pytest.mark.parametrize("s", SPARSITIES)
@pytest.mark.parametrize("transform", ["parallel", "factorized", "doped"])
def test_each_layer_is_iso_flop_within_1_percent(transform, s):
    model = mlp()
    rep = sparsify_(model, transform, s, dense_first_last=False, generator=_gen())
    assert [r.transform for r in rep.layers] == [transform] * 3
    for r, lin in zip(rep.layers, (nn.Linear(256, 512), nn.Linear(512, 512), nn.Linear(512, 256))):
        dense = lin.in_features * lin.out_features + lin.out_features
        assert r.flops_before == dense
        assert abs(r.flops_after / dense - 1) < 0.01, (r.name, r.flops_after, dense)
    assert abs(rep.deviation) < 0.01
    assert rep.flops_after == forward_flops(model)
    y = model(torch.randn(5, 256))
    assert y.shape == (5, 256) and torch.isfinite(y).all()


@pytest.mark.parametrize("s", SPARSITIES)
def test_parallel_has_k_s_branches_each_at_s(s):
    model = mlp()
    rep = sparsify_(model, "parallel", s, dense_first_last=False, generator=_gen())
    layer = model[2]
    assert isinstance(layer, SparseParallelLinear) and len(layer.branches) == K_S[s]
    assert rep.layers[1].branches == K_S[s]
    for b in layer.branches:
        assert isinstance(b, SparseLinear) and b.nnz == round((1 - s) * 512 * 512)
    masks = [b.mask for b in layer.branches]
    assert not torch.equal(masks[0], masks[1])  # independent random masks
    assert layer.flops() == K_S[s] * round((1 - s) * 512 * 512) + 512


@pytest.mark.parametrize("s", SPARSITIES)
def test_factorized_inner_width_and_sparse_factors(s):
    model = mlp()
    rep = sparsify_(model, "factorized", s, dense_first_last=False, generator=_gen())
    want = {0.5: [342, 512, 342], 0.75: [683, 1024, 683], 0.9: [1707, 2561, 1707]}[s]
    assert [r.inner for r in rep.layers] == want
    for layer, d in zip((model[0], model[2], model[4]), want):
        assert isinstance(layer, SparseFactorizedLinear) and layer.inner == d
        assert layer.u.nnz == round((1 - s) * d * layer.in_features)
        assert layer.v.nnz == round((1 - s) * layer.out_features * d)
        assert isinstance(layer.norm, RowBatchNorm1d) and isinstance(layer.act, nn.ReLU)


@pytest.mark.parametrize("s", SPARSITIES)
def test_doped_low_rank_factors_stay_dense(s):
    model = mlp()
    rep = sparsify_(model, "doped", s, dense_first_last=False, generator=_gen())
    want = {0.5: [85, 128, 85], 0.75: [128, 192, 128], 0.9: [153, 230, 153]}[s]
    assert [r.rank for r in rep.layers] == want
    for layer, r in zip((model[0], model[2], model[4]), want):
        assert isinstance(layer, SparseDopedLinear) and layer.rank == r
        assert type(layer.u) is nn.Linear and type(layer.v) is nn.Linear  # dense: no mask anywhere
        assert layer.u.weight.shape == (r, layer.in_features) and layer.v.weight.shape == (layer.out_features, r)
        assert (layer.u.weight != 0).all() and (layer.v.weight != 0).all()
        assert layer.sparse.nnz == round((1 - s) * layer.in_features * layer.out_features)
        # the FLOPs count U V densely: the iso-FLOP budget of the rank formula
        assert layer.flops() == layer.sparse.nnz + layer.out_features + r * (layer.in_features + layer.out_features)


@pytest.mark.parametrize("s", SPARSITIES)
def test_wide_widens_hidden_widths_and_searches_to_0_1_percent(s):
    model = mlp()
    rep = sparsify_(model, "wide", s, dense_first_last=False, generator=_gen())
    w = wide_width(512, s)
    assert w == {0.5: 724, 0.75: 1024, 0.9: 1619}[s]
    assert [r.shape_after for r in rep.layers] == [(w, 256), (w, w), (256, w)]
    assert abs(rep.deviation) < 1e-3
    assert rep.sparsity_used != s  # the inputs/outputs are not widened, so the search moved it
    for layer in (model[0], model[2], model[4]):
        assert isinstance(layer, SparseLinear)
        assert layer.nnz == round((1 - rep.sparsity_used) * layer.in_features * layer.out_features)
    assert model(torch.randn(3, 256)).shape == (3, 256)


@pytest.mark.parametrize("s", SPARSITIES)
def test_wide_keeps_first_and_last_dense_but_widened_on_a_deeper_mlp(s):
    model = mlp(widths=(256, 512, 512, 512, 512, 512, 256))
    first, last = model[0], model[-1]
    rep = sparsify_(model, "wide", s, generator=_gen())
    w = wide_width(512, s)
    assert type(model[0]) is nn.Linear and model[0].weight.shape == (w, 256) and model[0] is not first
    assert type(model[-1]) is nn.Linear and model[-1].weight.shape == (256, w) and model[-1] is not last
    assert [r.transform for r in rep.layers] == ["dense", "wide", "wide", "wide", "wide", "dense"]
    assert abs(rep.deviation) < 1e-3
    assert model(torch.randn(2, 256)).shape == (2, 256)


def test_wide_says_when_the_dense_first_and_last_layers_exceed_the_budget():
    # 3 layers: at k_s = 10 the dense first and last layers, widened x3.16, cost more than the whole
    # dense model; the search cannot help
    model = mlp()
    before = [m for m in model]
    with pytest.raises(ValueError, match="cannot be iso-FLOP.*dense_first_last=False"):
        sparsify_(model, "wide", 0.9)
    assert [m for m in model] == before  # nothing was changed


def test_wide_widens_norms_between_the_layers_and_flattens_nested_sequentials():
    model = nn.Sequential(nn.Linear(64, 128), nn.Sequential(nn.LayerNorm(128), nn.GELU()),
                          nn.Sequential(nn.Linear(128, 128), nn.BatchNorm1d(128), nn.Dropout(0.1)), nn.ReLU(),
                          nn.Linear(128, 32))
    rep = sparsify_(model, "wide", 0.75, dense_first_last=False, generator=_gen())
    assert model[1][0].normalized_shape == (256,) and model[2][1].num_features == 256
    assert [r.shape_after for r in rep.layers] == [(256, 64), (256, 256), (32, 256)]
    assert model(torch.randn(4, 64)).shape == (4, 32)


def test_wide_treats_unknown_modules_between_layers_as_a_break_unless_declared_elementwise():
    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    def make():
        return nn.Sequential(nn.Linear(64, 128), Swish(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))

    rep = sparsify_(make(), "wide", 0.75, dense_first_last=False, generator=_gen())
    assert rep.layers[0].shape_after == (128, 64)  # not known to keep the width: not widened
    model = make()
    rep = sparsify_(model, "wide", 0.75, dense_first_last=False, generator=_gen(), elementwise=(Swish,))
    assert rep.layers[0].shape_after == (256, 64)
    assert model(torch.randn(2, 64)).shape == (2, 64)


def test_wide_refuses_a_gated_mlp_whose_hidden_width_is_ambiguous():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(64, 256), nn.Linear(64, 256), nn.Linear(256, 64)

        def forward(self, x):
            return self.down(F.silu(self.gate(x)) * self.up(x))

    model = nn.Sequential(nn.Linear(64, 64), Gated(), nn.Linear(64, 64))
    with pytest.raises(ValueError, match="cannot tell which layers share the hidden width 256.*gate"):
        sparsify_(model, "wide", 0.75)
    rep = sparsify_(model, "parallel", 0.75, generator=_gen())  # the other families keep each interface
    assert abs(rep.deviation) < 0.01
    assert model(torch.randn(2, 64)).shape == (2, 64)


def test_wide_refuses_a_norm_of_another_width_between_chained_layers():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(12), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="norm '1'"):
        sparsify_(model, "wide", 0.75)


# ---- a transformer's MLP blocks -------------------------------------------------------------------------

@pytest.mark.parametrize("s", SPARSITIES)
@pytest.mark.parametrize("transform", ["wide", "parallel", "factorized", "doped"])
def test_transformer_mlp_blocks_are_iso_flop(transform, s):
    torch.manual_seed(0)
    model = TinyTransformer()
    keep = {n: m for n, m in model.named_modules() if ".mlp." not in n and isinstance(m, nn.Linear)}
    rep = sparsify_(model, transform, s, filter=_mlp_filter, generator=_gen())
    changed = [r for r in rep.layers if r.transform == transform]
    assert [r.name for r in changed] == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1",
                                         "blocks.1.mlp.fc2"]
    for n, m in keep.items():  # attention projections and the head are untouched (same objects)
        assert model.get_submodule(n) is m
    if transform == "wide":
        w = wide_width(1024, s)
        assert [r.shape_after for r in changed] == [(w, 256), (256, w)] * 2
        assert abs(rep.deviation) < 1e-3
    else:
        for r in changed:
            assert abs(r.flops_after / r.flops_before - 1) < 0.01, (r.name, r.ratio)
        assert abs(rep.deviation) < 0.01
    assert rep.flops_after == forward_flops(model)
    out = model(torch.randint(0, 64, (2, 5)))
    assert out.shape == (2, 5, 64) and torch.isfinite(out).all()


def test_transformer_default_keeps_the_first_and_last_linear_dense():
    model = TinyTransformer()
    rep = sparsify_(model, "parallel", 0.75, generator=_gen())
    # first nn.Linear (subclasses counted) is block 0's attention out_proj, last the head: both dense;
    # the out_proj of MultiheadAttention is never transformed (its parent reads its weight directly)
    assert type(model.head) is nn.Linear
    names = {r.name: r.transform for r in rep.layers}
    assert names["head"] == "dense" and names["blocks.0.attn.out_proj"] == "dense"
    assert names["blocks.0.mlp.fc1"] == "parallel"


# ---- the layers compute what they say (float64 against a dense reference) -------------------------------

def _branch_dense(b):
    return b.to_dense()


@pytest.mark.parametrize("norm", [None, "layer", "batch"])
def test_parallel_forward_matches_dense_reference(norm, poison):
    g = _gen(1)
    layer = SparseParallelLinear(37, 23, 3, 0.8, norm=norm, dtype=torch.float64, generator=g)
    x = torch.randn(2, 9, 37, dtype=torch.float64, generator=g)
    want = 0
    for i, b in enumerate(layer.branches):
        yi = x @ _branch_dense(b).T
        if norm == "layer":
            yi = F.layer_norm(yi, (23,), layer.norms[i].weight, layer.norms[i].bias, layer.norms[i].eps)
        elif norm == "batch":
            flat = yi.reshape(-1, 23)
            yi = F.batch_norm(flat, None, None, layer.norms[i].weight, layer.norms[i].bias, True, 0.0,
                              layer.norms[i].eps).reshape(yi.shape)
        want = want + yi
    want = want + layer.bias
    assert_close(layer(x), want, torch.float64, "SparseParallelLinear")


@pytest.mark.parametrize("norm, relu", [(None, False), ("layer", True), ("batch", True)])
def test_factorized_forward_matches_dense_reference(norm, relu, poison):
    g = _gen(2)
    layer = SparseFactorizedLinear(40, 24, 50, 0.7, norm=norm, relu=relu, dtype=torch.float64, generator=g)
    x = torch.randn(33, 40, dtype=torch.float64, generator=g)
    h = x @ layer.u.to_dense().T
    if norm == "layer":
        h = F.layer_norm(h, (50,), layer.norm.weight, layer.norm.bias, layer.norm.eps)
    elif norm == "batch":
        h = F.batch_norm(h, None, None, layer.norm.weight, layer.norm.bias, True, 0.0, layer.norm.eps)
    if relu:
        h = h.clamp(min=0)
    want = h @ layer.v.to_dense().T + layer.v.bias
    assert_close(layer(x), want, torch.float64, "SparseFactorizedLinear")


def test_doped_forward_matches_dense_reference(poison):
    g = _gen(3)
    layer = SparseDopedLinear(40, 24, 7, 0.9, dtype=torch.float64, generator=g)
    x = torch.randn(4, 6, 40, dtype=torch.float64, generator=g)
    w = layer.sparse.to_dense() + layer.v.weight @ layer.u.weight
    assert_close(layer(x), x @ w.T + layer.sparse.bias, torch.float64, "SparseDopedLinear")
    assert SparseDopedLinear(8, 8, 0, 0.0).u is None  # s = 0: rank 0, the plain layer


def test_transformed_mlp_trains_a_step():
    model = mlp(widths=(32, 64, 64, 16))
    sparsify_(model, "factorized", 0.75, dense_first_last=False, generator=_gen())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 32), torch.randn(64, 16)
    l0 = (model(x) - y).pow(2).mean()
    l0.backward()
    opt.step()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert (model(x) - y).pow(2).mean() < l0


# ---- selection: first/last, filter ------------------------------------------------------------------

def test_sparsify_keeps_the_first_and_last_layers_dense_by_default():
    model = mlp(widths=(64, 96, 96, 96, 32))
    first, last = model[0], model[-1]
    w_first = first.weight.detach().clone()
    rep = sparsify_(model, "doped", 0.75, generator=_gen())
    assert model[0] is first and model[-1] is last and torch.equal(model[0].weight, w_first)
    assert [r.transform for r in rep.layers] == ["dense", "doped", "doped", "dense"]
    model = mlp(widths=(64, 96, 96, 96, 32))
    rep = sparsify_(model, "doped", 0.75, dense_first_last=False, generator=_gen())
    assert [r.transform for r in rep.layers] == ["doped"] * 4


def test_sparsify_filter_selects_layers_by_name():
    model = mlp(widths=(64, 96, 96, 96, 32))
    kept = model[2]
    rep = sparsify_(model, "parallel", 0.5, dense_first_last=False, filter=lambda n, m: n in ("0", "4"),
                    generator=_gen())
    assert [r.transform for r in rep.layers] == ["parallel", "dense", "parallel", "dense"]
    assert model[2] is kept
    with pytest.raises(ValueError, match="no layer to transform"):
        sparsify_(mlp(), "parallel", 0.5, filter=lambda n, m: False)
    with pytest.raises(ValueError, match="no layer to transform.*dense_first_last"):
        sparsify_(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), "parallel", 0.5)


def test_sparsify_is_reproducible_with_a_generator():
    a, b = mlp(widths=(32, 48, 48, 16)), mlp(widths=(32, 48, 48, 16))
    sparsify_(a, "parallel", 0.75, dense_first_last=False, generator=_gen(5))
    sparsify_(b, "parallel", 0.75, dense_first_last=False, generator=_gen(5))
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


# ---- the report -----------------------------------------------------------------------------------------

def test_report_totals_train_flops_and_table():
    model = mlp(widths=(64, 128, 128, 32))
    rep = sparsify_(model, "sparse", 0.9, generator=_gen())
    nnz = round(0.1 * 128 * 128)
    assert rep.flops_before == (64 * 128 + 128) + (128 * 128 + 128) + (128 * 32 + 32)
    assert rep.flops_after == (64 * 128 + 128) + (nnz + 128) + (128 * 32 + 32)
    assert rep.deviation == pytest.approx(rep.flops_after / rep.flops_before - 1)
    assert rep.nnz == 64 * 128 + nnz + 128 * 32
    assert rep.dense_grad_flops == 128 * 128 == dense_grad_flops(model)
    assert rep.train_flops() == 3 * rep.flops_after
    # RigL: one dense-gradient GEMM of the sparse layer every delta_t steps during 75% of training
    assert rep.train_flops(delta_t=100) == pytest.approx(3 * rep.flops_after + 0.75 * 128 * 128 / 100)
    assert rep.train_flops(delta_t=10, t_end=1.0) == pytest.approx(3 * rep.flops_after + 128 * 128 / 10)
    text = str(rep)
    assert "'sparse' at s=0.9" in text and "128x128" in text and f"{nnz:,}" in text
    with pytest.raises(ValueError, match="delta_t"):
        rep.train_flops(delta_t=0)


def test_forward_flops_counts_existing_sparse_layers_and_skips_non_linear_modules():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 16, bias=False), nn.LayerNorm(16),
                          SparseLinear(16, 4, sparsity=0.5))
    assert forward_flops(model) == 8 * 16 + (32 + 4)
    rep = sparsify_(nn.Sequential(nn.Linear(8, 8), model, nn.Linear(4, 4)), "parallel", 0.5, generator=_gen())
    assert {r.name: r.transform for r in rep.layers}["1.3"] == "kept"


# ---- bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.9", True])
def test_sparsify_rejects_a_sparsity_outside_0_1(bad):
    with pytest.raises(ValueError, match="sparsify_: sparsity must be a number in \\[0, 1\\)"):
        sparsify_(mlp(), "parallel", bad)
    for cls, args in ((SparseParallelLinear, (8, 8, 2)), (SparseFactorizedLinear, (8, 8, 4)),
                      (SparseDopedLinear, (8, 8, 2))):
        with pytest.raises(ValueError, match="sparsity"):
            cls(*args, bad)


def test_sparsify_rejects_bad_arguments():
    with pytest.raises(ValueError, match="transform must be one of"):
        sparsify_(mlp(), "tall", 0.5)
    with pytest.raises(TypeError, match="bare nn.Linear"):
        sparsify_(nn.Linear(4, 4), "wide", 0.5)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sparsify_("model", "wide", 0.5)
    with pytest.raises(ValueError, match="norm must be"):
        sparsify_(mlp(), "parallel", 0.5, norm="group")
    with pytest.raises(TypeError, match="filter must be a callable"):
        sparsify_(mlp(), "parallel", 0.5, filter="mlp")
    with pytest.raises(TypeError, match="generator"):
        sparsify_(mlp(), "parallel", 0.5, generator=0)
    with pytest.raises(ValueError, match="no nn.Linear"):
        sparsify_(nn.Sequential(nn.ReLU()), "parallel", 0.5)
    with pytest.raises(ValueError, match="branches"):
        SparseParallelLinear(8, 8, 0, 0.5)
    with pytest.raises(ValueError, match="inner"):
        SparseFactorizedLinear(8, 8, 0, 0.5)
    with pytest.raises(ValueError, match="rank"):
        SparseDopedLinear(8, 8, -1, 0.5)


def test_sparse_layers_use_the_init_distribution_of_nn_linear():
    layer = SparseParallelLinear(400, 300, 2, 0.5, norm=None, generator=_gen())
    bound = 1 / math.sqrt(400)
    v = layer.branches[0].values
    assert v.abs().max() <= bound and v.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_sparsify_leaves_existing_sparse_ift_layers_alone():
    model = mlp(widths=(32, 48, 48, 48, 16))
    sparsify_(model, "doped", 0.5, filter=lambda n, m: n == "2", generator=_gen())
    u = model[2].u
    rep = sparsify_(model, "parallel", 0.5, generator=_gen())
    assert model[2].u is u and type(u) is nn.Linear  # Doped's dense factors are not layers to transform
    assert {r.name: r.transform for r in rep.layers} == {"0": "dense", "2": "kept", "4": "parallel", "6": "dense"}


def test_sparsify_rejects_elementwise_entries_that_are_not_module_types():
    with pytest.raises(TypeError, match="elementwise"):
        sparsify_(mlp(), "wide", 0.5, dense_first_last=False, elementwise=(torch.relu,))
