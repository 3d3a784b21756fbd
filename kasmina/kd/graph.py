"""The graph of the KD losses the slots and seeds collect: marked, summed, and cut below.

**Marked.** ``sum_kd_losses`` marks each collected loss's autograd node (``is_kd_root``). A
``kd_loss`` handed to ``manager.backward`` is such losses, scaled or summed: a walk of its graph
that meets a host parameter other than behind one of them is a loss that trains the host
(``isolation.verify.reaches_host_beyond``), refused there. A backward that runs such a node is
known as a KD one (``in_kd_backward``): the seeds' graphs it reaches are kept for the host's.

**Cut.** A slot's KD loss reads its seeds' outputs, which the host's loss reads too (the blend).
Its seed-only backward runs first, so a plain ``kd_loss.backward()`` must retain the graph for
the host's backward after it, and with it the KD op's saved tensors (the student's and the
teacher's ``[rows, V]`` logits, or the gradient the CPU path keeps): they stayed alive for as
long as the caller held ``kd_loss``, through the next micro-batch's forward. So a slot records
where its loss meets the shared graph (``mark_cut``: its students' gradient edges), and
``kd_cut`` hands those edges back when every path down from a ``kd_loss`` meets such a loss
before any parameter: the backward is then taken in two calls, the first down to
the edges without retaining (the KD op, its head and the sums are freed), the second from the
edges on with their gradients, retained for the host's backward. A root without a cut (a
compiled region's, a stand-alone seed's) keeps the one retained backward.

**Retained through a compiled region.** Under ``torch.compile`` with an AOT backend the KD
losses are outputs of the region's one backward node, which the host's loss goes through too:
the seed-only backward must retain that node. AOTAutograd compiles a backward that reuses its
saved activations in place (donated buffers) whenever it compiles it with the forward, which it
does for every graph with dynamic shapes (the first new batch size, ``dynamic=True``, a short
micro-batch); such a backward refuses ``retain_graph``, and the KD term and its leak check were
dropped on every step. ``hold_retained_backwards`` turns the donation off for as long as a KD
manager is open. PyTorch reads the flag as a graph compiles (off: its backward donates nothing)
and as a retained backward starts (on: refused, since one compiled with it on may have reused
its saved buffers). No graph holding a KD loss was compiled before the hold: the manager takes
it as it is built, before its slots are attached.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch._functorch.config as functorch_config
from torch.autograd.graph import GradientEdge, get_gradient_edge

from kasmina.ops.transforms import in_compiled_transform
from kasmina.utils.autograd_nodes import compiled_node, graph_task
from kasmina.utils.locks import fork_safe

logger = logging.getLogger(__name__)

__all__ = [
    "distilled_seeds",
    "hold_retained_backwards",
    "in_kd_backward",
    "is_kd_root",
    "kd_cut",
    "mark_cut",
    "mark_students",
    "sum_kd_losses",
]

_KD_ROOT = "kasmina.kd_loss"  # a node's metadata key: the graph of a collected KD loss
_KD_SEEDS = "kasmina.kd_seeds"  # the ids of the seeds a KD loss distils into
_KD_CUT = "kasmina.kd_cut"  # its students' gradient edges, where it meets the shared graph
_holds_lock = fork_safe(threading.Lock())
_holds: list[bool] = []  # one entry per open hold: the flag's value the first one found
# The backwards (graph tasks) that ran a collected KD loss's node, newest last: the seeds'
# graphs they reach are kept for the host's backward after them (``in_kd_backward``).
_kd_tasks_lock = fork_safe(threading.Lock())
_kd_tasks: collections.deque[int] = collections.deque(maxlen=16)


def sum_kd_losses(losses: list[torch.Tensor]) -> torch.Tensor | None:
    """The sum of ``losses`` (each summed to a scalar first), on the first one's device, and
    ``losses`` emptied; None for none. ``TypeError`` for anything but a list of tensors, before
    any loss is marked (a str or a number raised on a missing ``grad_fn``, a tuple once its
    losses were marked)."""
    if not isinstance(losses, list):
        raise TypeError(f"losses must be a list of KD loss tensors, got {type(losses).__name__}")
    if not all(isinstance(loss, torch.Tensor) for loss in losses):
        kinds = sorted({type(loss).__name__ for loss in losses} - {"Tensor"})
        raise TypeError(f"losses must be a list of KD loss tensors, got one holding {kinds}")
    if not losses:
        return None
    # ``is_kd_root``; not inside a compiled torch.func transform, whose loss never reaches
    # ``manager.backward`` (elsewhere, reading ``grad_fn`` breaks the graph: marked eagerly).
    traced_transform = in_compiled_transform()
    for loss in losses:
        if not traced_transform and loss.grad_fn is not None:
            loss.grad_fn.metadata[_KD_ROOT] = True
            loss.grad_fn.register_prehook(_kd_task_begins)
    # On the first loss's device: slots of a model spread over devices each compute theirs on
    # their own (``torch.stack`` refused the mix); ``.to`` of a loss already there is itself.
    device = losses[0].device
    total = torch.stack([(loss if loss.dim() == 0 else loss.sum()).to(device) for loss in losses])
    total = total.sum()
    if not traced_transform and total.grad_fn is not None:  # a slot's sum, summed again
        named = distilled_seeds([loss.grad_fn for loss in losses if loss.grad_fn is not None])
        if named is not None:
            total.grad_fn.metadata[_KD_SEEDS] = tuple(sorted(named))
    losses.clear()
    return total


def is_kd_root(node: Any) -> bool:
    """Whether the autograd ``node`` is a KD loss a slot or seed collected (``sum_kd_losses``
    marked it)."""
    return bool(node.metadata.get(_KD_ROOT))


def in_kd_backward() -> bool:
    """Whether the backward now running went through a collected KD loss (``sum_kd_losses``).

    Its seed-only part runs before the host's backward through the same seeds' graphs: a plain
    ``kd_loss.backward()`` (or ``torch.autograd.grad`` of it), then ``loss.backward()``, as
    ``manager.backward`` takes them, so the seeds' graphs it reaches stay for the host's even
    where it keeps no graph of its own (``seeds.island``). The KD loss's node runs before any
    node below it, so it is marked by the time a seed's graph asks."""
    if not _kd_tasks:  # no KD loss ran a backward yet (a run without KD: every step)
        return False
    task = graph_task()
    with _kd_tasks_lock:
        return task != -1 and task in _kd_tasks


def _kd_task_begins(_grad_outputs: Any) -> None:
    """A collected KD loss's node prehook: the backward running it is a KD one. Bounded: an
    id pushed out belongs to a backward long over, unless sixteen run at once."""
    task = graph_task()
    with _kd_tasks_lock:
        if task not in _kd_tasks:
            _kd_tasks.append(task)


def mark_students(loss: torch.Tensor, seed_ids: list[str]) -> torch.Tensor:
    """Record on ``loss`` (a slot's or seed's KD loss) the seeds it distils into: a host
    gradient its seed-only backward makes is charged to them (``distilled_seeds``), not to
    every seed that could distil (a slot that never ran this step had its seeds quarantined
    for another's leak). Not while compiling: there is no node to mark. Returns ``loss``."""
    if not torch.compiler.is_compiling() and loss.grad_fn is not None:
        loss.grad_fn.metadata[_KD_SEEDS] = tuple(seed_ids)
    return loss


def distilled_seeds(roots: list[Any]) -> set[str] | None:
    """The seeds the KD losses at ``roots`` (``is_kd_root`` nodes) distil into, or None when a
    root does not say (a loss computed inside a compiled region)."""
    found: set[str] = set()
    for root in roots:
        ids = root.metadata.get(_KD_SEEDS)
        if ids is None:
            return None
        found.update(ids)
    return found


def mark_cut(loss: torch.Tensor, students: list[torch.Tensor | None]) -> None:
    """Record on ``loss`` (a slot's KD loss) the gradient edges of ``students`` (the seed
    outputs it read), when its graph down to them is its own: the nodes in between reach no
    trainable tensor, and none is a compiled region's (whose one node also holds the host's
    graph: a ``torch.compile``d model's). Not while compiling: there is no node to mark."""
    if torch.compiler.is_compiling():  # first: reading ``grad_fn`` breaks the graph
        return
    root = loss.grad_fn
    edges = [get_gradient_edge(s) for s in students if s is not None and s.requires_grad]
    ends = {id(edge.node) for edge in edges}
    if root is None or not edges or id(root) in ends:  # the loss's node a student's: no own
        return
    if _ends_below(root, lambda node: id(node) in ends) is not None:
        root.metadata[_KD_CUT] = edges


def kd_cut(kd_loss: torch.Tensor) -> list[GradientEdge] | None:
    """The edges below which ``kd_loss``'s graph is shared (see the module docstring), or None
    when it cannot be cut there: a parameter is reached on the way down to the losses that
    recorded a cut (a loss that recorded none, or a parameter of the sum's own: its gradient
    would be lost with the first call). The walk goes through the sums above the losses only."""
    marked = _ends_below(kd_loss.grad_fn, lambda node: _KD_CUT in node.metadata)
    edges: dict[tuple[int, int], GradientEdge] = {}
    for node in marked or ():
        for edge in node.metadata[_KD_CUT]:
            edges.setdefault((id(edge.node), edge.output_nr), edge)
    return list(edges.values()) or None


def _ends_below(root: Any, end: Callable[[Any], bool]) -> list[Any] | None:
    """The nodes ``end`` picks that a walk down from ``root`` meets (not entered), or None
    when a path meets a trainable tensor or a compiled region before one of them."""
    visited: dict[int, Any] = {}  # the nodes, held: their ids stay unique
    found, stack = [], [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited[id(node)] = node
        if end(node):
            found.append(node)
        elif hasattr(node, "variable") or compiled_node(node):
            return None
        else:
            stack.extend(fn for fn, _ in node.next_functions)
    return found


def hold_retained_backwards() -> Callable[[], None]:
    """Turn AOTAutograd's donated buffers off (``torch._functorch.config.donated_buffer``, see
    the module docstring) until the returned release is called (once; later calls do nothing).
    Holds nest, one per KD manager: the last release puts back the value the first hold found,
    unless something else set the flag meanwhile. A flag set on again while held fails each
    retained backward through a compiled region (counted, and logged once, by the guard)."""
    if not hasattr(functorch_config, "donated_buffer"):  # a torch without donated buffers
        return lambda: None
    with _holds_lock:
        before = _holds[0] if _holds else bool(functorch_config.donated_buffer)
        if not _holds and before:
            logger.info(
                "torch._functorch.config.donated_buffer turned off while a KD manager is open: "
                "the seed-only KD backward retains a compiled region's backward"
            )
        _holds.append(before)
        functorch_config.donated_buffer = False
    released = []  # once released: [True]

    def release() -> None:
        with _holds_lock:
            if released:
                return
            released.append(True)
            _holds.pop()
            if not _holds and not functorch_config.donated_buffer:  # still the hold's value
                functorch_config.donated_buffer = before

    return release
