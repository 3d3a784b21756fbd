"""The seed optimizer's trial on a kernel's sparse gradients (GERMINATE's dry run asks it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kasmina.isolation.sparse_trial import sparse_gradient_problem


def _grads(sparse: bool) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    torch.manual_seed(0)
    emb, lin = nn.Embedding(4, 2, sparse=sparse), nn.Linear(2, 2)
    unused = nn.Parameter(torch.zeros(2))
    out = lin(emb(torch.tensor([0, 2, 2])))
    params = [("emb.weight", emb.weight), ("lin.weight", lin.weight), ("unused", unused)]
    grads = torch.autograd.grad(out.sum(), [p for _, p in params], allow_unused=True)
    return [(name, p, g) for (name, p), g in zip(params, grads, strict=True)]


class Unbuildable(torch.optim.SGD):
    def __init__(self, *args, **kwargs) -> None:
        raise AssertionError("built for dense gradients")


def test_dense_gradients_build_no_optimizer() -> None:
    assert sparse_gradient_problem(Unbuildable, 0.1, {}, _grads(sparse=False)) is None


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adagrad])
def test_an_optimizer_that_steps_sparse_gradients_passes(cls: type) -> None:
    assert sparse_gradient_problem(cls, 0.1, {}, _grads(sparse=True)) is None


def test_one_that_cannot_is_named_with_its_own_error_and_nothing_changes() -> None:
    grads = _grads(sparse=True)
    kept = [(p.detach().clone(), g.to_dense() if g is not None else None) for _, p, g in grads]
    problem = sparse_gradient_problem(torch.optim.Adam, 0.1, {"betas": (0.8, 0.9)}, grads)
    assert problem is not None
    assert "gives 'emb.weight' a sparse gradient" in problem
    assert "Adam cannot step (RuntimeError: Adam does not support sparse gradients" in problem
    for (_, p, g), (value, grad) in zip(grads, kept, strict=True):
        assert torch.equal(p, value) and p.grad is None
        assert (g is None) == (grad is None) and (g is None or torch.equal(g.to_dense(), grad))
