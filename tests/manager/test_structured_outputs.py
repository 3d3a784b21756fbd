"""A slot over a layer that returns a namedtuple or a list (a block returning its output and
an auxiliary value): the seeds blend into element 0 only, the caller gets the same type back,
and ``evaluate_seeds`` measures a seed against the host's own output."""

from __future__ import annotations

import collections
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import kasmina
from tests.manager import helpers
from tests.manager.helpers import SEED0, Rig, S, make_config

Pair = collections.namedtuple("Pair", "hidden aux")


class TwoOutputs(nn.Module):
    """A block returning ``(hidden, aux)`` as a namedtuple or as a list."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.kind = kind

    def forward(self, x: torch.Tensor):
        hidden, aux = self.lin(x), x.sum(-1)
        return Pair(hidden, aux) if self.kind == "namedtuple" else [hidden, aux]


def _host_class(kind: str) -> type[nn.Module]:
    class StructuredHost(nn.Module):
        """``helpers.Host`` whose slot ``out`` returns a structure; a head reads both parts."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.inp = nn.Linear(6, 8)
            self.out = TwoOutputs(kind)
            self.head = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.out(torch.relu(self.inp(x)))
            return self.head(out[0]) + 0.01 * out[1][:, None]

    return StructuredHost


@pytest.fixture(params=["namedtuple", "list"])
def structured(request, monkeypatch, tmp_path, store, keyring) -> tuple[Rig, str]:
    monkeypatch.setattr(helpers, "Host", _host_class(request.param))
    return Rig(make_config(tmp_path, store, performance_gate=0), keyring), request.param


def _to_grafting(rig: Rig, mlp: str) -> None:
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    rig.manager.end_epoch(0)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.COMPATIBILITY_CHECK
    rig.train(1)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.GRAFTING
    rig.train(2)


def _expected_type(kind: str) -> type:
    return Pair if kind == "namedtuple" else list


def test_a_grafting_seed_blends_into_element_0_and_keeps_the_output_type(
    structured: tuple[Rig, str], mlp: str
) -> None:
    """Half way through GRAFTING: the slot returns the host's type, its seed's chunk of
    element 0 is ``alpha * kernel + (1 - alpha) * host``, the other chunk and the auxiliary
    element are the host's own, bit for bit."""
    rig, kind = structured
    _to_grafting(rig, mlp)
    seed = rig.manager.seed(SEED0)
    alpha = seed.alpha_value
    assert 0.0 < alpha < 1.0
    with torch.no_grad():
        features = torch.relu(rig.model.inp(rig.x))
        out = rig.model.out(features)
        host = rig.model.out.host(features)
        want = alpha * seed.kernel(host[0][:, :2]) + (1 - alpha) * host[0][:, :2]
    assert type(out) is _expected_type(kind) and len(out) == 2
    if kind == "namedtuple":
        assert out._fields == ("hidden", "aux")
    torch.testing.assert_close(out[0][:, :2], want)
    assert not torch.equal(out[0][:, :2], host[0][:, :2])  # the seed does contribute
    assert torch.equal(out[0][:, 2:], host[0][:, 2:])
    assert torch.equal(out[1], host[1])


def test_evaluate_seeds_ablates_element_0_only(structured: tuple[Rig, str], mlp: str) -> None:
    """``evaluate_seeds``'s loss without the seed is the loss of the model computed on the
    host's own output (auxiliary element included); its loss with the seed is the model's."""
    rig, _ = structured
    _to_grafting(rig, mlp)
    results = rig.manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)
    model = rig.model
    model.eval()
    with torch.no_grad():
        host = model.out.host(torch.relu(model.inp(rig.x)))
        without = F.cross_entropy(model.head(host[0]) + 0.01 * host[1][:, None], rig.y)
        with_seed = F.cross_entropy(model(rig.x), rig.y)
    model.train()
    evaluation = results[SEED0]
    assert evaluation.samples == 16 and evaluation.faults == 0
    assert math.isclose(evaluation.loss_without, float(without), rel_tol=1e-6)
    assert math.isclose(evaluation.loss_with, float(with_seed), rel_tol=1e-6)
    assert evaluation.loss_with != evaluation.loss_without


def test_an_active_seed_and_its_merge_keep_the_output_type(
    structured: tuple[Rig, str], mlp: str
) -> None:
    """Once the seed is ACTIVE the slot still returns the host's type, and ``kasmina.merge``
    gives a model computing the same outputs."""
    rig, kind = structured
    _to_grafting(rig, mlp)
    rig.train(3)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.STABILIZATION
    rig.train(1)
    rig.manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)
    assert rig.send("advance", SEED0), rig.manager.command_log[-1]
    assert rig.stage(SEED0) == S.ACTIVE
    rig.model.eval()
    with torch.no_grad():
        grown_block = rig.model.out(torch.relu(rig.model.inp(rig.x)))
        grown = rig.model(rig.x)
    assert type(grown_block) is _expected_type(kind)
    rig.manager.close()
    merged = kasmina.merge(rig.model)
    assert not any(isinstance(m, kasmina.KasminaLayer) for m in merged.modules())
    with torch.no_grad():
        merged_block = merged.out(torch.relu(merged.inp(rig.x)))
        torch.testing.assert_close(merged(rig.x), grown)
    assert type(merged_block) is _expected_type(kind)
    torch.testing.assert_close(merged_block[0], grown_block[0])
    assert torch.equal(merged_block[1], grown_block[1])
