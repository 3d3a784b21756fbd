"""KDConfig refuses what the KD ops would refuse at the first step, with a ValueError."""

from __future__ import annotations

import dataclasses
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from kasmina.kd.config import KDConfig
from kasmina.kd.loss import StaticKDLoss

BAD_TEMPERATURES = [math.inf, -math.inf, math.nan, 0.0, -1.0, "2", True, None, torch.tensor(2.0)]


@pytest.mark.parametrize("temperature", BAD_TEMPERATURES, ids=repr)
def test_kd_config_refuses_a_temperature_the_ops_refuse(temperature: object) -> None:
    with pytest.raises(ValueError, match="temperature"):
        KDConfig(temperature=temperature)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        StaticKDLoss(temperature=temperature)  # type: ignore[arg-type]


@pytest.mark.parametrize("alpha", [math.nan, -0.1, 1.5, "0.5", True, None], ids=repr)
def test_kd_config_refuses_a_bad_alpha(alpha: object) -> None:
    with pytest.raises(ValueError, match="alpha"):
        KDConfig(alpha=alpha)  # type: ignore[arg-type]


@pytest.mark.parametrize("temperature", [1e20, 1e200, 1e-300, 1e3 * 1.01, 1e-3 * 0.99])
def test_kd_config_refuses_a_temperature_whose_loss_is_not_finite(temperature: float) -> None:
    """Finite and positive, but the loss scales by T² and divides logits by T in fp32: 1e20
    gave -inf or NaN and 1e-300 an overflow at the first KD step, which the config promises
    never happens."""
    with pytest.raises(ValueError, match="temperature must be within"):
        KDConfig(temperature=temperature)


def test_kd_config_takes_any_finite_positive_real() -> None:
    for temperature in (1, 0.5, np.float32(3.0), 100.0, 1e-3, 1e3):
        config = KDConfig(temperature=temperature, alpha=np.float64(0.25))
        loss = StaticKDLoss.from_config(config)(torch.randn(2, 3), torch.randn(2, 3))
        assert torch.isfinite(loss)


def test_a_disabled_kd_config_distils_nothing() -> None:
    """The specification's ``kd_config.enabled``: a seed or layer given a disabled config
    computes no KD loss, as with none; the flag is a bool, not a string that reads as one."""
    from torch import nn

    from kasmina.seeds.layer import KasminaLayer
    from kasmina.seeds.seed import GradientIsolatedSeed
    from kasmina.stages import SeedStage

    with pytest.raises(ValueError, match="bool"):
        KDConfig(enabled="false")
    for enabled in (True, False):
        kd = KDConfig(enabled=enabled)
        seed = GradientIsolatedSeed(3, "s", kd)
        seed.attach_kernel(nn.Linear(3, 3))
        seed.transition_to(SeedStage.ISOLATED_INIT)
        layer = KasminaLayer(nn.Linear(3, 6), 2, 3, kd_config=kd)
        layer.seeds[0].attach_kernel(nn.Linear(3, 3))
        layer.seeds[0].transition_to(SeedStage.ISOLATED_INIT)
        seed(torch.randn(2, 3), torch.randn(2, 3))
        layer.set_teacher_logits(torch.randn(2, 6))
        layer(torch.randn(2, 3))
        losses = [seed.get_and_clear_kd_losses(), layer.get_and_clear_kd_losses()]
        assert [loss is not None for loss in losses] == [enabled, enabled], losses


@pytest.mark.parametrize("number", [2, np.float32(2.0), np.int64(2), Fraction(2, 1)], ids=repr)
def test_kd_config_keeps_other_numbers_as_python_floats(number: object) -> None:
    """A NumPy or Fraction temperature/alpha reached the loss as it was: ``Tensor * Fraction``
    raised at the first KD step, a NumPy float32 failed the Triton launch, and ``to_dict``'s
    JSON refused both. A plain int was kept as an int, against the promise of floats."""
    config = KDConfig(temperature=number, alpha=number / 4)  # type: ignore[arg-type, operator]
    assert type(config.temperature) is float and type(config.alpha) is float
    assert (config.temperature, config.alpha) == (2.0, 0.5)
    json.dumps(dataclasses.asdict(config))
    assert torch.isfinite(torch.randn(2) * config.alpha).all()


def test_kd_config_refuses_an_alpha_past_a_floats_range_as_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"KD alpha must be within \[0, 1\]"):
        KDConfig(alpha=10**400)
