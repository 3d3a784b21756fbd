"""Teacher logits and a KD head handed to the manager: checked when they are handed over (never
at the next forward, inside the user's model), moved to the slot's device when they are
elsewhere, and a seed-only KD backward that fails loses this step's KD term only."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from kasmina.kd.config import KDConfig
from kasmina.kd.loss import teacher_fit_problem
from kasmina.manager import guard as guard_module
from kasmina.manager.manager import KasminaKernelManager
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import SEED0, Rig, make_config

VOCAB = 11


@pytest.fixture
def kd_rig(tmp_path: Path, store: Path, keyring: Keyring, mlp: str) -> Rig:
    kd = KDConfig(temperature=2.0, alpha=1.0)
    rig = Rig(make_config(tmp_path, store, kd_enabled=True, kd=kd), keyring)
    assert rig.send("germinate", SEED0, mlp)
    return rig


def _kd_loss(rig: Rig, teacher: torch.Tensor) -> torch.Tensor | None:
    rig.manager.set_teacher_logits(teacher)
    rig.model(rig.x)
    return rig.manager.collect_kd_losses()


def test_teacher_logits_are_checked_when_handed_over(kd_rig: Rig) -> None:
    """The manager refused float64 logits that a slot takes (read in fp32), and a 0-d tensor
    raised a bare ``IndexError``. Float64 teaches as fp32 does; what cannot teach (no last
    dim, no values on the meta device, integers) is a ``ValueError`` and leaves nothing
    pending, so the next forward distils nothing and raises nothing."""
    manager = kd_rig.manager
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))
    want = _kd_loss(kd_rig, teacher)
    got = _kd_loss(kd_rig, teacher.double())
    assert want is not None and got is not None
    torch.testing.assert_close(got, want)
    for bad, match in (
        (torch.tensor(1.0), "last .*dim"),
        (torch.empty(16, 4, device="meta"), "meta device hold no values"),
        (teacher.long(), "dense floating-point"),
        ([[0.0] * 4] * 16, "dense floating-point"),
    ):
        with pytest.raises(ValueError, match=match):
            manager.set_teacher_logits(bad)  # type: ignore[arg-type]
        kd_rig.model(kd_rig.x)
        assert manager.collect_kd_losses() is None


def test_no_teacher_for_a_batch_drops_the_logits_left_pending(kd_rig: Rig) -> None:
    """``set_teacher_logits(None)`` (the loop's ``get_teacher_predictions`` after a teacher
    out of memory) returned at once: logits of an earlier batch whose forward was skipped stayed
    pending, and the seeds distilled this batch against them."""
    manager = kd_rig.manager
    manager.set_teacher_logits(torch.randn(16, 4))  # batch k, skipped before its forward
    assert manager.set_teacher_logits(None) == []
    kd_rig.model(kd_rig.x)
    assert manager.collect_kd_losses() is None


def test_no_teacher_before_attach_is_no_error(tmp_path: Path, store: Path, keyring) -> None:
    manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    assert manager.set_teacher_logits(None) == []
    manager.close()


def test_a_kd_head_of_no_vocabulary_is_refused(kd_rig: Rig) -> None:
    """A ``[0, H]`` head was taken, and the next forward raised inside the user's model."""
    with pytest.raises(ValueError, match=r"\[V, H\] tensor, V >= 1"):
        kd_rig.manager.set_kd_head(torch.randn(0, 4))
    assert kd_rig.train(1)["host_stepped"]


def two_slots_one_on_meta(
    tmp_path: Path, store: Path, keyring: Any, on_meta: int
) -> tuple[KasminaKernelManager, list[Any]]:
    """A KD manager with two 4-wide slots, seen by one forward; slot ``on_meta`` then moved to
    the meta device (deferred init)."""
    config = make_config(tmp_path, store, kd_enabled=True, kd=KDConfig())
    manager = KasminaKernelManager(config, keyring=keyring)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 4))
    slots = manager.attach(model, ["0", "1"], 2, 2)
    model(torch.randn(3, 6))
    slots[on_meta].to("meta")
    return manager, slots


def test_teacher_logits_a_slot_refuses_reach_no_slot(tmp_path: Path, store: Path, keyring) -> None:
    """Two slots, one of them on the meta device (deferred init): meta logits were kept by
    that slot before the other refused them. Every slot's copy is checked before any is set."""
    manager, slots = two_slots_one_on_meta(tmp_path, store, keyring, 0)
    with pytest.raises(ValueError, match="meta device hold no values for a cpu slot"):
        manager.set_teacher_logits(torch.empty(3, 4, device="meta"))
    assert all(slot._teacher_logits is None for slot in slots)
    manager.close()


def test_a_kd_head_a_slot_refuses_reaches_no_slot(tmp_path: Path, store: Path, keyring) -> None:
    """Two slots as wide as the head, the second on the meta device: the first took the head
    before the second refused it, and the next forward distilled through a head the call was
    refused for. Every slot is checked before any takes it."""
    manager, slots = two_slots_one_on_meta(tmp_path, store, keyring, 1)
    head = torch.nn.Linear(4, VOCAB)
    with pytest.raises(ValueError, match=r"^1: .*slot's device meta"):
        manager.set_kd_head(head.weight, head.bias)
    assert all(slot._kd_head is None and slot.kd_width == 4 for slot in slots)
    manager.close()


def test_a_kd_head_on_another_device_is_refused_when_handed_over(kd_rig: Rig) -> None:
    """A head on another device than the slot (an ``lm_head`` placed elsewhere by a device
    map) was taken, and the next forward raised from inside the model. It is refused at
    ``set_kd_head``; a head or logits that end up elsewhere later (the model moved after
    they were handed over) make the call sit out with the reason, never raise."""
    manager = kd_rig.manager
    head = torch.nn.Linear(4, VOCAB).to("meta")
    with pytest.raises(ValueError, match="slot's device"):
        manager.set_kd_head(head.weight, head.bias)
    assert kd_rig.train(1)["host_stepped"]
    # A head no slot is as wide as (a Conv1D's [H, V] weight, untransposed) set nothing,
    # silently: KD then read no logits, and the warning named the teacher's, not the head.
    for weight in (torch.randn(4, VOCAB), torch.randn(VOCAB, 48)):
        with pytest.raises(ValueError, match=r"no slot is \d+ wide .*the slots are \[4\] wide"):
            manager.set_kd_head(weight)
    student = torch.empty(16, 4, device="meta")
    assert "teacher logits on cpu" in str(teacher_fit_problem(student, torch.randn(16, 4), None))
    weight = torch.randn(VOCAB, 4)
    why = teacher_fit_problem(student, torch.empty(16, VOCAB, device="meta"), (weight, None))
    assert why is not None and "the KD head on cpu" in why


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_teacher_logits_on_another_device_are_moved_to_the_slot(kd_rig: Rig) -> None:
    """``load_teacher(device=...)`` keeps a teacher on its own device, and its logits there:
    handed over, they raised from inside the model's forward. They are moved to the slot's."""
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(6))
    want = _kd_loss(kd_rig, teacher)
    got = _kd_loss(kd_rig, teacher.cuda())
    assert want is not None and got is not None
    torch.testing.assert_close(got, want)


def test_teacher_logits_rewritten_before_the_backward_lose_only_the_kd_term(kd_rig: Rig) -> None:
    """One teacher buffer reused for the next batch (a prefetch, a CUDA-graphed teacher's
    static output), rewritten between forward and backward: the KD op saved it, so the
    seed-only backward raised PyTorch's in-place error out of ``manager.backward`` and the
    host's backward never ran. Now the KD term is dropped for the step and counted, the seeds'
    earlier gradients (gradient accumulation) come back as they were, and the step completes."""
    manager = kd_rig.manager
    head = torch.nn.Linear(4, VOCAB)  # the head path saves the teacher logits on every device
    manager.set_kd_head(head.weight, head.bias)
    gen = torch.Generator().manual_seed(7)
    manager.set_teacher_logits(torch.randn(16, VOCAB, generator=gen))
    loss = F.cross_entropy(kd_rig.model(kd_rig.x), kd_rig.y)
    manager.backward(loss, kd_loss=manager.collect_kd_losses())  # a first micro-batch
    params = manager.seed(SEED0).seed_parameters()
    earlier = [p.grad.clone() for p in params]
    buffer = torch.randn(16, VOCAB, generator=gen)
    manager.set_teacher_logits(buffer)
    loss = F.cross_entropy(kd_rig.model(kd_rig.x), kd_rig.y)
    kd = manager.collect_kd_losses()
    buffer.copy_(torch.randn(16, VOCAB, generator=gen))  # the next batch's, in place
    manager.backward(None, kd_loss=kd)
    assert manager.counters["kd_backward_failed"] == 1
    assert all(torch.equal(p.grad, g) for p, g in zip(params, earlier, strict=True))
    manager.backward(loss)
    host = manager.require_registry().host_params
    assert all(p.grad is not None for p in host)
    report = manager.step()
    assert report["host_stepped"] and report["seeds_stepped"] == [SEED0]


def test_a_host_backward_that_raises_adds_no_kd_gradient(kd_rig: Rig) -> None:
    """``manager.backward(loss, kd_loss)`` called twice on one graph (a retry after an error
    elsewhere): the seed-only KD backward went through (its graph is retained for the host's)
    and added its gradients to the seeds' again, then the host's backward raised PyTorch's
    "backward through the graph a second time". The call is whole: a host backward that raises
    leaves the seeds' gradients as they were before it."""
    manager = kd_rig.manager
    gen = torch.Generator().manual_seed(8)
    manager.set_teacher_logits(torch.randn(16, 4, generator=gen))
    loss = F.cross_entropy(kd_rig.model(kd_rig.x), kd_rig.y)
    kd = manager.collect_kd_losses()
    assert kd is not None
    manager.backward(loss, kd_loss=kd)
    params = manager.seed(SEED0).seed_parameters()
    once = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="second time"):
        manager.backward(loss, kd_loss=kd)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, once, strict=True))
    report = manager.step()
    assert report["host_stepped"] and report["seeds_stepped"] == [SEED0]


def test_a_ctrl_c_as_the_gradients_are_set_aside_loses_none_of_them(
    kd_rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gradient accumulation: the seed-only KD backward sets the host's and the seeds'
    gradients aside (to None) before it runs, and put them back in a ``finally`` it entered
    only after that: a Ctrl-C landing part-way through the set-aside lost the gradients of the
    earlier micro-batches for good. The set-aside is inside it now: they all come back."""
    manager = kd_rig.manager
    gen = torch.Generator().manual_seed(9)
    manager.set_teacher_logits(torch.randn(16, 4, generator=gen))
    loss = F.cross_entropy(kd_rig.model(kd_rig.x), kd_rig.y)
    manager.backward(loss, kd_loss=manager.collect_kd_losses())  # a first micro-batch
    params = [*manager.require_registry().host_params, *manager.seed(SEED0).seed_parameters()]
    earlier = [p.grad.clone() for p in params]
    manager.set_teacher_logits(torch.randn(16, 4, generator=gen))
    loss = F.cross_entropy(kd_rig.model(kd_rig.x), kd_rig.y)
    kd = manager.collect_kd_losses()

    def interrupted(*parts):  # a Ctrl-C once the first gradient was set aside
        for i, p in enumerate(itertools.chain(*parts)):
            if i == 1:
                raise KeyboardInterrupt
            yield p

    monkeypatch.setattr(guard_module, "itertools", SimpleNamespace(chain=interrupted))
    with pytest.raises(KeyboardInterrupt):
        manager.backward(loss, kd_loss=kd)
    monkeypatch.undo()
    assert all(p.grad is not None for p in params)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, earlier, strict=True))


def test_a_kd_alpha_of_zero_trains_no_seed(tmp_path: Path, store: Path, keyring, mlp) -> None:
    """``KDConfig(alpha=0)`` weighs the KD term out, but its backward still wrote zero
    gradients into the distilling seeds: each counted as trained in a step that taught it
    nothing (G2's epochs, a GRAFTING alpha's advance) and its Adam moved on its moments. A
    zero-weighted KD loss is not backpropagated."""
    kd = KDConfig(temperature=2.0, alpha=0.0)
    rig = Rig(make_config(tmp_path, store, kd_enabled=True, kd=kd), keyring)
    assert rig.send("germinate", SEED0, mlp)
    kd_loss = _kd_loss(rig, torch.randn(16, 4, generator=torch.Generator().manual_seed(9)))
    assert kd_loss is not None and kd_loss.requires_grad
    rig.manager.backward(None, kd_loss=kd_loss)
    assert all(p.grad is None for p in rig.manager.seed(SEED0).seed_parameters())
    assert rig.manager.step()["seeds_stepped"] == []
    assert not rig.manager.seed(SEED0).trained_this_epoch


@pytest.mark.parametrize("budget_ms", [1e-6, float("inf")])
def test_the_teacher_budget_is_the_configs(
    tmp_path: Path, store: Path, keyring: Keyring, budget_ms: float
) -> None:
    """``teacher_budget_ms`` sets the budget a teacher forward is timed against: it was 10 ms,
    whatever the run's teacher (a large one was slow at every step, a warning each 100th)."""
    config = make_config(tmp_path, store, kd_enabled=True, teacher_budget_ms=budget_ms)
    rig = Rig(config, keyring, record=False)
    try:
        rig.manager.load_teacher(torch.nn.Linear(6, 4))
        assert rig.manager.get_teacher_predictions(rig.x) is not None
        passes = rig.manager.teacher_passes
        assert passes.budget_ms == budget_ms
        assert passes.slow_count == (1 if budget_ms < 1 else 0)
    finally:
        rig.manager.close()
