"""Keyring loading, HMAC signing, the verifier's checks and its bounded nonce ledger.

See docs/design.md §5.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import math
import pickle
import random

import pytest

from kasmina.control.auth import (
    COMMAND_SIGNATURE_TAG,
    CommandVerifier,
    _CommandMac,
    compute_signature,
    sign_command,
)
from kasmina.control.builders import (
    make_optimizer_command,
    make_rollback_command,
    make_seed_command,
)
from kasmina.control.commands import MAX_ID_CHARS
from kasmina.leyline import AdaptationCommand
from kasmina.utils.keyring import Keyring, generate_key

KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def keyring() -> Keyring:
    return Keyring({"k1": KEY, "k2": OTHER_KEY})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def verifier(keyring: Keyring, clock: FakeClock) -> CommandVerifier:
    return CommandVerifier(keyring, freshness_s=60.0, clock=clock)


def signed(keyring: Keyring, key_id: str = "k1", timestamp: float = T0, nonce: str | None = None):
    cmd = make_seed_command("germinate", "layer0:1", "artifact-1", {"learning_rate": 0.5})
    return sign_command(cmd, keyring, key_id, nonce=nonce, timestamp=timestamp)


def independent_hmac(cmd: AdaptationCommand, key: bytes) -> bytes:
    """HMAC-SHA256 over the command purpose tag and the serialised command (signature cleared),
    written out here rather than imported, so a changed tag or message shows."""
    clone = AdaptationCommand()
    clone.CopyFrom(cmd)
    clone.metadata.ClearField("signature")
    message = b"kasmina-leyline-command-v1\0" + clone.SerializeToString(deterministic=True)
    return hmac.new(key, message, hashlib.sha256).digest()


# --- keyring -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key_len", [16, 32, 64, 65, 100])
def test_keyring_digest_is_standard_hmac_sha256(key_len: int) -> None:
    key = bytes(random.Random(key_len).randrange(256) for _ in range(key_len))
    ring = Keyring({"k": key})
    for message in (b"", b"x", bytes(range(256)) * 3):
        assert ring.digest("k", message) == hmac.new(key, message, hashlib.sha256).digest()
    assert ring.digest("missing", b"x") is None


@pytest.mark.parametrize("key_len", [16, 32, 63, 64, 65, 100, 200])
def test_the_verifiers_prepared_hmac_is_standard_hmac_sha256(key_len: int) -> None:
    """The verifier absorbs the key schedule and the purpose tag once per key: still RFC 2104
    HMAC-SHA256 of tag + message, for keys shorter than, equal to and longer than a block."""
    key = bytes(random.Random(key_len).randrange(256) for _ in range(key_len))
    mac = _CommandMac.prepare(key, COMMAND_SIGNATURE_TAG)
    for message in (b"", b"x", bytes(range(256)) * 3):
        expected = hmac.new(key, COMMAND_SIGNATURE_TAG + message, hashlib.sha256).digest()
        assert mac.digest(message) == expected
        assert mac.digest(message) == expected  # the prepared state is copied, never consumed


def test_keyring_rejects_bad_keys() -> None:
    with pytest.raises(ValueError, match="'k' is shorter than 16 bytes"):
        Keyring({"k": b"short"})
    with pytest.raises(ValueError, match="key ids must be non-empty strings"):
        Keyring({"": KEY})
    with pytest.raises(TypeError, match="'k' must be bytes, got str"):
        Keyring({"k": KEY.hex()})  # type: ignore[dict-item]


def test_keyring_repr_hides_key_material(keyring: Keyring) -> None:
    text = repr(keyring)
    assert "k1" in text and KEY.hex() not in text and str(KEY) not in text


def test_a_keyring_refuses_to_be_pickled_naming_the_way_out(keyring: Keyring) -> None:
    """Its HMAC objects refused with ``cannot pickle '_hashlib.HMAC' object``."""
    for dump in (pickle.dumps, copy.deepcopy):
        with pytest.raises(TypeError, match=r"Keyring cannot be pickled .*from_env"):
            dump(keyring)


def test_keyring_from_env_pairs_and_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KASMINA_HMAC_KEYS", f"k1:{KEY.hex()}, k2:{OTHER_KEY.hex()}")
    ring = Keyring.from_env()
    assert ring.get("k1") == KEY and ring.get("k2") == OTHER_KEY
    monkeypatch.setenv("MY_KEYS", json.dumps({"a": KEY.hex()}))
    assert Keyring.from_env("MY_KEYS").key_ids == ("a",)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "not set or empty"),
        ("k1", "expected 'key_id:hexkey' items"),
        (f"k1:{KEY.hex()[:-1]}", "key 'k1' is not valid hex"),
        ("k1:zz" * 20, "key 'k1' is not valid hex"),
        ("{not json", "not valid JSON"),
    ],
)
def test_keyring_from_env_rejects_garbage(
    monkeypatch: pytest.MonkeyPatch, value: str, reason: str
) -> None:
    monkeypatch.setenv("KASMINA_HMAC_KEYS", value)
    with pytest.raises(ValueError, match=reason):
        Keyring.from_env()


def test_a_keyring_with_ids_and_keys_swapped_never_prints_a_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """A key given in the id's place (``{"<hex key>": "ctl"}``, ``<hex key>:ctl``) is refused
    naming the entry by its position: the error (printed by the CLI, logged by a trainer)
    must not carry the secret. A plain id is still named."""
    secret = KEY.hex()
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"k1": OTHER_KEY.hex(), secret: "ctl"}))
    path.chmod(0o600)
    attempts = [lambda: Keyring.from_file(path), lambda: Keyring({secret: b"short"})]
    monkeypatch.setenv("KASMINA_HMAC_KEYS", f"{secret}:ctl")
    attempts.append(Keyring.from_env)
    for attempt in attempts:
        with pytest.raises(ValueError) as raised:
            attempt()
        assert secret not in str(raised.value) and "key #" in str(raised.value)
    path.write_text(json.dumps({"ctl": "zz"}))
    with pytest.raises(ValueError, match="key 'ctl' is not valid hex"):
        Keyring.from_file(path)


def test_keyring_from_env_missing_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KASMINA_HMAC_KEYS", raising=False)
    with pytest.raises(ValueError, match="KASMINA_HMAC_KEYS"):
        Keyring.from_env()


def test_keyring_from_file(tmp_path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"k1": KEY.hex(), "k2": OTHER_KEY.hex()}))
    path.chmod(0o600)
    ring = Keyring.from_file(path)
    assert ring.get("k2") == OTHER_KEY and len(ring) == 2
    path.write_text(json.dumps([KEY.hex()]))
    with pytest.raises(ValueError, match="expected a JSON object of key_id -> hex key"):
        Keyring.from_file(path)
    path.write_text(json.dumps({"k1": 5}))
    with pytest.raises(ValueError, match="key 'k1' must be a hex string"):
        Keyring.from_file(path)


def test_generate_key() -> None:
    a, b = generate_key(), generate_key()
    assert len(a) == 32 and a != b
    with pytest.raises(ValueError, match="num_bytes must be at least 16"):
        generate_key(8)


# --- signing -----------------------------------------------------------------------------------


def test_sign_command_fills_metadata_with_standard_hmac(keyring: Keyring) -> None:
    cmd = signed(keyring, nonce="n-1", timestamp=T0 + 0.5)
    md = cmd.metadata
    assert (md.key_id, md.nonce) == ("k1", "n-1")
    assert (md.timestamp.seconds, md.timestamp.nanos) == (int(T0), 500_000_000)
    assert md.signature == independent_hmac(cmd, KEY)


def test_sign_command_defaults_give_fresh_nonces(keyring: Keyring) -> None:
    a = sign_command(make_rollback_command(1), keyring, "k1")
    b = sign_command(make_rollback_command(1), keyring, "k1")
    assert a.metadata.nonce and a.metadata.nonce != b.metadata.nonce


def test_sign_command_unknown_key(keyring: Keyring) -> None:
    with pytest.raises(KeyError):
        sign_command(make_rollback_command(1), keyring, "nope")


def test_compute_signature_leaves_the_message_unchanged(keyring: Keyring) -> None:
    cmd = signed(keyring)
    before = cmd.SerializeToString(deterministic=True)
    assert compute_signature(cmd, keyring, "k1") == cmd.metadata.signature
    assert cmd.SerializeToString(deterministic=True) == before


# --- verification ------------------------------------------------------------------------------


def test_valid_command_accepted_exactly_once(keyring, verifier) -> None:
    cmd = signed(keyring)
    assert verifier.verify(cmd) == (True, "ok")
    assert verifier.verify(cmd) == (False, "replay")
    assert verifier.ledger_size == 1


def test_a_retry_under_the_same_command_id_is_refused_inside_the_window(
    keyring, verifier, clock
) -> None:
    """A controller that saw no outcome signs its command again (a new nonce, no replay) and
    keeps the id: the retry must not act a second time (a second ADVANCE moves its seed on)."""
    cmd = make_seed_command("advance", "layer0:1", command_id="adv-1")
    assert verifier.verify(sign_command(cmd, keyring, "k1", timestamp=T0)) == (True, "ok")
    checked = sign_command(cmd, keyring, "k1", timestamp=T0 + 1)
    assert verifier.verify(checked, record_nonce=False) == (False, "duplicate_command")
    assert verifier.verify(checked) == (False, "duplicate_command")
    other = make_seed_command("advance", "layer0:1", command_id="adv-2")
    assert verifier.verify(sign_command(other, keyring, "k1", timestamp=T0 + 1)) == (True, "ok")
    # Kept as long as its nonce: once the first command's timestamp left the window, the id
    # is free again (the first is stale by then, the retry judged on its own).
    clock.now = T0 + 62
    assert verifier.verify(sign_command(cmd, keyring, "k1", timestamp=T0 + 62)) == (True, "ok")
    assert sorted(verifier._ids) == ["adv-1"]  # "adv-2"'s timestamp left the window too


def test_an_id_validation_refuses_is_not_kept(keyring, verifier) -> None:
    """An id longer than commands allow is refused by validation after the signature; kept,
    a signer's 64 KiB ids would hold gigabytes over a window of nonces. Nothing can retry it."""
    long_id = "x" * (MAX_ID_CHARS + 1)
    for i in range(3):
        cmd = make_seed_command("advance", "layer0:1")  # the builder refuses such an id
        cmd.command_id = f"{long_id}{i}"
        assert verifier.verify(sign_command(cmd, keyring, "k1", timestamp=T0)) == (True, "ok")
    assert verifier.ledger_size == 3 and not verifier._ids  # the nonces spent, no id held
    cmd = make_seed_command("advance", "layer0:1", command_id="x" * MAX_ID_CHARS)
    assert verifier.verify(sign_command(cmd, keyring, "k1", timestamp=T0)) == (True, "ok")
    assert list(verifier._ids) == ["x" * MAX_ID_CHARS]  # the longest valid id is kept


def test_a_checked_command_does_not_use_up_its_id(keyring, verifier) -> None:
    cmd = make_seed_command("cull", "layer0:1", command_id="cull-1")
    assert verifier.verify(sign_command(cmd, keyring, "k1", timestamp=T0), record_nonce=False)[0]
    assert verifier.verify(sign_command(cmd, keyring, "k1", timestamp=T0)) == (True, "ok")


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (-60.0, (True, "ok")),
        (60.0, (True, "ok")),
        (-60.5, (False, "stale")),
        (61.0, (False, "future")),
    ],
)
def test_freshness_window(keyring, verifier, offset: float, expected) -> None:
    assert verifier.verify(signed(keyring, timestamp=T0 + offset)) == expected


def test_wrong_key_unknown_key_id_and_missing_fields(keyring, verifier) -> None:
    forged = signed(Keyring({"k1": OTHER_KEY}))  # right key id, wrong key
    assert verifier.verify(forged) == (False, "bad_signature")

    unknown = signed(Keyring({"k9": KEY}), key_id="k9")
    assert verifier.verify(unknown) == (False, "unknown_key_id")

    no_meta = make_seed_command("germinate", "s", "a")
    assert verifier.verify(no_meta) == (False, "missing_metadata")

    no_sig = signed(keyring)
    no_sig.metadata.signature = b""
    assert verifier.verify(no_sig) == (False, "missing_signature")

    for nonce, reason in (
        ("", "missing_nonce"),
        ("n" * 1000, "bad_nonce"),
        ("n" * 257, "bad_nonce"),
    ):
        with pytest.raises(ValueError, match="nonce must be 1 to 256 characters"):
            signed(keyring, nonce=nonce)  # sign_command refuses what the trainer would
        sent = signed(keyring)
        sent.metadata.nonce = nonce  # as a forger or a foreign signer sends it
        assert verifier.verify(sent) == (False, reason)
    assert verifier.verify(signed(keyring, nonce="n" * 256)) == (True, "ok")  # the longest

    tampered = signed(keyring)
    tampered.seed_command.seed_id = "layer0:2"
    assert verifier.verify(tampered) == (False, "bad_signature")
    assert verifier.ledger_size == 1  # the 256-character nonce alone


def test_verify_leaves_the_message_unchanged_whatever_the_answer(keyring, verifier) -> None:
    good, forged = signed(keyring), signed(Keyring({"k1": OTHER_KEY}))
    for cmd, answer in ((good, (True, "ok")), (forged, (False, "bad_signature"))):
        before = cmd.SerializeToString(deterministic=True)
        assert verifier.verify(cmd) == answer
        assert cmd.SerializeToString(deterministic=True) == before


def test_check_answers_the_reason_or_nothing(keyring, verifier) -> None:
    cmd = signed(keyring)
    assert verifier.check(cmd, record_nonce=False) == ""
    assert verifier.check(cmd) == ""
    assert verifier.check(cmd) == "replay"
    assert verifier.check(signed(keyring), T0 + 120) == "future"  # relayed: received_at
    # A peer's clock exactly the window ahead is still inside it; only more is "future".
    assert verifier.check(signed(keyring, timestamp=T0 + 60), T0 + 60) == ""
    assert verifier.check(signed(keyring), float("nan")) == "stale"
    forged = signed(Keyring({"k1": OTHER_KEY}))
    assert verifier.check(forged, owned=True) == "bad_signature"
    assert forged.metadata.signature == b""  # owned: the caller's copy is left cleared


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2)."""
    head, length = bytearray([number << 3 | 2]), len(payload)
    while length >= 0x80:
        head.append(length & 0x7F | 0x80)
        length >>= 7
    head.append(length)
    return bytes(head) + payload


def _reencoded(cmd: AdaptationCommand) -> bytes:
    """The same message, encoded with its top-level fields in reverse order and its optimizer
    parameters' map entries in reverse key order: legal protobuf, not the canonical bytes."""
    parts = []
    for field, value in cmd.ListFields():
        if field.name == "optimizer_command":
            opt = type(value)()
            opt.CopyFrom(value)
            opt.ClearField("parameters")
            entries = [
                type(value)(parameters={key: value.parameters[key]}).SerializeToString()
                for key in sorted(value.parameters, reverse=True)
            ]
            parts.append(_field(field.number, opt.SerializeToString() + b"".join(entries)))
            continue
        part = AdaptationCommand()
        if field.message_type is not None:
            getattr(part, field.name).CopyFrom(value)
        else:
            setattr(part, field.name, value)
        parts.append(part.SerializeToString())
    return b"".join(reversed(parts))


def test_the_signature_covers_the_parsed_message_not_the_received_bytes(keyring, verifier) -> None:
    """The HMAC is over the canonical re-serialisation of what was parsed, so what passes is
    exactly what is then validated and obeyed, however the sender encoded it."""
    cmd = sign_command(
        make_optimizer_command(
            "create_seed", "opt", parameters={"momentum": 0.9, "weight_decay": 0.1, "eps": 1e-8}
        ),
        keyring,
        "k1",
        timestamp=T0,
    )
    canonical = cmd.SerializeToString(deterministic=True)
    other = _reencoded(cmd)
    assert other != canonical and AdaptationCommand.FromString(other) == cmd
    assert verifier.verify(AdaptationCommand.FromString(other)) == (True, "ok")  # same message

    # A field appended after the signed bytes overrides the signed value (the last one wins):
    # the parsed message is no longer the signed one, so it is refused.
    again = sign_command(make_rollback_command(3, command_id="rb"), keyring, "k1", timestamp=T0)
    raw = again.SerializeToString() + AdaptationCommand(command_id="evil").SerializeToString()
    parsed = AdaptationCommand.FromString(raw)
    assert parsed.command_id == "evil" and parsed.metadata.signature == again.metadata.signature
    assert verifier.verify(parsed) == (False, "bad_signature")
    # ... and so is a second metadata piece that changes the nonce (submessages merge).
    raw = again.SerializeToString() + _field(7, _field(1, b"another-nonce"))
    assert verifier.verify(AdaptationCommand.FromString(raw)) == (False, "bad_signature")
    assert verifier.verify(again) == (True, "ok")


def test_nonce_is_recorded_only_after_the_signature_passes(keyring, verifier) -> None:
    forged = signed(Keyring({"k1": OTHER_KEY}), nonce="shared")
    assert verifier.verify(forged) == (False, "bad_signature")
    future = signed(keyring, nonce="shared", timestamp=T0 + 3600)
    assert verifier.verify(future) == (False, "future")
    assert verifier.verify(signed(keyring, nonce="shared")) == (True, "ok")
    assert verifier.verify(signed(keyring, nonce="shared", timestamp=T0 + 1)) == (False, "replay")


def test_checking_without_recording_leaves_the_nonce_unused(keyring, verifier) -> None:
    cmd = signed(keyring)
    assert verifier.verify(cmd, record_nonce=False) == (True, "ok")
    assert verifier.verify(cmd, record_nonce=False) == (True, "ok")
    assert verifier.ledger_size == 0
    assert verifier.verify(cmd) == (True, "ok")
    assert verifier.verify(cmd, record_nonce=False) == (False, "replay")
    forged = signed(keyring, nonce="other")
    forged.metadata.signature = b"\x00" * 32
    assert verifier.verify(forged, record_nonce=False) == (False, "bad_signature")


def test_forgotten_nonce_cannot_be_replayed_after_the_clock_steps_back(keyring, clock) -> None:
    verifier = CommandVerifier(keyring, freshness_s=10.0, clock=clock)
    first = signed(keyring, nonce="a", timestamp=T0)
    assert verifier.verify(first)[0]
    clock.now = T0 + 30
    assert verifier.verify(signed(keyring, nonce="b", timestamp=clock.now))[0]
    assert verifier.ledger_size == 1  # "a" was forgotten
    clock.now = T0  # wall clock stepped backwards
    assert verifier.verify(first) == (False, "stale")


def test_a_clock_that_reads_nan_refuses_every_command(keyring, clock) -> None:
    """A broken clock (a simulated one, say) fails closed: NaN compared False both ways, and a
    command from 1970 or from the year 5000 was accepted as fresh."""
    verifier = CommandVerifier(keyring, clock=lambda: math.nan)
    for timestamp in (0.0, T0, 1e11):
        assert verifier.verify(signed(keyring, timestamp=timestamp)) == (False, "stale")
    assert verifier.ledger_size == 0


def test_a_relayed_command_from_a_clock_ahead_prunes_only_up_to_this_clock(
    keyring, verifier
) -> None:
    """A peer whose clock runs 30 s ahead relays a command (received "in the future", inside
    the window): nonces are forgotten only up to this clock, so one seen 50 s ago is still a
    replay, and the floor stays put for a fresh command older than it."""
    assert verifier.check(signed(keyring, nonce="a", timestamp=T0 - 50)) == ""
    assert verifier.check(signed(keyring, nonce="b", timestamp=T0 + 25), T0 + 30) == ""
    assert verifier.ledger_size == 2
    assert verifier.check(signed(keyring, nonce="a", timestamp=T0 - 50)) == "replay"
    assert verifier.check(signed(keyring, nonce="c", timestamp=T0 - 55)) == ""


def test_verifier_rejects_bad_freshness(keyring) -> None:
    with pytest.raises(ValueError, match=r"freshness_s must be in \(0, 3600\]"):
        CommandVerifier(keyring, freshness_s=0)


def test_a_verifier_refuses_a_keyring_with_no_key() -> None:
    """``Keyring({})`` (a JSON ``{}``) is a keyring, but a verifier over it refused every
    command as signed by an unknown key, and nothing said so when it was built."""
    assert len(Keyring({})) == 0  # a value still: a file keygen --append adds to
    with pytest.raises(ValueError, match="the keyring holds no key: every command would be"):
        CommandVerifier(Keyring({}))


def test_nonce_ledger_stays_bounded_under_200k_commands(keyring, clock) -> None:
    """200,000 distinct valid commands, 1 ms apart, timestamps jittered within the window."""
    freshness_s, dt, count = 5.0, 1e-3, 200_000
    verifier = CommandVerifier(keyring, freshness_s=freshness_s, clock=clock)
    bound = int(2 * freshness_s / dt) + 1  # rate x (past + future window)
    rng = random.Random(0)
    cmd = make_rollback_command(3)
    largest = 0
    for i in range(count):
        clock.now += dt
        jitter = rng.uniform(-0.9, 0.9) * freshness_s
        cmd.command_id = f"c{i}"
        sign_command(cmd, keyring, "k1", nonce=f"n{i}", timestamp=clock.now + jitter)
        assert verifier.verify(cmd) == (True, "ok")
        assert len(verifier._ids) == verifier.ledger_size  # the ids are forgotten alike
        largest = max(largest, verifier.ledger_size)
    assert largest <= bound
    assert largest > freshness_s / dt  # the window really filled: the bound is not vacuous
    # Every recorded nonce is still inside the window.
    cutoff = clock.now - freshness_s
    assert all(ts >= cutoff for ts in verifier._seen.values())
