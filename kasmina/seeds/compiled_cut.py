"""An ACTIVE seed's gradient cut under ``torch.compile``, and the fault it records; an isolated
seed's lost step to a non-finite gradient from above (docs/design.md §6a, "Under compilation").

Eager mode cuts the gradient an ACTIVE kernel sends into the host with a tensor hook, only where
its output was not finite (``faults.cut_nonfinite_gradient``). A hook on an intermediate tensor
made TorchDynamo (torch 2.13) drop the attribute writes to an existing object traced after it
(CLIP's ``outputs.pooler_output = self.visual_projection(...)`` kept the unprojected tensor), so
a compiled kernel takes its input through :func:`cut_input` instead: an identity whose backward
zeroes every non-finite entry of the gradient into the host. Where the kernel's output was not
finite that is the eager cut (the gradient into the kernel is 0, its input gradient 0 or
``0 * inf``). Where the output was finite but the kernel's own backward was not (an fp16
overflow of ``g @ W``, a ``0 * inf`` inside it), eager passes the non-finite gradient on and a
``GradScaler`` or a clipped step sees it; compiled, the host keeps the finite part, so the cut
records the fault instead: it sets the seed's ``cut_flag`` (a forward input mutated in the
backward, no host read), which the step reads with its other flags and charges as a
``nonfinite`` fault, :data:`CUT_REASON` (``GradientIsolatedSeed.settle_nonfinite``).

A zeroed entry is the seed's own only where the kernel's input and the gradient into its output
were both finite: a host's non-finite activations are the host's (as for an output,
``faults.record_fallbacks``), and so is a non-finite gradient from above (the host's own
overflow, a ``GradScaler``'s scale still too high). The gradient into the output is known in
the backward of :func:`seen_output`, the identity the kernel's output goes through, which sends
its finiteness back to the cut as the gradient of a token the cut made: the two backward nodes
are linked by autograd's own edges, with no buffer written between them.

Before ACTIVE a compiled seed has no guarded island (``island``, eager only), so a non-finite
gradient from above its output (a NaN target, an overflowed loss: the host's) reached its
weights and its next outputs were charged. Its output goes through :func:`from_above_tested`,
whose backward sets the seed's ``cut_flag`` where that gradient is not finite (the forward never
writes it: a flag the forward wrote too, ``finite_flag``, was written back by AOTAutograd's
backward from its value after the forward, over any later write, and a slot's, a view of its
flags that a second backward found saved and modified). The step reads it with the seed's
other flags and, in an isolated training stage (ISOLATED_INIT, GRAFTING, STABILIZATION), takes it
as a lost step, no fault charged, as the island's backward has it (:func:`settled_flags`;
``island._lose_to_the_host``); in any other stage the flag keeps its meaning, the cut's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from kasmina.stages import ISOLATED_TRAINING_STAGES, SeedStage

__all__ = [
    "CUT_REASON",
    "Staged",
    "cut_input",
    "from_above_tested",
    "seen_output",
    "settled_flags",
]

# The reason a seed whose compiled cut zeroed its own non-finite input gradient is charged.
CUT_REASON = "non-finite input gradient from its backward, zeroed (compiled)"


def cut_input(x: torch.Tensor, fault: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alias of x, token)``: the kernel's input, whose backward zeroes the non-finite entries
    of the gradient and sets ``fault`` (0-d bool: the seed's ``cut_flag``) where zeroing one
    was the kernel's own fault; ``token`` goes to :func:`seen_output` with the kernel's output.
    ``fault`` None (under a ``torch.func`` transform, which must write nothing outside it): the
    cut alone."""
    xin, token = _FiniteGradient.apply(x, fault)
    return xin, token


def seen_output(out: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """``out`` (the kernel's output), whose backward tells :func:`cut_input`'s through ``token``
    whether the gradient into it was finite."""
    seen: torch.Tensor = _GradientSeen.apply(out, token)
    return seen


def from_above_tested(out: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
    """``out`` (an isolated kernel's output), whose backward sets ``flag`` (0-d bool: the seed's
    ``cut_flag``, a forward input mutated in the backward, no host read) where the gradient into
    it was not finite. The gradient itself passes unchanged: the step drops it."""
    tested: torch.Tensor = _FromAboveTested.apply(out, flag)
    return tested


class Staged(Protocol):
    """A seed, or its manager's record: what :func:`settled_flags` reads of it."""

    @property
    def stage(self) -> SeedStage: ...


def settled_flags(flags: Sequence[bool], seed: Staged) -> list[bool]:
    """A seed's ``SEED_FLAGS`` as read, ``[finite, faulted, cut]``, as its step acts on them.
    In an isolated training stage ``cut`` was set by :func:`from_above_tested`: a gradient from
    above that was not finite, the host's, which loses the step (``finite`` False) and is no
    cut, so no fault. In any other stage the flags stand as read (ACTIVE: the cut's). The
    seed's stage is read only for a set ``cut`` (a step settles every running seed's flags)."""
    finite, faulted, cut = flags
    if cut and seed.stage in ISOLATED_TRAINING_STAGES:
        return [False, faulted, False]
    return [finite, faulted, cut]


def _sum_finite(t: torch.Tensor) -> torch.Tensor:
    """Whether the sum of ``t`` (fp32 at least) is finite: ``faults.all_finite``'s test as it is
    traced (every entry finite, and no sum that overflows)."""
    half = t.dtype in (torch.float16, torch.bfloat16)
    return t.detach().sum(dtype=torch.float32 if half else t.dtype).isfinite()


class _FiniteGradient(torch.autograd.Function):
    """The identity on the kernel's input, and a token (``_GradientSeen``'s gradient comes back
    through it); the backward passes the finite entries of the gradient and zeroes the others."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: torch.Tensor, fault: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x.view_as(x), x.new_zeros((), dtype=torch.float32)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        """The input (whose finiteness says whose a zeroed entry is), saved, and the flag, kept
        as it is: saved, its version was checked at each unpack, and every backward writes it
        (the seed-only KD backward, then the task loss's through the same retained graph; two
        forwards and one backward), so the next one raised that it had been modified in place.
        (A Function with ``generate_vmap_rule`` must define its context here, not in
        ``forward``.)"""
        ctx.save_for_backward(inputs[0])
        ctx.fault = inputs[1]

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor, seen: torch.Tensor | None
    ) -> tuple[torch.Tensor, None]:
        (x,), fault = ctx.saved_tensors, ctx.fault
        ok = grad.isfinite()
        if fault is not None and seen is not None:  # (seen None: no output took the token)
            own = ok.logical_not().any().logical_and_(seen.gt(0))
            fault.logical_or_(own.logical_and_(_sum_finite(x)))
        return torch.where(ok, grad, torch.zeros_like(grad)), None


class _GradientSeen(torch.autograd.Function):
    """The identity on the kernel's output; its backward sends back, as the gradient of
    ``_FiniteGradient``'s token, 1 where the gradient into the output was finite, else 0."""

    generate_vmap_rule = True

    @staticmethod
    def forward(out: torch.Tensor, token: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return out.view_as(out)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        """Nothing to keep: the backward reads the incoming gradient alone."""

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, _sum_finite(grad).to(torch.float32)


class _FromAboveTested(torch.autograd.Function):
    """The identity on an isolated kernel's output; its backward sets the seed's ``cut_flag``
    where the gradient into the output is not finite."""

    generate_vmap_rule = True

    @staticmethod
    def forward(out: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return out.view_as(out)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        """The flag, kept as it is, not saved: each backward through a retained graph writes it
        (``_FiniteGradient.setup_context``)."""
        ctx.flag = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        ctx.flag.logical_or_(_sum_finite(grad).logical_not())
        return grad, None
