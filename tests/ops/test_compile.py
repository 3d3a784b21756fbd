"""``torch.compile(fullgraph=True)`` over user code calling every fused op: no graph break.

``fullgraph=True`` turns any graph break into an error. The recording backend (AOTAutograd with
eager execution) also proves that each op reaches the graph as one ``kasmina::`` node, forward
and backward, instead of being traced through; one Inductor run proves real code generation.
Results and gradients must equal the eager ones.
"""

from __future__ import annotations

import math

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.fx import GraphModule

from kasmina.ops import (
    alpha_blend,
    grad_norms,
    kd_kl_loss,
    leak_check,
    lifecycle_tick,
    lifecycle_update,
)
from kasmina.stages import NUM_STATE_COLUMNS, SeedStage, StateColumn


def training_step(
    seed: torch.Tensor,
    host: torch.Tensor,
    alpha: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    state: torch.Tensor,
    idx: torch.Tensor,
    new_stage: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    blended = alpha_blend(seed @ weight, host, alpha)
    incubated = alpha_blend(seed, host, 0.0, mode="incubate")
    kd = kd_kl_loss(student @ weight, teacher, temperature=2.0)
    loss = blended.square().mean() + incubated.sum() * 0.01 + kd
    norms, flag = leak_check([host, None, weight], tol=1e3)
    clip = grad_norms([seed, weight])
    codes = lifecycle_update(state, idx, new_stage)
    lifecycle_tick(state)
    return loss, norms, flag, clip, codes


def make_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = torch.zeros(4, NUM_STATE_COLUMNS, dtype=torch.int32)
    state[2, StateColumn.LIFECYCLE_STAGE] = SeedStage.HARVESTING
    return {
        "seed": torch.randn(6, 8, generator=g, requires_grad=True),
        "host": torch.randn(6, 8, generator=g, requires_grad=True),
        "alpha": torch.tensor(0.3, requires_grad=True),
        "student": torch.randn(3, 8, generator=g, requires_grad=True),
        "teacher": torch.randn(3, 8, generator=g),
        "weight": torch.randn(8, 8, generator=g, requires_grad=True),
        "state": state,
        "idx": torch.tensor([0, 2, 2, 7]),
        "new_stage": torch.tensor([1, 6, 6, 1]),
    }


def run(fn, inputs: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], list]:
    loss, *rest = fn(**inputs)
    loss.backward()
    grads = [inputs[k].grad for k in ("seed", "host", "alpha", "student", "weight")]
    return (loss.detach(), *rest, inputs["state"]), grads


def assert_same_run(got: tuple, want: tuple) -> None:
    """``run``'s outputs and gradients equal (a gradient None in both or in neither)."""
    for g, w in zip(got[0], want[0], strict=True):
        torch.testing.assert_close(g, w)
    for g, w in zip(got[1], want[1], strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w)


def recording_backend(graphs: list[GraphModule]):
    def compiler(gm: GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


def ops_in(gm: GraphModule) -> str:
    return "\n".join(str(node.target) + " " + str(node.args) for node in gm.graph.nodes)


@pytest.mark.parametrize(
    "backend_name, kernels",
    [
        ("record", "reference_backend"),
        ("record", "triton_backend"),
        ("inductor", "reference_backend"),
    ],
)
def test_fullgraph_compile_matches_eager(
    request: pytest.FixtureRequest, backend_name: str, kernels: str
) -> None:
    request.getfixturevalue(kernels)
    torch._dynamo.reset()
    graphs: list[GraphModule] = []
    backend = recording_backend(graphs) if backend_name == "record" else "inductor"
    compiled = torch.compile(training_step, fullgraph=True, backend=backend)

    eager_out, eager_grads = run(training_step, make_inputs())
    out, grads = run(compiled, make_inputs())

    assert_same_run((out, grads), (eager_out, eager_grads))
    assert out[-1][2, StateColumn.LIFECYCLE_STAGE] == SeedStage.HARVESTING  # duplicate: untouched
    assert out[-1][0, StateColumn.EPOCHS_IN_STATE] == 1

    if backend_name == "record":
        forward, backward = ops_in(graphs[0]), ops_in(graphs[1])
        for op in ("alpha_blend", "kd_kl_loss", "leak_check", "grad_norms", "lifecycle_update"):
            assert f"kasmina.{op}" in forward, op
        assert "kasmina.lifecycle_tick" in forward
        assert "kasmina.alpha_blend_backward" in backward
        assert "kasmina.kd_kl_loss_backward" in backward
    torch._dynamo.reset()


@pytest.mark.parametrize("kernels", ["reference_backend", "triton_backend"])
def test_jit_trace_records_each_op_and_replays_on_new_values(
    request: pytest.FixtureRequest, kernels: str
) -> None:
    """Under ``torch.jit.trace`` the ops took their eager paths, which the tracer records op by
    op: a Triton launch not at all (the interpreter raised; a GPU would replay an
    uninitialised output), and on the CPU path a 0-d alpha read as a float (its value baked in:
    a schedule's later alpha ignored), the KD loss's careful form and the norms' float64
    repair chosen by a trace-time read (never taken at replay: NaN for a teacher's -inf logit,
    no leak for a 1e-30 gradient). Each op is one node now, and a replay on new values equals
    the eager ops on them."""
    request.getfixturevalue(kernels)
    traced = torch.jit.trace(training_step, tuple(make_inputs().values()), check_trace=False)
    graph = str(traced.graph)
    for op in ("alpha_blend", "kd_kl_loss", "lifecycle_update", "lifecycle_tick"):
        assert f"kasmina::{op}" in graph, op
    fresh, again = make_inputs(seed=1), make_inputs(seed=1)
    for inputs in (fresh, again):
        with torch.no_grad():
            inputs["alpha"].fill_(0.8)
            inputs["teacher"][0, :3] = -math.inf  # the careful form's case
            inputs["host"][0] = 1e-30  # leak_check's float64 repair's case (tol 1e3 aside)
    got, got_grads = run(lambda **kw: traced(*kw.values()), fresh)
    want, want_grads = run(training_step, again)
    assert_same_run((got, got_grads), (want, want_grads))
    assert torch.isfinite(got[0])


@pytest.mark.parametrize("kernels", ["reference_backend", "triton_backend"])
def test_jit_traced_leak_check_finds_a_tiny_leak(
    request: pytest.FixtureRequest, kernels: str
) -> None:
    """A traced ``leak_check`` measured in fp32, whose square of 1e-30 underflows to 0: no leak
    reported, where the eager op's float64 repair reports one (``tol=0``: any nonzero)."""
    request.getfixturevalue(kernels)
    traced = torch.jit.trace(
        lambda a, b: leak_check([a, None, b]), (torch.ones(3), torch.ones(2)), check_trace=False
    )
    norms, flag = traced(torch.full((3,), 1e-30), torch.zeros(2))
    assert bool(flag) and norms[0].item() == pytest.approx(3**0.5 * 1e-30, rel=1e-6)
    assert norms[1:].tolist() == [0.0, 0.0]
    assert not bool(traced(torch.zeros(3), torch.zeros(2))[1])


def test_use_grad_under_compile(reference_backend: None) -> None:
    torch._dynamo.reset()
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]
    params[0].grad = torch.full((5,), 2.0)

    def norms(ps: list[torch.nn.Parameter]) -> tuple[torch.Tensor, torch.Tensor]:
        return grad_norms(ps, use_grad=True), leak_check(ps, 1.0, use_grad=True)[1]

    got, flag = torch.compile(norms, fullgraph=True, backend="aot_eager")(params)
    torch.testing.assert_close(got, torch.tensor([2.0 * 5**0.5, 0.0]))
    assert bool(flag)
    torch._dynamo.reset()


@pytest.mark.parametrize("kernels", ["reference_backend", "triton_backend"])
def test_compiled_blend_backward_takes_a_non_contiguous_gradient(
    request: pytest.FixtureRequest, kernels: str
) -> None:
    """The blend's output transposed downstream hands its backward a non-contiguous
    gradient; the backward op's fake must describe the contiguous tensor it returns, or
    Inductor's stride assertion fails the compiled backward."""
    request.getfixturevalue(kernels)
    torch._dynamo.reset()

    def loss(seed: torch.Tensor, host: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (alpha_blend(seed, host, 0.3).t() * w).sum()

    seed, host, w = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6), torch.randn(6, 4)
    torch.compile(loss, fullgraph=True)(seed, host, w).backward()
    torch.testing.assert_close(seed.grad, 0.3 * w.t())


@pytest.mark.parametrize("kernels", ["reference_backend", "triton_backend"])
def test_a_compiled_blend_takes_a_changing_float_alpha_without_recompiling(
    request: pytest.FixtureRequest, kernels: str
) -> None:
    """A float alpha ramped between calls (``step / warmup``) was guarded by value, as the
    custom op's float argument: one recompile per step, and past TorchDynamo's
    ``recompile_limit`` (8) a ``fullgraph`` compile raised. Now it is traced as an input: the
    frame compiles twice (the first call specialises), and each value blends as in eager."""
    request.getfixturevalue(kernels)
    torch._dynamo.reset()
    compiles: list[GraphModule] = []

    def counting(gm: GraphModule, example_inputs: list) -> object:
        compiles.append(gm)
        return gm.forward

    def step(seed: torch.Tensor, host: torch.Tensor, alpha: float) -> torch.Tensor:
        return alpha_blend(seed, host, alpha)

    compiled = torch.compile(step, fullgraph=True, backend=counting)
    g = torch.Generator().manual_seed(5)
    seed = torch.randn(3, 8, generator=g).bfloat16().requires_grad_()
    host = torch.randn(3, 8, generator=g).bfloat16()
    for alpha in (0.0, 0.1, 0.35, 0.6, 0.85, 1.0):
        out = compiled(seed, host, alpha)
        (got,) = torch.autograd.grad(out.float().square().sum(), seed)
        want_out = alpha_blend(seed, host, alpha)
        (want,) = torch.autograd.grad(want_out.float().square().sum(), seed)
        torch.testing.assert_close(out, want_out, atol=0, rtol=0)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert len(compiles) <= 2
    torch._dynamo.reset()


@pytest.mark.parametrize("kernels", ["reference_backend", "triton_backend"])
@pytest.mark.parametrize("reduction, masked", [("batchmean", True), ("none", False)])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # -inf lanes
def test_a_compiled_kd_loss_takes_a_changing_temperature_without_recompiling(
    request: pytest.FixtureRequest, kernels: str, reduction: str, masked: bool
) -> None:
    """A temperature schedule (a float changing between calls) was guarded by value, as the
    custom op's float argument: one recompile per value, and past TorchDynamo's
    ``recompile_limit`` (8) a ``fullgraph`` compile raised. Now it is traced as an input: the
    frame compiles twice (the first call specialises), the backward graph takes it as well,
    and each value gives eager's loss and gradient."""
    request.getfixturevalue(kernels)
    torch._dynamo.reset()
    graphs: list[GraphModule] = []

    def step(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        return kd_kl_loss(student, teacher, temperature, reduction, mask)

    compiled = torch.compile(step, fullgraph=True, backend=recording_backend(graphs))
    g = torch.Generator().manual_seed(6)
    student = torch.randn(3, 8, generator=g).requires_grad_()
    teacher = torch.randn(3, 8, generator=g)
    mask = torch.tensor([True, False, True]) if masked else None
    weights = torch.rand(3, generator=g)  # a per-row grad_output for "none"
    for temperature in (1.0, 0.7, 1.3, 2.0, 3.1, 4.5):
        out = compiled(student, teacher, temperature)
        (got,) = torch.autograd.grad((out * weights).sum(), student)
        want_out = kd_kl_loss(student, teacher, temperature, reduction, mask)
        (want,) = torch.autograd.grad((want_out * weights).sum(), student)
        torch.testing.assert_close(out, want_out, atol=0, rtol=0)
        torch.testing.assert_close(got, want)
    assert len(graphs) <= 4  # at most two compiles, each a forward and a backward graph
    assert "kasmina.kd_kl_loss_backward" in ops_in(graphs[-1])
    torch._dynamo.reset()


@pytest.mark.parametrize("kernels", ["reference_backend", "triton_backend"])
@pytest.mark.parametrize("where", ["FakeTensorMode", "meta"])
def test_every_op_gives_shapes_on_fake_and_meta_tensors(
    request: pytest.FixtureRequest, kernels: str, where: str
) -> None:
    """Shape propagation outside ``torch.compile`` (a ``FakeTensorMode``, as memory planners
    and export tooling run one; tensors on the ``meta`` device): the ops return their outputs'
    shapes and dtypes, forward and backward, and launch no kernel (a fake or meta tensor has
    no storage) nor read a value on the host; ``KASMINA_BACKEND=triton`` forces the kernels on
    CPU tensors only. (The lifecycle table's ops, whose results are data, run on fake tensors
    but not on meta ones.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kasmina.ops import fused_linear_kd_loss

    request.getfixturevalue(kernels)
    fake = where == "FakeTensorMode"
    with FakeTensorMode() if fake else torch.device("meta"):
        inputs = {k: v.to("cpu" if fake else "meta") for k, v in make_inputs().items()}
        for k in ("seed", "host", "alpha", "student", "weight"):
            inputs[k] = inputs[k].detach().requires_grad_()
        if fake:
            loss, norms, flag, clip, codes = training_step(**inputs)
            assert codes.shape == (4,)
        else:
            seed, host, student, weight = (inputs[k] for k in ("seed", "host", "student", "weight"))
            blended = alpha_blend(seed @ weight, host, inputs["alpha"])
            incubated = alpha_blend(seed, host, 0.0, mode="incubate")
            kd = kd_kl_loss(student @ weight, inputs["teacher"], temperature=2.0)
            loss = blended.square().mean() + incubated.sum() + kd
            norms, flag = leak_check([host, None, weight], tol=1e3)
            clip = grad_norms([seed, weight])
        fused = fused_linear_kd_loss(inputs["student"], inputs["weight"], inputs["teacher"])
        (loss + fused).backward()
        assert loss.shape == fused.shape == () and loss.dtype == torch.float32
        assert norms.shape == (3,) and flag.shape == () and flag.dtype == torch.bool
        assert clip.shape == (2,)
        for k in ("seed", "host", "alpha", "student", "weight"):
            assert inputs[k].grad.shape == inputs[k].shape, k


@pytest.mark.parametrize("kernels", ["reference_backend", "triton_backend"])
def test_a_mode_that_only_watches_sees_the_eager_path(
    request: pytest.FixtureRequest, kernels: str
) -> None:
    """A dispatch mode that neither traces nor fakes tensors (``FlopCounterMode``, a user's
    logging mode) changes nothing: the fused-linear op's GEMMs are counted, ``torch.func``
    runs the ops' Functions, and values equal those without the mode."""
    from torch.utils.flop_counter import FlopCounterMode

    from kasmina.ops import fused_linear_kd_loss

    request.getfixturevalue(kernels)
    h = torch.randn(4, 8, requires_grad=True)
    w, t = torch.randn(16, 8, requires_grad=True), torch.randn(4, 16)
    with FlopCounterMode(display=False) as counter:
        fused_linear_kd_loss(h, w, t, chunk_rows=2).backward()
    assert counter.get_total_flops() >= 2 * 2 * 4 * 8 * 16  # the GEMMs seen (was 0)
    s, a = torch.randn(3, 4), torch.tensor(0.3)
    blend = torch.func.grad(lambda s: alpha_blend(s, torch.zeros(3, 4), a).square().sum())
    kd = torch.func.grad(lambda s: kd_kl_loss(s, t[:3, :4], 2.0))
    want = blend(s), kd(s)
    with FlopCounterMode(display=False):
        got = blend(s), kd(s)
    for g, x in zip(got, want, strict=True):
        torch.testing.assert_close(g, x, rtol=0, atol=0)
