"""GPUStateTensor.batch_state_update (and its tensor form) against a per-seed reference.

The reference is the update written out one request at a time, as the table used to run it:
codes, the whole device table, the host mirror, counters, and every notification in order
(rejection events, the listeners' one call per batch, then each applied transition's event and
observers). Malformed batches must raise before anything changes.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import (
    GATE_FOR_TRANSITION,
    LEGAL_TRANSITIONS,
    NUM_STATE_COLUMNS,
    SeedStage,
    StateColumn,
    TransitionCode,
    is_legal,
    parse_gate,
    parse_stage,
)

S = SeedStage
C = StateColumn
N = 48
EMBARGO = 2


def apply_to_row(
    row: list[int], old: SeedStage, new: SeedStage, gate: int | None, embargo: int
) -> None:
    """docs/design.md §3 on one applied transition's row: the stage, a zero age and ready flag,
    the gate given or the transition's own, and the embargo on entering COOLDOWN."""
    row[C.LIFECYCLE_STAGE] = int(new)
    row[C.EPOCHS_IN_STATE] = 0
    row[C.READY_FLAG] = 0
    if gate is not None:
        row[C.LAST_GATE] = gate
    elif (old, new) in GATE_FOR_TRANSITION:
        row[C.LAST_GATE] = GATE_FOR_TRANSITION[(old, new)]
    if new == S.COOLDOWN:
        row[C.EMBARGO_COUNTER] = embargo


class _Recorder:
    """A telemetry reporter stand-in that writes into the shared event log."""

    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.log = log

    def emit(self, name: str, value: float, labels: dict[str, str]) -> None:
        self.log.append(("emit", name, dict(labels)))


class Reference:
    """The batch update, one request at a time (the table's behaviour before vectorising)."""

    def __init__(self, n: int, embargo: int, observed: set[int], telemetry: bool) -> None:
        self.rows = [[0] * NUM_STATE_COLUMNS for _ in range(n)]
        self.stages = [S.DORMANT] * n
        self.epochs = [0] * n
        self.embargo = embargo
        self.counters: Counter[str] = Counter()
        self.observed = observed
        self.telemetry = telemetry
        self.log: list[tuple[Any, ...]] = []

    def update(self, updates: list[tuple[Any, Any]], gates: list[Any] | None) -> list[int]:
        indices = [int(i) for i, _ in updates]
        targets = [parse_stage(s) for _, s in updates]
        given = [None] * len(updates) if gates is None else [parse_gate(g) for g in gates]
        n = len(self.rows)
        named = Counter(i for i in indices if 0 <= i < n)
        codes: list[int] = []
        applied: list[tuple[int, SeedStage, SeedStage]] = []
        for idx, new, gate in zip(indices, targets, given, strict=True):
            if not 0 <= idx < n:
                code = TransitionCode.OUT_OF_RANGE
            elif named[idx] > 1:
                code = TransitionCode.DUPLICATE
            else:
                row = self.rows[idx]
                cur = row[C.LIFECYCLE_STAGE]
                legal = is_legal(cur, new) and not (
                    cur == S.COOLDOWN and new == S.RECYCLING and row[C.EMBARGO_COUNTER] != 0
                )
                code = TransitionCode.APPLIED if legal else TransitionCode.ILLEGAL
            codes.append(int(code))
            self.counters[code.name.lower()] += 1
            if code != TransitionCode.APPLIED:
                if self.telemetry:
                    source = self.stages[idx].name if 0 <= idx < n else "?"
                    labels = {"seed_index": str(idx), "from": source, "to": new.name}
                    labels["code"] = code.name
                    self.log.append(("emit", "lifecycle.transition_rejected", labels))
                continue
            old = self.stages[idx]
            apply_to_row(self.rows[idx], old, new, gate, self.embargo)
            self.stages[idx] = new
            self.epochs[idx] = 0
            applied.append((idx, old, new))
        if applied:
            self.log.append(("listen", list(self.stages)))
        for idx, old, new in applied:
            if self.telemetry:
                labels = {"seed_index": str(idx), "from": old.name, "to": new.name}
                self.log.append(("emit", "lifecycle.transition", labels))
            if idx in self.observed:
                self.log.append(("observe", idx, old, new))
        return codes

    def tick(self) -> None:
        for row in self.rows:
            row[C.EPOCHS_IN_STATE] += 1
            row[C.EMBARGO_COUNTER] = max(0, row[C.EMBARGO_COUNTER] - 1)
            stage = row[C.LIFECYCLE_STAGE]
            due = stage == S.RECYCLING or (stage == S.COOLDOWN and row[C.EMBARGO_COUNTER] == 0)
            row[C.READY_FLAG] = int(due)
        self.epochs = [e + 1 for e in self.epochs]


def _table(observed: set[int], telemetry: bool) -> tuple[GPUStateTensor, list[tuple[Any, ...]]]:
    log: list[tuple[Any, ...]] = []
    table = GPUStateTensor(N, "cpu", embargo_epochs=EMBARGO)
    if telemetry:
        table.telemetry = _Recorder(log)  # type: ignore[assignment]
    table.listen(lambda: log.append(("listen", table.stages())))
    for idx in sorted(observed):
        table.observe(idx, lambda i, old, new: log.append(("observe", i, old, new)))
    return table, log


def _random_batch(
    rng: random.Random, stages: list[SeedStage]
) -> tuple[list[tuple[Any, Any]], list[Any] | None]:
    """Mostly legal steps, plus illegal targets, out-of-range and duplicated indices, stages
    as members, ints and names, gates as None, ints and names."""
    k = rng.randint(1, 2 * N)
    updates: list[tuple[Any, Any]] = []
    for _ in range(k):
        roll = rng.random()
        if roll < 0.08:
            idx = rng.choice([-1, -5, N, N + 3, 1 << 40])
        elif roll < 0.15 and updates:
            idx = rng.choice(updates)[0]  # a duplicate (if it was in range)
        else:
            idx = rng.randrange(N)
        legal = sorted(LEGAL_TRANSITIONS[stages[idx]]) if 0 <= idx < N else []
        new = rng.choice(legal) if legal and rng.random() < 0.75 else rng.choice(list(S))
        form = rng.random()
        target: Any = new if form < 0.6 else int(new) if form < 0.8 else new.name.lower()
        updates.append((idx, target))
    if rng.random() < 0.5:
        return updates, None
    gates = [rng.choice([None, None, 1, 2, 3, 4, 5, "G2", "g5"]) for _ in updates]
    return updates, gates


def _assert_same(table: GPUStateTensor, ref: Reference) -> None:
    assert table.state_tensor.tolist() == ref.rows
    assert table.stages() == ref.stages
    assert [table.epochs_in_state(i) for i in range(N)] == ref.epochs
    assert +table.counters == +ref.counters


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("reporting", ["observers", "telemetry", "info_log", "silent"])
@pytest.mark.parametrize("form", ["lists", "tensors"])
def test_random_batches_match_the_per_seed_reference(
    seed: int, reporting: str, form: str, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(seed * 7919 + len(reporting))
    telemetry = reporting == "telemetry"
    observed = (
        set(rng.sample(range(N), N // 3)) if reporting in ("observers", "info_log") else set()
    )
    table, log = _table(observed, telemetry)
    ref = Reference(N, EMBARGO, observed, telemetry)
    level = logging.INFO if reporting == "info_log" else logging.WARNING
    caplog.set_level(level, logger="kasmina.seeds.table")
    for step in range(40):
        updates, gates = _random_batch(rng, ref.stages)
        expected = ref.update(updates, gates)
        if form == "lists":
            codes = table.batch_state_update(updates, gates)
            assert all(type(c) is TransitionCode for c in codes)
        else:
            idx = torch.tensor([max(min(int(i), 1 << 40), -(1 << 40)) for i, _ in updates])
            new = torch.tensor([int(parse_stage(s)) for _, s in updates], dtype=torch.int32)
            gate = None
            if gates is not None:
                values = [-1 if g is None else parse_gate(g) for g in gates]
                gate = torch.tensor(values, dtype=torch.int32)
            codes_t = table.batch_state_update_tensors(idx, new, gate)
            assert codes_t.dtype == torch.int32 and codes_t.device == table.device
            codes = codes_t.tolist()
        assert codes == expected, f"step {step}"
        assert log == ref.log, f"step {step}"
        _assert_same(table, ref)
        if step % 3 == 2:
            table.tick()
            ref.tick()
            _assert_same(table, ref)
    assert ref.counters["applied"] > 50 and ref.counters["duplicate"] > 5
    assert ref.counters["illegal"] > 5 and ref.counters["out_of_range"] > 5
    if reporting == "info_log":
        applied = [r for r in caplog.records if r.levelno == logging.INFO]
        assert len(applied) == ref.counters["applied"]
    rejected = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(rejected) == sum(ref.counters.values()) - ref.counters["applied"]


def test_listeners_see_the_new_stages_before_observers_run() -> None:
    """A slot's snapshot (a listener) is refreshed before any observer runs, once per batch."""
    table = GPUStateTensor(8, "cpu")
    seen: list[Any] = []
    table.listen(lambda: seen.append(("listen", table.stages())))
    table.observe(3, lambda i, old, new: seen.append(("observe", i, table.stages()[i])))
    table.batch_state_update([(i, S.ISOLATED_INIT) for i in range(8)])
    assert seen == [("listen", [S.ISOLATED_INIT] * 8), ("observe", 3, S.ISOLATED_INIT)]
    table.batch_state_update([(0, S.ACTIVE), (9, S.DORMANT)])  # nothing applied: no call
    assert len(seen) == 2


def _malformed() -> list[tuple[str, list[Any], list[Any] | None]]:
    ok = [(0, S.ISOLATED_INIT), (1, S.ISOLATED_INIT)]
    return [
        ("stage", [(0, S.ISOLATED_INIT), (1, 11)], None),
        ("stage", [(0, S.ISOLATED_INIT), (1, -1)], None),
        ("stage", [(0, S.ISOLATED_INIT), (1, "bogus")], None),
        ("stage", [(0, S.ISOLATED_INIT), (1, True)], None),
        ("stage", [(0, S.ISOLATED_INIT), (1, 1.0)], None),
        ("gate", ok, [None, 0]),
        ("gate", ok, [None, 6]),
        ("gate", ok, [None, -1]),
        ("gate", ok, [1, -1]),  # all ints: the bulk check's path, where -1 is "not given"
        ("gate", ok, [None, "G9"]),
        ("gate", ok, [None, True]),
        ("gates for", ok, [None]),
        ("pair", [(0, S.ISOLATED_INIT), (1, S.ISOLATED_INIT, 3)], None),
        ("pair", [(0, S.ISOLATED_INIT), (1,)], None),
        ("int64", [(0, S.ISOLATED_INIT), (1 << 70, S.ISOLATED_INIT)], None),
    ]


@pytest.mark.parametrize("message, updates, gates", _malformed())
def test_malformed_batches_raise_and_change_nothing(
    message: str, updates: list[Any], gates: list[Any] | None
) -> None:
    log: list[tuple[Any, ...]] = []
    table = GPUStateTensor(4, "cpu", telemetry=_Recorder(log))  # type: ignore[arg-type]
    table.listen(lambda: log.append(("listen",)))
    table.observe(0, lambda *args: log.append(("observe", *args)))
    table.batch_state_update([(2, S.ISOLATED_INIT)])
    log.clear()
    before = (table.state_tensor.clone(), table.stages(), dict(table.counters), table.version)
    with pytest.raises(ValueError, match=message):
        table.batch_state_update(updates, gates)
    assert torch.equal(table.state_tensor, before[0])
    assert (table.stages(), dict(table.counters), table.version) == before[1:]
    assert log == []


@pytest.mark.parametrize(
    "message, kwargs",
    [
        ("stage", {"new_stage": torch.tensor([1, 11])}),
        ("stage", {"new_stage": torch.tensor([-1, 1])}),
        ("gate", {"gates": torch.tensor([1, 0])}),
        ("gate", {"gates": torch.tensor([6, -1])}),
        ("int32 or int64", {"new_stage": torch.tensor([1.0, 1.0])}),
        ("1-d", {"gates": torch.tensor([1, 2, 3])}),
        ("1-d", {"new_stage": torch.tensor([[1, 1]])}),
    ],
)
def test_malformed_tensor_batches_raise_and_change_nothing(message: str, kwargs: dict) -> None:
    table = GPUStateTensor(4, "cpu")
    before = (table.state_tensor.clone(), table.stages(), table.version)
    args = {"seed_idx": torch.tensor([0, 1]), "new_stage": torch.tensor([1, 1]), **kwargs}
    with pytest.raises(ValueError, match=message):
        table.batch_state_update_tensors(**args)
    assert torch.equal(table.state_tensor, before[0])
    assert (table.stages(), table.version) == before[1:] and not table.counters


def test_tensor_form_takes_views_and_int32() -> None:
    table = GPUStateTensor(8, "cpu")
    idx = torch.arange(16, dtype=torch.int32)[1::2][:4]  # 1, 3, 5, 7 as a strided view
    new = torch.ones(1, dtype=torch.int64).expand(4)
    codes = table.batch_state_update_tensors(idx, new, torch.tensor([3, -1, 3, -1])[::1])
    assert codes.tolist() == [0, 0, 0, 0]
    assert table.stages() == [S.DORMANT, S.ISOLATED_INIT] * 4
    assert table.state_tensor[[1, 3, 5, 7], C.LAST_GATE].tolist() == [3, 1, 3, 1]
    assert table.batch_state_update_tensors(idx[:0], new[:0]).shape == (0,)


def test_indices_are_integers_as_the_op_takes_them() -> None:
    """An index is an integer of any kind (a numpy or 0-d tensor integer too). A float or a
    bool is refused, as ``lifecycle_update`` refuses it: through ``int()`` 1.9 and ``True``
    named row 1, and ``update_seed_state(2.7)`` moved row 2."""
    table = GPUStateTensor(4, "cpu")
    codes = table.batch_state_update(
        [(torch.tensor(0), S.ISOLATED_INIT), (np.int64(1), 1), (2, "isolated_init")]
    )
    assert codes == [TransitionCode.APPLIED] * 3
    before = (table.state_tensor.clone(), table.stages(), table.version)
    for index in (1.9, 1.0, True, np.bool_(True), "1", torch.tensor(1.0)):
        with pytest.raises(ValueError, match="seed indices must be ints"):
            table.batch_state_update([(0, S.DORMANT), (index, S.DORMANT)])
        with pytest.raises(TypeError, match="is not an int"):
            table.update_seed_state(index, S.DORMANT)
        with pytest.raises(TypeError, match="is not an int"):
            table.stage(index)
    assert torch.equal(table.state_tensor, before[0])
    assert (table.stages(), table.version) == before[1:]


def test_updates_may_be_any_iterable_of_pairs() -> None:
    table = GPUStateTensor(3, "cpu")
    codes = table.batch_state_update(((i, S.ISOLATED_INIT) for i in range(3)), gates=[2, None, 5])
    assert codes == [TransitionCode.APPLIED] * 3
    assert table.state_tensor[:, C.LAST_GATE].tolist() == [2, 1, 5]


@pytest.mark.parametrize(
    "order",
    [
        lambda a, b: list(range(a, b)),  # ascending run: slice assignment of the mirror
        lambda a, b: list(range(b - 1, a - 1, -1)),  # descending: seed by seed
        lambda a, b: [a, *range(a + 2, b), a + 1] if b - a > 2 else list(range(a, b)),
    ],
    ids=["ascending", "descending", "shuffled-ends"],
)
def test_runs_of_consecutive_seeds_match_the_reference(order: Any) -> None:
    observed = {0, 5, N - 1}
    table, log = _table(observed, telemetry=False)
    ref = Reference(N, EMBARGO, observed, telemetry=False)
    rng = random.Random(17)
    for _ in range(30):
        a = rng.randrange(N)
        b = rng.randint(a + 1, N)
        target = rng.choice(sorted(LEGAL_TRANSITIONS[ref.stages[a]]) or list(S))
        updates = [(i, target) for i in order(a, b)]
        assert table.batch_state_update(updates) == ref.update(updates, None)
        assert log == ref.log
        _assert_same(table, ref)
        table.tick()
        ref.tick()
    assert ref.counters["applied"] > 30


def test_an_observer_that_raises_is_logged_and_the_others_still_run(caplog) -> None:
    """A change the table made is announced to every observer and listener: one that raises is
    logged, and neither stops the others nor undoes the batch."""
    table = GPUStateTensor(3, "cpu")
    heard: list[tuple[int, SeedStage]] = []

    def raises(idx: int, old: SeedStage, new: SeedStage) -> None:
        raise RuntimeError("a user observer's bug")

    def hears(idx: int, old: SeedStage, new: SeedStage) -> None:
        heard.append((idx, new))

    listened: list[int] = []

    def listen() -> None:
        listened.append(table.version)

    table.observe(0, raises)
    for idx in range(3):
        table.observe(idx, hears)
    table.listen(listen)
    with caplog.at_level(logging.ERROR, logger="kasmina.seeds.table"):
        table.batch_state_update([(idx, SeedStage.ISOLATED_INIT) for idx in range(3)])
    assert table.stages() == [SeedStage.ISOLATED_INIT] * 3
    assert heard == [(idx, SeedStage.ISOLATED_INIT) for idx in range(3)]
    assert listened and "a state-table observer raised" in caplog.text


@pytest.mark.parametrize("embargo", ["five", -3, 1.5, True, 2**31])
def test_load_state_dict_checks_every_value_before_writing(embargo: Any) -> None:
    source = GPUStateTensor(2, "cpu")
    source.batch_state_update([(0, SeedStage.ISOLATED_INIT)])
    target = GPUStateTensor(2, "cpu")
    before, version = target.state_tensor.clone(), target.version
    with pytest.raises(ValueError, match="embargo_epochs"):
        target.load_state_dict({**source.state_dict(), "embargo_epochs": embargo})
    assert torch.equal(target.state_tensor, before) and target.version == version
    assert target.stages() == [SeedStage.DORMANT] * 2


def test_a_saved_count_of_zero_loads_and_a_negative_one_is_refused() -> None:
    """Counters are counts >= 0: a zero one (a ``Counter`` after ``subtract``, a state saved by
    hand) loads as it is; only a negative one is refused, and then nothing changes."""
    table = GPUStateTensor(2, "cpu")
    table.load_state_dict({**table.state_dict(), "counters": {"applied": 0, "illegal": 2}})
    assert dict(table.counters) == {"applied": 0, "illegal": 2}
    assert table.illegal_transitions == 2
    with pytest.raises(ValueError, match="counters"):
        table.load_state_dict({**table.state_dict(), "counters": {"illegal": -1}})
    assert dict(table.counters) == {"applied": 0, "illegal": 2}


@pytest.mark.parametrize("embargo", [-1, 2**31, 10**12, "3", 2.0])
def test_an_embargo_the_int32_counter_cannot_hold_is_refused_at_construction(embargo: int) -> None:
    """EMBARGO_COUNTER is an int32 column, written when a seed enters COOLDOWN: an embargo past
    it would fail only then, so the table refuses it when it is made (as ``kasmina.load`` does
    a saved one)."""
    with pytest.raises(ValueError, match=r"is not an int in \[0, 2147483647\]"):
        GPUStateTensor(2, "cpu", embargo_epochs=embargo)


def test_the_largest_embargo_is_written_to_the_counter_at_cooldown() -> None:
    table = GPUStateTensor(1, "cpu", embargo_epochs=2**31 - 1)
    for stage in (SeedStage.ISOLATED_INIT, SeedStage.HARVESTING, SeedStage.COOLDOWN):
        table.batch_state_update([(0, stage)])
    assert table.stages() == [SeedStage.COOLDOWN]
    assert int(table.state_tensor[0, StateColumn.EMBARGO_COUNTER]) == 2**31 - 1


def test_a_batch_that_does_not_count_up_keeps_the_mirror_on_the_right_seeds() -> None:
    """K requests whose indices run ``first .. first + K - 1`` but not in order (0, 2, 1, 3)
    all apply: the host mirror must follow each index, not assume the batch counts up (a
    mirror that did put seed 1's stage on seed 2 and back)."""
    table = GPUStateTensor(4, "cpu")
    table.update_seed_state(1, SeedStage.ISOLATED_INIT)
    S = SeedStage
    updates = [(0, S.ISOLATED_INIT), (2, S.ISOLATED_INIT), (1, S.COMPATIBILITY_CHECK)]
    codes = table.batch_state_update([*updates, (3, S.ISOLATED_INIT)])
    assert all(code == 0 for code in codes)
    want = [S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.ISOLATED_INIT, S.ISOLATED_INIT]
    assert table.stages() == want
    device = table.state_tensor[:, StateColumn.LIFECYCLE_STAGE].tolist()
    assert device == [int(s) for s in want]


def test_listeners_hear_only_of_the_rows_they_follow() -> None:
    """A slot's plan follows its own seeds: one seed's change re-plans one slot, and restoring
    every seed (a rollback, a load) re-plans each slot once per seed of its own, not once per
    seed of the model (which made a rollback of 1,024 seeds take seconds)."""
    table = GPUStateTensor(12)
    heard: Counter[str] = Counter()

    class Plan:
        def __init__(self, name: str) -> None:
            self.name = name

        def refresh(self) -> None:
            heard[self.name] += 1

    plans = [Plan(f"slot{k}") for k in range(4)]  # rows 3k .. 3k+2
    everything = Plan("all")
    for k, plan in enumerate(plans):
        table.listen(plan.refresh, rows=range(3 * k, 3 * k + 3))
    table.listen(everything.refresh)
    table.update_seed_state(4, SeedStage.ISOLATED_INIT)
    assert heard == {"slot1": 1, "all": 1}
    table.batch_state_update([(0, SeedStage.ISOLATED_INIT), (10, SeedStage.ISOLATED_INIT)])
    assert heard == {"slot0": 1, "slot1": 1, "slot3": 1, "all": 2}
    heard.clear()
    rows = [table.state_tensor[i].tolist() for i in range(12)]
    for i, row in enumerate(rows):
        table.restore_row(i, row)
    assert heard == {"slot0": 3, "slot1": 3, "slot2": 3, "slot3": 3, "all": 12}
    heard.clear()
    table.touch(7)
    table.resync()
    assert heard == {"slot0": 1, "slot1": 1, "slot2": 2, "slot3": 1, "all": 2}
    with pytest.raises(IndexError):
        table.listen(everything.refresh, rows=[12])
