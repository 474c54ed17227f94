"""The evaluation protocols of ``--protocol`` (docs/explanation/protocols.md): what a DP-FPL run scores its prompts
on beyond each client's own test split (local) and the others' (neighbour), which every protocol keeps.

- ``personal``: nothing more (the run as it always was).
- ``global``: the global prompt G alone on the whole test split (FLiP's global protocol).
- ``dual``: that and the harmonic mean of the mean local accuracy and it (FLiP's dual protocol).
- ``base2novel``: the federation trains on the base classes (:mod:`fpl_fast.data.base_novel`, CoCoOp's split);
  the global prompt and every client's personalised prompt are scored on the whole base test split and on the
  novel classes' test examples against the novel class names, with the harmonic mean of each pair (the
  personalised prompts' accuracies are means over the clients).
- ``xdataset`` / ``xdomain``: the global prompt on the training dataset's whole test split, and the global prompt
  and every client's personalised prompt (mean over clients) on each target dataset's test split with its class
  names, with the means over the targets (CoCoOp's cross-dataset transfer, CoOp's and CoCoOp's domain generalisation).

Every metric is evaluated with the round's other accuracies (every ``--eval-every`` rounds and after the last), so
that each has its curve in rounds.csv and its means over the last 5 and 10 evaluations in results.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fpl_fast.backbone.protocol import Backbone
from fpl_fast.config import RunConfig
from fpl_fast.federated.engine import Federation
from fpl_fast.federated.eval_sets import EvalSet, set_accuracies
from fpl_fast.prompts.class_prompts import ClassPrompts

__all__ = ["ProtocolEval", "harmonic_mean"]

TRANSFER = ("xdataset", "xdomain")


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b), 0 where both are 0 (the harmonic mean that CoCoOp and FLiP report)."""
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def _metrics(protocol: str, targets: Sequence[str]) -> dict[str, str]:
    """The protocol's metrics (keys of a round record and of results.json's final) -> what each is."""
    if protocol == "global":
        return {"global_acc": "global prompt alone, whole test split"}
    if protocol == "dual":
        return {
            "global_acc": "global prompt alone, whole test split",
            "dual_hm": "dual: harmonic mean of mean local accuracy and global accuracy",
        }
    if protocol == "base2novel":
        return {
            "global_base_acc": "global prompt, base classes",
            "global_novel_acc": "global prompt, novel classes",
            "global_hm": "global prompt, harmonic mean of base and novel",
            "personal_base_acc": "personalised prompts, base classes (mean over clients)",
            "personal_novel_acc": "personalised prompts, novel classes (mean over clients)",
            "personal_hm": "personalised prompts, harmonic mean of base and novel",
        }
    if protocol in TRANSFER:
        out = {"global_acc": "global prompt alone, whole test split of the training dataset"}
        for t in targets:
            out[f"global_acc@{t}"] = f"global prompt on {t}"
            out[f"personal_acc@{t}"] = f"personalised prompts on {t} (mean over clients)"
        out["transfer_global_acc"] = "global prompt, mean over the target datasets"
        out["transfer_personal_acc"] = "personalised prompts, mean over the target datasets"
        return out
    return {}


class ProtocolEval:
    """A run's protocol: its metrics (:attr:`metrics`) and their values for a trained federation (:meth:`evaluate`).

    Args:
        cfg: the run's configuration (``protocol``; ``n_ctx`` and ``text_path`` for the targets' class prompts).
        backbone: the frozen CLIP (its text tower encodes the targets' class names).
        eval_sets: what the protocol scores beyond the federation's own test split
            (:func:`fpl_fast.preparation.prepare_eval_sets`): base2novel the novel classes, xdataset and xdomain
            the target datasets (in ``cfg.eval_dataset_names``' order), the others none.

    Raises:
        ValueError: ``eval_sets`` do not fit the protocol.
    """

    def __init__(self, cfg: RunConfig, backbone: Backbone, eval_sets: Sequence[EvalSet] = ()) -> None:
        self.protocol = cfg.protocol
        wanted = {"base2novel": ("novel",)}.get(cfg.protocol, cfg.eval_dataset_names)
        if tuple(s.name for s in eval_sets) != tuple(wanted):
            raise ValueError(
                f"protocol {cfg.protocol!r} evaluates on {list(wanted) or 'no other set'}, got eval sets "
                f"{[s.name for s in eval_sets]} (fpl_fast.preparation.prepare_eval_sets makes them)"
            )
        self.sets = list(eval_sets)
        self.texts = [ClassPrompts(backbone, s.classnames, cfg.n_ctx, cfg.text_path) for s in self.sets]
        self.metrics = _metrics(cfg.protocol, [s.name for s in self.sets])

    def evaluate(self, fed: Federation, ev: dict[str, Any], eval_seed: int) -> tuple[dict[str, float], dict[str, Any]]:
        """The protocol's metrics after a round.

        Args:
            fed: the federation as trained so far.
            ev: its :meth:`~fpl_fast.federated.engine.Federation.evaluate` of this round (``local_acc``).
            eval_seed: the seed of that evaluation's low-rank factorisation (the personalised prompts are the ones
                it scored).

        Returns:
            ``(metrics, per_client)``: the round's value of every metric of :attr:`metrics`, and each personalised
            metric's per-client accuracies (``<metric>_per_client``), for results.json's final.
        """
        if not self.metrics:
            return {}, {}
        data = fed.data
        own = set_accuracies(fed.global_text_features(), data.test_feats, data.test_labels)[0]
        out: dict[str, float] = {}
        per_client: dict[str, Any] = {}
        if self.protocol in ("global", "dual", *TRANSFER):
            out["global_acc"] = own
        if self.protocol == "dual":
            out["dual_hm"] = harmonic_mean(float(ev["local_acc"]), own)
        if self.protocol == "base2novel":
            novel, text = self.sets[0], self.texts[0]
            base_each = set_accuracies(fed.client_text_features(eval_seed), data.test_feats, data.test_labels)
            novel_each = set_accuracies(fed.client_text_features(eval_seed, text), novel.feats, novel.labels)
            g_novel = set_accuracies(fed.global_text_features(text), novel.feats, novel.labels)[0]
            p_base, p_novel = float(np.mean(base_each)), float(np.mean(novel_each))
            out.update(global_base_acc=own, global_novel_acc=g_novel, global_hm=harmonic_mean(own, g_novel))
            out.update(personal_base_acc=p_base, personal_novel_acc=p_novel, personal_hm=harmonic_mean(p_base, p_novel))
            per_client.update(personal_base_acc_per_client=base_each, personal_novel_acc_per_client=novel_each)
        if self.protocol in TRANSFER:
            for target, text in zip(self.sets, self.texts, strict=True):
                g = set_accuracies(fed.global_text_features(text), target.feats, target.labels)[0]
                each = set_accuracies(fed.client_text_features(eval_seed, text), target.feats, target.labels)
                out[f"global_acc@{target.name}"] = g
                out[f"personal_acc@{target.name}"] = float(np.mean(each))
                per_client[f"personal_acc_per_client@{target.name}"] = each
            out["transfer_global_acc"] = float(np.mean([out[f"global_acc@{s.name}"] for s in self.sets]))
            out["transfer_personal_acc"] = float(np.mean([out[f"personal_acc@{s.name}"] for s in self.sets]))
        return out, per_client
