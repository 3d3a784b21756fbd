"""Knowledge distillation: a frozen teacher, and the KD losses that train seeds from it.

- ``config`` -- ``KDConfig``: temperature, weight and reduction, validated once.
- ``teacher`` -- ``CheckpointedTeacher``: a copy of a model held in eval mode, optionally in
  bf16/fp16, its forward under ``torch.inference_mode`` (no autograd graph is kept, which is
  what halves its memory together with the reduced dtype); ``TeacherForwardPassManager`` times
  each teacher forward and survives an out-of-memory error: KD is skipped for that step, the
  allocator cache is freed and training goes on.
- ``activation_peak`` -- the bytes a teacher's forward adds beside its weights: the CUDA
  allocator's peak, or elsewhere the largest input-and-output footprint of one module.
- ``holds`` -- the parameters a live teacher holds (``is_teacher_parameter``): the optimizer
  manager refuses them, and a second teacher in place of the model or of its memory is refused.
- ``loss`` -- the KD losses over the fused ``kasmina.ops.kd_kl_loss`` (``T² · KL(teacher ‖
  student)`` per row, docs/design.md §2, §7): ``seed_kd_loss``, the one helper seeds and slots
  use to distil a seed's output against detached teacher logits, and ``StaticKDLoss``, the
  ``nn.Module`` form for trainers; both also take a linear head instead of logits.
- ``graph`` -- the graph of the losses the slots and seeds collect: summed and marked
  (``sum_kd_losses``), their backward cut where it meets the host's graph (``kd_cut``), and
  the donated-buffer hold that keeps a compiled region's backward retainable.

Imports ``kasmina.ops`` and ``kasmina.utils`` (and torch); seeds, isolation, the manager and the
demo build on it. Each name is imported from its module: this package re-exports nothing
(``KDConfig`` is ``kasmina.KDConfig``).
"""
