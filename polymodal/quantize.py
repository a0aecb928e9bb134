"""Post-training int8 quantization of a model's towers, run by ONNX Runtime.

``quantize_towers(model, out, method="dynamic")`` exports each tower to ONNX (``polymodal.deploy``),
quantizes it and writes a deployment folder that ``DeployedModel.load`` (and every command taking
``--model``) runs like any exported model. ``deployment.json`` says how it was quantized.

- ``dynamic``: int8 weights (per output channel); activations quantized on the fly, batch by batch,
  from their observed range. Needs no data.
- ``static``: int8 weights and uint8 activations whose ranges were calibrated on the user's data
  (min/max per tensor), with quantize/dequantize pairs around each matrix product (QDQ), which ONNX
  Runtime fuses into integer kernels.

Why ONNX Runtime rather than PyTorch's PT2E flow with the x86 quantizer: ORT's int8 kernels (MLAS)
run from the saved file on any x86 CPU, AVX2 included, while PT2E int8 runs fast only after
``torch.compile`` with Inductor, which compiles C++ at load time and relies on VNNI / AMX for its
int8 speed. ``benchmarks/compression.py`` measures both ORT methods against fp32 eager and ORT.

Matrix products (``MatMul``, ``Gemm``) and embedding tables (``Gather``) are quantized, and, for
``static``, convolutions (the patch embedding). Normalisation, softmax and activations stay in
float: they are a small share of the work and the most sensitive to rounding.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .deploy import MANIFEST, DeployedModel, choose_towers, export_towers
from .errors import InputError
from .fileio import atomic_directory

QUANT_METHODS = ("dynamic", "static")
# Gather: the token embedding table, most of a small text tower's bytes, stored as int8 too
_OPS = {"dynamic": ["MatMul", "Gemm", "Gather"], "static": ["MatMul", "Gemm", "Conv", "Gather"]}


class _Calibration:
    """ONNX Runtime's calibration reader over one tower's batches."""

    def __init__(self, name: str, batches: list[torch.Tensor]) -> None:
        self.name, self.batches = name, iter(batches)

    def get_next(self) -> dict[str, Any] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.name: batch.detach().cpu().numpy()}

    def rewind(self) -> None:  # part of ORT's reader interface; calibration reads the data once
        pass


def _calibration_inputs(batches: Iterable[Mapping[str, torch.Tensor]] | None, towers: list[str]) -> dict[str, list]:
    if batches is None:
        raise InputError("static quantization calibrates activation ranges on data: give calibration batches")
    per_tower: dict[str, list[torch.Tensor]] = {m: [] for m in towers}
    for batch in batches:
        for modality in towers:
            if modality in batch and len(batch[modality]):
                per_tower[modality].append(batch[modality])
    empty = sorted(m for m, b in per_tower.items() if not b)
    if empty:
        raise InputError(
            f"the calibration data is empty for the {', '.join(empty)} tower(s); static quantization needs "
            "samples of every quantized tower's inputs"
        )
    return per_tower


def _fp32_folder(model: nn.Module | DeployedModel, scratch: Path, towers: list[str]) -> Path:
    """An fp32 ONNX deployment folder of ``model``: exported into ``scratch``, or the one it was loaded from."""
    if isinstance(model, DeployedModel):
        if model.format != "onnx":
            raise InputError(
                f"{model.directory} holds {model.format} programs; quantization runs on ONNX: "
                "export the model with --format onnx, or pass the model itself"
            )
        if "quantization" in model.manifest:
            raise InputError(f"{model.directory} is already quantized; pass the fp32 model")
        return model.directory
    return export_towers(model, scratch / "fp32", "onnx", towers=towers)


def _quantize_file(source: Path, target: Path, method: str, calibration: list[torch.Tensor] | None) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # shape inference and graph clean-up first, as ORT advises: it lets more nodes be quantized
    prepared = target.with_name(f"{target.stem}.prepared.onnx")
    # ONNX's own shape inference only: ORT's symbolic one gives up on the text tower's dynamic length,
    # and on giving up it writes a copy of the model into the current directory
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    if method == "dynamic":
        quantize_dynamic(
            str(prepared), str(target), op_types_to_quantize=_OPS[method], per_channel=True, weight_type=QuantType.QInt8
        )
    else:
        import onnxruntime as ort

        name = ort.InferenceSession(str(prepared), providers=["CPUExecutionProvider"]).get_inputs()[0].name
        quantize_static(
            str(prepared),
            str(target),
            _Calibration(name, calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=_OPS[method],
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
        )
    prepared.unlink()


def quantize_towers(
    model: nn.Module | DeployedModel,
    destination: str | os.PathLike,
    method: str = "dynamic",
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    towers: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an int8 deployment folder of ``model``'s ``towers`` (default: all) at ``destination``.

    Args:
        model: a contrastive model, or an fp32 ONNX folder loaded with ``DeployedModel.load``.
        destination: the folder to write (atomically; an existing one only with ``overwrite``).
        method: ``"dynamic"`` or ``"static"`` (see the module doc).
        calibration: for ``static``, batches of inputs by modality (e.g. ``{"image": (B, 3, H, W),
            "text": (B, L)}``) as the model's preprocessing and tokenizer make them.
        towers: which towers to write.
        overwrite: replace an existing ``destination``.
    """
    if method not in QUANT_METHODS:
        raise InputError(f"unknown quantization method {method!r}; expected one of {', '.join(QUANT_METHODS)}")
    if method == "dynamic" and calibration is not None:
        raise InputError("dynamic quantization measures activations as it runs; it takes no calibration data")
    import onnxruntime

    chosen = choose_towers(model, towers)
    # the data is checked before minutes go into exporting
    per_tower = _calibration_inputs(calibration, chosen) if method == "static" else {}
    with tempfile.TemporaryDirectory(prefix="polymodal-quantize-") as scratch:
        fp32 = _fp32_folder(model, Path(scratch), chosen)
        manifest = json.loads((fp32 / MANIFEST).read_text())
        with atomic_directory(destination, overwrite=overwrite) as tmp:
            files = {}
            for modality in chosen:
                name = f"{modality}.int8.onnx"
                _quantize_file(fp32 / manifest["towers"][modality], tmp / name, method, per_tower.get(modality))
                files[modality] = name
            manifest["towers"] = files
            manifest["inputs"] = {m: manifest["inputs"][m] for m in chosen}
            manifest["quantization"] = {
                "method": method,
                "weights": "int8, per output channel",
                "activations": "uint8, calibrated min/max" if method == "static" else "uint8, range per batch",
                "calibration_samples": {m: sum(len(b) for b in per_tower[m]) for m in chosen} if per_tower else None,
                "operators": _OPS[method],
                "onnxruntime": onnxruntime.__version__,
                "fp32_weights_fingerprint": manifest.get("weights_fingerprint"),
            }
            # other weights make other embeddings: an index of the fp32 model must not take these silently
            source = f"{manifest.get('weights_fingerprint')}:int8-{method}".encode()
            manifest["weights_fingerprint"] = hashlib.blake2b(source, digest_size=8).hexdigest()
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(destination)
