"""``polymodal interpolate`` and ``polymodal lora merge`` as a user types them, good input and bad."""

import pytest
import torch

import polymodal
from polymodal.config import LoraConfig
from polymodal.lora import add_lora, save_adapter
from tests.helpers import cli_fails, cli_run

TINY = {
    "image": {"image_size": 32, "width": 32, "layers": 1, "heads": 2},
    "text": {"width": 32, "layers": 1, "heads": 2},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two tiny CLIPs of one architecture, one of another, one with adapters and those adapters alone."""
    root = tmp_path_factory.mktemp("models")
    for name, seed, overrides in (
        ("a", 0, TINY),
        ("b", 1, TINY),
        ("wide", 0, {**TINY, "text": {**TINY["text"], "width": 64}}),
    ):
        torch.manual_seed(seed)
        polymodal.create_model("clip-vit-tiny", **overrides).save_pretrained(root / name)
    adapted = add_lora(polymodal.from_pretrained(root / "a"), LoraConfig(towers=["image"], r=2))
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    adapted.save_pretrained(root / "adapted")
    save_adapter(adapted, root / "adapter", base={"model": str(root / "a")})
    return root


def state(path) -> dict[str, torch.Tensor]:
    return polymodal.from_pretrained(path).state_dict()


def test_interpolate_end_points_are_the_inputs(saved, tmp_path, capsys):
    for alpha, expected in (("0", "a"), ("1", "b")):
        code, out, _ = cli_run(
            ["interpolate", str(saved / "a"), str(saved / "b"), "--alpha", alpha, "--out", str(tmp_path / alpha)],
            capsys,
        )
        assert code == 0 and f"to {tmp_path / alpha}" in out
        want = state(saved / expected)
        for k, v in state(tmp_path / alpha).items():
            assert torch.equal(v, want[k]), k
    code, _, _ = cli_run(
        ["interpolate", str(saved / "a"), str(saved / "b"), "--alpha", "0.5", "--out", str(tmp_path / "h")], capsys
    )
    a, b, half = state(saved / "a"), state(saved / "b"), state(tmp_path / "h")
    for k, v in half.items():
        torch.testing.assert_close(v, (a[k] + b[k]) / 2, rtol=0, atol=1e-6)


def test_lora_merge_of_an_adapter_directory_and_of_a_saved_model(saved, tmp_path, capsys):
    adapted = polymodal.from_pretrained(saved / "adapted").eval()
    image = torch.randn(2, 3, 32, 32)
    for source in ("adapter", "adapted"):
        code, out, _ = cli_run(["lora", "merge", str(saved / source), "--out", str(tmp_path / source)], capsys)
        assert (
            code == 0 and "merged 5 LoRA adapters of the image tower(s)" in out
        )  # qkv, proj, fc1, fc2 + output proj, out
        merged = polymodal.from_pretrained(tmp_path / source).eval()
        assert merged.config.lora is None
        with torch.no_grad():
            torch.testing.assert_close(merged.encode_image(image), adapted.encode_image(image), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["interpolate", "{a}", "{b}", "--alpha", "1.5", "--out", "{out}"], "--alpha must be a number from 0"),
        (["interpolate", "{a}", "{b}", "--alpha", "half", "--out", "{out}"], "--alpha must be a number from 0"),
        (["interpolate", "{a}", "{wide}", "--alpha", "0.5", "--out", "{out}"], "differ in architecture"),
        (["interpolate", "{a}", "{adapted}", "--alpha", "0.5", "--out", "{out}"], "has LoRA adapters; merge them"),
        (["interpolate", "{a}", "{b}", "--alpha", "0.5", "--out", "{a}"], "already exists; pass --overwrite"),
        (["lora", "merge", "{a}", "--out", "{out}"], "has no LoRA adapters to merge"),
        (["lora", "merge", "{adapter}", "--base", "{b}", "--out", "{out}"], "is not the adapter's base"),
        (["lora", "merge", "{adapter}", "--base", "{wide}", "--out", "{out}"], "another architecture"),
        (["lora", "merge", "{adapted}", "--base", "{a}", "--out", "{out}"], "--base and --pretrained apply to adapter"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(saved, tmp_path, capsys, args, message):
    paths = {name: str(saved / name) for name in ("a", "b", "wide", "adapted", "adapter")}
    cli_fails([a.format(out=tmp_path / "out", **paths) for a in args], capsys, message)
    assert not (tmp_path / "out").exists()
