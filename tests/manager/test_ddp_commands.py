"""``DistributedKasmina`` in one process, no process group: commands held by the coordinator for
the next epoch sync (a command queued before the manager joined, carried out on one rank,
interrupted by a Ctrl-C, or held as the coordinator closes, is refused or kept, never lost), the
kernel fetches of a sync's prepares (bounded by one time budget per sync, shared, pinned until
applied; a rollback's or repair's fetch bounded alike), and the hosts ``wrap_ddp`` refuses
(FSDP, DataParallel) or names at the step."""

from __future__ import annotations

import re
import signal
import threading
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from kasmina.control.builders import make_rollback_command, make_seed_command
from kasmina.control.processes import UnsupportedParallelismError
from kasmina.manager.coordination import ManagerApplier, ManagerReplica
from kasmina.manager.ddp import DistributedKasmina, kasmina_owned_names, wrap_ddp
from tests.manager.ddp_helpers import _signed
from tests.manager.helpers import SEED0, SEED1, Rig, S, make_config


def test_without_a_process_group_ddp_wrapping_is_the_identity(tmp_path, store, keyring) -> None:
    rig = Rig(make_config(tmp_path, store), keyring)
    assert wrap_ddp(rig.model) is rig.model
    # Options a grown model cannot keep are refused here too: a slot whose seeds are isolated
    # leaves the host layers before it unused, and DDP would never reduce their bucket.
    for options in ({"static_graph": True}, {"find_unused_parameters": False}):
        with pytest.raises(ValueError, match="ranks split"):
            wrap_ddp(rig.model, **options)
    names = kasmina_owned_names(rig.model)
    assert names and all(n.startswith("out.") and not n.startswith("out.host.") for n in names)
    dk = DistributedKasmina(rig.manager)
    assert rig.manager.command_relay is not None and dk.world_size == 1
    with pytest.raises(ValueError, match="already part of a distributed run"):
        DistributedKasmina(rig.manager)
    rig.train(1)  # the seed all-reduce is a no-op in one process
    dk.close()
    assert rig.manager.command_relay is None and rig.manager.grad_sync is None


@pytest.mark.parametrize("closing", ["manager", "coordinator"])
def test_a_command_accepted_as_the_coordinator_closes_is_reported_refused(
    tmp_path, store, keyring, closing: str
) -> None:
    """The coordinator verifies a command, then holds it for the next sync. A close (the
    manager's, or the coordinator's own) that took the held commands between the two left this
    one held for a sync that never came: counted accepted, never reported. It is refused."""
    rig = Rig(make_config(tmp_path, store), keyring)
    manager = rig.manager
    dk = DistributedKasmina(manager)
    closed: list[bool] = []

    class CloseOnAck:  # the close runs while the command is in its check
        def send(self, packet) -> None:
            if not closed and any(m.name == "command.ack" for m in packet.metrics):
                closed.append(True)
                (manager.close if closing == "manager" else dk.close)()

    manager.telemetry.add_sink(CloseOnAck())
    assert not manager.handle_adaptation_command(rig.signed(make_seed_command("cull", SEED0)))
    stats = manager.handler.stats
    assert closed and stats["accepted"] == stats["failed"] == 1 and dk.coordinator.pending == 0
    assert manager.command_log[-1][2:] == (
        False,
        "the multi-rank coordinator closed before its next sync",
    )
    manager.close()


def test_a_second_trainer_of_a_run_is_refused_when_it_joins(tmp_path, store, keyring) -> None:
    """Ranks given one run_id and their own nonce ledgers would write the same checkpoint
    files: the second is refused as its ``DistributedKasmina`` is built, before it trains, or
    as its manager is built once the run's checkpoint directory is there."""

    def rank_rig(name: str) -> Rig:
        ledger = str(tmp_path / f"nonces-{name}.log")
        return Rig(make_config(tmp_path, store, run_id="shared", nonce_ledger=ledger), keyring)

    first = rank_rig("rank0").manager  # held: a collected manager's lock goes with it
    second = rank_rig("rank1").manager  # built before any store of the run was opened
    joined = DistributedKasmina(first)
    with pytest.raises(RuntimeError, match="held by another live trainer.*its own run_id"):
        DistributedKasmina(second)
    assert second.command_relay is None and second.grad_sync is None
    assert joined.state is first.state and first.command_relay is not None
    with pytest.raises(RuntimeError, match="held by another live trainer.*its own run_id"):
        rank_rig("rank2")  # the run's checkpoints are there: refused as it starts


def test_a_command_waits_for_the_sync_and_then_applies(tmp_path, store, keyring, mlp) -> None:
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    raw = _signed(rig, "germinate", SEED0, mlp)
    assert rig.manager.handle_adaptation_command(raw)
    rig.train(2)  # the step's safe point does not apply it: it waits for every rank
    assert rig.stage(SEED0) == S.DORMANT and dk.coordinator.pending == 1
    rig.manager.end_epoch(0)
    result = dk.sync_epoch(0)
    assert result.outcomes == (True,) and rig.stage(SEED0) == S.ISOLATED_INIT
    assert not rig.manager.handle_adaptation_command(raw)  # a replay, refused on arrival
    assert rig.manager.command_log[-1][2] is True


def test_a_command_queued_before_the_manager_joins_a_multi_rank_run_is_refused(
    tmp_path, store, keyring, mlp
) -> None:
    """Queued by the manager's own door before ``DistributedKasmina`` took it over, a command
    was applied by this rank's next safe point alone: on one rank only, the others repaired
    to it with no command in any sync's result. It is refused when the manager joins."""
    rig = Rig(make_config(tmp_path, store), keyring)
    assert rig.manager.handle_adaptation_command(_signed(rig, "germinate", SEED0, mlp))
    dk = DistributedKasmina(rig.manager)
    log = rig.manager.command_log[-1]
    assert log[2] is False and "joined a multi-rank run" in log[3]
    rig.train(1)
    rig.manager.end_epoch(0)
    assert dk.sync_epoch(0).commands == () and rig.stage(SEED0) == S.DORMANT
    stats = rig.manager.handler.stats
    assert (stats["accepted"], stats["failed"]) == (1, 1)
    # One the manager's own door verified as it joined, queued after: refused the same way.
    assert not rig.manager.intake.arrive(_signed(rig, "germinate", SEED1, mlp))
    assert "joined a multi-rank run" in rig.manager.command_log[-1][3]
    dk.close()  # single-process again: its own queue takes commands
    assert rig.manager.handle_adaptation_command(_signed(rig, "germinate", SEED1, mlp))
    # Applied at a safe point once its kernel is fetched (on a worker: maybe not by the next).
    assert [o.ok for o in rig.manager.apply_pending(wait=True)] == [True]
    assert rig.stage(SEED1) == S.ISOLATED_INIT


def test_a_command_the_relay_refused_after_a_safe_point_polled_it_is_not_applied(
    tmp_path, store, keyring, mlp
) -> None:
    """A safe point polls the queue, then takes what was ready. The manager joining a
    multi-rank run between the two (on another thread) took those commands off and reported
    them refused; the safe point took and applied them all the same, on this rank alone, each
    reported twice. It takes only what is still queued."""
    rig = Rig(make_config(tmp_path, store), keyring)
    manager = rig.manager
    manager.loader.original(mlp)  # cached: ready at once
    assert manager.handle_adaptation_command(_signed(rig, "germinate", SEED0, mlp))
    queue = manager.intake.queue
    poll = queue.poll_ready
    joined: list[DistributedKasmina] = []

    def poll_then_join(**kwargs: Any) -> Any:
        ready = poll(**kwargs)
        if ready and not joined:
            joined.append(DistributedKasmina(manager))
        return ready

    queue.poll_ready = poll_then_join  # type: ignore[method-assign]
    assert manager.apply_pending() == []
    stats = manager.handler.stats
    assert (stats["accepted"], stats["executed"], stats["failed"]) == (1, 0, 1)
    assert rig.stage(SEED0) == S.DORMANT and "joined a multi-rank run" in manager.command_log[-1][3]
    joined[0].close()
    manager.close()


def test_a_command_carried_out_directly_on_one_rank_is_refused(tmp_path, store, keyring, mlp):
    """The handler's own door calls the manager's ``execute``, which carried the command out at
    once, on this rank alone: the ranks' layouts then differed, every seed gradient was dropped
    on every rank, and the sync repaired the rank back, undoing what its door reported done."""
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    assert not rig.manager.handler.handle_adaptation_command(_signed(rig, "germinate", SEED0, mlp))
    assert rig.stage(SEED0) == S.DORMANT and "every rank or none" in rig.manager.command_log[-1][3]
    stats = rig.manager.handler.stats
    assert (stats["accepted"], stats["executed"], stats["failed"]) == (1, 0, 1)
    dk.close()  # single-process again: carried out at once, as before
    assert rig.manager.handler.handle_adaptation_command(_signed(rig, "germinate", SEED0, mlp))
    assert rig.stage(SEED0) == S.ISOLATED_INIT


@pytest.mark.usefixtures("sigint_raises")
def test_a_ctrl_c_in_a_sync_before_it_applies_keeps_every_command_for_the_next(
    tmp_path, store, keyring, mlp, monkeypatch
) -> None:
    """A Ctrl-C while the sync prepared (a kernel fetch) lost every command it had taken:
    accepted, nonces used, never applied, refused or reported, and the next sync had none."""
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    original, calls = rig.manager.loader.original, []

    def fetch_then_ctrl_c(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(rig.manager.loader, "original", fetch_then_ctrl_c)
    assert dk.submit(_signed(rig, "germinate", SEED0, mlp))
    assert dk.submit(_signed(rig, "germinate", SEED1, mlp))
    with pytest.raises(KeyboardInterrupt):
        dk.sync_epoch(0)
    assert dk.coordinator.pending == 2 and rig.manager.handler.stats["executed"] == 0
    assert dk.sync_epoch(0).outcomes == (True, True)
    assert rig.stage(SEED0) == rig.stage(SEED1) == S.ISOLATED_INIT


def test_close_refuses_the_commands_held_for_the_next_sync(tmp_path, store, keyring, mlp) -> None:
    """``manager.close()`` refused its own queue only: commands the coordinator held were
    never reported; ``DistributedKasmina.close()`` (single-process again) refuses them too."""
    for closing in ("manager", "coordinator"):
        rig = Rig(make_config(tmp_path / closing, store), keyring)
        dk = DistributedKasmina(rig.manager)
        assert rig.manager.handle_adaptation_command(_signed(rig, "germinate", SEED0, mlp))
        assert dk.coordinator.pending == 1
        (rig.manager if closing == "manager" else dk).close()
        stats = rig.manager.handler.stats
        assert dk.coordinator.pending == 0 and (stats["accepted"], stats["failed"]) == (1, 1)
        assert rig.manager.command_log[-1][2] is False
        assert len(rig.sink.events("command.complete")) == 1
        rig.manager.close()


def test_a_kernel_that_cannot_be_fetched_is_refused_before_anything_changes(
    tmp_path, store, keyring
) -> None:
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    raw = _signed(rig, "germinate", SEED0, "mlp-0000000000000000")
    assert dk.submit(raw)
    result = dk.sync_epoch(0)
    assert result.outcomes == (False,)
    assert "could not prepare it" in result.commands[0].reason
    assert rig.stage(SEED0) == S.DORMANT
    assert rig.manager.handler.stats["failed"] == 1


def test_a_kernel_fetched_by_the_prepare_counts_one_miss_and_no_hit(
    tmp_path, store, keyring, mlp
) -> None:
    """The prepare fetched the kernel (a miss); the agreed GERMINATE then looked it up in the
    cache again and counted a hit too: the demo's report gave 5 hits for 2."""
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    cache = rig.manager.kernel_cache
    assert dk.submit(_signed(rig, "germinate", SEED0, mlp))
    assert dk.sync_epoch(0).outcomes == (True,)
    assert (cache.stats()["hits"], cache.stats()["misses"]) == (0, 1)
    assert dk.submit(_signed(rig, "germinate", SEED1, mlp))  # cached now: one hit
    assert dk.sync_epoch(1).outcomes == (True,)
    assert (cache.stats()["hits"], cache.stats()["misses"]) == (1, 1)
    dk.close()
    rig.manager.close()


def test_a_closed_manager_raises_at_the_sync_before_any_collective(
    tmp_path, store, keyring, mlp
) -> None:
    """It took part, refused every command the ranks received as one it "could not verify",
    and reported the ranks consistent; its next step() raised."""
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    assert dk.submit(_signed(rig, "germinate", SEED0, mlp))
    rig.manager.close()
    with pytest.raises(RuntimeError, match="this manager is closed"):
        dk.sync_epoch(0)
    assert dk.coordinator.stats["syncs"] == 0 and not dk.coordinator.history
    dk.close()


def test_a_sync_fetches_no_kernel_for_a_seed_the_model_does_not_have(
    tmp_path, store, keyring, mlp
) -> None:
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    assert dk.submit(_signed(rig, "germinate", "nowhere[0]", mlp))
    result = dk.sync_epoch(0)
    assert result.outcomes == (False,) and "unknown seed" in result.commands[0].reason
    assert len(rig.manager.kernel_cache) == 0 and rig.manager.loader.counters["loads"] == 0
    dk.close()
    rig.manager.close()
    # Ahead of a seed's GERMINATE of the same artifact it took that one's fetch, which then
    # loaded its kernel again (uncached in a cache with no room for it): one load now.
    config = make_config(tmp_path / "small", store, cache_size_mb=1 / 2**20)
    rig = Rig(config, keyring)
    dk = DistributedKasmina(rig.manager)
    assert dk.submit(_signed(rig, "germinate", "nowhere[0]", mlp))
    assert dk.submit(_signed(rig, "germinate", SEED0, mlp))
    assert dk.sync_epoch(0).outcomes == (False, True)
    assert rig.manager.loader.counters["loads"] == 1 and rig.stage(SEED0) == S.ISOLATED_INIT
    dk.close()
    rig.manager.close()


def test_a_fetch_of_a_sync_that_never_applied_is_no_later_commands(
    tmp_path, store, keyring, mlp
) -> None:
    """A prepare's fetch is handed to the GERMINATE of its own sync only: one that raised
    between its prepares and ``apply`` left it for a later sync's command, which then took a
    kernel it never fetched as its own miss."""
    from kasmina.control.commands import to_kasmina_command

    rig = Rig(make_config(tmp_path, store), keyring)
    applier = ManagerApplier(rig.manager.intake, rig.manager.report)
    cache = rig.manager.kernel_cache
    first = to_kasmina_command(make_seed_command("germinate", SEED0, mlp, timeout_s=60.0))
    assert applier.prepare(first) == ""  # fetched: one miss
    applier.begin_sync()  # that sync raised before apply; the next begins
    later = to_kasmina_command(make_seed_command("germinate", SEED1, mlp, timeout_s=60.0))
    assert applier.apply([later]) == [(True, "")]
    assert (cache.stats()["hits"], cache.stats()["misses"]) == (1, 1)  # cached by then: a hit
    rig.manager.close()


def test_a_kernel_a_prepare_found_cached_stays_cached_until_the_sync_applies(
    tmp_path, store, keyring, published
) -> None:
    """A GERMINATE whose kernel was cached passed its prepare unpinned; a later prepare of the
    same sync fetched another kernel, the cache evicted the first to make room, and the first
    GERMINATE fetched it from the store again at apply, bounded by its own timeout only (a
    slow store there held every other rank in the collective until the group timed out). A
    prepare pins what it found or fetched until the sync has applied."""
    from kasmina.control.commands import to_kasmina_command

    _, mlp, aff = published
    rig = Rig(make_config(tmp_path, store, cache_size_mb=100 / 2**20), keyring)
    loader = rig.manager.loader
    loader.original(mlp)  # cached and unpinned, as after a GERMINATE another rank refused
    sizes = {a: loader.cached(a).get_memory_size() for a in (mlp,)}
    fetched: list[str] = []
    fetch = loader._fetch

    def counted(artifact_id: str, *args: Any) -> Any:
        fetched.append(artifact_id)
        return fetch(artifact_id, *args)

    loader._fetch = counted
    commands = [
        to_kasmina_command(make_seed_command("germinate", seed, art, timeout_s=60.0))
        for seed, art in ((SEED0, mlp), (SEED1, aff))
    ]
    applier = ManagerApplier(rig.manager.intake, rig.manager.report, prepare_timeout_s=5.0)
    assert [applier.prepare(command) for command in commands] == ["", ""]
    assert fetched == [aff] and mlp in loader.cache
    assert applier.apply(commands) == [(True, ""), (True, "")]
    assert fetched == [aff]  # nothing fetched again at apply
    assert rig.stage(SEED0) == rig.stage(SEED1) == S.ISOLATED_INIT
    assert rig.manager.kernel_cache.stats()["pinned"] == 1  # SEED0's own: the sync's are gone
    both = sizes[mlp] + rig.manager.seed(SEED1).kernel.get_memory_size()
    assert sizes[mlp] <= 100 < both  # the cache holds one of them, not both
    rig.manager.close()


def test_the_prepares_of_one_sync_share_one_time_bound(tmp_path, store, keyring, mlp) -> None:
    """A fetch that outlasts the bound (its store ignores the deadline) is answered with a
    refusal at the bound; later prepares of the same sync get what is left of it (nothing),
    the next sync a whole one; the fetch itself goes on and fills the cache."""
    from kasmina.control.commands import to_kasmina_command

    rig = Rig(make_config(tmp_path, store), keyring)
    loader, release = rig.manager.loader, threading.Event()
    original = loader.original

    def stalled(artifact_id: str, *, deadline: float | None = None) -> Any:
        release.wait(20.0)
        return original(artifact_id, deadline=deadline)

    loader.original = stalled
    germinate = to_kasmina_command(make_seed_command("germinate", SEED0, mlp, timeout_s=30.0))
    applier = ManagerApplier(rig.manager.intake, rig.manager.report, prepare_timeout_s=0.3)

    def timed(command: Any) -> tuple[str, float]:
        started = time.monotonic()
        problem = applier.prepare(command)
        return problem, time.monotonic() - started

    try:
        first, first_s = timed(germinate)
        second, second_s = timed(germinate)
        applier.apply([])  # the sync is over: the next one gets its own bound
        third, third_s = timed(germinate)
        quick = to_kasmina_command(make_seed_command("germinate", SEED0, mlp, timeout_s=0.2))
        # No process group: the command's own timeout.
        unbounded = ManagerApplier(rig.manager.intake, rig.manager.report)
        by_command = unbounded.prepare(quick)
    finally:
        release.set()
    assert "prepare time was spent (0.3 s" in first and "process group" in first
    assert re.search(r"waited 0\.(2[5-9]|[3-9]\d) s", first)  # the time it waited, stated
    assert 0.25 <= first_s < 5.0 and second_s < 0.2 and 0.25 <= third_s < 5.0
    assert "waited 0.00 s" in second and "prepare time was spent" in second
    assert third.split("waited")[0] == first.split("waited")[0]
    assert by_command.startswith(f"fetching {mlp} did not finish within the command's 0.2 s")
    deadline = time.monotonic() + 30.0
    while mlp not in loader.cache and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mlp in loader.cache
    assert applier.prepare(germinate) == ""  # cached now
    with pytest.raises(ValueError, match="prepare_timeout_s must be > 0"):
        ManagerApplier(rig.manager.intake, rig.manager.report, prepare_timeout_s=0.0)


@pytest.mark.parametrize("path", ["rollback", "repair"])
def test_a_kernel_a_rollback_or_repair_fetches_in_a_sync_is_bounded_like_a_prepare(
    tmp_path, store, keyring, mlp, path: str
) -> None:
    """A ROLLBACK that puts a culled seed's kernel back (or a repair that does) fetched it with
    no deadline in the middle of the sync: one rank's slow store held every other rank in the
    outcome all-gather past the process group's timeout, and every rank raised. The fetch is
    bounded as a prepare is: on a store that keeps it, the rollback is refused on this rank,
    nothing changed, and the repair (and so ``on_divergence``) answers it."""
    from kasmina.control.commands import to_kasmina_command
    from kasmina.errors import UrzaUnavailableError

    rig = Rig(make_config(tmp_path, store), keyring)
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    manager.end_epoch(0)
    payload = ManagerReplica(manager.state, manager.guard, lock=manager.intake.lock).export_state()
    assert rig.send("cull", SEED0)
    rig.train(1)
    manager.end_epoch(1)
    manager.evict_kernel(mlp)
    loader, deadlines = manager.loader, []

    def slow_store(artifact_id: str, *, deadline: float | None = None) -> Any:
        deadlines.append(deadline)  # a store that keeps the deadline, and is slower than it
        time.sleep(min(20.0, max(0.0, deadline - time.monotonic())) if deadline else 20.0)
        raise UrzaUnavailableError(f"{artifact_id}: the store did not answer in time")

    loader.original = slow_store
    stage, started = rig.stage(SEED0), time.monotonic()
    if path == "rollback":
        applier = ManagerApplier(manager.intake, manager.report, prepare_timeout_s=0.3)
        command = to_kasmina_command(make_rollback_command(0))
        ((ok, reason),) = applier.apply([command])
        assert not ok and "did not answer in time" in reason
    else:
        lock = manager.intake.lock
        replica = ManagerReplica(manager.state, manager.guard, lock=lock, fetch_timeout_s=0.3)
        with pytest.raises(UrzaUnavailableError):
            replica.import_state(payload)
    assert time.monotonic() - started < 10.0 and deadlines and deadlines[0] is not None
    assert rig.stage(SEED0) == stage  # nothing changed
    rig.train(1)


def _stalled_loader(rig: Rig) -> tuple[threading.Event, list[str]]:
    """The manager's store made to stall every fetch until the event is set; the list records
    every fetch begun."""
    loader, release, calls = rig.manager.loader, threading.Event(), []
    original = loader.original

    def stalled(artifact_id: str, *, deadline: float | None = None) -> Any:
        calls.append(artifact_id)
        release.wait(20.0)
        return original(artifact_id, deadline=deadline)

    loader.original = stalled
    return release, calls


def test_prepares_of_a_stalled_artifact_share_one_fetch_on_a_bounded_pool(
    tmp_path, store, keyring, mlp
) -> None:
    """Many prepares of one artifact whose fetch stalls start one fetch, not a thread each:
    later ones wait on the same fetch, and the pool never holds more than ``fetch_workers``."""
    from kasmina.control.commands import to_kasmina_command

    rig = Rig(make_config(tmp_path, store), keyring)
    release, calls = _stalled_loader(rig)
    germinate = to_kasmina_command(make_seed_command("germinate", SEED0, mlp, timeout_s=30.0))
    applier = ManagerApplier(rig.manager.intake, rig.manager.report, prepare_timeout_s=0.2)
    before = threading.active_count()
    try:
        problems = [applier.prepare(germinate) for _ in range(50)]
        extra = threading.active_count() - before
    finally:
        release.set()
    assert 0 < extra <= rig.manager.config.fetch_workers
    assert calls == [mlp]  # one fetch for all 50
    assert all("did not finish" in p for p in problems)
    deadline = time.monotonic() + 30.0
    while applier._fetches and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not applier._fetches and mlp in rig.manager.loader.cache  # dropped once done


def test_no_fetch_starts_once_the_sync_prepare_time_is_spent(tmp_path, store, keyring, mlp) -> None:
    """After the sync's budget is spent, a GERMINATE of another uncached artifact is refused
    at once, without a fetch (no thread started for it)."""
    from kasmina.control.commands import to_kasmina_command

    rig = Rig(make_config(tmp_path, store), keyring)
    release, calls = _stalled_loader(rig)
    applier = ManagerApplier(rig.manager.intake, rig.manager.report, prepare_timeout_s=0.2)

    def germinate(artifact_id: str) -> Any:
        return to_kasmina_command(
            make_seed_command("germinate", SEED0, artifact_id, timeout_s=30.0)
        )

    try:
        first = applier.prepare(germinate(mlp))
        started = time.monotonic()
        other = applier.prepare(germinate("mlp-" + "1" * 64))
        other_s = time.monotonic() - started
    finally:
        release.set()
    assert "did not finish" in first
    assert calls == [mlp] and other_s < 0.1
    assert other.startswith("not fetching mlp-1") and "prepare time was spent (0.2" in other


def test_a_sync_after_one_that_raised_before_apply_gets_its_own_prepare_time(
    tmp_path, store, keyring, mlp, monkeypatch
) -> None:
    """A sync that raises between its prepares and ``apply`` (a collective timing out) must not
    leave its spent budget to the next sync: the coordinator begins every sync afresh."""
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    dk.applier.prepare_timeout_s = 1.0  # as a process group would set it
    release, calls = _stalled_loader(rig)
    gather = dk.coordinator._gather_codes

    def collective_times_out(codes: list[int]) -> Any:
        raise RuntimeError("collective timed out")

    monkeypatch.setattr(dk.coordinator, "_gather_codes", collective_times_out)
    try:
        assert dk.submit(_signed(rig, "germinate", SEED0, mlp))
        with pytest.raises(RuntimeError, match="collective timed out"):
            dk.sync_epoch(0)
        time.sleep(1.05)  # the aborted sync's budget is long spent
        monkeypatch.setattr(dk.coordinator, "_gather_codes", gather)
        assert dk.coordinator.pending == 1  # taken by the sync that raised, back for the next
        seen: list[list[str]] = []

        def answer() -> None:  # the store answers within the new budget
            seen.append(list(calls))
            release.set()

        threading.Timer(0.1, answer).start()  # well within the budget, even on a busy machine
        result = dk.sync_epoch(1)
    finally:
        release.set()
    assert result.outcomes == (True,), result.commands
    assert seen == [[mlp]]  # the aborted sync's fetch, still running, served this one
    assert rig.stage(SEED0) == S.ISOLATED_INIT
    dk.close()


def test_fsdp_sharded_hosts_are_refused(tmp_path, store, keyring) -> None:
    from torch.distributed.fsdp import FSDPModule

    rig = Rig(make_config(tmp_path, store), keyring)

    class Sharded(type(rig.model), FSDPModule):  # what fully_shard makes of a module's class
        pass

    rig.model.__class__ = Sharded
    with pytest.raises(UnsupportedParallelismError, match="FSDP"):
        wrap_ddp(rig.model)
    with pytest.raises(UnsupportedParallelismError, match="FSDP"):
        DistributedKasmina(rig.manager)
    with pytest.raises(UnsupportedParallelismError, match="DataParallel"):
        wrap_ddp(torch.nn.DataParallel(torch.nn.Linear(2, 2)))


def test_a_sync_that_fails_after_the_coordinator_closed_reports_its_commands(
    tmp_path, store, keyring
) -> None:
    """A sync that stops before its exchange puts its commands back for the next sync; closed
    meanwhile (a watchdog), the coordinator held them for a sync that never came, accepted
    and never reported. They are refused."""
    rig = Rig(make_config(tmp_path, store), keyring)
    manager = rig.manager
    dk = DistributedKasmina(manager)
    assert manager.handle_adaptation_command(_signed(rig, "cull", SEED0))

    def closed_then_failed(epoch: int, local: Any) -> Any:
        dk.close()
        raise RuntimeError("the collective failed")

    dk.coordinator._exchange = closed_then_failed  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="collective failed"):
        dk.coordinator.sync_epoch(0)
    assert dk.coordinator.pending == 0
    assert manager.command_log[-1][2:] == (False, "the multi-rank coordinator closed")
    manager.close()


def test_a_host_sharded_after_register_is_named_as_such_at_the_step(
    tmp_path, store, keyring
) -> None:
    """``fully_shard`` applied after ``attach`` (no ``wrap_ddp``, no ``DistributedKasmina``):
    the step refused, blaming a reparametrization (``weight_norm``) and never naming FSDP."""
    from torch.distributed.fsdp import fully_shard

    rig = Rig(make_config(tmp_path, store), keyring)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        fully_shard(rig.model.inp)
        rig.model(rig.x).sum().backward()
        with pytest.raises(UnsupportedParallelismError, match="inp is FSDP-sharded"):
            rig.manager.step()
    finally:
        dist.destroy_process_group()
