"""Hugging Face models: tied-weight names and output-recording hooks follow the slots.

While attached, a wrapped module's parameters appear under ``<name>.host.``. In a transformers
model the tied-weight names (``_tied_weights_keys``, ``all_tied_weights_keys``) follow them, so
``save_pretrained`` and ``tie_weights`` work.

transformers (5.x) records ``output_hidden_states``/``output_attentions`` with forward hooks that
``install_all_output_capturing_hooks`` puts, once per model (on the first forward that asks for
them), on every module whose class ``_can_record_outputs`` names (a decoder layer, an
attention). On a slotted module that hook would sit on ``slot.host`` and record the output
before the seeds apply; so every slotted host's hooks move to its slot: those installed before
a slot goes in at once, the others by a forward pre-hook that installs them itself on the
first forward asking for them (so even that forward records the slots' outputs). Installing
them at ``attach`` instead would make the model unpicklable (transformers' hooks are local
closures) before anyone asked for them. ``detach`` and ``kasmina.merge`` move them to what
replaces the slot (:func:`unslot`).

Everything here is a no-op for a model that holds no transformers ``PreTrainedModel``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from kasmina.seeds.layer import KasminaLayer

__all__ = ["sync", "unslot"]


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


def _records_outputs(module: nn.Module) -> bool:
    """Whether ``module``'s forward is the one transformers wraps to record outputs (it installs
    the recording hooks on that model, on the first forward that asks for them)."""
    forward = type(module).forward
    while forward is not None:  # through every decorator (``functools.wraps`` chains them)
        code = getattr(forward, "__code__", None)
        if code is not None and code.co_filename.endswith(_RECORDER_FILE):
            return True
        forward = getattr(forward, "__wrapped__", None)
    return False


_RECORDER_FILE = os.path.join("transformers", "utils", "output_capturing.py")
_OUTPUTS = ("output_hidden_states", "output_attentions")


def _before_forward(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """A forward pre-hook on an HF model that records outputs: on the first forward that asks
    for them, install transformers' recording hooks first (as the forward itself would, a
    moment later; it then finds them installed) and move those of slotted hosts to their slots,
    so that even the first recording forward records the slots' outputs."""
    if vars(model).get("_kasmina_hooks_moved"):
        return
    if not getattr(model, "_output_capturing_hooks_installed", False):
        try:
            from transformers.utils import output_capturing
        except ImportError:  # an older transformers: nothing of this kind to install
            return
        # One ``output_*`` flag per output the model's class records (``_can_record_outputs``: a
        # mixture of experts' ``router_logits``, say), as its own forward decides; a private
        # registry, so without it the two every model has.
        registry = getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)
        flags = {*_OUTPUTS, *(f"output_{k}" for k in (registry.get(model) if registry else ()))}
        config = getattr(model, "config", None)
        if not any(kwargs.get(key, getattr(config, key, False)) for key in flags):
            return
        output_capturing.maybe_install_capturing_hooks(model)
    for slot in model.modules():
        if isinstance(slot, KasminaLayer):
            _move_capture_hooks(slot.host, slot)
    model._kasmina_hooks_moved = True


def sync(model: nn.Module) -> None:
    """Make every HF model in ``model`` agree with its slots: output-recording hooks on each slot
    rather than its host (now if transformers installed them, else on the first forward that
    installs them, by :func:`_before_forward`); tied-weight names through ``.host.`` where a
    slot is, and back where it is gone. Nothing for a model without transformers' models."""
    models = [module for _, module in _pretrained_models(model)]
    if not models:
        return
    slots = [m for m in model.modules() if isinstance(m, KasminaLayer)]
    for slot in slots:
        _move_capture_hooks(slot.host, slot)
    for module in models:
        vars(module).pop("_kasmina_hooks_moved", None)  # slots may have come or gone
        hooked = [k for k, h in module._forward_pre_hooks.items() if h is _before_forward]
        if slots and _records_outputs(module) and not hooked:
            module.register_forward_pre_hook(_before_forward, with_kwargs=True)
        elif not slots:
            for key in hooked:
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
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


def unslot(slot: KasminaLayer, replacement: nn.Module | None = None) -> None:
    """``slot`` is being replaced (by its host: ``detach``; by its merged module: ``merge``):
    its recording hooks go to what replaces it, and a manager stepping it refuses to go on."""
    slot.detached = True
    _move_capture_hooks(slot, slot.host if replacement is None else replacement)
