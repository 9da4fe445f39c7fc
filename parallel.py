"""Distribution: train.py's model and batches over several processes under torchrun, with FSDP2.

`torchrun --nproc_per_node=N train.py` starts N processes (N GPUs with nccl, or N CPU processes
with gloo) and sets RANK and WORLD_SIZE in each. This file holds the distributed machinery (train.py and checkpoint.py
also ask `is rank 0?` to print and save once):
  - setup_distributed(): the process group and a 1-D device mesh, after checking the flags;
  - parallelize(): each block compiled in place, then sharded with FSDP2 (fully_shard), so its
    parameters are all-gathered just before its forward and freed after;
  - build_parallel_model(): meta device -> parallelize -> this rank's shards, filled from a seed
    checkpoint so the initial weights do not depend on the number of ranks;
  - what must be global is made global: the router's expert loads (SUM) here, the loss and the
    stop flag in train.py's step, QK-Clip's max logits (MAX) in train.py's optimizer step;
  - rank_rows(): each rank's rows of an eval batch;
  - Dist.close(): the process group torn down, with its threads, before the process exits
    (`distributed()`: setup and close around a block).
Without torchrun, Dist() is rank 0 of 1 and every collective is a no-op, so train.py has one code
path. The model (model.py) knows nothing of any of this; muonclip.py's sharded Muon step is the
one other place that talks to ranks (it receives the mesh through the parameters' DTensors).
"""
import contextlib
import datetime
import gc
import os
import traceback
import warnings

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from model import ModelArgs, Transformer, build_model

# init_weights() on the sharded model only fills buffers that matter; its random parameter values
# are replaced by the seed checkpoint's (build_parallel_model), so DTensor's CPU RNG is no concern.
warnings.filterwarnings("ignore", message="DTensor random operators")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not (device.index or 0) < torch.cuda.device_count():  # (0 without CUDA)
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                         f"use --device cpu (or auto)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu (or auto)")
    return device


class Dist:
    """Who this process is. Without torchrun: rank 0 of 1, no process group, no collectives."""

    def __init__(self, rank=0, world=1, mesh=None):
        self.rank, self.world, self.mesh = rank, world, mesh
        self.enabled = mesh is not None
        self.main = rank == 0

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=op)
        return t

    def barrier(self):
        if self.enabled:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (it writes, say, a cache), then the others (they read it)."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def close(self):
        """Destroy the process group, and make sure its threads end here, not in interpreter
        teardown. destroy_process_group() leaves gloo's three threads (two workers, one network
        loop) running: they stop only when the last reference to the ProcessGroup goes, and the
        DeviceMesh holds one, kept alive in turn by DTensor's sharding caches. A process that
        exits with them running dies now and then with `terminate called without an active
        exception` (SIGABRT), more often on a busy machine. Dropping the mesh's reference joins
        them now; tests/test_dist.py checks that a rank ends with one thread."""
        if not self.enabled:
            return
        dist.destroy_process_group()
        close_mesh(self.mesh)
        self.mesh, self.enabled = None, False


def close_mesh(mesh):
    """Drop a DeviceMesh's references to its (destroyed) process groups, then collect the FSDP
    and DTensor cycles that may still point at them, so the groups' threads are joined now."""
    registry = getattr(mesh, "_pg_registry", None)  # torch 2.13's DeviceMesh: name -> ProcessGroup
    if registry is None:
        warnings.warn("this torch's DeviceMesh has no _pg_registry: the process group's threads "
                      "may outlive it and abort the process at exit; see Dist.close()")
        return
    registry.clear()
    gc.collect()


def setup_distributed(args) -> tuple[Dist, torch.device]:
    """Start the process group when launched by torchrun (it sets RANK and WORLD_SIZE).
    Inputs are checked before any collective, so a bad flag fails on every rank alike."""
    if "RANK" not in os.environ:
        return Dist(), pick_device(args.device)
    from torch.distributed.device_mesh import init_device_mesh
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.batch_size % (args.grad_accum * world):
        raise ValueError(f"--batch-size {args.batch_size} (the global batch) must split evenly into "
                         f"--grad-accum {args.grad_accum} micro-batches on each of {world} ranks; "
                         f"use a multiple of {args.grad_accum * world}")
    device = pick_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = args.backend if args.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"--backend nccl needs CUDA devices, this run is on {device.type}; "
                         f"use --backend gloo (or auto)")
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.dist_timeout),
                                **({"device_id": device} if device.type == "cuda" else {}))
        mesh = init_device_mesh(device.type, (world,))
    except Exception as e:
        hint = " (or try --backend gloo)" if backend == "nccl" else ""
        raise ValueError(f"the {backend!r} process group could not start on rank {rank} of {world} "
                         f"({type(e).__name__}: {e}); check that MASTER_ADDR/MASTER_PORT are "
                         f"reachable and the port is free{hint}") from e
    return Dist(rank, world, mesh), device


@contextlib.contextmanager
def distributed(args):
    """(Dist, device) from setup_distributed() for the length of a block; then Dist.close(), also
    when the block fails."""
    d, device = setup_distributed(args)
    try:
        yield d, device
    except BaseException as e:
        # the traceback's frames hold the model, and through it the process group: free their
        # locals (the traceback still prints), so that close() can end the group's threads
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        d.close()


def parallelize(model: Transformer, mesh, compile: bool, device: torch.device) -> Transformer:
    """FSDP2, in place: each block is compiled (in place: state-dict keys stay free of
    `_orig_mod.`) and then sharded, so its parameters are all-gathered just before its forward and
    freed after; the root gets the embedding, final norm and head. Every parameter becomes a
    DTensor holding a block of rows (dim 0) on each rank; buffers (router biases) stay whole.
    On CUDA a block's gathered parameters are bf16 (gradients are reduced in fp32); its inputs are
    not cast, and the root (embedding, head) stays fp32, so the residual stream and the RoPE tables
    stay fp32 as in a single-GPU autocast run."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                               cast_forward_inputs=False)
          if device.type == "cuda" else MixedPrecisionPolicy())
    for layer in model.layers:
        if compile:
            layer.compile()
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh)
    return model


def build_parallel_model(margs: ModelArgs, d: Dist, device, seed: int, compile: bool) -> Transformer:
    """Meta device -> parallelize -> allocate only this rank's shards. The initial weights are
    the single-process ones whatever the number of ranks: rank 0 builds the full model on the CPU
    once (a "seed checkpoint") and each rank receives its rows of it."""
    with torch.device("meta"):
        model = Transformer(margs)
    parallelize(model, d.mesh, compile, device)
    model.to_empty(device=device)
    # buffers (rope tables, ...); the parameters get throwaway values (no seeded generator: on
    # DTensors the default RNG is the supported one), replaced by the seed checkpoint next
    model.init_weights()
    full = build_model(margs, "cpu", seed).state_dict() if d.main else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                               broadcast_from_rank0=True))
    return model


def make_model(margs: ModelArgs, d: Dist, device, seed: int, compile: bool) -> Transformer:
    """The model a run trains: sharded with FSDP2 under torchrun, else whole on `device`. Blocks
    are compiled in place when asked (state-dict keys stay free of `_orig_mod.`)."""
    if d.enabled:
        return build_parallel_model(margs, d, device, seed, compile)
    model = build_model(margs, device, seed=seed)
    if compile:
        for layer in model.layers:
            layer.compile()
    return model


def global_router_loads(model: Transformer, d: Dist) -> list[torch.Tensor] | None:
    """Every rank must move the router biases the same way: from the loads of the global batch."""
    moes = model.moe_layers()
    if not d.enabled or not moes:
        return None
    return list(d.all_reduce(torch.stack([m.expert_load for m in moes])))


def rank_rows(t: torch.Tensor, d: Dist) -> tuple[torch.Tensor, bool]:
    """This rank's rows of an eval batch. A short last batch may leave a rank none: it then runs
    one dummy row (every rank must join every forward's collectives) that is not counted."""
    rows = t.tensor_split(d.world)[d.rank]
    return (rows, True) if len(rows) else (t[:1], False)
