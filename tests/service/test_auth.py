"""The write credential on the real served Bento: a token from a mounted secret file, /classify protected for
this deployment (MMFUSION_AUTH_CLASSIFY), 401/403 JSON answers before any body is read, counted in
/health, and no refused request, token or wrong token in the inference log or the server's output."""

from __future__ import annotations

import sqlite3

import httpx
import pytest

from tests.service.conftest import START_TIMEOUT_S, png_bytes, start_server
from mmfusion.procs import stop_process_group

pytestmark = pytest.mark.slow
TOKEN = "svc-token-" + "7" * 24
WRONG = "not-the-token-" + "3" * 20


@pytest.fixture(scope="module")
def guarded(packaged, tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    secret = root / "secret" / "token"
    secret.parent.mkdir()
    secret.write_text(TOKEN + "\n")
    env = {**packaged["env"], "MMFUSION_API_TOKEN_FILE": str(secret), "MMFUSION_AUTH_CLASSIFY": "true",
           "MMFUSION_INFERENCE_LOG": str(root / "log.sqlite")}  # fmt: skip
    output = root / "serve.log"
    proc, url = start_server(packaged["report"]["bento_tag"], env, cwd=packaged["root"], output=output, timeout=START_TIMEOUT_S)
    yield {"url": url, "output": output, "log": root / "log.sqlite"}
    stop_process_group(proc)


def test_writes_and_classify_need_the_token(guarded):
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=guarded["url"], timeout=60) as client:
        files = {"image": ("x.png", png_bytes("fruit", 1), "image/png")}
        none = client.post("/classify", files=files, data={"text": "red apple"})
        assert none.status_code == 401 and none.json()["reason"] == "missing_token", none.text
        assert none.headers["www-authenticate"].startswith("Bearer")
        wrong = client.post("/classify", files=files, data={"text": "red apple"}, headers={"Authorization": f"Bearer {WRONG}"})
        assert wrong.status_code == 403 and wrong.json()["reason"] == "wrong_token", wrong.text
        batch = client.post("/classify_batch", json={"items": [{"text": "red apple"}]})
        assert batch.status_code == 401
        ok = client.post("/classify", files=files, data={"text": "red apple"}, headers=bearer)
        assert ok.status_code == 200, ok.text
        request_id = ok.json()["request_id"]

        label = {"request_id": request_id, "label": "fruit"}
        assert client.post("/feedback", json=label).status_code == 401
        assert client.post("/feedback", json=label, headers={"Authorization": f"Bearer {WRONG}"}).status_code == 403
        assert client.post("/feedback", json=label, headers={"Authorization": TOKEN}).status_code == 403  # no scheme
        stored = client.post("/feedback", json=label, headers=bearer)
        assert stored.status_code == 200 and stored.json()["status"] == "stored", stored.text

        # each worker counts its own refusals: ask /health on fresh connections until both workers answered
        # (one keep-alive connection stays with one worker), then their counts add up to the 6 refusals above
        by_worker = {}
        for _ in range(60):
            worker = httpx.post(f"{guarded['url']}/health", headers={"connection": "close"}, timeout=30).json()["worker"]
            assert worker["auth"]["token"] and worker["auth"]["needs_token"] == ["/classify", "/classify_batch", "/feedback"]
            by_worker[worker["pid"]] = worker["auth"]["refused"]
            if len(by_worker) == 2:
                break
        assert len(by_worker) == 2, by_worker
        totals = {k: sum(r.get(k, 0) for r in by_worker.values()) for k in ("missing_token", "wrong_token")}
        assert totals == {"missing_token": 3, "wrong_token": 3}, by_worker
        assert client.post("/metadata").status_code == 200  # reads that change nothing stay open

    with sqlite3.connect(f"file:{guarded['log']}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT request_id FROM predictions").fetchall()
        feedback = conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
    assert rows == [(request_id,)] and feedback == 1  # refused requests never reached the model or the log
    text = guarded["output"].read_text(errors="replace")
    assert "missing_token" in text and "wrong_token" in text  # one WARNING line per refusal
    assert TOKEN not in text and WRONG not in text
    assert TOKEN not in guarded["log"].read_bytes().decode("latin-1")
