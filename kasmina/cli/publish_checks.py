"""What ``kasmina urza publish`` checks before it builds, exports or signs anything: the
example input's shape and size, a ``--builtin`` module's size, the user's ``--factory``
(imported, called, checked to return an ``nn.Module``, each failure one line), and the size of
what it would sign: no more than an Urza client fetches."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import TYPE_CHECKING

from kasmina.cli.common import CLIError, one_line

if TYPE_CHECKING:  # imported lazily at run time so that --help stays instant
    import torch
    from torch import nn

    from kasmina.urza.blueprints import Blueprint

__all__ = [
    "MAX_BUILD_BYTES",
    "check_builtin_size",
    "check_example_size",
    "check_module_size",
    "check_payload_size",
    "load_factory",
    "parse_shape",
]

# The most bytes publish builds for a --builtin module's parameters or an example input, and
# signs as a payload: what an Urza client fetches at most by default (UrzaLibraryClient
# max_artifact_bytes, 1 GiB), above which every verify and GERMINATE refuses the artifact.
MAX_BUILD_BYTES = 1 << 30


def check_builtin_size(blueprint: Blueprint, args: argparse.Namespace, dtype: torch.dtype) -> None:
    """Refuse a ``--builtin`` module whose parameters, in ``dtype`` (what it is published in),
    exceed ``MAX_BUILD_BYTES``, measured on the meta device, where nothing is allocated."""
    import torch

    widths = f"--dim {args.dim}" + (f" --hidden {args.hidden}" if args.hidden else "")
    try:
        with torch.device("meta"):
            probe = blueprint.build(args.dim, args.hidden)
    except (RuntimeError, OverflowError, TypeError) as exc:  # sizes torch cannot index
        raise CLIError(f"{blueprint.name} with {widths} is too large: {one_line(exc)}") from None
    size = sum(p.numel() * dtype.itemsize for p in probe.parameters())
    if size > MAX_BUILD_BYTES:
        raise CLIError(
            f"{blueprint.name} with {widths} would have {size} bytes of parameters, above "
            f"the {MAX_BUILD_BYTES} bytes an Urza client fetches; choose smaller widths"
        )


def check_module_size(module: nn.Module, name: str) -> None:
    """Refuse a module whose parameters alone exceed ``MAX_BUILD_BYTES`` before it is
    exported (an export of a module that large takes minutes and several times its memory):
    each is in the payload. Run after the trial run, which gives a lazy module its sizes."""
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    if size > MAX_BUILD_BYTES:
        raise CLIError(
            f"{name} has {size} bytes of parameters, above the {MAX_BUILD_BYTES} bytes an Urza "
            "client fetches; nothing published"
        )


def check_payload_size(size: int, name: str) -> None:
    """Refuse an exported payload above ``MAX_BUILD_BYTES`` before it is signed or written:
    an artifact no client fetches (``kasmina urza verify`` and every GERMINATE refuse it)."""
    if size > MAX_BUILD_BYTES:
        raise CLIError(
            f"{name} exported to {size} bytes, above the {MAX_BUILD_BYTES} bytes an Urza "
            "client fetches; nothing published"
        )


def check_example_size(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Refuse an example input above ``MAX_BUILD_BYTES``: one small batch is all export needs."""
    size = math.prod(shape) * dtype.itemsize
    if size > MAX_BUILD_BYTES:
        dims = ",".join(map(str, shape))
        raise CLIError(
            f"example input shape {dims} would take {size} bytes, above {MAX_BUILD_BYTES}; "
            "an example needs only a small batch (e.g. --input-shape 8,16)"
        )


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise CLIError(f"bad --input-shape {text!r}: expected comma-separated ints") from None
    if not shape or any(d < 1 for d in shape):
        raise CLIError(f"bad --input-shape {text!r}: dimensions must be positive")
    if len(shape) > 1 and shape[0] == 1:  # other sizes of 1 may be the slot's own (a channel)
        raise CLIError(
            f"bad --input-shape {text!r}: torch.export fixes a size of 1, so the kernel would "
            "take batches of 1 only; give a batch of 2 or more"
        )
    return shape


def load_factory(spec: str) -> nn.Module:
    import importlib

    from torch import nn

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"bad --factory {spec!r}: expected MODULE:CALLABLE")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # the user's module: any error importing it (an
        # exit() in it too: a silent exit 0 would read as a publish that succeeded)
        raise CLIError(
            f"cannot import {module_name!r}: {type(exc).__name__}: {one_line(exc)}"
        ) from None
    factory = target
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise CLIError(f"{module_name!r} has no attribute {attr!r}")
    try:
        module = factory() if callable(factory) else None
    except (Exception, SystemExit) as exc:  # the user's callable failed (or exited)
        raise CLIError(f"calling {spec} failed: {type(exc).__name__}: {one_line(exc)}") from None
    if not isinstance(module, nn.Module):
        raise CLIError(f"{spec} did not return an nn.Module")
    return module
