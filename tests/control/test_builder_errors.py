"""The command builders, signing and key helpers refuse a wrong argument with a TypeError or
ValueError naming it, what was given and what is allowed; unless ``validate=False``, a builder
refuses, with the trainer's own reason, a command the trainer would refuse (docs/design.md §5)."""

from __future__ import annotations

import math

import pytest

from kasmina.control.auth import CommandVerifier, sign_command
from kasmina.control.builders import (
    make_optimizer_command,
    make_rollback_command,
    make_seed_command,
)
from kasmina.control.commands import MAX_EPOCH, to_kasmina_command
from kasmina.leyline import MessagePriority
from kasmina.utils.keyring import Keyring, generate_key

KEY = bytes(range(32))


def test_an_unknown_operation_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"operation .*'germinate', 'advance', 'cull', 'termin"):
        make_seed_command("explode", "s")
    with pytest.raises(ValueError, match=r"command_type .*'initialize_host', .*'step'.*'bogus'"):
        make_optimizer_command("bogus")
    with pytest.raises(TypeError, match="operation .* got float 1.5"):
        make_seed_command(1.5, "s")  # was silently int(1.5) == GERMINATE


def test_a_wrong_type_is_a_type_error_naming_the_argument() -> None:
    with pytest.raises(TypeError, match="seed_id must be a str .* got int 5"):
        make_seed_command("germinate", 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="timeout_s must be a number .* got str"):
        make_seed_command("cull", "s", timeout_s="5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="target_epoch must be an int"):
        make_rollback_command(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="learning_rate must be .* got str"):
        make_optimizer_command("step", "o", learning_rate="x")  # type: ignore[arg-type]


def test_parameters_must_be_a_mapping_of_str_to_numbers() -> None:
    with pytest.raises(TypeError, match=r"parameters\['learning_rate'\] must be a number"):
        make_seed_command("germinate", "s", "a", {"learning_rate": "x"})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="parameters must be None or a mapping .* got list"):
        make_seed_command("germinate", "s", "a", [1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key of parameters must be a str, got int 1"):
        make_seed_command("germinate", "s", "a", {1: 0.5})  # type: ignore[dict-item]


def test_a_bool_is_no_number_and_a_number_no_bool() -> None:
    """Protobuf stores ``True`` in a number field as 1 and ``2`` in a bool field as True: a
    one-second timeout, a learning rate of 1.0 and an emergency rollback nobody asked for."""
    with pytest.raises(TypeError, match="timeout_s must be .* got bool True"):
        make_rollback_command(1, timeout_s=True)
    with pytest.raises(TypeError, match="emergency must be a bool, got int 2"):
        make_rollback_command(1, emergency=2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="grad_clip_norm must be .* got bool True"):
        make_optimizer_command("step", "host", grad_clip_norm=True)
    with pytest.raises(TypeError, match="learning_rate must be .* got bool True"):
        make_optimizer_command("step", "host", learning_rate=True)
    with pytest.raises(TypeError, match=r"parameters\['learning_rate'\] must be a number"):
        make_seed_command("germinate", "s", "a", {"learning_rate": True})
    assert make_rollback_command(1, emergency=True).rollback_command.emergency


def test_a_numpy_or_torch_bool_is_no_number_either() -> None:
    """A NumPy bool or a bool tensor (a mask's element) passed the ``bool`` check and became 1.0:
    a STEP to a learning rate of 1, an ADVANCE with a perfect gate score."""
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    for flag in (np.bool_(True), torch.tensor(True)):
        with pytest.raises(TypeError, match="learning_rate must be .* got"):
            make_optimizer_command("step", "host", learning_rate=flag)
        with pytest.raises(TypeError, match="grad_clip_norm must be .* got"):
            make_optimizer_command("step", "host", grad_clip_norm=flag)
        with pytest.raises(TypeError, match=r"parameters\['gate_score'\] must be a number"):
            make_seed_command("advance", "s", parameters={"gate_score": flag})
    # A NumPy number is still a number.
    step = make_optimizer_command("step", "host", learning_rate=np.float64(0.5))
    assert step.optimizer_command.learning_rate == 0.5


def test_priority_takes_a_value_or_a_name_and_lists_the_names() -> None:
    cmd = make_seed_command("cull", "s", priority="high")
    assert cmd.priority == MessagePriority.MESSAGE_PRIORITY_HIGH
    with pytest.raises(ValueError, match="priority .*'low', 'normal', 'high', 'critical'"):
        make_seed_command("cull", "s", priority="urgent")


@pytest.mark.parametrize("epoch", [MAX_EPOCH + 1, 2**40])
def test_values_that_do_not_fit_the_wire_are_value_errors(epoch: int) -> None:
    with pytest.raises(ValueError, match=rf"target_epoch must be an int in \[0, {MAX_EPOCH}\]"):
        make_rollback_command(epoch)
    with pytest.raises(ValueError, match="priority .* got 1099511627776"):
        make_seed_command("cull", "s", priority=2**40)


SEED, ROLLBACK, OPTIMIZER = make_seed_command, make_rollback_command, make_optimizer_command
NAN = math.nan


@pytest.mark.parametrize(
    ("build", "args", "kwargs", "argument", "reason"),
    [
        (SEED, (99, "s"), {}, "operation", "unknown_operation"),
        (SEED, ("germinate", "", "a"), {}, "seed_id", "bad_seed_id"),
        (SEED, ("germinate", "s"), {}, "artifact_id", "missing_artifact_id"),
        (SEED, ("cull", "s"), {"timeout_s": 3601}, "timeout_s", "bad_timeout"),
        (SEED, ("cull", "s"), {"priority": 42}, "priority", "unknown_priority"),
        (SEED, ("cull", "s"), {"command_id": ""}, "command_id", "bad_command_id"),
        (ROLLBACK, (1,), {"command_id": "a\nb"}, "command_id", "bad_command_id"),
        (ROLLBACK, (-1,), {}, "target_epoch", "bad_target_epoch"),
        (ROLLBACK, (1,), {"reason": "r\n"}, "reason", "bad_reason"),
        (OPTIMIZER, (1, "o"), {"learning_rate": -1}, "learning_rate", "bad_learning_rate"),
        (OPTIMIZER, (1, "o"), {"learning_rate": NAN}, "learning_rate", "bad_learning_rate"),
        (OPTIMIZER, ("create_seed",), {}, "optimizer_id", "missing_optimizer_id"),
        (OPTIMIZER, (77,), {}, "command_type", "unknown_optimizer_command"),
    ],
)
def test_validate_raises_the_trainers_reason_naming_the_argument(
    build, args: tuple, kwargs: dict, argument: str, reason: str
) -> None:
    assert to_kasmina_command(build(*args, **kwargs, validate=False)) == reason  # as asked
    with pytest.raises(ValueError, match=rf"^{argument} must be .* \(the trainer refuses it as "):
        build(*args, **kwargs)  # checked by default


@pytest.mark.parametrize(
    ("operation", "parameters", "match"),
    [
        (
            "germinate",
            {"learning_rate": 20},
            r"\['learning_rate'\] must be a number in \(0.0, 10.0\]",
        ),
        ("cull", {"embargo_epochs": 0.5}, r"\['embargo_epochs'\] must be an integer in \[0, "),
        ("germinate", {"lr_scale": 0.5}, r" must be finite numbers keyed by \['learning_rate'\]"),
        ("terminate", {"x": 1.0}, " must be empty for this command"),
        ("advance", {"gate_score": NAN}, r" must be finite numbers keyed by \['gate_score'\]"),
        ("initialize_host", {"momentum": 1.0}, r"\['momentum'\] must be a number in \[0.0, 1.0\)"),
    ],
)
def test_validate_names_the_parameter_and_its_range(operation, parameters, match) -> None:
    with pytest.raises(ValueError, match=f"^parameters{match}.*the trainer refuses it as"):
        if operation == "initialize_host":
            make_optimizer_command(operation, parameters=parameters, validate=True)
        else:
            make_seed_command(operation, "s", "a", parameters, validate=True)


def test_validate_passes_a_valid_command_unchanged() -> None:
    built = make_seed_command(
        "germinate", "s", "a", {"learning_rate": 0.5}, command_id="c", validate=False
    )
    checked = make_seed_command("germinate", "s", "a", {"learning_rate": 0.5}, command_id="c")
    assert checked.SerializeToString(deterministic=True) == built.SerializeToString(
        deterministic=True
    )


def test_sign_command_names_a_wrong_keyring_nonce_or_timestamp() -> None:
    cmd = make_rollback_command(1)
    with pytest.raises(TypeError, match=r"keyring must be a Keyring, .* got dict$"):
        sign_command(cmd, {"k": b"x" * 32}, "k")  # type: ignore[arg-type]
    keyring = Keyring({"k": KEY})
    with pytest.raises(TypeError, match="nonce must be a str .* got int 5"):
        sign_command(cmd, keyring, "k", nonce=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="timestamp must be seconds since the epoch .* got str"):
        sign_command(cmd, keyring, "k", timestamp="now")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timestamp must be finite"):
        sign_command(cmd, keyring, "k", timestamp=math.inf)
    for beyond in (1e20, -1e12, 2.6e11):  # past what a protobuf Timestamp holds
        with pytest.raises(ValueError, match="timestamp must be within the years 1 to 9999"):
            sign_command(cmd, keyring, "k", timestamp=beyond)
    # Its first and last seconds are in range (0001-01-01T00:00:00Z, 9999-12-31T23:59:59Z).
    for edge in (-62_135_596_800, 253_402_300_799):
        signed = sign_command(make_rollback_command(1), keyring, "k", timestamp=edge)
        assert abs(signed.metadata.timestamp.ToNanoseconds() / 1e9 - edge) < 1e-3
    with pytest.raises(KeyError, match=r"which holds \['k'\]"):
        sign_command(cmd, keyring, "nope")
    assert not cmd.HasField("metadata")  # refused before the command was touched
    with pytest.raises(TypeError, match="command must be an AdaptationCommand"):
        sign_command(cmd.SerializeToString(), keyring, "k")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="keyring must be a Keyring"):
        CommandVerifier({"k": KEY})  # type: ignore[arg-type]


def test_key_helpers_name_a_wrong_argument() -> None:
    with pytest.raises(TypeError, match="num_bytes must be an int .* got str '32'"):
        generate_key("32")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_bytes must be at least 16"):
        generate_key(8)
    pairs = [("k", KEY)]
    with pytest.raises(TypeError, match=r"keys must be a mapping .* got list$") as raised:
        Keyring(pairs)  # type: ignore[arg-type]
    assert KEY.hex() not in str(raised.value) and repr(KEY) not in str(raised.value)


def test_valid_arguments_build_and_sign_the_same_bytes_as_before() -> None:
    """The checks change no byte of a valid command: these are the signed bytes the builders
    produced before them (commands are signed over the serialised message)."""
    keyring, c = Keyring({"k": KEY}), {"command_id": "c"}
    commands = [
        make_seed_command("germinate", "l:1", "a", {"learning_rate": 0.5}, 2.5, **c),
        make_rollback_command(7, True, "spike", **c),
        make_optimizer_command("create_seed", "s0", parameters={"momentum": 0.9, "eps": 1e-8}, **c),
    ]
    signed = [
        sign_command(cmd, keyring, "k", nonce="n", timestamp=1.7e9 + 0.5)
        .SerializeToString(deterministic=True)
        .hex()
        for cmd in commands
    ]
    assert signed == [
        "0a01631224080112036c3a311a016122180a0d6c6561726e696e675f7261746511000000000000e03f2802"
        "320808021080cab5ee013a360a016e120c0880e2cfaa061080cab5ee011a201cd0ee4aa9e9818a026de98a"
        "e3ae78fc4a47c61d801e08e8f99dcca6ec07a62022016b",
        "0a01631a0b080710011a057370696b652803320208053a360a016e120c0880e2cfaa061080cab5ee011a20"
        "eef8508b3bf0f4f7bc7e1ce2167ecf8b7ca006d4cd6d0fb00f1548ff7fb0df4b22016b",
        "0a0163222b0802120273302a0e0a03657073113a8c30e28e79453e2a130a086d6f6d656e74756d11cdcccc"
        "ccccccec3f2802320208053a360a016e120c0880e2cfaa061080cab5ee011a20ae7e56912ad9982d1c23f5"
        "89b3373869894b50d7f14a94820466c43c8015fcfe22016b",
    ]


def test_numbers_too_large_for_the_wire_are_value_errors_naming_the_argument() -> None:
    """They escaped as OverflowError ("cannot convert float infinity to integer")."""
    for build, argument in (
        (lambda: make_seed_command("germinate", "s", "a", timeout_s=1e300), "timeout_s"),
        (lambda: make_optimizer_command("step", "o", learning_rate=10**400), "learning_rate"),
        (lambda: make_optimizer_command("step", "o", grad_clip_norm=10**400), "grad_clip_norm"),
        (lambda: make_seed_command("germinate", "s", "a", {"learning_rate": 10**400}),
         r"parameters\['learning_rate'\]"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=f"{argument} must be"):
            build()
    keyring = Keyring({"k": KEY})
    for timestamp in (1e300, 10**400, -1e20):
        cmd = make_seed_command("cull", "s")
        with pytest.raises(ValueError, match="timestamp must be within the years 1 to 9999"):
            sign_command(cmd, keyring, "k", timestamp=timestamp)
        assert not cmd.HasField("metadata")


def test_text_the_wire_cannot_encode_is_a_value_error_and_signing_touches_nothing() -> None:
    """A lone surrogate gave "TypeError: function takes exactly 5 arguments", and
    ``sign_command`` wrote the key id before failing on the nonce."""
    with pytest.raises(ValueError, match="seed_id must be"):
        make_seed_command("cull", "\ud800")
    with pytest.raises(TypeError, match="a key of parameters must be a str"):
        make_seed_command("germinate", "s", "a", {"\ud800": 0.5})
    cmd = make_seed_command("cull", "s")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        sign_command(cmd, Keyring({"k": KEY}), "k", nonce="\ud800")
    assert not cmd.HasField("metadata")


def test_a_rate_the_wire_rounds_to_zero_is_refused() -> None:
    """The optimizer command's learning rate and clip norm are float32 on the wire: 1e-46 read
    as 0, "unset" (keep the lr, no clipping), with no error."""
    for argument in ("learning_rate", "grad_clip_norm"):
        with pytest.raises(ValueError, match=f"{argument} must be .*rounds to 0"):
            make_optimizer_command("step", "o", **{argument: 1e-46})
    assert make_optimizer_command("step", "o", learning_rate=1e-30).optimizer_command.learning_rate
