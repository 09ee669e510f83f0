"""Prefect's server on the same PostgreSQL database as the inference log (PREFECT_API_DATABASE_CONNECTION_URL), so
a team's flow runs live next to their inference log: both schemas side by side (Prefect's Alembic table is
`alembic_version`, the log's `mmfusion_log_version`), a real flow run recorded there, the log untouched."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import sqlalchemy as sa

from mmfusion import logdb
from mmfusion.monitoring.inference_log import InferenceLog, InferenceRecord, read_inference_log
from mmfusion.procs import free_port, start_until_ready, stop_process_group

pytestmark = pytest.mark.slow

FLOW = """
from prefect import flow

@flow(name="pg-smoke")
def smoke(x: int) -> int:
    return x + 1

state = smoke(41, return_state=True)
print(state.type.value, state.result())
"""


def test_prefect_server_and_the_inference_log_share_one_postgresql_database(postgres, tmp_path):
    url = postgres.create_database("team")
    InferenceLog(url).append([InferenceRecord(request_id="r1", item=0, endpoint="classify", model_version="v1",
                                              label="fruit", probabilities={"fruit": 1.0})])  # fmt: skip
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_DATABASE_CONNECTION_URL": url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = start_until_ready(cmd, f"{api_url}/health", tmp_path / "prefect-server.log", 240, env=env)
    try:
        run = subprocess.run([sys.executable, "-c", FLOW], env={**env, "PREFECT_API_URL": api_url},
                             capture_output=True, text=True, timeout=180)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.split()[-2:] == ["COMPLETED", "42"], run.stdout[-1000:]
    finally:
        stop_process_group(server)

    with logdb.engine(url).connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        assert {"alembic_version", "mmfusion_log_version", "flow_run", "predictions", "feedback"} <= tables
        runs = conn.execute(sa.text("SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id")).fetchall()
        assert [(name, str(state)) for name, state in runs] == [("pg-smoke", "COMPLETED")]
        assert logdb.current_revision(conn) == logdb.head_revision()
    assert list(read_inference_log(url)["request_id"]) == ["r1"]
    assert postgres.password not in (tmp_path / "prefect-server.log").read_text(errors="replace")
