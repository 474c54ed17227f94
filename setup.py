"""Build the fpl_fast._C extension: the CPU kernels always, the CUDA kernels when torch and nvcc agree.

CUDA is built iff torch has CUDA (``torch.version.cuda``), nvcc is found and nvcc's CUDA major version equals
torch's. ``FPL_FAST_CUDA=0`` forces a CPU-only build, ``FPL_FAST_CUDA=1`` requires CUDA (and fails loudly if it
cannot be built). ``TORCH_CUDA_ARCH_LIST`` selects the GPU architectures as usual; when it is unset and no GPU
is visible (a build machine without one, or pip's isolated build), ``DEFAULT_CUDA_ARCH_LIST`` is used instead of
torch's guess, which fails there. The torch version built against is compiled into ``_C`` (``_C.torch_version()``)
so that ``fpl_fast.ops`` can refuse an extension built against another torch. Package metadata lives in
pyproject.toml.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Ampere (A100; sm_86/sm_89 GPUs run sm_80 code) and Hopper (H100/H200) machine code, plus Hopper PTX that the
# driver JIT-compiles for newer GPUs (Blackwell). Measured with nvcc 13.0 on csrc/cuda/lowrank_full_grad_cuda.cu:
# 44 s of CPU for 9.0 alone, 58 s for 8.0;9.0, 60 s for 8.0;9.0+PTX (the host side is compiled once).
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _nvcc_path() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, else from PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_home_of(nvcc: str) -> str:
    """The CUDA toolkit root of an nvcc, which may be a symlink or a wrapper script on PATH.

    torch.utils.cpp_extension guesses CUDA_HOME from the unresolved nvcc on PATH (``/usr/local/bin/nvcc`` gives
    ``/usr/local``), so the real root is resolved here: first through symlinks, then, if that directory is not a
    toolkit (a wrapper script), by asking nvcc where it lives (``nvcc --dryrun`` prints ``_HERE_=<bin dir>``).
    """
    real = os.path.realpath(nvcc)
    home = os.path.dirname(os.path.dirname(real))
    if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        return home
    try:
        dry = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
        match = re.search(r"_HERE_=(\S+)", dry.stdout + dry.stderr)
        if match:
            return os.path.dirname(os.path.realpath(match.group(1)))
    except (OSError, subprocess.SubprocessError):
        pass
    return home


def _nvcc_version(nvcc: str) -> str | None:
    """'13.0' from ``nvcc --version``, or None if nvcc does not run."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def _decide_cuda() -> tuple[bool, str]:
    """(build CUDA?, reason / description); sets CUDA_HOME for torch when CUDA is built."""
    import torch  # torch itself does not compute CUDA_HOME; torch.utils.cpp_extension does, at import

    forced = os.environ.get("FPL_FAST_CUDA")
    if forced not in (None, "", "0", "1"):
        raise SystemExit(f"fpl_fast: FPL_FAST_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False, "FPL_FAST_CUDA=0"
    problems = []
    nvcc = _nvcc_path()
    version = _nvcc_version(nvcc) if nvcc else None
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} has no CUDA")
    if nvcc is None:
        problems.append("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    elif version is None:
        problems.append(f"could not read the version of {nvcc}")
    elif torch.version.cuda is not None and version.split(".")[0] != torch.version.cuda.split(".")[0]:
        problems.append(f"nvcc {version} does not match torch's CUDA {torch.version.cuda}")
    if problems:
        reason = "; ".join(problems)
        if forced == "1":
            raise SystemExit(f"fpl_fast: FPL_FAST_CUDA=1 but CUDA kernels cannot be built: {reason}")
        return False, reason
    home = _cuda_home_of(nvcc)
    os.environ["CUDA_HOME"] = home
    return True, f"nvcc {version} at {home}, arch {_arch_list()}"


def _arch_list() -> str:
    """The architectures to build for, as described; sets TORCH_CUDA_ARCH_LIST when it falls back to the default.

    torch builds for the visible GPUs when TORCH_CUDA_ARCH_LIST is unset, and with none visible its
    ``_get_cuda_arch_flags`` fails (IndexError), so the default is set explicitly then.
    """
    import torch

    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch:
        return f"{arch} (TORCH_CUDA_ARCH_LIST)"
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return "of the visible GPUs (TORCH_CUDA_ARCH_LIST unset)"
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    return f"{DEFAULT_CUDA_ARCH_LIST} (fpl_fast's default: no GPU visible and TORCH_CUDA_ARCH_LIST unset)"


WITH_CUDA, WHY = _decide_cuda()
# Imported only now: torch.utils.cpp_extension reads CUDA_HOME once, at import.
import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if WITH_CUDA:
    print(f"fpl_fast: building CPU kernels + CUDA kernels ({WHY})", file=sys.stderr)
else:
    print(f"fpl_fast: building CPU kernels only: {WHY}", file=sys.stderr)


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


sources = ["csrc/fpl_fast.cpp", *_sources("csrc/cpu/*.cpp")]
# The C++ standard is torch's own choice (C++17 or later; C++20 for torch >= 2.10): a second -std would clash.
# ISO C++ turns off mul-add contraction; allow it so the vector loops use FMA (no reassociation, no fast-math).
# -fno-math-errno (as torch's own build): sqrt in the vector loops becomes one vsqrtpd instead of a libm call per lane.
cxx_flags = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-Wno-psabi"]
# The torch this extension is built against, as _C.torch_version(); passed as bare tokens and stringised in C++
# (a quoted string does not survive ninja's shell quoting).
_torch_version = torch.__version__
if not re.fullmatch(r"[0-9A-Za-z.+_]+", _torch_version):
    raise SystemExit(f"fpl_fast: unexpected torch version string {_torch_version!r}")
define_macros = [("FPL_FAST_TORCH_VERSION", _torch_version)]
if WITH_CUDA:
    sources += _sources("csrc/cuda/*.cu")
    define_macros.append(("FPL_FAST_WITH_CUDA", None))
    ext = CUDAExtension(
        "fpl_fast._C",
        sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
    )
else:
    ext = CppExtension("fpl_fast._C", sources, define_macros=define_macros, extra_compile_args={"cxx": cxx_flags})

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})
