"""G5 takes all the evidence Kasmina measured: the loss benefit against the performance gate,
and, when a metric was measured (``evaluate_seeds(metric_fn=...)``), the metric with the seed
against the metric without it, within ``max_metric_drop`` (higher is better)."""

from __future__ import annotations

import math

import pytest
from torch import nn

from kasmina.seeds.gates import SeedEvaluation, gate_g2_isolated_training, gate_g5_performance
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.stages import SeedStage

S = SeedStage
NAN = math.nan


def _evaluation(
    loss_with: float,
    loss_without: float,
    metric_with: float = NAN,
    metric_without: float = NAN,
    stage: S = S.STABILIZATION,
) -> SeedEvaluation:
    return SeedEvaluation("s", stage, 1.0, loss_with, loss_without, metric_with, metric_without)


def test_a_loss_benefit_does_not_buy_back_an_accuracy_drop() -> None:
    # The continual demo's case: the loss falls by 37.5 % and the accuracy with the seed falls.
    evaluation = _evaluation(1.25, 2.0, metric_with=0.114, metric_without=0.468)
    assert evaluation.benefit == pytest.approx(0.375)
    assert evaluation.metric_change == pytest.approx(-0.354)
    result = gate_g5_performance(evaluation, 0.5)
    assert not result.passed and result.gate == 5
    assert "0.1140 with it" in result.reason and "0.4680 without" in result.reason
    assert "0.3540" in result.reason and "g5_max_metric_drop" in result.reason
    assert result.score == pytest.approx(evaluation.score)  # the score stays the loss's


def test_a_seed_that_helps_loss_and_metric_passes() -> None:
    result = gate_g5_performance(_evaluation(0.8, 1.0, 0.91, 0.90), 0.6)
    assert result.passed and result.score == pytest.approx(0.6)
    assert "0.9100 with it" in result.reason and "0.9000 without" in result.reason
    # No change in the metric is no drop.
    assert gate_g5_performance(_evaluation(0.8, 1.0, 0.9, 0.9), 0.6).passed


def test_without_a_metric_the_loss_alone_decides_as_before() -> None:
    passed = gate_g5_performance(_evaluation(0.8, 1.0), 0.6)
    assert passed.passed and passed.reason == "measured benefit +0.2000 (score 0.6000) >= 0.6000"
    low = gate_g5_performance(_evaluation(0.81, 1.0), 0.6)
    assert not low.passed and low.reason == "measured benefit +0.1900 (score 0.5950) < 0.6000"
    assert gate_g5_performance(_evaluation(0.8, 1.0), 0.6, max_metric_drop=0.0).passed


def test_the_loss_is_still_required_when_the_metric_improves() -> None:
    result = gate_g5_performance(_evaluation(1.2, 1.0, 0.95, 0.80), 0.5)
    assert not result.passed and "measured benefit -0.2000" in result.reason


def test_the_tolerance_is_in_the_metrics_units() -> None:
    drop = _evaluation(0.8, 1.0, 0.895, 0.900)  # half a point of accuracy lost
    assert not gate_g5_performance(drop, 0.5).passed
    assert not gate_g5_performance(drop, 0.5, max_metric_drop=0.004).passed
    assert gate_g5_performance(drop, 0.5, max_metric_drop=0.01).passed
    assert gate_g5_performance(
        _evaluation(0.8, 1.0, 0.0, 1.0), 0.5, max_metric_drop=math.inf
    ).passed


def test_a_half_measured_or_non_finite_metric_is_refused() -> None:
    for with_, without in ((0.9, NAN), (NAN, 0.9), (math.inf, 0.9), (0.9, -math.inf)):
        result = gate_g5_performance(_evaluation(0.8, 1.0, with_, without), 0.5)
        assert not result.passed and "not finite" in result.reason


@pytest.mark.parametrize("bad", [-0.01, NAN])
def test_a_bad_tolerance_raises(bad: float) -> None:
    with pytest.raises(ValueError, match="max_metric_drop"):
        gate_g5_performance(_evaluation(0.8, 1.0), 0.5, max_metric_drop=bad)


@pytest.mark.parametrize("bad", [NAN, math.inf, -math.inf])
def test_a_threshold_that_cannot_be_compared_raises(bad: float) -> None:
    """A NaN gate passed every score (``score < NaN`` is False), a NaN G2 minimum every seed:
    a seed that triples the loss fossilized. The configuration refuses them; a direct call
    raises too, as a NaN tolerance does."""
    with pytest.raises(ValueError, match="performance_gate must be finite"):
        gate_g5_performance(_evaluation(3.0, 1.0), bad)
    with pytest.raises(ValueError, match="min_isolated_epochs"):
        gate_g2_isolated_training(0, NAN, 0)
    seed = GradientIsolatedSeed(4, "s")
    seed.attach_kernel(nn.Identity())
    seed.transition_to(S.ISOLATED_INIT)
    with pytest.raises(ValueError, match="min_isolated_epochs"):
        seed.evaluate_gate(S.COMPATIBILITY_CHECK, min_isolated_epochs=NAN)


def test_the_seed_forwards_the_tolerance_to_g5() -> None:
    seed = GradientIsolatedSeed(4, "s")
    seed.attach_kernel(nn.Identity())
    for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION):
        seed.transition_to(stage)
    seed.record_evaluation(_evaluation(0.8, 1.0, 0.88, 0.90))
    assert not seed.evaluate_gate(S.ACTIVE, performance_gate=0.5).passed
    assert seed.evaluate_gate(S.ACTIVE, performance_gate=0.5, max_metric_drop=0.05).passed
    assert seed.stage == S.STABILIZATION  # evaluating a gate moves nothing


def test_a_metric_asked_for_but_nan_on_both_sides_is_refused_not_skipped() -> None:
    # evaluate_seeds with a metric_fn that was NaN on one batch: both averages are NaN, which
    # is a metric that cannot be read, not "no metric" (the loss alone would pass this seed).
    asked = SeedEvaluation("s", S.STABILIZATION, 1.0, 0.8, 1.0, NAN, NAN, metric_given=True)
    assert asked.metric_measured and not _evaluation(0.8, 1.0).metric_measured
    result = gate_g5_performance(asked, 0.5)
    assert not result.passed and result.gate == 5
    assert "not finite" in result.reason and "metric_fn" in result.reason
    assert result.score == pytest.approx(asked.score)


@pytest.mark.parametrize(
    ("loss_with", "loss_without", "benefit", "passes"),
    [
        (-2.0, -1.0, 1.0, True),  # a Gaussian NLL the seed lowers: a benefit
        (-1.0, -2.0, -0.5, False),  # one it raises: harm
        (-0.5, 0.5, 2.0, True),  # from positive to negative
        (-0.5, 0.0, math.inf, True),  # only the host's loss is 0
        (0.5, 0.0, -math.inf, False),
        (0.0, 0.0, 0.0, True),  # no effect
        (0.75, 1.0, 0.25, True),  # positive losses: 1 - with / without, as always
    ],
)
def test_the_benefit_is_well_defined_for_losses_of_any_sign(
    loss_with: float, loss_without: float, benefit: float, passes: bool
) -> None:
    evaluation = _evaluation(loss_with, loss_without)
    assert evaluation.benefit == benefit
    assert evaluation.score == 0.5 + 0.5 * max(-1.0, min(1.0, benefit))
    assert gate_g5_performance(evaluation, 0.5).passed is passes


def test_g5_refuses_an_evaluation_that_saw_the_seed_fault() -> None:
    # The host stood in for the seed on the faulted batches, so its losses say nothing of it.
    faulted = SeedEvaluation(
        "s", S.STABILIZATION, 1.0, 0.5, 1.0, faults=2, last_fault="nonfinite: non-finite output"
    )
    assert math.isnan(faulted.benefit) and faulted.score == 0.0
    result = gate_g5_performance(faulted, 0.0, max_metric_drop=math.inf)
    assert not result.passed and result.gate == 5 and result.score == 0.0
    assert result.reason.startswith("faulted while measured, on 2 validation batch(es)")
    assert "nonfinite: non-finite output" in result.reason


def test_a_tie_at_a_threshold_is_decided_by_the_numbers_not_their_rounding() -> None:
    """A drop of exactly one point of accuracy against a tolerance of one point, and a loss cut
    by exactly the 20 % a gate of 600 asks for, were refused for some values: the doubles
    came out a rounding below the threshold. A tie passes; anything measurably below fails."""
    for k in range(100):
        with_, without = 100 * (k / 100) / 100, 100 * ((k + 1) / 100) / 100
        tie = SeedEvaluation("s", S.STABILIZATION, 1.0, 1.0, 1.0, with_, without, 100, True)
        assert gate_g5_performance(tie, 0.5, max_metric_drop=0.01).passed, k
        below = SeedEvaluation(
            "s", S.STABILIZATION, 1.0, 1.0, 1.0, with_ - 1e-6, without, 100, True
        )
        assert not gate_g5_performance(below, 0.5, max_metric_drop=0.01).passed, k
    for without in (1.0, 2.0, 5.0, 10.0, 0.5, 0.25, 4.0):
        tie = SeedEvaluation("s", S.STABILIZATION, 1.0, 0.8 * without, without, samples=100)
        assert gate_g5_performance(tie, 0.6).passed, without
        short = SeedEvaluation("s", S.STABILIZATION, 1.0, 0.8001 * without, without, samples=100)
        assert not gate_g5_performance(short, 0.6).passed, without


def test_an_evaluation_of_the_wrong_kind_is_refused() -> None:
    """``record_evaluation(None)`` raised AttributeError ('seed_id'): a TypeError now, and the
    seed keeps what it had."""
    seed = GradientIsolatedSeed(4, "s")
    seed.record_evaluation(_evaluation(0.8, 1.0))
    kept = seed.evaluation
    with pytest.raises(TypeError, match="expected a SeedEvaluation, got NoneType"):
        seed.record_evaluation(None)  # type: ignore[arg-type]
    assert seed.evaluation is kept
