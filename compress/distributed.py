"""Process groups under ``torchrun``: whether this process is one of several, which one, and the few
collectives the pipeline and the training loop need. Imports nothing from compress above it.

``torchrun --nproc_per_node N -m compress run R`` starts N copies of ``compress run R`` with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``
set; :func:`init_from_env` joins them into one group (gloo on CPU, NCCL on CUDA). Without those
variables (``compress run R``) nothing here does anything: one process, rank 0 of 1.

Training inside a *collective* block (:func:`collective`) runs DistributedDataParallel; outside it
(a stage rank 0 runs alone) the loop trains in one process even when a group exists.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler, Subset

_state = {"collective": False}


def launched() -> bool:
    """Whether torchrun (or an equivalent launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def local_world_size() -> int:
    """Processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if launched() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the only process that writes the run directory, logs and progress."""
    return rank() == 0


def init_from_env(device: torch.device, timeout_s: float = 1800) -> torch.device:
    """Join the launcher's process group (once); return this process's device (``cuda:LOCAL_RANK`` on
    CUDA). Without a launcher, return ``device`` unchanged."""
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective() -> Iterator[None]:
    """Every rank runs the enclosed code in step: training inside it is data-parallel."""
    before = _state["collective"]
    _state["collective"] = True
    try:
        yield
    finally:
        _state["collective"] = before


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the enclosed code first, then the others (e.g. a download, then reading it)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def training_is_distributed() -> bool:
    return _state["collective"] and active()


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (pickled: for models whose structure a stage on
    rank 0 changed, and small records)."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_state(model: torch.nn.Module, src: int = 0) -> list[str]:
    """Overwrite every rank's parameters and buffers with rank ``src``'s (same structure on all
    ranks). Returns the names of the parameters that differed from rank ``src``'s before (empty
    after data-parallel training, whose replicas stay identical; buffers such as BatchNorm
    statistics are per-replica and not compared)."""
    if not active():
        return []
    signature = [(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
    if broadcast_object(signature, src) != signature:
        raise RuntimeError(f"rank {rank()}: the model's structure differs from rank {src}'s after a stage every rank "
                           "ran; that stage is not deterministic across processes")
    params = dict(model.named_parameters())
    differed = []
    for name, t in model.state_dict().items():
        mine = t.clone() if name in params else None
        dist.broadcast(t, src=src)
        if mine is not None and not torch.equal(mine, t):
            differed.append(name)
    return differed


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if not training_is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """``[rank 0's obj, rank 1's obj, ...]`` on every rank inside a collective block; ``[obj]``
    otherwise (small records such as a metric's sufficient statistics)."""
    if not training_is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


LOADER_OPTIONS = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
                  "generator", "pin_memory_device")


def loader_options(loader: DataLoader) -> dict:
    """The keyword arguments that rebuild ``loader`` over another sampler or dataset (workers,
    collate function, pinning, prefetch, generator)."""
    kw = {k: getattr(loader, k) for k in LOADER_OPTIONS if hasattr(loader, k)}
    if loader.num_workers > 0:
        kw.update(prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers)
    return kw


def shard_indices(n: int, rank_: int, world: int) -> range:
    """Rank ``rank_``'s items of ``n`` for evaluation: every ``world``-th from ``rank_``. The shards
    are disjoint and cover every item exactly once: a DistributedSampler would pad the last round
    with repeated items, and those would be counted twice in the metric."""
    return range(rank_, n, world)


def evaluation_shard(loader) -> DataLoader | None:
    """This rank's share of an evaluation ``loader`` inside a collective block (the same dataset,
    order, batch size and collate function over :func:`shard_indices`); None when evaluation is
    not split: outside a collective block, one process, or a loader that is not a map-style
    DataLoader (then every rank reads it whole)."""
    if not training_is_distributed() or not isinstance(loader, DataLoader) or loader.batch_size is None \
            or isinstance(loader.dataset, IterableDataset) or not isinstance(loader.sampler, SequentialSampler):
        return None
    subset = Subset(loader.dataset, shard_indices(len(loader.dataset), rank(), world_size()))
    return DataLoader(subset, batch_size=loader.batch_size, shuffle=False, drop_last=False, **loader_options(loader))


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks stop together)."""
    if not training_is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
