"""The canary attack of the privacy audit (privacy.audit_bound): one training run with the canaries in the audited
client's data, the white-box canaries inserted where the mechanism clips, and the releases the auditor observes.

The other clients and the server are the ordinary roles; only the audited client's sampler and three extension points
of :class:`~fpl_fast.federated.client.Clients` (its examples, the output-mode release, the global release) and the
server's aggregate are instrumented.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fpl_fast import ops
from fpl_fast.config import RunConfig
from fpl_fast.federated.client import BatchSampler, ClientData, Clients
from fpl_fast.federated.engine import Federation
from fpl_fast.federated.server import Server
from fpl_fast.methods.dpfpl import build_federation, eval_seed, progress_bar, train_rounds
from fpl_fast.privacy.audit_bound import (
    CANARY_NORM,
    AuditConfig,
    Canaries,
    CanaryDesign,
    black_box_scores,
    one_run_bound,
)
from fpl_fast.privacy.output_dp import OutputDPResult
from fpl_fast.privacy.plan import NoisePlan
from fpl_fast.validation import check

__all__ = ["AuditedClients", "AuditedServer", "audited_federation", "observed_release", "run_audit"]


class AuditedClients(Clients):
    """:class:`Clients` whose audited client holds the included canaries (``canaries``, a keyword argument).

    Its sampler runs over its n examples and the included canaries at the client's public rate b / n; a white-box
    canary in a batch contributes its crafted gradient where the mechanism clips, and each release the auditor
    observes is added to the canaries' scores. The other clients are untouched.
    """

    def __init__(self, *args: Any, canaries: Canaries, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.canaries = canaries
        canaries.output_mode = self.output_mode
        per_example = self.dp_active and self.cfg.clip_mode in ("sample", "output")
        default = CANARY_NORM["per-example clip" if per_example else "no per-example clip"]
        canaries.norm = canaries.design.norm if canaries.design.norm is not None else default
        self.audited = self.ids.index(canaries.design.client)
        old = self.samplers[self.audited]
        self.n_real = old.size
        self.samplers[self.audited] = BatchSampler(
            old.size + len(canaries.members),
            old.batch_size,
            poisson=old.poisson,
            rng=old.rng,
            rate=old.sample_rate,  # the accountant's q, fixed before the draw
        )

    # -- the batch -------------------------------------------------------------------------------
    def batch(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        active = rows.tolist()
        self.canaries.position = active.index(self.audited) if self.audited in active else None
        self.canaries.sampled = np.zeros(0, dtype=np.int64)
        return super().batch(rows)

    def next_examples(self, k: int) -> tuple[Tensor, Tensor]:
        if k != self.audited:
            return super().next_examples(k)
        pos = self.samplers[k].next()
        real = self.data.train_idx[k][pos[pos < self.n_real]]
        ids = self.canaries.members[pos[pos >= self.n_real] - self.n_real]
        self.canaries.sampled = ids
        feats, labels = self.data.examples(real)
        design = self.canaries.design
        if design.white_box:  # their gradients are crafted, not computed from an example
            return feats, labels
        assert design.features is not None and design.labels is not None
        t = torch.as_tensor(ids, dtype=torch.long)
        return torch.cat([feats, design.features[t]]), torch.cat([labels, design.labels[t]])

    # -- white-box insertion where the clipping happens ------------------------------------------------
    def _crafted_context(self, grads: Tensor) -> Tensor:
        """The crafted context gradients (c, n_ctx, d) of this step's sampled canaries."""
        c = self.canaries
        C = float(self.clip_norms[self.audited].max())  # the audited client's clip norm in force (adaptive: now)
        scale = c.norm * (C if math.isfinite(C) else 1.0)
        shape = grads.shape[-2:]
        return c.crafted(c.sampled, shape.numel(), scale, grads.device).view(-1, *shape).to(grads.dtype)

    def per_sample_grads(self, ctx, feats, labels, mask):
        grads, losses = super().per_sample_grads(ctx, feats, labels, mask)
        c = self.canaries
        if not c.crafting:
            return grads, losses
        extra = grads.new_zeros(grads.shape[0], len(c.sampled), *grads.shape[2:])
        extra[c.position] = self._crafted_context(grads)
        return torch.cat([grads, extra], dim=1), losses  # more per-example rows; the denominator stays b

    def count_mask(self, mask: Tensor, n_rows: int) -> Tensor:
        out = super().count_mask(mask, n_rows)
        c = self.canaries
        if c.crafting and c.position is not None:  # the crafted canaries are examples of the audited client
            out[c.position, mask.shape[1] : mask.shape[1] + len(c.sampled)] = 1.0
        return out

    def batch_mean_grad(self, ctx, feats, labels, mask):
        grad, losses = super().batch_mean_grad(ctx, feats, labels, mask)
        c = self.canaries
        if not c.crafting:
            return grad, losses
        p, n = c.position, float(mask[c.position].sum())
        crafted = self._crafted_context(grad).sum(0)
        grad = grad.clone()
        grad[p, 0] = (grad[p, 0] * n + crafted) / (n + len(c.sampled))  # the canaries join the batch mean
        return grad, losses

    def output_release(self, text, feats, labels, mask, streams) -> OutputDPResult:
        res = super().output_release(text, feats, labels, mask, streams)
        c = self.canaries
        if not c.design.white_box or c.position is None:
            return res
        p, clip = c.position, float(res.clip_norms[c.position])
        norm = c.norm * clip  # a crafted cotangent, clipped by the op's own factor
        kept = norm * min(1.0, clip / (norm + ops.CLIP_EPS))
        size = res.release[p].numel()
        added = c.crafted(c.sampled, size, kept, res.release.device).sum(0).view_as(res.release[p])
        release = res.release.clone()
        release[p] = release[p] + added / self.batch_denominator
        c.observe(release[p], clip / self.batch_denominator)
        return dataclasses.replace(res, release=release)

    # -- the observed global release ------------------------------------------------------------------
    def global_release(self, rows, grad_global):
        out = super().global_release(rows, grad_global)
        c = self.canaries
        if c.observing_global:
            C = float(self.step_global_clip[c.position])  # the C this step's g_G was clipped to
            c.observe(out[c.position], C / self.batch_denominator)
        return out


class AuditedServer(Server):
    """:class:`Server` whose noised mean of the clients' gradients of G (sync="step") the white-box auditor sees."""

    def __init__(self, *args: Any, canaries: Canaries, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.canaries = canaries

    def aggregate(self, grads: Tensor, clip_norm: float | None = None) -> Tensor:
        out = super().aggregate(grads, clip_norm)
        c = self.canaries
        if c.observing_global:
            C = self.cfg.clip_norm if clip_norm is None else clip_norm
            c.observe(out, C / (float(self.cfg.batch_size) * grads.shape[0]))
        return out


def observed_release(cfg: RunConfig, audit: AuditConfig, output_mode: bool) -> str:
    """What the auditor sees, in words (every report says which auditor it was)."""
    if audit.auditor == "black-box":
        return "black-box: canary images with wrong labels, scored by their loss under the final personalised prompt"
    if output_mode:
        return "white-box: crafted per-example cotangents dl/dT, scored on the client's release Z of every step"
    where = "the server's noised mean" if cfg.sync == "step" else "the client's noised gradient"
    what = "batch mean" if cfg.clip_mode == "batch" else "per-example context gradient"
    return f"white-box: crafted gradients in the {what}, scored on the global prompt's release of every step ({where})"


def audited_federation(
    cfg: RunConfig, audit: AuditConfig, backbone: Any, classnames: list[str], data: ClientData
) -> tuple[Federation, NoisePlan, list[float], Canaries]:
    """The run's federation with the canaries drawn and its audited client and server instrumented."""
    n_cls, width = len(classnames), data.train_feats.shape[1]
    size = n_cls * width if cfg.clip_mode == "output" else cfg.n_ctx * backbone.ctx_dim
    design = CanaryDesign.build(audit, cfg, data, observed_size=size, n_cls=n_cls)
    canaries = Canaries(design, cfg.noise_seed)
    fed, plan, qs = build_federation(
        cfg,
        backbone,
        classnames,
        data,
        make_clients=partial(AuditedClients, canaries=canaries),
        make_server=partial(AuditedServer, canaries=canaries),
    )
    return fed, plan, qs, canaries


def run_audit(
    cfg: RunConfig,
    audit: AuditConfig,
    backbone: Any,
    classnames: list[str],
    data: ClientData,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train once with the canaries, score them, and bound epsilon from below; the report (audit.json's content)."""
    output_mode = cfg.clip_mode == "output"
    fed, plan, qs, canaries = audited_federation(cfg, audit, backbone, classnames, data)
    design = canaries.design
    check(
        not design.white_box or canaries.output_mode == output_mode,
        "the white-box audit of --clip-mode output needs noise > 0 (without noise the run trains the plain "
        "objective: audit that with --clip-mode sample)",
    )
    bar = progress_bar(cfg.rounds * fed.steps_per_round, desc=f"audit ({audit.auditor})", enabled=progress)
    for _ in train_rounds(fed, 0, cfg.rounds, on_step=bar.update):
        pass
    bar.close()
    seed = eval_seed(cfg, cfg.rounds - 1)
    if design.white_box:
        scores = canaries.scores
    else:
        text = fed.client_text_features(seed)[design.client]
        scores = black_box_scores(text, design, backbone.logit_scale)
    bound = one_run_bound(scores, canaries.included, delta=cfg.delta, confidence=audit.confidence)
    eps = fed.clients.accountants[design.client].epsilons()
    whole = not design.white_box or canaries.output_mode or not fed.learner.scheme.has_local
    upper, upper_name = (eps.total, "epsilon_total") if whole else (eps.global_, "epsilon_global")
    lower = bound["epsilon_lower_bound"]
    evaluation = fed.evaluate(seed)
    return {
        "auditor": audit.auditor,
        "observed": observed_release(cfg, audit, canaries.output_mode),
        "epsilon_lower_bound": lower,
        "confidence": audit.confidence,
        "delta": cfg.delta,
        "upper_bound": upper,
        "upper_bound_name": upper_name,
        "ratio": lower / upper if upper > 0 and math.isfinite(upper) else None,
        "claimed_epsilon": cfg.epsilon if cfg.calibration == "paper" else None,
        "accountant": {"epsilon_local": eps.local, "epsilon_global": eps.global_, "epsilon_total": eps.total},
        "canaries": design.m,
        "audited_client": design.client,
        "canary_norm": canaries.norm if design.white_box else None,
        "sample_rate": qs[design.client],
        "steps": int(fed.clients.accountants[design.client].steps),
        "observed_steps": canaries.observed_steps,
        "noise_local": plan.sigma_local,
        "noise_global": plan.sigma_global,
        "sampling": cfg.sampling_scheme,
        "guesses": bound["guesses"],
        "correct": bound["correct"],
        "table": bound["table"],
        "included": canaries.included.tolist(),
        "scores": [float(x) for x in scores],
        "guess": bound["guess"].tolist(),
        "local_acc": evaluation["local_acc"],
        "audited_client_local_acc": evaluation["local_acc_per_client"][design.client],
    }
