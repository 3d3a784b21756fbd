"""Fixtures of the command-line tests: a publisher's key file and its public key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kasmina.urza.keys import PublisherKey
from tests.cli.helpers import run


@pytest.fixture
def keys(tmp_path, capsys) -> Path:
    """A publisher's private key file (``--key``)."""
    path = tmp_path / "publisher.key"
    assert run(capsys, "keygen", "--publisher", "--out", str(path), "--key-id", "pub")[0] == 0
    return path


@pytest.fixture
def publishers(tmp_path, keys) -> Path:
    """What trainers and verifiers get: the public key, as 'keygen --publisher' printed it."""
    path = tmp_path / "publishers.json"
    path.write_text(json.dumps(PublisherKey.from_file(keys).trusted_publishers().to_json()))
    return path
