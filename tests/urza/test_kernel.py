"""GPUKernel: loading verified artifacts, training them, releasing them."""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import gc
import io
import linecache
import threading
import time

import pytest
import torch
from torch import nn

from kasmina.errors import ArtifactIntegrityError, KernelInputRefused
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.urza import kernel as kernel_module
from kasmina.urza.artifact import Manifest, payload_sha256
from kasmina.urza.cache import GPUKernelCache
from kasmina.urza.client import UrzaLibraryClient
from kasmina.urza.kernel import GPUKernel
from kasmina.urza.keys import PublisherKey, TrustedPublishers
from kasmina.urza.publish import publish_artifact, publish_payload
from tests.urza.helpers import PairRows, arm_pt2


class Blueprint(nn.Module):
    """Parameters, a batch norm (buffers, mutated in training) and a tensor constant."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 8)
        self.register_buffer("offset", torch.linspace(-1, 1, 8), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x)))) + self.offset


@pytest.fixture(scope="module")
def artifact(
    tmp_path_factory: pytest.TempPathFactory, publisher: PublisherKey, trusted: TrustedPublishers
):
    store = tmp_path_factory.mktemp("store")
    torch.manual_seed(0)
    module = Blueprint().eval()
    manifest = publish_artifact(module, (torch.randn(4, 8),), str(store), "bp", publisher)
    payload, verified = UrzaLibraryClient(str(store), trusted).fetch(manifest.artifact_id)
    return module, payload, verified, store


def test_loaded_kernel_matches_the_module_with_dynamic_batch(artifact, device) -> None:
    module, payload, manifest, _ = artifact
    kernel = GPUKernel.from_binary(payload, manifest, device)
    assert kernel.artifact_id == manifest.artifact_id and kernel.blueprint == "bp"
    assert kernel.device.type == device.type
    for batch in (3, 5):
        x = torch.randn(batch, 8)
        torch.testing.assert_close(kernel(x.to(device)).cpu(), module(x))
    assert [t.shape for t in kernel.example_inputs(dynamic_size=6)] == [torch.Size([6, 8])]


def test_kernel_parameters_train(artifact, device) -> None:
    _, payload, manifest, _ = artifact
    kernel = GPUKernel.from_binary(payload, manifest, device)
    params = list(kernel.parameters())
    assert len(params) == 6 and all(
        p.requires_grad and p.device.type == device.type for p in params
    )
    x = torch.randn(4, 8, device=device)
    before = kernel(x).detach().clone()
    loss = kernel(x).square().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)
    torch.optim.SGD(params, lr=0.1).step()
    assert not torch.allclose(kernel(x), before)


def test_train_eval_do_not_break_a_host(artifact) -> None:
    _, payload, manifest, _ = artifact
    host = nn.Sequential(nn.Linear(8, 8), GPUKernel.from_binary(payload, manifest))
    host.train()
    assert host[1].training
    host.eval()
    assert not host[1].training
    assert host(torch.randn(2, 8)).shape == (2, 8)


def test_memory_size_counts_params_buffers_and_constants(artifact) -> None:
    module, payload, manifest, _ = artifact
    kernel = GPUKernel.from_binary(payload, manifest)
    expected = sum(t.numel() * t.element_size() for t in module.parameters())
    expected += sum(t.numel() * t.element_size() for t in module.buffers())
    assert kernel.get_memory_size() == expected


def test_release_frees_tensors_and_makes_the_kernel_unusable(artifact) -> None:
    _, payload, manifest, _ = artifact
    kernel = GPUKernel.from_binary(payload, manifest)
    held = list(kernel.parameters())  # as an optimizer would hold them
    kernel.release_gpu_memory()
    assert kernel.released and kernel.get_memory_size() == 0
    assert all(p.numel() == 0 for p in held)
    with pytest.raises(RuntimeError, match="released"):
        kernel(torch.randn(2, 8))
    kernel.release_gpu_memory()  # idempotent
    assert "released" in repr(kernel)


def test_cache_eviction_releases_a_real_kernel(artifact) -> None:
    _, payload, manifest, _ = artifact
    first = GPUKernel.from_binary(payload, manifest)
    second = GPUKernel.from_binary(payload, manifest)
    size = first.get_memory_size()
    cache = GPUKernelCache(cache_size_mb=(size * 1.5) / (1024 * 1024))
    assert cache.put("first", first)
    assert cache.put("second", second)
    assert first.released and not second.released
    assert "first" not in cache and cache.bytes_used == size


def test_from_binary_rejects_unverified_or_mismatched_manifests(artifact, tmp_path) -> None:
    _, payload, manifest, _ = artifact
    marker = tmp_path / "marker"
    evil = arm_pt2(payload, marker)
    # A hand-made manifest that matches the bytes exactly but never went through verification.
    forged = Manifest(
        artifact_id="evil",
        blueprint="bp",
        sha256=payload_sha256(evil),
        size=len(evil),
        input_spec=(),
        key_id="pub",
        created=0.0,
        torch_version=torch.__version__,
        signature="00" * 32,
    )
    with pytest.raises(ArtifactIntegrityError, match="not signature-verified"):
        GPUKernel.from_binary(evil, forged)
    # A verified manifest edited after verification loses its verified mark.
    edited = dataclasses.replace(manifest, sha256=payload_sha256(evil), size=len(evil))
    with pytest.raises(ArtifactIntegrityError, match="not signature-verified"):
        GPUKernel.from_binary(evil, edited)
    # A genuine verified manifest with other bytes.
    with pytest.raises(ArtifactIntegrityError):
        GPUKernel.from_binary(evil, manifest)
    flipped = bytearray(payload)
    flipped[100] ^= 0x04
    with pytest.raises(ArtifactIntegrityError, match="SHA-256"):
        GPUKernel.from_binary(bytes(flipped), manifest)
    assert not marker.exists()


def test_signed_but_unloadable_payload_raises_clearly(tmp_path, publisher, trusted) -> None:
    publish_payload(b"not a pt2 archive", str(tmp_path), "junk", publisher, "junk")
    payload, manifest = UrzaLibraryClient(str(tmp_path), trusted).fetch("junk")
    with pytest.raises(RuntimeError, match="could not be loaded"):
        GPUKernel.from_binary(payload, manifest)


def test_publishing_refuses_examples_that_would_sign_the_wrong_input(tmp_path, publisher) -> None:
    """A tensor given as ``example_inputs`` is iterable: it was split into its rows and, for a
    batch of one, signed as an unbatched kernel; a batch of 1 made a batch-1-only kernel."""
    module = nn.Linear(4, 4)
    with pytest.raises(TypeError, match=r"pass \[x\], not x"):
        publish_artifact(module, torch.randn(1, 4), str(tmp_path), "lin", publisher)
    with pytest.raises(ValueError, match="batch of 1"):
        publish_artifact(module, [torch.randn(1, 4)], str(tmp_path), "lin", publisher)
    with pytest.raises(TypeError, match="dynamic must be a bool, got str 'false'"):
        publish_artifact(module, [torch.randn(2, 4)], str(tmp_path), "lin", publisher,
                         dynamic="false")  # fmt: skip  # truthy: it exported a dynamic kernel
    assert not list(tmp_path.iterdir())  # nothing was published
    fixed = publish_artifact(module, [torch.randn(1, 4)], str(tmp_path), "lin", publisher,
                             dynamic=False)  # fmt: skip
    assert fixed.input_spec[0].shape == (1, 4)


def test_training_mode_export_keeps_updating_batch_norm_statistics(
    tmp_path, publisher, trusted
) -> None:
    torch.manual_seed(1)
    module = Blueprint().train()
    published = publish_artifact(module, (torch.randn(4, 8),), str(tmp_path), "bp", publisher)
    payload, manifest = UrzaLibraryClient(str(tmp_path), trusted).fetch(published.artifact_id)
    kernel = GPUKernel.from_binary(payload, manifest)
    stats = dict(kernel.named_buffers())
    running_mean = next(v for k, v in stats.items() if k.endswith("running_mean"))
    before = running_mean.clone()
    x = torch.randn(6, 8)
    out = kernel(x)
    assert not torch.equal(running_mean, before)
    torch.testing.assert_close(out, module(x))  # batch statistics, as in training
    out.sum().backward()
    assert all(p.grad is not None for p in kernel.parameters())


def test_kernels_load_from_several_threads_at_once(artifact) -> None:
    """``torch.export.load`` holds its deserializer in one process-wide slot and refuses a
    second load while one runs: the fetch workers' loads of different artifacts take turns."""
    _, payload, manifest, _ = artifact
    barrier, failures, loaded = threading.Barrier(4), [], []

    def load() -> None:
        barrier.wait()
        for _ in range(3):
            try:
                loaded.append(GPUKernel.from_binary(payload, manifest, "cpu"))
            except Exception as exc:  # the old race: "_CURRENT_DESERIALIZER is already set"
                failures.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == [] and len(loaded) == 12


def test_a_copy_saves_what_the_original_saves_and_pickles_back(artifact) -> None:
    """A seed trains a deep copy of the cached kernel: the copy keeps the program's
    non-persistent buffers non-persistent (its ``state_dict`` is the original's), so a model
    holding it round-trips through ``torch.save``."""
    _, payload, manifest, _ = artifact
    original = GPUKernel.from_binary(payload, manifest, "cpu")
    duplicate = copy.deepcopy(original)
    assert duplicate.state_dict().keys() == original.state_dict().keys()
    buffer = io.BytesIO()
    torch.save(duplicate, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x), duplicate(x), rtol=0, atol=0)


class _Scaled(nn.Module):
    """A kernel with a tensor constant: the program keeps it as a plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x) * torch.tensor([0.5] * 4 + [0.25] * 4)


def test_a_copy_of_a_kernel_with_a_tensor_constant_pickles_back(
    tmp_path, publisher: PublisherKey, trusted: TrustedPublishers
) -> None:
    """The program module's deep copy registers a tensor constant as a persistent buffer: the
    copy (what every seed holds) saves a key the original has not (saved files and checkpoints
    hold it, and keep loading), and ``torch.save(model)`` wrote a file whose ``torch.load``
    refused it ("Unexpected key(s)"): the rebuilt kernel takes the copy's state less it."""
    torch.manual_seed(0)
    manifest = publish_artifact(_Scaled(), (torch.randn(4, 8),), str(tmp_path), "sc", publisher)
    payload, verified = UrzaLibraryClient(str(tmp_path), trusted).fetch(manifest.artifact_id)
    duplicate = copy.deepcopy(GPUKernel.from_binary(payload, verified, "cpu"))
    assert "inner.lifted_tensor_0" in duplicate.state_dict()
    buffer = io.BytesIO()
    torch.save(duplicate, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x), duplicate(x), rtol=0, atol=0)


def test_copies_do_not_leave_their_generated_source_behind(artifact) -> None:
    """Every GERMINATE copies the cached kernel; torch.fx recompiles each copy and caches the
    generated source for the life of the process unless the copy takes it along."""
    loader = torch.fx.graph_module._loader
    _, payload, manifest, _ = artifact
    original = GPUKernel.from_binary(payload, manifest, "cpu")
    x = torch.randn(3, 8)
    expected = original(x)
    gc.collect()
    before = set(loader.eval_cache)
    for _ in range(5):
        duplicate = copy.deepcopy(original)
        torch.testing.assert_close(duplicate(x), expected, rtol=0, atol=0)
        added = set(loader.eval_cache) - before
        assert added and added <= set(linecache.cache)  # the copy's own source, while it lives
        del duplicate
        gc.collect()
    # Nothing of theirs stays (an earlier test's kernel may be let go meanwhile, dropping its own).
    assert not set(loader.eval_cache) - before and not added & set(linecache.cache)
    torch.testing.assert_close(original(x), expected, rtol=0, atol=0)


def test_loads_do_not_leave_their_generated_source_behind(artifact) -> None:
    """A load builds several graph modules (the deserialised program, the unlifted module and
    intermediates); torch.fx caches each one's source for the life of the process, so a run
    that reloads evicted artifacts grew by ~20 KB a load. Only the kept module's source stays,
    and only while the kernel lives."""
    loader = torch.fx.graph_module._loader
    _, payload, manifest, _ = artifact
    x = torch.randn(3, 8)
    gc.collect()
    before = set(loader.eval_cache)
    for _ in range(4):
        kernel = GPUKernel.from_binary(payload, manifest, "cpu")
        kernel(x).sum().backward()  # the kept module runs and trains
        added = set(loader.eval_cache) - before
        assert 0 < len(added) <= 2 and added <= set(linecache.cache)
        del kernel
        gc.collect()
    # Nothing of theirs stays (an earlier test's kernel may be let go meanwhile, dropping its own).
    assert not set(loader.eval_cache) - before and not added & set(linecache.cache)


def test_loads_do_not_keep_their_shape_envs_alive(artifact) -> None:
    """Each load's torch.export deserialiser builds a ShapeEnv, which the memo caches on the
    ShapeEnv class (keyed by the instance) kept for the life of the process: one more per
    reload of an evicted artifact, with its symbols and fake tensors (~12 KB). Released
    kernels leave none behind now."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    def shape_envs() -> int:
        gc.collect()
        return sum(isinstance(o, ShapeEnv) for o in gc.get_objects())

    _, payload, manifest, _ = artifact
    x = torch.randn(3, 8)
    for _ in range(12):  # what the first loads leave in torch's bounded caches (a few)
        GPUKernel.from_binary(payload, manifest, "cpu")(x).sum().backward()
    before = shape_envs()
    for _ in range(12):
        kernel = GPUKernel.from_binary(payload, manifest, "cpu")
        kernel(x).sum().backward()
        del kernel
    assert shape_envs() <= before


def test_loads_leave_no_context_variables_behind(artifact) -> None:
    """The program module's guards function ran under a config patch with a ContextVar of its
    own, set in the calling thread's context at its first call and never taken out: one more
    per load (every reload of an evicted artifact, every ``kasmina.load``). Every program's
    guards share one patch now, and still run: a wrong input is refused."""
    _, payload, manifest, _ = artifact
    x = torch.randn(3, 8)
    GPUKernel.from_binary(payload, manifest, "cpu")(x)
    before = len(contextvars.copy_context())
    for _ in range(6):
        kernel = GPUKernel.from_binary(payload, manifest, "cpu")
        kernel(x).sum().backward()
    assert len(contextvars.copy_context()) == before
    with pytest.raises(KernelInputRefused, match="shape|size|dimension"):
        kernel(torch.randn(3, 5))


class _Parity(nn.Module):
    """A forward that branches on the batch's parity: export keeps one branch and guards it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x) if x.shape[0] % 2 == 0 else x - self.fc(x)


def test_a_programs_shape_guards_still_run(
    tmp_path, publisher: PublisherKey, trusted: TrustedPublishers
) -> None:
    """The guards share one config patch; they are not dropped: a kernel exported with an even
    batch raises on an odd one (``KernelInputRefused``: a seed sits the call out, the host's
    output used) instead of answering with the branch it never took."""
    torch.manual_seed(0)
    manifest = publish_artifact(_Parity(), (torch.randn(4, 2),), str(tmp_path), "par", publisher)
    payload, verified = UrzaLibraryClient(str(tmp_path), trusted).fetch(manifest.artifact_id)
    kernel = GPUKernel.from_binary(payload, verified, "cpu")
    kernel(torch.randn(6, 2))
    with pytest.raises(KernelInputRefused, match="Guard failed"):
        kernel(torch.randn(5, 2))


def test_an_input_the_programs_checks_refuse_raises_kernel_input_refused_in_every_copy(
    tmp_path, publisher: PublisherKey, trusted: TrustedPublishers
) -> None:
    """A call the exported program's own input checks refuse (an odd number of rows here, a
    condition its signed input shape cannot say) raises ``KernelInputRefused``, which a seed
    sits out, not the checks' ``AssertionError``, which it was charged as a fault. A seed's
    deep copy and a pickled kernel keep it; ``without_refusals`` (a merge) puts torch's back."""
    from kasmina.urza.refusals import without_refusals

    torch.manual_seed(0)
    manifest = publish_artifact(PairRows(), (torch.randn(4, 2),), str(tmp_path), "pr", publisher)
    payload, verified = UrzaLibraryClient(str(tmp_path), trusted).fetch(manifest.artifact_id)
    kernel = GPUKernel.from_binary(payload, verified, "cpu")
    buffer = io.BytesIO()
    torch.save(kernel, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    even, odd = torch.randn(6, 2), torch.randn(5, 2)
    for copied in (kernel, copy.deepcopy(kernel), loaded, copy.deepcopy(loaded)):
        torch.testing.assert_close(copied(even), kernel(even), rtol=0, atol=0)
        for count in (1, 2):
            with pytest.raises(KernelInputRefused, match=r"refuse \[5, 2\]: Guard failed") as info:
                copied(odd)
            assert info.value.count == count and isinstance(info.value.__cause__, AssertionError)
    with pytest.raises(AssertionError, match="Guard failed"):
        without_refusals(copy.deepcopy(kernel).inner)(odd)


def test_loads_on_two_threads_keep_each_others_sources(artifact, monkeypatch) -> None:
    """A load drops the sources generated since it began, except its kept module's: loads on
    two fetch workers take turns, or the one that ends last drops the other's kept source."""
    loader = torch.fx.graph_module._loader
    _, payload, manifest, _ = artifact
    real, inside = kernel_module.move_to_device_pass, threading.Event()

    def slow(program, device):  # the first load waits here while the second one starts
        if not inside.is_set():
            inside.set()
            time.sleep(0.3)
        return real(program, device)

    monkeypatch.setattr(kernel_module, "move_to_device_pass", slow)
    kernels: list[GPUKernel] = []
    first = threading.Thread(
        target=lambda: kernels.append(GPUKernel.from_binary(payload, manifest, "cpu"))
    )
    first.start()
    inside.wait()
    kernels.append(GPUKernel.from_binary(payload, manifest, "cpu"))
    first.join()
    kept = [
        type(sub).forward.__code__.co_filename
        for kernel in kernels
        for sub in kernel.modules()
        if isinstance(sub, torch.fx.GraphModule)
    ]
    assert len(kept) == 2 and all(key in loader.eval_cache for key in kept)


def test_one_load_kernel_is_one_cache_lookup(artifact, trusted) -> None:
    """A cold ``load_kernel`` counts one miss (not a miss, then another inside the load), a
    warm one one hit."""
    import asyncio

    from kasmina.manager.config import KasminaConfig
    from kasmina.manager.manager import KasminaKernelManager
    from kasmina.utils.keyring import Keyring, generate_key

    _, _, manifest, store = artifact
    config = KasminaConfig(urza_url=str(store), urza_trusted_publishers=trusted.to_json())
    manager = KasminaKernelManager(config, keyring=Keyring({"t": generate_key()}))
    try:
        asyncio.run(manager.load_kernel(manifest.artifact_id))
        stats = manager.kernel_cache.stats()
        assert (stats["hits"], stats["misses"]) == (0, 1)
        asyncio.run(manager.load_kernel(manifest.artifact_id))
        stats = manager.kernel_cache.stats()
        assert (stats["hits"], stats["misses"], stats["hit_rate"]) == (1, 1, 0.5)
    finally:
        manager.close()


class Hazards(nn.Module):
    """Writes into its input in place and draws random numbers (dropout in train mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(8))
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)
        return self.drop(x * self.w)


def test_input_mutation_and_random_ops_are_read_at_load_and_kept_by_copies(
    artifact, publisher: PublisherKey, trusted: TrustedPublishers
) -> None:
    _, payload, manifest, store = artifact
    plain = GPUKernel.from_binary(payload, manifest)
    assert (plain.mutates_input, plain.draws_random, plain.writes_unsaved_buffer) == (False,) * 3
    published = publish_artifact(
        Hazards().train(), (torch.randn(4, 8),), str(store), "hz", publisher
    )
    got, verified = UrzaLibraryClient(str(store), trusted).fetch(published.artifact_id)
    kernel = GPUKernel.from_binary(got, verified)
    buffer = io.BytesIO()
    torch.save(kernel, buffer)
    buffer.seek(0)
    for twin in (kernel, copy.deepcopy(kernel), torch.load(buffer, weights_only=False)):
        assert (twin.mutates_input, twin.draws_random) == (True, True)
    # A seed driven without the manager (no GERMINATE to refuse it) takes no such kernel.
    seed = GradientIsolatedSeed(8, "s")
    with pytest.raises(ValueError, match="mutates its input in place"):
        seed.attach_kernel(kernel)
    assert seed.kernel is None


class Steps(nn.Module):
    """A step counter in a non-persistent buffer (``state_dict`` does not save it), written in
    place in the way ``how`` names, or only read."""

    def __init__(self, how: str, persistent: bool = False) -> None:
        super().__init__()
        self.how = how
        self.fc = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)
        self.register_buffer("step", torch.zeros(2), persistent=persistent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "add_":
            self.step.add_(1)
        elif self.how == "view":
            self.step[0].add_(1)  # a write through a view of the buffer
        elif self.how == "assign":
            self.step = self.step + 1  # exported as a ``copy_`` into the buffer
        return self.norm(self.fc(x)) * torch.tanh(self.step.sum())


@pytest.mark.parametrize(
    ("module", "written"),
    [
        (Steps("add_"), True),
        (Steps("view"), True),
        (Steps("assign"), True),
        (Steps("read"), False),  # read only (a rotary cache, a constant)
        (Steps("add_", persistent=True), False),  # saved by state_dict, as batch norm's stats
        (Blueprint().train(), False),  # batch norm's statistics written, a constant read
    ],
    ids=["add_", "view", "assign", "read", "persistent", "batch-norm"],
)
def test_writes_into_a_non_persistent_buffer_are_read_from_the_program(
    module: nn.Module, written: bool
) -> None:
    exported = torch.export.export(module.train(), (torch.randn(4, 8),))
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    program = kernel_module._deserialise(buffer.getvalue())  # as a kernel's load reads it
    assert kernel_module._writes_unsaved_buffer(program) is written
    assert kernel_module._writes_unsaved_buffer(program.run_decompositions()) is written
    assert kernel_module._mutates_input(program) is False


def test_a_kernel_writing_a_non_persistent_buffer_is_flagged_and_refused_by_a_seed(
    artifact, publisher: PublisherKey, trusted: TrustedPublishers
) -> None:
    store = artifact[3]
    published = publish_artifact(Steps("add_"), (torch.randn(4, 8),), str(store), "np", publisher)
    kernel = GPUKernel.from_binary(
        *UrzaLibraryClient(str(store), trusted).fetch(published.artifact_id)
    )
    for twin in (kernel, copy.deepcopy(kernel)):
        assert (twin.writes_unsaved_buffer, twin.mutates_input) == (True, False)
    seed = GradientIsolatedSeed(8, "s")
    with pytest.raises(ValueError, match="writes in place into a non-persistent buffer"):
        seed.attach_kernel(kernel)
    assert seed.kernel is None


@pytest.mark.parametrize("preload", [False, True])
def test_an_offloaded_kernel_sits_out_and_preloaded_it_runs(artifact, preload, caplog) -> None:
    """accelerate's ``cpu_offload`` leaves a module's weights on the meta device until its own
    forward runs, and a kernel's program reads its submodules' weights without calling them:
    every call raised, was charged as the seed's fault, and a few inference forwards
    quarantined a healthy seed. It sits out now (the host's output, no fault), and the log
    names ``preload_module_classes``, with which the kernel loads its weights and runs."""
    accelerate = pytest.importorskip("accelerate")
    from kasmina.seeds.inject import attach
    from kasmina.stages import SeedStage as S

    _, payload, manifest, _ = artifact
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    (slot,) = attach(model, ["0"], 1, 8)
    seed = slot.seed(0)
    seed.attach_kernel(GPUKernel.from_binary(payload, manifest, torch.device("cpu")))
    for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION):
        seed.transition_to(stage)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        grown, bare = model(x), model[2](model[1](slot.host(x)))
    options = {"preload_module_classes": ["GPUKernel"]} if preload else {}
    accelerate.cpu_offload(model, execution_device="cpu", **options)
    with torch.no_grad(), caplog.at_level("WARNING", logger="kasmina.seeds.faults"):
        outs = [model(x) for _ in range(seed.fault_limit)]
    assert seed.faults == 0 and seed.stage == S.STABILIZATION
    for out in outs:
        assert torch.equal(out, grown if preload else bare)
    assert ("preload_module_classes" in caplog.text) != preload
