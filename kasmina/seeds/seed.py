"""A seed: a small trainable module grafted into a host in gradient isolation.

See docs/design.md §3 (stages) and §4 (isolation).

The seed's stage lives in a :class:`~kasmina.seeds.table.GPUStateTensor` (its own one-row table,
or a slot of a table shared by many seeds); the forward reads the table's host mirror, so it
never waits for the device. Until a seed is ACTIVE it only ever sees ``x.detach()``.

Non-finite seed output is handled without a host sync in the forward: the output is chosen on
the device (``torch.where``) to be the host's, and a device flag remembers it. The flag is read
by :meth:`GradientIsolatedSeed.poll_nonfinite` -- call it at step or epoch boundaries (the
manager does) -- which sends the seed to QUARANTINE. A seed whose output has the wrong shape or
dtype is known on the host at once and is quarantined in that very forward.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from kasmina.errors import IllegalTransitionError
from kasmina.kd.config import KDConfig
from kasmina.kd.loss import seed_kd_loss, sum_kd_losses
from kasmina.ops import alpha_blend
from kasmina.seeds.gates import (
    CompatibilityProbe,
    GateResult,
    gate_g1_kernel_ready,
    gate_g2_isolated_training,
    gate_g3_compatibility,
    gate_g4_alpha,
    gate_g5_performance,
    run_probe,
    sigmoid_alpha,
)
from kasmina.seeds.table import GPUStateTensor, parse_stage
from kasmina.stages import (
    GATE_FOR_TRANSITION,
    LEGAL_TRANSITIONS,
    NEXT_STAGE,
    TRAINING_STAGES,
    SeedStage,
)

logger = logging.getLogger(__name__)

# Stages whose forward runs the kernel; every other stage returns the host activations.
RUNS_KERNEL = TRAINING_STAGES | {SeedStage.COMPATIBILITY_CHECK}
# Stages in which a KD loss trains the seed alone. Once ACTIVE the seed is part of the host,
# whose objective belongs to the trainer, so no seed-only KD loss is produced.
KD_STAGES = frozenset({SeedStage.ISOLATED_INIT, SeedStage.GRAFTING, SeedStage.STABILIZATION})


class GradientIsolatedSeed(nn.Module):
    """One seed over a ``chunk_size``-wide slice of a host layer's output.

    ``state``/``index`` place the seed in a shared state table (``kasmina.attach`` does this);
    without them the seed owns a one-row table on the CPU that follows ``.to(device)``.
    """

    def __init__(
        self,
        chunk_size: int,
        seed_id: str,
        kd_config: KDConfig | None = None,
        *,
        state: GPUStateTensor | None = None,
        index: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if not isinstance(seed_id, str) or not seed_id:
            raise ValueError("seed_id must be a non-empty string")
        self.chunk_size = chunk_size
        self.seed_id = seed_id
        self.kd_config = kd_config
        self.state_table = state if state is not None else GPUStateTensor(1, "cpu")
        self.state_index = self.state_table.check_index(index)
        self.register_module("kernel", None)
        self.register_buffer("alpha", torch.zeros((), dtype=torch.float32))
        self.register_buffer("nonfinite_flag", torch.zeros((), dtype=torch.bool), persistent=False)
        self.isolation_violations = 0
        self.nonfinite_events = 0
        self._gate_score = 0.0
        self._performance_gate = 0.0
        self._alpha_value = 0.0
        self._kd_losses: list[torch.Tensor] = []
        self.probe_result: CompatibilityProbe | None = None
        self.field_report: dict[str, Any] | None = None
        self.state_table.observe(self.state_index, self._on_transition)

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def stage(self) -> SeedStage:
        return self.state_table.stage(self.state_index)

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
        sample: torch.Tensor | None = None,
    ) -> GateResult:
        """The gate guarding ``stage -> target`` (default: the next main-path stage).

        ``sample`` (host activations) runs a fresh compatibility probe for G3. A transition that
        no gate guards passes with ``gate == 0``; its legality is the table's business.
        """
        stage = self.stage
        target = NEXT_STAGE.get(stage) if target is None else parse_stage(target)
        gate = GATE_FOR_TRANSITION.get((stage, target)) if target is not None else None
        if gate is None:
            return GateResult(True, f"no gate guards {stage.name} -> {target}", 0.0, 0)
        if gate == 1:
            return gate_g1_kernel_ready(self.kernel)
        if gate == 2:
            return gate_g2_isolated_training(
                self.epochs_in_stage, min_isolated_epochs, self.isolation_violations
            )
        if gate == 3:
            if sample is not None:
                self.probe(sample)
            if self.probe_result is None:
                return gate_g3_compatibility(None, (), torch.float32, None, latency_budget_ms)
            return self.probe_result.gate(latency_budget_ms)
        if gate == 4:
            return gate_g4_alpha(self._alpha_value)
        threshold = self._performance_gate if performance_gate is None else performance_gate
        return gate_g5_performance(self._gate_score, threshold)

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
            self.state_table.report(
                "lifecycle.gate_failed",
                {"seed_id": self.seed_id, "gate": f"G{result.gate}", "reason": result.reason},
            )
            return result
        self.transition_to(destination, gate=result.gate or None)
        return result

    def quarantine(self, reason: str = "requested") -> bool:
        """Send the seed to QUARANTINE if that is legal from its stage; returns whether it went."""
        stage = self.stage
        if SeedStage.QUARANTINE not in LEGAL_TRANSITIONS[stage]:
            logger.error(
                "seed %s: cannot quarantine from %s (%s)", self.seed_id, stage.name, reason
            )
            return False
        logger.error("seed %s: quarantined from %s: %s", self.seed_id, stage.name, reason)
        self.transition_to(SeedStage.QUARANTINE)
        return True

    def poll_nonfinite(self) -> bool:
        """Read the device flag set by non-finite forwards (one sync); quarantine if it is set.

        Returns whether any forward since the last poll fell back to the host output. An ACTIVE
        seed cannot be quarantined (docs/design.md §3); it keeps the host fallback and is reported.
        """
        if not bool(self.nonfinite_flag):
            return False
        self.nonfinite_flag.zero_()
        self.nonfinite_events += 1
        self.state_table.report("seed.nonfinite_output", {"seed_id": self.seed_id})
        self.quarantine("non-finite output")
        return True

    def _on_transition(self, _idx: int, old: SeedStage, new: SeedStage) -> None:
        if new == SeedStage.GRAFTING:
            self._set_alpha(0.0, force=True)
        elif new in (SeedStage.STABILIZATION, SeedStage.ACTIVE):
            self._set_alpha(1.0, force=True)
        elif new == SeedStage.COMPATIBILITY_CHECK:
            self.probe_result = None
        elif new == SeedStage.HARVESTING:
            self.field_report = {
                "seed_id": self.seed_id,
                "from_stage": old.name,
                "alpha": self._alpha_value,
                "gate_score": self._gate_score,
                "isolation_violations": self.isolation_violations,
                "nonfinite_events": self.nonfinite_events,
            }
            self.detach_kernel()
        elif new == SeedStage.RECYCLING:
            self._set_alpha(0.0, force=True)
            self.isolation_violations = 0
            self.nonfinite_events = 0
            self.gate_score = 0.0
            self.nonfinite_flag.zero_()
            self._kd_losses.clear()
            self.probe_result = None

    # -- kernel --------------------------------------------------------------------------
    def attach_kernel(self, module: nn.Module, artifact_id: str | None = None) -> None:
        """Install the seed's module (moved to the seed's device).

        Refused while a kernel is running (ISOLATED_INIT .. ACTIVE): no hot swaps mid-training.
        """
        if not isinstance(module, nn.Module):
            raise ValueError(f"a seed kernel must be an nn.Module, got {type(module).__name__}")
        if self.kernel is not None and self.stage in RUNS_KERNEL:
            raise ValueError(f"seed {self.seed_id}: cannot replace the kernel in {self.stage.name}")
        self.kernel = module.to(self.alpha.device)
        blueprint = artifact_id if artifact_id is not None else getattr(module, "artifact_id", "")
        self.state_table.set_blueprint(self.state_index, str(blueprint or ""))
        self.state_table.touch()

    def detach_kernel(self) -> nn.Module | None:
        """Remove and return the kernel; the seed passes the host through until a new one."""
        kernel = self.kernel
        self.kernel = None
        self.probe_result = None
        self.state_table.touch()
        return kernel

    def seed_parameters(self) -> list[nn.Parameter]:
        return [] if self.kernel is None else list(self.kernel.parameters())

    # -- alpha, score --------------------------------------------------------------------
    @property
    def alpha_value(self) -> float:
        """Host copy of ``alpha`` (the buffer lives on the device)."""
        return self._alpha_value

    def update_alpha_blending(self, step: int, total_steps: int, temperature: float = 1.0) -> float:
        """Advance the GRAFTING schedule in place (no host sync, no recompile); else a no-op."""
        if total_steps <= 0 or not temperature > 0:
            raise ValueError("total_steps must be > 0 and temperature > 0")
        if self.stage == SeedStage.GRAFTING:
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
        self._gate_score = float(score)
        if math.isfinite(self._gate_score):
            self.state_table.set_gate_score(self.state_index, self._gate_score)

    @property
    def performance_gate(self) -> float:
        return self._performance_gate

    @performance_gate.setter
    def performance_gate(self, threshold: float) -> None:
        self.state_table.set_performance_gate(self.state_index, threshold)
        self._performance_gate = float(threshold)

    # -- forward -------------------------------------------------------------------------
    def forward(
        self, host_activations: torch.Tensor, teacher_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """docs/design.md §3's table; ``teacher_logits`` adds a KD loss (see
        get_and_clear_kd_losses)."""
        x = host_activations
        stage = self.stage
        if self.kernel is None or stage not in RUNS_KERNEL:
            return x
        if x.shape[-1] != self.chunk_size:
            raise ValueError(f"seed {self.seed_id}: last dim {x.shape[-1]} != {self.chunk_size}")
        if stage == SeedStage.COMPATIBILITY_CHECK:
            self.probe(x)
            return x
        result = self._run_kernel(x, stage)
        if result is None:
            return x
        s, ok = result
        self._maybe_kd(s, teacher_logits, stage)
        if stage == SeedStage.ISOLATED_INIT:
            return alpha_blend(s, x, self.alpha, mode="incubate")
        if stage == SeedStage.GRAFTING:
            return torch.where(ok, alpha_blend(s, x, self.alpha, mode="blend"), x.detach())
        if stage == SeedStage.STABILIZATION:
            return torch.where(ok, s, x.detach())
        return torch.where(ok, s, x)  # ACTIVE: fossilized, end-to-end gradient

    def contribution(
        self, x: torch.Tensor, stage: SeedStage
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This seed's chunk of a KasminaLayer's pre-blend output, for one shared blend call.

        Returns ``(piece, alpha, seed_out)``: the layer computes
        ``alpha_blend(cat(pieces), x, alphas, "blend")`` with alpha 1 where ``alpha`` is None.
        ISOLATED_INIT uses ``x - (s.detach() - s)``: its value is exactly ``x`` and both the host
        and the seed get the gradient ``g`` unchanged (the straight-through ``incubate``).
        """
        if self.kernel is None or stage not in RUNS_KERNEL:
            return x, None, None
        if stage == SeedStage.COMPATIBILITY_CHECK:
            self.probe(x)
            return x, None, None
        result = self._run_kernel(x, stage)
        if result is None:
            return x, None, None
        s, ok = result
        if stage == SeedStage.ISOLATED_INIT:
            safe = torch.where(ok, s, 0.0)
            return x - (safe.detach() - safe), None, s
        if stage == SeedStage.GRAFTING:
            return torch.where(ok, s, x.detach()), self.alpha * ok, s
        if stage == SeedStage.STABILIZATION:
            return torch.where(ok, s, x.detach()), None, s
        return torch.where(ok, s, x), None, s

    def probe(self, x: torch.Tensor) -> CompatibilityProbe | None:
        """COMPATIBILITY_CHECK: run the kernel without gradient and record it for gate G3."""
        if self.kernel is None:
            return None
        self.probe_result = run_probe(self.kernel, x)
        return self.probe_result

    def _run_kernel(
        self, x: torch.Tensor, stage: SeedStage
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(seed_out, finite)``; None (and QUARANTINE) when the output cannot replace ``x``."""
        assert self.kernel is not None
        if stage != SeedStage.ACTIVE:
            s = self.kernel(x.detach())
        else:
            # A fossilized seed backpropagates into the host: if its output is non-finite, the
            # gradient it sends upstream (0 * nan) is cut here so the host stays finite.
            xin = x.view_as(x)
            s = self.kernel(xin)
        if not isinstance(s, torch.Tensor) or s.shape != x.shape or s.dtype != x.dtype:
            got = f"{tuple(s.shape)}/{s.dtype}" if isinstance(s, torch.Tensor) else type(s).__name__
            self.quarantine(f"output {got} does not match host {tuple(x.shape)}/{x.dtype}")
            return None
        ok = torch.isfinite(s).all()
        self.nonfinite_flag.logical_or_(~ok)
        if stage == SeedStage.ACTIVE and xin.requires_grad:
            xin.register_hook(lambda g: torch.where(ok, g, torch.zeros_like(g)))
        return s, ok

    # -- knowledge distillation ----------------------------------------------------------
    def _maybe_kd(self, s: torch.Tensor, teacher: torch.Tensor | None, stage: SeedStage) -> None:
        if self.kd_config is None or teacher is None or stage not in KD_STAGES:
            return
        self._kd_losses.append(seed_kd_loss(self.kd_config, s, teacher))

    def get_and_clear_kd_losses(self) -> torch.Tensor | None:
        """Sum of the KD losses stored since the last call (graph kept: it trains the seed)."""
        return sum_kd_losses(self._kd_losses)

    # -- persistence ---------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "seed_id": self.seed_id,
            "row": list(self.state_table.read_row(self.state_index).values()),
            "alpha": self._alpha_value,
            "gate_score": self._gate_score,
            "performance_gate": self._performance_gate,
            "isolation_violations": self.isolation_violations,
            "nonfinite_events": self.nonfinite_events,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        # Every value is read before anything is written: a malformed state changes nothing.
        alpha = float(state["alpha"])
        gate_score = float(state["gate_score"])
        performance_gate = float(state["performance_gate"])
        violations = int(state["isolation_violations"])
        nonfinite = int(state["nonfinite_events"])
        self.state_table.restore_row(self.state_index, state["row"])
        self._alpha_value = alpha
        self._gate_score = gate_score
        self._performance_gate = performance_gate
        self.isolation_violations = violations
        self.nonfinite_events = nonfinite
        if self.kernel is None and self.stage in RUNS_KERNEL:
            logger.warning("seed %s restored in %s without a kernel", self.seed_id, self.stage.name)

    def _apply(self, fn: Any, recurse: bool = True) -> GradientIsolatedSeed:
        # The (possibly shared) state table follows the seed's device moves.
        super()._apply(fn, recurse)
        table = self.state_table.state_tensor
        moved = fn(table)
        if moved.device != table.device:
            self.state_table.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return f"seed_id={self.seed_id!r}, chunk_size={self.chunk_size}, stage={self.stage.name}"


__all__ = ["KD_STAGES", "RUNS_KERNEL", "GradientIsolatedSeed"]
