"""Who hears that a seed's kernel came or went (``GradientIsolatedSeed.attach_kernel`` and
``detach_kernel``: a GERMINATE, a CULL, a rollback or repair putting kernels back, a load).

The names of the tensors a slot owns change then. ``wrap_ddp`` (``kasmina.manager.ddp``)
watches, so that DDP's ignore list, which it reads by name before every forward to pick the
buffers it broadcasts from rank 0, takes a kernel grafted after the wrap (docs/design.md §5,
"Seeds under DDP"). The watchers live here, not on the seed: a seed copied or pickled is
nobody's wrapped model, and carries none.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterable

from torch import nn

from kasmina.utils.locks import fork_safe

logger = logging.getLogger(__name__)

__all__ = ["kernel_changed", "watch_kernels"]

# A watcher returns False once what it watches for is gone: it is dropped then.
Watcher = Callable[[], bool]
_watchers: weakref.WeakKeyDictionary[nn.Module, list[Watcher]] = weakref.WeakKeyDictionary()
_lock = fork_safe(threading.Lock())


def watch_kernels(seeds: Iterable[nn.Module], watcher: Watcher) -> None:
    """Call ``watcher()`` after every kernel change of one of ``seeds`` (held weakly), until it
    returns False. The watcher is held strongly: it should hold what it needs weakly."""
    with _lock:
        for seed in seeds:
            _watchers.setdefault(seed, []).append(watcher)


def kernel_changed(seed: nn.Module) -> None:
    """Tell ``seed``'s watchers that its kernel came or went. One that raises is logged and
    kept (the change stands, and the other watchers still hear of it)."""
    with _lock:
        watchers = list(_watchers.get(seed, ()))
    if not watchers:
        return
    done = []
    for watcher in watchers:
        try:
            if not watcher():
                done.append(watcher)
        except Exception:
            logger.exception("a watcher of seed kernel changes raised")
    if done:
        with _lock:
            left = [w for w in _watchers.get(seed, ()) if w not in done]
            if left:
                _watchers[seed] = left
            else:
                _watchers.pop(seed, None)
