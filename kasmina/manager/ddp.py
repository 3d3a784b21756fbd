"""The kernel manager under data parallelism: DDP for the host, Kasmina for its seeds.

Why a second mechanism beside ``DistributedDataParallel``: DDP registers the parameters a module
has when it is wrapped, and averages exactly those. Seeds get their parameters later, when a
GERMINATE grafts a kernel copy into a slot, so DDP never hears of them, and its buffer broadcast
would overwrite Kasmina's per-seed buffers with rank 0's. So (docs/design.md §5, "Multi-process
runs"):

- ``wrap_ddp(model)`` wraps the host in DDP with everything Kasmina owns (every parameter and
  buffer of a slot other than its host layer's) on DDP's ignore list;
- ``SeedGradientSync`` averages the gradients of every live seed across ranks, once per step,
  as one flat all-reduce per bucket, from ``manager.step()`` before any optimizer steps. It runs
  after the backward rather than overlapped with it: the manager's KD phase backpropagates
  twice into the seeds, and gradient accumulation may add more backwards before a step, so a
  seed's gradient is known to be final only when ``step()`` begins. Seeds are a small fraction
  of the host; ``perf/bench_distributed.py`` measures the cost;
- ``DistributedKasmina.sync_epoch`` averages the running seeds' kernel buffers (a BatchNorm's
  running statistics, which each rank updates from its own shard) before the replica checksum
  (``BufferAverage``), so healthy ranks agree and only drift is repaired;
- ``ManagerReplica`` and ``ManagerApplier`` (``kasmina.manager.coordination``) are what ranks
  compare and repair, and how agreed commands apply;
- ``DistributedKasmina`` puts them together over a ``DistributedCoordinator``, and routes the
  manager's command door through it, so a command sent to any rank is verified there and applied
  on every rank or none.

FSDP (``fully_shard``) and tensor-parallel hosts are refused (``check_supported_parallelism``).
"""

from __future__ import annotations

import hashlib
import logging
import time
import weakref
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kasmina.control.distributed import DistributedCoordinator
from kasmina.control.processes import (
    check_supported_parallelism,
    collective_device,
    collective_timeout_s,
    copy_into_grads,
    fill_missing_grads,
    flat_grad,
)
from kasmina.control.relay import EpochSyncResult
from kasmina.control.replica import BufferAverage, buckets
from kasmina.manager.coordination import PREPARE_SHARE, ManagerApplier, ManagerReplica
from kasmina.manager.manager import KasminaKernelManager
from kasmina.manager.slots import SlotRegistry
from kasmina.seeds.charging import DeferredFaults, Held, charge_gathered, defer_faults, encode
from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import ISOLATED_STAGES, RUNS_KERNEL, TRAINING_STAGES
from kasmina.utils.perfstats import LatencyStats
from kasmina.utils.ratelimit import rarely

logger = logging.getLogger(__name__)

__all__ = [
    "DistributedKasmina",
    "SeedGradientSync",
    "check_same_layout",
    "kasmina_owned_names",
    "running_kernel_buffers",
    "wrap_ddp",
]

# Seeds whose gradients are averaged: those an optimizer steps (their own, or the host's once
# ACTIVE), the same set ``manager.step()`` steps.
DEFAULT_BUCKET_CAP_MB = 25.0

# Per wrapped model, the host parameters DDP does not reduce: those frozen when it wrapped it.
_NOT_REDUCED: weakref.WeakKeyDictionary[nn.Module, list[nn.Parameter]] = weakref.WeakKeyDictionary()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def kasmina_owned_names(model: nn.Module) -> list[str]:
    """Names of every parameter and buffer of ``model`` that belongs to a Kasmina slot rather
    than to the host layer it wraps (seeds, their kernels, alphas, flags): DDP must not touch
    them, since Kasmina averages and checks them itself."""
    names: list[str] = []
    for prefix, module in model.named_modules():
        if not isinstance(module, KasminaLayer):
            continue
        host = {id(t) for t in (*module.host.parameters(), *module.host.buffers())}
        base = f"{prefix}." if prefix else ""
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            if id(tensor) not in host:
                names.append(base + name)
    return names


def wrap_ddp(model: nn.Module, **ddp_options: Any) -> nn.Module:
    """``DistributedDataParallel(model, **ddp_options)`` over the host's own parameters, with
    Kasmina's on DDP's ignore list; ``model`` itself when no process group is initialised (so a
    training loop runs unchanged in one process).

    Attach the slots first (``manager.attach``), then wrap, then build a ``DistributedKasmina``
    over the manager, which averages the seeds' gradients.

    ``find_unused_parameters`` defaults to True, and ``find_unused_parameters=False`` or
    ``static_graph=True`` is refused (``ValueError``): while every seed of a slot is in an
    isolated stage (GRAFTING, STABILIZATION) the slot passes no gradient to the host layers
    before it, and DDP without the flag never reduces the bucket it waits for (each rank steps
    on its own gradient, the ranks split, and the next forward raises torch's "expected to have
    finished reduction"); with it they stay ``None``, as in a single process, at
    the cost of one walk of the autograd graph per forward. Each rank's first backward then logs
    torch's reducer warning that it found no unused parameters (the first steps, before any seed
    is isolated, use them all: expected here). It is logged from C++ on the autograd thread, so
    a Python ``warnings`` filter around the wrap or the step does not reach it; only the
    process-wide ``TORCH_CPP_LOG_LEVEL`` does, which would hide every other torch warning too.
    """
    check_supported_parallelism(model)
    ddp_options.setdefault("find_unused_parameters", True)
    if ddp_options.get("static_graph") or not ddp_options["find_unused_parameters"]:
        raise ValueError(
            "wrap_ddp: static_graph=True and find_unused_parameters=False need every step to "
            "use the same parameters; a slot whose seeds are isolated passes no gradient to "
            "the host layers before it, so DDP would skip their reduction and the ranks split"
        )
    if not _distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    owned = kasmina_owned_names(model)
    group, mesh = ddp_options.get("process_group"), ddp_options.get("device_mesh")
    if group is None and mesh is not None:
        group = mesh.get_group(0)  # DDP's own group for a mesh
    check_same_layout(model, owned, group, buffers=ddp_options.get("broadcast_buffers", True))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, owned)
    wrapped = DistributedDataParallel(model, **ddp_options)
    _NOT_REDUCED[model] = [
        p for name, p in model.named_parameters() if name not in owned and not p.requires_grad
    ]  # DDP registers only those that require a gradient now: unfrozen later, ours to average
    return wrapped


def check_same_layout(
    model: nn.Module, ignored: Collection[str] = (), group: Any = None, *, buffers: bool = True
) -> None:
    """``ValueError`` on every rank when the ranks' models differ in the shapes or dtypes of the
    tensors DDP takes, in order: the parameters (and the buffers it broadcasts, ``buffers``) but
    ``ignored``, over ``group`` (DDP's process group; None: the default one). DDP's constructor
    compares shapes, but a dtype that differs (a rank cast to bfloat16) makes its first
    broadcast read sizes that do not match, and gloo aborts the process. One all-gather of a
    16-byte digest, on the model's CUDA device under NCCL (else the group's)."""
    tensors = [*model.named_parameters(), *(model.named_buffers() if buffers else ())]
    layout = [(tuple(t.shape), str(t.dtype)) for name, t in tensors if name not in ignored]
    digest = hashlib.blake2b(repr(layout).encode(), digest_size=16).digest()
    device = collective_device(group)
    if device.type == "cuda":  # where the rank's model is, set as current device or not
        device = next((t.device for _, t in tensors if t.is_cuda), device)
    mine = torch.tensor(list(digest), dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    differ = [rank for rank, other in enumerate(every) if not torch.equal(other, every[0])]
    if differ:
        dtypes = dict(Counter(dtype for _, dtype in layout))
        raise ValueError(
            f"wrap_ddp: the ranks' models differ in the shapes or dtypes of their parameters or "
            f"buffers: rank(s) {differ} differ from rank 0 (this rank, {dist.get_rank(group)}, "
            f"has {len(layout)}: {dtypes}); build and cast the model alike on every rank"
        )


class SeedGradientSync:
    """Averages live seeds' gradients across ranks; ``manager.step()`` calls it each step.

    One step costs a 4-integer all-reduce (the layout check: every rank must be about to
    average the same seeds, or sizes would mismatch and the collective would fail or hang; and
    the isolation verdict, agreed: DDP averaged the host's gradients in the backward, so a graph
    leak one rank found is in every rank's, and the ranks' hosts must take the same step: every
    rank skips it) and
    then one all-reduce per bucket of at most ``bucket_cap_mb`` per dtype and device, all
    launched before the first is waited on. A layout that differs across ranks (a seed's stage
    changed on one rank only) skips the averaging for that step, is logged and counted
    (``stats["layout_mismatch"]``), and is repaired at the next epoch sync. In such a step every
    rank drops its live seeds' gradients (``grad = None``: the optimizers skip them), since every
    rank learns of the mismatch from the same collective: stepped on its own unaveraged
    gradients, each healthy rank would drift from the others, and the sync's vote, split three
    ways or more, would go to rank 0's group even where rank 0 is the one that diverged. Only the
    host steps, on DDP's average, so the healthy ranks stay bitwise equal and the majority
    repairs the odd one. A gradient missing on some ranks is taken as zero there; one missing on
    every rank stays missing.
    """

    def __init__(
        self,
        registry: SlotRegistry,
        *,
        group: Any = None,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    ) -> None:
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        self.registry = registry
        self.group = group
        self.bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self.stats: Counter[str] = Counter()
        self.latency = LatencyStats()
        # The seeds' faults found on this rank's host since the last step, while a
        # ``DistributedKasmina`` defers them (``charging.defer_faults``): charged at the step
        # (or the epoch sync: ``charge_held_faults``) on every rank alike.
        self.faults = DeferredFaults()

    def live_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(seed id, parameter)`` of every seed an optimizer steps, in registry order; then
        ``("", parameter)`` of each host parameter frozen when registered, or when
        ``wrap_ddp`` wrapped the model, and trainable now (gradual unfreezing): DDP registered
        only those that required a gradient when it wrapped the model, so without this each
        rank stepped such a layer on its own shard's gradient and every epoch's sync found the
        ranks apart. (Wrapped again after the unfreeze, DDP averages it too: the same average,
        averaged twice.)"""
        host = self.registry.hold.unfrozen()
        seen = {id(p) for p in host}
        for p in _NOT_REDUCED.get(self.registry.model, ()):
            if p.requires_grad and id(p) not in seen:
                host.append(p)
                seen.add(id(p))
        return [
            (record.seed_id, p)
            for record in self.registry.in_stages(TRAINING_STAGES)
            if record.kernel is not None
            for p in record.seed.seed_parameters()
            if p.requires_grad
        ] + [("", p) for p in host]

    def __call__(
        self, clean: bool = True, flags: dict[str, list[bool]] | None = None
    ) -> tuple[bool, bool]:
        """Average now (a collective: every rank calls it at the same step): whether it did,
        and whether every rank's isolation check found the step ``clean``.

        ``flags``: each running seed's two non-finite flags as this rank read them, ``[finite,
        faulted]`` (``settle_nonfinite``'s), agreed here across ranks in place: not finite if
        any rank's was not, faulted if any rank's was, so that every rank settles them alike
        (charged on the one rank whose data made it fall back, the fault differed across ranks
        and the epoch sync "repaired" it away, every epoch). A seed whose output fell back on
        this rank has a gradient here that is zero but for NaN where its kernel's backward met
        ``0 * inf``: this rank sends none (a zero in the average, as for a gradient missing
        here), and the ranks step on the same finite average (``settle_nonfinite`` then keeps
        it). Any other non-finite entry is averaged as it is, so every rank sees it: a clipped
        step skips that seed on every rank alike, and the check of seeds whose gradient alone
        stays non-finite (``SlotRegistry.charge_failed_steps``) charges it alike.

        The faults seeds found on this rank's host since the last step (a kernel that raised,
        an output of the wrong shape, a backward that raised: ``self.faults``) are gathered from
        every rank in the same rare second collective, and every rank charges them all
        (``charging.charge_gathered``), as one process seeing every rank's data would."""
        held = self.faults.take()
        if not _distributed() or dist.get_world_size(self.group) == 1:
            self.faults.charge_here(held)
            return False, clean
        world = dist.get_world_size(self.group)
        started = time.perf_counter_ns()
        flags = {} if flags is None else flags
        live = self.live_parameters()
        for seed_id, p in live:
            if not flags.get(seed_id, (True,))[0]:
                p.grad = None
        params = [p for _, p in live]
        layout = _layout_key(live)
        missing = any(p.grad is None for p in params)
        device = _device_for(params, self.group)
        raised = bool(held) or any(not ok or bad for ok, bad in flags.values())
        seeds = 0 if self.registry is None else len(self.registry.records)  # _agree's length
        row = [layout, -layout, int(missing), int(not clean), int(raised), seeds, -seeds]
        header = torch.tensor(row, dtype=torch.int64, device=device)
        check = dist.all_reduce(header, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        # Packed while the check is in flight; thrown away if the check says otherwise.
        packed = None if missing else self._pack(params)
        check.wait()
        top, neg_bottom, any_missing, any_leak, any_raised, most, neg_least = header.tolist()
        # Rare: a second small collective, only in a step where a seed fell back or faulted
        # somewhere, and only between ranks whose registries have as many seeds (else the
        # layout differs too, and the epoch sync repairs: each rank charges its own faults).
        self._settle(flags, device, held, bool(any_raised) and most == seeds == -neg_least)
        if any_leak and clean:
            self.stats["peer_leaks"] += 1  # this rank's host skips the step with the others
        clean = not any_leak
        if top != layout or neg_bottom != -layout:
            # Every rank sees the mismatch in the same reduced header: all drop their seeds'
            # gradients alike, so no rank steps a seed on a gradient the others did not see.
            for p in params:
                p.grad = None
            self.stats["layout_mismatch"] += 1
            logger.log(
                rarely(self.stats["layout_mismatch"], 1000, logging.ERROR),
                "seed layouts differ across ranks (%d step(s) so far): seed gradients are "
                "dropped on every rank (no seed steps) until the next epoch sync repairs "
                "the divergent rank",
                self.stats["layout_mismatch"],
            )
            return False, clean
        if not params:
            return False, clean
        if any_missing:
            packed = self._pack(self._fill_missing(params, device))
        assert packed is not None
        # Divided before the sum, as DDP does: summed first, fp16 gradients of 65504 / world
        # and more overflowed to inf on every rank, which then skipped and charged the seed.
        handles = [
            (bucket, flat, dist.all_reduce(flat.div_(world), group=self.group, async_op=True))
            for bucket, flat in packed
        ]
        for bucket, flat, handle in handles:
            handle.wait()
            copy_into_grads(flat, bucket)
        self.stats["steps"] += 1
        self.stats["buckets"] += len(handles)
        self.latency.add_ns(time.perf_counter_ns() - started)
        return True, clean

    def charge_held_faults(self) -> None:
        """Charge the seeds' faults held since the last step on every rank alike (a collective:
        the epoch sync calls it on every rank, before any command applies, so that a fault a
        validation pass or a G3 probe found at the epoch's end is charged to the seed that
        committed it, not to what a CULL or a ROLLBACK made of it). One 3-integer all-reduce;
        where some rank held a fault, ``_agree``'s two more."""
        held = self.faults.take()
        if not _distributed() or dist.get_world_size(self.group) == 1:
            self.faults.charge_here(held)
            return
        device = _device_for([p for _, p in self.live_parameters()], self.group)
        seeds = 0 if self.registry is None else len(self.registry.records)
        header = torch.tensor([int(bool(held)), seeds, -seeds], dtype=torch.int64, device=device)
        dist.all_reduce(header, op=dist.ReduceOp.MAX, group=self.group)
        any_held, most, neg_least = header.tolist()
        self._settle({}, device, held, bool(any_held) and most == seeds == -neg_least)

    def _settle(
        self, flags: dict[str, list[bool]], device: torch.device, held: dict[str, Held], agree: bool
    ) -> None:
        """With ``agree`` (decided alike on every rank: some rank has flags or faults to agree,
        and the registries are as long), ``flags`` agreed and every rank's ``held`` faults
        charged on every rank; else each rank charges its own ``held`` (registries of other
        sizes: the sync repairs). A seed not in the registry (a slot that is not the manager's,
        on its table) is charged here in any case."""
        if not agree:
            self.faults.charge_here(held)
            return
        seeds = {record.seed_id: record.seed for record in self.registry}
        charge_gathered(seeds, self._agree(flags, device, encode(held)))
        self.faults.charge_here({s: h for s, h in held.items() if s not in seeds})

    def _agree(
        self, flags: dict[str, list[bool]], device: torch.device, mine: bytes
    ) -> list[bytes]:
        """Every rank's ``flags`` made the same (a collective): not finite where any rank's
        was not, faulted where any rank's was; and every rank's held faults (``mine``, as
        ``charging.encode`` wrote them), in rank order, gathered by a third collective where
        any rank held some. The summed vector covers every seed of the registry, the same list
        on every rank whatever their stages, then each rank's ``len(mine)`` in its own entry."""
        ids = [record.seed_id for record in self.registry]
        raised = [[not flags.get(s, (True, False))[0], flags.get(s, (True, False))[1]] for s in ids]
        sizes = [0] * dist.get_world_size(self.group)
        sizes[dist.get_rank(self.group)] = len(mine)
        row = [int(flag) for pair in raised for flag in pair] + sizes
        agreed = torch.tensor(row, dtype=torch.int64, device=device)
        dist.all_reduce(agreed, group=self.group)  # a sum: a flag any rank set is positive
        values = agreed.tolist()
        for i, seed_id in enumerate(ids):
            if seed_id in flags:
                flags[seed_id] = [not values[2 * i], bool(values[2 * i + 1])]
        self.stats["flags_agreed"] += 1
        sizes = values[2 * len(ids) :]
        return self._gather(mine, sizes, device) if any(sizes) else []

    def _gather(self, mine: bytes, sizes: list[int], device: torch.device) -> list[bytes]:
        """Every rank's ``mine`` (``sizes[rank]`` bytes), in rank order: one all-gather of
        frames padded to the longest."""
        frame = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
        if mine:
            frame[: len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
        every = [torch.empty_like(frame) for _ in sizes]
        dist.all_gather(every, frame, group=self.group)
        self.stats["faults_gathered"] += 1
        return [t[:n].cpu().numpy().tobytes() for t, n in zip(every, sizes, strict=True)]

    def _fill_missing(self, params: list[nn.Parameter], device: torch.device) -> list[nn.Parameter]:
        """Agree which gradients exist anywhere; zeros where only this rank lacks one."""
        kept = fill_missing_grads(params, device, self.group)
        if zeros := sum(filled for _, filled in kept):
            self.stats["zero_filled"] += zeros
        return [p for p, _ in kept]

    def _pack(self, params: list[nn.Parameter]) -> list[tuple[list[nn.Parameter], torch.Tensor]]:
        """Each bucket with its gradients copied into one flat tensor."""
        return [
            (bucket, torch.cat([flat_grad(p) for p in bucket])) for bucket in self._buckets(params)
        ]

    def _buckets(self, params: list[nn.Parameter]) -> Any:
        """Consecutive runs of one gradient dtype and device, at most ``bucket_cap_bytes`` each
        (one parameter larger than the cap is a bucket of its own)."""
        return buckets(params, lambda p: p.grad, self.bucket_cap_bytes)


def running_kernel_buffers(registry: SlotRegistry) -> list[tuple[str, torch.Tensor]]:
    """``(seed id.buffer name, buffer)`` of every seed whose forward runs its kernel, in registry
    order (the same on every rank): what its forwards may update from each rank's own data."""
    return [
        (f"{record.seed_id}.{name}", buffer)
        for record in registry.in_stages(RUNS_KERNEL)
        if record.kernel is not None
        for name, buffer in record.kernel.named_buffers()
    ]


def _layout_key(live: Sequence[tuple[str, nn.Parameter]]) -> int:
    """A 31-bit digest of which seeds and parameter shapes are about to be averaged."""
    text = ";".join(f"{sid}:{tuple(p.shape)}:{p.dtype}" for sid, p in live)
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def _device_for(params: Sequence[nn.Parameter], group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return params[0].device if params else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class DistributedKasmina:
    """A kernel manager as one rank of a data-parallel run (docs/design.md §5).

    Build it on every rank after ``manager.attach``/``register`` (and ``wrap_ddp`` for the
    host). From then on ``manager.step()`` averages the seeds' gradients across ranks, and a
    command given to any rank's door (``manager.handle_adaptation_command``, or ``submit``) is
    verified there and applied on every rank at the next ``sync_epoch(epoch)``, which every rank
    calls at the same boundary (after ``manager.end_epoch``); that sync first averages the running
    seeds' buffers (``seed_buffers``), then checks the replicas and repairs a rank that
    diverged. ``close`` detaches it from the manager.

    ``check_host`` includes the host's parameters in the replica checksum (see
    ``ManagerReplica``); ``on_divergence`` runs on a rank that diverged and could not be
    repaired (default: every rank quarantines its growing seeds, so that the ranks keep one
    seed layout). Building it opens the manager's checkpoint
    store, so a rank whose run's disk checkpoints another live trainer holds (ranks given one
    ``run_id``) is refused here, with ``RuntimeError``, before any rank trains.
    """

    def __init__(
        self,
        manager: KasminaKernelManager,
        *,
        group: Any = None,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        check_host: bool = True,
        repair: bool = True,
        on_divergence: Callable[[EpochSyncResult], None] | None = None,
        max_pending: int = 1024,
    ) -> None:
        registry = manager.require_registry()
        check_supported_parallelism(registry.model)
        if manager.command_relay is not None or manager.grad_sync is not None:
            raise ValueError("this manager is already part of a distributed run")
        # Opened now rather than at the first checkpoint: a rank whose run's disk checkpoints
        # another live trainer holds (ranks sharing a run_id) is refused before any rank trains.
        _ = manager.state.checkpoints
        self.manager = manager
        self.seed_grads = SeedGradientSync(registry, group=group, bucket_cap_mb=bucket_cap_mb)
        self.seed_buffers = BufferAverage(
            group=group, bucket_cap_bytes=self.seed_grads.bucket_cap_bytes
        )
        # The other ranks wait in a collective while this one prepares (or fetches a kernel
        # for a ROLLBACK or a repair): half the process group's timeout leaves the rest of the
        # sync room to answer in time.
        prepare_s = collective_timeout_s(group) * PREPARE_SHARE if _distributed() else None
        self.replica = ManagerReplica(
            manager.state, manager.guard, lock=manager.intake.lock, include_host=check_host,
            fetch_timeout_s=prepare_s,
        )  # fmt: skip
        self.applier = ManagerApplier(manager.intake, manager.report, prepare_timeout_s=prepare_s)
        self.coordinator = DistributedCoordinator(
            manager.handler,
            self.replica,
            applier=self.applier,
            on_divergence=on_divergence or self._quarantine_diverged,
            repair=repair,
            telemetry=manager.telemetry,
            group=group,
            max_pending=max_pending,
        )
        manager.grad_sync = self.seed_grads
        manager.command_relay = self.coordinator.submit
        manager.intake.also_dropping.append(self.coordinator.drop_pending)  # refused at close
        # Accepted before the relay: applied here alone they would apply on this rank only.
        manager.intake.relay("reached the manager's own queue as it joined a multi-rank run")
        # A fault a seed finds on this rank's host waits for the step, which charges every
        # rank's on every rank (``charging``; the seeds of the table, germinated later too):
        # charged on this rank alone it made the replicas differ, and each epoch sync repaired
        # it away. Held faults are charged here when the rank leaves, or its manager closes.
        self._table = registry.table
        if self.world_size > 1:
            defer_faults(self._table, self.seed_grads.faults)
            manager.intake.also_dropping.append(self._stop_deferring)

    @property
    def rank(self) -> int:
        return self.coordinator.rank

    @property
    def world_size(self) -> int:
        return self.coordinator.world_size

    def submit(self, raw: bytes) -> bool:
        """A command received on this rank: verified now, applied everywhere at the next sync."""
        return self.coordinator.submit(raw)

    def sync_epoch(self, epoch: int) -> EpochSyncResult:
        """The collective boundary: average the running seeds' buffers, apply what the ranks
        received, check, repair."""
        # Seed buffers are averaged here, once per epoch and before the checksum, on every rank
        # (this call is itself the collective boundary), rather than at each step: the training
        # forward reads batch statistics, and running statistics are linear in what each step
        # adds, so one average at the boundary gives what averaging them at every step would
        # (up to rounding) at no per-step cost. Before the commands apply, the seeds that ran
        # this epoch are the ones in a running stage. A closed manager raises before the first
        # collective, as its step() and end_epoch() do: it would refuse every command the ranks
        # received, as one it could not verify, and report the ranks consistent.
        registry = self.manager.state.require_registry(training=True)
        self.seed_grads.charge_held_faults()  # found since the last step: before any command
        self.seed_buffers(running_kernel_buffers(registry))
        result = self.coordinator.sync_epoch(epoch)
        self.replica.note_sync(result)
        unrepaired = sorted(set(result.divergent_ranks) - set(result.repaired_ranks))
        if unrepaired and self.coordinator.on_divergence == self._quarantine_diverged:
            # Every rank alike, not only the diverged ones: quarantined on some ranks alone,
            # the ranks' seed layouts would differ at every later step, and every seed
            # gradient would be dropped on every rank for the rest of the run.
            self._quarantine(f"ranks {unrepaired} diverged at epoch {epoch}, not repaired")
        return result

    def close(self) -> None:
        """Detach from the manager (its door and step work single-process again); commands
        held for the next sync are refused, each reported; seed faults held for the next step
        are charged on this rank, and later ones at once."""
        if self.manager.command_relay == self.coordinator.submit:
            self.manager.command_relay = None
            self.manager.intake.relay(None)
        if self.manager.grad_sync is self.seed_grads:
            self.manager.grad_sync = None
        dropping = self.manager.intake.also_dropping
        for drop in (self.coordinator.drop_pending, self._stop_deferring):
            if drop in dropping:
                dropping.remove(drop)
        self.coordinator.drop_pending("the multi-rank coordinator closed before its next sync")
        self._stop_deferring()

    def _stop_deferring(self, _reason: str = "") -> None:
        """Seeds' faults charged at once again, and those held for the next step charged on
        this rank (it leaves the run, or its manager closes: no step of the run follows)."""
        defer_faults(self._table, None, only=self.seed_grads.faults)  # not a later run's
        self.seed_grads.faults.charge_here()

    def _quarantine_diverged(self, result: EpochSyncResult) -> None:
        """The default ``on_divergence``: nothing on the rank itself, whose seeds ``sync_epoch``
        quarantines with every other rank's."""

    def _quarantine(self, reason: str) -> None:
        for record in self.manager.require_registry().in_stages(ISOLATED_STAGES):
            record.seed.quarantine(reason)
