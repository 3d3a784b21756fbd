"""A seed's own reaction to its transitions (``kasmina.seeds.stage_entry``): a write of it that
fails (a device error, injected here into the table's writes) is kept and completed, never half
done and dropped; a user's observer that raises is only contained and logged."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from torch import nn

from kasmina.seeds import stage_entry
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import SeedStage

S = SeedStage
C = 3


def grafting_seed() -> GradientIsolatedSeed:
    seed = GradientIsolatedSeed(C, "s0")
    seed.attach_kernel(nn.Linear(C, C))
    for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING):
        seed.transition_to(stage)
    seed.update_alpha_blending(5, 10)  # alpha 0.5
    return seed


def failing(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """``GPUStateTensor.name`` raises a CUDA out-of-memory error (the rows it was called for)."""
    calls: list[int] = []

    def fail(self: GPUStateTensor, idx: int, *_args: object) -> None:
        calls.append(idx)
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(GPUStateTensor, name, fail)
    return calls


def alpha_column(seed: GradientIsolatedSeed) -> int:
    return seed.state_table.read_row(seed.state_index)["ALPHA_BLEND"]


def test_a_failed_alpha_write_on_entering_stabilization_is_kept_and_settled(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The write raised into the table, which logged and dropped it: the seed blended at 1 while
    the table's ALPHA_BLEND (saved, reported) stayed at its last GRAFTING alpha for good."""
    seed = grafting_seed()
    assert alpha_column(seed) == 500
    calls = failing(monkeypatch, "set_alpha")
    # The log's count is the process's: earlier failures (other tests) would make this one a
    # DEBUG line of the rate limit. Counted from 1, it is the first: logged at ERROR.
    monkeypatch.setattr(stage_entry, "_failures", itertools.count(1))
    with caplog.at_level(logging.ERROR, logger="kasmina.seeds.stage_entry"):
        seed.transition_to(S.STABILIZATION)
    assert calls == [seed.state_index] and seed.stage == S.STABILIZATION
    assert "s0: entering STABILIZATION, a write failed" in caplog.text
    assert seed.unsettled == S.STABILIZATION and seed.alpha_value == 1.0
    assert alpha_column(seed) == 500  # the write that failed
    monkeypatch.undo()
    seed.settle_stage()
    assert seed.unsettled is None and alpha_column(seed) == 1000 and float(seed.alpha) == 1.0


def test_recycling_whose_blueprint_write_fails_still_forgets_the_faults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The blueprint write came first and raised: the recycled seed kept its faults, fault log
    and flags, and its next kernel was charged for the culled one's (quarantined sooner)."""
    seed = grafting_seed()
    seed.faults, seed.nonfinite_events = 2, 1
    seed.fault_log.append("raised RuntimeError: kernel exploded")
    seed.finite_flag.fill_(False)
    seed.fault_flag.fill_(True)
    for stage in (S.HARVESTING, S.COOLDOWN):
        seed.transition_to(stage)
    calls = failing(monkeypatch, "set_blueprint")
    seed.transition_to(S.RECYCLING)
    assert calls == [seed.state_index] and seed.stage == S.RECYCLING
    assert seed.faults == 0 and not seed.fault_log and seed.nonfinite_events == 0
    assert seed.unsettled == S.RECYCLING and seed.alpha_value == 0.0
    monkeypatch.undo()
    seed.settle_stage()
    assert seed.unsettled is None and bool(seed.finite_flag) and not bool(seed.fault_flag)
    assert seed.poll_nonfinite() is False and seed.faults == 0
    assert seed.state_table.read_row(seed.state_index)["BLUEPRINT_ID"] == 0


def test_recycling_writes_that_failed_are_completed_by_the_dormant_entry_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Left unsettled in RECYCLING, a seed that moved on to DORMANT (its only way out) dropped
    RECYCLING's writes as moot: the culled artifact's BLUEPRINT_ID and the fault flags stayed,
    and the next kernel was charged a non-finite output it never made. DORMANT is RECYCLING's
    clean slate, so its entry writes them too."""
    seed = grafting_seed()
    seed.finite_flag.fill_(False)
    seed.fault_flag.fill_(True)
    seed.state_table.set_blueprint(seed.state_index, "culled")
    for stage in (S.HARVESTING, S.COOLDOWN):
        seed.transition_to(stage)
    failing(monkeypatch, "set_blueprint")
    seed.transition_to(S.RECYCLING)
    assert seed.unsettled == S.RECYCLING
    monkeypatch.undo()
    seed.transition_to(S.DORMANT)
    assert seed.unsettled is None and bool(seed.finite_flag) and not bool(seed.fault_flag)
    assert seed.state_table.read_row(seed.state_index)["BLUEPRINT_ID"] == 0
    assert seed.poll_nonfinite() is False and seed.faults == 0


def test_what_failed_on_entering_a_stage_is_moot_once_the_seed_left_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A settle once the seed is in another stage (a load took it back) writes nothing of the
    stage it left: that one's alpha would overwrite the loaded row's."""
    seed = grafting_seed()
    saved = seed.state_table.state_dict()
    failing(monkeypatch, "set_alpha")
    seed.transition_to(S.STABILIZATION)
    monkeypatch.undo()
    seed.state_table.load_state_dict(saved)  # back in GRAFTING at 0.5, as a rollback loads it
    assert seed.stage == S.GRAFTING and seed.unsettled == S.STABILIZATION
    seed.settle_stage()
    assert seed.unsettled is None and alpha_column(seed) == 500


class _Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("kernel exploded")


def test_entering_quarantine_clears_the_flags_no_step_will_poll() -> None:
    """A kernel that raised in a training forward clears ``finite_flag`` (the step drops the
    seed's gradient); at its fault limit the seed went to QUARANTINE with the flag still
    clear, and no step polls a quarantined seed. A ROLLBACK to before the quarantine restores
    no flag, so the next step dropped the restored seed's gradient, reported as fallen back.
    Entering QUARANTINE clears both flags, as RECYCLING does."""
    seed = GradientIsolatedSeed(C, "s0", fault_limit=2)
    seed.attach_kernel(_Raises())
    for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING):
        seed.transition_to(stage)
    x = torch.randn(4, C, requires_grad=True)
    seed(x).sum().backward()
    assert seed.stage is S.GRAFTING and not bool(seed.finite_flag)  # the step is lost
    seed.fault_flag.fill_(True)  # and a fallback's fault is pending, as a NaN output leaves it
    seed(x).sum().backward()
    assert seed.stage is S.QUARANTINE and seed.faults == 2
    assert bool(seed.finite_flag) and not bool(seed.fault_flag)
