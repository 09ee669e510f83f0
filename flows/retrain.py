"""The `retrain` flow: labelled feedback -> a new raw data version -> the pipeline -> champion vs challenger.

    python -m flows.retrain              # `make retrain`; `make ui` serves it as retrain/retrain
                                         # the monitor flow starts it when the `retrain:` policy says so

1. export: usable feedback -> retrain.export_dir/train (ingested) + holdout/ (never trained on)
2. `dvc repro` (the `pipeline` flow as a subflow): ingest adds feedback/train to the source's samples
   as a new data/raw version (the old one stays in the DVC cache; dvc.lock records both hashes),
   and every stage downstream reruns as DVC decides; package builds the challenger Bento
3. compare: the challenger against the live champion on the fixed test split + the hold-out;
   promoted (reports/live.json) only if not worse by `retrain.promotion`
Every start, its result and its decision are lines of `retrain.history_path` and Prefect artifacts.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mmfusion")

import yaml  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from mmfusion import paths  # noqa: E402
from mmfusion.config import load_params  # noqa: E402
from mmfusion.monitoring.export import export_feedback  # noqa: E402
from mmfusion.monitoring.policy import append_event  # noqa: E402
from mmfusion.serving.promotion import compare_and_promote, report_markdown  # noqa: E402

export_task = task(export_feedback, name="export-feedback", cache_policy=NO_CACHE, persist_result=False)
compare_task = task(compare_and_promote, name="champion-vs-challenger", cache_policy=NO_CACHE, persist_result=False)


def raw_version(root: Path) -> str | None:
    """The md5 of data/raw that dvc.lock records (the raw data version the models were trained on)."""
    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return None
    stage = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get("ingest", {})
    for out in stage.get("outs", []):
        if out.get("path") == "data/raw":
            return out.get("md5")
    return None


@flow(name="retrain", log_prints=True, persist_result=False)
def retrain(params_path: str = "params.yaml", root: str = ".", trigger: str = "manual", reason: str = "started by hand") -> dict:
    """Export labelled feedback, `dvc repro` on the merged raw data, promote the challenger only if not worse."""
    from flows.pipeline import pipeline

    log = get_run_logger()
    project = Path(root).resolve()
    params = load_params(params_path)
    history = paths.resolve(project, params.retrain.history_path)
    append_event(history, {"event": "start", "trigger": trigger, "reason": reason})
    log.info("retrain started (%s): %s", trigger, reason)
    record: dict = {"trigger": trigger, "reason": reason, "raw_before": raw_version(project)}
    try:
        record["export"] = export_task(params, project)
        log.info("exported %d usable feedback rows (train %d, holdout %d)", record["export"]["usable"],
                 record["export"]["train"], record["export"]["holdout"])  # fmt: skip
        pipeline(project_dir=str(project))
        record["raw_after"] = raw_version(project)
        report = compare_task(params, project)
    except Exception as exc:
        append_event(history, {"event": "failed", "trigger": trigger, "error": f"{type(exc).__name__}: {exc}"})
        raise
    record.update(promoted=report["promoted"], decision=report["decision"], challenger=report["challenger"],
                  live=report["live"], report=report["report"])  # fmt: skip
    append_event(history, {"event": "done", **record})
    create_markdown_artifact(key="retrain-promotion", markdown=report_markdown(report)
                             + f"\n\nraw data version (dvc.lock data/raw md5): `{record['raw_before']}` -> "
                             f"`{record['raw_after']}`; feedback: {record['export']['train']} trained on, "
                             f"{record['export']['holdout']} held out\n", description="champion vs challenger")  # fmt: skip
    return record


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    record = retrain(params_path=args.params, root=args.root)
    print(yaml.safe_dump({k: record[k] for k in ("raw_before", "raw_after", "promoted", "decision", "live")}, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
