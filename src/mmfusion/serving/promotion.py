"""Champion and challenger: which Bento is live, whether a new one replaces it, and rollback.

    python -m mmfusion.serving.promotion show        # the live Bento and the ones before it (`make live`)
    python -m mmfusion.serving.promotion compare     # last packaged Bento vs the live one; promote if not worse
    python -m mmfusion.serving.promotion rollback    # the previous Bento becomes live again (`make rollback`)
    python -m mmfusion.serving.promotion live-tag    # the tag `make serve` serves (imported from bentos/ if needed)

The live pointer is `retrain.live_path` (reports/live.json, `mmfusion/live.py`): {"live": {...},
"previous": [...newest first], "rolled_back": [...]}. Without one, the last packaged Bento
(reports/package.json) is what is served.
The comparison runs both models (Predictor.from_dir on the BentoML store's copies, raw files, CPU)
on the same rows: the fixed test split (source rows only: feedback always trains) and the held-out
newest feedback (retrain.export_dir/holdout), and applies `retrain.promotion`. A rejected challenger
changes nothing that is served.

A Bento named here may be missing from the local BentoML store (a fresh clone, another BENTOML_HOME):
serving, comparing and rolling back import it from its exported archive (`mmfusion/bentos.py`), and
`show` says which named Bento cannot be served here and why.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mmfusion import paths
from mmfusion.bentos import BentoMissing, bento_model_dir, ensure_bento, missing_note
from mmfusion.config import Params, PromotionRule, load_params
from mmfusion.data.manifest import read_manifest
from mmfusion.live import live_entry, packaged, read_live, write_live

log = logging.getLogger(__name__)


class PromotionError(RuntimeError):
    """Nothing to compare, roll back to, or serve."""


# ---- promotion and rollback (the pointer itself: mmfusion/live.py) ------------------------------


def promote(params: Params, root: Path, entry: dict, reason: str) -> dict:
    """Make `entry` live; the live one becomes the newest `previous`."""
    state = read_live(params, root)
    if state["live"] is not None:
        state["previous"].insert(0, state["live"])
    state["live"] = {**entry, "since": time.time(), "reason": reason}
    write_live(params, root, state)
    log.info("promotion: %s is live (%s)", entry["bento_tag"], reason)
    return state


def rollback(params: Params, root: Path) -> dict:
    """The newest previous Bento becomes live again; the rolled-back one is kept in `rolled_back`."""
    state = read_live(params, root)
    if not state["previous"]:
        raise PromotionError("nothing to roll back to: no previous live Bento in " + params.retrain.live_path)
    target = state["previous"][0]
    try:
        ensure_bento(target["bento_tag"], root)
    except BentoMissing as exc:
        raise PromotionError(f"cannot roll back to the previous Bento: {exc}") from exc
    state["previous"].pop(0)
    if state["live"] is not None:
        state["rolled_back"].insert(0, {**state["live"], "rolled_back_at": time.time()})
    state["live"] = {**target, "since": time.time(), "reason": "rollback"}
    write_live(params, root, state)
    return state


# ---- champion vs challenger ---------------------------------------------------------------------


def comparison_sets(params: Params, root: Path) -> dict[str, tuple[pd.DataFrame, Path]]:
    """{'test': the fixed test split (source rows), 'holdout': held-out feedback}: (rows, the folder their
    file values are relative to)."""
    sets = {}
    test_csv = Path(root) / paths.SPLIT / "test.csv"
    if test_csv.exists():
        test = read_manifest(test_csv, required=("label",))
        if "source" in test:
            test = test[test["source"] != "feedback"]
        sets["test"] = (test, Path(root))
    hold_csv = paths.resolve(root, params.retrain.export_dir) / "holdout" / paths.MANIFEST
    if hold_csv.exists():
        sets["holdout"] = (read_manifest(hold_csv, required=("label",)), hold_csv.parent)
    return sets


def score(model_dir: Path, rows: pd.DataFrame, root: Path, batch: int = 32) -> dict:
    """accuracy and macro-F1 of the model in `model_dir` on manifest rows (file values relative to `root`)."""
    from sklearn.metrics import f1_score

    from mmfusion.inference.predictor import Predictor  # torch: `show` and `live-tag` never load it

    if rows.empty:
        return {"rows": 0, "accuracy": None, "macro_f1": None}
    predictor = Predictor.from_dir(model_dir, device="cpu")
    preds: list[str] = []
    for start in range(0, len(rows), batch):
        chunk = rows.iloc[start : start + batch]
        items = predictor.read_rows((r for _, r in chunk.iterrows()), root)  # the model's own preprocessing
        preds += [res["label"] for res in predictor.predict(items)]
    y = rows["label"].astype(str).to_numpy()
    pred = np.asarray(preds)
    return {
        "rows": int(len(rows)),
        "accuracy": round(float((pred == y).mean()), 4),
        "macro_f1": round(float(f1_score(y, pred, labels=sorted(set(y)), average="macro", zero_division=0)), 4),
    }


def decide(champion: dict, challenger: dict, rule: PromotionRule) -> dict:
    """Apply the rule to the two models' scores: {'promote': bool, 'checks': [...], 'reason': str}."""
    checks = []
    pairs = [("test", rule.test_metric, rule.test_tolerance, 1)]
    pairs.append(("holdout", rule.holdout_metric, rule.holdout_tolerance, rule.min_holdout_rows))
    for name, metric, tol, min_rows in pairs:
        a, b = champion.get(name, {}), challenger.get(name, {})
        rows = b.get("rows", 0)
        if rows < max(1, min_rows) or a.get(metric) is None or b.get(metric) is None:
            checks.append({"set": name, "metric": metric, "skipped": f"{rows} rows (< {max(1, min_rows)})"})
            continue
        ok = b[metric] >= a[metric] - tol
        checks.append({"set": name, "metric": metric, "champion": a[metric], "challenger": b[metric],
                       "tolerance": tol, "delta": round(b[metric] - a[metric], 4), "passed": bool(ok)})  # fmt: skip
    decided = [c for c in checks if "passed" in c]
    if not decided:
        return {"promote": False, "checks": checks, "reason": "no comparison data (no test split, no hold-out)"}
    failed = [c for c in decided if not c["passed"]]
    if failed:
        reason = "; ".join(
            f"{c['set']} {c['metric']} {c['challenger']:.4f} < champion {c['champion']:.4f} - {c['tolerance']}" for c in failed
        )
        return {"promote": False, "checks": checks, "reason": "rejected: " + reason}
    return {"promote": True, "checks": checks, "reason": "not worse on " + ", ".join(f"{c['set']} {c['metric']}" for c in decided)}


def compare_and_promote(params: Params, root: Path = Path("."), challenger: dict | None = None) -> dict:
    """Compare the last packaged Bento (the challenger) with the live one; promote it if not worse.
    Writes retrain.report_dir/<time>.json + latest.json; returns the report."""
    root = Path(root)
    challenger = challenger or packaged(root)
    if challenger is None:
        raise PromotionError("no packaged Bento to compare (run `dvc repro package`)")
    state = read_live(params, root)
    champion = state["live"]
    report: dict = {"time": time.time(), "challenger": challenger, "champion": champion,
                    "rule": vars(params.retrain.promotion)}  # fmt: skip
    if champion is None:
        report.update(decision={"promote": True, "checks": [], "reason": "no live champion yet"})
    elif champion["bento_tag"] == challenger["bento_tag"]:
        report.update(decision={"promote": False, "checks": [], "reason": "the challenger is the live Bento (nothing new)"})
    else:
        sets = comparison_sets(params, root)
        report["scores"] = {
            role: {name: score(bento_model_dir(entry["bento_tag"], entry["model_tag"], root), rows, base)
                   for name, (rows, base) in sets.items()}  # fmt: skip
            for role, entry in (("champion", champion), ("challenger", challenger))
        }
        report["decision"] = decide(report["scores"]["champion"], report["scores"]["challenger"], params.retrain.promotion)
    report["promoted"] = bool(report["decision"]["promote"])
    if report["promoted"]:
        promote(params, root, challenger, report["decision"]["reason"])
    report["live"] = read_live(params, root)["live"] or champion
    out = paths.resolve(root, params.retrain.report_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = time.strftime("promotion-%Y%m%d-%H%M%S", time.gmtime(report["time"]))
    for path in (out / f"{name}.json", out / "latest.json"):
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    report["report"] = str(out / f"{name}.json")
    log.info("promotion: %s -> %s", challenger["bento_tag"], report["decision"]["reason"])
    return report


def report_markdown(report: dict) -> str:
    """The decision and its numbers as markdown (the Prefect artifact)."""
    d = report["decision"]
    champ = (report.get("champion") or {}).get("bento_tag", "(none)")
    lines = [
        f"# Champion vs challenger: **{'PROMOTED' if report['promoted'] else 'REJECTED'}**",
        "",
        f"challenger `{report['challenger']['bento_tag']}`, champion `{champ}`; live now: "
        f"`{(report.get('live') or {}).get('bento_tag')}`",
        "",
        f"{d['reason']}",
        "",
        "| set | metric | champion | challenger | delta | tolerance | passed |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in d["checks"]:
        if "passed" in c:
            lines.append(f"| {c['set']} | {c['metric']} | {c['champion']} | {c['challenger']} | {c['delta']} | "
                         f"{c['tolerance']} | {c['passed']} |")  # fmt: skip
        else:
            lines.append(f"| {c['set']} | {c['metric']} | - | - | - | - | skipped: {c['skipped']} |")
    return "\n".join(lines) + "\n"


def show(params: Params, root: Path) -> str:
    """The live Bento and the ones before it; each one that cannot be served here says why (missing_note)."""
    state = read_live(params, root)
    live = state["live"] or packaged(root)

    def note(entry: dict) -> str:
        why = missing_note(entry["bento_tag"], root)
        return f"  [{why}]" if why else ""

    lines = [f"live:     {live['bento_tag'] if live else '(nothing packaged yet: run `make run`)'}"
             + ("" if state["live"] else "  (last packaged; never promoted)" if live else "")]
    if state["live"]:
        lines[0] += f"  ({state['live'].get('reason')})"
    if live:
        lines[0] += note(live)
    for i, p in enumerate(state["previous"]):
        lines.append(f"{'previous:' if i == 0 else '         '} {p['bento_tag']}  ({p.get('reason')}){note(p)}")
    for p in state["rolled_back"]:
        lines.append(f"rolled back: {p['bento_tag']}{note(p)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmfusion.serving.promotion", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["show", "compare", "rollback", "live-tag"])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params, root = load_params(args.params), Path(args.root)
    try:
        if args.command == "live-tag":
            entry = live_entry(params, root)
            if entry is None:
                raise PromotionError("no Bento built yet: run `make run` (or `dvc repro package`)")
            print(ensure_bento(entry["bento_tag"], root))
        elif args.command == "compare":
            print(report_markdown(compare_and_promote(params, root)))
        elif args.command == "rollback":
            rollback(params, root)
            print(show(params, root))
        else:
            print(show(params, root))
    except (PromotionError, BentoMissing) as exc:
        print(f"{'serve' if args.command == 'live-tag' else args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
