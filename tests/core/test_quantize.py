"""int8 quantization (``polymodal.quantize``, ``polymodal quantize``) of a trained model: embeddings stay
within cosine 0.99 of fp32 for every tower, zero-shot accuracy stays close, the files are smaller, the
folder runs through zeroshot and the index as any exported model, and bad input is refused clearly."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from polymodal import from_pretrained, get_preprocess, get_tokenizer
from polymodal.cli import main
from polymodal.datasets import COLOURS, ShapesDataset, collate_samples
from polymodal.deploy import MANIFEST, DeployedModel, export_towers
from polymodal.errors import InputError
from polymodal.quantize import quantize_towers
from polymodal.tasks import evaluate_contrastive
from tests.helpers import cli_fails


def _shapes(model, split, n, batch_size=32):
    data = ShapesDataset(
        split, n, 0, image_size=48, transform=get_preprocess(model, "image"), tokenizer=get_tokenizer(model)
    )
    return list(DataLoader(data, batch_size=batch_size, collate_fn=collate_samples))


@pytest.fixture(scope="module")
def trained(trained_shapes_run):
    return from_pretrained(trained_shapes_run).eval()


@pytest.fixture(scope="module")
def fp32_dir(trained, tmp_path_factory):
    return export_towers(trained, tmp_path_factory.mktemp("fp32") / "dep", "onnx")


@pytest.fixture(scope="module", params=["dynamic", "static"])
def quantized(request, trained, fp32_dir, tmp_path_factory):
    method = request.param
    calibration = None
    if method == "static":
        calibration = [b.inputs for b in _shapes(trained, "train", 64)]
    out = tmp_path_factory.mktemp("int8") / method
    # static starts from the fp32 ONNX folder, dynamic from the eager model: both sources are accepted
    source = DeployedModel.load(fp32_dir) if method == "static" else trained
    quantize_towers(source, out, method, calibration)
    return method, out, DeployedModel.load(out)


def test_embeddings_of_every_tower_stay_within_cosine_0_99_of_fp32(trained, quantized):
    _, _, deployed = quantized
    held = _shapes(trained, "heldout", 7, batch_size=7)[0].inputs
    for modality in ("image", "text"):
        for batch in (1, 7):
            x = held[modality][:batch]
            with torch.no_grad():
                ref = trained.encode(modality, x)
            got = deployed.encode(modality, x)
            cosine = torch.nn.functional.cosine_similarity(got, ref)
            assert cosine.min() >= 0.99, (modality, batch, cosine)


def test_zero_shot_and_retrieval_stay_close_to_fp32(trained, quantized):
    from polymodal.datasets import colour_prompts, shape_prompts

    batches = _shapes(trained, "heldout", 200, batch_size=100)
    prompts = {"colour": colour_prompts(), "shape": shape_prompts()}
    tokenizer = get_tokenizer(trained)
    fp32, _ = evaluate_contrastive(trained, tokenizer, batches, prompts, "unseen")
    int8, _ = evaluate_contrastive(quantized[2], tokenizer, batches, prompts, "unseen")
    assert (
        fp32["zeroshot/colour/top1"] > 0.6
    )  # the trained model tells colours apart, so the comparison means something
    for key in ("zeroshot/colour/top1", "zeroshot/shape/top1", "retrieval/text_to_image/R@5"):
        assert abs(int8[key] - fp32[key]) <= 0.03, (key, fp32[key], int8[key])


def test_the_folder_is_smaller_and_says_how_it_was_quantized(quantized, fp32_dir):
    method, out, deployed = quantized
    manifest = json.loads((out / MANIFEST).read_text())
    fp32 = json.loads((fp32_dir / MANIFEST).read_text())
    assert manifest["quantization"]["method"] == method
    assert manifest["quantization"]["fp32_weights_fingerprint"] == fp32["weights_fingerprint"]
    assert manifest["weights_fingerprint"] != fp32["weights_fingerprint"]  # other weights, other embeddings
    if method == "static":
        assert manifest["quantization"]["calibration_samples"] == {"image": 64, "text": 64}
    assert manifest["config"] == fp32["config"] and manifest["inputs"] == fp32["inputs"]
    for modality, name in manifest["towers"].items():
        ratio = (out / name).stat().st_size / (fp32_dir / fp32["towers"][modality]).stat().st_size
        assert ratio < 0.35, (modality, ratio)
    # loading again gives the same outputs (the folder is all there is)
    ids = get_tokenizer(deployed.config)(["a red circle", "a small blue star"])
    torch.testing.assert_close(DeployedModel.load(out).encode_text(ids), deployed.encode_text(ids), atol=0, rtol=0)


def test_bad_input_is_refused(trained, fp32_dir, tmp_path):
    images = [{"image": torch.zeros(2, 3, 48, 48)}]
    cases = [
        (dict(method="int4"), "unknown quantization method 'int4'; expected one of dynamic, static"),
        (dict(method="static"), "static quantization calibrates activation ranges on data"),
        (dict(method="static", calibration=[]), r"calibration data is empty for the image, text tower\(s\)"),
        (dict(method="static", calibration=images), r"calibration data is empty for the text tower\(s\)"),
        (dict(method="dynamic", calibration=images), "it takes no calibration data"),
        (dict(towers=["audio"]), r"unknown tower\(s\) \['audio'\]; this model has \['image', 'text'\]"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            quantize_towers(trained, tmp_path / "x", **kwargs)
    with pytest.raises(InputError, match=r"unknown tower\(s\) \['audio'\]"):
        quantize_towers(DeployedModel.load(fp32_dir), tmp_path / "x", towers=["audio"])
    shutil.copytree(fp32_dir, tmp_path / "int8")
    manifest = json.loads((tmp_path / "int8" / MANIFEST).read_text())
    (tmp_path / "int8" / MANIFEST).write_text(json.dumps({**manifest, "quantization": {"method": "dynamic"}}))
    with pytest.raises(InputError, match="is already quantized"):
        quantize_towers(DeployedModel.load(tmp_path / "int8"), tmp_path / "x")
    pt2 = dict(manifest, format="torch-export", towers={})  # the format alone decides
    (tmp_path / "pt2").mkdir()
    (tmp_path / "pt2" / MANIFEST).write_text(json.dumps(pt2))
    with pytest.raises(InputError, match="holds torch-export programs; quantization runs on ONNX"):
        quantize_towers(DeployedModel.load(tmp_path / "pt2"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "polymodal", *args], capture_output=True, text=True, cwd=cwd, check=False
    )


def test_quantize_command_and_the_folder_through_zeroshot_and_the_index(
    trained_shapes_run, tmp_path, monkeypatch, capsys
):
    done = _cli("quantize", str(trained_shapes_run), "--method", "dynamic", "--out", "int8", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "deployment.json, image.int8.onnx, text.int8.onnx" in done.stdout

    # the other commands in-process (the same entry point, without an interpreter start each)
    monkeypatch.chdir(tmp_path)

    def polymodal(*args: str) -> str:
        assert main(list(args)) == 0
        return capsys.readouterr().out

    polymodal("data", "synth", "shapes", "--out", "held", "--n", "40", "--split", "heldout")
    labels = ["--label-column", "colour", "--labels", ",".join(COLOURS), "--json"]
    models = {"fp32": str(trained_shapes_run), "int8": "int8"}
    runs = {k: json.loads(polymodal("zeroshot", "held/index.csv", "--model", m, *labels)) for k, m in models.items()}
    top = {k: [r["ranking"][0]["label"] for r in run["results"]] for k, run in runs.items()}
    agree = sum(a == b for a, b in zip(top["fp32"], top["int8"])) / len(top["fp32"])
    assert agree >= 0.9, agree

    polymodal("index", "build", "--model", "int8", "--images", "held/index.csv", "--out", "idx")
    found = polymodal("search", "idx", "a red circle", "--top-k", "3", "--model", "int8")
    assert found.count("held/") >= 3, found
    # the fp32 model made other embeddings: the index refuses its queries instead of mixing them
    cli_fails(["search", "idx", "a red circle", "--model", str(trained_shapes_run)], capsys, "weights fingerprint")
    cli_fails(["quantize", str(trained_shapes_run), "--method", "dynamic", "--out", "int8"], capsys, "pass --overwrite")
    cli_fails(["quantize", "int8", "--method", "static", "--out", "y"], capsys, "give --calibration DATA")
