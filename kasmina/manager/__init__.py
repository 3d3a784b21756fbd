"""The kernel manager: one façade over the parts, for a training loop (docs/design.md §3-§7).

``KasminaKernelManager`` owns the command handler, the Urza client and kernel cache, the state
table of the host's slots, the optimizers, the isolation checks, the KD teacher, epoch
checkpoints and rollback, and telemetry. It is a façade over components that do not know it.

The façade and what it shares:

- ``manager`` -- ``KasminaKernelManager``: the doors a training loop calls (attach, step,
  backward, end_epoch, commands, close), wiring the components below under one lock.
- ``config`` -- ``KasminaConfig``: every setting, validated once; ``config_values`` -- the
  checks of one setting's value it uses (paths, bounded numbers, ids, publisher keys).
- ``state`` -- ``ManagerState``: the fields the components share (settings and services, the
  slot registry, optimizers, the training clock, counters). Components receive the state and the
  other components they call, never the manager.
- ``slots`` / ``records`` -- ``SlotRegistry``/``SeedRecord``: the managed model's seeds by id,
  with what the manager keeps per seed (kernel, pin, monitor, timeline).
- ``held`` -- ``ModelHold``: at each step, whether the model still holds the slots and
  parameters registered with it.
- ``exclusive`` -- one manager per model: what a new registration, or a teacher loaded in place,
  may not share with a live manager's model.

Each step:

- ``guard`` -- ``IsolationGuard``: the per-step isolation checks and the seeds' monitors.
- ``step_flags`` -- ``settle_step_flags``: the step's device flags read in one transfer, the
  isolation verdict checked and agreed across ranks, the running seeds' flags settled.
- ``teaching`` -- the KD teacher the manager builds, and the teacher logits and head it hands
  its slots.

Commands:

- ``intake`` / ``pending`` -- ``CommandIntake``: a command's path from arrival (verified, then
  queued in the ``CommandQueue``, its kernel fetch running ahead) to the training thread's safe
  point, where its nonce is made durable and it is applied.
- ``executor`` -- ``CommandExecution``: what each verified command does; every operation
  completes or leaves the seed as it was (validate and load first, then mutate).
- ``post_commit`` -- what a transition does once the table applied it, and the completion,
  retried at later safe points, of what of it failed.

Gate G5's measurement:

- ``evaluation`` -- ``evaluate_seeds``: each live seed's benefit, measured by ablation on the
  caller's validation batches; ``batches`` -- how it reads a batch; ``ablation`` -- its
  forwards (the model watched, one seed's chunk put back to the host's, one random draw per
  batch, kernels on copies of their buffers).

Checkpoints and rollback:

- ``checkpoints`` -- signed epoch checkpoints on a cadence, written atomically, in memory or on
  disk.
- ``training_state`` -- what a checkpoint holds, captured and restored (validated before any
  change).
- ``rollback`` -- the rollback that verifies a checkpoint, then rebuilds its seed and optimizer
  layout before it loads any weight; ``rollback_plan`` -- its first phase, which only reads and
  builds beside the live objects (the checkpoint's fields checked, its optimizers rebuilt).
- ``tracked`` -- the user's tracked objects (an LR scheduler, a ``GradScaler``, an EMA model) in
  the epoch checkpoints and back out of them.
- ``runs`` -- earlier runs' directories under ``runs_root``: ``list_runs``, ``prune_runs``.

Reports:

- ``report`` -- ``ManagerReport``: events, Leyline telemetry packets and measured performance,
  each docs/design.md §8 target checked (``TargetCheck``).
- ``perf_targets`` -- the targets it measures on itself, and how each is timed.

Other drivers of the step:

- ``framework`` -- ``ManagerOptimizer``, ``ManagerScheduler``: the manager's step as the
  optimizer and scheduler a training framework (transformers' ``Trainer``) drives.
- ``ddp`` -- ``wrap_ddp``, ``DistributedKasmina``: data-parallel runs, DDP for the host and
  Kasmina for its seeds.
- ``wrap_records`` -- what ``wrap_ddp`` decided about each model, one record its readers share.
- ``grad_sync`` -- ``SeedGradientSync``: the seeds' gradients averaged across ranks, once per
  step.
- ``coordination`` -- ``ManagerReplica``, ``ManagerApplier``: the manager as a
  ``DistributedCoordinator`` sees it, a replica to compare and repair and an applier of the
  commands the ranks agreed on.

The manager is the executor the command handler is given (the ``CommandExecutor`` protocol); it
serialises command execution and the training step with one lock. Imports the four middle
packages (seeds, isolation, urza, control) and everything below them; only the demo and the CLI
import the manager. Each name is imported from its module: this package re-exports nothing
(``KasminaKernelManager`` and ``KasminaConfig`` are ``kasmina.KasminaKernelManager`` and
``kasmina.KasminaConfig``).
"""
