"""The command handler: accepted paths, every rejection path, tampering and fuzzing.

See docs/design.md §5.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kasmina.control.auth import CommandVerifier, sign_command
from kasmina.control.builders import make_optimizer_command as make_optimizer_command_checked
from kasmina.control.builders import make_rollback_command as make_rollback_command_checked
from kasmina.control.builders import make_seed_command as make_seed_command_checked
from kasmina.control.commands import (
    MAX_EMBARGO_EPOCHS,
    MAX_EPOCH,
    MAX_GRAD_CLIP_NORM,
    MAX_LEARNING_RATE,
    MAX_TIMEOUT_S,
    KasminaCommand,
    RollbackAction,
    SeedAction,
    _command,
    _field_setters,
    _seed,
)
from kasmina.control.handler import LeylineAdaptationHandler
from kasmina.leyline import AdaptationCommand, CommandType, MessagePriority, SeedOperation
from kasmina.utils.keyring import Keyring
from kasmina.utils.telemetry import MemorySink, TelemetryReporter

# Most commands here are ones the trainer must refuse, so they are built unchecked: the
# builders' own run of the trainer's rules (``validate``) is tested in test_builder_errors.py.
make_seed_command = functools.partial(make_seed_command_checked, validate=False)
make_rollback_command = functools.partial(make_rollback_command_checked, validate=False)
make_optimizer_command = functools.partial(make_optimizer_command_checked, validate=False)

KEY = bytes(range(7, 39))
T0 = 1_700_000_000.0
GERMINATE = SeedOperation.SEED_OPERATION_GERMINATE


class RecordingExecutor:
    def __init__(self, result: bool = True, error: BaseException | None = None) -> None:
        self.result = result
        self.error = error
        self.commands: list[KasminaCommand] = []

    def execute(self, command: KasminaCommand) -> bool:
        self.commands.append(command)
        if self.error is not None:
            raise self.error
        return self.result


class Rig:
    """A handler wired to a fake clock, a recording executor and an in-memory telemetry sink."""

    def __init__(self, executor: RecordingExecutor | None = None) -> None:
        self.now = T0
        self.keyring = Keyring({"ctl": KEY})
        self.verifier = CommandVerifier(self.keyring, clock=lambda: self.now)
        self.executor = executor or RecordingExecutor()
        self.sink = MemorySink()
        telemetry = TelemetryReporter(sinks=[self.sink], clock=lambda: self.now)
        self.handler = LeylineAdaptationHandler(self.verifier, self.executor, telemetry)
        self._n = 0

    def sign(self, cmd: AdaptationCommand) -> bytes:
        self._n += 1
        sign_command(cmd, self.keyring, "ctl", nonce=f"nonce-{self._n}", timestamp=self.now)
        return cmd.SerializeToString()

    def reasons(self) -> list[str]:
        return [m.labels["reason"] for m in self.sink.events("command.rejected")]


@pytest.fixture
def rig() -> Rig:
    return Rig()


def germinate(command_id: str = "cmd-1") -> AdaptationCommand:
    return make_seed_command(
        "germinate", "layer2:5", "artifact-9", {"learning_rate": 0.5}, 2.5, command_id=command_id
    )


# --- accepted paths ----------------------------------------------------------------------------


def test_valid_seed_command_is_executed_once_and_reported(rig: Rig) -> None:
    raw = rig.sign(germinate())
    assert rig.handler.handle_adaptation_command(raw) is True
    assert rig.handler.handle_adaptation_command(raw) is False  # replay
    (cmd,) = rig.executor.commands
    assert cmd == KasminaCommand(
        command_id="cmd-1",
        kind="seed",
        priority=MessagePriority.MESSAGE_PRIORITY_NORMAL,
        timeout_s=2.5,
        seed=SeedAction(GERMINATE, "layer2:5", "artifact-9", {"learning_rate": 0.5}),
        issued_at=T0,  # its signed timestamp
    )
    assert rig.handler.stats["accepted"] == 1 and rig.handler.stats["executed"] == 1
    assert rig.handler.stats["rejected:replay"] == 1 and rig.handler.stats["rejected"] == 1
    (ack,) = rig.sink.events("command.ack")
    (done,) = rig.sink.events("command.complete")
    assert dict(ack.labels) == {"kind": "seed", "command_id": "cmd-1"}
    assert dict(done.labels) == {"kind": "seed", "command_id": "cmd-1", "success": "true"}
    assert done.value == 1.0
    assert rig.reasons() == ["replay"]
    names = [p.metrics[0].name for p in rig.sink.packets]
    assert names == ["command.ack", "command.complete", "command.rejected"]


def test_a_revised_outcome_moves_the_count_and_says_it_revises(rig: Rig) -> None:
    """A multi-rank repair that overturns a rank's outcome reports the command again: that
    second ``command.complete`` carried no mark, so a consumer counting events counted one
    command twice, with contradicting outcomes."""
    assert rig.handler.handle_adaptation_command(rig.sign(germinate()))
    (cmd,) = rig.executor.commands
    rig.handler.complete(cmd, False, revised=True)
    assert (rig.handler.stats["executed"], rig.handler.stats["failed"]) == (0, 1)
    first, second = rig.sink.events("command.complete")
    assert "revised" not in dict(first.labels)
    assert dict(second.labels) == {
        "kind": "seed", "command_id": "cmd-1", "success": "false", "revised": "true"
    }  # fmt: skip


def test_rollback_and_optimizer_commands_are_converted(rig: Rig) -> None:
    rb = make_rollback_command(7, emergency=True, reason="loss spike", command_id="rb")
    assert rig.handler.handle_adaptation_command(rig.sign(rb))
    opt = make_optimizer_command("step", "host", grad_clip_norm=1.0, learning_rate=0.01)
    assert rig.handler.handle_adaptation_command(rig.sign(opt))
    create = make_optimizer_command("create_seed", "s0", parameters={"momentum": 0.9})
    assert rig.handler.handle_adaptation_command(rig.sign(create))
    rollback_cmd, optimizer_cmd, create_cmd = rig.executor.commands
    assert rollback_cmd.kind == "rollback" and rollback_cmd.seed is None
    assert rollback_cmd.rollback == RollbackAction(7, True, "loss spike")
    assert rollback_cmd.priority == MessagePriority.MESSAGE_PRIORITY_HIGH
    assert optimizer_cmd.kind == "optimizer"
    assert optimizer_cmd.optimizer.command_type == CommandType.COMMAND_TYPE_STEP
    assert optimizer_cmd.optimizer.optimizer_id == "host"
    assert optimizer_cmd.optimizer.learning_rate == pytest.approx(0.01)
    assert create_cmd.optimizer.optimizer_id == "s0"
    assert dict(create_cmd.optimizer.parameters) == {"momentum": 0.9}


def test_bytearray_and_memoryview_inputs(rig: Rig) -> None:
    class Frame(bytes):
        """A transport's bytes subclass."""

    assert rig.handler.handle_adaptation_command(bytearray(rig.sign(germinate("c1"))))
    assert rig.handler.handle_adaptation_command(memoryview(rig.sign(germinate("c2"))))
    assert rig.handler.handle_adaptation_command(Frame(rig.sign(germinate("c3"))))
    assert len(rig.executor.commands) == 3


def test_async_form(rig: Rig) -> None:
    raw = rig.sign(germinate())
    assert asyncio.run(rig.handler.handle_adaptation_command_async(raw)) is True
    assert len(rig.executor.commands) == 1


def test_handler_without_telemetry() -> None:
    keyring = Keyring({"ctl": KEY})
    executor = RecordingExecutor()
    handler = LeylineAdaptationHandler(CommandVerifier(keyring, clock=lambda: T0), executor)
    raw = sign_command(germinate(), keyring, "ctl", timestamp=T0).SerializeToString()
    assert handler.handle_adaptation_command(raw)
    assert not handler.handle_adaptation_command(raw)
    assert len(executor.commands) == 1


# --- executor failures -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "executor", [RecordingExecutor(False), RecordingExecutor(error=RuntimeError())]
)
def test_failing_or_raising_executor_returns_false(executor: RecordingExecutor) -> None:
    rig = Rig(executor)
    assert rig.handler.handle_adaptation_command(rig.sign(germinate())) is False
    assert rig.handler.stats["failed"] == 1 and rig.handler.stats["executed"] == 0
    (done,) = rig.sink.events("command.complete")
    assert done.labels["success"] == "false" and done.value == 0.0


def test_an_interrupted_executor_propagates_with_the_command_counted() -> None:
    """A ``KeyboardInterrupt`` in the executor is never swallowed, and the command it cut
    short still gets an outcome: accepted = executed + failed."""
    rig = Rig(RecordingExecutor(error=KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        rig.handler.handle_adaptation_command(rig.sign(germinate()))
    stats = rig.handler.stats
    assert (stats["accepted"], stats["executed"], stats["failed"]) == (1, 0, 1)
    assert len(rig.sink.events("command.complete")) == 1


def test_failing_telemetry_sink_does_not_break_commands(rig: Rig) -> None:
    class Broken:
        def send(self, packet) -> None:
            raise RuntimeError("sink down")

    rig.handler.telemetry.add_sink(Broken())
    assert rig.handler.handle_adaptation_command(rig.sign(germinate()))
    assert len(rig.sink.events("command.complete")) == 1


def test_internal_error_is_contained() -> None:
    class ExplodingVerifier:
        def check(self, cmd, received_at=None, **kwargs):
            raise RuntimeError("bug")

        verify = check

    executor = RecordingExecutor()
    handler = LeylineAdaptationHandler(ExplodingVerifier(), executor)  # type: ignore[arg-type]
    assert handler.handle_adaptation_command(b"") is False
    assert handler.stats["rejected:internal_error"] == 1 and not executor.commands


# --- rejections --------------------------------------------------------------------------------


def _set(path: str, value):
    def mutate(cmd: AdaptationCommand) -> None:
        *parents, leaf = path.split(".")
        target = cmd
        for name in parents:
            target = getattr(target, name)
        setattr(target, leaf, value)

    return mutate


def _clear(field: str):
    return lambda cmd: cmd.ClearField(field)


def _param(name: str, value: float):
    return lambda cmd: cmd.seed_command.parameters.__setitem__(name, value)


def _timeout(seconds: int, nanos: int):
    def mutate(cmd: AdaptationCommand) -> None:
        cmd.timeout.seconds = seconds
        cmd.timeout.nanos = nanos

    return mutate


def _cull(embargo: float):
    def mutate(cmd: AdaptationCommand) -> None:
        cmd.seed_command.operation = SeedOperation.SEED_OPERATION_CULL
        cmd.seed_command.parameters.clear()  # GERMINATE's learning_rate is no CULL parameter
        cmd.seed_command.parameters["embargo_epochs"] = embargo

    return mutate


SEMANTIC_CASES = [
    ("unknown_operation", _set("seed_command.operation", 0)),
    ("unknown_operation", _set("seed_command.operation", 99)),
    ("bad_seed_id", _set("seed_command.seed_id", "")),
    ("bad_seed_id", _set("seed_command.seed_id", "s" * 300)),
    ("missing_artifact_id", _set("seed_command.kernel_artifact_id", "")),
    ("missing_timeout", _clear("timeout")),
    ("bad_timeout", _timeout(0, 0)),
    ("bad_timeout", _timeout(-5, 0)),
    ("bad_timeout", _timeout(0, -1)),
    ("bad_timeout", _timeout(1, 1_000_000_000)),
    ("bad_command_id", _set("command_id", "")),
    ("bad_command_id", _set("command_id", "c" * 257)),
    # Control characters in an id would forge log lines (ids are logged as they are).
    ("bad_command_id", _set("command_id", "ok\n2026-01-01 INFO forged")),
    ("bad_seed_id", _set("seed_command.seed_id", "out[0]\x1b[2K")),
    ("bad_artifact_id", _set("seed_command.kernel_artifact_id", "a\x00b")),
    ("bad_artifact_id", _set("seed_command.kernel_artifact_id", "a" * 257)),
    ("unknown_priority", _set("priority", 42)),
    ("non_finite_parameter", _param("learning_rate", math.nan)),
    ("non_finite_parameter", _param("x", math.inf)),
    ("bad_embargo_epochs", _cull(-1.0)),
    ("bad_embargo_epochs", _cull(1.5)),
    ("no_command", _clear("seed_command")),
]


@pytest.mark.parametrize(("reason", "mutate"), SEMANTIC_CASES)
def test_semantically_invalid_signed_commands_are_rejected(rig: Rig, reason: str, mutate) -> None:
    cmd = germinate()
    mutate(cmd)
    assert rig.handler.handle_adaptation_command(rig.sign(cmd)) is False
    assert rig.handler.stats[f"rejected:{reason}"] == 1
    assert rig.reasons() == [reason]
    assert not rig.executor.commands


@pytest.mark.parametrize(
    ("reason", "cmd"),
    [
        ("bad_target_epoch", make_rollback_command(-1)),
        ("bad_reason", make_rollback_command(1, reason="r" * 1025)),
        ("bad_reason", make_rollback_command(1, reason="ok\r\x1b[2K forged")),
        ("bad_optimizer_id", make_optimizer_command("step", "o\n")),
        ("unknown_optimizer_command", make_optimizer_command(0)),
        ("unknown_optimizer_command", make_optimizer_command(77)),
        ("missing_optimizer_id", make_optimizer_command("create_seed")),
        ("bad_optimizer_id", make_optimizer_command("step", "o" * 257)),
        (
            "bad_learning_rate",
            make_optimizer_command("step", learning_rate=math.inf),
        ),
        ("bad_learning_rate", make_optimizer_command("step", learning_rate=-0.1)),
        (
            "bad_grad_clip_norm",
            make_optimizer_command("step", grad_clip_norm=math.nan),
        ),
        (
            "non_finite_parameter",
            make_optimizer_command("step", parameters={"b": -math.inf}),
        ),
    ],
)
def test_invalid_rollback_and_optimizer_commands(rig: Rig, reason: str, cmd) -> None:
    assert rig.handler.handle_adaptation_command(rig.sign(cmd)) is False
    assert rig.reasons() == [reason]
    assert not rig.executor.commands


def _with_unknown_field(where: str) -> AdaptationCommand:
    """A command as a newer controller's schema writes it: a field this one does not know."""
    if where == "rollback":  # e.g. a dry_run flag (field 4, varint 1)
        cmd = make_rollback_command(7)
        cmd.rollback_command.MergeFromString(b"\x20\x01")
    elif where == "seed":  # e.g. a target slot path (field 6, a string)
        cmd = germinate()
        cmd.seed_command.MergeFromString(b"\x32\x03enc")
    elif where == "optimizer":  # e.g. max_grad_value (field 9, a float)
        cmd = make_optimizer_command("step", "host")
        cmd.optimizer_command.MergeFromString(b"\x4d\x00\x00\x00\x3f")
    else:  # e.g. min_trainer_version on the envelope (field 15, varint 2)
        cmd = germinate()
        cmd.MergeFromString(b"\x78\x02")
    return cmd


@pytest.mark.parametrize("where", ["rollback", "seed", "optimizer", "envelope"])
def test_a_signed_command_with_a_field_this_version_does_not_know_is_refused(
    rig: Rig, where: str
) -> None:
    """Protobuf keeps a newer controller's fields and the signature covers them, but converting
    the command would drop them: a rollback's dry_run would run for real. Obeyed whole or
    refused, never in part."""
    cmd = _with_unknown_field(where)
    raw = rig.sign(cmd)
    assert AdaptationCommand.FromString(raw) == cmd  # the field travels, signed
    assert rig.handler.handle_adaptation_command(raw) is False
    assert rig.reasons() == ["unknown_field"]
    assert not rig.executor.commands


# --- ranges: every numeric field, just inside (accepted) and just outside (refused) -----------


def f32_up(x: float) -> float:
    """The next float32 above positive ``x`` (the optimizer fields are float32 on the wire)."""
    (bits,) = struct.unpack("<I", struct.pack("<f", x))
    return struct.unpack("<f", struct.pack("<I", bits + 1))[0]


def seed(op: str, **params: float) -> AdaptationCommand:
    """Built unchecked: the cases test the trainer's own refusals."""
    artifact = "artifact-9" if op == "germinate" else ""
    return make_seed_command(op, "layer2:5", artifact, params)


def with_timeout(seconds: int, nanos: int) -> AdaptationCommand:
    cmd = germinate()
    _timeout(seconds, nanos)(cmd)
    return cmd


def optimizer(**fields) -> AdaptationCommand:
    return make_optimizer_command("initialize_host", "host", **fields)


def optimizer_step(**fields) -> AdaptationCommand:
    return make_optimizer_command("step", "host", **fields)


TINY = 5e-324  # the smallest positive double
F32_TINY = 1e-45  # the smallest positive float32
UP = math.inf

RANGE_CASES = [
    # timeout: (0, MAX_TIMEOUT_S]
    (None, with_timeout(0, 1)),
    (None, with_timeout(MAX_TIMEOUT_S, 0)),
    ("bad_timeout", with_timeout(MAX_TIMEOUT_S, 1)),
    ("bad_timeout", with_timeout(MAX_TIMEOUT_S + 1, 0)),
    ("bad_timeout", with_timeout(315_576_000_000, 0)),  # protobuf's own maximum
    # GERMINATE learning_rate: (0, 10]
    (None, seed("germinate", learning_rate=TINY)),
    (None, seed("germinate", learning_rate=MAX_LEARNING_RATE)),
    ("bad_learning_rate", seed("germinate", learning_rate=0.0)),
    ("bad_learning_rate", seed("germinate", learning_rate=-0.0)),
    ("bad_learning_rate", seed("germinate", learning_rate=math.nextafter(MAX_LEARNING_RATE, UP))),
    ("bad_learning_rate", seed("germinate", learning_rate=1e300)),
    # ADVANCE gate_score: [0, 1]
    (None, seed("advance", gate_score=0.0)),
    (None, seed("advance", gate_score=1.0)),
    ("bad_gate_score", seed("advance", gate_score=-TINY)),
    ("bad_gate_score", seed("advance", gate_score=math.nextafter(1.0, UP))),
    # CULL embargo_epochs: an integer in [0, 2**31 - 1]
    (None, seed("cull", embargo_epochs=0.0)),
    (None, seed("cull", embargo_epochs=float(MAX_EMBARGO_EPOCHS))),
    ("bad_embargo_epochs", seed("cull", embargo_epochs=-1.0)),
    ("bad_embargo_epochs", seed("cull", embargo_epochs=float(MAX_EMBARGO_EPOCHS + 1))),
    ("bad_embargo_epochs", seed("cull", embargo_epochs=0.5)),
    # keys an operation does not use
    ("unknown_parameter", seed("germinate", alpha_steps=100.0)),
    ("unknown_parameter", seed("germinate", gate_score=0.5)),
    ("unknown_parameter", seed("advance", learning_rate=0.1)),
    ("unknown_parameter", seed("cull", embargo_epochs=3.0, w=0.25)),
    ("unknown_parameter", seed("terminate", embargo_epochs=3.0)),
    (None, seed("terminate")),
    # rollback target_epoch: [0, 2**31 - 1] (an int32 on the wire cannot exceed the top)
    (None, make_rollback_command(0)),
    (None, make_rollback_command(MAX_EPOCH)),
    ("bad_target_epoch", make_rollback_command(-1)),
    ("bad_target_epoch", make_rollback_command(-(2**31))),
    # optimizer learning_rate: 0 (unset) or (0, 10]
    (None, optimizer(learning_rate=0.0)),
    (None, optimizer(learning_rate=F32_TINY)),
    (None, optimizer(learning_rate=MAX_LEARNING_RATE)),
    ("bad_learning_rate", optimizer(learning_rate=-F32_TINY)),
    ("bad_learning_rate", optimizer(learning_rate=f32_up(MAX_LEARNING_RATE))),
    ("bad_learning_rate", optimizer(learning_rate=1e30)),
    ("bad_learning_rate", optimizer(learning_rate=math.nan)),
    (None, optimizer_step(learning_rate=MAX_LEARNING_RATE)),
    ("bad_learning_rate", make_optimizer_command("reset_state", "host", learning_rate=0.1)),
    ("bad_learning_rate", make_optimizer_command("register_teacher", learning_rate=0.1)),
    # optimizer grad_clip_norm: [0, 1e6], 0 = no clipping, on a STEP only
    (None, optimizer_step(grad_clip_norm=0.0)),
    (None, optimizer_step(grad_clip_norm=MAX_GRAD_CLIP_NORM)),
    ("bad_grad_clip_norm", optimizer_step(grad_clip_norm=-F32_TINY)),
    ("bad_grad_clip_norm", optimizer_step(grad_clip_norm=f32_up(MAX_GRAD_CLIP_NORM))),
    ("bad_grad_clip_norm", optimizer_step(grad_clip_norm=math.inf)),
    ("bad_grad_clip_norm", optimizer(grad_clip_norm=1.0)),
    ("bad_grad_clip_norm", make_optimizer_command("reset_state", "host", grad_clip_norm=1.0)),
    # optimizer parameters (creation options)
    (None, optimizer(parameters={"weight_decay": 0.0, "momentum": 0.0, "dampening": 0.0})),
    (None, optimizer(parameters={"weight_decay": 1.0, "dampening": 1.0, "eps": 1.0})),
    (None, optimizer(parameters={"beta1": 0.0, "beta2": 0.0, "eps": TINY})),
    (None, optimizer(parameters={m: math.nextafter(1.0, 0.0) for m in ("momentum", "beta1")})),
    (None, optimizer(parameters={"beta2": math.nextafter(1.0, 0.0)})),
    ("bad_weight_decay", optimizer(parameters={"weight_decay": -TINY})),
    ("bad_weight_decay", optimizer(parameters={"weight_decay": math.nextafter(1.0, UP)})),
    ("bad_dampening", optimizer(parameters={"dampening": -TINY})),
    ("bad_dampening", optimizer(parameters={"dampening": math.nextafter(1.0, UP)})),
    ("bad_momentum", optimizer(parameters={"momentum": -TINY})),
    ("bad_momentum", optimizer(parameters={"momentum": 1.0})),
    ("bad_beta1", optimizer(parameters={"beta1": -TINY})),
    ("bad_beta1", optimizer(parameters={"beta1": 1.0})),
    ("bad_beta2", optimizer(parameters={"beta2": -TINY})),
    ("bad_beta2", optimizer(parameters={"beta2": 1.0})),
    ("bad_eps", optimizer(parameters={"eps": 0.0})),
    ("bad_eps", optimizer(parameters={"eps": math.nextafter(1.0, UP)})),
    ("unknown_parameter", optimizer(parameters={"lr": 0.1})),
    ("unknown_parameter", optimizer(parameters={"maximize": 1.0})),
    (None, make_optimizer_command("create_seed", "s0", parameters={"momentum": 0.5})),
    # creation options on a command that creates nothing
    ("unknown_parameter", optimizer_step(parameters={"momentum": 0.5})),
    ("unknown_parameter", make_optimizer_command("reset_state", parameters={"eps": 0.1})),
    ("unknown_parameter", make_optimizer_command("register_teacher", parameters={"eps": 0.1})),
    ("non_finite_parameter", optimizer(parameters={"lr": math.nan})),
]


@pytest.mark.parametrize(("reason", "cmd"), RANGE_CASES)
def test_every_numeric_field_is_range_checked_before_execution(
    rig: Rig, reason: str | None, cmd: AdaptationCommand
) -> None:
    accepted = rig.handler.handle_adaptation_command(rig.sign(cmd))
    if reason is None:
        assert accepted is True and rig.reasons() == []
        assert len(rig.executor.commands) == 1
    else:
        assert accepted is False
        assert rig.reasons() == [reason]
        assert rig.handler.stats[f"rejected:{reason}"] == 1
        assert not rig.executor.commands


def test_an_int32_target_epoch_cannot_exceed_the_range_on_the_wire() -> None:
    with pytest.raises(ValueError):
        make_rollback_command(MAX_EPOCH + 1)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "malformed"),
        ("text", "malformed"),
        (12, "malformed"),
        (b"\xff\xff\xff", "malformed"),
        (b"", "missing_metadata"),
        (b"\x00" * (64 * 1024 + 1), "oversize"),
    ],
)
def test_non_command_inputs_are_rejected(rig: Rig, raw, reason: str) -> None:
    assert rig.handler.handle_adaptation_command(raw) is False
    assert rig.reasons() == [reason]


def test_a_message_object_is_refused_with_the_remedy(rig: Rig, caplog) -> None:
    """Passing the message instead of its bytes is refused (the call never raises) and the
    log says what to pass: "malformed" alone left a caller guessing."""
    cmd = germinate()
    sign_command(cmd, rig.keyring, "ctl", timestamp=T0)
    with caplog.at_level(logging.DEBUG, logger="kasmina.control.handler"):  # rate-limited
        assert rig.handler.handle_adaptation_command(cmd) is False
    assert rig.reasons() == ["malformed"]
    assert "not AdaptationCommand (call SerializeToString()" in caplog.text
    assert rig.handler.handle_adaptation_command(cmd.SerializeToString()) is True


def test_stale_future_wrong_key_and_unsigned_are_rejected(rig: Rig) -> None:
    stale = germinate()
    sign_command(stale, rig.keyring, "ctl", timestamp=T0 - 120)
    future = germinate()
    sign_command(future, rig.keyring, "ctl", timestamp=T0 + 120)
    forged = germinate()
    sign_command(forged, Keyring({"ctl": bytes(32)}), "ctl", timestamp=T0)
    unknown = germinate()
    sign_command(unknown, Keyring({"other": KEY}), "other", timestamp=T0)
    unsigned = germinate()
    for cmd in (stale, future, forged, unknown, unsigned):
        assert rig.handler.handle_adaptation_command(cmd.SerializeToString()) is False
    assert rig.reasons() == [
        "stale",
        "future",
        "bad_signature",
        "unknown_key_id",
        "missing_metadata",
    ]
    assert not rig.executor.commands


# --- tampering and fuzzing ---------------------------------------------------------------------


def _signed_samples(rig: Rig) -> list[bytes]:
    full = make_seed_command(
        "cull", "layer1:0", "artifact-x", {"embargo_epochs": 3.0}, 1.5, command_id="c"
    )
    return [
        rig.sign(full),
        rig.sign(make_rollback_command(12, True, "spike")),
        rig.sign(make_optimizer_command("step", "host", grad_clip_norm=1.0, learning_rate=0.1)),
    ]


def test_every_single_byte_change_is_rejected(rig: Rig) -> None:
    samples = _signed_samples(rig)
    tried = 0
    for raw in samples:
        for pos in range(len(raw)):
            for pattern in (0x01, 0x80, 0xFF):
                mutated = bytearray(raw)
                mutated[pos] ^= pattern
                assert rig.handler.handle_adaptation_command(bytes(mutated)) is False, (
                    pos,
                    pattern,
                )
                tried += 1
        for cut in range(len(raw)):  # every truncation too
            assert rig.handler.handle_adaptation_command(raw[:cut]) is False
    assert tried == 3 * sum(len(r) for r in samples)
    assert not rig.executor.commands
    # The forgeries consumed no nonce: the untouched originals are still accepted, once.
    assert all(rig.handler.handle_adaptation_command(raw) for raw in samples)
    assert len(rig.executor.commands) == len(samples)


FUZZ = settings(
    max_examples=5_000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_FUZZ_RIG = Rig()
_FUZZ_ORIGINALS = _signed_samples(_FUZZ_RIG)
# Executed once up front, so that a mutation decoding to the same command is a replay.
assert all(_FUZZ_RIG.handler.handle_adaptation_command(raw) for raw in _FUZZ_ORIGINALS)


@FUZZ
@given(raw=st.binary(max_size=512))
def test_fuzz_arbitrary_bytes_never_execute(raw: bytes) -> None:
    executed = len(_FUZZ_RIG.executor.commands)
    assert _FUZZ_RIG.handler.handle_adaptation_command(raw) is False
    assert len(_FUZZ_RIG.executor.commands) == executed


def mutate(raw: bytes, seed: int) -> bytes:
    """1-6 random edits (flip, overwrite, insert, delete) of ``raw``; one draw keeps it fast."""
    rng = random.Random(seed)
    data = bytearray(raw)
    for _ in range(rng.randint(1, 6)):
        pos = rng.randint(0, len(data))
        op = rng.choice(("flip", "set", "insert", "delete"))
        if op == "insert":
            data[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif pos < len(data):
            if op == "flip":
                data[pos] ^= rng.randint(1, 255)
            elif op == "set":
                data[pos] = rng.randint(0, 255)
            else:
                del data[pos : pos + rng.randint(1, 8)]
    return bytes(data)


def mutated_commands() -> st.SearchStrategy[bytes]:
    return st.builds(mutate, st.sampled_from(_FUZZ_ORIGINALS), st.integers(0, 2**32 - 1))


@FUZZ
@given(raw=mutated_commands())
def test_fuzz_mutated_signed_commands_never_execute(raw: bytes) -> None:
    executed = len(_FUZZ_RIG.executor.commands)
    assert _FUZZ_RIG.handler.handle_adaptation_command(raw) is False
    assert len(_FUZZ_RIG.executor.commands) == executed


# --- the converted command ----------------------------------------------------------------------


def test_the_fast_constructors_build_the_same_frozen_dataclasses() -> None:
    """The handler builds commands through the slot setters (no per-field name lookup): the
    result must be the dataclass ``__init__`` would build, every field set, and frozen."""
    action = _seed(GERMINATE, "layer2:5", "artifact-9", {"learning_rate": 0.5})
    assert action == SeedAction(GERMINATE, "layer2:5", "artifact-9", {"learning_rate": 0.5})
    command = _command("c", "seed", 2, 2.5, action, None, None, 7.5)
    assert command == KasminaCommand("c", "seed", 2, 2.5, seed=action, issued_at=7.5)
    assert repr(command) == repr(KasminaCommand("c", "seed", 2, 2.5, seed=action, issued_at=7.5))
    assert all(hasattr(command, f.name) for f in dataclasses.fields(KasminaCommand))
    with pytest.raises(dataclasses.FrozenInstanceError):
        command.kind = "rollback"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        action.seed_id = "other"  # type: ignore[misc]
    # A field the fast constructor does not know about is caught when the module loads.
    with pytest.raises(TypeError, match="fields"):
        _field_setters(KasminaCommand, ("command_id", "kind"))


# --- command builders --------------------------------------------------------------------------


def test_builders_validate_their_inputs() -> None:
    with pytest.raises(ValueError):
        make_seed_command("germinate", "s", "a", timeout_s=0)
    with pytest.raises(ValueError):
        make_seed_command("germinate", "s", "a", timeout_s=math.nan)
    with pytest.raises(ValueError):
        make_seed_command("explode", "s")
    with pytest.raises(ValueError):
        make_optimizer_command("warp")
    cmd = make_seed_command(SeedOperation.SEED_OPERATION_ADVANCE, "s", timeout_s=0.25)
    assert cmd.seed_command.operation == SeedOperation.SEED_OPERATION_ADVANCE
    assert (cmd.timeout.seconds, cmd.timeout.nanos) == (0, 250_000_000)
    assert cmd.command_id and cmd.command_id != make_rollback_command(0).command_id
    assert not cmd.HasField("metadata")


# --- bounded reporting of rejections -----------------------------------------------------------


def test_rejections_are_counted_exactly_and_reported_once_per_interval(caplog) -> None:
    """20,000 forgeries over 20 s of (fake) time with a 5 s interval: every one counted, the
    first reported at once, then one aggregated report per interval carrying the count."""
    mono = [0.0]
    rig = Rig()
    handler = LeylineAdaptationHandler(
        rig.verifier,
        rig.executor,
        rig.handler.telemetry,
        rejection_report_interval_s=5.0,
        clock=lambda: mono[0],
    )
    cmd = germinate()
    sign_command(cmd, Keyring({"ctl": bytes(32)}), "ctl", timestamp=T0)
    forged = cmd.SerializeToString()
    with caplog.at_level(logging.DEBUG, logger="kasmina.control.handler"):
        for i in range(20_000):
            mono[0] = i * 1e-3
            assert handler.handle_adaptation_command(forged) is False
        handler.flush_rejections()  # nothing due yet: the last report was under 5 s ago
        reported = len(rig.sink.events("command.rejected"))
        mono[0] += 5.0
        handler.flush_rejections()  # the tail of the flood, now due
    assert handler.stats["rejected:bad_signature"] == 20_000 == handler.stats["rejected"]
    values = [m.value for m in rig.sink.events("command.rejected")]
    assert reported == 4 and len(values) == 5  # t=0 (the first), 5, 10, 15; then the tail
    assert values[0] == 1.0 and sum(values) == 20_000.0
    assert len(caplog.records) == 5
    assert "bad_signature" in caplog.records[-1].getMessage()
    assert "20000 in all" in caplog.records[-1].getMessage()
    handler.flush_rejections(force=True)  # nothing pending: nothing reported
    assert len(rig.sink.events("command.rejected")) == 5


def test_stats_read_on_another_thread_are_one_moments_copy(rig: Rig) -> None:
    """An exporter walking ``stats`` while a command of a new rejection reason arrived (on the
    controller's thread) raised "dictionary changed size during iteration"; a read is a copy
    taken under the counters' lock now, which later commands leave as it was."""
    assert rig.handler.handle_adaptation_command(rig.sign(germinate()))
    seen = rig.handler.stats
    for key in rig.handler.stats:  # the walk; a rejection of a new reason lands inside it
        if key == "accepted":
            assert rig.handler.handle_adaptation_command(b"\xff not a command") is False
    assert "rejected:malformed" not in seen and seen["accepted"] == seen["executed"] == 1
    assert rig.handler.stats["rejected:malformed"] == 1 == rig.handler.stats["rejected"]


def test_each_reason_is_reported_on_its_own_schedule() -> None:
    mono = [0.0]
    rig = Rig()
    handler = LeylineAdaptationHandler(
        rig.verifier, rig.executor, rig.handler.telemetry, clock=lambda: mono[0]
    )
    for raw in (b"\xff", b"\xff", b"", b"", b"\xff"):
        handler.handle_adaptation_command(raw)
    assert rig.reasons() == ["malformed", "missing_metadata"]  # each first one, at once
    handler.flush_rejections(force=True)
    events = rig.sink.events("command.rejected")
    assert [(m.labels["reason"], m.value) for m in events[2:]] == [
        ("malformed", 2.0),
        ("missing_metadata", 1.0),
    ]


@pytest.mark.parametrize("interval", [0, -1.0, float("nan"), float("inf"), 86_401.0])
def test_the_report_interval_is_bounded(interval: float) -> None:
    with pytest.raises(ValueError, match=r"\(0, 86400\]"):
        LeylineAdaptationHandler(
            CommandVerifier(Keyring({"ctl": KEY})),
            RecordingExecutor(),
            rejection_report_interval_s=interval,
        )


@pytest.mark.parametrize("limit", [0, -1, float("nan"), float("inf"), 65536.0, True, "65536"])
def test_the_message_size_bound_is_a_positive_int(limit: object) -> None:
    """A NaN or infinite ``max_message_bytes`` compared False against every size: the bound was
    silently gone, and a message of any size reached the parser."""
    verifier = CommandVerifier(Keyring({"ctl": KEY}))
    with pytest.raises(ValueError, match="max_message_bytes must be an int >= 1"):
        LeylineAdaptationHandler(verifier, RecordingExecutor(), max_message_bytes=limit)  # type: ignore[arg-type]
    handler = LeylineAdaptationHandler(verifier, RecordingExecutor(), max_message_bytes=8)
    with pytest.raises(ValueError, match="max_message_bytes"):
        handler.max_message_bytes = limit  # type: ignore[assignment]
    assert handler.max_message_bytes == 8
    assert handler.handle_adaptation_command(bytes(9)) is False
    assert handler.stats["rejected:oversize"] == 1


def test_ids_and_reasons_at_their_bounds_are_accepted(rig: Rig) -> None:
    """Just inside every bound of the strings: 256-character ids, a 1,024-character rollback
    reason, printable non-ASCII text (an id is any printable text, not ASCII only)."""
    cmd = germinate()
    cmd.command_id, cmd.seed_command.seed_id = "c" * 256, "s" * 256
    cmd.seed_command.kernel_artifact_id = "a" * 256
    rollback = make_rollback_command(1, reason="r" * 1023 + "é")
    optimizer = make_optimizer_command("step", "Ω" * 256)
    for accepted in (cmd, rollback, optimizer):
        assert rig.handler.handle_adaptation_command(rig.sign(accepted)) is True
    assert rig.reasons() == []
