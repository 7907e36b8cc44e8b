"""VQ4DiT zero-data calibration of k-means-quantized layers (Deng et al., AAAI 2025, arXiv 2408.17131,
Sec. 3.3-3.4 and eqs. 5-10; followed here as the authors' code does it: dengjuncan/VQ4DiT,
CompressedLinear.py and gaussian_diffusion.py's calibration loop).

Each VQLinear of ``model_q`` (from ``kernelkit.vq.quantize_``: one codebook C (K, d), codes (n_out, G)) is
calibrated against the nn.Linear of the same qualified name in ``model_fp``:

- candidates: for every sub-vector w = W_fp[o, g*d:(g+1)*d], its n nearest codewords a_0..a_{n-1}
  (Euclidean distances dist_0 <= .. <= dist_{n-1}, by ``kernelkit.vq.assign``), fixed for the run;
- ratios r = softmax(z) over the candidates, z_i = log(dist_{n-1} / (dist_i + 1e-5)) for i < n-1 and
  z_{n-1} = 0, so r_i is proportional to 1/distance (exactly so for n = 2, up to the 1e-5);
- soft weight W[o, g*d:(g+1)*d] = sum_i r_i C[a_i] (two gathers and a blend in fp32, then F.linear
  with a dense W: fine for the small models this runs on; the hard-code kernels serve inference);
- loss per step = mean over blocks of MSE(block_q(x), block_fp(x)) (outputs captured with forward
  hooks, every block run and optimised together, the quantized model running on its own block outputs)
  plus the ratio regulariser R = mean over soft layers of n * mean(r (1 - r)) over the layer's
  unlocked sub-vectors.  As in the authors' loop, R is added only on the steps where it is above its
  running minimum (on a step where it reaches a new minimum, the minimum is updated and R is left out):
  the regulariser only pushes back when the ratios drift away from one-hot;
- after each optimiser step a sub-vector whose top ratio is > ``lock_threshold`` locks: its logits
  become one_hot(argmax) * 1e4 and its gradient is zeroed from then on; a layer with more than
  ``layer_lock_fraction`` of its sub-vectors locked goes hard: every sub-vector takes its argmax
  candidate as its code, the logits leave the computation and only then does the layer's codebook
  train; biases train throughout;
- RMSprop (alpha 0.9): lr 1e-4 for codebooks and biases, 5e-2 for the logits; one step per trajectory
  input (the authors: one per diffusion timestep of the FP model's own sampling trajectory).
At the end every layer is hard, and its codes, codebook and bias are written into the VQLinear (same
code dtype, same K and d: the bits per weight do not change).

The authors check the layer switch right after the next forward (before its backward); here it is
checked at the end of the step that locked the sub-vectors, which only moves it one step earlier.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import assign

LOCK_LOGIT = 1e4  # a locked sub-vector's logits: one_hot * 1e4 (softmax exactly one-hot in fp32)


# ---- the soft layer --------------------------------------------------------------------------------
class SoftVQLinear(nn.Module):
    """The calibration stand-in for one VQLinear (S = 1 codebook set, M = 1 codebook).

    Parameters (fp32 master copies, written back by :meth:`write_back`): ``codebook`` (K, d), trained
    only once the layer is hard; ``bias`` (n_out,) or None; ``logits`` (n_out*G, n), the candidate
    ratios' logits.  Buffers: ``candidates`` (n_out*G, n) int64 codeword indices, nearest first;
    ``locked`` (n_out*G,) bool; ``codes`` (n_out*G,) int64, valid once ``hard``.
    """

    def __init__(self, layer: nn.Module, weight_fp: Tensor, n_candidates: int = 2):
        super().__init__()
        cb = layer.codebooks
        if cb.dim() != 4 or cb.shape[0] != 1 or cb.shape[1] != 1:
            raise ValueError(f"kernelkit.vq.calibrate: only one codebook per layer (S = 1, M = 1) is supported, "
                             f"got codebooks of shape {tuple(cb.shape)}")
        if getattr(layer, "scales", None) is not None:
            raise ValueError("kernelkit.vq.calibrate: layers with per-row scales are not supported")
        _, _, K, d = cb.shape
        n_out, G = layer.codes.shape[0], layer.codes.shape[1]
        if not 1 <= n_candidates <= min(K, 8):
            raise ValueError(f"kernelkit.vq.calibrate: n_candidates must be in [1, min(K = {K}, 8)], "
                             f"got {n_candidates}")
        if weight_fp.shape != (n_out, layer.in_features):
            raise ValueError(f"kernelkit.vq.calibrate: the full-precision weight has shape {tuple(weight_fp.shape)} "
                             f"but the quantized layer is {layer.in_features} -> {n_out}")
        self.layer = [layer]  # a list: not registered as a submodule
        self.n_out, self.G, self.d, self.K, self.n = n_out, G, d, K, n_candidates
        self.in_features = layer.in_features
        dev = cb.device
        self.codebook = nn.Parameter(cb.detach()[0, 0].float().clone(), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone())
        w = weight_fp.detach().float().to(dev)
        if G * d != w.shape[1]:  # inputs padded by the quantizer: the padded columns are zero
            w = F.pad(w, (0, G * d - w.shape[1]))
        idx, dist2 = assign(w.reshape(-1, d).contiguous(), self.codebook.detach(), n_candidates)
        dist = dist2.clamp_min(0).sqrt()
        # z_i = log(dist_{n-1} / (dist_i + 1e-5)); the farthest candidate's logit 0.  (The clamp keeps an
        # exactly represented sub-vector, dist = 0 for every candidate, finite: z = log(1e-12 / 1e-5).)
        z = torch.log(dist[:, -1:].clamp_min(1e-12) / (dist + 1e-5))
        z[:, -1] = 0
        self.logits = nn.Parameter(z.contiguous())
        self.register_buffer("candidates", idx.long())
        self.register_buffer("locked", torch.zeros(n_out * G, dtype=torch.bool, device=dev))
        self.register_buffer("codes", idx[:, 0].long().clone())
        self.hard = False
        self.reg = None  # this forward's regulariser term (a 0-dim tensor), set by the soft forward

    # --- the weight ---
    def ratios(self) -> Tensor:
        return torch.softmax(self.logits, dim=-1)

    def weight(self) -> Tensor:
        """The dense fp32 W (n_out, in_features): soft (sum_i r_i C[a_i]) or hard (C[code])."""
        if self.hard:
            w = self.codebook[self.codes]
            self.reg = None
        else:
            r = self.ratios()
            unlocked = r[~self.locked]
            self.reg = (self.n * (unlocked * (1 - unlocked)).mean() if unlocked.numel() > 0
                        else r.new_zeros(()))
            w = torch.einsum("jn,jnd->jd", r, self.codebook[self.candidates])  # 2 gathers (n = 2) + blend
        return w.reshape(self.n_out, self.G * self.d)[:, :self.in_features]

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight()
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), b)

    # --- the schedule ---
    @torch.no_grad()
    def lock_(self, threshold: float) -> int:
        """Lock the sub-vectors whose top ratio passes ``threshold`` (logits -> one_hot * 1e4); returns
        how many are locked."""
        if self.hard:
            return int(self.locked.sum())
        top, arg = self.ratios().max(dim=-1)
        self.locked |= top > threshold
        hot = F.one_hot(arg[self.locked], self.n).to(self.logits.dtype) * LOCK_LOGIT
        self.logits[self.locked] = hot
        return int(self.locked.sum())

    def lock_fraction(self) -> float:
        return 1.0 if self.hard else float(self.locked.float().mean())

    @torch.no_grad()
    def harden_(self) -> None:
        """Every sub-vector takes its argmax candidate; the codebook starts training."""
        if self.hard:
            return
        arg = self.logits.argmax(dim=-1, keepdim=True)
        self.codes.copy_(self.candidates.gather(1, arg).squeeze(1))
        self.hard = True
        self.reg = None
        self.logits.requires_grad_(False)
        self.logits.grad = None
        self.codebook.requires_grad_(True)

    def zero_locked_grad_(self) -> None:
        if not self.hard and self.logits.grad is not None:
            self.logits.grad[self.locked] = 0

    @torch.no_grad()
    def write_back(self) -> None:
        """Harden (if needed) and store codes, codebook and bias into the VQLinear."""
        self.harden_()
        layer = self.layer[0]
        # int64 values in [0, K): set_codes_ checks them and stores them in the layer's code dtype
        layer.set_codes_(self.codes.view(self.n_out, self.G, 1).to(layer.codes.device))
        layer.codebooks.copy_(self.codebook.view(layer.codebooks.shape).to(layer.codebooks.dtype))
        if self.bias is not None:
            layer.bias.copy_(self.bias.to(layer.bias.dtype))


# ---- the report ------------------------------------------------------------------------------------
@dataclasses.dataclass
class CalibrationReport:
    """What :func:`calibrate` did.  ``loss``: the block-output distillation loss per step; ``reg``: the
    ratio regulariser per step and ``reg_added`` whether it was in that step's loss; ``lock_fraction``:
    per layer, the fraction of locked sub-vectors after each step (1.0 once hard); ``hard_step``: per
    layer, the step after which it went hard (None: forced to argmax at the end); ``mse_before`` /
    ``mse_after``: the block-output MSE (mean over blocks) of the k-means-only and the calibrated model
    on ``eval_inputs`` (``eval_held_out``: whether those were separate from the calibration inputs)."""
    steps: int
    layers: list[str]
    blocks: list[str]
    loss: list[float]
    reg: list[float]
    reg_added: list[bool]
    lock_fraction: dict[str, list[float]]
    hard_step: dict[str, Optional[int]]
    mse_before: float
    mse_after: float
    eval_held_out: bool
    bits: dict[str, float]

    def __str__(self) -> str:
        lines = [f"VQ4DiT calibration: {self.steps} steps, {len(self.layers)} layers in {len(self.blocks)} blocks"]
        if self.loss:
            k = max(1, self.steps // 10)
            lines.append(f"  block loss: first {self.loss[0]:.4e}, last-10% mean "
                         f"{sum(self.loss[-k:]) / len(self.loss[-k:]):.4e}; regulariser added on "
                         f"{sum(self.reg_added)} steps")
        where = "held-out inputs" if self.eval_held_out else "calibration inputs"
        lines.append(f"  block-output MSE ({where}): k-means {self.mse_before:.4e} -> calibrated {self.mse_after:.4e} "
                     f"({100 * (1 - self.mse_after / self.mse_before) if self.mse_before > 0 else 0.0:+.1f}% lower)")
        w = max((len(n) for n in self.layers), default=5)
        lines.append(f"  {'layer'.ljust(w)}  bits  locked@25%  locked@50%  locked@end  hard at step")
        for n in self.layers:
            fr = self.lock_fraction[n]
            at = lambda q: f"{100 * fr[min(len(fr) - 1, int(q * len(fr)))]:.1f}%" if fr else "-"  # noqa: E731
            hs = self.hard_step[n]
            lines.append(f"  {n.ljust(w)}  {self.bits[n]:4.2f}  {at(0.25):>10s}  {at(0.5):>10s}  {at(1.0):>10s}  "
                         f"{'end (argmax)' if hs is None else hs:>12}")
        return "\n".join(lines)


# ---- helpers ---------------------------------------------------------------------------------------
def _split(item) -> tuple[tuple, dict]:
    """A trajectory item: a tensor, an args tuple/list, or (args, kwargs)."""
    if isinstance(item, Tensor):
        return (item,), {}
    if (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], dict)
            and isinstance(item[0], (tuple, list))):
        return tuple(item[0]), dict(item[1])
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    raise TypeError(f"kernelkit.vq.calibrate: a trajectory item must be a tensor, an args tuple or (args, kwargs), "
                    f"got {type(item).__name__}")


def default_blocks(model: nn.Module) -> list[str]:
    """The children of the first nn.ModuleList attribute named ``blocks`` (DiT's layout)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] == "blocks":
            return [f"{name}.{i}" for i in range(len(mod))]
    raise ValueError("kernelkit.vq.calibrate: the model has no nn.ModuleList named 'blocks'; pass blocks=[...]")


def _first_tensor(out):
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"kernelkit.vq.calibrate: a block returned {type(out).__name__}, not a tensor")


@contextlib.contextmanager
def _capture(model: nn.Module, blocks: Sequence[str]):
    mods = dict(model.named_modules())
    missing = [b for b in blocks if b not in mods]
    if missing:
        raise ValueError(f"kernelkit.vq.calibrate: no module named {missing[0]!r} in the model")
    store: dict[str, Tensor] = {}
    handles = [mods[b].register_forward_hook(lambda m, i, o, b=b: store.__setitem__(b, _first_tensor(o)))
               for b in blocks]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _block_loss(fp: dict, q: dict, blocks: Sequence[str]) -> Tensor:
    return torch.stack([F.mse_loss(q[b].float(), fp[b].float()) for b in blocks]).mean()


@torch.no_grad()
def block_mse(model_fp: nn.Module, model_q: nn.Module, inputs: Iterable, blocks: Optional[Sequence[str]] = None
              ) -> float:
    """The mean over ``inputs`` of the mean over blocks of MSE(block_q, block_fp): both models run on
    each input (an args tuple, (args, kwargs) or a tensor) and their block outputs are compared."""
    blocks = list(blocks) if blocks is not None else default_blocks(model_q)
    total, count = 0.0, 0
    with _capture(model_fp, blocks) as a_fp, _capture(model_q, blocks) as a_q:
        for item in inputs:
            args, kwargs = _split(item)
            model_fp(*args, **kwargs)
            model_q(*args, **kwargs)
            total += float(_block_loss(a_fp, a_q, blocks))
            count += 1
    if count == 0:
        raise ValueError("kernelkit.vq.block_mse: no inputs")
    return total / count


def _is_vq(m: nn.Module) -> bool:
    """A VQLinear (kernelkit.vq.layers), recognised by its interface: codebooks, codes, set_codes_."""
    return hasattr(m, "codebooks") and hasattr(m, "codes") and callable(getattr(m, "set_codes_", None))


def _vq_layers(model_q: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model_q.named_modules() if _is_vq(m)}


def _set_module(model: nn.Module, name: str, mod: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, mod)


def _bits(layer: nn.Module) -> float:
    _, M, K, d = layer.codebooks.shape
    return M * math.log2(K) / d


# ---- calibrate -------------------------------------------------------------------------------------
def calibrate(model_fp: nn.Module, model_q: nn.Module, trajectory: Iterable, *, n_candidates: int = 2,
              lr_codebook: float = 1e-4, lr_bias: float = 1e-4, lr_ratio: float = 5e-2, alpha: float = 0.9,
              lock_threshold: float = 0.99, layer_lock_fraction: float = 0.99,
              blocks: Optional[Sequence[str]] = None, max_steps: Optional[int] = None,
              eval_inputs: Optional[Iterable] = None, seed: int = 0, progress: bool = True,
              layers: Optional[dict] = None) -> CalibrationReport:
    """VQ4DiT's zero-data calibration of ``model_q``'s VQLinear layers against ``model_fp`` (in place).

    Arguments:
        model_fp: the full-precision model (the teacher; not modified, run under no_grad).
        model_q: the same model with VQLinear layers (``kernelkit.vq.quantize_``) at the qualified names
            of ``model_fp``'s nn.Linear layers; one codebook per layer (S = M = 1), no scales.
        trajectory: an iterable of model inputs, one per optimiser step, each an args tuple, (args,
            kwargs) or a tensor: both models are called with it.  VQ4DiT uses the FP model's own sampling
            trajectory (x_t of the teacher at every timestep, with random labels and null labels for
            CFG): ``kernelkit.examples.vq4dit.teacher_trajectory`` makes it for the example's DiT.
        n_candidates: candidate codewords per sub-vector (n; the authors' code 2, the paper's best 3).
        lr_codebook, lr_bias, lr_ratio: RMSprop learning rates (1e-4, 1e-4, 5e-2 as published).
        alpha: RMSprop's smoothing constant (0.9 as published).
        lock_threshold: a sub-vector locks when its top ratio passes it (0.99).
        layer_lock_fraction: a layer goes hard when more than this fraction of its sub-vectors is locked.
        blocks: qualified names of the blocks whose outputs are matched (default: the children of the
            ModuleList named ``blocks``).
        max_steps: stop after this many trajectory items (default: all).
        eval_inputs: inputs on which the block-output MSE of the k-means-only model (before) and of the
            calibrated model (after) is reported; default: the calibration inputs themselves (then the
            trajectory is materialised as a list, and the report says the numbers are in-sample).
        seed: seeds torch's RNG for the run (inside ``torch.random.fork_rng``: the caller's RNG state is
            untouched) so that any randomness in the models' forward repeats; the algorithm itself is
            deterministic: the same inputs and seed give identical codes and codebooks.
        progress: a tqdm bar.
        layers: optional {name: nn.Linear-or-weight} override of the FP weights (default: looked up in
            ``model_fp`` by the VQLinear's name).

    Both models run in eval mode during the call (their modes are restored), and ``model_q``'s other
    parameters are frozen meanwhile (their requires_grad flags are restored).  Returns a
    :class:`CalibrationReport`.
    """
    fn = "kernelkit.vq.calibrate"
    if not 0 < lock_threshold < 1 or not 0 <= layer_lock_fraction < 1:
        raise ValueError(f"{fn}: lock_threshold must be in (0, 1) and layer_lock_fraction in [0, 1)")
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"{fn}: max_steps must be >= 0, got {max_steps}")
    vq = _vq_layers(model_q)
    if not vq:
        raise ValueError(f"{fn}: model_q has no VQLinear layer (quantize it with kernelkit.vq.quantize_ first)")
    fp_mods = dict(model_fp.named_modules())
    blocks = list(blocks) if blocks is not None else default_blocks(model_q)
    held_out = eval_inputs is not None
    if not held_out:
        trajectory = list(trajectory)
        if max_steps is not None:
            trajectory = trajectory[:max_steps]
        eval_inputs = trajectory
    else:
        eval_inputs = list(eval_inputs)

    modes = (model_fp.training, model_q.training)
    flags = [(p, p.requires_grad) for p in model_q.parameters()]
    model_fp.eval()
    model_q.eval()
    soft: dict[str, SoftVQLinear] = {}
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        mse_before = block_mse(model_fp, model_q, eval_inputs, blocks)
        for name, layer in vq.items():
            src = (layers or {}).get(name, fp_mods.get(name))
            if src is None:
                raise ValueError(f"{fn}: model_fp has no module named {name!r} (the VQLinear's name in model_q)")
            w = src if isinstance(src, Tensor) else getattr(src, "weight", None)
            if not isinstance(w, Tensor):
                raise ValueError(f"{fn}: model_fp.{name} has no weight tensor")
            soft[name] = SoftVQLinear(layer, w, n_candidates)
        for name, s in soft.items():
            _set_module(model_q, name, s)

        opt = torch.optim.RMSprop([
            {"params": [s.codebook for s in soft.values()], "lr": lr_codebook},
            {"params": [s.bias for s in soft.values() if s.bias is not None], "lr": lr_bias},
            {"params": [s.logits for s in soft.values()], "lr": lr_ratio},
        ], alpha=alpha)
        # RMSprop skips parameters without a gradient: the codebooks until their layer is hard.
        for s in soft.values():
            s.lock_(lock_threshold)  # an initial ratio may already pass the threshold
        loss_hist, reg_hist, reg_added = [], [], []
        lock_hist = {n: [] for n in soft}
        hard_step = {n: None for n in soft}
        reg_min = math.inf

        from tqdm import tqdm
        total = None
        if hasattr(trajectory, "__len__"):
            total = len(trajectory) if max_steps is None else min(len(trajectory), max_steps)
        bar = tqdm(total=total, desc="VQ4DiT calibration", disable=not progress, leave=False)
        with torch.random.fork_rng(devices=[]), _capture(model_fp, blocks) as a_fp, \
                _capture(model_q, blocks) as a_q:
            torch.manual_seed(seed)
            for step, item in enumerate(trajectory):
                if max_steps is not None and step >= max_steps:
                    break
                args, kwargs = _split(item)
                with torch.no_grad():
                    model_fp(*args, **kwargs)
                with torch.enable_grad():
                    model_q(*args, **kwargs)
                    loss = _block_loss(a_fp, a_q, blocks)
                    regs = [s.reg for s in soft.values() if not s.hard and s.reg is not None]
                    reg = torch.stack(regs).mean() if regs else loss.new_zeros(())
                    r = float(reg.detach())
                    add = r > reg_min  # the authors: added only when above its running minimum
                    if not add:
                        reg_min = r
                    total_loss = loss + reg if add else loss
                    opt.zero_grad(set_to_none=True)
                    total_loss.backward()
                for s in soft.values():
                    s.zero_locked_grad_()
                opt.step()
                for name, s in soft.items():
                    if not s.hard:
                        s.lock_(lock_threshold)
                        if s.lock_fraction() > layer_lock_fraction:
                            s.harden_()
                            hard_step[name] = step
                    lock_hist[name].append(s.lock_fraction())
                a_fp.clear()
                a_q.clear()
                loss_hist.append(float(loss.detach()))
                reg_hist.append(r)
                reg_added.append(add)
                bar.update(1)
                if progress:
                    bar.set_postfix(loss=f"{loss_hist[-1]:.3e}", hard=sum(s.hard for s in soft.values()))
        bar.close()
        for s in soft.values():
            s.write_back()
        for name, s in soft.items():
            _set_module(model_q, name, s.layer[0])
        mse_after = block_mse(model_fp, model_q, eval_inputs, blocks)
    finally:  # on an error too: the VQLinear layers back in place, flags and modes restored
        for name, s in soft.items():
            _set_module(model_q, name, s.layer[0])
        for p, flag in flags:
            p.requires_grad_(flag)
        model_fp.train(modes[0])
        model_q.train(modes[1])
    return CalibrationReport(steps=len(loss_hist), layers=list(soft), blocks=blocks, loss=loss_hist, reg=reg_hist,
                             reg_added=reg_added, lock_fraction=lock_hist, hard_step=hard_step,
                             mse_before=mse_before, mse_after=mse_after, eval_held_out=held_out,
                             bits={n: _bits(m) for n, m in vq.items()})
