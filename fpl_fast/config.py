"""Run configuration: one frozen dataclass with documented defaults, loadable from JSON and the CLI.

Defaults are the embedded offline job (tiny CLIP on scikit-learn's digits, 10 clients, dpfpl with DP on);
``PAPER`` lists the DP-FPL authors' settings for a real run (ViT-B/16, Caltech101, ...).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from fpl_fast.backbone.text_tower import TEXT_PATHS
from fpl_fast.prompts import factorization_names, get_factorization
from fpl_fast.validation import ConfigError, check_choice, check_finite, check_int, read_json_object

__all__ = [
    "RunConfig",
    "RunSettings",
    "PAPER",
    "CHOICES",
    "ENGINES",
    "METHODS",
    "DEFAULT_LR",
    "clients_per_round",
    "load_config_file",
]

ClipModeName = Literal["sample", "batch", "output"]
AccountantName = Literal["rdp", "pld"]
SamplingName = Literal["poisson", "shuffle"]

# Fixed choices of the enumerated settings (the factorisation's are the registry's: factorization_names()).
CHOICES: dict[str, tuple[str, ...]] = {
    "clip_mode": get_args(ClipModeName),
    "clip_uv": ("joint", "separate"),
    "calibration": ("accountant", "paper"),
    "accountant": get_args(AccountantName),
    "sampling": get_args(SamplingName),
    "calibrate_for": ("total", "each"),
    "sync": ("step", "round"),
    "partition": ("iid", "pathological", "dirichlet"),
    "pathological_split": ("balanced", "authors"),  # fpl_fast.data.splits.PATHOLOGICAL_SPLITS
    "steps_per_round": ("mean", "authors"),
    "precision": ("fp32", "bf16"),
    "text_path": TEXT_PATHS,  # fpl_fast.prompts.class_prompts.ClassPrompts (also FedDTPT's and RAPT's)
}


@dataclass(frozen=True)
class RunConfig:
    """The algorithm's settings of a federated DP-FPL job (see README for each flag); where and how the job runs
    (output folder, resuming, the attack after training) is :class:`RunSettings`."""

    # prompt
    factorization: str = "dpfpl"
    rank: int = 8
    n_ctx: int = 16
    full_grad_scale: float = 0.1
    # privacy
    noise: float | None = 1.5  # noise multiplier sigma (local and global); None when --epsilon is given
    noise_local: float | None = None  # overrides noise for the local prompt
    noise_global: float | None = None  # overrides noise for the global prompt
    epsilon: float | None = None  # target epsilon: calibrate sigma instead of --noise
    delta: float = 1e-5
    norm_thresh: float = 0.3  # clip norm C (tuned for the embedded model, bench/study_output_dp.py; authors: 10)
    clip_mode: ClipModeName = "sample"
    output_clip: float | str = 0.1  # --clip-mode output: C_o on each example's cotangent dl/dT (tuned), or "auto"
    clip_uv: str = "joint"
    calibration: str = "accountant"
    calibrate_for: str = "total"  # --epsilon bounds epsilon_total (both releases) or each release on its own
    accountant: AccountantName = "rdp"
    sampling: SamplingName | None = None  # None: poisson, or shuffle with --clip-mode batch (no Poisson account there)
    promptfl_client_noise: bool = False  # the authors' promptfl: clients noise G's gradient too (sigma_g C / b)
    # federation
    num_users: int = 10
    rounds: int = 20
    local_epochs: int = 1
    steps_per_round: str = "mean"  # the rule: E ceil(mean client size / b), or "authors": E floor(min size / b)
    sync: str = "step"
    client_fraction: float = 1.0
    lr: float | None = None  # None: the clip mode's default (DEFAULT_LR, tuned for the embedded model)
    momentum: float = 0.9
    batch_size: int = 8
    # data and model
    dataset: str = "digits"
    data_root: str = "data"
    model: str = "tiny-digits-clip"
    pretrained: str | None = "embedded"
    precision: str = "fp32"
    partition: str = "dirichlet"
    pathological_split: str = "balanced"  # every class to some client, or "authors": their fixed-seed shares
    beta: float = 0.5
    num_shots: int | None = None
    augment: bool = False
    # run
    eval_every: int = 1
    seed: int = 1
    noise_seed: int | None = None  # None: secret noise and sampling (OS CSPRNG keys); N: reproducible, not private
    device: str = "cpu"
    chunk_size: int | None = None  # per-sample gradient chunk (samples per vmap call); None = from activation size
    text_path: str = "shared"  # class prompts through the text tower: shared prefix once per client, or each whole

    def __post_init__(self) -> None:
        if self.sampling is None:
            object.__setattr__(self, "sampling", _default_sampling(self.clip_mode))
        if self.lr is None and self.clip_mode in DEFAULT_LR:
            object.__setattr__(self, "lr", DEFAULT_LR[self.clip_mode])
        for name, allowed in {"factorization": factorization_names(), **CHOICES}.items():
            check_choice(self, name, allowed)
        check_int(self, "rank", "n_ctx", "num_users", "rounds", "local_epochs", "batch_size", "eval_every")
        if self.num_shots is not None and self.num_shots < 1:
            raise ConfigError("num_shots", f"num_shots must be >= 1, got {self.num_shots}")
        if self.noise_seed is not None:
            check_int(self, "noise_seed", low=0, note=" (leave it out for secret noise)")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError("chunk_size", f"chunk_size must be >= 1, got {self.chunk_size}")
        for name in ("noise", "noise_local", "noise_global"):
            if getattr(self, name) is not None:
                check_finite(self, name, positive=False)
        if self.epsilon is not None:
            check_finite(self, "epsilon")
        if not 0 < self.delta < 1:
            raise ConfigError("delta", f"delta must be in (0, 1), got {self.delta}")
        if not (self.norm_thresh > 0):  # inf allowed: no clipping (only meaningful without noise)
            raise ConfigError("norm_thresh", f"norm_thresh must be > 0 (inf: no clipping), got {self.norm_thresh}")
        if not 0 < self.client_fraction <= 1:
            raise ConfigError("client_fraction", f"client_fraction must be in (0, 1], got {self.client_fraction}")
        check_finite(self, "lr")
        if not 0 <= self.momentum < 1:
            raise ConfigError("momentum", f"momentum must be in [0, 1), got {self.momentum}")
        check_finite(self, "beta", "full_grad_scale")
        if self.calibration == "paper" and self.epsilon is None:
            raise ConfigError(
                "calibration",
                "calibration='paper' needs epsilon (the authors' formula maps the target to sigma)",
                others=("epsilon",),
            )
        if get_factorization(self.factorization).uses_rank and self.rank > self.n_ctx:
            raise ConfigError(
                "rank",
                f"rank must be <= n_ctx ({self.n_ctx}) for {self.factorization}, got {self.rank}",
                others=("n_ctx",),
            )
        _check_output_clip(self)
        _check_promptfl_client_noise(self)
        if self.sampling == "poisson" and self.clip_mode == "batch":
            raise ConfigError(
                "sampling",
                "sampling='poisson' needs clip_mode='sample' (batch-mean clipping has no Poisson account)",
                others=("clip_mode",),
            )

    # ------------------------------------------------------------------------------------------
    @property
    def sampling_scheme(self) -> SamplingName:
        """The sampling in force (a ``sampling`` left None is filled from the clip mode)."""
        assert self.sampling is not None
        return self.sampling

    @property
    def learning_rate(self) -> float:
        """The SGD learning rate in force (an ``lr`` left None is the clip mode's default)."""
        assert self.lr is not None
        return float(self.lr)

    @property
    def dp_enabled(self) -> bool:
        """Whether any noise is added (calibrated or given)."""
        return self.epsilon is not None or any((x or 0) > 0 for x in (self.noise, self.noise_local, self.noise_global))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RunConfig:
        # A sampling that is the clip mode's default follows a change of clip mode (poisson <-> shuffle).
        if "clip_mode" in changes and "sampling" not in changes and self.sampling == _default_sampling(self.clip_mode):
            changes["sampling"] = None
        if "clip_mode" in changes and "lr" not in changes and self.lr == DEFAULT_LR.get(self.clip_mode):
            changes["lr"] = None  # and so does the clip mode's default learning rate
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RunSettings:
    """Where and how a job runs, apart from what it computes (a checkpoint resumes under other settings).

    Attributes:
        out: output folder (None: runs/<timestamp>).
        resume: continue the stopped run in ``out`` from its checkpoint.
        mia: shadow models of the membership-inference attack run after training (0: no attack).
        progress: show a progress bar.
        feature_cache: a folder of image features on disk, shared across runs (None: encode in memory only).
        engine: "inprocess" (all clients in this process) or "flower-sim" (Flower's simulation runtime, one
            SuperNode per client, over the same client and server objects).
        tensorboard: a folder for a TensorBoard log of every round (fpl_fast.tracking; needs the tensorboard
            package); None: no log. results.json and rounds.csv stay the record.
    """

    out: str | None = None
    resume: bool = False
    mia: int = 0
    progress: bool = True
    feature_cache: str | None = None
    engine: str = "inprocess"
    tensorboard: str | None = None

    def __post_init__(self) -> None:
        check_int(self, "mia", low=0, note=" (shadow models; 0: no attack)")
        check_choice(self, "engine", ENGINES)
        if self.engine != "inprocess" and self.mia:
            raise ConfigError("mia", f"mia needs engine='inprocess' (engine={self.engine!r})", others=("engine",))
        if self.resume and not self.out:
            raise ConfigError("resume", "resume needs out, the folder of the run to continue", others=("out",))
        if self.tensorboard is not None and (not isinstance(self.tensorboard, str) or not self.tensorboard.strip()):
            raise ConfigError("tensorboard", f"tensorboard must be a folder path, got {self.tensorboard!r}")


ENGINES = ("inprocess", "flower-sim")
# --method: DP-FPL (RunConfig) or a method of fpl_fast.methods with its own Config and run().
METHODS = ("dpfpl", "feddtpt", "rapt")

# Learning rates by clip mode for the embedded model, tuned on the public digits-tune split at epsilon_total 3
# (bench/study_output_dp.py; README "Output-space DP: the utility study"). Batch mode keeps its earlier 0.1.
DEFAULT_LR = {"sample": 0.03, "output": 3.0, "batch": 0.1}


def clients_per_round(client_fraction: float, num_clients: int) -> int:
    """Clients the server samples each round: round(fraction K), at least one (the privacy plan relies on it)."""
    return max(1, round(client_fraction * num_clients))


def _default_sampling(clip_mode: str) -> SamplingName:
    """Poisson sampling (what the accountant assumes), except for batch-mean clipping, which has no Poisson account."""
    return "shuffle" if clip_mode == "batch" else "poisson"


def _check_output_clip(cfg: RunConfig) -> None:
    """output_clip is a number > 0 or auto; clip_mode output has one release per step (one noise, no U/V split)."""
    value = cfg.output_clip
    if isinstance(value, str):
        if value != "auto":
            raise ConfigError("output_clip", f"output_clip must be a number > 0 or auto, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ConfigError("output_clip", f"output_clip must be a finite number > 0 or auto, got {value!r}")
    if cfg.clip_mode != "output":
        return
    for name in ("noise_local", "noise_global"):
        if getattr(cfg, name) is not None:
            raise ConfigError(
                name,
                f"{name} does not apply to clip_mode='output' (one release per step protects both prompts); use noise",
                others=("clip_mode", "noise"),
            )
    if cfg.clip_uv != "joint":
        raise ConfigError(
            "clip_uv",
            "clip_uv applies to the parameter clip modes; clip_mode='output' clips the head's cotangents",
            others=("clip_mode",),
        )


def _check_promptfl_client_noise(cfg: RunConfig) -> None:
    """The authors' extra client noise exists only in their promptfl with per-step averaging by a noising server
    (their DP_FPL.py); anywhere else it would be a mechanism nobody asked for, accounted for nowhere."""
    value = cfg.promptfl_client_noise
    if not isinstance(value, bool):
        raise ConfigError("promptfl_client_noise", f"promptfl_client_noise must be true or false, got {value!r}")
    if value and (cfg.factorization != "promptfl" or cfg.sync != "step" or cfg.clip_mode == "output"):
        raise ConfigError(
            "promptfl_client_noise",
            "promptfl_client_noise needs factorization='promptfl', sync='step' and a parameter clip mode (the "
            f"authors' promptfl), got factorization={cfg.factorization!r}, sync={cfg.sync!r}, "
            f"clip_mode={cfg.clip_mode!r}",
            others=("factorization", "sync", "clip_mode"),
        )


# The DP-FPL authors' run settings (README, "The paper's setting"): use with real weights and data.
PAPER: dict[str, Any] = {
    "model": "ViT-B-16",
    "pretrained": "openai",
    "dataset": "caltech101",
    "precision": "fp32",
    "lr": 0.001,
    "momentum": 0.9,
    "batch_size": 32,
    "n_ctx": 16,
    "rank": 8,
    "norm_thresh": 10.0,
    "num_users": 10,
    "rounds": 100,
    "local_epochs": 1,
    "sync": "step",
    "partition": "pathological",
    "augment": True,
}


def load_config_file(path: str | Path, allowed: set[str] | None = None) -> dict[str, Any]:
    """Read a JSON config file into a dict of settings (keys outside ``allowed``, default RunConfig's, are an error)."""
    p = Path(path)
    data = read_json_object(p, "--config")
    known = (
        allowed if allowed is not None else {f.name for f in fields(RunConfig)} | {f.name for f in fields(RunSettings)}
    )
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--config {p} has unknown settings {unknown}; allowed: {sorted(known)}")
    return data
