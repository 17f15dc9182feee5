"""How the audit report scales: build time, file size and how soon Chromium shows it, for
N items, side by side: A, the items of an older job (the gallery's thumbnails made from
three full-size files per item), and B, the items as workers write them now (the
gallery reads each item's thumbs.webp).

    python benchmarks/report.py --items 1000 [--images noise]

Makes N items whose original (JPEG), overlay, perturbed and mask images (PNG) are 640x480
on disk, the sizes a real job produces: by default made from the bundled photos (the
overlay a heat tint over the photo, the perturbed image a blur of a region), with
`--images noise` uniform noise, the worst case for any image codec. Their diagnostics
raise every trust flag. It builds the report exactly as `explainctl report` does, then
opens it in headless Chromium and reads what the page recorded: the milliseconds from the
start of navigation until the first gallery page was drawn with its thumbnails decoded
(what a person waits for), and, as a whole, the wall time of a screenshot run (browser
start, load, paint).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import describe  # benchmarks/machine.py, beside this script
from PIL import Image, ImageFilter

from explainctl.io.sources import read_uri
from explainctl.pages.report import build_report
from explainctl.spec.contracts import THUMB_PARTS, THUMBS_WEBP
from explainctl.spec.results import ItemRecord
from explainctl_worker.artifact import thumbs

EXAMPLES = Path(__file__).parents[1] / "src" / "explainctl" / "examples"
SIZE = (640, 480)


def photo_files(folder: Path) -> list[dict[str, str]]:
    """Per bundled photo, its original, overlay, perturbed and mask files."""
    files = []
    for n, path in enumerate(sorted(EXAMPLES.glob("*.jpg"))):
        photo = Image.open(path).convert("RGB").resize(SIZE)
        # A smooth blob of deletion, as a mask looks: 1 kept, 0 deleted.
        yy, xx = np.mgrid[0 : SIZE[1], 0 : SIZE[0]]
        blob = np.exp(-(((xx - 200 - 80 * n) / 120) ** 2 + ((yy - 240) / 90) ** 2))
        mask = Image.fromarray((255 * (1 - blob)).astype(np.uint8))
        heat = Image.fromarray(np.dstack([255 * blob, 60 * blob, 0 * blob]).astype(np.uint8))
        blurred = photo.filter(ImageFilter.GaussianBlur(10))
        made = {
            "original": (photo, "JPEG"),
            "overlay": (Image.blend(photo, heat, 0.45), "PNG"),
            "perturbed": (Image.composite(photo, blurred, mask), "PNG"),
            "mask": (mask, "PNG"),
        }
        files.append({})
        for kind, (image, fmt) in made.items():
            files[-1][kind] = str(folder / f"{path.stem}-{kind}.{fmt.lower()}")
            image.save(files[-1][kind], format=fmt, quality=90)
        _thumbs(folder / f"{path.stem}-thumbs.webp", files[-1])
    return files


def _thumbs(path: Path, files: dict[str, str]) -> None:
    """thumbs.webp, as the worker writes it (explainctl_worker.artifact.thumbs)."""
    path.write_bytes(thumbs([Image.open(files[kind]).convert("RGB") for kind in THUMB_PARTS]))
    files["thumbs"] = str(path)


def noise_files(folder: Path) -> list[dict[str, str]]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
    files = {}
    for shift, kind in enumerate(("original", "overlay", "perturbed", "mask")):
        files[kind] = str(folder / f"noise-{kind}.png")
        Image.fromarray(np.roll(base, shift * 40, axis=1)).save(files[kind])
    _thumbs(folder / "noise-thumbs.webp", files)
    return [files]


def make_items(files: list[dict[str, str]], n: int, with_thumbs: bool) -> list[ItemRecord]:
    records = []
    for i in range(n):
        failed = i % 50 == 49
        paths = files[i % len(files)]
        records.append(
            ItemRecord(
                index=i,
                uri=paths["original"],
                item=f"{i:06d}-photo",
                state="failed" if failed else "done",
                error_code="corrupt" if failed else None,
                error="truncated" if failed else None,
                artifacts={}
                if failed
                else {f"{kind}.png": paths[kind] for kind in ("overlay", "perturbed", "mask")}
                | ({THUMBS_WEBP: paths["thumbs"]} if with_thumbs else {}),
                target_index=i % 10,
                target_name=f"class {i % 10}",
                prob_before=0.9,
                prob_after=0.1 + (i % 7) / 10,
                mask_area=(i % 13) / 13,
                # Diagnostics spread so that every trust flag and histogram has items.
                prob_ratio=(0.1 + (i % 7) / 10) / 0.9,
                class_changed=i % 3 == 0,
                compactness=(i % 11) / 10,
                stability_iou=(i % 17) / 16,
                seconds=1.0,
            )  # fmt: skip
        )
    return records


def _chromium(folder: Path, page: Path, *extra: str) -> subprocess.CompletedProcess:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1300,1000", f"--user-data-dir={folder / 'profile'}", *extra,
         page.as_uri()],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--images", choices=("photo", "noise"), default="photo")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = (photo_files if args.images == "photo" else noise_files)(folder)
        status = {
            "job_id": "01m8m5ytrjk834w7f5", "state": "completed_with_failures",
            "total": args.items, "counts": {"queued": 0, "running": 0, "done": 0, "failed": 0,
            "cancelled": 0}, "created": time.time() - 600, "finished_at": time.time(),
            "info": {"model": {"name": "vgg19"}, "params": {}, "output": str(folder)},
        }  # fmt: skip
        for path_name, with_thumbs in (("A: full-size files", False), ("B: thumbs.webp", True)):
            records = make_items(files, args.items, with_thumbs)
            measure(folder, status, records, args, path_name)


def measure(folder: Path, status: dict, records: list[ItemRecord], args, path_name: str) -> None:
    started = time.perf_counter()
    page = build_report(status, records, lambda uri: read_uri(uri, max_bytes=1 << 28))
    build = time.perf_counter() - started
    path = folder / "report.html"
    path.write_text(page)
    # What the page's script set on <body> (its dump is the whole page: not timed).
    dom = _chromium(folder, path, "--dump-dom").stdout
    body = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', re.search(r"<body([^>]*)>", dom)[1]))
    started = time.perf_counter()
    _chromium(folder, path, f"--screenshot={folder / 'shot.png'}")
    screenshot = time.perf_counter() - started
    print(
        json.dumps(
            {
                "items": args.items,
                "images": args.images,
                "gallery": path_name,
                "build_seconds": round(build, 2),
                "html_mib": round(len(page) / 2**20, 2),
                "first_page_drawn": body["rendered"] == "50",
                "first_page_with_thumbnails_ms": int(body.get("images-ms", -1)),
                "thumbnails_loaded": f"{body.get('images-loaded')}/{body.get('images-total')}",
                "chromium_screenshot_seconds": round(screenshot, 2),
                "machine": describe(),
            }
        )
    )


if __name__ == "__main__":
    main()
