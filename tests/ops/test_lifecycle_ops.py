"""lifecycle_update / lifecycle_tick against a pure-Python oracle of ``kasmina.stages``.

Every backend runs every test: the Triton kernels through the interpreter, the torch reference,
and the NumPy host path that the ``auto`` backend picks for CPU tensors.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from kasmina.ops import (
    lifecycle_tick,
    lifecycle_tick_reference,
    lifecycle_update,
    lifecycle_update_reference,
)
from kasmina.stages import (
    GATE_FOR_TRANSITION,
    NUM_STAGES,
    NUM_STATE_COLUMNS,
    SeedStage,
    StateColumn,
    TransitionCode,
    is_legal,
)
from tests.profiling import DispatchedOps

C = StateColumn


@pytest.fixture
def host_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default on a CPU: the update on NumPy views of the tensors."""
    monkeypatch.setenv("KASMINA_BACKEND", "auto")


@pytest.fixture(params=["triton_backend", "reference_backend", "host_backend"])
def backend(request: pytest.FixtureRequest) -> str:
    request.getfixturevalue(request.param)
    return request.param


@pytest.fixture
def poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fresh int32 buffer starts as garbage, so an unwritten code cannot pass."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.dtype == torch.int32:
            out.fill_(-777)
        return out

    monkeypatch.setattr(torch, "empty", empty)


def oracle_update(
    rows: list[list[int]], updates: list[tuple[int, int, int | None]]
) -> tuple[list[int], list[list[int]]]:
    """The transition rules written out from ``kasmina.stages``, one request at a time."""
    rows = [list(r) for r in rows]
    n = len(rows)
    in_range = [0 <= i < n for i, _, _ in updates]
    named = Counter(i for (i, _, _), ok in zip(updates, in_range, strict=True) if ok)
    codes = []
    for (i, new, gate), ok in zip(updates, in_range, strict=True):
        if not ok:
            codes.append(TransitionCode.OUT_OF_RANGE)
            continue
        if named[i] > 1:
            codes.append(TransitionCode.DUPLICATE)
            continue
        cur = rows[i][C.LIFECYCLE_STAGE]
        legal = is_legal(cur, new)
        if cur == SeedStage.COOLDOWN and new == SeedStage.RECYCLING:
            legal = legal and rows[i][C.EMBARGO_COUNTER] == 0
        if not legal:
            codes.append(TransitionCode.ILLEGAL)
            continue
        codes.append(TransitionCode.APPLIED)
        rows[i][C.LIFECYCLE_STAGE] = new
        rows[i][C.EPOCHS_IN_STATE] = 0
        rows[i][C.READY_FLAG] = 0
        if gate is not None and gate >= 0:
            rows[i][C.LAST_GATE] = gate
        elif (cur, new) in GATE_FOR_TRANSITION:
            rows[i][C.LAST_GATE] = GATE_FOR_TRANSITION[(SeedStage(cur), SeedStage(new))]
    return [int(c) for c in codes], rows


def oracle_tick(rows: list[list[int]]) -> list[list[int]]:
    out = []
    for r in rows:
        r = list(r)
        r[C.EPOCHS_IN_STATE] = min(r[C.EPOCHS_IN_STATE] + 1, 2**31 - 1)
        r[C.EMBARGO_COUNTER] = max(0, r[C.EMBARGO_COUNTER] - 1)
        due = (r[C.LIFECYCLE_STAGE] == SeedStage.COOLDOWN and r[C.EMBARGO_COUNTER] == 0) or r[
            C.LIFECYCLE_STAGE
        ] == SeedStage.RECYCLING
        r[C.READY_FLAG] = int(due)
        out.append(r)
    return out


def random_state(n: int, seed: int, stages: list[int] | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    state = torch.randint(0, 1000, (n, NUM_STATE_COLUMNS), generator=g, dtype=torch.int32)
    state[:, C.LIFECYCLE_STAGE] = torch.randint(0, NUM_STAGES, (n,), generator=g)
    state[:, C.EMBARGO_COUNTER] = torch.randint(0, 3, (n,), generator=g)
    state[:, C.READY_FLAG] = torch.randint(0, 2, (n,), generator=g)
    if stages is not None:
        state[:, C.LIFECYCLE_STAGE] = torch.tensor(stages, dtype=torch.int32)
    return state


def check_update(state: torch.Tensor, updates: list[tuple[int, int, int | None]]) -> torch.Tensor:
    """Run the op on ``state`` and compare codes and the whole table with the oracle."""
    expected_codes, expected_rows = oracle_update(state.tolist(), updates)
    idx = torch.tensor([u[0] for u in updates], dtype=torch.int64)
    new = torch.tensor([u[1] for u in updates], dtype=torch.int32)
    gates = None
    if any(u[2] is not None for u in updates):
        gates = torch.tensor([-1 if u[2] is None else u[2] for u in updates], dtype=torch.int32)
    codes = lifecycle_update(state, idx, new, gates)
    assert codes.dtype == torch.int32 and codes.shape == (len(updates),)
    assert codes.tolist() == expected_codes
    assert state.tolist() == expected_rows
    return codes


@pytest.mark.parametrize("embargo", [0, 2])
def test_all_121_stage_pairs(backend: str, poisoned_empty: None, embargo: int) -> None:
    pairs = [(src, dst) for src in range(NUM_STAGES) for dst in range(NUM_STAGES)]
    state = random_state(len(pairs), seed=embargo, stages=[src for src, _ in pairs])
    state[:, C.EMBARGO_COUNTER] = embargo
    codes = check_update(state, [(i, dst, None) for i, (_, dst) in enumerate(pairs)])
    applied = {pairs[i] for i, c in enumerate(codes.tolist()) if c == TransitionCode.APPLIED}
    legal = {(s, d) for s, d in pairs if is_legal(s, d)}
    cooldown_recycling = (SeedStage.COOLDOWN, SeedStage.RECYCLING)
    assert applied == (legal if embargo == 0 else legal - {cooldown_recycling})
    assert len(legal) == 20  # the docs/design.md §3 table lists 20 legal transitions


def test_explicit_gates_and_fallback(backend: str) -> None:
    state = random_state(6, seed=3, stages=[0, 1, 2, 7, 9, 3])
    updates = [(0, 1, 4), (1, 2, -1), (2, 3, None), (3, 6, 0), (4, 10, None), (5, 4, 2)]
    check_update(state, updates)
    assert state[0, C.LAST_GATE] == 4  # given gate wins over G1
    assert state[1, C.LAST_GATE] == 2  # negative entry: the transition's own gate (G2)
    assert state[2, C.LAST_GATE] == 3


def test_a_gate_beyond_int32_is_out_of_range_on_every_backend(backend: str) -> None:
    """``LAST_GATE`` is int32: an int64 gate >= 2**31 would wrap (2**31 + 5 to a negative, "not
    given", gate), so its lane is ``OUT_OF_RANGE`` and its row left alone, decided per lane with
    no host read; a valid lane of the same call is applied. Its index still counts for
    duplicates. int32's top still fits, and any negative int64 entry, however wide, means "not
    given"."""
    oor, applied = int(TransitionCode.OUT_OF_RANGE), int(TransitionCode.APPLIED)
    for bad in (2**31, 2**31 + 5, 2**62):
        for as_tensor in (True, False):
            state = random_state(3, seed=4, stages=[0, 0, 0])
            before = state.clone()
            idx, new, gate = [0, 1, 2, 2], [1, 1, 1, 1], [bad, 3, bad, 4]
            if as_tensor:
                idx, new, gate = torch.tensor(idx), torch.tensor(new), torch.tensor(gate)
            codes = lifecycle_update(state, idx, new, gate)
            dup = int(TransitionCode.DUPLICATE)
            assert codes.tolist() == [oor, applied, oor, dup], (bad, as_tensor)
            assert torch.equal(state[0], before[0]) and torch.equal(state[2], before[2])
            assert state[1, C.LIFECYCLE_STAGE] == 1 and state[1, C.LAST_GATE] == 3
    state = random_state(2, seed=4, stages=[0, 0])
    gate = torch.tensor([2**31 - 1, -(2**40)], dtype=torch.int64)
    codes = lifecycle_update(state, torch.tensor([0, 1]), torch.tensor([1, 1]), gate)
    assert codes.tolist() == [applied] * 2
    g1 = GATE_FOR_TRANSITION[(SeedStage(0), SeedStage(1))]
    assert state[:, C.LAST_GATE].tolist() == [2**31 - 1, int(g1)]


def test_gate_column_unchanged_without_a_gate(backend: str) -> None:
    state = random_state(2, seed=4, stages=[7, 9])
    before = state[:, C.LAST_GATE].clone()
    check_update(state, [(0, 6, None), (1, 10, None)])  # HARVESTING->COOLDOWN, QUAR->TERM
    assert torch.equal(state[:, C.LAST_GATE], before)


def test_duplicates_and_out_of_range(backend: str, poisoned_empty: None) -> None:
    n = 8
    state = random_state(n, seed=5, stages=[0] * n)
    updates = [
        (0, 1, None),  # applied
        (1, 1, None),  # duplicated with the next, both rejected, neither applied
        (1, 10, None),
        (2, 5, None),  # illegal DORMANT -> ACTIVE
        (2 + n, 1, None),  # out of range (>= N) ...
        (2 + n, 1, None),  # ... even though duplicated: 2 beats 3
        (-1, 1, None),  # negative
        (3, 7, None),  # illegal but duplicated: 3 beats 1
        (3, 7, None),
        (n, 1, None),
    ]
    codes = check_update(state, updates)
    assert codes.tolist() == [0, 3, 3, 1, 2, 2, 2, 3, 3, 2]
    assert state[1, C.LIFECYCLE_STAGE] == 0


def test_random_batches_across_programs(
    backend: str, poisoned_empty: None, launched: list[str]
) -> None:
    # K > one program's block, indices and stages partly out of range, random gates.
    g = torch.Generator().manual_seed(6)
    n, k = 200, 300
    state = random_state(n, seed=6)
    idx = torch.randint(-5, n + 5, (k,), generator=g).tolist()
    new = torch.randint(-2, NUM_STAGES + 2, (k,), generator=g).tolist()
    gates = torch.randint(-1, 6, (k,), generator=g).tolist()
    check_update(state, list(zip(idx, new, gates, strict=True)))
    # The kernel ran on the Triton backend; the reference and the host path launch nothing.
    assert launched == (["_update_kernel"] if backend == "triton_backend" else [])


def test_cooldown_embargo_then_tick(backend: str) -> None:
    state = random_state(3, seed=7, stages=[6, 8, 0])
    state[:, C.EMBARGO_COUNTER] = torch.tensor([2, 0, 0], dtype=torch.int32)
    assert lifecycle_update(state, [0], [SeedStage.RECYCLING]).tolist() == [1]
    for expected_ready in ([0, 1, 0], [1, 1, 0]):
        expected = oracle_tick(state.tolist())
        lifecycle_tick(state)
        assert state.tolist() == expected
        assert state[:, C.READY_FLAG].tolist() == expected_ready
    assert state[0, C.EMBARGO_COUNTER] == 0
    codes = lifecycle_update(state, [0, 1], [SeedStage.RECYCLING, SeedStage.DORMANT])
    assert codes.tolist() == [0, 0]
    assert state[:2, C.READY_FLAG].tolist() == [0, 0] and state[:2, C.EPOCHS_IN_STATE].eq(0).all()


def test_tick_matches_oracle_on_random_table(backend: str, launched: list[str]) -> None:
    state = random_state(600, seed=8)  # several programs, a partial last block
    state[:5, C.LIFECYCLE_STAGE] = torch.tensor([-1, 11, 99, 6, 8], dtype=torch.int32)
    # Ages at int32's limit saturate there instead of wrapping negative.
    state[5:8, C.EPOCHS_IN_STATE] = torch.tensor([2**31 - 3, 2**31 - 2, 2**31 - 1])
    # An embargo below 0 (a hand-built or damaged table) counts to 0 like one above it; at
    # int32's minimum the old ``max(e - 1, 0)`` wrapped to 2**31 - 1, a seed stuck in COOLDOWN.
    state[8:12, C.LIFECYCLE_STAGE] = SeedStage.COOLDOWN
    state[8:12, C.EMBARGO_COUNTER] = torch.tensor([-(2**31), -(2**31) + 1, -5, 2**31 - 1])
    for _ in range(3):
        expected = oracle_tick(state.tolist())
        lifecycle_tick(state)
        assert state.tolist() == expected
    assert launched == (["_tick_kernel"] * 3 if backend == "triton_backend" else [])


def test_corrupt_stage_in_table_is_illegal(backend: str) -> None:
    state = random_state(2, seed=9, stages=[11, -3])
    check_update(state, [(0, 1, None), (1, 0, None)])


def test_empty_batch_and_empty_table(backend: str) -> None:
    state = random_state(4, seed=10)
    before = state.clone()
    codes = lifecycle_update(
        state, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    )
    assert codes.shape == (0,) and codes.dtype == torch.int32 and torch.equal(state, before)
    empty = torch.zeros(0, NUM_STATE_COLUMNS, dtype=torch.int32)
    assert lifecycle_update(empty, [0, -1], [1, 1]).tolist() == [2, 2]
    lifecycle_tick(empty)


def test_reference_functions_directly() -> None:
    state = random_state(3, seed=11, stages=[0, 0, 0])
    codes = lifecycle_update_reference(state, torch.tensor([0, 5]), torch.tensor([1, 1]))
    assert codes.tolist() == [0, 2] and state[0, C.LIFECYCLE_STAGE] == 1
    lifecycle_tick_reference(state)
    assert state[:, C.EPOCHS_IN_STATE].tolist()[0] == 1


def _bad_calls() -> list[tuple[str, dict]]:
    ok = {"seed_idx": torch.tensor([0]), "new_stage": torch.tensor([1])}
    idx, new = ok["seed_idx"], ok["new_stage"]
    state = torch.zeros(2, NUM_STATE_COLUMNS, dtype=torch.int32)
    return [
        ("int32", {"state": state.long(), **ok}),
        ("shape", {"state": torch.zeros(2, 9, dtype=torch.int32), **ok}),
        ("shape", {"state": torch.zeros(20, dtype=torch.int32), **ok}),
        ("contiguous", {"state": torch.zeros(10, 2, dtype=torch.int32).t(), **ok}),
        (
            "int32 or int64",
            {"state": state, "seed_idx": torch.tensor([0.0]), "new_stage": new},
        ),
        (
            "int32 or int64",
            {"state": state, "seed_idx": idx, "new_stage": torch.tensor([1.0])},
        ),
        ("shape", {"state": state, "seed_idx": torch.tensor([0, 1]), "new_stage": new}),
        ("1-d", {"state": state, "seed_idx": torch.tensor([[0]]), "new_stage": new}),
        ("gate", {"state": state, **ok, "gate": torch.tensor([1, 2])}),
        ("expected cpu", {"state": state, **ok, "gate": torch.tensor([1], device="meta")}),
        ("sequence of ints", {"state": state, "seed_idx": ["a"], "new_stage": [1]}),
        # Sequences hold ints: a float is not truncated, a bool is not an index.
        ("sequence of ints", {"state": state, "seed_idx": [1.9], "new_stage": [1]}),
        ("sequence of ints", {"state": state, "seed_idx": [0], "new_stage": [1.2]}),
        ("sequence of ints", {"state": state, "seed_idx": [True], "new_stage": [1]}),
        ("sequence of ints", {"state": state, "seed_idx": [0], "new_stage": [True]}),
        ("sequence of ints", {"state": state, **ok, "gate": [1.0]}),
        ("sequence of ints", {"state": state, **ok, "gate": [False]}),
    ]


@pytest.mark.parametrize("message, kwargs", _bad_calls())
def test_bad_inputs_raise_and_leave_state_alone(backend: str, message: str, kwargs: dict) -> None:
    before = kwargs["state"].clone()
    with pytest.raises(ValueError, match=message):
        lifecycle_update(**kwargs)
    assert torch.equal(kwargs["state"], before)


@pytest.mark.parametrize("state", [torch.zeros(3, 10), torch.zeros(3, 11, dtype=torch.int32)])
def test_tick_rejects_bad_state(backend: str, state: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="state"):
        lifecycle_tick(state)


@pytest.mark.parametrize("state", [[[0] * NUM_STATE_COLUMNS], None, np.zeros((1, 10), np.int32)])
def test_a_state_that_is_not_a_tensor_is_the_same_value_error_for_both_ops(
    backend: str, state: object
) -> None:
    # README: a wrong dtype, device or shape given to the lifecycle ops raises ValueError.
    with pytest.raises(ValueError, match="state must be a torch.Tensor"):
        lifecycle_tick(state)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="state must be a torch.Tensor"):
        lifecycle_update(state, [0], [1])  # type: ignore[arg-type]


def test_missing_indices_or_stages_are_a_value_error(backend: str) -> None:
    """A bare ``assert`` stood here: an empty AssertionError, and nothing at all under -O."""
    state = torch.zeros(2, NUM_STATE_COLUMNS, dtype=torch.int32)
    for idx, stages in ((None, [1]), ([0], None)):
        with pytest.raises(ValueError, match="seed_idx and new_stage are required"):
            lifecycle_update(state, idx, stages)  # type: ignore[arg-type]
    assert not state.any()


def test_a_state_made_in_inference_mode_is_refused_outside_it(backend: str) -> None:
    """torch forbids in-place updates of an inference tensor outside inference mode; the NumPy
    and Triton paths write through pointers, so every backend refuses it up front, alike."""
    with torch.inference_mode():
        state = torch.zeros(3, NUM_STATE_COLUMNS, dtype=torch.int32)
    with pytest.raises(ValueError, match="inference_mode"):
        lifecycle_update(state, [0], [1])
    with pytest.raises(ValueError, match="inference_mode"):
        lifecycle_tick(state)
    assert not state.any()
    with torch.inference_mode():  # inside it the update is legal
        assert lifecycle_update(state, [0], [1]).tolist() == [TransitionCode.APPLIED]
        lifecycle_tick(state)
    assert state[0, C.LIFECYCLE_STAGE] == 1 and state[0, C.EPOCHS_IN_STATE] == 1


# --------------------------------------------------------------------------- index views
# The kernel reads lane i of every index vector at ``ptr + i``; the launcher must hand it dense
# copies of views. Each case runs the op on a view and compares with the oracle (which reads
# the view's values), codes poisoned first.


def _views(k: int, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Fresh random values behind several layouts: strides 2 and 3, a storage offset."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randint(-2, 20, (3 * k + 1,), generator=g, dtype=dtype)
    return {
        "step-2": wide[1 : 2 * k + 1 : 2],
        "step-3": wide[::3][:k],
        "offset": wide[k + 1 : 2 * k + 1],
        "column": wide[: 2 * k].view(k, 2)[:, 1],
    }


@pytest.mark.parametrize("layout", ["step-2", "step-3", "offset", "column"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_strided_index_views(
    backend: str, poisoned_empty: None, layout: str, index_dtype: torch.dtype
) -> None:
    n, k = 17, 13  # odd sizes: a partial program, partly out of range, duplicates
    state = random_state(n, seed=21)
    idx = _views(k, 22, index_dtype)[layout]
    g = torch.Generator().manual_seed(23)
    new_wide = torch.randint(-1, NUM_STAGES + 1, (2 * k,), generator=g, dtype=index_dtype)
    gate_wide = torch.randint(-1, 6, (2 * k,), generator=g, dtype=index_dtype)
    new, gate = new_wide[::2], gate_wide[1::2]
    assert not idx.is_contiguous() or idx.storage_offset() > 0
    expected_codes, expected_rows = oracle_update(
        state.tolist(), list(zip(idx.tolist(), new.tolist(), gate.tolist(), strict=True))
    )
    codes = lifecycle_update(state, idx, new, gate)
    assert codes.tolist() == expected_codes
    assert state.tolist() == expected_rows


def test_strided_view_reaches_every_requested_row(backend: str, poisoned_empty: None) -> None:
    """The issue's case: ``[1, 3, 5]`` as a view must update rows 1, 3 and 5."""
    state = random_state(8, seed=24, stages=[0] * 8)
    idx = torch.arange(8)[1::2][:3]
    codes = lifecycle_update(state, idx, torch.ones(8, dtype=torch.int64)[::2][:3])
    assert codes.tolist() == [0, 0, 0]
    assert state[:, C.LIFECYCLE_STAGE].tolist() == [0, 1, 0, 1, 0, 1, 0, 0]


def test_expanded_index_is_a_duplicate(backend: str, poisoned_empty: None) -> None:
    """``[2, 2, 2, 2]`` from a one-element tensor: all duplicates, nothing applied, nothing read
    past the single element."""
    state = random_state(4, seed=25, stages=[0] * 4)
    before = state.clone()
    idx = torch.tensor([2]).expand(4)
    new = torch.tensor([1], dtype=torch.int32).expand(4)
    gate = torch.tensor([3]).expand(4)
    assert lifecycle_update(state, idx, new, gate).tolist() == [3, 3, 3, 3]
    assert torch.equal(state, before)
    # Expanded stages and gates over distinct indices apply to each of them.
    codes = lifecycle_update(state, torch.tensor([0, 3, 1]), new[:3], gate[:3])
    assert codes.tolist() == [0, 0, 0]
    assert state[[0, 1, 3], C.LIFECYCLE_STAGE].tolist() == [1, 1, 1]
    assert state[[0, 1, 3], C.LAST_GATE].tolist() == [3, 3, 3]
    assert state[2].tolist() == before[2].tolist()


@pytest.mark.parametrize("seed", [31, 32, 33])
def test_fresh_random_batches_with_wide_and_narrow_indices(
    backend: str, poisoned_empty: None, seed: int
) -> None:
    """Random tables, K not a multiple of any block, int64 indices far outside int32 (they
    must not alias a row once narrowed), against the oracle."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 300, (1,), generator=g))
    k = int(torch.randint(1, 400, (1,), generator=g))
    state = random_state(n, seed=seed)
    idx = torch.randint(-3, n + 3, (k,), generator=g)
    idx[:: max(1, k // 7)] += 1 << 32  # same low 32 bits as a real row
    new = torch.randint(-1, NUM_STAGES + 1, (k,), generator=g)
    gate = torch.randint(-1, 6, (k,), generator=g)
    check_update(state, list(zip(idx.tolist(), new.tolist(), gate.tolist(), strict=True)))


def test_launcher_copies_views_itself(triton_backend: None) -> None:
    """The launcher, called directly, is safe with views too (not only through the op)."""
    from kasmina.kernels.lifecycle import lifecycle_update as launch

    from kasmina.ops.lifecycle import _COLUMNS, _device_tables

    state = random_state(6, seed=34, stages=[0] * 6)
    rules, _ = _device_tables(state.device)
    idx = torch.tensor([5, 9, 1, 9, 3])[::2]
    codes = launch(state, idx, torch.ones(3, dtype=torch.int64), None, rules, _COLUMNS)
    assert codes.tolist() == [0, 0, 0]
    assert state[:, C.LIFECYCLE_STAGE].tolist() == [0, 1, 0, 1, 0, 1]


def test_eager_calls_skip_the_dispatcher_and_tracing_sees_the_custom_ops(backend: str) -> None:
    """Eager calls run the implementation directly (no custom-op round trip) yet still bump the
    state's version counter; a mode that only watches (a profiler, a logger) sees that same
    path with the same results; a trace (``make_fx``) records the custom ops."""
    from torch.fx.experimental.proxy_tensor import make_fx

    eager, moded = random_state(64, seed=30), random_state(64, seed=30)
    requests = (torch.tensor([3, 9, 9, 70, 12]), torch.tensor([1, 2, 3, 1, 11]))
    version = eager._version
    codes = lifecycle_update(eager, *requests)
    lifecycle_tick(eager)
    assert eager._version > version
    with DispatchedOps() as mode:
        moded_codes = lifecycle_update(moded, *requests)
        lifecycle_tick(moded)
    assert mode.ops and not any("kasmina." in str(op) for op in mode.ops)
    assert torch.equal(codes, moded_codes) and torch.equal(eager, moded)

    def update_and_tick(state, idx, stage):
        out = lifecycle_update(state, idx, stage)
        lifecycle_tick(state)
        return out

    graph = make_fx(update_and_tick)(random_state(64, seed=30), *requests).graph
    traced = [str(node.target) for node in graph.nodes]
    assert "kasmina.lifecycle_update.default" in traced
    assert "kasmina.lifecycle_tick.default" in traced


def test_auto_backend_on_cpu_runs_the_host_path(
    host_backend: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auto`` on a CPU takes the NumPy path (the torch reference is not called), and a large
    random batch still matches the oracle."""
    import kasmina.ops.lifecycle as module

    calls: list[int] = []
    host = module._lifecycle_update_host

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return host(*args)  # type: ignore[arg-type]

    def refuse(*args: object) -> torch.Tensor:
        raise AssertionError("the torch reference ran under the auto backend")

    monkeypatch.setattr(module, "_lifecycle_update_host", counted)
    monkeypatch.setattr(module, "lifecycle_update_reference", refuse)
    g = torch.Generator().manual_seed(40)
    state = random_state(1024, seed=40)
    idx = torch.randint(-5, 1030, (1500,), generator=g)
    new = torch.randint(-1, NUM_STAGES + 1, (1500,), generator=g)
    gate = torch.randint(-1, 6, (1500,), generator=g)
    check_update(state, list(zip(idx.tolist(), new.tolist(), gate.tolist(), strict=True)))
    assert calls == [1]
