"""A queued GERMINATE's kernel stays cached for it until it has applied (``CommandQueue``).

The cache evicts least recently used unpinned kernels. Between a command's fetch and its
GERMINATE, another command's fetch used to evict the first kernel: the GERMINATE was refused
("evicted ... load it again"), or, when its safe point had found the kernel cached, it loaded it
again from the store on the training thread, inside ``step()``. Each test gives the cache room
for one kernel and two GERMINATEs of different kernels.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kasmina.control.builders import make_seed_command
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import SEED0, SEED1, Rig, S, make_config


def _rig_with_room_for_one(tmp_path: Path, store: Path, keyring: Keyring, ids: list[str]) -> Rig:
    """A rig whose cache holds the larger of the kernels ``ids``, never both; the cache empty."""
    rig = Rig(make_config(tmp_path, store), keyring)
    cache = rig.manager.kernel_cache
    sizes = [rig.manager.loader.original(a).get_memory_size() for a in ids]
    cache.clear()
    cache.max_bytes = max(sizes)
    assert cache.max_bytes < sum(sizes)
    return rig


def _culled_after_a_checkpoint(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str, affine: str
) -> Rig:
    """SEED0 held ``mlp`` at epoch 0's checkpoint, then was culled; the cache emptied, with
    room for the larger of ``mlp`` and ``affine``, never both: a ROLLBACK to epoch 0 must load
    ``mlp`` again."""
    rig = Rig(make_config(tmp_path, store, checkpoint_mode="memory"), keyring)
    manager = rig.manager
    rig.train(1)
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    manager.end_epoch(0)
    assert rig.send("cull", SEED0)
    rig.train(1)
    cache = manager.kernel_cache
    sizes = [manager.loader.original(a).get_memory_size() for a in (mlp, affine)]
    cache.clear()
    cache.max_bytes = max(sizes)
    return rig


def _reads(rig: Rig) -> list[tuple[str, str]]:
    """``(artifact id, thread name)`` of every store fetch from here on."""
    reads: list[tuple[str, str]] = []
    client = rig.manager.urza_client
    real = client.fetch

    def fetch(artifact_id: str, **kwargs: Any) -> Any:
        reads.append((artifact_id, threading.current_thread().name))
        return real(artifact_id, **kwargs)

    client.fetch = fetch
    return reads


def _germinate(rig: Rig, seed_id: str, artifact_id: str) -> None:
    cmd = make_seed_command("germinate", seed_id, artifact_id, timeout_s=60.0)
    assert rig.manager.handle_adaptation_command(rig.signed(cmd))


def test_two_fetched_kernels_both_apply_with_room_for_one(
    tmp_path: Path, store: Path, keyring: Keyring, published
) -> None:
    """Both fetches finish before the safe point: the second finds the first pinned for its
    command and is served uncached, so both GERMINATEs apply (the second's put evicted the
    first, which was refused), and neither kernel is read twice. The pins are given back."""
    _, mlp, affine = published
    rig = _rig_with_room_for_one(tmp_path, store, keyring, [mlp, affine])
    reads = _reads(rig)
    _germinate(rig, SEED0, mlp)
    _germinate(rig, SEED1, affine)
    deadline = time.monotonic() + 60
    while not all(e.fetch is not None and e.fetch.done() for e in rig.manager.pending._queue):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    outcomes = rig.manager.apply_pending()
    assert [(o.target, o.ok, o.reason) for o in outcomes] == [(SEED0, True, ""), (SEED1, True, "")]
    assert rig.stage(SEED0) == S.ISOLATED_INIT and rig.stage(SEED1) == S.ISOLATED_INIT
    assert sorted(a for a, _ in reads) == sorted([mlp, affine])
    cache = rig.manager.kernel_cache
    # The seed whose kernel is cached holds the one pin (the other's was served uncached).
    assert sum(cache._pins.values()) == 1
    rig.manager.close()


def test_a_kernel_found_cached_at_the_safe_point_is_never_fetched_in_the_step(
    tmp_path: Path, store: Path, keyring: Keyring, published
) -> None:
    """GERMINATE A finds its kernel cached; GERMINATE B's fetch finishes while A's safe point
    makes the nonces durable. B's put used to evict A, and A's GERMINATE then read the store on
    the training thread, inside ``step()``. A stays pinned for its command: B's kernel is
    served uncached, and nothing is read in the step."""
    _, mlp, affine = published
    rig = _rig_with_room_for_one(tmp_path, store, keyring, [mlp, affine])
    manager = rig.manager
    manager.loader.original(mlp)  # cached: its GERMINATE starts no fetch
    reads = _reads(rig)
    gate = threading.Event()
    fetch = manager.urza_client.fetch

    def held_fetch(artifact_id: str, **kwargs: Any) -> Any:
        if artifact_id == affine:
            assert gate.wait(60)
        return fetch(artifact_id, **kwargs)

    manager.urza_client.fetch = held_fetch
    verifier = manager.intake.verifier
    make_durable = verifier.make_durable
    fetched: list[bool] = []

    def durable_while_b_lands() -> None:
        make_durable()
        if gate.is_set():
            return
        gate.set()
        entry = next(e for e in manager.pending._queue if e.artifact_id == affine)
        entry.fetch.result(timeout=60)  # B's kernel loaded (and put, or served uncached)
        fetched.append(True)

    verifier.make_durable = durable_while_b_lands
    _germinate(rig, SEED0, mlp)
    _germinate(rig, SEED1, affine)
    report = rig.train(1)
    assert fetched == [True]
    assert [(o.target, o.ok) for o in report["commands"]] == [(SEED0, True)]
    assert reads == [(affine, reads[0][1])] and reads[0][1] != threading.current_thread().name
    report = rig.train(1)  # B applies with its kernel, served uncached
    assert [(o.target, o.ok) for o in report["commands"]] == [(SEED1, True)]
    assert rig.stage(SEED0) == S.ISOLATED_INIT and rig.stage(SEED1) == S.ISOLATED_INIT
    assert len(reads) == 1
    rig.manager.close()


def test_a_rollback_pins_the_kernel_it_copies(
    tmp_path: Path, store: Path, keyring: Keyring, published
) -> None:
    """A ROLLBACK that puts a kernel back loads it and copies it; a fetch-ahead's put landing
    between the two evicted and released it, and the whole rollback was refused ("evicted ...
    load it again") for traffic that had nothing to do with it. Pinned across the copy."""
    from kasmina.control.builders import make_rollback_command

    _, mlp, affine = published
    rig = _culled_after_a_checkpoint(tmp_path, store, keyring, mlp, affine)
    manager = rig.manager
    copy = manager.loader.copy

    def copy_while_a_fetch_lands(original: Any) -> Any:
        if original.artifact_id == mlp:
            manager.pending.fetch(affine, None).result()  # another command's fetch: its put
        return copy(original)

    manager.loader.copy = copy_while_a_fetch_lands
    manager.pending.rollback_kernels = None  # its application loads the kernel (no fetch-ahead)
    assert manager.handle_adaptation_command(rig.signed(make_rollback_command(0, timeout_s=60)))
    report = rig.train(1)
    assert [(o.kind, o.ok, o.reason) for o in report["commands"]] == [("rollback", True, "")]
    assert rig.stage(SEED0) == S.ISOLATED_INIT and manager.seed(SEED0).kernel is not None
    manager.close()


def _a_fetch_lands_before_the_first_pin(rig: Rig, kernel_id: str, other: str) -> list[str]:
    """The first pin of ``kernel_id`` comes after another command's fetch of ``other`` put
    its kernel (evicting ``kernel_id``'s, the cache having room for one); the evicted
    ``kernel_id`` of each such pin is listed."""
    manager = rig.manager
    pin, evicted = manager.loader.pin, []

    def pin_after_a_fetch(artifact_id: str, original: Any = None) -> bool:
        if artifact_id == kernel_id and not evicted:
            manager.pending.fetch(other, None).result()  # another command's fetch: its put
            evicted.append(artifact_id)
        return pin(artifact_id, original)

    manager.loader.pin = pin_after_a_fetch
    return evicted


def test_a_direct_germinate_pins_the_kernel_it_loaded(
    tmp_path: Path, store: Path, keyring: Keyring, published
) -> None:
    """A GERMINATE executed directly (``manager.execute``, not queued) loads its kernel, then
    pins it: a fetch-ahead's put landing between the two evicted and released it, and the
    GERMINATE was refused ("evicted ... load it again"). The kernel is loaded again then."""
    from kasmina.control.builders import make_seed_command
    from kasmina.control.commands import to_kasmina_command

    _, mlp, affine = published
    rig = _rig_with_room_for_one(tmp_path, store, keyring, [mlp, affine])
    manager = rig.manager
    rig.train(1)
    evicted = _a_fetch_lands_before_the_first_pin(rig, mlp, affine)
    assert manager.execute(to_kasmina_command(make_seed_command("germinate", SEED0, mlp)))
    assert evicted == [mlp]
    assert rig.stage(SEED0) == S.ISOLATED_INIT
    assert manager.loader.counters["evicted_before_pin"] == 1
    assert manager.kernel_cache._pins == {mlp: 1}  # the seed's pin, none left over
    rig.train(1)
    manager.close()


def test_a_rollback_pins_the_kernel_it_loaded(
    tmp_path: Path, store: Path, keyring: Keyring, published
) -> None:
    """As above for a ROLLBACK putting back a kernel no longer cached."""
    from kasmina.control.builders import make_rollback_command

    _, mlp, affine = published
    rig = _culled_after_a_checkpoint(tmp_path, store, keyring, mlp, affine)
    manager = rig.manager
    evicted = _a_fetch_lands_before_the_first_pin(rig, mlp, affine)
    manager.pending.rollback_kernels = None  # its application loads the kernel (no fetch-ahead)
    assert manager.handle_adaptation_command(rig.signed(make_rollback_command(0, timeout_s=60)))
    report = rig.train(1)
    assert [(o.kind, o.ok, o.reason) for o in report["commands"]] == [("rollback", True, "")]
    assert evicted == [mlp]
    assert rig.stage(SEED0) == S.ISOLATED_INIT and manager.seed(SEED0).kernel is not None
    assert manager.kernel_cache._pins == {mlp: 1}
    manager.close()


def test_a_rollback_fetches_its_kernels_ahead_and_keeps_them_pinned(
    tmp_path: Path, store: Path, keyring: Keyring, published
) -> None:
    """A ROLLBACK whose checkpoint attaches a kernel no longer cached fetched it when it was
    applied, on the training thread, inside ``step()``. Its first safe point starts that fetch
    on a worker and pins the kernel for it once cached: it applies at a later safe point,
    reading nothing from the store there, and another command's fetch meanwhile (a cache with
    room for one) evicts nothing it needs."""
    from kasmina.control.builders import make_rollback_command

    _, mlp, affine = published
    rig = _culled_after_a_checkpoint(tmp_path, store, keyring, mlp, affine)
    manager, cache = rig.manager, rig.manager.kernel_cache
    reads = _reads(rig)
    assert manager.handle_adaptation_command(rig.signed(make_rollback_command(0, timeout_s=60)))
    outcomes, deadline = [], time.monotonic() + 60
    while not outcomes:
        assert time.monotonic() < deadline
        outcomes = rig.train(1)["commands"]
        if reads and not any(a == affine for a, _ in reads):
            manager.pending.fetch(affine, None).result()  # served uncached: mlp is pinned
    assert [(o.kind, o.ok, o.reason) for o in outcomes] == [("rollback", True, "")]
    assert rig.stage(SEED0) == S.ISOLATED_INIT and manager.seed(SEED0).kernel is not None
    assert [a for a, _ in reads] == [mlp, affine]
    assert all(thread.startswith("kasmina-fetch") for _, thread in reads), reads
    assert cache._pins == {mlp: 1}  # the seed's own; the command's given back
    manager.close()


def test_a_rollback_fetches_ahead_only_what_it_would_load(
    tmp_path: Path, store: Path, keyring: Keyring, published
) -> None:
    """The fetch-ahead asked for every kernel the checkpoint attaches: with the store down, a
    ROLLBACK that needed none (its seed still holds the checkpoint's kernel, served uncached)
    was refused for one it would never load. It asks for each seed's kernel the seed does not
    hold now; and a snapshot that is no epoch's checkpoint (a multi-rank repair's export)
    leaves the record of what each checkpoint attaches as it was."""
    from kasmina.control.builders import make_rollback_command
    from kasmina.manager.rollback import kernels_to_fetch, snapshot

    _, mlp, affine = published
    rig = Rig(make_config(tmp_path, store, checkpoint_mode="memory"), keyring)
    manager = rig.manager
    manager.kernel_cache.max_bytes = 1  # every kernel served uncached: nothing pinned
    rig.train(1)
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    manager.end_epoch(0)
    assert kernels_to_fetch(manager.state, 0) == []  # SEED0 holds it
    assert rig.send("germinate", SEED1, affine)
    snapshot(manager.state, 0)  # not a checkpoint: records nothing
    assert manager.state.saved_kernels == {0: {SEED0: mlp}}

    def down(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("store down")

    manager.urza_client.fetch = down
    assert manager.handle_adaptation_command(rig.signed(make_rollback_command(0, timeout_s=60)))
    report = rig.train(1)
    assert [(o.kind, o.ok, o.reason) for o in report["commands"]] == [("rollback", True, "")]
    assert rig.stage(SEED1) == S.DORMANT and manager.seed(SEED0).kernel is not None
    manager.close()


def test_a_rollback_in_a_bounded_sync_is_not_fetched_ahead(
    tmp_path: Path, store: Path, keyring: Keyring, published
) -> None:
    """Inside a multi-rank sync (``fetches_bounded``: every rank applies or refuses alike,
    within the sync's bound) a ROLLBACK waited out its own timeout for its fetch-ahead, past
    the bound. There it asks for nothing, and its application's fetch is bounded."""
    from kasmina.control.builders import make_rollback_command
    from kasmina.manager.rollback import fetches_bounded

    _, mlp, affine = published
    rig = _culled_after_a_checkpoint(tmp_path, store, keyring, mlp, affine)
    manager, stalled = rig.manager, threading.Event()

    def stall(*args: Any, deadline: float | None = None, **kwargs: Any) -> Any:
        stalled.wait(30 if deadline is None else max(0.0, deadline - time.monotonic()))
        raise ConnectionError("stalled")  # as a client does at the fetch's deadline

    manager.urza_client.fetch = stall
    assert manager.handle_adaptation_command(rig.signed(make_rollback_command(0, timeout_s=20)))
    started = time.monotonic()
    with fetches_bounded(1.0):
        outcomes = manager.apply_pending(wait=True)
    took = time.monotonic() - started
    stalled.set()
    assert [(o.kind, o.ok) for o in outcomes] == [("rollback", False)]
    assert took < 10, took
    manager.close()


@pytest.mark.parametrize("kind", ["germinate", "rollback"])
def test_a_fetch_that_lands_after_close_dropped_its_command_gives_its_pin_back(
    tmp_path: Path, store: Path, keyring: Keyring, published, kind: str
) -> None:
    """A GERMINATE's (or a ROLLBACK's fetch-ahead's) fetch worker pins the kernel it loaded and
    records the pin on the command; a ``close()`` on another thread meanwhile dropped the
    command and gave back what it held then (nothing yet). The pin taken after is the dropped
    command's to give back at once: kept, it held the kernel in the cache for good."""
    from kasmina.control.builders import make_rollback_command

    _, mlp, affine = published
    if kind == "germinate":
        rig = Rig(make_config(tmp_path, store), keyring)
        rig.manager.kernel_cache.clear()
    else:
        rig = _culled_after_a_checkpoint(tmp_path, store, keyring, mlp, affine)
    manager = rig.manager
    read, go = threading.Event(), threading.Event()
    client = manager.urza_client
    real = client.fetch

    def fetch(artifact_id: str, **kwargs: Any) -> Any:
        got = real(artifact_id, **kwargs)  # read before the close, handed on after it
        read.set()
        assert go.wait(30)
        return got

    client.fetch = fetch
    if kind == "germinate":
        _germinate(rig, SEED0, mlp)
    else:
        rollback = rig.signed(make_rollback_command(0, timeout_s=60))
        assert manager.handle_adaptation_command(rollback)
        assert rig.train(1)["commands"] == []  # its safe point starts the fetch-ahead
    assert read.wait(30)
    (entry,) = list(manager.pending._queue)
    manager.close()
    go.set()
    (fetch,) = [entry.fetch] if kind == "germinate" else entry.ahead
    assert fetch is not None and fetch.result(timeout=30) is not None
    assert mlp in manager.kernel_cache and not manager.kernel_cache.is_pinned(mlp)


def test_a_rollback_whose_kernel_is_cached_pins_it_at_its_safe_point_and_gives_it_back(
    tmp_path: Path, store: Path, keyring: Keyring, published
) -> None:
    """A ROLLBACK's first safe point pins each of its kernels already cached, for it, and asks
    no fetch worker for it; the pin is the command's, given back once it has applied: the
    seed's own pin is all that is left."""
    from kasmina.control.builders import make_rollback_command

    _, mlp, affine = published
    rig = _culled_after_a_checkpoint(tmp_path, store, keyring, mlp, affine)
    manager, cache = rig.manager, rig.manager.kernel_cache
    manager.loader.original(mlp)  # cached again, unpinned
    reads, submitted = _reads(rig), []
    real_submit = manager.pending._submit
    manager.pending._submit = lambda *a, **k: submitted.append(a) or real_submit(*a, **k)
    assert manager.handle_adaptation_command(rig.signed(make_rollback_command(0, timeout_s=60)))
    outcomes = rig.train(1)["commands"]
    assert submitted == []  # nothing for a fetch worker to do
    assert [(o.kind, o.ok, o.reason) for o in outcomes] == [("rollback", True, "")]
    assert rig.stage(SEED0) == S.ISOLATED_INIT and reads == []
    assert cache._pins == {mlp: 1}  # the seed's own; the command's given back
    manager.close()
