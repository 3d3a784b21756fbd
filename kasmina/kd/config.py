"""How a seed distils from a teacher: temperature, weight and reduction, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from kasmina.ops.kd_oracle import REDUCTIONS
from kasmina.utils.checks import check_positive, check_real

__all__ = ["MAX_TEMPERATURE", "MIN_TEMPERATURE", "KDConfig", "check_seed_kd"]

# The temperatures a KD loss stays finite at: logits are divided by T and the loss scaled by T²
# in fp32 (T = 1e20 gave -inf or NaN, T = 1e-300 overflowed the scalar); far beyond any in use.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3


@dataclass(frozen=True)
class KDConfig:
    """How a seed distils from a teacher.

    ``alpha`` weighs the KD term when the trainer adds it to its objective (0: the manager
    does not backpropagate it, so no seed counts as trained by it); ``temperature``
    softens both distributions (the loss is scaled by T², docs/design.md §2). ``enabled``
    (the specification's switch): a seed or layer given a config with ``enabled=False``
    distils nothing, as with no config.
    """

    temperature: float = 2.0
    alpha: float = 0.5
    reduction: str = "batchmean"
    enabled: bool = True

    def __post_init__(self) -> None:
        # The ops' own check, so a config that passes here never fails at the first KD step
        # (inf, NaN), and a string or bool is a ValueError rather than a TypeError.
        # Stored as Python floats, a plain int too (``check_real`` keeps an int as it is): a
        # NumPy or Fraction value would reach the loss (Tensor * Fraction raises), a Triton
        # launch (a NumPy float32 is refused) and to_dict's JSON.
        temperature = float(check_positive("KD temperature", self.temperature))
        if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:  # T and T² in fp32
            raise ValueError(
                f"KD temperature must be within [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got "
                f"{temperature!r}"
            )
        alpha = check_real("KD alpha", self.alpha)
        if not 0.0 <= alpha <= 1.0:  # before float(): an int past a float's range overflows
            raise ValueError(f"KD alpha must be within [0, 1], got {alpha!r:.40}")
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "alpha", float(alpha))
        if not isinstance(self.enabled, bool):  # "false" would be truthy
            raise ValueError(f"KD enabled must be a bool, got {self.enabled!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"unknown KD reduction {self.reduction!r}")


def check_seed_kd(config: KDConfig | None, name: str) -> None:
    """Refuse ``reduction="none"`` for the seeds' KD (``ValueError`` naming ``name``): it gives
    per-row losses for a caller to weight (``kd_kl_loss``, ``StaticKDLoss``), while a seed's KD
    term is one scalar that a manager collects and backpropagates; taken anyway, it was summed,
    which is ``"sum"`` under another name."""
    if config is not None and config.reduction == "none":
        raise ValueError(
            f"{name}: reduction 'none' gives per-row losses, and the seeds' KD term is one "
            "scalar: use 'batchmean', 'mean' or 'sum'"
        )
