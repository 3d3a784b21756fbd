"""lifecycle_update / lifecycle_tick against a pure-Python oracle of ``kasmina.stages``.

Both backends run every test: the Triton kernels through the interpreter, and the reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

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

C = StateColumn


@pytest.fixture(params=["triton_backend", "reference_backend"])
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
        r[C.EPOCHS_IN_STATE] += 1
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


def test_random_batches_across_programs(backend: str, poisoned_empty: None) -> None:
    # K > one program's block, indices and stages partly out of range, random gates.
    g = torch.Generator().manual_seed(6)
    n, k = 200, 300
    state = random_state(n, seed=6)
    idx = torch.randint(-5, n + 5, (k,), generator=g).tolist()
    new = torch.randint(-2, NUM_STAGES + 2, (k,), generator=g).tolist()
    gates = torch.randint(-1, 6, (k,), generator=g).tolist()
    check_update(state, list(zip(idx, new, gates, strict=True)))


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


def test_tick_matches_oracle_on_random_table(backend: str) -> None:
    state = random_state(600, seed=8)  # several programs, a partial last block
    state[:5, C.LIFECYCLE_STAGE] = torch.tensor([-1, 11, 99, 6, 8], dtype=torch.int32)
    for _ in range(3):
        expected = oracle_tick(state.tolist())
        lifecycle_tick(state)
        assert state.tolist() == expected


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


# Compiles the kernels for an sm_90 target without a GPU (TRITON_INTERPRET off): catches what
# the interpreter accepts but the compiler rejects (e.g. non-constexpr globals).
CODEGEN = r"""
import sys
try:
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
except ImportError:
    sys.exit(3)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kasmina.kernels import lifecycle as lc

cols = dict(COL_STAGE=0, COL_EPOCHS=2, COL_EMBARGO=6, COL_READY=7, NUM_STAGES=11, NUM_COLS=10)
def compile_(fn, sig, constexprs):
    sig = {**sig, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    triton.compile(src, target=GPUTarget("cuda", 90, 32))

for idx in ("i32", "i64"):
    sig = {"state_ptr": "*i32", "idx_ptr": "*" + idx, "new_ptr": "*" + idx, "gate_ptr": "*" + idx,
           "rules_ptr": "*i32", "codes_ptr": "*i32", "n_rows": "i32", "k": "i32"}
    const = dict(cols, COL_GATE=3, HAS_GATE=idx == "i64", BLOCK=lc.UPDATE_BLOCK,
                 DUP_BLOCK=lc.DUP_BLOCK)
    compile_(lc._update_kernel, sig, const)
sig = {"state_ptr": "*i32", "ready_ptr": "*i32", "n_rows": "i32"}
compile_(lc._tick_kernel, sig, dict(cols, BLOCK=lc.TICK_BLOCK))
print("compiled")
"""


def test_kernels_compile_for_a_gpu_target() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run(
        [sys.executable, "-c", CODEGEN], env=env, capture_output=True, text=True, timeout=600
    )
    if run.returncode == 3:
        pytest.skip("triton has no NVIDIA backend here")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("compiled")
