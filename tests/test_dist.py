"""The layers under torch.distributed: 2 processes on the gloo backend (dist_harness.spawn), one spawn
for the whole file; the workers run every case in sequence and write their figures (JSON) and
checkpoints, and the tests below read them (a module-scoped fixture).

1. MonarchLinear, SparseLinear and VQLinear (codebooks and scales trainable), each in a tiny model
   (layer -> ReLU -> nn.Linear), default backend (on CPU tensors: kernelkit's C++ kernels, checked by
   logging the kernelkit ops dispatched and their backend argument): 5 SGD-with-momentum steps under
   DDP and under FSDP2 (``fully_shard`` on the layer and on the root), each rank on its half of the
   global batch, against one process on the whole global batch from the same init (same seed): the
   loss trajectories (the ranks' losses averaged) and the final parameters agree to float32 rounding.
2. The FSDP2 model's sharded state_dict (``get_model_state_dict``) saved with
   ``torch.distributed.checkpoint`` loads back into an unsharded model in this (pytest) process, which
   has no process group, and into a fresh FSDP2 model (``set_model_state_dict``): exactly the gathered
   trained parameters, and the layers' index/code state.
3. RigL and SET under DDP: after every mask update the CSR index bytes (row_ptr, col_idx) are the same
   on both ranks, and equal the single-process run's on the global batch.  RigL averages its dense
   gradient over the ranks; SET takes rank 0's regrowth (the ranks here even use different generator
   seeds).  The controls (``process_group=False``: each rank on its own) do diverge, so the check can
   fail.
"""
from __future__ import annotations

import contextlib
import json
import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dist_harness import WORLD, fsdp2_reason, spawn

TIMEOUT = 150
KINDS = ("monarch", "sparse", "vq")
IN, HID, OUT, BATCH, STEPS, LR = 32, 48, 4, 16, 5, 0.05
SEED, OTHER_SEED = 0, 12345


# ---- the models and data (used by the workers and by the tests) ----------------------------------------
def _model(kind: str, seed: int) -> nn.Sequential:
    from kernelkit.monarch import MonarchLinear
    from kernelkit.sparse import SparseLinear
    from kernelkit.vq import VQLinear

    torch.manual_seed(seed)
    if kind == "monarch":
        layer = MonarchLinear(IN, HID, nblocks=4)
    elif kind == "sparse":
        layer = SparseLinear(IN, HID, sparsity=0.9)      # above the CPU break-even: the sparse kernels
    else:
        layer = VQLinear(IN, HID, scales=True)           # d=4, K=256 (2 bits), one codebook set
    # in place: FSDP2 drops its pre-backward hook when an in-place op follows a module's *view* output
    return nn.Sequential(layer, nn.ReLU(inplace=True), nn.Linear(HID, OUT))


def _batch(step: int, n_in: int = IN, n_out: int = OUT) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, n_in, generator=g), torch.randn(BATCH, n_out, generator=g)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The layer's parameters and its index/code state (sparse: row_ptr, col_idx; vq: the codes)."""
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, b in model.named_buffers():
        out[n] = b.detach().clone()
    return out


# ---- worker side --------------------------------------------------------------------------------------
class _KernelLog(TorchDispatchMode):
    """Records every kernelkit op dispatched inside it as 'op:backend:devices'."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "kernelkit":
            flat = list(args) + list(kwargs.values())
            backend = next((a for a in flat if isinstance(a, str)), "?")
            devices = sorted({a.device.type for a in flat if isinstance(a, torch.Tensor)})
            self.seen.add(f"{func._schema.name.split('::')[1]}:{backend}:{','.join(devices)}")
        return func(*args, **kwargs)


def _train(model, rank, world, distributed: bool):
    """STEPS steps of SGD with momentum on the global batches (distributed: this rank's half); returns
    the global batch's losses and the kernelkit ops of the first step."""
    import torch.distributed as dist

    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses, log = [], _KernelLog()
    for t in range(STEPS):
        x, y = _batch(t)
        if distributed:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        with log if t == 0 else contextlib.nullcontext():
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
        opt.step()
        loss = loss.detach().clone()
        if distributed:  # the global batch's loss: the mean of the ranks' (equal halves)
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    return losses, sorted(log.seen)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def _rank_spread(tensors: dict) -> float:
    """The largest difference of any floating tensor between the ranks."""
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1).double() for t in tensors.values() if t.is_floating_point()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max((g - gathered[0]).abs().max().item() for g in gathered)


def _same_on_ranks(t: torch.Tensor) -> bool:
    """Whether the bytes of ``t`` are the same on every rank."""
    import torch.distributed as dist

    b = t.detach().contiguous().view(torch.uint8).reshape(-1).clone()
    gathered = [torch.empty_like(b) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, b)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _layers_case(kind, rank, world, out_dir, mesh, res):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP
    import torch.distributed.checkpoint as dcp

    single = _model(kind, SEED)
    init = _state(single)
    l_single, ops_single = _train(single, rank, world, distributed=False)
    ref = _state(single)
    names = [n for n, _ in single.named_parameters()]
    fig = {"losses_single": l_single, "ops_single": ops_single,        # "moved": training does something
           "moved": _max_diff({k: ref[k] for k in names}, {k: init[k] for k in names})}

    ddp = DDP(_model(kind, SEED))
    l_ddp, ops_ddp = _train(ddp, rank, world, distributed=True)
    got = _state(ddp.module)
    fig["ddp"] = {"losses": l_ddp, "ops": ops_ddp, "loss_diff": max(abs(a - b) for a, b in zip(l_ddp, l_single)),
                  "param_diff": _max_diff(got, ref), "rank_spread": _rank_spread(got)}

    model = _model(kind, SEED)
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    l_fsdp, ops_fsdp = _train(model, rank, world, distributed=True)
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    full.update({n: b.detach().clone() for n, b in model.named_buffers()})
    local_numel = {n: p.to_local().numel() for n, p in model.named_parameters()}
    fig["fsdp2"] = {"losses": l_fsdp, "ops": ops_fsdp, "loss_diff": max(abs(a - b) for a, b in zip(l_fsdp, l_single)),
                    "param_diff": _max_diff(full, ref), "rank_spread": _rank_spread(full),
                    "local_numel": local_numel,
                    "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters())}

    # DCP: the sharded state_dict to disk; the gathered one beside it (rank 0) for the test to compare
    ckpt = os.path.join(out_dir, f"dcp_{kind}")
    sharded_sd = get_model_state_dict(model)
    fig["fsdp2"]["sd_dtensors"] = sorted(k for k, v in sharded_sd.items() if type(v).__name__ == "DTensor")
    dcp.save(sharded_sd, checkpoint_id=ckpt)
    full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"params": full, "state_dict": full_sd}, os.path.join(out_dir, f"full_{kind}.pt"))
    # ... and back into a fresh FSDP2 model of another init (resharded load on the same 2 ranks)
    fresh = _model(kind, OTHER_SEED)
    fully_shard(fresh[0], mesh=mesh)
    fully_shard(fresh, mesh=mesh)
    sd = get_model_state_dict(fresh)
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(fresh, sd)
    back = {n: p.full_tensor() for n, p in fresh.named_parameters()}
    back.update(dict(fresh.named_buffers()))
    fig["fsdp2"]["reload_diff"] = _max_diff(back, full)
    fig["fsdp2"]["reload_index_equal"] = all(torch.equal(back[k], full[k]) for k in full if not full[k].is_floating_point())
    x = _batch(99)[0]
    fig["fsdp2"]["reload_out_diff"] = (fresh(x) - model(x)).abs().max().item()
    res[kind] = fig


def _dst_case(algo, sync, rank, world, res):
    """RigL / SET on a 2-sparse-layer model under DDP (``sync``) or in one process (``sync=None``)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from kernelkit.sparse import SET, RigL, SparseLinear

    torch.manual_seed(SEED)
    inner = nn.Sequential(SparseLinear(IN, HID, sparsity=0.9), nn.ReLU(), SparseLinear(HID, OUT, sparsity=0.5))
    distributed = sync is not None
    model = DDP(inner) if distributed else inner
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    kw = {} if sync in (None, True) else {"process_group": False}
    if algo == "rigl":
        dst = RigL(model, opt, delta_t=2, t_end=8, **kw)
    else:   # different generator seeds on the two ranks: agreement must come from the library
        gen = torch.Generator().manual_seed(100 + (rank if distributed else 0))
        dst = SET(model, opt, delta_t=2, t_end=8, generator=gen, **kw)
    layers = [m for m in inner.modules() if isinstance(m, SparseLinear)]
    masks, agree = [], []
    for t in range(7):
        x, y = _batch(t)
        if distributed:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if dst.step():
            idx = [torch.cat([m.row_ptr, m.col_idx.to(torch.int64)]) for m in layers]
            masks.append([i.tolist() for i in idx])
            if distributed:   # right after the update: before DDP's next buffer broadcast
                agree.append(all(_same_on_ranks(i) for i in idx) and _same_on_ranks(torch.cat(
                    [m.values.detach() for m in layers])))
    out = {"masks": masks, "agree": agree, "updates": [h.step for h in dst.history],
           "changed": [sum(u.grown.numel() for u in h.layers.values()) for h in dst.history],
           "values": [m.values.detach().tolist() for m in layers]}
    res[f"{algo}_{'single' if sync is None else 'sync' if sync else 'nosync'}"] = out


def _worker(rank: int, world: int, out_dir: str) -> None:
    import warnings

    from torch.distributed.device_mesh import init_device_mesh

    from kernelkit._backend import KernelkitFallbackWarning

    warnings.simplefilter("error", KernelkitFallbackWarning)   # the cpu backend, or fail
    mesh = init_device_mesh("cpu", (world,))
    res: dict = {"rank": rank, "seconds": {}}
    for kind in KINDS:
        t0 = time.perf_counter()
        _layers_case(kind, rank, world, out_dir, mesh, res)
        res["seconds"][kind] = time.perf_counter() - t0
    for algo in ("rigl", "set"):
        t0 = time.perf_counter()
        for sync in (None, True, False):
            _dst_case(algo, sync, rank, world, res)
        res["seconds"][algo] = time.perf_counter() - t0
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


# ---- tests --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    reason = fsdp2_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("dist")
    spawn(_worker, out, world=WORLD, timeout=TIMEOUT)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
@pytest.mark.parametrize("kind", KINDS)
def test_loss_trajectory_equals_single_process(runs, kind, wrapper):
    _, res = runs
    for r in res:
        fig, w = r[kind], r[kind][wrapper]
        print(f"\n{kind} {wrapper} rank {r['rank']}: max |loss diff| {w['loss_diff']:.2e}, max |param diff| "
              f"{w['param_diff']:.2e}, spread over ranks {w['rank_spread']:.1e}")
        l0 = fig["losses_single"]
        assert max(l0) - min(l0) > 1e-2, l0            # the runs train: losses and parameters move
        assert fig["moved"] > 1e-2
        assert len(w["losses"]) == STEPS
        assert w["loss_diff"] <= 1e-5 * max(1.0, max(l0)), (w["losses"], l0)
        assert w["param_diff"] <= 1e-5, w
        assert w["rank_spread"] == 0.0, w               # the replicas / gathered shards are identical
    assert res[0][kind][wrapper]["losses"] == res[1][kind][wrapper]["losses"]


@pytest.mark.parametrize("kind", KINDS)
def test_layers_run_kernelkit_cpu_ops(runs, kind):
    """The default backend on CPU tensors is kernelkit's C++ one in every run (no fallback warning:
    the workers turn it into an error), forward and backward."""
    _, res = runs
    expect = {"monarch": {"monarch_fwd:cpu:cpu", "monarch_bwd:cpu:cpu"},
              "sparse": {"sparse_linear_fwd:cpu:cpu", "sparse_linear_bwd:cpu:cpu"},
              "vq": {"vq_linear_fwd:cpu:cpu", "vq_linear_bwd:cpu:cpu"}}[kind]
    for r in res:
        for ops in (r[kind]["ops_single"], r[kind]["ddp"]["ops"], r[kind]["fsdp2"]["ops"]):
            assert expect <= set(ops), ops
            assert all(o.split(":")[1] == "cpu" for o in ops), ops


@pytest.mark.parametrize("kind", KINDS)
def test_fsdp2_is_sharded(runs, kind):
    _, res = runs
    for r in res:
        w = r[kind]["fsdp2"]
        assert w["sharded"] and w["sd_dtensors"], w
    # the shards of the layer's parameters add up to the whole (each rank holds a part, not a copy)
    full = torch.load(runs[0] / f"full_{kind}.pt")["params"]
    for name, t in full.items():
        if name.startswith("0.") and t.is_floating_point() and t.shape[0] >= WORLD:
            local = [r[kind]["fsdp2"]["local_numel"][name] for r in res]
            assert sum(local) == t.numel() and max(local) < t.numel(), (name, local)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")   # no_dist=True: that is the point
@pytest.mark.parametrize("kind", KINDS)
def test_dcp_checkpoint_loads_into_unsharded_model(runs, kind):
    """dcp.load without a process group into a single-process model of another init: exactly the
    gathered trained parameters and index/code state; the fresh FSDP2 model reloaded in the workers
    too."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    out, res = runs
    assert not (dist.is_available() and dist.is_initialized())
    saved = torch.load(out / f"full_{kind}.pt")
    full, full_sd = saved["params"], saved["state_dict"]
    model = _model(kind, OTHER_SEED)
    before = _state(model)
    sd = model.state_dict()
    dcp.load(sd, checkpoint_id=str(out / f"dcp_{kind}"), no_dist=True)
    model.load_state_dict(sd)
    after = _state(model)
    assert after.keys() == full.keys()
    differs = [k for k in full if not torch.equal(before[k], full[k])]
    assert any(k.startswith("0.") for k in differs), differs       # the load has something to do
    for k in full:
        assert torch.equal(after[k], full[k]), k
    for k, v in full_sd.items():                                    # the state_dict (vq: packed codes)
        assert torch.equal(model.state_dict()[k], v), k
    x = _batch(7)[0]
    with torch.no_grad():
        ref = _model(kind, OTHER_SEED)
        ref.load_state_dict(full_sd)
        assert torch.equal(model(x), ref(x))
    for r in res:
        w = r[kind]["fsdp2"]
        print(f"\n{kind} rank {r['rank']}: resharded reload max diff {w['reload_diff']:.1e}, "
              f"output {w['reload_out_diff']:.1e}")
        assert w["reload_diff"] == 0.0 and w["reload_index_equal"] and w["reload_out_diff"] == 0.0, w


@pytest.mark.parametrize("algo", ["rigl", "set"])
def test_dst_masks_identical_on_ranks_and_equal_single_process(runs, algo):
    _, res = runs
    single = res[0][f"{algo}_single"]
    assert single == res[1][f"{algo}_single"]                      # the single run is deterministic
    assert len(single["updates"]) == 3 and all(c > 0 for c in single["changed"]), single["changed"]
    for r in res:
        run = r[f"{algo}_sync"]
        assert run["agree"] == [True] * 3, run["agree"]
        assert run["updates"] == single["updates"] and run["changed"] == single["changed"]
        assert run["masks"] == single["masks"]
        for a, b in zip(run["values"], single["values"]):
            assert max(abs(u - v) for u, v in zip(a, b)) <= 1e-5
    print(f"\n{algo}: updates at steps {single['updates']}, positions regrown {single['changed']}, masks equal on "
          f"both ranks and to the single process")


@pytest.mark.parametrize("algo", ["rigl", "set"])
def test_dst_without_sync_diverges(runs, algo):
    """The control: with process_group=False each rank updates its masks from its own half batch (RigL)
    or its own generator (SET), and they differ, so the synchronized run's agreement is the library's."""
    _, res = runs
    for r in res:
        assert r[f"{algo}_nosync"]["agree"][0] is False
