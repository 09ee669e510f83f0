"""The feedback loop on a real style shift, end to end with the real commands: does feedback fix the drift?

    .venv/bin/python bench/loop.py                  # in a copy of this project under a temp dir
    .venv/bin/python bench/loop.py --work /tmp/loop --feedback 600

The served model was trained on Twemoji artwork. Production starts sending the same kinds of emoji
drawn in OpenMoji's style (bench/drift.py's shift). This script does what docs/feedback-loop.md's
"Closing the loop" walkthrough tells a user to do, in a copy of the project (data, features and
models copied; the feature cache shared), every step a real command:

1. `dvc repro` (a Prefect server records the stage flows), then `promotion compare`: the champion.
2. `bentoml serve <live tag>` with raw-image logging on; OpenMoji renderings of train items come
   in through /classify_batch and each gets its true label through /feedback.
3. `python -m flows.retrain` (= `make retrain`): export, a new raw data version, `dvc repro`,
   champion vs challenger, promotion.
4. The champion and the promoted model are both served and scored over HTTP on the same held-out
   items: the test split in OpenMoji style (never fed back) and in Twemoji style (no regression).

Writes bench/results/loop.json (accuracies before/after, feedback counts, the promotion decision,
each command's seconds) and bench/results/loop-transcript.txt (the commands and their output).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from drift import load_pairs  # noqa: E402
from transcript import Transcript  # noqa: E402

from mmfusion.procs import free_port, start_until_ready, stop_process_group  # noqa: E402
from mmfusion.project import copy_project, project_env  # noqa: E402

def serve(tag: str, proj: Path, env: dict, log: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "bentoml", "serve", tag, "--host", "127.0.0.1", "--port", str(port)]
    proc = start_until_ready(cmd, f"{url}/readyz", proj / f"serve-{tag.replace(':', '-')}.log", 300, cwd=proj,
                             env={**env, "MMFUSION_INFERENCE_LOG": str(log)})  # fmt: skip
    return proc, url


def classify(url: str, pairs: list[dict], style: str, batch: int = 16) -> list[tuple[str, int, str]]:
    """(request id, item index, predicted label) per pair, through /classify_batch."""
    import httpx

    out = []
    with httpx.Client(timeout=300) as http:
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            items = [{"image": base64.b64encode(p[style]).decode(), "text": p["text"]} for p in chunk]
            r = http.post(f"{url}/classify_batch", json={"items": items})
            r.raise_for_status()
            body = r.json()
            out += [(body["request_id"], i, res["label"]) for i, res in enumerate(body["results"])]
    return out


def accuracy(url: str, pairs: list[dict], style: str) -> float:
    preds = classify(url, pairs, style)
    return round(sum(p[2] == q["label"] for p, q in zip(preds, pairs)) / len(pairs), 4)


def score(tag: str, proj: Path, env: dict, work: Path, test: list[dict]) -> dict[str, float]:
    """Test-split accuracy of Bento `tag`, served over HTTP, in each style (a log of its own)."""
    proc, url = serve(tag, proj, env, work / f"eval-{tag.replace(':', '-')}.sqlite")
    try:
        return {style: accuracy(url, test, style) for style in ("twemoji", "openmoji")}
    finally:
        stop_process_group(proc)


def rescore(work: Path, out_path: Path) -> int:
    """Score the challenger of a finished loop (its project under `work`) into an existing result JSON."""
    result = json.loads(out_path.read_text())
    proj = work / "proj"
    env = project_env(proj, BENTOML_HOME=work / "bentoml")
    test = load_pairs([proj / "data" / "split" / "test.csv"])
    acc = result["accuracy_on_test"]
    acc["challenger_tag"] = json.loads((proj / "reports" / "package.json").read_text())["bento_tag"]
    acc["challenger"] = score(acc["challenger_tag"], proj, env, work, test)
    acc.pop("promoted", None)
    acc["live_after"] = acc.pop("promoted_tag", acc.get("live_after"))
    out_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(acc, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/loop.py", description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="", help="folder for the project copy (default: a new temp dir)")
    parser.add_argument("--feedback", type=int, default=0, help="OpenMoji train items sent with feedback (0: all)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "loop.json"))
    parser.add_argument("--rescore", action="store_true", help="only score the challenger of the finished loop in --work")
    args = parser.parse_args(argv)
    if args.rescore:
        return rescore(Path(args.work), Path(args.out))

    import httpx
    import numpy as np
    import yaml

    from flows.server import start_server, stop_server

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mmfusion-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tr = Transcript(out_path.with_name("loop-transcript.txt"))
    proj = copy_project(REPO, work / "proj", include_outputs=True)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    cache = proj / params["featurize"]["cache_dir"]  # the feature cache is content-addressed: share this project's
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.symlink_to((REPO / params["featurize"]["cache_dir"]).resolve(), target_is_directory=True)
    py, dvc = sys.executable, str(Path(sys.executable).with_name("dvc"))
    prefect, api_url = start_server(free_port(), timeout=300, log_path=str(work / "prefect-server.log"))
    env = project_env(proj, PREFECT_API_URL=api_url, BENTOML_HOME=work / "bentoml",
                      PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # dvc.yaml says `python`
    for key in ("MMFUSION_MODEL", "MMFUSION_INFERENCE_LOG", "MMFUSION_PARAMS"):
        env.pop(key, None)
    result: dict = {"work": str(work)}
    try:
        tr.run("dvc_repro", [dvc, "repro"], proj, env)  # the project as committed, brought up to date
        # retraining on feedback needs the inputs: keep the raw image of every request, then repackage
        params["package"]["log"]["keep"] = {"image": 1.0}
        (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
        tr.run("dvc_repro_package", [dvc, "repro"], proj, env)
        tr.run("promote_first", [py, "-m", "mmfusion.serving.promotion", "compare"], proj, env)
        champion = tr.run("live_tag", [py, "-m", "mmfusion.serving.promotion", "live-tag"], proj, env).strip()

        test = load_pairs([proj / "data" / "split" / "test.csv"])
        # production traffic: train items in the new style. Not val (feedback trains, so val would no longer be
        # unseen and selection would be biased) and never test (scored below).
        pool = load_pairs([proj / "data" / "split" / "train.csv"])
        pool = [pool[i] for i in np.random.default_rng(0).permutation(len(pool))]  # the order production sends them in
        if args.feedback:
            pool = pool[: args.feedback]
        result["items"] = {"test_openmoji": len(test), "feedback_sent": len(pool)}

        # production: the champion serves OpenMoji-style traffic with raw-image logging; users label it
        log = proj / params["package"]["log"]["path"]
        proc, url = serve(champion, proj, env, log)
        try:
            before = {style: accuracy(url, test, style) for style in ("twemoji", "openmoji")}
            t0 = time.perf_counter()
            answered = classify(url, pool, "openmoji")
            result["production_accuracy_openmoji"] = round(sum(a[2] == p["label"] for a, p in zip(answered, pool)) / len(pool), 4)
            usable = 0
            with httpx.Client(timeout=60) as http:
                for (rid, item, _), p in zip(answered, pool):
                    r = http.post(f"{url}/feedback", json={"request_id": rid, "item": item, "label": p["label"]})
                    r.raise_for_status()
                    usable += bool(r.json()["usable_for_retraining"])
            tr.seconds["traffic_and_feedback"] = round(time.perf_counter() - t0, 1)
            result["items"]["feedback_usable"] = usable
        finally:
            stop_process_group(proc)

        tr.run("retrain", [py, "-m", "flows.retrain"], proj, env)
        tr.run("live", [py, "-m", "mmfusion.serving.promotion", "show"], proj, env)
        retrain = json.loads((proj / "reports" / "retrain" / "latest.json").read_text())
        live_after = tr.run("live_tag_after", [py, "-m", "mmfusion.serving.promotion", "live-tag"], proj, env).strip()
        result["promotion"] = {k: retrain.get(k) for k in ("promoted", "decision", "scores")}
        # the challenger is scored whether or not it was promoted: what did the feedback buy, at what cost?
        challenger = json.loads((proj / "reports" / "package.json").read_text())["bento_tag"]
        result["accuracy_on_test"] = {"champion": before, "champion_tag": champion, "challenger_tag": challenger,
                                      "challenger": score(challenger, proj, env, work, test), "live_after": live_after}  # fmt: skip
        raw = __import__("pandas").read_csv(proj / "data" / "raw" / "manifest.csv")
        result["raw_rows"] = {str(k): int(v) for k, v in raw["source"].value_counts().items()} if "source" in raw else len(raw)
    finally:
        stop_server(prefect)
        result["seconds"] = tr.seconds
        result["load_average"] = [round(x, 2) for x in os.getloadavg()]
        result["cpus"] = os.cpu_count()
        out_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: result.get(k) for k in ("items", "accuracy_on_test", "seconds")}, indent=2))
    print(f"wrote {out_path} and {tr.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
