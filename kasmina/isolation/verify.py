"""Walk the autograd graph of a seed's output and tell whether it reaches a host parameter,
i.e. whether any gradient of that output could flow into the host.

A compiled region (``torch.compile`` with an AOT backend: ``aot_eager``, ``inductor``) runs its
whole backward as one autograd node, AOTAutograd's ``CompiledFunction``, whose inputs are every
parameter and activation the region read, whatever output a gradient comes from. A host
parameter reached only through such a node cannot be attributed to the seed's output:
``graph_isolation`` says so (None) instead of calling it a leak.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from kasmina.utils.autograd_nodes import compiled_node, nodes_below

logger = logging.getLogger(__name__)

__all__ = [
    "HostIndex",
    "NamedParams",
    "graph_isolation",
    "named_params",
    "reaches_host_beyond",
    "verify_gradient_isolation",
]


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


class HostIndex:
    """Named host parameters (distinct) and their id->name lookup, built once. Handed to
    :func:`graph_isolation` in place of the parameters, it spares the call rebuilding the
    lookup: a manager's monitors share one, so a step's graph checks cost the seeds' graphs,
    not seeds x host parameters. It holds its tensors, so their ids stay theirs."""

    __slots__ = ("_next", "names", "params")

    def __init__(self, params: list[tuple[str, torch.Tensor]]) -> None:
        self.params = params
        self.names = {id(p): name for name, p in params}
        # The last ``extended`` call's (key, its tensors, result): the monitors sharing this
        # index, extended alike when a seed fossilizes, share the result too.
        self._next: tuple[tuple[Any, ...], list[torch.Tensor], HostIndex] | None = None

    def __getstate__(self) -> list[tuple[str, torch.Tensor]]:
        return self.params

    def __setstate__(self, params: list[tuple[str, torch.Tensor]]) -> None:
        # A copy (``copy.deepcopy``, a pickle) holds tensors of its own: its lookup by their ids.
        self.__init__(params)  # type: ignore[misc]

    def extended(
        self,
        params: list[torch.Tensor],
        prefix: str,
        keep: Callable[[list[tuple[str, torch.Tensor]]], list[tuple[str, torch.Tensor]]],
    ) -> HostIndex:
        """This index plus those of ``params`` it lacks, named ``prefix[i]`` and filtered by
        ``keep``; the same object for the same call made again."""
        key = (prefix, keep, *map(id, params))
        if self._next is not None and self._next[0] == key:
            return self._next[2]
        new = named_params([p for p in params if id(p) not in self.names], prefix)
        index = HostIndex(self.params + keep(new))
        self._next = (key, params, index)
        return index


def graph_isolation(seed_output: torch.Tensor, host_params: NamedParams | HostIndex) -> bool | None:
    """True when no host parameter is reachable from ``seed_output``'s autograd graph; False
    when one is (a leak, logged); None when host parameters are reachable only through a
    compiled region's node (:func:`compiled_node`), so the graph cannot tell.

    Iterative walk over ``grad_fn.next_functions`` with a visited set; a host parameter shows up
    as the ``variable`` of an ``AccumulateGrad`` node (matched by identity). The first pass does
    not enter compiled nodes, so a path around them is still a leak; a second pass from the
    compiled nodes it met decides between True and None. ``host_params`` may be a
    :class:`HostIndex`, whose lookup is used as it is.
    """
    if not isinstance(seed_output, torch.Tensor):
        raise ValueError(f"seed_output must be a tensor, got {type(seed_output).__name__}")
    if isinstance(host_params, HostIndex):
        host = host_params.names
    else:
        host = {id(p): name for name, p in named_params(host_params, "host")}
    if id(seed_output) in host:
        logger.error(
            "gradient isolation: the seed output is host parameter %s", host[id(seed_output)]
        )
        return False
    # Nodes are kept referenced so their ids cannot be reused by fresh wrapper objects mid-walk.
    visited: dict[int, Any] = {}
    compiled: list[Any] = []
    found = _walk([seed_output.grad_fn], host, visited, compiled)
    if found is not None:
        name, node = found
        logger.error(
            "gradient isolation: seed output reaches host parameter %s through %s",
            name,
            type(node).__name__,
        )
        return False
    if not compiled:
        return True
    # Past a compiled node every path counts, compiled or not: none of it is attributable.
    beyond = [fn for node in compiled for fn, _ in node.next_functions]
    found = _walk(beyond, host, visited, None)
    if found is None:
        return True
    logger.debug(
        "gradient isolation: host parameter %s is reachable only through a compiled region's "
        "backward (%s); not attributable to the seed output",
        found[0],
        type(compiled[0]).__name__,
    )
    return None


def reaches_host_beyond(
    loss: torch.Tensor, host_params: Iterable[torch.Tensor], stop: Callable[[Any], bool]
) -> tuple[bool, list[Any]]:
    """``(beyond, stopped)``: whether ``loss``'s graph reaches one of ``host_params`` other
    than through the nodes ``stop`` holds (not entered), and the such nodes the walk met.
    A ``kd_loss`` handed to the manager, with the slots' collected KD losses as ``stop``
    (``kd.graph.is_kd_root``): one that reaches the host by another way (a distillation loss on
    the model's own output) trains the host, and ``stopped`` empty says it holds none of the
    seeds' losses. A node that hides what it read (a reentrant checkpoint's: its parameters are
    not its inputs) is a wall to this walk, as to :func:`graph_isolation`'s."""
    held: list[Any] = []
    host = {id(p): "" for p in host_params}
    found = _walk([loss.grad_fn], host, {}, held, stop)
    return found is not None, held


def _walk(
    stack: list[Any],
    host: dict[int, str],
    visited: dict[int, Any],
    held: list[Any] | None,
    hold: Callable[[Any], bool] = compiled_node,
) -> tuple[str, Any] | None:
    """(name, node) of the first host parameter reached from ``stack``, or None. With a
    ``held`` list, the nodes ``hold`` picks (compiled ones) are collected there, not entered."""

    def enter(node: Any) -> bool:
        if held is not None and hold(node):
            held.append(node)
            return False
        return True

    for node in nodes_below(stack, visited, enter):
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in host:
            return host[id(variable)], node
    return None


def verify_gradient_isolation(seed_output: torch.Tensor, host_params: NamedParams) -> bool:
    """True iff no host parameter is reachable from ``seed_output``'s autograd graph (logs the
    first one found). Conservative: a host parameter behind a compiled region's node counts as
    reachable (False); :func:`graph_isolation` tells that case apart (None)."""
    verdict = graph_isolation(seed_output, host_params)
    if verdict is None:
        logger.error(
            "gradient isolation: the seed output reaches host parameters through a compiled "
            "region's backward node; counted as reachable"
        )
    return verdict is True
