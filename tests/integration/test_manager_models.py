"""A tiny Llama managed end to end: signed commands, published artifacts, compiled forward.

``torch.compile(fullgraph=True)`` is the first forward after ``manager.attach`` (the slots
record their host output while compiled), GERMINATE refuses artifacts that do not fit the
slot's contract with the reason, and a seed goes DORMANT -> ... -> ACTIVE through every gate.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn import functional as F

from kasmina.control.auth import sign_command
from kasmina.control.commands import make_seed_command
from kasmina.manager.manager import KasminaKernelManager
from kasmina.stages import SeedStage
from kasmina.urza.blueprints import ResidualMLP
from kasmina.urza.publish import publish_artifact
from kasmina.utils.keyring import Keyring, generate_key
from tests.integration.models import tiny_llama
from tests.manager.helpers import PUBLISHER, make_config, run_command

pytest.importorskip("transformers")

S = SeedStage
SEED = "model.layers.1.mlp.down_proj[0]"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A kernel for the 16-wide chunks of down_proj's [B, T, 32] output, and one 8 wide."""
    store = tmp_path_factory.mktemp("urza")
    torch.manual_seed(1)
    fits = publish_artifact(
        ResidualMLP(16, 16), [torch.randn(2, 6, 16)], str(store), "mlp16", PUBLISHER
    )
    narrow = publish_artifact(
        ResidualMLP(8, 8), [torch.randn(2, 6, 8)], str(store), "mlp8", PUBLISHER
    )
    return store, fits.artifact_id, narrow.artifact_id


def test_llama_seed_to_active_by_signed_commands_compiled_from_the_first_forward(
    tmp_path: Path, artifacts: tuple[Path, str, str]
) -> None:
    store, fits, narrow = artifacts
    keyring = Keyring({"ctl": generate_key()})
    # A random kernel's benefit on random tokens is whatever it is: G5's threshold is not
    # under test here, only that the measured evidence reaches it.
    config = make_config(tmp_path, store, performance_gate=0)
    manager = KasminaKernelManager(config, keyring=keyring)
    model = tiny_llama()
    slots = manager.attach(model, ["mlp.down_proj"], 2, 16, host_lr=1e-3, seed_lr=1e-2)
    assert [s.layer_id for s in slots] == [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # graph breaks other tests counted on purpose
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    ids = torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(3))

    def loss_fn(out: object, targets: torch.Tensor) -> torch.Tensor:
        logits = out.logits  # type: ignore[attr-defined]
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def train(steps: int = 1) -> None:
        for _ in range(steps):
            manager.backward(loss_fn(compiled(ids), ids))
            manager.step()

    def send(op: str, artifact_id: str = "", **params: float) -> bool:
        cmd = make_seed_command(op, SEED, artifact_id, params)
        return run_command(manager, sign_command(cmd, keyring, "ctl").SerializeToString())

    train()
    assert counter.frame_count == 1
    assert slots[1].chunk_spec() == (torch.Size([4, 6, 16]), torch.float32, torch.device("cpu"))
    assert not send("germinate", narrow)
    assert "do not fit seed" in manager.command_log[-1][3]
    assert manager.seed(SEED).stage == S.DORMANT
    assert send("germinate", fits), manager.command_log[-1]
    train(2)
    manager.end_epoch(0)
    for stage in (S.COMPATIBILITY_CHECK, S.GRAFTING):
        assert send("advance"), manager.command_log[-1]
        assert manager.seed(SEED).stage == stage
        train(1)
    train(4)
    assert send("advance"), manager.command_log[-1]  # G4: alpha reached 1
    assert manager.seed(SEED).stage == S.STABILIZATION
    train(1)
    measured = manager.evaluate_seeds([(ids, ids)], loss_fn=loss_fn)
    assert measured[SEED].stage == S.STABILIZATION  # G5's evidence, measured in this stage
    assert send("advance"), manager.command_log[-1]
    assert manager.seed(SEED).stage == S.ACTIVE
    train(1)
    assert manager.guard.violating_steps == 0
    assert counter.frame_count <= 2 + 6  # once after recording, then per stage change
    assert not torch._dynamo.utils.counters["graph_break"]


def test_a_bf16_host_refuses_an_fp32_kernel_with_the_reason(
    tmp_path: Path, artifacts: tuple[Path, str, str]
) -> None:
    store, fits, _ = artifacts
    keyring = Keyring({"ctl": generate_key()})
    manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    model = tiny_llama().to(torch.bfloat16)
    manager.attach(model, ["mlp.down_proj"], 2, 16)
    model(torch.randint(0, 128, (2, 6)))
    cmd = make_seed_command("germinate", SEED, fits, {})
    assert not run_command(manager, sign_command(cmd, keyring, "ctl").SerializeToString())
    reason = manager.command_log[-1][3]
    assert "float32 is not the host's torch.bfloat16" in reason, reason
    assert manager.seed(SEED).stage == S.DORMANT
