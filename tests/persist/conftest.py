"""A grown model shared by the persistence tests: one seed ACTIVE, one GRAFTING.

Growing it (exporting an artifact, signed commands, training through the gates) takes a few
seconds, so it is built once per module; tests that change it work on a deep copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import kasmina
from kasmina.urza.blueprints import ResidualMLP
from kasmina.urza.publish import publish_artifact
from kasmina.utils.keyring import Keyring, generate_key
from tests.manager.helpers import PUBLISHER, SEED0, SEED1, Rig, S, make_config


@dataclass
class Grown:
    rig: Rig
    artifact_id: str
    x: torch.Tensor

    @property
    def model(self) -> torch.nn.Module:
        return self.rig.model


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory) -> Grown:
    tmp = tmp_path_factory.mktemp("grown")
    store = tmp / "urza"
    torch.manual_seed(1)
    artifact = publish_artifact(
        ResidualMLP(2, 4), [torch.randn(3, 2)], str(store), "mlp", PUBLISHER
    )
    keyring = Keyring({"pub": generate_key(), "ctl": generate_key()})
    # G5 passes on any measured benefit: these tests are about keeping a seed, not judging it.
    rig = Rig(make_config(tmp, store, performance_gate=0), keyring)
    aid = artifact.artifact_id
    assert rig.send("germinate", SEED0, aid) and rig.send("germinate", SEED1, aid)
    rig.train(2)
    rig.manager.end_epoch(0)
    assert rig.send("advance", SEED0) and rig.send("advance", SEED1)  # COMPATIBILITY_CHECK
    rig.train(1)  # the forward probes both kernels (G3)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.GRAFTING
    rig.train(5)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.STABILIZATION
    rig.train(1)
    rig.manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.ACTIVE
    assert rig.send("advance", SEED1) and rig.stage(SEED1) == S.GRAFTING
    rig.train(2)  # SEED1 half way through its alpha schedule
    assert 0.0 < rig.manager.seed(SEED1).alpha_value < 1.0
    rig.model.eval()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    return Grown(rig, aid, x)


@pytest.fixture
def saved(grown: Grown, tmp_path: Path) -> Path:
    return kasmina.save(grown.model, tmp_path / "grown.kasmina")
