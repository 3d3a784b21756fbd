"""Seeds and the slots that hold them in a host network (docs/design.md §3, §4).

- ``seed`` -- ``GradientIsolatedSeed``: a small trainable kernel over a ``chunk_size``-wide slice
  of a host layer's output. Its forward follows its lifecycle stage (§3's table): DORMANT and
  the side stages pass the host activations through; ISOLATED_INIT runs the kernel on
  ``x.detach()`` in straight-through ``incubate`` mode (value and host gradient exactly as
  without the seed); GRAFTING blends with a sigmoid alpha; ACTIVE is fossilized. Until ACTIVE
  the seed only ever sees ``x.detach()``. Non-finite output falls back to the host output on the
  device and is noticed at the step boundary, without a host sync in the forward.
- ``layer`` -- ``KasminaLayer``: wraps one host module and applies all of its seeds in one pass
  with a per-chunk alpha (one fused ``alpha_blend``); ``outputs`` picks the tensor of a host's
  output (tuple, dataclass, ...) that the seeds apply to and puts it back.
- ``faults`` -- what a seed's fault is and the guards that contain it: the host half around a
  kernel call, the device-side finite test, the guarded backward node, and the one-node
  guarded blend of a layer's GRAFTING/STABILIZATION seeds; ``charging`` -- a fault counted and
  quarantined at once, or, in a multi-rank run, held for the collective that charges every
  rank's faults on every rank alike.
- ``recompute`` -- what a slot can tell of the activation checkpointing around it: the
  non-reentrant region (and recompute) a call runs in, each region's teacher logits for its
  recomputes, and a reentrant checkpoint's first run that will record a graph.
- ``masks`` -- ``ChunkMasks``: a slot's per-chunk masks of one call (the seeds that passed the
  host through, those that do not blend beside a GRAFTING one), made once per pattern.
- ``inject`` -- ``attach``/``detach``: wrap the named modules of any ``nn.Module`` in slots (PEFT's
  injection by module name) and put the originals back.
- ``table`` -- ``GPUStateTensor``: the ``[num_seeds, 10]`` int32 state table on the device, updated
  by one fused ``lifecycle_update`` launch per batch of transitions, with a host mirror of the
  stages so the forward never waits for the device.
- ``gates`` -- G1..G5 as plain functions over plain measurements, so they can be evaluated and
  tested anywhere; ``dry_run`` -- what GERMINATE's dry run finds wrong with one call of a kernel.
- ``extra_state`` -- a seed's bookkeeping as a tensor in any ``state_dict``, read and checked
  in full before a restore changes anything; ``load_hooks`` -- whether a saved state (and its
  kernel's weights and alpha) fits the live seed, asked by the ``load_state_dict`` pre-hooks of
  the seeds and their slots before any module loads.

Imports ``kasmina.kd``, ``kasmina.ops``, ``kasmina.utils`` and the root vocabulary; never the other
middle packages (isolation, urza, control) nor the manager, which composes them.
"""

from kasmina.seeds.gates import GateResult
from kasmina.seeds.inject import attach, collect_kd_losses, detach, kasmina_layers
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.seeds.table import GPUStateTensor

__all__ = [
    "GPUStateTensor",
    "GateResult",
    "GradientIsolatedSeed",
    "KasminaLayer",
    "attach",
    "collect_kd_losses",
    "detach",
    "kasmina_layers",
]
