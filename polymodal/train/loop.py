"""The trainer: one CPU to many GPUs (``torchrun -m polymodal train ...``) with the same code, for any task
(``polymodal.train.tasks``): contrastive pre-training by default, classification, captioning."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from polymodal.datasets import Batch, SkipBudget
from polymodal.errors import ConfigError, InputError, PolymodalError
from polymodal.fileio import atomic_write_text
from polymodal.lora import RUN_ADAPTER_DIR, save_adapter

from . import checkpoints as ckpt
from . import sharding
from .config import TrainConfig, apply_overrides, load_config
from .data import ResumableSampler, RunData, SeededSamples, make_loader
from .optim import ModelEma, build_optimizer, build_scheduler
from .report import MetricsWriter, write_report
from .rundir import claim_run_dir
from .tasks import get_task

log = logging.getLogger("polymodal.train")


class NonFiniteLossError(PolymodalError, RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm (the settings or data diverge)."""


def _setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.distributed.strategy == "fsdp" and world < 2:
        raise ConfigError(
            "distributed.strategy fsdp needs torchrun with 2 or more processes; start the run with "
            "torchrun --nproc_per_node=N -m polymodal train ..., or use distributed.strategy ddp"
        )
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (what model initialisation and data draw from)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_rng():
    """Run a block without changing any global RNG a training step draws from (Python, NumPy, torch, CUDA).

    Evaluation during training draws from them (a DataLoader takes a seed from torch's generator), and
    a run must follow the same trajectory whether or not it evaluates on the way.
    """
    state = ckpt.rng_state()
    try:
        yield
    finally:
        ckpt.set_rng_state(state)


class _FirstSamples(torch.utils.data.IterableDataset):
    """The first ``n`` samples of a streamed dataset."""

    def __init__(self, dataset, n: int) -> None:
        self.dataset, self.n = dataset, n

    def __iter__(self):
        return itertools.islice(iter(self.dataset), self.n)


def first_samples(data: RunData, n: int) -> RunData:
    """``data`` with only the first ``n`` held-out samples (all of them when ``n`` is 0 or at least their number)."""
    held = data.eval
    if held is None or n <= 0:
        return data
    if isinstance(held, torch.utils.data.IterableDataset):
        return dataclasses.replace(data, eval=_FirstSamples(held, n))
    if n >= len(held):
        return data
    return dataclasses.replace(data, eval=torch.utils.data.Subset(held, range(n)))


class Trainer:
    """Runs ``cfg``: builds model, data and optimiser, trains, evaluates, checkpoints and reports."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.rank, self.world, self.device = _setup_distributed(cfg)
        self.is_main = self.rank == 0
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("precision fp16 needs CUDA (use bf16 on CPU)")
        self.run_dir = Path(cfg.run_dir)
        seed_everything(cfg.seed)

        self.task = get_task(cfg.task)(cfg)
        self.model = self.task.build_model(self.device)
        saved = self.task.adapted_model(self.model)  # what the run's checkpoints hold, with its model card
        started = getattr(saved, "weights_source", None) or "random initialisation"
        saved.weights_source = f"trained with `polymodal train` into {cfg.run_dir}, starting from {started}"
        self.data: RunData = self.task.build_data(self.model)
        resume_from = ckpt.resolve_resume(self.run_dir, cfg.resume)
        if resume_from is not None:
            # before sharding: a sharded model no longer takes whole tensors in load_state_dict
            ckpt.load_model_files(self.model, resume_from)

        self.sharded = cfg.distributed.strategy == "fsdp"
        self.replica: nn.Module | None = None  # fsdp: rank 0's unsharded copy (see unsharded_model)
        self.replica_step: int | None = None  # the step whose weights the replica holds
        self.replicated: list[nn.Parameter] = []  # fsdp: the parameters every rank keeps whole
        self.forward_model: nn.Module = self._distribute()
        if cfg.model.compile:
            self.forward_model = torch.compile(self.forward_model)

        self.optimizer = build_optimizer(self.model, cfg.optim, self.task.lr_scales(self.model))
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.steps)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.ema = ModelEma(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        source = cfg.data.train or f"the built-in {cfg.data.source} data"
        self.budget = SkipBudget(max_fraction=cfg.data.skip_budget, source=source, knob="data.skip_budget")
        self.step, self.epoch, self.batch_in_epoch, self.nonfinite_in_row, self.nonfinite_total = 0, 0, 0, 0, 0
        self.samples_seen = 0
        self.scaler_overflow = False  # whether the last skipped step was the fp16 scaler finding its scale

        if self.is_main:
            # a run never writes over a user's files, nor mixes into (or deletes) an earlier run unless told to
            claim_run_dir(
                self.run_dir,
                self.output_names,
                resuming=resume_from is not None,
                resume_asked=cfg.resume is not None,
                overwrite=cfg.overwrite,
            )
        if resume_from is not None:
            self._load(resume_from)
        if self.is_main:
            atomic_write_text(self.run_dir / "config.yaml", cfg.to_yaml(), overwrite=True)
        self.metrics = MetricsWriter(
            self.run_dir,
            enabled=self.is_main,
            tensorboard=cfg.tensorboard,
            resumed_at=self.step if resume_from is not None else None,
        )

    def _distribute(self) -> nn.Module:
        """Spread ``self.model`` over the ranks: wrap it in DDP, or shard it in place (fsdp); returns what forward
        passes go through."""
        if self.sharded:
            if self.is_main:
                self.replica = sharding.unsharded_copy(self.model)
            blocks, self.replicated = sharding.shard_model(self.model, self.device, self.world, self.cfg.precision)
            log.info("FSDP2: %d blocks sharded over %d ranks", blocks, self.world)
            return self.model
        if self.world == 1:
            return self.model
        towers = getattr(self.model, "towers", {})
        unused = set(towers) - set(self.data.modalities)
        return DistributedDataParallel(
            self.model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=bool(unused),
        )

    # ------------------------------------------------------------------ state

    @property
    def output_names(self) -> tuple[str, ...]:
        """Everything a run writes into ``run_dir``."""
        own = (
            "metrics.jsonl",
            "report.json",
            "curves.png",
            "config.yaml",
            "checkpoints",
            "tensorboard",
            RUN_ADAPTER_DIR,
        )
        return (*own, *self.task.output_names)

    def _training_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "samples_seen": self.samples_seen,
            "nonfinite_total": self.nonfinite_total,
            "optimizer": self._optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": ckpt.rng_state(),
            "skips": self.budget.summary(),
            "config": self.cfg.to_yaml(),
        }

    def _optimizer_state(self) -> dict[str, Any]:
        """The optimiser's whole state (under fsdp gathered from the shards onto rank 0: every rank calls it)."""
        if self.sharded:
            return sharding.full_optimizer_state(self.model, self.optimizer)
        return self.optimizer.state_dict()

    def _ema_state(self) -> dict[str, torch.Tensor] | None:
        """The EMA's whole weights, or ``None`` without one (under fsdp gathered onto rank 0: every rank calls it)."""
        if self.ema is None:
            return None
        return sharding.full_tensors(self.ema.state_dict()) if self.sharded else self.ema.state_dict()

    def unsharded_model(self) -> nn.Module | None:
        """The model with its whole weights, for evaluation, outputs and checkpoints.

        That is ``self.model``, except under fsdp: there rank 0 holds a replica in CPU memory, loaded with the
        weights gathered from the shards (``None`` on the other ranks). Every rank must call it then, as all
        take part in the gather; it gathers once per step, since only an optimiser step changes the weights.
        """
        if not self.sharded:
            return self.model
        if self.replica_step != self.step:
            state = sharding.full_model_state(self.model)
            if self.replica is not None:
                self.replica.load_state_dict(state)
            self.replica_step = self.step
        return self.replica

    @contextlib.contextmanager
    def whole_model(self):
        """``unsharded_model()`` on the run's device for the block (the replica returns to CPU memory after)."""
        model = self.unsharded_model()
        if model is None or model is self.model:
            yield model
            return
        model.to(self.device)
        try:
            yield model
        finally:
            model.to("cpu")

    def _load(self, path: Path) -> None:
        """Resume the training state of checkpoint ``path``; ``__init__`` loaded its weights, before sharding."""
        from polymodal.checkpoint import read_state_dict

        state = self._read_training_state(path)
        if self.sharded:
            sharding.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and (path / ckpt.EMA_NAME).is_file():
            ema = read_state_dict(path / ckpt.EMA_NAME)
            self.ema.load_state_dict(sharding.shard_like(ema, self.ema.state_dict()) if self.sharded else ema)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.samples_seen, self.nonfinite_total = state["samples_seen"], state["nonfinite_total"]
        ckpt.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", path, self.step)

    @staticmethod
    def _read_training_state(path: Path) -> dict[str, Any]:
        """The training state of checkpoint ``path``; ``InputError`` naming the file when it is not one of ours.

        It is only ever read with ``weights_only=True``: a file that needs more is not a polymodal training
        state (or comes from an incompatible version), and is refused rather than unpickled.
        """
        file = path / ckpt.STATE_NAME
        expected = "a polymodal training state written by a compatible version; resume from another checkpoint"
        if not file.is_file():
            raise InputError(f"checkpoint {str(path)!r} has no {ckpt.STATE_NAME}; expected {expected}")
        try:
            state = ckpt.load_training_state(path)
        except OSError:
            raise
        except Exception:  # torch raises UnpicklingError, RuntimeError or EOFError for foreign and damaged files
            raise InputError(f"{str(file)!r} is not {expected}") from None
        needed = ("step", "epoch", "batch_in_epoch", "samples_seen", "nonfinite_total", "optimizer", "scheduler", "rng")
        missing = [key for key in needed if not isinstance(state, dict) or key not in state]
        if missing:
            raise InputError(f"{str(file)!r} lacks {missing}; it is not {expected}")
        return state

    def save(self) -> Path | None:
        """Checkpoint the current step; rank 0 writes it. Every rank calls it: under fsdp all of them take part
        in gathering the whole weights, optimiser state and EMA first."""
        if not (self.is_main or self.sharded):
            return None
        model, training_state, ema = self.unsharded_model(), self._training_state(), self._ema_state()
        if not self.is_main:
            return None
        return ckpt.save_training_checkpoint(
            self.run_dir, self.step, model, training_state, ema, keep=self.cfg.keep_checkpoints
        )

    # ------------------------------------------------------------------ data

    def _batches(self):
        """Endless local batches, resuming at (epoch, batch_in_epoch)."""
        cfg = self.cfg.data
        local = cfg.batch_size // self.world
        if cfg.batch_size % self.world:
            raise ConfigError(f"data.batch_size {cfg.batch_size} must be divisible by the {self.world} ranks")
        pin = self.device.type == "cuda"
        if isinstance(self.data.train, torch.utils.data.IterableDataset):
            while True:
                if hasattr(self.data.train, "set_epoch"):  # a resumed stream continues mid-epoch
                    self.data.train.set_epoch(self.epoch, start_batch=self.batch_in_epoch, batch_size=local)
                for batch in make_loader(
                    self.data.train,
                    local,
                    cfg.num_workers,
                    pin_memory=pin,
                    seed=cfg.seed + self.epoch,
                    drop_last=True,
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
        """One optimiser step on a local batch; returns (loss, grad norm, whether the step was applied).

        A step that is not applied sets ``scaler_overflow`` when its loss was finite and only the fp16
        gradient scaler's scale overflowed the gradients: the scaler lowers its scale and the step is
        retried on the next batch, which is how it finds its scale, not a sign of divergence.
        """
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
        if self.replicated:
            sharding.average_replicated_grads(self.replicated, self.world)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.optim.grad_clip or float("inf")
        # over sharded gradients the norm is a (replicated) DTensor; the non-finite check needs a tensor
        grad_norm = sharding.plain_tensor(torch.nn.utils.clip_grad_norm_(params, clip))
        loss_finite = torch.isfinite(loss)
        finite = loss_finite & torch.isfinite(grad_norm)
        if dist.is_initialized():
            flags = torch.stack([~loss_finite, ~finite]).float()
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            loss_finite, finite = flags[0] == 0, flags[1] == 0
        self.scaler_overflow = False
        if not bool(finite):
            # at a scale of 1 or less the scaler amplifies nothing: non-finite gradients are then genuine
            self.scaler_overflow = self.scaler is not None and bool(loss_finite) and self.scaler.get_scale() > 1.0
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

    def evaluate(self, subset: int = 0) -> dict[str, float]:
        """The task's held-out metrics, on the first ``subset`` held-out samples (0: all of them).

        Every global RNG is left as it was, so evaluating changes nothing about the rest of the run.
        """
        metrics = {}
        with self.whole_model() as model:
            if self.is_main:
                with preserved_rng():
                    metrics, extras = self.task.evaluate(model, first_samples(self.data, subset), self.device)
                if not subset:
                    self.last_eval_extras = extras
        if dist.is_initialized():
            dist.barrier()
        return metrics

    def _log_line(self, row: dict[str, Any]) -> None:
        """Without a progress bar, a log line per metrics row says how the run goes."""
        log.info(
            "step %d/%d: loss %.4f, lr %.3g, %.0f samples/s",
            row["step"],
            self.cfg.steps,
            row["loss"],
            row["lr"],
            row["samples_per_s"],
        )

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
                if not applied and self.scaler_overflow:
                    log.debug(
                        "step %d: fp16 gradient scaler overflow; scale lowered to %g",
                        self.step,
                        self.scaler.get_scale(),
                    )
                    continue
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
                    if self.is_main and not cfg.progress:
                        self._log_line(row)
                    window_start, window_samples = time.perf_counter(), 0
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    started_eval = time.perf_counter()
                    eval_row = {"step": self.step, **self.evaluate(cfg.eval_subset)}
                    if len(eval_row) > 1:
                        self.metrics.write(eval_row)
                    window_start += time.perf_counter() - started_eval  # throughput counts training time only
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
        with self.whole_model() as model:
            if self.is_main:
                write_report(self.run_dir, report, self.metrics.rows)
                if cfg.model.lora is not None:
                    base = {"model": cfg.model.name, "pretrained": cfg.model.pretrained}
                    save_adapter(
                        self.task.adapted_model(model), self.run_dir / RUN_ADAPTER_DIR, base=base, overwrite=True
                    )
                extras = getattr(self, "last_eval_extras", {})
                self.task.write_outputs(self.run_dir, report, self.metrics.rows, extras, self.data, model)
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
        cfg = TrainConfig.from_dict(apply_overrides(cfg.to_dict(), overrides))
    trainer = Trainer(cfg)
    try:
        report = trainer.fit()
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_initialized():
        # Tear down in step: every rank waits here, then drops DDP (whose reducer holds the gloo group)
        # before the group is destroyed. Freed later, after a peer had exited, the reducer left that rank
        # hanging in the gloo group's destructor (seen in tests/train/test_distributed.py).
        dist.barrier()
        trainer.forward_model = trainer.model
        del trainer
        gc.collect()
        dist.destroy_process_group()
    return report
