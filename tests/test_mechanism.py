"""Local and server Gaussian mechanisms (privacy/clipping, global_noise, sensitivity, noise_stream): noise std vs what
the accountant is told, the noise stream."""

from __future__ import annotations

import math

import pytest
import torch

from fpl_fast.ops import reference
from fpl_fast.privacy import clipping
from fpl_fast.privacy.clipping import LocalDP, privatize_local
from fpl_fast.privacy.global_noise import server_aggregate_global
from fpl_fast.privacy.noise_stream import NoiseStream
from fpl_fast.privacy.sensitivity import accountant_noise_multiplier, global_accountant_noise_multiplier

K, B, N_CTX, D, R = 12, 8, 16, 64, 8


def factors(k: int = K, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(k, N_CTX, R, generator=gen, dtype=dtype))[0]  # orthonormal columns
    v = torch.linalg.qr(torch.randn(k, D, R, generator=gen, dtype=dtype))[0].transpose(1, 2)
    return u, v


def streams(seed: int, k: int = K) -> list[NoiseStream]:
    """One noise stream per client, as every client holds its own."""
    return [NoiseStream(seed * 1000 + j) for j in range(k)]


def assert_std(x: torch.Tensor, std: float) -> None:
    """Empirical std of n i.i.d. N(0, std^2) draws: var/std^2 has sd sqrt(2/n); allow 6 of them
    (and |mean| < 6 std/sqrt(n)); a seeded run is deterministic, the bound says why it is not luck."""
    n = x.numel()
    ratio = x.double().pow(2).mean().item() / std**2
    assert abs(ratio - 1) < 6 * math.sqrt(2 / n), (ratio, n)
    assert abs(x.double().mean().item()) < 6 * std / math.sqrt(n)


def one_example_shift(cfg: LocalDP, lowrank: bool = True) -> float:
    """Largest change one example makes to the local release: a single huge gradient, no noise."""
    huge = torch.full((1, 1, N_CTX, D), 1e6, dtype=torch.float64)
    u, v = factors(1)
    quiet = LocalDP(clip_norm=cfg.clip_norm, noise_multiplier=0.0, joint_uv=cfg.joint_uv)
    res = privatize_local(huge, u if lowrank else None, v if lowrank else None, quiet, streams(0, 1), batch_size=B)
    parts = [res.grad_u, res.grad_v] if lowrank else [res.grad_local]
    return math.sqrt(sum(p.pow(2).sum().item() for p in parts))


@pytest.mark.parametrize("joint_uv", [True, False])
def test_local_noise_std_is_what_the_accountant_is_told(joint_uv):
    cfg = LocalDP(clip_norm=2.5, noise_multiplier=1.3, joint_uv=joint_uv)
    u, v = factors()
    zeros = torch.zeros(K, B, N_CTX, D, dtype=torch.float64)
    res = privatize_local(zeros, u, v, cfg, streams(123))
    noise = torch.cat([res.grad_u.flatten(), res.grad_v.flatten()])
    assert noise.numel() == reference.dp_noise_numel(K, N_CTX, D, R)  # 12 * 640 = 7680 draws
    assert_std(noise, cfg.noise_multiplier * cfg.clip_norm / B)
    assert res.noise_std == pytest.approx(cfg.noise_multiplier * cfg.clip_norm / B)
    # noise std / one example's largest shift = the multiplier handed to the accountant
    shift = one_example_shift(cfg)
    assert shift == pytest.approx(cfg.clip_norm / B * (1 if joint_uv else math.sqrt(2)), rel=1e-6)
    assert res.noise_std / shift == pytest.approx(accountant_noise_multiplier(cfg), rel=1e-6)


def test_fedotp_full_local_prompt_noise():
    cfg = LocalDP(clip_norm=1.0, noise_multiplier=0.7, joint_uv=False)
    zeros = torch.zeros(K, B, N_CTX, D, dtype=torch.float64)
    res = privatize_local(zeros, None, None, cfg, streams(5))
    assert res.grad_u is None and res.grad_v is None and res.grad_local.shape == (K, N_CTX, D)
    assert_std(res.grad_local, 0.7 / B)
    # joint_uv does not matter without factors: the multiplier is sigma_l
    assert accountant_noise_multiplier(cfg, lowrank=False) == 0.7
    assert res.noise_std / one_example_shift(cfg, lowrank=False) == pytest.approx(0.7, rel=1e-6)


def test_expected_batch_size_divides_noise():
    cfg = LocalDP(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=20.0)
    u, v = factors()
    res = privatize_local(torch.zeros(K, B, N_CTX, D, dtype=torch.float64), u, v, cfg, streams(9))
    assert res.batch_size == 20.0
    assert_std(torch.cat([res.grad_u.flatten(), res.grad_v.flatten()]), 1.0 / 20)


def test_server_noise_std():
    n_clients, b, C, sigma_g = 5, 32, 10.0, 0.8
    grads = torch.zeros(n_clients, N_CTX, 512, dtype=torch.float64)
    stream = NoiseStream(77)
    out = server_aggregate_global(grads, clip_norm=C, noise_multiplier=sigma_g, batch_size=b, stream=stream)
    assert out.shape == (N_CTX, 512) and out.dtype == torch.float64
    std = sigma_g * C / (b * n_clients)
    assert_std(out, std)  # 8192 draws
    assert stream.offset == NoiseStream.counters(N_CTX * 512)
    # one example moves the mean by at most C / (b K): the multiplier is sigma_g
    assert std / (C / (b * n_clients)) == pytest.approx(global_accountant_noise_multiplier(sigma_g))


def test_server_mean_without_noise_and_reproducible():
    grads = torch.randn(3, N_CTX, D, dtype=torch.float64)
    kw = {"clip_norm": 1.0, "batch_size": 4}
    plain = server_aggregate_global(grads, noise_multiplier=0.0, stream=NoiseStream(1), **kw)
    torch.testing.assert_close(plain, grads.mean(0))
    a = server_aggregate_global(grads, noise_multiplier=1.0, stream=NoiseStream(1), **kw)
    b = server_aggregate_global(grads, noise_multiplier=1.0, stream=NoiseStream(1), **kw)
    assert torch.equal(a, b) and not torch.equal(a, plain)


def test_noise_stream_never_reuses_counters():
    stream = NoiseStream(2024)
    sizes = [5, 4, 1, 640 * 3, 0, 7, 3]
    spans, draws = [], []
    for n in sizes:
        seed, offset = stream.take(n)
        assert seed == 2024
        spans.append((offset, offset + NoiseStream.counters(n)))
        draws.append(reference.philox_normal(seed, offset, n))
    assert all(end == nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))  # contiguous, disjoint
    assert stream.offset == sum(math.ceil(n / 4) for n in sizes)
    values = torch.cat(draws)
    assert values.unique().numel() == values.numel()  # no normal handed out twice


def test_noise_stream_state_round_trip():
    a = NoiseStream(11)
    a.take(37)
    saved, saved_dict = a.state(), a.state_dict()
    first = a.normal(100)
    b = NoiseStream.from_state(saved)
    c = NoiseStream(0)
    c.load_state_dict(saved_dict)
    assert torch.equal(b.normal(100), first) and torch.equal(c.normal(100), first)
    assert a.state() == b.state() == c.state()


def test_noise_stream_from_generator():
    s1 = NoiseStream(torch.Generator().manual_seed(42))
    s2 = NoiseStream(torch.Generator().manual_seed(42))
    s3 = NoiseStream(torch.Generator().manual_seed(43))
    assert s1.state() == s2.state() and s1.seed != s3.seed
    with pytest.raises(ValueError, match="seed must be in"):
        NoiseStream(-1)
    with pytest.raises(ValueError, match="generator must be a torch.Generator or an int seed, got str"):
        NoiseStream("7")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="numel must be an integer >= 0, got -3"):
        s1.take(-3)


def test_privatize_local_uses_and_advances_the_stream():
    cfg = LocalDP(clip_norm=1.0, noise_multiplier=0.5)
    u, v = factors()
    grad = torch.randn(K, B, N_CTX, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    own = streams(99)
    r1 = privatize_local(grad, u, v, cfg, own)
    numel = reference.dp_noise_numel(1, N_CTX, D, R)  # per client, from its own stream
    assert all(s.offset == NoiseStream.counters(numel) for s in own)
    want = reference.dp_lowrank_clip_noise(grad, u, v, 1.0, 0.5, [s.seed for s in own], [0] * K)
    for got, ref in zip((r1.grad_u, r1.grad_v, r1.grad_global, r1.norms), want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-6)
    r2 = privatize_local(grad, u, v, cfg, own)
    assert not torch.allclose(r1.grad_u, r2.grad_u)  # fresh noise on the next call
    torch.testing.assert_close(r1.grad_global, r2.grad_global)  # the global part carries no noise
    # no noise drawn: the stream does not move
    privatize_local(grad, u, v, LocalDP(clip_norm=1.0, noise_multiplier=0.0), own)
    privatize_local(grad, None, None, cfg, own, local=False)
    assert all(s.offset == 2 * NoiseStream.counters(numel) for s in own)


def test_a_clients_noise_does_not_depend_on_who_else_takes_part():
    cfg = LocalDP(clip_norm=1.0, noise_multiplier=0.5)
    u, v = factors()
    grad = torch.randn(K, B, N_CTX, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    everyone = privatize_local(grad, u, v, cfg, streams(7))
    some = [0, 5, 11]
    own = streams(7)
    part = privatize_local(grad[some], u[some], v[some], cfg, [own[k] for k in some])
    torch.testing.assert_close(part.grad_u, everyone.grad_u[some], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(part.grad_v, everyone.grad_v[some], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"streams must hold one noise stream per client \(3\), got 12"):
        privatize_local(grad[some], u[some], v[some], cfg, streams(7))


def test_clip_mode_batch_passes_per_sample_false(monkeypatch):
    seen = {}
    real = clipping.ops.dp_lowrank_clip_noise

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(clipping.ops, "dp_lowrank_clip_noise", spy)
    u, v = factors()
    grad = torch.randn(K, B, N_CTX, D, dtype=torch.float64)
    res = privatize_local(grad, u, v, LocalDP(clip_norm=0.1, noise_multiplier=0.0, clip_mode="batch"), streams(0))
    assert seen["per_sample"] is False and seen["joint_uv"] is True
    assert res.norms.shape == (K, 1, 3)
    want = reference.dp_lowrank_clip_noise(grad, u, v, 0.1, 0.0, [0] * K, [0] * K, 0.0, True, False)
    torch.testing.assert_close(res.grad_global, want[2])
    privatize_local(grad, u, v, LocalDP(clip_norm=0.1, noise_multiplier=0.0, joint_uv=False), streams(0))
    assert seen["per_sample"] is True and seen["joint_uv"] is False


def test_clip_fraction_statistics():
    u, v = factors(1)
    grad = torch.zeros(1, 4, N_CTX, D, dtype=torch.float64)
    grad[0, 0] = 1e3  # only sample 0 exceeds C
    res = privatize_local(grad, u, v, LocalDP(clip_norm=1.0, noise_multiplier=0.0), streams(0, 1))
    torch.testing.assert_close(res.clip_fraction, torch.full((1, 3), 0.25))


def test_multiplier_mapping():
    sigma = 1.2
    assert accountant_noise_multiplier(LocalDP(clip_norm=1.0, noise_multiplier=sigma)) == sigma
    separate = LocalDP(clip_norm=1.0, noise_multiplier=sigma, joint_uv=False)
    assert accountant_noise_multiplier(separate) == pytest.approx(sigma / math.sqrt(2))
    assert accountant_noise_multiplier(separate, lowrank=False) == sigma
    batch = LocalDP(clip_norm=1.0, noise_multiplier=sigma, clip_mode="batch", expected_batch_size=32)
    assert accountant_noise_multiplier(batch) == pytest.approx(sigma / 64)
    assert global_accountant_noise_multiplier(sigma, clip_mode="batch", batch_size=32) == pytest.approx(sigma / 64)
    with pytest.raises(ValueError, match="batch clip_mode needs the batch size"):
        accountant_noise_multiplier(LocalDP(clip_norm=1.0, noise_multiplier=sigma, clip_mode="batch"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_norm": 0.0, "noise_multiplier": 1.0}, "clip_norm must be > 0"),
        ({"clip_norm": math.inf, "noise_multiplier": 1.0}, "clip_norm must be finite when noise_multiplier > 0"),
        ({"clip_norm": 1.0, "noise_multiplier": -0.5}, "noise_multiplier must be finite and >= 0, got -0.5"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "clip_mode": "flat"}, "clip_mode must be 'sample' or 'batch'"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "expected_batch_size": 0.0}, "expected_batch_size must be"),
    ],
)
def test_local_dp_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalDP(**kwargs)


def test_server_bad_inputs():
    s = NoiseStream(0)
    with pytest.raises(ValueError, match="client_grads must be 3-D"):
        server_aggregate_global(torch.zeros(4, 4), clip_norm=1.0, noise_multiplier=1.0, batch_size=2, stream=s)
    with pytest.raises(ValueError, match="batch_size must be finite and > 0, got 0"):
        server_aggregate_global(torch.zeros(1, 4, 4), clip_norm=1.0, noise_multiplier=1.0, batch_size=0, stream=s)
