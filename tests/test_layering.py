"""The import rules of ``tests/import_rules.py`` held: first the checker against synthetic trees,
one per kind of violation (so it is known to catch each), then the real tree, then what importing
kasmina costs a controller; last, the package docstrings, design citations and telemetry events
that docs/design.md §1 lists."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.import_rules import (
    CYCLE,
    IMPORT_LIGHT,
    KERNELS,
    KERNELS_NAME,
    KERNELS_ONLY_OPS,
    LAYERING,
    LAZY_KERNELS,
    LAZY_TRITON,
    ORDER,
    OWN_INIT,
    PACKAGE,
    PRIVATE_MODULE,
    PRIVATE_NAME,
    PUBLIC_PATH,
    REEXPORT,
    ROOT,
    TWO_PATHS,
    UNKNOWN_MODULE,
    UNKNOWN_NAME,
    Violation,
    check_imports,
)

# -- the checker catches what it should -------------------------------------------------------

_BASE = {
    "kasmina.errors": "class KasminaError(Exception):\n    pass\n",
    "kasmina.stages": "from enum import IntEnum\n\nclass SeedStage(IntEnum):\n    DORMANT = 0\n",
    "kasmina.utils.telemetry": "def emit(event):\n    return event\n",
    "kasmina.ops.backend": "def use_triton():\n    return False\n\n"
    "def _private_helper():\n    pass\n",
    "kasmina.kernels.alpha_blend": "import triton\n\ndef launch(x):\n    return x\n",
    "kasmina.kd.config": "class KDConfig:\n    pass\n",
    "kasmina.seeds.seed": "class Seed:\n    pass\n\ndef _stage_of(seed):\n    return 0\n",
    "kasmina.urza.client": "class Client:\n    pass\n",
    "kasmina.manager.config": "class KasminaConfig:\n    pass\n",
    "kasmina.cli.main": "def main():\n    return 0\n",
}


def _case(extra: Mapping[str, str] | None = None, **modules: str) -> dict[str, str]:
    """The clean base plus ``modules`` (keyword ``a__b__c`` is module ``a.b.c``)."""
    sources = dict(_BASE)
    named = {k.replace("__", "."): v for k, v in modules.items()}
    for module, source in {**named, **(extra or {})}.items():
        sources[module] = textwrap.dedent(source)
    return sources


def _pkg(sources: Mapping[str, str]) -> set[str]:
    packages = {PACKAGE}
    for module in sources:
        parts = module.split(".")
        packages.update(".".join(parts[:i]) for i in range(2, len(parts)))
    return packages


CLEAN = _case(
    {"kasmina.__main__": "import sys\nfrom kasmina.cli.main import main\nsys.exit(main())\n"},
    kasmina="""
        '''Lazy namespace.'''
        from __future__ import annotations
        import importlib
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from kasmina.seeds.seed import Seed
        _PUBLIC = {"Seed": "kasmina.seeds.seed", "KasminaConfig": "kasmina.manager.config"}
    """,
    kasmina__ops="from kasmina.ops.alpha_blend import alpha_blend\n__all__ = ['alpha_blend']\n",
    kasmina__ops__alpha_blend="""
        from kasmina.ops.backend import _private_helper, use_triton
        from kasmina.stages import SeedStage
        from kasmina.utils import telemetry
        from . import backend
        __all__ = ["alpha_blend"]
        def alpha_blend(x):
            if use_triton():
                from kasmina.kernels import alpha_blend as kernels
                return kernels.launch(x)
            return x
    """,
    kasmina__seeds__layer="""
        from typing import TYPE_CHECKING
        import torch
        from kasmina.errors import KasminaError
        from kasmina.kd.config import KDConfig
        from kasmina.ops import alpha_blend
        from .seed import Seed, _stage_of
        if TYPE_CHECKING:
            from kasmina.utils.telemetry import emit
        class Layer(torch.nn.Module):
            pass
    """,
    kasmina__manager__manager="""
        import importlib
        from kasmina.manager.config import KasminaConfig
        from kasmina.seeds.seed import Seed
        from kasmina.urza.client import Client
        def load():
            return importlib.import_module("kasmina.seeds.layer")
    """,
    kasmina__cli__urza="from kasmina.cli.main import main\nfrom kasmina.manager import manager\n",
    # Tests and benchmarks: the public path, a package's own re-export, a defining module (a
    # private name too), a helper of their own, a module by name.
    tests__seeds__test_layer="""
        import importlib
        import kasmina
        from kasmina import Seed
        from kasmina.ops import alpha_blend
        from kasmina.seeds.seed import _stage_of
        from tests.seeds.helpers import make_layer
        from . import helpers
        def load():
            return importlib.import_module("kasmina.seeds.layer")
    """,
    perf__bench_ops="""
        from arguments import positive_int
        from kasmina.ops.backend import use_triton
    """,
)

BAD_CASES = {
    "ops imports manager": (
        _case(kasmina__ops__bad="from kasmina.manager.config import KasminaConfig\n"),
        ("kasmina.ops.bad", "kasmina.manager.config.KasminaConfig", LAYERING),
    ),
    "relative import upward": (
        _case(kasmina__ops__bad="from ..manager import config\n"),
        ("kasmina.ops.bad", "kasmina.manager.config", LAYERING),
    ),
    "seeds imports urza": (
        _case(kasmina__seeds__x="import kasmina.urza.client\n"),
        ("kasmina.seeds.x", "kasmina.urza.client", LAYERING),
    ),
    "under TYPE_CHECKING": (
        _case(
            kasmina__kd__x="""
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from kasmina.seeds.seed import Seed
            """
        ),
        ("kasmina.kd.x", "kasmina.seeds.seed.Seed", LAYERING),
    ),
    "inside a function": (
        _case(
            kasmina__utils__x="""
                def f():
                    from kasmina.ops import backend
                    return backend
            """
        ),
        ("kasmina.utils.x", "kasmina.ops.backend", LAYERING),
    ),
    "import_module literal": (
        _case(
            kasmina__kd__x="""
                import importlib
                def f():
                    return importlib.import_module("kasmina.manager.config")
            """
        ),
        ("kasmina.kd.x", "kasmina.manager.config", LAYERING),
    ),
    "stages imports errors": (
        _case(kasmina__stages="from kasmina.errors import KasminaError\n"),
        ("kasmina.stages", "kasmina.errors.KasminaError", LAYERING),
    ),
    "leyline imports utils": (
        _case(kasmina__leyline__regen="from kasmina.utils.telemetry import emit\n"),
        ("kasmina.leyline.regen", "kasmina.utils.telemetry.emit", LAYERING),
    ),
    "imports the top namespace": (
        _case(kasmina__utils__x="import kasmina\n"),
        ("kasmina.utils.x", "kasmina", LAYERING),
    ),
    "unit outside the order": (
        _case(kasmina__extras="from kasmina.errors import KasminaError\n"),
        ("kasmina.extras", "kasmina.errors.KasminaError", LAYERING),
    ),
    "seeds imports kernels": (
        _case(
            kasmina__seeds__x="""
                def f():
                    from kasmina.kernels.alpha_blend import launch
            """
        ),
        ("kasmina.seeds.x", "kasmina.kernels.alpha_blend.launch", KERNELS_ONLY_OPS),
    ),
    "kernels import kasmina": (
        _case(kasmina__kernels__lifecycle="from kasmina.stages import SeedStage\n"),
        ("kasmina.kernels.lifecycle", "kasmina.stages.SeedStage", KERNELS_ONLY_OPS),
    ),
    "ops imports kernels eagerly": (
        _case(kasmina__ops__x="from kasmina.kernels.alpha_blend import launch\n"),
        ("kasmina.ops.x", "kasmina.kernels.alpha_blend.launch", LAZY_KERNELS),
    ),
    "triton outside kernels": (
        _case(kasmina__ops__x="import triton\n"),
        ("kasmina.ops.x", "triton", LAZY_TRITON),
    ),
    "kernels by their source name": (
        _case(kasmina__ops__x="def f():\n    import kernels.alpha_blend\n"),
        ("kasmina.ops.x", "kernels.alpha_blend", KERNELS_NAME),
    ),
    "root imports torch eagerly": (
        _case(kasmina="import torch\n"),
        ("kasmina", "torch", IMPORT_LIGHT),
    ),
    "root imports kasmina eagerly": (
        _case(kasmina="from kasmina.seeds.seed import Seed\n"),
        ("kasmina", "kasmina.seeds.seed.Seed", IMPORT_LIGHT),
    ),
    "lazy table names a missing module": (
        _case(kasmina='_PUBLIC = {"Seed": "kasmina.seed"}\n'),
        ("kasmina", "kasmina.seed.Seed", UNKNOWN_MODULE),
    ),
    "lazy table names a module that imported the name": (
        _case(
            kasmina='_PUBLIC = {"Seed": "kasmina.seeds.x"}\n',
            kasmina__seeds__x="from kasmina.seeds.seed import Seed\n",
        ),
        ("kasmina", "kasmina.seeds.x.Seed", TWO_PATHS),
    ),
    "package re-exports a name of the lazy table": (
        _case(
            kasmina='_PUBLIC = {"Seed": "kasmina.seeds.seed"}\n',
            kasmina__seeds="from kasmina.seeds.seed import Seed\n__all__ = ['Seed']\n",
        ),
        ("kasmina.seeds", "kasmina.seeds.seed.Seed", PUBLIC_PATH),
    ),
    "private name across packages": (
        _case(kasmina__seeds__x="from kasmina.ops.backend import _private_helper\n"),
        ("kasmina.seeds.x", "kasmina.ops.backend._private_helper", PRIVATE_NAME),
    ),
    "private module across packages": (
        _case(
            {"kasmina.ops._impl": "def helper():\n    pass\n"},
            kasmina__kd__x="from kasmina.ops._impl import helper\n",
        ),
        ("kasmina.kd.x", "kasmina.ops._impl.helper", PRIVATE_MODULE),
    ),
    "two-module cycle": (
        _case(
            kasmina__seeds__a="from kasmina.seeds.b import B\nclass A:\n    pass\n",
            kasmina__seeds__b="def f():\n    from kasmina.seeds.a import A\nclass B:\n    pass\n",
        ),
        ("kasmina.seeds.a", "kasmina.seeds.b", CYCLE),
    ),
    "cycle through a package __init__": (
        _case(
            kasmina__seeds="from kasmina.seeds.seed import Seed\nfrom kasmina.seeds.x import X\n",
            kasmina__seeds__x="from kasmina.seeds import Seed\nclass X:\n    pass\n",
        ),
        ("kasmina.seeds.x", "kasmina.seeds", CYCLE),
    ),
    "submodule imports its package __init__": (
        _case(
            kasmina__seeds="from kasmina.seeds.seed import Seed\n",
            kasmina__seeds__x="from kasmina.seeds import Seed\n",
        ),
        ("kasmina.seeds.x", "kasmina.seeds.Seed", OWN_INIT),
    ),
    "__all__ re-exports an import": (
        _case(kasmina__seeds__x="from kasmina.seeds.seed import Seed\n__all__ = ['Seed']\n"),
        ("kasmina.seeds.x", "kasmina.seeds.seed.Seed", REEXPORT),
    ),
    "__all__ lists an undefined name": (
        _case(kasmina__seeds__x="__all__ = ['Ghost']\n"),
        ("kasmina.seeds.x", "kasmina.seeds.x.Ghost", REEXPORT),
    ),
    "import x as x": (
        _case(kasmina__seeds__x="from kasmina.seeds.seed import Seed as Seed\n"),
        ("kasmina.seeds.x", "kasmina.seeds.seed.Seed", REEXPORT),
    ),
    "name taken from a module that imported it": (
        _case(
            kasmina__seeds__x="from kasmina.seeds.seed import Seed\n",
            kasmina__seeds__y="from kasmina.seeds.x import Seed\n",
        ),
        ("kasmina.seeds.y", "kasmina.seeds.x.Seed", TWO_PATHS),
    ),
    "test takes a name from a module that imported it": (
        _case(
            kasmina__seeds__x="from kasmina.seeds.seed import Seed\n",
            tests__seeds__test_x="from kasmina.seeds.x import Seed\n",
        ),
        ("tests.seeds.test_x", "kasmina.seeds.x.Seed", TWO_PATHS),
    ),
    "benchmark takes a name its package does not re-export": (
        _case(
            kasmina__seeds='"""Seeds: re-exports nothing."""\n',
            perf__bench_x="def f():\n    from kasmina.seeds import Seed\n",
        ),
        ("perf.bench_x", "kasmina.seeds.Seed", UNKNOWN_NAME),
    ),
    "missing module": (
        _case(kasmina__manager__x="from kasmina.manager.gone import Thing\n"),
        ("kasmina.manager.x", "kasmina.manager.gone.Thing", UNKNOWN_MODULE),
    ),
    "missing name": (
        _case(kasmina__manager__x="from kasmina.seeds.seed import Gone\n"),
        ("kasmina.manager.x", "kasmina.seeds.seed.Gone", UNKNOWN_NAME),
    ),
}


def test_clean_tree_has_no_violations() -> None:
    found = check_imports(CLEAN, packages=_pkg(CLEAN))
    assert not found, "\n".join(map(str, found))


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_checker_catches(case: str) -> None:
    sources, (module, target, rule) = BAD_CASES[case]
    found = check_imports(sources, packages=_pkg(sources))
    assert Violation(module, target, rule) in {
        Violation(v.module, v.target, v.rule) for v in found
    }, f"expected {module}: imports {target} ({rule}); got:\n" + "\n".join(map(str, found))


def test_base_of_the_bad_cases_is_clean() -> None:
    # Each bad case adds its own module(s) to this base, so what it finds comes from them.
    found = check_imports(_BASE, packages=_pkg(_BASE))
    assert not found, "\n".join(map(str, found))


# -- the real tree ----------------------------------------------------------------------------


CLIENTS = ("tests", "perf")  # held to how a name is taken: two-paths, unknown module or name


def _source_files() -> Iterator[tuple[str, Path]]:
    """(module name, path) of every module: kasmina/**.py and kernels/**.py as kasmina.kernels,
    and the clients, tests/**.py and perf/**.py, as tests.* and perf.*."""
    bases = [(ROOT / PACKAGE, (PACKAGE,)), (ROOT / KERNELS, (PACKAGE, KERNELS))]
    bases += [(ROOT / client, (client,)) for client in CLIENTS]
    for base, prefix in bases:
        for path in sorted(base.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(prefix + parts), path


def _real_tree() -> tuple[dict[str, str], set[str], set[str]]:
    sources: dict[str, str] = {}
    generated: set[str] = set()
    packages: set[str] = set()
    for module, path in _source_files():
        if path.name == "__init__.py":
            packages.add(module)
        if path.name.endswith("_pb2.py"):
            generated.add(module)  # generated protobuf code: known, not checked
            continue
        sources[module] = path.read_text(encoding="utf-8")
    return sources, packages, generated


def test_real_tree_follows_the_import_rules() -> None:
    sources, packages, generated = _real_tree()
    assert f"{PACKAGE}.seeds" in packages and f"{PACKAGE}.{KERNELS}" in packages
    assert "tests.test_layering" in sources and "perf.bench_distributed" in sources
    found = check_imports(sources, packages=packages, extra_modules=generated)
    assert not found, f"{len(found)} import-rule violations ({ORDER}):\n" + "\n".join(
        map(str, found)
    )


HEAVY = ("torch", "triton", "numpy")


@pytest.mark.parametrize(
    "code",
    [
        "from kasmina.control.auth import CommandVerifier, sign_command\n"
        "from kasmina.control.builders import make_seed_command\n"
        "from kasmina.utils.keyring import Keyring, generate_key\n"
        "k = Keyring({'ctl': generate_key()})\n"
        "sign_command(make_seed_command('cull', 'fc[0]'), k, 'ctl').SerializeToString()\n",
        "import kasmina\n"
        "k = kasmina.Keyring({'ctl': kasmina.generate_key()})\n"
        "kasmina.sign_command(kasmina.make_seed_command('cull', 'fc[0]'), k, 'ctl')\n",
        "import contextlib, io, sys, tempfile\n"
        "from kasmina.cli.main import main\n"
        "out = tempfile.mkdtemp()\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['keygen', '--key-id', 'ctl', '--out', out + '/c.json']) == 0\n"
        "    assert main(['keygen', '--publisher', '--key-id', 'ci', '--out', out + '/k']) == 0\n",
    ],
    ids=["controller-modules", "controller-top-level", "keygen"],
)
def test_a_controller_signing_commands_never_loads_torch(code: str) -> None:
    """docs/design.md §1: protocol-only users (a controller signing commands, a key made by the
    CLI) do not pay for torch. A package ``__init__`` that re-exported a torch module (the
    atomic file helpers beside the checkpoint signer, the coordinator beside the verifier)
    loaded it for every one of them."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code += (
        f"import sys\nheavy = [m for m in {HEAVY!r} if m in sys.modules]\nassert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_import_kasmina_is_light() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import sys, kasmina\n"
        "heavy = sorted(m for m in ('torch', 'triton', 'numpy', 'google.protobuf', 'fsspec')"
        " if m in sys.modules)\n"
        "kasmina_modules = sorted(m for m in sys.modules if m.startswith('kasmina.'))\n"
        "assert not heavy and not kasmina_modules, (heavy, kasmina_modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# -- package docstrings and design citations --------------------------------------------------

MIN_PACKAGE_DOCSTRING = 200


def test_every_package_has_an_init_with_a_real_docstring() -> None:
    problems = []
    for base in (ROOT / PACKAGE, ROOT / KERNELS):
        directories = {p.parent for p in base.rglob("*.py") if "__pycache__" not in p.parts}
        for directory in sorted(directories):
            init = directory / "__init__.py"
            where = init.relative_to(ROOT)
            if not init.is_file():
                problems.append(f"{where}: missing")
                continue
            docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
            if len(docstring) < MIN_PACKAGE_DOCSTRING:
                problems.append(
                    f"{where}: module docstring has {len(docstring)} characters "
                    f"(at least {MIN_PACKAGE_DOCSTRING}: what the package is for, what it holds)"
                )
    assert not problems, "\n".join(problems)


def _package_modules() -> dict[Path, set[str]]:
    """Each package directory of kasmina/ and kernels/ (kasmina/ itself included): its modules."""
    packages: dict[Path, set[str]] = {}
    for base in (ROOT / PACKAGE, ROOT / KERNELS):
        for init in base.rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                packages[init.parent] = {
                    p.stem for p in init.parent.glob("*.py") if p.name != "__init__.py"
                }
    return packages


# A module's line in a package docstring: "- ``name`` -- what it is" (or "``a`` / ``b`` --").
DOCSTRING_MODULE = re.compile(r"``(\w+)`` --")


def test_every_package_docstring_lists_its_modules() -> None:
    """A package's ``__init__`` docstring is its design in brief: every module, one line each
    (docs/design.md §1). Modules were added and the docstrings not told (a third of the
    manager's, half of the seeds')."""
    problems = []
    for directory, modules in sorted(_package_modules().items()):
        if directory == ROOT / PACKAGE:
            continue  # kasmina/__init__.py: the public API; its modules are in design.md §1
        init = directory / "__init__.py"
        docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        where = init.relative_to(ROOT)
        for module in sorted(modules):
            if f"``{module}``" not in docstring:
                problems.append(f"{where}: module {module} is not listed (``{module}`` -- ...)")
        for named in sorted(set(DOCSTRING_MODULE.findall(docstring)) - modules):
            problems.append(f"{where}: lists ``{named}``, which is no module of the package")
    assert not problems, "\n".join(problems)


def _design_layout() -> dict[str, str]:
    """docs/design.md §1's package list: {first word of an entry (``seeds/``, ``errors.py``):
    the entry's text}."""
    section = DESIGN_DOC.read_text(encoding="utf-8").split("### Packages", 1)[1]
    block = section.split("```", 2)[1]
    entries: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        if line.strip() and len(line) - len(line.lstrip()) <= 2:  # an entry's first line
            current = line.split()[0]
            entries[current] = line
        elif current is not None:
            entries[current] += "\n" + line
    return entries


def test_design_package_list_matches_the_tree() -> None:
    """docs/design.md §1 names every module of every package, and no module that is gone."""
    entries = _design_layout()
    problems = []
    for directory, modules in sorted(_package_modules().items()):
        if directory == ROOT / PACKAGE:
            files = {f"{m}.py" for m in modules} | {"__init__.py"}
            problems += [f"kasmina/{f}: no entry" for f in sorted(files - entries.keys())]
            continue
        key = f"{directory.name}/"
        text = entries.get(key)
        if text is None:
            problems.append(f"{key}: no entry")
            continue
        for module in sorted(modules):
            if not re.search(rf"\b{module}\b", text):
                problems.append(f"{key}: module {module} is not named")
        for named in sorted(set(re.findall(r"(\w+)\.py\b", text)) - modules):
            problems.append(f"{key}: names {named}.py, which is no module of the package")
    assert not problems, "\n".join(problems)


# Built from pieces so that this file does not match itself.
STALE_CITATIONS = ("DESIGN" + " §", "DESIGN" + ".md")
DESIGN_DOC = ROOT / "docs" / "design.md"
CITATION = re.compile(r"docs/design\.md §(\d+[a-z]?)")


def _python_files() -> Iterator[Path]:
    for folder in (PACKAGE, KERNELS, "tests", "perf"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path


def test_code_cites_docs_design_md() -> None:
    stale = []
    for path in _python_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if any(text in line for text in STALE_CITATIONS):
                stale.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not stale, "cite 'docs/design.md §N' instead:\n" + "\n".join(stale)


def test_design_citations_name_existing_sections() -> None:
    sections = set(re.findall(r"^## (\d+[a-z]?)\.", DESIGN_DOC.read_text("utf-8"), re.MULTILINE))
    assert sections, f"no '## N.' sections found in {DESIGN_DOC}"
    missing = []
    for path in _python_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for section in CITATION.findall(line):
                if section not in sections:
                    missing.append(f"{path.relative_to(ROOT)}:{number}: §{section}")
    assert not missing, f"cited sections missing from docs/design.md {sorted(sections)}:\n" + (
        "\n".join(missing)
    )


# -- telemetry events are documented ------------------------------------------------------------

_EVENT_CALL = re.compile(
    r"(?:\.emit|\._emit|\.report|\.event|_register)\((?:[^()\"]*?,\s*)*?\s*\"([a-z][a-z_]*(?:\.[a-z_]+)*)\""
)


def test_every_telemetry_event_the_code_sends_is_named_in_the_design() -> None:
    """A controller reads the events by name: each one the library sends is in docs/design.md
    §5 ("Telemetry events"), with its value and labels (most were sent and never named)."""
    design = DESIGN_DOC.read_text(encoding="utf-8")
    sent = set()
    for path in (ROOT / PACKAGE).rglob("*.py"):
        sent |= set(_EVENT_CALL.findall(path.read_text(encoding="utf-8")))
    sent -= {"seed_id", "optimizer_id"}  # label keys the pattern also meets
    assert {"command.ack", "lifecycle.transition", "optimizer_created", "seed.fault"} <= sent
    missing = sorted(name for name in sent if f"`{name}`" not in design)
    assert not missing, f"telemetry events not named in docs/design.md: {missing}"
