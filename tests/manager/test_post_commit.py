"""What fails after a commit point (docs/design.md §3, "Commit points"): the command is applied
and reported applied, and what failed is completed at the next safe point. Each failure is a
device error (an out-of-memory) injected once into a call the transition's effects make."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from kasmina.control.builders import make_optimizer_command
from kasmina.control.commands import to_kasmina_command
from kasmina.isolation.optimizers import IsolatedOptimizerManager
from kasmina.manager.slots import SlotRegistry
from kasmina.seeds import table as table_module
from kasmina.seeds.charging import DeferredFaults, defer_faults
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import StateColumn
from kasmina.urza.kernel import GPUKernel
from tests.manager.helpers import SEED0, SEED1, Rig, S, make_config, run_command


def fail_once(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, nth: int = 1, times: int = 1
) -> dict:
    """``owner.name`` raises a CUDA out-of-memory error at its ``nth`` call and the ``times - 1``
    after it (then works)."""
    real: Callable[..., Any] = getattr(owner, name)
    calls = {"n": 0}

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if nth <= calls["n"] < nth + times:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return calls


def germinated(rig: Rig, mlp: str) -> None:
    """``SEED0`` germinated with ``mlp`` and trained one step."""
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)


def to_stage(rig: Rig, mlp: str, target: S) -> None:
    """GERMINATE SEED0 and ADVANCE it to ``target``, training in between."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    manager.end_epoch(0)
    for stage in (S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION, S.ACTIVE):
        if stage == S.ACTIVE:
            manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)
        assert rig.send("advance", SEED0) and rig.stage(SEED0) == stage, manager.command_log[-1]
        if stage == target:
            return
        rig.train(5 if stage == S.GRAFTING else 1)


def promoted(rig: Rig) -> bool:
    optimizers = rig.manager.optimizers
    return SEED0 not in optimizers.seed_ids and SEED0 in optimizers.promoted()


# ------------------------------------------------------------------ side effects of a transition


def test_an_active_seed_whose_promotion_failed_is_promoted_at_the_next_step(
    rig: Rig, mlp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transition's observer logged and dropped the failure: the ACTIVE seed kept its own
    optimizer for good, outside the host's groups and schedule."""
    to_stage(rig, mlp, S.STABILIZATION)
    rig.train(1)
    rig.manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)
    calls = fail_once(monkeypatch, IsolatedOptimizerManager, "promote_seed")
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.ACTIVE
    assert calls["n"] == 1 and not promoted(rig)
    rig.train(1)
    assert promoted(rig) and not rig.manager.execution.effects.pending
    host = {
        id(p) for g in rig.manager.optimizers.optimizer("host").param_groups for p in g["params"]
    }
    assert all(id(p) in host for p in rig.manager.seed(SEED0).seed_parameters())


def test_terminate_whose_release_fails_unpins_and_frees_the_kernel_later(
    rig: Rig, mlp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed release stopped before the unpin, and TERMINATED is final: the cached original
    stayed pinned for good (never evictable)."""
    manager, cache = rig.manager, rig.manager.kernel_cache
    germinated(rig, mlp)
    kernel = manager.seed(SEED0).kernel
    assert manager.seed(SEED0).quarantine() and cache.is_pinned(mlp)
    calls = fail_once(monkeypatch, GPUKernel, "release_gpu_memory")
    assert rig.send("terminate", SEED0) and rig.stage(SEED0) == S.TERMINATED
    assert calls["n"] == 1 and not cache.is_pinned(mlp)
    assert SEED0 not in manager.optimizers.seed_ids
    rig.train(1)
    assert kernel.inner is None and not manager.execution.effects.pending  # its memory freed
    assert cache.evict(mlp)


# ------------------------------------------------------------------ commands past their commit


def test_a_cull_whose_cooldown_fails_is_applied_and_completed_at_the_next_step(
    rig: Rig, mlp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HARVESTING -> COOLDOWN (a second table launch) failing escaped the CULL: it was logged
    refused ("internal error") with its kernel released, and the seed sat in HARVESTING, which
    no command, epoch or step leaves."""
    manager = rig.manager
    germinated(rig, mlp)
    calls = fail_once(monkeypatch, table_module, "lifecycle_update", nth=2)
    assert rig.send("cull", SEED0, embargo_epochs=3)
    assert calls["n"] == 2 and rig.stage(SEED0) == S.HARVESTING
    reason = manager.command_log[-1][3]
    assert "COOLDOWN after its CULL" in reason and "retried at the next safe point" in reason
    assert SEED0 not in manager.optimizers.seed_ids and not manager.kernel_cache.is_pinned(mlp)
    rig.train(1)
    assert rig.stage(SEED0) == S.COOLDOWN and not manager.execution.effects.pending
    table = manager.require_registry().table
    assert table.read_row(manager.seed(SEED0).state_index)["EMBARGO_COUNTER"] == 3


def test_a_cull_whose_embargo_write_fails_is_reported_applied(
    rig: Rig, mlp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seed was in COOLDOWN, its kernel released: the CULL was logged refused."""
    manager = rig.manager
    germinated(rig, mlp)
    real = GPUStateTensor.set_column
    failed: list[int] = []

    def set_column(self: GPUStateTensor, idx: int, column: StateColumn, value: int) -> None:
        if column == StateColumn.EMBARGO_COUNTER and not failed:
            failed.append(value)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        real(self, idx, column, value)

    monkeypatch.setattr(GPUStateTensor, "set_column", set_column)
    assert rig.send("cull", SEED0, embargo_epochs=4) and rig.stage(SEED0) == S.COOLDOWN
    assert failed == [4] and manager.command_log[-1][2] is True
    rig.train(1)
    table = manager.require_registry().table
    assert table.read_row(manager.seed(SEED0).state_index)["EMBARGO_COUNTER"] == 4


def test_initialize_host_whose_promotion_fails_is_reported_applied(
    tmp_path, store, keyring, mlp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host optimizer was built, the ACTIVE seed's promotion into it raised: the command
    was logged refused, and the controller's retry refused as "already initialized"."""
    rig = Rig(make_config(tmp_path, store), keyring, host_lr=None)
    manager = rig.manager
    to_stage(rig, mlp, S.ACTIVE)
    assert manager.optimizers.optimizer_ids == [SEED0]
    calls = fail_once(monkeypatch, IsolatedOptimizerManager, "promote_seed")
    command = make_optimizer_command("initialize_host", learning_rate=0.01)
    assert run_command(manager, rig.signed(command)) and calls["n"] == 1
    assert "promotion of the ACTIVE seeds failed" in manager.command_log[-1][3]
    assert "host" in manager.optimizers.optimizer_ids and not promoted(rig)
    rig.train(1)
    assert promoted(rig) and manager.optimizers.optimizer_ids == ["host"]
    manager.close()


def test_a_failed_alpha_write_lets_the_hosts_step_complete(
    rig: Rig, mlp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GRAFTING seed's alpha write raised out of step() after the host's optimizer stepped:
    its gradients were left to apply again, the step went uncounted, the safe point skipped,
    and the seed's alpha and the table's ALPHA_BLEND stayed apart."""
    manager = rig.manager
    to_stage(rig, mlp, S.GRAFTING)
    seed, step = manager.seed(SEED0), manager.global_step
    weight = rig.model.inp.weight.detach().clone()
    calls = fail_once(monkeypatch, GPUStateTensor, "set_alpha")
    report = rig.train(1)
    assert calls["n"] == 2  # the write that failed, and its retry's at the step's safe point
    assert report["host_stepped"] and manager.global_step == step + 1
    assert not torch.equal(weight, rig.model.inp.weight) and rig.model.inp.weight.grad is None
    row = manager.require_registry().table.read_row(seed.state_index)
    assert 0 < seed.alpha_value < 1 and row["ALPHA_BLEND"] == round(seed.alpha_value * 1000)
    assert seed.faults == 1 and rig.stage(SEED0) == S.GRAFTING  # one fault: not its limit
    assert not manager.execution.effects.pending


def test_a_failed_alpha_write_is_held_for_the_next_steps_collective_where_faults_are(
    rig: Rig, mlp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write failed on this process's device, yet was charged at once (``charge_fault``):
    in a multi-rank run that rank's fault count differed from the others', and the epoch sync
    "repaired" it away. Found here, it is held as every fault found on one rank is (§6a)."""
    manager = rig.manager
    to_stage(rig, mlp, S.GRAFTING)
    seed, table = manager.seed(SEED0), manager.require_registry().table
    held = DeferredFaults()
    defer_faults(table, held)  # as a DistributedKasmina of two ranks does
    try:
        fail_once(monkeypatch, GPUStateTensor, "set_alpha")
        assert rig.train(1)["host_stepped"] and seed.faults == 0
        reason = "OutOfMemoryError: CUDA out of memory (injected)"
        assert held.take() == {SEED0: (1, [("bookkeeping", reason)])}
    finally:
        defer_faults(table, None)


def test_a_seeds_own_failed_write_on_entering_a_stage_is_completed_at_the_next_step(
    rig: Rig, mlp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seed's own reaction to QUARANTINE raised into the table's call of its observer,
    which logged and dropped it: the table's ALPHA_BLEND kept the GRAFTING alpha for good."""
    manager = rig.manager
    to_stage(rig, mlp, S.GRAFTING)
    rig.train(1)
    seed, table = manager.seed(SEED0), manager.require_registry().table
    blend = table.read_row(seed.state_index)["ALPHA_BLEND"]
    assert 0 < blend < 1000
    calls = fail_once(monkeypatch, GPUStateTensor, "set_alpha", times=2)
    assert seed.quarantine() and rig.stage(SEED0) == S.QUARANTINE
    assert calls["n"] == 2  # the seed's write, and its manager's try at once
    assert seed.unsettled == S.QUARANTINE and seed.alpha_value == 0.0
    assert table.read_row(seed.state_index)["ALPHA_BLEND"] == blend
    assert manager.counters["post_commit_deferred"] == 1
    rig.train(1)
    assert calls["n"] == 3 and seed.unsettled is None
    assert table.read_row(seed.state_index)["ALPHA_BLEND"] == 0
    assert not manager.execution.effects.pending


def test_a_fault_whose_quarantine_fails_past_the_hosts_step_lets_the_step_complete(
    rig: Rig, mlp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seed optimizer that raised was charged inside ``step()``, after the host's optimizer
    stepped; at the fault limit the charge's QUARANTINE raised out of ``step()``: gradients not
    zeroed (applied again by the next step), the step uncounted, no safe point."""
    manager = rig.manager
    germinated(rig, mlp)
    seed = manager.seed(SEED0)
    seed.fault_limit = 1

    def break_its_optimizer() -> None:
        for s in manager.optimizers.optimizer(SEED0).state.values():
            s["exp_avg"] = torch.zeros(3)  # not its parameter's shape: its step raises

    break_its_optimizer()
    calls = fail_once(monkeypatch, table_module, "lifecycle_update")  # the QUARANTINE
    weight, step = rig.model.inp.weight.detach().clone(), manager.global_step
    report = rig.train(1)
    assert calls["n"] == 1 and report["host_stepped"] and manager.global_step == step + 1
    assert not torch.equal(weight, rig.model.inp.weight) and rig.model.inp.weight.grad is None
    assert seed.faults == 1 and rig.stage(SEED0) == S.ISOLATED_INIT  # counted, not quarantined
    rig.train(1)  # a fresh state (the failed step's was reset)
    break_its_optimizer()
    rig.train(1)  # its next fault tries the quarantine again
    assert seed.faults == 2 and rig.stage(SEED0) == S.QUARANTINE


def test_charging_a_steps_faults_that_raises_is_contained_and_counted(
    rig: Rig, mlp: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The charge (a flag's read, an ACTIVE seed's TERMINATED) raised out of ``step()`` after
    the host's optimizer stepped, and out of a STEP command that had stepped (logged refused)."""
    manager = rig.manager
    germinated(rig, mlp)

    def charge_failed_steps(*_args: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(SlotRegistry, "charge_failed_steps", charge_failed_steps)
    weight, step = rig.model.inp.weight.detach().clone(), manager.global_step
    with caplog.at_level(logging.DEBUG, logger="kasmina.manager.executor"):
        report = rig.train(2)
    assert report["host_stepped"] and report["seeds_stepped"] == [SEED0]
    assert manager.global_step == step + 2 and manager.counters["step_charges_failed"] == 2
    assert not torch.equal(weight, rig.model.inp.weight) and rig.model.inp.weight.grad is None
    logged = [r for r in caplog.records if "charging a step's seed faults raised" in r.message]
    assert [r.levelname for r in logged] == ["ERROR", "DEBUG"]  # bounded
    F.cross_entropy(rig.model(rig.x), rig.y).backward()
    command = to_kasmina_command(make_optimizer_command("step", SEED0, learning_rate=0.01))
    assert manager.execute(command) and manager.counters["step_charges_failed"] == 3
    assert manager.command_log[-1][2] is True  # applied, reported applied


def test_an_epoch_boundary_whose_tick_fails_changes_nothing_and_its_retry_works(
    rig: Rig, mlp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The epoch and G2's count moved before the tick raised: the boundary was half done, and
    its retry was refused ("epoch 0 is not after the last epoch ended")."""
    manager = rig.manager
    germinated(rig, mlp)
    seed, table = manager.seed(SEED0), manager.require_registry().table
    before = (manager.epoch, seed.trained_epochs, seed.trained_this_epoch, table.epochs_in_state(0))
    fail_once(monkeypatch, table_module, "lifecycle_tick")
    with pytest.raises(torch.OutOfMemoryError):
        manager.end_epoch(0, {"val_accuracy": 0.5})
    assert (manager.epoch, seed.trained_epochs, seed.trained_this_epoch) == before[:3]
    assert table.epochs_in_state(0) == before[3] and manager.val_metrics == {}
    manager.end_epoch(0, {"val_accuracy": 0.5})
    assert (manager.epoch, seed.trained_epochs, table.epochs_in_state(0)) == (0, 1, 1)
    assert manager.val_metrics == {"val_accuracy": 0.5}


# ------------------------------------------------------------------ each completion on its own


def failing_release(monkeypatch: pytest.MonkeyPatch, broken: set[int]) -> list[int]:
    """``GPUKernel.release_gpu_memory`` raises (an out-of-memory) for each kernel whose id is in
    ``broken``; returns the ids of the kernels each call was made for."""
    real, calls = GPUKernel.release_gpu_memory, []

    def release(self: GPUKernel) -> None:
        calls.append(id(self))
        if id(self) in broken:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        real(self)

    monkeypatch.setattr(GPUKernel, "release_gpu_memory", release)
    return calls


def recycle(rig: Rig, epoch: int) -> int:
    """End epochs (training in between) until SEED0, culled, is DORMANT; the next epoch."""
    while rig.stage(SEED0) != S.DORMANT:
        rig.train(1)
        rig.manager.end_epoch(epoch)
        epoch += 1
    return epoch


@pytest.mark.parametrize("second_fails", [False, True])
def test_a_kernels_failed_release_is_completed_though_its_seed_took_another(
    rig: Rig, mlp: str, monkeypatch: pytest.MonkeyPatch, second_fails: bool
) -> None:
    """One completion per seed and kind: the first kernel's memory release, pending, was dropped
    as moot when the seed's second kernel was released, or replaced when that one failed too;
    the first kernel's memory was never freed."""
    manager = rig.manager
    germinated(rig, mlp)
    first = manager.seed(SEED0).kernel
    broken = {id(first)}
    failing_release(monkeypatch, broken)
    assert rig.send("cull", SEED0, embargo_epochs=0)
    assert first.inner is not None and manager.execution.effects.pending
    recycle(rig, 0)
    germinated(rig, mlp)
    second = manager.seed(SEED0).kernel
    assert second is not first
    if second_fails:
        broken.add(id(second))
    assert rig.send("cull", SEED0, embargo_epochs=0)
    assert (second.inner is not None) == second_fails
    broken.clear()  # the device recovers
    rig.train(8)
    assert first.inner is None and second.inner is None  # both freed
    assert not manager.execution.effects.pending


# ------------------------------------------------------------------ bounded retries


def test_a_pending_completion_is_tried_once_a_step_put_off_and_given_up(
    rig: Rig, mlp: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """It was tried at every step's safe point and again before each command that step applied
    (N commands: N+1 tries a step), forever."""
    manager = rig.manager
    germinated(rig, mlp)
    kernel = manager.seed(SEED0).kernel
    calls = failing_release(monkeypatch, {id(kernel)})
    assert manager.seed(SEED0).quarantine() and rig.send("terminate", SEED0)
    assert len(calls) == 1 and manager.execution.effects.pending
    for i in range(3):  # three commands applied at the next step's safe point (refused: DORMANT)
        command = make_optimizer_command("step", learning_rate=0.01, command_id=f"s{i}")
        assert manager.handle_adaptation_command(rig.signed(command))
    assert len(rig.train(1)["commands"]) == 3
    assert len(calls) == 2  # one retry at the step's safe point, none before each command
    rig.train(14)  # retried 1, 2, 4, 8 steps apart: at the 1st, 2nd, 4th, 8th and 16th step
    assert len(calls) == 5
    caplog.set_level("ERROR", logger="kasmina.manager.post_commit")
    rig.train(128 - 15)  # the 8th retry fails at the 128th step: given up
    assert len(calls) == 9 and not manager.execution.effects.pending
    counters = manager.counters  # a copy of the counts now
    assert counters["post_commit_abandoned"] == 1 and counters["post_commit_retries_failed"] == 8
    given_up = [r for r in caplog.records if "given up" in r.getMessage()]
    assert len(given_up) == 1 and given_up[0].levelname == "ERROR"
    assert manager.seed(SEED0).faults == 0  # a TERMINATED seed runs no kernel: not charged
    rig.train(10)
    assert len(calls) == 9


def test_a_completion_given_up_is_a_fault_of_a_seed_that_runs_a_kernel(
    rig: Rig, mlp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ACTIVE seed whose promotion kept failing was tried forever, never charged."""
    to_stage(rig, mlp, S.STABILIZATION)
    rig.train(1)
    rig.manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)

    def promote_seed(*_args: Any, **_kwargs: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(IsolatedOptimizerManager, "promote_seed", promote_seed)
    seed = rig.manager.seed(SEED0)
    faults = seed.faults
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.ACTIVE
    rig.train(127)
    assert rig.manager.execution.effects.pending and seed.faults == faults
    rig.train(1)  # the 8th failed retry
    assert not rig.manager.execution.effects.pending and seed.faults == faults + 1
    assert "promotion of seed out[0] failed 9 times" in seed.fault_log[-1]
    assert rig.manager.counters["post_commit_abandoned"] == 1


def test_close_tries_a_pending_completion_a_last_time_and_drops_it(
    rig: Rig, mlp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A closed manager kept its pending completions, their seeds' records and kernels."""
    manager = rig.manager
    germinated(rig, mlp)
    kernel = manager.seed(SEED0).kernel
    calls = failing_release(monkeypatch, {id(kernel)})
    assert manager.seed(SEED0).quarantine() and rig.send("terminate", SEED0)
    rig.train(1)
    assert len(calls) == 2
    manager.close()  # not due before the next step: tried all the same
    assert len(calls) == 3 and not manager.execution.effects.pending
    assert manager.counters["post_commit_dropped"] == 1


def test_a_direct_execute_completes_only_outside_a_forwards_graph(
    rig: Rig, mlp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``execute`` completed what was pending while a forward's graph was alive (a release drops
    its slot's KD losses), which ``complete_pending`` refuses at every other safe point."""
    from kasmina.control.builders import make_seed_command
    from kasmina.control.commands import to_kasmina_command

    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp) and rig.send("germinate", SEED1, mlp)
    rig.train(1)
    k0, k1 = manager.seed(SEED0).kernel, manager.seed(SEED1).kernel
    calls = failing_release(monkeypatch, {id(k0), id(k1)})
    assert manager.seed(SEED0).quarantine() and rig.send("terminate", SEED0)
    assert calls == [id(k0)]
    assert manager.seed(SEED1).quarantine()
    command = to_kasmina_command(make_seed_command("terminate", SEED1, command_id="t1"))
    assert manager.execute(command)  # a safe point: SEED0's release tried first, once
    assert calls == [id(k0), id(k0), id(k1)]
    loss = F.cross_entropy(rig.model(rig.x), rig.y)  # a graph through the slot, alive
    command = to_kasmina_command(make_seed_command("cull", SEED0, command_id="c1"))
    assert not manager.execute(command) and len(calls) == 3  # (refused: TERMINATED)
    manager.backward(loss)
    manager.step()
    assert calls[3:] == [id(k0), id(k1)]  # at the step's safe point, once each


def test_a_healthy_grafting_step_makes_no_completion(
    rig: Rig, mlp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every GRAFTING seed's alpha went through ``run`` at every step (two partials built, a
    try, a key, a dict pop): a healthy step was to pay one truthiness check."""
    from kasmina.manager.post_commit import TransitionEffects

    to_stage(rig, mlp, S.GRAFTING)
    seed, calls = rig.manager.seed(SEED0), []
    real = TransitionEffects.run
    monkeypatch.setattr(TransitionEffects, "run", lambda *a, **k: calls.append(a) or real(*a, **k))
    alpha = seed.alpha_value
    rig.train(2)
    assert seed.alpha_value > alpha and rig.stage(SEED0) == S.GRAFTING
    assert calls == []
