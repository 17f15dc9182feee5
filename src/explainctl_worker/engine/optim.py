"""Per-row optimisers: every row of the parameter has its own state and its own step count.

A slot's item can start, stop or be replaced at any iteration without touching its
neighbours, which torch.optim cannot offer (one step count for the whole tensor). The
update of each row is exactly torch's Adam / SGD-with-momentum at that row's step t.

Shapes: the parameter p is (R, ...) for R rows; `steps` is (R,) the number of updates each
row has had before this one.
"""

from __future__ import annotations

import torch

from explainctl_worker.methods.common import Kind

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class RowOptimizer:
    """Adam (Kingma & Ba) or SGD with momentum, with state and step count per row.

    Adam, at a row's step t = 1, 2, ...:
        m_t = b1 m_{t-1} + (1 - b1) g,   v_t = b2 v_{t-1} + (1 - b2) g^2
        p  -= lr / (1 - b1^t) * m_t / (sqrt(v_t) / sqrt(1 - b2^t) + eps)
    adam-row: the same with one second moment per row, v_t = b2 v_{t-1} + (1 - b2) mean(g^2)
        over the row's elements. Adam divides each element by its own gradient's scale, so
        every cell with a steady sign moves at the full rate however weak its evidence, and
        cells whose gradient only flickers under jitter wander as far as the strong ones;
        sharing the scale over the row moves each cell in proportion to its gradient.
    SGD:  b_t = mu b_{t-1} + g (b_0 = 0),   p -= lr * b_t
    """

    def __init__(self, kind: Kind, lr: float, momentum: float = 0.0):
        self.kind, self.lr, self.momentum = kind, lr, momentum
        self.state: list[torch.Tensor] = []  # (R, ...) each: Adam (m, v); SGD (b,)
        # adam-row's v is (R, 1, ..., 1)

    def add_rows(self, like: torch.Tensor) -> None:
        """Fresh state for new rows, appended after the current ones."""
        fresh = [torch.zeros_like(like)]
        if self.kind == "adam":
            fresh.append(torch.zeros_like(like))
        elif self.kind == "adam-row":
            fresh.append(like.new_zeros(like.shape[0], *[1] * (like.dim() - 1)))
        if self.state:
            fresh = [torch.cat(pair) for pair in zip(self.state, fresh, strict=True)]
        self.state = fresh

    def keep_rows(self, index: torch.Tensor) -> None:
        self.state = [s.index_select(0, index) for s in self.state]

    @torch.no_grad()
    def step(
        self,
        p: torch.Tensor,
        grad: torch.Tensor,
        steps: torch.Tensor,
        scale: torch.Tensor | None = None,
    ) -> None:
        """Update p in place; steps (R,) on p's device counts each row's earlier updates,
        scale (R,) multiplies each row's learning rate (a schedule; None: 1)."""
        lr = self.lr
        if scale is not None:
            lr = self.lr * scale.to(p.dtype).view(-1, *([1] * (p.dim() - 1)))
        if self.kind == "sgd":
            (buffer,) = self.state
            buffer.mul_(self.momentum).add_(grad)
            p.sub_(lr * buffer)
            return
        m, v = self.state
        b1, b2 = ADAM_BETAS
        m.mul_(b1).add_(grad, alpha=1 - b1)
        if self.kind == "adam-row":
            v.mul_(b2).add_(grad.square().flatten(1).mean(dim=1).view_as(v), alpha=1 - b2)
        else:
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        t = (steps + 1).to(p.dtype).view(-1, *([1] * (p.dim() - 1)))
        step_size = lr / (1 - b1**t)
        denom = v.sqrt() / (1 - b2**t).sqrt() + ADAM_EPS
        p.sub_(step_size * m / denom)
