"""``kasmina.seeds.outputs.fits`` for a slot chunked along its first dimension (``chunk_dim=0``):
a dim counted from the front means the same thing only at the recorded (or declared) rank, so a
call of another rank sits out however wide its dim 0 is; and a slot whose seeds run on its
records' calls sits the others out, its host's output as it is."""

from __future__ import annotations

import torch
from torch import nn

from kasmina.seeds.inject import attach
from kasmina.seeds.outputs import ActivationSpec, contract_problem, fits
from tests.seeds.helpers import S, kernel, walk


def spec(*shape: int) -> ActivationSpec:
    return (torch.Size(shape), torch.float32, torch.device("cpu"))


def test_a_call_of_the_records_rank_fits_on_its_width_along_dim_0() -> None:
    record = spec(4, 3)
    assert contract_problem(record, 0, 2, 2) is None  # two seeds of two rows: the record's 4
    assert fits(torch.zeros(4, 3), 0, 4, record)
    # Only dim 0 is the seeds': the others may differ from the record's, as a batch's does.
    assert fits(torch.zeros(4, 7), 0, 4, record)


def test_a_call_of_another_size_along_dim_0_does_not_fit() -> None:
    record = spec(4, 3)
    for rows in (0, 2, 3, 5, 8):
        assert not fits(torch.zeros(rows, 3), 0, 4, record)
    # The width along another dim is no stand-in for dim 0's.
    assert not fits(torch.zeros(3, 4), 0, 4, record)


def test_a_call_of_another_rank_does_not_fit_however_wide_its_dim_0() -> None:
    record = spec(4, 3)
    for shape in ((4,), (4, 3, 2), (4, 1, 3), (4, 3, 1, 1)):
        assert not fits(torch.zeros(shape), 0, 4, record), shape
    # Counted from the back, the last dim is the last at every rank: there the rank is free.
    assert fits(torch.zeros(2, 5, 3), -1, 3, record)


def test_a_declared_batched_rank_decides_with_or_without_a_record() -> None:
    batched = torch.zeros(4, 3, 5, 5)  # a conv's [B, C, H, W], chunked along B
    unbatched = torch.zeros(4, 5, 5)  # one sample's [C, H, W]: C == 4 too
    for record in (None, spec(4, 3, 5, 5)):
        assert fits(batched, 0, 4, record, rank=4)
        assert not fits(unbatched, 0, 4, record, rank=4)
    # Nothing recorded or declared: the width along dim 0 is all there is to check.
    assert fits(unbatched, 0, 4, None) and not fits(torch.zeros(3, 4), 0, 4, None)


def test_a_0d_call_fits_no_slot_chunked_along_dim_0() -> None:
    scalar = torch.tensor(1.0)
    for record in (None, spec(1), spec()):
        assert not fits(scalar, 0, 1, record)
        assert not fits(scalar, 0, 1, record, rank=0)


class FeaturesFirst(nn.Module):
    """A block whose output is ``[F, ...]``: its features along dim 0, its batch last."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).transpose(0, -1)


def test_a_slot_chunked_along_dim_0_runs_its_seeds_on_its_records_rank_only() -> None:
    """A call of another rank as wide along dim 0 (``[4, T, B]`` after ``[4, B]``) sits out:
    handed its chunks, a seed whose kernel takes ``[2, B]`` rows would fault on them."""
    model = nn.Sequential(FeaturesFirst())
    (slot,) = attach(model, ["0"], 2, 2, chunk_dim=0)
    model(torch.randn(3, 3))  # recorded: [4, 3]
    for k in range(2):
        slot.seed(k).attach_kernel(kernel(3, k))
        walk(slot.seed(k), S.GRAFTING)
    slot.update_alpha_blending(3, 10)
    x = torch.randn(3, 3)
    out = model(x)
    with torch.no_grad():
        assert not torch.equal(out, slot.host(x))  # the seeds ran on dim 0's chunks
    out.sum().backward()
    assert slot.sat_out == {} and [seed.faults for seed in slot.seeds] == [0, 0]
    assert all(p.grad is not None for seed in slot.seeds for p in seed.seed_parameters())
    other = torch.randn(2, 3, 3)  # gives [4, 3, 2]: as wide along dim 0, one rank more
    with torch.no_grad():
        assert torch.equal(model(other), slot.host(other))
    assert slot.sat_out == {"seeds": 1} and [seed.faults for seed in slot.seeds] == [0, 0]
    assert slot.output_contract[0] == (4, 3)
