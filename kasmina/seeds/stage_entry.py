"""A seed's own reaction to a transition of its row (the table's observer of it: ``enter``), and
the completion of the part of it that failed (``settle``) (docs/design.md §3, "Commit points").

The table calls ``enter`` once it applied the transition, which stands whatever follows. The
seed's host state for the new stage is set first, plain assignments that cannot fail: G2's count,
the probe, GRAFTING's step, RECYCLING's fault count and log, the scores, the field report, the
alpha it holds. What it writes to its device and to the table's row follows (``settle``): its
alpha buffer and ALPHA_BLEND, GATE_SCORE outside the contributing stages, RECYCLING's blueprint
and fault flags (QUARANTINE's flags too), HARVESTING's kernel detached. Those may fail (an
out-of-memory, a device error). Raised, the table logged the failure and dropped it: a seed in
STABILIZATION kept its last GRAFTING alpha (in its buffer or in ALPHA_BLEND, whichever write
failed), and a recycled seed its faults and flags, charged to its next kernel. So one that
fails is kept instead: the seed names the stage (``unsettled``), the failure is logged at a
bounded rate (counted in its line), and ``settle`` writes again what the host state holds,
which is idempotent while the seed stays in that stage. Its owner completes it (a manager at
its next safe point, as any transition's effect: ``kasmina.manager.post_commit``); a seed with
no owner keeps it until ``settle_stage()`` is called. Only a user's observer raises to the
table.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Protocol

import torch
from torch import nn

from kasmina.seeds.constants import reset_flags
from kasmina.seeds.extra_state import BookkeptSeed, field_report
from kasmina.stages import CONTRIBUTING_STAGES, RUNS_KERNEL, SeedStage
from kasmina.utils.ratelimit import rarely

logger = logging.getLogger(__name__)

__all__ = ["EnteringSeed", "enter", "settle"]


class EnteringSeed(BookkeptSeed, Protocol):
    """A seed as its stage entry resets and writes it (the seed module, without importing it:
    the seed calls ``enter`` and ``settle``)."""

    probe_result: Any
    field_report: dict[str, Any] | None
    evaluation: Any
    unsettled: SeedStage | None  # the stage whose entry's writes are still to complete
    _buffers: dict[str, torch.Tensor]  # its ``SEED_FLAGS`` among them (``reset_flags``)
    alpha: torch.Tensor
    _kd_losses: list[torch.Tensor]
    _gate_score: float
    _alpha_value: float

    def detach_kernel(self) -> nn.Module | None: ...


S = SeedStage
_failures = itertools.count(1)  # entries whose writes failed, in this process (the log's count)


def _alpha_of(stage: SeedStage) -> float | None:
    """The alpha a seed takes as it enters ``stage`` (None: it keeps its own)."""
    if stage == S.GRAFTING:  # step 0 of the schedule (a manager writes the schedule's own)
        return 0.0
    if stage in (S.STABILIZATION, S.ACTIVE):
        return 1.0
    if stage not in CONTRIBUTING_STAGES and stage not in RUNS_KERNEL:  # its forward is the host's
        return 0.0
    return None


def enter(seed: EnteringSeed, old: SeedStage, new: SeedStage) -> None:
    """``seed`` entered ``new`` from ``old``: its host state, then its writes (``settle``); a
    write that fails is kept (``seed.unsettled``), logged, never raised."""
    seed.probe_result = None  # G3's evidence is read in COMPATIBILITY_CHECK only
    if new in (S.ISOLATED_INIT, S.RECYCLING):  # G2 counts from the entry
        seed.trained_epochs, seed.trained_this_epoch = 0, False
    if new == S.HARVESTING:  # before its scores and alpha are reset
        seed.field_report = field_report(seed, old)
    elif new == S.GRAFTING:
        seed.graft_step = 0
    elif new == S.RECYCLING:
        seed.graft_step, seed.field_report = 0, None  # the culled one's: the manager logs it
        seed.isolation_violations = seed.nonfinite_events = seed.faults = 0
        seed.fault_log.clear()
        seed._kd_losses.clear()
    if new not in CONTRIBUTING_STAGES:  # its forward is the host's (QUARANTINE's too):
        seed._gate_score, seed.evaluation = 0.0, None  # nothing measured or scored
    alpha = _alpha_of(new)
    if alpha is not None:
        seed._alpha_value = alpha
    seed.unsettled = new
    try:
        settle(seed)
    except Exception as exc:  # the transition stands: its writes are completed later
        n = next(_failures)
        logger.log(
            rarely(n, 100, logging.ERROR),
            "seed %s: entering %s, a write failed (%s: %s); kept for its owner to complete "
            "[%d]", seed.seed_id, new.name, type(exc).__name__, exc, n, exc_info=n == 1,
        )  # fmt: skip


def settle(seed: EnteringSeed) -> None:
    """Write what ``seed``'s host state holds for the stage it entered (``unsettled``) to its
    device and the table's row; nothing once it left that stage (the next one's entry wrote
    its own). Idempotent; ``unsettled`` is cleared once every write went through."""
    stage = seed.unsettled
    if stage is None or stage != seed.stage:
        seed.unsettled = None
        return
    table, row = seed.state_table, seed.state_index
    if stage in (S.RECYCLING, S.DORMANT, S.QUARANTINE):  # its faults' flags, gone: no step
        # polls a quarantined seed, and a ROLLBACK to before it (which restores no flag) dropped
        # the next step's gradient and reported it fallen back for a fault of the abandoned one.
        reset_flags(seed._buffers)
    if stage in (S.RECYCLING, S.DORMANT):  # the culled artifact's, gone
        # DORMANT, entered from RECYCLING only, is its clean slate: a RECYCLING entry left
        # unsettled is completed there, not dropped as moot (its next kernel charged for them).
        table.set_blueprint(row, "")
    elif stage == S.HARVESTING and seed.kernel is not None:
        seed.detach_kernel()
    if stage not in CONTRIBUTING_STAGES:
        table.set_gate_score(row, 0.0)
    if _alpha_of(stage) is not None:
        seed.alpha.fill_(seed._alpha_value)
        table.set_alpha(row, seed._alpha_value)
    seed.unsettled = None
