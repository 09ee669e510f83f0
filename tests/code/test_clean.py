from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from mmfusion.config import CleanParams
from mmfusion.data.clean import clean_dataset
from mmfusion.data.manifest import RAW_COLUMNS, read_manifest
from mmfusion.modalities.text import normalize_text
from mmfusion.sources.manifest import build as build_manifest_source
from tests.conftest import tiny_params


@pytest.fixture
def raw(tiny_manifest, tmp_path):
    params = tiny_params(tiny_manifest)
    raw_dir = tmp_path / "raw"
    df = build_manifest_source(params.ingest, raw_dir)
    return df, raw_dir


def _reasons(report):
    return {row["id"]: row["reason"] for row in report["dropped_rows"]}


def test_every_bad_row_is_dropped_with_its_reason(raw, tmp_path):
    df, raw_dir = raw
    clean, report = clean_dataset(df, raw_dir, tmp_path / "clean", CleanParams(allow_missing_modality=False))
    reasons = _reasons(report)
    assert reasons == {
        "corrupt": "undecodable_image",
        "missing": "missing_image",
        "empty-text": "empty_text",
        "dup": "duplicate",
        "tiny": "image_too_small",
    }
    assert report["kept"] == 30 and report["input"] == 35
    assert report["dropped_by_reason"]["duplicate"] == 1
    assert set(clean["id"]).isdisjoint(reasons)
    assert list(clean.columns)[: len(RAW_COLUMNS)] == list(RAW_COLUMNS)


def test_label_rules(raw, tmp_path):
    df, raw_dir = raw
    df = df.copy()
    df.loc[df["id"] == "fruit-01", "label"] = ""
    df.loc[df["id"] == "fruit-02", "label"] = " Fruits "
    params = CleanParams(allowed_labels=("fruit", "plant"), label_aliases={"Fruits": "fruit"})
    clean, report = clean_dataset(df, raw_dir, tmp_path / "clean", params)
    reasons = _reasons(report)
    assert reasons["fruit-01"] == "missing_label"
    assert "fruit-02" not in reasons and clean.set_index("id").loc["fruit-02", "label"] == "fruit"
    assert all(reasons[f"water-{i:02d}"] == "disallowed_label" for i in range(10))


def test_conflicting_labels_on_same_image_drop_every_copy(raw, tmp_path):
    df, raw_dir = raw
    df = df.copy()
    src = raw_dir / df.set_index("id").loc["plant-03", "image"]
    (raw_dir / "images" / "conflict.png").write_bytes(src.read_bytes())
    df.loc[len(df)] = {**df.set_index("id").loc["plant-03"].to_dict(), "id": "conflict", "image": "images/conflict.png",
                       "label": "water", "text": "another text"}
    clean, report = clean_dataset(df, raw_dir, tmp_path / "clean", CleanParams())
    reasons = _reasons(report)
    assert reasons["conflict"] == "label_conflict" and reasons["plant-03"] == "label_conflict"
    assert "plant-03" not in set(clean["id"])


def test_text_length_limits(raw, tmp_path):
    df, raw_dir = raw
    df = df.copy()
    df.loc[df["id"] == "water-01", "text"] = "x" * 5000
    df.loc[df["id"] == "water-02", "text"] = "ab"
    _, report = clean_dataset(df, raw_dir, tmp_path / "clean", CleanParams(min_text_chars=3, max_text_chars=100))
    reasons = _reasons(report)
    assert reasons["water-01"] == "text_too_long" and reasons["water-02"] == "text_too_short"


def test_images_become_rgb_on_white_and_raw_is_untouched(raw, tmp_path):
    df, raw_dir = raw
    before = {p.name: p.read_bytes() for p in (raw_dir / "images").iterdir()}
    clean, _ = clean_dataset(df, raw_dir, tmp_path / "clean", CleanParams())
    img = Image.open(tmp_path / "clean" / clean["image"].iloc[0])
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)  # the transparent corner
    assert {p.name: p.read_bytes() for p in (raw_dir / "images").iterdir()} == before
    assert len(list((tmp_path / "clean" / "images").iterdir())) == len(clean)


def test_normalize_text():
    assert normalize_text("  Ｈello\u200b\tWORLD\x00 ") == "hello world"
    assert normalize_text("Café", lowercase=False) == "Café"
    assert normalize_text("\u200b \n") == ""


def test_manifest_reader_reports_missing_columns(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"id": ["a"], "text": ["t"]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="missing column"):
        read_manifest(path)
    assert read_manifest(path, required=("id",))["text"].tolist() == ["t"]


def test_read_manifest_keeps_empty_strings(tmp_path):
    path = tmp_path / "m.csv"
    Path(path).write_text("id,image,text,label,group,source,license\na,images/a.png,,x,,s,\n")
    df = read_manifest(path)
    assert df.loc[0, "text"] == "" and df.loc[0, "group"] == ""


def test_rows_with_one_modality_are_kept_and_counted(raw, tmp_path):
    df, raw_dir = raw
    df = df.copy()
    df.loc[df["id"] == "plant-04", "image"] = ""  # text-only sample
    df.loc[df["id"] == "water-05", "image"] = ""
    df.loc[df["id"] == "water-05", "text"] = "  "  # nothing at all
    clean, report = clean_dataset(df, raw_dir, tmp_path / "clean", CleanParams())
    reasons = _reasons(report)
    assert reasons["water-05"] == "no_modality"
    assert reasons["missing"] == "missing_image"  # a named image that is not there is still a broken row
    assert "empty-text" not in reasons and "plant-04" not in reasons
    rows = clean.set_index("id")
    assert rows.loc["empty-text", "text"] == "" and rows.loc["empty-text", "image_sha256"]
    assert rows.loc["plant-04", "image"] == "" and rows.loc["plant-04", "width"] == 0
    assert report["kept_by_presence"] == {"image+text": report["kept"] - 2, "image_only": 1, "text_only": 1}
    off, report_off = clean_dataset(df, raw_dir, tmp_path / "clean_off", CleanParams(allow_missing_modality=False))
    assert _reasons(report_off)["plant-04"] == "missing_image" and report_off["kept_by_presence"]["text_only"] == 0
