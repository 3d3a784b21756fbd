"""Key, keyring and trusted-publishers files, and local store entries, are read through one
bounded reader of regular files: a FIFO, a device or a directory is refused at once (never
waited on, never read without end), and errors name the file at fault."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import pytest

from kasmina.errors import ArtifactIntegrityError
from kasmina.manager.config import KasminaConfig
from kasmina.urza.client import UrzaLibraryClient
from kasmina.urza.keys import PublisherKey, TrustedPublishers
from kasmina.urza.publish import publish_payload
from kasmina.utils.files import MAX_CONFIG_FILE_BYTES
from kasmina.utils.keyring import Keyring
from kasmina.utils.state_io import load_or_create_checkpoint_key
from tests.cli.helpers import fifo_never_blocks

PAYLOAD = bytes(range(256)) * 4
FIFO = r"is not a readable file \(a FIFO, not a regular file\)"
LOADERS = {
    "keyring": Keyring.from_file,
    "publishers": TrustedPublishers.from_file,
    "publisher key": PublisherKey.from_file,
    "checkpoint key": load_or_create_checkpoint_key,
    "config keyring": lambda p: KasminaConfig(hmac_keys_file=str(p)).load_keyring(),
    "config publishers": lambda p: KasminaConfig(
        urza_publishers_file=str(p)
    ).load_trusted_publishers(),
}


@pytest.fixture
def odd_files(tmp_path: Path) -> dict[str, Path]:
    """A FIFO, a symlink to /dev/zero and a directory."""
    fifo, zero, folder = tmp_path / "fifo", tmp_path / "zero", tmp_path / "dir"
    os.mkfifo(fifo)
    zero.symlink_to("/dev/zero")
    folder.mkdir()
    return {"a FIFO": fifo, "a character device": zero, "a directory": folder}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_key_file_that_is_not_a_regular_file_is_refused_at_once(loader, odd_files) -> None:
    for kind, path in odd_files.items():
        started = time.monotonic()
        with fifo_never_blocks(odd_files["a FIFO"]), pytest.raises(ValueError) as info:
            LOADERS[loader](path)
        assert f"{path} is not a regular file ({kind})" in str(info.value)
        assert time.monotonic() - started < 2


@pytest.mark.parametrize("loader", ["keyring", "publishers", "config publishers"])
def test_an_oversize_key_file_is_refused_after_a_bounded_read(loader, tmp_path) -> None:
    path = tmp_path / "big.json"
    with open(path, "wb") as f:
        f.truncate(64 * MAX_CONFIG_FILE_BYTES)  # sparse
    path.chmod(0o600)
    with pytest.raises(ValueError, match=f"{path} is larger than {MAX_CONFIG_FILE_BYTES} bytes"):
        LOADERS[loader](path)


@pytest.mark.parametrize("loader", ["keyring", "publishers"])
def test_key_file_errors_name_the_file(loader, tmp_path) -> None:
    binary, bad_value = tmp_path / "bin.json", tmp_path / "short.json"
    binary.write_bytes(b"\xff\xfe{")
    bad_value.write_text(json.dumps({"ci": "zz"}))
    for path in (binary, bad_value):
        path.chmod(0o600)
        with pytest.raises(ValueError, match=str(path)):
            LOADERS[loader](path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize(
    ("loader", "contents", "what"),
    [
        ("keyring", json.dumps({"ctl": "11" * 32}), "sign commands"),
        ("config keyring", json.dumps({"ctl": "11" * 32}), "sign commands"),
        ("checkpoint key", "ab" * 32, "forge the run's checkpoints"),
    ],
)
def test_a_secret_key_file_others_can_read_is_warned_about(
    loader: str, contents: str, what: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whoever reads a command keyring can sign commands, whoever reads a checkpoint key can
    forge the checkpoints a ROLLBACK restores: said, with the mode. Not refused, unlike a
    publisher's private key: a container's secret mount (0444, 0644) may fix the mode."""
    path = tmp_path / "secret"
    path.write_text(contents)
    for mode in (0o640, 0o604, 0o444):
        path.chmod(mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            LOADERS[loader](path)
        assert f"(mode {mode:04o}): anyone who reads it can {what}" in caplog.text
    path.chmod(0o600)
    caplog.clear()
    LOADERS[loader](path)
    assert "anyone who reads it" not in caplog.text


def test_one_key_under_two_ids_is_refused() -> None:
    """Removing an id is how a key is revoked: a secret (or a publisher's public key) that is
    also held under another id would stay valid. The error never shows a command secret."""
    secret = bytes(range(32))
    with pytest.raises(ValueError, match="key 'new' is the same secret as key 'old'") as info:
        Keyring({"old": secret, "other": bytes(32), "new": secret})
    assert secret.hex() not in str(info.value)
    # HMAC pads a key with zeros to its 64-byte block and hashes a longer one: these sign
    # every message alike, so they are one secret too.
    long = bytes(range(80))
    for twin in (secret + b"\0", secret + bytes(32), hashlib.sha256(long).digest()):
        held = long if len(twin) == 32 and twin != secret else secret
        with pytest.raises(ValueError, match="key 'new' is the same secret as key 'old'"):
            Keyring({"old": held, "new": twin})
    Keyring({"old": secret, "new": secret[:-1] + b"\1"})  # a different secret is fine
    public = PublisherKey.generate("ci").public_key_text
    with pytest.raises(ValueError, match="ids 'ci' and 'ci-2025' hold the same public key"):
        TrustedPublishers({"ci": public, "ci-2025": public})


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_local_fifo_or_device_entry_is_that_artifacts_problem(tmp_path) -> None:
    """On a local store a FIFO (or a device) named like a manifest or a payload is refused at
    once: an answer, not a stalled read, so no I/O slot is held, the breaker stays closed and
    the rest of the store is served."""
    publisher = PublisherKey.generate("pub")
    store = tmp_path / "store"
    for artifact_id in ("good", "fifo-payload", "zero-payload"):
        publish_payload(PAYLOAD, str(store), "bp", publisher, artifact_id)
    (store / "fifo-payload.pt2").unlink()
    os.mkfifo(store / "fifo-payload.pt2")
    (store / "zero-payload.pt2").unlink()
    (store / "zero-payload.pt2").symlink_to("/dev/zero")
    os.mkfifo(store / "fifo.manifest.json")
    urza = UrzaLibraryClient(
        str(store),
        publisher.trusted_publishers(),
        timeout_s=5.0,
        retries=2,
        breaker_threshold=1,
        max_stalled_reads=1,
    )
    fifos = (store / "fifo-payload.pt2", store / "fifo.manifest.json")
    started = time.monotonic()
    with fifo_never_blocks(fifos[0]), fifo_never_blocks(fifos[1]):
        for _ in range(3):
            with pytest.raises(ArtifactIntegrityError, match=rf"manifest {FIFO}"):
                urza.fetch("fifo")
            with pytest.raises(ArtifactIntegrityError, match=rf"payload {FIFO}"):
                urza.fetch("fifo-payload")
        with pytest.raises(ArtifactIntegrityError, match=r"\(a character device, not a regular"):
            urza.fetch("zero-payload")
        assert urza.fetch("good")[0] == PAYLOAD
    assert time.monotonic() - started < 5
    stats = urza.stats()
    assert stats["breaker_state"] == "closed" and stats["read_failures"] == 0
    assert stats["stalled_reads"] == 0 and stats["reads_refused_stalled"] == 0


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs")
def test_a_failed_publish_names_the_file_not_its_temporary() -> None:
    publisher = PublisherKey.generate("pub")
    with pytest.raises(OSError) as info:
        publish_payload(PAYLOAD, "/sys/kernel", "bp", publisher, "a1")
    assert info.value.filename == "/sys/kernel/a1.manifest.json"
