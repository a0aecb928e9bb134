"""``model.compile: true``: the run through torch.compile (inductor, the default backend, on CPU) takes the
same steps as eager, within float32 rounding."""

import pytest
import torch

from polymodal.train import TrainConfig, Trainer
from tests.train.helpers import weights


@pytest.mark.slow
def test_compiled_training_equals_eager(make_config, tmp_path):
    torch._dynamo.reset()
    runs = {}
    for compiled in (False, True):
        cfg = make_config(steps=3, run_dir=str(tmp_path / f"compile-{compiled}"), optim={"warmup_steps": 1})
        cfg["model"]["compile"] = compiled
        trainer = Trainer(TrainConfig.from_dict(cfg))
        assert isinstance(trainer.forward_model, torch._dynamo.eval_frame.OptimizedModule) == compiled
        trainer.fit()
        losses = [row["loss"] for row in trainer.metrics.rows if "loss" in row]
        runs[compiled] = (losses, weights(trainer.model))
    (eager_losses, eager), (compiled_losses, compiled) = runs[False], runs[True]
    assert len(eager_losses) == 3
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    assert eager.keys() == compiled.keys()
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5, msg=k)
    torch._dynamo.reset()
