"""The ``kasmina`` command line: help texts, one-line errors, keygen, the Urza round trip."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kasmina.cli import main as cli
from kasmina.urza.artifact import PAYLOAD_SUFFIX
from kasmina.urza.keys import PublisherKey, TrustedPublishers
from kasmina.utils.keyring import Keyring
from tests.cli.helpers import (
    assert_one_line_error,
    fifo_never_blocks,
    legacy_artifact,
    publish,
    run,
)

HELP_CASES = {
    ("demo",): ["--epochs", "--seeds", "--device", "--out", "--seed", "--nproc"],
    ("urza", "publish"): [
        "--store",
        "--builtin",
        "--factory",
        "--input-shape",
        "--key",
        "--key-id",
    ],
    ("urza", "list"): ["--store", "--publishers", "--key"],
    ("urza", "verify"): ["--store", "--publishers", "ARTIFACT_ID"],
    ("urza", "resign"): [
        "--store",
        "--key",
        "--hmac-keys",
        "--command-keys",
        "--previous-publishers",
        "ARTIFACT_ID",
    ],
    ("keygen",): ["--key-id", "--out", "--append", "KASMINA_HMAC_KEYS", "--publisher", "Ed25519"],
    ("bench",): ["--gpu", "perf"],
    ("urza",): ["publish", "list", "verify", "resign"],
    ("runs", "prune"): ["--runs-root", "--older-than", "--keep", "--dry-run"],
    ("runs",): ["list", "prune"],
    (): ["demo", "urza", "keygen", "bench", "runs"],
}


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
    for size in ("8", "100000000000"):  # a keyring refuses short keys; a huge one ran out of memory
        rc, _, err = run(capsys, "keygen", "--bytes", size)
        assert rc == 2 and "expected 16 to 1024 bytes" in err and "Traceback" not in err
    # A seed torch cannot take (it overflowed after the demo had written its keys) or that the
    # demo's derived seeds would overflow: refused by argparse, naming the option.
    for argv in (
        ["demo", "--seed", "99999999999999999999"],
        ["demo", "--seed", "-1"],
        ["demo", "--seed", str(2**32)],
        ["urza", "publish", "--store", "s", "--builtin", "x", "--seed", "99999999999999999999"],
    ):
        rc, _, err = run(capsys, *argv)
        assert rc == 2 and "argument --seed: expected 0 to" in err and "Traceback" not in err


def test_a_store_whose_backend_is_not_installed_is_one_error_line(capsys, monkeypatch) -> None:
    """``--store s3://...`` without s3fs: fsspec raises ImportError, which the CLI reports."""

    def missing(*_args, **_kwargs):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr("fsspec.core.url_to_fs", missing)
    rc, _, err = run(capsys, "urza", "list", "--store", "s3://bucket/store")
    assert_one_line_error(rc, err, "Install s3fs")


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


def test_keygen_writes_a_linked_key_file_through_the_link(tmp_path, capsys) -> None:
    """A key file that is a link (into a shared configuration directory) keeps being one: the
    write replaced the link with a file, and the trainers reading the target never saw the
    new key."""
    (tmp_path / "etc").mkdir()
    target, link = tmp_path / "etc" / "commands.json", tmp_path / "commands.json"
    assert run(capsys, "keygen", "--out", str(target), "--key-id", "a")[0] == 0
    link.symlink_to(target)
    assert run(capsys, "keygen", "--out", str(link), "--key-id", "b", "--append")[0] == 0
    assert link.is_symlink() and set(Keyring.from_file(target).key_ids) == {"a", "b"}
    publisher, publisher_link = tmp_path / "etc" / "publisher.key", tmp_path / "publisher.key"
    assert run(capsys, "keygen", "--publisher", "--out", str(publisher))[0] == 0
    publisher_link.symlink_to(publisher)
    before = publisher.read_bytes()
    assert run(capsys, "keygen", "--publisher", "--out", str(publisher_link), "--force")[0] == 0
    assert publisher_link.is_symlink() and publisher.read_bytes() != before


def test_keygen_creates_the_key_files_directory(tmp_path, capsys) -> None:
    path = tmp_path / "new" / "dir" / "commands.json"
    assert run(capsys, "keygen", "--out", str(path), "--key-id", "a")[0] == 0
    assert set(Keyring.from_file(path).key_ids) == {"a"}


def test_an_input_shape_refuses_a_batch_of_one_only() -> None:
    from kasmina.cli.common import CLIError
    from kasmina.cli.publish_checks import parse_shape

    assert parse_shape("8,1,7,7") == (8, 1, 7, 7)  # one channel per seed: the slot's own
    assert parse_shape("8,4,1,1") == (8, 4, 1, 1)  # a pooled [B, C, 1, 1] output
    with pytest.raises(CLIError, match="batches of 1 only"):
        parse_shape("1,16")


def test_concurrent_appends_each_add_their_key(tmp_path, capsys, monkeypatch) -> None:
    """Runs at once each read the file, added a key and renamed theirs over it: the last
    rename kept its own key and dropped the others'. The read is slowed here so that every run
    reads before any writes, unless they take turns."""
    import threading
    import time

    from kasmina.utils import keyring as keyring_module

    path = tmp_path / "commands.json"
    assert run(capsys, "keygen", "--out", str(path), "--key-id", "k0")[0] == 0
    read = keyring_module.Keyring.from_file.__func__

    def slow_read(cls, *args, **kwargs):
        keyring = read(cls, *args, **kwargs)
        time.sleep(0.2)
        return keyring

    monkeypatch.setattr(keyring_module.Keyring, "from_file", classmethod(slow_read))
    codes: list[int] = []
    argv = ["keygen", "--out", str(path), "--append", "--key-id"]
    runs = [
        threading.Thread(target=lambda k=k: codes.append(cli.main([*argv, f"k{k}"])))
        for k in range(1, 5)
    ]
    for thread in runs:
        thread.start()
    for thread in runs:
        thread.join(30)
    capsys.readouterr()
    assert codes == [0] * 4
    assert set(read(Keyring, path).key_ids) == {f"k{k}" for k in range(5)}


@pytest.mark.parametrize(
    "key_id", ["", "a,b", "a:b", "a b", "{ops", "a\r", "a\u00a0", "a;b", "$(id)", ".a", "é"]
)
def test_keygen_rejects_key_ids_the_env_format_cannot_hold(key_id, capsys) -> None:
    rc, _, err = run(capsys, "keygen", "--key-id", key_id)
    assert_one_line_error(rc, err, "invalid key id")


@pytest.mark.parametrize("value", ["123", "null"])
def test_a_publishers_file_with_a_non_text_key_is_one_error_line(tmp_path, capsys, value) -> None:
    path = tmp_path / "pubs.json"
    path.write_text(f'{{"ci": {value}}}')
    rc, _, err = run(capsys, "urza", "list", "--store", str(tmp_path), "--publishers", str(path))
    assert_one_line_error(rc, err, "publisher 'ci'")


@pytest.mark.parametrize("flag", ["--append", "--force"])
def test_keygen_file_flags_without_a_file_are_refused(flag, capsys) -> None:
    """``--append`` or ``--force`` without ``--out`` printed a new key and wrote nothing: the
    user believed it added to (or replaced a key in) a keyring the trainers read."""
    rc, out, err = run(capsys, "keygen", "--key-id", "a", flag)
    assert_one_line_error(rc, err, flag, "--out")
    assert out == ""


def test_keygen_append_to_a_corrupt_file_is_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "keys.json"
    path.write_text("{not json")
    path.chmod(0o600)
    rc, _, err = run(capsys, "keygen", "--out", str(path), "--append")
    assert_one_line_error(rc, err, "not valid JSON")
    assert path.read_text() == "{not json"  # untouched


# -------------------------------------------------------------------------------------- urza


def test_keygen_publisher_writes_a_0600_key_and_prints_only_the_public_key(
    tmp_path, capsys
) -> None:
    path = tmp_path / "publisher.key"
    rc, out, err = run(capsys, "keygen", "--publisher", "--out", str(path), "--key-id", "ci")
    assert rc == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = PublisherKey.from_file(path)
    assert json.loads(out) == {"ci": key.public_key_text}  # what trainers are configured with
    assert TrustedPublishers(json.loads(out)) == key.trusted_publishers()
    assert "PRIVATE" not in out + err and "mode 0600" in err
    # Never replaced by accident; --force replaces it, still 0600.
    rc, _, err = run(capsys, "keygen", "--publisher", "--out", str(path))
    assert_one_line_error(rc, err, "exists", "--force")
    assert PublisherKey.from_file(path).public_key_text == key.public_key_text
    rc, out, _ = run(capsys, "keygen", "--publisher", "--out", str(path), "--force")
    assert rc == 0 and stat.S_IMODE(path.stat().st_mode) == 0o600
    replaced = PublisherKey.from_file(path)
    assert replaced.public_key_text != key.public_key_text
    assert json.loads(out) == {replaced.key_id: replaced.public_key_text}
    assert replaced.key_id.startswith("publisher-")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["keygen", "--publisher"], "needs --out"),
        (["keygen", "--publisher", "--out", "{tmp}/k", "--append"], "--append is for HMAC"),
        (["keygen", "--publisher", "--out", "{tmp}/k", "--key-id", "a b"], "invalid publisher"),
    ],
)
def test_keygen_publisher_mistakes_are_one_line(argv, fragment, tmp_path, capsys) -> None:
    rc, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert_one_line_error(rc, err, fragment)
    assert out == "" and not (tmp_path / "k").exists()


def test_a_builtin_takes_its_example_shape_from_input_shape(tmp_path, keys, capsys) -> None:
    """A sequence model's slot sees [B, L, H]: ``--builtin`` exports on ``--input-shape``'s
    rank (8,DIM by default), every dimension but the chunk's width dynamic."""
    store = tmp_path / "store"
    flat = publish(capsys, store, keys, "--builtin", "residual-mlp", "--dim", "8")
    seq = publish(
        capsys, store, keys, "--builtin", "residual-mlp", "--dim", "8", "--input-shape", "4,5,8"
    )
    shapes = {
        artifact: json.loads((store / f"{artifact}.manifest.json").read_text())["input_spec"]
        for artifact in (flat, seq)
    }
    assert shapes[flat][0]["shape"] == [None, 8] and shapes[seq][0]["shape"] == [None, None, 8]


def test_ctrl_c_in_the_exports_first_dynamo_import_exits_130(
    tmp_path, keys, capsys, monkeypatch
) -> None:
    """A Ctrl-C inside ``torch.export``'s first import of ``torch._dynamo`` leaves the package
    without its ``exc`` attribute; the publish's error handling must not look it up then (it
    raised AttributeError over the interrupt: a traceback and exit 1 instead of 130)."""
    import torch._dynamo

    import kasmina.urza.publish

    def interrupted(*args, **kwargs):
        monkeypatch.delattr(torch._dynamo, "exc")  # as a half-finished import leaves it
        raise KeyboardInterrupt

    monkeypatch.setattr(kasmina.urza.publish, "export_payload", interrupted)
    argv = ["--store", str(tmp_path / "store"), "--key", str(keys), "--builtin", "residual-mlp"]
    rc, _, err = run(capsys, "urza", "publish", *argv, "--dim", "4")
    assert (rc, err) == (130, "kasmina: interrupted\n")


def test_urza_publish_list_verify_round_trip(tmp_path, keys, publishers, capsys) -> None:
    store = tmp_path / "store"
    a = publish(capsys, store, keys, "--builtin", "residual-mlp", "--dim", "8")
    b = publish(capsys, store, keys, "--builtin", "affine-shift", "--dim", "4", "--artifact-id=x1")
    assert a.startswith("residual-mlp-") and b == "x1"
    for bad in ("", "../x"):  # an id given is used or refused, never replaced
        argv = ["urza", "publish", "--store", str(store), "--key", str(keys), "--builtin"]
        rc, _, err = run(capsys, *argv, "residual-mlp", "--dim", "8", f"--artifact-id={bad}")
        assert_one_line_error(rc, err, "--artifact-id")
    # Same blueprint, width and seed: the same bytes, so the same id (publishing is idempotent).
    assert publish(capsys, store, keys, "--builtin", "residual-mlp", "--dim", "8") == a

    rc, out, _ = run(capsys, "urza", "list", "--store", str(store), "--publishers", str(publishers))
    assert rc == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == sorted([a, b])
    assert any("affine-shift" in line and "key=pub" in line for line in lines)

    verify = ["urza", "verify", "--store", str(store)]
    rc, out, _ = run(capsys, *verify, "--publishers", str(publishers))
    assert rc == 0 and out.count("ok") == 2
    # A publisher may check its own store with its key file (only the public half is used).
    rc, out, _ = run(capsys, *verify, "--key", str(keys))
    assert rc == 0 and out.count("ok") == 2

    # Unverified listing without keys still shows the ids.
    rc, out, err = run(capsys, "urza", "list", "--store", str(store))
    assert rc == 0 and sorted(out.split()) == sorted([a, b]) and "not verified" in err


def test_urza_verify_catches_a_flipped_payload_bit_and_a_wrong_key(
    tmp_path, keys, publishers, capsys
) -> None:
    store = tmp_path / "store"
    good = publish(capsys, store, keys, "--builtin", "residual-mlp", "--dim", "4")
    bad = publish(capsys, store, keys, "--builtin", "residual-mlp", "--dim", "6")
    payload = store / f"{bad}{PAYLOAD_SUFFIX}"
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0x01
    payload.write_bytes(bytes(data))

    verify = ["urza", "verify", "--store", str(store)]
    rc, out, err = run(capsys, *verify, "--publishers", str(publishers))
    assert rc == 1
    assert f"ok     {good}" in out and f"FAILED {bad}" in out and "SHA-256" in out
    assert "1 of 2" in err and "Traceback" not in err
    rc, out, _ = run(capsys, *verify, "--publishers", str(publishers), good)
    assert rc == 0

    # Another key under the same id: its public key does not verify these manifests.
    other = tmp_path / "other.key"
    rc, other_public, _ = run(
        capsys, "keygen", "--publisher", "--out", str(other), "--key-id", "pub"
    )
    assert rc == 0
    (tmp_path / "other.json").write_text(other_public)
    rc, out, _ = run(capsys, *verify, "--publishers", str(tmp_path / "other.json"), good)
    assert rc == 1 and "signature does not verify" in out
    # And a verifier that trusts some other publisher id reports the unknown key.
    (tmp_path / "stranger.json").write_text(other_public.replace('"pub"', '"stranger"'))
    rc, out, _ = run(capsys, *verify, "--publishers", str(tmp_path / "stranger.json"), good)
    assert rc == 1 and "unknown publisher key 'pub'" in out


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs /proc/self/mem")
def test_urza_verify_and_list_name_an_unreadable_artifact_and_go_on(
    tmp_path, keys, publishers, capsys
) -> None:
    """A payload whose read fails with an I/O error (here a link to ``/proc/self/mem``, whose
    first page reads EIO: a bad sector, an NFS error) is FAILED under its own name, and the
    artifacts after it are still checked (the whole run stopped there, naming only the store)."""
    store = tmp_path / "store"
    first = publish(capsys, store, keys, "--builtin", "residual-mlp", "--dim", "4")
    good = publish(capsys, store, keys, "--builtin", "residual-mlp", "--dim", "6")
    payload = store / f"{first}{PAYLOAD_SUFFIX}"
    payload.unlink()
    payload.symlink_to("/proc/self/mem")
    verify = ["urza", "verify", "--store", str(store), "--publishers", str(publishers)]
    rc, out, err = run(capsys, *verify, first, good)
    assert rc == 1, err
    assert f"FAILED {first}" in out and f"ok     {good}" in out and "1 of 2" in err
    rc, out, _ = run(capsys, "urza", "list", "--store", str(store), "--publishers", str(publishers))
    assert rc == 0 and good in out


def test_hmac_keyrings_no_longer_sign_or_verify_artifacts(tmp_path, keys, capsys) -> None:
    hmac_keys = tmp_path / "keys.json"
    assert run(capsys, "keygen", "--out", str(hmac_keys), "--key-id", "pub")[0] == 0
    store = tmp_path / "store"
    publish(capsys, store, keys, "--builtin", "affine-shift", "--dim", "3")
    for action in (["publish", "--builtin", "affine-shift", "--dim", "3"], ["verify"], ["list"]):
        argv = ["urza", action[0], "--store", str(store), "--keys", str(hmac_keys), *action[1:]]
        rc, _, err = run(capsys, *argv)
        assert_one_line_error(rc, err, "--keys (an HMAC keyring) no longer signs or verifies")
    # An HMAC keyring file given as the publisher key is not a key either.
    rc, _, err = run(capsys, "urza", "verify", "--store", str(store), "--key", str(hmac_keys))
    assert_one_line_error(rc, err, "not a PEM private key")


def test_a_group_readable_publisher_key_is_refused(tmp_path, keys, capsys) -> None:
    keys.chmod(0o640)
    argv = ["urza", "publish", "--store", str(tmp_path / "s"), "--key", str(keys)]
    rc, _, err = run(capsys, *argv, "--builtin", "affine-shift", "--dim", "2")
    assert_one_line_error(rc, err, "accessible by group/others", "chmod 600")
    assert not (tmp_path / "s").exists()


def test_the_publisher_key_file_may_come_from_the_environment(
    tmp_path, keys, publishers, capsys, monkeypatch
) -> None:
    store = tmp_path / "store"
    argv = ["urza", "publish", "--store", str(store), "--builtin", "affine-shift", "--dim", "2"]
    monkeypatch.delenv("KASMINA_PUBLISHER_KEY_FILE", raising=False)
    rc, _, err = run(capsys, *argv)
    assert_one_line_error(rc, err, "no publisher key", "KASMINA_PUBLISHER_KEY_FILE")
    monkeypatch.setenv("KASMINA_PUBLISHER_KEY_FILE", str(keys))
    rc, out, _ = run(capsys, *argv)
    assert rc == 0
    verify = ["urza", "verify", "--store", str(store), "--publishers", str(publishers)]
    assert run(capsys, *verify, out.strip())[0] == 0
    rc, _, err = run(capsys, "urza", "verify", "--store", str(store))
    assert_one_line_error(rc, err, "no publisher public keys")


def test_urza_resign_migrates_hmac_manifests(tmp_path, keys, publishers, capsys) -> None:
    hmac_keys = tmp_path / "old.json"
    assert run(capsys, "keygen", "--out", str(hmac_keys), "--key-id", "old")[0] == 0
    store = tmp_path / "store"
    old_key = Keyring.from_file(hmac_keys).get("old")
    legacy_artifact(store, "one", b"first payload", old_key)
    legacy_artifact(store, "two", b"second payload", old_key)
    legacy_artifact(store, "bad", b"third payload", b"not the old key, 32 bytes long...")

    verify = ["urza", "verify", "--store", str(store), "--publishers", str(publishers)]
    rc, out, err = run(capsys, *verify)
    assert rc == 1 and "3 of 3" in err
    assert out.count("signed with the retired HMAC scheme") == 3 and "kasmina urza resign" in out
    advice = re.search(r"'kasmina urza resign ([^']*)'", out)
    assert advice is not None  # the command it gives names every option the run below needs
    flags = [word for word in advice.group(1).split() if word.startswith("--")]
    assert flags == ["--store", "--key", "--hmac-keys", "--command-keys"]

    commands = tmp_path / "commands.json"
    assert run(capsys, "keygen", "--out", str(commands), "--key-id", "ctl")[0] == 0
    resign = ["urza", "resign", "--store", str(store), "--key", str(keys)]
    rc, _, err = run(capsys, *resign)
    assert_one_line_error(rc, err, "--hmac-keys")
    rc, _, err = run(capsys, *resign, "--hmac-keys", str(hmac_keys))  # which are the command keys?
    assert_one_line_error(rc, err, "pass --command-keys FILE")
    resign += ["--command-keys", str(commands)]
    rc, out, err = run(capsys, *resign, "--hmac-keys", str(hmac_keys))
    assert rc == 1 and "1 of 3 artifact(s) could not be re-signed" in err
    assert "ok     one (signed by 'pub')" in out and "ok     two" in out
    assert "FAILED bad: artifact 'bad': old HMAC signature does not verify" in out
    rc, out, err = run(capsys, *verify, "one", "two")
    assert rc == 0 and out.count("ok") == 2
    # Running it again leaves the re-signed artifacts as they are.
    assert run(capsys, *resign, "--hmac-keys", str(hmac_keys), "one", "two")[0] == 0
    # So does a run without the old keys (an idempotent CI step): it needs none where every
    # artifact is signed by --key already, and it failed, telling the user to publish again.
    rc, out, err = run(capsys, "urza", "resign", "--store", str(store), "--key", str(keys), "one")
    assert rc == 0 and out == "ok     one (already signed by 'pub')\n", err
    rc, out, err = run(capsys, *resign)  # "bad" still needs them, and says why
    assert_one_line_error(rc, err, "--hmac-keys")
    assert "ok     one (already signed by 'pub')" in out
    assert "FAILED bad: artifact 'bad': manifest was signed with the retired HMAC" in out, out
    rc, out, err = run(capsys, "urza", "resign", "--store", str(store), "--key", str(keys), "no")
    assert rc == 1 and "FAILED no: " in out and "no artifact" in out.lower(), out


def test_urza_resign_rotates_a_retiring_publishers_artifacts(
    tmp_path, keys, publishers, capsys
) -> None:
    from kasmina.urza.publish import publish_payload

    retiring = PublisherKey.generate("ci-2025")
    store = tmp_path / "store"
    for artifact_id in ("one", "two"):
        publish_payload(artifact_id.encode() * 40, str(store), "bp", retiring, artifact_id)
    previous = tmp_path / "previous.json"
    previous.write_text(json.dumps(retiring.trusted_publishers().to_json()))
    resign = ["urza", "resign", "--store", str(store), "--key", str(keys)]
    rc, _, err = run(capsys, *resign, "--previous-publishers", str(previous), "--hmac-keys", "x")
    assert_one_line_error(rc, err, "not both")
    rc, out, err = run(capsys, *resign, "--previous-publishers", str(previous))
    assert rc == 0 and "ok     one (signed by 'pub')" in out and "ok     two" in out, err
    verify = ["urza", "verify", "--store", str(store), "--publishers", str(publishers)]
    rc, out, _ = run(capsys, *verify)
    assert rc == 0 and out.count("ok") == 2  # the new key alone verifies them, same ids
    assert run(capsys, *verify[:-1], str(previous))[0] == 1  # the retired key no longer does


def test_resign_never_takes_the_command_keys_for_the_old_ones(
    tmp_path, keys, publishers, capsys, monkeypatch
) -> None:
    """Every trainer holds the command keys: with them as the "old" keyring anyone could forge
    a version 1 manifest for any bytes and have ``resign`` sign it as the publisher. They were
    the fallback when ``--hmac-keys`` was left out; now they are never used, even named."""
    commands = tmp_path / "commands.json"
    assert run(capsys, "keygen", "--out", str(commands), "--key-id", "ctl")[0] == 0
    store = tmp_path / "store"
    legacy_artifact(store, "forged", b"anyone's bytes", Keyring.from_file(commands).get("ctl"))
    monkeypatch.setenv("KASMINA_HMAC_KEYS", json.dumps(json.loads(commands.read_text())))
    resign = ["urza", "resign", "--store", str(store), "--key", str(keys)]
    rc, _, err = run(capsys, *resign)  # no fallback to the environment's command keys
    assert_one_line_error(rc, err, "pass --hmac-keys FILE")
    rc, _, err = run(capsys, *resign, "--hmac-keys", str(commands))
    assert_one_line_error(rc, err, "key(s) ['ctl'] also sign commands")
    # The documented set-up keeps the command keys in a file, not the variable: resign must be
    # told which keys sign commands, and refuses to run without knowing.
    monkeypatch.delenv("KASMINA_HMAC_KEYS")
    rc, _, err = run(capsys, *resign, "--hmac-keys", str(commands))
    assert_one_line_error(rc, err, "pass --command-keys FILE")
    copy = tmp_path / "copy.json"  # the same keys under another name
    copy.write_text(commands.read_text())
    copy.chmod(0o600)
    rc, _, err = run(capsys, *resign, "--hmac-keys", str(commands), "--command-keys", str(copy))
    assert_one_line_error(rc, err, "key(s) ['ctl'] also sign commands (--command-keys")
    verify = ["urza", "verify", "--store", str(store), "--publishers", str(publishers)]
    assert run(capsys, *verify)[0] == 1  # still unsigned by the publisher


def test_urza_verify_of_unknown_or_invalid_ids_fails_per_id(
    tmp_path, keys, publishers, capsys
) -> None:
    store = tmp_path / "store"
    good = publish(capsys, store, keys, "--builtin", "affine-shift", "--dim", "3")
    argv = ["urza", "verify", "--store", str(store), "--publishers", str(publishers)]
    argv += [good, "nope", "../x"]
    rc, out, err = run(capsys, *argv)
    assert rc == 1 and "2 of 3" in err and err.count("\n") == 1
    assert f"ok     {good}" in out and "FAILED nope: no artifact 'nope'" in out
    assert "FAILED ../x:" in out


def test_urza_publish_from_a_factory(tmp_path, keys, publishers, capsys, monkeypatch) -> None:
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
    verify = ["urza", "verify", "--store", str(store), "--publishers", str(publishers)]
    rc, out, _ = run(capsys, *verify)
    assert rc == 0 and artifact in out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_a_builtin_published_in_a_dtype_runs_in_it(tmp_path, keys, publishers, capsys, dtype):
    """``--dtype float16`` converted only the example input: the artifact, signed as taking
    float16, held float32 weights and every call raised ("mat1 and mat2 must have the same
    dtype"). A module that does not run on the example is refused, nothing published."""
    import torch

    from kasmina.urza.client import UrzaLibraryClient
    from kasmina.urza.kernel import GPUKernel
    from kasmina.urza.keys import TrustedPublishers

    store = tmp_path / "store"
    argv = ["--builtin", "residual-mlp", "--dim", "4", "--dtype", dtype]
    artifact = publish(capsys, store, keys, *argv)
    trusted = TrustedPublishers.from_file(publishers)
    payload, manifest = UrzaLibraryClient(str(store), trusted).fetch(artifact)
    kernel = GPUKernel.from_binary(payload, manifest, torch.device("cpu"))
    x = torch.randn(3, 4, dtype=getattr(torch, dtype))
    assert kernel(x).dtype == x.dtype

    (tmp_path / "fp32_seed_mod.py").write_text(
        "import torch\ndef make():\n    return torch.nn.Linear(4, 4)\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        rc, _, err = run(capsys, "urza", "publish", "--store", str(tmp_path / "other"), "--key",
                         str(keys), "--factory", "fp32_seed_mod:make", "--input-shape", "2,4",
                         "--dtype", dtype)  # fmt: skip
    finally:
        sys.path.remove(str(tmp_path))
    assert_one_line_error(rc, err, f"does not run on a {dtype} input of shape [2, 4]")
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())


PUB = ["--store", "{tmp}/s", "--key", "{keys}"]
AFFINE = ["--builtin", "affine-shift", "--dim", "2"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["urza", "list", "--store", "{tmp}/missing"], "no Urza store"),
        (["urza", "list", "--store", "file://{tmp}/missing"], "no Urza store"),
        (["urza", "verify", "--store", "file://{tmp}/missing", "--key", "{keys}"], "no Urza"),
        (
            ["urza", "verify", "--store", "{tmp}", "--publishers", "{tmp}/nokeys.json"],
            "nokeys.json",
        ),
        (
            ["urza", "verify", "--store", "{tmp}", "--publishers", "{tmp}/bad.json"],
            "not valid JSON",
        ),
        (["urza", "verify", "--store", "{tmp}", "--key", "{keys}"], "no artifacts to verify"),
        (["urza", "verify", "--store", "{tmp}", "--publishers", "{tmp}/short.json"], "32 bytes"),
        (
            ["urza", "publish", "--store", "{tmp}/s", "--key", "{tmp}/nokey", "--builtin", "x"],
            "nokey",
        ),
        (["urza", "list", "--store", "nosuchproto://x"], "nosuchproto"),
        (
            ["urza", "publish", "--store", "{tmp}/s", "--key", "{keys}", "--builtin", "zzz"],
            "unknown blueprint",
        ),
        (
            ["urza", "publish", "--store", "{tmp}/s", "--key", "{keys}"]
            + ["--builtin", "affine-shift"],
            "needs --dim",
        ),
        (
            ["urza", "publish", "--store", "{tmp}/s", "--key", "{keys}", "--factory", "nomod:f"],
            "cannot import",
        ),
        (
            ["urza", "publish", "--store", "{tmp}/s", "--key", "{keys}", "--factory", "os:getcwd"],
            "did not return an nn.Module",
        ),
        (
            ["urza", "publish", "--store", "{tmp}/s", "--key", "{keys}", "--key-id", "zz"]
            + ["--builtin", "affine-shift", "--dim", "2"],
            "holds publisher key 'pub', not 'zz'",
        ),
        (
            ["urza", "publish", "--store", "{tmp}/s", "--key", "{keys}", "--factory", "a:b"]
            + ["--input-shape", "4,x"],
            "cannot import",
        ),
        # Sizes torch cannot allocate or index: refused before anything is built.
        (["urza", "publish", *PUB, "--builtin", "residual-mlp", "--dim", "99999999999"], "large"),
        (["urza", "publish", *PUB, "--builtin", "residual-mlp", "--dim", str(2**63 - 1)], "large"),
        (
            ["urza", "publish", *PUB, "--builtin", "residual-mlp", "--dim", "4"]
            + ["--hidden", "99999999999999999999"],
            "too large",
        ),
        # A width the blueprint does not have is refused, not ignored.
        (
            ["urza", "publish", *PUB, "--builtin", "affine-shift", "--dim", "4"]
            + ["--hidden", "3"],
            "--hidden: affine-shift has no hidden width",
        ),
        # A --builtin's widths with a --factory, whose module has its own: ignored, published.
        (
            ["urza", "publish", *PUB, "--factory", "torch.nn:Identity", "--input-shape", "8,4"]
            + ["--dim", "4"],
            "--dim is a --builtin blueprint's width",
        ),
        (
            ["urza", "publish", *PUB, "--factory", "torch.nn:Identity", "--input-shape", "8,4"]
            + ["--hidden", "16"],
            "--hidden is a --builtin blueprint's width",
        ),
        # A size of 1 is fixed by torch.export: a kernel for batches of 1 only.
        (
            ["urza", "publish", *PUB, "--builtin", "residual-mlp", "--dim", "4"]
            + ["--input-shape", "1,4"],
            "torch.export fixes a size of 1",
        ),
        # Given empty ("$SHAPE" unset): a --builtin was published on the default 8,DIM.
        (
            ["urza", "publish", *PUB, "--builtin", "residual-mlp", "--dim", "4"]
            + ["--input-shape", ""],
            "--input-shape is empty",
        ),
        (
            ["urza", "publish", *PUB, "--factory", "torch.nn:Identity", "--input-shape", ""],
            "--input-shape is empty",
        ),
        (
            ["urza", "publish", *PUB, "--builtin", "residual-mlp", "--dim", "4"]
            + ["--hidden", "99999999999999"],
            "bytes of parameters, above",
        ),
        (  # 640 MB in float32, over the 1 GiB a client fetches in the float64 it is built in
            ["urza", "publish", *PUB, "--builtin", "residual-mlp", "--dim", "4"]
            + ["--hidden", "20000000", "--dtype", "float64"],
            "bytes of parameters, above",
        ),
        (
            ["urza", "publish", *PUB, "--factory", "torch.nn:Identity"]
            + ["--input-shape", "99999999999,99999999"],
            "example input shape 99999999999,99999999",
        ),
        # Empty stores are not the current directory; memory:// dies with the process.
        (["urza", "list", "--store", ""], "--store '' is empty"),
        (["urza", "list", "--store", "file://"], "is empty"),
        (["urza", "verify", "--store", "", "--key", "{keys}"], "--store '' is empty"),
        (["urza", "resign", "--store", "", "--key", "{keys}"], "--store '' is empty"),
        (["urza", "publish", "--store", "", "--key", "{keys}", *AFFINE], "--store '' is empty"),
        (["urza", "publish", "--store", "memory://m", "--key", "{keys}", *AFFINE], "memory://"),
        (["urza", "resign", "--store", "memory://m", "--key", "{keys}"], "memory://"),
        (["urza", "publish", "--store", "{keys}", "--key", "{keys}", *AFFINE], "not a directory"),
        # Key files: never an empty name, never over a directory or a FIFO.
        (["keygen", "--out", ""], "--out is empty"),
        (["keygen", "--publisher", "--out", "", "--force"], "--out is empty"),
        (["keygen", "--publisher", "--out", "{tmp}/fifo", "--force"], "not a regular file"),
        (["keygen", "--publisher", "--out", "{tmp}", "--force"], "not a regular file"),
        (["keygen", "--out", "{tmp}/fifo", "--append"], "not a regular file"),
        # A new directory's name with its slash, "." or "..": a file of that name was written.
        (["keygen", "--out", "{tmp}/newdir/"], "names a directory"),
        (["keygen", "--publisher", "--out", "{tmp}/newdir/"], "names a directory"),
        (["keygen", "--out", "{tmp}/newdir/."], "newdir/. names a directory"),
        (["keygen", "--publisher", "--out", "{tmp}/newdir/."], "names a directory"),
        (["keygen", "--out", "{tmp}/a/b/..", "--key-id", "x"], "names a directory"),
        (["keygen", "--publisher", "--out", "{tmp}/a/b/..", "--force"], "names a directory"),
        (["keygen", "--out", "."], "--out . names a directory"),
        # An Ed25519 key has one length: --bytes was ignored, as if the key had that length.
        (["keygen", "--publisher", "--out", "{tmp}/pub.key", "--bytes", "64"], "--bytes is for"),
        (["demo", "--device", "meta", "--out", "{tmp}/d"], "'meta' is not supported"),
    ],
)
def test_user_mistakes_are_one_line_errors(argv, fragment, tmp_path, keys, capsys, monkeypatch):
    monkeypatch.delenv("KASMINA_HMAC_KEYS", raising=False)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "bad.json").write_text("{oops")
    (tmp_path / "short.json").write_text(json.dumps({"pub": "00" * 31}))
    monkeypatch.chdir(tmp_path)  # where an empty --store used to write
    before = sorted(tmp_path.rglob("*"))
    argv = [a.format(tmp=tmp_path, keys=keys) for a in argv]
    with fifo_never_blocks(tmp_path / "fifo"):
        rc, _, err = run(capsys, *argv)
    assert_one_line_error(rc, err, fragment)
    # Nothing written, nothing replaced: no store in the current directory, no partial demo
    # output, the FIFO still a FIFO.
    assert sorted(tmp_path.rglob("*")) == before
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode)


@pytest.mark.parametrize(
    ("factory", "fragment"),
    [
        ("torch.nn:Linear", "calling torch.nn:Linear failed: TypeError"),  # needs arguments
        ("broken_seed_mod:make", "cannot import 'broken_seed_mod'"),  # raises on import
        ("torch.nn:CosineSimilarity", "CosineSimilarity does not run on a float32 input"),
        # torch prints the partial graph of a data-dependent branch to stderr itself.
        ("branchy_seed_mod:Branchy", "torch.export failed"),
        # Any error of the forward on its example is one line, not a traceback.
        ("branchy_seed_mod:Indexy", "Indexy does not run on a float32 input of shape [2, 3]"),
        # An exit() in the user's code exited 0, silently, as if the publish had succeeded.
        ("builtins:exit", "calling builtins:exit failed: SystemExit"),
        ("exiting_seed_mod:make", "cannot import 'exiting_seed_mod': SystemExit: 3"),
        ("branchy_seed_mod:Exity", "Exity does not run on a float32 input"),
    ],
)
def test_publish_errors_in_the_users_factory_are_one_line(
    factory, fragment, tmp_path, keys, capsys, monkeypatch
) -> None:
    (tmp_path / "broken_seed_mod.py").write_text("raise SystemError('broken at import')\n")
    (tmp_path / "branchy_seed_mod.py").write_text(
        "import torch\n"
        "class Branchy(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x if x.sum() > 0 else -x\n"
        "class Indexy(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return [x][1]\n"
        "class Exity(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        raise SystemExit(3)\n"
    )
    (tmp_path / "exiting_seed_mod.py").write_text("raise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["urza", "publish", "--store", str(tmp_path / "s"), "--key", str(keys)]
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
