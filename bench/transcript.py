"""The commands a bench script runs, one after another: each timed, its output appended to one log as it runs.

    tr = Transcript(Path("bench/results/loop-transcript.txt"))   # starts the log empty
    tag = tr.run("live_tag", [py, "-m", "mmfusion.serving.promotion", "live-tag"], proj, env).strip()
    tr.seconds   # {"live_tag": 3.1}

stdout is returned (and copied to the log line by line); stderr goes straight to the log, so an
11-minute `dvc repro` can be followed with `tail -f`. A failed command raises with the log's tail.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path


class CommandFailed(RuntimeError):
    """A command of the transcript exited non-zero (or ran past its timeout)."""


class Transcript:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.seconds: dict[str, float] = {}

    def run(self, name: str, cmd: list[str], cwd: Path, env: dict, timeout: float = 3600) -> str:
        shown = " ".join(Path(c).name if i == 0 else str(c) for i, c in enumerate(cmd))
        print(f"$ {shown}", flush=True)
        t0 = time.perf_counter()
        out: list[str] = []
        with self.path.open("a") as log:
            log.write(f"$ {shown}\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
            timer = threading.Timer(timeout, proc.kill)
            timer.start()
            try:
                for line in proc.stdout:
                    out.append(line)
                    log.write(line)
                    log.flush()
                proc.wait()
            finally:
                timer.cancel()
            log.write("\n")
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0:
            tail = self.path.read_text()[-4000:]
            raise CommandFailed(f"{shown} failed ({proc.returncode}); see {self.path}:\n{tail}")
        return "".join(out)
