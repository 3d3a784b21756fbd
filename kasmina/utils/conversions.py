"""A count of module conversions (``to``, ``half``, ``double``, ``cuda``) through a seed.

Why: an optimizer keeps its running state (Adam's moments) in the dtype and on the device its
parameters had at its first step, and after ``model.to(torch.bfloat16)`` or ``model.cuda()``
every step raises. The optimizers a manager owns make their state follow their parameters
(``kasmina.isolation.stepping``), and look for that only when this count moved: a
conversion of a model with seeds in it passes through every seed's ``_apply``, which counts it,
so a step pays one integer comparison otherwise.
"""

from __future__ import annotations

import itertools

__all__ = ["conversions", "count_conversion"]

_COUNTER = itertools.count(1)
_LAST = [0]


def count_conversion() -> None:
    """One more conversion (a seed's ``_apply`` ran)."""
    _LAST[0] = next(_COUNTER)


def conversions() -> int:
    """The conversions counted so far in this process."""
    return _LAST[0]
