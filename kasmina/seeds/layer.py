"""KasminaLayer: one host layer with many seeds over chunks of its output (docs/design.md §3).

**The slot contract.** Seed ``k`` owns chunk ``k`` (``chunk_size`` wide) of one dimension of
one tensor of the host's output:

- the tensor is the output itself, or, for a tuple, list, dataclass or dict (its values in order)
  output (``ModelOutput``, an attention module's ``(output, weights)``), the element at
  ``output_index`` (default 0); every other element passes through untouched;
- the dimension is ``chunk_dim``: by default the channels (dim 1) of a ``ConvNd`` and the last
  dimension of everything else (Linear, Hugging Face ``Conv1D``, attention, whole blocks).

``num_seeds * chunk_size`` must equal the width of that dimension. It is checked when the slot
is built wherever the host declares its width (``out_features``, ``out_channels``, ``nf``,
``embed_dim``, ...), and otherwise against the shape the first forward records
(:attr:`KasminaLayer.output_contract`, which GERMINATE reads before it lets a kernel in).

Seeds in different stages are applied in one pass: the seeds' outputs and the host's own
chunks (for seeds that pass it through) form one pre-blend tensor, which one ``alpha_blend``
with a per-chunk alpha mixes with the host output. Pass-through and ISOLATED_INIT chunks carry
the host value with alpha 1 (host gradient exactly ``g``); GRAFTING chunks use their schedule;
with no seed GRAFTING the blend is the identity and is skipped.

The plan (each seed's stage; whether any runs) is a slot-local snapshot the table refreshes
(``GPUStateTensor.listen``): the forward reads neither table nor seeds, and with every seed
passing the host through returns the host's output object.

**Behaving like the wrapped module.** Code around a slot keeps reading (and writing) the module
it expects (``fc.weight``, ``attn.batch_first``, ``proj.out_features``): an attribute the slot
does not define is read from the host, and written and deleted there (``forwarding``), as PEFT's
layers do. PyTorch's fused ``TransformerEncoderLayer`` path would bypass a slot in it (it calls
native kernels with the layer's tensors): while a seed runs, the slot's seeds hold a no-op
forward pre-hook (``outputs.force_regular_path``), which makes the regular path run and call
the slot, and ``nn.TransformerEncoder``'s packing test alone reads its tensors as a marked view
(``outputs.SeedsLive``); with every seed passing through, the fused path runs as for the bare
model.

A seed that faults contributes its host chunk, as a DORMANT seed would; the others are
unaffected. The layer guards its seeds together: one finiteness reduction over the concatenated
outputs, one flag update, the host's chunk for a non-finite one and one guarded backward node
(eager, every running seed blending on the detached host: one node with the blend too)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, is_grad_enabled, nn

from kasmina.kd.config import KDConfig
from kasmina.kd.graph import mark_students, sum_kd_losses
from kasmina.kd.loss import (
    PendingKDLosses,
    checked_teacher_logits,
    kd_head_problem,
    teacher_fit_problem,
)
from kasmina.ops.alpha_blend import seed_blend
from kasmina.ops.transforms import transform_depth, under_vmap
from kasmina.seeds.constants import (
    CONSTANTS,
    SEED_FLAGS,
    keep_constants,
    link_after_unpickle,
    rebuild_after_load,
    rebuild_if_left,
    relink_flags,
)
from kasmina.seeds.faults import (
    DEFAULT_FAULT_LIMIT,
    GraphMark,
    chunk_sums,
    compile_callback,
    fallback_masks,
    fallback_per_chunk,
    finite_test,
    gradient_flags,
    plain_eager,
    recomputing,
    record_fallbacks,
)
from kasmina.seeds.forwarding import HostForwarding
from kasmina.seeds.island import carries_tangent, contain_isolated, guarded_blend, in_layout_of
from kasmina.seeds.kd_faults import slot_kd_or_fault
from kasmina.seeds.load_hooks import check_seed_states
from kasmina.seeds.masks import ChunkMasks, split_chunks
from kasmina.seeds.outputs import (
    ActivationSpec,
    batched_rank,
    channels_last_name,
    checked_chunk_dim,
    chunk_spec,
    contract_problem,
    fits,
    force_regular_path,
    kernels_refuse,
    on_dense,
    output_element,
    replace_output_element,
    signed_shape,
    slot_record,
    splits_last_dim,
    teacher_goes_to,
)
from kasmina.seeds.recompute import RegionTeachers, checkpoint_region, graph_to_come
from kasmina.seeds.sat_out import count_sat_out
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import BLENDING_STAGES, ISOLATED_TRAINING_STAGES, RUNS_KERNEL, SeedStage
from kasmina.utils.flags import read_flags

logger = logging.getLogger(__name__)
_CHECK, _GRAFTING = SeedStage.COMPATIBILITY_CHECK, SeedStage.GRAFTING  # (``seed._ACTIVE``)

__all__ = ["KasminaLayer"]


def check_states_loaded_here(module: nn.Module, state_dict: dict, prefix: str, *rest: Any) -> None:
    """The pre-hook of a module between a model and its slots (``inject.add_load_checks``) and
    of each slot's ``seeds`` list: ``check_seed_states`` when a load starts at it (``prefix``
    empty); a load that reached it from a module above was checked there, before any loaded."""
    if not prefix:
        check_seed_states(module, state_dict, prefix, *rest)


class KasminaLayer(HostForwarding):
    """Wraps ``host``; ``num_seeds`` seeds of ``chunk_size`` features each (the contract: the
    module docstring), in the host's train/eval mode.

    ``chunk_dim`` (default: :func:`default_chunk_dim`) is the dimension split; ``output_index``
    the element of a tuple, list, dataclass or dict output for the seeds (``output_index_problem``).
    ``state``/``state_offset`` place the seeds in a shared table (``kasmina.attach`` does this);
    otherwise the layer makes its own table on the host's device. ``region_id`` is written to each
    seed's REGION_ID column. ``fault_limit`` is given to every seed (each counts its own faults)."""

    detached = False  # set once ``detach``/``merge`` took the slot out (SlotRegistry.check_held)
    _rank: int | None = None  # a conv's batched output rank (``outputs.batched_rank``)
    _provisional = False  # a record an unbatched call may have made (``outputs.rerecorded``)
    _moved: tuple[Any, Any] | None = None  # the record before ``_apply``: its shapes stay
    _kd_regions: RegionTeachers | None = None  # the teachers of checkpoint regions (``forward``)

    def __init__(
        self, host: nn.Module, num_seeds: int, chunk_size: int, *, chunk_dim: int | None = None,
        output_index: int = 0, kd_config: KDConfig | None = None,
        state: GPUStateTensor | None = None, state_offset: int = 0, layer_id: str = "layer",
        region_id: int = 0, fault_limit: int = DEFAULT_FAULT_LIMIT,
    ) -> None:  # fmt: skip
        super().__init__()
        args = (host, num_seeds, chunk_size, chunk_dim, output_index, layer_id)
        chunk_dim = checked_chunk_dim(*args)
        held = [t.device for t in (*host.parameters(), *host.buffers())]  # a GELU: the table's
        device = held[0] if held else getattr(state, "device", torch.device("cpu"))
        state = GPUStateTensor(num_seeds, device) if state is None else state
        if state_offset < 0 or state_offset + num_seeds > state.num_seeds:
            raise ValueError(f"{layer_id}: seeds {state_offset}..+{num_seeds} outside the table")
        self.host = host
        self.num_seeds = num_seeds
        self.chunk_size = chunk_size
        self.chunk_dim = chunk_dim
        self.output_index = output_index
        self.kd_config = kd_config if kd_config is None or kd_config.enabled else None
        self.layer_id = layer_id
        self.state_table = state
        ids = [(f"{layer_id}[{k}]", state_offset + k) for k in range(num_seeds)]
        options = {"state": state, "fault_limit": fault_limit}
        self.seeds = nn.ModuleList(
            GradientIsolatedSeed(chunk_size, sid, kd_config, index=i, **options) for sid, i in ids
        )
        for seed in self.seeds:
            seed.chunk_dim = chunk_dim
            state.set_region(seed.state_index, region_id)
        self.seeds.to(device)
        one = torch.ones((), dtype=torch.float32, device=device)  # float32 as seeds' alphas
        self.register_buffer("_one", one, persistent=False)
        # Each seed's ``finite_flag`` and ``fault_flag`` are views of these: set in one op each.
        flags = torch.ones(num_seeds, dtype=torch.bool, device=device)
        self.register_buffer("_finite_flags", flags, persistent=False)
        self.register_buffer("_fault_flags", torch.zeros_like(flags), persistent=False)
        self.register_buffer("_cut_flags", torch.zeros_like(flags), persistent=False)
        self._link_flags()
        self._masks = ChunkMasks()
        # The host's output as the seeds see it: None before a forward, its spec, or why none.
        self.output_contract: ActivationSpec | str | None = None
        self.output_layout: str | None = None  # its channels-last layout's name, if it is one
        self.input_spec: ActivationSpec | None = None
        self._rank = batched_rank(host)
        self._teacher_logits: torch.Tensor | None = None
        self._teacher_depth = 0  # the torch.func depth they were set at (set_teacher_logits)
        self._recompute_teacher: torch.Tensor | None = None
        self._kd_losses = PendingKDLosses()
        self._graph = GraphMark()  # an object: compiled, a store to it is a replayed side effect
        self.sat_out: Counter[str] = Counter()  # calls the seeds or their KD sat out, by kind
        counts = torch.zeros(2, dtype=torch.long, device=device)  # [seeds, KD] of compiled calls:
        self.register_buffer("sat_out_compiled", counts, persistent=False)  # a tensor, no guard
        self._kd_head: tuple[torch.Tensor, torch.Tensor | None] | None = None  # not parameters
        # The plan (module docstring): each seed's stage, as an int and as a SeedStage (eager).
        self._stage_codes: tuple[int, ...] = ()
        self._plan: tuple[SeedStage, ...] = ()
        self._runs_any = False
        self._kernel_shapes: tuple[tuple[int | None, ...] | None, ...] = ()
        self._refresh_plan()
        state.listen(self._refresh_plan, rows=[seed.state_index for seed in self.seeds])
        self.register_load_state_dict_pre_hook(check_seed_states)  # every seed's, checked first
        self.seeds.register_load_state_dict_pre_hook(check_states_loaded_here)  # a load into it
        self.register_load_state_dict_post_hook(rebuild_after_load)  # constants left on meta
        # The host's mode, not train()'s (which would reset the host's own mixed modes).
        self.training = host.training
        self.seeds.train(host.training)
        self.__dict__["_built"] = True  # from now on the host's plain attributes are written there

    # -- the wrapped module's attributes (reads, writes, deletes: ``forwarding``) ----------
    @property
    def guards_fused_path(self) -> bool:
        """Whether the slot is in a ``TransformerEncoderLayer`` (``inject.install`` sets it)."""
        return self.__dict__.get("_guards_fused_path", False)

    @guards_fused_path.setter
    def guards_fused_path(self, value: bool) -> None:
        self.__dict__["_guards_fused_path"] = bool(value)
        force_regular_path(self.seeds, bool(value) and self._runs_any)

    def _host_changed(self) -> None:
        """A part of the host replaced or removed through the slot (``slot[-1] = nn.Linear(...)``):
        the next forward records the host's output again, as the first after attach does."""
        vars(self).update(output_contract=None, input_spec=None, _moved=None, _provisional=False)

    def _link_flags(self) -> None:
        """Point each seed's flags at the layer's (again after a move: each buffer copied)."""
        (finite, faulted), cut = self._flags(), self._buffers["_cut_flags"]
        for k, seed in enumerate(self.seeds):
            seed._buffers["finite_flag"], seed._buffers["fault_flag"] = finite[k], faulted[k]
            seed._buffers["cut_flag"] = cut[k]

    def _flags(self) -> tuple[torch.Tensor, torch.Tensor]:
        if "_unlinked" in self.__dict__:  # (``constants.link_after_unpickle``)
            relink_flags(self)
        return self._buffers["_finite_flags"], self._buffers["_fault_flags"]

    def seed(self, k: int) -> GradientIsolatedSeed:
        return self.seeds[k]  # type: ignore[return-value]

    def stages(self) -> list[SeedStage]:
        return [seed.stage for seed in self.seeds]

    @property
    def width(self) -> int:
        """Features the seeds cover together (``num_seeds * chunk_size``)."""
        return self.num_seeds * self.chunk_size

    def contract_problem(self) -> str | None:
        """Why the recorded output cannot be chunked as configured (None: it can, or none yet)."""
        spec, dim, n, size = self.output_contract, self.chunk_dim, self.num_seeds, self.chunk_size
        problem = contract_problem(spec, dim, n, size)
        return None if problem is None else f"{self.layer_id}: {problem}"

    def chunk_spec(self) -> ActivationSpec | None:
        """One seed's chunk of the recorded host output (``outputs.chunk_spec``), or None."""
        return chunk_spec(self.output_contract, self.chunk_dim, self.num_seeds, self.chunk_size)

    def update_alpha_blending(self, step: int, total_steps: int, temperature: float = 1.0) -> None:
        """Advance every GRAFTING seed's schedule (the others are left as they are)."""
        for seed in self.seeds:
            seed.update_alpha_blending(step, total_steps, temperature)

    def poll_nonfinite(self) -> list[str]:
        """Read all seeds' flags (one transfer), charge their faults; the ids of those that fell
        back with grad, whose kernels' gradients are dropped (call before the step)."""
        rebuild_if_left(self)  # constants a deferred init left on meta, a link put off
        seeds = tuple(self.seeds)
        got, n = read_flags([s._buffers[name] for name in SEED_FLAGS for s in seeds]), len(seeds)
        return [s.seed_id for k, s in enumerate(seeds) if s.settle_nonfinite(*got[k::n])]

    def set_teacher_logits(self, teacher_logits: torch.Tensor | None) -> int:
        """Teacher logits (moved to the slot's device, ``checked_teacher_logits``) for the KD loss
        of the next forward that records a graph (a ``no_grad`` one, on any thread, leaves them
        pending). Returns how many KD losses earlier forwards left uncollected, counted and logged
        rarely: a skipped batch's, summed into the next collect, or several views'."""
        teacher_logits = checked_teacher_logits(teacher_logits, self._buffers["_one"].device)
        uncollected = self._kd_losses.newly_uncollected() if teacher_logits is not None else 0
        if uncollected:
            self._sit_out("kd_uncollected", "KD loss of an earlier forward not collected yet")
        # Taken by a forward as deep in torch.func transforms (not a probe's ``grad``: later).
        self._teacher_logits, self._teacher_depth = teacher_logits, transform_depth()
        return uncollected

    @contextmanager
    def teacher_logits_set_aside(self) -> Iterator[None]:
        """No teacher logits pending inside (a no-grad forward that meets them reads as a reentrant
        checkpoint's first run); after, those before as they were (no check, count or new depth)."""
        kept, self._teacher_logits = self._teacher_logits, None
        try:
            yield
        finally:
            self._teacher_logits = kept

    graph_open = property(lambda self: self._graph.open, doc="a graph since the step's end")
    seen_output = property(lambda self: self.output_contract or (self._moved or (None,))[0],
                           doc="output_contract, or the one before a move")  # fmt: skip

    def end_step(self) -> None:
        """At a step's end: drop the teacher logits kept or never taken; clear the graph mark."""
        vars(self).update(_recompute_teacher=None, _kd_regions=None, _teacher_logits=None)
        self._graph.open = self._graph.reentrant = False

    def get_and_clear_kd_losses(self) -> torch.Tensor | None:
        """Sum of the layer's stored KD losses since the last call (graph kept), or None."""
        return sum_kd_losses(self._kd_losses)

    def __getstate__(self) -> dict[str, Any]:  # a copy starts without this step's state
        fresh = {"_kd_losses": PendingKDLosses(), "_graph": GraphMark(), "_kd_regions": None}
        return {**self.__dict__, **fresh, "_recompute_teacher": None}

    def __setstate__(self, state: dict[str, Any]) -> None:  # an older pickle: no mark, a list
        old = {"_graph": GraphMark(), "_kernel_shapes": (), "_teacher_depth": 0, **state}
        old["_kd_losses"] = PendingKDLosses(state.get("_kd_losses", ()))
        super().__setstate__({**old, "_masks": ChunkMasks()})  # a cache (a dict in older ones)
        link_after_unpickle(self)  # a pickle keeps no storage shared: flags views again

    def set_kd_head(self, weight: torch.Tensor | None, bias: torch.Tensor | None = None) -> None:
        """The head that maps this slot's output to logits for the seeds' KD loss (a language
        model's ``lm_head``: ``weight [V, H]`` over the slot's ``H``-wide last dimension), or
        None to compare the output itself with the teacher's logits; with a head, the teacher's
        are ``V`` wide, the loss ``fused_linear_kd_loss``, the head read detached."""
        if weight is None:
            if bias is not None:
                raise ValueError(f"{self.layer_id}: a KD head bias needs its weight")
            self._kd_head = None
            return
        problem = kd_head_problem(weight, bias, self.width, self._buffers["_one"].device)
        if not splits_last_dim(self.chunk_dim, self.seen_output):
            problem = f"a KD head reads the last dimension; this slot chunks dim {self.chunk_dim}"
        if problem is not None:
            raise ValueError(f"{self.layer_id}: {problem}")
        self._kd_head = (weight, bias)  # type: ignore[assignment]

    @property
    def kd_width(self) -> int:
        """The width of this slot's teacher logits: its KD head's vocabulary, or its width."""
        return self.width if self._kd_head is None else int(self._kd_head[0].shape[0])

    # -- forward -------------------------------------------------------------------------
    def forward(self, *args: Any, teacher_logits: torch.Tensor | None = None, **kwargs: Any) -> Any:
        # The hot path reads ``_modules`` directly (``self.host``: a ``__getattr__`` frame a call).
        out = self._modules["host"](*args, **kwargs)
        # The first forward's shapes, then one compare (compiled: a guard, swapped once).
        if (self.output_contract is None or self._provisional) and not torch.jit.is_tracing():
            self._record(args if not kwargs else (), out)  # (a trace check reruns the forward)
        regions = self._kd_regions  # None, or the teachers of non-reentrant checkpoint regions
        if self._teacher_logits is not None or self._recompute_teacher is not None or regions:
            again, (frame, rerun) = recomputing(), checkpoint_region()
            if rerun is not None:  # a non-reentrant checkpoint's recompute: its first run's teacher
                teacher_logits = RegionTeachers.replayed(regions, frame, rerun, teacher_logits)
            elif torch.is_grad_enabled() and not again and self._teacher_depth == transform_depth():
                stored = self._teacher_logits  # taken, unless left to a call they fit
                if teacher_logits is not None or teacher_goes_to(self, stored, out):
                    self._teacher_logits = None
                teacher_logits = stored if teacher_logits is None else teacher_logits
                # For a checkpointing recompute of this forward (below): none after one without.
                self._recompute_teacher = None if stored is None else teacher_logits
            elif not again and not torch.is_grad_enabled():  # a no-grad forward met them: a
                self._graph.reentrant = True  # reentrant checkpoint's first run records no graph
            elif again and self._recompute_teacher is None and self._graph.reentrant:  # so its
                self._teacher_logits, self._graph.reentrant = None, False  # recompute drops them
                if any(s.stage in ISOLATED_TRAINING_STAGES for s in self.seeds):  # said, counted
                    self._sit_out("kd", "teacher logits dropped in a reentrant checkpoint", True)
            elif again and teacher_logits is None:
                teacher_logits = self._recompute_teacher  # the first run's, for the same path
            if frame is not None and rerun is None:  # a region's first run: for its recomputes
                self._kd_regions = RegionTeachers.kept(regions, frame, teacher_logits)
        # A graph (kernels' or the host's: a ROLLBACK rewrites weights it saved), or a reentrant
        # checkpoint's no_grad run; torch names imported (``torch.`` here: a compiled guard).
        graph = not isinstance(out, Tensor) or out.requires_grad
        if (graph and is_grad_enabled()) or graph_to_come(args, kwargs):
            self._graph.open = True
        # Only slot-local attributes here (compiled: guarded on this bool, else the stage ints).
        if not self._runs_any:
            return out  # fast path: every seed passes the host through
        element = output_element(out, self.output_index)
        grafted = on_dense(element, self._graft, self._stage_codes, teacher_logits)
        if grafted is element:  # sat out (a call whose output has no element there: as it is)
            return out
        return replace_output_element(out, self.output_index, grafted)

    def _record(self, args: tuple[Any, ...], out: Any) -> None:
        """Keep ``output_contract``, and ``input_spec`` if ``slot(x)`` replays the call; over a
        provisional record, only from a call that is its batched form (``outputs.rerecorded``)."""
        old = self.output_contract  # not None: provisional, never replaced while compiling
        if old is not None and torch.compiler.is_compiling():
            return
        if not torch.compiler.is_compiling():
            rebuild_if_left(self)  # the first call after a deferred init's load past the slot
        # A reason (no tensor there: a PackedSequence, no attention weights) is no record.
        over = old if isinstance(old, tuple) else None
        moved = self._moved  # a record kept over a move (``_apply``): a provisional one's
        if old is None and moved is not None and self._provisional and isinstance(moved[0], tuple):
            over = moved[0]  # batched form replaces it, as before the move; another call keeps it
        record = slot_record(args, out, self.output_index, self.host, self._rank, moved, over)
        if record is None and old is None and over is not None:
            record = slot_record(args, out, self.output_index, self.host, self._rank, moved)
            over = None
        if record is None and over is not None and self.chunk_dim < 0:
            # A dim counted from the back chunks every rank alike: a call of the record's rank
            # settles it (no check per call after that, on the dormant path).
            element = output_element(out, self.output_index)
            if isinstance(element, Tensor) and element.dim() == len(over[0]):
                self._provisional = False
        if record is not None:
            self.output_contract, self.input_spec, self._moved = *record, None
            element = output_element(out, self.output_index)  # its layout: the dry run's
            strided = isinstance(element, Tensor) and element.layout == torch.strided
            strided = strided and not element.is_nested
            self.output_layout = channels_last_name(element) if strided else None
            # (``outputs.rerecorded``; never compiled, where a record is not replaced: open,
            # it kept the recording branch and its guards in every graph)
            provisional = self._rank is None and over is None and not torch.compiler.is_compiling()
            unrecorded = isinstance(record[0], str)  # tried again at the next call
            self._provisional = unrecorded or (provisional and not self._runs_any)

    def _refresh_plan(self) -> None:
        """Rebuild the plan from the seeds (the table calls this after every change)."""
        # Compiled, stages come from the ints: TorchDynamo (torch 2.13) guards no SeedStage
        # member also met through a module-level set (RUNS_KERNEL), so a graph could keep a stale
        # stage; an int is guarded by value, and each stage change recompiles.
        seeds = self._seed_list = tuple(self.seeds)  # indexing a ModuleList costs a frame
        self._plan = tuple(seed.stage for seed in seeds)
        self._stage_codes = tuple(int(stage) for stage in self._plan)
        self._runs_any = any(s.stage in RUNS_KERNEL and s.kernel is not None for s in seeds)
        self._provisional &= not self._runs_any  # GERMINATE read the record
        # Each seed's kernel's signed input shape (``outputs.kernels_refuse``); () when none has.
        shapes = tuple(signed_shape(s.kernel) if s.stage in RUNS_KERNEL else None for s in seeds)
        self._kernel_shapes = shapes if any(shapes) else ()
        force_regular_path(self.seeds, self._runs_any and self.guards_fused_path)
        rebuild_if_left(self)  # (``constants.rebuild_if_left``)

    def _graft(
        self, x: Any, codes: tuple[int, ...], teacher_logits: torch.Tensor | None
    ) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        if not compiling and compile_callback() not in (None, False):  # (``compile_callback``)
            return torch._dynamo.disable(self._graft)(x, codes, teacher_logits)
        plan = tuple(SeedStage(code) for code in codes) if compiling else self._plan  # (by int)
        problem = self.contract_problem()
        if not isinstance(x, torch.Tensor):  # a call of another kind (an RNN's PackedSequence)
            problem = f"output_index {self.output_index} holds a {type(x).__name__}, no Tensor"
        contract, dim = self.output_contract, self.chunk_dim
        if problem is not None or not fits(x, dim, self.width, contract, self._rank):
            self._sit_out("seeds", problem or f"output {tuple(x.shape)} does not fit")
            return x
        if x.numel() == 0:  # no rows (an expert given no tokens): the host's own call, and no
            return x  # zeros as seed gradients that a step counts as training
        dim = self.chunk_dim % x.dim()
        refused, why = kernels_refuse(x, dim, self.chunk_size, self._kernel_shapes)
        if refused:  # seeds whose exported kernel cannot take this call sit it out
            self._sit_out("seeds", why)
        chunks = x.split(self.chunk_size, dim=dim)
        seeds = self._seed_list  # not ``self.seeds``: a __getattr__ frame, and slow indexing
        # The host half of every seed's guard (a ``try``, a metadata check): one that passes the
        # host through keeps its chunk in ``outs``, value and gradient, as DORMANT.
        outs = list(chunks)
        inputs: dict[int, torch.Tensor] = {}  # the kernels' inputs of the seeds that ran
        for k, (seed, stage) in enumerate(zip(seeds, plan, strict=True)):
            if stage not in RUNS_KERNEL or seed._modules["kernel"] is None or k in refused:
                continue
            if stage == _CHECK:
                seed._probe_unless_compiling(chunks[k])
                continue
            called = seed._call_kernel(chunks[k], stage)
            if called is not None:
                outs[k], inputs[k] = called
        if not inputs:
            return x
        stages, eager = {plan[k] for k in inputs}, plain_eager()
        if eager:  # the guard nodes are eager only (not under torch.func either)
            kd = self.kd_config is not None and teacher_logits is not None
            if stages <= BLENDING_STAGES and not kd and not torch.jit.is_tracing():
                fused = self._guarded_graft(x, outs, inputs, plan, dim, stages)
                if fused is not None:
                    return fused
            contain_isolated(self._seed_list, outs, inputs, plan)
        # The device half, once for the layer: one finiteness reduction over the concatenated
        # outputs, one flag update, one ``where`` (only the reduction when all are finite).
        n = self.num_seeds
        last = dim == x.dim() - 1
        seed_full = torch.cat(outs, dim=dim)
        seed_m = split_chunks(seed_full if last else seed_full.movedim(dim, -1), n)
        ok = finite_test(chunk_sums(seed_m), read_on_host=eager)
        keep = None  # the chunks that do not blend where ``ok`` is known: fallbacks, the host's
        if ok is not None:  # a seed's chunk fails, or could: its own fault, the host's, or none
            host_m = split_chunks(x.detach() if last else x.detach().movedim(dim, -1), n)
            passed = self._masks.passed(n, inputs, ok.device) if len(inputs) < n else None
            ok, keep = fallback_masks(ok, passed)  # only a seed's output can fault
            record_fallbacks(ok, chunk_sums(host_m), *gradient_flags(*self._flags()))
        if stages <= BLENDING_STAGES:
            # Every chunk at once: the seed's output where finite, else the host's (detached).
            full = seed_full
            if ok is not None:
                full = torch.where(ok.unsqueeze(-1), seed_m, host_m)
                full = full.flatten(-2) if last else full.flatten(-2).movedim(-1, dim)
            alphas: list[torch.Tensor] | None = None
            if SeedStage.GRAFTING in stages:
                # A chunk that is not finite blends with alpha 0: the host's value, no gradient
                # (GRAFTING and STABILIZATION give the host none through the slot anyway).
                alphas = self._alphas(plan, inputs)
        else:
            one = self._buffers["_one"]
            full, alphas = fallback_per_chunk(seeds, plan, outs, chunks, inputs, ok, dim, one)
        if self.kd_config is not None and teacher_logits is not None and torch.is_grad_enabled():
            kd = ISOLATED_TRAINING_STAGES
            students = [outs[k] if k in inputs and plan[k] in kd else None for k in range(n)]
            self._maybe_kd(full, students, teacher_logits, dim, ok, x)
        if alphas is None:  # a blend with alpha 1 everywhere is the identity; the host's layout
            return in_layout_of(full, x)  # (a cat of size-1 channel chunks, a contiguous kernel)
        alpha_vec = torch.stack(alphas)
        if stages <= BLENDING_STAGES and ok is not None:
            alpha_vec = alpha_vec.mul(ok)
        full_m = full if last else full.movedim(dim, -1)  # the blend runs over the last dim
        moved = seed_blend(full_m, x if last else x.movedim(dim, -1), alpha_vec, "blend")
        still = self._masks.still(plan, inputs, x.device) if len(stages) > 1 else None
        if still is not None:  # ``full``'s as they are too (``ChunkMasks.still``)
            keep = still if keep is None else keep.logical_or(still)
        if keep is not None:  # those chunks are ``full``'s, the host's (``fallback_masks``)
            pair = (split_chunks(full_m, n), split_chunks(moved, n))
            moved = torch.where(keep.unsqueeze(-1), *pair).flatten(-2)
        return in_layout_of(moved if last else moved.movedim(-1, dim), x)

    def _guarded_graft(
        self, x: torch.Tensor, outs: list[torch.Tensor], inputs: dict[int, torch.Tensor],
        plan: tuple[SeedStage, ...], dim: int, stages: set[SeedStage],
    ) -> torch.Tensor | None:  # fmt: skip
        """The eager path of a layer whose running seeds all blend against the detached host:
        device half, blend and backward guard in one node (``island.guarded_blend``), the same
        values and gradients as the path below. None where that path must run (a seed without
        the backward guard or with a forward-mode tangent, an alpha that needs a gradient)."""
        seeds = self._seed_list
        if not all(seeds[k].guard_backward for k in inputs) or carries_tangent(outs, inputs):
            return None
        grafting, alpha = _GRAFTING in stages, self._buffers["_one"]
        if grafting:
            alpha = torch.stack(self._alphas(plan, inputs))
            if alpha.requires_grad:
                return None
        guarded = [k for k in inputs if outs[k].requires_grad]
        n = self.num_seeds
        passed = self._masks.passed(n, inputs, x.device) if len(inputs) < n else None
        still = self._masks.still(plan, inputs, x.device) if len(stages) > 1 else None
        params = [seeds[k].trained_parameters() for k in guarded]
        return guarded_blend(
            outs, x, alpha, dim=dim, passed=passed, still=still, flags=self._flags(), inputs=inputs,
            guarded=guarded, params=params, seeds=[seeds[k] for k in guarded], blend=grafting,
        )  # fmt: skip

    def _alphas(self, plan: tuple[SeedStage, ...], ran: dict[int, torch.Tensor]) -> list[Any]:
        one, sp = self._buffers["_one"], enumerate(zip(self._seed_list, plan, strict=True))
        # A GRAFTING seed's that ran, else 1; ``_buffers`` spares ``__getattr__`` (a Parameter: no)
        got = [s._buffers.get("alpha") if p == _GRAFTING and k in ran else one for k, (s, p) in sp]
        return [self._seed_list[k].alpha if a is None else a for k, a in enumerate(got)]

    def _maybe_kd(
        self, full: torch.Tensor, students: list[torch.Tensor | None], teacher_logits: torch.Tensor,
        dim: int, ok: torch.Tensor | None, host: torch.Tensor,
    ) -> None:  # fmt: skip
        if all(s is None for s in students):
            return
        # kd_kl_loss refuses vmap; or a call of another shape (a module called more than once)
        problem = "under torch.func.vmap" if under_vmap() else None
        if problem := problem or teacher_fit_problem(full, teacher_logits, self._kd_head):
            self._sit_out("kd", problem)
            return
        seeds = self._seed_list  # those distilling are charged if it raises
        loss = slot_kd_or_fault(
            seeds, self.kd_config, full, students, teacher_logits, self.chunk_size, dim, ok, host,
            self._kd_head,
        )  # fmt: skip
        if loss is not None:  # None: it raised (contained), or a recompute's, taken already
            mark_students(loss, [seeds[k].seed_id for k, s in enumerate(students) if s is not None])
            self._kd_losses.append(loss)

    def _sit_out(self, what: str, reason: str, recompute: bool = False) -> None:
        compiled = self._buffers["sat_out_compiled"]  # a compiled forward's, on the device
        count_sat_out(self.sat_out, compiled, self.layer_id, what, reason, recompute)

    def _apply(self, fn: Any, recurse: bool = True) -> KasminaLayer:
        before = {name: self._buffers[name] for name in CONSTANTS}
        super()._apply(fn, recurse)
        keep_constants(self._buffers, before, CONSTANTS)  # their dtypes and values
        self._link_flags()
        self._masks.clear()
        self._refresh_plan()
        if self._moved is None and self.output_contract is not None:
            self._moved = (self.output_contract, self.input_spec)
        self.output_contract = None  # dtype or device may have changed: record again
        return self

    def extra_repr(self) -> str:
        stages = ", ".join(stage.name for stage in self.stages())
        sizes = f"chunk_size={self.chunk_size}, chunk_dim={self.chunk_dim}"
        return f"layer_id={self.layer_id!r}, {sizes}, stages=[{stages}]"
