"""``kd.graph.sum_kd_losses`` over the KD losses of slots on several devices."""

from __future__ import annotations

import torch

from kasmina.kd.graph import is_kd_root, sum_kd_losses


def test_kd_losses_on_several_devices_are_summed_on_the_first_ones() -> None:
    """A model spread over devices has slots that compute their KD losses on their own
    (teacher logits are handed to each on its device): ``torch.stack`` refused the mix, so
    ``manager.collect_kd_losses()`` raised. The sum is now on the first loss's device, each
    loss still marked as a KD root. (The meta device stands in for a second device: a CPU-only
    test; ``.to`` from the CPU to it is what a move between two GPUs is.)"""
    weight = torch.ones(3, device="meta", requires_grad=True)
    first = (weight * 2.0).sum()
    second = (torch.ones(2, 3, requires_grad=True) * 3.0).sum(-1)  # per-row, summed first
    losses = [first, second]
    total = sum_kd_losses(losses)
    assert total is not None and total.device.type == "meta" and total.dim() == 0
    assert total.grad_fn is not None and losses == []
    assert is_kd_root(first.grad_fn) and is_kd_root(second.grad_fn)


def test_kd_losses_on_one_device_sum_to_their_total() -> None:
    a = torch.tensor(1.5, requires_grad=True)
    b = torch.tensor([2.0, 0.25], requires_grad=True)
    total = sum_kd_losses([a * 1.0, b * 1.0])
    assert total is not None and total.item() == 3.75
    total.backward()
    assert a.grad is not None and b.grad is not None
    assert a.grad.item() == 1.0 and b.grad.tolist() == [1.0, 1.0]


def test_kd_losses_without_a_graph_are_summed_unmarked() -> None:
    """Losses computed under ``torch.no_grad()`` (an evaluation's forward with teacher logits)
    have no node to mark: they are summed as they are, a slot's sum of them summed again too."""
    weight = torch.ones(3, requires_grad=True)
    with torch.no_grad():
        slot = sum_kd_losses([(weight * 2.0).sum(), torch.ones(2)])
    assert slot is not None and slot.grad_fn is None and slot.item() == 8.0
    total = sum_kd_losses([slot, torch.tensor(0.5)])
    assert total is not None and total.grad_fn is None and total.item() == 8.5
