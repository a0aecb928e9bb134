"""The trainer: one CPU to many GPUs (``torchrun -m polymodal train ...``) with the same code, for any task
(``polymodal.train.tasks``): contrastive pre-training by default, classification, captioning."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from polymodal.datasets import Batch, SkipBudget

from . import checkpoints as ckpt
from .config import TrainConfig, load_config
from .data import ResumableSampler, RunData, SeededSamples, make_loader
from .optim import ModelEma, build_optimizer, build_scheduler
from .report import MetricsWriter, write_report
from .tasks import get_task

log = logging.getLogger("polymodal.train")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


def _setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Trainer:
    """Runs ``cfg``: builds model, data and optimiser, trains, evaluates, checkpoints and reports."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.rank, self.world, self.device = _setup_distributed(cfg)
        self.is_main = self.rank == 0
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision fp16 needs CUDA (use bf16 on CPU)")
        self.run_dir = Path(cfg.run_dir)
        _seed_everything(cfg.seed)

        self.task = get_task(cfg.task)(cfg)
        self.model = self.task.build_model(self.device)
        self.data: RunData = self.task.build_data(self.model)

        self.forward_model: nn.Module = self.model
        if self.world > 1:
            towers = getattr(self.model, "towers", {})
            unused = set(towers) - set(self.data.modalities)
            self.forward_model = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(unused),
            )
        if cfg.model.compile:
            self.forward_model = torch.compile(self.forward_model)

        self.optimizer = build_optimizer(self.model, cfg.optim, self.task.lr_scales(self.model))
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.steps)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.ema = ModelEma(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        self.budget = SkipBudget(max_fraction=cfg.data.skip_budget)
        self.step, self.epoch, self.batch_in_epoch, self.nonfinite_in_row, self.nonfinite_total = 0, 0, 0, 0, 0
        self.samples_seen = 0

        resume_from = ckpt.resolve_resume(self.run_dir, cfg.resume)
        if resume_from is not None:
            self._load(resume_from)
        elif self.is_main:
            self._check_fresh_run_dir()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        self.metrics = MetricsWriter(self.run_dir, enabled=self.is_main, tensorboard=cfg.tensorboard)

    # ------------------------------------------------------------------ state

    def _check_fresh_run_dir(self) -> None:
        """A new run never mixes its outputs into (or deletes) an earlier run's unless told to."""
        leftovers = [n for n in ("metrics.jsonl", "checkpoints", "report.json") if (self.run_dir / n).exists()]
        if not leftovers:
            return
        if not self.cfg.overwrite:
            raise FileExistsError(
                f"run_dir {str(self.run_dir)!r} already holds a run ({', '.join(leftovers)}); pass resume=latest to "
                "continue it, overwrite=true to replace it, or choose another run_dir"
            )
        for name in ("metrics.jsonl", "report.json", "curves.png", "config.yaml", *self.task.output_names):
            (self.run_dir / name).unlink(missing_ok=True)
        for name in ("checkpoints", "tensorboard"):
            shutil.rmtree(self.run_dir / name, ignore_errors=True)

    def _training_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "samples_seen": self.samples_seen,
            "nonfinite_total": self.nonfinite_total,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": ckpt.rng_state(),
            "skips": self.budget.summary(),
            "config": self.cfg.to_yaml(),
        }

    def _load(self, path: Path) -> None:
        from polymodal.checkpoint import load_state_dict_strict, read_state_dict

        load_state_dict_strict(self.model, read_state_dict(path / "model.safetensors"), source=str(path))
        state = ckpt.load_training_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and (path / ckpt.EMA_NAME).is_file():
            self.ema.load_state_dict(read_state_dict(path / ckpt.EMA_NAME))
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.samples_seen, self.nonfinite_total = state["samples_seen"], state["nonfinite_total"]
        ckpt.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> Path | None:
        if not self.is_main:
            return None
        return ckpt.save_training_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            self._training_state(),
            self.ema.state_dict() if self.ema else None,
            keep=self.cfg.keep_checkpoints,
        )

    # ------------------------------------------------------------------ data

    def _batches(self):
        """Endless local batches, resuming at (epoch, batch_in_epoch)."""
        cfg = self.cfg.data
        local = cfg.batch_size // self.world
        if cfg.batch_size % self.world:
            raise ValueError(f"data.batch_size {cfg.batch_size} must be divisible by the {self.world} ranks")
        pin = self.device.type == "cuda"
        if isinstance(self.data.train, torch.utils.data.IterableDataset):
            while True:
                if hasattr(self.data.train, "set_epoch"):
                    self.data.train.set_epoch(self.epoch)
                for batch in make_loader(
                    self.data.train, local, cfg.num_workers, pin_memory=pin, seed=cfg.seed + self.epoch
                ):
                    self.batch_in_epoch += 1  # counted before use: a checkpoint resumes after this batch
                    yield batch
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        seeded = SeededSamples(self.data.train, cfg.seed)
        sampler = ResumableSampler(len(seeded), cfg.batch_size, self.rank, self.world, cfg.seed)
        while True:
            seeded.set_epoch(self.epoch)
            sampler.set_epoch(self.epoch, self.batch_in_epoch)
            for batch in make_loader(seeded, local, cfg.num_workers, sampler=sampler, pin_memory=pin):
                self.batch_in_epoch += 1
                yield batch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    # ------------------------------------------------------------------ one step

    def autocast(self):
        """The precision context of forward passes (``precision: bf16 | fp16``)."""
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss``, through the fp16 gradient scaler when there is one."""
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def train_step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimiser step on a local batch; returns (loss, grad norm, whether the step was applied)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        k = self.cfg.optim.accum_steps
        if k == 1:
            with self.autocast():
                loss = self.task.loss(self.forward_model, batch)
            self.backward(loss)
            loss = loss.detach()
        else:
            loss = self.task.accumulated_backward(self, batch, k)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        if dist.is_initialized():
            flag = (~finite).float()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            finite = flag == 0
        if not bool(finite):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler:
                self.scaler.update()
            return loss, grad_norm, False
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.task.after_step(self.model)
        if self.ema is not None:
            self.ema.update(self.model)
        return loss, grad_norm, True

    # ------------------------------------------------------------------ the run

    def evaluate(self) -> dict[str, float]:
        metrics, extras = {}, {}
        if self.is_main:
            metrics, extras = self.task.evaluate(self.model, self.data, self.device)
            self.last_eval_extras = extras
        if dist.is_initialized():
            dist.barrier()
        return metrics

    def fit(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not (self.is_main and cfg.progress),
            desc="train",
            dynamic_ncols=True,
        )
        batches = self._batches()
        window_start, window_samples = time.perf_counter(), 0
        started = time.perf_counter()
        trained_samples = 0
        eval_metrics: dict[str, float] = {}
        try:
            while self.step < cfg.steps:
                batch = next(batches)
                self.budget.update(batch)
                if len(batch) == 0:
                    continue
                batch = batch.to(self.device, non_blocking=True)
                loss, grad_norm, applied = self.train_step(batch)
                global_samples = len(batch) * self.world
                if not applied:
                    self.nonfinite_in_row += 1
                    self.nonfinite_total += 1
                    log.warning(
                        "step %d: non-finite loss %s or gradient norm %s; skipped (%d in a row)",
                        self.step,
                        loss.item(),
                        grad_norm.item(),
                        self.nonfinite_in_row,
                    )
                    if self.nonfinite_in_row >= cfg.optim.max_nonfinite:
                        raise NonFiniteLossError(
                            f"{self.nonfinite_in_row} consecutive steps had a non-finite loss or gradient norm "
                            f"(last loss {loss.item()}, grad norm {grad_norm.item()}); stopping. The last good "
                            f"checkpoint in {self.run_dir / 'checkpoints'} is intact: lower optim.lr, enable "
                            "optim.grad_clip, or check the data"
                        )
                    continue
                self.nonfinite_in_row = 0
                self.step += 1
                self.samples_seen += global_samples
                trained_samples += global_samples
                window_samples += global_samples
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    elapsed = time.perf_counter() - window_start
                    row = {
                        "step": self.step,
                        "loss": loss.item(),
                        "lr": self.scheduler.get_last_lr()[0],
                        **self.task.log_values(self.model),
                        "grad_norm": grad_norm.item(),
                        "samples_per_s": window_samples / max(elapsed, 1e-9),
                        "skipped": sum(self.budget.summary().get("by_reason", {}).values()),
                        "nonfinite_skipped": self.nonfinite_total,
                    }
                    self.metrics.write(row)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", sps=f"{row['samples_per_s']:.0f}")
                    window_start, window_samples = time.perf_counter(), 0
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self.metrics.write({"step": self.step, **self.evaluate()})
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save()
        finally:
            bar.close()
        train_seconds = time.perf_counter() - started
        self.save()
        eval_metrics = self.evaluate()
        if eval_metrics:
            self.metrics.write({"step": self.step, **eval_metrics})
        report = {
            "task": cfg.task,
            "steps": self.step,
            "samples_seen": self.samples_seen,
            "train_seconds": train_seconds,
            "samples_per_s": trained_samples / max(train_seconds, 1e-9),
            "world_size": self.world,
            "final_loss": self.metrics.last("loss"),
            "nonfinite_skipped": self.nonfinite_total,
            "skips": self.budget.summary(),
            "eval": eval_metrics,
        }
        report["summary"] = self.task.summary_lines(report)
        if self.is_main:
            write_report(self.run_dir, report, self.metrics.rows)
            extras = getattr(self, "last_eval_extras", {})
            self.task.write_outputs(self.run_dir, report, self.metrics.rows, extras, self.data, self.model)
        self.metrics.close()
        return report


def train(config: TrainConfig | dict | str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train from a ``TrainConfig``, a dict, or a YAML path (with ``key=value`` overrides); returns the report."""
    if isinstance(config, TrainConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = TrainConfig.from_dict(config)
    else:
        cfg = load_config(config, overrides)
    if overrides and isinstance(config, (TrainConfig, dict)):
        from .config import apply_overrides

        cfg = TrainConfig.from_dict(apply_overrides(cfg.to_dict(), overrides))
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
