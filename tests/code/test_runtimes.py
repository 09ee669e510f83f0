"""Encoder runtimes (torch | onnx | onnx-int8): the same module, fingerprints that keep them apart,
the content-addressed ONNX cache, and a model folder that rebuilds its runtime offline.

One export per runtime per session (module fixtures); int8 calibrates on 8 drawn images.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mmfusion.config import parse_params
from mmfusion.encoders import create_encoder, runtime as rt
from mmfusion.encoders.runtime import Calibration, Int8Settings, check_featurize_runtime, sample_calibration
from tests.conftest import CLASSES, draw_sample

INT8 = Int8Settings(calibration_size=8)


def png(i: int, size: int = 56) -> bytes:
    import io

    colors = [c for c, _ in CLASSES.values()]
    buf = io.BytesIO()
    draw_sample(colors[i % 3], seed=i, size=size).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


CALIBRATION = Calibration([png(i) for i in range(8)], seed=0)


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def images():
    from mmfusion.modalities.image import decode_image

    return [decode_image(png(100 + i, size=40 + 9 * i)) for i in range(6)]


@pytest.fixture(scope="module")
def image_encoders(onnx_cache):
    """torch, onnx and onnx-int8 EfficientNet-Lite0, 2 ONNX Runtime threads, one shared ONNX cache."""
    encs = {}
    for name in rt.RUNTIMES:
        encs[name] = create_encoder("efficientnet_lite0", device="cpu").set_runtime(
            name, threads=2, cache_dir=onnx_cache, int8=INT8, calibration=CALIBRATION
        )
    return encs


def test_runtime_is_part_of_the_fingerprint_and_torch_keeps_the_old_one(image_encoders):
    plain = create_encoder("efficientnet_lite0", device="cpu")
    prints = {name: e.fingerprint for name, e in image_encoders.items()}
    assert prints["torch"] == plain.fingerprint  # features and models made before runtimes stay valid
    assert len(set(prints.values())) == 3
    assert [image_encoders[n].precision for n in rt.RUNTIMES] == ["fp32", "fp32", "int8"]
    other_seed = Calibration(CALIBRATION.contents[1:] + [png(99)], seed=1)
    for changed in (
        dict(int8=INT8, calibration=other_seed),
        # the other reduce_range than auto resolved to on this CPU
        dict(int8=Int8Settings(calibration_size=8, reduce_range=not INT8.resolved().reduce_range),
             calibration=CALIBRATION),
    ):
        e = create_encoder("efficientnet_lite0", device="cpu").set_runtime("onnx-int8", **changed)
        assert e.fingerprint != prints["onnx-int8"]


def test_onnx_matches_torch_and_int8_stays_close(image_encoders, images):
    ref = image_encoders["torch"].encode(images)
    fp32 = image_encoders["onnx"].encode(images)
    int8 = image_encoders["onnx-int8"].encode(images)
    assert fp32.shape == int8.shape == ref.shape and fp32.dtype == int8.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity
    assert cos(fp32, ref).min() > 0.9999
    assert cos(int8, ref).mean() > 0.85  # real training images do better: bench/featurize.py reports it
    assert not torch.equal(int8, fp32)  # really quantised
    # batch-size invariant under ONNX Runtime too
    enc = image_encoders["onnx-int8"]
    saved, enc.batch_size = enc.batch_size, 1
    try:
        torch.testing.assert_close(enc.encode(images), int8, atol=1e-4, rtol=1e-3)
    finally:
        enc.batch_size = saved


def test_sessions_do_not_spin_between_ops_unless_asked(image_encoders, monkeypatch):
    """Featurize's session threads share the cores with its decode and writer threads: they sleep, not spin."""
    key = "session.intra_op.allow_spinning"
    assert rt.create_session_options(2).get_session_config_entry(key) == "0"
    assert image_encoders["onnx-int8"].session.get_session_options().get_session_config_entry(key) == "0"
    monkeypatch.setattr(rt, "ALLOW_SPINNING", True)
    assert rt.create_session_options(2).get_session_config_entry(key) == "1"


def test_exported_files_are_reused_from_the_content_addressed_cache(image_encoders, onnx_cache, monkeypatch):
    folders = sorted(p.name for p in onnx_cache.iterdir() if not p.name.startswith("."))
    assert folders == sorted(f"{image_encoders[n].fingerprint}-{image_encoders[n].precision}" for n in ("onnx", "onnx-int8"))
    info = json.loads((onnx_cache / folders[0] / "encoder.json").read_text())
    assert info["runtime"]["name"] in ("onnx", "onnx-int8") and "contents_b64" not in json.dumps(info)

    def no_export(*a, **k):
        raise AssertionError("exported again although the cache has the file")

    monkeypatch.setattr(rt, "export_onnx", no_export)
    again = create_encoder("efficientnet_lite0", device="cpu").set_runtime(
        "onnx-int8", threads=1, cache_dir=onnx_cache, int8=INT8, calibration=CALIBRATION
    )
    assert again.encode([draw_sample((200, 0, 0), seed=5).convert("RGB")]).shape == (1, 1280)


def test_a_model_folder_rebuilds_its_runtime_offline_and_refuses_another(image_encoders, images, tmp_path, one_torch_thread):
    """The Predictor loads the runtime the model recorded; with an empty ONNX cache it rebuilds the same int8 model."""
    from mmfusion.inference.predictor import Predictor
    from mmfusion.training.data import FeatureSet
    from mmfusion.training.strategies import fit_strategy

    enc = image_encoders["onnx-int8"]
    x = enc.encode(images + images)
    y = torch.tensor([i % 3 for i in range(len(x))])
    fs = FeatureSet(x={"image": x}, y=y, ids=[f"s{i}" for i in range(len(x))])
    params = parse_params({"train": {"strategies": ["image_only"], "epochs": 2, "patience": 2, "batch_size": 8, "hidden_dim": 8}})
    model_dir = tmp_path / "model"
    fit_strategy("image_only", fs, fs, sorted(CLASSES), {"image": enc.describe()}, params, model_dir, torch.device("cpu"))

    fresh_cache = tmp_path / "empty-cache"
    p = Predictor.from_dir(model_dir, device="cpu", onnx_cache_dir=fresh_cache)
    assert p.runtimes == {"image": "onnx-int8"} and p.describe()["runtimes"] == {"image": "onnx-int8"}
    emb = p.embed([{"image": im} for im in images])["image"]
    assert (fresh_cache / f"{enc.fingerprint}-int8" / "model.onnx").exists()  # rebuilt from the recorded calibration
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(emb), enc.encode(images))
    assert cos.min() > 0.999

    with pytest.raises(ValueError, match="fingerprint"):
        Predictor.from_dir(model_dir, device="cpu", encoders={"image": image_encoders["torch"]})


STEM, FIRST_DEPTHWISE = "/_conv_stem/Conv", "/_blocks.0/_depthwise_conv/Conv"


def test_float_nodes_stay_float_in_the_int8_model_and_are_part_of_its_identity(image_encoders, images, onnx_cache, tmp_path,
                                                                               monkeypatch):
    """An int8 model's float nodes (EfficientNet-Lite0 on AVX2: its stem and first depthwise conv, measured by
    bench/int8_sensitivity.py) take float weights and inputs; the list is recorded and rebuilt as recorded."""
    import onnx

    measured = create_encoder("efficientnet_lite0", device="cpu").int8_float_nodes
    assert set(measured) == {"avx2"} and measured["avx2"][:2] == (STEM, FIRST_DEPTHWISE)
    for isa, expected in (("avx2", measured["avx2"]), ("vnni", ())):  # set from the CPU class
        e = create_encoder("efficientnet_lite0", device="cpu").set_runtime("onnx-int8", int8=INT8.resolved(isa), calibration=CALIBRATION)
        assert e.int8.float_nodes == expected
        assert e.describe()["runtime"]["int8"].get("float_nodes", []) == sorted(expected)  # none: no key, old fingerprints
    # an explicit reduce_range (not resolved by the CPU) still gets this CPU's measured list
    monkeypatch.setattr(rt, "cpu_isa", lambda: "avx2")
    for reduce_range in ("auto", True, False):
        e = create_encoder("efficientnet_lite0", device="cpu").set_runtime(
            "onnx-int8", int8=replace(INT8, reduce_range=reduce_range), calibration=CALIBRATION
        )
        assert e.int8.float_nodes == measured["avx2"], reduce_range
    monkeypatch.undo()
    # the list's order is no part of the model
    reordered = create_encoder("efficientnet_lite0", device="cpu").set_runtime(
        "onnx-int8", int8=replace(INT8.resolved("avx2"), float_nodes=measured["avx2"][::-1]), calibration=CALIBRATION
    )
    avx2 = create_encoder("efficientnet_lite0", device="cpu").set_runtime("onnx-int8", int8=INT8.resolved("avx2"), calibration=CALIBRATION)
    assert reordered.fingerprint == avx2.fingerprint

    settings = replace(INT8.resolved(), float_nodes=(STEM,))
    enc = create_encoder("efficientnet_lite0", device="cpu").set_runtime(
        "onnx-int8", threads=2, cache_dir=onnx_cache, int8=settings, calibration=CALIBRATION
    )
    assert enc.fingerprint not in {e.fingerprint for e in image_encoders.values()}
    emb = enc.encode(images)
    graph = onnx.load(str(rt.onnx_folder(enc, onnx_cache) / "model.onnx")).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    node = {n.name: n for n in graph.node}
    assert made_by.get(node[STEM].input[1]) is None  # its weight: a float initializer
    assert made_by.get(node[STEM].input[0]) != "DequantizeLinear"
    for quantised in (FIRST_DEPTHWISE, "/_conv_head/Conv"):
        assert made_by[node[quantised].input[0]] == made_by[node[quantised].input[1]] == "DequantizeLinear"

    record = enc.describe()["runtime"]
    assert record["int8"]["float_nodes"] == [STEM]
    again = create_encoder("efficientnet_lite0", device="cpu").set_runtime_from(json.loads(json.dumps(record)), cache_dir=onnx_cache)
    assert again.fingerprint == enc.fingerprint and again.int8.float_nodes == (STEM,)
    torch.testing.assert_close(again.encode(images), emb)
    old = {**record, "int8": {k: v for k, v in record["int8"].items() if k != "float_nodes"}}  # made before float nodes
    assert create_encoder("efficientnet_lite0", device="cpu").set_runtime_from(old).int8.float_nodes == ()

    typo = create_encoder("efficientnet_lite0", device="cpu").set_runtime(
        "onnx-int8", cache_dir=tmp_path, int8=replace(settings, float_nodes=("/_conv_stem/conv",)), calibration=CALIBRATION
    )
    with pytest.raises(ValueError, match=r"float nodes not in the exported graph: \['/_conv_stem/conv'\]"):
        typo.encode(images)


def test_calibration_is_a_seeded_sample_of_distinct_readable_inputs():
    values = [f"v{i}" for i in range(50)] + ["v1", "broken"]

    def content(v: str) -> bytes:
        if v == "broken":
            raise OSError("unreadable")
        return v.encode()

    a = sample_calibration(values, content, Int8Settings(calibration_size=10, seed=3))
    b = sample_calibration(values, content, Int8Settings(calibration_size=10, seed=3))
    c = sample_calibration(values, content, Int8Settings(calibration_size=10, seed=4))
    assert a.contents == b.contents and a.digest == b.digest and a.digest != c.digest
    assert len(set(a.contents)) == 10
    assert Calibration.from_json(a.to_json()).contents == a.contents
    damaged = {**a.to_json(), "digest": "0" * 64}
    with pytest.raises(ValueError, match="digest"):
        Calibration.from_json(damaged)


def test_auto_picks_the_measured_default_and_unexportable_encoders_stay_on_torch():
    image = create_encoder("efficientnet_lite0", device="cpu")
    assert rt.resolve_runtime("auto", image) == "onnx-int8"
    assert rt.resolve_runtime("auto", create_encoder("minilm_l6", device="cpu")) == "onnx"
    image.device = torch.device("cuda")  # resolution only: nothing runs
    assert rt.resolve_runtime("auto", image) == "torch"

    from mmfusion.encoders.base import Encoder

    class NotExportable(Encoder):
        name, modality, dim = "plain", "text", 2
        preprocessing = {}

        def weights_files(self):
            return []

        def load_model(self):
            return torch.nn.Identity()

        def prepare(self, item):
            return item

        def collate(self, prepared):
            return prepared

        def _forward(self, batch):
            return torch.zeros(len(batch), 2)

    plain = NotExportable(device="cpu")
    assert rt.resolve_runtime("auto", plain) == "torch"
    with pytest.raises(ValueError, match="cannot be exported"):
        plain.set_runtime("onnx")
    with pytest.raises(ValueError, match="needs calibration"):
        create_encoder("efficientnet_lite0", device="cpu").set_runtime("onnx-int8", calibration=Calibration([]))


@pytest.mark.parametrize(
    ("featurize", "match"),
    [
        ({"runtime": "tensorrt"}, "unknown runtime 'tensorrt'"),
        ({"runtimes": {"audio": "onnx"}}, "no such modality"),
        ({"runtimes": {"text": "fp8"}}, "unknown runtime 'fp8'"),
        ({"int8": {"calibrate_method": "kl"}}, "calibrate_method"),
        ({"int8": {"calibration_size": 0}}, "calibration_size"),
    ],
)
def test_bad_runtime_settings_fail_before_any_work(featurize, match):
    with pytest.raises(ValueError, match=match):
        check_featurize_runtime(parse_params({"featurize": featurize}).featurize)


def test_text_onnx_matches_torch_over_padded_batches_of_any_length(onnx_cache):
    """Dynamic batch and token axes: texts of other lengths than the traced example, padded together."""
    texts = ["a", "red apple", "a man is playing the guitar on a sunny day " * 3, "flag: germany", "grinning face"]
    torch_enc = create_encoder("minilm_l6", device="cpu")
    onnx_enc = create_encoder("minilm_l6", device="cpu").set_runtime("onnx", threads=2, cache_dir=onnx_cache)
    assert onnx_enc.fingerprint != torch_enc.fingerprint and onnx_enc.describe()["runtime"]["name"] == "onnx"
    ref = torch_enc.encode(texts)
    for bs in (1, 5):
        onnx_enc.batch_size = bs
        cos = torch.nn.functional.cosine_similarity(onnx_enc.encode(texts), ref)
        assert cos.min() > 0.9999


def test_the_batch_size_never_changes_an_output(image_encoders, images):
    """The feature cache is not keyed by batch size, so under ONNX Runtime the batch must not change any output."""
    for name in ("onnx", "onnx-int8"):
        enc = image_encoders[name]
        before = enc.batch_size
        try:
            enc.batch_size = 1
            one_by_one = enc.encode(images)
            enc.batch_size = len(images)
            together = enc.encode(images)
        finally:
            enc.batch_size = before
        assert torch.equal(one_by_one, together), name


def test_image_collate_is_a_contiguous_copy_of_the_stack(image_encoders, images):
    enc = image_encoders["torch"]
    prepared = [enc.prepare(img) for img in images[:3]]
    batch = enc.collate(prepared)
    assert batch.is_contiguous() and batch.dtype == torch.uint8
    assert torch.equal(batch, torch.stack(prepared))
