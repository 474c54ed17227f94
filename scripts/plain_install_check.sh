#!/usr/bin/env bash
# `pip install .` exactly as the README gives it: a fresh virtual environment under DIR with torch 2.14.1 +
# torchvision 0.29.1, then the plain (build-isolated) install from a copy of the checkout's sources (what a
# clone holds: tracked and untracked-but-not-ignored files, no build outputs), then an import from outside any
# source tree. Run it without TORCH_CUDA_ARCH_LIST / FPL_FAST_CUDA to test the defaults; FPL_FAST_EXPECT_CUDA=1
# also requires the CUDA kernels.
# Usage: scripts/plain_install_check.sh DIR   (DIR: an empty scratch directory; left for the caller to remove)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:?usage: scripts/plain_install_check.sh DIR}

"${PYTHON:-python3}" -m venv "$dir/venv"
py="$dir/venv/bin/python"
"$py" -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1

mkdir -p "$dir/src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - | tar -xf - -C "$dir/src"
else
  tar --exclude=./.venv --exclude=./build --exclude='*.so' -cf - . | tar -xf - -C "$dir/src"
fi

# -v only to keep setup.py's "fpl_fast: building ..." line; the log is shown on failure.
if ! (cd "$dir/src" && "$py" -m pip install -v --disable-pip-version-check . >"$dir/install.log" 2>&1); then
  tail -40 "$dir/install.log"
  echo "fpl_fast: plain 'pip install .' failed" >&2
  exit 1
fi
grep -E "^\s*fpl_fast:" "$dir/install.log" | sed "s/^\s*//" | sort -u || true

cd "$dir"
"$py" - <<'PY'
import os

import torch

import fpl_fast
from fpl_fast import _C

here = os.path.dirname(fpl_fast.__file__)
print(f"fpl_fast from {here}: C++ ops {fpl_fast.has_cpp_ops()}, CUDA kernels {fpl_fast.has_cuda_kernels()}, "
      f"built against torch {_C.torch_version()} (running {torch.__version__})")
assert "site-packages" in here, "imported the source tree, not the installed package"
assert fpl_fast.has_cpp_ops(), "the plain install did not give working C++ ops (see the warning above)"
if os.environ.get("FPL_FAST_EXPECT_CUDA") == "1":
    assert fpl_fast.has_cuda_kernels(), "FPL_FAST_EXPECT_CUDA=1 but the CUDA kernels were not built"
PY
