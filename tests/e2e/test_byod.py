"""Bring your own data: generated datasets of awkward shapes, each through one real `dvc repro`
(Prefect flows on a real server) to a built Bento, or to one clear error line naming the problem.

Shapes covered (several share a dataset, to keep to one repro each): 2 classes; 50+ classes
with some tiny ones; corrupt and missing images; rows with only one modality; long,
multilingual and emoji-laden texts; JPEG, WebP, GIF and large images; a Parquet manifest;
no group column; no id column; plus three that must stop early: one class, misnamed columns,
no usable image.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.e2e.byod_data import SHAPES
from tests.e2e.explanations import check_explanations
from tests.e2e.test_pipeline import DVC, copy_project

pytestmark = pytest.mark.slow

TINY = {
    "augment": {"views": 0},
    "train": {"strategies": ["text_only", "concat", "ensemble"], "epochs": 8, "hidden_dim": 32, "patience": 4,
              "warmup_epochs": 1, "lr": 3e-3},
    # explanations cost tens of encoder calls per row: explained in the one shape with rows missing an input
    # (byod_data.partial_rows_multilingual_broken_no_group turns them on), off in the others
    "evaluate": {"cv_folds": 3, "bootstrap": 100, "raw_check": 8, "explain_rows": 0, "faithfulness_rows": 0},
    # The matrix is about data shapes: torch encoders, so no shape pays its own int8 calibration
    # (test_pipeline runs the default runtime, auto, end to end).
    "featurize": {"runtime": "torch"},
    "package": {"workers": 1},
    "validate": {"min_per_class": 3},
    "ingest": {"min_class_count": 1},
    "split": {"val_fraction": 0.2, "test_fraction": 0.2},
}  # fmt: skip


def configure(proj: Path, manifest: Path, columns: dict, overrides: dict, cache: Path) -> None:
    params = yaml.safe_load((proj / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    params["featurize"]["cache_dir"] = str(cache)
    params["ingest"].update({"source": "manifest"})
    params["ingest"]["manifest"].update({"path": str(manifest), **columns})
    for section, values in overrides.items():
        params[section].update(values)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))


def repro(proj: Path, api_url: str, bentoml_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": api_url, "BENTOML_HOME": str(bentoml_home)}
    return subprocess.run([DVC, "repro"], cwd=proj, capture_output=True, text=True, env=env, timeout=1800)


ERROR_LINE = re.compile(r"^(ingest|clean|validate|split|augment|featurize|train|evaluate|package): (error|failed): .+$",
                        re.MULTILINE)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, server):
    """Every shape through one `dvc repro` each; {shape: (project, completed process)}.

    Two repros at a time: a repro of tiny data is mostly stage processes importing torch, Prefect and GX,
    one core each, so two use both cores (measured: the fixture took 257 s one at a time in CI). Each
    shape has its own project and BentoML store; the feature cache is shared, as two users' runs may share
    one: its entries are content-addressed and written by atomic rename.
    """
    from concurrent.futures import ThreadPoolExecutor

    base = tmp_path_factory.mktemp("byod")
    projects = {}
    only = [s for s in os.environ.get("MMFUSION_BYOD_SHAPES", "").split(",") if s]  # a developer's subset
    for name, (build, _) in SHAPES.items():
        if only and name not in only:
            continue
        data = base / name / "userdata"
        data.mkdir(parents=True)
        manifest, columns, overrides = build(data)
        proj = copy_project(base / name / "proj")
        configure(proj, manifest, columns, overrides, base / "cache")
        projects[name] = proj
    # the longest repros first (the tuned shape, then those that build a Bento; the early errors fill the gaps)
    order = sorted(projects, key=lambda name: ("tuned", "bento", "error").index(SHAPES[name][1]))
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = {name: pool.submit(repro, projects[name], server, base / name / "bentoml") for name in order}
        return {name: (projects[name], future.result()) for name, future in done.items()}


@pytest.mark.parametrize("shape", [s for s, (_, want) in SHAPES.items() if want == "bento"])
def test_shape_ends_in_a_built_bento(runs, shape):
    proj, done = runs[shape]
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    package = json.loads((proj / "reports/package.json").read_text())
    assert package["bento_tag"].startswith("mmfusion") and package["smoke_test"]["ok"]
    metrics = json.loads((proj / "reports/evaluate/metrics.json").read_text())
    assert metrics["selection"] == "cv"
    assert set(metrics["strategies"]) == {"text_only", "concat", "ensemble"}
    assert metrics["raw_check"]["agreement_with_cached_features"] >= 0.99
    # the head ran under ONNX Runtime in the raw check and the package smoke test (CPU, head_runtime auto)
    assert metrics["raw_check"]["runtimes"]["head"] == package["runtimes"]["head"] == "onnx"
    if yaml.safe_load((proj / "params.yaml").read_text())["evaluate"]["explain_rows"]:
        check_explanations(proj)  # long texts may be over the cost limit: passed over
    else:  # off: the outputs DVC declares are still there, saying so
        assert "evaluate.explain_rows is 0" in (proj / "reports/evaluate/explanations/index.html").read_text()


@pytest.mark.parametrize("shape", [s for s, (_, want) in SHAPES.items() if want == "error"])
def test_shape_ends_in_one_clear_error_line(runs, shape):
    proj, done = runs[shape]
    assert done.returncode != 0
    lines = ERROR_LINE.findall(done.stderr)
    assert len(lines) == 1, done.stderr[-4000:]
    assert not (proj / "reports/package.json").exists()


def test_what_each_shape_reports(runs):
    """The details a user would check, shape by shape."""
    proj, _ = runs["two_classes_parquet_mixed_formats_no_id"]
    ingest = json.loads((proj / "reports/ingest.json").read_text())
    assert ingest["ids"].startswith("derived") and len(ingest["labels"]) == 2
    proj, _ = runs["partial_rows_multilingual_broken_no_group"]
    clean = json.loads((proj / "reports/clean.json").read_text())
    assert clean["dropped_by_reason"] == {"missing_image": 1, "undecodable_image": 1}
    assert clean["kept_by_presence"]["image_only"] > 0 and clean["kept_by_presence"]["text_only"] > 0
    metrics = json.loads((proj / "reports/evaluate/metrics.json").read_text())
    test = pd.read_csv(proj / "data/split/test.csv", keep_default_na=False)
    patterns = {"image+text" if (i and t) else ("image_only" if i else "text_only")
                for i, t in zip(test["image"].str.strip().astype(bool), test["text"].str.strip().astype(bool))}  # fmt: skip
    by_presence = metrics["strategies"]["concat"]["test"]["by_presence"]
    assert set(by_presence) == patterns  # one accuracy per kind of row the test split has
    assert sum(v["n"] for v in by_presence.values()) == len(test)
    page, shown, _ = check_explanations(proj)  # rows without an image or a text: that input is "absent"
    assert 'class="absent"' in page or (shown["image"].astype(bool) & shown["text"].astype(bool)).all()
    featurize = json.loads((proj / "reports/featurize.json").read_text())
    assert featurize["encoders"]["text"]["truncated"] > 0
    proj, _ = runs["many_classes_some_tiny"]
    ingest = json.loads((proj / "reports/ingest.json").read_text())
    assert len(ingest["labels"]) == 52 and ingest["dropped_small_classes_or_limit"] == 4
    _, done = runs["wrong_columns"]
    assert "missing column(s) picture (for image)" in done.stderr  # the columns the params name, as named there
    _, done = runs["one_class_only"]
    assert "class" in ERROR_LINE.search(done.stderr).group(0)


def test_a_tuned_model_is_served_with_its_tuned_encoder(runs, tmp_path):
    """tuned_concat (the image encoder's top fine-tuned with the head, train.finetune) through train, evaluate
    (tuned again per CV fold), package and a real `bentoml serve`: the Bento answers with the tuned encoder."""
    import httpx

    from mmfusion.inference.predictor import Predictor
    from tests.service.conftest import service_env, start_server

    proj, done = runs["tuned_image_encoder"]
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    metrics = json.loads((proj / "reports/evaluate/metrics.json").read_text())
    assert metrics["winner"] == "tuned_concat", metrics["leaderboard"] if "leaderboard" in metrics else metrics["winner"]
    cv = metrics["strategies"]["tuned_concat"]["cv"]
    assert cv["folds"] == 3 and len(cv["best_epochs"]) == 3  # tuned again on each fold
    assert metrics["raw_check"]["agreement_with_cached_features"] >= 0.99  # served path = evaluated embeddings
    report = json.loads((proj / "reports/train.json").read_text())
    train = report["strategies"]["tuned_concat"]
    assert train["tuned"]["image"]["blocks"] == 2 and train["tuned_parameters"] > 0
    sizes = json.loads((proj / "reports/split.json").read_text())["sizes"]
    assert report["train_rows"] > sizes["train"]  # the augmented views were trained on (train.use_augmented)
    # the model folder carries the tuned weights; its image encoder is not featurize's
    best = proj / "models/best"
    config = json.loads((best / "config.json").read_text())
    image = config["encoders"]["image"]
    assert (best / image["tuned"]["file"]).is_file() and not (best / "features").exists()
    frozen = json.loads((proj / "features/meta.json").read_text())["modalities"]["image"]["fingerprint"]
    assert image["tuned"]["from"] == frozen != image["fingerprint"]
    assert image["runtime"]["name"] in ("onnx-int8", "onnx")  # int8 where the guard allowed it, else fp32 ONNX
    # the drift reference holds the tuned encoder's embeddings (the strategy's own features), not featurize's
    import numpy as np
    from safetensors.numpy import load_file

    from mmfusion.features.store import load_features

    reference = load_file(str(best / "reference/embeddings.safetensors"))["image"]
    splits = json.loads((best / "reference/reference.json").read_text())["splits"]
    own, frozen = ([load_features(d, s)[0]["image"].astype(np.float32) for s in splits]
                   for d in (proj / "models/strategies/tuned_concat/features", proj / "features"))  # fmt: skip
    assert np.array_equal(reference, np.concatenate(own)) and not np.allclose(reference, np.concatenate(frozen))

    package = json.loads((proj / "reports/package.json").read_text())
    env = service_env(tmp_path / "unused")
    env["BENTOML_HOME"] = str(proj.parent / "bentoml")
    image_file = next(p for p in sorted((proj / "data/clean").rglob("*.png")))
    proc, url = start_server(package["bento_tag"], env, cwd=proj, output=tmp_path / "serve.log")
    try:
        answer = httpx.post(f"{url}/classify", files={"image": ("x.png", image_file.read_bytes(), "image/png")},
                            data={"text": "item number 1"}, timeout=60)  # fmt: skip
        assert answer.status_code == 200, answer.text
        body = answer.json()
    finally:
        from mmfusion.procs import stop_process_group

        stop_process_group(proc)
    assert body["model_version"].startswith("tuned_concat-")
    from PIL import Image

    local = Predictor.from_dir(best).predict([{"image": Image.open(image_file).convert("RGB"), "text": "item number 1"}])[0]
    assert body["label"] == local["label"]
    assert abs(body["probabilities"][local["label"]] - local["probabilities"][local["label"]]) < 1e-3
