"""Gradient isolation, enforced and verified (docs/design.md §4).

The invariant, until a seed is ACTIVE: no gradient flows from a seed's path into a host
parameter; in ISOLATED_INIT every host gradient is bit-identical to a run without the seed; seed
and host parameters are disjoint sets stepped by separate optimizers, and a seed-only loss (KD)
leaves every host gradient zero.

It is enforced structurally and checked here:

- ``ownership`` -- ``ParameterOwnership``: every parameter belongs to exactly one owner (the host,
  one seed, or the teacher); an overlap is refused at registration (``ParameterOverlapError``).
- ``optimizers`` -- ``IsolatedOptimizerManager``: one optimizer per owner over disjoint sets,
  fused gradient clipping through ``kasmina.ops.grad_norms`` (its norm checked by
  ``checked_clip_norm`` before anything changes), promotion of a fossilized seed into the host
  optimizer, and the dispatch of a controller's optimizer commands onto these calls.
- ``optimizer_state`` -- each optimizer's recorded layout (``OptimizerEntry``: the seeds
  promoted into it, the groups a user added) and its state saved with it: checked against the
  live optimizers before a load changes anything, a format-1 state upgraded.
- ``optimizer_commands`` -- ``read_optimizer_command``: the type gate of that dispatch (only a
  ``VerifiedOptimizerCommand`` gets in; a wire message is a ``TypeError``) and the command read
  into plain values (``OptimizerOrder``). It knows no optimizer.
- ``stepping`` -- how those optimizers step: gradients clipped per optimizer (a norm that is not
  finite leaves them as they were), state that follows its parameters through a model
  conversion, and a seed optimizer's step that cannot stop the host's.
- ``sparse_trial`` -- ``sparse_gradient_problem``: whether the seeds' optimizer class can step
  a kernel's sparse gradients (one step on throwaway copies), asked by GERMINATE's dry run.
- ``verify`` -- ``verify_gradient_isolation``: walks the autograd graph of a seed's output and
  fails if it reaches a host parameter.
- ``monitor`` -- ``GradientIsolationMonitor``: the two-phase protocol (``begin_seed_backward`` /
  ``end_seed_backward``, host likewise) that checks with one ``leak_check`` launch that the
  other side's gradients stayed zero, and the circuit breaker: after ``max_violations`` the seed
  is quarantined, an emergency checkpoint is written atomically into the configured directory,
  and ``GradientIsolationViolationError`` is raised. The host keeps training.

Imports ``kasmina.kd`` (teacher parameters), ``kasmina.ops``, ``kasmina.utils`` and the root
vocabulary; never seeds, urza, control or the manager. Each name is imported from its module:
this package re-exports nothing.
"""
