"""`make monitor-ui`: the Evidently UI over the monitoring workspace (monitor.workspace), on 127.0.0.1.

The UI's JavaScript is served from the installed evidently package: it works offline.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from mmfusion import paths
from mmfusion.config import load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmfusion.monitoring.ui", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    workspace = paths.resolve(Path(args.root), load_params(args.params).monitor.workspace)
    if not workspace.exists():
        print(f"monitor-ui: error: no monitoring workspace at {workspace} yet: run `make drift` first", file=sys.stderr)
        return 2
    print(f"Evidently UI: http://127.0.0.1:{args.port}  (workspace {workspace}); Ctrl-C stops it", flush=True)
    cmd = [str(Path(sys.executable).with_name("evidently")), "ui", "--workspace", str(workspace),
           "--host", "127.0.0.1", "--port", str(args.port)]  # fmt: skip
    try:
        return subprocess.call(cmd, env={**os.environ, "DO_NOT_TRACK": "1"})
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
