"""A controller's optimizer command, as the optimizer manager reads it (docs/design.md §5).

The optimizer manager is an in-process component, not a door: a controller's optimizer command
reaches it only through the kernel manager, which verifies the signed bytes first, so
``IsolatedOptimizerManager.apply_optimizer_command`` takes a ``VerifiedOptimizerCommand``, never a
bare ``OptimizerCommand``. This module is that call's type gate and its reading of the command:
``read_optimizer_command`` refuses a wire message (bytes, any protobuf message) with
``TypeError`` and turns the verified payload into an ``OptimizerOrder`` of plain values (float32
fields back to the decimals they were set from, ``beta1``/``beta2`` combined into ``betas``, the
half a command leaves out taken from the caller's ``betas``).
Which optimizer call each command type makes is the manager's: nothing here knows an optimizer
(``step_lrs`` reads param groups, plain dicts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from google.protobuf.message import Message

from kasmina.leyline import OptimizerCommand

__all__ = [
    "OptimizerOrder",
    "VerifiedOptimizerCommand",
    "check_lr",
    "read_optimizer_command",
    "step_lrs",
]


@runtime_checkable
class VerifiedOptimizerCommand(Protocol):
    """What ``apply_optimizer_command`` takes: an optimizer command that passed the verifier,
    such as the handler's ``KasminaCommand`` of kind ``"optimizer"`` (named by its shape: this
    package may not import the control package). No wire message (bytes, ``AdaptationCommand``,
    ``OptimizerCommand``) is accepted, so nothing a transport parsed gets here unverified."""

    @property
    def kind(self) -> str: ...

    @property
    def optimizer(self) -> OptimizerCommand | None: ...


@dataclass(frozen=True)
class OptimizerOrder:
    """A verified ``OptimizerCommand`` in plain values."""

    kind: int  # a leyline ``CommandType``, possibly one this version does not know
    optimizer_id: str  # "": the type's default target (the host, the teacher), if it has one
    learning_rate: float | None  # None: not set (0 on the wire)
    grad_clip_norm: float  # 0: no clipping
    options: dict[str, Any]  # optimizer options for a creation, ``betas`` combined


def read_optimizer_command(
    command: VerifiedOptimizerCommand, betas: Sequence[Any] = (0.9, 0.999)
) -> OptimizerOrder:
    """The order a verified optimizer command carries; ``TypeError`` for anything else.
    ``betas``: what a command that sets only ``beta1`` or ``beta2`` keeps of the other (the
    options it is applied over: attach's ``betas=(0.9, 0.95)`` stays 0.95 under a ``beta1``)."""
    cmd = _verified_payload(command)
    lr = _from_float32(cmd.learning_rate) if cmd.learning_rate > 0 else None
    return OptimizerOrder(
        kind=cmd.command_type,
        optimizer_id=cmd.optimizer_id,
        learning_rate=lr,
        grad_clip_norm=_from_float32(cmd.grad_clip_norm),
        options=_options(cmd, betas),
    )


def _from_float32(value: float) -> float:
    """The decimal a proto ``float`` field was set from (0.01, not 0.009999999776)."""
    return float(str(np.float32(value)))


def _options(cmd: OptimizerCommand, betas: Sequence[Any]) -> dict[str, Any]:
    """Creation options from ``cmd.parameters``; ``beta1``/``beta2`` become ``betas``, the one
    not given as it is in ``betas``."""
    options: dict[str, Any] = dict(cmd.parameters)
    if "beta1" in options or "beta2" in options:
        first, second = betas
        options["betas"] = (options.pop("beta1", first), options.pop("beta2", second))
    return options


def _verified_payload(command: object) -> OptimizerCommand:
    """The ``OptimizerCommand`` of a verified command; ``TypeError`` for anything else."""
    if isinstance(command, (Message, bytes, bytearray, memoryview)):
        raise TypeError(
            f"apply_optimizer_command takes a verified command, not a {type(command).__name__}: "
            "a controller's optimizer command must arrive signed, through the kernel manager's "
            "handle_adaptation_command"
        )
    payload = getattr(command, "optimizer", None)
    if getattr(command, "kind", None) != "optimizer" or not isinstance(payload, OptimizerCommand):
        raise TypeError(
            f"expected a verified optimizer command (kind 'optimizer'), got {command!r}"
        )
    return payload


def check_lr(lr: object) -> None:
    """``ValueError`` unless ``lr`` is a finite number > 0 (a one-element tensor holding one):
    NaN, negative, infinite (every weight inf at the next step) and a bool are refused."""
    if isinstance(lr, bool) or not (0 < lr < math.inf):  # type: ignore[operator]
        raise ValueError(f"learning rate must be finite and > 0, got {lr!r}")


def step_lrs(groups: Sequence[Mapping[str, Any]], lr: float) -> list[Any]:
    """The lr of each param group after a STEP command's ``learning_rate``: the first group's
    is ``lr`` and every other keeps its ratio to it (a layer unfrozen at a tenth of the base lr
    stays at a tenth: one lr for all flattened the user's groups for good); all are ``lr``
    when the first group's is 0. A tensor lr stays a tensor (a new one, of its dtype, device)."""
    check_lr(lr)
    base = float(groups[0]["lr"])
    lrs = []
    for group in groups:
        old = group["lr"]
        new = lr * (float(old) / base) if base > 0 else lr  # the first: exactly ``lr``
        lrs.append(torch.full_like(old, new) if isinstance(old, torch.Tensor) else new)
    return lrs
