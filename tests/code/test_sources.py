import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmfusion.config import ParamsError, parse_params
from mmfusion.data.manifest import ManifestError
from mmfusion.modalities import ModalitySpec, register_modality, unregister_modality
from mmfusion.sources import get_source
from mmfusion.sources.manifest import build as build_manifest_source
from mmfusion.sources.manifest import derive_ids
from mmfusion.stages import ingest
from tests.conftest import tiny_params


class ToyVectorSpec(ModalitySpec):
    """A toy file modality registered by these tests only: a .npy per sample, manifest column `vec`."""

    name = "toy_vector"
    column = "vec"
    folder = "vectors"
    http = "file"
    dedup_key = "vec"

    def example(self) -> np.ndarray:
        return np.zeros(4, dtype=np.float32)


@pytest.fixture
def toy_vector():
    register_modality(ToyVectorSpec)
    yield ToyVectorSpec
    unregister_modality(ToyVectorSpec.name)


def manifest_params(path: Path, **manifest):
    ingest_params = {"source": "manifest", "min_class_count": 1, "manifest": {"path": str(path), **manifest}}
    return parse_params({"ingest": ingest_params})


def test_unknown_source_lists_known():
    with pytest.raises(ValueError, match="available: emoji, manifest"):
        get_source("flickr")


def test_unknown_label_field_for_emoji(tmp_path):
    params = parse_params({"ingest": {"label_field": "colour"}})
    with pytest.raises(ValueError, match="label_field 'colour'"):
        ingest.run(params, tmp_path)
    assert not (tmp_path / "data" / "raw").exists()


def test_manifest_without_any_modality_column_lists_the_expected_ones(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"id": ["a"], "picture": ["a.png"], "caption": ["t"], "label": ["x"]}).to_csv(path, index=False)
    with pytest.raises(ManifestError, match=r"no modality column \(one of image \(for image\), text \(for text\)"):
        ingest.run(manifest_params(path), tmp_path)
    assert not (tmp_path / "data" / "raw").exists()


def test_a_column_named_in_columns_must_exist(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"id": ["a"], "image": ["a.png"], "text": ["t"], "label": ["x"]}).to_csv(path, index=False)
    with pytest.raises(ManifestError, match=r"missing column\(s\) picture \(for image\)"):
        ingest.run(manifest_params(path, columns={"image": "picture"}), tmp_path)


def test_a_modality_is_in_the_data_when_its_column_is(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"id": ["a", "b"], "picture": ["a.png", "b.png"], "text": ["t", "u"], "label": ["x", "y"]}).to_csv(
        path, index=False)
    df = build_manifest_source(manifest_params(path).ingest, tmp_path / "raw")  # `picture` is no modality's column
    assert list(df.columns) == ["id", "text", "label", "group", "source", "license"]
    assert not (tmp_path / "raw" / "images").exists()


def test_an_unknown_modality_in_columns_names_the_registered_ones(tiny_manifest, tmp_path):
    params = tiny_params(tiny_manifest, ingest={"manifest": {"path": str(tiny_manifest), "columns": {"speech": "wav"}}})
    with pytest.raises(ManifestError, match=r"'speech', not a registered modality; registered: image, text, audio"):
        ingest.run(params, tmp_path)


@pytest.mark.parametrize("old, new", [("image_root", "files_root"), ("image_column", "columns (e.g. {image: photo})"),
                                      ("text_column", "columns (e.g. {text: title})")])
def test_the_old_manifest_keys_name_their_new_ones(old, new):
    with pytest.raises(ParamsError, match=f"ingest.manifest.{old} was renamed to ingest.manifest.{re.escape(new)}"):
        parse_params({"ingest": {"manifest": {"path": "m.csv", old: "x"}}})


def test_manifest_configurable_columns(tiny_manifest, tmp_path):
    df = pd.read_csv(tiny_manifest).rename(columns={"image": "file", "text": "title", "label": "category"})
    path = tiny_manifest.parent / "renamed.csv"
    df.to_csv(path, index=False)
    params = parse_params({"ingest": {"source": "manifest", "min_class_count": 1, "manifest": {
        "path": str(path), "columns": {"image": "file", "text": "title"}, "label_column": "category"}}})
    summary = ingest.run(params, tmp_path)
    assert summary["samples"] == len(df)
    raw = pd.read_csv(tmp_path / "data" / "raw" / "manifest.csv", keep_default_na=False)
    assert list(raw.columns) == ["id", "image", "text", "label", "group", "source", "license"]  # the specs' columns
    assert set(raw["label"]) == {"fruit", "plant", "water"}
    by = raw.set_index("id")
    assert by.loc["fruit-00", "image"] == "images/fruit-00.png"
    assert (tmp_path / "data" / "raw" / "images" / "fruit-00.png").is_file()
    assert by.loc["fruit-00", "text"] == df.set_index("id").loc["fruit-00", "title"]


def test_files_root(tiny_manifest, tmp_path):
    df = pd.read_csv(tiny_manifest)
    df["image"] = df["image"].str.removeprefix("images/")
    path = tmp_path / "elsewhere.csv"
    df.to_csv(path, index=False)
    out = build_manifest_source(manifest_params(path, files_root=str(tiny_manifest.parent / "images")).ingest,
                                tmp_path / "raw")
    assert out.set_index("id").loc["fruit-00", "image"] == "images/fruit-00.png"
    assert (tmp_path / "raw" / "images" / "fruit-00.png").read_bytes() == (tiny_manifest.parent / "images/fruit-00.png"
                                                                           ).read_bytes()


def test_path_escaping_files_root_fails_before_any_copy(tiny_manifest, tmp_path):
    df = pd.read_csv(tiny_manifest)
    df.loc[3, "image"] = "../../etc/passwd"
    df.to_csv(tiny_manifest, index=False)
    with pytest.raises(ManifestError, match="image path '../../etc/passwd' escapes the files root"):
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


def test_derived_ids_of_image_and_text_data_are_unchanged(tmp_path, toy_vector):
    # the ids of the former formula, <image stem or "text">-<sha256(f"{image}\0{text}")[:10]>, computed before
    # the source looped over the modalities; a registered modality the data lacks changes nothing
    rows = {"image": ["photos/cat.png", "", "photos/cat.png", "x/a b.JPG"], "text": ["a cat", "only text", "a cat", ""]}
    expected = ["cat-a94165647b", "text-bc4c321a25", "cat-a94165647b-2", "a_b-dc1ae936e5"]
    assert derive_ids(pd.DataFrame(rows), ["image", "text"]) == expected
    path = tmp_path / "m.csv"
    pd.DataFrame({**rows, "label": ["x"] * 4}).to_csv(path, index=False)
    df = build_manifest_source(manifest_params(path, id_column="").ingest, tmp_path / "raw")
    assert list(df["id"]) == expected and df.attrs["ids_derived"]
    assert list(df["image"]) == [f"images/{i}{s}" if s else "" for i, s in zip(expected, [".png", "", ".png", ".jpg"])]


def _with_vectors(tiny_manifest: Path) -> pd.DataFrame:
    """The tiny manifest plus a `vec` column: a .npy under userdata/vecs/ for most rows, none for two."""
    root = tiny_manifest.parent
    (root / "vecs").mkdir()
    df = pd.read_csv(tiny_manifest, keep_default_na=False)
    vec = []
    for n, sid in enumerate(df["id"]):
        np.save(root / "vecs" / f"v {sid}.npy", np.full(4, n, dtype=np.float32))
        vec.append(f"vecs/v {sid}.npy")
    df["vec"] = vec
    df.loc[df["id"].isin(["plant-01", "water-02"]), "vec"] = ""
    return df


def test_a_toy_file_modality_gets_its_files_copied_to_its_folder(tiny_manifest, tmp_path, toy_vector):
    src = _with_vectors(tiny_manifest)
    src.to_csv(tiny_manifest, index=False)
    df = build_manifest_source(tiny_params(tiny_manifest).ingest, tmp_path / "raw")
    assert list(df.columns) == ["id", "image", "text", "vec", "label", "group", "source", "license"]
    by, given = df.set_index("id"), src.set_index("id")
    assert by.loc["fruit-00", "vec"] == "vectors/fruit-00.npy"
    assert (tmp_path / "raw" / "vectors" / "fruit-00.npy").read_bytes() == (tiny_manifest.parent / given.loc[
        "fruit-00", "vec"]).read_bytes()
    assert by.loc["plant-01", "vec"] == "" and by.loc["plant-01", "image"] == "images/plant-01.png"
    assert {f"vectors/{p.name}" for p in (tmp_path / "raw" / "vectors").iterdir()} == set(df["vec"]) - {""}
    assert (df["text"] == src["text"]).all()


def test_a_toy_file_modality_through_ingest_with_remapped_column_and_derived_ids(tiny_manifest, tmp_path, toy_vector):
    src = _with_vectors(tiny_manifest).drop(columns=["id"]).rename(columns={"vec": "embedding"})
    src.loc[0, "image"] = ""  # no image: the id's stem is the vector file's
    path = tiny_manifest.parent / "vec.csv"
    src.to_csv(path, index=False)
    params = tiny_params(path, ingest={"manifest": {"path": str(path), "columns": {"toy_vector": "embedding"}}})
    summary = ingest.run(params, tmp_path)
    assert summary["ids"].startswith("derived")
    raw = pd.read_csv(tmp_path / "data" / "raw" / "manifest.csv", keep_default_na=False)
    assert "vec" in raw.columns and "embedding" not in raw.columns
    first = raw.iloc[[i for i, t in enumerate(raw["text"]) if t == src.loc[0, "text"] and raw.loc[i, "image"] == ""]]
    assert len(first) == 1 and first["id"].iloc[0].startswith("v_fruit-00-")
    for folder, column in (("images", "image"), ("vectors", "vec")):
        written = {f"{folder}/{p.name}" for p in (tmp_path / "data" / "raw" / folder).iterdir()}
        named = set(raw[column]) - {""}
        assert written <= named and len(named - written) == (folder == "images"), folder  # the missing image: clean's


def test_a_toy_file_modalitys_escaping_path_fails_before_any_copy(tiny_manifest, tmp_path, toy_vector):
    src = _with_vectors(tiny_manifest)
    src.loc[5, "vec"] = "../../secret.npy"
    src.to_csv(tiny_manifest, index=False)
    with pytest.raises(ManifestError, match="toy_vector path '../../secret.npy' escapes the files root"):
        build_manifest_source(tiny_params(tiny_manifest).ingest, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()  # not even the images of the rows before it
