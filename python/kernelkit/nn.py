"""Model surgery helpers."""
from __future__ import annotations

from typing import Callable

from torch import nn

from .monarch.layers import MonarchLinear


def replace_linear(model: nn.Module, nblocks: int = 4,
                   filter: Callable[[str, nn.Linear], bool] | None = None,  # noqa: A002 (public name)
                   backend: str | None = None) -> nn.Module:
    """Swap every nn.Linear of ``model`` for which ``filter(qualified_name, module)`` is true (all,
    if filter is None) for a MonarchLinear projected from its weight (kernelkit.monarch.project).
    Layers too narrow for ``nblocks`` are left alone.  Works in place and returns ``model``."""
    if isinstance(model, nn.Linear):
        raise TypeError("replace_linear: pass the parent module; a bare nn.Linear cannot be replaced in place "
                        "(use MonarchLinear.from_linear)")
    targets = [(name, mod) for name, mod in model.named_modules()
               if type(mod) is nn.Linear and min(mod.in_features, mod.out_features) >= nblocks
               and (filter is None or filter(name, mod))]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MonarchLinear.from_linear(mod, nblocks, backend=backend))
    return model
