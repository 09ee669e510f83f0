"""clean and validate loop over the modality specs: a toy modality registered here, with nothing else edited,
gets its drop reasons, dedup key, label conflicts, presence patterns, clean columns and expectations from its spec."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mmfusion.config import CleanParams, ValidateParams
from mmfusion.data.clean import clean_dataset
from mmfusion.data.manifest import CLEAN_COLUMNS, clean_columns
from mmfusion.data.validate import ValidationFailed, validate_manifest
from mmfusion.modalities import (
    ModalitySpec,
    get_modality,
    list_modalities,
    register_modality,
    specs_for,
    unregister_modality,
)
from mmfusion.modalities.base import Dropped, presence_pattern, presence_patterns
from mmfusion.sources.manifest import build as build_manifest_source
from tests.code.test_modalities import VectorSpec
from tests.conftest import tiny_params

DIM = 4


class CleanVectorSpec(VectorSpec):
    """The toy vector modality with its data edges: a 1-d .npy of DIM numbers, copied under `vectors/`."""

    clean_fields = {"vector_dim": 0, "vector_sha256": ""}
    dedup_key = "vector_sha256"

    def clean(self, raw: str, data: bytes | None, out_root: Path, params: Any) -> dict[str, Any]:
        try:
            vector = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise Dropped("undecodable_vector", f"not a .npy array: {exc}") from exc
        if vector.shape != (DIM,):
            raise Dropped("wrong_vector_shape", f"shape {vector.shape} != ({DIM},)")
        name = f"{self.folder}/{Path(raw).stem}.npy"
        (out_root / name).write_bytes(data)
        return {self.column: name, "vector_dim": DIM, "vector_sha256": hashlib.sha256(data).hexdigest()}

    def validation_columns(self, df: pd.DataFrame, root: Path) -> dict[str, Any]:
        return {"vector_exists": [bool(p) and (root / p).is_file() for p in df[self.column]]}

    def expectations(self, gxe: Any, params: Any, where: Any) -> list:
        return [
            gxe.ExpectColumnValuesToBeBetween(column="vector_dim", min_value=DIM, max_value=DIM, **where),
            gxe.ExpectColumnValuesToBeInSet(column="vector_exists", value_set=[True], **where),
        ]


@pytest.fixture
def vector_modality():
    register_modality(CleanVectorSpec)
    yield CleanVectorSpec
    unregister_modality("vector")


@pytest.fixture
def raw(tiny_manifest, tmp_path, vector_modality):
    """The tiny image+text data (with its corrupt/missing/empty-text/duplicate/tiny rows) plus a vector column."""
    raw_dir = tmp_path / "raw"
    df = build_manifest_source(tiny_params(tiny_manifest).ingest, raw_dir)
    (raw_dir / "vectors").mkdir()
    vectors = []
    for n, sid in enumerate(df["id"]):
        np.save(raw_dir / "vectors" / f"{sid}.npy", np.arange(DIM, dtype=np.float32) + n)
        vectors.append(f"vectors/{sid}.npy")
    df.insert(3, "vector", vectors)
    by = df.set_index("id")
    # the tiny data's "dup" copies fruit-00's image and text: its vector is fruit-00's bytes under another name
    (raw_dir / "vectors" / "dup.npy").write_bytes((raw_dir / by.loc["fruit-00", "vector"]).read_bytes())
    (raw_dir / "vectors" / "fruit-03.npy").write_bytes(b"\x93NUMPY garbage")  # a good image, a corrupt vector
    np.save(raw_dir / "vectors" / "fruit-04.npy", np.zeros((2, 2), dtype=np.float32))
    df.loc[df["id"].isin(["plant-01", "plant-02", "water-01"]), "vector"] = ""  # no vector: image+text rows
    df.loc[df["id"] == "water-02", "vector"] = "vectors/nope.npy"
    extra = [  # fruit-01's image and text with another vector: not a duplicate, the vector is part of the key
        {**by.loc["fruit-01"].to_dict(), "id": "fruit-01b", "vector": "vectors/fruit-01b.npy"},
        {**by.loc["plant-05"].to_dict(), "id": "text-vec", "image": "", "vector": "vectors/text-vec.npy"},
        {**by.loc["plant-06"].to_dict(), "id": "vec-only", "image": "", "text": " ", "vector": "vectors/vec-only.npy"},
        {**by.loc["water-05"].to_dict(), "id": "vconflict", "image": "", "label": "fruit",
         "vector": "vectors/vconflict.npy"},
        {**by.loc["water-06"].to_dict(), "id": "nothing", "image": "", "text": "", "vector": ""},
    ]
    for i, row in enumerate(extra):
        if row["vector"]:
            np.save(raw_dir / row["vector"], np.full(DIM, 100.0 + i, dtype=np.float32))
    # water-05's vector under another label: a file modality's label conflict drops both
    (raw_dir / "vectors" / "vconflict.npy").write_bytes((raw_dir / by.loc["water-05", "vector"]).read_bytes())
    return pd.concat([df, pd.DataFrame(extra)], ignore_index=True), raw_dir


def _reasons(report):
    return {row["id"]: row["reason"] for row in report["dropped_rows"]}


@pytest.mark.parametrize("name", list_modalities())
def test_every_registered_spec_has_its_clean_rule_and_dedup_key(name):
    cls = get_modality(name)
    assert cls.clean is not ModalitySpec.clean
    assert cls.dedup_key in clean_columns({name: cls()})


def test_presence_pattern_names_come_from_the_modalities():
    assert presence_patterns(["image", "text"]) == ["image+text", "image_only", "text_only"]
    assert presence_patterns(["image", "text", "vector"])[:2] == ["image+text+vector", "image+text"]
    assert presence_pattern(["vector", "image"], ["image", "text", "vector"]) == "image+vector"
    assert presence_pattern([], ["image", "text"]) == "none"
    assert clean_columns(specs_for(["image", "text"])) == list(CLEAN_COLUMNS)


def test_clean_takes_a_toy_modalitys_rules_dedup_key_and_patterns_from_its_spec(raw, tmp_path):
    df, raw_dir = raw
    out = tmp_path / "clean"
    clean, report = clean_dataset(df, raw_dir, out, CleanParams())
    reasons = _reasons(report)
    assert reasons == {
        "corrupt": "undecodable_image", "missing": "missing_image", "tiny": "image_too_small", "dup": "duplicate",
        "fruit-03": "undecodable_vector", "fruit-04": "wrong_vector_shape", "water-02": "missing_vector",
        "water-05": "label_conflict", "vconflict": "label_conflict", "nothing": "no_modality",
    }  # fmt: skip
    details = {row["id"]: row["detail"] for row in report["dropped_rows"]}
    assert details["dup"] == "same image, text and vector as fruit-00"
    assert details["water-02"] == "cannot read vectors/nope.npy: FileNotFoundError"  # clean reads every file modality
    assert details["vconflict"] == "same vector under labels water-05 (water), vconflict (fruit)"
    assert details["nothing"] == "neither an image path nor a text nor a vector path"
    assert "fruit-01b" in set(clean["id"])
    assert report["kept_by_presence"] == {
        "image+text+vector": 24, "image+text": 3, "image+vector": 1, "text+vector": 1,
        "image_only": 0, "text_only": 0, "vector_only": 1,
    }  # fmt: skip
    assert list(clean.columns) == [*CLEAN_COLUMNS[:3], "vector", *CLEAN_COLUMNS[3:], "vector_dim", "vector_sha256"]
    rows = clean.set_index("id")
    assert rows.loc["plant-01", ["vector", "vector_dim", "vector_sha256"]].tolist() == ["", 0, ""]
    # files of dropped rows are gone: the duplicate's, and the image of a row its vector dropped afterwards
    for folder, column in (("images", "image"), ("vectors", "vector")):
        written = {f"{folder}/{p.name}" for p in (out / folder).iterdir()}
        assert written == set(clean[column]) - {""}, folder

    strict, report = clean_dataset(df, raw_dir, tmp_path / "strict", CleanParams(allow_missing_modality=False))
    reasons = _reasons(report)
    assert reasons["plant-01"] == "missing_vector" and reasons["text-vec"] == "missing_image"
    assert {"image+text+vector"} == {k for k, n in report["kept_by_presence"].items() if n}
    assert "no vector path (clean.allow_missing_modality is off)" in {r["detail"] for r in report["dropped_rows"]}


def test_validate_runs_a_toy_modalitys_expectations_from_its_spec(raw, tmp_path):
    df, raw_dir = raw
    root = tmp_path / "clean"
    clean, _ = clean_dataset(df, raw_dir, root, CleanParams())
    result = validate_manifest(clean, root, tmp_path / "val", ValidateParams(min_per_class=3))
    assert result["success"]
    assert result["missing_modality_share"] == pytest.approx(6 / len(clean), abs=1e-4)
    rows = json.loads((tmp_path / "val" / "result.json").read_text())["expectations"]
    schema = next(r for r in rows if r["expectation"] == "expect_table_columns_to_match_set")
    added = {"vector", "vector_dim", "vector_sha256", "vector_exists", "has_vector"}
    assert added <= set(schema["kwargs"]["column_set"])
    own = [r for r in rows if r["kwargs"].get("column") in ("vector_dim", "vector_exists")]  # the spec's
    assert len(own) == 2 and all(r["success"] for r in own)
    assert all(r["kwargs"]["row_condition"]["column"]["name"] == "has_vector" for r in own)
    generic = [r["expectation"] for r in rows if r["kwargs"].get("column") == "vector"]  # as for every modality
    assert sorted(generic) == ["expect_column_values_to_be_of_type", "expect_column_values_to_not_be_null"]

    (root / clean.set_index("id").loc["plant-07", "vector"]).unlink()
    with pytest.raises(ValidationFailed, match=r"vector_exists.*plant-07"):
        validate_manifest(clean, root, tmp_path / "val2", ValidateParams(min_per_class=3))


def test_split_rebases_and_augment_keeps_a_toy_file_modalitys_values(raw, tmp_path):
    from mmfusion.data.manifest import read_manifest, write_manifest
    from mmfusion.stages import augment, split

    df, raw_dir = raw
    root = tmp_path / "proj"
    clean, _ = clean_dataset(df, raw_dir, root / "data/clean", CleanParams())
    write_manifest(clean, root / "data/clean/manifest.csv")
    params = tiny_params(raw_dir / "manifest.csv")
    split.run(params, root)
    train = read_manifest(root / "data/split/train.csv")
    assert all(p == "" or p.startswith("data/clean/vectors/") for p in train["vector"])  # rebased like images
    assert all((root / p).is_file() for p in train["vector"] if p)
    augment.run(params, root)
    views = read_manifest(root / "data/augmented/manifest.csv", required=("source_id", "vector"))
    by_source = train.set_index("id")["vector"]
    assert views["vector"].tolist() == [by_source[s] for s in views["source_id"]]  # no augmentation: kept
    assert all(p.startswith("data/augmented/images/") for p in views["image"] if p)
