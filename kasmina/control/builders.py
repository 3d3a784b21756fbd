"""Command builders for controllers: ``make_seed_command``, ``make_rollback_command`` and
``make_optimizer_command`` build an unsigned ``AdaptationCommand`` (``kasmina.control.auth``
signs it).

A wrong argument is a TypeError or ValueError naming it, what was given and what is allowed.
``validate=True`` also runs the trainer's own validation (``commands.to_kasmina_command``) on the
built message, so a command the trainer would refuse fails where it is built, with the trainer's
reason: the rules live only there (docs/design.md §5). ``_ALLOWED`` puts them in words for the
errors. Like ``commands``, this module loads no torch.
"""

from __future__ import annotations

import math
import reprlib
import uuid
from collections.abc import Mapping
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

from google.protobuf.duration_pb2 import Duration

from kasmina.control.commands import (
    MAX_EPOCH,
    MAX_GRAD_CLIP_NORM,
    MAX_ID_CHARS,
    MAX_LEARNING_RATE,
    MAX_REASON_CHARS,
    MAX_TIMEOUT_S,
    accepted_parameters,
    to_kasmina_command,
)
from kasmina.leyline import AdaptationCommand, CommandType, MessagePriority, SeedOperation

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

__all__ = ["make_optimizer_command", "make_rollback_command", "make_seed_command"]


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


def _is_bool(value: object) -> bool:
    """A bool, a NumPy bool or a bool tensor (no torch loaded here: read by its dtype's name).
    Protobuf stores any of them in a number field as 1 or 0, so none is a number here."""
    return isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")


def _set(message: Any, field: str, value: object, argument: str) -> None:
    """``message.field = value``, with protobuf's type and range errors naming ``argument``.
    Protobuf takes ``True`` (a NumPy one too) for a number and ``2`` for a bool: both are
    refused here."""
    if argument == "emergency" and not isinstance(value, bool):
        raise _invalid(TypeError, argument, value)
    if argument != "emergency" and _is_bool(value):
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
        if _is_bool(value):  # protobuf would store 1.0
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


def _checked(cmd: AdaptationCommand, given: Mapping[str, Any], validate: bool) -> AdaptationCommand:
    """``cmd``, after ``to_kasmina_command`` if ``validate``: a reason it gives for refusing the
    command is raised as a ValueError naming the argument (``given``: the builder's arguments)."""
    reason = to_kasmina_command(cmd) if validate else None
    if not isinstance(reason, str):
        return cmd
    note = f" (the trainer refuses it as {reason!r})"
    argument = _ARGUMENT_OF.get(reason) or reason.partition("_")[2]
    if argument == "parameters":
        known = sorted(accepted_parameters(cmd))
        allowed = f"finite numbers keyed by {known}" if known else "empty for this command"
        raise _invalid(ValueError, argument, given[argument], allowed, note)
    if argument in given:
        raise _invalid(ValueError, argument, given[argument], note=note)
    bound = accepted_parameters(cmd).get(argument)  # "bad_<key>": a parameter out of its range
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
    # Only None takes a fresh id: "" (an id the caller meant to keep, for a retry) is refused
    # as the trainer refuses it, where a new random id each time made every retry a new command.
    fresh = command_id is None
    _set(cmd, "command_id", uuid.uuid4().hex if fresh else command_id, "command_id")
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
