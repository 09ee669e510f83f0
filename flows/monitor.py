"""The `monitor` flow: one drift-monitoring run over the inference log, recorded by Prefect.

    python -m flows.monitor          # what `make drift` runs; `make ui` also serves it on a schedule

The work is `mmfusion.monitoring.monitor.run_monitor`; this flow runs it as a task and attaches
the verdict table (windows, verdicts, flagged checks, report paths) as a markdown artifact.
Inputs are checked before Prefect starts: a missing log or reference is one line and exit 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mmfusion")

from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from mmfusion import paths  # noqa: E402
from mmfusion.config import load_params  # noqa: E402
from mmfusion.monitoring.monitor import cli, prepare, run_monitor, verdict_table  # noqa: E402
from mmfusion.monitoring.policy import append_event, evaluate_policy  # noqa: E402

monitor_task = task(run_monitor, name="check-windows", cache_policy=NO_CACHE, persist_result=False)


@flow(name="monitor", log_prints=True, persist_result=False)
def monitor(params_path: str = "params.yaml", root: str = ".", rescan: bool = False) -> dict:
    """Check the new windows of the inference log against the served model's reference (Evidently)."""
    params = load_params(params_path)
    summary = monitor_task(params, Path(root), rescan)
    create_markdown_artifact(key="monitor-verdicts", markdown=verdict_table(summary), description="drift verdicts")
    summary["retrain"] = maybe_retrain(params, root, params_path, summary["model_version"])
    return summary


def maybe_retrain(params, root: str, params_path: str, model_version: str) -> dict:
    """Start the `retrain` flow when the `retrain:` policy says so; log and record every start and skip."""
    from prefect import get_run_logger

    from flows.retrain import retrain

    log = get_run_logger()
    decision = evaluate_policy(params, Path(root), model_version)
    create_markdown_artifact(key="retrain-trigger", description="retrain policy decision",
                             markdown=f"# Retrain: **{decision['event']}**\n\n{decision['reason']}\n")  # fmt: skip
    if decision["event"] == "skip":
        log.info("retrain skipped: %s", decision["reason"])
        append_event(paths.resolve(root, params.retrain.history_path), decision)
        return decision
    log.info("retrain starting: %s", decision["reason"])
    result = retrain(params_path=str(Path(params_path).resolve()), root=root, trigger="monitor", reason=decision["reason"])
    return {**decision, "promoted": result["promoted"], "decision": result["decision"]}


def _run(args) -> dict:
    prepare(load_params(args.params), Path(args.root))  # fail fast, before a Prefect server starts
    return monitor(params_path=args.params, root=args.root, rescan=args.rescan)


def main(argv: list[str] | None = None) -> int:
    return cli(argv, "python -m flows.monitor", _run)


if __name__ == "__main__":
    sys.exit(main())
