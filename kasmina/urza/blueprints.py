"""Built-in seed blueprints: small modules that map a ``dim``-wide chunk to the same width.

They are what ``kasmina urza publish --builtin`` exports and what the demo grows its host with.
Every blueprint is residual and starts as (nearly) the identity, so a seed that has just been
grafted changes the host's activations very little; it earns its influence while it trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kasmina.utils.checks import check_positive_int


class ResidualMLP(nn.Module):
    """``x + W2 · gelu(W1 · x)``: extra capacity on one chunk of a layer's output.

    ``W2`` starts at a small scale so the block begins close to the identity.
    """

    def __init__(self, dim: int, hidden: int | None = None, init_scale: float = 0.01) -> None:
        super().__init__()
        hidden = hidden or 4 * dim
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        with torch.no_grad():
            self.fc2.weight.mul_(init_scale)
            self.fc2.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class AffineShift(nn.Module):
    """``x * (1 + g) + b`` per feature: no new capacity after a layer that has a bias and scale.

    A deliberately weak blueprint, so a controller has something it can measure as unhelpful.
    """

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        del hidden  # accepted for a uniform signature
        self.gain = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1.0 + self.gain) + self.bias


@dataclass(frozen=True)
class Blueprint:
    name: str
    factory: Callable[..., nn.Module]
    description: str
    has_hidden: bool = True  # whether ``build`` has a hidden width to set

    def build(self, dim: int, hidden: int | None = None) -> nn.Module:
        dim = check_positive_int("blueprint dim", dim)  # True reached torch as a width
        if hidden is not None and not self.has_hidden:
            raise ValueError(f"blueprint {self.name} has no hidden width to set")
        if hidden is not None:
            hidden = check_positive_int("blueprint hidden width", hidden)
        return self.factory(dim, hidden)


BLUEPRINTS: dict[str, Blueprint] = {
    "residual-mlp": Blueprint(
        "residual-mlp", ResidualMLP, "x + W2 gelu(W1 x), hidden = 4*dim by default"
    ),
    "residual-mlp-narrow": Blueprint(
        "residual-mlp-narrow",
        lambda dim, hidden: ResidualMLP(dim, hidden or max(1, dim // 2)),
        "x + W2 gelu(W1 x), hidden = dim/2 by default",
    ),
    "affine-shift": Blueprint(
        "affine-shift",
        AffineShift,
        "x*(1+g)+b per feature: adds no capacity (a cull candidate)",
        has_hidden=False,
    ),
}


def get_blueprint(name: str) -> Blueprint:
    try:
        return BLUEPRINTS[name]
    except KeyError:
        known = ", ".join(sorted(BLUEPRINTS))
        raise ValueError(f"unknown blueprint {name!r} (known: {known})") from None
