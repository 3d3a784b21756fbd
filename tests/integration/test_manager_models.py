"""A tiny Llama managed end to end: signed commands, published artifacts, compiled forward;
a Wav2Vec2's convolution front end germinated after a recording forward in training mode.

``torch.compile(fullgraph=True)`` is the first forward after ``manager.attach`` (the slots
record their host output while compiled), GERMINATE refuses artifacts that do not fit the
slot's contract with the reason, and a seed goes DORMANT -> ... -> ACTIVE through every gate.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn import functional as F

from kasmina.control.auth import sign_command
from kasmina.control.builders import make_seed_command
from kasmina.kd.config import KDConfig
from kasmina.manager.manager import KasminaKernelManager
from kasmina.persist.loading import load
from kasmina.persist.merging import merge
from kasmina.persist.saving import save
from kasmina.seeds import seed as seed_module
from kasmina.stages import SeedStage
from kasmina.urza.blueprints import ResidualMLP
from kasmina.urza.kernel import GPUKernel
from kasmina.urza.publish import publish_artifact
from kasmina.utils.keyring import Keyring, generate_key
from tests.integration.models import tiny_albert, tiny_llama
from tests.manager.helpers import PUBLISHER, SEED0, Rig, make_config, run_command

pytest.importorskip("transformers")

S = SeedStage
SEED = "model.layers.1.mlp.down_proj[0]"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A kernel for the 16-wide chunks of down_proj's [B, T, 32] output, and one 8 wide."""
    store = tmp_path_factory.mktemp("urza")
    torch.manual_seed(1)
    fits = publish_artifact(
        ResidualMLP(16, 16), [torch.randn(2, 6, 16)], str(store), "mlp16", PUBLISHER
    )
    narrow = publish_artifact(
        ResidualMLP(8, 8), [torch.randn(2, 6, 8)], str(store), "mlp8", PUBLISHER
    )
    return store, fits.artifact_id, narrow.artifact_id


def test_llama_seed_to_active_by_signed_commands_compiled_from_the_first_forward(
    tmp_path: Path, artifacts: tuple[Path, str, str]
) -> None:
    store, fits, narrow = artifacts
    keyring = Keyring({"ctl": generate_key()})
    # A random kernel's benefit on random tokens is whatever it is: G5's threshold is not
    # under test here, only that the measured evidence reaches it.
    config = make_config(tmp_path, store, performance_gate=0)
    manager = KasminaKernelManager(config, keyring=keyring)
    model = tiny_llama()
    slots = manager.attach(model, ["mlp.down_proj"], 2, 16, host_lr=1e-3, seed_lr=1e-2)
    assert [s.layer_id for s in slots] == [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # graph breaks other tests counted on purpose
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    ids = torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(3))

    def loss_fn(out: object, targets: torch.Tensor) -> torch.Tensor:
        logits = out.logits  # type: ignore[attr-defined]
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def train(steps: int = 1) -> None:
        for _ in range(steps):
            manager.backward(loss_fn(compiled(ids), ids))
            manager.step()

    def send(op: str, artifact_id: str = "", **params: float) -> bool:
        cmd = make_seed_command(op, SEED, artifact_id, params)
        return run_command(manager, sign_command(cmd, keyring, "ctl").SerializeToString())

    train()
    assert counter.frame_count == 1
    assert slots[1].chunk_spec() == (torch.Size([4, 6, 16]), torch.float32, torch.device("cpu"))
    assert not send("germinate", narrow)
    assert "do not fit seed" in manager.command_log[-1][3]
    assert manager.seed(SEED).stage == S.DORMANT
    assert send("germinate", fits), manager.command_log[-1]
    train(2)
    manager.end_epoch(0)
    for stage in (S.COMPATIBILITY_CHECK, S.GRAFTING):
        assert send("advance"), manager.command_log[-1]
        assert manager.seed(SEED).stage == stage
        train(1)
    train(4)
    assert send("advance"), manager.command_log[-1]  # G4: alpha reached 1
    assert manager.seed(SEED).stage == S.STABILIZATION
    train(1)
    measured = manager.evaluate_seeds([(ids, ids)], loss_fn=loss_fn)
    assert measured[SEED].stage == S.STABILIZATION  # G5's evidence, measured in this stage
    assert send("advance"), manager.command_log[-1]
    assert manager.seed(SEED).stage == S.ACTIVE
    train(1)
    assert manager.guard.violating_steps == 0
    assert counter.frame_count <= 2 + 6  # once after recording, then per stage change
    assert not torch._dynamo.utils.counters["graph_break"]


def test_a_bf16_host_refuses_an_fp32_kernel_with_the_reason(
    tmp_path: Path, artifacts: tuple[Path, str, str]
) -> None:
    store, fits, _ = artifacts
    keyring = Keyring({"ctl": generate_key()})
    manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    model = tiny_llama().to(torch.bfloat16)
    manager.attach(model, ["mlp.down_proj"], 2, 16)
    with torch.no_grad():  # a graph would keep the command for the step's end
        model(torch.randint(0, 128, (2, 6)))
    cmd = make_seed_command("germinate", SEED, fits, {})
    assert not run_command(manager, sign_command(cmd, keyring, "ctl").SerializeToString())
    reason = manager.command_log[-1][3]
    assert "float32 is not the host's torch.bfloat16" in reason, reason
    assert manager.seed(SEED).stage == S.DORMANT


class ChannelKernel(torch.nn.Module):
    """``x + conv1x1(x)`` over a chunk of a (batch, channels, frames) output's channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def test_wav2vec2_germinates_after_a_recording_forward_in_training_mode(tmp_path: Path) -> None:
    """Wav2Vec2's feature encoder marks its input as needing grad in training, under
    ``no_grad`` too: its first convolution's slot took the recording forward for a reentrant
    checkpoint's first run, and GERMINATE (every command) waited for a step's end. It applies
    at once now, and the seed trains through the lifecycle's first steps."""
    from tests.integration.models import audio, tiny_wav2vec2

    torch.manual_seed(1)
    example = torch.randn(2, 4, 49)
    store = tmp_path / "urza"
    artifact = publish_artifact(ChannelKernel(4), [example], str(store), "c4", PUBLISHER)
    keyring = Keyring({"ctl": generate_key()})
    manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    model = tiny_wav2vec2()
    target = r"wav2vec2\.feature_extractor\.conv_layers\.0\.conv"
    (slot,) = manager.attach(model, target, 2, 4, host_lr=1e-3, seed_lr=1e-2)
    assert model.training
    with torch.no_grad():
        model(**audio())
    assert slot.chunk_spec() == (example.shape, torch.float32, torch.device("cpu"))
    seed = f"{slot.layer_id}[0]"
    cmd = make_seed_command("germinate", seed, artifact.artifact_id, {})
    assert run_command(manager, sign_command(cmd, keyring, "ctl").SerializeToString())
    assert manager.seed(seed).stage == S.ISOLATED_INIT
    for _ in range(2):
        manager.backward(model(**audio()).logits.pow(2).mean())
        report = manager.step()
        assert report["isolation_clean"] and report["host_stepped"], report
    assert manager.seed(seed).faults == 0
    manager.close()


ALBERT_SLOT = "encoder.albert_layer_groups.0.albert_layers.0.ffn_output"


def _graft_reference(
    model: torch.nn.Module, seed: seed_module.GradientIsolatedSeed, ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The gradients of the ALBERT loss with ``seed`` (chunk 0 of the shared ``ffn_output``)
    GRAFTING, by hand: a bare ALBERT with the slot's host weights, whose ``ffn_output`` blends
    ``alpha * kernel(h.detach()) + (1 - alpha) * h.detach()`` into chunk 0 at every call."""
    bare = tiny_albert()
    grown = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in bare.named_parameters():
            param.copy_(grown[name.replace(".ffn_output.", ".ffn_output.host.")])
    kernel, alpha = seed.kernel, seed.alpha.detach()

    def graft(_module: object, _args: object, out: torch.Tensor) -> torch.Tensor:
        own, rest = out.split(16, dim=-1)
        host = own.detach()
        return torch.cat([alpha * kernel(host) + (1 - alpha) * host, rest], dim=-1)

    bare.encoder.albert_layer_groups[0].albert_layers[0].ffn_output.register_forward_hook(graft)
    names = [n for n, _ in bare.named_parameters()] + [
        f"kernel.{n}" for n, _ in kernel.named_parameters()
    ]
    params = [*bare.parameters(), *kernel.parameters()]
    loss = bare(input_ids=ids).last_hidden_state.pow(2).mean()
    return dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True), strict=True))


def test_albert_shared_layer_grows_a_seed_that_runs_at_every_layer(
    tmp_path: Path, artifacts: tuple[Path, str, str]
) -> None:
    """ALBERT calls its one shared layer at each of its three layers, so the slot on its
    ``ffn_output`` runs three times per forward: the seed takes the sum of the three calls'
    gradients (a hand-built reference), the isolation checks find no leak in any stage, its
    alpha advances once per step, and the grown model saves, loads and merges to the same
    eval outputs."""
    store, fits, _ = artifacts
    keyring = Keyring({"ctl": generate_key()})
    manager = KasminaKernelManager(
        make_config(tmp_path, store, performance_gate=0), keyring=keyring
    )
    model = tiny_albert()
    (slot,) = manager.attach(model, ["ffn_output"], 2, 16, host_lr=1e-3, seed_lr=1e-2)
    assert slot.layer_id == ALBERT_SLOT
    seed_id = f"{ALBERT_SLOT}[0]"
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    calls: list[int] = []
    slot.register_forward_hook(lambda *_: calls.append(1))

    def loss_fn(out: object, _targets: object = None) -> torch.Tensor:
        return out.last_hidden_state.pow(2).mean()  # type: ignore[attr-defined]

    def train(steps: int = 1) -> None:
        for _ in range(steps):
            manager.backward(loss_fn(model(input_ids=ids)))
            report = manager.step()
            assert report["isolation_clean"] and report["host_stepped"], report

    def send(op: str, artifact_id: str = "") -> bool:
        cmd = make_seed_command(op, seed_id, artifact_id, {})
        return run_command(manager, sign_command(cmd, keyring, "ctl").SerializeToString())

    train()
    assert len(calls) == 3  # one slot, called at each layer
    assert send("germinate", fits), manager.command_log[-1]
    train(2)
    manager.end_epoch(0)
    for stage in (S.COMPATIBILITY_CHECK, S.GRAFTING):
        assert send("advance"), manager.command_log[-1]
        assert manager.seed(seed_id).stage == stage
        train()
    seed = manager.seed(seed_id)
    assert seed.graft_step == 1 and 0 < float(seed.alpha) < 1  # once per step, not per call
    want = _graft_reference(model, seed, ids)
    manager.backward(loss_fn(model(input_ids=ids)))
    got = {n.replace(".host.", ".", 1): p.grad for n, p in model.named_parameters()}
    for name, grad in seed.kernel.named_parameters():
        got[f"kernel.{name}"] = grad.grad
    for name, expected in want.items():
        if expected is None:  # the pooler: not in the loss
            assert got[name] is None, name
            continue
        torch.testing.assert_close(got[name], expected, msg=name)
    manager.step()
    train(2)
    assert seed.graft_step == 4
    assert send("advance"), manager.command_log[-1]  # G4: alpha reached 1
    train()
    measured = manager.evaluate_seeds([(ids, ids)], loss_fn=loss_fn)
    assert measured[seed_id].samples == 2 and seed.faults == 0
    assert send("advance"), manager.command_log[-1]
    assert seed.stage == S.ACTIVE
    train()
    assert manager.guard.violating_steps == 0 and seed.faults == 0
    model.eval()
    with torch.no_grad():
        grown = model(input_ids=ids).last_hidden_state
    save(model, tmp_path / "albert.kasmina")
    manager.close()
    fresh = tiny_albert().eval()
    load(tmp_path / "albert.kasmina", fresh, publishers=PUBLISHER.trusted_publishers())
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).last_hidden_state, grown)
        merged = merge(fresh)
        torch.testing.assert_close(merged(input_ids=ids).last_hidden_state, grown)


# ---------------------------------------------------------------- isolation under torch.compile


@pytest.fixture(scope="module")
def host_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A kernel for the 2-wide chunks of the small manager-test host's ``out``."""
    store = tmp_path_factory.mktemp("urza-host")
    torch.manual_seed(1)
    kernel = publish_artifact(ResidualMLP(2, 2), [torch.randn(3, 2)], str(store), "k2", PUBLISHER)
    return store, kernel.artifact_id


def _compiled_rig(
    tmp_path: Path, store: Path, backend: str, fullgraph: bool, **overrides: object
) -> tuple[Rig, Callable[..., dict]]:
    """A rig over the small host, its model compiled; ``train(teacher=None)`` runs one step
    through the compiled model and returns the step's report."""
    torch._dynamo.reset()
    rig = Rig(make_config(tmp_path, store, **overrides), Keyring({"ctl": generate_key()}))
    compiled = torch.compile(rig.model, backend=backend, fullgraph=fullgraph)
    manager = rig.manager

    def train(teacher: torch.Tensor | None = None) -> dict:
        manager.set_teacher_logits(teacher)
        loss = F.cross_entropy(compiled(rig.x), rig.y)
        manager.backward(loss, kd_loss=manager.collect_kd_losses())
        return manager.step()

    return rig, train


@pytest.mark.parametrize(
    "backend, fullgraph, last",
    [
        ("aot_eager", True, S.STABILIZATION),
        # Inductor compiles C++ per stage (about 10 s each on two shared cores): fewer stages.
        pytest.param("inductor", False, S.GRAFTING, marks=pytest.mark.slow),
    ],
)
def test_compiled_training_of_an_isolated_seed_has_no_false_violations(
    tmp_path: Path,
    host_store: tuple[Path, str],
    backend: str,
    fullgraph: bool,
    last: SeedStage,
) -> None:
    """Compiled with an AOT backend, a seed's output comes out of one backward node over the
    whole graph, which reaches every host parameter: the graph walk cannot attribute it and
    counts nothing, so a healthy seed is not quarantined and the host steps every step."""
    store, artifact = host_store
    rig, train = _compiled_rig(tmp_path, store, backend, fullgraph)
    manager = rig.manager

    def steps(n: int, stage: SeedStage) -> None:
        for _ in range(n):
            report = train()
            assert report["isolation_clean"] and report["host_stepped"], report
            assert rig.stage(SEED0) == stage

    steps(1, S.DORMANT)
    assert rig.send("germinate", SEED0, artifact)
    steps(3, S.ISOLATED_INIT)  # the breaker's limit: it used to trip here
    manager.end_epoch(0)
    for stage, n in ((S.COMPATIBILITY_CHECK, 1), (S.GRAFTING, 4), (S.STABILIZATION, 2)):
        assert rig.send("advance", SEED0), manager.command_log[-1]
        steps(n, stage)
        if stage == last:
            break
    assert manager.guard.violating_steps == 0 and manager.guard.breaker_trips == 0
    assert manager.seed(SEED0).isolation_violations == 0


def test_an_undetached_seed_input_is_caught_under_compile(
    tmp_path: Path, host_store: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot that routes the host's activation around the detach: compiled, the output's
    graph cannot be walked, but the kernel's traced input needs a gradient, and that trips the
    breaker (no KD loss, so no seed-only backward, is needed)."""
    store, artifact = host_store
    real = seed_module.call_kernel
    monkeypatch.setattr(  # an ACTIVE seed's call: the kernel sees x itself, not x.detach()
        seed_module, "call_kernel", lambda kernel, x, _, record, *a: real(kernel, x, True, record)
    )
    rig, train = _compiled_rig(tmp_path, store, "aot_eager", True)
    train()
    assert rig.send("germinate", SEED0, artifact)
    for step in range(3):
        report = train()
        assert not report["isolation_clean"] and not report["host_stepped"]
        assert rig.stage(SEED0) == (S.QUARANTINE if step == 2 else S.ISOLATED_INIT)
    monitor = rig.manager.require_registry()[SEED0].monitor
    assert monitor is not None and monitor.tripped
    assert all("not detached" in " ".join(found) for found in monitor.violations)
    assert rig.manager.guard.breaker_trips == 1
    assert train()["host_stepped"]  # the host keeps training


@pytest.mark.parametrize("sizes", [(16, 16, 16), (5, 16, 5)], ids=["static", "dynamic"])
def test_a_kernel_reaching_the_host_is_caught_under_compile_by_the_kd_check(
    tmp_path: Path,
    host_store: tuple[Path, str],
    monkeypatch: pytest.MonkeyPatch,
    sizes: tuple[int, ...],
) -> None:
    """A kernel that reads a host parameter itself (its input is detached): compiled, the graph
    walk cannot attribute the seed's output, and the seed-only (KD) backward's leak check is
    what catches it; the leaked gradient never reaches the host's optimizer. Also once a new
    batch size has recompiled the model with dynamic shapes: its backward donated its buffers
    and refused the retained KD backward, so the check never ran (the kernel was never caught)."""
    store, artifact = host_store
    kd = {"kd_enabled": True, "kd": KDConfig(temperature=2.0, alpha=1.0)}
    rig, train = _compiled_rig(tmp_path, store, "aot_eager", True, **kd)
    host_bias = rig.model.inp.bias
    real = GPUKernel.forward
    monkeypatch.setattr(GPUKernel, "forward", lambda self, x: real(self, x) + host_bias.sum())
    train()
    assert rig.send("germinate", SEED0, artifact)
    generator = torch.Generator().manual_seed(4)
    for step, n in enumerate(sizes):
        rig.x, rig.y = torch.randn(n, 6, generator=generator), torch.arange(n) % 4
        teacher = torch.randn(n, 4, generator=generator)
        before = host_bias.detach().clone()
        report = train(teacher)
        assert not report["isolation_clean"] and not report["host_stepped"]
        assert torch.equal(host_bias, before)
        assert rig.stage(SEED0) == (S.QUARANTINE if step == 2 else S.ISOLATED_INIT)
    monitor = rig.manager.require_registry()[SEED0].monitor
    assert monitor is not None and monitor.tripped and monitor.unattributed_graphs >= 1
    assert all("seed-only (KD) backward" in " ".join(found) for found in monitor.violations)
    assert rig.manager.counters["kd_backward_failed"] == 0


def test_a_compiled_per_sample_gradient_of_a_grown_model_gives_the_eager_one(
    tmp_path, host_store
) -> None:
    """``torch.compile(fullgraph=True)`` of ``vmap(grad(...))`` over a ``functional_call`` of
    the managed model (per-sample gradients), once a seed ran its kernel: the slot wrote its
    fault flags, and the manager's kernel hook kept the kernel's output, from inside the
    transform; traced whole,
    the first is refused ("would mutate a captured Tensor") and the second made the wrapper an
    output of the graph ("Cannot access storage of TensorWrapper"). The eager one always
    worked; now both give the same gradients, and training goes on."""
    store, artifact = host_store
    torch._dynamo.reset()
    rig = Rig(make_config(tmp_path, store), Keyring({"ctl": generate_key()}))
    assert rig.send("germinate", SEED0, artifact)
    rig.train(1)
    model, buffers = rig.model, dict(rig.model.named_buffers())
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(model, (p, buffers), (x[None],)), y[None])

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
    want = per_sample(params, rig.x, rig.y)
    got = torch.compile(per_sample, backend="aot_eager", fullgraph=True)(params, rig.x, rig.y)
    assert any(".seeds." in name for name in want)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6)
    assert rig.train(1)["isolation_clean"]


def _distilling_grafting_rig(
    tmp_path: Path, store: Path, artifact: str
) -> tuple[Rig, torch.Tensor]:
    """A rig whose seed distils and is in GRAFTING, and its teacher logits."""
    torch._dynamo.reset()
    config = make_config(tmp_path, store, kd_enabled=True, kd=KDConfig(temperature=2.0))
    rig = Rig(config, Keyring({"ctl": generate_key()}))
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))
    assert rig.send("germinate", SEED0, artifact)
    rig.train(1, teacher)
    rig.manager.end_epoch(0)
    for stage in (SeedStage.COMPATIBILITY_CHECK, SeedStage.GRAFTING):
        assert rig.send("advance", SEED0) and rig.stage(SEED0) == stage
        rig.train(1, teacher)
    return rig, teacher


@pytest.mark.parametrize("inference", [False, True], ids=["teacher", "inference-teacher"])
def test_a_kd_loss_collected_inside_a_compiled_region_trains_the_seed(
    tmp_path, host_store, inference: bool
) -> None:
    """Teacher logits set and the KD loss collected inside a compiled function (no transform):
    the loss is marked as the seeds' KD root and an inference-mode teacher copied out of it,
    each in eager code at a graph break, so ``manager.backward`` takes it and the step trains."""
    rig, teacher = _distilling_grafting_rig(tmp_path, *host_store)
    manager = rig.manager
    if inference:
        with torch.inference_mode():
            teacher = teacher.clone()

    def forward(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> tuple:
        manager.set_teacher_logits(t)
        loss = F.cross_entropy(rig.model(x), y)
        return loss, manager.collect_kd_losses()

    seed = manager.seed(SEED0)
    before = [p.detach().clone() for p in seed.seed_parameters()]
    loss, kd = torch.compile(forward, backend="aot_eager")(rig.x, rig.y, teacher)
    assert kd is not None
    manager.backward(loss, kd_loss=kd)
    assert manager.step()["isolation_clean"]
    assert any(not torch.equal(a, p) for a, p in zip(before, seed.seed_parameters(), strict=True))


def test_a_compiled_grad_with_a_grafting_seed_distilling_gives_the_eager_one(
    tmp_path, host_store
) -> None:
    """``torch.compile(grad(f), fullgraph=True)`` over a ``functional_call`` of the managed
    model, a seed in GRAFTING, teacher logits set and the KD loss collected inside ``f``: the
    blend's and the KD loss's custom ops have no ``torch.func`` rule and the compiled transform
    raised inside TorchDynamo (and traced over an ``autograd.Function`` it gave the seed no
    gradient). Under a compiled transform the ops run as plain torch ops: the eager gradients."""
    rig, teacher = _distilling_grafting_rig(tmp_path, *host_store)
    manager = rig.manager
    model, buffers = rig.model, dict(rig.model.named_buffers())
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        manager.set_teacher_logits(teacher)
        out = torch.func.functional_call(model, (p, buffers), (x,))
        kd = manager.collect_kd_losses()
        assert kd is not None  # the seed distilled inside the transform
        return F.cross_entropy(out, y) + kd

    want = torch.func.grad(loss)(params, rig.x, rig.y)
    got = torch.compile(torch.func.grad(loss), backend="aot_eager", fullgraph=True)(
        params, rig.x, rig.y
    )
    assert any(".seeds.0" in name and bool(grad.any()) for name, grad in want.items())
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6)
    assert rig.train(1, teacher)["isolation_clean"]
