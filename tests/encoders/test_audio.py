"""AudioSpectrogramCNN and its log-mel front end."""

from __future__ import annotations

import copy

import pytest
import torch
import torchaudio

from polymodal.encoders.audio import AudioSpectrogramCNN, LogMelSpectrogram
from polymodal.encoders.base import Encoder

SAMPLE_RATE = 8000
TINY = {
    "sample_rate": SAMPLE_RATE,
    "n_fft": 128,
    "hop_length": 64,
    "n_mels": 16,
    "f_min": 0.0,
    "channels": (8, 16),
    "output_dim": 12,
}
SAMPLES = 4000  # 0.5 s -> 63 frames -> 15 time tokens after two 2x poolings


def make(**overrides) -> AudioSpectrogramCNN:
    torch.manual_seed(0)
    return AudioSpectrogramCNN(**{**TINY, **overrides})


def waveform(batch: int = 3, samples: int = SAMPLES, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, samples, generator=torch.Generator().manual_seed(seed)) * 0.1


def test_shapes_and_attributes():
    model = make()
    assert isinstance(model, Encoder)
    assert model.modality == "audio" and model.width == 16 and model.output_dim == 12
    x = waveform()
    tokens = model.forward_features(x)
    frames = SAMPLES // 64 + 1
    assert tokens.shape == (3, frames // 4, 16)
    assert model(x).shape == (3, 12)
    assert model(x.unsqueeze(1)).shape == (3, 12)  # (B, 1, samples) is squeezed
    assert model(x, sample_rate=SAMPLE_RATE).shape == (3, 12)
    no_proj = make(output_dim=None)
    assert no_proj.output_dim == 16 and no_proj(x).shape == (3, 16)


def test_pooling_is_mean_plus_max_over_time():
    model = make(output_dim=None).eval()
    x = waveform()
    tokens = model.forward_features(x)
    assert torch.allclose(model(x), tokens.mean(dim=1) + tokens.amax(dim=1))


def test_every_parameter_gets_a_gradient():
    model = make().train()
    model(waveform()).pow(2).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_gradient_checkpointing_matches():
    ref = make(dropout=0.0).train()
    ckpt = copy.deepcopy(ref)
    ckpt.set_grad_checkpointing(True)
    x = waveform()
    out_ref, out_ckpt = ref(x), ckpt(x)
    assert torch.allclose(out_ref, out_ckpt, atol=1e-6)
    out_ref.pow(2).sum().backward()
    out_ckpt.pow(2).sum().backward()
    for (name, p_ref), p_ckpt in zip(ref.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p_ref.grad, p_ckpt.grad, atol=1e-5, rtol=1e-4), name
    # The recomputation in the backward pass must not update batch-norm running statistics again.
    for (name, b_ref), b_ckpt in zip(ref.named_buffers(), ckpt.buffers()):
        assert torch.allclose(b_ref, b_ckpt, atol=1e-6), name


@pytest.mark.parametrize(
    ("x", "kwargs", "match"),
    [
        (torch.zeros(SAMPLES), {}, r"\(B, samples\)"),
        (torch.zeros(2, 1, 1, SAMPLES), {}, r"\(B, samples\)"),
        (torch.zeros(2, 2, SAMPLES), {}, r"\(B, samples\).*2 channels.*mono"),
        (torch.zeros(2, SAMPLES, dtype=torch.int16), {}, r"floating-point.*\(B, samples\)"),
        (torch.zeros(2, 100), {}, r"\(B, samples\).*at least 192 samples"),
        (torch.zeros(2, SAMPLES), {"sample_rate": 16000}, r"8000 Hz.*16000 Hz"),
        ([0.0] * SAMPLES, {}, r"\(B, samples\)"),
    ],
)
def test_bad_input_raises(x, kwargs, match):
    model = make()
    with pytest.raises(ValueError, match=match):
        model(x, **kwargs)
    with pytest.raises(ValueError, match=match):
        model.forward_features(x, **kwargs)


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="n_mels"):
        make(n_mels=2)
    with pytest.raises(ValueError, match="f_max"):
        make(f_max=SAMPLE_RATE)
    with pytest.raises(ValueError, match="channels"):
        make(channels=())


def test_eval_is_deterministic_and_batch_independent():
    model = make(dropout=0.3, spec_augment=True, top_db=40.0)
    model.train()
    model(waveform(batch=4))  # move the batch-norm running statistics away from their init
    model.eval()
    x = waveform()
    x[1] *= 100.0  # a much louder clip: top_db must floor each clip at its own maximum
    out = model(x)
    assert torch.equal(out, model(x))
    alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    assert torch.allclose(out, alone, atol=1e-5)


def test_spec_augment_only_in_training():
    plain, augmented = make().eval(), make(spec_augment=True, time_mask_width=20, freq_mask_width=6).eval()
    augmented.load_state_dict(plain.state_dict())
    x = waveform()
    assert torch.equal(augmented(x), plain(x))
    plain.train()
    augmented.train()
    assert torch.equal(plain(x), plain(x))  # no randomness in training without augmentation or dropout
    torch.manual_seed(0)
    assert not torch.allclose(augmented(x), plain(x))


def test_bf16_autocast_on_cpu():
    model = make().eval()
    x = waveform()
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()
    assert torch.allclose(out.float(), ref, atol=0.05 * ref.abs().max().item())
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().pow(2).sum()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_bf16_weights_keep_float32_front_end():
    model = make().eval()
    ref = model(waveform())
    model.to(torch.bfloat16)
    assert model.spectrogram.mel.mel_scale.fb.dtype == torch.float32
    assert model.spectrogram.mel.spectrogram.window.dtype == torch.float32
    out = model(waveform().bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=0.05 * ref.abs().max().item())


def test_lock_and_layer_groups():
    model = make()
    groups = model.layer_groups()
    assert len(groups) == 2 + len(TINY["channels"])
    flat = [id(p) for g in groups for p in g]
    assert sorted(flat) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    model.lock(unlocked_layers=1)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"proj.weight", "proj.bias"}
    model.lock(unlocked_layers=2)
    assert all(p.requires_grad for p in model.blocks[-1].parameters())
    assert not any(p.requires_grad for p in model.blocks[0].parameters())


def test_log_mel_matches_torchaudio_and_floors_per_clip():
    torch.manual_seed(0)
    front = LogMelSpectrogram(SAMPLE_RATE, n_fft=256, hop_length=80, n_mels=32, f_min=0.0, top_db=50.0)
    x = torch.randn(2, 2000) * torch.tensor([[1.0], [1e-3]])
    out = front(x)
    assert out.shape == (2, 32, 2000 // 80 + 1)
    mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=256, hop_length=80, n_mels=32)(x)
    naive = 10 * torch.log10(mel.clamp(min=1e-10))
    naive = torch.maximum(naive, naive.amax(dim=(1, 2), keepdim=True) - 50.0)
    assert torch.allclose(out, naive, atol=1e-4)
    assert out[1].max() < out[0].max() - 40  # the quiet clip is not floored at the loud clip's level


def test_log_mel_puts_a_tone_in_the_right_bin():
    front = LogMelSpectrogram(SAMPLE_RATE, n_fft=256, hop_length=80, n_mels=32, f_min=0.0)
    t = torch.arange(SAMPLE_RATE // 2) / SAMPLE_RATE
    tone = torch.sin(2 * torch.pi * 1000.0 * t).unsqueeze(0)
    fb = front.mel.mel_scale.fb  # (n_freqs, n_mels): each mel filter's weight per FFT bin
    fft_bin = round(1000.0 * 256 / SAMPLE_RATE)
    assert front(tone).mean(dim=-1).argmax(dim=-1).item() == fb[fft_bin].argmax().item()
