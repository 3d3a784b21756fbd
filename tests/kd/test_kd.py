"""Knowledge distillation: frozen reduced-precision teacher, OOM-safe timed forwards, KD loss."""

from __future__ import annotations

import copy
import gc
import logging
import math
import threading
import types
import weakref

import pytest
import torch
from torch import nn

import kasmina.kd.holds as holds_module
import kasmina.kd.teacher as kd_module
from kasmina.kd.activation_peak import hooked_activation_peak
from kasmina.kd.config import KDConfig
from kasmina.kd.graph import is_kd_root, sum_kd_losses
from kasmina.kd.holds import is_teacher_parameter
from kasmina.kd.loss import StaticKDLoss
from kasmina.kd.teacher import CheckpointedTeacher, TeacherForwardPassManager, is_oom_error

IN, CLASSES = 16, 10
# Stated tolerance of bf16/fp16 teacher logits against the fp32 teacher's, relative to the largest
# |logit|: bf16 keeps 8 significant bits (2^-8 ≈ 0.4% per rounding), fp16 11; measured here about
# 0.5% and 0.06%, so the bounds leave a 3x margin.
LOGIT_TOLERANCE = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def make_mlp(hidden: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, hidden), nn.GELU(), nn.Linear(hidden, CLASSES))


class SeedLikeStudent(nn.Module):
    """A seed-shaped student: frozen host features plus a small trainable residual adapter."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.host = nn.Linear(IN, hidden)
        self.host.requires_grad_(False)
        self.seed = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.host(x))
        return self.head(h + self.seed(h))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bit_identical(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


def inputs(rows: int = 64, seed: int = 2) -> torch.Tensor:
    return torch.randn(rows, IN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_student_trained_only_with_kd_moves_toward_teacher(dtype: torch.dtype) -> None:
    original = make_mlp()
    original_before = snapshot(original)
    teacher = CheckpointedTeacher(original, dtype=dtype)
    teacher_before = snapshot(teacher.teacher)
    manager = TeacherForwardPassManager(teacher, budget_ms=1e9)
    student = SeedLikeStudent()
    kd = StaticKDLoss.from_config(KDConfig(temperature=2.0))
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    x = inputs()

    def agreement() -> float:
        with torch.no_grad():
            teacher_top = manager.get_teacher_predictions(x).argmax(-1)
            return (student(x).argmax(-1) == teacher_top).float().mean().item()

    agreement_before = agreement()
    losses = []
    for _ in range(40):
        teacher_logits = manager.get_teacher_predictions(x)
        assert teacher_logits is not None and not teacher_logits.requires_grad
        loss = kd(student(x), teacher_logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    # The student now picks the teacher's top class far more often.
    assert agreement() > agreement_before + 0.2, (agreement_before, losses)
    for param in teacher.teacher_parameters():
        assert param.grad is None and not param.requires_grad
    assert_bit_identical(teacher.teacher, teacher_before)
    assert_bit_identical(original, original_before)
    assert all(p.requires_grad for p in original.parameters())  # the caller's copy is untouched


def test_teacher_is_frozen_eval_and_registered_teacher_only() -> None:
    model = make_mlp().train()
    teacher = CheckpointedTeacher(model, dtype=torch.bfloat16)
    assert teacher.teacher is not model and model.training
    assert not teacher.teacher.training
    params = teacher.teacher_parameters()
    assert params and all(not p.requires_grad and p.dtype == torch.bfloat16 for p in params)
    assert all(is_teacher_parameter(p) for p in params)
    assert not any(is_teacher_parameter(p) for p in model.parameters())
    assert not is_teacher_parameter(nn.Parameter(params[0].detach().clone()))

    owned = CheckpointedTeacher(model, dtype=None, copy_model=False)
    assert owned.teacher is model and not model.training and owned.dtype == torch.float32
    assert all(is_teacher_parameter(p) and not p.requires_grad for p in model.parameters())

    # Switching the held teacher to train mode is undone on the next forward.
    teacher.teacher.train()
    teacher(inputs(4))
    assert not teacher.teacher.training

    # The registry holds no reference: a dropped teacher's parameters leave it.
    gc.collect()  # teachers dropped by earlier tests leave first, so only ours is counted
    registered = len(holds_module._TEACHER_PARAMS)
    ids = [id(p) for p in params]
    del teacher, params
    gc.collect()
    assert len(holds_module._TEACHER_PARAMS) == registered - len(ids)
    assert not any(i in holds_module._TEACHER_PARAMS for i in ids)


def test_a_teacher_switched_to_train_each_step_warns_rarely(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A loop switching the teacher to train each step (``model.train()`` over a model that
    holds it) put a warning in the log at every teacher forward: the first and every
    ``TRAIN_MODE_WARNING_EVERY``-th warn."""
    teacher = CheckpointedTeacher(nn.Sequential(nn.Linear(IN, IN), nn.Dropout(0.5)), dtype=None)
    every = CheckpointedTeacher.TRAIN_MODE_WARNING_EVERY
    with caplog.at_level(logging.WARNING, logger="kasmina.kd.teacher"):
        for _ in range(every):
            teacher.teacher.train()
            x = inputs(2)
            got = teacher(x)
            assert not teacher.teacher.training  # put back in eval, as the warning says
            with torch.no_grad():
                assert torch.equal(got, teacher.teacher(x))  # no dropout drawn
    warned = [r for r in caplog.records if "returning it to eval mode" in r.getMessage()]
    assert len(warned) == 2 and teacher.train_mode_count == every


def test_a_model_one_teacher_holds_in_place_is_refused_to_another_until_let_go() -> None:
    """Two teachers of one model in place each cast it under its own lock: the second's dtype
    recast the first's live teacher (its next forward raised a dtype mismatch), and either's fp32
    measurement met the other's forwards. And a parameter stayed teacher-only as long as it
    lived, after its teacher closed or was collected: no optimizer could ever take it again."""
    model = make_mlp()
    first = CheckpointedTeacher(model, dtype=torch.bfloat16, copy_model=False)
    want = first(inputs(4))
    for taken in (model, model[2]):  # the model, or any module of it
        with pytest.raises(ValueError, match="held in place by another live teacher"):
            CheckpointedTeacher(taken, dtype=torch.float16, copy_model=False)
    with pytest.raises(ValueError, match="held in place"):
        copy.copy(first)  # a shallow copy would be a second teacher of the model
    assert all(p.dtype == torch.bfloat16 and is_teacher_parameter(p) for p in model.parameters())
    twin = CheckpointedTeacher(model, dtype=torch.float16)  # a copy of its own is fine
    assert torch.equal(first(inputs(4)), want) and twin.teacher is not model

    first.close()
    first.close()  # idempotent
    assert not any(is_teacher_parameter(p) for p in model.parameters())
    assert all(is_teacher_parameter(p) for p in twin.teacher_parameters())
    second = CheckpointedTeacher(model, dtype=torch.float32, copy_model=False)
    assert all(is_teacher_parameter(p) for p in model.parameters())
    del second
    gc.collect()  # a teacher dropped without close() lets go when collected
    assert not any(is_teacher_parameter(p) for p in model.parameters())
    CheckpointedTeacher(model, dtype=None, copy_model=False)  # so it is taken again


def _over(model: nn.Module, how: str) -> nn.Module:
    """Another model over ``model``'s first weight: the same parameter, a new parameter object
    over its bytes, or over a part of them."""
    other = make_mlp(seed=1)
    weight = model[0].weight
    if how == "same parameter":
        other[0].weight = weight
    elif how == "same bytes":
        other[0].weight = nn.Parameter(weight.data)
    else:  # a strided view of a part of them
        other[2].weight = nn.Parameter(weight.data.t()[:CLASSES])
    return other


@pytest.mark.parametrize("how", ["same parameter", "same bytes", "a view of its bytes"])
@pytest.mark.parametrize("let_go", ["close", "collected"])
def test_a_model_over_an_in_place_teachers_memory_is_refused_in_place(
    how: str, let_go: str
) -> None:
    """Held by parameter object only, a second in-place teacher over the first's bytes (another
    model holding ``nn.Parameter(w.data)`` or a view of it) was taken: its cast and its
    checkpoint load wrote the memory the first one reads, so one teacher silently changed the
    other's weights. Refused by memory, naming the first, nothing changed; taken once the first
    is closed or collected (the refusal, kept, does not keep it alive)."""
    model = make_mlp()
    first = CheckpointedTeacher(model, dtype=torch.float32, copy_model=False)
    want = first(inputs(4))
    other = _over(model, how)
    with pytest.raises(ValueError, match="held in place by another live teacher") as refused:
        CheckpointedTeacher(other, dtype=torch.bfloat16, copy_model=False)
    assert repr(first) in str(refused.value) and "CheckpointedTeacher of Sequential" in repr(first)
    assert all(p.dtype == torch.float32 for p in other.parameters())
    assert not any(is_teacher_parameter(p) for p in other.parameters() if p is not model[0].weight)
    assert torch.equal(first(inputs(4)), want)
    if let_go == "close":
        first.close()
    else:
        del first
        gc.collect()
    second = CheckpointedTeacher(other, dtype=torch.bfloat16, copy_model=False)
    assert all(map(is_teacher_parameter, second.teacher_parameters()))


def test_memory_held_by_a_teachers_copy_is_refused_in_place_and_disjoint_bytes_are_not() -> None:
    """A copy teacher's memory is its own: another model over it taken in place would be cast
    under it. Disjoint slices of one buffer share no byte, and two in-place teachers of them are
    both taken."""
    copied = CheckpointedTeacher(make_mlp(), dtype=torch.float32)
    over = make_mlp(seed=1)
    over[2].bias = nn.Parameter(copied.teacher[2].bias.data)
    with pytest.raises(ValueError, match="held in place by another live teacher"):
        CheckpointedTeacher(over, dtype=torch.bfloat16, copy_model=False)
    flat = torch.zeros(2 * CLASSES)
    halves = [nn.Linear(IN, CLASSES) for _ in range(2)]
    for i, half in enumerate(halves):
        half.bias = nn.Parameter(flat[i * CLASSES : (i + 1) * CLASSES])
    teachers = [CheckpointedTeacher(half, dtype=None, copy_model=False) for half in halves]
    assert all(t.teacher is half for t, half in zip(teachers, halves, strict=True))


def test_a_closed_teacher_runs_no_forward_on_the_model_it_let_go() -> None:
    """A closed teacher still ran forwards on the model it had let go: one held in place, the
    caller's again and set to train mode, was put back into eval mode, and once another
    teacher took it in place at another dtype the old one's forward raised a bare dtype
    mismatch (its inputs cast to the dtype it was built with). Its forwards and measurements
    refuse, naming the closed teacher, and leave the model as it is."""
    model = make_mlp()
    first = CheckpointedTeacher(model, dtype=torch.bfloat16, copy_model=False)
    first(inputs(4))
    first.close()
    assert first.closed
    model.train()  # the caller's again
    calls = {
        "forward": lambda: first(inputs(4)),
        "measure": lambda: first.measure_forward_peak_bytes(inputs(4)),
        "timed forward": lambda: TeacherForwardPassManager(first).get_teacher_predictions(
            inputs(4)
        ),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="this teacher is closed"):
            call()
        assert model.training, name
    second = CheckpointedTeacher(model, dtype=torch.float16, copy_model=False)
    with pytest.raises(RuntimeError, match="this teacher is closed"):
        first(inputs(4))
    assert second(inputs(4)).shape == (4, CLASSES) and not second.closed


@pytest.mark.parametrize("wrong", ["x", 3.0, None, [1.0], "tuple"])
def test_sum_kd_losses_refuses_anything_but_a_list_of_tensors_by_name(wrong: object) -> None:
    """``sum_kd_losses('x')`` raised "'str' object has no attribute 'grad_fn'", a list of
    numbers the same, and a tuple of losses raised on its missing ``clear`` once each loss had
    been marked as collected. Each is a ``TypeError`` naming ``losses``, nothing marked."""
    loss = (torch.randn(3, requires_grad=True) * 2).sum()
    given = (loss,) if wrong == "tuple" else wrong
    with pytest.raises(TypeError, match="^losses must be a list of KD loss tensors, got"):
        sum_kd_losses(given)  # type: ignore[arg-type]
    assert not is_kd_root(loss.grad_fn)
    assert sum_kd_losses([loss]) is not None and is_kd_root(loss.grad_fn)


def test_teacher_logits_are_ordinary_tensors_in_the_requested_dtype() -> None:
    teacher = CheckpointedTeacher(make_mlp(), dtype=torch.bfloat16)
    logits = teacher(inputs(8))
    assert logits.dtype == torch.float32 and not logits.is_inference()
    assert not logits.requires_grad
    # Any loss may save them for backward (inference tensors would raise here).
    student = torch.randn(8, CLASSES, requires_grad=True)
    (student * logits).sum().backward()
    assert torch.equal(student.grad, logits)

    native = CheckpointedTeacher(make_mlp(), dtype=torch.bfloat16, output_dtype=None)
    out = native(inputs(8))
    assert out.dtype == torch.bfloat16 and not out.is_inference()
    same = CheckpointedTeacher(make_mlp(), dtype=torch.float32)
    assert not same(inputs(8)).is_inference()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_halves_parameter_bytes_and_keeps_logits_close(
    dtype: torch.dtype,
) -> None:
    full = CheckpointedTeacher(make_mlp(hidden=64), dtype=torch.float32)
    reduced = CheckpointedTeacher(make_mlp(hidden=64), dtype=dtype)
    numel = sum(p.numel() for p in full.teacher_parameters())
    assert full.parameter_bytes() == 4 * numel == reduced.full_precision_parameter_bytes
    assert reduced.parameter_bytes() * 2 == full.parameter_bytes()

    x = inputs(128)
    ref, low = full(x), reduced(x)
    scale = ref.abs().max().item()
    assert (low - ref).abs().max().item() <= LOGIT_TOLERANCE[dtype] * scale
    # What KD sees: the softened teacher distributions barely move.
    kl = torch.nn.functional.kl_div(
        low.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    assert kl.item() < 1e-3


def test_integer_inputs_keep_their_dtype() -> None:
    torch.manual_seed(0)
    lm = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 50))
    teacher = CheckpointedTeacher(lm, dtype=torch.bfloat16)
    ids = torch.randint(0, 50, (2, 7))
    assert teacher(ids).shape == (2, 7, 50)


class _AdditiveMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.out = nn.Linear(IN, IN), nn.Linear(IN, CLASSES)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.q(x)
        return self.out((h @ h.transpose(-1, -2) + bias).softmax(-1) @ h)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_float_input_past_the_teachers_range_saturates(dtype: torch.dtype) -> None:
    """An fp32 additive attention mask at fp32's min (a student's mask, given to the teacher as
    its keyword input) overflowed to -inf in a bf16 or fp16 teacher: a row it masks whole was
    NaN where the fp32 teacher's is finite. Finite inputs saturate; infinities stay."""
    torch.manual_seed(0)
    model = _AdditiveMask()
    x, bias = torch.randn(2, 4, IN), torch.zeros(2, 4, 4)
    bias[0, 0, :] = torch.finfo(torch.float32).min  # a query that sees no key
    batch = {"x": x, "bias": bias}
    want = CheckpointedTeacher(model, dtype=torch.float32)(batch)
    got = CheckpointedTeacher(model, dtype=dtype)(batch)
    assert got.isfinite().all()
    tolerance = LOGIT_TOLERANCE[dtype] * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=tolerance)
    bias[0, 0, :] = -math.inf  # a -inf mask is the teacher's own NaN at any precision
    assert CheckpointedTeacher(model, dtype=dtype)(batch)[0, 0].isnan().all()


class _NegativeScores(nn.Module):
    """Attention over 4 keys whose scores are all about -40 (a bias): below -16, fp16's
    headroom under its minimum."""

    def __init__(self) -> None:
        super().__init__()
        self.score, self.v, self.out = nn.Linear(IN, 4), nn.Linear(IN, IN), nn.Linear(IN, CLASSES)
        with torch.no_grad():
            self.score.bias.fill_(-40.0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.out((self.score(x) + bias).softmax(-1) @ self.v(x))


@pytest.mark.parametrize("masked", [torch.finfo(torch.float32).min, torch.finfo(torch.float16).min])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_mask_past_the_teachers_range_leaves_headroom_for_the_scores(
    dtype: torch.dtype, masked: float
) -> None:
    """Saturated at fp16's minimum (-65504), an fp32 mask plus a score below -16 overflowed to
    -inf again, and a row it masks whole was NaN (bf16 had the headroom). Saturated at half the
    range, the row is finite and close to the fp32 teacher's (an even attention), and a row
    masked in part is exactly what a ``-inf`` mask gives (its masked keys weigh 0 either way).
    An fp32 mask at fp16's own minimum (what a mask made for an fp16 model holds) is not past
    fp16's range: it was left at -65504 and overflowed all the same."""
    torch.manual_seed(0)
    model = _NegativeScores()
    x, bias = torch.randn(2, 4, IN), torch.zeros(2, 4, 4)
    bias[0, 0, :] = masked  # a query that sees no key
    bias[1, :, 2:] = masked  # queries that see two keys
    teacher = CheckpointedTeacher(model, dtype=dtype)
    want = CheckpointedTeacher(model, dtype=torch.float32)({"x": x, "bias": bias})
    got = teacher({"x": x, "bias": bias})
    assert got.isfinite().all()
    if masked < torch.finfo(torch.float16).min:  # fp32 loses the scores under it too (even)
        # (at -65504 fp32 keeps them where a 16-bit teacher's spacing there cannot)
        tolerance = LOGIT_TOLERANCE[dtype] * float(want.abs().max())
        torch.testing.assert_close(got[0, 0], want[0, 0], rtol=0, atol=tolerance)
    ruled_out = bias.masked_fill(bias < 0, -math.inf)
    torch.testing.assert_close(got[1], teacher({"x": x, "bias": ruled_out})[1], rtol=0, atol=0)


def test_a_wider_float_input_keeps_its_order_in_the_teacher() -> None:
    """Every finite value of an input wider than the teacher's dtype is clamped to half its
    range: only values past the range moved, so -65505 came out at -32752, above -40000 and
    -65504 that stayed (their order flipped). Infinities and NaN pass as they are."""
    teacher = CheckpointedTeacher(nn.Identity(), dtype=torch.float16)
    finite = [-1e30, -70000.0, -65505.0, -65504.0, -40000.0, -32752.0, -1.5, 0.0, 40000.0, 1e30]
    x = torch.tensor([finite + [math.inf, -math.inf, math.nan]])
    got = teacher(x)[0]
    assert got.dtype == torch.float32
    assert (got[:10].diff() >= 0).all(), got  # never an inversion; ties where clamped
    assert got[:6].eq(-32752.0).all() and got[8:10].eq(32752.0).all()
    assert got[6:8].tolist() == [-1.5, 0.0]
    assert got[10] == math.inf and got[11] == -math.inf and got[12].isnan()


def test_a_batch_of_keyword_inputs_reaches_the_teacher_with_its_attention_mask() -> None:
    """A Hugging Face batch (``input_ids`` and ``attention_mask``) was refused (a tensor
    only), and ``input_ids`` alone gave a left-padded row's real positions logits computed
    over its padding. A mapping is passed as keyword inputs, each tensor on the teacher's
    device: the logits are the model's own with its mask."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=37, n_positions=16)
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [4, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    teacher = CheckpointedTeacher(lm, dtype=torch.float32)
    got = teacher({"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        want = lm(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real])
    assert (teacher(ids)[real] - want[real]).abs().max() > 1e-3  # the mask matters here
    with pytest.raises(TypeError, match="a tensor or a mapping"):
        teacher([ids])


def test_checkpoint_path_loads_state_dict(tmp_path) -> None:
    trained = make_mlp(seed=5)
    path = tmp_path / "teacher.pt"
    torch.save(trained.state_dict(), path)
    teacher = CheckpointedTeacher(make_mlp(seed=0), dtype=torch.float32, checkpoint_path=path)
    x = inputs(8)
    with torch.no_grad():
        assert torch.equal(teacher(x), trained(x))
    torch.save([1, 2], tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="state_dict"):
        CheckpointedTeacher(make_mlp(), checkpoint_path=tmp_path / "bad.pt")


def test_a_checkpoint_that_does_not_fit_the_teacher_changes_nothing(tmp_path) -> None:
    """With ``copy_model=False`` the teacher is the caller's own model, and ``load_state_dict``
    copied every tensor that matched before it raised for the rest: a checkpoint of another
    architecture left the caller's model half overwritten. Keys and shapes are checked first;
    an unreadable file is named."""
    model = make_mlp(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "other.pt"
    torch.save(make_mlp(hidden=48, seed=2).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit the teacher model, nothing loaded"):
        CheckpointedTeacher(model, copy_model=False, checkpoint_path=path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    cut = tmp_path / "cut.pt"
    cut.write_bytes((tmp_path / "other.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match=f"teacher checkpoint {cut} cannot be read"):
        CheckpointedTeacher(model, copy_model=False, checkpoint_path=cut)
    with pytest.raises(FileNotFoundError):
        CheckpointedTeacher(model, checkpoint_path=tmp_path / "absent.pt")
    state = make_mlp(seed=2).state_dict()
    state["2.bias"] = 2.0  # not a tensor: torch refuses it after copying the others
    torch.save(state, path)
    with pytest.raises(ValueError, match="nothing loaded"):
        CheckpointedTeacher(model, copy_model=False, checkpoint_path=path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    class Counted(nn.GELU):  # extra state that is no tensor, as plain load_state_dict takes
        def get_extra_state(self) -> dict:
            return {"step": 3}

        def set_extra_state(self, state: dict) -> None:
            self.step = state["step"]

    torch.manual_seed(4)
    counted = nn.Sequential(nn.Linear(IN, 32), Counted(), nn.Linear(32, CLASSES))
    torch.save(counted.state_dict(), path)
    counted[1].step = 0
    teacher = CheckpointedTeacher(counted, copy_model=False, checkpoint_path=path)
    assert counted[1].step == 3 and teacher.teacher is counted


def test_a_teacher_checkpoint_that_is_a_fifo_or_a_directory_is_refused_at_once(
    tmp_path, fifo
) -> None:
    """``torch.load`` of a FIFO blocked the trainer for ever (it waits for a writer); every
    other file Kasmina reads is opened as a regular file first, and now this one too."""
    for path in (fifo, tmp_path):
        with pytest.raises(ValueError, match="cannot be read"):
            CheckpointedTeacher(make_mlp(seed=1), checkpoint_path=path)


def test_a_teacher_and_its_forward_manager_copy_and_pickle() -> None:
    import pickle

    manager = TeacherForwardPassManager(CheckpointedTeacher(make_mlp(), dtype=torch.bfloat16))
    x = inputs(4)
    want = manager.get_teacher_predictions(x)
    for twin in (copy.deepcopy(manager), pickle.loads(pickle.dumps(manager))):
        assert torch.equal(twin.get_teacher_predictions(x), want)
        # The copy's parameters are teacher-only as the original's are: no optimizer takes them.
        params = twin.checkpointed_teacher.teacher_parameters()
        assert params and all(is_teacher_parameter(p) for p in params)


def test_a_forward_waits_for_a_measurement_that_casts_the_teacher(monkeypatch) -> None:
    """The first forward's memory profile casts the shared teacher to float32 in place and
    back, with no lock: a forward on another thread (``load_kernel_with_teacher`` runs one on a
    worker) met a half-cast teacher and raised, or left it in mixed dtypes for good."""
    import threading

    teacher = CheckpointedTeacher(make_mlp(seed=3), dtype=torch.bfloat16)
    x = inputs(4)
    want = teacher(x)
    inside, go_on = threading.Event(), threading.Event()
    hooked = kd_module.hooked_activation_peak

    def paused(model: nn.Module, run) -> int:  # the fp32 measurement, teacher cast
        inside.set()
        go_on.wait(10)
        return hooked(model, run)

    monkeypatch.setattr(kd_module, "hooked_activation_peak", paused)
    measuring = threading.Thread(
        target=lambda: teacher.measure_forward_peak_bytes(x, torch.float32)
    )
    measuring.start()
    assert inside.wait(10)
    got: list[torch.Tensor] = []
    forward = threading.Thread(target=lambda: got.append(teacher(x)))
    forward.start()
    forward.join(0.3)
    assert forward.is_alive()  # waits for the measurement to cast the teacher back
    go_on.set()
    measuring.join(10)
    forward.join(10)
    assert torch.equal(got[0], want)
    assert {p.dtype for p in teacher.teacher.parameters()} == {torch.bfloat16}


class _NoisyTeacher(nn.Module):
    """A teacher that draws in eval mode (noise injection), its forward calls counted by a hook."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x + torch.randn_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_memory_profile_moves_no_rng_and_runs_no_hook_of_the_teacher(dtype) -> None:
    """The first forward's profile ran two more teacher forwards on the caller's RNG: a teacher
    drawing in eval mode moved the run's later draws (data order, dropout) from those of the
    same run without it, and a feature-collecting hook on the teacher saw three forwards."""
    calls: list[int] = []
    teachers = [CheckpointedTeacher(_NoisyTeacher(), dtype=dtype) for _ in range(2)]
    teachers[0].teacher.fc.register_forward_hook(lambda *_: calls.append(1))
    profiled = TeacherForwardPassManager(teachers[0])
    plain = TeacherForwardPassManager(teachers[1], profile_memory=False)
    x = torch.randn(3, 8)
    draws = []
    for manager in (profiled, plain):
        torch.manual_seed(7)
        manager.get_teacher_predictions(x)
        draws.append(torch.rand(4))
    assert profiled.get_checkpoint_effectiveness()["peak_forward_bytes_reduced"] > 0
    assert torch.equal(draws[0], draws[1])
    assert len(calls) == 1


def test_one_thread_profiles_the_teachers_memory() -> None:
    manager = TeacherForwardPassManager(CheckpointedTeacher(make_mlp(), dtype=torch.bfloat16))
    assert manager._profiling.acquire(blocking=False)  # another thread's profile under way
    try:
        assert manager.get_teacher_predictions(inputs(4)) is not None  # goes on, no profile
        assert manager._memory is None
    finally:
        manager._profiling.release()
    manager.get_teacher_predictions(inputs(4))
    assert manager._memory is not None


class _TimedEvent:
    """A CUDA timing event's stand-in: done once ``synchronize`` ran or ``done`` is set, its
    ``synchronize`` in the thread named ``waits_in`` paused at ``gate`` (a GPU still busy)."""

    def __init__(self, ms: float, done: bool, gate: threading.Event | None = None) -> None:
        self.ms, self.done, self.gate, self.waiting = ms, done, gate, threading.Event()

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        if self.gate is not None and threading.current_thread().name == "reader":
            self.waiting.set()
            assert self.gate.wait(timeout=10)
        self.done = True

    def elapsed_time(self, end: _TimedEvent) -> float:
        if not end.done:
            raise RuntimeError("CUDA error: device not ready")
        return end.ms


def test_forward_times_read_from_two_threads_are_each_taken_once() -> None:
    """A thread reading the figures (``get_checkpoint_effectiveness``, which waits for the
    device) beside the training thread's next forward, which reads the times already there:
    both took the oldest timing, the second then dropped the next one, counted the first twice
    or raised (``IndexError`` from an empty queue, or a not-ready event) out of the step. One
    thread reads them at a time; the training thread never waits on the device for it."""
    manager = TeacherForwardPassManager(None, budget_ms=1e9)
    gate = threading.Event()
    first = _TimedEvent(1.0, done=True, gate=gate)
    second = _TimedEvent(7.0, done=False)
    manager._pending.extend([(first, first), (second, second)])  # type: ignore[arg-type]
    errors: list[BaseException] = []

    def read() -> None:
        try:
            manager.get_checkpoint_effectiveness()
        except BaseException as exc:  # the assertion reads it on the test's thread
            errors.append(exc)

    reader = threading.Thread(target=read, name="reader")
    reader.start()
    assert first.waiting.wait(timeout=10)  # the reader waits on the oldest forward's end
    try:
        manager._drain(block=False)  # the training thread's next forward
    finally:
        gate.set()
        reader.join(timeout=10)
    assert not errors and not reader.is_alive()
    figures = manager.get_checkpoint_effectiveness()
    assert figures["forwards"] == 2.0 and figures["forward_ms_max"] == 7.0
    assert figures["forward_ms_mean"] == 4.0


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA out of memory"),
    ],
    ids=["OutOfMemoryError", "RuntimeError"],
)
def test_simulated_oom_skips_kd_and_the_step_completes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    teacher = CheckpointedTeacher(make_mlp(), dtype=torch.bfloat16)
    manager = TeacherForwardPassManager(teacher, budget_ms=1e9)
    student = SeedLikeStudent()
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
    kd, ce = StaticKDLoss(temperature=2.0), nn.CrossEntropyLoss()
    x, y = inputs(16), torch.arange(16) % CLASSES

    def train_step() -> bool:
        teacher_logits = manager.get_teacher_predictions(x)
        logits = student(x)
        loss = ce(logits, y)
        if teacher_logits is not None:
            loss = loss + kd(logits, teacher_logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return teacher_logits is not None

    def out_of_memory(*args: object) -> torch.Tensor:
        raise error

    before = snapshot(student.seed)
    monkeypatch.setattr(teacher.teacher, "forward", out_of_memory)
    with caplog.at_level(logging.ERROR, logger="kasmina.kd.teacher"):
        assert train_step() is False
    assert manager.oom_count == 1 and "out of memory" in caplog.text
    changed = [not torch.equal(student.seed.state_dict()[k], v) for k, v in before.items()]
    assert any(changed)  # the optimizer step still ran on the task loss

    monkeypatch.undo()
    assert train_step() is True
    stats = manager.get_checkpoint_effectiveness()
    assert stats["ooms"] == 1.0 and stats["forwards"] == 1.0


@pytest.mark.parametrize("chained", [False, True], ids=["plain", "chained"])
def test_an_oom_frees_the_failed_forwards_activations_at_once(chained: bool) -> None:
    """Nothing of the failed forward outlives the call (the CUDA cache is emptied right after):
    no reference cycle through the exception's traceback, or a chained one's, keeps its frames
    for the collector."""
    alive: list[weakref.ref] = []

    def inner(h: torch.Tensor) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    class Exhausted(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.repeat(1, 1000)
            alive.append(weakref.ref(h))
            if not chained:
                inner(h)
            try:
                inner(h)
            except torch.cuda.OutOfMemoryError as exc:
                raise RuntimeError("CUDA out of memory in the teacher's block 3") from exc

    manager = TeacherForwardPassManager(CheckpointedTeacher(Exhausted(), dtype=torch.float32))
    gc.collect()
    gc.disable()
    try:
        assert manager.get_teacher_predictions(torch.randn(4, 8)) is None
        assert alive and alive[0]() is None
    finally:
        gc.enable()


def test_repeated_ooms_log_first_then_every_100th(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A teacher that runs out of memory on every step logs an ERROR the first and every
    ``OOM_LOG_EVERY``-th time (DEBUG otherwise); ``oom_count`` counts every one."""
    teacher = CheckpointedTeacher(make_mlp(), dtype=torch.float32)
    manager = TeacherForwardPassManager(teacher, profile_memory=False)

    def out_of_memory(*args: object) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(teacher.teacher, "forward", out_of_memory)
    x = inputs(4)
    with caplog.at_level(logging.DEBUG, logger="kasmina.kd.teacher"):
        for _ in range(500):
            assert manager.get_teacher_predictions(x) is None
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 6 and "(500 OOMs)" in errors[-1]  # the 1st, 100th, ..., 500th
    assert sum("out of memory" in m for m in caplog.messages) == 500
    assert manager.oom_count == 500


def test_other_teacher_errors_propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = CheckpointedTeacher(make_mlp(), dtype=torch.float32)
    manager = TeacherForwardPassManager(teacher)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        manager.get_teacher_predictions(torch.randn(4, IN + 1))
    assert manager.oom_count == 0
    assert is_oom_error(RuntimeError("CUDA error: out of memory"))
    assert not is_oom_error(ValueError("out of memory"))


def test_a_cpu_teacher_out_of_memory_skips_kd() -> None:
    """PyTorch's CPU allocator says "can't allocate memory", not "out of memory": a teacher
    kept on the CPU that ran out crashed the training step instead of skipping KD."""

    class Hungry(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(IN, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.repeat(1, 2**42)[:, :IN])  # an allocation no machine grants

    manager = TeacherForwardPassManager(CheckpointedTeacher(Hungry(), dtype=torch.float32))
    assert manager.get_teacher_predictions(torch.randn(4, IN)) is None
    assert manager.oom_count == 1


def test_the_cpu_memory_profile_counts_a_batch_not_the_dataset_it_views() -> None:
    """A batch sliced from a dataset in memory was counted as the whole dataset's storage."""
    dataset = torch.randn(10_000, IN)
    manager = TeacherForwardPassManager(CheckpointedTeacher(make_mlp(), dtype=torch.bfloat16))
    manager.get_teacher_predictions(dataset[:16])
    full = manager.get_checkpoint_effectiveness()["peak_forward_bytes_full"]
    manager = TeacherForwardPassManager(CheckpointedTeacher(make_mlp(), dtype=torch.bfloat16))
    manager.get_teacher_predictions(dataset[:16].clone())
    assert full == manager.get_checkpoint_effectiveness()["peak_forward_bytes_full"]
    assert full < dataset.numel() * 4 / 10  # the dataset: 640 kB


def test_the_cpu_memory_profile_counts_every_view_of_a_split_output() -> None:
    """Counting the largest view of each storage missed the rest of an output split into
    views (q, k, v of one projection): the whole projection is live."""

    class QKV(nn.Module):  # one projection, no submodule that returns it whole
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3 * 64, IN) / 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return torch.nn.functional.linear(x, self.weight).chunk(3, -1)

    class Teacher(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.head = QKV(), nn.Linear(64, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x)
            return self.head(q + k + v)

    manager = TeacherForwardPassManager(CheckpointedTeacher(Teacher(), dtype=torch.float32))
    manager.get_teacher_predictions(torch.randn(32, IN))
    peak = manager.get_checkpoint_effectiveness()["peak_forward_bytes_full"]
    assert peak >= 32 * (IN + 3 * 64) * 4  # the input and the whole projection


def test_the_cpu_memory_profile_counts_a_nested_tensor_by_its_components() -> None:
    """``nn.TransformerEncoder`` given a padding mask runs its layers on a nested tensor in eval
    mode, which has no sizes or strides: every CPU measurement of such a teacher raised (its
    peaks were NaN). A nested output is counted by the bytes of its components."""

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(IN, 2, 32, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True)
            self.head = nn.Linear(IN, CLASSES)

        def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(x, src_key_padding_mask=padding))

    x, padding = torch.randn(3, 5, IN), torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = True
    manager = TeacherForwardPassManager(CheckpointedTeacher(Encoder(), dtype=torch.float32))
    assert manager.get_teacher_predictions({"x": x, "padding": padding}) is not None
    peak = manager.get_checkpoint_effectiveness()["peak_forward_bytes_full"]
    assert peak >= manager.checkpointed_teacher.parameter_bytes() + x.nelement() * 4

    class Nest(nn.Module):  # rows 2 and 3 of two sequences, copied into one nested buffer
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nested.nested_tensor([x[0, :2], x[1, :3]])

    nest, x = Nest(), torch.randn(2, 3, 4)
    assert hooked_activation_peak(nest, lambda: nest(x)) == (2 * 3 + 5) * 4 * 4


def test_a_refused_checkpoint_leaves_a_lazy_model_loaded_in_place_untouched(tmp_path) -> None:
    """``copy_model=False`` with lazy parameters (no meta clone to try the load on): the load
    copied every matching key before it refused the file, which said "nothing loaded"."""
    model = nn.Sequential(nn.Linear(IN, 8), nn.ReLU(), nn.LazyLinear(CLASSES))
    before = model[0].weight.detach().clone()
    state = {"0.weight": torch.zeros(8, IN), "0.bias": torch.zeros(8),
             "2.weight": torch.zeros(CLASSES, 8), "2.bias": torch.zeros(CLASSES),
             "extra": torch.zeros(1)}  # fmt: skip
    torch.save(state, path := tmp_path / "teacher.pt")
    with pytest.raises(ValueError, match="nothing loaded.*Unexpected key"):
        CheckpointedTeacher(model, copy_model=False, checkpoint_path=path)
    assert torch.equal(model[0].weight, before)
    state["2.weight"] = [0.0]  # no tensor where the lazy layer takes one
    del state["extra"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="nothing loaded"):
        CheckpointedTeacher(model, copy_model=False, checkpoint_path=path)
    assert torch.equal(model[0].weight, before)
    state["2.weight"] = torch.zeros(CLASSES, 8)
    torch.save(state, path)
    CheckpointedTeacher(model, copy_model=False, checkpoint_path=path)  # a fitting one loads
    assert not model[0].weight.any()
    # A file a strict load takes after its own hooks rewrite it (an older BatchNorm without
    # ``num_batches_tracked``) loads into a lazy model in place too.
    lazy_bn = nn.Sequential(nn.Linear(IN, 8), nn.BatchNorm1d(8), nn.LazyLinear(CLASSES))
    old = {k: v for k, v in nn.Sequential(nn.Linear(IN, 8), nn.BatchNorm1d(8),
           nn.Linear(8, CLASSES)).state_dict().items() if "num_batches" not in k}  # fmt: skip
    torch.save(old, path)
    CheckpointedTeacher(lazy_bn, copy_model=False, checkpoint_path=path)


def test_effectiveness_is_measured_and_scales_with_model_and_batch() -> None:
    figures = {}
    for hidden in (32, 256):
        teacher = CheckpointedTeacher(make_mlp(hidden=hidden), dtype=torch.bfloat16)
        before = snapshot(teacher.teacher)
        params_before = teacher.teacher_parameters()
        manager = TeacherForwardPassManager(teacher, budget_ms=1e9)
        for _ in range(5):
            manager.get_teacher_predictions(inputs(64))
        stats = manager.get_checkpoint_effectiveness()
        numel = sum(p.numel() for p in params_before)
        assert stats["param_bytes_full"] == 4 * numel
        assert stats["param_bytes_reduced"] == 2 * numel
        assert stats["param_memory_ratio"] == 0.5
        # Activations and logits count on top of parameters, at each precision.
        assert stats["peak_forward_bytes_full"] > stats["param_bytes_full"] + 64 * CLASSES * 4
        assert stats["peak_forward_bytes_reduced"] > stats["param_bytes_reduced"]
        assert stats["peak_forward_bytes_full"] > stats["peak_forward_bytes_reduced"] > 0
        assert 0.4 < stats["peak_memory_ratio"] < 0.75
        assert stats["forwards"] == 5.0 and stats["ooms"] == 0.0
        assert stats["forward_ms_mean"] > 0 and stats["forward_ms_std"] >= 0
        assert stats["forward_ms_max"] >= stats["forward_ms_mean"]
        assert stats["within_budget"] == 1.0 and stats["memory_measured_on_cuda"] == 0.0
        # Profiling cast the teacher to fp32 and back: same objects, same bits, same dtype.
        assert all(a is b for a, b in zip(params_before, teacher.teacher_parameters(), strict=True))
        assert_bit_identical(teacher.teacher, before)
        assert teacher.dtype == torch.bfloat16
        figures[hidden] = stats
    for key in ("param_bytes_full", "peak_forward_bytes_full", "peak_forward_bytes_reduced"):
        assert figures[256][key] > figures[32][key], key

    teacher = CheckpointedTeacher(make_mlp(hidden=256), dtype=torch.bfloat16)
    small = teacher.measure_forward_peak_bytes(inputs(8))
    large = teacher.measure_forward_peak_bytes(inputs(512))
    assert large > small > teacher.parameter_bytes()


def test_effectiveness_before_any_forward_is_nan_not_invented() -> None:
    manager = TeacherForwardPassManager(CheckpointedTeacher(make_mlp(), dtype=torch.float16))
    stats = manager.get_checkpoint_effectiveness()
    assert stats["forwards"] == 0.0 and stats["param_memory_ratio"] == 0.5
    for key in ("forward_ms_mean", "forward_ms_std", "peak_forward_bytes_full", "within_budget"):
        assert math.isnan(stats[key]), key
    assert TeacherForwardPassManager(None).get_teacher_predictions(inputs(2)) is None


def test_fp32_profile_oom_is_recorded_and_teacher_restored(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    teacher = CheckpointedTeacher(make_mlp(), dtype=torch.bfloat16)
    before = snapshot(teacher.teacher)
    real_forward = teacher.teacher.forward

    def fp32_does_not_fit(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_forward(x)

    monkeypatch.setattr(teacher.teacher, "forward", fp32_does_not_fit)
    manager = TeacherForwardPassManager(teacher)
    with caplog.at_level(logging.WARNING, logger="kasmina.kd.teacher"):
        assert manager.get_teacher_predictions(inputs(8)) is not None
    stats = manager.get_checkpoint_effectiveness()
    assert math.isnan(stats["peak_forward_bytes_full"]) and stats["peak_forward_bytes_reduced"] > 0
    assert "does not fit" in caplog.text and stats["ooms"] == 0.0
    assert teacher.dtype == torch.bfloat16
    assert_bit_identical(teacher.teacher, before)


def test_a_memory_profile_that_runs_out_of_memory_leaves_the_step_its_logits(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The first forward's profile runs the teacher again while its logits are held: an OOM
    there reached the training loop (uncounted, and retried by the next call's profile)."""
    teacher = CheckpointedTeacher(make_mlp(), dtype=torch.bfloat16)
    calls = []

    def second_does_not_fit(x: torch.Tensor, dtype: torch.dtype | None = None) -> int:
        calls.append(dtype)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(teacher, "measure_forward_peak_bytes", second_does_not_fit)
    manager = TeacherForwardPassManager(teacher)
    with caplog.at_level(logging.WARNING, logger="kasmina.kd.teacher"):
        first = manager.get_teacher_predictions(inputs(8))
        second = manager.get_teacher_predictions(inputs(8))
    assert first is not None and second is not None and calls == [None]  # profiled once
    stats = manager.get_checkpoint_effectiveness()
    assert math.isnan(stats["peak_forward_bytes_reduced"]) and stats["ooms"] == 0.0
    assert "memory profile ran out of memory" in caplog.text


def test_slow_forward_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    teacher = CheckpointedTeacher(make_mlp(), dtype=torch.float32)
    fast = TeacherForwardPassManager(teacher, budget_ms=1e9, profile_memory=False)
    with caplog.at_level(logging.WARNING, logger="kasmina.kd.teacher"):
        fast.get_teacher_predictions(inputs(8))
    assert "budget" not in caplog.text and fast.slow_count == 0

    slow = TeacherForwardPassManager(teacher, budget_ms=1e-9, profile_memory=False)
    with caplog.at_level(logging.WARNING, logger="kasmina.kd.teacher"):
        for _ in range(3):
            slow.get_teacher_predictions(inputs(8))
    warnings = [r for r in caplog.records if "above the" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING  # rate-limited
    assert slow.slow_count == 3
    assert slow.get_checkpoint_effectiveness()["within_budget"] == 0.0


def test_static_kd_loss_matches_the_formula_and_spares_the_teacher() -> None:
    torch.manual_seed(3)
    student = torch.randn(6, CLASSES, dtype=torch.float64)
    teacher = torch.randn(6, CLASSES, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, False, True])
    t = 3.0
    rows = (
        (
            (teacher / t).softmax(-1)
            * ((teacher / t).log_softmax(-1) - (student / t).log_softmax(-1))
        ).sum(-1)
        * t
        * t
    )
    expected = {
        "none": rows * mask,
        "sum": rows[mask].sum(),
        "mean": rows[mask].sum() / (mask.sum() * CLASSES),
        "batchmean": rows[mask].mean(),
    }
    for reduction, want in expected.items():
        s = student.float().requires_grad_()
        te = teacher.float().requires_grad_()
        loss = StaticKDLoss(temperature=t, reduction=reduction)(s, te, mask=mask)
        torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
        loss.sum().backward()
        assert te.grad is None and s.grad is not None and s.grad.abs().sum() > 0
    assert "temperature=3.0" in repr(StaticKDLoss(temperature=t))


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(TypeError):
        CheckpointedTeacher(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype"):
        CheckpointedTeacher(make_mlp(), dtype=torch.int8)
    with pytest.raises(ValueError, match="dtype"):
        CheckpointedTeacher(make_mlp(), output_dtype=torch.float64)
    with pytest.raises(ValueError, match="budget"):
        TeacherForwardPassManager(None, budget_ms=0)
    with pytest.raises(TypeError):
        TeacherForwardPassManager(make_mlp())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        StaticKDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        StaticKDLoss(reduction="max")
    with pytest.raises(ValueError, match=r"student_logit_scale must be in \["):
        StaticKDLoss(student_logit_scale=1e39)  # accepted, then its first forward raised
    with pytest.raises(ValueError, match="shape"):
        StaticKDLoss()(torch.randn(2, 3), torch.randn(2, 4))
    teacher = CheckpointedTeacher(make_mlp())
    with pytest.raises(TypeError, match="tensor"):
        teacher([1.0] * IN)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype"):
        teacher.measure_forward_peak_bytes(inputs(2), torch.float64)
    with pytest.raises(ValueError, match="no teacher"):
        TeacherForwardPassManager(None).profile_memory(inputs(2))


class MixedPrecisionTeacher(nn.Module):
    """bf16 weights with an fp32 buffer, as AMP-style models keep norms in fp32."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(IN, CLASSES).to(torch.bfloat16)
        self.register_buffer("scale", torch.full((CLASSES,), 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        return out * self.scale.to(out.dtype)


def test_profiling_restores_a_mixed_precision_teacher_tensor_by_tensor() -> None:
    teacher = CheckpointedTeacher(MixedPrecisionTeacher(), dtype=None)
    assert teacher.dtype == torch.bfloat16
    before = snapshot(teacher.teacher)
    full = teacher.measure_forward_peak_bytes(inputs(8), torch.float32)
    assert full > teacher.measure_forward_peak_bytes(inputs(8)) > 0
    assert teacher.teacher.scale.dtype == torch.float32  # not flattened to bf16
    with pytest.raises(ValueError, match="would round the teacher's torch.bfloat16, torch.float32"):
        teacher.measure_forward_peak_bytes(inputs(8), torch.float16)
    assert_bit_identical(teacher.teacher, before)


@pytest.mark.parametrize(
    ("own", "at"), [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                    (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)],
)  # fmt: skip
def test_measuring_at_a_narrower_dtype_is_refused_and_leaves_the_teacher_as_it_was(
    own: torch.dtype, at: torch.dtype
) -> None:
    # The cast back cannot undo a rounding: the teacher would teach other logits from then on.
    teacher = CheckpointedTeacher(make_mlp(), dtype=own)
    before = snapshot(teacher.teacher)
    with pytest.raises(ValueError, match=f"measuring at {at} would round"):
        teacher.measure_forward_peak_bytes(inputs(8), at)
    assert_bit_identical(teacher.teacher, before)
    assert teacher.dtype == own


def test_padded_positions_written_as_all_minus_inf_teacher_rows_are_left_out() -> None:
    """The README's padding recipe: rows whose teacher logits are all ``-inf`` teach nothing
    and leave the mean, so the seed's loss and gradient are those of the kept rows alone."""
    from kasmina.kd.loss import seed_kd_loss

    g = torch.Generator().manual_seed(5)
    student = torch.randn(2, 4, 7, generator=g)
    teacher = torch.randn(2, 4, 7, generator=g)
    keep = torch.tensor([[True, True, False, False], [True, True, True, False]])
    padded = teacher.masked_fill(~keep[..., None], float("-inf"))
    config = KDConfig(temperature=2.0)
    s_all = student.clone().requires_grad_(True)
    s_kept = student[keep].clone().requires_grad_(True)
    loss = seed_kd_loss(config, s_all, padded)
    expected = seed_kd_loss(config, s_kept, teacher[keep])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(s_all.grad[keep], s_kept.grad)
    assert torch.equal(s_all.grad[~keep], torch.zeros_like(s_all.grad[~keep]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_teacher_computes_in_its_own_dtype_under_a_callers_autocast(dtype) -> None:
    """Teacher logits asked for inside the training loop's ``torch.autocast`` were computed in
    the autocast dtype: a bf16 teacher (chosen for its range) overflowed under fp16, an fp32
    one came back rounded to bf16. The teacher turns the caller's autocast off."""
    model = nn.Sequential(nn.Linear(IN, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight.mul_(1e5)  # logits far beyond fp16's range
    teacher = CheckpointedTeacher(model, dtype=dtype)
    x = inputs(16)
    plain = teacher(x)
    assert torch.isfinite(plain).all()
    for under in (torch.float16, torch.bfloat16):
        with torch.autocast("cpu", dtype=under):
            got = teacher(x)
            assert torch.is_autocast_enabled("cpu")  # the caller's autocast is left as it was
        assert got.dtype == torch.float32 and torch.equal(got, plain), under


def test_a_teacher_holds_the_parameters_its_cast_made() -> None:
    """Held before the cast, a teacher whose cast made new parameter objects (torch's
    ``set_overwrite_module_params_on_conversion``) left its live parameters free: an
    optimizer could take them, and a second teacher in place recast the first."""
    model = make_mlp()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        first = CheckpointedTeacher(model, dtype=torch.bfloat16, copy_model=False)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert all(map(is_teacher_parameter, first.teacher_parameters()))
    with pytest.raises(ValueError, match="held in place by another live teacher"):
        CheckpointedTeacher(model, dtype=torch.float16, copy_model=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_a_model_is_held_while_its_teacher_loads_and_casts_it() -> None:
    """Checked, then loaded and cast, then marked: a second in-place teacher built meanwhile
    (another thread) passed the check too, and the two cast the model under each other."""
    model = make_mlp()
    seen: list[BaseException] = []
    cast = type(model).to

    def to(self, *args, **kwargs):  # a second teacher built while the first casts
        try:
            CheckpointedTeacher(model, dtype=torch.float16, copy_model=False)
        except ValueError as exc:
            seen.append(exc)
        return cast(self, *args, **kwargs)

    model.to = types.MethodType(to, model)
    first = CheckpointedTeacher(model, dtype=torch.bfloat16, copy_model=False)
    assert len(seen) == 1 and "held in place" in str(seen[0])
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(map(is_teacher_parameter, first.teacher_parameters()))


def test_static_kd_loss_refuses_a_config_or_teacher_of_the_wrong_kind() -> None:
    """``StaticKDLoss.from_config(None)`` raised AttributeError ('temperature'), and teacher
    logits that are no tensor AttributeError ('detach'): each is refused saying what it got."""
    with pytest.raises(TypeError, match="from_config takes a KDConfig, got NoneType"):
        StaticKDLoss.from_config(None)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match="pass logits: teacher_logits .*got teacher_logits of list"
    ):
        StaticKDLoss()(torch.randn(2, 3), [[0.0, 1.0, 2.0]] * 2)  # type: ignore[arg-type]
