"""An epoch checkpoint is copied from the live tensors straight to the CPU: no clone of the
weights or of the optimizers' states on the model's device first (a second copy there, which
ran a model using half a GPU out of memory at ``end_epoch``), and never aliasing them (a CPU
model's snapshot is a copy that later training cannot change); a rollback's backups of the live
state likewise."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from kasmina.control.builders import make_rollback_command
from kasmina.manager.manager import KasminaKernelManager
from kasmina.manager.rollback import snapshot
from kasmina.utils.state_io import clone_state
from tests.manager.helpers import SEED0, Rig, assert_same, make_config, run_command


def _live_tensors(manager: KasminaKernelManager, model: nn.Module) -> dict[int, torch.Tensor]:
    """The weights and every optimizer state tensor, by storage address (not a seed's extra
    state: a tensor its ``state_dict`` encodes anew at each call)."""
    tensors = [t for k, t in model.state_dict().items() if not k.endswith("_extra_state")]
    for entry in manager.optimizers.state_dict()["optimizers"].values():
        for per_param in entry["state"]["state"].values():
            tensors += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
    return {t.data_ptr(): t for t in tensors if isinstance(t, torch.Tensor) and t.numel()}


class _Copies(TorchFunctionMode):
    """Records, for each live tensor copied, where the copy was sent: a clone to the tensor's
    own device (on a GPU, a second copy there), ``to`` to the device it names (its own when it
    names none). On a CPU model both land on the CPU: what tells them apart is whether the
    copy names the CPU, as one that leaves a GPU tensor for the CPU must."""

    def __init__(self, live: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.live, self.targets = live, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if source is not None and source.data_ptr() in self.live:
            target = None
            if func is torch.Tensor.clone:
                target = "its own device"
            elif func is torch.Tensor.to:
                to = {k: v for k, v in kwargs.items() if k != "copy"}
                device = torch._C._nn._parse_to(*args[1:], **to)[0]
                target = "its own device" if device is None else device.type
            if target is not None:
                self.targets.setdefault(source.data_ptr(), []).append(target)
        return func(*args, **kwargs)


def _trained_rig(rig: Rig, mlp: str) -> Rig:
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)  # Adam's moments for the host and the seed
    return rig


def test_end_epoch_copies_weights_and_optimizer_states_straight_to_the_cpu(rig: Rig, mlp) -> None:
    _trained_rig(rig, mlp)
    live = _live_tensors(rig.manager, rig.model)
    assert len(live) > len(rig.model.state_dict())  # optimizer states are there
    with _Copies(live) as copies:
        rig.manager.end_epoch(0)
    assert rig.manager.checkpoints.epochs() == [0]
    # Every live tensor went into the checkpoint by one copy, and that copy was to the CPU
    # (on a GPU a clone, or a ``to`` its own device, is the second copy there).
    assert set(copies.targets) == set(live)
    assert all(targets == ["cpu"] for targets in copies.targets.values()), copies.targets


def test_a_cpu_models_snapshot_is_a_copy_later_training_leaves_alone(rig: Rig, mlp) -> None:
    _trained_rig(rig, mlp)
    taken = snapshot(rig.manager.state, 0)
    at_capture = clone_state(taken)
    live = _live_tensors(rig.manager, rig.model)
    saved = list(taken["modules"]["model"].values())
    for entry in taken["optimizers"]["optimizers"].values():
        for per_param in entry["state"]["state"].values():
            saved += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
    assert not {t.data_ptr() for t in saved if t.numel()} & set(live)  # no storage shared
    rig.train(2)
    with torch.no_grad():
        for tensor in live.values():
            tensor.add_(1) if tensor.is_floating_point() else tensor.fill_(7)
    assert_same(at_capture, taken)


def test_a_rollback_backs_the_live_state_up_on_the_cpu(rig: Rig, mlp) -> None:
    """A rollback's backups (the undo of its writes) are copies of the live weights: on the
    model's device they were up to two more copies of the model there."""
    _trained_rig(rig, mlp)
    rig.manager.end_epoch(0)
    rig.train(1)
    live = _live_tensors(rig.manager, rig.model)
    with _Copies(live) as copies:
        assert run_command(rig.manager, rig.signed(make_rollback_command(0)))
    assert copies.targets  # the backups copied the weights
    assert all(set(targets) == {"cpu"} for targets in copies.targets.values()), copies.targets


class _Wide(nn.Module):
    """A host whose weights are megabytes, so the allocator's rounding is noise beside them."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 1024)
        self.mid = nn.Linear(1024, 1024)
        self.out = nn.Linear(1024, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(torch.relu(self.inp(x)))))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_end_epoch_allocates_less_than_the_model_and_its_optimizers_on_cuda(
    tmp_path, store, keyring
) -> None:
    manager = KasminaKernelManager(make_config(tmp_path, store, device="cuda"), keyring=keyring)
    model = _Wide().cuda()
    manager.attach(model, "out", 2, 2)
    x, y = torch.randn(16, 6, device="cuda"), torch.randint(0, 4, (16,), device="cuda")
    for _ in range(2):  # Adam's moments: twice the weights again
        manager.backward(F.cross_entropy(model(x), y))
        manager.step()
    held = sum(t.numel() * t.element_size() for t in _live_tensors(manager, model).values())
    assert held > 8 * 2**20
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    manager.end_epoch(0)
    torch.cuda.synchronize()
    assert manager.checkpoints.epochs() == [0]
    # A clone on the device first held all of ``held`` again; one tensor's staging at most.
    assert torch.cuda.max_memory_allocated() - baseline < held // 2


def test_a_buffer_on_meta_is_kept_there_by_the_checkpoint_and_the_rollback(rig: Rig, mlp) -> None:
    """A buffer on ``meta`` (no data) that the model took after it was registered: ``end_epoch``
    and a rollback went through while the snapshot cloned (a clone of a meta tensor stays on
    ``meta``), and raised "Cannot copy out of meta tensor" once the copies went to the CPU.
    It is kept on ``meta`` as it is; every other tensor still goes to the CPU."""
    _trained_rig(rig, mlp)
    rig.model.inp.register_buffer("unfilled", torch.empty(3, device="meta"))
    taken = snapshot(rig.manager.state, 0)
    model = taken["modules"]["model"]
    assert model["inp.unfilled"].is_meta and model["inp.weight"].device.type == "cpu"
    rig.manager.end_epoch(0)
    assert rig.manager.checkpoints.epochs() == [0]
    at_epoch = clone_state(rig.model.inp.weight)
    rig.train(2)
    assert not torch.equal(rig.model.inp.weight, at_epoch)
    assert run_command(rig.manager, rig.signed(make_rollback_command(0)))
    assert torch.equal(rig.model.inp.weight, at_epoch) and rig.model.inp.unfilled.is_meta


def test_a_rollback_over_a_meta_buffer_filled_since_is_refused_before_it_writes(
    rig: Rig, mlp
) -> None:
    """A buffer on ``meta`` when the checkpoint was taken and filled since: the checkpoint holds
    no data for it, and the rollback failed in its write phase (undone there, but found late).
    It is refused with the checks, naming the buffer, and nothing changes."""
    _trained_rig(rig, mlp)
    rig.model.inp.register_buffer("unfilled", torch.empty(3, device="meta"))
    rig.manager.end_epoch(0)
    rig.model.inp.unfilled = torch.full((3,), 7.0)
    rig.train(2)
    before = clone_state(rig.model.state_dict())
    assert rig.manager.handle_adaptation_command(rig.signed(make_rollback_command(0)))
    (outcome,) = rig.manager.apply_pending(wait=True)
    assert not outcome.ok and "inp.unfilled holds no data" in outcome.reason, outcome
    after = rig.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
