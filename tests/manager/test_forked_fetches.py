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
from tests.manager.helpers import SEED0, Rig, S, make_config

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() children only")

# Set as a fork begins, once a test arms it (``os.register_at_fork`` hooks stay for good).
_FORKING, _ARMED = threading.Event(), threading.Event()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=lambda: _FORKING.set() if _ARMED.is_set() else None)


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
