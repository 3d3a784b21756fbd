"""Global modes and hooks a user may have on while seeds train: hooks on every parameter of a
grown model, where the backward guard hands a seed's kernel parameter no gradient (its backward
raised, or its forward did not use the parameter), and anomaly mode meeting a NaN that a
kernel's own backward makes."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from torch import nn

from kasmina.isolation.monitor import GradientIsolationMonitor
from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import SeedStage
from tests.seeds.fault_helpers import RaisesInBackward
from tests.seeds.helpers import walk

S = SeedStage


class WithUnused(nn.Module):
    """A healthy kernel holding a parameter its forward does not use (a branch not taken)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.gate = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("stage", [S.ISOLATED_INIT, S.GRAFTING], ids=lambda s: s.name)
def test_hooks_written_for_tensors_leave_the_hosts_backward_whole(
    stage: SeedStage, caplog: pytest.LogCaptureFixture
) -> None:
    """The guard returns None for such a parameter, and the engine still runs its hooks: a
    per-parameter clipping hook (``g.clamp``) and a post-accumulate hook reading ``.grad``
    raised out of the host's backward, for a fault the guard had contained, or for a healthy
    kernel's unused parameter. Their failure on that None is logged; a parameter with a
    gradient gets its hooks as before; ``register_multi_grad_hook`` fires once; and after the
    backward the hooks are the user's own again."""
    caplog.set_level(logging.DEBUG, logger="kasmina.seeds.param_hooks")  # (rate-limited)
    torch.manual_seed(3)
    layer = KasminaLayer(nn.Linear(6, 4), 2, 2)
    for k, kernel in enumerate([RaisesInBackward(2), WithUnused()]):
        layer.seed(k).attach_kernel(kernel)
        walk(layer.seed(k), stage)
    layer.update_alpha_blending(3, 10)
    params = list(layer.parameters())
    clamp = [p.register_hook(lambda g: g.clamp(-0.01, 0.01)) for p in params]
    norms: list[float] = []
    for p in params:
        p.register_post_accumulate_grad_hook(lambda q: norms.append(float(q.grad.norm())))
    fired: list[list[bool]] = []
    torch.autograd.graph.register_multi_grad_hook(
        params, lambda grads: fired.append([g is not None for g in grads])
    )
    hooks = [dict(p._backward_hooks) for p in params]
    after = [dict(p._post_accumulate_grad_hooks) for p in params]

    layer(torch.randn(5, 6)).pow(2).sum().backward()  # completes

    scale, gate = layer.seed(0).kernel.scale, layer.seed(1).kernel.gate
    lin = layer.seed(1).kernel.lin
    assert layer.seed(0).faults == 1 and scale.grad is None and gate.grad is None
    # (GRAFTING blends against the detached host: no host gradient through the slot)
    with_grad = [*lin.parameters(), *(layer.host.parameters() if stage == S.ISOLATED_INIT else ())]
    assert all(p.grad is not None and p.grad.abs().max() <= 0.01 for p in with_grad)  # clamped
    assert len(norms) == len(with_grad) and len(fired) == 1
    raised = [r for r in caplog.records if "raised when handed no gradient" in r.getMessage()]
    assert len(raised) == 4  # each of the two hooks of ``scale`` and of ``gate``
    assert [dict(p._backward_hooks) for p in params] == hooks
    assert [dict(p._post_accumulate_grad_hooks) for p in params] == after
    clamp[0].remove()  # the user's handles still remove their hooks
    assert len(params[0]._backward_hooks) == len(hooks[0]) - 1


def test_the_debug_monitors_hook_takes_the_guards_none_as_no_leak(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A debug monitor's hook on a seed parameter, in a host backward, read the None the guard
    hands a kernel whose backward raised as a gradient (``None != 0``) and raised."""
    caplog.set_level(logging.DEBUG, logger="kasmina.seeds.param_hooks")  # (rate-limited)
    torch.manual_seed(4)
    layer = KasminaLayer(nn.Linear(6, 4), 2, 2)
    layer.seed(0).attach_kernel(RaisesInBackward(2))
    walk(layer.seed(0), S.ISOLATED_INIT)
    kernel = layer.seed(0).kernel
    monitor = GradientIsolationMonitor(
        "s0", list(kernel.named_parameters()), list(layer.host.named_parameters())
    )
    monitor.register_hooks(layer.host, kernel)
    with monitor.host_backward():
        layer(torch.randn(5, 6)).sum().backward()
    assert layer.seed(0).faults == 1 and monitor.verify_isolation_after_step()
    assert monitor.violation_count == 0
    assert not [r for r in caplog.records if r.name == "kasmina.seeds.param_hooks"]


class _NanGradient(torch.autograd.Function):
    """The identity, whose backward makes every entry of its gradient NaN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad * float("nan")


class NanBackward(nn.Module):
    """A finite output whose backward is NaN (a ``0 * inf`` inside it): the NaN is the kernel's."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(_NanGradient.apply(self.lin(x)))


@pytest.mark.parametrize("stage", [S.ISOLATED_INIT, S.GRAFTING], ids=lambda s: s.name)
def test_anomaly_mode_at_a_kernels_own_nan_gradient_is_one_backward_fault(
    stage: SeedStage,
) -> None:
    """Anomaly mode raises where a backward node returns NaN. Before ACTIVE that node is in the
    kernel's island, whose backward the guard runs: one ``backward`` fault per forward (its
    step dropped), the host's backward completes, and the healthy sibling keeps exactly the
    gradient it gets without anomaly mode."""
    torch.manual_seed(6)
    layer = KasminaLayer(nn.Linear(6, 4), 2, 2)
    for k, kernel in enumerate([NanBackward(), nn.Sequential(nn.Linear(2, 2), nn.Tanh())]):
        layer.seed(k).attach_kernel(kernel)
        walk(layer.seed(k), stage)
    layer.update_alpha_blending(3, 10)
    x = torch.randn(5, 6)
    layer(x).pow(2).sum().backward()
    want = [p.grad.clone() for p in layer.seed(1).seed_parameters()]
    layer.zero_grad(set_to_none=True)
    layer.poll_nonfinite()
    with pytest.warns(UserWarning), torch.autograd.set_detect_anomaly(True):
        layer(x).pow(2).sum().backward()  # (anomaly mode warns the forward's traceback)
    seed = layer.seed(0)
    assert seed.faults == 1 and seed.fault_log[-1].startswith("backward raised RuntimeError")
    assert all(p.grad is None for p in seed.seed_parameters())
    got = [p.grad for p in layer.seed(1).seed_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert layer.poll_nonfinite() == ["layer[0]"] and layer.seed(1).faults == 0


def _guard_node(loss: torch.Tensor) -> torch.autograd.graph.Node:
    """The backward guard's node in ``loss``'s graph (``ContainedBackward``)."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "ContainedBackward" in type(node).__name__:
            return node
        todo += [next_node for next_node, _ in node.next_functions]
    raise AssertionError("no guard node in the graph")


def test_two_threads_backward_a_faulting_kernel_with_a_hook_on_its_parameter() -> None:
    """Two backwards at once on two threads through one seed whose backward faults: thread A's
    guard wraps the parameter's hook, B's finds it wrapped, and A's end put the user's hook back
    while B's engine had yet to hand the parameter its None (B's backward raised the hook's
    error). The last backward to end puts it back now. Node hooks pin the interleaving."""
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(6, 4), 2, 2)
    seed = layer.seed(0)
    seed.attach_kernel(RaisesInBackward(2))
    walk(seed, SeedStage.ISOLATED_INIT)
    seed.fault_limit = 100
    hook = lambda g: g.clamp(-1, 1)  # noqa: E731 (the usual per-parameter clipping)
    seed.kernel.scale.register_hook(hook)
    loss_a, loss_b = (layer(torch.randn(5, 6)).sum() for _ in range(2))
    a_wrapped, b_past_guard, a_done = (threading.Event() for _ in range(3))
    _guard_node(loss_a).register_hook(lambda gi, go: (a_wrapped.set(), b_past_guard.wait(10))[0])
    _guard_node(loss_b).register_hook(lambda gi, go: (b_past_guard.set(), a_done.wait(10))[0])
    out: dict[str, str] = {}

    def run(name: str, loss: torch.Tensor, before: threading.Event | None) -> None:
        if before is not None:
            before.wait(10)
        try:
            loss.backward()
            out[name] = "ok"
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
        a_done.set()

    threads = [
        threading.Thread(target=run, args=("A", loss_a, None)),
        threading.Thread(target=run, args=("B", loss_b, a_wrapped)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert out == {"A": "ok", "B": "ok"} and seed.faults == 2
    assert list(seed.kernel.scale._backward_hooks.values()) == [hook]  # put back once both end


class Toggled(nn.Module):
    """A healthy kernel whose forward uses its ``gate`` only when told to."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.gate = nn.Parameter(torch.ones(2))
        self.use_gate = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return torch.tanh(y * self.gate if self.use_gate else y)


class _RaisesElsewhere(torch.autograd.Function):
    """The identity, whose backward raises: a host backward that fails outside any seed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        raise RuntimeError("the host's own backward failed")


def _toggled_layer() -> tuple[KasminaLayer, Toggled]:
    torch.manual_seed(1)
    layer = KasminaLayer(nn.Linear(6, 4), 2, 2)
    kernel = Toggled()
    layer.seed(0).attach_kernel(kernel)
    walk(layer.seed(0), S.ISOLATED_INIT)
    return layer, kernel


def test_a_hook_left_wrapped_by_a_failed_backward_runs_as_before_on_a_gradient(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A backward that raised elsewhere after the guard wrapped an unused parameter's hooks
    never ran its final callback: the wrappers stay. A later backward that hands the parameter
    a gradient runs each hook as it is: the tensor hook's return is the gradient (clamped), the
    post-accumulate hook reads ``.grad``, and a hook that raises on that gradient raises out of
    the backward, as plain PyTorch's would."""
    caplog.set_level(logging.DEBUG, logger="kasmina.seeds.param_hooks")  # (rate-limited)
    layer, kernel = _toggled_layer()
    gate = kernel.gate
    gate.register_hook(lambda g: g.clamp(-1e-3, 1e-3))
    seen: list[torch.Tensor] = []
    gate.register_post_accumulate_grad_hook(lambda q: seen.append(q.grad.clone()))
    armed = [False]

    def strict(q: torch.Tensor) -> None:
        if armed[0]:
            raise ValueError("a hook's own error on a real gradient")

    gate.register_post_accumulate_grad_hook(strict)
    elsewhere = _RaisesElsewhere.apply(torch.randn(3, requires_grad=True)).sum()  # runs last
    with pytest.raises(RuntimeError, match="host's own backward failed"):
        (layer(torch.randn(5, 6)).pow(2).sum() + elsewhere).backward()
    assert seen == [] and gate.grad is None  # (the None was handed to the wrapped hooks)
    assert all(hasattr(h, "hook") for h in gate._post_accumulate_grad_hooks.values())  # wrapped

    kernel.use_gate = True
    layer(torch.randn(5, 6)).pow(2).sum().backward()
    assert gate.grad is not None and 0 < gate.grad.abs().max() <= 1e-3  # the hook's clamp
    assert len(seen) == 1 and torch.equal(seen[0], gate.grad)
    armed[0] = True
    with pytest.raises(ValueError, match="own error on a real gradient"):
        layer(torch.randn(5, 6)).pow(2).sum().backward()


def test_a_hook_removed_during_the_backward_is_not_put_back() -> None:
    """A hook wrapped for the None its parameter is handed, whose handle is removed before the
    backward ends (here by the hook itself), stays removed: the put-back restores only a
    wrapper still in place."""
    layer, kernel = _toggled_layer()
    handles: list[torch.utils.hooks.RemovableHandle] = []
    calls: list[bool] = []

    def once(g: torch.Tensor | None) -> None:
        calls.append(g is None)
        handles[0].remove()

    handles.append(kernel.gate.register_hook(once))
    kept = kernel.gate.register_hook(lambda g: g)
    layer(torch.randn(5, 6)).pow(2).sum().backward()
    assert calls == [True]
    assert list(kernel.gate._backward_hooks) == [kept.id]
    assert all(not hasattr(h, "hook") for h in kernel.gate._backward_hooks.values())
