"""VQ4DiT on a tiny DiT: 2-bit k-means vector quantization, then zero-data calibration.

The model is a small DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers"): patchify, a
timestep and a class embedder (with a null class for classifier-free guidance), blocks of adaLN-Zero
modulated attention + MLP, an adaLN final layer, predicting the noise eps.  It trains here, briefly, on
a synthetic class-conditional image set (4-channel 16x16 "latents": class k is a soft blob at a
class-specific position and colour, with per-sample jitter of position, width and amplitude, plus a
faint texture), generated locally, with the DDPM objective (linear betas 1e-4 .. 0.02 over 1000 steps).

Then, as in VQ4DiT (Deng et al., AAAI 2025; dengjuncan/VQ4DiT):
- ``kernelkit.vq.quantize_(model, bits=2, preset="dit")``: every nn.Linear inside the blocks (qkv, proj,
  fc1, fc2, adaLN modulation) becomes a VQLinear (d = 4, K = 256: 2 bits/weight), k-means++ + Lloyd;
- ``kernelkit.vq.calibrate(teacher, student, trajectory)``: zero data, the FP model's own sampling
  trajectories (N(0, I) latents, random class labels, CFG) drive a block-output distillation of the
  candidate ratios, then of the codebooks.
Printed: the block-output MSE of k-means-only vs calibrated on held-out trajectories, and a sample
quality proxy for samples drawn from the same noise and labels: their MSE to the FP model's samples.
(A class-accuracy proxy was tried and dropped: after this short training even the FP model's samples
score chance with a nearest-class-mean classifier, so it said nothing.)

    python -m kernelkit.examples.vq4dit [--train-steps 1500] [--trajectories 8] [--sample-steps 50]
                                        [--hidden 64] [--depth 4] [--seed 0] [--threads 1] [--quiet]

Also a library for the tests: TinyDiT, DDPM (the schedule and a respaced ancestral sampler with CFG)
and ``teacher_trajectory`` (the calibration inputs).
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ---- the model -------------------------------------------------------------------------------------
def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (N,) -> (N, dim), as in DiT / ADM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def pos_embed_2d(hidden: int, grid: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding (grid*grid, hidden), as in DiT (MAE's)."""
    assert hidden % 4 == 0, "hidden must be a multiple of 4"
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(hidden // 4, dtype=torch.float64) / (hidden / 4))

    def emb(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([emb(xs), emb(ys)], dim=1).float()


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, hidden: int, ratio: float = 4.0):
        super().__init__()
        self.fc1 = nn.Linear(hidden, int(hidden * ratio))
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(int(hidden * ratio), hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block: the conditioning c gives shift/scale/gate for the attention and the MLP."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh_a, sc_a))
        return x + g_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh_m, sc_m))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TinyDiT(nn.Module):
    """DiT with DiT's module names (x_embedder, t_embedder, y_embedder, blocks, final_layer), so the
    "dit" preset of ``kernelkit.vq.quantize_`` picks exactly the Linear layers inside ``blocks``.

    forward(x (N, C, H, W), t (N,) integer timesteps, y (N,) labels in [0, num_classes], num_classes
    being the null label) -> eps (N, C, H, W).  ``init="dit"``: DiT's init (adaLN modulation and final
    layer zero: every block starts as the identity); ``init="random"``: every Linear normal-initialised,
    so that an untrained model already has non-trivial blocks (for tests)."""

    def __init__(self, in_channels: int = 4, input_size: int = 16, patch: int = 4, hidden: int = 64,
                 depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0, num_classes: int = 8,
                 class_dropout: float = 0.1, init: str = "dit"):
        super().__init__()
        if input_size % patch or hidden % heads:
            raise ValueError("TinyDiT: input_size must be a multiple of patch and hidden of heads")
        self.in_channels, self.input_size, self.patch = in_channels, input_size, patch
        self.num_classes, self.class_dropout = num_classes, class_dropout
        self.x_embedder = nn.Conv2d(in_channels, hidden, patch, stride=patch)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden)  # the last row: the null (CFG) label
        self.register_buffer("pos_embed", pos_embed_2d(hidden, input_size // patch)[None], persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden, patch, in_channels)
        self._init(init)

    def _init(self, init: str):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        if init == "dit":
            for blk in self.blocks:
                nn.init.zeros_(blk.adaLN_modulation[-1].weight)
                nn.init.zeros_(blk.adaLN_modulation[-1].bias)
            for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        elif init == "random":
            nn.init.normal_(self.y_embedder.weight, std=1.0)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=1.0 / math.sqrt(m.in_features))
                    nn.init.normal_(m.bias, std=0.1)
        else:
            raise ValueError(f"TinyDiT: init must be 'dit' or 'random', got {init!r}")

    def unpatchify(self, x: Tensor) -> Tensor:
        p, c, h = self.patch, self.in_channels, self.input_size // self.patch
        x = x.reshape(x.shape[0], h, h, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        if self.training and self.class_dropout > 0:  # label dropout: trains the unconditional model
            y = torch.where(torch.rand(y.shape, device=y.device) < self.class_dropout,
                            torch.full_like(y, self.num_classes), y)
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for blk in self.blocks:
            h = blk(h, c)
        return self.unpatchify(self.final_layer(h, c))


def cfg_inputs(x: Tensor, t: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """DiT's forward_with_cfg batch: [x, x] with labels [y, null]."""
    return torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, num_classes)])


def cfg_combine(eps: Tensor, cfg_scale: float) -> Tensor:
    cond, uncond = eps.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


# ---- DDPM --------------------------------------------------------------------------------------------
class DDPM:
    """Linear-beta DDPM (Ho et al. 2020) with eps prediction, fixed posterior variance ("fixed small"),
    and DiT's respacing: sampling with n steps uses the timesteps evenly spaced over the training
    range, with betas recomputed from alpha_bar at those timesteps (improved-diffusion's respace.py)."""

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.num_steps = num_steps
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1 - betas, 0)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        ab = self.alpha_bar.to(x0.device)[t].float().view(-1, *([1] * (x0.dim() - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def training_loss(self, model: nn.Module, x0: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        t = torch.randint(0, self.num_steps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        return F.mse_loss(model(self.q_sample(x0, t, noise), t, y), noise)

    def timesteps(self, n: int) -> list[int]:
        """The n sampling timesteps, increasing (0 and num_steps - 1 included)."""
        if not 1 <= n <= self.num_steps:
            raise ValueError(f"DDPM: the number of sampling steps must be in [1, {self.num_steps}], got {n}")
        return sorted({round(i * (self.num_steps - 1) / max(n - 1, 1)) for i in range(n)})

    @torch.no_grad()
    def sample(self, eps_fn: Callable[[Tensor, Tensor], Tensor], noise: Tensor, n_steps: int,
               generator: torch.Generator, clip: Optional[float] = None) -> Tensor:
        """Ancestral sampling from x_T = noise; eps_fn(x_t, t (N,) original timesteps) -> eps."""
        ts = self.timesteps(n_steps)
        ab = self.alpha_bar
        x = noise
        for i in reversed(range(len(ts))):
            a_t = float(ab[ts[i]])
            a_prev = float(ab[ts[i - 1]]) if i > 0 else 1.0
            beta = 1 - a_t / a_prev
            t = torch.full((x.shape[0],), ts[i], dtype=torch.long, device=x.device)
            eps = eps_fn(x, t)
            x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
            if clip is not None:
                x0 = x0.clamp(-clip, clip)
            mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
            z = torch.randn(x.shape, generator=generator).to(x.device)  # drawn at t = 0 too: same stream for all
            x = mean + (math.sqrt(beta * (1 - a_prev) / (1 - a_t)) * z if i > 0 else 0.0)
        return x


def cfg_sample(model: nn.Module, diffusion: DDPM, noise: Tensor, labels: Tensor, n_steps: int, cfg_scale: float,
               generator: torch.Generator, record: Optional[list] = None, clip: Optional[float] = None) -> Tensor:
    """Samples with classifier-free guidance (DiT's forward_with_cfg: cond and null label in one batch).
    With ``record``, each timestep's model input (x_in, t_in, y_in) is appended to it."""
    def eps_fn(x, t):
        args = cfg_inputs(x, t, labels, model.num_classes)
        if record is not None:
            record.append(tuple(a.clone() for a in args))
        return cfg_combine(model(*args), cfg_scale)

    return diffusion.sample(eps_fn, noise, n_steps, generator, clip)


@torch.no_grad()
def teacher_trajectory(model: nn.Module, n_steps: int = 50, batch: int = 4, num_classes: Optional[int] = None,
                       cfg_scale: float = 4.0, seed: int = 0, *, diffusion: Optional[DDPM] = None,
                       n_trajectories: int = 1) -> list[tuple]:
    """VQ4DiT's zero-data calibration inputs: the FP model's own sampling trajectories.

    Each trajectory starts from N(0, I) latents with ``batch`` random class labels; at every one of its
    ``n_steps`` (respaced DDPM) timesteps the model input is the CFG batch (x_t twice, t twice, labels
    then null labels: 2*batch rows), and the teacher takes the guided ancestral step to x_{t-1}.
    Returns the inputs of all timesteps of ``n_trajectories`` trajectories, in order, as ``args``
    tuples for ``model(*args)`` -- the ``trajectory`` argument of ``kernelkit.vq.calibrate``.
    Deterministic in ``seed``; the global RNG is not touched."""
    num_classes = model.num_classes if num_classes is None else num_classes
    diffusion = diffusion or DDPM()
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[tuple] = []
    try:
        for _ in range(n_trajectories):
            noise = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g).to(dev)
            labels = torch.randint(0, num_classes, (batch,), generator=g).to(dev)
            cfg_sample(model, diffusion, noise, labels, n_steps, cfg_scale, g, record=out)
    finally:
        model.train(was_training)
    return out


# ---- the synthetic data set --------------------------------------------------------------------------
def make_images(n: int, num_classes: int = 8, channels: int = 4, size: int = 16, seed: int = 0
                ) -> tuple[Tensor, Tensor]:
    """n images (n, channels, size, size) in about [-1, 1] and labels (n,): class k is a soft blob
    centred on a class-specific point of a circle, in a class-specific colour (channel mix), with
    per-sample jitter of centre (+-1 px), width and amplitude, on a faint random texture."""
    g = torch.Generator().manual_seed(seed)
    gc = torch.Generator().manual_seed(12345)  # the class definitions do not depend on the seed
    ang = 2 * math.pi * torch.arange(num_classes) / num_classes
    centres = torch.stack([size / 2 + size * 0.28 * torch.cos(ang), size / 2 + size * 0.28 * torch.sin(ang)], 1)
    colours = torch.randn(num_classes, channels, generator=gc)
    colours = colours / colours.norm(dim=1, keepdim=True) * math.sqrt(channels) * 0.7
    y = torch.randint(0, num_classes, (n,), generator=g)
    c = centres[y] + (torch.rand(n, 2, generator=g) * 2 - 1)
    width = 1.8 + 0.8 * torch.rand(n, 1, 1, generator=g)
    amp = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)
    grid = torch.arange(size, dtype=torch.float32)
    r2 = (grid.view(1, size, 1) - c[:, 0].view(n, 1, 1)) ** 2 + (grid.view(1, 1, size) - c[:, 1].view(n, 1, 1)) ** 2
    blob = torch.exp(-r2 / (2 * width ** 2)).unsqueeze(1)                          # (n, 1, H, W)
    img = amp * blob * colours[y].view(n, channels, 1, 1) - 0.3
    img = img + 0.05 * torch.randn(img.shape, generator=g)
    return img.clamp(-1, 1), y


def train_dit(model: TinyDiT, diffusion: DDPM, images: Tensor, labels: Tensor, steps: int, batch: int = 64,
              lr: float = 1e-3, seed: int = 0, quiet: bool = False) -> float:
    """AdamW with cosine decay on the DDPM loss; returns the mean loss of the last 10% of steps."""
    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    tail = []
    for s in tqdm(range(steps), desc="train DiT", disable=quiet, leave=False):
        idx = torch.randint(0, images.shape[0], (batch,), generator=g)
        loss = diffusion.training_loss(model, images[idx], labels[idx], g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if s >= steps - max(steps // 10, 1):
            tail.append(loss.item())
    model.eval()
    return sum(tail) / len(tail)


def main(argv=None):
    import kernelkit
    from kernelkit.vq import quantize_
    from kernelkit.vq.calibrate import calibrate

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-steps", type=int, default=1500)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--trajectories", type=int, default=8, help="calibration trajectories (batch 4 + CFG)")
    ap.add_argument("--sample-steps", type=int, default=50, help="DDPM sampling steps (calibration and samples)")
    ap.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the matrices are tiny, more threads mostly wait)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars, no calibration report")
    a = ap.parse_args(argv)
    if min(a.train_steps, a.hidden, a.depth, a.classes, a.trajectories, a.sample_steps) <= 0:
        ap.error("sizes and step counts must be positive")
    if a.threads is not None:
        torch.set_num_threads(a.threads)

    t0 = time.perf_counter()
    images, labels = make_images(16384, a.classes, seed=a.seed)
    torch.manual_seed(a.seed)
    fp = TinyDiT(hidden=a.hidden, depth=a.depth, num_classes=a.classes)
    diffusion = DDPM()
    train_loss = train_dit(fp, diffusion, images, labels, a.train_steps, seed=a.seed, quiet=a.quiet)
    t_train = time.perf_counter() - t0

    kmeans = copy.deepcopy(fp)
    qreport = quantize_(kmeans, bits=2, preset="dit", seed=a.seed, progress=not a.quiet)
    calibrated = copy.deepcopy(kmeans)
    calib_inputs = teacher_trajectory(fp, a.sample_steps, 4, a.classes, a.cfg, seed=a.seed + 1,
                                      diffusion=diffusion, n_trajectories=a.trajectories)
    held_out = teacher_trajectory(fp, a.sample_steps, 4, a.classes, a.cfg, seed=a.seed + 2,
                                  diffusion=diffusion, n_trajectories=2)
    t1 = time.perf_counter()
    report = calibrate(fp, calibrated, calib_inputs, eval_inputs=held_out, seed=a.seed, progress=not a.quiet)
    t_cal = time.perf_counter() - t1

    # samples from the same noise, labels and per-step noise for the three models
    n = 64
    g = torch.Generator().manual_seed(a.seed + 3)
    noise = torch.randn(n, fp.in_channels, fp.input_size, fp.input_size, generator=g)
    ys = torch.arange(n) % a.classes
    samples = {}
    for name, m in (("fp32", fp), ("k-means 2-bit", kmeans), ("calibrated 2-bit", calibrated)):
        samples[name] = cfg_sample(m.eval(), diffusion, noise, ys, a.sample_steps, a.cfg,
                                   torch.Generator().manual_seed(a.seed + 4))

    if not a.quiet:
        print(qreport)
        print()
        print(report)
        print()
    print(f"backends: {kernelkit.backends()}")
    print(f"TinyDiT hidden {a.hidden}, depth {a.depth}, {a.classes} classes, 4x16x16 latents, patch 4; trained "
          f"{a.train_steps} steps (final DDPM loss {train_loss:.4f}) in {t_train:.0f} s; calibrated on "
          f"{a.trajectories} trajectories x {a.sample_steps} steps in {t_cal:.0f} s")
    print(f"block-output MSE on held-out trajectories: k-means {report.mse_before:.4e}, calibrated "
          f"{report.mse_after:.4e} ({100 * (1 - report.mse_after / report.mse_before):+.1f}% lower)")
    print(f"{'model':18s} {'sample MSE to fp32':>18s}")
    for name, s in samples.items():
        print(f"{name:18s} {F.mse_loss(s, samples['fp32']).item():18.4e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
