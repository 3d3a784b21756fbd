"""ParameterOwnership on its own: a parameter claimed again is checked where its memory is now."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kasmina.errors import ParameterOverlapError
from kasmina.isolation.ownership import ParameterOwnership


def test_a_parameter_claimed_again_gives_up_its_old_memory() -> None:
    """A claim of a parameter already claimed (its ``.data`` swapped since) replaces its byte
    range: the old storage, no longer the parameter's, is free to claim, the new one is not."""
    ownership = ParameterOwnership()
    param = nn.Parameter(torch.zeros(4))
    old = param.data
    ownership.claim([param], "host")
    ownership.check_free([nn.Parameter(torch.zeros(4))], "seed")  # the index is built now
    param.data = torch.zeros(4)
    ownership.claim([param], "host")
    ownership.check_free([nn.Parameter(old)], "seed")  # no longer anyone's memory
    with pytest.raises(ParameterOverlapError, match="shares memory with a parameter of 'host'"):
        ownership.check_free([nn.Parameter(param.data)], "seed")
