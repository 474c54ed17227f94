"""Local OpenAI CLIP checkpoint files (TorchScript archive, state dict) load with QuickGELU.

A tiny CLIP in OpenAI's layout at random weights goes through the same loading path as OpenAI's ViT-B-16.pt: it is
written as a TorchScript archive (as OpenAI distributes CLIP, with its ``input_resolution``/``context_length``/
``vocab_size`` entries) and as state dicts, and loaded through :func:`load_backbone` with the file as ``pretrained``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from support import save_openai_files
from torch import nn

from fpl_fast.backbone.loading import load_backbone
from fpl_fast.backbone.model import FrozenCLIP

NAME = "test-openai-tiny"
_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}
_MARKERS = {"input_resolution": 32, "context_length": 77, "vocab_size": 49408}
TEXTS = ["a photo of a dog.", "zero", "hot air balloon"]


@pytest.fixture(scope="module", autouse=True)
def tiny_configs() -> Iterator[None]:
    """Register the tiny OpenAI-shaped config (width 64: OpenAI's 64-wide heads) and its -quickgelu twin."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(open_clip.factory._MODEL_CONFIGS, NAME, copy.deepcopy(_CFG))
        mp.setitem(open_clip.factory._MODEL_CONFIGS, f"{NAME}-quickgelu", {**copy.deepcopy(_CFG), "quick_gelu": True})
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_configs: None) -> dict[str, Path]:
    torch.manual_seed(0)
    src = open_clip.create_model(NAME, force_quick_gelu=True).eval()
    with torch.no_grad():
        for name, p in src.named_parameters():
            if name.endswith("mlp.c_fc.weight"):
                p.mul_(6.0)  # larger MLP pre-activations: QuickGELU and GELU then differ clearly
            p.copy_(p.half().float())  # OpenAI's files are fp16; the loaders round to fp16, so keep exact values
    out = tmp_path_factory.mktemp("openai")
    state = src.state_dict()
    paths = {
        "source": out / "source.pt",
        "jit": out / "ViT-tiny.pt",
        "state_dict": out / "openai_state_dict.pt",
        "clip_layout": out / "clip_layout.pt",
        "open_clip_wrapped": out / "epoch_1.pt",
    }
    torch.save(state, paths["source"])
    torch.save(state, paths["clip_layout"])

    save_openai_files(src, _MARKERS, paths["state_dict"], paths["jit"])
    assert set(torch.jit.load(str(paths["jit"])).state_dict()) == set(state) | set(_MARKERS)

    # open_clip's own training checkpoint of a GELU model with this architecture.
    torch.manual_seed(1)
    gelu = open_clip.create_model(NAME)
    torch.save(
        {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in gelu.state_dict().items()}}, paths["open_clip_wrapped"]
    )
    return paths


def _images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _activations(model: nn.Module) -> list[type[nn.Module]]:
    blocks = [*model.visual.transformer.resblocks, *model.transformer.resblocks]
    return [type(block.mlp.gelu) for block in blocks]


def _features(model: FrozenCLIP) -> tuple[torch.Tensor, torch.Tensor]:
    return model.encode_images(_images()), model.encode_text(TEXTS)


def _open_clip_features(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = open_clip.get_tokenizer(NAME)(TEXTS)
    with torch.no_grad():
        return model.encode_image(_images()), model.encode_text(tokens)


def _gelu_build(state_path: Path) -> nn.Module:
    gelu = open_clip.create_model(NAME).eval()
    gelu.load_state_dict(torch.load(state_path, weights_only=True))
    return gelu


@pytest.mark.parametrize("kind", ["jit", "state_dict"])
def test_openai_file_loads_with_quick_gelu(files: dict[str, Path], kind: str) -> None:
    loaded = load_backbone(NAME, str(files[kind]))
    acts = _activations(loaded.model)
    assert acts == [QuickGELU] * 4
    assert not any(isinstance(m, nn.GELU) for m in loaded.model.modules())
    source = torch.load(files["source"], weights_only=True)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, source[key]), key

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reference = open_clip.load_openai_model(str(files[kind]), precision="fp32", device="cpu")
    assert _activations(reference) == [QuickGELU] * 4
    image, text = _features(loaded)
    ref_image, ref_text = _open_clip_features(reference)
    torch.testing.assert_close(image, ref_image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text, ref_text, rtol=1e-5, atol=1e-5)

    # The plain-GELU build of the same weights (the bug) gives features far outside the tolerance above.
    gelu_image, gelu_text = _open_clip_features(_gelu_build(files["source"]))
    assert (image - gelu_image).norm() > 1e-3 * image.norm()
    assert (text - gelu_text).norm() > 1e-3 * text.norm()


def test_openai_file_bf16(files: dict[str, Path]) -> None:
    loaded = load_backbone(NAME, str(files["jit"]), precision="bf16")
    assert _activations(loaded.model) == [QuickGELU] * 4
    assert loaded.model.visual.conv1.weight.dtype == torch.bfloat16
    assert loaded.model.ln_final.weight.dtype == torch.float32


def test_bare_state_dict_without_openai_entries_keeps_config_activation(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The key layout alone is open_clip's own CLIP layout too: the config decides (GELU here), silently for a
    # model without an `openai` tag ...
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = load_backbone(NAME, str(files["clip_layout"]))
    assert _activations(loaded.model) == [nn.GELU] * 4
    image, text = _features(loaded)
    gelu_image, gelu_text = _open_clip_features(_gelu_build(files["source"]))
    torch.testing.assert_close(image, gelu_image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text, gelu_text, rtol=1e-5, atol=1e-5)

    # ... the -quickgelu config gives the OpenAI path's features ...
    quick = load_backbone(f"{NAME}-quickgelu", str(files["clip_layout"]))
    assert _activations(quick.model) == [QuickGELU] * 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reference = open_clip.load_openai_model(str(files["jit"]), precision="fp32", device="cpu")
    for got, want in zip(_features(quick), _open_clip_features(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # ... and a GELU config of an architecture OpenAI released warns that it may be OpenAI's weights.
    real = open_clip.get_pretrained_cfg

    def with_openai_tag(model: str, tag: str) -> dict[str, object]:
        return {"quick_gelu": True} if (model, tag) == (NAME, "openai") else real(model, tag)

    monkeypatch.setattr(open_clip, "get_pretrained_cfg", with_openai_tag)
    with pytest.warns(UserWarning, match=rf"GELU of '{NAME}'.*'{NAME}-quickgelu'"):
        warned = load_backbone(NAME, str(files["clip_layout"]))
    assert _activations(warned.model) == [nn.GELU] * 4


def test_open_clip_checkpoint_keeps_its_activation(files: dict[str, Path]) -> None:
    loaded = load_backbone(NAME, str(files["open_clip_wrapped"]))
    assert _activations(loaded.model) == [nn.GELU] * 4
    state = torch.load(files["open_clip_wrapped"], weights_only=True)["state_dict"]
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[f"module.{key}"]), key


def test_openai_file_into_another_architecture_is_refused(files: dict[str, Path]) -> None:
    with pytest.raises(RuntimeError, match=r"could not load weights .*ViT-tiny\.pt.*'tiny-bidir-clip'") as info:
        load_backbone("tiny-bidir-clip", str(files["jit"]))
    assert "\n" not in str(info.value)
