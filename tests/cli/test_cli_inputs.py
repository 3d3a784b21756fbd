"""The command line with awkward inputs: key files over odd paths, export lines that a shell
reads back, torch's own log output, and one bad entry in a store."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kasmina.cli import main as cli
from kasmina.utils.keyring import Keyring
from tests.cli.helpers import assert_one_line_error, fifo_never_blocks, publish, run


def test_keygen_refuses_a_fifo_or_a_directory_and_leaves_it_alone(tmp_path, capsys) -> None:
    fifo, folder = tmp_path / "fifo", tmp_path / "dir"
    os.mkfifo(fifo)
    folder.mkdir()
    for target in (fifo, folder):
        for argv in (
            ["keygen", "--publisher", "--out", str(target), "--force"],
            ["keygen", "--out", str(target), "--append", "--force"],  # would block on a FIFO
        ):
            with fifo_never_blocks(fifo):
                rc, out, err = run(capsys, *argv)
            assert_one_line_error(rc, err, f"--out {target} exists and is not a regular file")
            assert out == ""
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and folder.is_dir() and not any(folder.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "fifo"]  # no temporary left


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize(
    "argv",
    [
        ["keygen", "--out", "/proc/x.json"],
        ["keygen", "--publisher", "--out", "/proc/x.json"],
        ["keygen", "--publisher", "--out", "/proc/x.json", "--force"],
    ],
)
def test_keygen_errors_name_the_path_given_not_a_temporary(argv, capsys) -> None:
    rc, _, err = run(capsys, *argv)
    assert_one_line_error(rc, err, "cannot write /proc/x.json:")
    assert ".tmp" not in err


def test_the_export_line_reads_back_in_a_shell(tmp_path, capsys, monkeypatch) -> None:
    """An id the "id:hex" form cannot hold (from a hand-written keyring that --append extends)
    is exported in the JSON form, shell-quoted: eval gives back exactly the keyring."""
    path = tmp_path / "keys.json"
    path.write_text('{"a;b $(x) c": "' + "00" * 32 + '"}')
    path.chmod(0o600)
    rc, out, _ = run(capsys, "keygen", "--out", str(path), "--append", "--key-id", "ops")
    assert rc == 0 and out.startswith("export KASMINA_HMAC_KEYS='{")
    value = subprocess.run(
        ["sh", "-c", out + 'printf %s "$KASMINA_HMAC_KEYS"'],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    monkeypatch.setenv("KASMINA_HMAC_KEYS", value)
    keyring = Keyring.from_env()
    assert set(keyring.key_ids) == {"a;b $(x) c", "ops"}
    assert keyring.get("ops") == Keyring.from_file(path).get("ops")


def test_a_failed_export_is_one_line_without_torchs_log(tmp_path, keys, capsys) -> None:
    """torch logs a traceback of its own (fake_tensor) before raising; the CLI silences torch's
    loggers for the export only, and restores their levels afterwards."""
    records: list[logging.LogRecord] = []
    recorder = logging.Handler()
    recorder.emit = records.append  # type: ignore[method-assign]
    fake_tensor = logging.getLogger("torch._subclasses.fake_tensor")
    levels = {n: logging.getLogger(n).level for n in ("torch", fake_tensor.name)}
    argv = ["urza", "publish", "--store", str(tmp_path / "s"), "--key", str(keys)]
    argv += ["--builtin", "residual-mlp", "--dim", "4", "--input-shape", "8,5"]
    fake_tensor.addHandler(recorder)
    try:
        rc, _, err = run(capsys, *argv)
    finally:
        fake_tensor.removeHandler(recorder)
    assert_one_line_error(rc, err, "torch.export failed")
    assert records == []
    assert {n: logging.getLogger(n).level for n in levels} == levels


def test_one_bad_store_entry_is_reported_and_the_rest_carry_on(
    tmp_path, keys, publishers, capsys
) -> None:
    """A directory where a manifest should be is that entry's problem, not an unavailable
    store: list shows it INVALID, verify FAILED (exit status 1), and both go on."""
    store = tmp_path / "store"
    good = publish(capsys, store, keys, "--builtin", "affine-shift", "--dim", "3")
    (store / "a.manifest.json").mkdir()
    given = ["--store", str(store), "--publishers", str(publishers)]
    rc, out, err = run(capsys, "urza", "list", *given)
    assert rc == 0 and "unavailable" not in err and "Urza read failed" not in err
    assert "a  INVALID: artifact 'a': manifest is not a readable file" in out
    assert f"{good}  affine-shift" in out
    rc, out, err = run(capsys, "urza", "verify", *given)
    assert rc == 1 and "1 of 2 artifact(s) failed verification" in err and err.count("\n") == 1
    assert "FAILED a: artifact 'a': manifest is not a readable file" in out
    assert f"ok     {good}" in out


def test_the_bounds_the_cli_repeats_match_their_sources() -> None:
    from kasmina.demo.config import MAX_SEED
    from kasmina.utils.keyring import MIN_KEY_BYTES

    assert cli.DEMO_MAX_SEED == MAX_SEED
    assert cli.MIN_KEY_BYTES == MIN_KEY_BYTES


def test_the_cli_imports_no_torch_for_its_help() -> None:
    """``kasmina --help`` and argument errors answer at once: the CLI imports torch only in
    the commands that need it (a second of start-up otherwise)."""
    code = "import sys, kasmina.cli.main; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-2000:]
