"""``read_flags``: the values of one-element bool tensors, in order, one transfer per device."""

from __future__ import annotations

import pytest
import torch

from kasmina.utils import flags as flags_module
from kasmina.utils.flags import read_flags


def test_values_in_order_and_views_of_one_buffer() -> None:
    buffer = torch.tensor([True, False, True])
    flags = [buffer[2], torch.tensor(False), buffer[1], torch.tensor([True]), buffer[0]]
    assert read_flags(flags) == [True, False, False, True, True]
    assert read_flags([torch.tensor(False)]) == [False]
    assert read_flags([]) == []
    assert all(type(v) is bool for v in read_flags(flags))


def test_one_transfer_per_device_and_positions_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags on two devices (meta stands in for a second one): one read per device, each
    value put back where its flag was."""
    groups: list[list[torch.device]] = []

    def fake_read(flags):
        groups.append([f.device for f in flags])
        return [f.device.type == "meta" for f in flags]

    monkeypatch.setattr(flags_module, "_read", fake_read)
    cpu, meta = torch.tensor(False), torch.empty((), dtype=torch.bool, device="meta")
    assert read_flags([cpu, meta, cpu, meta, meta]) == [False, True, False, True, True]
    assert [len(g) for g in groups] == [2, 3] and all(len(set(g)) == 1 for g in groups)


@pytest.mark.parametrize(
    "bad",
    [torch.tensor(1), torch.tensor([True, False]), torch.tensor(1.0), True, None],
    ids=["int", "two-elements", "float", "python-bool", "none"],
)
def test_anything_but_one_element_bool_tensors_is_refused(bad, monkeypatch) -> None:
    monkeypatch.setattr(flags_module, "_read", lambda flags: pytest.fail("read before checking"))
    with pytest.raises(ValueError, match=r"flags\[1\] must be a one-element bool tensor"):
        read_flags([torch.tensor(True), bad])
