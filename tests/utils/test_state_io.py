"""New files that must never replace an existing one (the checkpoint key): whole or absent
after a kill, never clobbering a concurrent writer's, even without hard links; and the temp
files of killed writes, removed once no live writer can own them; a long legal name too."""

from __future__ import annotations

import errno
import os
import signal
import tempfile
import threading
import time

import pytest

from kasmina.utils import atomic, state_io
from kasmina.utils.atomic import (
    STALE_TEMPORARY_S,
    atomic_write_bytes,
    install_new_file,
    remove_stale_temporaries_of,
)
from kasmina.utils.locks import lock_exclusive
from kasmina.utils.state_io import CHECKPOINT_KEY_BYTES, load_or_create_checkpoint_key
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
