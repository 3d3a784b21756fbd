"""Kasmina: grafts trainable seeds into a live host network (see DESIGN.md).

The package namespace is import-light: the names below load their module (and torch) on first
use, so ``import kasmina`` stays cheap for the CLI and the protocol code.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "attach": "kasmina.inject",
    "detach": "kasmina.inject",
    "GradientIsolatedSeed": "kasmina.seeds",
    "KasminaLayer": "kasmina.layer",
    "GPUStateTensor": "kasmina.lifecycle",
    "KasminaKernelManager": "kasmina.manager",
    "KasminaConfig": "kasmina.config",
    "KDConfig": "kasmina.kd",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kasmina' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
