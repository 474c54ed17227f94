"""In-process simulation of a DP-FPL federation: every client of a step goes through the text encoder together.

One training step of the active clients A (|A| = K_a):
    factors (lowrank of L, fresh randomness) -> ctx (K_a, n_ctx, d)
    -> text features T = f_txt([prefix | ctx | suffix]) (K_a, n_cls, D), one encoder call for all clients
    -> per-sample cotangents dL_i/dT from the logit head -> per-sample grad_ctx (K_a, b, n_ctx, d)
       (b vector-Jacobian products, chunked; or one backward of the batch mean with --clip-mode batch)
    -> fused clip + local noise (ops.dp_lowrank_clip_noise) -> local update (g_L rebuilt from g_U, g_V)
    -> global prompt: server mean over clients + N(0, (sigma_g C / (b K_a))^2) (sync="step"), or
       client-side DP-SGD on its copy of G and averaging at the round's end (sync="round").
With --clip-mode output the step is instead: T -> per-example cotangents dl_i/dT clipped to C_o in closed form,
summed, noised once per client (ops.dp_output_clip_noise) -> one backward of T with that release as its cotangent
-> g_G, g_U, g_V (or g_L) without further clipping or noise; the server adds nothing.
Local prompts never leave their client's rows; only G (or its gradient) is aggregated. Each client's noise,
factorisation draws and batches come from its own keys (privacy.randomness), the server's noise and client
sampling from the server's: a client's randomness depends only on its key and how far it has stepped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_fast import ops, reference
from fpl_fast.config import RunConfig
from fpl_fast.federated.optim import ClientSGD
from fpl_fast.privacy.mechanism import (
    LocalDP,
    OutputDP,
    privatize_local,
    privatize_output,
    server_aggregate_global,
    take_each,
)
from fpl_fast.privacy.per_sample import logit_cotangents, per_sample_prompt_grads_from
from fpl_fast.privacy.randomness import PartyRandomness, derive_key
from fpl_fast.prompts import PromptConfig, PromptLearner

__all__ = ["ClientData", "Federation", "StepStats"]


@dataclass
class ClientData:
    """Cached features of one federation: images encoded once, indices per client.

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


@dataclass
class StepStats:
    loss: float
    clipped_fraction: float
    batch_sizes: list[int] = field(default_factory=list)


# Activation floats one per-sample chunk may span (see Federation.chunk_size). CPU: measured, chunk 8 at the
# tiny setting (bench/README.md: 394 -> 217 ms/step against the whole batch, less memory). CUDA: an estimate
# (the paper setting gets ~10 samples per chunk, a few GiB of backward temporaries); sweep it on a GPU
# with bench_round.py --chunk-size.
_CHUNK_FLOATS = {"cpu": 2**20, "cuda": 2**27}


# The factor products of an already private gradient (output mode): no clipping, no noise.
_NO_CLIP = LocalDP(clip_norm=math.inf, noise_multiplier=0.0, clip_mode="batch")


class _BatchSampler:
    """Per-client batches: shuffled fixed-size batches (reshuffled each pass) or Poisson sampling, client k
    drawing from its own generator ``rngs[k]``."""

    def __init__(self, sizes: list[int], batch_size: int, *, poisson: bool, rngs: list[np.random.Generator]) -> None:
        self.sizes = sizes
        self.poisson = poisson
        self.rngs = rngs
        # Every client divides its clipped sum by the same b (one denominator for the fused op). A client
        # with fewer than b examples uses all of them each step: the sensitivity stays C / b, its step is
        # just shorter, and the accountant sees its sampling rate 1 (no amplification for it).
        self.batch_size = batch_size
        self.expected = float(batch_size)
        self.orders = [rng.permutation(n) for rng, n in zip(rngs, sizes, strict=True)]
        self.pos = [0] * len(sizes)

    def sample_rate(self, k: int) -> float:
        b = self.expected if self.poisson else self.batch_size
        return min(1.0, b / self.sizes[k])

    def next(self, k: int) -> np.ndarray:
        n = self.sizes[k]
        if self.poisson:
            return np.flatnonzero(self.rngs[k].random(n) < self.sample_rate(k))
        out: list[np.ndarray] = []
        need = min(self.batch_size, n)  # never the same example twice in one batch
        while need > 0:
            if self.pos[k] >= n:
                self.orders[k] = self.rngs[k].permutation(n)
                self.pos[k] = 0
            take = self.orders[k][self.pos[k] : self.pos[k] + need]
            self.pos[k] += len(take)
            need -= len(take)
            out.append(take)
        return np.concatenate(out)

    def client_state(self, k: int) -> dict:
        """Client k's place in its shuffled order (secret: which examples its batches hold)."""
        return {"order": self.orders[k].copy(), "pos": self.pos[k]}

    def load_client_state(self, k: int, state: dict) -> None:
        self.orders[k] = np.asarray(state["order"])
        self.pos[k] = int(state["pos"])


class Federation:
    """K clients, a server and the prompt state, stepping together.

    Args:
        cfg: the run configuration.
        backbone: a frozen CLIP (``fpl_fast.backbone.FrozenCLIP``).
        classnames: class names in label order.
        data: cached image features and client splits.
        noise_local, noise_global: the noise multipliers in force (already calibrated).
    """

    def __init__(
        self,
        cfg: RunConfig,
        backbone,
        classnames: list[str],
        data: ClientData,
        *,
        noise_local: float,
        noise_global: float,
    ) -> None:
        self.cfg = cfg
        self.backbone = backbone
        self.data = data
        self.noise_local = noise_local
        self.noise_global = noise_global
        self.device = torch.device(cfg.device)
        K = cfg.num_users
        parts = backbone.prompt_parts(classnames, cfg.n_ctx)
        # A causal tower pooling at EOT never looks past the last EOT: drop the padding once, here, so the
        # prompts are assembled (and differentiated) at the truncated length.
        self.seq_len = (
            parts.seq_len if backbone.is_causal else parts.prefix.shape[1] + cfg.n_ctx + parts.suffix.shape[1]
        )
        self.prefix = parts.prefix  # (n_cls, 1, d)
        self.suffix = parts.suffix[:, : self.seq_len - 1 - cfg.n_ctx]  # (n_cls, S', d)
        self.eot_index = parts.eot_index  # (n_cls,)
        self.n_cls = self.prefix.shape[0]
        gen = torch.Generator().manual_seed(cfg.seed)
        self.learner = PromptLearner(
            PromptConfig(cfg.factorization, cfg.n_ctx, cfg.rank, full_grad_scale=cfg.full_grad_scale),
            K,
            backbone.ctx_dim,
            generator=gen,
            device=self.device,
        )
        # Secret by default (OS CSPRNG keys); reproducible only with --noise-seed.
        self.client_rand = [PartyRandomness.create(f"client-{k}", cfg.noise_seed) for k in range(K)]
        self.server_rand = PartyRandomness.create("server", cfg.noise_seed)
        self.sampler = _BatchSampler(
            [len(ix) for ix in data.train_idx],
            cfg.batch_size,
            poisson=cfg.sampling == "poisson",
            rngs=[c.sampling for c in self.client_rand],
        )
        self.opt_local = ClientSGD(self.learner.local, lr=cfg.lr, momentum=cfg.momentum)
        # sync="round": each client runs SGD on its own copy of G; sync="step": the server owns G and
        # its momentum buffer (one buffer, whichever clients were sampled).
        self.opt_global = ClientSGD({"g": self.learner.client_global}, lr=cfg.lr, momentum=cfg.momentum)
        self.server_buf = torch.zeros_like(self.learner.global_ctx)
        self.steps_taken = np.zeros(K, dtype=np.int64)  # noised steps per client (for the accountant)

    # ------------------------------------------------------------------------------------------
    # Geometry
    # ------------------------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        """Local steps per epoch: one pass over the data of the average client (all clients step together,
        so a larger client sees part of its data per epoch and a smaller one cycles; the accountant counts
        each client's real steps and sampling rate)."""
        b = self.sampler.expected if self.cfg.sampling == "poisson" else self.sampler.batch_size
        return max(1, math.ceil(float(np.mean([len(ix) for ix in self.data.train_idx])) / b))

    @property
    def steps_per_round(self) -> int:
        return self.cfg.local_epochs * self.steps_per_epoch

    def sample_clients(self) -> Tensor:
        """Clients taking part in this round (client fraction, at least one)."""
        K = self.cfg.num_users
        m = max(1, round(self.cfg.client_fraction * K))
        chosen = np.sort(self.server_rand.sampling.choice(K, size=m, replace=False)) if m < K else np.arange(K)
        return torch.as_tensor(chosen, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------------------------------
    # Text side
    # ------------------------------------------------------------------------------------------
    def _text_features(self, ctx: Tensor) -> Tensor:
        """(K_a, n_ctx, d) context -> (K_a, n_cls, D) text features, all clients in one encoder call.

        Uses the plain-PyTorch assembly so that torch.func can vmap its pull-back over samples.
        """
        Ka = ctx.shape[0]
        prompts = reference.lowrank_prompt(self.prefix, self.suffix, ctx.to(self.prefix.dtype))
        L, d = prompts.shape[-2:]
        feats = self.backbone.encode_prompts(
            prompts.reshape(Ka * self.n_cls, L, d), self.eot_index.repeat(Ka), seq_len=self.seq_len
        )
        return feats.reshape(Ka, self.n_cls, -1).float()

    def _logits(self, text: Tensor, img: Tensor) -> Tensor:
        """Cosine logits: text (K_a, n_cls, D), img (K_a, B, D) -> (K_a, B, n_cls)."""
        t = F.normalize(text, dim=-1)
        x = F.normalize(img, dim=-1)
        return self.backbone.logit_scale * torch.matmul(x, t.transpose(-1, -2))

    # ------------------------------------------------------------------------------------------
    # One step
    # ------------------------------------------------------------------------------------------
    def _batch(self, clients: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Padded features (K_a, B, D), labels (K_a, B), mask (K_a, B) of this step's batches."""
        batches = []
        for k in clients.tolist():
            batches.append(self.data.train_idx[k][self.sampler.next(k)])
        B = max(1, max(len(x) for x in batches))
        D = self.data.train_feats.shape[1]
        feats = torch.zeros(len(batches), B, D)
        labels = torch.zeros(len(batches), B, dtype=torch.long)
        mask = torch.zeros(len(batches), B)
        for j, ix in enumerate(batches):
            ix_t = torch.as_tensor(ix, dtype=torch.long)
            if len(ix):
                feats[j, : len(ix)] = self.data.train_features(ix)
            labels[j, : len(ix)] = self.data.train_labels[ix_t]
            mask[j, : len(ix)] = 1.0
        return feats.to(self.device), labels.to(self.device), mask.to(self.device)

    def _per_sample_grads(self, ctx: Tensor, feats: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample context gradients (K_a, B, n_ctx, d) and the per-sample losses (K_a, B).

        The prompt-side primal is the context itself, so each vmapped pull-back returns (K_a, n_ctx, d)
        already summed over classes; lane i carries sample i of every client on that client's rows.
        """
        Ka = ctx.shape[0]

        def head(flat: Tensor) -> tuple[Tensor, Tensor]:
            text = flat.reshape(Ka, self.n_cls, -1)
            cot, losses = logit_cotangents(feats, text, labels, self.backbone.logit_scale)  # (B, K_a, n_cls, D)
            cot = cot * mask.transpose(0, 1)[..., None, None]  # padded (Poisson) rows contribute nothing
            return cot.flatten(1, 2), losses

        flat_text = lambda c: self._text_features(c).reshape(Ka * self.n_cls, -1)  # noqa: E731
        grads, losses = per_sample_prompt_grads_from(flat_text, ctx, head, chunk_size=self.chunk_size(Ka))
        return grads.transpose(0, 1), (losses * mask).detach()

    def _text_features_fused(self, ctx: Tensor) -> Tensor:
        """(K_a, n_ctx, d) context (requiring grad) -> (K_a, n_cls, D) text features through the fused prompt op."""
        Ka = ctx.shape[0]
        prompts = ops.lowrank_prompt(self.prefix, self.suffix, ctx.to(self.prefix.dtype))
        L, d = prompts.shape[-2:]
        text = self.backbone.encode_prompts(
            prompts.reshape(Ka * self.n_cls, L, d), self.eot_index.repeat(Ka), seq_len=self.seq_len
        )
        return text.reshape(Ka, self.n_cls, -1).float()

    def _batch_mean_grad(self, ctx: Tensor, feats: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Batch-mean context gradient (K_a, 1, n_ctx, d) (one backward) and per-sample losses."""
        ctx = ctx.detach().requires_grad_(True)
        with torch.enable_grad():
            text = self._text_features_fused(ctx)
            losses = (
                F.cross_entropy(self._logits(text, feats).flatten(0, 1), labels.flatten(), reduction="none").view_as(
                    mask
                )
                * mask
            )
            per_client_mean = losses.sum(1) / mask.sum(1).clamp(min=1)
            (grad,) = torch.autograd.grad(per_client_mean.sum(), ctx)
        return grad.unsqueeze(1), losses.detach()

    def _output_release_grad(self, ctx: Tensor, feats: Tensor, labels: Tensor, mask: Tensor, streams):
        """--clip-mode output: the private release Z (K_a, n_cls, D) of the head's clipped, noised cotangents and the
        context gradient J^T Z (K_a, 1, n_ctx, d) by one backward of the text features. J depends on theta only, so
        the gradient is post-processing of Z."""
        ctx = ctx.detach().requires_grad_(True)
        with torch.enable_grad():
            text = self._text_features_fused(ctx)
        out_cfg = OutputDP(
            clip_norm=self.cfg.output_clip, noise_multiplier=self.noise_local, denominator=self.batch_denominator
        )
        res = privatize_output(feats, text.detach(), labels, mask, self.backbone.logit_scale, out_cfg, streams)
        (grad,) = torch.autograd.grad(text, ctx, grad_outputs=res.release)
        return grad.unsqueeze(1), res

    def train_step(self, clients: Tensor, *, server_average: bool) -> StepStats:
        """One local step of every client in ``clients`` (sync="step": with server averaging of G)."""
        cfg, L = self.cfg, self.learner
        streams = [self.client_rand[k].noise for k in clients.tolist()]
        seed, off = take_each(streams, L.factorize_draws())
        factors = L.factors(clients, seed=seed, offset=off)
        ctx = L.context(clients, factors).detach()
        feats, labels, mask = self._batch(clients)
        output_mode = cfg.clip_mode == "output" and self.dp_active
        per_sample = cfg.clip_mode == "sample" and self.dp_active
        out_res = None
        if output_mode:
            grad_ctx, out_res = self._output_release_grad(ctx, feats, labels, mask, streams)
            losses = out_res.losses
        elif per_sample:
            grad_ctx, losses = self._per_sample_grads(ctx, feats, labels, mask)
        else:
            grad_ctx, losses = self._batch_mean_grad(ctx, feats, labels, mask)

        b = self.batch_denominator
        # Output mode: grad_ctx is already the private (divided) release's vjp: no clipping, no noise, b = 1.
        dp_cfg = _NO_CLIP if output_mode else self.local_dp(per_sample)
        u = factors.u if cfg.factorization in ("fedpgp", "dplora", "dpfpl") else None
        res = privatize_local(
            grad_ctx.float(),
            None if u is None else u.float(),
            None if u is None else factors.v.float(),
            dp_cfg,
            streams,
            batch_size=1.0 if output_mode else b,
            local=cfg.factorization != "promptfl",
        )
        local_grads = L.local_update_direction(factors, res.grad_u if u is not None else res.grad_local, res.grad_v)
        if local_grads:
            self.opt_local.step(clients, local_grads)

        # Global prompt: the clients' clipped mean gradients, noised for global DP (output mode: already private).
        sigma_g = self.noise_global if self.dp_active and not output_mode else 0.0
        if server_average:
            if sigma_g > 0:
                g_server = server_aggregate_global(
                    res.grad_global,
                    clip_norm=cfg.norm_thresh,
                    noise_multiplier=sigma_g,
                    batch_size=b,
                    stream=self.server_rand.noise,
                )
            else:
                g_server = res.grad_global.mean(0)
            self._server_step(g_server)
        else:
            # Client-side DP-SGD on its own copy of G (std sigma_g C / b per step): the guarantee needs no
            # trusted server, and averaging at the round's end is post-processing.
            g = res.grad_global
            if sigma_g > 0:
                z = torch.stack([s.normal(g[0].numel(), g.device) for s in streams]).view_as(g)
                g = g + z * (sigma_g * cfg.norm_thresh / b)
            self.opt_global.step(clients, {"g": g})

        self.steps_taken[clients.cpu().numpy()] += 1
        n = mask.sum().clamp(min=1)
        clipped = out_res.clip_fraction if out_res is not None else res.clip_fraction[..., 2]
        return StepStats(
            loss=float(losses.sum() / n),
            clipped_fraction=float(clipped.mean()),
            batch_sizes=[int(x) for x in mask.sum(1).tolist()],
        )

    @torch.no_grad()
    def _server_step(self, grad: Tensor) -> None:
        """SGD with momentum on the server's G, then broadcast to every client (idle ones too)."""
        cfg, L = self.cfg, self.learner
        self.server_buf = self.server_buf * cfg.momentum + grad if cfg.momentum else grad
        L.global_ctx = L.global_ctx - cfg.lr * self.server_buf
        L.client_global[:] = L.global_ctx

    def chunk_size(self, n_active: int) -> int:
        """Samples per vmapped backward: --chunk-size, else as many as keep one chunk's activations
        (chunk x n_active x n_cls x seq_len x width floats) under the device's budget, at least 1."""
        if self.cfg.chunk_size is not None:
            return self.cfg.chunk_size
        lane = n_active * self.n_cls * self.seq_len * self.prefix.shape[-1]
        return max(1, _CHUNK_FLOATS.get(self.device.type, _CHUNK_FLOATS["cuda"]) // lane)

    @property
    def batch_denominator(self) -> float:
        """b that divides the clipped sums: the fixed batch size, or the expected one under Poisson sampling."""
        return self.sampler.expected if self.cfg.sampling == "poisson" else float(self.sampler.batch_size)

    def local_dp(self, per_sample: bool) -> LocalDP:
        """The local clipping/noise in force (no clipping and no noise when DP is off)."""
        cfg = self.cfg
        if not self.dp_active:
            return _NO_CLIP
        return LocalDP(
            clip_norm=cfg.norm_thresh,
            noise_multiplier=self.noise_local,
            clip_mode="sample" if per_sample else "batch",
            joint_uv=cfg.clip_uv == "joint",
            expected_batch_size=self.batch_denominator,
        )

    @property
    def dp_active(self) -> bool:
        """Clipping is on whenever any noise is (a run without noise trains the plain objective)."""
        return self.noise_local > 0 or self.noise_global > 0

    def train_round(self, clients: Tensor, on_step=None) -> list[StepStats]:
        """One round: E local epochs of the active clients (G synchronised per step or at the end)."""
        L = self.learner
        sync_step = self.cfg.sync == "step"
        if not sync_step:
            L.client_global[clients] = L.global_ctx  # broadcast the server's prompt
        stats = []
        for _ in range(self.steps_per_round):
            stats.append(self.train_step(clients, server_average=sync_step))
            if on_step is not None:
                on_step()
        if not sync_step:
            L.global_ctx = L.client_global[clients].mean(0)  # FedAvg of the (DP-SGD trained) copies
            L.client_global[:] = L.global_ctx
        return stats

    # ------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def client_text_features(self, eval_seed: int) -> Tensor:
        """(K, n_cls, D) normalised text features of every client's current prompt."""
        L = self.learner
        K = self.cfg.num_users
        clients = torch.arange(K, device=self.device)
        # lowrank() at evaluation draws from public streams of its own, so evaluating never shifts training noise.
        factors = L.factors(clients, seed=[derive_key("eval", eval_seed, k) for k in range(K)], offset=[0] * K)
        prompts = L.prompts(self.prefix, self.suffix, clients, factors)
        K, n_cls, Lq, d = prompts.shape
        feats = self.backbone.encode_prompts(
            prompts.reshape(K * n_cls, Lq, d), self.eot_index.repeat(K), seq_len=self.seq_len
        )
        return F.normalize(feats.reshape(K, n_cls, -1).float(), dim=-1)

    @torch.no_grad()
    def evaluate(self, eval_seed: int) -> dict:
        """Per-client local accuracy (own test split) and neighbour accuracy (the others' test splits)."""
        text = self.client_text_features(eval_seed)  # (K, n_cls, D)
        x = F.normalize(self.data.test_feats.to(self.device), dim=-1)
        preds = torch.einsum("nd,kcd->knc", x, text).argmax(-1).cpu()  # (K, N_test)
        correct = preds == self.data.test_labels.cpu()[None]
        K = self.cfg.num_users
        local, neighbor = [], []
        for k in range(K):
            own = torch.as_tensor(self.data.test_idx[k], dtype=torch.long)
            others = [torch.as_tensor(self.data.test_idx[j], dtype=torch.long) for j in range(K) if j != k]
            oth = torch.cat(others) if others else own.new_zeros(0)
            local.append(float(correct[k, own].float().mean()) if len(own) else float("nan"))
            neighbor.append(float(correct[k, oth].float().mean()) if len(oth) else float("nan"))
        return {
            "local_acc": float(np.nanmean(local)),
            "neighbor_acc": float(np.nanmean(neighbor)),
            "local_acc_per_client": local,
            "neighbor_acc_per_client": neighbor,
        }

    # ------------------------------------------------------------------------------------------
    # Checkpointing
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "learner": self.learner.state_dict(),
            "opt_local": self.opt_local.state_dict(),
            "opt_global": self.opt_global.state_dict(),
            "server_buf": self.server_buf.clone(),
            "torch_rng": torch.get_rng_state(),  # augmentation draws from torch's global generator
            "steps_taken": self.steps_taken.copy(),
            # Each party's secret part: its keys, stream positions and place in its batch order.
            "clients": [
                {"randomness": c.state_dict(), "sampler": self.sampler.client_state(k)}
                for k, c in enumerate(self.client_rand)
            ],
            "server": {"randomness": self.server_rand.state_dict()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.learner.load_state_dict(state["learner"])
        # The optimisers update the learner's tensors in place: point them at the restored ones.
        self.opt_local.params = self.learner.local
        self.opt_local.load_state_dict(state["opt_local"])
        self.opt_global.params = {"g": self.learner.client_global}
        self.opt_global.load_state_dict(state["opt_global"])
        self.server_buf = state["server_buf"].clone()
        torch.set_rng_state(state["torch_rng"])
        for k, (c, part) in enumerate(zip(self.client_rand, state["clients"], strict=True)):
            c.load_state_dict(part["randomness"])
            self.sampler.load_client_state(k, part["sampler"])
        self.server_rand.load_state_dict(state["server"]["randomness"])
        self.steps_taken = np.asarray(state["steps_taken"]).copy()
