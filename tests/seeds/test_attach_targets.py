"""attach/detach by module name: targets (PEFT semantics), argument checks, and the refusals that
leave the model as it was (pruning or a reparametrization aimed at a slot, containers without a
forward, modules shared under two names, a scripted parent, layouts too large); seeds sharing one
state table across attaches; a slot standing in for its host (attributes, buffers, children,
modes)."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from torch import nn

import kasmina.seeds.forwarding
from kasmina.seeds.inject import attach, detach, kasmina_layers
from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import SeedStage, StateColumn
from tests.seeds.helpers import MLP, S, kernel, walk


def test_attach_keeps_outputs_and_detach_restores_the_originals() -> None:
    model = MLP()
    x = torch.randn(3, 5)
    before = model(x)
    originals = (model.encoder[0], model.head)
    keys = set(model.state_dict())
    slots = attach(model, ["encoder.0", "head"], seeds_per_layer=2, chunk_size=4)
    assert [s.layer_id for s in slots] == ["encoder.0", "head"]
    assert model.encoder[0] is slots[0] and slots[0].host is originals[0]
    assert torch.equal(model(x), before)
    table = slots[0].state_table
    assert table is slots[1].state_table and table.num_seeds == 4
    assert [s.state_index for s in slots[1].seeds] == [2, 3]
    assert table.state_tensor[:, StateColumn.REGION_ID].tolist() == [0, 0, 1, 1]
    assert kasmina_layers(model) == slots
    assert detach(model) == slots
    assert model.encoder[0] is originals[0] and model.head is originals[1]
    assert set(model.state_dict()) == keys and torch.equal(model(x), before)


def test_package_exports_the_entry_points() -> None:
    import kasmina
    import kasmina.seeds.inject

    assert kasmina.attach is attach and kasmina.detach is detach  # not shadowed by a module
    assert kasmina.KasminaLayer is KasminaLayer
    assert {"GPUStateTensor", "GradientIsolatedSeed"} <= set(dir(kasmina))


def test_targets_follow_peft_semantics_and_errors_leave_the_model_unchanged() -> None:
    model = MLP()
    # A string is a regex over full names (fullmatch): "encoder.[02]", not a suffix.
    assert [s.layer_id for s in attach(model, r"encoder\.[02]", 1, 8)] == ["encoder.0", "encoder.2"]
    detach(model)
    with pytest.raises(ValueError, match=r"no submodule.*\['2'\] selects by name or name suffix"):
        attach(model, "2", 2, 4)  # a regex must match a whole name
    # A whole name that is no regex of itself (a ModuleDict key with "+"): a list takes it.
    keyed = nn.ModuleDict({"a+b": nn.Linear(4, 4)})
    with pytest.raises(ValueError, match=r"\['a\+b'\] selects by name or name suffix"):
        attach(keyed, "a+b", 2, 2)
    # A pattern in a list is no pattern: the error says where one goes.
    with pytest.raises(ValueError, match="list holds module names .* pattern as one string"):
        attach(model, [r"encoder\.[02]"], 1, 8)
    # A list entry is a full name or a dotted suffix.
    assert [s.layer_id for s in attach(model, ["2"], 2, 4)] == ["encoder.2"]
    with pytest.raises(ValueError, match="already attached"):
        attach(model, ["encoder.2"], 2, 4)
    with pytest.raises(ValueError, match="already attached"):
        attach(model, r"encoder\.2", 2, 4)
    detach(model)
    snapshot = dict(model.named_modules())
    for targets, spl, chunk, message in [
        ("missing", 2, 4, "'missing' matches no submodule"),
        (["head", "encodr.2"], 2, 4, r"'encodr.2'.*closest: \['encoder.2'"),  # a typo in a list
        (["encoder", "encoder.0"], 2, 4, "nested"),
        ("head", 3, 4, "12 != 8"),
        ([], 2, 4, "at least one"),
        ("(", 2, 4, "regular expression"),
        ("head", -2, -4, "seeds_per_layer must be an int >= 1, got -2"),
        ("head", True, 4, "seeds_per_layer must be an int >= 1, got True"),
        ("head", 2, 0, "chunk_size must be an int >= 1, got 0"),
        ("head", 2.0, 4, "seeds_per_layer must be an int >= 1, got 2.0"),
        ("head", torch.tensor(True), 4, "seeds_per_layer must be an int >= 1, got tensor"),
        ("head", torch.tensor(2.0), 4, "seeds_per_layer must be an int >= 1, got tensor"),
        ("head", np.bool_(True), 4, "seeds_per_layer must be an int >= 1, got "),
    ]:
        with pytest.raises(ValueError, match=message):
            attach(model, targets, spl, chunk)
        assert dict(model.named_modules()) == snapshot
    with pytest.raises(TypeError, match="targets must be a pattern .* got bytes"):
        attach(model, b"head", 2, 4)  # iterable: its bytes read as names 104, 101...
    assert dict(model.named_modules()) == snapshot
    assert attach(model, "head", torch.tensor(2), np.int64(4))[0].num_seeds == 2  # integers


def test_seed_counts_may_be_integers_of_another_library() -> None:
    np = pytest.importorskip("numpy")
    slots = attach(MLP(), ["head"], np.int64(2), np.int32(4))
    assert (slots[0].num_seeds, slots[0].chunk_size) == (2, 4)
    assert type(slots[0].num_seeds) is int


def test_slot_reads_through_to_the_wrapped_module() -> None:
    model = MLP()
    head = model.head
    slot = attach(model, ["head"], 2, 4)[0]
    assert model.head.weight is head.weight and model.head.out_features == 8
    assert slot.in_features == 8 and slot.bias is head.bias
    with pytest.raises(AttributeError):
        _ = slot.no_such_attribute
    assert "weight" not in dict(slot.named_parameters(recurse=False))  # not re-registered


def test_a_parametrized_weight_assigned_through_the_slot_is_set_on_the_host() -> None:
    """A parametrized ``weight`` is a property of the host's class, not an entry of its
    ``_parameters``: assigned through the slot it was stored on the slot, which then read it
    back while the host kept its old weight (and ``functional_call`` left such a copy)."""
    model = MLP()
    torch.nn.utils.parametrizations.weight_norm(model.head)
    bare = copy.deepcopy(model)
    attach(model, ["head"], 2, 4)
    new = torch.randn(8, 8)
    model.head.weight = new
    bare.head.weight = new  # the parametrization's right_inverse, on both
    assert "weight" not in model.head.__dict__
    assert torch.equal(model.head.weight, bare.head.weight)
    assert torch.equal(model.head.host.weight, bare.head.weight)
    x = torch.randn(3, 5)
    assert torch.equal(model(x), bare(x))
    other = torch.randn(8, 8)
    got = torch.func.functional_call(model, {"head.weight": other}, (x,))
    assert torch.equal(got, torch.func.functional_call(bare, {"head.weight": other}, (x,)))
    assert "weight" not in model.head.__dict__ and torch.equal(model(x), bare(x))


def test_a_slot_on_a_container_is_not_one_so_a_parent_cannot_skip_its_seeds() -> None:
    class Iterating(nn.Module):  # a parent that runs its stage's children itself
        def __init__(self) -> None:
            super().__init__()
            self.stage = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.stage:
                x = block(x)
            return x

    model = Iterating()
    last = model.stage[-1]
    attach(model, ["stage"], 2, 4)
    with pytest.raises(TypeError, match="not iterable"):  # not a silent run without the seeds
        model(torch.randn(2, 4))
    for reach in (lambda: model.stage[-1], lambda: list(model.stage)):
        with pytest.raises(TypeError):
            reach()
    assert model.stage.host[-1] is last  # the children, through the host
    assert len(model.stage) == 3  # which runs none of them


def test_pruning_aimed_at_a_slot_is_refused_before_it_changes_anything() -> None:
    """``prune`` on the slot read the host's weight through it, registered it on the slot as
    ``weight_orig``, then failed with a bare ``KeyError``: the slot was left holding a second
    copy of the host's weight, a ``state_dict`` key no fresh slot has (strict loads failed)."""
    from torch.nn.utils import prune

    model = MLP()
    attach(model, "head", 2, 4)
    keys = list(model.state_dict())
    for name in ("weight", "bias"):
        with pytest.raises(ValueError, match="apply it to slot.host"):
            prune.l1_unstructured(model.head, name, 0.5)
    assert list(model.state_dict()) == keys and not model.head._forward_pre_hooks
    prune.l1_unstructured(model.head.host, "weight", 0.5)  # as the message says
    assert "head.host.weight_mask" in model.state_dict()


REPARAMETRIZATIONS = {
    "weight_norm": lambda m: nn.utils.weight_norm(m),
    "spectral_norm": lambda m: nn.utils.spectral_norm(m),
    "parametrizations.weight_norm": lambda m: nn.utils.parametrizations.weight_norm(m),
    "orthogonal": lambda m: nn.utils.parametrizations.orthogonal(m),
}


@pytest.mark.parametrize("how", list(REPARAMETRIZATIONS))
def test_a_reparametrization_aimed_at_a_slot_is_refused_as_pruning_is(how: str) -> None:
    """torch's hook-based ``weight_norm`` and ``spectral_norm`` on the slot took the weight out
    of the slot's ``_parameters`` and failed with a bare ``KeyError: 'weight'``; a
    parametrization claimed the slot "does not have" the ``weight`` that ``slot.weight``
    reads. Each is now the refusal pruning gets, the model unchanged."""
    reparametrize = REPARAMETRIZATIONS[how]
    model = MLP()
    (slot,) = attach(model, "head", 2, 4)
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="apply it to slot.host"):
        reparametrize(slot)
    assert list(model.state_dict()) == keys and not slot._forward_pre_hooks
    assert slot.weight is slot.host.weight and type(slot) is KasminaLayer
    reparametrize(slot.host)  # as the message says
    assert list(model.state_dict()) != keys


@pytest.mark.parametrize("how", ["parametrizations.weight_norm", "orthogonal"])
@pytest.mark.parametrize("held", ["bias", "weight"])
def test_a_parametrization_aimed_at_a_slot_is_refused_when_the_host_has_some_already(
    held: str, how: str
) -> None:
    """The refusal ran only while the host had no ``parametrizations``: with the host's bias
    parametrized, ``weight_norm(slot)`` got torch's "does not have a parameter, a buffer, or a
    parametrized element" for the ``weight`` that ``slot.weight`` reads, and with its weight
    parametrized the new parametrization was appended to the host's list through the slot. Each
    is refused as on a bare host, nothing changed; ordinary reads of ``slot.parametrizations``
    (``is_parametrized``, ``hasattr``) are the host's, as before."""
    from torch.nn.utils import parametrize

    reparametrize = REPARAMETRIZATIONS[how]
    model = MLP()
    (slot,) = attach(model, "head", 2, 4)
    assert not hasattr(slot, "parametrizations") and not parametrize.is_parametrized(slot)
    parametrize.register_parametrization(slot.host, held, nn.Identity())
    assert parametrize.is_parametrized(slot) and parametrize.is_parametrized(slot, held)
    assert slot.parametrizations is slot.host.parametrizations
    keys, lists = list(model.state_dict()), [len(p) for p in slot.host.parametrizations.values()]
    with pytest.raises(ValueError, match="apply it to slot.host"):
        reparametrize(slot)
    assert list(model.state_dict()) == keys and type(slot) is KasminaLayer
    assert [len(p) for p in slot.host.parametrizations.values()] == lists
    assert "parametrizations" not in slot._modules and not slot._forward_pre_hooks
    reparametrize(slot.host)  # as the message says
    assert parametrize.is_parametrized(slot.host, "weight")


def test_a_parametrization_not_recognised_on_the_slot_falls_to_torchs_own_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The refusal knows torch's ``register_parametrization`` by its code: where it cannot
    (torch changed), nothing is refused by Kasmina, and torch's own error leaves the slot as
    it was."""
    monkeypatch.setattr(kasmina.seeds.forwarding, "_REGISTER_PARAMETRIZATION", None)
    model = MLP()
    (slot,) = attach(model, "head", 2, 4)
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="does not have a parameter"):
        nn.utils.parametrizations.weight_norm(slot)
    assert list(model.state_dict()) == keys and type(slot) is KasminaLayer


def test_a_slot_deletes_the_hosts_attributes_where_it_writes_them() -> None:
    """A slot read and wrote its host's plain attributes but did not delete them: ``hasattr``
    said True and ``del slot.note`` raised AttributeError. A delete goes where a write goes."""
    model = MLP()
    model.head.note = "host's"
    (slot,) = attach(model, ["head"], 2, 4)
    assert slot.note == "host's"
    del slot.note
    assert not hasattr(slot, "note") and not hasattr(slot.host, "note")
    slot.mine = 1  # not the host's: the slot's own, written and deleted there
    assert "mine" in vars(slot) and not hasattr(slot.host, "mine")
    del slot.mine
    assert not hasattr(slot, "mine")
    with pytest.raises(AttributeError):
        del slot.note


def test_a_slot_replaces_and_deletes_its_hosts_children_by_name() -> None:
    """``slot.act = nn.Identity()`` (module-swapping code's ``setattr(parent, name, new)``)
    registered a child of the slot: ``slot.act`` read the new module while the host's forward
    kept calling the old one, and ``del slot.act`` raised AttributeError. Both are the host's
    now, and the next forward records the output again."""
    block = nn.Sequential()
    block.fc, block.act = nn.Linear(4, 4), nn.ReLU()
    model = nn.Sequential(block)
    (slot,) = attach(model, ["0"], 2, 2)
    x = torch.full((3, 4), -100.0)
    model(x)
    slot.act = nn.Identity()
    assert slot.act is block.act and "act" not in slot._modules
    assert slot.output_contract is None  # recorded again at the next call
    assert torch.equal(model(x), block.fc(x))
    del slot.act
    assert not hasattr(block, "act") and not hasattr(slot, "act")
    assert slot.output_contract is None  # a child removed: recorded again too
    with pytest.raises(AttributeError):
        del slot.act
    model(x)
    slot.register_module("fc", nn.Linear(4, 4))  # ``add_module``: replaced on the host too
    assert slot.fc is block.fc and "fc" not in slot._modules and slot.output_contract is None
    slot.act = nn.Tanh()  # deleted through the slot, assigned again: the host's (was the slot's)
    assert slot.act is block.act and "act" not in slot._modules
    assert torch.equal(model(x), torch.tanh(block.fc(x)))
    linear = nn.Sequential(nn.Linear(4, 4))
    (slot,) = attach(linear, ["0"], 2, 2)
    del slot.bias
    slot.register_parameter("bias", nn.Parameter(torch.zeros(4)))  # so is a parameter
    assert "bias" in slot.host._parameters and "bias" not in slot._parameters
    assert torch.equal(linear(x), x @ slot.host.weight.T)


class _Scaled(nn.Linear):
    scale = 1.0  # a class default, which whoever tunes the layer sets on the instance

    @property
    def half_scale(self) -> float:
        return self.scale / 2

    @half_scale.setter
    def half_scale(self, value: float) -> None:
        self.scale = 2 * value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


def test_a_slot_writes_what_its_host_reads_from_its_class_on_the_host() -> None:
    """An attribute the host reads from its class (a class default, a property) was assigned on
    the slot: ``slot.scale`` read the new value while the host's forward kept the class's."""
    model = nn.Sequential(_Scaled(4, 4))
    (slot,) = attach(model, ["0"], 2, 2)
    host, x = slot.host, torch.randn(3, 4)
    slot.scale = 0.0
    assert host.scale == 0.0 and "scale" not in vars(slot)
    assert torch.equal(model(x), torch.zeros(3, 4))
    slot.half_scale = 1.0  # the host's setter runs
    assert host.scale == 2.0 and slot.half_scale == 1.0 and "half_scale" not in vars(slot)
    del slot.scale  # the instance's value goes, the class default is read again
    assert slot.scale == 1.0 and "scale" not in vars(host)


def test_a_slot_registers_buffers_on_its_host_as_the_bare_module_does() -> None:
    """``register_buffer`` was the slot's own: a name the host holds raised KeyError (the read
    forwarding made it an existing attribute), and a new buffer was one the host's forward
    never saw and ``detach`` dropped."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    (slot,) = attach(model, ["1"], 2, 2)
    slot.register_buffer("running_mean", torch.full((4,), 7.0))
    slot.register_buffer("mask", torch.ones(4), persistent=False)
    assert torch.equal(slot.host.running_mean, torch.full((4,), 7.0))
    assert slot.mask is slot.host.mask and "mask" not in slot._buffers
    assert "1.host.running_mean" in model.state_dict() and "1.host.mask" not in model.state_dict()
    own = slot._finite_flags
    slot.register_buffer("_finite_flags", own.clone())  # the slot's own stays the slot's
    assert "_finite_flags" in slot._buffers and not hasattr(slot.host, "_finite_flags")
    detach(model)
    assert torch.equal(model[1].running_mean, torch.full((4,), 7.0)) and hasattr(model[1], "mask")


@pytest.mark.parametrize("embargo", [2**31, -1])
def test_attach_refuses_an_embargo_the_state_table_cannot_hold(embargo: int) -> None:
    model = MLP()
    with pytest.raises(ValueError, match="embargo_epochs .* is not an int in"):
        attach(model, ["head"], 2, 4, embargo_epochs=embargo)
    assert not kasmina_layers(model)


def test_attach_names_an_argument_of_the_wrong_type() -> None:
    """Each reached deep before: 'int' object is not iterable, 'dict' object has no attribute
    'enabled', 'Tensor' object has no attribute 'num_seeds', and for a model of None (as
    ``manager.attach`` passes it on) 'NoneType' object has no attribute 'named_modules'."""
    model = MLP()
    with pytest.raises(TypeError, match="attach wraps submodules of an nn.Module, got NoneType"):
        attach(None, ["head"], 2, 4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="targets must be a pattern .* got int"):
        attach(model, 0, 2, 4)  # type: ignore[arg-type]
    assert len(attach(copy.deepcopy(model), (n for n in ["head"]), 2, 4)) == 1  # any iterable
    with pytest.raises(TypeError, match=r"kd_config must be a KDConfig or None, got dict"):
        attach(model, ["head"], 2, 4, kd_config={"temperature": 2.0})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="state must be a GPUStateTensor or None, got Tensor"):
        attach(model, ["head"], 2, 4, state=torch.zeros(2, 10))  # type: ignore[arg-type]
    assert not kasmina_layers(model)


def test_a_second_attach_onto_a_shared_table_takes_the_rows_after_the_first() -> None:
    """Slots of two widths under one table (one manager): ``attach(..., state=table)`` twice.
    The second numbered its rows from 0 again, so its seeds shared rows with the first's: a
    GERMINATE of one moved the other, kernel-less, to ISOLATED_INIT. It now follows them, and
    a table too small for both says so."""
    from kasmina.seeds.table import GPUStateTensor

    model, table = MLP(), GPUStateTensor(6, torch.device("cpu"))
    first = attach(model, ["head"], 2, 4, state=table)
    second = attach(model, ["encoder.2"], 4, 2, state=table)
    rows = [s.state_index for layer in (*first, *second) for s in layer.seeds]
    assert rows == list(range(6))
    regions = table.state_tensor[:, StateColumn.REGION_ID].tolist()
    assert regions == [0, 0, 1, 1, 1, 1]
    second[0].seed(0).transition_to(SeedStage.ISOLATED_INIT)
    assert [s.stage for s in first[0].seeds] == [SeedStage.DORMANT] * 2
    with pytest.raises(ValueError, match="hold rows up to 6, and attach needs 2 more"):
        attach(model, ["encoder.0"], 2, 4, state=table)


def test_attach_on_a_shared_table_skips_the_rows_of_seeds_outside_the_model() -> None:
    """The rows of a shared table went by the model's slots alone, so ``attach(..., state=T)``
    after a ``detach`` (or onto another model) put its "DORMANT" seeds on rows still ACTIVE:
    an untrained kernel went live with no lifecycle, GERMINATE (-> ISOLATED_INIT) was illegal,
    and the detached seeds mirrored the new ones. A new seed now gets a row no seed follows
    and in DORMANT; a table with none left refuses, changing nothing."""
    from kasmina.seeds.table import GPUStateTensor

    model, table = MLP(), GPUStateTensor(6, torch.device("cpu"))
    (old,) = attach(model, ["head"], 2, 4, state=table)
    old.seed(0).attach_kernel(kernel(4, 1))
    walk(old.seed(0), S.ACTIVE)
    detach(model)
    (new,) = attach(model, ["head"], 2, 4, state=table)
    assert [s.state_index for s in new.seeds] == [2, 3]
    assert new.stages() == [S.DORMANT] * 2 and old.stages() == [S.ACTIVE, S.DORMANT]
    new.seed(0).attach_kernel(kernel(4, 2))
    new.seed(0).transition_to(S.ISOLATED_INIT)  # raised ACTIVE -> ISOLATED_INIT
    assert old.stages() == [S.ACTIVE, S.DORMANT]
    other = MLP()  # another model on the same table follows the first one's rows too
    (third,) = attach(other, ["encoder.2"], 2, 4, state=table)
    assert [s.state_index for s in third.seeds] == [4, 5] and third.stages() == [S.DORMANT] * 2
    assert table.state_tensor[:, StateColumn.REGION_ID].tolist() == [0, 0, 1, 1, 2, 2]
    before, modules = table.state_tensor.clone(), dict(model.named_modules())
    with pytest.raises(ValueError, match="hold rows up to 6, and attach needs 2 more"):
        attach(model, ["encoder.0"], 2, 4, state=table)
    assert torch.equal(table.state_tensor, before) and dict(model.named_modules()) == modules


def test_attach_on_a_shared_table_does_not_depend_on_when_cycles_are_collected() -> None:
    """A detached slot held only by a reference cycle (a closed manager's registry is one)
    kept following its DORMANT rows until the next collection: the same attach got other rows,
    or was refused for a full table, by the collector's timing. It collects first."""
    import gc

    from kasmina.seeds.table import GPUStateTensor

    model, table = MLP(), GPUStateTensor(2, torch.device("cpu"))
    attach(model, ["head"], 2, 4, state=table)
    old = detach(model)  # the slots it took out
    cycle: list = [old]
    cycle.append(cycle)
    del old, cycle
    gc.disable()  # no automatic pass between here and the scan
    try:
        (new,) = attach(model, ["head"], 2, 4, state=table)
    finally:
        gc.enable()
    assert [s.state_index for s in new.seeds] == [0, 1] and new.stages() == [S.DORMANT] * 2


def test_a_manager_refuses_two_seeds_on_one_state_row(tmp_path) -> None:
    """Slots built by hand onto one row range of a shared table: refused at registration."""
    from kasmina.manager.manager import KasminaKernelManager
    from kasmina.seeds.table import GPUStateTensor
    from kasmina.utils.keyring import Keyring, generate_key
    from tests.manager.helpers import make_config

    model, table = MLP(), GPUStateTensor(2, torch.device("cpu"))
    model.head = KasminaLayer(model.head, 2, 4, state=table, layer_id="head")
    model.encoder[2] = KasminaLayer(model.encoder[2], 2, 4, state=table, layer_id="encoder.2")
    manager = KasminaKernelManager(
        make_config(tmp_path, tmp_path / "urza"), keyring=Keyring({"ctl": generate_key()})
    )
    with pytest.raises(ValueError, match=r"or state row 0"):
        manager.register(model, host_lr=0.01)
    manager.close()


def test_out_proj_of_multihead_attention_is_refused_with_the_reason() -> None:
    model = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    with pytest.raises(ValueError, match="never calls out_proj"):
        attach(model, ["self_attn.out_proj"], 2, 4)


class _Stack(nn.Module):
    """A decoder's shape: ``layers`` iterated in ``forward``, ``heads`` indexed, ``scales`` read."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 8)})
        self.scales = nn.ParameterList([nn.Parameter(torch.ones(8))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.heads["a"](x) * self.scales[0]


def test_a_slot_on_a_sequential_takes_child_writes_len_and_in_as_its_host() -> None:
    """Python looks ``slot[i] = m``, ``del slot[i]``, ``len`` and ``in`` up on the type, never
    through ``__getattr__``: on a slot around an nn.Sequential each raised TypeError
    (torchvision's ``model.classifier[-1] = nn.Linear(...)``). They are the host's, its
    TypeError included, and a slot is as true as its host (reading or iterating the children
    still raises: the test above). A child replaced through the slot is recorded again at the
    next call: of another width, its seeds sit out, the contract check naming it, and the
    host's output stands whole."""
    model = MLP()
    slot, head = attach(model, ["encoder", "head"], 2, 4)
    host = slot.host
    assert len(slot) == 3 and host[1] in slot and model.head not in slot
    assert bool(slot) and bool(head)

    def assign(m: nn.Module) -> None:
        m[0] = nn.ReLU()

    def delete(m: nn.Module) -> None:
        del m[0]

    for op in (len, lambda m: 0 in m, assign, delete):
        with pytest.raises(TypeError) as bare:
            op(head.host)
        with pytest.raises(TypeError, match=re.escape(str(bare.value))):
            op(head)
    x = torch.randn(3, 5)
    model(x)
    slot.seed(0).attach_kernel(kernel(4, 1))
    walk(slot.seed(0), S.ACTIVE)
    assert not torch.equal(slot(x), host(x))
    slot[-1] = nn.Linear(8, 6)
    assert host[-1].out_features == 6
    assert torch.equal(slot(x), host(x)) and slot.sat_out["seeds"] == 1
    assert "6 features" in slot.contract_problem()
    slot[-1] = nn.Linear(8, 8)
    assert not torch.equal(slot(x), host(x)) and slot.contract_problem() is None
    del slot[1]  # the ReLU
    assert len(slot) == 2 and isinstance(host[1], nn.Linear)


@pytest.mark.parametrize("target", ["layers", "heads", "scales"])
def test_a_container_without_a_forward_is_refused_with_the_reason(target: str) -> None:
    """A ModuleList, ModuleDict or ParameterList matched as a target was wrapped, and the
    model's own forward then raised at its first call ("'KasminaLayer' object is not
    iterable"): its parent iterates or indexes it, and a seed there could never run."""
    model = _Stack()
    with pytest.raises(ValueError, match="has no forward") as refused:
        attach(model, [target], 2, 4)
    assert not isinstance(getattr(model, target), KasminaLayer)
    if target == "layers":
        assert r"layers\.\w+" in str(refused.value)
        assert len(attach(model, r"layers\.\w+", 2, 4)) == 2  # what the refusal suggests
    assert model(torch.randn(3, 8)).shape == (3, 8)


def test_a_module_shared_under_two_names_is_refused_naming_them() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = self.b = nn.Linear(4, 4)  # one module, two attributes

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    blocks = nn.Sequential(*[nn.Linear(4, 4)] * 3)  # ``[block] * 3``: "1" and "2" are "0"
    for model, target in ((Twice(), ["b"]), (Twice(), "a|b"), (blocks, ["2"])):
        before = [type(m) for _, m in model.named_modules(remove_duplicate=False)]
        with pytest.raises(ValueError, match="one module registered under several names"):
            attach(model, target, 2, 2)
        assert [type(m) for _, m in model.named_modules(remove_duplicate=False)] == before


def test_a_module_inside_a_shared_block_is_one_slot_on_every_path() -> None:
    block = _Block(4)
    model = nn.Sequential(block, block)  # the block's one ``fc`` attribute, called twice
    (slot,) = attach(model, ["1.fc"], 2, 2)
    assert slot.layer_id == "0.fc" and model[0].fc is slot and model[1].fc is slot
    with pytest.raises(ValueError, match="'1.fc' is already attached"):
        attach(model, ["1.fc"], 2, 2)


def test_a_slot_takes_its_hosts_mode_and_leaves_the_hosts_own_modes_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8))
    model.eval()
    slot = attach(model, "2", 2, 4)[0]
    assert [n for n, m in model.named_modules() if m.training] == []  # the slot is eval too
    # A block in mixed modes on purpose (a frozen batch norm inside a training block): the
    # slot follows the block's own flag, and nothing inside the block is flipped.
    for training in (True, False):
        block = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
        block.train(training)
        block[1].train(not training)
        model = nn.Sequential(nn.Linear(4, 8), block)
        slot = attach(model, "1", 2, 4)[0]
        assert slot.training is training and slot.seeds.training is training
        assert all(seed.training is training for seed in slot.seeds)
        assert (block.training, block[0].training, block[1].training) == (
            training,
            training,
            not training,
        )


def test_attach_under_a_meta_default_device_builds_real_seeds() -> None:
    """``torch.set_default_device("meta")`` (a user building the next model lazily) made the
    seeds' buffers data-less, and attach raised "Cannot copy out of meta tensor"."""
    model = MLP()
    with torch.device("meta"):
        (slot,) = attach(model, ["head"], 2, 4)
    assert all(b.device.type == "cpu" for b in slot.buffers())
    x = torch.ones(3, 5)
    assert torch.equal(model(x), slot.host(torch.relu(model.encoder(x))))


def test_a_slot_on_a_host_with_buffers_only_puts_its_seeds_on_their_device() -> None:
    """A host without parameters (a non-affine norm, a GELU) put the slot's seeds on the CPU
    whatever device the model was on: a kernel germinated there met activations elsewhere. Now
    the host's buffers' device, else the table's (``meta`` shows it without a GPU)."""
    slot = KasminaLayer(nn.BatchNorm1d(8, affine=False).to("meta"), 2, 4)
    assert {t.device.type for t in (*slot.seeds.buffers(), *slot.buffers())} == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_slot_on_a_host_without_parameters_follows_the_model_on_cuda() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)).cuda()
    (slot,) = attach(model, ["1"], 2, 4)
    assert {t.device.type for t in slot.buffers()} == {"cuda"} == {slot.state_table.device.type}


def test_detach_only_takes_slots_and_refuses_names() -> None:
    """``only`` is matched against the slots themselves: a name (what ``attach`` takes), or
    anything else, matched nothing, and the slot stayed with no word. It is refused now; one
    slot given alone is taken as one. A slot that is not in the model (a deep copy's originals,
    one detached already) is refused too, before any is detached."""
    model = MLP()
    encoder, head = attach(model, ["encoder.0", "head"], 2, 4)
    for only in (["head"], "head", [None], [model.head.host]):
        with pytest.raises(TypeError, match="only must hold the model's slots"):
            detach(model, only=only)  # type: ignore[arg-type]
        assert kasmina_layers(model) == [encoder, head]
    twin = copy.deepcopy(model)  # the slots attach returned are the original's, not the copy's
    with pytest.raises(ValueError, match=r"not in the model: \['head'\].*nothing was detached"):
        detach(twin, only=[twin.encoder[0], head])
    assert len(kasmina_layers(twin)) == 2
    assert detach(model, only=head) == [head] and kasmina_layers(model) == [encoder]
    with pytest.raises(ValueError, match="not in the model"):  # detached already
        detach(model, only=[head])
    assert detach(model, only=(s for s in [encoder])) == [encoder] and not kasmina_layers(model)
    model = MLP()
    slots = attach(model, ["encoder.0", "head"], 2, 4)
    assert detach(model, only=nn.ModuleList(slots)) == slots  # a module holding slots too


class _Block(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class _Refusing(_Block):
    """A parent whose ``__setattr__`` refuses a slot (as a scripted module's does)."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, KasminaLayer):
            raise RuntimeError("this parent takes no other module")
        super().__setattr__(name, value)


def test_a_failed_install_leaves_the_model_as_it_was() -> None:
    """Slots were put in place one by one: a target inside a scripted module (whose compiled
    forward cannot call a slot, and whose ``__setattr__`` refuses one) raised torch's
    ``RuntimeError`` after the targets before it were replaced, with no load checks on the
    model. A scripted parent is refused up front now, and any other parent that refuses a slot
    takes the slots put in place before it out again."""
    for block, error, match in (
        (torch.jit.script(_Block()), ValueError, "inside a scripted module .'sub'"),
        (_Refusing(), RuntimeError, "takes no other module"),
    ):
        model = MLP()
        model.sub = block
        before = [(name, type(m)) for name, m in model.named_modules()]
        keys = list(model.state_dict())
        with pytest.raises(error, match=match):
            attach(model, ["head", "sub.fc"], 2, 4)
        assert [(name, type(m)) for name, m in model.named_modules()] == before
        assert list(model.state_dict()) == keys and not model._load_state_dict_pre_hooks


def test_a_layout_the_host_declares_is_checked_before_the_table_is_allocated(
    monkeypatch,
) -> None:
    """``seeds_per_layer=2**25`` on an 8-wide Linear allocated a table of 2**25 rows (1.8 GiB)
    before the width check refused it, and 2**62 escaped as torch's own RuntimeError."""
    import kasmina.seeds.inject as inject

    def no_table(*args, **kwargs):
        raise AssertionError("a state table was allocated for a layout the host refuses")

    monkeypatch.setattr(inject, "GPUStateTensor", no_table)
    model = MLP()
    for seeds in (2**25, 2**62):
        with pytest.raises(ValueError, match="seeds x chunk 1 .* != 8 features of Linear"):
            attach(model, ["head"], seeds, 1)
    assert not kasmina_layers(model)


def test_a_table_past_int32_rows_is_a_value_error_on_a_host_declaring_no_width() -> None:
    """A block declares no width, so no layout check refuses 2**62 seeds before the table:
    its allocation escaped as torch's RuntimeError. The table refuses past int32 rows."""
    model = MLP()
    with pytest.raises(ValueError, match="num_seeds must be a positive int32"):
        attach(model, ["encoder"], 2**62, 1)
    assert not kasmina_layers(model)
