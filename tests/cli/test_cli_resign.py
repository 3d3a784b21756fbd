"""``kasmina urza resign``: what it checks of an artifact already signed by ``--key``, and what
it asks for when the old keys are missing."""

from __future__ import annotations

import json

import pytest

from kasmina.urza.artifact import PAYLOAD_SUFFIX
from kasmina.urza.keys import PublisherKey
from tests.cli.helpers import assert_one_line_error, legacy_artifact, publish, run

AFFINE = ["--builtin", "affine-shift", "--dim", "4"]


def corrupt_payload(store, artifact_id: str) -> None:
    path = store / f"{artifact_id}{PAYLOAD_SUFFIX}"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("old_keys", ["--previous-publishers", "--hmac-keys"])
def test_a_corrupt_payload_already_signed_by_the_key_fails_with_old_keys_given(
    old_keys, tmp_path, keys, capsys
) -> None:
    """With old keys given, a manifest ``--key`` already verifies was reported "ok" (exit 0)
    without its payload being read, where the same run without them reported it FAILED."""
    store = tmp_path / "store"
    artifact = publish(capsys, store, keys, *AFFINE)
    corrupt_payload(store, artifact)
    previous = tmp_path / "previous.json"
    previous.write_text(json.dumps(PublisherKey.generate("old").trusted_publishers().to_json()))
    hmac_keys, commands = tmp_path / "old.json", tmp_path / "commands.json"
    assert run(capsys, "keygen", "--out", str(hmac_keys), "--key-id", "old")[0] == 0
    assert run(capsys, "keygen", "--out", str(commands), "--key-id", "ctl")[0] == 0
    given = {
        "--previous-publishers": ["--previous-publishers", str(previous)],
        "--hmac-keys": ["--hmac-keys", str(hmac_keys), "--command-keys", str(commands)],
    }[old_keys]
    resign = ["urza", "resign", "--store", str(store), "--key", str(keys)]
    for argv in (resign + given, resign):  # the same verdict, with the old keys or without
        rc, out, err = run(capsys, *argv)
        assert rc == 1, (argv, out, err)
        why = f"artifact {artifact!r}: payload SHA-256 does not match its manifest"
        assert out == f"FAILED {artifact}: {why}\n"


def test_a_run_without_old_keys_asks_for_the_ones_that_would_help(tmp_path, keys, capsys) -> None:
    """Without old keys, every failure was answered with the HMAC migration's advice: a key
    rotation's version 2 manifests were told to pass --hmac-keys (no help) and to publish
    again (refused under the same id), and a damaged payload was told the same."""
    from kasmina.urza.publish import publish_payload
    from kasmina.utils.keyring import generate_key

    store = tmp_path / "store"
    retiring = PublisherKey.generate("ci-2025")
    publish_payload(b"rotated payload" * 20, str(store), "bp", retiring, "rotated")
    resign = ["urza", "resign", "--store", str(store), "--key", str(keys)]
    rc, out, err = run(capsys, *resign)
    assert "FAILED rotated: artifact 'rotated': unknown publisher key 'ci-2025'" in out
    assert_one_line_error(rc, err, "1 artifact(s) are signed by another publisher key")
    assert "pass --previous-publishers FILE" in err and "--hmac-keys" not in err

    legacy_artifact(store, "legacy", b"old payload", generate_key())  # both kinds: both named
    rc, _, err = run(capsys, *resign)
    assert_one_line_error(rc, err, "pass --hmac-keys FILE", "--previous-publishers FILE")

    damaged = tmp_path / "damaged"  # signed by --key: no old key would help
    artifact = publish(capsys, damaged, keys, *AFFINE)
    corrupt_payload(damaged, artifact)
    rc, out, err = run(capsys, "urza", "resign", "--store", str(damaged), "--key", str(keys))
    assert out.startswith(f"FAILED {artifact}: ") and "payload SHA-256 does not match" in out
    assert_one_line_error(rc, err, "1 of 1 artifact(s) could not be re-signed")
    assert "--hmac-keys" not in err and "--previous-publishers" not in err
