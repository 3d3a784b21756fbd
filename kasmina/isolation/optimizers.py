"""One host optimizer and one optimizer per seed, over disjoint parameter sets (docs/design.md §4).

Disjoint sets checked at registration (a parameter two optimizers reach is the simplest way
for a seed to move the host) by identity *and* by memory: ``nn.Parameter(host.weight.data)`` is
rejected like the host tensor itself. Teacher parameters are frozen and enter no optimizer.

When a seed becomes ACTIVE (fossilized) its parameters join one of the host optimizer's
existing param groups (``promote_seed``) and the seed optimizer is dropped. Never a group of
their own: a user's LR scheduler on the host optimizer (``LambdaLR``, ``OneCycleLR``) holds one
entry per group and breaks when the count changes under it. Which parameters each promoted seed
added is recorded, and so is each group a user adds to the host optimizer (``add_param_group``,
gradual unfreezing: checked and taken up by ``take_host_groups``, by the parameters' names in
the model), so a saved state's layout can be checked and a rollback can rebuild it
(``optimizer_state``: each optimizer's entry, the saved format, its check and upgrade). A
rollback's commit (``adopt``) moves the rebuilt state into the live optimizer objects instead of
replacing them, so whatever holds one (a scheduler, a ``GradScaler``) goes on working on it.

Stepping takes one clip norm for all the optimizers it steps, checked (``checked_clip_norm``)
first: 0 or None is no clipping, a norm > 0 clips to it and skips (gradients and lr untouched)
a step whose gradient norm is not finite, +inf skips without clipping.

An in-process component, not a door: a controller's optimizer command reaches it verified
(``optimizer_commands``), and ``apply_optimizer_command`` maps each type onto a call here (§5).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from kasmina.errors import ParameterOverlapError
from kasmina.isolation.optimizer_commands import (
    VerifiedOptimizerCommand,
    check_lr,
    read_optimizer_command,
    step_lrs,
)
from kasmina.isolation.optimizer_state import (
    NamesOf,
    OptimizerEntry,
    Promotion,
    check_saved_state,
    load_saved_state,
    saved_state,
    upgrade_state_dict,
)
from kasmina.isolation.ownership import ParameterOwnership, collect_tensors
from kasmina.isolation.stepping import (
    carried_state,
    checked_clip_norm,
    clip_gradients,
    follow_parameters,
    move_into,
    settle_momentum,
    step_contained,
)
from kasmina.leyline import CommandType, MetricType
from kasmina.utils.conversions import conversions
from kasmina.utils.flags import read_flags
from kasmina.utils.ratelimit import rarely

logger = logging.getLogger(__name__)

HOST_ID = "host"
TEACHER_SOURCE = "teacher"
ParameterProvider = Callable[[], Iterable[torch.Tensor]]


class IsolatedOptimizerManager:
    """Owns the host optimizer and the seed optimizers; steps them on command."""

    def __init__(
        self,
        *,
        default_optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
        telemetry: Any | None = None,
        default_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.default_optimizer_cls = default_optimizer_cls
        self.default_options = dict(default_options or {})  # a command's creation's, under its own
        self.telemetry = telemetry
        self._entries: dict[str, OptimizerEntry] = {}
        self._ownership = ParameterOwnership()  # optimizer id (or "teacher") per parameter
        self._sources: dict[str, ParameterProvider] = {}
        self._grad_norms: dict[str, torch.Tensor] = {}  # ``last_grad_norm``
        self._skipped: dict[str, int] = {}  # ``skipped_steps``
        self._failed: dict[str, tuple[int, str]] = {}  # ``failed_steps``
        self.failed_now: list[str] = []  # the seeds' optimizers whose step raised in the last call
        self.norms_now: dict[str, bool] = {}  # the last call's clipped optimizers: norm finite
        self.last_refusal = ""  # why apply_optimizer_command last returned False
        self.refused_commands = 0  # how many times it did: each logged rarely (a signer's flood)
        self._conversions = conversions()  # the model conversions its states followed

    # ------------------------------------------------------------------ registry
    @property
    def optimizer_ids(self) -> list[str]:
        return list(self._entries)

    @property
    def seed_ids(self) -> list[str]:
        # The ids copied in one C call first: a reader on another thread (an exporter) walked
        # the live dict as a command created or removed an optimizer, and raised.
        return [oid for oid in list(self._entries) if oid != HOST_ID]

    # The step's records, read as copies (one C call): an exporter walking the live dict while
    # a step added an optimizer's first entry raised "dictionary changed size during iteration".
    @property
    def last_grad_norm(self) -> dict[str, torch.Tensor]:
        """Per optimizer id: its pre-clip gradient norm at its last clipped step (a device
        tensor)."""
        return self._grad_norms.copy()

    @property
    def skipped_steps(self) -> dict[str, int]:
        """Per optimizer id: the steps a non-finite gradient norm skipped."""
        return self._skipped.copy()

    @property
    def failed_steps(self) -> dict[str, tuple[int, str]]:
        """Per seed optimizer id: the steps that raised, and the last one's reason."""
        return self._failed.copy()

    @property
    def has_host(self) -> bool:
        return HOST_ID in self._entries

    @property
    def teacher_param_count(self) -> int:
        return sum(p.numel() for p in self._ownership.owned_by(TEACHER_SOURCE))

    def optimizer(self, optimizer_id: str) -> torch.optim.Optimizer:
        return self._entry(optimizer_id).optimizer

    def parameters(self, optimizer_id: str) -> list[torch.Tensor]:
        return self._entry(optimizer_id).params()

    def owner_of(self, param: torch.Tensor) -> str | None:
        """The optimizer id owning ``param``, ``"teacher"`` for teacher params, else None."""
        return self._ownership.owner_of(param)

    def set_parameter_source(self, name: str, provider: ParameterProvider) -> None:
        """Where commands find parameters: ``"host"``, a seed id, or ``"teacher"``.

        A command carries only names; the provider is called when the command runs, so it sees
        the module as it is then (e.g. a seed whose kernel was attached after registration)."""
        if not name or not callable(provider):
            raise ValueError("a parameter source needs a non-empty name and a callable")
        if name == TEACHER_SOURCE and self._sources.get(name) != provider:  # bound methods: ==
            self._ownership.release(TEACHER_SOURCE)  # a new teacher: the old one's are let go
        self._sources[name] = provider

    def _entry(self, optimizer_id: str) -> OptimizerEntry:
        entry = self._entries.get(optimizer_id)
        if entry is None:
            raise KeyError(f"no optimizer {optimizer_id!r} (have {sorted(self._entries)})")
        return entry

    # ------------------------------------------------------------------ creation
    def _new_optimizer(
        self, params: list[torch.Tensor], lr: float,
        optimizer_cls: type[torch.optim.Optimizer] | None, options: Mapping[str, Any],
    ) -> torch.optim.Optimizer:  # fmt: skip
        if not params:
            raise ValueError("an optimizer needs at least one parameter")
        check_lr(lr)
        cls = optimizer_cls or self.default_optimizer_cls
        return cls(params, lr=lr, **dict(options))

    def initialize_host(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        optimizer_cls: type[torch.optim.Optimizer] | None = None,
        **options: Any,
    ) -> torch.optim.Optimizer:
        if self.has_host:
            raise ValueError("the host optimizer is already initialized")
        plist = collect_tensors(params, "host parameters")
        if not plist:
            raise ValueError(
                "the host has no trainable parameters (the host's are those trainable when the "
                "manager registered the model): a frozen host takes no host optimizer (attach it "
                "with host_lr=None; a layer unfrozen later is stepped by the trainer's own)"
            )
        self._ownership.check_optimizable(plist, HOST_ID)
        optimizer = self._new_optimizer(plist, lr, optimizer_cls, options)
        self._register(HOST_ID, plist, optimizer, "optimizer_created", {"optimizer_id": HOST_ID})
        logger.info("host optimizer %s over %d tensors", type(optimizer).__name__, len(plist))
        return optimizer

    def create_seed_optimizer(
        self,
        seed_id: str,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        optimizer_cls: type[torch.optim.Optimizer] | None = None,
        **options: Any,
    ) -> torch.optim.Optimizer:
        if not isinstance(seed_id, str) or not seed_id or seed_id in (HOST_ID, TEACHER_SOURCE):
            raise ValueError(f"invalid seed id {seed_id!r}")
        if seed_id in self._entries:
            raise ValueError(f"seed {seed_id!r} already has an optimizer")
        plist = collect_tensors(params, f"parameters of seed {seed_id!r}")
        self._ownership.check_optimizable(plist, seed_id)
        optimizer = self._new_optimizer(plist, lr, optimizer_cls, options)
        self._register(seed_id, plist, optimizer, "seed_optimizer_created", {"seed_id": seed_id})
        return optimizer

    def _register(
        self, owner: str, plist: list[torch.Tensor], optimizer: torch.optim.Optimizer,
        event: str, labels: dict[str, str],
    ) -> None:  # fmt: skip
        """All or nothing: a sink that raises on the event (a Ctrl-C) leaves no claim behind."""
        try:
            self._ownership.claim(plist, owner)
            self._entries[owner] = OptimizerEntry(optimizer)
            self._emit(event, float(sum(p.numel() for p in plist)), labels)  # elements
        except BaseException:
            self._ownership.release(owner)
            self._entries.pop(owner, None)
            raise

    def register_teacher_params(self, params: Iterable[torch.Tensor]) -> int:
        """Freeze the teacher's parameters and bar them from every optimizer; they replace
        those registered before (one teacher at a time: a replaced one is not kept alive).
        Returns how many elements were not registered already."""
        plist = collect_tensors(params, "teacher parameters")
        if not plist:  # would only drop the teacher registered before
            raise ValueError("no teacher parameters to register")
        new = [p for p in plist if self._ownership.owner_of(p) != TEACHER_SOURCE]
        self._ownership.check_free(new, TEACHER_SOURCE)
        self._ownership.release(TEACHER_SOURCE)
        self._ownership.claim(plist, TEACHER_SOURCE)
        for p in new:
            p.requires_grad_(False)
        count = sum(p.numel() for p in new)
        self._emit("teacher_params_registered", float(self.teacher_param_count), {})
        logger.info("registered %d teacher parameters (frozen, eval only)", count)
        return count

    def remove_seed(self, seed_id: str) -> None:
        if seed_id == HOST_ID:
            raise ValueError("remove_seed cannot remove the host optimizer")
        self._entry(seed_id)  # KeyError for an unknown seed, before anything changes
        self._ownership.release(seed_id)
        del self._entries[seed_id]
        self._grad_norms.pop(seed_id, None)

    def promote_seed(
        self,
        seed_id: str,
        *,
        group: int | None = None,
        near: Iterable[torch.Tensor] = (),
    ) -> int:
        """The seed is ACTIVE: its params join the host optimizer; the seed optimizer goes.

        They join an existing param group, never a new one, so the host optimizer keeps its
        group count (an LR scheduler on it holds one entry per group): group ``group`` if
        given, else the one group that holds any of ``near`` (the slot's host parameters),
        else the first. From then on they train with that group's hyperparameters and
        schedule. With the same optimizer class the seed's state (Adam's moments, step) carries
        over where it fits the group (``carried_state``, run before anything moves), else it
        starts with none. Returns the group's index."""
        if seed_id == HOST_ID:
            raise ValueError("the host cannot be promoted")
        host, seed = self._entry(HOST_ID), self._entry(seed_id)
        groups = host.optimizer.param_groups[: len(host.sizes)]  # taken up: take_host_groups
        if group is None:
            wanted = {id(p) for p in near}
            holding = [i for i, g in enumerate(groups) if any(id(p) in wanted for p in g["params"])]
            index = holding[0] if len(holding) == 1 else 0
        elif 0 <= group < len(groups):
            index = group
        else:
            raise ValueError(f"the host optimizer has no param group {group}")
        params, target = seed.params(), groups[index]
        self._follow_conversions()  # a cast since the last step: else no state would fit
        carried = carried_state(seed.optimizer, params, host.optimizer, target)
        target["params"].extend(params)
        if "param_names" in target:  # a group built from named parameters names each one
            target["param_names"].extend(f"{seed_id}.{i}" for i in range(len(params)))
        host.optimizer.state.update(carried)
        settle_momentum(host.optimizer, target)  # fused SGD takes no mix of buffers and none
        host.promoted.append(Promotion(seed_id, index, params))
        host.sizes[index] += len(params)
        self._ownership.transfer(seed_id, HOST_ID)
        del self._entries[seed_id]
        self._grad_norms.pop(seed_id, None)
        self._emit("seed_promoted", float(sum(p.numel() for p in params)), {"seed_id": seed_id})
        logger.info("seed %s promoted: %d tensors into host group %d", seed_id, len(params), index)
        return index

    def promoted(self) -> dict[str, tuple[int, list[torch.Tensor]]]:
        """Each promoted seed's host param group and the tensors it added (none: no host)."""
        host = self._entries.get(HOST_ID)
        if host is None:
            return {}
        return {p.seed_id: (p.group, list(p.params)) for p in host.promoted}

    def take_host_groups(self, names_of: NamesOf) -> list[torch.Tensor]:
        """Take up the param groups added to the host optimizer (``add_param_group``: gradual
        unfreezing) since the last call (before each step and checkpoint): checked as any
        registration (a teacher's or another optimizer's: ``ParameterOverlapError``), claimed
        for the host, each recorded as ``names_of`` names its parameters in the model, for a
        checkpoint to rebuild. Any other edit (a parameter put into or taken out of a group, a
        group removed) is a ``ValueError``; both raise before anything changes. Unchanged: one
        ``len`` per group. Returns the parameters taken up (none, mostly)."""
        host = self._entries.get(HOST_ID)
        if host is None:
            return []
        groups, known = host.optimizer.param_groups, len(host.sizes)
        sizes = [len(group["params"]) for group in groups]
        if sizes == host.sizes:
            return []
        if sizes[:known] != host.sizes:
            raise ValueError(
                f"the host optimizer's param groups of sizes {host.sizes} became {sizes}: only "
                "new groups (add_param_group) can be kept through a checkpoint"
            )
        new = [collect_tensors(g["params"], "host parameters") for g in groups[known:]]
        self._ownership.check_optimizable([p for ps in new for p in ps], "host (add_param_group)")
        names = [list(names_of(list(group["params"]))) for group in groups[known:]]
        for plist, group_names in zip(new, names, strict=True):
            self._ownership.claim(plist, HOST_ID)
            host.added.append(group_names)
            host.sizes.append(len(group_names))
        logger.info("host optimizer: took up %d added param group(s)", len(new))
        return [p for ps in new for p in ps]

    def adopt(self, other: IsolatedOptimizerManager) -> None:
        """Take over ``other``'s optimizers, layout and state, keeping the optimizer objects.

        A rollback's commit: ``other`` was built and loaded beside this manager. Wherever an
        optimizer id is in both with the same class (always the host), the live object stays and
        ``other``'s param groups and state move into it, so a scheduler or a ``GradScaler`` goes
        on driving the optimizer that trains; a group key only the live group has (a scheduler's
        ``initial_lr``) stays. Others are taken as built. Dict and list operations: cannot fail."""
        entries: dict[str, OptimizerEntry] = {}
        for oid, entry in other._entries.items():
            live = self._entries.get(oid)
            if live is not None and type(live.optimizer) is type(entry.optimizer):
                move_into(live.optimizer, entry.optimizer, defaults=entry.restored)
                entry = OptimizerEntry(live.optimizer, entry.promoted, entry.added)
            elif live is not None:
                logger.warning("optimizer %s replaced: the restored class differs", oid)
            entries[oid] = entry
        self._entries = entries
        self._ownership = other._ownership
        self._grad_norms.clear()  # measured on the timeline the rollback left

    # ------------------------------------------------------------------ stepping
    def set_lr(self, optimizer_id: str, lr: float) -> None:
        """Set the lr as a STEP command's ``learning_rate`` does (``step_lrs``; ``lr`` > 0)."""
        groups = self._entry(optimizer_id).optimizer.param_groups
        for group, new in zip(groups, step_lrs(groups, lr), strict=True):
            group["lr"] = new

    def zero_grad(
        self, optimizer_id: str | None = None, set_to_none: bool = True, host: bool | None = None
    ) -> None:
        """``host``: ``set_to_none`` for the host's optimizer alone (None: the same)."""
        for oid in [optimizer_id] if optimizer_id is not None else list(self._entries):
            none = set_to_none if host is None or oid != HOST_ID else host
            self._entry(oid).optimizer.zero_grad(set_to_none=none)

    def clip_grad_norm(self, optimizer_id: str, max_norm: float) -> torch.Tensor:
        """Scale the group's grads so their global L2 norm is at most ``max_norm``
        (``stepping.clip_gradients``); the pre-clip norm (a device tensor, no host sync)."""
        return clip_gradients(self.parameters(optimizer_id), max_norm)

    def step(self, optimizer_id: str, grad_clip_norm: float | None = 0.0) -> bool:
        """Step one optimizer, clipping first when ``grad_clip_norm > 0`` (0 or None: off; a
        negative, NaN or non-number norm is a ``ValueError`` before anything changes).

        With clipping, a non-finite global norm skips the step (one host sync, like AMP's
        scaler) so NaN/Inf never reach the weights; returns False then, True when it stepped."""
        return self.step_many([optimizer_id], grad_clip_norm)[0]

    def step_many(
        self, optimizer_ids: Sequence[str], grad_clip_norm: float | None = 0.0
    ) -> list[bool]:
        """``step`` for each optimizer, with one host sync in all when clipping: every group is
        clipped, the finiteness of all their norms read in one transfer, then each steps. The
        norm and the ids are checked before any gradient is clipped or any optimizer stepped."""
        clip = checked_clip_norm(grad_clip_norm)
        entries = [self._entry(optimizer_id) for optimizer_id in optimizer_ids]
        self._follow_conversions()
        finite = [True] * len(entries)
        if clip > 0:
            totals = [self.clip_grad_norm(oid, clip) for oid in optimizer_ids]
            self._grad_norms.update(zip(optimizer_ids, totals, strict=True))
            finite = read_flags([torch.isfinite(total) for total in totals])
        self.failed_now = []
        self.norms_now = dict(zip(optimizer_ids, finite, strict=True)) if clip > 0 else {}
        for i, (optimizer_id, entry) in enumerate(zip(optimizer_ids, entries, strict=True)):
            ok = finite[i]
            if ok and optimizer_id != HOST_ID:  # a seed's: one that raises skips its step
                finite[i] = step_contained(entry.optimizer, optimizer_id, self._failed)
                self.failed_now += [] if finite[i] else [optimizer_id]
            elif ok:
                entry.optimizer.step()
            else:
                n = self._skipped[optimizer_id] = self._skipped.get(optimizer_id, 0) + 1
                msg = "optimizer %s: non-finite grad norm, step skipped (%d skipped so far)"
                logger.log(rarely(n, every=1000), msg, optimizer_id, n)  # the first, every 1000th
                self._emit("optimizer_step_skipped", 1.0, {"optimizer_id": optimizer_id})
        return finite

    def _follow_conversions(self) -> None:
        """A model converted since the last look: every optimizer's state follows it."""
        if self._conversions != conversions():
            self.follow_parameters()

    def follow_parameters(self) -> None:
        """Cast every optimizer's state to its parameters' dtype and device now. A step does
        so after a conversion through a slot (any of the whole model); call this after one of
        a part with no slot in it (``model.encoder.to(torch.bfloat16)``), which it cannot see."""
        for entry in self._entries.values():
            follow_parameters(entry.optimizer)
        self._conversions = conversions()

    def reset_state(self, optimizer_id: str) -> None:
        """Forget the optimizer's running state (moments, step counts); keep its params."""
        self._entry(optimizer_id).optimizer.state.clear()

    # ------------------------------------------------------------------ commands
    def _params_from(self, name: str) -> list[torch.Tensor]:
        provider = self._sources.get(name)
        if provider is None:
            raise KeyError(f"no parameter source registered for {name!r}")
        return list(provider())

    def apply_optimizer_command(self, command: VerifiedOptimizerCommand) -> bool:
        """Execute one verified optimizer command; False (logged) on any rejection.

        ``command.optimizer`` is the Leyline ``OptimizerCommand`` of an ``AdaptationCommand``
        whose signature, freshness, nonce and ranges the handler checked. A wire message (a bare
        ``OptimizerCommand``, an ``AdaptationCommand``, bytes) raises ``TypeError``.
        ``optimizer_id`` names the target (default ``"host"`` / ``"teacher"``); ``learning_rate``
        sets the lr on creation and, when > 0 on STEP, before stepping; ``parameters`` become
        optimizer options on creation, over ``default_options`` (attach's: a GERMINATE's seed
        optimizer takes them too), ``beta1``/``beta2`` combined into ``betas`` (the half not
        given as it is there: attach's, else the class's default). INITIALIZE_HOST takes over
        the host's gradients: once the optimizer is built, those already there (accumulated
        while nothing stepped the host) are dropped."""
        order = read_optimizer_command(command, self._base_betas())  # TypeError: a wire one
        kind, oid, options = order.kind, order.optimizer_id, order.options
        lr = 1e-3 if order.learning_rate is None else order.learning_rate
        try:
            options = {**self.default_options, **options}  # attach's weight decay, fused...
            if kind == CommandType.COMMAND_TYPE_INITIALIZE_HOST:
                self.initialize_host(self._params_from(oid or HOST_ID), lr=lr, **options)
                self.zero_grad(HOST_ID)  # else its first step would apply them all at once
            elif kind == CommandType.COMMAND_TYPE_CREATE_SEED:
                self.create_seed_optimizer(oid, self._params_from(oid), lr=lr, **options)
            elif kind == CommandType.COMMAND_TYPE_STEP:  # refused (skipped): the lr as it was
                clip = checked_clip_norm(order.grad_clip_norm)
                groups = self._entry(oid).optimizer.param_groups
                before, stepped = [group["lr"] for group in groups], False
                try:
                    if order.learning_rate is not None:
                        self.set_lr(oid, lr)
                    # At a safe point the step's gradients were applied and cleared: zeros
                    # kept in place (set_to_none=False) would move Adam on its moments alone.
                    held = [p.grad for p in self.parameters(oid) if p.grad is not None]
                    stepped = not any(bool(g.any()) for g in held) or self.step(oid, clip)
                finally:  # skipped or raised: refused
                    for group, old_lr in zip(groups, () if stepped else before, strict=False):
                        group["lr"] = old_lr
                self.last_refusal = "" if stepped else "step skipped (non-finite norm, or raised)"
                return stepped
            elif kind == CommandType.COMMAND_TYPE_RESET_STATE:
                self.reset_state(oid)
            elif kind == CommandType.COMMAND_TYPE_REGISTER_TEACHER:  # the teacher's, no other's
                if oid not in ("", TEACHER_SOURCE):
                    raise ValueError(f"REGISTER_TEACHER takes the teacher's, not {oid}'s")
                self.register_teacher_params(self._params_from(TEACHER_SOURCE))
            else:
                raise ValueError(f"unknown optimizer command type {kind}")
        except (ParameterOverlapError, KeyError, ValueError, TypeError) as exc:
            self.last_refusal = f"{type(exc).__name__}: {exc}"
            n = self.refused_commands = self.refused_commands + 1
            msg = "optimizer command %s for %r rejected: %s [%d rejected so far]"
            logger.log(rarely(n, 100, logging.ERROR), msg, kind, oid, exc, n)
            return False
        return True

    def _base_betas(self) -> Sequence[Any]:
        """The ``betas`` a command's ``beta1`` or ``beta2`` alone is applied over: attach's
        (``default_options``), else the default class's own default, else torch's Adam's."""
        betas = self.default_options.get("betas")
        if betas is None:
            try:
                signature = inspect.signature(self.default_optimizer_cls)
                betas = signature.parameters["betas"].default
            except (KeyError, TypeError, ValueError):  # no such argument, or no signature
                betas = None
        ok = isinstance(betas, Sequence) and not isinstance(betas, str) and len(betas) == 2
        return tuple(betas) if ok else (0.9, 0.999)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Every optimizer's ``state_dict`` plus the layout needed to check it on load
        (``optimizer_state.saved_state``).

        Like torch's, it holds references to the live state tensors; clone it (or use
        ``kasmina.manager.training_state.capture_training_state``) to keep a snapshot in memory."""
        return saved_state(self._entries)

    def validate_state_dict(self, state: Mapping[str, Any], names: NamesOf | None = None) -> None:
        """Raise ``ValueError`` unless ``state`` matches the live optimizers' layout; with
        ``names``, the host groups added and not yet taken up count, as ``names`` names
        them (``take_host_groups`` would record them so)."""
        check_saved_state(self._entries, state, names)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore every optimizer's state (validated first; tensors copied, never aliased).
        A fused SGD host group saved with buffers for some parameters only (written between a
        promotion and the next step before promotions settled it) is settled here too."""
        state = upgrade_state_dict(state)
        self.validate_state_dict(state)
        load_saved_state(self._entries, state)
        if (host := self._entries.get(HOST_ID)) is not None:
            for group in host.optimizer.param_groups:
                settle_momentum(host.optimizer, group)

    # ------------------------------------------------------------------ telemetry
    def _emit(self, name: str, value: float, labels: Mapping[str, str]) -> None:
        if self.telemetry is not None:
            self.telemetry.emit(name, value, MetricType.METRIC_TYPE_EVENT, labels=dict(labels))
