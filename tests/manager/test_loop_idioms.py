"""Training loops beyond one forward, one backward and one step: sharpness-aware minimization
(two passes, the host's weights perturbed in place between them) and an optimizer stepped
inside the backward (post-accumulate-grad hooks on the host's parameters). A real Urza store,
the real handler, a tiny host on CPU."""

from __future__ import annotations

import weakref

import torch
from torch.nn import functional as F

from kasmina.kd.config import KDConfig
from tests.manager.helpers import SEED0, Host, Rig, S, make_config, through_a_seed


def _sam_step(params, forward, backward, zero_grad, rho: float = 0.05) -> None:
    """The README's SAM step up to the optimizer's: the gradient at w, the weights moved to
    w + e(w) in place, every gradient zeroed, the gradient there, the weights put back."""
    backward(forward())
    with torch.no_grad():
        norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
        moves = [p.grad * (rho / (norm + 1e-12)) for p in params]
        for p, e in zip(params, moves, strict=True):
            p.add_(e)
    zero_grad()
    backward(forward())
    with torch.no_grad():
        for p, e in zip(params, moves, strict=True):
            p.sub_(e)


def test_the_readme_sam_recipe_steps_the_host_as_plain_sam_and_trains_the_seed(
    rig: Rig, mlp: str
) -> None:
    """An ISOLATED_INIT seed leaves the host's gradients bit for bit those of the bare model,
    in both passes: the host steps exactly as the same SAM over the bare host, every step is
    clean, and the seed steps on its own gradients without a fault."""
    manager, model = rig.manager, rig.model
    bare = Host()  # the same initial weights (seeded), no slot
    assert torch.equal(bare.inp.weight, model.inp.weight)
    bare_opt = torch.optim.Adam(bare.parameters(), lr=0.05)  # the rig's host optimizer
    assert rig.send("germinate", SEED0, mlp)
    host = manager.require_registry().host_params
    seed = manager.seed(SEED0)
    for _ in range(3):
        before = [p.detach().clone() for p in seed.seed_parameters()]
        _sam_step(
            host,
            lambda: F.cross_entropy(model(rig.x), rig.y),
            lambda loss: manager.backward(loss, kd_loss=manager.collect_kd_losses()),
            model.zero_grad,
        )
        report = manager.step()
        assert report["isolation_clean"] and report["host_stepped"]
        assert report["seeds_stepped"] == [SEED0] and not report["nonfinite"]
        assert any(
            not torch.equal(a, b) for a, b in zip(before, seed.seed_parameters(), strict=True)
        )
        _sam_step(
            list(bare.parameters()),
            lambda: F.cross_entropy(bare(rig.x), rig.y),
            lambda loss: loss.backward(),
            bare.zero_grad,
        )
        bare_opt.step()
        bare_opt.zero_grad()
        for mine, theirs in zip(host, bare.parameters(), strict=True):
            assert torch.equal(mine, theirs)
    assert rig.stage(SEED0) == S.ISOLATED_INIT and seed.faults == 0


def test_an_optimizer_stepped_in_the_backward_never_applies_a_seed_only_leak(
    tmp_path, store, keyring, mlp: str
) -> None:
    """PyTorch's optimizer-in-backward recipe over the host (``attach(host_lr=None)``, an SGD
    per parameter stepped by its post-accumulate-grad hook). A seed's KD loss that leaks into
    the host ran that hook in the seed-only backward: the host stepped on the leak, and the
    hook's ``zero_grad`` hid it from the leak check, so no step was found unclean and the seed
    was never quarantined. The hooks sit out the seed-only backward: each sees the task
    loss's gradient alone, the leak is found at each step, the breaker trips on the third, and
    the hooks are back for the host's own backward after it."""
    config = make_config(tmp_path, store, kd_enabled=True, kd=KDConfig(temperature=2.0, alpha=1.0))
    rig = Rig(config, keyring, host_lr=None)
    manager, weight = rig.manager, rig.model.inp.weight
    assert rig.send("germinate", SEED0, mlp)
    optimizers = {p: torch.optim.SGD([p], lr=0.1) for p in manager.require_registry().host_params}
    seen: list[torch.Tensor] = []

    def step_in_backward(p: torch.Tensor) -> None:
        if p is weight:
            seen.append(p.grad.clone())
        optimizers[p].step()
        optimizers[p].zero_grad()

    for p in optimizers:
        p.register_post_accumulate_grad_hook(step_in_backward)
    for step in range(3):
        rig.slot.set_teacher_logits(torch.randn(16, 4))
        loss = F.cross_entropy(rig.model(rig.x), rig.y)
        clean = torch.autograd.grad(loss, weight, retain_graph=True)[0]
        kd = through_a_seed(manager.collect_kd_losses() + 1e-2 * weight.sum())  # a leak
        seen.clear()
        manager.backward(loss, kd_loss=kd)
        assert len(seen) == 1 and torch.equal(seen[0], clean)
        assert not manager.step()["isolation_clean"]
        assert rig.stage(SEED0) == (S.QUARANTINE if step == 2 else S.ISOLATED_INIT)
    assert manager.guard.breaker_trips == 1
    seen.clear()
    before = weight.detach().clone()
    rig.train(1)
    assert len(seen) == 1 and not torch.equal(weight, before)  # the host trains on


def test_a_loop_that_keeps_its_losses_keeps_no_seeds_graph_past_the_step(
    tmp_path, store, keyring, mlp: str
) -> None:
    """``history.append(loss)`` (or the loop variable held through the next forward): the
    seeds' own graphs (their kernels' activations) lived for as long as the loss, kept by the
    node that stands for them in the host's graph, where PyTorch frees a backward's saved
    tensors during it. They are let go of by the step now, the KD loss's included."""
    config = make_config(tmp_path, store, kd_enabled=True, kd=KDConfig(temperature=2.0, alpha=1.0))
    rig = Rig(config, keyring)
    assert rig.send("germinate", SEED0, mlp)
    outputs: list[weakref.ref[torch.Tensor]] = []
    kernel = rig.manager.seed(SEED0).kernel
    kernel.register_forward_hook(lambda _m, _a, out: outputs.append(weakref.ref(out)))
    history = []
    for _ in range(3):
        rig.slot.set_teacher_logits(torch.randn(16, 4))
        loss = F.cross_entropy(rig.model(rig.x), rig.y)
        rig.manager.backward(loss, kd_loss=rig.manager.collect_kd_losses())
        rig.manager.step()
        history.append(loss)
        assert outputs and all(ref() is None for ref in outputs)
    assert rig.manager.seed(SEED0).faults == 0
