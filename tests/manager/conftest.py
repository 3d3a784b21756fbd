"""Fixtures of the manager tests: keys, two real exported blueprints in a local store, rigs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kasmina.kd.config import KDConfig
from kasmina.urza.blueprints import AffineShift, ResidualMLP
from kasmina.urza.keys import PublisherKey
from kasmina.urza.publish import publish_artifact
from kasmina.utils.keyring import Keyring, generate_key
from tests.manager.helpers import PUBLISHER, Rig, make_config


@pytest.fixture(scope="module")
def keyring() -> Keyring:
    return Keyring({"pub": generate_key(), "ctl": generate_key()})


@pytest.fixture(scope="module")
def publisher() -> PublisherKey:
    """The artifacts' Ed25519 publisher key (make_config trusts its public half)."""
    return PUBLISHER


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, publisher: PublisherKey):
    """Two real exported blueprints in a local store (exporting is slow: once per module)."""
    store = tmp_path_factory.mktemp("urza")
    torch.manual_seed(1)
    mlp = publish_artifact(ResidualMLP(2, 4), [torch.randn(3, 2)], str(store), "mlp", publisher)
    affine = publish_artifact(AffineShift(2), [torch.randn(3, 2)], str(store), "aff", publisher)
    return store, mlp.artifact_id, affine.artifact_id


@pytest.fixture
def store(published, tmp_path: Path) -> Path:
    dst = tmp_path / "urza"
    shutil.copytree(published[0], dst)
    return dst


@pytest.fixture
def mlp(published) -> str:
    return published[1]


@pytest.fixture
def rig(tmp_path: Path, store: Path, keyring: Keyring) -> Rig:
    return Rig(make_config(tmp_path, store), keyring)


@pytest.fixture
def kd_rig(tmp_path, store, keyring) -> Rig:
    config = make_config(tmp_path, store, kd_enabled=True, kd=KDConfig(temperature=2.0, alpha=1.0))
    return Rig(config, keyring)
