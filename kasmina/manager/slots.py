"""The kernel manager's registry of one host model's seed slots (docs/design.md §3, §4).

Why a registry: commands name seeds by id (``"<layer>[k]"``), while the lifecycle lives in one
shared state table indexed by row. The registry maps both ways and keeps, per seed, what the
manager added to it: the artifact and the seed's own kernel copy, whether the cached original is
pinned, the grafting step count, the isolation monitor, and a stage timeline.

Nothing here runs on the dormant hot path. The shapes a slot's host produces are recorded by
the slot itself (``KasminaLayer.output_contract``), not by a hook: a one-shot hook that removed
itself inside the first forward is what ``torch.compile(fullgraph=True)`` cannot trace. The only
hooks are a forward hook on each seed's own kernel, which runs only while that kernel runs;
``close`` removes them, and the registry's observers on the state table, when the manager closes.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kasmina.errors import ParameterOverlapError
from kasmina.isolation.optimizers import HOST_ID, IsolatedOptimizerManager
from kasmina.isolation.stepping import grads_finite
from kasmina.kd.loss import kd_head_problem
from kasmina.manager.exclusive import Claim, check_unshared, keep
from kasmina.manager.exclusive import release as release_claim
from kasmina.manager.held import ModelHold
from kasmina.manager.records import SeedRecord
from kasmina.seeds.charging import contained, terminated
from kasmina.seeds.compiled_cut import CUT_REASON
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.observers import WeakObserver
from kasmina.seeds.outputs import CHANNELS_LAST, ActivationSpec, splits_last_dim
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import ISOLATED_TRAINING_STAGES, RUNS_KERNEL, SeedStage
from kasmina.utils.flags import read_flags
from kasmina.utils.ratelimit import rarely

if TYPE_CHECKING:
    from kasmina.utils.telemetry import TelemetryReporter

logger = logging.getLogger(__name__)

__all__ = ["SlotRegistry"]

# Clipped steps running in which a seed's gradient norm was not finite while the host's was,
# before each such step is a fault. A GradScaler halves its scale at every step with an
# overflow, a seed's included: a gradient that overflowed only because the scale was too high
# is finite a few halvings later, and one still not after 8 (the scale / 256) is the kernel's
# own (a sqrt at 0), whose every further step halves the host's scale too, down to 0. An ACTIVE
# seed's parameters step in the host's optimizer, so its gradient is read apart from the rest
# of the host's (``_split_active``), and at its fault limit it is terminated, its only way out.
BAD_GRADIENT_STEPS = 8

TransitionListener = Callable[["SeedRecord", SeedStage, SeedStage], None]
# A slot's host: the shape and dtype of its first-seen input, and the shape of its output.
HostShapes = tuple[tuple[int, ...], torch.dtype, tuple[int, ...]]


def _param_dtype(slot: KasminaLayer) -> torch.dtype:
    """The host's floating dtype as its parameters declare it (fp32 for a parameterless one)."""
    return next((p.dtype for p in slot.host.parameters() if p.is_floating_point()), torch.float32)


def _random(spec: ActivationSpec) -> torch.Tensor:
    """Standard-normal activations of ``spec`` from a private generator: measuring never
    shifts the global RNG stream a seeded training run depends on."""
    shape, dtype, device = spec
    generator = torch.Generator(device=device).manual_seed(0)
    return torch.randn(shape, device=device, generator=generator).to(dtype)


class SlotRegistry:
    """Seeds of the slots attached to ``model``, all in one shared state table.

    ``host_params``: the model's trainable parameters outside any seed when registered (every
    seed DORMANT without a kernel; ``all_host_params``: and since). ``listener(record, old,
    new)`` is called after every applied transition of any seed.

    A bound-method ``listener`` (a manager's) is held weakly, its object keeping the registry's
    claim on the model (``exclusive.Claim``): kept after its manager was collected unclosed (a
    notebook's ``Out``), a registry claims nothing, keeps no run lock and refuses changes."""

    def __init__(
        self,
        model: nn.Module,
        slots: Sequence[KasminaLayer],
        listener: TransitionListener | None = None,
        telemetry: TelemetryReporter | None = None,
    ) -> None:
        if not slots:
            raise ValueError("no KasminaLayer slots to register")
        table = slots[0].state_table
        if any(slot.state_table is not table for slot in slots):
            raise ValueError("all slots must share one GPUStateTensor (kasmina.attach does this)")
        check_unshared(model, slots)
        self.model = model
        self.slots = list(slots)
        self.table: GPUStateTensor = table
        self._listener = WeakObserver(listener)
        self.records: dict[str, SeedRecord] = {}
        self.by_index: dict[int, SeedRecord] = {}
        # The model's other slots too: their seeds' trainable kernels would be host parameters
        # here, stepped by the host's optimizer, unmonitored (a frozen one is no harm).
        others = [m for m in model.modules() if isinstance(m, KasminaLayer) and m not in slots]
        for slot in [*self.slots, *others]:
            for seed in slot.seeds:
                held = seed.kernel is not None
                if held and slot in others:  # frozen, it is served as it is
                    held = any(p.requires_grad for p in seed.kernel.parameters())
                if held or (seed.stage != SeedStage.DORMANT and slot not in others):
                    raise ValueError(
                        f"seed {seed.seed_id}{' (of a slot not taken over)' * (slot in others)} "
                        f"is {seed.stage.name}"
                        f"{' with a kernel' if held else ''}: a manager "
                        "takes over only slots whose seeds are all DORMANT without a kernel (a "
                        "seed's optimizer, monitor and pin are its manager's). To train a grown "
                        "model on, resume its run (attach the bare host, then a ROLLBACK to a "
                        "checkpoint), or kasmina.merge it and attach the merged model"
                    )
                if slot in others:
                    continue
                if seed.seed_id in self.records or seed.state_index in self.by_index:
                    raise ValueError(  # a row twice: slots built by hand onto one table
                        f"duplicate seed id {seed.seed_id!r} or state row {seed.state_index}"
                    )
                record = SeedRecord(seed.seed_id, seed.state_index, seed, slot)
                self.records[seed.seed_id] = record
                self.by_index[seed.state_index] = record
        seed_ids = {id(p) for slot in self.slots for p in slot.seeds.parameters()}
        self.host_params: list[nn.Parameter] = [
            p for p in model.parameters() if p.requires_grad and id(p) not in seed_ids
        ]
        # Taken up later from a param group a user added to the host optimizer (a step's
        # ``take_host_groups``).
        self.added_host_params: dict[int, nn.Parameter] = {}
        # Each slot's host shapes as a checkpoint saved them (``evaluation.host_shapes``): G3's
        # cost in a process resumed by a ROLLBACK before the slot's first forward.
        self.saved_host_shapes: dict[str, HostShapes] = {}
        # The thread that trains (registers, then ends the steps: ``end_step``): measurements
        # run forwards on it only. The Thread, weakly, not its id: a dead thread's id is the
        # next new thread's (an exporter started after an epoch's trainer thread ended).
        self.training_thread = weakref.ref(threading.current_thread())
        # What the model held when registered, for ``check_held``.
        self.hold = ModelHold(model, {s.layer_id: s for s in self.slots}, seed_ids)
        # The seeds' events go to this manager's reporter (not a closed manager's, or none).
        self._reporter, self._replaced = telemetry, table.telemetry
        if telemetry is not None:
            table.telemetry = telemetry
        # Last, after every check: a refusal leaves no owner behind.
        owner = getattr(listener, "__self__", None)
        self._lost: list[object] = []  # the owner's collection appends (``require_manager``)
        self._owner = None if owner is None else weakref.ref(owner, self._lost.append)
        claim = Claim(self, self._on_transition)
        for index in self.by_index:
            table.observe(index, claim.on_transition, follows_copies=False)  # not in a copy
        self._kept = claim if owner is None else None  # else its owner's to keep
        self._claim = keep(claim, owner)

    def require_manager(self) -> None:
        """``RuntimeError`` once the manager that registered this was collected without
        ``close()``: its claim on the model went with it (``exclusive.Claim``), and a change
        here would reach no optimizer, checkpoint or report of it."""
        if self._lost:
            raise RuntimeError(
                "the manager of this slot registry was garbage-collected without close(): the "
                "registry manages the model no more. Register the model with a live manager "
                "(registry.close() takes the collected one's kernel hooks off the model)"
            )

    def check_held(self, optimizers: IsolatedOptimizerManager | None = None) -> None:
        """``RuntimeError`` if a registered slot was taken out (``detach``, ``merge``, by hand) or
        the model holds parameters not registered that nothing steps (``ModelHold.check``)."""
        known = None if optimizers is None else lambda: self._stepped(optimizers)  # noqa: E731
        detached = [slot.layer_id for slot in self.slots if slot.detached]
        self.hold.check(detached, known, optimizers is not None and optimizers.has_host)

    def _stepped(self, optimizers: IsolatedOptimizerManager) -> set[int]:
        """Ids of the parameters an optimizer steps, a seed's with none yet and without a host
        optimizer a host's (the trainer's); not one a seed's lost (``load(assign=True)``)."""
        seeds = [(s.seed_id, p) for slot in self.slots for s in slot.seeds for p in s.parameters()]
        own, model = optimizers.seed_ids, {id(p) for p in self.model.parameters()}
        host = ({*self.added_host_params, *self.host_groups_of(optimizers)} if optimizers.has_host
                else model - {id(p) for _, p in seeds})  # fmt: skip
        return host | {id(p) for i, p in seeds if i not in own or optimizers.owner_of(p)}

    def take_host_groups(
        self,
        optimizers: IsolatedOptimizerManager,
        *,
        rebuilt: bool = False,
        step: bool = False,
        unfrozen: Sequence[nn.Parameter] | None = None,
    ) -> None:
        """Take up the param groups a user added to the host optimizer since the last call
        (``IsolatedOptimizerManager.take_host_groups``); their parameters are on the host side
        of the isolation line from then on (``host_side_params``: the KD leak check and the
        monitors of seeds germinated later or restored by a rollback). ``rebuilt``: after a
        rollback, read them all again from the groups past the host's first (the seeds promoted
        into them left out), and set which parameters frozen at registration train as the
        checkpoint recorded (``unfrozen``; ``ModelHold.restore_unfrozen``). ``step``: a step's
        call, which also refuses one unfrozen that no group holds (``check_unfrozen``)."""
        self.require_manager()
        if not rebuilt:
            for p in optimizers.take_host_groups(self.parameter_names):
                self.added_host_params.setdefault(id(p), p)
            if step and optimizers.has_host and self.hold.frozen:
                groups = optimizers.optimizer(HOST_ID).param_groups
                layout = (groups, len(groups))
                self.hold.check_unfrozen(lambda: set(self.host_groups_of(optimizers)), layout)
        elif optimizers.has_host:  # dict and list reads only: a rollback's commit calls it
            self.added_host_params = self.host_groups_of(optimizers)
            self.hold.recheck()  # a replaced layer's group may be gone: the step then says so
            # (Without the manager's host optimizer the flags are the trainer's loop's.)
            if self.hold.frozen and (
                changed := self.hold.restore_unfrozen(unfrozen, self.added_host_params)
            ):
                logger.info("rollback: %s (un)frozen as in the checkpoint", changed)

    def promote_active(
        self, optimizers: IsolatedOptimizerManager, records: Iterable[SeedRecord] | None = None
    ) -> None:
        """Promote the ACTIVE seeds (``records``, default every one) that still step on their
        own optimizer into the host's, each into its slot's host layer's group (no new group: a
        user's LR scheduler on it keeps working), after the groups added since the last step
        are taken up. At the transition to ACTIVE, and after an optimizer command: a seed
        fossilized while there was no host optimizer (``host_lr=None``) joins the one an
        INITIALIZE_HOST made."""
        self.require_manager()
        if not optimizers.has_host:
            return
        for record in self.in_stages({SeedStage.ACTIVE}) if records is None else records:
            if record.seed_id in optimizers.seed_ids:
                self.take_host_groups_before_promotion(optimizers)
                optimizers.promote_seed(record.seed_id, near=record.slot.host.parameters())

    def fossilize(self, record: SeedRecord) -> None:
        """A seed gone ACTIVE is the host's: its monitor dropped, its parameters on the host
        side of every other seed's graph walk (a monitor took its host side at GERMINATE)."""
        self.require_manager()
        record.monitor, record.last_output, record.input_grad = None, None, False
        for monitor in (other.monitor for other in self if other.monitor is not None):
            monitor.extend_host(record.seed.seed_parameters(), f"active {record.seed_id}")

    def take_host_groups_before_promotion(self, optimizers: IsolatedOptimizerManager) -> None:
        """A seed fossilizes at a safe point: take up the groups added since the last step
        first, since one may hold the slot's layer, whose group the seed joins. An edit
        ``take_host_groups`` refuses is logged here and left to the next step to raise."""
        try:
            self.take_host_groups(optimizers)
        except (ValueError, ParameterOverlapError) as exc:
            logger.warning("host param groups not taken up before a promotion: %s", exc)

    @staticmethod
    def host_groups_of(optimizers: IsolatedOptimizerManager) -> dict[int, torch.Tensor]:
        """The parameters of the host's groups past its first, the seeds promoted into them
        left out: what ``take_host_groups(rebuilt=True)`` takes up from ``optimizers``."""
        promoted = {id(p) for _, ps in optimizers.promoted().values() for p in ps}
        groups = optimizers.optimizer(HOST_ID).param_groups[1:]
        return {id(p): p for g in groups for p in g["params"] if id(p) not in promoted}

    def parameter_names(self, params: Sequence[torch.Tensor]) -> list[str]:
        """The model's names of ``params`` (``model.named_parameters()``), those of a param
        group a user added to the host optimizer, which a checkpoint rebuilds by them. A seed's
        parameter is a ``ParameterOverlapError`` (a seed trains in its own optimizer until it is
        promoted), one the model does not hold a ``ValueError`` (a checkpoint could not hold it)."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        seeds = {id(p) for slot in self.slots for p in slot.seeds.parameters()}
        what = "a param group added to the host optimizer (add_param_group)"
        for p in params:
            if id(p) in seeds:
                raise ParameterOverlapError(f"{what} holds seed parameter {names.get(id(p))}")
            if id(p) not in names:
                raise ValueError(f"{what} holds a parameter the model does not: register it first")
        return [names[id(p)] for p in params]

    def parameters_named(self, names: Sequence[str]) -> list[nn.Parameter]:
        """The model's parameters of these names (``parameter_names`` reversed), or a
        ``ValueError`` naming those it no longer holds."""
        held = dict(self.model.named_parameters())
        missing = [name for name in names if name not in held]
        if missing:
            raise ValueError(f"the model holds no parameter {missing} (of a host param group)")
        return [held[name] for name in names]

    def close(self, *, undone: bool = False) -> None:
        """Let go of the model (``manager.close()``): the state table's observers of its seeds,
        its reporter, each kernel's forward hook, the monitors and the kept outputs (with their
        graphs) go, so the closed manager hears of no later transition and a forward of the
        model reaches nothing of it. The kernels stay in the model, which is the user's; the
        records stay readable. ``undone`` (a ``register`` that failed): the table reports where
        it did before. Idempotent; a registry whose manager was collected may be closed too."""
        claim, self._kept = self._claim(), None
        if claim is not None:
            release_claim(claim)
        if self._reporter is not None and self.table.telemetry is self._reporter:
            self.table.telemetry = self._replaced if undone else None
        self._listener = WeakObserver(None)
        for record in self.records.values():
            if claim is not None:
                self.table.unobserve(record.index, claim.on_transition)
            if record.hook is not None:
                record.hook.remove()
                record.hook = None
            record.monitor, record.last_output, record.input_grad = None, None, False

    # ------------------------------------------------------------------ lookup
    def __getitem__(self, seed_id: str) -> SeedRecord:
        try:
            return self.records[seed_id]
        except KeyError:
            raise KeyError(f"unknown seed {seed_id!r} (have {sorted(self.records)})") from None

    def __iter__(self) -> Any:
        return iter(self.records.values())

    def in_stages(self, stages: Iterable[SeedStage]) -> list[SeedRecord]:
        """The records of the seeds in ``stages``, in registration order. Read off the table's
        mirror in one pass: a step asks this several times, and with hundreds of seeds each
        seed's own ``stage`` (three property reads and a range check) cost milliseconds."""
        wanted = frozenset(stages)
        mirror = self.table.stages()
        return [r for r in self.records.values() if mirror[r.index] in wanted]

    def last_dim_slots(self, keep: Callable[[KasminaLayer], bool]) -> list[KasminaLayer]:
        """The slots split along their output's last dimension (the one a KD loss reads) that
        ``keep`` accepts, in order."""
        last = (s for s in self.slots if splits_last_dim(s.chunk_dim, s.seen_output))
        return [slot for slot in last if keep(slot)]

    def kd_head_slots(self, weight: torch.Tensor, bias: Any = None) -> list[KasminaLayer]:
        """The slots a KD head ``weight [V, H]`` (and ``bias``) maps to logits
        (``last_dim_slots``, ``H`` wide), each checked to take it (``kd_head_problem``: its
        device) before any does; ``ValueError`` when one cannot, or there is none: a ``[H, V]``
        head (a ``Conv1D``'s weight) or one of another width was given to no slot, silently,
        and KD then read no logits."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"a KD head weight is a [V, H] tensor, got {weight!r:.60}")
        chosen = self.last_dim_slots(lambda s: s.width == weight.shape[-1])
        if not chosen:
            widths = sorted({s.width for s in self.last_dim_slots(lambda s: True)})
            raise ValueError(
                f"no slot is {weight.shape[-1]} wide on its last dim, as a [V, H] KD head of "
                f"shape {tuple(weight.shape)} needs: the slots are {widths} wide (a Conv1D's "
                "weight is [H, V]: pass its transpose)"
            )
        for slot in chosen:  # a slot on another device refused after the first took it
            problem = kd_head_problem(weight, bias, slot.width, slot.sat_out_compiled.device)
            if problem is not None:
                raise ValueError(f"{slot.layer_id}: {problem}")
        return chosen

    def end_step(self) -> int:
        """At a step's end: drop the KD losses the slots hold (with their graphs), the teacher
        logits kept for a recompute and the slots' graph marks; how many slots held a loss."""
        self.require_manager()
        # The model's forwards are this thread's (its Thread: see ``__init__``), kept anew only
        # when another thread ends the step.
        if self.training_thread() is not (thread := threading.current_thread()):
            self.training_thread = weakref.ref(thread)
        for slot in self.slots:
            slot.end_step()
        return sum(slot.get_and_clear_kd_losses() is not None for slot in self.slots)

    def on_training_thread(self) -> bool:
        """Whether the calling thread is the training thread (the same ``Thread``: one that
        ended is nobody's, though a new thread has its id)."""
        return self.training_thread() is threading.current_thread()

    def graph_open(self) -> bool:
        """Whether a slot's forward recorded a graph since the last step's end."""
        return any(slot.graph_open for slot in self.slots)

    def host_frozen(self) -> bool:
        """Whether no host parameter needs a gradient now (the user froze the host)."""
        return not any(p.requires_grad for p in self.all_host_params())

    def all_host_params(self) -> list[nn.Parameter]:
        """The host's parameters: registered trainable, taken up from an added param group, or
        frozen when registered and unfrozen since (``ModelHold.unfrozen``)."""
        added = self.added_host_params
        unfrozen = [p for p in self.hold.unfrozen() if id(p) not in added]
        return [*self.host_params, *added.values(), *unfrozen]

    def host_side_params(self) -> list[nn.Parameter]:
        """Parameters on the host side of the isolation line: the host's and ACTIVE seeds'."""
        params = self.all_host_params()
        for record in self.in_stages([SeedStage.ACTIVE]):
            params += record.seed.seed_parameters()
        return params

    def seed_parameters(self, seed_id: str) -> list[nn.Parameter]:
        return self[seed_id].seed.seed_parameters()

    # ------------------------------------------------------------------ G2's evidence
    def trained(self, trained: Iterable[str]) -> list[SeedRecord]:
        """The records among ``trained`` (``with_gradients``) whose step moves their
        bookkeeping: an ISOLATED_INIT seed not yet marked in this epoch, or a GRAFTING seed."""
        records = (self[seed_id] for seed_id in trained)
        return [r for r in records if r.stage == SeedStage.GRAFTING or _unmarked(r.seed)]

    def with_gradients(self, stepped: Iterable[str]) -> list[str]:
        """After a step's optimizer steps, before its gradients are zeroed: the seeds among
        ``stepped`` (whose optimizer stepped, a non-finite norm's skip left out) that had a
        gradient to apply, i.e. that this step trained (an optimizer step without one changes
        nothing). Read on the host (``grad is None``): no sync. Every rank of a data-parallel
        run finds the same seeds: the seed gradients are averaged (one missing on some ranks
        is zero there) or dropped on every rank together."""
        return [
            s for s in stepped if any(p.grad is not None for p in self[s].seed.trained_parameters())
        ]

    def charge_failed_steps(
        self, optimizers: IsolatedOptimizerManager, cut: Sequence[str] = ()
    ) -> None:
        """A fault for each seed whose optimizer's step raised in the optimizers' last stepping
        call, ``step()``'s or a STEP command's; taken, so each is charged once (``contained``).
        And one for each seed of ``cut`` (its compiled cut zeroed its own non-finite input
        gradient; its flag, kept since the poll so that a step that raised first leaves it to
        the next, is cleared here), unless the rest of the host's gradients overflowed too (a
        GradScaler's scale still too high: eager hands it to the host, and charges no seed) or
        its own did (the run of non-finite gradients below counts it, and the scaler saw it);
        unclipped, the host's gradients are read for it (one transfer, in a step with a cut)."""
        self.require_manager()
        failed, optimizers.failed_now = optimizers.failed_now, []
        for seed_id in failed:
            if (record := self.records.get(seed_id)) is not None:
                contained(record.seed, "optimizer", optimizers.failed_steps[seed_id][1])
        norms, optimizers.norms_now = optimizers.norms_now, {}
        host = norms.get(HOST_ID)
        if host is not None:  # its norm holds its ACTIVE seeds': each read apart, into norms
            host = self._split_active(optimizers, norms, host)
        elif cut or not all(norms.values()):  # unclipped, or the user steps the host: its grads
            params = [p for p in self.all_host_params() if p.grad is not None]
            host = read_flags([grads_finite(params)])[0] if params else None  # one transfer
        for record in [r for s in cut if (r := self.records.get(s)) is not None]:
            record.seed.cut_flag.fill_(False)  # judged now (charged below or not), once
            if host is not False and norms.get(record.seed_id, True):  # the host's overflow: no
                record.seed.charge_fault("nonfinite", CUT_REASON)  # seed's; flags agreed by ranks
        if not host:  # not clipped, or the host's overflowed too (a scale still too high):
            for seed_id, finite in norms.items():  # a seed finite in it ended its streak
                if finite and (record := self.records.get(seed_id)) is not None:
                    record.bad_gradients = 0
            return
        for seed_id, finite in norms.items():  # each step of such a run halves a GradScaler's
            if (record := self.records.get(seed_id)) is None:  # scale, the host's too, down to 0
                continue
            record.bad_gradients = 0 if finite else record.bad_gradients + 1
            if record.bad_gradients >= BAD_GRADIENT_STEPS:
                seed, faults = record.seed, record.seed.faults
                contained(
                    seed, "gradient", f"gradient not finite in {record.bad_gradients} clipped "
                    "steps running, the host's finite",
                )  # fmt: skip
                limit = seed.faults > faults and seed.faults >= seed.fault_limit  # counted
                if limit and record.stage == SeedStage.ACTIVE:
                    # No QUARANTINE from ACTIVE, and no output to fall back from: its gradient
                    # would keep skipping the host's step (or halving a shared GradScaler's
                    # scale) for good. TERMINATED runs no kernel: the host's step resumes.
                    msg = "seed %s: gradient fault limit in ACTIVE: terminated, the host trains on"
                    logger.error(msg, record.seed_id)
                    if terminated(seed):  # raised: logged, the other seeds charged on
                        record.bad_gradients = 0
                    for p in seed.seed_parameters():  # its own optimizer, gone, zeroed none
                        p.grad = None

    def _split_active(
        self, optimizers: IsolatedOptimizerManager, norms: dict[str, bool], host: bool
    ) -> bool:
        """Whether the host's clipped norm, less its ACTIVE seeds' (promoted into the host's
        optimizer: ``promote_active``), is finite; each such seed's own finiteness goes into
        ``norms``. With the host's finite so are theirs, and nothing is read; else one transfer
        reads the rest's flag and each seed's, at such a step only (a GradScaler's overflow,
        or such a seed). The rest's not finite too, it is the host's overflow: no seed's fault."""
        promoted = optimizers.promoted()
        if not promoted:  # no seed fossilized into it (the common case): nothing to look up
            return host
        active = [r.seed_id for r in self.in_stages([SeedStage.ACTIVE]) if r.seed_id in promoted]
        if host or not active:
            norms.update(dict.fromkeys(active, True))
            return host
        theirs = {id(p) for seed_id in active for p in promoted[seed_id][1]}
        rest = [p for p in optimizers.parameters(HOST_ID) if id(p) not in theirs]
        groups = [rest, *(promoted[seed_id][1] for seed_id in active)]
        flags = read_flags([grads_finite(params) for params in groups])  # one transfer
        norms.update(zip(active, flags[1:], strict=True))
        return flags[0]

    def frozen(self, counters: Counter[str]) -> list[str]:
        """The seeds in an isolated training stage whose kernel has parameters but none that
        requires a gradient (a ``model.requires_grad_(False)``, say): they would never
        train, and a GRAFTING alpha would never move. Counted in ``frozen_seed_steps`` and
        logged (the first time, then every 1000th). ``requires_grad`` is the user's to set, so
        this warns rather than refuses. Host reads only; a kernel's parameters are listed only
        when none requires a gradient."""
        frozen = [
            r.seed_id
            for r in self.in_stages(ISOLATED_TRAINING_STAGES)
            if r.kernel is not None and not r.seed.trained_parameters() and r.seed.seed_parameters()
        ]
        if frozen:
            counters["frozen_seed_steps"] += 1
            msg = "seed(s) %s train in this stage but no parameter of theirs requires grad (%d)"
            logger.log(rarely(counters["frozen_seed_steps"], 1000), msg, frozen, len(frozen))
        return frozen

    def count_trained_epochs(self) -> None:
        """At an epoch boundary, after the tick (which changes no stage): an ISOLATED_INIT seed
        that trained in the epoch counts it (G2 compares the count with ``min_isolated_epochs``);
        the marks are cleared."""
        self.require_manager()
        for record in self.records.values():
            seed = record.seed
            if seed.trained_this_epoch and seed.stage == SeedStage.ISOLATED_INIT:
                seed.trained_epochs += 1
            seed.trained_this_epoch = False

    # ------------------------------------------------------------------ observed shapes
    def probe_sample(self, record: SeedRecord) -> torch.Tensor | None:
        """Random host activations of the last-seen shape of this seed's input, for G3. A
        process that has seen no forward (one resumed by a ROLLBACK) knows no such shape: then
        the one input its kernel's manifest declares, a dynamic dimension at 2, in the host's
        parameter dtype (that kernel passed GERMINATE's checks against the slot's recorded
        activations in the run that grew it; GERMINATE itself never probes on these). The
        probe runs outside ``torch.autocast``: a floating input seen under it (in autocast's
        dtype) is probed in the chunk's recorded dtype, the host's outside autocast."""
        chunk, spec = self.chunk_spec(record), record.last_input
        if spec is not None and spec[1].is_floating_point:
            spec = (spec[0], chunk[1] if chunk else _param_dtype(record.slot), spec[2])
        spec = spec or chunk
        if spec is None and record.kernel is not None:
            declared = record.kernel.example_inputs()
            if len(declared) == 1:
                spec = (declared[0].shape, _param_dtype(record.slot), declared[0].device)
        return None if spec is None else _random(spec)

    def chunk_spec(self, record: SeedRecord) -> ActivationSpec | None:
        """Shape, dtype and device of the seed's chunk (along ``chunk_dim``) of its slot's
        recorded host output, the seed's input; None before the slot's first forward."""
        return record.slot.chunk_spec()

    def dry_run_samples(self, record: SeedRecord) -> list[torch.Tensor]:
        """Random activations shaped like the seed's recorded input at two batch sizes (the
        recorded one, and half of it, or one more when it is below 4): a kernel exported with a
        static batch, or on the wrong rank, fails on one of them. Each is the seed's chunk of a
        random slot output, a view with the strides the seed's calls get (a channel chunk of
        an NCHW output is not contiguous: a kernel that ``view``s its input fails here, not
        at every call), in the layout the slot's output was recorded in (channels last).
        Empty before the slot's first forward (GERMINATE refuses then)."""
        spec, slot = self.chunk_spec(record), record.slot
        if spec is None or not spec[0]:
            return []
        contract = slot.output_contract
        assert isinstance(contract, tuple)  # ``chunk_spec`` checked it
        full, dtype, device = contract
        batch = full[0]
        other = batch // 2 if batch >= 4 else batch + 1
        k = next(i for i, seed in enumerate(slot.seeds) if seed is record.seed)
        dim = slot.chunk_dim % len(full)
        samples = []
        layout = CHANNELS_LAST.get(getattr(slot, "output_layout", None), torch.contiguous_format)
        for size in (batch, other) if dim else (batch,):  # dim 0 (the batch) chunked: one size
            out = _random((torch.Size((size, *full[1:])), dtype, device))
            out = out.contiguous(memory_format=layout)  # a channels-last host's strides
            samples.append(out.split(slot.chunk_size, dim=dim)[k])
        return samples

    def dormant_sample(self) -> tuple[KasminaLayer, torch.Tensor] | None:
        """A slot none of whose seeds runs, with a random input of its first-seen shape."""
        for slot in self.slots:
            spec = slot.input_spec
            if spec is None:
                continue
            if any(s.stage in RUNS_KERNEL and s.kernel is not None for s in slot.seeds):
                continue
            if spec[1].is_floating_point:
                return slot, _random(spec)
        return None

    # ------------------------------------------------------------------ transitions
    def _on_transition(self, idx: int, old: SeedStage, new: SeedStage) -> None:
        record, listener = self.by_index.get(idx), self._listener()
        if record is None or listener is None:
            return
        try:
            listener(record, old, new)
        except Exception:  # a bookkeeping failure must not undo a transition already applied
            logger.exception("transition listener failed for seed %s", record.seed_id)


def _unmarked(seed: GradientIsolatedSeed) -> bool:
    """An ISOLATED_INIT seed that has not yet trained in the epoch under way."""
    return seed.stage == SeedStage.ISOLATED_INIT and not seed.trained_this_epoch
