"""Audio encoder: a log-mel front end followed by a PANN-style CNN (https://arxiv.org/abs/1912.10211)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn
from torch.utils.checkpoint import checkpoint

from .base import Encoder
from .layers import check_input


class LogMelSpectrogram(nn.Module):
    """Waveform ``(B, samples)`` to a log-mel spectrogram ``(B, n_mels, frames)`` in decibels.

    The STFT and the dB conversion always run in float32, also under autocast and when the
    rest of the model is cast to half precision: the power spectrum spans far more than the
    range of bfloat16's mantissa. Its buffers (window, mel filter bank) are therefore kept in
    float32 whatever dtype the module is cast to.

    Args:
        sample_rate: rate of the incoming waveform in Hz.
        n_fft: FFT size, also the window length.
        hop_length: samples between successive frames.
        n_mels: number of mel bins.
        f_min: lowest frequency of the mel filter bank in Hz.
        f_max: highest frequency in Hz; ``None`` for ``sample_rate / 2``.
        top_db: floor the output at ``top_db`` below each clip's own maximum; ``None`` for no floor.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 512,
        hop_length: int = 160,
        n_mels: int = 64,
        f_min: float = 50.0,
        f_max: float | None = None,
        top_db: float | None = None,
    ) -> None:
        super().__init__()
        nyquist = sample_rate / 2
        f_max = nyquist if f_max is None else f_max
        if not 0.0 <= f_min < f_max <= nyquist:
            raise ValueError(
                f"need 0 <= f_min < f_max <= sample_rate / 2 = {nyquist}, got f_min={f_min}, f_max={f_max}"
            )
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.n_mels = n_mels
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate,
            n_fft=n_fft,
            hop_length=hop_length,
            f_min=f_min,
            f_max=f_max,
            n_mels=n_mels,
            power=2.0,
            center=True,
            pad_mode="reflect",
        )
        self.to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=top_db)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        # Undo any cast to a lower precision (``.half()``, ``.to(torch.bfloat16)``); device moves stay.
        for module in self.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                    module._buffers[name] = buf.float()
        return self

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            mel = self.mel(waveform.float())  # (B, n_mels, frames)
            # (B, 1, ...) so that top_db floors each clip at its own maximum, not the batch's.
            return self.to_db(mel.unsqueeze(1)).squeeze(1)


class _FrozenBatchNormStats(contextlib.AbstractContextManager):
    """While active, batch norms in ``module`` normalise with batch statistics but leave their
    running statistics alone; used when a checkpointed block is recomputed in the backward pass,
    which would otherwise update them a second time."""

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.saved: list[tuple[float | None, torch.Tensor | None]] = []

    def __enter__(self) -> _FrozenBatchNormStats:
        for m in self.norms:
            tracked = m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None
            self.saved.append((m.momentum, tracked))
            m.momentum = 0.0
        return self

    def __exit__(self, *exc) -> None:
        for m, (momentum, tracked) in zip(self.norms, self.saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
        self.saved.clear()


class ConvBlock(nn.Module):
    """Two 3x3 conv-BN-ReLU layers followed by 2x2 average pooling, as in PANNs' CNN14."""

    def __init__(self, in_chans: int, out_chans: int, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, padding=1, bias=False, **factory)
        self.bn1 = nn.BatchNorm2d(out_chans, **factory)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False, **factory)
        self.bn2 = nn.BatchNorm2d(out_chans, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, 2)  # (B, out_chans, H // 2, W // 2)


class AudioSpectrogramCNN(Encoder):
    """Mono waveform ``(B, samples)`` to time tokens ``(B, T', width)`` and a pooled embedding.

    Log-mel spectrogram, batch norm over mel bins, optional SpecAugment (training only), a
    stack of conv blocks over (time, mel), then an average over the remaining mel axis gives
    one token per time step; the pooled embedding is mean + max over time, then a projection.

    Args:
        sample_rate: rate the encoder expects in Hz; resample with ``AudioPreprocess`` first.
        n_fft: FFT size of the spectrogram, also the shortest accepted input.
        hop_length: samples between spectrogram frames.
        n_mels: number of mel bins; must be at least ``2 ** len(channels)``.
        f_min: lowest mel frequency in Hz.
        f_max: highest mel frequency in Hz; ``None`` for ``sample_rate / 2``.
        top_db: floor of the log-mel spectrogram below each clip's maximum, ``None`` for none.
        channels: output channels of each conv block; each block halves time and frequency.
        output_dim: size of the projected embedding; ``None`` keeps ``channels[-1]`` with no projection.
        dropout: dropout after every conv block and before the projection (training only).
        spec_augment: mask random time and frequency stripes of the spectrogram in training.
        freq_mask_width: widest frequency stripe in mel bins.
        time_mask_width: widest time stripe in frames.
        num_masks: number of stripes of each kind.
    """

    modality = "audio"

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 512,
        hop_length: int = 160,
        n_mels: int = 64,
        f_min: float = 50.0,
        f_max: float | None = None,
        top_db: float | None = None,
        channels: Sequence[int] = (64, 128, 256, 512),
        output_dim: int | None = 512,
        dropout: float = 0.0,
        spec_augment: bool = False,
        freq_mask_width: int = 8,
        time_mask_width: int = 64,
        num_masks: int = 2,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels:
            raise ValueError("channels must name at least one conv block")
        if n_mels < 2 ** len(channels):
            raise ValueError(
                f"n_mels={n_mels} is too small for {len(channels)} conv blocks, which halve the "
                f"mel axis each; use at least {2 ** len(channels)}"
            )
        factory = {"device": device, "dtype": dtype}
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.channels = channels
        self.width = channels[-1]
        self.output_dim = output_dim if output_dim is not None else self.width
        self.spec_augment = spec_augment
        self.num_masks = num_masks
        self.grad_checkpointing = False
        # Each block floors the time axis by 2; fewer frames than this would leave no token.
        self.min_samples = max(n_fft, hop_length * (2 ** len(channels) - 1))

        self.spectrogram = LogMelSpectrogram(sample_rate, n_fft, hop_length, n_mels, f_min, f_max, top_db)
        if device is not None:
            self.spectrogram.to(device)
        self.bn0 = nn.BatchNorm1d(n_mels, **factory)
        self.freq_mask = torchaudio.transforms.FrequencyMasking(freq_mask_width, iid_masks=True)
        self.time_mask = torchaudio.transforms.TimeMasking(time_mask_width, iid_masks=True)
        in_chans = (1, *channels[:-1])
        self.blocks = nn.ModuleList(ConvBlock(i, o, **factory) for i, o in zip(in_chans, channels))
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(self.width, output_dim, **factory) if output_dim is not None else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def layer_groups(self) -> list[list[nn.Parameter]]:
        head = list(self.proj.parameters()) if self.proj is not None else []
        return [list(self.bn0.parameters()), *[list(b.parameters()) for b in self.blocks], head]

    def _check(self, x: torch.Tensor, sample_rate: int | None) -> torch.Tensor:
        name = type(self).__name__
        expected = f"(B, samples) of mono audio at {self.sample_rate} Hz"
        if sample_rate is not None and sample_rate != self.sample_rate:
            raise ValueError(
                f"{name} expects audio at {self.sample_rate} Hz, got {sample_rate} Hz; resample it "
                f"with AudioPreprocess(sample_rate={self.sample_rate}, ...)"
            )
        if isinstance(x, torch.Tensor) and x.ndim == 3:
            if x.shape[1] != 1:
                raise ValueError(
                    f"{name} expects shape {expected}, got {x.shape[1]} channels in shape "
                    f"{tuple(x.shape)}; mix to mono with AudioPreprocess"
                )
            x = x.squeeze(1)  # (B, samples)
        check_input(x, name=name, ndim=2, expected=expected)
        if x.shape[-1] < self.min_samples:
            raise ValueError(
                f"{name} expects shape {expected} with at least {self.min_samples} samples "
                f"({self.min_samples / self.sample_rate:.3f} s), got shape {tuple(x.shape)}"
            )
        return x

    def _augment(self, mel: torch.Tensor) -> torch.Tensor:
        # After bn0, so a masked stripe holds the mean (0) rather than a loud 0 dB.
        for _ in range(self.num_masks):
            mel = self.time_mask(self.freq_mask(mel))
        return mel

    def _run_block(self, block: ConvBlock, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():

            def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
                return contextlib.nullcontext(), _FrozenBatchNormStats(block)

            return checkpoint(block, x, use_reentrant=False, context_fn=contexts)
        return block(x)

    def forward_features(self, x: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """Return time tokens ``(B, T', width)``, ``T' = frames // 2 ** len(channels)``.

        Args:
            x: waveform ``(B, samples)`` (or ``(B, 1, samples)``) at ``self.sample_rate``.
            sample_rate: the rate of ``x``, if known; a mismatch raises instead of silently
                producing wrong features.
        """
        x = self._check(x, sample_rate)
        mel = self.spectrogram(x)  # (B, n_mels, frames), float32
        mel = self.bn0(mel.to(self.bn0.weight.dtype))
        if self.training and self.spec_augment:
            mel = self._augment(mel)
        x = mel.transpose(1, 2).unsqueeze(1)  # (B, 1, frames, n_mels)
        for block in self.blocks:
            x = self.dropout(self._run_block(block, x))  # (B, C, frames / 2^k, n_mels / 2^k)
        return x.mean(dim=3).transpose(1, 2)  # (B, T', width)

    def forward(self, x: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        tokens = self.forward_features(x, sample_rate=sample_rate)
        pooled = tokens.mean(dim=1) + tokens.amax(dim=1)  # (B, width)
        pooled = self.dropout(pooled)
        return self.proj(pooled) if self.proj is not None else pooled
