"""The one way into a run: :func:`train`, for the Python API (``fpl_fast.train``), the CLI (``python -m
fpl_fast.run``), the grid's cells and the tests.

A :class:`~fpl_fast.config.RunConfig` is a DP-FPL job (or one of its baselines): the data path
(:mod:`fpl_fast.preparation`: backbone, class names, encoded client data), training and evaluation round by round
in process or on Flower's simulation runtime (``settings.engine``), then with ``settings.mia`` the membership
inference. A FedDTPT or RAPT ``Config`` runs that method (:mod:`fpl_fast.methods`). This layer sits above
methods/, attacks/ and flower/, so none of those imports another's entry.

Bring your own data through one of two seams:
- ``dataset=DatasetBundle(name, train, test, classnames)``: torchvision-style datasets of ``(image, label)``
  (labels from a ``labels`` or ``targets`` attribute); they are split over clients by ``partition`` and encoded
  once by the frozen image encoder.
- ``features=ClientData(...)`` with ``classnames``: image features already computed, with your own client split.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fpl_fast import outputs, tracking
from fpl_fast.attacks.membership import check_pool, membership_inference, mia_summary, shadow_pool
from fpl_fast.backbone.protocol import Backbone
from fpl_fast.config import METHODS, RunConfig, RunSettings, resumed_config
from fpl_fast.data import DatasetBundle
from fpl_fast.federated.client import ClientData
from fpl_fast.federated.engine import Federation
from fpl_fast.methods.dpfpl import DPFPL
from fpl_fast.methods.skeleton import run_method
from fpl_fast.preparation import check_device, check_eval_datasets, prepare, prepare_eval_sets
from fpl_fast.validation import ConfigError

__all__ = ["Result", "train"]


@dataclass
class Result:
    """What a run gives back: its accuracies and epsilons, per-round records and the trained federation.

    ``final`` and ``rounds`` are results.json's; ``federation`` holds the trained prompts (``federation.server.
    global_ctx``, ``federation.learner.local``) and can be evaluated further (None where the run was not in this
    process's federation: Flower's simulation runtime, FedDTPT, RAPT); ``out`` is the run's folder; ``mia`` the
    attack's summary (with ``settings.mia``).
    """

    method: str
    config: dict[str, Any]
    rounds: list[dict[str, Any]]
    final: dict[str, Any]
    out: Path
    federation: Federation | None
    mia: dict[str, Any] | None = None

    @classmethod
    def of(cls, result: dict[str, Any], out: Path, federation: Federation | None) -> Result:
        """From results.json's dict."""
        return cls(
            result["method"], result["config"], result["rounds"], result["final"], out, federation, result.get("mia")
        )

    @property
    def local_acc(self) -> float:
        return float(self.final["local_acc"])

    @property
    def neighbor_acc(self) -> float:
        return float(self.final["neighbor_acc"])

    @property
    def epsilon(self) -> float:
        """epsilon_total: what one example of one client loses to an observer of everything released."""
        return float(self.final["epsilon_total"])


def _as_config(config: Any, cls: type) -> Any:
    if config is None:
        return cls()
    if isinstance(config, cls):
        return config
    if isinstance(config, dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} settings {unknown}; allowed: {sorted(known)}")
        return cls(**config)
    raise TypeError(f"expected a {cls.__name__} or a dict of its fields, got {type(config).__name__}")


def train(
    config: Any = None,
    *,
    settings: RunSettings | dict[str, Any] | None = None,
    dataset: DatasetBundle | None = None,
    features: ClientData | None = None,
    classnames: list[str] | None = None,
    backbone: Backbone | None = None,
    stop_after_round: int | None = None,
) -> Result:
    """Run one federated job and return its :class:`Result` (and write results.json etc. to ``settings.out``).

    Loads the backbone, encodes the data, trains and evaluates round by round (results.json, rounds.csv,
    accuracy.png and a checkpoint each round) and, with ``settings.mia``, runs the membership-inference attack
    (mia.json, its summary under "mia" in results.json).

    Args:
        config: the algorithm's settings: a RunConfig or a dict of its fields (None: the embedded default), or a
            FedDTPT / RAPT ``Config`` (``fpl_fast.methods.feddtpt.Config``, ``fpl_fast.methods.rapt.Config``).
            With ``settings.resume`` the run's configuration is its checkpoint's: leave ``config`` None, or give
            settings that agree with it (one that does not is named, with both values).
        settings: where and how it runs (output folder, resume, membership inference, progress bar, engine,
            TensorBoard log).
        dataset: your own torchvision-style datasets instead of ``config.dataset``.
        features: your own precomputed image features and client split (needs ``classnames``).
        classnames: class names in label order (with ``features``).
        backbone: an already loaded frozen CLIP (default: ``load_backbone`` of ``config.model``).
        stop_after_round: end early after this round, as if interrupted (tests of ``resume``).
    """
    run = _as_config(settings, RunSettings)
    tracking.require_tensorboard(run.tensorboard)  # before anything is loaded or trained
    if _is_method_config(config):
        return _train_method(config, run, dataset=dataset, features=features, backbone=backbone)
    out = Path(run.out) if run.out else outputs.default_out_dir()
    # A resumed run is the stopped one: its checkpoint's configuration (a damaged checkpoint fails here, before the
    # backbone loads), which a given config must not contradict.
    if run.resume:
        if config is not None and not isinstance(config, (RunConfig, dict)):
            raise TypeError(f"expected a RunConfig or a dict of its fields, got {type(config).__name__}")
        cfg = resumed_config(out, config)
    else:
        cfg = _as_config(config, RunConfig)
    check_device(cfg.device)
    _check_protocol(cfg, run, features)
    if run.engine == "flower-sim":
        given: dict[str, Any] = {"dataset": dataset, "features": features, "classnames": classnames}
        given.update(backbone=backbone, stop_after_round=stop_after_round)
        unused = [k for k, v in given.items() if v is not None]
        if unused:
            raise ValueError(f"engine='flower-sim' prepares its data on each node: leave out {', '.join(unused)}")
    # Before the backbone loads (the driver checks again): a previous run's files; a folder that cannot be written.
    outputs.check_out_dir(out, resume=run.resume)
    outputs.check_writable(out)
    if run.engine == "flower-sim":
        return Result.of(_train_on_flower(cfg, run, out), out, None)
    if run.mia:
        check_pool(cfg.dataset)  # before anything is loaded or trained
    check_eval_datasets(cfg)
    backbone, names, data = prepare(
        cfg,
        backbone=backbone,
        feature_cache=run.feature_cache or None,
        dataset=dataset,
        features=features,
        classnames=classnames,
        reseed=True,
    )
    pool = shadow_pool(cfg, backbone) if run.mia else None  # before training: a missing val split fails at once
    eval_sets = prepare_eval_sets(cfg, backbone, dataset=dataset)  # before training: a missing target fails at once
    method = DPFPL(backbone, names, data, out=out, eval_sets=eval_sets)
    result = run_method(
        method,
        cfg,
        out=out,
        progress=run.progress,
        resume=run.resume,
        stop_after_round=stop_after_round,
        tensorboard=run.tensorboard,
    )
    fed = method.fed
    assert fed is not None  # set up by run_method
    if pool is not None and result["final"] is not None:
        report = membership_inference(
            cfg, backbone, names, data, fed, pool=pool, num_shadows=run.mia, progress=run.progress
        )
        outputs.write_json(out / "mia.json", report)
        result["mia"] = mia_summary(report)
        outputs.write_json(out / "results.json", result)
    return Result.of(result, out, fed)


def _check_protocol(cfg: RunConfig, run: RunSettings, features: ClientData | None) -> None:
    """The protocols other than personal run on the in-process engine; base2novel splits a dataset's classes (not
    a given client split), and its federation knows only the base classes (no shadow pool of every class)."""
    if cfg.protocol == "personal":
        return
    if run.engine != "inprocess":
        raise ConfigError(
            "protocol",
            f"protocol={cfg.protocol!r} runs on engine='inprocess' only (a Flower server sees no test set "
            "beyond the clients' own); use engine='inprocess' or protocol='personal'",
            cli=f"--protocol {cfg.protocol} runs on --engine inprocess only (a Flower server sees no test set beyond "
            "the clients' own); leave out --engine, or --protocol",
        )
    if cfg.protocol == "base2novel" and features is not None:
        raise ConfigError(
            "protocol",
            "protocol='base2novel' splits a dataset's classes into base and novel: give dataset= (or "
            "config.dataset), not features= with a client split of your own",
        )
    if cfg.protocol == "base2novel" and run.mia:
        raise ConfigError(
            "protocol",
            "protocol='base2novel' with mia: the attack's shadow pool holds every class, the federation only the base "
            "ones; run the attack with protocol='personal'",
            cli="--protocol base2novel with --mia: the attack's shadow pool holds every class, the federation only "
            "the base ones; run --mia with --protocol personal",
        )


def _is_method_config(config: Any) -> bool:
    module = type(config).__module__
    return any(module.startswith(f"fpl_fast.methods.{m}") for m in METHODS[1:]) and type(config).__name__ == "Config"


def _train_method(config: Any, run: RunSettings, **unsupported: Any) -> Result:
    """FedDTPT or RAPT: its own data and model path (``config``), this run's folder and progress bar."""
    name = type(config).__module__.split(".")[2]
    given = [k for k, v in unsupported.items() if v is not None]
    given += [k for k in ("resume", "mia", "feature_cache") if getattr(run, k)]
    if run.engine != "inprocess":
        given.append(f"engine={run.engine!r}")
    if given:
        raise ValueError(f"{', '.join(given)} apply to DP-FPL runs only, not to {name}")
    out = Path(run.out) if run.out else outputs.default_out_dir()
    outputs.check_out_dir(out, resume=False)
    outputs.check_writable(out)
    module = importlib.import_module(f"fpl_fast.methods.{name}")
    result = module.run(config, out=out, progress=run.progress, tensorboard=run.tensorboard)
    return Result.of(result, out, None)


def _train_on_flower(cfg: RunConfig, run: RunSettings, out: Path) -> dict[str, Any]:
    """The same federation on Flower's simulation runtime (one SuperNode per client, in this process)."""
    try:
        from fpl_fast.flower.protocol import FederationError
        from fpl_fast.flower.simulation import run_flower_simulation
    except ImportError as exc:
        raise ValueError(f"engine='flower-sim' needs Flower: pip install '.[flower]' ({exc})") from None
    try:
        return run_flower_simulation(cfg, run, out=out)
    except FederationError as exc:
        raise ValueError(str(exc)) from None
