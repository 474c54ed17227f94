"""SGD with momentum on stacked per-client tensors, updating only the clients that took part.

torch.optim.SGD would keep moving an idle client's rows through its momentum buffer; a client that
is not sampled in a round must not change, so the update is masked by client index.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ClientSGD"]


class ClientSGD:
    """p[c] -= lr * buf[c], buf[c] = momentum * buf[c] + grad[c], for the given client rows c.

    Args:
        params: name -> tensor with clients on dimension 0 (updated in place).
        lr, momentum: SGD hyper-parameters (the DP-FPL authors use SGD).
    """

    def __init__(self, params: dict[str, Tensor], *, lr: float, momentum: float) -> None:
        self.params = params
        self.lr = lr
        self.momentum = momentum
        self.buffers = {k: torch.zeros_like(p) for k, p in params.items()}

    @torch.no_grad()
    def step(self, clients: Tensor, grads: dict[str, Tensor]) -> None:
        """Apply grads[name] (len(clients), ...) to the rows ``clients`` of params[name]."""
        for name, grad in grads.items():
            p, buf = self.params[name], self.buffers[name]
            b = buf[clients] * self.momentum + grad.to(buf.dtype) if self.momentum else grad.to(buf.dtype)
            buf[clients] = b
            p[clients] = p[clients] - self.lr * b

    def state_dict(self) -> dict[str, Tensor]:
        return {k: b.clone() for k, b in self.buffers.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.buffers = {k: b.clone() for k, b in state.items()}
