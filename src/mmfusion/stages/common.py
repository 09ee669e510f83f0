"""What every stage module shares: JSON reports, fresh output folders, and the tiny CLI."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path


from mmfusion.config import Params, load_params
from mmfusion.errors import UserError
from mmfusion.paths import fresh_dir, write_json  # noqa: F401 - every stage writes with these

log = logging.getLogger("mmfusion")

# Errors that mean "your input, params or order of stages are wrong": one line, no traceback.
# Anything else (a bare ValueError included) is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, PermissionError)


def report_user_error(stage: str, exc: BaseException) -> int:
    """Print a user error as one line on stderr; returns the exit code (2, or the error's own)."""
    print(f"{stage}: error: {exc}", file=sys.stderr)
    return getattr(exc, "exit_code", 2)



def stage_main(name: str, run: Callable[[Params, Path], dict], argv: list[str] | None = None) -> int:
    """`python -m mmfusion.stages.<name>`: run one stage without Prefect (for debugging)."""
    parser = argparse.ArgumentParser(prog=f"python -m mmfusion.stages.{name}", description=(run.__doc__ or "").strip())
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--root", default=".", help="project root holding data/ and reports/ (default: .)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = run(load_params(args.params), Path(args.root))
    except USER_ERRORS as exc:
        return report_user_error(name, exc)
    print(json.dumps(summary, indent=2, default=str))
    return 0
