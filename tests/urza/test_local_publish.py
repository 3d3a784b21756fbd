"""Publishing to a local store: its writes are ``kasmina.utils.atomic``'s (fsync'd, create-only
by a hard link or under the install lock, temporaries a later publish recognises and removes),
and its files are made as a plain ``open`` makes them."""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from kasmina.urza.client import UrzaLibraryClient
from kasmina.urza.keys import PublisherKey, TrustedPublishers
from kasmina.urza.publish import publish_payload
from tests.crash import KILLED, die, run_in_child

FILES = ["art.manifest.json", "art.pt2"]


def _no_hard_links(*args: object, **kwargs: object) -> None:
    raise OSError(errno.EPERM, "Operation not permitted")


def test_a_killed_publishs_temporary_is_removed_by_the_next_publish(
    tmp_path: Path, publisher: PublisherKey, trusted: TrustedPublishers
) -> None:
    """A publish killed in its payload's write left its temporary beside the payload, under a
    name (``art.pt2.tmp-<hex>``) no clean-up knew: it stayed for good. Its name is now the one
    ``remove_stale_temporaries`` knows, and the next publish of the id removes it once it is
    old enough to be no live writer's (a fresh one is left alone)."""
    real_replace = os.replace

    def killed_publish() -> None:
        def replace(src: str, dst: str, *args: object, **kwargs: object) -> None:
            if str(dst).endswith(".pt2"):
                die()  # the payload is written and synced; the process dies before its rename
            real_replace(src, dst, *args, **kwargs)

        os.replace = replace  # the child's own os module
        publish_payload(b"payload", str(tmp_path), "bp", publisher, "art")

    assert run_in_child(killed_publish) == KILLED
    left = [p for p in tmp_path.iterdir() if p.name not in FILES]
    assert len(left) == 1 and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [FILES[0], left[0].name]
    )
    fresh = tmp_path / ".art.pt2.live0001.tmp"  # a live writer's, as far as anyone can tell
    fresh.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(left[0], (old, old))
    publish_payload(b"payload", str(tmp_path), "bp", publisher, "art")  # finishes the publish
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*FILES, fresh.name])
    assert UrzaLibraryClient(str(tmp_path), trusted).fetch("art")[0] == b"payload"


def test_two_publishers_racing_for_one_id_without_hard_links_leave_one_winner(
    tmp_path: Path, publisher: PublisherKey, trusted: TrustedPublishers, monkeypatch
) -> None:
    """Where the filesystem has no hard links the manifest's claim was a check, then a rename,
    with nothing between them: a second publisher that checked while the first was between
    the two also found the id free, both "created" it, and both reported the artifact
    published, each with its own bytes. The claim is now ``install_new_file``'s, under its
    lock: exactly one wins, the other gets the existing artifact's refusal."""
    monkeypatch.setattr(os, "link", _no_hard_links)
    manifest = str(tmp_path / FILES[0])
    checked, second_done = threading.Event(), threading.Event()

    def holding(real):  # the first publisher's "is the id free?" stalls on "yes"
        def check(path, *args, **kwargs):
            try:
                return real(path, *args, **kwargs)
            except FileNotFoundError:
                if threading.current_thread().name == "first" and os.fspath(path) == manifest:
                    checked.set()
                    second_done.wait(2)  # until the second publisher is done, or 2 s
                raise

        return check

    monkeypatch.setattr(os, "stat", holding(os.stat))
    monkeypatch.setattr(os, "lstat", holding(os.lstat))
    outcomes: dict[str, object] = {}

    def publish(name: str, payload: bytes) -> None:
        try:
            outcomes[name] = publish_payload(payload, str(tmp_path), "bp", publisher, "art")
        except FileExistsError as exc:
            outcomes[name] = exc

    first = threading.Thread(target=publish, args=("first", b"A" * 64), name="first")
    first.start()
    try:
        assert checked.wait(10)
        publish("second", b"B" * 64)
    finally:
        second_done.set()
        first.join(30)
    monkeypatch.undo()
    refused = [n for n, o in outcomes.items() if isinstance(o, FileExistsError)]
    assert len(outcomes) == 2 and refused == ["second"], {
        n: type(o).__name__ for n, o in outcomes.items()
    }
    assert "different payload" in str(outcomes["second"])
    assert UrzaLibraryClient(str(tmp_path), trusted).fetch("art")[0] == b"A" * 64


def test_a_local_publish_syncs_both_files(
    tmp_path: Path, publisher: PublisherKey, monkeypatch
) -> None:
    """The manifest and the payload were written without an fsync: a power loss after the
    publish could leave either empty or torn under its final name."""
    synced: set[tuple[int, int]] = set()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        synced.add((info.st_dev, info.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    publish_payload(b"payload", str(tmp_path), "bp", publisher, "art")
    for name in FILES:
        info = (tmp_path / name).stat()
        assert (info.st_dev, info.st_ino) in synced, name


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_a_local_stores_files_are_made_as_open_makes_them(
    tmp_path: Path, publisher: PublisherKey
) -> None:
    """Readers under other accounts (a server of the store's directory) read its files: they
    are 0666 less the umask, never the 0600 of a key's temporary."""
    umask = os.umask(0o022)
    try:
        publish_payload(b"payload", str(tmp_path), "bp", publisher, "art")
    finally:
        os.umask(umask)
    assert [stat.S_IMODE((tmp_path / name).stat().st_mode) for name in FILES] == [0o644] * 2
