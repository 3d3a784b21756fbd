"""Forwards of one model on several threads (a server running eval forwards): each is the
host's or the seeds' as on one thread, and faults found on several threads at once are
contained, counted once each, and quarantine the seed once."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import SeedStage

S = SeedStage
THREADS = 8


class Boom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Thread switches after every few bytecodes, so the threads interleave in the guard."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def run_threads(work: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrapped(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 - every escape is the finding
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


@pytest.mark.parametrize("stage", [S.ISOLATED_INIT, S.GRAFTING], ids=lambda s: s.name)
def test_faults_on_several_threads_quarantine_the_seed_once(fast_switching, stage) -> None:
    """Eight threads whose forwards all fault: two that reach the limit together sent the
    seed to QUARANTINE twice, and the second raised into its host forward."""
    path = [S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING]
    for trial in range(40):
        torch.manual_seed(trial)
        layer = KasminaLayer(nn.Linear(8, 4), 2, 2, layer_id="L", fault_limit=4).eval()
        layer.seed(0).attach_kernel(Boom())
        for step in path[: path.index(stage) + 1]:
            layer.seed(0).transition_to(step)
        barrier = threading.Barrier(THREADS)
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def work(i: int, layer: KasminaLayer = layer, barrier=barrier, outputs=outputs) -> None:
            x = torch.randn(1 + i, 8)
            barrier.wait()
            with torch.no_grad():
                outputs[i] = (layer(x), layer.host(x))
                for _ in range(2):
                    layer(x)

        assert run_threads(work) == []
        for out, host in outputs.values():  # each request got the host's own output
            assert torch.equal(out, host)
        seed = layer.seed(0)
        assert seed.stage == S.QUARANTINE and seed.faults >= 4
        assert layer.state_table.counters.get("illegal", 0) == 0
