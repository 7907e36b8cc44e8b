"""What every family's Triton test file needs before its tests: the Triton interpreter switched on when
there is no GPU (before triton is first imported), the module skipped when neither runs, and the
family's kernels and pure-torch reference loaded, from the installed kernelkit or else from this
checkout (kernels/<family>.py and python/kernelkit/<family>/reference.py: an installed kernelkit may
predate the family).  Call ``load(family)`` at the top of the test module."""
from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
_REPO = pathlib.Path(__file__).resolve().parents[1]


def load(family: str):
    """(kernels.<family> module, <family>.reference module)."""
    if not CUDA and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA GPU and the Triton interpreter is not enabled", allow_module_level=True)
    pytest.importorskip("triton")
    try:
        kernels = importlib.import_module(f"kernelkit.kernels.{family}")
    except ImportError:
        sys.path.insert(0, str(_REPO))
        kernels = importlib.import_module(f"kernels.{family}")
    try:
        reference = importlib.import_module(f"kernelkit.{family}.reference")
    except ImportError:   # an installed kernelkit without this family: the checkout's reference (torch only)
        spec = importlib.util.spec_from_file_location(f"_{family}_reference",
                                                      _REPO / "python" / "kernelkit" / family / "reference.py")
        reference = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(reference)
    return kernels, reference
