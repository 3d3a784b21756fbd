"""G5 takes only what Kasmina measured as evidence, and the controller sees it in the
SystemStatePacket (docs/design.md §3): through the manager and its commands.

G5 refuses a seed never evaluated, one whose measured benefit is too low (under a live
``performance_gate``), one whose metric drops too far or cannot be read; a rollback drops the
evaluations of the abandoned timeline, a refused one keeps them; a culled seed reports no
measurement it no longer has. G3 decides on counted costs, identically on a busy machine and
under autocast, and keeps its probe through an empty batch. ``record_gate_score`` warns rarely
and refuses a score out of range before writing anything.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from kasmina.control.builders import make_rollback_command
from kasmina.leyline import SeedLifecycleStage, SystemStatePacket
from kasmina.manager import rollback as rollback_module
from kasmina.stages import SeedStage
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import SEED0, SEED1, Rig, S, make_config, run_command, to_stabilization

# ------------------------------------------------------------------------------------- G5


def test_g5_refuses_without_evidence_and_on_a_low_measured_benefit(
    tmp_path: Path, store: Path, keyring: Keyring, mlp
) -> None:
    # 600 per mille: fossilize only a seed that removes at least 20 % of the validation loss.
    rig = Rig(make_config(tmp_path, store, performance_gate=600), keyring)
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp) and rig.send("germinate", SEED1, mlp)
    to_stabilization(rig, [SEED0, SEED1])
    # Never evaluated: refused, whatever score the command claims.
    assert not rig.send("advance", SEED0, gate_score=1.0)
    assert "never evaluated" in manager.command_log[-1][3]
    assert manager.counters["gate_score_ignored"] == 1
    measured = manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)
    assert measured[SEED0].score < 0.6  # a near-identity seed after a few steps
    assert not rig.send("advance", SEED0, gate_score=1.0)
    assert "measured benefit" in manager.command_log[-1][3] and rig.stage(SEED0) == S.STABILIZATION
    # The same measurement against the default gate (no harm done) fossilizes it.
    manager.config.performance_gate = 0
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.ACTIVE


def test_a_live_performance_gate_reaches_the_column_a_controller_reads(rig: Rig, mlp) -> None:
    """``performance_gate`` is live: G5 applied a new one while the seeds' PERFORMANCE_GATE
    column, and their own ``evaluate_gate``, kept the one of their GERMINATE."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp) and rig.send("germinate", SEED1, mlp)
    to_stabilization(rig, [SEED0, SEED1])
    manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)
    table = manager.require_registry().table

    def column(sid: str) -> int:
        return table.read_row(manager.seed(sid).state_index)["PERFORMANCE_GATE"]

    assert column(SEED0) == column(SEED1) == 500
    manager.config.performance_gate = 1000  # only a seed that removes all the loss
    assert not rig.send("advance", SEED0) and "< 1.0000" in manager.command_log[-1][3]
    assert column(SEED0) == 1000 and column(SEED1) == 500  # the threshold G5 applied
    manager.end_epoch(1)
    assert column(SEED1) == 1000 and manager.seed(SEED1).performance_gate == 1.0


def test_a_rollback_drops_the_evaluation_of_the_abandoned_timeline(rig: Rig, mlp) -> None:
    """Evaluations are not checkpointed: one taken after the checkpoint measured weights the
    rollback threw away, so the restored seed must be evaluated again before G5."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    to_stabilization(rig, [SEED0])
    manager.end_epoch(1)  # the checkpoint: STABILIZATION, never evaluated
    rig.train(3)
    manager.config.performance_gate = 0
    manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)
    assert manager.seed(SEED0).evaluation is not None
    assert run_command(manager, rig.signed(make_rollback_command(1)))
    assert manager.seed(SEED0).evaluation is None and rig.stage(SEED0) == S.STABILIZATION
    assert not rig.send("advance", SEED0)
    assert "never evaluated" in manager.command_log[-1][3]
    manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)  # measured again
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.ACTIVE


def test_a_refused_rollback_keeps_the_evaluations(rig: Rig, mlp, monkeypatch) -> None:
    """All or nothing: a rollback refused late puts the seeds' state back, and with it the
    evaluations the state restore dropped on the way."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    to_stabilization(rig, [SEED0])
    manager.end_epoch(1)
    manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)
    evaluation = manager.seed(SEED0).evaluation
    assert evaluation is not None

    def fail(*args, **kwargs):
        raise RuntimeError("a late failure")

    monkeypatch.setattr(rollback_module, "_new_monitors", fail)
    assert not run_command(manager, rig.signed(make_rollback_command(1)))
    assert rig.stage(SEED0) == S.STABILIZATION and manager.seed(SEED0).evaluation is evaluation


def test_g5_refuses_a_loss_benefit_that_costs_the_measured_metric(
    tmp_path: Path, store: Path, keyring: Keyring, mlp
) -> None:
    """Through the command path: the metric evaluate_seeds measured reaches G5, which refuses a
    seed whose metric drops by more than g5_max_metric_drop, names both numbers in the command
    log and the lifecycle.gate event, and leaves it in STABILIZATION."""
    rig = Rig(make_config(tmp_path, store, performance_gate=0), keyring)
    manager = rig.manager
    assert manager.config.g5_max_metric_drop == 0.0
    assert rig.send("germinate", SEED0, mlp)
    to_stabilization(rig, [SEED0])
    batches = [(rig.x, rig.y)]
    benefit = manager.evaluate_seeds(batches, loss_fn=F.cross_entropy)[SEED0].benefit
    assert benefit != 0.0
    # A "higher is better" metric that moves against the loss whichever way the seed moved
    # it: the seed costs metric, at a loss score the gate (0 per mille) accepts.
    sign = 1.0 if benefit > 0 else -1.0
    measured = manager.evaluate_seeds(
        batches, loss_fn=F.cross_entropy, metric_fn=lambda o, t: sign * F.cross_entropy(o, t)
    )[SEED0]
    assert measured.metric_change < 0
    event = rig.sink.events("seed.benefit")[-1]
    assert event.labels["metric_with"] == f"{measured.metric_with:.6g}"
    assert not rig.send("advance", SEED0)
    reason = manager.command_log[-1][3]
    assert f"{measured.metric_with:.4f} with it" in reason
    assert f"{measured.metric_without:.4f} without" in reason and "g5_max_metric_drop" in reason
    gate = rig.sink.events("lifecycle.gate")[-1]
    assert gate.labels["gate"] == "G5" and gate.labels["passed"] == "false"
    assert f"{measured.metric_with:.4f} with it" in gate.labels["reason"]
    assert rig.stage(SEED0) == S.STABILIZATION
    packet = manager.system_state().training_metrics
    assert packet[f"seed/{SEED0}/metric_with"] == pytest.approx(measured.metric_with, rel=1e-6)
    assert packet[f"seed/{SEED0}/metric_without"] == pytest.approx(
        measured.metric_without, rel=1e-6
    )
    # A tolerance as wide as the drop lets it through.
    manager.config.g5_max_metric_drop = -measured.metric_change + 1e-6
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.ACTIVE


def test_g5_without_a_metric_decides_on_the_loss_alone(
    tmp_path: Path, store: Path, keyring: Keyring, mlp
) -> None:
    rig = Rig(make_config(tmp_path, store, performance_gate=0), keyring)
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    to_stabilization(rig, [SEED0])
    measured = manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)[SEED0]
    assert math.isnan(measured.metric_with) and math.isnan(measured.metric_without)
    assert "metric_with" not in rig.sink.events("seed.benefit")[-1].labels
    assert f"seed/{SEED0}/metric_with" not in manager.system_state().training_metrics
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.ACTIVE
    assert "metric" not in rig.sink.events("lifecycle.gate")[-1].labels["reason"]


def test_a_non_finite_metric_is_refused_and_reported_not_dropped(
    tmp_path: Path, store: Path, keyring: Keyring, mlp
) -> None:
    """A metric_fn NaN on one validation batch: G5 refuses the seed through the command path,
    and the NaN metric reaches the SystemStatePacket, the seed.benefit event and the gauges
    (as NaN, "nan" in labels) instead of disappearing as if no metric had been asked for."""
    rig = Rig(make_config(tmp_path, store, performance_gate=0), keyring)
    manager = rig.manager
    manager.config.g5_max_metric_drop = math.inf  # only a metric that cannot be read refuses
    assert rig.send("germinate", SEED0, mlp)
    to_stabilization(rig, [SEED0])
    batches = [(rig.x[:8], rig.y[:8]), (rig.x[8:], rig.y[8:])]
    undefined = batches[1][0]

    def accuracy(output: torch.Tensor, targets: torch.Tensor) -> float:
        if seen[-1] is undefined:  # a batch the metric is undefined on
            return math.nan
        return (output.argmax(-1) == targets).float().mean().item()

    seen: list[torch.Tensor] = []

    def loader():
        for x, t in batches:
            seen.append(x)
            yield x, t

    measured = manager.evaluate_seeds(loader(), loss_fn=F.cross_entropy, metric_fn=accuracy)
    evaluation = measured[SEED0]
    assert evaluation.metric_given and math.isnan(evaluation.metric_with)
    labels = rig.sink.events("seed.benefit")[-1].labels
    assert labels["metric_with"] == "nan" and labels["metric_without"] == "nan"
    packet = manager.system_state()
    assert packet == SystemStatePacket.FromString(packet.SerializeToString())
    assert math.isnan(packet.training_metrics[f"seed/{SEED0}/metric_with"])
    assert math.isnan(packet.training_metrics[f"seed/{SEED0}/metric_without"])
    gauges = {m.name: m.value for m in manager.export_leyline_telemetry().metrics}
    assert math.isnan(gauges["seed.metric_with"]) and math.isnan(gauges["seed.metric_without"])
    assert not rig.send("advance", SEED0)
    assert "not finite" in manager.command_log[-1][3] and rig.stage(SEED0) == S.STABILIZATION
    # Measured again with a metric that is defined everywhere, the same seed passes.
    manager.evaluate_seeds(batches, loss_fn=F.cross_entropy, metric_fn=lambda o, t: 1.0)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.ACTIVE


def test_system_state_packet_carries_the_measured_benefit(rig: Rig, mlp) -> None:
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    to_stabilization(rig, [SEED0])
    measured = manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)[SEED0]
    assert [e.labels["seed_id"] for e in rig.sink.events("seed.benefit")] == [SEED0]
    manager.end_epoch(1, {"val_accuracy": 0.75, "val_loss": 0.5, "top5": 0.9})
    packet = manager.system_state()
    assert isinstance(packet, SystemStatePacket)
    assert packet == SystemStatePacket.FromString(packet.SerializeToString())
    assert packet.version == 1 and packet.current_epoch == 1
    assert packet.global_step == manager.global_step
    assert packet.validation_accuracy == pytest.approx(0.75)
    assert packet.validation_loss == pytest.approx(0.5)
    assert packet.seed_stages[SEED0] == SeedLifecycleStage.SEED_STAGE_STABILIZATION
    assert packet.seed_stages[SEED1] == SeedLifecycleStage.SEED_STAGE_DORMANT
    metrics = packet.training_metrics
    assert metrics[f"seed/{SEED0}/benefit"] == pytest.approx(measured.benefit, rel=1e-6)
    assert metrics[f"seed/{SEED0}/gate_score"] == pytest.approx(measured.score, rel=1e-6)
    assert metrics[f"seed/{SEED0}/alpha"] == 1.0
    assert metrics[f"seed/{SEED0}/epochs_in_stage"] == 1.0
    assert f"seed/{SEED1}/benefit" not in metrics and metrics["val/top5"] == pytest.approx(0.9)
    # A synonym beside the key that fills a field (a training accuracy passed as "accuracy"
    # next to "val_accuracy") is a metric of its own: it was dropped from the packet.
    manager.end_epoch(2, {"val_accuracy": 0.6, "accuracy": 0.9, "loss": 0.4, "val_acc": 0.5})
    packet = manager.system_state()
    assert packet.validation_accuracy == pytest.approx(0.6)
    assert packet.validation_loss == pytest.approx(0.4)
    val = {k: v for k, v in packet.training_metrics.items() if k.startswith("val/")}
    assert val == {"val/accuracy": pytest.approx(0.9), "val/val_acc": pytest.approx(0.5)}
    # ... and in the full telemetry packet.
    names = {m.name for m in manager.export_leyline_telemetry().metrics}
    assert {"seed.benefit", "seed.loss_with", "seed.loss_without"} <= names


def test_a_culled_seed_reports_no_alpha_score_or_measurement_it_no_longer_has(
    tmp_path: Path, store: Path, keyring: Keyring, mlp
) -> None:
    """Culled from STABILIZATION, the seed passes the host through with no kernel, yet reported
    alpha 1, its old benefit and gate score (the table's ALPHA_BLEND 1000), and once recycled
    its row still named the culled artifact. The field report keeps what it had."""
    rig = Rig(make_config(tmp_path, store), keyring)
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    to_stabilization(rig, [SEED0])
    manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)
    record = manager.require_registry()[SEED0]
    assert f"seed/{SEED0}/benefit" in manager.system_state().training_metrics
    assert rig.send("cull", SEED0, embargo_epochs=0)
    assert record.stage == SeedStage.COOLDOWN and record.seed.field_report["alpha"] == 1.0
    metrics = manager.system_state().training_metrics
    assert metrics[f"seed/{SEED0}/alpha"] == 0.0
    assert not any(k.startswith(f"seed/{SEED0}/benefit") for k in metrics)
    row = record.seed.state_table.read_row(record.index)
    assert row["ALPHA_BLEND"] == 0 and row["GATE_SCORE"] == 0
    for epoch in (1, 2):
        rig.train(1)
        manager.end_epoch(epoch)
    assert record.stage == SeedStage.DORMANT
    assert record.seed.state_table.read_row(record.index)["BLUEPRINT_ID"] == 0


# ------------------------------------------------------------------------------------- G3


def _to_compatibility_check(rig: Rig, artifact: str):
    """SEED0 germinated with ``artifact``, trained, and in COMPATIBILITY_CHECK after a step
    that probed it; its record."""
    assert rig.send("germinate", SEED0, artifact)
    rig.train(2)
    rig.manager.end_epoch(0)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.COMPATIBILITY_CHECK
    rig.train(1)
    return rig.manager.require_registry()[SEED0]


def test_g3_decides_identically_on_a_busy_machine(rig: Rig, mlp) -> None:
    """The executor's G3 on a real kernel: same decision and score with four busy threads."""
    manager = rig.manager
    record = _to_compatibility_check(rig, mlp)
    manager.config.latency_budget_ms = 1e-6  # every probe "too slow": advisory only

    def g3() -> tuple[bool, float]:
        result = manager.execution.evaluate_gate(record, S.GRAFTING)
        assert result.gate == 3
        return result.passed, result.score

    quiet = [g3() for _ in range(3)]
    stop = threading.Event()

    def hog() -> None:
        x = 0
        while not stop.is_set():
            x = (x * 31 + 7) % 1_000_003

    threads = [threading.Thread(target=hog, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        busy = [g3() for _ in range(3)]
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    # ResidualMLP(2, 4) on a chunk of Linear(8, 4): 2*(2*4 + 4*2)/2 = 16 FLOPs per element,
    # the host 2*8 = 16: cost ratio 1.
    assert quiet == busy == [(True, 1.0)] * 3
    manager.config.max_seed_cost_ratio = 0.5
    assert g3() == (False, 1.0)


def test_g3_counts_costs_of_a_host_trained_under_autocast(
    tmp_path: Path, store: Path, keyring: Keyring, mlp
) -> None:
    """Under ``torch.autocast`` the slot saw its input in autocast's dtype and records the
    host's own; counting the host's and the kernel's FLOPs outside autocast must work, so G3's
    cost limit holds whatever the training precision (the counts depend on shapes only)."""
    rig = Rig(make_config(tmp_path, store), keyring, record=False)  # first forward: autocast
    manager = rig.manager

    def train(steps: int) -> None:
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = rig.model(rig.x)
            manager.backward(F.cross_entropy(logits.float(), rig.y))
            manager.step()

    train(1)
    assert rig.slot.input_spec[1] == torch.float32  # the host's dtype, not autocast's bf16
    assert rig.send("germinate", SEED0, mlp)
    train(2)
    manager.end_epoch(0)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.COMPATIBILITY_CHECK
    train(1)
    record = manager.require_registry()[SEED0]
    manager.config.latency_budget_ms = 1e9  # no latency limit (finite, as the config takes)
    result = manager.execution.evaluate_gate(record, S.GRAFTING)
    assert (result.gate, result.passed, result.score) == (3, True, 1.0)  # counted, as in fp32
    manager.config.max_seed_cost_ratio = 0.5
    assert not manager.execution.evaluate_gate(record, S.GRAFTING).passed


def test_an_empty_batch_keeps_g3s_probe_and_the_slots_record(
    tmp_path: Path, store: Path, keyring: Keyring, mlp
) -> None:
    """A forward on an empty batch (the last batch of a filtered validation set) in
    COMPATIBILITY_CHECK replaced the seed's probe with one of 0 elements, whose cost per
    element read as 0: G3 then passed a kernel over the cost budget. The empty call keeps the
    probe there is; and a slot records nothing from an empty call (its cost per element would
    be unknown, and the cost check off)."""
    rig = Rig(make_config(tmp_path, store), keyring, record=False)
    manager = rig.manager
    with torch.no_grad():
        rig.model(rig.x[:0])  # the slot's first call: empty, records nothing
    assert rig.slot.output_contract is None and rig.slot.input_spec is None
    rig.train(1)
    assert rig.slot.input_spec[0][0] == len(rig.x)
    record = _to_compatibility_check(rig, mlp)
    manager.config.latency_budget_ms = 1e9
    manager.config.max_seed_cost_ratio = 0.5  # the kernel costs 1x the host
    assert not manager.execution.evaluate_gate(record, S.GRAFTING).passed
    rig.model.eval()
    with torch.no_grad():
        rig.model(rig.x[:0])
    rig.model.train()
    assert record.seed.probe_result.output.numel() > 0
    assert not manager.execution.evaluate_gate(record, S.GRAFTING).passed


# ------------------------------------------------------------------------ record_gate_score


def test_a_gate_score_recorded_every_step_warns_rarely(rig: Rig, caplog) -> None:
    """``record_gate_score`` warned on every call: a trainer recording one per step flooded
    the log. The first call warns, later ones are counted and logged at DEBUG."""
    import logging

    with caplog.at_level(logging.DEBUG, logger="kasmina"):
        for score in (0.1, 0.2, 0.3):
            rig.manager.record_gate_score(SEED0, score)
    said = [r for r in caplog.records if "record_gate_score" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert rig.manager.seed(SEED0).gate_score == 0.3


def test_a_gate_score_out_of_range_is_refused_before_anything_is_written(rig: Rig) -> None:
    """``record_gate_score(seed, 3e6)`` overflowed the table's int32 after the seed had kept the
    score and the counter had moved (a later field report carried a score the table never
    held); negative scores passed. Scores are in [0, 1], checked first; nothing changes."""
    manager = rig.manager
    manager.record_gate_score(SEED0, 0.7)
    seed, table = manager.seed(SEED0), manager.require_registry().table
    for bad in (3e6, 1e300, -5.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"gate score must be a number in \[0, 1\]"):
            manager.record_gate_score(SEED0, bad)
        assert seed.gate_score == 0.7 and table.read_row(seed.state_index)["GATE_SCORE"] == 700
        assert manager.counters["gate_scores_recorded"] == 1
    with pytest.raises(ValueError, match="gate_score must be within"):
        seed.gate_score = 3e6  # past the table's int32: refused first, the seed keeps its score
    assert seed.gate_score == 0.7
