"""A stalled store never blocks a training step (docs/design.md §5, §6).

A real loopback HTTP store serves the manifest and then stalls the payload halfway. GERMINATEs
sent with a 1 s timeout are fetched on the manager's workers; the trainer keeps stepping the
whole time, each command is refused once its timeout has run out, and the thread count stays
bounded however many such commands arrive.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from kasmina.control.builders import make_seed_command
from kasmina.urza.client import UrzaLibraryClient
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import PUBLISHER, SEED0, SEED1, Rig, S, host_params, make_config
from tests.urza.helpers import StalledServer, wait_for_io_threads

# A liveness bound, not a speed target: one step of this tiny host takes milliseconds, while a
# step that waited for the stalled store would take the server's whole 60 s stall.
STEP_BOUND_S = 5.0


def test_a_stalled_store_never_blocks_a_step(tmp_path: Path, store: Path, keyring: Keyring, mlp):
    with StalledServer(store) as server:
        config = make_config(tmp_path, store, urza_timeout_s=30.0, fetch_workers=2)
        trusted = PUBLISHER.trusted_publishers()
        urza = UrzaLibraryClient(server.url, trusted, timeout_s=30.0, retries=2, backoff_s=0.0)
        rig = Rig(config, keyring, urza_client=urza)
        manager = rig.manager
        rig.train(1)
        baseline = threading.active_count()
        peak = baseline
        sent = 0
        longest = 0.0
        before = host_params(rig)
        started = time.monotonic()
        for seed_id in [SEED0, SEED1] * 5:  # ten GERMINATEs, each stalled
            cmd = make_seed_command("germinate", seed_id, mlp, timeout_s=1.0)
            assert manager.handle_adaptation_command(rig.signed(cmd))
            sent += 1
        server.wait_for_payload_requests(1)
        refused = 0
        while refused < sent and time.monotonic() - started < 30:
            t0 = time.monotonic()
            report = rig.train(1)
            longest = max(longest, time.monotonic() - t0)
            refused += sum(not o.ok for o in report["commands"])
            peak = max(peak, threading.active_count())
            time.sleep(0.01)
        assert refused == sent, manager.command_log
        assert longest < STEP_BOUND_S
        reasons = [entry[3] for entry in list(manager.command_log)[-sent:]]
        # Each ended by its deadline, or was refused at once by the client's cap on stalled
        # reads or its open breaker: never a wait on the store.
        assert all(r.startswith("loading its kernel failed: UrzaUnavailableError") for r in reasons)
        assert rig.stage(SEED0) == S.DORMANT and rig.stage(SEED1) == S.DORMANT
        assert any(not (a == b).all() for a, b in zip(before, host_params(rig), strict=True))
        # Bounded: the fetch workers, the client's capped I/O threads, the HTTP server's
        # handlers for the stalled requests and fsspec's event loop; never one per command.
        bound = config.fetch_workers + urza.max_stalled_reads + urza.max_stalled_reads + 2
        assert peak - baseline <= bound, (peak, baseline)
        manager.close()
    wait_for_io_threads(0)


def test_close_ends_an_in_flight_fetch(tmp_path: Path, store: Path, keyring: Keyring, mlp):
    """After ``close`` no fetch worker waits on the stalled store (so neither does the
    interpreter's exit, which joins them) and no retry starts. Uninterrupted, the fetch would
    wait out the read's 30 s timeout and then retry, for as long as its 120 s command timeout."""
    with StalledServer(store) as server:
        config = make_config(
            tmp_path,
            store,
            urza_url=server.url,
            urza_timeout_s=30.0,
            urza_retries=3,
            urza_backoff_s=0.1,
            fetch_workers=1,
        )  # the manager's own client: close() closes it (one passed in is the caller's)
        rig = Rig(config, keyring)
        manager = rig.manager
        rig.train(1)
        before = set(threading.enumerate())  # other tests' idle workers may still be alive
        cmd = make_seed_command("germinate", SEED0, mlp, timeout_s=120.0)
        assert manager.handle_adaptation_command(rig.signed(cmd))
        server.wait_for_payload_requests(1)
        new = set(threading.enumerate()) - before
        workers = [t for t in new if t.name.startswith("kasmina-fetch")]
        assert len(workers) == 1
        manager.close()
        for worker in workers:
            worker.join(timeout=10)  # a hang guard: the fetch ends at once
            assert not worker.is_alive()
        assert server.payload_requests == 1  # no retry began after close
        assert rig.stage(SEED0) == S.DORMANT
    wait_for_io_threads(0)


def test_close_ends_a_fetch_that_runs_under_the_managers_lock(
    tmp_path: Path, store: Path, keyring: Keyring, mlp
):
    """``manager.execute`` fetches a GERMINATE's kernel on the training thread, holding the
    manager's lock. ``close()`` on another thread took that lock before it closed the store
    client, so it waited for the fetch to run its read timeout and retries out."""
    from kasmina.control.commands import to_kasmina_command

    with StalledServer(store) as server:
        config = make_config(
            tmp_path, store, urza_url=server.url, urza_timeout_s=30.0, urza_retries=3,
            urza_backoff_s=0.1,
        )  # fmt: skip
        rig = Rig(config, keyring)
        manager = rig.manager
        rig.train(1)
        cmd = to_kasmina_command(make_seed_command("germinate", SEED0, mlp, timeout_s=120.0))
        raised: list[BaseException] = []

        def execute() -> None:
            try:
                manager.execute(cmd)
            except BaseException as e:  # what the trainer saw: checked below
                raised.append(e)

        trainer = threading.Thread(target=execute)
        trainer.start()
        server.wait_for_payload_requests(1)
        started = time.monotonic()
        manager.close()
        closed_in = time.monotonic() - started
        trainer.join(timeout=30)
        assert not trainer.is_alive()
        # The command ends as one on a closed manager does: a RuntimeError naming the close.
        assert len(raised) == 1 and isinstance(raised[0], RuntimeError), raised
        assert "closed" in str(raised[0])
        assert closed_in < 10.0, closed_in  # the read's own timeout is 30 s
        assert server.payload_requests == 1  # no retry began after close
        assert rig.stage(SEED0) == S.DORMANT
    wait_for_io_threads(0)


@pytest.mark.parametrize("ahead", [True, False])
def test_a_rollback_that_must_fetch_a_kernel_again_never_holds_a_step(
    tmp_path: Path, store: Path, keyring: Keyring, mlp, ahead: bool
):
    """A ROLLBACK that puts back a kernel no longer cached fetched it on the training thread,
    inside ``step()``, with no deadline: a stalled store held the step for the client's
    timeouts and retries (30 s a read here, two attempts). Its first safe point now starts that
    fetch on a worker (``CommandQueue``): the steps go on while the store stalls, and the
    first after the command's timeout refuses it, nothing changed. Without the fetch-ahead
    (``rollback_kernels`` None) the fetch is its application's, bounded by that timeout."""
    from kasmina.control.builders import make_rollback_command

    with StalledServer(store) as server:
        config = make_config(
            tmp_path, store, urza_url=server.url, urza_timeout_s=30.0, urza_retries=1,
            urza_backoff_s=0.0, checkpoint_mode="memory",
        )  # fmt: skip
        rig = Rig(config, keyring)
        manager = rig.manager
        if not ahead:
            manager.pending.rollback_kernels = None
        server.released.set()  # the store answers until the rollback
        rig.train(1)
        assert rig.send("germinate", SEED0, mlp)
        rig.train(1)
        manager.end_epoch(0)  # the checkpoint: SEED0 holds the kernel
        assert rig.send("cull", SEED0)
        rig.train(1)
        manager.kernel_cache.evict(mlp)
        server.released.clear()  # payloads stall from here on
        cmd = make_rollback_command(0, timeout_s=1.0)
        assert manager.handle_adaptation_command(rig.signed(cmd))
        outcomes, steps, started = [], 0, time.monotonic()
        while not outcomes and time.monotonic() - started < STEP_BOUND_S:
            step_started = time.monotonic()
            outcomes = rig.train(1)["commands"]
            steps += 1
            assert time.monotonic() - step_started < (0.9 if ahead else STEP_BOUND_S)
            time.sleep(0.05)
        server.released.set()
        ((kind, ok, reason),) = [(o.kind, o.ok, o.reason) for o in outcomes]
        assert kind == "rollback" and not ok and "Urza" in reason, reason
        assert steps > 1 if ahead else steps == 1  # held while its fetch ran, steps going on
        assert rig.stage(SEED0) != S.ISOLATED_INIT  # nothing was restored
        given_back = time.monotonic() + 30  # the abandoned fetch ends, and its pin goes too
        while manager.kernel_cache._pins and time.monotonic() < given_back:
            time.sleep(0.05)
        assert not manager.kernel_cache._pins
        manager.close()
    wait_for_io_threads(0)
