"""Signed Leyline command handling: bytes in, verified and validated command executed, bool out.

``LeylineAdaptationHandler.handle_adaptation_command`` is the one door through which a
controller changes a running model, so it is strict and total: parse -> signature -> freshness
-> nonce -> semantic validation -> execute, and any failure is a ``False`` with a reason
counter and a ``command.rejected`` telemetry event. No exception escapes, whatever the bytes.

The handler does not import the kernel manager; it is handed a ``CommandExecutor``.

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
import reprlib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from google.protobuf.duration_pb2 import Duration

from kasmina.leyline import (
    AdaptationCommand,
    CommandType,
    MessagePriority,
    OptimizerCommand,
    SeedOperation,
)

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

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


# --- builders -----------------------------------------------------------------------------------
# A wrong argument is a TypeError or ValueError naming it, what was given and what is allowed.
# ``validate=True`` also runs the trainer's own validation (``to_kasmina_command``) on the built
# message, so a command the trainer would refuse fails where it is built, with the trainer's
# reason: the rules live only there. ``_ALLOWED`` puts them in words for the errors.


def _prefix(enum: EnumTypeWrapper) -> str:
    return enum.keys()[0].removesuffix("UNSPECIFIED")  # "SEED_OPERATION_"


def _names(enum: EnumTypeWrapper) -> str:
    """What ``_enum`` takes for ``enum``: a value, or a name without the prefix."""
    names = ", ".join(repr(n.removeprefix(_prefix(enum)).lower()) for n in enum.keys()[1:])
    return f"a {enum.DESCRIPTOR.name} value or one of {names}"


_ID = f"a str of at most {MAX_ID_CHARS} printable characters"
_ALLOWED = {
    "operation": _names(SeedOperation),
    "command_type": _names(CommandType),
    "priority": _names(MessagePriority),
    "command_id": f"None (a fresh id) or {_ID}",
    "seed_id": f"{_ID}, not empty",
    "artifact_id": f"{_ID}, not empty for GERMINATE",
    "optimizer_id": f"{_ID}, not empty for CREATE_SEED",
    "reason": f"a str of at most {MAX_REASON_CHARS} printable characters",
    "target_epoch": f"an int in [0, {MAX_EPOCH}]",
    "emergency": "a bool",
    "timeout_s": f"a number of seconds in (0, {MAX_TIMEOUT_S}]",
    "learning_rate": f"0 (unset) or a number in (0, {MAX_LEARNING_RATE}], and 0 unless the "
    "command creates an optimizer or is a STEP",
    "grad_clip_norm": f"a number in [0, {MAX_GRAD_CLIP_NORM:g}] (0: no clipping), and 0 "
    "unless the command is a STEP",
    "parameters": "None or a mapping of str to finite numbers",
}
# The argument a rejection reason is about, where "bad_<argument>" does not say it.
_ARGUMENT_OF = {
    "bad_timeout": "timeout_s",
    "unknown_optimizer_command": "command_type",
    "unknown_parameter": "parameters",
    "non_finite_parameter": "parameters",
}


def _invalid(
    kind: type[Exception], argument: str, value: object, allowed: str = "", note: str = ""
) -> Exception:
    shown = reprlib.repr(value)
    if kind is TypeError:
        shown = f"{type(value).__name__} {shown}"
    return kind(f"{argument} must be {allowed or _ALLOWED[argument]}, got {shown}{note}")


def _set(message: Any, field: str, value: object, argument: str) -> None:
    """``message.field = value``, with protobuf's type and range errors naming ``argument``.
    Protobuf takes ``True`` for a number and ``2`` for a bool: both are refused here."""
    if isinstance(value, bool) != (argument == "emergency"):
        raise _invalid(TypeError, argument, value)
    try:
        setattr(message, field, value)
    except (TypeError, ValueError, OverflowError) as exc:  # 10**400; a lone surrogate
        raise _invalid(_kind(exc), argument, value) from None
    if value and getattr(message, field) == 0:  # a float32 field: 1e-46 would read as 0, unset
        raise _invalid(ValueError, argument, value, note=" (it rounds to 0 in the wire's float32)")


def _set_parameters(target: Any, parameters: Mapping[str, float] | None) -> None:
    if parameters is None:
        return
    if not isinstance(parameters, Mapping):
        raise _invalid(TypeError, "parameters", parameters)
    for key, value in parameters.items():
        if isinstance(value, bool):  # protobuf would store 1.0
            raise _invalid(TypeError, f"parameters[{key!r}]", value, "a number")
    try:
        target.update(parameters)  # one update: entry by entry would change the wire order
    except (TypeError, ValueError, OverflowError):  # protobuf does not say which entry: find it
        for key, value in parameters.items():
            if not isinstance(key, str) or not _encodable(key):  # a lone surrogate is no text
                raise _invalid(TypeError, "a key of parameters", key, "a str") from None
            try:
                target[key] = value
            except (TypeError, ValueError, OverflowError) as exc:
                raise _invalid(_kind(exc), f"parameters[{key!r}]", value, "a number") from None
        raise


def _kind(exc: Exception) -> type[Exception]:
    """The builders' exception for protobuf's ``exc``: a wrong type stays a TypeError, the rest
    (a value out of range, 10**400's OverflowError, a lone surrogate) is a ValueError."""
    return TypeError if isinstance(exc, TypeError) else ValueError


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _enum(enum: EnumTypeWrapper, value: int | str, argument: str) -> int:
    """A value of ``enum``: an int as it is, or a name ("germinate", any case, prefix optional)."""
    if isinstance(value, str):
        name = value.upper()
        if not name.startswith(_prefix(enum)):
            name = _prefix(enum) + name
        if name not in enum.keys():
            raise _invalid(ValueError, argument, value)
        return enum.Value(name)
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise _invalid(TypeError, argument, value)
    return value


def _known_parameters(cmd: AdaptationCommand) -> Mapping[str, _Range]:
    if cmd.HasField("seed_command"):
        return _SEED_PARAMETERS.get(cmd.seed_command.operation, _NO_PARAMETERS)
    return _optimizer_parameters(cmd.optimizer_command.command_type)


def _checked(cmd: AdaptationCommand, given: Mapping[str, Any], validate: bool) -> AdaptationCommand:
    """``cmd``, after ``to_kasmina_command`` if ``validate``: a reason it gives for refusing the
    command is raised as a ValueError naming the argument (``given``: the builder's arguments)."""
    reason = to_kasmina_command(cmd) if validate else None
    if not isinstance(reason, str):
        return cmd
    note = f" (the trainer refuses it as {reason!r})"
    argument = _ARGUMENT_OF.get(reason) or reason.partition("_")[2]
    if argument == "parameters":
        known = sorted(_known_parameters(cmd))
        allowed = f"finite numbers keyed by {known}" if known else "empty for this command"
        raise _invalid(ValueError, argument, given[argument], allowed, note)
    if argument in given:
        raise _invalid(ValueError, argument, given[argument], note=note)
    bound = _known_parameters(cmd).get(argument)  # "bad_<key>": a parameter out of its range
    if bound is None:  # no argument's fault (a builder does not build such a command)
        raise ValueError(f"the trainer refuses this command as {reason!r}")
    value = given["parameters"][argument]
    raise _invalid(ValueError, f"parameters[{argument!r}]", value, bound.describe(), note)


def _duration(timeout_s: float) -> Duration:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, Real):
        raise _invalid(TypeError, "timeout_s", timeout_s)
    try:
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError
        duration = Duration()
        duration.FromNanoseconds(round(timeout_s * 1e9))
    except (ValueError, OverflowError):  # not positive and finite, beyond a Duration, 1e300
        raise _invalid(ValueError, "timeout_s", timeout_s) from None
    return duration


def _new_command(command_id: str | None, priority: int | str, timeout: float) -> AdaptationCommand:
    cmd = AdaptationCommand(timeout=_duration(timeout))
    _set(cmd, "command_id", command_id or uuid.uuid4().hex, "command_id")
    _set(cmd, "priority", _enum(MessagePriority, priority, "priority"), "priority")
    return cmd


def make_seed_command(
    operation: int | str,
    seed_id: str,
    artifact_id: str = "",
    parameters: Mapping[str, float] | None = None,
    timeout_s: float = 5.0,
    *,
    priority: int | str = MessagePriority.MESSAGE_PRIORITY_NORMAL,
    command_id: str | None = None,
    validate: bool = True,
) -> AdaptationCommand:
    """An unsigned seed command; ``operation`` is a SeedOperation value or name ("germinate").

    ``validate``: raise ValueError if the trainer would refuse the command (see ``_checked``)."""
    cmd = _new_command(command_id, priority, timeout_s)
    seed = cmd.seed_command
    _set(seed, "operation", _enum(SeedOperation, operation, "operation"), "operation")
    _set(seed, "seed_id", seed_id, "seed_id")
    _set(seed, "kernel_artifact_id", artifact_id, "artifact_id")
    _set_parameters(seed.parameters, parameters)
    given = {"operation": operation, "seed_id": seed_id, "artifact_id": artifact_id}
    given |= {"parameters": parameters, "timeout_s": timeout_s, "priority": priority}
    return _checked(cmd, given | {"command_id": command_id}, validate)


def make_rollback_command(
    target_epoch: int,
    emergency: bool = False,
    reason: str = "",
    timeout_s: float = 5.0,
    *,
    priority: int | str = MessagePriority.MESSAGE_PRIORITY_HIGH,
    command_id: str | None = None,
    validate: bool = True,
) -> AdaptationCommand:
    """An unsigned rollback command to the checkpoint of ``target_epoch``.

    ``validate``: raise ValueError if the trainer would refuse the command (see ``_checked``)."""
    cmd = _new_command(command_id, priority, timeout_s)
    rollback = cmd.rollback_command
    _set(rollback, "target_epoch", target_epoch, "target_epoch")
    _set(rollback, "emergency", emergency, "emergency")
    _set(rollback, "reason", reason, "reason")
    given = {"target_epoch": target_epoch, "reason": reason, "timeout_s": timeout_s}
    return _checked(cmd, given | {"priority": priority, "command_id": command_id}, validate)


def make_optimizer_command(
    command_type: int | str,
    optimizer_id: str = "",
    *,
    grad_clip_norm: float = 0.0,
    learning_rate: float = 0.0,
    parameters: Mapping[str, float] | None = None,
    timeout_s: float = 5.0,
    priority: int | str = MessagePriority.MESSAGE_PRIORITY_NORMAL,
    command_id: str | None = None,
    validate: bool = True,
) -> AdaptationCommand:
    """An unsigned optimizer command; ``command_type`` is a CommandType value or name ("step").

    ``validate``: raise ValueError if the trainer would refuse the command (see ``_checked``)."""
    command_type = _enum(CommandType, command_type, "command_type")
    cmd = _new_command(command_id, priority, timeout_s)
    opt = cmd.optimizer_command
    _set(opt, "command_type", command_type, "command_type")
    _set(opt, "optimizer_id", optimizer_id, "optimizer_id")
    _set(opt, "grad_clip_norm", grad_clip_norm, "grad_clip_norm")
    _set(opt, "learning_rate", learning_rate, "learning_rate")
    _set_parameters(opt.parameters, parameters)
    given = {"command_type": command_type, "optimizer_id": optimizer_id, "timeout_s": timeout_s}
    given |= {"grad_clip_norm": grad_clip_norm, "learning_rate": learning_rate}
    given |= {"parameters": parameters, "priority": priority, "command_id": command_id}
    return _checked(cmd, given, validate)
