"""The kernel manager under data parallelism: DDP for the host, Kasmina for its seeds.

Why a second mechanism beside ``DistributedDataParallel``: DDP registers the parameters a module
has when it is wrapped, and averages exactly those. Seeds get their parameters later, when a
GERMINATE grafts a kernel copy into a slot, so DDP never hears of them, and its buffer broadcast
would overwrite Kasmina's per-seed buffers with rank 0's. So (docs/design.md §5, "Multi-process
runs"):

- ``wrap_ddp(model)`` wraps the host in DDP with everything
  Kasmina owns (every parameter and buffer of a slot other than its host layer's) on DDP's
  ignore list, a kernel grafted after the wrap added as it comes; a host with nothing left to
  reduce (frozen whole) it returns unwrapped, its parameters and buffers broadcast from rank 0
  as DDP's constructor would have;
- ``SeedGradientSync`` (``kasmina.manager.grad_sync``) averages the gradients of every live
  seed across ranks, once per step, from ``manager.step()`` before any optimizer steps, and the
  host parameters DDP does not reduce; ``perf/bench_distributed.py`` measures the cost;
- ``DistributedKasmina.sync_epoch`` averages the running seeds' kernel buffers (a BatchNorm's
  running statistics, which each rank updates from its own shard) before the replica checksum
  (``BufferAverage``), so healthy ranks agree and only drift is repaired, and, separately,
  gives an unwrapped host's buffers (``host_buffers``) rank 0's values, as DDP would have at
  each forward (``sync_host_buffers``);
- ``ManagerReplica`` and ``ManagerApplier`` (``kasmina.manager.coordination``) are what ranks
  compare and repair, and how agreed commands apply;
- ``DistributedKasmina`` puts them together over a ``DistributedCoordinator``, and routes the
  manager's command door through it, so a command sent to any rank is verified there and applied
  on every rank or none.

FSDP (``fully_shard``) and tensor-parallel hosts are refused (``check_supported_parallelism``),
and so is a ``DistributedDataParallel`` built over the model by hand rather than by ``wrap_ddp``
(``check_not_wrapped_by_hand``), by ``wrap_ddp`` and ``DistributedKasmina`` and at each epoch
sync.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import weakref
import zlib
from collections import Counter
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kasmina.control.distributed import DistributedCoordinator
from kasmina.control.processes import (
    UnsupportedParallelismError,
    broadcast_tensors,
    check_supported_parallelism,
    collective_device,
    collective_timeout_s,
)
from kasmina.control.relay import EpochSyncResult
from kasmina.control.replica import BufferAverage, agree
from kasmina.manager.coordination import PREPARE_SHARE, ManagerApplier, ManagerReplica
from kasmina.manager.grad_sync import DEFAULT_BUCKET_CAP_MB, SeedGradientSync
from kasmina.manager.manager import KasminaKernelManager
from kasmina.manager.slots import SlotRegistry
from kasmina.manager.wrap_records import WrapRecord, record_wrap, wrap_record
from kasmina.seeds.charging import defer_faults
from kasmina.seeds.constants import one_written_elsewhere
from kasmina.seeds.kernel_watch import watch_kernels
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.stages import ISOLATED_STAGES, RUNS_KERNEL
from kasmina.utils.process_group import process_group_active

logger = logging.getLogger(__name__)

__all__ = [
    "DistributedKasmina",
    "check_not_wrapped_by_hand",
    "check_same_layout",
    "host_buffers",
    "kasmina_owned_names",
    "running_kernel_buffers",
    "sync_host_buffers",
    "wrap_ddp",
]


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


def _model_device(model: nn.Module, group: Any) -> torch.device:
    """Where the model checks' collectives run (the layout's, the hand-built DDP's): under NCCL
    the rank's model's CUDA device, set as current device or not (DDP with ``device_ids``
    needs no ``set_device``), else the group's."""
    device = collective_device(group)
    if device.type == "cuda":
        tensors = itertools.chain(model.parameters(), model.buffers())
        device = next((t.device for t in tensors if t.is_cuda), device)
    return device


def check_not_wrapped_by_hand(model: nn.Module, group: Any = None) -> None:
    """``UnsupportedParallelismError`` where a ``DistributedDataParallel`` not built by
    ``wrap_ddp`` was built over ``model`` after its slots: its constructor broadcast rank 0's
    buffers, Kasmina's among them, and so does each of its forwards, over every seed's kernel
    buffers (a batch norm's running statistics: the epoch sync's average finds rank 0's on
    every rank). Nor does it align the host's buffers before a measurement (``WrapRecord``):
    G5 scored the same seed differently on each rank under a host batch norm, and the next sync
    "repaired" a healthy rank. Seen by an in-place write of a slot's constant ``_one`` that
    Kasmina did not make (``seeds.constants.one_written_elsewhere``): a read per slot, off the
    step. The ranks of ``group`` agree first (one MAX all-reduce of the verdict), so they
    refuse alike: a rank that alone saw a write (user code writing one rank's buffers) would
    otherwise leave the others waiting in the next collective. Without a process group there
    is no DDP to see. A DDP built with ``init_sync=False`` or ``broadcast_buffers=False``, or
    one built before the slots (``attach`` on its ``.module``), leaves no mark here (torch
    hides its forwards' buffer writes from the version counter) and is not seen."""
    if not process_group_active():
        return
    written = [
        name or "the model"
        for name, module in model.named_modules()
        if isinstance(module, KasminaLayer) and one_written_elsewhere(module)
    ]
    verdict = torch.tensor([int(bool(written))], device=_model_device(model, group))
    dist.all_reduce(verdict, op=dist.ReduceOp.MAX, group=group)
    if written:
        raise UnsupportedParallelismError(
            f"the buffers of slot {written[0]} were overwritten in place since attach, as the "
            "constructor of a DistributedDataParallel built over the model by hand does (it "
            "broadcasts every buffer from rank 0, Kasmina's per-seed ones too, and again at "
            "each forward): wrap the model with kasmina.manager.ddp.wrap_ddp(model, "
            "**ddp_options) instead, after attach"
        )
    if verdict.item():
        raise UnsupportedParallelismError(
            "another rank found its slots' buffers overwritten in place since attach, as the "
            "constructor of a DistributedDataParallel built over the model by hand does: wrap "
            "the model with kasmina.manager.ddp.wrap_ddp(model, **ddp_options) instead, after "
            "attach"
        )


def wrap_ddp(model: nn.Module, **ddp_options: Any) -> nn.Module:
    """``DistributedDataParallel(model, **ddp_options)`` over the host's own parameters, with
    Kasmina's on DDP's ignore list; ``model`` itself when no process group is initialised (so a
    training loop runs unchanged in one process).

    Attach the slots first (``manager.attach``), then wrap, then build a ``DistributedKasmina``
    over the manager, which averages the seeds' gradients.

    A host none of whose parameters requires a gradient (Kasmina's aside: a frozen host whose
    seeds alone train, ``attach(host_lr=None)``) leaves DDP nothing to average, and its
    constructor raises; ``model`` itself is returned then, after the same checks, and logged
    at INFO. What DDP's constructor would have done first is done here: the host's parameters
    (and, unless ``broadcast_buffers=False``, its buffers) are broadcast from rank 0 (not with
    ``init_sync=False``), so hosts built differently on each rank start alike. Every host
    parameter is then the seeds' gradient sync's to average once unfrozen, as one frozen at a
    wrap is, and unless ``broadcast_buffers=False`` the host's buffers (``host_buffers``: a
    BatchNorm's running statistics in train mode), which DDP would have broadcast from rank 0
    at each forward, take rank 0's values at each ``DistributedKasmina.sync_epoch``.

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
    _check_ddp_options(ddp_options)
    if not process_group_active():
        return model
    owned = kasmina_owned_names(model)
    group, mesh = ddp_options.get("process_group"), ddp_options.get("device_mesh")
    if group is None and mesh is not None:
        group = mesh.get_group(0)  # DDP's own group for a mesh
    check_not_wrapped_by_hand(model, group)
    broadcast = ddp_options.get("broadcast_buffers", True)
    check_same_layout(model, owned, group, buffers=broadcast)
    ours = set(owned)
    host = [p for name, p in model.named_parameters() if name not in ours]
    if not any(p.requires_grad for p in host):  # torch's constructor raises: nothing to reduce
        init_sync = ddp_options.get("init_sync", True)
        return _leave_unwrapped(model, host, ours, group, broadcast, init_sync)
    return _wrap_host(model, owned, ours, ddp_options)


def _check_ddp_options(ddp_options: dict[str, Any]) -> None:
    """``find_unused_parameters`` True unless given; refused False, as ``static_graph=True``."""
    ddp_options.setdefault("find_unused_parameters", True)
    if ddp_options.get("static_graph") or not ddp_options["find_unused_parameters"]:
        raise ValueError(
            "wrap_ddp: static_graph=True and find_unused_parameters=False need every step to "
            "use the same parameters; a slot whose seeds are isolated passes no gradient to "
            "the host layers before it, so DDP would skip their reduction and the ranks split"
        )


def _leave_unwrapped(
    model: nn.Module,
    host: list[nn.Parameter],
    ours: set[str],
    group: Any,
    broadcast: bool,
    init_sync: bool,
) -> nn.Module:
    """``model`` itself, for a host none of whose parameters requires a gradient: what DDP's
    constructor would have broadcast first, broadcast, and the wrap recorded (``wrap_ddp``)."""
    logger.info(
        "wrap_ddp: no host parameter requires a gradient (a frozen host, seeds only): the "
        "model is returned unwrapped; the seeds' gradient sync averages a host layer "
        "unfrozen later%s",
        ", and each epoch sync gives the host's buffers rank 0's" if broadcast else "",
    )
    if init_sync:  # as DDP's constructor: every rank rank 0's host
        buffers = [b for name, b in model.named_buffers() if name not in ours]
        broadcast_tensors([*host, *(buffers if broadcast else ())], 0, group)
    # Every host parameter the seeds' gradient sync's to average once unfrozen; the host's
    # buffers rank 0's at each epoch sync, and for a measurement as the epoch sync gives
    # them (``sync_host_buffers``), unless ``broadcast_buffers=False``.
    unwrapped = functools.partial(_sync_unwrapped, weakref.ref(model), group)
    decided = WrapRecord(
        not_reduced=tuple(host),
        unwrapped_buffers=bool(broadcast),
        aligner=unwrapped if broadcast else None,
    )
    record_wrap(model, decided)
    return model


def _wrap_host(
    model: nn.Module, owned: list[str], ours: set[str], ddp_options: dict[str, Any]
) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` with the ``owned`` names (Kasmina's) ignored,
    kept ignored as kernels come and go, and the wrap recorded (``wrap_ddp``)."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, owned)
    wrapped = DistributedDataParallel(model, **ddp_options)
    _keep_ignoring_owned(model, wrapped)
    # Wrapped again once a layer trains: DDP broadcasts the host's buffers (and, for a
    # measurement, as at its next forward). It registers only the parameters that require a
    # gradient now: those frozen, unfrozen later, are the seeds' gradient sync's to average.
    frozen = [p for name, p in model.named_parameters() if name not in ours and not p.requires_grad]
    aligner = functools.partial(_sync_like_ddp, weakref.ref(wrapped))
    record_wrap(model, WrapRecord(not_reduced=tuple(frozen), aligner=aligner))
    return wrapped


def _sync_unwrapped(model_ref: weakref.ref[nn.Module], group: Any) -> None:
    """What the next epoch sync does to the buffers of a host ``wrap_ddp`` left unwrapped, now
    (``sync_host_buffers``)."""
    model = model_ref()
    if model is not None:
        sync_host_buffers(model, group)


def _sync_like_ddp(wrapped_ref: weakref.ref[nn.Module]) -> None:
    """What DDP does first in its next forward, now: its buffers (the host's, not Kasmina's)
    broadcast from rank 0, unless it does not broadcast them (``broadcast_buffers=False``)."""
    wrapped = wrapped_ref()
    if wrapped is not None and wrapped.will_sync_module_buffers():
        wrapped._sync_buffers()


def _keep_ignoring_owned(model: nn.Module, wrapped: nn.Module) -> None:
    """Keep what ``model``'s slots own on ``wrapped``'s ignore list as their kernels come and go.
    DDP holds that list as a set of names (``parameters_to_ignore``) and, before every forward,
    lists the module's buffers it does not hold and broadcasts them from rank 0: a kernel a
    GERMINATE grafted after the wrap (a rollback or repair putting one back) was not on it,
    and its buffers (a batch norm's running statistics) took rank 0's values at each forward.
    Its names are added when it comes (``kernel_watch``), once, not at each step; names of a
    kernel that left stay, naming nothing."""
    model_ref, wrapped_ref = weakref.ref(model), weakref.ref(wrapped)

    def ignore_owned() -> bool:
        model, wrapped = model_ref(), wrapped_ref()
        if model is None or wrapped is None or getattr(wrapped, "module", None) is not model:
            return False  # the wrapper or the model is gone: nothing left to keep
        wrapped.parameters_to_ignore.update(kasmina_owned_names(model))
        return True

    watch_kernels((m for m in model.modules() if isinstance(m, GradientIsolatedSeed)), ignore_owned)


def check_same_layout(
    model: nn.Module, ignored: Collection[str] = (), group: Any = None, *, buffers: bool = True
) -> None:
    """``ValueError`` on every rank when the ranks' models differ in the shapes, dtypes or
    ``requires_grad`` of the tensors DDP takes, in order: the parameters (and the buffers it
    broadcasts, ``buffers``) but ``ignored``, over ``group`` (DDP's process group; None: the
    default one). DDP's constructor compares shapes, but a dtype that differs (a rank cast to
    bfloat16) makes its first broadcast read sizes that do not match, and gloo aborts the
    process; a host frozen on some ranks only is returned unwrapped there while the others wait
    in DDP's constructor, until the group's timeout. One all-gather of a 16-byte digest, on the
    model's CUDA device under NCCL (else the group's)."""
    tensors = [*model.named_parameters(), *(model.named_buffers() if buffers else ())]
    layout = [
        (tuple(t.shape), str(t.dtype), t.requires_grad)
        for name, t in tensors
        if name not in ignored
    ]
    digest = hashlib.blake2b(repr(layout).encode(), digest_size=16).digest()
    mine = torch.tensor(list(digest), dtype=torch.int64, device=_model_device(model, group))
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    differ = [rank for rank, other in enumerate(every) if not torch.equal(other, every[0])]
    if differ:
        dtypes = dict(Counter(dtype for _, dtype, _ in layout))
        trainable = sum(grad for _, _, grad in layout)
        raise ValueError(
            f"wrap_ddp: the ranks' models differ in the shapes, dtypes or requires_grad of their "
            f"parameters or buffers: rank(s) {differ} differ from rank 0 (this rank, "
            f"{dist.get_rank(group)}, has {len(layout)}: {dtypes}, {trainable} requiring a "
            f"gradient); build, cast and freeze the model alike on every rank"
        )


def host_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, buffer)`` of the host's buffers (none of Kasmina's; floating and integer alike)
    where ``wrap_ddp`` returned ``model`` unwrapped with ``broadcast_buffers`` on, in the
    model's order; else none. What DDP would have broadcast from rank 0 at each forward: a
    frozen host in train mode (a BatchNorm's running statistics) updates them from each rank's
    own shard."""
    if not wrap_record(model).unwrapped_buffers:
        return []
    ours = set(kasmina_owned_names(model))
    return [(f"host.{n}", b) for n, b in model.named_buffers() if n not in ours]


def sync_host_buffers(model: nn.Module, group: Any = None) -> int:
    """Rank 0's values (over ``group``) for the buffers of a host ``wrap_ddp`` left unwrapped
    (``host_buffers``), which DDP would have broadcast at each forward; how many (0 without a
    group). A collective: every rank calls it at the same point. A 2-integer all-reduce first
    checks that every rank holds the same buffers (names, dtypes, shapes): a broadcast of
    sizes that differ fails or hangs; where they differ nothing is broadcast, and it is logged.
    Rank 0's values, non-finite or not, are every rank's, as under DDP."""
    if not process_group_active() or dist.get_world_size(group) == 1:
        return 0
    named = host_buffers(model)
    layout = zlib.crc32(";".join(f"{n}|{t.dtype}|{tuple(t.shape)}" for n, t in named).encode())
    if not agree([layout], collective_device(group), group)[0]:
        logger.error(
            "the unwrapped host's buffer layouts differ across ranks: none is broadcast from "
            "rank 0 (the host's buffers are not in the replica checksum, nor repaired)"
        )
        return 0
    broadcast_tensors([t for _, t in named], 0, group)
    return len(named)


def running_kernel_buffers(registry: SlotRegistry) -> list[tuple[str, torch.Tensor]]:
    """``(seed id.buffer name, buffer)`` of every seed whose forward runs its kernel, in registry
    order (the same on every rank): what its forwards may update from each rank's own data."""
    return [
        (f"{record.seed_id}.{name}", buffer)
        for record in registry.in_stages(RUNS_KERNEL)
        if record.kernel is not None
        for name, buffer in record.kernel.named_buffers()
    ]


class DistributedKasmina:
    """A kernel manager as one rank of a data-parallel run (docs/design.md §5).

    Build it on every rank after ``manager.attach``/``register`` (and ``wrap_ddp`` for the
    host). From then on ``manager.step()`` averages the seeds' gradients across ranks, and a
    command given to any rank's door (``manager.handle_adaptation_command``, or ``submit``) is
    verified there and applied on every rank at the next ``sync_epoch(epoch)``, which every rank
    calls at the same boundary (after ``manager.end_epoch``); that sync first averages the running
    seeds' buffers (``seed_buffers``) and gives those of a host ``wrap_ddp`` left unwrapped rank
    0's values (``sync_host_buffers``), then checks the replicas and repairs a rank that
    diverged. ``close`` detaches it from the manager.

    It holds the manager's components it uses (its state; through the replica and the applier
    its guard, intake and report; the command handler, whose executor the manager is behind the
    ``CommandExecutor`` protocol), and reads or writes none of the manager's attributes:
    building it hands the manager its relay and gradient sync (``manager.join_run``), and
    ``close`` gives them back through what that returned (a closure over the manager).

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
        state = self.state = manager.state
        registry = state.require_registry()
        check_supported_parallelism(registry.model)
        check_not_wrapped_by_hand(registry.model, group)  # before anything joins the manager
        # Opened now rather than at the first checkpoint: a rank whose run's disk checkpoints
        # another live trainer holds (ranks sharing a run_id) is refused before any rank trains.
        _ = state.checkpoints
        self.group = group
        self.seed_grads = SeedGradientSync(registry, group=group, bucket_cap_mb=bucket_cap_mb)
        self.seed_buffers = BufferAverage(
            group=group, bucket_cap_bytes=self.seed_grads.bucket_cap_bytes
        )
        # The other ranks wait in a collective while this one prepares (or fetches a kernel
        # for a ROLLBACK or a repair): half the process group's timeout leaves the rest of the
        # sync room to answer in time.
        prepare_s = collective_timeout_s(group) * PREPARE_SHARE if process_group_active() else None
        intake = manager.intake
        self.replica = ManagerReplica(
            state, manager.guard, lock=intake.lock, include_host=check_host,
            fetch_timeout_s=prepare_s,
        )  # fmt: skip
        self.applier = ManagerApplier(intake, manager.report, prepare_timeout_s=prepare_s)
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
        # A fault a seed finds on this rank's host waits for the step, which charges every
        # rank's on every rank (``charging``; the seeds of the table, germinated later too):
        # charged on this rank alone it made the replicas differ, and each epoch sync repaired
        # it away. Held faults are charged here when the rank leaves, or its manager closes.
        self._table = registry.table
        deferring = self.world_size > 1
        holders = [self.coordinator.drop_pending]  # refused when the manager closes, as its own
        if deferring:
            holders.append(self._stop_deferring)
        # ``ValueError`` where the manager is in a run already: nothing joined, nothing deferred.
        self._leave = manager.join_run(self.coordinator.submit, self.seed_grads, holders)
        if deferring:
            defer_faults(self._table, self.seed_grads.faults)

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
        """The collective boundary: average the running seeds' buffers, give those of a host
        ``wrap_ddp`` left unwrapped rank 0's values, apply what the ranks received, check,
        repair."""
        # Seed buffers are averaged here, once per epoch and before the checksum, on every rank
        # (this call is itself the collective boundary), rather than at each step: the training
        # forward reads batch statistics, and running statistics are linear in what each step
        # adds, so one average at the boundary gives what averaging them at every step would
        # (up to rounding) at no per-step cost. Before the commands apply, the seeds that ran
        # this epoch are the ones in a running stage. A closed manager raises before the first
        # collective, as its step() and end_epoch() do: it would refuse every command the ranks
        # received, as one it could not verify, and report the ranks consistent.
        registry = self.state.require_registry(training=True)
        # A DDP built by hand since: refused on every rank alike, before the sync's work.
        check_not_wrapped_by_hand(registry.model, self.group)
        self.seed_grads.charge_held_faults()  # found since the last step: before any command
        self.seed_buffers(running_kernel_buffers(registry))
        # A host wrap_ddp left unwrapped (frozen whole) has no DDP to broadcast its buffers
        # from rank 0 at each forward: they are broadcast here, as DDP would have (no repair
        # covers them), in a call of their own, so that neither's layout check stops the other.
        sync_host_buffers(registry.model, self.group)
        result = self.coordinator.sync_epoch(epoch)
        self.replica.note_sync(result)
        unrepaired = sorted(result.unrepaired_ranks)
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
        self._leave()  # the manager's door and step its own again (not a later run's)
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
        for record in self.state.require_registry().in_stages(ISOLATED_STAGES):
            record.seed.quarantine(reason)
