"""DP-FPL, the main method: build the federation with its noise calibrated (:func:`build_federation`), train its
rounds (:func:`train_rounds`), evaluate and account; :class:`DPFPL` on the skeleton of :mod:`fpl_fast.methods.skeleton`,
whose driver writes, checkpoints and resumes. A run enters through :func:`fpl_fast.job.train`; these are its blocks
(the audit and the membership attack's shadow models train with the blocks themselves)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fpl_fast import outputs
from fpl_fast.backbone.protocol import Backbone
from fpl_fast.config import RunConfig
from fpl_fast.federated.client import sample_rates, steps_per_round
from fpl_fast.federated.engine import ClientData, Federation, StepStats
from fpl_fast.federated.eval_sets import EvalSet
from fpl_fast.federated.server import Server
from fpl_fast.methods.protocols import ProtocolEval
from fpl_fast.privacy.accountant import PrivacyAccountant
from fpl_fast.privacy.plan import ClientAccountant, NoisePlan, plan_noise, trust_model
from fpl_fast.privacy.randomness import randomness_statement
from fpl_fast.prompts import get_factorization

__all__ = [
    "build_federation",
    "train_rounds",
    "load_federation",
    "eval_seed",
    "progress_bar",
    "TrainingDiverged",
    "divergence_guard",
    "DPFPL",
    "epsilons_spent",
    "eval_record",
    "dropped",
    "privacy_summary",
    "protocol_summary",
    "MEAN_WINDOWS",
    "recent_accuracy_means",
]

ZERO_SHOT_TEMPLATE = "a photo of a {}."


def build_federation(
    cfg: RunConfig, backbone: Backbone, classnames: list[str], data: ClientData, **roles: Any
) -> tuple[Federation, NoisePlan, list[float]]:
    """A fresh Federation with its noise in force, the noise plan and each client's sampling rate (``roles``:
    Federation's ``make_clients`` / ``make_server``).

    The sampling geometry comes first because calibrating sigma for --epsilon needs q and the number of steps.
    """
    sizes = [len(ix) for ix in data.train_idx]
    qs = sample_rates(cfg, sizes)
    plan = plan_noise(cfg, sample_rate=max(qs), steps=cfg.rounds * steps_per_round(cfg, sizes))
    fed = Federation(
        cfg, backbone, classnames, data, noise_local=plan.sigma_local, noise_global=plan.sigma_global, **roles
    )
    return fed, plan, qs


def train_rounds(
    fed: Federation, start: int, stop: int, *, on_step: Callable[[], Any] | None = None
) -> Iterator[tuple[int, list[StepStats]]]:
    """The training loop: rounds ``start .. stop - 1`` (sample clients, train), yielding after each round so
    that the caller evaluates, checkpoints or stops in between (nothing in between changes the training)."""
    for rnd in range(start, stop):
        clients = fed.sample_clients()
        yield rnd, fed.train_round(clients, on_step=on_step)


def eval_seed(cfg: RunConfig, rnd: int) -> int:
    """Seed of the low-rank factorisation used when evaluating after round ``rnd`` (0-based)."""
    return (cfg.seed + 0x5EED) * 1_000_003 + rnd


def progress_bar(total: int, *, desc: str, enabled: bool) -> tqdm:
    """The run's progress bar (one tick per local step); ``enabled=False`` (--quiet) shows nothing."""
    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


def load_federation(
    cfg: RunConfig, backbone: Backbone, classnames: list[str], data: ClientData, out: Path
) -> Federation:
    """The Federation of the run in ``out`` in the state of its last checkpoint (a finished run: the final one)."""
    ckpt = outputs.load_checkpoint(out)
    if ckpt is None:
        raise ValueError(f"no checkpoint in {out}: nothing to load")
    if ckpt["config"] != _training_config(cfg):
        raise ValueError(f"the checkpoint in {out} was written with a different configuration")
    fed, _, _ = build_federation(cfg, backbone, classnames, data)
    fed.load_state_dict(ckpt["federation"])
    return fed


def _training_config(cfg: RunConfig) -> dict[str, Any]:
    """The settings a checkpoint must agree on to be resumed: all of the algorithm's (RunSettings may differ)."""
    return cfg.to_dict()


def _zero_shot(backbone: Backbone, classnames: list[str], data: ClientData, text_path: str) -> float:
    with torch.no_grad():
        w = backbone.zero_shot_weights(classnames, ZERO_SHOT_TEMPLATE, text_path=text_path).float()
        x = F.normalize(data.test_feats, dim=-1).to(w.device)
        pred = (x @ w.T).argmax(-1).cpu()
    return float((pred == data.test_labels.cpu()).float().mean())


class TrainingDiverged(ValueError):
    """The prompts stopped being finite: the run stops (its last good checkpoint stays) and says where."""


def divergence_guard(fed: Federation, rnd: int, out: Path, *, bar: tqdm | None = None) -> Callable[[], None]:
    """An ``on_step`` callback for ``fed.train_round`` in round ``rnd`` (1-based) that, after every local step,
    checks what the step made public (the global prompt, each client's copy of it, the local prompts; each is
    a function of the noised, released gradients) and raises :class:`TrainingDiverged` at the first
    non-finite value, naming the round and the step (1-based). It never reads the private loss.
    ``bar``: ticked after each good step, closed before raising."""
    step = 0
    per_round = fed.steps_per_round

    def check() -> None:
        nonlocal step
        step += 1
        L = fed.learner
        named = {"global prompt": fed.server.global_ctx, "clients' global prompts": L.client_global}
        named.update({f"local prompt {k}": t for k, t in L.local.items()})
        bad = [name for name, t in named.items() if not bool(torch.isfinite(t).all())]
        if bad:
            kept = (
                f"the checkpoint of round {rnd - 1} in {out} is kept"
                if rnd > 1
                else "no checkpoint was written (it diverged in the first round)"
            )
            if bar is not None:
                bar.close()
            raise TrainingDiverged(
                f"training diverged in round {rnd}, step {step} of {per_round}: the {' and the '.join(bad)} "
                f"became non-finite (inf/nan); {kept}; lower --lr and start again in another --out folder"
            )
        if bar is not None:
            bar.update()

    return check


@dataclass
class _State:
    """A DP-FPL run between rounds: the federation, its noise plan, and what the records and summary need."""

    cfg: RunConfig
    fed: Federation
    plan: NoisePlan
    qs: list[float]  # each client's sampling rate
    zero_shot: float
    protocol: ProtocolEval
    bar: tqdm | None = None
    last_eval: dict[str, Any] | None = None
    last_protocol: tuple[dict[str, float], dict[str, Any]] | None = None  # the last evaluation's, by the protocol
    history: list[dict[str, Any]] = field(default_factory=list)  # the evaluated rounds' records, resumes included


def epsilons_spent(accountants: Sequence[ClientAccountant]) -> tuple[list[float], list[float], list[float]]:
    """Local, global and total (both releases together) epsilon each client's ledger has spent so far."""
    spent = [a.epsilons() for a in accountants]
    return [e.local for e in spent], [e.global_ for e in spent], [e.total for e in spent]


def eval_record(
    ev: dict[str, Any],
    accountants: Sequence[ClientAccountant],
    stats: Sequence[StepStats] | None,
    clip_norms: Any = None,
) -> dict[str, Any]:
    """A round's record: the evaluation's mean accuracies, the worst client's epsilons so far, the mean training
    loss and clipped fraction over the round's local steps ``stats`` (statistics of the clients' private data that
    no DP guarantee covers; None where they are not at hand: a Flower server never receives them), and each
    client's clip norms now (``clip_norms`` (K, Q), one per clipped quantity; released: with adaptive clipping they
    are post-processing of the noised counts): ``clip_norms`` per client and ``clip_norm``, their mean of the first
    quantity (rounds.csv's column)."""
    eps_l, eps_g, eps_t = epsilons_spent(accountants)
    clip: dict[str, Any] = {}
    if clip_norms is not None:
        per_client = [[float(c) for c in row] for row in clip_norms.tolist()]
        clip = {"clip_norm": float(np.mean([row[0] for row in per_client])), "clip_norms": per_client}
    return {
        "local_acc": ev["local_acc"],
        "neighbor_acc": ev["neighbor_acc"],
        "epsilon_local": max(eps_l),
        "epsilon_global": max(eps_g),
        "epsilon_total": max(eps_t),
        "loss": float(np.mean([s.loss for s in stats])) if stats else None,
        "clipped_fraction": float(np.mean([s.clipped_fraction for s in stats])) if stats else None,
        **clip,
    }


def dropped(server: Server) -> dict[str, list[int]]:
    """The round record's ``dropped``: the clients that dropped out of the round just trained (--client-drop-rate)."""
    return {"dropped": list(server.dropped[-1]) if server.dropped else []}


# Means over the last N evaluated rounds in results.json's final: the authors' training script prints the mean of
# the last 5 rounds (federated_main.py:226), their table.py averages the last 10.
MEAN_WINDOWS = (5, 10)


def _mean_or_none(values: list[Any]) -> float | None:
    """The mean, or None where any value is missing (a Flower run without neighbour accuracy) or there is none."""
    if not values or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return None
    return float(np.mean(values))


def recent_accuracy_means(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean local and neighbour accuracy over the last 5 and the last 10 evaluated rounds (as many as there are when
    fewer), named by their window so no reader takes one for another or for the last round's accuracy, and the
    rounds each mean covers (with --eval-every > 1 the last 5 evaluations span more than 5 rounds).

    Args:
        records: the run's round records in order (each with ``round``, ``local_acc``, ``neighbor_acc``).
    """
    out: dict[str, Any] = {}
    for n in MEAN_WINDOWS:
        last = list(records)[-n:]
        out[f"local_acc_mean_last{n}"] = _mean_or_none([r.get("local_acc") for r in last])
        out[f"neighbor_acc_mean_last{n}"] = _mean_or_none([r.get("neighbor_acc") for r in last])
        out[f"acc_mean_last{n}_rounds"] = [int(r["round"]) for r in last]
    return out


def protocol_summary(
    cfg: RunConfig,
    protocol: ProtocolEval,
    last: tuple[dict[str, float], dict[str, Any]],
    records: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """The protocol's part of results.json's final (none for ``personal``): its name, its metrics with what each is,
    their last values, their means over the last 5 and 10 evaluated rounds (the rounds are ``acc_mean_last5_rounds``'
    and ``acc_mean_last10_rounds``') and the per-client accuracies of its personalised metrics."""
    if not protocol.metrics:
        return {}
    values, per_client = last
    out: dict[str, Any] = {"protocol": cfg.protocol, "protocol_metrics": dict(protocol.metrics)}
    for key in protocol.metrics:
        out[key] = values[key]
        for n in MEAN_WINDOWS:
            out[f"{key}_mean_last{n}"] = _mean_or_none([r.get(key) for r in list(records)[-n:]])
    return {**out, **per_client}


def privacy_summary(
    cfg: RunConfig, plan: NoisePlan, qs: list[float], accountants: Sequence[ClientAccountant]
) -> dict[str, Any]:
    """The privacy part of results.json: the worst client's epsilons, what they rest on (accountant, noise plan,
    sampling, randomness, trust) and every client's steps, sampling rate and epsilons."""
    has_local_mech = get_factorization(cfg.factorization).has_local
    eps_l, eps_g, eps_t = epsilons_spent(accountants)
    accountant = PrivacyAccountant(
        cfg.accountant,
        noise_multiplier=max(plan.accountant_global, 1e-9),
        sample_rate=max(qs),
        delta=cfg.delta,
        sampling=cfg.sampling_scheme,
    )  # only for its name and its statement of the sampling approximation
    return {
        "epsilon_local": max(eps_l) if has_local_mech else None,
        "epsilon_global": max(eps_g),
        "epsilon_total": max(eps_t),
        "delta": cfg.delta,
        "accountant": accountant.name,
        "accountant_approximation": accountant.approximation,
        "unit_of_privacy": "one example of one client (add/remove neighbouring)",
        "per_example_guarantee": cfg.clip_mode in ("sample", "output"),
        "clip_mode": cfg.clip_mode,
        "output_clip": cfg.output_clip if cfg.clip_mode == "output" else None,
        "trust_model": trust_model(cfg),
        "noise_multiplier_local": plan.sigma_local,
        "noise_multiplier_global": plan.sigma_global,
        "accountant_multiplier_local": plan.accountant_local,
        "accountant_multiplier_global": plan.accountant_global,
        "accountant_multiplier_total": plan.accountant_total,
        "sampling": cfg.sampling,
        "randomness": randomness_statement(cfg.noise_seed),
        "noise_note": plan.note,
        "steps_per_client": [int(a.steps) for a in accountants],
        "sample_rate_per_client": qs,
        "epsilon_local_per_client": eps_l if has_local_mech else None,
        "epsilon_global_per_client": eps_g,
        "epsilon_total_per_client": eps_t,
    }


class DPFPL:
    """DP-FPL on the method skeleton (:mod:`fpl_fast.methods.skeleton`), resumable and with a bar per local step.

    The backbone, class names and encoded data come in from outside (fpl_fast.job loads them once, the tests and
    the attack hand in their own), so the method is built per run; ``out`` is only named in divergence messages
    (the driver writes the checkpoints there). After a run, ``fed`` is its trained federation.
    """

    name = "dpfpl"
    postfix = ("local_acc", "neighbor_acc", "epsilon_total")  # unused: DP-FPL sets its own bar's postfix
    curves = ("local_acc", "neighbor_acc")  # each client's personalised prompt, on its own split and the others'

    def __init__(
        self,
        backbone: Backbone,
        classnames: list[str],
        data: ClientData,
        *,
        out: Path,
        eval_sets: Sequence[EvalSet] = (),
    ) -> None:
        self.backbone, self.classnames, self.data, self.out = backbone, classnames, data, out
        self.eval_sets = list(eval_sets)  # what --protocol scores beyond the clients' splits
        self.fed: Federation | None = None
        self.columns: tuple[str, ...] = ()  # rounds.csv's columns beyond the shared ones: the protocol's metrics

    def setup(self, cfg: RunConfig) -> _State:
        """The federation with its noise calibrated, and the zero-shot accuracy of the hand-written prompt."""
        fed, plan, qs = build_federation(cfg, self.backbone, self.classnames, self.data)
        self.fed = fed
        protocol = ProtocolEval(cfg, self.backbone, self.eval_sets)
        self.columns = tuple(protocol.metrics)
        zero_shot = _zero_shot(self.backbone, self.classnames, self.data, cfg.text_path)
        return _State(cfg, fed, plan, qs, zero_shot, protocol)

    def state_dict(self, st: _State) -> dict[str, Any]:
        return {"federation": st.fed.state_dict()}

    def load_state_dict(self, st: _State, saved: dict[str, Any]) -> None:
        st.fed.load_state_dict(saved["federation"])
        st.history = list(saved["rounds"])  # the driver's records of the rounds before the resume

    def progress(self, st: _State, rounds: range, *, enabled: bool) -> tqdm:
        """One tick per local step: a DP-FPL round is many steps of every sampled client."""
        st.bar = progress_bar(len(rounds) * st.fed.steps_per_round, desc="fpl_fast", enabled=enabled)
        return st.bar

    def round(self, st: _State, rnd: int) -> dict[str, Any] | None:
        """Sample clients, train them (the divergence guard after every step); every ``eval_every`` rounds and on
        the last, evaluate and record accuracies, the epsilons spent so far and the mean loss, else None."""
        cfg, fed = st.cfg, st.fed
        stats = fed.train_round(fed.sample_clients(), on_step=divergence_guard(fed, rnd, self.out, bar=st.bar))
        if rnd % cfg.eval_every != 0 and rnd != cfg.rounds:
            return None
        ev = st.last_eval = fed.evaluate(eval_seed(cfg, rnd - 1))
        record = {**eval_record(ev, fed.clients.accountants, stats, fed.clients.clip_norms), **dropped(fed.server)}
        st.last_protocol = st.protocol.evaluate(fed, ev, eval_seed(cfg, rnd - 1))
        record.update(st.last_protocol[0])
        st.history.append({"round": rnd, **record})
        if st.bar is not None:
            st.bar.set_postfix(
                acc=f"{ev['local_acc']:.3f}", nb=f"{ev['neighbor_acc']:.3f}", eps=f"{record['epsilon_total']:.3g}"
            )
        return record

    def final(self, st: _State) -> dict[str, Any]:
        """Accuracies (the last round's and the means over the last evaluated rounds), the privacy guarantee and
        what it rests on (accountant, noise plan, sampling, randomness)."""
        cfg, fed = st.cfg, st.fed
        last_eval, last_protocol = st.last_eval, st.last_protocol
        if last_eval is None or last_protocol is None:  # resumed a finished run: evaluate the final state again
            last_eval = fed.evaluate(eval_seed(cfg, cfg.rounds - 1))
            last_protocol = st.protocol.evaluate(fed, last_eval, eval_seed(cfg, cfg.rounds - 1))
        return {
            "local_acc": last_eval["local_acc"],
            "neighbor_acc": last_eval["neighbor_acc"],
            **recent_accuracy_means(st.history),
            "zero_shot_acc": st.zero_shot,
            **privacy_summary(cfg, st.plan, st.qs, fed.clients.accountants),
            "clients_dropped_per_round": [list(d) for d in fed.server.dropped],
            **fed.text.summary(),
            "local_acc_per_client": last_eval["local_acc_per_client"],
            "neighbor_acc_per_client": last_eval["neighbor_acc_per_client"],
            **protocol_summary(cfg, st.protocol, last_protocol, st.history),
        }
