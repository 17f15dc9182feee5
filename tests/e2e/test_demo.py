"""The one-machine path: embedded Redis, `explainctl demo`, `up`/`down`, and the report
rendered in a real headless browser."""

import json
import os

import redis

from tests.support import browser, cli

TINY = ["--model", "tests.support.models:tiny_classifier", "--image-size", "48", "--mask-size", "6",
        "--iterations", "10"]  # fmt: skip


def _embedded_env(tmp_path) -> dict[str, str]:
    """No broker and no output configured: everything must come from EXPLAINCTL_HOME."""
    env = {
        "EXPLAINCTL_HOME": str(tmp_path / "home"),
        "EXPLAINCTL_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
        "EXPLAINCTL_BROKER_URL": "",
        "EXPLAINCTL_OUTPUT": "",
    }
    return env


def test_demo_runs_the_pipeline_and_writes_a_report_a_browser_renders(tmp_path):
    env = _embedded_env(tmp_path)
    try:
        done = cli.run("demo", *TINY, "--json", timeout=300, **env)
        assert done.returncode == 0, done.stderr[-3000:]
        shown = json.loads(done.stdout)  # the one line
        report, job_id = shown["report"], shown["job_id"]
        assert report == str(tmp_path / "home" / "output" / job_id / "report.html")
        assert (shown["state"], shown["counts"]["done"]) == ("completed", 3)

        status = json.loads(cli.run("status", job_id, "--json", **env).stdout)
        assert status["state"] == "completed" and status["counts"]["done"] == 3

        dom = browser.dump_dom(tmp_path / "x" / ".." / report, tmp_path / "profile")
        data = browser.body_data(dom)
        assert data["rendered"] == "3"
        assert data["images-total"] == "9" and data["images-loaded"] == "9"
        cards = browser.card_values(dom)
        assert (cards["items"], cards["done"], cards["failed"]) == ("3", "3", "0")
        assert "chelsea" in dom and "coffee" in dom and "rocket" in dom
        assert "http://" not in dom.replace("http://www.w3.org", "")  # no network requests

        shot = browser.screenshot(tmp_path / report, tmp_path / "profile2", tmp_path / "r.png")
        assert shot.shape[0] > 500 and shot.std() > 20  # not a blank page
        # The first item's detail view, as an auditor opens it: its photos, in colour.
        shot = browser.screenshot(
            tmp_path / report, tmp_path / "profile3", tmp_path / "d.png", fragment="item=0"
        )
        assert (shot.reshape(-1, 3).std(axis=1) > 30).mean() > 0.01
    finally:
        down = cli.run("down", **env)
    # The demo stopped its own worker; the embedded Redis it started stays for `down`.
    assert down.stdout == "stopped 0 workers and the embedded Redis\n", down.stdout


def test_offline_demo_says_what_to_do_in_one_line(tmp_path):
    env = {
        **_embedded_env(tmp_path),
        "TORCH_HOME": str(tmp_path / "torch"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
    }
    try:
        done = cli.run("demo", timeout=120, **env)  # VGG19 with weights that cannot be fetched
        assert done.returncode == 3
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "--weights" in lines[0] and "--model" in lines[0]
        # It found that out before starting anything: no embedded Redis is left running.
        pid_file = tmp_path / "home" / "redis" / "redis.pid"
        assert not pid_file.exists(), f"left redis-server {pid_file.read_text().strip()} running"
    finally:
        cli.run("down", **env)


def test_up_submit_wait_down_with_nothing_configured(tmp_path):
    env = {
        **_embedded_env(tmp_path),
        "EXPLAINCTL_ALLOWED_MODELS": "tests.support.models:tiny_classifier",
    }
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for n in range(3):
        Image.new("RGB", (30, 20), (n * 80, 100, 200)).save(images / f"i{n}.png")
    try:
        up = cli.run("up", "--json", **env)
        assert up.returncode == 0, up.stderr
        started = json.loads(up.stdout)
        assert started["workers"] == 1 and started["home"] == str(tmp_path / "home")
        assert started["output"] == str(tmp_path / "home" / "output")
        assert started["broker"].startswith("redis://127.0.0.1:") and "@" not in started["broker"]
        url = (tmp_path / "home" / "redis" / "url").read_text().strip()
        assert oct((tmp_path / "home" / "redis" / "url").stat().st_mode)[-3:] == "600"
        try:
            redis.Redis.from_url(url.replace(url.split("@")[0] + "@", "redis://")).ping()
            raise AssertionError("the embedded Redis answered without its password")
        except redis.AuthenticationError:
            pass
        job = json.loads(cli.run("submit", str(images), "--json", *TINY, **env).stdout)
        waited = cli.run("wait", job["job_id"], "--json", "--interval", "0.2", timeout=180, **env)
        assert waited.returncode == 0, waited.stderr
        assert json.loads(waited.stdout)["counts"]["done"] == 3
        assert (tmp_path / "home" / "output" / job["job_id"] / "items.jsonl").exists()
    finally:
        down = cli.run("down", "--json", **env)
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout) == {"workers_stopped": 1, "redis_stopped": True}
    pids = (
        json.loads((tmp_path / "home" / "workers.json").read_text())
        if (tmp_path / "home" / "workers.json").exists()
        else []
    )
    assert pids == [] and not any(os.path.exists(f"/proc/{p}") for p in pids)
