"""One monitoring run: new windows of the inference log against the served model's reference.

    python -m mmfusion.monitoring.monitor            # plain (no Prefect); `make drift` runs flows/monitor.py

For each window: the checks (`checks.py`) give a JSON verdict of our own schema, an Evidently
report is saved as self-contained HTML next to it, the snapshot goes to the local Evidently
workspace, and the verdict is appended to the history (a SQLite file of the monitor's own: the
service's log is only ever read). Whatever the window holds (a modality gone, a column all null),
it gets a verdict: what could not be checked is listed in the verdict's `notes`, the table and the
top of the HTML report. A window that is not complete yet (fewer than `window.size` rows,
or a time period still open) is checked now and again on the next run with more rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

from mmfusion import paths
from mmfusion.bentos import BentoMissing, bento_model_dir
from mmfusion.config import MonitorParams, Params, ParamsError, load_params
from mmfusion.live import live_entry
from mmfusion import logdb
from mmfusion.monitoring.checks import check_window
from mmfusion.monitoring.reference import MonitorError, load_reference
from mmfusion.monitoring.examples import build_examples
from mmfusion.monitoring.report import add_notice, add_section, build_snapshot, link_report, report_labels, workspace_project
from mmfusion.monitoring.windows import Window, cut_windows, load_log, select_version

log = logging.getLogger(__name__)

HISTORY_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    model_version TEXT NOT NULL,
    window_key    TEXT NOT NULL,   -- how windows were cut, e.g. count:200 or time:60
    idx           INTEGER NOT NULL,
    window_id     TEXT NOT NULL,
    start_ts      REAL NOT NULL,
    end_ts        REAL NOT NULL,
    rows          INTEGER NOT NULL,
    complete      INTEGER NOT NULL,
    verdict       TEXT NOT NULL,
    severity      TEXT NOT NULL,
    flagged       TEXT NOT NULL,   -- JSON list of flagged check names
    report_html   TEXT,
    verdict_json  TEXT,
    checked_at    REAL NOT NULL,
    PRIMARY KEY (model_version, window_key, idx)
);
"""


def log_url(params: Params, root: Path) -> URL:
    """The inference log the monitor, feedback export and retrain policy read: monitor.log_url, else
    $MMFUSION_INFERENCE_LOG (the service's override), else the service's package.log.url."""
    value = params.monitor.log_url or os.environ.get(logdb.URL_ENV) or params.package.log.url
    try:
        return logdb.resolve_url(value, Path(root))
    except ValueError as exc:
        raise MonitorError(str(exc)) from exc


def served_model_dir(params: Params, root: Path) -> Path:
    """The served model's folder: monitor.model_dir, else the live Bento's model (reports/live.json, else
    reports/package.json), else models/best."""
    if params.monitor.model_dir:
        return paths.resolve(root, params.monitor.model_dir)
    entry = live_entry(params, root)  # reports/live.json, else the last packaged Bento (reports/package.json)
    if entry and entry.get("model_tag"):
        try:  # the model store's copy, else the Bento's own (imported from bentos/ when the store lacks it)
            return bento_model_dir(entry["bento_tag"], entry["model_tag"], root)
        except BentoMissing as exc:  # not here at all: the folder it was built from
            log.info("monitor: %s; using %s", exc, paths.BEST)
    return Path(root) / paths.BEST


class History:
    """The verdict history: one row per (model version, window cut, window index); re-checks replace."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), timeout=10.0)
        self.conn.executescript(HISTORY_SCHEMA)

    def resume_point(self, version: str, key: str) -> tuple[int, int, float]:
        """(next window index, rows covered by complete windows, end ts of the last complete window)."""
        row = self.conn.execute(
            "SELECT COALESCE(MAX(idx) + 1, 0), COALESCE(SUM(rows), 0), COALESCE(MAX(end_ts), 0) "
            "FROM verdicts WHERE model_version = ? AND window_key = ? AND complete = 1",
            (version, key),
        ).fetchone()
        return int(row[0]), int(row[1]), float(row[2])

    def record(self, version: str, key: str, window: Window, verdict: dict) -> None:
        with self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO verdicts VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    version, key, window.index, window.id, window.start_ts, window.end_ts, len(window.data),
                    int(window.complete), verdict["verdict"], verdict["severity"], json.dumps(verdict["flagged"]),
                    verdict.get("report_html"), verdict.get("verdict_json"), time.time(),
                ),
            )  # fmt: skip

    def recent(self, version: str | None = None, limit: int = 50) -> list[dict]:
        """The newest verdicts first (all versions unless `version`)."""
        query = "SELECT * FROM verdicts" + (" WHERE model_version = ?" if version else "") + " ORDER BY checked_at DESC, idx DESC LIMIT ?"
        cur = self.conn.execute(query, (version, limit) if version else (limit,))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def close(self) -> None:
        self.conn.close()


def window_key(p: MonitorParams) -> str:
    return f"count:{p.window.size}" if p.window.by == "count" else f"time:{p.window.period_minutes:g}"


def prepare(params: Params, root: Path) -> dict[str, Any]:
    """Everything a run needs, checked before any work: model folder, reference, log. MonitorError otherwise."""
    model_dir = served_model_dir(params, root)
    if not (model_dir / "config.json").exists():
        raise MonitorError(f"no served model at {model_dir}: run `make run` (or set monitor.model_dir)")
    reference, meta = load_reference(model_dir)
    url = log_url(params, root)
    try:
        there = logdb.exists(url)
    except logdb.LogUnavailable as exc:
        raise MonitorError(str(exc)) from exc
    if not there:
        raise MonitorError(f"no inference log at {logdb.describe(url)}: serve the model (`make serve`) and send it requests first")
    return {"model_dir": model_dir, "reference": reference, "reference_meta": meta, "log_url": url}


def notice_lines(verdict: dict) -> list[str]:
    """What the top of the HTML report says: the verdict's notes and the metrics left out of the report."""
    left = verdict.get("report_left_out") or []
    return verdict["notes"] + [f"Left out of this report: {i['name']}: {i['reason']}." for i in left]


def write_window_outputs(out_dir: Path, window: Window, verdict: dict, snapshot, examples_html: str = "") -> dict:
    """The window's HTML report (if a snapshot; with its notice and its "what drifted" section) and its JSON verdict;
    returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    if snapshot is not None:
        html = out_dir / f"{window.id}.html"
        snapshot.save_html(str(html))
        add_section(html, examples_html)
        flagged = ", ".join(verdict["flagged"]) or "nothing flagged"
        add_notice(html, f"mmfusion drift verdict: {verdict['verdict']} ({flagged})", notice_lines(verdict))
        written["report_html"] = str(html)
    verdict_path = out_dir / f"{window.id}.json"
    written["verdict_json"] = str(verdict_path)
    verdict.update(written)
    verdict_path.write_text(json.dumps(verdict, indent=2, default=str) + "\n")
    return written


def run_monitor(params: Params, root: Path = Path("."), rescan: bool = False, now: float | None = None) -> dict:
    """Check every new window of the log; write reports, verdicts, history and workspace snapshots."""
    start = time.perf_counter()
    p = params.monitor
    root = Path(root)
    ctx = prepare(params, root)
    reference, meta = ctx["reference"], ctx["reference_meta"]
    version = meta["model_version"] if p.model_version == "served" else p.model_version
    # widths from the served model's reference: a modality the log never saw still has its shape
    dims = {m: int(a.shape[1]) for m, a in reference.embeddings.items()}
    data = load_log(ctx["log_url"], reference.modalities, dims=dims)
    data, seen = select_version(data, version)
    history = History(paths.resolve(root, p.history_path))
    key = window_key(p)
    first, covered, last_end = (0, 0, 0.0) if rescan else history.resume_point(version, key)
    if p.window.by == "count":
        data = data.take(list(range(covered, len(data))))
    else:
        data = data.take([i for i, ts in enumerate(data.rows["ts"]) if ts >= last_end])
    now = time.time() if now is None else now
    windows = cut_windows(data, p.window.by, p.window.size, p.window.period_minutes, now, first_index=first)
    out_dir = paths.resolve(root, p.out_dir) / version
    ws = project = None
    results = []
    for window in windows:
        verdict = check_window(window.data, reference, p)
        verdict.update({"model_version": version, "window": window.describe(), "reference": meta, "log": logdb.describe(ctx["log_url"])})
        snapshot, examples_html = None, ""
        if verdict["verdict"] != "insufficient_data":
            t0 = time.perf_counter()
            metadata, tags = report_labels(verdict, out_dir / f"{window.id}.html")
            snapshot, verdict["report_left_out"] = build_snapshot(
                window.data, reference, p, name=f"{version} {window.id}", timestamp=window.end_ts, metadata=metadata, tags=tags
            )
            verdict["report_seconds"] = round(time.perf_counter() - t0, 2)
            failed = [i for i in verdict["report_left_out"] if i.get("failed")]
            verdict["notes"] += [f"The Evidently report lacks {i['name']}: {i['reason']}." for i in failed]
            t0 = time.perf_counter()
            examples, examples_html = build_examples(window.data, reference, verdict, p, ctx["log_url"], ctx["model_dir"])
            if examples:
                verdict["examples"] = examples
                verdict["examples_seconds"] = round(time.perf_counter() - t0, 2)
        write_window_outputs(out_dir, window, verdict, snapshot, examples_html)
        if snapshot is not None and window.complete:
            if ws is None:
                ws, project = workspace_project(paths.resolve(root, p.workspace), p.project, reference.modalities)
            link_report(snapshot, f"{version}/{window.id}.html", verdict)  # the UI's copy only: the HTML is saved
            ws.add_run(project.id, snapshot)
            verdict["workspace_project"] = str(project.id)
        history.record(version, key, window, verdict)
        log.info("monitor: window %s (%d rows): %s %s", window.id, len(window.data), verdict["verdict"], verdict["flagged"])
        for note in verdict["notes"]:
            log.warning("monitor: window %s: %s", window.id, note)
        results.append(verdict)
    history.close()
    counts = {v: sum(r["verdict"] == v for r in results) for v in ("ok", "warning", "drift", "insufficient_data")}
    summary = {
        "model_version": version,
        "model_dir": str(ctx["model_dir"]),
        "log": logdb.describe(ctx["log_url"]),
        "versions_seen": seen,
        "window": key,
        "windows": [
            {
                "id": r["window"]["id"],
                "rows": r["rows"],
                "complete": r["window"]["complete"],
                "replicas": r["window"].get("replicas", {}),
                "verdict": r["verdict"],
                "severity": r["severity"],
                "flagged": r["flagged"],
                "notes": r["notes"],
                "report_html": r.get("report_html"),
                "verdict_json": r.get("verdict_json"),
            }
            for r in results
        ],
        "counts": counts,
        "seconds": round(time.perf_counter() - start, 2),
    }
    latest = paths.resolve(root, p.out_dir) / "latest.json"
    latest.parent.mkdir(parents=True, exist_ok=True)
    latest.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def verdict_table(summary: dict) -> str:
    """The run as a markdown table (the Prefect artifact and the CLI print it)."""
    lines = [
        f"# Drift monitoring: model {summary['model_version']}",
        "",
        f"log `{summary['log']}`, windows {summary['window']}, versions in the log: "
        + ", ".join(f"{v} ({n})" for v, n in summary["versions_seen"].items()),
        "",
        "| window | rows | verdict | flagged | report |",
        "|---|---|---|---|---|",
    ]
    for w in summary["windows"]:
        done = "" if w["complete"] else " (open)"
        lines.append(
            f"| {w['id']}{done} | {w['rows']} | **{w['verdict']}** | {', '.join(w['flagged']) or '-'} | "
            f"{w.get('report_html') or w.get('verdict_json')} |"
        )
    if not summary["windows"]:
        lines.append("| (no new rows since the last run) | 0 | - | - | - |")
    noted = [(w["id"], note) for w in summary["windows"] for note in w.get("notes", [])]
    if noted:
        lines += ["", "Notes:", ""] + [f"- {wid}: {note}" for wid, note in noted]
    return "\n".join(lines) + "\n"


def build_parser(prog: str = "python -m mmfusion.monitoring.monitor") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Drift check of what the service has logged against the served model's reference (Evidently).",
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--root", default=".", help="project root (default: .)")
    parser.add_argument("--rescan", action="store_true", help="check every window again, not only new rows")
    parser.add_argument("--fail-on-drift", action="store_true", help="exit 3 when a window's verdict is drift")
    return parser


def exit_code(summary: dict, fail_on_drift: bool) -> int:
    return 3 if fail_on_drift and summary["counts"].get("drift") else 0


def cli(argv: list[str] | None, prog: str, run) -> int:
    """The monitor's command line (plain here, Prefect in flows/monitor.py): `run(args)` returns the summary."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = run(args)
    except (MonitorError, ParamsError) as exc:
        print(f"monitor: error: {exc}", file=sys.stderr)
        return 2
    print(verdict_table(summary))
    return exit_code(summary, args.fail_on_drift)


def main(argv: list[str] | None = None) -> int:
    return cli(argv, "python -m mmfusion.monitoring.monitor",
               lambda a: run_monitor(load_params(a.params), Path(a.root), rescan=a.rescan))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
