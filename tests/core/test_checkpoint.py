"""Saving and loading: exact round trips, atomic writes, clear errors for bad files."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from polymodal import CheckpointError, create_model, from_pretrained, list_models, read_state_dict

ROOT = Path(__file__).resolve().parents[2]
TINY = ["clip-vit-tiny", "clap-cnn-tiny", "bind-tiny"]


@pytest.mark.parametrize("name", TINY)
def test_save_pretrained_round_trip_is_exact(tmp_path, name):
    model = create_model(name).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    again = from_pretrained(tmp_path / "m").eval()
    assert again.config == model.config
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    from tests.core.test_models import tiny_inputs

    inputs = tiny_inputs(model)
    with torch.no_grad():
        out_a, out_b = model(**inputs).embeddings, again(**inputs).embeddings
    for k in out_a:
        assert torch.equal(out_a[k], out_b[k])


def test_no_silent_overwrite_and_atomic_replace(tmp_path):
    model = create_model("clip-vit-tiny")
    model.save_pretrained(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before

    # a failure halfway through an overwrite leaves the old checkpoint intact and no temporary files
    broken = create_model("clip-vit-tiny")
    broken.state_dict = lambda: (_ for _ in ()).throw(RuntimeError("disk full"))
    with pytest.raises(RuntimeError, match="disk full"):
        broken.save_pretrained(tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    from_pretrained(tmp_path / "m")

    create_model("clip-vit-tiny").save_pretrained(tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() != before


def test_truncated_safetensors_gives_clear_error(tmp_path):
    model = create_model("clip-vit-tiny")
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("content", [b"", b"hello, I am not a checkpoint", b"\x00" * 100])
def test_garbage_files(tmp_path, content):
    for suffix in (".safetensors", ".pt", ".bin"):
        path = tmp_path / f"w{suffix}"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            create_model("clip-vit-tiny", pretrained=path)


def test_foreign_safetensors_lists_keys(tmp_path):
    save_file(
        {"encoder.layer.0.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)},
        str(tmp_path / "other.safetensors"),
    )
    with pytest.raises(CheckpointError) as info:
        create_model("clip-vit-tiny", pretrained=tmp_path / "other.safetensors")
    msg = str(info.value)
    assert "missing keys: alignment.logit_scale" in msg and "unexpected keys: decoder.bias" in msg
    assert "more)" in msg  # long lists are truncated with a count


def test_shape_mismatch_is_named(tmp_path):
    create_model("clip-vit-tiny").save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"towers.image.pos_embed \(checkpoint \(37, 128\), model \(17, 128\)\)"):
        create_model("clip-vit-tiny", image={"image_size": 32}, pretrained=tmp_path / "m")


def test_torch_pickle_with_objects_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_state_dict(tmp_path / "evil.pt")


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_model("clip-vit-tiny", pretrained=tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        from_pretrained(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type 'bert'"):
        from_pretrained(tmp_path / "other")


def test_torch_load_always_weights_only():
    """Every torch.load in the package passes weights_only=True (and nothing falls back)."""
    calls = []
    for folder in ("polymodal", "encoders", "fusion", "tasks", "datasets"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for m in re.finditer(r"torch\.load\(", text):
                end = text.index(")", m.end())
                calls.append((path.name, text[m.start() : end + 1]))
    assert calls, "expected at least one torch.load call to check"
    for name, call in calls:
        assert "weights_only=True" in call, f"{name}: {call}"


def test_registry_names_are_all_buildable_configs():
    from polymodal import get_model_config

    for name in list_models():
        cfg = get_model_config(name)
        assert cfg.name == name and len(cfg.towers) >= 2
