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
