"""The text tower on the class prompts of K clients: the full path against the shared-prefix path, and the shared
path's attention written three ways.

Paths, each mapping (K, n_ctx, d) contexts to (K, n_cls, D) text features:

``full``
    every class prompt [SOS, ctx, name, '.', EOT] whole, truncated after the longest EOT (``--text-path full``).
``shared``
    fpl_fast's shared-prefix path (``backbone.text_tower``): [SOS, ctx] once per client, the class suffixes packed
    in buckets of equal length, each bucket's attention one batched product over its (S x (P + S)) scores, the last
    layer on the pooled rows only (``--text-path shared``, the default).
``shared_sdpa``
    the same rows, each bucket's attention by ``F.scaled_dot_product_attention`` with a boolean mask (keys: the
    prefix expanded over the bucket's sequences, then the sequence's own rows).
``shared_dense``
    the same rows as one sequence of P + T rows under one (P + T) x (P + T) mask (prefix causal, each suffix to the
    prefix and causally to itself): simplest, but its attention grows with the square of the class count.

Timed (median over ``--reps``, the paths interleaved in each repetition, one process): the forward; the forward and
one backward of a random cotangent; the forward and the b per-sample pull-backs (``torch.func.vmap`` of one vjp's
pull-back over b random cotangents, ``--chunk`` at a time) as in the per-sample step. The token rows per client
through each layer are printed beside the times. Before timing, every path's features and pull-backs are checked
against the full path (relative error printed).

Usage, from the repository root::

    python bench/bench_text_path.py --model tiny-digits-clip --pretrained embedded --classes 10 --clients 10
    python bench/bench_text_path.py --model ViT-B-16 --classes 100 --clients 1 --batch 8 --chunk 8 --reps 3

Benchmarks never assert anything about timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from bench_round import made_up_classnames  # noqa: E402
    from provenance import provenance  # noqa: E402

    import fpl_fast.backbone.text_tower as te  # noqa: E402
    from fpl_fast.backbone.loading import load_backbone  # noqa: E402
    from fpl_fast.data import DIGIT_CLASSNAMES  # noqa: E402
    from fpl_fast.prompts.class_prompts import ClassPrompts  # noqa: E402

PATHS = ("full", "shared", "shared_sdpa", "shared_dense")
CASES = ("forward", "forward_backward", "per_sample")


def _sdpa_attention(q: Tensor, k: Tensor, v: Tensor, pack: te.SuffixPack, *, pooled_only: bool) -> Tensor:
    """``te._shared_attention`` through scaled_dot_product_attention (q is already scaled: scale=1)."""
    N, H, _, hd = q.shape
    P = pack.prefix_len
    kp, vp = k[:, :, :P], v[:, :, :P]
    outs = []
    if not pooled_only:
        outs.append(F.scaled_dot_product_attention(q[:, :, :P], kp, vp, is_causal=True, scale=1.0))
    slot = 0
    for first, n, S in pack.buckets:
        rows = slice(first, first + n * S)
        ks, vs = k[:, :, rows].reshape(N, H, n, S, hd), v[:, :, rows].reshape(N, H, n, S, hd)
        if pooled_only:
            qs, mask = q[:, :, slot : slot + n].unsqueeze(3), None
            slot += n
        else:
            qs = q[:, :, rows].reshape(N, H, n, S, hd)
            mask = torch.ones(S, P + S, dtype=torch.bool, device=q.device)
            mask[:, P:] = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        kc = torch.cat([kp.unsqueeze(2).expand(N, H, n, P, hd), ks], dim=3)
        vc = torch.cat([vp.unsqueeze(2).expand(N, H, n, P, hd), vs], dim=3)
        out = F.scaled_dot_product_attention(qs, kc, vc, attn_mask=mask, scale=1.0)
        outs.append(out.reshape(N, H, -1, hd))
    return torch.cat(outs, dim=2)


def _dense_block(block: Any, x: Tensor, pack: te.SuffixPack, pooled: Tensor | None, batch_first: bool) -> Tensor:
    """``te._shared_block`` as one masked sequence of all P + T rows (the last layer still pools afterwards)."""
    x = te._block_forward(block, x, pack.dense_mask(x.dtype), batch_first)
    return x if pooled is None else x[:, pooled]


def _variant(fn: Callable[[Tensor], Tensor], **patch: Any) -> Callable[[Tensor], Tensor]:
    """``fn`` run with attributes of ``fpl_fast.backbone.text_tower`` replaced (the alternatives above)."""

    def run(ctx: Tensor) -> Tensor:
        saved = {name: getattr(te, name) for name in patch}
        for name, value in patch.items():
            setattr(te, name, value)
        try:
            return fn(ctx)
        finally:
            for name, value in saved.items():
                setattr(te, name, value)

    return run


def _seconds(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-digits-clip", help="open_clip model (random init unless --pretrained)")
    parser.add_argument("--pretrained", default=None, help="weights (default: random; 'embedded': the tiny CLIP's)")
    parser.add_argument("--classes", type=int, default=10, help="classes (digits names up to 10, then made-up names)")
    parser.add_argument("--clients", type=int, default=10, help="clients K (different contexts)")
    parser.add_argument("--n-ctx", type=int, default=16, help="context tokens")
    parser.add_argument("--batch", type=int, default=32, help="per-sample pull-backs b")
    parser.add_argument("--chunk", type=int, default=None, help="pull-backs per vmap call (default: all b)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (median reported)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not paths or any(p not in PATHS for p in paths):
        parser.error(f"--paths must be a comma-separated subset of {','.join(PATHS)}, got {args.paths!r}")
    for name in ("classes", "clients", "batch", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    backbone = load_backbone(args.model, args.pretrained)
    names = list(DIGIT_CLASSNAMES)[: args.classes] if args.classes <= 10 else made_up_classnames(args.classes)
    prompts = {p: ClassPrompts(backbone, names, args.n_ctx, p) for p in ("full", "shared")}
    fns: dict[str, Callable[[Tensor], Tensor]] = {
        "full": lambda c: prompts["full"].features(c, traceable=True),
        "shared": lambda c: prompts["shared"].features(c, traceable=True),
    }
    fns["shared_sdpa"] = _variant(fns["shared"], _shared_attention=_sdpa_attention)
    fns["shared_dense"] = _variant(fns["shared"], _shared_block=_dense_block)
    rows = {p: prompts["full" if p == "full" else "shared"].rows_per_client for p in PATHS}

    gen = torch.Generator().manual_seed(0)
    ctx = torch.randn(args.clients, args.n_ctx, backbone.ctx_dim, generator=gen) * 0.02
    out_shape = (args.clients, len(names), backbone.embed_dim)
    cot = torch.randn(*out_shape, generator=gen)
    cots = torch.randn(args.batch, *out_shape, generator=gen)
    step = args.batch if args.chunk is None else args.chunk

    def forward(fn: Callable[[Tensor], Tensor]) -> Tensor:
        with torch.no_grad():
            return fn(ctx)

    def forward_backward(fn: Callable[[Tensor], Tensor]) -> Tensor:
        c = ctx.clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(fn(c), c, grad_outputs=cot)
        return g

    def per_sample(fn: Callable[[Tensor], Tensor]) -> Tensor:
        _, pull = torch.func.vjp(fn, ctx)
        vpull = torch.func.vmap(lambda c: pull(c)[0])
        return torch.cat([vpull(cots[s : s + step]) for s in range(0, args.batch, step)])

    cases = {"forward": forward, "forward_backward": forward_backward, "per_sample": per_sample}
    want = {case: run(fns["full"]) for case, run in cases.items()}
    errors = {}
    for p in paths:
        errors[p] = {c: float((run(fns[p]) - want[c]).norm() / want[c].norm()) for c, run in cases.items()}
    times: dict[str, dict[str, list[float]]] = {p: {c: [] for c in CASES} for p in paths}
    for _ in range(args.reps):
        for case, run in cases.items():
            for p in paths:
                times[p][case].append(_seconds(lambda: run(fns[p])))  # noqa: B023
    med = {p: {c: statistics.median(v) for c, v in times[p].items()} for p in paths}

    print(
        f"{args.model}: K={args.clients}, {len(names)} classes, n_ctx {args.n_ctx}, b={args.batch}, chunk {step}, "
        f"threads {torch.get_num_threads()}, torch {torch.__version__}; median of {args.reps} (seconds)"
    )
    print(f"{'path':14s} {'rows':>6s} " + " ".join(f"{c:>18s}" for c in CASES) + "   rel. error vs full")
    for p in paths:
        ratio = {c: med["full"][c] / med[p][c] if "full" in med else float("nan") for c in CASES}
        cells = " ".join(f"{med[p][c]:9.4f} ({ratio[c]:4.1f}x)" for c in CASES)
        err = max(errors[p].values())
        print(f"{p:14s} {rows[p]:6d} {cells}   {err:.1e}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            **provenance(__file__, argv),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "rows_per_client": {p: rows[p] for p in paths},
            "median_s": med,
            "relative_error_vs_full": errors,
        }
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
