"""The gradient-isolation circuit breaker trips while its emergency checkpoint cannot be
written (the directory lies under a regular file): the failed write is logged, the seed is
still quarantined, and the host keeps training."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from kasmina.kd.config import KDConfig
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import SEED0, Rig, S, make_config, through_a_seed


def test_a_trip_whose_emergency_checkpoint_fails_still_quarantines(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Three leaking steps trip the breaker; its checkpoint write fails (logged, and the
    refusal names no checkpoint), yet the seed is QUARANTINE, nothing is written anywhere, the
    next step trains the host, and the seed can be culled as usual."""
    blocker = tmp_path / "not_a_dir"
    blocker.write_bytes(b"a regular file")
    config = make_config(
        tmp_path,
        store,
        kd_enabled=True,
        kd=KDConfig(temperature=2.0, alpha=1.0),
        emergency_checkpoint_dir=str(blocker / "emergency"),
    )
    rig = Rig(config, keyring)
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    host_weight = rig.model.inp.weight
    with caplog.at_level(logging.ERROR):
        for step in range(3):  # three leaking steps: the third trips the breaker
            rig.slot.set_teacher_logits(torch.randn(16, 4))
            loss = F.cross_entropy(rig.model(rig.x), rig.y)
            kd = through_a_seed(manager.collect_kd_losses() + 1e-2 * host_weight.sum())
            manager.backward(loss, kd_loss=kd)
            report = manager.step()
            assert not report["isolation_clean"] and not report["host_stepped"]
            assert rig.stage(SEED0) == (S.QUARANTINE if step == 2 else S.ISOLATED_INIT)
    assert manager.guard.breaker_trips == 1
    assert "could not write the emergency checkpoint" in caplog.text
    assert "emergency checkpoint: None (the host keeps training)" in caplog.text
    assert blocker.read_bytes() == b"a regular file"  # nothing written over it
    assert not (tmp_path / "emergency").exists()  # nor anywhere else
    before = host_weight.detach().clone()
    report = rig.train(1)
    assert report["host_stepped"] and report["isolation_clean"]
    assert not torch.equal(host_weight, before)
    assert rig.send("cull", SEED0) and rig.stage(SEED0) == S.COOLDOWN
