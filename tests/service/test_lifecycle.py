"""Kill and restart a real server of its own: a killed worker comes back and leaves no uploads behind,
and SIGTERM lets in-flight requests finish before the server exits."""

from __future__ import annotations

import os
import signal
import sqlite3
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.service.conftest import png_bytes, start_server

pytestmark = pytest.mark.slow

PNG = png_bytes("fruit", 1)


def workers(proc) -> list[int]:
    return sorted(
        p.pid for p in psutil.Process(proc.pid).children(recursive=True) if _is_worker(p)
    )


def _is_worker(p) -> bool:
    """A live BentoML service worker (a killed one is a zombie until reaped)."""
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE and "_bentoml_impl.worker.service" in " ".join(p.cmdline())
    except psutil.Error:
        return False


def classify(url: str, i: int) -> int | str:
    try:
        resp = httpx.post(f"{url}/classify", files={"image": ("x.png", PNG, "image/png")}, data={"text": "red apple"},
                          headers={"x-request-id": f"life-{i}"}, timeout=60)  # fmt: skip
        return resp.status_code
    except httpx.TransportError as exc:
        return type(exc).__name__


def test_kill_9_then_sigterm_drain(packaged, tmp_path):
    env = {**packaged["env"], "MMFUSION_INFERENCE_LOG": str(tmp_path / "log.sqlite")}
    output = tmp_path / "serve.log"
    proc, url = start_server(packaged["report"]["bento_tag"], env, cwd=packaged["root"], output=output, timeout=420)
    try:
        before = workers(proc)
        assert len(before) == 2
        # kill -9 one worker: the other keeps answering; a new one replaces it and sweeps its uploads
        victim = before[0]
        stale = Path(tempfile.gettempdir()) / f"mmfusion-uploads-{victim}"
        assert stale.is_dir()
        (stale / "request-leftover").mkdir(exist_ok=True)  # what a kill during an upload leaves
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        assert classify(url, 0) == 200
        while time.monotonic() - t_kill < 180 and stale.exists():
            time.sleep(0.5)
        assert not stale.exists(), "the replacement worker did not sweep the dead worker's uploads"
        assert len(workers(proc)) == 2 and victim not in workers(proc)

        # SIGTERM under load: every request already in flight is answered, then the server exits
        with ThreadPoolExecutor(max_workers=16) as pool:
            futures = [pool.submit(classify, url, 100 + i) for i in range(16)]
            time.sleep(2.0)  # all 16 sent and in progress (the model answers one batch at a time)
            os.kill(proc.pid, signal.SIGTERM)
            codes = [f.result(timeout=120) for f in futures]
        proc.wait(timeout=60)
        assert codes == [200] * 16, codes
        with sqlite3.connect(tmp_path / "log.sqlite") as conn:
            logged = {r[0] for r in conn.execute("SELECT client_request_id FROM predictions")}
        assert {f"life-{100 + i}" for i in range(16)} <= logged
        assert "SIGTERM: draining" in output.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
