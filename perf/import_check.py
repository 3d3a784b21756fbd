"""Every module of the installed package imports: the last step of ``perf/gpu_check.sh``'s install.

A missing runtime dependency, or a protobuf older than the generated leyline code, would
otherwise fail each CUDA test on its own; this names it at once (a traceback, exit 1). A module
that imports at its top what only an extra installs (aiohttp and yarl: fsspec's HTTP store, for
which the Urza client imports ``kasmina.urza.redirects`` only when it opens one) is skipped with
a note where that is missing: a GPU image without the dev extra is no broken install.

Run from the checkout: ``python perf/import_check.py``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import kasmina.kernels  # installed from kernels/, outside kasmina/ in the checkout

import kasmina

# Top-level modules that only an extra installs (pyproject.toml's dev: aiohttp, which needs yarl).
OPTIONAL = frozenset({"aiohttp", "yarl"})


def main() -> int:
    skipped: list[str] = []
    for package in (kasmina, kasmina.kernels):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if module.name.endswith(".__main__"):  # that one runs the CLI
                continue
            try:
                importlib.import_module(module.name)
            except ModuleNotFoundError as exc:
                if (exc.name or "").partition(".")[0] not in OPTIONAL:
                    raise
                skipped.append(
                    f"{module.name}: {exc.name} is not installed (an extra's, no dependency)"
                )
    for line in skipped:
        print(f"import_check: skipped {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
