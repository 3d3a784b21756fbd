"""Signed Leyline command handling: bytes in, verified and validated command executed, bool out.

``LeylineAdaptationHandler.handle_adaptation_command`` is the one door through which a
controller changes a running model, so it is strict and total: parse -> signature -> freshness
-> nonce -> semantic validation -> execute, and any failure is a ``False`` with a reason
counter and a ``command.rejected`` telemetry event. No exception escapes, whatever the bytes.

The handler does not import the kernel manager; it is handed a ``CommandExecutor``.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from google.protobuf.duration_pb2 import Duration

from kasmina.leyline import (
    AdaptationCommand,
    CommandType,
    MessagePriority,
    OptimizerCommand,
    SeedCommand,
    SeedOperation,
)

logger = logging.getLogger(__name__)

__all__ = [
    "COMMAND_KINDS",
    "CommandExecutor",
    "KasminaCommand",
    "RollbackAction",
    "SeedAction",
    "make_optimizer_command",
    "make_rollback_command",
    "make_seed_command",
    "to_kasmina_command",
]

MAX_ID_CHARS = 256
_SEED_OPERATIONS = frozenset(v for v in SeedOperation.values() if v != 0)
_OPTIMIZER_COMMANDS = frozenset(v for v in CommandType.values() if v != 0)
_PRIORITIES = frozenset(MessagePriority.values())
_GERMINATE = SeedOperation.SEED_OPERATION_GERMINATE
_CULL = SeedOperation.SEED_OPERATION_CULL
_CREATE_SEED = CommandType.COMMAND_TYPE_CREATE_SEED
_MAX_DURATION_S = 315_576_000_000  # protobuf Duration's valid range
COMMAND_KINDS = ("seed", "rollback", "optimizer")


@dataclass(frozen=True, slots=True)
class SeedAction:
    operation: int  # a leyline SeedOperation value
    seed_id: str
    artifact_id: str
    parameters: dict[str, float]


@dataclass(frozen=True, slots=True)
class RollbackAction:
    target_epoch: int
    emergency: bool
    reason: str


@dataclass(frozen=True, slots=True)
class KasminaCommand:
    """A verified, validated command in Kasmina's own terms; exactly one payload is set."""

    command_id: str
    kind: str  # "seed" | "rollback" | "optimizer"
    priority: int
    timeout_s: float
    seed: SeedAction | None = None
    rollback: RollbackAction | None = None
    optimizer: OptimizerCommand | None = None


@runtime_checkable
class CommandExecutor(Protocol):
    """Carries out a command (the kernel manager implements this); returns success."""

    def execute(self, command: KasminaCommand) -> bool: ...


def _finite_params(params: Mapping[str, float]) -> bool:
    return all(math.isfinite(v) for v in params.values())


def to_kasmina_command(cmd: AdaptationCommand) -> KasminaCommand | str:
    """Validate an authenticated command and convert it; returns a rejection reason if invalid.

    Validation and conversion share one pass so that each protobuf field is read once on the
    hot path. Nothing is deep-copied: an optimizer payload is the parsed sub-message itself.
    """
    command_id = cmd.command_id
    if not command_id or len(command_id) > MAX_ID_CHARS:
        return "bad_command_id"
    priority = cmd.priority
    if priority not in _PRIORITIES:
        return "unknown_priority"
    if not cmd.HasField("timeout"):
        return "missing_timeout"
    timeout = cmd.timeout
    seconds, nanos = timeout.seconds, timeout.nanos
    if not (0 <= nanos <= 999_999_999 and 0 <= seconds <= _MAX_DURATION_S) or (
        seconds == 0 and nanos == 0
    ):
        return "bad_timeout"
    timeout_s = seconds + nanos * 1e-9

    kind = cmd.WhichOneof("command")
    if kind == "seed_command":
        action = _seed_action(cmd.seed_command)
        if isinstance(action, str):
            return action
        return KasminaCommand(command_id, "seed", priority, timeout_s, seed=action)
    if kind == "rollback_command":
        r = cmd.rollback_command
        if r.target_epoch < 0:
            return "bad_target_epoch"
        rollback = RollbackAction(r.target_epoch, r.emergency, r.reason)
        return KasminaCommand(command_id, "rollback", priority, timeout_s, rollback=rollback)
    if kind == "optimizer_command":
        opt = cmd.optimizer_command
        reason = _optimizer_problem(opt)
        if reason is not None:
            return reason
        return KasminaCommand(command_id, "optimizer", priority, timeout_s, optimizer=opt)
    return "no_command"


def _seed_action(seed: SeedCommand) -> SeedAction | str:
    op = seed.operation
    if op not in _SEED_OPERATIONS:
        return "unknown_operation"
    seed_id = seed.seed_id
    if not seed_id or len(seed_id) > MAX_ID_CHARS:
        return "bad_seed_id"
    artifact_id = seed.kernel_artifact_id
    if len(artifact_id) > MAX_ID_CHARS:
        return "bad_artifact_id"
    if op == _GERMINATE and not artifact_id:
        return "missing_artifact_id"
    params: dict[str, float] = {}
    if seed.parameters:
        params = dict(seed.parameters)
        if not _finite_params(params):
            return "non_finite_parameter"
        embargo = params.get("embargo_epochs")
        if op == _CULL and embargo is not None and (embargo < 0 or embargo != int(embargo)):
            return "bad_embargo_epochs"
    return SeedAction(op, seed_id, artifact_id, params)


def _optimizer_problem(opt: OptimizerCommand) -> str | None:
    if opt.command_type not in _OPTIMIZER_COMMANDS:
        return "unknown_optimizer_command"
    if opt.command_type == _CREATE_SEED and not opt.optimizer_id:
        return "missing_optimizer_id"
    if not (math.isfinite(opt.grad_clip_norm) and opt.grad_clip_norm >= 0):
        return "bad_grad_clip_norm"
    if not (math.isfinite(opt.learning_rate) and opt.learning_rate >= 0):
        return "bad_learning_rate"
    if opt.parameters and not _finite_params(opt.parameters):
        return "non_finite_parameter"
    return None


def _duration(timeout_s: float) -> Duration:
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be positive and finite, got {timeout_s}")
    duration = Duration()
    duration.FromNanoseconds(round(timeout_s * 1e9))
    return duration


def _new_command(command_id: str | None, priority: int, timeout_s: float) -> AdaptationCommand:
    return AdaptationCommand(
        command_id=command_id or uuid.uuid4().hex,
        priority=priority,
        timeout=_duration(timeout_s),
    )


def _seed_operation(operation: int | str) -> int:
    if isinstance(operation, str):
        name = operation.upper()
        if not name.startswith("SEED_OPERATION_"):
            name = "SEED_OPERATION_" + name
        return SeedOperation.Value(name)
    return int(operation)


def make_seed_command(
    operation: int | str,
    seed_id: str,
    artifact_id: str = "",
    parameters: Mapping[str, float] | None = None,
    timeout_s: float = 5.0,
    *,
    priority: int = MessagePriority.MESSAGE_PRIORITY_NORMAL,
    command_id: str | None = None,
) -> AdaptationCommand:
    """An unsigned seed command; ``operation`` is a SeedOperation value or name ("germinate")."""
    cmd = _new_command(command_id, priority, timeout_s)
    seed = cmd.seed_command
    seed.operation = _seed_operation(operation)
    seed.seed_id = seed_id
    seed.kernel_artifact_id = artifact_id
    if parameters:
        seed.parameters.update(parameters)
    return cmd


def make_rollback_command(
    target_epoch: int,
    emergency: bool = False,
    reason: str = "",
    timeout_s: float = 5.0,
    *,
    priority: int = MessagePriority.MESSAGE_PRIORITY_HIGH,
    command_id: str | None = None,
) -> AdaptationCommand:
    """An unsigned rollback command to the checkpoint of ``target_epoch``."""
    cmd = _new_command(command_id, priority, timeout_s)
    rollback = cmd.rollback_command
    rollback.target_epoch = target_epoch
    rollback.emergency = emergency
    rollback.reason = reason
    return cmd


def make_optimizer_command(
    command_type: int | str,
    optimizer_id: str = "",
    *,
    grad_clip_norm: float = 0.0,
    learning_rate: float = 0.0,
    parameters: Mapping[str, float] | None = None,
    timeout_s: float = 5.0,
    priority: int = MessagePriority.MESSAGE_PRIORITY_NORMAL,
    command_id: str | None = None,
) -> AdaptationCommand:
    """An unsigned optimizer command; ``command_type`` is a CommandType value or name ("step")."""
    if isinstance(command_type, str):
        name = command_type.upper()
        command_type = CommandType.Value(
            name if name.startswith("COMMAND_TYPE_") else "COMMAND_TYPE_" + name
        )
    cmd = _new_command(command_id, priority, timeout_s)
    opt = cmd.optimizer_command
    opt.command_type = command_type
    opt.optimizer_id = optimizer_id
    opt.grad_clip_norm = grad_clip_norm
    opt.learning_rate = learning_rate
    if parameters:
        opt.parameters.update(parameters)
    return cmd
