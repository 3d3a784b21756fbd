"""Batched lifecycle transitions on the device state table (docs/design.md §2, §3).

``lifecycle_update`` applies K requested transitions to the int32 ``[num_seeds, 10]`` table in
one launch and returns one code per request (``kasmina.stages.TransitionCode``): 0 applied,
1 illegal, 2 index (or gate) out of range, 3 index duplicated in the batch (none of its
updates apply); precedence 2 > 3 > 1. A gate above int32's range (``LAST_GATE`` is int32) makes
its own lane 2 in the op, never a host read; its index still counts for duplicates. An applied
transition sets the stage, zeroes ``EPOCHS_IN_STATE`` and ``READY_FLAG``, and sets
``LAST_GATE`` to ``gate[k]`` when given (a negative entry means "not given"), else to the gate
that guards that transition (G1..G5), else leaves it unchanged. COOLDOWN -> RECYCLING is legal
only while ``EMBARGO_COUNTER == 0``.

``lifecycle_tick`` ages every seed one epoch (the count saturates at 2**31 - 1), counts
``EMBARGO_COUNTER`` down to 0, then sets ``READY_FLAG`` = 1 for the automatic steps that are due
(COOLDOWN with the embargo over, and RECYCLING), 0 otherwise.

The rules live in ``kasmina.stages``; they reach the kernels as small device tables built here
and cached per device. Both ops are ``torch.library`` custom ops that mutate ``state``. Eager
calls outside any dispatch mode run the same implementation directly: on a CPU the custom op's
dispatcher round trip cost about as much as the whole 1,024-request update.

Backends (``kasmina.ops.backend``): the Triton kernel on CUDA; on a CPU the update runs on NumPy
views of the tensors (``_lifecycle_update_host``: the same steps as the torch reference, at
about a microsecond per step instead of ten); ``KASMINA_BACKEND=reference`` runs the torch
reference everywhere.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from kasmina.ops.backend import backend, through_dispatcher, use_triton
from kasmina.stages import (
    GATE_FOR_TRANSITION,
    NUM_STAGES,
    NUM_STATE_COLUMNS,
    SeedStage,
    StateColumn,
    TransitionCode,
    transition_matrix,
)
from kasmina.utils.locks import fork_safe

IndexLike = torch.Tensor | Sequence[int]
NEEDS_ZERO_EMBARGO = 1 << 8  # flag bit of a rule: legal only while EMBARGO_COUNTER == 0
READY_NEVER, READY_AFTER_EMBARGO, READY_ALWAYS = 0, 1, 2
INT32_MAX = 2**31 - 1
_COLUMNS = {
    "stage": int(StateColumn.LIFECYCLE_STAGE),
    "epochs": int(StateColumn.EPOCHS_IN_STATE),
    "gate": int(StateColumn.LAST_GATE),
    "embargo": int(StateColumn.EMBARGO_COUNTER),
    "ready": int(StateColumn.READY_FLAG),
}


def transition_rules() -> list[list[int]]:
    """``[S][S]`` rule table: -1 illegal, else ``default_gate | NEEDS_ZERO_EMBARGO`` bits."""
    legal = transition_matrix()
    rules = [[-1] * NUM_STAGES for _ in range(NUM_STAGES)]
    for src in range(NUM_STAGES):
        for dst in range(NUM_STAGES):
            if legal[src][dst]:
                rules[src][dst] = GATE_FOR_TRANSITION.get((SeedStage(src), SeedStage(dst)), 0)
    rules[SeedStage.COOLDOWN][SeedStage.RECYCLING] |= NEEDS_ZERO_EMBARGO
    return rules


def ready_rules() -> list[int]:
    """Per stage: when ``tick`` raises ``READY_FLAG`` (never / after the embargo / always)."""
    ready = [READY_NEVER] * NUM_STAGES
    ready[SeedStage.COOLDOWN] = READY_AFTER_EMBARGO
    ready[SeedStage.RECYCLING] = READY_ALWAYS
    return ready


_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_tables_lock = fork_safe(threading.Lock())


def _device_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rules [S, S], ready [S])`` int32 on ``device``, built once per device."""
    with _tables_lock:
        tables = _tables.get(device)
        if tables is None:
            rules = torch.tensor(transition_rules(), dtype=torch.int32, device=device)
            ready = torch.tensor(ready_rules(), dtype=torch.int32, device=device)
            tables = _tables[device] = (rules, ready)
    return tables


_host_rules: np.ndarray | None = None


def _flat_host_rules() -> np.ndarray:
    """The rule table flattened to ``S * S + 1`` int64 entries; the extra last entry (-1) is
    where requests naming an unknown stage look up their rule."""
    global _host_rules
    if _host_rules is None:
        flat = [rule for row in transition_rules() for rule in row] + [-1]
        _host_rules = np.array(flat, dtype=np.int64)
    return _host_rules


def _check_is_tensor(state: object) -> None:
    # First in both public ops: a list would otherwise meet ``state.device`` (AttributeError).
    if not isinstance(state, torch.Tensor):
        raise ValueError(f"state must be a torch.Tensor, got {type(state).__name__}")


def _check_state(state: torch.Tensor) -> None:
    _check_is_tensor(state)
    if state.dtype != torch.int32:
        raise ValueError(f"state must be int32, got {state.dtype}")
    if state.dim() != 2 or state.shape[1] != NUM_STATE_COLUMNS:
        raise ValueError(f"state must have shape [N, {NUM_STATE_COLUMNS}], got {list(state.shape)}")
    if not state.is_contiguous():
        raise ValueError("state must be contiguous")
    if state.is_inference() and not torch.is_inference_mode_enabled():
        # torch refuses the reference's in-place ops on it; the NumPy and Triton paths write
        # through pointers and would not notice, so every backend refuses it here.
        raise ValueError(
            "state was created under torch.inference_mode() and cannot be updated in place "
            "outside it: create it outside inference mode, or clone it there"
        )


def _check_index(name: str, t: torch.Tensor, state: torch.Tensor, k: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != k:
        raise ValueError(f"{name} must have shape [{k}], got {list(t.shape)}")
    if t.device != state.device:
        raise ValueError(f"{name} is on {t.device}, expected {state.device} (the state's device)")


def _check_update(
    state: torch.Tensor, seed_idx: torch.Tensor, new_stage: torch.Tensor, gate: torch.Tensor | None
) -> None:
    """Types, shapes and devices only: no value is read on the host (a gate beyond int32 is
    reported per lane, in the codes)."""
    _check_state(state)
    if not isinstance(seed_idx, torch.Tensor) or seed_idx.dim() != 1:
        raise ValueError("seed_idx must be a 1-d integer tensor")
    k = seed_idx.shape[0]
    _check_index("seed_idx", seed_idx, state, k)
    _check_index("new_stage", new_stage, state, k)
    if gate is not None:
        _check_index("gate", gate, state, k)


def lifecycle_update_reference(
    state: torch.Tensor,
    seed_idx: torch.Tensor,
    new_stage: torch.Tensor,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Vectorised torch version of the update (the CPU path); mutates ``state``.

    A fixed sequence of about twenty small torch ops whatever K is, and no Python loop: every
    request is decided from one gather of its row, and the applied rows are written back with
    one ``index_copy_`` (their indices are unique, since a duplicated index applies nothing).
    Index views of any stride are read through their strides.
    """
    _check_update(state, seed_idx, new_stage, gate)
    rules, _ = _device_tables(state.device)
    n, k = state.shape[0], seed_idx.shape[0]
    idx, new = seed_idx.long(), new_stage.long()
    in_range = (idx >= 0) & (idx < n)
    if n == 0 or k == 0:
        return torch.full(
            (k,), int(TransitionCode.OUT_OF_RANGE), dtype=torch.int32, device=state.device
        )
    # Out-of-range requests count in an extra bin n, so only in-range indices meet as duplicates.
    binned = idx.where(in_range, n)
    dup = in_range & (torch.bincount(binned, minlength=n + 1).index_select(0, binned) > 1)

    rows = state.index_select(0, binned.clamp_max(n - 1))  # [K, C]: each request's current row
    cur = rows[:, StateColumn.LIFECYCLE_STAGE].long()
    known = (cur >= 0) & (cur < NUM_STAGES) & (new >= 0) & (new < NUM_STAGES)
    pair = cur.clamp(0, NUM_STAGES - 1) * NUM_STAGES + new.clamp(0, NUM_STAGES - 1)
    rule = rules.view(-1).index_select(0, pair).where(known, -1)
    embargo_ok = ((rule & NEEDS_ZERO_EMBARGO) == 0) | (rows[:, StateColumn.EMBARGO_COUNTER] == 0)
    legal = (rule >= 0) & embargo_ok

    # LAST_GATE is int32: a gate above its range would wrap, so that lane is out of range
    # (compared at the gate's own width; a negative entry, however wide, is "not given").
    fits = in_range if gate is None else in_range & (gate <= INT32_MAX)
    codes = torch.where(
        fits,
        torch.where(
            dup,
            int(TransitionCode.DUPLICATE),
            torch.where(legal, int(TransitionCode.APPLIED), int(TransitionCode.ILLEGAL)),
        ),
        int(TransitionCode.OUT_OF_RANGE),
    ).to(torch.int32)

    lanes = (codes == int(TransitionCode.APPLIED)).nonzero().squeeze(1)
    if lanes.numel() == 0:
        return codes
    out = rows.index_select(0, lanes)
    out[:, StateColumn.LIFECYCLE_STAGE] = new.index_select(0, lanes).to(torch.int32)
    out[:, StateColumn.EPOCHS_IN_STATE] = 0
    out[:, StateColumn.READY_FLAG] = 0
    # LAST_GATE: the given gate when >= 0, else the rule's gate when > 0, else unchanged.
    last_gate = out[:, StateColumn.LAST_GATE]
    default_gate = rule.index_select(0, lanes) & 0xFF
    last_gate = default_gate.to(torch.int32).where(default_gate > 0, last_gate)
    if gate is not None:
        given = gate.index_select(0, lanes)
        last_gate = given.to(torch.int32).where(given >= 0, last_gate)
    out[:, StateColumn.LAST_GATE] = last_gate
    state.index_copy_(0, idx.index_select(0, lanes), out)
    return codes


def _lifecycle_update_host(
    state: torch.Tensor,
    seed_idx: torch.Tensor,
    new_stage: torch.Tensor,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """The update on NumPy views of CPU tensors (``auto`` backend on a CPU); mutates ``state``.

    Same decisions as :func:`lifecycle_update_reference`, step for step; a torch op costs about
    ten microseconds of dispatch on a CPU, a NumPy one about one, and the reference's twenty
    odd ops were most of a 1,024-request update. Duplicates are found by sorting the in-range
    indices (K log K, independent of the table's size). Inputs are checked by the caller.
    """
    n, k = state.shape[0], seed_idx.shape[0]
    codes = np.full(k, int(TransitionCode.OUT_OF_RANGE), dtype=np.int32)
    if n == 0 or k == 0:
        return torch.from_numpy(codes)
    table = state.numpy()  # a view: writes below land in ``state``
    idx = seed_idx.numpy().astype(np.int64, copy=False)
    in_range = idx.view(np.uint64) < n  # a negative index reads as a huge one
    if in_range.all():
        lanes, rows = None, idx
    else:
        lanes = np.flatnonzero(in_range)
        if lanes.size == 0:
            return torch.from_numpy(codes)
        rows = idx[lanes]
    # The in-range requests' stages and gates, lane for lane with ``rows``.
    new = new_stage.numpy().astype(np.int64, copy=False)
    if lanes is not None:
        new = new[lanes]
    given = None
    if gate is not None:
        given = gate.numpy().astype(np.int64, copy=False)
        if lanes is not None:
            given = given[lanes]
    decided, rule = _host_decisions(table, rows, new, given)
    if lanes is None:
        codes = decided
    else:
        codes[lanes] = decided
    ok = np.flatnonzero(decided == int(TransitionCode.APPLIED))
    if ok.size:
        _host_apply(table, rows, new, rule, given, ok)
    return torch.from_numpy(codes)


def _host_duplicates(rows: np.ndarray) -> np.ndarray | None:
    """Which of ``rows`` (in-range indices) occur more than once, by sorting (K log K); None
    when none does."""
    order = np.argsort(rows, kind="stable")
    ranked = rows[order]
    same = ranked[1:] == ranked[:-1]
    if not same.any():
        return None
    flagged = np.zeros(ranked.shape[0], dtype=bool)
    flagged[1:] |= same
    flagged[:-1] |= same
    dup = np.empty_like(flagged)
    dup[order] = flagged
    return dup


def _host_decisions(
    table: np.ndarray, rows: np.ndarray, new: np.ndarray, given: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Each in-range request's code (int32: applied, illegal, duplicate, or out of range for a
    gate past int32), and its transition rule (-1: illegal)."""
    dup = _host_duplicates(rows)
    stage_col = table[:, int(StateColumn.LIFECYCLE_STAGE)]
    cur = stage_col[rows].astype(np.int64)
    # Unsigned views: a negative stage reads as a huge one, so one compare checks 0 <= s < S.
    known = (cur.view(np.uint64) < NUM_STAGES) & (new.view(np.uint64) < NUM_STAGES)
    flat = _flat_host_rules()
    rule = flat[np.where(known, cur * NUM_STAGES + new, flat.shape[0] - 1)]
    legal = rule >= 0
    # Legal only with the embargo over: the flag bit on a legal rule (an illegal one is -1).
    embargoed = np.flatnonzero(rule >= NEEDS_ZERO_EMBARGO)
    if embargoed.size:
        legal[embargoed] = table[:, int(StateColumn.EMBARGO_COUNTER)][rows[embargoed]] == 0
    decided = np.where(legal, int(TransitionCode.APPLIED), int(TransitionCode.ILLEGAL))
    decided = decided.astype(np.int32)
    if dup is not None:
        decided[dup] = int(TransitionCode.DUPLICATE)
    if given is not None:
        # LAST_GATE is int32: a gate above its range would wrap; that lane is out of range.
        decided[given > INT32_MAX] = int(TransitionCode.OUT_OF_RANGE)
    return decided, rule


def _host_apply(
    table: np.ndarray,
    rows: np.ndarray,
    new: np.ndarray,
    rule: np.ndarray,
    given: np.ndarray | None,
    ok: np.ndarray,
) -> None:
    """Write the requests ``ok`` picks (positions in ``rows``, applied) into ``table``."""
    every = ok.size == rows.shape[0]
    applied = rows if every else rows[ok]
    table[:, int(StateColumn.LIFECYCLE_STAGE)][applied] = new if every else new[ok]
    table[:, int(StateColumn.EPOCHS_IN_STATE)][applied] = 0
    table[:, int(StateColumn.READY_FLAG)][applied] = 0
    # LAST_GATE: the given gate when >= 0, else the rule's gate when > 0, else unchanged.
    gate_col = table[:, int(StateColumn.LAST_GATE)]
    default_gate = (rule if every else rule[ok]) & 0xFF
    last_gate = np.where(default_gate > 0, default_gate, gate_col[applied])
    if given is not None:
        if not every:
            given = given[ok]
        last_gate = np.where(given >= 0, given, last_gate)
    gate_col[applied] = last_gate


def lifecycle_tick_reference(state: torch.Tensor) -> None:
    """Torch version of the tick (the CPU path); mutates ``state``."""
    _check_state(state)
    _, ready = _device_tables(state.device)
    epochs = state[:, StateColumn.EPOCHS_IN_STATE]
    epochs += epochs < INT32_MAX  # saturates instead of wrapping to a negative age
    # Clamped first: INT32_MIN - 1 would wrap to INT32_MAX, an embargo of 2**31 epochs.
    embargo = state[:, StateColumn.EMBARGO_COUNTER].clamp_min_(1).sub_(1)
    stage = state[:, StateColumn.LIFECYCLE_STAGE].long()
    known = (stage >= 0) & (stage < NUM_STAGES)
    when = ready.index_select(0, stage.clamp(0, NUM_STAGES - 1)).where(known, READY_NEVER)
    flag = (when == READY_ALWAYS) | ((when == READY_AFTER_EMBARGO) & (embargo == 0))
    state[:, StateColumn.READY_FLAG] = flag.to(torch.int32)


def _update_impl(
    state: torch.Tensor,
    seed_idx: torch.Tensor,
    new_stage: torch.Tensor,
    gate: torch.Tensor | None,
) -> torch.Tensor:
    if not use_triton(state.device):
        if state.device.type == "cpu" and backend() == "auto":
            _check_update(state, seed_idx, new_stage, gate)
            return _lifecycle_update_host(state, seed_idx, new_stage, gate)
        return lifecycle_update_reference(state, seed_idx, new_stage, gate)
    from kasmina.kernels.lifecycle import lifecycle_update as launch

    _check_update(state, seed_idx, new_stage, gate)
    rules, _ = _device_tables(state.device)
    return launch(state, seed_idx, new_stage, gate, rules, _COLUMNS)


@torch.library.custom_op("kasmina::lifecycle_update", mutates_args=("state",))
def _lifecycle_update_op(
    state: torch.Tensor,
    seed_idx: torch.Tensor,
    new_stage: torch.Tensor,
    gate: torch.Tensor | None,
) -> torch.Tensor:
    return _update_impl(state, seed_idx, new_stage, gate)


@_lifecycle_update_op.register_fake
def _lifecycle_update_fake(
    state: torch.Tensor,
    seed_idx: torch.Tensor,
    new_stage: torch.Tensor,
    gate: torch.Tensor | None,
) -> torch.Tensor:
    _check_update(state, seed_idx, new_stage, gate)
    return torch.empty(seed_idx.shape[0], dtype=torch.int32, device=state.device)


def _tick_impl(state: torch.Tensor) -> None:
    if not use_triton(state.device):
        lifecycle_tick_reference(state)
        return
    from kasmina.kernels.lifecycle import lifecycle_tick as launch

    _check_state(state)
    _, ready = _device_tables(state.device)
    launch(state, ready, _COLUMNS)


@torch.library.custom_op("kasmina::lifecycle_tick", mutates_args=("state",))
def _lifecycle_tick_op(state: torch.Tensor) -> None:
    _tick_impl(state)


@_lifecycle_tick_op.register_fake
def _lifecycle_tick_fake(state: torch.Tensor) -> None:
    _check_state(state)


def _as_index(name: str, value: IndexLike | None, device: torch.device) -> torch.Tensor | None:
    """A sequence as an int64 tensor. Its entries must be integers (``operator.index``: a float
    such as 1.9 is refused rather than truncated); a bool, though an ``int``, is refused too, as
    a bool tensor is."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    try:
        ints = as_ints(value)  # type: ignore[arg-type]
        return torch.tensor(ints, dtype=torch.int64, device=device)
    except (TypeError, ValueError, OverflowError, RuntimeError) as exc:
        raise ValueError(
            f"{name} must be an int32/int64 tensor or a sequence of ints, got {value!r}"
        ) from exc


def as_ints(values: Iterable[Any]) -> list[int]:
    """``values`` as ints through ``operator.index`` (numpy and 0-d tensor integers too), where
    ``int()`` would truncate a float (1.9 to row 1); a bool, though an ``int``, is refused
    too. ``TypeError`` names the first that is none."""
    ints = []
    for v in values:
        try:
            if isinstance(v, (bool, np.bool_)):
                raise TypeError
            ints.append(operator.index(v))
        except TypeError:  # (a float tensor's ``__index__`` raises it too)
            raise TypeError(f"{v!r} is not an int") from None
    return ints


def lifecycle_update(
    state: torch.Tensor,
    seed_idx: IndexLike,
    new_stage: IndexLike,
    gate: IndexLike | None = None,
) -> torch.Tensor:
    """Apply K transitions to ``state`` in place; returns int32 ``[K]`` codes on its device.

    ``state``: int32 ``[N, 10]`` contiguous. ``seed_idx``, ``new_stage``, ``gate``: int32/int64
    ``[K]`` tensors on the state's device, any view (strided, offset or expanded; sequences of
    ints are converted; a bool or a non-integer entry is refused). ``ValueError`` on any other
    dtype, shape or device, and on a state made under ``torch.inference_mode()`` used outside
    it. Bad values are reported in the codes instead, with no host read: an index outside the
    table or a gate above int32's range (``LAST_GATE`` is int32; a negative gate of any width
    means "not given") is ``OUT_OF_RANGE``, an unknown stage ``ILLEGAL``.
    """
    _check_is_tensor(state)
    idx = _as_index("seed_idx", seed_idx, state.device)
    new = _as_index("new_stage", new_stage, state.device)
    gates = _as_index("gate", gate, state.device)
    if idx is None or new is None:
        raise ValueError("seed_idx and new_stage are required (a gate alone may be None)")
    if through_dispatcher():
        return _lifecycle_update_op(state, idx, new, gates)
    codes = _update_impl(state, idx, new, gates)
    torch.autograd.graph.increment_version(state)  # as the custom op does for a mutated input
    return codes


def lifecycle_tick(state: torch.Tensor) -> None:
    """Advance every seed one epoch in place (see the module docstring); ``ValueError`` for a
    ``state`` that is not an int32 ``[N, 10]`` contiguous tensor, as ``lifecycle_update``."""
    _check_is_tensor(state)
    if through_dispatcher():
        _lifecycle_tick_op(state)
        return
    _tick_impl(state)
    torch.autograd.graph.increment_version(state)
