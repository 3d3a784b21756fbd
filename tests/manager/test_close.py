"""What a manager leaves behind: a constructor that raises leaves nothing open or attached, and
``close()`` leaves nothing of the manager on the user's model (no observer on its state table,
no hook on a kernel or parameter), which goes on training with the user's own optimizer."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import os
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kasmina.control.auth import sign_command
from kasmina.control.builders import make_seed_command
from kasmina.kd.config import KDConfig
from kasmina.kd.holds import is_teacher_parameter
from kasmina.kd.teacher import CheckpointedTeacher
from kasmina.manager import manager as manager_module
from kasmina.manager import teaching as teaching_module
from kasmina.manager.manager import KasminaKernelManager
from kasmina.seeds.inject import attach
from kasmina.urza.client import UrzaLibraryClient
from kasmina.utils.keyring import Keyring
from kasmina.utils.orphans import add_owned_sink
from kasmina.utils.telemetry import MemorySink, TelemetryReporter
from tests.crash import run_bounded_in_child, said_in_child
from tests.manager.helpers import SEED0, Host, Rig, make_config, record_activations, run_command


def _open_fds(path: Path) -> int:
    """How many of this process's descriptors are open on ``path`` (Linux' /proc)."""
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        pytest.skip("needs /proc/self/fd")
    return sum(os.path.realpath(fd) == os.path.realpath(path) for fd in fds.iterdir())


def _param_hooks(model: nn.Module) -> int:
    return sum(len(p._backward_hooks or {}) for p in model.parameters())


def _forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_a_constructor_that_raises_leaves_no_file_open_and_no_sink_attached(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    jsonl = tmp_path / "telemetry.jsonl"
    config = make_config(tmp_path, store, run_id="shared", telemetry_jsonl_path=str(jsonl))
    live = KasminaKernelManager(config, keyring=keyring)  # holds the run's nonce ledger
    reporter = TelemetryReporter(sinks=[MemorySink()])
    sinks = reporter.sinks
    with pytest.raises(RuntimeError, match="held by another live sink"):  # its JSONL file
        KasminaKernelManager(config, keyring=keyring, telemetry=reporter)
    for n in range(3):  # a JSONL file of its own: opened, then the ledger refuses
        other = tmp_path / f"other{n}.jsonl"
        attempt = dataclasses.replace(config, telemetry_jsonl_path=str(other))
        with pytest.raises(RuntimeError, match="nonce ledger"):
            KasminaKernelManager(attempt, keyring=keyring, telemetry=reporter)
        assert _open_fds(other) == 0 and _open_fds(other.with_name(f"other{n}.jsonl.lock")) == 0
    gc.collect()
    assert reporter.sinks == sinks
    assert _open_fds(jsonl) == 1  # the live manager's own
    live.close()
    assert _open_fds(jsonl) == 0


def test_a_with_block_closes_the_manager_and_releases_its_run_at_once(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """A manager holds the run's nonce ledger, checkpoint run lock and JSONL file; its parts
    refer to one another, so dropping it frees them only at the collector's next full pass.
    ``with`` closes it on the way out, an exception's way too, and the next run starts at once."""
    jsonl = tmp_path / "telemetry.jsonl"
    config = make_config(
        tmp_path, store, run_id="shared", telemetry_jsonl_path=str(jsonl), checkpoint_mode="disk"
    )
    gc.disable()  # no collection may release what ``with`` must
    try:
        with KasminaKernelManager(config, keyring=keyring) as manager:
            assert isinstance(manager, KasminaKernelManager) and _open_fds(jsonl) == 1
        assert _open_fds(jsonl) == 0
        with pytest.raises(ValueError, match="inside"):
            with KasminaKernelManager(config, keyring=keyring):
                raise ValueError("inside")
        assert _open_fds(jsonl) == 0
        KasminaKernelManager(config, keyring=keyring).close()  # the ledger is free again
    finally:
        gc.enable()


@pytest.mark.parametrize("reporter", ["own", "callers"])
def test_a_dropped_manager_lets_go_of_its_telemetry_file_while_the_model_lives(
    tmp_path: Path, store: Path, keyring: Keyring, reporter: str
) -> None:
    """A notebook builds the model in one cell and the manager in another, run again without
    ``close()``: the old manager was collected, but its JSONL sink stayed in the reporter the
    model's state table (or the caller) still holds, with the file's lock, and the new
    manager was refused "held by another live sink"."""
    jsonl = tmp_path / "telemetry.jsonl"
    config = make_config(tmp_path, store, telemetry_jsonl_path=str(jsonl))
    callers = TelemetryReporter(sinks=[MemorySink()]) if reporter == "callers" else None
    model = Host()
    manager = KasminaKernelManager(config, keyring=keyring, telemetry=callers)
    manager.attach(model, "out", 2, 2)
    dropped = weakref.ref(manager)
    del manager
    gc.collect()
    assert dropped() is None
    kept = model.out.state_table.telemetry  # the model keeps the old reporter
    assert kept is not None
    # The collector only queued the sink (it may run inside a lock closing it takes); the new
    # manager's wait for the file's lock closes it, as would the reporter's next packet.
    again = dataclasses.replace(config, run_id="next")  # the file, not the run, is the point
    second = KasminaKernelManager(again, keyring=keyring, telemetry=callers)
    files = [s for s in kept.sinks if hasattr(s, "path")]  # the new manager's, if it shares
    assert len(files) == (0 if callers is None else 1)
    assert _open_fds(jsonl) == 1  # the new manager's own
    second.close()
    assert _open_fds(jsonl) == 0
    if callers is not None:
        assert len(callers.sinks) == 1  # its own sink, not the dropped managers' files


def test_a_sink_whose_owner_was_collected_is_closed_by_the_reporters_next_packet() -> None:
    """The finalizer of a collected owner only queues its sink: run inside the reporter's own
    lock (a collection landing in ``add_sink``), closing it there would deadlock."""
    reporter, sink = TelemetryReporter(), MemorySink()

    class Owner:
        pass

    owner = Owner()
    add_owned_sink(reporter, sink, owner)
    del owner
    gc.collect()
    assert reporter.sinks == (sink,)  # queued, not yet taken off
    reporter.emit("x")
    assert reporter.sinks == ()
    release = add_owned_sink(reporter, MemorySink(), Owner())  # its owner dropped at once
    release()  # closing explicitly takes it off at once, and only once
    release()


def test_a_constructor_that_raises_after_the_ledger_closes_what_it_opened(
    tmp_path: Path, store: Path, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after every resource is open: the sink, the ledger and the manager's own Urza
    client are closed; a client the caller passed in is the caller's, and stays open."""
    jsonl = tmp_path / "telemetry.jsonl"
    config = make_config(tmp_path, store, telemetry_jsonl_path=str(jsonl))
    reporter = TelemetryReporter(sinks=[MemorySink()])
    made: list[UrzaLibraryClient] = []
    from_config = UrzaLibraryClient.from_config

    def spy(config_: object) -> UrzaLibraryClient:
        made.append(from_config(config_))
        return made[-1]

    def boom(*_args: object, **_kwargs: object) -> None:
        raise MemoryError("no room for the intake")

    monkeypatch.setattr(UrzaLibraryClient, "from_config", spy)
    monkeypatch.setattr(manager_module, "CommandIntake", boom)
    theirs = from_config(config)
    for client in (None, theirs):
        with pytest.raises(MemoryError):
            KasminaKernelManager(config, keyring=keyring, telemetry=reporter, urza_client=client)
    assert len(made) == 1 and made[0]._guard.closed and not theirs._guard.closed
    assert len(reporter.sinks) == 1 and _open_fds(jsonl) == 0
    monkeypatch.undo()
    KasminaKernelManager(config, keyring=keyring).close()  # the run's ledger was released


def _send(manager: KasminaKernelManager, keyring: Keyring, op: str, artifact: str = "", **p):
    raw = sign_command(make_seed_command(op, SEED0, artifact, p), keyring, "ctl")
    return run_command(manager, raw.SerializeToString())


def test_close_leaves_nothing_of_the_manager_on_the_users_model(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    rig = Rig(make_config(tmp_path, store, checkpoint_mode="off"), keyring)
    manager, model = rig.manager, rig.model
    assert rig.send("germinate", SEED0, mlp)
    kernel = manager.seed(SEED0).kernel
    manager.register_gradient_monitors(model.inp, kernel)
    manager.register_gradient_monitors(model.inp, nn.Linear(2, 2))
    rig.train(1)
    table, record = manager.require_registry().table, manager.require_registry()[SEED0]
    assert table.owned(record.index) and _forward_hooks(model) and _param_hooks(model)
    refs = [weakref.ref(o) for o in (manager, manager.registry, manager.guard, record)]
    manager.close()
    assert not any(table.owned(r.index) for r in manager.require_registry())
    assert _forward_hooks(model) == 0 and _param_hooks(model) == 0
    assert record.monitor is None and record.last_output is None
    model(rig.x)  # a forward after close keeps nothing (no output, no graph) in the manager
    assert record.last_output is None and not record.input_grad
    with pytest.raises(RuntimeError, match="closed"):
        manager.register_gradient_monitors(model.inp, nn.Linear(2, 2))
    del rig.manager, manager, record
    gc.collect()
    assert [ref() for ref in refs] == [None] * 4  # the model keeps none of it alive
    # The model is the user's: it trains on with its own optimizer, its seed kept.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.inp.weight.detach().clone()
    F.cross_entropy(model(rig.x), rig.y).backward()
    optimizer.step()
    assert not torch.equal(before, model.inp.weight) and rig.slot.seeds[0].kernel is kernel
    assert _forward_hooks(model) == 0 and _param_hooks(model) == 0


def test_a_closed_manager_hears_of_no_later_transition_and_leaves_no_observer(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    model = Host()
    (slot,) = attach(model, "out", 2, 2)
    record_activations(model, torch.randn(16, 6))
    table = slot.state_table

    def manager(i: int) -> KasminaKernelManager:
        config = make_config(tmp_path / str(i), store, checkpoint_mode="off")
        m = KasminaKernelManager(config, keyring=keyring, telemetry=TelemetryReporter())
        m.register(model, host_lr=0.05, seed_lr=0.05)
        return m

    closed = manager(0)
    closed.close()
    live = manager(1)
    for epoch in range(0, 4, 2):
        assert _send(live, keyring, "germinate", mlp)
        assert _send(live, keyring, "cull", embargo_epochs=0)
        live.end_epoch(epoch)
        live.end_epoch(epoch + 1)
    assert len(live.require_registry()[SEED0].timeline) > 0 and live.field_reports
    assert len(closed.require_registry()[SEED0].timeline) == 0 and not closed.field_reports
    live.close()
    for i in range(2, 6):  # register/close cycles leave no observer entries behind
        manager(i).close()
    assert {idx: len(refs) for idx, refs in table._observers.items()} == {0: 1, 1: 1}
    assert not table.owned(0) and not table.owned(1)  # the seeds' own observers only


def test_the_same_debug_pair_registered_again_replaces_its_monitor(rig: Rig) -> None:
    manager, weight = rig.manager, rig.model.inp.weight
    probe = nn.Linear(2, 2)
    for _ in range(3):  # re-armed, say, once per epoch
        manager.register_gradient_monitors(rig.model.inp, probe)
        rig.train(1)
    assert [m.seed_id for m in manager.guard.external] == ["external[0]"]
    assert len(weight._backward_hooks) == len(probe.weight._backward_hooks) == 1
    manager.register_gradient_monitors(rig.model.inp, nn.Linear(2, 2))  # another pair
    assert [m.seed_id for m in manager.guard.external] == ["external[0]", "external[1]"]
    assert len(weight._backward_hooks) == 2
    gc.collect()  # that probe is gone: the next registration forgets its pair
    manager.register_gradient_monitors(rig.model.inp, probe)
    assert list(manager.guard._pairs) == ["external[0]"]
    manager.close()
    assert not weight._backward_hooks and not probe.weight._backward_hooks


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() children only")
def test_a_forked_child_opens_no_checkpoint_store_of_its_parents_run(rig: Rig) -> None:
    """Forked before the parent's first ``end_epoch`` (DataLoader workers start then), the
    child's copy of the manager would open the run's checkpoint store itself, take its free
    lock and write into the parent's run, whose own ``end_epoch`` was then refused."""
    assert rig.manager.state._checkpoints is None  # opened on first use: not yet

    def open_in_child() -> str:  # no torch op here (OpenMP after fork)
        _ = rig.manager.state.checkpoints
        return "opened"

    said = said_in_child(open_in_child)
    assert said.startswith("raised RuntimeError") and "forked child" in said, said
    rig.train(1)
    rig.manager.end_epoch(0)  # the parent's run is its own
    assert rig.manager.checkpoints.epochs() == [0]


class _StoppedFile:
    """The telemetry file, whose next line stops half written (a thread of the parent, a
    controller's ack line, in the middle of a write at the fork) until ``go`` is set."""

    def __init__(self, sink: Any, there: threading.Event, go: threading.Event) -> None:
        self.sink, self.real, self.there, self.go = sink, sink._file, there, go

    def write(self, text: str) -> int:
        self.real.write(text[: len(text) // 2])  # in the file's buffer, not yet written
        self.there.set()
        self.go.wait(60)
        self.sink._file = self.real  # (under the sink's lock) the next lines go straight on
        return self.real.write(text[len(text) // 2 :]) + len(text) // 2

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() children only")
def test_a_forked_childs_close_returns_while_its_parent_was_writing_a_telemetry_line(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """The JSONL sink writes a line under its lock: a worker forked while another thread of the
    parent was writing one inherited the lock taken by a thread it does not have, and its copy
    of the manager's ``close()`` hung for good. The lock is free in the child, whose close
    writes nothing into the parent's file, not even the half line its buffer held."""
    jsonl = tmp_path / "telemetry.jsonl"
    rig = Rig(make_config(tmp_path, store, telemetry_jsonl_path=str(jsonl)), keyring)
    sink = rig.manager._jsonl
    there, go = threading.Event(), threading.Event()
    sink._file = _StoppedFile(sink, there, go)
    writer = threading.Thread(target=lambda: rig.manager.telemetry.emit("user.forked", 1.0))
    writer.start()
    try:
        assert there.wait(30) and sink._lock.locked()
        assert run_bounded_in_child(rig.manager.close) == 0  # was HUNG
    finally:
        go.set()
        writer.join(30)
    rig.manager.close()
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]  # none torn
    assert sum("user.forked" in json.dumps(line) for line in lines) == 1


def test_a_closed_manager_writes_no_gate_score_or_teacher_logits_into_the_model(
    rig: Rig, mlp: str
) -> None:
    """``close()`` lets go of the model: a gate score recorded after it was still written into
    the seed (its state-table row and saved extra state, which ``state_dict`` and
    ``kasmina.save`` carry), and teacher logits still armed the slots. Both refuse now, as
    every later call that would change the model does, and leave it as it was."""
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    rig.manager.close()
    before = {k: v.clone() for k, v in rig.model.state_dict().items()}
    score = rig.manager.seed(SEED0).gate_score
    for call in (
        lambda: rig.manager.record_gate_score(SEED0, 0.9),
        lambda: rig.manager.set_teacher_logits(torch.randn(16, 4)),
        lambda: rig.manager.set_teacher_logits(None),
    ):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    after = rig.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in after)
    assert rig.manager.seed(SEED0).gate_score == score and rig.slot._teacher_logits is None


def test_a_closed_manager_gives_no_kd_head_to_the_slots(rig: Rig) -> None:
    """``set_kd_head`` after ``close()`` still gave the head to the slots of the model the
    manager had let go of (its seeds' KD then read the head's vocabulary): it refuses, as
    ``set_teacher_logits`` does, before any slot is touched."""
    rig.manager.close()
    head = nn.Linear(4, 9)
    with pytest.raises(RuntimeError, match="closed"):
        rig.manager.set_kd_head(head.weight, head.bias)
    assert rig.slot._kd_head is None and rig.slot.kd_width == 4


def test_a_closed_manager_takes_no_teacher_and_leaves_the_model_as_it_was(rig: Rig) -> None:
    """``load_teacher`` after ``close()`` froze and cast a model held in place, and the manager
    held it as its teacher for good (``close()``, which lets a teacher's model go, had run):
    the model stayed frozen. It refuses, before the model is touched."""
    rig.manager.close()
    teacher = Host()
    for copy_model in (False, True):
        with pytest.raises(RuntimeError, match="closed"):
            rig.manager.load_teacher(teacher, copy_model=copy_model)
    assert rig.manager.teacher is None
    assert all(p.requires_grad and p.dtype == torch.float32 for p in teacher.parameters())


def test_a_closed_manager_takes_no_backward_isolation_check_or_tracked_object(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """After ``close()``, ``backward`` still ran the KD phase and kept its leak flag for a step
    that never came (one more per call, without bound) beside the loss's gradients,
    ``check_gradient_isolation`` read and charged them, and ``track`` kept an object for
    checkpoints a closed manager never writes. Each refuses, as ``step()`` does, before
    anything changes: no gradient, no flag kept, nothing tracked."""
    config = make_config(tmp_path, store, kd_enabled=True, kd=KDConfig(alpha=1.0))
    rig = Rig(config, keyring)
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    manager = rig.manager
    manager.set_teacher_logits(torch.randn(16, 4))
    loss = F.cross_entropy(rig.model(rig.x), rig.y)
    kd_loss = manager.collect_kd_losses()
    assert kd_loss is not None and kd_loss.requires_grad
    manager.close()
    grads = [p.grad for p in rig.model.parameters()]
    scheduler = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([nn.Parameter(torch.ones(1))]), 1)
    calls = {
        "backward": lambda: manager.backward(loss, kd_loss=kd_loss),
        "kd backward": lambda: manager.backward(None, kd_loss=kd_loss),
        "check_gradient_isolation": manager.check_gradient_isolation,
        "track": lambda: manager.track("scheduler", scheduler),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="this manager is closed"):
            call()
        assert not manager.guard._kd_checks and manager.state.tracked == {}, name
        now = [p.grad for p in rig.model.parameters()]
        assert all(a is b for a, b in zip(grads, now, strict=True)), name
    loss.backward()  # the model is the user's: its own backward runs


def test_a_closed_manager_loads_and_caches_no_kernel_and_still_evicts_one(
    rig: Rig, mlp: str, published
) -> None:
    """After ``close()``, ``load_kernel`` still fetched (over a caller's client) or copied
    kernels into the closed manager's cache, and ``cache_kernel`` filled it, though no seed
    of it would draw from it again. Both refuse (``load_kernel_with_teacher`` with them);
    ``evict_kernel`` only lets memory go, and still does."""
    affine = published[2]
    manager = rig.manager
    original = manager.loader.original(affine)  # cached, pinned by no seed
    manager.close()
    calls = {
        "load_kernel": lambda: asyncio.run(manager.load_kernel(affine)),
        "a kernel not cached": lambda: asyncio.run(manager.load_kernel(mlp)),
        "load_kernel_with_teacher": lambda: asyncio.run(
            manager.load_kernel_with_teacher(affine, rig.x)
        ),
        "cache_kernel": lambda: manager.cache_kernel(affine, original),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="this manager is closed"):
            call()
        assert manager.loader.cached(mlp) is None, name
    assert manager.evict_kernel(affine) and manager.loader.cached(affine) is None


def test_a_closed_manager_runs_no_teacher_forward_on_the_model_it_let_go(rig: Rig) -> None:
    """``close()`` closes the teacher, and a model held in place (``copy_model=False``) is the
    caller's again; ``get_teacher_predictions`` still ran it, setting the caller's train-mode
    model back to eval mode, kept the batch, and profiled the model by casting it. It refuses,
    before the batch is kept, and so does the closed teacher's own forward."""
    manager, model = rig.manager, Host()
    teacher = manager.load_teacher(model, copy_model=False)
    manager.get_teacher_predictions(rig.x)
    manager.close()
    model.train()
    with pytest.raises(RuntimeError, match="this manager is closed"):
        manager.get_teacher_predictions(rig.x)
    with pytest.raises(RuntimeError, match="this teacher is closed"):
        teacher(rig.x)
    assert model.training and manager.state.last_teacher_input is None


def test_a_closed_manager_keeps_no_batch_tracked_object_or_pending_teacher_logits(
    rig: Rig,
) -> None:
    """``close()`` kept the last batch the teacher saw (a user's batch, perhaps large and on
    the device), the tracked objects (an EMA model's copy) and the teacher logits handed to the
    slots that no forward took, alive as long as the closed manager, which never uses them
    again. It lets them go; the model keeps its own (a KD head is its head)."""
    manager = rig.manager
    manager.load_teacher(Host())
    batch, tracked, logits = rig.x.clone(), nn.Linear(3, 3), torch.randn(16, 4)
    manager.get_teacher_predictions(batch)
    manager.track("ema", tracked)
    assert manager.set_teacher_logits(logits) == [rig.slot.layer_id]
    refs = [weakref.ref(t) for t in (batch, tracked, rig.slot._teacher_logits)]
    del batch, tracked, logits
    gc.collect()
    assert all(ref() is not None for ref in refs)  # held by the open manager
    manager.close()
    gc.collect()
    assert [ref() for ref in refs] == [None] * 3
    assert manager.state.tracked == {} and rig.slot._teacher_logits is None


def test_a_teacher_built_while_the_manager_closed_is_closed_not_held(rig: Rig, monkeypatch) -> None:
    """``load_teacher`` checked the manager open, built the teacher, then held it: a
    ``close()`` on another thread in between closed the teacher it had, and the closed manager
    then held the new one for good, a model held in place frozen and marked teacher-only. The
    hold is refused under the lock ``close()`` takes: the new teacher is closed, its model let
    go, and ``RuntimeError`` raised."""
    manager, model = rig.manager, Host()
    built = []

    class ClosedWhileBuilt(CheckpointedTeacher):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)
            closer = threading.Thread(target=manager.close)
            closer.start()
            closer.join(30)
            assert not closer.is_alive() and manager.state.closed

    monkeypatch.setattr(teaching_module, "CheckpointedTeacher", ClosedWhileBuilt)
    with pytest.raises(RuntimeError, match="this manager is closed"):
        manager.load_teacher(model, copy_model=False)
    (teacher,) = built
    assert teacher.closed and manager.teacher is None
    assert not any(map(is_teacher_parameter, model.parameters()))
    assert manager.teacher_passes.checkpointed_teacher is None
