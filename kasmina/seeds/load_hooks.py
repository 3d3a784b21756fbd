"""What a load checks before it changes a seed, and the ``load_state_dict`` pre-hooks that
check a whole model's seeds before any module loads anything (docs/design.md §6a).

A seed's saved extra state (read by ``extra_state.parse_seed_state``) is checked against the
live seed (``check_seed_state``: its chunk size, whether it holds a kernel, the kernel's
artifact and the stage of a seed with an owner, which only the owner's own rollback,
``owner_restore``, may change); its kernel's weights against the live kernel's keys and shapes
(``check_seed_kernel_keys``); its ``alpha`` buffer against [0, 1]. ``check_seed_states`` runs
these for every seed under a module (a slot's, an attached model's pre-hook) and
``seed_load_pre_hook`` for a load straight into one seed, so a refused load leaves the whole
model as it was.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from kasmina.seeds.extra_state import (
    RestorableSeed,
    SavedSeedState,
    forget_evaluation,
    parse_seed_state,
)
from kasmina.stages import RUNS_KERNEL, StateColumn
from kasmina.utils.state_io import other_shapes

__all__ = [
    "check_seed_kernel_keys",
    "check_seed_state",
    "check_seed_states",
    "owner_restore",
    "seed_load_pre_hook",
]


# Set while a seed's owner restores its own state (a manager's rollback, which swaps kernels,
# optimizers, monitors and pins to match): only then may a load change an owned seed's stage.
_OWNER_RESTORE: ContextVar[bool] = ContextVar("kasmina_owner_restore", default=False)


@contextmanager
def owner_restore() -> Iterator[None]:
    """Within it, loads may change the stage of seeds that have an owner (the owner's own
    rollback, which brings the rest of the seed's bookkeeping along)."""
    token = _OWNER_RESTORE.set(True)
    try:
        yield
    finally:
        _OWNER_RESTORE.reset(token)


def check_seed_state(
    seed: RestorableSeed, state: torch.Tensor | Mapping[str, Any]
) -> SavedSeedState:
    """What ``seed.set_extra_state(state)`` would restore, checked: ``ValueError`` if the seed
    cannot take it (the seed's ``check_state``). A state is restored into a seed that holds a
    kernel exactly when the saved seed held one. A kernel's state needs a kernel: a
    ``state_dict`` holds its weights, not its verified program (``kasmina.load`` ships both), and
    an ACTIVE seed with nothing to run would compute the host alone. A seed's kernel, once
    attached, is taken away by its lifecycle (or ``detach_kernel``), not by a load. A seed with
    an owner (:meth:`GPUStateTensor.owned`: a manager) takes a kernel's state only from a seed
    that held the same artifact, in the stage it is in (only the owner's own rollback,
    :func:`owner_restore`, changes it)."""
    saved = parse_seed_state(state, seed.seed_id)
    if saved.chunk_size not in (None, seed.chunk_size):
        raise ValueError(
            f"seed {seed.seed_id}: the state was saved by a seed of chunk size "
            f"{saved.chunk_size}, this one has {seed.chunk_size} (attach the model as it was)"
        )
    live = _kernel(seed) is not None
    if not live and (saved.has_kernel or saved.stage in RUNS_KERNEL):
        raise ValueError(
            f"seed {seed.seed_id}: the state was saved in {saved.stage.name} with a kernel, "
            "and this seed has none; a state_dict holds a kernel's weights but not its "
            "verified program. Restore a grown model with kasmina.save / kasmina.load "
            "(or germinate the seed before loading its state)"
        )
    if live and saved.has_kernel is False:
        raise ValueError(
            f"seed {seed.seed_id}: the state was saved in {saved.stage.name} without a kernel, "
            f"and this seed holds one in {seed.stage.name}; {_advice(seed)}"
        )
    column = StateColumn.BLUEPRINT_ID
    owned = seed.state_table.owned(seed.state_index) and not _OWNER_RESTORE.get()
    if (
        live
        and owned
        and int(seed.state_table.state_tensor[seed.state_index, column]) != int(saved.row[column])
    ):
        raise ValueError(
            f"seed {seed.seed_id}: the state was saved with a kernel of another artifact; "
            + _advice(seed)
        )
    if owned and saved.stage != seed.stage:  # its optimizer layout and gates follow the stage
        raise ValueError(
            f"seed {seed.seed_id}: the state was saved in {saved.stage.name} and the seed is "
            f"{seed.stage.name}; " + _advice(seed)
        )
    return saved


def _advice(seed: RestorableSeed) -> str:
    """What to do instead of a load that would leave the seed's kernel behind, or swap it."""
    if seed.state_table.owned(seed.state_index):
        return (
            "its stage, kernel, optimizer, isolation monitor and cache pin are its manager's, "
            "which a state_dict load cannot change. Go back to an earlier epoch with a signed "
            "ROLLBACK, or restore the grown model with kasmina.save / kasmina.load into a "
            "freshly built host"
        )
    if _kernel(seed) is not None:
        return "detach its kernel (seed.detach_kernel()) before loading a state saved without it"
    return "restore a grown model with kasmina.save / kasmina.load"


def check_seed_kernel_keys(
    seed: RestorableSeed, state_dict: Mapping[str, Any], at: str, have: set[str] | None = None
) -> None:
    """The kernel weights ``state_dict`` holds under ``at`` (the seed's prefix) are exactly its
    live kernel's, of its shapes (none without one): ``ValueError`` naming the difference. Asked
    wherever the seed's state is loaded, whatever ``strict`` says: it loads with its kernel's
    weights or not at all (PyTorch would report keys after every module loaded, and a shape
    after the modules before it). ``have``: those keys, if the caller has them."""
    kernel = _kernel(seed)
    inner = at + _KERNEL
    live = {} if kernel is None else kernel.state_dict(prefix=inner, keep_vars=True)
    want = set(live)
    if have is None:
        have = _kernel_keys(state_dict, {inner}).get(inner, set())
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise ValueError(
            f"seed {seed.seed_id}: the state_dict does not hold its kernel's weights (missing "
            f"{missing[:4]}, unexpected {unexpected[:4]}): it was saved with another kernel, or "
            f"none; {_advice(seed)}"
        )
    shapes = [] if kernel is None else other_shapes(kernel, state_dict, inner)
    if shapes:
        owned = seed.state_table.owned(seed.state_index)
        raise ValueError(
            f"seed {seed.seed_id}: the state_dict's kernel weights have other shapes than its "
            f"kernel's ({'; '.join(shapes[:4])}): it was saved with another kernel; "
            + (_advice(seed) if owned else "detach this one and attach one of the saved shapes")
        )


def _kernel(seed: object) -> torch.nn.Module | None:
    return getattr(seed, "_modules", {}).get("kernel")


def seed_load_pre_hook(
    seed: torch.nn.Module, state_dict: Mapping[str, Any], prefix: str, *_: Any
) -> None:
    """A seed's own ``load_state_dict`` pre-hook: its state checked before any of it loads (a
    load straight into the seed, which no slot's check sees, wrote its ``alpha`` before its
    extra state was refused), then its evaluation dropped (:func:`forget_evaluation`).

    The ``alpha`` buffer the blend reads holds the lifecycle's alpha: a state without the
    seed's extra state loads it as the seed's own (float32, whatever the state's dtype), and
    ``set_extra_state`` sets it from the one it restores. An averaged model (an EMA that lerps
    every float tensor, a weights-only load of one) carried another alpha in the buffer than
    its extra state, and the seed then blended at one alpha while G4, the state table and the
    report showed the other. ``state_dict`` is the load's own copy (torch copies it)."""
    check_seed_states(seed, state_dict, prefix)
    forget_evaluation(seed)
    buffer, extra = state_dict.get(prefix + "alpha"), state_dict.get(prefix + _EXTRA_STATE)
    if isinstance(buffer, torch.Tensor) and not buffer.is_meta:
        # A fresh float32 tensor either way: an ``assign=True`` load keeps it as the buffer, which
        # ``set_extra_state`` then fills (the caller's tensor, another model's, is not written).
        if extra is None:
            alpha = torch.full(
                buffer.shape, seed.alpha_value, dtype=torch.float32, device=buffer.device
            )
        else:
            alpha = buffer.to(torch.float32, copy=True)  # no read: set_extra_state fills it
        state_dict[prefix + "alpha"] = alpha  # type: ignore[index]


def check_seed_states(
    module: torch.nn.Module, state_dict: Mapping[str, Any], prefix: str, *_: Any
) -> None:
    """A ``load_state_dict`` pre-hook: every seed under ``module`` whose state is in
    ``state_dict`` checks it (``ValueError`` if the seed cannot take it: its extra state,
    :func:`check_seed_state`, and its kernel's weights, :func:`check_seed_kernel_keys`) before
    any module loads anything, so a refused load leaves the whole model as it was, not half
    loaded. PyTorch hands every pre-hook ``strict=True``, so these rules hold for a lenient
    load too; a state_dict without a seed's extra state leaves that seed alone."""
    checked: list[tuple[RestorableSeed, str]] = []
    for name, sub in module.named_modules():
        if isinstance(sub, RestorableSeed):
            at = prefix + (f"{name}." if name else "")
            _check_alpha(state_dict.get(at + "alpha"), at + "alpha")
            value = state_dict.get(at + _EXTRA_STATE)
            if value is not None:
                sub.check_state(value)
                checked.append((sub, at))
    keys = _kernel_keys(state_dict, {at + _KERNEL for _, at in checked})
    for sub, at in checked:
        check_seed_kernel_keys(sub, state_dict, at, keys.get(at + _KERNEL, set()))


def _check_alpha(value: object, key: str) -> None:
    """A seed's ``alpha`` buffer as a load would write it (None: not in the state_dict): the
    GRAFTING blend reads it, so a NaN or a value past [0, 1] (one flipped bit: neither
    safetensors nor ``torch.save`` has a checksum) would reach the host's output, and through
    the host's step its weights. Meta tensors hold no value to check."""
    if value is None or (isinstance(value, torch.Tensor) and value.is_meta):
        return
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() != 1:
        raise ValueError(f"{key}: a seed's alpha is a one-element float tensor, got {value!r:.80}")
    alpha = float(value)  # a load is no hot path: one read
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{key}: a seed's alpha must be in [0, 1], got {alpha}")


def _kernel_keys(state_dict: Mapping[str, Any], prefixes: set[str]) -> dict[str, set[str]]:
    """The keys of ``state_dict`` under each of ``prefixes`` (each ends in ``kernel.``), in one
    pass over the keys: a whole model's load checks every seed, and a scan of every key per
    seed made that quadratic (seconds for a thousand seeds)."""
    found: dict[str, set[str]] = {}
    if not prefixes:
        return found
    for key in state_dict:
        end = key.find(_KERNEL)
        while end >= 0:  # every "kernel." in the key may end a seed's prefix
            inner = key[: end + len(_KERNEL)]
            if inner in prefixes:
                found.setdefault(inner, set()).add(key)
            end = key.find(_KERNEL, end + 1)
    return found


_EXTRA_STATE = "_extra_state"  # the key torch gives a module's get_extra_state()
_KERNEL = "kernel."  # the prefix of a seed's kernel weights in its state_dict
