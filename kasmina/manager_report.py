"""What the kernel manager reports: events, Leyline telemetry packets, measured performance.

Kept apart from the manager's mechanics so each file stays readable; ``ManagerReport`` is
mixed into ``KasminaKernelManager`` and reads only its public state. Every number is measured
by the manager itself (its own timers, the cache's counters, the handler's counters); nothing is
assumed. The DESIGN §8 targets are in ``kasmina.perfstats``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from kasmina.leyline import MetricType, SeedOperation, TelemetryPacket
from kasmina.perfstats import DESIGN_TARGETS_US

if TYPE_CHECKING:
    from kasmina.commands import KasminaCommand
    from kasmina.gates import GateResult
    from kasmina.manager import KasminaKernelManager
    from kasmina.slots import SeedRecord

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
    """Telemetry export and performance figures of a ``KasminaKernelManager``."""

    def export_leyline_telemetry(self: KasminaKernelManager) -> TelemetryPacket:
        """One packet with the manager's whole state: cache, loads, gates, commands,
        isolation, seeds' stages and alphas, validation metrics and measured performance."""
        metrics: list[Metric] = [
            ("kasmina.epoch", float(self.epoch), _GAUGE, None),
            ("kasmina.step", float(self.global_step), _COUNTER, None),
        ]
        cache = self.kernel_cache.stats()
        for key in ("hits", "misses", "evictions", "uncached"):
            metrics.append((f"cache.{key}", float(cache[key]), _COUNTER, None))
        for key in ("hit_rate", "entries", "pinned", "bytes_used"):
            metrics.append((f"cache.{key}", float(cache[key]), _GAUGE, None))
        load = self.loader.load_latency
        for key in ("loads", "load_failures", "loads_coalesced"):
            metrics.append((f"kernel.{key}", float(self.loader.counters[key]), _COUNTER, None))
        metrics += [
            ("kernel.load_ms_mean", load.mean_ms, _GAUGE, None),
            ("kernel.load_ms_p50", load.p50_ms, _GAUGE, None),
            ("kernel.load_ms_last", load.last_ms, _GAUGE, None),
        ]
        for (gate, passed), count in sorted(self.gate_counts.items()):
            labels = {"gate": f"G{gate}", "passed": str(passed).lower()}
            metrics.append(("lifecycle.gate_results", float(count), _COUNTER, labels))
        for key, count in sorted(self.handler.stats.items()):
            name, _, reason = key.partition(":")
            labels = {"reason": reason} if reason else None
            metrics.append((f"command.{name}", float(count), _COUNTER, labels))
        for key, count in sorted(self.counters.items()):
            kind, _, result = key.rpartition(":")
            if result in ("ok", "refused"):
                labels = {"kind": kind, "result": result}
                metrics.append(("command.by_kind", float(count), _COUNTER, labels))
        metrics += self._isolation_metrics()
        metrics += self._seed_metrics()
        for key, value in sorted(self.val_metrics.items()):
            metrics.append((f"val.{key}", float(value), _GAUGE, None))
        for key, value in self.get_performance_metrics().items():
            metrics.append((f"perf.{key}", float(value), _GAUGE, None))
        return self.telemetry.packet(metrics)

    def _isolation_metrics(self: KasminaKernelManager) -> list[Metric]:
        registry = self.registry
        seeds = list(registry) if registry is not None else []
        violations = sum(r.seed.isolation_violations for r in seeds)
        return [
            ("isolation.violations", float(violations), _COUNTER, None),
            ("isolation.violating_steps", float(self.guard.violating_steps), _COUNTER, None),
            ("isolation.breaker_trips", float(self.guard.breaker_trips), _COUNTER, None),
            ("seed.field_reports", float(len(self.field_reports)), _COUNTER, None),
        ]  # fmt: skip

    def _seed_metrics(self: KasminaKernelManager) -> list[Metric]:
        if self.registry is None:
            return []
        metrics: list[Metric] = []
        by_stage = Counter(r.stage.name for r in self.registry)
        for stage, count in sorted(by_stage.items()):
            metrics.append(("seeds.in_stage", float(count), _GAUGE, {"stage": stage}))
        for record in self.registry:
            labels = {"seed_id": record.seed_id, "stage": record.stage.name}
            metrics.append(("seed.stage", float(int(record.stage)), _GAUGE, labels))
            metrics.append(("seed.alpha", record.seed.alpha_value, _GAUGE, labels))
        return metrics

    def emit_step_telemetry(self: KasminaKernelManager) -> None:
        """The per-step packet: step, cache hit rate, latest load latency, gate results."""
        if not self.telemetry.enabled:
            return
        passed = sum(n for (_, ok), n in self.gate_counts.items() if ok)
        failed = sum(n for (_, ok), n in self.gate_counts.items() if not ok)
        metrics: list[Metric] = [
            ("kasmina.step", float(self.global_step), _COUNTER, None),
            ("cache.hit_rate", float(self.kernel_cache.stats()["hit_rate"]), _GAUGE, None),
            ("kernel.load_ms_last", self.loader.load_latency.last_ms, _GAUGE, None),
            ("lifecycle.gates_passed", float(passed), _COUNTER, None),
            ("lifecycle.gates_failed", float(failed), _COUNTER, None),
            ("isolation.violating_steps", float(self.guard.violating_steps), _COUNTER, None),
        ]
        self.telemetry.send(self.telemetry.packet(metrics))

    # ------------------------------------------------------------------ events
    def note_command(
        self: KasminaKernelManager, command: KasminaCommand, ok: bool, reason: str
    ) -> None:
        """Count an executed command by kind and result; keep it (with why) in the log."""
        seed = command.seed
        kind = command.kind if seed is None else f"seed.{operation_name(seed.operation)}"
        self.counters[f"{kind}:{'ok' if ok else 'refused'}"] += 1
        self.command_log.append((command.command_id, kind, ok, reason))

    def note_gate(self: KasminaKernelManager, record: SeedRecord, result: GateResult) -> None:
        """Count a gate evaluation and send it as a ``lifecycle.gate`` event."""
        self.gate_counts[(result.gate, result.passed)] += 1
        labels = {
            "seed_id": record.seed_id,
            "gate": f"G{result.gate}",
            "passed": str(result.passed).lower(),
            "reason": result.reason,
        }
        self.telemetry.emit("lifecycle.gate", 1.0 if result.passed else 0.0, labels=labels)

    def note_field_report(self: KasminaKernelManager, report: dict[str, Any]) -> None:
        """Keep a harvested seed's field report and send it as telemetry."""
        self.field_reports.append(report)
        labels = {k: str(v) for k, v in report.items()}
        self.telemetry.emit("seed.field_report", 1.0, labels=labels)

    # ------------------------------------------------------------------ performance
    def get_performance_metrics(self: KasminaKernelManager) -> dict[str, float]:
        """Measured figures (NaN: not measured yet). Command overhead is the handler's parse,
        verify, validate and dispatch time of ``handle_adaptation_command`` minus execution."""
        if math.isnan(self.dormant_overhead_us):
            self.measure_dormant_overhead()
        perf = self.perf
        return {
            "command_overhead_p50_us": perf["overhead"].p50_us,
            "command_latency_p50_us": perf["command"].p50_us,
            "commands_measured": float(perf["command"].count),
            "cache_hit_p50_us": self.loader.hit_latency.p50_us,
            "cache_hit_rate": float(self.kernel_cache.stats()["hit_rate"]),
            "kernel_load_ms_mean": self.loader.load_latency.mean_ms,
            "kernel_load_ms_p50": self.loader.load_latency.p50_ms,
            "step_p50_us": perf["step"].p50_us,
            "execute_kernel_p50_us": perf["execute"].p50_us,
            "dormant_overhead_us": self.dormant_overhead_us,
        }

    def validate_performance_targets(self: KasminaKernelManager) -> dict[str, bool]:
        """Each DESIGN §8 target this manager measures -> met? (False while unmeasured)."""
        metrics = self.get_performance_metrics()
        return {name: bool(metrics[name] <= bound) for name, bound in DESIGN_TARGETS_US.items()}

    def measure_dormant_overhead(self: KasminaKernelManager, repeats: int = 200) -> float:
        """Median forward time of a slot whose seeds are all dormant minus its bare host's, on
        an input of the slot's first-seen shape (µs; NaN when no such slot has run yet). Runs
        in eval mode (no batch-norm statistics move) and draws no global random numbers."""
        registry = self.registry
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
        self.dormant_overhead_us = max(0.0, overhead)
        return self.dormant_overhead_us
