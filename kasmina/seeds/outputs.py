"""Which tensor of a host module's output a slot's seeds apply to, and putting it back.

A host's forward may return a tensor, a tuple or list (an attention module's ``(output,
weights)``), a namedtuple, or a dataclass such as a Hugging Face ``ModelOutput``. The seeds
apply to the element at the slot's ``output_index``; everything else passes through untouched,
and the output keeps its type.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["output_element", "replace_output_element"]


def output_element(out: Any, index: int) -> Any:
    """The element of ``out`` at ``index`` (a tensor output is its own element 0), or None when
    there is none; anything that is not a container is returned as it is."""
    if isinstance(out, torch.Tensor):
        return out if index == 0 else None
    if isinstance(out, tuple | list):
        return out[index] if -len(out) <= index < len(out) else None
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        names = _present_fields(out)
        return getattr(out, names[index]) if -len(names) <= index < len(names) else None
    return out


def replace_output_element(out: Any, index: int, new: torch.Tensor) -> Any:
    """``out`` with its element at ``index`` replaced by ``new``, of the same type."""
    if isinstance(out, torch.Tensor):
        return new
    if isinstance(out, list):
        return [new if j == index % len(out) else item for j, item in enumerate(out)]
    if isinstance(out, tuple):
        items = tuple(new if j == index % len(out) else item for j, item in enumerate(out))
        return type(out)(*items) if hasattr(out, "_fields") else items  # namedtuples
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return dataclasses.replace(out, **{_present_fields(out)[index]: new})  # type: ignore[type-var]
    return new


def _present_fields(out: Any) -> list[str]:
    """A dataclass output's fields that hold a value, in order: what ``ModelOutput`` indexes."""
    return [f.name for f in dataclasses.fields(out) if getattr(out, f.name) is not None]
