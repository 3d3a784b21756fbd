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
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from kasmina.control.builders import make_seed_command
from kasmina.manager.pending import CommandQueue
from tests.manager.helpers import SEED0, SEED1, Rig, S
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


class _CtrlCAsHoldBegins:
    """Stands for ``interrupts_deferred`` in a module: the hold made in a function named
    ``caller`` (its ``nth``) takes a Ctrl-C at its ``__enter__``'s entry (where CPython
    handles a pending SIGINT, before the handler is swapped), once; every other is the real one."""

    def __init__(self, real: type, caller: str, nth: int = 1) -> None:
        self.real, self.caller, self.fired, self.left = real, caller, False, nth

    def __call__(self) -> Any:
        hold = self.real()
        if self.fired or inspect.currentframe().f_back.f_code.co_name != self.caller:
            return hold
        self.left -= 1
        if self.left:
            return hold
        self.fired = True

        class Interrupted:
            def __enter__(self) -> None:
                raise KeyboardInterrupt

            def __exit__(self, *exc: object) -> None:
                return hold.__exit__(*exc)

        return Interrupted()


def test_a_ctrl_c_as_the_pins_hold_begins_still_gives_them_back(rig: Rig, mlp, monkeypatch):
    """The queue's pins are given back under a hold, whose own start is a point where a Ctrl-C
    lands: there it skipped the release, and the kernel stayed pinned by no one."""
    import kasmina.manager.intake as intake_module

    manager = rig.manager
    two_germinates(rig, mlp)
    fake = _CtrlCAsHoldBegins(intake_module.interrupts_deferred, "_take_and_apply", nth=2)
    monkeypatch.setattr(intake_module, "interrupts_deferred", fake)
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    monkeypatch.undo()
    assert fake.fired and pins(rig) == {mlp: 2}  # the seeds' own
    queue(rig, make_seed_command("cull", SEED0), make_seed_command("cull", SEED1))
    manager.apply_pending()
    assert pins(rig) == {}


def test_a_ctrl_c_as_the_rollbacks_commit_hold_begins_undoes_it(rig: Rig, mlp, monkeypatch):
    """Phase 2 of a rollback had written the table, the model and the kernels; a Ctrl-C as the
    commit's hold began, after phase 2's undo stopped listening, left them neither undone nor
    committed (the stages the checkpoint's, the clock and optimizers not), reported refused."""
    import kasmina.manager.rollback as rollback_module
    from kasmina.control.builders import make_rollback_command

    manager = rig.manager
    for epoch in range(2):
        rig.train(1)
        manager.end_epoch(epoch)
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    table = manager.require_registry().table
    before = (table.state_tensor.clone(), table.stages(), manager.epoch)
    weights = {k: v.clone() for k, v in rig.model.state_dict().items()}
    fake = _CtrlCAsHoldBegins(rollback_module.interrupts_deferred, "restore_epoch")
    monkeypatch.setattr(rollback_module, "interrupts_deferred", fake)
    queue(rig, make_rollback_command(0))
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    monkeypatch.undo()
    assert fake.fired
    assert torch.equal(table.state_tensor, before[0]) and table.stages() == before[1]
    assert manager.epoch == before[2] and rig.stage(SEED0) == S.ISOLATED_INIT
    assert all(torch.equal(v, weights[k]) for k, v in rig.model.state_dict().items())
    assert manager.command_log[-1][2] is False
    assert "nothing changed" in manager.command_log[-1][3]
    rig.train(1)
    queue(rig, make_rollback_command(0))
    assert [o.ok for o in manager.apply_pending()] == [True]


def test_a_ctrl_c_as_an_applied_command_is_noted_reports_it_applied(rig: Rig, mlp, monkeypatch):
    """A Ctrl-C at the start of noting a command that took effect: the intake found it not
    noted and reported it refused, the seed culled all the same."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    real = manager.report.note_command

    def note_command(command: Any, ok: bool, reason: str) -> None:
        if ok and command.seed is not None and command.seed.seed_id == SEED0:
            monkeypatch.setattr(manager.report, "note_command", real)
            raise KeyboardInterrupt  # at its entry
        real(command, ok, reason)

    monkeypatch.setattr(manager.report, "note_command", note_command)
    queue(rig, make_seed_command("cull", SEED0))
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    assert rig.stage(SEED0) == S.COOLDOWN
    assert manager.command_log[-1][1:3] == ("seed.cull", True)
    assert_counts_add_up(rig, executed=2, failed=0)


def _interrupted_under(trace: Callable[..., Any], manager: Any) -> None:
    """``manager.apply_pending()`` traced by ``trace``, which makes it raise KeyboardInterrupt."""
    sys.settrace(trace)
    try:
        with pytest.raises(KeyboardInterrupt):
            manager.apply_pending()
    finally:
        sys.settrace(None)


def _sigint_at_entry_of(name: str) -> Callable[..., Any]:
    """A trace function that sends this process a SIGINT as a function called ``name`` is
    entered, once: where CPython handles a pending signal (its handler runs inside the trace)."""
    fired: list[int] = []

    def trace(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_name == name and not fired:
            fired.append(1)
            os.kill(os.getpid(), signal.SIGINT)

    trace.fired = fired  # type: ignore[attr-defined]
    return trace


@pytest.mark.parametrize("entry", ["_bump", "_refresh_plan"])
def test_a_ctrl_c_as_a_transition_is_announced_reaches_every_owner(rig: Rig, mlp, entry) -> None:
    """A SIGINT at the entry of the listeners' notice of an ADVANCE, or of the slot's plan
    refresh: what follows that point never heard of it (the slot's forward still ran the seed
    in its old stage, for good; the seed's stage code stayed behind), and the command was
    reported done. The table applies and announces a transition whole, with a SIGINT held."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    manager.end_epoch(0)
    table = manager.require_registry().table
    queue(rig, make_seed_command("advance", SEED0))
    trace = _sigint_at_entry_of(entry)
    _interrupted_under(trace, manager)
    record, new = manager.require_registry()[SEED0], S.COMPATIBILITY_CHECK
    assert trace.fired and rig.stage(SEED0) == new
    assert int(table.state_tensor[record.index, 0]) == int(new)
    assert rig.slot._plan[0] == new  # the slot's forward runs the seed as it now is
    assert record.seed._stage_code == int(new)
    assert manager.command_log[-1][1:3] == ("seed.advance", True)


def _sigint_at_grad_mode_edges() -> Callable[..., Any]:
    """A trace function that sends a SIGINT, once, as kasmina code enters or leaves one of
    torch's grad-mode blocks that has grad mode off (their ``__enter__``/``__exit__`` are
    Python code; ``set_grad_enabled`` switches in its ``__init__``)."""
    fired: list[str] = []

    def trace(frame: Any, event: str, arg: Any) -> None:
        code, caller = frame.f_code, frame.f_back
        if (
            event == "call"
            and not fired
            and code.co_filename.endswith("grad_mode.py")
            and code.co_name in ("__enter__", "__exit__")
            and caller is not None
            and "kasmina" in caller.f_code.co_filename
            and not torch.is_grad_enabled()  # switched off already (or not yet back on)
        ):
            fired.append(caller.f_code.co_name)
            os.kill(os.getpid(), signal.SIGINT)

    trace.fired = fired  # type: ignore[attr-defined]
    return trace


def test_a_ctrl_c_at_a_grad_mode_edge_in_germinate_leaves_grad_mode_on(rig: Rig, mlp) -> None:
    """GERMINATE's dry run switched grad mode in a ``with`` block: a Ctrl-C at the entry of its
    ``__enter__`` (grad already off) or ``__exit__`` left grad mode off for the thread, and the
    next training step built no graph ("element 0 of tensors does not require grad")."""
    manager = rig.manager
    manager.loader.original(mlp)
    queue(rig, make_seed_command("germinate", SEED0, mlp))
    trace = _sigint_at_grad_mode_edges()
    sys.settrace(trace)
    try:
        manager.apply_pending()
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    assert torch.is_grad_enabled(), trace.fired
    rig.train(1)  # trains


def test_a_ctrl_c_at_a_grad_mode_edge_in_a_step_leaves_grad_mode_on(rig: Rig, mlp) -> None:
    """The step read its device flags in a ``with torch.no_grad()`` block (every step): a
    Ctrl-C at its ``__exit__`` left grad mode off, and a trainer that caught it and trained on
    got "element 0 of tensors does not require grad". No step path switches it in a block."""
    assert rig.send("germinate", SEED0, mlp)
    for _ in range(3):  # each step's edges, the seed's leak check and clipping's norms too
        trace = _sigint_at_grad_mode_edges()
        sys.settrace(trace)
        try:
            rig.train(1)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        assert torch.is_grad_enabled(), trace.fired
        assert not trace.fired
    rig.train(1)


def test_a_ctrl_c_at_a_grad_mode_edge_in_g3_leaves_grad_mode_on(rig: Rig, mlp) -> None:
    """G3's probe (every forward in COMPATIBILITY_CHECK) and its FLOP count (the ADVANCE to
    GRAFTING) ran the kernel in ``with torch.no_grad()`` blocks: a Ctrl-C at their exit left
    grad mode off for the thread. They switch it by C calls now (``in_grad_mode``)."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    manager.end_epoch(0)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.COMPATIBILITY_CHECK
    for action in (lambda: rig.train(1), lambda: rig.send("advance", SEED0)):
        trace = _sigint_at_grad_mode_edges()
        sys.settrace(trace)
        try:
            action()
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        assert torch.is_grad_enabled() and not trace.fired, trace.fired
    assert rig.stage(SEED0) == S.GRAFTING
    rig.train(1)


def test_a_ctrl_c_as_a_rollback_detaches_a_kernel_puts_it_back(rig: Rig, mlp, monkeypatch):
    """A Ctrl-C inside a rollback's kernel swap, once a seed's kernel was taken off and before
    its slot heard of it: the swap had not yet noted the kernel, so the undo could not put it
    back, its reload of the model raised ``ValueError`` over the Ctrl-C, and the seed stayed
    without its kernel while the manager's record, optimizer and pins kept it."""
    from kasmina.control.builders import make_rollback_command

    manager = rig.manager
    rig.train(1)
    manager.end_epoch(0)  # the seed DORMANT, without a kernel
    assert rig.send("germinate", SEED1, mlp)
    rig.train(1)
    kernel = manager.seed(SEED1).kernel
    table = manager.require_registry().table
    calls = ctrl_c(monkeypatch, table, "touch", after=False, caller="detach_kernel")
    queue(rig, make_rollback_command(0))
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    monkeypatch.undo()
    assert calls and manager.seed(SEED1).kernel is kernel and rig.stage(SEED1) == S.ISOLATED_INIT
    assert manager.command_log[-1][2] is False and "nothing changed" in manager.command_log[-1][3]
    assert SEED1 in rig.train(1)["seeds_stepped"]


def test_a_ctrl_c_as_an_applied_commands_outcome_is_built_reports_it_applied(rig: Rig, mlp):
    """A SIGINT at the entry of the outcome's constructor (dataclass code, Python), after the
    operation took effect and before it was noted: reported refused ("interrupted while it
    applied"), the seed culled all the same. It is noted first now."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    queue(rig, make_seed_command("cull", SEED0))
    fired: list[int] = []

    def trace(frame: Any, event: str, arg: Any) -> None:
        caller = frame.f_back
        if (
            event == "call"
            and not fired
            and frame.f_code.co_name == "__init__"
            and caller is not None
            and caller.f_code.co_name == "apply"
            and caller.f_code.co_filename.endswith("executor.py")
        ):
            fired.append(1)
            os.kill(os.getpid(), signal.SIGINT)

    _interrupted_under(trace, manager)
    assert fired and rig.stage(SEED0) == S.COOLDOWN
    assert manager.command_log[-1][1:3] == ("seed.cull", True)
    assert_counts_add_up(rig, executed=2, failed=0)


def test_a_ctrl_c_once_a_pin_is_recorded_leaves_it_to_its_holder(rig: Rig, mlp, monkeypatch):
    """``pinned_original(hold=...)``: a Ctrl-C that lands just after the pin is deferred to
    the end of the section where ``hold`` records it; the pin is then ``hold``'s (a queued
    command's, given back when it is released), never given back here as well."""
    loader = rig.manager.loader
    loader.original(mlp)
    held: list[int] = []
    calls = ctrl_c(
        monkeypatch, rig.manager.kernel_cache, "pin", after=True, caller="pinned_original"
    )
    with pytest.raises(KeyboardInterrupt):
        loader.pinned_original(mlp, hold=lambda: held.append(1))
    monkeypatch.undo()
    assert calls and held == [1] and pins(rig) == {mlp: 1}  # the holder's, to give back
    rig.manager.kernel_cache.unpin(mlp)
