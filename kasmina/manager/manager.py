"""KasminaKernelManager: the ``KernelExecutionContract`` executor.

One object wires the parts together (docs/design.md §3-§7): the Urza client and kernel cache,
the signed-command handler (the manager is its executor), the slots' shared lifecycle table, an
optimizer and an isolation monitor per seed beside the host's optimizer, the KD teacher, epoch
checkpoints, telemetry. A façade: components given a ``ManagerState`` do the work. A loop::

    manager = KasminaKernelManager(config, keyring=keyring)
    manager.attach(model, "fc2", seeds_per_layer=2, chunk_size=16)  # host optimizer too
    for epoch in range(epochs):
        for x, y in batches:
            manager.set_teacher_logits(manager.get_teacher_predictions(x))  # optional KD
            loss = F.cross_entropy(model(x), y)           # the slots do the seeds' work
            manager.backward(loss, kd_loss=manager.collect_kd_losses())
            manager.step()       # isolation checks, host + seed optimizers, alpha schedules
        manager.end_epoch(epoch, {"val_accuracy": acc})  # checkpoint, tick, recycling
        # meanwhile, any thread: manager.handle_adaptation_command(signed) (applied at step())

Kernels load once, verified, into the cache; each seed trains its own copy of a pinned original.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, closing
from itertools import compress
from typing import Any

import torch
from torch import nn

from kasmina.control.commands import MAX_EPOCH, KasminaCommand
from kasmina.control.handler import LeylineAdaptationHandler
from kasmina.control.processes import check_supported_parallelism
from kasmina.isolation.optimizers import HOST_ID
from kasmina.isolation.stepping import checked_clip_norm
from kasmina.kd.teacher import CheckpointedTeacher, TeacherForwardPassManager, TeacherInput
from kasmina.leyline import AdaptationCommand, SystemStatePacket, TelemetryPacket
from kasmina.manager.config import KasminaConfig, manager_inputs
from kasmina.manager.evaluation import LossFn, MetricFn, evaluate_seeds
from kasmina.manager.exclusive import check_unshared
from kasmina.manager.executor import CommandExecution, CommandOutcome
from kasmina.manager.grad_sync import GradSync
from kasmina.manager.guard import IsolationGuard, runs_main_backward
from kasmina.manager.intake import CommandIntake, CommandRelay, command_bytes, command_verifier
from kasmina.manager.pending import CommandQueue
from kasmina.manager.report import ManagerReport, TargetCheck, epoch_metrics, metrics_of_the_model
from kasmina.manager.rollback import kernels_to_fetch, restorable, snapshot
from kasmina.manager.slots import SlotRegistry
from kasmina.manager.state import ManagerState, StateField, check_device, check_optimizer
from kasmina.manager.step_flags import settle_step_flags
from kasmina.manager.teaching import hand_kd_head, hand_teacher_logits, new_teacher
from kasmina.seeds.gates import SeedEvaluation
from kasmina.seeds.inject import attach, collect_kd_losses, detach, fill_constants, given_slots
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.stages import ISOLATED_TRAINING_STAGES, TRAINING_STAGES, SeedStage
from kasmina.urza.artifact import validate_artifact_id
from kasmina.urza.cache import GPUKernelCache
from kasmina.urza.client import UrzaLibraryClient
from kasmina.urza.kernel import GPUKernel
from kasmina.urza.loader import KernelLoader
from kasmina.utils.interrupts import interrupts_deferred, take_lock
from kasmina.utils.jsonl_sink import JsonlFileSink
from kasmina.utils.keyring import Keyring
from kasmina.utils.orphans import add_owned_sink
from kasmina.utils.telemetry import TelemetryReporter

logger = logging.getLogger(__name__)

__all__ = ["KasminaKernelManager"]


class KasminaKernelManager(AbstractContextManager["KasminaKernelManager"]):
    """Loads, caches and grafts seed kernels on command (the module docstring); ``with`` closes
    it (``close``). A façade: the fields below read through to ``self.state`` (a ``ManagerState``),
    which the components (``guard``, ``report``, ``execution``, ``handler``, ``intake``) receive."""

    config = StateField()
    telemetry = StateField()
    device = StateField()
    kernel_cache, loader = StateField(), StateField()
    registry = StateField()
    optimizers = StateField()
    optimizer_cls, optimizer_options, seed_lr = StateField(), StateField(), StateField()
    teacher = StateField()
    epoch, global_step, val_metrics = StateField(), StateField(), StateField()  # the clock
    counters = StateField()
    gate_counts, field_reports = StateField(), StateField()
    command_log, perf = StateField(), StateField()
    checkpoints = StateField()
    keyring = StateField("verifier")  # the command keys its verifier prepared (docs §5)

    def __init__(
        self,
        config: KasminaConfig | None = None,
        *,
        keyring: Keyring | None = None,
        telemetry: TelemetryReporter | None = None,
        urza_client: Any | None = None,
    ) -> None:
        config, keyring = manager_inputs(config, keyring)
        telemetry = telemetry if telemetry is not None else TelemetryReporter("kasmina")
        path, cap = config.telemetry_jsonl_path, config.telemetry_jsonl_max_bytes
        with ExitStack() as undo:  # a constructor that raises leaves no file, ledger or sink
            self._jsonl = undo.enter_context(closing(JsonlFileSink(path, cap))) if path else None
            kernel_cache = GPUKernelCache(config.cache_size_mb, config.cache_max_kernels)
            # Artifacts verify against the configured publisher public keys, never the keyring:
            # the command keys cannot sign an artifact (docs/design.md §5, "Key purposes").
            self.urza_client = urza_client or undo.push(UrzaLibraryClient.from_config(config))
            self._owns_client = self.urza_client is not urza_client  # a caller's stays open
            loader = KernelLoader(self.urza_client, kernel_cache, config.torch_device, telemetry)
            state = self.state = ManagerState(config, telemetry, kernel_cache, loader)
            state.open_run(undo)  # marked as a run; a restart holds its lock from the start
            self.guard = IsolationGuard(config, telemetry, state.counters, state.checkpoint_signer)
            self.report = ManagerReport(state, self.guard)
            self.execution = CommandExecution(state, self.guard, self.report)
            self.verifier = undo.enter_context(closing(command_verifier(config, keyring)))
            self.handler = LeylineAdaptationHandler(self.verifier, self, telemetry)
            self.teacher_passes = TeacherForwardPassManager(None)
            self._lock = threading.RLock()
            workers, limit = config.fetch_workers, config.max_pending_commands
            ahead = lambda epoch: kernels_to_fetch(state, epoch)  # noqa: E731 (a ROLLBACK's)
            self.pending = CommandQueue(
                loader, ahead, state.has_seed, max_pending=limit, fetch_workers=workers
            )
            parts = (self.handler, self.verifier, self.pending, self.execution, self.report)
            self.intake = CommandIntake(*parts, lock=self._lock, perf=state.perf)
            config.hold()  # built (a constructor that raised left the config settable)
            undo.pop_all()  # from here on close() closes them
        self._release_jsonl = add_owned_sink(telemetry, self._jsonl, self)  # last; see close
        self.command_relay: CommandRelay | None = None  # DistributedKasmina's (``join_run``)
        self.grad_sync: GradSync | None = None

    # ------------------------------------------------------------------ slots
    def attach(
        self,
        model: nn.Module,
        targets: str | Collection[str],
        seeds_per_layer: int,
        chunk_size: int,
        *,
        chunk_dim: int | None = None,
        output_index: int = 0,
        host_lr: float | None = 1e-3,
        seed_lr: float = 1e-3,
        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
        **optimizer_options: Any,
    ) -> list[KasminaLayer]:
        """``kasmina.attach`` the targets (one shared state table), then ``register`` them; if
        that fails, the slots come off again. ``targets``, ``chunk_dim`` and ``output_index``
        mean what they mean for ``kasmina.attach``. The slots record their host's output on the
        first forward, eager or compiled, and GERMINATE checks an artifact against that record."""
        self.state.require_no_model()
        check_unshared(model, ())  # before wrapping: a refused attach edited the other's model
        kd = self.config.kd if self.config.kd_enabled else None
        slots = attach(
            model, targets, seeds_per_layer, chunk_size, chunk_dim=chunk_dim,
            output_index=output_index, kd_config=kd,
            embargo_epochs=self.config.default_embargo_epochs, telemetry=self.telemetry,
        )  # fmt: skip
        options = dict(optimizer_options, host_lr=host_lr, seed_lr=seed_lr)
        try:
            self.register(model, slots, optimizer_cls=optimizer_cls, **options)
        except BaseException:
            detach(model, only=slots)  # all or nothing: the model as it was
            raise
        return slots

    def register(
        self,
        model: nn.Module,
        slots: Iterable[KasminaLayer] | KasminaLayer | None = None,
        *,
        host_lr: float | None = 1e-3,
        seed_lr: float = 1e-3,
        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
        **optimizer_options: Any,
    ) -> SlotRegistry:
        """Manage already-attached slots (one, or any iterable; none: all in ``model``). The host
        optimizer (``optimizer_cls`` at ``host_lr`` over the model's parameters outside the seeds)
        is created unless ``host_lr`` is None; then ``step()`` leaves the host's gradients alone
        until INITIALIZE_HOST creates it, dropping them. Seeds get the same class at ``seed_lr``
        (or a GERMINATE's ``learning_rate``). A group added to the host optimizer later (its
        ``add_param_group``) is checked and taken up at the next ``step()`` (design.md §4)."""
        self.state.require_no_model()
        device = self.config.torch_device  # where GERMINATE will load the kernels
        check_device(model, device)
        host_lr = check_optimizer(optimizer_cls, seed_lr, optimizer_options, host_lr, device)
        check_supported_parallelism(model)  # FSDP / tensor-parallel hosts: a clear refusal
        slots = given_slots(model, slots)  # any iterable of slots, or one; names refused
        fill_constants(model)  # a deferred init's meta constants: no data to undo, after the checks
        registry = SlotRegistry(model, slots, self.execution.on_transition, self.telemetry)
        state = self.state
        state.optimizer_cls, state.seed_lr = optimizer_cls, float(seed_lr)
        state.optimizer_options = dict(optimizer_options)
        state.registry = registry
        try:
            state.optimizers = state.new_optimizer_manager()
            if host_lr is not None:
                params, cls = registry.host_params, optimizer_cls
                state.optimizers.initialize_host(params, host_lr, cls, **optimizer_options)
        except BaseException:
            registry.close(undone=True)  # nothing of it stays on the model (seeds' settings too)
            state.registry = None
            state.optimizers = state.new_optimizer_manager()
            raise
        for record in registry:
            record.seed.fault_limit = self.config.seed_fault_limit
            record.seed.guard_backward = self.config.guard_seed_backward
        return registry

    def require_registry(self) -> SlotRegistry:
        return self.state.require_registry()

    def seed(self, seed_id: str) -> GradientIsolatedSeed:
        return self.require_registry()[seed_id].seed

    def stages(self) -> dict[str, SeedStage]:
        return {r.seed_id: r.stage for r in self.require_registry()}

    def record_gate_score(self, seed_id: str, score: float) -> None:
        """A trainer's score (0..1), for reports only (``ManagerState.record_gate_score``)."""
        self.state.record_gate_score(seed_id, score)

    def track(self, name: str, obj: Any) -> None:
        """Save ``obj``'s ``state_dict`` (an LR scheduler, a GradScaler, an EMA model) in every
        checkpoint, and load it back with a ROLLBACK to it (``ManagerState.track``)."""
        self.state.track(name, obj)

    def evaluate_seeds(
        self,
        batches: Iterable[tuple[Any, Any]],
        *,
        loss_fn: LossFn,
        metric_fn: MetricFn | None = None,
    ) -> dict[str, SeedEvaluation]:
        """Measure each live seed's benefit on validation ``batches`` (G5's only evidence).

        Per seed: the mean ``loss_fn`` (and ``metric_fn``) of the model as it is, and with the
        seed's chunk replaced by the host's (alpha 0), at ``1 + C`` forwards per batch for
        ``C`` contributing seeds (see ``kasmina.manager.evaluation``). Eval mode, no gradient,
        no global random numbers; no stage, alpha or weight changes. Call it at a safe point
        (between steps). Each seed keeps its evaluation (``seed.evaluation``, GATE_SCORE =
        its score), and a ``seed.benefit`` event per seed goes to telemetry."""
        with self._lock:
            state = self.state
            registry = state.require_registry(training=True)
            results = evaluate_seeds(
                registry, batches, loss_fn, metric_fn, epoch=state.epoch, step=state.global_step
            )
            self.report.note_evaluations(results)
        return results

    def system_state(self) -> SystemStatePacket:
        """The Leyline ``SystemStatePacket`` a controller decides on (see ``ManagerReport``)."""
        with self._lock:
            return self.report.system_state()

    # ------------------------------------------------------------------ kernels
    async def load_kernel(self, kernel_artifact_id: str) -> GPUKernel:
        """A trainable copy of the artifact's kernel: from the cache, else fetched and verified
        on a worker thread (concurrent loads of one artifact share one fetch); none once closed."""
        validate_artifact_id(kernel_artifact_id)
        self.state.require_open()
        original = self.loader.cached(kernel_artifact_id)
        if original is None:
            original = await asyncio.to_thread(self.loader.load, kernel_artifact_id)
        return self.loader.copy(original)

    async def execute_kernel(self, kernel: GPUKernel, input_tensor: torch.Tensor) -> torch.Tensor:
        """Run ``kernel`` on ``input_tensor`` (moved to its device); CPU work runs on a worker
        thread so the event loop stays responsive, CUDA launches are asynchronous anyway."""
        if not isinstance(kernel, GPUKernel) or not isinstance(input_tensor, torch.Tensor):
            got = f"{type(kernel).__name__} and {type(input_tensor).__name__}"
            raise TypeError(f"expected a GPUKernel and an input tensor, got {got}")
        x = input_tensor.to(kernel.device)
        started = time.perf_counter_ns()
        out = kernel(x) if x.device.type == "cuda" else await asyncio.to_thread(kernel, x)
        self.state.perf["execute"].add_ns(time.perf_counter_ns() - started)
        return out

    def cache_kernel(self, kernel_artifact_id: str, kernel: GPUKernel) -> None:
        """Put a verified kernel in the cache under its own artifact id, none once closed
        (``ValueError``: a trainable copy, tensors not its artifact's, another cache's)."""
        self.state.require_open()
        self.loader.put(kernel_artifact_id, kernel)

    def evict_kernel(self, kernel_artifact_id: str) -> bool:
        """Evict and release a cached kernel (closed or not); False if absent or pinned."""
        return self.kernel_cache.evict(kernel_artifact_id)

    # ------------------------------------------------------------------ teacher (KD)
    def load_teacher(
        self, model: nn.Module, *, device: torch.device | str | None = None, copy_model=True
    ) -> CheckpointedTeacher:
        """Hold ``model`` as the frozen reduced-precision teacher (``config.teacher_dtype``), the
        last one closed; ``copy_model=False``: ``model`` itself, no manager's nor teacher's;
        a closed manager takes none (``RuntimeError``, before ``model`` is frozen or cast, or,
        closed while the teacher was built, with that teacher closed: its model let go)."""
        teacher = new_teacher(self.state, model, device, copy_model)  # closed: RuntimeError
        with self._lock:  # a safe point's command reads the teacher; close() holds it too
            self.state.hold_teacher(teacher)  # closed since: teacher closed, RuntimeError
            self.teacher_passes = TeacherForwardPassManager(teacher, self.config.teacher_budget_ms)
        if not self.config.kd_enabled:
            logger.warning("a teacher was loaded but config.kd_enabled is False: no KD losses")
        return teacher

    def get_teacher_predictions(self, input_batch: TeacherInput) -> torch.Tensor | None:
        """Teacher logits (no gradient), or None without a teacher or after an OOM (skip KD).
        Closed: ``RuntimeError`` (its teacher closed, a model held in place the caller's)."""
        self.state.keep_teacher_input(input_batch)  # closed: RuntimeError, none kept
        return self.teacher_passes.get_teacher_predictions(input_batch)

    async def load_kernel_with_teacher(
        self, kernel_artifact_id: str, input_batch: TeacherInput | None = None
    ) -> tuple[GPUKernel, torch.Tensor | None]:
        """``load_kernel`` plus, with KD enabled and a teacher, its logits for ``input_batch``
        (default: the last batch the teacher saw)."""
        kernel = await self.load_kernel(kernel_artifact_id)
        batch = input_batch if input_batch is not None else self.state.last_teacher_input
        if not self.config.kd_enabled or self.teacher is None or batch is None:
            return kernel, None
        return kernel, await asyncio.to_thread(self.get_teacher_predictions, batch)

    def get_checkpoint_effectiveness(self) -> dict[str, float]:
        """Measured teacher memory and forward-time figures (NaN until measured)."""
        return self.teacher_passes.get_checkpoint_effectiveness()

    def set_teacher_logits(self, teacher_logits: torch.Tensor | None) -> list[str]:
        """Hand teacher logits to the next forward of the slots that read KD logits that wide on
        their last dim, on each one's device; their ids (none: ``teacher_logits_unread``). None:
        no teacher for this batch: none pending from an earlier one (a batch skipped), any width."""
        return hand_teacher_logits(self.state, teacher_logits)  # ValueError, RuntimeError

    def set_kd_head(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> list[str]:
        """Give the head ``weight [V, H]`` (a language model's ``lm_head``) to every slot whose
        output is ``H`` wide along its last dim, for its seeds' KD loss; returns their ids."""
        return hand_kd_head(self.state, weight, bias)  # closed: RuntimeError; all checked

    # ------------------------------------------------------------------ commands
    def handle_adaptation_command(self, raw: bytes) -> bool:
        """Signed ``AdaptationCommand`` bytes in, from any thread, at any time; never raises.

        The command is verified now (signature, freshness, nonce, ranges) and queued; it is
        applied at the training thread's next safe point (the end of ``step()``, the start of
        ``end_epoch``, or ``apply_pending()``). Returns whether it was accepted; what became of
        it is in ``apply_pending``'s outcomes, ``command_log`` and ``command.complete``."""
        relay = self.command_relay
        if relay is not None:  # one rank of several: applied on all of them, or on none
            return relay(raw)
        return self.intake.arrive(raw)

    def join_run(
        self, relay: CommandRelay, grad_sync: GradSync, holders: Sequence[Callable[[str], None]]
    ) -> Callable[[], None]:
        """One rank of a multi-rank run from now on (``DistributedKasmina``): the door relays each
        command to ``relay``, ``step()`` averages through ``grad_sync``, ``holders`` refuse what
        they hold when this closes, and what its own queue holds is refused (``intake.relay``).
        What it returns leaves the run; ``ValueError``, nothing changed, where in one already."""
        if self.command_relay is not None or self.grad_sync is not None:
            raise ValueError("this manager is already part of a distributed run")
        self.grad_sync = grad_sync
        self.command_relay = relay
        # Accepted before the relay: applied here alone they would apply on this rank only.
        self.intake.relay("reached the manager's own queue as it joined a multi-rank run", holders)

        def leave() -> None:
            if self.command_relay == relay:  # (not a later run's)
                self.command_relay = None
                self.intake.relay(None, holders)
            if self.grad_sync is grad_sync:
                self.grad_sync = None

        return leave

    def apply_pending(self, *, wait: bool = False) -> list[CommandOutcome]:
        """A safe point, on the training thread between steps (``step()`` ends with one,
        ``end_epoch`` starts with one): apply every ready queued command, in arrival order. A
        GERMINATE whose kernel is still being fetched stays queued unless ``wait`` (then this
        waits for it, at most until its command's timeout runs out). After a forward through a
        slot that recorded a graph, until the step's end, nothing is applied (a CULL would free
        a kernel, a ROLLBACK rewrite a weight, that graph still uses): they wait."""
        return self.intake.apply_pending(wait=wait, graph_open=self.state.graph_open())

    def execute(self, command: KasminaCommand) -> bool:
        """``CommandExecutor``: carry out a verified command at once, at a safe point on the
        training thread (one a forward's graph may still use is refused); the door queues."""
        return self.intake.execute(command)

    async def handle_leyline_command(self, command: AdaptationCommand) -> bool:
        """``handle_adaptation_command`` for a message object (fetches run on a worker)."""
        return self.handle_adaptation_command(command_bytes(command))

    async def handle_optimizer_command(self, command: AdaptationCommand | bytes) -> bool:
        """A signed ``AdaptationCommand`` (object or bytes), normally carrying an optimizer
        command, queued like any other. A bare ``OptimizerCommand`` (unsigned) is refused with
        ``TypeError``: applying one would open a door around the verifier (design §5)."""
        return self.handle_adaptation_command(command_bytes(command, signed_bytes=True))

    def verify_message_auth(self, message: Any) -> bool:
        """Signature, freshness and nonce of a command (object or bytes); the nonce unused."""
        return self.intake.verify_auth(message)

    # ------------------------------------------------------------------ training step
    def collect_kd_losses(self) -> torch.Tensor | None:
        """Sum (and clear) the slots' KD losses of this forward, or None."""
        return collect_kd_losses(self.require_registry().model)

    def backward(
        self,
        loss: torch.Tensor | None,
        kd_loss: torch.Tensor | None = None,
        *,
        retain_graph: bool | None = False,
    ) -> None:
        """``kd_loss`` (weighted by ``config.kd.alpha``) first, as a seed-only backward whose
        host gradients must stay zero (checked at ``step``), then ``loss``; its gradients are
        added to the seeds' only once ``loss``'s backward has run. A frozen host's loss has no
        graph once a command moves a seed past ISOLATED_INIT: skipped, as a KD loss is. A
        closed manager raises ``RuntimeError`` first: no step of its comes to check or apply it
        (each KD phase's leak flag was kept for that step, without bound).

        ``retain_graph=True`` keeps the forward's graph for another backward over it (several
        losses, one call each, as ``loss.backward(retain_graph=True)`` would): the gradients of
        every call accumulate, each call's as if alone, and every KD phase's leak is checked at
        the step. The forward's KD loss goes to one of its calls (any): given again, it is a
        ``RuntimeError`` before anything changes. Without it (``None``, torch's default, too), a
        later backward over the freed graph raises PyTorch's ``RuntimeError``, and that call's
        KD gradients are not added (a host pass that raises late keeps what PyTorch summed
        before it); under ``retain_graph`` its KD loss is given back where its graph is whole."""
        self.state.require_open()
        main = runs_main_backward(loss, kd_loss, self.registry, retain_graph)  # types: before all
        alpha = self.config.kd.alpha  # 0: the term teaches nothing; zero grads would "train"
        kd = kd_loss is not None and kd_loss.requires_grad and alpha > 0  # no grad: all frozen
        registry = self.require_registry() if kd else None
        self.guard.backward(loss if main else None, kd_loss if kd else None, alpha, registry,
                            bool(retain_graph))  # fmt: skip

    def step(self, grad_clip_norm: float | None = 0.0) -> dict[str, Any]:
        """End of a training step: isolation checks, host and seed optimizer steps (the host's
        skipped in a step where a leak was found), non-finite seed outputs polled, the trained
        seeds marked for G2 or their GRAFTING alphas advanced, grads zeroed, the queued commands
        applied (the safe point), telemetry; returns what it did. ``grad_clip_norm`` > 0 clips
        each optimizer's gradients to it and skips a non-finite step; 0 or None: no clipping."""
        clip = checked_clip_norm(grad_clip_norm)  # before anything changes
        started, state = time.perf_counter_ns(), self.state
        with self._lock:
            registry = state.require_registry(training=True)  # check_held: before any change
            registry.take_host_groups(state.optimizers, step=True)  # a user's new groups
            optimizers = state.optimizers
            # Every device flag of the step in one transfer (the KD leaks, each seed's), the
            # isolation verdict agreed across ranks, the running seeds' flags settled.
            clean, shared, cut, nonfinite = settle_step_flags(self.guard, registry, self.grad_sync)
            frozen = registry.frozen(state.counters)  # seeds that cannot train: warned, counted
            # A Ctrl-C waits until the steps are zeroed and counted (else they would apply twice).
            with interrupts_deferred():
                host = [HOST_ID] if optimizers.has_host and clean else []
                training = TRAINING_STAGES if clean else ISOLATED_TRAINING_STAGES  # ACTIVE: host
                owned, lost = set(optimizers.seed_ids), set() if shared else set(nonfinite)
                seeds = [  # a seed that fell back lost its gradient (settle_nonfinite); sets:
                    r.seed_id for r in registry.in_stages(training)  # O(1) a seed, not O(seeds)
                    if r.seed_id in owned and r.seed_id not in lost
                ]  # fmt: skip
                done = optimizers.step_many([*host, *seeds], clip)  # one sync if clipping
                host_stepped = bool(host) and done[0]
                stepped = list(compress(seeds, done[len(host) :]))
                trained = registry.with_gradients(stepped)  # what the step changed (reported)
                self.execution.after_step(stepped, trained, cut)  # G2, GRAFTING alphas, faults
                optimizers.zero_grad(host=state.config.host_grads_set_to_none)
                dropped = registry.end_step()  # KD losses computed, never passed to backward()
                if dropped and not state.counters["kd_dropped"]:
                    logger.warning("KD losses were computed but not passed to backward(); dropped")
                state.counters["kd_dropped"] += dropped
                state.global_step += 1
            # The safe point: the graph gone, the gradients applied and zeroed (commands may swap).
            self.execution.complete_pending()  # what failed after a commit (rare): completed
            outcomes = self.intake.apply_pending()
        state.perf["step"].add_ns(time.perf_counter_ns() - started)
        self.report.emit_step_telemetry()
        return {
            "step": state.global_step,
            "isolation_clean": clean,
            "host_stepped": host_stepped,
            "seeds_stepped": trained,  # had gradients to apply, and their optimizers stepped
            "nonfinite": nonfinite,  # fell back or faulted with grad: the step's grad dropped
            "frozen": frozen,  # in a training stage with no parameter that requires grad
            "commands": outcomes,  # queued commands applied at the end of this step
        }

    def end_epoch(
        self, epoch: int, val_metrics: Mapping[str, float] | None = None
    ) -> TelemetryPacket:
        """Apply the queued commands (none after a forward through a slot with a graph and before
        its step: ``apply_pending``; one that changed the model drops ``val_metrics``, measured
        before it), write the epoch checkpoint if ``epoch`` is on the cadence (none with
        ``checkpoint_mode="off"``), then tick the lifecycle and run due COOLDOWN -> RECYCLING ->
        DORMANT steps, and send the full telemetry packet (returned). ``epoch`` must be after
        the last epoch ended and after the run's live checkpoints (``ValueError``, nothing
        changed; a restarted trainer rolls back first), checked again once the commands applied
        (a ROLLBACK moves the clock). The checkpoint (the state before this boundary) is written
        before the tick: a failed write, or tick, raises with epoch and metrics as they were."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= MAX_EPOCH:
            raise ValueError(f"epoch must be an int in [0, {MAX_EPOCH}], got {epoch!r}")
        metrics, state = epoch_metrics(val_metrics), self.state  # checked before any change
        state.require_registry(training=True)  # a closed manager opens no store (nor its lock)
        checkpoints = state.checkpoints
        checkpoints.check_next_epoch(epoch, state.epoch)  # saving prunes the later ones
        applied = self.intake.apply_pending(graph_open=state.graph_open())  # commands first
        metrics = metrics_of_the_model(metrics, applied, epoch)
        self.handler.flush_rejections()  # rejection counts left over from a flood that stopped
        with self._lock:
            state.require_registry(training=True)  # a close() on another thread came first
            checkpoints.check_next_epoch(epoch, state.epoch)
            self.execution.complete_pending(state.graph_open())  # before the checkpoint
            if checkpoints.is_due(epoch) and restorable(state, epoch):
                checkpoints.save(epoch, snapshot(state, epoch, metrics, boundary_pending=True))
            with interrupts_deferred():  # the boundary is whole: an epoch ticks once
                recycled = self.execution.epoch_boundary(epoch, metrics)  # tick, then the clock
        if recycled:
            logger.info("epoch %d: recycled %s", epoch, recycled)
        packet = self.export_leyline_telemetry()
        self.telemetry.send(packet)
        return packet

    # ------------------------------------------------------------------ report
    def export_leyline_telemetry(self) -> TelemetryPacket:
        """The manager's whole state in one packet (``ManagerReport``), read under its lock."""
        with self._lock:
            return self.report.export_leyline_telemetry(self.handler.stats)

    def get_performance_metrics(self) -> dict[str, float]:
        """Measured figures (NaN: not measured yet); see ``ManagerReport``."""
        return self.report.get_performance_metrics()

    def validate_performance_targets(self) -> dict[str, TargetCheck]:
        """Each design §8 target this device can measure, measured now (``ManagerReport``)."""
        return self.report.validate_performance_targets()

    def measure_dormant_overhead(self, repeats: int = 200) -> float:
        """Dormant-slot forward overhead in µs (see ``ManagerReport``)."""
        return self.report.measure_dormant_overhead(repeats)

    # ------------------------------------------------------------------ isolation
    def register_gradient_monitors(self, host_model: nn.Module, seed_model: nn.Module) -> None:
        """Debug mode for one host/seed pair: a backward hook on every parameter reports a
        gradient on the wrong side during ``backward``'s seed-only phase (syncs per grad)."""
        seed_id, on_quarantine = None, None  # a pair of no registered seed: named by the guard
        for record in self.registry or ():
            if seed_model is record.seed or seed_model is record.kernel:
                seed_id, on_quarantine = record.seed_id, record.seed.quarantine
        self.guard.add_external(host_model, seed_model, seed_id, on_quarantine)

    def check_gradient_isolation(self) -> bool:
        """Verify this step (seed-only KD leaks, isolated seeds' graphs, debug monitors): True
        when clean so far; else the host takes no step at the next ``step()`` (which calls it).
        A closed manager has no step to verify (``RuntimeError``)."""
        self.state.require_open()
        return self.guard.check(self.require_registry())

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop queued commands, report pending rejections, close its own Urza client (not a
        caller's), what failed after a commit (tried a last time, then dropped), the nonce ledger,
        checkpoint store (run lock), JSONL file and teacher, unhook the model, let go of the
        user's objects it kept (``ManagerState.close_held``); later steps raise, commands are
        refused, ``apply_pending``, ``close`` do nothing. On another thread it waits out the step
        or command in flight."""
        try:  # first, lock-free: a fetch may run under the lock (execute's)
            if self._owns_client:
                self.urza_client.close()
        except Exception:  # the rest is closed whatever this raised
            logger.exception("closing the manager's Urza client raised")
        hold = interrupts_deferred()  # a Ctrl-C in the middle left the ledger, so the run, held
        with hold:  # delivered on the way out, the lock let go
            try:
                take_lock(self._lock, hold)  # waiting out the step in flight
            except BaseException:  # a Ctrl-C raised: closed to every later call (the step in
                self.state.closed = True  # flight completes); a later close() frees the rest
                self.handler.close()
                raise
            try:
                self.state.closed = True
                try:
                    self.intake.drop_pending()
                    self.handler.flush_rejections(force=True)
                    self.verifier.close()
                    self.execution.effects.close(self.state.graph_open())  # a last try, dropped
                finally:
                    self.guard.close(self.state.registry)  # the model is the user's
                    self.state.close_held()  # the teacher (a model held in place), the store
                    self._release_jsonl()  # or when collected: the model's table keeps the reporter
            finally:
                self._lock.release()
