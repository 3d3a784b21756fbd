"""What the manager reports is what happened: no events for optimizers a rollback only built in
scratch, no telemetry failure from an error text that is not UTF-8, NaN for a rate not measured,
a command-path latency timed on accepted commands only."""

from __future__ import annotations

import math

import kasmina.control.auth as auth
import kasmina.manager.perf_targets as report
from kasmina.control.builders import make_rollback_command
from tests.manager.helpers import SEED0, Rig, S, run_command, walk_to_active

OPTIMIZER_EVENTS = ("optimizer_created", "seed_optimizer_created", "seed_promoted")


def _events(rig: Rig, names: tuple[str, ...]) -> list[str]:
    return [m.name for p in rig.sink.packets for m in p.metrics if m.name in names]


class Refusing:
    """A tracked object whose load can be made to raise: the rollback is then refused."""

    fail = False

    def state_dict(self) -> dict:
        return {"v": 1}

    def load_state_dict(self, state: dict) -> None:
        if self.fail:
            raise RuntimeError("cannot load")


def test_a_rollback_announces_no_optimizer_it_only_built_in_scratch(rig: Rig, mlp) -> None:
    """A ROLLBACK builds the checkpoint's optimizers apart and the live ones adopt their state
    (the host's object stays): it sent ``optimizer_created``, ``seed_optimizer_created`` and
    ``seed_promoted`` for them, also when it was then refused and changed nothing."""
    manager, tracked = rig.manager, Refusing()
    manager.track("sched", tracked)
    assert rig.send("germinate", SEED0, mlp)
    walk_to_active(rig, [SEED0], epoch=0)  # promoted into the host optimizer
    rig.train(1)
    manager.end_epoch(1)
    rig.train(1)
    manager.end_epoch(2)
    host = manager.optimizers.optimizer("host")
    for refused in (False, True):
        tracked.fail = refused
        rig.sink.clear()
        ok = run_command(manager, rig.signed(make_rollback_command(1)))
        assert ok is not refused and manager.optimizers.optimizer("host") is host
        assert _events(rig, OPTIMIZER_EVENTS) == []
        assert _events(rig, ("command.complete",)) == ["command.complete"]


def test_an_error_text_that_is_not_utf8_reaches_the_reports_escaped(rig: Rig, mlp) -> None:
    """A kernel's probe raising with a file name holding an undecodable byte (a lone surrogate,
    as Python decodes such names): the G3 event's label could not be encoded, the ADVANCE was
    refused with that ``UnicodeEncodeError`` as its reason and the gate event was lost."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    manager.end_epoch(0)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.COMPATIBILITY_CHECK
    name = b"/data/caf\xe9.bin".decode("utf-8", "surrogateescape")

    def raising(*_args, **_kwargs):
        raise RuntimeError(f"cannot open {name}")

    manager.seed(SEED0).kernel.forward = raising
    rig.train(1)  # the forward probes the kernel: a fault
    rig.sink.clear()
    assert not rig.send("advance", SEED0)
    reason = str(manager.command_log[-1])
    assert "G3" in reason and "\\udce9" in reason and "UnicodeEncodeError" not in reason
    assert _events(rig, ("lifecycle.gate",)) == ["lifecycle.gate"]


def test_the_cache_hit_rate_is_nan_before_any_lookup(rig: Rig, mlp) -> None:
    """No lookup yet read as every lookup missed (0.0) beside the other figures' NaN."""
    assert math.isnan(rig.manager.get_performance_metrics()["cache_hit_rate"])
    packet = rig.manager.export_leyline_telemetry()
    rate = next(m.value for m in packet.metrics if m.name == "cache.hit_rate")
    assert math.isnan(rate)
    assert rig.send("germinate", SEED0, mlp)
    assert rig.manager.get_performance_metrics()["cache_hit_rate"] == 0.0  # one miss


def test_command_path_times_accepted_commands_only(monkeypatch) -> None:
    """More repeats than one verifier takes live nonces: each batch has its own verifier and
    timestamp, so no timed command is a ``too_many_commands`` refusal (one verifier for all
    refused every command past ``MAX_LIVE_NONCES`` and the median timed the refusals)."""
    handlers: list = []

    class Spy(report.LeylineAdaptationHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            handlers.append(self)

    monkeypatch.setattr(report, "LeylineAdaptationHandler", Spy)
    monkeypatch.setattr(auth, "MAX_LIVE_NONCES", 5)
    monkeypatch.setattr(report, "_COMMANDS_PER_VERIFIER", 4, raising=False)
    assert math.isfinite(report._command_path_us(10))
    assert sum(h.stats["accepted"] for h in handlers) >= 10  # the timed ones, and warm-ups
    assert all(h.stats["rejected"] == 0 for h in handlers)
    assert all(h.stats["accepted"] <= 5 for h in handlers)  # a bounded pool for each
