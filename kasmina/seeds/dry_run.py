"""GERMINATE's dry run (docs/design.md §6a): a copied kernel run once on the slot's activations
before the seed changes, so one that cannot run there is refused at the command rather than
failing in every host forward. The manager (``manager/executor.py``) supplies the activations and
keeps the kernel's buffers and the RNG; this module says what is wrong with one call."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from kasmina.seeds.outputs import signed_misfit, signed_shape
from kasmina.utils.grad_modes import in_grad_mode

__all__ = ["GradientCheck", "dry_run_problem"]

# What is wrong with a kernel's gradients, given ``(name, parameter, gradient or None)`` each.
GradientCheck = Callable[[list[tuple[str, torch.Tensor, torch.Tensor | None]]], str | None]


def dry_run_problem(
    kernel: nn.Module, x: torch.Tensor, backward: bool, takes: GradientCheck | None = None
) -> str | None:
    """GERMINATE's dry run on one input: what is wrong with ``kernel(x)`` as a replacement for
    ``x`` (None: nothing); with ``backward``, also a kernel with nothing to train, a backward
    into its parameters that raises (``autograd.grad``: no ``.grad`` is written), then what
    ``takes`` finds wrong with its gradients (``(name, parameter, gradient or None)`` each: the
    seed's optimizer asked whether it can step them). The caller keeps buffers and the RNG."""
    taken = signed_misfit(signed_shape(kernel), tuple(x.shape))  # what its call needs
    if taken is not None:
        return f"is not what it takes: its signed input shape is {taken}"
    named = [(n, p) for n, p in kernel.named_parameters() if p.requires_grad] if backward else []
    params = [p for _, p in named]
    if backward and not params and next(kernel.parameters(), None) is not None:
        return "has parameters, none that requires a gradient: a seed trains its kernel"
    watched = _written_by_forward(kernel, x)
    versions = [t._version for _, t in watched]
    try:  # grad mode by ``in_grad_mode``: a block's Python edges could take a Ctrl-C
        out = in_grad_mode(bool(params), partial(kernel, x))
    except Exception as exc:  # any failure of foreign code is a refusal, not a crash
        return f"raised {type(exc).__name__}: {exc}"
    for (what, t), version in zip(watched, versions, strict=True):
        if t._version != version:
            return f"wrote in place into {what}"
    if not isinstance(out, torch.Tensor):
        return f"returned {type(out).__name__}, not a tensor"
    if out.shape != x.shape or out.dtype != x.dtype:
        return f"returned {tuple(out.shape)}/{out.dtype}"
    if not bool(torch.isfinite(out).all()):
        return "returned non-finite values"
    if backward and not params:  # its optimizer would have nothing to step
        return "has no parameter: a seed trains its kernel"
    if out.requires_grad and params:  # a view of a parameter requires grad even so
        try:
            grads = torch.autograd.grad(out, params, torch.ones_like(out), allow_unused=True)
        except Exception as exc:
            return f"raised {type(exc).__name__} in its backward: {exc}"
        if takes is not None:
            return takes([(n, p, g) for (n, p), g in zip(named, grads, strict=True)])
    return None


def _written_by_forward(kernel: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """What a seed's forward must never write in place, each with what the dry run says of it.
    ``GPUKernel`` reads writes into its input and non-persistent buffers from the program at
    load (``seed_hazard``), through the ops' alias annotations; an op that returns its input
    without declaring an alias (``type_as`` of the same dtype, ``broadcast_tensors``) hides
    them there, and the tensors' version counters, which every in-place op bumps, do not."""
    saved = {id(t) for t in kernel.state_dict(keep_vars=True).values()}
    return [
        ("its input (a seed's input is the host's activation)", x),
        *(
            ("its own parameters (a measurement would change its weights)", p)
            for p in kernel.parameters()
        ),
        *(
            ("a non-persistent buffer, which state_dict does not save (kasmina.save and "
             "rollback could not restore it)", b)
            for b in kernel.buffers()
            if id(b) not in saved
        ),
    ]  # fmt: skip
