"""New files that must never replace an existing one (the checkpoint key): whole or absent
after a kill, never clobbering a concurrent writer's, even without hard links; and the temp
files of killed writes, removed once no live writer can own them; a long legal name too."""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import signal
import tempfile
import threading
import time

import pytest
import torch

from kasmina.errors import CheckpointIntegrityError
from kasmina.utils import atomic, state_io
from kasmina.utils.atomic import (
    STALE_TEMPORARY_S,
    atomic_write_bytes,
    install_new_file,
    remove_stale_temporaries_of,
)
from kasmina.utils.locks import lock_exclusive
from kasmina.utils.signed_json import canonical_json
from kasmina.utils.state_io import (
    CHECKPOINT_KEY_BYTES,
    CHECKPOINT_MAGIC,
    CheckpointSigner,
    load_or_create_checkpoint_key,
)
from tests.crash import KILLED, TornWriter, run_in_child


def _no_hard_links(src, dst, **kwargs):
    raise OSError(errno.EPERM, "no hard links here")


def test_a_key_creation_killed_without_hard_links_leaves_no_torn_key(tmp_path, monkeypatch):
    """Without hard links the key used to be created under its final name, then written: a
    kill in between left a torn key that failed every restart. Killed in its write, the
    creation leaves no key; the next start creates it, and removes the stale temp file of
    the killed write."""
    path = tmp_path / "run" / "checkpoint.key"

    def create_killed_in_a_write() -> None:
        os.link = _no_hard_links
        real_fdopen, opened = os.fdopen, []

        def fdopen(fd, *args, **kwargs):
            opened.append(fd)
            handle = real_fdopen(fd, *args, **kwargs)
            return TornWriter(handle) if len(opened) == 1 else handle

        os.fdopen = fdopen
        load_or_create_checkpoint_key(path)

    assert run_in_child(create_killed_in_a_write) == KILLED
    assert not path.exists() and list(path.parent.glob(".checkpoint.key.*.tmp"))
    stale = time.time() - 2 * STALE_TEMPORARY_S
    for temp in path.parent.glob(".checkpoint.key.*.tmp"):
        os.utime(temp, (stale, stale))
    monkeypatch.setattr(os, "link", _no_hard_links)
    key = load_or_create_checkpoint_key(path)
    assert len(key) == CHECKPOINT_KEY_BYTES and path.read_bytes() == key
    assert not list(path.parent.glob("*.tmp"))  # the killed write's temp file is gone


def test_without_hard_links_a_new_file_never_replaces_a_concurrent_writers(tmp_path, monkeypatch):
    """The rename that stands in for a link is taken under a lock every installer takes, so
    a file another installer put there meanwhile is never replaced."""
    monkeypatch.setattr(os, "link", _no_hard_links)
    path = tmp_path / "checkpoint.key"
    other = lock_exclusive(tmp_path / ".checkpoint.key.lock")  # another installer, mid-way
    assert other is not None
    result: list[bool] = []
    installer = threading.Thread(target=lambda: result.append(install_new_file(path, b"mine")))
    installer.start()
    time.sleep(0.2)
    assert installer.is_alive() and not path.exists()  # waits for the other installer
    path.write_bytes(b"theirs")  # which installs its file, then lets go
    other.close()
    installer.join(timeout=30)
    assert result == [False] and path.read_bytes() == b"theirs"
    assert install_new_file(path, b"again") is False and path.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint.key.lock", path.name]


@pytest.mark.usefixtures("sigint_raises")
def test_a_second_ctrl_c_during_the_clean_up_leaves_no_temporary(tmp_path, monkeypatch) -> None:
    """A Ctrl-C in the write, and a second one while the temp file is being removed: the
    removal used to stop half-way and leave the temp file beside the target for good."""
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # the second Ctrl-C lands before the removal
        return real_unlink(path, *args, **kwargs)

    def chunks():
        yield b"partial"
        raise KeyboardInterrupt  # the first Ctrl-C, in the write

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(tmp_path / "model.kasmina", chunks())
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_a_long_legal_name_is_written_and_its_killed_temporary_removed(
    tmp_path, monkeypatch
) -> None:
    """Names of 250-255 bytes: the temp file (``.<name>.<random>.tmp``, 14 bytes more) and the
    install lock (``.<name>.lock``) had names the filesystem refused, "File name too long"; they
    are cut to fit, and the stale-temp cleanup still finds a killed write's temp file."""
    made: list[str] = []
    real_mkstemp = tempfile.mkstemp

    def mkstemp(**kwargs):
        fd, name = real_mkstemp(**kwargs)
        made.append(name)
        return fd, name

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)
    names = ["k" * 255, "é" * 127]  # 255 and 254 bytes
    for name in names:
        assert atomic_write_bytes(tmp_path / name, [b"new"]).read_bytes() == b"new"
        assert install_new_file(tmp_path / f"{name[:-1]}j", b"key")
    monkeypatch.setattr(os, "link", _no_hard_links)  # the install lock's name too
    assert install_new_file(tmp_path / ("i" * 255), b"key")
    assert all(len(os.fsencode(os.path.basename(n))) <= 255 for n in made)
    for name, temporary in zip(names, made[0:4:2], strict=True):  # as a killed write leaves it
        open(temporary, "wb").close()
        assert remove_stale_temporaries_of(tmp_path / name, older_than_s=None) == [
            tmp_path / os.path.basename(temporary)
        ]
    assert not os.path.exists(made[1]) and not os.path.exists(made[3])


def test_a_key_created_concurrently_is_the_one_used(tmp_path, monkeypatch) -> None:
    """Two creators of one run's key: the one whose install finds the other's key in place
    uses that key (the one on disk), never its own random bytes, which sign nothing the run
    can verify later."""
    path = tmp_path / "run" / "checkpoint.key"
    theirs = bytes(range(CHECKPOINT_KEY_BYTES))
    real_install = state_io.install_new_file

    def install_after_the_other(target, data, **kwargs):
        assert real_install(target, theirs)  # the other creator wins the race
        return real_install(target, data, **kwargs)

    monkeypatch.setattr(state_io, "install_new_file", install_after_the_other)
    assert load_or_create_checkpoint_key(path) == theirs
    assert path.read_bytes() == theirs


def _sealed(tmp_path) -> tuple[CheckpointSigner, bytes]:
    """A signer with a given key and the bytes of a checkpoint it signed (epoch 3)."""
    signer = CheckpointSigner(tmp_path / "absent.key", "run", key=bytes(CHECKPOINT_KEY_BYTES))
    path = signer.write({"w": torch.arange(4.0)}, tmp_path / "signed.ckpt", epoch=3)
    return signer, path.read_bytes()


def _manifest_end(raw: bytes) -> int:
    head = len(CHECKPOINT_MAGIC) + 4
    return head + int.from_bytes(raw[len(CHECKPOINT_MAGIC) : head], "big")


def _with_manifest(manifest: bytes) -> bytes:
    return CHECKPOINT_MAGIC + len(manifest).to_bytes(4, "big") + manifest


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda raw: b"", "truncated before its manifest"),
        (lambda raw: raw[:10], "truncated before its manifest"),
        (lambda raw: b"KASMCKPX" + raw[8:], "not a signed Kasmina checkpoint"),
        (lambda raw: raw[:8] + (5000).to_bytes(4, "big") + b" " * 6000, "exceeds 4096 bytes"),
        (lambda raw: raw[: _manifest_end(raw) - 5], "truncated inside its manifest"),
        (lambda raw: _with_manifest(b"{}"), "carries no HMAC"),
        (lambda raw: _with_manifest(b"[]"), "carries no HMAC"),
        (lambda raw: _with_manifest(b'{"hmac":"' + b"0" * 64 + b'"}'), "does not verify"),
        (lambda raw: raw + b"\0", "truncated or extended"),
    ],
)
def test_each_damage_is_refused_for_its_own_reason(tmp_path, damage, reason) -> None:
    """Reading checks in a fixed order (magic, manifest length bound, JSON, HMAC, identity,
    size, hash), each with its own refusal, and every refusal is a CheckpointIntegrityError:
    a check skipped used to surface as the next one's confusing reason, or as a KeyError."""
    signer, raw = _sealed(tmp_path)
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(damage(raw))
    with pytest.raises(CheckpointIntegrityError, match=reason):
        signer.read_payload(damaged, epoch=3)


def test_a_read_without_the_runs_key_is_refused_and_creates_none(tmp_path) -> None:
    """Verifying needs the key that signed: with none at the key path the read is refused by
    name, and no fresh key (which would verify nothing) is created there."""
    _, raw = _sealed(tmp_path)
    (tmp_path / "signed.ckpt").write_bytes(raw)
    reader = CheckpointSigner(tmp_path / "keys" / "run.key", "run")
    with pytest.raises(CheckpointIntegrityError, match="no checkpoint key at"):
        reader.read(tmp_path / "signed.ckpt", epoch=3)
    assert not (tmp_path / "keys").exists()


def test_a_key_given_directly_must_be_a_whole_key(tmp_path) -> None:
    """A key shorter than CHECKPOINT_KEY_BYTES is refused; one of exactly that size signs."""
    with pytest.raises(ValueError, match="at least 32 bytes"):
        CheckpointSigner(tmp_path / "k.key", "run", key=bytes(CHECKPOINT_KEY_BYTES - 1))
    signer, raw = _sealed(tmp_path)
    assert signer.read(tmp_path / "signed.ckpt", epoch=3)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("change", [{"format": 2}, {"note": "added"}, {"created": "yesterday"}])
def test_a_manifest_signed_with_the_key_but_of_another_format_is_refused(tmp_path, change) -> None:
    """The HMAC proves who signed, not what layout: a manifest of another format version, with
    a field this version does not know or one of the wrong type, is refused even when it
    verifies, rather than read field by field as if it were this version's."""
    signer, raw = _sealed(tmp_path)
    end = _manifest_end(raw)
    fields = json.loads(raw[len(CHECKPOINT_MAGIC) + 4 : end])
    fields.update(change)
    fields.pop("hmac")
    mac = hmac.new(signer.key, canonical_json(fields), hashlib.sha256).hexdigest()
    resigned = tmp_path / "resigned.ckpt"
    resigned.write_bytes(_with_manifest(canonical_json({**fields, "hmac": mac})) + raw[end:])
    with pytest.raises(CheckpointIntegrityError, match="signed but not of format 1"):
        signer.read_payload(resigned, epoch=3)


def test_a_file_is_in_place_before_its_directory_is_synced(tmp_path, monkeypatch) -> None:
    """The rename (or link) that puts a file in place is made durable by an fsync of its
    directory, after it: without one a crash may lose a file its writer reported written."""
    synced: list[tuple[str, list[str]]] = []
    real_fsync_directory = atomic.fsync_directory

    def fsync_directory(directory) -> None:
        synced.append((os.fspath(directory), sorted(os.listdir(directory))))
        real_fsync_directory(directory)

    monkeypatch.setattr(atomic, "fsync_directory", fsync_directory)
    atomic_write_bytes(tmp_path / "model.kasmina", [b"new"])
    assert synced == [(os.fspath(tmp_path), ["model.kasmina"])]
    assert install_new_file(tmp_path / "checkpoint.key", b"key")
    assert synced[1] == (os.fspath(tmp_path), ["checkpoint.key", "model.kasmina"])


def test_a_link_failing_for_another_reason_than_no_hard_links_installs_nothing(
    tmp_path, monkeypatch
) -> None:
    """Only "no hard links here" falls back to the locked rename; any other failure of the
    link (an I/O error, a full disk) raises, with nothing at the path and no temp file left."""

    def failing_link(src, dst, **kwargs):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "link", failing_link)
    with pytest.raises(OSError, match="I/O error"):
        install_new_file(tmp_path / "checkpoint.key", b"key")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kind", "epoch"),
    [("epoch", None), ("epoch", -1), ("epoch", True), ("emergency", -1), ("emergency", 1.0)],
)
def test_a_checkpoint_of_an_impossible_epoch_is_never_written(tmp_path, kind, epoch) -> None:
    """An epoch is an int >= 0 (an emergency checkpoint's may be None): one a manifest could
    not be read back with is refused before anything is written."""
    signer = CheckpointSigner(tmp_path / "k.key", "run", key=bytes(CHECKPOINT_KEY_BYTES))
    with pytest.raises(ValueError, match="epoch must be"):
        signer.write({"w": torch.zeros(1)}, tmp_path / "x.ckpt", kind=kind, epoch=epoch)
    assert list(tmp_path.iterdir()) == []
