"""`make ui`: a Prefect server on 127.0.0.1 plus a process serving the `pipeline` and `monitor` deployments.

Open the printed URL, go to Deployments -> pipeline/pipeline -> Run, optionally with
parameters such as overrides=["train.lr=0.0003"]. monitor/monitor runs every
`monitor.schedule_minutes` (and on its Run button) and may start retrain/retrain by the
`retrain:` policy; retrain/retrain also runs on its Run button. Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.ui", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4200, help="Prefect server port on 127.0.0.1 (default 4200)")
    parser.add_argument("--no-server", action="store_true", help="use the server at PREFECT_API_URL instead of starting one")
    args = parser.parse_args(argv)

    from flows.server import start_server, stop_server

    server = None
    if not args.no_server:
        home = os.environ.setdefault("PREFECT_HOME", ".prefect")
        os.makedirs(home, exist_ok=True)
        server, api_url = start_server(args.port, log_path=os.path.join(home, "server.log"))
        os.environ["PREFECT_API_URL"] = api_url
        print(f"Prefect UI: http://127.0.0.1:{args.port}  (deployments: pipeline/pipeline, monitor/monitor, retrain/retrain)", flush=True)
    elif not os.environ.get("PREFECT_API_URL"):
        parser.error("--no-server needs PREFECT_API_URL")
    try:
        from prefect import serve

        from flows.monitor import monitor  # imported after PREFECT_API_URL is set
        from flows.pipeline import pipeline
        from flows.retrain import retrain
        from mmfusion.config import load_params

        minutes = load_params("params.yaml").monitor.schedule_minutes
        serve(
            pipeline.to_deployment(name="pipeline", description="dvc repro (or dvc exp run -S ...) of the whole mmfusion pipeline"),
            monitor.to_deployment(
                name="monitor",
                description="drift check of the inference log vs the served model's reference (Evidently)",
                interval=minutes * 60 if minutes > 0 else None,
            ),
            retrain.to_deployment(
                name="retrain",
                description="labelled feedback -> new raw data version -> dvc repro -> champion vs challenger",
            ),
        )
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            stop_server(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
