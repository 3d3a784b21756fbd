"""KD on CPU: teacher forward overhead and the KD loss's CPU path beside eager PyTorch.

Targets (docs/design.md §7/§8): a teacher forward fits a 10 ms budget per step; the
reduced-precision teacher halves parameter memory; the KD loss's CPU path (what users without a
GPU run: ``kd_forward_reference`` / ``kd_backward_reference`` behind ``kd_kl_loss``) is at least
as fast as the eager PyTorch expression beside it, forward+backward. Each KD benchmark also
times that eager expression *in the same test*, alternating the two in rounds so that the load
of a shared machine falls on both alike, and prints ``ours/eager`` (< 1: ours is faster) beside
the target. The KD speed and memory targets on a GPU are measured by ``perf/bench_gpu.py``.
Speeds are reported, never asserted.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from paired import record_versus  # perf/ is on sys.path under pytest
from torch import nn

from kasmina.kd.loss import StaticKDLoss
from kasmina.kd.teacher import CheckpointedTeacher, TeacherForwardPassManager
from kasmina.ops import kd_kl_loss

BATCH, FEATURES, HIDDEN, VOCAB = 32, 256, 512, 1000
KD_ROWS, TEMPERATURE = 64, 2.0
BUDGET_MS = 10.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def one_thread():
    """docs/design.md §8 measures CPU paths on one core; a shared machine makes thread pools
    noisy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _teacher_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, VOCAB))


def _batch() -> torch.Tensor:
    return torch.randn(BATCH, FEATURES, generator=torch.Generator().manual_seed(1))


def test_teacher_forward_plain_eager(benchmark) -> None:
    """Baseline: the bare fp32 model under ``inference_mode``, no timing, no OOM guard."""
    model, x = _teacher_model().eval(), _batch()

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    benchmark(run)
    benchmark.extra_info["target"] = f"teacher forward <= {BUDGET_MS} ms per step"


@pytest.mark.parametrize("precision", list(DTYPES))
def test_teacher_forward_managed(benchmark, precision: str) -> None:
    """The training-step path: frozen teacher, timed forward, OOM guard, fp32 logits out."""
    teacher = CheckpointedTeacher(_teacher_model(), dtype=DTYPES[precision])
    manager = TeacherForwardPassManager(teacher, budget_ms=BUDGET_MS)
    x = _batch()
    manager.get_teacher_predictions(x)  # profiles memory once, outside the timed loop
    benchmark(manager.get_teacher_predictions, x)
    stats = manager.get_checkpoint_effectiveness()
    benchmark.extra_info.update(
        {
            "target": f"teacher forward <= {BUDGET_MS} ms per step; params halved in bf16",
            "forward_ms_mean": round(stats["forward_ms_mean"], 4),
            "forward_ms_std": round(stats["forward_ms_std"], 4),
            "within_budget": bool(stats["within_budget"]),
            "param_bytes_full": int(stats["param_bytes_full"]),
            "param_bytes_reduced": int(stats["param_bytes_reduced"]),
            "peak_forward_bytes_full": int(stats["peak_forward_bytes_full"]),
            "peak_forward_bytes_reduced": int(stats["peak_forward_bytes_reduced"]),
            "peak_memory_ratio": round(stats["peak_memory_ratio"], 4),
        }
    )


# --------------------------------------------------------------------------- KD loss, CPU path

KD_CASES = [  # rows, vocab, dtype: the §7 trainer shape, LM-like rows, a GPT-2 vocabulary
    (64, 1000, "fp32"),
    (32, 8192, "fp32"),
    (32, 8192, "bf16"),
    (8, 50257, "fp32"),
]
KD_TARGET = "CPU path fwd+bwd: ours/eager <= 1"
ROUNDS = 21


def _versus(benchmark, ours: Callable[[], object], eager: Callable[[], object], what: str) -> None:
    record_versus(
        benchmark,
        ours,
        eager,
        target=KD_TARGET,
        what=what,
        rounds=ROUNDS,
        batch_s=0.01,
    )


def _kd_logits(rows: int, vocab: int, dtype: str, requires_grad: bool = True):
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(rows, vocab, generator=gen).to(DTYPES[dtype])
    teacher = torch.randn(rows, vocab, generator=gen).to(DTYPES[dtype])
    return student.requires_grad_(requires_grad), teacher


def _eager_kd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """What a user writes by hand: ``T² · kl_div(log_softmax(s/T), log_softmax(t/T))``."""
    log_ps = F.log_softmax(student / TEMPERATURE, dim=-1)
    log_pt = F.log_softmax(teacher / TEMPERATURE, dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * TEMPERATURE**2


def _fwd_bwd(loss_fn: Callable, student: torch.Tensor, teacher: torch.Tensor) -> Callable:
    def step() -> None:
        student.grad = None
        loss_fn(student, teacher).backward()

    return step


@pytest.mark.parametrize(("rows", "vocab", "dtype"), KD_CASES)
def test_kd_loss_cpu_path(benchmark, rows: int, vocab: int, dtype: str) -> None:
    """``kd_kl_loss`` forward + backward on CPU tensors (the reference path) against eager."""
    student, teacher = _kd_logits(rows, vocab, dtype)
    ours = _fwd_bwd(lambda s, t: kd_kl_loss(s, t, TEMPERATURE), student, teacher)
    _versus(benchmark, ours, _fwd_bwd(_eager_kd, student, teacher), f"{rows}x{vocab} {dtype}")


def test_kd_loss_cpu_path_no_grad(benchmark) -> None:
    """Evaluation: the forward alone (no statistics kept) against eager under ``no_grad``."""
    student, teacher = _kd_logits(32, 8192, "fp32", requires_grad=False)
    with torch.no_grad():
        _versus(
            benchmark,
            lambda: kd_kl_loss(student, teacher, TEMPERATURE),
            lambda: _eager_kd(student, teacher),
            "32x8192 fp32, no_grad",
        )


def test_kd_loss_step_static_module(benchmark) -> None:
    """``StaticKDLoss`` (the trainer's module) forward + backward against eager."""
    student, teacher = _kd_logits(KD_ROWS, VOCAB, "fp32")
    loss_fn = StaticKDLoss(temperature=TEMPERATURE)
    ours = _fwd_bwd(loss_fn, student, teacher)
    eager = _fwd_bwd(_eager_kd, student, teacher)
    _versus(benchmark, ours, eager, f"StaticKDLoss {KD_ROWS}x{VOCAB} fp32")
