"""A slot's per-chunk masks for one call: which seeds passed the host through, which ran and
do not blend beside a GRAFTING one. Each is a ``[num_seeds]`` bool tensor on the call's device,
made once per pattern (a slot's calls repeat a handful of patterns) so that a forward builds
none. The cache keeps the ``MAX_PATTERNS`` most recently used: a wide layer's seeds grafting
and culled in ever new sets (2**num_seeds patterns) would grow it for the whole run. One made
under ``torch.compile`` (a graph constant) or by a ``torch.func`` transform (a wrapper tied to
that transform) is made fresh and never kept. ``KasminaLayer`` clears them when it moves
(``_apply``).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Container, Sequence

import torch

from kasmina.ops.transforms import functorch_active
from kasmina.stages import SeedStage

__all__ = ["MAX_PATTERNS", "ChunkMasks", "split_chunks"]

MAX_PATTERNS = 64  # per layer: each a [num_seeds] bool tensor


def split_chunks(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` with its last dim split into ``n`` chunks, ``[..., n, W]``: ``t.unflatten(-1, (n,
    -1))``, which TorchDynamo cannot trace while a device mode is on (a user's
    ``torch.set_default_device``: a compile with ``fullgraph`` failed on it). Splitting one dim
    is a view whatever the strides."""
    return t.view(*t.shape[:-1], n, -1)


class ChunkMasks:
    """The masks of one layer's calls, cached per pattern and device, least recently used
    dropped first (a backward that saved one keeps its own reference)."""

    def __init__(self) -> None:
        self._cache: OrderedDict[tuple[tuple[bool, ...], torch.device], torch.Tensor]
        self._cache = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()

    def passed(self, n: int, ran: Container[int], device: torch.device) -> torch.Tensor:
        """The seeds of ``n`` that did not run this call (``ran``: those that did)."""
        return self._mask(tuple(k not in ran for k in range(n)), device)

    def still(
        self, plan: Sequence[SeedStage], ran: Container[int], device: torch.device
    ) -> torch.Tensor | None:
        """The seeds that ran and do not blend (alpha 1) in a call where another does, or
        None if none: their chunk is their output as it is. A blend at alpha 1 gives ``s``
        only where ``s - h`` is finite (a host's infinity beside it made it NaN)."""
        values = tuple(k in ran and p != SeedStage.GRAFTING for k, p in enumerate(plan))
        return self._mask(values, device) if any(values) else None

    def _mask(self, values: tuple[bool, ...], device: torch.device) -> torch.Tensor:
        if torch.compiler.is_compiling() or functorch_active():
            return torch.tensor(values, device=device)
        # Serving threads share a slot (concurrent eval forwards): each cache operation is one
        # C call, atomic under the GIL, and none assumes what another thread left (a key read
        # here can be dropped before it is moved: that raised KeyError out of a forward).
        key = (values, device)
        mask = self._cache.get(key)
        if mask is not None:
            with contextlib.suppress(KeyError):  # another thread's call dropped it meanwhile
                self._cache.move_to_end(key)
            return mask
        with torch.inference_mode(False):  # made under inference mode, no backward could save it
            mask = self._cache[key] = torch.tensor(values, device=device)
        while len(self._cache) > MAX_PATTERNS:  # several threads may each have added one
            with contextlib.suppress(KeyError):  # (emptied by them meanwhile)
                self._cache.popitem(last=False)
        return mask
