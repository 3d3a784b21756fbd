"""``model.load_state_dict`` of a snapshot into a model a manager holds (docs/design.md §6a).

Hugging Face Trainer's ``load_best_model_at_end`` does this with a snapshot of an earlier step.
A state saved in the same stage with the same kernel loads bit for bit; one that would give or
take a seed's kernel, swap its artifact or change its stage is refused before anything is
written, whatever the strictness, since the kernel's optimizer, monitor, hook and pin belong to
the manager (its own ROLLBACK may change a stage). A seed's kernel weights must also be exactly
those in the state_dict before anything loads.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kasmina
from kasmina.urza.blueprints import ResidualMLP
from kasmina.urza.publish import publish_artifact
from kasmina.utils.keyring import Keyring, generate_key
from kasmina.utils.state_io import clone_state
from tests.manager.helpers import (
    PUBLISHER,
    SEED0,
    Host,
    Rig,
    S,
    make_config,
    run_command,
    through_a_seed,
)

REFUSED = "signed ROLLBACK"


@pytest.fixture
def rig(tmp_path: Path) -> tuple[Rig, str, str]:
    """A managed Host with two published artifacts of the same shape (other weights)."""
    store = tmp_path / "urza"
    ids = []
    for k, name in enumerate(("mlp-a", "mlp-b")):
        torch.manual_seed(10 + k)
        artifact = publish_artifact(
            ResidualMLP(2, 2), [torch.randn(3, 2)], str(store), name, PUBLISHER
        )
        ids.append(artifact.artifact_id)
    keyring = Keyring({"ctl": generate_key()})
    rig = Rig(make_config(tmp_path, store, performance_gate=0), keyring)
    rig.train(1)
    return rig, ids[0], ids[1]


def _grow_to_grafting(rig: Rig, artifact_id: str, epoch: int = 0) -> None:
    assert rig.send("germinate", SEED0, artifact_id)
    rig.train(2)
    rig.manager.end_epoch(epoch)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.COMPATIBILITY_CHECK
    rig.train(1)  # the forward probes the kernel (G3)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.GRAFTING
    rig.train(1)


def _everything(rig: Rig) -> dict[str, Any]:
    """All a load could touch, and all the manager keeps about the seeds."""
    manager = rig.manager
    registry = manager.require_registry()
    return {
        "model": clone_state(rig.model.state_dict()),
        "table": registry.table.state_tensor.clone(),
        "stages": registry.table.stages(),
        "epochs": [registry.table.epochs_in_state(r.index) for r in registry],
        "optimizers": clone_state(manager.state.optimizers.state_dict()),
        "seed_optimizers": list(manager.state.optimizers.seed_ids),
        "pins": dict(manager.state.kernel_cache._pins),
        "records": [
            (r.seed_id, r.kernel, r.seed.kernel, r.pinned, r.monitor, r.hook, r.artifact_id)
            for r in registry
        ],
        "seeds": [
            (s.alpha_value, s.gate_score, s.faults, s.isolation_violations, s.nonfinite_events)
            for s in (r.seed for r in registry)
        ],
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a is b or a == b


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
def test_a_snapshot_from_before_germinate_is_refused_and_changes_nothing(rig, strict) -> None:
    rig, artifact_id, _ = rig
    dormant = clone_state(rig.model.state_dict())  # the seed DORMANT, no kernel
    _grow_to_grafting(rig, artifact_id)
    before = _everything(rig)
    with pytest.raises(ValueError, match=REFUSED) as refused:
        rig.model.load_state_dict(dormant, strict=strict)
    assert "saved in DORMANT without a kernel" in str(refused.value)
    assert "holds one in GRAFTING" in str(refused.value)
    assert _same(_everything(rig), before)
    # The seed is still its manager's: it trains, and a CULL takes it (and its pin) away.
    assert SEED0 in rig.train(1)["seeds_stepped"]
    assert rig.send("cull", SEED0) and rig.stage(SEED0) == S.COOLDOWN
    assert rig.manager.seed(SEED0).kernel is None
    assert not rig.manager.state.kernel_cache._pins.get(artifact_id)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
def test_a_snapshot_holding_another_artifact_is_refused(rig, strict) -> None:
    rig, first, second = rig
    _grow_to_grafting(rig, first)
    other = clone_state(rig.model.state_dict())  # same shapes, the other artifact
    assert rig.send("cull", SEED0)
    for epoch in (1, 2, 3):  # COOLDOWN -> RECYCLING -> DORMANT
        rig.manager.end_epoch(epoch)
    assert rig.stage(SEED0) == S.DORMANT
    _grow_to_grafting(rig, second, epoch=4)
    before = _everything(rig)
    with pytest.raises(ValueError, match="of another artifact"):
        rig.model.load_state_dict(other, strict=strict)
    assert _same(_everything(rig), before)
    assert rig.send("cull", SEED0)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
def test_a_snapshot_of_the_same_stage_loads_bit_for_bit(rig, strict) -> None:
    """A resume, or ``load_best_model_at_end`` of a snapshot taken in the same stage."""
    rig, artifact_id, _ = rig
    _grow_to_grafting(rig, artifact_id)
    snapshot = clone_state(rig.model.state_dict())
    alpha = rig.manager.seed(SEED0).alpha_value
    rig.train(2)  # the weights move on, and the seed's blend with them
    assert rig.manager.seed(SEED0).alpha_value != alpha
    result = rig.model.load_state_dict(snapshot, strict=strict)
    assert not result.missing_keys and not result.unexpected_keys
    assert _same(clone_state(rig.model.state_dict()), snapshot)
    assert rig.stage(SEED0) == S.GRAFTING and rig.manager.seed(SEED0).alpha_value == alpha
    assert SEED0 in rig.train(1)["seeds_stepped"]
    assert rig.send("cull", SEED0)


@pytest.mark.parametrize("host_lr", [1e-3, None], ids=["host-optimizer", "trainers-host"])
def test_a_seeds_kernel_loaded_with_assign_is_refused_at_the_step(tmp_path: Path, host_lr) -> None:
    """``load_state_dict(assign=True)`` of a snapshot the seed accepts puts new parameters in
    its kernel, while its optimizer holds the old ones: the step counted every parameter of a
    seed as stepped (and, without the manager's host optimizer, checked none), reported the
    seed stepped and never changed the kernel the model runs again. The step names them."""
    store = tmp_path / "urza"
    torch.manual_seed(10)
    artifact = publish_artifact(ResidualMLP(2, 2), [torch.randn(3, 2)], str(store), "m", PUBLISHER)
    rig = Rig(make_config(tmp_path, store), Keyring({"ctl": generate_key()}), host_lr=host_lr)
    assert rig.send("germinate", SEED0, artifact.artifact_id)
    rig.train(1)
    snapshot = {k: v.clone() for k, v in rig.model.state_dict().items() if ".seeds.0." in k}
    rig.train(1)
    rig.model.load_state_dict(snapshot, strict=False)  # a plain load: trains on
    assert SEED0 in rig.train(1)["seeds_stepped"]
    rig.model.load_state_dict(snapshot, strict=False, assign=True)
    step = rig.manager.global_step
    with pytest.raises(
        RuntimeError, match=r"\['out.seeds.0.kernel.inner.fc1.weight'.*without assign"
    ):
        rig.train(1)
    assert rig.manager.global_step == step
    rig.manager.close()


def test_a_snapshot_mid_grafting_resumes_its_alpha_schedule_bit_for_bit(rig) -> None:
    """The schedule's position comes back with the seed's alpha: training on from a loaded
    snapshot (model and optimizers) repeats the uninterrupted run, alphas and weights."""
    rig, artifact_id, _ = rig
    _grow_to_grafting(rig, artifact_id)
    model, optimizers = rig.model, rig.manager.state.optimizers
    snapshot = clone_state(model.state_dict()), clone_state(optimizers.state_dict())

    def go_on() -> tuple[list[float], dict[str, torch.Tensor]]:
        alphas = []
        for _ in range(2):
            rig.train(1)
            alphas.append(rig.manager.seed(SEED0).alpha_value)
        return alphas, clone_state(model.state_dict())

    alphas, weights = go_on()
    assert len(set(alphas)) == 2 and rig.stage(SEED0) == S.GRAFTING
    model.load_state_dict(snapshot[0])
    optimizers.load_state_dict(snapshot[1])
    again, resumed = go_on()
    assert again == alphas and _same(resumed, weights)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
def test_a_snapshot_of_another_stage_is_refused_and_a_rollback_still_restores_it(
    rig, strict
) -> None:
    """The same kernel in an earlier stage (``load_best_model_at_end`` of a GRAFTING snapshot
    into a STABILIZATION seed): the stage would change behind the manager, whose optimizer
    layout and gates follow it. Only its own signed ROLLBACK takes a seed back a stage."""
    from kasmina.control.builders import make_rollback_command

    rig, artifact_id, _ = rig
    _grow_to_grafting(rig, artifact_id)
    rig.manager.end_epoch(1)  # the checkpoint holds the seed in GRAFTING
    grafting = clone_state(rig.model.state_dict())
    rig.train(4)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.STABILIZATION
    before = _everything(rig)
    with pytest.raises(ValueError, match="saved in GRAFTING and the seed is STABILIZATION"):
        rig.model.load_state_dict(grafting, strict=strict)
    assert _same(_everything(rig), before)
    assert run_command(rig.manager, rig.signed(make_rollback_command(1)))
    assert rig.stage(SEED0) == S.GRAFTING
    assert SEED0 in rig.train(1)["seeds_stepped"]


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
def test_a_kernelless_seeds_stage_is_the_managers_too(rig, strict) -> None:
    """A culled seed (COOLDOWN, no kernel) must not skip its embargo to DORMANT through a
    snapshot, nor a TERMINATED one come back to life."""
    from kasmina.control.builders import make_seed_command

    rig, artifact_id, _ = rig
    dormant = clone_state(rig.model.state_dict())
    _grow_to_grafting(rig, artifact_id)
    assert rig.send("cull", SEED0) and rig.stage(SEED0) == S.COOLDOWN
    before = _everything(rig)
    with pytest.raises(ValueError, match="saved in DORMANT and the seed is COOLDOWN"):
        rig.model.load_state_dict(dormant, strict=strict)
    assert _same(_everything(rig), before)
    terminate = rig.signed(make_seed_command("terminate", "out[1]"))
    assert run_command(rig.manager, terminate) and rig.stage("out[1]") == S.TERMINATED
    only_terminated = {k: v for k, v in dormant.items() if ".seeds.0." not in k}
    with pytest.raises(ValueError, match="saved in DORMANT and the seed is TERMINATED"):
        rig.model.load_state_dict(only_terminated, strict=False)
    assert rig.stage("out[1]") == S.TERMINATED and rig.stage(SEED0) == S.COOLDOWN


def test_only_the_managed_model_is_owned(rig) -> None:
    """The artifact rule is the manager's: a deep copy of its model has no manager."""
    rig, artifact_id, _ = rig
    _grow_to_grafting(rig, artifact_id)
    twin = copy.deepcopy(rig.model)
    table = rig.manager.require_registry().table
    assert table.owned(0) and table.owned(1)
    assert not twin.out.state_table.owned(0) and not twin.out.state_table.owned(1)


def _attached(kernel: bool) -> tuple[nn.Module, kasmina.KasminaLayer]:
    model = Host()
    slot = kasmina.attach(model, "out", 2, 2)[0]
    if kernel:
        torch.manual_seed(5)
        slot.seed(0).attach_kernel(ResidualMLP(2, 2))
    return model, slot


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
def test_a_seed_state_loads_with_its_kernels_weights_or_not_at_all(strict) -> None:
    """Without a manager too, whatever the strictness: a state saved while the seed had no
    kernel, into a seed that has one (its weights are missing), or the other way round (they
    are unexpected), is refused before any module loads. A state_dict without the seeds' states
    (a host-only partial load) still loads what fits."""
    cases = ((False, True, "without a kernel"), (True, False, "with a kernel"))
    for source_kernel, target_kernel, words in cases:
        source, _ = _attached(source_kernel)
        with torch.no_grad():
            for p in source.parameters():
                p.add_(1.0)
        state = clone_state(source.state_dict())
        target, slot = _attached(target_kernel)
        before = clone_state(target.state_dict())
        with pytest.raises(
            ValueError, match=rf"seed out\[0\]: the state was saved in DORMANT {words}"
        ):
            target.load_state_dict(state, strict=strict)
        assert _same(clone_state(target.state_dict()), before)
        # The kernel weights alone, without the seed's state: the keys decide.
        extra = "out.seeds.0._extra_state"
        keys = {k: v for k, v in state.items() if k != extra}
        keys[extra] = before[extra]
        with pytest.raises(ValueError, match=r"does not hold its kernel's weights"):
            target.load_state_dict(keys, strict=strict)
        assert _same(clone_state(target.state_dict()), before)
        host = {k: v for k, v in state.items() if ".seeds." not in k}
        result = target.load_state_dict(host, strict=False)
        assert all(".seeds." in k for k in result.missing_keys) and not result.unexpected_keys
        assert torch.equal(target.inp.weight, source.inp.weight)
        assert (
            slot.seed(0).stage == S.DORMANT and (slot.seed(0).kernel is not None) == target_kernel
        )


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
def test_a_seed_state_whose_kernel_has_other_shapes_is_refused_before_any_module_loads(
    strict,
) -> None:
    """The kernel's key names alone were checked: a state saved with a kernel of the same
    structure and other widths passed, and PyTorch raised at the kernel's size mismatch after
    writing the host's weights and the seed's state (a DORMANT seed left GRAFTING on weights
    that never loaded)."""
    source = Host()
    slot = kasmina.attach(source, "out", 2, 2)[0]
    slot.seed(0).attach_kernel(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2)))
    for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING):
        slot.seed(0).transition_to(stage)
    state = clone_state(source.state_dict())
    target = Host()
    torch.manual_seed(3)
    twin = kasmina.attach(target, "out", 2, 2)[0]
    twin.seed(0).attach_kernel(nn.Sequential(nn.Linear(2, 5), nn.Linear(5, 2)))
    before = clone_state(target.state_dict())
    with pytest.raises(ValueError, match=r"out\[0\]: .* other shapes .*\(out.seeds.0.kernel.0"):
        target.load_state_dict(state, strict=strict)
    assert _same(clone_state(target.state_dict()), before)
    assert twin.seed(0).stage == S.DORMANT


def test_a_kernel_whose_module_resizes_a_buffer_as_it_loads_still_loads() -> None:
    """A QAT ``FakeQuantize`` keeps one-element scales until its first forward and takes the
    per-channel ones a state holds as it loads: torch loads it, and so does the shape check."""
    from torch.ao.quantization import FakeQuantize, MovingAveragePerChannelMinMaxObserver

    def qat_kernel() -> nn.Module:
        fake = FakeQuantize(
            observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=1,
        )  # fmt: skip
        return nn.Sequential(nn.Linear(2, 2), fake)

    models = []
    for _ in range(2):
        model = Host()
        slot = kasmina.attach(model, "out", 2, 2)[0]
        slot.seed(0).attach_kernel(qat_kernel())
        for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING):
            slot.seed(0).transition_to(stage)
        models.append(model)
    models[0](torch.randn(8, 6))  # the observer fills: per-channel scales
    state = clone_state(models[0].state_dict())
    assert state["out.seeds.0.kernel.1.scale"].shape == (2,)
    models[1].load_state_dict(state)
    assert _same(clone_state(models[1].state_dict()), state)


def test_a_load_into_a_slots_seeds_alone_is_checked_before_any_seed_loads() -> None:
    """``slot.seeds.load_state_dict`` had no check of its own: seed 0 took its state (DORMANT
    to TERMINATED) before seed 1 refused a state saved with a kernel it does not have."""
    source, slot = _attached(kernel=False)
    slot.seed(0).transition_to(S.TERMINATED)
    slot.seed(1).attach_kernel(nn.Linear(2, 2))
    for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING):
        slot.seed(1).transition_to(stage)
    state = clone_state(slot.seeds.state_dict())
    target, twin = _attached(kernel=False)
    before = clone_state(target.state_dict())
    with pytest.raises(ValueError, match=r"seed out\[1\]: the state was saved in GRAFTING with"):
        twin.seeds.load_state_dict(state)
    assert _same(clone_state(target.state_dict()), before) and twin.stages() == [S.DORMANT] * 2
    twin.seed(1).attach_kernel(nn.Linear(2, 2))  # a seed that can take it: all of it loads
    twin.seeds.load_state_dict(state)
    assert twin.stages() == [S.TERMINATED, S.GRAFTING]


def test_a_snapshots_isolation_violations_are_the_breakers_too(tmp_path: Path) -> None:
    """A snapshot's seed state restored its violation count, but the seed's monitor kept its
    own: the reports said 0 while the breaker stood at 2, the next clean step put 2 back, and
    one leak after the load quarantined the seed "after 3". The breaker counts on from the
    count the load restored, as the reports do."""
    from torch.nn import functional as F

    from kasmina.kd.config import KDConfig

    store = tmp_path / "urza"
    torch.manual_seed(10)
    aid = publish_artifact(ResidualMLP(2, 2), [torch.randn(3, 2)], str(store), "m", PUBLISHER)
    kd = KDConfig(temperature=2.0, alpha=1.0)
    keyring = Keyring({"ctl": generate_key()})
    rig = Rig(make_config(tmp_path, store, kd_enabled=True, kd=kd), keyring)
    assert rig.send("germinate", SEED0, aid.artifact_id)
    manager, seed = rig.manager, rig.manager.seed(SEED0)
    snapshot = clone_state(rig.model.state_dict())  # no violation yet
    host_weight = rig.model.inp.weight

    def leaking_step() -> None:  # the KD loss reaches a host weight
        rig.slot.set_teacher_logits(torch.randn(16, 4))
        loss = F.cross_entropy(rig.model(rig.x), rig.y)
        manager.backward(
            loss, kd_loss=through_a_seed(manager.collect_kd_losses() + 1e-2 * host_weight.sum())
        )
        manager.step()

    leaking_step()
    leaking_step()
    assert seed.isolation_violations == 2
    rig.model.load_state_dict(snapshot)
    assert seed.isolation_violations == 0
    rig.train(1)
    assert seed.isolation_violations == 0
    leaking_step()
    assert seed.isolation_violations == 1 and rig.stage(SEED0) == S.ISOLATED_INIT
