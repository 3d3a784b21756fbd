"""``kasmina.utils.modules.eager_compiles``: the process's one "force_eager" stance, shared by
the blocks under way (a measurement's, on any thread), put back by the last one out."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
import torch._dynamo.eval_frame as eval_frame

from kasmina.utils.modules import eager_compiles


def _stance() -> str:
    return eval_frame._stance.stance


def test_a_block_runs_compiled_code_eagerly_and_puts_the_stance_back() -> None:
    """Inside the block the stance is "force_eager" (a compiled function runs its Python);
    after it, the stance the block found, also when the block raised."""
    calls: list[int] = []

    def backend(gm: torch.fx.GraphModule, _inputs: list[torch.Tensor]):  # counts compilations
        calls.append(1)
        return gm.forward

    compiled = torch.compile(lambda x: x * 2 + 1, backend=backend)
    assert _stance() == "default"
    with eager_compiles():
        assert _stance() == "force_eager"
        assert torch.equal(compiled(torch.ones(2)), torch.full((2,), 3.0))
    assert not calls  # nothing compiled inside
    assert _stance() == "default"
    with pytest.raises(KeyError), eager_compiles():
        raise KeyError("a measurement's loss raised")
    assert _stance() == "default"
    with eager_compiles():  # a block after a raised one sets the stance anew
        assert _stance() == "force_eager"
    assert _stance() == "default"


def test_overlapping_blocks_share_the_stance_until_the_last_is_out() -> None:
    """The first in sets it; the first out (before the second) leaves it; the last out puts
    back the stance the first found, not "force_eager" (each block's own ``set_stance`` kept
    what it found, so the second out put "force_eager" back)."""
    torch.compiler.set_stance("eager_on_recompile")
    try:
        first, second = eager_compiles(), eager_compiles()
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert _stance() == "force_eager"  # the second block is still under way
        second.__exit__(None, None, None)
        assert _stance() == "eager_on_recompile"
    finally:
        torch.compiler.set_stance("default")


def test_blocks_on_two_threads_interleaved_leave_the_stance_as_found() -> None:
    """A block on a thread, another entered meanwhile on a second thread and left after the
    first: the stance is "force_eager" while either is under way and back after both."""
    second_in, first_out = threading.Event(), threading.Event()
    seen: list[str] = []

    def second() -> None:
        with eager_compiles():
            second_in.set()
            assert first_out.wait(30)
            seen.append(_stance())

    with contextlib.ExitStack() as stack:
        stack.enter_context(eager_compiles())
        thread = threading.Thread(target=second)
        thread.start()
        assert second_in.wait(30)
    first_out.set()
    thread.join(30)
    assert not thread.is_alive()
    assert seen == ["force_eager"]
    assert _stance() == "default"
