"""kasmina.save / load on hosts of unusual forms: a slot inside a block the model uses at two
paths, a model whose lazy modules are not yet initialised, slots attached one around the
other by two ``attach`` calls, and a model one of whose slots was detached."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import kasmina
from kasmina.control.auth import sign_command
from kasmina.control.builders import make_seed_command
from kasmina.manager.manager import KasminaKernelManager
from kasmina.persist.format import SavedModelError
from kasmina.seeds.inject import kasmina_layers
from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import StateColumn
from kasmina.urza.blueprints import ResidualMLP
from kasmina.urza.publish import publish_artifact
from kasmina.utils.keyring import Keyring, generate_key
from tests.manager.helpers import PUBLISHER, make_config, record_activations, run_command


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


def shared_block_model() -> nn.Sequential:
    """One block at two paths, as ALBERT shares its layers: its ``fc`` is ``0.fc`` and ``1.fc``."""
    torch.manual_seed(0)
    block = Block()
    return nn.Sequential(block, block, nn.Linear(4, 2))


def _slots(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, KasminaLayer)]


def test_a_slot_inside_a_shared_block_saves_and_loads_bitwise(tmp_path: Path) -> None:
    """``attach`` takes a slot inside a block used at two paths (every path calls it), and a
    manager grows a seed there; ``kasmina.load`` refused every such file ("architecture
    mismatch": the block's weights are under both paths in ``state_dict()``, and the check
    mapped only the first to the slot's)."""
    store = tmp_path / "urza"
    artifact = publish_artifact(ResidualMLP(2, 4), [torch.randn(3, 2)], str(store), "m", PUBLISHER)
    keyring = Keyring({"ctl": generate_key()})
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    model = shared_block_model()
    with KasminaKernelManager(make_config(tmp_path, store), keyring=keyring) as manager:
        manager.attach(model, ["fc"], 2, 2, host_lr=0.05, seed_lr=0.05)
        record_activations(model, x)
        command = make_seed_command("germinate", "0.fc[0]", artifact.artifact_id)
        assert run_command(manager, sign_command(command, keyring, "ctl").SerializeToString())
        for _ in range(2):
            manager.backward(F.cross_entropy(model(x), y))
            manager.step()
        assert manager.seed("0.fc[0]").kernel is not None
        path = kasmina.save(model, tmp_path / "shared.kasmina")
    model.eval()
    fresh = shared_block_model()
    layers = kasmina.load(path, fresh, publishers=PUBLISHER.trusted_publishers())
    assert [layer.seed(0).kernel is not None for layer in layers] == [True]
    assert fresh[0] is fresh[1] and isinstance(fresh[1].fc, KasminaLayer)
    fresh.eval()
    assert torch.equal(fresh(x), model(x))
    assert fresh.state_dict().keys() == model.state_dict().keys()


def lazy_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.LazyLinear(4))


def test_lazy_modules_not_yet_initialised_are_named_not_the_file(tmp_path: Path) -> None:
    """A lazy model not yet run: ``kasmina.load`` called the good file malformed (PyTorch's
    "can't access the shape of an uninitialized parameter" from its checks), and a manager's
    ``attach`` raised PyTorch's bare error. Both name the lazy modules and what to do."""
    model = lazy_model()
    kasmina.attach(model, ["2"], 2, 2)
    model(torch.randn(3, 6))
    path = kasmina.save(model, tmp_path / "lazy.kasmina")
    fresh = lazy_model()
    with pytest.raises(SavedModelError, match="uninitialised lazy modules .* run one forward"):
        kasmina.load(path, fresh, publishers=PUBLISHER.trusted_publishers())
    assert not _slots(fresh)
    fresh(torch.randn(3, 6))  # initialised: now it loads
    kasmina.load(path, fresh, publishers=PUBLISHER.trusted_publishers())
    assert _slots(fresh) == ["2"]
    keyring = Keyring({"ctl": generate_key()})
    with KasminaKernelManager(make_config(tmp_path, tmp_path / "urza"), keyring=keyring) as manager:
        with pytest.raises(ValueError, match="uninitialised lazy parameter: run one forward"):
            manager.attach(lazy_model(), ["0"], 2, 4)


def test_a_slot_around_an_earlier_slot_is_refused() -> None:
    """Two ``attach`` calls, the inner module first, then its parent: the second made a slot
    inside a slot (one call with both is refused as nested), and ``kasmina.detach`` and
    ``kasmina.merge`` then failed half-way with a bare ``AttributeError``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    )
    kasmina.attach(model, ["2.1"], 2, 2)
    with pytest.raises(ValueError, match="'2' holds the slot '2.1'"):
        kasmina.attach(model, ["2"], 2, 2)
    assert _slots(model) == ["2.1"]
    kasmina.detach(model)
    assert not _slots(model) and isinstance(model[2][1], nn.Linear)


class Wrapped(nn.Module):
    """One block at ``a`` and again inside ``wrap``: ``a.fc`` is also ``wrap.0.fc``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        block = Block()
        self.a, self.wrap, self.head = block, nn.Sequential(block), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.wrap(self.a(x)))


def test_nesting_through_a_block_at_two_paths_is_refused() -> None:
    """The nesting checks compared names, and a block the model also registers under a second
    parent hides one path: ``wrap`` holding the slot ``a.fc`` (as ``wrap.0.fc``) was accepted,
    in one call or two, and ``kasmina.save`` then wrote a file no load could read."""
    model = Wrapped()
    with pytest.raises(ValueError, match="'a.fc' is nested inside 'wrap'"):
        kasmina.attach(model, ["a.fc", "wrap"], 2, 2)
    assert not _slots(model)
    kasmina.attach(model, ["a.fc"], 2, 2)
    with pytest.raises(ValueError, match="'wrap' holds the slot 'a.fc'"):
        kasmina.attach(model, ["wrap"], 2, 2)
    assert _slots(model) == ["a.fc"]


def test_a_loaded_grown_model_handed_to_a_manager_is_told_how_to_go_on(tmp_path: Path) -> None:
    """``kasmina.load`` then ``manager.register``: refused with a bare "must be DORMANT without
    a kernel". The refusal names the seed's stage and the two ways to train such a model on.
    ``manager.attach`` of another layer registered the new slots only: the grown slot's kernel
    became host parameters, stepped by the host's optimizer, with no monitor, no fault limit
    and no command reaching its seed. Refused the same way, the model left as it was."""
    model = lazy_model()
    model(torch.randn(3, 6))
    (slot,) = kasmina.attach(model, ["2"], 2, 2)
    slot.seed(0).attach_kernel(nn.Linear(2, 2))
    keyring = Keyring({"ctl": generate_key()})
    with KasminaKernelManager(make_config(tmp_path, tmp_path / "urza"), keyring=keyring) as m:
        with pytest.raises(ValueError, match="is DORMANT with a kernel: .* resume its run .*merge"):
            m.register(model)
        with pytest.raises(ValueError, match=r"2\[0\] \(of a slot not taken over\) is DORMANT wi"):
            m.attach(model, ["0"], 2, 4)
        assert _slots(model) == ["2"]
    with KasminaKernelManager(make_config(tmp_path, tmp_path / "urza"), keyring=keyring) as m:
        with pytest.raises(ValueError, match="of a slot not taken over"):
            m.register(model, [kasmina.attach(model, ["0"], 2, 4)[0]])
    slot.requires_grad_(False)  # a frozen grown backbone is served as it is: no refusal
    with KasminaKernelManager(make_config(tmp_path, tmp_path / "urza"), keyring=keyring) as m:
        m.register(model, [s for s in kasmina_layers(model) if s is not slot])


def test_a_model_one_of_whose_slots_was_detached_saves_and_loads(tmp_path: Path) -> None:
    """``kasmina.detach(model, only=[slot])`` leaves that slot's rows in the shared table (§6a),
    and ``kasmina.save`` refused the model for good ("the shared state table has 4 rows but the
    slots use 2"). The rows the remaining slots use are saved, re-based from row 0, and load
    back bitwise."""

    def net() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)
        )

    model = net()
    first, kept = kasmina.attach(model, ["0", "2"], 2, 4)
    table = kept.state_table.state_tensor
    table[:, StateColumn.EPOCHS_IN_STATE] = torch.arange(4, dtype=torch.int32) + 7  # row marks
    table[:, StateColumn.GATE_SCORE] = torch.arange(4, dtype=torch.int32) * 100 + 5
    rows = table[2:].clone()
    kasmina.detach(model, only=[first])
    path = kasmina.save(model, tmp_path / "kept.kasmina")
    loaded = net()
    (slot,) = kasmina.load(path, loaded, publishers=PUBLISHER.trusted_publishers())
    assert slot.layer_id == "2" and [seed.state_index for seed in slot.seeds] == [0, 1]
    assert torch.equal(slot.state_table.state_tensor, rows)
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
