"""The seed state table on the device (docs/design.md §3).

``GPUStateTensor`` keeps the ``[num_seeds, 10]`` int32 table where the fused ``lifecycle_update``
and ``lifecycle_tick`` ops can validate and apply a thousand transitions in one launch. The
forward pass must never wait for the device, so the table also keeps a *host mirror* of each
seed's stage and epochs-in-stage: it is updated from the per-update result codes that
``lifecycle_update`` returns (reading those K codes back is one sync, paid on commands, never in
the forward) and from ``tick``, which ages every seed by exactly one epoch. Change the table only
through these methods (or call :meth:`GPUStateTensor.resync` afterwards).
"""

from __future__ import annotations

import copy
import logging
import math
import types
import weakref
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from kasmina.errors import IllegalTransitionError
from kasmina.ops import lifecycle_tick, lifecycle_update
from kasmina.stages import (
    NUM_STATE_COLUMNS,
    SeedStage,
    StateColumn,
    TransitionCode,
)

if TYPE_CHECKING:
    from kasmina.utils.telemetry import TelemetryReporter

logger = logging.getLogger(__name__)

# Fractions (alpha, gate score, performance threshold) are stored in the int32 table * 1000.
SCALE = 1000

__all__ = ["SCALE", "GPUStateTensor", "blueprint_hash", "parse_gate", "parse_stage"]


TransitionObserver = Callable[[int, SeedStage, SeedStage], None]


class _Observer:
    """A weakly held bound method (plain callables are held strongly).

    Copying or pickling the table copies a *following* observer's object with it (as a strong
    reference would), so a deep-copied or unpickled seed keeps receiving its own transitions.
    An observer registered with ``follows_copies=False`` (a manager's registry, which holds
    keys, locks and open files) stays with the original: the copy gets a dead entry, dropped on
    its first transition, because a copied model is nobody's managed model.
    """

    def __init__(self, fn: Callable[..., None] | None, follows_copies: bool = True) -> None:
        owner = getattr(fn, "__self__", None)
        self._owner = None if owner is None else weakref.ref(owner)
        self._fn: Any = getattr(fn, "__func__", fn)
        self.follows_copies = follows_copies

    def __call__(self) -> Callable[..., None] | None:
        if self._owner is None:
            return self._fn
        owner = self._owner()
        return None if owner is None else types.MethodType(self._fn, owner)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Observer:
        if not self.follows_copies:
            return _Observer(None)
        owner = None if self._owner is None else self._owner()
        if owner is None:
            return _Observer(self._fn if self._owner is None else None)
        return _Observer(types.MethodType(self._fn, copy.deepcopy(owner, memo)))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Observer, (self() if self.follows_copies else None,))


def parse_stage(value: SeedStage | int | str) -> SeedStage:
    """A stage from an enum, its value, or a name (``"GRAFTING"``, ``"SEED_STAGE_GRAFTING"``)."""
    if isinstance(value, SeedStage):
        return value
    if isinstance(value, str):
        name = value.strip().upper()
        for prefix in ("SEED_STAGE_", "SEED_"):
            if name.startswith(prefix):
                name = name[len(prefix) :]
        try:
            return SeedStage[name]
        except KeyError:
            raise ValueError(f"unknown lifecycle stage {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return SeedStage(value)
        except ValueError:
            raise ValueError(f"lifecycle stage value {value} is outside 0..10") from None
    raise ValueError(f"lifecycle stage must be a SeedStage, int or str, got {type(value).__name__}")


def parse_gate(value: int | str | None) -> int | None:
    """A gate number 1..5 from ``3`` or ``"G3"``; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().upper()
        number = int(text[1:]) if text.startswith("G") and text[1:].isdigit() else -1
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise ValueError(f"gate must be an int or 'G1'..'G5', got {value!r}")
    if not 1 <= number <= 5:
        raise ValueError(f"gate must be 1..5 (G1..G5), got {value!r}")
    return number


def blueprint_hash(artifact_id: str) -> int:
    """A stable non-negative int32 for the table's BLUEPRINT_ID column."""
    return zlib.crc32(artifact_id.encode("utf-8")) & 0x7FFFFFFF


def _scaled(fraction: float) -> int:
    if not math.isfinite(fraction):
        raise ValueError(f"expected a finite value, got {fraction}")
    return int(round(fraction * SCALE))


# --------------------------------------------------------------------------------- state table


class GPUStateTensor:
    """The lifecycle table of ``num_seeds`` seeds on ``device`` with a host mirror of stages.

    ``embargo_epochs`` is written to EMBARGO_COUNTER whenever a seed enters COOLDOWN; the
    COOLDOWN -> RECYCLING transition is refused until ``tick`` has counted it down to zero.
    ``telemetry`` (a ``TelemetryReporter``) receives one event per applied or rejected update.
    """

    def __init__(
        self,
        num_seeds: int,
        device: torch.device | str | None = None,
        *,
        embargo_epochs: int = 0,
        telemetry: TelemetryReporter | None = None,
    ) -> None:
        if not isinstance(num_seeds, int) or isinstance(num_seeds, bool) or num_seeds < 1:
            raise ValueError(f"num_seeds must be a positive int, got {num_seeds!r}")
        if embargo_epochs < 0:
            raise ValueError(f"embargo_epochs must be >= 0, got {embargo_epochs}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.state_tensor = torch.zeros(
            (num_seeds, NUM_STATE_COLUMNS), dtype=torch.int32, device=torch.device(device)
        )
        self.embargo_epochs = int(embargo_epochs)
        self.telemetry = telemetry
        self.counters: Counter[str] = Counter()
        self.version = 0  # bumped on every host-visible change (see ``listen``)
        self._stages = [SeedStage.DORMANT] * num_seeds
        self._epochs = [0] * num_seeds
        self._observers: dict[int, list[_Observer]] = {}
        self._listeners: list[_Observer] = []

    # -- host mirror (no device sync) ----------------------------------------------------
    @property
    def num_seeds(self) -> int:
        return len(self._stages)

    @property
    def device(self) -> torch.device:
        return self.state_tensor.device

    @property
    def illegal_transitions(self) -> int:
        """Updates rejected because the transition is not in docs/design.md §3's table."""
        return self.counters["illegal"]

    def stage(self, idx: int) -> SeedStage:
        return self._stages[self.check_index(idx)]

    def stages(self) -> list[SeedStage]:
        return list(self._stages)

    def epochs_in_state(self, idx: int) -> int:
        return self._epochs[self.check_index(idx)]

    def observe(
        self, idx: int, observer: TransitionObserver, *, follows_copies: bool = True
    ) -> None:
        """Call ``observer(idx, old, new)`` after every applied transition of seed ``idx``.

        A bound method is held weakly, so a table shared by many slots never keeps a dropped
        seed alive. ``follows_copies=False`` keeps the observer out of deep copies and pickles
        of the table (and so of a model holding it): what a manager hangs on its model must
        not travel with ``copy.deepcopy(model)`` or ``torch.save(model)``.
        """
        entry = _Observer(observer, follows_copies)
        self._observers.setdefault(self.check_index(idx), []).append(entry)

    def listen(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every change of ``version``: every applied transition,
        restore, resync, load and :meth:`touch` (a kernel attached or detached).

        Held like an observer (a bound method weakly, following copies). A ``KasminaLayer``
        keeps its plan this way, as a slot-local snapshot that its forward reads without
        touching the table (a compiled forward is guarded on that snapshot alone).
        """
        self.__dict__.setdefault("_listeners", []).append(_Observer(listener))

    # -- transitions ---------------------------------------------------------------------
    def update_seed_state(
        self,
        idx: int,
        stage: SeedStage | int | str,
        epochs_in_state: int | None = None,
        last_gate: int | str | None = None,
    ) -> None:
        """Apply one validated transition; an illegal one is counted, reported and raised.

        Raises ``IndexError`` for a bad index and ``IllegalTransitionError`` (nothing changed)
        for a transition outside the table or COOLDOWN -> RECYCLING under embargo.
        """
        idx = self.check_index(idx)
        gate = parse_gate(last_gate)
        # Checked before the transition is launched: a bad value must change nothing.
        if epochs_in_state is not None and (
            isinstance(epochs_in_state, bool)
            or not isinstance(epochs_in_state, int)
            or epochs_in_state < 0
        ):
            raise ValueError(f"epochs_in_state must be an int >= 0, got {epochs_in_state!r}")
        code = self.batch_state_update([(idx, stage)], gates=None if gate is None else [gate])[0]
        if code != TransitionCode.APPLIED:
            raise IllegalTransitionError(
                f"seed {idx}: {self._stages[idx].name} -> {parse_stage(stage).name} rejected "
                f"({code.name.lower()})"
            )
        if epochs_in_state is not None:
            self.state_tensor[idx, StateColumn.EPOCHS_IN_STATE] = int(epochs_in_state)
            self._epochs[idx] = int(epochs_in_state)

    def batch_state_update(
        self,
        updates: Sequence[tuple[int, SeedStage | int | str]],
        gates: Sequence[int | str | None] | None = None,
    ) -> list[TransitionCode]:
        """Validate and apply K transitions in one launch; returns one code per update.

        Rejected updates (illegal, out of range, duplicated index) change nothing and are
        counted and reported. Malformed input (unknown stage, bad gate, length mismatch) raises
        ``ValueError`` before anything is launched.
        """
        if not updates:
            return []
        indices = [int(i) for i, _ in updates]
        targets = [parse_stage(s) for _, s in updates]
        gate_values: list[int] | None = None
        if gates is not None:
            if len(gates) != len(updates):
                raise ValueError(f"{len(gates)} gates for {len(updates)} updates")
            # -1 tells the op "not given": it then records the transition's own gate, if any.
            gate_values = [-1 if g is None else g for g in (parse_gate(g) for g in gates)]
        device = self.device
        codes_t = lifecycle_update(
            self.state_tensor,
            torch.tensor(indices, dtype=torch.int64, device=device),
            torch.tensor([int(t) for t in targets], dtype=torch.int64, device=device),
            None
            if gate_values is None
            else torch.tensor(gate_values, dtype=torch.int64, device=device),
        )
        codes = [TransitionCode(int(c)) for c in codes_t.tolist()]  # the one sync of a command
        applied: list[tuple[int, SeedStage, SeedStage]] = []
        for idx, target, code in zip(indices, targets, codes, strict=True):
            self.counters[code.name.lower()] += 1
            if code == TransitionCode.APPLIED:
                old = self._stages[idx]
                self._stages[idx] = target
                self._epochs[idx] = 0
                applied.append((idx, old, target))
            else:
                self._report_rejection(idx, target, code)
        if applied:
            self._bump()
            cooled = [idx for idx, _, new in applied if new == SeedStage.COOLDOWN]
            if cooled:
                rows = torch.tensor(cooled, dtype=torch.int64, device=device)
                self.state_tensor[rows, StateColumn.EMBARGO_COUNTER] = self.embargo_epochs
            for idx, old, new in applied:
                self._report_applied(idx, old, new)
        return codes

    def tick(self) -> None:
        """One epoch: age every seed, count embargoes down, refresh READY_FLAG (one launch)."""
        lifecycle_tick(self.state_tensor)
        self._epochs = [e + 1 for e in self._epochs]

    def get_ready_seeds(self) -> torch.Tensor:
        """Device indices of seeds whose READY_FLAG is set (syncs: call it on commands)."""
        ready = self.state_tensor[:, StateColumn.READY_FLAG]
        return torch.nonzero(ready, as_tuple=False).squeeze(-1)

    # -- other columns (device writes, no sync) ------------------------------------------
    def set_column(self, idx: int, column: StateColumn, value: int) -> None:
        """Write a non-stage column; stage and epochs only change through transitions/tick."""
        column = StateColumn(column)
        if column in (StateColumn.LIFECYCLE_STAGE, StateColumn.EPOCHS_IN_STATE):
            raise ValueError(f"{column.name} changes only through transitions and tick()")
        self.state_tensor[self.check_index(idx), column] = int(value)

    def set_alpha(self, idx: int, alpha: float) -> None:
        self.set_column(idx, StateColumn.ALPHA_BLEND, _scaled(min(max(alpha, 0.0), 1.0)))

    def set_gate_score(self, idx: int, score: float) -> None:
        self.set_column(idx, StateColumn.GATE_SCORE, _scaled(score))

    def set_performance_gate(self, idx: int, threshold: float) -> None:
        self.set_column(idx, StateColumn.PERFORMANCE_GATE, _scaled(threshold))

    def set_blueprint(self, idx: int, artifact_id: str) -> None:
        self.set_column(
            idx, StateColumn.BLUEPRINT_ID, blueprint_hash(artifact_id) if artifact_id else 0
        )

    def set_region(self, idx: int, region: int) -> None:
        self.set_column(idx, StateColumn.REGION_ID, region)

    def read_row(self, idx: int) -> dict[str, int]:
        """One seed's row by column name (syncs)."""
        row = self.state_tensor[self.check_index(idx)].tolist()
        return {column.name: int(row[column]) for column in StateColumn}

    def restore_row(self, idx: int, row: Sequence[int]) -> None:
        """Overwrite one seed's row (rollback/restore: bypasses validation, checks values)."""
        idx = self.check_index(idx)
        values = [int(v) for v in row]
        if len(values) != NUM_STATE_COLUMNS:
            raise ValueError(f"a state row has {NUM_STATE_COLUMNS} columns, got {len(values)}")
        stage = parse_stage(values[StateColumn.LIFECYCLE_STAGE])
        self.state_tensor[idx] = torch.tensor(values, dtype=torch.int32, device=self.device)
        self._stages[idx] = stage
        self._epochs[idx] = values[StateColumn.EPOCHS_IN_STATE]
        self._bump()

    def resync(self) -> None:
        """Re-read the host mirror from the device table (after an outside write)."""
        rows = self.state_tensor[:, [StateColumn.LIFECYCLE_STAGE, StateColumn.EPOCHS_IN_STATE]]
        values = rows.tolist()
        self._stages = [parse_stage(int(s)) for s, _ in values]
        self._epochs = [int(e) for _, e in values]
        self._bump()

    def to(self, device: torch.device | str) -> GPUStateTensor:
        """Move the table in place (the mirror is unaffected); returns ``self``."""
        self.state_tensor = self.state_tensor.to(device)
        return self

    # -- persistence ---------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles (of a model holding the table) leave the telemetry reporter
        # behind: it belongs to whoever attached the slots and holds locks and sinks. A copy
        # reports nowhere until it is given a reporter (``table.telemetry = ...``).
        state = dict(self.__dict__)
        state["telemetry"] = None
        return state

    def state_dict(self) -> dict[str, Any]:
        return {
            "state_tensor": self.state_tensor.detach().cpu().clone(),
            "embargo_epochs": self.embargo_epochs,
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a table saved by :meth:`state_dict`; invalid input changes nothing."""
        table = state["state_tensor"]
        if not isinstance(table, torch.Tensor) or tuple(table.shape) != tuple(
            self.state_tensor.shape
        ):
            raise ValueError(f"state table must have shape {tuple(self.state_tensor.shape)}")
        if table.dtype != torch.int32:
            raise ValueError(f"state table must be int32, got {table.dtype}")
        stages = [parse_stage(int(s)) for s in table[:, StateColumn.LIFECYCLE_STAGE].tolist()]
        self.state_tensor.copy_(table.to(self.device))
        self._stages = stages
        self._epochs = [int(e) for e in table[:, StateColumn.EPOCHS_IN_STATE].tolist()]
        self.embargo_epochs = int(state.get("embargo_epochs", self.embargo_epochs))
        self.counters = Counter(state.get("counters", {}))
        self._bump()

    # -- internals -----------------------------------------------------------------------
    def check_index(self, idx: int) -> int:
        """``idx`` as an int, or ``IndexError`` when it is not a row of this table."""
        if isinstance(idx, bool) or not 0 <= int(idx) < len(self._stages):
            raise IndexError(f"seed index {idx} out of range for {len(self._stages)} seeds")
        return int(idx)

    def _report_rejection(self, idx: int, target: SeedStage, code: TransitionCode) -> None:
        source = self._stages[idx].name if 0 <= idx < len(self._stages) else "?"
        logger.warning(
            "lifecycle: seed %d %s -> %s rejected (%s)", idx, source, target.name, code.name.lower()
        )
        self._emit(
            "lifecycle.transition_rejected",
            {"seed_index": str(idx), "from": source, "to": target.name, "code": code.name},
        )

    def _report_applied(self, idx: int, old: SeedStage, new: SeedStage) -> None:
        logger.info("lifecycle: seed %d %s -> %s", idx, old.name, new.name)
        self._emit(
            "lifecycle.transition", {"seed_index": str(idx), "from": old.name, "to": new.name}
        )
        refs = self._observers.get(idx, [])
        for ref in list(refs):
            observer = ref()
            if observer is None:
                refs.remove(ref)
            else:
                observer(idx, old, new)

    def touch(self) -> None:
        """Mark a host-visible change that is not a transition (e.g. a kernel attached)."""
        self._bump()

    def _bump(self) -> None:
        """``version`` goes up and every listener hears of it (dead ones are dropped)."""
        self.version += 1
        listeners = self.__dict__.setdefault("_listeners", [])  # absent from older pickles
        for ref in list(listeners):
            listener = ref()
            if listener is None:
                listeners.remove(ref)
            else:
                listener()

    def report(self, name: str, labels: dict[str, str]) -> None:
        """Send one event to the telemetry reporter, if any; never raises."""
        self._emit(name, labels)

    def _emit(self, name: str, labels: dict[str, str]) -> None:
        if self.telemetry is None:
            return
        try:
            self.telemetry.emit(name, 1.0, labels=labels)
        except Exception:  # telemetry never breaks training
            logger.exception("telemetry emit failed for %s", name)
