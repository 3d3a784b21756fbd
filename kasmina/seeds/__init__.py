"""Seeds and the slots that hold them in a host network (docs/design.md §3, §4, §6a).

The seed and its slot:

- ``seed`` -- ``GradientIsolatedSeed``: a small trainable kernel over a ``chunk_size``-wide slice
  of a host layer's output, whose forward follows its lifecycle stage (§3's table); until ACTIVE
  it only ever sees ``x.detach()``, and non-finite output falls back to the host's on the device.
- ``layer`` -- ``KasminaLayer``: wraps one host module and applies all of its seeds in one pass
  with a per-chunk alpha (one fused ``alpha_blend``).
- ``forwarding`` -- ``HostForwarding``, the slot's base: it reads, writes and deletes the
  attributes of the module it wraps as that module would.
- ``outputs`` -- the tensor of a host's output (tuple, dataclass, nested tensor) that the seeds
  apply to, and the result put back in its place.
- ``inject`` -- ``attach``/``detach``: wrap the named modules of any ``nn.Module`` in slots (PEFT's
  injection by module name) and put the originals back.
- ``hf`` -- Hugging Face models: tied-weight names and output-recording hooks follow the slots.

One call of a slot:

- ``masks`` -- ``ChunkMasks``: a slot's per-chunk masks of one call (the seeds that passed the
  host through, those that do not blend beside a GRAFTING one), made once per pattern.
- ``recompute`` -- what a slot can tell of the activation checkpointing around it, so that a
  recompute takes its first run's path.
- ``side_effects`` -- what a kernel's call changes besides its output (random draws, its own
  buffers), and the guards that keep the host's as they would be without it.
- ``constants`` -- a slot's data-less buffers (flags, alphas), rebuilt after a deferred init.

Faults, contained:

- ``faults`` -- what a seed's fault is and the forward's guards: the host half around a kernel
  call, the device-side finite tests, the host's chunk put in place of a failed seed's.
- ``compiled_cut`` -- an ACTIVE seed's gradient cut under ``torch.compile``, which records a
  non-finite input gradient of its kernel's own backward in the seed's cut flag.
- ``island`` -- the backward guard (a kernel's own backward, run where a raise is contained) and
  the one-node guarded blend of a layer's GRAFTING/STABILIZATION seeds built on it.
- ``param_hooks`` -- the hooks on a kernel parameter the backward guard hands no gradient: what
  they raise on that None is contained.
- ``kd_faults`` -- a KD loss that raises inside the host's forward, contained as a fault.
- ``charging`` -- a fault counted and quarantined at once, or, in a multi-rank run, held for the
  collective that charges every rank's faults on every rank alike.
- ``sat_out`` -- a slot's calls that its seeds, or their KD, sat out: counted, logged at a
  bounded rate.

The lifecycle:

- ``table`` -- ``GPUStateTensor``: the ``[num_seeds, 10]`` int32 state table on the device, updated
  by one fused ``lifecycle_update`` launch per batch of transitions, with a host mirror of the
  stages so the forward never waits for the device.
- ``columns`` -- the values of the table's non-stage columns: fractions in fixed point
  (``SCALE``), an artifact id as its BLUEPRINT_ID hash.
- ``observers`` -- who hears of the table's changes (a seed's transitions, every change), held
  weakly and called so that one failing party does not stop the others.
- ``stage_entry`` -- a seed's own reaction to a transition of its row, and the completion of
  the part of it that failed.
- ``kernel_watch`` -- who hears that a seed's kernel came or went (``wrap_ddp``'s ignore list).
- ``gates`` -- G1..G5 as plain functions over plain measurements, so they can be evaluated and
  tested anywhere; ``dry_run`` -- what GERMINATE's dry run finds wrong with one call of a kernel.

Saved state:

- ``extra_state`` -- a seed's bookkeeping as a tensor in any ``state_dict``, read and checked
  in full before a restore changes anything.
- ``load_hooks`` -- whether a saved state (and its kernel's weights and alpha) fits the live
  seed, asked by the ``load_state_dict`` pre-hooks of the seeds and their slots before any
  module loads.

Imports ``kasmina.kd``, ``kasmina.ops``, ``kasmina.utils`` and the root vocabulary; never the other
middle packages (isolation, urza, control) nor the manager, which composes them. Each name is
imported from its module: this package re-exports nothing (``attach``, ``KasminaLayer`` and the
other names a user needs are ``kasmina.attach``, ``kasmina.KasminaLayer``, ...).
"""
