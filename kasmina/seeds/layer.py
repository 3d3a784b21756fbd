"""KasminaLayer: one host layer with many seeds over chunks of its output (docs/design.md §3).

Chunk ``k`` of the output's last dimension belongs to seed ``k``. Seeds in different stages
coexist and are applied in one pass: each seed contributes its chunk of a pre-blend tensor
(:meth:`GradientIsolatedSeed.contribution`), and one ``alpha_blend`` call with a per-chunk alpha
vector mixes it with the host output. Pass-through and ISOLATED_INIT chunks carry the host value
with alpha 1, so their host gradient is exactly ``g``; GRAFTING chunks use their schedule; when
no seed is GRAFTING the blend would be the identity and is skipped.

When every seed passes the host through (all DORMANT, say) the forward returns the host output
directly: the cost is one cached check of the state table's version.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from kasmina.kd.config import KDConfig
from kasmina.kd.loss import seed_kd_loss, sum_kd_losses
from kasmina.ops import alpha_blend
from kasmina.seeds.seed import KD_STAGES, RUNS_KERNEL, GradientIsolatedSeed
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import SeedStage

logger = logging.getLogger(__name__)


class KasminaLayer(nn.Module):
    """Wraps ``host`` (its output's last dim must be ``num_seeds * chunk_size``).

    ``state``/``state_offset`` place the seeds in a shared table (``kasmina.attach`` does this);
    otherwise the layer makes its own table on the host's device. ``region_id`` is written to each
    seed's REGION_ID column.
    """

    def __init__(
        self,
        host: nn.Module,
        num_seeds: int,
        chunk_size: int,
        *,
        kd_config: KDConfig | None = None,
        state: GPUStateTensor | None = None,
        state_offset: int = 0,
        layer_id: str = "layer",
        region_id: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(host, nn.Module):
            raise ValueError(f"host must be an nn.Module, got {type(host).__name__}")
        if not isinstance(num_seeds, int) or num_seeds < 1:
            raise ValueError(f"num_seeds must be a positive int, got {num_seeds!r}")
        out_features = getattr(host, "out_features", None)
        if isinstance(out_features, int) and out_features != num_seeds * chunk_size:
            raise ValueError(
                f"{layer_id}: {num_seeds} seeds x chunk {chunk_size} != {out_features} features"
            )
        device = next((p.device for p in host.parameters()), torch.device("cpu"))
        if state is None:
            state = GPUStateTensor(num_seeds, device)
        if state_offset < 0 or state_offset + num_seeds > state.num_seeds:
            raise ValueError(f"{layer_id}: seeds {state_offset}..+{num_seeds} outside the table")
        self.host = host
        self.num_seeds = num_seeds
        self.chunk_size = chunk_size
        self.kd_config = kd_config
        self.layer_id = layer_id
        self.state_table = state
        self.seeds = nn.ModuleList(
            GradientIsolatedSeed(
                chunk_size, f"{layer_id}[{k}]", kd_config, state=state, index=state_offset + k
            )
            for k in range(num_seeds)
        )
        for seed in self.seeds:
            state.set_region(seed.state_index, region_id)
        self.seeds.to(device)
        self.register_buffer("_one", torch.ones((), device=device), persistent=False)
        self._plan_version = -1
        self._plan: tuple[SeedStage, ...] = ()
        self._runs_any = False
        self._teacher_logits: torch.Tensor | None = None
        self._kd_losses: list[torch.Tensor] = []

    # -- convenience ---------------------------------------------------------------------
    def seed(self, k: int) -> GradientIsolatedSeed:
        return self.seeds[k]  # type: ignore[return-value]

    def stages(self) -> list[SeedStage]:
        return [seed.stage for seed in self.seeds]

    def update_alpha_blending(self, step: int, total_steps: int, temperature: float = 1.0) -> None:
        """Advance every GRAFTING seed's schedule (the others are left as they are)."""
        for seed in self.seeds:
            seed.update_alpha_blending(step, total_steps, temperature)

    def poll_nonfinite(self) -> list[str]:
        """Poll every seed's non-finite flag (one sync each); ids of seeds that fell back."""
        return [seed.seed_id for seed in self.seeds if seed.poll_nonfinite()]

    def set_teacher_logits(self, teacher_logits: torch.Tensor | None) -> None:
        """Teacher logits for the next forward's KD loss (for hosts that call ``layer(x)``)."""
        self._teacher_logits = teacher_logits

    def get_and_clear_kd_losses(self) -> torch.Tensor | None:
        """Sum of the layer's stored KD losses since the last call (graph kept), or None."""
        return sum_kd_losses(self._kd_losses)

    # -- forward -------------------------------------------------------------------------
    def forward(self, *args: Any, teacher_logits: torch.Tensor | None = None, **kwargs: Any) -> Any:
        out = self.host(*args, **kwargs)
        if self._teacher_logits is not None:  # consumed by this forward, used or not
            if teacher_logits is None:
                teacher_logits = self._teacher_logits
            self._teacher_logits = None
        plan, runs_any = self._current_plan()
        if not runs_any:
            return out  # fast path: every seed passes the host through
        return self._graft(out, plan, teacher_logits)

    def _current_plan(self) -> tuple[tuple[SeedStage, ...], bool]:
        # Eager: cached on the table's version (bumped by every transition and kernel change).
        # Compiled: read directly, so the guards are on the stages themselves and the cache's
        # own bookkeeping never triggers a recompile.
        if torch.compiler.is_compiling():
            return self._compute_plan()
        if self._plan_version != self.state_table.version:
            self._plan, self._runs_any = self._compute_plan()
            self._plan_version = self.state_table.version
        return self._plan, self._runs_any

    def _compute_plan(self) -> tuple[tuple[SeedStage, ...], bool]:
        plan = tuple(seed.stage for seed in self.seeds)
        runs_any = any(
            stage in RUNS_KERNEL and seed.kernel is not None
            for stage, seed in zip(plan, self.seeds, strict=True)
        )
        return plan, runs_any

    def _graft(
        self, x: torch.Tensor, plan: tuple[SeedStage, ...], teacher_logits: torch.Tensor | None
    ) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.layer_id}: seeds need a Tensor host output, got {type(x)}")
        width = self.num_seeds * self.chunk_size
        if x.shape[-1] != width:
            raise ValueError(f"{self.layer_id}: host output last dim {x.shape[-1]} != {width}")
        chunks = x.split(self.chunk_size, dim=-1)
        pieces: list[torch.Tensor] = []
        alphas: list[torch.Tensor | None] = []
        students: list[torch.Tensor | None] = []
        for seed, stage, chunk in zip(self.seeds, plan, chunks, strict=True):
            piece, alpha, seed_out = seed.contribution(chunk, stage)
            pieces.append(piece)
            alphas.append(alpha)
            students.append(seed_out if stage in KD_STAGES else None)
        seed_full = torch.cat(pieces, dim=-1)
        self._maybe_kd(pieces, students, teacher_logits)
        if all(alpha is None for alpha in alphas):
            return seed_full  # a blend with alpha 1 everywhere is the identity
        alpha_vec = torch.stack([self._one if a is None else a for a in alphas])
        return alpha_blend(seed_full, x, alpha_vec, mode="blend")

    def _maybe_kd(
        self,
        pieces: list[torch.Tensor],
        students: list[torch.Tensor | None],
        teacher_logits: torch.Tensor | None,
    ) -> None:
        # The student is the layer's output with every non-seed-path chunk detached, so the
        # KD gradient reaches the seeds that are training and nothing else.
        if self.kd_config is None or teacher_logits is None:
            return
        if all(s is None for s in students):
            return
        student = torch.cat(
            [p.detach() if s is None else s for p, s in zip(pieces, students, strict=True)], dim=-1
        )
        self._kd_losses.append(seed_kd_loss(self.kd_config, student, teacher_logits))

    def _apply(self, fn: Any, recurse: bool = True) -> KasminaLayer:
        super()._apply(fn, recurse)
        self._plan_version = -1
        return self

    def extra_repr(self) -> str:
        stages = ", ".join(stage.name for stage in self.stages())
        return f"layer_id={self.layer_id!r}, chunk_size={self.chunk_size}, stages=[{stages}]"
