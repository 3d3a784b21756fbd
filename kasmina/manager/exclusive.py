"""One manager per model (docs/design.md §5 'Close'): the live managers' registries, and what a
new registration may not share with them (``check_unshared``) or a teacher loaded in place may
not be or share (``unfit_for_teacher``, for ``check_unmanaged``).

Why by memory as well as by identity: ``nn.Parameter(host.weight.data)`` is a new parameter
object over the host's storage. A model holding one passed a check of parameter objects, and
both managers' host optimizers then stepped the same bytes: one manager's ``step()`` moved the
other's weights. The byte-range test is ``ByteRanges``, the one §4 refuses the same overlap
with inside one manager; it runs at registration and at an in-place teacher's load only (one pass
over the new model's parameters and the live hosts'), never per step.

Why a ``Claim`` apart from the registry: ``register`` returns the registry, and a notebook keeps
it (``Out``/``_``, a variable) after its manager is dropped. The claim (its place in ``LIVE``, the
table's owner of its rows) is kept by the manager's part (``keep``), so it goes when the manager
is collected, whoever still holds the registry.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Sequence
from typing import Protocol

from torch import nn

from kasmina.kd.holds import add_in_place_check
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.observers import TransitionObserver
from kasmina.stages import SeedStage
from kasmina.utils.memory import ByteRanges

__all__ = [
    "LIVE",
    "Claim",
    "after_collection",
    "check_unmanaged",
    "check_unshared",
    "keep",
    "managed",
    "release",
    "unfit_for_teacher",
]


class Registered(Protocol):
    """What is read of a live manager's registry (a ``SlotRegistry``)."""

    model: nn.Module

    def all_host_params(self) -> list[nn.Parameter]: ...


LIVE: weakref.WeakSet[Registered] = weakref.WeakSet()  # live managers' (close() drops one)


class Claim:
    """A registry's hold on its model while its manager lives: its entry in ``LIVE`` and the
    owner of its seeds' table rows (``on_transition``, which the table holds weakly: ``owned``).
    Held by its keeper only (``keep``), it holds its registry, never the other way round."""

    def __init__(self, registry: Registered, observer: TransitionObserver) -> None:
        self.registry, self.model, self._observer = registry, registry.model, observer

    def all_host_params(self) -> list[nn.Parameter]:
        return self.registry.all_host_params()

    def on_transition(self, idx: int, old: SeedStage, new: SeedStage) -> None:
        self._observer(idx, old, new)


# keeper -> the claims it keeps, the keeper held weakly: a claim goes when its keeper is collected.
_KEPT: weakref.WeakKeyDictionary[object, list[Claim]] = weakref.WeakKeyDictionary()


def keep(claim: Claim, keeper: object | None) -> weakref.ref[Claim]:
    """Let ``keeper`` (a manager's part; None: the registry keeps it itself) keep ``claim``, and
    enter it in ``LIVE``; a weak reference to it, for its registry."""
    if keeper is not None:  # (never the registry here: its claim holds it, so it would live on)
        _KEPT.setdefault(keeper, []).append(claim)
    LIVE.add(claim)
    return weakref.ref(claim)


def release(claim: Claim) -> None:
    """Take ``claim`` out of ``LIVE`` and from its keeper (its registry's close)."""
    LIVE.discard(claim)
    for claims in list(_KEPT.values()):
        if claim in claims:
            claims.remove(claim)


def managed(model: nn.Module) -> str | None:
    """How a live manager holds ``model`` (a slot of it, or a parameter its host steps), or None."""
    for layer in (m for m in model.modules() if isinstance(m, KasminaLayer)):
        if any(layer.state_table.owned(seed.state_index) for seed in layer.seeds):
            return f"slot {layer.layer_id!r} of this model is managed by another manager"
    params = {id(p) for p in model.parameters()}  # inside its model, around it, or sharing a layer
    if any(id(p) in params for other in list(LIVE) for p in other.all_host_params()):
        return "parameters of this model are a host another manager steps"
    return None


def _over_another_host(model: nn.Module, *, written: bool = False) -> bool:
    """Whether ``model`` and a live manager's model share bytes that either side trains: a
    parameter of ``model`` (frozen too) over one that manager's host steps (unfrozen or added
    since its registration too), or a trainable one of ``model`` over any of that model's
    (frozen too: its manager restores them from its own checkpoints). Either model may come
    first: the rule is the same both ways. ``written``: every parameter of ``model`` counts as
    trainable (an in-place teacher's: its checkpoint load writes them, its cast swaps them)."""
    others = list(LIVE)
    trained = ByteRanges(("trained", p) for other in others for p in other.all_host_params())
    held = ByteRanges(("held", p) for other in others for p in other.model.parameters())
    return any(
        trained.overlap(p) is not None
        or ((written or p.requires_grad) and held.overlap(p) is not None)
        for p in model.parameters()
    )


def unfit_for_teacher(model: nn.Module) -> str | None:
    """Why ``model`` cannot be a teacher in place beside the live managers (this one's too), or
    None: a live manager manages it (``managed``), or it shares bytes with any parameter of a
    live manager's model (``nn.Parameter(host.weight.data)``: the host's steps moved the
    teacher, and the teacher's checkpoint load wrote the host's weights)."""
    if managed(model) is not None:
        return "a live manager manages this model"
    if _over_another_host(model, written=True):
        return "parameters of this model share memory with a model a live manager holds"
    return None


def after_collection(problem: Callable[[], str | None]) -> str | None:
    """``problem()``, asked again after one garbage collection when it finds one: a manager
    dropped without ``close()`` lets go only when collected."""
    found = problem()
    if found is not None:
        gc.collect()
        found = problem()
    return found


def _shared_with_another_manager(model: nn.Module, slots: Sequence[KasminaLayer]) -> str | None:
    """Why ``model`` and ``slots`` cannot be registered beside the live managers, or None: a slot
    not in ``model``; ``model`` held by another (``managed``), or over its host's memory; a slot
    inside another manager's model, or with none yet ``model`` itself (its GERMINATEs would grow
    parameters there the other never steps)."""
    modules = {id(m) for m in model.modules()}
    outside = [slot.layer_id for slot in slots if id(slot) not in modules]
    if outside:
        return f"slot(s) {outside} are not modules of the model registered with them"
    held = managed(model)
    if held is not None:
        return held
    if _over_another_host(model):
        return "parameters of this model share memory with a host another manager steps"
    theirs = {id(m) for other in list(LIVE) for m in other.model.modules()}
    if any(id(slot) in theirs for slot in slots):
        return "slots of this model lie inside a model another manager steps"
    if id(model) in theirs:  # no slots yet (``attach``'s check): they would lie there too
        return "this model lies inside a model another manager steps"
    return None


def check_unshared(model: nn.Module, slots: Sequence[KasminaLayer]) -> None:
    """``ValueError``, before anything changes, if ``model`` and ``slots`` cannot be registered
    beside the live managers (``_shared_with_another_manager``). No ``slots``: ``model`` alone,
    asked before ``attach`` wraps a layer of it, which would be another live manager's."""
    problem = after_collection(lambda: _shared_with_another_manager(model, slots))
    if problem is not None:
        raise ValueError(f"{problem}: one manager per model (close the other first)")


def check_unmanaged(model: nn.Module) -> None:
    """``ValueError`` if a live manager holds ``model`` or its memory (``unfit_for_teacher``): a
    teacher loaded in place (``load_teacher(copy_model=False)``) is frozen and cast, and that
    manager's training stops, or moves the teacher. Every teacher built in place runs it, a
    manager's or one built directly (``CheckpointedTeacher``, which cannot import this package:
    ``kd.holds.add_in_place_check``, below); a live manager means this module was imported."""
    problem = after_collection(lambda: unfit_for_teacher(model))
    if problem is not None:
        raise ValueError(
            f"{problem}: a teacher loaded with copy_model=False is frozen in place. Pass "
            "copy_model=True (the default), or close that manager first"
        )


add_in_place_check(check_unmanaged)
