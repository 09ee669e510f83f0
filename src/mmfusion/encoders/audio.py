"""Audio encoders: resemblyzer's pretrained voice encoder, and a weightless log-mel statistics baseline.

Both take mono float32 clips at their `sample_rate` (16 kHz). The audio modality decodes every clip to
`modalities.audio.sample_rate`, so featurize refuses an encoder whose rate differs from it
(`Encoder.input_settings`) instead of encoding clips at the wrong speed. Clips longer than
`max_seconds` are cut; featurize counts them from the clips' headers (`count_truncated_values`),
without decoding them again.

Both run under every runtime (mmfusion.encoders.runtime): `torch`, or exported to ONNX (`onnx`,
`onnx-int8`). What is exported is the model; the per-clip framing stays in numpy/torch in front of it:

    logmel_stats  the whole forward (STFT, mel filterbank, log, masked mean and std) over padded clips
    resemblyzer   the LSTM over every clip's 1.6 s partial windows of 40-band mel frames; the framing
                  (resemblyzer's own `wav_to_mel_spectrogram` and slicing) and the per-clip mean stay outside
"""

from __future__ import annotations

from collections.abc import Sequence
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
        window = torch.hann_window(n_fft)
        self.register_buffer("window", window)
        # the same windowed DFT as a bank of convolution kernels [2 * freqs, 1, n_fft] (cos rows, then -sin rows)
        k, t = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None], torch.arange(n_fft, dtype=torch.float64)[None, :]
        angle = 2 * torch.pi * k * t / n_fft
        dft = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window.double()
        self.register_buffer("dft", dft.float()[:, None, :], persistent=False)
        self.n_fft, self.hop = n_fft, hop

    def power(self, waves: torch.Tensor) -> torch.Tensor:
        """|STFT|^2 [B, freqs, frames] (centred: reflection-padded by half a window). torch takes it by FFT. The
        ONNX graph takes the same windowed DFT as one strided convolution: ONNX has no complex tensors, and
        ONNX Runtime's STFT op is slow: 130 ms for 16 clips of 2 s on 2 threads, against 6.9 ms for the
        convolution and 2.7 ms for torch's FFT. The two agree to float32 rounding (tested)."""
        if torch.onnx.is_in_onnx_export():
            half = self.n_fft // 2
            padded = torch.nn.functional.pad(waves[:, None, :], (half, half), mode="reflect")
            parts = torch.nn.functional.conv1d(padded, self.dft, stride=self.hop)  # [B, 2 * freqs, frames]
            real, imag = parts[:, : half + 1], parts[:, half + 1 :]
            return real * real + imag * imag
        return torch.stft(waves, self.n_fft, self.hop, window=self.window, center=True, return_complex=True).abs().square()

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        logmel = torch.log(self.fb @ self.power(waves) + 1e-6)  # [B, n_mels, frames]
        # the frames whose window lies inside the clip: the last ones of a clip padded to a longer one's
        # length would read zeros where the clip alone reads its own reflection
        frames = (torch.div(lengths - self.n_fft // 2, self.hop, rounding_mode="floor") + 1).clamp(min=1)
        valid = (torch.arange(logmel.shape[-1], device=waves.device)[None, :] < frames[:, None]).to(logmel.dtype)
        count = valid.sum(dim=1, keepdim=True).clamp(min=1.0)
        mean = (logmel * valid[:, None, :]).sum(-1) / count
        var = ((logmel - mean[..., None]).square() * valid[:, None, :]).sum(-1) / count
        return torch.cat([mean, var.clamp(min=0.0).sqrt()], dim=1)


class ClipEncoder(Encoder):
    """What every audio encoder shares: mono float32 clips at `sample_rate`, cut at `max_seconds`."""

    modality = "audio"
    sample_rate = 16000
    max_seconds = 30.0
    may_truncate = True
    # `auto` stays on torch: ONNX Runtime buys nothing for either encoder on 2 cores (bench/audio_encoders.py:
    # resemblyzer 84 clips/s under torch, onnx and int8 alike; logmel_stats 751 under torch, 455 under onnx)
    default_runtimes = {"cpu": "torch", "cuda": "torch"}

    @property
    def input_settings(self) -> dict[str, Any]:
        return {"sample_rate": self.sample_rate}

    @property
    def max_samples(self) -> int:
        return int(self.max_seconds * self.sample_rate)

    def prepare(self, item: Any) -> np.ndarray:
        wave = np.asarray(item, dtype=np.float32).reshape(-1)
        if wave.size == 0:
            raise ValueError("an empty clip cannot be encoded")
        return np.ascontiguousarray(wave[: self.max_samples])

    def item_from_content(self, content: bytes) -> np.ndarray:
        """A calibration clip (the file's bytes) decoded as featurize decodes it: mono at this encoder's rate."""
        from mmfusion.modalities.audio import AudioSpec, decode_audio

        return decode_audio(content, {**AudioSpec.defaults, "sample_rate": self.sample_rate})

    def count_truncated(self, items: Sequence[Any]) -> int:
        return sum(int(np.asarray(i).size > self.max_samples) for i in items)

    def count_truncated_values(self, source: Any, values: Sequence[str]) -> int:
        """Clips longer than `max_seconds`, judged on each file's header (no decoding)."""
        return sum(int(source.seconds(v) > self.max_seconds) for v in values)


class LogMelStatsEncoder(ClipEncoder):
    """Log-mel spectrogram statistics: the mean and standard deviation over time of 64 mel bands of a
    25 ms Hann STFT every 10 ms (the usual speech/sound front end), so `dim` = 128. No weights: a
    baseline, and the fallback where no pretrained encoder is. The filterbank is librosa's (Slaney)."""

    name = "logmel_stats"
    n_fft, hop, n_mels = 400, 160, 64
    dim = 2 * n_mels
    default_batch_sizes = {"cpu": 16, "cuda": 128}

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {"sample_rate": self.sample_rate, "n_fft": self.n_fft, "hop": self.hop, "n_mels": self.n_mels,
                "window": "hann", "mel": "librosa-slaney", "max_seconds": self.max_seconds, "pool": "mean+std"}  # fmt: skip

    def weights_files(self) -> list[Path]:
        return []

    def load_model(self) -> torch.nn.Module:
        return _LogMelStats(self.sample_rate, self.n_fft, self.hop, self.n_mels).eval().to(self.device)

    def collate(self, prepared: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = np.array([len(w) for w in prepared], dtype=np.int64)
        batch = np.zeros((len(prepared), max(int(lengths.max()), self.n_fft)), dtype=np.float32)
        for i, w in enumerate(prepared):
            batch[i, : len(w)] = w
        return torch.from_numpy(batch), torch.from_numpy(lengths)

    def _forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        waves, lengths = batch
        return self.model(waves.to(self.device), lengths.to(self.device)).float().cpu()

    def export_spec(self):
        from mmfusion.encoders.runtime import ExportSpec

        waves, lengths = self.collate([np.zeros(8000, np.float32), np.zeros(5000, np.float32)])
        example = {"waves": waves.to(self.device), "lengths": lengths.to(self.device)}
        return ExportSpec(self.model, example, {"waves": {0: "batch", 1: "samples"}, "lengths": {0: "batch"}})

    def onnx_feed(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, np.ndarray]:
        return {"waves": batch[0].numpy(), "lengths": batch[1].numpy()}


RESEMBLYZER_RATE, RESEMBLYZER_COVERAGE = 1.3, 0.75  # embed_utterance's defaults: partial windows per second, last-window coverage


class ResemblyzerEncoder(ClipEncoder):
    """Resemblyzer's pretrained voice encoder (a 3-layer LSTM over 40-band mel frames, GE2E-trained): its
    weights, `pretrained.pt`, ship inside the `resemblyzer` wheel (Apache-2.0), so it loads offline. A clip's
    embedding is the mean of its 1.6 s partial windows' (resemblyzer's `embed_utterance`): 256 numbers.

    On the hydrogen-drumkits instruments it beat log-mel statistics (bench/datasets/drumkits.py)."""

    name = "resemblyzer"
    dim = 256
    default_batch_sizes = {"cpu": 16, "cuda": 64}

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

    def collate(self, prepared: list[Any]) -> list[np.ndarray]:
        return list(prepared)

    def partials(self, batch: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """resemblyzer's `embed_utterance` framing for a batch: every clip's 1.6 s partial windows of mel frames
        (its own slicing and padding), stacked [P, 160, 40], and the clip each one belongs to [P]."""
        from resemblyzer import VoiceEncoder
        from resemblyzer.audio import wav_to_mel_spectrogram

        mels, owner = [], []
        for i, wave in enumerate(batch):
            wav_slices, mel_slices = VoiceEncoder.compute_partial_slices(len(wave), RESEMBLYZER_RATE, RESEMBLYZER_COVERAGE)
            stop = wav_slices[-1].stop
            if stop >= len(wave):
                wave = np.pad(wave, (0, stop - len(wave)), "constant")
            mel = wav_to_mel_spectrogram(wave)
            mels += [mel[s] for s in mel_slices]
            owner += [i] * len(mel_slices)
        return np.ascontiguousarray(np.stack(mels), dtype=np.float32), np.asarray(owner)

    @staticmethod
    def pool(partial: np.ndarray, owner: np.ndarray, clips: int) -> torch.Tensor:
        """Each clip's partial embeddings averaged and L2-normalised, as `embed_utterance` does."""
        embeds = np.stack([partial[owner == i].mean(axis=0) for i in range(clips)])
        return torch.from_numpy((embeds / np.linalg.norm(embeds, axis=1, keepdims=True)).astype(np.float32))

    def _forward(self, batch: list[np.ndarray]) -> torch.Tensor:
        mels, owner = self.partials(batch)
        with torch.no_grad():
            partial = self.model(torch.from_numpy(mels).to(self.device)).float().cpu().numpy()
        return self.pool(partial, owner, len(batch))

    def export_spec(self):
        """The LSTM over partial windows (mel frames in, one unit-norm 256-d vector per window out)."""
        from mmfusion.encoders.runtime import ExportSpec

        example = torch.rand((2, 160, 40), dtype=torch.float32, device=self.device)
        return ExportSpec(self.model, {"mels": example}, {"mels": {0: "partials"}})

    def onnx_feed(self, batch: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {"mels": self.partials(batch)[0]}

    def onnx_forward(self, batch: list[np.ndarray]) -> torch.Tensor:
        mels, owner = self.partials(batch)
        (partial,) = self.session.run(None, {"mels": mels})
        return self.pool(partial, owner, len(batch))

