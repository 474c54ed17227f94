"""The shared-prefix text path against the full path, in every place that encodes class prompts.

The two paths compute the same function up to floating-point summation order, so in float64 they agree to ~1e-13;
the tests use the trained tiny CLIP, a randomly initialised ViT-B-16-shaped tower (width 512, 8 heads, 2 layers) and a
causal tower of open_clip's custom blocks (qk-norm), K clients with different contexts, class names of one token and
of the longest length that fits, and n_ctx 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from support import DEVICES, train_job

from fpl_fast.backbone.loading import load_backbone
from fpl_fast.backbone.model import FrozenCLIP
from fpl_fast.backbone.text_tower import SuffixPack
from fpl_fast.config import RunConfig
from fpl_fast.federated import client as client_module
from fpl_fast.federated.client import ClientData
from fpl_fast.federated.engine import Federation
from fpl_fast.privacy.noise_stream import NoiseStream
from fpl_fast.prompts.class_prompts import ClassPrompts

N_CTX = 16
LONGEST = " ".join(["dog"] * (77 - 3 - N_CTX))  # SOS + 16 context + 58 name tokens + '.' + EOT = 77 tokens
CLASSES = ["zero", "golden_retriever", "hot air balloon", "x", LONGEST, "one"]
EXACT = {"rtol": 1e-11, "atol": 1e-12}

_TOWERS = {
    # ViT-B-16's text tower shape (width 512, 8 heads, context 77) with 2 of its 12 layers, random weights.
    "vitb16-shaped": {"width": 512, "heads": 8, "layers": 2},
    # A causal tower of open_clip's custom blocks (qk-norm): the shared path runs them with an explicit mask.
    "qknorm-causal": {"width": 64, "heads": 2, "layers": 2, "qk_norm": True},
}


def _tower_config(tmp: Path, name: str, text: dict) -> None:
    cfg = {
        "embed_dim": text["width"],
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, **text},
    }
    (tmp / f"{name}.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FrozenCLIP]:
    """float64 backbones: the trained tiny CLIP, the ViT-B-16-shaped tower, the qk-norm tower, a bidirectional one."""
    tmp = tmp_path_factory.mktemp("configs")
    for name, text in _TOWERS.items():
        _tower_config(tmp, f"test-{name}", text)
    open_clip.add_model_config(tmp)
    torch.manual_seed(0)
    out = {"tiny": load_backbone("tiny-digits-clip", "embedded").double()}
    out |= {name: load_backbone(f"test-{name}").double() for name in _TOWERS}
    out["bidir"] = load_backbone("tiny-bidir-clip").double()
    return out


def _contexts(K: int, n_ctx: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(K, n_ctx, d, generator=gen, dtype=torch.float64) * 0.3  # clients far apart


@pytest.mark.parametrize("tower", ["tiny", "vitb16-shaped", "qknorm-causal"])
@pytest.mark.parametrize("n_ctx", [N_CTX, 3, 0])
def test_text_features_equal_the_full_path(towers, tower: str, n_ctx: int) -> None:
    bb = towers[tower]
    shared = ClassPrompts(bb, CLASSES, n_ctx, "shared")
    full = ClassPrompts(bb, CLASSES, n_ctx, "full")
    assert (shared.path, full.path) == ("shared", "full")
    ctx = _contexts(4, n_ctx, bb.ctx_dim)
    for traceable in (False, True):
        a = shared.features(ctx, traceable=traceable)
        b = full.features(ctx, traceable=traceable)
        assert a.dtype == torch.float64 and a.shape == (4, len(CLASSES), bb.embed_dim)
        torch.testing.assert_close(a, b, **EXACT)
    assert n_ctx == 0 or not torch.allclose(a[0], a[1])  # different contexts give different features
    names = [len(bb.tokenizer.encode(c.replace("_", " "))) for c in CLASSES]
    assert shared.rows_per_client == 1 + n_ctx + sum(n + 2 for n in names)  # name tokens, '.', EOT
    # The longest name fills the 77-token context at n_ctx 16.
    assert full.rows_per_client == len(CLASSES) * full.seq_len == len(CLASSES) * (77 - N_CTX + n_ctx)


def test_states_and_packing_keep_every_row_at_its_place(towers) -> None:
    """encode_shared's ln_final states: the prefix rows and each sequence's suffix rows equal the full path's
    states at the same absolute positions (names of equal length share a bucket, in any order)."""
    bb = towers["tiny"]
    names = ["one", "hot air balloon", "two", "golden retriever", "three"]
    parts = bb.prompt_parts(names, 4)
    pack = bb.suffix_pack(parts)
    assert [n for _, n, _ in pack.buckets] == [3, 1, 1]  # 3 one-token names, then the 2- and 3-token ones
    ctx = _contexts(2, 4, bb.ctx_dim)
    prefix = torch.cat([parts.prefix[:1].expand(2, 1, -1), ctx], dim=1)
    feats, states = bb.encode_shared(prefix, pack, states=True)
    tower = bb._tower
    captured: list[torch.Tensor] = []
    hook = tower.ln_final.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        want = torch.stack([bb.encode_prompts(parts.assemble(c), parts.eot_index, seq_len=parts.seq_len) for c in ctx])
    finally:
        hook.remove()
    torch.testing.assert_close(feats, want, **EXACT)
    full_states = torch.stack(captured)  # (2, n_seq, seq_len, width)
    torch.testing.assert_close(states[:, : pack.prefix_len], full_states[:, 0, : pack.prefix_len], **EXACT)
    for c, S in enumerate(pack.lengths):
        rows = states[:, int(pack.suffix_start[c]) : int(pack.suffix_start[c]) + S]
        torch.testing.assert_close(rows, full_states[:, c, pack.prefix_len : pack.prefix_len + S], **EXACT)


@pytest.mark.parametrize("tower", ["tiny", "vitb16-shaped"])
def test_plain_texts_and_zero_shot_weights_equal_the_full_path(towers, tower: str) -> None:
    """encode_text encodes the texts' common leading tokens once (a template's words before the class name, or just
    SOT), including texts that are all the same and a single text."""
    bb = towers[tower]
    cases = [
        [f"a photo of a {c.replace('_', ' ')}." for c in CLASSES],
        ["zero", "a much longer sentence, with punctuation", "x"],
        ["the same text", "the same text"],
        ["one text alone"],
    ]
    for texts in cases:
        torch.testing.assert_close(bb.encode_text(texts), bb.encode_text(texts, text_path="full"), **EXACT)
    templates = ["a photo of a {}.", "itap of the {}"]
    want = bb.zero_shot_weights(CLASSES, templates, text_path="full")
    torch.testing.assert_close(bb.zero_shot_weights(CLASSES, templates), want, **EXACT)
    with pytest.raises(ValueError, match="text_path must be one of shared, full"):
        bb.encode_text(["x"], text_path="packed")


def test_a_tower_that_is_not_causal_takes_the_full_path(towers) -> None:
    bb = towers["bidir"]
    text = ClassPrompts(bb, CLASSES[:3], 4, "shared")
    assert text.path == "full" and text.rows_per_client == text.full_rows_per_client
    pack = towers["tiny"].suffix_pack(towers["tiny"].prompt_parts(CLASSES[:3], 4))
    with pytest.raises(ValueError, match="causal"):
        bb.encode_shared(torch.zeros(1, 5, bb.ctx_dim, dtype=torch.float64), pack)


def test_bad_packs_and_prefixes_are_refused_in_one_line(towers) -> None:
    bb = towers["tiny"]
    with pytest.raises(ValueError, match="at least one sequence"):
        SuffixPack.build([], 3)
    with pytest.raises(ValueError, match="prefix_len must be >= 1"):
        SuffixPack.build([torch.zeros(2, 64)], 0)
    with pytest.raises(ValueError, match="pooled row"):
        SuffixPack.build([torch.zeros(2, 64), torch.zeros(0, 64)], 3)
    pack = SuffixPack.build([torch.zeros(2, 64, dtype=torch.float64)], 3)
    with pytest.raises(ValueError, match="prefix has 4 rows, the suffix pack was built for 3"):
        bb.encode_shared(torch.zeros(1, 4, 64, dtype=torch.float64), pack)
    with pytest.raises(ValueError, match=r"prefix must be \(N, P, 64\)"):
        bb.encode_shared(torch.zeros(4, 64, dtype=torch.float64), pack)
    with pytest.raises(ValueError, match="text_path must be one of shared, full"):
        ClassPrompts(bb, CLASSES, 4, "packed")


# ------------------------------------------------------------------------------------------------------------------
# The DP-FPL step: batch-mean, per-sample and output-mode gradients, and a whole step
# ------------------------------------------------------------------------------------------------------------------
def _data(D: int, n_cls: int, K: int, per_client: int = 12) -> ClientData:
    gen = torch.Generator().manual_seed(1)
    n = K * per_client
    return ClientData(
        train_feats=torch.randn(n, D, generator=gen),
        train_labels=torch.randint(0, n_cls, (n,), generator=gen),
        test_feats=torch.randn(K, D, generator=gen),
        test_labels=torch.randint(0, n_cls, (K,), generator=gen),
        train_idx=[np.asarray(ix) for ix in np.array_split(np.arange(n), K)],
        test_idx=[np.asarray(ix) for ix in np.array_split(np.arange(K), K)],
    )


def _pair(bb: FrozenCLIP, cfg: RunConfig, classes: list[str] = CLASSES) -> tuple[Federation, Federation]:
    """The same federation on the shared and on the full path (same initialisation, data and noise keys)."""
    data = _data(bb.embed_dim, len(classes), cfg.num_users)
    return tuple(  # type: ignore[return-value]
        Federation(cfg.replace(text_path=p), bb, classes, data, noise_local=1.0, noise_global=1.0)
        for p in ("shared", "full")
    )


CFG = RunConfig(num_users=3, batch_size=6, noise_seed=5, n_ctx=N_CTX, norm_thresh=0.05)


def _step_inputs(fed: Federation):
    rows = torch.arange(fed.cfg.num_users)
    factors = fed.learner.factors(rows, seed=[11, 12, 13], offset=[0, 0, 0])
    ctx = fed.learner.context(rows, factors).detach().double() + _contexts(3, N_CTX, fed.backbone.ctx_dim)
    feats, labels, mask = fed.clients.batch(rows)
    return ctx, feats.double(), labels, mask.double()


@pytest.mark.parametrize("tower", ["tiny", "vitb16-shaped"])
@pytest.mark.parametrize("per_client", [False, True])
def test_batch_mean_and_per_sample_gradients_equal_the_full_path(
    towers, tower: str, per_client: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-sample gradients in one vjp for all clients (small towers), or one per client (a budget that one sample
    of all clients exceeds, as ViT-B-16 at the paper setting does), chunked or not, against the full path's."""
    shared, full = _pair(towers[tower], CFG)
    if per_client:
        monkeypatch.setattr(client_module, "_CHUNK_FLOATS", {"cpu": 2 * shared.clients._lane(1), "cuda": 1})
    assert shared.clients.pulls_back_per_client(3) == per_client
    ctx, feats, labels, mask = _step_inputs(shared)
    mask[1, -2:] = 0  # Poisson batches of different sizes: padded rows
    g_s, loss_s = shared.clients.batch_mean_grad(ctx, feats, labels, mask)
    g_f, loss_f = full.clients.batch_mean_grad(ctx, feats, labels, mask)
    assert g_s.dtype == torch.float64 and g_s.abs().max() > 0
    torch.testing.assert_close(g_s, g_f, **EXACT)
    torch.testing.assert_close(loss_s, loss_f, **EXACT)
    want, want_loss = full.clients.per_sample_grads(ctx, feats, labels, mask)
    assert want.shape == (*mask.shape, N_CTX, towers[tower].ctx_dim) and bool((want[mask == 0] == 0).all())
    for chunk in (None, 1, 4):
        shared.clients.cfg = CFG.replace(chunk_size=chunk)
        got, got_loss = shared.clients.per_sample_grads(ctx, feats, labels, mask)
        torch.testing.assert_close(got, want, **EXACT)
        torch.testing.assert_close(got_loss, want_loss, **EXACT)


def test_output_mode_release_gradient_equals_the_full_path(towers) -> None:
    cfg = CFG.replace(clip_mode="output", output_clip=0.1)
    shared, full = _pair(towers["tiny"], cfg)
    ctx, feats, labels, mask = _step_inputs(shared)
    keys = [(1000 + k, 8 * k) for k in range(3)]
    g_s, res_s = shared.clients.output_release_grad(ctx, feats, labels, mask, [NoiseStream(*k) for k in keys])
    g_f, res_f = full.clients.output_release_grad(ctx, feats, labels, mask, [NoiseStream(*k) for k in keys])
    torch.testing.assert_close(res_s.release, res_f.release, **EXACT)  # same features: the same release
    torch.testing.assert_close(g_s, g_f, **EXACT)
    assert g_s.abs().max() > 0


def test_one_examples_gradient_does_not_depend_on_the_rest_of_its_batch(towers) -> None:
    shared, _ = _pair(towers["tiny"], CFG)
    ctx, feats, labels, mask = _step_inputs(shared)
    before, _ = shared.clients.per_sample_grads(ctx, feats, labels, mask)
    other = feats.clone()
    other[:, 1:] = torch.randn_like(other[:, 1:])  # every example but the first of each client changes
    relabel = (labels + 1) % len(CLASSES)
    relabel[:, 0] = labels[:, 0]
    after, _ = shared.clients.per_sample_grads(ctx, other, relabel, mask)
    torch.testing.assert_close(after[:, 0], before[:, 0], **EXACT)
    assert not torch.allclose(after[:, 1:], before[:, 1:])


@pytest.mark.parametrize("clip_mode", ["sample", "batch", "output"])
def test_a_whole_dp_fpl_step_gives_the_same_prompts(towers, clip_mode: str) -> None:
    """One step with --noise-seed: the same noise and clipping on the same gradients (the encoder in float64, the
    prompts and the mechanism in float32 as always), so the same prompts."""
    cfg = CFG.replace(clip_mode=clip_mode, sampling="shuffle" if clip_mode == "batch" else "poisson")
    shared, full = _pair(towers["tiny"], cfg)
    rows = torch.arange(3)
    st_s = shared.train_step(rows, server_average=True)
    st_f = full.train_step(rows, server_average=True)
    assert st_s.batch_sizes == st_f.batch_sizes and st_s.clipped_fraction == pytest.approx(st_f.clipped_fraction)
    torch.testing.assert_close(shared.server.global_ctx, full.server.global_ctx, rtol=1e-6, atol=1e-9)
    for key in shared.learner.local:
        torch.testing.assert_close(shared.learner.local[key], full.learner.local[key], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(shared.client_text_features(3), full.client_text_features(3), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------------------------
# The default job in float32, bf16, and the methods
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_default_job_in_float32_gives_the_full_paths_accuracies(tmp_path: Path, embedded_job) -> None:
    cfg = RunConfig(rounds=3, noise_seed=7)
    job = backbone, classnames, data = embedded_job(cfg)
    feds = {}
    for path in ("shared", "full"):
        one = Federation(cfg.replace(text_path=path), backbone, classnames, data, noise_local=1.5, noise_global=1.5)
        one.train_step(torch.arange(cfg.num_users), server_average=True)
        feds[path] = one
    pairs = [(feds["shared"].learner.local[k], feds["full"].learner.local[k]) for k in feds["shared"].learner.local]
    pairs.append((feds["shared"].server.global_ctx, feds["full"].server.global_ctx))
    for a, b in pairs:  # the prompts after one step, to 1e-5 relative (in norm: entries near 0 differ by ~1e-12)
        assert float((a - b).norm() / b.norm()) < 1e-5

    runs = {}
    for path in ("shared", "full"):
        runs[path] = train_job(job, cfg.replace(text_path=path), tmp_path / path)
    shared, full = runs["shared"]["final"], runs["full"]["final"]
    assert shared["text_path"] == "shared" and full["text_path"] == "full"
    assert shared["text_rows_per_client"] < full["text_rows_per_client"] == full["text_full_rows_per_client"]
    assert json.loads((tmp_path / "shared" / "results.json").read_text())["config"]["text_path"] == "shared"
    assert len(runs["shared"]["rounds"]) == 3
    for a, b in zip(runs["shared"]["rounds"], runs["full"]["rounds"], strict=True):
        assert abs(a["local_acc"] - b["local_acc"]) <= 0.01 and abs(a["neighbor_acc"] - b["neighbor_acc"]) <= 0.01


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_shared_path_is_as_close_to_float64_as_the_full_path(device: str) -> None:
    bf16 = load_backbone("tiny-digits-clip", "embedded", precision="bf16", device=device)
    exact = load_backbone("tiny-digits-clip", "embedded", device=device).double()
    ctx = _contexts(3, N_CTX, bf16.ctx_dim).to(device)
    want = ClassPrompts(exact, CLASSES, N_CTX, "full").features(ctx)
    errs = {}
    for path in ("shared", "full"):
        got = ClassPrompts(bf16, CLASSES, N_CTX, path).features(ctx.float())
        assert got.dtype == torch.float32
        errs[path] = float((got.double() - want).norm() / want.norm())
    assert errs["shared"] < 0.05 and errs["full"] < 0.05
    assert errs["shared"] < 2 * errs["full"] + 1e-3  # bf16 rounding, not a different function


def test_feddtpt_oracle_scores_the_same_on_both_paths(towers) -> None:
    from fpl_fast.methods.feddtpt import Oracle

    bb = towers["tiny"]
    oracles = {p: Oracle(bb, CLASSES[:4], text_path=p) for p in ("shared", "full")}
    assert oracles["shared"]._shared and not oracles["full"]._shared
    ids = bb.tokenizer.encode("a blurry photo of a")
    prompts = [tuple(ids), tuple(ids[:2]), tuple(ids[1:3]), (ids[0],)]  # prompts of three lengths
    for o in oracles.values():
        o._encode(prompts)
    for p in prompts:
        torch.testing.assert_close(oracles["shared"]._text[p], oracles["full"]._text[p], **EXACT)
    assert oracles["shared"].text_encodings == oracles["full"].text_encodings == 4 * len(CLASSES[:4])


def test_rapt_reads_the_same_features_and_plain_token_states_on_both_paths(towers) -> None:
    from fpl_fast.methods import rapt
    from fpl_fast.methods.rapt import RaptModel, build_sequences

    bb = towers["tiny"]
    rec_ids = rapt.reconstruction_vocab(bb, 50)
    models = {}
    for path in ("shared", "full"):
        models[path] = RaptModel(
            bb,
            n_cls=3,
            n_prompt=4,
            n_plain=3,
            rec_vocab_size=rec_ids.numel(),
            rec_dim=8,
            task_head="linear",
            generator=torch.Generator().manual_seed(0),
            text_path=path,
        )  # the heads and the prompt in float32, as always; the tower in float64
    body = [torch.cat([rec_ids[:3], torch.tensor(bb.tokenizer.encode(t))]) for t in ["rain", "a long song today", "x"]]
    tokens, eot = build_sequences(body, *rapt.special_ids(bb), 4)
    close = {"rtol": 1e-6, "atol": 1e-7}  # float64 encoder states cast to the float32 heads
    out = {p: m(tokens, eot) for p, m in models.items()}
    for a, b in zip(out["shared"], out["full"], strict=True):
        torch.testing.assert_close(a, b, **close)
    grads = {}
    for p, m in models.items():
        logits, rec = m(tokens, eot)
        (logits.square().sum() + rec.square().sum()).backward()
        grads[p] = m.prompt.grad
    assert grads["shared"].abs().max() > 0
    torch.testing.assert_close(grads["shared"], grads["full"], **close)
