"""A real SIGINT (``signal.raise_signal``: Python's handler raises ``KeyboardInterrupt`` at the
next point it checks for signals) landing in the bookkeeping around a command: between the
queue and the ledger, in its report, while pins are given back or taken, while the store
client closes. Each lost something for good: commands taken and never applied nor reported,
counts that no longer add up, a kernel pinned forever, a second ``close()`` that hung. The
Ctrl-C still propagates; afterwards nothing is lost (``tests/manager/test_interrupts.py``
covers interrupts raised inside the operations themselves)."""

from __future__ import annotations

import _thread
import inspect
import signal
import threading
from collections.abc import Callable
from typing import Any

import pytest

from kasmina.control.commands import make_seed_command
from kasmina.manager.pending import CommandQueue
from tests.manager.helpers import SEED0, SEED1, Rig
from tests.manager.test_interrupts import assert_counts_add_up, queue, two_germinates

S_DEFAULT = signal.default_int_handler


@pytest.fixture(autouse=True)
def python_sigint_handler():
    previous = signal.signal(signal.SIGINT, S_DEFAULT)
    yield
    signal.signal(signal.SIGINT, previous)


def ctrl_c(
    monkeypatch: pytest.MonkeyPatch,
    owner: Any,
    name: str,
    *,
    after: bool,
    caller: str | None = None,
) -> list[int]:
    """Wrap ``owner.name`` so that a SIGINT arrives just before (or after) its body runs,
    once (at its first call from a function named ``caller``, if given); the calls seen."""
    real: Callable[..., Any] = getattr(owner, name)
    calls: list[int] = []

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if caller is not None and caller not in {f.function for f in inspect.stack()[1:6]}:
            return real(*args, **kwargs)
        calls.append(1)
        fire = len(calls) == 1
        if fire and not after:
            _thread.interrupt_main()
        out = real(*args, **kwargs)
        if fire and after:
            _thread.interrupt_main()
        return out

    monkeypatch.setattr(owner, name, wrapped)
    return calls


def pins(rig: Rig) -> dict[str, int]:
    return dict(rig.manager.kernel_cache._pins)


@pytest.mark.parametrize("where", ["taken", "durable"])
def test_commands_taken_when_a_ctrl_c_lands_go_back_to_the_queue(
    rig: Rig, mlp, monkeypatch, where: str
) -> None:
    """A SIGINT as the safe point took the ready commands off the queue, or as their nonces
    were made durable: before, both were lost (never applied, never reported)."""
    manager = rig.manager
    ids = two_germinates(rig, mlp)
    if where == "taken":
        ctrl_c(monkeypatch, manager.intake.queue, "take", after=True)
    else:
        ctrl_c(monkeypatch, manager.intake.verifier, "make_durable", after=True)
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    assert len(manager.pending) == 2 and list(manager.command_log) == []
    assert_counts_add_up(rig, executed=0, failed=0)
    monkeypatch.undo()
    outcomes = manager.apply_pending()
    assert [(o.command_id, o.ok) for o in outcomes] == [(ids[0], True), (ids[1], True)]
    assert_counts_add_up(rig, executed=2, failed=0)


def test_a_ctrl_c_as_a_command_is_reported_still_counts_it(rig: Rig, mlp, monkeypatch) -> None:
    """A SIGINT as the handler was told of an applied command: its outcome was taken as
    reported, but never counted (``executed`` stayed behind for good) nor announced."""
    manager = rig.manager
    ids = two_germinates(rig, mlp)
    ctrl_c(monkeypatch, manager.handler, "complete", after=False)
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    assert [entry[0] for entry in manager.command_log] == ids[:1]
    assert_counts_add_up(rig, executed=1, failed=0)
    monkeypatch.undo()
    manager.apply_pending()
    assert_counts_add_up(rig, executed=2, failed=0)


def test_a_ctrl_c_while_pins_are_given_back_leaks_none(rig: Rig, mlp, monkeypatch) -> None:
    """A SIGINT as the queue gave back its entries' kernel pins: each kernel stayed pinned
    once more than its seeds hold, and could never be evicted."""
    manager = rig.manager
    two_germinates(rig, mlp)
    ctrl_c(monkeypatch, CommandQueue, "release", after=False)
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    monkeypatch.undo()
    assert pins(rig) == {mlp: 2}  # the two seeds' own
    queue(rig, make_seed_command("cull", SEED0), make_seed_command("cull", SEED1))
    manager.apply_pending()
    assert pins(rig) == {}


def test_a_ctrl_c_as_germinate_pins_its_kernel_leaks_no_pin(rig: Rig, mlp, monkeypatch) -> None:
    """A SIGINT just after GERMINATE pinned its kernel, before it knew it had: the command
    was undone ("nothing changed") and the kernel stayed pinned by no one, for good."""
    manager = rig.manager
    manager.loader.original(mlp)
    calls = ctrl_c(monkeypatch, manager.kernel_cache, "pin", after=True, caller="pinned_original")
    queue(rig, make_seed_command("germinate", SEED0, mlp))
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    monkeypatch.undo()
    assert calls and rig.stage(SEED0).name == "DORMANT" and pins(rig) == {}
    assert_counts_add_up(rig, executed=0, failed=1)


def test_a_second_close_after_a_ctrl_c_in_the_first_returns(rig: Rig) -> None:
    """A SIGINT as the store client woke its waiters in ``close``, handled at the entry of the
    Condition's ``__exit__`` (Python code), before it released the lock: the second
    ``close()``, the documented recovery, hung on that lock for good. The lock is entered as a
    lock now (its exit is C code, where no signal is handled)."""
    manager = rig.manager
    guard = manager.urza_client._guard

    class CtrlCOnExit(threading.Condition):
        def __exit__(self, *exc: object) -> None:
            raise KeyboardInterrupt  # where the handler runs: this frame's entry

    guard._io_changed = CtrlCOnExit(guard._lock)
    try:
        manager.close()
    except KeyboardInterrupt:
        pass
    second = threading.Thread(target=manager.close, daemon=True)
    second.start()
    second.join(timeout=30)
    assert not second.is_alive(), "the second close() is blocked"
    assert manager.state.closed


class _CtrlCAfterAcquire:
    """A lock whose first successful ``acquire`` is followed by a SIGINT."""

    def __init__(self, lock: Any) -> None:
        self.lock, self.fired = lock, False

    def acquire(self, *args: Any, **kwargs: Any) -> bool:
        taken = self.lock.acquire(*args, **kwargs)
        if taken and not self.fired:
            self.fired = True
            _thread.interrupt_main()
        return taken

    def release(self) -> None:
        self.lock.release()


@pytest.mark.parametrize("wait", [False, True], ids=["step", "wait"])
def test_a_ctrl_c_as_a_safe_point_begins_leaves_the_next_one_working(
    rig: Rig, mlp, wait: bool
) -> None:
    """A SIGINT just after a safe point took its lock (one safe point at a time): the lock
    stayed taken, and every later ``step()`` and ``apply_pending()`` applied nothing, for
    good, without a word."""
    manager = rig.manager
    ids = two_germinates(rig, mlp)
    manager.intake._applying = _CtrlCAfterAcquire(manager.intake._applying)
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending(wait=wait)
    assert len(manager.pending) == 2
    outcomes: list = []
    again = threading.Thread(target=lambda: outcomes.extend(manager.apply_pending(wait=wait)))
    again.start()
    again.join(timeout=30)
    assert not again.is_alive(), "the next safe point waits for good"
    assert [(o.command_id, o.ok) for o in outcomes] == [(ids[0], True), (ids[1], True)]
