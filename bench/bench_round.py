"""Time one federated DP-FPL round, step by step, for the DP-FPL authors' execution strategy and for fpl_fast.

Implementations, timed side by side in one run (each in a child process of its own, so that the peak memory of
one is not mixed with another's):

``baseline``
    The DP-FPL authors' execution strategy, re-created here: the clients are processed one after another on ONE
    prompt learner whose state (global copy G, local prompt L, momentum buffer) is swapped in and out per client
    per step; the image encoder runs on every batch (no feature cache); the text encoder runs on full
    ``context_length`` (77-token) sequences through open_clip's own transformer modules (no truncation); fp32;
    batch-mean clipping (the batch-mean gradients of U, V and G are each clipped to C and get
    N(0, (sigma C)^2) / b noise, client-side); power iteration + Gram-Schmidt and the
    g_L rebuild in eager PyTorch on one client at a time; the global gradient averaged over clients every step
    (sync="step"). Evaluation swaps each client's prompt in and re-encodes the test images it is scored on (its own
    split and every neighbour's), as the authors' per-client test loaders do.
``fpl_fast_batch`` / ``fpl_fast_persample``
    :class:`fpl_fast.federated.engine.Federation` (cached image features, all clients batched through one
    text-encoder call, fused ops) with ``clip_mode="batch"`` (the same privacy work as the baseline) and
    ``clip_mode="sample"`` (per-sample clipping, the default). The class prompts take the text path of
    ``--text-path``: ``shared`` (the default: the prompt prefix [SOS, ctx] once per client, each class only on its
    own name tokens) or ``full`` (every class prompt, truncated after EOT); ``both`` runs every fpl_fast
    implementation on each path (the full path's records are named ``<impl>@full``). The per-sample worker also
    times the b-backward floor: one vector-Jacobian product of the text encoder on the path in force, times b; and
    ``Federation.evaluate`` (cached test features).
``fpl_fast_output``
    The same with ``clip_mode="output"``: each example's cotangent w.r.t. the class text features is clipped in
    closed form, noised once per client (``ops.dp_output_clip_noise``), and one backward gives every prompt
    gradient: exact per-example DP at the cost of one backward, like batch mode.

Settings (``--setting``):

``paper``: ViT-B-16 architecture with random weights (open_clip ``ViT-B-16``, ``pretrained=None``), 10 clients,
batch 32, 100 made-up classes, n_ctx 16, rank 8, random 224x224 images (``--train-per-client`` /
``--test-per-client`` of them per client). Meant for CUDA; on a CPU use ``--model tiny-digits-clip`` (random
weights, 32x32 images) as a stand-in to smoke-test the code path.
``tiny``: the embedded tiny CLIP (``tiny-digits-clip``, ``pretrained="embedded"``) on scikit-learn's digits,
10 clients with an iid split of the 600 federated training images, batch 32, 10 classes, n_ctx 16, rank 8.

Every record holds the token rows per client through each layer of the text tower (``rows_per_client``; the
baseline's is n_cls x context_length). The fpl_fast workers of one run encode the images once (the first writes the
features to a temporary file, the others read it): the feature cache is a one-off cost, timed once.

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the child process's ``resource.getrusage`` max RSS on
the CPU (this includes the Python interpreter, torch and the model weights, not only the implementation's work).

Usage, from the repository root::

    python bench/bench_round.py --setting tiny --device cpu --json runs/bench_round_tiny.json
    python bench/bench_round.py --setting paper --device cuda --json bench_round_paper.json
    python bench/bench_round.py --setting paper --device cpu --steps 1 --warmup 0 --skip-eval --skip-floor

Benchmarks never assert anything about timings.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import math
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from provenance import provenance  # noqa: E402

    from fpl_fast import ops  # noqa: E402
    from fpl_fast.backbone.loading import load_backbone  # noqa: E402
    from fpl_fast.backbone.model import FrozenCLIP  # noqa: E402
    from fpl_fast.backbone.text_tower import text_tower  # noqa: E402
    from fpl_fast.config import RunConfig  # noqa: E402
    from fpl_fast.federated.engine import ClientData, Federation  # noqa: E402
    from fpl_fast.ops import reference  # noqa: E402

__all__ = [
    "IMPLS",
    "SETTINGS",
    "AuthorsBaseline",
    "BenchData",
    "Setting",
    "build_data",
    "made_up_classnames",
    "main",
]

IMPLS = ("baseline", "fpl_fast_batch", "fpl_fast_persample", "fpl_fast_output")
CLIP_MODES = {"fpl_fast_batch": "batch", "fpl_fast_persample": "sample", "fpl_fast_output": "output"}
TEXT_PATHS = ("shared", "full", "both")

_ADJECTIVES = ("red", "small", "striped", "wild", "golden", "spotted", "northern", "tiny", "giant", "silver")
_NOUNS = ("fox", "kettle", "tulip", "lighthouse", "beetle", "violin", "canoe", "owl", "cactus", "bridge")


def made_up_classnames(n: int) -> list[str]:
    """n distinct two- or three-word class names ("red fox", ..., "red fox 2" beyond 100).

    Args:
        n: number of names, >= 1.

    Returns:
        The names.
    """
    if n < 1:
        raise ValueError(f"number of class names must be >= 1, got {n}")
    base = [f"{a} {b}" for a in _ADJECTIVES for b in _NOUNS]
    return [base[i % len(base)] + ("" if i < len(base) else f" {i // len(base)}") for i in range(n)]


@dataclass(frozen=True)
class Setting:
    """Problem sizes and model of one benchmark setting."""

    name: str
    model: str
    pretrained: str | None
    num_users: int
    batch_size: int
    n_cls: int
    n_ctx: int = 16
    rank: int = 8
    train_per_client: int = 64  # random-image settings only
    test_per_client: int = 32  # random-image settings only
    dataset: str = "random"  # "random" images or "digits"


SETTINGS: dict[str, Setting] = {
    "paper": Setting("paper", "ViT-B-16", None, num_users=10, batch_size=32, n_cls=100),
    "tiny": Setting("tiny", "tiny-digits-clip", "embedded", num_users=10, batch_size=32, n_cls=10, dataset="digits"),
}

# Privacy and optimiser settings shared by every implementation (the authors' C = 10, SGD lr 0.001).
CLIP_NORM = 10.0
NOISE = 1.0
LR = 0.001
MOMENTUM = 0.9
FULL_GRAD_SCALE = 0.1


# ----------------------------------------------------------------------------------------------------------------
# Data: preprocessed images (the baseline encodes them every time) and the client splits
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class BenchData:
    """Preprocessed images, labels, class names and per-client indices of one setting."""

    classnames: list[str]
    train_images: Tensor  # (N_train, 3, H, W), normalised
    train_labels: Tensor
    test_images: Tensor  # (N_test, 3, H, W)
    test_labels: Tensor
    train_idx: list[np.ndarray]
    test_idx: list[np.ndarray]


def build_data(s: Setting, backbone: FrozenCLIP, *, seed: int = 0) -> BenchData:
    """Images and iid client splits for a setting (digits, or random images of the model's input size)."""
    rng = np.random.default_rng(seed)
    K = s.num_users
    if s.dataset == "digits":
        from fpl_fast.data import DIGIT_CLASSNAMES, DigitsDataset

        tf = backbone.eval_transform()
        parts = []
        for split in ("train", "test"):
            ds = DigitsDataset(split, image_size=backbone.image_size[0])
            imgs = torch.stack([tf(ds[i][0]) for i in range(len(ds))])
            parts.append((imgs, torch.as_tensor(np.asarray(ds.labels), dtype=torch.long)))
        (train_x, train_y), (test_x, test_y) = parts
        classnames = list(DIGIT_CLASSNAMES)[: s.n_cls]
    else:
        gen = torch.Generator().manual_seed(seed)
        h, w = backbone.image_size
        n_tr, n_te = K * s.train_per_client, K * s.test_per_client
        train_x = torch.randn(n_tr, 3, h, w, generator=gen)
        test_x = torch.randn(n_te, 3, h, w, generator=gen)
        train_y = torch.randint(0, s.n_cls, (n_tr,), generator=gen)
        test_y = torch.randint(0, s.n_cls, (n_te,), generator=gen)
        classnames = made_up_classnames(s.n_cls)
    train_idx = [np.sort(ix) for ix in np.array_split(rng.permutation(len(train_x)), K)]
    test_idx = [np.sort(ix) for ix in np.array_split(rng.permutation(len(test_x)), K)]
    return BenchData(classnames, train_x, train_y, test_x, test_y, train_idx, test_idx)


# ----------------------------------------------------------------------------------------------------------------
# The baseline: the DP-FPL authors' execution strategy
# ----------------------------------------------------------------------------------------------------------------
class _AuthorsPromptLearner(nn.Module):
    """The single prompt learner of the authors' model: a global copy G and a local prompt L (dpfpl)."""

    def __init__(self, n_ctx: int, d: int, gen: torch.Generator, device: torch.device) -> None:
        super().__init__()
        self.global_ctx = nn.Parameter((torch.randn(n_ctx, d, generator=gen) * 0.02).to(device))
        self.local_ctx = nn.Parameter((torch.randn(n_ctx, d, generator=gen) * 0.02).to(device))


def _gram_schmidt_cols(m: Tensor) -> Tensor:
    """Column-wise Gram-Schmidt of one (n, r) matrix, in a Python loop over columns (eager)."""
    cols: list[Tensor] = []
    for j in range(m.shape[1]):
        c = m[:, j]
        for q in cols:
            c = c - (q @ c) * q
        cols.append(c / (c.norm() + reference.GS_EPS))
    return torch.stack(cols, dim=1)


def _power_iteration(l_mat: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """One randomised power iteration of one client's L (n_ctx, d): U (n_ctx, r), V (r, d).

    V0 comes from torch's global generator on the device, as in the authors' code (seeded by the worker).
    """
    v0 = torch.randn(l_mat.shape[1], rank, device=l_mat.device)
    u = _gram_schmidt_cols(l_mat @ v0)
    w = _gram_schmidt_cols(l_mat.T @ u)
    return u, w.T.contiguous()


class AuthorsBaseline:
    """Sequential clients on one swapped prompt learner, no feature cache, 77-token prompts, eager math.

    Args:
        backbone: the frozen CLIP (its open_clip model is the one model all clients share).
        data: images and client splits.
        s: the setting.
        device: where everything runs.
    """

    def __init__(self, backbone: FrozenCLIP, data: BenchData, s: Setting, device: torch.device) -> None:
        self.backbone = backbone
        self.model = backbone.model
        self.data = data
        self.s = s
        self.device = device
        self.tower = text_tower(self.model)
        parts = backbone.prompt_parts(data.classnames, s.n_ctx)
        self.prefix = parts.prefix  # (n_cls, 1, d)
        self.suffix = parts.suffix  # (n_cls, 77 - 1 - n_ctx, d): EOT and all the padding
        self.eot_index = parts.eot_index
        self.logit_scale = self.model.logit_scale.exp().detach()
        gen = torch.Generator().manual_seed(1)
        self.learner = _AuthorsPromptLearner(s.n_ctx, backbone.ctx_dim, gen, device)
        self.optim = torch.optim.SGD([self.learner.local_ctx], lr=LR, momentum=MOMENTUM)
        # Per-client saved state, as the authors keep a state_dict per client and load it before its turn.
        self.client_states = [copy.deepcopy(self.learner.state_dict()) for _ in range(s.num_users)]
        self.client_optim = [copy.deepcopy(self.optim.state_dict()) for _ in range(s.num_users)]
        self.server_g = self.learner.global_ctx.detach().clone()
        self.server_buf = torch.zeros_like(self.server_g)
        self.rng = np.random.default_rng(3)
        self.orders = [self.rng.permutation(len(ix)) for ix in data.train_idx]
        self.pos = [0] * s.num_users

    def _next_batch(self, k: int) -> np.ndarray:
        ix = self.data.train_idx[k]
        b = min(self.s.batch_size, len(ix))
        if self.pos[k] + b > len(ix):
            self.orders[k] = self.rng.permutation(len(ix))
            self.pos[k] = 0
        take = self.orders[k][self.pos[k] : self.pos[k] + b]
        self.pos[k] += b
        return ix[take]

    def _text_features(self, ctx: Tensor) -> Tensor:
        """CoOp's TextEncoder on full-length prompts: (n_ctx, d) context -> (n_cls, D)."""
        t = self.tower
        n_cls = self.prefix.shape[0]
        prompts = torch.cat([self.prefix, ctx.unsqueeze(0).expand(n_cls, -1, -1), self.suffix], dim=1)  # (n_cls, 77, d)
        x = prompts + t.positional_embedding
        x = t.transformer(x, attn_mask=t.attn_mask)
        x = t.ln_final(x)
        x = x[torch.arange(n_cls, device=x.device), self.eot_index]  # (n_cls, d)
        proj = t.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def _swap_in(self, k: int) -> None:
        self.learner.load_state_dict(self.client_states[k])
        self.optim.load_state_dict(self.client_optim[k])

    def _swap_out(self, k: int) -> None:
        self.client_states[k] = copy.deepcopy(self.learner.state_dict())
        self.client_optim[k] = copy.deepcopy(self.optim.state_dict())

    def _clip_noise(self, g: Tensor, b: int) -> Tensor:
        """Batch-mean clipping to C and N(0, (sigma C)^2) / b noise (the authors' client-side mechanism)."""
        g = g * torch.clamp(CLIP_NORM / (g.norm() + 1e-6), max=1.0)
        noise = torch.randn(g.shape, device=g.device) * (NOISE * CLIP_NORM)
        return g + noise / b

    def train_step(self) -> float:
        """One local step of every client, one after another, then the server's averaging of G."""
        global_grads = []
        total = 0.0
        for k in range(self.s.num_users):
            self._swap_in(k)
            idx = torch.as_tensor(self._next_batch(k), dtype=torch.long)
            images = self.data.train_images[idx].to(self.device)
            labels = self.data.train_labels[idx].to(self.device)
            with torch.no_grad():
                img = self.model.encode_image(images)  # no cache: the image encoder runs on every batch
                u, v = _power_iteration(self.learner.local_ctx.detach(), self.s.rank)
                res = self.learner.local_ctx.detach() - u @ v
            u.requires_grad_(True)
            v.requires_grad_(True)
            ctx = self.learner.global_ctx + u @ v + res
            text = self._text_features(ctx)
            logits = self.logit_scale * F.normalize(img, dim=-1) @ F.normalize(text, dim=-1).T
            loss = F.cross_entropy(logits, labels)
            g_g, g_u, g_v = torch.autograd.grad(loss, [self.learner.global_ctx, u, v])
            b = len(idx)
            with torch.no_grad():
                g_u, g_v, g_g = (self._clip_noise(g, b) for g in (g_u, g_v, g_g))
                g_l = FULL_GRAD_SCALE * (g_u @ v + u @ g_v + u @ (u.T @ g_u) @ v)
            self.learner.local_ctx.grad = g_l.detach()
            self.optim.step()
            self.optim.zero_grad(set_to_none=True)
            global_grads.append(g_g)
            total += float(loss)
            self._swap_out(k)
        with torch.no_grad():
            g_mean = torch.stack(global_grads).mean(0)
            self.server_buf = self.server_buf * MOMENTUM + g_mean
            self.server_g = self.server_g - LR * self.server_buf
            for st in self.client_states:  # broadcast the new G to every client's saved state
                st["global_ctx"] = self.server_g.clone()
        return total / self.s.num_users

    @torch.no_grad()
    def evaluate(self, test_batch: int = 100) -> dict[str, float]:
        """Local and neighbour accuracy of every client; the test images are encoded again for each client."""
        local, neighbor = [], []
        K = self.s.num_users
        for k in range(K):
            self._swap_in(k)
            u, v = _power_iteration(self.learner.local_ctx, self.s.rank)
            ctx = self.learner.global_ctx + u @ v + (self.learner.local_ctx - u @ v)
            text = F.normalize(self._text_features(ctx), dim=-1)
            accs = []
            for j in range(K):
                idx = self.data.test_idx[j]
                correct = 0
                for start in range(0, len(idx), test_batch):
                    sel = torch.as_tensor(idx[start : start + test_batch], dtype=torch.long)
                    img = F.normalize(self.model.encode_image(self.data.test_images[sel].to(self.device)), dim=-1)
                    pred = (img @ text.T).argmax(-1).cpu()
                    correct += int((pred == self.data.test_labels[sel]).sum())
                accs.append(correct / max(1, len(idx)))
            local.append(accs[k])
            neighbor.append(float(np.mean([a for j, a in enumerate(accs) if j != k])) if K > 1 else float("nan"))
        return {"local_acc": float(np.mean(local)), "neighbor_acc": float(np.nanmean(neighbor))}


# ----------------------------------------------------------------------------------------------------------------
# fpl_fast
# ----------------------------------------------------------------------------------------------------------------
def _encode_all(backbone: FrozenCLIP, images: Tensor, batch: int = 256) -> Tensor:
    out = [backbone.encode_images(images[i : i + batch]).float().cpu() for i in range(0, len(images), batch)]
    return torch.cat(out) if out else torch.empty(0, backbone.embed_dim)


def _federation(
    backbone: FrozenCLIP,
    data: BenchData,
    s: Setting,
    device: torch.device,
    clip_mode: str,
    feats: tuple[Tensor, Tensor],
    chunk_size: int | None = None,
    text_path: str = "shared",
) -> Federation:
    cfg = RunConfig(
        factorization="dpfpl",
        rank=s.rank,
        n_ctx=s.n_ctx,
        full_grad_scale=FULL_GRAD_SCALE,
        noise=NOISE,
        norm_thresh=CLIP_NORM,
        clip_mode=clip_mode,
        output_clip=CLIP_NORM / 10,  # timing does not depend on C_o
        num_users=s.num_users,
        batch_size=s.batch_size,
        lr=LR,
        momentum=MOMENTUM,
        sync="step",
        model=s.model,
        pretrained=s.pretrained,
        device=str(device),
        chunk_size=chunk_size,
        text_path=text_path,
    )
    cdata = ClientData(
        train_feats=feats[0],
        train_labels=data.train_labels,
        test_feats=feats[1],
        test_labels=data.test_labels,
        train_idx=data.train_idx,
        test_idx=data.test_idx,
    )
    return Federation(cfg, backbone, data.classnames, cdata, noise_local=NOISE, noise_global=NOISE)


def _floor_backward_s(fed: Federation, device: torch.device, reps: int) -> float:
    """Median seconds of one text-encoder vjp through the K clients' class prompts on the path in force."""
    K = fed.cfg.num_users
    clients = torch.arange(K, device=device)
    factors = fed.learner.factors(clients, seed=[123 + k for k in range(K)], offset=[0] * K)
    ctx = fed.learner.context(clients, factors).detach()
    feats, vjp_fn = torch.func.vjp(lambda c: fed.text.features(c, traceable=True), ctx)
    cot = torch.randn_like(feats)
    return _median_time(lambda: vjp_fn(cot), device, warmup=1, reps=reps)


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], Any], device: torch.device, *, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_mem(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale, "getrusage max RSS (whole process)"


def _profile_text(fn: Callable[[], Any], top: int = 25) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def _cached_features(backbone: FrozenCLIP, data: BenchData, path: Path | None) -> tuple[Tensor, Tensor]:
    """The train and test image features: read from ``path`` if an earlier worker of this run wrote it, else
    encoded (and written there)."""
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        return saved["train"], saved["test"]
    feats = (_encode_all(backbone, data.train_images), _encode_all(backbone, data.test_images))
    if path is not None:
        torch.save({"train": feats[0], "test": feats[1]}, path)
    return feats


def run_worker(impl: str, s: Setting, args: argparse.Namespace) -> dict[str, Any]:
    """Build one implementation in this process, time its steps and its evaluation, return the record."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    # The baseline is fp32, as the authors ran it; fpl_fast runs its encoders at --precision.
    precision = "fp32" if impl == "baseline" else resolve_precision(args.precision, args.device)
    backbone = load_backbone(s.model, s.pretrained, precision=precision, device=device)
    data = build_data(s, backbone)
    rec: dict[str, Any] = {"impl": impl, "setup_s": None, "text_path": None}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if impl == "baseline":
        base = AuthorsBaseline(backbone, data, s, device)
        rec["setup_s"] = time.perf_counter() - t0
        rec["s_per_step"] = _median_time(base.train_step, device, warmup=args.warmup, reps=args.steps)
        if not args.skip_eval:
            rec["eval_s"] = _median_time(base.evaluate, device, warmup=0, reps=args.eval_reps)
        rec["steps_per_round"] = max(1, math.ceil(float(np.mean([len(ix) for ix in data.train_idx])) / s.batch_size))
        rec["rows_per_client"] = len(data.classnames) * backbone.context_length
    else:
        t_cache = time.perf_counter()
        cached = args.worker_features is not None and args.worker_features.is_file()
        feats = _cached_features(backbone, data, args.worker_features)
        _sync(device)
        rec["feature_cache_s"] = None if cached else time.perf_counter() - t_cache
        mode = CLIP_MODES[impl]
        fed = _federation(backbone, data, s, device, mode, feats, args.chunk_size, args.worker_text_path)
        rec.update(text_path=fed.text.path, rows_per_client=fed.text.rows_per_client)
        clients = torch.arange(s.num_users, device=device)
        rec["setup_s"] = time.perf_counter() - t0
        step = lambda: fed.train_step(clients, server_average=True)  # noqa: E731
        rec["s_per_step"] = _median_time(step, device, warmup=args.warmup, reps=args.steps)
        rec["steps_per_round"] = fed.steps_per_round
        rec["seq_len"] = fed.text.seq_len
        if mode == "sample" and not args.skip_floor:
            rec["floor_one_backward_s"] = _floor_backward_s(fed, device, reps=max(3, args.steps))
            rec["floor_s_per_step"] = rec["floor_one_backward_s"] * s.batch_size
        if mode == "sample" and not args.skip_eval:
            rec["eval_s"] = _median_time(lambda: fed.evaluate(7), device, warmup=1, reps=max(3, args.eval_reps))
            if args.profile:
                rec["profile"] = _profile_text(step)
    rec["peak_mem_bytes"], rec["peak_mem_kind"] = _peak_mem(device)
    return rec


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(choice: str, device: str) -> str:
    """fpl_fast's encoder precision: auto is bf16 on CUDA (no accuracy cost measured, README), fp32 on the
    CPU (bf16 was no faster there)."""
    if choice != "auto":
        return choice
    return "bf16" if device == "cuda" else "fp32"


def _run_child(impl: str, path: str, argv: list[str], features: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rec.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", impl, "--worker-out", str(out)]
        cmd += ["--worker-text-path", path, "--worker-features", str(features)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {"impl": impl, "error": " | ".join(tail)}
        return json.loads(out.read_text())


def _runs(impls: list[str], text_path: str) -> list[tuple[str, str, str]]:
    """(record name, implementation, text path) of every child to run: the baseline once, each fpl_fast
    implementation on the chosen path, or on both (the full path's named ``<impl>@full``)."""
    paths = ("shared", "full") if text_path == "both" else (text_path,)
    out = []
    for impl in impls:
        if impl == "baseline":
            out.append((impl, impl, "full"))
            continue
        out += [(impl if p == paths[0] else f"{impl}@{p}", impl, p) for p in paths]
    return out


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:10.1f}"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=list(SETTINGS), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", default=None, help="override the setting's open_clip model (e.g. a CPU stand-in)")
    parser.add_argument("--pretrained", default="__setting__", help="override the setting's pretrained (None: random)")
    parser.add_argument("--num-users", type=int, default=None, help="override the number of clients")
    parser.add_argument("--batch-size", type=int, default=None, help="override the batch size b")
    parser.add_argument("--n-cls", type=int, default=None, help="override the number of classes (random settings)")
    parser.add_argument("--train-per-client", type=int, default=None, help="random images per client (train)")
    parser.add_argument("--test-per-client", type=int, default=None, help="random images per client (test)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per implementation (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--eval-reps", type=int, default=1, help="timed evaluations per implementation")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="fpl_fast per-sample chunk (samples per vmap; default: sized to activations)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="fpl_fast's frozen-encoder precision (auto: bf16 on CUDA, fp32 on the CPU; the baseline is always fp32)",
    )
    parser.add_argument(
        "--text-path",
        choices=TEXT_PATHS,
        default="shared",
        help="fpl_fast's text path: shared (prompt prefix once per client; default), full (every class prompt "
        "whole), both (each fpl_fast implementation on both; the full path's records are named <impl>@full)",
    )
    parser.add_argument("--skip-eval", action="store_true", help="do not time the evaluations (paper setting on a CPU)")
    parser.add_argument("--skip-floor", action="store_true", help="do not time the per-sample b-backward floor")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one fpl_fast per-sample step")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    parser.add_argument("--worker", choices=IMPLS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-text-path", choices=("shared", "full"), default="shared", help=argparse.SUPPRESS)
    parser.add_argument("--worker-features", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("steps", "warmup", "eval_reps", "num_users", "batch_size", "n_cls", "chunk_size"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}, got {value}")
    impls = [x.strip() for x in args.impls.split(",") if x.strip()]
    if not impls or any(x not in IMPLS for x in impls):
        parser.error(f"--impls must be a comma-separated subset of {','.join(IMPLS)}, got {args.impls!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")

    s = SETTINGS[args.setting]
    changes: dict[str, Any] = {}
    if args.model is not None:
        changes["model"] = args.model
        changes["pretrained"] = None
    if args.pretrained != "__setting__":
        changes["pretrained"] = None if args.pretrained in ("None", "none", "") else args.pretrained
    for name in ("num_users", "batch_size", "n_cls", "train_per_client", "test_per_client"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if s.dataset == "digits" and changes.get("n_cls", 10) != 10:
        parser.error(f"--n-cls: the digits setting has 10 classes, got {changes['n_cls']}")
    s = replace(s, **changes)

    if args.worker is not None:
        rec = run_worker(args.worker, s, args)
        args.worker_out.write_text(json.dumps(rec))
        return 0

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
        f"fpl_fast._C loaded: {ops.has_cpp_ops()}, CUDA kernels: {ops.has_cuda_kernels()}"
    )
    precision = resolve_precision(args.precision, args.device)
    print(f"setting {s.name}: {asdict(s)}; fpl_fast precision {precision} (baseline fp32)")
    recs: dict[str, dict[str, Any]] = {}
    runs = _runs(impls, args.text_path)
    with tempfile.TemporaryDirectory() as tmp:
        features = Path(tmp) / "features.pt"  # written by the first fpl_fast child, read by the others
        for name, impl, path in runs:
            t0 = time.perf_counter()
            recs[name] = _run_child(impl, path, argv, features)
            err = recs[name].get("error")
            took = time.perf_counter() - t0
            print(f"done {name:24s} in {took:6.1f} s" + (f"  ERROR: {err}" if err else ""), flush=True)
    names = [name for name, _, _ in runs]

    def get(impl: str, key: str) -> Any:
        return recs.get(impl, {}).get(key)

    base = get("baseline", "s_per_step")
    fb, fs = get("fpl_fast_batch", "s_per_step"), get("fpl_fast_persample", "s_per_step")
    fo = get("fpl_fast_output", "s_per_step")
    result = {
        "device": args.device,
        "setting": s.name,
        "setting_detail": asdict(s),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "chunk_size": args.chunk_size,
        "fpl_fast_precision": precision,
        "cpp_ops": ops.has_cpp_ops(),
        "baseline_s_per_step": base,
        "fpl_fast_batch_s_per_step": fb,
        "fpl_fast_persample_s_per_step": fs,
        "fpl_fast_persample_floor_s_per_step": get("fpl_fast_persample", "floor_s_per_step"),
        "speedup_batch": base / fb if base and fb else None,
        "fpl_fast_output_s_per_step": fo,
        "speedup_persample": base / fs if base and fs else None,
        "speedup_output": base / fo if base and fo else None,
        "output_vs_batch": fo / fb if fo and fb else None,
        "persample_vs_output": fs / fo if fs and fo else None,
        "eval_baseline_s": get("baseline", "eval_s"),
        "eval_fpl_fast_s": get("fpl_fast_persample", "eval_s"),
        "steps_per_round": get("fpl_fast_persample", "steps_per_round") or get("baseline", "steps_per_round"),
        "text_path": args.text_path,
        "rows_per_client": {k: r.get("rows_per_client") for k, r in recs.items()},
        "speedups": {k: base / r["s_per_step"] for k, r in recs.items() if base and r.get("s_per_step")},
        "peak_mem_bytes": {k: r.get("peak_mem_bytes") for k, r in recs.items()},
        "peak_mem_kind": next((r["peak_mem_kind"] for r in recs.values() if "peak_mem_kind" in r), None),
        "records": {k: {kk: vv for kk, vv in r.items() if kk != "profile"} for k, r in recs.items()},
    }
    spr = result["steps_per_round"] or 1
    print(
        f"\n{'implementation':27s} {'ms/step':>10s} {'ms/round':>10s} {'eval ms':>10s} {'peak MiB':>9s} "
        f"{'speed-up':>8s} {'rows/client':>11s}"
    )
    for name in names:
        r = recs[name]
        step = r.get("s_per_step")
        rnd = None if step is None else step * spr
        mem = r.get("peak_mem_bytes")
        speed = f"{base / step:8.2f}" if base and step else "       -"
        mem_s = f"{mem / 2**20:9.0f}" if mem else "        -"
        rows = r.get("rows_per_client")
        print(
            f"{name:27s} {_fmt_s(step):>10s} {_fmt_s(rnd):>10s} {_fmt_s(r.get('eval_s')):>10s} {mem_s} {speed} "
            f"{rows if rows is not None else '-':>11}"
        )
    for name in names:
        floor, one = get(name, "floor_s_per_step"), get(name, "floor_one_backward_s")
        if floor is not None:
            label = f"floor of {name}"
            print(f"{label:27s} {_fmt_s(floor):>10s}   (b = {s.batch_size} x {one * 1e3:.2f} ms per backward)")
    print("rows/client: token rows per client through each layer of the text tower")
    if fo and (fb or fs):
        ratios = [f"output/batch {fo / fb:.2f}x" if fb else "", f"per-sample/output {fs / fo:.2f}x" if fs else ""]
        print("step time ratios: " + ", ".join(r for r in ratios if r))
    print(
        f"ms/round = ms/step x {spr} steps per round (one epoch of the average client); peak memory: "
        f"{result['peak_mem_kind']}"
    )
    prof = get("fpl_fast_persample", "profile")
    if prof:
        print("\ncProfile of one fpl_fast per-sample step (cumulative):\n" + prof)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**provenance(__file__, argv), **result}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
