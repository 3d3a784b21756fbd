"""KasminaConfig's Urza publisher keys: validation, the file alternative, what the manager's
client verifies with, and the removed ``urza_trusted_key_ids``."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from kasmina.errors import ArtifactIntegrityError
from kasmina.manager.config import KasminaConfig
from kasmina.urza.client import UrzaLibraryClient
from kasmina.urza.keys import PublisherKey, TrustedPublishers
from kasmina.urza.publish import publish_payload
from kasmina.utils.keyring import Keyring, generate_key

PUBLISHER = PublisherKey.generate("pub")
RAW = base64.b64decode(PUBLISHER.public_key_text)


def _pem(label: str, der: bytes) -> str:
    return f"-----BEGIN {label}-----\n{base64.b64encode(der).decode()}\n-----END {label}-----\n"


# A key of an algorithm the cryptography library does not know (OID 1.2.3.4): its
# UnsupportedAlgorithm had escaped the parsers, which promise a ValueError.
_OID = bytes([0x06, 0x03, 0x2A, 0x03, 0x04])
_ALGORITHM = bytes([0x30, len(_OID)]) + _OID
_BITS = bytes([0x03, 33, 0]) + b"\x01" * 32
_UNKNOWN_KEY_TYPE_PEM = _pem(
    "PUBLIC KEY", bytes([0x30, len(_ALGORITHM) + len(_BITS)]) + _ALGORITHM + _BITS
)


def test_a_private_key_file_of_an_unknown_algorithm_is_a_value_error(tmp_path: Path) -> None:
    octets = bytes([0x04, 34, 0x04, 32]) + b"\x01" * 32
    body = bytes([0x02, 0x01, 0x00]) + _ALGORITHM + octets
    path = tmp_path / "publisher.key"
    path.write_text(_pem("PRIVATE KEY", bytes([0x30, len(body)]) + body))
    path.chmod(0o600)
    with pytest.raises(ValueError, match="unreadable PEM private key"):
        PublisherKey.from_file(path, key_id="pub")


def test_public_keys_in_base64_or_hex_are_normalised_to_base64(tmp_path: Path) -> None:
    for text in (PUBLISHER.public_key_text, RAW.hex(), RAW.hex().upper()):
        config = KasminaConfig(runs_root=str(tmp_path), urza_trusted_publishers={"pub": text})
        assert config.urza_trusted_publishers == {"pub": PUBLISHER.public_key_text}
        assert config.load_trusted_publishers() == PUBLISHER.trusted_publishers()
    default = KasminaConfig(runs_root=str(tmp_path))
    assert default.urza_trusted_publishers == {} and len(default.load_trusted_publishers()) == 0


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("pub", "must be a mapping"),  # a bare string is never split into key ids
        (b"pub", "must be a mapping"),
        (["pub"], "must be a mapping"),
        (("pub", "other"), "must be a mapping"),
        ({"pub": base64.b64encode(RAW[:31]).decode()}, "32 bytes, got 31"),
        ({"pub": base64.b64encode(RAW + b"\0").decode()}, "32 bytes, got 33"),
        ({"pub": RAW.hex()[:-2]}, "32 bytes, got 31"),
        ({"pub": "not base64!"}, "neither 64 hex digits nor base64"),
        ({"pub": 5}, "base64 or hex text"),
        ({"": PUBLISHER.public_key_text}, "invalid publisher key id"),
        ({"a b": PUBLISHER.public_key_text}, "invalid publisher key id"),
        ({"pub": PUBLISHER.to_pem().decode()}, "private key"),
        ({"pub": _UNKNOWN_KEY_TYPE_PEM}, "unreadable PEM public key"),
    ],
)
def test_invalid_publishers_are_refused(value: object, fragment: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=fragment):
        KasminaConfig(runs_root=str(tmp_path), urza_trusted_publishers=value)


def test_the_removed_trusted_key_ids_setting_says_what_replaced_it() -> None:
    with pytest.raises(ValueError, match="urza_trusted_publishers"):
        KasminaConfig.from_dict({"urza_trusted_key_ids": ["pub"]})
    with pytest.raises(TypeError, match="unexpected keyword argument 'urza_trusted_key_ids'"):
        KasminaConfig(urza_trusted_key_ids=("pub",))  # type: ignore[call-arg]


def test_round_trip_and_publishers_file(tmp_path: Path) -> None:
    other = PublisherKey.generate("other")
    path = tmp_path / "publishers.json"
    path.write_text(json.dumps({"other": other.public_key_text}))
    config = KasminaConfig(
        runs_root=str(tmp_path),
        urza_trusted_publishers={"pub": RAW.hex()},
        urza_publishers_file=str(path),
    )
    assert KasminaConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert set(config.load_trusted_publishers().key_ids) == {"pub", "other"}
    # One key id bound to two keys: an error, never a silent choice.
    path.write_text(json.dumps({"pub": other.public_key_text}))
    with pytest.raises(ValueError, match="configured with two keys"):
        config.load_trusted_publishers()
    for bad in ("", 3):
        with pytest.raises(ValueError, match="urza_publishers_file"):
            KasminaConfig(urza_publishers_file=bad)  # type: ignore[arg-type]


def test_the_command_keyring_given_as_the_publishers_is_refused_by_name(tmp_path: Path) -> None:
    """Both files are JSON of key id -> 32 bytes in hex, so a command keyring passed as the
    publishers file parsed as public keys: the manager was built, and every artifact was then
    refused as signed by an "unknown publisher", nothing saying which file was wrong."""
    from kasmina.manager.manager import KasminaKernelManager

    commands = tmp_path / "commands.json"
    commands.write_text(json.dumps({"ctl": generate_key().hex()}))
    commands.chmod(0o600)
    config = KasminaConfig(
        urza_url=str(tmp_path / "urza"),
        runs_root=str(tmp_path / "runs"),
        hmac_keys_file=str(commands),
        urza_publishers_file=str(commands),
    )
    with pytest.raises(ValueError, match=r"publisher key\(s\) \['ctl'\] are command keys"):
        KasminaKernelManager(config)
    assert not (tmp_path / "runs").exists()  # refused before anything was made
    mixed = {"pub": RAW.hex()}  # the right publishers beside the same keyring: built
    good = KasminaConfig(urza_url=config.urza_url, runs_root=config.runs_root,
                         hmac_keys_file=str(commands), urza_trusted_publishers=mixed)  # fmt: skip
    KasminaKernelManager(good).close()


def test_a_group_writable_publishers_file_is_warned_about(tmp_path: Path, caplog) -> None:
    path = tmp_path / "publishers.json"
    path.write_text(json.dumps({"pub": PUBLISHER.public_key_text}))
    path.chmod(0o664)
    TrustedPublishers.from_file(path)
    assert "writable by group/others" in caplog.text


def test_from_config_verifies_with_the_configured_public_keys_only(tmp_path: Path) -> None:
    store = tmp_path / "store"
    publish_payload(b"payload", str(store), "bp", PUBLISHER, "a1")
    trainer = KasminaConfig(
        runs_root=str(tmp_path),
        urza_url=str(store),
        urza_retries=0,
        urza_trusted_publishers={"pub": PUBLISHER.public_key_text},
    )
    client = UrzaLibraryClient.from_config(trainer)
    assert client.fetch("a1")[0] == b"payload"
    assert client.publishers == PUBLISHER.trusted_publishers()
    # A config without the publisher: the same artifact is refused.
    stranger = KasminaConfig(runs_root=str(tmp_path), urza_url=str(store), urza_retries=0)
    with pytest.raises(ArtifactIntegrityError, match="unknown publisher key 'pub'"):
        UrzaLibraryClient.from_config(stranger).fetch("a1")
    # The command keyring is no substitute for publisher keys.
    with pytest.raises(TypeError, match="not Keyring"):
        commands = Keyring({"pub": generate_key()})
        UrzaLibraryClient.from_config(trainer, commands)  # type: ignore[arg-type]
