"""What the kernel manager knows about one seed slot (``SeedRecord``), and the forward hook it
puts on the seed's kernel (``KernelHook``). ``SlotRegistry`` (``manager/slots.py``) holds one
record per seed of the slots it registered.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kasmina.isolation.monitor import GradientIsolationMonitor
from kasmina.ops.transforms import functorch_active
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.outputs import ActivationSpec, activation_spec
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.stages import ISOLATED_STAGES, SeedStage
from kasmina.urza.kernel import GPUKernel

__all__ = ["TIMELINE_SIZE", "KernelHook", "SeedRecord"]

# A seed's timeline keeps its latest stage changes only (a run may recycle a seed for ever).
TIMELINE_SIZE = 1000


class KernelHook:
    """The forward hook the manager puts on a seed's kernel: calls its record's ``capture``.

    The hook lives in the kernel's hook table, inside the model's module tree, while the record
    belongs to the manager (its monitor holds the checkpoint key, locks and telemetry). A deep
    copy or a pickle of the model therefore gets an inert hook instead of a copy of the
    manager: the copy is nobody's managed seed."""

    def __init__(self, record: SeedRecord | None) -> None:
        self.record = record

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.record is not None:
            self.record.capture(module, args, output)

    def __deepcopy__(self, memo: dict[int, Any]) -> KernelHook:
        return KernelHook(None)

    def __reduce__(self) -> tuple[Any, ...]:
        return (KernelHook, (None,))


@dataclass(eq=False)
class SeedRecord:
    """What the manager knows about one seed slot."""

    seed_id: str
    index: int
    seed: GradientIsolatedSeed
    slot: KasminaLayer
    artifact_id: str | None = None
    kernel: GPUKernel | None = None  # the seed's own trainable copy
    pinned: bool = False  # the cached original is pinned on this seed's behalf
    monitor: GradientIsolationMonitor | None = None
    hook: Any = None  # RemovableHandle of the kernel forward hook
    last_output: torch.Tensor | None = None  # for the per-step autograd-graph check
    input_grad: bool = False  # an isolated kernel's input carried a graph (it was not detached)
    bad_gradients: int = 0  # clipped steps running whose norm was not finite, the host's was
    last_input: ActivationSpec | None = None  # the seed's last real input (G3 probe shape)
    # (epoch, step, stage) of the latest TIMELINE_SIZE stage changes (``timeline``)
    _timeline: deque[tuple[int, int, str]] = field(
        default_factory=lambda: deque(maxlen=TIMELINE_SIZE), init=False, repr=False
    )

    @property
    def stage(self) -> SeedStage:
        return self.seed.stage

    @property
    def timeline(self) -> tuple[tuple[int, int, str], ...]:
        """(epoch, step, stage) of the latest ``TIMELINE_SIZE`` stage changes, copied in one C
        call: an exporter walking the live deque while a transition on another thread (a safe
        point's command, a serving thread's quarantine) appended raised "deque mutated during
        iteration"."""
        return tuple(self._timeline.copy())

    def note_stage(self, epoch: int, step: int, stage: SeedStage) -> None:
        """Add a stage change to the timeline (the oldest goes past ``TIMELINE_SIZE``)."""
        self._timeline.append((epoch, step, stage.name))

    def restore_timeline(self, entries: tuple[tuple[int, int, str], ...]) -> None:
        """Put back a timeline read before (``timeline``): an undone command's."""
        self._timeline.clear()
        self._timeline.extend(entries)

    @property
    def graft_steps(self) -> int:
        """The alpha schedule's step (GRAFTING), kept by the seed (``graft_step``) and saved in
        its extra state: a ``state_dict`` load mid-GRAFTING brings the schedule back with the
        seed's alpha, and the next ``step()`` goes on from there."""
        return self.seed.graft_step

    @graft_steps.setter
    def graft_steps(self, steps: int) -> None:
        self.seed.graft_step = int(steps)

    def capture(self, _module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Forward hook on the seed's kernel: keep its output (for the step's graph check while
        the seed is isolated), whether its input needs a gradient, and its input shape (for G3).

        An isolated kernel sees ``x.detach()``, so an input that needs a gradient is a path
        around the detach into the host. Under ``torch.compile`` that is the traced input's
        metadata, so it holds where the output's graph cannot be walked (docs/design.md §4)."""
        if self.seed.stage in ISOLATED_STAGES and not functorch_active():
            # Not kept: a forward without a graph (``no_grad``, ``generate``; nothing to check,
            # and it would keep an activation alive until the next step), or one under a
            # torch.func transform (a compiled one would return its wrapper). ``requires_grad``,
            # not ``grad_fn``: TorchDynamo traces this hook, and refuses to read a ``grad_fn``.
            if isinstance(output, torch.Tensor) and output.requires_grad:
                self.last_output = output
            if (  # under ``no_grad`` no graph is built: an input's flag leads nowhere
                args
                and isinstance(args[0], torch.Tensor)
                and args[0].requires_grad
                and torch.is_grad_enabled()
            ):
                self.input_grad = True
        if args:
            self.last_input = activation_spec(args[0]) or self.last_input

    def hook_kernel(self, kernel: nn.Module) -> None:
        """Put :meth:`capture` on ``kernel`` as a forward hook (``self.hook`` is its handle)."""
        self.hook = kernel.register_forward_hook(KernelHook(self))

    def clear_kernel(self) -> GPUKernel | None:
        """Forget the kernel (hook removed, references dropped); returns it."""
        kernel, self.kernel = self.kernel, None
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        self.last_output = None
        self.input_grad = False
        self.monitor = None
        self.bad_gradients = 0
        return kernel
