"""A slot reads, writes and deletes as the module it wraps (docs/design.md §6a).

:class:`HostForwarding` is ``KasminaLayer``'s base: an attribute the slot does not define is read
from its host, and what the host holds and the slot does not is assigned and deleted there, so
code for the bare module (``fc.weight``, weight tying, a resize's ``out_features``,
accelerate's ``remove_hook_from_module``) keeps working on the slot. The host's children are
replaced and deleted through the slot, by name (``block.act = nn.GELU()``, ``del block.drop``)
and a container host's (an ``nn.Sequential``'s) by index
(``model.classifier[-1] = nn.Linear(...)``), ``len`` and ``in`` are the host's, and a slot is
as true as its host; reading or iterating the children takes ``slot.host``. A reparametrization
aimed at the slot (pruning, ``weight_norm``, ``spectral_norm``, a parametrization) is refused
before it changes anything: it would take the host's tensor for the slot's; apply it to
``slot.host``."""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from kasmina.seeds.constants import CONSTANTS
from kasmina.seeds.outputs import FUSED_PATH_TENSORS, PACKING_TEST, SeedsLive, host_holds

__all__ = ["HostForwarding", "HostTensorError"]

# The one caller of a slot's ``parametrizations`` refused for a tensor the slot does not own
# (``_refuse_parametrization``), known by its code: torch passes the read nothing else. None
# if torch ever makes it no Python function: then nothing is refused (torch's own error).
_REGISTER_PARAMETRIZATION = getattr(
    inspect.unwrap(parametrize.register_parametrization), "__code__", None
)


class HostTensorError(ValueError, KeyError):
    """A reparametrization aimed at the slot took a name the host holds for the slot's own: a
    ``ValueError`` that is also the ``KeyError`` torch's lookup raised before (printed as its
    message: a ``KeyError`` prints its repr)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _host_tensors(host: nn.Module | None) -> dict[str, Tensor | None]:
    """The tensors ``host`` holds by name, which its slot reads through and does not own: its
    parameters and buffers, and its parametrized tensors (as their ``original``, None for a
    parametrization of several). The one test of "is this the host's tensor" for the
    refusals below (by name, or for pruning's ``register_parameter`` by identity)."""
    if host is None:
        return {}
    held: dict[str, Tensor | None] = {**host._parameters, **host._buffers}
    lists = host._modules.get("parametrizations")
    if isinstance(lists, nn.ModuleDict):
        held.update((name, getattr(each, "original", None)) for name, each in lists.items())
    return held


class SlotParameters(dict):  # type: ignore[type-arg]
    """A slot's ``_parameters``. torch's hook-based ``weight_norm`` and ``spectral_norm`` take
    the tensor they reparametrize out of the module's ``_parameters`` (``del``, ``[name]``),
    where a slot, which reads the host's ``weight`` through ``__getattr__``, holds none: a
    bare ``KeyError: 'weight'``. A name the host holds is refused (``HostTensorError``),
    nothing changed. Otherwise a dict: ``in`` and a held name's ``[name]`` run no Python code
    (``__missing__`` runs on a miss only, ``__delitem__`` on a ``del``)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.modules = modules  # the slot's ``_modules``, for its host (no cycle to the slot)

    def __missing__(self, name: str) -> Any:
        self._refuse_host_tensor(name)
        raise KeyError(name)

    def __delitem__(self, name: str) -> None:
        if name not in self:
            self._refuse_host_tensor(name)
        super().__delitem__(name)

    def _refuse_host_tensor(self, name: str) -> None:
        host = self.modules.get("host")
        if name in _host_tensors(host):
            raise HostTensorError(
                f"{name!r} is the host's ({type(host).__name__}) tensor, not the slot's "
                "(weight_norm or spectral_norm applied to the slot): apply it to slot.host"
            )


def _refuse_parametrization(slot: nn.Module, host: nn.Module) -> None:
    """Raise if torch's ``register_parametrization`` is registering on ``slot`` a tensor of
    ``host`` (``_host_tensors``) that the slot does not own. Each of its reads of
    ``slot.parametrizations`` comes here (``is_parametrized``'s first, before anything
    changed), whether the host has parametrizations or not: torch would otherwise claim the
    module "does not have" the ``weight`` that ``slot.weight`` reads, or append to the host's
    list through the slot. The call is recognised by its frame, the only place its
    ``module`` and ``tensor_name`` are (its first two arguments, whatever torch names them).
    Fail safe: where frames cannot be read, torch's function is no longer found there, or its
    arguments are not a module and a name, nothing is refused and torch's own error stands;
    every other read of ``slot.parametrizations`` is the host's, as before."""
    try:
        frame = sys._getframe(2)  # the caller of the slot's ``__getattr__``
    except (AttributeError, ValueError):  # a Python without frames; a stack not so deep
        return
    for _ in range(2):  # ``is_parametrized`` (through ``getattr``), or torch's function itself
        if frame is None or frame.f_code is _REGISTER_PARAMETRIZATION:
            break
        frame = frame.f_back
    if frame is None or frame.f_code is not _REGISTER_PARAMETRIZATION:
        return
    module, name = (frame.f_locals.get(arg) for arg in frame.f_code.co_varnames[:2])
    if module is not slot or not isinstance(name, str) or name not in _host_tensors(host):
        return
    if name not in slot.__dict__["_parameters"] and name not in slot.__dict__["_buffers"]:
        raise ValueError(
            f"{slot.layer_id}: {name!r} is the host's tensor, not the slot's (a "
            "parametrization applied to the slot): apply it to slot.host"
        )


def _owner(slot: nn.Module, name: str, value: Any = None) -> nn.Module | None:
    """The host when ``name`` is the host's to assign (to ``value``) or delete through ``slot``,
    else None: what the host holds (``outputs.host_holds``) and the slot neither holds nor
    defines on its type. One name both define goes to the host: ``forward`` given a method of
    the host, which a wrapper that patched the host's (accelerate's hooks) puts back through
    the slot; on the slot it would skip the slot at every call."""
    state = slot.__dict__
    host = state.get("_modules", {}).get("host")
    # A name deleted through the slot is the host's still: assigned again, it goes back there.
    if not host_holds(host, name, "_built" in state) and name not in state.get("_deleted", ()):
        return None
    if name in state["_parameters"] or name in state["_buffers"] or name in state:
        return None
    if name in state["_modules"]:  # the slot's own children (``host``, ``seeds``)
        return None
    if hasattr(type(slot), name) and getattr(value, "__self__", None) is not host:
        return None
    return host


class HostForwarding(nn.Module):
    """``__getattr__``, ``__setattr__``, ``__delattr__``, ``register_parameter``,
    ``register_buffer`` and ``add_module`` of a module whose ``_modules["host"]`` it wraps; from
    ``self.__dict__["_built"]`` on, the host's plain attributes (its class's too) and children
    are written and deleted there too, and buffers registered there. Its ``_parameters`` is a
    ``SlotParameters``."""

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["_parameters"] = SlotParameters(self.__dict__["_modules"])

    def __getattr__(self, name: str) -> Any:
        # nn.Module's lookup first; then the host's, so code for the bare module keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if name.startswith("__") or modules is None or "host" not in modules:
                raise
            if name == "parametrizations":  # (torch's ``register_parametrization`` reads it)
                _refuse_parametrization(self, modules["host"])
            value = getattr(modules["host"], name)
        if (  # only nn.TransformerEncoder's packing test sees the view (``outputs.SeedsLive``)
            name in FUSED_PATH_TENSORS
            and self.__dict__.get("_runs_any", False)
            and self.__dict__.get("_guards_fused_path", False)
            and isinstance(value, Tensor)
            and (torch.compiler.is_compiling() or sys._getframe(1).f_code is PACKING_TEST)
        ):
            return value.as_subclass(SeedsLive)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # What the host holds and the slot does not is assigned on the host, as it is read there:
        # weight tying (``lm_head.weight = wte.weight``), a resize's ``out_features``.
        if name == "_hf_hook" and name not in self.__dict__:
            self._hooked_by_accelerate()
        host = _owner(self, name, value)
        if host is not None:
            setattr(host, name, value)
            self.__dict__.get("_deleted", set()).discard(name)
            if name in host._modules:  # a child replaced (``block.act = nn.GELU()``)
                self._host_changed()
            return
        if name in CONSTANTS and name in self.__dict__.get("_buffers", ()):  # a loader's tensor
            self.__dict__["_constants_stale"] = True  # (``constants.constants_replaced``)
        super().__setattr__(name, value)

    def _hooked_by_accelerate(self) -> None:
        """accelerate's ``add_hook_to_module`` is hooking the slot itself (only it sets
        ``_hf_hook``; ``remove_hook_from_module`` deletes it): the hook and the forward it
        wraps are the slot's. Over a host hooked before ``attach`` it read the host's hook and
        unhooked ``_old_forward`` through the slot and kept them, so the slot's new forward
        called the host's bare one: the slot, its seeds and the host's own hook skipped at
        every call, silently. Now the slot's forward is the one wrapped (it calls the host,
        whose hook stays), and the hook is set on the slot (``_owner`` finds it there)."""
        state = self.__dict__
        if "_old_forward" not in state:
            state["_old_forward"] = object.__getattribute__(self, "forward")
        state["_hf_hook"] = None  # the slot's from now on; assigned by the caller next

    def __delattr__(self, name: str) -> None:
        # Deleted where ``__setattr__`` would assign it: ``hasattr(slot, name)`` was true while
        # ``del slot.name`` raised (accelerate's ``remove_hook_from_module`` stopped half-way).
        host = _owner(self, name)
        if host is not None:
            child = name in host._modules
            delattr(host, name)
            self.__dict__.setdefault("_deleted", set()).add(name)
            if child:
                self._host_changed()
            return
        super().__delattr__(name)

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        # Pruning aimed at the slot reads the host's tensor through it, then registers it here
        # under a second name (a state_dict key no fresh slot has): refused, nothing changed.
        held = _host_tensors(self.__dict__.get("_modules", {}).get("host")).values()
        if param is not None and any(param is tensor for tensor in held):
            raise ValueError(
                f"{self.layer_id}: {name!r} would register the host's own parameter on the slot "
                "(pruning or a parametrization applied to the slot): apply it to slot.host"
            )
        deleted = self.__dict__.get("_deleted", set())
        if name in deleted:  # the host's, deleted through the slot: registered again there
            self.__dict__["_modules"]["host"].register_parameter(name, param)
            deleted.discard(name)
            return
        super().register_parameter(name, param)

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        # Registered on the host, as on the bare module (a batch norm's statistics replaced,
        # a mask added): on the slot, a name the host holds raised KeyError through the read
        # forwarding, and a new one was a buffer the host's forward never saw and detach dropped.
        # The slot's own (its flags, registered before ``_built``) stay the slot's.
        state = self.__dict__
        host = state.get("_modules", {}).get("host")
        own = name in state["_buffers"] or name in state or hasattr(type(self), name)
        if host is not None and "_built" in state and not own:
            host.register_buffer(name, tensor, persistent)
            return
        super().register_buffer(name, tensor, persistent)

    def add_module(self, name: str, module: nn.Module | None) -> None:
        # What the host holds (a child replaced) goes there, as ``setattr`` does; so does
        # ``register_module``. A new name stays the slot's.
        host = _owner(self, name)
        if host is not None:
            host.add_module(name, module)
            self.__dict__.get("_deleted", set()).discard(name)
            self._host_changed()
            return
        super().add_module(name, module)

    # -- the host's container protocols (an nn.Sequential's), those that run no child: Python
    # looks them up on the type, never through ``__getattr__``. Each is the host's, its
    # TypeError included. ``slot[i]`` and ``iter(slot)`` are not: a parent that indexed or
    # iterated the container would call its children and skip the slot, its seeds never run.
    def __setitem__(self, key: Any, value: Any) -> None:
        self._modules["host"][key] = value
        self._host_changed()

    def __delitem__(self, key: Any) -> None:
        del self._modules["host"][key]
        self._host_changed()

    def __len__(self) -> int:
        return len(self._modules["host"])

    def __contains__(self, item: Any) -> bool:
        return item in self._modules["host"]

    def __bool__(self) -> bool:  # the host's: a Linear's slot is true (``__len__`` would raise)
        host = self.__dict__.get("_modules", {}).get("host")
        return True if host is None else bool(host)

    def _host_changed(self) -> None:
        """A part of the host was replaced or removed through the slot (``KasminaLayer``'s)."""
