"""Lifecycle gates G1-G5 (docs/design.md §3) as plain functions over plain measurements.

The manager (or a seed's ``advance``) evaluates them wherever it likes and tests drive each one
directly. Each returns a :class:`GateResult`; its ``score`` is the gate's own measure. Also here:
the grafting schedule behind G4, the compatibility probe and FLOP count behind G3, and the
measured benefit (:class:`SeedEvaluation`) behind G5.

No gate outcome may depend on how busy the machine is: a seeded run must take the same
decisions twice. So G3 compares *counted* FLOPs (a function of the kernel's operators and the
tensor shapes only), and the probe's wall-clock latency is reported but never decides; G5
compares a benefit Kasmina measured on validation data, never a number a command asserts.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kasmina.errors import KernelInputRefused
from kasmina.seeds.faults import (
    CONTROL_FLOW,
    FaultRecorder,
    all_finite,
    autocast_to_host,
    gradient_flags,
    one_value_refusal,
    output_fault,
    output_sum,
    recomputing,
    record_fallbacks,
    short_reason,
)
from kasmina.seeds.side_effects import kept_buffers
from kasmina.stages import SeedStage
from kasmina.utils.grad_modes import in_grad_mode
from kasmina.utils.modules import rng_forked
from kasmina.utils.ratelimit import clipped

logger = logging.getLogger(__name__)

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
    trained_epochs: int, min_isolated_epochs: int, isolation_violations: int
) -> GateResult:
    """G2: the seed trained in ISOLATED_INIT for ``min_isolated_epochs`` epochs (``trained_epochs``:
    the epochs of the stage in which its optimizer stepped it, not the epochs it sat there) with
    no isolation violation. Score: the trained epochs."""
    if not min_isolated_epochs >= 0:  # NaN fails too: a threshold that cannot be compared
        raise ValueError(f"min_isolated_epochs must be >= 0, got {min_isolated_epochs!r}")
    if isolation_violations > 0:
        reason = f"{isolation_violations} gradient isolation violation(s)"
        return GateResult(False, reason, float(trained_epochs), 2)
    if trained_epochs < min_isolated_epochs:
        reason = f"trained in {trained_epochs} of the {min_isolated_epochs} epochs G2 needs"
        return GateResult(False, reason, float(trained_epochs), 2)
    reason = f"trained in {trained_epochs} isolated epochs"
    return GateResult(True, reason, float(trained_epochs), 2)


def count_flops(module: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one ``module(x)`` as ``torch.utils.flop_counter`` counts them (matmuls,
    convolutions, attention; elementwise ops count 0). Deterministic: it depends on the
    module's operators and the shapes only, never on the machine's load.

    Runs without gradient, in the module's current mode; buffers the forward mutates (batch-norm
    statistics) are put back, so counting changes nothing. A module that raises propagates.
    A floating ``x`` the module refuses is tried in the dtypes it may take (counts do not
    depend on them): its parameters' one floating dtype (activations recorded under autocast
    are in autocast's; parameters follow a ``model.to(dtype)``), then an exported kernel's
    signed input dtype (bf16 in, float32 inside). The first refusal propagates if none runs."""
    params = {p.dtype for p in module.parameters() if p.is_floating_point()}
    tries = [x.dtype]
    if x.is_floating_point():
        tries += [*(params if len(params) == 1 else ()), getattr(module, "signed_input_dtype", 0)]
    errors: list[Exception] = []
    for dtype in [d for d in dict.fromkeys(tries) if isinstance(d, torch.dtype)]:
        try:
            with kept_buffers(module), rng_forked(x.device):  # grad off: ``in_grad_mode``
                with FlopCounterMode(display=False) as counter:
                    in_grad_mode(False, partial(module, x.to(dtype)))
            return int(counter.get_total_flops())
        except Exception as exc:
            errors.append(exc)
    raise errors[0]


class ProbedOutput(NamedTuple):
    """What G3 reads of a probe's output: its shape, dtype and finiteness (``finite``, a 0-d
    bool on the output's device, read only when the gate is evaluated). A probe keeps this, not
    the output: a COMPATIBILITY_CHECK seed would otherwise hold an activation-sized tensor
    until the gate runs."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    finite: torch.Tensor

    @classmethod
    def of(cls, output: torch.Tensor) -> ProbedOutput:
        """The summary of ``output``; finite when every element is (read on the device, no
        sync). An output that test cannot read (a meta tensor, a subclass that raises) is
        summarised as not finite, so that the probe is kept and G3 names what is wrong."""
        try:
            finite = output.detach().isfinite().all()
        except Exception:
            finite = None
        if finite is None or finite.is_meta:
            finite = torch.zeros((), dtype=torch.bool)
        return cls(tuple(output.shape), output.dtype, finite)

    @property
    def device(self) -> torch.device:
        return self.finite.device

    def numel(self) -> int:
        return math.prod(self.shape)


def gate_g3_compatibility(
    seed_output: torch.Tensor | ProbedOutput | None,
    expected_shape: Sequence[int],
    expected_dtype: torch.dtype,
    cost_ratio: float | None = None,
    max_cost_ratio: float = math.inf,
    *,
    latency_ms: float | None = None,
    latency_budget_ms: float = math.inf,
) -> GateResult:
    """G3: the seed's output (the tensor, or a probe's :class:`ProbedOutput` of it) matches the
    host's shape and dtype, is finite, and costs at most ``max_cost_ratio`` times the host.

    ``cost_ratio`` is the seed's counted FLOPs per output element over the host layer's counted
    FLOPs per output element (None: the host's cost is unknown, so cost is not checked and the
    reason says so). Counted, not timed, so the decision is the same on an idle and on a busy
    machine. ``latency_ms`` (the probe's wall-clock time) is advisory: over
    ``latency_budget_ms`` it is named in the reason, and the gate still passes.

    Score: the cost ratio (0 when unknown).
    """
    ratio = float("nan") if cost_ratio is None else float(cost_ratio)
    score = 0.0 if cost_ratio is None else ratio
    if seed_output is None:
        return GateResult(False, "no compatibility probe recorded", score, 3)
    if isinstance(seed_output, torch.Tensor):
        seed_output = ProbedOutput.of(seed_output)
    if seed_output.shape != tuple(expected_shape):
        reason = f"output shape {seed_output.shape} != host {tuple(expected_shape)}"
        return GateResult(False, reason, score, 3)
    if seed_output.dtype != expected_dtype:
        return GateResult(
            False, f"output dtype {seed_output.dtype} != host {expected_dtype}", score, 3
        )
    if not bool(seed_output.finite):
        return GateResult(False, "output is not finite", score, 3)
    if cost_ratio is not None and not ratio <= max_cost_ratio:
        reason = f"cost {ratio:.3g}x the host's FLOPs per element > budget {max_cost_ratio:g}x"
        return GateResult(False, reason, score, 3)
    cost = "host cost unknown, cost not checked" if cost_ratio is None else f"cost {ratio:.3g}x"
    reason = f"compatible, {cost}"
    if latency_ms is not None and not float(latency_ms) <= latency_budget_ms:
        reason += (
            f" (advisory: probe took {float(latency_ms):.3f} ms > {latency_budget_ms:g} ms; "
            "wall-clock time never decides)"
        )
    return GateResult(True, reason, score, 3)


def gate_g4_alpha(alpha: float) -> GateResult:
    """G4: the grafting schedule reached alpha = 1 (to the table's 1/1000). Score: alpha."""
    alpha = float(alpha)
    if alpha >= ALPHA_COMPLETE:
        return GateResult(True, "alpha reached 1", alpha, 4)
    return GateResult(False, f"alpha {alpha:.4f} < 1", alpha, 4)


def benefit_score(benefit: float) -> float:
    """A relative benefit mapped to the gate score's [0, 1]: ``0.5 + 0.5 * clamp(benefit, -1,
    1)``; NaN maps to 0.

    0.5 is "no effect", so the default performance gate (500 per mille) fossilizes a seed that
    does no harm, and a gate of ``500 + 500 * b`` asks for a relative loss reduction of at least
    ``b`` (600: 20 %). A seed that doubles the loss or worse scores 0; one that removes all of
    it scores 1.
    """
    b = float(benefit)
    if math.isnan(b):
        return 0.0
    return 0.5 + 0.5 * min(1.0, max(-1.0, b))


@dataclass(frozen=True)
class SeedEvaluation:
    """What Kasmina measured of one seed on validation data (``manager.evaluate_seeds``).

    ``loss_with`` is the mean validation loss of the model as it is (the seed at its stage and
    alpha), ``loss_without`` the same with the seed's chunk replaced by the host's own output
    (alpha = 0, everything else untouched). ``metric_*`` are the same for the caller's metric
    (NaN without one; G5 reads it as higher is better). ``metric_given`` says a metric was
    asked for (``evaluate_seeds`` got a ``metric_fn``): its values then decide G5 even when
    they are NaN (the metric was undefined on a batch), which G5 refuses. ``stage``,
    ``alpha``, ``epoch`` and ``step`` say when it was measured: G5 only takes evidence measured
    in the stage being left, at alpha 1. ``faults`` counts the validation batches on which
    the seed faulted (raised, returned the wrong tensor, or a non-finite output) in the
    forward that measured it, ``last_fault`` says how: the host's output stood in for the
    seed's there, so ``loss_with`` is not the seed's: its benefit is NaN (unknown, score 0),
    and G5 refuses it.
    """

    seed_id: str
    stage: SeedStage
    alpha: float
    loss_with: float
    loss_without: float
    metric_with: float = math.nan
    metric_without: float = math.nan
    samples: int = 0
    epoch: int = -1
    step: int = 0
    metric_given: bool = False
    faults: int = 0
    last_fault: str = ""

    @property
    def metric_measured(self) -> bool:
        """Whether a metric was measured: one was asked for (``metric_given``), or either value
        is a number (an evaluation built without ``metric_given``). False only for both NaN
        without ``metric_given``: no metric, the loss alone decides G5."""
        nan = math.isnan(self.metric_with) and math.isnan(self.metric_without)
        return self.metric_given or not nan

    @property
    def benefit(self) -> float:
        """Relative validation-loss reduction the seed brings, ``(loss_without - loss_with) /
        |loss_without|``: ``1 - loss_with / loss_without`` for a positive loss, and for a loss
        that can be negative (a Gaussian NLL) still positive exactly when the seed lowers it.
        0 when both are equal; ``+inf``/``-inf`` when only the host's loss is 0 (the seed
        lowers/raises it). NaN (unknown) for a seed that faulted while measured (``faults``);
        a loss that is not finite gives NaN or an infinity, and G5 refuses both cases."""
        with_, without = self.loss_with, self.loss_without
        if self.faults:
            return math.nan
        if without > 0:
            return 1.0 - with_ / without
        gain = without - with_
        if gain == 0 or math.isnan(gain):
            return 0.0 if gain == 0 else math.nan
        if without < 0:
            return gain / -without
        return math.copysign(math.inf, gain)

    @property
    def score(self) -> float:
        """The benefit mapped to [0, 1] (see :func:`benefit_score`)."""
        return benefit_score(self.benefit)

    @property
    def metric_change(self) -> float:
        """``metric_with - metric_without``: what the seed adds to the metric (negative: it
        costs some; NaN when no metric was measured)."""
        return self.metric_with - self.metric_without


_TIE = 1e-9  # far above a double's rounding of a score or a batch-mean metric, far below a step


def gate_g5_performance(
    evaluation: SeedEvaluation | None,
    performance_gate: float,
    stage: SeedStage = SeedStage.STABILIZATION,
    *,
    max_metric_drop: float = 0.0,
) -> GateResult:
    """G5: Kasmina's own measurement of the seed, taken in ``stage`` (the stage being left),
    scores at least ``performance_gate``, and, when a metric was measured with it, the seed
    does not cost more than ``max_metric_drop`` of that metric. Score: the measured score (0
    when there is none).

    A seed that was never evaluated, or only in an earlier stage (at a smaller alpha, so its
    measured effect is not the effect fossilizing it would have), is refused: no evidence, no
    fossilization. So is a seed that faulted while measured (``evaluation.faults``: it raised
    or its output was not finite, and the host's output stood in for it, which would read as
    "no effect"): a measurement that cannot be read fails closed.

    The metric (``evaluate_seeds``' ``metric_fn``, e.g. accuracy) is read as *higher is
    better*: the seed is refused when ``metric_with < metric_without - max_metric_drop``, in
    the metric's own units (0.01 is one point of an accuracy in [0, 1]; ``inf`` never
    refuses). A lower-is-better metric (an error rate) is passed negated. Without a metric
    (no ``metric_fn``: ``evaluation.metric_measured`` is False) the loss alone decides. A
    metric that was measured but is not finite (NaN or infinite on either side, e.g. a
    ``metric_fn`` undefined on one validation batch, which makes its average NaN) is refused:
    what cannot be read cannot show the seed costs nothing. Loss and metric are both
    required: a loss benefit does not buy back a metric
    the seed costs, which is how loss and accuracy disagree on a seed that cuts the loss of
    badly scored inputs while it costs more right answers than it gains.
    """
    if not max_metric_drop >= 0:  # NaN fails too
        raise ValueError(f"max_metric_drop must be >= 0, got {max_metric_drop!r}")
    if not math.isfinite(performance_gate):  # a NaN gate would pass every score
        raise ValueError(f"performance_gate must be finite, got {performance_gate!r}")
    if evaluation is None:
        return GateResult(False, "never evaluated: run manager.evaluate_seeds first", 0.0, 5)
    if evaluation.stage != stage:
        reason = f"evaluated in {evaluation.stage.name}, not in {stage.name}: evaluate it again"
        return GateResult(False, reason, 0.0, 5)
    if evaluation.faults:
        reason = (
            f"faulted while measured, on {evaluation.faults} validation batch(es) (last: "
            f"{evaluation.last_fault}): the host's output stood in for the seed's, so its "
            "benefit was not measured"
        )
        return GateResult(False, reason, 0.0, 5)
    score = evaluation.score
    benefit = evaluation.benefit
    if not math.isfinite(evaluation.loss_with) or not math.isfinite(evaluation.loss_without):
        return GateResult(False, "measured validation loss is not finite", score, 5)
    measured = f"measured benefit {benefit:+.4f} (score {score:.4f})"
    # Ties are decided as the numbers say, not their rounding: a loss cut by exactly the ``b`` a
    # gate of ``500 + 500·b`` asks for scored 0.5999999999 against 0.6 (``_TIE``: absolute for
    # the score, in [0, 1]; relative for the metric below).
    if score < performance_gate - _TIE:
        return GateResult(False, f"{measured} < {performance_gate:.4f}", score, 5)
    passed = f"{measured} >= {performance_gate:.4f}"
    with_, without = float(evaluation.metric_with), float(evaluation.metric_without)
    if not evaluation.metric_measured:
        return GateResult(True, passed, score, 5)
    if not math.isfinite(with_) or not math.isfinite(without):
        reason = (
            f"{passed}, but the measured metric is not finite ({with_} with, {without} without):"
            " a metric asked for (metric_fn) that cannot be read refuses the seed"
        )
        return GateResult(False, reason, score, 5)
    metric = f"metric {with_:.4f} with it, {without:.4f} without"
    if with_ < without - max_metric_drop - _TIE * max(1.0, abs(without)):
        reason = (
            f"{passed}, but {metric}: a drop of {without - with_:.4f} > the tolerated "
            f"{max_metric_drop:.4f} (g5_max_metric_drop)"
        )
        return GateResult(False, reason, score, 5)
    return GateResult(True, f"{passed}; {metric} (drop tolerated: {max_metric_drop:.4f})", score, 5)


class ProbeOutputError(ValueError):
    """The kernel ran but returned something that is not a Tensor.

    Its own type, so that a caller can tell a kernel that returned the wrong thing from one that
    raised (both are faults of the seed, reported differently).
    """


@dataclass(frozen=True)
class ProbeFault:
    """A compatibility probe whose kernel raised or returned no tensor: the seed's last probe,
    on which G3 refuses (naming ``reason``) until a later probe runs cleanly."""

    reason: str


@dataclass
class CompatibilityProbe:
    """One no-grad run of a seed's kernel on host activations, for gate G3: what G3 reads of
    its output (:class:`ProbedOutput`), the host's shape and dtype, and its time.

    On a GPU the kernel is timed with CUDA events, read (one sync) only when the gate asks, so
    the COMPATIBILITY_CHECK forward does not wait for the device.
    """

    output: ProbedOutput
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

    def cost_ratio(self, kernel: nn.Module, host_flops_per_element: float | None) -> float | None:
        """The kernel's counted FLOPs per output element over the host layer's
        (``host_flops_per_element``, counted the same way), on zeros of the probed shape; None
        when the host's count is unknown. What the counter raises on a kernel it cannot count
        (``torch.cond`` in the program) propagates: its cost cannot be checked."""
        if host_flops_per_element is None or not host_flops_per_element > 0:
            return None
        x = torch.zeros(self.host_shape, dtype=self.host_dtype, device=self.output.device)
        flops = count_flops(kernel, x)
        return flops / max(1, self.output.numel()) / host_flops_per_element

    def gate(
        self,
        cost_ratio: float | None = None,
        max_cost_ratio: float = math.inf,
        latency_budget_ms: float = math.inf,
    ) -> GateResult:
        """G3 on this probe: the counted ``cost_ratio`` decides, the latency is advisory."""
        return gate_g3_compatibility(
            self.output,
            self.host_shape,
            self.host_dtype,
            cost_ratio,
            max_cost_ratio,
            latency_ms=self.latency_ms,
            latency_budget_ms=latency_budget_ms,
        )


def run_probe(kernel: nn.Module, x: torch.Tensor) -> CompatibilityProbe:
    """Run ``kernel(x.detach())`` without gradient and record what G3 reads of the output, the
    host's shape and dtype, and the time. A measurement: the global RNG stream and the kernel's
    buffers (batch-norm statistics of a kernel exported in train mode) are left as they were."""
    return _probe(kernel, x)[1]


def _probe(kernel: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, CompatibilityProbe]:
    """:func:`run_probe`, and the output itself (for the guard's checks; not kept)."""
    xd = x.detach()
    events = None
    latency = None
    with rng_forked(xd.device), kept_buffers(kernel):  # grad off: ``in_grad_mode``
        if xd.device.type == "cuda":
            # On the activations' device's stream, which need not be the current device's.
            stream = torch.cuda.current_stream(xd.device)
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record(stream)
            out = in_grad_mode(False, partial(kernel, xd))
            events[1].record(stream)
        else:
            start = time.perf_counter()
            out = in_grad_mode(False, partial(kernel, xd))
            latency = (time.perf_counter() - start) * 1000.0
    if not isinstance(out, torch.Tensor):
        raise ProbeOutputError(f"output {type(out).__name__} is not a Tensor")
    out = autocast_to_host(out, xd)  # as the forward does
    probe = CompatibilityProbe(ProbedOutput.of(out), tuple(x.shape), x.dtype, latency, events)
    return out, probe


def guarded_probe(
    kernel: nn.Module,
    x: torch.Tensor,
    record: FaultRecorder,
    finite_flag: torch.Tensor,
    fault_flag: torch.Tensor,
) -> CompatibilityProbe | ProbeFault:
    """:func:`run_probe` guarded like the forward (it runs inside the host's): a raise or a
    non-Tensor is a fault (given to ``record``) and a :class:`ProbeFault`; a wrong shape, dtype or
    device is a fault that keeps the probe, so G3 names the mismatch; a non-finite output
    clears ``finite_flag`` (``record_fallbacks``). A recompute under activation checkpointing
    records nothing again. A call the kernel's program refuses (``KernelInputRefused``) is no
    fault: it is raised, for the caller to sit out (the last probe stands)."""
    try:
        out, result = _probe(kernel, x)
    except (*CONTROL_FLOW, KernelInputRefused):
        raise
    except Exception as exc:  # the kernel's own failure: contained, never the host's
        if (refused := one_value_refusal(exc, x, kernel)) is not None:  # a batch of one: sat out
            raise refused from exc
        kind = "type" if isinstance(exc, ProbeOutputError) else "exception"
        reason = str(exc) if kind == "type" else f"raised {type(exc).__name__}: {exc}"
        if not recomputing():
            record(kind, reason)
        return ProbeFault(short_reason(reason))
    fault = output_fault(out, x)
    if fault is None:
        ok = all_finite(out)
        record_fallbacks(ok, output_sum(x), *gradient_flags(finite_flag, fault_flag))
    elif not recomputing():
        record(*fault)
    return result


def gate_g3_probed(
    probe: CompatibilityProbe | ProbeFault | None,
    kernel: nn.Module | None,
    host_flops_per_element: float | None,
    max_cost_ratio: float,
    latency_budget_ms: float,
    *,
    seed_id: str,
) -> GateResult:
    """G3 on a seed's last probe: refused when it faulted, or without a probe or a kernel; the
    counted cost ratio decides, and a latency over budget only warns (timings depend on load)."""
    if isinstance(probe, ProbeFault):
        return GateResult(False, f"compatibility probe faulted: {probe.reason}", math.inf, 3)
    if probe is None or kernel is None:
        return gate_g3_compatibility(None, (), torch.float32)
    try:
        ratio = probe.cost_ratio(kernel, host_flops_per_element)
    except Exception as exc:  # it ran in the probe: the FLOP counter cannot count it
        why = f"its cost could not be counted ({type(exc).__name__}: {clipped(str(exc), 200)})"
        return GateResult(False, f"{why}, so it cannot be held to the cost budget", math.inf, 3)
    result = probe.gate(ratio, max_cost_ratio, latency_budget_ms)
    if result.passed and not probe.latency_ms <= latency_budget_ms:
        logger.warning("seed %s: G3 %s", seed_id, result.reason)
    return result
