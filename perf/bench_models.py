"""DORMANT overhead of Kasmina's slots on a tiny Hugging Face Llama, eager and compiled.

Targets (docs/design.md §8): a DORMANT slot adds <= 10 us to an eager forward, and a model with
DORMANT slots on every projection costs <= 1 % more per compiled training step than the bare
model. The bare model is measured in the same run, in paired rounds with the attached one (same
inputs, same thread count, order alternating; the percentage is the median of the per-round
ratios), so machine load hits both alike; the numbers are reported, never asserted. Run:
``.venv/bin/python perf/bench_models.py [--backend inductor|aot_eager]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from arguments import positive_int  # perf/ is sys.path[0] when run as a script
from paired import paired
from torch import nn

import kasmina

# Every projection of the tiny Llama, grouped by output width: two seeds of half of it each.
TARGETS = {
    32: ["q_proj", "o_proj", "down_proj"],
    16: ["k_proj", "v_proj"],
    64: ["gate_proj", "up_proj"],
}


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        use_cache=False,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


def interleaved(fns: dict[str, Callable[[], object]], number: int, repeat: int) -> dict[str, float]:
    """Median seconds per call of each function, measured in blocks whose order rotates every
    round (bare first, then slot first, ...), so neither side always runs warm after the other."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(number):
                fn()
            samples[name].append((time.perf_counter() - start) / number)
    return {name: statistics.median(values) for name, values in samples.items()}


def slot_forward(number: int, repeat: int) -> dict[str, float]:
    """One Linear(32, 32) on a [4, 32] batch, bare and as a slot with two DORMANT seeds."""
    torch.manual_seed(0)
    bare = nn.Linear(32, 32)
    slot = kasmina.KasminaLayer(copy.deepcopy(bare), 2, 16)
    x = torch.randn(4, 32)
    with torch.no_grad():
        return interleaved({"bare": lambda: bare(x), "slot": lambda: slot(x)}, number, repeat)


def train_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    # The parameters are listed once, as an optimizer holds them: walking ``model.parameters()``
    # every step would time the module tree (an attached model has four more modules per
    # slot, ~0.1 ms per step here), which no training loop with an optimizer pays.
    params = list(model.parameters())

    def step() -> None:
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
        loss.backward()
        for p in params:
            p.grad = None

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--repeat", type=positive_int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), backend {args.backend}")

    micro = slot_forward(number=2000, repeat=args.repeat)
    extra = (micro["slot"] - micro["bare"]) * 1e6
    print(
        f"eager forward, one Linear(32, 32) [4, 32]: bare {micro['bare'] * 1e6:.2f} us, "
        f"slot (2 DORMANT seeds) {micro['slot'] * 1e6:.2f} us: +{extra:.2f} us per slot "
        "(target <= 10 us)"
    )

    bare = tiny_llama()
    attached = tiny_llama()
    slots = [
        slot
        for width, names in TARGETS.items()
        for slot in kasmina.attach(attached, names, 2, width // 2)
    ]
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    n = len(slots)
    # The step rows: rounds of ~50 ms batches of each, order alternating, and the median of the
    # per-round ratios (perf/paired.py), which a load that drifts within a round hits alike.
    rounds = 3 * args.repeat
    steps = {"bare": train_step(bare, ids), "attached": train_step(attached, ids)}
    ours, peer, ratio = paired(steps["attached"], steps["bare"], rounds=rounds, batch_s=0.05)
    per_slot = (ours - peer) / n * 1e6
    print(
        f"eager training step, tiny Llama [4, 32] tokens, {n} DORMANT slots: bare "
        f"{peer * 1e3:.3f} ms, attached {ours * 1e3:.3f} ms "
        f"({(ratio - 1) * 100:+.2f} %, {per_slot:+.2f} us per slot)"
    )

    compiled = {
        name: train_step(torch.compile(model, backend=args.backend, fullgraph=True), ids)
        for name, model in (("bare", bare), ("attached", attached))
    }
    start = time.perf_counter()
    for step in compiled.values():
        for _ in range(3):  # compile and warm up
            step()
    print(f"compiled both (forward and backward) in {time.perf_counter() - start:.1f} s")
    ours, peer, ratio = paired(compiled["attached"], compiled["bare"], rounds=rounds, batch_s=0.05)
    print(
        f"compiled training step ({args.backend}, fullgraph), {n} DORMANT slots: bare "
        f"{peer * 1e3:.3f} ms, attached {ours * 1e3:.3f} ms "
        f"({(ratio - 1) * 100:+.2f} %; target <= 1 %)"
    )


if __name__ == "__main__":
    main()
