"""Shared helpers of the command-line tests: run ``kasmina`` in-process, check one-line
errors, publish an artifact."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kasmina.cli import main as cli


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
