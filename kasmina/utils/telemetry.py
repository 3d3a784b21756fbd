"""Telemetry: build Leyline ``TelemetryPacket``s and fan them out to sinks.

Telemetry must never break training, so a sink that raises is skipped and the reporter itself
never raises on a send. Nor may a broken sink flood the log: its first failure is logged (with
its traceback, once), later ones are only counted, and after ``max_sink_failures`` consecutive
failures the sink is disabled with one more log record. Packets are plain protobuf messages so
that any transport (a file, a socket, a message bus) can carry them unchanged.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

from google.protobuf.json_format import MessageToDict

from kasmina.leyline import Metric, MetricType, TelemetryPacket

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_SINK_FAILURES",
    "Event",
    "JsonlFileSink",
    "MemorySink",
    "TelemetryReporter",
    "TelemetrySink",
]


@runtime_checkable
class TelemetrySink(Protocol):
    """Anything that accepts finished packets."""

    def send(self, packet: TelemetryPacket) -> None: ...


class MemorySink:
    """Keeps the newest ``capacity`` packets in memory (a ring buffer): for tests and dashboards."""

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._buffer: deque[TelemetryPacket] = deque(maxlen=capacity)
        self.dropped = 0  # packets pushed out of the ring by newer ones

    def send(self, packet: TelemetryPacket) -> None:
        if len(self._buffer) == self.capacity:
            self.dropped += 1
        self._buffer.append(packet)

    @property
    def packets(self) -> list[TelemetryPacket]:
        """The buffered packets, oldest first."""
        return list(self._buffer)

    def events(self, name: str) -> list[Metric]:
        """Every buffered metric called ``name``, oldest first."""
        return [m for p in self._buffer for m in p.metrics if m.name == name]

    def clear(self) -> None:
        self._buffer.clear()

    def __len__(self) -> int:
        return len(self._buffer)


class JsonlFileSink:
    """Appends one JSON object per packet per line (protobuf JSON mapping), flushed each time.

    The file is opened in append mode so that restarts add to the same log; lines written by one
    sink are never interleaved because writes are serialized by a lock.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")

    def send(self, packet: TelemetryPacket) -> None:
        line = json.dumps(MessageToDict(packet, preserving_proto_field_name=True), sort_keys=True)
        with self._lock:
            if self._file is None:
                raise ValueError(f"telemetry file {self.path} is closed")
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> JsonlFileSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


MetricSpec = tuple[str, float, int, Mapping[str, str] | None]

# Consecutive failures after which a sink is disabled: enough to ride out a transient hiccup
# (a full pipe, a reconnecting socket), few enough that a dead sink costs nothing for long.
DEFAULT_MAX_SINK_FAILURES = 10


class _SinkState:
    """One attached sink and its failure counts (consecutive, and in all)."""

    __slots__ = ("failures", "sink", "total_failures")

    def __init__(self, sink: TelemetrySink) -> None:
        self.sink = sink
        self.failures = 0
        self.total_failures = 0


class TelemetryReporter:
    """Builds packets stamped with a source, a sequence id and a timestamp, and sends them.

    A sink that raises ``max_sink_failures`` times in a row is disabled (moved to
    ``disabled_sinks``) with one error logged; ``sink_errors`` counts every failure. A success
    resets the consecutive count, so a sink that fails now and then stays attached.
    """

    def __init__(
        self,
        source_subsystem: str = "kasmina",
        sinks: Sequence[TelemetrySink] = (),
        clock: Callable[[], float] = time.time,
        *,
        max_sink_failures: int = DEFAULT_MAX_SINK_FAILURES,
    ) -> None:
        if isinstance(max_sink_failures, bool) or not isinstance(max_sink_failures, int):
            raise TypeError(f"max_sink_failures must be an int, got {max_sink_failures!r}")
        if max_sink_failures < 1:
            raise ValueError(f"max_sink_failures must be an int >= 1, got {max_sink_failures}")
        self.source_subsystem = source_subsystem
        # Replaced, never mutated in place, so a send iterating the old list on another thread
        # is unaffected when a sink is added or disabled.
        self._entries: list[_SinkState] = [_SinkState(s) for s in sinks]
        self._clock = clock
        self._seq = itertools.count()
        # Packet ids are "<source>-<run>-<seq>": unique across restarts of the same subsystem.
        self._id_prefix = f"{source_subsystem}-{secrets.token_hex(4)}-"
        self.max_sink_failures = max_sink_failures
        self.sink_errors = 0
        self._disabled: list[TelemetrySink] = []
        self._failure_lock = threading.Lock()

    @property
    def sinks(self) -> tuple[TelemetrySink, ...]:
        """The sinks that still receive packets (disabled ones are in ``disabled_sinks``)."""
        return tuple(entry.sink for entry in self._entries)

    @property
    def disabled_sinks(self) -> tuple[TelemetrySink, ...]:
        """Sinks dropped after ``max_sink_failures`` consecutive failures, oldest first."""
        return tuple(self._disabled)

    @property
    def enabled(self) -> bool:
        """Whether any sink listens; hot paths skip building packets when none does."""
        return bool(self._entries)

    def add_sink(self, sink: TelemetrySink) -> None:
        with self._failure_lock:
            self._entries = [*self._entries, _SinkState(sink)]

    def packet(self, metrics: Iterable[MetricSpec]) -> TelemetryPacket:
        """Build (but do not send) a packet holding ``(name, value, type, labels)`` metrics."""
        pkt = self._new_packet()
        for name, value, metric_type, labels in metrics:
            _add_metric(pkt, name, value, metric_type, labels)
        return pkt

    def emit(
        self,
        name: str,
        value: float = 1.0,
        metric_type: int = MetricType.METRIC_TYPE_EVENT,
        labels: Mapping[str, str] | None = None,
    ) -> TelemetryPacket:
        """Build a one-metric packet, send it to every sink, and return it."""
        pkt = self._new_packet()
        _add_metric(pkt, name, value, metric_type, labels)
        self.send(pkt)
        return pkt

    def event(
        self,
        name: str,
        metric_type: int = MetricType.METRIC_TYPE_EVENT,
        labels: Mapping[str, str] | None = None,
    ) -> Event:
        """A reusable one-metric event whose name, type and fixed labels are built once."""
        return Event(self, name, metric_type, labels)

    def send(self, packet: TelemetryPacket) -> None:
        """Deliver ``packet`` to every sink; a failing sink is skipped (see the class doc)."""
        for entry in self._entries:
            try:
                entry.sink.send(packet)
            except Exception as exc:
                self._sink_failed(entry, exc)
            else:
                if entry.failures:
                    entry.failures = 0

    def _sink_failed(self, entry: _SinkState, exc: Exception) -> None:
        """Count a failure; log only the sink's first one, and disable it at the limit.

        A sink that fails on every packet would otherwise write one traceback per packet, and
        under a flood of rejected commands that is a flood of log records.
        """
        with self._failure_lock:
            self.sink_errors += 1
            entry.failures += 1
            entry.total_failures += 1
            first = entry.total_failures == 1
            disable = entry.failures >= self.max_sink_failures and any(
                e is entry for e in self._entries
            )
            if disable:
                self._entries = [e for e in self._entries if e is not entry]
                self._disabled.append(entry.sink)
        if first:
            logger.error(
                "telemetry sink %r failed (%s: %s); its packets are skipped, and it is disabled "
                "after %d consecutive failures",
                entry.sink,
                type(exc).__name__,
                exc,
                self.max_sink_failures,
                exc_info=exc,
            )
        if disable:
            logger.error(
                "telemetry sink %r disabled after %d consecutive failures (%d in all): %s: %s",
                entry.sink,
                entry.failures,
                entry.total_failures,
                type(exc).__name__,
                exc,
            )

    def _new_packet(self, template: TelemetryPacket | None = None) -> TelemetryPacket:
        """A packet with a fresh id and timestamp, copied from ``template`` when given."""
        pkt = TelemetryPacket()
        if template is not None:
            pkt.CopyFrom(template)
        else:
            pkt.source_subsystem = self.source_subsystem
        pkt.packet_id = f"{self._id_prefix}{next(self._seq)}"
        seconds, nanos = divmod(int(self._clock() * 1e9), 1_000_000_000)
        ts = pkt.timestamp
        ts.seconds = seconds
        ts.nanos = nanos
        return pkt


class Event:
    """A one-metric packet prepared once and stamped per emit: cheap enough for hot paths.

    Building a protobuf field by field from Python costs ~0.5 us per field; copying a prepared
    packet and filling the id, timestamp, value and per-call labels costs a fraction of that.
    """

    def __init__(
        self,
        reporter: TelemetryReporter,
        name: str,
        metric_type: int,
        labels: Mapping[str, str] | None,
    ) -> None:
        self.reporter = reporter
        self.name = name
        self._template = TelemetryPacket(source_subsystem=reporter.source_subsystem)
        _add_metric(self._template, name, 0.0, metric_type, labels)

    def emit(self, value: float = 1.0, labels: Mapping[str, str] | None = None) -> TelemetryPacket:
        """Send one packet with ``value`` and ``labels`` added to the fixed ones; return it."""
        reporter = self.reporter
        pkt = reporter._new_packet(self._template)
        metric = pkt.metrics[0]
        metric.value = value
        if labels:
            metric_labels = metric.labels
            for key, label in labels.items():
                metric_labels[key] = label
        reporter.send(pkt)
        return pkt


def _add_metric(
    pkt: TelemetryPacket,
    name: str,
    value: float,
    metric_type: int,
    labels: Mapping[str, str] | None,
) -> None:
    metric = pkt.metrics.add()
    metric.name = name
    metric.type = metric_type
    metric.value = value
    if labels:
        metric.labels.update(labels)
