"""GPUStateTensor as a state machine, against a plain-Python model of docs/design.md §3.

The model knows only what ``kasmina.stages`` and the documents say: the legal transitions
(``LEGAL_TRANSITIONS``, COOLDOWN -> RECYCLING only while EMBARGO_COUNTER is 0), the gate each
main-path step records (``GATE_FOR_TRANSITION``), the result codes and their precedence (out of
range > duplicate > illegal; a rejected update changes nothing but its counter), what ``tick``
does (every seed one epoch older, embargoes counted down, READY_FLAG up for COOLDOWN with the
embargo over and for RECYCLING), that ``version`` goes up once per applied batch, restore,
resync and load, and that a malformed batch or an invalid state dict changes nothing.

Hypothesis drives single and batched transitions (lists and tensors; legal, illegal, out of
range, duplicated, malformed), the ``lifecycle_update`` op itself on a copy of the table (with
the unknown stages and wide gates only the op takes), ticks, region and alpha writes, row
restores, direct writes with ``resync``, and state-dict round trips (valid and invalid loads,
deep copies), and after every step the whole device table, the host mirror, the counters, the
version, the ready seeds, every observer and listener call and every telemetry event must be
the model's. Each run goes through every backend of the ops: the NumPy host path (``auto`` on
a CPU), the torch reference and the Triton kernels (the interpreter on a CPU).

The edges they found (epoch counts at int32's limit, counters that are not counts) are pinned
at the end as focused tests.
"""

from __future__ import annotations

import copy
import math
import os
from collections import Counter
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from kasmina.errors import IllegalTransitionError
from kasmina.ops.lifecycle import lifecycle_update
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import (
    GATE_FOR_TRANSITION,
    LEGAL_TRANSITIONS,
    NEXT_STAGE,
    NUM_STATE_COLUMNS,
    SeedStage,
    StateColumn,
    TransitionCode,
)
from tests.seeds.test_table_batch import apply_to_row

S = SeedStage
C = StateColumn
INT32_MAX = 2**31 - 1
MAX_SEEDS = 8

SETTINGS = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# ------------------------------------------------------------------------------------ model


class TableModel:
    """What the table must hold, written from ``kasmina.stages`` and docs/design.md §3."""

    def __init__(self, n: int, embargo: int) -> None:
        self.n = n
        self.rows = [[0] * NUM_STATE_COLUMNS for _ in range(n)]
        self.embargo = embargo
        self.counters: Counter[str] = Counter()
        self.version = 0
        self.observed: list[tuple[int, SeedStage, SeedStage]] = []
        self.events: list[tuple[str, dict[str, str]]] = []

    def stage(self, idx: int) -> SeedStage:
        return S(self.rows[idx][C.LIFECYCLE_STAGE])

    def legal(self, idx: int, new: SeedStage) -> bool:
        row = self.rows[idx]
        cur = S(row[C.LIFECYCLE_STAGE])
        if new not in LEGAL_TRANSITIONS[cur]:
            return False
        if (cur, new) == (S.COOLDOWN, S.RECYCLING):
            return row[C.EMBARGO_COUNTER] == 0
        return True

    def update(
        self, indices: list[int], targets: list[SeedStage], gates: list[int | None]
    ) -> list[int]:
        """One batch: every code is decided on the table as it was before the batch."""
        named = Counter(i for i in indices if 0 <= i < self.n)
        codes = []
        for idx, new in zip(indices, targets, strict=True):
            if not 0 <= idx < self.n:
                code = TransitionCode.OUT_OF_RANGE
            elif named[idx] > 1:
                code = TransitionCode.DUPLICATE
            elif self.legal(idx, new):
                code = TransitionCode.APPLIED
            else:
                code = TransitionCode.ILLEGAL
            codes.append(code)
        applied = []
        for idx, new, gate, code in zip(indices, targets, gates, codes, strict=True):
            self.counters[code.name.lower()] += 1
            if code != TransitionCode.APPLIED:
                source = self.stage(idx).name if 0 <= idx < self.n else "?"
                labels = {"seed_index": str(idx), "from": source, "to": new.name}
                self.events.append(("lifecycle.transition_rejected", {**labels, "code": code.name}))
                continue
            old = self.stage(idx)
            apply_to_row(self.rows[idx], old, new, gate, self.embargo)
            applied.append((idx, old, new))
        if applied:
            self.version += 1
        for idx, old, new in applied:
            labels = {"seed_index": str(idx), "from": old.name, "to": new.name}
            self.events.append(("lifecycle.transition", labels))
            self.observed.append((idx, old, new))
        return [int(c) for c in codes]

    def tick(self) -> None:
        for row in self.rows:
            row[C.EPOCHS_IN_STATE] = min(row[C.EPOCHS_IN_STATE] + 1, INT32_MAX)  # saturates
            row[C.EMBARGO_COUNTER] = max(0, row[C.EMBARGO_COUNTER] - 1)
            stage = row[C.LIFECYCLE_STAGE]
            due = stage == S.RECYCLING or (stage == S.COOLDOWN and row[C.EMBARGO_COUNTER] == 0)
            row[C.READY_FLAG] = int(due)

    def snapshot(self) -> dict[str, Any]:
        return {
            "rows": [list(r) for r in self.rows],
            "embargo": self.embargo,
            "counters": Counter(self.counters),
        }


def op_update(
    rows: list[list[int]], indices: list[int], stages: list[int], gates: list[int] | None
) -> list[int]:
    """``lifecycle_update`` itself on ``rows`` (changed in place), as its docstring says: a
    gate above int32's range makes its lane OUT_OF_RANGE (its index still counts for
    duplicates), an unknown stage is ILLEGAL, a negative gate is "not given", and the op
    leaves EMBARGO_COUNTER alone (the table writes it on entering COOLDOWN)."""
    n = len(rows)
    named = Counter(i for i in indices if 0 <= i < n)
    given = [-1] * len(indices) if gates is None else gates
    codes = []
    for idx, new, gate in zip(indices, stages, given, strict=True):
        if not 0 <= idx < n or gate > INT32_MAX:
            codes.append(TransitionCode.OUT_OF_RANGE)
            continue
        if named[idx] > 1:
            codes.append(TransitionCode.DUPLICATE)
            continue
        row = rows[idx]
        cur = S(row[C.LIFECYCLE_STAGE])
        legal = 0 <= new < len(S) and S(new) in LEGAL_TRANSITIONS[cur]
        if (cur, new) == (S.COOLDOWN, S.RECYCLING) and row[C.EMBARGO_COUNTER] != 0:
            legal = False
        codes.append(TransitionCode.APPLIED if legal else TransitionCode.ILLEGAL)
    for idx, new, gate, code in zip(indices, stages, given, codes, strict=True):
        if code == TransitionCode.APPLIED:
            row = rows[idx]
            old = S(row[C.LIFECYCLE_STAGE])
            row[C.LIFECYCLE_STAGE] = new
            row[C.EPOCHS_IN_STATE] = row[C.READY_FLAG] = 0
            if gate >= 0:
                row[C.LAST_GATE] = gate
            elif (old, S(new)) in GATE_FOR_TRANSITION:
                row[C.LAST_GATE] = GATE_FOR_TRANSITION[(old, S(new))]
    return [int(c) for c in codes]


# ------------------------------------------------------------------------------- strategies

# An index: mostly a row of the table, else one outside it (just past either end, or far
# outside int32); in a batch also a repeat of an earlier entry's index. ``_index`` and
# ``_indices`` resolve the specs against the table's size.
INDICES = st.tuples(st.integers(0, 9), st.integers(0, 63))
# A target: mostly one of the current stage's legal successors (picked when the rule runs),
# else any stage.
TARGETS = st.tuples(st.integers(0, 3), st.integers(0, 10), st.sampled_from(list(S)))
FORMS = st.sampled_from(["member", "int", "name", "prefixed"])
ENTRIES = st.lists(st.tuples(INDICES, TARGETS, FORMS), min_size=1, max_size=8)
LIST_GATES = st.one_of(st.none(), st.integers(1, 5), st.sampled_from(["G1", "g3", " G5 "]))
TENSOR_GATES = st.one_of(st.integers(-(2**40), -1), st.integers(1, 5))


def _spelled(stage: SeedStage, form: str) -> Any:
    if form == "member":
        return stage
    if form == "int":
        return int(stage)
    if form == "name":
        return stage.name.lower()
    return f"SEED_STAGE_{stage.name}"


def _gate_value(gate: Any) -> int | None:
    if gate is None:
        return None
    if isinstance(gate, str):
        return int(gate.strip()[1:])
    return int(gate)


class _Recorder:
    """A telemetry reporter stand-in."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, str]]] = []

    def emit(self, name: str, value: float, labels: dict[str, str]) -> None:
        self.events.append((name, dict(labels)))


def _invalid_state_dicts(state: dict[str, Any], row: int) -> list[dict[str, Any]]:
    """``state`` (a valid ``state_dict()``) spoiled one way at a time."""
    table = state["state_tensor"]
    spoiled: list[dict[str, Any]] = []
    for tensor in (
        torch.cat([table, table[:1]]),  # a row too many
        table[:, :-1].contiguous(),  # a column short
        table.long(),
        table.float(),
        table.tolist(),  # not a tensor
    ):
        spoiled.append({**state, "state_tensor": tensor})
    for stage in (len(S), -1):  # a stage outside 0..10 in one row
        changed = table.clone()
        changed[row, C.LIFECYCLE_STAGE] = stage
        spoiled.append({**state, "state_tensor": changed})
    for embargo in (-1, INT32_MAX + 1, True, "2", 1.0, None):
        spoiled.append({**state, "embargo_epochs": embargo})
    spoiled.append({k: v for k, v in state.items() if k != "state_tensor"})
    spoiled.append({**state, "counters": 5})  # not a mapping
    spoiled.append({**state, "counters": ["applied"]})  # not a mapping (Counter would count it)
    for count in ("x", None, -1, True, 1.5, [1]):  # not counts
        spoiled.append({**state, "counters": {"applied": count}})
    spoiled.append({**state, "counters": {3: 1}})  # not a name
    negative = table.clone()
    negative[row, C.EPOCHS_IN_STATE] = -1  # no seed is -1 epochs old
    spoiled.append({**state, "state_tensor": negative})
    embargoed = table.clone()  # nor embargoed for -1 epochs (at int32's minimum the tick wrapped)
    embargoed[row, C.EMBARGO_COUNTER] = -(2**31)
    spoiled.append({**state, "state_tensor": embargoed})
    return spoiled


# ----------------------------------------------------------------------------- the machine


class TableMachine(RuleBasedStateMachine):
    device = torch.device("cpu")
    snapshots = Bundle("snapshots")

    @initialize(
        n=st.sampled_from([3, 5, MAX_SEEDS, 1, 2]),
        embargo=st.integers(0, 3),
        telemetry=st.booleans(),
    )
    def make(self, n: int, embargo: int, telemetry: bool) -> None:
        self.recorder = _Recorder() if telemetry else None
        self.table = GPUStateTensor(
            n,
            self.device,
            embargo_epochs=embargo,
            telemetry=self.recorder,  # type: ignore[arg-type]
        )
        self.model = TableModel(n, embargo)
        self.heard: list[tuple[int, SeedStage, SeedStage]] = []
        self.listened = 0
        for idx in range(n):
            self.table.observe(idx, lambda i, old, new: self.heard.append((i, old, new)))
        # Plain functions (held strongly; a bound method of the machine would be held weakly
        # and deep-copied with a copied table).
        self.table.listen(lambda: setattr(self, "listened", self.listened + 1))

    # -- helpers ------------------------------------------------------------------------
    def _index(self, spec: tuple[int, int]) -> int:
        bucket, value = spec
        n = self.model.n
        if bucket < 8:
            return value % n
        return (-1, -2, n, n + 1, 2**31, 2**40, -(2**40))[value % 7]

    def _indices(self, entries: list[Any], base: int) -> list[int]:
        """A batch's indices: distinct rows (``base`` on) while the table has them, repeats
        of earlier indices (duplicates) and indices outside the table."""
        out: list[int] = []
        for pos, ((bucket, value), _, _) in enumerate(entries):
            if bucket < 7:
                out.append((base + pos) % self.model.n)
            elif bucket == 7 and out:
                out.append(out[value % len(out)])
            else:
                out.append(self._index((8 + bucket % 2, value)))
        return out

    def _resolve(self, idx: int, target: tuple[int, int, SeedStage]) -> SeedStage:
        kind, choice, anything = target
        if kind < 3 and 0 <= idx < self.model.n:
            legal = sorted(LEGAL_TRANSITIONS[self.model.stage(idx)])
            if legal:
                return legal[choice % len(legal)]
        return anything

    def _snapshot_table(self) -> tuple[Any, ...]:
        return (
            self.table.state_tensor.tolist(),
            self.table.stages(),
            [self.table.epochs_in_state(i) for i in range(self.model.n)],
            +self.table.counters,
            self.table.version,
            self.table.embargo_epochs,
            list(self.heard),
            self.listened,
            None if self.recorder is None else list(self.recorder.events),
        )

    # -- transitions --------------------------------------------------------------------
    @rule(
        idx=INDICES,
        goal=TARGETS,
        bad_stage=st.sampled_from([None] * 8 + [11, -1, "bogus"]),
        form=FORMS,
        epochs=st.sampled_from(
            [None, None, None, 0, 3, 50, INT32_MAX - 1, INT32_MAX, -1, INT32_MAX + 1]
        ),
        gate=st.sampled_from([None] * 6 + [1, 2, 3, 4, 5, "G2", " g4 ", 0, 6, "G9"]),
    )
    def single(
        self, idx: Any, goal: Any, bad_stage: Any, form: str, epochs: int | None, gate: Any
    ) -> None:
        idx = self._index(idx)
        expected: list[type[Exception]] = []
        if not 0 <= idx < self.model.n:
            expected.append(IndexError)
        if gate in (0, 6, "G9"):
            expected.append(ValueError)
        if epochs is not None and not 0 <= epochs <= INT32_MAX:  # the column is int32
            expected.append(ValueError)
        if bad_stage is not None:
            expected.append(ValueError)
            stage: Any = bad_stage
        else:
            stage = _spelled(self._resolve(idx, goal), form)
        if expected:
            before = self._snapshot_table()
            with pytest.raises(tuple(expected)):
                self.table.update_seed_state(idx, stage, epochs_in_state=epochs, last_gate=gate)
            assert self._snapshot_table() == before, "a refused call changed the table"
            return
        new = self._resolve(idx, goal)
        [code] = self.model.update([idx], [new], [_gate_value(gate)])
        if code == TransitionCode.APPLIED:
            self.table.update_seed_state(idx, stage, epochs_in_state=epochs, last_gate=gate)
            if epochs is not None:
                self.model.rows[idx][C.EPOCHS_IN_STATE] = epochs
        else:
            with pytest.raises(IllegalTransitionError):
                self.table.update_seed_state(idx, stage, epochs_in_state=epochs, last_gate=gate)

    @rule(
        entries=ENTRIES,
        base=st.integers(0, 63),
        gates=st.one_of(st.none(), st.lists(LIST_GATES, min_size=8)),
    )
    def batch(self, entries: list[Any], base: int, gates: list[Any] | None) -> None:
        indices = self._indices(entries, base)
        targets = [self._resolve(i, e[1]) for i, e in zip(indices, entries, strict=True)]
        forms = [form for _, _, form in entries]
        updates = [(i, _spelled(t, f)) for i, t, f in zip(indices, targets, forms, strict=True)]
        given = None if gates is None else gates[: len(entries)]
        values = [None] * len(entries) if given is None else [_gate_value(g) for g in given]
        expected = self.model.update(indices, targets, values)
        codes = self.table.batch_state_update(updates, given)
        assert all(type(c) is TransitionCode for c in codes)
        assert [int(c) for c in codes] == expected

    @rule(
        entries=ENTRIES,
        base=st.integers(0, 63),
        gates=st.one_of(st.none(), st.lists(TENSOR_GATES, min_size=8)),
        wide=st.booleans(),
    )
    def batch_tensors(
        self, entries: list[Any], base: int, gates: list[int] | None, wide: bool
    ) -> None:
        indices = self._indices(entries, base)
        if not wide:  # int32 tensors: only indices int32 holds
            indices = [max(min(i, INT32_MAX), -INT32_MAX) for i in indices]
        targets = [self._resolve(i, e[1]) for i, e in zip(indices, entries, strict=True)]
        given = None if gates is None else gates[: len(entries)]
        dtype = torch.int64 if wide else torch.int32
        gate_t = None
        if given is not None:
            gate_t = torch.tensor([max(g, -INT32_MAX) for g in given], dtype=torch.int64)
            gate_t = gate_t.to(dtype)
        values = [None] * len(entries) if given is None else [g if g > 0 else None for g in given]
        expected = self.model.update(indices, targets, values)
        codes = self.table.batch_state_update_tensors(
            torch.tensor(indices, dtype=dtype, device=self.device),
            torch.tensor([int(t) for t in targets], dtype=dtype, device=self.device),
            None if gate_t is None else gate_t.to(self.device),
        )
        assert codes.dtype == torch.int32 and codes.device == self.table.device
        assert codes.tolist() == expected

    @rule(
        entries=ENTRIES,
        base=st.integers(0, 63),
        position=st.integers(0, 10),
        bad=st.sampled_from(
            [
                ("stage", 11),
                ("stage", -1),
                ("stage", "bogus"),
                ("stage", True),
                ("stage", 1.0),
                ("gate", 0),
                ("gate", 6),
                ("gate", -1),
                ("gate", "G9"),
                ("gate", True),
                ("gates", "short"),
                ("pair", "triple"),
                ("pair", "single"),
                ("index", 1 << 70),
            ]
        ),
    )
    def malformed_batch(
        self, entries: list[Any], base: int, position: int, bad: tuple[str, Any]
    ) -> None:
        """A batch with one malformed item raises ValueError and changes nothing at all."""
        indices = self._indices(entries, base)
        updates: list[Any] = [
            (i, _spelled(self._resolve(i, e[1]), e[2]))
            for i, e in zip(indices, entries, strict=True)
        ]
        gates: list[Any] | None = None
        at = position % len(updates)
        kind, value = bad
        if kind == "stage":
            updates[at] = (updates[at][0], value)
        elif kind == "gate":
            gates = [None] * len(updates)
            gates[at] = value
        elif kind == "gates":
            gates = [None] * (len(updates) + 1)
        elif kind == "pair":
            updates[at] = (*updates[at], 3) if value == "triple" else (updates[at][0],)
        else:
            updates[at] = (value, updates[at][1])
        before = self._snapshot_table()
        with pytest.raises(ValueError):
            self.table.batch_state_update(updates, gates)
        assert self._snapshot_table() == before

    @rule(
        size=st.integers(1, 4),
        bad=st.sampled_from(
            [("stage", 11), ("stage", -1), ("gate", 0), ("gate", 6), ("gate", 2**40), "float"]
        ),
    )
    def malformed_tensor_batch(self, size: int, bad: Any) -> None:
        idx = torch.arange(size, dtype=torch.int64) % self.model.n
        new = torch.full((size,), int(S.ISOLATED_INIT), dtype=torch.int64)
        gates = None
        if bad == "float":
            new = new.float()
        elif bad[0] == "stage":
            new[-1] = bad[1]
        else:
            gates = torch.full((size,), -1, dtype=torch.int64)
            gates[0] = bad[1]
        before = self._snapshot_table()
        with pytest.raises(ValueError):
            self.table.batch_state_update_tensors(idx, new, gates)
        assert self._snapshot_table() == before

    @rule(
        choices=st.lists(st.integers(0, 10), min_size=MAX_SEEDS, max_size=MAX_SEEDS),
        tensors=st.booleans(),
    )
    def advance_every_seed(self, choices: list[int], tensors: bool) -> None:
        """One legal step for every seed that has one (a whole-table batch, in row order:
        the table's one-run fast path), so runs reach COOLDOWN, RECYCLING and round again."""
        rows = [i for i in range(self.model.n) if LEGAL_TRANSITIONS[self.model.stage(i)]]
        if not rows:
            return
        targets = []
        for i in rows:
            stage = self.model.stage(i)
            legal = sorted(LEGAL_TRANSITIONS[stage])
            main = choices[i] < 6 and stage in NEXT_STAGE  # mostly along the main path
            targets.append(NEXT_STAGE[stage] if main else legal[choices[i] % len(legal)])
        expected = self.model.update(rows, targets, [None] * len(rows))
        if tensors:
            codes = self.table.batch_state_update_tensors(
                torch.tensor(rows, device=self.device),
                torch.tensor([int(t) for t in targets], device=self.device),
            ).tolist()
        else:
            codes = [
                int(c) for c in self.table.batch_state_update(list(zip(rows, targets, strict=True)))
            ]
        assert codes == expected

    @rule(
        entries=ENTRIES,
        base=st.integers(0, 63),
        odd=st.lists(st.sampled_from([None] * 6 + [len(S), -1, 2**40]), min_size=8),
        gates=st.one_of(
            st.none(),
            st.lists(
                st.sampled_from([-1, -(2**40), 0, 1, 5, 7, INT32_MAX, INT32_MAX + 1, 2**40]),
                min_size=8,
            ),
        ),
    )
    def lifecycle_update_op(
        self, entries: list[Any], base: int, odd: list[Any], gates: list[int] | None
    ) -> None:
        """The op the table launches, on a copy of the table, with what only the op takes:
        unknown stages (ILLEGAL), any gate >= 0 and gates above int32 (OUT_OF_RANGE)."""
        indices = self._indices(entries, base)
        stages = [
            int(self._resolve(i, e[1])) if o is None else o
            for i, e, o in zip(indices, entries, odd, strict=False)
        ]
        given = None if gates is None else gates[: len(entries)]
        rows = [list(r) for r in self.model.rows]
        expected = op_update(rows, indices, stages, given)
        state = self.table.state_tensor.clone()
        codes = lifecycle_update(
            state,
            torch.tensor(indices, device=self.device),
            torch.tensor(stages, device=self.device),
            None if given is None else torch.tensor(given, device=self.device),
        )
        assert codes.dtype == torch.int32 and codes.tolist() == expected
        assert state.tolist() == rows

    @rule(times=st.integers(1, 3))
    def tick(self, times: int) -> None:
        for _ in range(times):
            self.table.tick()
            self.model.tick()

    # -- other columns ------------------------------------------------------------------
    @rule(idx=INDICES, region=st.integers(-(2**31), INT32_MAX))
    def region(self, idx: Any, region: int) -> None:
        idx = self._index(idx)
        if not 0 <= idx < self.model.n:
            before = self._snapshot_table()
            with pytest.raises(IndexError):
                self.table.set_region(idx, region)
            assert self._snapshot_table() == before
            return
        self.table.set_region(idx, region)
        self.model.rows[idx][C.REGION_ID] = region

    @rule(idx=st.integers(0, MAX_SEEDS - 1), alpha=st.one_of(st.floats(-2, 3), st.just(math.nan)))
    def alpha(self, idx: int, alpha: float) -> None:
        if idx >= self.model.n:
            return
        if math.isnan(alpha):
            before = self._snapshot_table()
            with pytest.raises(ValueError):
                self.table.set_alpha(idx, alpha)
            assert self._snapshot_table() == before
            return
        self.table.set_alpha(idx, alpha)
        self.model.rows[idx][C.ALPHA_BLEND] = int(round(min(max(alpha, 0.0), 1.0) * 1000))

    @rule(
        idx=INDICES,
        row=st.lists(st.integers(0, 20), min_size=NUM_STATE_COLUMNS, max_size=NUM_STATE_COLUMNS),
        stage=st.sampled_from([*range(len(S)), 11, -1]),
        length=st.sampled_from([NUM_STATE_COLUMNS, NUM_STATE_COLUMNS - 1]),
        age=st.sampled_from([None] * 6 + [INT32_MAX, -1, INT32_MAX + 1]),
        embargo=st.sampled_from([None] * 6 + [INT32_MAX, -1, -(2**31)]),
    )
    def restore_row(
        self, idx: Any, row: list[int], stage: int, length: int, age: int | None, embargo: Any
    ) -> None:
        idx = self._index(idx)
        values = list(row)
        values[C.LIFECYCLE_STAGE] = stage
        if age is not None:
            values[C.EPOCHS_IN_STATE] = age
        if embargo is not None:
            values[C.EMBARGO_COUNTER] = embargo
        values = values[:length]
        bad_age = not 0 <= values[C.EPOCHS_IN_STATE] <= INT32_MAX
        bad_age |= values[C.EMBARGO_COUNTER] < 0  # a count too
        if (
            not 0 <= idx < self.model.n
            or length != NUM_STATE_COLUMNS
            or not 0 <= stage < len(S)
            or bad_age
        ):
            before = self._snapshot_table()
            with pytest.raises((IndexError, ValueError)):
                self.table.restore_row(idx, values)
            assert self._snapshot_table() == before
            return
        self.table.restore_row(idx, values)
        self.model.rows[idx] = values
        self.model.version += 1

    @rule(
        write=st.booleans(),
        idx=st.integers(0, MAX_SEEDS - 1),
        stage=st.sampled_from(list(S)),
        epochs=st.integers(0, 9),
    )
    def resync(self, write: bool, idx: int, stage: SeedStage, epochs: int) -> None:
        """The documented escape hatch: write the device table directly, then ``resync``."""
        if write:
            idx %= self.model.n
            self.table.state_tensor[idx, C.LIFECYCLE_STAGE] = int(stage)
            self.table.state_tensor[idx, C.EPOCHS_IN_STATE] = epochs
            self.model.rows[idx][C.LIFECYCLE_STAGE] = int(stage)
            self.model.rows[idx][C.EPOCHS_IN_STATE] = epochs
        self.table.resync()
        self.model.version += 1

    # -- persistence --------------------------------------------------------------------
    @rule(target=snapshots)
    def save(self) -> tuple[dict[str, Any], dict[str, Any]]:
        state = self.table.state_dict()
        assert state["state_tensor"].dtype == torch.int32
        assert state["state_tensor"].tolist() == self.model.rows
        assert state["embargo_epochs"] == self.model.embargo
        assert +Counter(state["counters"]) == +self.model.counters
        return state, self.model.snapshot()

    @rule(
        saved=snapshots,
        embargo=st.one_of(st.none(), st.integers(0, 3)),
        counters=st.booleans(),
    )
    def load(self, saved: Any, embargo: int | None, counters: bool) -> None:
        state, snap = saved
        if len(snap["rows"]) != self.model.n:
            return  # a snapshot of another machine's table (bundles are per run)
        state = dict(state)
        if embargo is not None:
            state["embargo_epochs"] = embargo
        if not counters:
            del state["counters"]  # as kasmina.load passes it: the counters start afresh
        self.table.load_state_dict(state)
        self.model.rows = [list(r) for r in snap["rows"]]
        self.model.embargo = snap["embargo"] if embargo is None else embargo
        self.model.counters = Counter(snap["counters"]) if counters else Counter()
        self.model.version += 1

    @rule(row=st.integers(0, MAX_SEEDS - 1))
    def load_invalid(self, row: int) -> None:
        """Every kind of invalid state dict is refused and changes nothing (the docstring's
        promise: every value is read and checked before the first write)."""
        for bad in _invalid_state_dicts(self.table.state_dict(), row % self.model.n):
            before = self._snapshot_table()
            with pytest.raises((ValueError, KeyError, TypeError)):
                self.table.load_state_dict(bad)
            assert self._snapshot_table() == before

    @rule(embargo=st.integers(0, 3))
    def round_trip_into_a_fresh_table(self, embargo: int) -> None:
        fresh = GPUStateTensor(self.model.n, self.device, embargo_epochs=embargo)
        fresh.load_state_dict(self.table.state_dict())
        self._check(fresh, with_logs=False)
        assert fresh.version == 1
        clone = copy.deepcopy(self.table)  # as a deep copy of a model holding the table
        self._check(clone, with_logs=False)
        assert clone.telemetry is None and clone.version == self.table.version

    # -- invariants ---------------------------------------------------------------------
    def _check(self, table: GPUStateTensor, with_logs: bool = True) -> None:
        model = self.model
        assert table.state_tensor.tolist() == model.rows
        assert table.stages() == [S(r[C.LIFECYCLE_STAGE]) for r in model.rows]
        epochs = [table.epochs_in_state(i) for i in range(model.n)]
        assert epochs == [r[C.EPOCHS_IN_STATE] for r in model.rows]
        assert +table.counters == +model.counters
        assert table.illegal_transitions == model.counters["illegal"]
        assert table.embargo_epochs == model.embargo
        ready = [i for i, r in enumerate(model.rows) if r[C.READY_FLAG]]
        assert table.get_ready_seeds().tolist() == ready
        if with_logs:
            assert table.version == model.version
            assert self.listened == model.version  # one listener call per change
            assert self.heard == model.observed
            if self.recorder is not None:
                assert self.recorder.events == model.events

    @invariant()
    def table_matches_the_model(self) -> None:
        if hasattr(self, "table"):
            self._check(self.table)


def _machine(device: torch.device) -> type[TableMachine]:
    return type("TableMachineOn", (TableMachine,), {"device": device})


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_table_matches_the_model_on_the_cpu_backends(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auto`` on a CPU is the NumPy host path; ``reference`` the torch reference."""
    monkeypatch.setenv("KASMINA_BACKEND", backend)
    run_state_machine_as_test(_machine(torch.device("cpu")), settings=SETTINGS)


def test_table_matches_the_model_on_the_triton_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton kernels: on a GPU, else through the interpreter on a CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        device = torch.device("cpu")
        monkeypatch.setenv("KASMINA_BACKEND", "triton")
    else:
        pytest.skip("no GPU and no Triton interpreter")
    run_state_machine_as_test(_machine(device), settings=SETTINGS)


# ------------------------------------------------------------ edges the state machines found

FOCUSED = settings(max_examples=20, deadline=None, database=None, derandomize=True)


@FOCUSED
@given(
    epochs=st.integers(INT32_MAX + 1, 2**63 - 1),
    stage=st.sampled_from(sorted(LEGAL_TRANSITIONS[S.DORMANT])),
)
def test_update_seed_state_refuses_an_epoch_count_int32_cannot_hold(
    epochs: int, stage: SeedStage
) -> None:
    table = GPUStateTensor(2, "cpu")
    with pytest.raises(ValueError, match="epochs_in_state"):
        table.update_seed_state(0, stage, epochs_in_state=epochs)
    assert table.stages() == [S.DORMANT, S.DORMANT] and table.version == 0
    assert not table.counters and not table.state_tensor.any()


@FOCUSED
@given(value=st.one_of(st.text(), st.none(), st.lists(st.integers(), max_size=2)))
def test_load_state_dict_refuses_counters_that_are_not_counts(value: Any) -> None:
    table = GPUStateTensor(2, "cpu")
    try:
        table.load_state_dict({**table.state_dict(), "counters": {"applied": value}})
    except (ValueError, TypeError):  # refused: nothing changed
        assert not table.counters and table.version == 0
        return
    # Accepted: the table must still work, its device rows and host mirror in step.
    table.batch_state_update([(0, S.ISOLATED_INIT)])
    device = table.state_tensor[:, C.LIFECYCLE_STAGE].tolist()
    assert table.stages() == [S(s) for s in device] == [S.ISOLATED_INIT, S.DORMANT]


@FOCUSED
@given(below=st.integers(0, 2), ticks=st.integers(1, 4))
def test_tick_keeps_mirror_and_device_epochs_equal_at_the_int32_limit(
    below: int, ticks: int
) -> None:
    table = GPUStateTensor(1, "cpu")
    table.update_seed_state(0, S.ISOLATED_INIT, epochs_in_state=INT32_MAX - below)
    for _ in range(below + ticks):  # past the limit
        table.tick()
    device = int(table.state_tensor[0, C.EPOCHS_IN_STATE])
    assert table.epochs_in_state(0) == device == INT32_MAX  # saturated, not wrapped


def test_a_column_value_the_int32_table_cannot_hold_is_a_value_error_naming_it() -> None:
    """``set_region(0, 2**40)``, a gate score of 1e7 or a threshold of -3e6 (stored * 1000)
    raised torch's bare ``RuntimeError: value cannot be converted to type int without
    overflow``, naming nothing. Each is a ``ValueError`` naming the column or the range now,
    checked before the write (the table is unchanged); the edges of int32 are still taken."""
    table = GPUStateTensor(2, "cpu")
    before = table.state_tensor.clone()
    for value in (2**40, float("inf"), float("nan"), 2.7, "3"):  # 2.7 was truncated to 2
        with pytest.raises(ValueError, match="REGION_ID must be an int32 integer"):
            table.set_column(0, StateColumn.REGION_ID, value)  # type: ignore[arg-type]
    for score in (1e7, -3e6, 1e306, float("inf"), float("nan")):  # 1e306 * 1000: inf, inf
        with pytest.raises(ValueError, match=r"int32 \* 1000"):  # OverflowError, a bare one
            table.set_gate_score(1, score)
    assert torch.equal(table.state_tensor, before) and table.version == 0
    table.set_region(0, -(2**31))
    table.set_gate_score(1, INT32_MAX / 1000)
    assert table.read_row(0)["REGION_ID"] == -(2**31)
    assert table.read_row(1)["GATE_SCORE"] == INT32_MAX


WRONG_KINDS = {  # a call, what it raises, and the message
    "set_blueprint(0, 5)": (
        lambda table: table.set_blueprint(0, 5),
        TypeError,
        "artifact_id must be a str, got int",
    ),
    # Each raised from a comparison or round(), naming nothing ("'>' not supported between
    # instances of 'float' and 'NoneType'", "type Tensor doesn't define __round__ method").
    "set_alpha(0, None)": (
        lambda table: table.set_alpha(0, None),
        TypeError,
        r"alpha must be a real number \(a float\), got NoneType",
    ),
    "set_alpha(0, tensor)": (
        lambda table: table.set_alpha(0, torch.tensor(0.5)),
        TypeError,
        "alpha must be a real number .*, got Tensor",
    ),
    "set_gate_score(1, '0.5')": (
        lambda table: table.set_gate_score(1, "0.5"),
        TypeError,
        "gate score must be a real number .*, got str",
    ),
    "set_performance_gate(1, None)": (
        lambda table: table.set_performance_gate(1, None),
        TypeError,
        "performance gate must be a real number .*, got NoneType",
    ),
    "set_alpha(0, nan)": (
        lambda table: table.set_alpha(0, float("nan")),
        ValueError,
        r"alpha must be within .* \(int32 \* 1000\), got nan",
    ),
    "batch_state_update(None)": (  # "'NoneType' object is not iterable"
        lambda table: table.batch_state_update(None),
        TypeError,
        r"updates must be \(index, stage\) pairs, got NoneType",
    ),
    "load_state_dict(None)": (
        lambda table: table.load_state_dict(None),
        TypeError,
        "a state table's state is a mapping, got NoneType",
    ),
    "load_state_dict({})": (
        lambda table: table.load_state_dict({}),
        ValueError,
        r"state table \(state_tensor\) must be a tensor of shape \(2, ",
    ),
}


@pytest.mark.parametrize("call", list(WRONG_KINDS))
def test_a_blueprint_or_state_of_the_wrong_kind_is_refused_naming_it(call: str) -> None:
    """``set_blueprint(0, 5)`` (an id that is no str) raised AttributeError 'encode', and a
    state dict without its ``state_tensor`` a bare KeyError; each is refused by name, with
    nothing changed, and an id of "" still clears the column."""
    table = GPUStateTensor(2, "cpu")
    table.set_blueprint(1, "artifact-a")
    before, version = table.state_tensor.clone(), table.version
    run, error, match = WRONG_KINDS[call]
    with pytest.raises(error, match=match):
        run(table)
    assert torch.equal(table.state_tensor, before) and table.version == version
    table.set_blueprint(1, "")
    assert table.read_row(1)["BLUEPRINT_ID"] == 0
