"""``polymodal benchmark`` as a user types it: the result file holds what the Python API measures, the confusion
matrix is a PNG, and each bad input is one line on stderr with exit status 2."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from polymodal import create_model, from_pretrained, get_preprocess, get_tokenizer
from polymodal.datasets import (
    CaptionedImageDataset,
    ImageFolderDataset,
    WdsBenchmarkDataset,
    collate_samples,
    read_clip_benchmark_wds,
    read_karpathy,
)
from polymodal.tasks import SIMPLE_IMAGE_TEMPLATES, linear_probe_benchmark, retrieval_benchmark, zero_shot_benchmark
from tests.benchmark_data import (
    CLASSES,
    captions_of,
    classification_samples,
    karpathy_entry,
    shape_images,
    write_clip_benchmark_wds,
    write_image_folder,
    write_karpathy,
)
from tests.helpers import cli_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_benchmark")
    torch.manual_seed(0)
    create_model("clip-vit-tiny").save_pretrained(root / "model")
    samples = classification_samples(shape_images(20))
    samples[5] = {"webp": b"broken", "cls": 1}  # an unreadable image: skipped and counted
    write_clip_benchmark_wds(root / "wds", samples, max_count=8)
    write_image_folder(root / "folder" / "train", shape_images(24))
    write_image_folder(root / "folder" / "test", shape_images(24, offset=32))
    images = shape_images(6)
    entries = [
        karpathy_entry(f"{i}.jpg", "test", captions_of(cap, colour, i), filepath="val2014")
        for i, (_, colour, cap) in enumerate(images)
    ]
    entries.insert(2, karpathy_entry("x.jpg", "train", ["a training image"], filepath="train2014"))
    images_root = root / "coco_images"
    for i, (image, _, _) in enumerate(images):
        (images_root / "val2014").mkdir(parents=True, exist_ok=True)
        image.save(images_root / "val2014" / f"{i}.jpg", quality=95)
    coco = write_karpathy(root / "annotations", entries)
    return {"root": root, "model": root / "model", "coco": coco, "images_root": images_root}


def polymodal(*args):
    """``python -m polymodal ARGS``, as a user types it."""
    return subprocess.run([sys.executable, "-m", "polymodal", *map(str, args)], capture_output=True, text=True)


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG"


def same_metrics(got: dict, expected: dict) -> bool:
    """Equal keys and, within float tolerance, equal values (per-class recall too)."""
    flat = {k: v for k, v in got.items() if not isinstance(v, dict)}
    assert flat == pytest.approx({k: v for k, v in expected.items() if not isinstance(v, dict)})
    nested = [k for k, v in expected.items() if isinstance(v, dict)]
    assert set(got) == set(expected) and all(got[k] == pytest.approx(expected[k]) for k in nested)
    return True


def loader(data):
    return DataLoader(data, batch_size=64, collate_fn=collate_samples)


def test_zeroshot_on_a_clip_benchmark_export_as_a_user_types_it(files, tmp_path):
    out = tmp_path / "results"
    proc = polymodal("benchmark", "--model", files["model"], "--task", "zeroshot", "--dataset", files["root"] / "wds",
                     "--out", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "wds_zeroshot.json").read_text())
    assert_png(out / "wds_zeroshot_confusion.png")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # written atomically: no temporaries left

    model = from_pretrained(files["model"]).eval()
    info = read_clip_benchmark_wds(files["root"] / "wds")
    assert info.templates == ["a photo of a {} shape.", "a {} thing."]  # the layout's own templates, {c} read
    expected = zero_shot_benchmark(
        model, get_tokenizer(model), loader(WdsBenchmarkDataset(info, get_preprocess(model, "image"))), CLASSES,
        info.templates, progress=False,
    )  # fmt: skip
    assert report["dataset"] == "wds" and report["task"] == "zeroshot" and report["model"] == str(files["model"])
    assert same_metrics(report["metrics"], expected.metrics)
    assert set(report["metrics"]) == {"top1", "top5", "mean_per_class_recall", "per_class_recall"}
    assert report["num_samples"] == 19 and report["skipped"] == {"corrupt_image": 1}
    assert (
        f"top-1 {100 * expected.metrics['top1']:.1f}%" in proc.stdout and "1 skipped (corrupt_image 1)" in proc.stdout
    )
    assert "embedding images" in proc.stderr  # the progress bar


def test_zeroshot_on_an_image_folder_with_user_class_names_and_templates(files, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"colour {c}" for c in sorted(CLASSES)) + "\n")  # display names, sorted folder order
    templates = tmp_path / "templates.txt"
    templates.write_text("a {c} picture.\nsomething {c}.\n")
    folder = str(files["root"] / "folder")
    args = ["benchmark", "--model", str(files["model"]), "--task", "zeroshot", "--dataset", folder,
            "--classnames", str(names), "--templates", str(templates), "--no-progress", "--json"]  # fmt: skip
    code, out, err = cli_run(args, capsys)
    assert code == 0, err
    report = json.loads(out)

    model = from_pretrained(files["model"]).eval()
    data = ImageFolderDataset(files["root"] / "folder" / "test", get_preprocess(model, "image"))  # the test split
    display = [f"colour {c}" for c in data.classes]
    expected = zero_shot_benchmark(
        model, get_tokenizer(model), loader(data), display, ["a {} picture.", "something {}."], progress=False
    )
    assert same_metrics(report["metrics"], expected.metrics) and report["num_samples"] == 24
    assert list(report["metrics"]["per_class_recall"]) == [
        n for n in display if n in expected.metrics["per_class_recall"]
    ]

    # the folder names in another order keep each folder's own name; the default templates are simple_image
    names.write_text("\n".join(reversed(CLASSES)) + "\n")
    code, out, err = cli_run([*args[:9], "--classnames", str(names), "--no-progress", "--json"], capsys)
    assert code == 0, err
    expected = zero_shot_benchmark(
        model, get_tokenizer(model), loader(data), data.classes, SIMPLE_IMAGE_TEMPLATES, progress=False
    )
    assert same_metrics(json.loads(out)["metrics"], expected.metrics)


def test_retrieval_on_karpathy_captions(files, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["benchmark", "--model", str(files["model"]), "--task", "retrieval", "--dataset", str(files["coco"]),
            "--images-root", str(files["images_root"]), "--out", str(out), "--no-progress"]  # fmt: skip
    code, stdout, err = cli_run(args, capsys)
    assert code == 0, err
    report = json.loads((out / "dataset_coco_retrieval.json").read_text())
    assert not (out / "dataset_coco_retrieval_confusion.png").exists()

    model = from_pretrained(files["model"]).eval()
    data = CaptionedImageDataset(
        read_karpathy(files["coco"], "test", files["images_root"]), get_preprocess(model, "image")
    )
    expected = retrieval_benchmark(model, get_tokenizer(model), loader(data), progress=False)
    assert same_metrics(report["metrics"], expected.metrics)
    assert report["num_samples"] == 6 and report["metrics"]["num_captions"] == 30
    assert {f"{d}/R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)} <= set(report["metrics"])
    assert stdout.count("R@1 ") == 2 and "image -> text" in stdout and "text -> image" in stdout

    # the same result file again: refused without --overwrite, replaced with it
    code, _, err = cli_run(args, capsys)
    assert code == 2 and "exists; pass --overwrite" in err
    assert cli_run([*args, "--overwrite"], capsys)[0] == 0


def test_linear_probe_on_train_and_test_folders(files, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["benchmark", "--model", str(files["model"]), "--task", "linear-probe", "--dataset",
            str(files["root"] / "folder"), "--weight-decay", "0.001", "--out", str(out), "--no-progress"]  # fmt: skip
    code, stdout, err = cli_run(args, capsys)
    assert code == 0, err
    report = json.loads((out / "folder_linear-probe.json").read_text())
    assert_png(out / "folder_linear-probe_confusion.png")

    model = from_pretrained(files["model"]).eval()
    transform = get_preprocess(model, "image")
    train = ImageFolderDataset(files["root"] / "folder" / "train", transform)
    test = ImageFolderDataset(files["root"] / "folder" / "test", transform)
    expected = linear_probe_benchmark(
        model, loader(train), loader(test), train.classes, weight_decay=1e-3, progress=False
    )
    assert same_metrics(report["metrics"], expected.metrics)
    assert report["num_samples"] == 24 and report["metrics"]["num_train"] == 24
    assert report["metrics"]["weight_decay"] == 1e-3
    assert "top-1 " in stdout and "mean per-class recall" in stdout


@pytest.fixture(scope="module")
def bad(files):
    """Inputs that are wrong in one way each."""
    root = files["root"] / "bad"
    root.mkdir()
    (root / "three.txt").write_text("red\ngreen\nblue\n")
    (root / "mixed.txt").write_text("\n".join(["bleu", *sorted(CLASSES)[1:]]) + "\n")
    (root / "slotless.txt").write_text("a photo of a thing\n")
    (root / "dataset_coco.json").write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "test"}]}))
    write_clip_benchmark_wds(root / "missing_shard", classification_samples(shape_images(2)))
    (root / "missing_shard" / "test" / "nshards.txt").write_text("3\n")
    write_clip_benchmark_wds(root / "label9", [{"png": classification_samples(shape_images(1), "png")[0]["png"],
                                                "cls": 9}])  # fmt: skip
    return root


def error_cases(files, bad):
    model, folder, wds = str(files["model"]), str(files["root"] / "folder"), str(files["root"] / "wds")
    zs = ["benchmark", "--model", model, "--task", "zeroshot", "--no-progress"]
    return {
        "class-count": ([*zs, "--dataset", folder, "--classnames", bad / "three.txt"],
                        "has 3 class names but the dataset has 8 class folders"),
        "class-names": ([*zs, "--dataset", folder, "--classnames", bad / "mixed.txt"],
                        "['bleu'] are not class folders (folders not named: ['blue'])"),
        "wds-class-count": ([*zs, "--dataset", wds, "--classnames", bad / "three.txt"],
                            "has 3 class names but " + str(files["root"] / "wds" / "classnames.txt") + " has 8"),
        "templates": ([*zs, "--dataset", folder, "--templates", bad / "slotless.txt"],
                      "must contain exactly one '{}' for the class name"),
        "karpathy-field": (["benchmark", "--model", model, "--task", "retrieval", "--dataset",
                            bad / "dataset_coco.json"], 'images[0] has no "sentences" field'),
        "no-dataset": ([*zs, "--dataset", bad / "nowhere"], "does not exist"),
        "missing-shard": ([*zs, "--dataset", bad / "missing_shard"], "says 3 shards, but"),
        "label-range": ([*zs, "--dataset", bad / "label9"], "outside the 8 class names, e.g. label 9"),
        "probe-no-split": (["benchmark", "--model", model, "--task", "linear-probe", "--dataset", f"{folder}/test"],
                           "give --val-split FRACTION"),
        "val-split-range": (["benchmark", "--model", model, "--task", "linear-probe", "--dataset", folder,
                             "--val-split", "1.5"], "--val-split is a fraction in (0, 1)"),
        "option-task": (["benchmark", "--model", model, "--task", "retrieval", "--dataset", str(files["coco"]),
                         "--templates", "simple_image"], "--templates is for --task zeroshot, not retrieval"),
        "task-layout": ([*zs, "--dataset", str(files["coco"])], "--task zeroshot reads folder or wds datasets"),
        "no-model": ([*zs[:2], str(bad / "no_model"), *zs[3:], "--dataset", folder], "no such model directory"),
    }  # fmt: skip


def test_each_bad_input_is_one_line_and_exit_2(files, bad, capsys):
    for name, (args, message) in error_cases(files, bad).items():
        code, out, err = cli_run([str(a) for a in args], capsys)
        assert code == 2, (name, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (name, err)


def test_a_bad_input_from_the_command_line_is_one_line_without_a_traceback(files, bad):
    args, message = error_cases(files, bad)["class-count"]
    proc = polymodal(*args)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: ") and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_retrieval_and_linear_probe_as_a_user_types_them(files, tmp_path):
    proc = polymodal("benchmark", "--model", files["model"], "--task", "retrieval", "--dataset", files["coco"],
                     "--images-root", files["images_root"], "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["task"] == "retrieval" and report["num_samples"] == 6 and report["layout"] == "karpathy"
    proc = polymodal("benchmark", "--model", files["model"], "--task", "linear-probe", "--dataset",
                     files["root"] / "folder" / "test", "--val-split", "0.25", "--out", tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "test_linear-probe.json").read_text())
    assert report["num_samples"] == 6 and report["metrics"]["num_train"] == 18
    assert_png(tmp_path / "test_linear-probe_confusion.png")
