"""A measurement's forwards, which leave the user's model and process as they were: in eval
mode, every module's mode put back after (``in_eval_mode``); none of the modules' hooks run
(``hooks_held``); the global RNG stream not moved (``rng_forked``); compiled code run eagerly
(``eager_compiles``)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from kasmina.utils.interrupts import interrupts_deferred
from kasmina.utils.locks import fork_safe

__all__ = ["eager_compiles", "hooks_held", "in_eval_mode", "rng_forked"]


@contextmanager
def in_eval_mode(root: nn.Module) -> Iterator[None]:
    """``root.eval()`` for the block; after it, however it exits, each module is back in the
    mode it had, through ``train()``: a module whose ``train`` does work (a LoRA layer that
    merges its update into the weight for eval and takes it out again for training) is put
    back by that work, where writing the flags left it merged, its factors without gradient.
    ``root.train(mode)`` first, then, parents before children, ``train`` on each module still
    in another mode than it had: every module's last ``train`` call is with its own mode."""
    modes = [(module, module.training) for module in root.modules()]
    root.eval()
    try:
        yield
    finally:
        root.train(modes[0][1])
        for module, mode in modes:
            if module.training != mode:
                module.train(mode)


# A module's forward hooks, which ``nn.Module.__call__`` runs around ``forward``.
_FORWARD_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


@contextmanager
def hooks_held(root: nn.Module) -> Iterator[None]:
    """A block whose calls of ``root`` and its submodules run none of their hooks: a
    measurement's forwards on random inputs (a timing) reach no user hook (an activation
    collector, a logger) and no hook of a framework (a capture of the outputs). Each module's
    hook dicts are set aside, empty ones in their place, and put back however the block exits,
    with a Ctrl-C held while they are. Hooks registered on the module class or globally
    (``register_module_forward_hook``) still run."""
    modules = list(root.modules())
    saved = [{name: vars(m)[name] for name in _FORWARD_HOOKS if name in vars(m)} for m in modules]
    with interrupts_deferred():
        for module, hooks in zip(modules, saved, strict=True):
            vars(module).update({name: type(d)() for name, d in hooks.items()})
    try:
        yield
    finally:
        with interrupts_deferred():
            for module, hooks in zip(modules, saved, strict=True):
                vars(module).update(hooks)


def rng_forked(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """A block whose random draws leave the global RNG stream as it was (the CPU's, and the
    device's on a GPU): a measurement, or a seed before ACTIVE, draws without shifting the
    stream a seeded training run (the host's dropout) depends on."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


# The one "force_eager" stance every block of ``eager_compiles`` under way shares, and their count.
_stance_lock = fork_safe(threading.Lock())
_stance: list[contextlib.AbstractContextManager[None]] = []
_stance_users = [0]


@contextmanager
def eager_compiles() -> Iterator[None]:
    """Compiled code (``torch.compile``, ``model.compile()``) runs eagerly for the block:
    ``torch.compiler.set_stance("force_eager")``, which is the process's, not the thread's.
    Blocks on several threads at once share one: each ``set_stance`` keeps the stance it found
    and puts it back on exit, so two interleaved (two managers measuring on two threads) left
    the process in "force_eager", every compiled model after run eagerly. The first block in
    sets it, the last out puts back the stance the first found."""
    with _stance_lock:
        if _stance_users[0] == 0:
            stance = torch.compiler.set_stance("force_eager")  # keeps the stance before it
            stance.__enter__()
            _stance.append(stance)
        _stance_users[0] += 1
    try:
        yield
    finally:
        with _stance_lock:
            _stance_users[0] -= 1
            if _stance_users[0] == 0:
                _stance.pop().__exit__(None, None, None)
