"""Kernels that would reach the host through a side channel before ACTIVE (docs/design.md §3):
one that writes into its input in place (a seed's input is the host's activation) is refused at
GERMINATE, as is one that writes into a non-persistent buffer (state no save or rollback could
restore); one that draws random numbers leaves the host's RNG stream as it was, so a host with
its own dropout trains exactly as beside a DORMANT seed, and GERMINATE's dry run and the G3
probes never move the global stream."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tests.manager.helpers as helpers
from kasmina.control.auth import sign_command
from kasmina.control.builders import make_seed_command
from kasmina.kd.config import KDConfig
from kasmina.manager.manager import KasminaKernelManager
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import SEED0, SEED1, Rig, S, host_params, make_config
from tests.manager.test_dry_run import assert_refused_and_host_trains, publish
from tests.manager.test_host_optimizer import walk_to_active


class AddsInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.add_(1.0)
        return x * self.w


class ReluInPlace(AddsInPlace):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(x) * self.w


class WritesIntoAView(AddsInPlace):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x[:, 0].mul_(2.0)
        return x * self.w


class WritesUnderNoGrad(AddsInPlace):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x.mul_(2.0)
        return x * self.w


class Dropping(nn.Module):
    """Dropout exported in train mode: draws from the global generator on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x * self.w)


class DroppingHost(helpers.Host):
    """The rig's host with its own dropout (the stream a seed must not shift)."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(super().forward(x))


@pytest.mark.parametrize("module", [AddsInPlace, ReluInPlace, WritesIntoAView, WritesUnderNoGrad])
def test_a_kernel_that_mutates_its_input_is_refused(rig: Rig, store, module) -> None:
    artifact = publish(module().train(), torch.randn(3, 2), store)
    rig.train(1)
    assert_refused_and_host_trains(
        rig, artifact, "mutates its input in place; a seed's input is the host's activation"
    )


class CountsUnsaved(nn.Module):
    """A step counter in a non-persistent buffer the output depends on: ``state_dict`` does not
    save it, so neither ``kasmina.save`` nor a rollback could restore the kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.register_buffer("step", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.step.add_(1)
        return x * self.w * torch.tanh(self.step / 10)


def test_a_kernel_that_writes_into_a_non_persistent_buffer_is_refused(rig: Rig, store) -> None:
    artifact = publish(CountsUnsaved(), torch.randn(3, 2), store)
    rig.train(1)
    assert_refused_and_host_trains(
        rig, artifact, "writes in place into a non-persistent buffer, which state_dict does not"
    )


class AddsThroughTypeAs(AddsInPlace):
    """``type_as`` of the same dtype returns its input itself, and its schema declares no
    alias: the program's ops hide the write, the dry run's version counters do not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.type_as(self.w).add_(1.0)
        return x * self.w


class AddsThroughBroadcast(AddsInPlace):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.broadcast_tensors(x)[0].mul_(2.0)
        return x * self.w


class CountsThroughTypeAs(CountsUnsaved):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.step.type_as(x).add_(1)
        return x * self.w * torch.tanh(self.step / 10)


class ScalesItself(AddsInPlace):
    """A forward that rescales its own weight: every measurement (the dry run, G3's probe,
    ``evaluate_seeds``) would change the seed's weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.w.mul_(1.5)
        return x * self.w


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (AddsThroughTypeAs, "wrote in place into its input (a seed's input is the host's"),
        (AddsThroughBroadcast, "wrote in place into its input (a seed's input is the host's"),
        (CountsThroughTypeAs, "wrote in place into a non-persistent buffer, which state_dict"),
        (ScalesItself, "wrote in place into its own parameters (a measurement would change"),
    ],
)
def test_writes_an_ops_schema_hides_are_refused_by_the_dry_run(
    rig: Rig, store, module, reason: str
) -> None:
    """An op that returns its input without declaring an alias hides a write from the
    program's check at load (``seed_hazard``); GERMINATE's dry run compares the version
    counters of the probe, the kernel's parameters and its non-persistent buffers, which every
    in-place op bumps. Accepted, the first wrote into the host's activation: an eval forward
    differed from a DORMANT seed's and every training forward raised in the host's backward,
    with no fault charged."""
    kernel = module()
    artifact = publish(kernel, torch.randn(3, 2), store)
    rig.train(1)
    assert_refused_and_host_trains(rig, artifact, reason)


def test_the_same_kernel_writing_into_its_own_tensor_is_taken(rig: Rig, store) -> None:
    class AddsToACopy(AddsInPlace):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x * self.w
            y.add_(1.0)
            return torch.relu_(y)

    artifact = publish(AddsToACopy(), torch.randn(3, 2), store)
    rig.train(1)
    assert rig.send("germinate", SEED0, artifact)


def _forward_backward(rig: Rig) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The host's output and its parameters' gradients of one forward and backward."""
    host = rig.manager.require_registry().host_params
    out = rig.model(rig.x)
    grads = torch.autograd.grad(F.cross_entropy(out, rig.y), host, allow_unused=True)
    return out.detach(), list(grads)


def test_a_random_kernel_leaves_the_hosts_random_ops_as_beside_a_dormant_seed(
    tmp_path: Path, store: Path, keyring: Keyring, monkeypatch
) -> None:
    monkeypatch.setattr(helpers, "Host", DroppingHost)
    artifact = publish(Dropping().train(), torch.randn(3, 2), store)
    grown = Rig(make_config(tmp_path / "a", store), keyring)
    twin = Rig(make_config(tmp_path / "b", store), keyring)
    rng = torch.random.get_rng_state()
    assert grown.send("germinate", SEED0, artifact)
    assert torch.equal(rng, torch.random.get_rng_state())  # the dry run drew privately
    assert grown.stage(SEED0) == S.ISOLATED_INIT and twin.stage(SEED0) == S.DORMANT
    for _ in range(2):
        torch.manual_seed(123)
        out, grads = _forward_backward(grown)
        torch.manual_seed(123)
        want, want_grads = _forward_backward(twin)
        assert torch.equal(out, want)
        assert all(torch.equal(a, b) for a, b in zip(grads, want_grads, strict=True))
        for rig in (grown, twin):
            torch.manual_seed(7)
            rig.train(3)
        assert all(
            torch.equal(a, b) for a, b in zip(host_params(grown), host_params(twin), strict=True)
        )
    assert grown.manager.seed(SEED0).faults == 0


def test_the_compatibility_probes_leave_the_global_rng_alone(rig: Rig, store) -> None:
    artifact = publish(Dropping().train(), torch.randn(3, 2), store)
    rig.train(1)
    assert rig.send("germinate", SEED0, artifact)
    rig.train(2)
    rig.manager.end_epoch(0)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.COMPATIBILITY_CHECK
    seed = rig.manager.seed(SEED0)
    rig.model.eval()
    rng = torch.random.get_rng_state()
    with torch.no_grad():
        rig.model(rig.x)  # the COMPATIBILITY_CHECK forward probes the kernel
    assert seed.probe_result is not None
    assert torch.equal(rng, torch.random.get_rng_state())
    seed.probe_result = None  # G3 probes a sample of its own, and counts the kernel's FLOPs
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.GRAFTING
    assert torch.equal(rng, torch.random.get_rng_state())


def test_a_rollback_brings_back_the_isolation_count_it_saved(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """The breaker counts a seed's violations towards QUARANTINE; a rollback to an epoch
    restores the count the seed had then (not the count reached since, nor zero), so the
    breaker trips after the same number of further violations as it would have then."""
    from kasmina.control.builders import make_rollback_command

    rig = Rig(make_config(tmp_path, store, max_isolation_violations=10), keyring)
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)

    def leak() -> None:  # the kernel's output reaches a host parameter: one violation a step
        kernel, weight = manager.seed(SEED0).kernel, rig.model.inp.weight
        forward = kernel.forward
        kernel.forward = lambda x: forward(x) + 0.0 * weight.sum()

    leak()
    assert not rig.train(1)["isolation_clean"]
    manager.end_epoch(0)  # the checkpoint holds 1 violation
    rig.train(2)
    record = manager.require_registry()[SEED0]
    assert record.monitor.violation_count == 3 == manager.seed(SEED0).isolation_violations
    assert helpers.run_command(manager, rig.signed(make_rollback_command(0)))
    record = manager.require_registry()[SEED0]
    assert record.monitor.violation_count == 1 == manager.seed(SEED0).isolation_violations


def test_a_leaking_step_leaves_a_trainers_own_host_optimizer_no_gradient(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """Under ``attach(host_lr=None)`` the trainer steps the host itself, after ``step()``: a
    step found not clean drops the host's gradients there, so that optimizer steps nothing on
    what leaked; a clean step leaves them for it."""
    rig = Rig(make_config(tmp_path, store, max_isolation_violations=10), keyring, host_lr=None)
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    host = manager.require_registry().host_params
    assert rig.train(1)["isolation_clean"]
    assert all(p.grad is not None for p in host)  # the trainer's to step
    kernel, weight = manager.seed(SEED0).kernel, rig.model.inp.weight
    forward = kernel.forward
    kernel.forward = lambda x: forward(x) + 0.0 * weight.sum()  # reaches a host parameter
    assert not rig.train(1)["isolation_clean"]
    assert all(p.grad is None for p in host)
    manager.close()


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "graph"])
def test_a_kernel_run_outside_the_slot_is_a_leak_only_with_a_graph(
    rig: Rig, mlp, grad: bool
) -> None:
    """A look at what an isolated seed makes of a live activation, under ``no_grad``, builds no
    graph and reaches nothing: it was charged as an isolation violation all the same (the
    input's ``requires_grad`` was read whatever the grad mode), cost the host its step, and
    three looks quarantined a healthy seed. With a graph it is the leak it was."""
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    seed = rig.manager.seed(SEED0)
    chunk = torch.relu(rig.model.inp(rig.x))[:, :2]  # carries the host's graph
    with torch.set_grad_enabled(grad):
        seed.kernel(chunk)
    report = rig.train(1)
    assert report["host_stepped"] is not grad
    assert seed.isolation_violations == int(grad) and rig.stage(SEED0) == S.ISOLATED_INIT


class TwoTasks(nn.Module):
    """A main task through ``out`` and an auxiliary head ``aux`` that only some batches run."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out, self.aux = nn.Linear(6, 4), nn.Linear(4, 4), nn.Linear(6, 4)
        self.both = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.out(torch.relu(self.inp(x)))
        return main + self.aux(x) if self.both else main


def test_a_kd_leak_is_charged_to_the_seeds_that_distilled(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """A host gradient from the seed-only KD backward was charged to every seed that could
    distil, not to those whose KD losses were in it: a seed whose slot never ran that step was
    quarantined with the one that leaked."""
    config = make_config(tmp_path, store, kd_enabled=True, kd=KDConfig(temperature=2.0))
    manager = KasminaKernelManager(config, keyring=keyring)
    model = TwoTasks()
    manager.attach(model, ["aux", "out"], 2, 2, host_lr=0.05, seed_lr=0.05)
    gen = torch.Generator().manual_seed(5)
    x, y, teacher = torch.randn(8, 6, generator=gen), torch.randint(0, 4, (8,)), torch.randn(8, 4)
    helpers.record_activations(model, x)
    for seed_id in ("aux[0]", "out[0]"):
        command = make_seed_command("germinate", seed_id, mlp, {})
        assert helpers.run_command(manager, sign_command(command, keyring, "ctl"))
    # out[0]'s kernel holds a host parameter: its KD gradient reaches the host.
    manager.seed("out[0]").kernel.inner.fc1.bias = model.out.host.bias
    model.both = False  # the auxiliary task sits this phase out: aux[0] distils nothing
    for _ in range(3):
        manager.set_teacher_logits(teacher)
        out = model(x)
        manager.backward(F.cross_entropy(out, y), kd_loss=manager.collect_kd_losses())
        manager.step()
    assert manager.seed("out[0]").stage == S.QUARANTINE
    assert manager.seed("aux[0]").stage == S.ISOLATED_INIT
    assert manager.seed("aux[0]").isolation_violations == 0
    manager.close()


def test_a_seed_promoted_later_is_host_side_for_seeds_germinated_before(rig: Rig, mlp: str):
    """A monitor took its host side at GERMINATE: a seed promoted to ACTIVE afterwards was not
    in it, so an isolated seed sending gradient into that (now host) seed's parameters passed
    every graph walk, and the host optimizer stepped them on it."""
    assert rig.send("germinate", SEED0, mlp) and rig.send("germinate", SEED1, mlp)
    walk_to_active(rig, rig.train, 0)
    active = rig.manager.seed(SEED0).kernel.inner.fc1.bias  # the host's now
    rig.manager.seed(SEED1).kernel.inner.fc1.bias = active  # out[1] reads it
    rig.train(3)
    assert rig.stage(SEED1) == S.QUARANTINE and rig.stage(SEED0) == S.ACTIVE
    assert rig.manager.seed(SEED1).isolation_violations == 3
