"""The captioning task (``task: caption``): teacher-forced training of a captioner, CoCa-style with a text tower.

The model is ``model.name``: a captioner (``kind: captioner``, e.g. ``coca-vit-tiny``), registered or
saved. Each step's loss is ``caption_weight * captioning cross-entropy``, plus ``contrastive_weight *
CLIP loss`` when the model has a text tower. Evaluation captions every held-out image with greedy
decoding and with beam search and scores both with corpus BLEU-4 and CIDEr-D against the image's
references: for the built-in ``shapes`` data, every caption its templates give the image's shape,
colour, size and position (``references: templates``, standard multi-reference scoring), otherwise
the image's own caption (``references: caption``).

``task_args`` (all optional):
    caption_weight: weight of the captioning loss (default 1).
    contrastive_weight: weight of the contrastive loss of a model with a text tower (default 1).
    label_smoothing: label smoothing of the captioning cross-entropy (default 0).
    vocabulary: ``model`` (the decoder's vocabulary as configured, all 49408 CLIP tokens for the
        registered captioners) or ``data`` (only the tokens of the training captions: the built-in
        data's words, or the captions of a CSV / JSONL index). ``data`` makes the decoder's embedding
        and output layer, most of a small captioner's cost, tiny; it builds a new decoder, so it
        needs a registered model without ``pretrained`` weights.
    num_beams: beam width of the evaluation's beam search (default 3).
    length_penalty: its length normalisation exponent (default 1).
    max_length: most tokens per generated caption (default: what the decoder allows).
    references: ``templates`` or ``caption`` (see above; default ``templates`` for ``shapes``).
    eval_batch_size: images captioned at once in evaluation (default 250).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from polymodal.datasets import Batch
from polymodal.errors import ConfigError
from polymodal.factory import apply_overrides, create_model, get_preprocess, get_tokenizer
from polymodal.fileio import atomic_write_text
from polymodal.fusion import clip_loss, siglip_loss
from polymodal.registry import get_model_config, list_models
from polymodal.resolver import resolve_model

from .config import parse_section
from .data import RunData, build_datasets, make_loader
from .tasks import TrainTask, finish_model, register_task


@dataclass
class CaptionOptions:
    """The ``task_args`` of ``task: caption`` (see the module docstring)."""

    caption_weight: float = 1.0
    contrastive_weight: float = 1.0
    label_smoothing: float = 0.0
    vocabulary: Literal["model", "data"] = "model"
    num_beams: int = 3
    length_penalty: float = 1.0
    max_length: int | None = None
    references: Literal["templates", "caption"] | None = None
    eval_batch_size: int = 250


PLOT_IMAGES = 12


def _at_least(args: dict[str, Any], key: str, low: float) -> None:
    if args[key] is not None and args[key] < low:
        raise ConfigError(f"task_args.{key} must be >= {low}, got {args[key]!r}")


def caption_references(meta: dict[str, Any], mode: str) -> list[str]:
    """The reference captions of one held-out sample: its own caption, or every template caption of its attributes."""
    if mode == "caption":
        return [meta["caption"]]
    from polymodal.datasets.synthetic_shapes import single_shape_captions

    if meta.get("num_shapes", 1) != 1:
        return [meta["caption"]]  # the pair templates order their shapes at random; keep the one caption
    return single_shape_captions(meta["shape"], meta["colour"], meta["size"], meta["position"])


@register_task
class CaptionTask(TrainTask):
    """Image captioning (and CoCa's joint contrastive objective); see the module docstring."""

    name = "caption"
    output_names = ("captions.png", "captions.json")

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        args = dataclasses.asdict(parse_section(CaptionOptions, cfg.task_args, "task_args"))
        for key in ("caption_weight", "contrastive_weight", "label_smoothing"):
            _at_least(args, key, 0.0)
        if args["caption_weight"] == 0:
            raise ConfigError("task_args.caption_weight must be positive: it is a captioning task")
        if args["label_smoothing"] >= 1:
            raise ConfigError(f"task_args.label_smoothing must be below 1, got {args['label_smoothing']}")
        for key in ("num_beams", "eval_batch_size", "max_length"):
            _at_least(args, key, 1)
        if args["references"] is None:
            args["references"] = "templates" if cfg.data.source == "shapes" else "caption"
        if args["references"] == "templates" and cfg.data.source != "shapes":
            raise ConfigError("task_args.references: templates needs the built-in shapes data (data.source: shapes)")
        if cfg.data.source == "tones":
            raise ConfigError("task caption captions images; data.source tones holds audio")
        self.args = args
        self.tokenizer = None
        self._parts: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ model and data

    def build_model(self, device: torch.device) -> nn.Module:
        cfg = self.cfg.model
        if self.args["vocabulary"] == "data":
            if cfg.pretrained is not None or cfg.name not in list_models():
                raise ValueError(
                    "task_args.vocabulary: data builds a new decoder vocabulary, so model.name must be a registered "
                    f"captioner without model.pretrained weights (got name {cfg.name!r}, pretrained "
                    f"{cfg.pretrained!r}); use vocabulary: model to train a saved captioner further"
                )
            config = apply_overrides(get_model_config(cfg.name), cfg.overrides)
            if config.kind == "captioner":
                config.decoder.args["token_ids"] = self._data_token_ids(config)
            model = create_model(config, device=device)
        else:
            model = resolve_model(cfg.name, pretrained=cfg.pretrained, device=device, **cfg.overrides)
        if getattr(getattr(model, "config", None), "kind", None) != "captioner":
            raise ValueError(
                f"task caption needs a captioner (model kind 'captioner', e.g. coca-vit-tiny); {cfg.name!r} is a "
                f"{type(model).__name__}"
            )
        for modality, unlocked in cfg.lock.items():
            model.lock_tower(modality, unlocked_layers=unlocked)
        return finish_model(model, cfg)

    def _data_token_ids(self, config) -> list[int]:
        """Every token id of the training captions, plus start- and end-of-text."""
        tokenizer = get_tokenizer(config)
        data = self.cfg.data
        if data.source == "shapes":
            from polymodal.datasets.synthetic_shapes import caption_vocabulary

            texts = [" ".join(caption_vocabulary())]
        elif data.source == "csv":
            from polymodal.datasets import read_index

            rows = read_index(data.train, required_columns=(data.caption_key,))
            texts = [
                str(r[data.caption_key])
                for r in rows
                if isinstance(r, dict) and isinstance(r.get(data.caption_key), str)
            ]
        else:
            raise ValueError(
                f"task_args.vocabulary: data reads the training captions up front, which data.source "
                f"{data.source!r} does not allow; use vocabulary: model"
            )
        ids = {i for text in texts for i in tokenizer.encode(text)}
        return sorted(ids | {tokenizer.sot_token_id, tokenizer.eot_token_id})

    def build_data(self, model: nn.Module) -> RunData:
        self.tokenizer = get_tokenizer(model)
        train_tf = get_preprocess(model, "image", is_train=self.cfg.data.augment)
        eval_tf = get_preprocess(model, "image", is_train=False)
        data = build_datasets(self.cfg.data, model.config, self.tokenizer, train_tf, eval_tf)
        if set(data.modalities) != {"image", "text"}:
            raise ValueError(f"task caption needs image-caption pairs; the data has {list(data.modalities)}")
        return data

    # ------------------------------------------------------------------ training

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        from polymodal.tasks.captioning import caption_loss

        out = model(image=batch.inputs["image"], text=batch.inputs["text"])
        captioning = caption_loss(out.caption_logits, out.caption_targets, self.args["label_smoothing"])
        loss = self.args["caption_weight"] * captioning
        self._parts = {"caption_loss": captioning.detach()}
        if out.embeddings:  # a CoCa model; a zero weight still keeps the text tower in the graph (DDP)
            embeddings = {m: e.float() for m, e in out.embeddings.items()}
            if self.cfg.optim.loss == "siglip":
                contrastive = siglip_loss(embeddings, out.logit_scale.float(), out.logit_bias).loss
            else:
                contrastive = clip_loss(embeddings, out.logit_scale.float(), local_loss=self.cfg.optim.local_loss).loss
            loss = loss + self.args["contrastive_weight"] * contrastive
            self._parts["contrastive_loss"] = contrastive.detach()
        return loss

    def after_step(self, model: nn.Module) -> None:
        if model.alignment is not None:
            model.alignment.clamp_()

    def log_values(self, model: nn.Module) -> dict[str, float]:
        values = {k: float(v) for k, v in self._parts.items()}
        if model.alignment is not None:
            values["logit_scale"] = model.alignment.scale().item()
        return values

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: RunData, device: torch.device) -> tuple[dict[str, float], dict]:
        """BLEU-4 and CIDEr-D of greedy and beam-search captions on the held-out split, and the held-out loss.

        Also per decoding: ``exact`` (the share of captions equal to one of their references) and, when the
        samples' meta has them (the built-in data), ``right_shape`` / ``right_colour`` (the share of
        captions that name the image's shape / colour), which BLEU rewards only weakly: "a drawing of a
        red circle" shares most of its n-grams with "a drawing of a red star".
        """
        from polymodal.tasks.captioning import (
            beam_search,
            caption_loss,
            caption_words,
            cider_d,
            corpus_bleu,
            greedy_search,
        )

        if data.eval is None:
            return {}, {}
        was_training = model.training
        model.eval()
        a = self.args
        beam_name = f"beam{a['num_beams']}"
        generated: dict[str, list[str]] = {"greedy": [], beam_name: []}
        meta: list[dict] = []
        loss_sum, tokens = 0.0, 0
        try:
            for batch in make_loader(data.eval, a["eval_batch_size"], 0, sampler=None):
                if len(batch) == 0:
                    continue
                batch = batch.to(device)
                image_tokens = model.image_tokens(batch.inputs["image"])
                logits, targets = model.teacher_forcing(batch.inputs["text"], image_tokens)
                loss_sum += float(caption_loss(logits, targets)) * targets.numel()
                tokens += targets.numel()
                decoder = model.caption_decoder
                greedy = greedy_search(decoder, image_tokens, a["max_length"])
                beams = beam_search(decoder, image_tokens, a["num_beams"], a["max_length"], a["length_penalty"])
                generated["greedy"] += self.tokenizer.batch_decode(greedy.cpu())
                generated[beam_name] += self.tokenizer.batch_decode(beams.tokens.cpu())
                meta.extend(batch.meta)
        finally:
            model.train(was_training)
        if not meta:
            raise ValueError("the evaluation data yielded no usable samples")
        references = [caption_references(m, a["references"]) for m in meta]
        metrics = {"caption/heldout_loss": loss_sum / max(tokens, 1)}
        unseen = [i for i, m in enumerate(meta) if data.unseen_key and m.get(data.unseen_key)]
        for name, captions in generated.items():
            metrics[f"caption/{name}/bleu4"] = corpus_bleu(captions, references).score
            metrics[f"caption/{name}/cider"] = cider_d(captions, references).score
            metrics[f"caption/{name}/exact"] = sum(c in r for c, r in zip(captions, references)) / len(captions)
            if unseen:
                sub_refs = [references[i] for i in unseen]
                metrics[f"caption/{name}/bleu4_unseen"] = corpus_bleu([captions[i] for i in unseen], sub_refs).score
            for attr in ("shape", "colour"):  # built-in data: does the caption name the image's shape / colour?
                rows = [i for i, m in enumerate(meta) if isinstance(m.get(attr), str)]
                if rows:
                    named = sum(meta[i][attr] in caption_words(captions[i]) for i in rows)
                    metrics[f"caption/{name}/right_{attr}"] = named / len(rows)
        return metrics, {"generated": generated, "meta": meta, "references": references}

    def write_outputs(
        self, run_dir: Path, report: dict[str, Any], rows: list[dict], extras: dict, data: RunData, model: nn.Module
    ) -> None:
        """``captions.json`` (every held-out caption) and ``captions.png`` (the first held-out images)."""
        from polymodal.tasks.captioning import plot_captions

        if not extras:
            return
        generated, meta, references = extras["generated"], extras["meta"], extras["references"]
        records = [
            {"index": m.get("index", i), "caption": m.get("caption"), **{k: v[i] for k, v in generated.items()}}
            for i, m in enumerate(meta)
        ]
        atomic_write_text(run_dir / "captions.json", json.dumps(records, indent=1) + "\n", overwrite=True)
        shown = list(range(min(PLOT_IMAGES, len(meta))))
        images = [data.eval[m.get("index", i)]["image"] for i, m in ((i, meta[i]) for i in shown)]
        captions = {k: [v[i] for i in shown] for k, v in generated.items()}
        captions["true"] = [meta[i].get("caption", "") for i in shown]
        pre = model.config.preprocess
        plot_captions(
            images,
            captions,
            run_dir / "captions.png",
            correct=[generated["greedy"][i] in references[i] for i in shown],
            mean=pre.mean,
            std=pre.std,
            overwrite=True,
        )

    def summary_lines(self, report: dict[str, Any]) -> list[str]:
        """BLEU-4, CIDEr-D and exactly right captions per decoding (and, on the built-in data, how often the
        caption names the right shape and colour), then the held-out loss."""
        ev = report.get("eval", {})
        lines = []
        for name in sorted({k.split("/")[1] for k in ev if k.startswith("caption/") and k.count("/") == 2}):
            key = f"caption/{name}"
            line = f"captions ({name}): BLEU-4 {ev[f'{key}/bleu4']:.3f}, CIDEr-D {ev[f'{key}/cider']:.3f}"
            line += f", exactly right {100 * ev[f'{key}/exact']:.1f}%"
            if f"{key}/bleu4_unseen" in ev:
                line += f", BLEU-4 on unseen combinations {ev[f'{key}/bleu4_unseen']:.3f}"
            named = [
                f"{attr} {100 * ev[f'{key}/right_{attr}']:.1f}%"
                for attr in ("shape", "colour")
                if f"{key}/right_{attr}" in ev
            ]
            if named:
                line += ", names the right " + " / ".join(named)
            lines.append(line)
        if "caption/heldout_loss" in ev:
            lines.append(f"held-out captioning loss: {ev['caption/heldout_loss']:.3f}")
        return lines
