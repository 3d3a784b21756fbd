"""Artifact signatures (docs/design.md §5 "Key purposes", §6): Ed25519 publisher keys, trainers
holding public keys only, purpose tags, key confusion in both directions, the refusal and
re-signing of retired HMAC manifests, and publisher key files."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import pickle
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from kasmina.control.auth import COMMAND_SIGNATURE_TAG, CommandVerifier, sign_command
from kasmina.control.builders import make_seed_command
from kasmina.errors import ArtifactIntegrityError
from kasmina.leyline import AdaptationCommand
from kasmina.urza.artifact import (
    LEGACY_HMAC_MESSAGE,
    Manifest,
    TensorSpec,
    sign_manifest,
    verify_manifest,
    verify_payload,
)
from kasmina.urza.client import UrzaLibraryClient
from kasmina.urza.keys import (
    MANIFEST_SIGNATURE_TAG,
    PublisherKey,
    TrustedPublishers,
    parse_public_key,
)
from kasmina.urza.publish import publish_payload, resign_artifact
from kasmina.utils.atomic import STALE_TEMPORARY_S
from kasmina.utils.keyring import Keyring, generate_key
from kasmina.utils.signed_json import canonical_json
from tests.crash import KILLED, TornWriter, run_in_child
from tests.urza.helpers import legacy_manifest

PAYLOAD = b"a payload standing in for a .pt2 program" * 8
T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def commands() -> Keyring:
    """A controller's command keyring; "pub" deliberately shares the publisher's key id."""
    return Keyring({"ctl": generate_key(), "pub": generate_key()})


@pytest.fixture
def store(tmp_path: Path, publisher: PublisherKey) -> Path:
    root = tmp_path / "store"
    publish_payload(PAYLOAD, str(root), "bp", publisher, "a1")
    return root


def client(root: Path, publishers: object) -> UrzaLibraryClient:
    return UrzaLibraryClient(str(root), publishers, retries=0)  # type: ignore[arg-type]


def manifest_file(root: Path, artifact_id: str = "a1") -> Path:
    return root / f"{artifact_id}.manifest.json"


def with_signature(raw: bytes, signature: bytes, **fields: object) -> bytes:
    """The stored manifest ``raw`` with ``fields`` changed and ``signature`` (base64) in place."""
    data = {**json.loads(raw), **fields}
    data["signature"] = base64.b64encode(signature).decode()
    return json.dumps(data).encode()


def unsigned_bytes(raw: bytes, **fields: object) -> bytes:
    data = {**json.loads(raw), **fields}
    del data["signature"]
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("ascii")


# --- Ed25519 and the purpose tag ---------------------------------------------------------------


def test_a_manifest_is_an_ed25519_signature_over_the_tag_and_canonical_json(
    store: Path, publisher: PublisherKey, trusted: TrustedPublishers
) -> None:
    raw = manifest_file(store).read_bytes()
    data = json.loads(raw)
    assert data["manifest_version"] == 2 and data["key_id"] == "pub"
    signature = base64.b64decode(data["signature"], validate=True)
    assert len(signature) == 64
    # Checked with the bare cryptography API, independently of the code under test.
    publisher.public_key.verify(signature, b"kasmina-urza-manifest-v2\0" + unsigned_bytes(raw))
    assert client(store, trusted).fetch("a1")[0] == PAYLOAD


def test_purpose_tags_separate_every_signature(
    store: Path, publisher: PublisherKey, trusted: TrustedPublishers
) -> None:
    """The same Ed25519 key over the same manifest bytes, but without the manifest tag (or with
    another purpose's), is refused: a signature made for anything else never verifies."""
    assert MANIFEST_SIGNATURE_TAG != COMMAND_SIGNATURE_TAG
    for a, b in ((MANIFEST_SIGNATURE_TAG, COMMAND_SIGNATURE_TAG),) * 2:
        assert not a.startswith(b) and not b.startswith(a)
    raw = manifest_file(store).read_bytes()
    private = publisher._private  # the raw key: what a bug elsewhere might sign with
    for prefix in (b"", COMMAND_SIGNATURE_TAG, b"kasmina-urza-manifest-v1\0"):
        manifest_file(store).write_bytes(
            with_signature(raw, private.sign(prefix + unsigned_bytes(raw)))
        )
        with pytest.raises(ArtifactIntegrityError, match="signature does not verify"):
            client(store, trusted).fetch("a1")


@pytest.mark.parametrize("bit", [0, 7, 255, 511])
def test_one_flipped_signature_bit_is_refused(store: Path, trusted, bit: int) -> None:
    raw = manifest_file(store).read_bytes()
    signature = bytearray(base64.b64decode(json.loads(raw)["signature"]))
    signature[bit // 8] ^= 1 << (bit % 8)
    manifest_file(store).write_bytes(with_signature(raw, bytes(signature)))
    with pytest.raises(ArtifactIntegrityError, match="signature does not verify"):
        client(store, trusted).fetch("a1")


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"size": len(PAYLOAD) + 1}, "signature does not verify"),
        ({"blueprint": "evil"}, "signature does not verify"),
        ({"key_id": "stranger"}, "unknown publisher key 'stranger'"),
        ({"manifest_version": 3}, "unsupported manifest version 3"),
        # Unverified values are quoted cut short: a store's megabytes never reach a log line.
        ({"key_id": "K" * 1_000_000}, r"unknown publisher key 'KKK+\.\.\. \(1000000 characters\)"),
        ({"manifest_version": "9" * 10**5}, r"unsupported manifest version '9+\.\.\. \(100000 "),
    ],
)
def test_tampered_manifest_fields_are_refused(store: Path, trusted, fields, match) -> None:
    raw = manifest_file(store).read_bytes()
    data = {**json.loads(raw), **fields}
    manifest_file(store).write_text(json.dumps(data))
    with pytest.raises(ArtifactIntegrityError, match=match) as raised:
        client(store, trusted).fetch("a1")
    assert len(str(raised.value)) < 400


@pytest.mark.parametrize(
    "fields",
    [
        {"created": 10**400},
        {"size": 2**64},
        {"input_spec": [{"shape": [2**70], "dtype": "float32"}]},
    ],
)
def test_a_signed_manifest_with_an_out_of_range_number_is_refused_as_malformed(
    store: Path, publisher: PublisherKey, trusted, fields
) -> None:
    """A ``created`` past a float's range made ``verify_manifest`` raise ``OverflowError``: the
    store's breaker counted each fetch a store failure and opened for every artifact, and
    ``kasmina urza list``/``verify`` stopped. Signed by the trusted publisher, and refused."""
    raw = manifest_file(store).read_bytes()
    signature = publisher.sign_manifest(unsigned_bytes(raw, **fields))
    manifest_file(store).write_bytes(with_signature(raw, signature, **fields))
    urza = client(store, trusted)
    for _ in range(8):  # more than the breaker's threshold
        with pytest.raises(ArtifactIntegrityError, match="malformed manifest"):
            urza.fetch("a1")
    assert urza.stats()["breaker_state"] == "closed"
    # The publisher's own API signs no such manifest.
    values = dict(fields)
    if "input_spec" in values:
        values["input_spec"] = tuple(
            TensorSpec(tuple(s["shape"]), s["dtype"]) for s in fields["input_spec"]
        )
    manifest = dataclasses.replace(verify_manifest(raw, trusted, expected_id="a1"), **values)
    with pytest.raises(ValueError, match="manifest|input spec"):
        sign_manifest(manifest, publisher)


def test_a_tampered_payload_is_refused_after_the_manifest_verifies(store: Path, trusted) -> None:
    (store / "a1.pt2").write_bytes(PAYLOAD[:-1] + b"!")
    urza = client(store, trusted)
    assert urza.get_manifest("a1").verified  # the manifest is fine ...
    with pytest.raises(ArtifactIntegrityError, match="SHA-256"):  # ... the payload is not
        urza.fetch("a1")


def test_a_signature_in_anything_but_strict_base64_is_refused(store: Path, trusted) -> None:
    """A character outside base64 in the signature is not skipped: the manifest bytes a
    trainer accepts are the ones the publisher wrote, not any of many spellings of them."""
    raw = manifest_file(store).read_bytes()
    encoded = json.loads(raw)["signature"]
    for junk in ("!", "\n", " "):
        data = {**json.loads(raw), "signature": encoded[:10] + junk + encoded[10:]}
        manifest_file(store).write_text(json.dumps(data))
        with pytest.raises(ArtifactIntegrityError, match="signature does not verify"):
            client(store, trusted).get_manifest("a1")


def test_sizes_in_a_manifest_are_int64_counts_at_both_ends(store: Path, trusted) -> None:
    fields = verify_manifest(manifest_file(store).read_bytes(), trusted).unsigned_dict()
    fields["signature"] = ""

    def spec(size: int) -> list[dict[str, object]]:
        return [{"shape": [size, None], "dtype": "float32"}]

    for size in (0, 2**63 - 1):
        assert Manifest.from_dict({**fields, "size": size}).size == size
        shape = Manifest.from_dict({**fields, "input_spec": spec(size)}).input_spec[0].shape
        assert shape == (size, None)
    for size in (-1, 2**63):
        with pytest.raises(ValueError, match="manifest size must be an int64"):
            Manifest.from_dict({**fields, "size": size})
        with pytest.raises(ValueError, match="input spec shape must be a list of int64"):
            Manifest.from_dict({**fields, "input_spec": spec(size)})


def test_verify_payload_refuses_a_wrong_size_by_its_size_before_hashing(
    store: Path, trusted
) -> None:
    manifest = verify_manifest(manifest_file(store).read_bytes(), trusted)
    verify_payload(PAYLOAD, manifest)
    verify_payload(memoryview(bytearray(PAYLOAD)), manifest)
    n = len(PAYLOAD)
    with pytest.raises(
        ArtifactIntegrityError, match=f"payload is {n + 1} bytes, manifest says {n}"
    ):
        verify_payload(PAYLOAD + b"!", manifest)
    with pytest.raises(ArtifactIntegrityError, match="SHA-256 does not match"):
        verify_payload(PAYLOAD[:-1] + b"!", manifest)
    with pytest.raises(TypeError, match="payload must be bytes"):
        verify_payload(PAYLOAD.decode(), manifest)  # type: ignore[arg-type]


# --- trainers hold public keys only ------------------------------------------------------------


def test_a_trainer_with_public_keys_only_verifies_but_has_no_way_to_sign(
    store: Path, publisher: PublisherKey
) -> None:
    # What a trainer is configured with: text, decoded to public keys.
    trainer = TrustedPublishers({"pub": publisher.public_key_text})
    urza = client(store, trainer)
    payload, manifest = urza.fetch("a1")
    assert payload == PAYLOAD and manifest.verified
    assert all(isinstance(trainer.get(k), Ed25519PublicKey) for k in trainer.key_ids)
    assert not any(hasattr(trainer.get("pub"), name) for name in ("sign", "private_bytes"))
    signing = [n for n in dir(trainer) if "sign" in n.lower() and not n.startswith("__")]
    assert signing == ["manifest_signature_valid"]  # a check, not a signer
    assert not any("sign" in n.lower() for n in dir(urza) if not n.startswith("__"))
    # Every signing entry point refuses what a trainer holds.
    with pytest.raises(TypeError, match="PublisherKey"):
        sign_manifest(manifest, trainer)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="PublisherKey"):
        publish_payload(b"x", str(store), "bp", trainer, "a2")  # type: ignore[arg-type]
    assert not (store / "a2.pt2").exists()
    # And a trainer cannot be handed a private key by mistake.
    with pytest.raises(TypeError, match="private key"):
        TrustedPublishers({"pub": publisher})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="private key"):
        TrustedPublishers({"pub": publisher._private})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="private key"):
        TrustedPublishers({"pub": publisher.to_pem().decode()})
    with pytest.raises(TypeError, match="not PublisherKey"):
        client(store, publisher)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(publisher)
    assert pickle.loads(pickle.dumps(publisher.public_key_text)) == publisher.public_key_text


def test_merged_takes_a_mapping_as_the_constructor_does(publisher: PublisherKey) -> None:
    """``TrustedPublishers.merged({id: key})`` raised AttributeError '_keys' where the
    constructor takes that mapping: it merges it, checked as the constructor checks it, and
    refuses what is neither with the constructor's ``TypeError``."""
    other = PublisherKey.generate("other")
    mine = publisher.trusted_publishers()
    both = mine.merged({"other": other.public_key_text})
    assert sorted(both.key_ids) == ["other", "pub"]
    assert both.merged(mine).key_ids == both.key_ids  # a TrustedPublishers as before
    with pytest.raises(ValueError, match="ids 'pub' and 'again' hold the same public key"):
        mine.merged({"again": publisher.public_key_text})
    with pytest.raises(TypeError, match="must be a mapping of key id -> public key, got list"):
        mine.merged([other.public_key_text])  # type: ignore[arg-type]
    assert mine.key_ids == ("pub",)


def test_public_key_forms(publisher: PublisherKey) -> None:
    raw = base64.b64decode(publisher.public_key_text)
    pem = publisher.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    for form in (publisher.public_key_text, raw.hex(), raw, pem, publisher.public_key):
        key = parse_public_key(form)
        assert key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == raw
    urlsafe = base64.urlsafe_b64encode(raw).decode()
    assert (
        parse_public_key(urlsafe).public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        == raw
    )
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(ValueError, match="not Ed25519"):
        parse_public_key(ec_pem)
    assert "pub" in repr(publisher.trusted_publishers())


# --- key confusion ------------------------------------------------------------------------------


def test_key_confusion_a_command_key_can_never_sign_an_artifact(
    store: Path, publisher: PublisherKey, trusted: TrustedPublishers, commands: Keyring
) -> None:
    raw = manifest_file(store).read_bytes()
    # 1. No API takes an HMAC keyring for artifacts.
    manifest = client(store, trusted).get_manifest("a1")
    with pytest.raises(TypeError, match="PublisherKey"):
        sign_manifest(manifest, commands)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="PublisherKey"):
        publish_payload(b"x", str(store), "bp", commands, "a2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not Keyring"):
        client(store, commands)
    with pytest.raises(TypeError, match="verified with TrustedPublishers"):
        verify_manifest(raw, commands)  # type: ignore[arg-type]
    # 2. An HMAC made with a command key, even with the manifest tag and under the publisher's
    # key id (which the command keyring also has), is not a publisher signature.
    unsigned = unsigned_bytes(raw)
    for key_id in ("ctl", "pub"):
        mac = hmac.new(commands.get(key_id), MANIFEST_SIGNATURE_TAG + unsigned, hashlib.sha256)
        forged = with_signature(raw, mac.digest() * 2, key_id=key_id)  # 64 bytes, like Ed25519
        manifest_file(store).write_bytes(forged)
        with pytest.raises(ArtifactIntegrityError, match="does not verify|unknown publisher"):
            client(store, trusted).fetch("a1")
    # 3. A real command signature pasted into a manifest.
    cmd = sign_command(make_seed_command("germinate", "s[0]", "a1"), commands, "ctl")
    manifest_file(store).write_bytes(with_signature(raw, cmd.metadata.signature * 2))
    with pytest.raises(ArtifactIntegrityError, match="signature does not verify"):
        client(store, trusted).fetch("a1")
    # 4. The old way: an HMAC manifest (version 1) signed with the command key.
    manifest_file(store).write_bytes(legacy_manifest(PAYLOAD, "a1", "ctl", commands.get("ctl")))
    with pytest.raises(ArtifactIntegrityError, match="retired HMAC scheme"):
        client(store, trusted).fetch("a1")
    # 5. A command key misconfigured as a publisher "public key" still signs nothing: an HMAC
    # is no Ed25519 signature, whatever the bytes.
    secret = commands.get("ctl")
    try:
        confused = TrustedPublishers({"ctl": secret})
    except ValueError:
        return  # not even a valid curve point: refused at configuration
    mac = hmac.new(secret, MANIFEST_SIGNATURE_TAG + unsigned_bytes(raw, key_id="ctl"), "sha256")
    manifest_file(store).write_bytes(with_signature(raw, mac.digest() * 2, key_id="ctl"))
    with pytest.raises(ArtifactIntegrityError, match="signature does not verify"):
        client(store, confused).fetch("a1")


def test_key_confusion_a_publisher_key_can_never_sign_a_command(
    store: Path, publisher: PublisherKey, commands: Keyring
) -> None:
    verifier = CommandVerifier(commands, clock=lambda: T0)
    # 1. No command API takes a publisher key, and a keyring holds only HMAC secrets (bytes).
    cmd = make_seed_command("germinate", "s[0]", "a1")
    with pytest.raises(TypeError, match="keyring must be a Keyring"):
        sign_command(cmd, publisher, "pub")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'pub' must be bytes, got PublisherKey"):
        Keyring({"pub": publisher})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="'pub' must be bytes, got Ed25519PublicKey"):
        Keyring({"pub": publisher.public_key})  # type: ignore[dict-item]

    # 2. Ed25519 signatures by the publisher's key over a command, with or without the command
    # tag, under its own key id ("pub", which the command keyring also holds) or a command key
    # id: refused, since commands are HMACs.
    def forged(key_id: str, prefix: bytes, nonce: str) -> AdaptationCommand:
        cmd = make_seed_command("germinate", "s[0]", "a1")
        cmd.metadata.key_id, cmd.metadata.nonce = key_id, nonce
        cmd.metadata.timestamp.seconds = int(T0)
        message = prefix + cmd.SerializeToString(deterministic=True)
        cmd.metadata.signature = publisher._private.sign(message)
        return cmd

    attempts = [(k, p) for k in ("pub", "ctl") for p in (b"", COMMAND_SIGNATURE_TAG)]
    for i, (key_id, prefix) in enumerate(attempts):
        assert verifier.verify(forged(key_id, prefix, f"n{i}")) == (False, "bad_signature")
    only_ctl = CommandVerifier(Keyring({"ctl": commands.get("ctl")}), clock=lambda: T0)
    assert only_ctl.verify(forged("pub", COMMAND_SIGNATURE_TAG, "n9")) == (False, "unknown_key_id")
    # 3. A real manifest signature pasted into a command.
    manifest_signature = base64.b64decode(
        json.loads(manifest_file(store).read_bytes())["signature"]
    )
    cmd = sign_command(make_seed_command("cull", "s[0]"), commands, "pub", timestamp=T0)
    cmd.metadata.signature = manifest_signature
    assert verifier.verify(cmd) == (False, "bad_signature")
    # The control case: the same command, HMAC-signed with the command key, is accepted.
    good = sign_command(make_seed_command("cull", "s[0]"), commands, "ctl", timestamp=T0)
    assert verifier.verify(good) == (True, "ok")


# --- retired HMAC manifests: refused, and re-signed -----------------------------------------------


def test_an_hmac_manifest_is_refused_with_the_migration_message(
    tmp_path: Path, trusted: TrustedPublishers
) -> None:
    old_key = generate_key()
    root = tmp_path / "store"
    root.mkdir()
    (root / "old.pt2").write_bytes(PAYLOAD)
    manifest_file(root, "old").write_bytes(legacy_manifest(PAYLOAD, "old", "pub", old_key))
    with pytest.raises(ArtifactIntegrityError) as info:
        client(root, trusted).fetch("old")
    message = str(info.value)
    assert message.startswith("artifact 'old': manifest was signed with the retired HMAC scheme")
    assert LEGACY_HMAC_MESSAGE in message
    for hint in ("kasmina urza resign", "kasmina urza publish", "urza_trusted_publishers"):
        assert hint in message
    assert client(root, trusted).verify_store() == {"old": f"ArtifactIntegrityError: {message}"}


def test_resign_checks_the_old_signature_and_payload_first(
    tmp_path: Path, publisher: PublisherKey, trusted: TrustedPublishers
) -> None:
    old = Keyring({"legacy": generate_key()})
    root = tmp_path / "store"
    root.mkdir()
    for artifact_id in ("ok", "forged", "swapped"):
        (root / f"{artifact_id}.pt2").write_bytes(PAYLOAD)
        manifest_file(root, artifact_id).write_bytes(
            legacy_manifest(PAYLOAD, artifact_id, "legacy", old.get("legacy"))
        )
    # A manifest whose HMAC the old keyring does not verify, and a payload swapped since.
    forged = legacy_manifest(PAYLOAD, "forged", "legacy", generate_key())
    manifest_file(root, "forged").write_bytes(forged)
    (root / "swapped.pt2").write_bytes(PAYLOAD + b"!")
    before = {p.name: p.read_bytes() for p in root.iterdir()}

    new = resign_artifact(str(root), "ok", publisher, old)
    assert new.verified and new.key_id == "pub" and new.created == T0
    fetched = client(root, trusted).fetch("ok")
    assert fetched == (PAYLOAD, new)
    with pytest.raises(ArtifactIntegrityError, match="old HMAC signature does not verify"):
        resign_artifact(str(root), "forged", publisher, old)
    with pytest.raises(ArtifactIntegrityError, match="larger than 320 bytes"):
        resign_artifact(str(root), "swapped", publisher, old)
    with pytest.raises(ArtifactIntegrityError, match="not in the legacy keyring"):
        resign_artifact(str(root), "swapped", publisher, Keyring({"x": generate_key()}))
    for name in ("forged.manifest.json", "swapped.manifest.json", "swapped.pt2"):
        assert (root / name).read_bytes() == before[name]  # refused: left as it was
    # Idempotent for this publisher; another publisher's manifest is not re-signed.
    assert resign_artifact(str(root), "ok", publisher, old) == new
    with pytest.raises(ArtifactIntegrityError, match="unknown publisher key 'pub'"):
        resign_artifact(str(root), "ok", PublisherKey.generate("other"), old)
    with pytest.raises(FileNotFoundError):
        resign_artifact(str(root), "absent", publisher, old)
    with pytest.raises(TypeError, match="old_keys must be the Keyring"):
        resign_artifact(str(root), "ok", publisher, publisher)  # type: ignore[arg-type]


def test_a_retiring_publishers_artifacts_are_re_signed_under_their_ids(
    tmp_path: Path, publisher: PublisherKey
) -> None:
    """A publisher key rotation: each manifest the retiring key signed is checked with its
    public key, its payload against the manifest, then signed by the new key under the same
    id (checkpoints and commands name artifacts by id). Anything else is left as it was."""
    retiring, stranger = PublisherKey.generate("ci-2025"), PublisherKey.generate("stranger")
    root = tmp_path / "store"
    for artifact_id, key in (("ok", retiring), ("swapped", retiring), ("theirs", stranger)):
        publish_payload(PAYLOAD, str(root), "bp", key, artifact_id)
    (root / "swapped.pt2").write_bytes(PAYLOAD[::-1])  # the same size, other bytes
    old = retiring.trusted_publishers()
    before = {p.name: p.read_bytes() for p in root.iterdir()}

    new = resign_artifact(str(root), "ok", publisher, old)
    assert new.verified and (new.artifact_id, new.key_id) == ("ok", "pub")
    assert client(root, publisher.trusted_publishers()).fetch("ok") == (PAYLOAD, new)
    with pytest.raises(ArtifactIntegrityError, match="unknown publisher key 'pub'"):
        client(root, old).fetch("ok")  # a trainer that still trusts only the old key
    with pytest.raises(ArtifactIntegrityError, match="SHA-256"):
        resign_artifact(str(root), "swapped", publisher, old)
    with pytest.raises(ArtifactIntegrityError, match="unknown publisher key 'stranger'"):
        resign_artifact(str(root), "theirs", publisher, old)
    for name in ("swapped.manifest.json", "swapped.pt2", "theirs.manifest.json"):
        assert (root / name).read_bytes() == before[name]
    assert resign_artifact(str(root), "ok", publisher, old) == new  # already the new key's
    (root / "ok.pt2").write_bytes(PAYLOAD[::-1])  # damaged since: its payload is checked too
    with pytest.raises(ArtifactIntegrityError, match="SHA-256"):
        resign_artifact(str(root), "ok", publisher, old)


def test_publishing_over_an_id_this_key_cannot_verify_is_refused(
    store: Path, publisher: PublisherKey
) -> None:
    assert publish_payload(PAYLOAD, str(store), "bp", publisher, "a1").artifact_id == "a1"
    with pytest.raises(FileExistsError, match="does not verify it"):
        publish_payload(PAYLOAD, str(store), "bp", PublisherKey.generate("other"), "a1")


def test_a_directory_where_the_payload_goes_fails_the_publish_and_frees_the_id(
    tmp_path: Path, publisher: PublisherKey
) -> None:
    """fsspec's local ``mv`` is ``shutil.move``: the payload went *into* a directory at its
    name, the publish reported success, and the artifact could never be fetched; the manifest
    the publish had written held the id with no payload behind it."""
    store = tmp_path / "store"
    (store / "a1.pt2").mkdir(parents=True)
    with pytest.raises(IsADirectoryError) as info:
        publish_payload(PAYLOAD, str(store), "bp", publisher, "a1")
    assert info.value.filename == str(store / "a1.pt2")
    assert os.listdir(store / "a1.pt2") == [] and sorted(os.listdir(store)) == ["a1.pt2"]
    (store / "a1.pt2").rmdir()
    assert publish_payload(PAYLOAD, str(store), "bp", publisher, "a1").artifact_id == "a1"
    assert (store / "a1.pt2").read_bytes() == PAYLOAD


def test_a_link_where_the_payload_goes_is_replaced_never_written_through(
    tmp_path: Path, publisher: PublisherKey
) -> None:
    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir()
    elsewhere.mkdir()
    (store / "a1.pt2").symlink_to(elsewhere)
    publish_payload(PAYLOAD, str(store), "bp", publisher, "a1")
    assert not (store / "a1.pt2").is_symlink() and (store / "a1.pt2").read_bytes() == PAYLOAD
    assert os.listdir(elsewhere) == []


# --- publisher key files ------------------------------------------------------------------------


def test_key_file_round_trip_is_0600_and_never_overwritten_by_accident(tmp_path: Path) -> None:
    key = PublisherKey.generate("ci-publisher")
    path = tmp_path / "keys" / "publisher.key"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("kasmina-publisher-key-id: ci-publisher\n-----BEGIN")
    loaded = PublisherKey.from_file(path)
    assert loaded.key_id == "ci-publisher" and loaded.public_key_text == key.public_key_text
    with pytest.raises(FileExistsError):
        PublisherKey.generate("x").save(path)
    assert PublisherKey.from_file(path).public_key_text == key.public_key_text
    replacement = PublisherKey.generate("ci-publisher")
    replacement.save(path, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert PublisherKey.from_file(path).public_key_text == replacement.public_key_text
    assert [p.name for p in path.parent.iterdir()] == ["publisher.key"]
    text = repr(key)
    assert "ci-publisher" in text and "PRIVATE" not in text and "MC4C" not in text


def test_a_save_killed_mid_write_leaves_no_torn_key_and_the_retry_succeeds(tmp_path: Path) -> None:
    """The key used to be created under its final name, then written: a kill in between left a
    torn private key there, and the retry was refused ("exists"). Now it appears only whole;
    the killed write's temp file is removed by a later save once stale."""
    path = tmp_path / "publisher.key"
    key = PublisherKey.generate("pub")

    def save_killed_mid_write() -> None:
        real_fdopen = os.fdopen  # killed after part of the key reached the file
        os.fdopen = lambda fd, *args, **kw: TornWriter(real_fdopen(fd, *args, **kw), keep=40)
        key.save(path)

    assert run_in_child(save_killed_mid_write) == KILLED
    assert not path.exists()
    [temp] = tmp_path.iterdir()
    key.save(path)  # the retry
    assert PublisherKey.from_file(path).public_key_text == key.public_key_text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and temp.exists()  # fresh: kept
    stale = time.time() - 2 * STALE_TEMPORARY_S
    os.utime(temp, (stale, stale))
    with pytest.raises(FileExistsError):  # never replaced without overwrite
        PublisherKey.generate("other").save(path)
    assert list(tmp_path.iterdir()) == [path]
    assert PublisherKey.from_file(path).public_key_text == key.public_key_text


def test_save_replaces_only_a_regular_file_and_names_the_path_given(tmp_path: Path) -> None:
    """``overwrite`` renames a new file over the old one: never over a FIFO or a directory
    (they would be replaced, not written to), and errors name the key file, not the
    temporary one beside it."""
    fifo, folder = tmp_path / "fifo", tmp_path / "dir"
    os.mkfifo(fifo)
    folder.mkdir()
    for path in (fifo, folder):
        with pytest.raises(ValueError, match="exists and is not a regular file"):
            PublisherKey.generate("pub").save(path, overwrite=True)
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and not any(folder.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "fifo"]
    if Path("/proc/self").is_dir():  # Linux: nothing can be created in /proc
        with pytest.raises(OSError) as info:
            PublisherKey.generate("pub").save("/proc/x.key", overwrite=True)
        assert info.value.filename == "/proc/x.key"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o700])
def test_a_key_file_others_can_access_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "publisher.key"
    PublisherKey.generate("pub").save(path)
    path.chmod(mode)
    if mode & 0o077:
        with pytest.raises(PermissionError, match="chmod 600"):
            PublisherKey.from_file(path)
    else:
        assert PublisherKey.from_file(path).key_id == "pub"


def test_plain_pem_raw_and_wrong_key_files(tmp_path: Path) -> None:
    key = PublisherKey.generate("pub")
    private = key._private

    def write(name: str, data: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    plain = write(
        "plain.pem",
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    raw = write(
        "raw.key",
        private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        ),
    )
    for path in (plain, raw):
        with pytest.raises(ValueError, match="key id"):
            PublisherKey.from_file(path)
        loaded = PublisherKey.from_file(path, key_id="given")
        assert (loaded.key_id, loaded.public_key_text) == ("given", key.public_key_text)
    ours = tmp_path / "ours.key"
    key.save(ours)
    assert PublisherKey.from_file(ours, key_id="pub").key_id == "pub"
    with pytest.raises(ValueError, match="holds publisher key 'pub', not 'other'"):
        PublisherKey.from_file(ours, key_id="other")
    encrypted = write(
        "encrypted.pem",
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
    )
    with pytest.raises(ValueError, match="unencrypted"):
        PublisherKey.from_file(encrypted, key_id="pub")
    ec_key = write(
        "ec.pem",
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    with pytest.raises(ValueError, match="not Ed25519"):
        PublisherKey.from_file(ec_key, key_id="pub")
    for name, data in (("junk.key", b"hello"), ("commands.json", b'{"ctl": "00"}')):
        with pytest.raises(ValueError, match="not a PEM private key"):
            PublisherKey.from_file(write(name, data), key_id="pub")
    with pytest.raises(ValueError, match="invalid publisher key id"):
        PublisherKey.generate("bad id")
    assert PublisherKey.generate().key_id.startswith("publisher-")


def test_canonical_json_is_what_the_signature_covers(publisher: PublisherKey) -> None:
    manifest = Manifest("a1", "bp", "0" * 64, 3, (), "pub", 1.0, "2")
    signed = sign_manifest(manifest, publisher)
    canonical = canonical_json(signed.unsigned_dict())
    assert b" " not in canonical and canonical.startswith(b'{"artifact_id":"a1"')
    assert publisher.trusted_publishers().manifest_signature_valid(
        "pub", canonical, base64.b64decode(signed.signature)
    )


def test_one_key_id_given_twice_is_refused_not_last_one_wins(
    tmp_path: Path, publisher: PublisherKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line appended to a trusted-publishers file or a keyring must not silently replace a
    trusted key: a key id given twice is an error everywhere keys are read."""
    other = PublisherKey.generate("pub")
    pubs = tmp_path / "pubs.json"
    pubs.write_text(f'{{"pub": "{publisher.public_key_text}", "pub": "{other.public_key_text}"}}')
    with pytest.raises(ValueError, match="duplicate"):
        TrustedPublishers.from_file(pubs)
    a, b = generate_key().hex(), generate_key().hex()
    keys = tmp_path / "keys.json"
    keys.write_text(f'{{"t": "{a}", "t": "{b}"}}')
    keys.chmod(0o600)
    with pytest.raises(ValueError, match="duplicate"):
        Keyring.from_file(keys)
    monkeypatch.setenv("KASMINA_HMAC_KEYS", f"t:{a},t:{b}")
    with pytest.raises(ValueError, match="given twice"):
        Keyring.from_env()


def test_a_failed_key_write_leaves_no_file(
    tmp_path: Path, publisher: PublisherKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "publisher.key"
    real = os.fdopen

    class Full:
        def __init__(self, fd, mode):
            self.f = real(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:10])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr("kasmina.urza.keys.os.fdopen", Full)
    with pytest.raises(OSError, match="No space"):
        publisher.save(path)
    assert not path.exists()
    monkeypatch.undo()
    publisher.save(path)  # a retry finds no half-written key in its way
    assert PublisherKey.from_file(path, "pub").public_key_text == publisher.public_key_text


def test_store_url_credentials_reach_no_publisher_log_error_or_client_attribute(caplog) -> None:
    """The trainer's side redacted a store URL's credentials everywhere; the publisher's did
    not: ``publish_payload`` logged the URL as given, ``resign_artifact``'s errors held it,
    and ``UrzaLibraryClient.url`` kept it."""
    url = "memory://alice:S3CRET-TOKEN@store/urza-redact?sig=SIGNED-URL-TOKEN"
    publisher = PublisherKey.generate("pub")
    with caplog.at_level(logging.INFO, logger="kasmina"):
        publish_payload(b"not-a-real-pt2", url, "blueprint", publisher, "art1")
    assert "published artifact art1" in caplog.text
    with pytest.raises(FileNotFoundError) as missing:
        resign_artifact(url, "missing1", publisher, publisher.trusted_publishers())
    client = UrzaLibraryClient(url, publisher.trusted_publishers())
    for text in (caplog.text, str(missing.value), client.url):
        assert "S3CRET" not in text and "SIGNED-URL-TOKEN" not in text, text
    client.close()


@pytest.mark.parametrize("created", [1_700_000_000, 1_700_000_000.25, 1e20])
def test_a_verified_manifest_writes_back_the_json_its_signature_covers(
    publisher: PublisherKey, trusted, created
) -> None:
    """A whole-second ``created`` (an integer clock, another publisher's tools) was made a float
    on parsing: the manifest written back (``to_json``, what ``kasmina.save`` keeps) read
    ``1700000000.0``, other canonical JSON, and a saved model's own manifest no longer
    verified, so the model saved but never loaded."""
    unsigned = Manifest(
        artifact_id="a1", blueprint="mlp", sha256="0" * 64, size=1,
        input_spec=(TensorSpec((None, 2), "float32"),), key_id="", created=created,
        torch_version="2", signature="",
    )  # fmt: skip
    verified = verify_manifest(sign_manifest(unsigned, publisher).to_json(), trusted)
    again = verify_manifest(verified.to_json(), trusted)
    assert again == verified and type(again.created) is type(created)
