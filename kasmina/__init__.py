"""Kasmina: grafts trainable seeds into a live host network (docs/design.md).

The package namespace is import-light: ``import kasmina`` loads nothing but this file, and each
name below loads its module (and torch) on first use, so the CLI and protocol code start fast.

One name, one path (docs/design.md §1). Each name is defined in exactly one module: that
defining module is the implementation's path, the one Kasmina's own modules and their tests
import it from. A name in ``_PUBLIC`` below has one user path, ``kasmina.X``: the
README, the docs and the tests of the public API use it, and no subpackage ``__init__``
re-exports it. A subpackage ``__init__`` re-exports only its own documented user-facing names
that are not in this table (``from kasmina.ops import alpha_blend``; ``kasmina.leyline``'s
messages, whose defining module is generated); every other one re-exports nothing.

The subpackages, in their one-way import order (docs/design.md §1)::

    cli -> demo -> {manager | persist} -> {seeds | isolation | urza | control} -> kd -> ops
        -> utils -> {stages, errors, leyline}
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    # growing a model
    "attach": "kasmina.seeds.inject",
    "detach": "kasmina.seeds.inject",
    "GradientIsolatedSeed": "kasmina.seeds.seed",
    "KasminaLayer": "kasmina.seeds.layer",
    "GPUStateTensor": "kasmina.seeds.table",
    "SeedStage": "kasmina.stages",
    "KasminaKernelManager": "kasmina.manager.manager",
    "KasminaConfig": "kasmina.manager.config",
    "KDConfig": "kasmina.kd.config",
    # a training framework's loop (transformers' Trainer) driving the manager's step
    "ManagerOptimizer": "kasmina.manager.framework",
    "ManagerScheduler": "kasmina.manager.framework",
    # keeping what you grew
    "save": "kasmina.persist.saving",
    "load": "kasmina.persist.loading",
    "merge": "kasmina.persist.merging",
    # publishing artifacts
    "publish_artifact": "kasmina.urza.publish",
    "UrzaLibraryClient": "kasmina.urza.client",
    "PublisherKey": "kasmina.urza.keys",
    "TrustedPublishers": "kasmina.urza.keys",
    # keys and signed commands
    "Keyring": "kasmina.utils.keyring",
    "generate_key": "kasmina.utils.keyring",
    "sign_command": "kasmina.control.auth",
    "make_seed_command": "kasmina.control.builders",
    "make_rollback_command": "kasmina.control.builders",
    "make_optimizer_command": "kasmina.control.builders",
    # errors
    "KasminaError": "kasmina.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'kasmina' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public API only: not this file's helpers (``importlib``, ``Any``, ``_PUBLIC``) nor
    the subpackages an import has bound here."""
    return list(__all__)
