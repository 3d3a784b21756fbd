"""What ``manager.step()`` reads back from the device: one transfer for all the step's flags.

Inside a step every verdict stays on the device (docs/design.md §6a). At the step boundary the
manager reads the seed-only backwards' leak flags and every running seed's non-finite flag in
one transfer (``kasmina.utils.flags.read_flags``), and, with gradient clipping, the finiteness
of every optimizer's norm in one more; on a GPU each separate read would be a round trip of its
own. On a CPU a ``.tolist()`` dispatches nothing a mode could see, so the transfers are counted
where they happen (``flags._read``), and the dispatch mode checks that no scalar is read apart
from them. On a GPU the profiler counts the synchronisations inside ``step()`` as well (its
name has ``on_cuda``, so ``perf/gpu_check.sh`` runs it).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kasmina.utils.flags as flags_module
from kasmina.kd.config import KDConfig
from kasmina.seeds.compiled_cut import CUT_REASON
from tests.manager.helpers import (
    SEED0,
    SEED1,
    Rig,
    S,
    make_config,
    through_a_seed,
    walk_to_active,
)
from tests.profiling import DispatchedOps, syncs_inside


@pytest.fixture
def transfers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of flags in each device-to-host transfer of ``read_flags``."""
    seen: list[int] = []
    read = flags_module._read

    def counted(flags):
        seen.append(len(flags))
        return read(flags)

    monkeypatch.setattr(flags_module, "_read", counted)
    return seen


@pytest.fixture
def kd_rig(tmp_path, store, keyring) -> Rig:
    config = make_config(tmp_path, store, kd_enabled=True, kd=KDConfig(temperature=2.0, alpha=1.0))
    # SGD: Adam reads its step counters back on a CPU, which would hide the manager's reads.
    return Rig(config, keyring, optimizer_cls=torch.optim.SGD)


def _step(
    rig: Rig, teacher: torch.Tensor, grad_clip_norm: float = 0.0, leak: float | None = None
) -> tuple[dict, int]:
    """One training step; ``leak`` adds ``leak * host weight`` to the seed-only (KD) loss,
    which gives the host a gradient there (zero for 0.0) and so a leak flag to read."""
    manager = rig.manager
    manager.set_teacher_logits(teacher)
    loss = nn.functional.cross_entropy(rig.model(rig.x), rig.y)
    kd_loss = manager.collect_kd_losses()
    if leak is not None:
        kd_loss = through_a_seed(kd_loss + leak * rig.model.inp.weight.sum())
    manager.backward(loss, kd_loss=kd_loss)
    with DispatchedOps() as mode:
        report = manager.step(grad_clip_norm=grad_clip_norm)
    return report, len(mode.scalar_reads)


def test_a_step_reads_every_flag_in_one_transfer(kd_rig: Rig, mlp, transfers) -> None:
    rig, manager = kd_rig, kd_rig.manager
    assert rig.send("germinate", SEED0, mlp) and rig.send("germinate", SEED1, mlp)
    assert rig.stage(SEED0) == rig.stage(SEED1) == S.ISOLATED_INIT
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(4))
    rig.train(1, teacher=teacher)  # warm-up: the optimizers' state
    for leak, clean in ((None, True), (0.0, True), (1e-2, False)):
        transfers.clear()
        report, reads = _step(rig, teacher, leak=leak)
        # both seeds' three flags, and the seed-only backward's leak flag when the host got a
        # gradient there (zero, or not): one transfer
        assert transfers == [6 if leak is None else 7] and reads == 0, leak
        assert report["isolation_clean"] == clean == report["host_stepped"], leak
        assert sorted(report["seeds_stepped"]) == [SEED0, SEED1] and report["nonfinite"] == []
    transfers.clear()
    report, reads = _step(rig, teacher, grad_clip_norm=1.0)
    assert transfers == [6, 3] and reads == 0  # and the three clipped norms' finiteness
    assert report["host_stepped"] and sorted(report["seeds_stepped"]) == [SEED0, SEED1]
    assert set(manager.optimizers.last_grad_norm) == {"host", SEED0, SEED1}


def test_a_non_finite_seed_is_found_by_the_one_transfer(kd_rig: Rig, mlp, transfers) -> None:
    rig, manager = kd_rig, kd_rig.manager
    assert rig.send("germinate", SEED0, mlp) and rig.send("germinate", SEED1, mlp)
    seed = manager.seed(SEED1)
    with torch.no_grad():
        next(seed.kernel.parameters()).fill_(float("nan"))
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))
    transfers.clear()
    report, _ = _step(rig, teacher)
    assert transfers == [6] and report["nonfinite"] == [SEED1]  # three flags a seed
    assert seed.faults == 1 and seed.nonfinite_events == 1 and manager.seed(SEED0).faults == 0
    assert bool(seed.finite_flag)  # settled: the next step starts clean
    # Its gradient was dropped before the optimizers stepped: the seed did not step.
    assert report["seeds_stepped"] == [SEED0]


def test_a_compiled_cut_is_charged_by_the_one_transfer(kd_rig: Rig, mlp, transfers) -> None:
    """A seed's cut flag (set in a compiled ACTIVE backward that zeroed a non-finite input
    gradient of its kernel's own, ``compiled_cut``) is read with the step's other flags and
    charged there, once, after one more transfer (unclipped: whether the host's gradients are
    finite, as no norms tell); its gradient is kept (its output was finite) and it steps, with
    the host's optimizer. (Only an ACTIVE seed has a cut: an isolated seed's flag is a gradient
    from above that was not finite, a lost step: test_gradient_from_above.)"""
    rig, manager = kd_rig, kd_rig.manager
    assert rig.send("germinate", SEED0, mlp) and rig.send("germinate", SEED1, mlp)
    walk_to_active(rig, [SEED0, SEED1])
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(6))
    rig.train(1, teacher=teacher)
    seed = manager.seed(SEED1)
    before = [p.detach().clone() for p in seed.seed_parameters()]
    seed.cut_flag.fill_(True)  # as the compiled cut leaves it (test_compiled_faults)
    transfers.clear()
    report, reads = _step(rig, teacher)
    assert transfers == [6, 1] and reads == 0 and report["nonfinite"] == []
    assert seed.faults == 1 and list(seed.fault_log) == [CUT_REASON] and seed.nonfinite_events == 0
    assert report["host_stepped"] and not bool(seed.cut_flag)
    assert all(not torch.equal(p, q) for p, q in zip(seed.seed_parameters(), before, strict=True))
    report, _ = _step(rig, teacher)
    assert seed.faults == 1 and manager.seed(SEED0).faults == 0  # settled: charged once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_step_on_cuda_synchronises_once_per_transfer(tmp_path, store, keyring, mlp, transfers):
    """On a GPU the profiler sees exactly the step's transfers: one synchronisation for the
    flags, one more for the clipped norms, and nothing else that waits for the device."""
    config = make_config(tmp_path, store, device="cuda", kd_enabled=True, kd=KDConfig())
    rig = Rig(config, keyring, device="cuda", optimizer_cls=torch.optim.SGD)
    assert rig.send("germinate", SEED0, mlp) and rig.send("germinate", SEED1, mlp)
    teacher = torch.randn(16, 4, device="cuda")
    for clip, expected in ((0.0, [6]), (1.0, [6, 3])):  # three flags a seed
        rig.train(1, teacher=teacher)  # warm-up: launch caches, optimizer state
        rig.manager.set_teacher_logits(teacher)
        loss = nn.functional.cross_entropy(rig.model(rig.x), rig.y)
        rig.manager.backward(loss, kd_loss=rig.manager.collect_kd_losses())
        torch.cuda.synchronize()
        transfers.clear()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            with torch.profiler.record_function("managed_step"):
                report = rig.manager.step(grad_clip_norm=clip)
        syncs = syncs_inside(prof, "managed_step")
        assert transfers == expected, clip
        assert syncs.count("aten::_local_scalar_dense") == 0, syncs
        assert len(syncs) == len(expected), syncs
        assert report["host_stepped"] and sorted(report["seeds_stepped"]) == [SEED0, SEED1]


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_a_compiled_cut_read_by_a_step_that_raises_is_charged_at_the_next(
    rig: Rig, mlp, clip: float
) -> None:
    """The step reads a seed's cut flag at its poll and charges it after the optimizers
    stepped (``SlotRegistry.charge_failed_steps``): a step that raised in between (the host's
    optimizer, out of memory at its first step) had cleared the flag at the poll, and the cut
    was never charged. The flag is kept until it is charged: the next step charges it, once.
    (An ACTIVE seed's: an isolated seed's flag is a lost step, test_gradient_from_above.)"""
    from kasmina.isolation.optimizers import HOST_ID

    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    walk_to_active(rig, [SEED0])
    rig.train(1)
    seed, host = manager.seed(SEED0), manager.optimizers.optimizer(HOST_ID)
    real = host.step

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory")

    host.step = out_of_memory
    manager.backward(nn.functional.cross_entropy(rig.model(rig.x), rig.y), kd_loss=None)
    seed.cut_flag.fill_(True)  # as the compiled cut leaves it (test_compiled_faults)
    with pytest.raises(torch.OutOfMemoryError):
        manager.step(grad_clip_norm=clip)
    assert seed.faults == 0 and bool(seed.cut_flag)  # kept for the next step
    host.step = real
    manager.optimizers.zero_grad()  # the trainer drops the batch, and goes on
    manager.backward(nn.functional.cross_entropy(rig.model(rig.x), rig.y), kd_loss=None)
    manager.step(grad_clip_norm=clip)
    assert seed.faults == 1 and list(seed.fault_log) == [CUT_REASON] and not bool(seed.cut_flag)
    rig.train(1)
    assert seed.faults == 1  # charged once
    manager.close()


def test_an_active_seed_that_fell_back_steps_no_gradient_with_the_host(
    tmp_path, store, keyring, mlp
) -> None:
    """An ACTIVE seed's parameters are the host optimizer's: where its output fell back in one
    micro-batch of the step, the gradients it got from the others are dropped, so the host's
    step leaves it as it was (the seed lost its step), while the host trains."""
    rig = Rig(make_config(tmp_path, store), keyring)
    manager, seed = rig.manager, rig.manager.seed(SEED0)
    assert rig.send("germinate", SEED0, mlp)
    walk_to_active(rig, [SEED0])
    manager.backward(nn.functional.cross_entropy(rig.model(rig.x), rig.y))
    assert all(p.grad is not None for p in seed.seed_parameters())  # a finite micro-batch
    seed.finite_flag.fill_(False)  # a later micro-batch's output fell back (its flags)
    seed.fault_flag.fill_(True)
    before = [p.detach().clone() for p in seed.seed_parameters()]
    host = rig.model.inp.weight.detach().clone()
    report = manager.step()
    assert report["host_stepped"] and report["nonfinite"] == [SEED0] and seed.faults == 1
    assert not torch.equal(rig.model.inp.weight, host)
    assert all(torch.equal(p, b) for p, b in zip(seed.seed_parameters(), before, strict=True))
    manager.close()


def test_a_seed_the_steps_check_quarantined_is_not_settled_by_its_stale_flags(kd_rig: Rig, mlp):
    """The step's isolation check quarantines a seed that leaked (its third step running);
    the flags read before it are not acted on for that seed: its entry into QUARANTINE
    cleared them, and no non-finite output is charged or reported for it."""
    rig, manager = kd_rig, kd_rig.manager
    assert rig.send("germinate", SEED0, mlp)
    seed = manager.seed(SEED0)
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(7))
    for _ in range(2):
        assert not _step(rig, teacher, leak=1e-2)[0]["isolation_clean"]
    assert rig.stage(SEED0) == S.ISOLATED_INIT
    faults = seed.faults
    seed.finite_flag.fill_(False)  # as a fallback in this step's forward leaves them
    seed.fault_flag.fill_(True)
    report, _ = _step(rig, teacher, leak=1e-2)
    assert rig.stage(SEED0) == S.QUARANTINE and report["nonfinite"] == []
    assert seed.faults == faults and "non-finite output" not in seed.fault_log
    assert bool(seed.finite_flag) and not bool(seed.fault_flag)
