"""Time the perturbation engine: images per second and seconds per iteration.

    python benchmarks/engine.py --model vgg19 --random-weights --batch-size 4 --iterations 20

Weights do not change the time, so `--random-weights` lets a torchvision model be timed
on a machine that cannot download its weights. Writes one JSON object (stdout and --json).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from machine import describe  # benchmarks/machine.py, beside this script

from explainctl.spec.contracts import ModelSpec
from explainctl.spec.methods import ExplainParams
from explainctl_worker.engine.batch import explain_batch
from explainctl_worker.model import ModelCache, pick_device


def load(name: str, random_weights: bool, device: torch.device) -> torch.nn.Module:
    if random_weights:
        from torchvision import models

        module = models.get_model(name, weights=None)
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        return module.to(device).eval()
    return ModelCache().get(ModelSpec(name=name), device).module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg19")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--mask-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", dest="json_path", default=None, help="Append the result here.")
    args = parser.parse_args()

    device = pick_device(args.device)
    model = load(args.model, args.random_weights, device)
    params = ExplainParams(
        iterations=args.iterations, image_size=args.image_size, mask_size=args.mask_size
    )
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)

    explain_batch(model, images, params.model_copy(update={"iterations": 2}))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    explain_batch(model, images, params)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started

    result = {
        "model": args.model,
        "device": str(device),
        "image_size": args.image_size,
        "mask_size": args.mask_size,
        "batch_size": args.batch_size,
        "iterations": args.iterations,
        "seconds": round(seconds, 3),
        "seconds_per_iteration": round(seconds / args.iterations, 4),
        "images_per_second_at_500_iterations": round(
            args.batch_size / (seconds / args.iterations * 500), 4
        ),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": describe(),
    }
    print(json.dumps(result))
    if args.json_path:
        with open(args.json_path, "a") as handle:
            handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
