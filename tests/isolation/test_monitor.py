"""Gradient isolation: graph walk, two-phase monitor, debug hooks and the circuit breaker."""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch
from torch import nn

from kasmina.errors import GradientIsolationViolationError
from kasmina.isolation import monitor as monitor_module
from kasmina.isolation.monitor import GradientIsolationMonitor, default_emergency_dir
from kasmina.isolation.verify import (
    HostIndex,
    graph_isolation,
    named_params,
    verify_gradient_isolation,
)


def _host() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def _seed(host: nn.Sequential, kind: str) -> nn.Linear:
    seed = nn.Linear(8, 8)
    if kind == "shared":  # a seed built around a host parameter
        seed.weight = host[2].weight
    return seed


def _seed_output(host, seed, kind: str, x: torch.Tensor) -> torch.Tensor:
    hidden = host[1](host[0](x))
    return seed(hidden if kind == "no_detach" else hidden.detach())


def _seed_step(monitor, host, seed, kind: str, loss_scale: float = 1.0) -> bool:
    """One step whose seed-only loss (KD-like) is backpropagated in the seed phase."""
    out = _seed_output(host, seed, kind, torch.randn(5, 4))
    monitor.begin_seed_backward()
    (out.pow(2).mean() * loss_scale).backward()
    monitor.end_seed_backward()
    return monitor.verify_isolation_after_step()


def _monitor(host, seed, **kwargs) -> GradientIsolationMonitor:
    return GradientIsolationMonitor(
        "s0", seed.named_parameters(), host.named_parameters(), **kwargs
    )


def test_a_sparse_host_gradient_that_leaks_is_a_violation_not_an_error() -> None:
    """A host ``Embedding(sparse=True)`` that received a gradient in the seed phase made the
    leak check raise torch's own error out of ``end_seed_backward``: its values are checked."""
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 8, sparse=True)
    seed = nn.Linear(8, 8)
    monitor = GradientIsolationMonitor(
        "s0", seed.named_parameters(), embedding.named_parameters(), max_violations=100
    )
    out = seed(embedding(torch.tensor([1, 2, 3])))  # not detached: a leak into the host
    monitor.begin_seed_backward()
    out.pow(2).mean().backward()
    monitor.end_seed_backward()
    assert monitor.verify_isolation_after_step() is False
    assert embedding.weight.grad is None  # what leaked is dropped


@pytest.mark.parametrize("when", ["made", "cast after"])
def test_a_float64_model_is_monitored_and_its_leak_is_a_violation(when: str) -> None:
    """A monitor refused float64 parameters when made, and a model cast with ``.double()``
    after its monitor was made raised the leak check's dtype refusal out of
    ``end_seed_backward`` (out of the host's backward, in the manager's KD pass)."""
    host = _host()
    seed = _seed(host, "no_detach")
    if when == "made":
        host.double(), seed.double()
    monitor = _monitor(host, seed, tol=1e-3)
    host.double(), seed.double()
    for scale, clean in ((0.0, True), (1e-12, True), (1.0, False), (float("nan"), False)):
        out = _seed_output(host, seed, "no_detach", torch.randn(5, 4, dtype=torch.float64))
        monitor.begin_seed_backward()
        (out.pow(2).mean() * scale).backward()
        monitor.end_seed_backward()
        assert monitor.verify_isolation_after_step() is clean, scale
    assert all(p.grad is None for p in host.parameters())  # what leaked is dropped


@pytest.mark.parametrize("beside", [torch.float64, torch.complex64])
def test_a_tiny_leak_beside_a_parameter_of_another_dtype_is_a_violation(beside) -> None:
    """A float64 or complex host parameter sends the check to torch's norms: they squared an
    fp32 gradient in fp32, so a leak of 1e-30 beside it read as a norm of 0."""
    tiny = nn.Parameter(torch.ones(3))
    other = nn.Parameter(torch.ones(3, dtype=beside))
    seed_weight = nn.Parameter(torch.ones(3))
    monitor = GradientIsolationMonitor(
        "s", [("w", seed_weight)], [("tiny", tiny), ("other", other)], max_violations=100
    )
    monitor.begin_seed_backward()
    zero = (other * seed_weight).sum().real * 0  # the other parameter's gradient: zeros
    ((tiny * seed_weight * 1e-30).sum() + zero).backward()
    monitor.end_seed_backward()
    assert monitor.verify_isolation_after_step() is False


def test_a_complex_host_parameter_is_monitored_and_its_leak_is_a_violation() -> None:
    """A complex host parameter (a spectral layer's): its leak is a violation, not torch's
    refusal of a float64 norm of a complex gradient escaping ``end_seed_backward``."""
    host_weight = nn.Parameter(torch.randn(4, dtype=torch.complex64))
    seed_weight = nn.Parameter(torch.randn(4))
    monitor = GradientIsolationMonitor("s", [("w", seed_weight)], [("hw", host_weight)])
    monitor.begin_seed_backward()
    (host_weight * seed_weight).abs().sum().backward()  # reaches the host
    monitor.end_seed_backward()
    assert monitor.verify_isolation_after_step() is False and host_weight.grad is None


# ---------------------------------------------------------------- graph walk


@pytest.mark.parametrize("kind, clean", [("clean", True), ("no_detach", False), ("shared", False)])
def test_verify_gradient_isolation(kind, clean):
    host = _host()
    seed = _seed(host, kind)
    out = _seed_output(host, seed, kind, torch.randn(3, 4))
    assert verify_gradient_isolation(out, host.parameters()) is clean
    assert verify_gradient_isolation(out, dict(host.named_parameters())) is clean


def test_verify_handles_deep_graphs_and_edge_cases():
    host = _host()
    seed = nn.Linear(8, 8)
    hidden = host[1](host[0](torch.randn(2, 4)))
    clean, leaky = seed(hidden.detach()), seed(hidden)
    for _ in range(5000):  # deeper than Python's recursion limit
        clean, leaky = clean * 1.0001, leaky * 1.0001
    assert verify_gradient_isolation(clean, host.parameters())
    assert not verify_gradient_isolation(leaky, host.parameters())
    assert verify_gradient_isolation(torch.ones(3), host.parameters())  # no graph at all
    assert not verify_gradient_isolation(host[0].weight, host.parameters())
    with pytest.raises(ValueError, match="tensor"):
        verify_gradient_isolation([1.0], host.parameters())
    with pytest.raises(ValueError, match="host parameters must be tensors, got Linear"):
        graph_isolation(clean, [host[0]])  # a module where its parameters belong


def test_host_parameters_are_named_once_each_however_they_are_given() -> None:
    """A tensor given twice (by itself and by name, a tied weight) is one host parameter."""
    host = _host()
    weight = host[0].weight
    named = named_params([weight, ("tied", weight), host[0].bias], "host")
    assert [(name, id(t)) for name, t in named] == [
        ("host[0]", id(weight)),
        ("host[2]", id(host[0].bias)),
    ]


def test_an_extended_host_index_adds_what_it_lacks_and_is_shared_only_for_the_same_call() -> None:
    """Monitors extended alike share one index; another call (other tensors: a second seed
    fossilized) gets its own, which names the new tensors and not again the ones it had."""
    host = _host()
    index = HostIndex(named_params(host.named_parameters(), "host"))
    grown, other = nn.Linear(2, 2), nn.Linear(2, 2)
    keep = list
    first = index.extended([grown.weight, host[0].weight], "seed", keep)
    assert index.extended([grown.weight, host[0].weight], "seed", keep) is first
    assert (
        first.names[id(grown.weight)] == "seed[0]" and first.names[id(host[0].weight)] == "0.weight"
    )
    assert len(first.params) == len(index.params) + 1
    second = index.extended([other.weight], "seed", keep)
    assert second is not first and id(other.weight) in second.names
    assert id(grown.weight) not in second.names


# ---------------------------------------------------------------- two-phase monitor


def test_clean_seed_passes_and_host_grads_are_untouched():
    host = _host()
    seed = _seed(host, "clean")
    monitor = _monitor(host, seed)
    for p in host.parameters():
        p.grad = torch.full_like(p, 0.5)
    saved = {id(p): p.grad for p in host.parameters()}
    for _ in range(5):
        assert _seed_step(monitor, host, seed, "clean")
    assert monitor.violation_count == 0
    assert all(p.grad is saved[id(p)] and bool((p.grad == 0.5).all()) for p in host.parameters())
    assert all(p.grad is not None for p in seed.parameters())


@pytest.mark.parametrize("kind", ["no_detach", "shared"])
def test_leaky_seed_is_caught_and_the_leak_discarded(kind):
    host = _host()
    seed = _seed(host, kind)
    monitor = _monitor(host, seed)
    for p in host.parameters():
        p.grad = torch.full_like(p, 0.25)
    assert _seed_step(monitor, host, seed, kind) is False
    assert monitor.violation_count == 1
    assert any("host grad" in entry for entry in monitor.violations[0])
    assert all(bool((p.grad == 0.25).all()) for p in host.parameters())


def test_zero_gradient_is_not_a_leak_but_nan_is_even_above_tol():
    host = _host()
    seed = _seed(host, "no_detach")
    monitor = _monitor(host, seed, tol=1e6)
    assert _seed_step(monitor, host, seed, "no_detach", loss_scale=0.0)
    assert _seed_step(monitor, host, seed, "no_detach", loss_scale=1.0)  # below tol
    assert _seed_step(monitor, host, seed, "no_detach", loss_scale=float("nan")) is False


def test_host_phase_catches_a_seed_that_learns_from_the_host_loss():
    host = _host()
    seed = _seed(host, "clean")
    monitor = _monitor(host, seed)
    x, y = torch.randn(5, 4), torch.randn(5, 2)

    monitor.begin_host_backward()
    nn.functional.mse_loss(host(x), y).backward()
    monitor.end_host_backward()
    assert monitor.verify_isolation_after_step()

    hidden = host[1](host[0](x))
    out = host[4](host[3](host[2](hidden + seed(hidden.detach()))))
    monitor.begin_host_backward()
    nn.functional.mse_loss(out, y).backward()
    monitor.end_host_backward()
    assert monitor.verify_isolation_after_step() is False
    assert all(p.grad is None for p in seed.parameters())  # the leaked seed grads were dropped


def test_a_leak_in_the_second_phase_of_a_step_counts_beside_a_clean_first() -> None:
    """A step's checks are read together: a clean seed phase (zero host gradients, checked)
    followed by a host phase in which the seed learns from the host's loss is a violation."""
    host = _host()
    seed = _seed(host, "clean")
    monitor = _monitor(host, seed)
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    with monitor.seed_backward():  # every host parameter gets a gradient of zeros
        (_seed_output(host, seed, "no_detach", x).pow(2).mean() * 0.0).backward()
    hidden = host[1](host[0](x))
    out = host[4](host[3](host[2](hidden + seed(hidden.detach()))))
    with monitor.host_backward():
        nn.functional.mse_loss(out, y).backward()
    assert monitor.verify_isolation_after_step() is False
    names = [entry.split(" |g|")[0] for entry in monitor.violations[0]]
    assert names == ["seed grad weight", "seed grad bias"]
    assert all(entry.endswith("during host backward") for entry in monitor.violations[0])


def test_a_violation_names_only_the_parameters_that_leaked() -> None:
    """A host parameter whose gradient stayed at zero beside one that leaked is not named."""
    leaked, untouched = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    seed_weight = nn.Parameter(torch.ones(3))
    monitor = GradientIsolationMonitor(
        "s", [("w", seed_weight)], [("leaked", leaked), ("untouched", untouched)]
    )
    with monitor.seed_backward():
        ((leaked + untouched * 0.0) * seed_weight).sum().backward()
    assert monitor.verify_isolation_after_step() is False
    assert [entry.split(" |g|")[0] for entry in monitor.violations[0]] == ["host grad leaked"]


def test_context_managers_restore_grads_even_when_backward_fails():
    host = _host()
    seed = _seed(host, "no_detach")
    monitor = _monitor(host, seed)
    for p in host.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="boom"), monitor.seed_backward():
        _seed_output(host, seed, "no_detach", torch.randn(2, 4)).sum().backward()
        raise RuntimeError("boom")
    assert all(bool((p.grad == 1).all()) for p in host.parameters())
    assert monitor.verify_isolation_after_step() is False  # the leak before the error counts
    with monitor.host_backward():
        nn.functional.mse_loss(host(torch.randn(2, 4)), torch.zeros(2, 2)).backward()
    assert monitor.verify_isolation_after_step()


def test_check_graph_counts_at_the_next_verify():
    host = _host()
    seed = _seed(host, "no_detach")
    monitor = _monitor(host, seed)
    x = torch.randn(2, 4)
    assert monitor.check_graph(_seed_output(host, seed, "clean", x))
    assert monitor.verify_isolation_after_step()
    assert not monitor.check_graph(_seed_output(host, seed, "no_detach", x))
    assert monitor.verify_isolation_after_step() is False
    assert monitor.violations[0] == ["graph: seed output reaches a host parameter"]


def test_a_compiled_region_is_not_attributed_and_a_path_around_it_still_is(caplog):
    """An AOT-compiled region backpropagates through one node whose inputs are every parameter
    it read: a host parameter behind it cannot be attributed to the seed's output (None, and
    the monitor counts nothing), while a path that goes around it is still a leak."""
    torch._dynamo.reset()
    host, seed = _host(), nn.Linear(8, 8)
    monitor = _monitor(host, seed)
    x = torch.randn(3, 4)

    def both(x):  # a model's forward: the host's output and the (isolated) seed's
        hidden = host[1](host[0](x))
        return host[4](host[3](host[2](hidden))), seed(hidden.detach())

    _, out = torch.compile(both, backend="aot_eager", fullgraph=True)(x)
    assert type(out.grad_fn).__name__ == "CompiledFunctionBackward"
    assert graph_isolation(out, host.parameters()) is None
    assert not verify_gradient_isolation(out, host.parameters())  # conservative: reachable
    with caplog.at_level(logging.WARNING, logger="kasmina.isolation.monitor"):
        assert monitor.check_graph(out) is None
        assert monitor.check_graph(out * 2) is None
    assert monitor.unattributed_graphs == 2
    assert sum("cannot attribute" in r.getMessage() for r in caplog.records) == 1  # once
    assert monitor.verify_isolation_after_step()
    around = out + host[4].weight.sum()  # an eager path to the host beside the compiled node
    assert graph_isolation(around, host.parameters()) is False
    assert monitor.check_graph(around) is False
    assert monitor.verify_isolation_after_step() is False
    hidden = host[1](host[0](x))
    kernel_only = torch.compile(seed, backend="aot_eager")(hidden.detach())
    assert graph_isolation(kernel_only, host.parameters()) is True  # its inputs: seed params
    assert graph_isolation(seed(hidden.detach()), host.parameters()) is True


def test_phase_misuse_raises():
    host = _host()
    monitor = _monitor(host, _seed(host, "clean"))
    with pytest.raises(RuntimeError, match="without begin"):
        monitor.end_seed_backward()
    monitor.begin_seed_backward()
    with pytest.raises(RuntimeError, match="phase is open"):
        monitor.begin_host_backward()
    with pytest.raises(RuntimeError, match="still open"):
        monitor.verify_isolation_after_step()
    monitor.end_seed_backward()
    with pytest.raises(ValueError, match="max_violations"):
        _monitor(host, nn.Linear(2, 2), max_violations=0)


@pytest.mark.parametrize(
    ("setting", "bad"),
    [("tol", -1.0), ("tol", math.nan), ("tol", math.inf), ("tol", True)]
    + [("max_violations", 2.5), ("max_violations", True)],
    ids=repr,
)
def test_a_bad_tol_or_breaker_limit_is_refused_when_the_monitor_is_made(setting, bad) -> None:
    """Refused at construction, naming the setting: a bad ``tol`` was taken and raised only out
    of the first seed backward's ``end_seed_backward``, mid-step; a non-integer limit stood for
    another (``True``: trip at the first violation)."""
    host = _host()
    with pytest.raises(ValueError, match=setting):
        _monitor(host, _seed(host, "clean"), **{setting: bad})


def test_debug_hooks_name_the_leaking_parameters():
    host = _host()
    seed = _seed(host, "no_detach")
    monitor = _monitor(host, seed)
    monitor.register_hooks(host, seed)
    assert _seed_step(monitor, host, seed, "clean")  # hooks stay quiet on a clean step
    assert _seed_step(monitor, host, seed, "no_detach") is False
    assert "hook: host.0.weight during seed backward" in monitor.violations[0]
    monitor.clear_hooks()
    assert _seed_step(monitor, host, seed, "no_detach") is False
    assert not any(entry.startswith("hook") for entry in monitor.violations[1])


def test_triton_leak_check_path_catches_a_leak(triton_backend):
    host = _host()
    seed = _seed(host, "no_detach")
    monitor = _monitor(host, seed)
    assert _seed_step(monitor, host, seed, "clean")
    assert _seed_step(monitor, host, seed, "no_detach") is False


# ---------------------------------------------------------------- circuit breaker


def test_three_violations_trip_the_breaker(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    ckpt_dir = tmp_path / "emergency"
    host = _host()
    seed = _seed(host, "no_detach")
    quarantined: list[str] = []
    monitor = _monitor(
        host,
        seed,
        checkpoint_dir=ckpt_dir,
        on_quarantine=lambda: quarantined.append("s0"),
        state_provider=lambda: {"seed": {k: v.clone() for k, v in seed.state_dict().items()}},
    )
    assert _seed_step(monitor, host, seed, "no_detach") is False
    assert _seed_step(monitor, host, seed, "no_detach") is False
    assert quarantined == [] and not ckpt_dir.exists()
    with pytest.raises(GradientIsolationViolationError, match="3 gradient isolation") as info:
        _seed_step(monitor, host, seed, "no_detach")

    assert quarantined == ["s0"]
    files = list(ckpt_dir.iterdir())
    assert len(files) == 1 and files[0].name.startswith("emergency_isolation_s0_")
    assert info.value.checkpoint_path == files[0] == monitor.last_checkpoint
    payload = torch.load(files[0], weights_only=True)
    assert payload["seed_id"] == "s0" and payload["violation_count"] == 3
    assert len(payload["violations"]) == 3
    assert torch.equal(payload["state"]["seed"]["weight"], seed.weight)
    assert list(cwd.iterdir()) == []

    # Inert for this seed from now on: no new count, callback, file or exception.
    assert monitor.tripped
    assert _seed_step(monitor, host, seed, "no_detach") is False
    assert monitor.violation_count == 3 and quarantined == ["s0"]
    assert len(list(ckpt_dir.iterdir())) == 1

    # The host keeps training.
    opt = torch.optim.SGD(host.parameters(), lr=0.05)
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.mse_loss(host(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_emergency_checkpoints_are_bounded_per_directory(tmp_path, monkeypatch) -> None:
    """A seed id culled and germinated anew can trip again and again: the newest
    ``EMERGENCY_KEEP`` files stay, the oldest go, and other files in the directory are kept."""
    monkeypatch.setattr(monitor_module, "EMERGENCY_KEEP", 3)
    ckpt_dir = tmp_path / "emergency"
    ckpt_dir.mkdir()
    (ckpt_dir / "notes.txt").write_text("kept")
    written = []
    for _ in range(5):
        host = _host()
        seed = _seed(host, "no_detach")
        monitor = _monitor(host, seed, checkpoint_dir=ckpt_dir, max_violations=1)
        with pytest.raises(GradientIsolationViolationError):
            _seed_step(monitor, host, seed, "no_detach")
        written.append(monitor.last_checkpoint)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted(
        ["notes.txt", *(p.name for p in written[-3:])]
    )
    # A clock stepped back: the files written after it are still the newest, and kept.
    monkeypatch.setattr(monitor_module.time, "time_ns", lambda: 1)
    for _ in range(2):
        host = _host()
        seed = _seed(host, "no_detach")
        monitor = _monitor(host, seed, checkpoint_dir=ckpt_dir, max_violations=1)
        with pytest.raises(GradientIsolationViolationError) as info:
            _seed_step(monitor, host, seed, "no_detach")
        assert info.value.checkpoint_path.exists()
        written.append(info.value.checkpoint_path)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted(
        ["notes.txt", *(p.name for p in written[-3:])]
    )


def test_a_trip_removes_stale_temporaries_of_killed_emergency_writes(tmp_path) -> None:
    ckpt_dir = tmp_path / "emergency"
    ckpt_dir.mkdir()
    stale = ckpt_dir / ".emergency_isolation_s0_12.pt.abc123.tmp"
    fresh = ckpt_dir / ".emergency_isolation_s0_34.pt.def456.tmp"  # maybe a live writer's
    other = ckpt_dir / ".notes.txt.xyz.tmp"
    for path in (stale, fresh, other):
        path.write_bytes(b"partial")
    os.utime(stale, (1, 1))
    os.utime(other, (1, 1))
    host = _host()
    seed = _seed(host, "no_detach")
    monitor = _monitor(host, seed, checkpoint_dir=ckpt_dir, max_violations=1)
    with pytest.raises(GradientIsolationViolationError):
        _seed_step(monitor, host, seed, "no_detach")
    assert not stale.exists() and fresh.exists() and other.exists()


def test_breaker_without_configured_dir_uses_per_user_temp(tmp_path, monkeypatch, caplog):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    host = _host()
    seed = _seed(host, "shared")
    monitor = _monitor(host, seed, max_violations=1)
    with caplog.at_level(logging.WARNING, logger="kasmina.isolation.monitor"):
        with pytest.raises(GradientIsolationViolationError):
            _seed_step(monitor, host, seed, "shared")
    assert "no checkpoint_dir configured" in caplog.text
    assert monitor.last_checkpoint.parent == default_emergency_dir()
    assert str(monitor.last_checkpoint).startswith(str(tmp_path / "tmp"))
    assert list(cwd.iterdir()) == []


def test_breaker_still_checkpoints_and_raises_when_callbacks_fail(tmp_path):
    host = _host()
    seed = _seed(host, "no_detach")

    def broken() -> None:
        raise RuntimeError("callback bug")

    monitor = _monitor(
        host,
        seed,
        max_violations=1,
        checkpoint_dir=tmp_path,
        on_quarantine=broken,
        state_provider=broken,
    )
    with pytest.raises(GradientIsolationViolationError):
        _seed_step(monitor, host, seed, "no_detach")
    payload = torch.load(monitor.last_checkpoint, weights_only=True)
    assert "state" not in payload and payload["violation_count"] == 1


def test_emergency_rotation_keeps_to_its_own_runs_files(tmp_path, monkeypatch) -> None:
    """Runs share a directory by their ids: run "exp" found its emergency checkpoints by the
    glob ``exp.emergency_isolation_*.ckpt``, which a run named "exp.emergency_isolation_b" (a
    legal id) matches with every file, and its rotation deleted that run's epoch checkpoints
    first (their epoch read as the oldest time). It keeps to names it writes."""
    from kasmina.manager.checkpoints import DiskCheckpointStore
    from kasmina.utils.state_io import CheckpointSigner

    key = os.urandom(32)
    other = CheckpointSigner(tmp_path / "b.key", "exp.emergency_isolation_b", key=key)
    store = DiskCheckpointStore(tmp_path, other, lock_path=tmp_path / ".b.lock")
    for epoch in range(3):
        store.save(epoch, {"w": torch.full((2,), float(epoch))})
    monkeypatch.setattr(monitor_module, "EMERGENCY_KEEP", 2)
    signer = CheckpointSigner(tmp_path / "a.key", "exp", key=key)
    w, h = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    monitor = GradientIsolationMonitor(
        "s.0", [("w", w)], [("h", h)], checkpoint_dir=tmp_path, checkpoint_signer=signer
    )
    written = [monitor._write_emergency_checkpoint() for _ in range(4)]
    assert store.epochs() == [0, 1, 2]
    ours = sorted(p for p in tmp_path.iterdir() if p.name.startswith("exp.emergency_isolation_s"))
    assert ours == sorted(written[-2:])


def test_a_copied_host_index_finds_a_leak_to_its_own_tensors() -> None:
    """A ``HostIndex`` looks its tensors up by id: a deep copy or a pickle kept the original's
    ids, so a leak to the copy's own host tensors was reported clean."""
    import copy
    import pickle

    from kasmina.isolation.verify import HostIndex

    index = HostIndex([("host.w", nn.Parameter(torch.ones(2)))])
    for copied in (copy.deepcopy(index), pickle.loads(pickle.dumps(index))):
        ((name, w),) = copied.params
        assert copied.names == {id(w): name}
        assert graph_isolation((w * 2).sum(), copied) is False
