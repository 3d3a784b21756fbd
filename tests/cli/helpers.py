"""Shared helpers of the command-line tests: run ``kasmina`` in-process, check one-line
errors, publish an artifact, write one as the retired HMAC scheme did."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kasmina.cli import main as cli
from kasmina.urza.artifact import PAYLOAD_SUFFIX
from tests.urza.helpers import legacy_manifest


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = cli.main(list(argv))
    except SystemExit as exc:  # argparse: --help and usage errors
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 1
    assert err.startswith("kasmina: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def publish(capsys, store: Path, keys: Path, *extra: str) -> str:
    argv = ["urza", "publish", "--store", str(store), "--key", str(keys), *extra]
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    return out.strip()


@contextmanager
def fifo_never_blocks(fifo: Path) -> Iterator[None]:
    """While inside, anything that opens ``fifo`` to read gets end-of-file instead of waiting
    forever for a writer: a regression fails its test rather than hanging the run."""
    stop = threading.Event()

    def writer() -> None:
        while not stop.wait(0.01):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader yet (ENXIO), or the FIFO is gone
                pass

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def legacy_artifact(store: Path, artifact_id: str, payload: bytes, key: bytes) -> None:
    """An artifact as the retired HMAC scheme (manifest version 1) published it."""
    store.mkdir(parents=True, exist_ok=True)
    (store / f"{artifact_id}{PAYLOAD_SUFFIX}").write_bytes(payload)
    manifest = legacy_manifest(payload, artifact_id, "old", key, created=1.0)
    (store / f"{artifact_id}.manifest.json").write_bytes(manifest)
