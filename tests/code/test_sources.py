import pandas as pd
import pytest

from mmfusion.config import parse_params
from mmfusion.data.manifest import ManifestError
from mmfusion.sources import get_source
from mmfusion.stages import ingest
from tests.conftest import tiny_params


def test_unknown_source_lists_known():
    with pytest.raises(ValueError, match="available: emoji, manifest"):
        get_source("flickr")


def test_unknown_label_field_for_emoji(tmp_path):
    params = parse_params({"ingest": {"label_field": "colour"}})
    with pytest.raises(ValueError, match="label_field 'colour'"):
        ingest.run(params, tmp_path)
    assert not (tmp_path / "data" / "raw").exists()


def test_manifest_missing_columns(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"id": ["a"], "picture": ["a.png"], "text": ["t"], "label": ["x"]}).to_csv(path, index=False)
    params = parse_params({"ingest": {"source": "manifest", "manifest": {"path": str(path)}}})
    with pytest.raises(ManifestError, match=r"missing column\(s\) image"):
        ingest.run(params, tmp_path)


def test_manifest_configurable_columns(tiny_manifest, tmp_path):
    df = pd.read_csv(tiny_manifest).rename(columns={"image": "file", "label": "category"})
    path = tiny_manifest.parent / "renamed.csv"
    df.to_csv(path, index=False)
    params = parse_params({"ingest": {"source": "manifest", "min_class_count": 1,
                                      "manifest": {"path": str(path), "image_column": "file", "label_column": "category"}}})
    summary = ingest.run(params, tmp_path)
    assert summary["samples"] == len(df)
    raw = pd.read_csv(tmp_path / "data" / "raw" / "manifest.csv")
    assert set(raw["label"]) == {"fruit", "plant", "water"}


def test_path_escaping_image_root_fails_before_any_copy(tiny_manifest, tmp_path):
    df = pd.read_csv(tiny_manifest)
    df.loc[3, "image"] = "../../etc/passwd"
    df.to_csv(tiny_manifest, index=False)
    with pytest.raises(ManifestError, match="escapes the image root"):
        ingest.run(tiny_params(tiny_manifest), tmp_path)
    assert not (tmp_path / "data" / "raw").exists()


def test_duplicate_ids_rejected(tiny_manifest, tmp_path):
    df = pd.read_csv(tiny_manifest)
    df.loc[1, "id"] = df.loc[0, "id"]
    df.to_csv(tiny_manifest, index=False)
    with pytest.raises(ManifestError, match="duplicate id"):
        ingest.run(tiny_params(tiny_manifest), tmp_path)


def test_limit_is_stratified(tiny_manifest, tmp_path):
    summary = ingest.run(tiny_params(tiny_manifest, ingest={"limit": 15}), tmp_path)
    assert summary["samples"] == 15
    assert set(summary["labels"]) == {"fruit", "plant", "water"}


def test_manifest_without_id_column_gets_stable_derived_ids(tiny_manifest, tmp_path):
    df = pd.read_csv(tiny_manifest).drop(columns=["id"])
    path = tiny_manifest.parent / "noid.csv"
    df.to_csv(path, index=False)
    summary = ingest.run(tiny_params(path), tmp_path / "a")
    assert summary["ids"].startswith("derived")
    first = pd.read_csv(tmp_path / "a" / "data" / "raw" / "manifest.csv")
    assert first["id"].is_unique and first["id"].str.match(r"^[\w.-]+-[0-9a-f]{10}(-\d+)?$").all()
    assert (first.set_index("id")["image"].str.len() > 0).all()
    # reordered rows keep their ids: an id depends on the row, not its position
    df.iloc[::-1].to_csv(path, index=False)
    ingest.run(tiny_params(path), tmp_path / "b")
    second = pd.read_csv(tmp_path / "b" / "data" / "raw" / "manifest.csv")
    key = lambda d: dict(zip(d["id"], d["text"]))  # noqa: E731
    assert key(first) == key(second)


def test_manifest_row_without_image_path_is_kept_for_clean(tiny_manifest, tmp_path):
    df = pd.read_csv(tiny_manifest)
    df.loc[0, "image"] = ""
    df.to_csv(tiny_manifest, index=False)
    ingest.run(tiny_params(tiny_manifest), tmp_path)
    raw = pd.read_csv(tmp_path / "data" / "raw" / "manifest.csv", keep_default_na=False)
    assert raw.set_index("id").loc[df.loc[0, "id"], "image"] == ""
