"""Every image tower family of open_clip's CLIP configs with the text tower fpl_fast supports runs end to end:
RN50's (open_clip's ModifiedResNet: three-conv stem, four bottleneck stages, attention pooling) and ViT-B-16's
(VisionTransformer), at random weights, each through one round of every clip mode; an RN50-architecture checkpoint in
OpenAI's format (TorchScript archive and state dict) loads offline through the local-file path.

Full size would take minutes on two CPU cores, so each architecture is built from open_clip's own config at reduced
width: RN50 keeps its four stages of 3, 4, 6 and 3 bottlenecks and its attention pool (width 8 instead of 64, 64 px
instead of 224); ViT-B-16 keeps its 16 px patches (2 layers of width 64); both get a 2-layer text tower of width 64.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import QuickGELU, VisionTransformer
from support import save_openai_files, train_job
from torch import nn

from fpl_fast.backbone.loading import load_backbone
from fpl_fast.config import RunConfig
from fpl_fast.federated.engine import ClientData, Federation
from fpl_fast.preparation import prepare

ARCHITECTURES = {"RN50": ModifiedResNet, "ViT-B-16": VisionTransformer}


def reduced_config(name: str) -> dict[str, Any]:
    """open_clip's config of ``name`` at reduced width: the image tower's structure kept (ResNet stages, ViT patch
    size), OpenAI's 64-wide attention heads (what open_clip infers from an OpenAI checkpoint)."""
    cfg = copy.deepcopy(open_clip.get_model_config(name))
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if isinstance(vision["layers"], (list, tuple)):  # ModifiedResNet: heads = width * 32 / 64
        vision.update(width=8, image_size=64)
    else:
        vision.update(width=64, layers=2, image_size=64)
    text.update(width=64, heads=1, layers=2)
    cfg["embed_dim"] = 64
    return cfg


def small(name: str) -> str:
    return f"test-small-{name}"


@pytest.fixture(scope="module", autouse=True)
def small_configs() -> Iterator[None]:
    """``test-small-<arch>`` (and a -quickgelu twin) registered with open_clip for this module."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ARCHITECTURES:
            cfg = reduced_config(name)
            mp.setitem(open_clip.factory._MODEL_CONFIGS, small(name), cfg)
            mp.setitem(open_clip.factory._MODEL_CONFIGS, f"{small(name)}-quickgelu", {**cfg, "quick_gelu": True})
        yield


BASE = RunConfig(
    pretrained=None, num_users=2, rounds=1, num_shots=2, batch_size=4, n_ctx=4, rank=2, noise_seed=5, seed=2
)


@pytest.fixture(scope="module")
def jobs(small_configs: None) -> dict[str, Any]:
    """Each architecture's backbone (random weights, seeded), class names and encoded digits, prepared once."""
    return {name: prepare(BASE.replace(model=small(name))) for name in ARCHITECTURES}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_the_reduced_configs_keep_the_architecture(jobs: dict[str, Any], name: str) -> None:
    backbone = jobs[name][0]
    visual = backbone.model.visual
    assert type(visual) is ARCHITECTURES[name]
    full = open_clip.get_model_config(name)["vision_cfg"]
    if name == "RN50":
        assert [len(getattr(visual, f"layer{i}")) for i in range(1, 5)] == full["layers"] == [3, 4, 6, 3]
        assert visual.attnpool.c_proj.out_features == backbone.embed_dim
    else:
        assert visual.conv1.kernel_size == (full["patch_size"],) * 2 == (16, 16)
    assert backbone.image_size == (64, 64)
    images = torch.rand(3, 3, 64, 64)
    feats = backbone.encode_images(images)
    assert feats.shape == (3, backbone.embed_dim) and torch.isfinite(feats).all()


@pytest.mark.parametrize("clip_mode", ["sample", "batch", "output"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_one_round_of_each_clip_mode_runs_end_to_end(
    jobs: dict[str, Any], name: str, clip_mode: str, tmp_path: Path
) -> None:
    cfg = BASE.replace(model=small(name), clip_mode=clip_mode)
    res = train_job(jobs[name], cfg, tmp_path)
    final = res["final"]
    assert min(final["steps_per_client"]) >= 1
    assert 0.0 <= final["local_acc"] <= 1.0 and final["epsilon_total"] > 0
    assert [r["round"] for r in res["rounds"]] == [1]
    assert (tmp_path / "rounds.csv").is_file() and (tmp_path / "results.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_full_size_architecture_takes_a_step_of_each_clip_mode(name: str) -> None:
    """RN50 and ViT-B-16 at full size and random weights: 224 px images to the joint width (RN50's attention pool
    ends in 1024, its text projection maps the 512-wide text tower there), then one step of every clip mode on
    synthetic image features (encoding a dataset at full size would take minutes here)."""
    torch.manual_seed(0)
    backbone = load_backbone(name, None)
    image = backbone.eval_transform()(torch.rand(3, 300, 260))
    assert image.shape == (3, 224, 224)
    feats = backbone.encode_images(image[None].expand(2, -1, -1, -1))
    assert feats.shape == (2, backbone.embed_dim) == (2, open_clip.get_model_config(name)["embed_dim"])
    gen = torch.Generator().manual_seed(0)
    D = backbone.embed_dim
    data = ClientData(
        torch.randn(16, D, generator=gen),
        torch.arange(16) % 4,
        torch.randn(8, D, generator=gen),
        torch.arange(8) % 4,
        [np.arange(8), np.arange(8, 16)],
        [np.arange(4), np.arange(4, 8)],
    )
    for clip_mode in ("sample", "batch", "output"):
        cfg = BASE.replace(model=name, clip_mode=clip_mode, batch_size=4)
        fed = Federation(cfg, backbone, ["zero", "one", "two", "three"], data, noise_local=1.0, noise_global=1.0)
        g = fed.server.global_ctx.clone()
        fed.train_step(fed.sample_clients(), server_average=True)
        assert torch.isfinite(fed.server.global_ctx).all() and not torch.equal(fed.server.global_ctx, g), clip_mode
        assert list(fed.steps_taken) == [1, 1]
        assert 0.0 <= fed.evaluate(0)["local_acc"] <= 1.0


def test_resnet_tower_in_bf16(small_configs: None) -> None:
    """open_clip's bf16: convolutions and linear layers in bf16, batch norms and the attention pool's positional
    embedding in fp32; the features come out finite."""
    model = load_backbone(small("RN50"), None, precision="bf16")
    assert model.model.visual.conv1.weight.dtype == torch.bfloat16
    feats = model.encode_images(torch.rand(2, 3, 64, 64))
    assert torch.isfinite(feats.float()).all()
    parts = model.prompt_parts(["zero", "one"], 4)
    text = model.encode_prompts(parts.assemble(torch.zeros(4, model.ctx_dim)), parts.eot_index)
    assert torch.isfinite(text.float()).all()


@pytest.fixture(scope="module")
def openai_rn_files(tmp_path_factory: pytest.TempPathFactory, small_configs: None) -> dict[str, Path]:
    """An RN50-architecture CLIP at random weights written as OpenAI distributes it (a TorchScript archive with
    OpenAI's three entries) and as its state dict with those entries; the source's state dict to compare."""
    torch.manual_seed(0)
    src = open_clip.create_model(small("RN50"), force_quick_gelu=True).eval()
    with torch.no_grad():
        for name, p in src.named_parameters():
            if name.endswith("mlp.c_fc.weight"):
                p.mul_(6.0)  # larger MLP pre-activations: QuickGELU and GELU then differ clearly
            p.copy_(p.half().float())  # OpenAI's files are fp16; the loaders round to fp16, so keep exact values
        for name, b in src.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                b.copy_((b + torch.rand_like(b)).half().float())  # batch-norm statistics that are not the defaults
    out = tmp_path_factory.mktemp("openai-rn")
    state = src.state_dict()
    markers = {"input_resolution": 64, "context_length": 77, "vocab_size": 49408}
    paths = {"source": out / "source.pt", "jit": out / "RN50.pt", "state_dict": out / "rn50_state_dict.pt"}
    torch.save(state, paths["source"])
    save_openai_files(src, markers, paths["state_dict"], paths["jit"])
    assert set(torch.jit.load(str(paths["jit"])).state_dict()) >= set(state) - {"attn_mask"}
    return paths


@pytest.mark.parametrize("kind", ["jit", "state_dict"])
def test_an_openai_resnet_checkpoint_loads_offline(openai_rn_files: dict[str, Path], kind: str) -> None:
    loaded = load_backbone(small("RN50"), str(openai_rn_files[kind]))
    assert type(loaded.model.visual) is ModifiedResNet
    assert all(type(block.mlp.gelu) is QuickGELU for block in loaded.model.transformer.resblocks)
    source = torch.load(openai_rn_files["source"], weights_only=True)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, source[key]), key
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    texts = ["a photo of a dog.", "zero"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reference = open_clip.load_openai_model(str(openai_rn_files[kind]), precision="fp32", device="cpu")
    with torch.no_grad():
        want_image = reference.encode_image(images)
        want_text = reference.encode_text(open_clip.get_tokenizer(small("RN50"))(texts))
    torch.testing.assert_close(loaded.encode_images(images), want_image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.encode_text(texts), want_text, rtol=1e-5, atol=1e-5)
    # The same weights under GELU (what a plain build would use) give other text features: QuickGELU is in force.
    gelu = open_clip.create_model(small("RN50")).eval()
    gelu.load_state_dict(source)
    with torch.no_grad():
        gelu_text = gelu.encode_text(open_clip.get_tokenizer(small("RN50"))(texts))
    assert (want_text - gelu_text).norm() > 1e-3 * want_text.norm()
    assert not any(isinstance(m, nn.GELU) for m in loaded.model.modules())
