"""What a metrics exporter, a health endpoint or a controller reads from another thread while the
training thread runs: reads that never run the model, never open a store twice and never meet
a log being appended to."""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kasmina.control.builders import make_seed_command
from kasmina.manager import checkpoints as checkpoints_module
from kasmina.manager import slots as slots_module
from kasmina.manager import state as state_module
from tests.manager.helpers import SEED0, SEED1, Rig, make_config, run_command


def on_thread(fn):
    """``fn()`` on another thread: its result, or the exception it raised."""
    box: list = []

    def run() -> None:
        try:
            box.append(fn())
        except Exception as exc:
            box.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    return box[0]


def test_performance_reads_on_another_thread_never_run_the_live_model(rig: Rig) -> None:
    """Before the first end_epoch, get_performance_metrics measured the dormant overhead itself,
    on the caller's thread: eval mode, buffers copied back and the RNG forked under the
    training thread's forwards (a backward then raised on a saved tensor modified in place, or
    the run silently diverged). Off the training thread it is a read now; the measurements
    that must run the model refuse there."""
    calls: list[int] = []
    forward = rig.slot.host.forward  # counted in the forward itself: the timing holds hooks
    rig.slot.host.forward = lambda *args: calls.append(1) or forward(*args)
    metrics = on_thread(rig.manager.get_performance_metrics)  # before any step: register's
    assert math.isnan(metrics["dormant_overhead_us"]) and calls == []
    # Nor on the registering thread before a step: a trainer thread of its own may be in its
    # first step (its forwards ran in eval mode, its BatchNorm's counts were put back).
    assert math.isnan(rig.manager.get_performance_metrics()["dormant_overhead_us"])
    assert calls == []
    rig.train(1)  # the training thread: this one
    calls.clear()
    metrics = on_thread(rig.manager.get_performance_metrics)
    assert math.isnan(metrics["dormant_overhead_us"]) and calls == []
    refused = on_thread(rig.manager.measure_dormant_overhead)
    assert isinstance(refused, RuntimeError) and "training thread" in str(refused)
    targets = on_thread(lambda: rig.manager.validate_performance_targets())
    assert "dormant_overhead_us" not in targets and calls == []  # NaN: not measurable there
    assert math.isfinite(rig.manager.get_performance_metrics()["dormant_overhead_us"])  # measured
    assert calls


def test_the_timing_table_logs_no_transitions_into_the_runs_log(rig: Rig, caplog) -> None:
    """validate_performance_targets times 1,024 transitions on a private table, which logged
    each at INFO: thousands of lines naming the run's own seed indices, and the log formatting
    timed with them."""
    with caplog.at_level(logging.INFO, logger="kasmina"):
        rig.manager.validate_performance_targets()
    assert not [r for r in caplog.records if "lifecycle: seed" in r.getMessage()]


def test_the_checkpoint_store_opens_once_when_two_threads_ask_first(
    tmp_path, store, keyring, monkeypatch
) -> None:
    """A health thread listing checkpoints as end_epoch first wrote one: both opened the store,
    and the second run lock failed end_epoch ("held by another live trainer")."""
    rig = Rig(make_config(tmp_path, store, checkpoint_mode="disk"), keyring)
    real = checkpoints_module.open_checkpoint_store

    def slow_open(*args, **kwargs):
        time.sleep(0.2)  # both threads are past the "not opened yet" test
        return real(*args, **kwargs)

    monkeypatch.setattr(state_module, "open_checkpoint_store", slow_open)
    box: list = []
    health = threading.Thread(target=lambda: box.append(on_thread(lambda: rig.manager.checkpoints)))
    health.start()
    trainer = rig.manager.checkpoints  # raised when the health thread opened it too
    health.join(30)
    assert box[0] is trainer
    rig.manager.backward(F.cross_entropy(rig.model(rig.x), rig.y))
    rig.manager.step()
    rig.manager.end_epoch(0)
    assert rig.manager.checkpoints.epochs() == [0]
    rig.manager.close()


def test_logs_read_on_another_thread_are_copies(rig: Rig) -> None:
    """command_log and field_reports were the live deques: an exporter walking one while a safe
    point appended raised "deque mutated during iteration"."""
    log = rig.manager.command_log
    assert isinstance(log, tuple) and isinstance(rig.manager.field_reports, tuple)
    assert rig.send("cull", "out[0]") is False  # a refused command is logged too
    assert len(rig.manager.command_log) == len(log) + 1


def test_counters_read_on_another_thread_are_copies(rig: Rig, mlp: str) -> None:
    """``counters`` and ``gate_counts`` were the live Counters: an exporter walking one while a
    safe point counted a new key (a command's kind, a gate's verdict) raised "dictionary
    changed size during iteration". Each read is a copy now, a Counter still (0 for a key
    never counted), and the manager goes on counting in its own."""
    assert rig.send("germinate", SEED0, mlp)
    for key in rig.manager.counters:  # the walk; the step's safe point counts a new kind in it
        if key == "seed.germinate:ok":
            assert rig.manager.handle_adaptation_command(
                rig.signed(make_seed_command("cull", SEED1, validate=False))
            )
            assert len(rig.train(1)["commands"]) == 1
    counters = rig.manager.counters
    assert counters["seed.cull:refused"] == 1 and counters["never counted"] == 0
    walked = []
    for key in rig.manager.gate_counts:  # G1 counted; G2 evaluated (refused) by the ADVANCE
        if not walked:
            assert not rig.send("advance", SEED0)
        walked.append(key)
    assert walked == [(1, True)] and rig.manager.gate_counts[(2, False)] == 1
    rig.manager.val_metrics["val_loss"] = 0.5  # a copy: the manager's clock is not written
    assert rig.manager.val_metrics == {}


def test_a_seeds_timeline_read_on_another_thread_is_a_copy(rig: Rig, mlp: str) -> None:
    """A seed record's ``timeline`` was the live deque: an exporter walking it while a safe
    point's command (or a serving thread's quarantine) moved the seed raised "deque mutated
    during iteration". It reads as a tuple copied in one call now."""
    assert rig.send("germinate", SEED0, mlp)
    record = rig.manager.require_registry()[SEED0]
    walked = [entry for entry in record.timeline if rig.send("cull", SEED0)]
    assert [stage for _, _, stage in walked] == ["ISOLATED_INIT"]
    assert [stage for _, _, stage in record.timeline][0] == "ISOLATED_INIT"
    assert len(record.timeline) > len(walked) and isinstance(record.timeline, tuple)


def test_the_kernel_loaders_counters_read_on_another_thread_are_a_copy(rig: Rig, mlp: str) -> None:
    """``manager.loader.counters`` was the live Counter: an exporter walking it while a load
    counted a new key (a fetch worker's failure) raised "dictionary changed size during
    iteration". Each read is a copy now, a Counter still, and the loader goes on counting."""
    assert rig.send("germinate", SEED0, mlp)
    missing = "mlp-" + "0" * 16
    walked = [
        key for key in rig.manager.loader.counters if not rig.send("germinate", SEED1, missing)
    ]
    counters = rig.manager.loader.counters
    assert walked == ["loads"] and counters["load_failures"] == 1 and counters["never"] == 0


def test_the_full_packet_is_read_under_the_managers_lock(rig: Rig) -> None:
    """export_leyline_telemetry read the clock and the metrics in turn, unlocked: a packet
    could carry one epoch's number with the next epoch's validation metrics."""
    rig.manager._lock.acquire()
    try:
        done = threading.Event()
        reader = threading.Thread(
            target=lambda: (rig.manager.export_leyline_telemetry(), done.set())
        )
        reader.start()
        assert not done.wait(0.3)  # waits for the lock, as system_state does
    finally:
        rig.manager._lock.release()
    reader.join(30)
    assert done.is_set()


@pytest.fixture(autouse=True)
def _quiet_rig_logs(caplog):
    caplog.set_level(logging.ERROR, logger="kasmina.manager.executor")


def test_a_restarted_trainers_rollback_does_not_name_the_training_thread(
    tmp_path, store, keyring
) -> None:
    """The clock a ROLLBACK restores made ``global_step`` > 0 before this process stepped, so
    an exporter on the registering thread measured the live model under a trainer thread."""
    from kasmina.control.builders import make_rollback_command

    config = make_config(tmp_path, store)
    first = Rig(config, keyring)
    first.train(2)
    first.manager.end_epoch(0)
    first.manager.close()
    second = Rig(config, keyring)
    assert run_command(second.manager, second.signed(make_rollback_command(0)))
    assert second.manager.global_step == 2
    calls: list[int] = []
    second.slot.host.register_forward_hook(lambda *_: calls.append(1))
    assert math.isnan(second.manager.get_performance_metrics()["dormant_overhead_us"])
    assert calls == []
    second.manager.close()


def test_steps_on_one_thread_keep_the_training_thread_and_never_ask_for_the_manager(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step made a new weak reference to its thread (``end_step``) and dereferenced the
    registry's weak reference to its manager three times (``require_manager``). The reference
    is made anew only when another thread ends a step, and the manager's collection is noted as
    it happens (a weakref callback): a step reads one attribute for it."""
    rig.train()
    registry = rig.manager.require_registry()
    owner, calls, refs = registry._owner, [], []

    def ref(obj):
        refs.append(obj)
        return weakref.ref(obj)

    monkeypatch.setattr(slots_module, "weakref", SimpleNamespace(ref=ref))
    monkeypatch.setattr(registry, "_owner", lambda: calls.append(1) or owner())  # owner kept
    rig.train(3)
    assert refs == [] and calls == []
    trainer = threading.Thread(target=rig.train)  # the next epoch's trainer thread
    trainer.start()
    trainer.join(60)
    assert refs == [trainer] and registry.training_thread() is trainer


def test_a_new_thread_given_a_dead_trainers_id_is_not_the_training_thread(rig: Rig) -> None:
    """The training thread was kept as its id, which the C library gives the next new thread
    once that thread ends (one trainer thread per epoch, an executor's worker): an exporter
    started after it measured the live model (get_performance_metrics ran its forwards, and
    measure_dormant_overhead was allowed) while the next epoch's trainer was in its step. The
    ``Thread`` itself is compared now."""
    trainer = threading.Thread(target=rig.train)  # an epoch's trainer thread, which ends
    trainer.start()
    trainer.join(60)
    calls: list[int] = []
    forward = rig.slot.host.forward
    rig.slot.host.forward = lambda *args: calls.append(1) or forward(*args)
    box: list = []

    def exporter() -> None:
        if threading.get_ident() == trainer.ident:  # the dead trainer's id
            box.append(rig.manager.get_performance_metrics())
            try:
                box.append(rig.manager.measure_dormant_overhead(3))
            except RuntimeError as exc:
                box.append(exc)

    for _ in range(200):
        thread = threading.Thread(target=exporter)
        thread.start()
        thread.join(60)
        if box:
            break
    else:
        pytest.skip("no thread here was given a dead thread's id")
    metrics, refused = box
    assert math.isnan(metrics["dormant_overhead_us"]) and calls == []
    assert isinstance(refused, RuntimeError) and "training thread" in str(refused)


def test_a_sink_reading_the_manager_on_a_fault_never_deadlocks_a_step_charging_one(
    rig: Rig, mlp: str
) -> None:
    """A serving thread's forward faults while the training thread's step charges another
    fault, and a telemetry sink reads ``system_state()`` on the ``seed.fault`` event: the
    serving thread held the fault lock in the sink and waited for the manager's lock, while the
    step held the manager's lock and waited for the fault lock. Every wait here is bounded (the
    sink's read runs on a thread of its own, waited for up to 5 s), so the deadlock fails the
    test instead of hanging it; no fault's telemetry or log runs under the fault lock now."""
    assert rig.send("germinate", SEED0, mlp)
    manager, seed = rig.manager, rig.manager.seed(SEED0)
    seed.fault_limit = 100  # no quarantine: the counts alone
    server_faulting, step_locked = threading.Event(), threading.Event()
    read: list = []
    in_time: list[bool] = []
    forward = seed.kernel.forward

    def kernel(x):  # the request's forward raises; the trainer's gives a non-finite output
        if threading.current_thread().name == "server":
            raise RuntimeError("kernel exploded")
        return forward(x) * float("nan")

    def read_state() -> None:
        read.append(manager.system_state())

    class Sink:
        def send(self, packet) -> None:
            names = {metric.name for metric in packet.metrics}
            name = threading.current_thread().name
            if name == "trainer" and "seed.nonfinite_output" in names:  # in step(), locked
                step_locked.set()
                server_faulting.wait(5)  # the request's fault is being reported meanwhile
            elif name == "server" and "seed.fault" in names:
                server_faulting.set()
                step_locked.wait(5)
                reader = threading.Thread(target=read_state, daemon=True)
                reader.start()
                reader.join(5)  # the sink's own system_state(), bounded
                in_time.append(not reader.is_alive())

    manager.telemetry.add_sink(Sink())
    seed.kernel.forward = kernel
    errors: list[BaseException] = []

    def guarded(work):
        def run() -> None:
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - every escape is the finding
                errors.append(exc)

        return run

    def serve() -> None:
        step_locked.wait(5)  # the step holds the manager's lock
        with torch.no_grad():
            rig.model(rig.x)

    server = threading.Thread(target=guarded(serve), name="server", daemon=True)
    trainer = threading.Thread(target=guarded(rig.train), name="trainer", daemon=True)
    server.start()
    trainer.start()
    trainer.join(30)
    server.join(30)
    assert not trainer.is_alive() and not server.is_alive() and errors == []
    assert server_faulting.is_set() and step_locked.is_set()
    assert in_time == [True]  # the sink's read returned once the step let the lock go
    assert seed.faults == 2 and len(seed.fault_log) == 2
