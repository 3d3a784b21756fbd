"""The one seed lifecycle (docs/design.md §3): stage codes, legal transitions, state-table columns.

Dependency-free so that the fused lifecycle op, the state table, the seeds and the command
handler all read the same table. Stage values equal ``leyline.SeedLifecycleStage``.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from enum import IntEnum


class SeedStage(IntEnum):
    DORMANT = 0
    ISOLATED_INIT = 1
    COMPATIBILITY_CHECK = 2
    GRAFTING = 3
    STABILIZATION = 4
    ACTIVE = 5
    COOLDOWN = 6
    HARVESTING = 7
    RECYCLING = 8
    QUARANTINE = 9
    TERMINATED = 10


NUM_STAGES = len(SeedStage)

# Legal transitions; anything else is rejected and counted.
LEGAL_TRANSITIONS: dict[SeedStage, frozenset[SeedStage]] = {
    SeedStage.DORMANT: frozenset({SeedStage.ISOLATED_INIT, SeedStage.TERMINATED}),
    SeedStage.ISOLATED_INIT: frozenset(
        {SeedStage.COMPATIBILITY_CHECK, SeedStage.HARVESTING, SeedStage.QUARANTINE}
    ),
    SeedStage.COMPATIBILITY_CHECK: frozenset(
        {SeedStage.GRAFTING, SeedStage.HARVESTING, SeedStage.QUARANTINE}
    ),
    SeedStage.GRAFTING: frozenset(
        {SeedStage.STABILIZATION, SeedStage.HARVESTING, SeedStage.QUARANTINE}
    ),
    SeedStage.STABILIZATION: frozenset(
        {SeedStage.ACTIVE, SeedStage.HARVESTING, SeedStage.QUARANTINE}
    ),
    SeedStage.ACTIVE: frozenset({SeedStage.TERMINATED}),
    SeedStage.HARVESTING: frozenset({SeedStage.COOLDOWN}),
    SeedStage.COOLDOWN: frozenset({SeedStage.RECYCLING}),  # only when EMBARGO_COUNTER == 0
    SeedStage.RECYCLING: frozenset({SeedStage.DORMANT}),
    SeedStage.QUARANTINE: frozenset({SeedStage.HARVESTING, SeedStage.TERMINATED}),
    SeedStage.TERMINATED: frozenset(),
}

# The gate (G1..G5) that guards each forward step of the main path.
GATE_FOR_TRANSITION: dict[tuple[SeedStage, SeedStage], int] = {
    (SeedStage.DORMANT, SeedStage.ISOLATED_INIT): 1,
    (SeedStage.ISOLATED_INIT, SeedStage.COMPATIBILITY_CHECK): 2,
    (SeedStage.COMPATIBILITY_CHECK, SeedStage.GRAFTING): 3,
    (SeedStage.GRAFTING, SeedStage.STABILIZATION): 4,
    (SeedStage.STABILIZATION, SeedStage.ACTIVE): 5,
}

# The next stage ADVANCE aims for from each stage of the main path.
NEXT_STAGE: dict[SeedStage, SeedStage] = {src: dst for (src, dst) in GATE_FOR_TRANSITION}

# Stages in which the seed trains apart from the host: its own optimizer steps it, its kernel
# sees the host's activations detached, and KD distils into it.
ISOLATED_TRAINING_STAGES = frozenset(
    {SeedStage.ISOLATED_INIT, SeedStage.GRAFTING, SeedStage.STABILIZATION}
)
# Stages in which the seed's parameters train (in isolation, or with the host once ACTIVE).
TRAINING_STAGES = ISOLATED_TRAINING_STAGES | {SeedStage.ACTIVE}
# Stages whose forward runs the kernel; every other stage returns the host activations.
RUNS_KERNEL = TRAINING_STAGES | {SeedStage.COMPATIBILITY_CHECK}
# A kernel is attached and the isolation invariant holds (the seed is not yet part of the host).
ISOLATED_STAGES = ISOLATED_TRAINING_STAGES | {SeedStage.COMPATIBILITY_CHECK}
# Stages whose slot output blends the seed's against the detached host.
BLENDING_STAGES = frozenset({SeedStage.GRAFTING, SeedStage.STABILIZATION})
# Stages whose seed's output reaches the slot's (what G5 measures).
CONTRIBUTING_STAGES = BLENDING_STAGES | {SeedStage.ACTIVE}
# Stages after a seed's release: its kernel runs no more, and QUARANTINE does not hold it.
RELEASED_STAGES = frozenset(SeedStage) - RUNS_KERNEL - {SeedStage.QUARANTINE}


def is_legal(src: int, dst: int) -> bool:
    """Whether ``src -> dst`` is in the table (ignores the embargo condition)."""
    try:
        return SeedStage(dst) in LEGAL_TRANSITIONS[SeedStage(src)]
    except ValueError:
        return False


def transition_matrix() -> list[list[int]]:
    """``[NUM_STAGES][NUM_STAGES]`` 0/1 matrix of legal transitions, row = source stage."""
    return [
        [
            1 if SeedStage(dst) in LEGAL_TRANSITIONS[SeedStage(src)] else 0
            for dst in range(NUM_STAGES)
        ]
        for src in range(NUM_STAGES)
    ]


class StateColumn(IntEnum):
    """Columns of the ``[num_seeds, 10]`` int32 device state table."""

    LIFECYCLE_STAGE = 0
    BLUEPRINT_ID = 1
    EPOCHS_IN_STATE = 2
    LAST_GATE = 3
    ALPHA_BLEND = 4  # alpha * 1000, 0..1000
    PERFORMANCE_GATE = 5
    EMBARGO_COUNTER = 6
    READY_FLAG = 7
    REGION_ID = 8
    GATE_SCORE = 9


NUM_STATE_COLUMNS = len(StateColumn)


class TransitionCode(IntEnum):
    """Per-update result codes of ``lifecycle_update``."""

    APPLIED = 0
    ILLEGAL = 1
    OUT_OF_RANGE = 2
    DUPLICATE = 3


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


def checked_row(row: object) -> list[int]:
    """``row`` as a state-table row a restore may write: ``NUM_STATE_COLUMNS`` integers (no
    bool, float or string), each an int32, a known stage, counts (``EPOCHS_IN_STATE``,
    ``EMBARGO_COUNTER``) >= 0; ``ValueError`` naming the problem otherwise. A saved seed
    state is checked with it before a load writes anything
    (``kasmina.seeds.extra_state.parse_seed_state``), and a restore writes only what it
    passes."""
    if not isinstance(row, list | tuple) or len(row) != NUM_STATE_COLUMNS:
        raise ValueError(f"a state row has {NUM_STATE_COLUMNS} columns, got {row!r:.80}")
    if any(isinstance(v, bool) or not hasattr(v, "__index__") for v in row):
        raise ValueError(f"a state row holds integers, got {list(row)!r:.120}")
    values = [operator.index(v) for v in row]
    if not all(-(2**31) <= v < 2**31 for v in values):  # an int32 row
        raise ValueError(f"a state row holds int32 values, got {values!r:.120}")
    parse_stage(values[StateColumn.LIFECYCLE_STAGE])  # ValueError naming an unknown one
    for column in (StateColumn.EPOCHS_IN_STATE, StateColumn.EMBARGO_COUNTER):
        if values[column] < 0:  # counts: a negative one is no table's
            raise ValueError(f"{column.name} must be >= 0, got {values[column]}")
    return values


def check_saved_stages(
    table_stages: Sequence[SeedStage], saved: Mapping[str, tuple[int, SeedStage]]
) -> None:
    """Each seed's stage in a saved state table (``table_stages``, by row) is the one its own
    saved state holds (``saved``: seed id -> (its row, that stage)); ``ValueError`` naming the
    first seed that differs. A restore writes the table over the rows the seeds' own states
    restored: a table of another stage left a seed DORMANT with a kernel, or ACTIVE half
    grafted, with another stage's optimizer layout and gates. ``kasmina.load`` and a rollback's
    phase 1 check with it."""
    for seed_id, (row, stage) in saved.items():
        if table_stages[row] != stage:
            raise ValueError(
                f"state table has seed {seed_id} {table_stages[row].name}, its own saved state "
                f"{stage.name}"
            )
