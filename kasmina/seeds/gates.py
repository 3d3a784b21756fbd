"""Lifecycle gates G1-G5 (docs/design.md §3) as plain functions over plain measurements.

The manager (or a seed's ``advance``) evaluates them wherever it likes and tests drive each one
directly. Each returns a :class:`GateResult`; its ``score`` is the gate's own measure. Also here:
the grafting schedule behind G4 and the compatibility probe behind G3.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# G4 passes once alpha rounds to 1000/1000 in the state table (alpha is stored * 1000): a sigmoid
# schedule never reaches 1.0 exactly, and leaving GRAFTING then changes the output by at most
# 0.05% of (seed - host).
ALPHA_COMPLETE = 1.0 - 0.5 / 1000


def sigmoid_alpha(step: float, total_steps: float, temperature: float) -> float:
    """The grafting schedule ``sigmoid((step - total/2) / temperature)`` (overflow-safe)."""
    z = (step - total_steps / 2.0) / temperature
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@dataclass(frozen=True)
class GateResult:
    """Outcome of one gate. ``score`` is the gate's own measure (see each gate)."""

    passed: bool
    reason: str
    score: float = 0.0
    gate: int = 0

    def __bool__(self) -> bool:
        return self.passed


def gate_g1_kernel_ready(kernel: nn.Module | None) -> GateResult:
    """G1: a kernel is attached and all its parameters and buffers are finite. Score 1/0."""
    if kernel is None:
        return GateResult(False, "no kernel attached", 0.0, 1)
    tensors = [
        t for t in list(kernel.parameters()) + list(kernel.buffers()) if t.is_floating_point()
    ]
    for tensor in tensors:
        if not bool(torch.isfinite(tensor.detach()).all()):
            return GateResult(False, "kernel has non-finite parameters", 0.0, 1)
    return GateResult(True, f"kernel loaded ({len(tensors)} finite tensors)", 1.0, 1)


def gate_g2_isolated_training(
    epochs_in_state: int, min_isolated_epochs: int, isolation_violations: int
) -> GateResult:
    """G2: trained in ISOLATED_INIT for ``min_isolated_epochs`` with no violation. Score: epochs."""
    if isolation_violations > 0:
        reason = f"{isolation_violations} gradient isolation violation(s)"
        return GateResult(False, reason, float(epochs_in_state), 2)
    if epochs_in_state < min_isolated_epochs:
        reason = f"trained {epochs_in_state} of {min_isolated_epochs} isolated epochs"
        return GateResult(False, reason, float(epochs_in_state), 2)
    return GateResult(True, f"trained {epochs_in_state} isolated epochs", float(epochs_in_state), 2)


def gate_g3_compatibility(
    seed_output: torch.Tensor | None,
    expected_shape: Sequence[int],
    expected_dtype: torch.dtype,
    latency_ms: float | None,
    latency_budget_ms: float,
) -> GateResult:
    """G3: the seed's output matches the host's shape and dtype, is finite, and ran in budget.

    Score: the measured latency in ms (``inf`` when unknown).
    """
    latency = float("inf") if latency_ms is None else float(latency_ms)
    if seed_output is None:
        return GateResult(False, "no compatibility probe recorded", latency, 3)
    if tuple(seed_output.shape) != tuple(expected_shape):
        reason = f"output shape {tuple(seed_output.shape)} != host {tuple(expected_shape)}"
        return GateResult(False, reason, latency, 3)
    if seed_output.dtype != expected_dtype:
        return GateResult(
            False, f"output dtype {seed_output.dtype} != host {expected_dtype}", latency, 3
        )
    if not bool(torch.isfinite(seed_output).all()):
        return GateResult(False, "output is not finite", latency, 3)
    if not latency <= latency_budget_ms:
        return GateResult(
            False, f"latency {latency:.3f} ms > budget {latency_budget_ms} ms", latency, 3
        )
    return GateResult(True, f"compatible, {latency:.3f} ms", latency, 3)


def gate_g4_alpha(alpha: float) -> GateResult:
    """G4: the grafting schedule reached alpha = 1 (to the table's 1/1000). Score: alpha."""
    alpha = float(alpha)
    if alpha >= ALPHA_COMPLETE:
        return GateResult(True, "alpha reached 1", alpha, 4)
    return GateResult(False, f"alpha {alpha:.4f} < 1", alpha, 4)


def gate_g5_performance(gate_score: float, performance_gate: float) -> GateResult:
    """G5: ``GATE_SCORE >= PERFORMANCE_GATE``. Score: the gate score."""
    score = float(gate_score)
    if not math.isfinite(score):
        return GateResult(False, f"gate score {score} is not finite", score, 5)
    if score >= performance_gate:
        return GateResult(True, f"score {score:.4f} >= {performance_gate:.4f}", score, 5)
    return GateResult(False, f"score {score:.4f} < {performance_gate:.4f}", score, 5)


@dataclass
class CompatibilityProbe:
    """One no-grad run of a seed's kernel on host activations, for gate G3.

    On a GPU the kernel is timed with CUDA events, read (one sync) only when the gate asks, so
    the COMPATIBILITY_CHECK forward does not wait for the device.
    """

    output: torch.Tensor
    host_shape: tuple[int, ...]
    host_dtype: torch.dtype
    cpu_latency_ms: float | None = None
    events: tuple[Any, Any] | None = None

    @property
    def latency_ms(self) -> float:
        if self.events is not None:
            start, end = self.events
            end.synchronize()
            return float(start.elapsed_time(end))
        return float("inf") if self.cpu_latency_ms is None else self.cpu_latency_ms

    def gate(self, latency_budget_ms: float) -> GateResult:
        return gate_g3_compatibility(
            self.output, self.host_shape, self.host_dtype, self.latency_ms, latency_budget_ms
        )


def run_probe(kernel: nn.Module, x: torch.Tensor) -> CompatibilityProbe:
    """Run ``kernel(x.detach())`` without gradient and record output, host shape/dtype, time."""
    xd = x.detach()
    events = None
    latency = None
    with torch.no_grad():
        if xd.device.type == "cuda":
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
            out = kernel(xd)
            events[1].record()
        else:
            start = time.perf_counter()
            out = kernel(xd)
            latency = (time.perf_counter() - start) * 1000.0
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"seed kernel returned {type(out).__name__}, expected a Tensor")
    return CompatibilityProbe(out, tuple(x.shape), x.dtype, latency, events)
