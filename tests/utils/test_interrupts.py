"""interrupts_deferred: a SIGINT inside the block is held, then delivered as the handler that
was installed before would have (by default, KeyboardInterrupt where the block ends)."""

from __future__ import annotations

import _signal
import signal
import threading

import pytest

from kasmina.utils.interrupts import interrupts_deferred


@pytest.mark.usefixtures("sigint_raises")
def test_a_sigint_in_the_block_is_delivered_when_it_ends() -> None:
    before = signal.getsignal(signal.SIGINT)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            signal.raise_signal(signal.SIGINT)
            done.append("after the signal")  # the block runs to its end
            done.append("the end")
    assert done == ["after the signal", "the end"]
    assert signal.getsignal(signal.SIGINT) is before


def test_a_block_without_a_signal_changes_nothing() -> None:
    before = signal.getsignal(signal.SIGINT)
    with interrupts_deferred():
        assert signal.getsignal(signal.SIGINT) is not before  # held while it runs
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(ValueError, match="inside"):  # an error in the block is not swallowed
        with interrupts_deferred():
            raise ValueError("inside")
    assert signal.getsignal(signal.SIGINT) is before


def test_the_previous_handler_gets_the_signal_once() -> None:
    calls: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with interrupts_deferred():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            assert calls == []
        assert calls == [signal.SIGINT]
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with interrupts_deferred():  # an ignored SIGINT stays ignored
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_off_the_main_thread_the_block_just_runs() -> None:
    seen = []

    def work() -> None:
        with interrupts_deferred():
            seen.append(signal.getsignal(signal.SIGINT))

    before = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [before]


def test_a_handler_installed_outside_python_is_left_alone(monkeypatch) -> None:
    """``getsignal`` gives None for a handler an embedding application installed in C: it
    could not be put back, so the block runs without holding anything."""
    installed: list[object] = []
    monkeypatch.setattr(_signal, "getsignal", lambda signum: None)
    monkeypatch.setattr(_signal, "signal", lambda signum, handler: installed.append(handler))
    with interrupts_deferred():
        pass
    assert installed == []


def test_a_call_in_a_grad_mode_puts_the_mode_back_whatever_it_raises() -> None:
    """``in_grad_mode`` switches grad mode by C calls inside its ``try``: a Ctrl-C raised as its
    function begins (where CPython handles a pending signal) leaves the mode as it was."""
    import sys

    import torch

    from kasmina.utils.grad_modes import in_grad_mode

    assert in_grad_mode(False, torch.is_grad_enabled) is False and torch.is_grad_enabled()

    def interrupted() -> None:
        raise AssertionError("never reached")

    def trace(frame, event, arg):  # a Ctrl-C at the entry of the function called
        if event == "call" and frame.f_code is interrupted.__code__:
            raise KeyboardInterrupt

    for outer in (True, False):
        torch.set_grad_enabled(outer)
        sys.settrace(trace)
        try:
            with pytest.raises(KeyboardInterrupt):
                in_grad_mode(not outer, interrupted)
        finally:
            sys.settrace(None)
            assert torch.is_grad_enabled() is outer
    torch.set_grad_enabled(True)
