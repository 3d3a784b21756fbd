"""Global PyTorch modes a user's script may have on when it calls the manager: what a safe
point makes stays trainable, and a backward runs as ``loss.backward()`` would."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn import functional as F

from kasmina.control.builders import make_rollback_command, make_seed_command
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import SEED0, Rig, S, host_params, make_config


def _inference_tensors(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        value.is_inference()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def test_a_rollback_applied_under_inference_mode_leaves_the_host_training(rig: Rig) -> None:
    """``end_epoch`` in a validation block under ``torch.inference_mode()`` applied a queued
    ROLLBACK there: the optimizer state it restored was made of inference tensors, and every
    later step raised ("Inplace update to inference tensor outside InferenceMode")."""
    rig.train(2)
    rig.manager.end_epoch(0)
    rig.train(2)
    rig.manager.end_epoch(1)
    assert rig.manager.handle_adaptation_command(rig.signed(make_rollback_command(0)))
    with torch.inference_mode():
        rig.manager.end_epoch(2)  # the safe point that applies it
    assert rig.manager.counters["rollbacks_committed"] == 1
    assert _inference_tensors(rig.manager.optimizers.optimizer("host")) == 0
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    before = host_params(rig)
    assert rig.train(2)["host_stepped"]
    assert any(not torch.equal(a, b) for a, b in zip(before, host_params(rig), strict=True))


def test_a_germinate_applied_under_inference_mode_makes_a_trainable_seed(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """The seed's kernel copy, made there, was of inference tensors: the seed faulted at every
    step ("Inference tensors cannot be saved for backward") and was quarantined."""
    rig = Rig(make_config(tmp_path, store), keyring)
    rig.train(1)
    assert rig.manager.handle_adaptation_command(
        rig.signed(make_seed_command("germinate", SEED0, mlp))
    )
    with torch.inference_mode():  # a validation block that calls a safe point
        F.cross_entropy(rig.model(rig.x), rig.y)
        (outcome,) = rig.manager.apply_pending(wait=True)  # wait: the fetch runs on a worker
    assert outcome.ok, outcome
    seed = rig.manager.seed(SEED0)
    assert seed.stage == S.ISOLATED_INIT
    assert not any(p.is_inference() for p in seed.seed_parameters())
    rig.train(3)
    assert seed.faults == 0 and seed.stage == S.ISOLATED_INIT


def test_a_kd_loss_backpropagates_under_no_grad_as_the_loss_does(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """``loss.backward()`` works under ``torch.no_grad()``; ``manager.backward`` with a KD loss
    raised there ("element 0 of tensors does not require grad"): its weighting by
    ``kd.alpha`` recorded no graph."""
    rig = Rig(make_config(tmp_path, store, kd_enabled=True), keyring)
    assert rig.send("germinate", SEED0, mlp)
    rig.manager.set_teacher_logits(torch.randn(16, 4, generator=torch.Generator().manual_seed(3)))
    loss = F.cross_entropy(rig.model(rig.x), rig.y)
    kd = rig.manager.collect_kd_losses()
    assert kd is not None
    with torch.no_grad():
        rig.manager.backward(loss, kd_loss=kd)
    assert all(p.grad is not None for p in rig.manager.seed(SEED0).seed_parameters())
    assert rig.manager.step()["seeds_stepped"] == [SEED0]
