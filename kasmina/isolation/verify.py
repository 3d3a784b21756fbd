"""``verify_gradient_isolation``: walk the autograd graph of a seed's output and fail if it
reaches a host parameter, i.e. if any gradient of that output could flow into the host."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["NamedParams", "named_params", "verify_gradient_isolation"]


NamedParams = Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Mapping[str, Any]


def named_params(params: NamedParams, prefix: str) -> list[tuple[str, torch.Tensor]]:
    """Accept tensors, ``named_parameters()`` pairs or a name->tensor mapping."""
    items = params.items() if isinstance(params, Mapping) else params
    out: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for index, item in enumerate(items):
        name, tensor = item if isinstance(item, tuple) else (f"{prefix}[{index}]", item)
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{prefix} parameters must be tensors, got {type(tensor).__name__}")
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out.append((str(name), tensor))
    return out


def verify_gradient_isolation(seed_output: torch.Tensor, host_params: NamedParams) -> bool:
    """True iff no host parameter is reachable from ``seed_output``'s autograd graph.

    Iterative walk over ``grad_fn.next_functions`` with a visited set; a host parameter shows up
    as the ``variable`` of an ``AccumulateGrad`` node (matched by identity). Logs the first host
    parameter found.
    """
    if not isinstance(seed_output, torch.Tensor):
        raise ValueError(f"seed_output must be a tensor, got {type(seed_output).__name__}")
    host = {id(p): name for name, p in named_params(host_params, "host")}
    if id(seed_output) in host:
        logger.error(
            "gradient isolation: the seed output is host parameter %s", host[id(seed_output)]
        )
        return False
    # Nodes are kept referenced so their ids cannot be reused by fresh wrapper objects mid-walk.
    visited: dict[int, Any] = {}
    stack = [seed_output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited[id(node)] = node
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in host:
            logger.error(
                "gradient isolation: seed output reaches host parameter %s through %s",
                host[id(variable)],
                type(node).__name__,
            )
            return False
        stack.extend(fn for fn, _ in getattr(node, "next_functions", ()))
    return True
