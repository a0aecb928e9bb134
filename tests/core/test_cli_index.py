"""``polymodal index build`` and ``polymodal search``, run as a user types them, against direct computations."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from polymodal import create_model, from_pretrained, get_preprocess, get_tokenizer
from polymodal.cli import main
from polymodal.datasets import write_synthetic
from polymodal.tasks import EmbeddingIndex
from tests.helpers import cli_fails, expected_recall_line, naive_ranks, printed_recall_line


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random clip-vit-tiny (twice, with different weights) and 20 held-out shapes with an index.csv."""
    root = tmp_path_factory.mktemp("cli_index")
    torch.manual_seed(0)
    create_model("clip-vit-tiny").save_pretrained(root / "model")
    torch.manual_seed(1)
    create_model("clip-vit-tiny").save_pretrained(root / "other")
    create_model("clip-vit-tiny", embed_dim=64).save_pretrained(root / "narrow")
    csv_path = write_synthetic("shapes", root / "shapes", n=20, split="heldout", image_size=48, progress=False)
    return {"root": root, "model": root / "model", "csv": csv_path, "images": csv_path.parent / "images"}


@pytest.fixture(scope="module")
def built(files):
    """An image index of the 20 shapes (built in-process once; the tests only read it)."""
    out = files["root"] / "built"
    assert (
        main(["index", "build", "--model", str(files["model"]), "--images", str(files["csv"]), "--out", str(out)]) == 0
    )
    return out


def embed_directly(model_dir: Path, image_paths: list[Path], texts: list[str]):
    model = from_pretrained(model_dir).eval()
    transform = get_preprocess(model, "image")
    with torch.no_grad():
        images = [transform(Image.open(p).convert("RGB")) for p in image_paths]
        image_emb = model.encode_image(torch.stack(images), normalize=True) if images else None
        text_emb = model.encode_text(get_tokenizer(model)(texts), normalize=True) if texts else None
    return image_emb, text_emb


def read_rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_build_eval_and_search_as_a_user_types_them(files, tmp_path):
    out = tmp_path / "idx"
    cmd = [sys.executable, "-m", "polymodal"]
    build = [*cmd, "index", "build", "--model", str(files["model"]), "--images", str(files["csv"])]
    proc = subprocess.run([*build, "--out", str(out), "--eval"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "wrote an index of 20 image embeddings (dim 128, model clip-vit-tiny)" in proc.stdout

    # the recall it prints, against a naive computation: an image answers a caption if it has every
    # attribute the caption mentions
    rows = read_rows(files["csv"])
    paths = [files["csv"].parent / r["image"] for r in rows]
    image_emb, text_emb = embed_directly(files["model"], paths, [r["caption"] for r in rows])
    fits = [
        {j for j, other in enumerate(rows) if all(other[a] == row[a] for a in json.loads(row["mentions"]))}
        for row in rows
    ]
    assert printed_recall_line(proc.stdout, "text -> image") == expected_recall_line(
        naive_ranks(text_emb, image_emb, fits)
    )
    captions_of = [{i for i in range(len(rows)) if j in fits[i]} for j in range(len(rows))]
    assert printed_recall_line(proc.stdout, "image -> text") == expected_recall_line(
        naive_ranks(image_emb, text_emb, captions_of)
    )

    proc = subprocess.run(
        [*cmd, "search", str(out), "a red circle", "--top-k", "3", "--json"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)["queries"][0]
    _, query = embed_directly(files["model"], [], ["a red circle"])
    scores = (query @ image_emb.T)[0]
    top = scores.topk(3)
    assert [Path(h["id"]).resolve() for h in result["results"]] == [paths[i].resolve() for i in top.indices.tolist()]
    assert [h["score"] for h in result["results"]] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert result["results"][0]["metadata"]["caption"] == rows[top.indices[0]]["caption"]


def test_text_and_image_queries(files, built, capsys):
    assert main(["search", str(built), "a red circle", "--image", str(files["images"] / "000003.png")]) == 0
    out = capsys.readouterr().out
    assert "text query: a red circle" in out
    image_part = out.split("image query:")[1].splitlines()
    assert "000003.png" in image_part[1] and "1.0000" in image_part[1]  # an indexed image finds itself first
    assert len([line for line in image_part[1:] if line.strip()]) == 5  # the default --top-k

    csv_rows = read_rows(files["csv"])
    assert main(["search", str(built), "--evaluate", str(files["csv"]), "--json", "--top-k", "1"]) == 0
    evaluation = json.loads(capsys.readouterr().out)["evaluation"]
    assert evaluation["num_images"] == len(csv_rows)
    assert 0 <= evaluation["text_to_image/R@1"] <= evaluation["text_to_image/R@5"] <= 1


def test_image_to_text_with_a_caption_index(files, tmp_path, capsys):
    texts = tmp_path / "captions.txt"
    texts.write_text("a red circle\n\na blue square\na green star\n")
    out = tmp_path / "captions"
    assert main(["index", "build", "--model", str(files["model"]), "--texts", str(texts), "--out", str(out)]) == 0
    assert "3 text embeddings" in capsys.readouterr().out
    image = files["images"] / "000000.png"
    assert main(["search", str(out), "--image", str(image), "--json", "--top-k", "3"]) == 0
    ranked = [h["id"] for h in json.loads(capsys.readouterr().out)["queries"][0]["results"]]
    image_emb, text_emb = embed_directly(files["model"], [image], ["a red circle", "a blue square", "a green star"])
    order = (image_emb @ text_emb.T)[0].argsort(descending=True).tolist()
    assert ranked == [["a red circle", "a blue square", "a green star"][i] for i in order]
    # the captions of an index file work too, keeping the other columns as metadata
    out2 = tmp_path / "from_csv"
    assert (
        main(["index", "build", "--model", str(files["model"]), "--texts", str(files["csv"]), "--out", str(out2)]) == 0
    )
    index = EmbeddingIndex.load(out2)
    assert len(index) == 20 and index.modality == "text" and "image" in index.metadata[0]


def test_faiss_backend_gives_the_exact_results_with_a_flat_index(files, built, tmp_path, capsys):
    out = tmp_path / "faiss"
    model = str(files["model"])
    assert (
        main(
            [
                "index",
                "build",
                "--model",
                model,
                "--images",
                str(files["images"]),
                "--out",
                str(out),
                "--backend",
                "faiss-flat",
            ]
        )
        == 0
    )
    assert (out / "faiss.index").is_file()
    capsys.readouterr()
    results = []
    for index in (out, built):
        assert main(["search", str(index), "a green star", "--json", "--top-k", "4"]) == 0
        hits = json.loads(capsys.readouterr().out)["queries"][0]["results"]
        results.append([(Path(h["id"]).name, round(h["score"], 4)) for h in hits])
    assert results[0] == results[1]


def test_bad_input_is_refused_and_nothing_is_written(files, built, tmp_path, capsys):
    model = str(files["model"])
    out = tmp_path / "out"
    build = ["index", "build", "--model", model, "--out", str(out)]
    cli_fails([*build, "--images", str(tmp_path / "missing.png")], capsys, "does not exist")
    (tmp_path / "empty").mkdir()
    cli_fails([*build, "--images", str(tmp_path / "empty")], capsys, "holds no image files")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "fake.png").write_bytes(b"this is not a png")
    cli_fails([*build, "--images", str(files["images"] / "000001.png"), str(tmp_path / "bad")], capsys, "fake.png")
    cli_fails([*build, "--images", str(files["images"]), "--eval"], capsys, "--eval needs a caption")
    cli_fails([*build, "--images", str(files["images"]), "--batch-size", "0"], capsys, "--batch-size")
    short = tmp_path / "bad" / "short.csv"  # a row with a missing cell: named, not a crash
    short.write_text(f"image,caption\n{files['images'] / '000001.png'},a thing\n{files['images'] / '000002.png'}\n")
    cli_fails([*build, "--images", str(short)], capsys, "has 1 unreadable row(s), e.g. ")
    cli_fails([*build, "--texts", str(short)], capsys, "short.csv line 3: 1 fields but the header has 2")
    short.unlink()
    assert sorted(os.listdir(tmp_path)) == ["bad", "empty"]  # nothing half-written, no temporary directories

    # an existing --out is kept unless --overwrite
    before = (built / "index.json").read_text()
    cli_fails([*build[:-1], str(built), "--images", str(files["images"] / "000001.png")], capsys, "--overwrite")
    assert (built / "index.json").read_text() == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    cli_fails(
        [*build[:-1], str(tmp_path / "mine"), "--images", str(files["images"]), "--overwrite"], capsys, "not an index"
    )
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"

    # queries with another model: other weights, other embedding size
    cli_fails(
        ["search", str(built), "a red circle", "--model", str(files["root"] / "other")], capsys, "weights fingerprint"
    )
    cli_fails(
        ["search", str(built), "a red circle", "--model", str(files["root"] / "narrow")], capsys, "not comparable"
    )
    cli_fails(["search", str(built), "a red circle", "--top-k", "0"], capsys, "--top-k must be at least 1")
    cli_fails(["search", str(built), "--image", str(tmp_path / "nope.png")], capsys, "does not exist")
    cli_fails(["search", str(built), "--image", str(tmp_path / "bad" / "fake.png")], capsys, "not a readable image")
    cli_fails(["search", str(tmp_path / "no_index"), "x"], capsys, "does not exist")
    cli_fails(["search", str(built)], capsys, "give a text query")
    other_csv = tmp_path / "other.csv"
    other_csv.write_text(
        f"image,caption\n{files['images'] / '000001.png'},a thing\n{tmp_path / 'bad' / 'fake.png'},x\n"
    )
    cli_fails(["search", str(built), "--evaluate", str(other_csv)], capsys, "not in the index")


def test_search_with_the_recorded_model_moved_away(files, built, tmp_path, capsys):
    header = json.loads((built / "index.json").read_text())
    assert header["model"]["source"] == str(files["model"].resolve())
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(built, moved)
    header["model"]["source"] = str(tmp_path / "gone")
    (moved / "index.json").write_text(json.dumps(header))
    cli_fails(["search", str(moved), "a red circle"], capsys, "pass --model")
    assert main(["search", str(moved), "a red circle", "--model", str(files["model"])]) == 0
