"""Who hears of the state table's changes, and how they are held and called.

The table (``kasmina.seeds.table``) tells two kinds of party about its changes: *observers* of
one seed's transitions (a manager's registry, a seed) and *listeners* of every change (each
slot's plan). Both are held as :class:`WeakObserver` so that a table shared by many slots never
keeps a dropped seed or layer alive, and both are called through :func:`call_safely`, so that
one that raises never keeps the others from hearing of a change the table already made. The
library's own observers keep and complete what of their reaction failed (a seed's writes:
``stage_entry``; a manager's effects: ``post_commit``), so one that raises here is a user's.
"""

from __future__ import annotations

import copy
import logging
import types
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from kasmina.stages import SeedStage

logger = logging.getLogger(__name__)

__all__ = ["Listeners", "TransitionObserver", "WeakObserver", "call_safely"]

TransitionObserver = Callable[[int, SeedStage, SeedStage], None]


class WeakObserver:
    """A weakly held bound method (plain callables are held strongly).

    Copying or pickling the table copies a *following* observer's object with it (as a strong
    reference would), so a deep-copied or unpickled seed keeps receiving its own transitions.
    An observer registered with ``follows_copies=False`` (a manager's registry, which holds
    keys, locks and open files) stays with the original: the copy gets a dead entry, dropped on
    its first transition, because a copied model is nobody's managed model.
    """

    def __init__(self, fn: Callable[..., None] | None, follows_copies: bool = True) -> None:
        owner = getattr(fn, "__self__", None)
        self._owner = None if owner is None else weakref.ref(owner)
        self._fn: Any = getattr(fn, "__func__", fn)
        self.follows_copies = follows_copies

    def __call__(self) -> Callable[..., None] | None:
        if self._owner is None:
            return self._fn
        owner = self._owner()
        return None if owner is None else types.MethodType(self._fn, owner)

    def __deepcopy__(self, memo: dict[int, Any]) -> WeakObserver:
        if not self.follows_copies:
            return WeakObserver(None)
        owner = None if self._owner is None else self._owner()
        if owner is None:
            return WeakObserver(self._fn if self._owner is None else None)
        return WeakObserver(types.MethodType(self._fn, copy.deepcopy(owner, memo)))

    def __reduce__(self) -> tuple[Any, ...]:
        return (WeakObserver, (self() if self.follows_copies else None,))


def call_safely(fn: Callable[..., None], *args: Any) -> None:
    """Call an observer or listener; one that raises is logged and the others still run: a
    change the table made is never half announced."""
    try:
        fn(*args)
    except Exception:
        logger.exception("a state-table observer raised; the other observers still run")


class Listeners:
    """The table's listeners, each following some rows (or every one).

    A change of some rows calls, once each and in the order they were added, only the listeners
    that follow one of them (and those that follow every row), through an index from row to
    listener, so that restoring N seeds of a model with many slots costs O(N), not N times
    every slot. A change of every row (``rows=None``: a resync, a load) calls them all.
    """

    def __init__(
        self, entries: Iterable[WeakObserver | tuple[WeakObserver, frozenset[int] | None]] = ()
    ) -> None:
        # A bare observer: one added before listeners followed rows (an older pickle).
        self._entries = [e if isinstance(e, tuple) else (e, None) for e in entries]
        self._index: dict[int | None, list[int]] | None = None

    def add(self, listener: Callable[[], None], rows: frozenset[int] | None) -> None:
        self._entries.append((WeakObserver(listener), rows))
        self._index = None

    def notify(self, rows: Iterable[int] | None) -> None:
        if rows is None:
            chosen = range(len(self._entries))
        else:
            index = self._index if self._index is not None else self._build()
            picked = set(index.get(None, ()))
            for row in rows:
                picked.update(index.get(row, ()))
            chosen = sorted(picked)
        called = [(n, self._entries[n][0]()) for n in chosen]
        if any(listener is None for _, listener in called):  # dead ones go, before any call
            dead = {n for n, listener in called if listener is None}
            self._entries = [e for n, e in enumerate(self._entries) if n not in dead]
            self._index = None
        for _, listener in called:
            if listener is not None:
                call_safely(listener)

    def _build(self) -> dict[int | None, list[int]]:
        index: dict[int | None, list[int]] = {}
        for n, (_, rows) in enumerate(self._entries):
            for row in (None,) if rows is None else rows:
                index.setdefault(row, []).append(n)
        self._index = index
        return index

    def __getstate__(self) -> dict[str, Any]:  # the index is rebuilt on use
        return {"_entries": self._entries, "_index": None}
