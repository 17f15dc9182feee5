"""Does early stopping keep the masks? Runs the engine with and without it and compares.

    PYTHONPATH=. python benchmarks/early_stop.py

Uses the known-evidence test model (tests/models.py), where the right mask is known:
the evidence box deleted, the distractor box kept. Reports, per setting, iterations run,
final probability of the target, mask area, evidence and distractor deletion, and the mean
absolute difference to the full-length mask.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from explainctl.contracts import ExplainParams
from explainctl_worker.engine import explain_batch
from tests.models import DISTRACTOR_BOX, EVIDENCE_BOX, SIZE, evidence_detector, evidence_image

HALF = (0.5, 0.5, 0.5)


def deleted(mask_up: torch.Tensor, box) -> float:
    top, bottom, left, right = box
    return round(float((1 - mask_up[:, 0, top:bottom, left:right]).mean()), 4)


def run(params: ExplainParams, images: torch.Tensor):
    started = time.perf_counter()
    result = explain_batch(evidence_detector(), images, params, mean=HALF, std=HALF)
    seconds = time.perf_counter() - started
    mask_up = F.interpolate(result.masks, size=(SIZE, SIZE), mode="bilinear")
    return result, seconds, mask_up


def main() -> None:
    base = torch.from_numpy(evidence_image()).permute(2, 0, 1).float().div(255)
    # Eight variants: the same scene at different contrasts, so masks converge at different speeds.
    images = torch.stack([0.5 + (base - 0.5) * c for c in torch.linspace(0.55, 1.0, 8)])
    full_params = ExplainParams(image_size=SIZE, mask_size=16)
    full, full_seconds, full_up = run(full_params, images)
    rows = [
        {
            "setting": "full 500",
            "mean_iterations": 500,
            "seconds": round(full_seconds, 2),
            "prob_after": round(float(full.prob_after.mean()), 4),
            "mask_area": round(float(full.mask_area.mean()), 4),
            "evidence_deleted": deleted(full_up, EVIDENCE_BOX),
            "distractor_deleted": deleted(full_up, DISTRACTOR_BOX),
            "mean_abs_mask_diff": 0.0,
        }
    ]
    for window, tol in ((50, 1e-3), (50, 1e-4), (25, 1e-3)):
        params = full_params.model_copy(
            update={"early_stop": True, "early_stop_window": window, "early_stop_tol": tol}
        )
        result, seconds, mask_up = run(params, images)
        rows.append(
            {
                "setting": f"early stop window {window} tol {tol:g}",
                "mean_iterations": float(result.iterations.float().mean()),
                "seconds": round(seconds, 2),
                "prob_after": round(float(result.prob_after.mean()), 4),
                "mask_area": round(float(result.mask_area.mean()), 4),
                "evidence_deleted": deleted(mask_up, EVIDENCE_BOX),
                "distractor_deleted": deleted(mask_up, DISTRACTOR_BOX),
                "mean_abs_mask_diff": round(float((result.masks - full.masks).abs().mean()), 4),
            }
        )
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
