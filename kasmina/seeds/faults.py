"""What a seed's fault is, and the guards that turn one into a fallback (docs/design.md §6a).

Seeds and slots call these on the host's path: ``output_fault`` checks a kernel's output against
the host activations it must replace (metadata only: no device read); ``all_finite`` (one seed)
and ``finite_chunks`` (every seed of a slot in one reduction) are the device-side finiteness
tests (no host sync), and ``finite_test`` reads their sums instead where that is free (the
CPU); ``fallback_per_chunk`` puts the host's chunk in place of a seed's that failed; ``call_kernel``
is the host half of a seed's guard; ``GraphMark`` tells a slot's manager that a forward left a
graph through a kernel. The backward guard (a kernel whose backward raises) and the one-node
graft built on it are in ``kasmina.seeds.island``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.utils.checkpoint

from kasmina.errors import KernelInputRefused
from kasmina.ops.transforms import (
    functorch_active,
    outside_transforms,
    plain_flag,
    reduced_to_level_of,
    transform_wrapped,
)
from kasmina.seeds.compiled_cut import CUT_REASON, cut_input, from_above_tested, seen_output
from kasmina.seeds.side_effects import (
    FLOATING_BUFFERS,
    buffers_held,
    island_saves,
    keep_finite,
    own_stream,
)
from kasmina.stages import SeedStage
from kasmina.utils.autograd_nodes import graph_task
from kasmina.utils.locks import fork_safe
from kasmina.utils.modules import rng_forked
from kasmina.utils.ratelimit import rarely
from kasmina.utils.telemetry import utf8

logger = logging.getLogger(__name__)

__all__ = [
    "CONTROL_FLOW",
    "DEFAULT_FAULT_LIMIT",
    "FAULT_LOG_SIZE",
    "FAULT_REASON_CHARS",
    "FAULT_WARN_EVERY",
    "FELL_BACK",
    "FaultRecorder",
    "GraphMark",
    "all_finite",
    "autocast_to_host",
    "call_kernel",
    "chunk_sums",
    "compile_callback",
    "cut_nonfinite_gradient",
    "fallback_per_chunk",
    "finite_chunks",
    "finite_test",
    "gradient_flags",
    "kernel_modules",
    "log_fault",
    "measuring",
    "one_value_refusal",
    "output_fault",
    "output_sum",
    "plain_eager",
    "record_fallbacks",
    "recomputing",
    "short_reason",
    "uncharged",
]


class GraphMark:
    """Set by a slot's forward that records a graph (its seeds running or all DORMANT: the
    host's weights are in it too), or under ``no_grad`` on an input that needs grad (a reentrant
    checkpoint's forward; its recompute runs the slot), cleared at a step's end (``end_step``):
    until then ``manager.apply_pending()`` applies nothing, since a CULL would free a kernel,
    or a ROLLBACK rewrite a weight, that the live graph still uses. ``reentrant``: a forward
    without grad met pending teacher logits (a reentrant checkpoint's first run does), so a
    recompute that finds no teacher of its first run drops them, and says so; a recompute
    after a first run with grad leaves them."""

    __slots__ = ("open", "reentrant")

    def __init__(self) -> None:
        self.open = False
        self.reentrant = False


# ``record_fault(kind, reason)``: counts, logs and reports one fault (the seed's ``record_fault``).
FaultRecorder = Callable[[str, str], None]


def uncharged(kind: str, reason: str) -> None:
    """A ``FaultRecorder`` for a measurement whose result carries the fault (G3's probe inside a
    command): logged for debugging, never counted."""
    logger.debug("fault not charged (a measurement's): %s: %s", kind, reason)


# Faults a seed may commit before QUARANTINE, unless the constructor says otherwise.
DEFAULT_FAULT_LIMIT = 3
FELL_BACK = "fell back"  # a non-finite output found on the host: settled at the poll, once a step
# Held while a fault is counted and its seed's quarantine decided: forwards of one model on
# several threads (serving) can fault at once, and two that both reach the limit would both send
# the seed to QUARANTINE, the second raising into its forward. Never held around user code (a
# telemetry sink, a log handler, a transition's observers), which may wait for a lock (the
# manager's) whose holder is charging a fault. Faults are rare: one lock for every seed.
# Free in a forked child (fork_safe): a fault being counted at the fork is there, or is not.
FAULT_LOCK = fork_safe(threading.RLock())
# The newest fault reasons a seed keeps (older ones are dropped), and their length cap: the log
# is for a person reading a report, and an exception message can be arbitrarily long.
FAULT_LOG_SIZE, FAULT_REASON_CHARS = 16, 200
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
    """``text`` on one line and at most ``FAULT_REASON_CHARS`` long, for the fault log, in UTF-8
    (a lone surrogate, a file name's undecodable byte, escaped: telemetry labels carry it)."""
    line = " ".join(utf8(text).split())
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
    t = t.detach() if t.requires_grad else t  # (a detach is an op: none for a gradient)
    return t.sum(dtype=_SUM_DTYPE.get(t.dtype, t.dtype))


def chunk_sums(chunks: torch.Tensor) -> torch.Tensor:
    """The sum of each chunk of ``chunks`` (``[..., n, c]``), fp32 at least, detached:
    :func:`finite_chunks`'s reduction."""
    dims = (*range(chunks.dim() - 2), chunks.dim() - 1)  # all but the chunk index
    chunks = chunks.detach() if chunks.requires_grad else chunks  # (none in a node's forward)
    return chunks.sum(dims, dtype=_SUM_DTYPE.get(chunks.dtype, chunks.dtype))


def finite_test(sums: torch.Tensor, *, read_on_host: bool) -> torch.Tensor | None:
    """The finite test of ``sums`` (:func:`output_sum` or :func:`chunk_sums`) on the device, or
    None when ``read_on_host`` and the sums, read on the host where that is a load and not a
    sync (plain CPU tensors), are all finite: then every mask built from the test would be an
    identity, and the caller skips it. ``read_on_host`` is False under ``torch.compile`` (a
    read would break the graph)."""
    if read_on_host and _read_all_finite(sums):
        return None
    return _finite(sums)


def fallback_masks(
    ok: torch.Tensor, passed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ok, keep)`` from the chunks' finite test ``ok`` and the chunks the host passed
    through (``passed``, or None when every seed ran): a host chunk is never a seed's fault,
    so it counts as finite; ``keep`` marks the chunks that do not blend, a seed's fallback or
    the host's own, which take the host's values as they are (a blend, even at alpha 0 or 1,
    turns a host's infinity into NaN: ``lerp(inf, inf, 1)``)."""
    keep = ok.logical_not()
    if passed is None:
        return ok, keep
    return ok.logical_or(passed), keep.logical_or_(passed)


def record_fallbacks(
    ok: torch.Tensor, host_sums: torch.Tensor, finite: torch.Tensor | None, faulted: torch.Tensor
) -> None:
    """Remember the finite test ``ok`` of seeds' outputs, on the device: ``finite`` ANDs it (a
    seed that fell back loses the step's gradient and its step, ``settle_nonfinite``) and
    ``faulted`` ORs in the chunks that failed where the seed's input, the host's chunk (sums
    ``host_sums``, shaped like ``ok``), was finite: the seed's own fault. Where the host's chunk
    was not (a diverging host, an fp16 overflow) the NaN is the host's and no fault is charged.
    A forward with grad disabled (a validation pass, serving) records no gradient, so its
    caller passes ``finite`` None (``gradient_flags``): the step's gradients from the training
    forwards stay, and only its fault is charged at the next settle. (A checkpointed region's
    forward without grad is recomputed with grad in the backward, which sets ``finite`` then.)"""
    bad = ok.logical_not().logical_and_(_finite(host_sums))
    if functorch_active():
        if torch.compiler.is_compiling():
            # A compiled torch.func transform (a per-sample ``grad``, traced whole): nothing in
            # it may write a tensor it did not create, nor leave it; the fallback stands, and
            # this forward's record of it is dropped.
            return
        if transform_wrapped(faulted) and (finite is None or transform_wrapped(finite)):
            # The transform's own flags (an ensemble's stacked buffers that ``functional_call``
            # put in place of the layer's): each member's test goes to its own, inside it
            # (over the batch of a per-sample vmap inside the ensemble's: any sample's).
            ok = reduced_to_level_of(ok, faulted, torch.all)
            bad = reduced_to_level_of(bad, faulted, torch.any)
            _update_flags(ok, bad, finite, faulted)
            return
        # Under torch.func: the flags live outside the transform; its plain values go there.
        ok, bad = plain_flag(ok, torch.all), plain_flag(bad, torch.any)
        with outside_transforms():
            _update_flags(ok, bad, finite, faulted)
    else:
        _update_flags(ok, bad, finite, faulted)


def _update_flags(
    ok: torch.Tensor, bad: torch.Tensor, finite: torch.Tensor | None, faulted: torch.Tensor
) -> None:
    if finite is not None:
        finite.logical_and_(ok)
    faulted.logical_or_(bad)


# Set by ``measuring``: forwards without grad update the finite flags too.
_MEASURING = contextvars.ContextVar("kasmina_measuring", default=False)


@contextlib.contextmanager
def measuring() -> Iterator[None]:
    """Forwards inside (on this thread) update ``finite`` without grad too: ``evaluate_seeds``
    reads it, so that a seed whose output fell back counts as faulted in the forward measuring
    it even where the host's chunk was not finite (a masked logit that the loss absorbs), where
    the fault flag stays clear. Its flags are restored after (``kept_buffers``)."""
    token = _MEASURING.set(True)
    try:
        yield
    finally:
        _MEASURING.reset(token)


def gradient_flags(
    finite: torch.Tensor, faulted: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The flags a forward running now updates (``record_fallbacks``): ``finite``, whose
    fallback drops the step's gradient, only where the forward records one (grad mode on), or
    under ``measuring``."""
    if torch.is_grad_enabled() or (not torch.compiler.is_compiling() and _MEASURING.get()):
        return finite, faulted
    return None, faulted


def plain_eager() -> bool:
    """Whether the forward running now is eager PyTorch: neither compiled nor under a
    ``torch.func`` transform. Only then do the guards read a sum on the host (a transform's
    tensors have no storage) or put a backward in a guard node (a ``ctx``-form
    ``autograd.Function``, which ``torch.func`` refuses)."""
    return not torch.compiler.is_compiling() and not functorch_active()


# Set while a ``torch.compile``'d call runs; a frame of it that runs in Python though not being
# traced is one TorchDynamo skipped (a kernel's graph break inside a slot's loop over its seeds),
# and it compiles each function the frame calls as a frame of its own, whose guards (torch 2.13)
# miss a stage change and whose ``is_compiling()`` reads True: a stale graph blended a seed
# another stage's way. ``KasminaLayer._graft`` runs such a call eager instead. A C function:
# it has no frame of its own to compile.
compile_callback = getattr(torch._C._dynamo.eval_frame, "get_eval_frame_callback", type(None))


def _read_all_finite(sums: torch.Tensor) -> bool:
    """Whether every sum is finite, read on the host where that is a load and not a device sync
    (plain CPU tensors); False elsewhere (another device, a tensor subclass, whose read may be a
    collective; ``torch.jit.trace``, which would bake the value into the trace; ``torch.func``),
    where the device-side test decides without a read."""
    if (
        type(sums) is not torch.Tensor
        or not sums.is_cpu  # (``device`` builds an object a call)
        or torch.jit.is_tracing()
        or not plain_eager()
    ):
        return False
    values = sums.tolist()
    return all(map(math.isfinite, values)) if isinstance(values, list) else math.isfinite(values)


def _finite(sums: torch.Tensor) -> torch.Tensor:
    """``isfinite`` of a few sums in two eager ops (``0 * v`` is 0 exactly when ``v`` is
    finite): ``torch.isfinite`` is a composite of four. Compiled, ``isfinite`` itself: Inductor
    simplifies ``0 * v`` to ``0``, which holds for finite ``v`` only, and the test would pass a
    NaN."""
    if torch.compiler.is_compiling():
        return sums.isfinite()
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
    if not (out.is_cpu and host.is_cpu) and out.device != host.device:  # (``device``: an object)
        return "device", f"output on {out.device} but host on {host.device}"
    return None


def anomaly_fault(out: torch.Tensor, host: torch.Tensor) -> tuple[str, str] | None:
    """Under ``torch.autograd.set_detect_anomaly(True)`` with its NaN checks (eager only; a
    compiled region's backward is one node anomaly mode still checks), for an output with a
    graph: a non-finite output of a finite host chunk, found on the host (anomaly mode
    reads the device at every node anyway), so the seed passes the host through. Left to the
    device half, the chunk falls back, but the kernel's backward still runs on the zero
    gradient the fallback gives it; ``0 * inf`` is NaN there, and anomaly mode raised: out of
    the host's backward in ACTIVE, as a second fault ("backward raised") before it."""
    if not torch.is_anomaly_check_nan_enabled() or not out.requires_grad or functorch_active():
        return None  # under a torch.func transform a read of a batched tensor is refused
    if bool(out.detach().isfinite().all()):
        return None
    if not bool(host.detach().isfinite().all()):  # the host's NaN: anomaly mode blames its op
        return None
    return FELL_BACK, "non-finite output"


def cut_nonfinite_gradient(xin: torch.Tensor, ok: torch.Tensor) -> None:
    """An ACTIVE seed's kernel input ``xin`` (an alias of the host activations) passes back no
    gradient unless ``ok``: the 0 * nan a non-finite output sends upstream is cut, so the host
    stays finite. Eager only: compiled, ``xin`` came through ``compiled_cut.cut_input``."""
    if xin.requires_grad and not torch.compiler.is_compiling():
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
    kernel: torch.nn.Module,
    x: torch.Tensor,
    active: bool,
    record: FaultRecorder,
    stream: tuple[str, int | None] = ("", None),
    flag: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The host half of a seed's guard: ``(kernel output, kernel input)``, or None after a
    fault found on the host (given to ``record``); no device read here but ``anomaly_fault``'s.

    Before ACTIVE the kernel sees ``x.detach()``; an ACTIVE (fossilized) seed backpropagates into
    the host, so it sees an alias of ``x``, on which a hook cuts the gradient a non-finite output
    would send upstream. Compiled, ``flag`` is the seed's ``cut_flag``, which its backward sets
    (``compiled_cut``): ACTIVE, ``cut_input``'s alias, for a cut its kernel's own backward made; in
    an isolated training stage, ``from_above_tested``, where the gradient from above is not finite
    (the step loses it). Before ACTIVE a kernel that draws random numbers
    (``GPUKernel.draws_random``) runs on a forked RNG state, so the host's own random ops draw what
    they would without the seed, and on a stream of its own there (``own_stream``: ``stream`` is the
    seed's id and position); not under ``torch.compile``, which cannot trace the fork."""
    token, compiling = None, torch.compiler.is_compiling()  # (read once: a call, each seed)
    if not active:
        xin = x.detach()
    elif x.requires_grad and compiling:
        flag = None if functorch_active() else flag  # a transform writes nothing outside it
        xin, token = cut_input(x, flag)
        token = None if flag is None else token
    else:
        xin = x.view_as(x)
    forked = not active and vars(kernel).get("draws_random") and not compiling
    # Its floating buffers stay finite (``side_effects``); a kernel known to have none (the
    # usual: ``()``) costs one dict read here, on every seed's call of every step.
    held = buffers_held(kernel) if kernel.__dict__.get(FLOATING_BUFFERS, True) else ()
    grad = torch.is_grad_enabled()
    try:
        with island_saves(active, compiling):
            if forked:
                with rng_forked(x.device):
                    own_stream(kernel, x.device, *stream)
                    out = kernel(xin)
            else:
                out = kernel(xin)
    except CONTROL_FLOW:
        raise
    except Exception as exc:  # the kernel's own failure: contained, never the host's
        refused = exc if isinstance(exc, KernelInputRefused) else one_value_refusal(exc, x, kernel)
        if refused is not None:  # a call its program (or torch's norm) cannot take: no fault
            logger.log(
                rarely(refused.count, FAULT_WARN_EVERY), "seed %s sat out a call (%s)", stream[0],
                refused,
            )  # fmt: skip
            return None
        if not recomputing():
            record("exception", f"raised {type(exc).__name__}: {exc}")
        return None
    finally:
        if held:
            keep_finite(held)
        if torch.is_grad_enabled() is not grad:  # ``torch.set_grad_enabled(False)`` as a call:
            torch.set_grad_enabled(grad)  # the host's forward after it recorded no graph
    found = output_fault(out, x)
    if found is not None and found[0] == "dtype":  # under autocast, cast rather than fault
        out = autocast_to_host(out, x)
        found = output_fault(out, x)
    if found is None and not compiling and torch.is_anomaly_enabled():
        found = anomaly_fault(out, x)  # eager only: traced, the call would break the graph
    if found is not None:
        if not recomputing():
            record(*found)
        return None
    if not active and flag is not None and out.requires_grad and not functorch_active():
        out = from_above_tested(out, flag)
    return (out if token is None else seen_output(out, token)), xin


# Torch's own checks that refuse a normalization in train mode over one value per channel.
_ONE_VALUE_CHECKS = frozenset(
    getattr(torch.nn.functional, name).__code__
    for name in ("_verify_batch_size", "_verify_spatial_size")
    if hasattr(getattr(torch.nn.functional, name, None), "__code__")
)
_ONE_VALUE_REFUSED: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()  # per kernel


def one_value_refusal(e: BaseException, x: torch.Tensor, kernel: Any) -> KernelInputRefused | None:
    """``e``, raised by ``kernel`` on ``x``, as a refused call where torch's own check raised it
    (a train-mode normalization over one value per channel) on an ``x`` that may hold one sample
    (a size 1 but in its last dim: a dataset's last batch of one), else None: the data's shape,
    not the kernel's fault, as for a program's input checks, and counted per kernel as theirs.
    Told by the frame that raised; on an input with no such size the kernel's reshape did it."""
    tb = e.__traceback__
    if not isinstance(e, ValueError) or tb is None or (x.dim() > 1 and 1 not in x.shape[:-1]):
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    if tb.tb_frame.f_code not in _ONE_VALUE_CHECKS:
        return None
    count = _ONE_VALUE_REFUSED[kernel] = _ONE_VALUE_REFUSED.get(kernel, 0) + 1
    return KernelInputRefused(str(e), count)


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
    return graph_task() != -1


# What a fault of each kind (or with this reason) costs, where its output is not what falls back.
_FAULT_EFFECTS = {"backward": "its step's gradient is dropped", "gradient": "its step is skipped",
                  "optimizer": "its optimizer state is reset",
                  "kd": "its KD loss of the call is skipped",
                  CUT_REASON: "the host's gradient through it kept its finite part"}  # fmt: skip


def log_fault(seed_id: str, count: int, limit: int, stage: str, kind: str, reason: str) -> None:
    """Log a seed's ``count``-th fault: the first and every ``FAULT_WARN_EVERY``-th at WARNING,
    the rest at DEBUG (a seed that faults on every step stays visible without flooding)."""
    effect = _FAULT_EFFECTS.get(reason) or _FAULT_EFFECTS.get(kind, "the host output stands in")
    logger.log(
        rarely(count, FAULT_WARN_EVERY),
        "seed %s: fault %d/%d in %s (%s): %s; %s",
        *(seed_id, count, limit, stage, kind, reason, effect),
    )  # fmt: skip
