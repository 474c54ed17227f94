"""The frozen CLIP text tower as a function of token embeddings: the full path and the shared-prefix path.

The forward pass of the standard open_clip text block is re-implemented with plain tensor ops (layer norm, linear,
matmul attention with an additive mask) instead of ``nn.MultiheadAttention``: the result is the same (checked in tests
against ``model.encode_text``), but it has no fused fast paths, no in-place updates of its inputs and no
data-dependent Python control flow, so ``torch.func.vjp`` / ``torch.func.vmap`` batch it fully (PyTorch has no vmap
batching rule for the backward of the fused CPU attention kernel).

Full path (:func:`text_encoder_forward`): N whole sequences (N, L, d), each through every layer.

Shared-prefix path (:func:`shared_prefix_forward`): n_seq sequences that begin with the same P rows, as CoOp's class
prompts ``[SOS, ctx_1..ctx_n, name_c tokens, '.', EOT_c]`` of one client do (the context is the same for every
class). In a causal tower the hidden state of row p at every layer depends only on rows 0..p, so the P prefix rows
are the same in every sequence: they are computed once, and each sequence adds only its own suffix rows S_c (name
tokens, '.', EOT), whose queries attend to the keys and values of [the prefix rows; the sequence's own causal suffix
rows]. Rows are kept at their absolute positions (prefix 0..P-1, suffix P..P+S_c-1) for the positional embedding.
Rows per layer: P + sum_c S_c, against n_seq (P + S_max) for the full path, and the gradient w.r.t. the prefix rows
flows through every suffix's attention to them, so backward passes shrink by the same factor. The suffixes are
packed without padding (:class:`SuffixPack`): sequences are grouped into buckets of equal suffix length, and each
bucket's attention is one batched product over its own (S x (P + S)) scores, so no padding row and no score between
two different sequences is ever computed. In the last layer only the pooled (EOT) rows are needed: their queries
alone go through attention and the MLP. The result equals the full path up to floating-point summation order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SuffixPack",
    "TextTower",
    "shared_prefix_forward",
    "text_encoder_forward",
    "text_tower",
]


# --------------------------------------------------------------------------------------------------------------
# Text tower: a uniform view of the open_clip text encoder
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextTower:
    """References to the modules of an open_clip text tower (``CLIP`` keeps them at top level,
    ``CustomTextCLIP`` in ``.text``)."""

    token_embedding: nn.Embedding
    positional_embedding: Tensor
    transformer: open_clip.transformer.Transformer
    ln_final: nn.Module
    text_projection: Tensor | nn.Linear | None
    attn_mask: Tensor | None
    pool_type: str

    @property
    def is_causal(self) -> bool:
        """A causal mask and pooling at EOT: truncation after EOT and the shared-prefix path are exact."""
        return self.attn_mask is not None and self.pool_type in ("argmax", "eos")

    def project(self, pooled: Tensor) -> Tensor:
        """The pooled states (..., width) -> text features (..., embed_dim) (identity without a projection)."""
        proj = self.text_projection
        if proj is None:
            return pooled
        if isinstance(proj, nn.Linear):
            return proj(pooled)
        return pooled @ proj


def text_tower(model: nn.Module) -> TextTower:
    """Extract the text tower of an open_clip ``CLIP`` or ``CustomTextCLIP`` model.

    Args:
        model: an open_clip model.

    Returns:
        The tower's modules.

    Raises:
        ValueError: for text towers that cannot take prompt embeddings (Hugging Face text models, CoCa-style
            towers with an appended class token).
    """
    if isinstance(model, open_clip.CLIP):
        src: Any = model
        pool_type = model.text_pool_type
    else:
        src = getattr(model, "text", None)
        if not isinstance(src, open_clip.transformer.TextTransformer):
            raise ValueError(
                f"text tower {type(src).__name__} of {type(model).__name__} is not supported: prompt learning needs "
                "an open_clip TextTransformer (Hugging Face text towers are not supported)"
            )
        if src.cls_emb is not None:
            raise ValueError("text towers with an appended class token (CoCa, embed_cls=True) are not supported")
        pool_type = src.pool_type
    if pool_type not in ("argmax", "eos", "first", "last"):
        raise ValueError(f"text pool_type {pool_type!r} is not supported; allowed: argmax, eos, first, last")
    return TextTower(
        token_embedding=src.token_embedding,
        positional_embedding=src.positional_embedding,
        transformer=src.transformer,
        ln_final=src.ln_final,
        text_projection=src.text_projection,
        attn_mask=src.attn_mask,
        pool_type=pool_type,
    )


def _is_standard_block(block: nn.Module) -> bool:
    """open_clip's ResidualAttentionBlock with a packed in-projection: the block re-implemented here."""
    return (
        isinstance(block, open_clip.transformer.ResidualAttentionBlock)
        and block.attn._qkv_same_embed_dim
        and not hasattr(block, "ln_1_kv")
    )


def _heads(mha: nn.MultiheadAttention, x: Tensor, part: slice) -> Tensor:
    """One or more of q, k, v of ``x`` (N, R, width) as (N, H, R, parts x head_dim) (a slice of the in-projection)."""
    n, rows, width = x.shape
    heads = mha.num_heads
    w = mha.in_proj_weight[part]
    b = None if mha.in_proj_bias is None else mha.in_proj_bias[part]
    out = F.linear(x, w, b)  # (N, R, parts * width)
    parts = out.shape[-1] // width
    return out.reshape(n, rows, parts, heads, width // heads).permute(2, 0, 3, 1, 4)  # (parts, N, H, R, hd)


def _attention(mha: nn.MultiheadAttention, x: Tensor, mask: Tensor | None) -> Tensor:
    """``nn.MultiheadAttention`` (batch_first, self-attention, eval mode) with plain tensor ops."""
    n, length, width = x.shape
    head_dim = width // mha.num_heads
    q, k, v = _heads(mha, x, slice(None)).unbind(0)  # each (N, H, L, hd)
    scores = (q * head_dim**-0.5) @ k.transpose(-2, -1)  # (N, H, L, L)
    if mask is not None:
        scores = scores + mask
    out = scores.softmax(dim=-1) @ v  # (N, H, L, hd)
    return mha.out_proj(out.transpose(1, 2).reshape(n, length, width))


def _block_forward(block: Any, x: Tensor, mask: Tensor | None, batch_first: bool) -> Tensor:
    if _is_standard_block(block):
        x = x + block.ls_1(_attention(block.attn, block.ln_1(x), mask))
        return x + block.ls_2(block.mlp(block.ln_2(x)))
    # Custom blocks (qk-norm, scaled cosine attention, ...) already use functional attention.
    if not batch_first:
        return block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    return block(x, attn_mask=mask)


def text_encoder_forward(tower: TextTower, prompts: Tensor, pool_index: Tensor) -> Tensor:
    """Run a text tower on token embeddings (no truncation here; see ``FrozenCLIP.encode_prompts``).

    Math: ``x = prompts + pos[:L]``; ``x = blocks(x, mask[:L, :L])``; ``x = ln_final(x)``;
    ``out = x[n, pool_index[n]] @ text_projection``.

    Args:
        tower: the text tower (:func:`text_tower`).
        prompts: token embeddings, (N, L, d), L <= context_length.
        pool_index: (N,) long, the position pooled for each sequence (the EOT token for CLIP).

    Returns:
        Unnormalised text features, (N, embed_dim) (or (N, d) for towers without projection).
    """
    cast_dtype = tower.transformer.get_cast_dtype()
    length = prompts.shape[-2]
    x = prompts.to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)  # (N, L, d)
    mask = None if tower.attn_mask is None else tower.attn_mask[:length, :length].to(cast_dtype)
    batch_first = getattr(tower.transformer, "batch_first", True)
    for block in tower.transformer.resblocks:
        x = _block_forward(block, x, mask, batch_first)
    x = tower.ln_final(x)
    index = pool_index.to(device=x.device, dtype=torch.long).reshape(-1, 1, 1).expand(-1, 1, x.shape[-1])
    pooled = x.gather(-2, index).squeeze(-2)  # (N, d)
    return tower.project(pooled)


# --------------------------------------------------------------------------------------------------------------
# The shared-prefix path
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SuffixPack:
    """The suffix rows of n_seq sequences that share their first ``prefix_len`` rows, packed without padding.

    Rows of the shared input are the P prefix rows, then the suffix rows bucket by bucket: the sequences are sorted by
    suffix length (stable), and each bucket holds the sequences of one length S back to back (``n_b`` x S rows). The
    last row of every suffix is the pooled one (CLIP's EOT). Build it with :meth:`build`.

    Attributes:
        embeddings: (T, d) frozen embeddings of the suffix rows in pack order (T = sum of the lengths).
        prefix_len: P, the shared rows (e.g. SOS and n_ctx context vectors).
        lengths: S_c of each sequence, in sequence order.
        buckets: (first row, sequences n_b, length S) of each bucket, rows counted from 0 over the P + T rows.
        positions: (P + T,) absolute position of every row (its index into the positional embedding).
        slot_of: (n_seq,) the place of each sequence in pack order (to return results in sequence order).
        suffix_start: (n_seq,) the row of each sequence's first suffix row, in sequence order.
        pooled_rows: (n_seq,) the row of each sequence's pooled (last) suffix row, in pack order.
    """

    embeddings: Tensor
    prefix_len: int
    lengths: tuple[int, ...]
    buckets: tuple[tuple[int, int, int], ...]
    positions: Tensor
    slot_of: Tensor
    suffix_start: Tensor
    pooled_rows: Tensor
    _masks: dict[Any, Tensor] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, suffixes: Sequence[Tensor], prefix_len: int) -> SuffixPack:
        """Pack the suffix embeddings of each sequence ((S_c, d) each, S_c >= 1, the pooled row last)."""
        if not suffixes:
            raise ValueError("a suffix pack needs at least one sequence")
        if prefix_len < 1:
            raise ValueError(f"prefix_len must be >= 1 (the SOS row at least), got {prefix_len}")
        lengths = tuple(int(s.shape[0]) for s in suffixes)
        if min(lengths) < 1:
            raise ValueError(f"every suffix needs at least its pooled row, got lengths {lengths}")
        order = sorted(range(len(lengths)), key=lambda c: lengths[c])  # stable: equal lengths keep their order
        device = suffixes[0].device
        buckets: list[tuple[int, int, int]] = []
        starts = [0] * len(lengths)
        row = prefix_len
        for c in order:
            S = lengths[c]
            if buckets and buckets[-1][2] == S:
                first, n, _ = buckets[-1]
                buckets[-1] = (first, n + 1, S)
            else:
                buckets.append((row, 1, S))
            starts[c] = row
            row += S
        positions = [*range(prefix_len)]
        for _, n, S in buckets:
            positions += [prefix_len + j for _ in range(n) for j in range(S)]
        slot_of = torch.empty(len(order), dtype=torch.long)
        slot_of[torch.as_tensor(order)] = torch.arange(len(order))
        pooled = [first + i * S + S - 1 for first, n, S in buckets for i in range(n)]
        return cls(
            embeddings=torch.cat([suffixes[c] for c in order]),
            prefix_len=prefix_len,
            lengths=lengths,
            buckets=tuple(buckets),
            positions=torch.as_tensor(positions, dtype=torch.long, device=device),
            slot_of=slot_of.to(device),
            suffix_start=torch.as_tensor(starts, dtype=torch.long, device=device),
            pooled_rows=torch.as_tensor(pooled, dtype=torch.long, device=device),
        )

    @property
    def n_seq(self) -> int:
        return len(self.lengths)

    @property
    def rows(self) -> int:
        """Rows through each layer per prefix: P + sum_c S_c."""
        return self.prefix_len + sum(self.lengths)

    def dense_mask(self, dtype: torch.dtype) -> Tensor:
        """(P + T, P + T) additive mask of the same attention pattern over all rows (for blocks that take a mask)."""
        key = ("dense", dtype)
        if key not in self._masks:
            R, P = self.rows, self.prefix_len
            allowed = torch.zeros(R, R, dtype=torch.bool)
            allowed[:P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
            for first, n, S in self.buckets:
                for i in range(n):
                    a = first + i * S
                    allowed[a : a + S, :P] = True
                    allowed[a : a + S, a : a + S] = torch.ones(S, S, dtype=torch.bool).tril()
            self._masks[key] = self._additive(allowed, dtype)
        return self._masks[key]

    def causal_mask(self, length: int, dtype: torch.dtype) -> Tensor:
        """(length, length) additive causal mask."""
        key = ("causal", length, dtype)
        if key not in self._masks:
            self._masks[key] = self._additive(torch.ones(length, length, dtype=torch.bool).tril(), dtype)
        return self._masks[key]

    def _additive(self, allowed: Tensor, dtype: torch.dtype) -> Tensor:
        """0 where ``allowed``, -inf elsewhere, on the pack's device."""
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))
        return mask.to(self.positions.device)


def _shared_attention(q: Tensor, k: Tensor, v: Tensor, pack: SuffixPack, *, pooled_only: bool) -> Tensor:
    """Attention of the packed rows: k, v (N, H, P + T, hd); q (N, H, P + T, hd) already scaled, or with
    ``pooled_only`` the queries of the pooled rows alone (N, H, n_seq, hd), in pack order (the last layer).

    Prefix rows attend causally among themselves; each bucket's suffix rows attend to the prefix rows and to their
    own sequence's earlier rows (a pooled row, the last of its sequence, to all of them).

    Returns:
        (N, H, rows, hd): every row (prefix first, then pack order), or the n_seq pooled rows in pack order.
    """
    N, H, _, hd = q.shape
    P = pack.prefix_len
    dtype = q.dtype
    kp, vp = k[:, :, :P], v[:, :, :P]
    outs = []
    if not pooled_only:
        scores = q[:, :, :P] @ kp.transpose(-2, -1) + pack.causal_mask(P, dtype)
        outs.append(scores.softmax(-1) @ vp)
    slot = 0
    for first, n, S in pack.buckets:
        rows = slice(first, first + n * S)
        ks = k[:, :, rows].reshape(N, H, n, S, hd)
        vs = v[:, :, rows].reshape(N, H, n, S, hd)
        if pooled_only:
            qs = q[:, :, slot : slot + n].unsqueeze(3)  # (N, H, n, 1, hd)
            slot += n
        else:
            qs = q[:, :, rows].reshape(N, H, n, S, hd)
        m = qs.shape[3]
        to_prefix = (qs.reshape(N, H, n * m, hd) @ kp.transpose(-2, -1)).reshape(N, H, n, m, P)
        to_own = qs @ ks.transpose(-2, -1)  # (N, H, n, m, S)
        if not pooled_only:
            to_own = to_own + pack.causal_mask(S, dtype)
        weights = torch.cat([to_prefix, to_own], dim=-1).softmax(-1)
        out = (weights[..., :P].reshape(N, H, n * m, P) @ vp).reshape(N, H, n, m, hd) + weights[..., P:] @ vs
        outs.append(out.reshape(N, H, n * m, hd))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def _shared_block(block: Any, x: Tensor, pack: SuffixPack, pooled: Tensor | None, batch_first: bool) -> Tensor:
    """One block over the packed rows x (N, P + T, width); with ``pooled`` (the pooled rows), only those rows come out
    (N, n_seq, width) (the last layer: nothing after it reads the others)."""
    if not _is_standard_block(block):
        x = _block_forward(block, x, pack.dense_mask(x.dtype), batch_first)
        return x if pooled is None else x[:, pooled]
    mha = block.attn
    N, _, width = x.shape
    h = block.ln_1(x)
    scale = (width // mha.num_heads) ** -0.5
    if pooled is None:
        q, k, v = _heads(mha, h, slice(None)).unbind(0)
    else:  # queries of the pooled rows only
        q = _heads(mha, h[:, pooled], slice(0, width))[0]
        k, v = _heads(mha, h, slice(width, None)).unbind(0)
        x = x[:, pooled]
    out = _shared_attention(q * scale, k, v, pack, pooled_only=pooled is not None)
    x = x + block.ls_1(mha.out_proj(out.transpose(1, 2).reshape(N, -1, width)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def shared_prefix_forward(tower: TextTower, prefix: Tensor, pack: SuffixPack, *, states: bool = False) -> Any:
    """Text features of the sequences ``[prefix[j]; suffix_c]`` for every prefix j and sequence c of ``pack``.

    Args:
        tower: a causal text tower pooling at the last suffix row (``tower.is_causal``).
        prefix: (N, P, d) token embeddings of the shared rows, one prefix per row of N (e.g. per client).
        pack: the suffixes (:meth:`SuffixPack.build`), P = ``pack.prefix_len``.
        states: also return the ``ln_final`` states of every row (then the last layer runs on every row).

    Returns:
        (N, n_seq, embed_dim) unnormalised features in sequence order; with ``states``, also the (N, P + T, width)
        states after ``ln_final`` (rows as in the pack: prefix, then ``pack.suffix_start[c] + j`` for row j of c).
    """
    if not tower.is_causal:
        raise ValueError("the shared-prefix path needs a causal text tower that pools at EOT; use the full path")
    N, P, d = prefix.shape
    if P != pack.prefix_len:
        raise ValueError(f"prefix has {P} rows, the suffix pack was built for {pack.prefix_len}")
    cast_dtype = tower.transformer.get_cast_dtype()
    suffix = pack.embeddings.to(cast_dtype).expand(N, -1, -1)
    x = torch.cat([prefix.to(cast_dtype), suffix], dim=1) + tower.positional_embedding[pack.positions].to(cast_dtype)
    batch_first = getattr(tower.transformer, "batch_first", True)
    blocks = list(tower.transformer.resblocks)
    pooled = pack.pooled_rows
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1 and not states
        x = _shared_block(block, x, pack, pooled if last else None, batch_first)
    x = tower.ln_final(x)
    if states:
        feats = tower.project(x[:, pooled][:, pack.slot_of])
        return feats, x
    return tower.project(x[:, pack.slot_of])  # pooled rows, back in sequence order
