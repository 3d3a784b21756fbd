"""Whether a seed's optimizer can take the sparse gradients its kernel gives, asked at GERMINATE.

``nn.Embedding(sparse=True)`` gives its weight a sparse gradient, which most optimizers refuse at
every step ("Adam does not support sparse gradients"): a seed germinated with one faulted at each
step until it was quarantined, never trained. Which optimizers take one is the class's own
business (torch's ``SGD``, ``Adagrad`` and ``SparseAdam`` do; a user's class says nothing), so
the class is asked the way that holds for any, as ``attach`` asks it about dense gradients: one
step, with the seed's learning rate and options, on throwaway copies of the parameters holding
the dry run's gradients. Only a kernel whose dry run gave a sparse gradient pays for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["sparse_gradient_problem"]


def sparse_gradient_problem(
    optimizer_cls: type[torch.optim.Optimizer],
    lr: float,
    options: Mapping[str, Any],
    grads: Sequence[tuple[str, torch.Tensor, torch.Tensor | None]],
) -> str | None:
    """What keeps ``optimizer_cls`` from stepping the parameters of ``grads`` (``(name,
    parameter, its gradient or None)``, from a dry run's backward) when one gradient is sparse,
    worded to follow "it" (a refusal's subject is the kernel); None when none is sparse or a
    step on copies of them passes. The parameters and gradients are left as they were."""
    sparse = [name for name, _, grad in grads if grad is not None and grad.is_sparse]
    if not sparse:
        return None
    copies = []
    for _, param, grad in grads:
        if grad is not None:
            copy = param.detach().clone().requires_grad_(True)
            copy.grad = grad.detach().clone()
            copies.append(copy)
    try:
        optimizer_cls(copies, lr=lr, **dict(options)).step()
    except Exception as exc:  # the class's own refusal, whatever it raises
        return (
            f"gives {sparse[0]!r} a sparse gradient (nn.Embedding(sparse=True)), which the "
            f"seed optimizer {optimizer_cls.__name__} cannot step ({type(exc).__name__}: {exc}); "
            "attach with an optimizer_cls that takes one (torch.optim.SGD, Adagrad) or publish "
            "the kernel with dense gradients"
        )
    return None
