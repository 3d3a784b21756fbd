"""KasminaKernelManager end to end, how seeds come in: a signed GERMINATE loads, verifies, caches,
pins and attaches a copy of a kernel from a real Urza store; what an unreachable store, a tampered
artifact, a forged or replayed command or a failing copy leaves; registering slots (also on meta);
the command log. The real handler, a tiny host on CPU."""

from __future__ import annotations

import asyncio
import copy as copy_module
import inspect
import logging
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kasmina.control.auth import sign_command
from kasmina.control.builders import (
    make_optimizer_command,
    make_rollback_command,
    make_seed_command,
)
from kasmina.control.commands import to_kasmina_command
from kasmina.manager.manager import KasminaKernelManager
from kasmina.seeds.columns import SCALE
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.urza.blueprints import ResidualMLP
from kasmina.urza.client import UrzaLibraryClient
from kasmina.urza.kernel import GPUKernel
from kasmina.urza.publish import publish_artifact
from kasmina.utils.keyring import Keyring, generate_key
from tests.manager.helpers import (
    SEED0,
    SEED1,
    Host,
    Rig,
    S,
    _fail_once,
    _live,
    assert_same,
    host_params,
    make_config,
    record_activations,
    run_command,
)
from tests.urza.helpers import FlakyFS


def test_signed_germinate_loads_verifies_caches_pins_and_attaches_a_copy(rig: Rig, mlp) -> None:
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    seed = manager.seed(SEED0)
    assert seed.stage == S.ISOLATED_INIT
    original = manager.kernel_cache.get(mlp)
    assert isinstance(seed.kernel, GPUKernel) and isinstance(original, GPUKernel)
    assert seed.kernel is not original and manager.kernel_cache.is_pinned(mlp)
    ours = {p.data_ptr() for p in seed.seed_parameters()}
    assert ours.isdisjoint(p.data_ptr() for p in original.parameters())
    assert SEED0 in manager.optimizers.seed_ids
    assert manager.require_registry()[SEED0].monitor is not None
    assert manager.gate_counts[(1, True)] == 1
    assert rig.sink.events("kernel.load_ms") and rig.sink.events("lifecycle.gate")
    # The seed trains its own copy; the cached original stays as verified.
    before = [p.detach().clone() for p in original.parameters()]
    trained = [p.detach().clone() for p in seed.seed_parameters()]
    report = rig.train(3)
    assert report["seeds_stepped"] == [SEED0] and report["isolation_clean"]
    assert any(not torch.equal(a, b) for a, b in zip(trained, seed.seed_parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before, original.parameters(), strict=True))


def test_second_germinate_of_one_artifact_is_a_cache_hit(rig: Rig, mlp) -> None:
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp) and rig.send("germinate", SEED1, mlp)
    assert manager.urza_client.stats()["fetches"] == 1 and manager.loader.counters["loads"] == 1
    assert manager.kernel_cache.stats()["hits"] >= 1
    assert manager.get_performance_metrics()["cache_hit_p50_us"] > 0
    assert rig.send("cull", SEED0)
    assert manager.kernel_cache.is_pinned(mlp)  # still pinned for the other live seed
    assert rig.send("cull", SEED1)
    assert not manager.kernel_cache.is_pinned(mlp)


def test_the_cache_holds_at_most_cache_max_kernels(tmp_path, store, keyring, published) -> None:
    """``cache_max_kernels`` bounds the manager's kernel cache in entries, pinned ones counted:
    with room for one, a second artifact while the first is pinned is served uncached (its seed
    trains all the same), and once the first is unpinned, a load of the second evicts it."""
    _, mlp, aff = published
    rig = Rig(make_config(tmp_path, store, cache_max_kernels=1), keyring)
    manager, cache = rig.manager, rig.manager.kernel_cache
    assert rig.send("germinate", SEED0, mlp) and rig.send("germinate", SEED1, aff)
    assert len(cache) == 1 and cache.is_pinned(mlp) and aff not in cache
    assert cache.stats()["uncached"] == 1 and rig.train(1)["seeds_stepped"] == [SEED0, SEED1]
    assert rig.send("cull", SEED0) and rig.send("cull", SEED1)
    asyncio.run(manager.load_kernel(aff))
    assert len(cache) == 1 and aff in cache and mlp not in cache


def test_concurrent_loads_share_one_fetch(tmp_path, store, keyring, mlp) -> None:
    config = make_config(tmp_path, store)
    urza = UrzaLibraryClient.from_config(config)
    flaky = urza._fs = FlakyFS(urza._fs)
    flaky.delay_s = 0.2
    manager = KasminaKernelManager(config, keyring=keyring, urza_client=urza)

    async def load_all() -> list[GPUKernel]:
        return await asyncio.gather(*(manager.load_kernel(mlp) for _ in range(8)))

    kernels = asyncio.run(load_all())
    assert flaky.reads_of(".pt2") == 1 and manager.loader.counters["loads"] == 1
    assert len({id(k) for k in kernels}) == 8  # each caller its own trainable copy
    x = torch.randn(5, 2)
    assert all(torch.equal(k(x), kernels[0](x)) for k in kernels)


def test_async_contract_methods_are_coroutines(rig: Rig, mlp) -> None:
    manager = rig.manager
    for name in (
        "load_kernel",
        "execute_kernel",
        "load_kernel_with_teacher",
        "handle_leyline_command",
        "handle_optimizer_command",
    ):
        assert inspect.iscoroutinefunction(getattr(manager, name)), name
    cmd = sign_command(make_seed_command("germinate", SEED0, mlp), rig.keyring, "ctl")
    assert run_command(manager, cmd)
    assert rig.stage(SEED0) == S.ISOLATED_INIT
    kernel = asyncio.run(manager.load_kernel(mlp))
    x = torch.randn(4, 2)
    assert torch.equal(asyncio.run(manager.execute_kernel(kernel, x)), kernel(x))
    assert manager.evict_kernel(mlp) is False  # pinned by the live seed


def test_cache_kernel_takes_an_original_and_refuses_a_copy_or_changed_weights(
    rig: Rig, mlp
) -> None:
    """``load_kernel`` hands out a trainable copy; given back to ``cache_kernel``, it replaced
    the verified original (released), and every later GERMINATE copied the caller's edited
    weights instead of the signed artifact's."""
    manager = rig.manager
    copy = asyncio.run(manager.load_kernel(mlp))
    original = manager.loader.cached(mlp)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(100.0)
    for kernel, why in ((copy, "trainable copy"), (copy.inner, "not a kernel")):
        with pytest.raises(ValueError, match=why):
            manager.cache_kernel(mlp, kernel)
        assert manager.loader.cached(mlp) is original and not original.released
    pristine, edited = copy_module.deepcopy(original), copy_module.deepcopy(original)
    with torch.no_grad():
        next(edited.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="tensors differ from its artifact's"):
        manager.cache_kernel(mlp, edited)
    assert manager.evict_kernel(mlp) and original.released
    manager.cache_kernel(mlp, pristine)  # the artifact's own tensors: taken
    assert manager.loader.cached(mlp) is pristine
    assert rig.send("germinate", SEED0, mlp)
    seed_weights = list(manager.seed(SEED0).kernel.parameters())
    assert all(torch.equal(a, b) for a, b in zip(seed_weights, pristine.parameters(), strict=True))


def test_cache_kernel_refuses_a_kernel_another_managers_cache_holds(
    rig: Rig, tmp_path: Path, store: Path, keyring: Keyring, mlp
) -> None:
    """Tenant A's original, put in tenant B's cache, was released by A's eviction while B's
    cache still held it and B's live seed pinned it: every later GERMINATE of the artifact on B
    was refused ("evicted ... load it again"), for good. A kernel belongs to one cache."""
    other = Rig(make_config(tmp_path / "b", store), keyring)
    try:
        assert rig.send("germinate", SEED0, mlp)
        original = rig.manager.loader.cached(mlp)
        with pytest.raises(ValueError, match="held by another kernel cache"):
            other.manager.cache_kernel(mlp, original)
        assert mlp not in other.manager.kernel_cache and not original.released
        other.manager.cache_kernel(mlp, copy_module.deepcopy(original))  # its own: taken
        assert other.send("germinate", SEED0, mlp)
        assert other.manager.kernel_cache.is_pinned(mlp)
        assert rig.send("cull", SEED0) and rig.manager.evict_kernel(mlp) and original.released
        with pytest.raises(ValueError, match="released"):
            other.manager.cache_kernel(mlp, original)
        assert other.send("germinate", SEED1, mlp), other.manager.command_log[-1][3]
        assert not other.manager.loader.cached(mlp).released
    finally:
        other.manager.close()


def _rig_over_watched_store(tmp_path, store, keyring) -> tuple[Rig, FlakyFS]:
    """A rig whose store reads go through a ``FlakyFS`` (counted; failing while ``down``)."""
    config = make_config(tmp_path, store)
    urza = UrzaLibraryClient.from_config(config)
    watched = urza._fs = FlakyFS(urza._fs)
    return Rig(config, keyring, urza_client=urza), watched


def test_urza_unreachable_leaves_the_seed_dormant_and_the_host_training(
    tmp_path, store, keyring, mlp
) -> None:
    rig, flaky = _rig_over_watched_store(tmp_path, store, keyring)
    flaky.down = True
    manager = rig.manager
    assert not rig.send("germinate", SEED0, mlp)
    assert rig.stage(SEED0) == S.DORMANT and rig.manager.seed(SEED0).kernel is None
    assert len(manager.kernel_cache) == 0 and manager.optimizers.seed_ids == []
    assert manager.loader.counters["load_failures"] == 1 and rig.sink.events("kernel.load_failed")
    before = host_params(rig)
    assert rig.train(1)["host_stepped"]
    assert any(not torch.equal(a, b) for a, b in zip(before, host_params(rig), strict=True))
    # The async path fetches once, on a worker thread, and does not retry inside the command.
    reads = sum(flaky.reads.values())
    cmd = sign_command(make_seed_command("germinate", SEED0, mlp), keyring, "ctl")
    assert not run_command(manager, cmd)
    assert sum(flaky.reads.values()) == reads + 1
    flaky.down = False  # recovery: the next GERMINATE works
    assert rig.send("germinate", SEED0, mlp) and rig.stage(SEED0) == S.ISOLATED_INIT


def test_tampered_or_missing_artifacts_load_nothing(rig: Rig, store: Path, mlp) -> None:
    payload = store / f"{mlp}.pt2"
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 1
    payload.write_bytes(bytes(data))
    assert not rig.send("germinate", SEED0, mlp)
    assert not rig.send("germinate", SEED1, "no-such-artifact")
    assert len(rig.manager.kernel_cache) == 0 and rig.stage(SEED0) == S.DORMANT
    assert "ArtifactIntegrityError" in rig.manager.command_log[0][3]
    assert "ArtifactNotFoundError" in rig.manager.command_log[1][3]
    assert not rig.send("germinate", "nowhere[0]", mlp)  # unknown seed
    # An unknown seed whose artifact is missing too: the seed is the refusal (it said the fetch)
    assert not rig.send("germinate", "nowhere[0]", "no-such-artifact")
    assert "unknown seed 'nowhere[0]'" in rig.manager.command_log[-1][3]


def test_a_germinate_of_an_unknown_seed_fetches_and_caches_nothing(
    tmp_path, store, keyring, mlp
) -> None:
    rig, counted = _rig_over_watched_store(tmp_path, store, keyring)
    manager = rig.manager
    assert not rig.send("germinate", "nowhere[0]", mlp)
    assert "unknown seed 'nowhere[0]'" in manager.command_log[-1][3]
    assert sum(counted.reads.values()) == 0 and len(manager.kernel_cache) == 0
    assert manager.loader.counters["loads"] == 0
    # At arrival as at the safe point: queued while the trainer runs, refused when applied.
    raw = rig.signed(make_seed_command("germinate", "nowhere[1]", mlp, {}, validate=False))
    assert manager.handle_adaptation_command(raw)
    rig.train(1)
    assert "unknown seed 'nowhere[1]'" in manager.command_log[-1][3]
    assert sum(counted.reads.values()) == 0 and len(manager.kernel_cache) == 0
    # A seed it has still fetches its kernel as before.
    assert rig.send("germinate", SEED0, mlp) and rig.stage(SEED0) == S.ISOLATED_INIT
    assert sum(counted.reads.values()) > 0 and len(manager.kernel_cache) == 1


def test_an_artifact_that_does_not_fit_the_slot_is_refused(
    rig: Rig, store: Path, publisher
) -> None:
    wide = publish_artifact(ResidualMLP(3, 4), [torch.randn(3, 3)], str(store), "wide", publisher)
    assert not rig.send("germinate", SEED0, wide.artifact_id)
    assert "do not fit" in rig.manager.command_log[-1][3]
    assert rig.stage(SEED0) == S.DORMANT and rig.manager.seed(SEED0).kernel is None
    assert not rig.manager.kernel_cache.is_pinned(wide.artifact_id)
    rig.train(1)  # the host still trains: the mismatched kernel never runs


def test_forged_and_replayed_commands_are_rejected_and_execute_nothing(rig: Rig, mlp) -> None:
    manager = rig.manager
    outsider = Keyring({"rogue": generate_key()})  # a key the manager does not hold
    rogue = sign_command(make_seed_command("germinate", SEED0, mlp), outsider, "rogue")
    rogue = rogue.SerializeToString()
    cmd = sign_command(make_seed_command("germinate", SEED0, mlp), rig.keyring, "ctl")
    cmd.seed_command.seed_id = SEED1  # tampered after signing
    tampered = cmd.SerializeToString()
    unsigned = make_seed_command("germinate", SEED0, mlp).SerializeToString()
    other = Keyring({"ctl": generate_key()})
    forged = sign_command(make_seed_command("germinate", SEED0, mlp), other, "ctl")
    assert not manager.verify_message_auth(forged)
    assert not run_command(manager, forged)
    for raw in (rogue, tampered, unsigned, b"\x00garbage"):
        assert not run_command(manager, raw)
    assert manager.urza_client.stats()["fetches"] == 0  # nothing fetched for a forgery
    assert rig.stage(SEED0) == S.DORMANT and rig.stage(SEED1) == S.DORMANT
    stats = manager.handler.stats
    assert stats["accepted"] == 0 and stats["rejected:bad_signature"] == 2
    assert stats["rejected:unknown_key_id"] == 1 and stats["rejected:missing_metadata"] == 1
    valid = rig.signed(make_seed_command("germinate", SEED0, mlp))
    assert manager.verify_message_auth(valid)  # answers without using the nonce
    oversize = rig.signed(make_rollback_command(0, reason="x" * 100_000, validate=False))
    assert not manager.verify_message_auth(oversize)  # the door's size bound, as on arrival
    assert run_command(manager, valid)
    assert not run_command(manager, valid)  # replay
    stats = manager.handler.stats  # a copy: read again after the commands since
    assert stats["rejected:replay"] == 1 and stats["executed"] == 1


def test_refused_commands_are_each_recorded_and_logged_rarely(rig: Rig, caplog) -> None:
    """A controller that sends the same refused command over and over (ADVANCE of a DORMANT
    seed) gets each refusal in ``command_log`` and the counters, and the log a WARNING for the
    first and every 100th (DEBUG for the rest), not one WARNING each."""
    caplog.set_level(logging.DEBUG, logger="kasmina.manager.executor")
    for _ in range(150):
        assert not rig.send("advance", SEED0)
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 150
    warned = [r.getMessage().rpartition(" ")[2] for r in refused if r.levelno >= logging.WARNING]
    assert warned == ["[1]", "[100]"]
    assert rig.manager.state.counters["commands_refused"] == 150
    assert [entry[2] for entry in rig.manager.command_log][-150:] == [False] * 150


def test_register_existing_slots_and_optimizer_commands(tmp_path, store, keyring, mlp) -> None:
    from kasmina.seeds.inject import attach

    manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    model = Host()
    attach(model, "out", seeds_per_layer=2, chunk_size=2)
    manager.register(model, host_lr=None, seed_lr=0.01)
    assert not manager.optimizers.has_host

    def signed(cmd) -> bytes:
        return sign_command(cmd, keyring, "ctl").SerializeToString()

    init = make_optimizer_command("initialize_host", learning_rate=0.02)
    assert run_command(manager, signed(init)) and manager.optimizers.has_host
    assert not run_command(manager, signed(make_optimizer_command("initialize_host")))
    slow = make_seed_command("germinate", SEED0, mlp, timeout_s=1e-9)  # the load takes longer
    assert not run_command(manager, signed(slow))
    reason = manager.command_log[-1][3]  # the queue or the client notices the deadline first
    assert "timeout" in reason or "deadline" in reason, reason
    assert manager.seed(SEED0).stage == S.DORMANT and manager.optimizers.seed_ids == []
    germinate = make_seed_command("germinate", SEED0, mlp, {"learning_rate": 0.5})
    record_activations(model, torch.zeros(16, 6))  # the slot's activations, for the check
    assert run_command(manager, signed(germinate))
    assert manager.optimizers.optimizer(SEED0).param_groups[0]["lr"] == 0.5
    step = make_optimizer_command("step", SEED0)
    assert run_command(manager, signed(step))
    with pytest.raises(ValueError, match="already manages"):
        manager.register(model)


@pytest.mark.parametrize("given", ["names", "one slot", "generator"])
def test_register_takes_one_slot_or_any_iterable_of_slots_and_refuses_names(
    tmp_path, store, keyring, given: str
) -> None:
    """``register(model, slots)`` with the slots' names crashed inside the registry ('str'
    object has no attribute 'state_table'), and one slot or a generator of slots with 'not
    subscriptable'. Names are a ``TypeError`` naming them before anything changes, as for
    ``kasmina.detach(only=...)``; one slot, or any iterable of slots, is registered."""
    import kasmina

    model = Host()
    slots = kasmina.attach(model, "out", 2, 2)
    manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    if given == "names":
        with pytest.raises(TypeError, match=r"slots must hold the model's slots .* got str 'out'"):
            manager.register(model, ["out"])
        assert manager.registry is None
        manager.register(model, slots)
    else:
        manager.register(model, slots[0] if given == "one slot" else (s for s in slots))
    assert manager.registry.slots == slots and sorted(manager.stages()) == [SEED0, SEED1]
    manager.close()


def _built_on_meta(empty: str) -> tuple[nn.Module, nn.Module]:
    """A bare ``Host`` with weights, and one built with none (``torch.device("meta")``, or
    accelerate's ``init_empty_weights``, parameters only) with its ``out`` attached."""
    import kasmina

    bare = Host()
    if empty == "accelerate":
        accelerate = pytest.importorskip("accelerate")
        context = accelerate.init_empty_weights()
    else:
        context = torch.device("meta")
    with context:
        model = Host()
    kasmina.attach(model, "out", 2, 2)
    return bare, model


def _weights_of(bare: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """``bare``'s weights under ``prefix``, named as in the attached model (``out.host.``)."""
    state = {k.replace("out.", "out.host.", 1): v for k, v in bare.state_dict().items()}
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("empty", ["meta", "accelerate"])
def test_a_model_built_on_meta_and_loaded_with_assign_grows_and_saves(
    tmp_path, store, keyring, mlp, empty: str
) -> None:
    """Deferred init, PyTorch's recipe (build on ``meta``, attach, ``load_state_dict(...,
    assign=True)``) or accelerate's ``init_empty_weights``: the load replaced the host's
    parameters but left the slot's constants (``_one``, flags, alphas) on ``meta``; register
    accepted the model, then every GERMINATE was refused ("Tensor.item() cannot be called on
    meta tensors") and ``kasmina.save`` raised. Now the load rebuilds them on the host's device
    with their values, and the model registers, grows, trains and saves."""
    import kasmina

    bare, model = _built_on_meta(empty)
    model.load_state_dict(_weights_of(bare), strict=False, assign=True)
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    slot = model.out
    assert slot._one.item() == 1.0 and slot._finite_flags.all() and not slot._fault_flags.any()
    manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    manager.register(model, host_lr=0.05, seed_lr=0.05)
    x = torch.randn(16, 6)
    with torch.no_grad():
        assert torch.equal(model(x), bare(x))
    record_activations(model, x)
    germinate = make_seed_command("germinate", SEED0, mlp)
    assert run_command(manager, sign_command(germinate, keyring, "ctl").SerializeToString())
    assert manager.seed(SEED0).stage == S.ISOLATED_INIT, manager.command_log[-1]
    manager.backward(F.cross_entropy(model(x), torch.zeros(16, dtype=torch.long)))
    assert manager.step()["seeds_stepped"] == [SEED0]
    assert kasmina.save(model, tmp_path / "grown.pt").exists()


def test_register_rebuilds_a_slots_meta_constants_and_names_what_it_cannot_fill(
    tmp_path, store, keyring, mlp
) -> None:
    """Weights put in place without a load through the slot (its host's own
    ``load_state_dict``, accelerate's ``set_module_tensor_to_device``) run no slot hook:
    register looked at the first parameter only and took a model whose slot constants, or
    other layers, were still on ``meta``. Now it refuses, naming the tensors no one can fill
    and changing nothing; once every host weight is real it rebuilds the slot's constants."""
    bare, model = _built_on_meta("meta")
    slot = model.out
    slot.host.load_state_dict(_weights_of(bare, "out.host."), assign=True)
    manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    with pytest.raises(ValueError, match=r"meta device.*inp\.weight, inp\.bias; finish"):
        manager.register(model)
    assert manager.registry is None and slot._one.is_meta and slot.seed(0).alpha.is_meta
    model.inp.load_state_dict(_weights_of(bare, "inp."), assign=True)
    assert slot._one.is_meta  # no load through the slot: register fills it
    manager.register(model, host_lr=0.05, seed_lr=0.05)
    assert not any(t.is_meta for t in model.buffers()) and slot.seed(1).alpha.item() == 0.0
    assert slot.seed(0).finite_flag.data_ptr() == slot._finite_flags.data_ptr()
    record_activations(model, torch.zeros(16, 6))
    germinate = make_seed_command("germinate", SEED0, mlp)
    assert run_command(manager, sign_command(germinate, keyring, "ctl").SerializeToString())


def test_germinate_pins_before_copying_and_never_attaches_an_evicted_kernel(
    rig: Rig, mlp, monkeypatch
) -> None:
    manager = rig.manager
    loader = manager.loader
    real_original, real_copy = loader.original, loader.copy
    evicted: list[bool] = []

    def copy_racing_an_evict(original):
        evicted.append(manager.evict_kernel(mlp))  # pinned by now: refused
        return real_copy(original)

    monkeypatch.setattr(loader, "copy", copy_racing_an_evict)
    assert rig.send("germinate", SEED0, mlp)
    kernel = manager.seed(SEED0).kernel
    assert evicted == [False] and not kernel.released and kernel.get_memory_size() > 0
    assert manager.kernel_cache.is_pinned(mlp)
    monkeypatch.undo()

    def original_then_evicted(artifact_id, deadline=None):
        original = real_original(artifact_id, deadline=deadline)
        if manager.kernel_cache.is_pinned(mlp):  # (SEED0's pin, so that the evict can happen)
            manager.kernel_cache.unpin(mlp)
        evicted.append(manager.evict_kernel(artifact_id))
        manager.require_registry()[SEED0].pinned = False
        return original

    # ``execute`` (a safe point's own call): a queued command's kernel is pinned for it by the
    # queue until it has applied, so only this path fetches and then pins. Evicted before its
    # pin, the kernel is loaded again (tests/manager/test_pending_pins.py); evicted every time,
    # the GERMINATE is refused, never attached.
    monkeypatch.setattr(loader, "original", original_then_evicted)
    assert not manager.execute(to_kasmina_command(make_seed_command("germinate", SEED1, mlp)))
    assert evicted[-3:] == [True] * 3 and "was evicted" in manager.command_log[-1][3]
    assert loader.counters["evicted_before_pin"] == 3
    assert rig.stage(SEED1) == S.DORMANT and manager.seed(SEED1).kernel is None
    assert mlp not in manager.kernel_cache and SEED1 not in manager.optimizers.seed_ids
    monkeypatch.undo()
    assert rig.send("germinate", SEED1, mlp)  # loaded again: a valid kernel
    assert manager.seed(SEED1).kernel.get_memory_size() > 0


def test_a_pin_for_one_original_never_pins_the_kernel_loaded_again_after_it(rig: Rig, mlp) -> None:
    """``loader.pin(id, original)`` pins that very kernel or nothing: once the original was
    evicted and the artifact loaded again, the new kernel under the id is neither pinned for
    the old one's holder (its copy would read released memory) nor left pinned by the try."""
    loader, cache = rig.manager.loader, rig.manager.kernel_cache
    old = loader.original(mlp)
    assert rig.manager.evict_kernel(mlp) and old.released
    new = loader.original(mlp)
    assert new is not old
    assert not loader.pin(mlp, old) and not cache.is_pinned(mlp)
    assert loader.pin(mlp, new) and cache.is_pinned(mlp)
    cache.unpin(mlp)


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_a_germinate_whose_copy_fails_takes_its_pin_back(
    rig: Rig, mlp, monkeypatch, error: type[BaseException]
) -> None:
    """The cached original is pinned before it is copied; a copy that fails (a refusal, or an
    interrupt) unpins it again, so that it stays evictable."""
    manager = rig.manager
    pinned: list[bool] = []

    def failing_copy(original):
        pinned.append(manager.kernel_cache.is_pinned(mlp))
        raise error("copy failed")

    monkeypatch.setattr(manager.loader, "copy", failing_copy)
    if error is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            rig.send("germinate", SEED0, mlp)
    else:
        assert not rig.send("germinate", SEED0, mlp)
        assert "cannot germinate" in manager.command_log[-1][3]
    assert pinned == [True] and not manager.kernel_cache.is_pinned(mlp)
    assert rig.stage(SEED0) == S.DORMANT and not manager.require_registry()[SEED0].pinned
    assert manager.evict_kernel(mlp)


def test_a_copy_racing_an_eviction_is_refused(rig: Rig, mlp, monkeypatch) -> None:
    import kasmina.urza.loader as loader_module

    manager = rig.manager
    original = manager.loader.original(mlp)
    real_deepcopy = loader_module.copy.deepcopy

    def deepcopy_while_evicted(obj, memo=None):
        assert manager.evict_kernel(mlp)  # unpinned: released while it is copied
        return real_deepcopy(obj, memo)

    monkeypatch.setattr(loader_module.copy, "deepcopy", deepcopy_while_evicted)
    with pytest.raises(ValueError, match="while it was copied"):
        manager.loader.copy(original)


def test_a_copy_of_a_kernel_whose_eviction_has_not_released_it_yet_is_refused(
    rig: Rig, mlp, monkeypatch
) -> None:
    """An evicted kernel is marked under the cache's lock and released after it: a copy taken
    in between (the release not begun) would be emptied under its feet. The mark alone
    refuses it."""
    manager = rig.manager
    original = manager.loader.original(mlp)
    marked, go = threading.Event(), threading.Event()
    real_release = original.release_gpu_memory

    def release_later() -> None:
        marked.set()
        assert go.wait(30)
        real_release()

    monkeypatch.setattr(original, "release_gpu_memory", release_later)
    evicting = threading.Thread(target=manager.evict_kernel, args=(mlp,))
    evicting.start()
    try:
        assert marked.wait(30) and not original.released
        with pytest.raises(ValueError, match="was evicted"):
            manager.loader.copy(original)
    finally:
        go.set()
        evicting.join(30)
    assert original.released


def test_a_germinate_failing_at_its_transition_leaves_the_row_as_it_was(
    rig: Rig, mlp, monkeypatch
) -> None:
    """GERMINATE's last step is the transition; if it fails, the undo puts back everything the
    steps before it wrote, the PERFORMANCE_GATE column and the seed's threshold included."""
    manager = rig.manager
    seed = manager.seed(SEED0)
    rig.train(1)
    before, gate = _live(rig), seed.performance_gate
    _fail_once(monkeypatch, GradientIsolatedSeed, "transition_to")
    assert not rig.send("germinate", SEED0, mlp)
    monkeypatch.undo()
    assert_same(before, _live(rig))
    assert seed.performance_gate == gate and seed.kernel is None
    assert rig.send("germinate", SEED0, mlp) and rig.stage(SEED0) == S.ISOLATED_INIT
    assert seed.performance_gate == manager.config.performance_gate / SCALE


def test_a_refused_germinate_removes_only_an_optimizer_it_created(rig: Rig, mlp) -> None:
    """An optimizer already under the seed's id (registered by hand) makes GERMINATE fail at
    its creation; the undo leaves that optimizer alone, since this GERMINATE did not make it."""
    manager = rig.manager
    rig.train(1)
    own = torch.nn.Parameter(torch.zeros(3))
    theirs = manager.optimizers.create_seed_optimizer(SEED0, [own])
    assert not rig.send("germinate", SEED0, mlp)
    assert "already has an optimizer" in manager.command_log[-1][3]
    assert manager.optimizers.optimizer(SEED0) is theirs and manager.seed(SEED0).kernel is None


def test_revising_a_command_that_left_the_bounded_log_moves_its_count(rig: Rig) -> None:
    """A revise overturns the noted outcome even once the command has fallen out of the
    1,000-entry ``command_log``: the old count goes down as the new one goes up."""
    report, counters = rig.manager.report, rig.manager.state.counters
    cmds = [
        to_kasmina_command(make_seed_command("cull", SEED0, command_id=f"c{i}"))
        for i in range(1001)
    ]
    for cmd in cmds:
        report.note_command(cmd, True, "")
    assert all(entry[0] != "c0" for entry in rig.manager.command_log)
    report.revise_command(cmds[0], False, "a repair overturned it")
    assert (counters["seed.cull:ok"], counters["seed.cull:refused"]) == (1000, 1)
    report.revise_command(cmds[1], False, "in the log")  # the in-log path, for comparison
    assert (counters["seed.cull:ok"], counters["seed.cull:refused"]) == (999, 2)


def test_execute_and_execute_kernel_refuse_arguments_of_the_wrong_kind(rig: Rig, mlp) -> None:
    """``execute(None)`` raised AttributeError ('seed') from inside the executor and
    ``execute_kernel(kernel, None)`` AttributeError ('to'): each is a TypeError saying what it
    takes, and the manager carries on."""
    manager = rig.manager
    with pytest.raises(TypeError, match="execute takes a KasminaCommand, got NoneType"):
        manager.execute(None)  # type: ignore[arg-type]
    kernel = asyncio.run(manager.load_kernel(mlp))
    with pytest.raises(TypeError, match="a GPUKernel and an input tensor, got GPUKernel and list"):
        asyncio.run(manager.execute_kernel(kernel, [1.0, 2.0]))  # type: ignore[arg-type]
    assert manager.handler.stats["executed"] == 0
    assert rig.send("germinate", SEED0, mlp) and rig.train(1)["host_stepped"]
