"""Clients: their private state and the math of one local step, for a batch of clients at once.

A :class:`Clients` group holds, for each of its clients, the local prompt and its optimiser state, the client's
copy of the global prompt, its batch sampler, its secret randomness (noise stream and sampling generator) and its
privacy ledger. All clients of a group go through the text encoder in one call (the in-process simulation holds
every client in one group; a node of a real federation holds a group of one).

One local step of the active clients A (|A| = K_a):
    factors (lowrank of L, fresh randomness) -> ctx (K_a, n_ctx, d)
    -> text features T = f_txt([prefix | ctx | suffix]) (K_a, n_cls, D), one encoder call for all clients
    -> per-sample cotangents dL_i/dT from the logit head -> per-sample grad_ctx (K_a, b, n_ctx, d)
       (b vector-Jacobian products, chunked; or one backward of the batch mean with --clip-mode batch)
    -> fused clip + local noise (ops.dp_lowrank_clip_noise) -> local update (the factorisation's)
    -> the clipped mean gradient of G, sent to the server (sync="step"), or client-side DP-SGD on the client's
       own copy of G (sync="round").
With --clip-mode output the step is instead: T -> per-example cotangents dl_i/dT clipped to C_o in closed form,
summed, noised once per client (ops.dp_output_clip_noise) -> one backward of T with that release as its cotangent
-> g_G, g_U, g_V (or g_L) without further clipping or noise.
A client's randomness depends only on its key and how far it has stepped, never on which clients share a launch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_fast.config import RunConfig
from fpl_fast.federated.optim import ClientSGD
from fpl_fast.privacy.adaptive_clip import (
    centred_counts,
    noised_fractions,
    op_clip_columns,
    quantity_norms,
    updated_clip_norms,
)
from fpl_fast.privacy.clipping import LocalDP, privatize_local
from fpl_fast.privacy.global_noise import client_noise_global
from fpl_fast.privacy.noise_stream import NoiseStream, take_each
from fpl_fast.privacy.output_dp import OutputDP, OutputDPResult, privatize_output
from fpl_fast.privacy.per_sample import (
    logit_cotangents,
    per_sample_prompt_grads_by_row,
    per_sample_prompt_grads_from,
)
from fpl_fast.privacy.plan import ClientAccountant, NoisePlan, clipped_quantities, global_release_noise
from fpl_fast.privacy.randomness import PartyRandomness, derive_key
from fpl_fast.prompts import PromptLearner
from fpl_fast.prompts.class_prompts import ClassPrompts
from fpl_fast.validation import ConfigError

__all__ = ["ClientData", "StepStats", "BatchSampler", "Clients", "sample_rates", "steps_per_round"]


@dataclass
class ClientData:
    """Cached features of a set of clients: images encoded once, indices per client.

    train_feats (N_train, D) and test_feats (N_test, D) are the frozen image encoder's outputs (float32);
    train_idx[k] / test_idx[k] index client k's examples.
    """

    train_feats: Tensor
    train_labels: Tensor
    test_feats: Tensor
    test_labels: Tensor
    train_idx: list[np.ndarray]
    test_idx: list[np.ndarray]
    # With --augment: indices -> freshly augmented features (the cached train_feats are then unused).
    augment_fn: Callable[[np.ndarray], Tensor] | None = None

    def train_features(self, indices: np.ndarray) -> Tensor:
        if self.augment_fn is not None:
            return self.augment_fn(indices).float().cpu()
        return self.train_feats[torch.as_tensor(indices, dtype=torch.long)]

    def examples(self, indices: np.ndarray) -> tuple[Tensor, Tensor]:
        """Features (n, D) and labels (n,) of training examples ``indices`` (n may be 0)."""
        feats = self.train_features(indices) if len(indices) else self.train_feats[:0]
        return feats, self.train_labels[torch.as_tensor(indices, dtype=torch.long)]


@dataclass
class StepStats:
    loss: float
    clipped_fraction: float
    batch_sizes: list[int] = field(default_factory=list)
    # The largest clip norm of g_G among the step's clients (what the server's noise must cover; 0 in output mode).
    global_clip_norm: float = 0.0


# Activation floats one per-sample chunk may span (see Clients.chunk_size). CPU: measured. On the full text path
# it gave chunk 8 at the tiny setting (394 -> 217 ms/step against the whole batch); on the shared path it gives the
# whole batch at the tiny setting (chunks 4-32 all measured 63-80 ms/step) and chunk 1 at the paper setting, the
# fastest there (2 clients of ViT-B-16: chunk 1 13.8, 4 19.4, 8 16.2, 32 23.1 s/step; bench/README.md). CUDA: an
# estimate (a few GiB of backward temporaries); sweep it on a GPU with bench_round.py --chunk-size.
_CHUNK_FLOATS = {"cpu": 2**20, "cuda": 2**27}

# The factor products of an already private gradient (output mode): no clipping, no noise.
_NO_CLIP = LocalDP(clip_norm=math.inf, noise_multiplier=0.0, clip_mode="batch")


def sample_rate(batch_size: int, size: int) -> float:
    """A client's sampling rate q = min(1, b / n) (a client with fewer than b examples uses all of them)."""
    return min(1.0, float(batch_size) / size)


def sample_rates(cfg: RunConfig, sizes: list[int]) -> list[float]:
    """Each client's sampling rate, from its number of training examples.

    Raises:
        ConfigError: Poisson sampling with an expected batch larger than the smallest client's data (q = b / n > 1:
            no sampling rate gives that batch; shuffled batches take all of a smaller client's examples).
    """
    if cfg.sampling_scheme == "poisson" and sizes and cfg.batch_size > min(sizes):
        k = int(np.argmin(sizes))
        raise ConfigError(
            "batch_size",
            f"batch_size {cfg.batch_size} is larger than client {k}'s {sizes[k]} training examples (Poisson sampling "
            f"needs q = b / n <= 1); the largest batch_size allowed here is {sizes[k]}",
        )
    return [sample_rate(cfg.batch_size, n) for n in sizes]


def steps_per_round(cfg: RunConfig, sizes: list[int]) -> int:
    """Local steps per round, by ``cfg.steps_per_round``.

    "mean" (default): E epochs of the average client, E ceil(mean size / b) (all clients step together, so a larger
    client sees part of its data per epoch and a smaller one cycles; each client's accountant counts its real steps).
    "authors": the DP-FPL authors' count, E floor(smallest client's size / b): their data_manager cuts every client to
    the smallest client's size and drops the last partial batch. Only the count is theirs: every client here still
    samples from all of its data (q = b / n_k, as its accountant is told).

    Raises:
        ConfigError: "authors" where the smallest client holds fewer than b examples: their drop_last loop would
            take no step at all, so there is nothing of theirs to reproduce (rounding it up to 1 would be a rule of
            neither); lower batch_size or use "mean".
    """
    if cfg.steps_per_round == "authors":
        smallest = min(sizes)
        batches = smallest // cfg.batch_size
        if batches < 1:
            raise ConfigError(
                "steps_per_round",
                f"steps_per_round='authors' gives 0 local steps: the smallest client holds {smallest} training "
                f"examples, fewer than batch_size={cfg.batch_size} (the authors drop the last partial batch); lower "
                "batch_size or use steps_per_round='mean'",
                others=("batch_size",),
            )
        return cfg.local_epochs * batches
    return cfg.local_epochs * max(1, math.ceil(float(np.mean(sizes)) / float(cfg.batch_size)))


class BatchSampler:
    """One client's batches: shuffled fixed-size batches (reshuffled each pass) or Poisson sampling, drawn from
    the client's own generator.

    Every client divides its clipped sum by the same b (one denominator for the fused op). A client with fewer
    than b examples uses all of them each step: the sensitivity stays C / b, its step is just shorter, and the
    accountant sees its sampling rate 1 (no amplification for it).
    """

    def __init__(
        self, size: int, batch_size: int, *, poisson: bool, rng: np.random.Generator, rate: float | None = None
    ) -> None:
        self.size = size
        self.batch_size = batch_size
        self.poisson = poisson
        self.rng = rng
        # A fixed public rate (the privacy audit's client, whose data size depends on the secret canary draw).
        self.rate = rate
        self.order = rng.permutation(size)
        self.pos = 0

    @property
    def sample_rate(self) -> float:
        return sample_rate(self.batch_size, self.size) if self.rate is None else self.rate

    def next(self) -> np.ndarray:
        n = self.size
        if self.poisson:
            return np.flatnonzero(self.rng.random(n) < self.sample_rate)
        out: list[np.ndarray] = []
        need = min(self.batch_size, n)  # never the same example twice in one batch
        while need > 0:
            if self.pos >= n:
                self.order = self.rng.permutation(n)
                self.pos = 0
            take = self.order[self.pos : self.pos + need]
            self.pos += len(take)
            need -= len(take)
            out.append(take)
        return np.concatenate(out)

    def state_dict(self) -> dict:
        """The place in the shuffled order (secret: which examples the batches hold)."""
        return {"order": self.order.copy(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.order = np.asarray(state["order"])
        self.pos = int(state["pos"])


class Clients:
    """A group of clients stepping together (rows of stacked tensors; ``ids`` names each row's client).

    Args:
        cfg: the run configuration.
        text: the class prompts of the label set on the frozen backbone.
        data: cached image features and each row's train/test indices.
        learner: the rows' prompt state (copies of G and local parameters).
        plan: the noise in force and what each client's accountant is told.
        ids: each row's client number (names its secret keys: "client-{id}").
    """

    def __init__(
        self,
        cfg: RunConfig,
        text: ClassPrompts,
        data: ClientData,
        learner: PromptLearner,
        plan: NoisePlan,
        ids: list[int],
    ) -> None:
        self.cfg, self.text, self.data, self.learner, self.plan, self.ids = cfg, text, data, learner, plan, ids
        self.device = torch.device(cfg.device)
        # Secret by default (OS CSPRNG keys); reproducible only with --noise-seed.
        self.rand = [PartyRandomness.create(f"client-{k}", cfg.noise_seed) for k in ids]
        self.samplers = [
            BatchSampler(len(ix), cfg.batch_size, poisson=cfg.sampling == "poisson", rng=r.sampling)
            for ix, r in zip(data.train_idx, self.rand, strict=True)
        ]
        self.accountants = [ClientAccountant(cfg, plan, s.sample_rate) for s in self.samplers]
        # Each client's clip norm per clipped quantity (K, Q); adaptive clipping moves it after every step.
        self.quantities = clipped_quantities(cfg)
        self.clip_update = plan.adaptive_clipping(cfg) if cfg.adaptive_clip else None
        self.clip_norms = torch.full((len(ids), len(self.quantities)), cfg.clip_norm, dtype=torch.float64)
        self.opt_local = ClientSGD(learner.local, lr=cfg.learning_rate, momentum=cfg.momentum)
        # sync="round": each client runs DP-SGD on its own copy of G.
        self.opt_global = ClientSGD({"g": learner.client_global}, lr=cfg.learning_rate, momentum=cfg.momentum)

    # ------------------------------------------------------------------------------------------
    @property
    def dp_active(self) -> bool:
        """Clipping is on whenever any noise is (a run without noise trains the plain objective)."""
        return self.plan.sigma_local > 0 or self.plan.sigma_global > 0

    @property
    def output_mode(self) -> bool:
        return self.cfg.clip_mode == "output" and self.dp_active

    @property
    def batch_denominator(self) -> float:
        """b that divides the clipped sums: the fixed batch size, or the expected one under Poisson sampling."""
        return float(self.cfg.batch_size)

    @property
    def global_noise(self) -> float:
        """sigma_g of the global release (none in output mode: the one release already covers G)."""
        return global_release_noise(self.cfg, self.plan)

    @property
    def client_global_noise(self) -> float:
        """sigma_g each client adds to its clipped gradient of G before sending it: the authors' promptfl noise
        (--promptfl-client-noise), else none (the server's noise alone covers G)."""
        return self.global_noise if self.cfg.promptfl_client_noise else 0.0

    def noise_streams(self, rows: Tensor) -> list[NoiseStream]:
        return [self.rand[k].noise for k in rows.tolist()]

    def local_dp(self, per_sample: bool) -> LocalDP:
        """The local clipping/noise in force (no clipping and no noise when DP is off)."""
        cfg = self.cfg
        if not self.dp_active:
            return _NO_CLIP
        return LocalDP(
            clip_norm=cfg.clip_norm,
            noise_multiplier=self.plan.sigma_local,
            clip_mode="sample" if per_sample else "batch",
            joint_uv=cfg.clip_uv == "joint",
            expected_batch_size=self.batch_denominator,
            normalize=cfg.automatic_clip and per_sample,
            stability=cfg.clip_stability,
        )

    def global_clip_norms(self, rows: Tensor) -> Tensor:
        """(K_a,) the clip norm of g_G in force for each of the clients ``rows`` (float64, on the CPU)."""
        g = next(j for j, cols in enumerate(self.quantities) if 2 in cols) if self.cfg.clip_mode != "output" else 0
        return self.clip_norms[rows.cpu(), g]

    def count_mask(self, mask: Tensor, n_rows: int) -> Tensor:
        """(K_a, n_rows) which per-example norm rows are real examples (the audit's crafted canaries add rows)."""
        return F.pad(mask, (0, n_rows - mask.shape[1]))

    def adapt_clip_norms(self, rows: Tensor, norms: Tensor, mask: Tensor, streams: list[NoiseStream]) -> None:
        """Adaptive clipping: each client's noised centred counts move its clip norms (adaptive_clip.py)."""
        assert self.clip_update is not None
        clip = self.clip_norms[rows.cpu()]
        q_norms = quantity_norms(norms.detach().double().cpu(), self.quantities)
        counts = centred_counts(q_norms, clip, self.count_mask(mask.cpu(), q_norms.shape[1]))
        fractions = noised_fractions(counts, self.clip_update, streams)
        self.clip_norms[rows.cpu()] = updated_clip_norms(clip, fractions, self.clip_update)

    def chunk_size(self, n_active: int) -> int:
        """Samples per vmapped backward: --chunk-size, else as many as keep one chunk's activations
        (chunk x n_active x token rows per client x width floats) under the device's budget, at least 1."""
        if self.cfg.chunk_size is not None:
            return self.cfg.chunk_size
        return max(1, self._chunk_budget() // self._lane(n_active))

    def _lane(self, n_active: int) -> int:
        """Activation floats of one sample of ``n_active`` clients through the text tower (one vmap lane)."""
        return n_active * self.text.rows_per_client * self.text.width

    def _chunk_budget(self) -> int:
        return _CHUNK_FLOATS.get(self.device.type, _CHUNK_FLOATS["cuda"])

    def pulls_back_per_client(self, n_active: int) -> bool:
        """Whether the per-sample pull-backs take one vjp per client: when one sample of all the active clients
        already exceeds the chunk budget (a large tower; the pull-backs are compute-bound, so splitting the lanes by
        client loses no batching, and each client then pulls back only its own samples, not the padding up to the
        largest Poisson batch)."""
        return n_active > 1 and self._lane(n_active) > self._chunk_budget()

    # ------------------------------------------------------------------------------------------
    # One step
    # ------------------------------------------------------------------------------------------
    def batch(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Padded features (K_a, B, D), labels (K_a, B), mask (K_a, B) of this step's batches."""
        return self.stack_batch([self.next_examples(k) for k in rows.tolist()])

    def next_examples(self, k: int) -> tuple[Tensor, Tensor]:
        """Features (n, D) and labels (n,) of client ``k``'s next batch, from its sampler."""
        return self.data.examples(self.data.train_idx[k][self.samplers[k].next()])

    def stack_batch(self, examples: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
        """Each row's examples padded to the largest batch: features, labels and the mask of real entries."""
        B = max(1, max(len(y) for _, y in examples))
        D = self.data.train_feats.shape[1]
        feats = torch.zeros(len(examples), B, D)
        labels = torch.zeros(len(examples), B, dtype=torch.long)
        mask = torch.zeros(len(examples), B)
        for j, (x, y) in enumerate(examples):
            feats[j, : len(y)] = x
            labels[j, : len(y)] = y
            mask[j, : len(y)] = 1.0
        return feats.to(self.device), labels.to(self.device), mask.to(self.device)

    def per_sample_grads(self, ctx: Tensor, feats: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample context gradients (K_a, B, n_ctx, d) and the per-sample losses (K_a, B).

        The prompt-side primal is the context itself, so each vmapped pull-back returns the context gradient
        already summed over classes. While one sample of every client fits the chunk budget, lane i of one vmapped
        pull-back carries sample i of every client on that client's rows (B lanes through all K_a clients). When it
        does not (:meth:`pulls_back_per_client`: large towers, compute-bound pull-backs), each client gets its own
        vjp and pulls back only its own samples: B = max_k b_k lanes through every client would spend the Poisson
        padding's share of the work (b_k differs by client) for nothing.
        """
        Ka, n_cls = ctx.shape[0], self.text.n_cls

        def head(flat: Tensor) -> tuple[Tensor, Tensor]:
            text = flat.reshape(Ka, n_cls, -1)
            cot, losses = logit_cotangents(feats, text, labels, self.text.backbone.logit_scale)  # (B, K_a, n_cls, D)
            cot = cot * mask.transpose(0, 1)[..., None, None]  # padded (Poisson) rows contribute nothing
            return cot.flatten(1, 2), losses

        if self.pulls_back_per_client(Ka):
            one_text = lambda c: self.text.features(c, traceable=True)[0]  # noqa: E731
            counts = [int(c) for c in mask.sum(1).tolist()]  # real examples come first in each row
            grads, losses = per_sample_prompt_grads_by_row(
                one_text, ctx, head, counts=counts, chunk_size=self.chunk_size(1)
            )
        else:
            flat_text = lambda c: self.text.features(c, traceable=True).reshape(Ka * n_cls, -1)  # noqa: E731
            grads, losses = per_sample_prompt_grads_from(flat_text, ctx, head, chunk_size=self.chunk_size(Ka))
        return grads.transpose(0, 1), (losses * mask).detach()

    def batch_mean_grad(self, ctx: Tensor, feats: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Batch-mean context gradient (K_a, 1, n_ctx, d) (one backward) and per-sample losses."""
        ctx = ctx.detach().requires_grad_(True)
        with torch.enable_grad():
            text = self.text.features(ctx)
            logits = self.text.logits(text, feats).flatten(0, 1)
            losses = F.cross_entropy(logits, labels.flatten(), reduction="none").view_as(mask) * mask
            per_client_mean = losses.sum(1) / mask.sum(1).clamp(min=1)
            (grad,) = torch.autograd.grad(per_client_mean.sum(), ctx)
        return grad.unsqueeze(1), losses.detach()

    def output_release_grad(self, ctx: Tensor, feats: Tensor, labels: Tensor, mask: Tensor, streams):
        """--clip-mode output: the private release Z (K_a, n_cls, D) of the head's clipped, noised cotangents and the
        context gradient J^T Z (K_a, 1, n_ctx, d) by one backward of the text features. J depends on theta only, so
        the gradient is post-processing of Z."""
        ctx = ctx.detach().requires_grad_(True)
        with torch.enable_grad():
            text = self.text.features(ctx)
        res = self.output_release(text.detach(), feats, labels, mask, streams)
        (grad,) = torch.autograd.grad(text, ctx, grad_outputs=res.release)
        return grad.unsqueeze(1), res

    def output_release(self, text: Tensor, feats: Tensor, labels: Tensor, mask: Tensor, streams) -> OutputDPResult:
        """The step's private release of each active client (:func:`privatize_output` at text features ``text``)."""
        clip = self.clip_norms[self.active_rows.cpu(), 0] if self.clip_update is not None else self.cfg.output_clip
        out_cfg = OutputDP(clip_norm=clip, noise_multiplier=self.plan.sigma_local, denominator=self.batch_denominator)
        dt = text.dtype  # float32, or float64 for a float64 backbone (tests)
        scale = self.text.backbone.logit_scale
        return privatize_output(feats.to(dt), text, labels, mask.to(dt), scale, out_cfg, streams)

    def local_step(self, rows: Tensor) -> tuple[Tensor, StepStats]:
        """One local step of the clients ``rows``: their local prompts are updated; returns the clipped mean
        gradients of G (K_a, n_ctx, d) (output mode: already private; with --promptfl-client-noise each noised by
        its client) and the step's statistics."""
        cfg, L = self.cfg, self.learner
        self.active_rows = rows
        streams = self.noise_streams(rows)
        adaptive = self.clip_update is not None
        # The C of g_G this step clips to, kept for its noise (sync="round": global_release, after the update).
        global_clip = self.step_global_clip = self.global_clip_norms(rows)
        seed, off = take_each(streams, L.factorize_draws())
        factors = L.factors(rows, seed=seed, offset=off)
        ctx = L.context(rows, factors).detach()
        feats, labels, mask = self.batch(rows)
        output_mode = self.output_mode
        per_sample = cfg.clip_mode == "sample" and self.dp_active
        out_res = None
        if output_mode:
            grad_ctx, out_res = self.output_release_grad(ctx, feats, labels, mask, streams)
            losses = out_res.losses
        elif per_sample:
            grad_ctx, losses = self.per_sample_grads(ctx, feats, labels, mask)
        else:
            grad_ctx, losses = self.batch_mean_grad(ctx, feats, labels, mask)

        # Output mode: grad_ctx is already the private (divided) release's vjp: no clipping, no noise, b = 1.
        uv = L.scheme.clips_factors
        res = privatize_local(
            grad_ctx.float(),
            factors.u.float() if uv and factors.u is not None else None,
            factors.v.float() if uv and factors.v is not None else None,
            _NO_CLIP if output_mode else self.local_dp(per_sample),
            streams,
            batch_size=1.0 if output_mode else self.batch_denominator,
            local=L.scheme.has_local,
            clip_norms=(
                op_clip_columns(self.clip_norms[rows.cpu()], self.quantities).to(grad_ctx.device)
                if adaptive and not output_mode
                else None
            ),
        )
        if adaptive and self.dp_active:
            self.adapt_clip_norms(rows, out_res.norms if out_res is not None else res.norms, mask, streams)
        local_grads = L.local_update_direction(factors, res.grad_u if uv else res.grad_local, res.grad_v)
        if local_grads:
            self.opt_local.step(rows, local_grads)
        for k in rows.tolist():
            self.accountants[k].record_step()
        n = mask.sum().clamp(min=1)
        clipped = out_res.clip_fraction if out_res is not None else res.clip_fraction[..., 2]
        stats = StepStats(
            loss=float(losses.sum() / n),
            clipped_fraction=float(clipped.mean()),
            batch_sizes=[int(x) for x in mask.sum(1).tolist()],
            global_clip_norm=0.0 if output_mode else float(global_clip.max()),
        )
        grad_global = client_noise_global(
            res.grad_global,
            clip_norm=global_clip.to(res.grad_global)[:, None, None] if adaptive else cfg.clip_norm,
            noise_multiplier=self.client_global_noise,
            batch_size=self.batch_denominator,
            streams=streams,
        )
        return grad_global, stats

    @torch.no_grad()
    def own_global_step(self, rows: Tensor, grad_global: Tensor) -> None:
        """sync="round": client-side DP-SGD on each client's own copy of G (std sigma_g C / b per step): the
        guarantee needs no trusted server, and averaging at the round's end is post-processing."""
        self.opt_global.step(rows, {"g": self.global_release(rows, grad_global)})

    @torch.no_grad()
    def global_release(self, rows: Tensor, grad_global: Tensor) -> Tensor:
        """sync="round": each client's clipped gradient of G plus its own N(0, (sigma_g C / b)^2): what its DP-SGD on
        G releases per step (the copy it sends at the round's end is post-processing of these)."""
        g, sigma_g = grad_global, self.global_noise
        if sigma_g > 0:
            streams = self.noise_streams(rows)
            z = torch.stack([s.normal(g[0].numel(), g.device) for s in streams]).view_as(g)
            if self.clip_update is None:
                g = g + z * (sigma_g * self.cfg.clip_norm / self.batch_denominator)
            else:
                g = g + z * (sigma_g * self.step_global_clip.to(g)[:, None, None] / self.batch_denominator)
        return g

    def local_round(self, rows: Tensor, global_ctx: Tensor, steps: int, on_step=None) -> list[StepStats]:
        """sync="round": the clients ``rows`` start from the server's G and run ``steps`` DP-SGD steps on their own
        copies of it (and on their local prompts); their copies are then what they send."""
        self.learner.client_global[rows] = global_ctx
        stats = []
        for _ in range(steps):
            grad_global, st = self.local_step(rows)
            self.own_global_step(rows, grad_global)
            stats.append(st)
            if on_step is not None:
                on_step()
        return stats

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def text_features(self, eval_seed: int, text: ClassPrompts | None = None) -> Tensor:
        """(K, n_cls, D) normalised text features of every row's current prompt (for evaluation), on ``text``'s
        class names (default: the federation's own)."""
        text = self.text if text is None else text
        L, K = self.learner, len(self.ids)
        rows = torch.arange(K, device=self.device)
        # lowrank() at evaluation draws from public streams of its own, so evaluating never shifts training noise.
        factors = L.factors(rows, seed=[derive_key("eval", eval_seed, k) for k in self.ids], offset=[0] * K)
        return F.normalize(text.encode(L.prompts(text.prefix, text.suffix, rows, factors)), dim=-1)

    def state_dict(self) -> dict:
        return {
            "learner": self.learner.state_dict(),
            "opt_local": self.opt_local.state_dict(),
            "opt_global": self.opt_global.state_dict(),
            # Each client's secret part: its keys, stream positions and place in its batch order; its ledger.
            "clients": [
                {"randomness": r.state_dict(), "sampler": s.state_dict(), "accountant": a.state_dict()}
                for r, s, a in zip(self.rand, self.samplers, self.accountants, strict=True)
            ],
            "clip_norms": self.clip_norms.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.learner.load_state_dict(state["learner"])
        # The optimisers update the learner's tensors in place: point them at the restored ones.
        self.opt_local.params = self.learner.local
        self.opt_local.load_state_dict(state["opt_local"])
        self.opt_global.params = {"g": self.learner.client_global}
        self.opt_global.load_state_dict(state["opt_global"])
        for r, s, a, part in zip(self.rand, self.samplers, self.accountants, state["clients"], strict=True):
            r.load_state_dict(part["randomness"])
            s.load_state_dict(part["sampler"])
            a.load_state_dict(part["accountant"])
        if "clip_norms" in state:  # a checkpoint from before adaptive clipping holds its fixed C
            self.clip_norms = state["clip_norms"].clone()
