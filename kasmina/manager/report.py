"""What the kernel manager reports: events, Leyline telemetry packets, measured performance.

``ManagerReport`` is a component: it receives the ``ManagerState`` it records into and reads,
and the ``IsolationGuard`` whose counters it reports. Every number is measured by the manager
itself (its own timers, the cache's counters, the handler's counters, passed in by the façade);
nothing is assumed. ``validate_performance_targets`` measures the docs/design.md §8 targets
that the running device can measure, at call time, and returns each value beside its target:
``perf_targets`` holds the targets and how each is timed.

The controller's view is ``system_state``: the Leyline ``SystemStatePacket`` with the seeds'
stages, alphas, epochs in stage and the benefit Kasmina measured (``evaluate_seeds``).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from kasmina.control.commands import KasminaCommand
from kasmina.leyline import (
    MetricType,
    SeedLifecycleStage,
    SeedOperation,
    SystemStatePacket,
    TelemetryPacket,
)
from kasmina.manager.guard import IsolationGuard
from kasmina.manager.perf_targets import dormant_overhead_us, measure_targets
from kasmina.manager.records import SeedRecord
from kasmina.manager.state import ManagerState
from kasmina.seeds.gates import GateResult, SeedEvaluation
from kasmina.utils.checks import check_positive_int, check_real
from kasmina.utils.interrupts import interrupts_deferred
from kasmina.utils.ratelimit import clipped

__all__ = [
    "SYSTEM_STATE_VERSION",
    "ManagerReport",
    "TargetCheck",
]

# A command log entry's reason is cut to this many characters (the log keeps 1,000 entries).
MAX_REASON_CHARS = 1000

logger = logging.getLogger(__name__)

# SystemStatePacket.version this manager produces.
SYSTEM_STATE_VERSION = 1
# Validation-metric keys (as given to end_epoch) that fill the packet's own fields.
_ACCURACY_KEYS = ("val_accuracy", "accuracy", "val_acc")
_LOSS_KEYS = ("val_loss", "loss")

_COUNTER = MetricType.METRIC_TYPE_COUNTER
_GAUGE = MetricType.METRIC_TYPE_GAUGE
Metric = tuple[str, float, int, Mapping[str, str] | None]


def epoch_metrics(val_metrics: Mapping[str, float] | None) -> dict[str, float]:
    """``end_epoch``'s validation metrics as floats, checked before the epoch changes anything:
    each key a string (they name telemetry metrics and the state packet's fields, and are sorted
    with one another), each value a real number or a one-element tensor holding one (a string
    or a bool is refused, as ``check_real`` refuses them: ``float("0.9")`` would take it)."""
    if not isinstance(val_metrics, Mapping | None):  # dict() took pairs, raised on an int
        raise TypeError(f"val_metrics must be a mapping or None, got {type(val_metrics).__name__}")
    metrics = dict(val_metrics or {})
    if bad := [key for key in metrics if not isinstance(key, str)]:
        raise ValueError(f"val_metrics keys must be strings, got {bad[0]!r}")
    return {key: _metric(key, value) for key, value in metrics.items()}


class Applied(Protocol):
    """What ``metrics_of_the_model`` reads of an applied command (``executor.CommandOutcome``,
    whose module imports this one)."""

    kind: str
    ok: bool


def metrics_of_the_model(
    metrics: dict[str, float], applied: Sequence[Applied], epoch: int
) -> dict[str, float]:
    """``end_epoch``'s metrics, or none when a command applied at its start (a seed command or a
    ROLLBACK that arrived while the trainer validated) changed the model they were measured
    on: reported and checkpointed with the epoch, they would describe another model (a
    ROLLBACK to epoch k read as epoch n's validation, 180 times better than the model's)."""
    changed = sorted({o.kind for o in applied if o.ok and o.kind != "optimizer"})
    if metrics and changed:
        logger.warning(
            "end_epoch(%d): %s command(s) applied at its start changed the model its validation "
            "metrics were measured on; they are not recorded for this epoch",
            epoch,
            "/".join(changed),
        )
        return {}
    return metrics


def _metric(key: str, value: object) -> float:
    name = f"val_metrics[{key!r}]"
    if isinstance(value, (torch.Tensor, np.ndarray)):  # ``tensor.numpy()`` too
        if value.size != 1 if isinstance(value, np.ndarray) else value.numel() != 1:
            raise ValueError(f"{name} must be one number, got an array of shape {value.shape}")
        value = value.item()
    try:
        return float(check_real(name, value))
    except OverflowError:  # an int past a float's range: refused as any other non-number
        bits = value.bit_length()  # type: ignore[union-attr]
        raise ValueError(f"{name} must be a float, got an int of {bits} bits") from None


def operation_name(operation: int) -> str:
    """``SEED_OPERATION_GERMINATE`` -> ``germinate`` (unknown values as their number)."""
    try:
        return SeedOperation.Name(operation).removeprefix("SEED_OPERATION_").lower()
    except ValueError:
        return str(operation)


class ManagerReport:
    """Event bookkeeping, telemetry export and performance figures of a kernel manager."""

    def __init__(self, state: ManagerState, guard: IsolationGuard) -> None:
        self.state = state
        self.guard = guard
        self._last_noted: tuple[KasminaCommand, bool] | None = None  # ``noted``

    def export_leyline_telemetry(self, command_stats: Mapping[str, int]) -> TelemetryPacket:
        """One packet with the manager's whole state: cache, loads, gates, commands (the
        handler's ``command_stats``), isolation, seeds' stages and alphas, validation metrics
        and measured performance."""
        state = self.state
        metrics: list[Metric] = [
            ("kasmina.epoch", float(state.epoch), _GAUGE, None),
            ("kasmina.step", float(state.global_step), _COUNTER, None),
        ]
        cache = state.kernel_cache.stats()
        for key in ("hits", "misses", "evictions", "uncached"):
            metrics.append((f"cache.{key}", float(cache[key]), _COUNTER, None))
        metrics.append(("cache.hit_rate", hit_rate(cache), _GAUGE, None))
        for key in ("entries", "pinned", "bytes_used"):
            metrics.append((f"cache.{key}", float(cache[key]), _GAUGE, None))
        load = state.loader.load_latency
        counts = state.loader.counters
        for key in ("loads", "load_failures", "loads_coalesced"):
            metrics.append((f"kernel.{key}", float(counts[key]), _COUNTER, None))
        metrics += [
            ("kernel.load_ms_mean", load.mean_ms, _GAUGE, None),
            ("kernel.load_ms_p50", load.p50_ms, _GAUGE, None),
            ("kernel.load_ms_last", load.last_ms, _GAUGE, None),
        ]
        for (gate, passed), count in sorted(state.gate_counts.items()):
            labels = {"gate": f"G{gate}", "passed": str(passed).lower()}
            metrics.append(("lifecycle.gate_results", float(count), _COUNTER, labels))
        # The handler's counters since the start: ``commands.*``, never a name of an event
        # (``command.rejected`` events carry counts since the last report, summed by readers).
        for key, count in sorted(command_stats.items()):
            name, _, reason = key.partition(":")
            labels = {"reason": reason} if reason else None
            name = f"{name}_by_reason" if reason else name  # the total is not one of its series
            metrics.append((f"commands.{name}", float(count), _COUNTER, labels))
        for key, count in sorted(state.counters.items()):
            kind, _, result = key.rpartition(":")
            if result in ("ok", "refused"):
                labels = {"kind": kind, "result": result}
                metrics.append(("commands.by_kind", float(count), _COUNTER, labels))
        metrics += self._isolation_metrics()
        metrics += self._seed_metrics()
        for key, value in sorted(state.val_metrics.items()):
            metrics.append((f"val.{key}", float(value), _GAUGE, None))
        for key, value in self.get_performance_metrics().items():
            metrics.append((f"perf.{key}", float(value), _GAUGE, None))
        return state.telemetry.packet(metrics)

    def _isolation_metrics(self) -> list[Metric]:
        """The counters are the manager's own, which only go up (``violations``: one per seed
        per violating step; ``violating_steps``: steps with any); the live seeds' violation
        counts (reset by RECYCLING and put back by a rollback) are a gauge."""
        registry = self.state.registry
        seeds = list(registry) if registry is not None else []
        live = sum(r.seed.isolation_violations for r in seeds)
        violations = self.state.counters["isolation_seed_violations"]
        return [
            ("isolation.violations", float(violations), _COUNTER, None),
            ("isolation.seed_violations", float(live), _GAUGE, None),
            ("isolation.violating_steps", float(self.guard.violating_steps), _COUNTER, None),
            ("isolation.breaker_trips", float(self.guard.breaker_trips), _COUNTER, None),
            ("seed.field_reports", float(self.state.field_reports_total), _COUNTER, None),
        ]  # fmt: skip

    def _seed_metrics(self) -> list[Metric]:
        registry = self.state.registry
        if registry is None:
            return []
        metrics: list[Metric] = []
        by_stage = Counter(r.stage.name for r in registry)
        for stage, count in sorted(by_stage.items()):
            metrics.append(("seeds.in_stage", float(count), _GAUGE, {"stage": stage}))
        for record in registry:
            labels = {"seed_id": record.seed_id, "stage": record.stage.name}
            metrics.append(("seed.stage", float(int(record.stage)), _GAUGE, labels))
            metrics.append(("seed.alpha", record.seed.alpha_value, _GAUGE, labels))
            evaluation = record.seed.evaluation
            if evaluation is not None:
                metrics.append(("seed.benefit", evaluation.benefit, _GAUGE, labels))
                metrics.append(("seed.loss_with", evaluation.loss_with, _GAUGE, labels))
                metrics.append(("seed.loss_without", evaluation.loss_without, _GAUGE, labels))
                metrics.append(("seed.gate_score", evaluation.score, _GAUGE, labels))
                if evaluation.metric_measured:  # as measured: NaN or inf included
                    for name in ("metric_with", "metric_without"):
                        value = getattr(evaluation, name)
                        metrics.append((f"seed.{name}", value, _GAUGE, labels))
        return metrics

    def system_state(self) -> SystemStatePacket:
        """The Leyline ``SystemStatePacket`` of now: what a controller decides on.

        ``current_epoch`` (the last epoch ended, 0 before any), ``global_step``,
        ``validation_accuracy`` and ``validation_loss`` (from end_epoch's metrics:
        ``val_accuracy``/``accuracy``/``val_acc`` and ``val_loss``/``loss``; 0 when absent) and
        ``seed_stages``. The packet has no per-seed numbers, so ``training_metrics`` carries
        them under ``seed/<id>/alpha``, ``seed/<id>/epochs_in_stage`` and, for a seed Kasmina
        has evaluated, ``seed/<id>/benefit`` (relative validation-loss reduction),
        ``seed/<id>/gate_score`` and ``seed/<id>/evaluated_stage`` (the stage value it was
        measured in), and, when a metric was measured, ``seed/<id>/metric_with`` and
        ``seed/<id>/metric_without``; the other validation metrics go in as ``val/<key>``.
        A metric measured but not finite (``metric_fn`` NaN on a batch) is sent as it is, NaN
        or infinite, never left out: the binary packet carries IEEE NaN and infinities, and the
        protobuf JSON mapping writes them as the strings ``"NaN"`` and ``"Infinity"``.
        """
        state = self.state
        val = state.val_metrics
        # The first key of each list present fills the field; every other metric, another
        # synonym included (``accuracy`` beside ``val_accuracy``), goes in as ``val/<key>``.
        fields = [
            next((k for k in keys if k in val), None) for keys in (_ACCURACY_KEYS, _LOSS_KEYS)
        ]
        accuracy, loss = (val[k] if k is not None else 0.0 for k in fields)
        metrics = {f"val/{k}": float(v) for k, v in val.items() if k not in fields}
        stages: dict[str, int] = {}
        registry = state.registry
        for record in registry if registry is not None else ():
            sid, seed = record.seed_id, record.seed
            stages[sid] = SeedLifecycleStage.Value(f"SEED_STAGE_{record.stage.name}")
            metrics[f"seed/{sid}/alpha"] = seed.alpha_value
            metrics[f"seed/{sid}/epochs_in_stage"] = float(seed.epochs_in_stage)
            evaluation = seed.evaluation
            if evaluation is not None:
                metrics[f"seed/{sid}/benefit"] = evaluation.benefit
                metrics[f"seed/{sid}/gate_score"] = evaluation.score
                metrics[f"seed/{sid}/evaluated_stage"] = float(int(evaluation.stage))
                if evaluation.metric_measured:  # NaN or inf included: G5 refuses on them
                    metrics[f"seed/{sid}/metric_with"] = evaluation.metric_with
                    metrics[f"seed/{sid}/metric_without"] = evaluation.metric_without
        return SystemStatePacket(
            version=SYSTEM_STATE_VERSION,
            current_epoch=max(0, state.epoch),
            validation_accuracy=float(accuracy),
            validation_loss=float(loss),
            global_step=state.global_step,
            training_metrics=metrics,
            seed_stages=stages,
        )

    def note_evaluations(self, evaluations: Mapping[str, SeedEvaluation]) -> None:
        """Send each measured seed as a ``seed.benefit`` event (its losses in the labels)."""
        for sid, ev in evaluations.items():
            labels = {
                "seed_id": sid,
                "stage": ev.stage.name,
                "loss_with": f"{ev.loss_with:.6g}",
                "loss_without": f"{ev.loss_without:.6g}",
                "gate_score": f"{ev.score:.6g}",
            }
            if ev.metric_measured:  # "nan" or "inf" when the metric was not finite
                labels["metric_with"] = f"{ev.metric_with:.6g}"
                labels["metric_without"] = f"{ev.metric_without:.6g}"
            self.state.telemetry.emit("seed.benefit", ev.benefit, labels=labels)

    def emit_step_telemetry(self) -> None:
        """The per-step packet: step, cache hit rate, latest load latency, gate results."""
        state = self.state
        if not state.telemetry.enabled:
            return
        passed = sum(n for (_, ok), n in state.gate_counts.items() if ok)
        failed = sum(n for (_, ok), n in state.gate_counts.items() if not ok)
        metrics: list[Metric] = [
            ("kasmina.step", float(state.global_step), _COUNTER, None),
            ("cache.hit_rate", hit_rate(state.kernel_cache.stats()), _GAUGE, None),
            ("kernel.load_ms_last", state.loader.load_latency.last_ms, _GAUGE, None),
            ("lifecycle.gates_passed", float(passed), _COUNTER, None),
            ("lifecycle.gates_failed", float(failed), _COUNTER, None),
            ("isolation.violating_steps", float(self.guard.violating_steps), _COUNTER, None),
        ]
        state.telemetry.send(state.telemetry.packet(metrics))

    # ------------------------------------------------------------------ events
    def note_command(self, command: KasminaCommand, ok: bool, reason: str) -> None:
        """Count an executed command by kind and result; keep it (with why) in the log."""
        kind = _command_kind(command)
        reason = clipped(reason, MAX_REASON_CHARS)
        with interrupts_deferred():  # counted, logged and known as noted, or none of them
            self.state.counters[f"{kind}:{'ok' if ok else 'refused'}"] += 1
            self.state.command_log.append((command.command_id, kind, ok, reason))
            self._last_noted = (command, ok)

    def noted(self, command: KasminaCommand) -> bool | None:
        """How ``command`` (this object) was noted, when it is the last command noted; else
        None: whether an interrupt that cut its application short came before or after."""
        last = self._last_noted
        return last[1] if last is not None and last[0] is command else None

    def revise_command(self, command: KasminaCommand, ok: bool, reason: str) -> None:
        """``command`` ended otherwise than noted (a multi-rank repair overturned this rank's
        outcome): its log entry and its count say so instead."""
        log = self.state.command_log
        for i in range(len(log) - 1, -1, -1):
            command_id, kind, was_ok, _ = log[i]
            if command_id == command.command_id:
                self.state.counters[f"{kind}:{'ok' if was_ok else 'refused'}"] -= 1
                self.state.counters[f"{kind}:{'ok' if ok else 'refused'}"] += 1
                log[i] = (command_id, kind, ok, clipped(reason, MAX_REASON_CHARS))
                return
        # No longer in the bounded log: a revise overturns, so the earlier outcome was the other.
        self.state.counters[f"{_command_kind(command)}:{'refused' if ok else 'ok'}"] -= 1
        self.note_command(command, ok, reason)

    def note_gate(self, record: SeedRecord, result: GateResult) -> None:
        """Count a gate evaluation and send it as a ``lifecycle.gate`` event."""
        self.state.gate_counts[(result.gate, result.passed)] += 1
        labels = {
            "seed_id": record.seed_id,
            "gate": f"G{result.gate}",
            "passed": str(result.passed).lower(),
            "reason": result.reason,
        }
        self.state.telemetry.emit("lifecycle.gate", 1.0 if result.passed else 0.0, labels=labels)

    def note_field_report(self, report: dict[str, Any]) -> None:
        """Keep a harvested seed's field report and send it as telemetry."""
        self.state.field_reports.append(report)
        self.state.field_reports_total += 1
        labels = {k: str(v) for k, v in report.items()}
        self.state.telemetry.emit("seed.field_report", 1.0, labels=labels)

    # ------------------------------------------------------------------ performance
    def _on_training_thread(self) -> bool:
        """Whether this is the thread that registered the model and steps it (the forwards a
        measurement runs would race that thread's anywhere else)."""
        registry = self.state.registry
        return registry is None or registry.on_training_thread()

    def get_performance_metrics(self) -> dict[str, float]:
        """Measured figures (NaN: not measured yet). Command overhead is the time
        ``handle_adaptation_command`` takes on arrival (parse, verify, validate, queue); command
        latency is the time a command takes to apply at its safe point."""
        state = self.state
        # Only once a step of this process named the training thread (the clock will not do: a
        # restarted trainer's ROLLBACK sets it): before, the registering thread is a guess, and
        # a trainer of its own may be running forwards (an exporter attached them).
        if (
            math.isnan(state.dormant_overhead_us)
            and state.perf["step"].count
            and self._on_training_thread()
        ):
            self.measure_dormant_overhead()  # elsewhere a read: NaN until end_epoch measures
        perf, loader = state.perf, state.loader
        return {
            "command_overhead_p50_us": perf["overhead"].p50_us,
            "command_latency_p50_us": perf["command"].p50_us,
            "commands_measured": float(perf["command"].count),
            "cache_hit_p50_us": loader.hit_latency.p50_us,
            "cache_hit_rate": hit_rate(state.kernel_cache.stats()),
            "kernel_load_ms_mean": loader.load_latency.mean_ms,
            "kernel_load_ms_p50": loader.load_latency.p50_ms,
            "step_p50_us": perf["step"].p50_us,
            "execute_kernel_p50_us": perf["execute"].p50_us,
            "dormant_overhead_us": state.dormant_overhead_us,
        }

    def validate_performance_targets(self, repeats: int = 200) -> dict[str, TargetCheck]:
        """Measure, now, each docs/design.md §8 target this device can measure, and return
        ``{name: TargetCheck(measured, target, unit, met)}`` (``perf_targets.measure_targets``
        lists the targets; each is a median of ``repeats`` runs on private objects, so measuring
        changes nothing the run depends on). ``dormant_overhead_us`` is measured anew on the
        training thread, once a slot with no running seed has run; elsewhere it is the last
        measurement (a read)."""
        repeats = check_positive_int("repeats", repeats)

        def dormant_overhead() -> float:
            if self._on_training_thread():
                return self.measure_dormant_overhead(repeats)
            return self.state.dormant_overhead_us  # elsewhere the last measurement (a read)

        measurements = measure_targets(
            repeats,
            device=self.state.device,
            dormant_overhead=dormant_overhead,
            state_version=SYSTEM_STATE_VERSION,
        )
        return {
            name: TargetCheck(measured, target, unit, measured <= target)
            for name, (measured, target, unit) in measurements.items()
        }

    def measure_dormant_overhead(self, repeats: int = 200) -> float:
        """Median forward time of a slot whose seeds are all dormant minus its bare host's, on
        an input of the slot's first-seen shape (µs; NaN when no such slot has run yet), kept as
        the reported figure. Timed by ``perf_targets.dormant_overhead_us``, which leaves the
        host no trace. Only on the training thread (the one that registered the model and steps
        it), as it runs the live model: ``RuntimeError`` elsewhere. ``ValueError`` unless
        ``repeats`` is an int >= 1."""
        repeats = check_positive_int("repeats", repeats)
        if not self._on_training_thread():
            raise RuntimeError(
                "measure_dormant_overhead runs forwards on the live model: call it on the "
                "training thread (the one that calls step()), between steps"
            )
        registry = self.state.registry
        sample = registry.dormant_sample() if registry is not None else None
        if sample is None:
            return math.nan
        slot, x = sample
        overhead = dormant_overhead_us(slot, x, repeats)
        if not math.isnan(overhead):  # NaN: a forward raised, and the last figure stands
            self.state.dormant_overhead_us = overhead
        return overhead


@dataclass(frozen=True)
class TargetCheck:
    """One docs/design.md §8 target measured: the value, the bound, its unit, and whether the
    value is within the bound (every target here is an upper bound)."""

    measured: float
    target: float
    unit: str
    met: bool

    def __bool__(self) -> bool:
        """Whether the target was met: the specification's ``Dict[str, bool]`` reading
        (``all(manager.validate_performance_targets().values())``) holds."""
        return self.met


def _command_kind(command: KasminaCommand) -> str:
    """The counter kind of a command: its kind, or ``seed.<operation>`` for a seed command."""
    seed = command.seed
    return command.kind if seed is None else f"seed.{operation_name(seed.operation)}"


def hit_rate(stats: Mapping[str, Any]) -> float:
    """The kernel cache's hit rate as reported: NaN before any lookup (not measured yet, as
    every figure here; the cache's own ``stats()`` says 0.0, which reads as all missed)."""
    return float(stats["hit_rate"]) if stats["hits"] + stats["misses"] else math.nan
