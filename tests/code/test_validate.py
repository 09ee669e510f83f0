import json

import pandas as pd
import pytest

from mmfusion.config import CleanParams, ValidateParams
from mmfusion.data.clean import clean_dataset
from mmfusion.data.docs_assets import remote_refs
from mmfusion.data.validate import ValidationFailed, validate_manifest
from mmfusion.sources.manifest import build as build_manifest_source
from tests.conftest import tiny_params


@pytest.fixture
def clean(tiny_manifest, tmp_path):
    params = tiny_params(tiny_manifest)
    raw_dir = tmp_path / "raw"
    df = build_manifest_source(params.ingest, raw_dir)
    clean_df, _ = clean_dataset(df, raw_dir, tmp_path / "clean", CleanParams())
    return clean_df, tmp_path / "clean"


def test_valid_data_passes_and_writes_reports(clean, tmp_path):
    df, root = clean
    result = validate_manifest(df, root, tmp_path / "val", ValidateParams(min_per_class=3))
    assert result["success"] and result["failed_critical"] == 0
    saved = json.loads((tmp_path / "val" / "result.json").read_text())
    assert saved["evaluated"] == len(saved["expectations"]) >= 15
    assert (tmp_path / "val" / "data_docs" / "index.html").exists()


def test_critical_failure_names_expectation_and_values(clean, tmp_path):
    df, root = clean
    df = df.copy()
    df.loc[0, "id"] = df.loc[1, "id"]  # duplicate id
    (root / df.loc[2, "image"]).unlink()  # a missing image file
    with pytest.raises(ValidationFailed) as exc:
        validate_manifest(df, root, tmp_path / "val", ValidateParams(min_per_class=3))
    msg = str(exc.value)
    assert "expect_column_values_to_be_unique" in msg and df.loc[1, "id"] in msg
    assert "image_exists" in msg
    saved = json.loads((tmp_path / "val" / "result.json").read_text())
    assert saved["success"] is False and saved["failed_critical"] == 2
    # the Data Docs that show the failure are written offline-ready too (tests/code/test_offline_html.py: the rest)
    assert all(not remote_refs(p.read_text()) for p in (tmp_path / "val" / "data_docs").rglob("*.html"))


def test_class_count_failure_names_the_class(clean, tmp_path):
    df, root = clean
    df = pd.concat([df[df["label"] != "water"], df[df["label"] == "water"].head(2)])
    with pytest.raises(ValidationFailed, match="water"):
        validate_manifest(df, root, tmp_path / "val", ValidateParams(min_per_class=3))


def test_warnings_do_not_fail(clean, tmp_path):
    df, root = clean
    df = pd.concat([df[df["label"] != "water"], df[df["label"] == "water"].head(4)])  # imbalance 10/4 = 2.5
    result = validate_manifest(df, root, tmp_path / "val", ValidateParams(min_per_class=3, warn_imbalance=2.0, max_imbalance=5.0))
    assert result["success"] and result["warnings"] == 1


def test_rows_with_one_modality_pass_and_their_share_is_bounded(clean, tmp_path):
    df, root = clean
    df = df.copy()
    df.loc[0, ["image", "width", "height", "image_sha256"]] = ["", 0, 0, ""]  # text-only
    df.loc[1, "text"] = ""  # image-only
    result = validate_manifest(df, root, tmp_path / "val", ValidateParams(min_per_class=3))
    share = ((df["image"] == "") | (df["text"] == "")).mean()  # the fixture's empty-text row is image-only too
    assert result["success"] and result["missing_modality_share"] == pytest.approx(share, abs=1e-4)
    df.loc[1, ["image", "width", "height", "image_sha256"]] = ["", 0, 0, ""]  # now nothing at all
    with pytest.raises(ValidationFailed) as exc:
        validate_manifest(df, root, tmp_path / "val2", ValidateParams(min_per_class=3, max_missing_modality_share=0.05))
    assert "column_mean_to_be_between(missing_modality" in str(exc.value)
    assert "values_to_be_between(modalities" in str(exc.value)
