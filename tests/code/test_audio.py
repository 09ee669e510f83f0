"""The audio modality: reading (formats, mono, one rate), limits judged on the header before decoding, the
service's reason codes, clean's drop reasons, seeded augmentation, and the log-mel baseline encoder."""

from __future__ import annotations

import io
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mmfusion.config import ParamsError, ServeLimits, parse_params
from mmfusion.encoders import create_encoder
from mmfusion.errors import RequestError
from mmfusion.modalities import get_modality, specs_for
from mmfusion.modalities.audio import AudioDecodeError, augment_audio, decode_audio, level_dbfs, probe_audio
from mmfusion.modalities.base import Dropped

SR = 16000
SETTINGS = dict(get_modality("audio").defaults)


def tone(freq: float, seconds: float = 1.0, sr: int = SR, amp: float = 0.3, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    wave = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def encode(wave: np.ndarray, sr: int = SR, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def wav_header(sr: int, channels: int, data: bytes) -> bytes:
    fmt = struct.pack("<IHHIIHH", 16, 1, channels, sr, sr * channels * 2, channels * 2, 16)
    return b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + fmt + b"data" + struct.pack("<I", len(data)) + data


def flac_declaring(seconds: float) -> bytes:
    """A 0.1 s FLAC whose STREAMINFO declares `seconds` of audio: a small file that claims hours."""
    b = bytearray(encode(tone(440, 0.1), fmt="FLAC", subtype="PCM_16"))
    word = int.from_bytes(b[18:26], "big")
    b[18:26] = ((word & ~((1 << 36) - 1)) | int(seconds * SR)).to_bytes(8, "big")
    return bytes(b)


class _Ctx:
    limits = ServeLimits()
    keep: dict = {}


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_every_container_decodes_to_mono_at_the_recorded_rate(fmt):
    stereo = tone(440, 1.0, sr=44100, channels=2)
    wave = decode_audio(encode(stereo, 44100, fmt), SETTINGS)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(wave.size - SR) <= 0.05 * SR  # MP3 pads a few frames
    spectrum = np.abs(np.fft.rfft(wave[:SR // 2]))
    assert abs(np.argmax(spectrum) * SR / (SR // 2) - 440) < 10  # the tone survives resampling


def test_a_small_file_declaring_hours_is_refused_before_decoding(monkeypatch):
    bomb = flac_declaring(10 * 3600)
    assert len(bomb) < 10_000 and sf.info(io.BytesIO(bomb)).duration == pytest.approx(36000)
    decoded = []
    monkeypatch.setattr(sf, "read", lambda *a, **k: decoded.append(1))  # any decode would be recorded
    with pytest.raises(AudioDecodeError) as err:
        decode_audio(bomb, SETTINGS)
    assert err.value.reason == "audio_too_long" and not decoded


@pytest.mark.parametrize(
    "name, raw, status, reason",
    [
        ("empty", b"", 400, "empty_audio"),
        ("png_sent_as_audio", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, 415, "unsupported_audio"),
        ("text_bytes", b"hello, this is not audio at all" * 4, 415, "unsupported_audio"),
        ("truncated_flac", None, 400, "corrupt_audio"),
        ("absurd_sample_rate", wav_header(1_000_000, 1, b"\x00\x01" * 4000), 400, "bad_sample_rate"),
        ("sixteen_channels", wav_header(SR, 16, b"\x00\x01" * 16 * 4000), 400, "too_many_channels"),
        ("zero_frames", wav_header(SR, 1, b""), 400, "empty_audio"),
        ("too_short", None, 400, "audio_too_short"),
        ("declares_hours", None, 413, "audio_too_long"),
    ],
)
def test_bad_audio_gets_a_4xx_with_its_reason(name, raw, status, reason):
    if name == "truncated_flac":
        full = encode(np.random.default_rng(0).normal(0, 0.1, SR).astype(np.float32), fmt="FLAC")
        raw = full[: len(full) // 2]
    elif name == "too_short":
        raw = encode(tone(440, 0.05))
    elif name == "declares_hours":
        raw = flac_declaring(10 * 3600)
    spec = specs_for(["audio"])["audio"]
    with pytest.raises(RequestError) as err:
        spec.check(raw, _Ctx())
    assert (err.value.status, err.value.reason) == (status, reason), str(err.value)
    assert "audio" in str(err.value)  # the message names the field


def test_a_good_clip_is_checked_and_logged_with_its_statistics():
    spec = specs_for(["audio"])["audio"]
    raw = encode(tone(440, 2.0, sr=22050, channels=2), 22050, "OGG")
    wave, fields = spec.check(raw, _Ctx())
    assert wave.shape[0] == pytest.approx(2 * SR, abs=200)
    assert fields["audio_sample_rate"] == 22050 and fields["audio_channels"] == 2 and fields["audio_format"] == "OGG"
    assert fields["audio_seconds"] == pytest.approx(2.0, abs=0.02) and -20 < fields["audio_dbfs"] < -5
    assert set(fields) == set(spec.stats) | set(spec.log_fields)
    assert spec.kept(raw, wave, fields) == ("OGG", raw) and spec.suffix("OGG") == ".ogg"


def test_clean_drops_each_bad_clip_with_its_reason_and_saves_the_good_ones(tmp_path):
    spec = specs_for(["audio"])["audio"]
    (tmp_path / "audio").mkdir()
    cases = {
        "silent": (encode(np.zeros(SR, dtype=np.float32)), "silent_audio"),
        "short": (encode(tone(440, 0.05)), "audio_too_short"),
        "junk": (b"RIFF not really a wave file", "undecodable_audio"),
        "bomb": (flac_declaring(7200), "audio_too_long"),
    }
    for name, (data, reason) in cases.items():
        with pytest.raises(Dropped) as err:
            spec.clean(f"raw/{name}.wav", data, tmp_path, None)
        assert err.value.reason == reason, (name, err.value.detail)
    good = encode(tone(330, 1.5, sr=48000), 48000, "FLAC")
    fields = spec.clean("raw/ok.flac", good, tmp_path, None)
    assert fields["audio"] == "audio/ok.wav" and fields["audio_seconds"] == pytest.approx(1.5, abs=0.01)
    info = sf.info(str(tmp_path / "audio" / "ok.wav"))
    assert info.samplerate == SR and info.channels == 1 and info.subtype == "FLOAT"
    # what training reads back is what serving decodes from the same upload
    np.testing.assert_allclose(spec.load("audio/ok.wav") if spec.root == tmp_path else
                               specs_for(["audio"], tmp_path)["audio"].load("audio/ok.wav"),
                               decode_audio(good, SETTINGS), atol=1e-6)  # fmt: skip


def test_settings_come_from_params_and_a_wrong_key_is_one_error():
    params = parse_params({"modalities": {"audio": {"sample_rate": 8000, "max_seconds": 5}}})
    settings = get_modality("audio").settings_from_params(params)
    assert settings["sample_rate"] == 8000 and settings["max_seconds"] == 5 and settings["max_channels"] == 8
    assert decode_audio(encode(tone(440, 1.0)), settings).size == 8000
    with pytest.raises(ParamsError, match="unknown params key modalities.audio.rate; allowed keys"):
        parse_params({"modalities": {"audio": {"rate": 1}}})
    with pytest.raises(ParamsError, match="modalities.speech: no such modality"):
        parse_params({"modalities": {"speech": {}}})
    with pytest.raises(ParamsError, match="expected a number"):
        parse_params({"modalities": {"audio": {"max_seconds": "long"}}})


def test_augmentation_is_seeded_and_leaves_the_global_generators_alone():
    wave = tone(440, 1.0)
    random.seed(123)
    np.random.seed(123)
    before = (random.random(), np.random.random())
    random.seed(123)
    np.random.seed(123)
    a = augment_audio(wave, SR, None, seed=7)
    after = (random.random(), np.random.random())
    assert before == after  # augmentation did not move the caller's random streams
    np.testing.assert_array_equal(a, augment_audio(wave, SR, None, seed=7))
    assert not np.allclose(a, augment_audio(wave, SR, None, seed=8))
    assert a.shape == wave.shape and np.abs(a).max() <= 1.0 and not np.allclose(a, wave)


def test_the_logmel_encoder_tells_tones_apart_and_ignores_batch_padding():
    enc = create_encoder("logmel_stats", device="cpu")
    assert enc.modality == "audio" and enc.dim == 128 and enc.fingerprint.startswith("logmel_stats@")
    low, high, long = tone(200, 1.0), tone(2000, 1.0), tone(200, 3.0)
    alone = enc.encode([low]).numpy()
    batch = enc.encode([low, high, long]).numpy()
    np.testing.assert_allclose(batch[0], alone[0], atol=1e-4)  # padding to the longest clip changes nothing
    np.testing.assert_allclose(batch[2][:64], alone[0][:64], atol=0.2)  # the same tone, longer: the same mean spectrum
    assert np.linalg.norm(batch[0] - batch[1]) > 3 * np.linalg.norm(batch[0] - batch[2])
    assert enc.count_truncated([np.zeros(int(40 * SR))]) == 1


def test_level_is_relative_to_full_scale():
    assert level_dbfs(np.zeros(100, dtype=np.float32)) == -100.0
    assert level_dbfs(np.ones(100, dtype=np.float32)) == 0.0
    assert level_dbfs(tone(440, 1.0, amp=1.0)) == pytest.approx(-3.01, abs=0.01)


def test_probe_reads_only_the_header(tmp_path):
    path = Path(tmp_path / "clip.flac")
    path.write_bytes(encode(tone(440, 1.0, sr=32000), 32000, "FLAC"))
    head = probe_audio(path, SETTINGS)
    assert (head.format, head.sample_rate, head.channels, head.frames) == ("FLAC", 32000, 1, 32000)
    with pytest.raises(AudioDecodeError) as err:
        probe_audio(tmp_path / "nope.wav", SETTINGS)
    assert err.value.reason == "missing_audio"


def test_the_pretrained_audio_encoder_loads_offline_from_its_wheel():
    """resemblyzer's weights ship in its wheel: its fingerprint covers them, and it embeds without a network."""
    enc = create_encoder("resemblyzer", device="cpu")
    assert enc.weights_files()[0].name == "pretrained.pt" and enc.weights_files()[0].stat().st_size > 10_000_000
    assert enc.modality == "audio" and enc.dim == 256 and enc.fingerprint.startswith("resemblyzer@")
    low, high = tone(220, 1.0), tone(1760, 1.0)
    out = enc.encode([low, high, low]).numpy()
    assert out.shape == (3, 256) and np.isfinite(out).all()
    np.testing.assert_allclose(out[0], out[2], atol=1e-6)  # deterministic
    assert np.linalg.norm(out[0] - out[1]) > 0.1


def test_the_batched_resemblyzer_equals_its_own_one_clip_embedding():
    """The encoder runs every clip's partial windows through the LSTM in one call: the same numbers as
    resemblyzer's `embed_utterance`, clip by clip, for clips shorter and longer than one window."""
    enc = create_encoder("resemblyzer", device="cpu")
    rng = np.random.default_rng(0)
    clips = [tone(220, 0.5), tone(440, 2.0) + 0.01 * rng.normal(size=32000).astype(np.float32), tone(880, 5.3)]
    batched = enc.encode(clips).numpy()
    for clip, row in zip(clips, batched):
        np.testing.assert_allclose(row, enc.model.embed_utterance(clip), atol=1e-5)


def test_featurize_reports_an_unreadable_clip_per_row_and_encodes_the_rest(tmp_path):
    """A decode error of any modality (the shared InputDecodeError) is one failed row with its reason, never a crash."""
    from mmfusion.features.extract import extract_features

    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "ok.wav").write_bytes(encode(tone(440, 1.0)))
    (tmp_path / "audio" / "junk.wav").write_bytes(b"RIFF not audio")
    spec = specs_for(["audio"], tmp_path)["audio"]
    result = extract_features(create_encoder("logmel_stats", device="cpu"), spec,
                              ["audio/ok.wav", "audio/gone.wav", "audio/junk.wav"], None, progress=False)  # fmt: skip
    assert result.features[0].any() and set(result.failed) == {1, 2}
    assert result.failed[1].startswith("missing_audio") and result.failed[2].startswith("unsupported_audio")


@pytest.mark.parametrize("name", ["logmel_stats", "resemblyzer"])
def test_audio_encoders_run_under_onnx_and_int8_close_to_torch(name, tmp_path):
    """Each audio encoder exports (logmel's STFT as a convolution, resemblyzer's LSTM over partial windows):
    fp32 ONNX equals torch, int8 (calibrated on WAV bytes, decoded as featurize decodes them) stays close."""
    from mmfusion.encoders.runtime import Calibration, Int8Settings

    rng = np.random.default_rng(1)
    clips = [tone(150 * (i + 1), 0.4 + 0.5 * i) + 0.02 * rng.normal(size=int(SR * (0.4 + 0.5 * i))).astype(np.float32)
             for i in range(4)]  # fmt: skip
    calibration = Calibration([encode(c) for c in clips], seed=0)
    ref = create_encoder(name, device="cpu").encode(clips)
    out = {}
    for runtime in ("onnx", "onnx-int8"):
        enc = create_encoder(name, device="cpu").set_runtime(
            runtime, threads=1, cache_dir=tmp_path, int8=Int8Settings(calibration_size=4), calibration=calibration
        )
        out[runtime] = enc.encode(clips)
        assert enc.fingerprint != create_encoder(name, device="cpu").fingerprint
    cos = torch.nn.functional.cosine_similarity
    assert cos(out["onnx"], ref).min() > 0.9999
    assert cos(out["onnx-int8"], ref).min() > 0.9


def test_truncation_is_counted_from_headers_and_the_rate_must_match_the_encoder(tmp_path):
    """featurize counts clips over the encoder's limit without decoding them again, and refuses an encoder whose
    sample rate differs from modalities.audio.sample_rate (it would hear every clip at the wrong speed)."""
    from mmfusion.errors import UserError

    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "short.wav").write_bytes(encode(tone(440, 1.0)))
    (tmp_path / "audio" / "long.wav").write_bytes(encode(np.zeros(int(31 * SR), dtype=np.float32)))
    spec = specs_for(["audio"], tmp_path)["audio"]
    spec.load = lambda value: pytest.fail(f"decoded {value} to count truncation")
    for name in ("logmel_stats", "resemblyzer"):
        enc = create_encoder(name, device="cpu")
        assert enc.count_truncated_values(spec, ["audio/short.wav", "audio/long.wav", "audio/gone.wav"]) == 1
        enc.check_input_settings({**SETTINGS, "sample_rate": 16000})
        with pytest.raises(UserError, match="modalities.audio.sample_rate: 16000"):
            enc.check_input_settings({**SETTINGS, "sample_rate": 22050})
