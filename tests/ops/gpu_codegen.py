"""Offline GPU code generation for every Triton kernel in ``kernels/``, without a GPU.

Run as ``python -m tests.ops.gpu_codegen [--arch 90 --arch 80]`` with ``TRITON_INTERPRET`` unset
or 0 (``tests/ops/test_ptxas.py`` does, in a subprocess). It prints one JSON object.

How the kernels and their arguments are found, generically:

1. Every module of ``kasmina.kernels`` is imported while the interpreter is off, so its
   ``@triton.jit`` functions are real ``JITFunction`` objects. The *kernels* are those not
   called by another JIT function of the same module (the rest are device helpers, compiled
   inline into their callers).
2. ``JITFunction.run`` (what ``kernel[grid](...)`` calls) is replaced by a recorder, the
   interpreter switch is turned back on for ``kasmina.ops.backend`` (which reads it per call),
   and the public ops run on small CPU tensors with ``KASMINA_BACKEND=triton``. Every launch the
   real launchers make is recorded with its real arguments; nothing executes, so the outputs
   hold garbage, which no launcher reads.
3. Each recorded launch is bound for the GPU target with Triton's own binder, so the signature,
   constexprs and specialisations (16-byte aligned pointers, ints divisible by 16, ints equal
   to 1) are the ones a real launch of those tensors would compile. For sm_90, the design's
   target, every distinct configuration is compiled (a spill in the fp16 variant of a kernel,
   or in one constexpr branch, is a spill in training); for other targets, per kernel, the
   first launch and the one whose constexprs differ most from it: one or two representatives.
4. The PTX goes through the ``ptxas`` Triton itself uses for that target with ``-v``, and the
   registers, spill stores/loads and stack frame are parsed from its report.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# The PTX load instructions of a kernel, to check vectorisation ("ld.global.v4.b32").
LOADS = re.compile(r"ld\.global[.\w]*")
# Targets that compile every distinct configuration the ops launch, not only representatives.
EVERY_CONFIGURATION = frozenset({90})


class NoToolchain(RuntimeError):
    """Triton's NVIDIA backend or its ptxas is not available here."""


@dataclass
class Launch:
    kernel: Any  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict


@dataclass
class Report:
    module: str
    kernel: str
    arch: int
    constexprs: dict[str, str]
    signature: dict[str, str]  # the runtime arguments' types ("*bf16" for a bf16 pointer)
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    loads: list[str] = field(default_factory=list)
    ptxas: str = ""


def _kernel_modules() -> list[str]:
    import kasmina.kernels as package

    return [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]


def jit_functions(module: Any) -> dict[str, Any]:
    """The ``@triton.jit`` functions defined in ``module``, by name."""
    from triton.runtime.jit import JITFunction

    return {
        name: obj
        for name, obj in vars(module).items()
        if isinstance(obj, JITFunction) and getattr(obj.fn, "__module__", None) == module.__name__
    }


def kernels_of(module: Any) -> dict[str, Any]:
    """The kernels of ``module``: its JIT functions that its own launchers launch.

    A launch is written ``name[grid](...)``; every other JIT function of the module is a device
    helper (called inline, or passed to ``tl.reduce`` as a combine function).
    """
    source = inspect.getsource(module)
    return {
        name: fn
        for name, fn in jit_functions(module).items()
        if re.search(rf"\b{re.escape(name)}\[", source)
    }


@contextmanager
def _recording() -> Iterator[list[Launch]]:
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    real_run = JITFunction.run

    def record(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        launches.append(Launch(self, args, kwargs))

    JITFunction.run = record  # type: ignore[method-assign]
    try:
        yield launches
    finally:
        JITFunction.run = real_run  # type: ignore[method-assign]


def _drive_ops() -> None:
    """Call every public fused op the way training does, on small CPU tensors: every dtype
    each op takes, and every branch its launchers specialise a kernel for."""
    import torch

    from kasmina.ops import (
        alpha_blend,
        grad_norms,
        kd_kl_loss,
        leak_check,
        lifecycle_tick,
        lifecycle_update,
    )
    from kasmina.stages import NUM_STATE_COLUMNS

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        seed = torch.randn(4, 96, generator=gen).to(dtype).requires_grad_(True)
        host = torch.randn(4, 96, generator=gen).to(dtype)
        for alpha in (0.3, torch.tensor(0.3, requires_grad=True), torch.rand(4).requires_grad_()):
            alpha_blend(seed, host, alpha).sum().backward()
        for alpha in (torch.tensor(0.3), torch.rand(4)):  # alpha without a gradient
            alpha_blend(seed, host, alpha).sum().backward()
    # An alpha of another dtype than the data's (its pointer is typed apart).
    seed = torch.randn(4, 96, generator=gen).requires_grad_(True)
    alpha_blend(seed, torch.randn(4, 96, generator=gen), torch.rand(4).bfloat16()).sum().backward()

    base = torch.randn(5000, generator=gen)
    tensors = [base, torch.randn(300, generator=gen).half(), torch.randn(77).bfloat16()]
    grad_norms(tensors)
    misaligned = [base[1:], base.half()[1:], base.bfloat16()[1:]]  # the scalar-load path
    leak_check([*tensors, *misaligned], 0.0)

    state = torch.zeros(16, NUM_STATE_COLUMNS, dtype=torch.int32)
    lifecycle_update(state, torch.tensor([1, 2]), torch.tensor([1, 1]))
    lifecycle_update(state, torch.tensor([3], dtype=torch.int32), [1], [2])
    i32 = torch.tensor([4, 5], dtype=torch.int32)  # int32 indices, stages and gates
    lifecycle_update(state, i32, torch.ones_like(i32), i32)
    lifecycle_tick(state)

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        student = torch.randn(6, 1000, generator=gen).to(dtype).requires_grad_(True)
        teacher = torch.randn(6, 1000, generator=gen).to(dtype)
        kd_kl_loss(student, teacher, 2.0, "batchmean").backward()
        mask = torch.tensor([True, False, True, True, False, True])
        kd_kl_loss(student, teacher, 1.0, "none", mask=mask).sum().backward()
        kd_kl_loss(student, teacher, 1.0, "batchmean", mask=mask).backward()  # device scale
        with torch.no_grad():  # an evaluation: no statistics for a backward
            kd_kl_loss(student, teacher, 1.0, "sum")
    # The production block (BLOCK_V = 2048, from V >= 2048) on an odd, shifted fp16 student
    # (rows not 16-byte aligned: the unaligned loads), per row with a grad_output (the scale).
    leaf = torch.randn(3, 2050, generator=gen).half().requires_grad_(True)
    teacher = torch.randn(3, 2049, generator=gen)
    go = torch.rand(3, generator=gen)
    kd_kl_loss(leaf[:, :-1], teacher, 2.0, "none").backward(go)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        student = torch.randn(2, 4096, generator=gen).to(dtype).requires_grad_(True)
        kd_kl_loss(student, torch.randn(2, 4096, generator=gen), 1.0, "batchmean").backward()
    # An expanded student gets a dense gradient whose rows are out of its phase: the scalar
    # stores (ALIGN_G off), at the production block, for each dtype.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        row = torch.randn(2049, generator=gen).to(dtype).requires_grad_(True)
        kd_kl_loss(row.expand(3, 2049), torch.randn(3, 2049, generator=gen), 1.0).backward()
    # A compiled kd_kl_loss passes its temperature as a 0-d float64 tensor: the kernels load
    # log2(e)/T and its factor from the device (DEVICE_PARAMS), for each dtype.
    from kasmina.kernels.kd_loss import kd_backward, kd_forward

    temperature = torch.tensor(2.0, dtype=torch.float64)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        student = torch.randn(6, 1000, generator=gen).to(dtype)
        teacher = torch.randn(6, 1000, generator=gen).to(dtype)
        loss, stats, scale = kd_forward(student, teacher, None, temperature, "batchmean", True)
        kd_backward(student, teacher, None, stats, scale, torch.ones(()), temperature, "batchmean")


def record_launches(drive: Callable[[], None] = _drive_ops) -> list[Launch]:
    """Import every kernel module with the interpreter off, then record ``drive``'s launches."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and "triton" in sys.modules:
        raise RuntimeError("run with TRITON_INTERPRET=0: the interpreter is already loaded")
    os.environ["TRITON_INTERPRET"] = "0"
    for name in _kernel_modules():
        importlib.import_module(name)
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "KASMINA_BACKEND")}
    # kasmina.ops.backend reads both per call; triton already made its JITFunctions.
    os.environ.update(TRITON_INTERPRET="1", KASMINA_BACKEND="triton")
    try:
        with _recording() as launches:
            drive()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return launches


def _bind(launch: Launch, target: Any) -> tuple[dict, dict, dict, Any]:
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` would compile."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    return signature, constexprs, attrs, options


def _constexpr_values(kernel: Any, constexprs: dict) -> dict[str, str]:
    names = [p.name for p in kernel.params]
    return {names[path[0]]: str(value) for path, value in constexprs.items() if len(path) == 1}


def _distinct(launches: list[Launch], target: Any) -> dict[Any, list[tuple[Launch, tuple]]]:
    """Per kernel, in launch order: each distinct bound configuration and its first launch."""
    by_kernel: dict[Any, list[tuple[Launch, tuple]]] = {}
    for launch in launches:
        bound = _bind(launch, target)
        configs = by_kernel.setdefault(launch.kernel, [])
        key = (repr(bound[0]), repr(bound[1]), repr(bound[2]))
        if all(key != (repr(b[0]), repr(b[1]), repr(b[2])) for _, b in configs):
            configs.append((launch, bound))
    return by_kernel


def configurations(launches: list[Launch], target: Any) -> list[tuple[Launch, tuple]]:
    """Every distinct configuration of every kernel."""
    return [config for configs in _distinct(launches, target).values() for config in configs]


def representatives(launches: list[Launch], target: Any) -> list[tuple[Launch, tuple]]:
    """Per kernel: its first configuration and the one differing most from it."""
    chosen = []
    for kernel, configs in _distinct(launches, target).items():
        first = _constexpr_values(kernel, configs[0][1][1])

        def distance(
            config: tuple[Launch, tuple], first: dict = first, kernel: Any = kernel
        ) -> int:
            values = _constexpr_values(kernel, config[1][1])
            return sum(values.get(k) != v for k, v in first.items())

        chosen.append(configs[0])
        if len(configs) > 1:
            chosen.append(max(configs[1:], key=distance))
    return chosen


def ptxas_path(arch: int) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as exc:
        raise NoToolchain(f"triton has no NVIDIA backend here ({exc})") from exc
    try:
        path = get_ptxas(arch).path
    except Exception as exc:  # a missing binary raises from inside the knob
        raise NoToolchain(f"Triton's ptxas for sm_{arch} is not available ({exc})") from exc
    if not path or not os.access(path, os.X_OK):
        raise NoToolchain(f"Triton's ptxas for sm_{arch} is not executable: {path!r}")
    return path


def ptxas_report(ptx: str, arch: int) -> tuple[str, dict[str, int]]:
    """Run ``ptxas -v`` on ``ptx`` for ``sm_<arch>`` (Triton's flags); parse its resource report."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w", encoding="utf-8") as f:
            f.write(ptx)
        cmd = [
            ptxas_path(arch),
            "-v",
            "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(arch)}",
            src,
            "-o",
            src + ".o",
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    log = run.stderr + run.stdout
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed ({run.returncode}):\n{log}")
    numbers = {
        "registers": re.search(r"Used (\d+) registers", log),
        "spill_stores": re.search(r"(\d+) bytes spill stores", log),
        "spill_loads": re.search(r"(\d+) bytes spill loads", log),
        "stack_frame": re.search(r"(\d+) bytes stack frame", log),
    }
    missing = [k for k, m in numbers.items() if m is None]
    if missing:
        raise RuntimeError(f"could not parse {missing} from the ptxas report:\n{log}")
    return log, {k: int(m.group(1)) for k, m in numbers.items() if m is not None}


def compile_all(archs: list[int]) -> dict[str, Any]:
    for arch in archs:
        ptxas_path(arch)  # fail early, with the reason, before any compile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = record_launches()
    kernels = {
        f"{name}.{kernel}": fn
        for name in _kernel_modules()
        for kernel, fn in kernels_of(sys.modules[name]).items()
    }
    reports = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        pick = configurations if arch in EVERY_CONFIGURATION else representatives
        for launch, (signature, constexprs, attrs, options) in pick(launches, target):
            src = ASTSource(
                fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs
            )
            compiled = triton.compile(src, target=target, options=options.__dict__)
            ptx = compiled.asm["ptx"]
            log, numbers = ptxas_report(ptx, arch)
            report = Report(
                module=launch.kernel.fn.__module__,
                kernel=launch.kernel.fn.__name__,
                arch=arch,
                constexprs=_constexpr_values(launch.kernel, constexprs),
                signature={k: v for k, v in signature.items() if v != "constexpr"},
                loads=sorted(set(LOADS.findall(ptx))),
                ptxas=log.strip(),
                **numbers,
            )
            logger.info(
                "sm_%d %s.%s: %d registers, %d/%d bytes spill stores/loads",
                arch,
                report.module,
                report.kernel,
                report.registers,
                report.spill_stores,
                report.spill_loads,
            )
            reports.append(asdict(report))
    return {"kernels": sorted(kernels), "reports": reports}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        result = compile_all(args.arch or [90, 80])
    except NoToolchain as exc:
        result = {"skip": str(exc)}
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
