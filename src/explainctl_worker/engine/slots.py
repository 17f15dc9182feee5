"""Slots: the device's batch of in-flight items, refilled as items finish.

The device runs one forward/backward pass per iteration over every row in the slots. Each
item keeps its own step count, optimiser state (optim.RowOptimizer) and random generator
(ItemRandom), so its mask does not depend on its neighbours or on when it entered. At a
checkpoint (every CHECKPOINT_EVERY iterations of an item, the only points where the loop
waits for the device) an item that has converged (convergence.py) or spent its budget is
finalised, and its slot is given to the next item of the stream: the device never spends
a pass on a finished mask.

    for key, explanation in run_slots(model, entries, params, slots=8): ...
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any

import torch
from torch import nn

from explainctl.spec.contracts import IMAGENET_MEAN, IMAGENET_STD
from explainctl.spec.methods import ExplainParams
from explainctl.spec.results import SCORE_FIELDS
from explainctl_worker.engine.convergence import Convergence, Decision
from explainctl_worker.engine.optim import RowOptimizer
from explainctl_worker.engine.precision import autocast, resolve
from explainctl_worker.measures import diagnostics, faithfulness
from explainctl_worker.methods import RUNNERS
from explainctl_worker.methods.common import (
    CHECKPOINT_EVERY,
    Problem,
    Rows,
    jitter_draws,
    prepare,
)
from explainctl_worker.methods.mask import mask_area

log = logging.getLogger("explainctl.engine")


@dataclass
class Entry:
    """An item waiting for a slot: its pixels (C, H, W) in [0, 1], its target (-1: top-1)
    and the seed of its randomness (None: params.seed)."""

    key: Any
    image: torch.Tensor
    target: int = -1
    seed: int | None = None


# What a score holds for N items: a tensor (N,), a list of N values, or None where it was
# not measured for them.
ScoreValues = torch.Tensor | list | None


@dataclass
class Explanation:
    """What the engine gives back for N items (N = 1 from `run_slots`), on the CPU: the
    tensors the artifacts are drawn from, and the items' scores."""

    masks: torch.Tensor  # (N, 1, h, w) float32 in [0, 1]
    # (N, 1, H, W) the mask as the model saw it, at its input resolution; 1 - masks_full
    # is the saliency the metrics rank.
    masks_full: torch.Tensor
    substrate: torch.Tensor  # (N, C, H, W) pixel-space substrate, for rendering
    # Every score of the result (explainctl.spec.results.ItemScores), by its declared name, each
    # as ScoreValues. None: faithfulness without params.metrics, the stability of an item
    # run once, the class name (the engine knows no names; explain._render does).
    scores: dict[str, ScoreValues]
    # (N, L, C, H, W) pixel-space blur pyramid, for methods whose perturbation varies
    # the blur with the mask (paper, extremal); None for a single substrate.
    levels: torch.Tensor | None = None
    # (N, A, h, w) one mask per area (extremal with several areas); masks is the first.
    area_masks: torch.Tensor | None = None

    def item_scores(self, i: int = 0) -> dict[str, Any]:
        """Item i's scores as plain values by name: None where not measured, and where a
        score is NaN (the compactness of a mask that deleted nothing)."""
        return {name: _plain(values, i) for name, values in self.scores.items()}

    def row(self, i: int) -> Explanation:
        """Item i alone."""
        values = {name: _sliced(value, i) for name, value in vars(self).items()}
        values["scores"] = {name: _sliced(value, i) for name, value in self.scores.items()}
        return Explanation(**values)

    @staticmethod
    def stack(parts: list[Explanation]) -> Explanation:
        """Explanations of single items, concatenated in order."""
        first = parts[0]
        values = {name: _joined([getattr(part, name) for part in parts]) for name in vars(first)}
        values["scores"] = {
            name: _joined([part.scores[name] for part in parts]) for name in first.scores
        }
        return Explanation(**values)


def _sliced(value, i: int):
    return value[i : i + 1] if isinstance(value, torch.Tensor | list) else value


def _joined(values: list):
    """Per-item values of several explanations, in order; anything else is the first's."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values)
    if isinstance(first, list):
        return [v for value in values for v in value]
    return first


def _plain(values: ScoreValues, i: int) -> Any:
    if values is None:
        return None
    value = values[i].item() if isinstance(values, torch.Tensor) else values[i]
    return None if isinstance(value, float) and math.isnan(value) else value


# Slots on a CPU: with channels_last, 4 images per pass gave the most images per second
# on 2 cores (EfficientNet-Lite0: 33 ms per image-iteration against 48 at 1 and 44 at 8).
CPU_SLOTS = 4
# Share of the free GPU memory the slots may take, and the most slots on any device.
GPU_MEMORY_SHARE = 0.6
MAX_SLOTS = 256


def choose_slots(model: nn.Module, params: ExplainParams, device: torch.device, items: int) -> int:
    """Slots for `items` items when none were asked for: CPU_SLOTS on a CPU; on CUDA as
    many as GPU_MEMORY_SHARE of the free memory holds, from one measured pass of 2 images,
    counting every row an item needs and every pass of each row (the Runner's
    rows_per_item and passes_per_row)."""
    if device.type != "cuda":
        return max(1, min(CPU_SLOTS, items))
    runner = RUNNERS[params.method]
    passes = runner.rows_per_item(params) * runner.passes_per_row(params)
    per_item = _row_bytes(model, params.image_size, device) * passes
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(items, MAX_SLOTS // passes, int(GPU_MEMORY_SHARE * free // per_item)))


# Measured once per model and input size: every chunk asks, and a probe pass each time
# would cost a forward and backward on the hot path.
_ROW_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _row_bytes(model: nn.Module, image_size: int, device: torch.device) -> int:
    """GPU bytes one row needs: half the peak of a probe pass of 2 images, doubled for the
    method's own tensors (substrate, pyramid, optimiser state)."""
    known = _ROW_BYTES.setdefault(model, {})
    if image_size not in known:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        probe = torch.rand(2, 3, image_size, image_size, device=device, requires_grad=True)
        (grad,) = torch.autograd.grad(model(probe).float().logsumexp(dim=1).sum(), probe)
        del grad
        known[image_size] = max(1, torch.cuda.max_memory_allocated(device) - base)
    return known[image_size]


class ItemRandom:
    """The randomness of one item, from a generator seeded with `seed` (default
    params.seed), so the item sees the draws it would see alone.

    Every jitter shift of its budget is drawn at admission, shifts (iterations, draws, 2),
    so a step gathers its rows' shifts on the device with no loop over items; the original
    method's noise (C, H, W) is drawn per step after them, in the item's own order.
    """

    def __init__(self, params: ExplainParams, device: torch.device, seed: int | None = None):
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(params.seed if seed is None else seed)
        j, shape = params.jitter, (params.iterations, jitter_draws(params), 2)
        self.shifts = (
            torch.randint(-j, j + 1, shape, generator=self.generator, device=device)
            if j
            else torch.zeros(shape, dtype=torch.long, device=device)
        )

    def noise(self, shape: tuple[int, ...], device) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=device)


def jitter_rows(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Shift each row of x (R, C, H, W) by its own (dy, dx) (R, 2), edges replicated.

    Gathers along H then W, on x's device: no value travels to the host.
    """
    r, c, h, w = x.shape
    rows = (torch.arange(h, device=x.device).view(1, h) - shifts[:, :1]).clamp(0, h - 1)
    cols = (torch.arange(w, device=x.device).view(1, w) - shifts[:, 1:]).clamp(0, w - 1)
    x = x.gather(2, rows.view(r, 1, h, 1).expand(r, c, h, w))
    return x.gather(3, cols.view(r, 1, 1, w).expand(r, c, h, w))


def _perturber(randoms: list[ItemRandom], shifts: torch.Tensor | None, params, per_item, shape):
    """One step's perturbation for the rows of `randoms`' items (see Perturb): shifts
    (items, draws, 2) are this step's, gathered from the items' tables."""

    def perturb(x: torch.Tensor) -> torch.Tensor:
        blocks = x.shape[0] // (len(randoms) * per_item)

        def per_row(values: torch.Tensor) -> torch.Tensor:
            stacked = values.repeat_interleave(per_item, dim=0)
            return stacked.repeat(blocks, *([1] * (stacked.dim() - 1)))

        if shifts is not None:
            x = torch.cat([jitter_rows(x, per_row(shifts[:, d])) for d in range(shifts.shape[1])])
        if params.noise_std > 0:
            # The original method's: one draw per item and step, shared by its copies.
            noise = per_row(torch.stack([random.noise(shape, x.device) for random in randoms]))
            x = x + params.noise_std * noise.repeat(x.shape[0] // noise.shape[0], 1, 1, 1)
        return x

    return perturb


class _Scores(nn.Module):
    """The model as the loop calls it: in the resolved precision (precision.py), float32
    logits out."""

    def __init__(self, model, precision: str, device: torch.device, channels_last: bool):
        super().__init__()
        self.model, self.precision, self.device = model, precision, device
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.precision, self.device):
            return self.model(x).float()


class InFlight:
    """The items in the slots and their rows' state, kept in step: `admit` appends items
    and their rows to every per-item list and per-row tensor at once, `keep` drops the
    others from all of them (the optimiser's and the stop rule's state included).

    Per row, R = items * per_item, on the device: p (R, ...) the parameter, p_sum its sum
    over the iterates (for `finish`), steps (R,) its update count, held_at (R,) the step at
    which its class first sat under its bar (inf: not yet; a decisive schedule starts
    there), rows the method's own tensors. Per item: key, ItemRandom, steps done (on the
    host, so scheduling needs no sync), wall time spent, every jitter shift of its budget
    (items, iterations, draws, 2), and the Problem.
    """

    def __init__(self, params: ExplainParams, device: torch.device, optimizer, convergence):
        self.params, self.device = params, device
        self.optimizer, self.convergence = optimizer, convergence
        self.per_item = RUNNERS[params.method].rows_per_item(params)
        self.entries: list[Entry] = []  # as admitted: an item sent back starts afresh
        self.keys: list[Any] = []
        self.randoms: list[ItemRandom] = []
        self.done_steps: list[int] = []
        self.spent: list[float] = []
        self.problem: Problem | None = None
        self.p = self.p_sum = self.steps = self.held_at = torch.empty(0, device=device)
        self.rows = Rows()
        draws = jitter_draws(params)
        self.shift_table = torch.empty(0, params.iterations, draws, 2, dtype=torch.long,
                                       device=device)  # fmt: skip

    def __len__(self) -> int:
        return len(self.keys)

    def admit(self, entries: list[Entry], new: Problem, p0: torch.Tensor, rows: Rows) -> None:
        """Items `entries`, prepared as `new`, start from p0 with the method's `rows`."""
        first = self.problem is None
        self.p = p0 if first else torch.cat([self.p, p0])
        zeros = torch.zeros_like(p0)
        self.p_sum = zeros if first else torch.cat([self.p_sum, zeros])
        self.rows = self.rows.extend(rows)
        self.steps = torch.cat([self.steps, torch.zeros(p0.shape[0], device=self.device)])
        never = torch.full((p0.shape[0],), float("inf"), device=self.device)
        self.held_at = torch.cat([self.held_at, never])
        self.optimizer.add_rows(p0)
        self.convergence.add_rows(p0)
        self.problem = new if first else self.problem.extend(new)
        self.entries += entries
        self.keys += [e.key for e in entries]
        fresh = [ItemRandom(self.params, self.device, e.seed) for e in entries]
        self.randoms += fresh
        self.shift_table = torch.cat([self.shift_table, torch.stack([r.shifts for r in fresh])])
        self.done_steps += [0] * len(entries)
        self.spent += [0.0] * len(entries)

    def row_index(self, items: list[int]) -> torch.Tensor:
        """The rows of `items` (item positions), item-major."""
        return _rows_of(items, self.per_item, self.device)

    def keep(self, items: list[int]) -> None:
        """Only `items` (item positions, in order) stay in flight."""
        index = torch.tensor(items, dtype=torch.long, device=self.device)
        rows = self.row_index(items)
        self.p, self.rows = self.p.index_select(0, rows), self.rows.select(rows)
        self.p_sum = self.p_sum.index_select(0, rows)
        self.steps = self.steps.index_select(0, rows)
        self.held_at = self.held_at.index_select(0, rows)
        self.optimizer.keep_rows(rows)
        self.convergence.keep_rows(rows)
        self.problem = self.problem.select(index)
        self.shift_table = self.shift_table.index_select(0, index)
        self.entries = [self.entries[i] for i in items]
        self.keys = [self.keys[i] for i in items]
        self.randoms = [self.randoms[i] for i in items]
        self.done_steps = [self.done_steps[i] for i in items]
        self.spent = [self.spent[i] for i in items]


def _step(f: InFlight, runner, scores, optimizer, convergence, params, shape, device) -> None:
    """One iteration over every row in flight: the method's loss, its gradient in the
    mask, and the optimiser's update."""
    leaf = f.p.detach().requires_grad_(True)
    shifts = None
    if params.jitter:
        item_steps = f.steps.view(-1, f.per_item)[:, 0].long()
        shifts = f.shift_table[torch.arange(len(f), device=device), item_steps]
    perturb = _perturber(f.randoms, shifts, params, f.per_item, shape)
    with torch.enable_grad():
        loss, held = runner.loss(scores, leaf, f.rows, f.steps, params, perturb)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
    with torch.no_grad():
        optimizer.step(f.p, grad, f.steps, runner.lr_scale(f.steps, f.held_at, params))
        f.p.clamp_(0, 1)
        f.p_sum += f.p
        f.steps += 1
        if held is not None:
            f.held_at = torch.where(held & f.held_at.isinf(), f.steps, f.held_at)
    convergence.observe(f.p, held)


def run_slots(
    model: nn.Module,
    entries: Iterable[Entry],
    params: ExplainParams,
    *,
    slots: int,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    device: torch.device | None = None,
    progress: Callable[[int], None] | None = None,
    channels_last: bool = True,
) -> Iterator[tuple[Any, Explanation]]:
    """Explain a stream of items with `slots` items in flight; yields (key, explanation)
    as each item finishes, which is not the order of `entries`.

    Args:
        model: the classifier, (N, C, H, W) normalised images -> (N, K) logits.
        entries: the items, each an Entry: a key, its image (C, H, W) in [0, 1] at
            params.image_size, its target class, and optionally its own seed.
        slots: items optimised together in one batch, refilled as items finish.
        mean, std: the model's input normalisation, per channel.
        progress: receives the item-iterations done since its last call (an item that
            stops early is credited with its whole budget, so the total is
            items * params.iterations).
        channels_last: the model's memory format; 1.4x per pass for EfficientNet-Lite0 on
            a CPU (benchmarks/README.md), and what tensor cores want on a GPU.

    Returns:
        An iterator of (key, Explanation), N = 1 each, every declared score by name.
    """
    runner = RUNNERS[params.method]
    if device is None:
        tensors = [*model.parameters(), *model.buffers()]
        device = tensors[0].device if tensors else torch.device("cpu")
    model.eval()
    scores = _Scores(model, resolve(params.precision, device), device, channels_last)
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    source = iter(entries)
    optimizer = RowOptimizer(runner.optimizer, params.lr, params.momentum or 0.0)
    convergence = Decision(params) if runner.stop == "decision" else Convergence(params)
    f = InFlight(params, device, optimizer, convergence)
    exhausted = False

    while True:
        if not exhausted and len(f) < slots:
            admitted = list(islice(source, slots - len(f)))
            exhausted = len(admitted) < slots - len(f)
            if admitted:
                images = torch.stack([e.image for e in admitted]).to(device)
                targets = torch.tensor([e.target for e in admitted], dtype=torch.long)
                new = prepare(scores, images, mean, std, targets)
                f.admit(admitted, new, *runner.start(new, params))
        if not f:
            return

        # Run every item to its next checkpoint (or its budget, if that comes first). With
        # a budget that is not a multiple of 5, items admitted after a budget finish sit
        # out of phase with the others and segments get shorter; every item still passes
        # each of its own multiples of 5.
        segment = min(
            min(CHECKPOINT_EVERY - s % CHECKPOINT_EVERY, params.iterations - s)
            for s in f.done_steps
        )
        shape = tuple(f.problem.x.shape[1:])
        started = time.perf_counter()
        ran, drawn = 0, None
        try:
            for _ in range(segment):
                if params.noise_std:  # a failed step must not have used up its draws
                    drawn = [r.generator.get_state() for r in f.randoms]
                _step(f, runner, scores, optimizer, convergence, params, shape, device)
                ran += 1
        except torch.OutOfMemoryError:
            # The device cannot hold this many rows: half the items stay (their steps
            # so far kept), the rest go back to the head of the stream and start again.
            if len(f) == 1:
                raise
            for random, state in zip(f.randoms, drawn or (), strict=False):
                random.generator.set_state(state)
            slots = len(f) // 2
            log.warning("out of memory with %d items in flight: %d from now on", len(f), slots)
            f.done_steps = [s + ran for s in f.done_steps]
            source = chain(f.entries[slots:], source)
            exhausted = False
            f.keep(list(range(slots)))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        f.done_steps = [s + segment for s in f.done_steps]
        credited = segment * len(f)

        converged = convergence.check(f.p, f.done_steps, f.per_item, f.held_at)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a checkpoint: the segment's time is complete
        share = (time.perf_counter() - started) / len(f)
        f.spent = [t + share for t in f.spent]
        done_steps = f.done_steps
        finished = [i for i, s in enumerate(done_steps) if s >= params.iterations or converged[i]]
        if finished:
            credited += sum(params.iterations - done_steps[i] for i in finished)
            row_index = f.row_index(finished)
            done = f.problem.select(torch.tensor(finished, device=device))
            started = time.perf_counter()
            with torch.no_grad():
                taken = f.steps.index_select(0, row_index).clamp_min(1)
                p_mean = f.p_sum.index_select(0, row_index) / taken.view(-1, *[1] * (f.p.dim() - 1))
                done_rows = f.rows.select(row_index).extend_with(p_mean=p_mean)
                result = runner.finish(done, f.p.index_select(0, row_index), done_rows, params)
                explained = _explanations(
                    done,
                    result,
                    [done_steps[i] for i in finished],
                    [converged[i] and done_steps[i] < params.iterations for i in finished],
                    params,
                )
            share = (time.perf_counter() - started) / len(finished)
            for position, i in enumerate(finished):
                explained[position].scores["seconds"] += f.spent[i] + share
            keys = [f.keys[i] for i in finished]
            f.keep([i for i in range(len(f)) if i not in set(finished)])
            yield from zip(keys, explained, strict=True)
        if progress:
            progress(credited)


def _rows_of(items: list[int], per_item: int, device) -> torch.Tensor:
    """The rows (item-major) of the items at positions `items`."""
    return torch.tensor(
        [i * per_item + k for i in items for k in range(per_item)], dtype=torch.long, device=device
    )


def _cpu(values: ScoreValues) -> ScoreValues:
    """A tensor on the CPU, floats as float32 (float64 stays); lists and None as they are."""
    if not isinstance(values, torch.Tensor):
        return values
    values = values.detach()
    if values.is_floating_point() and values.dtype != torch.float64:
        values = values.float()
    return values.cpu()


def _faithfulness(problem: Problem, result, params: ExplainParams) -> dict[str, ScoreValues]:
    """The faithfulness scores (the fields of faithfulness.Faithfulness that are declared
    scores; the rest are its curves), each None without params.metrics."""
    names = [
        f.name for f in dataclasses.fields(faithfulness.Faithfulness) if f.name in SCORE_FIELDS
    ]
    if not params.metrics:
        return dict.fromkeys(names)
    scored = faithfulness.evaluate(
        problem.model,
        problem.x,
        1 - result.masks_full.detach(),
        problem.targets,
        steps=params.metric_steps,
        max_batch=params.metric_batch,
    )
    return {name: getattr(scored, name) for name in names}


def _explanations(problem: Problem, result, iterations, converged, params) -> list[Explanation]:
    """One Explanation per finished item, every declared score (explainctl.spec.results) produced
    here by name; its faithfulness when params.metrics."""
    n = len(iterations)
    measured = _faithfulness(problem, result, params)
    final = result.masks.detach()
    probabilities = problem.model(result.perturbed).softmax(dim=1)
    prob_after = probabilities.gather(1, problem.targets.view(-1, 1)).squeeze(1)
    trust = diagnostics.evaluate(
        problem.images,
        problem.pixels(result.perturbed),
        final,
        result.masks_full,
        problem.prob_before,
        prob_after,
        problem.top1_before,
        probabilities.argmax(dim=1),
    )
    scores = {
        "target_index": problem.targets,
        "target_name": None,  # the engine knows no class names: explain._render does
        "prob_before": problem.prob_before,
        "prob_after": prob_after,
        # The model's decision, from the pass that found prob_before: no pass of its own.
        "predicted_index": problem.top1_before,
        "predicted_name": None,
        # Ground truth is the item's, not the image's: explain._render sets it.
        "label_index": None,
        "label_name": None,
        "correct": None,
        "mask_area": mask_area(final),
        **vars(trust),  # how far to trust it: diagnostics.Diagnostics, every field a score
        # Measured from an item's two runs once both are done (explain._with_twins).
        "stability_iou": None,
        "stability_rank": None,
        "iterations": torch.tensor(iterations, dtype=torch.long),
        "stop_reason": ["converged" if c else "budget" for c in converged],
        # Wall time of the passes spent on the item, its share of each: run_slots adds it.
        "seconds": torch.zeros(n, dtype=torch.float64),
        "method": [params.method] * n,
        "precision": [problem.model.precision] * n,  # what the model's passes ran in
        **measured,
    }
    batch = Explanation(
        masks=final.float().cpu(),
        masks_full=_cpu(result.masks_full),
        substrate=result.substrate.float().cpu(),
        scores={name: _cpu(values) for name, values in scores.items()},
        levels=_cpu(result.levels),
        area_masks=_cpu(result.area_masks),
    )
    return [batch.row(i) for i in range(n)]
