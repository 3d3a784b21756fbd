#!/usr/bin/env bash
# Wheels for perf/gpu_check.sh on a GPU machine that cannot download anything.
#
# A CUDA image with PyTorch and Triton preinstalled usually lacks some of Kasmina's runtime
# dependencies (cryptography with its cffi and pycparser; protobuf at least as new as the
# generated leyline code, whose import checks the runtime's version), the bench extra's
# Liger-Kernel, and what the CUDA tests run with (pytest and its plugins' dependencies;
# hypothesis, which the state table's property test imports). This script downloads those wheels, built for the GPU machine's Python and
# platform, into perf/wheels (ignored by git). Run it where pip can download, copy perf/wheels to
# the GPU machine with the checkout, and perf/gpu_check.sh installs from it without network.
#
#   bash perf/gpu_wheels.sh        # GPU_PYTHON_VERSION=3.12 GPU_PLATFORM_ARCH=x86_64
#
# The runtime and test dependencies are pinned to the versions installed here (the ones the
# test suite ran with); liger-kernel is the newest release.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
TARGET_PY=${GPU_PYTHON_VERSION:-3.12}
ARCH=${GPU_PLATFORM_ARCH:-x86_64}
DEST=perf/wheels
mkdir -p "$DEST"

pinned=$("$PY" - <<'PYEOF'
import importlib.metadata as md

runtime = ("cryptography", "cffi", "pycparser", "protobuf")
tests = ("pytest", "pluggy", "iniconfig", "packaging", "pygments", "hypothesis", "sortedcontainers")
for name in runtime + tests:
    print(f"{name}=={md.version(name)}")
PYEOF
)
platforms=()
# Oldest glibc first where a project ships several builds; 2_34 for those that ship no older.
for tag in manylinux_2_28 manylinux_2_17 manylinux2014 manylinux_2_34; do
    platforms+=(--platform "${tag}_${ARCH}")
done
# shellcheck disable=SC2086  # one requirement per word
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
    --python-version "$TARGET_PY" "${platforms[@]}" -d "$DEST" $pinned "liger-kernel>=0.5"
echo "gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels in $DEST for Python $TARGET_PY ($ARCH):"
ls -1 "$DEST"
