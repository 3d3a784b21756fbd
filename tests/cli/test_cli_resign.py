"""``kasmina urza resign``: what it checks of an artifact already signed by ``--key``, and what
it asks for when the old keys are missing."""

from __future__ import annotations

import json

import pytest

from kasmina.urza.artifact import PAYLOAD_SUFFIX
from kasmina.urza.keys import PublisherKey
from tests.cli.helpers import publish, run

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
