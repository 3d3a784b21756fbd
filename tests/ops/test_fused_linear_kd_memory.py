"""fused_linear_kd_loss's memory claim (docs/design.md §2): no ``[rows, V]`` tensor is ever
allocated or saved for the backward, the peak is at most an eighth of eager's with the head
trained, the fp32 accumulators are rounded in their own storage, and the default chunk
follows the device's budget."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode
from torch.utils._pytree import tree_leaves

import kasmina.ops.fused_linear_kd_chunks as chunks
from kasmina.ops import fused_linear_kd_loss, kd_kl_loss
from tests.ops.fused_linear_kd_helpers import _close, _inputs
from tests.ops.kd_helpers import DEVICE, KERNEL_WARNINGS, _gen

pytestmark = [*KERNEL_WARNINGS, pytest.mark.usefixtures("on_device")]


def test_default_chunk_rows_follows_the_budget(monkeypatch: pytest.MonkeyPatch):
    """docs/design.md §2: the device's budget over the per-row scratch, a multiple of 64."""
    assert chunks.default_chunk_rows(10**6, 128_256, torch.bfloat16, torch.bfloat16) == 640
    assert chunks.default_chunk_rows(10**6, 128_256, torch.bfloat16) == 1024
    assert chunks.default_chunk_rows(10, 128_256, torch.bfloat16) == 10
    assert chunks.default_chunk_rows(10**6, 10**9, torch.float32, device_type="cpu") == 1
    assert chunks.default_chunk_rows(10**6, 32_000, torch.float32, device_type="cpu") == 64
    per_row = 200 * (2 * 4 + 4 + (chunks.CPU_SCRATCH_BYTES if DEVICE.type != "cuda" else 0))
    budget = "DEFAULT_CHUNK_BYTES" if DEVICE.type == "cuda" else "DEFAULT_CPU_CHUNK_BYTES"
    monkeypatch.setattr(chunks, budget, 5 * per_row)
    calls: list[int] = []
    forward = chunks.kd_forward_impl

    def spy(student, *args):
        calls.append(student.shape[0])
        return forward(student, *args)

    monkeypatch.setattr(chunks, "kd_forward_impl", spy)
    h, w, _, th, tw, _, _, _ = _inputs((12,), 8, 200, torch.float32, seed=12)
    fused_linear_kd_loss(h, w, teacher_hidden=th, teacher_weight=tw)
    assert calls == [5, 5, 2]


class _Allocations(TorchDispatchMode):
    """Records the largest storage any op creates (views of existing storages excluded) and the
    peak of the bytes held at once by the storages created under it (``peak``: each storage
    counted until it is freed, whoever holds it; the pre-existing inputs are not counted)."""

    def __init__(self, existing: list[Tensor]) -> None:
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in existing if t is not None}
        self.largest = 0
        self.peak = 0
        self.opaque = 0
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}

    def track(self, out: object) -> None:
        """Count the new storages among ``out``'s tensors, then the bytes alive now."""
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in self.known:
                continue
            self.largest = max(self.largest, storage.nbytes())
            held = self._live.get(ptr)
            if held is None or held[0].expired():
                self._live[ptr] = (StorageWeakRef(storage), storage.nbytes())
        self._live = {k: v for k, v in self._live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self._live.values()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.opaque:
            self.track(out)
        return out


def _opaque_kd_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under an ``_Allocations`` probe, count the KD op like the GPU kernels it stands for:
    only what it returns (the CPU path's fp32 temporaries are a CPU matter, and would swell
    eager's side most)."""
    import kasmina.ops.kd_loss as kd

    def opaque(fn):
        def run(*args, **kwargs):
            probe = _get_current_dispatch_mode()
            if not isinstance(probe, _Allocations):
                return fn(*args, **kwargs)
            probe.opaque += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                probe.opaque -= 1
            probe.track(out)
            return out

        return run

    for module in (chunks, kd):
        for name in ("kd_forward_impl", "kd_backward_impl"):
            monkeypatch.setattr(module, name, opaque(getattr(module, name)))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU allocation probe")
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("teacher", ["head", "logits"])
def test_no_rows_by_vocab_tensor_is_ever_allocated(reduction, teacher):
    """Every storage created in forward + backward, and every tensor saved for the backward,
    is at most the largest of one chunk's fp32 logits, the weight's fp32 accumulator and the
    hidden gradient, all far below one ``[rows, V]`` fp32 tensor. The same probe catches the
    eager ``kd_kl_loss(h @ W.T)``, so it can fail."""
    rows, hidden, vocab, chunk = 96, 8, 200, 8
    h, w, b, th, tw, tb, tl, mask = _inputs((rows,), hidden, vocab, torch.float32, seed=19)
    bound = 4 * max(chunk * vocab, vocab * hidden, rows * hidden)
    assert rows * vocab * 4 >= 10 * bound
    kwargs = dict(student_bias=b, temperature=2.0, reduction=reduction, mask=mask,
                  chunk_rows=chunk, student_softcap=4.0)  # fmt: skip
    if teacher == "head":
        kwargs.update(teacher_hidden=th, teacher_weight=tw, teacher_bias=tb, teacher_softcap=4.0)
    probe = _Allocations([h, w, b, th, tw, tb, tl, mask])
    saved: list[int] = []

    def pack(t: Tensor) -> Tensor:  # tensors saved for the backward, inputs excepted
        if t.untyped_storage().data_ptr() not in probe.known:
            saved.append(t.untyped_storage().nbytes())
        return t

    with probe, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fused_linear_kd_loss(h, w, None if teacher == "head" else tl, **kwargs)
        grads = torch.autograd.grad(loss.sum(), (h, w, b))
    assert all(g is not None for g in grads)
    assert 0 < probe.largest <= bound, (probe.largest, bound)
    assert saved and max(saved) <= bound

    eager_probe = _Allocations([h, w, b, tl, mask])
    with eager_probe:
        loss = kd_kl_loss(h @ w.t() + b, tl, 2.0, reduction, mask)
        torch.autograd.grad(loss.sum(), (h, w, b))
    assert eager_probe.largest >= rows * vocab * 4


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU allocation probe")
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_peak_memory_is_at_most_an_eighth_of_eager_with_the_head_trained(
    monkeypatch: pytest.MonkeyPatch, reduction: str
):
    """docs/design.md §2/§8: peak extra memory <= 1/8 of eager's at 8×4096 rows × H 4096 ×
    V 128,256 in bf16 with the head trained and a teacher head, here with every dimension and
    the default CUDA chunk divided by 64 (the ratios of all the terms are those of the real
    shape). Peak live bytes of everything created in forward + backward, gradients included;
    the KD op counts only its outputs, as its GPU kernels allocate nothing else. Eager holds
    the student's and teacher's logits, the logits gradient and the head's gradients (24.7
    GiB at the real shape); the fused op peaks at 2.7 GiB there. Rounding the fp32 weight
    accumulator into a second buffer (the old way, 3.4 GiB) or a doubled default chunk fails
    this."""
    shrink = 64
    rows, hidden, vocab = 8 * 4096 // shrink, 4096 // shrink, 128_256 // shrink
    bf16 = torch.bfloat16
    chunk = chunks.default_chunk_rows(8 * 4096, 128_256, bf16, bf16) // shrink
    h, w, _, th, tw, _, _, _ = _inputs((rows,), hidden, vocab, bf16, seed=30, bias=False,
                                       t_hidden=hidden)  # fmt: skip
    _opaque_kd_op(monkeypatch)
    probe = _Allocations([h, w, th, tw])
    with probe:
        loss = fused_linear_kd_loss(h, w, teacher_hidden=th, teacher_weight=tw, temperature=2.0,
                                    reduction=reduction, chunk_rows=chunk)  # fmt: skip
        grads = torch.autograd.grad(loss.sum(), (h, w))
    fused = probe.peak

    eager_probe = _Allocations([h, w, th, tw])
    with eager_probe:
        student = h @ w.t()
        with torch.no_grad():
            teacher = th @ tw.t()
        loss = kd_kl_loss(student, teacher, 2.0, reduction)
        want = torch.autograd.grad(loss.sum(), (h, w))
    eager = eager_probe.peak
    logits = rows * vocab * 2
    assert eager >= 3 * logits + vocab * hidden * 2, (eager, logits)
    assert fused * 8 <= eager, (fused, eager, fused / eager)
    for got, ref in zip(grads, want, strict=True):
        _close(got, ref, bf16, "fused vs eager gradient")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_in_place_equals_rounding_into_a_fresh_tensor(dtype):
    """The in-place rounding of an fp32 accumulator (blocks that double from the first,
    temporary one) gives bitwise what rounding into a new tensor gives, in the accumulator's
    own storage, for sizes that end mid-block."""
    n_rows = (chunks.FIRST_ROUND_BLOCK * 11 + 5) // 7
    acc = torch.randn(n_rows, 7, generator=_gen(31)) * 1e3
    for scale in (None, torch.tensor(3.0e-4)):
        want = (acc if scale is None else acc * scale).to(dtype)  # rounded into a new tensor
        spent = acc.clone()
        got = chunks._round_in_place(spent, dtype, scale)
        assert got.untyped_storage().data_ptr() == spent.untyped_storage().data_ptr()
        assert got.dtype == dtype and got.shape == acc.shape and got.is_contiguous()
        assert torch.equal(got, want)
