"""ImageFolderDataset: classes from folder names, skips for bad files, clear errors for bad layouts."""

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from polymodal.datasets.folder import ImageFolderDataset
from polymodal.datasets.samples import SkippedSample, collate_samples
from polymodal.encoders import image_transform


def _image(path, colour, fmt="PNG", mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (10, 12), colour).save(path, fmt)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "pets"
    _image(root / "dog" / "d1.png", (255, 0, 0))
    _image(root / "dog" / "nested" / "d2.JPG", (250, 0, 0), "JPEG")
    _image(root / "cat" / "c1.png", (0, 0, 255))
    _image(root / "cat" / "c2.png", (0, 0, 0, 0), mode="RGBA")  # transparent -> white
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"")
    (root / ".cache").mkdir()
    (root / "README.md").write_text("a file at the root is not a class")
    return root


def test_classes_labels_and_items(folder):
    dataset = ImageFolderDataset(folder, image_transform(8, is_train=False, mean=0.0, std=1.0))
    assert dataset.classes == ["cat", "dog"]
    assert dataset.class_to_idx == {"cat": 0, "dog": 1}
    names = [p.split("/pets/")[1] for p, _ in dataset.samples]
    assert names == ["cat/broken.png", "cat/c1.png", "cat/c2.png", "cat/empty.jpg", "dog/d1.png", "dog/nested/d2.JPG"]
    assert dataset.targets == [0, 0, 0, 0, 1, 1]

    items = [dataset[i] for i in range(len(dataset))]
    assert [i.reason for i in items if isinstance(i, SkippedSample)] == ["corrupt_image", "zero_bytes"]
    c1, white, d1 = items[1], items[2], items[4]
    assert c1["label"].dtype == torch.long and c1["label"].shape == () and int(c1["label"]) == 0
    assert int(d1["label"]) == 1 and d1["meta"]["class"] == "dog" and d1["meta"]["path"].endswith("d1.png")
    assert torch.allclose(c1["image"][:, 4, 4], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(white["image"], torch.ones(3, 8, 8))


def test_collate_stacks_labels_through_a_dataloader(folder):
    dataset = ImageFolderDataset(folder, image_transform(8, is_train=False))
    batches = list(DataLoader(dataset, batch_size=3, collate_fn=collate_samples))
    assert [len(b) for b in batches] == [2, 2]
    assert batches[0].inputs["label"].tolist() == [0, 0] and batches[1].inputs["label"].tolist() == [1, 1]
    assert batches[0].inputs["image"].shape == (2, 3, 8, 8)
    assert batches[0].skipped == {"corrupt_image": 1} and batches[1].skipped == {"zero_bytes": 1}


def test_extensions_are_configurable(folder):
    dataset = ImageFolderDataset(folder, image_transform(8, False), extensions=("jpg",))
    assert [p.rsplit("/", 1)[1] for p, _ in dataset.samples] == ["empty.jpg", "d2.JPG"]


def test_bad_layouts_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageFolderDataset(tmp_path / "nowhere", image_transform(8, False))
    flat = tmp_path / "flat"
    _image(flat / "a.png", (1, 2, 3))
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolderDataset(flat, image_transform(8, False))
    no_images = tmp_path / "no_images"
    (no_images / "cat").mkdir(parents=True)
    (no_images / "cat" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"class folders \['cat'\] but no files"):
        ImageFolderDataset(no_images, image_transform(8, False))


def test_empty_class_folder_is_kept_with_a_warning(tmp_path):
    _image(tmp_path / "b" / "x.png", (0, 0, 0))
    (tmp_path / "a").mkdir()
    with pytest.warns(UserWarning, match=r"without images: \['a'\]"):
        dataset = ImageFolderDataset(tmp_path, image_transform(8, False))
    assert dataset.class_to_idx == {"a": 0, "b": 1} and dataset.targets == [1]
