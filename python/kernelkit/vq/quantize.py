"""The k-means quantizer: k-means++ seeding, Lloyd iterations on the assignment kernel, residual k-means
for M additive codebooks, and :func:`quantize_`, which swaps a model's nn.Linear layers for VQLinear.

VQ4DiT (Deng et al., AAAI 2025, sec. 3.2; dengjuncan/VQ4DiT kmeans.py) initialises each layer's
codebook with k-means++ and 100 Lloyd iterations over the weight's sub-vectors W[o, g*d:(g+1)*d];
the codebook size is clamped for small layers to min(K, 2^floor(log2(n_out*n_in / (4d)))).  M > 1
(AQLM-style additive codebooks) is fit greedily: codebook m on the residual left by codebooks 0..m-1.

Every error here is the mean squared error per coordinate (per weight): sum_i w_i ||v_i - c(i)||^2 /
(d * sum_i w_i), so it compares directly with a weight MSE.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import _checks
from .format import bits_for, code_dtype, to_code_dtype
from .ops import assign
from .reference import dequantize_reference
from .._progress import bar as _bar


def _int(v, name: str, fn: str, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"{fn}: {name} must be an int >= {lo}, got {v!r}")
    return int(v)


# ---- k-means --------------------------------------------------------------------------------------
@dataclass
class KMeansResult:
    """centroids (K, d) in the vectors' compute dtype (float32, or float64 for float64 input); codes
    int64 (n,): each vector's nearest centroid; errors: errors[0] is the MSE of the seeds, errors[i]
    after i Lloyd iterations (never increasing); iterations = len(errors) - 1."""
    centroids: Tensor
    codes: Tensor
    errors: list
    iterations: int


def _nearest(V: Tensor, C: Tensor, backend) -> tuple[Tensor, Tensor]:
    idx, dist = assign(V, C, 1, backend=backend)
    return idx[:, 0].long(), dist[:, 0].double()


def _mse(dist: Tensor, w: Optional[Tensor], d: int) -> float:
    if w is None:
        return float(dist.mean()) / d if dist.numel() else 0.0
    return float((dist * w).sum() / w.sum()) / d


def _sample(p: Tensor, gen: torch.Generator) -> int:
    """One index drawn with probability proportional to p >= 0 (float64; total > 0): inverse CDF, so
    any n works (torch.multinomial stops at 2^24 categories)."""
    cum = torch.cumsum(p, 0)
    u = torch.rand((), generator=gen, dtype=torch.float64).item() * float(cum[-1])
    j = int(torch.searchsorted(cum, torch.tensor([u], dtype=cum.dtype, device=cum.device), right=True))
    return min(j, p.numel() - 1)


def _kmeanspp(V: Tensor, K: int, w: Optional[Tensor], gen: torch.Generator, backend) -> Tensor:
    """k-means++ (Arthur & Vassilvitskii 2007): each next seed drawn with probability proportional to
    w_i D(i)^2, D the distance to the nearest seed so far, updated incrementally (one pass per seed,
    the distances to the new seed from the assignment kernel with K = 1)."""
    n = V.shape[0]
    base = torch.ones(n, dtype=torch.float64, device=V.device) if w is None else w
    C = V.new_empty(K, V.shape[1])
    C[0] = V[_sample(base, gen)]
    D2 = _nearest(V, C[0:1], backend)[1]
    for k in range(1, K):
        p = D2 if w is None else D2 * base
        # fewer distinct (weighted) points than K: the remaining seeds are drawn by weight alone
        C[k] = V[_sample(p if float(p.sum()) > 0 else base, gen)]
        torch.minimum(D2, _nearest(V, C[k:k + 1], backend)[1], out=D2)
    return C


def _random_init(V: Tensor, K: int, w: Optional[Tensor], gen: torch.Generator) -> Tensor:
    """K distinct points drawn uniformly (among those of positive weight)."""
    cand = torch.arange(V.shape[0], device=V.device) if w is None else (w > 0).nonzero()[:, 0]
    if cand.numel() < K:
        cand = torch.arange(V.shape[0], device=V.device)
    perm = torch.randperm(cand.numel(), generator=gen)[:K].to(V.device)
    return V[cand[perm]].clone()


def kmeans(vectors: Tensor, K: int, *, iters: int = 100, seed: int = 0, weights: Optional[Tensor] = None,
           init="kmeans++", tol: float = 0.0, progress: bool = False, backend: Optional[str] = None) -> KMeansResult:
    """Lloyd's k-means of ``vectors`` (n, d) into K centroids.

    init: "kmeans++" (default), "random" (K distinct points) or a (K, d) tensor of starting centroids;
    random draws use a torch.Generator seeded with ``seed``, so a seed gives the same result every run.
    Each iteration moves every centroid to the (weighted) mean of its vectors and reassigns them with
    :func:`kernelkit.vq.assign` (the kernel; ``backend`` picks it).  A centroid left without vectors is
    re-seeded at the vectors farthest from their centroids.  An iteration whose error would rise (only
    possible through rounding) is discarded, so ``errors`` never increases.  Stops after ``iters``
    iterations, when the assignment no longer changes, or when an iteration lowers the error by no more
    than ``tol`` times the previous error.  weights: optional (n,) non-negative per-vector weights.
    progress: a tqdm bar over the iterations.
    """
    fn = "kernelkit.vq.kmeans"
    vectors = _checks.tensor(vectors, "vectors", fn, ndim=2)
    n, d = vectors.shape
    K = _int(K, "K", fn, 1)
    iters = _int(iters, "iters", fn, 0)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"{fn}: seed must be an int, got {seed!r}")
    if d < 1:
        raise ValueError(f"{fn}: vectors must have d >= 1 columns, got shape {tuple(vectors.shape)}")
    if K > n:
        raise ValueError(f"{fn}: K = {K} centroids need at least K vectors, got n = {n}")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol >= 0:
        raise ValueError(f"{fn}: tol must be a number >= 0, got {tol!r}")
    dt = torch.float64 if vectors.dtype == torch.float64 else torch.float32
    V = vectors.detach().to(dt).contiguous()
    if not bool(torch.isfinite(V).all()):
        raise ValueError(f"{fn}: vectors must be finite (found NaN or inf)")
    w = None
    if weights is not None:
        weights = _checks.tensor(weights, "weights", fn, ndim=1)
        if weights.shape[0] != n or weights.device != V.device:
            raise ValueError(f"{fn}: weights must be ({n},) on {V.device}, got shape {tuple(weights.shape)} on "
                             f"{weights.device}")
        w = weights.detach().double()
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0:
            raise ValueError(f"{fn}: weights must be finite, >= 0 and not all zero")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if isinstance(init, Tensor):
        if tuple(init.shape) != (K, d):
            raise ValueError(f"{fn}: init as a tensor must be (K, d) = {(K, d)}, got shape {tuple(init.shape)}")
        C = init.detach().to(device=V.device, dtype=dt).clone()
    elif init == "kmeans++":
        C = _kmeanspp(V, K, w, gen, backend)
    elif init == "random":
        C = _random_init(V, K, w, gen)
    else:
        raise ValueError(f"{fn}: init must be 'kmeans++', 'random' or a (K, d) tensor, got {init!r}")

    idx, dist = _nearest(V, C, backend)
    err = _mse(dist, w, d)
    errors = [err]
    ones = torch.ones(n, dtype=torch.float64, device=V.device) if w is None else w
    Vw = V.double() * ones.unsqueeze(1)
    bar = _bar(progress, total=iters, desc="k-means", leave=False)
    try:
        for _ in range(iters):
            sums = torch.zeros(K, d, dtype=torch.float64, device=V.device).index_add_(0, idx, Vw)
            counts = torch.zeros(K, dtype=torch.float64, device=V.device).index_add_(0, idx, ones)
            full = counts > 0
            newC = torch.where(full.unsqueeze(1), (sums / counts.clamp_min(1e-300).unsqueeze(1)).to(dt), C)
            empty = (~full).nonzero()[:, 0]
            if empty.numel():
                # re-seed at the worst-served vectors: a centroid with no vectors moved onto a data
                # point can only take vectors that get closer, so the error cannot rise
                far = torch.topk(dist * ones, min(empty.numel(), n)).indices
                newC[empty[:far.numel()]] = V[far]
            new_idx, new_dist = _nearest(V, newC, backend)
            new_err = _mse(new_dist, w, d)
            if new_err > err:  # rounding at convergence: keep the previous centroids
                break
            changed = empty.numel() > 0 or not torch.equal(new_idx, idx)
            gain = err - new_err
            C, idx, dist, prev, err = newC, new_idx, new_dist, err, new_err
            errors.append(err)
            bar.update(1)
            bar.set_postfix(mse=f"{err:.3e}")
            if not changed or gain <= tol * prev:
                break
    finally:
        bar.close()
    return KMeansResult(C, idx, errors, len(errors) - 1)


def residual_kmeans(vectors: Tensor, K: int, M: int, *, iters: int = 100, seed: int = 0,
                    weights: Optional[Tensor] = None, init="kmeans++", tol: float = 0.0, progress: bool = False,
                    backend: Optional[str] = None) -> list:
    """M additive codebooks, fit greedily: codebook m is k-means (seed + m) of the residual
    vectors - sum_{m' < m} C_m'[codes_m'].  Returns the M KMeansResults; the reconstruction is the sum
    of ``r.centroids[r.codes]`` over them (their errors are those of each stage's residual)."""
    fn = "kernelkit.vq.residual_kmeans"
    M = _int(M, "M", fn, 1)
    vectors = _checks.tensor(vectors, "vectors", fn, ndim=2)
    residual = vectors.detach().to(torch.float64 if vectors.dtype == torch.float64 else torch.float32)
    out = []
    for m in range(M):
        r = kmeans(residual, K, iters=iters, seed=seed + m, weights=weights, init=init, tol=tol, progress=progress,
                   backend=backend)
        out.append(r)
        if m + 1 < M:
            residual = residual - r.centroids[r.codes]
    return out


# ---- one weight matrix ------------------------------------------------------------------------------
@dataclass
class QuantizedWeight:
    """What :func:`quantize_weight` returns: the format's tensors for W (n_out, in_features) padded to
    G*d columns, plus the fit's numbers."""
    codes: Tensor                 # (n_out, G, M) uint8 / int16
    codebooks: Tensor             # (S, M, K, d) in W's dtype
    scales: Optional[Tensor]      # (n_out,) or None
    rows_per_codebook: int
    in_features: int
    iterations: int               # Lloyd iterations, summed over the codebooks and row sets
    sq_err: float                 # ||W - W_q||^2 (float64, W_q as stored)
    sq_norm: float                # ||W||^2

    @property
    def rel_mse(self) -> float:
        return self.sq_err / self.sq_norm if self.sq_norm > 0 else 0.0


def quantize_weight(W: Tensor, *, d: int, K: int, M: int = 1, scales: bool = False,
                    rows_per_codebook: Optional[int] = None, iters: int = 100, seed: int = 0, init="kmeans++",
                    progress: bool = False, backend: Optional[str] = None) -> QuantizedWeight:
    """Codes and codebooks for W (n_out, n_in) by k-means over its sub-vectors W[o, g*d:(g+1)*d].

    When d does not divide n_in, W is padded with zero columns to G*d = ceil(n_in/d)*d (the layer then
    pads its input with zeros, so the pad never contributes).  scales=True first divides each row by its
    RMS (kept as the layer's per-row scale, AQLM's layout), so rows of different magnitude share a
    codebook.  rows_per_codebook: a separate set of codebooks per block of that many output rows."""
    fn = "kernelkit.vq.quantize_weight"
    W = _checks.tensor(W, "W", fn, ndim=2).detach()
    n_out, n_in = W.shape
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    Wc = W.to(dt)
    G = -(-n_in // d)
    code_dtype(K)
    if rows_per_codebook is None:
        rows_per_codebook = max(n_out, 1)
    rows_per_codebook = _int(rows_per_codebook, "rows_per_codebook", fn, 1)
    S = max(1, -(-n_out // rows_per_codebook))
    s = None
    if scales:
        s = Wc.pow(2).mean(1).sqrt()
        s = torch.where(s > 0, s, torch.ones_like(s))
        Wc = Wc / s.unsqueeze(1)
    Wp = torch.nn.functional.pad(Wc, (0, G * d - n_in)) if G * d != n_in else Wc
    codes = torch.empty(n_out, G, M, dtype=torch.int64, device=W.device)
    books = torch.zeros(S, M, K, d, dtype=dt, device=W.device)
    iterations = 0
    for si in range(S):
        lo, hi = si * rows_per_codebook, min(n_out, (si + 1) * rows_per_codebook)
        vecs = Wp[lo:hi].reshape(-1, d)
        if vecs.shape[0] < K:
            raise ValueError(f"{fn}: K = {K} codewords exceed the {vecs.shape[0]} sub-vectors of d = {d} in "
                             f"rows {lo}..{hi - 1} of W {tuple(W.shape)}; use a smaller K (vq4dit_codebook_size)")
        res = residual_kmeans(vecs, K, M, iters=iters, seed=seed + 1000 * si, init=init, progress=progress,
                              backend=backend)
        for m, r in enumerate(res):
            books[si, m] = r.centroids
            codes[lo:hi, :, m] = r.codes.view(hi - lo, G)
            iterations += r.iterations
    codes = to_code_dtype(codes, K)
    books = books.to(W.dtype)
    s_out = None if s is None else s.to(W.dtype)
    Wq = dequantize_reference(codes, books.double(), None if s_out is None else s_out.double(),
                              rows_per_codebook)[:, :n_in]
    W64 = W.double()
    return QuantizedWeight(codes, books, s_out, rows_per_codebook, n_in, iterations,
                           float((Wq - W64).pow(2).sum()), float(W64.pow(2).sum()))


def format_bits(n_out: int, n_in: int, d: int, K: int, M: int, S: int, codebook_bits: int,
                scale_bits: int = 0) -> tuple[float, float]:
    """(index bits per weight, bits per weight with the codebooks and scales) of an (n_out, n_in) layer,
    per real weight (a padded last group counts its codes in full)."""
    G = -(-n_in // d)
    numel = max(n_out * n_in, 1)
    idx = n_out * G * M * math.log2(K) / numel
    return idx, idx + (S * M * K * d * codebook_bits + n_out * scale_bits) / numel


# ---- quantize_ ----------------------------------------------------------------------------------------
@dataclass
class LayerQuantReport:
    """One replaced layer: index_bits = M log2(K) / d per weight (codebooks excluded); bits adds the
    codebooks (and scales) spread over the weights; rel_mse = ||W - W_q||^2 / ||W||^2; iterations:
    Lloyd iterations summed over the M codebooks."""
    name: str
    shape: tuple
    d: int
    K: int
    M: int
    index_bits: float
    bits: float
    rel_mse: float
    iterations: int
    sq_err: float = field(default=0.0, repr=False)
    sq_norm: float = field(default=0.0, repr=False)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class QuantizeReport:
    """What :func:`quantize_` did: ``layers`` (one LayerQuantReport per replaced nn.Linear) and
    ``skipped`` (the names of the nn.Linear layers left in full precision).  Totals are weighted by the
    layers' weight counts; ``rel_mse`` is sum ||W - W_q||^2 / sum ||W||^2 over the replaced layers."""
    layers: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.layers)

    @property
    def index_bits(self) -> float:
        return sum(r.index_bits * r.numel for r in self.layers) / max(self.numel, 1)

    @property
    def bits(self) -> float:
        return sum(r.bits * r.numel for r in self.layers) / max(self.numel, 1)

    @property
    def rel_mse(self) -> float:
        den = sum(r.sq_norm for r in self.layers)
        return sum(r.sq_err for r in self.layers) / den if den > 0 else 0.0

    def __str__(self) -> str:
        head = ("layer", "shape", "d", "K", "M", "idx bits/w", "bits/w +cb", "rel MSE", "iters")
        rows = [(r.name, f"{r.shape[0]}x{r.shape[1]}", str(r.d), str(r.K), str(r.M), f"{r.index_bits:.3f}",
                 f"{r.bits:.3f}", f"{r.rel_mse:.3e}", str(r.iterations)) for r in self.layers]
        rows.append((f"total ({len(self.layers)} layers)", f"{self.numel} w", "", "", "", f"{self.index_bits:.3f}",
                     f"{self.bits:.3f}", f"{self.rel_mse:.3e}", str(sum(r.iterations for r in self.layers))))
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

        def line(cells):
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows[:-1]]
        out += [line(["-" * w for w in widths]), line(rows[-1])]
        if self.skipped:
            out.append(f"kept in full precision: {', '.join(self.skipped)}")
        return "\n".join(out)


PRESETS = ("dit",)


def in_dit_blocks(name: str) -> bool:
    """The "dit" preset's rule: a module is inside the transformer blocks when a component of its
    qualified name is ``blocks`` (DiT's ModuleList: blocks.3.attn.qkv, blocks.3.mlp.fc1,
    blocks.3.adaLN_modulation.1, also under a wrapper: model.blocks.0...).  DiT's x/t/y embedders and
    final_layer (its adaLN included) are not, so they stay in full precision."""
    return "blocks" in name.split(".")


def quantize_(model: nn.Module, bits: int = 2, *, filter: Optional[Callable[[str, nn.Module], bool]] = None,
              preset: Optional[str] = None, d: Optional[int] = None, K: Optional[int] = None, M: int = 1,
              scales: bool = False, iters: int = 100, seed: int = 0, progress: bool = True,
              backend: Optional[str] = None) -> QuantizeReport:
    """Replace ``model``'s nn.Linear layers in place by :class:`~kernelkit.vq.VQLinear` fit by k-means.

    Layers: every module of exact type nn.Linear (not subclasses such as MultiheadAttention's
    out_proj, which its parent reads as a weight) that ``filter(name, module)`` accepts (default: all)
    and, with ``preset="dit"``, that lies inside the transformer blocks (:func:`in_dit_blocks`); with
    both, both must accept.  Format: ``bits`` -> (d, K) by :func:`kernelkit.vq.bits_for` (2 -> d=4,
    K=256); ``d`` / ``K`` override it (d alone: K = 2^(bits*d)).  Each layer's K is then clamped as
    VQ4DiT does: min(K, 2^floor(log2(n_out*n_in / (4d)))), at least 2 (the report shows the resulting
    bits).  M additive codebooks (residual k-means), per-row ``scales``, ``iters`` Lloyd iterations,
    ``seed``: see :meth:`VQLinear.from_linear`.  progress: a tqdm bar over the layers.
    Returns a :class:`QuantizeReport` (print it for a table)."""
    from .layers import VQLinear  # layers imports this module

    fn = "kernelkit.vq.quantize_"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    if type(model) is nn.Linear:
        raise TypeError(f"{fn}: model is itself an nn.Linear and cannot be replaced in place; "
                        "use VQLinear.from_linear")
    if filter is not None and not callable(filter):
        raise TypeError(f"{fn}: filter must be a callable (name, module) -> bool, got {type(filter).__name__}")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"{fn}: preset must be None or one of {PRESETS}, got {preset!r}")
    M = _int(M, "M", fn, 1)
    if d is None:
        d0, K0 = bits_for(bits)
    else:
        d0 = _int(d, "d", fn, 1)
        b = _int(bits, "bits", fn, 1)
        K0 = 1 << min(b * d0, 16)
    if K is not None:
        K0 = _int(K, "K", fn, 2)
        code_dtype(K0)
    targets, skipped = [], []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:
            continue
        ok = (preset != "dit" or in_dit_blocks(name)) and (filter is None or bool(filter(name, mod)))
        (targets if ok else skipped).append((name, mod))
    report = QuantizeReport(skipped=[n for n, _ in skipped])
    bar = _bar(progress, total=len(targets), desc="quantize_", unit="layer")
    try:
        for name, lin in targets:
            bar.set_postfix(layer=name)
            Kl = clamp_codebook_size(K0, d0, lin.out_features, lin.in_features)
            q = quantize_weight(lin.weight, d=d0, K=Kl, M=M, scales=scales, iters=iters, seed=seed, backend=backend)
            layer = VQLinear._from_quantized(q, lin.bias, backend=backend)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
            cb_bits = torch.finfo(q.codebooks.dtype).bits
            idx_b, all_b = format_bits(lin.out_features, lin.in_features, d0, Kl, M, q.codebooks.shape[0], cb_bits,
                                       cb_bits if q.scales is not None else 0)
            report.layers.append(LayerQuantReport(name, (lin.out_features, lin.in_features), d0, Kl, M, idx_b, all_b,
                                                  q.rel_mse, q.iterations, q.sq_err, q.sq_norm))
            bar.update(1)
    finally:
        bar.close()
    return report


def clamp_codebook_size(K: int, d: int, n_out: int, n_in: int) -> int:
    """min(K, 2^floor(log2(n_out*n_in / (4d)))), at least 2: VQ4DiT's clamp for small layers."""
    sub = n_out * n_in / (4 * d)
    cap = 1 << max(1, math.floor(math.log2(sub)) if sub >= 1 else 1)
    return max(2, min(K, cap))
