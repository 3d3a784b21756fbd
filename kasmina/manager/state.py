"""``ManagerState``: the fields the manager's components share, and nothing else.

The kernel manager is a façade over components (the command execution, the isolation guard, the
report, rollback). None of them holds the manager: each receives this state object (and the other
components it calls), so what a component can touch is visible in its constructor. The state
owns no behaviour beyond lookups over its own fields; everything that changes seeds, kernels or
optimizers lives in a component and happens under the façade's lock.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import sys
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kasmina.isolation.optimizers import HOST_ID, TEACHER_SOURCE, IsolatedOptimizerManager
from kasmina.kd.teacher import CheckpointedTeacher, TeacherInput
from kasmina.manager.checkpoints import CheckpointStore, open_checkpoint_store
from kasmina.manager.config import KasminaConfig
from kasmina.manager.records import SeedRecord
from kasmina.manager.runs import mark_run_dir
from kasmina.manager.slots import SlotRegistry
from kasmina.seeds.columns import SCALE
from kasmina.seeds.constants import constants_on_meta, host_device
from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import RUNS_KERNEL
from kasmina.urza.cache import GPUKernelCache
from kasmina.urza.loader import KernelLoader
from kasmina.utils.checks import check_positive, check_real
from kasmina.utils.perfstats import LatencyStats
from kasmina.utils.ratelimit import rarely
from kasmina.utils.state_io import CheckpointSigner, unsaveable
from kasmina.utils.telemetry import TelemetryReporter

logger = logging.getLogger(__name__)

__all__ = [
    "COMMAND_LOG_SIZE",
    "FIELD_REPORTS_SIZE",
    "PERF_TIMERS",
    "CommandLogEntry",
    "ManagerState",
    "StateField",
    "check_device",
    "check_optimizer",
]

# The executed-command log keeps the newest entries only: (command_id, kind, ok, reason).
COMMAND_LOG_SIZE = 1000
FIELD_REPORTS_SIZE = 1000  # the latest harvested seeds' reports; the count is kept apart
CommandLogEntry = tuple[str, str, bool, str]
# The manager's own timers (see ManagerReport.get_performance_metrics).
PERF_TIMERS = ("command", "overhead", "step", "execute")


def _timers() -> dict[str, LatencyStats]:
    return {name: LatencyStats() for name in PERF_TIMERS}


def check_optimizer(
    cls: type[torch.optim.Optimizer],
    seed_lr: object,
    options: dict[str, Any],
    host_lr: object,
    device: torch.device | None = None,
) -> float | torch.Tensor | None:
    """Refuse at ``register`` what a GERMINATE would meet only when it builds a seed's
    optimizer (each one failed as an "internal error"): a class that is not an optimizer's, a
    learning rate that is not a finite number > 0 (a bool, inf, a string) and options ``cls``
    does not take (a typo), built once here on a throwaway parameter, and a class that cannot
    ``step()`` as the manager steps it, without a closure, on a dense gradient (``LBFGS``,
    ``SparseAdam``: every step raised), stepped once there, on ``device`` when it is a GPU
    (``capturable=True`` steps only there), and one that wraps another optimizer (ZeRO:
    ``_wrapper_refusal``). ``host_lr`` (None: no host optimizer) is held to the same rule, a
    one-element tensor (torch.optim takes one) by its value; returned as the host optimizer
    takes it: a NumPy or ``Fraction`` rate as a Python float (checkpoints are read with
    ``weights_only=True``, which refuses a NumPy scalar), a tensor as it is."""
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(
            f"optimizer_cls must be a torch.optim.Optimizer subclass (torch.optim.Adam), "
            f"got {cls!r}"
        )
    if host_lr is not None:
        host_lr = _checked_lr("host_lr", host_lr)
    lr = _checked_lr("seed_lr", seed_lr)
    if isinstance(lr, torch.Tensor):
        lr = lr.item()
    zero = getattr(sys.modules.get("torch.distributed.optim"), "ZeroRedundancyOptimizer", None)
    if isinstance(zero, type) and issubclass(cls, zero):  # refused before it needs a group
        raise ValueError(_wrapper_refusal(cls))
    on = device if device is not None and device.type == "cuda" else torch.device("cpu")
    param = torch.zeros(1, requires_grad=True, device=on)
    try:
        optimizer = cls([param], lr=lr, **options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the seeds' optimizer {cls.__name__} refuses {options}: {exc}") from exc
    held = getattr(optimizer, "__dict__", {}).values()  # ZeRO's .optim, another wrapper's
    if any(isinstance(value, torch.optim.Optimizer) for value in held):
        raise ValueError(_wrapper_refusal(cls))
    param.grad = torch.zeros(1, device=on)
    try:
        optimizer.step()
    except Exception as exc:
        raise ValueError(
            f"optimizer_cls {cls.__name__} cannot step() as the manager steps every optimizer "
            f"(no closure, dense gradients): {type(exc).__name__}: {exc}"
        ) from exc
    return host_lr  # type: ignore[return-value]


def _wrapper_refusal(cls: type) -> str:
    """Why ``cls``, an optimizer that owns another it steps (``ZeroRedundancyOptimizer``), is
    refused: a seed promoted at ACTIVE joins the host optimizer's ``param_groups``, which the
    wrapped one never sees (ZeRO partitions its parameters when built): the seed never trained,
    and ZeRO's ``state_dict`` raised at the first checkpoint (its state not consolidated)."""
    return (
        f"optimizer_cls {cls.__name__} wraps another optimizer, which never sees the parameters "
        "the manager adds to its param groups (a seed promoted at ACTIVE would never train; "
        "ZeroRedundancyOptimizer's state_dict needs consolidating at every checkpoint): pass "
        "the wrapped class itself (optimizer_cls=torch.optim.Adam); under DDP every rank "
        "then keeps the whole optimizer state"
    )


def _checked_lr(name: str, lr: object) -> float | torch.Tensor:
    """``lr`` if a finite number > 0 (``check_positive``: a Python float for a NumPy one), or a
    one-element tensor holding one (an inf tensor rate made every weight inf)."""
    if not isinstance(lr, torch.Tensor):
        return check_positive(name, lr)
    if lr.numel() != 1:
        raise ValueError(f"{name} as a tensor must have one element, got shape {tuple(lr.shape)}")
    check_positive(name, lr.item())
    return lr


def check_device(model: torch.nn.Module, device: torch.device) -> None:
    """Refuse a model whose parameters are not on ``device`` (``config.device``, where the
    kernels load): every GERMINATE was refused, its dry run finding the kernel on one device
    and the slot's activations on another ("auto" on a GPU machine with a CPU model). Refuse,
    naming them, tensors a deferred init left on ``meta`` (:func:`unfilled_meta`): registered,
    the model trained while every GERMINATE failed reading them and ``kasmina.save`` raised."""
    unfilled = unfilled_meta(model)
    if unfilled:
        more = f" and {len(unfilled) - 8} more" if len(unfilled) > 8 else ""
        raise ValueError(
            f"the model holds tensors on the meta device, which have no values: "
            f"{', '.join(unfilled[:8])}{more}; finish its deferred init before register "
            "(load every weight, load_state_dict(..., assign=True), or to_empty and then load)"
        )
    held = next((p.device for p in model.parameters()), None)
    if held is None:
        return
    index = held.index if held.index is not None else 0
    same = held.type == device.type and (device.index is None or device.index == index)
    if not same:
        raise ValueError(
            f"the model is on {held} but config.device puts the seeds' kernels on {device}: "
            "move the model there, or set KasminaConfig(device=...) to the model's device"
        )


def unfilled_meta(model: torch.nn.Module) -> list[str]:
    """The names of ``model``'s parameters and buffers on ``meta`` that no one can fill: all but
    a slot's constants where its host's parameters are real, which ``register`` rebuilds
    (``seeds.constants.rebuild_constants``). One walk of the model, at register only."""
    fillable: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, KasminaLayer) and host_device(module) is not None:
            fillable.update(f"{prefix}.{n}" if prefix else n for n in constants_on_meta(module))
    named = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, t in named if t.is_meta and name not in fillable]


class StateField:
    """A read-only view of one field of ``ManagerState`` (or of another component, ``source``)
    on the façade (``manager.epoch``...); a log (a deque the safe points append to) is read as
    a tuple copied in one C call, so a thread walking it never meets "deque mutated during
    iteration", and a mapping (``counters``, ``gate_counts``, ``val_metrics``, ``perf``, any
    other) as a copy of its own type (a ``Counter`` still reads 0 for a key never counted), so
    an exporter walking it never meets "dictionary changed size during iteration" when a step
    or a command counts a new key. The manager's own code writes through ``ManagerState``.
    Assigning one raises: it would only hide the value the manager goes on using."""

    def __init__(self, source: str = "state") -> None:
        self.source = source

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, manager: Any, owner: type | None = None) -> Any:
        if manager is None:
            return self
        value = getattr(getattr(manager, self.source), self.name)
        if isinstance(value, deque):
            return tuple(value.copy())
        return value.copy() if isinstance(value, dict) else value

    def __set__(self, manager: Any, value: Any) -> None:
        raise AttributeError(
            f"manager.{self.name} is read-only: the manager goes on using its own (the clock "
            "moves with end_epoch and rollbacks, settings and keys are fixed for its life: "
            "build a new manager to change them)"
        )


@dataclass(eq=False)
class ManagerState:
    """What a ``KasminaKernelManager`` knows: its settings and services, the managed slots and
    optimizers, the training clock, and the counters its report reads."""

    config: KasminaConfig
    telemetry: TelemetryReporter
    kernel_cache: GPUKernelCache
    loader: KernelLoader
    # The managed model (None until attach/register) and the optimizer layout over it.
    registry: SlotRegistry | None = None
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    seed_lr: float = 1e-3
    teacher: CheckpointedTeacher | None = None
    # The last batch the teacher saw (``load_kernel_with_teacher``'s default): a user's batch.
    last_teacher_input: TeacherInput | None = field(default=None, repr=False)
    optimizers: IsolatedOptimizerManager = field(init=False)
    # The user's stateful training objects (an LR scheduler, a GradScaler, an EMA model), by
    # name, each with its generation (``track``): saved in every checkpoint and put back by a
    # ROLLBACK with the optimizers. Replaced whole, never changed in place: ``snapshot`` may be
    # iterating the old dict on another thread.
    tracked: dict[str, tuple[Any, int]] = field(default_factory=dict)
    # Marks this manager's checkpoints' tracked states (``tracked.py``): a rollback tells them
    # from another process's (a resumed run's); ``peer_writers``: the marks of the ranks this
    # one was repaired from, which track alike (their generations read as this one's).
    writer: str = field(default_factory=lambda: secrets.token_hex(8))
    peer_writers: frozenset[str] = frozenset()
    # The training clock: the last epoch ended (-1: none yet) and the steps taken.
    epoch: int = -1
    global_step: int = 0
    val_metrics: dict[str, float] = field(default_factory=dict)
    # Counters and records the report reads.
    counters: Counter[str] = field(default_factory=Counter)
    gate_counts: Counter[tuple[int, bool]] = field(default_factory=Counter)
    field_reports: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=FIELD_REPORTS_SIZE)
    )
    field_reports_total: int = 0
    command_log: deque[CommandLogEntry] = field(
        default_factory=lambda: deque(maxlen=COMMAND_LOG_SIZE)
    )
    perf: dict[str, LatencyStats] = field(default_factory=_timers)
    dormant_overhead_us: float = math.nan
    closed: bool = False  # manager.close() was called
    # Per epoch, the artifact each seed held in its checkpoint (``rollback.kernels_to_fetch``):
    # the latest epochs written, in order (a bounded few).
    saved_kernels: dict[int, dict[str, str]] = field(default_factory=dict, repr=False)
    _checkpoints: CheckpointStore | None = field(default=None, init=False, repr=False)
    _checkpoint_signer: CheckpointSigner | None = field(default=None, init=False, repr=False)
    # Held while the store (and its signer) is opened on first use: a health thread listing
    # checkpoints as end_epoch first wrote one opened it twice, and the second run lock failed.
    _opening: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    # The process the manager was built in: a forked child's copy opens no store of the run.
    _pid: int = field(default_factory=os.getpid, init=False, repr=False)

    def __post_init__(self) -> None:
        self.optimizers = self.new_optimizer_manager()

    @property
    def device(self) -> torch.device:
        return self.config.torch_device

    @property
    def checkpoint_signer(self) -> CheckpointSigner:
        """Signs and verifies this run's checkpoint files (epoch and emergency) with the run's
        key; the key file is read, or created, only when a file is first written or read."""
        with self._opening:
            if self._checkpoint_signer is None:
                config = self.config
                signer = CheckpointSigner(config.checkpoint_key_path, config.run_id)
                self._checkpoint_signer = signer
        return self._checkpoint_signer

    @property
    def checkpoints(self) -> CheckpointStore:
        """Epoch checkpoints as ``config.checkpoint_mode`` asks (signed files in
        ``config.checkpoint_dir``, CPU copies, or none), on the configured cadence; opened on
        first use. A closed manager raises (``require_open``): it never opens a store again, nor
        takes its run's lock, and reads none whose lock it released."""
        self.require_open()
        signer = self.checkpoint_signer
        with self._opening:
            if self._checkpoints is None:
                self.require_open()  # close() may have run while this waited
                if os.getpid() != self._pid:  # its parent's run: the store's lock is free here
                    raise RuntimeError(
                        f"the checkpoints of run {self.config.run_id} belong to process "
                        f"{self._pid}: a forked child's copy of its manager opens none"
                    )
                self._checkpoints = open_checkpoint_store(self.config, signer)
        return self._checkpoints

    def open_run(self, undo: ExitStack) -> None:
        """Mark the run directory as a run's (``mark_run_dir``), before any of its files is
        written. A run restarted under its id (its disk checkpoint directory is there) opens its
        store now, holding the run's lock, not at its first ``end_epoch``: until then ``kasmina
        runs prune`` found the run held by no trainer and deleted the checkpoints the restart
        was to roll back to, its key with them. ``undo`` closes it if the constructor fails."""
        config = self.config
        mark_run_dir(config)
        if config.checkpoint_mode == "disk" and Path(config.checkpoint_dir).expanduser().is_dir():
            _ = self.checkpoints
            undo.callback(self.close_checkpoints)

    @contextmanager
    def checkpoints_replaced(self, store: CheckpointStore) -> Iterator[CheckpointStore]:
        """``store`` stands for the run's checkpoint store inside the block (a repair restores
        the source rank's snapshot through it); the live one (``checkpoints``, opened if it
        was not) is yielded, and put back on the way out, whatever happened."""
        live = self.checkpoints
        self._checkpoints = store
        try:
            yield live
        finally:
            self._checkpoints = live

    def open_checkpoints(self) -> CheckpointStore | None:
        """The checkpoint store if it is open (never opening it), else None."""
        with self._opening:
            return None if self.closed else self._checkpoints

    def close_checkpoints(self) -> None:
        """Close the checkpoint store, if one was opened (a disk store releases its run lock)."""
        with self._opening:
            if self._checkpoints is not None:
                self._checkpoints.close()

    def close_held(self) -> None:
        """The manager's close: its teacher closed (a model held in place is the caller's again);
        the user's objects it kept for the run let go: the last batch the teacher saw, the
        tracked objects (no checkpoint saves them again, no ROLLBACK loads them) and the teacher
        logits handed to the slots that no forward took (none is left in the user's model for
        a KD loss no manager collects); then its checkpoint store (``close_checkpoints``)."""
        if self.teacher is not None:
            self.teacher.close()
        self.last_teacher_input, self.tracked = None, {}
        for slot in self.registry.slots if self.registry is not None else ():
            slot.set_teacher_logits(None)
        self.close_checkpoints()

    def keep_teacher_input(self, batch: TeacherInput) -> None:
        """``batch`` as the last the teacher saw; a closed manager keeps none (``RuntimeError``).
        Kept, then asked again: a ``close()`` on another thread in between, which drops the
        batch it finds, may have come before this keep."""
        self.require_open()
        self.last_teacher_input = batch
        if self.closed:
            self.last_teacher_input = None
            self.require_open()

    def require_open(self) -> None:
        """``RuntimeError`` once ``manager.close()`` was called: a closed manager takes no step,
        ends no epoch, carries out no command and opens no checkpoint store (nor its run lock).
        The one check of ``closed``; each caller asks before it changes anything."""
        if self.closed:
            raise RuntimeError(
                "this manager is closed: it no longer steps, ends epochs, carries out commands "
                "or opens its checkpoints"
            )

    def require_no_model(self) -> None:
        """Before ``attach``/``register``: ``RuntimeError`` once closed (``require_open``),
        ``ValueError`` while a model is managed already."""
        self.require_open()
        if self.registry is not None:
            raise ValueError("this manager already manages a model")

    def require_registry(self, *, training: bool = False) -> SlotRegistry:
        """The managed model's slots; ``training``: for a step, an epoch boundary or an evaluation,
        which a closed manager refuses (``require_open``), as it does a model a slot was taken
        out of (``SlotRegistry.check_held``)."""
        if training:
            self.require_open()
        if self.registry is None:
            raise ValueError("no model attached: call manager.attach(model, ...) first")
        if training:
            self.registry.check_held(self.optimizers)
        return self.registry

    def kd_slots(self, width: int | None) -> list[KasminaLayer]:
        """The slots teacher logits ``width`` wide on their last dim go to (``set_teacher_logits``;
        None: every slot, each to drop any it holds; none without a model). A closed manager's
        model is the user's: ``RuntimeError`` (``require_open``), before any slot is touched."""
        self.require_open()
        if width is None:
            return list(self.registry.slots) if self.registry is not None else []
        return self.require_registry().last_dim_slots(lambda s: s.kd_width == width)

    def kd_head_slots(self, weight: Any, bias: Any) -> list[KasminaLayer]:
        """The slots ``set_kd_head`` gives a head to, every one checked first, all or nothing
        (``SlotRegistry.kd_head_slots``); a closed manager's model is the user's:
        ``RuntimeError`` (``require_open``), before any slot is touched."""
        self.require_open()
        return self.require_registry().kd_head_slots(weight, bias)

    def has_seed(self, seed_id: str) -> bool:
        """Whether the managed model has a seed ``seed_id`` (any thread: one dict lookup)."""
        registry = self.registry
        return registry is not None and seed_id in registry.records

    def stamp_performance_gate(self, records: Iterable[SeedRecord]) -> None:
        """The configuration's ``performance_gate`` (a live setting, per mille) as ``records``'
        threshold (their table's PERFORMANCE_GATE column), where a change since their GERMINATE
        left another: at each epoch's end for every seed yet to pass G5, and at its G5."""
        threshold = self.config.performance_gate / SCALE
        for record in records:
            if record.seed.performance_gate != threshold:
                record.seed.performance_gate = threshold

    def graph_open(self) -> bool:
        """Whether a forward through the managed model's slots recorded a graph since the last
        step's end (``SlotRegistry.graph_open``): until then no explicit safe point applies."""
        return self.registry is not None and self.registry.graph_open()

    def new_optimizer_manager(self, scratch: bool = False) -> IsolatedOptimizerManager:
        """An empty optimizer manager whose commands find host, seed and teacher parameters;
        ``scratch``: one a rollback builds and the live one adopts, silent (it creates and
        promotes nothing a sink should hear of, and a refused rollback drops it)."""
        telemetry = None if scratch else self.telemetry
        optimizers = IsolatedOptimizerManager(
            default_optimizer_cls=self.optimizer_cls,
            telemetry=telemetry,
            default_options=self.optimizer_options,
        )
        registry = self.registry
        if registry is not None:
            optimizers.set_parameter_source(HOST_ID, lambda: registry.host_params)
            for seed_id in registry.records:
                optimizers.set_parameter_source(seed_id, _seed_source(registry, seed_id))
        if self.teacher is not None:
            optimizers.set_parameter_source(TEACHER_SOURCE, self.teacher.teacher_parameters)
        return optimizers

    def hold_teacher(self, teacher: CheckpointedTeacher) -> None:
        """``teacher`` as the one commands find, closing the one it replaces: its parameters let
        go (``CheckpointedTeacher.close``), a model it held in place is the caller's again.
        Under the manager's lock, which ``close()`` takes: once closed (a ``close()`` that ran
        while ``teacher`` was built, and closed the last one), ``teacher`` is closed too and
        ``RuntimeError`` raised; held, it stayed the closed manager's for good."""
        if self.closed:
            teacher.close()
            self.require_open()
        old, self.teacher = self.teacher, teacher
        self.optimizers.set_parameter_source(TEACHER_SOURCE, teacher.teacher_parameters)
        if old is not None and old is not teacher:
            old.close()

    def track(self, name: str, obj: Any) -> None:
        """Keep ``obj`` (anything with ``state_dict``/``load_state_dict``) in step with the
        checkpoints under ``name``: saved in each, loaded back by a ROLLBACK (all or nothing,
        with the weights and optimizers: a load that raises refuses the rollback). A scheduler
        left at its own step count set the rolled-back optimizer's lr from the abandoned
        timeline (a cosine schedule at 6x its base lr, a OneCycleLR past its last step).
        Its state must be what a checkpoint read with ``weights_only=True`` holds (tensors,
        plain containers, numbers, strings), checked now. Tracking a name again replaces the
        object, a new generation of the name: a checkpoint this manager took of the old one's
        state leaves it alone. Another process's checkpoint (a resumed run's: the same names,
        tracked in any order) loads into the first object tracked under each name. A closed
        manager writes no checkpoint to save it in: ``RuntimeError`` (``require_open``), the
        object not kept."""
        self.require_open()
        if not isinstance(name, str) or not name:
            raise ValueError(f"a tracked object's name must be a non-empty str, got {name!r}")
        if not all(callable(getattr(obj, m, None)) for m in ("state_dict", "load_state_dict")):
            raise TypeError(
                f"{type(obj).__name__} has no state_dict/load_state_dict: only such an object "
                "(an LR scheduler, a GradScaler, a module) can follow a rollback"
            )
        problem = unsaveable(obj.state_dict())
        if problem is not None:
            raise TypeError(f"tracked {name!r}: its state_dict holds {problem}")
        generation = self.tracked[name][1] + 1 if name in self.tracked else 1
        self.tracked = {**self.tracked, name: (obj, generation)}

    def record_gate_score(self, seed_id: str, score: float) -> None:
        """The trainer's measure of a seed's benefit (0..1), for reports only (warned): G5
        uses the benefit ``evaluate_seeds`` measured, which overwrites this score."""
        score = check_real("gate score", score)
        if not 0.0 <= score <= 1.0:  # NaN too; checked before anything is written
            raise ValueError(f"gate score must be a number in [0, 1], got {score}")
        self.require_open()  # a closed manager's model is the user's: its seeds' state too
        record = self.require_registry()[seed_id]
        record.seed.gate_score = float(score)
        self.counters["gate_scores_recorded"] += 1  # a trainer may record one every step
        n = self.counters["gate_scores_recorded"]
        logger.log(rarely(n, 1000), "record_gate_score(%s): reported only; G5 uses "
                   "evaluate_seeds' [%d recorded so far]", seed_id, n)  # fmt: skip


def _seed_source(registry: SlotRegistry, seed_id: str) -> Callable[[], list[torch.Tensor]]:
    """The parameters a CREATE_SEED command builds ``seed_id``'s optimizer over: ``ValueError``
    (the command refused) for a seed whose stage runs no kernel: a seed TERMINATED after it was
    ACTIVE keeps its kernel's weights, which nothing may train again."""

    def params() -> list[torch.Tensor]:
        stage = registry[seed_id].stage
        if stage not in RUNS_KERNEL:
            raise ValueError(f"seed {seed_id} is {stage.name}: it runs no kernel to train")
        return list(registry.seed_parameters(seed_id))

    return params
