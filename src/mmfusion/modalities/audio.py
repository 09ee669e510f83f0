"""The audio modality: clips under `audio/`, read by libsndfile (soundfile), mono at one sample rate.

Reading: the file's bytes key the cache; `decode_audio` reads WAV, FLAC, OGG/Vorbis, MP3 and the other
containers libsndfile knows, mixes to mono and resamples (soxr) to the recorded `sample_rate`, so the
service decodes exactly as featurize did. Every limit is checked on the header before any sample is
decoded: channels, sample rate and duration (frames / rate), so a small file that declares hours of
audio is refused unread, as the image pixel limit refuses decompression bombs. Cleaning drops
undecodable, empty, too short, too long and near-silent clips, each with its reason, and saves the
decoded clip as a float WAV under `audio/`; duplicates are told by the raw file's SHA-256.

The settings (`modalities.audio` in params.yaml, recorded into the model folder as `inputs.audio`)
are the model's input domain: serving refuses what cleaning would have dropped.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmfusion.errors import RequestError
from mmfusion.modalities.base import Dropped, InputDecodeError, ModalitySpec, register_modality

if TYPE_CHECKING:
    import pandas as pd

SILENCE_FLOOR = 1e-10  # power floor of the dBFS level (an all-zero clip reads -100 dBFS)


class AudioDecodeError(InputDecodeError):
    """A clip could not be read or is outside the limits; `reason` is a short machine-readable code."""


@dataclass(frozen=True)
class AudioInfo:
    """What a clip's header says, read before any sample is decoded."""

    format: str
    sample_rate: int
    channels: int
    frames: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def _source(data: bytes | str | Path):
    return io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else str(data)


def probe_audio(data: bytes | str | Path, settings: dict[str, Any]) -> AudioInfo:
    """The header of a clip, checked against `settings` (channels, sample rate, duration); AudioDecodeError."""
    import soundfile as sf

    if not isinstance(data, (bytes, bytearray)) and not Path(data).is_file():
        raise AudioDecodeError("missing_audio", f"audio file not found: {data}")
    try:
        info = sf.info(_source(data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioDecodeError("unsupported_audio", f"not an audio file libsndfile reads (WAV, FLAC, OGG, MP3): {exc}") from exc
    head = AudioInfo(str(info.format), int(info.samplerate), int(info.channels), max(int(info.frames), 0))
    lo, hi = settings["sample_rate_range"]
    if not lo <= head.sample_rate <= hi:
        raise AudioDecodeError("bad_sample_rate", f"sample rate {head.sample_rate} Hz is outside [{lo}, {hi}]")
    if not 1 <= head.channels <= settings["max_channels"]:
        raise AudioDecodeError("too_many_channels", f"{head.channels} channels; at most {settings['max_channels']}")
    if head.frames == 0:
        raise AudioDecodeError("empty_audio", "the clip has no samples")
    if head.seconds > settings["max_seconds"]:
        raise AudioDecodeError("audio_too_long", f"{head.seconds:.1f} s > the limit of {settings['max_seconds']} s")
    return head


def decode_audio(data: bytes | str | Path, settings: dict[str, Any], head: AudioInfo | None = None) -> np.ndarray:
    """A clip as float32 mono at `settings["sample_rate"]`, limits checked on the header first (`head`: the
    header `probe_audio` already read and checked)."""
    import soundfile as sf
    import soxr

    head = head or probe_audio(data, settings)
    try:
        samples, rate = sf.read(_source(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise AudioDecodeError("corrupt_audio", f"the {head.format} clip does not decode (truncated or corrupt): {exc}") from exc
    if samples.shape[0] == 0:
        raise AudioDecodeError("empty_audio", "the clip has no samples")
    if samples.shape[0] < 0.9 * head.frames:
        raise AudioDecodeError("corrupt_audio", f"the clip is truncated: {samples.shape[0]} of {head.frames} frames")
    mono = samples.mean(axis=1)
    if not np.isfinite(mono).all():
        raise AudioDecodeError("corrupt_audio", "the clip has non-finite samples")
    target = int(settings["sample_rate"])
    if rate != target:
        mono = soxr.resample(mono, rate, target, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def level_dbfs(wave: np.ndarray) -> float:
    """The clip's RMS level in dB relative to full scale (-100 for silence)."""
    power = float(np.mean(np.square(wave, dtype=np.float64))) if wave.size else 0.0
    return round(float(10.0 * np.log10(max(power, SILENCE_FLOOR))), 3)


def write_wav(wave: np.ndarray, sample_rate: int) -> bytes:
    """A float WAV of a mono clip (exact: what serving decodes from an upload is what training saw)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, sample_rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


# Previews (the drift report's examples): a small mel-scaled spectrogram picture of a decoded clip.
PREVIEW_SIZE = (256, 64)  # px at most: one column per STFT frame (fewer for a short clip), mel-spaced rows
PREVIEW_FLOOR_DB = 80.0  # the picture spans this many dB below the clip's loudest bin


def _preview_palette() -> list[int]:
    """A dark-to-bright colour ramp (after matplotlib's magma) as a flat PNG palette of 256 colours."""
    anchors = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=float)
    x = np.linspace(0, len(anchors) - 1, 256)
    ramp = np.stack([np.interp(x, np.arange(len(anchors)), anchors[:, c]) for c in range(3)], axis=1)
    return ramp.round().astype(np.uint8).ravel().tolist()


def spectrogram_png(wave: np.ndarray, sample_rate: int, size: tuple[int, int] = PREVIEW_SIZE, n_fft: int = 512) -> bytes:
    """A palette PNG of the clip's log-magnitude spectrogram on a mel-spaced frequency axis (low at the bottom):
    up to `size` px, a few KB, numpy only (the monitor needs no audio library to show it)."""
    from PIL import Image

    width, height = size
    wave = np.asarray(wave, dtype=np.float32)
    if wave.size < n_fft:
        wave = np.pad(wave, (0, n_fft - wave.size))
    cols = int(min(width, 1 + (wave.size - n_fft) // (n_fft // 4)))
    starts = np.linspace(0, wave.size - n_fft, cols).round().astype(np.int64)
    frames = wave[starts[:, None] + np.arange(n_fft)] * np.hanning(n_fft).astype(np.float32)
    db = 20.0 * np.log10(np.abs(np.fft.rfft(frames, axis=1)) + 1e-6)
    top_mel = 2595.0 * np.log10(1.0 + sample_rate / 2 / 700.0)
    hz = 700.0 * (10 ** (np.linspace(0.0, top_mel, height) / 2595.0) - 1.0)
    bins = hz / (sample_rate / 2) * (n_fft // 2)
    rows = np.stack([np.interp(bins, np.arange(db.shape[1]), d) for d in db], axis=1)[::-1]
    scaled = (rows - (rows.max() - PREVIEW_FLOOR_DB)) / PREVIEW_FLOOR_DB * 255.0
    pixels = np.ascontiguousarray(np.clip(scaled, 0, 255).astype(np.uint8))
    img = Image.frombytes("P", (pixels.shape[1], pixels.shape[0]), pixels.tobytes())
    img.putpalette(_preview_palette())
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# Augmentation (the augment stage): seeded gain, noise and time shift (audiomentations).


def augment_audio(wave: np.ndarray, sample_rate: int, params: Any, seed: int) -> np.ndarray:
    """One seeded view of a clip: gain, Gaussian noise at a random SNR, a circular time shift."""
    import audiomentations as am

    chain = am.Compose([
        am.Gain(min_gain_db=-6.0, max_gain_db=6.0, p=1.0),
        am.AddGaussianSNR(min_snr_db=20.0, max_snr_db=40.0, p=0.8),
        am.Shift(min_shift=-0.1, max_shift=0.1, rollover=True, p=0.8),
    ])  # fmt: skip
    # audiomentations draws from the global `random` and numpy generators: seed them, then put them back
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        random.seed(seed)
        np.random.seed(seed % (2**32))
        out = chain(samples=wave.astype(np.float32), sample_rate=sample_rate)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


@register_modality
class AudioSpec(ModalitySpec):
    """Audio clips: a path relative to the project root in the manifest's `audio` column."""

    name = "audio"
    column = "audio"
    folder = "audio"
    http = "file"
    stats = ("audio_seconds", "audio_dbfs")
    log_fields = ("audio_sample_rate", "audio_channels", "audio_format", "audio_bytes")
    column_types = {"audio_sample_rate": "int", "audio_channels": "int", "audio_bytes": "int"}
    keep_share = 0.0  # raw clips are large and may be private (voices): kept only where package.log.keep says
    # a spectrogram picture (PREVIEW_SIZE, a few KB) of every request for the drift report's examples: too coarse to
    # play speech back from, but it shows loudness and pitch over time; package.log.previews: {audio: 0} stores none
    preview_share = 1.0
    parallel_load = True
    defaults = {
        "sample_rate": 16000,  # every clip is decoded to mono at this rate (recorded: serving decodes alike)
        "min_seconds": 0.2,  # shorter clips are dropped by clean and refused by the service
        "max_seconds": 60.0,  # longer ones too, judged on the header before decoding
        "sample_rate_range": [4000, 192000],  # a header outside it is absurd: refused unread
        "max_channels": 8,
        "silence_dbfs": -60.0,  # clips quieter than this (RMS, dBFS) are dropped by clean as silent
    }
    clean_fields = {"audio_seconds": 0.0, "audio_sha256": ""}
    dedup_key = "audio_sha256"  # of the raw file: the same recording under another name is a duplicate

    def content(self, value: str) -> bytes:
        try:
            return (self.root / value).read_bytes()
        except OSError as exc:
            raise AudioDecodeError("missing_audio", f"cannot read audio {value}: {exc.strerror or exc}") from exc

    def load(self, value: str) -> np.ndarray:
        return decode_audio(self.root / value, self.settings)

    def seconds(self, value: str) -> float:
        """The clip's duration from its header (nothing decoded); NaN when it cannot be read."""
        import soundfile as sf

        try:
            return float(sf.info(str(self.root / value)).duration)
        except (sf.LibsndfileError, RuntimeError, OSError, TypeError, ValueError):
            return float("nan")

    def measure(self, value: str) -> dict[str, float]:
        try:
            wave = self.load(value)
        except AudioDecodeError:
            return {"audio_seconds": float("nan"), "audio_dbfs": float("nan")}
        return {"audio_seconds": wave.size / self.settings["sample_rate"], "audio_dbfs": level_dbfs(wave)}

    def check(self, raw: Any, ctx: Any) -> tuple[Any | None, dict[str, Any]]:
        if not isinstance(raw, (bytes, bytearray)):
            raise RequestError(400, "invalid_audio", "audio must be uploaded as a file (bytes)")
        if len(raw) == 0:
            raise RequestError(400, "empty_audio", "the audio upload is empty")
        if len(raw) > ctx.limits.max_upload_bytes:
            raise RequestError(413, "upload_too_large", f"audio is {len(raw)} bytes, over the limit of {ctx.limits.max_upload_bytes}")
        try:
            head = probe_audio(raw, self.settings)
            wave = decode_audio(raw, self.settings, head)
        except AudioDecodeError as exc:
            status = {"unsupported_audio": 415, "audio_too_long": 413}.get(exc.reason, 400)
            raise RequestError(status, exc.reason, f"audio: {exc}") from exc
        seconds = wave.size / self.settings["sample_rate"]
        if seconds < self.settings["min_seconds"]:
            raise RequestError(400, "audio_too_short", f"audio is {seconds:.2f} s, under {self.settings['min_seconds']} s")
        return wave, {"audio_seconds": round(seconds, 4), "audio_dbfs": level_dbfs(wave), "audio_sample_rate": head.sample_rate,
                      "audio_channels": head.channels, "audio_format": head.format, "audio_bytes": len(raw)}  # fmt: skip

    def kept(self, raw: Any, value: Any, fields: dict[str, Any]) -> tuple[str | None, bytes]:
        return fields.get("audio_format"), bytes(raw)

    def preview(self, value: np.ndarray) -> tuple[str, bytes]:
        return "image/png", spectrogram_png(value, self.settings["sample_rate"])

    def suffix(self, fmt: str | None) -> str:
        return {"WAV": ".wav", "FLAC": ".flac", "OGG": ".ogg", "MP3": ".mp3"}.get(str(fmt).upper(), ".audio")

    def example(self) -> np.ndarray:
        t = np.arange(self.settings["sample_rate"], dtype=np.float32) / self.settings["sample_rate"]
        return (0.1 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)

    def parts(self, value: np.ndarray, explain: Any) -> Any:
        from mmfusion.modalities.parts import SegmentParts

        return SegmentParts(value, explain.audio_segments, self.settings["sample_rate"])

    def clean(self, raw: str, data: bytes | None, out_root: Path, params: Any) -> dict[str, Any]:
        """Decode the raw clip (mono, the recorded rate), check its length and level, save it as a float WAV."""
        try:
            wave = decode_audio(data, self.settings)
        except AudioDecodeError as exc:
            reason = {"unsupported_audio": "undecodable_audio", "corrupt_audio": "undecodable_audio"}.get(exc.reason, exc.reason)
            raise Dropped(reason, str(exc)) from exc
        seconds = wave.size / self.settings["sample_rate"]
        if seconds < self.settings["min_seconds"]:
            raise Dropped("audio_too_short", f"{seconds:.2f} s < modalities.audio.min_seconds={self.settings['min_seconds']}")
        level = level_dbfs(wave)
        if level < self.settings["silence_dbfs"]:
            raise Dropped("silent_audio", f"{level:.1f} dBFS < modalities.audio.silence_dbfs={self.settings['silence_dbfs']}")
        name = f"{self.folder}/{Path(raw).stem}.wav"
        (out_root / name).write_bytes(write_wav(wave, self.settings["sample_rate"]))
        return {self.column: name, "audio_seconds": round(seconds, 4), "audio_sha256": hashlib.sha256(data).hexdigest()}

    def augment(self, value: str, params: Any, views: Any, out_root: Path) -> list[str]:
        """Decode once, then save one seeded view per seed as `audio/<name>.wav`."""
        wave = self.load(value)
        names = []
        for seed, name in views:
            names.append(f"{self.folder}/{name}.wav")
            view = augment_audio(wave, self.settings["sample_rate"], params, seed)
            (out_root / names[-1]).write_bytes(write_wav(view, self.settings["sample_rate"]))
        return names

    def validation_columns(self, df: pd.DataFrame, root: Path) -> dict[str, Any]:
        import soundfile as sf

        rates = []
        for p in df[self.column]:
            try:
                rates.append(int(sf.info(str(root / p)).samplerate) if p else 0)
            except (sf.LibsndfileError, RuntimeError, OSError):
                rates.append(0)
        return {"audio_exists": [bool(p) and (root / p).is_file() for p in df[self.column]], "audio_sample_rate": rates}

    def expectations(self, gxe: Any, params: Any, where: Any) -> list:
        return [
            gxe.ExpectColumnValuesToBeBetween(column="audio_seconds", min_value=self.settings["min_seconds"],
                                              max_value=self.settings["max_seconds"], **where),  # fmt: skip
            gxe.ExpectColumnValuesToBeInSet(column="audio_exists", value_set=[True], **where),
            gxe.ExpectColumnValuesToBeInSet(column="audio_sample_rate", value_set=[self.settings["sample_rate"]], **where),
            gxe.ExpectColumnValuesToMatchRegex(column="audio_sha256", regex=r"^[0-9a-f]{64}$", **where),
        ]
