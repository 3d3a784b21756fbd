"""Seeds' islands: the kernels' own backward, guarded, and the one-node graft built on it.

Before ACTIVE a seed's kernel sees ``x.detach()``, so the graph from its parameters to its output
is an island: the only way out is the output. The host's autograd is handed a detached copy of
that output, and the node that stands for it (``ContainedBackward``, or ``GuardedBlend`` for a
layer whose seeds all blend) runs the island's backward itself, in a ``try``: a kernel whose
backward raises loses this step's gradient and counts one fault, and the host's backward
carries on (docs/design.md §6a).

The island's backward computes the kernels' parameter gradients (one engine call, no
accumulation) and the node returns them to the host's autograd, which treats them as it would
the kernels' own: ``backward()`` accumulates them, ``autograd.grad`` and ``inputs=`` select them,
and ``create_graph`` follows the outer call (grad mode is on inside a backward only under
``create_graph=True``). A tensor hook on a kernel parameter (``p.register_hook``: a gradient
scaled, clipped or noised) runs once, when the host's autograd delivers the gradient: the
island captures it with the parameters' hooks set aside (run at the capture too, it gave the
seed ``hook(hook(g))``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.autograd.forward_ad as _forward_ad

from kasmina.kd.graph import in_kd_backward
from kasmina.ops.alpha_blend import blend_chunks, blend_chunks_seed_grad
from kasmina.seeds.faults import (
    chunk_sums,
    fallback_masks,
    finite_test,
    gradient_flags,
    output_sum,
    record_fallbacks,
)
from kasmina.seeds.outputs import memory_format_of
from kasmina.seeds.param_hooks import contain_hooks_given_none, hooks_set_aside
from kasmina.stages import SeedStage
from kasmina.utils.autograd_nodes import engine_grad, graph_kept
from kasmina.utils.ratelimit import rarely

logger = logging.getLogger(__name__)

# Backwards through a seed graph whose kernel weights changed in place after its forward.
_STALE_GRAPHS = itertools.count(1)
_STALE_MESSAGE = (
    "a seed's graph was stale (its kernel's weights changed in place after the forward: an "
    "optimizer step before a second backward, or the kernel's own later forward; or its input, "
    "the host's activation, written in place after it by the model); its gradient from that "
    "graph is dropped, no fault charged [%d so far]: %s: %s"
)

# Autograd's words refusing a graph whose saved tensor was written in place after the forward.
_STALE_WORDS = "modified by an inplace operation"

# PyTorch's own words for a backward through a graph an earlier one freed.
_FREED_MESSAGE = (
    "Trying to backward through the graph a second time: seeds' graphs were freed by an "
    "earlier backward that kept no graph. Specify retain_graph=True if you need to backward "
    "through the graph a second time."
)

__all__ = [
    "ContainedBackward",
    "GuardedBlend",
    "GuardedSeed",
    "carries_tangent",
    "contain_backward",
    "contain_isolated",
    "guarded_blend",
    "in_layout_of",
]


class GuardedSeed(Protocol):
    """What the guarded backward needs of the seed whose island it runs."""

    finite_flag: torch.Tensor  # 0-d bool: False loses this step's gradient, no fault charged

    def record_fault(self, kind: str, reason: str) -> None: ...


class _Island:
    """The graphs of isolated seeds' outputs that one ``ContainedBackward`` node stands for.

    ``outputs[i]`` was computed from detached activations and the kernel parameters
    ``params[j]`` for ``j`` in ``groups[i]`` (parameters shared by two seeds are listed once, so
    that their gradient is not returned twice); ``seeds[i]`` is the seed that made it.
    ``versions`` are the parameters' versions when the graphs were recorded, ``inputs`` the
    kernels' inputs (one per output, or none given) with their ``input_versions`` then: an
    input written in place after the kernel ran (the host's activation, by the model, where the
    slot's host returns a view of its own input) makes its graph stale, as a weight changed in
    place does, and that is no fault of the kernel's. ``charged``: the
    outputs whose kernel's backward was already charged a fault, once for the forward that made
    them (a seed-only KD backward and the main one both run through a retained island).
    """

    __slots__ = (
        "charged",
        "groups",
        "input_versions",
        "inputs",
        "outputs",
        "params",
        "seeds",
        "tangents",
        "versions",
    )

    def __init__(
        self,
        outputs: Sequence[torch.Tensor],
        params: Sequence[Sequence[torch.Tensor]],
        seeds: Sequence[GuardedSeed],
        inputs: Sequence[torch.Tensor] = (),
    ) -> None:
        unique: dict[int, int] = {}
        flat: list[torch.Tensor] = []
        groups: list[tuple[int, ...]] = []
        for group in params:
            indices = []
            for p in group:
                if id(p) not in unique:
                    unique[id(p)] = len(flat)
                    flat.append(p)
                indices.append(unique[id(p)])
            groups.append(tuple(indices))
        self.outputs = list(outputs)
        self.params = tuple(flat)
        self.groups = groups
        self.seeds = list(seeds)
        self.versions = [p._version for p in flat]
        # Read after the kernels ran: a write of a kernel's own into its input is its fault.
        self.inputs = list(inputs)
        self.input_versions = [t._version for t in self.inputs]
        self.charged: set[int] = set()
        # The outputs' forward-mode tangents (the node sees detached copies), while a dual
        # level is open: what forward-mode AD carried through the kernels; else empty.
        self.tangents: list[torch.Tensor | None] = []
        if _forward_ad._current_level >= 0:
            self.tangents = [_forward_ad.unpack_dual(o).tangent for o in self.outputs]

    def backward(
        self, grads: Sequence[torch.Tensor], whole: torch.Tensor | None = None
    ) -> list[torch.Tensor | None]:
        """The parameters' gradients; a kernel whose backward raises is a fault and gets none.
        Captured without the parameters' tensor hooks (their dicts emptied meanwhile: the
        engine reads them at each call), which run once, at the delivery; a parameter given
        none has its hooks' failures on that None contained (``param_hooks``).

        A backward that keeps no graph frees the kernels' graphs, as PyTorch frees the saved
        tensors of the nodes it runs: held here, they (and the slot's input they read) lived for
        as long as the caller held the loss, through the next step's forward at least. Not a KD
        loss's backward (``in_kd_backward``), whose seed-only part precedes the host's through
        them. A backward through freed graphs raises PyTorch's error, as it would through the
        kernels' own nodes (a KD loss's after the host's: its KD phase counts the failure)."""
        if not self.outputs:
            raise RuntimeError(_FREED_MESSAGE)
        _lose_to_the_host(self.seeds, grads, whole)
        with hooks_set_aside(p._backward_hooks for p in self.params):
            got = self._backward(grads)
        if not (torch.compiler.is_compiling() or graph_kept() or in_kd_backward()):
            self.outputs, self.inputs = [], []  # the only reference to the kernels' graphs
        for grad in got:
            if grad is None:  # (a fault, a stale graph, an unused parameter)
                contain_hooks_given_none(self.params, got)
                break
        return got

    def _backward(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        if len(self.outputs) > 1:
            try:  # every seed at once: one call into the engine
                return list(engine_grad(self.outputs, self.params, grads))
            except Exception:  # one of them failed: find which, and keep the others' gradients
                logger.debug("a seed kernel's backward raised; retrying seed by seed")
        total: list[torch.Tensor | None] = [None] * len(self.params)
        for i, (output, group, seed, grad) in enumerate(
            zip(self.outputs, self.groups, self.seeds, grads, strict=True)
        ):
            params = [self.params[j] for j in group]
            try:
                got = engine_grad([output], params, [grad])
            except Exception as exc:  # the kernel's own backward failed: contained
                if _STALE_WORDS in str(exc) and (
                    any(self.params[j]._version != self.versions[j] for j in group)
                    or (self.inputs and self.inputs[i]._version != self.input_versions[i])
                ):
                    # Its weights were changed in place after this forward: autograd refuses
                    # the stale graph. By the caller (an optimizer step, then a second backward
                    # through the graph) or by the kernel's own later forward (a weight clipped
                    # in place, the slot run twice before one backward): which, no version
                    # tells. Or its input was, by the model (``inputs``). So no fault is
                    # charged and the host's backward completes; the seed's gradient from this
                    # graph is dropped, and that is logged. Only autograd's own refusal of the
                    # stale graph: anything else the kernel's backward raised is its fault.
                    n = next(_STALE_GRAPHS)
                    logger.log(rarely(n, 1000), _STALE_MESSAGE, n, type(exc).__name__, exc)
                    continue
                if i not in self.charged:  # one fault per forward, however many backwards
                    self.charged.add(i)
                    seed.record_fault("backward", f"backward raised {type(exc).__name__}: {exc}")
                continue
            for j, g in zip(group, got, strict=True):
                if g is not None:
                    previous = total[j]
                    total[j] = g if previous is None else previous + g
        return total


def _lose_to_the_host(
    seeds: Sequence[GuardedSeed], grads: Sequence[Any], whole: torch.Tensor | None
) -> None:
    """A seed whose output's gradient is not finite (the host's NaN from above: a NaN target, an
    overflowed loss) loses the step as one whose output fell back does: its ``finite_flag`` ANDs
    the test, so the step drops its gradient, no fault charged (``settle_nonfinite``). Taken,
    the NaN went into its weights and its next output was charged (clipped: its run of
    non-finite norms). One reduction a seed a backward; on the CPU, given ``whole`` (the
    gradient the ``grads`` are pieces of), one in all while it is finite, read on the host."""
    if whole is not None and whole.is_cpu:
        if finite_test(output_sum(whole), read_on_host=True) is None:
            return
    for seed, grad in zip(seeds, grads, strict=True):
        ok = None if grad is None else finite_test(output_sum(grad), read_on_host=True)
        if ok is not None:
            seed.finite_flag.logical_and_(ok)


class ContainedBackward(torch.autograd.Function):
    """Identity on isolated seeds' outputs whose backward runs the kernels' own in a guard.

    Before ACTIVE a seed's kernel sees ``x.detach()``, so its graph is an island: the only way
    out of it is the output. Handing autograd detached copies of the outputs and doing the
    islands' backward here (``torch.autograd.grad`` into the kernels' parameters) means a
    kernel whose backward raises costs its parameters this step's gradient and counts one
    fault, while the host's backward carries on. One node serves every isolated seed of a slot
    (one engine call for all of them; seed by seed only after a failure, to find the culprit).
    The islands are kept (``retain_graph``) for the seed-only KD backward and the main one to
    both pass, and let go of by a backward that keeps no graph (``_Island.backward``).
    """

    @staticmethod
    def forward(ctx: Any, island: _Island, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.island = island
        ctx.num_outputs = len(island.outputs)
        if any(t is not None for t in island.tangents):  # forward mode: outputs ``jvp`` sets
            return tuple(v.clone() for v in inputs[: ctx.num_outputs])
        return tuple(v.view_as(v) for v in inputs[: ctx.num_outputs])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return (None, *([None] * ctx.num_outputs), *ctx.island.backward(grads))

    @staticmethod
    def jvp(ctx: Any, *_tangents: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """The backward's transpose: the node stands for the island's outputs, whose gradient
        the backward sends into the kernels' parameters, so each output's tangent is the one
        forward-mode AD carried through its kernel from theirs (``_Island.tangents``); the
        detached copies the node is handed have none. A copy, never the tangent itself."""
        island: _Island = ctx.island
        if not any(t is not None for t in island.tangents):
            return (None,) * ctx.num_outputs
        return tuple(  # a zero where an output has none: torch takes no None beside a tangent
            t.clone() if t is not None else torch.zeros(o.shape, dtype=o.dtype, device=o.device)
            for o, t in zip(island.outputs, island.tangents, strict=True)
        )


def contain_backward(
    outputs: Sequence[torch.Tensor],
    params: Sequence[Sequence[torch.Tensor]],
    seeds: Sequence[GuardedSeed],
    inputs: Sequence[torch.Tensor] = (),
) -> list[torch.Tensor]:
    """``outputs`` (isolated seeds', one each) with their backward guarded by one
    ``ContainedBackward`` node; ``params[i]`` (the kernel's parameters that require a gradient),
    ``seeds[i]`` and ``inputs[i]`` (the kernel's input, if given: ``_Island``) belong to
    ``outputs[i]``. An output whose kernel trains no parameter is returned as it is."""
    result = list(outputs)
    chosen = [i for i, group in enumerate(params) if group]
    if not chosen:
        return result
    if len(chosen) < len(result):
        outputs = [outputs[i] for i in chosen]
        params = [params[i] for i in chosen]
        seeds = [seeds[i] for i in chosen]
        inputs = [inputs[i] for i in chosen] if inputs else ()
    island = _Island(outputs, params, seeds, inputs)
    guarded = ContainedBackward.apply(island, *(v.detach() for v in outputs), *island.params)
    for i, value in zip(chosen, guarded, strict=True):
        result[i] = value
    return result


def contain_isolated(
    seeds: Sequence[Any],
    outs: list[torch.Tensor],
    inputs: Mapping[int, torch.Tensor],
    plan: Sequence[SeedStage],
) -> None:
    """One slot call's isolated seeds' outputs (every seed ``k`` in ``inputs``, its kernel's
    input, not ACTIVE, that guards its backward and has a graph) put, in ``outs``, behind one
    ``ContainedBackward``."""
    isolated = (k for k in inputs if plan[k] != SeedStage.ACTIVE and seeds[k].guard_backward)
    guarded = [k for k in isolated if outs[k].requires_grad]
    if not guarded:
        return
    values = contain_backward(
        [outs[k] for k in guarded],
        [seeds[k].trained_parameters() for k in guarded],
        [seeds[k] for k in guarded],
        [inputs[k] for k in guarded],
    )
    for k, value in zip(guarded, values, strict=True):
        outs[k] = value


class _Graft:
    """What one ``GuardedBlend`` call works on, besides its differentiable inputs.

    ``chunks[k]`` is seed ``k``'s output, or the host's own chunk for a seed that passed it
    through (``passed[k]``; ``passed`` is None when every seed ran); ``still[k]``: seed ``k``
    ran and does not blend while another does (None if none is so); ``island`` holds the
    outputs that need a gradient (chunks ``island_chunks``), ``flags`` the seeds' two flags
    (the first None under ``no_grad``: ``faults.gradient_flags``).
    """

    __slots__ = (
        "blend",
        "chunk",
        "chunks",
        "dim",
        "flags",
        "island",
        "island_chunks",
        "n",
        "passed",
        "still",
    )

    def __init__(
        self,
        chunks: Sequence[torch.Tensor],
        dim: int,
        passed: torch.Tensor | None,
        still: torch.Tensor | None,
        flags: tuple[torch.Tensor | None, torch.Tensor],
        island: _Island | None,
        island_chunks: Sequence[int],
        blend: bool,
    ) -> None:
        self.chunks = list(chunks)
        self.n = len(self.chunks)
        self.chunk = chunks[0].shape[dim]
        self.dim = dim
        self.passed = passed
        self.still = still
        self.flags = flags
        self.island = island
        self.island_chunks = list(island_chunks)
        self.blend = blend


def _graft_values(
    graft: _Graft, host: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(out, alpha_used, ok)`` in the moved layout (chunks along the last dim of ``host``);
    ``ok[k]``: chunk k is the seed's (finite) output or the host's own; ``ok`` is None when
    every chunk is known on the host to be finite (then ``out`` needs no mask).

    ``out`` is never a view: ``GuardedBlend`` returns it, and autograd forbids modifying in
    place (a ``relu_`` or ``+=`` after the slot) a Function's output that is a view of one of
    its temporaries. The chunks are concatenated into a buffer of the moved shape (for a
    moved dim, through a view of a buffer with the host's strides: its memory in the host's
    own order, so moving the dim back gives the host's layout), and the masks and the CPU
    blend write over that buffer, this call's own, through ``[..., n, W]`` views: no buffer
    beyond the concatenation's, and nothing to flatten or move back inside the node."""
    n, dim = graft.n, graft.dim
    if dim == host.dim() - 1:
        full = torch.cat(graft.chunks, dim=dim)
    else:
        full = torch.empty_like(host)
        torch.cat(graft.chunks, dim=dim, out=full.movedim(-1, dim))
    full_c = full.unflatten(-1, (n, -1))
    ok = finite_test(chunk_sums(full_c), read_on_host=True)
    against = host
    if graft.blend and graft.still is not None:
        # A chunk that does not blend (alpha 1) blends against itself: exactly its output,
        # where against the host ``s - (s - h)·0`` is NaN beside a host's infinity.
        still = graft.still.unsqueeze(-1)
        against = torch.where(still, full_c, host.unflatten(-1, (n, -1))).flatten(-2)
    if ok is None:
        # Every chunk finite, read for free on the CPU (every step of healthy seeds): the flag
        # update, the alpha mask and the zeroing would all be identities, and are skipped.
        if not graft.blend:
            return full, alpha, None
        return blend_chunks(full, against, alpha), alpha, None
    host_c = host.unflatten(-1, (n, -1))
    ok, keep = fallback_masks(ok, graft.passed)
    record_fallbacks(ok, chunk_sums(host_c), *graft.flags)
    if not graft.blend:  # no GRAFTING seed: every alpha is 1, the blend is the identity
        torch.where(ok.unsqueeze(-1), full_c, host_c, out=full_c)
        return full, alpha, ok
    # A chunk that fails the test blends with alpha 0 against its values with every
    # non-finite one zeroed (``h + 0 * (s' - h)`` is ``h`` wherever the host is finite), and
    # then every chunk that does not blend takes the host's values as they are (``keep``).
    used = alpha.mul(ok)
    torch.nan_to_num(full, 0.0, 0.0, 0.0, out=full)
    out = blend_chunks(full, against, used)
    out_c = out.unflatten(-1, (n, -1))
    torch.where(keep.unsqueeze(-1), host_c, out_c, out=out_c)
    return out, used, ok


def _graft_tangent(
    graft: _Graft, used: torch.Tensor, ok: torch.Tensor | None, t_host: torch.Tensor | None
) -> torch.Tensor | None:
    """``GuardedBlend``'s tangent in the moved layout: the host's on a chunk it passed through,
    0 on the seeds' (``carries_tangent``: none has one here) and where a seed's output fell
    back (``ok``); times the alpha used when blending, in fp32 and rounded once
    (``blend_chunks_seed_grad``)."""
    if t_host is None or graft.passed is None:
        return None
    tangent = torch.where(graft.passed.unsqueeze(-1), t_host.unflatten(-1, (graft.n, -1)), 0.0)
    if ok is not None:
        tangent = torch.where(ok.unsqueeze(-1), tangent, 0.0)
    if graft.blend:
        work = torch.float32 if tangent.dtype in (torch.float16, torch.bfloat16) else tangent.dtype
        tangent = (tangent.to(work) * used.to(work).unsqueeze(-1)).to(tangent.dtype)
    return tangent.flatten(-2)


def carries_tangent(outs: Sequence[torch.Tensor], ran: Iterable[int]) -> bool:
    """Whether a dual level is open and the output ``outs[k]`` of a seed ``k`` in ``ran`` has a
    forward-mode tangent: the layer then takes the per-op path, whose rules carry it.
    ``GuardedBlend`` could not: it is handed the host, alpha and the island's parameters, so
    with no dual among them (``no_grad``, or duals of detached parameters: no island) its
    ``jvp`` never runs, and it would drop a seed's tangent outside the island anyway."""
    if _forward_ad._current_level < 0:
        return False
    return any(_forward_ad.unpack_dual(outs[k]).tangent is not None for k in ran)


class GuardedBlend(torch.autograd.Function):
    """A layer's seeds, guarded and blended, as one autograd node.

    For a layer whose running seeds all blend against the detached host (GRAFTING,
    STABILIZATION), the guard's device half, the blend and the backward guard are one node:
    the forward concatenates the chunks, tests each for finiteness in one reduction, updates
    the flags, puts the host's chunk in place of a non-finite one (alpha 0) and blends, none of
    it recorded; the backward forms the seeds' gradient (``alpha * g`` per chunk), runs their
    kernels' own backward in the guard of :class:`_Island` (a kernel whose backward raises is
    a fault and loses this step's gradient) and returns the parameters' gradients. Chunks the
    host passed through give the host exactly ``g``; the others give it nothing (the blend's
    host is detached). Values and gradients are those of the unfused path, bit for bit. On the
    CPU the chunk sums are read on the host (a load, not a sync), and when all are finite the
    masks, which would be identities, are skipped.
    Forward mode (``torch.autograd.forward_ad``; the node is eager only, and the layer takes it
    only where no seed's output has a tangent: ``carries_tangent``) takes ``jvp``, the
    backward's transpose (``_graft_tangent``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, graft: _Graft, host: torch.Tensor, alpha: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        out, used, ok = _graft_values(graft, host, alpha)
        graft.chunks = []  # the backward needs the island's outputs, not the host's chunks
        ctx.graft = graft
        ctx.save_for_backward(used, ok)
        if _forward_ad._current_level >= 0:
            ctx.save_for_forward(used, ok)
        return out

    @staticmethod
    def jvp(ctx: Any, _graft, t_host: torch.Tensor | None, _alpha, *_params) -> torch.Tensor:
        """The backward's transpose. Per chunk, the backward's gradient is ``g`` (times alpha
        when blending), 0 where the seed's output fell back, and goes to the host for a chunk it
        passed through, else to the seed's island, whose outputs have no tangent here. So the
        tangent is the host's on passed chunks, times the same factors, else 0. Plain torch."""
        used, ok = ctx.saved_tensors
        return _graft_tangent(ctx.graft, used, ok, t_host)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        graft: _Graft = ctx.graft
        used, ok = ctx.saved_tensors
        n = graft.n
        grad_c = grad.unflatten(-1, (n, -1))
        if graft.blend:
            grad_c = blend_chunks_seed_grad(grad_c, used)
        if ok is not None:
            # A chunk that fell back sends its seed exactly 0, whatever ``g`` holds (0 * inf
            # would be NaN), as ``torch.where``'s backward does on the per-op path.
            grad_c = torch.where(ok.unsqueeze(-1), grad_c, 0.0)
        grad_host = None
        if ctx.needs_input_grad[1] and graft.passed is not None:
            # Not ``g * passed``: a seed's chunk gives the host exactly 0, not ``NaN * 0``.
            grad_host = torch.where(graft.passed.unsqueeze(-1), grad_c, 0.0).flatten(-2)
        params: list[torch.Tensor | None] = []
        if graft.island is not None:
            dim = graft.dim
            if dim == grad.dim() - 1:
                pieces = grad_c.unbind(-2)  # chunk k's gradient, in one op
            else:
                pieces = grad_c.flatten(-2).movedim(-1, dim).split(graft.chunk, dim=dim)
            params = graft.island.backward([pieces[k] for k in graft.island_chunks], grad_c)
        return (None, grad_host, None, *params)


def guarded_blend(
    chunks: Sequence[torch.Tensor],
    host: torch.Tensor,
    alpha: torch.Tensor,
    *,
    dim: int,
    passed: torch.Tensor | None,
    still: torch.Tensor | None,
    flags: tuple[torch.Tensor, torch.Tensor],
    guarded: Sequence[int],
    params: Sequence[Sequence[torch.Tensor]],
    seeds: Sequence[GuardedSeed],
    blend: bool,
    inputs: Mapping[int, torch.Tensor],
) -> torch.Tensor:
    """The layer's output through one :class:`GuardedBlend` node (eager only).

    ``chunks`` as in :class:`_Graft`; ``host`` the host's output (chunks along ``dim``);
    ``alpha`` ``[n]``, without grad (1 for a chunk that does not blend); ``guarded`` the chunks
    whose output needs a gradient, with their kernels' ``params`` and ``seeds``;
    ``blend`` False when no seed is GRAFTING; ``inputs[k]`` chunk ``k``'s kernel's input.
    """
    chosen = [i for i, group in enumerate(params) if group]
    island = None
    if chosen:
        island = _Island(
            [chunks[guarded[i]] for i in chosen],
            [params[i] for i in chosen],
            [seeds[i] for i in chosen],
            [inputs[guarded[i]] for i in chosen],
        )
    flags = gradient_flags(*flags)  # the mode of the forward running: the node's is no_grad
    graft = _Graft(chunks, dim, passed, still, flags, island, [guarded[i] for i in chosen], blend)
    last = dim == host.dim() - 1
    moved = host if last else host.movedim(dim, -1)
    if passed is None:
        # No chunk gives the host a gradient: no edge to it either. With one, the engine would
        # run the host's graph above the slot, where a Python ``autograd.Function`` (a custom
        # op, a full backward hook, a reentrant checkpoint) turns "no gradient" into zeros,
        # and an optimizer with momentum steps weights the blend never reached.
        moved = moved.detach()
    # A dual host's tangent goes through ``jvp`` (the seeds' outputs have none: the layer checks).
    if torch.is_grad_enabled() or _forward_ad._current_level >= 0:
        out = GuardedBlend.apply(graft, moved, alpha, *(island.params if island else ()))
    else:
        out = _graft_values(graft, moved, alpha)[0]
    # Chunks along a moved dim come back in the host's layout by the move itself; along the
    # last dim the blend made a contiguous output (a channels-last host's is made so again).
    return in_layout_of(out, host) if last else out.movedim(-1, dim)


def in_layout_of(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``out`` (of ``like``'s shape) in ``like``'s layout, when that is the contiguous or a
    channels-last one, or a permutation of a dense block (an RNN's or attention's
    ``batch_first`` output, a transposed view): a slot's output keeps its host's layout, so
    that code after the slot (``y.view(len(y), -1)`` after a conv) works as it did on the
    host's own output, and reduces in the same order (a contiguous copy of a transposed
    output changed the next layer's gradient in its last bits, which ISOLATED_INIT promises
    bit for bit). A blend along a moved chunk dim returns the moved layout; one copy, only
    then."""
    layout = memory_format_of(like)
    if layout is not None:
        return out.contiguous(memory_format=layout)
    if out.stride() == like.stride():
        return out
    # ``empty_like`` keeps the strides of a non-overlapping dense tensor (any permutation; no
    # sort of the dims, which a compiled graph cannot trace over symbolic strides) and makes a
    # broadcast or gapped one contiguous; ``copy_`` carries the gradient back to ``out``.
    return torch.empty_like(like, dtype=out.dtype).copy_(out)
