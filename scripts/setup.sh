#!/usr/bin/env bash
# Set-up on a fresh machine, idempotent: a virtual environment in .venv with torch 2.14.1 +
# torchvision 0.29.1 (CUDA 13.0 build, runs on the CPU too), fpl_fast's dependencies, and fpl_fast
# itself built in place: the C++ CPU kernels always; the CUDA kernels only where a GPU is visible (nvidia-smi
# lists one; then where torch has CUDA and nvcc matches it) or where FPL_FAST_CUDA=1 asks for them
# (scripts/cuda_choice.sh decides). Without a GPU they are not compiled even where nvcc is installed: compiling them
# is most of a set-up's time. (A plain `pip install .` decides in setup.py alone: torch's CUDA and nvcc.)
# The build (and the dependencies) are skipped when csrc/, setup.py, pyproject.toml and that choice are unchanged
# since the last successful one.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
# The build's own tools (the build runs without isolation, against the torch above).
"${PIP[@]}" setuptools wheel ninja

read -r cuda gpus why < <(bash scripts/cuda_choice.sh) || exit 2
if [ "$cuda" = auto ]; then
  unset FPL_FAST_CUDA # setup.py decides: CUDA kernels where torch's CUDA and nvcc agree
else
  export FPL_FAST_CUDA=$cuda
fi
echo "fpl_fast: $why"

stamp=.venv/.fpl_fast_build
want=$( (echo "cuda=$cuda"; cat setup.py pyproject.toml; find csrc -type f | sort | xargs cat) | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && ls fpl_fast/_C*.so >/dev/null 2>&1; then
  echo "fpl_fast: extension up to date (csrc/ unchanged), build skipped"
else
  # CUDA asked for with no GPU visible: torch cannot read the architecture off one; Hopper (H100/H200) is the target.
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && [ "$cuda" = 1 ] && [ "$gpus" = 0 ]; then
    export TORCH_CUDA_ARCH_LIST="9.0"
  fi
  export MAX_JOBS=${MAX_JOBS:-2}
  # Editable install: the compiled fpl_fast/_C*.so lands next to the sources, so tests run from the checkout.
  # The dependencies come from pyproject.toml (with its [test] and [flower] extras), listed there only.
  if ! .venv/bin/python -m pip install --no-build-isolation --disable-pip-version-check -v -e ".[test,flower]" \
    > .venv/build.log 2>&1; then
    tail -40 .venv/build.log
    echo "fpl_fast: build failed, see .venv/build.log" >&2
    exit 1
  fi
  grep -E "^\s*fpl_fast:" .venv/build.log | sed "s/^\s*//" | sort -u || true
  echo "$want" > "$stamp"
fi
