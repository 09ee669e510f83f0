"""New modalities go the whole way: a `vector` modality added in one plugin module and the built-in `audio`
modality, with image and text, through manifest -> clean -> validate -> split -> featurize -> train ->
evaluate -> package (`make run`, as the README says) -> `/classify` and `/classify_batch` of the served Bento
-> inference log -> drift monitor (`make drift`) -> feedback -> export. Nothing outside `tests/e2e/toy_vector.py` is
edited for the vector (it is loaded into every process with `MMFUSION_PLUGINS`, as a user's plugin is).

The data: pictures, texts, tones and vectors whose class shows in each, rows without some of them, and
files clean must drop (a corrupt vector, a wrong-shape one, a silent clip, a clip that is not audio).
The monitor sees a window of ordinary requests, then one whose audio is noise: only audio is flagged.
The Makefile's install step is skipped (`make -o .venv/.installed`, `.venv` linked to this environment).
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

import soundfile as sf

from pathlib import Path

from mmfusion.procs import stop_process_group
from tests.conftest import CLASSES as PICTURES
from tests.conftest import draw_sample
from tests.e2e.explanations import TINY_EXPLAIN, check_explanations
from tests.e2e.test_pipeline import copy_project, project_env
from tests.service.conftest import start_server

pytestmark = pytest.mark.slow

PLUGIN = "tests.e2e.toy_vector"
DIM = 8  # toy_vector.DIM (never imported here: the registries are process-wide)
CLASSES = {"fruit": ["apple", "pear", "plum"], "plant": ["leaf", "fern", "moss"], "water": ["rain", "wave", "lake"]}
PITCH = {"fruit": 330.0, "plant": 660.0, "water": 1320.0}  # each class's tone
AUDIO_FORMATS = [("WAV", 16000), ("FLAC", 22050), ("OGG", 44100)]
VENV = Path(sys.executable).parent.parent


def make(proj: Path, env: dict, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    """`make ARGS` in the project, as a user types it (the install step taken as done)."""
    return subprocess.run(["make", "-o", ".venv/.installed", *args], cwd=proj, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def clip(label: str, rng: np.random.Generator, noise_only: bool = False, fmt: str = "WAV", sr: int = 16000) -> bytes:
    """A 1 s tone of the class's pitch with a little noise (or noise alone, the drifted audio), as `fmt`."""
    t = np.arange(sr) / sr
    wave = 0.05 * rng.normal(size=sr)
    if noise_only:
        wave = 0.3 * rng.normal(size=sr)
    else:
        wave += 0.3 * np.sin(2 * np.pi * PITCH[label] * (1 + 0.02 * rng.normal()) * t)
    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1, 1).astype(np.float32), sr, format=fmt)
    return buf.getvalue()


def picture(label: str, seed: int) -> bytes:
    buf = io.BytesIO()
    draw_sample(PICTURES[label][0], seed=seed).save(buf, format="PNG")
    return buf.getvalue()


def npy(vector) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(vector, dtype=np.float32))
    return buf.getvalue()


def class_vector(k: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(0.0, 0.3, DIM)
    v[k] += 2.0
    return v


def write_dataset(root) -> dict:
    """12 rows per class of four modalities (two rows each lack the text, the vector, the audio), and bad files."""
    rng = np.random.default_rng(0)
    for folder in ("vecs", "pics", "clips"):
        (root / folder).mkdir(parents=True)
    rows = []
    for k, (label, words) in enumerate(CLASSES.items()):
        for i in range(12):
            sid = f"{label}-{i:02d}"
            (root / "pics" / f"{sid}.png").write_bytes(picture(label, 100 * k + i))
            vector = audio = ""
            if i not in (10, 11):
                (root / "vecs" / f"{sid}.npy").write_bytes(npy(class_vector(k, rng)))
                vector = f"vecs/{sid}.npy"
            if i not in (6, 7):
                fmt, sr = AUDIO_FORMATS[i % 3]
                audio = f"clips/{sid}.{fmt.lower()}"
                (root / audio).write_bytes(clip(label, rng, fmt=fmt, sr=sr))
            text = "" if i in (8, 9) else f"{words[i % 3]} sample {i}"
            rows.append({"id": sid, "image": f"pics/{sid}.png", "vector": vector, "audio": audio, "text": text,
                         "label": label, "group": f"{label}-g{i // 2}"})  # fmt: skip
    (root / "vecs" / "corrupt.npy").write_bytes(b"\x93NUMPY not really")
    (root / "vecs" / "short.npy").write_bytes(npy(np.zeros(3)))
    (root / "clips" / "silent.wav").write_bytes(_silence())
    (root / "clips" / "junk.wav").write_bytes(b"RIFF but nothing else")
    for sid, column, rel in (("corrupt", "vector", "vecs/corrupt.npy"), ("short", "vector", "vecs/short.npy"),
                             ("silent", "audio", "clips/silent.wav"), ("junk", "audio", "clips/junk.wav")):  # fmt: skip
        rows.append({"id": sid, "image": "", "vector": "", "audio": "", "text": "", "label": "fruit", "group": "", column: rel})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return {"manifest": root / "manifest.csv", "rng": rng}


def _silence() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000, dtype=np.float32), 16000, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def project(tmp_path_factory, server):
    root = tmp_path_factory.mktemp("toy")
    proj = copy_project(root / "proj")
    data = write_dataset(root / "userdata")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["ingest"].update({"source": "manifest", "min_class_count": 1, "feedback_dir": ""})
    params["ingest"]["manifest"].update({"path": str(data["manifest"]), "group_column": "group"})
    params["validate"].update({"min_per_class": 3, "max_missing_modality_share": 0.5})
    params["split"].update({"val_fraction": 0.2, "test_fraction": 0.2})
    params["augment"]["views"] = 0
    params["featurize"].update({"encoders": {"image": "efficientnet_lite0", "text": "minilm_l6", "audio": "logmel_stats",
                                             "vector": "vector_stats"}, "runtime": "torch", "cache_dir": str(root / "cache")})  # fmt: skip
    params["train"].update({"strategies": ["audio_only", "vector_only", "text_only", "concat"], "epochs": 20,
                            "patience": 20, "hidden_dim": 32, "batch_size": 16, "warmup_epochs": 1, "lr": 3e-3})  # fmt: skip
    params["package"]["log"]["keep"] = {"image": 1.0, "audio": 1.0}
    params["evaluate"].update({"cv_folds": 3, "bootstrap": 50, "raw_check": 8, **TINY_EXPLAIN})
    params["package"].update({"workers": 1})
    params["monitor"].update({"min_rows": 10})
    params["monitor"]["window"].update({"by": "count", "size": 15})
    params["retrain"].update({"export_dir": "feedback", "auto": False})  # `make drift` checks; it starts no retrain
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (proj / ".venv").symlink_to(VENV)
    env = project_env(proj, server)  # the stage flows report to the e2e Prefect server (`make run` reuses it)
    env.update({"MMFUSION_PLUGINS": PLUGIN, "BENTOML_HOME": str(proj / ".bentoml")})  # the Makefile's store
    for key in list(env):  # nor this test session's mmfusion settings, nor the make it may run under
        if key.startswith(("MMFUSION_MODEL", "MMFUSION_INFERENCE_LOG", "MMFUSION_PARAMS", "MAKE", "MFLAGS")):
            env.pop(key)
    run = make(proj, env, "run")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {"proj": proj, "env": env, "root": root, "rng": data["rng"]}


def report(proj, name: str) -> dict:
    return json.loads((proj / "reports" / f"{name}.json").read_text())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_the_pipeline_runs_new_modalities_from_their_specs(project):
    proj = project["proj"]
    dropped = report(proj, "clean")["dropped_by_reason"]
    assert {"undecodable_vector", "silent_audio", "undecodable_audio"} <= set(dropped), dropped  # their own reasons
    config = json.loads((proj / "models" / "best" / "config.json").read_text())
    assert set(config["encoders"]) == {"image", "text", "audio", "vector"} and config["encoders"]["vector"]["dim"] == 2 * DIM
    assert config["inputs"]["audio"]["sample_rate"] == 16000  # serving decodes clips as training did
    rows = pd.read_csv(proj / "data" / "clean" / "manifest.csv", dtype=str, keep_default_na=False)
    assert rows["vector"].str.startswith("vectors/").sum() == 30 and rows["audio"].str.startswith("audio/").sum() == 30
    assert all(sf.info(str(proj / "data" / "clean" / p)).samplerate == 16000 for p in rows["audio"] if p)
    metrics = report(proj, "evaluate/metrics")
    assert set(metrics["strategies"]) == {"audio_only", "vector_only", "text_only", "concat"}
    for alone in ("audio_only", "vector_only"):  # each carries the class on its own
        assert metrics["strategies"][alone]["val"]["accuracy"] > 0.6, metrics["strategies"][alone]
    assert "audio_only" in (proj / "reports" / "evaluate" / "leaderboard.md").read_text()
    # the explanations page and the faithfulness check loop over the model's inputs: audio as time segments (a
    # coloured bar), the plugin's vector as one whole part (a chip), each modality's own deletion curves
    page, shown, faithfulness = check_explanations(proj)
    assert 'class="bar"' in page or not shown["audio"].astype(bool).any()
    assert 'class="chip"' in page or not shown["vector"].astype(bool).any()
    assert "audio" in faithfulness["modalities"]
    assert set(faithfulness["modalities"]) <= {"image", "text", "audio", "vector"}


def item(label: str, k: int, rng, noisy_audio: bool = False, seed: int = 0) -> dict:
    """One request's fields: a picture, a text, a clip and a vector of class `label`."""
    return {"image": picture(label, 1000 + seed), "text": f"{CLASSES[label][seed % 3]} today",
            "audio": clip(label, rng, noise_only=noisy_audio, fmt="FLAC", sr=22050), "vector": npy(class_vector(k, rng))}  # fmt: skip


def send_window(client, rng, noisy_audio: bool) -> list[tuple[str, str]]:
    """15 requests: 9 /classify with every field, one /classify_batch of 6 (base64 files; some lack fields)."""
    ids = []
    for k, label in enumerate(CLASSES):
        for i in range(3):
            fields = item(label, k, rng, noisy_audio, seed=i)
            files = {m: (f"{m}.bin", fields[m], "application/octet-stream") for m in ("image", "audio", "vector")}
            resp = client.post("/classify", files=files, data={"text": fields["text"]})
            assert resp.status_code == 200, resp.text
            assert sorted(resp.json()["modalities"]) == ["audio", "image", "text", "vector"]
            ids.append((resp.json()["request_id"], label))
    batch = []
    for k, label in enumerate(CLASSES):
        fields = item(label, k, rng, noisy_audio, seed=k)
        batch.append({"image": b64(fields["image"]), "audio": b64(fields["audio"]), "text": fields["text"]})
        batch.append({"vector": b64(fields["vector"]), "audio": b64(fields["audio"])})
    resp = client.post("/classify_batch", json={"items": batch})
    assert resp.status_code == 200, resp.text
    assert [sorted(r["modalities"]) for r in resp.json()["results"]] == [["audio", "image", "text"], ["audio", "vector"]] * 3
    return ids


def test_the_served_bento_takes_logs_monitors_and_exports_new_modalities(project):
    proj, env, rng = project["proj"], project["env"], project["rng"]
    package = report(proj, "package")
    assert package["log_keeps"] == {"image": 1.0, "text": 1.0, "audio": 1.0, "vector": 1.0}
    proc, url = start_server(package["bento_tag"], env, cwd=proj, output=proj / "serve.log")
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            doc = client.get("/docs.json").json()
            form = doc["paths"]["/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
            assert {"image", "text", "audio", "vector"} <= set(form["properties"])
            ids = send_window(client, rng, noisy_audio=False)
            hostile = {  # each answered 4xx with its reason, and the server keeps serving
                "png_as_audio": ({"audio": ("a.wav", picture("fruit", 1), "audio/wav")}, 415, "unsupported_audio"),
                "wav_as_image": ({"image": ("a.png", clip("fruit", rng), "image/png")}, 400, "undecodable_image"),
                "truncated_flac": ({"audio": ("a.flac", clip("fruit", rng, fmt="FLAC")[:600], "audio/flac")}, 400, "corrupt_audio"),
                "wrong_vector": ({"vector": ("x.npy", npy(np.zeros(3)), "application/octet-stream")}, 400, "invalid_vector"),
            }  # fmt: skip
            for name, (files, status, reason) in hostile.items():
                bad = client.post("/classify", files=files)
                assert (bad.status_code, bad.json().get("reason")) == (status, reason), (name, bad.text)
            send_window(client, rng, noisy_audio=True)  # the audio drifts: noise instead of tones
            for request_id, label in ids:
                fb = client.post("/feedback", json={"request_id": request_id, "item": 0, "label": label})
                assert fb.status_code == 200 and fb.json()["usable_for_retraining"], fb.text
            assert client.get("/healthz").status_code == 200
    finally:
        stop_process_group(proc)

    import sqlite3

    with sqlite3.connect(f"file:{proj / 'logs' / 'inference.sqlite'}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT vector_norm, audio_seconds, audio_sample_rate FROM predictions ORDER BY ts").fetchall()
        kept = dict(conn.execute("SELECT modality, COUNT(*) FROM inputs GROUP BY modality").fetchall())
        dims = dict(conn.execute("SELECT modality, MAX(dim) FROM embeddings GROUP BY modality").fetchall())
    assert len(rows) == 30 and all(r[1] == pytest.approx(1.0, abs=0.01) and r[2] == 22050 for r in rows)
    assert kept == {"image": 24, "text": 24, "audio": 30, "vector": 24}
    assert dims == {"image": 1280, "text": 384, "audio": 128, "vector": 2 * DIM}

    monitor = make(proj, env, "drift", timeout=300)
    assert monitor.returncode in (0, 1), monitor.stderr[-3000:]
    verdicts = {p.stem: json.loads(p.read_text()) for p in (proj / "reports" / "monitor").rglob("w*.json")}
    first, second = (verdicts[k] for k in sorted(verdicts))
    names = [c["name"] for c in second["checks"]]
    assert any("vector_norm" in n for n in names) and any("[vector]" in n for n in names), names
    # The two windows differ only in their audio (requests are not the training rows, so a small window may
    # differ from the reference elsewhere too, in both): what the second flags anew is audio, and the model's
    # outputs the noisy audio moved, nothing else
    new = set(second["flagged"]) - set(first["flagged"])
    assert "embedding_drift[audio]" in new or "input_audio_dbfs" in new, (first["flagged"], second["flagged"])
    assert not [n for n in new if "audio" not in n and n not in ("confidence_drift", "prediction_drift")], new

    export = subprocess.run([sys.executable, "-m", "mmfusion.monitoring.export", "--root", str(proj)], cwd=proj,
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert export.returncode == 0, export.stderr[-3000:]
    summary = json.loads(export.stdout)
    assert summary["usable"] == 9 and summary["modalities"] == ["image", "text", "audio", "vector"]  # registration order
    parts = {part: pd.read_csv(proj / "feedback" / part / "manifest.csv") for part in ("train", "holdout")}
    assert sum(len(df) for df in parts.values()) == 9
    for part, df in parts.items():
        for rel in df["vector"]:
            assert np.load(proj / "feedback" / part / rel).shape == (DIM,)
        for rel in df["audio"]:
            assert sf.info(str(proj / "feedback" / part / rel)).format == "FLAC"
