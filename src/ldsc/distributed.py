"""Several processes, one run: the collectives of a row-sharded run (the processes themselves are
started by Lightning: :class:`ldsc.runtime.strategies.ShardedDDPStrategy`, ``trainer=ddp`` on GPUs with
NCCL, ``trainer=ddp_cpu`` on gloo).

A run on ``P`` processes splits the images into ``P`` contiguous ranges (:func:`shard`); rank
``r`` holds its images' rows of every graph and of the eigenvector table (see
``docs/distributed.md``). Everything here is a no-op in a single process, so the maths modules
call these functions unconditionally.

Only dense tensors cross processes (NCCL reduces no sparse ones). Exchanges of CPU data (neighbour
lists while graphs are built, the checkpoint's rows) go through a gloo group, so they also work
when the default group is NCCL; products of the solver use the default group on the run's device.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """Whether this process is one of several of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def launch_rank() -> int:
    """This process's global rank as its launcher announced it in the environment (usable before
    the process group exists): ``RANK`` / ``SLURM_PROCID``, else Lightning's ``NODE_RANK`` and
    ``LOCAL_RANK`` (0 when neither is set: a plain single process, or the launching rank 0)."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit() and (var != "SLURM_PROCID" or int(os.environ.get("SLURM_NTASKS", "1")) > 1):
            return int(os.environ[var])
    node, local = int(os.environ.get("NODE_RANK", "0") or 0), int(os.environ.get("LOCAL_RANK", "0") or 0)
    return node * 1_000 + local  # not the global rank, but non-zero exactly when it is


def shard(n: int, parts: int | None = None, index: int | None = None) -> tuple[int, int]:
    """``[start, end)`` of part ``index`` of ``range(n)`` split into ``parts`` contiguous, balanced
    parts (default: this process's part of ``world_size()``)."""
    parts = world_size() if parts is None else int(parts)
    index = rank() if index is None else int(index)
    base, extra = divmod(int(n), parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def shard_bounds(n: int, parts: int | None = None) -> list[int]:
    """``[0, end_0, end_1, ..., n]``: the boundaries of every part of :func:`shard`."""
    parts = world_size() if parts is None else int(parts)
    return [0] + [shard(n, parts, i)[1] for i in range(parts)]


@lru_cache(maxsize=None)
def _gloo_group():
    return dist.new_group(backend="gloo")


def cpu_group():
    """A process group that moves CPU tensors: the default one, or a gloo twin of an NCCL one."""
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return _gloo_group()


def _group_for(t: Tensor):
    return cpu_group() if t.device.type == "cpu" else dist.group.WORLD


def all_reduce_sum(t: Tensor) -> Tensor:
    """``t`` summed over the processes, in place (returned for chaining)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_group_for(t))
    return t


def all_reduce_max(value: float) -> float:
    """The largest ``value`` of all processes."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=cpu_group())
    return float(t)


def all_gather_rows(t: Tensor, counts: list[int] | None = None) -> Tensor:
    """The rows of every process's ``t`` stacked in rank order (``counts``: the rows each process
    holds, exchanged when not given; parts are padded to the largest for the collective)."""
    if not is_distributed():
        return t
    if counts is None:
        counts = _exchange_counts(t.shape[0])
    pad = _padded(t, max(counts))
    parts = [torch.empty_like(pad) for _ in counts]
    dist.all_gather(parts, pad.contiguous(), group=_group_for(t))
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def gather_rows(t: Tensor, dst: int = 0) -> Tensor | None:
    """The rows of every process's CPU tensor ``t`` stacked in rank order on rank ``dst`` (other
    ranks get ``None``); only ``dst`` holds the whole."""
    if not is_distributed():
        return t
    t = t.cpu().contiguous()
    counts = _exchange_counts(t.shape[0])
    pad = _padded(t, max(counts))
    parts = [torch.empty_like(pad) for _ in counts] if rank() == dst else None
    dist.gather(pad, parts, dst=dst, group=cpu_group())
    if rank() != dst:
        return None
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def all_to_all_rows(t: Tensor, send_counts: list[int]) -> Tensor:
    """Send rows ``[sum(send_counts[:j]), sum(send_counts[:j+1]))`` of the CPU tensor ``t`` to
    rank ``j``; returns the rows every rank sent here, in rank order."""
    if not is_distributed():
        return t
    send = torch.tensor(send_counts, dtype=torch.long)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=cpu_group())
    out = t.new_empty(int(recv.sum()), *t.shape[1:])
    dist.all_to_all_single(out, t.contiguous(), recv.tolist(), send_counts, group=cpu_group())
    return out


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src``, on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=cpu_group())
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier(group=cpu_group())


def _padded(t: Tensor, rows: int) -> Tensor:
    """``t`` with zero rows appended up to ``rows`` (collectives need equal shapes)."""
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _exchange_counts(n: int) -> list[int]:
    c = torch.tensor([n], dtype=torch.long)
    parts = [torch.empty_like(c) for _ in range(world_size())]
    dist.all_gather(parts, c, group=cpu_group())
    return [int(p) for p in parts]


#: seconds rank 0 is given to finish by itself once a process it launched has ended with an error
#: (a stop by a signal, a refused setting) before the launcher's observer kills it
OBSERVER_GRACE_S = 60.0


def patient_child_observer(grace_s: float = OBSERVER_GRACE_S) -> bool:
    """Rank 0 of a run whose other processes Lightning launched: delay the launcher's observer.

    Lightning watches the processes it launched and, as soon as one of them exits with a non-zero
    code, kills every process of the run *including rank 0* with SIGKILL (so that none hangs in a
    collective forever). When all processes stop together — a signal agreed at an iteration, an
    error all of them raise — a launched process may finish a moment before rank 0, which is then
    killed while it writes its checkpoint or prints the sentence saying how to resume (exit -9).
    With this, the observer waits ``grace_s`` seconds first; rank 0 normally exits within them (the
    observer is a daemon thread and ends with it), and a rank 0 stuck in a collective is still killed.
    Returns whether an observer was found."""
    import threading
    import time

    found = False
    for thread in threading.enumerate():
        terminate = getattr(thread, "_terminate_all", None)
        if thread.name != "child-process-observer" or terminate is None or getattr(terminate, "patient", False):
            continue

        def patient(terminate=terminate) -> None:
            time.sleep(grace_s)
            terminate()

        patient.patient = True
        thread._terminate_all = patient
        found = True
    return found
