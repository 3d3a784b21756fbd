"""Forward-mode AD (``torch.autograd.forward_ad``) through a slot's blend.

The tangent is the transpose of the backward, ``<jvp(t), g> == <t, vjp(g)>``, through the
one-node graft and through the per-op path, fallbacks included; a seed tangent the node cannot
see sends the slot down the per-op path; and the KD loss's tangent through isolated seeds equals
the reverse-mode adjoint.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kasmina.stages import SeedStage
from tests.seeds.blend_helpers import CASES, _layer, _nodes, _Poison
from tests.seeds.fault_helpers import BATCH

S = SeedStage


def _forward_tangent(layer, x, v, tangents, dual_of, grad_mode: bool, node: bool):
    """The slot's output and tangent under ``forward_ad`` (parameters in ``tangents`` made dual
    by ``dual_of``, the input by ``v`` unless None), with the one-node graft run or not."""
    import torch.autograd.forward_ad as fwad

    params = dict(layer.named_parameters())
    with torch.set_grad_enabled(grad_mode), fwad.dual_level():
        duals = {n: fwad.make_dual(dual_of(p), tangents[n]) if n in tangents else p
                 for n, p in params.items()}  # fmt: skip
        xd = x if v is None else fwad.make_dual(x, v)
        out = torch.func.functional_call(layer, duals, (xd,))
        if grad_mode:  # which path ran: the node, or the per-op path's rules
            assert ("GuardedBlendBackward" in _nodes(out)) == node
        return fwad.unpack_dual(out)


def _adjoint(layer, x, v, tangents, g) -> torch.Tensor:
    """``<t, vjp(g)>`` of the slot's reverse mode in the directions ``v`` (input) and
    ``tangents`` (parameters); also checks that reverse mode gives the forward's primal."""
    params = dict(layer.named_parameters())
    xr = x.clone().requires_grad_()
    reverse = layer(xr)
    grads = torch.autograd.grad((reverse * g).sum(), [xr, *params.values()], allow_unused=True)
    directions = [v, *(tangents.get(n) for n in params)]
    pairs = zip(directions, grads, strict=True)
    terms = [(d * gr).sum() for d, gr in pairs if gr is not None and d is not None]
    return sum(terms, torch.zeros(()))  # none: the host detached from every chunk


@pytest.mark.parametrize("directions", ["host and seeds", "host"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_mode_ad_through_the_node_is_the_transpose_of_its_backward(
    case: str, directions: str
) -> None:
    """``torch.autograd.forward_ad`` through the one-node graft raised ``NotImplementedError``
    (a deliberate refusal where a rule belongs). Now its tangent, in the input's and the
    host's parameters' direction (the node runs) or theirs and every seed kernel's at once
    (the seeds' outputs carry tangents: the per-op path's rules take them), satisfies
    ``<jvp(t), g> == <t, vjp(g)>`` against the backward, fallbacks included (a chunk that
    fell back contributes nothing, whatever its seed's tangent holds). The blend detaches the
    host: with no chunk passed through, the host's directions give the slot no tangent."""
    stages, poison = CASES[case]
    chunk = 2
    kernels = {k: _Poison(chunk, v) for k, v in poison.items()}
    layer = _layer(stages, nn.Linear(3, chunk * len(stages)), chunk, kernels=kernels)
    gen = torch.Generator().manual_seed(len(case))
    x, v = torch.randn(BATCH, 3, generator=gen), torch.randn(BATCH, 3, generator=gen)
    tangents = {
        n: torch.randn(p.shape, generator=gen)
        for n, p in layer.named_parameters()
        if directions == "host and seeds" or n.startswith("host.")
    }
    layer(x)  # records the slot's shapes
    node = directions == "host"
    primal, tangent = _forward_tangent(layer, x, v, tangents, lambda p: p, True, node)
    if node and S.DORMANT not in stages:  # no chunk is the host's: no tangent reaches the slot
        assert tangent is None
        tangent = torch.zeros_like(primal)
    assert tangent is not None and torch.isfinite(tangent).all()
    g = torch.randn(primal.shape, generator=gen)
    torch.testing.assert_close(layer(x), primal, rtol=0, atol=0)
    adjoint = _adjoint(layer, x, v, tangents, g)
    torch.testing.assert_close((tangent * g).sum(), adjoint, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("duals", ["no_grad", "detached parameters"])
@pytest.mark.parametrize(
    "stages",
    [
        [S.GRAFTING],
        [S.GRAFTING, S.GRAFTING],
        [S.GRAFTING, S.STABILIZATION],
        [S.GRAFTING, S.DORMANT],
    ],
    ids=["grafting", "grafting-grafting", "grafting-stabilization", "grafting-dormant"],
)
def test_forward_mode_ad_keeps_a_seed_tangent_the_node_cannot_see(
    stages: list[S], duals: str
) -> None:
    """Forward mode with the seeds' outputs not requiring grad (``forward_ad`` under
    ``torch.no_grad()``, which keeps tangents, or ``functional_call`` with duals of detached
    parameters) took the one-node graft, which takes tangents only from its island (outputs
    that need a gradient): the seeds' tangents were silently dropped ([GRAFTING, GRAFTING]
    gave 0 where the adjoint is not). Now a seed output with a tangent sends the slot down
    the per-op path, and the tangent in every parameter's direction equals the reverse-mode
    adjoint ``<t, vjp(g)>``."""
    layer = _layer(stages, nn.Linear(3, 2 * len(stages)), 2)
    gen = torch.Generator().manual_seed(len(stages))
    x = torch.randn(BATCH, 3, generator=gen)
    layer(x)  # records the slot's shapes
    for only in ("seeds.", ""):  # the seeds' parameters alone, then every one
        params = dict(layer.named_parameters())
        tangents = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
        tangents = {n: t for n, t in tangents.items() if n.startswith(only)}
        grad_mode = duals != "no_grad"
        primal, tangent = _forward_tangent(
            layer, x, None, tangents, lambda p: p.detach(), grad_mode, False
        )
        assert tangent is not None, only
        g = torch.randn(primal.shape, generator=gen)
        adjoint = _adjoint(layer, x, None, tangents, g)
        assert adjoint.abs() > 1e-3  # a dropped seed tangent cannot pass unnoticed
        torch.testing.assert_close((tangent * g).sum(), adjoint, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "stages",
    [[S.ISOLATED_INIT, S.GRAFTING], [S.ISOLATED_INIT, S.ISOLATED_INIT], [S.GRAFTING, S.DORMANT]],
    ids=["isolated-grafting", "isolated-isolated", "grafting-dormant"],
)
def test_forward_mode_ad_reaches_the_kd_loss_through_isolated_seeds(stages: list[S]) -> None:
    """An isolated seed's output reaches the KD loss through the contained-backward node:
    forward mode through it raised torch's "You must implement the jvp function", and a
    tangent missing beside another (only one seed's parameters dual) failed an internal
    assert. Now the KD loss's and the output's tangents in every parameter's direction at
    once equal the reverse-mode adjoint, ``<jvp(t), g> == <t, vjp(g)>``."""
    import torch.autograd.forward_ad as fwad

    from kasmina.kd.config import KDConfig

    layer = _layer(stages, nn.Linear(3, 4), 2)
    layer.kd_config = KDConfig(temperature=2.0)
    for seed in layer.seeds:
        seed.kd_config = layer.kd_config
    gen = torch.Generator().manual_seed(3)
    x, teacher = torch.randn(BATCH, 3, generator=gen), torch.randn(BATCH, 4, generator=gen)
    layer(x)  # records the slot's shapes
    params = dict(layer.named_parameters())
    for only in (None, "seeds.0.", "seeds.1."):  # every parameter, then each seed's alone
        tangents = {
            n: torch.randn(p.shape, generator=gen)
            for n, p in params.items()
            if only is None or n.startswith(only)
        }
        if not tangents:  # a DORMANT seed has no kernel
            continue
        g = torch.randn(BATCH, 4, generator=gen)
        with fwad.dual_level():
            duals = {n: fwad.make_dual(p, tangents[n]) if n in tangents else p
                     for n, p in params.items()}  # fmt: skip
            out = torch.func.functional_call(layer, duals, (x,), {"teacher_logits": teacher})
            t_out = fwad.unpack_dual(out).tangent
            t_kd = fwad.unpack_dual(layer.get_and_clear_kd_losses()).tangent
        out = layer(x, teacher_logits=teacher)
        kd = layer.get_and_clear_kd_losses()
        assert kd is not None and t_kd is not None
        for got, value in ((t_kd, kd), (t_out, (out * g).sum())):
            grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
            adjoint = sum(
                (tangents[n] * gr).sum()
                for n, gr in zip(params, grads, strict=True)
                if gr is not None and n in tangents
            )
            want = torch.as_tensor(adjoint, dtype=torch.float32)
            have = got if value is kd else (torch.zeros(()) if got is None else (got * g).sum())
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)
