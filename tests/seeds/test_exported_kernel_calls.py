"""A kernel loaded from an exported program (a real published ``PairRows``).

A call its program's input checks refuse sits out like one its signed input shape rules out:
the host's chunk stands, no fault, the stage unchanged, in a slot, stand-alone and in a
COMPATIBILITY_CHECK probe. An exported batch norm's statistics are kept finite as a module's are.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from kasmina.seeds.faults import call_kernel
from kasmina.seeds.inject import attach
from kasmina.stages import SeedStage
from tests.seeds.fault_helpers import BATCH, C, make_seed
from tests.seeds.helpers import walk
from tests.urza.helpers import PairRows

S = SeedStage


@pytest.fixture(scope="module")
def pair_rows(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], nn.Module]:
    """Loads of a real exported ``PairRows(C)`` (each a seed's own copy, as GERMINATE's)."""
    from kasmina.urza.client import UrzaLibraryClient
    from kasmina.urza.kernel import GPUKernel
    from kasmina.urza.publish import publish_artifact
    from tests.manager.helpers import PUBLISHER

    store = str(tmp_path_factory.mktemp("pairs"))
    torch.manual_seed(0)
    manifest = publish_artifact(PairRows(C), [torch.randn(4, C)], store, "pairs", PUBLISHER)
    client = UrzaLibraryClient(store, PUBLISHER.trusted_publishers())
    payload, verified = client.fetch(manifest.artifact_id)
    return lambda: copy.deepcopy(GPUKernel.from_binary(payload, verified))


@pytest.mark.parametrize("stage", [S.ISOLATED_INIT, S.GRAFTING, S.ACTIVE])
def test_a_call_its_program_refuses_sits_out_without_a_fault(
    pair_rows: Callable[[], nn.Module], stage: SeedStage, caplog: pytest.LogCaptureFixture
) -> None:
    """A kernel exported with an even number of rows (its program's input checks say so;
    its signed input shape does not) is called with an odd one (a Hugging Face generate's
    decode step has a sequence length of 1): every such call raised in those checks, a
    fault each, and a healthy seed was quarantined at its third. It sits the call out like
    one its signed shape rules out: the host's chunk stands, no fault, the stage unchanged;
    even calls still run it."""
    model = nn.Sequential(nn.Linear(4, 2 * C))
    (slot,) = attach(model, ["0"], 2, C)
    model(torch.randn(4, 4))
    seed = slot.seed(0)
    seed.attach_kernel(pair_rows())
    walk(seed, stage)
    slot.update_alpha_blending(5, 10)
    for rows in (5, 1, 3, 7):
        x = torch.randn(rows, 4)
        out = model(x)
        out.sum().backward()
        assert torch.equal(out.detach(), slot.host(x).detach()), rows
    assert seed.faults == 0 and seed.stage is stage and list(seed.fault_log) == []
    assert "sat out a call" in caplog.text and "refuse [5, 3]" in caplog.text
    x = torch.randn(6, 4)
    out = model(x)
    if stage is not S.ISOLATED_INIT:  # the seed's chunk is its own again
        assert not torch.equal(out[:, :C], slot.host(x)[:, :C])
    out.sum().backward()
    assert all(p.grad is not None for p in seed.kernel.parameters())
    assert seed.faults == 0 and seed.stage is stage


def test_a_stand_alone_seed_and_its_probe_sit_out_a_call_its_program_refuses(
    pair_rows: Callable[[], nn.Module],
) -> None:
    """Outside a slot as well: the seed passes the host through, and a COMPATIBILITY_CHECK
    probe of such a call keeps the last probe for G3 instead of faulting and leaving none."""
    seed = make_seed(pair_rows(), S.GRAFTING)
    x = torch.randn(BATCH, C)  # an odd number of rows
    assert torch.equal(seed(x), x) and seed.faults == 0
    probing = make_seed(pair_rows(), S.COMPATIBILITY_CHECK)
    probing(torch.randn(4, C))
    probe = probing.probe_result
    assert probe is not None
    for _ in range(probing.fault_limit):
        assert torch.equal(probing(x), x)
    assert probing.probe_result is probe and probing.faults == 0
    assert probing.stage is S.COMPATIBILITY_CHECK


def test_an_exported_batch_norms_statistics_are_kept_finite_too() -> None:
    """An exported program's batch norm sits on plain submodules and its update moves no
    version: the guard never copied its statistics, and one NaN host batch kept them NaN."""
    torch.manual_seed(3)
    module = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    kernel = torch.export.export(module, (torch.randn(4, 2),)).module()
    stats = [b for name, b in kernel.named_buffers() if "running_" in name]
    assert len(stats) == 2
    faults: list[tuple[str, str]] = []
    assert call_kernel(kernel, torch.randn(4, 2), False, lambda *f: faults.append(f)) is not None
    before = [b.clone() for b in stats]
    bad = torch.randn(4, 2)
    bad[0, 0] = float("nan")
    call_kernel(kernel, bad, False, lambda *f: faults.append(f))
    assert all(torch.equal(b, saved) for b, saved in zip(stats, before, strict=True))
    call_kernel(kernel, torch.randn(4, 2), False, lambda *f: faults.append(f))
    assert all(
        torch.isfinite(b).all() and not torch.equal(b, saved)
        for b, saved in zip(stats, before, strict=True)
    )
    assert faults == []
