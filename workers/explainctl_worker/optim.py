"""Per-row optimisers: every row of the parameter has its own state and its own step count.

A slot's item can start, stop or be replaced at any iteration without touching its
neighbours, which torch.optim cannot offer (one step count for the whole tensor). The
update of each row is exactly torch's Adam / SGD-with-momentum at that row's step t.

Shapes: the parameter p is (R, ...) for R rows; `steps` is (R,) the number of updates each
row has had before this one.
"""

from __future__ import annotations

from typing import Literal

import torch

Kind = Literal["adam", "sgd"]

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class RowOptimizer:
    """Adam (Kingma & Ba) or SGD with momentum, with state and step count per row.

    Adam, at a row's step t = 1, 2, ...:
        m_t = b1 m_{t-1} + (1 - b1) g,   v_t = b2 v_{t-1} + (1 - b2) g^2
        p  -= lr / (1 - b1^t) * m_t / (sqrt(v_t) / sqrt(1 - b2^t) + eps)
    SGD:  b_t = mu b_{t-1} + g (b_0 = 0),   p -= lr * b_t
    """

    def __init__(self, kind: Kind, lr: float, momentum: float = 0.0):
        self.kind, self.lr, self.momentum = kind, lr, momentum
        self.state: list[torch.Tensor] = []  # (R, ...) each: Adam (m, v); SGD (b,)

    def add_rows(self, like: torch.Tensor) -> None:
        """Fresh state for new rows, appended after the current ones."""
        fresh = [torch.zeros_like(like) for _ in range(2 if self.kind == "adam" else 1)]
        if self.state:
            fresh = [torch.cat(pair) for pair in zip(self.state, fresh, strict=True)]
        self.state = fresh

    def keep_rows(self, index: torch.Tensor) -> None:
        self.state = [s.index_select(0, index) for s in self.state]

    @torch.no_grad()
    def step(self, p: torch.Tensor, grad: torch.Tensor, steps: torch.Tensor) -> None:
        """Update p in place; steps (R,) on p's device counts each row's earlier updates."""
        if self.kind == "sgd":
            (buffer,) = self.state
            buffer.mul_(self.momentum).add_(grad)
            p.sub_(self.lr * buffer)
            return
        m, v = self.state
        b1, b2 = ADAM_BETAS
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        t = (steps + 1).to(p.dtype).view(-1, *([1] * (p.dim() - 1)))
        step_size = self.lr / (1 - b1**t)
        denom = v.sqrt() / (1 - b2**t).sqrt() + ADAM_EPS
        p.sub_(step_size * m / denom)
