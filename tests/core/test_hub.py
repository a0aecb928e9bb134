"""Loading models by Hugging Face repo id and open_clip tag from the local hub cache, without the network.

The caches are built here in ``huggingface_hub``'s own layout (``models--ORG--NAME/{blobs,snapshots,refs}``),
and each test first checks that ``huggingface_hub.scan_cache_dir`` reads it as the repo it should be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import polymodal
from polymodal.checkpoint import CheckpointError
from polymodal.hub import ModelNotFoundError, is_repo_id
from tests.helpers import CACHE_COMMIT as COMMIT
from tests.helpers import cache_repo


def assert_cached(cache: Path, repo: str, files: set[str]) -> None:
    from huggingface_hub import scan_cache_dir

    info = {r.repo_id: r for r in scan_cache_dir(cache).repos}
    assert repo in info, f"huggingface_hub does not see {repo} in {cache}: {sorted(info)}"
    (revision,) = info[repo].revisions
    assert revision.commit_hash == COMMIT and "main" in revision.refs
    assert {f.file_name for f in revision.files} == files


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = polymodal.create_model("clip-vit-tiny").eval()
    return model, model.save_pretrained(tmp_path / "saved")


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("POLYMODAL_ALLOW_DOWNLOADS", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    torch.manual_seed(1)
    images = torch.randn(2, 3, 48, 48)
    tokens = polymodal.get_tokenizer(a)(["a red circle", "a blue square"])
    with torch.no_grad():
        torch.testing.assert_close(b.encode_image(images), a.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(b.encode_text(tokens), a.encode_text(tokens), rtol=0, atol=0)


def test_cache_hit_by_repo_id_and_prefix(saved, cache: Path) -> None:
    model, directory = saved
    cache_repo(cache, "acme/tiny-clip", directory)
    assert_cached(cache, "acme/tiny-clip", {"config.json", "model.safetensors", "README.md"})
    for ref in ("acme/tiny-clip", "hf-hub:acme/tiny-clip", "hf-hub:acme/tiny-clip@main", f"acme/tiny-clip@{COMMIT}"):
        loaded = polymodal.from_pretrained(ref).eval()
        same_outputs(model, loaded)
    created = polymodal.create_model("hf-hub:acme/tiny-clip").eval()
    same_outputs(model, created)
    assert "hf-hub:acme/tiny-clip" in created.weights_source and "cache" in created.weights_source


def test_hf_home_is_honoured(saved, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, directory = saved
    home = tmp_path / "hf-home"
    cache_repo(home / "hub", "acme/tiny-clip", directory)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    same_outputs(model, polymodal.from_pretrained("acme/tiny-clip").eval())
    # HF_HUB_CACHE wins over HF_HOME, as in huggingface_hub
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="empty"):
        polymodal.from_pretrained("acme/tiny-clip")


def test_cached_hf_clip_repo_matches_transformers(cache: Path, tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    reference = CLIPModel(config).eval()
    reference.save_pretrained(tmp_path / "hf")
    cache_repo(cache, "openai-like/clip-small", tmp_path / "hf")
    model = polymodal.from_pretrained("openai-like/clip-small").eval()
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[49406, 320, 1125, 49407, 0, 0], [49406, 320, 539, 1929, 2368, 49407]])
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(pixels),
            reference.get_image_features(pixel_values=pixels).pooler_output,
            rtol=0,
            atol=1e-5,
        )
        torch.testing.assert_close(
            model.encode_text(ids), reference.get_text_features(input_ids=ids).pooler_output, rtol=0, atol=1e-5
        )


def test_miss_says_where_it_looked(cache: Path) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        polymodal.from_pretrained("acme/not-cached")
    message = str(err.value)
    assert str(cache / "models--acme--not-cached") in message and "hf download acme/not-cached" in message
    assert "no directory 'acme/not-cached' exists" in message
    with pytest.raises(ModelNotFoundError, match="revision 'v2'"):
        polymodal.create_model("hf-hub:acme/not-cached@v2")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError, as for any missing path
        polymodal.create_model("hf-hub:acme/not-cached")


def test_missing_revision_of_a_cached_repo(saved, cache: Path) -> None:
    cache_repo(cache, "acme/tiny-clip", saved[1])
    with pytest.raises(ModelNotFoundError, match="revision 'v9'"):
        polymodal.from_pretrained("hf-hub:acme/tiny-clip@v9")


def test_unsupported_architecture_is_named(cache: Path, tmp_path: Path) -> None:
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    cache_repo(cache, "acme/a-bert", bert)
    with pytest.raises(CheckpointError, match="'bert'"):
        polymodal.from_pretrained("hf-hub:acme/a-bert")


def test_an_existing_path_wins_over_the_hub(saved, cache: Path, tmp_path: Path, monkeypatch) -> None:
    model, directory = saved
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme").mkdir()
    model.save_pretrained(tmp_path / "acme" / "tiny-clip")  # the same name as a path, nothing in the cache
    loaded = polymodal.from_pretrained("acme/tiny-clip")
    assert "hub" not in loaded.weights_source
    same_outputs(model, loaded.eval())


def test_repo_id_spelling() -> None:
    assert is_repo_id("openai/clip-vit-base-patch32") and is_repo_id("hf-hub:timm/ViT-B-16-SigLIP")
    assert is_repo_id("laion/CLIP-ViT-B-32-laion2B-s34B-b79K@main")
    assert not is_repo_id("./runs/demo") and not is_repo_id("a/b/c") and not is_repo_id("dir/open_clip_config.json")
    assert not is_repo_id("clip-vit-tiny")


@pytest.mark.parametrize("repo, expected", [("acme/absent", "models--acme--absent"), ("acme/a-bert", "'bert'")])
def test_cli_exits_2_with_one_line(cache: Path, tmp_path: Path, repo: str, expected: str) -> None:
    """A repo not in the cache, and a cached repo of an architecture polymodal does not import (named)."""
    from PIL import Image

    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    cache_repo(cache, "acme/a-bert", tmp_path / "bert")
    env = {**os.environ, "HF_HUB_CACHE": str(cache)}
    done = subprocess.run(
        [sys.executable, "-m", "polymodal", "zeroshot", str(image), "--model", f"hf-hub:{repo}", "--labels", "a,b"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and expected in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_save_pretrained_writes_a_model_card(saved) -> None:
    model, directory = saved
    card = (directory / "README.md").read_text()
    assert "library_name: polymodal" in card and "# clip-vit-tiny" in card
    assert "| image | `vit` (VisionTransformer) | 128 | 4 | 128 | 48x48 images, 3 channels" in card
    assert "| text | `text_transformer` (TextTransformer) | 128 | 4 | 128 | 32 tokens |" in card
    assert (
        "**Embedding size:** 128" in card and f"**Parameters:** {sum(p.numel() for p in model.parameters()):,}" in card
    )
    assert "random initialisation" in card
    # a re-save says where the weights were loaded from
    again = polymodal.from_pretrained(directory).save_pretrained(directory.parent / "again")
    assert f"a polymodal model directory: {directory}" in (again / "README.md").read_text()


def test_open_clip_tag_miss_names_repo_and_file(cache: Path) -> None:
    pytest.importorskip("open_clip")
    with pytest.raises(ModelNotFoundError) as err:
        polymodal.create_model("clip-vit-b-32", pretrained="laion2b_s34b_b79k")
    message = str(err.value)
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message and str(cache) in message
    with pytest.raises(polymodal.errors.InputError, match="its tags are"):
        polymodal.create_model("clip-vit-b-32", pretrained="no_such_tag")
    with pytest.raises(polymodal.errors.InputError, match="not an open_clip architecture"):
        polymodal.create_model("clip-vit-tiny", pretrained="laion2b_s34b_b79k")


@pytest.mark.slow
def test_open_clip_tags_load_from_the_cache_with_parity(cache: Path, tmp_path: Path) -> None:
    """A ViT-B-32 in open_clip's repos for OpenAI's (QuickGELU) tag and a LAION tag, as open_clip caches them."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32-quickgelu").eval()
    weights = tmp_path / "oc"
    weights.mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, weights / "open_clip_model.safetensors")
    openai = cache_repo(cache, "timm/vit_base_patch32_clip_224.openai", weights)
    cache_repo(cache, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", weights, link=openai)

    # OpenAI's weights were trained with QuickGELU: the tag says so, and the model is built with it
    model = polymodal.create_model("clip-vit-b-32", pretrained="openai").eval()
    assert model.config.towers["image"].args["act_layer"] == "quick_gelu"
    assert (
        "pretrained=openai" in model.weights_source and "timm/vit_base_patch32_clip_224.openai" in model.weights_source
    )
    images = torch.randn(2, 3, 224, 224)
    text = open_clip.get_tokenizer("ViT-B-32")(["a photo of a dog", "a cat"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images), rtol=0, atol=1e-4)
        torch.testing.assert_close(model.encode_text(text), reference.encode_text(text), rtol=0, atol=1e-4)
    # a LAION tag: plain GELU, its file found in its own repo
    laion = polymodal.create_model("clip-vit-b-32", pretrained="laion2b_s34b_b79k")
    assert (
        "act_layer" not in laion.config.towers["image"].args or laion.config.towers["image"].args["act_layer"] == "gelu"
    )
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K/open_clip_model.safetensors" in laion.weights_source
