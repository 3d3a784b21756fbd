"""A GERMINATE queued while its kernel was cached starts no fetch; its kernel is pinned at the
safe point. Evicted in between (``evict_kernel``), the kernel is fetched again from the store
then, once, and the command applies as if nothing had happened."""

from __future__ import annotations

import asyncio

import torch

from kasmina.control.builders import make_seed_command
from tests.manager.helpers import SEED0, Rig, S
from tests.manager.test_pending_pins import _reads


def _queue_germinate(rig: Rig, mlp: str) -> None:
    command = make_seed_command("germinate", SEED0, mlp, timeout_s=60.0)
    assert rig.manager.handle_adaptation_command(rig.signed(command))
    assert len(rig.manager.pending) == 1


def test_a_cached_kernel_applies_without_a_read(rig: Rig, mlp: str) -> None:
    """The baseline: cached when queued and still cached at the safe point, nothing is read."""
    manager = rig.manager
    asyncio.run(manager.load_kernel(mlp))
    reads = _reads(rig)
    _queue_germinate(rig, mlp)
    outcomes = manager.apply_pending(wait=True)
    assert [(o.ok, o.reason) for o in outcomes] == [(True, "")]
    assert reads == [] and rig.stage(SEED0) == S.ISOLATED_INIT
    manager.close()


def test_a_kernel_evicted_before_the_safe_point_is_fetched_again(rig: Rig, mlp: str) -> None:
    """Queued while cached (no fetch started), evicted before the safe point: the safe point
    fetches it on a worker, the GERMINATE applies with the artifact's weights, and only the
    seed's pin is left."""
    manager = rig.manager
    asyncio.run(manager.load_kernel(mlp))
    reads = _reads(rig)
    _queue_germinate(rig, mlp)
    assert reads == []  # cached when it arrived: nothing fetched ahead
    assert manager.evict_kernel(mlp) and manager.loader.cached(mlp) is None
    outcomes = manager.apply_pending(wait=True)
    assert [(o.ok, o.reason) for o in outcomes] == [(True, "")]
    assert [a for a, _ in reads] == [mlp]
    assert all(thread.startswith("kasmina-fetch") for _, thread in reads), reads
    assert rig.stage(SEED0) == S.ISOLATED_INIT
    original = manager.loader.cached(mlp)
    assert original is not None
    seed_weights = list(manager.seed(SEED0).kernel.parameters())
    want = list(original.parameters())
    assert len(seed_weights) == len(want) > 0
    assert all(torch.equal(a, b) for a, b in zip(seed_weights, want, strict=True))
    assert manager.kernel_cache._pins == {mlp: 1}  # the seed's own; the command's given back
    assert rig.train(1)["seeds_stepped"] == [SEED0]
    manager.close()
