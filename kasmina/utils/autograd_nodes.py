"""Facts about autograd nodes that the graph walks (isolation checks, the KD cut) share."""

from __future__ import annotations

from typing import Any

__all__ = ["compiled_node"]


def compiled_node(node: Any) -> bool:
    """Whether ``node`` is the backward of a compiled region (AOTAutograd's
    ``CompiledFunction``): one node for a whole graph, its inputs not attributable to any one
    of its outputs."""
    if type(node).__name__ == "CompiledFunctionBackward":
        return True
    forward = getattr(node, "_forward_cls", None)  # a custom autograd.Function's backward
    module = getattr(forward, "__module__", None) or ""
    return module.startswith("torch._functorch._aot_autograd")
