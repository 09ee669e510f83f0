"""A modality added in one module goes the whole way: manifest -> clean -> validate -> split -> featurize ->
train -> evaluate -> package (one real `dvc repro`) -> `/classify` and `/classify_batch` of the served Bento
-> inference log -> drift monitor -> feedback -> export, with nothing outside `tests/e2e/toy_vector.py`
edited (it is loaded into every process with `MMFUSION_PLUGINS`, as a user's own plugin would be).

The data: vectors whose mean depends on the class, texts whose words do, and rows with only one of them.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from mmfusion.procs import stop_process_group
from tests.e2e.test_pipeline import DVC, copy_project, project_env, server  # noqa: F401  (the server fixture)
from tests.service.conftest import start_server

pytestmark = pytest.mark.slow

PLUGIN = "tests.e2e.toy_vector"
DIM = 8  # toy_vector.DIM (never imported here: the registries are process-wide)
CLASSES = {"fruit": ["apple", "pear", "plum"], "plant": ["leaf", "fern", "moss"], "water": ["rain", "wave", "lake"]}


def npy(vector) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(vector, dtype=np.float32))
    return buf.getvalue()


def class_vector(k: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(0.0, 0.3, DIM)
    v[k] += 2.0
    return v


def write_dataset(root) -> dict:
    """12 rows per class (2 vector-only, 2 text-only), a corrupt vector file, and a wrong-shape one."""
    rng = np.random.default_rng(0)
    (root / "vecs").mkdir(parents=True)
    rows = []
    for k, (label, words) in enumerate(CLASSES.items()):
        for i in range(12):
            sid = f"{label}-{i:02d}"
            vector = ""
            if i not in (10, 11):
                (root / "vecs" / f"{sid}.npy").write_bytes(npy(class_vector(k, rng)))
                vector = f"vecs/{sid}.npy"
            text = "" if i in (8, 9) else f"{words[i % 3]} sample {i}"
            rows.append({"id": sid, "vector": vector, "text": text, "label": label, "group": f"{label}-g{i // 2}"})
    (root / "vecs" / "corrupt.npy").write_bytes(b"\x93NUMPY not really")
    rows.append({"id": "corrupt", "vector": "vecs/corrupt.npy", "text": "", "label": "fruit", "group": ""})
    (root / "vecs" / "short.npy").write_bytes(npy(np.zeros(3)))
    rows.append({"id": "short", "vector": "vecs/short.npy", "text": "", "label": "plant", "group": ""})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return {"manifest": root / "manifest.csv", "rng": rng}


@pytest.fixture(scope="module")
def project(tmp_path_factory, server):  # noqa: F811
    root = tmp_path_factory.mktemp("toy")
    proj = copy_project(root / "proj")
    data = write_dataset(root / "userdata")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["ingest"].update({"source": "manifest", "min_class_count": 1, "feedback_dir": ""})
    params["ingest"]["manifest"].update({"path": str(data["manifest"]), "group_column": "group"})
    params["validate"].update({"min_per_class": 3, "max_missing_modality_share": 0.5})
    params["split"].update({"val_fraction": 0.2, "test_fraction": 0.2})
    params["augment"]["views"] = 0
    params["featurize"].update({"encoders": {"vector": "vector_stats", "text": "minilm_l6"}, "runtime": "torch",
                                "cache_dir": str(root / "cache")})  # fmt: skip
    params["train"].update({"strategies": ["vector_only", "text_only", "concat"], "epochs": 20, "patience": 20,
                            "hidden_dim": 32, "batch_size": 16, "warmup_epochs": 1, "lr": 3e-3})  # fmt: skip
    params["evaluate"].update({"cv_folds": 3, "bootstrap": 50, "raw_check": 8})
    params["package"].update({"workers": 1})
    params["monitor"].update({"min_rows": 10})
    params["monitor"]["window"].update({"by": "count", "size": 12})
    params["retrain"].update({"export_dir": "feedback"})
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = project_env(proj, server)
    env.update({"MMFUSION_PLUGINS": PLUGIN, "BENTOML_HOME": str(root / "bentoml")})
    for key in ("MMFUSION_MODEL", "MMFUSION_INFERENCE_LOG", "MMFUSION_PARAMS"):
        env.pop(key, None)
    repro = subprocess.run([DVC, "repro"], cwd=proj, env=env, capture_output=True, text=True, timeout=1200)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    return {"proj": proj, "env": env, "root": root, "rng": data["rng"]}


def report(proj, name: str) -> dict:
    return json.loads((proj / "reports" / f"{name}.json").read_text())


def test_the_pipeline_runs_the_toy_modality_from_its_spec(project):
    proj = project["proj"]
    clean = report(proj, "clean")
    assert json.dumps(clean).count("undecodable_vector") >= 1, clean  # its own drop reason, from its spec
    config = json.loads((proj / "models" / "best" / "config.json").read_text())
    assert set(config["encoders"]) == {"vector", "text"} and config["encoders"]["vector"]["dim"] == 2 * DIM
    rows = pd.read_csv(proj / "data" / "clean" / "manifest.csv", dtype=str, keep_default_na=False)
    assert rows["vector"].str.startswith("vectors/").sum() == 30 and (rows["vector"] == "").sum() == 6
    assert (proj / "models" / "best" / "reference").is_dir()
    metrics = report(proj, "evaluate/metrics")
    assert set(metrics["strategies"]) == {"vector_only", "text_only", "concat"}
    assert metrics["strategies"]["vector_only"]["val"]["accuracy"] > 0.6  # the vectors carry the class
    assert "vector_only" in (proj / "reports" / "evaluate" / "leaderboard.md").read_text()


def test_the_served_bento_takes_logs_monitors_and_exports_the_toy_modality(project):
    proj, env = project["proj"], project["env"]
    package = report(proj, "package")
    assert package["log_keeps"] == {"vector": 1.0, "text": 1.0}
    proc, url = start_server(package["bento_tag"], env, cwd=proj, output=proj / "serve.log")
    rng = project["rng"]
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            doc = client.get("/docs.json").json()
            form = doc["paths"]["/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
            assert {"vector", "text"} <= set(form["properties"])
            ids = []
            for k, label in enumerate(CLASSES):
                for i in range(3):
                    files = {"vector": (f"{label}{i}.npy", npy(class_vector(k, rng)), "application/octet-stream")}
                    resp = client.post("/classify", files=files, data={"text": f"{CLASSES[label][i]} today"})
                    assert resp.status_code == 200, resp.text
                    assert sorted(resp.json()["modalities"]) == ["text", "vector"]
                    ids.append((resp.json()["request_id"], label))
            items = [{"vector": base64.b64encode(npy(class_vector(k, rng))).decode()} for k in range(3)]
            batch = client.post("/classify_batch", json={"items": items})
            assert batch.status_code == 200, batch.text
            assert [r["modalities"] for r in batch.json()["results"]] == [["vector"]] * 3
            bad = client.post("/classify", files={"vector": ("x.npy", npy(np.zeros(3)), "application/octet-stream")})
            assert bad.status_code == 400 and bad.json()["reason"] == "invalid_vector", bad.text
            for request_id, label in ids:
                fb = client.post("/feedback", json={"request_id": request_id, "item": 0, "label": label})
                assert fb.status_code == 200 and fb.json()["usable_for_retraining"], fb.text
            assert client.get("/healthz").status_code == 200
    finally:
        stop_process_group(proc)

    import sqlite3

    with sqlite3.connect(f"file:{proj / 'logs' / 'inference.sqlite'}?mode=ro", uri=True) as conn:
        norms = [r[0] for r in conn.execute("SELECT vector_norm FROM predictions ORDER BY ts")]
        kept = conn.execute("SELECT COUNT(*) FROM inputs WHERE modality = 'vector'").fetchone()[0]
        dims = {r[0]: r[1] for r in conn.execute("SELECT modality, MAX(dim) FROM embeddings GROUP BY modality")}
    assert len(norms) == 12 and all(n > 0 for n in norms) and kept == 12 and dims == {"vector": 2 * DIM, "text": 384}

    monitor = subprocess.run([sys.executable, "-m", "mmfusion.monitoring.monitor", "--root", str(proj)], cwd=proj,
                             env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert monitor.returncode in (0, 1), monitor.stderr[-3000:]
    verdicts = sorted((proj / "reports" / "monitor").rglob("*.json"))
    checked = json.dumps([json.loads(p.read_text()) for p in verdicts])
    assert "vector_norm" in checked and "[vector]" in checked, checked[:2000]

    export = subprocess.run([sys.executable, "-m", "mmfusion.monitoring.export", "--root", str(proj)], cwd=proj,
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert export.returncode == 0, export.stderr[-3000:]
    summary = json.loads(export.stdout)
    assert summary["usable"] == 9 and summary["modalities"] == ["text", "vector"]  # registration order
    exported = pd.concat([pd.read_csv(proj / "feedback" / part / "manifest.csv") for part in ("train", "holdout")])
    assert len(exported) == 9
    for rel in exported["vector"]:
        assert np.load(proj / "feedback" / ("train" if (proj / "feedback" / "train" / rel).exists() else "holdout") / rel).shape == (DIM,)
