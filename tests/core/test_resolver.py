"""The one resolver: every kind of model reference gives the same model, a registered name always
means the registry, and bad references fail with a message naming what was wrong."""

from __future__ import annotations

import pytest
import torch

import polymodal
from polymodal import InputError, create_model, export_model, parse_reference, resolve_model
from polymodal.checkpoint import COMPLETE, CheckpointError, checkpoint_dir
from polymodal.commands._common import CommandError, load_model
from polymodal.registry import get_model_config
from polymodal.resolver import locate_model
from tests.core.test_models import tiny_inputs

NAME = "clip-vit-tiny"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A clip-vit-tiny whose weights differ from a fresh build's, saved in every format."""
    root = tmp_path_factory.mktemp("refs")
    torch.manual_seed(1)
    model = create_model(NAME).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(root / "saved")
    export_model(model, root / "hf", to="hf")
    export_model(model, root / "open_clip", to="open_clip")
    torch.save(model.state_dict(), root / "weights.pt")
    run = root / "run"
    for step, complete in ((10, True), (20, True), (30, False)):
        ckpt = checkpoint_dir(run, step)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(ckpt)
        if complete:
            (ckpt / COMPLETE).write_text(f"{step}\n")
    return root, model


def _embeddings(model):
    torch.manual_seed(0)
    with torch.no_grad():
        return model.eval()(**tiny_inputs(model)).embeddings


@pytest.mark.parametrize(
    ("ref", "kind"),
    [
        ("saved", "polymodal"),
        ("run", "run"),
        ("run/checkpoints/step_00000010", "polymodal"),
        ("hf", "hf"),
        ("open_clip", "open_clip"),
        ("open_clip/open_clip_config.json", "open_clip"),
    ],
)
def test_every_reference_kind_gives_the_same_model(trained, ref, kind):
    root, model = trained
    assert parse_reference(root / ref).kind == kind
    expected = _embeddings(model)
    got = _embeddings(resolve_model(root / ref))
    for modality in expected:
        torch.testing.assert_close(got[modality], expected[modality], rtol=1e-5, atol=1e-5)


def test_a_run_resolves_to_its_newest_complete_checkpoint(trained):
    root, _ = trained
    # step 30 has no completion marker: a crash interrupted it
    assert locate_model(root / "run") == root / "run" / "checkpoints" / "step_00000020"
    assert parse_reference(root / "run").directory == root / "run" / "checkpoints" / "step_00000020"
    (root / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="training run without a complete checkpoint"):
        resolve_model(root / "empty_run")


def test_registered_name_with_weights_file_matches_saved_model(trained):
    root, model = trained
    expected, got = _embeddings(model), _embeddings(resolve_model(NAME, pretrained=root / "weights.pt"))
    assert all(torch.equal(got[m], expected[m]) for m in expected)


def test_a_registered_name_always_means_the_registry(trained, tmp_path, monkeypatch):
    root, model = trained
    shadow = tmp_path / NAME
    create_model(NAME, embed_dim=64).save_pretrained(shadow)  # a local folder named like a registered model
    monkeypatch.chdir(tmp_path)
    assert create_model(NAME).config.embed_dim == 128
    assert parse_reference(NAME).kind == "registered"
    # the folder is reached by spelling it as a path
    assert create_model(f"./{NAME}").config.embed_dim == 64
    assert create_model(shadow).config.embed_dim == 64


def test_bad_references_name_what_was_wrong(tmp_path):
    with pytest.raises(InputError, match=r"unknown model 'clip-vit-tiyn'; registered models are \["):
        resolve_model("clip-vit-tiyn")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="a single weights file does not say which architecture"):
        resolve_model(tmp_path / "weights.safetensors")


def test_weights_are_required_when_asked_and_never_doubled(trained):
    root, _ = trained
    with pytest.raises(InputError, match="registered architecture with random weights"):
        resolve_model(NAME, require_weights=True)
    with pytest.raises(InputError, match="is a model config with random weights"):
        resolve_model(get_model_config(NAME), require_weights=True)
    assert resolve_model(root / "saved", require_weights=True) is not None
    with pytest.raises(InputError, match="with its own weights; drop pretrained="):
        resolve_model(root / "saved", pretrained=root / "weights.pt")


def test_overrides_apply_to_directories_too(trained):
    root, model = trained
    # before: create_model(directory, **overrides) silently dropped the overrides
    quick = resolve_model(root / "saved", quick_gelu=True)
    assert type(quick.towers["image"].transformer.blocks[0].mlp.act).__name__ == "QuickGELU"
    assert all(torch.equal(a, b) for a, b in zip(quick.state_dict().values(), model.state_dict().values()))
    with pytest.raises(CheckpointError, match="alignment"):
        resolve_model(root / "saved", embed_dim=64)  # the weights were saved for 128


def test_command_loader_is_the_resolver_with_command_messages(trained, tmp_path):
    root, model = trained
    loaded = load_model(str(root / "run"), torch.device("cpu"))
    assert not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(InputError, match="random weights; give its weights with --pretrained FILE"):
        load_model(NAME, torch.device("cpu"))
    with pytest.raises(InputError, match="with its own weights; drop --pretrained FILE"):
        load_model(str(root / "saved"), torch.device("cpu"), pretrained=str(root / "weights.pt"))
    with pytest.raises(CommandError, match="is a file; pass a model directory"):
        load_model(str(root / "weights.pt"), torch.device("cpu"))
    with pytest.raises(CommandError, match="no such model directory, and not a registered model name"):
        load_model("nope", torch.device("cpu"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(polymodal.ConfigError, match="is not valid JSON"):
        load_model(str(bad), torch.device("cpu"))


def test_tokenizer_and_transforms_follow_any_reference(trained):
    root, _ = trained
    for ref in (NAME, root / "saved", root / "run"):
        assert polymodal.get_tokenizer(ref).context_length == 32
        assert polymodal.get_preprocess(ref, "image").transforms[-1].mean == pytest.approx(
            [0.48145466, 0.4578275, 0.40821073]
        )
