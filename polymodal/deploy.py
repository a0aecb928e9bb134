"""Deployment export: each tower of a contrastive model as an ONNX file or a ``torch.export`` program.

``export_towers(model, out, format="onnx")`` writes, atomically, one file per tower (``image.onnx``,
``text.onnx``, ``audio.onnx``, or ``.pt2`` for ``format="torch-export"``) and ``deployment.json``: what
running them needs besides the files (the model config, with each tower's input spec: image size,
mean/std, sample rate, clip length, context length; the tokenizer; the embedding size; the logit scale
and bias). Each file maps a batch of inputs to the tower's embeddings, unnormalised, exactly as
``model.encode_<modality>``. The batch dimension is dynamic, and so is the text length, up to the
context length: end-of-text pooling uses the positions of the ids it is given.

``DeployedModel.load(out)`` runs them (ONNX Runtime, or ``torch.export.load``) behind the same
``encode_image`` / ``encode_text`` / ``encode_audio`` as the eager model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .errors import InputError
from .fileio import atomic_directory

DEPLOY_FORMATS = ("onnx", "torch-export")
SUFFIX = {"onnx": ".onnx", "torch-export": ".pt2"}
MANIFEST = "deployment.json"
ONNX_OPSET = 18


class TowerEncoder(nn.Module):
    """``model.encode_<modality>(x)`` as a module of one input, the unit that is exported."""

    def __init__(self, model: nn.Module, modality: str) -> None:
        super().__init__()
        self.model = model
        self.modality = modality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, f"encode_{self.modality}")(x)


def example_input(config: ModelConfig, modality: str, batch: int) -> torch.Tensor:
    """An input batch of the shape and type the tower takes, from ``config.input_spec``."""
    spec = config.input_spec(modality)
    g = torch.Generator().manual_seed(batch)
    if modality == "image":
        return torch.randn(batch, spec.channels, *spec.image_size, generator=g)
    if modality == "audio":
        return torch.randn(batch, round(spec.sample_rate * spec.clip_seconds), generator=g) * 0.1
    ids = torch.randint(1, 1000, (batch, spec.context_length), generator=g)
    ids[:, -1] = ids.max() + 1  # the highest id at the end, as end-of-text is for CLIP's argmax pooling
    return ids


def _dynamic_shapes(config: ModelConfig, modality: str) -> tuple[dict[int, Any]]:
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=4096)}
    if modality == "text":
        dims[1] = torch.export.Dim("length", min=2, max=config.input_spec("text").context_length)
    return (dims,)


def choose_towers(model: nn.Module | DeployedModel, towers: Iterable[str] | None = None) -> list[str]:
    """The sorted towers of ``model`` (an eager contrastive model or a ``DeployedModel``) that ``towers``
    names, all of them by default; ``InputError`` naming any tower the model lacks."""
    if isinstance(model, DeployedModel):
        return _known(model.modalities, towers)
    config = getattr(model, "config", None)
    if config is None or config.kind != "contrastive" or not hasattr(model, "encode_text"):
        kind = getattr(config, "kind", type(model).__name__)
        raise InputError(f"deployment export takes contrastive models (towers with encode_*), got a {kind} model")
    return _known(sorted(config.towers), towers)


def _known(have: list[str], towers: Iterable[str] | None) -> list[str]:
    chosen = set(towers) if towers else set(have)
    unknown = sorted(chosen - set(have))
    if unknown:
        raise InputError(f"unknown tower(s) {unknown}; this model has {have}")
    return sorted(chosen)


def export_towers(
    model: nn.Module,
    destination: str | os.PathLike,
    format: str = "onnx",
    towers: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write each of ``towers`` (default: all) of ``model`` in ``format``, plus ``deployment.json``."""
    if format not in DEPLOY_FORMATS:
        raise InputError(f"unknown export format {format!r}; expected one of {', '.join(DEPLOY_FORMATS)}")
    chosen = choose_towers(model, towers)
    config: ModelConfig = model.config
    from polymodal.tasks.model_identity import weights_fingerprint

    model = model.eval()
    files = {}
    with atomic_directory(destination, overwrite=overwrite) as tmp, torch.no_grad():
        for modality in chosen:
            module = TowerEncoder(model, modality).eval()
            example = (example_input(config, modality, 2),)
            path = tmp / f"{modality}{SUFFIX[format]}"
            shapes = _dynamic_shapes(config, modality)
            if format == "onnx":
                with warnings.catch_warnings():  # torch's own deprecations inside the exporter, not the user's
                    warnings.simplefilter("ignore", FutureWarning)
                    program = torch.onnx.export(
                        module,
                        example,
                        dynamo=True,
                        verbose=False,  # no progress lines per export stage on the console
                        dynamic_shapes=shapes,
                        input_names=[modality],
                        output_names=[f"{modality}_embeds"],  # not "embedding": that names a weight in the graph
                        opset_version=ONNX_OPSET,
                    )
                program.save(str(path))
            else:
                torch.export.save(torch.export.export(module, example, dynamic_shapes=shapes, strict=False), path)
            files[modality] = path.name
        alignment = getattr(model, "alignment", None)
        bias = getattr(alignment, "logit_bias", None)
        manifest = {
            "format": format,
            "towers": files,
            "inputs": {m: _spec_dict(config, m) for m in chosen},
            "embed_dim": config.embed_dim,
            # so that an index built with the eager model accepts queries from the exported one, and back
            "weights_fingerprint": weights_fingerprint(model),
            "logit_scale": float(alignment.scale()) if alignment is not None else None,
            "logit_bias": float(bias) if bias is not None else None,
            "config": config.to_dict(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(destination)


def _spec_dict(config: ModelConfig, modality: str) -> dict[str, Any]:
    spec = config.input_spec(modality)
    return {k: v for k, v in dataclasses.asdict(spec).items() if v is not None}  # JSON writes tuples as lists


class DeployedModel:
    """Exported towers behind the eager model's ``encode_image`` / ``encode_text`` / ``encode_audio``.

    ``config`` is the exported model's ``ModelConfig``, so ``get_tokenizer(model.config)`` and
    ``get_preprocess`` give the inputs the files expect.
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], runners: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = manifest
        self.config = ModelConfig.from_dict(manifest["config"])
        self.format = manifest["format"]
        self.logit_scale = manifest.get("logit_scale")
        self.logit_bias = manifest.get("logit_bias")
        self.weights_fingerprint = manifest.get("weights_fingerprint")
        self.towers = runners  # modality -> a callable running its file, as the eager model's ``towers``

    @classmethod
    def load(cls, directory: str | os.PathLike, providers: list[str] | None = None) -> DeployedModel:
        """Load ``directory`` as written by ``export_towers`` (ONNX Runtime on ``providers``, default CPU)."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise InputError(f"{directory}: no {MANIFEST}; expected a folder written by `polymodal export`")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(
                f"{path}: not JSON ({err.msg} at line {err.lineno}); expected a deployment manifest"
            ) from err
        runners = {}
        for modality, name in manifest["towers"].items():
            file = directory / name
            if manifest["format"] == "onnx":
                import onnxruntime as ort

                session = ort.InferenceSession(str(file), providers=providers or ["CPUExecutionProvider"])
                runners[modality] = _OnnxRunner(session)
            else:
                runners[modality] = torch.export.load(file).module()
        return cls(directory, manifest, runners)

    @property
    def modalities(self) -> list[str]:
        return sorted(self.towers)

    def encode(self, modality: str, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """The ``modality`` tower's embeddings of ``x`` (on the CPU), as ``ContrastiveModel.encode``."""
        if modality not in self.towers:
            raise InputError(f"{self.directory} holds no {modality} tower; it has {self.modalities}")
        with torch.no_grad():
            out = self.towers[modality](x.detach().cpu())
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.encode("image", image, normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.encode("text", text, normalize)

    def encode_audio(self, audio: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.encode("audio", audio, normalize)


class _OnnxRunner:
    def __init__(self, session) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])
