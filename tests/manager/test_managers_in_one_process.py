"""Several managers in one process: one manager per model in both directions, a shared Urza
client, where each manager's events go, and models another manager holds."""

from __future__ import annotations

import collections
import gc
import itertools
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import kasmina
from kasmina.control.auth import sign_command
from kasmina.control.builders import make_rollback_command, make_seed_command
from kasmina.errors import ParameterOverlapError
from kasmina.kd.holds import is_teacher_parameter
from kasmina.kd.teacher import CheckpointedTeacher
from kasmina.manager.manager import KasminaKernelManager
from kasmina.seeds.layer import KasminaLayer
from kasmina.urza.client import UrzaLibraryClient
from kasmina.utils.keyring import Keyring
from kasmina.utils.telemetry import MemorySink, TelemetryReporter
from tests.manager.helpers import (
    SEED0,
    SEED1,
    Host,
    Rig,
    S,
    assert_same,
    make_config,
    record_activations,
    run_command,
    snapshot_state,
    to_stabilization,
)


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Host(), Host()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def _manager(tmp_path: Path, store: Path, keyring: Keyring, name: str, **kw):
    return KasminaKernelManager(make_config(tmp_path / name, store), keyring=keyring, **kw)


def test_a_second_manager_inside_or_around_a_managed_model_is_refused(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """Manager 1 on ``model``, manager 2 on ``model.b``: both host optimizers held b's
    parameters, and once manager 2 germinated, every step of manager 1 raised ("parameters it
    did not hold"). Only the other order was refused. A model sharing a module with a managed
    one is the same case."""
    model = Outer()
    first = _manager(tmp_path, store, keyring, "one")
    first.attach(model, "a.out", 2, 2)
    second = _manager(tmp_path, store, keyring, "two")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="another manager steps.*one manager per model"):
        second.attach(model.b, "out", 2, 2)
    assert [n for n, _ in model.named_parameters()] == list(before)  # nothing attached
    shared = nn.Sequential(model.b.inp)  # another model holding one of model's layers
    with pytest.raises(ValueError, match="another manager steps"):
        second.attach(shared, "0", 2, 4)
    first.close()  # released: the submodule may now be managed on its own
    second.attach(model.b, "out", 2, 2)
    second.close()


def test_a_refused_attach_never_wraps_a_layer_of_another_managers_model(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """``attach`` wrapped its targets first and ``register`` refused after, taking the slots off
    again: meanwhile the other manager's model held a slot it never registered (a trainer
    thread's ``state_dict``, its checkpoints', had ``inp.host.weight``), and on its own slot the
    refusal said "already attached ... detach it first", which would take that manager's slot
    away. Refused now before any layer is wrapped."""
    model = Outer()
    model.b.requires_grad_(False)  # a frozen part: no host parameter of the first's in it
    first = _manager(tmp_path, store, keyring, "one")
    first.attach(model, "a.out", 2, 2)
    second = _manager(tmp_path, store, keyring, "two")
    wrapped: list[str] = []

    def registered(module: nn.Module, name: str, submodule: nn.Module) -> None:
        if isinstance(submodule, KasminaLayer):
            wrapped.append(name)

    handle = nn.modules.module.register_module_module_registration_hook(registered)
    try:
        for target, name, chunk in ((model, "a.inp", 4), (model, "a.out", 2), (model.b, "out", 2)):
            with pytest.raises(ValueError, match="another manager") as refused:
                second.attach(target, name, 2, chunk)
            assert "detach it first" not in str(refused.value)
    finally:
        handle.remove()
    assert wrapped == []
    second.attach(Host(), "out", 2, 2)  # refused without a trace: a model of its own is taken
    first.close()
    second.close()


def test_slots_inside_another_managers_frozen_part_are_refused(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """Even where no trainable parameter is shared (the other's part is frozen), a slot put
    inside another manager's model would grow parameters there that it steps nothing of."""
    model = Outer()
    for p in model.b.parameters():
        p.requires_grad_(False)
    first = _manager(tmp_path, store, keyring, "one")
    first.attach(model, "a.out", 2, 2)
    slots = kasmina.attach(model.b, "out", 2, 2)
    with pytest.raises(ValueError, match="lie inside a model another manager steps"):
        _manager(tmp_path, store, keyring, "two").register(model.b, slots)
    first.close()


def test_a_model_over_another_managers_host_memory_is_refused(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """``nn.Parameter(host.weight.data)`` is a new parameter over the host's bytes: a model
    holding one passed the check of parameter objects, and manager 2's ``step()`` moved manager
    1's host weights in place. Refused by memory as §4 refuses it inside one manager: a whole
    weight, a part of one, one frozen here (its manager would still restore it from its own
    checkpoints); nothing attached, and fine once manager 1 closed."""
    host = Host()
    first = _manager(tmp_path, store, keyring, "one")
    first.attach(host, "out", 2, 2, host_lr=0.1)
    second = _manager(tmp_path, store, keyring, "two")
    for name, alias, trains in (
        ("weight", host.inp.weight.data, True),
        ("bias", host.out.weight.data[1], True),  # a row of the slot's host weight
        ("weight", host.inp.weight.data, False),
    ):
        model = Host()
        setattr(model.inp, name, nn.Parameter(alias, requires_grad=trains))
        names = [n for n, _ in model.named_parameters()]
        with pytest.raises(ValueError, match="share memory with a host another manager steps"):
            second.attach(model, "out", 2, 2, host_lr=0.1)
        assert [n for n, _ in model.named_parameters()] == names  # nothing attached
    first.close()  # released: the memory may now be stepped by another manager
    second.attach(model, "out", 2, 2, host_lr=0.1)
    second.close()


@pytest.mark.parametrize("case", ["unfrozen since", "frozen alias first"])
def test_memory_another_manager_trains_is_refused_whenever_and_whichever_came_first(
    tmp_path: Path, store: Path, keyring: Keyring, case: str
) -> None:
    """The check read the other manager's host as registered: a layer it unfroze since (gradual
    unfreezing) was free for a second model over its bytes, whose manager then moved it; and a
    model holding a frozen alias, registered first, let the trainable original register after
    it, the pair refused the other way round."""
    original = Host()
    alias = Host()
    alias.inp.weight = nn.Parameter(original.inp.weight.data, requires_grad=False)
    first, second = (original, alias) if case == "unfrozen since" else (alias, original)
    if case == "unfrozen since":
        original.inp.requires_grad_(False)
    one, two = _manager(tmp_path, store, keyring, "one"), _manager(tmp_path, store, keyring, "two")
    one.attach(first, "out", 2, 2, host_lr=0.1)
    if case == "unfrozen since":
        original.inp.requires_grad_(True)  # taken up by the host optimizer (gradual unfreezing)
        one.optimizers.optimizer("host").add_param_group({"params": [*original.inp.parameters()]})
        one.backward(
            nn.functional.cross_entropy(original(torch.randn(8, 6)), torch.zeros(8).long())
        )
        one.step()
    with pytest.raises(ValueError, match="share memory with a host another manager steps"):
        two.attach(second, "out", 2, 2, host_lr=0.1)
    one.close()
    two.close()


def test_models_beside_another_manager_may_tie_or_share_what_it_does_not_step(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """Only another live manager's host memory is refused: a model tied within itself (a
    ``.data`` tie) registers beside it and steps, and so does one over a part another manager's
    model holds frozen (its host steps none of it), as one sharing that frozen layer does."""
    host = Host()
    host.inp.requires_grad_(False)
    first = _manager(tmp_path, store, keyring, "one")
    first.attach(host, "out", 2, 2, host_lr=0.1)
    tied = Host()
    tied.inp.bias = nn.Parameter(tied.out.weight.data[0])  # a .data tie within the model
    shared = Host()
    shared.inp = host.inp  # the other's frozen layer, as an object
    over = Host()
    over.inp.weight = nn.Parameter(host.inp.weight.data, requires_grad=False)  # and by memory
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    for index, model in enumerate((tied, shared, over)):
        second = _manager(tmp_path, store, keyring, f"two{index}")
        second.attach(model, "out", 2, 2, host_lr=0.1)
        second.backward(nn.functional.cross_entropy(model(x), y))
        second.step()
        second.close()
    first.close()


def test_slots_not_in_the_model_registered_are_refused(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    model = Host()
    slots = kasmina.attach(model, "out", 2, 2)
    twin = Host()
    manager = _manager(tmp_path, store, keyring, "m")
    with pytest.raises(ValueError, match=r"slot\(s\) \['out'\] are not modules of the model"):
        manager.register(twin, slots)
    manager.register(model, slots)  # the refusal left the manager as it was
    manager.close()


def test_a_refused_registration_leaves_no_owner_behind(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """The seeds checked before the one that refused the registration stayed observed by the
    refused registry for as long as the exception lived (a REPL keeps the last one), and the
    next registration was told another manager managed them."""
    model = Outer()
    slot_a, slot_b = kasmina.attach(model, ["a.out", "b.out"], 2, 2)
    slot_b.seed(1).transition_to(S.ISOLATED_INIT)  # a seed something else moved on
    manager = _manager(tmp_path, store, keyring, "m")
    with pytest.raises(ValueError, match="is ISOLATED_INIT: a manager takes over only") as kept:
        manager.register(model)
    seeds = [*slot_a.seeds, *slot_b.seeds]
    assert not any(slot_a.state_table.owned(s.state_index) for s in seeds)
    assert kept.value is not None  # the exception (and its frames) still alive
    manager.register(model, [slot_a])
    manager.close()


def test_a_dropped_manager_lets_go_of_its_model(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """Rebinding ``manager = KasminaKernelManager(...)`` (a notebook cell run again) drops the
    old one without ``close``; it lived on in reference cycles, and the new registration was
    told to close a manager nobody could reach any more. A seed it germinated must not keep it
    alive either (the model holds the seed's monitor)."""
    gc.disable()  # the cycle stays until something collects it
    try:
        rig = Rig(make_config(tmp_path / "old", store), keyring)
        assert rig.send("germinate", SEED0, mlp)
        rig.train(1)
        model = rig.model
        del rig
        manager = _manager(tmp_path, store, keyring, "new")
        with pytest.raises(ValueError, match="ISOLATED_INIT with a kernel: a manager takes over"):
            manager.register(model)  # its own refusal: not "managed by another manager"
        assert not any(model.out.state_table.owned(k) for k in range(2))
        model = Host()  # a fresh model's dropped manager, which never germinated
        _manager(tmp_path, store, keyring, "other").attach(model, "out", 2, 2)
        manager.register(model)
        manager.close()
    finally:
        gc.enable()


def test_a_registry_kept_after_its_manager_was_collected_claims_nothing(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """A notebook cell ending in ``manager.register(model)`` keeps the registry in ``Out``/``_``
    (as does a ``registry = ...`` variable, or kept ``manager.optimizers``, whose closures hold
    it). Run again, the old manager was collected, yet its kept registry still claimed the model
    ("close the other first", with nothing left to close) and, through its listener, held the
    manager's state, its run's checkpoint lock with it. The claim is the manager's now: the
    kept registry claims nothing, holds no lock, and refuses changes."""
    config = make_config(tmp_path, store, run_id="nb", checkpoint_mode="disk")
    manager = KasminaKernelManager(config, keyring=keyring)
    model = Host()
    kasmina.attach(model, "out", 2, 2)
    out = {1: manager.register(model)}  # a notebook's output history
    optimizers = manager.optimizers
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    manager.backward(F.cross_entropy(model(x), y))
    manager.step()
    manager.end_epoch(0)  # the run's store is open: its lock held
    dead = weakref.ref(manager)
    del manager  # the cell run again: nothing closed it
    gc.collect()
    assert dead() is None
    assert not any(model.out.state_table.owned(k) for k in range(2))
    again = KasminaKernelManager(config, keyring=keyring)  # the same run resumed in-process
    again.register(model)  # the kept registry's model
    again.close()
    with pytest.raises(RuntimeError, match="garbage-collected without close"):
        out[1].end_step()
    out[1].close()  # its kernel hooks off the model: allowed
    assert optimizers is not None


def test_closing_one_manager_leaves_a_shared_urza_client_open(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """A client passed in is the caller's: closing run A closed it, and every later GERMINATE
    of run B, which shared it, failed ("UrzaLibraryClient ... is closed")."""
    client = UrzaLibraryClient.from_config(make_config(tmp_path, store))
    a = Rig(make_config(tmp_path / "a", store), keyring, urza_client=client)
    b = Rig(make_config(tmp_path / "b", store), keyring, urza_client=client)
    assert a.send("germinate", SEED0, mlp)
    a.manager.close()
    assert b.send("germinate", SEED0, mlp)
    assert b.stage(SEED0) == S.ISOLATED_INIT
    b.manager.close()
    client.fetch(mlp)  # still the caller's to use
    client.close()


def _transitions(sink: MemorySink) -> list[tuple[str, str]]:
    return [(e.labels["from"], e.labels["to"]) for e in sink.events("lifecycle.transition")]


def test_a_registering_manager_hears_its_seeds_events(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """``register`` left the table reporting where it did: to a closed manager's reporter for a
    model taken over from it, to none for a model made with ``kasmina.attach``."""
    old_sink = MemorySink()
    taken_over = Host()
    old = _manager(tmp_path, store, keyring, "old", telemetry=TelemetryReporter(sinks=[old_sink]))
    old.attach(taken_over, "out", 2, 2)
    old.close()
    attached = Host()
    kasmina.attach(attached, "out", 2, 2)
    for index, model in enumerate((taken_over, attached)):
        sink = MemorySink()
        manager = _manager(
            tmp_path, store, keyring, f"new{index}", telemetry=TelemetryReporter(sinks=[sink])
        )
        manager.register(model)
        record_activations(model, torch.randn(16, 6))
        germinate = sign_command(make_seed_command("germinate", SEED0, mlp), keyring, "ctl")
        assert run_command(manager, germinate.SerializeToString())
        assert _transitions(sink) == [("DORMANT", "ISOLATED_INIT")]
        manager.close()
        assert model.out.state_table.telemetry is None  # a closed manager hears nothing more
    assert _transitions(old_sink) == []


def test_a_managed_model_cannot_be_frozen_in_place_as_a_teacher(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """``load_teacher(model, copy_model=False)`` casts and freezes ``model``: given another
    manager's live host, that host trained no more while its manager reported it stepped."""
    student = Rig(make_config(tmp_path / "s", store, kd_enabled=True), keyring)
    other = Rig(make_config(tmp_path / "o", store), keyring)
    weight = other.model.inp.weight
    for model in (other.model, other.model.inp):
        with pytest.raises(ValueError, match="a live manager manages this model"):
            student.manager.load_teacher(model, copy_model=False)
    assert weight.dtype == torch.float32 and weight.requires_grad
    student.manager.load_teacher(other.model)  # a copy is fine
    student.manager.load_teacher(Host(), copy_model=False)  # and an unmanaged model in place
    grown = Host()
    kasmina.attach(grown, "out", 2, 2)  # slots no live manager owns
    student.manager.load_teacher(grown, copy_model=False)


@pytest.mark.parametrize("case", ["own host", "another host, checkpoint", "frozen layer"])
def test_a_teacher_in_place_over_a_managed_models_memory_is_refused(
    tmp_path: Path, store: Path, keyring: Keyring, case: str
) -> None:
    """The check of a teacher loaded in place compared parameter objects only: a teacher over a
    live host's bytes (``nn.Parameter(host.weight.data)``) was taken, and its logits moved with
    every step of that host (its own manager's too), or its checkpoint load wrote over the
    host's weights; a frozen layer of a managed model, taken as it is, was cast to bf16 under
    that model's forward. Refused by memory before anything changes, fine once that manager
    closed."""
    checkpoint = tmp_path / "teacher.pt"
    own = case == "own host"  # fp32: its teacher would share the host's bytes from then on
    options = {"teacher_dtype": "float32"} if own else {"teacher_checkpoint_path": str(checkpoint)}
    student = Rig(make_config(tmp_path / "s", store, kd_enabled=True, **options), keyring)
    if own:
        host, manager = student.model, student.manager
    else:
        host = Host()
        host.inp.requires_grad_(case != "frozen layer")
        manager = _manager(tmp_path, store, keyring, "other")
        manager.attach(host, "out", 2, 2, host_lr=0.1)
    teacher = host.inp if case == "frozen layer" else Host()
    if case != "frozen layer":
        teacher.inp.weight = nn.Parameter(host.inp.weight.data)
    torch.save({k: torch.zeros_like(v) for k, v in teacher.state_dict().items()}, checkpoint)
    before = {name: p.detach().clone() for name, p in host.named_parameters()}
    with pytest.raises(ValueError, match="share memory with a model a live manager holds"):
        student.manager.load_teacher(teacher, copy_model=False)
    assert student.manager.teacher is None
    assert all(torch.equal(p, before[name]) for name, p in host.named_parameters())
    assert all(p.dtype == torch.float32 for p in host.parameters())
    student.manager.load_teacher(teacher)  # a copy is fine
    manager.close()  # released: the memory may now be a teacher in place
    Rig(make_config(tmp_path / "t", store), keyring).manager.load_teacher(teacher, copy_model=False)


@pytest.mark.parametrize("over", ["the model", "a layer", "its bytes"])
def test_a_teacher_built_directly_in_place_over_a_managed_model_is_refused(
    tmp_path: Path, store: Path, keyring: Keyring, over: str
) -> None:
    """``CheckpointedTeacher(model, copy_model=False)`` built without a manager skipped the check
    ``load_teacher`` ran: a live manager's model, a layer of it or a model over its host's bytes
    was frozen and cast to bf16 under that manager, whose steps then moved nothing. The teacher
    makes the one check itself, whoever builds it; taken once that manager closed."""
    rig = Rig(make_config(tmp_path / "r", store), keyring)
    host = rig.model
    taken = {"the model": host, "a layer": host.inp}.get(over)
    if taken is None:
        taken = Host()
        taken.inp.weight = nn.Parameter(host.inp.weight.data)
    with pytest.raises(ValueError, match="a teacher loaded with copy_model=False is frozen"):
        CheckpointedTeacher(taken, copy_model=False)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in host.parameters())
    assert not any(map(is_teacher_parameter, taken.parameters()))
    CheckpointedTeacher(taken).close()  # a copy is fine
    rig.manager.close()  # released: the memory may now be a teacher in place
    teacher = CheckpointedTeacher(taken, copy_model=False)
    assert teacher.teacher is taken and all(map(is_teacher_parameter, taken.parameters()))


def test_a_model_over_an_in_place_teachers_memory_is_not_trained(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """The other order: a teacher in place first, then a model over its bytes. The optimizers
    refused the teacher's parameter objects only, so the new host's steps moved the teacher's
    logits. Refused by memory as by identity, nothing attached; fine once the teacher let go."""
    kd = Rig(make_config(tmp_path / "kd", store, kd_enabled=True, teacher_dtype="float32"), keyring)
    taught = Host()
    kd.manager.load_teacher(taught, copy_model=False)
    want = kd.manager.get_teacher_predictions(kd.x)
    model = Host()
    model.inp.weight = nn.Parameter(taught.inp.weight.data)
    names = [n for n, _ in model.named_parameters()]
    trainer = _manager(tmp_path, store, keyring, "trainer")
    with pytest.raises(ParameterOverlapError, match="shares memory with a teacher's parameter"):
        trainer.attach(model, "out", 2, 2, host_lr=0.1)
    assert [n for n, _ in model.named_parameters()] == names  # nothing attached
    assert torch.equal(kd.manager.get_teacher_predictions(kd.x), want)
    kd.manager.close()
    trainer.attach(model, "out", 2, 2, host_lr=0.1)
    trainer.close()


def test_a_model_another_manager_holds_in_place_as_its_teacher_is_refused_in_place(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """Two managers' teachers of one model in place each cast it under its own lock: tenant B's
    ``teacher_dtype`` recast tenant A's live teacher (A's next KD forward raised a dtype
    mismatch), and A's first-forward fp32 profile met B's forwards on another thread. B's
    in-place load is refused, B as it was; a copy is B's own."""
    a = Rig(make_config(tmp_path / "a", store, kd_enabled=True), keyring)
    b = Rig(make_config(tmp_path / "b", store, kd_enabled=True, teacher_dtype="float16"), keyring)
    model = Host()
    a.manager.load_teacher(model, copy_model=False)
    want = a.manager.get_teacher_predictions(a.x)
    own = b.manager.load_teacher(Host())
    passes = b.manager.teacher_passes
    for taken in (model, model.out):  # the model, or any module of it
        with pytest.raises(ValueError, match="held in place by another live teacher"):
            b.manager.load_teacher(taken, copy_model=False)
    assert b.manager.teacher is own and b.manager.teacher_passes is passes
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.equal(a.manager.get_teacher_predictions(a.x), want)
    copied = b.manager.load_teacher(model)  # a copy is B's own, in its own dtype
    assert copied.teacher is not model and copied.dtype == torch.float16
    assert torch.equal(a.manager.get_teacher_predictions(a.x), want)
    a.manager.close()  # A's teacher closed: the model may be taken in place again
    b.manager.load_teacher(model, copy_model=False)
    assert all(p.dtype == torch.float16 for p in model.parameters())


@pytest.mark.parametrize("let_go", ["close", "another teacher", "collected"])
def test_a_model_taught_in_place_is_trainable_once_its_teacher_is_let_go(
    tmp_path: Path, store: Path, keyring: Keyring, let_go: str
) -> None:
    """An in-place teacher's parameters stayed teacher-only as long as they lived: once its
    manager closed, loaded another teacher or was dropped, no manager could train the model
    ("belongs to a teacher (never optimized)"). They are let go with the teacher."""
    model = Host()
    kd = Rig(make_config(tmp_path / "kd", store, kd_enabled=True), keyring)
    held = kd.manager.load_teacher(model, copy_model=False)
    model.float().requires_grad_(True)  # the model as a trainer would take it
    trainer = _manager(tmp_path, store, keyring, "trainer")
    with pytest.raises(ParameterOverlapError, match="belongs to a teacher"):
        trainer.attach(model, "out", 2, 2)
    if let_go == "close":
        kd.manager.close()
    elif let_go == "another teacher":
        kd.manager.load_teacher(Host())
    else:
        del kd, held  # dropped without close(): let go when collected
    trainer.attach(model, "out", 2, 2)
    trainer.close()


def test_a_manager_loads_the_model_it_holds_in_place_again(
    tmp_path: Path, store: Path, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manager's next ``load_teacher`` of the model its own teacher holds in place (a new
    checkpoint, another dtype) takes it over; a load that fails leaves the model held by the
    teacher it had, which still serves."""
    import kasmina.kd.teacher as teacher_module
    from kasmina.kd.holds import is_teacher_parameter

    rig = Rig(make_config(tmp_path / "a", store, kd_enabled=True), keyring)
    model = Host()
    first = rig.manager.load_teacher(model, copy_model=False)
    want = rig.manager.get_teacher_predictions(rig.x)
    monkeypatch.setattr(teacher_module, "_FP32_BYTES", None)  # the build fails after the hold
    with pytest.raises(TypeError):
        rig.manager.load_teacher(model, copy_model=False)
    monkeypatch.undo()
    assert rig.manager.teacher is first and all(map(is_teacher_parameter, model.parameters()))
    assert torch.equal(rig.manager.get_teacher_predictions(rig.x), want)
    second = rig.manager.load_teacher(model, copy_model=False)
    assert rig.manager.teacher is second and second.teacher is model
    assert all(map(is_teacher_parameter, model.parameters()))  # the old one closed, not these
    rig.manager.close()
    assert not any(map(is_teacher_parameter, model.parameters()))


def _grown(rig: Rig, mlp: str, aff: str, teacher: torch.Tensor | None) -> Iterator[None]:
    """A run that grafts, blends, culls, measures and rolls back, yielding between its parts."""
    for sid, artifact in ((SEED0, mlp), (SEED1, aff)):
        assert rig.send("germinate", sid, artifact)
        yield
    rig.train(1, teacher)
    rig.manager.end_epoch(0)
    yield
    for steps in (1, 4):  # to COMPATIBILITY_CHECK, then GRAFTING (alpha 1 in four steps)
        for sid in (SEED0, SEED1):
            assert rig.send("advance", sid)
            yield
        rig.train(steps, teacher)
    assert rig.send("cull", SEED1) and rig.send("advance", SEED0)  # blended in: STABILIZATION
    yield
    rig.manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)
    rig.manager.end_epoch(1)
    rig.train(1, teacher)
    yield
    assert run_command(rig.manager, rig.signed(make_rollback_command(1)))
    rig.train(1, teacher)


def _trial(
    tmp_path: Path, store: Path, keyring: Keyring, name: str, index: int
) -> tuple[Rig, torch.Tensor | None]:
    """Trial ``index`` of a sweep: its own data, learning rate and (trial 0) teacher."""
    config = make_config(tmp_path / name, store, kd_enabled=index == 0)
    rig = Rig(config, keyring, host_lr=0.05 * (index + 1))
    generator = torch.Generator().manual_seed(10 + index)
    rig.x, rig.y = torch.randn(16, 6, generator=generator), torch.randint(0, 4, (16,))
    return rig, (torch.randn(16, 4, generator=generator) if index == 0 else None)


def test_two_managers_each_train_bit_for_bit_as_alone(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str, published, reference_backend: None
) -> None:
    """A sweep's two trials in one process, stepped in turn on one thread, then each on its own
    thread (the reference ops: Triton's interpreter is not thread-safe): every weight,
    optimizer state and table entry of each is bit for bit what it is run alone."""
    alone = []
    for index in range(2):
        rig, teacher = _trial(tmp_path, store, keyring, f"alone{index}", index)
        for _ in _grown(rig, mlp, published[2], teacher):
            pass
        alone.append(snapshot_state(rig))
        rig.manager.close()
    for how in ("alternating", "threads"):
        trials = [_trial(tmp_path, store, keyring, f"{how}{index}", index) for index in range(2)]
        runs = [_grown(rig, mlp, published[2], teacher) for rig, teacher in trials]
        if how == "threads":
            threads = [threading.Thread(target=collections.deque, args=(run, 0)) for run in runs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        else:
            for _ in itertools.zip_longest(*runs):
                pass
        for (rig, _), before in zip(trials, alone, strict=True):
            assert rig.stage(SEED0) == S.STABILIZATION, how
            assert_same(snapshot_state(rig), before)
            rig.manager.close()


def test_a_dropped_grown_manager_leaves_nothing_for_the_next(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """A notebook builds a model and its manager, grows a seed with a teacher, drops both
    unclosed and builds the next: the first manager, its model and teacher are collected, and
    its fetch workers end."""
    before = set(threading.enumerate())  # other tests' idle workers may still be alive
    config = make_config(tmp_path / "first", store, kd_enabled=True)
    rig = Rig(config, keyring)
    teacher = rig.manager.load_teacher(Host())
    assert rig.send("germinate", SEED0, mlp)  # fetched on a worker
    rig.train(2, teacher=rig.manager.get_teacher_predictions(rig.x).float())
    gone = [weakref.ref(o) for o in (rig.manager, rig.model, teacher, teacher.teacher)]
    workers = set(threading.enumerate()) - before
    assert any(thread.name.startswith("kasmina-fetch") for thread in workers)
    del rig, teacher
    gc.collect()
    assert [ref() for ref in gone] == [None] * len(gone)
    for thread in workers:
        thread.join(timeout=10)
        assert not thread.is_alive(), thread.name
    nxt = Rig(make_config(tmp_path / "next", store), keyring)
    assert nxt.send("germinate", SEED0, mlp)
    nxt.train(1)
    nxt.manager.close()


def test_two_managers_measuring_at_once_leave_compiled_code_compiled(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str, reference_backend: None
) -> None:
    """A measurement runs compiled code eagerly (``torch.compiler.set_stance``, the process's):
    two managers' ``evaluate_seeds`` on two threads, the second in while the first ran and out
    after it, left the process in "force_eager", and every compiled model after ran eagerly
    (the rest of a test run's compiled tests found nothing compiled). The stance is back."""
    import torch._dynamo.eval_frame as eval_frame

    rigs = [Rig(make_config(tmp_path / name, store), keyring) for name in "ab"]
    for rig in rigs:
        assert rig.send("germinate", SEED0, mlp)
        to_stabilization(rig, [SEED0])
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def scored(entered: threading.Event, wait_for: threading.Event):
        def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            entered.set()
            assert wait_for.wait(60)
            return F.cross_entropy(out, y)

        return loss

    def measure(rig: Rig, loss, done: threading.Event | None) -> None:
        rig.manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=loss)
        if done is not None:
            done.set()

    before = eval_frame._stance.stance
    first = threading.Thread(target=measure, args=(rigs[0], scored(first_in, second_in), first_out))
    second = threading.Thread(target=measure, args=(rigs[1], scored(second_in, first_out), None))
    first.start()
    assert first_in.wait(60)
    second.start()
    for thread in (first, second):
        thread.join(60)
    assert first_out.is_set() and not second.is_alive()
    after = eval_frame._stance.stance
    torch.compiler.set_stance(before)  # (made, it sets it: the tests after compile whatever)
    assert after == before == "default"
    for rig in rigs:
        rig.manager.close()
