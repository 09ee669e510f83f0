"""`make monitor-ui`: the Evidently UI over the monitoring workspace (monitor.workspace), on 127.0.0.1.

The UI's JavaScript is served from the installed evidently package: it works offline. The same server serves
the windows' full HTML reports (monitor.out_dir) under REPORTS_ROUTE, so the link each window's snapshot opens
with (`report.link_report`) leads to its report: the UI's Markdown keeps no file: links, and a page served over
http may not open one anyway.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mmfusion import paths
from mmfusion.config import load_params
from mmfusion.monitoring.report import REPORTS_ROUTE


def create_ui_app(workspace: Path, reports: Path, host: str = "127.0.0.1", port: int = 8000):
    """The Evidently UI's app (as `evidently ui` builds it) with monitor.out_dir served under REPORTS_ROUTE."""
    from evidently.ui.service.app import create_app, get_config
    from litestar.static_files import create_static_files_router

    app = create_app(get_config(host=host, port=port, workspace=str(workspace)))
    Path(reports).mkdir(parents=True, exist_ok=True)
    app.register(create_static_files_router(REPORTS_ROUTE, directories=[str(reports)]))
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmfusion.monitoring.ui", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    monitor = load_params(args.params).monitor
    workspace = paths.resolve(Path(args.root), monitor.workspace)
    if not workspace.exists():
        print(f"monitor-ui: error: no monitoring workspace at {workspace} yet: run `make drift` first", file=sys.stderr)
        return 2
    os.environ["DO_NOT_TRACK"] = "1"  # before evidently is imported
    import uvicorn

    app = create_ui_app(workspace, paths.resolve(Path(args.root), monitor.out_dir), port=args.port)
    print(f"Evidently UI: http://127.0.0.1:{args.port}  (workspace {workspace}); Ctrl-C stops it", flush=True)
    try:
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
