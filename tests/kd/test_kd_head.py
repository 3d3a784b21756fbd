"""The head path of the KD losses: ``StaticKDLoss`` and ``seed_kd_loss`` given hidden states and
a linear head (``fused_linear_kd_loss``) equal the same losses on the materialised logits."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from kasmina.kd.config import KDConfig
from kasmina.kd.loss import StaticKDLoss, seed_kd_loss
from kasmina.ops import kd_kl_loss, kd_kl_loss_reference
from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import SeedStage

HIDDEN, T_HIDDEN, VOCAB = 8, 6, 37


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    head = nn.Linear(HIDDEN, VOCAB)
    teacher_head = nn.Linear(T_HIDDEN, VOCAB)
    hidden = torch.randn(3, 5, HIDDEN, requires_grad=True)
    teacher_hidden = torch.randn(3, 5, T_HIDDEN)
    mask = torch.rand(3, 5) > 0.3
    return head, teacher_head, hidden, teacher_hidden, mask


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_static_kd_loss_head_path_matches_logits_path(reduction: str) -> None:
    head, teacher_head, hidden, teacher_hidden, mask = _setup()
    kd = StaticKDLoss(temperature=2.0, reduction=reduction, chunk_rows=4)
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)
    fused = kd(
        hidden, mask=mask, student_weight=head.weight, student_bias=head.bias,
        teacher_hidden=teacher_hidden, teacher_weight=teacher_head.weight,
        teacher_bias=teacher_head.bias,
    )  # fmt: skip
    given = kd(hidden, teacher_logits, mask, student_weight=head.weight, student_bias=head.bias)
    plain = kd(head(hidden), teacher_logits, mask)
    params = (hidden, head.weight, head.bias)
    go = torch.rand(plain.shape) + 0.5
    want = torch.autograd.grad(plain, params, go)
    for loss in (fused, given):
        torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
        for got, exp in zip(torch.autograd.grad(loss, params, go), want, strict=True):
            torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-6)
    assert teacher_head.weight.grad is None


def test_static_kd_loss_head_options_and_rejections() -> None:
    head, teacher_head, hidden, teacher_hidden, _ = _setup(1)
    kd = StaticKDLoss(temperature=1.5, student_softcap=4.0, teacher_logit_scale=0.5)
    assert "student_softcap=4.0" in repr(kd) and "teacher_logit_scale=0.5" in repr(kd)
    loss = kd(hidden, student_weight=head.weight, teacher_hidden=teacher_hidden,
              teacher_weight=teacher_head.weight)  # fmt: skip
    logits = 4.0 * torch.tanh(hidden @ head.weight.t() / 4.0)
    teacher = (teacher_hidden @ teacher_head.weight.t()) * 0.5
    torch.testing.assert_close(loss, kd_kl_loss(logits, teacher, 1.5), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="student_weight"):
        StaticKDLoss()(hidden, teacher_hidden=teacher_hidden)
    with pytest.raises(ValueError, match="student_weight"):
        StaticKDLoss()(hidden, None)


@pytest.mark.parametrize(
    "options",
    [
        {"chunk_rows": 0},
        {"chunk_rows": -7},
        {"chunk_rows": "abc"},
        {"chunk_rows": 2.5},
        {"student_softcap": math.nan},
        {"student_softcap": 0.0},
        {"teacher_logit_scale": -1.0},
        {"student_logit_scale": math.inf},
    ],
)
def test_static_kd_loss_checks_its_head_options_at_construction(options: dict) -> None:
    """The options were kept as given: the head path refused them only at its first forward,
    and the logits path ignored a bad ``chunk_rows`` for ever (it stayed in the repr)."""
    with pytest.raises(ValueError):
        StaticKDLoss(2.0, **options)


def test_static_kd_loss_head_path_under_autocast_casts_the_hidden_states() -> None:
    """The README's recipe (hidden states and ``lm_head.weight``) under bf16 autocast raised:
    the hidden states came out bf16, the head stayed fp32. They are cast to the head's dtype,
    as the slots' KD does, and the gradient reaches the bf16 hidden states."""
    head, teacher_head, _, teacher_hidden, _ = _setup(2)
    x = torch.randn(15, 4)
    body = nn.Linear(4, HIDDEN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = body(x)
        assert hidden.dtype == torch.bfloat16
        loss = StaticKDLoss(2.0)(
            hidden, student_weight=head.weight, teacher_hidden=teacher_hidden.reshape(15, -1),
            teacher_weight=teacher_head.weight,
        )  # fmt: skip
    teacher = teacher_hidden.reshape(15, -1) @ teacher_head.weight.t()
    want = kd_kl_loss(hidden.float() @ head.weight.t(), teacher, 2.0)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert body.weight.grad is not None and head.weight.grad is not None


def test_static_kd_loss_under_autocast_casts_the_teachers_hidden_states_too() -> None:
    """A teacher body run under the same autocast gives bf16 hidden states for its fp32 head:
    they are cast to the head's dtype, as the student's are (the head is never copied)."""
    head, teacher_head, _, _, _ = _setup(3)
    x = torch.randn(15, 4)
    body, teacher_body = nn.Linear(4, HIDDEN), nn.Linear(4, T_HIDDEN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden, teacher_hidden = body(x), teacher_body(x).detach()
        assert teacher_hidden.dtype == torch.bfloat16
        loss = StaticKDLoss(2.0)(
            hidden, student_weight=head.weight, teacher_hidden=teacher_hidden,
            teacher_weight=teacher_head.weight,
        )  # fmt: skip
    teacher = teacher_hidden.float() @ teacher_head.weight.t()
    want = kd_kl_loss(hidden.float() @ head.weight.t(), teacher, 2.0)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_static_kd_loss_refuses_head_arguments_with_logits() -> None:
    """Logits take no head: a teacher head or a head option is refused, never dropped."""
    head, teacher_head, hidden, _, _ = _setup(6)
    logits, teacher = head(hidden), torch.randn(3, 5, VOCAB)
    for extra in ({"teacher_weight": teacher_head.weight}, {"teacher_bias": teacher_head.bias}):
        with pytest.raises(ValueError, match="student_weight"):
            StaticKDLoss()(logits, teacher, **extra)
    for option in ("student_softcap", "student_logit_scale", "teacher_softcap"):
        with pytest.raises(ValueError, match=f"{option} apply to a head"):
            StaticKDLoss(**{option: 0.5})(logits, teacher)
    plain = kd_kl_loss(logits, teacher, 2.0)  # chunk_rows changes no value: it is allowed
    torch.testing.assert_close(StaticKDLoss(2.0, chunk_rows=2)(logits, teacher), plain)


def test_seed_kd_loss_with_a_head() -> None:
    head, teacher_head, hidden, teacher_hidden, _ = _setup(2)
    config = KDConfig(temperature=2.0)
    teacher = teacher_head(teacher_hidden).detach()
    fused = seed_kd_loss(config, hidden, teacher, head_weight=head.weight, head_bias=head.bias)
    plain = seed_kd_loss(config, head(hidden), teacher)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(fused, (hidden, head.weight, head.bias))
    want = torch.autograd.grad(plain, (hidden, head.weight, head.bias))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="head_weight"):
        seed_kd_loss(config, head(hidden), teacher, head_bias=head.bias)
    with pytest.raises(ValueError, match="teacher_logits shape"):
        seed_kd_loss(config, hidden, teacher[..., :-1], head_weight=head.weight)


def _kd_slot(head: nn.Linear | None = None) -> KasminaLayer:
    torch.manual_seed(7)
    layer = KasminaLayer(nn.Linear(4, HIDDEN), 2, HIDDEN // 2, kd_config=KDConfig(temperature=2.0))
    for seed in layer.seeds:
        seed.attach_kernel(nn.Sequential(nn.Linear(HIDDEN // 2, HIDDEN // 2), nn.Tanh()))
        for stage in (SeedStage.ISOLATED_INIT, SeedStage.COMPATIBILITY_CHECK, SeedStage.GRAFTING):
            seed.transition_to(stage)
    layer.update_alpha_blending(3, 10)
    if head is not None:
        layer.set_kd_head(head.weight, head.bias)
    return layer


def test_a_slot_with_a_kd_head_distils_its_seeds_through_the_head() -> None:
    """A slot over hidden states (a language model's last block) distils its seeds against
    vocabulary logits through the model's head, fused: the loss is the one on the head's
    logits of the seeds' outputs, the seeds get its gradient, and the head gets none."""
    head, _, _, _, _ = _setup(4)
    layer = _kd_slot(head)
    assert layer.kd_width == VOCAB
    x, teacher = torch.randn(5, 4), torch.randn(5, VOCAB)
    layer(x, teacher_logits=teacher)
    loss = layer.get_and_clear_kd_losses()
    chunks = layer.host(x).detach().split(HIDDEN // 2, dim=-1)
    students = torch.cat([s.kernel(c) for s, c in zip(layer.seeds, chunks, strict=True)], -1)
    want = kd_kl_loss(head(students), teacher, temperature=2.0)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    params = [p for s in layer.seeds for p in s.kernel.parameters()]
    got = torch.autograd.grad(loss, params)
    expected = torch.autograd.grad(want, params)
    for g, w in zip(got, expected, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    layer(x, teacher_logits=teacher)
    layer.get_and_clear_kd_losses().backward()
    assert head.weight.grad is None and head.bias.grad is None  # the head is not trained
    assert layer.host.weight.grad is None  # nor the host
    layer.set_kd_head(None)
    assert layer.kd_width == HIDDEN


def test_a_kd_head_that_does_not_fit_the_slot_is_refused() -> None:
    layer = _kd_slot()
    with pytest.raises(ValueError, match="H = 8"):
        layer.set_kd_head(torch.randn(VOCAB, HIDDEN + 1))
    with pytest.raises(ValueError, match="bias"):
        layer.set_kd_head(torch.randn(VOCAB, HIDDEN), torch.randn(VOCAB + 1))
    with pytest.raises(ValueError, match="needs its weight"):
        layer.set_kd_head(None, torch.randn(VOCAB))
    with pytest.raises(ValueError, match=r"\[V, H\]"):
        layer.set_kd_head(torch.randn(HIDDEN))
    weight = torch.randn(VOCAB, HIDDEN)
    for w, b, match in (
        (weight, torch.zeros(VOCAB, dtype=torch.float16), "bias needs the weight's dtype"),
        (weight, torch.zeros(VOCAB, dtype=torch.long), "bias needs the weight's dtype"),
        (weight, torch.empty(VOCAB, device="meta"), "bias needs the weight's device"),
        (weight.long(), None, "weight must be float32, float16 or bfloat16"),
        (weight.double(), None, "weight must be float32, float16 or bfloat16"),
    ):
        with pytest.raises(ValueError, match=match):
            layer.set_kd_head(w, b)
    conv = KasminaLayer(nn.Conv2d(2, HIDDEN, 1), 2, HIDDEN // 2)
    with pytest.raises(ValueError, match="last dimension"):
        conv.set_kd_head(torch.randn(VOCAB, HIDDEN))
    assert layer.kd_width == HIDDEN and conv.kd_width == HIDDEN  # nothing was set


def test_a_slot_with_a_kd_head_compiles_whole() -> None:
    """Under ``torch.compile(fullgraph=True)`` the slot's fused head loss is the eager one."""
    head = _setup(5)[0]
    layer = _kd_slot(head)
    x, teacher = torch.randn(5, 4), torch.randn(5, VOCAB)
    layer(x, teacher_logits=teacher)
    want = layer.get_and_clear_kd_losses()
    compiled = torch.compile(lambda x, t: layer(x, teacher_logits=t), fullgraph=True)
    compiled(x, teacher)
    got = layer.get_and_clear_kd_losses()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    assert all(p.grad is not None for s in layer.seeds for p in s.kernel.parameters())
    assert head.weight.grad is None


def test_a_slot_with_a_float32_kd_head_distils_under_autocast() -> None:
    """Under bf16 autocast the slot's output is bf16 and the head (master weights) float32:
    the student is cast to the head's dtype, and the seeds' gradient is the float64 one's
    within bf16 rounding."""
    head = _setup(8)[0]
    layer = _kd_slot(head)
    x, teacher = torch.randn(6, 4), torch.randn(6, VOCAB) * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x, teacher_logits=teacher)
    loss = layer.get_and_clear_kd_losses()
    assert loss is not None
    ref = copy.deepcopy(layer).double()
    chunks = ref.host(x.double()).detach().split(HIDDEN // 2, dim=-1)
    students = torch.cat([s.kernel(c) for s, c in zip(ref.seeds, chunks, strict=True)], -1)
    logits = students @ head.weight.double().t() + head.bias.double()
    want = kd_kl_loss_reference(logits, teacher.double(), 2.0, "batchmean", None)
    torch.testing.assert_close(loss.double(), want, rtol=3e-2, atol=1e-3)
    params = [p for s in layer.seeds for p in s.kernel.parameters()]
    params64 = [p for s in ref.seeds for p in s.kernel.parameters()]
    got = torch.autograd.grad(loss, params)
    expected = torch.autograd.grad(want, params64)
    for g, w in zip(got, expected, strict=True):
        assert g.dtype == torch.float32
        assert (g.double() - w).abs().max() <= 3e-2 * w.abs().max() + 1e-4
    assert head.weight.grad is None


def test_a_slots_teacher_logits_of_a_dtype_the_kernel_does_not_read() -> None:
    """Teacher logits handed to a slot directly (``KasminaLayer.set_teacher_logits``) in
    float64 or an integer dtype made the next training forward raise from inside the model;
    float64 ones teach (read in fp32), integer ones are refused when they are handed over."""
    layer, x = _kd_slot(), torch.randn(5, 4)
    teacher = torch.randn(5, HIDDEN)
    layer(x, teacher_logits=teacher)
    want = layer.get_and_clear_kd_losses()
    layer(x, teacher_logits=teacher.double())
    torch.testing.assert_close(layer.get_and_clear_kd_losses(), want)
    with pytest.raises(ValueError, match="floating-point"):
        layer.set_teacher_logits(teacher.round().long())
    # A row finite in float64 only (1e39 overflows fp32) teaches nothing, as an inf row.
    wide = teacher.double()
    wide[0, 0] = 1e39
    layer(x, teacher_logits=wide)
    got = layer.get_and_clear_kd_losses()
    bad = teacher.clone()
    bad[0, 0] = math.inf
    layer(x, teacher_logits=bad)
    assert torch.isfinite(got) and torch.equal(got, layer.get_and_clear_kd_losses())
    # Through a KD head (vocabulary logits), a float64 teacher is read in fp32 too.
    head, _, _, _, _ = _setup(4)
    headed = _kd_slot(head)
    vocab = torch.randn(5, VOCAB)
    headed(x, teacher_logits=vocab)
    want = headed.get_and_clear_kd_losses()
    headed(x, teacher_logits=vocab.double())
    torch.testing.assert_close(headed.get_and_clear_kd_losses(), want)


def test_a_float64_slot_distils_in_float64() -> None:
    """A slot of an fp64 model (a gradient check of a grown model) raised at every forward
    that distilled: the op reads fp32, fp16 and bf16 only. Its KD is the float64 reference,
    whose gradient autograd checks."""
    layer = _kd_slot().double()
    x, teacher = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, HIDDEN)
    params = [p for s in layer.seeds for p in s.kernel.parameters()]
    layer(x, teacher_logits=teacher)
    loss = layer.get_and_clear_kd_losses()
    assert loss.dtype == torch.float64
    chunks = layer.host(x).detach().split(HIDDEN // 2, dim=-1)
    students = torch.cat([s.kernel(c) for s, c in zip(layer.seeds, chunks, strict=True)], -1)
    want = kd_kl_loss_reference(students, teacher.double(), temperature=2.0)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    got = torch.autograd.grad(loss, params)
    expected = torch.autograd.grad(want, params)
    for g, w in zip(got, expected, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("order", ["misfit first", "fit first"])
def test_pending_teacher_logits_go_to_the_call_of_the_forward_they_fit(order: str) -> None:
    """A module called twice in one forward, with two shapes: pending teacher logits went to
    the first call that recorded a graph, which sat out when they did not fit it, and the call
    they fit never distilled. The call they do not fit leaves them to the one they fit."""
    layer = _kd_slot()
    x_small, x = torch.randn(3, 4), torch.randn(5, 4)
    teacher = torch.randn(5, HIDDEN)
    layer(x, teacher_logits=teacher)
    want = layer.get_and_clear_kd_losses()
    layer.end_step()
    layer.set_teacher_logits(teacher)
    for inputs in (x_small, x) if order == "misfit first" else (x, x_small):
        layer(inputs)
    got = layer.get_and_clear_kd_losses()
    assert got is not None and torch.equal(got, want)
    assert layer.sat_out["kd"] == (1 if order == "misfit first" else 0)
    layer.end_step()
    layer.set_teacher_logits(teacher)
    layer(x_small)  # fits no call of this forward: left pending, dropped at the step's end
    assert layer.get_and_clear_kd_losses() is None
    layer.end_step()
    layer(x)  # the next step's forward does not take the last step's logits
    assert layer.get_and_clear_kd_losses() is None


def test_a_stand_alone_seed_keeps_no_kd_loss_from_a_forward_without_grad() -> None:
    """Under ``no_grad`` a stand-alone seed computed and kept a KD loss per call (the slot
    keeps none): they piled up, and a collected sum of them could not be backpropagated."""
    seed = _kd_slot().seeds[0]
    x, teacher = torch.randn(5, HIDDEN // 2), torch.randn(5, HIDDEN // 2)
    with torch.no_grad():
        for _ in range(3):
            seed(x, teacher)
    assert seed.get_and_clear_kd_losses() is None
    seed(x, teacher)
    loss = seed.get_and_clear_kd_losses()
    assert loss is not None and loss.requires_grad


def test_a_stand_alone_seed_refuses_teacher_logits_that_are_not_dense_floats() -> None:
    """``seed(x, teacher)`` reached the KD op with sparse, nested or complex logits and
    raised its internal errors (``amax`` on SparseCPU, "NestedTensorImpl doesn't support
    sizes"); it refuses them with a ``ValueError`` naming what they are, as it does integers."""
    seed = _kd_slot().seeds[0]
    x, teacher = torch.randn(5, HIDDEN // 2), torch.randn(5, HIDDEN // 2)
    for bad, what in (
        (teacher.to_sparse(), "sparse_coo"),
        (teacher.to_sparse_csr(), "sparse_csr"),
        (teacher.to(torch.complex64), "complex64"),
        (teacher.to(torch.float8_e5m2), "float8_e5m2"),
        (torch.nested.nested_tensor([teacher[0], teacher[1]]), "nested"),
    ):
        with pytest.raises(ValueError, match=f"dense floating-point tensor, got .*{what}"):
            seed(x, bad)
    assert seed.get_and_clear_kd_losses() is None


def test_pending_teacher_logits_reach_a_slot_whose_output_is_a_nested_tensor() -> None:
    """The fit check read a nested output's ``shape``, which a strided nested tensor has not:
    the host's forward raised whenever teacher logits were pending. A nested output is padded
    before its KD, whose own check then judges the fit."""

    class Ragged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, HIDDEN)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.lin(x)
            return torch.nested.as_nested_tensor([y[0], y[1, :2]])

    torch.manual_seed(0)
    layer = KasminaLayer(Ragged(), 2, HIDDEN // 2, kd_config=KDConfig(temperature=2.0))
    for seed in layer.seeds:
        seed.attach_kernel(nn.Sequential(nn.Linear(HIDDEN // 2, HIDDEN // 2), nn.Tanh()))
        seed.transition_to(SeedStage.ISOLATED_INIT)
    x = torch.randn(2, 3, 4)
    layer(x)
    layer.set_teacher_logits(torch.randn(2, 3, HIDDEN))
    assert layer(x).is_nested
    loss = layer.get_and_clear_kd_losses()
    assert loss is not None and loss.requires_grad
