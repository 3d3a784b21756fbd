"""A slot's calls that its seeds, or their KD, sat out (``KasminaLayer.sat_out``): counted, and
logged at a bounded rate, as the seeds' faults are (``faults.log_fault``)."""

from __future__ import annotations

import logging
from collections import Counter

import torch

from kasmina.seeds.faults import FAULT_WARN_EVERY, recomputing
from kasmina.utils.ratelimit import rarely

logger = logging.getLogger(__name__)

__all__ = ["count_sat_out", "log_sat_out"]


_SAT_OUT_EFFECTS = {
    "seeds": "the host output stands",
    "kd_uncollected": "the next collect_kd_losses() sums it in; a skipped batch's: collect it "
    "and discard it",
}


def count_sat_out(
    counts: Counter[str],
    compiled: torch.Tensor,
    slot_id: str,
    what: str,
    reason: str,
    recompute: bool = False,
) -> None:
    """Count (and log rarely) a call a slot's seeds (``what="seeds"``) or their KD sat out. A
    checkpointing recompute is not counted (the region's first run was), unless ``recompute``
    says the sit-out is the recompute's own. In a compiled forward the count goes to
    ``compiled`` (``[seeds, KD]``, on the device), unlogged: a Python count there is a guard on
    its value, and every call recompiled."""
    if recomputing() and not recompute:
        return
    if torch.compiler.is_compiling():
        compiled[int(what != "seeds")].add_(1)
        return
    counts[what] += 1
    log_sat_out(slot_id, what, counts[what], reason)


def log_sat_out(slot_id: str, what: str, count: int, reason: str) -> None:
    """Log the ``count``-th call of a slot that its seeds (or their KD) sat out, as
    ``faults.log_fault`` does: the first and every ``FAULT_WARN_EVERY``-th at WARNING."""
    effect = _SAT_OUT_EFFECTS.get(what, "no KD loss from it")
    logger.log(
        rarely(count, FAULT_WARN_EVERY),
        "slot %s: %s sat out call %d (%s); %s",
        slot_id,
        what,
        count,
        reason,
        effect,
    )
