"""Telemetry reporter and sinks: packet contents, ring buffer, JSONL round trip, failing sinks."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import threading

import pytest
from google.protobuf.json_format import ParseDict

from kasmina.errors import KasminaError, NotARegularFileError
from kasmina.leyline import MetricType, TelemetryPacket
from kasmina.utils.jsonl_sink import JsonlFileSink
from kasmina.utils.telemetry import (
    MemorySink,
    PendingPacket,
    TelemetryReporter,
    TelemetrySink,
)
from tests.crash import KILLED, die, run_in_child


class BrokenSink:
    def __init__(self) -> None:
        self.calls = 0

    def send(self, packet: TelemetryPacket) -> None:
        self.calls += 1
        raise OSError("disk on fire")


def test_emit_builds_one_metric_packet_and_sends_it() -> None:
    sink = MemorySink()
    reporter = TelemetryReporter("tester", [sink], clock=lambda: 1234.25)
    pkt = reporter.emit("seed.loss", 0.5, MetricType.METRIC_TYPE_GAUGE, {"seed": "s1"})
    assert sink.packets == [pkt]
    assert pkt.source_subsystem == "tester"
    assert pkt.packet_id.startswith("tester-")
    assert (pkt.timestamp.seconds, pkt.timestamp.nanos) == (1234, 250_000_000)
    (metric,) = pkt.metrics
    assert metric.name == "seed.loss"
    assert metric.value == 0.5
    assert metric.type == MetricType.METRIC_TYPE_GAUGE
    assert dict(metric.labels) == {"seed": "s1"}


def test_packet_ids_are_unique_per_packet_and_per_reporter() -> None:
    a, b = TelemetryReporter(), TelemetryReporter()
    ids = {a.emit("x").packet_id for _ in range(50)} | {b.emit("x").packet_id for _ in range(50)}
    assert len(ids) == 100


def test_packet_builds_without_sending() -> None:
    sink = MemorySink()
    reporter = TelemetryReporter(sinks=[sink])
    pkt = reporter.packet(
        [
            ("a", 1.0, MetricType.METRIC_TYPE_COUNTER, None),
            ("b", 2.5, MetricType.METRIC_TYPE_GAUGE, {"k": "v"}),
        ]
    )
    assert len(sink) == 0
    assert [(m.name, m.value, dict(m.labels)) for m in pkt.metrics] == [
        ("a", 1.0, {}),
        ("b", 2.5, {"k": "v"}),
    ]
    reporter.send(pkt)
    assert sink.packets == [pkt]


def test_event_merges_fixed_and_per_call_labels_without_leaking_between_emits() -> None:
    sink = MemorySink()
    reporter = TelemetryReporter(sinks=[sink], clock=lambda: 10.0)
    event = reporter.event("command.ack", labels={"kind": "seed"})
    first = event.emit(labels={"command_id": "c1"})
    second = event.emit(2.0, labels={"other": "x"})
    assert dict(first.metrics[0].labels) == {"kind": "seed", "command_id": "c1"}
    assert dict(second.metrics[0].labels) == {"kind": "seed", "other": "x"}
    assert second.metrics[0].value == 2.0
    assert first.packet_id != second.packet_id
    assert first.timestamp.seconds == 10
    assert [m.name for m in sink.events("command.ack")] == ["command.ack", "command.ack"]


def test_enabled_reflects_sinks() -> None:
    reporter = TelemetryReporter()
    assert not reporter.enabled
    reporter.add_sink(MemorySink())
    assert reporter.enabled
    assert isinstance(reporter.sinks[0], TelemetrySink)


def test_memory_sink_is_a_ring_buffer() -> None:
    sink = MemorySink(capacity=3)
    reporter = TelemetryReporter(sinks=[sink])
    sent = [reporter.emit(f"m{i}") for i in range(5)]
    assert len(sink) == 3
    assert sink.packets == sent[2:]
    assert sink.dropped == 2
    assert [m.name for m in sink.events("m4")] == ["m4"]
    assert sink.events("m0") == []
    sink.clear()
    assert sink.packets == []


def test_memory_sink_rejects_non_positive_capacity() -> None:
    with pytest.raises(ValueError):
        MemorySink(capacity=0)


def test_jsonl_lines_parse_back_to_the_same_packets(tmp_path) -> None:
    path = tmp_path / "sub" / "telemetry.jsonl"
    sink = JsonlFileSink(path)
    reporter = TelemetryReporter(sinks=[sink], clock=lambda: 99.5)
    sent = [
        reporter.emit("command.ack", labels={"command_id": "abc"}),
        reporter.emit("loss", 0.125, MetricType.METRIC_TYPE_GAUGE),
        reporter.emit('weird "name"\n', -1e300, labels={"ünï": "çødé"}),
    ]
    # Flushed after every packet: readable before the sink is closed.
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    parsed = [ParseDict(json.loads(line), TelemetryPacket()) for line in lines]
    assert parsed == sent
    sink.close()
    with JsonlFileSink(path) as again:  # appends, never truncates
        TelemetryReporter(sinks=[again]).emit("more")
    assert len(path.read_text(encoding="utf-8").splitlines()) == 4


def _names(path) -> list[str]:
    return [json.loads(line)["metrics"][0]["name"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("how", ["file deleted", "folder deleted", "file moved"])
def test_a_file_taken_from_under_the_sink_is_followed_by_a_new_one(tmp_path, how, caplog) -> None:
    """A cleanup deleted the file (or its folder) mid-run, or a log rotator moved it: the sink
    went on writing into the file it held, every packet lost without an error counted or a word
    logged. It starts a new file at the path, with one warning."""
    import shutil

    path = tmp_path / "run" / "telemetry.jsonl"
    sink = JsonlFileSink(path, max_bytes=10_000)
    reporter = TelemetryReporter(sinks=[sink])
    reporter.emit("before")
    if how == "file deleted":
        path.unlink()
    elif how == "folder deleted":
        shutil.rmtree(path.parent)
    else:
        path.rename(tmp_path / "moved.jsonl")
    with caplog.at_level(logging.WARNING, logger="kasmina.utils.jsonl_sink"):
        for name in ("after", "later"):
            reporter.emit(name)
    assert _names(path) == ["after", "later"] and reporter.sink_errors == 0
    assert len([r for r in caplog.records if "was deleted, moved or replaced" in r.message]) == 1
    if how == "file moved":
        assert _names(tmp_path / "moved.jsonl") == ["before"]
    with pytest.raises(RuntimeError, match="held by another live sink"):
        JsonlFileSink(path)  # its lock went with the folder: held again, a second sink refused
    sink.close()


def test_a_sink_refused_the_new_lock_never_writes_into_the_new_sinks_file(tmp_path) -> None:
    """The folder was deleted and a second sink made the path's file and lock again: the first
    sink's re-open was refused the lock, but its next packet opened the file without it and
    wrote beside the second sink. It is refused again, on every packet."""
    import shutil

    path = tmp_path / "run" / "telemetry.jsonl"
    old = JsonlFileSink(path)
    old_reporter = TelemetryReporter("old", sinks=[old])
    old_reporter.emit("before")
    shutil.rmtree(path.parent)
    new = JsonlFileSink(path)
    TelemetryReporter("new", sinks=[new]).emit("mine")
    for name in ("refused", "again", "and again"):
        old_reporter.emit(name)
    assert _names(path) == ["mine"]
    assert old_reporter.sink_errors == 3
    old.close()
    new.close()


def test_a_rotation_never_renames_what_the_sink_did_not_write(tmp_path) -> None:
    """A directory made at the path after the sink opened it was renamed ``<path>.1`` with its
    contents at the next rotation. What is at the path is refused (a sink error) and left."""
    path = tmp_path / "telemetry.jsonl"
    sink = JsonlFileSink(path, max_bytes=200)
    reporter = TelemetryReporter(sinks=[sink])
    reporter.emit("first", labels={"pad": "x" * 150})
    path.unlink()
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    reporter.emit("second", labels={"pad": "x" * 150})  # past the cap: a rotation was due
    assert reporter.sink_errors == 1
    assert (path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "telemetry.jsonl.1").exists()
    sink.close()


def test_a_line_torn_by_a_crash_is_never_glued_to_the_next_packet(tmp_path) -> None:
    """A trainer killed mid-line leaves a torn last line; the restarted trainer's sink ends it
    before its first packet, so that packet (and every later one) stays readable."""
    path = tmp_path / "telemetry.jsonl"

    def killed_mid_line() -> None:
        sink = JsonlFileSink(path)
        reporter = TelemetryReporter(sinks=[sink])
        reporter.emit("before", 1.0, MetricType.METRIC_TYPE_GAUGE)
        real = sink._file

        class Torn:
            fileno = real.fileno

            def write(self, text: str) -> None:
                real.write(text[: len(text) // 2])
                real.flush()
                die()

        sink._file = Torn()
        reporter.emit("torn", 2.0, MetricType.METRIC_TYPE_GAUGE, labels={"note": "x" * 400})

    assert run_in_child(killed_mid_line) == KILLED
    assert not path.read_text(encoding="utf-8").endswith("\n")
    with JsonlFileSink(path) as sink:  # the restart
        reporter = TelemetryReporter(sinks=[sink])
        reporter.emit("restart.first")
        reporter.emit("restart.second")
    names, torn = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            names.append(json.loads(line)["metrics"][0]["name"])
        except ValueError:
            torn += 1
    assert names == ["before", "restart.first", "restart.second"] and torn == 1


class _FullDisk:
    """A text file whose every write ends in ENOSPC when flushed (what a full disk does)."""

    def __init__(self, path) -> None:
        self._real = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        return len(text)

    def flush(self) -> None:
        if self.pending:
            raise OSError(errno.ENOSPC, "No space left on device")

    @property
    def closed(self) -> bool:
        return self._real.closed

    def fileno(self) -> int:
        return self._real.fileno()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._real.close()


def test_close_after_a_full_disk_never_raises_and_logs_once(tmp_path, caplog) -> None:
    sink = JsonlFileSink(tmp_path / "t.jsonl")
    sink._file.close()
    full = sink._file = _FullDisk(tmp_path / "t.jsonl")
    reporter = TelemetryReporter("t", [sink], max_sink_failures=3)
    for i in range(5):
        reporter.emit("x", float(i))
    assert reporter.disabled_sinks == (sink,)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kasmina.utils.telemetry"):
        reporter.close_sink(sink)  # the manager's close: must not raise
        sink.close()  # closing twice is harmless
    assert full.closed
    assert len(caplog.records) == 1 and "lost" in caplog.records[0].getMessage()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_refused_at_once_never_blocked_on(tmp_path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException | JsonlFileSink] = []

    def open_it() -> None:
        try:
            outcome.append(JsonlFileSink(fifo))
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=open_it, daemon=True)
    worker.start()
    worker.join(5)
    if not outcome:  # unblock the hung open so the thread ends
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        pytest.fail("opening a FIFO with no reader blocked")
    assert isinstance(outcome[0], NotARegularFileError)
    assert "FIFO" in str(outcome[0])
    with pytest.raises(NotARegularFileError, match="directory") as raised:
        JsonlFileSink(tmp_path)
    assert isinstance(raised.value, KasminaError) and isinstance(raised.value, ValueError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]  # and no lock file beside
    assert not tmp_path.with_name(tmp_path.name + ".lock").exists()


def test_the_file_is_rotated_at_its_size_cap_between_whole_lines(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    cap = 2_000
    sink = JsonlFileSink(path, max_bytes=cap)
    reporter = TelemetryReporter("t", [sink])
    for i in range(300):
        reporter.emit("step", float(i), labels={"pad": "x" * (i % 37)})
    sink.close()
    rotated = tmp_path / "t.jsonl.1"
    assert rotated.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl", "t.jsonl.1", "t.jsonl.lock"]
    values = []
    for file in (rotated, path):
        data = file.read_bytes()
        assert 0 < len(data) <= cap and data.endswith(b"\n")
        for line in data.decode().splitlines():
            values.append(json.loads(line)["metrics"][0]["value"])  # whole lines only
    assert values == [float(i) for i in range(300 - len(values), 300)]  # the newest, in order
    with JsonlFileSink(path, max_bytes=cap) as again:  # a restart keeps counting the old size
        again.send(reporter.packet([("late", 1.0, MetricType.METRIC_TYPE_EVENT, None)]))
    assert path.stat().st_size <= cap and rotated.stat().st_size <= cap
    with pytest.raises(ValueError, match="max_bytes"):
        JsonlFileSink(path, max_bytes=0)


def test_a_rotation_whose_new_file_cannot_be_made_is_retried_at_the_next_send(
    tmp_path, monkeypatch
) -> None:
    """A full disk when the rotation re-created the file left the sink with no file: every
    later send raised "is closed", and after ten the reporter dropped the sink for the run,
    though the disk had room again. The next send opens the file anew; ``close`` still ends
    the sink for good."""
    path = tmp_path / "t.jsonl"
    sink = JsonlFileSink(path, max_bytes=300)
    reporter = TelemetryReporter("t", [sink])
    reporter.emit("before", 1.0)
    reporter.emit("before", 2.0)  # the next line does not fit: its send rotates
    real_open, failed = os.open, []

    def full_disk(name, *args, **kwargs):
        if os.fspath(name) == str(path) and not failed:
            failed.append(name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", full_disk)
    reporter.emit("lost", 3.0)  # logged and counted, the step goes on
    assert failed and not path.exists() and reporter.sink_errors == 1
    reporter.emit("after", 4.0)
    assert sink not in reporter.disabled_sinks
    names = [json.loads(line)["metrics"][0]["name"] for line in path.read_text().splitlines()]
    assert names == ["after"]
    sink.close()
    with pytest.raises(ValueError, match="is closed"):
        sink.send(reporter.packet([("late", 1.0, MetricType.METRIC_TYPE_EVENT, None)]))


def test_one_live_sink_writes_a_file(tmp_path) -> None:
    """Two sinks of one path (two ranks given one config, an overlapping restart) would each
    count only their own bytes and rotate over each other's lines: the second is refused
    while the first is open, in this process or another, and takes the file once it closes."""
    path = tmp_path / "t.jsonl"
    first = JsonlFileSink(path, max_bytes=200)
    with pytest.raises(RuntimeError, match="held by another live sink"):
        JsonlFileSink(path)
    script = (
        "import sys\nfrom kasmina.utils.jsonl_sink import JsonlFileSink\n"
        "try:\n    JsonlFileSink(sys.argv[1])\nexcept RuntimeError as e:\n    print(e)\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True
    )
    assert "held by another live sink" in other.stdout
    first.send(TelemetryReporter("t").packet([("x", 1.0, MetricType.METRIC_TYPE_EVENT, None)]))
    first.close()
    with JsonlFileSink(path) as second:  # the lock went with the first sink's close
        second.send(TelemetryReporter("t").packet([("y", 2.0, MetricType.METRIC_TYPE_EVENT, None)]))
    assert len(path.read_text().splitlines()) == 2


def test_failing_sink_is_logged_and_skipped(caplog) -> None:
    broken, good = BrokenSink(), MemorySink()
    reporter = TelemetryReporter(sinks=[broken, good])
    with caplog.at_level(logging.ERROR, logger="kasmina.utils.telemetry"):
        pkt = reporter.emit("still.delivered")
        reporter.emit("again")
    assert broken.calls == 2
    assert good.packets[0] == pkt and len(good) == 2
    assert reporter.sink_errors == 2
    assert any("failed" in r.getMessage() for r in caplog.records)


def test_closed_file_sink_does_not_break_the_reporter(tmp_path) -> None:
    sink = JsonlFileSink(tmp_path / "t.jsonl")
    sink.close()
    memory = MemorySink()
    reporter = TelemetryReporter(sinks=[sink, memory])
    reporter.emit("after.close")
    assert len(memory) == 1
    assert reporter.sink_errors == 1


def test_a_packet_racing_its_sinks_close_is_dropped_without_an_error(tmp_path, caplog) -> None:
    """A manager's close() on one thread closes the file sink while the trainer's packet is on
    its way to it: the packet is not delivered (as one a moment later would not be), and that
    is no sink failure to log with a traceback."""
    sink, memory = JsonlFileSink(tmp_path / "t.jsonl"), MemorySink()
    reporter = TelemetryReporter(sinks=[sink, memory])
    send = sink.send

    def closed_on_the_way(packet) -> None:  # the other thread's close lands first
        reporter.close_sink(sink)
        send(packet)

    sink.send = closed_on_the_way
    with caplog.at_level(logging.DEBUG, logger="kasmina.utils.telemetry"):
        reporter.emit("raced")
        reporter.emit("after")
    assert reporter.sink_errors == 0 and not caplog.records
    assert reporter.sinks == (memory,) and len(memory) == 2


def test_a_sink_that_keeps_failing_is_disabled_with_one_record(caplog) -> None:
    broken, good = BrokenSink(), MemorySink()
    reporter = TelemetryReporter(sinks=[broken, good], max_sink_failures=5)
    with caplog.at_level(logging.DEBUG, logger="kasmina.utils.telemetry"):
        for _ in range(1_000):
            reporter.emit("flood")
    assert broken.calls == 5 and reporter.sink_errors == 5
    assert reporter.sinks == (good,) and reporter.disabled_sinks == (broken,)
    assert len(good) == 1_000  # the others never noticed
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # its first failure (with traceback), then "disabled"
    assert sum(r.exc_info is not None for r in caplog.records) == 1
    assert "disabled after 5 consecutive failures" in messages[1]


def test_a_sink_that_recovers_between_failures_stays(caplog) -> None:
    class Flaky:
        def __init__(self) -> None:
            self.calls = 0

        def send(self, packet) -> None:
            self.calls += 1
            if self.calls % 2:
                raise OSError("hiccup")

    flaky = Flaky()
    reporter = TelemetryReporter(sinks=[flaky], max_sink_failures=2)
    with caplog.at_level(logging.DEBUG, logger="kasmina.utils.telemetry"):
        for _ in range(100):
            reporter.emit("x")
    assert reporter.sinks == (flaky,) and reporter.sink_errors == 50
    assert len(caplog.records) == 1  # only the first failure is logged


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_max_sink_failures_is_a_positive_int(limit) -> None:
    with pytest.raises((ValueError, TypeError), match="max_sink_failures"):
        TelemetryReporter(max_sink_failures=limit)


# ---- Event.post: the packet is recorded on the hot path and built when a sink reads it ----


class Collect:
    """A sink without ``send_pending``: gets every packet built."""

    def __init__(self) -> None:
        self.packets: list[TelemetryPacket] = []

    def send(self, packet: TelemetryPacket) -> None:
        self.packets.append(packet)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _twin_reporters(sinks_a, sinks_b, clock) -> tuple[TelemetryReporter, TelemetryReporter]:
    a = TelemetryReporter("twin", sinks_a, clock=clock)
    b = TelemetryReporter("twin", sinks_b, clock=clock)
    b._id_prefix = a._id_prefix  # the same run id, so both number their packets alike
    return a, b


def test_post_gives_the_packets_emit_would_have_given(tmp_path) -> None:
    clock = Clock(1_700_000_000.123456789)
    eager, lazy, collect = MemorySink(), MemorySink(), Collect()
    a, b = _twin_reporters([eager], [lazy, collect], clock)
    calls = [
        (1.0, {"command_id": "c1"}),
        (0.0, {"command_id": "c2", "kind": "override"}),  # a per-call label wins, as in emit
        (2.5, None),
        (-1e300, {"ünï": 'çødé "x"\n'}),
        (3, {}),  # an int value, stored as a double either way
    ]
    ea = a.event("command.complete", labels={"kind": "seed", "success": "true"})
    eb = b.event("command.complete", labels={"kind": "seed", "success": "true"})
    for i, (value, labels) in enumerate(calls):
        clock.now += 0.001 * (i + 1)
        ea.emit(value, labels=labels)
        eb.post(value, labels=labels)
    clock.now = 0.0  # reading later changes nothing: id and timestamp were taken at post time
    assert lazy.packets == eager.packets == collect.packets
    assert [p.SerializeToString() for p in lazy.packets] == [
        p.SerializeToString() for p in eager.packets
    ]
    assert lazy.events("command.complete") == eager.events("command.complete")
    first = lazy.packets[0]
    assert first.packet_id == f"{a._id_prefix}0" and first.source_subsystem == "twin"
    assert dict(lazy.packets[1].metrics[0].labels) == {
        "kind": "override",
        "success": "true",
        "command_id": "c2",
    }
    # The JSONL sink (no send_pending) writes the same lines for either.
    paths = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with JsonlFileSink(paths[0]) as fa, JsonlFileSink(paths[1]) as fb:
        a2, b2 = _twin_reporters([fa], [fb], clock)
        a2.event("x", labels={"k": "v"}).emit(0.5, labels={"id": "1"})
        b2.event("x", labels={"k": "v"}).post(0.5, labels={"id": "1"})
    assert paths[0].read_text(encoding="utf-8") == paths[1].read_text(encoding="utf-8")


def test_post_takes_a_tensors_value_when_posted_not_when_read() -> None:
    """A 0-d tensor posted (a running loss) was kept as the tensor and read when the packet was
    built: changed in place meanwhile, the packet held the later value, not the posted one."""
    import torch

    sink = MemorySink()
    event = TelemetryReporter(sinks=[sink]).event("loss")
    running = torch.tensor(1.5)
    event.emit(running)
    event.post(running)
    running.add_(5.0)
    assert [m.value for m in sink.events("loss")] == [1.5, 1.5]


def test_post_builds_nothing_until_read_and_then_builds_once() -> None:
    sink = MemorySink()
    reporter = TelemetryReporter(sinks=[sink], clock=lambda: 5.0)
    event = reporter.event("command.ack", labels={"kind": "seed"})
    labels = {"command_id": "c1"}
    assert event.post(labels=labels) is None
    labels["command_id"] = "changed"  # the caller may reuse its mapping
    (pending,) = list(sink._buffer)
    assert isinstance(pending, PendingPacket) and pending._packet is None
    assert pending.name == "command.ack"
    assert sink.events("other") == [] and pending._packet is None  # no build for another name
    (pkt,) = sink.packets
    assert sink.packets[0] is pkt and pending.packet() is pkt  # built once, the same object
    assert dict(pkt.metrics[0].labels) == {"kind": "seed", "command_id": "c1"}
    assert (pkt.timestamp.seconds, pkt.timestamp.nanos) == (5, 0)


def test_post_checks_its_arguments_like_emit_and_sends_nothing_on_error() -> None:
    sink = MemorySink()
    event = TelemetryReporter(sinks=[sink]).event("x")
    # None: posted, it failed every sink's build and made the ring's every read raise.
    for bad in ({"value": "1.0"}, {"value": None}, {"labels": {"k": 1}}, {"labels": {1: "v"}}):
        with pytest.raises(TypeError):
            event.emit(**bad)
        with pytest.raises(TypeError):
            event.post(**bad)
    assert len(sink) == 0


def test_the_ring_bound_holds_for_posted_events_and_keeps_the_order() -> None:
    sink = MemorySink(capacity=3)
    reporter = TelemetryReporter(sinks=[sink])
    event = reporter.event("m")
    for i in range(7):
        if i % 2:
            event.post(float(i))
        else:
            event.emit(float(i))
    assert len(sink) == 3 and sink.dropped == 4
    assert [p.metrics[0].value for p in sink.packets] == [4.0, 5.0, 6.0]
    assert [m.value for m in sink.events("m")] == [4.0, 5.0, 6.0]
    ids = [int(p.packet_id.rsplit("-", 1)[1]) for p in sink.packets]
    assert ids == [4, 5, 6]
    sink.clear()
    assert sink.packets == []


def test_failing_sinks_are_handled_alike_for_posted_events(caplog) -> None:
    class BrokenPending(MemorySink):
        def send_pending(self, pending: PendingPacket) -> None:
            raise OSError("ring on fire")

    broken, broken_pending, good = BrokenSink(), BrokenPending(), MemorySink()
    reporter = TelemetryReporter(sinks=[broken, broken_pending, good], max_sink_failures=3)
    event = reporter.event("flood")
    with caplog.at_level(logging.DEBUG, logger="kasmina.utils.telemetry"):
        for _ in range(100):
            event.post()
    assert broken.calls == 3 and reporter.sink_errors == 6
    assert reporter.sinks == (good,)
    assert reporter.disabled_sinks == (broken, broken_pending)
    assert len(good) == 100
    assert len(caplog.records) == 4  # per sink: its first failure, then "disabled"


def test_posting_from_threads_loses_nothing_and_reads_agree() -> None:
    sink = MemorySink(capacity=100_000)
    reporter = TelemetryReporter(sinks=[sink])
    event = reporter.event("t")

    def work(n: int) -> None:
        for i in range(2_000):
            event.post(float(i), labels={"thread": str(n)})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pending = list(sink._buffer)
    assert len(pending) == 8_000
    built: list[list[TelemetryPacket]] = [[] for _ in range(4)]
    readers = [
        threading.Thread(target=lambda out: out.extend(p.packet() for p in pending), args=(b,))
        for b in built
    ]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    assert all(x is y for b in built[1:] for x, y in zip(built[0], b, strict=True))
    assert len({p.packet_id for p in sink.packets}) == 8_000


@pytest.mark.parametrize("how", ["emit", "post"])
def test_an_event_label_that_is_not_utf8_is_escaped_not_fatal_to_sinks(tmp_path, how) -> None:
    """A file name's byte that is not UTF-8 (``os.fsdecode``: a lone surrogate) in an event's
    label: ``Event.emit`` raised, and ``Event.post`` took it, then failed in every sink's
    build until the JSONL sink was disabled, and a memory sink raised on every read after."""
    path = tmp_path / "t.jsonl"
    memory = MemorySink()
    with JsonlFileSink(path) as jsonl:
        reporter = TelemetryReporter("t", [jsonl, memory], max_sink_failures=2)
        event = reporter.event("ev")
        bad = os.fsdecode(b"ckpt-\xff.pt")
        for _ in range(3):
            getattr(event, how)(labels={"file": bad})
        reporter.emit("after")
    assert reporter.sink_errors == 0 and not reporter.disabled_sinks
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["metrics"][0]["name"] for line in lines] == ["ev"] * 3 + ["after"]
    assert lines[0]["metrics"][0]["labels"] == {"file": "ckpt-\\udcff.pt"}
    assert [dict(e.labels) for e in memory.events("ev")] == [{"file": "ckpt-\\udcff.pt"}] * 3


def test_a_jsonl_file_whose_rotated_name_cannot_fit_is_refused_up_front(tmp_path) -> None:
    """A name of 254-255 bytes opened, and then every send that had to rotate the file (to
    ``<name>.1``, a name the filesystem refuses) raised. It is refused when the sink is made,
    leaving no file; 253 bytes rotates."""
    with pytest.raises(ValueError, match=r"too long for its rotated <name>\.1"):
        JsonlFileSink(tmp_path / ("t" * 254))
    assert not list(tmp_path.iterdir())
    sink = JsonlFileSink(tmp_path / ("t" * 253), max_bytes=64)
    for _ in range(4):
        sink.send(TelemetryReporter("t").packet([("x", 1.0, MetricType.METRIC_TYPE_EVENT, None)]))
    assert sink.rotated_path.exists()
    sink.close()


@pytest.mark.parametrize("capacity", [True, 0, 2.5, "8"])
def test_a_memory_sinks_capacity_is_a_count(capacity) -> None:
    """``MemorySink(True)`` made a ring of one packet (``True`` is an ``int``)."""
    with pytest.raises(ValueError, match="capacity must be an int >= 1"):
        MemorySink(capacity)
