"""GPUStateTensor (transitions, counters, tick/embargo, host mirror, state dict) and gates G1-G5."""

from __future__ import annotations

import json
import logging
import math
import threading

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from kasmina.errors import IllegalTransitionError
from kasmina.manager.config import KasminaConfig
from kasmina.seeds.columns import blueprint_hash
from kasmina.seeds.gates import (
    ALPHA_COMPLETE,
    SeedEvaluation,
    benefit_score,
    count_flops,
    gate_g1_kernel_ready,
    gate_g2_isolated_training,
    gate_g3_compatibility,
    gate_g3_probed,
    gate_g4_alpha,
    gate_g5_performance,
    sigmoid_alpha,
)
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import (
    GATE_FOR_TRANSITION,
    LEGAL_TRANSITIONS,
    NUM_STATE_COLUMNS,
    SeedStage,
    StateColumn,
    TransitionCode,
    checked_row,
    parse_gate,
    parse_stage,
)
from kasmina.utils.telemetry import MemorySink, TelemetryReporter

S = SeedStage
MAIN_PATH = [S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION, S.ACTIVE]


def _row(stage: SeedStage, embargo: int = 0) -> list[int]:
    row = [0] * NUM_STATE_COLUMNS
    row[StateColumn.LIFECYCLE_STAGE] = int(stage)
    row[StateColumn.EMBARGO_COUNTER] = embargo
    row[StateColumn.LAST_GATE] = 2
    row[StateColumn.EPOCHS_IN_STATE] = 7
    return row


def _mirror_matches(table: GPUStateTensor) -> bool:
    stages = table.state_tensor[:, StateColumn.LIFECYCLE_STAGE].tolist()
    epochs = table.state_tensor[:, StateColumn.EPOCHS_IN_STATE].tolist()
    mirror_epochs = [table.epochs_in_state(i) for i in range(table.num_seeds)]
    return stages == [int(s) for s in table.stages()] and epochs == mirror_epochs


def test_parse_stage_and_gate() -> None:
    assert parse_stage("grafting") is S.GRAFTING
    assert parse_stage("SEED_STAGE_ACTIVE") is S.ACTIVE
    assert parse_stage(9) is S.QUARANTINE
    assert parse_gate("G3") == 3 and parse_gate(5) == 5 and parse_gate(None) is None
    for bad in ("BLOOMING", 11, -1, True, 2.0):
        with pytest.raises(ValueError):
            parse_stage(bad)  # type: ignore[arg-type]
    assert parse_gate(" g2 ") == 2
    # A gate string is "G" and a number: "13" or "X3" is no "G3", "G" alone no gate.
    for bad_gate in ("G0", "G6", 6, "x", 1.5, "3", "13", "X3", "G", "G-1"):
        with pytest.raises(ValueError, match="gate"):
            parse_gate(bad_gate)  # type: ignore[arg-type]


def test_a_checked_row_takes_exactly_the_int32_range() -> None:
    """A restore writes what ``checked_row`` passes into the int32 table: a value just past
    either end of int32 is refused by the check, before a load writes anything, and both ends
    themselves are restored as they are."""
    table = GPUStateTensor(1, "cpu")
    row = [0] * NUM_STATE_COLUMNS
    for value in (-(2**31), 2**31 - 1):
        row[StateColumn.GATE_SCORE] = value
        table.restore_row(0, checked_row(row))
        assert table.read_row(0)["GATE_SCORE"] == value
    for value in (-(2**31) - 1, 2**31):
        row[StateColumn.GATE_SCORE] = value
        with pytest.raises(ValueError, match="int32"):
            checked_row(row)


def test_constructor_rejects_bad_sizes() -> None:
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError):
            GPUStateTensor(bad, "cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        GPUStateTensor(2, "cpu", embargo_epochs=-1)
    table = GPUStateTensor(3, "cpu")
    assert table.state_tensor.shape == (3, 10) and table.state_tensor.dtype == torch.int32
    assert table.stages() == [S.DORMANT] * 3


def test_main_path_records_gates_and_resets_epochs() -> None:
    table = GPUStateTensor(2, "cpu")
    table.tick()
    assert table.epochs_in_state(0) == 1
    for stage in MAIN_PATH:
        source = table.stage(0)
        table.update_seed_state(0, stage)
        row = table.read_row(0)
        assert row["LIFECYCLE_STAGE"] == int(stage) and table.stage(0) is stage
        assert row["LAST_GATE"] == GATE_FOR_TRANSITION[(source, stage)]
        assert row["EPOCHS_IN_STATE"] == 0 == table.epochs_in_state(0)
    assert table.stage(1) is S.DORMANT
    assert table.counters["applied"] == len(MAIN_PATH) and table.illegal_transitions == 0
    assert _mirror_matches(table)


def test_update_seed_state_sets_epochs_and_explicit_gate() -> None:
    table = GPUStateTensor(1, "cpu")
    table.update_seed_state(0, "ISOLATED_INIT", epochs_in_state=4, last_gate="G5")
    row = table.read_row(0)
    assert row["EPOCHS_IN_STATE"] == 4 == table.epochs_in_state(0)
    assert row["LAST_GATE"] == 5
    with pytest.raises(IndexError):
        table.update_seed_state(1, S.ISOLATED_INIT)
    with pytest.raises(ValueError):
        table.update_seed_state(0, "NOT_A_STAGE")


def test_the_specifications_names_for_the_table_and_its_update() -> None:
    """Controller code written against the original specification reads the column and stage
    tables by name and passes ``seed_idx=`` / ``lifecycle_stage=`` by keyword."""
    table = GPUStateTensor(2, "cpu")
    columns = ["LIFECYCLE_STAGE", "BLUEPRINT_ID", "EPOCHS_IN_STATE", "LAST_GATE", "ALPHA_BLEND"]
    columns += ["PERFORMANCE_GATE", "EMBARGO_COUNTER", "READY_FLAG", "REGION_ID", "GATE_SCORE"]
    assert dict(table.STATE_COLUMNS) == {name: i for i, name in enumerate(columns)}
    assert table.LIFECYCLE_STATES["TERMINATED"] == 10 and len(table.LIFECYCLE_STATES) == 11
    assert [table.LIFECYCLE_STATES[s.name] for s in S] == list(range(11))
    with pytest.raises(TypeError):
        table.STATE_COLUMNS["LAST_GATE"] = 0  # shared by every table: read-only
    table.update_seed_state(seed_idx=1, lifecycle_stage="ISOLATED_INIT", epochs_in_state=2)
    row = table.state_tensor[1]
    assert row[table.STATE_COLUMNS["LIFECYCLE_STAGE"]] == table.LIFECYCLE_STATES["ISOLATED_INIT"]
    assert row[table.STATE_COLUMNS["EPOCHS_IN_STATE"]] == 2 and table.stage(0) is S.DORMANT


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_update_seed_state_with_bad_epochs_changes_nothing(bad: object) -> None:
    table = GPUStateTensor(1, "cpu")
    before = table.state_tensor.clone()
    with pytest.raises(ValueError, match="epochs_in_state"):
        table.update_seed_state(0, "ISOLATED_INIT", epochs_in_state=bad)  # type: ignore[arg-type]
    assert table.stage(0) is S.DORMANT and table.counters["applied"] == 0
    assert torch.equal(table.state_tensor, before)


@pytest.mark.parametrize("source", list(SeedStage))
def test_every_illegal_transition_is_rejected_and_counted(source: SeedStage) -> None:
    sink = MemorySink()
    table = GPUStateTensor(1, "cpu", telemetry=TelemetryReporter(sinks=[sink]))
    illegal = [t for t in SeedStage if t not in LEGAL_TRANSITIONS[source]]
    for n, target in enumerate(illegal, start=1):
        table.restore_row(0, _row(source))
        before = table.state_tensor.clone()
        codes = table.batch_state_update([(0, target)])
        assert codes == [TransitionCode.ILLEGAL]
        assert torch.equal(table.state_tensor, before), f"{source.name}->{target.name} changed"
        assert table.stage(0) is source and table.epochs_in_state(0) == 7
        assert table.illegal_transitions == 2 * n - 1
        with pytest.raises(IllegalTransitionError):
            table.update_seed_state(0, target)
        assert table.illegal_transitions == 2 * n
        assert torch.equal(table.state_tensor, before)
    events = sink.events("lifecycle.transition_rejected")
    assert len(events) == 2 * len(illegal)
    if illegal:
        assert events[0].labels["from"] == source.name and events[0].labels["code"] == "ILLEGAL"
    for target in LEGAL_TRANSITIONS[source]:  # and every legal one applies
        table.restore_row(0, _row(source))
        assert table.batch_state_update([(0, target)]) == [TransitionCode.APPLIED]
        assert table.stage(0) is target


def test_batch_codes_out_of_range_duplicates_and_partial_application(caplog) -> None:
    table = GPUStateTensor(4, "cpu")
    with caplog.at_level(logging.WARNING, logger="kasmina.seeds.table"):
        codes = table.batch_state_update(
            [(0, S.ISOLATED_INIT), (1, S.ISOLATED_INIT), (1, S.TERMINATED), (9, S.ISOLATED_INIT),
             (2, S.ACTIVE), (3, "TERMINATED")]
        )  # fmt: skip
    assert codes == [
        TransitionCode.APPLIED,
        TransitionCode.DUPLICATE,
        TransitionCode.DUPLICATE,
        TransitionCode.OUT_OF_RANGE,
        TransitionCode.ILLEGAL,
        TransitionCode.APPLIED,
    ]
    assert table.stages() == [S.ISOLATED_INIT, S.DORMANT, S.DORMANT, S.TERMINATED]
    assert table.counters["duplicate"] == 2 and table.counters["out_of_range"] == 1
    assert table.illegal_transitions == 1 and table.counters["applied"] == 2
    assert "rejected (illegal)" in caplog.text and "out_of_range" in caplog.text
    assert _mirror_matches(table)
    assert table.batch_state_update([]) == []
    with pytest.raises(ValueError):
        table.batch_state_update([(0, S.COMPATIBILITY_CHECK)], gates=[2, 3])
    assert table.stage(0) is S.ISOLATED_INIT  # malformed input changed nothing


def test_batch_gates_explicit_and_default() -> None:
    table = GPUStateTensor(2, "cpu")
    table.batch_state_update([(0, S.ISOLATED_INIT), (1, S.ISOLATED_INIT)], gates=[None, "G4"])
    assert table.read_row(0)["LAST_GATE"] == 1  # the transition's own gate
    assert table.read_row(1)["LAST_GATE"] == 4


def test_tick_embargo_and_ready_flag() -> None:
    table = GPUStateTensor(3, "cpu", embargo_epochs=2)
    for stage in (S.ISOLATED_INIT, S.HARVESTING, S.COOLDOWN):
        table.update_seed_state(0, stage)
    assert table.read_row(0)["EMBARGO_COUNTER"] == 2
    with pytest.raises(IllegalTransitionError):
        table.update_seed_state(0, S.RECYCLING)  # under embargo
    table.tick()
    assert table.get_ready_seeds().tolist() == []
    assert table.batch_state_update([(0, S.RECYCLING)]) == [TransitionCode.ILLEGAL]
    table.tick()
    assert table.read_row(0)["EMBARGO_COUNTER"] == 0
    assert table.get_ready_seeds().tolist() == [0]
    assert table.epochs_in_state(0) == 2 and table.epochs_in_state(2) == 2
    table.update_seed_state(0, S.RECYCLING)
    assert table.read_row(0)["READY_FLAG"] == 0
    table.tick()
    assert table.get_ready_seeds().tolist() == [0]  # RECYCLING -> DORMANT is due
    table.update_seed_state(0, S.DORMANT)
    table.tick()
    assert table.get_ready_seeds().tolist() == []
    assert table.illegal_transitions == 2
    assert _mirror_matches(table)


def test_tick_and_updates_on_the_triton_kernels(triton_backend) -> None:
    table = GPUStateTensor(4, "cpu", embargo_epochs=1)
    codes = table.batch_state_update([(0, S.ISOLATED_INIT), (1, S.ACTIVE), (5, S.DORMANT)])
    assert codes == [TransitionCode.APPLIED, TransitionCode.ILLEGAL, TransitionCode.OUT_OF_RANGE]
    table.update_seed_state(0, S.HARVESTING)
    table.update_seed_state(0, S.COOLDOWN)
    table.tick()
    assert table.get_ready_seeds().tolist() == [0]
    assert _mirror_matches(table)


def test_observers_see_applied_transitions_only_and_are_weak() -> None:
    table = GPUStateTensor(2, "cpu")
    seen: list[tuple[int, SeedStage, SeedStage]] = []

    class Watcher:
        def on(self, idx: int, old: SeedStage, new: SeedStage) -> None:
            seen.append((idx, old, new))

    watcher = Watcher()
    table.observe(1, watcher.on)
    table.batch_state_update([(1, S.ISOLATED_INIT), (0, S.ISOLATED_INIT)])
    table.batch_state_update([(1, S.ACTIVE)])
    assert seen == [(1, S.DORMANT, S.ISOLATED_INIT)]
    del watcher
    table.update_seed_state(1, S.HARVESTING)  # the dead observer is dropped, not called
    assert len(seen) == 1


def test_unobserve_stops_an_observer_and_observe_drops_dead_entries() -> None:
    table = GPUStateTensor(2, "cpu")
    seen: list[tuple[int, SeedStage, SeedStage]] = []

    class Owner:
        def on(self, idx: int, old: SeedStage, new: SeedStage) -> None:
            seen.append((idx, old, new))

    owner, other = Owner(), Owner()
    table.observe(0, owner.on, follows_copies=False)
    table.observe(0, other.on)
    assert table.owned(0)
    table.unobserve(0, owner.on)  # that owner only, the other still hears
    table.unobserve(1, owner.on)  # a seed it never observed: nothing to do
    assert not table.owned(0)
    table.update_seed_state(0, S.ISOLATED_INIT)
    assert seen == [(0, S.DORMANT, S.ISOLATED_INIT)]
    table.unobserve(0, other.on)
    table.update_seed_state(0, S.COMPATIBILITY_CHECK)
    assert len(seen) == 1 and table._observers == {}
    for _ in range(5):  # owners that come and go without a transition leave no entries behind
        table.observe(1, Owner().on, follows_copies=False)
    assert len(table._observers[1]) == 1 and not table.owned(1)


def test_columns_and_restore() -> None:
    table = GPUStateTensor(2, "cpu")
    table.set_alpha(1, 0.4567)
    table.set_gate_score(1, 0.91)
    table.set_performance_gate(1, 0.8)
    table.set_blueprint(1, "artifact-a")
    table.set_region(1, 3)
    row = table.read_row(1)
    assert row["ALPHA_BLEND"] == 457 and row["GATE_SCORE"] == 910
    assert row["PERFORMANCE_GATE"] == 800 and row["REGION_ID"] == 3
    assert row["BLUEPRINT_ID"] == blueprint_hash("artifact-a") >= 0
    for column in (StateColumn.LIFECYCLE_STAGE, StateColumn.EPOCHS_IN_STATE):
        with pytest.raises(ValueError):
            table.set_column(0, column, 1)
    with pytest.raises(ValueError):
        table.set_gate_score(0, float("nan"))
    with pytest.raises(ValueError):
        table.restore_row(0, [0] * 9)
    with pytest.raises(ValueError):
        table.restore_row(0, [12] + [0] * 9)
    assert table.stage(0) is S.DORMANT


def test_resync_after_an_outside_write() -> None:
    table = GPUStateTensor(2, "cpu")
    table.state_tensor[1, StateColumn.LIFECYCLE_STAGE] = int(S.GRAFTING)
    assert table.stage(1) is S.DORMANT
    version = table.version
    table.resync()
    assert table.stage(1) is S.GRAFTING and table.version > version


def test_state_dict_round_trip_and_invalid_load() -> None:
    table = GPUStateTensor(3, "cpu", embargo_epochs=4)
    table.update_seed_state(2, S.ISOLATED_INIT)
    table.batch_state_update([(0, S.ACTIVE)])
    table.tick()
    saved = table.state_dict()
    other = GPUStateTensor(3, "cpu")
    other.load_state_dict(saved)
    assert torch.equal(other.state_tensor, table.state_tensor)
    assert other.stages() == table.stages() and other.epochs_in_state(2) == 1
    assert other.embargo_epochs == 4 and other.illegal_transitions == 1
    before = other.state_tensor.clone()
    bad_stage = saved["state_tensor"].clone()
    bad_stage[0, StateColumn.LIFECYCLE_STAGE] = 42
    for bad, reason in (
        ({"state_tensor": bad_stage}, "stage value 42 is outside"),
        ({"state_tensor": torch.zeros(2, 10, dtype=torch.int32)}, r"shape \(3, 10\)"),
        ({"state_tensor": torch.zeros(3, 10, dtype=torch.int64)}, "must be int32"),
    ):
        with pytest.raises(ValueError, match=reason):
            other.load_state_dict(bad)
    assert torch.equal(other.state_tensor, before) and other.stage(2) is S.ISOLATED_INIT


class _TableReads(TorchFunctionMode):
    """Counts ``.tolist()`` calls on a tensor or its views (on a GPU, each is a device sync)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.storage, self.reads = table.untyped_storage().data_ptr(), 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.Tensor.tolist and args[0].untyped_storage().data_ptr() == self.storage:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_a_state_dict_of_many_seeds_reads_the_table_once_and_never_stale() -> None:
    """A checkpoint saves every seed's row: one read of the table for all of them, not one per
    seed; any write in between (a column, a transition, a tick, a restore) is seen."""
    layer = KasminaLayer(nn.Linear(6, 16), 8, 2)
    table = layer.state_table
    with _TableReads(table.state_tensor) as mode:
        saved = layer.state_dict()
    assert mode.reads == 1
    writes = [
        lambda: table.set_alpha(3, 0.25),
        lambda: table.update_seed_state(3, S.ISOLATED_INIT),
        table.tick,
        lambda: table.restore_row(5, _row(S.ACTIVE, embargo=9)),
        lambda: table.load_state_dict({"state_tensor": torch.zeros_like(table.state_tensor)}),
    ]
    for write in writes:
        write()
        with _TableReads(table.state_tensor) as mode:
            saved = layer.state_dict()
        assert mode.reads == 1
        rows = [json.loads(bytes(v.tolist()))["row"] for k, v in saved.items() if "extra" in k]
        assert rows == table.state_tensor.tolist()  # every seed's row, as the table has it
    # A write the version counter does not see (through ``.data``, a collective into the
    # tensor): ``resync``, the documented remedy for an outside write, drops the host copy.
    table.state_tensor.data[2, StateColumn.ALPHA_BLEND] = 7
    table.resync()
    assert table.read_row(2)["ALPHA_BLEND"] == 7


# ----------------------------------------------------------------------------------- gates


def test_gate_g1_kernel_loaded_and_finite() -> None:
    assert not gate_g1_kernel_ready(None).passed
    kernel = nn.Linear(3, 3)
    result = gate_g1_kernel_ready(kernel)
    assert result.passed and result.gate == 1 and bool(result)
    with torch.no_grad():
        kernel.weight[0, 0] = float("inf")
    assert "non-finite" in gate_g1_kernel_ready(kernel).reason


def test_gate_g2_epochs_and_violations() -> None:
    assert not gate_g2_isolated_training(2, 3, 0).passed
    assert gate_g2_isolated_training(3, 3, 0).passed
    failed = gate_g2_isolated_training(10, 3, 1)
    assert not failed.passed and "violation" in failed.reason and failed.score == 10
    # 0 is a valid ``min_isolated_epochs`` (the config takes it): no isolated epoch is asked for;
    # a negative or NaN threshold cannot be compared and is refused.
    assert gate_g2_isolated_training(0, 0, 0).passed
    for bad in (-1, math.nan):
        with pytest.raises(ValueError, match="min_isolated_epochs"):
            gate_g2_isolated_training(5, bad, 0)


def test_gate_g3_shape_dtype_finite_and_counted_cost() -> None:
    out = torch.ones(2, 4)
    assert gate_g3_compatibility(out, (2, 4), torch.float32, 0.5, 1.0).passed
    assert "shape" in gate_g3_compatibility(out, (2, 5), torch.float32, 0.5, 1.0).reason
    assert "dtype" in gate_g3_compatibility(out, (2, 4), torch.float16, 0.5, 1.0).reason
    nan = out.clone()
    nan[0, 0] = float("nan")
    assert "finite" in gate_g3_compatibility(nan, (2, 4), torch.float32, 0.5, 1.0).reason
    huge = torch.full((2, 4), 3e38)  # every element finite, their sum not: still finite
    assert gate_g3_compatibility(huge, (2, 4), torch.float32, 0.5, 1.0).passed
    over = gate_g3_compatibility(out, (2, 4), torch.float32, 2.0, 1.0)
    assert not over.passed and "cost" in over.reason and over.score == 2.0
    assert not gate_g3_compatibility(None, (2, 4), torch.float32, None, 1.0).passed
    unknown = gate_g3_compatibility(out, (2, 4), torch.float32, None, 1.0)
    assert unknown.passed and "not checked" in unknown.reason
    # A slow probe is named, never refused: a timing depends on the machine's load.
    slow = gate_g3_compatibility(
        out, (2, 4), torch.float32, 0.5, 1.0, latency_ms=30.0, latency_budget_ms=5.0
    )
    assert slow.passed and "advisory" in slow.reason


def test_count_flops_is_a_function_of_shapes() -> None:
    mlp = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4))
    assert count_flops(mlp, torch.zeros(3, 4)) == 2 * 3 * (4 * 16 + 16 * 4)
    assert count_flops(mlp, torch.randn(3, 4)) == count_flops(mlp, torch.zeros(3, 4))
    bn = nn.BatchNorm1d(4)
    count_flops(bn, torch.randn(8, 4))  # train mode: the statistics it moved are put back
    assert torch.equal(bn.running_mean, torch.zeros(4))


def test_cpu_load_never_changes_g3() -> None:
    """The decision and score of G3 are identical with a busy-loop thread hogging the CPU."""
    seed = GradientIsolatedSeed(4, "s")
    torch.manual_seed(0)
    seed.attach_kernel(nn.Sequential(nn.Linear(4, 64), nn.GELU(), nn.Linear(64, 4)))
    for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK):
        seed.transition_to(stage)
    seed(torch.randn(32, 4))  # the COMPATIBILITY_CHECK forward probes the kernel

    def gate() -> tuple[bool, float, str]:
        # 1e-6 ms: every probe is "too slow", which must change nothing.
        result = seed.evaluate_gate(
            host_flops_per_element=16.0, max_cost_ratio=4.0, latency_budget_ms=1e-6
        )
        return result.passed, result.score, result.reason.split(" (advisory")[0]

    quiet = [gate() for _ in range(3)]
    stop = threading.Event()

    def hog() -> None:
        x = 0
        while not stop.is_set():
            x = (x * 31 + 7) % 1_000_003

    hogs = [threading.Thread(target=hog, daemon=True) for _ in range(4)]
    for thread in hogs:
        thread.start()
    try:
        busy = [gate() for _ in range(3)]
    finally:
        stop.set()
        for thread in hogs:
            thread.join()
    assert quiet == busy and len(set(quiet)) == 1
    # 2*(4*64 + 64*4) FLOPs per row over 4 output elements = 256 per element; the host 16.
    assert quiet[0] == (False, 16.0, quiet[0][2]) and "cost 16x" in quiet[0][2]
    assert seed.evaluate_gate(host_flops_per_element=16.0, max_cost_ratio=16.0).passed


def test_g3_without_a_probe_or_a_kernel_refuses_and_a_costless_host_is_unchecked() -> None:
    """G3 before the COMPATIBILITY_CHECK forward probed anything is refused (not an error), and
    so is a probe whose kernel is gone; a host whose counted FLOPs are 0 (an activation) has
    no cost to compare with: the cost is not checked, as for an unknown one."""
    seed = GradientIsolatedSeed(4, "s")
    seed.attach_kernel(nn.Linear(4, 4))
    for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK):
        seed.transition_to(stage)
    unprobed = seed.evaluate_gate(host_flops_per_element=16.0, max_cost_ratio=4.0)
    assert not unprobed.passed and "no compatibility probe" in unprobed.reason
    seed(torch.randn(8, 4))
    assert seed.evaluate_gate(host_flops_per_element=16.0, max_cost_ratio=4.0).passed
    for host in (0.0, -1.0):
        free = seed.evaluate_gate(host_flops_per_element=host, max_cost_ratio=1.0)
        assert free.passed and "not checked" in free.reason
    kernelless = gate_g3_probed(seed.probe_result, None, None, 4.0, math.inf, seed_id="s")
    assert not kernelless.passed and "no compatibility probe" in kernelless.reason


def test_gate_g4_alpha_reached_one() -> None:
    assert not gate_g4_alpha(0.99).passed
    assert not gate_g4_alpha(0.999).passed
    assert gate_g4_alpha(ALPHA_COMPLETE).passed and gate_g4_alpha(1.0).passed


def _evaluation(loss_with: float, loss_without: float, stage: S = S.STABILIZATION):
    return SeedEvaluation("s", stage, 1.0, loss_with, loss_without)


def test_benefit_maps_to_a_score_in_zero_one() -> None:
    assert benefit_score(0.0) == 0.5 and benefit_score(0.2) == pytest.approx(0.6)
    assert benefit_score(-5.0) == 0.0 and benefit_score(2.0) == 1.0
    assert benefit_score(float("nan")) == 0.0
    assert _evaluation(0.8, 1.0).benefit == pytest.approx(0.2)
    assert _evaluation(0.8, 1.0).score == pytest.approx(0.6)
    assert _evaluation(1.2, 1.0).score == pytest.approx(0.4)


def test_gate_g5_compares_the_measured_benefit() -> None:
    assert gate_g5_performance(_evaluation(0.8, 1.0), 0.6).passed
    low = gate_g5_performance(_evaluation(0.81, 1.0), 0.6)
    assert not low.passed and low.score == pytest.approx(0.595)
    never = gate_g5_performance(None, 0.0)
    assert not never.passed and "never evaluated" in never.reason
    stale = gate_g5_performance(_evaluation(0.1, 1.0, S.GRAFTING), 0.0)
    assert not stale.passed and "GRAFTING" in stale.reason
    assert not gate_g5_performance(_evaluation(float("nan"), 1.0), 0.0).passed


def test_the_grafting_schedule_is_exact_at_both_ends_of_a_long_schedule() -> None:
    """``sigmoid((step - total/2) / T)`` far out on either side (a 2,000-step schedule at
    T = 1: exp(1000) overflows a float): 0 and 1 as limits, no OverflowError."""
    assert sigmoid_alpha(0, 2000, 1.0) == 0.0 and sigmoid_alpha(2000, 2000, 1.0) == 1.0
    assert sigmoid_alpha(1000, 2000, 1.0) == 0.5
    assert sigmoid_alpha(990, 2000, 1.0) == pytest.approx(1 / (1 + math.exp(10)))


def test_the_default_grafting_schedule_blends_within_its_configured_steps() -> None:
    """At the defaults (100 steps, T = 10) alpha was 0.9933 at step 100: G4 refused a seed
    whose blend had run its configured length, and first passed at step 127."""
    config = KasminaConfig()
    steps, temperature = config.grafting_steps, config.grafting_temperature
    assert sigmoid_alpha(0, steps, temperature) < 0.5 / 1000  # enters at 0 in the table
    assert gate_g4_alpha(sigmoid_alpha(steps, steps, temperature)).passed
