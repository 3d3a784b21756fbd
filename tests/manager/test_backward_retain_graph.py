"""``manager.backward(..., retain_graph=True)``: several backwards over one forward.

A loop with several losses over one forward (multi-task heads, ``for loss in losses``) calls
``manager.backward`` once per loss, each keeping the graph for the next. Each call's gradients
are the ones it would make alone, accumulated in call order, as ``loss.backward`` would; the
forward's KD loss goes to any one of the calls, and its seed-only phase's leak check holds there
as in a single call. Without ``retain_graph`` a second backward raises PyTorch's error and
leaves every gradient, and the manager, as they were.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from kasmina.kd.config import KDConfig
from kasmina.seeds.inject import detach
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import SEED0, SEED1, Rig, S, make_config, through_a_seed

TEACHER = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))


def _two_stages(tmp_path: Path, store: Path, keyring: Keyring, mlp: str, **settings) -> Rig:
    """SEED0 GRAFTING (blended into the host's output), SEED1 ISOLATED_INIT (the host's chunk
    passes through it); both distil."""
    kd = KDConfig(temperature=2.0, alpha=0.5)
    rig = Rig(make_config(tmp_path, store, kd_enabled=True, kd=kd, **settings), keyring)
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2, teacher=TEACHER)
    rig.manager.end_epoch(0)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.COMPATIBILITY_CHECK
    rig.train(1, teacher=TEACHER)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.GRAFTING
    assert rig.send("germinate", SEED1, mlp) and rig.stage(SEED1) == S.ISOLATED_INIT
    rig.train(1, teacher=TEACHER)
    return rig


@pytest.fixture
def two_stages(tmp_path: Path, store: Path, keyring: Keyring, mlp: str) -> Rig:
    return _two_stages(tmp_path, store, keyring, mlp)


def _forward(rig: Rig) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Two task losses over one forward, and its collected KD loss."""
    rig.manager.set_teacher_logits(TEACHER)
    out = rig.model(rig.x)
    losses = [F.cross_entropy(out, rig.y), 0.1 * out.pow(2).mean()]
    return losses, rig.manager.collect_kd_losses()


def _params(rig: Rig) -> list[torch.Tensor]:
    seeds = [p for sid in (SEED0, SEED1) for p in rig.manager.seed(sid).seed_parameters()]
    return [*rig.model.inp.parameters(), *rig.model.out.host.parameters(), *seeds]


def _take(rig: Rig) -> list[torch.Tensor | None]:
    """Every gradient (host and seeds), cloned, and then cleared."""
    params = _params(rig)
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


def _added(*calls: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The gradients of separate calls as accumulation sums them, in call order."""
    total = [None if g is None else g.clone() for g in calls[0]]
    for grads in calls[1:]:
        for i, g in enumerate(grads):
            if g is not None:
                total[i] = g.clone() if total[i] is None else total[i].add_(g)
    return total


def _same(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> bool:
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("kd_call", [0, 1])
def test_one_call_per_loss_accumulates_each_calls_gradients_bit_for_bit(
    two_stages: Rig, kd_call: int
) -> None:
    rig, manager = two_stages, two_stages.manager
    _take(rig)
    # Each term alone, on a forward of its own: the same values, gradients in isolation.
    alone = []
    for i in range(2):
        losses, kd = _forward(rig)
        manager.backward(losses[i])
        alone.append(_take(rig))
    losses, kd = _forward(rig)
    manager.backward(None, kd_loss=kd)
    kd_alone = _take(rig)
    assert all(g is not None for g in alone[0]) and any(g is not None for g in kd_alone)
    losses, kd = _forward(rig)
    for i, loss in enumerate(losses):
        manager.backward(loss, kd_loss=kd if i == kd_call else None, retain_graph=True)
    together = _take(rig)
    # Accumulated in call order, a call's KD term after its loss (as ``add_grads`` adds it).
    order = [alone[0], kd_alone, alone[1]] if kd_call == 0 else [*alone, kd_alone]
    assert _same(together, _added(*order))
    # One summed loss: the same gradients, up to rounding (the sum is taken before the graph).
    losses, kd = _forward(rig)
    manager.backward(losses[0] + losses[1], kd_loss=kd)
    for a, b in zip(together, _take(rig), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # The step counts both seeds' gradients of every call, and finds the step clean.
    losses, kd = _forward(rig)
    for i, loss in enumerate(losses):
        manager.backward(loss, kd_loss=kd if i == kd_call else None, retain_graph=True)
    report = manager.step()
    assert report["isolation_clean"] and report["host_stepped"]
    assert sorted(report["seeds_stepped"]) == [SEED0, SEED1]
    manager.close()


def test_the_host_gets_what_plain_autograd_gives_the_unattached_model(kd_rig: Rig, mlp) -> None:
    """Seeds in ISOLATED_INIT (the host's output passes through, the seeds distil): the host's
    gradients are those of two plain backwards over one forward of the model without its
    seeds, bit for bit, the KD loss given on the first call."""
    rig, manager = kd_rig, kd_rig.manager
    assert rig.send("germinate", SEED0, mlp) and rig.send("germinate", SEED1, mlp)
    bare = copy.deepcopy(rig.model)
    detach(bare)
    out = bare(rig.x)
    F.cross_entropy(out, rig.y).backward(retain_graph=True)
    (0.1 * out.pow(2).mean()).backward()
    losses, kd = _forward(rig)
    assert kd is not None
    manager.backward(losses[0], kd_loss=kd, retain_graph=True)
    manager.backward(losses[1])
    for name, p in bare.named_parameters():
        assert torch.equal(rig.model.get_parameter(name).grad, p.grad), name
    assert all(p.grad is not None for p in manager.seed(SEED0).seed_parameters())
    manager.close()


def test_a_kd_only_first_call_keeps_the_graph_for_the_losses_after_it(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """``manager.backward(None, kd_loss=kd, retain_graph=True)`` first: its seed-only backward
    no longer frees the seeds' graph, which the host's losses then go through (the kernels'
    own graph, under ``guard_seed_backward=False``; a guarded island is always kept)."""
    rig = _two_stages(tmp_path, store, keyring, mlp, guard_seed_backward=False)
    manager = rig.manager
    _take(rig)
    losses, kd = _forward(rig)
    manager.backward(None, kd_loss=kd)
    kd_alone = _take(rig)
    with pytest.raises(RuntimeError, match="second time"):
        manager.backward(losses[0])  # the KD phase freed what the kernels saved
    _take(rig)
    losses, kd = _forward(rig)
    manager.backward(losses[0])
    loss_alone = _take(rig)
    losses, kd = _forward(rig)
    manager.backward(None, kd_loss=kd, retain_graph=True)
    manager.backward(losses[0])
    assert _same(_take(rig), _added(kd_alone, loss_alone))
    manager.close()


def test_the_same_kd_loss_twice_is_refused_before_anything_changes(two_stages: Rig) -> None:
    rig, manager = two_stages, two_stages.manager
    _take(rig)
    losses, kd = _forward(rig)
    manager.backward(losses[0], kd_loss=kd, retain_graph=True)
    first = [None if p.grad is None else p.grad.clone() for p in _params(rig)]
    for again in (kd, kd / 2):  # the same loss, or a part of it
        with pytest.raises(RuntimeError, match="kd_loss a second time: an earlier manager"):
            manager.backward(losses[1], kd_loss=again, retain_graph=True)
        assert _same([p.grad for p in _params(rig)], first)
    assert not manager.guard.kd_flags()  # no phase ran: nothing to check
    manager.backward(losses[1])  # the graph is still there
    report = manager.step()
    assert report["isolation_clean"] and sorted(report["seeds_stepped"]) == [SEED0, SEED1]
    assert manager.counters["kd_backward_failed"] == 0
    manager.close()


@pytest.mark.parametrize("leaking_call", [0, 1])
def test_a_leak_in_any_call_is_caught_at_the_step(two_stages: Rig, leaking_call: int) -> None:
    rig, manager = two_stages, two_stages.manager
    _take(rig)
    host_weight = rig.model.inp.weight
    losses, kd = _forward(rig)
    assert kd is not None
    leak = through_a_seed(kd + 1e-2 * host_weight.sum())  # the host gets a seed-only gradient
    for i, loss in enumerate(losses):
        manager.backward(loss, kd_loss=leak if i == leaking_call else None, retain_graph=True)
    out = rig.model(rig.x)  # what the host's losses alone give it: the leak dropped
    clean = torch.autograd.grad(F.cross_entropy(out, rig.y) + 0.1 * out.pow(2).mean(), host_weight)
    torch.testing.assert_close(host_weight.grad, clean[0], rtol=1e-5, atol=1e-7)
    before = [p.detach().clone() for p in rig.model.inp.parameters()]
    report = manager.step()
    assert not report["isolation_clean"] and not report["host_stepped"]
    assert all(torch.equal(a, p) for a, p in zip(before, rig.model.inp.parameters(), strict=True))
    assert manager.seed(SEED0).isolation_violations == manager.seed(SEED1).isolation_violations == 1
    manager.close()


def test_a_second_backward_without_retain_graph_raises_and_changes_nothing(
    two_stages: Rig,
) -> None:
    rig, manager = two_stages, two_stages.manager
    _take(rig)
    losses, kd = _forward(rig)
    manager.backward(losses[0])
    first = [None if p.grad is None else p.grad.clone() for p in _params(rig)]
    with pytest.raises(RuntimeError, match="second time"):
        manager.backward(losses[1], kd_loss=kd)  # the KD phase runs; the host's pass cannot
    assert _same([p.grad for p in _params(rig)], first)  # its KD gradients dropped too
    report = manager.step()
    assert report["isolation_clean"] and report["host_stepped"]
    assert sorted(report["seeds_stepped"]) == [SEED0, SEED1]
    report = rig.train(1, teacher=TEACHER)  # the loop goes on
    assert report["isolation_clean"] and report["host_stepped"]
    manager.close()


def test_a_retain_graph_that_is_not_a_bool_is_refused_first(two_stages: Rig) -> None:
    rig, manager = two_stages, two_stages.manager
    _take(rig)
    losses, kd = _forward(rig)
    with pytest.raises(TypeError, match="retain_graph must be a bool, got str"):
        manager.backward(losses[0], kd_loss=kd, retain_graph="yes")  # type: ignore[arg-type]
    assert all(p.grad is None for p in _params(rig)) and not manager.guard.kd_flags()
    manager.backward(losses[0], kd_loss=kd)  # the KD loss was not taken
    assert manager.step()["isolation_clean"]
    manager.close()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_host_backward_that_raises_gives_back_a_kd_loss_whose_graph_is_whole(
    two_stages: Rig, compiled: bool
) -> None:
    """A call whose host pass raised (an out-of-memory error) adds no gradient; its KD loss was
    taken all the same, so the retry was refused as a second backward though, compiled (no
    cut), its graph was whole. It is given back there; eager, the cut freed its graph above the
    seeds: the retry's refusal is PyTorch's, and the gradients are as before either way."""
    rig, manager = two_stages, two_stages.manager
    if compiled:
        torch._dynamo.reset()
        rig.model = torch.compile(rig.model, backend="aot_eager")
    _take(rig)
    losses, kd = _forward(rig)
    raised: list[bool] = []

    def once(g: torch.Tensor) -> torch.Tensor:
        if not raised:
            raised.append(True)
            raise RuntimeError("out of memory (injected)")
        return g

    losses[0].register_hook(once)
    with pytest.raises(RuntimeError, match="injected"):
        manager.backward(losses[0], kd_loss=kd, retain_graph=True)
    assert all(p.grad is None for p in _params(rig))  # the failed call added nothing
    if compiled:
        manager.backward(losses[0], kd_loss=kd, retain_graph=None)  # None: torch's default
        assert all(p.grad is not None for p in _params(rig))
        with pytest.raises(RuntimeError, match="second time"):  # taken by the retry
            manager.backward(losses[1], kd_loss=kd)
    else:
        with pytest.raises(RuntimeError, match="second time"):
            manager.backward(losses[0], kd_loss=kd, retain_graph=True)
        assert all(p.grad is None for p in _params(rig))
        manager.backward(losses[0])
    assert manager.step()["isolation_clean"]
    manager.close()


def test_a_host_backward_that_raises_late_without_retain_graph_keeps_its_kd_loss_taken(
    two_stages: Rig,
) -> None:
    """Without ``retain_graph`` the host's pass frees the graph as it goes: one that raised late
    gave the KD loss back all the same, and the retry's KD phase ran into the freed graph, was
    counted as failed and dropped the term unseen. It stays taken: the retry is refused."""
    rig, manager = two_stages, two_stages.manager
    torch._dynamo.reset()
    rig.model = torch.compile(rig.model, backend="aot_eager")
    _take(rig)
    side = torch.ones(3, requires_grad=True) * 1.0  # made before the forward: its node runs last
    side.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("out of memory (injected)")))
    losses, kd = _forward(rig)
    with pytest.raises(RuntimeError, match="injected"):
        manager.backward(losses[0] + side.sum(), kd_loss=kd)
    failed = manager.guard.counters["kd_backward_failed"]
    with pytest.raises(RuntimeError, match="second time"):
        manager.backward(None, kd_loss=kd)
    assert manager.guard.counters["kd_backward_failed"] == failed
    manager.close()
