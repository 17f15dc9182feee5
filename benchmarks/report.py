"""How the audit report scales: build time, file size and browser render time for N items.

    python benchmarks/report.py --items 1000

Makes N items whose original, overlay, perturbed and mask images are 640x480 photo-like
PNGs on disk (the sizes a real job produces), with diagnostics that raise every trust
flag, builds the report exactly as `explainctl report` does, and times headless Chromium
loading it until the first page of the gallery is drawn.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import describe  # benchmarks/machine.py, beside this script
from PIL import Image

from explainctl.item import ItemRecord
from explainctl.report import build_report
from explainctl.sources import read_uri


def make_items(folder: Path, n: int) -> list[ItemRecord]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    paths = []
    for kind in ("original", "overlay", "perturbed", "mask"):
        path = folder / f"{kind}.png"
        Image.fromarray(np.roll(base, len(paths) * 40, axis=1)).save(path)
        paths.append(str(path))
    records = []
    for i in range(n):
        failed = i % 50 == 49
        records.append(
            ItemRecord(
                index=i,
                uri=paths[0],
                item=f"{i:06d}-photo",
                state="failed" if failed else "done",
                error_code="corrupt" if failed else None,
                error="truncated" if failed else None,
                artifacts={}
                if failed
                else {"overlay.png": paths[1], "perturbed.png": paths[2], "mask.png": paths[3]},
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        records = make_items(folder, args.items)
        status = {
            "job_id": "01m8m5ytrjk834w7f5", "state": "completed_with_failures",
            "total": args.items, "counts": {"queued": 0, "running": 0, "done": 0, "failed": 0,
            "cancelled": 0}, "created": time.time() - 600, "finished_at": time.time(),
            "info": {"model": {"name": "vgg19"}, "params": {}, "output": str(folder)},
        }  # fmt: skip
        started = time.perf_counter()
        page = build_report(status, records, lambda uri: read_uri(uri, max_bytes=1 << 28))
        build = time.perf_counter() - started
        path = folder / "report.html"
        path.write_text(page)
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        started = time.perf_counter()
        dom = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={folder / 'profile'}", "--dump-dom", path.as_uri()],
            capture_output=True, text=True, timeout=300,
        ).stdout  # fmt: skip
        render = time.perf_counter() - started
        rendered = 'data-rendered="50"' in dom
    print(
        json.dumps(
            {
                "items": args.items,
                "build_seconds": round(build, 2),
                "html_mib": round(len(page) / 2**20, 2),
                "chromium_load_and_draw_seconds": round(render, 2),
                "first_page_drawn": rendered,
                "machine": describe(),
            }
        )
    )


if __name__ == "__main__":
    main()
