"""Multi-process coordination: one command stream, applied identically on every rank.

Why: under data parallelism every rank holds its own copy of the host, its seeds and the lifecycle
state table. A controller command must change every copy the same way at the same point of
training, or the copies drift apart without anyone noticing. So commands enter on rank 0 only,
wait there until the next epoch boundary, and ``sync_epoch`` broadcasts them (as raw bytes framed
in a uint8 tensor: no pickle crosses the wire) so that every rank applies the same commands in the
same order through its own ``LeylineAdaptationHandler``. Each rank verifies every signature
itself (defence in depth: rank 0 is not trusted to have checked).

After applying them, every rank hashes its state table and seed weights (CRC-32 over the raw
bytes) and the hashes are all-gathered. A rank whose hash, or whose accept/reject outcomes, differ
from the majority (ties go to the group holding rank 0, the command authority) has diverged: it is
logged, reported by telemetry, and that rank's ``on_divergence`` callback quarantines its seeds.

Freshness: a command is verified when it is applied, not when it is submitted, so the verifier's
freshness window must cover the time between submission and the next ``sync_epoch`` (sync more
often than once per epoch if epochs are long; any boundary works as long as all ranks call it).
A handler that queues commands for its own safe point (the kernel manager) has them applied at
``sync_epoch`` itself, waiting for kernel fetches (each bounded by its command's timeout).

Without an initialised process group the coordinator runs as a single rank with no collectives,
so the same training loop works in one process and under ``torchrun``.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from kasmina.leyline import AdaptationCommand, MetricType

if TYPE_CHECKING:
    from kasmina.utils.telemetry import TelemetryReporter

logger = logging.getLogger(__name__)

_LEN = struct.Struct("<Q")


class CommandHandler(Protocol):
    """What a rank applies commands through (``LeylineAdaptationHandler`` satisfies it)."""

    def handle_adaptation_command(self, raw: bytes) -> bool: ...


class CommandOutcomeLike(Protocol):
    command_id: str
    ok: bool


@runtime_checkable
class DeferredCommandHandler(Protocol):
    """A handler that only accepts commands and applies them at its next safe point (the
    kernel manager): ``sync_epoch`` is such a point, so it applies them there, waiting for
    kernel fetches, and every rank reports what was actually applied."""

    def handle_adaptation_command(self, raw: bytes) -> bool: ...

    def apply_pending(self, *, wait: bool = False) -> Sequence[CommandOutcomeLike]: ...


StateProvider = Callable[[], Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class EpochSyncResult:
    """What one ``sync_epoch`` did, as seen from ``rank`` (every rank gets the same verdict)."""

    epoch: int
    rank: int
    world_size: int
    outcomes: tuple[bool, ...]  # this rank's handler result per broadcast command, in order
    checksums: tuple[int, ...]  # per rank
    divergent_ranks: tuple[int, ...]

    @property
    def diverged(self) -> bool:
        """Whether this rank is one of the divergent ones."""
        return self.rank in self.divergent_ranks

    @property
    def consistent(self) -> bool:
        return not self.divergent_ranks


def state_checksum(state: Mapping[str, torch.Tensor]) -> int:
    """CRC-32 over names, dtypes, shapes and raw bytes of ``state`` in sorted name order.

    Bitwise: two ranks agree only if every element is bit-identical, which is what lockstep
    data parallelism promises.
    """
    crc = 0
    for name in sorted(state):
        t = state[name].detach()
        header = f"{name}|{t.dtype}|{tuple(t.shape)}".encode()
        crc = zlib.crc32(header, crc)
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            crc = zlib.crc32(flat.view(torch.uint8).numpy().tobytes(), crc)
    return crc


def _frame(commands: Sequence[bytes]) -> bytes:
    return b"".join(_LEN.pack(len(c)) + c for c in commands)


def _unframe(body: bytes, count: int) -> list[bytes]:
    out: list[bytes] = []
    pos = 0
    for _ in range(count):
        (n,) = _LEN.unpack_from(body, pos)
        pos += _LEN.size
        out.append(body[pos : pos + n])
        pos += n
    if pos != len(body):
        raise RuntimeError(f"command broadcast framing mismatch ({pos} != {len(body)} bytes)")
    return out


class DistributedCoordinator:
    """Epoch-aligned command broadcast and state-consistency check across ranks.

    ``handler`` applies one command (raw bytes) on this rank; ``state_provider`` returns the
    tensors that must agree across ranks (state table, seed weights); ``on_divergence`` is called
    on a rank that disagrees with the majority (typically: quarantine its seeds).
    """

    def __init__(
        self,
        handler: CommandHandler,
        state_provider: StateProvider,
        *,
        on_divergence: Callable[[EpochSyncResult], None] | None = None,
        telemetry: TelemetryReporter | None = None,
        group: Any = None,
        max_pending: int = 1024,
        max_command_bytes: int = 64 * 1024,
    ) -> None:
        if max_pending < 1 or max_command_bytes < 1:
            raise ValueError("max_pending and max_command_bytes must be >= 1")
        self.handler = handler
        self.state_provider = state_provider
        self.on_divergence = on_divergence
        self.telemetry = telemetry
        self.group = group
        self.max_pending = max_pending
        self.max_command_bytes = max_command_bytes
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        self._device = _collective_device(group) if self.distributed else torch.device("cpu")
        self._pending: list[bytes] = []
        self.stats: Counter[str] = Counter()
        self.history: list[EpochSyncResult] = []

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, raw: bytes) -> bool:
        """Queue a command (rank 0 only) for the next ``sync_epoch``; False if refused here.

        Only size and queue bounds are checked here; signatures are checked by every rank's
        handler when the command is applied.
        """
        if self.rank != 0:
            raise RuntimeError(f"commands are accepted on rank 0 only; this is rank {self.rank}")
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise TypeError(f"submit expects raw command bytes, got {type(raw).__name__}")
        if len(raw) > self.max_command_bytes:
            self.stats["dropped:too_large"] += 1
            logger.warning("dropped a %d-byte command (limit %d)", len(raw), self.max_command_bytes)
            return False
        if len(self._pending) >= self.max_pending:
            self.stats["dropped:queue_full"] += 1
            logger.warning("command queue full (%d); command dropped", self.max_pending)
            return False
        self._pending.append(bytes(raw))
        self.stats["submitted"] += 1
        return True

    def sync_epoch(self, epoch: int) -> EpochSyncResult:
        """Collective: every rank must call it at the same boundary with the same ``epoch``."""
        commands = self._broadcast_commands(epoch)
        outcomes = self._apply_all(commands)
        checksum = state_checksum(self.state_provider())
        outcome_digest = zlib.crc32(bytes(outcomes))
        rows = self._all_gather([epoch, checksum, outcome_digest, len(commands)])
        keys = [tuple(row) for row in rows]
        divergent = _minority_ranks(keys)
        result = EpochSyncResult(
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
            outcomes=outcomes,
            checksums=tuple(row[1] for row in rows),
            divergent_ranks=divergent,
        )
        self.history.append(result)
        self._report(result)
        return result

    def _apply_all(self, commands: list[bytes]) -> tuple[bool, ...]:
        accepted = [bool(self.handler.handle_adaptation_command(raw)) for raw in commands]
        outcomes = accepted
        if isinstance(self.handler, DeferredCommandHandler):
            applied = {o.command_id: o.ok for o in self.handler.apply_pending(wait=True)}
            outcomes = [
                ok and applied.get(_command_id(raw), False)
                for ok, raw in zip(accepted, commands, strict=True)
            ]
        for ok in outcomes:
            self.stats["applied" if ok else "refused"] += 1
        return tuple(outcomes)

    def _broadcast_commands(self, epoch: int) -> list[bytes]:
        if not self.distributed:
            commands, self._pending = self._pending, []
            return commands
        if self.rank == 0:
            commands, self._pending = self._pending, []
            body = _frame(commands)
            header = torch.tensor([epoch, len(commands), len(body)], dtype=torch.int64)
        else:
            header = torch.zeros(3, dtype=torch.int64)
        header = header.to(self._device)
        dist.broadcast(header, src=_global_rank(self.group, 0), group=self.group)
        src_epoch, count, nbytes = (int(v) for v in header.tolist())
        if src_epoch != epoch:
            logger.error("rank %d syncs epoch %d but rank 0 syncs %d", self.rank, epoch, src_epoch)
        if count == 0:
            return []
        if self.rank == 0:
            buf = torch.frombuffer(bytearray(body), dtype=torch.uint8).to(self._device)
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self._device)
        dist.broadcast(buf, src=_global_rank(self.group, 0), group=self.group)
        return commands if self.rank == 0 else _unframe(buf.cpu().numpy().tobytes(), count)

    def _all_gather(self, row: list[int]) -> list[list[int]]:
        if not self.distributed:
            return [row]
        mine = torch.tensor(row, dtype=torch.int64, device=self._device)
        bufs = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(bufs, mine, group=self.group)
        return [[int(v) for v in b.tolist()] for b in bufs]

    def _report(self, result: EpochSyncResult) -> None:
        labels = {"epoch": str(result.epoch), "rank": str(self.rank)}
        if self.telemetry is not None:
            self.telemetry.emit(
                "distributed.epoch_sync",
                float(len(result.outcomes)),
                MetricType.METRIC_TYPE_GAUGE,
                labels,
            )
        if result.consistent:
            return
        self.stats["divergences"] += 1
        if self.rank == 0:
            logger.error(
                "epoch %d: ranks %s diverged from the majority (checksums %s)",
                result.epoch,
                list(result.divergent_ranks),
                [f"{c:08x}" for c in result.checksums],
            )
        if not result.diverged:
            return
        logger.error(
            "epoch %d: this rank (%d) diverged from the majority; quarantining its seeds",
            result.epoch,
            self.rank,
        )
        if self.telemetry is not None:
            self.telemetry.emit("distributed.divergence", 1.0, MetricType.METRIC_TYPE_EVENT, labels)
        if self.on_divergence is not None:
            self.on_divergence(result)


def _minority_ranks(keys: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """Ranks whose key differs from the most common one; ties go to rank 0's key."""
    counts = Counter(keys)
    best = max(counts.values())
    majority = keys[0] if counts[keys[0]] == best else counts.most_common(1)[0][0]
    return tuple(r for r, k in enumerate(keys) if k != majority)


def _global_rank(group: Any, group_rank: int) -> int:
    if group is None:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def _collective_device(group: Any) -> torch.device:
    """NCCL needs CUDA tensors; every other backend here takes CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0, group: Any = None) -> None:
    """Overwrite ``tensors`` in place on every rank with rank ``src``'s values (initial sync)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    device = _collective_device(group)
    with torch.no_grad():
        for t in tensors:
            buf = t.detach().to(device).contiguous()
            dist.broadcast(buf, src=_global_rank(group, src), group=group)
            t.detach().copy_(buf)


def average_gradients(params: Sequence[torch.nn.Parameter], group: Any = None) -> None:
    """All-reduce the ``.grad`` of ``params`` to their mean across ranks (data parallelism).

    A parameter whose grad is ``None`` on some ranks but not on others gets a zero grad where it
    was missing, so that every rank steps the same parameters. One flat buffer per dtype.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size(group)
    device = _collective_device(group)
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX, group=group)
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p, flag in zip(params, present.tolist(), strict=True):
        if not flag:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group_params in by_dtype.values():
        flat = torch.cat([p.grad.detach().reshape(-1).to(device) for p in group_params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world)
        offset = 0
        for p in group_params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for a rendezvous on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_from_env(backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Initialise the default process group from torchrun's variables; returns (rank, world).

    ``timeout_s`` bounds every collective, so a rank that dies or hangs fails the others
    instead of blocking them forever.
    """
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
        dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any],
    nprocs: int,
    args: tuple = (),
    backend: str | None = None,
    timeout_s: float = 300.0,
) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` processes joined on loopback.

    ``fn`` must be importable (a module-level function). Raises if any process fails.
    """
    import torch.multiprocessing as mp

    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    port = find_free_port()
    mp.spawn(
        _spawn_entry,
        args=(nprocs, port, backend or default_backend(), timeout_s, fn, args),
        nprocs=nprocs,
        join=True,
    )


def _command_id(raw: bytes) -> str:
    """The id of an accepted command (it parsed when it was accepted)."""
    return AdaptationCommand.FromString(raw).command_id
