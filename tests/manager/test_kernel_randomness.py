"""A kernel that draws random numbers, before ACTIVE (docs/design.md §3, "Two side channels").

It runs on a forked RNG state, so the host's stream is untouched (tests/manager/
test_isolation_hazards.py), and on a stream of its own there: beside a host that draws nothing
(the global stream stands still), it still draws a fresh dropout mask at every step, and an
activation-checkpointing recompute draws the mask its forward drew."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn import functional as F

import tests.manager.helpers as helpers
from kasmina.control.builders import make_rollback_command
from kasmina.seeds.side_effects import own_stream
from kasmina.utils.keyring import Keyring
from kasmina.utils.modules import rng_forked
from tests.manager.helpers import SEED0, SEED1, Rig, S, make_config
from tests.manager.test_dry_run import publish
from tests.manager.test_isolation_hazards import Dropping


def _masks(rig: Rig, seed_id: str = SEED0) -> torch.Tensor:
    """Where the seed's kernel dropped its input in one training forward (no step)."""
    kernel = rig.manager.seed(seed_id).kernel
    assert kernel is not None
    seen: list[torch.Tensor] = []
    handle = kernel.register_forward_hook(lambda m, args, out: seen.append(out.detach() == 0))
    try:
        rig.model(rig.x)
    finally:
        handle.remove()
    [mask] = seen
    return mask


def test_two_seeds_with_the_same_random_kernel_draw_masks_of_their_own(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """Two seeds of one slot germinated from the same dropout artifact, beside a host that
    draws nothing: each draws from a stream of its own, so their masks differ."""
    rig = Rig(make_config(tmp_path, store), keyring)
    artifact = publish(Dropping().train(), torch.randn(3, 2), store)
    rig.train(1)
    assert rig.send("germinate", SEED0, artifact) and rig.send("germinate", SEED1, artifact)
    torch.manual_seed(5)
    first = _masks(rig, SEED0)
    torch.manual_seed(5)
    second = _masks(rig, SEED1)
    assert first.any() and second.any() and not torch.equal(first, second)


@pytest.mark.parametrize("options", [{}, {"fused": True}], ids=["plain", "fused"])
def test_a_random_kernel_draws_a_fresh_mask_at_every_step(
    tmp_path: Path, store: Path, keyring: Keyring, options: dict
) -> None:
    # A fused optimizer steps the kernel's parameters without moving their version counters:
    # the stream's position is the seed's ``draw_step``, which the manager moves at each step.
    rig = Rig(make_config(tmp_path, store), keyring, **options)
    artifact = publish(Dropping().train(), torch.randn(3, 2), store)
    rig.train(1)
    assert rig.send("germinate", SEED0, artifact) and rig.stage(SEED0) == S.ISOLATED_INIT
    masks = []
    for _ in range(4):
        torch.manual_seed(5)  # the host draws nothing: the global stream stands still
        masks.append(_masks(rig))
        rig.train(1)
    assert all(m.any() and not m.all() for m in masks)
    assert len({tuple(m.flatten().tolist()) for m in masks}) == len(masks)
    # Within a step the parameters stand still, and so does the kernel's stream.
    torch.manual_seed(5)
    first = _masks(rig)
    torch.manual_seed(5)
    assert torch.equal(first, _masks(rig))


@pytest.mark.parametrize("restore", ["rollback", "no-op load"])
def test_a_random_kernel_goes_on_bit_for_bit_after_its_state_is_restored(
    tmp_path: Path, store: Path, keyring: Keyring, restore: str
) -> None:
    """The kernel's stream was keyed on its parameters' version counters, which no checkpoint
    saves and every load moves: after a ROLLBACK (or ``load_state_dict`` of the model's own
    state), equal in every saved bit, the masks differed and the runs diverged in steps."""
    artifact = publish(Dropping().train(), torch.randn(3, 2), store)
    rigs = [Rig(make_config(tmp_path / name, store), keyring) for name in ("a", "b")]

    def train(rig: Rig, steps: int) -> None:
        for _ in range(steps):
            torch.manual_seed(123)  # the same global stream on both sides
            rig.train(1)

    for rig in rigs:
        rig.train(1)
        assert rig.send("germinate", SEED0, artifact)
        train(rig, 2)
        rig.manager.end_epoch(0)
    a, b = rigs
    if restore == "rollback":
        train(a, 2)  # a timeline the rollback abandons
        assert run_rollback(a, 0)
    else:
        a.model.load_state_dict(a.model.state_dict())
    train(a, 3)
    train(b, 3)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_a_seed_no_manager_owns_keys_its_stream_on_its_versions(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """A managed seed's position, loaded into a copy nobody manages (``kasmina.load``, a
    deep copy), would never move again: one dropout mask at every step of the copy."""
    import copy

    rig = Rig(make_config(tmp_path, store), keyring)
    rig.train(1)
    assert rig.send("germinate", SEED0, publish(Dropping().train(), torch.randn(3, 2), store))
    rig.train(3)
    seed = rig.manager.seed(SEED0)
    assert seed.draw_step == 3  # moved by each managed step
    model = copy.deepcopy(rig.model)
    (clone,) = [m for m in model.modules() if getattr(m, "seed_id", None) == SEED0]
    clone.set_extra_state(seed.get_extra_state())
    assert clone.draw_step is None and seed.draw_step == 3
    seed.set_extra_state(seed.get_extra_state())  # the manager's own seed keeps it
    assert seed.draw_step == 3


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_managed_model_draws_anew_at_each_of_its_own_steps(
    tmp_path: Path, store: Path, keyring: Keyring, how: str
) -> None:
    """A deep copy or a whole-model pickle of a managed model kept the manager's position
    (``draw_step``), which nothing moves in the copy: trained on its own beside a host that
    draws nothing, its kernel drew one dropout mask at every step. The copy starts where the
    original stands (its first forward draws the original's mask) and its own updates move
    it on; the original's position is its manager's still."""
    import copy
    import io

    rig = Rig(make_config(tmp_path, store), keyring)
    rig.train(1)
    assert rig.send("germinate", SEED0, publish(Dropping().train(), torch.randn(3, 2), store))
    rig.train(3)
    if how == "deepcopy":
        model = copy.deepcopy(rig.model)
    else:
        buffer = io.BytesIO()
        torch.save(rig.model, buffer)
        buffer.seek(0)
        model = torch.load(buffer, weights_only=False)
    (clone,) = [m for m in model.modules() if getattr(m, "seed_id", None) == SEED0]
    assert clone.draw_step is None and rig.manager.seed(SEED0).draw_step == 3
    assert torch.equal(_masks_of(clone.kernel, model, rig.x), _masks(rig))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    masks = []
    for _ in range(3):
        optimizer.zero_grad()
        masks.append(_masks_of(clone.kernel, model, rig.x, train=True))
        optimizer.step()
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    rig.manager.close()


def test_a_copy_registered_with_a_manager_draws_at_its_managers_position(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """A copy of a model no seed of which was ever grown (a run started from another's
    copy), registered with a manager of its own: its seeds' stream follows that manager's
    position from GERMINATE on (a first version of the copy rule kept it on the version
    counters, so a ROLLBACK there would not draw again what the run drew)."""
    import copy

    from kasmina.control.builders import make_seed_command
    from kasmina.manager.manager import KasminaKernelManager
    from kasmina.seeds.inject import kasmina_layers
    from tests.manager.helpers import run_command, sign_command

    rig = Rig(make_config(tmp_path / "a", store), keyring)
    rig.train(1)
    model = copy.deepcopy(rig.model)
    manager = KasminaKernelManager(make_config(tmp_path / "b", store), keyring=keyring)
    manager.register(model, kasmina_layers(model), host_lr=0.05, seed_lr=0.05)
    artifact = publish(Dropping().train(), torch.randn(3, 2), store)
    raw = sign_command(make_seed_command("germinate", SEED0, artifact), keyring, "ctl")
    assert run_command(manager, raw.SerializeToString())
    seed = manager.seed(SEED0)
    assert seed.draw_step == 0
    first = _masks_of(seed.kernel, model, rig.x)
    assert torch.equal(_masks_of(seed.kernel, model, rig.x), first)  # no step: no move
    seed.draw_step = 100
    assert not torch.equal(_masks_of(seed.kernel, model, rig.x), first)
    manager.close()
    rig.manager.close()


def _masks_of(kernel: nn.Module, model: nn.Module, x: torch.Tensor, train: bool = False):
    """Where ``kernel`` dropped its input in one training forward of ``model`` (with its
    backward when ``train``)."""
    seen: list[torch.Tensor] = []
    handle = kernel.register_forward_hook(lambda m, args, out: seen.append(out.detach() == 0))
    try:
        out = model(x)
        if train:
            out.sum().backward()
    finally:
        handle.remove()
    return seen[0]


def test_a_loaded_copy_draws_what_the_saved_seed_drew_until_it_is_trained(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """``kasmina.load`` restores the model bitwise, eval outputs included: a copy nobody
    manages keyed its stream on its version counters, which the load moved, so a kernel that
    draws in eval mode (exported with train-mode dropout) drew other masks than the saved
    model. The copy starts at the saved position, and its own updates move it on."""
    import copy

    rig = Rig(make_config(tmp_path, store), keyring)
    rig.train(1)
    assert rig.send("germinate", SEED0, publish(Dropping().train(), torch.randn(3, 2), store))
    rig.train(3)
    seed = rig.manager.seed(SEED0)
    model = copy.deepcopy(rig.model)
    (clone,) = [m for m in model.modules() if getattr(m, "seed_id", None) == SEED0]
    clone.set_extra_state(seed.get_extra_state())
    with torch.no_grad():
        for p in clone.kernel.parameters():  # a load copies the weights after the state
            p.add_(0.0)

    def mask(of: nn.Module, run) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        handle = of.register_forward_hook(lambda m, args, out: seen.append(out.detach() == 0))
        try:
            torch.manual_seed(9)
            run()
        finally:
            handle.remove()
        return seen[0]

    with torch.no_grad():
        want = mask(seed.kernel, lambda: rig.model(rig.x))
        assert torch.equal(mask(clone.kernel, lambda: model(rig.x)), want)
    optimizer = torch.optim.SGD(clone.kernel.parameters(), lr=0.0)
    masks = []
    for _ in range(3):  # trained without a manager: a fresh mask at every step
        masks.append(mask(clone.kernel, lambda: model(rig.x).sum().backward()))
        optimizer.step()
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    # Saved again (the loaded model's ``kasmina.save``, its own ``state_dict`` loaded back), it
    # draws on as it did: the save kept no position for a seed without a manager (None), and
    # the next load keyed the stream on version counters again.
    with torch.no_grad():
        want = mask(clone.kernel, lambda: model(rig.x))
        again = copy.deepcopy(rig.model)
        (copied,) = [m for m in again.modules() if getattr(m, "seed_id", None) == SEED0]
        for target in (clone, copied):
            target.set_extra_state(clone.get_extra_state())
            target.kernel.load_state_dict(clone.kernel.state_dict())
        assert torch.equal(mask(copied.kernel, lambda: again(rig.x)), want)
        assert torch.equal(mask(clone.kernel, lambda: model(rig.x)), want)


def run_rollback(rig: Rig, epoch: int) -> bool:
    command = make_rollback_command(epoch)
    return helpers.run_command(rig.manager, rig.signed(command))


class CheckpointedHost(helpers.Host):
    """The rig's host with the slot under non-reentrant activation checkpointing."""

    checkpointed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        if self.checkpointed:
            return torch.utils.checkpoint.checkpoint(self.out, h, use_reentrant=False)
        return self.out(h)


def test_a_recompute_draws_the_mask_its_forward_drew(
    tmp_path: Path, store: Path, keyring: Keyring, monkeypatch
) -> None:
    monkeypatch.setattr(helpers, "Host", CheckpointedHost)
    rig = Rig(make_config(tmp_path, store), keyring)
    artifact = publish(Dropping().train(), torch.randn(3, 2), store)
    rig.train(1)
    assert rig.send("germinate", SEED0, artifact) and rig.stage(SEED0) == S.ISOLATED_INIT
    kernel = rig.manager.seed(SEED0).kernel
    assert kernel is not None
    params = list(kernel.parameters())
    grads = {}
    for checkpointed in (True, False):
        rig.model.checkpointed = checkpointed
        torch.manual_seed(11)
        loss = F.cross_entropy(rig.model(rig.x), rig.y)
        grads[checkpointed] = torch.autograd.grad(loss, params)
    assert any(g.abs().sum() > 0 for g in grads[False])
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False], strict=True))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_own_stream_draws_anew_when_the_parameters_move_and_forks_nothing_out(
    device: str,
) -> None:
    dev = torch.device(device)
    kernel = nn.Linear(2, 2).to(dev)
    cpu, gpu = torch.random.get_rng_state(), dev.type == "cuda" and torch.cuda.get_rng_state(dev)

    def draw(position: int | None = None, seed_id: str = "fc[0]") -> torch.Tensor:
        with rng_forked(dev):
            own_stream(kernel, dev, seed_id, position)
            return torch.rand(8, device=dev)

    first = draw()
    assert torch.equal(first, draw())  # the parameters stood still
    with torch.no_grad():
        kernel.weight.mul_(1.0)  # an optimizer step moves the version (a seed no manager steps)
    assert not torch.equal(first, draw())
    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))
    assert not torch.equal(draw(3), draw(3, "fc[1]"))  # each seed a stream of its own
    with torch.no_grad():
        kernel.weight.mul_(1.0)  # a position given: the versions (a load moves them) are not read
    assert torch.equal(draw(3), draw(3))
    assert torch.equal(cpu, torch.random.get_rng_state())
    if dev.type == "cuda":
        assert torch.equal(gpu, torch.cuda.get_rng_state(dev))


def test_a_seed_no_one_managed_draws_on_after_its_own_state_is_loaded_back(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """A seed no manager ever stepped keys its kernel's stream on the kernel's version
    counters, which a load moves: its saved state kept no position, so its own ``state_dict``
    loaded back drew other dropout masks. It saves the position its versions make."""
    from kasmina.seeds.layer import KasminaLayer
    from tests.seeds.helpers import walk

    rig = Rig(make_config(tmp_path, store), keyring)
    artifact = publish(Dropping().train(), torch.randn(3, 2), store)
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(6, 4), 2, 2)
    seed = layer.seed(0)
    seed.attach_kernel(rig.manager.loader.copy(rig.manager.loader.original(artifact)))
    walk(seed, S.ISOLATED_INIT)
    x = torch.randn(5, 6)

    def mask() -> torch.Tensor:
        seen: list[torch.Tensor] = []
        handle = seed.kernel.register_forward_hook(lambda m, a, out: seen.append(out == 0))
        try:
            with torch.no_grad():
                torch.manual_seed(9)
                layer(x)
        finally:
            handle.remove()
        return seen[0]

    want = mask()
    layer.load_state_dict(layer.state_dict())  # the weights copied in: their versions move
    assert torch.equal(mask(), want)
    rig.manager.close()
