"""Lifecycle state-table updates: K transitions in one launch, and the per-epoch tick.

The kernels know nothing about stage names: the host passes the rules as small device tables.

* ``rules`` (int32 ``[S, S]``, row = current stage, column = requested stage): ``-1`` for an
  illegal transition, otherwise ``gate | (needs_zero_embargo << 8)`` where ``gate`` (0..255) is
  the gate recorded in ``LAST_GATE`` when the caller gives none (0 = leave it unchanged) and
  ``needs_zero_embargo`` says the transition is legal only while ``EMBARGO_COUNTER == 0``.
* ``ready`` (int32 ``[S]``): when ``tick`` sets ``READY_FLAG`` for a stage: 0 never, 1 when the
  embargo counter has reached 0, 2 always.

Update codes: 0 applied, 1 illegal, 2 index (or gate: above int32's range) out of range,
3 index duplicated in the batch (precedence 2 > 3 > 1). A duplicated index applies none of its
updates, so every applied row is written by exactly one lane and the launch has no write races.

The index, stage and gate vectors are read as dense ``[K]`` arrays (``base + lane``), so the
launcher makes them contiguous: a strided view (``idx[::2]``) or an expanded one (stride 0)
would otherwise be read as the wrong elements, or past the end of its allocation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kasmina.kernels.device import on_device

# Globals read inside @triton.jit functions must be constexpr.
APPLIED = tl.constexpr(0)
ILLEGAL = tl.constexpr(1)
OUT_OF_RANGE = tl.constexpr(2)
DUPLICATE = tl.constexpr(3)
NEEDS_ZERO_EMBARGO = tl.constexpr(1 << 8)
INT32_MAX = tl.constexpr(2**31 - 1)  # LAST_GATE is int32: a larger gate is OUT_OF_RANGE
UPDATE_BLOCK = 128  # updates per program: one lane per thread at the default 4 warps
# Indices compared per step of the duplicate scan. The step compares a [UPDATE_BLOCK, DUP_BLOCK]
# tile, i.e. DUP_BLOCK compares per thread: at 128 the tile of int64 compares needed 255
# registers and spilled on sm_90; 32 int32 compares per step fit with room to spare (the
# register and spill counts per kernel are checked by tests/ops/test_ptxas.py).
DUP_BLOCK = 32
TICK_BLOCK = 256  # rows per program of the tick


@triton.jit
def _update_kernel(
    state_ptr,
    idx_ptr,
    new_ptr,
    gate_ptr,
    rules_ptr,
    codes_ptr,
    n_rows,
    k,
    HAS_GATE: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    NUM_COLS: tl.constexpr,
    COL_STAGE: tl.constexpr,
    COL_EPOCHS: tl.constexpr,
    COL_GATE: tl.constexpr,
    COL_EMBARGO: tl.constexpr,
    COL_READY: tl.constexpr,
    BLOCK: tl.constexpr,
    DUP_BLOCK: tl.constexpr,
):
    lanes = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = lanes < k
    idx = tl.load(idx_ptr + lanes, mask=live, other=-1).to(tl.int64)
    new = tl.load(new_ptr + lanes, mask=live, other=-1)  # range-checked before narrowing
    in_range = (idx >= 0) & (idx < n_rows)

    # Duplicate scan: compare every lane's index with all K indices, one tile at a time. Only
    # in-range indices can be reported as duplicates (out of range takes precedence), and an
    # in-range index is < n_rows < 2**31, so the compares run on int32 row numbers. Every
    # out-of-range index is first mapped to a negative sentinel (-2 for this lane's own, -1 for
    # the others, including the masked tail), so that a wide index can never alias a real row
    # once narrowed, and a sentinel never equals a row number nor the other sentinel.
    own = tl.where(in_range, idx, -2).to(tl.int32)
    dup = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, k, DUP_BLOCK):
        others = start + tl.arange(0, DUP_BLOCK)
        other_idx = tl.load(idx_ptr + others, mask=others < k, other=-1).to(tl.int64)
        other_row = tl.where((other_idx >= 0) & (other_idx < n_rows), other_idx, -1).to(tl.int32)
        same = (own[:, None] == other_row[None, :]) & (lanes[:, None] != others[None, :])
        dup = tl.maximum(dup, tl.max(same.to(tl.int32), axis=1))
    dup = dup != 0

    row = state_ptr + idx * NUM_COLS
    look = live & in_range & ~dup
    cur = tl.load(row + COL_STAGE, mask=look, other=-1)
    embargo = tl.load(row + COL_EMBARGO, mask=look, other=0)
    stages_ok = (cur >= 0) & (cur < NUM_STAGES) & (new >= 0) & (new < NUM_STAGES)
    new = new.to(tl.int32)
    rule = tl.load(rules_ptr + cur * NUM_STAGES + new, mask=look & stages_ok, other=-1)
    legal = (rule >= 0) & (((rule & NEEDS_ZERO_EMBARGO) == 0) | (embargo == 0))

    fits = in_range
    if HAS_GATE:
        # LAST_GATE is int32: a gate above its range would wrap, so its lane is out of range.
        # Compared at the gate's own width (int32 or int64) before narrowing; a negative entry,
        # however wide, means "not given".
        given = tl.load(gate_ptr + lanes, mask=live, other=-1)
        fits = fits & (given <= INT32_MAX)
    code = tl.where(fits, tl.where(dup, DUPLICATE, tl.where(legal, APPLIED, ILLEGAL)), OUT_OF_RANGE)
    tl.store(codes_ptr + lanes, code.to(tl.int32), mask=live)

    apply = live & (code == APPLIED)
    zero = tl.zeros([BLOCK], dtype=tl.int32)
    tl.store(row + COL_STAGE, new, mask=apply)
    tl.store(row + COL_EPOCHS, zero, mask=apply)
    tl.store(row + COL_READY, zero, mask=apply)
    gate = rule & 0xFF
    gate_set = apply & (gate > 0)
    if HAS_GATE:
        # The sign is tested at the given width, then the value narrowed (an applied lane's
        # gate fits in int32: a wider one made the lane OUT_OF_RANGE above).
        is_given = given >= 0
        gate = tl.where(is_given, given.to(tl.int32), gate)
        gate_set = apply & (is_given | (gate > 0))
    tl.store(row + COL_GATE, gate, mask=gate_set)


@triton.jit
def _tick_kernel(
    state_ptr,
    ready_ptr,
    n_rows,
    NUM_STAGES: tl.constexpr,
    NUM_COLS: tl.constexpr,
    COL_STAGE: tl.constexpr,
    COL_EPOCHS: tl.constexpr,
    COL_EMBARGO: tl.constexpr,
    COL_READY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = rows < n_rows
    base = state_ptr + rows.to(tl.int64) * NUM_COLS
    # The count stops at int32's maximum instead of wrapping to a negative age.
    epochs = tl.load(base + COL_EPOCHS, mask=live, other=0)
    tl.store(base + COL_EPOCHS, epochs + (epochs < 2147483647).to(tl.int32), mask=live)
    # max(e, 1) - 1 rather than max(e - 1, 0): the subtraction can then never wrap (an
    # embargo of INT32_MIN - 1 would be INT32_MAX), and both are e - 1 for e >= 1, else 0.
    embargo = tl.maximum(tl.load(base + COL_EMBARGO, mask=live, other=0), 1) - 1
    tl.store(base + COL_EMBARGO, embargo, mask=live)
    stage = tl.load(base + COL_STAGE, mask=live, other=-1)
    known = live & (stage >= 0) & (stage < NUM_STAGES)
    when = tl.load(ready_ptr + stage, mask=known, other=0)
    ready = (when == 2) | ((when == 1) & (embargo == 0))
    tl.store(base + COL_READY, ready.to(tl.int32), mask=live)


def lifecycle_update(
    state: torch.Tensor,
    seed_idx: torch.Tensor,
    new_stage: torch.Tensor,
    gate: torch.Tensor | None,
    rules: torch.Tensor,
    columns: dict[str, int],
) -> torch.Tensor:
    """Apply K transitions to ``state`` (int32 ``[N, C]``, contiguous) in place; int32 codes.

    ``gate[k] >= 0`` is written to ``LAST_GATE``; a negative entry (or no ``gate``) falls back
    to the rule's gate, and one above int32's range makes its lane ``OUT_OF_RANGE``. Inputs
    are validated by the caller (``kasmina.ops.lifecycle``).
    """
    if not state.is_contiguous():  # rows are addressed as ``state_ptr + row * NUM_COLS``
        raise ValueError("state must be contiguous")
    k = seed_idx.numel()
    codes = torch.empty(k, dtype=torch.int32, device=state.device)
    if k == 0:
        return codes
    # The kernel reads lane i at ``ptr + i``: views and expanded vectors become dense copies
    # (K elements, a no-op for the usual contiguous input).
    seed_idx = seed_idx.contiguous()
    new_stage = new_stage.contiguous()
    gate = None if gate is None else gate.contiguous()
    with on_device(state.device):
        _update_kernel[(triton.cdiv(k, UPDATE_BLOCK),)](
            state,
            seed_idx,
            new_stage,
            gate if gate is not None else seed_idx,
            rules,
            codes,
            state.shape[0],
            k,
            HAS_GATE=gate is not None,
            NUM_STAGES=rules.shape[0],
            NUM_COLS=state.shape[1],
            COL_STAGE=columns["stage"],
            COL_EPOCHS=columns["epochs"],
            COL_GATE=columns["gate"],
            COL_EMBARGO=columns["embargo"],
            COL_READY=columns["ready"],
            BLOCK=UPDATE_BLOCK,
            DUP_BLOCK=DUP_BLOCK,
        )
    return codes


def lifecycle_tick(state: torch.Tensor, ready: torch.Tensor, columns: dict[str, int]) -> None:
    """Age every row one epoch, count its embargo down, and recompute ``READY_FLAG``."""
    if not state.is_contiguous():
        raise ValueError("state must be contiguous")
    n = state.shape[0]
    if n == 0:
        return
    with on_device(state.device):
        _tick_kernel[(triton.cdiv(n, TICK_BLOCK),)](
            state,
            ready,
            n,
            NUM_STAGES=ready.shape[0],
            NUM_COLS=state.shape[1],
            COL_STAGE=columns["stage"],
            COL_EPOCHS=columns["epochs"],
            COL_EMBARGO=columns["embargo"],
            COL_READY=columns["ready"],
            BLOCK=TICK_BLOCK,
        )
