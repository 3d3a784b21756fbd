"""A seed's extra state as a tensor, so every ``state_dict`` consumer can carry it.

Why bytes in a tensor: ``state_dict`` consumers treat every value as a tensor (Hugging Face
reads ``.device``, safetensors stores only tensors), and ``torch.load(weights_only=True)`` reads
it back without unpickling anything but tensors.

What it holds (``seed_bookkeeping``), read and checked in full before anything is restored
(``parse_seed_state``), and restored (``restore_seed_state``); the random stream position a save
keeps and a copy or an unowned load goes on from. The rules a load checks a saved state by are
also the seed's setters' (``checked_setting``), so a seed never holds a value its own checkpoint
would refuse. Whether a saved state fits the live seed, and the ``load_state_dict`` hooks that
ask, are ``load_hooks``.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from kasmina.seeds.columns import fixed_point
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import SeedStage, StateColumn, checked_row, parse_stage
from kasmina.utils.checks import check_positive
from kasmina.utils.grad_modes import version_count
from kasmina.utils.signed_json import finite_number, strict_json_loads

__all__ = [
    "EXTRA_STATE_VERSION",
    "RestorableSeed",
    "SavedSeedState",
    "checked_schedule",
    "checked_setting",
    "copied_seed_state",
    "decode_extra_state",
    "encode_extra_state",
    "field_report",
    "forget_evaluation",
    "parse_seed_state",
    "restore_seed_state",
    "seed_bookkeeping",
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
    graphs), its kernel's calls in checkpoint regions (weak maps) nor its kernel's measurement
    (a GPU's events do not copy). A copy has no owner, so a position a manager moved
    (``draw_step``) would stand still there: one dropout mask at every step of a copy trained on
    its own. It starts at that position and moves on with its own updates, as an unowned load
    does (:func:`stream_position`)."""
    state.pop("_kernel_tree", None)
    state.pop("_kernel_runs", None)
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
    """Restore ``saved`` (checked: ``load_hooks.check_seed_state``) into ``seed``: its table
    row, alpha (host copy and buffer) and bookkeeping (the seed's ``set_extra_state``)."""
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


@runtime_checkable
class RestorableSeed(Protocol):
    """A module whose extra state ``load_hooks.check_seed_states`` checks (a seed)."""

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


def forget_evaluation(seed: torch.nn.Module, *_: Any) -> None:
    """Any load through a seed, its weights alone included, leaves G5 no measurement to
    fossilize it on: it is measured again first. (A load into its ``kernel`` module alone does
    not pass through it.)"""
    seed.evaluation = None  # type: ignore[attr-defined]
