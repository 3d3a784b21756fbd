"""The kernel manager: one façade over the parts, for a training loop (docs/design.md §3-§7).

``KasminaKernelManager`` owns the command handler, the Urza client and kernel cache, the state
table of the host's slots, the optimizers, the isolation checks, the KD teacher, epoch
checkpoints and rollback, and telemetry. It is a façade over components that do not know it:

- ``state`` -- ``ManagerState``: the fields the components share (settings and services, the
  slot registry, optimizers, the training clock, counters). Components receive the state and the
  other components they call, never the manager.
- ``config`` -- ``KasminaConfig``: every setting, validated once.
- ``slots`` / ``records`` -- ``SlotRegistry``/``SeedRecord``: the managed model's seeds by id,
  with what the manager keeps per seed (kernel, pin, monitor, timeline); ``held`` --
  ``ModelHold``: at each step, whether the model still holds the slots and parameters
  registered with it.
- ``guard`` -- ``IsolationGuard``: the per-step isolation checks and the seeds' monitors.
- ``executor`` -- ``CommandExecution``: what each verified command does; every operation
  completes or leaves the seed as it was (validate and load first, then mutate).
- ``intake`` / ``pending`` -- ``CommandIntake``: a command's path from arrival (verified, then
  queued in the ``CommandQueue``, its kernel fetch running ahead) to the training thread's safe
  point, where its nonce is made durable and it is applied.
- ``checkpoints`` / ``rollback`` -- signed epoch checkpoints on a cadence, written atomically,
  and the rollback that verifies one, then rebuilds its seed and optimizer layout before it loads
  any weight.
- ``report`` / ``perf_targets`` -- ``ManagerReport``: events, Leyline telemetry packets and
  measured performance, each docs/design.md §8 target checked (``TargetCheck``); the targets
  it measures on itself and how each is timed.

The manager is the executor the command handler is given (the ``CommandExecutor`` protocol); it
serialises command execution and the training step with one lock. Imports the four middle
packages (seeds, isolation, urza, control) and everything below them; only the demo and the CLI
import the manager.
"""

from kasmina.manager.config import KasminaConfig
from kasmina.manager.manager import KasminaKernelManager
from kasmina.manager.state import ManagerState

__all__ = ["KasminaConfig", "KasminaKernelManager", "ManagerState"]
