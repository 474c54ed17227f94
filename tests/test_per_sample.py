"""Per-sample prompt gradients against a loop of single-example backward passes (float64)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from open_clip.transformer import TextTransformer
from torch import Tensor

from fpl_fast.privacy.per_sample import (
    batch_prompt_grad,
    logit_cotangents,
    per_sample_prompt_grads,
    per_sample_prompt_grads_by_row,
    per_sample_prompt_grads_from,
)

N_CLS, L, WIDTH, D_OUT, N_CTX = 4, 9, 16, 8, 3
B = 5
SCALE = 10.0

# vmap runs PyTorch's fused attention backward per sample (no batching rule yet); per_sample.py documents it.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


@pytest.fixture(scope="module")
def tower() -> TextTransformer:
    torch.manual_seed(0)
    t = TextTransformer(context_length=L, vocab_size=40, width=WIDTH, heads=2, layers=2, output_dim=D_OUT).double()
    t.eval().requires_grad_(False)
    return t


def make_text_fn(tower: TextTransformer, eot: Tensor) -> Callable[[Tensor], Tensor]:
    """open_clip's causal text tower on prompt embeddings, pooled at each prompt's EOT position."""

    def text_fn(x: Tensor) -> Tensor:  # (N, L, d) -> (N, D)
        h = x + tower.positional_embedding
        h = tower.transformer(h, attn_mask=tower.attn_mask)
        h = tower.ln_final(h)
        return h[torch.arange(h.shape[0]), eot] @ tower.text_projection

    return text_fn


def loop_grads(text_fn, prompts: Tensor, img: Tensor, labels: Tensor) -> Tensor:
    """Oracle: b single-example backward passes of L_i alone."""
    out = []
    for i in range(img.shape[0]):
        x = prompts.clone().requires_grad_(True)
        t = torch.nn.functional.normalize(text_fn(x), dim=-1)
        logits = SCALE * torch.nn.functional.normalize(img[i], dim=-1) @ t.T
        loss = torch.nn.functional.cross_entropy(logits[None], labels[i : i + 1])
        (g,) = torch.autograd.grad(loss, x)
        out.append(g)
    return torch.stack(out)


def data(K: int = 1):
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randn(K * N_CLS, L, WIDTH, generator=gen, dtype=torch.float64)
    eot = torch.randint(N_CTX + 2, L, (K * N_CLS,), generator=gen)
    img = torch.randn(K, B, D_OUT, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, N_CLS, (K, B), generator=gen)
    return prompts, eot, img, labels


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_per_sample_equals_loop_of_single_backward(tower, chunk_size):
    prompts, eot, img, labels = data()
    text_fn = make_text_fn(tower, eot)
    feats = text_fn(prompts)
    cot, losses = logit_cotangents(img[0], feats, labels[0], SCALE)
    assert cot.shape == (B, N_CLS, D_OUT) and losses.shape == (B,)
    got = per_sample_prompt_grads(text_fn, prompts, cot, chunk_size=chunk_size)
    want = loop_grads(text_fn, prompts, img[0], labels[0])
    assert got.shape == (B, N_CLS, L, WIDTH)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # The context positions alone, selected per chunk.
    ctx = per_sample_prompt_grads(text_fn, prompts, cot, chunk_size=chunk_size, positions=slice(1, 1 + N_CTX))
    torch.testing.assert_close(ctx, want[:, :, 1 : 1 + N_CTX], rtol=1e-10, atol=1e-12)
    assert want.abs().max() > 1e-3  # the oracle is not trivially zero


def test_losses_and_sum_equals_batch_gradient(tower):
    prompts, eot, img, labels = data()
    text_fn = make_text_fn(tower, eot)
    cot, losses = logit_cotangents(img[0], text_fn(prompts), labels[0], SCALE)
    per = per_sample_prompt_grads(text_fn, prompts, cot, chunk_size=2)
    g_mean, batch_losses = batch_prompt_grad(text_fn, prompts, img[0], labels[0], SCALE)
    torch.testing.assert_close(per.mean(0), g_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(per.sum(0), B * g_mean, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        logits = (
            SCALE
            * torch.nn.functional.normalize(img[0], dim=-1)
            @ torch.nn.functional.normalize(text_fn(prompts), dim=-1).T
        )
        ref = torch.nn.functional.cross_entropy(logits, labels[0], reduction="none")
    torch.testing.assert_close(losses, ref)
    torch.testing.assert_close(batch_losses, ref)


def test_client_batched_prompts_one_pass(tower):
    """K clients stacked along N: cotangent i holds sample i of every client; one pass serves all."""
    K = 2
    prompts, eot, img, labels = data(K)
    text_fn = make_text_fn(tower, eot)
    feats = text_fn(prompts).view(K, N_CLS, D_OUT)
    cot, losses = logit_cotangents(img, feats, labels, SCALE)  # (b, K, n_cls, D), (K, b)
    assert cot.shape == (B, K, N_CLS, D_OUT) and losses.shape == (K, B)
    got = per_sample_prompt_grads(text_fn, prompts, cot.reshape(B, K * N_CLS, D_OUT), chunk_size=3)
    got = got.view(B, K, N_CLS, L, WIDTH)
    for k in range(K):
        rows = slice(k * N_CLS, (k + 1) * N_CLS)
        fn_k = make_text_fn(tower, eot[rows])
        want = loop_grads(fn_k, prompts[rows], img[k], labels[k])
        torch.testing.assert_close(got[:, k], want, rtol=1e-10, atol=1e-12)
    g_batch, _ = batch_prompt_grad(text_fn, prompts, img, labels, SCALE)
    torch.testing.assert_close(got.mean(0).reshape(K * N_CLS, L, WIDTH), g_batch, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_one_vjp_per_client_pulls_back_each_clients_own_samples_only(tower, chunk_size):
    """Clients with batches of 5 and 2 examples (the second padded to 5 with zero cotangents): row k's gradients
    equal its single-example backward passes, its padding gets zeros without a pull-back, and the result equals
    the joint vjp's."""
    K = 2
    prompts, eot, img, labels = data(K)
    counts = [B, 2]
    mask = torch.tensor([[1.0] * B, [1.0] * 2 + [0.0] * (B - 2)], dtype=torch.float64)  # (K, B)

    def head(flat: Tensor) -> tuple[Tensor, Tensor]:
        cot, losses = logit_cotangents(img, flat.view(K, N_CLS, D_OUT), labels, SCALE)
        return (cot * mask.T[..., None, None]).reshape(B, K * N_CLS, D_OUT), losses

    row_of_call = iter(range(K))  # text_fn is called on rows 0, 1, ... in order

    def one_text(x: Tensor) -> Tensor:  # (1, n_cls, L, d) -> (n_cls, D)
        k = next(row_of_call)
        return make_text_fn(tower, eot[k * N_CLS : (k + 1) * N_CLS])(x[0])

    per_row = prompts.view(K, N_CLS, L, WIDTH)
    got, _ = per_sample_prompt_grads_by_row(one_text, per_row, head, counts=counts, chunk_size=chunk_size)
    assert got.shape == (B, K, N_CLS, L, WIDTH)
    for k in range(K):
        rows = slice(k * N_CLS, (k + 1) * N_CLS)
        want = loop_grads(make_text_fn(tower, eot[rows]), prompts[rows], img[k, : counts[k]], labels[k, : counts[k]])
        torch.testing.assert_close(got[: counts[k], k], want, rtol=1e-10, atol=1e-12)
    assert bool((got[2:, 1] == 0).all())
    joint, _ = per_sample_prompt_grads_from(make_text_fn(tower, eot), prompts, head, chunk_size=chunk_size)
    torch.testing.assert_close(got.reshape(joint.shape), joint, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="counts must give one count per row"):
        per_sample_prompt_grads_by_row(one_text, per_row, head, counts=[B])


def test_grads_from_head_run_the_encoder_once(tower):
    """Cotangents from the vjp's own forward: same gradients as the two-forward path, one encoder call."""
    prompts, eot, img, labels = data()
    inner = make_text_fn(tower, eot)
    calls = []

    def text_fn(x: Tensor) -> Tensor:
        calls.append(1)
        return inner(x)

    def head(feats: Tensor) -> tuple[Tensor, Tensor]:
        return logit_cotangents(img[0], feats, labels[0], SCALE)

    got, losses = per_sample_prompt_grads_from(text_fn, prompts, head, chunk_size=2, positions=slice(1, 1 + N_CTX))
    assert len(calls) == 1
    want = loop_grads(inner, prompts, img[0], labels[0])[:, :, 1 : 1 + N_CTX]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    _, want_losses = logit_cotangents(img[0], inner(prompts), labels[0], SCALE)
    torch.testing.assert_close(losses, want_losses)
    with pytest.raises(ValueError, match="cotangents must be"):
        per_sample_prompt_grads_from(text_fn, prompts, lambda f: (f[None, :-1], None))


def test_encoder_receives_no_gradient(tower):
    prompts, eot, img, labels = data()
    text_fn = make_text_fn(tower, eot)
    cot, _ = logit_cotangents(img[0], text_fn(prompts), labels[0], SCALE)
    per_sample_prompt_grads(text_fn, prompts, cot)
    assert all(p.grad is None for p in tower.parameters())


def test_empty_batch(tower):
    prompts, eot, _, _ = data()
    out = per_sample_prompt_grads(make_text_fn(tower, eot), prompts, prompts.new_zeros(0, N_CLS, D_OUT))
    assert out.shape == (0, N_CLS, L, WIDTH)


def test_bad_inputs_raise(tower):
    prompts, eot, img, labels = data()
    text_fn = make_text_fn(tower, eot)
    cot = prompts.new_zeros(B, N_CLS, D_OUT)
    with pytest.raises(ValueError, match="chunk_size must be None"):
        per_sample_prompt_grads(text_fn, prompts, cot, chunk_size=0)
    with pytest.raises(ValueError, match=r"cotangents must be \(b, 4, 8\)"):
        per_sample_prompt_grads(text_fn, prompts, prompts.new_zeros(B, N_CLS + 1, D_OUT))
    with pytest.raises(ValueError, match="prompts must be 3-D"):
        per_sample_prompt_grads(text_fn, prompts[0], cot)
    feats = text_fn(prompts)
    with pytest.raises(ValueError, match="labels must have shape"):
        logit_cotangents(img[0], feats, labels[0, :2], SCALE)
    with pytest.raises(ValueError, match="image_feats must be"):
        logit_cotangents(img[0], feats.view(1, N_CLS, D_OUT), labels[0], SCALE)
