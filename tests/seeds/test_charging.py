"""Charging a seed's faults at once, or holding them for a multi-rank run's step.

In one process (no ``defer_faults``) every fault is charged when it is found: the fault
containment tests cover that. Here a table's faults are deferred as ``DistributedKasmina`` does
it, without processes: a fault found on the host is held, not counted; what every rank held is
charged on every rank in registry, then rank order, with the rank in each reason
(``charge_gathered``); a rank that leaves charges its own (``charge_here``). The two-rank run is
``tests/manager/test_ddp_step_agreement.py``'s ``test_a_kernel_that_raises_on_one_ranks_data_...``.
Also: which faults cost a seed its step (``loses_step``), and a quarantine under way at a fork.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterator

import pytest
import torch

from kasmina.seeds.charging import (
    DeferredFaults,
    charge,
    charge_gathered,
    contained,
    defer_faults,
    encode,
    loses_step,
)
from kasmina.seeds.faults import FAULT_LOG_SIZE, FAULT_REASON_CHARS, FELL_BACK
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import SeedStage as S
from kasmina.utils.telemetry import MemorySink
from tests.crash import said_in_child
from tests.seeds.fault_helpers import (
    BATCH,
    C,
    Raises,
    fault_events,
    make_seed,
    reporting_table,
)


@pytest.fixture
def reported() -> Iterator[tuple[GPUStateTensor, MemorySink]]:
    table, sink = reporting_table(2)
    yield table, sink
    defer_faults(table, None)


@pytest.fixture
def table(reported: tuple[GPUStateTensor, MemorySink]) -> GPUStateTensor:
    return reported[0]


def _seed(table: GPUStateTensor, limit: int = 3) -> GradientIsolatedSeed:
    return make_seed(Raises(C), S.ISOLATED_INIT, table, fault_limit=limit)


def test_a_deferred_fault_is_held_uncounted_until_charged_here(table: GPUStateTensor) -> None:
    seed = _seed(table)
    held = DeferredFaults()
    defer_faults(table, held)
    h = torch.randn(BATCH, C)
    assert seed(h) is h  # contained as ever: the host stands in
    assert seed.faults == 0 and not seed.fault_log and held
    assert seed(h) is h
    assert held.take() == {"s0": (2, [("exception", "raised RuntimeError: kernel exploded")] * 2)}
    assert not held and seed.faults == 0
    seed(h)
    held.charge_here()  # the rank leaves the run: charged here, as one process does
    assert seed.faults == 1 and list(seed.fault_log) == ["raised RuntimeError: kernel exploded"]
    defer_faults(table, None)  # charged at once again
    seed(h)
    assert seed.faults == 2 and not held


def test_a_measurement_observes_a_fault_and_a_backward_fault_still_drops_the_step(
    table: GPUStateTensor,
) -> None:
    seed = _seed(table)
    held = DeferredFaults()
    defer_faults(table, held)
    seed.observed_faults = observed = []
    seed.record_fault("exception", "raised")
    seed.observed_faults = None
    assert observed == ["exception: raised"] and not held  # seen, never counted
    seed.record_fault("backward", "backward raised")
    assert not bool(seed.finite_flag)  # its step's gradient is dropped now, on this rank
    assert seed.faults == 0 and held.take()["s0"][0] == 1


def test_every_ranks_faults_are_charged_alike_in_rank_order(table: GPUStateTensor) -> None:
    """What two ranks held, charged on one: a count each, the rank in each reason; the third
    quarantines the seed, whichever rank's it is."""
    seed = _seed(table)
    rank0 = encode({"s0": (1, [("shape", "output (2, 3) does not match")])})
    rank1 = encode({"s0": (2, [("exception", "raised A"), ("backward", "raised B")])})
    charge_gathered({"s0": seed}, [rank0, rank1])
    assert seed.faults == 3 and seed.stage == S.QUARANTINE
    assert list(seed.fault_log) == [
        "rank 0: output (2, 3) does not match", "rank 1: raised A", "rank 1: raised B",
    ]  # fmt: skip
    charge_gathered({"s0": seed}, [b"", b""])  # nothing held anywhere: nothing charged
    assert seed.faults == 3


def test_faults_beyond_the_kept_reasons_are_still_counted(
    reported: tuple[GPUStateTensor, MemorySink],
) -> None:
    table, sink = reported
    seed = _seed(table, limit=1000)
    held = DeferredFaults()
    for n in range(FAULT_LOG_SIZE + 4):
        held.add(seed, "exception", f"raised {n}")
    sent = held.take()
    assert sent["s0"][0] == FAULT_LOG_SIZE + 4 and len(sent["s0"][1]) == FAULT_LOG_SIZE
    charge_gathered({"s0": seed}, [encode(sent)])
    assert seed.faults == FAULT_LOG_SIZE + 4
    assert list(seed.fault_log)[-1] == f"rank 0: raised {FAULT_LOG_SIZE + 3}"
    assert list(seed.fault_log)[0] == "rank 0: raised 4"  # the newest FAULT_LOG_SIZE kept
    events = fault_events(sink)  # each one reported, with the kind it was found as
    assert len(events) == FAULT_LOG_SIZE + 4 and {e["kind"] for e in events} == {"exception"}


def test_a_seed_made_on_the_table_later_defers_too(table: GPUStateTensor) -> None:
    held = DeferredFaults()
    defer_faults(table, held)
    later = GradientIsolatedSeed(C, "s1", state=table, index=1)
    later.record_fault("exception", "raised")
    assert later.faults == 0 and held.take() == {"s1": (1, [("exception", "raised")])}


def test_a_run_that_left_does_not_end_a_later_runs_deferral(table: GPUStateTensor) -> None:
    """``DistributedKasmina.close`` may run again after another run joined the manager: a
    stale close ended the later run's deferral, and that rank charged its faults alone again
    (the divergence deferral exists to prevent)."""
    seed = _seed(table)
    old, new = DeferredFaults(), DeferredFaults()
    defer_faults(table, old)
    defer_faults(table, new)  # a second run joined
    defer_faults(table, None, only=old)  # the first one's close, again
    seed.record_fault("exception", "raised")
    assert seed.faults == 0 and new.take()["s0"][0] == 1
    defer_faults(table, None, only=new)
    seed.record_fault("exception", "raised")
    assert seed.faults == 1


def test_a_fault_reported_on_another_thread_mid_charge_neither_waits_nor_quarantines_again(
    table: GPUStateTensor, caplog: pytest.LogCaptureFixture
) -> None:
    """The third fault's event goes to a sink that waits (bounded) for a fault charged on
    another thread, as one waiting for the manager's lock waits for a step charging one: the
    charge held the fault lock around its event, log and quarantine, and that wait timed out.
    The other thread's fault, past the limit with the seed's quarantine decided but not yet
    made, counts without a second try (which found the seed gone and logged a refusal); the
    quarantine comes once, from the fault that reached the limit."""
    seed = _seed(table, limit=3)
    for _ in range(2):
        charge(seed, "exception", "raised")
    done: list[bool] = []

    class Sink:
        def send(self, packet) -> None:
            if not done and any(m.name == "seed.fault" for m in packet.metrics):
                other = threading.Thread(
                    target=charge, args=(seed, "shape", "output (1,) does not match"), daemon=True
                )
                done.append(False)
                other.start()
                other.join(5)
                done[0] = not other.is_alive()

    assert table.telemetry is not None
    table.telemetry.add_sink(Sink())
    with caplog.at_level("ERROR", logger="kasmina.seeds"):
        charge(seed, "exception", "raised")
    assert done == [True]  # the other thread's charge ran while the sink waited
    assert seed.faults == 4 and seed.stage == S.QUARANTINE
    assert len(seed.fault_log) == 4 and table.counters.get("illegal", 0) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "quarantine" in m] == [
        "seed s0: quarantined from ISOLATED_INIT: 3 faults (limit 3), last: raised"
    ]


@pytest.mark.parametrize("kind", ["exception", "type", "shape", "dtype", "device"])
def test_a_call_fault_loses_the_step_only_in_a_training_forward_with_a_graph(kind: str) -> None:
    """A faulted call costs the seed its step in a training stage with a graph being recorded;
    not in COMPATIBILITY_CHECK (it trains nothing), nor without grad (validation), nor under a
    ``torch.func`` transform (its flags may be an ensemble's stacked buffers)."""
    assert loses_step(kind, S.GRAFTING) and loses_step(kind, S.ACTIVE)
    assert not loses_step(kind, S.COMPATIBILITY_CHECK) and not loses_step(kind, S.DORMANT)
    with torch.no_grad():
        assert not loses_step(kind, S.GRAFTING)
    seen: list[bool] = []

    def call(x: torch.Tensor) -> torch.Tensor:
        seen.append(loses_step(kind, S.GRAFTING))
        return x

    torch.func.vmap(call)(torch.zeros(2))
    assert seen == [False]


def test_only_a_call_a_backward_or_a_fallback_loses_the_step() -> None:
    """A backward that raised and a fallback lose the step in any stage; a fault that is not a
    call's (a bookkeeping write, an optimizer's step, a probe) keeps the step's gradients."""
    assert loses_step("backward", S.COMPATIBILITY_CHECK) and loses_step(FELL_BACK, S.ACTIVE)
    for kind in ("bookkeeping", "optimizer", "probe", "gradient", "nonfinite"):
        assert not loses_step(kind, S.GRAFTING), kind


def test_a_fault_contained_past_a_commit_is_charged_at_once_unless_found_here(
    table: GPUStateTensor,
) -> None:
    """``contained`` charges at once what every rank found alike (an optimizer's step, the run
    of non-finite clipped gradients: averaged); one found on this rank's data alone
    (``found_here``) is held for the step's collective."""
    seed = _seed(table)
    held = DeferredFaults()
    defer_faults(table, held)
    contained(seed, "optimizer", "step raised")
    assert seed.faults == 1 and not held
    contained(seed, "bookkeeping", "alpha write raised", found_here=True)
    assert seed.faults == 1 and held.take() == {"s0": (1, [("bookkeeping", "alpha write raised")])}


def test_a_reason_charged_directly_is_one_bounded_line(table: GPUStateTensor) -> None:
    """A reason given to ``charge`` itself (an optimizer's exception text, a gathered rank's
    reason behind its prefix) goes into the fault log, the telemetry and the epoch checksum as
    one line of at most ``FAULT_REASON_CHARS``, as one through ``record_fault`` does."""
    seed = _seed(table, limit=100)
    charge(seed, "optimizer", "step raised\n  Traceback:\n" + "x" * (2 * FAULT_REASON_CHARS))
    (reason,) = seed.fault_log
    assert reason.startswith("step raised Traceback: xxx") and "\n" not in reason
    assert len(reason) == FAULT_REASON_CHARS and reason.endswith("...")


class _ChargedStub:
    """A ``ChargedSeed`` with no tensor (torch stays out of a forked child); its quarantine
    waits for ``go`` on the thread named ``blocked``."""

    seed_id, fault_limit, stage = "s0", 2, S.ISOLATED_INIT

    def __init__(self) -> None:
        self.faults, self.fault_log, self.state_table = 0, deque(maxlen=FAULT_LOG_SIZE), self
        self.entered, self.go, self.quarantined = threading.Event(), threading.Event(), []

    def report(self, name: str, labels: dict[str, str]) -> None:
        """The state table's telemetry: nothing kept."""

    def quarantine(self, reason: str = "") -> bool:
        if threading.current_thread().name == "blocked":
            self.entered.set()
            self.go.wait(10)
        self.quarantined.append(reason)
        self.stage = S.QUARANTINE
        return True


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() children only")
def test_a_quarantine_under_way_at_a_fork_does_not_bar_the_childs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Forked while another thread quarantines a seed (which never finishes in the child), the
    child's next fault at the limit quarantines it there: the seed is not kept out for good."""
    seed = _ChargedStub()
    seed.faults = seed.fault_limit - 1
    with caplog.at_level("CRITICAL", logger="kasmina.seeds"):
        other = threading.Thread(target=charge, args=(seed, "exception", "raised"), name="blocked")
        other.start()
        assert seed.entered.wait(10)

        def fault_in_child() -> str:
            charge(seed, "exception", "raised again")
            return "quarantined" if seed.quarantined else "kept out"

        said = said_in_child(fault_in_child)
        seed.go.set()
        other.join(10)
    assert said == "quarantined", said
    assert seed.quarantined == ["2 faults (limit 2), last: raised"]  # the parent's, once
