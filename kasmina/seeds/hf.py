"""Hugging Face models: tied-weight names and output-recording hooks follow the slots.

While attached, a wrapped module's parameters appear under ``<name>.host.``. In a transformers
model the tied-weight names (``_tied_weights_keys``, ``all_tied_weights_keys``) follow them, so
``save_pretrained`` and ``tie_weights`` work.

transformers (5.x) records ``output_hidden_states``/``output_attentions`` with forward hooks that
``install_all_output_capturing_hooks`` puts, once per model (on the first forward that asks for
them), on every module whose class ``_can_record_outputs`` names (a decoder layer, an
attention). On a slotted module that hook would sit on ``slot.host`` and record the output
before the seeds apply; so every slotted host's hooks move to its slot, and an HF model gets its
hooks when a slot goes in (as its first recording forward would) so none lands there later.
``detach`` and ``kasmina.merge`` put both back (:func:`unslot`, :func:`sync`).

Everything here is a no-op for a model that holds no transformers ``PreTrainedModel``.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from kasmina.seeds.layer import KasminaLayer

__all__ = ["sync", "unslot"]

# The recording hooks moved off each host, for ``merge`` (which drops the slot) to put back.
_MOVED_HOOKS: weakref.WeakKeyDictionary[nn.Module, list[Callable[..., Any]]] = (
    weakref.WeakKeyDictionary()
)


def _pretrained_models(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every transformers ``PreTrainedModel`` in ``model`` (none without
    transformers imported: a model that has one imported it)."""
    modeling = sys.modules.get("transformers.modeling_utils")
    base = getattr(modeling, "PreTrainedModel", None)
    if base is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, base):
            yield name, module


def _is_capture_hook(hook: object) -> bool:
    return getattr(hook, "__module__", None) == "transformers.utils.output_capturing"


def _move_capture_hooks(source: nn.Module, target: nn.Module) -> list[Callable[..., Any]]:
    """Move transformers' output-recording forward hooks from ``source`` to ``target``."""
    moved = []
    for key, hook in list(source._forward_hooks.items()):
        if _is_capture_hook(hook) and key not in source._forward_hooks_with_kwargs:
            del source._forward_hooks[key]
            source._forward_hooks_always_called.pop(key, None)
            target.register_forward_hook(hook)
            moved.append(hook)
    return moved


def _install_capture_hooks(models: list[nn.Module]) -> None:
    """Install transformers' output-recording hooks as its first recording forward would, once:
    on each outermost HF model not yet marked as hooked, unless one inside it already is
    (installing on the outer one would then hook the inner one's modules twice; its other
    inner models are installed instead)."""
    try:
        from transformers.utils.output_capturing import install_all_output_capturing_hooks
    except ImportError:  # transformers 4.x: hooks are installed per forward, none to move
        return

    def hooked(module: nn.Module) -> bool:
        return bool(getattr(module, "_output_capturing_hooks_installed", False))

    inside = {id(m): [n for n in models if n is not m and _contains(m, n)] for m in models}
    done: set[int] = set()
    for module in models:  # outermost first (module order)
        if id(module) in done or hooked(module):
            done.update(id(n) for n in inside[id(module)])
            continue
        if not any(hooked(n) for n in inside[id(module)]):
            install_all_output_capturing_hooks(module)
            done.update(id(n) for n in inside[id(module)])


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def sync(model: nn.Module) -> None:
    """Make every HF model in ``model`` agree with its slots: output-recording hooks on each slot
    rather than its host (installed first if transformers has not yet), back on a host whose
    slot ``merge`` replaced; tied-weight names through ``.host.`` where a slot is, and back
    where it is gone. Nothing for a model without transformers' models in it."""
    models = list(_pretrained_models(model))
    if not models:
        return
    slots = [m for m in model.modules() if isinstance(m, KasminaLayer)]
    if slots:
        _install_capture_hooks([module for _, module in models])
    hosts = {id(slot.host) for slot in slots}
    for slot in slots:
        moved = _move_capture_hooks(slot.host, slot)
        if moved:
            _MOVED_HOOKS.setdefault(slot.host, []).extend(moved)
    for module in model.modules():
        if id(module) not in hosts and module in _MOVED_HOOKS:
            for hook in _MOVED_HOOKS.pop(module):
                module.register_forward_hook(hook)
    for _, module in models:
        _retie(module)


def _retie(model: nn.Module) -> None:
    """Point an HF model's tied-weight names at where its parameters are now: ``<slot>.host.``
    inside a slot, plain again once the slot is detached (a merged slot keeps ``.host``)."""
    slots = [n for n, m in model.named_modules() if n and isinstance(m, KasminaLayer)]

    def fix(key: str) -> str:
        for slot in slots:
            if key.startswith(slot + ".") and not key.startswith(slot + ".host."):
                return f"{slot}.host.{key[len(slot) + 1 :]}"
        start = key.find(".host.")
        while start > 0:
            try:
                module = model.get_submodule(key[:start])
            except AttributeError:
                module = None
            if module is not None and not hasattr(module, "host"):
                key = key[:start] + key[start + len(".host") :]
            start = key.find(".host.", start + 1)
        return key

    def fixed(mapping: dict[str, str]) -> dict[str, str]:
        return {fix(k): fix(v) if isinstance(v, str) else v for k, v in mapping.items()}

    declared = getattr(model, "_tied_weights_keys", None)
    if isinstance(declared, dict):
        renamed = fixed(declared)
        if renamed == getattr(type(model), "_tied_weights_keys", None):
            vars(model).pop("_tied_weights_keys", None)  # the class's own names again
        elif renamed != declared:
            model._tied_weights_keys = renamed
    expanded = getattr(model, "all_tied_weights_keys", None)
    if isinstance(expanded, dict):
        model.all_tied_weights_keys = fixed(expanded)


def unslot(slot: KasminaLayer) -> None:
    """``slot`` is being replaced by its host (``detach``): its recording hooks go back."""
    _MOVED_HOOKS.pop(slot.host, None)
    _move_capture_hooks(slot, slot.host)
