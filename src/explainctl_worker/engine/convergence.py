"""When an item's mask has converged: the stop rule the slot engine checks at checkpoints.

Under the original method's input noise (sigma = 0.2 every iteration) the mask never settles: the
iterate keeps flickering by several hundredths per pixel, and the loss, dominated by the
noisy class probability, hides a slow drift of the mask's area (its L1 weight is 0.01).
Neither the loss nor the last iterate tells noise from progress. The rule therefore
compares block averages of the iterates with the iterates' own flicker: with
W = early_stop_window, per row,

    A_k = mean of the iterates m_t over the k-th block of W iterations
    s_k = mean over pixels of the standard deviation of m_t within block k  (the flicker)
    d_k = mean over pixels of |A_k - A_{k-1}|                               (the drift)
    converged at the end of block k  <=>  d_k <= max(early_stop_ratio * s_k, early_stop_tol)

A mask whose average moves no more than its noise is still changing only by chance, so
more iterations would redraw it rather than improve it; a mask that drifts (its area still
shrinking) goes on. The absolute tolerance stops a noiseless mask that has stopped moving.
On EfficientNet-Lite0 and six photos (benchmarks/README.md) this stops diffuse, flickering
masks after 100-150 iterations and lets drifting ones run to 400 or their budget.

Everything here is per row, on the device, and read back once per checkpoint.
"""

from __future__ import annotations

import torch

from explainctl.spec.methods import ExplainParams


class Convergence:
    """The rule's state for the rows in the slots: (R, ...) tensors like the parameter."""

    def __init__(self, params: ExplainParams):
        self.enabled = params.early_stop
        self.window = params.early_stop_window
        self.ratio = params.early_stop_ratio
        self.tol = params.early_stop_tol
        # (R, ...) sums of the iterates and of their squares over the current block, and
        # the last complete block's average; (R,) whether there is one.
        self.state: list[torch.Tensor] = []
        self.has_previous = torch.empty(0, dtype=torch.bool)

    def add_rows(self, p0: torch.Tensor) -> None:
        if not self.enabled:
            return
        fresh = [torch.zeros_like(p0) for _ in range(3)]
        flags = torch.zeros(p0.shape[0], dtype=torch.bool, device=p0.device)
        if self.state:
            fresh = [torch.cat(pair) for pair in zip(self.state, fresh, strict=True)]
            flags = torch.cat([self.has_previous, flags])
        self.state, self.has_previous = fresh, flags

    def keep_rows(self, index: torch.Tensor) -> None:
        if not self.enabled:
            return
        self.state = [s.index_select(0, index) for s in self.state]
        self.has_previous = self.has_previous.index_select(0, index)

    @torch.no_grad()
    def observe(self, p: torch.Tensor, held: torch.Tensor | None = None) -> None:
        """After every step: add the new iterate to its row's block (`held`, the hinge's
        state that Decision reads, is not used here)."""
        if self.enabled:
            total, squares, _ = self.state
            total += p
            squares.addcmul_(p, p)

    @torch.no_grad()
    def check(
        self, p: torch.Tensor, done_steps: list[int], per_item: int, held_at=None
    ) -> list[bool]:
        """At a checkpoint: whether each item (of `per_item` rows) has converged
        (`held_at`, which Decision reads, is not used here).

        A row's block ends when its step count is a multiple of the window; rows whose
        block goes on keep their state and are not converged.
        """
        items = len(done_steps)
        if not self.enabled or items == 0:
            return [False] * items
        ending = [s % self.window == 0 for s in done_steps for _ in range(per_item)]
        if not any(ending):
            return [False] * items
        total, squares, previous = self.state
        ends = torch.tensor(ending, dtype=torch.bool, device=total.device)
        view = (-1,) + (1,) * (total.dim() - 1)
        average = total / self.window
        spread = (squares / self.window - average.square()).clamp_min(0).sqrt()
        flicker = spread.flatten(1).mean(dim=1)
        drift = (average - previous).abs().flatten(1).mean(dim=1)
        bound = torch.maximum(self.ratio * flicker, torch.full_like(flicker, self.tol))
        converged = ends & self.has_previous & (drift <= bound)
        keep = ends.view(view)
        self.state = [
            torch.where(keep, torch.zeros_like(total), total),
            torch.where(keep, torch.zeros_like(squares), squares),
            torch.where(keep, average, previous),
        ]
        self.has_previous = self.has_previous | ends
        return converged.view(items, per_item).all(dim=1).tolist()


# A row's deleted region counts as unchanged between checkpoints when at most this share
# of its cells crossed 1/2 (8 of a 28 x 28 mask's 784).
DECIDED_CHANGE = 0.01
# ... and its class counts as removed when it sat under the bar on at least this share of
# the steps since the last checkpoint. At rest the hinge sits on its bar: the area term
# shrinks the mask until the class rises over it, the class term pushes it back, so a
# settled row is over the bar on some steps and under it on most.
DECIDED_HELD = 0.5


class Decision:
    """The stop rule of a method whose class term is a hinge (decisive). A row's schedule
    ends at step max(push_steps, held_at + anneal_steps), held_at being the step count at
    which its class first sat under its bar; from then on it has decided at a checkpoint
    where, since the previous checkpoint,

        its class sat under the bar on at least DECIDED_HELD of the steps, and
        its deleted region {m < 1/2} changed on at most DECIDED_CHANGE of the cells.

    More steps would only trade area for smoothness at a fixed decision. An item of several
    rows decides when all of them have. There is no noise to wait out (jitter moves the
    image, it does not blur the decision), so one checkpoint's comparison is enough.
    """

    def __init__(self, params: ExplainParams):
        self.enabled = params.early_stop
        self.push_steps = min(params.push_steps or 0, params.iterations)
        self.anneal_steps = params.anneal_steps or 0
        # (R, ...) the deleted region at the last checkpoint; (R,) steps since then, and
        # how many of them had the class under the bar.
        self.deleted = torch.empty(0, dtype=torch.bool)
        self.steps = torch.empty(0)
        self.held = torch.empty(0)

    def add_rows(self, p0: torch.Tensor) -> None:
        if not self.enabled:
            return
        zeros = torch.zeros(p0.shape[0], device=p0.device)
        self.deleted = torch.cat([self.deleted.to(p0.device), p0 < 0.5])
        self.steps = torch.cat([self.steps.to(p0.device), zeros])
        self.held = torch.cat([self.held.to(p0.device), zeros])

    def keep_rows(self, index: torch.Tensor) -> None:
        if not self.enabled:
            return
        self.deleted = self.deleted.index_select(0, index)
        self.steps = self.steps.index_select(0, index)
        self.held = self.held.index_select(0, index)

    @torch.no_grad()
    def observe(self, p: torch.Tensor, held: torch.Tensor | None) -> None:
        """After every step: `held` (R,) whether each row's class sat under its bar."""
        if self.enabled and held is not None:
            self.steps += 1
            self.held += held.to(self.held.dtype)

    @torch.no_grad()
    def check(
        self, p: torch.Tensor, done_steps: list[int], per_item: int, held_at: torch.Tensor
    ) -> list[bool]:
        """At a checkpoint: whether each item (of `per_item` rows) has decided; held_at
        (R,) as the engine keeps it."""
        items = len(done_steps)
        if not self.enabled or items == 0:
            return [False] * items
        deleted = p < 0.5
        changed = (deleted ^ self.deleted).flatten(1).float().mean(dim=1)
        steps = torch.tensor(
            [s for s in done_steps for _ in range(per_item)], dtype=held_at.dtype,
            device=p.device,
        )  # fmt: skip
        late = (steps >= self.push_steps) & (steps >= held_at + self.anneal_steps)
        held = self.held >= DECIDED_HELD * self.steps.clamp_min(1)
        decided = late & held & (changed <= DECIDED_CHANGE)
        self.deleted = deleted
        self.steps, self.held = torch.zeros_like(self.steps), torch.zeros_like(self.held)
        return decided.view(items, per_item).all(dim=1).tolist()
