"""Tests of the frozen CLIP backbone (tiny open_clip configs, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.func import vjp, vmap

from fpl_fast.backbone.checkpoints import init_token_embedding, save_compact_checkpoint
from fpl_fast.backbone.loading import load_backbone
from fpl_fast.backbone.model import FrozenCLIP
from fpl_fast.backbone.shipped_models import EMBEDDED_WEIGHTS
from fpl_fast.backbone.text_tower import text_encoder_forward, text_tower
from fpl_fast.data.digits import DIGIT_CLASSNAMES, DigitsDataset

CLASSES = ["zero", "one", "golden_retriever", "hot air balloon"]


@pytest.fixture(scope="module")
def causal() -> FrozenCLIP:
    torch.manual_seed(0)
    return load_backbone("tiny-digits-clip").double()


@pytest.fixture(scope="module")
def bidir() -> FrozenCLIP:
    torch.manual_seed(0)
    return load_backbone("tiny-bidir-clip").double()


def _random_ctx(model: FrozenCLIP, n_ctx: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_ctx, model.ctx_dim, generator=gen, dtype=torch.float64) * 0.02


def test_attributes(causal: FrozenCLIP, bidir: FrozenCLIP) -> None:
    assert (causal.ctx_dim, causal.embed_dim, causal.context_length) == (64, 64, 77)
    assert causal.is_causal and not bidir.is_causal
    assert causal.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    assert causal.dtype == torch.float64 and causal.device.type == "cpu"
    assert causal.image_size == (32, 32)


def test_frozen_encoders_get_no_gradients(causal: FrozenCLIP) -> None:
    causal.train()
    assert not causal.training and not causal.model.training
    assert all(not p.requires_grad for p in causal.parameters())
    parts = causal.prompt_parts(CLASSES, 4)
    ctx = _random_ctx(causal, 4).requires_grad_(True)
    feats = causal.encode_prompts(parts.assemble(ctx), parts.eot_index)
    feats.square().sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in causal.parameters())


@pytest.mark.parametrize("name", ["causal", "bidir"])
def test_encode_text_matches_open_clip(name: str, request: pytest.FixtureRequest) -> None:
    model: FrozenCLIP = request.getfixturevalue(name)
    texts = ["a photo of a cat.", "zero", "a much longer sentence, with punctuation and more words"]
    tokens = model.tokenizer(texts)
    with torch.no_grad():
        ref = model.model.encode_text(tokens)
    torch.testing.assert_close(model.encode_text(texts), ref, rtol=1e-10, atol=1e-10)


def test_prompt_parts_reassemble_token_embeddings(causal: FrozenCLIP) -> None:
    n_ctx = 16
    parts = causal.prompt_parts(CLASSES, n_ctx)
    n_cls, d = len(CLASSES), causal.ctx_dim
    assert parts.prefix.shape == (n_cls, 1, d)
    assert parts.suffix.shape == (n_cls, causal.context_length - 1 - n_ctx, d)
    assert parts.eot_index.dtype == torch.long and parts.eot_index.shape == (n_cls,)
    assert torch.equal(parts.eot_index, parts.tokens.argmax(-1))
    assert parts.seq_len == int(parts.eot_index.max()) + 1
    expected = causal.tokenizer([" ".join(["X"] * n_ctx) + f" {c.replace('_', ' ')}." for c in CLASSES])
    assert torch.equal(parts.tokens, expected)
    x_emb = causal.token_embeddings(causal.tokenizer(["X"])[0, 1]).expand(n_ctx, d)
    assembled = parts.assemble(x_emb)
    assert assembled.shape == (n_cls, causal.context_length, d)
    torch.testing.assert_close(assembled, causal.token_embeddings(expected), rtol=0, atol=0)


def test_prompt_parts_bad_arguments(causal: FrozenCLIP) -> None:
    with pytest.raises(ValueError, match="n_ctx"):
        causal.prompt_parts(CLASSES, 75)
    with pytest.raises(ValueError, match="classnames"):
        causal.prompt_parts([], 4)
    with pytest.raises(ValueError, match="context length"):
        causal.prompt_parts(["word " * 80], 4)


def test_truncation_is_exact_for_causal_tower(causal: FrozenCLIP) -> None:
    parts = causal.prompt_parts(CLASSES, 16)
    prompts = parts.assemble(_random_ctx(causal, 16))
    assert parts.seq_len < prompts.shape[1]  # truncation really happens
    full = text_encoder_forward(text_tower(causal.model), prompts, parts.eot_index)
    torch.testing.assert_close(causal.encode_prompts(prompts, parts.eot_index), full, rtol=1e-12, atol=1e-12)
    cut = causal.encode_prompts(prompts, parts.eot_index, seq_len=parts.seq_len)
    torch.testing.assert_close(cut, full, rtol=1e-12, atol=1e-12)


def test_non_causal_tower_is_not_truncated(bidir: FrozenCLIP) -> None:
    parts = bidir.prompt_parts(CLASSES, 16)
    prompts = parts.assemble(_random_ctx(bidir, 16))
    tower = text_tower(bidir.model)
    full = text_encoder_forward(tower, prompts, parts.eot_index)
    truncated = text_encoder_forward(tower, prompts[:, : parts.seq_len], parts.eot_index)
    assert (full - truncated).abs().max() > 1e-4  # truncating would change the output ...
    out = bidir.encode_prompts(prompts, parts.eot_index, seq_len=parts.seq_len)
    torch.testing.assert_close(out, full, rtol=1e-12, atol=1e-12)  # ... so it is not done


def test_vmap_of_vjp_gives_per_sample_gradients(causal: FrozenCLIP) -> None:
    parts = causal.prompt_parts(CLASSES, 8)
    prompts = parts.assemble(_random_ctx(causal, 8))

    def encode(p: torch.Tensor) -> torch.Tensor:
        return causal.encode_prompts(p, parts.eot_index, seq_len=parts.seq_len)

    out, pullback = vjp(encode, prompts)
    cotangents = torch.randn(5, *out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    (batched,) = vmap(pullback)(cotangents)
    assert batched.shape == (5, *prompts.shape)
    looped = torch.stack([pullback(c)[0] for c in cotangents])
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-12)
    # vmap straight over the encoder (a batch of prompt sets) also works
    feats = vmap(encode)(torch.stack([prompts, 2 * prompts]))
    torch.testing.assert_close(feats[0], out)


def test_bf16_precision() -> None:
    model = load_backbone("tiny-digits-clip", precision="bf16")
    assert model.dtype == torch.bfloat16
    parts = model.prompt_parts(CLASSES, 4)
    feats = model.encode_prompts(parts.assemble(torch.zeros(4, model.ctx_dim)), parts.eot_index)
    assert feats.dtype == torch.bfloat16 and torch.isfinite(feats).all()
    images = torch.rand(2, 3, 32, 32)
    assert torch.isfinite(model.encode_images(images)).all()


def test_load_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"'not-a-model'.*open_clip.list_models\(\).*tiny-digits-clip"):
        load_backbone("not-a-model")
    with pytest.raises(ValueError, match=r"'no-such-tag'.*openai"):
        load_backbone("ViT-B-16", "no-such-tag")
    with pytest.raises(ValueError, match="precision"):
        load_backbone("tiny-digits-clip", precision="fp8")
    with pytest.raises(ValueError, match="embedded"):
        load_backbone("tiny-bidir-clip", "embedded")

    def offline(*args: object, **kwargs: object) -> str:
        raise OSError("[Errno -2] Name or service not known\nlong traceback text")

    monkeypatch.setattr("open_clip.factory.download_pretrained", offline)
    with pytest.raises(RuntimeError) as info:
        load_backbone("ViT-B-16", "openai")
    message = str(info.value)
    assert "\n" not in message and "'openai'" in message and "'ViT-B-16'" in message and "network" in message


def test_openai_tag_switches_on_quick_gelu(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_create(name: str, pretrained: str | None, **kwargs: object) -> None:
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr("open_clip.create_model", fake_create)
    with pytest.raises(RuntimeError):
        load_backbone("ViT-B-16", "openai")
    assert seen.get("force_quick_gelu") is True


def test_local_checkpoint_file(tmp_path: pytest.TempPathFactory, causal: FrozenCLIP) -> None:
    path = tmp_path / "ckpt.pt"
    torch.manual_seed(3)
    src = load_backbone("tiny-digits-clip")
    torch.save(src.model.state_dict(), path)
    loaded = load_backbone("tiny-digits-clip", str(path))
    for (k, a), (_, b) in zip(src.model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_zero_shot_weights_and_transforms(causal: FrozenCLIP) -> None:
    w = causal.zero_shot_weights(CLASSES, ["a photo of a {}.", "a {}."])
    assert w.shape == (len(CLASSES), causal.embed_dim)
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(len(CLASSES), dtype=w.dtype))
    with pytest.raises(ValueError, match="template"):
        causal.zero_shot_weights(CLASSES, "no placeholder")
    pil = Image.new("RGB", (50, 40), color=(255, 255, 255))
    x = causal.eval_transform()(pil)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    mean, std = causal.model.visual.preprocess_cfg["mean"], causal.model.visual.preprocess_cfg["std"]
    torch.testing.assert_close(x[:, 0, 0], (1 - torch.tensor(mean)) / torch.tensor(std))
    torch.manual_seed(0)
    aug = causal.train_transform(augment=True)
    outs = torch.stack([aug(DigitsDataset("test")[0][0]) for _ in range(4)])
    assert outs.shape == (4, 3, 32, 32) and (outs[0] - outs[1:]).abs().amax() > 0


def test_feature_cache_computes_once_without_augmentation(monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_backbone("tiny-digits-clip")
    data = DigitsDataset("test")
    calls = []
    original = model.encode_images

    def counting(images: torch.Tensor) -> torch.Tensor:
        calls.append(images.shape[0])
        return original(images)

    monkeypatch.setattr(model, "encode_images", counting)
    a = model.image_features("digits", "test", data, [3, 1, 2])
    b = model.image_features("digits", "test", data, [1, 2, 3, 4])
    assert sum(calls) == 4  # images 1, 2, 3 once, then only 4
    torch.testing.assert_close(a[1:], b[:2])
    expected = original(torch.stack([model.eval_transform()(data[i][0]) for i in (3, 1, 2)]))
    torch.testing.assert_close(a, expected)
    calls.clear()
    model.image_features("digits", "test", data, [1, 2], augment=True)
    model.image_features("digits", "test", data, [1, 2], augment=True)
    assert sum(calls) == 4  # recomputed every time
    with pytest.raises(ValueError, match="indices"):
        model.image_features("digits", "test", data, [len(data)])


def test_embedded_model_loads_offline_with_headroom() -> None:
    model = load_backbone("tiny-digits-clip", "embedded")
    assert model.meta.get("recipe") == "fpl_fast.data.pretrain_tiny_clip"
    data = DigitsDataset("test")
    feats = F.normalize(model.image_features("digits", "test", data), dim=-1)
    weights = model.zero_shot_weights(DIGIT_CLASSNAMES, "a photo of the digit {}.")
    acc = (feats @ weights.T).argmax(-1).eq(torch.from_numpy(data.labels)).float().mean().item()
    assert 0.40 <= acc <= 0.75, acc
    assert EMBEDDED_WEIGHTS.stat().st_size < 8 * 2**20


def test_compact_checkpoint_round_trip(tmp_path: Path) -> None:
    model = load_backbone("tiny-digits-clip").model
    emb = model.token_embedding.weight
    with torch.no_grad():
        emb.copy_(init_token_embedding(*emb.shape, seed=7, std=0.2))
        emb[[5, 9]] += 1.0  # "trained" rows
    path = tmp_path / "compact.pt"
    save_compact_checkpoint(
        model, path, model_name="tiny-digits-clip", token_seed=7, token_std=0.2, trained_rows=torch.tensor([5, 9])
    )
    loaded = load_backbone("tiny-digits-clip", str(path)).model
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3, msg=k)  # fp16 storage
    with pytest.raises(ValueError, match="trained_rows"):
        save_compact_checkpoint(
            model, path, model_name="tiny-digits-clip", token_seed=7, token_std=0.2, trained_rows=torch.tensor([5])
        )
