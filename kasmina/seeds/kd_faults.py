"""A seed's or slot's KD loss, computed inside the host's forward, contained as a fault
(docs/design.md §6a, §7).

The loss is computed where the seeds run, in the user's forward: an exception out of it (an
allocation that failed, a kernel launch that raised) failed the user's training step, where
the seed's own kernel raising there is contained. So it is contained the same way: the call's
KD loss is skipped (none is kept for the KD backward), the failure is recorded against the
seeds it distils into, as a kernel's exception is (counted, logged, reported; at the seed's
fault limit, QUARANTINE), and the host's forward goes on with its output untouched.

Under activation checkpointing the loss is the region's first run's alone: its graph keeps the
tensors it saves past a non-reentrant checkpoint's saved-tensor hooks
(``side_effects.island_saves``), and a recompute computes none. Saved in the region, a first
run whose loss raised once (a transient error: an allocation) left its recompute, whose loss
did not, saving more tensors than the first run (a ``CheckpointError`` out of the host's
backward), and the KD backward, an engine call of its own, recomputed the whole region once
more (the host's side effects with it) to unpack them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from kasmina.kd.config import KDConfig
from kasmina.kd.loss import seed_kd_loss, slot_kd_loss
from kasmina.seeds.faults import CONTROL_FLOW, FaultRecorder, recomputing
from kasmina.seeds.recompute import checkpoint_region
from kasmina.seeds.side_effects import island_saves

__all__ = ["contained_kd_loss", "seed_kd_or_fault", "slot_kd_or_fault"]


def contained_kd_loss(
    compute: Callable[[], torch.Tensor],
    recorders: Callable[[], Iterable[FaultRecorder]],
    passes: tuple[type[BaseException], ...] = (),
) -> torch.Tensor | None:
    """``compute()``, its saved tensors kept past a non-reentrant checkpoint's hooks (as a
    kernel's before ACTIVE are: ``island_saves``), or None when it raised: each of
    ``recorders()`` (the distilling seeds', listed only then: not on every forward) records
    one fault of kind ``kd`` (charged as a kernel's exception is). None, not computed, in a
    forward inside a backward (an activation checkpoint's recompute: its first run took the
    loss). ``passes`` (and torch's control flow, ``CONTROL_FLOW``) raise as they are: a refusal
    of the arguments the caller handed this call."""
    if recomputing():
        return None
    region = checkpoint_region()[0] is not None  # (other hooks, save_on_cpu's, apply as they are)
    try:
        with island_saves(active=not region):
            return compute()
    except (*CONTROL_FLOW, *passes):
        raise
    except Exception as exc:  # the seed's KD term for this call is lost, never the host's step
        for record in recorders():
            record("kd", f"its KD loss raised {type(exc).__name__}: {exc}")
        return None


def seed_kd_or_fault(
    config: KDConfig, student: torch.Tensor, teacher: torch.Tensor, record: FaultRecorder
) -> torch.Tensor | None:
    """A stand-alone seed's ``seed_kd_loss``, or None after a fault given to ``record``. Logits
    that cannot teach (another shape, not dense floats) are a ``ValueError`` as before: the
    caller handed them to ``seed(x, teacher)`` itself, and no check ran before."""
    return contained_kd_loss(
        lambda: seed_kd_loss(config, student, teacher), lambda: (record,), (ValueError,)
    )


def slot_kd_or_fault(
    seeds: Sequence[Any], config: KDConfig, full: torch.Tensor,
    students: list[torch.Tensor | None], *args: Any,
) -> torch.Tensor | None:  # fmt: skip
    """A slot's ``slot_kd_loss(config, full, students, *args)``, or None after a fault recorded
    against each seed of ``seeds`` that distils (``students[k]`` not None). The slot checked
    the teacher's fit first (``teacher_fit_problem``), so any exception here is a failure."""
    return contained_kd_loss(
        lambda: slot_kd_loss(config, full, students, *args),
        lambda: [seeds[k].record_fault for k, s in enumerate(students) if s is not None],
    )
