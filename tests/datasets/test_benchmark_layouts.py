"""The benchmark layout readers return what was written: class names, templates, labels, shard order, captions and
splits; bad samples come back as SkippedSample, and files that break their layout raise one clear error."""

import json
import tarfile

import numpy as np
import pytest
import torch
from torchvision.transforms.functional import to_tensor

from polymodal.datasets import (
    BenchmarkLayoutError,
    CaptionedImageDataset,
    WdsBenchmarkDataset,
    read_clip_benchmark_wds,
    read_karpathy,
)
from polymodal.datasets.benchmark_layouts import (
    class_folder_root,
    match_folder_classes,
    read_class_names,
    read_templates,
    resolve_layout,
    template_from_placeholder,
)
from polymodal.tasks import check_templates
from tests.benchmark_data import (
    CLASSES,
    classification_samples,
    encoded,
    karpathy_entry,
    shape_images,
    write_clip_benchmark_wds,
    write_image_folder,
    write_karpathy,
)


def test_wds_reader_returns_the_classes_templates_and_samples_written(tmp_path):
    images = shape_images(11)
    samples = classification_samples(images[:4], "webp")
    samples += classification_samples(images[4:8], "png") + classification_samples(images[8:], "jpg")
    shards = write_clip_benchmark_wds(tmp_path, samples, max_count=1)  # 11 shards: 10.tar must come after 9.tar
    info = read_clip_benchmark_wds(tmp_path, "test")
    assert info.class_names == CLASSES
    assert info.templates == ["a photo of a {} shape.", "a {} thing."]
    assert info.shards == tuple(shards) and [p.name for p in info.shards][9:] == ["9.tar", "10.tar"]
    assert info.dataset_type == "classification" and info.num_samples is None

    items = list(WdsBenchmarkDataset(info))
    assert [it["meta"]["key"] for it in items] == [f"s{i:07d}" for i in range(11)]
    assert [int(it["label"]) for it in items] == [CLASSES.index(colour) for _, colour, _ in images]
    for item, (image, _, _) in zip(items[:8], images[:8]):  # webp (lossless) and png decode to the same pixels
        torch.testing.assert_close(item["image"], to_tensor(image), rtol=0, atol=0)
    jpeg = np.asarray(images[8][0], dtype=np.float64) / 255
    assert np.abs(items[8]["image"].permute(1, 2, 0).numpy() - jpeg).mean() < 0.05


def test_wds_shards_without_nshards_and_with_sizes(tmp_path):
    samples = classification_samples(shape_images(6))
    write_clip_benchmark_wds(tmp_path, samples, max_count=4, nshards_file=False, class_names=None, templates=None)
    (tmp_path / "test" / "sizes.json").write_text(json.dumps({"0.tar": 4, "1.tar": 2}))
    info = read_clip_benchmark_wds(tmp_path)
    assert [p.name for p in info.shards] == ["0.tar", "1.tar"]
    assert info.class_names is None and info.templates is None
    dataset = WdsBenchmarkDataset(info)
    assert len(dataset) == 6 == len(list(dataset))


def test_wds_bad_samples_are_skipped_with_their_reason(tmp_path):
    good = classification_samples(shape_images(2))
    bad = [
        {"webp": b"not an image", "cls": 1},
        {"png": good[0]["webp"][:30], "cls": 2},  # truncated
        {"webp": good[0]["webp"]},  # no label
        {"webp": good[0]["webp"], "cls": "three"},
        {"cls": 4},  # no image
    ]
    write_clip_benchmark_wds(tmp_path, [good[0], *bad, good[1]], max_count=10)
    items = list(WdsBenchmarkDataset(read_clip_benchmark_wds(tmp_path)))
    assert len(items) == 7
    assert [it["meta"]["key"] for it in (items[0], items[6])] == ["s0000000", "s0000006"]
    reasons = [it.reason for it in items[1:6]]
    assert reasons == ["corrupt_image", "corrupt_image", "malformed_row", "malformed_row", "missing_file"]
    assert all("test/0.tar:s000000" in it.detail for it in items[1:6])


def test_wds_truncated_shard_keeps_the_samples_before_the_break(tmp_path):
    shards = write_clip_benchmark_wds(tmp_path, classification_samples(shape_images(3)), max_count=3)
    with tarfile.open(shards[0]) as tar:
        cut = tar.getmember("s0000002.webp").offset_data + 100  # inside the last image
    shards[0].write_bytes(shards[0].read_bytes()[:cut])
    items = list(WdsBenchmarkDataset(read_clip_benchmark_wds(tmp_path)))
    assert [it["meta"]["key"] for it in items[:2]] == ["s0000000", "s0000001"]
    assert items[2].reason == "missing_file"  # its label was read whole, its image was not
    assert items[3].reason == "corrupt_shard" and "unreadable after 2 samples" in items[3].detail
    assert len(items) == 4


def test_wds_retrieval_layout_reads_captions_per_line(tmp_path):
    images = shape_images(3)
    samples = [{"jpg": encoded(im, "jpg"), "txt": f"{cap}\n\na {colour} thing\n"} for im, colour, cap in images]
    write_clip_benchmark_wds(tmp_path, samples, class_names=None, templates=None, dataset_type="retrieval")
    info = read_clip_benchmark_wds(tmp_path)
    assert info.dataset_type == "retrieval"
    items = list(WdsBenchmarkDataset(info))
    assert [it["meta"]["captions"] for it in items] == [[cap, f"a {colour} thing"] for _, colour, cap in images]
    assert "label" not in items[0]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "has no test/ folder of shards"),
        (lambda root: (root / "test").mkdir(), "holds no .tar shards"),
        (lambda root: ((root / "test").mkdir(), (root / "test" / "nshards.txt").write_text("two")), "number of shards"),
        (
            lambda root: ((root / "test").mkdir(), (root / "test" / "nshards.txt").write_text("2")),
            "lacks ['0.tar', '1.tar']",
        ),
        (
            lambda root: write_clip_benchmark_wds(root, [{"webp": b"x", "cls": 0}], dataset_type="multilabel"),
            "polymodal reads classification and retrieval datasets",
        ),
    ],
)
def test_wds_layout_errors_name_what_is_missing(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(BenchmarkLayoutError) as err:
        read_clip_benchmark_wds(tmp_path, "test")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_class_name_and_template_files(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("golden retriever\n  tabby cat \n\n\n")
    assert read_class_names(names) == ["golden retriever", "tabby cat"]
    names.write_text("a\n\nb\n")
    with pytest.raises(BenchmarkLayoutError, match="line 2 is blank"):
        read_class_names(names)
    names.write_text("a\nb\na\n")
    with pytest.raises(BenchmarkLayoutError, match=r"repeats \['a'\]"):
        read_class_names(names)

    assert template_from_placeholder("a photo of a {c}.") == "a photo of a {}."
    assert template_from_placeholder("a {c} in {braces}").format("cat") == "a cat in {braces}"
    assert template_from_placeholder("already {} here") == "already {} here"
    templates = tmp_path / "t.txt"
    templates.write_text("# comment\na {c}.\n\nthe {}.\n")
    assert read_templates(templates) == ["a {}.", "the {}."]
    templates.write_text("no slot here\n")
    with pytest.raises(ValueError, match="exactly one"):
        check_templates(read_templates(templates))


def test_folder_classes_by_name_by_position_or_refused():
    folders = ["n01", "n02", "n03"]
    assert match_folder_classes(folders, ["n03", "n01", "n02"], "f") == folders  # the folder names, reordered
    assert match_folder_classes(folders, ["fish", "bird", "frog"], "f") == ["fish", "bird", "frog"]  # by position
    with pytest.raises(BenchmarkLayoutError, match="has 2 class names but the dataset has 3 class folders"):
        match_folder_classes(folders, ["fish", "bird"], "f")
    with pytest.raises(BenchmarkLayoutError, match=r"\['bird'\] are not class folders \(folders not named: \['n02'\]"):
        match_folder_classes(folders, ["n01", "bird", "n03"], "f")


def test_resolve_layout(tmp_path):
    write_image_folder(tmp_path / "folder" / "train", shape_images(2))
    write_image_folder(tmp_path / "folder" / "test", shape_images(2, offset=2))
    assert resolve_layout(tmp_path / "folder") == ("folder", tmp_path / "folder")
    assert class_folder_root(tmp_path / "folder", "test") == tmp_path / "folder" / "test"
    assert class_folder_root(tmp_path / "folder" / "test", "test") == tmp_path / "folder" / "test"
    write_clip_benchmark_wds(tmp_path / "wds", classification_samples(shape_images(1)))
    assert resolve_layout(tmp_path / "wds") == ("wds", tmp_path / "wds")
    coco = write_karpathy(tmp_path / "coco", [karpathy_entry("a.png", "test", ["x"])])
    assert resolve_layout(coco) == ("karpathy", coco)
    assert resolve_layout(tmp_path / "coco") == ("karpathy", coco)
    with pytest.raises(BenchmarkLayoutError, match="does not exist"):
        resolve_layout(tmp_path / "nothing")


def test_karpathy_reader_returns_the_split_with_paths_and_captions(tmp_path):
    images = shape_images(4)
    entries = [
        karpathy_entry("a.png", "train", ["a train image"], filepath="train2014"),
        karpathy_entry("b.png", "test", ["first", "second"], filepath="val2014", cocoid=7),
        karpathy_entry("c.png", "val", ["a val image"]),
        karpathy_entry("d.png", "test", ["only one"]),
        karpathy_entry("e.png", "restval", ["more"]),
    ]
    path = write_karpathy(tmp_path, entries, images={"val2014/b.png": images[1][0], "d.png": images[3][0]})
    test = read_karpathy(path, "test")
    assert [(e.path, e.captions) for e in test] == [
        (tmp_path / "val2014" / "b.png", ("first", "second")),
        (tmp_path / "d.png", ("only one",)),
    ]
    assert [e.path.name for e in read_karpathy(path, "restval")] == ["e.png"]
    assert read_karpathy(path, "train", images_root=tmp_path / "elsewhere")[0].path == (
        tmp_path / "elsewhere" / "train2014" / "a.png"
    )
    items = [CaptionedImageDataset(test, to_tensor)[i] for i in range(2)]
    torch.testing.assert_close(items[0]["image"], to_tensor(images[1][0]), rtol=0, atol=0)
    assert items[1]["meta"]["captions"] == ["only one"]


def test_karpathy_missing_images_and_empty_captions_are_skipped(tmp_path):
    image = shape_images(1)[0][0]
    entries = [karpathy_entry("gone.png", "test", ["x"]), karpathy_entry("here.png", "test", ["  ", ""])]
    path = write_karpathy(tmp_path, entries, images={"here.png": image})
    data = CaptionedImageDataset(read_karpathy(path), to_tensor)
    assert [data[i].reason for i in range(2)] == ["missing_file", "empty_caption"]


@pytest.mark.parametrize(
    "content, message",
    [
        ([1, 2], "the top level is a list"),
        ({"dataset": "coco"}, 'the top level has no "images" field'),
        ({"images": {}}, '"images" is a dict, not a list'),
        ({"images": [{"split": "test", "sentences": []}]}, 'images[0] has no "filename" field'),
        ({"images": [{"filename": "a.jpg", "sentences": []}]}, 'images[0] has no "split" field'),
        ({"images": [{"filename": "a.jpg", "split": "test"}]}, 'images[0] has no "sentences" field'),
        ({"images": [{"filename": "a", "split": "test", "sentences": [{"tokens": []}]}]}, '.sentences[0] has no "raw"'),
        ({"images": [{"filename": "a", "split": "val", "sentences": []}]}, 'no images in split "test"; its splits'),
    ],
)
def test_karpathy_errors_name_the_missing_field(tmp_path, content, message):
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps(content))
    with pytest.raises(BenchmarkLayoutError) as err:
        read_karpathy(path, "test")
    assert message in str(err.value) and str(path) in str(err.value)
    path.write_text("{not json")
    with pytest.raises(BenchmarkLayoutError, match="is not a JSON file"):
        read_karpathy(path)
