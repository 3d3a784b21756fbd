"""Per-step gradient-isolation verification for the manager's seeds (docs/design.md §4).

Three checks, all counted into each seed's ``GradientIsolationMonitor`` (whose circuit breaker
quarantines the seed at ``max_isolation_violations``; the host keeps training):

- the seed-only backward (KD): host gradients are set aside, the loss is backpropagated, and
  one ``leak_check`` launch tests that the host got nothing; the flag is read at the step's
  check (with the seeds' non-finite flags, in the step's one transfer) and whatever leaked is
  dropped before any optimizer sees it. The KD loss of a slot mixes its seeds, so a leak
  counts against every seed that was distilling;
- the autograd graph of each isolated seed's last output (``GradientIsolationMonitor.
  check_graph``), and whether its kernel's input needed a gradient (``SeedRecord.capture``).
  An output of a compiled region (``torch.compile`` with an AOT backend) is one backward node
  over the whole region: the walk cannot attribute it and counts nothing, while the input
  check, read from the traced metadata, still holds;
- debug monitors added by ``register_gradient_monitors`` (backward hooks on every parameter).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import weakref
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch import nn

from kasmina.errors import GradientIsolationViolationError
from kasmina.isolation.monitor import GradientIsolationMonitor, host_index, leak_check_any
from kasmina.isolation.verify import HostIndex, reaches_host_beyond
from kasmina.kd.graph import distilled_seeds, hold_retained_backwards, is_kd_root, kd_cut
from kasmina.manager.config import KasminaConfig
from kasmina.manager.records import SeedRecord
from kasmina.manager.slots import SlotRegistry
from kasmina.seeds.param_hooks import hooks_set_aside
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.stages import ISOLATED_STAGES, ISOLATED_TRAINING_STAGES
from kasmina.utils.autograd_nodes import backward_beside_ddp
from kasmina.utils.flags import read_flags
from kasmina.utils.grad_modes import in_grad_mode
from kasmina.utils.ratelimit import clipped, rarely
from kasmina.utils.state_io import CheckpointSigner, clone_state
from kasmina.utils.telemetry import TelemetryReporter

logger = logging.getLogger(__name__)

__all__ = ["IsolationGuard"]

# A collected KD loss's node metadata key: a seed-only backward took it (``seed_only_backward``).
_KD_TAKEN = "kasmina.kd_taken"


def add_grads(made: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Add ``seed_only_backward``'s gradients to their parameters' (as its backward would have
    accumulated them)."""
    for p, got in made:
        p.grad = got if p.grad is None else p.grad.add_(got)


def runs_main_backward(
    loss: torch.Tensor | None,
    kd_loss: torch.Tensor | None,
    registry: SlotRegistry | None,
    retain_graph: bool | None = False,
) -> bool:
    """Whether ``manager.backward`` runs ``loss``'s backward: given, with a graph or with a host
    that trains (a frozen host's loss has no graph once a seed leaves ISOLATED_INIT: skipped).
    A ``loss`` or ``kd_loss`` that is no tensor (a Python number: ``loss.item()``, a logged
    value), or a ``retain_graph`` that is no bool, is a ``TypeError`` here, before any backward
    runs."""
    if retain_graph is not None and not isinstance(retain_graph, bool):  # None: torch's default
        raise TypeError(f"retain_graph must be a bool, got {type(retain_graph).__name__}")
    for name, value in (("loss", loss), ("kd_loss", kd_loss)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(
                f"manager.backward takes {name} as the loss tensor its graph hangs from (or "
                f"None), got {type(value).__name__}: pass the tensor, not loss.item()"
            )
    if loss is None:
        return False
    return loss.requires_grad or registry is None or not registry.host_frozen()


class IsolationGuard:
    """Creates the seeds' monitors and runs the step's isolation checks."""

    def __init__(
        self,
        config: KasminaConfig,
        telemetry: TelemetryReporter,
        counters: Counter[str],
        checkpoint_signer: CheckpointSigner | None = None,
    ) -> None:
        self.config = config
        # Signs the emergency checkpoints of this run's breakers (default: the run's own key).
        self.checkpoint_signer = checkpoint_signer or CheckpointSigner(
            config.checkpoint_key_path, config.run_id
        )
        self.telemetry = telemetry
        # The manager's: "isolation_violations" (violating steps), "isolation_seed_violations"
        # (violations, one per monitor per violating step), "circuit_breaker_trips".
        self.counters = counters
        self.external: list[GradientIsolationMonitor] = []
        self._external_ids = itertools.count()
        # The (host, seed) modules of each "external[n]" monitor, held weakly: a pair
        # registered again gets its name back, and so replaces its monitor.
        self._pairs: dict[str, tuple[weakref.ref[nn.Module], weakref.ref[nn.Module]]] = {}
        self.closed = False  # close() was called: no more debug monitors
        # A seed-only backward's leak flag and the seeds it charges (none: the caller's loss).
        self._kd_checks: list[tuple[torch.Tensor, list[str] | None]] = []
        # False once a check called before the step's own (``check_gradient_isolation``) found a
        # violation: the evidence that check consumed still decides the step's verdict. The
        # monitors it charged (by id): a step counts once per seed however often it is checked.
        self._step_clean = True
        self._charged: set[int] = set()
        # A KD manager's seed-only backward retains a compiled region's (``kd.graph``): donated
        # buffers stay off until close(), or until the guard is collected (a manager dropped
        # unclosed, or one whose constructor raised).
        hold = hold_retained_backwards() if config.kd_enabled else None
        self._release_hold = None if hold is None else weakref.finalize(self, hold)
        self._donated_seen = False  # a graph that still donates: logged once (seed_only_backward)
        # The host side the last monitor was built with, by its parameters' ids (the index
        # holds them: the ids stay theirs), shared by the monitors built while it holds.
        self._host_side: tuple[tuple[int, ...], HostIndex] | None = None

    @property
    def violating_steps(self) -> int:
        """Steps in which any isolation check failed."""
        return self.counters["isolation_violations"]

    @property
    def breaker_trips(self) -> int:
        return self.counters["circuit_breaker_trips"]

    def new_monitor(self, record: SeedRecord, registry: SlotRegistry) -> GradientIsolationMonitor:
        """The monitor of one seed against the host side; its breaker quarantines the seed and
        writes the seed's state row and kernel weights to the emergency checkpoint. It holds
        the table, not the registry: the model holds the monitor (through the kernel's forward
        hook), and a manager dropped without ``close()`` must still be collected. Monitors made
        while the host side stays the same parameters share one lookup of it (``HostIndex``):
        a step's graph checks then cost the seeds' graphs, not seeds x host parameters."""
        table = registry.table
        host = registry.host_side_params()
        key = tuple(map(id, host))
        if self._host_side is None or self._host_side[0] != key:
            self._host_side = (key, host_index(host))
        return GradientIsolationMonitor(
            record.seed_id,
            record.seed.seed_parameters(),
            self._host_side[1],
            max_violations=self.config.max_isolation_violations,
            checkpoint_dir=self.config.emergency_checkpoint_dir,
            checkpoint_signer=self.checkpoint_signer,
            on_quarantine=lambda: record.seed.quarantine("gradient isolation circuit breaker"),
            state_provider=lambda: {
                "row": table.read_row(record.index),
                "kernel": clone_state(record.kernel.state_dict()) if record.kernel else {},
            },
            telemetry=self.telemetry,
        )

    def add_external(
        self,
        host_model: nn.Module,
        seed_model: nn.Module,
        seed_id: str | None,
        on_quarantine: Callable[[], object] | None = None,
    ) -> GradientIsolationMonitor:
        """A debug monitor over ``host_model`` and ``seed_model``; it replaces (hooks removed)
        an earlier one for the same seed, so a seed id germinated anew and registered again
        runs one, not one per registration. ``seed_id`` None: a pair of no registered seed,
        named ``external[n]``; the same pair (the same two modules) registered again keeps its
        name and so replaces its monitor too. ``RuntimeError`` once the guard is closed;
        ``TypeError`` naming a side that is not an ``nn.Module``, before anything is hooked."""
        for name, module in (("host_model", host_model), ("seed_model", seed_model)):
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"register_gradient_monitors: {name} must be an nn.Module, "
                    f"got {type(module).__name__}"
                )
        if self.closed:
            raise RuntimeError("this manager is closed: it adds no gradient monitors")
        if seed_id is None:
            seed_id = self._pair_name(host_model, seed_model)
        for old in [m for m in self.external if m.seed_id == seed_id]:
            old.clear_hooks()
            self.external.remove(old)
        # The host side is the host's own parameters: a grown model holds seeds, whose kernels
        # take gradients in the seed-only phase (their KD), the registered one's among them.
        kernels = {
            id(p)
            for m in host_model.modules()
            if isinstance(m, GradientIsolatedSeed)
            for p in m.parameters()
        }
        host = [(n, p) for n, p in host_model.named_parameters() if id(p) not in kernels]
        monitor = GradientIsolationMonitor(
            seed_id,
            list(seed_model.named_parameters()),
            host,
            max_violations=self.config.max_isolation_violations,
            checkpoint_dir=self.config.emergency_checkpoint_dir,
            checkpoint_signer=self.checkpoint_signer,
            on_quarantine=on_quarantine,
            telemetry=self.telemetry,
        )
        monitor.register_hooks(host_model, seed_model)
        self.external.append(monitor)
        return monitor

    def _pair_name(self, host_model: nn.Module, seed_model: nn.Module) -> str:
        """The debug monitor's name for a pair of no registered seed: the name it had if these
        two modules were registered before, else a new ``external[n]``. Pairs whose modules
        are gone are forgotten here, so the map holds live pairs only."""
        self.drop_dead_pairs()
        for name, (host, seed) in self._pairs.items():
            if host() is host_model and seed() is seed_model:
                return name
        name = f"external[{next(self._external_ids)}]"
        self._pairs[name] = (weakref.ref(host_model), weakref.ref(seed_model))
        return name

    def drop_dead_pairs(self) -> None:
        """Forget the ``external[n]`` pairs whose modules are gone, and take their monitors off
        (hooks removed, logged): a monitor of a culled kernel's module held its parameters,
        hooked the host's and was checked at every step until ``close()``, one more per
        registration. Such a monitor lives as long as the two modules given (held weakly):
        a container built for the call (``nn.ModuleList([aux])``) goes with it."""
        dead = {n for n, (h, s) in self._pairs.items() if None in (h(), s())}
        if dead:
            self._pairs = {n: pair for n, pair in self._pairs.items() if n not in dead}
            for old in [m for m in self.external if m.seed_id in dead]:
                old.clear_hooks()
                self.external.remove(old)
                logger.info("debug monitor %s dropped: a module it watched is gone", old.seed_id)

    def close(self, registry: SlotRegistry | None) -> None:
        """``manager.close()``: the debug monitors' hooks come off the user's parameters and the
        monitors go, then the registry lets go of the model (``SlotRegistry.close``); later
        ``add_external`` calls are refused. Idempotent."""
        self.closed = True
        if self._release_hold is not None:
            self._release_hold()  # once: a finalizer's later calls do nothing
        try:
            for monitor in self.external:
                monitor.clear_hooks()
        finally:
            self.external, self._pairs, self._kd_checks = [], {}, []
            self._host_side = None
            if registry is not None:
                registry.close()

    def seed_only_backward(
        self, kd_loss: torch.Tensor, weight: float, registry: SlotRegistry, retain_graph: bool
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[object]]:
        """Backpropagate a seed-only loss, times ``weight``, with the host's gradients set
        aside and checked. The weighting records a graph in any grad mode: called under
        ``torch.no_grad()``, as ``loss.backward()`` may be, it made a loss without one.

        Returns the seeds' gradients it made, not yet added: ``add_grads`` adds them once the
        host's own backward has run, so a host backward that raises (a second backward
        through a freed graph) adds none of them; and the KD losses it took whose graph it
        kept whole, which such a failure under ``retain_graph`` gives back (a retry may take
        them again; cut, their graph above the seeds is freed: taken).

        A backward that raises (teacher logits the caller rewrote in place before it, which
        the KD op saved; an allocation that failed) loses this step's KD term only: the seeds'
        gradients of earlier backwards, set aside too, come back without what it had
        accumulated part-way, the failure is counted (``kd_backward_failed``) and logged, and
        the host's own backward runs as ever.

        ``retain_graph``: a backward over the same forward follows (the host's, or a caller's
        later ``manager.backward``). The collected KD losses a ``kd_loss`` holds are
        backpropagated once: one already taken by an earlier call (the same ``kd_loss``, or a
        part of it, given again) is a ``RuntimeError`` before anything changes, as PyTorch's
        for a second backward through a freed graph, never a phase that failed inside."""
        host = [p for p in registry.host_side_params() if p.requires_grad]
        beyond, rooted = reaches_host_beyond(kd_loss, host, is_kd_root)
        if beyond:  # before anything changes: refused, not charged
            raise ValueError(
                "kd_loss reaches the host's parameters: it must be the seeds' KD loss "
                "(manager.collect_kd_losses(), scaled or summed), whose backward trains only "
                "seeds; a distillation loss on the model's own output trains the host and "
                "belongs in loss"
            )
        if any(root.metadata.get(_KD_TAKEN) for root in rooted):  # PyTorch's error, told
            raise RuntimeError(
                "Trying to backward through the graph of kd_loss a second time: an earlier "
                "manager.backward of this forward took its KD losses (their graph above the "
                "seeds is freed, and a second pass would count the term twice); give the "
                "forward's KD loss to one of its backward calls"
            )
        for root in rooted:  # taken from here on, whatever the backward does
            root.metadata[_KD_TAKEN] = True
        kd_loss = in_grad_mode(True, lambda: kd_loss * weight)  # (not an ``enable_grad`` block)
        kd = [r for r in registry.in_stages(ISOLATED_TRAINING_STAGES) if r.kernel is not None]
        students = [r.seed_id for r in kd]  # the stages KD distils into
        seeds = list({id(p): p for r in kd for p in r.seed.trained_parameters()}.values())
        stash, seed_stash = [p.grad for p in host], [p.grad for p in seeds]
        failed = whole = False
        try:  # set aside inside it: a Ctrl-C part-way still finds every gradient put back
            for p in itertools.chain(host, seeds):
                p.grad = None
            # The debug monitors' phases sit inside the set-aside: they see the same empty host
            # grads before the backward and the same leaks after it, and put back what they
            # found (nothing) before the host's own gradients come back.
            with contextlib.ExitStack() as phases:
                # A host parameter's post-accumulate-grad hooks (an optimizer stepped in the
                # backward) would apply a leak and, zeroing it, hide it from the check: set
                # aside, as a process group's backward runs none.
                phases.enter_context(hooks_set_aside(p._post_accumulate_grad_hooks for p in host))
                for monitor in self.external if rooted else ():  # else the caller's loss
                    phases.enter_context(monitor.seed_backward())
                try:
                    whole = _kd_backward(kd_loss, rooted, retain_graph)
                except Exception as exc:  # the KD term is lost, never the host's step
                    failed = True
                    self._note_kd_backward_failed(exc)
                finally:
                    self._note_leaks(host, students, rooted)
        finally:
            made = [] if failed else [(p, p.grad) for p in seeds if p.grad is not None]
            for p, grad in zip(host, stash, strict=True):
                p.grad = grad  # whatever leaked is dropped here
            for p, grad in zip(seeds, seed_stash, strict=True):
                p.grad = grad  # a failed backward's part-way sums: dropped
        return made, (rooted if whole else [])

    def backward(
        self,
        loss: torch.Tensor | None,
        kd_loss: torch.Tensor | None,
        weight: float,
        registry: SlotRegistry | None,
        retain_graph: bool,
    ) -> None:
        """``manager.backward``'s passes: ``kd_loss`` (None: none) seed-only, then ``loss``'s
        (None: none), then the seeds' KD gradients added. A ``loss`` backward that raises adds
        no KD gradient (what PyTorch summed before the raise stays, as ever) and, where it kept
        the graph too, gives back the KD losses whose graph the phase kept whole: a retry may
        give them again (without ``retain_graph`` it may have freed part of that graph)."""
        made: list[tuple[torch.Tensor, torch.Tensor]] = []
        taken: list[object] = []
        if kd_loss is not None and registry is not None:
            retain = loss is not None or retain_graph
            made, taken = self.seed_only_backward(kd_loss, weight, registry, retain)
        if loss is not None:
            try:
                loss.backward(retain_graph=retain_graph)
            except BaseException:
                for root in taken if retain_graph else ():
                    root.metadata.pop(_KD_TAKEN, None)
                raise
        add_grads(made)

    def _note_kd_backward_failed(self, exc: Exception) -> None:
        """Count and log a seed-only backward that raised (its KD term is dropped)."""
        self.counters["kd_backward_failed"] += 1
        n = self.counters["kd_backward_failed"]
        logger.log(
            rarely(n, every=1000), "seed-only KD backward failed (%d so far), its term dropped "
            "for this step: %s: %s", n, type(exc).__name__, clipped(str(exc), 400),
        )  # fmt: skip
        if "donated buffer" in str(exc) and not self._donated_seen:
            self._donated_seen = True
            logger.error(
                "torch._functorch.config.donated_buffer is on again: a compiled region's "
                "backward cannot be retained, so the seed-only KD backward and its leak check "
                "fail on every step through it. A KD manager turns the flag off from its "
                "construction to close(): set it False and call torch.compiler.reset() (a graph "
                "compiled with it on reuses its saved buffers in place)"
            )  # fmt: skip

    def _note_leaks(
        self, host: list[nn.Parameter], students: list[str], rooted: list[object]
    ) -> None:
        """After the seed-only backward (run or raised), with the host's gradients set aside:
        whatever the host got is a leak, tested on the device in one launch whose flag the
        step's check reads (``_kd_checks``)."""
        leaked = [p.grad for p in host if p.grad is not None]  # a sparse one
        leaked = [g._values() if g.is_sparse else g for g in leaked]  # by values
        if leaked:  # charged to the seeds its losses distil (all when untold)
            named = distilled_seeds(rooted)
            suspects = [s for s in students if named is None or s in named]
            suspects = suspects if rooted else None  # no seed's loss in it
            self._kd_checks.append((leak_check_any(leaked)[1], suspects))

    def kd_flags(self) -> list[torch.Tensor]:
        """The device flags of this step's seed-only backwards, for a caller that reads them
        together with other flags and hands their values to ``check``."""
        return [flag for flag, _ in self._kd_checks]

    def check(
        self,
        registry: SlotRegistry,
        kd_leaked: Sequence[bool] | None = None,
        *,
        end_of_step: bool = False,
    ) -> bool:
        """Verify the step (see the module docstring); True when it was clean. ``kd_leaked``:
        the values of ``kd_flags()``, if the caller has read them (else they are read here).

        A check consumes the evidence it reads (the flags, the captured outputs, the monitors'
        counts), so a user's check before ``step()`` must not leave the step's own check
        finding nothing: the verdict is carried until the step's check (``end_of_step``),
        which returns it and starts the next step clean. A step found not clean drops the
        host's gradients there: no optimizer steps the host on them, the manager's (which
        skips its step) or a trainer's own under ``attach(host_lr=None)``, stepped after
        ``manager.step()``."""
        clean = self._check(registry, kd_leaked) and self._step_clean
        if end_of_step:
            self.end_step(registry, clean)
        else:
            self._step_clean = clean
        return clean

    def end_step(self, registry: SlotRegistry, clean: bool) -> None:
        """The step's verdict, as carried (``check``) and, across ranks, agreed: the next step
        starts clean, and one not clean drops the host's gradients (its ACTIVE seeds' too: part
        of the host, they skip the step with it, whichever optimizer steps them)."""
        self._step_clean, self._charged = True, set()
        if not clean:
            for param in registry.host_side_params():
                param.grad = None

    def _check(self, registry: SlotRegistry, kd_leaked: Sequence[bool] | None) -> bool:
        checks, self._kd_checks = self._kd_checks, []
        if kd_leaked is None:
            kd_leaked = read_flags([flag for flag, _ in checks])
        leaked = [ids for (_, ids), bad in zip(checks, kd_leaked, strict=True) if bad]
        if None in leaked:  # the caller's kd_loss reached the host: dropped, no seed charged
            self.counters["kd_loss_reached_host"] += 1
            n = self.counters["kd_loss_reached_host"]
            logger.log(
                rarely(n, 1000, logging.ERROR), "kd_loss reached the host's parameters (%d "
                "so far; its host gradient dropped): it holds none of the seeds' collected KD "
                "losses; a distillation loss on the model's output belongs in loss", n,
            )  # fmt: skip
        leaked = [ids for ids in leaked if ids is not None]  # a seed's leak: charged, unclean
        suspects = {seed_id for ids in leaked for seed_id in ids}
        clean = not leaked
        for record in registry.in_stages(ISOLATED_STAGES):
            monitor = record.monitor
            attached, record.input_grad = record.input_grad, False
            if monitor is None:
                continue
            # The seed's count is the one a load_state_dict (or a rollback) restores: the
            # breaker counts on from it, as the reports do.
            monitor.violation_count = record.seed.isolation_violations
            if record.seed_id in suspects:
                monitor.note_violation("host gradient during the seed-only (KD) backward")
            if attached:
                monitor.note_violation("graph: the seed's input was not detached from the host")
            output, record.last_output = record.last_output, None
            if output is not None and output.grad_fn is not None:
                monitor.check_graph(output)
            clean &= self._verify(monitor)
            record.seed.isolation_violations = monitor.violation_count
        self.drop_dead_pairs()
        for monitor in self.external:
            if not monitor.tripped:  # a tripped monitor is inert: it had its say when it tripped
                clean &= self._verify(monitor)
        if not clean and self._step_clean:  # the step's first violating check
            self.counters["isolation_violations"] += 1
        return clean

    def _verify(self, monitor: GradientIsolationMonitor) -> bool:
        """The monitor's verdict on this step; a violation it found is counted, once a step:
        a user's checks after each micro-batch of one leaking step (``check_gradient_isolation``)
        charged it at each, and tripped the breaker on one step."""
        before = monitor.violation_count
        try:
            clean = monitor.verify_isolation_after_step(count=id(monitor) not in self._charged)
            if not clean:
                self._charged.add(id(monitor))
        except GradientIsolationViolationError as exc:
            self.counters["circuit_breaker_trips"] += 1
            logger.critical("%s (the host keeps training)", exc)
            clean = False
        self.counters["isolation_seed_violations"] += monitor.violation_count - before
        return clean


def _kd_backward(kd_loss: torch.Tensor, rooted: list[object], retain_graph: bool) -> bool:
    """``seed_only_backward``'s backward proper, run with the host's gradients set aside;
    whether it kept the KD losses' graph whole (retained and not cut)."""
    cut = kd_cut(kd_loss) if retain_graph and rooted else None
    # Under DDP no leaf's accumulator runs (nor DDP's hook on it: a leaked host parameter was
    # marked ready twice, with the host's backward).
    if cut is None:
        backward_beside_ddp([kd_loss], retain_graph=retain_graph)
    else:  # ``kd.graph``: the KD op's saved logits freed at once
        grads = torch.autograd.grad(kd_loss, cut, allow_unused=True)
        pairs = [(e, g) for e, g in zip(cut, grads, strict=True) if g is not None]
        if pairs:
            edges, through = zip(*pairs, strict=True)
            backward_beside_ddp(edges, through, retain_graph=True)
    return cut is None and retain_graph
