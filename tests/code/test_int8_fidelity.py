"""int8 per instruction set and its fidelity guard: `reduce_range: auto` resolved from the CPU's flags and
recorded in the fingerprint, and an int8 encoder that disagrees with torch on real inputs runs as fp32 ONNX.

The guard runs on real exports of the audio encoders (logmel_stats has no weights: a fast export).
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import soundfile as sf

from mmfusion.config import parse_params
from mmfusion.encoders import create_encoder, runtime as rt
from mmfusion.encoders.runtime import Int8Settings, classify_isa, read_cpu_flags, resolve_reduce_range

SR = 16000
X86 = "x86_64"


@pytest.mark.parametrize(
    ("flags", "machine", "isa", "reduce_range"),
    [
        ({"sse4_2", "avx", "avx2", "fma"}, X86, "avx2", True),  # VPMADDUBSW: int16 pair sums saturate
        ({"avx2", "avx512f", "avx512bw", "avx512_vnni"}, X86, "vnni", False),
        ({"avx2", "avx_vnni"}, X86, "vnni", False),  # Alder Lake and later: VEX-encoded VNNI
        ({"avx2", "avx512_vnni", "amx_tile", "amx_int8"}, X86, "amx", False),
        ({"sse4_2"}, X86, "x86", True),
        (set(), "AMD64", "x86", True),  # no flags known (no /proc/cpuinfo): the safe side
        ({"fp", "asimd", "asimddp"}, "aarch64", "arm-dot", False),
        ({"fp", "asimd"}, "aarch64", "arm", False),
        (set(), "riscv64", "unknown", True),
    ],
)
def test_auto_resolves_reduce_range_per_instruction_set(flags, machine, isa, reduce_range):
    assert classify_isa(flags, machine) == isa
    assert resolve_reduce_range("auto", isa) is reduce_range
    settings = Int8Settings().resolved(isa)
    assert settings.reduce_range is reduce_range and settings.isa == isa
    for explicit in (True, False):  # true / false stay what they say, on every CPU
        assert resolve_reduce_range(explicit, isa) is explicit
        assert Int8Settings(reduce_range=explicit).resolved(isa).reduce_range is explicit


def test_cpu_flags_are_read_from_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_vnni\n\n"
                   "processor\t: 1\nflags\t\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\n")
    assert read_cpu_flags(x86) == {"fpu", "avx2", "avx512_vnni"}  # the first CPU's
    assert classify_isa(read_cpu_flags(arm), "aarch64") == "arm-dot"
    assert read_cpu_flags(tmp_path / "missing") == set()
    with pytest.raises(ValueError, match="auto, true or false"):
        resolve_reduce_range("sometimes", "vnni")


def test_the_fingerprint_records_the_resolved_setting_and_the_cpu_class():
    cal = rt.Calibration([b"a", b"b"])

    def int8(settings):
        return create_encoder("logmel_stats", device="cpu").set_runtime("onnx-int8", int8=settings, calibration=cal)

    vnni, avx2 = int8(Int8Settings().resolved("vnni")), int8(Int8Settings().resolved("avx2"))
    assert vnni.fingerprint != avx2.fingerprint  # full-range and 7-bit int8 features never mix
    recorded = vnni.describe()["runtime"]["int8"]
    assert recorded["reduce_range"] is False and recorded["isa"] == "vnni"
    assert avx2.describe()["runtime"]["int8"]["reduce_range"] is True
    # the same setting made on another CPU class: other int8 kernels, another namespace
    assert int8(Int8Settings(reduce_range=True).resolved("vnni")).fingerprint != avx2.fingerprint
    # auto resolves on this CPU when the encoder is set
    here = int8(Int8Settings())
    assert here.int8.isa == rt.cpu_isa() and here.fingerprint == int8(Int8Settings().resolved(rt.cpu_isa())).fingerprint
    # records made before ISA classes (no isa) keep their identity, so their models still load
    # (and before schemes: every one was static)
    assert Int8Settings(reduce_range=True, scheme="static", float_nodes=()).ident() == {
        "calibration_size": 64, "seed": 0, "per_channel": True, "reduce_range": True, "calibrate_method": "minmax",
    }  # fmt: skip
    assert vnni.int8.scheme == "static" and "scheme" not in recorded
    # the guard's thresholds are no part of the model
    assert int8(Int8Settings(min_mean_cosine=0.5).resolved("vnni")).fingerprint == vnni.fingerprint
    with pytest.raises(ValueError, match="resolve"):
        Int8Settings().ident()
    with pytest.raises(ValueError, match="scheme"):  # set by the encoder, never guessed
        Int8Settings(reduce_range=True).ident()
    with pytest.raises(ValueError, match="float_nodes"):  # so are the float nodes
        Int8Settings(reduce_range=True, scheme="static").ident()


def _wav(i: int) -> bytes:
    rng = np.random.default_rng(i)
    seconds = 0.5 + 0.1 * (i % 5)
    t = np.arange(int(SR * seconds)) / SR
    wave = 0.3 * np.sin(2 * np.pi * (120 + 60 * i) * t) * np.exp(-t * (1 + i % 3)) + 0.03 * rng.normal(size=t.size)
    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), SR, format="WAV")
    return buf.getvalue()


CLIPS = {f"clip{i}.wav": _wav(i) for i in range(14)}


def _featurize(encoder: str, tmp_path, **int8) -> rt.Encoder:
    params = parse_params({"featurize": {
        "encoders": {"audio": encoder}, "runtimes": {"audio": "onnx-int8"}, "onnx_threads": 1,
        "onnx_cache_dir": str(tmp_path / "onnx"), "int8": {"calibration_size": 8, "fidelity_size": 6, **int8},
    }})  # fmt: skip
    enc = create_encoder(encoder, device="cpu")
    train = lambda: sorted(CLIPS)  # noqa: E731
    return rt.apply_featurize_runtime(enc, params.featurize, "audio", tmp_path, train, CLIPS.__getitem__)


def test_int8_below_the_guard_falls_back_to_fp32_onnx_and_the_decision_is_recorded(tmp_path, caplog, monkeypatch):
    with caplog.at_level(logging.WARNING, logger="mmfusion.encoders.runtime"):
        enc = _featurize("logmel_stats", tmp_path, min_mean_cosine=1.0, min_p05_cosine=1.0)
    assert enc.runtime == "onnx" and enc.precision == "fp32"
    plain_onnx = create_encoder("logmel_stats", device="cpu").set_runtime("onnx", cache_dir=tmp_path / "onnx")
    assert enc.fingerprint == plain_onnx.fingerprint  # the runtime actually used: its features are fp32 ONNX's
    recorded = enc.describe()["runtime"]
    failed = recorded["int8_fallback"]
    assert recorded["name"] == "onnx" and "int8" not in recorded and "calibration" not in recorded
    assert failed["int8"]["isa"] == rt.cpu_isa() and failed["min_mean_cosine"] == 1.0
    assert 0.5 < failed["mean"] < 1.0 and failed["min"] <= failed["p05"] <= failed["mean"]
    assert failed["inputs"] == {"held_out": 6, "calibration": 0}  # 14 clips: 8 calibrate, the next 6 check
    assert "runs as fp32 ONNX" in caplog.text and f"{failed['mean']:.4f}" in caplog.text

    # the measurement is cached beside the int8 model: a re-run (other thresholds) does not measure again
    def no_measure(*a, **k):
        raise AssertionError("measured again although fidelity.json has it")

    monkeypatch.setattr(rt, "measure_int8_fidelity", no_measure)
    again = _featurize("logmel_stats", tmp_path, min_mean_cosine=0.0, min_p05_cosine=0.0)
    assert again.runtime == "onnx-int8" and again.describe()["runtime"]["fidelity"]["mean"] == failed["mean"]
    # a model folder rebuilds the decision from its record, never by measuring
    served = create_encoder("logmel_stats", device="cpu").set_runtime_from(recorded, cache_dir=tmp_path / "served")
    assert served.runtime == "onnx" and served.fingerprint == enc.fingerprint
    assert served.describe()["runtime"]["int8_fallback"] == failed


def test_int8_that_agrees_with_torch_stays_int8_at_the_default_guard(tmp_path, monkeypatch):
    defaults = Int8Settings()
    enc = _featurize("resemblyzer", tmp_path)
    assert enc.runtime == "onnx-int8" and enc.int8.reduce_range is resolve_reduce_range("auto", rt.cpu_isa())
    fidelity = enc.describe()["runtime"]["fidelity"]
    assert fidelity["mean"] >= defaults.min_mean_cosine and fidelity["p05"] >= defaults.min_p05_cosine
    assert (rt.onnx_folder(enc, tmp_path / "onnx") / "fidelity.json").exists()
    monkeypatch.setattr(rt, "measure_int8_fidelity", lambda *a, **k: pytest.fail("a served model measured"))
    served = create_encoder("resemblyzer", device="cpu")
    served.set_runtime_from(enc.describe()["runtime"], cache_dir=tmp_path / "onnx")
    assert served.runtime == "onnx-int8" and served.fingerprint == enc.fingerprint


def test_too_few_held_out_inputs_are_topped_up_with_calibration_inputs(tmp_path):
    enc = _featurize("logmel_stats", tmp_path, calibration_size=12, min_mean_cosine=0.0, min_p05_cosine=0.0)
    assert enc.describe()["runtime"]["fidelity"]["inputs"] == {"held_out": 2, "calibration": 4}


@pytest.mark.parametrize(
    ("int8", "match"),
    [
        ({"reduce_range": "maybe"}, "reduce_range"),
        ({"fidelity_size": -1}, "fidelity_size"),
        ({"min_p05_cosine": 2}, "cosine"),
    ],
)
def test_bad_int8_guard_settings_fail_before_any_work(int8, match):
    with pytest.raises(ValueError, match=match):
        rt.check_featurize_runtime(parse_params({"featurize": {"int8": int8}}).featurize)


def test_a_served_full_range_model_warns_on_a_cpu_that_would_saturate_it(monkeypatch, caplog):
    cal = rt.Calibration([b"a", b"b"])
    made = create_encoder("logmel_stats", device="cpu").set_runtime("onnx-int8", int8=Int8Settings().resolved("vnni"),
                                                                     calibration=cal)  # fmt: skip
    monkeypatch.setattr(rt, "cpu_isa", lambda: "avx2")
    with caplog.at_level(logging.WARNING, logger="mmfusion.encoders.base"):
        served = create_encoder("logmel_stats", device="cpu").set_runtime_from(made.describe()["runtime"])
    assert served.fingerprint == made.fingerprint and served.int8.reduce_range is False  # as recorded
    assert "saturates" in caplog.text and "avx2" in caplog.text


TEXTS = [
    "grinning face", "red apple", "flag: germany", "a man is playing the guitar on a sunny day " * 3, "a",
    "woman technologist: medium skin tone", "hot beverage", "thumbs up", "globe showing europe-africa", "snowman",
]  # fmt: skip


def test_text_int8_is_dynamic_agrees_with_torch_and_its_identity_ignores_the_calibration_sample(tmp_path):
    """A transformer's int8 quantises activations per batch (dynamic): no calibration sample defines it, so
    another sample keeps its fingerprint and ONNX file; a static encoder's sample is part of its identity."""
    import torch

    def text_int8(contents, **kw):
        cal = rt.Calibration([t.encode() for t in contents])
        return create_encoder("minilm_l6", device="cpu").set_runtime(
            "onnx-int8", threads=1, cache_dir=tmp_path, int8=Int8Settings(**kw).resolved("vnni"), calibration=cal
        )

    a, b = text_int8(TEXTS[:4]), text_int8(TEXTS[4:])
    assert a.int8.scheme == "dynamic" and a.fingerprint == b.fingerprint
    assert a.describe()["runtime"]["int8"] == {"per_channel": True, "reduce_range": False, "isa": "vnni", "scheme": "dynamic"}
    # calibration settings do not define a dynamic model either; weight settings do
    assert text_int8(TEXTS[:4], calibration_size=3, calibrate_method="entropy").fingerprint == a.fingerprint
    assert text_int8(TEXTS[:4], reduce_range=True).fingerprint != a.fingerprint
    # a static encoder: another sample, another model
    wavs = list(CLIPS.values())

    def audio_int8(contents):
        return create_encoder("logmel_stats", device="cpu").set_runtime(
            "onnx-int8", int8=Int8Settings().resolved("vnni"), calibration=rt.Calibration(contents)
        )

    assert audio_int8(wavs[:4]).fingerprint != audio_int8(wavs[4:8]).fingerprint

    # the quantised graph (built here) agrees with torch over padded batches of mixed lengths
    here = text_int8(TEXTS[:4], reduce_range=rt.resolve_reduce_range("auto", rt.cpu_isa()))
    with torch.inference_mode():
        ref = create_encoder("minilm_l6", device="cpu").encode(TEXTS)
    cos = torch.nn.functional.cosine_similarity(here.encode(TEXTS).float(), ref.float())
    assert cos.min() > 0.97, cos
    onnx_file = rt.build_onnx_file(here, tmp_path)
    assert {n.op_type for n in __import__("onnx").load(str(onnx_file)).graph.node} & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}

    # a served model rebuilds it from its record, as the same model
    rebuilt = create_encoder("minilm_l6", device="cpu").set_runtime_from(here.describe()["runtime"], threads=1, cache_dir=tmp_path)
    assert rebuilt.fingerprint == here.fingerprint and rebuilt.int8.scheme == "dynamic"
    # a record made before schemes (all int8 was static then) stays static: its fingerprint is kept
    old = text_int8(TEXTS[:4])
    old_record = {**old.describe()["runtime"], "int8": {k: v for k, v in Int8Settings(scheme="static", float_nodes=()).resolved("vnni").ident().items()}}
    old_record["calibration"] = old.calibration.to_json()
    static = create_encoder("minilm_l6", device="cpu").set_runtime_from(old_record, threads=1, cache_dir=tmp_path)
    assert static.int8.scheme == "static" and static.fingerprint != a.fingerprint
