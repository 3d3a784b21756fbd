"""GERMINATE's dry run (docs/design.md §6a): correctly signed artifacts that cannot run on the
slot are refused at the command, and the host keeps training as if nothing was sent."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kasmina.control.auth import sign_command
from kasmina.control.builders import make_seed_command
from kasmina.manager.manager import KasminaKernelManager
from kasmina.urza.blueprints import ResidualMLP
from kasmina.urza.publish import publish_artifact
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import (
    PUBLISHER,
    SEED0,
    SEED1,
    Rig,
    S,
    host_params,
    make_config,
    record_activations,
    run_command,
)
from tests.urza.helpers import PairRows


class Infinite(nn.Module):
    """Well-formed, but its output is -inf wherever the input is not positive."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.relu(x))


class Doubling(nn.Module):
    """Runs on any input and is finite, but has no parameter to train."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0


class Normalised(nn.Module):
    """Batch norm in training mode: running a probe updates its running statistics."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.01 * self.norm(x)


@torch.library.custom_op("kasmina_tests::backward_breaks", mutates_args=())
def _backward_breaks(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_backward_breaks.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _broken_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("this kernel's backward is broken")


_backward_breaks.register_autograd(_broken_backward)


class BrokenBackward(nn.Module):
    """Runs forward on any input, finite; its backward always raises."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.ops.kasmina_tests.backward_breaks(self.lin(x))


class SparseLookup(nn.Module):
    """A residual plus a bias looked up by the features' signs in an embedding with sparse
    gradients, which most optimizers (Adam) cannot step."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.emb = nn.Embedding(2, 2, sparse=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * self.lin(x) + 0.1 * self.emb((x > 0).long()).sum(1)


class SpareInfinity(nn.Module):
    """Runs, finite (its spare parameter unused), but holds a non-finite parameter: G1's."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.spare = nn.Parameter(torch.full((2,), math.inf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(x)


def publish(module: nn.Module, example: torch.Tensor, store: Path, **kw) -> str:
    name = type(module).__name__.lower()
    return publish_artifact(module, [example], str(store), name, PUBLISHER, **kw).artifact_id


def assert_refused_and_host_trains(rig: Rig, artifact_id: str, reason: str) -> None:
    manager = rig.manager
    table = rig.slot.state_table.state_tensor.clone()
    assert not rig.send("germinate", SEED0, artifact_id)
    assert reason in manager.command_log[-1][3], manager.command_log[-1]
    assert torch.equal(rig.slot.state_table.state_tensor, table)  # the row, BLUEPRINT_ID too
    assert rig.stage(SEED0) == S.DORMANT and manager.seed(SEED0).kernel is None
    assert not manager.kernel_cache.is_pinned(artifact_id)
    assert manager.optimizers.seed_ids == []
    before = host_params(rig)
    assert rig.train(2)["host_stepped"]
    after = host_params(rig)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.isfinite(p).all() for p in after)


def test_a_kernel_exported_with_a_static_batch_is_refused(rig: Rig, store) -> None:
    artifact = publish(ResidualMLP(2, 4), torch.randn(3, 2), store, dynamic=False)
    rig.train(1)  # the slot records its activations: [16, 4], so the seed's chunk is [16, 2]
    assert_refused_and_host_trains(rig, artifact, "cannot run on seed out[0]: on an input (16, 2)")


def test_a_kernel_declared_bfloat16_on_a_float32_host_is_refused(rig: Rig, store) -> None:
    module = ResidualMLP(2, 4).to(torch.bfloat16)
    artifact = publish(module, torch.randn(3, 2, dtype=torch.bfloat16), store)
    rig.train(1)
    assert_refused_and_host_trains(rig, artifact, "dtype bfloat16 is not the host's torch.float32")


def test_a_non_finite_kernel_is_refused(rig: Rig, store) -> None:
    artifact = publish(Infinite(), torch.randn(3, 2), store)
    rig.train(1)
    assert_refused_and_host_trains(rig, artifact, "returned non-finite values")


def test_a_kernel_whose_backward_raises_is_refused(rig: Rig, store) -> None:
    """A kernel that could never train (its backward raises on every input) is refused at the
    command (the seed stays DORMANT, nothing attached or pinned), instead of being quarantined
    after three training steps (or, with ``guard_seed_backward`` off, raising from the host's
    own backward)."""
    artifact = publish(BrokenBackward(), torch.randn(3, 2), store)
    rig.train(1)
    assert_refused_and_host_trains(rig, artifact, "raised RuntimeError in its backward")


def test_a_refusal_after_the_kernel_is_attached_leaves_the_table_as_it_was(rig: Rig, store) -> None:
    """A kernel that passes the dry run but not G1 is refused after ``attach_kernel`` wrote the
    row's BLUEPRINT_ID: the undo puts it back."""
    rig.train(1)
    artifact = publish(SpareInfinity(), torch.randn(3, 2), store)
    assert_refused_and_host_trains(rig, artifact, "G1 refused")


def test_a_kernel_without_parameters_is_refused_with_the_reason(rig: Rig, store) -> None:
    """It passed the dry run and was refused by the optimizer's registration with "ValueError:
    an optimizer needs at least one parameter", which named no kernel nor seed."""
    rig.train(1)
    artifact = publish(Doubling(), torch.randn(3, 2), store)
    assert_refused_and_host_trains(rig, artifact, "it has no parameter: a seed trains its kernel")


def test_a_kernel_with_sparse_gradients_the_optimizer_cannot_step_is_refused(
    rig: Rig, store
) -> None:
    """The dry run ran its backward, never asked the seed's optimizer about the gradients: a
    sparse embedding's passed GERMINATE under Adam, then every step faulted ("Adam does not
    support sparse gradients") until the seed was quarantined, never trained."""
    rig.train(1)
    artifact = publish(SparseLookup(), torch.randn(3, 2), store)
    assert_refused_and_host_trains(
        rig, artifact, "emb.weight' a sparse gradient (nn.Embedding(sparse=True)), which the "
        "seed optimizer Adam cannot step (RuntimeError: Adam does not support sparse gradients"
    )  # fmt: skip


def test_a_kernel_with_sparse_gradients_trains_under_an_optimizer_that_takes_them(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    rig = Rig(make_config(tmp_path, store), keyring, optimizer_cls=torch.optim.SGD)
    rig.train(1)
    assert rig.send("germinate", SEED0, publish(SparseLookup(), torch.randn(3, 2), store))
    seed = rig.manager.seed(SEED0)
    before = {name: p.detach().clone() for name, p in seed.kernel.named_parameters()}
    for _ in range(3):
        assert SEED0 in rig.train(1)["seeds_stepped"]
    assert seed.faults == 0 and seed.stage == S.ISOLATED_INIT
    after = dict(seed.kernel.named_parameters())
    assert all(not torch.equal(after[name], value) for name, value in before.items())


def test_a_germinate_before_the_slots_first_forward_is_refused(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """Before its first forward a slot knows no activations to check a kernel against (the
    manifest's own shapes would check it against itself): refused, nothing changes; after one
    forward (without a graph, in eval mode, as any forward) the same artifact is taken."""
    rig = Rig(make_config(tmp_path, store), keyring, record=False)
    manager = rig.manager
    table = rig.slot.state_table.state_tensor.clone()
    assert not rig.send("germinate", SEED0, mlp)
    reason = manager.command_log[-1][3]
    assert "out[0]'s slot has recorded no forward since attach" in reason, reason
    assert "send GERMINATE after the first training step or forward" in reason
    assert torch.equal(rig.slot.state_table.state_tensor, table)
    assert rig.stage(SEED0) == S.DORMANT and manager.seed(SEED0).kernel is None
    assert not manager.kernel_cache.is_pinned(mlp)
    assert manager.optimizers.seed_ids == []
    record_activations(rig.model, rig.x)
    assert rig.send("germinate", SEED0, mlp)
    assert rig.stage(SEED0) == S.ISOLATED_INIT and manager.kernel_cache.is_pinned(mlp)
    assert manager.optimizers.seed_ids == [SEED0]


def test_a_kernel_of_another_rank_is_refused_with_both_ranks(rig: Rig, store) -> None:
    artifact = publish(ResidualMLP(2, 4), torch.randn(3, 5, 2), store)
    assert_refused_and_host_trains(
        rig, artifact, "artifact input rank 3, the slot's chunk rank 2 (16, 2)"
    )


class SequenceHost(nn.Module):
    """A host whose slot sees ``[B, T, F]`` activations."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.inp(x))).mean(dim=1)


def test_a_kernel_exported_on_2d_input_is_refused_on_3d_activations(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    flat = publish(ResidualMLP(2, 4), torch.randn(3, 2), store)
    per_token = publish(ResidualMLP(2, 4), torch.randn(3, 5, 2), store)
    manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    model = SequenceHost()
    manager.attach(model, "out", 2, 2, host_lr=0.05)
    x, y = torch.randn(8, 5, 6), torch.randint(0, 4, (8,))

    def train() -> None:
        manager.backward(F.cross_entropy(model(x), y))
        manager.step()

    def germinate(artifact_id: str) -> bytes:
        cmd = make_seed_command("germinate", SEED0, artifact_id)
        return sign_command(cmd, keyring, "ctl").SerializeToString()

    train()
    assert not run_command(manager, germinate(flat))
    assert "artifact input rank 2, the slot's chunk rank 3 (8, 5, 2)" in manager.command_log[-1][3]
    assert manager.seed(SEED0).stage == S.DORMANT
    train()
    # A kernel exported on [B, T, F] with both dynamic runs on both probes (B = 8 and 4).
    assert run_command(manager, germinate(per_token))
    assert manager.seed(SEED0).stage == S.ISOLATED_INIT
    train()


def test_the_probe_leaves_buffers_and_the_global_rng_alone(rig: Rig, store) -> None:
    artifact = publish(Normalised(2).train(), torch.randn(4, 2), store)
    rig.train(1)
    rng = torch.random.get_rng_state()
    assert rig.send("germinate", SEED0, artifact)
    assert torch.equal(rng, torch.random.get_rng_state())
    original = rig.manager.loader.cached(artifact)
    kernel = rig.manager.seed(SEED0).kernel
    assert original is not None and kernel is not None
    pairs = list(zip(original.buffers(), kernel.buffers(), strict=True))
    assert pairs and all(torch.equal(a, b) for a, b in pairs)


@pytest.mark.parametrize("batch, probes", [(16, (16, 8)), (3, (3, 4)), (1, (1, 2))])
def test_two_batch_sizes_are_probed(
    tmp_path: Path, store: Path, keyring: Keyring, batch: int, probes: tuple[int, int]
) -> None:
    rig = Rig(make_config(tmp_path, store), keyring, record=False)
    rig.model(torch.randn(batch, 6))
    registry = rig.manager.require_registry()
    samples = registry.dry_run_samples(registry[SEED0])
    assert [tuple(s.shape) for s in samples] == [(probes[0], 2), (probes[1], 2)]


def test_g3_probes_leave_the_kernels_buffers_alone(rig: Rig, store) -> None:
    # G3's probe is a measurement like the dry run: a train-mode batch norm's statistics stay
    # as training left them, whether G3 probes at ADVANCE (no forward since the check began)
    # or in a COMPATIBILITY_CHECK forward (here a validation one).
    artifact = publish(Normalised(2).train(), torch.randn(4, 2), store)
    rig.train(1)
    assert rig.send("germinate", SEED0, artifact) and rig.send("germinate", SEED1, artifact)
    rig.train(2)
    rig.manager.end_epoch(0)
    kernels = [rig.manager.seed(seed_id).kernel for seed_id in (SEED0, SEED1)]
    assert all(k is not None for k in kernels)
    trained = [[b.clone() for b in k.buffers()] for k in kernels]

    def kept(n: int) -> bool:
        return all(torch.equal(a, b) for a, b in zip(trained[n], kernels[n].buffers(), strict=True))

    assert rig.send("advance", SEED0) and rig.send("advance", SEED1)
    assert rig.send("advance", SEED1) and rig.stage(SEED1) == S.GRAFTING
    assert kept(1)
    with torch.no_grad():
        rig.model.eval()(torch.randn(8, 6))
    rig.model.train()
    assert rig.manager.seed(SEED0).probe_result is not None and kept(0)


def test_a_call_of_a_rank_the_exported_kernels_do_not_take_sits_out_without_a_fault(
    rig: Rig, mlp
) -> None:
    """The dry run checks the recorded rank; an exported kernel takes that rank only. A later
    call of another rank (an unbatched request, a ``[1, B, F]`` batch: both fine for the
    ``nn.Linear`` host) made the kernel raise, one fault a call, three to QUARANTINE for an
    ACTIVE or healthy GRAFTING seed. Such calls sit out: the host's output, no fault."""
    assert rig.send("germinate", SEED0, mlp) and rig.send("germinate", SEED1, mlp)
    rig.train(1)
    model, slot = rig.model.eval(), rig.slot
    with torch.no_grad():
        for x in (rig.x[0], rig.x.unsqueeze(0), rig.x[:3].unsqueeze(1)) * 2:
            assert torch.equal(model(x), slot.host(torch.relu(model.inp(x))))
        model(rig.x)  # the recorded rank: the seeds run
    assert slot.sat_out == {"seeds": 6}
    assert [rig.manager.seed(s).faults for s in (SEED0, SEED1)] == [0, 0]
    assert rig.stage(SEED0) is S.ISOLATED_INIT


def test_a_call_the_kernels_program_refuses_sits_out_without_a_fault(rig: Rig, store) -> None:
    """The dry run passes on the recorded batches (16 and 8 rows); a later call of an odd
    number of rows (a decode step's one token) failed the program's input checks, a fault a
    call, and a healthy seed was quarantined by its third. It sits out instead, and an
    evaluation leaves the batch out of the seed's measurement as for a signed size it lacks."""
    artifact = publish(PairRows(), torch.randn(4, 2), store)
    assert rig.send("germinate", SEED0, artifact)
    rig.train(1)
    model, slot, seed = rig.model.eval(), rig.slot, rig.manager.seed(SEED0)
    with torch.no_grad():
        for x in (rig.x[:5], rig.x[:1], rig.x[:3], rig.x[:7]):
            assert torch.equal(model(x), slot.host(torch.relu(model.inp(x))))
    assert seed.faults == 0 and rig.stage(SEED0) is S.ISOLATED_INIT
    evaluations = rig.manager.evaluate_seeds(
        [(rig.x[:5], rig.y[:5]), (rig.x, rig.y)], loss_fn=F.cross_entropy
    )
    assert evaluations[SEED0].samples == 16 and evaluations[SEED0].faults == 0
    model.train()
    assert rig.train(2)["host_stepped"] and seed.faults == 0
    assert rig.stage(SEED0) is S.ISOLATED_INIT


def test_a_kernel_whose_program_refuses_the_recorded_batch_is_refused(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """The dry run calls the kernel directly: a recorded shape its program refuses (an odd
    batch) refuses GERMINATE, saying so; it is no sit-out there."""
    rig = Rig(make_config(tmp_path, store), keyring, record=False)
    record_activations(rig.model, rig.x[:5])
    artifact = publish(PairRows(), torch.randn(4, 2), store)
    assert_refused_and_host_trains(
        rig, artifact, "on an input (5, 2)/torch.float32 it raised KernelInputRefused: its "
        "exported program's input checks refuse [5, 2]: Guard failed"
    )  # fmt: skip
