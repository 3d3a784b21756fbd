"""The ``kasmina`` command line: help texts, one-line errors, keygen, the Urza round trip."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kasmina.cli import main as cli
from kasmina.urza.artifact import PAYLOAD_SUFFIX
from kasmina.utils.keyring import Keyring

HELP_CASES = {
    ("demo",): ["--epochs", "--seeds", "--device", "--out", "--seed", "--nproc"],
    ("urza", "publish"): ["--store", "--builtin", "--factory", "--input-shape", "--key-id"],
    ("urza", "list"): ["--store", "--keys"],
    ("urza", "verify"): ["--store", "ARTIFACT_ID"],
    ("keygen",): ["--key-id", "--out", "--append", "KASMINA_HMAC_KEYS"],
    ("bench",): ["--gpu", "perf"],
    ("urza",): ["publish", "list", "verify"],
    (): ["demo", "urza", "keygen", "bench"],
}


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


@pytest.mark.parametrize("argv", list(HELP_CASES), ids=lambda a: " ".join(a) or "top")
def test_every_help_text_explains_its_options(argv, capsys) -> None:
    rc, out, _ = run(capsys, *argv, "--help")
    assert rc == 0
    for word in HELP_CASES[argv]:
        assert word in out, (argv, word)


def test_usage_errors_exit_2(capsys) -> None:
    assert run(capsys)[0] == 2
    assert run(capsys, "demo", "--epochs", "0")[0] == 2
    assert run(capsys, "urza", "publish", "--store", "s")[0] == 2  # needs --builtin/--factory
    assert run(capsys, "frobnicate")[0] == 2


# ------------------------------------------------------------------------------------ keygen


def test_keygen_prints_an_export_line_that_from_env_reads(capsys, monkeypatch) -> None:
    rc, out, _ = run(capsys, "keygen", "--key-id", "ops")
    assert rc == 0
    prefix = "export KASMINA_HMAC_KEYS="
    assert out.startswith(prefix) and out.count("\n") == 1
    monkeypatch.setenv("KASMINA_HMAC_KEYS", out.strip()[len(prefix) :])
    keyring = Keyring.from_env()
    assert keyring.key_ids == ("ops",) and len(keyring.get("ops")) == 32
    rc, out2, _ = run(capsys, "keygen", "--key-id", "ops")
    assert out2 != out  # fresh randomness each time


def test_keygen_writes_appends_and_protects_a_keyring_file(tmp_path, capsys) -> None:
    path = tmp_path / "keys.json"
    assert run(capsys, "keygen", "--out", str(path), "--key-id", "a")[0] == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = Keyring.from_file(path).get("a")
    rc, _, err = run(capsys, "keygen", "--out", str(path), "--key-id", "b")
    assert_one_line_error(rc, err, "exists", "--append")
    rc, out, _ = run(capsys, "keygen", "--out", str(path), "--key-id", "b", "--append")
    assert rc == 0
    keyring = Keyring.from_file(path)
    assert set(keyring.key_ids) == {"a", "b"} and keyring.get("a") == first
    assert out.strip().split("=", 1)[1].count(":") == 2  # both keys exported
    rc, _, err = run(capsys, "keygen", "--out", str(path), "--key-id", "a", "--append")
    assert_one_line_error(rc, err, "already holds key 'a'", "--force")
    assert run(capsys, "keygen", "--out", str(path), "--key-id", "a", "--append", "--force")[0] == 0
    assert Keyring.from_file(path).get("a") != first


@pytest.mark.parametrize("key_id", ["", "a,b", "a:b", "a b"])
def test_keygen_rejects_key_ids_the_env_format_cannot_hold(key_id, capsys) -> None:
    rc, _, err = run(capsys, "keygen", "--key-id", key_id)
    assert_one_line_error(rc, err, "invalid key id")


def test_keygen_append_to_a_corrupt_file_is_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "keys.json"
    path.write_text("{not json")
    rc, _, err = run(capsys, "keygen", "--out", str(path), "--append")
    assert_one_line_error(rc, err, "not valid JSON")
    assert path.read_text() == "{not json"  # untouched


# -------------------------------------------------------------------------------------- urza


@pytest.fixture
def keys(tmp_path, capsys) -> Path:
    path = tmp_path / "keys.json"
    assert run(capsys, "keygen", "--out", str(path), "--key-id", "pub")[0] == 0
    return path


def publish(capsys, store: Path, keys: Path, *extra: str) -> str:
    argv = ["urza", "publish", "--store", str(store), "--keys", str(keys), *extra]
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    return out.strip()


def test_urza_publish_list_verify_round_trip(tmp_path, keys, capsys) -> None:
    store = tmp_path / "store"
    a = publish(capsys, store, keys, "--builtin", "residual-mlp", "--dim", "8")
    b = publish(capsys, store, keys, "--builtin", "affine-shift", "--dim", "4", "--artifact-id=x1")
    assert a.startswith("residual-mlp-") and b == "x1"
    # Same blueprint, width and seed: the same bytes, so the same id (publishing is idempotent).
    assert publish(capsys, store, keys, "--builtin", "residual-mlp", "--dim", "8") == a

    rc, out, _ = run(capsys, "urza", "list", "--store", str(store), "--keys", str(keys))
    assert rc == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == sorted([a, b])
    assert any("affine-shift" in line and "key=pub" in line for line in lines)

    rc, out, _ = run(capsys, "urza", "verify", "--store", str(store), "--keys", str(keys))
    assert rc == 0 and out.count("ok") == 2

    # Unverified listing without keys still shows the ids.
    rc, out, err = run(capsys, "urza", "list", "--store", str(store))
    assert rc == 0 and sorted(out.split()) == sorted([a, b]) and "not verified" in err


def test_urza_verify_catches_a_flipped_payload_bit_and_a_wrong_key(tmp_path, keys, capsys) -> None:
    store = tmp_path / "store"
    good = publish(capsys, store, keys, "--builtin", "residual-mlp", "--dim", "4")
    bad = publish(capsys, store, keys, "--builtin", "residual-mlp", "--dim", "6")
    payload = store / f"{bad}{PAYLOAD_SUFFIX}"
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0x01
    payload.write_bytes(bytes(data))

    rc, out, err = run(capsys, "urza", "verify", "--store", str(store), "--keys", str(keys))
    assert rc == 1
    assert f"ok     {good}" in out and f"FAILED {bad}" in out and "SHA-256" in out
    assert "1 of 2" in err and "Traceback" not in err
    rc, out, _ = run(capsys, "urza", "verify", "--store", str(store), "--keys", str(keys), good)
    assert rc == 0

    other = tmp_path / "other.json"
    assert run(capsys, "keygen", "--out", str(other), "--key-id", "pub")[0] == 0
    rc, out, _ = run(capsys, "urza", "verify", "--store", str(store), "--keys", str(other), good)
    assert rc == 1 and "signature does not verify" in out


def test_urza_verify_of_unknown_or_invalid_ids_fails_per_id(tmp_path, keys, capsys) -> None:
    store = tmp_path / "store"
    good = publish(capsys, store, keys, "--builtin", "affine-shift", "--dim", "3")
    argv = ["urza", "verify", "--store", str(store), "--keys", str(keys), good, "nope", "../x"]
    rc, out, err = run(capsys, *argv)
    assert rc == 1 and "2 of 3" in err and err.count("\n") == 1
    assert f"ok     {good}" in out and "FAILED nope: no artifact 'nope'" in out
    assert "FAILED ../x:" in out


def test_urza_publish_from_a_factory(tmp_path, keys, capsys, monkeypatch) -> None:
    (tmp_path / "my_seed_mod.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Tanh())\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    store = tmp_path / "store"
    artifact = publish(capsys, store, keys, "--factory", "my_seed_mod:make", "--input-shape", "4,5")
    assert artifact.startswith("make-")
    rc, out, _ = run(capsys, "urza", "verify", "--store", str(store), "--keys", str(keys))
    assert rc == 0 and artifact in out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["urza", "list", "--store", "{tmp}/missing"], "no Urza store"),
        (["urza", "verify", "--store", "{tmp}", "--keys", "{tmp}/nokeys.json"], "nokeys.json"),
        (["urza", "verify", "--store", "{tmp}", "--keys", "{tmp}/bad.json"], "not valid JSON"),
        (["urza", "verify", "--store", "{tmp}", "--keys", "{keys}"], "no artifacts to verify"),
        (["urza", "list", "--store", "nosuchproto://x"], "nosuchproto"),
        (
            ["urza", "publish", "--store", "{tmp}/s", "--keys", "{keys}", "--builtin", "zzz"],
            "unknown blueprint",
        ),
        (
            ["urza", "publish", "--store", "{tmp}/s", "--keys", "{keys}"]
            + ["--builtin", "affine-shift"],
            "needs --dim",
        ),
        (
            ["urza", "publish", "--store", "{tmp}/s", "--keys", "{keys}", "--factory", "nomod:f"],
            "cannot import",
        ),
        (
            ["urza", "publish", "--store", "{tmp}/s", "--keys", "{keys}", "--factory", "os:getcwd"],
            "did not return an nn.Module",
        ),
        (
            ["urza", "publish", "--store", "{tmp}/s", "--keys", "{keys}", "--key-id", "zz"]
            + ["--builtin", "affine-shift", "--dim", "2"],
            "no key 'zz'",
        ),
        (
            ["urza", "publish", "--store", "{tmp}/s", "--keys", "{keys}", "--factory", "a:b"]
            + ["--input-shape", "4,x"],
            "cannot import",
        ),
    ],
)
def test_user_mistakes_are_one_line_errors(argv, fragment, tmp_path, keys, capsys, monkeypatch):
    monkeypatch.delenv("KASMINA_HMAC_KEYS", raising=False)
    (tmp_path / "bad.json").write_text("{oops")
    argv = [a.format(tmp=tmp_path, keys=keys) for a in argv]
    rc, _, err = run(capsys, *argv)
    assert_one_line_error(rc, err, fragment)


@pytest.mark.parametrize(
    ("factory", "fragment"),
    [
        ("torch.nn:Linear", "calling torch.nn:Linear failed: TypeError"),  # needs arguments
        ("broken_seed_mod:make", "cannot import 'broken_seed_mod'"),  # raises on import
        ("torch.nn:CosineSimilarity", "torch.export of CosineSimilarity failed"),  # 2 inputs
    ],
)
def test_publish_errors_in_the_users_factory_are_one_line(
    factory, fragment, tmp_path, keys, capsys, monkeypatch
) -> None:
    (tmp_path / "broken_seed_mod.py").write_text("raise SystemError('broken at import')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["urza", "publish", "--store", str(tmp_path / "s"), "--keys", str(keys)]
    rc, _, err = run(capsys, *argv, "--factory", factory, "--input-shape", "2,3")
    assert_one_line_error(rc, err, fragment)


def test_bench_runs_pytest_on_perf_or_the_gpu_script(capsys, monkeypatch) -> None:
    calls: list[tuple[list[str], Path]] = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, cwd: calls.append((cmd, cwd)) or 3)
    monkeypatch.chdir(Path(cli.__file__).resolve().parents[2])
    assert run(capsys, "bench", "--", "-k", "cache")[0] == 3  # pytest's status is passed on
    cmd, cwd = calls[-1]
    assert cmd[1:3] == ["-m", "pytest"] and "--benchmark-only" in cmd
    assert cmd[3] == str(cwd / "perf") and cmd[-2:] == ["-k", "cache"]
    if (cwd / "perf" / "bench_gpu.py").is_file():
        run(capsys, "bench", "--gpu")
        assert calls[-1][0][1].endswith("bench_gpu.py")


def test_bench_outside_a_checkout_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "pkg" / "cli" / "main.py"))
    rc, _, err = run(capsys, "bench")
    assert_one_line_error(rc, err, "no perf/ directory")


def test_python_dash_m_kasmina_reports_errors_without_a_traceback(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).resolve().parents[2])}
    proc = subprocess.run(
        [sys.executable, "-m", "kasmina", "urza", "list", "--store", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("kasmina: error: no Urza store")
    assert "Traceback" not in proc.stderr and proc.stdout == ""
