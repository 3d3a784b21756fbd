"""Facts about autograd nodes that the graph walks (isolation checks, the KD cut) share, and a
backward that fills the leaves' gradients without running their accumulators, for where
``DistributedDataParallel`` may hook them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.autograd.graph import GradientEdge

from kasmina.utils.process_group import process_group_active

__all__ = [
    "backward_beside_ddp",
    "backward_into_leaves",
    "compiled_node",
    "leaves_below",
    "nodes_below",
    "reentrant_node",
]


def compiled_node(node: Any) -> bool:
    """Whether ``node`` is the backward of a compiled region (AOTAutograd's
    ``CompiledFunction``): one node for a whole graph, its inputs not attributable to any one
    of its outputs."""
    if type(node).__name__ == "CompiledFunctionBackward":
        return True
    forward = getattr(node, "_forward_cls", None)  # a custom autograd.Function's backward
    module = getattr(forward, "__module__", None) or ""
    return module.startswith("torch._functorch._aot_autograd")


def reentrant_node(node: Any) -> bool:
    """Whether ``node`` is a reentrant activation checkpoint's (``use_reentrant=True``): its
    backward runs a backward of its own into parameters that are not its inputs, and refuses
    ``torch.autograd.grad``."""
    forward = getattr(node, "_forward_cls", None)
    return forward is not None and forward.__name__ == "CheckpointFunction"


def nodes_below(
    stack: list[Any], visited: dict[int, Any], enter: Callable[[Any], bool] | None = None
) -> Iterator[Any]:
    """Each autograd node reachable from ``stack`` once (``visited``, shared by the walks of
    one check, holds them: their ids stay unique), depth first; a node ``enter`` refuses is
    yielded but not entered. A caller that stops early leaves the rest on ``stack``."""
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited[id(node)] = node
        yield node
        if enter is None or enter(node):
            stack.extend(fn for fn, _ in getattr(node, "next_functions", ()))


def leaves_below(roots: Sequence[Any]) -> list[torch.Tensor] | None:
    """The leaf tensors requiring a gradient (``AccumulateGrad`` nodes' variables) that a
    backward from the autograd nodes ``roots`` reaches, once each, in the order found; None
    when it passes a reentrant checkpoint's node, which hides the leaves behind it."""
    leaves: dict[int, torch.Tensor] = {}
    for node in nodes_below(list(roots), {}):
        variable = getattr(node, "variable", None)
        if variable is not None:
            if variable.requires_grad:
                leaves.setdefault(id(variable), variable)
        elif reentrant_node(node):
            return None
    return list(leaves.values())


def backward_into_leaves(
    outputs: Sequence[torch.Tensor | GradientEdge],
    grad_outputs: Sequence[torch.Tensor] | None = None,
    *,
    retain_graph: bool,
) -> None:
    """``torch.autograd.backward(outputs, grad_outputs, retain_graph=...)``: the same gradients
    added to the same leaves' ``.grad``, but taken with ``torch.autograd.grad`` over those
    leaves (``leaves_below``), so no leaf's ``AccumulateGrad`` node runs, nor the hooks on it:
    ``DistributedDataParallel``'s reducer marks a parameter ready there, once per backward, and
    a second backward that reaches it (the host's own, after a seed-only one) raised torch's
    "Expected to mark a variable ready only once". Tensor hooks (``register_hook``) still see
    each gradient; post-accumulate-grad hooks do not. A graph that reaches no such leaf goes to
    torch's own backward (nothing to add; its own error for a loss without a graph), and so
    does one through a reentrant checkpoint (``reentrant_node``: its leaves are hidden, and
    ``torch.autograd.grad`` is refused there), accumulators and their hooks run as ever."""
    roots = [o.node if isinstance(o, GradientEdge) else o.grad_fn for o in outputs]
    leaves = leaves_below(roots)
    if not leaves:
        torch.autograd.backward(list(outputs), grad_outputs, retain_graph=retain_graph)
        return
    grads = torch.autograd.grad(
        list(outputs), leaves, grad_outputs, retain_graph=retain_graph, allow_unused=True
    )
    with torch.no_grad():
        for leaf, grad in zip(leaves, grads, strict=True):
            if grad is None:
                continue
            if leaf.grad is None:  # its own copy, laid out as the leaf (as AccumulateGrad's)
                fresh = grad.clone() if grad.is_sparse else torch.empty_like(leaf).copy_(grad)
                leaf.grad = fresh
            elif leaf.grad.is_sparse:
                leaf.grad = leaf.grad + grad
            else:
                leaf.grad.add_(grad)


def backward_beside_ddp(
    outputs: Sequence[torch.Tensor | GradientEdge],
    grad_outputs: Sequence[torch.Tensor] | None = None,
    *,
    retain_graph: bool,
) -> None:
    """A backward that ``DistributedDataParallel``'s reducer does not see: ``backward_into_leaves``
    where a default process group is up (DDP cannot run without one), else torch's own
    ``torch.autograd.backward``, the same gradients added to the same ``.grad``. Without a
    group no reducer hooks an accumulator, and the engine finds the leaves itself: the walk of
    every node in Python (``leaves_below``) is not paid on every step."""
    if process_group_active():
        backward_into_leaves(outputs, grad_outputs, retain_graph=retain_graph)
    else:
        torch.autograd.backward(list(outputs), grad_outputs, retain_graph=retain_graph)
