"""What a seed's fault is, and the guards that turn one into a fallback (docs/design.md §6a).

The seed (``kasmina.seeds.seed``) calls these on the host's path: ``output_fault`` checks a
kernel's output against the host activations it must replace (metadata only: no device read),
``all_finite`` is the device-side finiteness test (no host sync), and ``contain_backward`` puts
an isolated seed's own backward inside a guarded autograd node, so a kernel whose backward
raises costs that seed one step's gradient and counts one fault, never the host's backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = [
    "DEFAULT_FAULT_LIMIT",
    "FAULT_LOG_SIZE",
    "FAULT_REASON_CHARS",
    "FAULT_WARN_EVERY",
    "ContainedBackward",
    "FaultRecorder",
    "all_finite",
    "contain_backward",
    "output_fault",
    "short_reason",
]

# ``record_fault(kind, reason)``: counts, logs and reports one fault (the seed's ``_record_fault``).
FaultRecorder = Callable[[str, str], None]

# Faults a seed may commit before QUARANTINE, unless the constructor says otherwise.
DEFAULT_FAULT_LIMIT = 3
# The newest fault reasons a seed keeps (older ones are dropped), and their length cap: the log
# is for a person reading a report, and an exception message can be arbitrarily long.
FAULT_LOG_SIZE = 16
FAULT_REASON_CHARS = 200
# After the first fault (WARNING), every this-many-th fault is logged at WARNING again, so that a
# seed that cannot be quarantined (ACTIVE) and faults on every step stays visible without
# flooding the log; the others go to DEBUG.
FAULT_WARN_EVERY = 1000


def short_reason(text: str) -> str:
    """``text`` on one line and at most ``FAULT_REASON_CHARS`` long, for the fault log."""
    line = " ".join(text.split())
    if len(line) <= FAULT_REASON_CHARS:
        return line
    return line[: FAULT_REASON_CHARS - 3] + "..."


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-d bool on ``t``'s device: whether every element is finite, without a host sync.

    ``0 * v`` is 0 for every finite ``v`` and NaN for inf and NaN, so the sum is 0 exactly when
    all are finite (no overflow is possible). Three ops where ``isfinite(t).all()`` takes five;
    this runs once per seed per forward. Detached: the test is never differentiated.
    """
    return t.detach().mul(0).sum().eq(0)


def output_fault(out: Any, host: torch.Tensor) -> tuple[str, str] | None:
    """``(kind, reason)`` when ``out`` cannot stand in for ``host``, else None.

    Only metadata is compared (no device read), so this costs nothing measurable in a forward
    and traces to constants under ``torch.compile``.
    """
    if not isinstance(out, torch.Tensor):
        return "type", f"output {type(out).__name__} is not a Tensor"
    if out.shape != host.shape or out.dtype != host.dtype:
        kind = "shape" if out.shape != host.shape else "dtype"
        got, want = f"{tuple(out.shape)}/{out.dtype}", f"{tuple(host.shape)}/{host.dtype}"
        return kind, f"output {got} does not match host {want}"
    if out.device != host.device:
        return "device", f"output on {out.device} but host on {host.device}"
    return None


class ContainedBackward(torch.autograd.Function):
    """Identity on a seed's output whose backward runs the kernel's own backward in a guard.

    Before ACTIVE a seed's kernel sees ``x.detach()``, so its graph is an island: the only way
    out of it is the output. Handing autograd a detached copy of the output and doing the
    island's backward here (``torch.autograd.grad`` into the kernel's parameters) means a
    kernel whose backward raises costs its parameters this step's gradient and counts one
    fault, while the host's backward carries on. The island is kept (``retain_graph``) until
    the outer graph is freed, so the seed-only KD backward and the main one can both pass.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, value: torch.Tensor, record_fault: FaultRecorder, island: list, *params: Any
    ) -> torch.Tensor:
        ctx.record_fault, ctx.island = record_fault, island
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        output, params = ctx.island
        try:
            grads = torch.autograd.grad(output, params, grad, retain_graph=True, allow_unused=True)
        except Exception as exc:  # the kernel's own backward failed: contained
            ctx.record_fault("backward", f"backward raised {type(exc).__name__}: {exc}")
            grads = (None,) * len(params)
        return (None, None, None, *grads)


def contain_backward(
    output: torch.Tensor, params: Iterable[torch.Tensor], record_fault: FaultRecorder
) -> torch.Tensor:
    """``output`` (an isolated seed's) with its backward guarded by ``ContainedBackward``."""
    trained = tuple(p for p in params if p.requires_grad)
    if not trained:
        return output
    return ContainedBackward.apply(output.detach(), record_fault, [output, trained], *trained)
