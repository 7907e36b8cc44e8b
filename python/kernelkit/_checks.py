"""Argument checks at the Python boundary: one message per failure, naming the argument, what was
expected and what was received."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def tensor(t, name: str, fn: str, ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_nested:
        # the kernels read plain strided memory; sparse/nested tensors fail deep inside torch otherwise
        kind = "nested" if t.is_nested else str(t.layout).replace("torch.", "")
        raise TypeError(f"{fn}: {name} must be a dense (strided) tensor, got a {kind} tensor")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{fn}: {name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must be float32/float64/float16/bfloat16, got {t.dtype}")
    return t


def same(fn: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; cast them to one dtype")
        if t.device != ref.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def rows(t: torch.Tensor) -> torch.Tensor:
    """2-D tensor with unit inner stride and a row stride >= the width (what the kernels take);
    copies only when the layout is not already like that (e.g. transposed or expanded)."""
    def ok(u):
        return u.stride(1) == 1 and u.stride(0) >= u.size(1)
    if ok(t):
        return t
    t = t.contiguous()
    # contiguous() keeps any stride on a size-1 dimension (a single expanded row has row stride 0,
    # a (1, 1) expanded gradient strides (0, 0)), which the native checks reject: force a fresh copy.
    return t if ok(t) else t.clone(memory_format=torch.contiguous_format)


def not_a_view(y: torch.Tensor) -> torch.Tensor:
    """``y`` (a reshaped kernel output) as a tensor that is not a view, without a copy, as F.linear returns
    for batched inputs.  Layers return this: under FSDP2 an in-place op on a module's output view
    (``ReLU(inplace=True)``) drops the pre-backward hook that gathers the parameters again, and the
    backward then finds them freed.  Left alone under torch.compile (which traces views fine)."""
    if torch.compiler.is_compiling() or not y._is_view():
        return y
    return torch.ops.aten._unsafe_view(y, y.shape)
