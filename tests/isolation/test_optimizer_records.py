"""What IsolatedOptimizerManager records of its steps (``last_grad_norm``, ``norms_now``) and
how a seed's records end when its optimizer goes (removed, or promoted into the host's)."""

from __future__ import annotations

import pytest
import torch

from kasmina.isolation.optimizers import IsolatedOptimizerManager
from tests.isolation.helpers import fill_grads, models


def _clipped_once() -> tuple[IsolatedOptimizerManager, torch.nn.Module]:
    host, seed = models()
    opts = IsolatedOptimizerManager()
    opts.initialize_host(host.parameters())
    opts.create_seed_optimizer("s0", seed.parameters())
    fill_grads(host, seed)
    assert opts.step_many(["host", "s0"], grad_clip_norm=1.0) == [True, True]
    assert set(opts.last_grad_norm) == {"host", "s0"}
    return opts, seed


@pytest.mark.parametrize("end", ["removed", "promoted"])
def test_a_seed_whose_optimizer_goes_leaves_no_grad_norm_behind(end: str) -> None:
    """A removed or promoted seed's last clipped norm is dropped with its optimizer: a stale
    device tensor kept under its id would read as the norm of a seed of that id made later."""
    opts, _ = _clipped_once()
    if end == "removed":
        opts.remove_seed("s0")
    else:
        opts.promote_seed("s0")
    assert set(opts.last_grad_norm) == {"host"}


def test_an_unclipped_step_reports_no_norms() -> None:
    """``norms_now`` holds the finiteness of the norms the last call clipped by: a call that
    clipped nothing measured none, and reports none (not every optimizer as finite)."""
    opts, seed = _clipped_once()
    assert opts.norms_now == {"host": True, "s0": True}
    fill_grads(seed)
    assert opts.step_many(["host", "s0"], grad_clip_norm=0.0) == [True, True]
    assert opts.norms_now == {}
    assert opts.step_many(["s0"], grad_clip_norm=None) == [True]
    assert opts.norms_now == {}
