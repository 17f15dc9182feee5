"""End to end: two jobs on the same images (two small models, two mask sizes) through real
workers, Redis and S3 (moto), compared with `explainctl compare` after one job's records
expired and again after it was forgotten by `prune`."""

import io
import json
import re
import time

import boto3
import numpy as np
from PIL import Image

from explainctl.jobs.keys import job_key
from explainctl.jobs.store import JobStore
from explainctl.pages.agreement import mask_agreement
from explainctl.spec.ids import new_job_id
from tests.support import browser, cli

TINY = ["--model", "tests.support.models:tiny_classifier", "--image-size", "32", "--mask-size", "8",
        "--iterations", "5"]  # fmt: skip
EVIDENCE = ["--model", "tests.support.models:evidence_detector", "--image-size", "64",
            "--mask-size", "4", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5",
            "--iterations", "5", "--seed", "1"]  # fmt: skip


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 28, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _lines(done) -> list[dict]:
    assert done.stdout, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def _object(s3, uri: str) -> bytes:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_compare_two_jobs_after_one_expired(s3_bucket, start_workers, worker_env, tmp_path):
    s3 = boto3.session.Session().client("s3")
    files = {"common/img1.png": _png(1), "common/img2.png": _png(2), "a/img0.png": _png(0),
             "b/img3.png": _png(3), "common/broken.png": b"not an image"}  # fmt: skip
    for key, data in files.items():
        s3.put_object(Bucket=s3_bucket, Key=f"images/{key}", Body=data)
    images = f"s3://{s3_bucket}/images"
    env = {**worker_env, "EXPLAINCTL_OUTPUT": f"s3://{s3_bucket}/audits"}
    start_workers(1, **env)

    jobs = {}
    for name, folder, flags in (("a", "a", TINY), ("b", "b", EVIDENCE)):
        done = cli.run("submit", f"{images}/common/", f"{images}/{folder}/", "--wait", "--json",
                       *flags, timeout=240, **env)  # fmt: skip
        assert done.returncode == 1, done.stderr  # broken.png failed, as planned
        jobs[name] = json.loads(done.stdout)["job_id"]
    records = {
        name: {r["uri"]: r for r in _lines(cli.run("results", job, "--json", **env))}
        for name, job in jobs.items()
    }

    # A's records expire through the store's own retention (its seal, with a short TTL).
    store = JobStore.connect(env["EXPLAINCTL_BROKER_URL"], job_ttl=1)
    assert store.seal(jobs["a"])
    deadline = time.monotonic() + 10
    while store.live(jobs["a"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not store.live(jobs["a"]) and store.live(jobs["b"])

    compared = cli.run("compare", jobs["a"], jobs["b"], "--json", **env)
    assert compared.returncode == 0, compared.stderr
    lines = _lines(compared)
    summary = lines[-1]
    pairs = {line["uri"].rsplit("/", 1)[1]: line for line in lines if line["kind"] == "pair"}
    assert [line["kind"] for line in lines].count("summary") == 1 and summary["kind"] == "summary"
    assert sorted(pairs) == ["broken.png", "img1.png", "img2.png"]
    assert {
        (x["kind"], x["uri"].rsplit("/", 1)[1]) for x in lines if x["kind"].startswith("only")
    } == {("only_a", "img0.png"), ("only_b", "img3.png")}
    assert (summary["paired"], summary["compared"], summary["only_a"], summary["only_b"]) == (
        3, 2, 1, 1,
    )  # fmt: skip
    assert summary["a"]["model"] == "tests.support.models:tiny_classifier"
    assert summary["b"]["model"] == "tests.support.models:evidence_detector"
    assert {"mask_size", "image_size", "seed"} <= set(summary["params_differ"])
    assert summary["a"]["params"]["mask_size"] == 8 and summary["b"]["params"]["mask_size"] == 4

    changed = 0
    for name in ("img1.png", "img2.png"):
        pair = pairs[name]
        a, b = records["a"][pair["uri"]], records["b"][pair["uri"]]
        for side, record in ((pair["a"], a), (pair["b"], b)):
            assert side["state"] == "done"
            assert (side["target_index"], side["prob_after"], side["mask_area"]) == (
                record["target_index"], record["prob_after"], record["mask_area"],
            )  # fmt: skip
        assert pair["delta_prob_after"] == b["prob_after"] - a["prob_after"]
        assert pair["class_changed"] == (a["target_index"] != b["target_index"])
        changed += pair["class_changed"]
        # The 8x8 and 4x4 masks in S3, compared independently of the command.
        masks = [np.load(io.BytesIO(_object(s3, r["artifacts"]["mask.npy"]))) for r in (a, b)]
        assert [m.shape for m in masks] == [(8, 8), (4, 4)]
        iou, rank = mask_agreement(*masks)
        assert 0 <= pair["iou"] <= 1 and pair["iou"] == iou and pair["rank"] == rank
    assert summary["class_changed"] == changed
    assert pairs["broken.png"]["iou"] is None and pairs["broken.png"]["note"] == "failed in A"
    assert summary["mean_iou"] == (pairs["img1.png"]["iou"] + pairs["img2.png"]["iou"]) / 2

    # Forgotten by Redis altogether (index entry gone, pruned): job.json still answers.
    store.redis.delete(job_key(jobs["a"], "index"))
    assert json.loads(cli.run("prune", "--json", **env).stdout)["forgotten"] >= 1
    page = tmp_path / "compare.html"
    made = cli.run("compare", jobs["a"], jobs["b"], "--out", str(page), **env)
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == str(page)
    dom = browser.dump_dom(page, tmp_path / "profile")
    data = browser.body_data(dom)
    assert data["rendered"] == "3"
    assert data["images-total"] == "4" and data["images-loaded"] == "4"  # broken.png has none
    cards = browser.card_values(dom)
    assert (cards["items paired"], cards["only in A"], cards["only in B"]) == ("3", "1", "1")
    assert cards["mean IoU"] == f"{summary['mean_iou']:.3f}"
    order = [uri.rsplit("/", 1)[1] for uri in re.findall(r'<tr data-uri="([^"]*)"', dom)]
    measured = sorted(("img1.png", "img2.png"), key=lambda n: (
        pairs[n]["iou"], not pairs[n]["class_changed"], pairs[n]["rank"], pairs[n]["a"]["index"]
    ))  # fmt: skip
    assert order == [*measured, "broken.png"]  # lowest IoU first, nothing to compare last

    unknown = cli.run("compare", jobs["a"], new_job_id(), **env)
    assert unknown.returncode == 5 and len(unknown.stderr.strip().splitlines()) == 1
    both = cli.run("compare", jobs["a"], jobs["b"], "--json", "--out", str(page), **env)
    assert both.returncode == 2 and "give one" in both.stderr
