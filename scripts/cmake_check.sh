#!/usr/bin/env bash
# Build the ops library with CMake (CPU kernels; the same sources as setup.py) and check that it loads
# and runs the same as the setuptools build.
set -euo pipefail
cd "$(dirname "$0")/.."
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
prefix=$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B "$build" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release > "$build/configure.log"
cmake --build "$build" -j "${MAX_JOBS:-2}" > "$build/build.log" || { tail -40 "$build/build.log"; exit 1; }
# Plain torch only: importing fpl_fast would load the setuptools build too (one TORCH_LIBRARY per process).
.venv/bin/python - "$build/libfpl_fast_ops.so" <<'PY'
import sys
import torch
torch.ops.load_library(sys.argv[1])
gu, gv = torch.randn(3, 4, 2), torch.randn(3, 2, 8)
u, v = torch.randn(3, 4, 2), torch.randn(3, 2, 8)
out = torch.ops.fpl_fast.lowrank_full_grad(gu, gv, u, v, 0.1)
want = 0.1 * (gu @ v + u @ gv + u @ u.transpose(-1, -2) @ gu @ v)
torch.testing.assert_close(out, want)
print("fpl_fast: CMake-built library loads; lowrank_full_grad matches its formula")
PY
