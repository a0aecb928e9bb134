"""The distillation task on tiny runs: a frozen teacher, the KL term against a hand-written reference,
exact accumulation, a plain saved student, exact resume, clear errors, and the distributed loss."""

import json
import math
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from polymodal import create_model, from_pretrained
from polymodal.checkpoint import read_state_dict
from polymodal.cli import main as cli_main
from polymodal.config import InputSpec
from polymodal.encoders import CLIPTokenizer
from polymodal.errors import ConfigError, InputError
from polymodal.fusion import affinity_distillation_loss, feature_distillation_loss
from polymodal.train import TrainConfig, Trainer, train
from polymodal.train import checkpoints as ckpt
from polymodal.train.teacher import ImageAdapter, TextAdapter
from tests.train.conftest import tiny_config
from tests.train.helpers import assert_same_weights, straight_and_resumed, weights

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "image": {"image_size": 32, "width": 32, "layers": 1, "heads": 2},
    "text": {"width": 32, "layers": 1, "heads": 2},
}
# the student: narrower embeddings than the teacher's, so feature distillation needs a learned projection
STUDENT = {
    "embed_dim": 16,
    "image": {**TINY["image"], "width": 16, "output_dim": 16},
    "text": {**TINY["text"], "width": 16, "output_dim": 16},
}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A saved tiny image-text model (random weights: the tests check mechanics, not what it knows)."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "model"
    create_model("clip-vit-tiny", **TINY).save_pretrained(path)
    return path


def distill_config(tmp_path, teacher, **top) -> dict:
    cfg = tiny_config(tmp_path, task="distill", task_args={"teacher": str(teacher), **top.pop("task_args", {})}, **top)
    cfg["model"]["overrides"] = STUDENT
    return cfg


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, teacher_dir):
    """A 30-step distillation run with feature distillation, and the teacher's weights before it."""
    tmp = tmp_path_factory.mktemp("distilled")
    cfg = distill_config(
        tmp,
        teacher_dir,
        steps=30,
        log_every=1,
        task_args={"feature_weight": 1.0},
        data={"train_size": 480, "batch_size": 16},
        optim={"lr": 2e-3, "warmup_steps": 3},
    )
    trainer = Trainer(TrainConfig.from_dict(cfg))
    teacher_before = weights(trainer.task.teacher.model)
    report = trainer.fit()
    return trainer, report, teacher_before, tmp / "run"


def test_teacher_stays_frozen_and_loss_falls(distilled, teacher_dir):
    trainer, report, teacher_before, _ = distilled
    teacher = trainer.task.teacher.model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    on_disk = read_state_dict(teacher_dir / "model.safetensors")
    for key, value in weights(teacher).items():
        assert torch.equal(value, teacher_before[key]) and torch.equal(value, on_disk[key]), key
    rows = trainer.metrics.rows
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses
    kd = [r["kd_loss"] for r in rows if "kd_loss" in r]
    assert sum(kd[-5:]) < sum(kd[:5]), kd
    assert {"contrastive_loss", "kd_loss", "feature_loss"} <= set(rows[0])
    assert report["summary"][0].startswith(f"distilled from {teacher_dir}")
    assert "zeroshot/shape/top1" in report["eval"]


def test_saved_student_is_a_plain_model(distilled):
    trainer, _, _, run = distilled
    student = from_pretrained(run)  # a run directory resolves to its newest checkpoint
    assert type(student).__name__ == "ContrastiveModel" and student.config.embed_dim == STUDENT["embed_dim"]
    (last,) = ckpt.complete_checkpoints(run)
    saved = read_state_dict(last / "model.safetensors")
    assert saved.keys() == create_model("clip-vit-tiny", **STUDENT).state_dict().keys()
    assert_same_weights(student, trainer.model.student)
    projection = read_state_dict(last / "distill_projection.safetensors")  # kept for resuming only
    assert set(projection) == {"image.weight", "text.weight"} and projection["image.weight"].shape == (128, 16)
    out = trainer.model.save_pretrained(run.parent / "plain")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def naive_row_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    """Mean over rows of KL(teacher || student), softmax of cosine / temperature, with explicit loops."""
    total = 0.0
    for i in range(student.shape[0]):
        s = [student[i, j].item() / temperature for j in range(student.shape[1])]
        t = [teacher[i, j].item() / temperature for j in range(teacher.shape[1])]
        zs, zt = sum(math.exp(v) for v in s), sum(math.exp(v) for v in t)
        for j in range(len(s)):
            p, q = math.exp(t[j]) / zt, math.exp(s[j]) / zs
            total += p * math.log(p / q)
    return total / student.shape[0]


@pytest.mark.parametrize("local_loss", [False, True])
def test_kd_loss_matches_a_naive_reference(local_loss):
    g = torch.Generator().manual_seed(0)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    student, teacher = {"image": unit(5, 4), "text": unit(5, 4)}, {"image": unit(5, 6), "text": unit(5, 6)}
    temperature = 0.3
    out = affinity_distillation_loss(student, teacher, temperature, local_loss=local_loss)
    sim_s, sim_t = student["image"] @ student["text"].T, teacher["image"] @ teacher["text"].T
    expected = (naive_row_kl(sim_s, sim_t, temperature) + naive_row_kl(sim_s.T, sim_t.T, temperature)) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-10)
    assert set(out.parts) == {"image-text"}
    same = affinity_distillation_loss(teacher, teacher, temperature)  # a student that is the teacher
    assert same.loss.item() == pytest.approx(0.0, abs=1e-12)

    projected = {m: torch.randn(5, 6, generator=g, dtype=torch.float64) for m in ("image", "text")}
    cosine = feature_distillation_loss(projected, teacher, "cosine").loss
    naive = [1 - (projected[m][i] @ teacher[m][i] / projected[m][i].norm()).item() for m in projected for i in range(5)]
    assert cosine.item() == pytest.approx(sum(naive) / len(naive), rel=1e-10)
    mse = feature_distillation_loss(projected, teacher, "mse").loss
    expected_mse = sum(((projected[m] - teacher[m]) ** 2).mean().item() for m in projected) / 2
    assert mse.item() == pytest.approx(expected_mse, rel=1e-10)


def test_gradient_accumulation_equals_full_batch(tmp_path, teacher_dir):
    def build(accum):
        cfg = distill_config(
            tmp_path / f"accum{accum}",
            teacher_dir,
            task_args={"feature_weight": 0.5, "kd_temperature": 0.1},
            optim={"accum_steps": accum, "grad_clip": None},
        )
        return Trainer(TrainConfig.from_dict(cfg))

    full, accum = build(1), build(4)
    accum.model.load_state_dict(full.model.state_dict())
    batch = next(full._batches())
    calls = {"n": 0}
    embed = accum.task.teacher.embed

    def counted(inputs):
        calls["n"] += 1
        return embed(inputs)

    accum.task.teacher.embed = counted
    loss_full, _, _ = full.train_step(batch)
    grads_full = {n: p.grad.clone() for n, p in full.model.named_parameters()}
    loss_acc, _, _ = accum.train_step(batch)
    assert calls["n"] == 1  # the teacher embeds the whole batch once, not once per micro-batch
    torch.testing.assert_close(loss_acc, loss_full, rtol=1e-6, atol=1e-6)
    assert any(n.startswith("projection.") for n in grads_full)
    for name, param in accum.model.named_parameters():
        # float32 sums in another order: within 1e-5 of each gradient's scale (about 4e-7 seen)
        scale = grads_full[name].abs().max().item()
        torch.testing.assert_close(param.grad, grads_full[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_resume_is_exact(tmp_path, teacher_dir, monkeypatch):
    cfg = distill_config(tmp_path, teacher_dir, steps=6, task_args={"feature_weight": 1.0})
    straight, resumed = straight_and_resumed(cfg, monkeypatch)
    assert resumed.step == 3
    resumed.fit()
    assert_same_weights(straight.model, resumed.model)  # the student and its projection


def test_image_and_text_inputs_adapt_exactly():
    # images: only the normalisation differs, so the adapted batch is the teacher's normalisation of the same pixels
    student = InputSpec("image", (32, 32), 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic", "shortest")
    teacher = InputSpec("image", (32, 32), 3, (0.4, 0.45, 0.5), (0.2, 0.3, 0.4), "bicubic", "shortest")
    pixels = torch.rand(2, 3, 32, 32)
    adapted = ImageAdapter(student, teacher)((pixels - 0.5) / 0.25)
    expected = (pixels - torch.tensor(teacher.mean).view(1, 3, 1, 1)) / torch.tensor(teacher.std).view(1, 3, 1, 1)
    torch.testing.assert_close(adapted, expected, rtol=1e-5, atol=1e-5)
    bigger = InputSpec("image", (48, 48), 3, teacher.mean, teacher.std, "bilinear", "shortest")
    assert ImageAdapter(student, bigger)(pixels).shape == (2, 3, 48, 48)
    with pytest.raises(InputError, match="aspect ratio"):
        ImageAdapter(student, InputSpec("image", (32, 48), 3, teacher.mean, teacher.std, "bicubic", "shortest"))

    # text: padding and cutting give what the tokenizer itself gives at the teacher's length
    tokenizer = CLIPTokenizer()
    texts = ["a red circle", "a small blue square in the top left corner of the image, drawn with care"]
    for short, long in ((8, 16), (16, 8)):
        ids = TextAdapter(short, long, tokenizer.pad_token_id, tokenizer.eot_token_id)(tokenizer(texts, short))
        if short < long:  # padding is exact for captions the shorter context did not cut
            assert torch.equal(ids[0], tokenizer(texts[:1], long)[0])
        else:
            assert torch.equal(ids, tokenizer(texts, long))


def test_a_teacher_of_other_modalities_is_refused(tmp_path):
    audio_teacher = tmp_path / "clap"
    create_model("clap-cnn-tiny", text=TINY["text"]).save_pretrained(audio_teacher)
    cfg = distill_config(tmp_path, audio_teacher)
    with pytest.raises(InputError, match=r"has towers \['audio', 'text'\].*lacks \['image'\]"):
        Trainer(TrainConfig.from_dict(cfg))
    assert not (tmp_path / "run").exists()  # refused before the run folder is claimed


@pytest.mark.parametrize(
    ("task_args", "error", "match"),
    [
        ({"teacher": "coca-vit-tiny"}, InputError, "is a captioner model; a teacher must be a contrastive"),
        ({"teacher": "clip-vit-tiny"}, InputError, "random weights; give its weights with task_args.teacher_pre"),
        ({"kd_weigth": 1.0}, ConfigError, r"unknown key\(s\) \['kd_weigth'\] in task_args"),
        ({"kd_weight": -1.0}, ConfigError, "task_args.kd_weight must be >= 0, got -1.0"),
        ({"kd_weight": 0, "feature_weight": 0}, ConfigError, "nothing is distilled"),
        ({"kd_temperature": 0}, ConfigError, "kd_temperature must be > 0"),
        ({"feature_loss": "l1"}, ConfigError, "feature_loss must be one of"),
    ],
)
def test_bad_task_args_are_refused(tmp_path, teacher_dir, task_args, error, match):
    cfg = distill_config(tmp_path, teacher_dir, task_args=task_args)
    with pytest.raises(error, match=match):
        Trainer(TrainConfig.from_dict(cfg))


def test_cli_runs_the_recipe_and_refuses_bad_input(tmp_path, teacher_dir, capsys):
    recipe = str(ROOT / "configs" / "distill.yaml")
    tiny = [
        f"run_dir={tmp_path / 'run'}",
        "steps=2",
        "save_every=0",
        "eval_every=0",
        "tensorboard=false",
        "data.train_size=64",
        "data.eval_size=32",
        "data.batch_size=16",
        "model.overrides.image.image_size=32",
        "model.overrides.image.layers=1",
        "model.overrides.text.layers=1",
    ]
    clap = tmp_path / "clap"
    create_model("clap-cnn-tiny", text=TINY["text"]).save_pretrained(clap)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    command = [sys.executable, "-m", "polymodal", "train", recipe, f"task_args.teacher={clap}", *tiny]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [row for row in proc.stderr.splitlines() if row.startswith("error:")]
    assert "has towers ['audio', 'text']" in line and "lacks ['image']" in line
    assert not (tmp_path / "run").exists()

    # the same mapping in-process: bad weights and unknown options are one line and exit code 2
    for bad, message in (("task_args.kd_weight=-0.5", "kd_weight must be >= 0"), ("task_args.alpha=1", "alpha")):
        assert cli_main(["train", recipe, f"task_args.teacher={teacher_dir}", *tiny, bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1

    assert cli_main(["train", recipe, f"task_args.teacher={teacher_dir}", *tiny, "progress=false"]) == 0
    assert "distilled from" in capsys.readouterr().out
    assert from_pretrained(tmp_path / "run").config.embed_dim == 64  # the recipe's student


# ---------------------------------------------------------------------------- two processes (gloo)

WORLD_SIZE, LOCAL_BATCH = 2, 3


def _kd_case(local_loss: bool, student_weight: torch.Tensor, rank: int | None):
    g = torch.Generator().manual_seed(3)
    raw = {m: torch.randn(WORLD_SIZE * LOCAL_BATCH, 5, generator=g, dtype=torch.float64) for m in ("image", "text")}
    teacher = {
        m: torch.nn.functional.normalize(torch.randn(len(x), 7, generator=g, dtype=x.dtype), dim=-1)
        for m, x in raw.items()
    }
    if rank is not None:
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        raw, teacher = {m: x[rows] for m, x in raw.items()}, {m: x[rows] for m, x in teacher.items()}
    student = {m: torch.nn.functional.normalize(x @ student_weight, dim=-1) for m, x in raw.items()}
    return affinity_distillation_loss(student, teacher, 0.2, local_loss=local_loss).loss


def _kd_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60)
    )
    try:
        results = {}
        for local_loss in (False, True):
            weight = torch.eye(5, 4, dtype=torch.float64).requires_grad_(True)
            loss = _kd_case(local_loss, weight, rank)
            loss.backward()
            results[local_loss] = (loss.detach(), weight.grad.clone())
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_kd_loss_over_two_processes_equals_one(tmp_path):
    """Each rank holds half the batch; the mean of the ranks' losses and gradients (what DDP averages)
    equals one process's on the whole batch, so the similarities span both ranks' samples."""
    # spawn, not fork: a forked child cannot run autograd once the parent's autograd engine has started
    # its worker threads, which depends on what ran earlier in the session (seen after the ONNX exports)
    start_method = "spawn"
    context = mp.start_processes(
        _kd_worker,
        args=(str(tmp_path / "store"), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method=start_method,
    )
    deadline = time.monotonic() + 60
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("distributed workers did not finish within 60 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    for local_loss in (False, True):
        weight = torch.eye(5, 4, dtype=torch.float64).requires_grad_(True)
        reference = _kd_case(local_loss, weight, None)
        reference.backward()
        losses = torch.stack([r[local_loss][0] for r in ranks])
        grads = torch.stack([r[local_loss][1] for r in ranks])
        torch.testing.assert_close(losses.mean(), reference.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grads.mean(0), weight.grad, rtol=1e-10, atol=1e-12)
        if not local_loss:  # the whole global matrix on every rank
            torch.testing.assert_close(losses, reference.detach().expand(2), rtol=1e-10, atol=1e-12)


def _train_worker(rank, cfg, port):
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    )
    train(cfg)


@pytest.mark.distributed
def test_two_training_processes_equal_one(tmp_path, teacher_dir):
    """DDP end to end: each rank has its own teacher, and after 3 steps the student and its projection
    are those of one process on the same global batches."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    results = {}
    for nproc in (1, 2):
        cfg = distill_config(tmp_path / f"p{nproc}", teacher_dir, steps=3, threads=1, task_args={"feature_weight": 1.0})
        cfg["data"]["eval_size"] = 16
        if nproc == 1:
            train(cfg)
        else:
            # spawn: see test_kd_loss_over_two_processes_equals_one
            mp.start_processes(_train_worker, args=(cfg, port), nprocs=2, join=True, start_method="spawn")
        (last,) = ckpt.complete_checkpoints(cfg["run_dir"])
        assert json.loads((Path(cfg["run_dir"]) / "report.json").read_text())["world_size"] == nproc
        results[nproc] = {
            **read_state_dict(last / "model.safetensors"),
            **{f"projection.{k}": v for k, v in read_state_dict(last / "distill_projection.safetensors").items()},
        }
    assert results[1].keys() == results[2].keys()
    for key, value in results[1].items():
        torch.testing.assert_close(results[2][key], value, rtol=1e-5, atol=1e-6, msg=key)
