"""A seed's extra state as a tensor, so every ``state_dict`` consumer can carry it.

Why bytes in a tensor: ``state_dict`` consumers treat every value as a tensor (Hugging Face
reads ``.device``, safetensors stores only tensors), and ``torch.load(weights_only=True)`` reads
it back without unpickling anything but tensors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from kasmina.stages import SeedStage, StateColumn, parse_stage

__all__ = [
    "EXTRA_STATE_VERSION",
    "RestorableSeed",
    "SavedSeedState",
    "check_seed_states",
    "decode_extra_state",
    "encode_extra_state",
    "parse_seed_state",
]

# Version of the encoded extra state; decode_extra_state refuses any other.
EXTRA_STATE_VERSION = 1


def encode_extra_state(state: Mapping[str, Any]) -> torch.Tensor:
    """``state`` (JSON-able primitives) as a 1-D uint8 CPU tensor of its UTF-8 JSON.

    Why bytes in a tensor: ``state_dict`` consumers treat every value as a tensor (Hugging
    Face reads ``.device``, safetensors stores only tensors), and ``torch.load(weights_only=
    True)`` reads it back without unpickling anything but tensors.
    """
    text = json.dumps({"version": EXTRA_STATE_VERSION, **state}, sort_keys=True)
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def decode_extra_state(value: torch.Tensor | Mapping[str, Any]) -> dict[str, Any]:
    """The dict :func:`encode_extra_state` encoded; a dict (the form of checkpoints written
    before the encoding) is returned as a copy. Raises ``ValueError`` on anything else."""
    if isinstance(value, Mapping):
        return dict(value)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise ValueError(f"a seed's extra state is a 1-D uint8 tensor, got {value!r:.80}")
    try:
        state = json.loads(bytes(value.detach().cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"a seed's extra state is not valid JSON: {exc}") from None
    if not isinstance(state, dict):
        raise ValueError(f"a seed's extra state is a JSON object, got {type(state).__name__}")
    if state.get("version") != EXTRA_STATE_VERSION:
        raise ValueError(f"unsupported seed extra state (version {state.get('version')!r})")
    return state


@dataclass(frozen=True)
class SavedSeedState:
    """A seed's saved bookkeeping, every value read and checked (nothing applied yet)."""

    alpha: float
    gate_score: float
    performance_gate: float
    isolation_violations: int
    nonfinite_events: int
    faults: int
    fault_log: tuple[str, ...]
    row: tuple[float, ...]
    stage: SeedStage
    chunk_size: int | None  # absent from states saved before it was recorded


def parse_seed_state(value: torch.Tensor | Mapping[str, Any], seed_id: str) -> SavedSeedState:
    """What a seed's ``get_extra_state`` saved, read and checked before anything is restored
    (``ValueError`` names the bad field): a malformed state changes nothing."""
    state = decode_extra_state(value)
    field = ""
    try:
        field = "faults"
        faults = int(state.get("faults", 0))  # absent from states saved before fault counting
        if faults < 0:
            raise ValueError(f"must be >= 0, got {faults}")
        field = "fault_log"
        saved_log = state.get("fault_log", ())
        if not isinstance(saved_log, list | tuple):
            raise ValueError(f"must be a list, got {saved_log!r:.80}")
        field = "row"
        row = state["row"]
        if not isinstance(row, list | tuple) or len(row) != len(StateColumn):
            raise ValueError(f"a state row has {len(StateColumn)} columns")
        stage = parse_stage(int(row[StateColumn.LIFECYCLE_STAGE]))
        values: dict[str, Any] = {}
        for field in ("alpha", "gate_score", "performance_gate"):
            values[field] = float(state[field])
        for field in ("isolation_violations", "nonfinite_events"):
            values[field] = int(state[field])
        field = "chunk_size"
        chunk = state.get("chunk_size")
        chunk_size = None if chunk is None else int(chunk)
    except KeyError:
        raise ValueError(f"seed {seed_id}: the saved state has no {field!r}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"seed {seed_id}: saved {field!r}: {exc}") from None
    return SavedSeedState(
        **values,
        faults=faults,
        fault_log=tuple(str(reason) for reason in saved_log),
        row=tuple(row),
        stage=stage,
        chunk_size=chunk_size,
    )


@runtime_checkable
class RestorableSeed(Protocol):
    """A module whose extra state :func:`check_seed_states` checks (a seed)."""

    def check_state(self, state: torch.Tensor | Mapping[str, Any]) -> SavedSeedState: ...


def check_seed_states(
    module: torch.nn.Module, state_dict: Mapping[str, Any], prefix: str, *_: Any
) -> None:
    """A ``load_state_dict`` pre-hook: every seed under ``module`` checks the state it is about
    to receive (``ValueError`` if one cannot take it) before any module loads anything, so a
    refused load leaves the whole model as it was, not half loaded."""
    for name, sub in module.named_modules():
        if isinstance(sub, RestorableSeed):
            value = state_dict.get(prefix + (f"{name}." if name else "") + _EXTRA_STATE)
            if value is not None:
                sub.check_state(value)


_EXTRA_STATE = "_extra_state"  # the key torch gives a module's get_extra_state()
