"""``kasmina.utils.memory``: the one test of shared memory, on views a user makes."""

from __future__ import annotations

import torch
from torch import nn

from kasmina.utils.memory import ByteRanges, byte_span


def test_views_overlap_where_their_bytes_do() -> None:
    flat = torch.zeros(12)
    ranges = ByteRanges([("a", flat[:6]), ("b", flat[6:])])  # disjoint slices of one buffer
    assert ranges.overlapping(flat[5:7]) == ["a", "b"]
    assert ranges.overlap(flat[6:8]) == "b"
    assert ranges.overlap(flat.view(3, 4)[:, 0]) == "a"  # strided: spans elements 0..8
    assert ranges.overlap(nn.Parameter(flat[:6].data)) == "a"  # a new object, the same bytes
    assert ranges.overlap(torch.zeros(12)) is None  # another storage


def test_an_empty_tensor_and_memory_that_cannot_be_compared_overlap_nothing() -> None:
    flat = torch.zeros(8)
    ranges = ByteRanges([("all", flat)])
    assert ranges.overlap(flat[3:3]) is None  # no byte: nothing to share
    assert byte_span(torch.zeros(4, device="meta")) is None  # every meta tensor at address 0
    assert ranges.overlap(torch.zeros(4, device="meta")) is None
    assert byte_span(torch.zeros(2, 2).to_sparse()) is None
