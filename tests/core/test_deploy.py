"""Deployment export (``polymodal.deploy``, ``polymodal export``): every tower of every registered
contrastive model, as ONNX under ONNX Runtime and as a ``torch.export`` program, equals eager PyTorch
within 1e-4 at batch sizes 1 and 7, with text shorter than the context length."""

import json
import subprocess
import sys

import pytest
import torch

from polymodal import create_model, list_models, resolve_model
from polymodal.cli import main
from polymodal.deploy import MANIFEST, DeployedModel, example_input, export_towers
from polymodal.errors import InputError
from tests.helpers import cli_fails

TINY = [n for n in list_models() if n.endswith("-tiny")]
CONTRASTIVE = [n for n in TINY if create_model(n, device="meta").config.kind == "contrastive"]
OTHERS = [n for n in TINY if n not in CONTRASTIVE]


@pytest.fixture(scope="module", params=[(n, f) for n in CONTRASTIVE for f in ("onnx", "torch-export")], ids=str)
def exported(request, tmp_path_factory):
    name, fmt = request.param
    torch.manual_seed(0)
    model = create_model(name).eval()
    out = tmp_path_factory.mktemp("deploy") / f"{name}-{fmt}"
    export_towers(model, out, fmt)
    return model, DeployedModel.load(out), out


def test_every_tower_matches_eager_at_batch_1_and_7(exported):
    model, deployed, out = exported
    assert deployed.modalities == sorted(model.config.towers)
    for modality in deployed.modalities:
        for batch in (1, 7):
            x = example_input(model.config, modality, batch)
            lengths = (x.shape[1], 9, 3) if modality == "text" else (None,)
            for length in lengths:
                inp = x[:, :length] if length else x
                if modality == "text":
                    inp = inp.clone()
                    inp[:, -1] = 49407  # end of text at the last position given
                with torch.no_grad():
                    ref = getattr(model, f"encode_{modality}")(inp)
                got = getattr(deployed, f"encode_{modality}")(inp)
                assert got.shape == ref.shape
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_the_manifest_says_how_to_feed_the_files(exported):
    model, deployed, out = exported
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["embed_dim"] == model.config.embed_dim
    assert manifest["logit_scale"] == pytest.approx(float(model.alignment.scale()))
    for modality, file in manifest["towers"].items():
        assert (out / file).is_file()
        spec = model.config.input_spec(modality)
        got = manifest["inputs"][modality]
        if modality == "image":
            assert got["image_size"] == list(spec.image_size) and got["mean"] == list(spec.mean)
        elif modality == "audio":
            assert got["sample_rate"] == spec.sample_rate and got["clip_seconds"] == spec.clip_seconds
        else:
            assert got["context_length"] == spec.context_length
    assert deployed.config.to_dict() == model.config.to_dict()


def test_zero_shot_predictions_of_the_deployed_model_equal_the_eager_ones(exported):
    model, deployed, _ = exported
    query = model.config.query_modality
    x = example_input(model.config, query, 7)
    prompts = example_input(model.config, "text", 5)[:, :12].clone()
    prompts[:, -1] = 49407
    with torch.no_grad():
        eager = model.encode_text(prompts, normalize=True) @ getattr(model, f"encode_{query}")(x, normalize=True).T
    exported_scores = (
        deployed.encode_text(prompts, normalize=True) @ getattr(deployed, f"encode_{query}")(x, normalize=True).T
    )
    assert torch.equal(eager.argmax(0), exported_scores.argmax(0))
    torch.testing.assert_close(exported_scores, eager, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", OTHERS)
def test_models_without_contrastive_towers_are_refused(name, tmp_path):
    with pytest.raises(InputError, match="deployment export takes contrastive models"):
        export_towers(create_model(name), tmp_path / "out", "onnx")
    assert not (tmp_path / "out").exists()


def test_bad_arguments_are_refused(tmp_path):
    model = create_model("clip-vit-tiny")
    with pytest.raises(InputError, match=r"unknown tower\(s\) \['video'\]; this model has \['image', 'text'\]"):
        export_towers(model, tmp_path / "a", "onnx", towers=["video"])
    with pytest.raises(InputError, match="unknown export format 'tflite'; expected one of onnx, torch-export"):
        export_towers(model, tmp_path / "a", "tflite")
    with pytest.raises(InputError, match="no deployment.json"):
        DeployedModel.load(tmp_path)


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "polymodal", *args], capture_output=True, text=True, cwd=cwd, check=False
    )


def test_export_command_as_a_user_types_it(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    model = create_model("clip-vit-tiny").eval()
    model.save_pretrained(tmp_path / "model")
    done = _cli("export", "model", "--format", "onnx", "--out", "deployed", "--towers", "text", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "deployed").iterdir()) == [MANIFEST, "text.onnx"]
    deployed = DeployedModel.load(tmp_path / "deployed")
    ids = example_input(model.config, "text", 3)
    torch.testing.assert_close(deployed.encode_text(ids), model.encode_text(ids).detach(), atol=1e-4, rtol=0)

    # the output is never overwritten silently; bad towers and formats are one-line errors (exit 2),
    # checked in-process through the same entry point
    monkeypatch.chdir(tmp_path)
    export = ["export", "model", "--format", "onnx"]
    cli_fails([*export, "--out", "deployed"], capsys, "'deployed' already exists; pass --overwrite to replace it")
    cli_fails([*export, "--out", "x", "--towers", "image,video"], capsys, "unknown tower(s) ['video']")
    with pytest.raises(SystemExit) as exit_:
        main(["export", "model", "--format", "tflite", "--out", "x"])
    assert exit_.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_exported_models_plug_into_zeroshot_and_the_index(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    create_model("clip-vit-tiny").eval().save_pretrained(tmp_path / "model")
    export_towers(resolve_model(tmp_path / "model"), tmp_path / "dep", "onnx")
    monkeypatch.chdir(tmp_path)  # the commands run in-process: the CLI's entry point, no interpreter start each

    def polymodal(*args: str) -> str:
        assert main(list(args)) == 0
        return capsys.readouterr().out

    polymodal("data", "synth", "shapes", "--out", "held", "--n", "24", "--split", "heldout")
    labels = ["--label-column", "shape", "--labels", "circle,square,triangle,star,cross,ring", "--json"]
    eager, exported = (
        json.loads(polymodal("zeroshot", "held/index.csv", "--model", m, *labels)) for m in ("model", "dep")
    )
    assert [r["ranking"][0]["label"] for r in exported["results"]] == [
        r["ranking"][0]["label"] for r in eager["results"]
    ]
    assert exported["accuracy"] == eager["accuracy"]

    # an index built with the eager model answers queries from the exported one (same weights fingerprint)
    polymodal("index", "build", "--model", "model", "--images", "held/index.csv", "--out", "idx")
    searched = {m: polymodal("search", "idx", "a red circle", "--top-k", "3", "--model", m) for m in ("model", "dep")}
    assert searched["dep"] == searched["model"] and searched["dep"].count("held/") == 3
