"""`explainctl explain` end to end, through the real console script."""

import json

import numpy as np
from PIL import Image

from explainctl.spec.contracts import ARTIFACT_FILES
from explainctl.spec.results import ItemResult
from tests.support import cli
from tests.support.models import evidence_image

SMALL = [
    "--model",
    "tests.support.models:evidence_detector",
    "--mean",
    "0.5,0.5,0.5",
    "--std",
    "0.5,0.5,0.5",
    "--image-size",
    "64",
    "--mask-size",
    "16",
    "--iterations",
    "60",
]


def _images(tmp_path):
    good_png = tmp_path / "evidence.png"
    Image.fromarray(evidence_image()).save(good_png)
    good_jpg = tmp_path / "sub" / "evidence.jpg"  # same stem: gets its own folder
    good_jpg.parent.mkdir()
    Image.fromarray(evidence_image()).save(good_jpg, quality=100)
    broken = tmp_path / "broken.jpg"
    broken.write_text("this is not a picture")
    return good_png, good_jpg, broken


def test_explain_writes_artifacts_and_reports_failures(tmp_path):
    good_png, good_jpg, broken = _images(tmp_path)
    out = tmp_path / "out"
    done = cli.run(
        "explain",
        str(good_png),
        str(good_jpg),
        str(broken),
        "--out",
        str(out),
        "--json",
        "--batch-size",
        "2",
        *SMALL,
    )
    assert done.returncode == 1, done.stderr  # one image failed, the others finished
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["state"] for line in lines] == ["done", "done", "failed"]
    assert lines[2]["error_code"] == "unsupported-format"
    assert "Traceback" not in done.stderr
    for name, size in (("evidence", (64, 64)), ("evidence-2", (64, 64))):
        folder = out / name
        assert sorted(p.name for p in folder.iterdir()) == sorted(ARTIFACT_FILES)
        result = ItemResult.model_validate_json((folder / "result.json").read_text())
        assert result.target_index == 0 and result.prob_after < result.prob_before
        assert Image.open(folder / "overlay.png").size == size
        assert np.load(folder / "mask.npy").shape == (16, 16)
    assert not (out / "broken").exists()


def test_explain_summary_lines_without_json(tmp_path):
    good_png, _, _ = _images(tmp_path)
    done = cli.run("explain", str(good_png), "--out", str(tmp_path / "o"), *SMALL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok evidence: class 0")


def test_labels_name_a_custom_models_classes(tmp_path):
    good_png, _, _ = _images(tmp_path)
    labels = tmp_path / "labels.txt"
    labels.write_text("evidence box\nplain texture\n")
    out = tmp_path / "o"
    done = cli.run("explain", str(good_png), "--out", str(out), "--labels", str(labels),
                   "--target", "Plain Texture", *SMALL)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok evidence: class 1 plain texture"), done.stdout
    result = ItemResult.model_validate_json((out / "evidence" / "result.json").read_text())
    assert (result.target_index, result.target_name) == (1, "plain texture")


def test_bad_parameters_are_one_line_errors(tmp_path):
    good_png, _, _ = _images(tmp_path)
    for extra, code, fragment in (
        (["--iterations", "-5"], 2, "iterations"),
        (["--param", "lr=nan"], 2, "finite"),
        (["--param", "bogus=1"], 2, "unknown parameter"),
        (["--model", "no_such_model"], 3, "unknown model"),
        (["--model", "resnet18", "--weights", "/missing.pth"], 3, "not found"),
        (["--labels", "/missing-labels.txt"], 2, "cannot read the labels file"),
    ):
        done = cli.run("explain", str(good_png), "--out", str(tmp_path / "o"), *SMALL, *extra)
        assert done.returncode == code, (extra, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], (extra, done.stderr)


def test_hub_models_name_the_right_class_with_their_own_preprocessing(tmp_path):
    """No normalisation flags: each model's own mean, std, size and resampling make it
    name its class (ImageNet's statistics would make it name another, as the flags show)."""
    from tests.support import hub

    image = hub.photo(tmp_path / "photo.png")
    weights = hub.timm_state_dict(tmp_path, image)
    vit = hub.hf_directory(tmp_path, image)
    quick = ["--iterations", "2", "--mask-size", "8", "--no-early-stop"]
    imagenet = ["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]
    cases = [
        (["--model", f"timm:{hub.TIMM_NAME}", "--weights", str(weights)], hub.TIMM_PREP,
         "tabby", "goldfish"),
        (["--model", str(vit)], hub.HF_PREP, "cat", "apple"),
    ]  # fmt: skip
    for number, (model, prep, name, other) in enumerate(cases):
        # ImageNet's statistics by flag once: they override, and the class changes.
        runs = [([], name), (imagenet, other)] if number == 0 else [([], name)]
        for flags, expected in runs:
            out = tmp_path / f"out-{number}-{len(flags)}"
            done = cli.run(
                "explain", str(image), "--out", str(out), *model, *quick, *flags, HF_HUB_OFFLINE="1"
            )
            assert done.returncode == 0, done.stderr
            (result_file,) = out.glob("*/result.json")
            result = ItemResult.model_validate_json(result_file.read_text())
            assert result.target_name == expected
            resolved = result.resolved_model
            assert (resolved.image_size, resolved.interpolation) == (
                prep["image_size"],
                prep["interpolation"],
            )
            assert result.params.image_size == prep["image_size"]
            assert resolved.mean == (prep["mean"] if not flags else hub.IMAGENET[0])


def test_explain_takes_directories_lists_and_stdin_like_submit(tmp_path):
    rng = np.random.default_rng(0)
    for folder in ("a", "b"):  # the same stem twice: each gets its own OUT/ folder
        (tmp_path / "photos" / folder).mkdir(parents=True)
        pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "photos" / folder / "cat.png")
    Image.fromarray(evidence_image()).save(tmp_path / "listed.png")
    Image.fromarray(evidence_image()).save(tmp_path / "piped.png")
    (tmp_path / "audit.csv").write_text("uri,target\nlisted.png,1\n")
    (tmp_path / "names").write_text(f"{tmp_path / 'photos' / 'a' / 'cat.png'}\n")
    out = tmp_path / "out"
    tiny = ["--model", "tests.support.models:tiny_classifier", "--image-size", "32",
            "--mask-size", "4", "--iterations", "3"]  # fmt: skip
    done = cli.run(
        "explain", str(tmp_path / "photos"), str(tmp_path / "audit.csv"), f"@{tmp_path / 'names'}",
        "-", "--out", str(out), "--json", "--target", "0", *tiny,
        input=f"{tmp_path / 'piped.png'}\n",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(line["item"], line["target_index"]) for line in lines] == [
        ("cat", 0),
        ("cat-2", 0),
        ("listed", 1),  # the list's own target over --target
        ("cat-3", 0),  # a file named twice is explained twice, into folders of its own
        ("piped", 0),
    ]
    assert sorted(p.name for p in out.iterdir()) == ["cat", "cat-2", "cat-3", "listed", "piped"]
    assert lines[0]["source"].endswith("photos/a/cat.png")
