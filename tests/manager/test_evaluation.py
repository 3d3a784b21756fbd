"""Kasmina measures a seed's worth itself (evaluate_seeds), G5 takes only that as evidence, and
the controller sees it in the SystemStatePacket (docs/design.md §3)."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kasmina.control.builders import make_rollback_command
from kasmina.leyline import SeedLifecycleStage, SystemStatePacket
from kasmina.manager import rollback as rollback_module
from kasmina.manager.evaluation import evaluate_seeds
from kasmina.manager.slots import SlotRegistry
from kasmina.seeds.gates import gate_g5_performance
from kasmina.seeds.inject import attach
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.side_effects import kept_buffers
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import SeedStage
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import SEED0, SEED1, Rig, make_config, run_command

S = SeedStage


class Scale(nn.Module):
    """A known kernel: ``x * factor``."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class NoisyShift(nn.Module):
    """A known kernel that also draws from the global RNG (its draw does not change its value)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1.0 + 0.0 * torch.rand(())


def _tiny() -> tuple[nn.Sequential, KasminaLayer, SlotRegistry]:
    torch.manual_seed(0)
    slot = KasminaLayer(nn.Linear(3, 6), 3, 2, layer_id="fc")
    model = nn.Sequential(slot, nn.Dropout(0.5))
    registry = SlotRegistry(model, [slot])
    seed0, seed1, seed2 = slot.seeds
    seed0.attach_kernel(Scale(2.0))
    seed1.attach_kernel(NoisyShift())
    seed2.attach_kernel(Scale(-1.0))
    for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION):
        seed0.transition_to(stage)
    for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING):
        seed1.transition_to(stage)
    seed1.update_alpha_blending(10, 20, 4.0)  # alpha 0.5
    seed2.transition_to(S.ISOLATED_INIT)  # its output never reaches the host's value
    return model, slot, registry


def test_evaluate_seeds_matches_a_hand_computation_and_changes_nothing() -> None:
    model, slot, registry = _tiny()
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(n, 3, generator=gen), torch.randn(n, 6, generator=gen)) for n in (4, 2)]
    model.train()
    weights = {k: v.clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    stages, alphas = slot.stages(), [s.alpha_value for s in slot.seeds]
    forwards = []
    slot.host.register_forward_hook(lambda *_: forwards.append(1))
    rng = torch.get_rng_state()

    results = evaluate_seeds(
        registry, batches, F.mse_loss, metric_fn=lambda o, t: (o - t).abs().mean()
    )

    # 2 batches x (1 + 2 contributing seeds); seed 2 (ISOLATED_INIT) costs no forward.
    assert len(forwards) == 2 * 3
    assert torch.equal(torch.get_rng_state(), rng)  # no global random number drawn
    assert model.training and all(m.training for m in model.modules())
    assert slot.stages() == stages and [s.alpha_value for s in slot.seeds] == alphas
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(torch.equal(v, now[k]) for k, v in weights.items())  # gate scores aside

    def by_hand(chunks: tuple[bool, bool]) -> float:
        total = 0.0
        for x, t in batches:
            with torch.no_grad():
                h = slot.host(x)
            h0, h1, h2 = h.split(2, dim=-1)
            c0 = 2.0 * h0 if chunks[0] else h0
            c1 = 0.5 * (h1 + 1.0) + 0.5 * h1 if chunks[1] else h1
            total += len(x) * F.mse_loss(torch.cat([c0, c1, h2], -1), t).item()
        return total / 6

    with_all = by_hand((True, True))
    expected = {
        "fc[0]": (with_all, by_hand((False, True))),
        "fc[1]": (with_all, by_hand((True, False))),
        "fc[2]": (with_all, with_all),
    }
    assert set(results) == set(expected)
    for sid, (loss_with, loss_without) in expected.items():
        ev = results[sid]
        assert ev.loss_with == pytest.approx(loss_with, rel=1e-6)
        assert ev.loss_without == pytest.approx(loss_without, rel=1e-6)
        assert ev.benefit == pytest.approx(1 - loss_with / loss_without, rel=1e-5, abs=1e-9)
        assert ev.score == pytest.approx(0.5 + 0.5 * max(-1.0, min(1.0, ev.benefit)))
        assert ev.samples == 6 and not math.isnan(ev.metric_with)
        seed = slot.seeds[int(sid[3])]
        assert seed.evaluation is ev and seed.gate_score == ev.score
        row = registry.table.read_row(seed.state_index)
        assert row["GATE_SCORE"] == round(ev.score * 1000)
    assert results["fc[0]"].stage == S.STABILIZATION and results["fc[1]"].alpha == 0.5
    assert results["fc[2]"].benefit == 0.0


class KeywordInputs(nn.Module):
    """A model called as Hugging Face models are: ``model(**batch)``, ``batch`` a mapping."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, scale: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.inner(features) * scale


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_a_seed_in_an_encoder_layer_is_measured_on_a_packed_batch() -> None:
    """``nn.TransformerEncoder`` in inference packs a batch with a padding mask into a nested
    tensor (its default): the ablation put the host's chunk back with dense tensor ops and
    raised, so such a seed could never be measured. On the padded form, as the slot grafts,
    the packed encoder measures the real positions as the dense one does."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, 8, generator=gen)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:], pad[2, 2:] = True, True
    measured = []
    for packed in (False, True):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=packed)
        (slot,) = attach(model, ["layers.1"], 2, 4)
        registry = SlotRegistry(model, [slot])
        slot.seed(0).attach_kernel(Scale(2.0))
        for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION):
            slot.seed(0).transition_to(stage)
        results = evaluate_seeds(
            registry, [((x, None, pad), None)], lambda out, _: out[~pad].pow(2).mean()
        )
        measured.append(results[slot.seed(0).seed_id])
    dense, packed_ = measured
    assert dense.faults == packed_.faults == 0
    assert packed_.loss_with != packed_.loss_without  # the seed's chunk was put back
    assert packed_.loss_with == pytest.approx(dense.loss_with, rel=1e-5)
    assert packed_.loss_without == pytest.approx(dense.loss_without, rel=1e-5)


def test_mapping_inputs_are_passed_as_keyword_arguments() -> None:
    model, _, registry = _tiny()
    gen = torch.Generator().manual_seed(5)
    x, t = torch.randn(4, 3, generator=gen), torch.randn(4, 6, generator=gen)
    want = evaluate_seeds(registry, [(x, t)], F.mse_loss)
    keyword = KeywordInputs(model)
    registry.model = keyword
    batch = {"scale": torch.ones(()), "features": x}  # a tokenizer's BatchEncoding is a Mapping
    got = evaluate_seeds(registry, [(batch, t)], F.mse_loss)
    assert set(got) == set(want)
    for sid, ev in want.items():
        assert got[sid].loss_with == ev.loss_with and got[sid].loss_without == ev.loss_without
        assert got[sid].samples == 4
    # Targets that show no batch size (a loss that reads labels from the batch itself): the
    # size is the first mapping value that has one, past the 0-d scale.
    sized = evaluate_seeds(registry, [(batch, None)], lambda out, _: F.mse_loss(out, t))
    assert all(ev.samples == 4 for ev in sized.values())


def test_an_empty_batch_weighs_nothing() -> None:
    """The last batch of a filtered loader can hold no sample. Its mean loss and metric are
    NaN (0/0), and ``0 * NaN`` made every measurement NaN, so G5 refused every seed."""
    model, _, registry = _tiny()
    gen = torch.Generator().manual_seed(7)
    x, t = torch.randn(4, 3, generator=gen), torch.randn(4, 6, generator=gen)

    def metric(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (o - t).abs().mean()

    want = evaluate_seeds(registry, [(x, t)], F.mse_loss, metric_fn=metric)
    got = evaluate_seeds(registry, [(x[:0], t[:0]), (x, t)], F.mse_loss, metric_fn=metric)
    assert set(got) == set(want)
    for sid, ev in want.items():
        assert math.isfinite(got[sid].loss_with) and math.isfinite(got[sid].metric_with)
        assert got[sid].loss_with == ev.loss_with and got[sid].loss_without == ev.loss_without
        assert got[sid].metric_with == ev.metric_with and got[sid].samples == 4
    with pytest.raises(ValueError, match=r"non-empty validation batch \(given 2, every one"):
        evaluate_seeds(registry, [(x[:0], t[:0])] * 2, F.mse_loss)


@pytest.mark.parametrize("which", ["loss_fn", "metric_fn"])
@pytest.mark.parametrize("result", ["1.0", None])
def test_a_loss_or_metric_that_is_no_number_is_refused(which: str, result: object) -> None:
    """A ``loss_fn`` returning the str ``"1.0"`` was read as 1.0 (``float()`` of it), a G5
    verdict on a value no one computed; ``None`` raised float()'s own TypeError. Each is a
    ``TypeError`` naming what the functions return, and no seed records an evaluation."""
    model, slot, registry = _tiny()
    x, t = torch.randn(4, 3), torch.randn(4, 6)
    fns = {"loss_fn": F.mse_loss, "metric_fn": F.mse_loss, which: lambda o, t: result}
    with pytest.raises(TypeError, match="must return a batch mean .* got"):
        evaluate_seeds(registry, [(x, t)], fns["loss_fn"], metric_fn=fns["metric_fn"])
    assert all(seed.evaluation is None for seed in slot.seeds)
    assert set(evaluate_seeds(registry, [(x, t)], F.mse_loss)) == {s.seed_id for s in slot.seeds}


def test_a_loss_or_metric_of_numpy_is_a_number() -> None:
    """A NumPy scalar or 0-d array (a metric computed with NumPy or scikit-learn) is a number."""
    import numpy as np

    model, slot, registry = _tiny()
    x, t = torch.randn(4, 3), torch.randn(4, 6)
    for value in (np.float32(0.5), np.array(0.5), 0.5):
        got = evaluate_seeds(registry, [(x, t)], F.mse_loss, metric_fn=lambda o, t, v=value: v)
        assert all(ev.metric_with == 0.5 for ev in got.values())


def test_no_live_seed_means_no_forward() -> None:
    slot = KasminaLayer(nn.Linear(3, 4), 2, 2, layer_id="fc")
    registry = SlotRegistry(nn.Sequential(slot), [slot])
    calls = []
    slot.host.register_forward_hook(lambda *_: calls.append(1))
    assert evaluate_seeds(registry, [(torch.zeros(1, 3), torch.zeros(1, 4))], F.mse_loss) == {}
    assert calls == []


def test_a_metric_nan_on_one_batch_is_recorded_and_refused_by_g5(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One NaN batch makes the metric's averages NaN; the evaluation still says a metric was
    asked for, so G5 refuses the seed (fail closed) instead of passing it on the loss alone."""
    _, slot, registry = _tiny()
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(4, 3, generator=gen), torch.randn(4, 6, generator=gen)) for _ in "abcd"]
    undefined = batches[2][0]

    def metric(output: torch.Tensor, _targets: torch.Tensor) -> torch.Tensor:
        return torch.tensor(math.nan) if current[0] is undefined else output[:, 0].mean()

    current: list[torch.Tensor] = []

    def loader():
        for x, t in batches:
            current[:] = [x]
            yield x, t

    clean = evaluate_seeds(registry, batches, F.mse_loss, lambda o, _t: o[:, 0].mean())["fc[0]"]
    assert clean.metric_given and math.isfinite(clean.metric_with)
    with caplog.at_level("WARNING", logger="kasmina.manager.evaluation"):
        ev = evaluate_seeds(registry, loader(), F.mse_loss, metric)["fc[0]"]
    assert "not finite on 1 of 4 validation batches" in caplog.text
    assert ev.metric_given and ev.metric_measured and ev.samples == 16
    assert math.isnan(ev.metric_with) and math.isnan(ev.metric_without)
    assert ev.loss_with == pytest.approx(clean.loss_with) and slot.seeds[0].evaluation is ev
    result = gate_g5_performance(ev, 0.0, max_metric_drop=math.inf)  # only the metric refuses
    assert not result.passed and "not finite" in result.reason
    assert gate_g5_performance(clean, 0.0, max_metric_drop=math.inf).passed
    unasked = evaluate_seeds(registry, batches, F.mse_loss)["fc[0]"]
    assert not unasked.metric_given and not unasked.metric_measured


# ------------------------------------------------------------------ through the manager


def to_stabilization(rig: Rig, seed_ids: list[str]) -> None:
    """ADVANCE through G2..G4, training in between (each seed was GERMINATEd)."""
    rig.train(2)
    rig.manager.end_epoch(0)
    for sid in seed_ids:
        assert rig.send("advance", sid) and rig.stage(sid) == S.COMPATIBILITY_CHECK
    rig.train(1)
    for sid in seed_ids:
        assert rig.send("advance", sid) and rig.stage(sid) == S.GRAFTING
    rig.train(5)
    for sid in seed_ids:
        assert rig.send("advance", sid) and rig.stage(sid) == S.STABILIZATION
    rig.train(1)


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


class NotFinite(nn.Module):
    """A kernel whose output is NaN on every input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * math.nan


class RaisesOnOdd(Scale):
    """``x * factor``, except on a batch of 7, where it raises."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 7:
            raise RuntimeError("odd batch")
        return super().forward(x)


class FrozenInTrainMode(nn.Module):
    """Batch norm that ``eval()`` cannot switch off, as in a kernel exported in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(2)

    def train(self, mode: bool = True) -> FrozenInTrainMode:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(x)


def _stabilizing(kernel: nn.Module) -> tuple[KasminaLayer, SlotRegistry]:
    """A three-seed slot whose seed 0 runs ``kernel`` in STABILIZATION, seed 1 ``x * 2``."""
    torch.manual_seed(0)
    slot = KasminaLayer(nn.Linear(3, 6), 3, 2, layer_id="fc")
    registry = SlotRegistry(nn.Sequential(slot), [slot])
    for seed, module in zip(slot.seeds, (kernel, Scale(2.0)), strict=False):
        seed.attach_kernel(module)
        for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION):
            seed.transition_to(stage)
    return slot, registry


def test_a_seed_not_finite_on_validation_data_is_refused_not_measured_as_harmless() -> None:
    """The fault guard puts the host's output in place of a NaN, so "with" equals "without":
    read as a benefit of 0, the default gate would fossilize the seed. Non-finite fails closed."""
    slot, registry = _stabilizing(NotFinite())
    seed = slot.seeds[0]
    batches = [(torch.randn(4, 3), torch.randn(4, 6)), (torch.randn(3, 3), torch.randn(3, 6))]

    ev = evaluate_seeds(registry, batches, F.mse_loss)["fc[0]"]

    assert ev.loss_with == ev.loss_without  # what the guard did
    assert ev.faults == 2 and ev.last_fault == "nonfinite: non-finite output"
    assert math.isnan(ev.benefit) and ev.score == 0.0 and seed.gate_score == 0.0
    result = seed.advance(performance_gate=0.5)  # the default gate
    assert not result.passed and seed.stage == S.STABILIZATION
    assert "faulted while measured, on 2 validation batch(es)" in result.reason
    assert "non-finite" in result.reason
    # The healthy seed beside it is measured as usual; the evaluation left no flag behind.
    assert evaluate_seeds(registry, batches, F.mse_loss)["fc[1]"].faults == 0
    assert bool(seed.finite_flag) and seed.poll_nonfinite() is False and seed.faults == 0


class MaskedHead(nn.Linear):
    """A classifier head whose logit of a disallowed class is -inf on row 0 (the loss stays
    finite where that row's target is another class)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x).clone()
        out[0, 1] = -math.inf
        return out


def test_a_nan_seed_beside_a_masked_host_logit_is_refused() -> None:
    """The host's chunk is not finite (a masked logit), so a NaN output there is no fault of
    the seed's in training; the cross-entropy absorbs the -inf and stays finite. Measured, the
    seed still fell back on every row and must read as faulted, never as harmless."""
    torch.manual_seed(0)
    slot = KasminaLayer(MaskedHead(3, 4), 2, 2, layer_id="head")
    registry = SlotRegistry(nn.Sequential(slot), [slot])
    seed = slot.seeds[0]  # columns 0..1, the masked one among them
    seed.attach_kernel(NotFinite())
    for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION):
        seed.transition_to(stage)
    batches = [(torch.randn(4, 3), torch.tensor([0, 2, 3, 0]))]

    ev = evaluate_seeds(registry, batches, F.cross_entropy)["head[0]"]

    assert math.isfinite(ev.loss_with) and ev.loss_with == ev.loss_without
    assert ev.faults == 1 and ev.last_fault == "nonfinite: non-finite output"
    assert not gate_g5_performance(ev, seed.performance_gate).passed


def test_evaluation_sees_a_fault_without_counting_it_so_it_never_quarantines() -> None:
    """Evaluation changes no stage: a kernel that raises on one validation batch is seen by
    the measurement (once per batch, not once per forward) and never counted toward the
    fault limit, which 1 + C forwards per batch would reach in one evaluation."""
    slot, registry = _stabilizing(RaisesOnOdd(1.5))
    seed = slot.seeds[0]
    batches = [(torch.randn(16, 3), torch.randn(16, 6)), (torch.randn(7, 3), torch.randn(7, 6))]

    ev = evaluate_seeds(registry, batches, F.mse_loss)["fc[0]"]

    assert seed.stage == S.STABILIZATION and seed.faults == 0 and not seed.fault_log
    assert seed.observed_faults is None
    assert ev.faults == 1 and ev.last_fault == "exception: raised RuntimeError: odd batch"
    assert not gate_g5_performance(ev, 0.0).passed
    # Training forwards still count it.
    slot(torch.randn(7, 3))
    assert seed.faults == 1


def test_evaluation_puts_back_the_buffers_of_a_kernel_eval_cannot_switch() -> None:
    slot, registry = _stabilizing(FrozenInTrainMode())
    bn = slot.seeds[0].kernel.bn
    before = {k: v.clone() for k, v in bn.named_buffers()}
    batches = [(torch.randn(8, 3), torch.randn(8, 6))]

    first = evaluate_seeds(registry, batches, F.mse_loss)["fc[0]"]

    assert bn.training  # it did run in train mode, updating its statistics on the way
    assert all(torch.equal(v, dict(bn.named_buffers())[k]) for k, v in before.items())
    assert evaluate_seeds(registry, batches, F.mse_loss)["fc[0]"] == first


def test_kept_buffers_puts_back_a_write_through_data_and_moves_no_version() -> None:
    """A buffer written through ``.data`` (an EMA kept by hand) moves no version: it is put
    back by its values; and putting back a written one moves its version no further."""
    module = nn.Module()
    module.register_buffer("ema", torch.ones(3))
    module.register_buffer("count", torch.zeros(()))
    with kept_buffers(module):
        module.ema.data.mul_(0.5)
        module.count.add_(1)
        written = module.count._version
    assert torch.equal(module.ema, torch.ones(3)) and module.count.item() == 0
    assert module.ema._version == 0 and module.count._version == written


def test_evaluation_between_a_forward_and_its_backward_charges_the_seed_nothing() -> None:
    """A kernel whose batch norm ``eval()`` cannot switch off writes its statistics in every
    call, and its training forward's graph saved them: measured before that backward, the
    evaluation's own writes (and its putting the values back) moved their versions, the seed's
    guarded backward raised, and each step charged the seed a fault until quarantine. The
    kernels run on copies of their buffers now."""
    slot, registry = _stabilizing(FrozenInTrainMode())
    seed = slot.seeds[0]
    for _ in range(3):
        x = torch.randn(8, 3)
        out = registry.model(x)
        evaluate_seeds(registry, [(torch.randn(8, 3), torch.randn(8, 6))], F.mse_loss)
        out.pow(2).sum().backward()
        assert seed.faults == 0 and not seed.fault_log
        assert all(p.grad is not None for p in seed.seed_parameters())
        slot.zero_grad(set_to_none=True)
    assert seed.stage == S.STABILIZATION


@pytest.mark.parametrize("how", ["compiled forward", "module.compile"])
def test_a_compiled_forward_is_measured_with_the_ablation_it_runs(how: str) -> None:
    """TorchDynamo does not guard on hooks added after it compiled a forward: the ablation's
    hooks must not meet a cached graph, or the seed is measured against itself (benefit 0)."""
    torch._dynamo.reset()
    model, slot, registry = _tiny()
    batches = [(torch.randn(4, 3), torch.randn(4, 6))]
    want = evaluate_seeds(registry, batches, F.mse_loss)
    if how == "module.compile":
        model.compile(backend="eager")
    else:
        model.forward = torch.compile(model.forward, backend="eager")
    model.eval()
    with torch.no_grad():
        model(batches[0][0])  # a graph cached before the evaluation
    got = evaluate_seeds(registry, batches, F.mse_loss)
    for sid in ("fc[0]", "fc[1]"):
        assert got[sid].loss_without == pytest.approx(want[sid].loss_without, rel=1e-6)
        assert got[sid].loss_without != got[sid].loss_with


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


def _static_batch_slot(factor: float) -> tuple[nn.Sequential, SlotRegistry, KasminaLayer]:
    torch.manual_seed(0)
    slot = KasminaLayer(nn.Linear(3, 6), 3, 2, layer_id="fc")
    model = nn.Sequential(slot)
    registry = SlotRegistry(model, [slot])  # takes over DORMANT seeds only
    kernel = Scale(factor)
    kernel.signed_input_shape = (4, 2)  # an exported kernel's static batch of 4
    slot.seeds[0].attach_kernel(kernel)
    for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION):
        slot.seeds[0].transition_to(stage)
    model(torch.randn(4, 3))
    return model, registry, slot


def test_a_seed_that_sits_out_the_measuring_forward_is_not_measured_as_harmless() -> None:
    """A kernel whose signed input shape the validation batches do not have sits every one of
    them out: the host stood in, ``loss_with == loss_without``, no fault, and the default G5
    fossilized a seed that wrecks its output at the shapes it trains on. The sit-out counts as
    the host standing in, as a fault does, and G5 refuses; a seed the batch did run is measured."""
    model, registry, slot = _static_batch_slot(-50.0)
    seed = slot.seeds[0]
    ran = evaluate_seeds(registry, [(torch.randn(4, 3), torch.zeros(4, 6))], F.mse_loss)["fc[0]"]
    assert ran.faults == 0 and ran.loss_with > ran.loss_without
    sat = evaluate_seeds(registry, [(torch.randn(5, 3), torch.zeros(5, 6))], F.mse_loss)["fc[0]"]
    assert sat.faults == 1 and sat.last_fault == "sat out every validation batch"
    result = seed.evaluate_gate(S.ACTIVE, performance_gate=0.0)
    assert not result.passed and seed.stage == S.STABILIZATION
    # A partial last batch (no drop_last) is left out of the measurement, not failed: the seed
    # is measured on the batches it ran, and its harm shows.
    batches = [(torch.randn(4, 3), torch.zeros(4, 6)), (torch.randn(3, 3), torch.zeros(3, 6))]
    some = evaluate_seeds(registry, batches, F.mse_loss)["fc[0]"]
    assert some.faults == 0 and some.samples == 4 and some.loss_with > some.loss_without
    assert slot.sat_out == {}  # the measurement's sit-outs are not the training's to count


def test_pending_teacher_logits_wait_out_an_evaluation_as_they_were_set() -> None:
    """Teacher logits set for the next training forward are set aside while measured (a no-grad
    forward that meets them reads as a reentrant checkpoint's first run, and marks the slot so)
    and are pending again after, the same tensor, also when the measurement raises."""
    model, registry, slot = _static_batch_slot(2.0)
    teacher = torch.randn(4, 6)
    slot.set_teacher_logits(teacher)
    batch = [(torch.randn(4, 3), torch.zeros(4, 6))]
    evaluate_seeds(registry, batch, F.mse_loss)
    assert slot._teacher_logits is teacher and not slot._graph.reentrant

    def failing(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        evaluate_seeds(registry, batch, failing)
    assert slot._teacher_logits is teacher and not slot._graph.reentrant


def test_a_load_through_the_seed_drops_its_evaluation() -> None:
    """Only a load with the seed's extra state dropped its evaluation: a weights-only load (or
    one into the seed module) kept it, and G5 passed on a measurement of weights now gone."""
    model, registry, slot = _static_batch_slot(1.0)
    seed = slot.seeds[0]
    batch = [(torch.randn(4, 3), torch.zeros(4, 6))]
    weights = {k: v for k, v in model.state_dict().items() if "extra_state" not in k}
    weights["0.seeds.0.kernel.factor"] = torch.tensor(-50.0)
    for load in (
        lambda: model.load_state_dict(weights, strict=False),
        lambda: seed.load_state_dict({"kernel.factor": torch.tensor(-50.0)}, strict=False),
    ):
        evaluate_seeds(registry, batch, F.mse_loss)
        assert seed.evaluation is not None
        load()
        assert seed.evaluation is None
        assert not seed.evaluate_gate(S.ACTIVE, performance_gate=0.0).passed


def test_a_scripted_kernel_is_evaluated_and_no_hook_is_left_behind() -> None:
    """The sit-out watch hooks each seed's kernel: a scripted one refuses forward hooks, and
    the hooks already put on the others were never removed (one more each evaluation, and
    the model no longer pickled). A scripted kernel is measured as before."""
    import io

    model, registry, slot = _static_batch_slot(2.0)
    other = slot.seeds[1]
    other.attach_kernel(torch.jit.script(Scale(0.5)))
    for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION):
        other.transition_to(stage)
    batch = [(torch.randn(4, 3), torch.zeros(4, 6))]
    for _ in range(3):
        got = evaluate_seeds(registry, batch, F.mse_loss)
        assert set(got) == {"fc[0]", "fc[1]"}
        assert got["fc[1]"].faults == 0 and got["fc[1]"].samples == 4  # its slot ran: measured
    assert not slot.seeds[0].kernel._forward_pre_hooks and not slot._forward_pre_hooks
    other.detach_kernel()
    torch.save(model, io.BytesIO())


def test_a_refused_load_straight_into_a_seed_changes_nothing() -> None:
    """A load into the seed module itself, which no slot's check sees, wrote its ``alpha``
    before its extra state was refused, and dropped its evaluation. Checked first now."""
    model, registry, slot = _static_batch_slot(1.0)
    seed = slot.seeds[0]
    evaluate_seeds(registry, [(torch.randn(4, 3), torch.zeros(4, 6))], F.mse_loss)
    evaluation, alpha = seed.evaluation, seed.alpha.clone()
    bad = dict(seed.state_dict())
    bad["alpha"] = torch.tensor(0.123)
    bad["_extra_state"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    with pytest.raises(ValueError, match="extra state"):
        seed.load_state_dict(bad)
    assert seed.evaluation is evaluation and torch.equal(seed.alpha, alpha)


_TO_STABILIZATION = (
    SeedStage.ISOLATED_INIT,
    SeedStage.COMPATIBILITY_CHECK,
    SeedStage.GRAFTING,
    SeedStage.STABILIZATION,
)


def _scaled_seed(slot: KasminaLayer, factor: float, scripted: bool = False) -> None:
    seed = slot.seeds[0]
    seed.attach_kernel(torch.jit.script(Scale(factor)) if scripted else Scale(factor))
    for stage in _TO_STABILIZATION:
        seed.transition_to(stage)


@pytest.mark.parametrize("scripted", [False, True], ids=["module", "scripted"])
def test_a_seed_whose_slot_no_validation_forward_reaches_is_never_measured(scripted: bool) -> None:
    """A training-only branch (an auxiliary head): no sit-out was counted, the host stood in,
    "with" equalled "without", and G5 passed a kernel that wrecks its chunk as "no effect".
    A scripted kernel takes no hook, and was taken as run: its slot's forward is watched."""

    class WithAux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Linear(3, 6)
            self.aux = KasminaLayer(nn.Linear(6, 6), 3, 2, layer_id="aux")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.trunk(x)
            return h + self.aux(h) if self.training else h

    torch.manual_seed(0)
    model = WithAux()
    registry = SlotRegistry(model, [model.aux])
    _scaled_seed(model.aux, -50.0, scripted)
    model(torch.randn(4, 3))  # training: the slot records its shapes
    batches = [(torch.randn(4, 3), torch.randn(4, 6)) for _ in range(3)]
    evaluate_seeds(registry, batches, F.mse_loss)
    gate = model.aux.seeds[0].evaluate_gate(SeedStage.ACTIVE, performance_gate=0.5)
    assert not gate.passed and "sat out every validation batch" in gate.reason
    assert model.training  # put back


def test_each_ablation_draws_what_the_measured_forward_drew() -> None:
    """A host that samples in eval mode (a VAE's noise): the forwards with and without the
    seed drew other numbers, and an identity seed got a benefit from the noise alone."""

    class Sampling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = KasminaLayer(nn.Linear(3, 6), 3, 2, layer_id="enc")
            self.dec = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.enc(x)
            return self.dec(h + 0.5 * torch.randn_like(h))

    torch.manual_seed(0)
    model = Sampling()
    registry = SlotRegistry(model, [model.enc])
    _scaled_seed(model.enc, 1.0)  # exactly the host's values
    model(torch.randn(4, 3))
    batches = [(torch.randn(4, 3), torch.randn(4, 3)) for _ in range(3)]
    rng = torch.get_rng_state()
    evaluation = evaluate_seeds(registry, batches, F.mse_loss)["enc[0]"]
    assert evaluation.loss_with == evaluation.loss_without and evaluation.benefit == 0.0
    assert torch.equal(torch.get_rng_state(), rng)  # the global stream as it was


def test_evaluation_puts_modes_back_through_train() -> None:
    """A layer whose ``train`` does work (LoRA merging its update for eval): the modes were put
    back by writing the flags, so it stayed merged in training, its factors without gradient."""

    class Merging(nn.Linear):
        def __init__(self) -> None:
            super().__init__(3, 6)
            self.merged = False

        def train(self, mode: bool = True) -> Merging:
            super().train(mode)
            self.merged = not mode
            return self

    torch.manual_seed(0)
    model = nn.Sequential(Merging(), KasminaLayer(nn.Linear(6, 6), 3, 2, layer_id="slot"))
    registry = SlotRegistry(model, [model[1]])
    _scaled_seed(model[1], 1.0)
    model(torch.randn(4, 3))
    model[1].eval()  # a module the user left in eval mode stays so
    evaluate_seeds(registry, [(torch.randn(4, 3), torch.randn(4, 6))], F.mse_loss)
    assert model.training and model[0].training and not model[0].merged
    assert not model[1].training


def test_a_counterfactual_that_makes_another_seed_fault_fails_closed() -> None:
    """Seed A feeds seed B (a log): with A taken out B's output was NaN, the host stood in for
    B unseen, and A's "without" was "A and B off", read as a benefit. A is refused, naming B."""

    class Const(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ones_like(x)

    class Log(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(x)

    torch.manual_seed(0)
    table = GPUStateTensor(4, torch.device("cpu"))
    first, second = KasminaLayer(nn.Linear(3, 4), 2, 2, layer_id="a", state=table), nn.Linear(4, 4)
    with torch.no_grad():
        second.weight.copy_(torch.eye(4))
        second.bias.zero_()
    second = KasminaLayer(second, 2, 2, layer_id="b", state=table, state_offset=2)
    model = nn.Sequential(first, second)
    registry = SlotRegistry(model, [first, second])
    for slot, kernel in ((first, Const()), (second, Log())):
        slot.seeds[0].attach_kernel(kernel)
        for stage in _TO_STABILIZATION:
            slot.seeds[0].transition_to(stage)
    x = torch.randn(8, 3) * 3
    results = evaluate_seeds(registry, [(x, torch.zeros(8, 4))], F.mse_loss)
    assert results["b[0]"].faults == 0  # with A in place, B's input is all ones: log is 0
    assert results["a[0]"].faults == 1
    assert "seed b[0] faulted with this seed taken out" in results["a[0]"].last_fault
    assert not gate_g5_performance(results["a[0]"], 0.5).passed


@pytest.mark.parametrize("which", ["batches", "loss_fn", "metric_fn"])
def test_arguments_of_the_wrong_kind_are_refused_by_name(which: str) -> None:
    """``batches=None`` raised "'NoneType' object is not iterable" and ``loss_fn=None`` "is not
    callable", from inside the measurement (only with a live seed). Each is a TypeError naming
    the argument, before any forward, and no seed records an evaluation."""
    model, slot, registry = _tiny()
    x, t = torch.randn(4, 3), torch.randn(4, 6)
    args = {"batches": [(x, t)], "loss_fn": F.mse_loss, "metric_fn": None, which: None}
    if which == "metric_fn":
        args["metric_fn"] = "accuracy"
    with pytest.raises(TypeError, match=f"^{which} must"):
        evaluate_seeds(registry, args["batches"], args["loss_fn"], metric_fn=args["metric_fn"])
    assert all(seed.evaluation is None for seed in slot.seeds)


def test_batches_iterated_through_getitem_are_measured_and_a_loader_is_not_started_early() -> None:
    """The wrong-kind check took ``isinstance(batches, Iterable)``: a map-style ``Dataset`` of
    batches (``__getitem__`` and ``__len__``, which a for loop iterates) was refused as not
    yielding pairs. What ``iter()`` takes is measured as a list of the same batches is; a str,
    an ``__iter__ = None`` opt-out and a number are still refused. The check calls no
    ``__iter__`` (a shuffled loader's draws a seed from the global generator, outside the
    measurement's forked one, and starts its workers with no seed to measure)."""
    x, t = torch.randn(4, 3), torch.randn(4, 6)

    class Batches(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            if i >= 1:
                raise IndexError(i)
            return x, t

    _, _, registry = _tiny()
    expected = evaluate_seeds(registry, [(x, t)], F.mse_loss)
    _, _, registry = _tiny()
    got = evaluate_seeds(registry, Batches(), F.mse_loss)
    assert got.keys() == expected.keys() and all(v.samples == 4 for v in got.values())
    assert all(got[k].loss_with == expected[k].loss_with for k in got)
    loader = torch.utils.data.DataLoader([(x[i], t[i]) for i in range(4)], 2, shuffle=True)
    _, _, registry = _tiny()
    rng = torch.get_rng_state()
    assert evaluate_seeds(registry, loader, F.mse_loss)["fc[0]"].samples == 4
    assert torch.equal(torch.get_rng_state(), rng)

    class OptedOut(Batches):
        __iter__ = None  # type: ignore[assignment]

    for wrong in ("ab", OptedOut(), 3):
        with pytest.raises(TypeError, match="^batches must yield"):
            evaluate_seeds(registry, wrong, F.mse_loss)  # type: ignore[arg-type]
