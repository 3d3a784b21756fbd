"""A seed's KD loss that raises inside the host's forward (an allocation that fails, a launch that
raises): the host's step goes on, the KD term of the call is skipped and the distilling seed is
charged a fault, as for its kernel raising there (docs/design.md §6a, §7). A stand-alone seed's:
``tests/seeds/test_seed.py``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kasmina.kd import loss as kd_loss_module
from kasmina.kd.config import KDConfig
from kasmina.stages import SeedStage
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import SEED0, SEED1, Rig, host_params, make_config

FAILURES: list[Callable[[], BaseException]] = [
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    lambda: RuntimeError("CUDA error: an illegal memory access was encountered"),
]
IDS = ["OutOfMemoryError", "RuntimeError"]


def failing_kd_op(monkeypatch: pytest.MonkeyPatch, failure: Callable[[], BaseException]) -> list:
    """The KD op that seeds and slots call raises ``failure()`` while the returned switch
    holds True; it is the real op otherwise. Runs the op first, so the failure comes after
    part of the loss's graph was recorded, as an allocation failing inside it would."""
    real = kd_loss_module.kd_kl_loss
    failing = [True]

    def kd_kl_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = real(*args, **kwargs)
        if failing[0]:
            raise failure()
        return loss

    monkeypatch.setattr(kd_loss_module, "kd_kl_loss", kd_kl_loss)
    return failing


def distilling_rig(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> tuple[Rig, torch.Tensor]:
    """A rig whose SEED0 runs ``mlp`` with a teacher loaded, and that teacher's logits."""
    config = make_config(tmp_path, store, kd_enabled=True, kd=KDConfig(temperature=2.0))
    rig = Rig(config, keyring)
    assert rig.send("germinate", SEED0, mlp)
    torch.manual_seed(3)
    rig.manager.load_teacher(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)))
    return rig, rig.manager.get_teacher_predictions(rig.x)


@pytest.mark.parametrize("failure", FAILURES, ids=IDS)
def test_a_kd_loss_that_raises_in_the_forward_is_a_fault_not_a_failed_step(
    tmp_path: Path,
    store: Path,
    keyring: Keyring,
    mlp: str,
    monkeypatch: pytest.MonkeyPatch,
    failure: Callable[[], BaseException],
) -> None:
    """With a teacher loaded, the slot's KD loss raised out of the model's forward and the
    user's step failed. Now the forward returns the host's output, the call keeps no KD loss,
    the host steps, and the distilling seed (only it) is charged: at its fault limit, it is
    quarantined, as a kernel raising on every call is. A call whose loss computes trains it."""
    rig, teacher = distilling_rig(tmp_path, store, keyring, mlp)
    manager = rig.manager
    seed = manager.seed(SEED0)
    failing_kd_op(monkeypatch, failure)
    for step in range(1, seed.fault_limit + 1):
        with torch.no_grad():
            want = rig.model(rig.x)  # no teacher, no graph: the output as it should be
        before = host_params(rig)
        manager.set_teacher_logits(teacher)
        out = rig.model(rig.x)
        assert torch.equal(out, want)
        assert manager.collect_kd_losses() is None  # nothing half-made for the KD backward
        manager.backward(F.cross_entropy(out, rig.y), kd_loss=None)
        report = manager.step()
        assert report["host_stepped"]
        assert all(not torch.equal(a, b) for a, b in zip(before, host_params(rig), strict=True))
        assert seed.faults == step and manager.seed(SEED1).faults == 0
        assert type(failure()).__name__ in seed.fault_log[-1]
    assert seed.stage == SeedStage.QUARANTINE
    assert manager.counters["kd_backward_failed"] == 0


def test_a_kd_loss_that_raised_once_trains_the_seed_at_the_next_call(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One failed call (a transient allocation failure) costs one fault and that call's KD
    term; the next call's loss is kept and trains the seed."""
    rig, teacher = distilling_rig(tmp_path, store, keyring, mlp)
    manager = rig.manager
    failing = failing_kd_op(monkeypatch, FAILURES[0])
    report = rig.train(1, teacher=teacher)
    assert report["host_stepped"] and report["seeds_stepped"] == [SEED0]  # the host loss's
    failing[0] = False
    manager.set_teacher_logits(teacher)
    loss = F.cross_entropy(rig.model(rig.x), rig.y)
    kd = manager.collect_kd_losses()
    assert kd is not None and kd.requires_grad
    manager.backward(loss, kd_loss=kd)
    assert manager.step()["host_stepped"]
    assert manager.seed(SEED0).faults == 1 and manager.counters["kd_backward_failed"] == 0
