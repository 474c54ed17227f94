#!/usr/bin/env bash
# Whether scripts/setup.sh builds the CUDA kernels. Compiling them takes most of a set-up's time (minutes), and
# nvcc alone says nothing: a machine with nvcc and no GPU would compile kernels it cannot run. So they are built
# where a GPU is visible (nvidia-smi -L lists one) or where they are asked for (FPL_FAST_CUDA=1, as .ci/run sets).
#
# Prints one line, "CHOICE GPUS WHY": CHOICE is what setup.py gets as FPL_FAST_CUDA: 0 (CPU kernels only), 1 (CUDA
# kernels required, fails loudly where they cannot be built) or auto (FPL_FAST_CUDA unset: setup.py builds them
# where torch has CUDA and nvcc matches it); GPUS: the GPUs nvidia-smi lists; WHY: the reason, for the log.
# FPL_FAST_CUDA other than unset, empty, 0 or 1: one line on stderr, exit code 2.
# Only bash builtins besides nvidia-smi (tests run it with a PATH holding a stand-in nvidia-smi and nothing else).
set -euo pipefail

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  while IFS= read -r line; do
    if [[ $line == GPU\ * ]]; then
      gpus=$((gpus + 1))
    fi
  done < <(nvidia-smi -L 2>/dev/null || true)
fi

case "${FPL_FAST_CUDA:-}" in
  1) echo "1 $gpus FPL_FAST_CUDA=1: CPU and CUDA kernels (CUDA required)" ;;
  0) echo "0 $gpus FPL_FAST_CUDA=0: CPU kernels only" ;;
  "")
    if [ "$gpus" -gt 0 ]; then
      echo "auto $gpus $gpus GPU(s) visible: CPU kernels, and CUDA kernels where torch's CUDA and nvcc agree"
    else
      echo "0 0 no GPU visible (nvidia-smi lists none): CPU kernels only (FPL_FAST_CUDA=1 builds the CUDA kernels too)"
    fi
    ;;
  *)
    echo "scripts/setup.sh: FPL_FAST_CUDA must be 0, 1 or unset, got '${FPL_FAST_CUDA}'" >&2
    exit 2
    ;;
esac
