"""Signed Leyline command handling: bytes in, verified and validated command executed, bool out.

``LeylineAdaptationHandler.handle_adaptation_command`` is the one door through which a
controller changes a running model, so it is strict and total: parse -> signature -> freshness
-> nonce -> semantic validation -> execute, and any failure is a ``False`` with a reason
counter and a ``command.rejected`` telemetry event. No exception escapes, whatever the bytes.

The handler does not import the kernel manager; it is handed a ``CommandExecutor``. The
builders a controller calls (``make_*_command``) are in ``builders``, which runs this module's
validation on each command it builds.

**Ranges.** Every numeric field of a command has a documented range, checked here before anything
executes, so that a signed but absurd value (a learning rate of 1e300, say) is refused at the
door rather than breaking the host's training step later. Each is refused with its own reason,
which the handler counts as ``rejected:<reason>`` (docs/design.md §5):

- ``timeout``: (0, ``MAX_TIMEOUT_S``] = (0, 3600] s, with valid Duration nanos -> ``bad_timeout``;
- seed ``parameters``: only the keys the operation uses are allowed, anything else is
  ``unknown_parameter``. GERMINATE ``learning_rate`` in (0, ``MAX_LEARNING_RATE``] = (0, 10]
  (``bad_learning_rate``); ADVANCE ``gate_score`` in [0, 1] (``bad_gate_score``); CULL
  ``embargo_epochs`` an integer in [0, ``MAX_EMBARGO_EPOCHS``] = [0, 2**31 - 1]
  (``bad_embargo_epochs``); TERMINATE takes no parameter;
- rollback ``target_epoch``: [0, ``MAX_EPOCH``] = [0, 2**31 - 1] -> ``bad_target_epoch``. A
  proto3 ``int32`` has no presence: a controller that leaves it unset asks for epoch 0, so the
  command builders take it as a required argument. Its ``reason`` at most ``MAX_REASON_CHARS``
  printable characters -> ``bad_reason``;
- ids (command, seed, artifact, optimizer): at most ``MAX_ID_CHARS`` printable characters (no
  newline, escape or other control character, which would forge log lines) -> ``bad_<id>``;
- optimizer ``learning_rate``: 0 (unset: keep the current lr / the default on creation) or
  (0, ``MAX_LEARNING_RATE``], and only on a creation or a STEP -> ``bad_learning_rate``;
- optimizer ``grad_clip_norm``: [0, ``MAX_GRAD_CLIP_NORM``] = [0, 1e6], 0 = no clipping, and
  only on a STEP -> ``bad_grad_clip_norm``;
- optimizer ``parameters`` (creation options, INITIALIZE_HOST and CREATE_SEED only): ``eps``
  in (0, 1], ``weight_decay``, ``dampening`` in [0, 1], ``momentum``, ``beta1``, ``beta2`` in [0,
  1) -> ``bad_<key>``; another key, or one on a command creating nothing: ``unknown_parameter``.

A NaN or infinite parameter value is ``non_finite_parameter`` whatever its key. A field this
version's schema does not know, at any depth (a newer controller's), is ``unknown_field``: the
signature covers it, so dropping it would obey another command than the one signed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

from kasmina.leyline import (
    AdaptationCommand,
    CommandType,
    MessagePriority,
    OptimizerCommand,
    SeedOperation,
)

logger = logging.getLogger(__name__)

__all__ = [
    "COMMAND_KINDS",
    "CommandExecutor",
    "KasminaCommand",
    "RollbackAction",
    "SeedAction",
    "accepted_parameters",
    "to_kasmina_command",
]

MAX_ID_CHARS = 256
# A rollback's free-text reason (logged at CRITICAL, kept in the command log) is bounded too.
MAX_REASON_CHARS = 1024
_SEED_OPERATIONS = frozenset(v for v in SeedOperation.values() if v != 0)
_OPTIMIZER_COMMANDS = frozenset(v for v in CommandType.values() if v != 0)
_PRIORITIES = frozenset(MessagePriority.values())
_GERMINATE = SeedOperation.SEED_OPERATION_GERMINATE
_CREATE_SEED = CommandType.COMMAND_TYPE_CREATE_SEED
_STEP = CommandType.COMMAND_TYPE_STEP
_CREATES = frozenset((CommandType.COMMAND_TYPE_INITIALIZE_HOST, _CREATE_SEED))
_SETS_LR = _CREATES | {_STEP}
COMMAND_KINDS = ("seed", "rollback", "optimizer")

# Longest timeout a command may carry, in whole seconds. Protobuf's Duration allows ~10,000
# years; no command needs more than an hour (the GERMINATE load is the slowest step).
MAX_TIMEOUT_S = 3600
# Largest learning rate any command may set (seed or optimizer); the lower end is exclusive.
MAX_LEARNING_RATE = 10.0
# Largest gradient-clipping norm an optimizer STEP may carry (0 means "do not clip").
MAX_GRAD_CLIP_NORM = 1e6
# Longest CULL embargo, in epochs: the state table keeps it in an int32 column.
MAX_EMBARGO_EPOCHS = 2**31 - 1
# Largest rollback epoch: the wire field is an int32 (checked anyway, should that ever change).
MAX_EPOCH = 2**31 - 1


@dataclass(frozen=True, slots=True)
class _Range:
    """A closed interval [lo, hi]; ``open_lo``/``open_hi`` exclude an end."""

    lo: float
    hi: float
    reason: str
    open_lo: bool = False
    open_hi: bool = False
    integer: bool = False

    def admits(self, value: float) -> bool:
        if not self.lo <= value <= self.hi:  # NaN fails this too
            return False
        if (self.open_lo and value == self.lo) or (self.open_hi and value == self.hi):
            return False
        return not self.integer or value == int(value)

    def describe(self) -> str:
        ends = "(" if self.open_lo else "[", ")" if self.open_hi else "]"
        kind = "an integer" if self.integer else "a number"
        return f"{kind} in {ends[0]}{self.lo}, {self.hi}{ends[1]}"


_LEARNING_RATE = _Range(0.0, MAX_LEARNING_RATE, "bad_learning_rate", open_lo=True)
_NO_PARAMETERS: dict[str, _Range] = {}
# Known seed parameter keys per operation; any other key is refused ("unknown_parameter").
_SEED_PARAMETERS: dict[int, dict[str, _Range]] = {
    SeedOperation.SEED_OPERATION_GERMINATE: {"learning_rate": _LEARNING_RATE},
    SeedOperation.SEED_OPERATION_ADVANCE: {"gate_score": _Range(0.0, 1.0, "bad_gate_score")},
    SeedOperation.SEED_OPERATION_CULL: {
        "embargo_epochs": _Range(0, MAX_EMBARGO_EPOCHS, "bad_embargo_epochs", integer=True)
    },
    SeedOperation.SEED_OPERATION_TERMINATE: {},
}
# Optimizer creation options a command may pass (``beta1``/``beta2`` become ``betas``).
_OPTIMIZER_PARAMETERS: dict[str, _Range] = {
    "weight_decay": _Range(0.0, 1.0, "bad_weight_decay"),
    "momentum": _Range(0.0, 1.0, "bad_momentum", open_hi=True),
    "dampening": _Range(0.0, 1.0, "bad_dampening"),
    "beta1": _Range(0.0, 1.0, "bad_beta1", open_hi=True),
    "beta2": _Range(0.0, 1.0, "bad_beta2", open_hi=True),
    "eps": _Range(0.0, 1.0, "bad_eps", open_lo=True),
}


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
    issued_at: float = 0.0  # its signed timestamp (s): which acceptance of its id it was


@runtime_checkable
class CommandExecutor(Protocol):
    """Carries out a command (the kernel manager implements this); returns success."""

    def execute(self, command: KasminaCommand) -> bool: ...


def _field_setters(cls: type, names: tuple[str, ...]) -> tuple[Callable[[Any, Any], None], ...]:
    """The slot setters of a frozen slotted dataclass, for ``names`` in field order.

    A frozen dataclass's ``__init__`` stores each field with ``object.__setattr__(self, name,
    value)``, which looks the slot up by name every time; on the command path that is a large
    part of the cost of building the command. The constructors below store through the slot
    descriptors directly: the same writes, so the instances are the same frozen dataclasses
    (equal to, and indistinguishable from, ones built by ``__init__``). The names are checked
    against the dataclass here, so a field added later cannot be silently left unset.
    """
    declared = tuple(f.name for f in fields(cls))
    if declared != names or getattr(cls, "__post_init__", None) is not None:
        raise TypeError(f"{cls.__name__}'s fields are {declared}, the fast constructor's {names}")
    return tuple(cls.__dict__[name].__set__ for name in names)


_new = object.__new__
_COMMAND_FIELDS = ("command_id", "kind", "priority", "timeout_s", "seed", "rollback", "optimizer")
_COMMAND_FIELDS += ("issued_at",)
_SEED_FIELDS = ("operation", "seed_id", "artifact_id", "parameters")
(_cmd_id, _cmd_kind, _cmd_priority, _cmd_timeout, _cmd_seed, _cmd_rollback, _cmd_optimizer,
 _cmd_issued) = _field_setters(KasminaCommand, _COMMAND_FIELDS)  # fmt: skip
_seed_op, _seed_id, _seed_artifact, _seed_parameters = _field_setters(SeedAction, _SEED_FIELDS)


def _command(
    command_id: str,
    kind: str,
    priority: int,
    timeout_s: float,
    seed: SeedAction | None,
    rollback: RollbackAction | None,
    optimizer: OptimizerCommand | None,
    issued_at: float,
) -> KasminaCommand:
    """``KasminaCommand(...)`` without the per-field name lookups (see ``_field_setters``)."""
    command = _new(KasminaCommand)
    _cmd_id(command, command_id)
    _cmd_kind(command, kind)
    _cmd_priority(command, priority)
    _cmd_timeout(command, timeout_s)
    _cmd_seed(command, seed)
    _cmd_rollback(command, rollback)
    _cmd_optimizer(command, optimizer)
    _cmd_issued(command, issued_at)
    return command


def _seed(
    operation: int, seed_id: str, artifact_id: str, parameters: dict[str, float]
) -> SeedAction:
    """``SeedAction(...)`` without the per-field name lookups (see ``_field_setters``)."""
    action = _new(SeedAction)
    _seed_op(action, operation)
    _seed_id(action, seed_id)
    _seed_artifact(action, artifact_id)
    _seed_parameters(action, parameters)
    return action


def _parameter_problem(params: Mapping[str, float], known: Mapping[str, _Range]) -> str | None:
    """The reason ``params`` is refused (non-finite, unknown key, out of range), or None."""
    if not all(math.isfinite(v) for v in params.values()):
        return "non_finite_parameter"
    for key, value in params.items():
        bound = known.get(key)
        if bound is None:
            return "unknown_parameter"
        if not bound.admits(value):
            return bound.reason
    return None


def _carries_unknown_fields(cmd: AdaptationCommand) -> bool:
    """Whether ``cmd`` holds a field, at any depth, that this version's schema does not know
    (a newer controller's). Protobuf keeps such fields, and the signature covers them, but the
    conversion below would silently drop them: a rollback "to step N" would run as one to
    epoch 0, a "dry run" for real. A command is obeyed whole or refused (about 2 us)."""
    known = AdaptationCommand()
    known.CopyFrom(cmd)
    known.DiscardUnknownFields()  # recursive: sub-messages and map entries too
    return known.ByteSize() != cmd.ByteSize()


def to_kasmina_command(cmd: AdaptationCommand) -> KasminaCommand | str:
    """Validate an authenticated command and convert it; returns a rejection reason if invalid.

    Validation reads the parsed message directly and conversion shares the pass, so each
    protobuf field is read once on the hot path and nothing is built before every check has
    passed. Nothing is deep-copied: an optimizer payload is the parsed sub-message itself.
    """
    if _carries_unknown_fields(cmd):
        return "unknown_field"
    command_id = cmd.command_id
    if not command_id or len(command_id) > MAX_ID_CHARS or not command_id.isprintable():
        return "bad_command_id"
    priority = cmd.priority
    if priority not in _PRIORITIES:
        return "unknown_priority"
    timeout = cmd.timeout
    seconds, nanos = timeout.seconds, timeout.nanos
    if not (0 < seconds < MAX_TIMEOUT_S and 0 <= nanos <= 999_999_999):
        # The rare cases, in full: unset, zero, the upper bound itself, out of range.
        if not cmd.HasField("timeout"):
            return "missing_timeout"
        if not (0 <= nanos <= 999_999_999 and 0 <= seconds <= MAX_TIMEOUT_S) or (
            (seconds == 0 and nanos == 0) or (seconds == MAX_TIMEOUT_S and nanos != 0)
        ):
            return "bad_timeout"
    timeout_s = seconds + nanos * 1e-9
    ts = cmd.metadata.timestamp  # as ``CommandVerifier.check`` reads it
    issued = ts.seconds + ts.nanos * 1e-9

    # One HasField per kind, most common first (cheaper than WhichOneof on this binding).
    if cmd.HasField("seed_command"):
        seed = cmd.seed_command
        op = seed.operation
        if op not in _SEED_OPERATIONS:
            return "unknown_operation"
        seed_id = seed.seed_id
        if not seed_id or len(seed_id) > MAX_ID_CHARS or not seed_id.isprintable():
            return "bad_seed_id"
        artifact_id = seed.kernel_artifact_id
        if len(artifact_id) > MAX_ID_CHARS or not artifact_id.isprintable():
            return "bad_artifact_id"
        if op == _GERMINATE and not artifact_id:
            return "missing_artifact_id"
        wire = seed.parameters
        params: dict[str, float] = {}
        if wire:
            params = dict(wire)
            reason = _parameter_problem(params, _SEED_PARAMETERS.get(op, _NO_PARAMETERS))
            if reason is not None:
                return reason
        action = _seed(op, seed_id, artifact_id, params)
        return _command(command_id, "seed", priority, timeout_s, action, None, None, issued)
    if cmd.HasField("rollback_command"):
        r = cmd.rollback_command
        target_epoch = r.target_epoch  # proto3: an unset epoch is epoch 0 (see the docstring)
        if not 0 <= target_epoch <= MAX_EPOCH:
            return "bad_target_epoch"
        reason = r.reason
        if len(reason) > MAX_REASON_CHARS or not reason.isprintable():
            return "bad_reason"
        rollback = RollbackAction(target_epoch, r.emergency, reason)
        return _command(command_id, "rollback", priority, timeout_s, None, rollback, None, issued)
    if cmd.HasField("optimizer_command"):
        opt = cmd.optimizer_command
        reason = _optimizer_problem(opt)
        if reason is not None:
            return reason
        return _command(command_id, "optimizer", priority, timeout_s, None, None, opt, issued)
    return "no_command"


def _optimizer_problem(opt: OptimizerCommand) -> str | None:
    if opt.command_type not in _OPTIMIZER_COMMANDS:
        return "unknown_optimizer_command"
    if opt.command_type == _CREATE_SEED and not opt.optimizer_id:
        return "missing_optimizer_id"
    if len(opt.optimizer_id) > MAX_ID_CHARS or not opt.optimizer_id.isprintable():
        return "bad_optimizer_id"
    clip = opt.grad_clip_norm  # NaN fails every comparison, so it is refused too
    if not 0.0 <= clip <= MAX_GRAD_CLIP_NORM or (clip and opt.command_type != _STEP):
        return "bad_grad_clip_norm"  # only a STEP clips
    lr = opt.learning_rate  # 0 means unset: keep the lr (STEP) or take the default (creation)
    if not (lr == 0.0 or _LEARNING_RATE.admits(lr)) or (lr and opt.command_type not in _SETS_LR):
        return "bad_learning_rate"
    if opt.parameters:
        return _parameter_problem(opt.parameters, _optimizer_parameters(opt.command_type))
    return None


def _optimizer_parameters(command_type: int) -> Mapping[str, _Range]:
    """The creation options ``command_type`` takes: a command that creates nothing takes none."""
    return _OPTIMIZER_PARAMETERS if command_type in _CREATES else _NO_PARAMETERS


def accepted_parameters(cmd: AdaptationCommand) -> Mapping[str, _Range]:
    """The parameter keys ``cmd``'s seed operation or optimizer command takes, with their
    ranges, as ``to_kasmina_command`` checks them (the builders name them in their errors)."""
    if cmd.HasField("seed_command"):
        return _SEED_PARAMETERS.get(cmd.seed_command.operation, _NO_PARAMETERS)
    return _optimizer_parameters(cmd.optimizer_command.command_type)
