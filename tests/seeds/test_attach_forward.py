"""The forward of a KasminaLayer with seeds in mixed stages: the dormant fast path, four seeds in
four stages in one forward (and their gradients), KD that trains the isolated seeds only (and a
teacher that does not fit a call), a non-finite seed falling back per chunk, forward-mode AD;
tracing (fx, jit) and torch.compile (no recompiles, guards on slot-local values only, every
table change followed, KD under dynamic shapes, a kernel that breaks the graph)."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn

import kasmina.ops.kd_loss
import kasmina.seeds.layer
from kasmina.kd.config import KDConfig
from kasmina.ops.alpha_blend import seed_blend
from kasmina.seeds.inject import attach, collect_kd_losses
from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import SeedStage
from tests.seeds.helpers import MLP, PATH, S, _grafting, kernel, walk


def test_dormant_fast_path_returns_the_host_output_itself() -> None:
    host = nn.Linear(3, 4)
    out = torch.randn(2, 4)
    host.forward = lambda _x: out  # type: ignore[method-assign]
    layer = KasminaLayer(host, 2, 2)
    layer.seed(0).attach_kernel(nn.Linear(2, 2))  # a kernel alone does not run while DORMANT
    assert layer(torch.randn(2, 3)) is out


def test_an_fx_trace_before_the_first_forward_records_nothing() -> None:
    """``torch.fx.symbolic_trace`` runs the forward on proxies: the slot records its contract
    at the first real forward, as if the trace had not happened."""
    model = MLP()
    (slot,) = attach(model, ["head"], 2, 4)
    torch.fx.symbolic_trace(model)
    assert slot.output_contract is None and slot.input_spec is None
    model(torch.randn(3, 5))
    assert slot.contract_problem() is None and slot.chunk_spec()[0] == (3, 4)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_jit_trace_before_the_first_forward_passes_its_check(mode: str) -> None:
    """``torch.jit.trace`` with its default check traces twice and compares: the slot recorded
    its contract in the first pass only, the graphs differed and the trace raised on a freshly
    attached model with every seed DORMANT. A trace records nothing (an eager forward does:
    the check's own, here), so the check passes and the traced model is the bare one's."""
    model, bare = MLP(), MLP()
    (slot,) = attach(model, ["head"], 2, 4)
    getattr(model, mode)(), getattr(bare, mode)()
    x = torch.randn(3, 5)
    with torch.no_grad() if mode == "eval" else contextlib.nullcontext():
        traced = torch.jit.trace(model, (x,))
    torch.testing.assert_close(traced(x), bare(x), rtol=0, atol=0)
    model(x)
    assert slot.contract_problem() is None and slot.chunk_spec()[0] == (3, 4)


@pytest.mark.parametrize("stage", [SeedStage.GRAFTING, SeedStage.STABILIZATION])
def test_jit_trace_of_a_blending_seed_matches_eager(stage: SeedStage) -> None:
    """``torch.jit.trace`` takes the per-op path (the one-node graft cannot be traced). Traced
    under ``no_grad`` (the usual way for inference), the blend recorded ``lerp(out=...)``,
    which the traced model then ran with grad and autograd refused."""
    model = MLP()
    (slot,) = attach(model, ["head"], 2, 4)
    x = torch.randn(3, 5)
    model(x)
    seed = slot.seeds[0]
    seed.attach_kernel(kernel(4, 1))
    walk(seed, stage)
    slot.update_alpha_blending(3, 10)
    with warnings.catch_warnings():  # the tracer's notes on Python values it bakes in
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, (x,), check_trace=False)
        with torch.no_grad():
            for_inference = torch.jit.trace(model, (x,), check_trace=False)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    out = for_inference(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    out.sum().backward()


def four_stage_layer(kd: KDConfig | None = None) -> tuple[KasminaLayer, torch.Tensor]:
    torch.manual_seed(5)
    layer = KasminaLayer(nn.Linear(6, 8), 4, 2, kd_config=kd)
    for k, stage in enumerate([S.ISOLATED_INIT, S.GRAFTING, S.STABILIZATION, S.ACTIVE]):
        layer.seed(k).attach_kernel(kernel(2, 10 + k))
        walk(layer.seed(k), stage)
    layer.update_alpha_blending(3, 10, 2.0)
    return layer, torch.randn(3, 6)


def test_four_seeds_in_four_stages_in_one_forward(monkeypatch) -> None:
    layer, x = four_stage_layer()
    calls = []

    def counting_blend(*args, **kwargs):
        calls.append(args[2])
        return seed_blend(*args, **kwargs)

    monkeypatch.setattr(kasmina.seeds.layer, "seed_blend", counting_blend)
    w = torch.randn(3, 8)
    out = layer(x)
    (out * w).sum().backward()
    assert len(calls) == 1 and calls[0].shape == (4,)  # one blend, per-chunk alpha

    weight = layer.host.weight.detach().clone().requires_grad_()
    bias = layer.host.bias.detach().clone().requires_grad_()
    h = nn.functional.linear(x, weight, bias)
    k = [layer.seed(i).kernel for i in range(4)]
    a = layer.seed(1).alpha_value
    hc = h.split(2, dim=-1)
    ref = torch.cat(
        [
            hc[0],
            a * k[1](hc[1].detach()) + (1 - a) * hc[1].detach(),
            k[2](hc[2].detach()),
            k[3](hc[3]),
        ],
        dim=-1,
    )
    torch.testing.assert_close(out, ref)
    assert torch.equal(out[:, :2], h[:, :2])  # ISOLATED_INIT: exactly the host value
    (ref * w).sum().backward()
    grad = layer.host.weight.grad
    assert torch.equal(grad[:2], weight.grad[:2])  # host gradient as without the seed
    assert not grad[2:6].any()  # GRAFTING and STABILIZATION: nothing reaches the host
    torch.testing.assert_close(grad[6:], weight.grad[6:])  # ACTIVE: end to end
    assert grad[6:].abs().sum() > 0
    for i in range(4):
        assert all(
            p.grad is not None and p.grad.abs().sum() > 0 for p in layer.seed(i).seed_parameters()
        )
    # the ISOLATED_INIT seed learns from the same downstream gradient the host gets
    k0 = copy.deepcopy(k[0])
    k0.zero_grad(set_to_none=True)
    (k0(h[:, :2].detach()) * w[:, :2]).sum().backward()
    for p, q in zip(layer.seed(0).seed_parameters(), k0.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_layer_kd_trains_only_the_isolated_seeds() -> None:
    layer, x = four_stage_layer(KDConfig(temperature=1.5))
    model = nn.Sequential(layer)
    teacher = torch.randn(3, 8)
    layer.set_teacher_logits(teacher)
    model(x)
    loss = collect_kd_losses(model)
    assert loss is not None and collect_kd_losses(model) is None
    loss.backward()
    assert layer.host.weight.grad is None and layer.host.bias.grad is None
    for i in range(3):
        assert all(p.grad.abs().sum() > 0 for p in layer.seed(i).seed_parameters())
    assert all(p.grad is None for p in layer.seed(3).seed_parameters())  # ACTIVE: no KD
    layer(x, teacher_logits=teacher)
    assert layer.get_and_clear_kd_losses() is not None


class Loop(nn.Module):
    """One cell per token ``[B, T, F]``, then on the pooled ``[B, F]``: a module called twice
    with two shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cell(self.cell(x).mean(1))


def test_a_teacher_that_does_not_fit_a_call_skips_its_kd_not_the_step(caplog) -> None:
    model = Loop()
    (slot,) = attach(model, ["cell"], 2, 2, kd_config=KDConfig(temperature=2.0))
    model(torch.randn(3, 5, 4))
    for k in range(2):
        slot.seed(k).attach_kernel(kernel(2, k))
        walk(slot.seed(k), S.GRAFTING)
    slot.set_teacher_logits(torch.randn(3, 4))  # the model's output's shape: the second call's
    model(torch.randn(3, 5, 4)).sum().backward()
    kd = collect_kd_losses(model)  # the first call sits out and leaves them to the second
    assert kd is not None and kd.requires_grad and slot.sat_out == {"kd": 1}
    assert [seed.faults for seed in slot.seeds] == [0, 0]
    assert "teacher logits (3, 4) do not fit (3, 5, 4)" in caplog.text
    # Refused here, not in a forward: integers, and the layouts a dtype check let through
    # (sparse logits failed in the KD op's reduction, inside the user's forward).
    dense = torch.randn(3, 5, 4)
    nested = torch.nested.nested_tensor([torch.randn(5, 4), torch.randn(2, 4)])
    refused = [torch.randint(0, 4, (3, 4)), dense.to_sparse(), dense[0].to_sparse_csr(), nested]
    refused.append(dense.to(torch.float8_e4m3fn))  # floating point, but no KD op reads it
    whys = ["int64", "sparse_coo", "sparse_csr", "nested", "float8_e4m3fn"]
    for bad, why in zip(refused, whys, strict=True):
        with pytest.raises(ValueError, match=f"dense floating-point tensor, got .*{why}"):
            slot.set_teacher_logits(bad)
    # Logits handed to the call itself were never checked: anything else sits out, counted.
    for bad in (dense.to_sparse(), dense.long(), [1.0]):
        model.cell(torch.randn(3, 5, 4), teacher_logits=bad).sum().backward()
    assert slot.sat_out == {"kd": 4}  # (only the first sit-out of a kind is logged)
    slot.set_teacher_logits(torch.randn(3, 5, 4, dtype=torch.float64))  # read in fp32
    model(torch.randn(3, 5, 4)).sum().backward()
    assert collect_kd_losses(model).dtype == torch.float32


def test_non_finite_seed_in_a_layer_falls_back_per_chunk() -> None:
    layer, x = four_stage_layer()
    with torch.no_grad():
        layer.seed(1).kernel[0].weight.fill_(float("nan"))
        expected_chunk = layer.host(x)[:, 2:4]
    for _ in range(layer.seed(1).fault_limit):
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        assert torch.equal(out[:, 2:4], expected_chunk) and torch.isfinite(out).all()
        out.sum().backward()
        assert not layer.host.weight.grad[2:4].any()
        assert layer.poll_nonfinite() == ["layer[1]"]
    assert layer.seed(1).faults == layer.seed(1).fault_limit
    assert layer.stages() == [S.ISOLATED_INIT, S.QUARANTINE, S.STABILIZATION, S.ACTIVE]
    assert layer.poll_nonfinite() == []


def test_compiled_host_with_a_grafting_seed_runs_without_recompiling() -> None:
    torch._dynamo.reset()
    model, slot = _grafting(kernel_seed=1, step=2)
    x = torch.randn(4, 5)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    assert slot.seed(0).seed_parameters()[0].grad is not None
    compiled(x)  # the first call recorded the slot's output: this one recompiles, once
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    slot.update_alpha_blending(8, 10)  # alpha is a device buffer: no recompile
    torch.testing.assert_close(compiled(x), model(x))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


def test_a_compiled_forward_whose_kd_sits_out_at_every_call_compiles_once() -> None:
    """Counting a sit-out in a compiled forward (``sat_out[what] += 1``) guarded the graph on
    the count's value: every step recompiled, and ``fullgraph=True`` raised at the limit. The
    count of a compiled call goes to a device tensor, ``sat_out_compiled``."""

    torch._dynamo.reset()
    model = Loop()
    (slot,) = attach(model, ["cell"], 2, 2, kd_config=KDConfig(temperature=2.0))
    x = torch.randn(3, 5, 4)
    model(x)
    for k in range(2):
        slot.seed(k).attach_kernel(kernel(2, k))
        walk(slot.seed(k), S.GRAFTING)
    compiled = torch.compile(model, fullgraph=True)

    def step() -> None:  # logits shaped like the model's output: the first call's KD sits out
        slot.set_teacher_logits(torch.randn(3, 4))
        compiled(x).sum().backward()
        assert collect_kd_losses(model) is not None  # the second call's, which they fit

    for _ in range(2):
        step()
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(9):  # past the recompile limit (8)
        step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    assert slot.sat_out_compiled.tolist() == [0, 11] and slot.sat_out == {}


def test_teacher_logits_made_under_inference_mode_train_a_compiled_forward() -> None:
    """A teacher run under ``torch.inference_mode()`` hands over inference tensors, which
    autograd refuses to save: the eager op copies them, but the compiled forward (which cannot)
    raised from inside the user's model. The hand-over copies them out of inference mode, and
    the compiled KD loss equals the eager one."""
    torch._dynamo.reset()
    model = MLP()
    (slot,) = attach(model, ["head"], 1, 8, kd_config=KDConfig(temperature=2.0))
    x = torch.randn(3, 5)
    model(x)
    slot.seed(0).attach_kernel(kernel(8, 0))
    walk(slot.seed(0), S.GRAFTING)
    with torch.inference_mode():
        teacher = torch.randn(3, 8)
    losses = []
    for forward in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        slot.set_teacher_logits(teacher)
        out = forward(x)
        kd = collect_kd_losses(model)
        assert kd is not None
        (out.sum() + kd).backward()
        losses.append(kd.detach())
    torch.testing.assert_close(losses[1], losses[0])
    assert teacher.is_inference()  # the caller's tensor is left as it was


def _guards(model: nn.Module) -> str:
    """The guards of the newest compiled entry of ``model``'s forward."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    entries = _debug_get_cache_entry_list(type(model).forward.__code__)
    return str(entries[0].guard_manager)


def test_a_compiled_dormant_slot_is_guarded_on_slot_local_values_only() -> None:
    """Issue #13: the compiled forward reads neither the shared table nor the seeds, so no
    Python aliasing guard (one per path to the one table, ~2 us each per call) is installed."""
    x = torch.randn(4, 5)
    guards = {}
    for name in ("bare", "attached"):
        torch._dynamo.reset()
        model = MLP()
        if name == "attached":
            attach(model, ["encoder.0", "encoder.2", "head"], 2, 4)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        for _ in range(2):  # the second call drops the recording graph
            compiled(x).sum().backward()
        guards[name] = _guards(model)
    attached = guards["attached"]
    assert "state_table" not in attached and "_modules['seeds']" not in attached
    assert attached.count("LAMBDA_GUARD") == guards["bare"].count("LAMBDA_GUARD")


def test_a_compiled_slot_follows_every_kind_of_table_change() -> None:
    """The slot's plan is a snapshot the table refreshes on every change (transition, kernel
    attached, row restored, table loaded), so a compiled graph never runs a stale stage."""
    torch._dynamo.reset()
    model = MLP()
    slot = attach(model, "head", 2, 4)[0]
    x = torch.randn(4, 5)
    compiled = torch.compile(model, fullgraph=True, backend="eager")

    def check() -> None:
        torch.testing.assert_close(compiled(x), model(x))

    check()
    slot.seed(0).attach_kernel(kernel(4, 3))
    check()
    saved = slot.state_table.state_dict()  # all DORMANT
    walk(slot.seed(0), S.GRAFTING)
    slot.update_alpha_blending(5, 10)
    assert not torch.equal(compiled(x), slot.host(torch.relu(model.encoder(x))))
    check()
    row = slot.state_table.read_row(0)
    slot.state_table.load_state_dict(saved)  # back to DORMANT without a transition
    assert slot._runs_any is False
    check()
    slot.state_table.restore_row(0, list(row.values()))  # GRAFTING again
    assert slot._stage_codes == (int(S.GRAFTING), int(S.DORMANT))
    check()
    slot.seed(0).transition_to(S.HARVESTING)  # the kernel is released
    assert slot.seed(0).kernel is None and slot._runs_any is False
    check()


@pytest.mark.parametrize("breaking", [False, True], ids=["kd", "a-graph-break-in-kd"])
def test_a_dynamic_compile_with_kd_follows_a_stage_change(monkeypatch, breaking: bool) -> None:
    """Under ``dynamic=True`` a KD step's temperature is a SymFloat: its check must not break
    the graph, and wherever a graph break puts ``_graft`` in a frame of its own, that frame is
    guarded on the stages, so GRAFTING never runs ISOLATED_INIT's graph."""
    torch._dynamo.reset()
    if breaking:  # any graph break under the slot's method makes it a frame of its own
        check = kasmina.ops.kd_loss._check

        def breaking_check(*args, **kwargs) -> None:
            torch._dynamo.graph_break()
            check(*args, **kwargs)

        monkeypatch.setattr(kasmina.ops.kd_loss, "_check", breaking_check)

    def build() -> tuple[nn.Module, KasminaLayer]:
        model = MLP()
        (slot,) = attach(model, "head", 2, 4, kd_config=KDConfig(temperature=2.0))
        slot.seed(0).attach_kernel(kernel(4, 1))
        walk(slot.seed(0), S.ISOLATED_INIT)
        return model, slot

    x, teacher = torch.randn(6, 5), torch.randn(6, 8)
    runs = {}
    for mode in ("eager", "compiled"):
        model, slot = build()
        run = (
            torch.compile(model, dynamic=True, backend="aot_eager") if mode == "compiled" else model
        )
        grads = []
        for stage in (S.ISOLATED_INIT, S.GRAFTING):
            if stage is S.GRAFTING:
                for step in (S.COMPATIBILITY_CHECK, S.GRAFTING):
                    slot.seed(0).transition_to(step)
                slot.update_alpha_blending(3, 10)
            model.zero_grad(set_to_none=True)
            slot.set_teacher_logits(teacher)
            out = run(x)
            (out.square().mean() + collect_kd_losses(model)).backward()
            grads.append(
                [p.grad.clone() for p in (slot.host.bias, *slot.seed(0).seed_parameters())]
            )
        runs[mode] = grads
    for eager, compiled in zip(runs["eager"], runs["compiled"], strict=True):
        for a, b in zip(eager, compiled, strict=True):
            torch.testing.assert_close(b, a)


@pytest.mark.parametrize("stage", [SeedStage.GRAFTING, SeedStage.STABILIZATION])
def test_forward_mode_ad_through_a_blending_seed_gives_the_jacobian(stage: SeedStage) -> None:
    """Forward mode through a blending seed raised ``NotImplementedError`` (the guard node's
    and the blend op's deliberate refusal). Now ``forward_ad`` (the eager guard node),
    ``torch.func.jvp`` and ``jacfwd`` (the per-op path) give the Jacobian autograd gives."""
    import torch.autograd.forward_ad as fwAD

    model = MLP()
    (slot,) = attach(model, ["head"], 2, 4)
    model(torch.randn(3, 5))
    slot.seed(0).attach_kernel(kernel(4, 0))
    walk(slot.seed(0), stage)
    slot.update_alpha_blending(3, 10)
    x, v = torch.randn(3, 5), torch.randn(3, 5)
    jac = torch.autograd.functional.jacobian(model, x)  # [3, 8, 3, 5]
    want = torch.einsum("ijkl,kl->ij", jac, v)
    with fwAD.dual_level():
        dual = fwAD.unpack_dual(model(fwAD.make_dual(x, v)))
    torch.testing.assert_close(dual.tangent, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.func.jvp(model, (x,), (v,))[1], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.func.jacfwd(model)(x), jac, rtol=1e-5, atol=1e-6)


class _Breaking(nn.Module):
    """A kernel TorchDynamo cannot trace whole (a print, an ``.item()``): a graph break."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return torch.tanh(self.lin(x))


def test_a_compiled_slot_whose_kernel_breaks_the_graph_follows_every_stage_change() -> None:
    """A graph break in a kernel, inside the slot's loop over its seeds, made TorchDynamo skip
    the slot's graft and compile each function it calls as a frame of its own, on guards that
    missed a stage change: with seed 0 ACTIVE, seed 1 kept its ISOLATED_INIT graph in GRAFTING
    (never blended in, and the host's gradient through it). Such a call runs eager now."""
    torch._dynamo.reset()
    model = MLP()
    slot = attach(model, "head", 2, 4)[0]
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    model(x)
    for k in range(2):
        slot.seed(k).attach_kernel(_Breaking(k))
    walk(slot.seed(0), SeedStage.ACTIVE)
    compiled = torch.compile(model, backend="aot_eager")
    for stage in PATH:
        slot.seed(1).transition_to(stage)
        slot.update_alpha_blending(5, 10)
        results = []
        for run in (model, compiled):
            model.zero_grad(set_to_none=True)
            out = run(x)
            out.square().sum().backward()
            results.append((out.detach(), [p.grad for p in model.parameters()]))
        (eager, grads), (got, got_grads) = results
        torch.testing.assert_close(got, eager, msg=stage.name)
        for grad, got_grad in zip(grads, got_grads, strict=True):
            assert (grad is None) == (got_grad is None), stage.name
            if grad is not None:
                torch.testing.assert_close(got_grad, grad, msg=stage.name)
