"""Process groups: which parallel wrappers Kasmina composes with, and launching its ranks.

The coordinator (``kasmina.control.distributed``) decides what crosses between ranks; this module
holds what it stands on and what a launcher needs: the refusal of hosts whose weights are
sharded or re-replicated (FSDP, tensor parallelism, ``nn.DataParallel``), whether there is a
process group at all (``kasmina.utils.process_group``), the rank and device
helpers a collective needs, an initial broadcast, a plain gradient average for models without
DDP, and ``spawn`` / ``init_from_env`` / ``shutdown_process_group`` for one process per rank
(``torch.multiprocessing`` or ``torchrun``).
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kasmina.errors import KasminaError
from kasmina.utils.checks import check_positive, check_positive_int
from kasmina.utils.process_group import process_group_active

logger = logging.getLogger(__name__)

__all__ = [
    "UnsupportedParallelismError",
    "average_gradients",
    "broadcast_tensors",
    "check_supported_parallelism",
    "collective_device",
    "collective_timeout_s",
    "copy_into_grads",
    "default_backend",
    "fill_missing_grads",
    "find_free_port",
    "flat_grad",
    "global_rank",
    "grad_layout",
    "init_from_env",
    "shutdown_process_group",
    "spawn",
    "zero_grad",
]


class UnsupportedParallelismError(KasminaError):
    """The host is wrapped or sharded in a way Kasmina cannot replicate seeds over."""


def global_rank(group: Any, group_rank: int) -> int:
    """The global rank of ``group_rank`` in ``group`` (the default group: the same number)."""
    if group is None:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def collective_device(group: Any) -> torch.device:
    """NCCL needs CUDA tensors; every other backend here takes CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collective_timeout_s(group: Any = None) -> float:
    """Seconds a collective of ``group`` (None: the default group) waits for the other ranks
    before it fails: the timeout the group was created with. Torch exposes it only through
    private attributes (its backend's options), so where those cannot be read (another torch
    version or backend, no process group) this is torch's default collective timeout."""
    fallback = dist.distributed_c10d.default_pg_timeout.total_seconds()
    try:
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        seconds = float(pg._get_backend(collective_device(group)).options._timeout.total_seconds())
    except Exception:  # private API: any failure to read it means "unknown"
        logger.debug("the process group's timeout cannot be read; assuming %gs", fallback)
        return fallback
    return seconds if 0 < seconds < float("inf") else fallback


# ---------------------------------------------------------------------- what Kasmina composes with


def check_supported_parallelism(model: nn.Module) -> None:
    """Refuse a host Kasmina cannot replicate seeds over (``UnsupportedParallelismError``).

    Kasmina keeps a full copy of every seed, its optimizer state and the state table on each
    rank, and compares them bit for bit; the host may be replicated too
    (``DistributedDataParallel``, see ``kasmina.manager.ddp.wrap_ddp``). A sharded host breaks
    that: FSDP (``fully_shard``, FSDP2, or the older ``FullyShardedDataParallel``) and tensor
    parallelism (``DTensor`` parameters) give each rank a different slice of the weights the
    slots wrap, so the replica checksums, the rollback snapshots and the host optimizer Kasmina
    builds would all see shards, and ``nn.DataParallel`` re-replicates modules on every forward,
    so seeds grafted into the replicas are lost. A model that is, or holds, a
    ``DistributedDataParallel`` is refused too: DDP takes the parameters and buffers a module
    has when it is built, so one built before the slots broadcasts their buffers from rank 0
    at each forward and never hears of a seed's kernel; ``wrap_ddp``, after attach, is the wrap.
    """
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # torch without the distributed package
        return
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    for name, module in model.named_modules():
        where = name or "the model"
        if isinstance(module, DistributedDataParallel):
            raise UnsupportedParallelismError(
                f"{where} is a DistributedDataParallel not built by wrap_ddp: attach to the "
                "unwrapped model, then wrap it with kasmina.manager.ddp.wrap_ddp(model, "
                "**ddp_options), which keeps every tensor Kasmina owns out of DDP's reduction "
                "and buffer broadcast"
            )
        if isinstance(module, FSDPModule | FullyShardedDataParallel):
            raise UnsupportedParallelismError(
                f"{where} is FSDP-sharded ({type(module).__name__}): Kasmina replicates seeds "
                "and compares whole replicas across ranks, so it needs an unsharded host; wrap "
                "it with DistributedDataParallel instead (kasmina.manager.ddp.wrap_ddp)"
            )
        if isinstance(module, nn.DataParallel):
            raise UnsupportedParallelismError(
                f"{where} is nn.DataParallel, which re-replicates modules on every forward; "
                "use DistributedDataParallel (kasmina.manager.ddp.wrap_ddp), one process per GPU"
            )
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            raise UnsupportedParallelismError(
                f"parameter {name} is a DTensor (sharded or tensor-parallel): Kasmina needs "
                "every rank to hold the whole host"
            )


# ---------------------------------------------------------------------- process-group helpers


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0, group: Any = None) -> None:
    """Overwrite ``tensors`` in place on every rank with rank ``src``'s values (initial sync)."""
    if not process_group_active():
        return
    device = collective_device(group)
    with torch.no_grad():
        for t in tensors:
            buf = t.detach().to(device).contiguous()
            dist.broadcast(buf, src=global_rank(group, src), group=group)
            t.detach().copy_(buf)


def average_gradients(params: Sequence[torch.nn.Parameter], group: Any = None) -> None:
    """All-reduce the ``.grad`` of ``params`` to their mean across ranks (data parallelism for
    a plain model without DDP).

    A parameter whose grad is ``None`` on some ranks but not on others gets a zero grad where it
    was missing, so that every rank steps the same parameters. One flat buffer per dtype.
    """
    if not process_group_active():
        return
    world = dist.get_world_size(group)
    device = collective_device(group)
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p, _ in fill_missing_grads(params, device, group):
        by_dtype.setdefault(p.grad.dtype, []).append(p)  # type: ignore[union-attr]
    for group_params in by_dtype.values():
        flat = torch.cat([flat_grad(p).to(device) for p in group_params])
        dist.all_reduce(flat.div_(world), op=dist.ReduceOp.SUM, group=group)  # divided first:
        copy_into_grads(flat, group_params)  # a sum of fp16 gradients could overflow to inf


def fill_missing_grads(
    params: Sequence[torch.nn.Parameter], device: torch.device, group: Any = None
) -> list[tuple[torch.nn.Parameter, bool]]:
    """Agree which of ``params`` have a gradient on any rank (a collective); each such one,
    with whether this rank had none and got zeros (``zero_grad``: sparse where another rank's
    is). The others are left out: no rank has a gradient for them."""
    present = torch.tensor([grad_layout(p) for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX, group=group)
    kept = []
    for p, layout in zip(params, present.tolist(), strict=True):
        if layout:
            filled = p.grad is None
            if filled:
                p.grad = zero_grad(p, layout)
            kept.append((p, filled))
    return kept


def grad_layout(p: torch.nn.Parameter) -> int:
    """What ranks agree on (a MAX) of ``p``'s gradient: 0 none, 1 dense, ``2 + sparse_dim``
    sparse (an ``nn.Embedding(sparse=True)``'s: a rank that looked up no row of it has none)."""
    grad = p.grad
    if grad is None:
        return 0
    return 2 + grad.sparse_dim() if grad.is_sparse else 1


def zero_grad(p: torch.nn.Parameter, layout: int) -> torch.Tensor:
    """A zero gradient for ``p`` where this rank has none and another rank has one of
    ``layout`` (``grad_layout``): sparse with no row where theirs is sparse (a dense zero kept
    this rank's dense after the average, which ``SparseAdam`` refuses)."""
    if layout < 2:
        return torch.zeros_like(p)
    dims = layout - 2
    indices = torch.empty((dims, 0), dtype=torch.long, device=p.device)
    values = torch.empty((0, *p.shape[dims:]), dtype=p.dtype, device=p.device)
    return torch.sparse_coo_tensor(indices, values, p.shape)


def flat_grad(p: torch.nn.Parameter) -> torch.Tensor:
    """``p.grad`` flattened for a flat all-reduce. A sparse one (``nn.Embedding(sparse=True)``)
    is densified: each rank's rows differ, so the average is dense, and a rank whose gradient
    is sparse packs exactly what one whose gradient is dense (zero-filled where missing) does."""
    grad = p.grad
    return grad.to_dense().reshape(-1) if grad.is_sparse else grad.detach().reshape(-1)


def copy_into_grads(flat: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> None:
    """Copy consecutive slices of ``flat`` into the ``.grad`` of each of ``params`` in order
    (the inverse of concatenating their flattened gradients, ``flat_grad``). A sparse
    gradient stays sparse, over the rows the average touches (the optimizer a sparse layer
    was built for, ``SparseAdam``, takes no dense one)."""
    offset = 0
    for p in params:
        grad = p.grad
        n = grad.numel()
        piece = flat[offset : offset + n].view(grad.shape)
        if grad.is_sparse:  # (``flat`` may sit on the collective's device, the CPU for gloo)
            p.grad = piece.to(grad.device).to_sparse(grad.sparse_dim()).coalesce()
        else:
            grad.copy_(piece)
        offset += n


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for a rendezvous on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


# The longest collective timeout taken (about 115 days): past some 1e9 s the store's deadline
# (now + timeout, in nanoseconds) overflows and every rank fails its rendezvous at once.
_MAX_COLLECTIVE_TIMEOUT_S = 1e7


def _collective_timeout(timeout_s: float) -> float:
    """``timeout_s`` if a collective can wait that long: at least 1 ms (the store counts whole
    milliseconds: under one, none could connect), finite and at most
    ``_MAX_COLLECTIVE_TIMEOUT_S``; else ``ValueError``."""
    timeout_s = check_positive("timeout_s", timeout_s)
    if not 1e-3 <= timeout_s <= _MAX_COLLECTIVE_TIMEOUT_S:
        raise ValueError(
            f"timeout_s must be from 0.001 to {_MAX_COLLECTIVE_TIMEOUT_S:g} s, got {timeout_s!r}"
        )
    return timeout_s


def init_from_env(backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Initialise the default process group from torchrun's variables; returns (rank, world).

    ``timeout_s`` bounds every collective, so a rank that dies or hangs fails the others
    instead of blocking them forever.
    """
    timeout_s = _collective_timeout(timeout_s)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
        )
    return rank, world


def shutdown_process_group() -> None:
    """Destroy the default process group and free it now, while the interpreter is whole.

    ``dist.destroy_process_group`` only drops torch's own references; the group lives on while
    anything else holds it, and a DDP module in a reference cycle (a manager callback into a
    training loop that holds the wrapped model is one) holds it until the cycle collector
    runs, which at exit is inside interpreter finalization. A gloo worker releasing its last
    collective's tensors then needs the GIL, which finalization no longer hands out: the
    process aborts ("terminate called without an active exception"), now and then, after a
    run that succeeded. So: collect first, then destroy, and the group's destructor joins its
    workers here. Call it once the models, the manager and the DDP wrapper are out of scope (at
    the end of ``main()``, not beside module-level globals); a group something still holds is
    logged, as its workers outlive the call (torch's first ``import torch._dynamo`` while a group
    exists holds it for good: ``kasmina.manager`` imports it, so import that first). A no-op
    without a process group.
    """
    if not process_group_active():
        return
    gc.collect()
    group = dist.group.WORLD
    dist.destroy_process_group()
    holders = sys.getrefcount(group) - 2  # this frame's name and getrefcount's argument
    if holders > 0:
        logger.warning(
            "the process group is still referenced %d time(s) after destroy_process_group (a "
            "live DDP module?): its worker threads outlive it and may abort the process at "
            "exit; call shutdown_process_group once the wrapped model is out of scope",
            holders,
        )


def _spawn_entry(
    rank: int,
    world: int,
    port: int,
    backend: str,
    timeout_s: float,
    fn: Callable[..., Any],
    args: tuple,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    init_from_env(backend, timeout_s)
    try:
        fn(rank, world, *args)
    finally:
        shutdown_process_group()


def spawn(
    fn: Callable[..., Any],
    nprocs: int,
    args: tuple = (),
    backend: str | None = None,
    timeout_s: float = 300.0,
    join_timeout_s: float | None = None,
) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` processes joined on loopback.

    ``fn`` must be importable (a module-level function). Raises if any process fails.
    ``timeout_s`` bounds each collective; ``join_timeout_s`` (None: no limit) bounds the whole
    run, after which every process is killed and ``TimeoutError`` raised, so a rank stuck
    outside a collective cannot hang the caller (a test suite) either. An interrupt of the
    caller (a Ctrl-C sent to it alone) kills them too: they would train on to the end, writing
    their results after it.
    """
    import torch.multiprocessing as mp

    nprocs = check_positive_int("nprocs", nprocs)
    timeout_s = _collective_timeout(timeout_s)  # here: in each rank it failed every rendezvous
    # NaN or infinity would compare False against every time: no bound, silently.
    if join_timeout_s is not None:
        join_timeout_s = check_positive("join_timeout_s", join_timeout_s)
    port = find_free_port()
    context = mp.start_processes(
        _spawn_entry,
        args=(nprocs, port, backend or default_backend(), timeout_s, fn, args),
        nprocs=nprocs,
        join=False,
        start_method="spawn",
    )
    deadline = None if join_timeout_s is None else time.monotonic() + join_timeout_s

    def kill_all() -> None:
        for process in context.processes:
            if process.is_alive():
                process.kill()
        for process in context.processes:
            process.join()

    try:
        while not context.join(timeout=1.0):
            if deadline is not None and time.monotonic() > deadline:
                kill_all()
                raise TimeoutError(
                    f"{nprocs} spawned processes did not finish in {join_timeout_s}s"
                )
    except BaseException:  # a rank failed, the time ran out, an interrupt: leave none behind
        kill_all()
        raise
