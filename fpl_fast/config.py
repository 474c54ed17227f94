"""Run configuration: the algorithm's settings (:class:`RunConfig`) and the run's (:class:`RunSettings`), frozen
dataclasses with their defaults and checks, loadable from JSON and the CLI.

Every field is declared with :func:`setting`: its flag, help text, section and allowed values live in its metadata,
the one source from which ``python -m fpl_fast.run``'s parser, its ``--config`` keys (the fields' names) and the CLI
reference are built (:mod:`fpl_fast.run`). Defaults are the embedded offline job (tiny CLIP on scikit-learn's
digits, 10 clients, dpfpl with DP on); ``PAPER`` lists the DP-FPL authors' settings for a real run (ViT-B/16,
Caltech101, ...). :func:`resumed_config` is the configuration of a stopped run, from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from fpl_fast import outputs
from fpl_fast.backbone.protocol import TEXT_PATHS
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
    "IMAGENET_VARIANTS",
    "PROTOCOLS",
    "SECTIONS",
    "allowed_values",
    "check_trainable",
    "clients_dropped",
    "clients_per_round",
    "load_config_file",
    "resumed_config",
    "setting",
    "setting_fields",
    "value_kind",
]

ClipModeName = Literal["sample", "batch", "output"]
AccountantName = Literal["rdp", "pld"]
SamplingName = Literal["poisson", "shuffle"]

ENGINES = ("inprocess", "flower-sim")
# --method: DP-FPL (RunConfig) or a method of fpl_fast.methods with its own Config and run().
METHODS = ("dpfpl", "feddtpt", "rapt")

# --protocol (docs/explanation/protocols.md): personal is the clients' own splits (local and neighbour accuracy).
PROTOCOLS = ("personal", "global", "dual", "base2novel", "xdataset", "xdomain")
# The test-only targets of --protocol xdomain, by their dataset names: fpl_fast.data.layouts.IMAGENET_VARIANTS (not
# imported: fpl_fast.data costs seconds to import; tests/test_coop_layouts.py checks the two agree).
IMAGENET_VARIANTS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")

# Learning rates by clip mode for the embedded model, tuned on the public digits-tune split at epsilon_total 3
# (bench/study_output_dp.py; README "Output-space DP: the utility study"); "automatic", per-sample mode's automatic
# clipping, by bench/study_clipping.py. Batch mode keeps its earlier 0.1.
DEFAULT_LR = {"sample": 0.03, "automatic": 0.00711, "output": 3.0, "batch": 0.1}
# The fixed clip norm where --norm-thresh is not given and clipping is fixed (batch mode, --clip-style clip): tuned
# for the embedded model on digits-tune (the authors use 10).
FIXED_CLIP_NORM = 0.3

# The sections of the settings, in the order of ``--help`` and of the CLI reference: name -> what they hold.
SECTIONS: dict[str, str] = {
    "prompt": "the learned prompt and its factorisation",
    "privacy": "the noise and its accounting",
    "clipping": "clipping and batch sampling",
    "adaptive": "adaptive (--norm-thresh adaptive) and automatic (--clip-style automatic) clipping",
    "federation": "clients, rounds and local training",
    "data": "the dataset and its split over the clients",
    "protocol": "what is evaluated: the evaluation protocol and its target datasets",
    "model": "the frozen CLIP and where it runs",
    "run": "the output folder, resuming, what runs after training",
}


def setting(
    default: Any,
    flag: str,
    help: str,
    *,
    section: str,
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
    kind: str | None = None,
    none: str | None = None,
    metavar: str | None = None,
    switch: bool = False,
) -> Any:
    """A settings field with what the CLI, the ``--config`` file and the docs know of it, in its metadata.

    Args:
        default: the field's default (``--help`` and the docs render it; a help text never repeats it).
        flag: its command-line flag (the ``--config`` key is the field's name).
        help: what it sets, in one or two sentences.
        section: its group in ``--help`` and in the CLI reference (a key of :data:`SECTIONS`).
        choices: the allowed values (a function for a registry that can grow), where the field takes a fixed set.
        kind: how a flag's text is read where the annotation does not say: "number-or-auto", "number-or-adaptive".
        none: what a default of None means ("runs/<timestamp>"), shown in place of the default.
        metavar: the flag's value in --help (default: by its type, N, X, TEXT, or its choices).
        switch: the flag takes no value and sets the field to the opposite of its default.
    """
    meta = {"flag": flag, "help": help, "section": section, "choices": choices, "kind": kind, "none": none}
    return field(default=default, metadata={**meta, "metavar": metavar, "switch": switch})


_FACTORIZATIONS = (
    "promptfl: G only | fedotp: G + L | fedpgp: G + U V | dplora: G + lowrank(L) | dpfpl: G + lowrank(L) + R"
)


@dataclass(frozen=True)
class RunConfig:
    """The algorithm's settings of a federated DP-FPL job; where and how the job runs (output folder, resuming, the
    attack after training) is :class:`RunSettings`. Each field's flag, help and allowed values are in its metadata
    (:func:`setting`); ``python -m fpl_fast.run --help`` and the CLI reference are rendered from them."""

    # prompt
    factorization: str = setting(
        "dpfpl",
        "--factorization",
        f"how each client's context is built from the global prompt G and its local prompt ({_FACTORIZATIONS})",
        section="prompt",
        choices=factorization_names,
    )
    rank: int = setting(8, "--rank", "rank r of the low-rank local prompt U V (at most --n-ctx)", section="prompt")
    n_ctx: int = setting(16, "--n-ctx", "number of learned context tokens", section="prompt")
    full_grad_scale: float = setting(
        0.1, "--full-grad-scale", "scale of the local prompt's gradient rebuilt from those of U and V", section="prompt"
    )
    # privacy
    noise: float | None = setting(
        1.5,
        "--noise",
        "noise MULTIPLIER sigma of the local and the global prompt (noise std = sigma C). The DP-FPL authors' --noise "
        "is an epsilon: for theirs use --epsilon E --calibration paper",
        section="privacy",
    )
    noise_local: float | None = setting(
        None, "--noise-local", "noise multiplier of the local prompt", section="privacy", none="--noise"
    )
    noise_global: float | None = setting(
        None, "--noise-global", "noise multiplier of the global prompt", section="privacy", none="--noise"
    )
    epsilon: float | None = setting(
        None,
        "--epsilon",
        "target epsilon: calibrate the noise multiplier for it instead of giving --noise (what it bounds: "
        "--calibrate-for)",
        section="privacy",
        none="none (--noise is used)",
    )
    delta: float = setting(1e-5, "--delta", "delta of the (epsilon, delta) guarantee", section="privacy")
    norm_thresh: float | str | None = setting(
        None,
        "--norm-thresh",
        "clip norm C of the parameter clip modes (fixed clipping; the authors use 10; inf: no clipping), or adaptive: "
        "each client's C follows a private quantile of its per-example norms (--target-quantile; with --clip-mode "
        "output it adapts C_o). Given, it turns automatic clipping off",
        section="clipping",
        kind="number-or-adaptive",
        none=f"not given: automatic clipping in sample mode, else C = {FIXED_CLIP_NORM:g}",
    )
    clip_init: float = setting(
        10.0,
        "--clip-init",
        "with --norm-thresh adaptive: every client's starting C (the authors' C)",
        section="adaptive",
    )
    target_quantile: float = setting(
        0.5,
        "--target-quantile",
        "with --norm-thresh adaptive: the fraction gamma of per-example norms each client's C should leave unclipped",
        section="adaptive",
    )
    clip_lr: float = setting(
        0.2,
        "--clip-lr",
        "with --norm-thresh adaptive: eta of the geometric update C <- C exp(-eta (unclipped fraction - gamma))",
        section="adaptive",
    )
    clip_min: float = setting(
        1e-3,
        "--clip-min",
        "with --norm-thresh adaptive: the smallest C a client may reach",
        section="adaptive",
    )
    clip_max: float = setting(
        100.0,
        "--clip-max",
        "with --norm-thresh adaptive: the largest C a client may reach",
        section="adaptive",
    )
    count_budget: float = setting(
        0.1,
        "--count-budget",
        "with --norm-thresh adaptive: the share of each step's privacy budget (of z_eff^-2) spent on the noised "
        "unclipped counts",
        section="adaptive",
    )
    clip_style: str | None = setting(
        None,
        "--clip-style",
        "clip: each example's gradient scaled by min(1, C / norm) | automatic: by 1 / (norm + --clip-stability) "
        "(Bu et al.; sensitivity 1, no C to tune; --clip-mode sample only; not --output-clip auto, which bounds the "
        "output mode's cotangents)",
        section="adaptive",
        choices=("clip", "automatic"),
        none="automatic with --clip-mode sample and no --norm-thresh (bench/study_clipping.py), else clip",
    )
    clip_stability: float = setting(
        0.01,
        "--clip-stability",
        "with --clip-style automatic: the stability constant added to each norm",
        section="adaptive",
    )
    clip_mode: ClipModeName = setting(
        "sample",
        "--clip-mode",
        "sample: clip each example's prompt gradient (per-example DP) | output: clip each example's gradient w.r.t. "
        "the class text features, noise once, one backward (per-example DP) | batch: the authors' batch-mean clip "
        "(not per-example)",
        section="clipping",
    )
    output_clip: float | str = setting(
        0.1,
        "--output-clip",
        "with --clip-mode output: clip norm C_o of each example's cotangent (tuned), or auto: the cosine head's bound "
        "sqrt(2) s / min_c ||T_c|| (never clips)",
        section="clipping",
        kind="number-or-auto",
    )
    clip_uv: str = setting(
        "joint",
        "--clip-uv",
        "joint: one norm over (g_U, g_V) | separate: each factor to C, the authors' clip",
        section="clipping",
        choices=("joint", "separate"),
    )
    calibration: str = setting(
        "accountant",
        "--calibration",
        "with --epsilon: accountant: the accountant's sigma | paper: the authors' sqrt(rounds log(1/delta)) / epsilon",
        section="privacy",
        choices=("accountant", "paper"),
    )
    calibrate_for: str = setting(
        "total",
        "--calibrate-for",
        "with --epsilon: total: epsilon_total of both releases <= E | each: each release alone <= E",
        section="privacy",
        choices=("total", "each"),
    )
    accountant: AccountantName = setting(
        "rdp", "--accountant", "dp-accounting's RDP or PLD accountant", section="privacy"
    )
    sampling: SamplingName | None = setting(
        None,
        "--sampling",
        "poisson: Poisson sampling (the accountant's bound is then proven) | shuffle: fixed-size shuffled batches "
        "(accounted as Poisson, an approximation)",
        section="clipping",
        none="poisson; shuffle with --clip-mode batch",
    )
    promptfl_client_noise: bool = setting(
        False,
        "--promptfl-client-noise",
        "with --factorization promptfl --sync step: each client also adds N(0, (sigma C / b)^2) to its clipped "
        "gradient of G, as the authors' promptfl does; accounted with the server's noise as one Gaussian",
        section="privacy",
    )
    # federation
    num_users: int = setting(10, "--num-users", "number of clients K", section="federation")
    rounds: int = setting(20, "--rounds", "communication rounds", section="federation")
    local_epochs: int = setting(1, "--local-epochs", "local epochs E per round", section="federation")
    steps_per_round: str = setting(
        "mean",
        "--steps-per-round",
        "local steps per round: mean: E ceil(mean client size / b) | authors: E floor(smallest client size / b), "
        "the authors' count",
        section="federation",
        choices=("mean", "authors"),
    )
    sync: str = setting(
        "step",
        "--sync",
        "step: average the global gradient every local step (the authors') | round: FedAvg",
        section="federation",
        choices=("step", "round"),
    )
    client_fraction: float = setting(
        1.0, "--client-fraction", "fraction of the clients sampled per round", section="federation"
    )
    client_drop_rate: float = setting(
        0.0,
        "--client-drop-rate",
        "fraction P of each round's m sampled clients that drop out for the whole round: floor(P m) of them, chosen "
        "uniformly by the server's secret generator; a dropped client takes no step and spends no budget",
        section="federation",
    )
    lr: float | None = setting(
        None,
        "--lr",
        "SGD learning rate (the paper uses 0.001)",
        section="federation",
        none="by --clip-mode, tuned for the embedded model: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()),
    )
    momentum: float = setting(0.9, "--momentum", "SGD momentum", section="federation")
    batch_size: int = setting(
        8,
        "--batch-size",
        "local batch size b, expected under Poisson sampling (at most the smallest client's examples; the paper "
        "uses 32)",
        section="federation",
    )
    # data and model
    dataset: str = setting(
        "digits",
        "--dataset",
        "digits (embedded) | digits-tune (its public pretraining part, for tuning) | CoOp's datasets in CoOp's "
        "layouts under --data-root: caltech101 | oxford_pets | oxford_flowers | food101 | dtd | imagenet | "
        "stanford_cars | fgvc_aircraft | sun397 | eurosat | ucf101 (the test-only imagenet_v2 | imagenet_sketch | "
        "imagenet_a | imagenet_r are evaluation targets, never trained on) | cifar10 | cifar100",
        section="data",
        metavar="NAME",
    )
    data_root: str = setting(
        "data",
        "--data-root",
        "folder of the datasets (CoOp layouts; CIFAR as torchvision saves it)",
        section="data",
        metavar="DIR",
    )
    model: str = setting(
        "tiny-digits-clip",
        "--model",
        "open_clip model name (e.g. ViT-B-16, RN50) or a config shipped in fpl_fast/configs",
        section="model",
        metavar="NAME",
    )
    pretrained: str | None = setting(
        "embedded",
        "--pretrained",
        "an open_clip tag (e.g. openai), a local checkpoint file, embedded (the shipped tiny weights), or none",
        section="model",
        metavar="TAG|FILE",
    )
    precision: str = setting(
        "fp32", "--precision", "compute precision of the frozen encoders", section="model", choices=("fp32", "bf16")
    )
    partition: str = setting(
        "dirichlet",
        "--partition",
        "how the training data is split over the clients",
        section="data",
        choices=("iid", "pathological", "dirichlet"),
    )
    pathological_split: str = setting(
        "balanced",
        "--pathological-split",
        "with --partition pathological: balanced: every class to some client, shares differing by at most one class "
        "| authors: the authors' shares (classes shuffled with seed 2023 whatever --seed)",
        section="data",
        choices=("balanced", "authors"),  # fpl_fast.data.splits.PATHOLOGICAL_SPLITS
    )
    beta: float = setting(0.5, "--beta", "Dirichlet concentration of --partition dirichlet", section="data")
    num_shots: int | None = setting(
        None,
        "--num-shots",
        "few-shot: training examples per class, of each client (--shots-protocol per-client) or of the whole training "
        "set (coop)",
        section="data",
        none="all",
    )
    shots_protocol: str = setting(
        "per-client",
        "--shots-protocol",
        "with --num-shots: per-client: each client keeps that many per class of its share, drawn after the split | "
        "coop: CoOp's protocol, that many per class of the whole training set drawn from --seed alone (the same "
        "shots whatever the clients or the partition), then split",
        section="data",
        choices=("per-client", "coop"),  # fpl_fast.data.splits.SHOTS_PROTOCOLS
    )
    augment: bool = setting(
        False,
        "--augment",
        "random resized crop and flip in training (image features recomputed each step)",
        section="data",
    )
    # protocol
    protocol: str = setting(
        "personal",
        "--protocol",
        "personal: each client's prompt on its own test split and the others' | global: also the global prompt "
        "alone on the whole test split | dual: both and their harmonic mean | base2novel: train on the first "
        "ceil(n/2) classes, test the global and the personalised prompts on those (base) and the rest (novel) | "
        "xdataset: also the prompts on --eval-datasets' test splits and class names | xdomain: xdataset from "
        "--dataset imagenet to its four variants (docs/explanation/protocols.md)",
        section="protocol",
        choices=PROTOCOLS,
    )
    eval_datasets: str | None = setting(
        None,
        "--eval-datasets",
        "with --protocol xdataset: comma-separated datasets whose test splits and class names the prompts are "
        "evaluated on (xdomain: some of " + ", ".join(IMAGENET_VARIANTS) + "); the other protocols leave it "
        "unused, so that one grid spec covers them all",
        section="protocol",
        none="none (xdomain: its four variants)",
        metavar="NAME[,NAME...]",
    )
    # run
    eval_every: int = setting(1, "--eval-every", "evaluate every N rounds", section="federation")
    seed: int = setting(1, "--seed", "seed of the public random choices: initialisation, data splits", section="data")
    noise_seed: int | None = setting(
        None,
        "--noise-seed",
        "make the noise and the batch sampling reproducible from N (research only: no guarantee against anyone who "
        "knows N)",
        section="privacy",
        none="secret keys from the OS, per client and server",
    )
    device: str = setting("cpu", "--device", "cpu, cuda or cuda:N", section="model", metavar="DEVICE")
    chunk_size: int | None = setting(
        None,
        "--chunk-size",
        "per-sample gradients: examples per vmapped backward",
        section="model",
        none="sized to the activations",
    )
    text_path: str = setting(
        "shared",
        "--text-path",
        "class prompts through the text tower: shared: the prefix [SOS, context] once per client, each class only "
        "on its name tokens (exact; causal towers pooling at EOT, others take full) | full: every prompt whole",
        section="prompt",
        choices=TEXT_PATHS,  # fpl_fast.prompts.class_prompts.ClassPrompts (also FedDTPT's and RAPT's)
    )

    def __post_init__(self) -> None:
        if self.sampling is None:
            object.__setattr__(self, "sampling", _default_sampling(self.clip_mode))
        if self.clip_style is None:
            object.__setattr__(self, "clip_style", _default_clip_style(self.clip_mode, self.norm_thresh))
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR.get(_lr_key(self.clip_mode, self.clip_style)))
        for name, allowed in {"factorization": factorization_names(), **CHOICES}.items():
            check_choice(self, name, allowed)
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ConfigError("device", f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        check_int(self, "rank", "n_ctx", "num_users", "rounds", "local_epochs", "batch_size", "eval_every")
        if self.num_shots is not None and self.num_shots < 1:
            raise ConfigError("num_shots", f"num_shots must be >= 1, got {self.num_shots}")
        check_trainable(self.dataset)
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
        _check_clip_norm(self)
        if not 0 < self.client_fraction <= 1:
            raise ConfigError("client_fraction", f"client_fraction must be in (0, 1], got {self.client_fraction}")
        _check_client_drop_rate(self)
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
        _check_protocol(self)
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
    def eval_dataset_names(self) -> tuple[str, ...]:
        """The datasets --protocol xdataset / xdomain evaluates on (xdomain without --eval-datasets: the four
        ImageNet variants); none for the other protocols."""
        if self.protocol not in ("xdataset", "xdomain"):
            return ()
        if self.eval_datasets is None:
            return IMAGENET_VARIANTS if self.protocol == "xdomain" else ()
        return tuple(name.strip() for name in self.eval_datasets.split(","))

    @property
    def adaptive_clip(self) -> bool:
        """Each client's clip norm follows a private quantile of its per-example norms (--norm-thresh adaptive)."""
        return self.norm_thresh == "adaptive"

    @property
    def automatic_clip(self) -> bool:
        """Automatic clipping: each per-example gradient normalised, sensitivity 1 (--clip-style automatic)."""
        return self.clip_style == "automatic"

    @property
    def clip_norm(self) -> float:
        """The clip norm C in force at the start: --norm-thresh, --clip-init when adaptive, 1 with automatic
        clipping (the sensitivity of a normalised gradient)."""
        if self.automatic_clip:
            return 1.0
        if self.adaptive_clip:
            return float(self.clip_init)
        return FIXED_CLIP_NORM if self.norm_thresh is None else float(self.norm_thresh)

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
        style_set = ("clip_mode" in changes or "norm_thresh" in changes) and "clip_style" not in changes
        if style_set and self.clip_style == _default_clip_style(self.clip_mode, self.norm_thresh):
            changes["clip_style"] = None  # a clip style that is the default follows the clip mode and norm_thresh
        moved = ("clip_mode" in changes or "clip_style" in changes) and "lr" not in changes
        if moved and self.lr == DEFAULT_LR.get(_lr_key(self.clip_mode, self.clip_style)):
            changes["lr"] = None  # and so does their default learning rate
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RunSettings:
    """Where and how a job runs, apart from what it computes (a checkpoint resumes under other settings); each
    field's flag and help are in its metadata, as :class:`RunConfig`'s.

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

    out: str | None = setting(None, "--out", "output folder", section="run", none="runs/<timestamp>", metavar="DIR")
    resume: bool = setting(
        False,
        "--resume",
        "continue the stopped run in --out from its checkpoint, with the configuration saved there",
        section="run",
        switch=True,
    )
    mia: int = setting(
        0,
        "--mia",
        "membership-inference attack after training with N shadow models (writes mia.json; 0: none)",
        section="run",
    )
    progress: bool = setting(True, "--quiet", "no progress bar", section="run", switch=True)
    feature_cache: str | None = setting(
        None,
        "--feature-cache",
        "folder of image features on disk, shared across runs and processes: one checksummed file per image encoder "
        "(its weights), transform, dataset, split and size",
        section="run",
        none="none (encoded in memory)",
        metavar="DIR",
    )
    engine: str = setting(
        "inprocess",
        "--engine",
        "inprocess: every client in this process | flower-sim: Flower's simulation runtime, one SuperNode per "
        "client (needs pip install .[flower])",
        section="run",
        choices=ENGINES,
    )
    tensorboard: str | None = setting(
        None,
        "--tensorboard",
        "folder for a TensorBoard log of every round (needs pip install .[tensorboard]); the private/* tags (loss, "
        "clipped fraction) are statistics of the clients' private data that no DP guarantee covers",
        section="run",
        none="none (no log)",
        metavar="DIR",
    )

    def __post_init__(self) -> None:
        check_int(self, "mia", low=0, note=" (shadow models; 0: no attack)")
        check_choice(self, "engine", ENGINES)
        if self.engine != "inprocess" and self.mia:
            raise ConfigError("mia", f"mia needs engine='inprocess' (engine={self.engine!r})", others=("engine",))
        if self.resume and not self.out:
            raise ConfigError("resume", "resume needs out, the folder of the run to continue", others=("out",))
        if self.tensorboard is not None and (not isinstance(self.tensorboard, str) or not self.tensorboard.strip()):
            raise ConfigError("tensorboard", f"tensorboard must be a folder path, got {self.tensorboard!r}")


def setting_fields() -> list[Field[Any]]:
    """Every setting, RunConfig's then RunSettings': the flags of ``python -m fpl_fast.run`` and the keys of its
    ``--config`` file (a field's name)."""
    return [*fields(RunConfig), *fields(RunSettings)]


_HINTS = {**get_type_hints(RunConfig), **get_type_hints(RunSettings)}


def allowed_values(f: Field[Any]) -> tuple[str, ...] | None:
    """The values a setting takes where they are a fixed set: its metadata's choices, or its Literal type's."""
    choices = f.metadata.get("choices")
    if callable(choices):
        return tuple(choices())
    if choices is not None:
        return tuple(choices)
    hint = _HINTS[f.name]
    literal = [
        t
        for t in (hint, *(get_args(hint) if get_origin(hint) in (Union, UnionType) else ()))
        if get_origin(t) is Literal
    ]
    return get_args(literal[0]) if literal else None


def value_kind(f: Field[Any]) -> str:
    """How a setting's text is read: "int", "float", "bool", "str" (from its type, None aside) or its metadata's
    kind ("number-or-auto", "number-or-adaptive")."""
    if f.metadata.get("kind"):
        return str(f.metadata["kind"])
    hint = _HINTS[f.name]
    union = get_origin(hint) in (Union, UnionType)
    types = [t for t in (get_args(hint) if union else (hint,)) if t is not type(None)]
    if len(types) == 1 and types[0] in (int, float, bool, str):
        return types[0].__name__
    if len(types) == 1 and get_origin(types[0]) is Literal:
        return "str"
    raise TypeError(f"setting {f.name}: give kind= for its type {hint}")


# The settings that take a fixed set of values (the factorisation's are the registry's: factorization_names()).
CHOICES: dict[str, tuple[str, ...]] = {
    f.name: values
    for f in fields(RunConfig)
    if not callable(f.metadata.get("choices")) and (values := allowed_values(f)) is not None
}
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def clients_per_round(client_fraction: float, num_clients: int) -> int:
    """Clients the server samples each round: round(fraction K), at least one (the privacy plan relies on it)."""
    return max(1, round(client_fraction * num_clients))


def clients_dropped(drop_rate: float, sampled: int) -> int:
    """Sampled clients that drop out of a round at --client-drop-rate P: floor(P m) of the m sampled (a fixed,
    public count, so the clients that report, m - floor(P m) >= 1, are known to the privacy plan)."""
    return max(0, min(sampled - 1, math.floor(drop_rate * sampled + 1e-9)))  # 1e-9: 0.29 x 100 is 28.99..


def _check_client_drop_rate(cfg: RunConfig) -> None:
    """client_drop_rate is in [0, 1), and a rate above 0 drops at least one of the clients sampled each round."""
    rate = cfg.client_drop_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ConfigError("client_drop_rate", f"client_drop_rate must be a number in [0, 1), got {rate!r}")
    m = clients_per_round(cfg.client_fraction, cfg.num_users)
    if rate > 0 and clients_dropped(rate, m) == 0:
        raise ConfigError(
            "client_drop_rate",
            f"client_drop_rate {rate:g} drops floor({rate:g} x {m}) = 0 of the {m} clients sampled each round; "
            f"use 0 or a rate of at least 1/{m} = {1 / m:.4g}",
            others=("num_users", "client_fraction"),
        )


def _default_sampling(clip_mode: str) -> SamplingName:
    """Poisson sampling (what the accountant assumes), except for batch-mean clipping, which has no Poisson account."""
    return "shuffle" if clip_mode == "batch" else "poisson"


def check_trainable(dataset: str) -> None:
    """A test-only dataset (an ImageNet variant) has no training split: refused by name before anything loads (also
    by the other methods' configs).

    Raises:
        ConfigError: ``dataset`` is test-only (field ``dataset``).
    """
    if dataset in ("digits", "digits-tune"):  # the embedded data: no need to import the dataset readers (seconds)
        return
    from fpl_fast.data.layouts import TEST_ONLY_DATASETS

    if dataset in TEST_ONLY_DATASETS:
        raise ConfigError(
            "dataset",
            f"dataset {dataset!r} is test-only (no training split; test-only: {', '.join(TEST_ONLY_DATASETS)}): "
            "train on imagenet and evaluate on it as a target",
        )


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


def _default_clip_style(clip_mode: str, norm_thresh: Any) -> str:
    """Automatic clipping where it applies (per-sample mode) and no clip norm was given (bench/study_clipping.py: it
    matched the tuned fixed C within a standard error in 5 of 6 cells, adaptive clipping in none)."""
    return "automatic" if clip_mode == "sample" and norm_thresh is None else "clip"


def _lr_key(clip_mode: str, clip_style: str | None) -> str:
    """DEFAULT_LR's key of a clip mode and style."""
    return "automatic" if clip_style == "automatic" else clip_mode


def _check_clip_norm(cfg: RunConfig) -> None:
    """norm_thresh is a number > 0 (inf: no clipping) or adaptive; the adaptive and automatic settings' ranges and
    the clip modes that take them."""
    value = cfg.norm_thresh
    if value is None:
        pass
    elif isinstance(value, str):
        if value != "adaptive":
            raise ConfigError("norm_thresh", f"norm_thresh must be a number > 0, inf or adaptive, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError("norm_thresh", f"norm_thresh must be > 0 (inf: no clipping) or adaptive, got {value!r}")
    check_finite(cfg, "clip_init", "clip_lr", "clip_min", "clip_max", "clip_stability")
    if not 0 < cfg.target_quantile < 1:
        raise ConfigError("target_quantile", f"target_quantile must be in (0, 1), got {cfg.target_quantile}")
    if not 0 < cfg.count_budget < 1:
        raise ConfigError(
            "count_budget",
            f"count_budget must be in (0, 1) (the counts' share of each step's budget; the releases keep the rest), "
            f"got {cfg.count_budget}",
        )
    if not cfg.clip_min < cfg.clip_max:
        raise ConfigError(
            "clip_min", f"clip_min must be < clip_max, got {cfg.clip_min} and {cfg.clip_max}", others=("clip_max",)
        )
    if cfg.adaptive_clip:
        if not cfg.clip_min <= cfg.clip_init <= cfg.clip_max:
            raise ConfigError(
                "clip_init",
                f"clip_init must be in [clip_min, clip_max] = [{cfg.clip_min:g}, {cfg.clip_max:g}], "
                f"got {cfg.clip_init}",
                others=("clip_min", "clip_max"),
            )
        if cfg.clip_mode == "batch":
            raise ConfigError(
                "norm_thresh",
                "norm_thresh='adaptive' needs a per-example clip mode (sample or output): batch-mean clipping has no "
                "per-example norms to count",
                others=("clip_mode",),
            )
        if cfg.clip_mode == "output" and cfg.output_clip == "auto":
            raise ConfigError(
                "norm_thresh",
                "norm_thresh='adaptive' adapts the output mode's C_o: leave out output_clip='auto' (a bound, not a "
                "clip norm)",
                others=("output_clip",),
            )
    if cfg.automatic_clip:
        if cfg.clip_mode != "sample":
            raise ConfigError(
                "clip_style",
                f"clip_style='automatic' needs clip_mode='sample' (per-example gradients to normalise), got "
                f"clip_mode={cfg.clip_mode!r}; the output mode's output_clip='auto' is another thing (a bound on "
                "its cotangents)",
                others=("clip_mode",),
            )
        if cfg.norm_thresh is not None:
            raise ConfigError(
                "clip_style",
                f"clip_style='automatic' has no clip norm: leave out norm_thresh (got {cfg.norm_thresh!r})",
                others=("norm_thresh",),
            )
    if cfg.clip_stability <= 0:
        raise ConfigError("clip_stability", f"clip_stability must be > 0, got {cfg.clip_stability}")
    if cfg.clip_init <= 0 or cfg.clip_min <= 0:
        raise ConfigError("clip_min", f"clip_min and clip_init must be > 0, got {cfg.clip_min} and {cfg.clip_init}")
    if cfg.clip_lr <= 0:
        raise ConfigError("clip_lr", f"clip_lr must be > 0, got {cfg.clip_lr}")


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


def _check_protocol(cfg: RunConfig) -> None:
    """eval_datasets is a comma-separated list of distinct names (a list is joined); xdataset needs it, xdomain
    trains on ImageNet and evaluates on its variants only. Whether each name is a dataset is checked where datasets
    are loaded (fpl_fast.preparation.check_eval_datasets), as --dataset is."""
    value = cfg.eval_datasets
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        value = ",".join(value)
        object.__setattr__(cfg, "eval_datasets", value)
    if value is not None:
        names = [n.strip() for n in value.split(",")] if isinstance(value, str) else []
        if not names or not all(names):
            raise ConfigError(
                "eval_datasets", f"eval_datasets must be dataset names separated by commas, got {value!r}"
            )
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError("eval_datasets", f"eval_datasets names {repeated[0]!r} twice")
    if cfg.protocol == "xdataset" and value is None:
        raise ConfigError(
            "protocol",
            "protocol='xdataset' needs eval_datasets, the datasets to evaluate the prompts on (e.g. dtd,eurosat)",
            others=("eval_datasets",),
        )
    if cfg.protocol == "xdomain":
        if cfg.dataset != "imagenet":
            raise ConfigError(
                "protocol",
                f"protocol='xdomain' trains on dataset='imagenet' and evaluates on its variants "
                f"({', '.join(IMAGENET_VARIANTS)}), got dataset={cfg.dataset!r}; for other targets use "
                "protocol='xdataset' with eval_datasets",
                others=("dataset", "eval_datasets"),
            )
        others = [n for n in cfg.eval_dataset_names if n not in IMAGENET_VARIANTS]
        if others:
            raise ConfigError(
                "eval_datasets",
                f"eval_datasets of protocol='xdomain' are ImageNet variants ({', '.join(IMAGENET_VARIANTS)}), got "
                f"{others[0]!r}; use protocol='xdataset' for other targets",
                others=("protocol",),
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
    known = allowed if allowed is not None else {f.name for f in setting_fields()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--config {p} has unknown settings {unknown}; allowed: {sorted(known)}")
    return data


def resumed_config(out: Path, given: Mapping[str, Any] | RunConfig | None = None) -> RunConfig:
    """The configuration of the stopped run in ``out``, as its checkpoint saved it.

    ``given``: settings that the caller states (a dict of RunConfig fields, or a whole RunConfig); each must agree
    with the saved one, so that a resumed run is the run that was stopped.

    Raises:
        ConfigError: a given setting contradicts the saved one (named, with both values; the CLI's wording names
            the flag); ``out`` holds no checkpoint to resume (field ``resume``).
        ValueError: the checkpoint cannot be read, or holds settings that this version does not know.
    """
    outputs.check_out_dir(out, resume=True)
    state = outputs.load_checkpoint(out)
    assert state is not None  # check_out_dir found one, load_checkpoint reads it or says why not
    saved: dict[str, Any] = state["config"]
    by_name = {f.name: f for f in fields(RunConfig)}
    unknown = sorted(set(saved) - set(by_name))
    if unknown:
        raise ValueError(
            f"the checkpoint in {out} holds settings that this version of fpl_fast does not know "
            f"({', '.join(unknown)}): resume it with the version that wrote it"
        )
    items = given.to_dict() if isinstance(given, RunConfig) else dict(given or {})
    bad = sorted(set(items) - set(by_name))
    if bad:
        raise ValueError(f"unknown RunConfig settings {bad}; allowed: {sorted(by_name)}")
    clip_mode = saved.get("clip_mode", by_name["clip_mode"].default)
    for name, value in items.items():
        was = saved.get(name, by_name[name].default)  # a setting newer than the checkpoint: its default
        saved_style = saved.get("clip_style") or _default_clip_style(clip_mode, saved.get("norm_thresh"))
        if value is None and name == "lr":  # None: the saved clip mode's (and style's) default, as RunConfig fills it
            value = DEFAULT_LR.get(_lr_key(clip_mode, saved_style))
        elif value is None and name == "clip_style":
            value = saved_style
        elif value is None and name == "sampling":
            value = _default_sampling(clip_mode)
        if value != was or isinstance(value, bool) != isinstance(was, bool):
            flag = by_name[name].metadata["flag"]
            raise ConfigError(
                name,
                f"{name}={value!r} contradicts the checkpoint in {out} (saved with {name}={was!r}); leave {name} out "
                "of the config (or pass config=None) to resume with the saved configuration",
                cli=f"{flag} {_as_flag_value(value)} contradicts the checkpoint in {out} (saved with {flag} "
                f"{_as_flag_value(was)}); leave {flag} out to resume with the saved configuration",
            )
    return RunConfig(**saved)


def _as_flag_value(value: Any) -> str:
    """A value as a flag takes it: none, true/false, numbers exactly."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)
