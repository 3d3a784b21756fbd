"""G2 counts the epochs a seed *trained* in ISOLATED_INIT (docs/design.md §3): an epoch counts
when the seed's optimizer stepped it with a gradient during it, not when it merely passed. The
count is part of the seed's saved state, so a checkpoint and a ROLLBACK bring it back exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from torch.nn import functional as F

from kasmina.control.builders import make_rollback_command
from kasmina.seeds.extra_state import decode_extra_state, encode_extra_state
from kasmina.utils.keyring import Keyring
from kasmina.utils.state_io import clone_state
from tests.manager.helpers import SEED0, Rig, S, loads_changed, make_config, run_command
from tests.manager.test_resume import assert_same


def three_epoch_rig(tmp_path: Path, store: Path, keyring: Keyring) -> Rig:
    return Rig(make_config(tmp_path, store, min_isolated_epochs=3), keyring)  # the default


def refusal(rig: Rig) -> str:
    return rig.manager.command_log[-1][3]


def test_a_seed_that_never_trained_is_refused_until_it_trains_in_three_epochs(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    rig = three_epoch_rig(tmp_path, store, keyring)
    manager, seed = rig.manager, rig.manager.seed(SEED0)
    assert rig.send("germinate", SEED0, mlp)
    for epoch in (1, 2, 3):  # no forward, no backward, no step() at all
        manager.end_epoch(epoch)
    assert seed.epochs_in_stage == 3 and seed.trained_epochs == 0
    assert not rig.send("advance", SEED0)
    assert rig.stage(SEED0) == S.ISOLATED_INIT
    assert "G2 refused: trained in 0 of the 3 epochs G2 needs" in refusal(rig)
    for epoch in (4, 5):
        rig.train(2)
        manager.end_epoch(epoch)
    assert not rig.send("advance", SEED0) and "trained in 2 of the 3" in refusal(rig)
    rig.train(1)
    manager.end_epoch(6)
    assert seed.trained_epochs == 3
    assert rig.send("advance", SEED0), refusal(rig)
    assert rig.stage(SEED0) == S.COMPATIBILITY_CHECK


def test_a_seed_that_stepped_in_only_two_of_three_epochs_is_refused(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    rig = three_epoch_rig(tmp_path, store, keyring)
    manager, seed = rig.manager, rig.manager.seed(SEED0)
    assert rig.send("germinate", SEED0, mlp)
    rig.train(3)
    manager.end_epoch(0)
    # Epoch 1: step() runs the seed's optimizer, but no backward gave it anything to apply
    # (so the report does not name it as stepped).
    assert SEED0 not in manager.step()["seeds_stepped"]
    manager.end_epoch(1)
    rig.train(1)
    manager.end_epoch(2)
    assert seed.epochs_in_stage == 3 and seed.trained_epochs == 2
    assert not rig.send("advance", SEED0)
    assert rig.stage(SEED0) == S.ISOLATED_INIT
    assert "trained in 2 of the 3 epochs G2 needs" in refusal(rig)
    rig.train(1)
    manager.end_epoch(3)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.COMPATIBILITY_CHECK


def test_the_trained_epochs_round_trip_a_checkpoint_and_rollback_bitwise(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """The epoch checkpoint is written before the boundary's tick: it holds the epoch's mark
    (the seed trained), which the rollback's replay of the boundary counts again."""
    rig = three_epoch_rig(tmp_path, store, keyring)
    manager, seed = rig.manager, rig.manager.seed(SEED0)
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    manager.end_epoch(0)
    rig.train(2)
    manager.end_epoch(1)
    at_1 = clone_state(rig.model.state_dict())  # the seed's extra state holds the count
    assert (seed.trained_epochs, seed.trained_this_epoch) == (2, False)
    rig.train(2)
    manager.end_epoch(2)
    rig.train(1)  # mid-epoch: marked, not yet counted
    assert (seed.trained_epochs, seed.trained_this_epoch) == (3, True)
    assert run_command(manager, rig.signed(make_rollback_command(1))), refusal(rig)
    assert (seed.trained_epochs, seed.trained_this_epoch) == (2, False)
    assert_same(clone_state(rig.model.state_dict()), at_1)
    assert not rig.send("advance", SEED0) and "trained in 2 of the 3" in refusal(rig)
    rig.train(1)
    manager.end_epoch(2)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.COMPATIBILITY_CHECK


def test_a_checkpoint_from_before_the_count_resumes_to_the_verdict_it_had(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seed state saved before G2 counted trained epochs has neither count: every epoch in
    ISOLATED_INIT counts, as G2 then assumed, including the one under way when a checkpoint
    taken before its boundary's tick was written (the rollback replays that tick)."""
    rig = three_epoch_rig(tmp_path, store, keyring)
    manager, seed = rig.manager, rig.manager.seed(SEED0)
    assert rig.send("germinate", SEED0, mlp)
    for epoch in (0, 1, 2):
        rig.train(1)
        manager.end_epoch(epoch)
    assert seed.epochs_in_stage == 3 and rig.send("advance", SEED0)  # the run went on here

    def from_before_the_count(checkpoint: dict) -> None:
        weights = checkpoint["modules"]["model"]
        for key in [k for k in weights if k.endswith("._extra_state")]:
            older = decode_extra_state(weights[key])
            older.pop("trained_epochs"), older.pop("trained_this_epoch")
            weights[key] = encode_extra_state(older)

    loads_changed(manager, monkeypatch, from_before_the_count)
    assert run_command(manager, rig.signed(make_rollback_command(2))), refusal(rig)
    assert rig.stage(SEED0) == S.ISOLATED_INIT and seed.epochs_in_stage == 3
    assert seed.trained_epochs == 3
    assert rig.send("advance", SEED0), refusal(rig)  # as the run that wrote it decided


def test_the_grafting_alpha_advances_only_on_steps_that_train_the_seed(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """A step with no backward, or one whose non-finite gradients the clipping skips (a
    GradScaler overflow), trains the seed nothing: its alpha stays, and G4 does not pass a seed
    whose blend-in never trained."""
    rig = Rig(make_config(tmp_path, store), keyring)  # grafting_steps=4
    manager, seed = rig.manager, rig.manager.seed(SEED0)
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    manager.end_epoch(0)
    assert rig.send("advance", SEED0)
    rig.train(1)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.GRAFTING
    # The schedule's step 0, sigmoid((0 - 4 / 2) / 0.25), from the first GRAFTING step on: an
    # alpha of 0 would have given the seed no gradient in its first step.
    first = 1 / (1 + math.exp(8))
    assert seed.graft_step == 0 and float(seed.alpha) == pytest.approx(first, rel=1e-6)
    weights = [p.detach().clone() for p in seed.seed_parameters()]
    for overflow in (False, True):
        for _ in range(4):
            if overflow:
                manager.backward(F.cross_entropy(rig.model(rig.x), rig.y) * 1e38 * 1e10)
            manager.step(grad_clip_norm=1.0)
        assert seed.graft_step == 0 and float(seed.alpha) == pytest.approx(first, rel=1e-6)
        assert all(p.equal(w) for p, w in zip(seed.seed_parameters(), weights, strict=True))
        assert not rig.send("advance", SEED0) and rig.stage(SEED0) == S.GRAFTING
    rig.train(4)
    assert seed.graft_step == 4 and float(seed.alpha) > 0.99
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.STABILIZATION
