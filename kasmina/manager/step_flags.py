"""The step's device flags, read and settled as ``manager.step()`` starts (docs/design.md §4, §6a).

Every verdict of a step stays on the device until the step reads them all in one transfer: the
seed-only backwards' leak flags (the guard's) and each running seed's ``SEED_FLAGS`` (its
outputs fell back, a fault, a compiled backward's cut; isolated, that flag is a non-finite
gradient from above, a lost step). The isolation verdict is checked, agreed across ranks with the
seeds' gradients and flags (the gradient sync's collective, every rank, every step), and carried
into the guard's next step; then each seed still running settles its flags (a fallen-back seed's
gradient dropped unless the ranks averaged it).
"""

from __future__ import annotations

from kasmina.manager.grad_sync import GradSync
from kasmina.manager.guard import IsolationGuard
from kasmina.manager.slots import SlotRegistry
from kasmina.seeds.compiled_cut import settled_flags
from kasmina.seeds.constants import SEED_FLAGS
from kasmina.stages import RUNS_KERNEL
from kasmina.utils.flags import read_flags

__all__ = ["settle_step_flags"]


def settle_step_flags(
    guard: IsolationGuard, registry: SlotRegistry, sync: GradSync | None
) -> tuple[bool, bool, list[str], list[str]]:
    """``(clean, shared, cut, nonfinite)``: the step's isolation verdict as the ranks agreed it;
    whether the ranks averaged the seeds' gradients; the seeds whose compiled backward cut a
    non-finite input gradient (judged after the norms, so not charged here); the seeds whose
    outputs fell back or faulted (their gradient dropped unless ``shared``). A seed the check
    quarantined is no longer running: its flags are not settled."""
    polled = [r for r in registry.in_stages(RUNS_KERNEL) if r.kernel is not None]
    kd_flags, running = guard.kd_flags(), [r.seed for r in polled]
    values = read_flags([*kd_flags, *(s._buffers[f] for f in SEED_FLAGS for s in running)])
    read = values[len(kd_flags) :]
    flags = {  # isolated, a compiled backward's cut flag is a lost step (``settled_flags``), as
        # the stage the backward ran in has it (before the check can quarantine the seed)
        r.seed_id: settled_flags(read[i :: len(running)], r)
        for i, r in enumerate(polled)
    }
    clean = guard.check(registry, values[: len(kd_flags)])  # this rank's verdict
    # A collective, every rank, every step: seed grads averaged (or not; none sent by a seed
    # that fell back here), the verdict and the seeds' flags agreed.
    shared, clean = (False, clean) if sync is None else sync(clean, flags)
    guard.end_step(registry, clean)
    polled = [r for r in polled if r.stage in RUNS_KERNEL]  # not one the check quarantined
    cut = [r.seed_id for r in polled if flags[r.seed_id][2] and not flags[r.seed_id][1]]
    kw = {"drop_gradient": not shared, "charge_cut": False}  # a cut: judged after the norms
    nonfinite = [r.seed_id for r in polled if r.seed.settle_nonfinite(*flags[r.seed_id], **kw)]
    return clean, shared, cut, nonfinite
