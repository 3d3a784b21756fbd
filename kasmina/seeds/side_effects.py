"""What a seed kernel's call changes besides its output, and the guards that hold it.

A kernel may draw random numbers and may write its own buffers (batch-norm statistics, which
``eval()`` cannot freeze in a program exported in train mode). Before ACTIVE a kernel draws on
a forked generator (``rng_forked``) and a stream of its own (``own_stream``), so the host's own
draws are what they would be without it; a measurement (a FLOP count, ``evaluate_seeds``, a
dry run) leaves its buffers as they were (``kept_buffers``); and every guarded call keeps its
floating buffers finite (``buffers_held``, ``keep_finite``): an element a call made NaN or
infinite gets its value from before the call back. A host batch that went non-finite (a
diverged step) reaches the kernel and, in training, its batch-norm statistics: without the
guard they stayed NaN for good, and every later call in eval mode faulted the seed for it,
though a seed is never charged for what the host feeds it (docs/design.md §6a). Before ACTIVE
the tensors a kernel's graph saves are kept past the caller's saved-tensor hooks
(``island_saves``). A kernel that leaves grad mode changed (``torch.set_grad_enabled(False)``
called as a function) has it put back (``faults.call_kernel``): the host's forward after the
slot recorded no graph, and its backward raised.
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parameter import is_lazy

from kasmina.ops.transforms import functorch_active
from kasmina.utils.grad_modes import version_count

logger = logging.getLogger(__name__)

__all__ = [
    "FLOATING_BUFFERS",
    "buffers_held",
    "forget_buffers",
    "island_saves",
    "keep_finite",
    "kept_buffers",
    "marked_random",
    "own_stream",
]

# Where a kernel keeps its floating buffers, found at its first guarded call: each as a
# ``_Buffer``; ``()`` for a kernel without.
FLOATING_BUFFERS = "_kasmina_floating_buffers"


class _Buffer:
    """One floating buffer of a kernel, and whether a call has been seen to write it, or it is
    a running statistic (``running_*``: a batch norm's, also in an exported program, whose
    update moves no version): such a buffer's values are copied before each call, to put back
    what the call makes non-finite. ``norm``: its batch-norm module (eager), which writes it
    only in training."""

    __slots__ = ("module", "name", "norm", "written")

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module, self.name = module, name
        self.written = name.startswith("running_")
        self.norm = module if isinstance(module, _NormBase) else None


def _floating(kernel: nn.Module) -> tuple[_Buffer, ...]:
    found = kernel.__dict__.get(FLOATING_BUFFERS)
    if found is None:
        found = tuple(
            _Buffer(module, name)
            for module in kernel.modules()
            for name, b in module._buffers.items()
            if b is not None and b.is_floating_point()
        )
        kernel.__dict__[FLOATING_BUFFERS] = found
    return found


Held = list[tuple[_Buffer, torch.Tensor, int, torch.Tensor | None]]


def buffers_held(kernel: nn.Module) -> Held:
    """Before a guarded call: each floating buffer of ``kernel`` with its version and, if it
    is one a call writes, a copy of its values; empty (a dict read) for the usual kernel,
    which has none. A buffer first seen written in a call is copied from the next call on.
    Nothing under a ``torch.func`` transform (its wrapped buffers take no ``.data`` write)."""
    entries = _floating(kernel)
    if not entries or functorch_active():
        return []
    held: Held = []
    compiling = torch.compiler.is_compiling()  # compiled: no version read (nor learning)
    try:
        for entry in entries:
            buffer = entry.module._buffers.get(entry.name)
            if entry.norm is not None and not entry.norm.training:
                continue  # an eager batch norm in eval mode writes nothing
            if buffer is not None and (entry.written or not compiling):
                copy = buffer.detach().clone() if entry.written else None
                held.append((entry, buffer, -1 if compiling else version_count(buffer), copy))
    except Exception:  # (out of memory for a copy): the call runs unguarded, never fails here
        logger.debug("a kernel's buffers could not be held", exc_info=True)
        return []
    return held


def forget_buffers(model: nn.Module) -> None:
    """Drop what ``buffers_held`` found from every kernel in ``model`` (``kasmina.merge``: a
    merged model holds nothing of Kasmina's, in its modules or their pickles)."""
    for module in model.modules():
        module.__dict__.pop(FLOATING_BUFFERS, None)


def keep_finite(held: Held) -> None:
    """After the call: every element of a copied buffer that was finite before it and is not
    now takes its value from before it (no host read: one ``where``); one that was not finite
    already (a running minimum started at infinity) is the call's. A buffer not copied is
    marked written if its version moved (``buffers_held`` copies it from then on). Written
    through ``.data``, as ``kept_buffers`` does, so that a version a pending backward checks
    (batch norm saves its statistics) does not move. A failure here is logged, never raised:
    the call's output stands either way."""
    try:  # (no grad-mode block, whose Python exit could take a Ctrl-C: ``.data`` records none)
        for entry, buffer, version, before in held:
            if before is None:  # not copied: whether the call wrote it, for the next
                entry.written = version_count(buffer) != version
            elif buffer.shape == before.shape:  # batch norm moves no version: all copied
                kept = buffer.data.isfinite() | ~before.isfinite()
                buffer.data.copy_(torch.where(kept, buffer.data, before))
    except Exception:
        logger.debug("a kernel's buffers could not be kept finite", exc_info=True)


@contextlib.contextmanager
def kept_buffers(*modules: nn.Module) -> Iterator[None]:
    """Put the buffers of ``modules`` back as they were on entry, however the block exits: a
    forward that is only a measurement (a FLOP count, ``evaluate_seeds``) leaves no trace in
    them. It matters for batch-norm statistics that ``eval()`` cannot freeze: a kernel
    exported in train mode updates them on every call. Values are copied back in place (the
    buffer objects stay) where the block wrote them (its version moved, or its values did:
    a write through ``.data``), through ``.data``: a version a pending backward that saved the
    buffer checks does not move; a buffer whose shape changed is left alone, and so is a lazy
    module's uninitialised one (the block is what sizes it: a publish's trial run). A buffer
    the block replaced (``self.h = h.detach()``: a streaming RNN's state) gets its own object
    back, under its name (copying into the old object left the measurement's state in place)."""
    buffers = [
        (owner, name, b, version_count(b), b.detach().clone())
        for m in modules
        for owner in m.modules()
        for name, b in owner._buffers.items()
        if b is not None and not is_lazy(b)
    ]
    try:
        yield
    finally:  # (no grad-mode block: a Ctrl-C at its exit's entry left grad mode off)
        for owner, name, buffer, version, saved in buffers:
            if owner._buffers.get(name) is not buffer:
                owner._buffers[name] = buffer
            same = version_count(buffer) == version and torch.equal(buffer, saved)
            if buffer.shape == saved.shape and not same:
                buffer.data.copy_(saved)  # ``.data``: recorded by no graph


# The layers that draw random numbers in training: a plain module holding one draws, whatever
# its ``p`` at attach (a schedule may raise a ``Dropout(0)``'s later).
# ``MultiheadAttention`` draws its attention dropout in its forward (a float ``dropout``, no layer).
_RANDOM_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                  nn.FeatureAlphaDropout, nn.RReLU, nn.MultiheadAttention)  # fmt: skip


def _seeded(kind: str) -> bool:
    """Whether a TorchScript node kind (``aten::dropout``) is a seeded random op."""
    namespace, _, name = kind.partition("::")
    packet = getattr(torch.ops.aten, name, None) if namespace == "aten" else None
    return packet is not None and any(
        torch.Tag.nondeterministic_seeded in getattr(packet, overload).tags
        for overload in packet.overloads()
    )


def _script_draws(module: torch.jit.ScriptModule) -> bool:
    """Whether a TorchScript module's forward (its submodules' calls inlined, every branch)
    has a seeded random op: a scripted ``F.dropout`` or ``torch.rand`` counts, which a plain
    module's forward hides. A module without a forward draws nothing."""
    try:
        graph = module.inlined_graph  # held: its blocks die with it
    except (AttributeError, RuntimeError):
        return False
    blocks = [graph.block()]
    while blocks:
        for node in blocks.pop().nodes():
            if _seeded(node.kind()):
                return True
            blocks.extend(node.blocks())
    return False


def _draws(module: nn.Module) -> bool:
    if module.__dict__.get("draws_random"):  # a ``GPUKernel``'s, inside a wrapper or compiled
        return True
    if isinstance(module, torch.jit.ScriptModule):
        return _script_draws(module)
    return isinstance(module, _RANDOM_LAYERS)


def marked_random(kernel: nn.Module) -> nn.Module:
    """``kernel``, marked ``draws_random`` (what an artifact's program says of itself) when it
    holds a random layer (at any ``p``), a TorchScript module whose graph has a seeded random
    op, or a module marked so (a ``GPUKernel``): the guard then runs it forked on its own
    stream before ACTIVE (``faults.call_kernel``), as it runs such an artifact. Unmarked, its
    draws shifted the global stream, and so every later dropout mask of the host's. The flag
    is written into the kernel's own ``__dict__``, where the guard reads it: a compiled
    kernel's ``setattr`` would put it on the module it wraps. Random calls in a plain
    (eager or compiled) module's own forward (``F.dropout``, ``torch.rand``) are not seen."""
    if "draws_random" not in vars(kernel) and any(_draws(m) for m in kernel.modules()):
        kernel.__dict__["draws_random"] = True
    return kernel


def own_stream(
    kernel: torch.nn.Module, device: torch.device, seed_id: str, position: int | None
) -> None:
    """Inside ``rng_forked``: reseed the forked generator of ``device`` (the CPU's or a
    GPU's) from its own state, the seed's id and the stream's ``position``: the seed's
    ``draw_step``, which its manager moves at every optimizer step and a checkpoint saves, or
    (None: a seed no manager steps) the version counters of the kernel's parameters. The id
    (its CRC-32: the same in every process) gives each seed a stream of its own: without it,
    seeds that run with no host draw between them, in one slot or in two, drew the same
    dropout masks.

    The fork alone would hand the kernel the global stream's next numbers without consuming
    them, so a seed beside a host that draws nothing would get the same dropout mask at every
    step. The position moves with every optimizer step, so each step draws anew; within a step
    it stands still, and an activation-checkpointing recompute (which restores the global state
    first) draws what the forward drew. A saved position is restored with the weights, so a
    rollback goes on drawing exactly what the run drew, and a seed ``kasmina.load`` restored
    without a manager starts there and moves on with its own updates (version counters are
    not saved, and a load moves them: ``extra_state.stream_position``).
    Host reads only: the GPU generator's seed and offset live on the host."""
    version = sum(version_count(p) for p in kernel.parameters()) if position is None else position
    stream = zlib.crc32(seed_id.encode())
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        generator = torch.cuda.default_generators[index]
        key = hash((generator.initial_seed(), generator.get_offset(), stream, version))
    else:
        generator = torch.random.default_generator
        key = hash((zlib.crc32(generator.get_state().numpy()), stream, version))
    generator.manual_seed(key & (2**63 - 1))


_NOTHING_PUSHED = contextlib.nullcontext()


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    # Detached: a saved output kept with its own grad_fn is a reference cycle through C++
    # that nothing frees (a Tanh's output, every step). Unpacking restores its autograd links.
    return tensor.detach()


def island_saves(
    active: bool, compiling: bool | None = None
) -> contextlib.AbstractContextManager[Any]:
    """Around a kernel's call before ACTIVE: the tensors its graph saves are kept as they are,
    past any saved-tensor hooks of the caller's (activation checkpointing's, non-reentrant).

    That graph is an island (the kernel sees ``x.detach()``) whose backward the seed's guard
    runs in an engine call of its own. Checkpointing would drop what it saves and recompute the
    region when the outer backward first needs one of its tensors; an unpack from the island's
    own engine call is another graph task, so each slot's island re-ran the whole region once
    more (host side effects included: a BatchNorm's statistics), and a kernel that saved a
    tensor and then raised left the recompute (which no longer calls a seed the fault
    quarantined) one tensor short (``CheckpointError``). Kept, the island's tensors live until
    its backward (a seed's kernel is small beside the host). An ACTIVE seed's graph is the
    host's: the caller's hooks apply. Nothing is pushed without a caller's hooks or compiled
    (``compiling``: the caller's read of ``torch.compiler.is_compiling()``, if it has one)."""
    if (
        active
        or (torch.compiler.is_compiling() if compiling is None else compiling)
        or torch._C._autograd._top_saved_tensors_default_hooks(False) is None
        or not torch._C._autograd._saved_tensors_hooks_is_enabled()
    ):
        return _NOTHING_PUSHED  # (one object for every call: it holds no state)
    return torch.autograd.graph.saved_tensors_hooks(_keep, _keep)
