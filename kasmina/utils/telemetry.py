"""Telemetry: build Leyline ``TelemetryPacket``s and fan them out to sinks.

Telemetry must never break training, so a sink that raises is skipped and the reporter itself
never raises on a send. Nor may a broken sink flood the log: its first failure is logged (with
its traceback, once), later ones are only counted, and after ``max_sink_failures`` consecutive
failures the sink is disabled with one more log record. Packets are plain protobuf messages so
that any transport (a file, a socket, a message bus) can carry them unchanged.

Hot paths (the command handler's ack and completion events) use ``Event.post``, which records a
``PendingPacket`` (the event, the sequence number, the clock reading, the value, the per-call
labels) instead of building the protobuf. A sink with a ``send_pending`` method (``MemorySink``)
keeps the record and builds the packet only when it is read; any other sink gets the packet,
built once per event for all of them. The packet is the same either way: its id and timestamp
are taken when the event is posted, and it is built from the same fields by the same code.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from kasmina.leyline import Metric, MetricType, TelemetryPacket
from kasmina.utils.checks import check_positive_int
from kasmina.utils.locks import fork_safe
from kasmina.utils.orphans import ORPHANED_SINKS, release_orphaned_sinks

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_SINK_FAILURES",
    "Event",
    "MemorySink",
    "PendingPacket",
    "TelemetryReporter",
    "TelemetrySink",
    "utf8",
]


@runtime_checkable
class TelemetrySink(Protocol):
    """Anything that accepts finished packets."""

    def send(self, packet: TelemetryPacket) -> None: ...


class MemorySink:
    """Keeps the newest ``capacity`` packets in memory (a ring buffer): for tests and dashboards.

    A posted event (``send_pending``) is kept as its ``PendingPacket`` and built into a packet
    the first time it is read (``packets``, ``events``); it takes one slot of the ring like any
    packet, so memory stays bounded by ``capacity`` and ``dropped`` counts both alike.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = check_positive_int("capacity", capacity)  # True was a ring of one
        self._buffer: deque[TelemetryPacket | PendingPacket] = deque(maxlen=self.capacity)
        self.dropped = 0  # packets pushed out of the ring by newer ones

    def send(self, packet: TelemetryPacket | PendingPacket) -> None:
        if len(self._buffer) == self.capacity:
            self.dropped += 1
        self._buffer.append(packet)

    def send_pending(self, pending: PendingPacket) -> None:
        """Keep a posted event unbuilt; it becomes a packet when first read."""
        self.send(pending)

    @property
    def packets(self) -> list[TelemetryPacket]:
        """The buffered packets, oldest first."""
        return [_built(item) for item in list(self._buffer)]

    def events(self, name: str) -> list[Metric]:
        """Every buffered metric called ``name``, oldest first."""
        found: list[Metric] = []
        for item in list(self._buffer):
            if type(item) is PendingPacket:
                if item.name != name:  # a posted event holds one metric: skip the build
                    continue
                item = item.packet()
            found.extend(m for m in item.metrics if m.name == name)
        return found

    def clear(self) -> None:
        self._buffer.clear()

    def __len__(self) -> int:
        return len(self._buffer)


MetricSpec = tuple[str, float, int, Mapping[str, str] | None]

# Consecutive failures after which a sink is disabled: enough to ride out a transient hiccup
# (a full pipe, a reconnecting socket), few enough that a dead sink costs nothing for long.
DEFAULT_MAX_SINK_FAILURES = 10


class _SinkState:
    """One attached sink and its failure counts (consecutive, and in all)."""

    __slots__ = ("failures", "send_pending", "sink", "total_failures")

    def __init__(self, sink: TelemetrySink) -> None:
        self.sink = sink
        # A sink that can keep a posted event unbuilt says so with a ``send_pending`` method.
        send_pending = getattr(sink, "send_pending", None)
        self.send_pending: Callable[[PendingPacket], None] | None = (
            send_pending if callable(send_pending) else None
        )
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
        max_sink_failures = check_positive_int("max_sink_failures", max_sink_failures)
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
        self._failure_lock = fork_safe(threading.Lock())

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
        if ORPHANED_SINKS:
            release_orphaned_sinks()
        with self._failure_lock:
            self._entries = [*self._entries, _SinkState(sink)]

    def close_sink(self, sink: TelemetrySink) -> None:
        """Stop sending to ``sink`` and close it (``sink.close()``, if it has one): later
        packets go to the other sinks, none to a closed file."""
        with self._failure_lock:
            self._entries = [e for e in self._entries if e.sink is not sink]
        close = getattr(sink, "close", None)
        if callable(close):
            close()

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
        if ORPHANED_SINKS:
            release_orphaned_sinks()
        for entry in self._entries:
            try:
                entry.sink.send(packet)
            except Exception as exc:
                self._sink_failed(entry, exc)
            else:
                if entry.failures:
                    entry.failures = 0

    def _deliver(self, pending: PendingPacket) -> None:
        """``send`` for a posted event: a ``send_pending`` sink keeps it unbuilt, any other sink
        gets its packet (built once, shared by all of them); failures are handled as in ``send``.
        """
        if ORPHANED_SINKS:
            release_orphaned_sinks()
        for entry in self._entries:
            try:
                send_pending = entry.send_pending
                if send_pending is not None:
                    send_pending(pending)
                else:
                    entry.sink.send(pending.packet())
            except Exception as exc:
                self._sink_failed(entry, exc)
            else:
                if entry.failures:
                    entry.failures = 0

    def _sink_failed(self, entry: _SinkState, exc: Exception) -> None:
        """Count a failure; log only the sink's first one, and disable it at the limit.

        A sink that fails on every packet would otherwise write one traceback per packet, and
        under a flood of rejected commands that is a flood of log records. A sink closed (or
        disabled) while this packet was on its way to it, by another thread, is no failure: the
        packet raced the close and is not delivered, as it would not have been a moment later.
        """
        with self._failure_lock:
            if not any(e is entry for e in self._entries):
                return
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
        _stamp(pkt, self._id_prefix, next(self._seq), self._clock())
        return pkt


class Event:
    """A one-metric packet prepared once and stamped per emit: cheap enough for hot paths.

    Building a protobuf field by field from Python costs ~0.5 us per field; copying a prepared
    packet and filling the id, timestamp, value and per-call labels costs a fraction of that.
    ``post`` goes further and builds nothing on the caller's thread (see the module doc).
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
        """Send one packet with ``value`` and ``labels`` added to the fixed ones; return it.

        The packet is built here (it is returned); sinks receive that same packet object.
        """
        reporter = self.reporter
        pkt = self._build(next(reporter._seq), reporter._clock(), value, labels)
        reporter.send(pkt)
        return pkt

    def post(self, value: float = 1.0, labels: Mapping[str, str] | None = None) -> None:
        """``emit`` without building the packet now: sinks that keep posted events build it when
        read (identical to what ``emit`` would have built at this moment), any other sink gets
        it built at once. ``value`` and ``labels`` are checked here, so a bad one raises here
        like ``emit`` (a label that is not UTF-8 is written as its escape, as ``emit`` writes
        it); ``labels`` is copied, so the caller may reuse the mapping."""
        if type(value) is not float:
            metric = Metric()
            metric.value = value  # the protobuf's TypeError for a non-number (None included)
            value = metric.value  # read now: a tensor changed in place later is not the value
        if labels:
            labels = dict(labels)
            ascii_only = True
            for key, label in labels.items():
                if type(key) is not str or type(label) is not str:
                    Metric(labels=labels)  # raises the protobuf's own TypeError
                    break
                ascii_only = ascii_only and key.isascii() and label.isascii()
            if not ascii_only:  # a lone surrogate would fail every sink's build: as ``emit``
                labels = {utf8(k): utf8(v) for k, v in labels.items()}
        else:
            labels = None
        reporter = self.reporter
        pending = PendingPacket(self, next(reporter._seq), reporter._clock(), value, labels)
        reporter._deliver(pending)

    def _build(
        self, seq: int, when: float, value: float, labels: Mapping[str, str] | None
    ) -> TelemetryPacket:
        pkt = TelemetryPacket()
        pkt.CopyFrom(self._template)
        _stamp(pkt, self.reporter._id_prefix, seq, when)
        metric = pkt.metrics[0]
        metric.value = value
        if labels:
            metric_labels = metric.labels
            for key, label in labels.items():
                try:
                    metric_labels[key] = label
                except ValueError:  # a lone surrogate (a file name's byte): its escape
                    metric_labels[utf8(key)] = utf8(label)
        return pkt


# Builds of pending packets are rare (a sink read) and short: one lock makes every reader of a
# pending packet get the same packet object, whichever thread builds it first.
_build_lock = fork_safe(threading.Lock())


class PendingPacket:
    """A posted event not yet built: the event, its sequence number, the clock reading, the value
    and the per-call labels. ``packet()`` builds the ``TelemetryPacket`` on first call (the one
    ``Event.emit`` would have built when the event was posted) and returns that object after."""

    __slots__ = ("_labels", "_packet", "_seq", "_value", "_when", "event")

    def __init__(
        self,
        event: Event,
        seq: int,
        when: float,
        value: float,
        labels: Mapping[str, str] | None,
    ) -> None:
        self.event = event
        self._seq = seq
        self._when = when
        self._value = value
        self._labels = labels
        self._packet: TelemetryPacket | None = None

    @property
    def name(self) -> str:
        """The name of the packet's one metric."""
        return self.event.name

    def packet(self) -> TelemetryPacket:
        """The packet (built on first call; the same object every call)."""
        pkt = self._packet
        if pkt is None:
            with _build_lock:
                pkt = self._packet
                if pkt is None:
                    pkt = self._packet = self.event._build(
                        self._seq, self._when, self._value, self._labels
                    )
                    self._labels = None  # only the packet is needed from here on
        return pkt


def _built(item: TelemetryPacket | PendingPacket) -> TelemetryPacket:
    return item.packet() if type(item) is PendingPacket else item  # type: ignore[return-value]


def _stamp(pkt: TelemetryPacket, id_prefix: str, seq: int, when: float) -> None:
    """Fill a packet's id (``<prefix><seq>``) and timestamp (``when``, seconds since the epoch)."""
    pkt.packet_id = f"{id_prefix}{seq}"
    seconds, nanos = divmod(int(when * 1e9), 1_000_000_000)
    ts = pkt.timestamp
    ts.seconds = seconds
    ts.nanos = nanos


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
        try:
            metric.labels.update(labels)
        except ValueError:  # a lone surrogate (a file name in an error's text): not UTF-8
            metric.labels.update({utf8(k): utf8(v) for k, v in labels.items()})


def utf8(text: object) -> str:
    """``text`` as a string protobuf takes: a lone surrogate (``surrogateescape``'s, a file
    name's byte that is not UTF-8) written as its escape."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")
