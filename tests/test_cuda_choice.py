"""scripts/setup.sh's choice of kernels (scripts/cuda_choice.sh): CUDA kernels where a GPU is visible or
FPL_FAST_CUDA=1 asks for them, the CPU kernels only otherwise, even with nvcc installed. Run with a stand-in
nvidia-smi on an otherwise empty PATH; nothing is built."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash") or "/bin/bash"
H100 = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5f2c)"


def _choice(tmp_path: Path, nvidia_smi: str | None, cuda: str | None) -> subprocess.CompletedProcess:
    """cuda_choice.sh with ``nvidia_smi`` (a script body; None: no nvidia-smi on PATH) and FPL_FAST_CUDA=``cuda``
    (None: unset). An nvcc is on PATH in every case: it must not decide anything."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {"nvcc": "echo 'Cuda compilation tools, release 13.0, V13.0.88'"}
    if nvidia_smi is not None:
        tools["nvidia-smi"] = nvidia_smi
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!{BASH}\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": str(bin_dir)}
    if cuda is not None:
        env["FPL_FAST_CUDA"] = cuda
    return subprocess.run([BASH, str(REPO / "scripts" / "cuda_choice.sh")], env=env, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("nvidia_smi", "cuda", "choice", "gpus"),
    [
        (None, None, "0", 0),  # no driver: CPU kernels only, though nvcc is there
        ("echo 'No devices were found'; exit 6", None, "0", 0),  # a driver and no GPU
        (f"echo '{H100}'", None, "auto", 1),  # a GPU: setup.py builds CUDA where torch's CUDA and nvcc agree
        (f"echo '{H100}'; echo '{H100.replace('GPU 0', 'GPU 1')}'", None, "auto", 2),
        (None, "1", "1", 0),  # asked for (as .ci/run does): built, and required, without a GPU
        (f"echo '{H100}'", "0", "0", 1),  # refused where a GPU is visible
        (None, "", "0", 0),  # empty counts as unset
    ],
)
def test_cuda_kernels_where_a_gpu_is_visible_or_asked_for(
    tmp_path: Path, nvidia_smi: str | None, cuda: str | None, choice: str, gpus: int
) -> None:
    proc = _choice(tmp_path, nvidia_smi, cuda)
    assert proc.returncode == 0, proc.stderr
    got_choice, got_gpus, why = proc.stdout.strip().split(" ", 2)
    assert (got_choice, int(got_gpus)) == (choice, gpus), proc.stdout
    if choice == "0" and cuda is None:
        assert why.startswith("no GPU visible") and "FPL_FAST_CUDA=1" in why


def test_a_bad_fpl_fast_cuda_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = _choice(tmp_path, None, "yes")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "scripts/setup.sh: FPL_FAST_CUDA must be 0, 1 or unset, got 'yes'\n"


def test_ci_asks_for_the_cuda_kernels() -> None:
    """CI runs on a machine it requires the CUDA kernels of: .ci/run sets FPL_FAST_CUDA=1 before scripts/setup.sh."""
    text = (REPO / ".ci" / "run").read_text()
    exports = [line for line in text.splitlines() if line.startswith("export ")]
    assert any("FPL_FAST_CUDA=1" in line.split() for line in exports), exports
    assert text.index("FPL_FAST_CUDA=1") < text.index("bash scripts/setup.sh")


def _setup_sh(repo: Path, gpu: bool, cuda: str | None) -> tuple[str, list[str]]:
    """scripts/setup.sh in a copy ``repo`` whose .venv/bin/python is a stand-in that logs each call with the
    FPL_FAST_CUDA and TORCH_CUDA_ARCH_LIST it sees (and "builds" by touching fpl_fast/_C.so); returns setup.sh's
    stdout and the new calls."""
    if not repo.exists():
        (repo / "scripts").mkdir(parents=True)
        for name in ("setup.sh", "cuda_choice.sh"):
            shutil.copy(REPO / "scripts" / name, repo / "scripts" / name)
        (repo / "csrc").mkdir()
        (repo / "csrc" / "op.cpp").write_text("// kernels\n")
        (repo / "setup.py").write_text("# setup\n")
        (repo / "pyproject.toml").write_text("# project\n")
        (repo / "fpl_fast").mkdir()
        (repo / ".venv" / "bin").mkdir(parents=True)
        fake = repo / ".venv" / "bin" / "python"
        fake.write_text(
            f"#!{BASH}\n"
            'echo "FPL_FAST_CUDA=${FPL_FAST_CUDA-unset} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST-unset} $*" '
            ">> calls.log\n"
            'if [[ " $* " == *" -e "* ]]; then touch fpl_fast/_C.so; fi\n'
        )
        fake.chmod(0o755)
        (repo / "bin").mkdir()
    smi = repo / "bin" / "nvidia-smi"  # stands in for (and shadows) any nvidia-smi of this machine
    smi.write_text(f"#!{BASH}\n" + (f"echo '{H100}'\n" if gpu else "echo 'No devices were found'; exit 6\n"))
    smi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("FPL_FAST_CUDA", "TORCH_CUDA_ARCH_LIST")}
    env["PATH"] = f"{repo / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    if cuda is not None:
        env["FPL_FAST_CUDA"] = cuda
    log = repo / "calls.log"
    before = len(log.read_text().splitlines()) if log.exists() else 0
    proc = subprocess.run([BASH, str(repo / "scripts" / "setup.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, log.read_text().splitlines()[before:]


def test_setup_sh_builds_with_the_choice_and_rebuilds_when_it_changes(tmp_path: Path) -> None:
    """No GPU, nvcc or not: setup.py gets FPL_FAST_CUDA=0; the same choice again skips the build; FPL_FAST_CUDA=1
    rebuilds with CUDA required (Hopper when no GPU is there to ask); a visible GPU leaves the choice to setup.py."""
    repo = tmp_path / "repo"
    out, calls = _setup_sh(repo, gpu=False, cuda=None)
    builds = [c for c in calls if " -e " in c]
    assert "fpl_fast: no GPU visible" in out and len(builds) == 1
    assert builds[0].startswith("FPL_FAST_CUDA=0 TORCH_CUDA_ARCH_LIST=unset ")
    out, calls = _setup_sh(repo, gpu=False, cuda=None)
    assert "build skipped" in out and not [c for c in calls if " -e " in c]
    out, calls = _setup_sh(repo, gpu=False, cuda="1")
    assert [c.split(" -m ")[0] for c in calls if " -e " in c] == ["FPL_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0"]
    out, calls = _setup_sh(repo, gpu=True, cuda=None)
    assert [c.split(" -m ")[0] for c in calls if " -e " in c] == ["FPL_FAST_CUDA=unset TORCH_CUDA_ARCH_LIST=unset"]
