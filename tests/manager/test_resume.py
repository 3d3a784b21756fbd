"""Resuming a run in a new process: a new manager over a freshly built model, with the same
run_id, attached and put back to an epoch checkpoint by a signed ROLLBACK (docs/design.md §6a).
What the new process lacks (the forwards the old one saw) must not change what the commands
decide, and a configuration the checkpoint cannot go into is refused with nothing changed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kasmina.control.auth import sign_command
from kasmina.control.builders import make_rollback_command, make_seed_command
from kasmina.control.commands import KasminaCommand
from kasmina.manager.config import KasminaConfig
from kasmina.manager.evaluation import parse_host_shapes
from kasmina.manager.manager import KasminaKernelManager
from kasmina.urza.blueprints import ResidualMLP
from kasmina.utils.keyring import Keyring
from kasmina.utils.state_io import clone_state
from tests.manager.helpers import (
    SEED0,
    Host,
    Rig,
    S,
    make_config,
    record_activations,
    run_command,
)
from tests.manager.test_dry_run import publish


def signed(manager: KasminaKernelManager, keyring: Keyring, cmd: KasminaCommand) -> bool:
    return run_command(manager, sign_command(cmd, keyring, "ctl").SerializeToString())


def rollback(manager: KasminaKernelManager, keyring: Keyring, epoch: int) -> bool:
    return signed(manager, keyring, make_rollback_command(epoch, reason="resume"))


def everything(manager: KasminaKernelManager, model: torch.nn.Module) -> dict:
    registry = manager.require_registry()
    return {
        "model": clone_state(model.state_dict()),
        "optimizers": clone_state(manager.optimizers.state_dict()),
        "table": registry.table.state_tensor.clone(),
        "clock": (manager.state.epoch, manager.state.global_step),
    }


def assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def compatibility_check_run(config: KasminaConfig, keyring: Keyring, artifact: str) -> Rig:
    """A run whose seed 0 germinated ``artifact``, trained and reached COMPATIBILITY_CHECK, with
    the checkpoints of epochs 0 and 1 (its forwards recorded the host's shapes)."""
    first = Rig(config, keyring)
    assert first.send("germinate", SEED0, artifact)
    first.train(2)
    first.manager.end_epoch(0)
    assert first.send("advance", SEED0) and first.stage(SEED0) == S.COMPATIBILITY_CHECK
    first.train(1)
    first.manager.end_epoch(1)
    return first


def test_a_resumed_seed_in_compatibility_check_passes_g3_before_any_forward(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """The rollback drops the probe results and the new process has seen no input: G3 probes
    random activations of the shape the kernel's manifest declares, as the uninterrupted run's
    ADVANCE would pass on its last-seen shape."""
    config = make_config(tmp_path, store, run_id="resume")
    compatibility_check_run(config, keyring, mlp).manager.close()

    rig = Rig(config, keyring, record=False)  # the restarted process: no forward yet
    assert rollback(rig.manager, keyring, 1), rig.manager.command_log[-1]
    assert rig.stage(SEED0) == S.COMPATIBILITY_CHECK
    assert rig.manager.seed(SEED0).probe_result is None
    rng = torch.random.get_rng_state()
    assert rig.send("advance", SEED0), rig.manager.command_log[-1]
    assert rig.stage(SEED0) == S.GRAFTING
    assert torch.equal(rng, torch.random.get_rng_state())  # a private generator's activations


def test_a_resumed_g3_counts_the_hosts_cost_as_the_run_it_resumes(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """The slots' first-seen host shapes are checkpointed: a process resumed by a ROLLBACK
    refuses, before its first forward, a kernel over the cost budget that the uninterrupted
    run's G3 refuses, instead of passing it with the cost unchecked."""
    config = make_config(tmp_path, store, run_id="resume")
    costly = publish(ResidualMLP(2, 512), torch.randn(3, 2), store)
    first = compatibility_check_run(config, keyring, costly)
    assert not first.send("advance", SEED0)
    refusal = first.manager.command_log[-1][3]
    assert "G3 refused" in refusal and "budget" in refusal, refusal
    first.manager.close()

    rig = Rig(config, keyring, record=False)  # the restarted process: no forward yet
    assert rollback(rig.manager, keyring, 1), rig.manager.command_log[-1]
    assert not rig.send("advance", SEED0)
    assert rig.manager.command_log[-1][3] == refusal
    assert rig.stage(SEED0) == S.COMPATIBILITY_CHECK
    rig.manager.end_epoch(2)  # a checkpoint before any forward keeps the shapes it restored
    rig.manager.close()
    again = Rig(config, keyring, record=False)
    assert rollback(again.manager, keyring, 2) and not again.send("advance", SEED0)
    assert again.manager.command_log[-1][3] == refusal


def test_a_resume_into_a_host_of_another_dtype_is_refused_and_changes_nothing(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """A float32 run resumed into a host built in bfloat16: the load cast the checkpoint into
    it silently, the float32 kernels came back beside it, and every running seed faulted at
    each call until quarantined. Refused now, naming both dtypes, with every bit as it was."""
    config = make_config(tmp_path, store, run_id="resume")
    compatibility_check_run(config, keyring, mlp).manager.close()
    manager = KasminaKernelManager(config, keyring=keyring)
    model = Host().to(torch.bfloat16)
    manager.attach(model, "out", 2, 2, host_lr=0.05, seed_lr=0.05)
    before = everything(manager, model)
    assert not rollback(manager, keyring, 1)
    reason = manager.command_log[-1][3]
    assert "is torch.float32, the live model's torch.bfloat16" in reason, reason
    assert_same(before, everything(manager, model))
    assert manager.stages()[SEED0] == S.DORMANT and manager.seed(SEED0).kernel is None
    manager.close()


@pytest.mark.parametrize("host_lr", [0.05, None], ids=["host", "seeds-only"])
def test_a_resume_with_another_optimizer_class_is_refused_and_changes_nothing(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str, host_lr: float | None
) -> None:
    """A rollback keeps the live optimizer objects (a user's scheduler holds the host's), which
    cannot take another class's state; a seed's optimizer comes from the same setting. So a
    checkpoint saved with Adam does not go into a manager attached with SGD: refused, naming
    both classes, with the live host optimizer and every bit as they were."""
    config = make_config(tmp_path, store, run_id="resume")

    def start(cls: type[torch.optim.Optimizer]) -> tuple[KasminaKernelManager, Host]:
        manager = KasminaKernelManager(config, keyring=keyring)
        model = Host()
        manager.attach(model, "out", 2, 2, host_lr=host_lr, seed_lr=0.05, optimizer_cls=cls)
        return manager, model

    first, model = start(torch.optim.Adam)
    record_activations(model, torch.zeros(16, 6))  # GERMINATE checks the slot's activations
    assert signed(first, keyring, make_seed_command("germinate", SEED0, mlp, {}))
    first.end_epoch(0)
    first.close()

    manager, model = start(torch.optim.SGD)
    live = manager.optimizers.optimizer("host") if host_lr is not None else None
    before = everything(manager, model)
    assert not rollback(manager, keyring, 0)
    reason = manager.command_log[-1][3]
    assert "optimizer is Adam" in reason and "optimizer_cls is SGD" in reason, reason
    if live is not None:
        assert "host optimizer" in reason and manager.optimizers.optimizer("host") is live
    else:
        assert f"seed {SEED0}'s optimizer" in reason
    assert_same(before, everything(manager, model))
    assert manager.stages()[SEED0] == S.DORMANT


def test_a_resumed_seeds_monitor_guards_the_host_groups_the_checkpoint_restores(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """A layer unfrozen by a user's add_param_group before the checkpoint is on the host side of
    the isolation line in the resumed process too: the restored isolated seed's monitor, built
    during the rollback, checks it as the KD leak check does (not only seeds germinated later)."""
    import tests.manager.helpers as helpers

    class FrozenOut(Host):
        def __init__(self) -> None:
            super().__init__()
            self.out.requires_grad_(False)

    monkeypatch.setattr(helpers, "Host", FrozenOut)
    config = make_config(tmp_path, store, run_id="resume")

    def unfreeze(rig: Rig) -> list[torch.nn.Parameter]:
        layer = list(rig.model.out.host.parameters())
        for p in layer:
            p.requires_grad_(True)
        return layer

    first = Rig(config, keyring)
    assert first.send("germinate", SEED0, mlp)
    first.manager.optimizers.optimizer("host").add_param_group({"params": unfreeze(first)})
    first.train(1)
    first.manager.end_epoch(0)
    first.manager.close()

    rig = Rig(config, keyring, record=False)  # the user's resume code unfreezes, then rolls back
    layer = unfreeze(rig)
    assert len(rig.manager.optimizers.optimizer("host").param_groups) == 1
    assert rollback(rig.manager, keyring, 0), rig.manager.command_log[-1]
    registry = rig.manager.require_registry()
    assert rig.stage(SEED0) == S.ISOLATED_INIT
    assert {id(p) for p in layer} <= {id(p) for p in registry.host_side_params()}
    monitor = registry[SEED0].monitor
    assert monitor is not None
    assert {id(p) for p in layer} <= {id(p) for _, p in monitor._host}
    rig.train(1)


def test_saved_host_shapes_that_do_not_fit_their_slot_are_dropped(rig: Rig) -> None:
    """A checkpoint's host shapes are parsed before a rollback changes anything, and an entry
    that is malformed or does not fit its slot is dropped (that slot's cost is then unchecked
    until its first forward), never raised from the rollback's commit."""
    registry = rig.manager.state.require_registry()
    slot = rig.slot.layer_id  # the Rig's slot: two seeds of width 2 on a 4-wide output
    good = {"input": [16, 6], "dtype": "torch.float32", "output": [16, 4]}
    assert parse_host_shapes({slot: good}, registry) == {slot: ((16, 6), torch.float32, (16, 4))}
    for bad in (
        {**good, "input": [float("inf"), 6]},
        {**good, "input": [2**16, 2**16]},  # 2^32 elements: G3 would run the host on them
        {**good, "output": [16, 5]},  # not the seeds' width
        {**good, "dtype": "int64"},
        {**good, "dtype": "no_such_dtype"},
        {"input": [16, 6]},
        torch.zeros(3),
        "16x6",
    ):
        assert parse_host_shapes({slot: bad}, registry) == {}, bad
    assert parse_host_shapes(None, registry) == {} and parse_host_shapes([good], registry) == {}


def test_a_resume_that_cannot_use_the_checkpoint_says_what_differs(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """A restart attached with another ``seeds_per_layer`` was refused "not for this model's
    seeds", naming none; one whose ``checkpoint_dir`` moved was told "none kept yet", naming
    no directory. The refusals name the seeds that differ and the store that was looked in."""
    rig = Rig(make_config(tmp_path, store, run_id="resumed"), keyring)
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    rig.manager.end_epoch(0)
    rig.manager.close()

    def restart(seeds_per_layer: int, **overrides: str) -> str:
        config = make_config(tmp_path, store, run_id="resumed", **overrides)
        with KasminaKernelManager(config, keyring=keyring) as manager:
            model = Host()
            manager.attach(model, "out", seeds_per_layer, 4 // seeds_per_layer)
            record_activations(model, torch.randn(16, 6))
            assert not rollback(manager, keyring, 0)
            return manager.command_log[-1][-1]

    reason = restart(1)
    assert "its seeds not here: ['out[1]']; seeds here it lacks: []" in reason
    assert "seeds_per_layer" in reason
    moved = tmp_path / "moved"
    reason = restart(2, checkpoint_dir=str(moved))
    assert f"none kept yet of run 'resumed' in the signed disk ({moved}) store" in reason


def test_a_rollback_after_a_dtype_conversion_reattaches_the_kernel_in_that_dtype(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """A model converted to bf16 mid-run (its kernels follow), checkpointed, then a seed
    culled: the ROLLBACK re-attached a fresh copy of the artifact in its own float32 and
    refused the checkpoint's bf16 kernel weights ("build the model in the checkpoint's
    dtype"), which no user action could fix. The copy takes the dtypes the checkpoint holds."""
    from torch.nn import functional as F

    rig = Rig(make_config(tmp_path, store), keyring)
    manager = rig.manager

    def step() -> None:
        manager.backward(F.cross_entropy(rig.model(rig.x).float(), rig.y))
        manager.step(grad_clip_norm=1.0)

    assert rig.send("germinate", SEED0, mlp)
    step()
    rig.model.to(torch.bfloat16)
    rig.x = rig.x.to(torch.bfloat16)
    step()
    manager.end_epoch(0)
    saved = {k: v.clone() for k, v in manager.seed(SEED0).kernel.state_dict().items()}
    assert rig.send("cull", SEED0)
    step()
    manager.end_epoch(1)
    assert rollback(manager, keyring, 0), manager.command_log[-1][-1]
    kernel = manager.seed(SEED0).kernel
    assert rig.stage(SEED0) == S.ISOLATED_INIT and kernel is not None
    assert_same(dict(kernel.state_dict()), saved)
    step()


class Float64Constant(torch.nn.Module):
    """A residual kernel scaled by a float64 non-persistent buffer (outside its state_dict)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.register_buffer("c", torch.tensor([1 + 1e-12], dtype=torch.float64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(x) * (self.c - 1).mul(1e12).to(x.dtype)


def test_a_rollback_leaves_a_kernels_tensors_outside_its_state_in_their_dtype(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """The cast to the checkpoint's dtypes moved the whole re-attached kernel to the one dtype
    its saved state holds, a float64 tensor outside that state included: the program then
    raised on every call and the seed was quarantined. A kernel already in the saved dtypes
    is left as it is."""
    from kasmina.urza.publish import publish_artifact
    from tests.manager.helpers import PUBLISHER

    artifact = publish_artifact(
        Float64Constant(), [torch.randn(3, 2)], str(store), "f64", PUBLISHER
    )
    rig = Rig(make_config(tmp_path, store), keyring)
    manager = rig.manager
    assert rig.send("germinate", SEED0, artifact.artifact_id)
    rig.train(1)
    manager.end_epoch(0)
    assert rig.send("cull", SEED0)
    rig.train(1)
    manager.end_epoch(1)
    assert rollback(manager, keyring, 0), manager.command_log[-1][-1]
    rig.train(4)
    seed = manager.seed(SEED0)
    assert seed.stage == S.ISOLATED_INIT and seed.faults == 0, list(seed.fault_log)


def test_a_resume_that_attaches_the_slots_in_another_order_is_refused(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """Two ``attach`` calls on one table (slots of two widths) take rows in call order. A
    restarted process that made them in the other order got the checkpoint's table back row by
    row, and the kernels and weights by seed id: the rollback was accepted, the grown seed came
    back DORMANT beside its kernel, and another seed ACTIVE with none. Refused, naming the rows,
    with every bit as it was; the same order resumes."""
    from kasmina.seeds.inject import attach
    from kasmina.seeds.table import GPUStateTensor

    config = make_config(tmp_path, store, run_id="resume")

    def start(order: tuple[str, str]) -> tuple[KasminaKernelManager, Host]:
        manager, model = KasminaKernelManager(config, keyring=keyring), Host()
        table = GPUStateTensor(4, torch.device("cpu"))
        for name in order:
            attach(model, name, 2, {"inp": 4, "out": 2}[name], state=table)
        manager.register(model, host_lr=0.05, seed_lr=0.05)
        record_activations(model, torch.zeros(16, 6))
        return manager, model

    first, _ = start(("inp", "out"))
    assert signed(first, keyring, make_seed_command("germinate", SEED0, mlp, {}))
    first.end_epoch(0)
    first.close()
    manager, model = start(("out", "inp"))
    before = everything(manager, model)
    assert not rollback(manager, keyring, 0)
    reason = manager.command_log[-1][3]
    assert "has seed inp[0] on state-table row 0, this model on row 2" in reason, reason
    assert_same(before, everything(manager, model))
    assert manager.seed(SEED0).kernel is None
    manager.close()
    manager, _ = start(("inp", "out"))
    assert rollback(manager, keyring, 0) and manager.seed(SEED0).kernel is not None
    assert manager.stages()[SEED0] == S.ISOLATED_INIT
    manager.close()


def test_a_rollback_while_the_model_is_in_float64_is_refused_until_it_is_converted_back(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """A model converted to float64 mid-run trains on, but a ROLLBACK rebuilds the optimizers,
    which take fp32/fp16/bf16 parameters only: refused with nothing changed (README), and once
    the model is back in the checkpoint's dtype the same rollback applies."""
    rig = Rig(make_config(tmp_path, store), keyring)
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    rig.manager.end_epoch(0)
    rig.model.double()
    rig.x = rig.x.double()
    rig.train(1)
    before = everything(rig.manager, rig.model)
    assert not rollback(rig.manager, keyring, 0)
    assert "float32, float16 or bfloat16, got torch.float64" in rig.manager.command_log[-1][3]
    assert_same(before, everything(rig.manager, rig.model))
    rig.model.float()
    rig.x = rig.x.float()
    assert rollback(rig.manager, keyring, 0) and rig.manager.state.epoch == 0
    rig.train(1)
    rig.manager.close()
