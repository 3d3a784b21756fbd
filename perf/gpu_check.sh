#!/usr/bin/env bash
# GPU check on one CUDA machine (its stages time-limited to about 8 minutes): install the package
# with its dev and bench extras against the torch already installed there, run the tests that
# exercise CUDA, then the GPU table (perf/bench_gpu.py), and write everything to perf/results/.
#
#   bash perf/gpu_check.sh            # PYTHON=python3.12 picks the interpreter
#   bash perf/gpu_check.sh --install-only   # stage 1 alone (no GPU needed): install, import
#
# Stages have hard time limits, so the whole run stays within 8 minutes: install 150 s, tests
# 210 s (and up to 120 s more for the NCCL runs on a machine with 2+ GPUs), the table what is
# left of 470 s (its own budget is shorter, and an interrupted table still writes the rows it
# has). The table runs the KD rows first. On a machine without network, fill perf/wheels first
# on one with network (bash perf/gpu_wheels.sh: the runtime dependencies such images lack, and
# Liger-Kernel) and bring it along; they are installed without their dependencies, over the
# preinstalled torch and triton. Without Liger the table says so in its rows.
# KASMINA_RESULTS_DIR (default perf/results) is where the logs and tables go.
# Exit status: that of the tests, else that of the table.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
STAMP=$(date -u +%Y-%m-%d-%H%M)
RESULTS=${KASMINA_RESULTS_DIR:-perf/results}
mkdir -p "$RESULTS"
TESTS_LOG="$RESULTS/gpu-$STAMP-tests.txt"
TABLE_TXT="$RESULTS/gpu-$STAMP.txt"
TABLE_JSON="$RESULTS/gpu-$STAMP.json"
unset TRITON_INTERPRET KASMINA_BACKEND
started=$SECONDS

install_only=0
if [ "${1:-}" = "--install-only" ]; then install_only=1; fi
if [ "$install_only" -eq 0 ] &&
        ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: $PY has no CUDA torch; run this on the GPU machine" >&2
    exit 2
fi

# --- 1. install, pinning the preinstalled torch and triton -------------------------------
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" - >"$constraints" <<'EOF'
import importlib.metadata as md

for name in ("torch", "triton"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
EOF
pip_install() {
    timeout 150 "$PY" -m pip install --quiet --retries 1 --timeout 10 -c "$constraints" "$@"
}
shopt -s nullglob
wheels=(perf/wheels/*.whl)
shopt -u nullglob
if [ "${#wheels[@]}" -gt 0 ] && pip_install --no-index --no-deps "${wheels[@]}" &&
        pip_install --no-index --no-deps --no-build-isolation -e .; then
    echo "gpu_check: installed the package and ${#wheels[@]} wheels from perf/wheels"
elif pip_install -e ".[dev,bench]"; then
    echo "gpu_check: installed .[dev,bench]"
elif pip_install --no-deps --no-build-isolation -e .; then
    echo "gpu_check: installed the package alone (no network, no perf/wheels): no Liger rows" >&2
else
    echo "gpu_check: cannot install the package" >&2
    exit 3
fi
"$PY" -c 'import importlib.metadata as m; print("liger-kernel", m.version("liger-kernel"))' \
    2>/dev/null || echo "gpu_check: liger-kernel not installed"
# Every module must import (a missing runtime dependency, or a protobuf older than the generated
# leyline code, would otherwise fail each test on its own): stop here, saying which. A module
# needing only an extra's package (aiohttp, for HTTP stores) is skipped with a note.
if ! "$PY" perf/import_check.py; then
    echo "gpu_check: the package does not import (see above); bring the wheels of" \
        "bash perf/gpu_wheels.sh in perf/wheels" >&2
    exit 3
fi
if [ "$install_only" -eq 1 ]; then
    echo "gpu_check: installed, every module imports"
    exit 0
fi

# --- 2. the tests that run on CUDA ---------------------------------------------------------
# test_kd_loss_*.py and test_fused_linear_kd_*.py run every test on the GPU when there is one
# (-k matches their module names); the rest of the -k picks the other CUDA-only tests ("cuda" in
# a name or a [cuda] parameter, and the state table's property test on the lifecycle kernel) and
# the no-sync checks (the leak check, and a training step through guarded seeds counted with the
# CUDA profiler under set_sync_debug_mode("error")). The blend kernel's CUDA results, and the
# lifecycle kernel's beyond that test, are checked by the table below, which compares every
# implementation with a float64 reference before timing it (perf/gpu_table.py).
{
    echo "# $(date -u) $("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())')"
    timeout --signal=INT 210 "$PY" -m pytest -q -p no:cacheprovider tests/ops tests/manager \
        tests/seeds/test_finite_checks.py tests/seeds/test_table_properties.py \
        tests/seeds/test_attach_targets.py \
        -k "kd_loss or fused_linear_kd or cuda or never_syncs or on_the_triton_kernel" \
        -o addopts="-ra"
} 2>&1 | tee "$TESTS_LOG"
tests_status=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests_status after $((SECONDS - started)) s"
# The distributed scenarios again over NCCL, one GPU per rank (2 and 3 ranks): they skip
# themselves, and say so in the log, on a machine with fewer GPUs.
{
    timeout --signal=INT 120 "$PY" -m pytest -q -p no:cacheprovider \
        tests/manager/test_ddp_lifecycle.py -k nccl -o addopts="-ra"
} 2>&1 | tee -a "$TESTS_LOG"
nccl_status=${PIPESTATUS[0]}
if [ "$nccl_status" -ne 0 ] && [ "$nccl_status" -ne 5 ]; then tests_status=$nccl_status; fi

# --- 3. the GPU table ----------------------------------------------------------------------
# What is left of 470 s, at least a minute; the table's own budget stops starting new rows
# 40 s before the hard limit, which interrupts the row in progress (the rows so far are kept).
left=$((470 - (SECONDS - started)))
hard=$((left < 60 ? 60 : left))
timeout --signal=INT "$hard" "$PY" perf/bench_gpu.py --budget-s "$((hard - 40))" \
    --out "$TABLE_TXT" --json "$TABLE_JSON"
table_status=$?
echo "gpu_check: table exit $table_status; $TABLE_TXT, $TABLE_JSON, $TESTS_LOG;" \
    "$((SECONDS - started)) s in all"
if [ "$tests_status" -ne 0 ]; then exit "$tests_status"; fi
exit "$table_status"
