"""A seed's extra state as a tensor, so every ``state_dict`` consumer can carry it.

Why bytes in a tensor: ``state_dict`` consumers treat every value as a tensor (Hugging Face
reads ``.device``, safetensors stores only tensors), and ``torch.load(weights_only=True)`` reads
it back without unpickling anything but tensors.

The rules a load checks a saved state by are also the seed's setters' (``checked_setting``), so
a seed never holds a value its own checkpoint would refuse.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from kasmina.ops.backend import check_positive
from kasmina.seeds.table import GPUStateTensor, fixed_point
from kasmina.stages import RUNS_KERNEL, SeedStage, StateColumn, checked_row, parse_stage
from kasmina.utils.grad_modes import version_count
from kasmina.utils.signed_json import finite_number, strict_json_loads
from kasmina.utils.state_io import other_shapes

__all__ = [
    "EXTRA_STATE_VERSION",
    "RestorableSeed",
    "SavedSeedState",
    "check_seed_kernel_keys",
    "check_seed_state",
    "check_seed_states",
    "checked_schedule",
    "checked_setting",
    "copied_seed_state",
    "decode_extra_state",
    "encode_extra_state",
    "field_report",
    "forget_evaluation",
    "owner_restore",
    "parse_seed_state",
    "restore_seed_state",
    "seed_bookkeeping",
    "seed_load_pre_hook",
    "stream_position",
]

# Version of the encoded extra state; decode_extra_state refuses any other.
EXTRA_STATE_VERSION = 1
# The encoded state is this many bytes, padded with spaces (a seed's is a few hundred; the oldest
# fault reasons are left out to fit), so its length does not change from one step to the next:
# an EMA that copies every non-float entry of one state_dict into another's (timm's
# ModelEmaV2/V3) copies like into like. A state that cannot fit (a seed id of kilobytes) takes
# the next multiple.
EXTRA_STATE_BYTES = 2048
# Bytes kept free beside a state's fixed fields for its numbers to grow into.
_NUMBERS_ROOM = 512
# The most a state may take when it is read back (a crafted 100 MB one cost a second and
# nine times its size to decode); far above any seed's, a seed id of kilobytes included.
MAX_EXTRA_STATE_BYTES = 1 << 20


def encode_extra_state(state: Mapping[str, Any]) -> torch.Tensor:
    """``state`` (JSON-able primitives) as a 1-D uint8 CPU tensor of its UTF-8 JSON, padded with
    spaces to ``EXTRA_STATE_BYTES`` (the oldest of a ``fault_log``'s reasons left out to fit).

    Why bytes in a tensor: ``state_dict`` consumers treat every value as a tensor (Hugging
    Face reads ``.device``, safetensors stores only tensors), and ``torch.load(weights_only=
    True)`` reads it back without unpickling anything but tensors.
    """
    full = {"version": EXTRA_STATE_VERSION, **state}
    log = list(full.get("fault_log") or ())
    # The size: what holds the state without its log and room for its numbers to grow (a
    # float's repr, a counter's digits), so that it stays one size; EXTRA_STATE_BYTES but for
    # a seed id of kilobytes.
    data = json.dumps(full, sort_keys=True).encode("utf-8")
    bare = len(data) - len(json.dumps(log).encode("utf-8")) + 2  # the log written as []
    size = -(-(bare + _NUMBERS_ROOM) // EXTRA_STATE_BYTES) * EXTRA_STATE_BYTES
    while len(data) > size and log:  # the oldest reasons first; the count stays in "faults"
        full["fault_log"] = log = log[1:]
        data = json.dumps(full, sort_keys=True).encode("utf-8")
    data += b" " * (size - len(data))  # JSON allows trailing whitespace
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def decode_extra_state(value: torch.Tensor | Mapping[str, Any]) -> dict[str, Any]:
    """The dict :func:`encode_extra_state` encoded; a dict (the form of checkpoints written
    before the encoding) is returned as a copy. Raises ``ValueError`` on anything else."""
    if isinstance(value, Mapping):
        return dict(value)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise ValueError(f"a seed's extra state is a 1-D uint8 tensor, got {value!r:.80}")
    if value.numel() > MAX_EXTRA_STATE_BYTES:  # read (and parsed) whole: bounded first
        raise ValueError(
            f"a seed's extra state is {value.numel()} bytes, above {MAX_EXTRA_STATE_BYTES}"
        )
    try:
        # NaN is allowed (a gate score may be one); a duplicated key or deep nesting is not.
        text = value.detach().cpu().numpy().tobytes().decode("utf-8")
        state = strict_json_loads(text, allow_nan=True)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"a seed's extra state is not valid JSON: {exc}") from None
    if not isinstance(state, dict):
        raise ValueError(f"a seed's extra state is a JSON object, got {type(state).__name__}")
    if state.get("version") != EXTRA_STATE_VERSION:
        raise ValueError(f"unsupported seed extra state (version {state.get('version')!r})")
    return state


def copied_seed_state(state: dict[str, Any]) -> dict[str, Any]:
    """A seed's ``__dict__`` as a deep copy or a pickle of it takes it (``__getstate__``): no
    cache of its kernel's modules (rebuilt on use), none of this step's KD losses (with their
    graphs) nor its kernel's measurement (a GPU's events do not copy). A copy has no owner, so
    a position a manager moved (``draw_step``) would stand still there: one dropout mask at
    every step of a copy trained on its own. It starts at that position and moves on with its
    own updates, as an unowned load does (:func:`stream_position`)."""
    state.pop("_kernel_tree", None)
    state["_kd_losses"], state["probe_result"] = [], None
    if state.get("_loaded_draws") is None and state.get("draw_step") is not None:
        state["_loaded_draws"], state["draw_step"] = [state["draw_step"], None], None
    return state


def stream_position(loaded: list[int | None], kernel: torch.nn.Module) -> int | None:
    """The random stream position (``side_effects.own_stream``) of a seed ``kasmina.load`` restored
    without a manager (``loaded``: its saved position, and its kernel's version count at its
    first forward since): the saved position moved on by every parameter update since, so the
    loaded model draws what the saved one drew until it is trained, and anew at each step
    after. None when nothing was saved: the versions alone key the stream."""
    if loaded[0] is None:
        return None
    versions = sum(version_count(p) for p in kernel.parameters())
    if loaded[1] is None:  # the load moved them itself: counted from the first forward on
        loaded[1] = versions
    return loaded[0] + versions - loaded[1]


def saved_position(seed: BookkeptSeed) -> int | None:
    """The stream position a save keeps: the manager's, else the one an unowned load or copy
    went on from (:func:`stream_position`, not started by this read: no forward since, it is
    the loaded one), else the kernel's version count that keys a seed no one ever managed. A
    loaded model saved again, or its own ``state_dict`` loaded back, draws on as it did."""
    loaded = seed.__dict__.get("_loaded_draws")
    if seed.draw_step is not None:
        return seed.draw_step
    if loaded is None or loaded[0] is None:  # keyed on the versions (``own_stream``)
        kernel = seed.kernel
        return None if kernel is None else sum(version_count(p) for p in kernel.parameters())
    if loaded[1] is None or seed.kernel is None:
        return loaded[0]
    return loaded[0] + sum(version_count(p) for p in seed.kernel.parameters()) - loaded[1]


def seed_bookkeeping(seed: BookkeptSeed) -> dict[str, Any]:
    """What a seed's ``get_extra_state`` saves (JSON-able): its state-table row and the
    bookkeeping the seed keeps beside it."""
    return {
        "seed_id": seed.seed_id,
        "chunk_size": seed.chunk_size,
        "row": list(seed.state_table.read_row(seed.state_index).values()),
        "alpha": seed.alpha_value,
        "graft_step": seed.graft_step,
        "draw_step": saved_position(seed),
        "trained_epochs": seed.trained_epochs,
        "trained_this_epoch": seed.trained_this_epoch,
        "gate_score": seed.gate_score,
        "performance_gate": seed.performance_gate,
        "isolation_violations": seed.isolation_violations,
        "nonfinite_events": seed.nonfinite_events,
        "faults": seed.faults,
        "fault_log": list(seed.fault_log),
        "has_kernel": seed.kernel is not None,
    }


@dataclass(frozen=True)
class SavedSeedState:
    """A seed's saved bookkeeping, every value read and checked (nothing applied yet)."""

    alpha: float
    graft_step: int | None  # the GRAFTING schedule's step; absent from older states
    draw_step: int | None  # a random kernel's stream position (None: unmanaged, or older)
    trained_epochs: int  # G2's evidence (older states: see parse_seed_state)
    trained_this_epoch: bool
    gate_score: float
    performance_gate: float
    isolation_violations: int
    nonfinite_events: int
    faults: int
    fault_log: tuple[str, ...]
    row: tuple[float, ...]
    stage: SeedStage
    chunk_size: int | None  # absent from states saved before it was recorded
    has_kernel: bool | None  # likewise


def parse_seed_state(value: torch.Tensor | Mapping[str, Any], seed_id: str) -> SavedSeedState:
    """What a seed's ``get_extra_state`` saved, read and checked before anything is restored
    (``ValueError`` names the bad field): a malformed state changes nothing."""
    try:
        state = decode_extra_state(value)
    except ValueError as exc:
        raise ValueError(f"seed {seed_id}: {exc}") from None
    field = ""
    try:
        field = "faults"
        faults = _count(state.get("faults", 0))  # absent from states saved before fault counting
        field = "fault_log"
        saved_log = state.get("fault_log", ())
        if not isinstance(saved_log, list | tuple):
            raise ValueError(f"must be a list, got {saved_log!r:.80}")
        field = "row"
        row = checked_row(state["row"])  # what restore_row would refuse, refused before a load
        stage = parse_stage(row[StateColumn.LIFECYCLE_STAGE])
        values: dict[str, Any] = {}
        for field in ("alpha", "gate_score", "performance_gate"):
            values[field] = _number(state[field], field)
        for field in ("isolation_violations", "nonfinite_events"):
            values[field] = _count(state[field])
        field = "graft_step"
        step = state.get("graft_step")
        graft_step = None if step is None else _count(step)
        field = "draw_step"
        draws = state.get("draw_step")
        draw_step = None if draws is None else _count(draws)
        field = "trained_epochs"
        trained = state.get("trained_epochs")
        isolated, older = stage == SeedStage.ISOLATED_INIT, trained is None
        if older:
            # Saved before G2 counted the epochs the seed trained: every epoch in ISOLATED_INIT
            # counts as trained (what G2 assumed then), the one under way too, so a checkpoint
            # taken before its boundary's tick resumes to the verdict the run would have had.
            trained = int(row[StateColumn.EPOCHS_IN_STATE]) if isolated else 0
        trained_epochs = _count(trained)
        field = "trained_this_epoch"
        trained_this_epoch = state.get("trained_this_epoch", isolated and older)
        if not isinstance(trained_this_epoch, bool):
            raise ValueError(f"must be true or false, got {trained_this_epoch!r:.80}")
        field = "chunk_size"
        chunk = state.get("chunk_size")
        chunk_size = None if chunk is None else int(chunk)
        field = "has_kernel"
        has_kernel = state.get("has_kernel")
        if has_kernel is not None and not isinstance(has_kernel, bool):
            raise ValueError(f"must be true or false, got {has_kernel!r:.80}")
    except KeyError:
        raise ValueError(f"seed {seed_id}: the saved state has no {field!r}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"seed {seed_id}: saved {field!r}: {exc}") from None
    return SavedSeedState(
        **values,
        faults=faults,
        graft_step=graft_step,
        draw_step=draw_step,
        trained_epochs=trained_epochs,
        trained_this_epoch=trained_this_epoch,
        fault_log=tuple(str(reason) for reason in saved_log),
        row=tuple(row),
        stage=stage,
        chunk_size=chunk_size,
        has_kernel=has_kernel,
    )


def _number(value: object, field: str) -> float:
    """``value`` as the float ``field`` holds: ``alpha`` in [0, 1], a finite ``performance_gate``
    (an infinite one would pass or refuse every seed at G5), a ``gate_score`` that is a number
    (NaN allowed: it is only reported)."""
    if field == "gate_score" and isinstance(value, float) and math.isnan(value):
        return value
    if not finite_number(value):  # a bool, a string, inf, or an int past a float's range
        raise ValueError(f"must be a finite number, got {value!r:.80}")
    number = float(value)  # type: ignore[arg-type]
    if field == "alpha" and not 0.0 <= number <= 1.0:
        raise ValueError(f"must be in [0, 1], got {number}")
    if field != "alpha":  # the other two have int32 fixed-point columns in the table
        fixed_point(number)
    return number


def _count(value: object) -> int:
    """``value`` as an int in [0, 2**63) (a bool or a float is not a count; a crafted huge one
    would overflow where the count meets a float or a tensor)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(f"must be an int in [0, 2**63), got {value!r:.80}")
    return value


def checked_setting(seed_id: str, field: str, value: object) -> Any:
    """``value`` as the seed's ``field`` stores it (``gate_score``, ``performance_gate``: a
    float; ``graft_step``: an int), checked by the rule a load applies
    (:func:`parse_seed_state`): a setter keeps nothing its own checkpoint would refuse.
    ``ValueError`` names the field; the caller changes nothing before this passes."""
    try:
        if field == "graft_step":
            index = hasattr(value, "__index__") and not isinstance(value, bool)
            return _count(operator.index(value) if index else value)  # type: ignore[arg-type]
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)  # a NumPy float; an int past a float's range: OverflowError
        return _number(value, field)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"seed {seed_id}: {field} {exc}") from None


def checked_schedule(seed_id: str, step: object, total_steps: object, temperature: object) -> int:
    """``update_alpha_blending``'s arguments, all checked before the seed changes: the step as
    ``graft_step`` (:func:`checked_setting`), a finite ``total_steps`` and ``temperature`` > 0
    (an infinite one pinned alpha at 0 or 0.5; a NaN failed after ``graft_step`` moved)."""
    for name, value in (("total_steps", total_steps), ("temperature", temperature)):
        try:  # the ops' own check; an int past a float's range is no finite number either
            math.isfinite(check_positive(name, value))
        except (ValueError, OverflowError):
            raise ValueError(
                f"seed {seed_id}: {name} must be a finite number > 0, got {value!r:.80}"
            ) from None
    return checked_setting(seed_id, "graft_step", step)


def restore_seed_state(seed: Any, saved: SavedSeedState) -> None:
    """Restore ``saved`` (checked: ``check_seed_state``) into ``seed``: its table row, alpha
    (host copy and buffer) and bookkeeping (the seed's ``set_extra_state``)."""
    forget_evaluation(seed)  # measured on weights this load may have replaced
    seed.state_table.restore_row(seed.state_index, list(saved.row))
    seed._alpha_value = saved.alpha
    if not seed.alpha.is_meta:  # the blend's, after the buffers: the lifecycle's alpha
        seed.alpha.fill_(saved.alpha)
    if saved.graft_step is not None:  # absent from states saved before it was recorded
        seed.graft_step = saved.graft_step
    owned = seed.state_table.owned(seed.state_index)  # unowned: its versions move it on
    seed.draw_step = saved.draw_step if owned else None
    seed._loaded_draws = None if owned else [saved.draw_step, None]
    seed.trained_epochs = saved.trained_epochs
    seed.trained_this_epoch = saved.trained_this_epoch
    seed._gate_score = saved.gate_score
    seed._performance_gate = saved.performance_gate
    seed.isolation_violations = saved.isolation_violations
    seed.nonfinite_events = saved.nonfinite_events
    seed.faults = saved.faults
    seed.fault_log.clear()
    seed.fault_log.extend(saved.fault_log)


def field_report(seed: BookkeptSeed, old: SeedStage) -> dict[str, Any]:
    """What a seed entering HARVESTING from ``old`` leaves behind (its ``field_report``)."""
    return {
        "seed_id": seed.seed_id,
        "from_stage": old.name,
        "alpha": seed.alpha_value,
        "gate_score": seed.gate_score,
        "isolation_violations": seed.isolation_violations,
        "nonfinite_events": seed.nonfinite_events,
        "faults": seed.faults,
        "last_fault": seed.fault_log[-1] if seed.fault_log else "",
    }


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


@runtime_checkable
class RestorableSeed(Protocol):
    """A module whose extra state :func:`check_seed_states` checks (a seed)."""

    seed_id: str
    chunk_size: int
    state_table: GPUStateTensor
    state_index: int

    @property
    def stage(self) -> SeedStage: ...

    def check_state(self, state: torch.Tensor | Mapping[str, Any]) -> SavedSeedState: ...


class BookkeptSeed(RestorableSeed, Protocol):
    """A seed as :func:`seed_bookkeeping` reads it (the seed module, without importing it)."""

    alpha_value: float
    graft_step: int
    draw_step: int | None
    trained_epochs: int
    trained_this_epoch: bool
    gate_score: float
    performance_gate: float
    isolation_violations: int
    nonfinite_events: int
    faults: int
    fault_log: Any
    kernel: torch.nn.Module | None


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


def forget_evaluation(seed: torch.nn.Module, *_: Any) -> None:
    """Any load through a seed, its weights alone included, leaves G5 no measurement to
    fossilize it on: it is measured again first. (A load into its ``kernel`` module alone does
    not pass through it.)"""
    seed.evaluation = None  # type: ignore[attr-defined]


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
