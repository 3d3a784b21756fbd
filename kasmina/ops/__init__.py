"""The fused ops: the hot paths, each a Triton kernel behind autograd (docs/design.md §2).

Five op families, one module each, read top to bottom: the plain torch reference (the CPU path
and the test oracle), the Triton launch (device code lives in ``kasmina.kernels``, and only this
package imports it), one ``torch.autograd.Function`` for eager use and one
``torch.library.custom_op`` with ``register_fake`` and ``register_autograd`` for
``torch.compile(fullgraph=True)`` -- both over the same implementation -- and the public
function that dispatches:

- ``alpha_blend`` -- ``alpha*seed + (1-alpha)*host.detach()`` (per-chunk alpha), or the
  straight-through ``incubate`` mode; the host gets no gradient from the blend.
- ``kd_loss`` -- ``kd_kl_loss``: ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` per row, streaming
  softmax, the ``[rows, V]`` probabilities never materialised.
- ``fused_linear_kd`` -- ``fused_linear_kd_loss``, built on ``kd_kl_loss`` (its kernels, no
  kernel of its own) and GEMMs: the KD loss of a linear head's logits (optional logit scale and
  soft-cap per side), chunked over rows so the ``[rows, V]`` logits never exist; gradients for
  hidden, weight, bias.
- ``grad_norms`` -- ``grad_norms`` / ``leak_check``: L2 norms of many tensors in one launch per
  dtype; the leak flag stays on the device until the caller reads it.
- ``lifecycle`` -- ``lifecycle_update`` / ``lifecycle_tick``: K transitions of the seed state
  table in one launch, validated against ``kasmina.stages``.

Beside them:

- ``fused_linear_kd_chunks`` -- the chunk engine behind ``fused_linear_kd_loss``: the per-chunk
  forward and gradients, the ``reduction="none"`` backward that recomputes each chunk.
- ``kd_layout`` -- the layout of ``kd_kl_loss``'s student gradient, shared by both backends and
  the compile-time fake.
- ``kd_oracle`` -- ``kd_kl_loss_reference``, the plain-torch ``kd_kl_loss`` (the test oracle,
  and the loss inside a compiled ``torch.func`` transform), and the reductions ``REDUCTIONS``.
- ``kd_tangent`` / ``blend_tangent`` -- the forward-mode rules (``torch.func.jvp``, ``jacfwd``)
  of ``kd_kl_loss`` and ``alpha_blend``: the transposes of their backwards.
- ``transforms`` -- the eager Functions' support for higher order (a backward that records no
  graph refuses a second one) and for ``torch.func``'s transforms.
- ``backend`` -- the choice: CUDA tensors run Triton, CPU tensors the reference, unless
  ``KASMINA_BACKEND=triton`` with ``TRITON_INTERPRET=1`` forces the kernels through the
  interpreter (how CI proves every kernel without a GPU).

Every kernel accumulates in fp32 and takes fp32, fp16 and bf16. Imports torch,
``kasmina.kernels`` (lazily, so Triton loads only when a kernel runs), ``kasmina.utils`` and
``kasmina.stages``. This package re-exports its public functions (``from kasmina.ops import
alpha_blend``, as the README does), the one package besides ``kasmina.leyline`` that does: they
are not in ``kasmina``'s table.
"""

from kasmina.ops.alpha_blend import alpha_blend, alpha_blend_reference
from kasmina.ops.fused_linear_kd import fused_linear_kd_loss, fused_linear_kd_loss_reference
from kasmina.ops.grad_norms import (
    grad_norms,
    grad_norms_reference,
    leak_check,
    leak_check_reference,
)
from kasmina.ops.kd_loss import kd_kl_loss
from kasmina.ops.kd_oracle import kd_kl_loss_reference
from kasmina.ops.lifecycle import (
    lifecycle_tick,
    lifecycle_tick_reference,
    lifecycle_update,
    lifecycle_update_reference,
)

__all__ = [
    "alpha_blend",
    "alpha_blend_reference",
    "fused_linear_kd_loss",
    "fused_linear_kd_loss_reference",
    "grad_norms",
    "grad_norms_reference",
    "kd_kl_loss",
    "kd_kl_loss_reference",
    "leak_check",
    "leak_check_reference",
    "lifecycle_tick",
    "lifecycle_tick_reference",
    "lifecycle_update",
    "lifecycle_update_reference",
]
