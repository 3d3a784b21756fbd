"""KD on CPU: teacher forward overhead and KD loss cost per training step.

Targets (docs/design.md §7/§8): a teacher forward fits a 10 ms budget per step; the
reduced-precision teacher halves parameter memory. The KD loss speed and memory targets are GPU
targets (faster than Liger-Kernel's KL path and eager PyTorch, extra memory ≤ one logits-sized
buffer) measured by ``perf/bench_gpu.py``; here the CPU path is timed beside eager PyTorch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kasmina.kd.loss import StaticKDLoss
from kasmina.kd.teacher import CheckpointedTeacher, TeacherForwardPassManager

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


def _logits() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(KD_ROWS, VOCAB, generator=gen).requires_grad_()
    return student, torch.randn(KD_ROWS, VOCAB, generator=gen)


def test_kd_loss_step_kasmina(benchmark) -> None:
    """``StaticKDLoss`` forward + backward (``kd_kl_loss``; the CPU path is the reference)."""
    student, teacher = _logits()
    loss_fn = StaticKDLoss(temperature=TEMPERATURE)

    def step() -> None:
        student.grad = None
        loss_fn(student, teacher).backward()

    step()  # first call registers the op's dispatch; keep it out of the timing
    benchmark(step)
    benchmark.extra_info["target"] = (
        "GPU: faster than Liger-Kernel and eager, extra memory <= one logits buffer "
        "(perf/bench_gpu.py); CPU: compare with test_kd_loss_step_eager"
    )


def test_kd_loss_step_eager(benchmark) -> None:
    """Eager PyTorch peer: ``T² · kl_div(log_softmax(s/T), log_softmax(t/T))``."""
    student, teacher = _logits()

    def step() -> None:
        student.grad = None
        log_ps = F.log_softmax(student / TEMPERATURE, dim=-1)
        log_pt = F.log_softmax(teacher / TEMPERATURE, dim=-1)
        loss = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
        (loss * TEMPERATURE**2).backward()

    benchmark(step)
    benchmark.extra_info["target"] = "peer for test_kd_loss_step_kasmina"
