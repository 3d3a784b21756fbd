"""The committed Leyline code matches the .proto, and the contracts agree with the library."""

from __future__ import annotations

from pathlib import Path

import pytest

from kasmina.leyline import SeedLifecycleStage, SystemStatePacket, regen
from kasmina.stages import SeedStage


@pytest.mark.parametrize("name", regen.GENERATED)
def test_committed_generated_code_is_not_stale(tmp_path: Path, name: str) -> None:
    generated = {p.name: p for p in regen.generate(tmp_path)}
    committed = (regen.PACKAGE_DIR / name).read_bytes()
    assert generated[name].read_bytes() == committed, f"{name} is stale: run `make proto`"


def test_lifecycle_enum_matches_the_stage_table() -> None:
    proto = {name.removeprefix("SEED_STAGE_"): value for name, value in SeedLifecycleStage.items()}
    assert proto == {stage.name: stage.value for stage in SeedStage}


def reference_state_packet() -> SystemStatePacket:
    """docs/design.md §8's reference packet: version, epoch, accuracy and three training metrics."""
    return SystemStatePacket(
        version=1,
        current_epoch=42,
        validation_accuracy=0.9137,
        training_metrics={"loss": 0.2871, "grad_norm": 1.734, "lr": 3e-4},
    )


def test_reference_state_packet_round_trips_within_100_bytes() -> None:
    packet = reference_state_packet()
    raw = packet.SerializeToString()
    assert len(raw) <= 100
    assert SystemStatePacket.FromString(raw) == packet
