"""The seed state table on the device (docs/design.md §3).

``GPUStateTensor`` keeps the ``[num_seeds, 10]`` int32 table where the fused ``lifecycle_update``
and ``lifecycle_tick`` ops validate and apply a thousand transitions in one launch. The forward
never waits for the device, so the table keeps a *host mirror* of each seed's stage and epochs
in stage, updated from ``lifecycle_update``'s result codes (reading those K codes back is one
sync, paid on commands, never in the forward) and by ``tick``, which ages every seed one epoch.
Change the table only through these methods (or call :meth:`GPUStateTensor.resync` after).
"""

from __future__ import annotations

import logging
import numbers
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from itertools import compress
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from kasmina.errors import IllegalTransitionError
from kasmina.ops.lifecycle import INT32_MAX, as_ints, lifecycle_tick, lifecycle_update
from kasmina.seeds.columns import blueprint_hash, fixed_point, real
from kasmina.seeds.observers import Listeners, TransitionObserver, WeakObserver, call_safely
from kasmina.stages import (
    NUM_STATE_COLUMNS,
    SeedStage,
    StateColumn,
    TransitionCode,
    checked_row,
    parse_gate,
    parse_stage,
)
from kasmina.utils.checks import check_int
from kasmina.utils.interrupts import interrupts_deferred

if TYPE_CHECKING:
    from kasmina.utils.telemetry import TelemetryReporter

logger = logging.getLogger(__name__)

# The batch update's host side: result codes and stages by value, counter keys by code, and
# what its bulk checks accept without parsing item by item.
_CODES = tuple(TransitionCode)
_CODE_KEYS = tuple(code.name.lower() for code in TransitionCode)
_STAGES = tuple(SeedStage)
_STAGE_TYPES = frozenset({SeedStage, int})
_ONLY_STAGES = frozenset({SeedStage})
_STAGE_VALUES = frozenset(range(len(SeedStage)))
_NO_GATE = -1
_GATE_TYPES = frozenset({int, type(None)})
_GATE_VALUES = frozenset({_NO_GATE, 1, 2, 3, 4, 5})
_COOLDOWN = SeedStage.COOLDOWN

__all__ = ["GPUStateTensor"]


def _index_buffer(indices: Sequence[Any]) -> array[int]:
    """Seed indices as an int64 buffer; a float or a bool (``int()`` made another row) refused."""
    try:
        return array("q", indices if set(map(type, indices)) <= {int} else as_ints(indices))
    except (TypeError, OverflowError) as exc:
        raise ValueError(f"seed indices must be ints that fit in int64: {exc}") from None


def _ascending(requested: torch.Tensor, k: int, applied: int) -> bool:
    """Whether ``requested`` (int64 ``[K]``, host) counts up by one; asked if all ``k`` applied."""
    steps = requested.numpy()
    return applied == k and bool((steps[1:] - steps[:-1] == 1).all())


class GPUStateTensor:
    """The lifecycle table of ``num_seeds`` seeds on ``device`` with a host mirror of stages.

    ``embargo_epochs`` (0 to 2**31 - 1) goes to the int32 EMBARGO_COUNTER whenever a seed enters
    COOLDOWN; COOLDOWN -> RECYCLING is refused until ``tick`` has counted it down to zero.
    ``telemetry`` (a ``TelemetryReporter``) receives one event per applied or rejected update.
    """

    # The specification's name -> index tables of the columns and the stage codes (read-only).
    STATE_COLUMNS: Mapping[str, int] = MappingProxyType({c.name: c.value for c in StateColumn})
    LIFECYCLE_STATES: Mapping[str, int] = MappingProxyType({s.name: s.value for s in SeedStage})

    def __init__(
        self,
        num_seeds: int,
        device: torch.device | str | None = None,
        *,
        embargo_epochs: int = 0,
        telemetry: TelemetryReporter | None = None,
    ) -> None:
        if type(num_seeds) is not int or not 0 < num_seeds <= INT32_MAX:  # no bool, no 2**62
            raise ValueError(f"num_seeds must be a positive int32, got {num_seeds!r:.40}")
        try:  # an int32 count (True was an embargo of 1)
            embargo = check_int("embargo_epochs", embargo_epochs, 0, INT32_MAX)
        except ValueError:
            raise ValueError(
                f"embargo_epochs {embargo_epochs!r:.40} is not an int in [0, {INT32_MAX}]"
            ) from None
        if device is None or torch.device(device).type == "meta":  # meta: a table without data
            device = "cuda" if torch.cuda.is_available() else "cpu"
        shape = (num_seeds, NUM_STATE_COLUMNS)
        self.state_tensor = torch.zeros(shape, dtype=torch.int32, device=torch.device(device))
        self.embargo_epochs = embargo
        self.telemetry = telemetry
        self.log_transitions = True  # False: a private table (a benchmark's) logs none
        self.counters: Counter[str] = Counter()
        self.version = 0  # bumped on every host-visible change (see ``listen``)
        self._stages = [SeedStage.DORMANT] * num_seeds
        self._epochs = [0] * num_seeds
        self._observers: dict[int, list[WeakObserver]] = {}
        self._listeners = Listeners()
        self._host_rows: tuple[torch.Tensor, int | None, list[list[int]]] | None = None

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

        A bound method is held weakly: a table shared by many slots keeps no dropped seed alive.
        ``follows_copies=False`` keeps the observer out of deep copies and pickles of the table
        (and of a model holding it): what a manager hangs on its model must not travel with
        ``copy.deepcopy(model)`` or ``torch.save(model)``. Dead entries are dropped here too.
        """
        refs = self._observers.setdefault(self.check_index(idx), [])
        refs[:] = [ref for ref in refs if ref() is not None]
        refs.append(WeakObserver(observer, follows_copies))

    def unobserve(self, idx: int, observer: TransitionObserver) -> None:
        """Stop calling ``observer`` (every entry of it) for seed ``idx``; dead entries go too.
        An owner that lets go of its seeds (a closed manager) no longer hears of, nor owns them."""
        idx = self.check_index(idx)
        refs = [ref for ref in self._observers.get(idx, ()) if ref() not in (None, observer)]
        if refs:
            self._observers[idx] = refs
        else:
            self._observers.pop(idx, None)

    def owned(self, idx: int) -> bool:
        """Whether seed ``idx`` has an owner: a live observer with ``follows_copies=False`` (a
        manager's registry, keeping the seed's kernel, optimizer, monitor, pin). A copy has none."""
        refs = self._observers.get(self.check_index(idx), ())
        return any(not ref.follows_copies and ref() is not None for ref in refs)

    def followed(self, idx: int) -> bool:
        """Whether a live observer (a seed, an owner) follows seed ``idx``: its row is taken."""
        return any(ref() is not None for ref in self._observers.get(self.check_index(idx), ()))

    def listen(self, listener: Callable[[], None], rows: Iterable[int] | None = None) -> None:
        """Call ``listener()`` after every change of ``version`` that concerns ``rows`` (None:
        every change): an applied transition, a restored row or a :meth:`touch` (a kernel
        attached or detached) of one of them, and every resync and load.

        Held like an observer (a bound method weakly, following copies). A ``KasminaLayer``
        keeps its plan this way, a snapshot its forward reads without touching the table (a
        compiled forward is guarded on it alone), following its own seeds' rows (``Listeners``).
        """
        watched = None if rows is None else frozenset(self.check_index(i) for i in rows)
        self._listener_set().add(listener, watched)

    # -- transitions ---------------------------------------------------------------------
    def update_seed_state(
        self,
        seed_idx: int,
        lifecycle_stage: SeedStage | int | str,
        epochs_in_state: int | None = None,
        last_gate: int | str | None = None,
    ) -> None:
        """Apply one validated transition; an illegal one is counted, reported and raised.

        Raises ``IndexError`` for a bad index and ``IllegalTransitionError`` (nothing changed)
        for a transition outside the table or COOLDOWN -> RECYCLING under embargo.
        """
        idx, stage = self.check_index(seed_idx), lifecycle_stage
        gate = parse_gate(last_gate)
        # Checked before the launch: a bad value changes nothing (EPOCHS_IN_STATE is int32).
        if epochs_in_state is not None:
            epochs_in_state = check_int("epochs_in_state", epochs_in_state, 0, INT32_MAX)
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
        updates: Iterable[tuple[int, SeedStage | int | str]],
        gates: Sequence[int | str | None] | None = None,
    ) -> list[TransitionCode]:
        """Validate and apply K transitions in one launch; returns one code per update.

        Rejected updates (illegal, out of range, duplicated index) change nothing and are
        counted and reported. Malformed input (unknown stage, bad gate, length mismatch) raises
        ``ValueError`` before anything is launched, so a batch applies in full or not at all.

        The requests become one int64 buffer checked in bulk; only malformed input goes through
        the per-item parsers, to name the bad item. Tensors: :meth:`batch_state_update_tensors`.
        """
        if not isinstance(updates, Sized):
            if not isinstance(updates, Iterable):  # None: list()'s "not iterable", unnamed
                raise TypeError(
                    f"updates must be (index, stage) pairs, got {type(updates).__name__}"
                )
            updates = list(updates)
        if not updates:
            return []
        k = len(updates)
        try:
            indices, targets = zip(*updates, strict=True)
        except (TypeError, ValueError) as exc:
            raise ValueError("every update must be an (index, stage) pair") from exc
        buf = _index_buffer(indices)
        kinds = set(map(type, targets))
        stages: Sequence[SeedStage] | None = targets if kinds == _ONLY_STAGES else None
        if kinds <= _STAGE_TYPES and (stages is not None or _STAGE_VALUES.issuperset(targets)):
            buf += array("q", targets)
        else:  # names, or a bad item: the parser says which
            buf += array("q", [int(parse_stage(s)) for s in targets])
        if gates is not None:
            if len(gates) != k:
                raise ValueError(f"{len(gates)} gates for {k} updates")
            # -1 tells the op "not given": it then records the transition's own gate, if any.
            if (
                _GATE_TYPES.issuperset(map(type, gates))
                and _NO_GATE not in gates
                and _GATE_VALUES.issuperset(gates)
            ):
                buf += array("q", [_NO_GATE if g is None else g for g in gates])
            else:
                buf += array("q", [_NO_GATE if g is None else g for g in map(parse_gate, gates)])
        requests = torch.frombuffer(buf, dtype=torch.int64).view(-1, k)
        with interrupts_deferred():  # applied and heard of whole (``_apply``)
            raw = self._apply(requests, None, stages)[1]
        if raw.count(0) == k:
            return [TransitionCode.APPLIED] * k
        return list(map(_CODES.__getitem__, raw))

    def batch_state_update_tensors(
        self,
        seed_idx: torch.Tensor,
        new_stage: torch.Tensor,
        gates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`batch_state_update` for callers holding tensors; returns int32 ``[K]`` codes
        on the table's device (``kasmina.stages.TransitionCode`` values).

        ``seed_idx``, ``new_stage`` and ``gates``: int32/int64 ``[K]`` tensors on one device
        (any; a view is fine). A negative gate means "not given", as in the op. A stage outside
        0..10 or a gate of 0 or above 5 raises ``ValueError`` and changes nothing. The host
        mirror needs the requests on the host: on a GPU they are read back once before the
        launch (and the codes once after).
        """
        given = [seed_idx, new_stage] if gates is None else [seed_idx, new_stage, gates]
        for name, t in zip(("seed_idx", "new_stage", "gates"), given, strict=False):
            if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"{name} must be an int32 or int64 tensor, got {t!r:.60}")
            if t.dim() != 1 or t.shape[0] != seed_idx.shape[0] or t.device != seed_idx.device:
                raise ValueError(
                    f"{name} must be 1-d, of seed_idx's length and on its device, got "
                    f"{list(t.shape)} on {t.device}"
                )
        if seed_idx.shape[0] == 0:
            return torch.empty(0, dtype=torch.int32, device=self.device)
        stacked = torch.stack([t.to(torch.int64) for t in given])
        requests = stacked.cpu()  # on a GPU, the read-back the host mirror needs
        lo, hi = requests[1].aminmax()
        if int(lo) < 0 or int(hi) >= len(_STAGES):
            bad = requests[1][(requests[1] < 0) | (requests[1] >= len(_STAGES))]
            parse_stage(int(bad[0]))  # raises, naming the value
        if gates is not None:
            row = requests[2]
            bad = row[(row == 0) | (row > 5)]
            if bad.numel():
                parse_gate(int(bad[0]))  # raises, naming the value
        on_device = stacked if stacked.device == self.device else None
        with interrupts_deferred():  # applied and heard of whole (``_apply``)
            return self._apply(requests, on_device)[0]

    def _apply(
        self,
        requests: torch.Tensor,
        on_device: torch.Tensor | None,
        stages: Sequence[SeedStage] | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """Launch validated ``[2 or 3, K]`` int64 host requests (index, stage[, gate]; stages
        0..10, gates -1 or 1..5), then update the mirror, counters, listeners and observers.
        Called with a SIGINT held (a Ctrl-C left device, mirror, listeners or owners apart).

        ``on_device``: the same requests on the table's device, if the caller has them;
        ``stages``: the requested stages as ``SeedStage`` members, if the caller has them.
        """
        k = requests.shape[1]
        if on_device is None:
            on_device = requests.to(self.device)
        codes_t = lifecycle_update(
            self.state_tensor,
            on_device[0],
            on_device[1],
            on_device[2] if requests.shape[0] == 3 else None,
        )
        raw: list[int] = codes_t.tolist()  # the one sync of a command
        indices: list[int] = requests[0].tolist()
        if stages is None:
            news = list(map(_STAGES.__getitem__, requests[1].tolist()))
        else:
            news = list(stages)
        applied = raw.count(0)
        if applied:
            self.counters["applied"] += applied
        if applied != k:
            for code in sorted(set(raw) - {0}):
                self.counters[_CODE_KEYS[code]] += raw.count(code)
            for idx, new, code in zip(indices, news, raw, strict=True):
                if code:
                    self._report_rejection(idx, new, _CODES[code])
            if not applied:
                return codes_t, raw
            keep = [code == 0 for code in raw]
            indices = list(compress(indices, keep))
            news = list(compress(news, keep))
        mirror, epochs = self._stages, self._epochs
        # Old stages only where someone hears of each transition: every one when it is logged
        # or sent to telemetry, else only the observed seeds' (observers alone, no log/event).
        reported: list[int] | None = None
        report = self._report_applied
        if self.telemetry is not None or self.log_transitions and logger.isEnabledFor(logging.INFO):
            reported = list(range(len(indices)))
        elif self._observers:
            observers = self._observers
            reported = [n for n, idx in enumerate(indices) if idx in observers]
            report = self._notify_observers
        olds = [mirror[indices[n]] for n in reported] if reported else []
        first, count = indices[0], len(indices)
        if indices[-1] - first == count - 1 and (count < 3 or _ascending(requests[0], k, count)):
            # One run of consecutive seeds (a whole slot or table): two slice assignments.
            mirror[first : first + count] = news
            epochs[first : first + count] = [0] * count
        else:
            for idx, new in zip(indices, news, strict=True):
                mirror[idx] = new
                epochs[idx] = 0
        if _COOLDOWN in news:
            cooled = [idx for idx, new in zip(indices, news, strict=True) if new is _COOLDOWN]
            rows = torch.tensor(cooled, dtype=torch.int64, device=self.device)
            self.state_tensor[rows, StateColumn.EMBARGO_COUNTER] = self.embargo_epochs
        # Listeners (each slot's plan) hear of the whole batch at once. An interrupt in an
        # announcement never keeps an owner from hearing of its seed's change: the observers
        # keep a seed's kernel, optimizer and pins in step with its stage.
        changes = [(indices[n], old, news[n]) for n, old in zip(reported or (), olds, strict=True)]
        done = 0  # changes announced (or being announced: its own finally tells its owners)
        try:
            self._bump(indices)
            for change in changes:
                done += 1
                report(*change)
        finally:
            for change in changes[done:]:
                self._notify_observers(*change)
        return codes_t, raw

    def tick(self) -> None:
        """One epoch: age every seed, count embargoes down, refresh READY_FLAG (one launch).
        An epoch count stops at 2**31 - 1, on the device (int32) and in the mirror alike."""
        with interrupts_deferred():  # the device's ages and the mirror's alike
            lifecycle_tick(self.state_tensor)
            self._epochs = [e + 1 if e < INT32_MAX else e for e in self._epochs]

    def get_ready_seeds(self) -> torch.Tensor:
        """Device indices of seeds whose READY_FLAG is set (syncs: call it on commands)."""
        return torch.nonzero(self.state_tensor[:, StateColumn.READY_FLAG]).squeeze(-1)

    # -- other columns (device writes, no sync) ------------------------------------------
    def set_column(self, idx: int, column: StateColumn, value: int) -> None:
        """Write a non-stage column; stage and epochs only change through transitions/tick."""
        column = StateColumn(column)
        if column in (StateColumn.LIFECYCLE_STAGE, StateColumn.EPOCHS_IN_STATE):
            raise ValueError(f"{column.name} changes only through transitions and tick()")
        # Checked first: inf and NaN were an OverflowError, 2.7 truncated, 2**40 a RuntimeError.
        if not isinstance(value, numbers.Real) or not -(2**31) <= value <= INT32_MAX or value % 1:
            raise ValueError(f"{column.name} must be an int32 integer, got {value!r:.80}")
        self.state_tensor[self.check_index(idx), column] = int(value)

    # The fractions' setters: one that is no real number (None, a str, a tensor) is a TypeError
    # naming it (``columns.real``), checked before the clamp or the range compares it.
    def set_alpha(self, idx: int, alpha: float) -> None:
        alpha = min(max(real("alpha", alpha), 0.0), 1.0)
        self.set_column(idx, StateColumn.ALPHA_BLEND, fixed_point(alpha, "alpha"))

    def set_gate_score(self, idx: int, score: float) -> None:
        self.set_column(idx, StateColumn.GATE_SCORE, fixed_point(score, "gate score"))

    def set_performance_gate(self, idx: int, threshold: float) -> None:
        value = fixed_point(threshold, "performance gate")
        self.set_column(idx, StateColumn.PERFORMANCE_GATE, value)

    def set_blueprint(self, idx: int, artifact_id: str | None) -> None:
        if not isinstance(artifact_id, str | None):  # "" or None clears it ("" hashes to 0)
            raise TypeError(f"artifact_id must be a str, got {type(artifact_id).__name__}")
        self.set_column(idx, StateColumn.BLUEPRINT_ID, blueprint_hash(artifact_id or ""))

    def set_region(self, idx: int, region: int) -> None:
        self.set_column(idx, StateColumn.REGION_ID, region)

    def read_row(self, idx: int) -> dict[str, int]:
        """One seed's row by column name. Rows read between two writes (each seed's state_dict
        in a checkpoint) cost one sync in all: one host copy of the table serves them while the
        version counter of the table, which every in-place write bumps, stays put."""
        idx, table = self.check_index(idx), self.state_tensor
        version = None if table.is_inference() else table._version  # inference: no counter
        copy = self.__dict__.get("_host_rows")  # (table, its version, its rows); older pickles
        if version is None or copy is None or copy[0] is not table or copy[1] != version:
            copy = self._host_rows = (table, version, table.tolist())
        return {column.name: int(copy[2][idx][column]) for column in StateColumn}

    def restore_row(self, idx: int, row: Sequence[int]) -> None:
        """Overwrite one seed's row (rollback/restore: bypasses validation, checks values)."""
        idx = self.check_index(idx)
        values = checked_row(row)
        self.state_tensor[idx] = torch.tensor(values, dtype=torch.int32, device=self.device)
        self._stages[idx] = parse_stage(values[StateColumn.LIFECYCLE_STAGE])
        self._epochs[idx] = values[StateColumn.EPOCHS_IN_STATE]
        self._bump((idx,))

    def report_restored(self, before: Sequence[SeedStage], cause: str) -> None:
        """Log and emit ``lifecycle.transition`` (labelled ``cause``) for each seed whose stage a
        restore changed from ``before``; observers are not called (the restore set their state)."""
        for idx, (old, new) in enumerate(zip(before, self._stages, strict=True)):
            if old != new:
                self._announce(idx, old, new, cause)

    def resync(self) -> None:
        """Re-read the host mirror from the device table (after an outside write)."""
        rows = self.state_tensor[:, [StateColumn.LIFECYCLE_STAGE, StateColumn.EPOCHS_IN_STATE]]
        values, self._host_rows = rows.tolist(), None  # a write read_row's cache could not see
        self._stages = [parse_stage(int(s)) for s, _ in values]
        self._epochs = [int(e) for _, e in values]
        self._bump()

    def to(self, device: torch.device | str) -> GPUStateTensor:
        """Move the table in place, never to ``meta`` (where it would hold no data)."""
        if torch.device(device).type != "meta":
            self.state_tensor = self.state_tensor.to(device)
        return self

    # -- persistence ---------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles (of a model holding the table) leave the telemetry reporter
        # behind: it belongs to whoever attached the slots and holds locks and sinks. A copy
        # reports nowhere until it is given a reporter (``table.telemetry = ...``).
        state = dict(self.__dict__)
        state["telemetry"] = state["_host_rows"] = None
        return state

    def state_dict(self) -> dict[str, Any]:
        return {
            "state_tensor": self.state_tensor.detach().cpu().clone(),
            "embargo_epochs": self.embargo_epochs,
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a table saved by :meth:`state_dict`; invalid input changes nothing (every
        value is read and checked before the first write)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"a state table's state is a mapping, got {type(state).__name__}")
        table, shape = state.get("state_tensor"), tuple(self.state_tensor.shape)  # absent: None
        if not isinstance(table, torch.Tensor) or tuple(table.shape) != shape:
            raise ValueError(f"state table (state_tensor) must be a tensor of shape {shape}")
        if table.dtype != torch.int32:
            raise ValueError(f"state table must be int32, got {table.dtype}")
        stages = [parse_stage(int(s)) for s in table[:, StateColumn.LIFECYCLE_STAGE].tolist()]
        epochs = [int(e) for e in table[:, StateColumn.EPOCHS_IN_STATE].tolist()]
        for column in (StateColumn.EPOCHS_IN_STATE, StateColumn.EMBARGO_COUNTER):  # counts
            if (low := min(table[:, column].tolist())) < 0:
                raise ValueError(f"{column.name} must be >= 0, got {low}")
        embargo = state.get("embargo_epochs", self.embargo_epochs)
        if type(embargo) is not int or not 0 <= embargo <= INT32_MAX:  # a bool is no count
            raise ValueError(f"embargo_epochs must be an int in [0, {INT32_MAX}], got {embargo!r}")
        saved = state.get("counters", {})
        if not isinstance(saved, Mapping):
            raise ValueError(f"counters must be a mapping, got {type(saved).__name__}")
        counters = Counter(saved)
        for key, count in counters.items():  # counts by code name; a bool is no count
            if type(key) is not str or type(count) is not int or count < 0:
                raise ValueError(f"counters must map names to ints >= 0, got {key!r}: {count!r}")
        self.state_tensor.copy_(table.to(self.device))
        self._stages, self._epochs = stages, epochs
        self.embargo_epochs, self.counters = embargo, counters
        self._bump()

    # -- internals -----------------------------------------------------------------------
    def check_index(self, idx: int) -> int:
        """``idx`` as an int, or ``IndexError`` when it is not a row of this table; a float or a
        bool (which ``int()`` made another row) is a ``TypeError``, as a list's index."""
        row = idx if type(idx) is int else as_ints([idx])[0]
        if not 0 <= row < len(self._stages):
            raise IndexError(f"seed index {idx!r} out of range for {len(self._stages)} seeds")
        return row

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
        try:
            self._announce(idx, old, new)
        finally:
            self._notify_observers(idx, old, new)

    def _announce(self, idx: int, old: SeedStage, new: SeedStage, cause: str = "") -> None:
        """Log (unless ``log_transitions`` is off) and emit ``lifecycle.transition``."""
        labels = {"seed_index": str(idx), "from": old.name, "to": new.name}
        if cause:
            labels["cause"] = cause
        if self.log_transitions:
            why = f" ({cause})" if cause else ""
            logger.info("lifecycle: seed %d %s -> %s%s", idx, old.name, new.name, why)
        self._emit("lifecycle.transition", labels)

    def _notify_observers(self, idx: int, old: SeedStage, new: SeedStage) -> None:
        refs = self._observers.get(idx)
        if not refs:
            return
        for ref in list(refs):
            observer = ref()
            if observer is None:
                refs.remove(ref)
            else:
                call_safely(observer, idx, old, new)

    def touch(self, idx: int | None = None) -> None:
        """Mark a change of seed ``idx`` (None: any) that is not a transition (a new kernel)."""
        self._bump(None if idx is None else (self.check_index(idx),))

    def _bump(self, rows: Iterable[int] | None = None) -> None:
        """``version`` goes up and the listeners that follow ``rows`` (None: all) hear of it."""
        self.version += 1
        self._listener_set().notify(rows)

    def _listener_set(self) -> Listeners:
        listeners = self.__dict__.get("_listeners", ())  # absent, or a list: an older pickle
        if not isinstance(listeners, Listeners):
            listeners = self.__dict__["_listeners"] = Listeners(listeners)
        return listeners

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
