"""The bundled default data (Twemoji + emoji-data), ingested for real."""

from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image

from mmfusion.config import parse_params
from mmfusion.stages import ingest


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("emoji")
    summary = ingest.run(parse_params({}), root)
    return summary, pd.read_csv(root / "data" / "raw" / "manifest.csv", keep_default_na=False), root / "data" / "raw"


def test_schema_and_counts(raw):
    summary, df, _ = raw
    assert list(df.columns) == ["id", "image", "text", "label", "group", "source", "license"]
    assert 1800 <= len(df) <= 2000
    assert df["id"].is_unique
    assert len(set(df["label"])) == 9 and "Component" not in set(df["label"])
    assert (df["text"].str.len() > 0).all()
    assert summary["samples"] == len(df)


def test_licences_and_sources(raw):
    _, df, _ = raw
    assert set(df["source"]) == {"twemoji"}
    assert df["license"].str.contains("CC-BY-4.0").all() and df["license"].str.contains("MIT").all()


def test_images_exist_and_are_72px_with_alpha(raw):
    _, df, root = raw
    for rel in df["image"].sample(20, random_state=0):
        img = Image.open(root / rel)
        assert img.size == (72, 72) and img.mode in ("RGBA", "P", "LA")


def test_gendered_variants_share_a_group(raw):
    _, df, _ = raw
    firefighters = df[df["text"].str.lower().str.contains("firefighter")]
    assert len(firefighters) >= 2 and firefighters["group"].nunique() == 1


def test_subcategory_task(tmp_path):
    summary = ingest.run(parse_params({"ingest": {"label_field": "subcategory", "min_class_count": 10}}), tmp_path)
    assert 40 <= len(summary["labels"]) <= 70
    assert min(summary["labels"].values()) >= 10
