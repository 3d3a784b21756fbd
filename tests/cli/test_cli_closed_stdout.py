"""A stdout whose reader went away (``kasmina urza list | head -1``) ends a command as SIGPIPE
ends a Unix tool: quietly, exit status 141, after the work is done. A command started with
stdout or stderr closed (``>&-``, ``2>&-``) does its work, and nothing meant for one goes to the
other."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kasmina.cli import main as cli
from tests.cli.helpers import assert_one_line_error, run

ROOT = Path(cli.__file__).resolve().parents[2]


def closed_stdout(cwd: Path, *argv: str) -> tuple[int, str]:
    """Run ``python -m kasmina argv`` with a stdout pipe whose reader is already gone."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "kasmina", *argv],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=120,
        )
    finally:
        os.close(write)
    return proc.returncode, proc.stderr


def test_a_closed_stdout_ends_a_command_quietly_with_141(tmp_path) -> None:
    """A done command exited 120 with "Exception ignored ... BrokenPipeError" (the flush at
    exit), or 1 with "kasmina: error: [Errno 32] Broken pipe" (a print in the command)."""
    rc, err = closed_stdout(tmp_path, "keygen", "--out", "commands.json", "--key-id", "ctl")
    assert (rc, err) == (141, "wrote key 'ctl' to commands.json (1 key(s), mode 0600)\n")
    assert (tmp_path / "commands.json").is_file()  # the work was done

    store = tmp_path / "store"
    store.mkdir()
    for i in range(2000):  # more ids than a pipe's buffer: a print in the loop fails
        (store / f"artifact-number-{i:05d}.manifest.json").touch()
    rc, err = closed_stdout(tmp_path, "urza", "list", "--store", "store")
    assert (rc, err) == (141, "(no public keys given: manifests not verified)\n")


def test_a_broken_pipe_that_is_not_stdouts_is_an_error(tmp_path, capsys, monkeypatch) -> None:
    """Only stdout's reader going away is answered quietly: a command's own broken pipe, with
    stdout open, is its error, one line."""

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_cmd_keygen", broken)
    with open(tmp_path / "stdout", "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        rc, _, err = run(capsys, "keygen")
    assert_one_line_error(rc, err, "Broken pipe")


@pytest.mark.parametrize("where", ["print", "flush"])
def test_a_replaced_stdout_that_breaks_exits_141(where, capsys, monkeypatch) -> None:
    """A stdout without a file descriptor that raises BrokenPipeError: taken for stdout's."""

    class Broken:
        def write(self, text: str) -> int:
            if where == "print":
                raise BrokenPipeError(32, "Broken pipe")
            return len(text)

        def flush(self) -> None:
            if where == "flush":
                raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Broken())
    assert cli.main(["keygen"]) == 141
    assert capsys.readouterr().err == ""


def keygen_with_closed(cwd: Path, fd: int) -> subprocess.CompletedProcess[str]:
    """``kasmina keygen --out commands.json`` in ``cwd``, started with file descriptor ``fd``
    (1 or 2) closed; the other of the two captured."""
    return subprocess.run(
        [sys.executable, "-m", "kasmina", "keygen", "--out", "commands.json"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if fd == 2 else None,
        stderr=subprocess.PIPE if fd == 1 else None,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
        preexec_fn=lambda: os.close(fd),
    )


def test_a_command_started_without_stdout_exits_on_its_work(tmp_path) -> None:
    """A command started with file descriptor 1 closed (``>&-``: ``sys.stdout`` is None) ended
    in a traceback from main's flush, exit 1, though its key file was written."""
    proc = keygen_with_closed(tmp_path, 1)
    assert (proc.returncode, proc.stderr) == (
        0,
        "wrote key 'default' to commands.json (1 key(s), mode 0600)\n",
    )
    assert (tmp_path / "commands.json").is_file()


def test_a_command_started_without_stderr_keeps_its_stdout_to_its_output(tmp_path) -> None:
    """With file descriptor 2 closed (``2>&-``: ``sys.stderr`` is None), ``print(file=None)``
    wrote to stdout: status lines and errors went into what a script captured as the output."""

    def keygen() -> tuple[int, str]:
        proc = keygen_with_closed(tmp_path, 2)
        return proc.returncode, proc.stdout

    rc, out = keygen()
    assert rc == 0 and out.startswith("export KASMINA_HMAC_KEYS=") and out.count("\n") == 1
    assert keygen() == (1, "")  # the file exists now: an error, on the closed stderr
