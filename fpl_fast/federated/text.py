"""The text side of a step: class prompts around a context -> text features -> cosine logits.

The frozen prefix (SOT) and suffix (class name, EOT, padding) embeddings are cut once here to the length a
causal tower reads, and every client's prompts go through the encoder in one call.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fpl_fast import ops
from fpl_fast.backbone_protocol import Backbone

__all__ = ["ClassPrompts"]


class ClassPrompts:
    """The class prompts of one federation's label set on a frozen backbone.

    Args:
        backbone: the frozen CLIP.
        classnames: class names in label order.
        n_ctx: learned context tokens between prefix and suffix.
    """

    def __init__(self, backbone: Backbone, classnames: list[str], n_ctx: int) -> None:
        self.backbone = backbone
        parts = backbone.prompt_parts(classnames, n_ctx)
        # A causal tower pooling at EOT never looks past the last EOT: drop the padding once, here, so the
        # prompts are assembled (and differentiated) at the truncated length.
        self.seq_len = parts.seq_len if backbone.is_causal else parts.prefix.shape[1] + n_ctx + parts.suffix.shape[1]
        self.prefix = parts.prefix  # (n_cls, 1, d)
        self.suffix = parts.suffix[:, : self.seq_len - 1 - n_ctx]  # (n_cls, S', d)
        self.eot_index = parts.eot_index  # (n_cls,)
        self.n_cls = self.prefix.shape[0]

    @property
    def width(self) -> int:
        """Token-embedding width d."""
        return int(self.prefix.shape[-1])

    def encode(self, prompts: Tensor) -> Tensor:
        """Assembled prompts (K_a, n_cls, L, d) -> text features (K_a, n_cls, D) in float32."""
        Ka, n_cls, L, d = prompts.shape
        feats = self.backbone.encode_prompts(
            prompts.reshape(Ka * n_cls, L, d), self.eot_index.repeat(Ka), seq_len=self.seq_len
        )
        return feats.reshape(Ka, n_cls, -1).float()

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
        x = F.normalize(img, dim=-1)
        return self.backbone.logit_scale * (x @ t.transpose(-1, -2))
