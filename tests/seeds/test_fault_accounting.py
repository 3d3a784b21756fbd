"""What a contained fault costs a seed, and what is kept of it.

QUARANTINE comes exactly at ``fault_limit`` (never for an ACTIVE seed, which keeps counting); a
COMPATIBILITY_CHECK probe that faults is contained and G3 says why; RECYCLING forgets the faults
and checkpoints keep them; the fault log and its reasons are bounded, the logging is bounded and
nothing is printed; and neither the guarded forward nor its backward reads the device: the faults
are read at the step boundary, by one poll.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from kasmina.seeds.extra_state import decode_extra_state
from kasmina.seeds.faults import FAULT_LOG_SIZE, FAULT_REASON_CHARS, short_reason
from kasmina.seeds.gates import ProbeFault
from kasmina.seeds.inject import attach
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.stages import SeedStage
from kasmina.utils import flags as flags_module
from tests.profiling import DispatchedOps
from tests.seeds.fault_helpers import (
    BATCH,
    C,
    Flaky,
    Net,
    NonFinite,
    Raises,
    ReturnsTuple,
    WrongShape,
    fault_events,
    four_stage_layer,
    make_seed,
    reporting_table,
)

S = SeedStage


QUARANTINABLE = [S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION]


# --------------------------------------------------------------------------- fault limit


@pytest.mark.parametrize("limit", [1, 2, 3])
@pytest.mark.parametrize("stage", QUARANTINABLE)
def test_quarantine_comes_exactly_at_the_fault_limit(stage: SeedStage, limit: int) -> None:
    table, sink = reporting_table(1)
    kernel = Flaky(C, bad_calls=set(range(1, 100)))
    seed = make_seed(kernel, stage, table, fault_limit=limit)
    h = torch.randn(BATCH, C)
    for n in range(1, limit):
        assert seed(h) is h
        assert seed.faults == n and seed.stage is stage
    assert seed(h) is h
    assert seed.faults == limit and seed.stage is S.QUARANTINE
    assert seed(h) is h and kernel.calls == limit  # a quarantined seed runs nothing
    assert len(fault_events(sink)) == limit
    assert [dict(m.labels)["to"] for m in sink.events("lifecycle.transition")][-1] == "QUARANTINE"


def test_an_active_seed_is_never_quarantined_and_keeps_counting(
    x: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    kernel = Flaky(C, bad_calls={1, 2, 3, 4, 5, 7})
    seed = make_seed(kernel, S.ACTIVE, fault_limit=2)
    net, bare = Net(seed), Net(None)
    with caplog.at_level(logging.DEBUG, logger="kasmina.seeds.seed"):
        for call in range(1, 8):
            out = net(x)
            if call in kernel.bad_calls:
                assert torch.equal(out, bare(x))
            out.sum().backward()
    assert seed.stage is S.ACTIVE and seed.faults == 6 and kernel.calls == 7
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "no quarantine" in errors[0].getMessage()


def test_fault_limit_is_validated_and_given_to_every_seed() -> None:
    for bad in (0, -1, True, 2.5, "3"):
        with pytest.raises(ValueError):
            GradientIsolatedSeed(C, "s", fault_limit=bad)  # type: ignore[arg-type]
    seed = GradientIsolatedSeed(C, "s")
    assert seed.fault_limit == 3
    with pytest.raises(ValueError):
        seed.fault_limit = 0
    assert seed.fault_limit == 3
    seed.fault_limit = 7
    assert seed.fault_limit == 7
    layer = KasminaLayer(nn.Linear(4, 6), 3, 2, fault_limit=5)
    assert [s.fault_limit for s in layer.seeds] == [5, 5, 5]
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
    slots = attach(model, ["0", "2"], 2, 4, fault_limit=4)
    assert [s.fault_limit for slot in slots for s in slot.seeds] == [4, 4, 4, 4]
    with pytest.raises(ValueError):
        KasminaLayer(nn.Linear(4, 6), 3, 2, fault_limit=0)


def test_a_lowered_limit_quarantines_at_the_next_fault() -> None:
    seed = make_seed(Raises(C), S.GRAFTING, fault_limit=10)
    h = torch.randn(BATCH, C)
    for _ in range(4):
        seed(h)
    seed.fault_limit = 2  # already past it: the next fault decides
    assert seed.stage is S.GRAFTING
    seed(h)
    assert seed.faults == 5 and seed.stage is S.QUARANTINE


# --------------------------------------------------------------- COMPATIBILITY_CHECK probe


def test_probe_faults_are_contained_and_g3_says_why() -> None:
    h = torch.randn(BATCH, C, requires_grad=True)
    sample = torch.randn(2, C)

    raising = make_seed(Raises(C), S.COMPATIBILITY_CHECK)
    assert raising(h) is h and raising.faults == 1
    assert raising.probe_result == ProbeFault("raised RuntimeError: kernel exploded")
    gate = raising.evaluate_gate(sample=sample, latency_budget_ms=1e3)
    assert not gate.passed and gate.reason == (
        "compatibility probe faulted: raised RuntimeError: kernel exploded"
    )
    assert raising.faults == 1  # G3's own probe (of the sample): its reason, not a fault

    tuple_out = make_seed(ReturnsTuple(C), S.COMPATIBILITY_CHECK)
    assert tuple_out(h) is h and list(tuple_out.fault_log) == ["output tuple is not a Tensor"]

    wide = make_seed(WrongShape(C), S.COMPATIBILITY_CHECK)
    assert wide(h) is h and wide.faults == 1
    assert wide.probe_result is not None  # kept, so that G3 names the mismatch
    assert "shape" in wide.evaluate_gate(latency_budget_ms=1e3).reason

    nan = make_seed(NonFinite(C, float("nan")), S.COMPATIBILITY_CHECK)
    assert nan(h) is h and nan.faults == 0
    assert nan.poll_nonfinite() is True and nan.faults == 1
    assert not nan.evaluate_gate(latency_budget_ms=1e3).passed


# ------------------------------------------------------------------------ bookkeeping, state


def test_recycling_forgets_the_faults() -> None:
    seed = make_seed(Raises(C), S.GRAFTING, fault_limit=2)
    h = torch.randn(BATCH, C)
    seed(h)
    seed(h)
    assert seed.stage is S.QUARANTINE
    seed.transition_to(S.HARVESTING)
    assert seed.field_report is not None and seed.field_report["faults"] == 2
    assert seed.field_report["last_fault"] == "raised RuntimeError: kernel exploded"
    seed.transition_to(S.COOLDOWN)
    seed.transition_to(S.RECYCLING)
    assert seed.faults == 0 and not seed.fault_log and seed.nonfinite_events == 0


def test_recycling_clears_a_pending_non_finite_flag() -> None:
    seed = make_seed(NonFinite(C, float("nan")), S.GRAFTING)
    seed(torch.randn(BATCH, C))
    seed.transition_to(S.HARVESTING)
    seed.transition_to(S.COOLDOWN)
    seed.transition_to(S.RECYCLING)
    assert seed.poll_nonfinite() is False and seed.faults == 0


def test_faults_and_fault_log_survive_a_state_dict_round_trip() -> None:
    seed = make_seed(Flaky(C, bad_calls={1, 3}), S.GRAFTING)
    h = torch.randn(BATCH, C)
    for _ in range(3):
        seed(h)
    saved = seed.state_dict()
    clone = make_seed(Flaky(C, bad_calls=set()), S.ISOLATED_INIT)
    clone.load_state_dict(saved)
    assert clone.stage is S.GRAFTING and clone.faults == 2
    assert list(clone.fault_log) == [
        "raised ValueError: bad batch 1",
        "raised ValueError: bad batch 3",
    ]

    old = dict(decode_extra_state(saved["_extra_state"]))  # saved before faults were counted
    del old["faults"], old["fault_log"]
    clone.set_extra_state(old)
    assert clone.faults == 0 and not clone.fault_log

    for bad, reason in (
        (dict(decode_extra_state(saved["_extra_state"]), faults=-1, alpha=0.9), "'faults'"),
        (
            dict(decode_extra_state(saved["_extra_state"]), fault_log="not a list", alpha=0.9),
            "'fault_log': must be a list",
        ),
    ):
        with pytest.raises(ValueError, match=reason):
            clone.set_extra_state(bad)
    assert clone.faults == 0 and clone.alpha_value == seed.alpha_value  # nothing was written


def test_the_fault_log_is_bounded_and_its_reasons_short() -> None:
    seed = make_seed(Raises(C, message="x" * 5000), S.ACTIVE)
    h = torch.randn(BATCH, C)
    for _ in range(FAULT_LOG_SIZE + 4):
        seed(h)
    assert seed.faults == FAULT_LOG_SIZE + 4 and len(seed.fault_log) == FAULT_LOG_SIZE
    assert all(r.startswith("raised RuntimeError: xxx") and len(r) <= 200 for r in seed.fault_log)


def test_a_reason_of_exactly_the_cap_is_kept_whole() -> None:
    exact = "x" * FAULT_REASON_CHARS
    assert short_reason(exact) == exact
    longer = short_reason(exact + "y")
    assert longer == "x" * (FAULT_REASON_CHARS - 3) + "..." and len(longer) == FAULT_REASON_CHARS
    assert short_reason(" two\n\tlines ") == "two lines"


def test_logging_is_bounded_and_nothing_is_printed(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = make_seed(Raises(C), S.GRAFTING, fault_limit=3)
    h = torch.randn(BATCH, C)
    with (
        caplog.at_level(logging.DEBUG, logger="kasmina.seeds.seed"),
        caplog.at_level(logging.DEBUG, logger="kasmina.seeds.faults"),
    ):
        for _ in range(3):
            seed(h)
    faults = [r for r in caplog.records if "the host output stands in" in r.getMessage()]
    assert [r.levelno for r in faults] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert "kernel exploded" in faults[0].getMessage()
    assert any(
        r.levelno == logging.ERROR and "quarantined" in r.getMessage() for r in caplog.records
    )
    assert capsys.readouterr() == ("", "")


def test_the_guarded_forward_and_backward_never_read_the_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(14)
    kernels = [
        NonFinite(2, float("nan")),
        Flaky(2, bad_calls={2}),
        WrongShape(2),
        nn.Sequential(nn.Linear(2, 2), nn.Tanh()),
    ]
    layer, x = four_stage_layer(kernels)
    seed = make_seed(Raises(C), S.GRAFTING)
    with DispatchedOps() as mode:
        for _ in range(2):
            layer(x).sum().backward()
            seed(torch.randn(BATCH, C))
    assert mode.scalar_reads == []
    assert [s.faults for s in layer.seeds] == [0, 1, 2, 0] and seed.faults == 2
    transfers: list[int] = []
    read = flags_module._read
    monkeypatch.setattr(flags_module, "_read", lambda f: transfers.append(len(f)) or read(f))
    with DispatchedOps() as mode:
        # The step boundary, one transfer: each seed that fell back in a forward with grad
        # (a non-finite output, a raise, a wrong shape) loses the step's gradient.
        assert layer.poll_nonfinite() == ["layer[0]", "layer[1]", "layer[2]"]
    assert mode.scalar_reads == [] and transfers == [12]  # each seed's finite, fault, cut flags
    assert layer.poll_nonfinite() == [] and transfers == [12, 12]  # settled: clean flags again
