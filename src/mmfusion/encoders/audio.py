"""Audio encoders: a weightless log-mel statistics baseline (and the fallback where no pretrained one is).

`LogMelStatsEncoder` takes mono float32 clips at its `sample_rate` (the audio modality decodes every clip
to `modalities.audio.sample_rate`; the two must agree, checked at the first batch) and returns the mean
and standard deviation over time of the log-mel spectrogram: 64 mel bands of a 25 ms Hann STFT every
10 ms (the usual speech/sound front end), so `dim` = 128. The mel filterbank is librosa's (Slaney), the
STFT torch's. Clips longer than `max_seconds` are cut (counted by `count_truncated`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmfusion.encoders.base import Encoder


class _LogMelStats(torch.nn.Module):
    def __init__(self, sample_rate: int, n_fft: int, hop: int, n_mels: int):
        super().__init__()
        import librosa  # only its filterbank: a kept definition of the mel scale

        fb = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, dtype=np.float32)
        self.register_buffer("fb", torch.from_numpy(fb))  # [n_mels, n_fft // 2 + 1]
        self.register_buffer("window", torch.hann_window(n_fft))
        self.n_fft, self.hop = n_fft, hop

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(waves, self.n_fft, self.hop, window=self.window, center=True, return_complex=True)
        logmel = torch.log(self.fb @ spec.abs().square() + 1e-6)  # [B, n_mels, frames]
        # the frames whose window lies inside the clip: the last ones of a clip padded to a longer one's
        # length would read zeros where the clip alone reads its own reflection
        frames = (torch.div(lengths - self.n_fft // 2, self.hop, rounding_mode="floor") + 1).clamp(min=1)
        valid = (torch.arange(logmel.shape[-1], device=waves.device)[None, :] < frames[:, None]).to(logmel.dtype)
        count = valid.sum(dim=1, keepdim=True).clamp(min=1.0)
        mean = (logmel * valid[:, None, :]).sum(-1) / count
        var = ((logmel - mean[..., None]).square() * valid[:, None, :]).sum(-1) / count
        return torch.cat([mean, var.clamp(min=0.0).sqrt()], dim=1)


class LogMelStatsEncoder(Encoder):
    """Log-mel spectrogram statistics (mean and std per band over time): no weights, a baseline."""

    name = "logmel_stats"
    modality = "audio"
    sample_rate = 16000
    n_fft, hop, n_mels = 400, 160, 64
    max_seconds = 30.0
    dim = 2 * n_mels
    default_batch_sizes = {"cpu": 16, "cuda": 128}
    batch_by_length = False
    may_truncate = True

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {"sample_rate": self.sample_rate, "n_fft": self.n_fft, "hop": self.hop, "n_mels": self.n_mels,
                "window": "hann", "mel": "librosa-slaney", "max_seconds": self.max_seconds, "pool": "mean+std"}  # fmt: skip

    def weights_files(self) -> list[Path]:
        return []

    def load_model(self) -> torch.nn.Module:
        return _LogMelStats(self.sample_rate, self.n_fft, self.hop, self.n_mels).eval()

    @property
    def max_samples(self) -> int:
        return int(self.max_seconds * self.sample_rate)

    def prepare(self, item: Any) -> torch.Tensor:
        wave = np.asarray(item, dtype=np.float32).reshape(-1)
        if wave.size == 0:
            raise ValueError("an empty clip cannot be encoded")
        return torch.from_numpy(np.ascontiguousarray(wave[: self.max_samples]))

    def collate(self, prepared: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([len(w) for w in prepared], dtype=torch.long)
        longest = max(int(lengths.max()), self.n_fft)
        batch = torch.zeros(len(prepared), longest, dtype=torch.float32)
        for i, w in enumerate(prepared):
            batch[i, : len(w)] = w
        return batch, lengths

    def _forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        waves, lengths = batch
        with torch.no_grad():
            return self.model(waves.to(self.device), lengths.to(self.device)).float().cpu()

    def count_truncated(self, items) -> int:
        return sum(int(np.asarray(i).size > self.max_samples) for i in items)


RESEMBLYZER_RATE, RESEMBLYZER_COVERAGE = 1.3, 0.75  # embed_utterance's defaults: partial windows per second, last-window coverage


class ResemblyzerEncoder(Encoder):
    """Resemblyzer's pretrained voice encoder (a 3-layer LSTM over 40-band mel frames, GE2E-trained): its
    weights, `pretrained.pt`, ship inside the `resemblyzer` wheel (Apache-2.0), so it loads offline. A clip's
    embedding is the mean of its 1.6 s partial windows' (resemblyzer's `embed_utterance`): 256 numbers.

    On the hydrogen-drumkits instruments it beat log-mel statistics (bench/datasets/drumkits.py)."""

    name = "resemblyzer"
    modality = "audio"
    sample_rate = 16000
    max_seconds = 30.0
    dim = 256
    default_batch_sizes = {"cpu": 16, "cuda": 64}
    may_truncate = True

    @staticmethod
    def _package_dir() -> Path:
        import importlib.util

        from mmfusion.encoders.base import EncoderUnavailableError

        spec = importlib.util.find_spec("resemblyzer")
        if spec is None or spec.origin is None:
            raise EncoderUnavailableError(
                "encoder 'resemblyzer' needs the resemblyzer package (requirements.lock installs it, with "
                "webrtcvad-wheels); or use logmel_stats"
            )
        return Path(spec.origin).parent

    @property
    def preprocessing(self) -> dict[str, Any]:
        from resemblyzer import hparams as hp

        return {"sample_rate": self.sample_rate, "mel_window_ms": hp.mel_window_length, "mel_step_ms": hp.mel_window_step,
                "n_mels": hp.mel_n_channels, "partial_frames": hp.partials_n_frames, "max_seconds": self.max_seconds,
                "pool": "mean of partials"}  # fmt: skip

    def weights_files(self) -> list[Path]:
        return [self._package_dir() / "pretrained.pt"]

    def load_model(self) -> torch.nn.Module:
        from resemblyzer import VoiceEncoder

        return VoiceEncoder(self.device, verbose=False, weights_fpath=self.weights_files()[0]).eval()

    def prepare(self, item: Any) -> np.ndarray:
        wave = np.asarray(item, dtype=np.float32).reshape(-1)
        if wave.size == 0:
            raise ValueError("an empty clip cannot be encoded")
        return np.ascontiguousarray(wave[: int(self.max_seconds * self.sample_rate)])

    def collate(self, prepared: list[Any]) -> list[np.ndarray]:
        return list(prepared)

    def _forward(self, batch: list[np.ndarray]) -> torch.Tensor:
        """resemblyzer's `embed_utterance` for a batch: every clip's 1.6 s partial windows (its own slicing and
        padding) go through the LSTM in one call, then each clip's partial embeddings are averaged and
        L2-normalised, as `embed_utterance` does one clip at a time."""
        from resemblyzer.audio import wav_to_mel_spectrogram

        mels, owner = [], []
        for i, wave in enumerate(batch):
            wav_slices, mel_slices = self.model.compute_partial_slices(len(wave), RESEMBLYZER_RATE, RESEMBLYZER_COVERAGE)
            stop = wav_slices[-1].stop
            if stop >= len(wave):
                wave = np.pad(wave, (0, stop - len(wave)), "constant")
            mel = wav_to_mel_spectrogram(wave)
            mels += [mel[s] for s in mel_slices]
            owner += [i] * len(mel_slices)
        with torch.no_grad():
            partial = self.model(torch.from_numpy(np.stack(mels)).to(self.device)).cpu().numpy()
        owner_of = np.asarray(owner)
        embeds = np.stack([partial[owner_of == i].mean(axis=0) for i in range(len(batch))])
        return torch.from_numpy((embeds / np.linalg.norm(embeds, axis=1, keepdims=True)).astype(np.float32))

    def count_truncated(self, items) -> int:
        return sum(int(np.asarray(i).size > self.max_seconds * self.sample_rate) for i in items)
