"""One inference log for many replicas, on a real PostgreSQL server: two `bentoml serve` processes of the
built Bento on two ports (as replicas behind one address would be) write to one database; feedback
posted to one replica labels a request the other answered; the monitor reads windows across both, and
the export finds the labelled row. A server that is down stops `bentoml serve` in one line.

The password travels only in the environment (MMFUSION_INFERENCE_LOG); it must never show in the
servers' output, /health, or the monitor's reports.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from mmfusion.config import parse_params
from mmfusion import logdb
from mmfusion.monitoring.export import export_feedback
from mmfusion.monitoring.inference_log import read_inference_log
from mmfusion.monitoring.monitor import run_monitor
from mmfusion.procs import free_port, stop_process_group
from tests.service.conftest import START_TIMEOUT_S, start_server
from tests.service.test_monitor_service import build_tiny_reference, png_b64, sample

pytestmark = pytest.mark.slow
ROWS_PER_REPLICA = 12


@pytest.fixture(scope="module")
def shared_log(postgres):
    return postgres.create_database("replicas")


@pytest.fixture(scope="module")
def replicas(packaged, shared_log, tmp_path_factory):
    """Two replicas of the packaged Bento, one worker each, sharing the PostgreSQL log."""
    root = tmp_path_factory.mktemp("replicas")
    env = {**packaged["env"], logdb.URL_ENV: shared_log.render_as_string(hide_password=False), "MMFUSION_WORKERS": "1"}
    started = []
    try:
        for name in ("a", "b"):
            output = root / f"serve-{name}.log"
            proc, url = start_server(packaged["report"]["bento_tag"], env, cwd=packaged["root"], output=output,
                                     timeout=START_TIMEOUT_S)  # fmt: skip
            started.append({"name": name, "proc": proc, "url": url, "output": output})
        yield started
    finally:
        for r in started:
            stop_process_group(r["proc"])


def classify(url: str, i: int, prefix: str) -> dict:
    label = sorted(("fruit", "plant", "water"))[i % 3]
    img, text = sample(label, i, seed=7000 + i)
    answer = httpx.post(f"{url}/classify_batch", json={"items": [{"image": png_b64(img), "text": text}]},
                        headers={"x-request-id": f"{prefix}-{i:03d}"}, timeout=60)  # fmt: skip
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_two_replicas_one_log_feedback_across_them_and_the_monitor_reads_both(replicas, shared_log, packaged, postgres, tmp_path):
    a, b = replicas
    answered = {r["name"]: [classify(r["url"], i, f"rep-{r['name']}") for i in range(ROWS_PER_REPLICA)] for r in replicas}

    # feedback sent to replica b labels a request that replica a answered (and the other way round)
    from_a = answered["a"][0]["request_id"]
    fb = httpx.post(f"{b['url']}/feedback", json={"request_id": from_a, "label": "fruit"}, timeout=60)
    assert fb.status_code == 200 and fb.json()["status"] == "stored", fb.text
    from_b = answered["b"][1]["request_id"]
    fb = httpx.post(f"{a['url']}/feedback", json={"request_id": from_b, "label": "plant"}, timeout=60)
    assert fb.status_code == 200, fb.text

    df = read_inference_log(shared_log)
    ours = df[df["client_request_id"].str.startswith("rep-")]
    assert len(ours) == 2 * ROWS_PER_REPLICA and ours["request_id"].is_unique
    by_replica = ours.groupby(ours["client_request_id"].str[:5])["pid"].unique()
    assert len(by_replica["rep-a"]) == 1 and len(by_replica["rep-b"]) == 1 and by_replica["rep-a"][0] != by_replica["rep-b"][0]
    assert (ours["host"] != "").all()

    # /health on either replica counts the whole log; the URL it shows is masked
    health = httpx.post(f"{a['url']}/health", timeout=30).json()["service"]
    assert health["workers"] == 1 and health["inference_log"]["rows"] >= 2 * ROWS_PER_REPLICA
    assert "***" in health["inference_log"]["url"] and postgres.password not in health["inference_log"]["url"]

    # the monitor reads one window across both replicas
    model_dir = tmp_path / "model"
    shutil.copytree(packaged["root"] / "models" / "best", model_dir)
    build_tiny_reference(model_dir, tmp_path / "ref")
    params = parse_params({"monitor": {
        "model_dir": str(model_dir), "log_url": shared_log.render_as_string(hide_password=False),
        "model_version": "any", "window": {"by": "count", "size": 2 * ROWS_PER_REPLICA}, "min_rows": 10, "plot_rows": 20,
        "out_dir": str(tmp_path / "reports"), "history_path": str(tmp_path / "monitor.sqlite"),
        "workspace": str(tmp_path / "workspace"),
    }})  # fmt: skip
    summary = run_monitor(params, tmp_path)
    window = summary["windows"][0]
    assert window["verdict"] in ("ok", "warning", "drift") and window["rows"] == 2 * ROWS_PER_REPLICA
    assert len(window["replicas"]) == 2 and sum(window["replicas"].values()) == 2 * ROWS_PER_REPLICA, window
    written = "".join(p.read_text(errors="replace") for p in (tmp_path / "reports").rglob("*") if p.is_file())
    assert postgres.password not in written and postgres.password not in str(summary)

    # the export reads the labelled rows from the shared log (texts are kept by default; images are not)
    exported = export_feedback(parse_params({"monitor": {"log_url": shared_log.render_as_string(hide_password=False)},
                                             "ingest": {"feedback_dir": ""}, "retrain": {"export_dir": str(tmp_path / "fb")}}),
                               tmp_path)  # fmt: skip
    assert exported["feedback"] == 2 and exported["usable"] + sum(exported["not_usable"].values()) == 2
    assert "***" in exported["log"] and postgres.password not in str(exported)

    for r in replicas:
        assert postgres.password not in r["output"].read_text(errors="replace")


def test_a_log_server_that_is_down_stops_serve_in_one_line(packaged, postgres, tmp_path):
    down = postgres.url("nowhere").set(port=free_port())  # nothing listens there
    env = {**packaged["env"], logdb.URL_ENV: down.render_as_string(hide_password=False), "MMFUSION_WORKERS": "1"}
    cmd = [sys.executable, "-m", "bentoml", "serve", packaged["report"]["bento_tag"], "--host", "127.0.0.1",
           "--port", str(free_port())]  # fmt: skip
    proc = subprocess.run(cmd, cwd=packaged["root"], env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    lines = [line for line in out.splitlines() if "inference log" in line]
    assert lines and lines[-1].startswith("mmfusion: inference log postgresql+psycopg://mmfusion:***@"), out[-2000:]
    assert "cannot connect" in lines[-1] and "Traceback" not in out and postgres.password not in out
