"""Resizing a tower's input through the model keeps the config (the home of the input spec) in step,
so the saved model loads again; resizing the tower behind the config's back is refused at save time."""

import pytest
import torch
from PIL import Image

from polymodal import create_model, from_pretrained, get_preprocess, get_tokenizer
from polymodal.errors import ConfigError


def text_ids(length: int) -> torch.Tensor:
    ids = torch.zeros(2, length, dtype=torch.long)
    ids[:, 0] = 49406
    ids[0, 1:4], ids[0, 4] = torch.tensor([11, 12, 13]), 49407
    ids[1, 1 : length - 1], ids[1, length - 1] = torch.arange(100, 100 + length - 2), 49407  # the full context
    return ids


def test_resized_model_saves_loads_and_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = create_model("clip-vit-tiny").eval()
    model.set_image_size(64)
    model.set_context_length(40)
    assert model.config.towers["image"].args["image_size"] == 64 and model.config.preprocess.image_size == 64
    assert model.config.towers["text"].args["context_length"] == 40 and model.config.tokenizer.context_length == 40
    model.save_pretrained(tmp_path / "m")
    again = from_pretrained(tmp_path / "m").eval()
    image, text = torch.randn(2, 3, 64, 64), text_ids(40)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(image), model.encode_image(image), rtol=0, atol=0)
        torch.testing.assert_close(again.encode_text(text), model.encode_text(text), rtol=0, atol=0)
    # the transforms and the tokenizer built from the saved config produce what the towers now take
    assert get_tokenizer(again)(["a photo"]).shape == (1, 40)
    assert get_preprocess(again, "image")(Image.new("RGB", (100, 80))).shape == (3, 64, 64)


def test_non_square_image_size_is_stored_as_a_pair(tmp_path):
    model = create_model("clip-vit-tiny").eval()
    model.set_image_size((48, 64))
    assert model.config.towers["image"].args["image_size"] == [48, 64]
    model.save_pretrained(tmp_path / "m")
    again = from_pretrained(tmp_path / "m").eval()
    image = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(image), model.encode_image(image), rtol=0, atol=0)


@pytest.mark.parametrize(
    "resize, method",
    [
        (lambda m: m.towers["image"].set_image_size(64), "set_image_size"),
        (lambda m: m.towers["text"].set_context_length(40), "set_context_length"),
    ],
)
def test_resizing_a_tower_directly_is_refused_at_save(tmp_path, resize, method):
    model = create_model("clip-vit-tiny")
    resize(model)
    with pytest.raises(ConfigError, match=rf"model\.{method}\("):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_resize_errors_name_the_problem():
    model = create_model("clap-cnn-tiny")
    with pytest.raises(ConfigError, match="no 'image' tower with set_image_size"):
        model.set_image_size(64)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        create_model("clip-vit-tiny").set_image_size(50)
