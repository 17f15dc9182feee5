"""How a mask's faithfulness moves over its iterations: the curve the stop rule was built on.

    pip install -r benchmarks/requirements.txt
    PYTHONPATH=. python benchmarks/convergence.py --json benchmarks/results/convergence-cpu.json

Runs a method (`--method`: the original by default, or decisive) at a fixed budget (the
slot engine with the stop rule off) on the six photos of quality.py with
EfficientNet-Lite0, keeps every image's iterate every `--every` iterations, and scores
each kept iterate (blur deletion and insertion, `--steps` curve steps). Prints, per
checkpoint, the per-image scores, the mask area, and the drift rule's two quantities on
50-iteration blocks: the drift of the block average and the flicker inside the block
(convergence.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from machine import describe  # benchmarks/machine.py, beside this script
from quality import HALF, SIZE, setup

from explainctl.spec.methods import ExplainParams
from explainctl_worker.engine import slots
from explainctl_worker.engine.optim import RowOptimizer
from explainctl_worker.measures.faithfulness import (
    RISE_BLUR_KERNEL,
    RISE_BLUR_SIGMA,
    area_under_curve,
    pixel_ranks,
    replacement_curves,
    step_counts,
    tie_order,
)
from explainctl_worker.methods.mask import upsample
from explainctl_worker.methods.substrate import gaussian_blur


def iterates(model, images, targets, params: ExplainParams, every: int) -> dict[int, torch.Tensor]:
    """{t: (N, 1, s, s) masks after t iterations}, recorded while the slot engine runs: its
    optimiser steps are wrapped so every `every`-th one is kept."""
    kept: dict[int, torch.Tensor] = {}
    original = RowOptimizer.step
    count = {"steps": 0}

    def step(self, p, grad, steps, scale=None):
        original(self, p, grad, steps, scale)
        count["steps"] += 1
        done = count["steps"]
        if done % every == 0:
            kept[done] = p.detach().clamp(0, 1).clone()

    RowOptimizer.step = step
    try:
        entries = (slots.Entry(i, images[i], int(targets[i])) for i in range(images.shape[0]))
        list(slots.run_slots(model, entries, params, slots=images.shape[0], mean=HALF, std=HALF))
    finally:
        RowOptimizer.step = original
    return kept


def blocks(kept: dict[int, torch.Tensor], window: int, every: int) -> dict[int, dict]:
    """The rule's drift and flicker at each block end, from the kept iterates."""
    out = {}
    for end in range(2 * window, max(kept) + 1, window):
        block = torch.stack([kept[t] for t in range(end - window + every, end + 1, every)])
        before = torch.stack(
            [kept[t] for t in range(end - 2 * window + every, end - window + 1, every)]
        )
        drift = (block.mean(0) - before.mean(0)).abs().flatten(1).mean(1)
        flicker = block.std(0).flatten(1).mean(1)
        out[end] = {"drift": drift.tolist(), "flicker": flicker.tolist()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="original", help="original or decisive")
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--score-every", type=int, default=20)
    parser.add_argument("--steps", type=int, default=56, help="curve steps (RISE: 224)")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()

    model, names, images, x, probs = setup()
    targets = probs.argmax(dim=1)
    params = ExplainParams(method=args.method, iterations=args.iterations, early_stop=False)
    kept = iterates(model, images, targets, params, args.every)

    blurred = gaussian_blur(x, RISE_BLUR_KERNEL, RISE_BLUR_SIGMA)
    counts = step_counts(SIZE * SIZE, args.steps)
    order = tie_order(SIZE * SIZE)
    checkpoints = {}
    with torch.no_grad():
        for t in sorted(kept):
            if t % args.score_every:
                continue
            ranks = pixel_ranks(1 - upsample(kept[t], (SIZE, SIZE)), order)
            curves = replacement_curves(
                model, torch.stack([x, blurred]), torch.stack([blurred, x]), ranks, counts,
                targets, 16,
            )  # fmt: skip
            aucs = area_under_curve(curves, counts.float() / (SIZE * SIZE))
            checkpoints[t] = {
                "deletion_auc_blur": aucs[0].tolist(),
                "insertion_auc": aucs[1].tolist(),
                "mask_area": (1 - kept[t]).flatten(1).mean(1).tolist(),
            }
            print(json.dumps({"iterations": t, **checkpoints[t]}), flush=True)
    report = {
        "machine": describe(),
        "params": params.model_dump(mode="json"),
        "images": names,
        "steps": args.steps,
        "checkpoints": checkpoints,
        "blocks": blocks(kept, params.early_stop_window, args.every),
    }
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
