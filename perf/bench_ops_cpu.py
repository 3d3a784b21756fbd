"""Fused ops on CPU: the torch reference paths (what CPU tensors run), beside eager PyTorch.

The docs/design.md §8 speed targets for these ops are GPU targets, measured by
``perf/bench_gpu.py``; on CPU the numbers here show what the op's validation, custom-op
dispatch and autograd wrapper cost over writing the same math inline. Speeds are reported,
never asserted.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kasmina.ops import (
    alpha_blend,
    grad_norms,
    kd_kl_loss,
    leak_check,
    lifecycle_tick,
    lifecycle_update,
)
from kasmina.stages import NUM_STAGES, NUM_STATE_COLUMNS, StateColumn

BLEND_SHAPE = (64, 1024)
TINY_SHAPE = (8, 16)
KD_ROWS, KD_VOCAB, TEMPERATURE = 32, 8192, 2.0
BLEND_TARGET = "GPU: fwd+bwd >= 85% of memory bandwidth and >= 2x eager (bench_gpu.py)"
KD_TARGET = "GPU: fwd+bwd faster than Liger-Kernel and eager, extra memory <= 1 logits buffer"


@pytest.fixture(autouse=True)
def reference_cpu(monkeypatch: pytest.MonkeyPatch):
    """One core (docs/design.md §8 measures CPU paths on one core) and the reference backend."""
    monkeypatch.setenv("KASMINA_BACKEND", "reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pair(shape, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    seed_out = torch.randn(shape, generator=gen, requires_grad=requires_grad)
    host_out = torch.randn(shape, generator=gen, requires_grad=requires_grad)
    return seed_out, host_out


# --------------------------------------------------------------------------- alpha_blend


@pytest.mark.parametrize("alpha_kind", ["float", "0-d", "per-chunk"])
def test_alpha_blend_forward(benchmark, alpha_kind: str) -> None:
    seed_out, host_out = _pair(BLEND_SHAPE)
    alpha = {"float": 0.3, "0-d": torch.tensor(0.3), "per-chunk": torch.rand(8)}[alpha_kind]
    with torch.no_grad():
        benchmark(alpha_blend, seed_out, host_out, alpha)
    benchmark.extra_info["target"] = BLEND_TARGET


def test_alpha_blend_forward_eager_baseline(benchmark) -> None:
    seed_out, host_out = _pair(BLEND_SHAPE)
    with torch.no_grad():
        benchmark(lambda: 0.3 * seed_out + (1 - 0.3) * host_out)
    benchmark.extra_info["target"] = "baseline for test_alpha_blend_forward"


def test_alpha_blend_forward_backward(benchmark) -> None:
    """Training step shape: blend with a learnable 0-d alpha, then backward."""
    seed_out, host_out = _pair(BLEND_SHAPE, requires_grad=True)
    alpha = torch.tensor(0.3, requires_grad=True)
    grad = torch.ones(BLEND_SHAPE)

    def step() -> None:
        alpha_blend(seed_out, host_out, alpha).backward(grad)

    benchmark(step)
    benchmark.extra_info["target"] = BLEND_TARGET


def test_alpha_blend_forward_backward_eager_baseline(benchmark) -> None:
    seed_out, host_out = _pair(BLEND_SHAPE, requires_grad=True)
    alpha = torch.tensor(0.3, requires_grad=True)
    grad = torch.ones(BLEND_SHAPE)

    def step() -> None:
        (alpha * seed_out + (1 - alpha) * host_out.detach()).backward(grad)

    benchmark(step)
    benchmark.extra_info["target"] = "baseline for test_alpha_blend_forward_backward"


def test_alpha_blend_call_overhead_tiny(benchmark) -> None:
    """Per-call cost on a tiny activation: validation + custom-op dispatch dominate."""
    seed_out, host_out = _pair(TINY_SHAPE)
    with torch.no_grad():
        benchmark(alpha_blend, seed_out, host_out, 0.3)
    benchmark.extra_info["target"] = "no DESIGN target; the fixed per-call overhead"


# --------------------------------------------------------------------------- kd_kl_loss


def _logits(requires_grad: bool):
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(KD_ROWS, KD_VOCAB, generator=gen, requires_grad=requires_grad)
    teacher = torch.randn(KD_ROWS, KD_VOCAB, generator=gen)
    return student, teacher


def test_kd_kl_loss_forward_backward(benchmark) -> None:
    student, teacher = _logits(requires_grad=True)

    def step() -> None:
        kd_kl_loss(student, teacher, TEMPERATURE, "batchmean").backward()

    benchmark(step)
    benchmark.extra_info["target"] = KD_TARGET


def test_kd_kl_loss_forward_backward_eager_baseline(benchmark) -> None:
    """``T²·F.kl_div`` on log-softmaxed logits: what a user would write by hand."""
    student, teacher = _logits(requires_grad=True)

    def step() -> None:
        log_ps = F.log_softmax(student / TEMPERATURE, dim=-1)
        log_pt = F.log_softmax(teacher / TEMPERATURE, dim=-1)
        loss = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
        (loss * TEMPERATURE**2).backward()

    benchmark(step)
    benchmark.extra_info["target"] = "baseline for test_kd_kl_loss_forward_backward"


def test_kd_kl_loss_forward_no_grad(benchmark) -> None:
    """Evaluation: no student gradient is computed or stored."""
    student, teacher = _logits(requires_grad=False)
    with torch.no_grad():
        benchmark(kd_kl_loss, student, teacher, TEMPERATURE, "batchmean")
    benchmark.extra_info["target"] = KD_TARGET


# --------------------------------------------------------------------------- grad_norms

NORM_COUNT = 1000
NORMS_TARGET = "GPU: >= 2x torch._foreach_norm + stack + norm over 1,000 tensors (bench_gpu.py)"


def _param_list() -> list[torch.Tensor | None]:
    """1,000 parameter-like tensors of mixed sizes (weights, biases), a few ``None`` grads."""
    gen = torch.Generator().manual_seed(2)
    sizes = [(64, 64), (256, 64), (64,), (64, 256), (64,)]
    tensors: list[torch.Tensor | None] = [
        torch.randn(sizes[i % len(sizes)], generator=gen) for i in range(NORM_COUNT)
    ]
    tensors[7] = tensors[500] = None
    return tensors


def test_grad_norms_total(benchmark) -> None:
    """Gradient-clipping shape: per-tensor norms, then the total norm."""
    tensors = _param_list()
    benchmark(lambda: torch.linalg.vector_norm(grad_norms(tensors)))
    benchmark.extra_info["target"] = NORMS_TARGET


def test_grad_norms_total_foreach_baseline(benchmark) -> None:
    present = [t for t in _param_list() if t is not None]
    benchmark(lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(present))))
    benchmark.extra_info["target"] = "baseline for test_grad_norms_total"


def test_leak_check(benchmark) -> None:
    """The isolation monitor's question after a seed backward; the flag stays a tensor."""
    tensors = _param_list()
    benchmark(leak_check, tensors, 0.0)
    benchmark.extra_info["target"] = NORMS_TARGET


# --------------------------------------------------------------------------- lifecycle

SEEDS = 1024
LIFECYCLE_TARGET = "GPU: a 1,024-seed lifecycle update in one launch (bench_gpu.py)"


def _state_and_requests() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    state = torch.zeros(SEEDS, NUM_STATE_COLUMNS, dtype=torch.int32)
    state[:, StateColumn.LIFECYCLE_STAGE] = torch.randint(
        0, NUM_STAGES, (SEEDS,), generator=gen, dtype=torch.int32
    )
    idx = torch.randperm(SEEDS, generator=gen)
    new_stage = torch.randint(0, NUM_STAGES, (SEEDS,), generator=gen)
    return state, idx, new_stage


def test_lifecycle_update(benchmark) -> None:
    """1,024 requests on a 1,024-seed table (after the first call most are rejected)."""
    state, idx, new_stage = _state_and_requests()
    benchmark(lifecycle_update, state, idx, new_stage)
    benchmark.extra_info["target"] = LIFECYCLE_TARGET


def test_lifecycle_tick(benchmark) -> None:
    state, _, _ = _state_and_requests()
    benchmark(lifecycle_tick, state)
    benchmark.extra_info["target"] = LIFECYCLE_TARGET
