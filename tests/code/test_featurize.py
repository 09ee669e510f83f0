"""The featurize stage on a tiny fixture: outputs, the cache across runs, bad input, params checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmfusion.config import parse_params
from mmfusion.encoders import register_encoder, unregister_encoder
from mmfusion.features.store import load_features, load_meta
from mmfusion.stages import featurize
from tests.code.test_feature_cache import CountingTextEncoder, MeanColourEncoder
from tests.conftest import CLASSES, draw_sample


def write_split_fixture(root: Path, per_split: int = 3, views: int = 1) -> Path:
    """data/split/{train,val,test}.csv + data/augmented/manifest.csv over tiny synthetic images."""
    images = root / "data" / "clean" / "images"
    images.mkdir(parents=True)
    labels = list(CLASSES)
    n = 0
    aug_rows = []
    for split in ("train", "val", "test"):
        rows = []
        for i in range(per_split):
            label = labels[n % 3]
            color, words = CLASSES[label]
            draw_sample(color, seed=n).convert("RGB").save(images / f"s{n}.png")
            rows.append(
                {"id": f"s{n}", "image": f"data/clean/images/s{n}.png", "text": f"{words[i % 5]} number {n}",
                 "label": label, "group": f"g{n}"}
            )  # fmt: skip
            n += 1
        (root / "data" / "split").mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(root / "data" / "split" / f"{split}.csv", index=False)
        if split == "train":
            for row in rows:
                for k in range(views):
                    aug = root / "data" / "augmented" / "images" / f"{row['id']}__v{k}.png"
                    aug.parent.mkdir(parents=True, exist_ok=True)
                    draw_sample(CLASSES[row["label"]][0], seed=1000 + 10 * n + k).convert("RGB").save(aug)
                    aug_rows.append(
                        {"id": f"{row['id']}__v{k}", "source_id": row["id"], "view": k,
                         "image": aug.relative_to(root).as_posix(), "text": row["text"].split()[0],
                         "label": row["label"], "group": row["group"]}
                    )  # fmt: skip
    pd.DataFrame(aug_rows).to_csv(root / "data" / "augmented" / "manifest.csv", index=False)
    return root


@pytest.fixture
def fake_encoders():
    """Tiny deterministic encoders under test names; the stage uses them exactly like the real ones."""
    made: list = []

    def factory(cls):
        def build(device="auto", batch_size=None):
            enc = cls(batch_size=batch_size or 2)
            made.append(enc)
            return enc

        return build

    register_encoder("test_colour", "image", factory(MeanColourEncoder))
    register_encoder("test_chars", "text", factory(CountingTextEncoder))
    yield made
    unregister_encoder("test_colour")
    unregister_encoder("test_chars")


def fake_params(tmp_path: Path, **featurize):
    section = {"encoders": {"image": "test_colour", "text": "test_chars"}, "cache_dir": str(tmp_path / "cache"),
               "num_workers": 0, **featurize}  # fmt: skip
    return parse_params({"featurize": section})


def test_end_to_end_with_the_real_encoders(tmp_path):
    root = write_split_fixture(tmp_path / "proj", per_split=2)
    params = parse_params({"featurize": {"device": "cpu", "num_workers": 1}})
    summary = featurize.run(params, root)

    meta = load_meta(root / "features")
    assert meta["modalities"]["image"]["encoder"] == "efficientnet_lite0" and meta["modalities"]["image"]["dim"] == 1280
    assert meta["modalities"]["text"]["encoder"] == "minilm_l6" and meta["modalities"]["text"]["dim"] == 384
    assert meta["storage_dtype"] == "float16" and meta["splits"] == {"train": 2, "val": 2, "test": 2, "augmented": 2}
    arrays, index = load_features(root / "features", "augmented")
    assert arrays["image"].shape == (2, 1280) and arrays["text"].shape == (2, 384) and arrays["image"].dtype == np.float32
    assert list(index.columns) == ["id", "label", "group", "source_id", "view", "has_image", "has_text"]
    arrays, index = load_features(root / "features", "train")
    assert list(index["id"]) == ["s0", "s1"] and list(index.columns) == ["id", "label", "group", "has_image", "has_text"]
    assert summary["encoders"]["image"]["encoded"] == 8  # 2 train + 2 val + 2 test + 2 views, all distinct
    assert (root / ".cache" / "features").is_dir()  # the default cache dir, inside the project root

    again = featurize.run(params, root)  # everything cached
    assert again["encoders"]["image"]["cache_hits"] == again["encoders"]["image"]["unique"]
    assert again["encoders"]["image"]["encoded"] == 0 and again["encoders"]["text"]["encoded"] == 0
    np.testing.assert_array_equal(load_features(root / "features", "train")[0]["image"], arrays["image"])


def test_rows_match_the_manifests_and_storage_dtype(tmp_path, fake_encoders):
    root = write_split_fixture(tmp_path / "proj")
    featurize.run(fake_params(tmp_path, storage_dtype="float32"), root)
    from safetensors.numpy import load_file

    raw = load_file(str(root / "features" / "val.safetensors"))
    assert raw["image"].dtype == np.float32 and raw["text"].shape == (3, 4)
    _, index = load_features(root / "features", "val")
    val = pd.read_csv(root / "data" / "split" / "val.csv")
    assert list(index["id"]) == list(val["id"]) and list(index["label"]) == list(val["label"])
    expected = fake_encoders[-1].encode(val["text"].tolist()).numpy()
    np.testing.assert_array_equal(raw["text"], expected)

    featurize.run(fake_params(tmp_path), root)  # float16 default
    assert load_file(str(root / "features" / "val.safetensors"))["image"].dtype == np.float16


def test_new_samples_are_the_only_ones_encoded(tmp_path, fake_encoders):
    root = write_split_fixture(tmp_path / "proj")
    first = featurize.run(fake_params(tmp_path), root)
    assert first["encoders"]["text"]["cache_hits"] == 0
    test_csv = root / "data" / "split" / "test.csv"
    df = pd.read_csv(test_csv)
    extra = df.iloc[[0]].assign(id="new", text="a never seen sentence")
    pd.concat([df, extra]).to_csv(test_csv, index=False)
    second = featurize.run(fake_params(tmp_path), root)
    assert second["encoders"]["text"]["encoded"] == 1 and second["encoders"]["image"]["encoded"] == 0
    assert second["splits"]["test"] == 4


def test_an_undecodable_image_is_dropped_and_reported(tmp_path, fake_encoders):
    root = write_split_fixture(tmp_path / "proj")
    (root / "data" / "clean" / "images" / "s4.png").write_bytes(b"corrupted after cleaning")  # a val sample
    summary = featurize.run(fake_params(tmp_path), root)
    assert summary["dropped"] == 1 and summary["splits"]["val"] == 2
    meta = load_meta(root / "features")
    assert meta["dropped"][0]["id"] == "s4" and meta["dropped"][0]["split"] == "val"
    assert "undecodable_image" in meta["dropped"][0]["reason"]
    arrays, index = load_features(root / "features", "val")
    assert "s4" not in set(index["id"]) and arrays["image"].shape[0] == arrays["text"].shape[0] == 2


def test_rows_missing_a_modality_are_kept_with_zeros_and_a_presence_column(tmp_path, fake_encoders):
    from mmfusion.training.data import load_split

    root = write_split_fixture(tmp_path / "proj")
    test_csv = root / "data" / "split" / "test.csv"
    df = pd.read_csv(test_csv)
    df.loc[0, "image"] = ""  # text-only
    df.loc[1, "text"] = ""  # image-only
    df.to_csv(test_csv, index=False)
    summary = featurize.run(fake_params(tmp_path), root)
    assert summary["dropped"] == 0 and summary["splits"]["test"] == 3
    assert summary["missing"] == {"image": 1, "text": 1}
    arrays, index = load_features(root / "features", "test")
    assert list(index["has_image"]) == [0, 1, 1] and list(index["has_text"]) == [1, 0, 1]
    assert not arrays["image"][0].any() and not arrays["text"][1].any() and arrays["image"][1].any()
    test = load_split(root / "features", "test", sorted(CLASSES))
    assert test.presence(("text", "image")).tolist() == [[True, False], [False, True], [True, True]]


def test_fail_policy_stops_with_the_ids_and_keeps_the_rest_cached(tmp_path, fake_encoders):
    root = write_split_fixture(tmp_path / "proj")
    (root / "data" / "clean" / "images" / "s4.png").unlink()
    with pytest.raises(ValueError, match="val/s4.*missing_image"):
        featurize.run(fake_params(tmp_path, on_bad_input="fail"), root)
    summary = featurize.run(fake_params(tmp_path), root)  # skip: everything else comes from the cache
    assert summary["encoders"]["image"]["encoded"] == 0 and summary["encoders"]["text"]["encoded"] == 0


def test_long_texts_are_counted_as_truncated(tmp_path, fake_encoders):
    from mmfusion.stages import featurize as stage

    root = write_split_fixture(tmp_path / "proj")
    CountingTextEncoder.may_truncate = True
    CountingTextEncoder.count_truncated = lambda self, items: sum(len(t) > 12 for t in items)
    try:
        summary = stage.run(fake_params(tmp_path), root)
    finally:
        del CountingTextEncoder.may_truncate, CountingTextEncoder.count_truncated
    assert summary["encoders"]["text"]["truncated"] > 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"encoders": {"image": "no_such_net"}}, "unknown encoder 'no_such_net'.*efficientnet_lite0"),
        ({"encoders": {"image": "minilm_l6"}}, "makes 'text' features, not 'image'"),
        ({"storage_dtype": "int8"}, "storage_dtype"),
        ({"on_bad_input": "ignore"}, "on_bad_input"),
    ],
)
def test_bad_params_fail_before_any_work(tmp_path, override, message):
    root = write_split_fixture(tmp_path / "proj")
    with pytest.raises(ValueError, match=message):
        featurize.run(parse_params({"featurize": {"cache_dir": str(tmp_path / "cache"), **override}}), root)
    assert not (root / "features").exists() and not (tmp_path / "cache").exists()


def test_unwritable_cache_dir_is_a_one_line_error(tmp_path, fake_encoders, capsys):
    from mmfusion.stages.common import stage_main

    root = write_split_fixture(tmp_path / "proj")
    (tmp_path / "blocker").write_text("a file, not a folder")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(json.dumps({"featurize": {"encoders": {"text": "test_chars"}, "cache_dir": str(tmp_path / "blocker" / "c")}}))
    assert stage_main("featurize", featurize.run, ["--params", str(params_file), "--root", str(root)]) == 2
    assert "not writable" in capsys.readouterr().err
