"""A manager's kernel fetches in a ``fork()``ed child (a multiprocessing worker under the
``fork`` start method that goes on training its copy of the model): the fetch workers were its
parent's threads, which the child does not have."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from kasmina.control.builders import make_seed_command
from kasmina.utils.keyring import Keyring
from tests.crash import run_bounded_in_child
from tests.manager.helpers import SEED0, SEED1, Rig, S, make_config

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() children only")

# Set as a fork begins and once it is made (in the parent), once a test arms them
# (``os.register_at_fork`` hooks stay for good).
_FORKING, _FORKED, _ARMED = threading.Event(), threading.Event(), threading.Event()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=lambda: _FORKING.set() if _ARMED.is_set() else None,
        after_in_parent=lambda: _FORKED.set() if _ARMED.is_set() else None,
    )


def test_a_forked_child_applies_a_germinate_whose_fetch_its_parent_was_running(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """A GERMINATE accepted before the fork had its fetch running on a worker of the parent:
    in the child that fetch never ended and its pool ran nothing more, so the command stayed
    queued for good (refused at its timeout). The child fetches it again and applies it."""
    rig = Rig(make_config(tmp_path, store, nonce_ledger=False), keyring)
    client, parent = rig.manager.urza_client, os.getpid()
    there, go = threading.Event(), threading.Event()
    real = client.fetch

    def fetch(artifact_id: str, **kwargs: Any) -> Any:
        if os.getpid() == parent:  # the parent's worker stops here until the child is done
            there.set()
            go.wait(60)
        return real(artifact_id, **kwargs)

    client.fetch = fetch
    command = make_seed_command("germinate", SEED0, mlp, timeout_s=60.0)
    assert rig.manager.handle_adaptation_command(rig.signed(command))
    assert there.wait(30)

    def germinated() -> None:
        for _ in range(200):  # a step applies it once fetched (a few, on a loaded machine)
            rig.train(1)
            if rig.stage(SEED0) != S.DORMANT:
                return
            threading.Event().wait(0.05)
        raise AssertionError(f"never applied: {list(rig.manager.command_log)}")

    def child() -> None:
        torch.set_num_threads(1)  # no OpenMP pool of the parent's in the child
        germinated()

    try:
        assert run_bounded_in_child(child, timeout_s=40) == 0  # was RAISED (still queued)
    finally:
        go.set()
    germinated()  # the parent's own fetch completes and applies
    rig.manager.close()


@pytest.mark.parametrize("waiting", [False, True], ids=["queued", "a-thread-waits-on-it"])
def test_a_forked_child_applies_a_rollback_whose_kernel_its_parent_was_fetching_ahead(
    tmp_path: Path, store: Path, keyring: Keyring, published: tuple[Path, str, str], waiting: bool
) -> None:
    """A ROLLBACK queued before the fork (a GERMINATE queued behind it) had the fetch of the
    kernel its checkpoint puts back running on a worker of the parent: in the child that fetch
    never ended, and (``waiting``) the safe point another thread of the parent was holding,
    waiting for it (``apply_pending(wait=True)``), never ended either, so no safe point of the
    child applied anything. The child asks for the kernel again, applies the ROLLBACK and then
    the GERMINATE it held back, and gives back every pin it took for them; the parent too."""
    from kasmina.control.builders import make_rollback_command

    _, mlp, affine = published
    config = make_config(tmp_path, store, nonce_ledger=False, checkpoint_mode="memory")
    rig = Rig(config, keyring)
    manager, cache, parent = rig.manager, rig.manager.kernel_cache, os.getpid()
    rig.train(1)
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    manager.end_epoch(0)
    assert rig.send("cull", SEED0)
    rig.train(1)
    cache.clear()  # the ROLLBACK must fetch SEED0's kernel again
    there, go, reads = threading.Event(), threading.Event(), []
    real = manager.urza_client.fetch

    def fetch(artifact_id: str, **kwargs: Any) -> Any:
        reads.append((os.getpid(), artifact_id))
        if os.getpid() == parent and artifact_id == mlp:  # stops until the child is done
            there.set()
            go.wait(60)
        return real(artifact_id, **kwargs)

    manager.urza_client.fetch = fetch
    assert manager.handle_adaptation_command(rig.signed(make_rollback_command(0, timeout_s=60)))
    germinate = make_seed_command("germinate", SEED1, affine, timeout_s=60.0)
    assert manager.handle_adaptation_command(rig.signed(germinate))
    waited: list[Any] = []
    waiter = threading.Thread(target=lambda: waited.extend(manager.apply_pending(wait=True)))
    if waiting:
        waiter.start()  # its safe point starts the fetch ahead and waits for it
    else:
        assert rig.train(1)["commands"] == []  # its first safe point starts the fetch ahead
    assert there.wait(30)

    def applied(outcomes: list[Any]) -> None:
        for _ in range(400):  # a few steps, on a loaded machine
            if len(outcomes) == 2:
                break
            outcomes += rig.train(1)["commands"]
            threading.Event().wait(0.05)
        got = [(o.kind, o.target, o.ok) for o in outcomes]
        assert got == [("rollback", "rollback", True), ("seed", SEED1, True)], outcomes
        assert rig.stage(SEED0) == S.ISOLATED_INIT and manager.seed(SEED0).kernel is not None
        assert rig.stage(SEED1) == S.ISOLATED_INIT
        assert cache._pins == {mlp: 1, affine: 1}  # the seeds' own; the commands' given back

    def child() -> None:
        torch.set_num_threads(1)  # no OpenMP pool of the parent's in the child
        applied([])
        assert (os.getpid(), mlp) in reads  # fetched again here

    try:
        assert run_bounded_in_child(child, timeout_s=40) == 0  # was RAISED (still queued)
    finally:
        go.set()
        if waiting:
            waiter.join(60)
    applied(waited)  # the parent's own fetch completes and both apply
    manager.close()


def test_a_child_forked_as_a_fetch_worker_pins_a_kernel_gives_back_every_pin(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """A fetch worker pins the kernel it fetched for a queued GERMINATE, then records the pin
    on the command: a child forked between the two found the pin taken and no command holding
    it, pinned the kernel again for the command, and kept one pin for good (the kernel never
    evicted). A fork now waits for the two writes (``locks.whole_at_fork``): the child sees
    both, or neither, and gives back every pin but the seed's own."""
    rig = Rig(make_config(tmp_path, store, nonce_ledger=False), keyring)
    manager, cache = rig.manager, rig.manager.kernel_cache
    queue, inside = manager.pending, threading.Event()
    _FORKING.clear()
    real = queue._hold

    def hold(entry: Any) -> None:  # the pin taken, not yet recorded: stops until a fork begins
        if threading.current_thread().name.startswith("kasmina-fetch"):
            inside.set()
            _FORKING.wait(30)
        real(entry)

    queue._hold = hold
    command = make_seed_command("germinate", SEED0, mlp, timeout_s=60.0)
    assert manager.handle_adaptation_command(rig.signed(command))
    assert inside.wait(30) and cache._pins == {mlp: 1}

    def germinated() -> None:
        for _ in range(200):  # a step applies it once fetched
            if rig.train(1)["commands"]:
                break
            threading.Event().wait(0.05)
        assert rig.stage(SEED0) == S.ISOLATED_INIT
        assert cache._pins == {mlp: 1}  # the seed's own; the command's given back

    def child() -> None:
        torch.set_num_threads(1)  # no OpenMP pool of the parent's in the child
        germinated()

    _ARMED.set()
    try:
        assert run_bounded_in_child(child, timeout_s=40) == 0  # was RAISED: {mlp: 2}
    finally:
        _ARMED.clear()
        _FORKING.set()
    germinated()
    manager.close()


def test_a_child_forked_as_a_safe_point_pins_a_cached_kernel_gives_back_every_pin(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """The safe point pins a queued GERMINATE's kernel that is cached already, then records the
    pin on the command, as a fetch worker does: made on a thread of its own
    (``apply_pending(wait=True)`` from a controller's), a fork from the training thread between
    the two left the child one pin for good. The same section as the worker's now."""
    rig = Rig(make_config(tmp_path, store, nonce_ledger=False), keyring)
    manager, cache, queue = rig.manager, rig.manager.kernel_cache, rig.manager.pending
    assert rig.send("germinate", SEED1, mlp)  # cached, with SEED1's own pin on it
    rig.train(1)
    assert rig.stage(SEED1) == S.ISOLATED_INIT and cache._pins == {mlp: 1}
    _FORKING.clear()
    _FORKED.clear()
    real, real_poll, inside = queue._hold, queue._poll, threading.Event()

    def hold(entry: Any) -> None:  # the safe point's pin taken, not yet recorded
        if threading.current_thread().name == "waiter":
            inside.set()
            _FORKING.wait(30)
        real(entry)

    def poll(entry: Any, wait: bool) -> Any:  # applied after the fork: a child forked while
        polled = real_poll(entry, wait)  # the waiter applies waits for the model's lock
        if threading.current_thread().name == "waiter":
            _FORKED.wait(30)
        return polled

    queue._hold, queue._poll = hold, poll
    command = make_seed_command("germinate", SEED0, mlp, timeout_s=60.0)
    assert manager.handle_adaptation_command(rig.signed(command))  # cached: no fetch
    applied: list[Any] = []
    waiter = threading.Thread(
        target=lambda: applied.extend(manager.apply_pending(wait=True)), name="waiter"
    )
    waiter.start()
    assert inside.wait(30) and cache._pins == {mlp: 2}

    def child() -> None:
        torch.set_num_threads(1)  # no OpenMP pool of the parent's in the child
        for _ in range(100):
            if rig.train(1)["commands"] or rig.stage(SEED0) != S.DORMANT:
                break
            threading.Event().wait(0.05)
        assert rig.stage(SEED0) == S.ISOLATED_INIT
        assert cache._pins == {mlp: 2}, cache._pins  # the two seeds' own (was 3)

    _ARMED.set()
    try:
        code = run_bounded_in_child(child, timeout_s=40)
    finally:
        _ARMED.clear()
        _FORKING.set()
        waiter.join(30)
    assert [o.ok for o in applied] == [True] and cache._pins == {mlp: 2}
    manager.close()
    assert code == 0


def test_a_child_forked_inside_a_safe_point_finishes_it_and_applies_later_ones(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """A fork made by the thread that is applying the queued commands (a telemetry sink's, say)
    goes on with that safe point in the child: the child kept the safe point's lock, where it
    was freed under it as if another thread of the parent had held it, and the safe point's
    end then released a lock it no longer held (``RuntimeError``)."""
    rig = Rig(make_config(tmp_path, store, nonce_ledger=False), keyring)
    intake, real = rig.manager.intake, rig.manager.intake._take_and_apply

    def child() -> None:
        torch.set_num_threads(1)  # no OpenMP pool of the parent's in the child
        forked: list[int] = []

        def take_and_apply(wait: bool) -> Any:  # forks once, inside the safe point
            if not forked:
                forked.append(pid := os.fork())
                if pid:
                    assert os.waitpid(pid, 0)[1] == 0  # the grandchild's safe point went well
            return real(wait)

        intake._take_and_apply = take_and_apply
        rig.manager.apply_pending(wait=True)  # (both: the grandchild exits through the helper)
        assert rig.stage(SEED0) == S.ISOLATED_INIT
        assert rig.send("germinate", SEED1, mlp) and rig.stage(SEED1) == S.ISOLATED_INIT

    command = make_seed_command("germinate", SEED0, mlp, timeout_s=60.0)
    assert rig.manager.handle_adaptation_command(rig.signed(command))
    code = run_bounded_in_child(child, timeout_s=40)
    rig.manager.close()
    assert code == 0


def test_a_child_applies_on_a_thread_of_its_own_after_a_parents_thread_held_a_safe_point(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """A thread of the parent was in a safe point (``apply_pending(wait=True)``, waiting for a
    fetch) at the fork. The child frees that safe point and forgets which thread held it: a
    thread the child starts may get the gone thread's ident (its stack is reused), and a safe
    point that took it for the one applying returned at once, applying nothing."""
    rig = Rig(make_config(tmp_path, store, nonce_ledger=False), keyring)
    manager, parent = rig.manager, os.getpid()
    there, go = threading.Event(), threading.Event()
    real = manager.urza_client.fetch

    def fetch(artifact_id: str, **kwargs: Any) -> Any:
        if os.getpid() == parent:  # the parent's worker stops here until the child is done
            there.set()
            go.wait(60)
        return real(artifact_id, **kwargs)

    manager.urza_client.fetch = fetch
    command = make_seed_command("germinate", SEED0, mlp, timeout_s=60.0)
    assert manager.handle_adaptation_command(rig.signed(command))
    waited: list[Any] = []
    waiter = threading.Thread(target=lambda: waited.extend(manager.apply_pending(wait=True)))
    waiter.start()
    assert there.wait(30)

    def child() -> None:
        torch.set_num_threads(1)  # no OpenMP pool of the parent's in the child
        got: list[Any] = []
        release, threads = threading.Event(), []

        def controller() -> None:  # applies on the thread that has the waiter's ident
            if threading.get_ident() == waiter.ident:
                got.extend(manager.apply_pending(wait=True))
            else:  # keeps its stack, so that the next thread takes another
                release.wait(30)

        for _ in range(32):
            threads.append(thread := threading.Thread(target=controller))
            thread.start()
            if thread.ident == waiter.ident:
                thread.join(30)
                break
        release.set()
        for thread in threads:
            thread.join(30)
        if threads[-1].ident != waiter.ident:  # (no stack reused here: the training thread)
            got.extend(manager.apply_pending(wait=True))
        assert [(o.kind, o.target, o.ok) for o in got] == [("seed", SEED0, True)], got
        assert rig.stage(SEED0) == S.ISOLATED_INIT

    try:
        assert run_bounded_in_child(child, timeout_s=40) == 0
    finally:
        go.set()
        waiter.join(60)
    assert [(o.kind, o.ok) for o in waited] == [("seed", True)]
    manager.close()
