"""A kernel's program refusing an input: its own input checks, raising ``KernelInputRefused``.

An exported program checks every call's input against what its export recorded (the sizes and
ranges of its dynamic dimensions, and conditions such as an even sequence length for a
kernel that pools pairs of tokens, or the branch it took on a size). A call that fails them is
one the program cannot take, as one of a rank or fixed size its signed input shape rules out:
a seed sits it out (the host's output stands) instead of being charged a fault, so that a
healthy kernel is not quarantined by a call it was never exported for (the decode steps of a
Hugging Face ``generate``: a sequence length of 1). So is a call that finds the program's
weights absent (``weights_absent``). ``refuse_through`` (at load) wraps the
program module's checks so that their failure raises ``KernelInputRefused``; ``without_refusals``
puts torch's own back, for a module that leaves Kasmina (``kasmina.merge``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kasmina.errors import KernelInputRefused

__all__ = ["refuse_through", "weights_absent", "without_refusals"]

# torch's forward pre-hook that checks a program module's inputs against the sizes and ranges
# its export recorded (every check, in torch releases whose programs have no guards function).
_INPUT_HOOK = "_check_input_constraints_pre_hook"


class _InputCheck:
    """One of a program module's input checks (its guards function, its input pre-hook), with
    its failure raised as ``KernelInputRefused``. A plain class, so that copies of the module
    copy it (a whole kernel pickles as its payload, which a load wraps again)."""

    def __init__(self, check: Callable[..., Any]) -> None:
        self.check = check
        self.refused = 0  # calls refused, for rate-limited logs (threads may blur the count)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.check(*args, **kwargs)
        except Exception as exc:
            self.refused += 1
            shapes = ", ".join(str(list(s)) for s in _shapes((args, kwargs))) or "its input"
            message = f"its exported program's input checks refuse {shapes}: {exc}"
            raise KernelInputRefused(message, self.refused) from exc


def _shapes(value: Any) -> list[torch.Size]:
    """The shapes of the tensors in ``value`` (nested tuples, lists and dicts), in order."""
    if isinstance(value, torch.Tensor):
        return [value.shape]
    if isinstance(value, dict):
        value = list(value.values())
    return [s for v in value for s in _shapes(v)] if isinstance(value, tuple | list) else []


def refuse_through(module: nn.Module) -> None:
    """Have a program module's input checks raise ``KernelInputRefused``: its guards function
    (the ``_guards_fn`` submodule's ``forward``) and torch's input pre-hook, found by name.
    What is not found (another torch's) is left as it is: its failures stay faults."""
    guards = module._modules.get("_guards_fn")
    forward = vars(guards).get("forward") if guards is not None else None
    if callable(forward) and not isinstance(forward, _InputCheck):
        guards.forward = _InputCheck(forward)
    hooks = module._forward_pre_hooks
    for key, hook in list(hooks.items()):
        if getattr(hook, "__name__", None) == _INPUT_HOOK:
            hooks[key] = _InputCheck(hook)


def without_refusals(module: nn.Module) -> nn.Module:
    """``module`` (a kernel's program module) with torch's own input checks back in place of
    ``refuse_through``'s: a refused input raises what torch raises."""
    for sub in module.modules():
        forward = vars(sub).get("forward")
        if isinstance(forward, _InputCheck):
            sub.forward = forward.check
        hooks = sub._forward_pre_hooks
        for key, hook in list(hooks.items()):
            if isinstance(hook, _InputCheck):
                hooks[key] = hook.check
    return module


_ABSENT_CALLS = itertools.count(1)


def weights_absent(program: nn.Module) -> KernelInputRefused | None:
    """After a call of ``program`` raised: a refusal when its weights are on the meta device,
    else None (the failure is the kernel's own fault). An offload that loads a module's weights
    only while that module's own forward runs (accelerate's ``cpu_offload``, a disk offload in
    ``dispatch_model``) never loads a program's, which reads its submodules' weights without
    calling them: charged, a healthy seed was quarantined by a few inference forwards."""
    tensors = itertools.chain(program.parameters(), program.buffers())
    if not any(t.is_meta for t in tensors):
        return None
    message = "its weights are on the meta device (offloaded; accelerate: preload_module_classes"
    return KernelInputRefused(f"{message}=['GPUKernel'])", next(_ABSENT_CALLS))
