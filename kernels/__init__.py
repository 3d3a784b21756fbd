"""Triton device code, installed as ``kasmina.kernels``: one module per op family.

Each module holds the ``@triton.jit`` kernels of one fused op and the launcher that sizes the
grid and calls them; nothing else. The host-side contract of every op -- validation, the torch
reference, autograd, the custom op for ``torch.compile`` and the choice between Triton and the
reference -- lives in ``kasmina.ops``, which is the only importer of this package (and imports it
lazily, so Triton loads only when a kernel runs). Kernel comments carry the numerical argument:
fp32 accumulation after loading fp16/bf16, int64 offsets, why a block size was chosen.

- ``alpha_blend`` -- the blend of a seed's output into the host's, forward and backward.
- ``kd_loss`` -- the streaming-softmax KD loss and its student gradient.
- ``grad_norms`` -- per-tensor L2 norms of many tensors through a pointer/chunk table.
- ``lifecycle`` -- batched transitions of the seed state table and the per-epoch tick.
- ``rows`` and ``device`` -- shared launcher helpers (no kernels): row addressing and
  alignment for the row-streaming kernels, and the device a launch runs on.
"""
