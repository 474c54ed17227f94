"""The text side of a step: class prompts around a context -> text features -> cosine logits.

Two exact ways through the frozen text tower (``RunConfig.text_path``):

* ``shared`` (default where it applies: a causal tower pooling at EOT): a client's class prompts all begin with
  [SOS, ctx_1..ctx_n], so those P = 1 + n_ctx rows are encoded once per client and each class adds only its own
  suffix rows (name tokens, '.', EOT), packed without padding (backbone.text_tower). The prompt op writes
  the context into one (K, 1, P, d) prefix per client.
* ``full``: every class prompt [SOS | ctx | suffix] whole, cut once here after the last EOT (exact for causal towers);
  the prompt op writes the context into every class's prompt (K, n_cls, L, d). Towers that are not causal or pool
  elsewhere always take it.

Both give the same features up to floating-point summation order, and every client's prompts go through the encoder
in one call either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_fast import ops
from fpl_fast.backbone.protocol import TEXT_PATHS, Backbone

__all__ = ["ClassPrompts"]


class ClassPrompts:
    """The class prompts of one federation's label set on a frozen backbone.

    Args:
        backbone: the frozen CLIP.
        classnames: class names in label order.
        n_ctx: learned context tokens between prefix and suffix.
        text_path: ``"shared"`` (the shared-prefix path where the tower allows it, else the full path) or ``"full"``.

    Attributes:
        path: the path in force (``"shared"`` or ``"full"``).
        prefix, suffix: the frozen rows the prompt op writes the context between: per class (n_cls, 1, d) and
            (n_cls, S', d) on the full path; the SOS row (1, 1, d) and nothing (1, 0, d) on the shared path.
        rows_per_client: token rows per client through each layer of the tower.
    """

    def __init__(self, backbone: Backbone, classnames: list[str], n_ctx: int, text_path: str = "shared") -> None:
        if text_path not in TEXT_PATHS:
            raise ValueError(f"text_path must be one of {', '.join(TEXT_PATHS)}, got {text_path!r}")
        self.backbone = backbone
        parts = backbone.prompt_parts(classnames, n_ctx)
        self.n_cls = parts.prefix.shape[0]
        self.eot_index = parts.eot_index  # (n_cls,)
        # A causal tower pooling at EOT never looks past the last EOT: drop the padding once, here, so the
        # prompts are assembled (and differentiated) at the truncated length.
        self.seq_len = parts.seq_len if backbone.is_causal else parts.prefix.shape[1] + n_ctx + parts.suffix.shape[1]
        self.full_rows_per_client = self.n_cls * self.seq_len
        self.path = "shared" if text_path == "shared" and backbone.is_causal else "full"
        if self.path == "shared":
            self.pack = backbone.suffix_pack(parts)
            self.prefix = parts.prefix[:1]  # (1, 1, d): SOS, the same for every class
            self.suffix = parts.prefix.new_zeros(1, 0, parts.prefix.shape[-1])
            self.rows_per_client = self.pack.rows
        else:
            self.prefix = parts.prefix  # (n_cls, 1, d)
            self.suffix = parts.suffix[:, : self.seq_len - 1 - n_ctx]  # (n_cls, S', d)
            self.rows_per_client = self.full_rows_per_client

    @property
    def width(self) -> int:
        """Token-embedding width d."""
        return int(self.prefix.shape[-1])

    def summary(self) -> dict[str, int | str]:
        """The path in force and the token rows per client through each layer (for results and the run summary)."""
        return {
            "text_path": self.path,
            "text_rows_per_client": self.rows_per_client,
            "text_full_rows_per_client": self.full_rows_per_client,
        }

    def encode(self, prompts: Tensor) -> Tensor:
        """Prompts assembled around ``prefix`` / ``suffix`` (K_a, n, L, d) -> text features (K_a, n_cls, D) in float32
        (float64 for a float64 backbone)."""
        if self.path == "shared":
            feats = self.backbone.encode_shared(prompts[:, 0], self.pack)
        else:
            Ka, n_cls, L, d = prompts.shape
            flat = self.backbone.encode_prompts(
                prompts.reshape(Ka * n_cls, L, d), self.eot_index.repeat(Ka), seq_len=self.seq_len
            )
            feats = flat.reshape(Ka, n_cls, -1)
        return feats.to(torch.promote_types(feats.dtype, torch.float32))

    def features(self, ctx: Tensor, *, traceable: bool = False) -> Tensor:
        """(K_a, n_ctx, d) context -> (K_a, n_cls, D) text features, all clients in one encoder call.

        traceable: assemble the prompts with plain tensor ops, so that torch.func can vmap the pull-back over
        samples (per-sample gradients); otherwise through the fused prompt op.
        """
        assemble = ops.lowrank_prompt_traceable if traceable else ops.lowrank_prompt
        return self.encode(assemble(self.prefix, self.suffix, ctx.to(self.prefix.dtype)))

    def logits(self, text: Tensor, img: Tensor) -> Tensor:
        """Cosine logits: text (K_a, n_cls, D), img (K_a, B, D) -> (K_a, B, n_cls)."""
        t = F.normalize(text, dim=-1)
        x = F.normalize(img.to(t.dtype), dim=-1)
        return self.backbone.logit_scale * (x @ t.transpose(-1, -2))
