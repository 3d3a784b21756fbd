"""How the manager's optimizers step: gradients clipped, state that follows its parameters, and
a seed optimizer's step that cannot stop the host's.

**Clipping.** ``clip_gradients`` is ``torch.nn.utils.clip_grad_norm_``'s math (coef = max /
(norm + 1e-6), clamped to 1) with the norms from the fused ``grad_norms``, per optimizer; a norm
that is not finite leaves the gradients as they were (torch's scales them by 0 or NaN), so the
caller can skip the step on it. Sparse gradients are read at ``max_norm=inf`` only (the norm of
their coalesced values: a finiteness check, nothing scaled), as a GradScaler's step asks;
``grads_finite`` is that check alone, left on the device.

**Following.** torch's optimizers create their state (Adam's moments) at the first step, in the
dtype and on the device the parameters had then. After a model conversion (``model.to(
torch.bfloat16)``, ``half()``, ``cuda()``) every step raises (``expected dtype float``), and for
the optimizers a manager owns (every seed's, the host's under ``host_lr``) the user has no way
to the fix. ``follow_parameters`` casts each state tensor as torch's own
``Optimizer.load_state_dict`` casts a loaded state to its parameters: floating-point state takes
the parameter's dtype and device, and ``step`` stays as it is unless its group is ``fused`` or
``capturable`` (then float32, on the parameter's device). A state whose shape no longer
matches (a ``.data`` swap that resized the parameter) is not this module's to guess at: the
step raises, as it would in plain PyTorch, and ``manager.optimizers.reset_state`` starts it over.
A state about to be loaded is checked instead (``state_shape_problem``): moments of another
shape loaded, and every later step raised. For torch's elementwise optimizers (Adam, SGD and
the like) each entry of a parameter's state must be a tensor of the parameter's shape, but
their scalars (``step`` and the like: a number or a one-element tensor); for another optimizer,
a tensor must have the shape of the live one under its key, if there is one. Each saved param
group must hold every hyperparameter the optimizer steps with (``group_keys_problem``).

**Carrying over.** A seed promoted into the host optimizer brings its state along only from an
optimizer of the host's class, and only where it fits the group it joins (``carried_state``):
the state the host would make for it there, found by stepping a probe of that class and that
group's settings once on zeros of each parameter's shape, dtype and device, must have the same
keys, each a tensor of the same dtype, device and shape (or each not a tensor). Carried as it
was into a group whose settings need state the seed's optimizer never made (Adam's ``amsgrad``:
``max_exp_avg_sq``; RMSprop's ``momentum`` or ``centered``), every later host step raised
``KeyError``. A state that does not fit is left behind and the parameter starts with none, as a
parameter new to the group does; so does every one when the probe cannot run (a custom class).

**Mixed momentum buffers.** torch's fused SGD step (``fused=True``, momentum > 0) takes a
group's buffers all or none: where some of its parameters with gradients have a
``momentum_buffer`` and others none (or None), every step raises. A promotion makes that state
(a fresh host's group beside a seed's carried buffers, after INITIALIZE_HOST; a seed whose
state was reset beside the host's), so ``settle_momentum`` settles the group it joins, there
and at a load of the saved state, only where the group is mixed. With
``dampening == 0`` (torch's default, and Nesterov's only value) a buffer of zeros is exact: the
fused update ``0 · momentum + grad`` makes it ``grad``, what the unfused first step makes it.
With dampening it would make it ``(1 - dampening) · grad``, so a step pre hook gives each bare
parameter, at the first step it has a gradient, the buffer ``d_p · dampening / momentum`` (``d_p``
the gradient as the step reads it: unscaled, signed, with weight decay), which the fused update
turns into ``d_p`` (1 ulp of fp32 apart at most, seen); one without a gradient is left out of
the fused step, so it waits. The group stays fused (the user's flag is never touched), the hook
holds the parameters weakly and reads buffers at the call (a load in between still works), and
it removes itself once none is bare: a step costs nothing more after that.

**Containment.** ``step_contained`` steps a seed's optimizer in a ``try``: one that raises (a
state of another shape, whatever else) may have stepped part of its parameters (torch's
optimizers go parameter by parameter), so its state is reset, the failure counted, logged at a
bounded rate and charged to the seed as a fault (by the manager: QUARANTINE at its limit), and
the manager's step goes on: the host's optimizer, the zeroing of gradients, the safe point that
applies queued commands (a controller's CULL among them).
"""

from __future__ import annotations

import copy
import logging
import math
import weakref
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from kasmina.ops.backend import SUPPORTED_DTYPES
from kasmina.ops.grad_norms import grad_norms
from kasmina.utils.checks import check_real
from kasmina.utils.ratelimit import rarely

logger = logging.getLogger(__name__)

__all__ = [
    "carried_state",
    "clip_gradients",
    "follow_parameters",
    "grads_finite",
    "move_into",
    "settle_momentum",
    "step_contained",
]

_CLIP_EPS = 1e-6  # same epsilon as torch.nn.utils.clip_grad_norm_


def checked_clip_norm(value: object) -> float:
    """A ``grad_clip_norm`` as a float: 0 (or None) for no clipping, else the norm to clip to,
    which also skips a step whose gradient norm is not finite (+inf: only that). A negative or
    NaN norm would silently turn both off: a ``ValueError``, as a bool, a string or a tensor."""
    if value is None:
        return 0.0
    try:
        norm = float(check_real("grad_clip_norm", value))
    except OverflowError:  # an int past a float's range (10**400): refused as a NaN is
        norm = math.nan
    if not 0.0 <= norm <= math.inf:  # NaN fails both comparisons
        raise ValueError(f"grad_clip_norm must be >= 0 (0: no clipping), got {value!r:.40}")
    return norm


def clip_gradients(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients of ``params`` so their global L2 norm is at most ``max_norm``; the
    norm before (a device tensor: no host sync)."""
    if not (max_norm > 0):
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device)
    # A sparse gradient (``nn.Embedding(sparse=True)``) is measured by its rows summed (an
    # uncoalesced one repeats a row per lookup) and scaled as it is (it raised mid-step).
    by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    scaled: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        by_device[g.device].append(g.coalesce()._values() if g.is_sparse else g)
        scaled[g.device].append(g)
    first = grads[0].device
    norms = [_group_norms(group).to(first) for group in by_device.values()]
    # The per-tensor norms are scaled (fp32 whenever the true norm fits); their squares are
    # not: summed in fp32 they overflowed for a total above ~1.8e19. In float64 (a few values),
    # then back to fp32: inf only when the true norm exceeds fp32's range.
    total = torch.linalg.vector_norm(torch.cat(norms), dtype=torch.float64).float()
    coef = torch.clamp(max_norm / (total + _CLIP_EPS), max=1.0).where(total.isfinite(), 1.0)
    for device, group in scaled.items():
        torch._foreach_mul_(group, coef.to(device))
    return total


def grads_finite(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor, on the device (no host sync): whether the gradients ``params`` hold
    are all finite (a sparse one's values), by their total norm (``clip_gradients`` at an
    infinite norm scales nothing); True for none."""
    if not params:
        return torch.ones((), dtype=torch.bool)
    return clip_gradients(params, math.inf).isfinite()


def _group_norms(group: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor norms of one device's gradients. The fused norms read fp32, fp16 and bf16
    and refuse anything else with a ``ValueError`` (checked only when a list is new, so asking
    first costs nothing per step); a model converted to float64 mid-run (a gradient check) is
    clipped through torch's own per-tensor norms instead of raising."""
    try:
        return grad_norms(group)
    except ValueError:
        if all(g.dtype in SUPPORTED_DTYPES for g in group):
            raise
        return torch_norms(group).float()


def torch_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor L2 norms by torch itself, of tensors of any floating or complex dtype (the
    fused ops take fp32, fp16 and bf16 only), each squared and summed in float64 (complex128:
    a complex one's), so that a tiny fp32 entry beside a float64 tensor keeps its norm."""
    return torch.stack([_norm64(t) for t in tensors])


def _norm64(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dtype=torch.complex128 if t.is_complex() else torch.float64)


def follow_parameters(optimizer: torch.optim.Optimizer) -> int:
    """Cast ``optimizer``'s state to its parameters' dtype and device where they differ (see the
    module docstring); the number of parameters whose state was cast."""
    cast = 0
    for group in optimizer.param_groups:
        on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:
                continue
            followed = {k: _followed(k, v, param, on_device) for k, v in state.items()}
            if any(followed[key] is not value for key, value in state.items()):
                optimizer.state[param] = followed
                cast += 1
    if cast:
        logger.info("optimizer state of %d parameter(s) cast to their dtype and device", cast)
    return cast


def _followed(key: str, value: object, param: torch.Tensor, on_device: bool) -> object:
    if not isinstance(value, torch.Tensor):
        return value
    if key == "step":  # torch's policy: float32 with its parameter when fused or capturable
        if not on_device or (value.device == param.device and value.dtype == torch.float32):
            return value
        return value.to(device=param.device, dtype=torch.float32)
    dtype = param.dtype if value.is_floating_point() and param.is_floating_point() else value.dtype
    if value.dtype == dtype and value.device == param.device:
        return value
    return value.to(device=param.device, dtype=dtype)


# torch's optimizers whose per-parameter state holds scalars and tensors of the parameter's shape.
_ELEMENTWISE = frozenset(
    getattr(torch.optim, name)
    for name in (
        "SGD",
        "Adam",
        "AdamW",
        "Adamax",
        "NAdam",
        "RAdam",
        "Adagrad",
        "Adadelta",
        "RMSprop",
        "Rprop",
        "ASGD",
        "SparseAdam",
    )  # fmt: skip
    if hasattr(torch.optim, name)
)


# Their scalar state: the step count, NAdam's momentum product, ASGD's eta and mu.
_SCALAR_STATE = frozenset({"step", "mu_product", "eta", "mu"})


def state_shape_problem(optimizer: torch.optim.Optimizer, saved: dict) -> str | None:
    """Why ``saved`` (an ``optimizer.state_dict()``) holds a state tensor of the wrong shape
    for ``optimizer``'s parameters (see the module docstring), or None."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    elementwise = type(optimizer) in _ELEMENTWISE
    for index, values in (saved.get("state") or {}).items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            return f"a state for parameter {index!r}, of {len(params)}"
        param, live = params[index], optimizer.state.get(params[index], {})
        for key, value in dict(values).items():
            held = live.get(key)
            if elementwise and key in _SCALAR_STATE:  # a number, or a one-element tensor
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    continue
                if isinstance(value, int | float) and not isinstance(value, bool):
                    continue
                return f"state {key!r} of parameter {index} is not a number"
            if not isinstance(value, torch.Tensor):  # None: made at the next step (SGD's)
                if elementwise and value is not None:
                    return f"state {key!r} of parameter {index} is a {type(value).__name__}"
                continue
            want = param.shape if elementwise else getattr(held, "shape", value.shape)
            if value.shape != want:
                shape = tuple(value.shape)
                return f"state {key!r} of parameter {index} is {shape}, not {tuple(want)}"
    return None


def group_keys_problem(optimizer: torch.optim.Optimizer, saved: dict) -> str | None:
    """Why a param group of ``saved`` (an ``optimizer.state_dict()``) lacks a hyperparameter
    ``optimizer`` steps with, or None. torch's load replaces each live group by the saved one:
    a group without ``betas`` loaded, and every later step raised ``KeyError``. A key the
    optimizer's own ``__setstate__`` fills in when it loads (Adam's ``amsgrad``, ``foreach``:
    keys newer than the state) is not missing; which those are, a probe of the class tells (an
    optimizer whose ``__setstate__`` cannot run on the probe is not checked)."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in saved["param_groups"]]
    for g in groups:
        g["params"] = []
    probe = type(optimizer).__new__(type(optimizer))
    try:
        probe.__setstate__(
            {"defaults": dict(optimizer.defaults), "state": {}, "param_groups": groups}
        )
    except Exception:  # a custom optimizer's __setstate__ needs more than a probe has
        return None
    # A key counts where the live group holds it: torch's load adds ``differentiable`` to the
    # defaults of an optimizer built without it, and a class may add one no group ever gets.
    for index, (group, live) in enumerate(zip(groups, optimizer.param_groups, strict=False)):
        if missing := sorted(k for k in optimizer.defaults if k in live and k not in group):
            return f"param group {index} has no {', '.join(map(repr, missing))}"
    return None


def carried_state(
    source: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    group: Mapping[str, Any],
) -> dict[torch.Tensor, dict]:
    """The states ``source`` holds for ``params`` that ``optimizer`` can step with once they
    join its ``group`` (see the module docstring): none from another class; those that do not
    fit, and all when the probe raises, are left behind (logged). Changes nothing the manager
    holds (global optimizer step hooks run for the probe's step)."""
    states = {p: source.state[p] for p in params if source.state.get(p)}
    if not states or type(source) is not type(optimizer):
        return {}
    probes: dict[tuple, torch.Tensor] = {}
    for param in states:
        key = (param.shape, param.dtype, param.device)
        if key not in probes:
            probes[key] = probe = torch.zeros_like(param.detach())
            probe.grad = torch.zeros_like(probe)
    made: dict[tuple, dict[str, tuple | None]] = {}
    try:  # built as torch's own load builds one: no __init__ (a subclass's may need more)
        # Copied: a tensor a group holds and its step updates in place (a schedule's count) is
        # the live group's. A global optimizer step hook sees the probe's step, as it sees the
        # attach check's.
        own = ("params", "param_names")
        settings = copy.deepcopy({k: v for k, v in group.items() if k not in own})
        probe_opt = type(optimizer).__new__(type(optimizer))
        probe_opt.__setstate__(
            {
                "defaults": dict(optimizer.defaults),
                "state": defaultdict(dict),
                "param_groups": [{**settings, "params": list(probes.values())}],
            }
        )
        probe_opt.step()
        made = {key: _layout(probe_opt.state.get(p, {})) for key, p in probes.items()}
    except Exception as exc:
        logger.info("optimizer state not carried over: the probe raised %r", exc)
    carried = {
        param: state
        for param, state in states.items()
        if made.get((param.shape, param.dtype, param.device)) == _layout(state)
    }
    if len(carried) < len(states):
        msg = "%d of %d tensors' optimizer states do not fit the host group they join: left behind"
        logger.info(msg, len(states) - len(carried), len(states))
    return carried


def settle_momentum(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """Make a fused SGD group with momentum, whose parameters some have a momentum buffer and
    some not, step as unfused SGD would (see the module docstring); True when it was mixed."""
    if not (isinstance(optimizer, torch.optim.SGD) and group.get("fused") and group["momentum"]):
        return False
    params, state = group["params"], optimizer.state
    bare = [p for p in params if state.get(p, {}).get("momentum_buffer") is None]
    if not bare or len(bare) == len(params):
        return False
    if group["dampening"] == 0:
        for p in bare:
            state[p]["momentum_buffer"] = torch.zeros_like(p.detach())
        logger.info("fused SGD: %d tensors start their momentum at 0 beside others'", len(bare))
        return True
    if (hook := _FIRST_BUFFERS.get(optimizer)) is None:
        hook = _FIRST_BUFFERS[optimizer] = _FirstBuffers(optimizer)
    hook.waiting.extend(weakref.ref(p) for p in bare)
    msg = "fused SGD with dampening: %d tensors get a first buffer at their first gradient"
    logger.info(msg, len(bare))
    return True


class _FirstBuffers:
    """A step pre hook giving each of ``params`` that has a gradient and no momentum buffer one
    that the fused update ``momentum · buf + (1 - dampening) · d_p`` turns into ``d_p`` (the
    gradient, unscaled, negated under ``maximize``, plus weight decay), what unfused SGD's first
    step makes it: ``d_p · dampening / momentum``. It holds the parameters weakly, never a group
    dict (a load of the state builds new ones): buffers and hyperparameters are read at the
    call, and it removes itself once none is left bare. A parameter with no gradient waits
    (torch's fused step leaves it out, so it mixes nothing). At a step a GradScaler skips (an
    overflow: the fused step changes nothing) the buffers are taken back after it. One per
    optimizer: torch iterates its hooks' dict, so a hook can only be removed while none of that
    dict runs (a post hook, registered last for that step, takes it and then itself out)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.waiting: list[weakref.ref] = []
        self.given_at_skip: list[weakref.ref] = []  # buffers made for a step that is skipped
        self.handle = optimizer.register_step_pre_hook(self)
        self.after: RemovableHandle | None = None

    @torch.no_grad()
    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.take_back(optimizer)  # a skipped step that raised: its post hooks never ran
        found_inf = getattr(optimizer, "found_inf", None)  # a GradScaler's, for this step
        skipped: bool | None = None  # read once, and only where a buffer is made
        waiting: list[weakref.ref] = []
        for ref in self.waiting:
            p = ref()
            if p is None or optimizer.state.get(p, {}).get("momentum_buffer") is not None:
                continue  # gone, or given one since (a loaded state): nothing to do
            if p.grad is None or p.grad.is_sparse:
                waiting.append(ref)  # no step for it now (and no look through the groups)
                continue
            group = next((g for g in optimizer.param_groups if _holds(g, p)), None)
            if group is None or not (group.get("fused") and group["momentum"]):
                continue  # removed, or stepped unfused (torch starts it itself) or plain
            d_p = p.grad
            if (scale := getattr(optimizer, "grad_scale", None)) is not None:
                d_p = d_p / scale.to(d_p.device)
            d_p = -d_p if group["maximize"] else d_p
            if group["weight_decay"] != 0:
                d_p = d_p.add(p, alpha=group["weight_decay"])
            buf = d_p * (group["dampening"] / group["momentum"])
            optimizer.state[p]["momentum_buffer"] = buf.to(p.dtype)
            if skipped is None:
                skipped = found_inf is not None and bool(found_inf.item())
            if skipped:  # a buffer all the same: the fused step takes no mix, even skipping
                self.given_at_skip.append(ref)
                waiting.append(ref)
        self.waiting = waiting
        if (skipped or not waiting) and self.after is None:
            self.after = optimizer.register_step_post_hook(self.stepped)

    def take_back(self, optimizer: torch.optim.Optimizer) -> None:
        for ref in self.given_at_skip:
            if (p := ref()) is not None:
                optimizer.state[p].pop("momentum_buffer", None)
        self.given_at_skip = []

    def stepped(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.take_back(optimizer)
        if self.after is not None:
            self.after.remove()  # the optimizer's last post hook at this step: safe to take out
            self.after = None
        if not self.waiting:
            self.handle.remove()
            if _FIRST_BUFFERS.get(optimizer) is self:
                del _FIRST_BUFFERS[optimizer]


# The pre hook of each optimizer that has parameters waiting for a first buffer (weakly: an
# optimizer dropped takes its hook along).
_FIRST_BUFFERS: weakref.WeakKeyDictionary[torch.optim.Optimizer, _FirstBuffers] = (
    weakref.WeakKeyDictionary()
)


def _holds(group: Mapping[str, Any], p: torch.Tensor) -> bool:
    return any(q is p for q in group["params"])


def _layout(state: Mapping[str, Any]) -> dict[str, tuple | None]:
    """Per key of a parameter's state: a tensor's dtype, device and shape (None: not one)."""
    return {
        key: (v.dtype, v.device, tuple(v.shape)) if isinstance(v, torch.Tensor) else None
        for key, v in state.items()
    }


def step_contained(optimizer: torch.optim.Optimizer, optimizer_id: str, failures: dict) -> bool:
    """``optimizer.step()``; False when it raised: the exception goes in ``failures[optimizer_id]``
    (a count and the last reason), logged at a bounded rate, and the optimizer's state is reset.
    A step that raised may have stepped some parameters (or only moved ``step`` counters): torch's
    optimizers work parameter by parameter, so its state is no longer that of any step."""
    try:
        optimizer.step()
    except Exception as exc:  # a seed's optimizer: the host's step goes on
        optimizer.state.clear()
        count, _ = failures.get(optimizer_id, (0, ""))
        failures[optimizer_id] = (count + 1, f"{type(exc).__name__}: {exc}")
        logger.log(
            rarely(count + 1, every=1000),
            "optimizer %s: step raised (%d so far; its state reset, and what it had stepped "
            "stays): %s: %s", optimizer_id, count + 1, type(exc).__name__, exc,
        )  # fmt: skip
        return False
    return True


def move_into(
    live: torch.optim.Optimizer, built: torch.optim.Optimizer, *, defaults: bool = False
) -> None:
    """Give ``live`` the param groups and state of ``built`` (same class), in place: the group
    dicts, their params lists and the state mapping stay the objects that were there (LBFGS
    holds its group's list). A key only a live group has (``initial_lr``) stays in it. With
    ``defaults`` (``built``'s restored from a saved state), ``live`` takes those too."""
    if defaults:
        live.defaults.update(built.defaults)
    groups = live.param_groups
    for index, new in enumerate(built.param_groups):
        if index < len(groups):
            group = groups[index]
            params = group["params"]
            params[:] = new["params"]
            kept = {k: v for k, v in group.items() if k not in new and k != "param_names"}
            group.clear()
            group.update(new, params=params)
            group.update(kept)
        else:
            groups.append(new)
    del groups[len(built.param_groups) :]
    live.state.clear()
    live.state.update(built.state)
