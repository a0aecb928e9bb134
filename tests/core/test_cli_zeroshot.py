"""``polymodal zeroshot`` as a user types it."""

import json
import subprocess
import sys

import pytest
import torch

from polymodal import create_model, from_pretrained, get_preprocess, get_tokenizer
from polymodal.cli import main
from polymodal.datasets import colour_prompts, decode_image, write_synthetic
from polymodal.tasks import ZeroShotClassifier
from tests.helpers import cli_fails


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs") / "heldout"
    write_synthetic("shapes", root, n=40, split="heldout", seed=0, format="csv", progress=False)
    return root


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("zs_model") / "model"
    torch.manual_seed(0)
    create_model("clip-vit-tiny").save_pretrained(path)
    return path


def _rows(index_csv):
    import csv

    with open(index_csv, newline="") as f:
        return list(csv.DictReader(f))


def test_json_output_equals_the_python_classifier(random_model, heldout, capsys):
    labels = ["circle", "square", "triangle"]
    code = main(["zeroshot", str(heldout / "images"), "--model", str(random_model), "--labels", ",".join(labels)])
    assert code == 0
    text = capsys.readouterr().out
    assert text.count("  1. ") == 40 and str(heldout / "images" / "000000.png") in text
    assert (
        main(
            [
                "zeroshot",
                str(heldout / "images"),
                "--model",
                str(random_model),
                "--labels",
                "circle,square,triangle",
                "--top-k",
                "2",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    files = sorted((heldout / "images").glob("*.png"))
    assert [r["input"] for r in out["results"]] == [str(f) for f in files]

    model = from_pretrained(random_model).eval()
    from polymodal.tasks import SIMPLE_IMAGE_TEMPLATES

    clf = ZeroShotClassifier(model, get_tokenizer(model), labels, SIMPLE_IMAGE_TEMPLATES)
    x = torch.stack([get_preprocess(model, "image")(decode_image(f)) for f in files])
    proba = clf.predict_proba(x)
    for row, p in zip(out["results"], proba):
        assert len(row["ranking"]) == 2
        top = p.topk(2)
        assert [r["label"] for r in row["ranking"]] == [labels[i] for i in top.indices.tolist()]
        assert [r["probability"] for r in row["ranking"]] == pytest.approx(top.values.tolist(), abs=1e-5)


@pytest.mark.slow
def test_trained_model_names_colours_from_the_command_line(trained_shapes_run, heldout, tmp_path):
    names, templates = colour_prompts()
    template_file = tmp_path / "templates.txt"
    template_file.write_text("# colour prompts\n" + "\n".join(templates) + "\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "polymodal",
            "zeroshot",
            str(heldout / "images"),
            "--model",
            str(trained_shapes_run),
            "--labels",
            ",".join(names),
            "--templates",
            str(template_file),
            "--top-k",
            "3",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)["results"]
    truth = {str(heldout / r["image"]): r["colour"] for r in _rows(heldout / "index.csv")}
    top1 = sum(r["ranking"][0]["label"] == truth[r["input"]] for r in results) / len(results)
    assert len(results) == 40 and top1 >= 0.9
    probs = [sum(x["probability"] for x in r["ranking"]) for r in results]
    assert all(0 < p <= 1 + 1e-6 for p in probs)


def test_multi_label_reports_labels_over_the_threshold(random_model, heldout, capsys):
    args = [
        "zeroshot",
        str(heldout / "images" / "000000.png"),
        "--model",
        str(random_model),
        "--labels",
        "a,b,c",
        "--multi-label",
        "--threshold",
        "0.0",
        "--json",
    ]
    assert main(args) == 0
    (row,) = json.loads(capsys.readouterr().out)["results"]
    assert row["labels"] == ["a", "b", "c"]  # every probability is >= 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--labels", ""], "empty label"),
        (["--labels", "a,,b"], "empty label"),
        (["--labels", "a,b,a"], "repeats labels"),
        (["--labels-file", "/nonexistent/labels.txt"], "label file /nonexistent/labels.txt does not exist"),
        ([], "exactly one of --labels"),
        (["--labels", "a,b", "--top-k", "0"], "--top-k must be at least 1"),
        (["--labels", "a,b", "--templates", "/nonexistent.txt"], "no such file"),
    ],
)
def test_bad_labels_and_options_fail_clearly(random_model, heldout, capsys, extra, message):
    assert main(["zeroshot", str(heldout / "images"), "--model", str(random_model), *extra]) == 2
    assert message in capsys.readouterr().err


def test_bad_inputs_and_models_fail_clearly(random_model, heldout, tmp_path, capsys):
    labels = ["--labels", "a,b"]
    assert main(["zeroshot", str(tmp_path / "missing.png"), "--model", str(random_model), *labels]) == 2
    assert "missing.png does not exist" in capsys.readouterr().err
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    assert main(["zeroshot", str(not_image), "--model", str(random_model), *labels]) == 2
    assert "notes.png is not a readable image" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["zeroshot", str(empty), "--model", str(random_model), *labels]) == 2
    assert "holds no image files" in capsys.readouterr().err
    assert main(["zeroshot", str(heldout / "images"), "--model", "clip-vit-tiny", *labels]) == 2
    assert "random weights" in capsys.readouterr().err
    assert main(["zeroshot", str(heldout / "images"), "--model", str(tmp_path / "nope"), *labels]) == 2
    assert "no such model directory" in capsys.readouterr().err
    bad_templates = tmp_path / "t.txt"
    bad_templates.write_text("a photo without a slot\n")
    assert (
        main(
            [
                "zeroshot",
                str(heldout / "images"),
                "--model",
                str(random_model),
                *labels,
                "--templates",
                str(bad_templates),
            ]
        )
        == 2
    )
    assert "exactly one '{}'" in capsys.readouterr().err


SHAPES = ["circle", "square", "triangle", "star", "cross", "ring"]


def test_accuracy_against_the_label_column_of_an_index_file(random_model, heldout):
    """``--label-column``: top-1, top-5 and per-class accuracy of the user's own labelled file, equal to
    a naive zero-shot classifier computed here; labels that are not class names are a one-line error."""
    from polymodal.tasks import SIMPLE_IMAGE_TEMPLATES

    index = heldout / "index.csv"
    cmd = [sys.executable, "-m", "polymodal", "zeroshot", str(index), "--model", str(random_model)]
    proc = subprocess.run(
        [*cmd, "--labels", ",".join(SHAPES), "--label-column", "shape", "--json"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)

    rows = _rows(index)
    model = from_pretrained(random_model).eval()
    tokenizer = get_tokenizer(model)
    x = torch.stack([get_preprocess(model, "image")(decode_image(heldout / r["image"])) for r in rows])
    with torch.no_grad():
        image_emb = model.encode_image(x, normalize=True)
        weights = []
        for name in SHAPES:
            emb = model.encode_text(tokenizer([t.format(name) for t in SIMPLE_IMAGE_TEMPLATES]), normalize=True)
            weights.append(emb.mean(0) / emb.mean(0).norm())
    scores = image_emb @ torch.stack(weights).T  # (40, 6)
    truth = torch.tensor([SHAPES.index(r["shape"]) for r in rows])
    ranks = (scores >= scores.gather(1, truth[:, None])).sum(1)  # a tie counts against the true class
    acc = out["accuracy"]
    assert acc["num_samples"] == len(rows) == 40
    assert acc["top1"] == pytest.approx((ranks == 1).float().mean().item())
    assert acc["top5"] == pytest.approx((ranks <= 5).float().mean().item())
    for c, name in enumerate(SHAPES):
        if (truth == c).any():
            assert acc["per_class"][name] == pytest.approx((ranks[truth == c] == 1).float().mean().item()), name
    assert [r["input"] for r in out["results"]] == [str(heldout / r["image"]) for r in rows]
    assert [r["true_label"] for r in out["results"]] == [r["shape"] for r in rows]

    proc = subprocess.run(
        [*cmd, "--labels", ",".join(SHAPES), "--label-column", "shape"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert f"accuracy against column 'shape' (40 inputs): top-1 {100 * acc['top1']:.1f}%" in proc.stdout

    proc = subprocess.run(
        [*cmd, "--labels", "circle,square,star", "--label-column", "shape"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    missing = sorted({r["shape"] for r in rows} - {"circle", "square", "star"})
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and f"holds labels that are not among the 3 class names: {missing}" in line


def test_label_column_needs_one_index_file(random_model, heldout, capsys):
    model = str(random_model)
    labels = ["--labels", ",".join(SHAPES)]
    cli_fails(
        ["zeroshot", str(heldout / "images"), "--model", model, *labels, "--label-column", "shape"],
        capsys,
        "--label-column reads one index file",
    )
    cli_fails(
        ["zeroshot", str(heldout / "index.csv"), "--model", model, *labels, "--label-column", "kind"], capsys, "kind"
    )
    cli_fails(
        ["zeroshot", str(heldout / "images"), "--model", model, *labels, "--input-column", "image"],
        capsys,
        "needs --label-column",
    )
