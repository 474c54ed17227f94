"""Per-sample gradients of a prompt that is shared across the class batch of a text encoder.

The text encoder runs on the class prompts, not on the images, so one example's loss reaches the
prompts only through the text features T = text_fn(prompts). The recipe (docs/design.md section 2):

1. T = text_fn(prompts) once, with ``torch.func.vjp`` keeping the pull-back ``vjp_fn``;
2. the per-sample cotangents dL_i/dT come from the cheap logit head (:func:`logit_cotangents`,
   ``torch.func.vmap`` of ``torch.func.grad``);
3. ``torch.func.vmap(vjp_fn)`` over the b cotangents gives the b per-sample prompt gradients, in
   chunks of samples to bound memory (:func:`per_sample_prompt_grads`).

That costs b vector-Jacobian products through the encoder per step against one for batch-mean
clipping (:func:`batch_prompt_grad`). Nothing here knows about CLIP: the encoder is any
differentiable function of the prompt embeddings that treats each prompt independently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad_and_value, vjp, vmap

from fpl_fast.validation import check

__all__ = [
    "per_sample_prompt_grads",
    "per_sample_prompt_grads_from",
    "per_sample_prompt_grads_by_row",
    "logit_cotangents",
    "batch_prompt_grad",
]

TextFn = Callable[[Tensor], Tensor]


def per_sample_prompt_grads(
    text_fn: TextFn,
    prompts: Tensor,
    cotangents: Tensor,
    *,
    chunk_size: int | None = None,
    positions: slice | None = None,
) -> Tensor:
    """Per-sample gradients w.r.t. the prompt embeddings by one vjp and a vmap over cotangents.

    With T = text_fn(prompts) and cotangent c_i = dL_i/dT, returns J^T c_i for every sample i, where
    J = dT/dprompts: ``torch.func.vjp`` of ``text_fn`` at ``prompts`` is taken once and its
    pull-back is vmapped over ``chunk_size`` cotangents at a time.

    Prompts of several clients may be stacked along N: since the encoder treats each prompt on its
    own, row block k of ``cotangents[i]`` may hold sample i of client k, and one pass then gives the
    i-th per-sample gradient of every client (the caller reshapes N = K * n_cls).

    The encoder's own parameters should not require gradients (freeze them); only ``prompts`` is
    differentiated.

    PyTorch's fused attention backward kernels have no vmap batching rule, so vmap runs them one
    sample at a time (with a UserWarning); calling this under
    ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` batches them instead. Which is faster
    depends on the device and sizes (on two CPU cores the fallback was faster): measure.

    Args:
        text_fn: maps prompt embeddings (N, L, d) to text features (N, D), differentiably.
        prompts: (N, L, d) prompt embeddings (all class prompts of all clients).
        cotangents: (b, N, D) per-sample dL_i/dT.
        chunk_size: samples per vmapped pull-back (None: all b at once); bounds peak memory.
        positions: keep only these token positions of the result (e.g. ``slice(1, 1 + n_ctx)``
            for the context tokens), applied per chunk so the full (b, N, L, d) tensor is never
            materialised; None keeps all L.

    Returns:
        (b, N, L, d) per-sample gradients (L replaced by the length of ``positions`` when given),
        in the dtype of ``prompts``.
    """
    check(prompts.dim() == 3, f"prompts must be 3-D (N, L, d), got shape {tuple(prompts.shape)}")
    check(cotangents.dim() == 3, f"cotangents must be 3-D (b, N, D), got shape {tuple(cotangents.shape)}")
    grads, _ = per_sample_prompt_grads_from(
        text_fn, prompts, lambda feats: (cotangents, None), chunk_size=chunk_size, positions=positions
    )
    return grads


def per_sample_prompt_grads_from(
    text_fn: TextFn,
    prompts: Tensor,
    head: Callable[[Tensor], tuple[Tensor, Any]],
    *,
    chunk_size: int | None = None,
    positions: slice | None = None,
) -> tuple[Tensor, Any]:
    """:func:`per_sample_prompt_grads` with the cotangents computed from the vjp's own forward.

    ``head(T)`` maps the (detached) text features T = text_fn(prompts) to ``(cotangents, aux)``,
    typically via :func:`logit_cotangents`; the encoder then runs forward once per step instead of
    twice (once to get T for the cotangents, once inside the vjp). Returns ``(grads, aux)``.
    """
    check(prompts.dim() == 3, f"prompts must be 3-D (N, L, d), got shape {tuple(prompts.shape)}")
    check(chunk_size is None or chunk_size >= 1, f"chunk_size must be None (all samples) or >= 1, got {chunk_size}")
    out = vjp(text_fn, prompts)  # (output, vjp_fn): no has_aux
    feats, vjp_fn = out[0], out[1]  # feats (N, D)
    cotangents, aux = head(feats)
    check(cotangents.dim() == 3, f"cotangents must be 3-D (b, N, D), got shape {tuple(cotangents.shape)}")
    check(
        cotangents.shape[1:] == feats.shape,
        f"cotangents must be (b, {feats.shape[0]}, {feats.shape[1]}) to match text_fn(prompts), "
        f"got {tuple(cotangents.shape)}",
    )
    cot = cotangents.to(feats.dtype)
    b = cot.shape[0]
    sel = slice(None) if positions is None else positions
    if b == 0:
        return prompts.new_zeros(0, *prompts[:, sel].shape), aux
    step = b if chunk_size is None else chunk_size
    pull = vmap(lambda c: vjp_fn(c)[0])
    chunks = [pull(cot[start : start + step])[:, :, sel] for start in range(0, b, step)]
    return (chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=0)), aux


def per_sample_prompt_grads_by_row(
    text_fn: TextFn,
    prompts: Tensor,
    head: Callable[[Tensor], tuple[Tensor, Any]],
    *,
    counts: Sequence[int],
    chunk_size: int | None = None,
) -> tuple[Tensor, Any]:
    """:func:`per_sample_prompt_grads_from` with one vjp per row of ``prompts`` (one client) instead of one for all.

    ``text_fn`` maps one row ``prompts[j : j + 1]`` to its features (n, D); ``head`` sees every row's features
    stacked (K n, D) and returns ``(cotangents (b, K n, D), aux)``. Row j's pull-back is vmapped over its first
    ``counts[j]`` cotangents only: the others must be zero (padding of a smaller batch), and their gradients are
    returned as zeros without a backward pass. One joint vjp spends max_j counts[j] pull-backs through every row;
    this spends counts[j] through row j, which saves the padding's share of the work when the rows' batches differ
    (Poisson sampling), at the price of K smaller vjps.

    Returns:
        ((b, K, ...) per-sample gradients, row j's sample i at [i, j]; aux).
    """
    K = prompts.shape[0]
    check(len(counts) == K, f"counts must give one count per row ({K}), got {len(counts)}")
    check(chunk_size is None or chunk_size >= 1, f"chunk_size must be None (all samples) or >= 1, got {chunk_size}")
    outs = [vjp(text_fn, prompts[j : j + 1]) for j in range(K)]
    feats = torch.cat([out[0] for out in outs])  # (K n, D)
    cotangents, aux = head(feats)
    check(
        cotangents.dim() == 3 and cotangents.shape[1:] == feats.shape,
        f"cotangents must be (b, {feats.shape[0]}, {feats.shape[1]}), got {tuple(cotangents.shape)}",
    )
    b, n = cotangents.shape[0], feats.shape[0] // K
    check(max(counts, default=0) <= b, f"counts must be <= the {b} cotangents, got {list(counts)}")
    cot = cotangents.to(feats.dtype)
    grads = prompts.new_zeros(b, *prompts.shape)
    for j, out in enumerate(outs):
        pull_one = out[1]
        pull = vmap(lambda c, fn=pull_one: fn(c)[0])
        step = counts[j] if chunk_size is None else chunk_size
        for start in range(0, counts[j], max(1, step)):
            stop = min(counts[j], start + step)
            grads[start:stop, j] = pull(cot[start:stop, j * n : (j + 1) * n])[:, 0]
    return grads, aux


def _ce_cosine(text: Tensor, img: Tensor, label: Tensor, logit_scale: Tensor) -> Tensor:
    """cross_entropy(s * cos(img, text_k), label) of one example; text (n_cls, D), img (D,)."""
    logits = logit_scale * (F.normalize(text, dim=-1) @ F.normalize(img, dim=-1))  # (n_cls,)
    return F.cross_entropy(logits.unsqueeze(0), label.unsqueeze(0))


def _check_head(image_feats: Tensor, text_feats: Tensor, labels: Tensor) -> bool:
    """Validate the logit-head inputs; True for the client-batched form."""
    check(text_feats.dim() in (2, 3), f"text_feats must be (n_cls, D) or (K, n_cls, D), got {tuple(text_feats.shape)}")
    batched = text_feats.dim() == 3
    want = 3 if batched else 2
    what = "(K, b, D) like text_feats (K, n_cls, D)" if batched else "(b, D) like text_feats (n_cls, D)"
    check(image_feats.dim() == want, f"image_feats must be {what}, got shape {tuple(image_feats.shape)}")
    check(
        labels.shape == image_feats.shape[:-1],
        f"labels must have shape {tuple(image_feats.shape[:-1])} to match image_feats, got {tuple(labels.shape)}",
    )
    check(
        image_feats.shape[-1] == text_feats.shape[-1],
        f"image_feats and text_feats must share the feature width, got {image_feats.shape[-1]} "
        f"and {text_feats.shape[-1]}",
    )
    if batched:
        check(
            image_feats.shape[0] == text_feats.shape[0],
            f"image_feats and text_feats must have the same K, got {image_feats.shape[0]} and {text_feats.shape[0]}",
        )
    return batched


def _head(
    fn: Callable[..., Any], image_feats: Tensor, text_feats: Tensor, labels: Tensor, logit_scale: float | Tensor
) -> Any:
    """Apply a per-example head function over b (and K for the client-batched form)."""
    batched = _check_head(image_feats, text_feats, labels)
    scale = torch.as_tensor(logit_scale, dtype=text_feats.dtype, device=text_feats.device)
    img = image_feats.to(text_feats.dtype)
    over_b = vmap(fn, in_dims=(None, 0, 0, None))
    if batched:
        return vmap(over_b, in_dims=(0, 0, 0, None))(text_feats, img, labels, scale)
    return over_b(text_feats, img, labels, scale)


def logit_cotangents(
    image_feats: Tensor, text_feats: Tensor, labels: Tensor, logit_scale: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Per-sample cotangents dL_i/dT of the cosine-similarity logit head, and the losses L_i.

    L_i = cross_entropy(s * cos(img_i, T_k) over classes k, y_i) for one example alone (no batch
    mean), computed with ``torch.func.vmap(torch.func.grad_and_value(...))`` over the examples.
    The head is cheap (no encoder), so this costs next to nothing.

    Args:
        image_feats: (b, D) image features, or (K, b, D) one batch per client.
        text_feats: (n_cls, D) class text features, or (K, n_cls, D) one set per client.
        labels: (b,) or (K, b) integer class labels.
        logit_scale: s, the (already exponentiated) logit scale.

    Returns:
        cotangents (b, n_cls, D), or (b, K, n_cls, D) for the client-batched form (reshape to
        (b, K * n_cls, D) for :func:`per_sample_prompt_grads`: sample i of every client in one
        cotangent); losses (b,) or (K, b).
    """
    cot, losses = _head(grad_and_value(_ce_cosine), image_feats, text_feats, labels, logit_scale)
    if text_feats.dim() == 3:
        cot = cot.transpose(0, 1)  # (K, b, n_cls, D) -> (b, K, n_cls, D)
    return cot, losses


def batch_prompt_grad(
    text_fn: TextFn,
    prompts: Tensor,
    image_feats: Tensor,
    labels: Tensor,
    logit_scale: float | Tensor,
    *,
    positions: slice | None = None,
) -> tuple[Tensor, Tensor]:
    """Gradient of the batch-mean loss w.r.t. the prompts by one ordinary backward pass.

    For ``clip_mode="batch"`` (the DP-FPL authors' batch-mean clipping). With client-batched inputs
    the loss is the sum over clients of each client's batch mean, so each client's block of the
    result is its own batch-mean gradient.

    Args:
        text_fn: maps prompt embeddings (N, L, d) to text features (N, D).
        prompts: (N, L, d); N = n_cls, or K * n_cls for client-batched inputs.
        image_feats: (b, D), or (K, b, D) one batch per client.
        labels: (b,) or (K, b) integer class labels.
        logit_scale: s.
        positions: keep only these token positions of the gradient (None: all).

    Returns:
        the gradient (N, L, d) (L replaced by the length of ``positions`` when given) and the
        detached per-sample losses (b,) or (K, b).
    """
    check(prompts.dim() == 3, f"prompts must be 3-D (N, L, d), got shape {tuple(prompts.shape)}")
    with torch.enable_grad():
        x = prompts.detach().requires_grad_(True)
        feats = text_fn(x)  # (N, D)
        if image_feats.dim() == 3:
            K = image_feats.shape[0]
            check(
                feats.shape[0] % K == 0,
                f"prompts must stack K={K} clients' class prompts (N divisible by K), got N={feats.shape[0]}",
            )
            feats = feats.view(K, feats.shape[0] // K, feats.shape[1])
        losses = _head(_ce_cosine, image_feats, feats, labels, logit_scale)  # (b,) or (K, b)
        total = losses.mean(dim=-1).sum()
        (g,) = torch.autograd.grad(total, x)
    sel = slice(None) if positions is None else positions
    return g[:, sel], losses.detach()
