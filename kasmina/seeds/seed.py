"""A seed: a small trainable module grafted into a host in gradient isolation (docs/design.md
§3 stages, §4 isolation, §6a faults). Its stage lives in a
:class:`~kasmina.seeds.table.GPUStateTensor` (its own one-row table, or a slot of a table shared
by many seeds); the forward reads the table's host mirror, so it never waits for the device.
Until a seed is ACTIVE it only ever sees ``x.detach()``.

Fault containment: the host's training step never depends on a seed behaving. Every call into
the kernel on the host's path (``forward``, a ``KasminaLayer``'s forward, ``probe``) is guarded
(:mod:`kasmina.seeds.faults`), and a fault makes the seed stand aside for that call: a kernel
that raises or returns the wrong thing gives the host activations back at once (value and
gradient, as a DORMANT seed); a non-finite output is replaced by the host's on the device and
remembered in a device flag, which :meth:`GradientIsolatedSeed.poll_nonfinite` reads at a step
boundary; before ACTIVE a backward that raises costs the seed that step's gradient. Each fault
is counted, kept in a short ``fault_log``, reported and logged at a bounded rate; at
``fault_limit`` faults the seed goes to QUARANTINE (an ACTIVE seed cannot, so it keeps falling
back and counting). A stand-alone seed guards itself; a ``KasminaLayer`` guards its seeds
together. Under ``torch.compile`` the guard is traced with the forward (no graph break while the
seed is healthy); a fault found while tracing reaches the bookkeeping through a graph break.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kasmina.errors import IllegalTransitionError, KernelInputRefused
from kasmina.kd.config import KDConfig
from kasmina.kd.graph import mark_students, sum_kd_losses
from kasmina.ops.alpha_blend import seed_blend
from kasmina.seeds.charging import charge, charge_or_defer, loses_step
from kasmina.seeds.compiled_cut import CUT_REASON, settled_flags
from kasmina.seeds.constants import SEED_FLAGS, add_missing_flag, keep_constants, reset_flags
from kasmina.seeds.extra_state import (
    SavedSeedState,
    checked_schedule,
    checked_setting,
    copied_seed_state,
    encode_extra_state,
    restore_seed_state,
    seed_bookkeeping,
    stream_position,
)
from kasmina.seeds.faults import (
    DEFAULT_FAULT_LIMIT,
    FAULT_LOG_SIZE,
    FELL_BACK,
    call_kernel,
    cut_nonfinite_gradient,
    finite_test,
    gradient_flags,
    kernel_modules,
    output_sum,
    plain_eager,
    record_fallbacks,
    short_reason,
    uncharged,
)
from kasmina.seeds.gates import (
    CompatibilityProbe,
    GateResult,
    ProbeFault,
    SeedEvaluation,
    gate_g1_kernel_ready,
    gate_g2_isolated_training,
    gate_g3_probed,
    gate_g4_alpha,
    gate_g5_performance,
    guarded_probe,
    sigmoid_alpha,
)
from kasmina.seeds.island import contain_backward
from kasmina.seeds.kd_faults import seed_kd_or_fault
from kasmina.seeds.kernel_watch import kernel_changed
from kasmina.seeds.load_hooks import check_seed_state, seed_load_pre_hook
from kasmina.seeds.recompute import RegionRuns, checkpoint_region
from kasmina.seeds.side_effects import marked_random
from kasmina.seeds.stage_entry import enter, settle
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import (
    GATE_FOR_TRANSITION,
    ISOLATED_TRAINING_STAGES,
    LEGAL_TRANSITIONS,
    NEXT_STAGE,
    RUNS_KERNEL,
    SeedStage,
    parse_stage,
)
from kasmina.utils.checks import check_positive_int
from kasmina.utils.conversions import count_conversion
from kasmina.utils.flags import read_flags

logger = logging.getLogger(__name__)
_ACTIVE = SeedStage.ACTIVE  # (a member read through the class costs a metaclass hook a call)


class GradientIsolatedSeed(nn.Module):
    """One seed over a ``chunk_size``-wide slice of a host layer's output.

    ``state``/``index`` place the seed in a shared state table (``kasmina.attach`` does this);
    without them it owns a one-row table on the CPU that follows ``.to(device)``. ``fault_limit``:
    contained faults (the module docstring) after which it is quarantined."""

    # The host activations' dim the chunk spans: the last, or a KasminaLayer's (1 for a conv).
    chunk_dim: int = -1
    # Where faults go while ``evaluate_seeds`` measures the seed: seen there, never counted.
    observed_faults: list[str] | None = None
    # The stage whose entry's writes failed, to complete (``stage_entry``); None: all written.
    unsettled: SeedStage | None = None
    # The stage as an int, kept by the table's listener: what a compiled forward reads (Dynamo
    # guards an int by value, no SeedStage: see KasminaLayer._refresh_plan). None: an old pickle.
    _stage_code: int | None = None
    # Whether a recompute calls its kernel again, per call of a checkpoint region's first run.
    _kernel_runs: RegionRuns | None = None

    def __init__(
        self,
        chunk_size: int,
        seed_id: str,
        kd_config: KDConfig | None = None,
        *,
        state: GPUStateTensor | None = None,
        index: int = 0,
        fault_limit: int = DEFAULT_FAULT_LIMIT,
    ) -> None:
        super().__init__()
        chunk_size = check_positive_int("chunk_size", chunk_size)  # True was a chunk of 1
        if not isinstance(seed_id, str) or not seed_id:
            raise ValueError("seed_id must be a non-empty string")
        self.chunk_size, self.seed_id = chunk_size, seed_id
        self.kd_config = kd_config if kd_config is None or kd_config.enabled else None
        self.state_table = state if state is not None else GPUStateTensor(1, "cpu")
        self.state_index = self.state_table.check_index(index)
        self.register_module("kernel", None)
        cpu = torch.device("cpu")  # not the default device: a "meta" one made data-less buffers
        self.register_buffer("alpha", torch.zeros((), dtype=torch.float32, device=cpu))
        # Outputs of forwards with grad since the last poll all finite (ANDed on the device),
        # whether one that was not had a finite input (a fault), whether a compiled ACTIVE
        # backward cut a non-finite input gradient of its own: views of the layer's flags.
        for name, value in SEED_FLAGS.items():
            self.register_buffer(name, torch.full((), value, device=cpu), persistent=False)
        self.isolation_violations = self.nonfinite_events = self.faults = 0
        # guard_backward: the kernel's backward in a guarded node before ACTIVE (its cost:
        self.fault_limit, self.guard_backward = fault_limit, True  # perf/bench_faults.py)
        self.fault_log: deque[str] = deque(maxlen=FAULT_LOG_SIZE)
        self._gate_score = self._performance_gate = self._alpha_value = 0.0
        # GRAFTING's schedule step (0 on entry), saved in the extra state: a load goes on there.
        self.graft_step = 0
        self.draw_step: int | None = None  # a random kernel's stream position (own_stream)
        self._loaded_draws: list[int | None] | None = None  # a load's, unowned (stream_position)
        # G2's evidence: the epochs of ISOLATED_INIT in which its optimizer stepped the seed, and
        # whether it did in this one; kept by whoever steps it (``after_step``), saved.
        self.trained_epochs, self.trained_this_epoch = 0, False
        self._kd_losses: list[torch.Tensor] = []
        self.probe_result: CompatibilityProbe | ProbeFault | None = None
        # Kasmina's latest measurement of its benefit (G5's only evidence): not saved, dropped
        self.evaluation: SeedEvaluation | None = None  # by any load through the seed
        self.register_load_state_dict_pre_hook(seed_load_pre_hook)
        self.field_report: dict[str, Any] | None = None
        self.state_table.observe(self.state_index, self._on_transition)
        self.state_table.listen(self._refresh_stage_code, rows=[self.state_index])
        self._refresh_stage_code()

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def stage(self) -> SeedStage:
        return self.state_table.stage(self.state_index)

    def _refresh_stage_code(self) -> None:
        """Keep ``_stage_code`` (the table calls this after each change of the seed's row)."""
        self._stage_code = int(self.stage)

    @property
    def epochs_in_stage(self) -> int:
        return self.state_table.epochs_in_state(self.state_index)

    def transition_to(self, stage: SeedStage | int | str, gate: int | str | None = None) -> None:
        """Validated transition (raises ``IllegalTransitionError``; nothing changes then)."""
        self.state_table.update_seed_state(self.state_index, stage, last_gate=gate)

    def evaluate_gate(
        self,
        target: SeedStage | int | str | None = None,
        *,
        min_isolated_epochs: int = 1,
        latency_budget_ms: float = float("inf"),
        performance_gate: float | None = None,
        max_metric_drop: float = 0.0,
        sample: torch.Tensor | None = None,
        host_flops_per_element: float | None = None,
        max_cost_ratio: float = float("inf"),
    ) -> GateResult:
        """The gate guarding ``stage -> target`` (default: the next main-path stage).

        ``sample`` (host activations) runs a fresh probe for G3, whose cost is the kernel's
        counted FLOPs per output element over ``host_flops_per_element`` (None: unchecked), at
        most ``max_cost_ratio``; ``latency_budget_ms`` only warns (timings depend on load).
        G5 compares ``self.evaluation`` with ``performance_gate`` and refuses a seed that
        costs more than ``max_metric_drop`` of a measured metric. A transition no gate guards
        passes with ``gate == 0``; its legality is the table's business."""
        stage = self.stage
        target = NEXT_STAGE.get(stage) if target is None else parse_stage(target)
        gate = GATE_FOR_TRANSITION.get((stage, target)) if target is not None else None
        if gate is None:
            return GateResult(True, f"no gate guards {stage.name} -> {target}", 0.0, 0)
        if gate == 1:
            return gate_g1_kernel_ready(self.kernel)
        if gate == 2:
            epochs, violations = self.trained_epochs, self.isolation_violations
            return gate_g2_isolated_training(epochs, min_isolated_epochs, violations)
        if gate == 3:
            probed = self.probe_result  # inside a command, G3's own probe is neither charged
            if sample is not None:  # nor kept: a refused command changes no seed (nor G3 later)
                probed, self.probe_result = self.probe(sample, charged=False), probed
            return gate_g3_probed(
                probed, self.kernel, host_flops_per_element, max_cost_ratio,
                latency_budget_ms, seed_id=self.seed_id,
            )  # fmt: skip
        if gate == 4:
            return gate_g4_alpha(self._alpha_value)
        threshold = self._performance_gate if performance_gate is None else performance_gate
        evaluation, drop = self.evaluation, max_metric_drop
        return gate_g5_performance(evaluation, threshold, stage, max_metric_drop=drop)

    def record_evaluation(self, evaluation: SeedEvaluation) -> None:
        """Keep Kasmina's measurement of this seed (G5's evidence, and its GATE_SCORE)."""
        if not isinstance(evaluation, SeedEvaluation):
            raise TypeError(f"expected a SeedEvaluation, got {type(evaluation).__name__}")
        if evaluation.seed_id != self.seed_id:
            raise ValueError(f"evaluation of {evaluation.seed_id!r} given to {self.seed_id!r}")
        self.evaluation = evaluation
        self.gate_score = evaluation.score

    def advance(
        self, target: SeedStage | int | str | None = None, **gate_kwargs: Any
    ) -> GateResult:
        """Evaluate the gate to ``target`` and transition when it passes; returns the result."""
        stage = self.stage
        destination = NEXT_STAGE.get(stage) if target is None else parse_stage(target)
        if destination is None:
            raise IllegalTransitionError(f"seed {self.seed_id}: {stage.name} has no next stage")
        result = self.evaluate_gate(destination, **gate_kwargs)
        if not result.passed:
            logger.info("seed %s: gate G%d refused: %s", self.seed_id, result.gate, result.reason)
            labels = {"seed_id": self.seed_id, "gate": f"G{result.gate}", "reason": result.reason}
            self.state_table.report("lifecycle.gate_failed", labels)
            return result
        self.transition_to(destination, gate=result.gate or None)
        return result

    def quarantine(self, reason: str = "requested") -> bool:
        """Send the seed to QUARANTINE if that is legal from its stage; returns whether it went."""
        stage = self.stage
        if SeedStage.QUARANTINE not in LEGAL_TRANSITIONS[stage]:
            logger.error("seed %s: no quarantine from %s (%s)", self.seed_id, stage.name, reason)
            return False
        logger.error("seed %s: quarantined from %s: %s", self.seed_id, stage.name, reason)
        self.transition_to(SeedStage.QUARANTINE)
        return True

    def poll_nonfinite(self) -> bool:
        """Read the device flags set by non-finite forwards (one sync) and settle them."""
        return self.settle_nonfinite(*read_flags([self._buffers[n] for n in SEED_FLAGS]))

    def settle_nonfinite(
        self, finite: bool, faulted: bool = True, cut: bool = False, *, drop_gradient: bool = True,
        charge_cut: bool = True,
    ) -> bool:  # fmt: skip
        """Act on the flags (read in one transfer): True when a forward with grad since the last
        read fell back to the host output, or met a non-finite gradient from above (``cut`` while
        isolated: ``settled_flags``); its gradients since then are dropped unless ranks averaged
        them (``drop_gradient=False``, NaN as 0). One fault however many fell back; none when each
        one's input was the host's NaN. Any other ``cut`` (an ACTIVE compiled cut of its kernel's
        own non-finite input gradient): a fault (``charge_cut`` False: ``charge_failed_steps``)."""
        finite, faulted, cut = settled_flags((finite, faulted, cut), self)
        if finite and not faulted and (not cut or not charge_cut):  # a cut alone: kept
            return False
        if not finite and drop_gradient and self.kernel is not None:
            for param in self.kernel.parameters():
                param.grad = None
        # A cut, kept unless an output fault charges the step, is cleared once the step judged it.
        reset_flags(self._buffers, keep_cut=cut and not charge_cut and not faulted)
        if not finite or faulted:
            self.nonfinite_events += 1
            self.state_table.report("seed.nonfinite_output", {"seed_id": self.seed_id})
        if faulted or (cut and charge_cut):  # its flags agreed by the ranks
            self.charge_fault("nonfinite", "non-finite output" if faulted else CUT_REASON)
        return not finite

    # -- faults --------------------------------------------------------------------------
    @property
    def fault_limit(self) -> int:
        """Faults after which the seed is quarantined (>= 1); a lower one applies from the next."""
        return self._fault_limit

    @fault_limit.setter
    def fault_limit(self, limit: int) -> None:
        self._fault_limit = check_positive_int("fault_limit", limit)

    # Eager even compiled: its bookkeeping (logs, telemetry, a transition) runs once a fault.
    @torch.compiler.disable
    def record_fault(self, kind: str, reason: str) -> None:
        """One contained fault found on this process's data: charged now (``charge_fault``), or in
        a multi-rank run at its next step, on every rank alike (:mod:`kasmina.seeds.charging`)."""
        reason = short_reason(reason)
        if self.observed_faults is not None:
            self.observed_faults.append(f"{kind}: {reason}")
            return
        if loses_step(kind, self.stage):  # its step's gradient is lost with it: every one
            self.finite_flag.fill_(False)  # since the poll dropped, the step skipped (settle)
        if kind == FELL_BACK:  # a non-finite output found on the host (anomaly mode): charged at
            self.fault_flag.fill_(True)  # the poll, once a step, as the device half's are
            return
        charge_or_defer(self, kind, reason)

    def charge_fault(self, kind: str, reason: str) -> None:
        """Count, log and report one fault now (one every rank found alike or agreed: a settled
        flag, an averaged gradient); quarantine at ``fault_limit`` (:func:`charge`)."""
        charge(self, kind, reason)

    def _on_transition(self, _idx: int, old: SeedStage, new: SeedStage) -> None:
        enter(self, old, new)  # a write that fails is kept (``unsettled``), never raised

    def settle_stage(self) -> None:
        """Write again what entering its stage failed to write (``stage_entry.settle``): its
        owner's completion (a manager's, at a safe point); a no-op when nothing is pending."""
        settle(self)

    # -- kernel --------------------------------------------------------------------------
    def attach_kernel(self, module: nn.Module, artifact_id: str | None = None) -> None:
        """Install the seed's module (on the seed's device, in its mode, ``marked_random``);
        refused while a kernel is running (ISOLATED_INIT .. ACTIVE): no hot swaps mid-training."""
        if not isinstance(module, nn.Module):
            raise ValueError(f"a seed kernel must be an nn.Module, got {type(module).__name__}")
        if self.kernel is not None and self.stage in RUNS_KERNEL:
            raise ValueError(f"seed {self.seed_id}: cannot replace the kernel in {self.stage.name}")
        if hazard := getattr(module, "seed_hazard", None):  # GPUKernel: read from its program
            raise ValueError(f"seed {self.seed_id}: the kernel {hazard}")
        module.train(self.training)  # (a user's ``train()`` may not return the module)
        self.kernel = marked_random(module).to(self.alpha.device)
        self.__dict__.pop("_kernel_tree", None)
        blueprint = artifact_id if artifact_id is not None else getattr(module, "artifact_id", "")
        self.state_table.set_blueprint(self.state_index, str(blueprint or ""))
        self.state_table.touch(self.state_index)
        kernel_changed(self)  # its slot's tensors' names changed (wrap_ddp's ignore list)

    def detach_kernel(self) -> nn.Module | None:
        """Remove and return the kernel; the seed passes the host through until a new one."""
        kernel, self.kernel = self.kernel, None
        self.__dict__.pop("_kernel_tree", None)  # hold nothing of a kernel that left
        self.probe_result = None
        self.state_table.touch(self.state_index)
        kernel_changed(self)
        return kernel

    def seed_parameters(self) -> list[nn.Parameter]:
        return [] if self.kernel is None else list(self.kernel.parameters())

    def trained_parameters(self) -> list[torch.Tensor]:
        """The kernel's parameters that require a gradient (the backward guard's inputs), read
        fresh on every guarded forward; the module tree is walked once per kernel object (an
        artifact's is fixed): ``parameters()`` would cost several microseconds per module."""
        kernel = self._modules["kernel"]
        if kernel is None:
            return []
        tree = self.__dict__.get("_kernel_tree")
        if tree is None or tree[0] is not kernel:
            tree = self.__dict__["_kernel_tree"] = (kernel, kernel_modules(kernel))
        return [
            p
            for module in tree[1]
            for p in module._parameters.values()
            if p is not None and p.requires_grad
        ]

    # -- alpha, score --------------------------------------------------------------------
    @property
    def alpha_value(self) -> float:
        """Host copy of ``alpha`` (the buffer lives on the device)."""
        return self._alpha_value

    def update_alpha_blending(self, step: int, total_steps: int, temperature: float = 1.0) -> float:
        """Advance GRAFTING's schedule to ``step`` (``graft_step``), in place; else a no-op.
        Arguments are checked first (:func:`checked_schedule`): a refused call changes nothing."""
        step = checked_schedule(self.seed_id, step, total_steps, temperature)
        if self.stage == SeedStage.GRAFTING:
            self.graft_step = step
            self._set_alpha(sigmoid_alpha(step, total_steps, temperature))
        return self._alpha_value

    def _set_alpha(self, value: float, force: bool = False) -> None:
        # The table's ALPHA_BLEND column (value * 1000) is only written when it changes.
        changed = round(value * 1000) != round(self._alpha_value * 1000)
        self.alpha.fill_(value)
        self._alpha_value = float(value)
        if changed or force:
            self.state_table.set_alpha(self.state_index, value)

    @property
    def gate_score(self) -> float:
        return self._gate_score

    @gate_score.setter
    def gate_score(self, score: float) -> None:
        # Checked as a load checks it (NaN taken, only reported; the column keeps its value).
        score = checked_setting(self.seed_id, "gate_score", score)
        if math.isfinite(score):
            self.state_table.set_gate_score(self.state_index, score)
        self._gate_score = score

    @property
    def performance_gate(self) -> float:
        return self._performance_gate

    @performance_gate.setter
    def performance_gate(self, threshold: float) -> None:
        threshold = checked_setting(self.seed_id, "performance_gate", threshold)
        self.state_table.set_performance_gate(self.state_index, threshold)
        self._performance_gate = threshold

    # -- forward -------------------------------------------------------------------------
    def forward(
        self, host_activations: torch.Tensor, teacher_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """docs/design.md §3's table; ``teacher_logits`` adds a KD loss (to get_and_clear)."""
        x = host_activations
        code = self._stage_code if torch.compiler.is_compiling() else None  # (``_stage_code``)
        stage = self.stage if code is None else SeedStage(code)
        if self.kernel is None or stage not in RUNS_KERNEL:
            return x
        if x.shape[self.chunk_dim] != self.chunk_size:
            width = f"dim {self.chunk_dim} of {tuple(x.shape)} is not {self.chunk_size} wide"
            raise ValueError(f"seed {self.seed_id}: {width}")
        if stage == SeedStage.COMPATIBILITY_CHECK:
            self._probe_unless_compiling(x)
            return x
        result = self._run_kernel(x, stage)
        if code is not None:  # compiled: the stage again from its int, for a resume after a graph
            stage = SeedStage(code)  # break in the kernel (a member there goes unguarded)
        if result is None:
            return x
        s, ok = result  # ok None: known finite on the host, no mask needed
        self._maybe_kd(s, teacher_logits, stage)
        if stage == SeedStage.ISOLATED_INIT:  # a fallen-back kernel's gradient is 0, as in a slot
            return seed_blend(s if ok is None else s.where(ok, 0.0), x, self.alpha, "incubate")
        if stage == SeedStage.GRAFTING:
            s = seed_blend(s, x, self.alpha, mode="blend")
        if ok is None:
            return s
        return torch.where(ok, s, x if stage == SeedStage.ACTIVE else x.detach())  # grad: ACTIVE

    def _probe_unless_compiling(self, x: torch.Tensor) -> None:
        """COMPATIBILITY_CHECK's probe, not compiled (it times on the host clock; G3 probes)."""
        if not torch.compiler.is_compiling():
            self.probe(x)

    def probe(
        self, x: torch.Tensor, *, charged: bool = True
    ) -> CompatibilityProbe | ProbeFault | None:
        """COMPATIBILITY_CHECK: run the kernel without gradient and record it for gate G3.

        Guarded like the forward (it runs inside the host's): a raise or a non-Tensor is a
        fault, kept as the last probe (a :class:`ProbeFault`: G3 refuses on it, and does not
        probe random activations instead, until a later probe runs cleanly); a wrong shape,
        dtype or device is a fault that keeps the probe, so G3 names the mismatch; a
        non-finite output sets the flag. Not ``charged`` (G3's probe inside an ADVANCE): the
        fault is the probe's only record, neither counted nor flagged (nor kept by
        ``evaluate_gate``), since a refused command changes no seed. An empty batch keeps the
        probe there is (it measures nothing)."""
        if self.kernel is None:
            return None
        if x.numel() == 0:
            return self.probe_result
        flags, record = (self.finite_flag, self.fault_flag), self.record_fault
        if not charged:  # the flags' copies take what the probe finds: the seed's stay
            flags, record = (flags[0].clone(), flags[1].clone()), uncharged
        try:
            self.probe_result = guarded_probe(self.kernel, x, record, *flags)
        except KernelInputRefused as exc:  # a call its program cannot take: sat out, no fault
            logger.debug("seed %s sat out a probe (%s)", self.seed_id, exc)
        return self.probe_result

    def _run_kernel(
        self, x: torch.Tensor, stage: SeedStage
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(seed_out, finite)`` (``finite`` on the device; None if known finite on the host),
        or None after a fault found on the host. A KasminaLayer runs the same host half
        (:meth:`_call_kernel`), the device half once for all its seeds."""
        called = self._call_kernel(x, stage)
        if called is None:
            return None
        s, xin = called
        if self._guards_backward(s, stage):
            s = contain_backward([s], [self.trained_parameters()], [self], [xin])[0]
        return s, self._check_finite(s, xin, stage)

    def _call_kernel(
        self, x: torch.Tensor, stage: SeedStage
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The host half of the guard (:func:`~kasmina.seeds.faults.call_kernel`)."""
        kernel = self._modules["kernel"]
        assert kernel is not None
        active, record = stage == _ACTIVE, self.record_fault
        if torch.compiler.is_compiling():  # no stream forked (nor read: a recompile a step)
            return call_kernel(kernel, x, active, record, (self.seed_id, None), self.cut_flag)
        # A manager's position (GERMINATE sets it), else one an unowned load or copy kept.
        position = self.draw_step  # (``_loaded_draws`` is absent from older pickles)
        if position is None and (loaded := self.__dict__.get("_loaded_draws")) is not None:
            position = stream_position(loaded, kernel)
        stream, region = (self.seed_id, position), checkpoint_region()
        if region[0] is None:  # outside an activation checkpoint (the common case)
            return call_kernel(kernel, x, active, record, stream)
        # In a checkpoint's recompute, not called where its first run's call gave no output.
        runs = self._kernel_runs
        called, kept = RegionRuns.run(
            runs, region, lambda: call_kernel(kernel, x, active, record, stream)
        )
        if kept is not runs:
            self._kernel_runs = kept
        return called

    def _guards_backward(self, s: torch.Tensor, stage: SeedStage) -> bool:
        """Whether ``s`` goes through the guarded backward node (``ContainedBackward``)."""
        island = stage != SeedStage.ACTIVE and s.requires_grad  # its graph reaches no host
        return self.guard_backward and island and plain_eager()

    def _check_finite(
        self, s: torch.Tensor, xin: torch.Tensor, stage: SeedStage
    ) -> torch.Tensor | None:
        """The device half of the guard: ``finite`` (0-d bool), remembered in ``finite_flag``;
        None when the sum, read on the CPU in eager mode, is finite (``faults.finite_test``)."""
        ok = finite_test(output_sum(s), read_on_host=plain_eager())
        if ok is None:
            return None
        record_fallbacks(ok, output_sum(xin), *gradient_flags(self.finite_flag, self.fault_flag))
        if stage == SeedStage.ACTIVE:
            cut_nonfinite_gradient(xin, ok)
        return ok

    def _maybe_kd(self, s: torch.Tensor, teacher: torch.Tensor | None, stage: SeedStage) -> None:
        kd = self.kd_config is not None and teacher is not None and torch.is_grad_enabled()
        if kd and stage in ISOLATED_TRAINING_STAGES:  # without grad: nothing it could train
            loss = seed_kd_or_fault(self.kd_config, s, teacher, self.record_fault)
            if loss is not None:  # None: it raised, a fault recorded, no loss kept for the step
                self._kd_losses.append(mark_students(loss, [self.seed_id]))

    def get_and_clear_kd_losses(self) -> torch.Tensor | None:
        """Sum of the KD losses stored since the last call (graph kept: it trains the seed)."""
        return sum_kd_losses(self._kd_losses)

    # -- persistence ---------------------------------------------------------------------
    def get_extra_state(self) -> torch.Tensor:
        """The seed's bookkeeping as a 1-D uint8 tensor (:func:`encode_extra_state`), not a dict:
        tools that walk a ``state_dict`` (``save_pretrained``, safetensors) expect tensors."""
        return encode_extra_state(seed_bookkeeping(self))

    def check_state(self, state: torch.Tensor | Mapping[str, Any]) -> SavedSeedState:
        """What :meth:`set_extra_state` would restore, checked (``ValueError`` if this seed cannot
        take it; ``check_seed_states`` asks every seed before a load): :func:`check_seed_state`."""
        return check_seed_state(self, state)

    def set_extra_state(self, state: torch.Tensor | Mapping[str, Any]) -> None:
        """Restore what :meth:`get_extra_state` saved (or an older checkpoint's dict), checked
        first (:meth:`check_state`: a refused state changes nothing); ``draw_step``, a position
        only a manager moves, only into a seed one owns (else its versions key its stream)."""
        restore_seed_state(self, self.check_state(state))

    def _apply(self, fn: Any, recurse: bool = True) -> GradientIsolatedSeed:
        # The (shared) table follows the seed's moves, and alpha, in float32 (``half()`` rounds).
        values = {"alpha": self._alpha_value, **SEED_FLAGS}  # its constants (SEED_CONSTANTS)
        before = {name: self._buffers[name] for name in values}
        super()._apply(fn, recurse)
        count_conversion()  # optimizers' states follow their parameters at the next step
        keep_constants(self._buffers, before, values)  # a layer's flags: linked again there
        table = self.state_table.state_tensor
        moved = fn(table)
        if moved.device != table.device:
            self.state_table.to(moved.device)
        return self

    def __getstate__(self) -> dict[str, Any]:
        return copied_seed_state(dict(self.__dict__))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        add_missing_flag(self, "cut_flag", "fault_flag")  # pickled before it
        if "_stage_code" not in state:  # pickled before the stage code: listen now (compile)
            self.state_table.listen(self._refresh_stage_code, rows=[self.state_index])
            self._refresh_stage_code()

    def extra_repr(self) -> str:
        return f"seed_id={self.seed_id!r}, chunk_size={self.chunk_size}, stage={self.stage.name}"


__all__ = ["GradientIsolatedSeed"]
