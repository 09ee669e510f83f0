"""One Prefect flow per pipeline stage, each running the stage's work as a Prefect task.

DVC calls `python -m flows.stages <stage>`: DVC decides whether a stage must run,
Prefect records how it ran (a flow run with its logs, visible in the UI when
PREFECT_API_URL points at a server; an ephemeral local server otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mmfusion")

from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from mmfusion.config import ComputeParams, load_params  # noqa: E402
from mmfusion.errors import UserError  # noqa: E402
from mmfusion.stages import STAGES  # noqa: E402
from mmfusion.stages.common import USER_ERRORS, report_user_error  # noqa: E402


def _summary_markdown(name: str, summary: dict) -> str:
    lines = [f"# {name}", "", "| key | value |", "|---|---|"]
    for key, value in summary.items():
        text = json.dumps(value, default=str)
        lines.append(f"| {key} | {text if len(text) < 300 else text[:297] + '...'} |")
    return "\n".join(lines)


def build_stage_flow(name: str, compute: ComputeParams | None = None):
    """The Prefect flow for stage `name`: load params, run the stage task, attach a summary artifact.

    A stage that maps tasks (featurize shards, training trials) gets its task runner from `compute`
    (params.yaml's `compute:`): on `engine: dask` its tasks run on the Dask cluster.
    """
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    module = importlib.import_module(f"mmfusion.stages.{name}")
    stage_task = task(module.run, name=name, cache_policy=NO_CACHE, persist_result=False)
    # only a stage that maps tasks has its own build_task_runner (the others would pay a cluster's start for nothing)
    build_runner = getattr(module, "build_task_runner", None)
    runner = build_runner(compute) if compute is not None and build_runner is not None else None

    @flow(name=name, description=(module.__doc__ or "").strip(), log_prints=True, persist_result=False,
          task_runner=runner)  # fmt: skip
    def stage_flow(params_path: str = "params.yaml", root: str = ".") -> dict:
        params = load_params(params_path)
        summary = stage_task(params, Path(root))
        create_markdown_artifact(key=f"{name}-summary", markdown=_summary_markdown(name, summary))
        return summary

    return stage_flow


def stage_heartbeats():
    """The settings a stage's flow run runs under: no flow-run heartbeats unless the user asked for them.

    Heartbeats feed Prefect's zombie-run detection (an automation you configure); a stage is a foreground process
    that DVC watches, and Prefect's heartbeat thread sleeps in one-second steps, so joining it at the end of every
    flow run cost ~1 s per stage (measured: a one-task flow against a server, 1.6 s -> 0.7 s). Set
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY (or a Prefect profile's flows.heartbeat_frequency) to have them.
    """
    from prefect.settings import get_current_settings, temporary_settings
    from prefect.settings.models.flows import FlowsSettings

    asked = any(k in os.environ for k in ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY"))
    default = FlowsSettings.model_fields["heartbeat_frequency"].default
    if asked or get_current_settings().flows.heartbeat_frequency != default:
        return contextlib.nullcontext()
    return temporary_settings(updates={"flows.heartbeat_frequency": None})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stages", description="Run one pipeline stage as a Prefect flow.")
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("great_expectations", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    start = time.perf_counter()
    try:
        compute = load_params(args.params).compute
        with stage_heartbeats():
            build_stage_flow(args.stage, compute)(params_path=args.params, root=args.root)
    except USER_ERRORS as exc:
        return report_user_error(args.stage, exc)
    except Exception as exc:  # a bug: the traceback, then one line saying which stage failed
        traceback.print_exc()
        print(f"{args.stage}: failed: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.stage}: done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
