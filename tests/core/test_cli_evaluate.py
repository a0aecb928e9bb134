"""``polymodal evaluate``, run as a user types it, against naive computations of what it prints."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys

import pytest
import torch

from polymodal import create_model, from_pretrained, get_preprocess, get_tokenizer
from polymodal.cli import main
from polymodal.datasets import ShapesDataset, collate_samples, write_synthetic
from tests.helpers import cli_fails, expected_recall_line, naive_ranks, printed_recall_line


def fits_of(meta: list[dict]) -> tuple[list[set[int]], list[set[int]]]:
    """Naively: image j answers caption i when it has every attribute caption i mentions."""
    mentions = [m["mentions"] if isinstance(m["mentions"], list) else json.loads(m["mentions"]) for m in meta]
    fits = [
        {j for j, other in enumerate(meta) if all(other[a] == meta[i][a] for a in mentions[i])}
        for i in range(len(meta))
    ]
    captions_of = [{i for i in range(len(meta)) if j in fits[i]} for j in range(len(meta))]
    return fits, captions_of


def naive_zero_shot(model, tokenizer, image_emb, labels: list[str], classes: list[str], templates) -> float:
    weights = []
    with torch.no_grad():
        for name in classes:
            emb = model.encode_text(tokenizer([t.format(name) for t in templates]), normalize=True).mean(0)
            weights.append(emb / emb.norm())
    predicted = (image_emb @ torch.stack(weights).T).argmax(1).tolist()
    return sum(classes[p] == y for p, y in zip(predicted, labels)) / len(labels)


@pytest.mark.slow
def test_evaluate_a_training_run_as_a_user_types_it(trained_shapes_run, tmp_path):
    from polymodal.datasets import colour_prompts, shape_prompts

    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "polymodal", "evaluate", "--model", str(trained_shapes_run), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "built-in shapes, 200 held-out, seed 0: 200 pairs" in proc.stdout  # the run's own held-out split

    # the same 200 held-out images, embedded directly
    model = from_pretrained(trained_shapes_run).eval()
    tokenizer = get_tokenizer(model)
    size = model.config.towers["image"].args["image_size"]
    data = ShapesDataset(
        "heldout", 200, 0, image_size=size, tokenizer=tokenizer, transform=get_preprocess(model, "image")
    )
    batch = collate_samples([data[i] for i in range(len(data))])
    with torch.no_grad():
        image_emb = model.encode_image(batch.inputs["image"], normalize=True)
        text_emb = model.encode_text(batch.inputs["text"], normalize=True)
    fits, captions_of = fits_of(batch.meta)
    assert printed_recall_line(proc.stdout, "text -> image") == expected_recall_line(
        naive_ranks(text_emb, image_emb, fits)
    )
    assert printed_recall_line(proc.stdout, "image -> text") == expected_recall_line(
        naive_ranks(image_emb, text_emb, captions_of)
    )

    for attr, (classes, templates) in {"colour": colour_prompts(), "shape": shape_prompts()}.items():
        accuracy = naive_zero_shot(model, tokenizer, image_emb, [m[attr] for m in batch.meta], classes, templates)
        line = next(x for x in proc.stdout.splitlines() if f"zero-shot by {attr}:" in x)
        assert re.search(r"top-1 ([\d.]+)%", line).group(1) == f"{100 * accuracy:.1f}"
        assert "unseen combinations" in line
        if attr == "colour":
            assert accuracy >= 0.6  # the short training run tells colours apart (chance 12.5%)

    # --out: the metrics as JSON (the trainer's own evaluation of the final weights agrees) and a retrieval grid
    result = json.loads((out / "metrics.json").read_text())
    report = json.loads((trained_shapes_run / "report.json").read_text())
    assert result["samples"] == 200
    for key, value in report["eval"].items():
        assert result["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert (out / "retrieval_grid.png").stat().st_size > 0
    before = (out / "metrics.json").read_bytes()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and "exists; pass --overwrite" in proc.stderr
    assert (out / "metrics.json").read_bytes() == before


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_evaluate")
    torch.manual_seed(0)
    create_model("clip-vit-tiny").save_pretrained(root / "model")
    csv_path = write_synthetic("shapes", root / "shapes", n=24, split="heldout", image_size=48, progress=False)
    return {"root": root, "model": root / "model", "csv": csv_path}


def test_evaluate_on_an_index_file(files, capsys):
    assert main(["evaluate", "--model", str(files["model"]), "--data", str(files["csv"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 24 and result["data"] == str(files["csv"])
    assert not any(k.startswith("zeroshot/") for k in result["metrics"])  # an index file names no classes

    # against a naive computation, with the mentions column the synth writer stores as JSON
    model = from_pretrained(files["model"]).eval()
    data = ShapesDataset(
        "heldout", 24, 0, image_size=48, tokenizer=get_tokenizer(model), transform=get_preprocess(model, "image")
    )
    batch = collate_samples([data[i] for i in range(len(data))])  # the very samples the file holds
    with torch.no_grad():
        image_emb = model.encode_image(batch.inputs["image"], normalize=True)
        text_emb = model.encode_text(batch.inputs["text"], normalize=True)
    fits, captions_of = fits_of(batch.meta)
    ranks = naive_ranks(text_emb, image_emb, fits)
    for k in (1, 5, 10):
        assert result["metrics"][f"retrieval/text_to_image/R@{k}"] == pytest.approx(sum(r <= k for r in ranks) / 24)
    assert result["metrics"]["retrieval/text_to_image/mean_rank"] == pytest.approx(sum(ranks) / 24)
    ranks = naive_ranks(image_emb, text_emb, captions_of)
    assert result["metrics"]["retrieval/image_to_text/median_rank"] == pytest.approx(statistics.median(ranks))


def test_bad_input_is_refused(files, tmp_path, capsys):
    model = str(files["model"])
    cli_fails(["evaluate", "--model", model], capsys, "is not a training run directory")
    cli_fails(["evaluate", "--model", model, "--data", str(tmp_path / "nope.csv")], capsys, "no such index file")
    (tmp_path / "pairs.txt").write_text("x")
    cli_fails(["evaluate", "--model", model, "--data", str(tmp_path / "pairs.txt")], capsys, "expected an index file")
    cli_fails(["evaluate", "--model", model, "--data", "tones"], capsys, "holds sounds")
    cli_fails(["evaluate", "--model", model, "--data", "shapes", "--eval-size", "0"], capsys, "at least 1")
    cli_fails(["evaluate", "--model", str(tmp_path / "missing")], capsys, "no such model directory")
    from polymodal.train.task_classify import ClassifyOptions, build_classifier

    classifier = tmp_path / "classifier"
    opts = ClassifyOptions.from_args({"towers": ["image", "text"], "dataset": "shape_claims"}, "shapes")
    build_classifier(from_pretrained(files["model"]), opts, ["image", "text"]).save_pretrained(classifier)
    cli_fails(
        ["evaluate", "--model", str(classifier), "--data", "shapes"], capsys, "evaluate needs a contrastive model"
    )
    (tmp_path / "no_caption.csv").write_text("image,text\na.png,a red circle\n")
    cli_fails(["evaluate", "--model", model, "--data", str(tmp_path / "no_caption.csv")], capsys, "no column 'caption'")
    (tmp_path / "all_bad.csv").write_text("image,caption\nmissing.png,a red circle\n")
    cli_fails(["evaluate", "--model", model, "--data", str(tmp_path / "all_bad.csv")], capsys, "no usable samples")


SHAPES = ["circle", "square", "triangle", "star", "cross", "ring"]


def test_zero_shot_accuracy_on_a_labelled_index_file(files, tmp_path):
    """``--label-column`` with class names gives top-1, top-5 and per-class accuracy of the user's own
    labelled file, equal to a naive zero-shot classifier computed here."""
    from polymodal.tasks import get_templates

    cmd = [sys.executable, "-m", "polymodal", "evaluate", "--model", str(files["model"]), "--data", str(files["csv"])]
    labels_file = tmp_path / "classes.txt"
    labels_file.write_text("# the six shapes\n" + "\n".join(SHAPES) + "\n")
    proc = subprocess.run(
        [*cmd, "--label-column", "shape", "--labels-file", str(labels_file), "--json"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)["metrics"]

    model = from_pretrained(files["model"]).eval()
    tokenizer = get_tokenizer(model)
    data = ShapesDataset("heldout", 24, 0, image_size=48, tokenizer=tokenizer, transform=get_preprocess(model, "image"))
    batch = collate_samples([data[i] for i in range(len(data))])  # the very samples the file holds
    templates = get_templates("simple_image")
    with torch.no_grad():
        image_emb = model.encode_image(batch.inputs["image"], normalize=True)
        weights = []
        for name in SHAPES:
            emb = model.encode_text(tokenizer([t.format(name) for t in templates]), normalize=True).mean(0)
            weights.append(emb / emb.norm())
    scores = image_emb @ torch.stack(weights).T  # (24, 6)
    truth = torch.tensor([SHAPES.index(m["shape"]) for m in batch.meta])
    ranks = (scores >= scores.gather(1, truth[:, None])).sum(1)  # a tie counts against the true class
    assert metrics["zeroshot/shape/top1"] == pytest.approx((ranks <= 1).float().mean().item())
    assert metrics["zeroshot/shape/top5"] == pytest.approx((ranks <= 5).float().mean().item())
    for c, name in enumerate(SHAPES):
        rows = truth == c
        if rows.any():
            expected = (ranks[rows] == 1).float().mean().item()
            assert metrics[f"zeroshot/shape/per_class/{name}"] == pytest.approx(expected), name
    assert any(k.startswith("retrieval/text_to_image/") for k in metrics)  # retrieval is still reported

    # the readable output, with --labels instead of a file
    proc = subprocess.run(
        [*cmd, "--label-column", "shape", "--labels", ",".join(SHAPES)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if "zero-shot by shape:" in x)
    assert f"top-1 {100 * metrics['zeroshot/shape/top1']:.1f}%" in line
    assert f"top-5 {100 * metrics['zeroshot/shape/top5']:.1f}%" in line
    assert "per-class top-1 by shape: circle" in proc.stdout

    # labels in the file that are not among the class names: one line naming them
    present = sorted({m["shape"] for m in batch.meta})
    proc = subprocess.run(
        [*cmd, "--label-column", "shape", "--labels", "circle,square"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()[-1:]
    missing = [s for s in present if s not in ("circle", "square")]
    assert (
        line.startswith("error: ")
        and f"column 'shape', holds labels that are not among the 2 class names: {missing}" in line
    )


def test_label_column_options_are_checked(files, capsys):
    model, csv = str(files["model"]), str(files["csv"])
    cli_fails(["evaluate", "--model", model, "--data", csv, "--labels", "a,b"], capsys, "need --label-column")
    cli_fails(
        ["evaluate", "--model", model, "--data", "shapes", "--label-column", "shape", "--labels", "a"],
        capsys,
        "give --data INDEX_FILE",
    )
    cli_fails(
        ["evaluate", "--model", model, "--data", csv, "--label-column", "shape"], capsys, "exactly one of --labels"
    )
    cli_fails(
        ["evaluate", "--model", model, "--data", csv, "--label-column", "kind", "--labels", "a,b"],
        capsys,
        "has no column 'kind'",
    )
