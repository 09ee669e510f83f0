"""One Prefect server for every e2e module: each module starting its own cost a server start (~6-13 s) apiece."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package")  # stopped after the last e2e test: an idle server still costs CPU
def server(tmp_path_factory):
    """A real Prefect server on 127.0.0.1 for the e2e tests' stage flows (`dvc repro`, `make run`, retrain); its URL.

    Shared, so it holds every e2e test's flow runs: a test that reads runs back filters for its own.
    """
    from flows.server import free_port, start_server, stop_server

    log = tmp_path_factory.mktemp("prefect") / "server.log"
    proc, api_url = start_server(free_port(), timeout=300, log_path=str(log))
    yield api_url
    stop_server(proc)
