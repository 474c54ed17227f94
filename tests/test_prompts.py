"""Prompt learner: the five factorisations' contexts and update rules (docs/design.md section 1, the table)."""

from __future__ import annotations

import pytest
import torch

from fpl_fast import ops
from fpl_fast.prompts import FACTORIZATIONS, PromptConfig, PromptLearner

K, N_CTX, D, R = 3, 6, 10, 2


def make(factorization: str, seed: int = 0) -> PromptLearner:
    cfg = PromptConfig(factorization, n_ctx=N_CTX, rank=R)
    return PromptLearner(cfg, K, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


ALL = torch.arange(K)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_context_follows_the_table(factorization: str) -> None:
    pl = make(factorization)
    f = pl.factors(ALL, seed=[5] * K, offset=[0] * K)
    ctx = pl.context(ALL, f)
    g = pl.client_global
    if factorization == "promptfl":
        expected = g
    elif factorization == "fedotp":
        expected = g + pl.local["l"]
    elif factorization == "fedpgp":
        expected = g + pl.local["u"] @ pl.local["v"]
    elif factorization == "dplora":
        u, v, _ = ops.lowrank_factorize(pl.local["l"], R, [5] * K, [0] * K)
        expected = g + u @ v
    else:  # dpfpl: U V + R reconstructs L exactly, whatever the randomness
        expected = g + pl.local["l"]
    torch.testing.assert_close(ctx, expected)


def test_dplora_differs_from_dpfpl_by_the_residual() -> None:
    lora, fpl = make("dplora"), make("dpfpl")
    f_lora, f_fpl = lora.factors(ALL, seed=[1] * K, offset=[0] * K), fpl.factors(ALL, seed=[1] * K, offset=[0] * K)
    diff = fpl.context(ALL, f_fpl) - lora.context(ALL, f_lora)
    torch.testing.assert_close(diff, f_fpl.residual)
    assert diff.abs().max() > 0  # rank 2 < n_ctx: the residual is not zero


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_prompts_assemble_prefix_context_suffix(factorization: str) -> None:
    pl = make(factorization)
    prefix = torch.randn(4, 1, D, dtype=torch.float64)
    suffix = torch.randn(4, 5, D, dtype=torch.float64)
    f = pl.factors(ALL, seed=[2] * K, offset=[0] * K)
    p = pl.prompts(prefix, suffix, ALL, f)
    assert p.shape == (K, 4, 1 + N_CTX + 5, D)
    torch.testing.assert_close(p[:, :, 1 : 1 + N_CTX], pl.context(ALL, f)[:, None].expand(K, 4, N_CTX, D))
    torch.testing.assert_close(p[:, :, 0:1], prefix.expand(K, 4, 1, D))
    torch.testing.assert_close(p[:, :, 1 + N_CTX :], suffix.expand(K, 4, 5, D))


def test_full_grad_update_follows_the_formula() -> None:
    pl = make("dpfpl")
    f = pl.factors(ALL, seed=[3] * K, offset=[0] * K)
    g_u = torch.randn(K, N_CTX, R, dtype=torch.float64)
    g_v = torch.randn(K, R, D, dtype=torch.float64)
    out = pl.local_update_direction(f, g_u, g_v)
    u, v = f.u, f.v
    expected = 0.1 * (g_u @ v + u @ g_v + u @ u.transpose(-1, -2) @ g_u @ v)
    torch.testing.assert_close(out["l"], expected)


def test_fedpgp_and_fedotp_update_their_own_parameters() -> None:
    pgp = make("fedpgp")
    g_u, g_v = torch.randn(K, N_CTX, R, dtype=torch.float64), torch.randn(K, R, D, dtype=torch.float64)
    assert set(pgp.local_update_direction(pgp.factors(ALL, seed=[0] * K, offset=[0] * K), g_u, g_v)) == {"u", "v"}
    otp = make("fedotp")
    g_l = torch.randn(K, N_CTX, D, dtype=torch.float64)
    out = otp.local_update_direction(otp.factors(ALL, seed=[0] * K, offset=[0] * K), g_l, torch.empty(K, 0, D))
    assert out["l"] is g_l
    assert make("promptfl").local_update_direction(None, g_l, g_l) == {}


def test_clients_start_with_the_same_global_prompt_and_different_local_ones() -> None:
    pl = make("dpfpl")
    assert torch.equal(pl.client_global, pl.global_ctx.expand(K, N_CTX, D))
    assert not torch.equal(pl.local["l"][0], pl.local["l"][1])


def test_state_dict_round_trip() -> None:
    a, b = make("fedpgp", seed=1), make("fedpgp", seed=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.local["u"], b.local["u"]) and torch.equal(a.client_global, b.client_global)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"factorization": "lora"}, "factorization must be one of"),
        ({"n_ctx": 0}, "n_ctx must be >= 1"),
        ({"rank": 0}, "rank must be in"),
        ({"rank": 9, "n_ctx": 8}, "rank must be in"),
        ({"init_std": 0.0}, "init_std must be > 0"),
    ],
)
def test_bad_config_names_the_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PromptConfig(**kwargs)
