"""Facts about autograd nodes that the graph walks (isolation checks, the KD cut) share, a
backward that fills the leaves' gradients without running their accumulators, for where
``DistributedDataParallel`` may hook them, and the engine's own entry that the guarded seed
backward calls (``engine_grad``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.autograd.graph import GradientEdge
from torch.overrides import has_torch_function

from kasmina.utils.grad_modes import in_grad_mode
from kasmina.utils.process_group import process_group_active

logger = logging.getLogger(__name__)

__all__ = [
    "backward_beside_ddp",
    "backward_into_leaves",
    "compiled_node",
    "engine_grad",
    "graph_kept",
    "graph_task",
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


# Private queries of the engine about the backward now running (None on a torch without them).
_KEEP_GRAPH = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
_TASK_ID = getattr(torch._C, "_current_graph_task_id", None)


def graph_kept() -> bool:
    """Whether the backward now running keeps its graph: ``retain_graph``, or ``create_graph``
    (grad mode is on inside a backward only then: the gradient's own graph runs back through
    the nodes, even where ``retain_graph=False`` was given beside it); True outside a backward,
    or where torch does not say: nothing is freed that a later backward might need."""
    return _KEEP_GRAPH is None or bool(_KEEP_GRAPH()) or torch.is_grad_enabled()


def graph_task() -> int:
    """The id of the backward (the engine's graph task) now running on this thread's behalf, or
    -1 outside one (or where torch does not say). Ids are unique in a process."""
    return -1 if _TASK_ID is None else int(_TASK_ID())


def engine_grad(
    outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, grads, retain_graph=True, allow_unused=True)``.

    The gradients come from autograd itself (shapes and dtypes are the outputs'), so the engine
    is called directly, without the public wrapper's argument checks: they cost more per call
    than a small kernel's whole backward on a CPU. Tensors that override torch functions, or a
    torch whose engine entry point does not behave as :func:`_direct_engine` checked once, take
    the public function.
    """
    # Inside a backward grad mode is on only under ``create_graph=True``: the island's
    # gradients are then differentiable too, as the kernels' own would be without the guard.
    create_graph = torch.is_grad_enabled()
    run = _direct_engine()
    if run is None or has_torch_function((*outputs, *inputs)):
        return torch.autograd.grad(
            outputs, inputs, grads, retain_graph=True, create_graph=create_graph,
            allow_unused=True,
        )  # fmt: skip
    keep_graph, allow_unused = True, True
    return run(
        tuple(outputs),
        tuple(grads),
        keep_graph,
        create_graph,
        tuple(inputs),
        allow_unused,
        accumulate_grad=False,
    )


_ENGINE: list[Callable[..., tuple[torch.Tensor | None, ...]] | None] = []  # checked once


def _direct_engine() -> Callable[..., tuple[torch.Tensor | None, ...]] | None:
    """The engine entry point ``torch.autograd.grad`` itself calls (a private function), if it
    exists and answers a small problem exactly as the public function does; else None."""
    if not _ENGINE:
        _ENGINE.append(_check_engine())
    return _ENGINE[0]


def _check_engine() -> Callable[..., tuple[torch.Tensor | None, ...]] | None:
    run = getattr(torch.autograd.graph, "_engine_run_backward", None)
    if run is None:
        return None
    try:
        # The first call usually comes from inside a backward, where grad mode is off: the
        # probe builds its graph with grad mode on, or it would have none and fail for good.
        # On the CPU by name: under a caller's ``torch.device("meta")`` (or a default device)
        # the probe would compute nothing, and its failure is no seed's fault.
        cpu = torch.device("cpu")

        def probe() -> tuple[Any, ...]:  # (grad mode by ``in_grad_mode``, not a block)
            w = torch.tensor([1.0, 2.0], requires_grad=True, device=cpu)
            unused = torch.zeros(1, requires_grad=True, device=cpu)
            y = w * w
            grad = torch.tensor([1.0, 3.0], device=cpu)
            got = run((y,), (grad,), True, False, (w, unused), True, accumulate_grad=False)
            return w, got, torch.autograd.grad((y,), (w, unused), (grad,), allow_unused=True)

        w, got, want = in_grad_mode(True, probe)
        same = (
            len(got) == 2
            and got[1] is None
            and want[1] is None
            and isinstance(got[0], torch.Tensor)
            and torch.equal(got[0], want[0])
            and w.grad is None
        )
    except Exception:
        logger.debug("the autograd engine's entry point is not the expected one", exc_info=True)
        return None
    return run if same else None
