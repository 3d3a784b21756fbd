"""What a seed's fault is, and the guards that turn one into a fallback (docs/design.md §6a).

Seeds and slots call these on the host's path: ``output_fault`` checks a kernel's output against
the host activations it must replace (metadata only: no device read); ``all_finite`` (one seed)
and ``finite_chunks`` (every seed of a slot in one reduction) are the device-side finiteness
tests (no host sync), and ``finite_test`` reads their sums instead where that is free (the
CPU); ``fallback_per_chunk`` puts the host's chunk in place of a seed's that failed;
``contain_backward`` puts the isolated seeds' own backward inside one guarded autograd node,
so a kernel whose backward raises costs that seed one step's gradient and counts one fault,
never the host's backward.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch.overrides import has_torch_function

from kasmina.ops.alpha_blend import blend_chunks, blend_chunks_seed_grad
from kasmina.stages import SeedStage

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_FAULT_LIMIT",
    "FAULT_LOG_SIZE",
    "FAULT_REASON_CHARS",
    "FAULT_WARN_EVERY",
    "ContainedBackward",
    "FaultRecorder",
    "GuardedBlend",
    "all_finite",
    "call_kernel",
    "chunk_sums",
    "contain_backward",
    "cut_nonfinite_gradient",
    "fallback_per_chunk",
    "finite_chunks",
    "finite_test",
    "guarded_blend",
    "kernel_modules",
    "log_fault",
    "output_fault",
    "output_sum",
    "short_reason",
]

# ``record_fault(kind, reason)``: counts, logs and reports one fault (the seed's ``_record_fault``).
FaultRecorder = Callable[[str, str], None]

# Faults a seed may commit before QUARANTINE, unless the constructor says otherwise.
DEFAULT_FAULT_LIMIT = 3
# The newest fault reasons a seed keeps (older ones are dropped), and their length cap: the log
# is for a person reading a report, and an exception message can be arbitrarily long.
FAULT_LOG_SIZE = 16
FAULT_REASON_CHARS = 200
# After the first fault (WARNING), every this-many-th fault is logged at WARNING again, so that a
# seed that cannot be quarantined (ACTIVE) and faults on every step stays visible without
# flooding the log; the others go to DEBUG.
FAULT_WARN_EVERY = 1000


# Exceptions that are torch's control flow, not a kernel's failure: non-reentrant activation
# checkpointing stops a recomputation early by raising this from inside the forward, once it has
# the last tensor it needs, which may be inside a seed's kernel. The guards let them through.
CONTROL_FLOW: tuple[type[BaseException], ...] = tuple(
    cls
    for cls in (getattr(torch.utils.checkpoint, "_StopRecomputationError", None),)
    if isinstance(cls, type) and issubclass(cls, BaseException)
)


def short_reason(text: str) -> str:
    """``text`` on one line and at most ``FAULT_REASON_CHARS`` long, for the fault log."""
    line = " ".join(text.split())
    if len(line) <= FAULT_REASON_CHARS:
        return line
    return line[: FAULT_REASON_CHARS - 3] + "..."


# The dtype a finiteness sum accumulates in: fp32 for the half types (whose own range would
# overflow on ordinary values), the data's own dtype otherwise.
_SUM_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-d bool on ``t``'s device: whether ``t`` is a usable output, without a host sync.

    One reduction and one test: the sum (fp32 at least) is finite exactly when every element
    is finite and the values are not so large that their sum overflows, which takes a mean
    magnitude above ``finfo.max / numel`` (above 1e31 for eight million fp32 values): an
    output that size is a fault as surely as an inf, since the host's next op would overflow
    on it. No temporary the size of ``t`` (``isfinite(t).all()`` writes one bool per element).
    Detached: the test is never differentiated.
    """
    return _finite(output_sum(t))


def finite_chunks(chunks: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool on the device of ``chunks`` (``[..., n, c]``: n chunks of c values each, a
    slot's seed outputs side by side): the test of :func:`all_finite` for each chunk, in one
    reduction and without a host sync, so a slot checks all its seeds' outputs at once,
    concatenated as they are blended."""
    return _finite(chunk_sums(chunks))


def output_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` (0-d), fp32 at least, detached: :func:`all_finite`'s reduction."""
    return t.detach().sum(dtype=_SUM_DTYPE.get(t.dtype, t.dtype))


def chunk_sums(chunks: torch.Tensor) -> torch.Tensor:
    """The sum of each chunk of ``chunks`` (``[..., n, c]``), fp32 at least, detached:
    :func:`finite_chunks`'s reduction."""
    dims = (*range(chunks.dim() - 2), chunks.dim() - 1)  # all but the chunk index
    return chunks.detach().sum(dims, dtype=_SUM_DTYPE.get(chunks.dtype, chunks.dtype))


def finite_test(sums: torch.Tensor, *, read_on_host: bool) -> torch.Tensor | None:
    """The finite test of ``sums`` (:func:`output_sum` or :func:`chunk_sums`) on the device, or
    None when ``read_on_host`` and the sums, read on the host where that is a load and not a
    sync (plain CPU tensors), are all finite: then every mask built from the test would be an
    identity, and the caller skips it. ``read_on_host`` is False under ``torch.compile`` (a
    read would break the graph)."""
    if read_on_host and _read_all_finite(sums):
        return None
    return _finite(sums)


def _read_all_finite(sums: torch.Tensor) -> bool:
    """Whether every sum is finite, read on the host where that is a load and not a device sync
    (plain CPU tensors); False elsewhere (another device, a tensor subclass, whose read may be a
    collective; ``torch.jit.trace``, which would bake the value into the trace), where the
    device-side test decides without a read."""
    if type(sums) is not torch.Tensor or sums.device.type != "cpu" or torch.jit.is_tracing():
        return False
    values = sums.tolist()
    return all(map(math.isfinite, values)) if isinstance(values, list) else math.isfinite(values)


def _finite(sums: torch.Tensor) -> torch.Tensor:
    """``isfinite`` of a few sums in two ops (``0 * v`` is 0 exactly when ``v`` is finite):
    ``torch.isfinite`` is a composite of four."""
    return sums.mul(0).eq(0)


def kernel_modules(root: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """``root`` and every module below it, each once (a shared submodule is listed once): the
    tree whose parameters the backward guard hands to the engine."""
    seen: set[int] = set()
    found: list[torch.nn.Module] = []
    stack = [root]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        found.append(module)
        stack.extend(child for child in module._modules.values() if child is not None)
    return tuple(found)


def output_fault(out: Any, host: torch.Tensor) -> tuple[str, str] | None:
    """``(kind, reason)`` when ``out`` cannot stand in for ``host``, else None.

    Only metadata is compared (no device read), so this costs nothing measurable in a forward
    and traces to constants under ``torch.compile``.
    """
    if not isinstance(out, torch.Tensor):
        return "type", f"output {type(out).__name__} is not a Tensor"
    if out.shape != host.shape or out.dtype != host.dtype:
        kind = "shape" if out.shape != host.shape else "dtype"
        got, want = f"{tuple(out.shape)}/{out.dtype}", f"{tuple(host.shape)}/{host.dtype}"
        return kind, f"output {got} does not match host {want}"
    if out.device != host.device:
        return "device", f"output on {out.device} but host on {host.device}"
    return None


def cut_nonfinite_gradient(xin: torch.Tensor, ok: torch.Tensor) -> None:
    """An ACTIVE seed's kernel input ``xin`` (an alias of the host activations) passes back no
    gradient unless ``ok``: the 0 * nan a non-finite output sends upstream is cut, so the host
    stays finite."""
    if xin.requires_grad:
        xin.register_hook(lambda g: torch.where(ok, g, torch.zeros_like(g)))


def fallback_per_chunk(
    seeds: Sequence[torch.nn.Module],
    plan: Sequence[SeedStage],
    outs: Sequence[torch.Tensor],
    chunks: Sequence[torch.Tensor],
    inputs: Mapping[int, torch.Tensor],
    ok: torch.Tensor | None,
    dim: int,
    one: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """A slot's pre-blend tensor and alphas chunk by chunk, with each seed's fallback, for a
    slot where ISOLATED_INIT or ACTIVE seeds ran (``KasminaLayer``'s per-op path).

    ``outs[k]`` is seed k's output (the host's chunk ``chunks[k]`` where it did not run, k not
    in ``inputs``); ``ok`` the per-chunk finite test, None when every chunk is known finite
    (then no mask is built); ``one`` the alpha of a chunk that does not blend. ISOLATED_INIT
    contributes ``x - (s.detach() - s)``: its value is exactly ``x`` and both the host and the
    seed get the gradient ``g`` unchanged (the straight-through ``incubate``). ACTIVE falls
    back to ``x`` with its gradient, and the gradient its kernel would send upstream is cut
    where its output is not finite. GRAFTING and STABILIZATION fall back to ``x`` detached.
    """
    oks = None if ok is None else ok.unbind()
    pieces: list[torch.Tensor] = []
    alphas: list[torch.Tensor | None] = []
    for k, (seed, stage) in enumerate(zip(seeds, plan, strict=True)):
        x_k, alpha = chunks[k], None
        if k not in inputs:
            piece = x_k
        elif stage == SeedStage.ISOLATED_INIT:
            safe = outs[k] if oks is None else torch.where(oks[k], outs[k], 0.0)
            piece = x_k - (safe.detach() - safe)
        elif stage == SeedStage.ACTIVE:
            piece = outs[k]
            if oks is not None:
                piece = torch.where(oks[k], piece, x_k)
                cut_nonfinite_gradient(inputs[k], oks[k])
        else:
            piece = outs[k] if oks is None else torch.where(oks[k], outs[k], x_k.detach())
            if stage == SeedStage.GRAFTING:
                alpha = seed.alpha if oks is None else seed.alpha * oks[k]
        pieces.append(piece)
        alphas.append(alpha)
    full = torch.cat(pieces, dim=dim)
    if all(alpha is None for alpha in alphas):
        return full, None
    return full, [one if a is None else a for a in alphas]


def call_kernel(
    kernel: torch.nn.Module, x: torch.Tensor, active: bool, record: FaultRecorder
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The host half of a seed's guard: ``(kernel output, kernel input)``, or None after a
    fault found on the host (given to ``record``). Nothing here reads the device.

    Before ACTIVE the kernel sees ``x.detach()``; an ACTIVE (fossilized) seed backpropagates
    into the host, so it sees an alias of ``x``, on which a hook can cut the gradient a
    non-finite output would send upstream.
    """
    xin = x.view_as(x) if active else x.detach()
    try:
        out = kernel(xin)
    except CONTROL_FLOW:
        raise
    except Exception as exc:  # the kernel's own failure: contained, never the host's
        if not recomputing():
            record("exception", f"raised {type(exc).__name__}: {exc}")
        return None
    out = autocast_to_host(out, x)
    fault = output_fault(out, x)
    if fault is not None:
        if not recomputing():
            record(*fault)
        return None
    return out, xin


def autocast_to_host(out: Any, host: torch.Tensor) -> Any:
    """``out`` in the host's dtype when autocast made the kernel compute in another: under
    ``torch.autocast`` a kernel's matmuls return the autocast dtype while the host's output
    (a residual stream, a norm) may stay float32, and a seed stands in for the host's chunk
    in the host's dtype. Outside autocast a dtype mismatch is the kernel's fault."""
    if (
        isinstance(out, torch.Tensor)
        and out.dtype != host.dtype
        and out.dtype.is_floating_point
        and host.dtype.is_floating_point
        and torch.is_autocast_enabled(out.device.type)
    ):
        return out.to(host.dtype)
    return out


def recomputing() -> bool:
    """Whether this forward runs inside a backward: activation checkpointing recomputing a
    region (``torch.utils.checkpoint``, either mode). A seed's fault there was recorded when
    the region first ran; recording it again would count it twice and could quarantine the
    seed mid-recompute, changing the path the recompute must repeat exactly."""
    if torch.compiler.is_compiling():  # a compiled graph recomputes below Python
        return False
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def log_fault(seed_id: str, count: int, limit: int, stage: str, kind: str, reason: str) -> None:
    """Log a seed's ``count``-th fault: the first and every ``FAULT_WARN_EVERY``-th at
    WARNING, the rest at DEBUG, so a seed that faults on every step stays visible without
    flooding the log."""
    level = logging.WARNING if count == 1 or count % FAULT_WARN_EVERY == 0 else logging.DEBUG
    logger.log(
        level,
        "seed %s: fault %d/%d in %s (%s): %s; the host output stands in",
        seed_id,
        count,
        limit,
        stage,
        kind,
        reason,
    )


def _grad(
    outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, grads, retain_graph=True, allow_unused=True)``.

    The gradients come from autograd itself (shapes and dtypes are the outputs'), so the engine
    is called directly, without the public wrapper's argument checks: they cost more per call
    than a small kernel's whole backward on a CPU. Tensors that override torch functions, or a
    torch whose engine entry point does not behave as :func:`_direct_engine` checked once, take
    the public function.
    """
    # Inside a backward grad mode is on only under ``create_graph=True``: the island's
    # gradients are then differentiable too, as the kernels' own would be without the guard.
    create_graph = torch.is_grad_enabled()
    run = _direct_engine()
    if run is None or has_torch_function((*outputs, *inputs)):
        return torch.autograd.grad(
            outputs, inputs, grads, retain_graph=True, create_graph=create_graph,
            allow_unused=True,
        )  # fmt: skip
    keep_graph, allow_unused = True, True
    return run(
        tuple(outputs),
        tuple(grads),
        keep_graph,
        create_graph,
        tuple(inputs),
        allow_unused,
        accumulate_grad=False,
    )


_ENGINE: list[Callable[..., tuple[torch.Tensor | None, ...]] | None] = []  # checked once


def _direct_engine() -> Callable[..., tuple[torch.Tensor | None, ...]] | None:
    """The engine entry point ``torch.autograd.grad`` itself calls (a private function), if it
    exists and answers a small problem exactly as the public function does; else None."""
    if not _ENGINE:
        _ENGINE.append(_check_engine())
    return _ENGINE[0]


def _check_engine() -> Callable[..., tuple[torch.Tensor | None, ...]] | None:
    run = getattr(torch.autograd.graph, "_engine_run_backward", None)
    if run is None:
        return None
    try:
        # The first call usually comes from inside a backward, where grad mode is off: the
        # probe builds its graph with grad mode on, or it would have none and fail for good.
        with torch.enable_grad():
            w = torch.tensor([1.0, 2.0], requires_grad=True)
            unused = torch.zeros(1, requires_grad=True)
            y = w * w
            grad = torch.tensor([1.0, 3.0])
            got = run((y,), (grad,), True, False, (w, unused), True, accumulate_grad=False)
            want = torch.autograd.grad((y,), (w, unused), (grad,), allow_unused=True)
    except Exception:
        logger.debug("the autograd engine's entry point is not the expected one", exc_info=True)
        return None
    same = (
        len(got) == 2
        and got[1] is None
        and want[1] is None
        and isinstance(got[0], torch.Tensor)
        and torch.equal(got[0], want[0])
        and w.grad is None
    )
    return run if same else None


class _Island:
    """The graphs of isolated seeds' outputs that one ``ContainedBackward`` node stands for.

    ``outputs[i]`` was computed from detached activations and the kernel parameters
    ``params[j]`` for ``j`` in ``groups[i]`` (parameters shared by two seeds are listed once, so
    that their gradient is not returned twice); ``recorders[i]`` counts a fault of its seed.
    """

    __slots__ = ("groups", "outputs", "params", "recorders")

    def __init__(
        self,
        outputs: Sequence[torch.Tensor],
        params: Sequence[Sequence[torch.Tensor]],
        recorders: Sequence[FaultRecorder],
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
        self.recorders = list(recorders)

    def backward(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """The parameters' gradients; a kernel whose backward raises is a fault and gets none."""
        if len(self.outputs) > 1:
            try:  # every seed at once: one call into the engine
                return list(_grad(self.outputs, self.params, grads))
            except Exception:  # one of them failed: find which, and keep the others' gradients
                logger.debug("a seed kernel's backward raised; retrying seed by seed")
        total: list[torch.Tensor | None] = [None] * len(self.params)
        for output, group, record, grad in zip(
            self.outputs, self.groups, self.recorders, grads, strict=True
        ):
            params = [self.params[j] for j in group]
            try:
                got = _grad([output], params, [grad])
            except Exception as exc:  # the kernel's own backward failed: contained
                record("backward", f"backward raised {type(exc).__name__}: {exc}")
                continue
            for j, g in zip(group, got, strict=True):
                if g is not None:
                    previous = total[j]
                    total[j] = g if previous is None else previous + g
        return total


class ContainedBackward(torch.autograd.Function):
    """Identity on isolated seeds' outputs whose backward runs the kernels' own in a guard.

    Before ACTIVE a seed's kernel sees ``x.detach()``, so its graph is an island: the only way
    out of it is the output. Handing autograd detached copies of the outputs and doing the
    islands' backward here (``torch.autograd.grad`` into the kernels' parameters) means a
    kernel whose backward raises costs its parameters this step's gradient and counts one
    fault, while the host's backward carries on. One node serves every isolated seed of a slot
    (one engine call for all of them; seed by seed only after a failure, to find the culprit).
    The islands are kept (``retain_graph``) until the outer graph is freed, so the seed-only KD
    backward and the main one can both pass.
    """

    @staticmethod
    def forward(ctx: Any, island: _Island, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.island = island
        ctx.num_outputs = len(island.outputs)
        return tuple(v.view_as(v) for v in inputs[: ctx.num_outputs])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return (None, *([None] * ctx.num_outputs), *ctx.island.backward(grads))


def contain_backward(
    outputs: Sequence[torch.Tensor],
    params: Sequence[Sequence[torch.Tensor]],
    recorders: Sequence[FaultRecorder],
) -> list[torch.Tensor]:
    """``outputs`` (isolated seeds', one each) with their backward guarded by one
    ``ContainedBackward`` node; ``params[i]`` (the kernel's parameters that require a gradient)
    and ``recorders[i]`` belong to ``outputs[i]``. An output whose kernel trains no parameter
    is returned as it is."""
    result = list(outputs)
    chosen = [i for i, group in enumerate(params) if group]
    if not chosen:
        return result
    if len(chosen) < len(result):
        outputs = [outputs[i] for i in chosen]
        params = [params[i] for i in chosen]
        recorders = [recorders[i] for i in chosen]
    island = _Island(outputs, params, recorders)
    guarded = ContainedBackward.apply(island, *(v.detach() for v in outputs), *island.params)
    for i, value in zip(chosen, guarded, strict=True):
        result[i] = value
    return result


class _Graft:
    """What one ``GuardedBlend`` call works on, besides its differentiable inputs.

    ``chunks[k]`` is seed ``k``'s output, or the host's own chunk for a seed that passed it
    through (``passed[k]``; ``passed`` is None when every seed ran); ``island`` holds the
    outputs that need a gradient (chunks ``island_chunks``), ``flags`` the seeds' finite flags.
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
    )

    def __init__(
        self,
        chunks: Sequence[torch.Tensor],
        dim: int,
        passed: torch.Tensor | None,
        flags: torch.Tensor,
        island: _Island | None,
        island_chunks: Sequence[int],
        blend: bool,
    ) -> None:
        self.chunks = list(chunks)
        self.n = len(self.chunks)
        self.chunk = chunks[0].shape[dim]
        self.dim = dim
        self.passed = passed
        self.flags = flags
        self.island = island
        self.island_chunks = list(island_chunks)
        self.blend = blend


def _graft_values(
    graft: _Graft, host: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(out, alpha_used, ok)`` in the moved layout (chunks along the last dim of ``host``);
    ``ok[k]``: chunk k is the seed's (finite) output or the host's own; ``ok`` is None when
    every chunk is known on the host to be finite (then ``out`` needs no mask)."""
    n, dim = graft.n, graft.dim
    full = torch.cat(graft.chunks, dim=dim)
    if dim != full.dim() - 1:
        full = full.movedim(dim, -1)
    full_c, host_c = full.unflatten(-1, (n, -1)), host.unflatten(-1, (n, -1))
    ok = finite_test(chunk_sums(full_c), read_on_host=True)
    if ok is None:
        # Every chunk finite, read for free on the CPU (every step of healthy seeds): the flag
        # update, the alpha mask and the zeroing would all be identities, and are skipped.
        if not graft.blend:
            return full, alpha, None
        return blend_chunks(full_c, host_c, alpha).flatten(-2), alpha, None
    if graft.passed is not None:  # a host chunk is never the seed's fault
        ok = ok.logical_or(graft.passed)
    graft.flags.logical_and_(ok)
    if not graft.blend:  # no GRAFTING seed: every alpha is 1, the blend is the identity
        return torch.where(ok.unsqueeze(-1), full_c, host_c).flatten(-2), alpha, ok
    # A chunk that fails the test blends with alpha 0 against its values with every
    # non-finite one zeroed: ``h + 0 * (s' - h)`` is ``h`` (``s' - h`` is finite wherever the
    # host is). One elementwise pass, where ``torch.where`` would broadcast a mask too.
    used = alpha.mul(ok)
    safe = full_c.nan_to_num(0.0, 0.0, 0.0)
    return blend_chunks(safe, host_c, used).flatten(-2), used, ok


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
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, graft: _Graft, host: torch.Tensor, alpha: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        out, used, ok = _graft_values(graft, host, alpha)
        graft.chunks = []  # the backward needs the island's outputs, not the host's chunks
        ctx.graft = graft
        ctx.save_for_backward(used, ok)
        return out

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
            grad_host = grad_c.mul(graft.passed.unsqueeze(-1)).flatten(-2)
        params: list[torch.Tensor | None] = []
        if graft.island is not None:
            dim = graft.dim
            if dim == grad.dim() - 1:
                pieces = grad_c.unbind(-2)  # chunk k's gradient, in one op
            else:
                pieces = grad_c.flatten(-2).movedim(-1, dim).split(graft.chunk, dim=dim)
            params = graft.island.backward([pieces[k] for k in graft.island_chunks])
        return (None, grad_host, None, *params)


def guarded_blend(
    chunks: Sequence[torch.Tensor],
    host: torch.Tensor,
    alpha: torch.Tensor,
    *,
    dim: int,
    passed: torch.Tensor | None,
    flags: torch.Tensor,
    guarded: Sequence[int],
    params: Sequence[Sequence[torch.Tensor]],
    recorders: Sequence[FaultRecorder],
    blend: bool,
) -> torch.Tensor:
    """The layer's output through one :class:`GuardedBlend` node (eager only).

    ``chunks`` as in :class:`_Graft`; ``host`` the host's output (chunks along ``dim``);
    ``alpha`` ``[n]``, without grad (1 for a chunk that does not blend); ``guarded`` the chunks
    whose output needs a gradient, with their kernels' ``params`` and fault ``recorders``;
    ``blend`` False when no seed is GRAFTING.
    """
    chosen = [i for i, group in enumerate(params) if group]
    island = None
    if chosen:
        island = _Island(
            [chunks[guarded[i]] for i in chosen],
            [params[i] for i in chosen],
            [recorders[i] for i in chosen],
        )
    graft = _Graft(chunks, dim, passed, flags, island, [guarded[i] for i in chosen], blend)
    last = dim == host.dim() - 1
    moved = host if last else host.movedim(dim, -1)
    if torch.is_grad_enabled():
        out = GuardedBlend.apply(graft, moved, alpha, *(island.params if island else ()))
    else:
        out = _graft_values(graft, moved, alpha)[0]
    return out if last else out.movedim(-1, dim)
