"""The hooks on a seed kernel's parameter that its island hands no gradient (docs/design.md §6a).

The backward guard (``island._Island``) returns the kernels' parameter gradients to the host's
autograd, and None for a parameter it has none for: the kernel's backward raised (a fault), its
graph was stale, or its forward did not use that parameter. The engine still runs the
parameter's gradient accumulator, and with it the hooks on the parameter: its tensor hooks are
called with ``None`` and its post-accumulate hooks with ``.grad`` None, where plain PyTorch
runs no hook of a parameter outside the graph. A hook written for a tensor (the usual
per-parameter clipping, ``p.register_hook(lambda g: g.clamp(-1, 1))``) raised out of the host's
backward. So for the rest of that backward each hook of such a parameter is wrapped: given a
gradient it runs as it is; given none it runs too (``register_multi_grad_hook`` counts that
call), what it raises is logged at a bounded rate, never raised, and what it returns is
dropped (torch refuses a tensor in place of None). The hooks are put back when the engine
finishes the backward (a final callback); a wrapper left by a backward that failed elsewhere
runs its hook as before on any gradient.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.autograd.variable import Variable

from kasmina.utils.ratelimit import rarely

logger = logging.getLogger(__name__)

__all__ = ["contain_hooks_given_none", "hooks_set_aside"]

_RAISED = itertools.count(1)
_USERS = threading.Lock()  # the wrappers' ``users`` (backwards on two threads at once)
_MESSAGE = (
    "a hook on a seed kernel's parameter raised when handed no gradient (the backward guard had "
    "none for it: the kernel's backward faulted, its graph was stale, or its forward did not "
    "use the parameter); contained, the host's backward goes on [%d so far]: %s: %s"
)

# ``(hook dict, key, the hook, its wrapper)`` for each hook wrapped during one backward.
_Swapped = list[tuple[dict[Any, Any], Any, Callable[..., Any], Callable[..., Any]]]


class _Contained:
    """A parameter's hook, run as it is for a gradient; for none, what it raises is logged.
    ``users``: the backwards running that wrapped it or found it wrapped (threads may run two
    at once); the last to end puts the hook back."""

    __slots__ = ("hook", "users")

    def __init__(self, hook: Callable[..., Any]) -> None:
        self.hook, self.users = hook, 0

    def contained(self, arg: Any) -> None:
        try:
            self.hook(arg)
        except Exception as exc:  # the guard's None, which plain PyTorch never hands it
            n = next(_RAISED)
            logger.log(rarely(n, 1000), _MESSAGE, n, type(exc).__name__, exc)


class _TensorHook(_Contained):
    __slots__ = ()

    def __call__(self, grad: torch.Tensor | None) -> torch.Tensor | None:
        if grad is not None:
            return self.hook(grad)  # type: ignore[no-any-return]
        self.contained(None)
        return None


class _PostAccumulateHook(_Contained):
    __slots__ = ()

    def __call__(self, param: torch.Tensor) -> None:
        if param.grad is not None:  # some gradient was accumulated (or kept from before)
            self.hook(param)
            return
        self.contained(param)


def contain_hooks_given_none(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]
) -> None:
    """Until the running backward ends, wrap the tensor and post-accumulate hooks of each of
    ``params`` whose gradient in ``grads`` is None (module docstring). Called from inside a
    guard node's backward, only where some gradient is None."""
    swapped: _Swapped = []
    for p, grad in zip(params, grads, strict=True):
        if grad is not None:
            continue
        for hooks, wrap in (
            (p._backward_hooks, _TensorHook),
            (p._post_accumulate_grad_hooks, _PostAccumulateHook),
        ):
            for key, hook in list(hooks.items()) if hooks else ():
                with _USERS:
                    wrapped = hook if isinstance(hook, _Contained) else wrap(hook)
                    wrapped.users += 1
                    hooks[key] = wrapped
                swapped.append((hooks, key, wrapped.hook, wrapped))
    if not swapped:
        return
    try:
        Variable._execution_engine.queue_callback(lambda: _put_back(swapped))
    except RuntimeError:  # not inside a backward after all: the wrappers stay, harmless
        logger.debug("no backward to put the seed parameters' hooks back after", exc_info=True)


def _put_back(swapped: _Swapped) -> None:
    """The wrapped hooks, as they were, once no backward uses them; a hook removed (or
    replaced) meanwhile stays so."""
    with _USERS:
        for hooks, key, hook, wrapped in swapped:
            wrapped.users -= 1
            if not wrapped.users and hooks.get(key) is wrapped:
                hooks[key] = hook


class hooks_set_aside:  # noqa: N801 (a context manager, used as a function)
    """Tensors' hook dicts (``_backward_hooks``, ``_post_accumulate_grad_hooks``; None or empty
    ones skipped) emptied meanwhile, and put back after, whatever raised: the engine reads them
    at each call, so a backward run meanwhile runs none of them. A class, not a generator: it
    sits in every guarded backward, where most parameters have no hook."""

    __slots__ = ("held",)

    def __init__(self, dicts: Iterable[dict[Any, Any] | None]) -> None:
        self.held = [(hooks, dict(hooks)) for hooks in dicts if hooks]

    def __enter__(self) -> None:
        for hooks, _ in self.held:
            hooks.clear()

    def __exit__(self, *exc_info: object) -> None:
        for hooks, saved in self.held:
            hooks.update(saved)
