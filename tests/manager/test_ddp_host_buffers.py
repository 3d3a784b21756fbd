"""A host with buffers under ``wrap_ddp``: what DDP broadcasts from rank 0, and what it must not.

Two gloo ranks (``ddp_helpers``'s ``Trainer``) over the test host with a batch norm before the slot
(``NormedHost``): DDP broadcasts the host's buffers from rank 0 before every forward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from kasmina.control.processes import spawn
from kasmina.stages import SeedStage as S
from kasmina.urza.publish import publish_artifact
from tests.manager.ddp_helpers import (
    Normalised,
    NormedHost,
    Trainer,
    _host_norm,
    _load,
    _signed,
    _spec,
)
from tests.manager.helpers import PUBLISHER, SEED0


def _normed_trainer(rank: int, world: int, spec: dict[str, Any]) -> Trainer:
    import tests.manager.helpers as helpers

    helpers.Host = NormedHost  # (a spawned process of its own: nothing else sees it)
    return Trainer(rank, world, spec)


def _worker_kernel_buffers(rank: int, world: int, spec: dict[str, Any]) -> None:
    """A batch-norm kernel germinated after the wrap, its running mean set apart on each rank
    (10 on rank 0, 20 on rank 1), then one training step."""
    t = _normed_trainer(rank, world, spec)
    t.epoch_with({0: [_signed(t.rig, "germinate", SEED0, spec["normalised"])]}, steps=0)
    kernel = t.manager.seed(SEED0).kernel
    mean = next(b for n, b in kernel.named_buffers() if n.endswith("running_mean"))
    with torch.no_grad():
        mean.fill_(10.0 * (rank + 1))
    t.train(1)
    t.save(spec["out"], "kernelbuf", mean=mean.detach().clone())
    t.manager.close()


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_ddp_leaves_the_buffers_of_a_kernel_germinated_after_the_wrap_to_each_rank(
    tmp_path: Path, published, store: Path
) -> None:
    """DDP's ignore list was built by name at the wrap: a kernel a GERMINATE grafted later was
    not on it, so before every forward DDP gave its running statistics rank 0's values (the
    epoch sync's average had nothing left to average). Each rank keeps its own now."""
    spec = _spec(tmp_path, published, "gloo")
    spec["store"] = str(store)  # this test's copy, with the batch-norm kernel published into it
    torch.manual_seed(3)
    spec["normalised"] = publish_artifact(
        Normalised(), [torch.randn(3, 2)], str(store), "normalised", PUBLISHER
    ).artifact_id
    spawn(_worker_kernel_buffers, 2, args=(spec,), backend="gloo", timeout_s=60, join_timeout_s=120)
    means = [run["mean"] for run in _load(tmp_path, "kernelbuf", 2)]
    # One forward in train mode: 0.9 of the rank's own start, plus 0.1 of its batch's mean.
    for rank, mean in enumerate(means):
        assert (mean - 9.0 * (rank + 1)).abs().max() < 1.0, (rank, mean)


def _worker_g5(rank: int, world: int, spec: dict[str, Any]) -> None:
    """A seed taken to GRAFTING, then measured on every rank on the same held-out batch, with
    the same weights; the sync that follows carries no command."""
    t = _normed_trainer(rank, world, spec)
    t.epoch_with({0: [_signed(t.rig, "germinate", SEED0, spec["mlp"])]})
    t.epoch_with({0: [_signed(t.rig, "advance", SEED0)]})
    t.epoch_with({0: [_signed(t.rig, "advance", SEED0)]})
    assert t.manager.stages()[SEED0] == S.GRAFTING
    with torch.no_grad():
        held_out = [(t.rig.x, t.teacher(t.rig.x).argmax(-1))]
    before = _host_norm(t)
    score = t.manager.evaluate_seeds(held_out, loss_fn=F.cross_entropy)[SEED0].score
    after = _host_norm(t)
    synced = t.boundary()
    t.save(
        spec["out"],
        "g5",
        score=score,
        before=before,
        after=after,
        divergent=synced.divergent_ranks,
    )
    t.manager.close()


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_g5_measures_alike_on_every_rank_under_a_host_batch_norm(tmp_path: Path, published) -> None:
    """DDP gives the host's buffers rank 0's values only as its next forward starts: after the
    last training forward each rank's host batch norm held its own shard's statistics, the same
    batch scored differently on each rank (eval mode reads them), and the next sync found rank
    1's state table (its GATE_SCORE) divergent and repaired a healthy rank. The measurement
    now reads rank 0's, and each rank's own come back after it."""
    spec = _spec(tmp_path, published, "gloo")
    spawn(_worker_g5, 2, args=(spec,), backend="gloo", timeout_s=60, join_timeout_s=150)
    runs = _load(tmp_path, "g5", 2)
    first, second = runs
    assert any(not torch.equal(first["before"][n], second["before"][n]) for n in first["before"])
    for run in runs:
        for name, mine in run["before"].items():
            assert torch.equal(run["after"][name], mine), name  # each rank's own, put back
    assert first["score"] == second["score"]
    assert [run["divergent"] for run in runs] == [(), ()]
