"""Data-parallel training with torch.distributed: one code path for one process and for torchrun.

`torchrun --nproc_per_node N -m imgrec train ...` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK (and
TORCHELASTIC_RESTART_COUNT) in their environment; `setup` joins them into one process group (gloo on the
CPU, nccl on CUDA, each process on the GPU of its LOCAL_RANK) with a timeout, so that no collective waits for
ever. Without torchrun (or with one process) nothing here talks to anyone: every helper is a no-op and the
run is the plain single-process one.

What the rest of the program asks of it: who am I (`context`, `is_main`), wrap the model in
DistributedDataParallel (`wrap_model`), sum counts over processes (`sum_over_processes`), agree at a safe
point on stopping and saving (`agree`), run something on the main process and hand its result, or its
error, to all (`from_main`), gather each process's own part of a training state (`gather`), and end a
process that was in a group (`end_process`). Only the main process (rank 0) writes files. This
module never names a data set, a model or a command.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from imgrec.errors import ImgrecError, UsageError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """This process's place in the group: rank of world_size, its GPU (local_rank) and the backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" or "cpu:gloo,cuda:nccl"; None: a single process, no group

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, world_size), as the data loaders take it."""
        return self.rank, self.world_size


_context = Context()
_joined = False  # this process joined a group during this command (set by setup, kept after teardown)
# id(model) -> (which parameters required grad, its DDP wrapper); dropped with the group
_wrappers: dict[int, tuple[tuple[bool, ...], nn.Module]] = {}


def context() -> Context:
    """This process's place in the group (a single process when there is no group)."""
    return _context


def is_main() -> bool:
    """True in the process that writes files and logs: rank 0, or the only process."""
    return _context.is_main


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher that sets WORLD_SIZE and RANK) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def restart_count() -> int:
    """How often torchrun has restarted this group after a failure (TORCHELASTIC_RESTART_COUNT; 0 without it)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def setup(timeout_minutes: float) -> Context:
    """Join the process group torchrun prepared (no-op for a single process); returns this process's place.

    Collectives run on gloo for CPU tensors and, where there are GPUs, on nccl for CUDA tensors, each process on
    the GPU of its LOCAL_RANK. A collective that waits longer than timeout_minutes (a process died or hangs)
    fails instead of waiting for ever. The other processes log errors only: the main one speaks for all.
    """
    global _context, _joined
    if not launched_by_torchrun() or _context.distributed:
        return _context
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    missing = [k for k, v in env.items() if v is None]
    if missing:
        raise UsageError(f"WORLD_SIZE is set but {', '.join(missing)} is not: start several processes with torchrun")
    rank, world_size, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    backend = "gloo"
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"process {rank} has LOCAL_RANK {local_rank} but this machine has "
                             f"{torch.cuda.device_count()} GPUs: use --nproc_per_node {torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(local_rank)  # torch.device("cuda") now means this process's GPU
        backend = "cpu:gloo,cuda:nccl"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend, store=_attempt_store(rank, world_size, timeout), rank=rank, world_size=world_size,
                            timeout=timeout)
    _context = Context(rank, world_size, local_rank, backend)
    _joined = True
    if rank != 0:
        logging.getLogger().setLevel(logging.ERROR)
    return _context


@contextlib.contextmanager
def group_errors() -> Iterator[None]:
    """Within it, losing the other processes (one died, or a collective timed out) is an ImgrecError naming this
    process, not a traceback from deep inside torch: the process that failed first says why."""
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        text = str(exc)
        if not _context.distributed or not (isinstance(exc, dist.DistError) or "gloo" in text or "NCCL" in text):
            raise
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
        first = first.split("] ", 1)[-1][:160]  # without gloo's source position
        raise ImgrecError(f"process {_context.rank} of {_context.world_size} lost the others ({first}); the process "
                          f"that failed first says why (torchrun's report names it as the root cause)") from None


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store at MASTER_ADDR:MASTER_PORT, its keys under a prefix of this attempt.

    torchrun's agent keeps its store across the restarts of --max-restarts: without a prefix of its own, a
    restarted group would read the addresses of the processes that died and never connect. Without torchrun's
    agent (a launcher that only sets the variables), rank 0 serves the store.
    """
    agent_serves = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_serves, timeout=timeout, multi_tenant=True)
    return dist.PrefixStore(f"imgrec/attempt-{restart_count()}", store)


def teardown() -> None:
    """Leave the process group (no-op without one)."""
    global _context
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # nobody closes its connections while another process still talks over them
        dist.destroy_process_group()
    _wrappers.clear()
    _context = Context()


def joined_a_group() -> bool:
    """True once this process has joined a group (it stays True after `teardown`)."""
    return _joined


def end_process(code: int) -> int:
    """The exit code of a finished command; a process that joined a group exits here, with that code, without the
    interpreter's own shutdown.

    A gloo worker thread releases a collective's work after the collective has completed, and releasing tensors
    that came from Python takes the GIL. A process that ends soon after its last collective (the others after
    training, while the main one calibrates and tests; any of them after an error) would be shutting the
    interpreter down by then, and a worker thread that asks for the GIL during that shutdown aborts the process
    (std::terminate, SIGABRT), which fails the whole torchrun group. torch keeps the group's threads alive after
    destroy_process_group once a DistributedDataParallel has used it, so they cannot be joined first. Every file
    a process writes is closed by the time its command returns; what it printed is flushed here.
    """
    if not _joined:
        return code
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe: nothing left to say
            stream.flush()
    os._exit(code)


def sum_over_processes(*values: Any) -> list[Any]:
    """Each value (an int or a float) summed over all processes, keeping its type (float64 on the way: counts stay
    exact up to 2**53). Unchanged for one process."""
    if not _context.distributed:
        return list(values)
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)  # small CPU tensors: gloo, no GPU sync
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [round(total) if isinstance(v, int) else total for v, total in zip(values, tensor.tolist(), strict=True)]


def agree(*flags: bool) -> tuple[bool, ...]:
    """At a safe point: each flag True on all processes when it is True on any (one stop signal stops all)."""
    if not _context.distributed:
        return tuple(flags)
    tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in tensor.tolist())


def gather(obj: Any) -> list[Any]:
    """Every process's obj (picklable), in rank order, on every process; [obj] for a single process."""
    if not _context.distributed:
        return [obj]
    objects: list[Any] = [None] * _context.world_size
    dist.all_gather_object(objects, obj)
    return objects


def from_main(fn: Callable[[], T]) -> T:
    """Run fn on the main process only and return its result on every process; an ImgrecError (or UsageError)
    it raises is raised on every process, so that all stop with the same message."""
    if not _context.distributed:
        return fn()
    outcome: list[Any] = [None]
    if _context.is_main:
        try:
            outcome[0] = ("ok", fn())
        except ImgrecError as exc:
            outcome[0] = ("error", exc)
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def seed_processes(seed: int) -> None:
    """Give each process its own random stream (dropout) once the model exists; a single process keeps its own."""
    if _context.distributed:
        torch.manual_seed(seed * 1_000_003 + _context.rank)


def wrap_model(model: nn.Module, sync_bn: bool = False) -> nn.Module:
    """The model to train with: DistributedDataParallel over model in a group (with BatchNorm made
    SyncBatchNorm when asked), the model itself otherwise. Weights, state and evaluation use the model itself.

    DDP reduces the gradients of the parameters that required grad when it was built, so a model whose frozen
    part changed (a backbone unfrozen after its first epochs) gets a new wrapper.
    """
    if not _context.distributed:
        return model
    key = tuple(p.requires_grad for p in model.parameters())
    cached = _wrappers.pop(id(model), None)  # an outdated wrapper goes, and its gradient hooks with it
    if cached is not None and cached[0] == key:
        _wrappers[id(model)] = cached
        return cached[1]
    on_gpu = next(model.parameters()).is_cuda
    if sync_bn and cached is None:
        if not on_gpu:
            raise UsageError("--sync-bn needs GPUs (torch's SyncBatchNorm synchronises CUDA tensors only): drop it "
                             "on the CPU")
        convert_sync_bn(model)
    device_ids = [_context.local_rank] if on_gpu else None
    wrapper = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    _wrappers[id(model)] = (key, wrapper)
    return wrapper


def convert_sync_bn(model: nn.Module) -> int:
    """Replace every BatchNorm of model by a SyncBatchNorm in place (same parameters and buffers, same state-dict
    keys); returns how many there are."""
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if converted is not model:  # the model itself is a BatchNorm layer: nothing to convert in place
        raise UsageError("--sync-bn needs a model that contains BatchNorm layers, not a BatchNorm layer itself")
    count = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    log.info(f"--sync-bn: {count} BatchNorm layers synchronise their batch statistics over "
             f"{_context.world_size} processes")
    return count
