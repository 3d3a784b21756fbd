"""Charging a seed's contained faults: at once, or, in a multi-rank run, at the step that charges
them on every rank (docs/design.md §6a, "In a multi-rank run").

``charge`` counts, logs and reports one fault and quarantines the seed at its fault limit. In one
process every fault is charged when it is found. In a multi-rank run a seed's fault count is
replicated state: the epoch sync checksums it (with the fault log), and a seed quarantined on
some ranks only gives the ranks different seed layouts, whose gradients every rank then drops
until the sync repairs. A fault the device flags carry (a non-finite output) is agreed in the
step's collective before it is charged. One found on the host (a kernel that raised, an output
of the wrong type, shape, dtype or device, a backward that raised, a probe's) is found on the
one rank whose data caused it: charged there at once, that rank's replica differed, the sync
"repaired" the fault away from the majority every epoch, and the seed never reached its fault
limit.

So while a run defers a state table's faults (``defer_faults``: ``DistributedKasmina`` does), a
seed's ``record_fault`` hands each such fault to the run's ``DeferredFaults`` instead of
charging it (``charge_or_defer``), and the next step's collective (``SeedGradientSync``) gathers
every rank's (``encode``) and charges them all on every rank (``charge_gathered``): seed by seed
in registry order, each rank's in rank order, with the reason it had where it was found. Every
rank counts, logs and quarantines alike, at the same step, as one process seeing every rank's
data would. A fault found outside a step (a validation forward under ``no_grad``, a G3 probe at
the epoch boundary) is charged by the next collective: the epoch sync's, before its commands
apply, or the next step's; one still held when the rank leaves the run is charged there
(``DeferredFaults.charge_here``).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from kasmina.ops.transforms import functorch_active
from kasmina.seeds.faults import FAULT_LOCK, FAULT_LOG_SIZE, FELL_BACK, log_fault, short_reason
from kasmina.seeds.recompute import reentrant_first_run
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import LEGAL_TRANSITIONS, TRAINING_STAGES, SeedStage
from kasmina.utils.ratelimit import rarely

logger = logging.getLogger(__name__)

__all__ = [
    "ChargedSeed",
    "DeferredFaults",
    "Held",
    "charge",
    "charge_gathered",
    "charge_or_defer",
    "contained",
    "defer_faults",
    "encode",
    "loses_step",
]

# Faults of a kernel's call in a forward (it raised, or its output could not stand in for the
# host's): that call passes the host through and gives the seed no gradient.
CALL_FAULTS = frozenset({"exception", "type", "shape", "dtype", "device"})


class ChargedSeed(Protocol):
    """A seed as its faults are charged (the seed module, without importing it)."""

    seed_id: str
    faults: int
    fault_log: deque[str]
    fault_limit: int
    state_table: GPUStateTensor

    @property
    def stage(self) -> SeedStage: ...

    def quarantine(self, reason: str = ...) -> bool: ...

    def record_fault(self, kind: str, reason: str) -> None: ...

    def transition_to(self, stage: SeedStage, gate: int | str | None = None) -> None: ...


def charge(seed: ChargedSeed, kind: str, reason: str) -> None:
    """Count, log and report one fault of ``seed`` now; quarantine it at its ``fault_limit``
    (an ACTIVE seed cannot be: it keeps falling back and counting)."""
    reason = short_reason(reason)
    # One count each and one quarantine, whichever threads fault at once, decided under the
    # lock; the event, the log and the transition (sinks, handlers, observers: user code)
    # after it. A sink that waits for the manager's lock while a step holding that lock
    # charges a fault deadlocked the two threads.
    with FAULT_LOCK:
        seed.faults += 1
        seed.fault_log.append(reason)
        count, stage, limit = seed.faults, seed.stage, seed.fault_limit
        quarantine = (
            count >= limit
            and SeedStage.QUARANTINE in LEGAL_TRANSITIONS[stage]
            and seed not in _QUARANTINING
        )
        if quarantine:  # a fault meanwhile on another thread finds it under way
            _QUARANTINING.add(seed)
    labels = {"seed_id": seed.seed_id, "kind": kind, "stage": stage.name}
    seed.state_table.report("seed.fault", labels)
    log_fault(seed.seed_id, count, limit, stage.name, kind, reason)
    if quarantine:
        try:
            seed.quarantine(f"{count} faults (limit {limit}), last: {reason}")
        finally:  # gone to QUARANTINE, or refused: the next fault tries again
            with FAULT_LOCK:
                _QUARANTINING.discard(seed)
    elif count == limit and SeedStage.QUARANTINE not in LEGAL_TRANSITIONS[stage]:
        logger.error(  # said once; the seed keeps falling back
            "seed %s: fault limit %d in %s: no quarantine (a gradient fault terminates it)",
            seed.seed_id, limit, stage.name,
        )  # fmt: skip


# The seeds whose quarantine a charge has decided and not yet finished (``FAULT_LOCK``).
# Emptied in a forked child: one under way on another thread at the fork never finishes there,
# and would keep that seed out of QUARANTINE in the child for good.
_QUARANTINING: set[ChargedSeed] = set()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_QUARANTINING.clear)


def loses_step(kind: str, stage: SeedStage) -> bool:
    """Whether a fault of ``kind`` found now in ``stage`` costs the seed its whole step, as a
    fallback on a non-finite output does: every gradient since the last poll dropped, the step
    skipped (``settle_nonfinite``). So do a backward that raised and a call that faulted in a
    training forward that records a graph (grad on, or a reentrant checkpoint's first run, whose
    recompute skips the call): kept, the other micro-batches of an accumulated step trained the
    seed and moved its alpha on part of it, where one batch of them all trains it on nothing. A
    forward without a graph (validation) keeps the step's gradients; so does a call under a
    ``torch.func`` transform, whose flags may be an ensemble's stacked buffers."""
    if kind in ("backward", FELL_BACK):
        return True
    if kind not in CALL_FAULTS or stage not in TRAINING_STAGES or functorch_active():
        return False
    return torch.is_grad_enabled() or reentrant_first_run()


_uncontained = itertools.count(1)  # charges that raised in ``contained`` (the log's count)


def contained(seed: ChargedSeed, kind: str, reason: str, *, found_here: bool = False) -> None:
    """Charge one fault of ``seed`` past a commit that must complete (a host's step): at once,
    or (``found_here``: found on this process's data) through ``seed.record_fault``, held for
    the next step in a multi-rank run. One that raises (a QUARANTINE the device refused) has
    counted the fault: logged at a bounded rate, never raised; its next fault tries again."""
    try:
        if found_here:
            seed.record_fault(kind, reason)
        else:
            charge(seed, kind, reason)
    except Exception as exc:
        n = next(_uncontained)
        logger.log(
            rarely(n, 100, logging.ERROR),
            "seed %s: charging its %s fault raised (%s: %s); its next fault tries again [%d]",
            seed.seed_id, kind, type(exc).__name__, exc, n, exc_info=n == 1,
        )  # fmt: skip


def terminated(seed: ChargedSeed) -> bool:
    """Whether ``seed`` (ACTIVE, at its fault limit: no QUARANTINE from there) went to
    TERMINATED, past a commit that must complete (a host's step). One that raises is logged at a
    bounded rate, never raised: the step's other seeds are still charged, and its next
    non-finite step tries again."""
    try:
        seed.transition_to(SeedStage.TERMINATED)
    except Exception as exc:
        n = next(_uncontained)
        logger.log(
            rarely(n, 100, logging.ERROR),
            "seed %s: terminating it at its fault limit raised (%s: %s); its next fault tries "
            "again [%d]", seed.seed_id, type(exc).__name__, exc, n, exc_info=n == 1,
        )  # fmt: skip
        return False
    return True


# A seed's faults held since the last step: how many, and the (kind, reason) of the newest
# FAULT_LOG_SIZE (its fault log keeps no more), so that what a rank sends stays small however
# many batches of a validation pass faulted.
Held = tuple[int, list[tuple[str, str]]]


class DeferredFaults:
    """One run's faults held for its next step, per seed (any thread: ``FAULT_LOCK``)."""

    def __init__(self) -> None:
        self._seeds: dict[str, ChargedSeed] = {}
        self._counts: dict[str, int] = {}
        self._kept: dict[str, deque[tuple[str, str]]] = {}

    def __bool__(self) -> bool:
        return bool(self._counts)

    def add(self, seed: ChargedSeed, kind: str, reason: str) -> None:
        with FAULT_LOCK:
            sid = seed.seed_id
            self._seeds[sid] = seed
            self._counts[sid] = self._counts.get(sid, 0) + 1
            self._kept.setdefault(sid, deque(maxlen=FAULT_LOG_SIZE)).append((kind, reason))

    def take(self) -> dict[str, Held]:
        """Every seed's held faults, no longer held (one found while the step's collective
        runs waits for the next step's)."""
        with FAULT_LOCK:
            held = {sid: (n, list(self._kept[sid])) for sid, n in self._counts.items()}
            self._counts, self._kept = {}, {}
        return held

    def charge_here(self, held: Mapping[str, Held] | None = None) -> None:
        """Charge ``held`` (default: everything held, taken) on this rank alone, as one process
        does: a rank that leaves the run, or a step whose ranks could not agree (their
        registries differ: the epoch sync repairs)."""
        held = self.take() if held is None else held
        for sid, (count, kept) in held.items():
            seed = self._seeds.get(sid)
            if seed is not None:
                _charge(seed, count, kept, "")


def encode(held: Mapping[str, Held]) -> bytes:
    """What one rank sends of ``held``: empty when nothing (the usual step), else JSON."""
    return json.dumps(held, separators=(",", ":")).encode() if held else b""


def charge_gathered(seeds: Mapping[str, ChargedSeed], sent: Sequence[bytes]) -> None:
    """Charge every rank's held faults, ``sent[rank]`` (``encode``), to ``seeds`` (the
    registry's, in its order, the same on every rank), each rank's in rank order, the rank
    named in each reason: every rank ends with the same counts, logs and stages."""
    found: list[dict[str, Held]] = [json.loads(raw) if raw else {} for raw in sent]
    for sid, seed in seeds.items():
        for rank, held in enumerate(found):
            if sid in held:
                count, kept = held[sid]
                _charge(seed, count, [(kind, why) for kind, why in kept], f"rank {rank}: ")


def _charge(seed: ChargedSeed, count: int, kept: list[tuple[str, str]], where: str) -> None:
    """Charge ``count`` faults, the last ``len(kept)`` with their kinds and reasons, the earlier
    ones (their reasons not kept) with the kind of the oldest kept."""
    for i in range(count - len(kept)):
        charge(seed, kept[0][0], f"{where}{i + 1} of {count} since a step (reason not kept)")
    for kind, reason in kept:
        charge(seed, kind, where + reason)


# The run each state table's seeds defer their faults to (``defer_faults``): a seed finds it
# through its table, so a seed germinated after the run began defers as well.
_DEFERRING: weakref.WeakKeyDictionary[GPUStateTensor, DeferredFaults] = weakref.WeakKeyDictionary()


def defer_faults(
    table: GPUStateTensor, faults: DeferredFaults | None, *, only: DeferredFaults | None = None
) -> None:
    """From now on the faults found on the host of ``table``'s seeds go to ``faults``; None:
    charged at once again (whoever held ``faults`` charges what it still holds). ``only``: do
    it only while the table defers to ``only`` (a run that left does not end the deferral of
    a run that joined the manager after it)."""
    with FAULT_LOCK:
        if only is not None and _DEFERRING.get(table) is not only:
            return
        if faults is None:
            _DEFERRING.pop(table, None)
        else:
            _DEFERRING[table] = faults


def charge_or_defer(seed: ChargedSeed, kind: str, reason: str) -> None:
    """Charge ``seed``'s fault now, or hold it for its run's next step (``defer_faults``)."""
    faults = _DEFERRING.get(seed.state_table) if _DEFERRING else None
    if faults is None:
        charge(seed, kind, reason)
    else:
        faults.add(seed, kind, reason)
