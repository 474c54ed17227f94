"""`python -m fpl_fast.run`: a federated DP-FPL job from the command line.

With no arguments it runs the embedded default offline (tiny CLIP pretrained on part of scikit-learn's
digits, the rest split over 10 clients, dpfpl with DP on). Every flag maps to a field of
:class:`fpl_fast.config.RunConfig`; ``--config FILE`` (JSON) sets a base that flags override.
Bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import sys
from typing import Any, NoReturn

from fpl_fast.config import CHOICES, ENGINES, METHODS, PAPER, RunConfig, RunSettings, load_config_file
from fpl_fast.validation import ConfigError, flag_message

__all__ = ["build_parser", "config_from_args", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _clip_or_auto(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


# (flag, type, help). Defaults live in RunConfig; flags left out keep the config file's or the default.
_FLAGS: list[tuple[str, Any, str]] = [
    ("--factorization", str, "prompt factorisation: promptfl | fedotp | fedpgp | dplora | dpfpl (default dpfpl)"),
    ("--rank", int, "rank r of the low-rank local prompt U V (default 8)"),
    ("--n-ctx", int, "number of learned context tokens (default 16)"),
    ("--full-grad-scale", _float, "scale of g_L rebuilt from g_U, g_V (authors: 0.1)"),
    (
        "--noise",
        _float,
        "noise MULTIPLIER sigma for local and global DP (noise std = sigma * C). NOTE: the DP-FPL authors' "
        "--noise is an epsilon; to reproduce it use --epsilon E --calibration paper (default 1.5)",
    ),
    ("--noise-local", _float, "noise multiplier of the local prompt's DP (overrides --noise)"),
    ("--noise-global", _float, "noise multiplier of the global prompt's DP (overrides --noise)"),
    (
        "--epsilon",
        _float,
        "target epsilon: calibrate sigma for it instead of --noise (by default for epsilon_total, what an observer "
        "of both the local and the global prompt learns; see --calibrate-for)",
    ),
    (
        "--calibrate-for",
        str,
        "with --epsilon: total (default: epsilon_total of both releases <= E) | each (each release alone <= E)",
    ),
    ("--delta", _float, "delta of the (epsilon, delta) guarantee (default 1e-5)"),
    (
        "--norm-thresh",
        _float,
        "clip norm C of the parameter clip modes (default 0.3, tuned for the embedded model; the authors use 10; "
        "inf: no clipping)",
    ),
    (
        "--clip-mode",
        str,
        "sample: clip each example's prompt gradient (per-example DP, default) | output: clip each example's "
        "gradient w.r.t. the class text features, noise once on the client, one backward (per-example DP) | "
        "batch: the authors' batch-mean clip (not per-example)",
    ),
    (
        "--output-clip",
        _clip_or_auto,
        "with --clip-mode output: clip norm C_o of each example's cotangent (default 0.1, tuned), or auto: the bound "
        "sqrt(2) s / min_c ||T_c|| of the cosine head (never clips)",
    ),
    ("--clip-uv", str, "joint: one norm over (g_U, g_V) (default) | separate: the authors' per-factor clip"),
    ("--calibration", str, "with --epsilon: accountant (default) | paper (sqrt(rounds log(1/delta)) / epsilon)"),
    ("--accountant", str, "rdp (default) | pld"),
    (
        "--sampling",
        str,
        "poisson: Poisson sampling (default; the accountant's bound is then proven) | shuffle: fixed-size shuffled "
        "batches (accounted as Poisson, an approximation; the default with --clip-mode batch)",
    ),
    (
        "--promptfl-client-noise",
        _bool,
        "with --factorization promptfl --sync step: each client also adds N(0, (sigma C / b)^2) to its clipped "
        "gradient of G, as the DP-FPL authors' promptfl does (with --clip-mode batch --clip-uv separate); accounted "
        "with the server's noise as one Gaussian; true/false (default false)",
    ),
    ("--num-users", int, "number of clients K (default 10)"),
    ("--rounds", int, "communication rounds (default 20)"),
    ("--local-epochs", int, "local epochs per round (default 1)"),
    (
        "--steps-per-round",
        str,
        "local steps per round: mean: E ceil(mean client size / b) (default) | authors: E floor(smallest client's "
        "size / b), the DP-FPL authors' count (an error where that is 0)",
    ),
    ("--sync", str, "step: average the global gradient every local step (authors, default) | round: FedAvg"),
    ("--client-fraction", _float, "fraction of clients sampled per round (default 1)"),
    (
        "--lr",
        _float,
        "SGD learning rate (default by clip mode, tuned for the embedded model: sample 0.03, output 3, batch 0.1; "
        "the paper uses 0.001)",
    ),
    ("--momentum", _float, "SGD momentum (default 0.9)"),
    ("--batch-size", int, "local batch size b (default 8; the paper uses 32)"),
    (
        "--dataset",
        str,
        "digits (embedded) | digits-tune (its public pretraining part, for tuning) | caltech101 | oxford_pets | "
        "oxford_flowers | food101 | dtd | cifar10 | cifar100",
    ),
    ("--data-root", str, "folder holding the datasets (CoOp layouts; CIFAR as torchvision saves it)"),
    ("--model", str, "open_clip model name (e.g. ViT-B-16) or a config in fpl_fast/configs (tiny-digits-clip)"),
    ("--pretrained", str, "open_clip tag (openai), a local checkpoint file, 'embedded', or 'none' (random init)"),
    ("--precision", str, "fp32 | bf16 compute in the frozen encoders"),
    ("--partition", str, "client split: iid | pathological | dirichlet (default dirichlet)"),
    (
        "--pathological-split",
        str,
        "with --partition pathological: balanced: every class to some client, shares differing by at most one "
        "class (default) | authors: the DP-FPL authors' shares (classes shuffled with seed 2023 whatever --seed, "
        "round(n_cls / K) each, the last client the rest)",
    ),
    ("--beta", _float, "Dirichlet concentration for --partition dirichlet (default 0.5)"),
    ("--num-shots", int, "few-shot: examples per class per client"),
    ("--augment", _bool, "random resized crop + flip in training (recomputes image features); true/false"),
    ("--eval-every", int, "evaluate every N rounds (default 1)"),
    ("--seed", int, "seed of the public random choices: initialisation, data splits (default 1)"),
    (
        "--noise-seed",
        int,
        "make the DP noise and the batch sampling reproducible from N (research only: the guarantee does not hold "
        "against anyone who knows N); default: secret keys from the OS, per client and server",
    ),
    ("--device", str, "cpu | cuda | cuda:N"),
    (
        "--chunk-size",
        int,
        "per-sample gradients: samples per vmapped backward (default: sized to the activations)",
    ),
    (
        "--text-path",
        str,
        "class prompts through the text tower: shared: the prompt prefix [SOS, context] once per client, each class "
        "only on its own name tokens (default; exact, for causal towers pooling at EOT, others take full) | full: "
        "every class prompt whole",
    ),
    ("--out", str, "output folder (default runs/<timestamp>)"),
    (
        "--feature-cache",
        str,
        "folder of image features cached on disk across runs (keyed by encoder weights, transform, dataset, split)",
    ),
    (
        "--mia",
        int,
        "membership-inference attack after training with N shadow models (writes mia.json; default 0: off)",
    ),
    (
        "--engine",
        str,
        "inprocess: every client in this process (default) | flower-sim: Flower's simulation runtime, one "
        "SuperNode per client (needs pip install .[flower])",
    ),
    (
        "--tensorboard",
        str,
        "folder for a TensorBoard log of every round (needs pip install .[tensorboard]); private/* tags (loss, "
        "clipped fraction) are statistics of the private data that no DP covers",
    ),
]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m fpl_fast.run",
        description="Private, personalized federated prompt learning on frozen CLIP (DP-FPL and baselines).",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default="dpfpl",
        help="dpfpl: DP-FPL and its baselines (pick with --factorization; default) | feddtpt: black-box discrete "
        "federated prompts | rapt: local-DP text privatisation with token reconstruction. Method-specific "
        "settings of feddtpt/rapt go in --config FILE (their Config fields)",
    )
    p.add_argument("--config", help="JSON file of settings (field names as below, with underscores)")
    p.add_argument("--paper", action="store_true", help="start from the DP-FPL authors' settings (ViT-B-16, openai)")
    for flag, typ, text in _FLAGS:
        name = flag[2:].replace("-", "_")
        choices = {**CHOICES, "engine": ENGINES}.get(name)
        p.add_argument(flag, type=typ, default=None, choices=choices, help=text)
    p.add_argument("--resume", action="store_true", help="continue the stopped run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _method_module(method: str):
    return importlib.import_module(f"fpl_fast.methods.{method}")


def method_config_from_args(args: argparse.Namespace) -> Any:
    """The Config of --method feddtpt|rapt: shared flags and --config keys that the method knows."""
    mod = _method_module(args.method)
    names = {f.name for f in dataclasses.fields(mod.Config)}
    settings: dict[str, Any] = load_config_file(args.config, allowed=names) if args.config else {}
    for flag, _, _ in _FLAGS:
        name = flag[2:].replace("-", "_")
        value = getattr(args, name)
        if value is None or name in ("out", "tensorboard"):
            continue
        if name not in names:
            raise ValueError(
                f"{flag} does not apply to --method {args.method} (its settings: {', '.join(sorted(names))})"
            )
        settings[name] = value
    if args.paper or args.resume:
        raise ValueError(f"--paper and --resume apply to --method dpfpl only, not {args.method}")
    if isinstance(settings.get("pretrained"), str) and settings["pretrained"].lower() == "none":
        settings["pretrained"] = None
    return _build(mod.Config, settings)


def config_from_args(args: argparse.Namespace) -> tuple[RunConfig, RunSettings]:
    """The algorithm's config and the run's settings: defaults <- --paper <- --config FILE <- flags."""
    settings: dict[str, Any] = {}
    if args.paper:
        settings.update(PAPER)
    if args.config:
        settings.update(load_config_file(args.config))
    for flag, _, _ in _FLAGS:
        name = flag[2:].replace("-", "_")
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    if args.resume:
        settings["resume"] = True
    if args.quiet:
        settings["progress"] = False
    if isinstance(settings.get("pretrained"), str) and settings["pretrained"].lower() == "none":
        settings["pretrained"] = None
    if settings.get("epsilon") is not None:
        given = [f"--{n.replace('_', '-')}" for n in ("noise", "noise_local", "noise_global") if n in settings]
        if given:
            raise ValueError(f"--epsilon calibrates the noise: leave out {', '.join(given)} (or drop --epsilon)")
        settings["noise"] = None
    if "norm_thresh" in settings and isinstance(settings["norm_thresh"], str):
        settings["norm_thresh"] = math.inf if settings["norm_thresh"] == "inf" else float(settings["norm_thresh"])
    run_names = {f.name for f in dataclasses.fields(RunSettings)}
    run = _build(RunSettings, {k: v for k, v in settings.items() if k in run_names})
    return _build(RunConfig, {k: v for k, v in settings.items() if k not in run_names}), run


def _build(cls: type, settings: dict[str, Any]):
    """cls(**settings), its ConfigError worded with flags ("rank must be ..." -> "--rank must be ...")."""
    try:
        return cls(**settings)
    except ConfigError as exc:
        raise ConfigError(exc.field, flag_message(exc), exc.others) from None


def _fail(exc: BaseException, prog: str = "python -m fpl_fast.run") -> int:
    """A user error: its first line on stderr, exit code 2, no traceback (a config error found after the flags were
    read, e.g. from the data's sizes, worded with flags too)."""
    text = flag_message(exc) if isinstance(exc, ConfigError) else str(exc)
    msg = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.method == "dpfpl":
            cfg, run = config_from_args(args)
        else:
            cfg = method_config_from_args(args)
            run = RunSettings(out=args.out, progress=not args.quiet, tensorboard=args.tensorboard)
        from fpl_fast.job import train  # heavy imports after the flags are known good

        result = train(cfg, settings=run)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(exc)
    from fpl_fast.outputs import summary_table

    print(summary_table(result.final, extra=args.method != "dpfpl"))
    files = "results.json, rounds.csv, accuracy.png" + (", checkpoint.pt" if args.method == "dpfpl" else "")
    if result.mia is not None:
        m = result.mia
        print(
            f"membership inference ({m['num_shadows']} shadow models): attack accuracy "
            f"{_fmt3(m['attack_accuracy'])}, AUC {_fmt3(m['attack_auc'])} (0.5 = chance)"
        )
        files += ", mia.json"
    print(f"results written to {result.out}/ ({files})")
    return 0


def _fmt3(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    sys.exit(main())
