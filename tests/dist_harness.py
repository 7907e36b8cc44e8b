"""The harness of the torch.distributed tests (test_dist.py, test_mfac_dist.py): WORLD processes on the
gloo backend, started with torch.multiprocessing's spawn, meeting through a rendezvous file, bounded by
a timeout (the workers are killed when it runs out, and every collective times out on its own).

A worker is a module-level function ``fn(rank, world, out_dir, *args)`` of a test module; it writes its
results (JSON, checkpoints) under ``out_dir`` and the test reads them once the workers have exited.
Spawned children get the parent's sys.path (multiprocessing passes it on), so they import the same
kernelkit as the test; :func:`spawn` checks that they do.
"""
from __future__ import annotations

import datetime
import os
import pathlib
import time
import traceback

import pytest
import torch

WORLD = 2


def gloo_reason() -> str | None:
    """Why the gloo tests cannot run here, or None."""
    import torch.distributed as dist
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "the gloo backend is not available in this torch build"
    return None


def fsdp2_reason() -> str | None:
    """Why FSDP2 (fully_shard) and the distributed-checkpoint helpers cannot be used here, or None."""
    reason = gloo_reason()
    if reason:
        return reason
    try:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict  # noqa: F401
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        return f"torch.distributed.fsdp.fully_shard / torch.distributed.checkpoint.state_dict unavailable ({e})"
    return None


def _entry(rank: int, fn, world: int, init_file: str, out_dir: str, kernelkit_file: str | None, timeout: float,
           args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # WORLD processes on a small CI machine: no oversubscription
    try:
        if kernelkit_file is not None:
            import kernelkit
            if os.path.realpath(kernelkit.__file__) != os.path.realpath(kernelkit_file):
                raise RuntimeError(f"the worker imported {kernelkit.__file__}, the test {kernelkit_file}")
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            fn(rank, world, out_dir, *args)
        finally:
            dist.destroy_process_group()
    except BaseException:
        pathlib.Path(out_dir, f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def spawn(fn, out_dir, *args, world: int = WORLD, timeout: float = 120.0) -> None:
    """Run ``fn(rank, world, out_dir, *args)`` in ``world`` spawned processes of one gloo group and wait
    for them; pytest.fail (with the worker's traceback) when one fails or they run past ``timeout``
    seconds."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    out_dir = str(out_dir)
    init_file = os.path.join(out_dir, "rendezvous")
    try:
        import kernelkit
        kk_file = kernelkit.__file__
    except ImportError:
        kk_file = None
    ctx = mp.start_processes(_entry, args=(fn, world, init_file, out_dir, kk_file, timeout, args), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} gloo workers did not finish within {timeout:g} s")
    except ProcessException as e:
        errors = sorted(pathlib.Path(out_dir).glob("rank*.error"))
        detail = "\n".join(f"--- {p.stem}:\n{p.read_text()}" for p in errors) or str(e)
        pytest.fail(f"a gloo worker failed:\n{detail}", pytrace=False)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
