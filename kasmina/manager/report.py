"""What the kernel manager reports: events, Leyline telemetry packets, measured performance.

``ManagerReport`` is a component: it receives the ``ManagerState`` it records into and reads,
and the ``IsolationGuard`` whose counters it reports. Every number is measured by the manager
itself (its own timers, the cache's counters, the handler's counters, passed in by the façade);
nothing is assumed. The docs/design.md §8 targets are in ``kasmina.utils.perfstats``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from kasmina.control.commands import KasminaCommand
from kasmina.leyline import MetricType, SeedOperation, TelemetryPacket
from kasmina.manager.guard import IsolationGuard
from kasmina.manager.slots import SeedRecord
from kasmina.manager.state import ManagerState
from kasmina.seeds.gates import GateResult
from kasmina.utils.perfstats import DESIGN_TARGETS_US

__all__ = ["ManagerReport"]

_COUNTER = MetricType.METRIC_TYPE_COUNTER
_GAUGE = MetricType.METRIC_TYPE_GAUGE
Metric = tuple[str, float, int, Mapping[str, str] | None]


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
        for key in ("hit_rate", "entries", "pinned", "bytes_used"):
            metrics.append((f"cache.{key}", float(cache[key]), _GAUGE, None))
        load = state.loader.load_latency
        for key in ("loads", "load_failures", "loads_coalesced"):
            metrics.append((f"kernel.{key}", float(state.loader.counters[key]), _COUNTER, None))
        metrics += [
            ("kernel.load_ms_mean", load.mean_ms, _GAUGE, None),
            ("kernel.load_ms_p50", load.p50_ms, _GAUGE, None),
            ("kernel.load_ms_last", load.last_ms, _GAUGE, None),
        ]
        for (gate, passed), count in sorted(state.gate_counts.items()):
            labels = {"gate": f"G{gate}", "passed": str(passed).lower()}
            metrics.append(("lifecycle.gate_results", float(count), _COUNTER, labels))
        for key, count in sorted(command_stats.items()):
            name, _, reason = key.partition(":")
            labels = {"reason": reason} if reason else None
            metrics.append((f"command.{name}", float(count), _COUNTER, labels))
        for key, count in sorted(state.counters.items()):
            kind, _, result = key.rpartition(":")
            if result in ("ok", "refused"):
                labels = {"kind": kind, "result": result}
                metrics.append(("command.by_kind", float(count), _COUNTER, labels))
        metrics += self._isolation_metrics()
        metrics += self._seed_metrics()
        for key, value in sorted(state.val_metrics.items()):
            metrics.append((f"val.{key}", float(value), _GAUGE, None))
        for key, value in self.get_performance_metrics().items():
            metrics.append((f"perf.{key}", float(value), _GAUGE, None))
        return state.telemetry.packet(metrics)

    def _isolation_metrics(self) -> list[Metric]:
        registry = self.state.registry
        seeds = list(registry) if registry is not None else []
        violations = sum(r.seed.isolation_violations for r in seeds)
        return [
            ("isolation.violations", float(violations), _COUNTER, None),
            ("isolation.violating_steps", float(self.guard.violating_steps), _COUNTER, None),
            ("isolation.breaker_trips", float(self.guard.breaker_trips), _COUNTER, None),
            ("seed.field_reports", float(len(self.state.field_reports)), _COUNTER, None),
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
        return metrics

    def emit_step_telemetry(self) -> None:
        """The per-step packet: step, cache hit rate, latest load latency, gate results."""
        state = self.state
        if not state.telemetry.enabled:
            return
        passed = sum(n for (_, ok), n in state.gate_counts.items() if ok)
        failed = sum(n for (_, ok), n in state.gate_counts.items() if not ok)
        metrics: list[Metric] = [
            ("kasmina.step", float(state.global_step), _COUNTER, None),
            ("cache.hit_rate", float(state.kernel_cache.stats()["hit_rate"]), _GAUGE, None),
            ("kernel.load_ms_last", state.loader.load_latency.last_ms, _GAUGE, None),
            ("lifecycle.gates_passed", float(passed), _COUNTER, None),
            ("lifecycle.gates_failed", float(failed), _COUNTER, None),
            ("isolation.violating_steps", float(self.guard.violating_steps), _COUNTER, None),
        ]
        state.telemetry.send(state.telemetry.packet(metrics))

    # ------------------------------------------------------------------ events
    def note_command(self, command: KasminaCommand, ok: bool, reason: str) -> None:
        """Count an executed command by kind and result; keep it (with why) in the log."""
        seed = command.seed
        kind = command.kind if seed is None else f"seed.{operation_name(seed.operation)}"
        self.state.counters[f"{kind}:{'ok' if ok else 'refused'}"] += 1
        self.state.command_log.append((command.command_id, kind, ok, reason))

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
        labels = {k: str(v) for k, v in report.items()}
        self.state.telemetry.emit("seed.field_report", 1.0, labels=labels)

    # ------------------------------------------------------------------ performance
    def get_performance_metrics(self) -> dict[str, float]:
        """Measured figures (NaN: not measured yet). Command overhead is the time
        ``handle_adaptation_command`` takes on arrival (parse, verify, validate, queue); command
        latency is the time a command takes to apply at its safe point."""
        state = self.state
        if math.isnan(state.dormant_overhead_us):
            self.measure_dormant_overhead()
        perf, loader = state.perf, state.loader
        return {
            "command_overhead_p50_us": perf["overhead"].p50_us,
            "command_latency_p50_us": perf["command"].p50_us,
            "commands_measured": float(perf["command"].count),
            "cache_hit_p50_us": loader.hit_latency.p50_us,
            "cache_hit_rate": float(state.kernel_cache.stats()["hit_rate"]),
            "kernel_load_ms_mean": loader.load_latency.mean_ms,
            "kernel_load_ms_p50": loader.load_latency.p50_ms,
            "step_p50_us": perf["step"].p50_us,
            "execute_kernel_p50_us": perf["execute"].p50_us,
            "dormant_overhead_us": state.dormant_overhead_us,
        }

    def validate_performance_targets(self) -> dict[str, bool]:
        """Each docs/design.md §8 target this manager measures -> met? (False while unmeasured)."""
        metrics = self.get_performance_metrics()
        return {name: bool(metrics[name] <= bound) for name, bound in DESIGN_TARGETS_US.items()}

    def measure_dormant_overhead(self, repeats: int = 200) -> float:
        """Median forward time of a slot whose seeds are all dormant minus its bare host's, on
        an input of the slot's first-seen shape (µs; NaN when no such slot has run yet). Runs
        in eval mode (no batch-norm statistics move) and draws no global random numbers."""
        registry = self.state.registry
        sample = registry.dormant_sample() if registry is not None else None
        if sample is None:
            return math.nan
        slot, x = sample
        host_ns: list[int] = []
        slot_ns: list[int] = []
        modes = [(module, module.training) for module in slot.modules()]
        slot.eval()
        try:
            with torch.no_grad():
                slot(x), slot.host(x)  # warm up
                for _ in range(repeats):
                    t0 = time.perf_counter_ns()
                    slot.host(x)
                    t1 = time.perf_counter_ns()
                    slot(x)
                    t2 = time.perf_counter_ns()
                    host_ns.append(t1 - t0)
                    slot_ns.append(t2 - t1)
        finally:
            for module, mode in modes:
                module.training = mode
        overhead = (statistics.median(slot_ns) - statistics.median(host_ns)) / 1e3
        self.state.dormant_overhead_us = max(0.0, overhead)
        return self.state.dormant_overhead_us
