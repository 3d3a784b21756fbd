"""What torch keeps for the life of the process after each graph module it builds, bounded.

torch.fx compiles every graph module it makes and keeps the generated source (for tracebacks)
in its loader's ``eval_cache`` and in ``linecache`` for good, and torch's ``ShapeEnv`` class
memoises its methods per instance, keeping every shape environment alive. A kernel's load
builds about six graph modules and a ``ShapeEnv``, each copy of a program module (one per
GERMINATE, dry run or rollback) compiles once more, and ``kasmina.merge`` compiles the merged
model: a run that evicts and reloads artifacts grew without bound (docs/design.md §6).

- ``BUILD_LOCK`` -- Kasmina's builds take turns under it (a kernel's whole load, a merge), so
  the sources numbered from a build's ``next_source_id`` on are its own alone.
- ``forget_load_sources`` -- drops the sources one build generated, except those a kept graph
  module uses, and those in turn when it is collected (``forget_source_with``).
- ``built_with_bounded_sources`` -- a build (a merge) under the lock with the two above.
- ``forget_shape_env_memos`` -- clears ``ShapeEnv``'s memo caches after a load.

All of it reaches into torch's private state (``torch.fx.graph_module._loader``); where that is
absent each function does nothing.
"""

from __future__ import annotations

import linecache
import re
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import nn

from kasmina.utils.locks import fork_safe

__all__ = [
    "BUILD_LOCK",
    "built_with_bounded_sources",
    "forget_load_sources",
    "forget_shape_env_memos",
    "forget_source_with",
    "next_source_id",
]

T = TypeVar("T")

# ``torch.export.load`` keeps its deserializer in one process-wide slot and refuses to start
# while another load runs: loads of different artifacts (the fetch workers) take turns under
# this lock, each whole load, and so do other builds of graph modules (a merge), so that the
# sources one of them drops are its own alone.
BUILD_LOCK = fork_safe(threading.Lock())


def forget_source_with(module: torch.fx.GraphModule) -> None:
    """Drop the source torch.fx generated for ``module``'s copy when the copy is collected.

    Each copy of a program module recompiles it, and torch.fx keeps the generated source (for
    tracebacks) in its loader's cache and in ``linecache`` for the life of the process: tens
    of KB per copy, one copy per GERMINATE, refused dry run or rollback. Without the private
    loader this does nothing."""
    loader = getattr(torch.fx.graph_module, "_loader", None)
    if loader is not None and isinstance(getattr(loader, "eval_cache", None), dict):
        # The class is the copy's own (torch.fx makes one per module), and its source key is
        # read when the copy goes: a recompile (pickling one) gives it a new key.
        weakref.finalize(module, _forget_source, loader.eval_cache, type(module))


def built_with_bounded_sources(build: Callable[[], T], old: Iterable[nn.Module]) -> T:
    """``build()``, which makes graph modules (``kasmina.merge``: torch.fx compiles each and
    keeps its generated source for the life of the process), with what it leaves bounded: the
    sources generated during it stay only while a graph module of its result uses them
    (``forget_load_sources``), and a graph module under ``old`` that it compiled again (a
    kernel's program module, moved into the result) lets its previous source go."""
    before = [
        (module, _source_key(type(module)))
        for root in old
        for module in root.modules()
        if isinstance(module, torch.fx.GraphModule)
    ]
    with BUILD_LOCK:  # the sources numbered from ``first`` on are this build's
        first = next_source_id()
        built = build()
        forget_load_sources(first, built if isinstance(built, nn.Module) else None)
    cache = getattr(getattr(torch.fx.graph_module, "_loader", None), "eval_cache", None)
    for module, key in before:
        if isinstance(cache, dict) and key != _source_key(type(module)):
            _forget_key(cache, key)
    return built


def _forget_source(cache: dict[str, str], cls: type) -> None:
    _forget_key(cache, _source_key(cls))


def _forget_key(cache: dict[str, str], key: str) -> None:
    if key.startswith("<eval_with_key>"):
        cache.pop(key, None)
        linecache.cache.pop(key, None)


def _source_key(cls: type) -> str:
    return getattr(getattr(cls.forward, "__code__", None), "co_filename", "")


_KEY_ID = re.compile(r"<eval_with_key>\.(\d+)")


def next_source_id() -> int | None:
    """The id torch.fx's loader will give the next generated source; None without it."""
    loader = getattr(torch.fx.graph_module, "_loader", None)
    next_id = getattr(loader, "next_id", None)
    return next_id if isinstance(next_id, int) else None


def forget_load_sources(first: int | None, module: nn.Module | None) -> None:
    """Drop the sources torch.fx generated during one load, except those of the graph
    modules ``module`` keeps (dropped in turn when each is collected).

    A load builds six graph modules or so (the deserialised program, the unlifted module and
    intermediates between them) and torch.fx keeps every one's source for the life of the
    process, about 20 KB per load: a run that reloads evicted artifacts would grow without
    bound. The sources are numbered in creation order, so those of this load are the ids
    from ``first`` on (Kasmina's loads and builds take turns: ``BUILD_LOCK``); a graph module
    another thread builds during the load (a ``torch.compile`` on the training thread) loses
    its traceback source, nothing else (its code is compiled already)."""
    loader = getattr(torch.fx.graph_module, "_loader", None)
    cache = getattr(loader, "eval_cache", None)
    if first is None or not isinstance(cache, dict):
        return
    kept = set()
    for sub in module.modules() if module is not None else ():
        if isinstance(sub, torch.fx.GraphModule):
            kept.add(_source_key(type(sub)))
            forget_source_with(sub)
    for key in list(cache):
        match = _KEY_ID.match(key)
        if match is not None and int(match.group(1)) >= first and key not in kept:
            cache.pop(key, None)
            linecache.cache.pop(key, None)


def forget_shape_env_memos() -> None:
    """Clear the memo caches of torch's ``ShapeEnv`` methods (``functools.lru_cache`` on the
    class, keyed by the instance), which kept alive the ShapeEnv every ``torch.export.load``
    builds, with its symbols and fake tensors: about 12 KB a load, for the life of the
    process, in a run that reloads evicted artifacts. They are memos only (recomputed on
    demand), shared with any ``torch.compile`` of the process, which recomputes what it next
    asks them."""
    shape_env = getattr(torch.fx.experimental.symbolic_shapes, "ShapeEnv", None)
    for value in vars(shape_env).values() if shape_env is not None else ():
        clear = getattr(value, "cache_clear", None)
        if callable(clear):
            clear()
