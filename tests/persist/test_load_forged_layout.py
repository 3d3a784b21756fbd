"""``kasmina.load`` of a file whose slot layout was rewritten (the header is unsigned; its
SHA-256 only guards against damage): a layout ``attach`` could not have made around the host,
or that its seeds' kernels cannot run on, is a ``SavedModelError`` and the model unchanged,
never a model that loads and then computes something else than the saved one."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import kasmina
from kasmina.persist.format import read_saved, write_saved
from kasmina.seeds.outputs import output_index_problem
from kasmina.stages import SeedStage, StateColumn
from tests.manager.helpers import PUBLISHER, Host
from tests.persist.conftest import Grown
from tests.persist.test_load_malformed import _refused


def _slot(**changes: Any) -> Callable[[dict[str, Any]], None]:
    return lambda body: body["slots"][0].update(changes)


def _stage(row: int, stage: SeedStage) -> Callable[[dict[str, Any]], None]:
    def mutate(body: dict[str, Any]) -> None:
        body["table"]["state_tensor"][row, StateColumn.LIFECYCLE_STAGE] = int(stage)

    return mutate


# The grown model's slot is ``out`` = Linear(8, 4), two seeds of two features along dim -1;
# its kernels take [None, 2] (2-D chunks).
FORGED: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "chunk_dim past the rank": (_slot(chunk_dim=7), "chunk_dim 7 is outside the 2-D chunk"),
    "chunk_dim before the rank": (_slot(chunk_dim=-3), "chunk_dim -3 is outside"),
    "chunk_dim on the batch": (_slot(chunk_dim=0), "leaves the host's 4 features last"),
    "chunk_dim -2": (_slot(chunk_dim=-2), "leaves the host's 4 features last"),
    "output_index of a tensor": (_slot(output_index=5), "a Linear returns one tensor"),
    "output_index -1": (_slot(output_index=-1), "a Linear returns one tensor"),
    "fault_limit 0": (_slot(fault_limit=0), "fault_limit 0 is not >= 1"),
    "fault_limit negative": (_slot(fault_limit=-5), "fault_limit -5 is not >= 1"),
    "fault_limit a bool": (_slot(fault_limit=True), "fault_limit is True, not an int"),
    "region_id not the table's": (_slot(region_id=7), "region_id 7 is not its state rows' 0"),
    "embargo past int32": (
        lambda body: body["table"].update(embargo_epochs=2**31),
        "embargo_epochs 2147483648",
    ),
    "embargo absurd": (lambda body: body["table"].update(embargo_epochs=10**12), "embargo"),
    "embargo negative": (
        lambda body: body["table"].update(embargo_epochs=-1),
        "embargo_epochs -1 is not an int in",
    ),
    "embargo a string": (
        lambda body: body["table"].update(embargo_epochs="1"),
        "embargo_epochs '1' is not an int in",
    ),
    "state rows not from row 0": (_slot(state_offset=1), "state rows from 1, expected 0"),
    "a host weight the model lacks": (
        lambda body: body["weights"].update({"inp.extra": torch.zeros(1)}),
        r"saved weights lack \[\], have extra \['inp.extra'\]",
    ),
    "a seed's artifact not in the file": (
        lambda body: body["seeds"][0].update(artifact_id="forged"),
        "artifact 'forged' absent",
    ),
    # The table is restored after the seeds' own states, over their rows: one stage in each
    # loaded, the ACTIVE seed DORMANT with its kernel, the GRAFTING one ACTIVE half blended.
    "an ACTIVE seed's row DORMANT": (
        _stage(0, SeedStage.DORMANT),
        r"has seed out\[0\] DORMANT, its own saved state ACTIVE",
    ),
    "a GRAFTING seed's row ACTIVE": (
        _stage(1, SeedStage.ACTIVE),
        r"has seed out\[1\] ACTIVE, its own saved state GRAFTING",
    ),
}


@pytest.mark.parametrize("case", FORGED.values(), ids=FORGED.keys())
def test_a_forged_layout_is_refused_and_the_model_unchanged(
    saved: Path, tmp_path: Path, case: tuple[Callable[[dict[str, Any]], None], str]
) -> None:
    mutate, message = case
    body = read_saved(saved)
    mutate(body)
    _refused(write_saved(tmp_path / "forged", body), message)


@pytest.mark.parametrize("limit", [1, 2**31, sys.maxsize, 10**30])
def test_a_fault_limit_loads_as_the_seeds_take_it(saved: Path, tmp_path: Path, limit: int) -> None:
    """A seed's ``fault_limit`` is a Python int (never in the int32 table): a huge one is a
    natural "never quarantine", 1 quarantines at the first fault, and what a seed takes, a
    saved slot may carry."""
    body = read_saved(saved)
    body["slots"][0]["fault_limit"] = limit
    model = Host()
    (slot,) = kasmina.load(
        write_saved(tmp_path / "limit", body), model, publishers=PUBLISHER.trusted_publishers()
    )
    assert [seed.fault_limit for seed in slot.seeds] == [limit] * slot.num_seeds


def test_a_model_attached_with_the_largest_fault_limit_saves_and_loads(tmp_path: Path) -> None:
    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))

    model = make()
    kasmina.attach(model, ["2"], 2, 2, fault_limit=sys.maxsize)
    x = torch.randn(3, 6)
    expected = model(x)
    path = kasmina.save(model, tmp_path / "never.kasmina")
    fresh = make()
    (slot,) = kasmina.load(path, fresh, publishers=PUBLISHER.trusted_publishers())
    assert [seed.fault_limit for seed in slot.seeds] == [sys.maxsize] * 2
    assert torch.equal(fresh(x), expected)


def test_a_layout_naming_the_same_dim_otherwise_loads_and_computes_the_saved_model(
    grown: Grown, saved: Path, tmp_path: Path
) -> None:
    # Dim 1 of the 2-D output is its last: the same chunks, so nothing to refuse.
    body = read_saved(saved)
    body["slots"][0]["chunk_dim"] = 1
    path = write_saved(tmp_path / "dim1", body)
    model, genuine = Host(), Host()
    kasmina.load(path, model, publishers=PUBLISHER.trusted_publishers())
    kasmina.load(saved, genuine, publishers=PUBLISHER.trusted_publishers())
    model.eval(), genuine.eval()
    with torch.no_grad():
        assert torch.equal(model(grown.x), genuine(grown.x))
        assert torch.equal(model(grown.x), grown.model(grown.x))


class _PairLinear(torch.nn.Linear):
    """A Linear whose own forward returns a pair: its output_index is known at a forward only."""

    def forward(self, x: torch.Tensor) -> Any:
        return super().forward(x), x


def test_output_index_is_bounded_where_the_host_class_fixes_its_output() -> None:
    linear, conv = torch.nn.Linear(2, 2), torch.nn.Conv2d(1, 2, 1)
    attention = torch.nn.MultiheadAttention(4, 1)
    assert output_index_problem(0, linear) is None and output_index_problem(0, conv) is None
    assert "one tensor" in str(output_index_problem(1, conv))
    assert [output_index_problem(i, attention) for i in (-2, -1, 0, 1)] == [None] * 4
    assert "a pair" in str(output_index_problem(2, attention))
    # An override or a module of its own: left to the first forward, as after attach.
    assert output_index_problem(1, _PairLinear(2, 2)) is None
    assert output_index_problem(9, torch.nn.Sequential(linear)) is None
