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
.venv/bin/python - "$build/libfpl_fast_ops.so" <<'PY'
import sys
import torch
torch.ops.load_library(sys.argv[1])
from fpl_fast import reference
g = torch.randn(3, 4, 8)
u, v = torch.randn(3, 4, 2), torch.randn(3, 2, 8)
out = torch.ops.fpl_fast.lowrank_full_grad(g.new_ones(3, 4, 2), g.new_ones(3, 2, 8), u, v, 0.1)
torch.testing.assert_close(out, reference.lowrank_full_grad(g.new_ones(3, 4, 2), g.new_ones(3, 2, 8), u, v, 0.1))
print("fpl_fast: CMake-built library loads; lowrank_full_grad matches the reference")
PY
