"""The built distributions: a wheel and an sdist of this repository, and the wheel installed.

The builds run on a copy of the repository (its files, without ``.git``, ``.venv``, ``build/``
and egg-info), so a stale ``build/lib`` left in the checkout cannot leak old modules into the
wheel and the test writes nothing into the checkout. The wheel is then installed, not editable,
into a fresh virtual environment without downloading anything: ``pip install --no-deps
--no-index``, with the dependencies (torch, triton, protobuf, numpy, fsspec, ...) made visible by
a ``.pth`` file naming this interpreter's site-packages. A plain path line in a ``.pth`` file is
appended to ``sys.path`` but the ``.pth`` files inside it are not processed, so this
environment's editable install of kasmina stays inactive there: what runs is the wheel's copy.
Every module of the installed package is imported and the ``kasmina`` console script is run.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "kasmina"
KERNELS = "kernels"  # installed as kasmina.kernels (pyproject.toml package-dir)
ENTRY_POINT = "kasmina.cli.main:main"
TIMEOUT = 300

COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    ".benchmarks",
    ".hypothesis",
    "demo_out",
    "kasmina-demo",
)


def _installed_paths() -> dict[str, Path]:
    """Path inside the installed package (``kasmina/...``) -> source file, for every file."""
    files: dict[str, Path] = {}
    for base, prefix in ((ROOT / PACKAGE, PACKAGE), (ROOT / KERNELS, f"{PACKAGE}/{KERNELS}")):
        for path in sorted(base.rglob("*.py")):
            if "__pycache__" not in path.parts:
                files[f"{prefix}/{path.relative_to(base).as_posix()}"] = path
    return files


def _module_names() -> set[str]:
    names = set()
    for installed in _installed_paths():
        parts = installed.removesuffix(".py").split("/")
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.add(".".join(parts))
    return names


def _package_inits() -> set[str]:
    return {p for p in _installed_paths() if p.endswith("/__init__.py")}


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} -> {result.returncode}\n"
        f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    )
    return result


@dataclass(frozen=True)
class Dists:
    source: Path  # the copy the distributions were built from
    wheel: Path
    sdist: Path


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    if importlib.util.find_spec("build") is None:
        pytest.fail("the 'build' package is missing: pip install -e '.[dev]'")
    base = tmp_path_factory.mktemp("dists")
    source = base / "src"
    shutil.copytree(ROOT, source, ignore=COPY_IGNORE)
    out = base / "out"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run(
        [*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        + ["-w", str(out)],
        cwd=base,
    )
    # build checks build-system.requires itself; setuptools >= 70.1 builds without `wheel`.
    _run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--skip-dependency-check"]
        + ["--outdir", str(out), str(source)],
        cwd=base,
    )
    wheels = sorted(out.glob("kasmina-*.whl"))
    sdists = sorted(out.glob("kasmina-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return Dists(source, wheels[0], sdists[0])


def test_wheel_holds_every_module_and_the_entry_point(dists: Dists) -> None:
    assert dists.wheel.name.endswith("-py3-none-any.whl"), dists.wheel.name
    with zipfile.ZipFile(dists.wheel) as wheel:
        names = set(wheel.namelist())
        dist_info = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        assert len(dist_info) == 1, dist_info
        (info,) = dist_info
        entry_points = configparser.ConfigParser()
        entry_points.read_string(wheel.read(f"{info}/entry_points.txt").decode())

    expected = set(_installed_paths())
    shipped = {n for n in names if n.startswith(f"{PACKAGE}/") and n.endswith(".py")}
    missing_inits = sorted(_package_inits() - names)
    assert not missing_inits, f"package __init__.py missing from the wheel: {missing_inits}"
    assert not sorted(expected - shipped), f"missing from the wheel: {sorted(expected - shipped)}"
    assert not sorted(shipped - expected), f"not in the tree: {sorted(shipped - expected)}"
    assert f"{PACKAGE}/{KERNELS}/__init__.py" in names

    leyline = ROOT / PACKAGE / "leyline"
    generated = sorted(leyline.glob("*_pb2.py")) + sorted(leyline.glob("*_pb2.pyi"))
    assert any(p.suffix == ".py" for p in generated), "no generated leyline code in the tree"
    missing = [p.name for p in generated if f"{PACKAGE}/leyline/{p.name}" not in names]
    assert not missing, f"generated leyline files missing from the wheel: {missing}"

    stray = sorted(n for n in names if n.split("/")[0] not in {PACKAGE, info})
    assert not stray, f"files outside the package in the wheel: {stray}"
    assert entry_points.has_section("console_scripts"), entry_points.sections()
    assert dict(entry_points["console_scripts"]) == {"kasmina": ENTRY_POINT}


def test_sdist_holds_kernels_and_every_package(dists: Dists) -> None:
    with tarfile.open(dists.sdist) as sdist:
        names = {m.name for m in sdist.getmembers() if m.isfile()}
    top = dists.sdist.name.removesuffix(".tar.gz")
    assert all(n.startswith(f"{top}/") for n in names), top
    inside = {n.removeprefix(f"{top}/") for n in names}

    expected = {path.relative_to(ROOT).as_posix() for path in _installed_paths().values()}
    missing = sorted(expected - inside)
    assert not missing, f"missing from the sdist: {missing}"
    assert any(n.startswith(f"{KERNELS}/") for n in inside)
    # proto/: an unpacked sdist's make proto and tests/test_leyline.py regenerate from it.
    for needed in ("pyproject.toml", "README.md", "proto/leyline.proto", "docs/design.md"):
        assert needed in inside, f"{needed} missing from the sdist"
    for pyi in sorted((ROOT / PACKAGE / "leyline").glob("*.pyi")):
        assert pyi.relative_to(ROOT).as_posix() in inside, f"{pyi.name} missing from the sdist"


def test_sdist_builds_the_same_wheel(dists: Dists, tmp_path: Path) -> None:
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run(
        [*pip, "wheel", str(dists.sdist), "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        + ["-w", str(tmp_path)],
        cwd=tmp_path,
    )
    (rebuilt,) = tmp_path.glob("kasmina-*.whl")
    with zipfile.ZipFile(dists.wheel) as first, zipfile.ZipFile(rebuilt) as second:
        ours = {n for n in first.namelist() if not n.endswith("RECORD")}
        theirs = {n for n in second.namelist() if not n.endswith("RECORD")}
    assert ours == theirs, f"only from the tree: {sorted(ours - theirs)}; only from the sdist: " + (
        f"{sorted(theirs - ours)}"
    )


IMPORT_EVERYTHING = textwrap.dedent(
    """
    import importlib, importlib.util, json, pkgutil, sys, traceback
    from pathlib import Path

    prefix = Path(sys.prefix).resolve()
    import kasmina

    report = {"file": kasmina.__file__, "prefix": str(prefix), "imported": [], "failed": {},
              "outside": {}}

    def onerror(name):
        report["failed"][name] = traceback.format_exc()

    names = [m.name for m in pkgutil.walk_packages(kasmina.__path__, "kasmina.", onerror)]
    for name in ["kasmina", *names]:
        try:
            if name == "kasmina.__main__":  # runs the CLI: make that `kasmina --help`
                sys.argv = ["kasmina", "--help"]
                try:
                    importlib.import_module(name)
                except SystemExit as exc:
                    if exc.code not in (0, None):
                        raise
            else:
                importlib.import_module(name)
        except BaseException:
            report["failed"][name] = traceback.format_exc()
            continue
        file = importlib.util.find_spec(name).origin  # __main__ left no entry in sys.modules
        if file is None or not Path(file).resolve().is_relative_to(prefix):
            report["outside"][name] = file
        report["imported"].append(name)
    Path(sys.argv_report).write_text(json.dumps(report))
    """
)


@dataclass(frozen=True)
class Installed:
    venv: Path
    python: Path
    bin: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def installed(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    venv = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", str(venv)])
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    env.update(
        PYTHONNOUSERSITE="1",
        TRITON_INTERPRET="1",
        VIRTUAL_ENV=str(venv),
        PATH=os.pathsep.join([str(bindir), env.get("PATH", "")]),
        PIP_NO_INDEX="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    # Install first: with the dev site-packages visible, pip would see kasmina installed already.
    _run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir", "-q"]
        + [str(dists.wheel)],
        env=env,
        cwd=venv,
    )
    site = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        env=env,
        cwd=venv,
    ).stdout.strip()
    ours = sysconfig.get_paths()
    deps = list(dict.fromkeys([ours["purelib"], ours["platlib"]]))
    (Path(site) / "_kasmina_test_dependencies.pth").write_text("\n".join(deps) + "\n")
    return Installed(venv, python, bindir, env)


def test_installed_wheel_imports_every_module(installed: Installed, tmp_path: Path) -> None:
    script = tmp_path / "import_everything.py"
    report_path = tmp_path / "report.json"
    script.write_text(
        IMPORT_EVERYTHING.replace("sys.argv_report", repr(str(report_path))), encoding="utf-8"
    )
    _run([str(installed.python), str(script)], env=installed.env, cwd=tmp_path)
    report = json.loads(report_path.read_text(encoding="utf-8"))

    prefix = Path(report["prefix"])
    assert prefix == installed.venv.resolve(), report["prefix"]
    assert Path(report["file"]).resolve().is_relative_to(prefix), (
        f"kasmina came from {report['file']}, not from the fresh environment {prefix}"
    )
    failed = report["failed"]
    assert not failed, "\n\n".join(f"{name}:\n{tb}" for name, tb in sorted(failed.items()))
    assert not report["outside"], f"modules loaded from outside the venv: {report['outside']}"
    imported, expected = set(report["imported"]), _module_names()
    assert imported == expected, (
        f"not imported: {sorted(expected - imported)}; unknown: {sorted(imported - expected)}"
    )


def test_installed_console_script_runs(installed: Installed, tmp_path: Path) -> None:
    script = installed.bin / ("kasmina.exe" if os.name == "nt" else "kasmina")
    assert script.is_file(), f"no console script at {script}"
    if os.name != "nt":
        shebang = script.read_text(encoding="utf-8").splitlines()[0]
        assert str(installed.venv) in shebang, shebang
    result = _run([str(script), "--help"], env=installed.env, cwd=tmp_path)
    assert "usage" in result.stdout.lower(), result.stdout


def test_dir_of_the_package_is_its_public_api() -> None:
    """``dir(kasmina)`` (and so tab completion) lists the public API, not the helpers the lazy
    namespace is built with (``importlib``, ``Any``, ``annotations``, ``_PUBLIC``), nor the
    subpackages an import has bound on the package."""
    import kasmina
    import kasmina.stages  # binds kasmina.stages on the package

    assert dir(kasmina) == sorted(kasmina.__all__)
    assert not {"Any", "annotations", "importlib", "stages"} & set(dir(kasmina))
    assert all(hasattr(kasmina, name) for name in kasmina.__all__)
