"""The whole loop on a tiny dataset, with the real parts: `dvc repro`, a served Bento on 127.0.0.1,
classify, feedback (and its 4xx errors), export, the `retrain` flow (a real `dvc repro` on the merged
raw data), champion vs challenger, promotion; then a worse challenger that is rejected, and a rollback."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

from mmfusion.procs import free_port, start_until_ready, stop_process_group
from tests.conftest import CLASSES, draw_sample, write_tiny_dataset
from mmfusion.project import project_env
from tests.e2e.test_pipeline import copy_project

pytestmark = pytest.mark.slow
DVC = str(Path(sys.executable).with_name("dvc"))


def _png(label: str, seed: int) -> bytes:
    buf = io.BytesIO()
    draw_sample(CLASSES[label][0], seed=seed, size=48).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def loop(tmp_path_factory, server):
    root = tmp_path_factory.mktemp("loop")
    proj = copy_project(root / "proj")
    manifest = write_tiny_dataset(root / "userdata", per_class=10, extras=False)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["ingest"].update({"source": "manifest", "min_class_count": 1})
    params["ingest"]["manifest"].update({"path": str(manifest), "group_column": "group"})
    params["validate"]["min_per_class"] = 3
    params["split"].update({"val_fraction": 0.2, "test_fraction": 0.2})
    params["augment"]["views"] = 0
    params["featurize"]["runtime"] = "torch"  # each retrain's new train set would calibrate int8 again
    params["train"].update({"strategies": ["concat"], "epochs": 25, "patience": 25, "hidden_dim": 32, "batch_size": 16})
    # CV selection stays: with holdout (one split's luck on this tiny set) a retrained challenger scored 0.83
    # against the champion's 1.0 on the test split in one CI run and was rightly not promoted
    params["evaluate"].update({"bootstrap": 50, "raw_check": 0, "explain_rows": 0, "faithfulness_rows": 0})  # off
    params["package"].update({"workers": 1, "smoke_test": False})
    params["package"]["log"]["keep"] = {"image": 1.0}
    params["retrain"].update({"holdout_fraction": 0.25})
    params["retrain"]["promotion"].update({"test_tolerance": 0.05, "holdout_tolerance": 0.05})
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = project_env(proj, PREFECT_API_URL=server, BENTOML_HOME=root / "bentoml")  # the e2e Prefect server
    for key in ("MMFUSION_MODEL", "MMFUSION_INFERENCE_LOG", "MMFUSION_PARAMS"):
        env.pop(key, None)
    return {"proj": proj, "env": env}


def run(loop, *cmd, timeout=600) -> subprocess.CompletedProcess:
    out = subprocess.run(list(cmd), cwd=loop["proj"], env=loop["env"], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out


def live(proj: Path) -> dict:
    return json.loads((proj / "reports" / "live.json").read_text())


def test_the_loop(loop):
    proj, env = loop["proj"], loop["env"]
    py = sys.executable
    run(loop, DVC, "repro")
    first = run(loop, py, "-m", "mmfusion.serving.promotion", "compare")
    assert "PROMOTED" in first.stdout and "no live champion yet" in first.stdout
    champion = live(proj)["live"]["bento_tag"]
    test_before = (proj / "data" / "split" / "test.csv").read_text()

    # serve the live Bento, classify new samples, label them
    tag = run(loop, py, "-m", "mmfusion.serving.promotion", "live-tag").stdout.strip()
    assert tag == champion
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_until_ready([py, "-m", "bentoml", "serve", tag, "--host", "127.0.0.1", "--port", str(port)],
                               f"{url}/readyz", proj / "serve.log", 180, cwd=proj, env=env)  # fmt: skip
    try:
        labelled = []
        for i in range(8):
            label = sorted(CLASSES)[i % 3]
            r = httpx.post(f"{url}/classify", files={"image": ("x.png", _png(label, 500 + i), "image/png")},
                           data={"text": f"{CLASSES[label][1][i % 5]} seen in production"}, timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text
            labelled.append((r.json()["request_id"], label))
        batch = httpx.post(f"{url}/classify_batch", json={"items": [
            {"image": base64.b64encode(_png("water", 900)).decode(), "text": "blue water drop"},
            {"text": "green leaf, text only"}]}, timeout=60)  # fmt: skip
        assert batch.status_code == 200, batch.text
        bid = batch.json()["request_id"]
        for rid, label in labelled:
            r = httpx.post(f"{url}/feedback", json={"request_id": rid, "label": label}, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["usable_for_retraining"] is True
        r = httpx.post(f"{url}/feedback", json={"request_id": bid, "item": 1, "label": "plant"}, timeout=30)
        # a text-only request whose text was kept is a training row (every input it had was kept)
        assert r.status_code == 200 and r.json()["usable_for_retraining"] is True, r.text
        r = httpx.post(f"{url}/feedback", json={"request_id": bid, "item": 0, "label": "water"}, timeout=30)
        assert r.status_code == 200 and r.json()["usable_for_retraining"] is True
        errors = [
            ({"request_id": "no-such-request", "label": "fruit"}, 404, "unknown_request"),
            ({"request_id": labelled[0][0], "label": "banana"}, 400, "unknown_label"),
            ({"request_id": labelled[0][0], "label": "plant"}, 409, "duplicate_feedback"),
            ({"request_id": bid, "item": 7, "label": "plant"}, 404, "unknown_item"),
        ]
        for body, status, reason in errors:
            r = httpx.post(f"{url}/feedback", json=body, timeout=30)
            assert r.status_code == status and r.json()["reason"] == reason, r.text
    finally:
        stop_process_group(server)

    # retrain: export, dvc repro on the merged raw data, compare, promote
    out = run(loop, py, "-m", "flows.retrain", timeout=900)
    record = yaml.safe_load(out.stdout[out.stdout.index("raw_before"):])
    assert record["raw_before"] and record["raw_after"] and record["raw_before"] != record["raw_after"]
    raw = pd.read_csv(proj / "data" / "raw" / "manifest.csv")
    assert (raw["source"] == "feedback").sum() == 7  # 10 usable, newest 25% (3) held out
    assert (raw["source"] != "feedback").sum() == 30  # nothing of the old data lost
    assert (proj / "data" / "split" / "test.csv").read_text() == test_before  # the fixed test split
    train = pd.read_csv(proj / "data" / "split" / "train.csv")
    assert (train["source"] == "feedback").sum() == 7
    assert len(pd.read_csv(proj / "feedback" / "holdout" / "manifest.csv")) == 3
    report = json.loads((proj / "reports" / "retrain" / "latest.json").read_text())
    assert set(report["scores"]["challenger"]) == {"test", "holdout"}
    assert report["scores"]["challenger"]["holdout"]["rows"] == 3
    assert report["promoted"] is True, report["decision"]
    state = live(proj)
    assert state["live"]["bento_tag"] != champion and state["previous"][0]["bento_tag"] == champion
    events = [json.loads(line) for line in (proj / "logs" / "retrain.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "done"]

    # a worse challenger (one epoch at a tiny learning rate) is rejected: the live Bento is untouched
    promoted = state["live"]["bento_tag"]
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train"].update({"epochs": 1, "lr": 1e-7, "warmup_epochs": 0})
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(loop, py, "-m", "flows.retrain", timeout=900)
    report = json.loads((proj / "reports" / "retrain" / "latest.json").read_text())
    assert report["promoted"] is False and report["decision"]["reason"].startswith("rejected"), report["decision"]
    assert live(proj)["live"]["bento_tag"] == promoted
    assert json.loads((proj / "reports" / "package.json").read_text())["bento_tag"] != promoted
    assert run(loop, py, "-m", "mmfusion.serving.promotion", "live-tag").stdout.strip() == promoted

    # roll back to the first champion
    shown = run(loop, py, "-m", "mmfusion.serving.promotion", "rollback").stdout
    assert live(proj)["live"]["bento_tag"] == champion and f"rolled back: {promoted}" in shown
