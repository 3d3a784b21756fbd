"""The manager's step as the optimizer and scheduler that a training framework drives.

A framework that owns the loop (transformers' ``Trainer``, and others built the same way) calls
``optimizer.step()``, ``lr_scheduler.step()`` and ``optimizer.zero_grad()`` after each
accumulation window, saves ``optimizer.state_dict()`` and ``lr_scheduler.state_dict()`` in its
checkpoints, and loads them back when it resumes. The manager owns the step instead (host and
seed optimizers, isolation checks, the safe point), so the framework is handed these two:

- ``ManagerOptimizer(manager, grad_clip_norm=0.0)``: ``step()`` is ``manager.step(...)`` (its
  report kept as ``last_report``), ``zero_grad()`` clears every gradient the manager's
  optimizers step (the step zeroes them too; a step the loop skips, a GradScaler's overflow or
  a batch it drops, must not leave its gradients to the next), and ``param_groups`` / ``state``
  / ``defaults`` are the host optimizer's (what a framework logs or inspects). Under a
  ``GradScaler`` (``scaler.step(optimizer)``, as accelerate's and Trainer's fp16 paths call it)
  the step takes the scale itself (``_step_supports_amp_scaling``): it unscales the host's and
  every seed's gradients and always runs the manager's step, which skips each optimizer whose
  norm is not finite (clipping, at ``grad_clip_norm`` or, with none, at +inf): a seed's
  overflow never skips the host's step, nor stalls the safe points. The loss must be scaled
  (``manager.backward(scaler.scale(loss))``). Give it the scaler (``scaler=``, or set
  ``optimizer.scaler`` once the framework has made it; anything but a ``torch.amp.GradScaler``
  or None is refused there, not at the first step): it then unscales through the scaler's
  ``unscale_`` of each optimizer, so that a seed's overflow lowers the scale as the host's does
  (without it, a seed that overflows only at too high a scale keeps overflowing, and is charged
  a fault after 8 steps), and a framework's own ``scaler.unscale_(optimizer)`` (its gradient
  clipping) is followed by the seeds'. Without the scaler such an ``unscale_``, which reaches
  the host's groups only, is refused. A ROLLBACK applied inside the step restores a tracked
  scaler (``manager.track``), and the framework's ``scaler.update()`` after the step would
  apply the abandoned step's overflow (or growth count) to it: that one ``update()`` of each
  tracked ``GradScaler`` (the ``scaler=`` given, when it is tracked) keeps the restored scale
  instead (``update(new_scale=)`` with it: the growth count as the checkpoint holds it, the
  step's records cleared), as the README's plain loop does by hand; a hold the framework never
  used ends at the next step, and an ``update`` wrapper of the user's is kept. Step and
  state-dict hooks run as on any optimizer; a copy or a
  pickle is refused (it is a view of a live manager: save its ``state_dict()``).
  ``state_dict()`` and ``load_state_dict()`` are those of every optimizer the manager holds
  (``IsolatedOptimizerManager``: the host's and each seed's, with their layout), checked
  against the live layout before anything loads: a resumed run goes on with the moments it had,
  not fresh ones (a stand-in with a state of its own saved nothing, and the resumed run diverged).
  A state that is no mapping, or a manager that is no ``KasminaKernelManager``, is a
  ``TypeError``.
- ``ManagerScheduler(scheduler, optimizer)``: a learning-rate scheduler built on the host
  optimizer and ``manager.track``-ed, stepped when the framework steps it after a manager step
  (once per step: a loop that steps its scheduler on every micro-batch, as ``accelerate``'s
  does, would run it ahead), except after a step whose safe point applied a ROLLBACK: the
  rollback has put the scheduler back as its checkpoint holds it, and a framework that steps
  its scheduler after every optimizer step would leave it one step ahead for the rest of the
  run. ``accelerate`` does not prepare it (it is no ``LRScheduler``): register it for its
  checkpoints (``accelerator.register_for_checkpointing``). A scheduler that steps on a metric
  (``ReduceLROnPlateau``) is refused: a framework recognises one by its class, and passes it
  the metric only then (Trainer at evaluation); hand it to the framework as it is.

The manager needs its host optimizer (``attach`` with a ``host_lr``): ``ManagerOptimizer``
refuses one without, whose groups a framework's scheduler and logs could not read.

Neither holds training state of its own (only the count that pairs scheduler steps with
manager steps): each reads the manager's optimizers when called (a ROLLBACK or a
GERMINATE changes what they hold).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from kasmina.isolation.optimizers import HOST_ID
from kasmina.isolation.stepping import checked_clip_norm
from kasmina.manager.manager import KasminaKernelManager
from kasmina.manager.slots import BAD_GRADIENT_STEPS

logger = logging.getLogger(__name__)

__all__ = ["ManagerOptimizer", "ManagerScheduler"]


class ManagerOptimizer(torch.optim.Optimizer):
    """``manager.step(grad_clip_norm=...)`` behind the ``torch.optim.Optimizer`` interface.

    It is an ``Optimizer`` to the frameworks that check (``isinstance``) but takes no parameters
    of its own: the base class's constructor is not run; its step and state-dict hooks are set
    up here, and run as on any optimizer.
    """

    def __init__(
        self,
        manager: KasminaKernelManager,
        *,
        grad_clip_norm: float | None = 0.0,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        if not isinstance(manager, KasminaKernelManager):
            raise TypeError(
                f"ManagerOptimizer steps a KasminaKernelManager, got {type(manager).__name__}"
            )
        if not manager.optimizers.has_host:
            raise ValueError(
                "ManagerOptimizer steps the manager's host optimizer, and this manager has none "
                "(attach(host_lr=None) leaves the host to the caller until INITIALIZE_HOST): "
                "attach with a host_lr, so that a framework's scheduler and logs have its groups"
            )
        checked_clip_norm(grad_clip_norm)  # a bad norm refused here, not at the first step
        self.scaler = scaler  # and one that is no GradScaler (the setter checks it)
        # The manager for its step alone (``manager.step``, looked up at each step: a wrapper
        # a loop put on it is the one that runs); the rest is read from its state (optimizers,
        # registry, tracked objects: when called), and new host groups are taken up under the
        # lock its step holds.
        self.manager = manager
        self._manager_state = manager.state
        self._manager_lock = manager.intake.lock
        self.grad_clip_norm = grad_clip_norm
        self._warned_scaler = False
        self._checked_scaler: torch.amp.GradScaler | None = None
        # Tracked scalers whose next ``update()`` keeps the scale a ROLLBACK restored.
        self._held_scalers: list[tuple[torch.amp.GradScaler, Callable[..., None]]] = []
        self.last_report: dict[str, Any] | None = None
        self.steps = 0  # ``step`` calls: the manager's steps this optimizer took
        # What ``Optimizer.__init__`` sets up for hooks (the rest of it needs parameters).
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._patch_step_function()  # the step runs the step hooks

    # A GradScaler hands this optimizer's step the scale (``grad_scale``) and its inf check
    # (``found_inf``) rather than skipping it: the step unscales the seeds' gradients too.
    _step_supports_amp_scaling = True

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The GradScaler whose ``step`` steps this one, when the loop has one (``step``)."""
        return self._scaler

    @scaler.setter
    def scaler(self, scaler: torch.amp.GradScaler | None) -> None:
        self._scaler = _gradscaler_or_none(scaler)

    def _host(self) -> torch.optim.Optimizer | None:
        optimizers = self._manager_state.optimizers
        return optimizers.optimizer(HOST_ID) if optimizers.has_host else None

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The host optimizer's groups (none before it exists: ``attach(host_lr=None)``)."""
        host = self._host()
        return host.param_groups if host is not None else []

    @property
    def state(self) -> Any:  # type: ignore[override]
        host = self._host()
        return host.state if host is not None else {}

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        host = self._host()
        return host.defaults if host is not None else {}

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        """The manager's step; its report is ``last_report``. A closure is refused: the loss
        and its backward are the manager's (``manager.backward``), not the optimizer's."""
        if closure is not None:
            raise ValueError(
                "ManagerOptimizer.step takes no closure: run the forward and "
                "manager.backward(loss, kd_loss=...) before the step"
            )
        clip = checked_clip_norm(self.grad_clip_norm)  # before anything changes
        self._release_held_scalers()
        scale = None
        if hasattr(self, "found_inf"):  # inside a GradScaler's step
            try:
                scale = self._unscale(getattr(self, "grad_scale", None))
            except BaseException:
                self._forget_scale()  # a retry after the fix gets the scale afresh
                raise
            clip = clip or math.inf  # a step whose gradients overflowed skips, never applies
        try:
            self.last_report = self.manager.step(grad_clip_norm=clip)
        except BaseException:
            # Refused: the gradients as they came (exactly for a power-of-two scale, as
            # GradScaler's are), no scale left behind. A given scaler keeps its records of
            # this step's unscaling until its ``update()``, which a retry needs first.
            if scale is None and hasattr(self, "found_inf") and self.scaler is not None:
                scale = torch.tensor(self.scaler.get_scale())  # what it unscaled by
            if scale is not None:
                self._scale_grads(scale)
            self._forget_scale()
            raise
        self.steps += 1
        if hasattr(self, "found_inf") and self.rolled_back:
            self._hold_tracked_scalers()

    def _hold_tracked_scalers(self) -> None:
        """After a step whose safe point applied a ROLLBACK inside a GradScaler's step: the
        rollback put each tracked GradScaler back as its checkpoint holds it, and the update
        the framework runs next (``scaler.update()``) belongs to the abandoned step. That one
        call keeps the scale as it is (``update(new_scale=)``, which clears the step's records
        and leaves the growth count alone); the class's ``update`` serves every later one."""
        tracked = [o for o, _ in self._manager_state.tracked.values()]
        scalers = {id(o): o for o in tracked if isinstance(o, torch.amp.GradScaler)}
        if self.scaler is not None:  # the one that stepped this optimizer, when given
            scalers = {k: o for k, o in scalers.items() if o is self.scaler}
        for scaler in scalers.values():
            hold = _keeping_scale_once(scaler, vars(scaler).get("update"))
            self._held_scalers.append((scaler, hold))
            scaler.update = hold  # type: ignore[method-assign]

    def _release_held_scalers(self) -> None:
        """End the holds of a rolled-back step whose ``update()`` the framework never called:
        the next step's update is its own."""
        while self._held_scalers:
            scaler, hold = self._held_scalers.pop()
            if vars(scaler).get("update") is hold:  # still ours on top: what it replaced back
                _put_back_update(scaler, hold.kept)  # (another's on top unwinds it with its own)

    def _unscale(self, scale: torch.Tensor | None) -> torch.Tensor | None:
        """Unscale every gradient the manager's optimizers step, inside a GradScaler's step
        that handed ``scale`` (None: the framework unscaled this optimizer's groups, the
        host's, already). Through ``self.scaler`` when given, each optimizer's ``unscale_``,
        so that it records a seed's overflow and lowers the scale (None returned); else here,
        by ``scale`` (returned, to undo it with if the step raises)."""
        optimizers, scaler = self._manager_state.optimizers, self.scaler
        if scaler is not None:
            # Checked once per scaler (a host read): another one unscales by its own scale.
            if scale is not None and self._checked_scaler is not scaler:
                if float(scale) != scaler.get_scale():
                    raise ValueError(
                        f"ManagerOptimizer's scaler= (scale {scaler.get_scale():g}) is not the "
                        f"GradScaler that steps it (scale {float(scale):g}): give it that one"
                    )
                self._checked_scaler = scaler
            for optimizer_id in optimizers.optimizer_ids:
                if optimizer_id != HOST_ID or scale is not None:
                    scaler.unscale_(optimizers.optimizer(optimizer_id))
            return None
        if scale is None:
            raise RuntimeError(
                "a GradScaler unscaled ManagerOptimizer before its step (scaler.unscale_, as a "
                "framework's gradient clipping calls it), which reaches the host's param groups "
                "only and would leave the seeds' gradients scaled: give the optimizer its scaler "
                "(ManagerOptimizer(..., scaler=...)), or clip with grad_clip_norm instead"
            )
        if optimizers.seed_ids and not self._warned_scaler:
            self._warned_scaler = True
            logger.warning(
                "a GradScaler steps ManagerOptimizer without being given to it "
                "(ManagerOptimizer(..., scaler=...)): a seed's overflow does not lower its "
                "scale, and a seed that overflows at that scale is charged a fault after %d "
                "steps running", BAD_GRADIENT_STEPS,
            )  # fmt: skip
        self._scale_grads(scale.double().reciprocal().float())  # as GradScaler unscales
        return scale

    def _scale_grads(self, factor: torch.Tensor) -> None:
        """Multiply every gradient the manager's optimizers step by ``factor``, once each."""
        optimizers = self._manager_state.optimizers
        grads = [p.grad for oid in optimizers.optimizer_ids for p in optimizers.parameters(oid)]
        for grad in {id(g): g for g in grads if g is not None}.values():
            grad.mul_(factor.to(grad.device))

    def _forget_scale(self) -> None:
        """Drop what a GradScaler set for a step that raised (it drops it after one that
        returned): its next step would multiply its scale by the stale one."""
        for name in ("grad_scale", "found_inf"):
            self.__dict__.pop(name, None)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every optimizer the manager holds: the host's to None or
        to zeros (``set_to_none``), the seeds' always to None (a zero gradient would move a
        seed's Adam on its moments alone, and mark it trained this step)."""
        self._manager_state.optimizers.zero_grad(set_to_none=True, host=set_to_none)

    @property
    def rolled_back(self) -> bool:
        """Whether the last step's safe point applied a ROLLBACK."""
        report = self.last_report
        return report is not None and any(
            o.ok and o.kind == "rollback" for o in report.get("commands", ())
        )

    def state_dict(self) -> dict[str, Any]:
        """Every optimizer's state the manager holds, with their layout (live references, as
        torch's own ``state_dict``: a framework saves it at once); state-dict hooks run."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._take_groups()
        state = self._manager_state.optimizers.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            state = post_hook(self, state) or state
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Load a ``state_dict()`` back: refused (``ValueError``, nothing loaded) unless it was
        saved with the optimizers the manager holds now (the same seeds in the same stages)."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                "ManagerOptimizer.load_state_dict takes a ManagerOptimizer.state_dict(), got "
                f"{type(state_dict).__name__}"
            )
        with self._manager_lock:  # a step takes the groups up under it too
            registry = self._manager_state.require_registry()
            optimizers = self._manager_state.optimizers
            # Checked with the groups added since the last step before any is taken up: a
            # refused load leaves them for the user to fix.
            optimizers.validate_state_dict(state_dict, registry.parameter_names)
            registry.take_host_groups(optimizers)
            optimizers.load_state_dict(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _take_groups(self) -> None:
        """The groups added since the last step (``add_param_group``: gradual unfreezing),
        taken up as a step would (under its lock), so that a state saved now records them."""
        with self._manager_lock:
            state = self._manager_state
            state.require_registry().take_host_groups(state.optimizers)

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError(
            "a ManagerOptimizer is a view of a live manager's optimizers and cannot be copied "
            "or pickled: save its state_dict() (and the manager's checkpoints) instead"
        )

    def __repr__(self) -> str:
        return f"ManagerOptimizer(grad_clip_norm={self.grad_clip_norm!r})"


def _gradscaler_or_none(scaler: Any) -> torch.amp.GradScaler | None:
    """``scaler`` when it is a ``torch.amp.GradScaler`` or None; else ``TypeError``."""
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(
            "ManagerOptimizer's scaler must be the torch.amp.GradScaler that steps it "
            f"(scaler.step(optimizer)), or None; got {type(scaler).__name__}"
        )
    return scaler


def _keeping_scale_once(
    scaler: torch.amp.GradScaler, kept: Callable[..., None] | None
) -> Callable[..., None]:
    """An ``update`` for ``scaler``'s instance that, called once, puts back the instance's own
    ``update`` it replaced (``kept``: a user's wrapper; None: the class's) and runs that with the
    scale as it is now (or the ``new_scale`` it is given)."""

    def update(new_scale: float | torch.Tensor | None = None) -> None:
        _put_back_update(scaler, kept)
        scaler.update(scaler.get_scale() if new_scale is None else new_scale)

    update.kept = kept  # type: ignore[attr-defined]
    return update


def _put_back_update(scaler: torch.amp.GradScaler, kept: Callable[..., None] | None) -> None:
    if kept is None:
        vars(scaler).pop("update", None)
    else:
        scaler.update = kept  # type: ignore[method-assign]


class ManagerScheduler:
    """``scheduler`` stepped at most once per step of ``optimizer``, and not after one that
    applied a ROLLBACK.

    Build ``scheduler`` on the host optimizer (``manager.optimizers.optimizer("host")``) and
    ``manager.track`` it, so that a ROLLBACK puts it back with the weights; this wrapper then
    skips the one step the framework takes right after such a rollback. A call with no manager
    step since the last is no step either: a loop that steps its scheduler on every
    micro-batch (``accelerate``'s, whose own wrapper skips those calls for the schedulers it
    prepares, and this is not one) would run the schedule ahead of the manager's clock.
    """

    def __init__(self, scheduler: Any, optimizer: ManagerOptimizer) -> None:
        if not callable(getattr(scheduler, "step", None)):
            raise TypeError(f"expected a learning-rate scheduler, got {type(scheduler).__name__}")
        if isinstance(scheduler, ReduceLROnPlateau) or type(scheduler).__name__ == "GreedyLR":
            raise TypeError(
                f"{type(scheduler).__name__} steps on a metric, which a framework passes only "
                "to a scheduler it recognises as one (Trainer at evaluation, by its class): pass "
                "it to the framework as it is; a ROLLBACK in a step does not move it"
            )
        inner = getattr(optimizer, "optimizer", None)  # accelerate's wrapper of one: its own
        if not isinstance(optimizer, ManagerOptimizer) and isinstance(inner, ManagerOptimizer):
            optimizer = inner
        if not isinstance(optimizer, ManagerOptimizer):
            raise TypeError(
                f"ManagerScheduler steps with a ManagerOptimizer, got {type(optimizer).__name__}"
            )
        self.scheduler = scheduler
        self.optimizer = optimizer
        self._stepped_at = optimizer.steps

    def step(self, *args: Any, **kwargs: Any) -> None:
        steps = self.optimizer.steps
        if steps == self._stepped_at:  # no manager step since the last call: a micro-batch
            return
        self._stepped_at = steps
        if self.optimizer.rolled_back:
            return
        self.scheduler.step(*args, **kwargs)

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:  # anything else a framework reads: the scheduler's
        if name in ("scheduler", "optimizer"):
            raise AttributeError(name)
        return getattr(self.scheduler, name)
