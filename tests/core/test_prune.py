"""Structured pruning (``polymodal.prune``, ``polymodal prune``): the pruned model computes exactly what the
original computes with the removed heads and units switched off, its config matches its weights, the
importance scores equal references computed another way, and bad input is refused clearly."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from polymodal import create_model, from_pretrained
from polymodal.cli import main
from polymodal.deploy import DeployedModel, export_towers
from polymodal.errors import InputError
from polymodal.fusion import clip_loss
from polymodal.prune import importance_scores, prune_model
from tests.helpers import cli_fails


def _batches(n=2, size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        text = torch.randint(1, 1000, (size, 32), generator=g)
        text[:, 20] = 49407  # end of text: the argmax the text tower pools at
        out.append({"image": torch.randn(size, 3, 48, 48, generator=g), "text": text})
    return out


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("clip-vit-tiny").eval()


def _switch_off(model, result):
    """The original model with the heads and units ``result`` removed zeroed where they enter the residual stream."""
    masked = copy.deepcopy(model)
    for modality, kept in result.kept_heads.items():
        for i, block in enumerate(masked.towers[modality].transformer.blocks):
            hd = block.attn.head_dim
            with torch.no_grad():
                for h in set(range(block.attn.num_heads)) - set(kept[i]):
                    block.attn.proj.weight[:, h * hd : (h + 1) * hd] = 0
                for u in set(range(block.mlp.fc2.in_features)) - set(result.kept_units[modality][i]):
                    block.mlp.fc2.weight[:, u] = 0
    return masked


@pytest.mark.parametrize("criterion", ["taylor", "magnitude"])
def test_pruned_model_equals_the_original_with_the_removed_parts_switched_off(tiny, criterion):
    result = prune_model(tiny, _batches(), heads=0.5, mlp=0.5, criterion=criterion)
    masked = _switch_off(tiny, result)
    x = _batches(1, 5, seed=1)[0]
    with torch.no_grad():
        for modality in ("image", "text"):
            torch.testing.assert_close(
                result.model.encode(modality, x[modality]), masked.encode(modality, x[modality]), atol=1e-5, rtol=0
            )
    # half of every block's heads and units are gone, and the input model is untouched
    for modality in ("image", "text"):
        args = result.model.config.towers[modality].args
        assert args["block_heads"] == [2, 2, 2, 2] and args["block_mlp_dims"] == [256, 256, 256, 256]
        assert "block_heads" not in tiny.config.towers[modality].args
    assert tiny.towers["image"].transformer.blocks[0].mlp.fc1.out_features == 512
    assert result.params_after < result.params_before


def test_config_matches_weights_and_the_model_saves_loads_and_exports(tiny, tmp_path):
    result = prune_model(tiny, _batches(1), heads=0.25, mlp=0.75, towers=["image"])
    pruned = result.model
    # kept per block: round(4 * 0.75) = 3 heads, round(512 * 0.25) = 128 units; the text tower as it was
    assert pruned.config.towers["image"].args["block_heads"] == [3] * 4
    assert pruned.config.towers["image"].args["block_mlp_dims"] == [128] * 4
    assert "block_heads" not in pruned.config.towers["text"].args
    for i, block in enumerate(pruned.towers["image"].transformer.blocks):
        assert block.attn.qkv.weight.shape == (3 * 3 * 32, 128) and block.attn.proj.weight.shape == (128, 96)
        assert block.mlp.fc1.weight.shape == (128, 128) and block.mlp.fc2.weight.shape == (128, 128)
        assert len(result.kept_heads["image"][i]) == 3
    pruned.save_pretrained(tmp_path / "pruned")
    loaded = from_pretrained(tmp_path / "pruned").eval()
    x = _batches(1, 3, seed=2)[0]["image"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x), pruned.encode_image(x), atol=0, rtol=0)
    export_towers(loaded, tmp_path / "onnx", "onnx", towers=["image"])
    torch.testing.assert_close(
        DeployedModel.load(tmp_path / "onnx").encode_image(x), pruned.encode_image(x).detach(), atol=1e-4, rtol=0
    )
    # it trains: every parameter gets a gradient
    out = loaded.train()(**_batches(1, 4, seed=3)[0])
    clip_loss(out.embeddings, out.logit_scale).loss.backward()
    assert all(p.grad is not None for p in loaded.parameters() if p.requires_grad)


def test_a_block_keeps_at_least_one_head_and_pruning_a_pruned_model_goes_on_from_its_widths(tiny):
    once = prune_model(tiny, _batches(1), heads=0.9, mlp=0.5, towers=["text"]).model
    assert once.config.towers["text"].args["block_heads"] == [1, 1, 1, 1]
    twice = prune_model(once, _batches(1), mlp=0.5, towers=["text"]).model
    assert twice.config.towers["text"].args["block_heads"] == [1, 1, 1, 1]
    assert twice.config.towers["text"].args["block_mlp_dims"] == [128] * 4


def test_taylor_scores_equal_the_gradient_of_a_gate_on_each_head_and_unit(tiny):
    """Reference: a gate of ones per sample and head (unit) multiplied onto its output; the score is the
    sum over samples of |dL/dgate|, taken by autograd through the gate instead of through the hooks."""
    batches = _batches(2, 4)
    scores = importance_scores(tiny, batches, ["image"], "taylor")
    model = copy.deepcopy(tiny)
    want_heads = torch.zeros(4, 4)
    want_units = torch.zeros(4, 512)
    for batch in batches:
        gates, handles = [], []
        for block in model.towers["image"].transformer.blocks:
            g_heads = torch.ones(4, 1, 4, 1, requires_grad=True)  # (B, 1, heads, 1)
            g_units = torch.ones(4, 1, 512, requires_grad=True)  # (B, 1, units)
            gates.append((g_heads, g_units))

            def gate_heads(module, args, g=g_heads):
                (x,) = args
                B, N, _ = x.shape
                return ((x.view(B, N, 4, 32) * g).view(B, N, 128),)

            handles.append(block.attn.proj.register_forward_pre_hook(gate_heads))
            handles.append(block.mlp.fc2.register_forward_pre_hook(lambda m, args, g=g_units: (args[0] * g,)))
        out = model(**batch)
        loss = clip_loss(out.embeddings, out.logit_scale).loss
        grads = torch.autograd.grad(loss, [g for pair in gates for g in pair])
        for i in range(4):
            want_heads[i] += grads[2 * i].abs().sum(dim=0).flatten()
            want_units[i] += grads[2 * i + 1].abs().sum(dim=0).flatten()
        for h in handles:
            h.remove()
    for i, block_scores in enumerate(scores["image"]):
        torch.testing.assert_close(block_scores.heads, want_heads[i], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(block_scores.units, want_units[i], rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in tiny.parameters())  # scoring leaves no gradients behind
    # a frozen model (as a user loads one for inference) scores the same, under no_grad too, and stays frozen
    frozen = copy.deepcopy(tiny).requires_grad_(False)
    with torch.no_grad():
        again = importance_scores(frozen, batches, ["image"], "taylor")
    assert not any(p.requires_grad for p in frozen.parameters())
    for mine, theirs in zip(again["image"], scores["image"]):
        torch.testing.assert_close(mine.heads, theirs.heads, rtol=1e-5, atol=1e-8)


def test_magnitude_scores_equal_an_explicit_loop(tiny):
    batch = _batches(1, 3)[0]
    scores = importance_scores(tiny, [batch], ["image"], "magnitude")
    block = tiny.towers["image"].transformer.blocks[0]
    captured = {}
    handles = [
        block.attn.proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("heads", a[0].detach())),
        block.mlp.fc2.register_forward_pre_hook(lambda m, a: captured.__setitem__("units", a[0].detach())),
    ]
    with torch.no_grad():
        tiny.encode_image(batch["image"])
    for h in handles:
        h.remove()
    W = block.attn.proj.weight.detach()
    for h in range(4):
        total = 0.0
        for b in range(3):
            norms = [
                (W[:, h * 32 : (h + 1) * 32] @ captured["heads"][b, n, h * 32 : (h + 1) * 32]).norm() for n in range(37)
            ]
            total += torch.stack(norms).mean()
        assert scores["image"][0].heads[h].item() == pytest.approx(float(total), rel=1e-4)
    W2 = block.mlp.fc2.weight.detach()
    for u in (0, 17, 511):
        total = sum((captured["units"][b, :, u].abs() * W2[:, u].norm()).mean() for b in range(3))
        assert scores["image"][0].units[u].item() == pytest.approx(float(total), rel=1e-4)


def test_bad_input_is_refused_with_a_clear_error(tiny, tmp_path):
    batches = _batches(1)
    for ratio in (0, 1, 1.5, -0.2):
        with pytest.raises(InputError, match=r"heads ratio must be strictly between 0 and 1"):
            prune_model(tiny, batches, heads=ratio)
    with pytest.raises(InputError, match="nothing to prune"):
        prune_model(tiny, batches, heads=None, mlp=None)
    with pytest.raises(InputError, match=r"unknown tower 'video'; model 'clip-vit-tiny' has \['image', 'text'\]"):
        prune_model(tiny, batches, towers=["video"])
    with pytest.raises(InputError, match="calibration data is empty"):
        prune_model(tiny, [], heads=0.5)
    with pytest.raises(InputError, match=r"criterion 'taylor' needs pairs: calibration batches lack \['text'\]"):
        prune_model(tiny, [{"image": batches[0]["image"]}], heads=0.5)
    with pytest.raises(InputError, match="unknown pruning criterion 'random'"):
        prune_model(tiny, batches, criterion="random")
    clap = create_model("clap-cnn-tiny")
    with pytest.raises(InputError, match="the audio tower is a 'audio_cnn' encoder"):
        prune_model(clap, batches, towers=["audio"])
    export_towers(tiny, tmp_path / "dep", "onnx", towers=["text"])
    with pytest.raises(InputError, match="an exported folder"):
        prune_model(DeployedModel.load(tmp_path / "dep"), batches)


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "polymodal", *args], capture_output=True, text=True, cwd=cwd, check=False
    )


def test_prune_command_as_a_user_types_it(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "model")
    args = ["prune", "model", "--heads", "0.5", "--mlp", "0.5", "--calibration", "shapes", "--calibration-size", "32"]
    done = _cli(*args, "--out", "pruned", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "heads per block [4, 4, 4, 4] -> [2, 2, 2, 2]" in done.stdout
    pruned = from_pretrained(tmp_path / "pruned")
    assert pruned.config.towers["image"].args["block_mlp_dims"] == [256] * 4
    report = json.loads((tmp_path / "pruned" / "pruning.json").read_text())
    assert report["params_after"] == sum(p.numel() for p in pruned.parameters())
    assert report["towers"]["text"]["heads_after"] == [2, 2, 2, 2]

    again = _cli(*args, "--out", "pruned", cwd=tmp_path)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip() == "error: 'pruned' already exists; pass --overwrite to replace it"


def test_prune_command_refuses_bad_input(tiny, tmp_path, monkeypatch, capsys):
    tiny.save_pretrained(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.csv").write_text("image,caption\n")
    base = ["prune", "model", "--out", "x"]
    cli_fails([*base, "--calibration", "shapes"], capsys, "nothing to prune: give --heads, --mlp or both")
    cli_fails([*base, "--heads", "0.5", "--calibration", "nope.csv"], capsys, "nope.csv: no such file or folder")
    cli_fails([*base, "--heads", "0.5", "--calibration", "empty.csv"], capsys, "--calibration empty.csv")
    cli_fails(
        [*base, "--heads", "0.5", "--calibration", "shapes", "--towers", "audio"], capsys, "unknown tower 'audio'"
    )
    cli_fails([*base, "--heads", "0.5", "--calibration", "shapes", "--towers", ","], capsys, "names no tower")
    for ratio in ("1.0", "0", "half"):
        with pytest.raises(SystemExit) as exit_:
            main([*base, "--heads", ratio, "--calibration", "shapes"])
        assert exit_.value.code == 2 and "argument --heads: expected a fraction" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
