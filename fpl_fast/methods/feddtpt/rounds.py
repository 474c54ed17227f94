"""The federated run of FedDTPT (F7) on the method skeleton: setup, rounds, final report, and :func:`run`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fpl_fast.data import dataset_labels, load_dataset
from fpl_fast.data.clients import client_split
from fpl_fast.methods.feddtpt.aggregation import aggregate
from fpl_fast.methods.feddtpt.client_search import Batch, client_update
from fpl_fast.methods.feddtpt.config import ZERO_SHOT_PROMPT, Config
from fpl_fast.methods.feddtpt.evaluation import evaluate, transfer_accuracy
from fpl_fast.methods.feddtpt.oracle import Oracle, allowed_vocabulary, token_table
from fpl_fast.methods.feddtpt.proposers import EmbeddingNeighbor, Proposer, RandomProposer
from fpl_fast.methods.skeleton import run_method

__all__ = ["FedDTPT", "run"]


def public_set(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """g indices per class (balanced D_g), drawn from ``labels``' positions."""
    picks = [rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)


@dataclass
class _State:
    """What FedDTPT's rounds share: the oracle, the clients' data, the search tools and the running totals."""

    cfg: Config
    backbone: Any
    data: Any
    oracle: Oracle
    train_labels: np.ndarray
    test_labels: np.ndarray
    train_idx: list[np.ndarray]
    test_idx: list[np.ndarray]
    weights: np.ndarray
    public: np.ndarray
    public_batch: Batch
    z: Tensor
    allowed: Tensor
    n_max: int
    bits_per_token: int
    rng: np.random.Generator
    proposer: Proposer
    seed_ids: list[int]
    zero_shot: dict[str, float]
    seed_eval: dict[str, float]
    eval_queries: int
    global_prompt: list[int]
    train_queries: int = 0
    upload_bits: int = 0
    download_bits: int = 0
    last: dict[str, Any] = field(default_factory=dict)


class FedDTPT:
    """FedDTPT on the method skeleton (:mod:`fpl_fast.methods.skeleton`)."""

    name = "feddtpt"
    postfix: tuple[str, ...] = ("test_acc", "prompt_len", "queries")
    curves: tuple[str, ...] = ("local_acc",)  # one global prompt: no personalised model for a neighbour curve

    def setup(self, cfg: Config) -> _State:
        """Oracle, public set D_g, client split, proposer and the zero-shot / seed-prompt baselines."""
        from fpl_fast.backbone.loading import load_backbone

        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        backbone = load_backbone(cfg.model, cfg.pretrained, precision=cfg.precision, device=cfg.device)
        tok = backbone.tokenizer
        data = load_dataset(cfg.dataset, cfg.data_root)
        train_labels, test_labels = dataset_labels(data.train), dataset_labels(data.test)

        # D_g: g images per class held out of the training part before it is split over the clients.
        public = public_set(train_labels, cfg.public_per_class, rng) if cfg.public_per_class else np.zeros(0, int)
        private = np.setdiff1d(np.arange(len(train_labels)), public)
        split = client_split(
            train_labels[private], cfg.num_users, cfg.partition, beta=cfg.beta, seed=cfg.seed, test_labels=test_labels
        )
        train_idx = [private[ix] for ix in split.train]
        weights = np.asarray([len(ix) for ix in train_idx], dtype=np.float64)
        weights /= weights.sum()  # w_k = |D_k| / sum_j |D_j|

        oracle = Oracle(backbone, data.classnames, text_path=cfg.text_path)
        key = f"{cfg.dataset}:{cfg.data_root}"
        oracle.register("train", data.train, dataset_key=key)
        oracle.register("test", data.test, dataset_key=key)

        z = token_table(backbone)  # (V, d)
        allowed = allowed_vocabulary(tok, words_only=cfg.vocab == "words")
        allowed = allowed[allowed < z.shape[0]]
        n_max = min(cfg.n_max, oracle.max_prompt_len)
        if cfg.proposer == "random":
            proposer: Proposer = RandomProposer(allowed, rng=rng)
        else:
            proposer = EmbeddingNeighbor(z, allowed, rng=rng, explore=cfg.explore)

        seed_ids = list(tok.encode(cfg.seed_text))
        if not 1 <= len(seed_ids) <= n_max:
            raise ValueError(
                f"--seed-prompt must tokenize to 1..{n_max} tokens, got {len(seed_ids)}: {cfg.seed_text!r}"
            )
        test_idx = list(split.test)
        eval_start = oracle.queries
        zero_shot = evaluate(oracle, list(tok.encode(ZERO_SHOT_PROMPT)), test_labels, test_idx)
        seed_eval = evaluate(oracle, seed_ids, test_labels, test_idx)
        return _State(
            cfg=cfg,
            backbone=backbone,
            data=data,
            oracle=oracle,
            train_labels=train_labels,
            test_labels=test_labels,
            train_idx=train_idx,
            test_idx=test_idx,
            weights=weights,
            public=public,
            public_batch=Batch("train", public, train_labels[public]),
            z=z,
            allowed=allowed,
            n_max=n_max,
            bits_per_token=math.ceil(math.log2(z.shape[0])),
            rng=rng,
            proposer=proposer,
            seed_ids=seed_ids,
            zero_shot=zero_shot,
            seed_eval=seed_eval,
            eval_queries=oracle.queries - eval_start,
            global_prompt=list(seed_ids),
        )

    def round(self, st: _State, rnd: int) -> dict[str, Any]:
        """Broadcast, local search on every client, upload, aggregation, evaluation of the new global prompt."""
        cfg, rng = st.cfg, st.rng
        st.download_bits += cfg.num_users * len(st.global_prompt) * st.bits_per_token
        results = []
        for own in st.train_idx:
            batch_ix = np.sort(rng.choice(own, size=min(cfg.batch_size, len(own)), replace=False))
            res = client_update(
                st.oracle,
                st.global_prompt,
                [Batch("train", batch_ix, st.train_labels[batch_ix]), st.public_batch],
                st.proposer,
                iterations=cfg.iterations,
                candidates=cfg.candidates,
                rng=rng,
                feedback=cfg.client_mode == "feedback",
                position_beta=cfg.position_beta,
            )
            st.train_queries += res.queries
            st.upload_bits += len(res.prompt) * st.bits_per_token
            results.append(res)
        agg = aggregate(
            [res.prompt for res in results],
            st.z,
            previous=st.global_prompt,
            mode=cfg.server,
            min_samples=cfg.min_samples,
            elbow=cfg.elbow,
            temperature=cfg.temperature,
            n_max=st.n_max,
            allowed=st.allowed,
            seed=cfg.seed,
        )
        st.global_prompt = agg.prompt
        eval_start = st.oracle.queries
        metrics = evaluate(st.oracle, st.global_prompt, st.test_labels, st.test_idx)
        st.eval_queries += st.oracle.queries - eval_start
        st.last = {
            "local_acc": metrics["local_acc"],
            "neighbor_acc": metrics["neighbor_acc"],
            "epsilon_local": None,
            "epsilon_global": None,
            "test_acc": metrics["test_acc"],
            "client_acc": float(np.dot(st.weights, [res.acc for res in results])),
            "queries": st.train_queries,
            "text_encodings": st.oracle.text_encodings,
            "upload_bits": st.upload_bits,
            "download_bits": st.download_bits,
            **self._prompt(st),
            "prompt_len": len(st.global_prompt),
            "eps": agg.eps,
            "n_clusters": agg.n_clusters,
            "n_noise": agg.n_noise,
            "fallback": agg.fallback,
        }
        return st.last

    @staticmethod
    def _prompt(st: _State) -> dict[str, Any]:
        return {"prompt": list(st.global_prompt), "prompt_text": st.backbone.tokenizer.decode(st.global_prompt).strip()}

    def final(self, st: _State) -> dict[str, Any]:
        """Last round's accuracies, query and communication totals, the final prompt and its transfer (F8)."""
        cfg = st.cfg
        transfer = None
        if cfg.transfer_model:
            transfer = transfer_accuracy(cfg, st.data, st.test_labels, st.backbone, st.global_prompt, st.seed_ids)
        return {
            "local_acc": st.last["local_acc"],
            "neighbor_acc": st.last["neighbor_acc"],
            "zero_shot_acc": st.zero_shot["test_acc"],
            "epsilon_local": None,
            "epsilon_global": None,
            "delta": None,
            "accountant": None,
            "note": "FedDTPT has no differential privacy (only discrete token ids leave a client), so epsilon, delta "
            "and accountant do not apply. zero_shot_acc: the hand-written prompt 'a photo of a {}.' through the "
            "oracle.",
            "test_acc": st.last["test_acc"],
            "seed_prompt_acc": st.seed_eval["test_acc"],
            "queries": st.train_queries,
            "eval_queries": st.eval_queries,
            "text_encodings": st.oracle.text_encodings,
            "bits_per_token": st.bits_per_token,
            "upload_bits": st.upload_bits,
            "download_bits": st.download_bits,
            "total_bits": st.upload_bits + st.download_bits,
            **self._prompt(st),
            "seed_prompt": cfg.seed_text,
            "num_classes": len(st.data.classnames),
            "public_set_size": len(st.public),
            "proposer": f"{cfg.proposer} ({cfg.client_mode}); the MLM proposer is not implemented (no offline weights)",
            "transfer": transfer,
        }


def run(cfg: Config, *, out: Path, progress: bool = True, tensorboard: str | Path | None = None) -> dict[str, Any]:
    """Run FedDTPT and write results.json, rounds.csv and accuracy.png to ``out``.

    Args:
        cfg: the job.
        out: output folder (created).
        progress: show a tqdm progress bar over rounds.
        tensorboard: also a TensorBoard log of the rounds in this folder (None: none).

    Returns:
        The results dict (``{"method", "config", "rounds", "final"}``).
    """
    return run_method(FedDTPT(), cfg, out=out, progress=progress, tensorboard=tensorboard)
