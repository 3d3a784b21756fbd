"""The collected KD loss's graph is freed by ``manager.backward`` (``kasmina.kd.graph``).

Its seed-only backward ran first and retained the whole graph for the host's backward after it,
so the KD op's saved tensors (the CPU path's ``[rows, V]`` gradient, the GPU path's student and
teacher logits) lived on for as long as the loop held ``kd``: in the README's accumulation
recipe, through the next micro-batch's forward. The backward now stops at the seeds' outputs
first, without retaining, and goes on from there: the same gradients, the KD op's tensors freed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._functorch.config as functorch_config
from torch.nn import functional as F

import kasmina.manager.guard as guard_module
from kasmina.kd.config import KDConfig
from kasmina.kd.graph import hold_retained_backwards, kd_cut
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import SEED0, SEED1, Rig, S, make_config, walk_to_active

TEACHER = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))


def _forward(rig: Rig) -> tuple[torch.Tensor, torch.Tensor | None]:
    rig.manager.set_teacher_logits(TEACHER)
    out = rig.model(rig.x)
    return F.cross_entropy(out, rig.y), rig.manager.collect_kd_losses()


@pytest.fixture
def grafting(tmp_path: Path, store: Path, keyring: Keyring, mlp: str) -> Rig:
    """SEED0 GRAFTING (its output blended into the host's: the graphs share it), SEED1 in
    COMPATIBILITY_CHECK, both distilling."""
    kd = KDConfig(temperature=2.0, alpha=1.0)
    rig = Rig(make_config(tmp_path, store, kd_enabled=True, kd=kd), keyring)
    assert rig.send("germinate", SEED0, mlp) and rig.send("germinate", SEED1, mlp)
    for _ in range(2):
        rig.manager.backward(*_forward(rig))
        rig.manager.step()
    rig.manager.end_epoch(0)
    assert rig.send("advance", SEED0) and rig.send("advance", SEED1)
    rig.manager.backward(*_forward(rig))
    rig.manager.step()
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.GRAFTING
    return rig


def _kd_nodes(kd: torch.Tensor) -> list[Any]:
    found, stack, seen = [], [kd.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        if type(node).__name__ == "_KDFunctionBackward":
            found.append(node)
        stack.extend(fn for fn, _ in node.next_functions)
    return found


def _grads(rig: Rig) -> list[torch.Tensor | None]:
    grads = [None if p.grad is None else p.grad.clone() for p in rig.model.parameters()]
    for p in rig.model.parameters():
        p.grad = None
    return grads


def test_the_kd_ops_saved_tensors_are_freed_and_the_gradients_are_the_same(
    grafting: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = grafting
    loss, kd = _forward(rig)
    (node,) = _kd_nodes(kd)
    assert node.saved_tensors  # held until the backward
    rig.manager.backward(loss, kd_loss=kd)
    with pytest.raises(RuntimeError, match="freed"):
        _ = node.saved_tensors
    cut = _grads(rig)
    monkeypatch.setattr(guard_module, "kd_cut", lambda kd_loss: None)  # one retained backward
    loss, kd = _forward(rig)
    (node,) = _kd_nodes(kd)
    rig.manager.backward(loss, kd_loss=kd)
    assert node.saved_tensors  # what was kept before
    whole = _grads(rig)
    assert any(g is not None for g in cut)
    assert all(
        (a is None and b is None) or torch.equal(a, b) for a, b in zip(cut, whole, strict=True)
    )
    monkeypatch.undo()
    rig.manager.backward(*_forward(rig))
    report = rig.manager.step()
    assert report["isolation_clean"] and rig.stage(SEED0) == S.GRAFTING
    rig.manager.close()


def test_accumulated_micro_batches_free_each_kd_graph(grafting: Rig) -> None:
    """The README's accumulation recipe: each micro-batch's KD graph is gone once its
    backward ran, while the loop still holds ``kd``; the step trains the seeds as before."""
    rig = grafting
    before = [p.detach().clone() for p in rig.manager.optimizers.parameters(SEED0)]
    nodes = []
    for _ in range(2):
        loss, kd = _forward(rig)
        nodes += _kd_nodes(kd)
        rig.manager.backward(loss / 2, kd_loss=kd / 2)
    for node in nodes:
        with pytest.raises(RuntimeError, match="freed"):
            _ = node.saved_tensors
    rig.manager.step()
    after = rig.manager.optimizers.parameters(SEED0)
    assert not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    rig.manager.close()


def test_a_kd_loss_with_a_parameter_of_its_own_keeps_the_whole_backward(grafting: Rig) -> None:
    """A ``kd_loss`` that reaches a trainable tensor above the collected losses (a seed
    weight's penalty added by the caller) cannot be cut: its gradient would be lost. The one
    retained backward takes it whole."""
    rig = grafting
    weight = rig.manager.optimizers.parameters(SEED0)[0]
    loss, kd = _forward(rig)
    rig.manager.backward(loss, kd_loss=kd + 0.5 * weight.square().sum())
    with_penalty = weight.grad.clone()
    _grads(rig)
    loss, kd = _forward(rig)
    rig.manager.backward(loss, kd_loss=kd)
    assert not torch.equal(weight.grad, with_penalty)  # the penalty's gradient was in it
    rig.manager.step()
    rig.manager.close()


def test_a_compiled_models_kd_loss_is_not_cut(grafting: Rig) -> None:
    """Under ``torch.compile`` the seeds' outputs come out of the compiled region's one node,
    which holds the host's graph too: cut there, the first call freed what the host's
    backward needed, and every host step raised. Such a loss records no cut and keeps the one
    retained backward; the host trains."""
    rig = grafting
    rig.model = torch.compile(rig.model, backend="aot_eager")
    host = rig.manager.optimizers.parameters("host")
    for _ in range(2):
        before = [p.detach().clone() for p in host]
        loss, kd = _forward(rig)
        assert kd is not None and kd_cut(kd) is None
        rig.manager.backward(loss, kd_loss=kd)
        report = rig.manager.step()
        assert report["host_stepped"]
        assert not all(torch.equal(a, b) for a, b in zip(before, host, strict=True))
    rig.manager.close()


def test_a_compiled_model_with_an_active_seed_distils_another(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """An ACTIVE seed's compiled gradient cut wrote its seed's cut flag in every backward; the
    flag was saved for the backward, so the task loss's backward through the graph the
    seed-only KD backward had retained found it modified in place, and raised at every step
    of a compiled model that distilled beside a fossilized seed."""
    kd = KDConfig(temperature=2.0, alpha=1.0)
    rig = Rig(make_config(tmp_path, store, kd_enabled=True, kd=kd), keyring)
    assert rig.send("germinate", SEED0, mlp)
    walk_to_active(rig, [SEED0])
    assert rig.send("germinate", SEED1, mlp) and rig.stage(SEED1) == S.ISOLATED_INIT
    rig.model = torch.compile(rig.model, backend="aot_eager")
    for _ in range(2):
        loss, kd_loss = _forward(rig)
        assert kd_loss is not None
        rig.manager.backward(loss, kd_loss=kd_loss)
        assert rig.manager.step()["host_stepped"]
    assert rig.manager.counters["kd_backward_failed"] == 0
    assert rig.manager.seed(SEED0).faults == 0
    rig.manager.close()


def test_a_compiled_models_kd_term_survives_a_batch_size_change(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """A new batch size recompiles the model with dynamic shapes, and AOTAutograd then compiled
    its backward with donated buffers, which refuse the seed-only KD backward's
    ``retain_graph``: from that step on the KD term was dropped (``kd_backward_failed`` went
    0, 0, 1, 2, 3), and with it the KD leak check; the seeds' gradients left the eager run's.
    A KD manager now keeps donated buffers off while it is open: nothing fails, the compiled
    run's seed gradients are the eager run's at every step, and close() puts the flag back."""
    torch._dynamo.reset()
    alone = _no_other_holds()
    before = functorch_config.donated_buffer
    kd = KDConfig(temperature=2.0, alpha=0.5)
    rigs = [Rig(make_config(tmp_path / n, store, kd_enabled=True, kd=kd), keyring) for n in "ec"]
    eager, compiled = rigs
    forwards = [eager.model, torch.compile(compiled.model, backend="aot_eager")]
    for rig in rigs:
        assert rig.send("germinate", SEED0, mlp)
    seed = [r.manager.optimizers.parameters(SEED0) for r in rigs]
    generator = torch.Generator().manual_seed(7)
    for n in (16, 16, 5, 16, 16):
        x, y = torch.randn(n, 6, generator=generator), torch.arange(n) % 4
        teacher = torch.randn(n, 4, generator=generator)
        for rig, forward in zip(rigs, forwards, strict=True):
            rig.manager.set_teacher_logits(teacher)
            loss = F.cross_entropy(forward(x), y)
            rig.manager.backward(loss, kd_loss=rig.manager.collect_kd_losses())
        assert compiled.manager.counters["kd_backward_failed"] == 0
        for a, b in zip(*seed, strict=True):
            assert a.grad is not None and b.grad is not None
            torch.testing.assert_close(b.grad, a.grad)
        for rig in rigs:
            assert rig.manager.step()["isolation_clean"]
    for rig in rigs:
        rig.manager.close()
    if alone:  # (an earlier test's manager still open holds the flag off, as it should)
        assert functorch_config.donated_buffer == before
    torch._dynamo.reset()


def _no_other_holds() -> bool:
    """Whether no KD manager holds donated buffers off now (earlier tests' unclosed managers
    are collected first: a hold ends when its manager is freed)."""
    import gc

    import kasmina.kd.graph as kd_graph

    gc.collect()
    return not kd_graph._holds


def test_a_graph_that_still_donates_is_reported_once(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A graph compiled with donated buffers all the same (the flag set again while the manager
    is open) cannot be retained: each step's KD term is dropped and counted, as any failed KD
    backward's, and one ERROR says why and how to get the term back."""
    torch._dynamo.reset()
    kd = KDConfig(temperature=2.0, alpha=0.5)
    rig = Rig(make_config(tmp_path, store, kd_enabled=True, kd=kd), keyring)
    compiled = torch.compile(rig.model, backend="aot_eager", dynamic=True)
    assert rig.send("germinate", SEED0, mlp)
    with functorch_config.patch(donated_buffer=True), caplog.at_level(logging.ERROR):
        for _ in range(2):
            rig.manager.set_teacher_logits(TEACHER)
            loss = F.cross_entropy(compiled(rig.x), rig.y)
            rig.manager.backward(loss, kd_loss=rig.manager.collect_kd_losses())
            rig.manager.step()
    assert rig.manager.counters["kd_backward_failed"] == 2
    errors = [r for r in caplog.records if "donated_buffer is on again" in r.getMessage()]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR
    rig.manager.close()
    torch._dynamo.reset()


def test_donated_buffers_are_held_off_until_the_last_release() -> None:
    """Holds nest (one per KD manager); each release counts once; the last one puts back the
    value the first hold found."""
    if not _no_other_holds():
        pytest.skip("a KD manager of an earlier test is still open")
    with functorch_config.patch(donated_buffer=True):
        first, second = hold_retained_backwards(), hold_retained_backwards()
        first()
        first()  # a second call of the same release does nothing
        assert functorch_config.donated_buffer is False
        second()
        assert functorch_config.donated_buffer is True
