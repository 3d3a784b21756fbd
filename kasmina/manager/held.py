"""Whether a model still holds what its manager registered (``SlotRegistry.check_held``).

A manager steps the host parameters and runs the seeds of the slots it found in the model when
it registered it. The model is the user's, and between two steps a user may change it: move it
to another kind of device (``to_empty`` from ``meta``), ``load_state_dict(assign=True)``,
reparametrize a layer, replace a module (``model.fc = model.fc.host``), delete one
(``del model.fc``, ``model.layers.pop()``). After any of these the optimizers would step tensors
the model no longer uses, or the manager would list as stepped seeds that never run. So every
step starts with a check, and it must cost next to nothing when nothing changed:

- *replaced parameters*: one dictionary lookup of one host parameter where the model held it;
- *slots taken out*: one lookup per edge of the paths from the model to its slots (each edge
  once: a layer's slots share the path to it). A deletion fires no hook, so the edges are looked
  at every time; a broken edge costs a module walk, which either finds every slot still in the
  model (moved, wrapped) and takes the new paths, or names the slots that are gone;
- *anything registered*: PyTorch's global registration hooks count every module and parameter
  registered in the process; when the count moved since the last check, the module walk and a
  check of the model's trainable parameters against the optimizers' run once (new parameters
  over a registered one's memory, ``weight_norm``'s, are named as such: no group can add them).
  The manager's own registrations (a GERMINATE's kernel copy and graft, a CULL's kernel
  leaving, ``ModelHold.own``) do not move the count it was last checked against, when nothing
  else registered meanwhile: K of them queued for one safe point walk the model as often as one
  does, not K times;
- *unfrozen*: a parameter frozen when registered that requires a gradient now (gradual
  unfreezing by ``requires_grad_``) is a host parameter, and under the manager's host optimizer
  a step names one that no group holds (``check_unfrozen``: one ``requires_grad`` read per
  parameter frozen when registered, each step; about 50 ns each).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from kasmina.control.processes import check_supported_parallelism
from kasmina.utils.locks import fork_safe

__all__ = ["ModelHold", "watch_registrations"]

# Parameters and modules registered anywhere in this process since the first registry (a
# global hook counts them): a registry whose model may have changed looks only when it moved.
_REGISTRATIONS = [0]
_COUNTING = fork_safe(threading.Lock())
# This thread's count of the registrations made inside a ``ModelHold.own`` block (none: None).
_OWN = threading.local()

Edge = tuple[nn.Module, str, nn.Module]  # (parent, name, child): parent._modules[name] is child


def _count_registration(*_: Any) -> None:
    if not torch.compiler.is_compiling():  # traced, the count would be a guard: a recompile
        with _COUNTING:  # (``+=`` is no atomic step: a lost count could pass for ``own``'s)
            _REGISTRATIONS[0] += 1  # each time it moved (a compiled forward registers nothing)
        own = getattr(_OWN, "count", None)
        if own is not None:
            own[0] += 1


def watch_registrations() -> int:
    """Install the counting hooks (once per process); the count now."""
    if not _REGISTRATIONS[0]:
        _REGISTRATIONS[0] = 1
        nn.modules.module.register_module_parameter_registration_hook(_count_registration)
        nn.modules.module.register_module_module_registration_hook(_count_registration)
    return _REGISTRATIONS[0]


def _same_layout(a: object, b: object) -> bool:
    """Two ``(param_groups, count)`` layouts: the same list object, as many groups."""
    return isinstance(a, tuple) and isinstance(b, tuple) and a[0] is b[0] and a[1] == b[1]


def _has_memory(p: torch.Tensor) -> bool:
    return p.numel() > 0 and p.device.type != "meta"


def _edges(model: nn.Module, slots: Iterable[nn.Module]) -> tuple[Edge, ...]:
    """The edges of the paths from ``model`` to each of ``slots`` (all held by it), each once."""
    names = {id(m): name for name, m in model.named_modules()}  # each module's first path
    edges: dict[tuple[int, str], Edge] = {}
    for slot in slots:
        parent = model
        for part in names[id(slot)].split(".") if names[id(slot)] else ():
            child = parent._modules[part]
            assert child is not None  # named_modules skips empty entries
            edges[(id(parent), part)] = (parent, part, child)
            parent = child
    return tuple(edges.values())


class ModelHold:
    """What ``model`` held when registered with ``slots`` (by name): one host parameter where
    it held it (the ``anchor``), all its parameters outside the seeds (``seed_ids``), the paths
    to the slots, and the registration count they were last checked against."""

    def __init__(self, model: nn.Module, slots: dict[str, nn.Module], seed_ids: set[int]) -> None:
        self.model = model
        self.slots = dict(slots)
        held = next((np for np in model.named_parameters() if id(np[1]) not in seed_ids), None)
        self.anchor: tuple[nn.Module, str, nn.Parameter] | None = None  # None: no parameter
        if held is not None:
            owner, _, leaf = held[0].rpartition(".")
            self.anchor = (model.get_submodule(owner), leaf, held[1])
        self.params = {id(p): p for p in model.parameters() if id(p) not in seed_ids}
        # Frozen when registered: one unfrozen since (gradual unfreezing) is a host parameter
        # from then on (``unfrozen``), which the host's optimizer must hold (``check``).
        self.frozen = [p for p in self.params.values() if not p.requires_grad]
        self._held: set[int] = set()  # unfrozen ones found held (``check_unfrozen``), and
        self._held_layout: object = None  # the host optimizer's layout they were found in
        self.edges = _edges(model, self.slots.values())
        self.checked_at = watch_registrations()

    def check(
        self, detached: Sequence[str], known: Callable[[], set[int]] | None, host: bool = True
    ) -> None:
        """``RuntimeError`` if the model no longer holds what was registered. ``detached``:
        the slots a ``detach``/``merge`` flagged; ``known()``: the ids of every parameter
        stepped, by an optimizer or, without the manager's host optimizer (``host`` False), by
        the trainer (None: no parameter is checked)."""
        moved = _REGISTRATIONS[0] != self.checked_at
        gone = list(detached)
        if not gone and (moved or any(p._modules.get(n) is not c for p, n, c in self.edges)):
            held = {id(module) for module in self.model.modules()}
            gone = [name for name, slot in self.slots.items() if id(slot) not in held]
            if not gone:  # moved or wrapped, still in the model: its new paths from now on
                self.edges = _edges(self.model, self.slots.values())
        if gone:
            raise RuntimeError(
                f"slot(s) {gone} were taken out of the model (kasmina.detach, merge, or replaced "
                "or deleted in it) after the manager registered them; this manager can no "
                "longer step it. Attach again with a new manager"
            )
        self._check_anchor()
        if moved:
            self._check_registered(known, host)

    @contextmanager
    def own(self) -> Iterator[None]:
        """A block in which the manager registers modules itself (a GERMINATE copies its kernel
        and grafts it: the kernel's parameters are its seed optimizer's). If the count was
        checked when it began and every registration since came from the block, on this
        thread, the count at its end counts as checked: the next ``check`` walks nothing for
        them. One registered by another thread meanwhile, or before the block and not checked
        yet (a user's change), leaves the count moved, and the next ``check`` walks."""
        before, mine, outer = _REGISTRATIONS[0], [0], getattr(_OWN, "count", None)
        _OWN.count = mine
        try:
            yield
        finally:
            _OWN.count = outer
            if outer is not None:
                outer[0] += mine[0]
            if self.checked_at == before and _REGISTRATIONS[0] == before + mine[0]:
                self.checked_at = _REGISTRATIONS[0]

    def recheck(self) -> None:
        """Make the next ``check`` look for unheld parameters whatever the registration count:
        the host's groups were rebuilt (a rollback), and a parameter registered since (a layer
        replaced, then added with ``add_param_group``) may be in none of them now."""
        self.checked_at = -1

    def check_unfrozen(self, held: Callable[[], set[int]], layout: object) -> None:
        """``RuntimeError`` naming the parameters frozen when registered and trainable now that
        the host optimizer does not step (``held()``: the ids it steps beyond its first group,
        whose ``layout``, ``(param_groups, len)``, names it; a step's check under the manager's
        host optimizer; an edit inside a group of the same size goes unseen, as it does by
        ``take_host_groups``). Cost: one ``requires_grad`` read per parameter frozen when
        registered; ``held()`` only for one unfrozen not found held under this layout before."""
        unfrozen = self.unfrozen()
        if not unfrozen:
            return
        if not _same_layout(layout, self._held_layout):
            self._held_layout, self._held = layout, set()
        if all(id(p) in self._held for p in unfrozen):
            return
        stepped = held()
        missed = [p for p in unfrozen if id(p) not in stepped]
        self._held = {id(p) for p in unfrozen if id(p) in stepped}
        if missed:
            raise RuntimeError(
                f"the model's parameters {self.names(missed)} were frozen when the manager "
                "registered it and now require a gradient, but no optimizer steps them: their "
                "gradients would pile up, never applied. Add them to the host optimizer "
                "(manager.optimizers.optimizer('host').add_param_group) or freeze them again"
            )

    def _over_registered(self, new: list[tuple[str, nn.Parameter]]) -> list[str]:
        """The names among ``new`` whose memory is a registered parameter's that the model no
        longer holds (``weight_norm``'s ``original1`` is the old weight's storage)."""
        held = {id(p) for p in self.model.parameters()}
        dropped = [p for i, p in self.params.items() if i not in held and _has_memory(p)]
        storages = {p.untyped_storage().data_ptr() for p in dropped}
        return [
            name for name, p in new if _has_memory(p) and p.untyped_storage().data_ptr() in storages
        ]

    def unfrozen(self) -> list[nn.Parameter]:
        """The parameters frozen when registered that require a gradient now (mostly none)."""
        return [p for p in self.frozen if p.requires_grad]

    def restore_unfrozen(
        self, saved: Sequence[torch.Tensor] | None, held: Container[int]
    ) -> list[str]:
        """After a rollback under the manager's host optimizer: each parameter frozen when
        registered trains exactly when the restored host groups hold it (``held``, ids) and
        the checkpoint recorded it training (``saved``; an older checkpoint recorded none: as
        it trains now). One unfrozen that no group held (its group was to come) is frozen
        again, as a step would refuse it. Returns the names of those whose flag changed.
        ``requires_grad_`` on a leaf: cannot fail."""
        wanted = {id(p) for p in (self.unfrozen() if saved is None else saved)}
        changed = [p for p in self.frozen if (id(p) in held and id(p) in wanted) != p.requires_grad]
        for p in changed:
            p.requires_grad_(not p.requires_grad)
        self._held_layout = None
        return self.names(changed)

    def names(self, params: Sequence[torch.Tensor], limit: int | None = 8) -> list[str]:
        """The model's names of ``params`` (the first ``limit``: for messages)."""
        wanted = {id(p) for p in params}
        return [name for name, p in self.model.named_parameters() if id(p) in wanted][:limit]

    def _check_anchor(self) -> None:
        """``RuntimeError`` if the model's first host parameter is not where it was: a move to a
        device of another tensor type or ``load_state_dict(assign=True)`` put new parameter
        objects in the model, and the optimizers would go on stepping the old ones."""
        if self.anchor is None:
            return
        module, name, param = self.anchor
        held = module._parameters.get(name)
        if held is not param and parametrize.is_parametrized(module, name):
            # A parametrization (``spectral_norm``, ``orthogonal``) moves the parameter object
            # itself under ``parametrizations``; one that splits it (``weight_norm``'s
            # ``original0/1``) leaves it nowhere, and the optimizers would step a dead tensor.
            held = getattr(module.parametrizations[name], "original", None)
        if held is not param and any(p is param for p in module._parameters.values()):
            held = param  # renamed where it is (``torch.nn.utils.prune``: ``weight_orig``)
        if held is not param:
            check_supported_parallelism(self.model)  # sharded since (``fully_shard``): said so
            raise RuntimeError(
                "the model's parameters were replaced after the manager registered them (a "
                "move to another kind of device, load_state_dict(assign=True), or a "
                "reparametrization that makes new ones: torch.nn.utils.weight_norm); its "
                "optimizers hold the old ones. Move, load or reparametrize the model before attach"
            )

    def _check_registered(self, known: Callable[[], set[int]] | None, host: bool) -> None:
        """``RuntimeError`` naming the model's trainable parameters that neither the model held
        when registered nor an optimizer steps: a module replaced (``model.fc = ...``),
        ``weight_norm``/``parametrize`` or ``load_state_dict(assign=True)`` on one layer after
        attach. Nothing would step them (the anchor's check misses these). Runs once per change
        of the process-wide registration count not the manager's own (``own``)."""
        count = _REGISTRATIONS[0]
        if known is not None:
            registered = self.params
            new = [(n, p) for n, p in self.model.named_parameters() if id(p) not in registered]
            stepped = known()
            unknown = [name for name, p in new if p.requires_grad and id(p) not in stepped]
            if host and (over := self._over_registered(new)):  # (else the trainer's memory)
                raise RuntimeError(
                    f"the model holds parameters {(unknown or over)[:8]} that it did not hold "
                    f"when the manager registered it, and {over[:8]} share the memory of ones it "
                    "held then, which the optimizers still step (weight_norm or another "
                    "reparametrization of a layer after attach): adding them would step that "
                    "memory twice. Reparametrize the model before attach"
                )
            if unknown:
                raise RuntimeError(
                    f"the model holds trainable parameters {unknown[:8]} that it did not hold "
                    "when the manager registered it and no optimizer steps (a module replaced, "
                    "or weight_norm, parametrize or load_state_dict(assign=True) on a layer "
                    "after attach): they would never train. Make such changes before attach, "
                    "or add them to the host optimizer (add_param_group); a seed's kernel is its "
                    "own optimizer's: load into it without assign=True"
                )
        self.checked_at = count
