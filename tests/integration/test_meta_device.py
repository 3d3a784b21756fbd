"""Training steps on the ``meta`` device: two kinds of GPU bug that a CPU run cannot show.

On a CPU every tensor is on the one device there is. A tensor Kasmina creates without naming
the model's device mixes silently with the model's own there, and reading a device value
(``.item()``, ``.tolist()``, ``bool(t)``) costs nothing; on a GPU the first is an error and the
second a host sync on the hot path. Meta tensors have shapes, dtypes, strides and autograd but
no data: an op that mixes a meta tensor with a CPU one raises, and so does any read of a value.
So a model moved to ``meta`` gets through a whole training step (forward, KD loss, backward,
optimizer step) and an eval forward through seeds in every running stage only if Kasmina keeps
every tensor on the model's device and reads nothing back inside the step. The CUDA runs of
``perf/gpu_check.sh`` check the same with the sync debugger; this runs on every CI machine.

The ops run on ``meta`` through their CPU reference path (``use_triton`` is for CUDA and the
interpreter's CPU tensors). Left out: the lifecycle table, whose updates come with commands and
read their codes back by design (at the step's safe point, not inside it), and the Hugging Face
cases of the integration suite, whose own mask preparation reads tensor values.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kasmina.kd.config import KDConfig
from kasmina.ops import (
    alpha_blend,
    fused_linear_kd_loss,
    grad_norms,
    kd_kl_loss,
    leak_check,
)
from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import SeedStage
from tests.integration.models import CASES
from tests.integration.test_models import build, give_kernels

S = SeedStage
META = torch.device("meta")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PATH = [S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION, S.ACTIVE]


@pytest.fixture(autouse=True)
def auto_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend a user gets: meta tensors take the reference path."""
    monkeypatch.delenv("KASMINA_BACKEND", raising=False)


def _on_meta(*tensors: torch.Tensor | None) -> bool:
    return all(t is not None and t.device == META for t in tensors)


def _rand(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
    return torch.empty(shape, device=META, dtype=dtype).requires_grad_(grad)


# --------------------------------------------------------------------------- the ops


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_op_runs_forward_and_backward_on_meta(dtype: torch.dtype) -> None:
    seed, host = _rand(3, 5, 8, dtype=dtype, grad=True), _rand(3, 5, 8, dtype=dtype, grad=True)
    alpha = _rand(4, grad=True)  # per chunk, trained
    for a in (0.3, torch.tensor(0.3, device=META), alpha):
        out = alpha_blend(seed, host, a)
        assert _on_meta(out) and out.dtype == dtype and out.shape == seed.shape
        out.sum().backward()
    assert _on_meta(seed.grad, alpha.grad) and host.grad is None  # the host is detached

    student, teacher = _rand(3, 5, 11, dtype=dtype, grad=True), _rand(3, 5, 11, dtype=dtype)
    mask = torch.ones(3, 5, dtype=torch.bool, device=META)
    for reduction in ("batchmean", "mean", "sum", "none"):
        loss = kd_kl_loss(student, teacher, 2.0, reduction, mask)
        assert _on_meta(loss) and loss.shape == ((3, 5) if reduction == "none" else ())
        loss.sum().backward()
    assert _on_meta(student.grad) and student.grad.dtype == dtype

    hidden, weight = _rand(15, 7, dtype=dtype, grad=True), _rand(11, 7, dtype=dtype, grad=True)
    bias = _rand(11, dtype=dtype, grad=True)
    losses = [
        fused_linear_kd_loss(
            hidden,
            weight,
            _rand(15, 11, dtype=dtype),
            student_bias=bias,
            temperature=2.0,
            chunk_rows=4,
            student_softcap=5.0,
        ),
        fused_linear_kd_loss(
            hidden,
            weight,
            teacher_hidden=_rand(15, 7, dtype=dtype),
            teacher_weight=_rand(11, 7, dtype=dtype),
            reduction="none",
            mask=torch.ones(15, dtype=torch.bool, device=META),
        ),
    ]
    for loss in losses:
        assert _on_meta(loss)
        loss.sum().backward()
    assert _on_meta(hidden.grad, weight.grad, bias.grad)
    assert (hidden.grad.dtype, weight.grad.dtype) == (dtype, dtype)

    grads = [hidden.grad, None, weight.grad, bias.grad]
    norms = grad_norms(grads)
    norms2, flag = leak_check([hidden, weight, bias], 0.0, use_grad=True)
    assert _on_meta(norms, norms2, flag) and norms.shape == (4,) and flag.dtype == torch.bool


# --------------------------------------------------------------------------- seeds in a layer

STAGE_MIXES = {
    "grafting": [S.GRAFTING, S.GRAFTING, S.GRAFTING],  # the one-node guarded blend
    "isolated": [S.DORMANT, S.ISOLATED_INIT, S.COMPATIBILITY_CHECK],
    "mixed": [S.GRAFTING, S.STABILIZATION, S.ACTIVE],
    "active": [S.ACTIVE, S.ACTIVE, S.DORMANT],
}


def _layer(stages: list[SeedStage], guard_backward: bool, width: int = 12) -> KasminaLayer:
    torch.manual_seed(0)
    chunk = width // len(stages)
    layer = KasminaLayer(nn.Linear(width, width), len(stages), chunk, kd_config=KDConfig())
    for seed, stage in zip(layer.seeds, stages, strict=True):
        if stage == S.DORMANT:
            continue
        seed.attach_kernel(nn.Sequential(nn.Linear(chunk, chunk), nn.Tanh()))
        for step in PATH[: PATH.index(stage) + 1]:
            seed.transition_to(step)
        seed.guard_backward = guard_backward
    layer.update_alpha_blending(3, 10)
    return layer


def _grafted_net(stages: list[SeedStage], guard_backward: bool, kd: str, device: torch.device):
    layer = _layer(stages, guard_backward)
    head = nn.Linear(12, 17)
    net = nn.Sequential(nn.Linear(6, 12), layer, nn.ReLU(), head).to(device)
    if kd == "head":
        layer.set_kd_head(head.weight, head.bias)
    return net, layer


def _train(net: nn.Module, layer: KasminaLayer, steps: int = 2) -> torch.Tensor:
    """Steps with a teacher, the KD loss (when a seed makes one) and AdamW; the last output."""
    device = next(net.parameters()).device
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3)).to(device)
    for _ in range(steps):
        layer.set_teacher_logits(torch.randn(8, layer.kd_width).to(device))
        out = net(x)
        loss = out.float().square().mean()
        kd_loss = layer.get_and_clear_kd_losses()
        if kd_loss is not None:
            loss = loss + kd_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return out


@pytest.mark.parametrize("guard_backward", [True, False])
@pytest.mark.parametrize("mix", list(STAGE_MIXES))
@pytest.mark.parametrize("kd", ["logits", "head"])
def test_a_training_step_through_seeds_in_every_running_stage_on_meta(
    mix: str, guard_backward: bool, kd: str
) -> None:
    """Forward with a teacher, KD loss, backward and an AdamW step, then an eval forward, all on
    ``meta``; the parameters that get a gradient are those that get one on the CPU, and the
    KD loss exists where it does there."""
    stages = STAGE_MIXES[mix]
    net, layer = _grafted_net(stages, guard_backward, kd, META)
    assert all(t.device == META for t in (*net.parameters(), *net.buffers()))
    out = _train(net, layer)
    assert _on_meta(out) and out.shape == (8, 17)
    twin, twin_layer = _grafted_net(stages, guard_backward, kd, torch.device("cpu"))
    _train(twin, twin_layer)
    want = {n for n, p in twin.named_parameters() if p.grad is not None}
    got = {n for n, p in net.named_parameters() if p.grad is not None}
    assert got == want and any(".seeds." in n for n in want)
    assert _on_meta(*(p.grad for p in net.parameters() if p.grad is not None))
    net.eval()
    with torch.no_grad():
        assert _on_meta(net(torch.empty(2, 6, device=META)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_grafting_step_on_meta(dtype: torch.dtype) -> None:
    layer = _layer(STAGE_MIXES["mixed"], guard_backward=True)
    net = nn.Sequential(nn.Linear(6, 12), layer, nn.Linear(12, 5)).to(META, dtype)
    out = net(_rand(4, 6, dtype=dtype))
    out.float().sum().backward()
    assert _on_meta(out) and out.dtype == dtype
    assert all(_on_meta(p.grad) and p.grad.dtype == dtype for p in layer.seed(0).seed_parameters())


# --------------------------------------------------------------------------- third-party models

TORCH_CASES = [c for c in CASES if c.name.startswith(("encoder", "resnet"))]


@pytest.mark.parametrize("case", TORCH_CASES, ids=[c.name for c in TORCH_CASES])
def test_third_party_models_train_with_seeds_on_meta(case) -> None:
    """``nn.TransformerEncoder`` and a ResNet-style net (channel chunks, a tuple output), seed 0
    GRAFTING and seed 1 ACTIVE in every slot: train steps and an eval forward on ``meta``."""
    _, model, slots = build(case)
    give_kernels(case, slots, S.GRAFTING, 0)
    give_kernels(case, slots, S.ACTIVE, 1)
    for slot in slots:
        slot.update_alpha_blending(3, 10)
    model = model.to(META)
    optimizer = torch.optim.AdamW(model.parameters())
    inputs = {k: v.to(META) for k, v in case.inputs().items()}
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        case.loss(model(**inputs)).backward()
        optimizer.step()
    for slot in slots:
        for k in (0, 1):
            assert _on_meta(*(p.grad for p in slot.seed(k).seed_parameters()))
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    assert _on_meta(getattr(out, "logits", out))


def test_a_model_built_on_meta_attaches_and_materialises_with_to_empty() -> None:
    """Deferred init (build on ``meta``, attach, ``to_empty``, load the weights): the table was
    made on ``meta`` and ``to_empty`` raised copying out of it, leaving the model half on
    ``meta``; the slot's constants (``_one``, its flags, alpha) came back as garbage."""
    import kasmina

    torch.manual_seed(0)
    bare = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    (slot,) = kasmina.attach(model, ["2"], 2, 2)
    model.to_empty(device="cpu")
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    model.load_state_dict(
        {k.replace("2.", "2.host.", 1) if k.startswith("2.") else k: v
         for k, v in bare.state_dict().items()},
        strict=False,
    )  # fmt: skip
    assert slot._one.item() == 1.0 and not slot._fault_flags.any() and slot._finite_flags.all()
    assert all(seed.alpha.item() == 0.0 for seed in slot.seeds)
    _grafts_cleanly(model, bare, slot)
    # A move to meta leaves the lifecycle where it is (it would hold no data there).
    table = slot.state_table.state_tensor.clone()
    model.to("meta")
    assert slot.state_table.state_tensor.device.type == "cpu"
    model.to_empty(device="cpu")
    assert torch.equal(slot.state_table.state_tensor, table)


def test_a_model_built_on_meta_and_loaded_with_assign_gets_its_slot_constants_back() -> None:
    """Deferred init with ``load_state_dict(..., assign=True)`` in place of ``to_empty``: the
    load put the checkpoint's tensors in the host but left the slot's constants (``_one``, its
    flags, ``sat_out_compiled``, each seed's alpha and flags) on ``meta``, where no move could
    fill them. Now the slot's load post-hook rebuilds them on the host's device, alpha with the
    seed's value, and a GRAFTING seed runs."""
    import kasmina

    torch.manual_seed(0)
    bare = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    (slot,) = kasmina.attach(model, ["2"], 2, 2)
    slot.seed(1)._set_alpha(0.25)  # a value the seed holds while its buffer has none
    model.load_state_dict(
        {k.replace("2.", "2.host.", 1) if k.startswith("2.") else k: v
         for k, v in bare.state_dict().items()},
        strict=False,
        assign=True,
    )  # fmt: skip
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert slot._one.item() == 1.0 and not slot._fault_flags.any() and slot._finite_flags.all()
    assert slot.sat_out_compiled.tolist() == [0, 0]
    assert [seed.alpha.item() for seed in slot.seeds] == [0.0, 0.25]
    assert slot.seed(0).fault_flag.data_ptr() == slot._fault_flags.data_ptr()
    _grafts_cleanly(model, bare, slot)
    assert slot.seed(0).kernel.weight.grad is not None


@pytest.mark.parametrize("first", ["forward", "poll", "transition"])
def test_a_deferred_init_loaded_past_the_slot_gets_its_constants_back(first: str) -> None:
    """Each module's weights loaded into it alone (``slot.host.load_state_dict(...,
    assign=True)``, accelerate's per-module loads): the load never passed the slot, whose
    post-hook rebuilds its constants, so they stayed on ``meta``; a healthy GRAFTING seed
    faulted at every call ("Tensor on device meta") until quarantined, and ``poll_nonfinite``
    raised. The slot's next record, poll or plan change rebuilds them."""
    import kasmina

    torch.manual_seed(0)
    bare = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    (slot,) = kasmina.attach(model, ["2"], 2, 2)
    model[0].load_state_dict(bare[0].state_dict(), assign=True)
    slot.host.load_state_dict(bare[2].state_dict(), assign=True)
    assert slot._one.is_meta
    if first == "poll":
        assert slot.poll_nonfinite() == []
    elif first == "transition":
        slot.seed(1).transition_to(SeedStage.TERMINATED)
    else:
        model(torch.randn(3, 6))
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    _grafts_cleanly(model, bare, slot)


@pytest.mark.parametrize("where", ["load", "forward"])
def test_constants_rebuilt_under_inference_mode_are_trainable_tensors(where: str) -> None:
    """The rebuild ran where it was asked: a load (``assign=True``) or a first forward (a
    validation pass, a serving warm-up, after a load past the slot) under
    ``torch.inference_mode`` made every constant an inference tensor while the host's
    parameters were not; entering GRAFTING wrote alpha and then raised, and every later step
    raised. They are made outside inference mode now."""
    import kasmina

    torch.manual_seed(0)
    bare = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    (slot,) = kasmina.attach(model, ["2"], 2, 2)
    state = {k.replace("2.", "2.host.", 1) if k.startswith("2.") else k: v
             for k, v in bare.state_dict().items()}  # fmt: skip
    with torch.inference_mode():
        if where == "load":
            model.load_state_dict(state, strict=False, assign=True)
        else:
            model[0].load_state_dict(bare[0].state_dict(), assign=True)
            slot.host.load_state_dict(bare[2].state_dict(), assign=True)
        model(torch.randn(3, 6))
    assert not any(t.is_inference() for t in (*model.parameters(), *model.buffers()))
    _grafts_cleanly(model, bare, slot)
    slot.seed(0)._set_alpha(0.5)  # an in-place write, as every GRAFTING step makes
    assert slot.seed(0).alpha.item() == 0.5


def _grafts_cleanly(model: nn.Module, bare: nn.Module, slot) -> None:
    """``model`` computes what ``bare`` does, and a GRAFTING seed of ``slot`` then runs with
    its fault flag clean."""
    x = torch.randn(3, 6)
    assert torch.equal(model(x), bare(x))
    slot.seed(0).attach_kernel(nn.Linear(2, 2))
    for stage in PATH[:3]:
        slot.seed(0).transition_to(stage)
    slot.seed(0).update_alpha_blending(1, 2)
    model(x).sum().backward()
    assert not slot.seed(0).fault_flag.item() and slot.seed(0).faults == 0


def test_from_pretrained_into_a_class_that_attaches_slots_gets_its_constants_back(
    tmp_path,
) -> None:
    """transformers' ``from_pretrained`` builds the model on ``meta`` and then gives every
    non-persistent buffer an ``empty_like``: a class that attaches slots in its ``__init__``
    came back with ``_one`` and ``sat_out_compiled`` holding uninitialised memory and each
    seed's flags buffers of their own, no longer views of the slot's. Faults were recorded in
    the slot's flags while the poll read the seeds': a seed gone non-finite was never charged,
    and nothing refused the model. A manager's ``register`` (``fill_constants``) refills them
    and links the flags again; a NaN kernel is then seen."""
    transformers = pytest.importorskip("transformers")
    import kasmina
    from kasmina.seeds.inject import fill_constants
    from kasmina.stages import SeedStage

    config = transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=4, n_positions=16, vocab_size=64, attn_implementation="eager"
    )

    class Slotted(transformers.GPT2LMHeadModel):
        def __init__(self, config) -> None:
            super().__init__(config)
            kasmina.attach(self, ["mlp.c_proj"], 2, 16)

    torch.manual_seed(0)
    Slotted(config).save_pretrained(tmp_path)
    model = Slotted.from_pretrained(tmp_path)
    slot = model.transformer.h[0].mlp.c_proj
    model.to("cpu")  # a move (to the manager's device) links the flags again: still seen
    with torch.no_grad():  # what uninitialised memory may hold
        slot._one.fill_(1.0)
        slot._fault_flags.fill_(True)
        slot.sat_out_compiled.fill_(123)
    assert fill_constants(model)
    assert slot._one.item() == 1.0 and slot.sat_out_compiled.tolist() == [0, 0]
    assert not slot._fault_flags.any() and slot._finite_flags.all()
    for k, seed in enumerate(slot.seeds):
        assert seed.fault_flag.data_ptr() == slot._fault_flags[k].data_ptr()
        assert seed.alpha.item() == seed.alpha_value
    assert fill_constants(model) == []  # a healthy slot: nothing to do
    ids = torch.randint(0, 64, (2, 6))
    model.eval()
    model(ids)  # records the slot's activations
    seed = slot.seed(0)
    seed.attach_kernel(nn.Linear(16, 16))
    seed.transition_to(SeedStage.ISOLATED_INIT)
    nn.init.constant_(seed.kernel.weight, float("nan"))
    model.train()
    model(ids, labels=ids).loss.backward()
    assert slot.poll_nonfinite() == [seed.seed_id]
    assert slot.seed(1).faults == 0
