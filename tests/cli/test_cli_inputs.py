"""The command line with awkward inputs: key files over odd paths, export lines that a shell
reads back, torch's own log output, and one bad entry in a store."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kasmina.cli import main as cli
from kasmina.utils.keyring import Keyring
from tests.cli.helpers import (
    assert_one_line_error,
    fifo_never_blocks,
    legacy_artifact,
    publish,
    run,
)


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


def test_keygen_publisher_force_replaces_only_a_publisher_key(tmp_path, capsys) -> None:
    """``--publisher --force`` onto a command keyring wrote a private key over it: every
    controller and trainer key in it was lost, and the command said only that it wrote the
    publisher key. Only a publisher key file is replaced, whatever its mode."""
    keyring, other, key = tmp_path / "commands.json", tmp_path / "notes.txt", tmp_path / "pub.key"
    assert run(capsys, "keygen", "--out", str(keyring), "--key-id", "tamiyo")[0] == 0
    other.write_text("not a key\n")
    for target in (keyring, other):
        before = target.read_bytes()
        rc, out, err = run(capsys, "keygen", "--publisher", "--force", "--out", str(target))
        assert_one_line_error(rc, err, f"{target} holds no publisher key", "--force replaces")
        assert out == "" and target.read_bytes() == before
    assert Keyring.from_file(keyring).key_ids == ("tamiyo",)
    assert run(capsys, "keygen", "--publisher", "--out", str(key))[0] == 0
    key.chmod(0o644)  # a key file too open to be used is still one to replace
    before = key.read_bytes()
    assert run(capsys, "keygen", "--publisher", "--force", "--out", str(key))[0] == 0
    assert key.read_bytes() != before and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["commands.json", "notes.txt", "pub.key"]


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


def test_a_module_that_cannot_take_its_input_is_one_line_without_torchs_log(
    tmp_path, keys, capsys
) -> None:
    """Exported, such a module made torch log a traceback of its own (fake_tensor) before it
    raised; the CLI silenced torch's loggers for the export. The module now runs on its example
    first and is refused there, in one line, before any export; the loggers' levels stay."""
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
    assert_one_line_error(rc, err, "does not run on a float32 input of shape [8, 5]")
    assert records == []
    assert {n: logging.getLogger(n).level for n in levels} == levels


@pytest.mark.parametrize("entry", ["directory", "FIFO"])
def test_one_bad_store_entry_is_reported_and_the_rest_carry_on(
    tmp_path, keys, publishers, capsys, entry
) -> None:
    """A directory or a FIFO where a manifest should be is that entry's problem, not an
    unavailable store: list shows it INVALID, verify FAILED (exit status 1), and both go on
    (a FIFO is refused before it is opened to read, so nothing waits on it)."""
    store = tmp_path / "store"
    good = publish(capsys, store, keys, "--builtin", "affine-shift", "--dim", "3")
    bad = store / "a.manifest.json"
    bad.mkdir() if entry == "directory" else os.mkfifo(bad)
    given = ["--store", str(store), "--publishers", str(publishers)]
    with fifo_never_blocks(bad) if entry == "FIFO" else contextlib.nullcontext():
        rc, out, err = run(capsys, "urza", "list", *given)
    assert rc == 0 and "unavailable" not in err and "Urza read failed" not in err
    assert "a  INVALID: artifact 'a': manifest is not a readable file" in out
    assert f"{good}  affine-shift" in out
    assert entry == "directory" or "(a FIFO, not a regular file)" in out
    with fifo_never_blocks(bad) if entry == "FIFO" else contextlib.nullcontext():
        rc, out, err = run(capsys, "urza", "verify", *given)
    assert rc == 1 and "1 of 2 artifact(s) failed verification" in err and err.count("\n") == 1
    assert "FAILED a: artifact 'a': manifest is not a readable file" in out
    assert f"ok     {good}" in out


def test_a_store_path_that_is_not_utf8_is_escaped_on_a_strict_stdout(
    tmp_path, keys, publishers, capsys, monkeypatch
) -> None:
    """A result line quoting a store path (or an id) whose bytes are not UTF-8 raised
    UnicodeEncodeError on a strict UTF-8 stdout: verify stopped at that line, one codec error
    instead of the other artifacts' results."""
    good = publish(capsys, tmp_path / "s", keys, "--builtin", "affine-shift", "--dim", "3")
    store = (tmp_path / "s").rename(tmp_path / os.fsdecode(b"store\xff"))
    buf = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(buf, encoding="utf-8", errors="strict"))
    given = ["--store", str(store), "--publishers", str(publishers)]
    rc = cli.main(["urza", "verify", *given, os.fsdecode(b"no\xff"), "nosuch", good])
    sys.stdout.flush()
    lines = buf.getvalue().decode().splitlines()
    assert rc == 1 and "2 of 3 artifact(s) failed" in capsys.readouterr().err
    assert lines[0].startswith("FAILED no\\udcff: invalid artifact id 'no\\udcff'")
    missing = f"FAILED nosuch: no artifact 'nosuch' in {tmp_path}/store\\udcff"
    assert lines[1:] == [missing, f"ok     {good}"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize(
    ("option", "what"),
    [
        ("--publishers", "trusted publishers file"),
        ("--key", "publisher key file"),
        ("--hmac-keys", "keyring file"),
    ],
)
def test_a_key_file_that_is_no_regular_file_is_one_line_at_once(
    option, what, tmp_path, keys, capsys
) -> None:
    """A FIFO would block and /dev/zero would be read without end: both are refused before a
    byte is read, naming the file."""
    fifo, zero = tmp_path / "fifo", tmp_path / "zero"
    os.mkfifo(fifo)
    zero.symlink_to("/dev/zero")
    action = "resign" if option == "--hmac-keys" else "verify"
    for path, kind in ((fifo, "a FIFO"), (zero, "a character device")):
        argv = ["urza", action, "--store", str(tmp_path), option, str(path)]
        if option == "--hmac-keys":
            argv += ["--key", str(keys)]
        with fifo_never_blocks(fifo):
            rc, out, err = run(capsys, *argv)
        assert_one_line_error(rc, err, f"{what} {path} is not a regular file ({kind})")
        assert out == ""


@pytest.mark.parametrize("action", ["publish", "resign"])
@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/urza", "HTTPS://example.invalid/u", "simplecache::http://h/u"]
)
def test_writes_to_an_http_store_are_refused_in_one_line(action, url, keys, capsys) -> None:
    argv = ["urza", action, "--store", url, "--key", str(keys)]
    argv += ["--builtin", "affine-shift", "--dim", "4"] if action == "publish" else []
    rc, out, err = run(capsys, *argv)
    assert_one_line_error(rc, err, "is an HTTP store, which Urza only reads")
    assert out == ""


def test_resign_reports_a_failed_write_per_artifact_and_goes_on(
    tmp_path, keys, capsys, monkeypatch
) -> None:
    """A store that refuses a write (an HTTP server's 501 is no OSError) fails that artifact,
    not the run: every other artifact is still re-signed."""
    from kasmina.urza import publish as publish_module

    class StoreRefused(Exception):
        pass

    hmac_keys = tmp_path / "old.json"
    assert run(capsys, "keygen", "--out", str(hmac_keys), "--key-id", "old")[0] == 0
    old_key = Keyring.from_file(hmac_keys).get("old")
    store = tmp_path / "store"
    for artifact_id in ("a", "b", "c"):
        legacy_artifact(store, artifact_id, artifact_id.encode() * 10, old_key)
    real = publish_module._atomic_write

    def write(fs, path, data):
        if path.endswith("/a.manifest.json"):
            raise StoreRefused("501, message='Unsupported method (PUT)'")
        if path.endswith("/b.manifest.json"):
            raise PermissionError(13, "Permission denied", path)
        real(fs, path, data)

    monkeypatch.setattr(publish_module, "_atomic_write", write)
    commands = tmp_path / "commands.json"
    assert run(capsys, "keygen", "--out", str(commands), "--key-id", "ctl")[0] == 0
    argv = ["urza", "resign", "--store", str(store), "--key", str(keys)]
    argv += ["--command-keys", str(commands)]
    rc, out, err = run(capsys, *argv, "--hmac-keys", str(hmac_keys))
    assert rc == 1 and err == "kasmina: error: 2 of 3 artifact(s) could not be re-signed\n"
    assert "FAILED a: StoreRefused: 501, message='Unsupported method (PUT)'" in out
    assert f"FAILED b: Permission denied: {store}/b.manifest.json" in out
    assert "ok     c (signed by 'pub')" in out


def test_errors_name_the_file_at_fault(tmp_path, keys, capsys, monkeypatch) -> None:
    monkeypatch.delenv("KASMINA_HMAC_KEYS", raising=False)
    binary, bad_value = tmp_path / "bin.json", tmp_path / "short.json"
    binary.write_bytes(b"\xff\xfe{")
    bad_value.write_text('{"ci": "zz"}')
    binary.chmod(0o600)
    store = ["--store", str(tmp_path)]
    for argv, fragment in [
        (["verify", *store, "--publishers", str(binary)], f"{binary} is not UTF-8 text"),
        (["verify", *store, "--publishers", str(bad_value)], f"{bad_value}: publisher 'ci'"),
        (["resign", *store, "--key", str(keys), "--hmac-keys", str(binary)], str(binary)),
    ]:
        rc, _, err = run(capsys, "urza", *argv)
        assert_one_line_error(rc, err, fragment)
    publish = ["urza", "publish", "--key", str(keys), "--builtin", "affine-shift", "--dim", "4"]
    if Path("/sys/kernel").is_dir():  # Linux: nothing can be created there, even by root
        rc, _, err = run(capsys, *publish, "--store", "/sys/kernel")
        assert_one_line_error(rc, err, "/sys/kernel/affine-shift-")
        assert ".tmp" not in err
    rc, out, err = run(capsys, *publish, "--store", str(tmp_path / "s"), "--blueprint", "")
    assert_one_line_error(rc, err, "--blueprint is empty")
    assert out == "" and not (tmp_path / "s").exists()


def test_the_bounds_the_cli_repeats_match_their_sources() -> None:
    from kasmina.demo.config import MAX_SEED
    from kasmina.utils.keyring import MIN_KEY_BYTES

    assert cli.DEMO_MAX_SEED == MAX_SEED
    assert cli.MIN_KEY_BYTES == MIN_KEY_BYTES


def test_the_builtin_blueprints_the_cli_repeats_match_the_registry() -> None:
    from kasmina.cli.urza import BUILTIN_BLUEPRINTS
    from kasmina.urza.blueprints import BLUEPRINTS

    assert BUILTIN_BLUEPRINTS == tuple(sorted(BLUEPRINTS))


# Each argv is parsed by kasmina.cli.main.main in one fresh interpreter; the script prints, per
# argv, its exit status and whether torch had been imported by then.
_NO_TORCH_SCRIPT = """
import contextlib, io, json, sys
from kasmina.cli.main import main
results = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
    results.append([argv, rc, "torch" in sys.modules])
print(json.dumps(results))
"""


def test_the_cli_imports_no_torch_for_its_help() -> None:
    """``kasmina --help`` and argument errors answer at once: the CLI imports torch only in
    the commands that need it (a second of start-up otherwise). The parser is built and run
    here, every subcommand's included, in a fresh interpreter."""
    argvs = [
        ["--help"],
        ["urza", "--help"],
        ["urza", "publish", "--help"],
        ["keygen", "--help"],
        ["demo", "--help"],
        ["bench", "--help"],
        ["demo", "--epochs", "0"],  # argument errors: exit status 2
        ["urza", "publish", "--store", "s"],
        ["no-such-command"],
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_SCRIPT, json.dumps(argvs)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    assert [argv for argv, _, _ in results] == argvs
    assert [rc for _, rc, _ in results] == [0] * 6 + [2] * 3, results
    assert [argv for argv, _, torch_loaded in results if torch_loaded] == [], results
