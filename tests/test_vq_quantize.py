"""The k-means quantizer (monotone error, weights, determinism, k-means++ vs random seeding, empty-cluster
re-seeding, residual codebooks), the format helpers (code dtypes, bit packing, VQ4DiT's clamp) and
quantize_ (filter, the "dit" preset on a small DiT-like model, the report)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kernelkit import _lib
from kernelkit.vq import (QuantizeReport, VQLinear, bits_for, code_dtype, kmeans, pack_codes, quantize_,
                          residual_kmeans, unpack_codes, vq4dit_codebook_size)
from kernelkit.vq.reference import assign_reference
from helpers import rel_err


def _cpu_vq() -> bool:
    return _lib.cpu_library_error() is None and hasattr(_lib.C(), "vq_assign_cpu")


BACKENDS = [pytest.param("cpu", marks=pytest.mark.skipif(not _cpu_vq(), reason="kernelkit._C without the vq kernels")),
            "torch"]


def _blobs(n=3000, d=4, centers=24, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, d, generator=g) * 3
    lab = torch.randint(0, centers, (n,), generator=g)
    return c[lab] + spread * torch.randn(n, d, generator=g)


# ---- k-means -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kmeans_error_never_increases(backend, weighted, seed):
    V = _blobs(seed=seed, spread=1.0)
    w = torch.rand(V.shape[0], generator=torch.Generator().manual_seed(seed)) * 2 if weighted else None
    r = kmeans(V, 32, iters=40, seed=seed, weights=w, backend=backend)
    assert len(r.errors) == r.iterations + 1 and r.iterations >= 2
    assert all(b <= a for a, b in zip(r.errors, r.errors[1:])), r.errors
    assert r.errors[-1] < r.errors[0]
    # the codes are the nearest centroids of the final centroids, and the last error is theirs
    idx, dist = assign_reference(V.double(), r.centroids.double(), 1)
    assert torch.equal(r.codes, idx[:, 0].long()) or \
        torch.allclose(dist[:, 0], (V.double() - r.centroids.double()[r.codes]).pow(2).sum(1), rtol=1e-6)
    sq = (V.double() - r.centroids.double()[r.codes]).pow(2).sum(1)
    mse = float((sq * w.double()).sum() / w.double().sum()) / 4 if weighted else float(sq.mean()) / 4
    assert math.isclose(r.errors[-1], mse, rel_tol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_converged_centroids_are_weighted_means(backend):
    V = _blobs(n=1500, seed=7, spread=0.5)
    w = torch.rand(V.shape[0], generator=torch.Generator().manual_seed(1)) + 0.1
    r = kmeans(V, 16, iters=300, seed=0, weights=w, backend=backend)
    assert r.iterations < 300  # converged: the assignment stopped changing
    for k in range(16):
        m = r.codes == k
        assert m.any()
        mean = (V[m].double() * w[m].double().unsqueeze(1)).sum(0) / w[m].double().sum()
        assert torch.allclose(r.centroids[k].double(), mean, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_is_deterministic_for_a_seed(backend):
    V = _blobs(seed=3, spread=1.0)
    a = kmeans(V, 20, iters=15, seed=5, backend=backend)
    b = kmeans(V, 20, iters=15, seed=5, backend=backend)
    c = kmeans(V, 20, iters=15, seed=6, backend=backend)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.codes, b.codes) and a.errors == b.errors
    assert not torch.equal(a.centroids, c.centroids)
    ra = kmeans(V, 20, iters=15, seed=5, init="random", backend=backend)
    rb = kmeans(V, 20, iters=15, seed=5, init="random", backend=backend)
    assert torch.equal(ra.centroids, rb.centroids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeanspp_seeds_better_than_random(backend):
    """16 tight, well separated clusters: k-means++ seeds land in distinct clusters almost surely, random
    seeds often put two in one cluster, which Lloyd cannot undo.  Averaged over 6 seeds."""
    V = _blobs(n=2000, centers=16, spread=0.05, seed=11)
    pp = [kmeans(V, 16, iters=30, seed=s, backend=backend) for s in range(6)]
    rnd = [kmeans(V, 16, iters=30, seed=s, init="random", backend=backend) for s in range(6)]
    mean = lambda rs, i: sum(r.errors[i] for r in rs) / len(rs)  # noqa: E731
    assert mean(pp, 0) < 0.5 * mean(rnd, 0)
    assert mean(pp, -1) < mean(rnd, -1)
    assert sorted(r.errors[-1] for r in pp)[3] < 0.01   # most k-means++ runs found every cluster (spread^2 = 0.0025)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_reseeds_empty_clusters(backend):
    V = _blobs(n=800, centers=8, spread=0.2, seed=2)
    init = V[:8].clone()
    init[3] = 1e3                     # attracts no vector
    r = kmeans(V, 8, iters=1, init=init, backend=backend)
    assert r.iterations == 1 and r.errors[1] < r.errors[0]
    assert r.centroids[3].abs().max() < 100                        # moved onto a data point
    assert bool((V == r.centroids[3]).all(1).any())                # exactly a data point (not yet averaged)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_kmeans_lowers_the_error(backend):
    V = torch.randn(2000, 4, generator=torch.Generator().manual_seed(0))
    res = residual_kmeans(V, 16, 3, iters=20, backend=backend)
    assert len(res) == 3
    recon = torch.zeros_like(V)
    errs = []
    for r in res:
        recon = recon + r.centroids[r.codes]
        errs.append(float((V - recon).pow(2).mean()))
    assert errs[0] > errs[1] > errs[2]
    assert math.isclose(errs[0], res[0].errors[-1], rel_tol=1e-5)
    assert math.isclose(errs[1], res[1].errors[-1], rel_tol=1e-5)   # stage 2's error is the residual's


def test_kmeans_progress_bar(capsys):
    kmeans(torch.randn(200, 2), 4, iters=3, progress=True, backend="torch")
    assert "k-means" in capsys.readouterr().err


@pytest.mark.parametrize("call,exc,msg", [
    (lambda V: kmeans(V, 0), ValueError, "K must be an int >= 1"),
    (lambda V: kmeans(V, 101), ValueError, "K = 101 centroids need at least K vectors, got n = 100"),
    (lambda V: kmeans(V, 4, iters=-1), ValueError, "iters must be an int >= 0"),
    (lambda V: kmeans(V, 4, init="best"), ValueError, "init must be"),
    (lambda V: kmeans(V, 4, init=torch.zeros(3, 4)), ValueError, r"init as a tensor must be \(K, d\) = \(4, 4\)"),
    (lambda V: kmeans(V, 4, weights=-torch.ones(100)), ValueError, "weights must be finite, >= 0"),
    (lambda V: kmeans(V, 4, weights=torch.ones(99)), ValueError, r"weights must be \(100,\)"),
    (lambda V: kmeans(V.long(), 4), TypeError, "vectors must be float"),
    (lambda V: kmeans(V[:, 0], 4), ValueError, "vectors must be 2-D"),
    (lambda V: kmeans(V * float("nan"), 4), ValueError, "vectors must be finite"),
    (lambda V: kmeans(V, 4, tol=-1.0), ValueError, "tol must be"),
])
def test_kmeans_bad_arguments(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call(torch.randn(100, 4))


# ---- format helpers --------------------------------------------------------------------------------------
def test_code_dtype_and_bits_for():
    assert code_dtype(2) == torch.uint8 and code_dtype(256) == torch.uint8
    assert code_dtype(257) == torch.int16 and code_dtype(65536) == torch.int16
    with pytest.raises(ValueError, match="K must be an int in"):
        code_dtype(65537)
    assert bits_for(2) == (4, 256) and bits_for(3) == (2, 64) and bits_for(1) == (8, 256) and bits_for(4) == (2, 256)
    for b in (1, 2, 3, 4):
        d, K = bits_for(b)
        assert math.log2(K) / d == b
    with pytest.raises(ValueError, match="bits must be one of"):
        bits_for(5)


def test_pack_codes_layout_is_dense_little_endian():
    # 6-bit: 4 codes in 3 bytes; code i at bits [6i, 6i+6)
    p = pack_codes(torch.tensor([1, 2, 3, 4], dtype=torch.uint8), 6)
    word = 1 | 2 << 6 | 3 << 12 | 4 << 18
    assert p.tolist() == [word & 255, word >> 8 & 255, word >> 16]
    assert pack_codes(torch.tensor([1, 0, 3, 2, 1]), 2).tolist() == [1 | 0 << 2 | 3 << 4 | 2 << 6, 1]
    # 16-bit: low byte first; int16 codes are read as unsigned
    assert pack_codes(torch.tensor([-2, 258], dtype=torch.int16), 16).tolist() == [0xFE, 0xFF, 2, 1]
    with pytest.raises(ValueError, match="code 64 does not fit in bits = 6"):
        pack_codes(torch.tensor([64]), 6)
    with pytest.raises(TypeError, match="integer tensor"):
        pack_codes(torch.zeros(3), 6)


@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    vals = torch.randint(0, 1 << bits, (7, 13, 3), generator=g)
    dt = code_dtype(1 << bits)
    codes = torch.where(vals >= 32768, vals - 65536, vals).to(dt) if dt == torch.int16 else vals.to(dt)
    p = pack_codes(codes, bits)
    assert p.dtype == torch.uint8 and p.numel() == -(-vals.numel() * bits // 8)
    assert torch.equal(unpack_codes(p, bits, codes.shape, dt), codes)
    assert torch.equal(unpack_codes(p, bits, codes.shape, torch.int64), vals)


def test_pack_unpack_across_chunks():
    from kernelkit.vq import format as fmt
    n = fmt._CHUNK + 37
    vals = torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_codes(pack_codes(vals, 6), 6, (n,), torch.int64), vals)


def test_vq4dit_codebook_size_clamp():
    assert vq4dit_codebook_size(2, 4, 1152, 1152) == 256          # never binds for DiT-XL
    assert vq4dit_codebook_size(2, 4, 32, 32) == 64               # 1024 / 16 = 64
    assert vq4dit_codebook_size(2, 4, 32, 96) == 128              # 3072 / 16 = 192 -> 128
    assert vq4dit_codebook_size(3, 2, 1152, 1152) == 64
    assert vq4dit_codebook_size(2, 4, 2, 4) == 2                  # never below 2
    assert vq4dit_codebook_size(4, 8, 4096, 4096) == 65536        # int16 codes at most


# ---- quantize_ -------------------------------------------------------------------------------------------
class _Attn(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        return self.proj(a @ v)


class _Block(nn.Module):
    """DiT's block: attention and MLP with adaLN-Zero modulation from the conditioning c."""
    def __init__(self, h):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(h, elementwise_affine=False), nn.LayerNorm(h, elementwise_affine=False)
        self.attn = _Attn(h)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(h, 2 * h), nn.GELU(), nn.Linear(2 * h, h)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h))

    def forward(self, x, c):
        s1, g1, a1, s2, g2, a2 = self.adaLN_modulation(c).unsqueeze(1).chunk(6, -1)
        x = x + a1 * self.attn(self.norm1(x) * (1 + g1) + s1)
        return x + a2 * self.mlp(self.norm2(x) * (1 + g2) + s2)


class _TinyDiT(nn.Module):
    def __init__(self, h=32, depth=2, patch_dim=16, classes=10):
        super().__init__()
        self.x_embedder = nn.Sequential()
        self.x_embedder.proj = nn.Linear(patch_dim, h)
        self.t_embedder = nn.Sequential(nn.Linear(16, h), nn.SiLU(), nn.Linear(h, h))
        self.y_embedder = nn.Embedding(classes, h)
        self.blocks = nn.ModuleList(_Block(h) for _ in range(depth))
        self.final_layer = nn.Module()
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))
        self.final_layer.linear = nn.Linear(h, patch_dim)

    def forward(self, x, t, y):
        c = self.t_embedder(t) + self.y_embedder(y)
        x = self.x_embedder(x)
        for b in self.blocks:
            x = b(x, c)
        shift, scale = self.final_layer.adaLN_modulation(c).unsqueeze(1).chunk(2, -1)
        return self.final_layer.linear(x * (1 + scale) + shift)


BLOCK_LINEARS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_dit_preset_replaces_block_linears_only(backend):
    torch.manual_seed(0)
    model = _TinyDiT()
    x, t, y = torch.randn(2, 8, 16), torch.randn(2, 16), torch.tensor([1, 7])
    ref = model(x, t, y).detach()
    report = quantize_(model, bits=2, preset="dit", iters=15, progress=False, backend=backend)
    expected = [f"blocks.{i}.{n}" for i in range(2) for n in BLOCK_LINEARS]
    assert [r.name for r in report.layers] == expected
    replaced = {n for n, m in model.named_modules() if isinstance(m, VQLinear)}
    assert replaced == set(expected)
    kept = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert kept == {"x_embedder.proj", "t_embedder.0", "t_embedder.2", "final_layer.adaLN_modulation.1",
                    "final_layer.linear"} == set(report.skipped)
    # VQ4DiT's clamp on these small layers (h = 32): K = min(256, 2^floor(log2(out*in/16)))
    K = {r.name.split(".", 2)[2]: r.K for r in report.layers[:5]}
    assert K == {"attn.qkv": 128, "attn.proj": 64, "mlp.fc1": 128, "mlp.fc2": 128, "adaLN_modulation.1": 256}
    proj = report.layers[1]
    assert proj.index_bits == 1.5 and proj.bits > 1.5 and proj.d == 4 and proj.M == 1 and proj.iterations >= 1
    assert report.layers[4].index_bits == 2.0
    assert 0 < proj.rel_mse < 0.2 and 0 < report.rel_mse < 0.2
    out = model(x, t, y)
    assert rel_err(out, ref) < 0.5
    table = str(report)
    assert "blocks.0.attn.proj" in table and "1.500" in table and "total (10 layers)" in table
    assert "kept in full precision: x_embedder.proj" in table


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_filter_and_options(backend):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    report = quantize_(model, bits=3, filter=lambda name, m: m.out_features >= 128, M=2, scales=True, iters=10,
                       progress=False, backend=backend)
    assert isinstance(report, QuantizeReport)
    assert [r.name for r in report.layers] == ["0", "2"] and report.skipped == ["4"]
    assert isinstance(model[0], VQLinear) and isinstance(model[2], VQLinear) and type(model[4]) is nn.Linear
    assert model[0].M == 2 and model[0].scales is not None and (model[0].d, model[0].K) == (2, 64)
    r = report.layers[0]
    assert r.index_bits == 6.0                       # 2 codebooks of 6-bit codes per 2 weights
    cb_bits = 2 * 64 * 2 * 32 + 128 * 32             # fp32 codebooks and scales
    assert math.isclose(r.bits, 6.0 + cb_bits / (128 * 64))
    assert math.isclose(report.index_bits, 6.0) and report.numel == 128 * 64 + 128 * 128
    W = nn.Linear(64, 128)
    assert model(torch.randn(3, 64)).shape == (3, 10)
    with pytest.raises(TypeError, match="filter must be a callable"):
        quantize_(model, filter="fc")
    with pytest.raises(ValueError, match="preset must be None or one of"):
        quantize_(model, preset="vit")
    with pytest.raises(TypeError, match="model is itself an nn.Linear"):
        quantize_(W)


def test_quantize_is_deterministic_and_shows_a_progress_bar(capsys):
    def run(progress):
        torch.manual_seed(2)
        m = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 16))
        rep = quantize_(m, bits=2, iters=5, seed=3, progress=progress, backend="torch")
        return m, rep
    a, ra = run(True)
    assert "quantize_" in capsys.readouterr().err
    b, rb = run(False)
    assert capsys.readouterr().err == ""
    for la, lb in zip(a, b):
        assert torch.equal(la.codes, lb.codes) and torch.equal(la.codebooks, lb.codebooks)
    assert [r.rel_mse for r in ra.layers] == [r.rel_mse for r in rb.layers]


def test_quantize_d_and_k_overrides_and_padding():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(30, 64))
    rep = quantize_(model, bits=2, d=8, iters=5, progress=False, backend="torch")
    layer = model[0]
    # d=8 -> K = 2^16, clamped to 2^floor(log2(64*30/32)) = 32; 30 inputs padded to 32
    assert (layer.d, layer.K, layer.padded_in_features) == (8, 32, 32)
    assert math.isclose(rep.layers[0].index_bits, 64 * 4 * 5 / (64 * 30))
    assert model(torch.randn(2, 30)).shape == (2, 64)
    model = nn.Sequential(nn.Linear(64, 64))
    rep = quantize_(model, K=16, iters=5, progress=False, backend="torch")
    assert model[0].K == 16 and rep.layers[0].index_bits == 1.0
