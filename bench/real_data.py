"""A real public dataset, not emoji, through the whole pipeline as a user would bring it: a manifest.

    python bench/real_data.py                        # GIMP manual figures, 14 filter categories
    python bench/real_data.py --label chapter        # the same manual, 10 chapters (1,663 rows)
    python bench/real_data.py --work /tmp/gimp       # keep the project copy there (to look, or rerun)
    python bench/real_data.py --label chapter --set validate.max_imbalance=60   # params as `dvc exp run -S`
    python bench/real_data.py --dataset drumkits     # audio: Hydrogen's drum kits, 5 instrument classes
    python bench/real_data.py --dataset drumkits --set featurize.encoders.audio=logmel_stats \\
        --out bench/results/real-drumkits-logmel.json   # the same with the weightless audio baseline

Steps, each a real command (the transcript is written next to the result):
  1. The dataset's script builds the manifest, unless it is there: `bench/datasets/gimp_help.py`
     (image, text, label, group) from the Debian package `gimp-help-en` (GFDL-1.2+), or
     `bench/datasets/drumkits.py` (audio, text, label, group, license) from `hydrogen-drumkits`
     (licences per kit); apt-get download, or `--deb FILE.deb` already on disk.
  2. A copy of this project (code only) points `ingest` at that manifest and, where the data's
     modalities are not the default image+text, sets what those need (DATASETS' `params`: the
     drum kits' `featurize.encoders` is {audio: resemblyzer, text: minilm_l6}, and the
     `<modality>_only` baselines of `train.strategies` follow the encoders: audio_only for
     image_only); every other param is the default (all strategies, selection auto: CV below
     cv_max_rows), unless `--set` changes it (applied last).
  3. `python -m flows.server -- dvc repro` there: one Prefect server, every stage a flow run, to a
     built Bento, as `make run` does.
  4. The result: the leaderboard (CV mean and spread per strategy, test accuracy with its bootstrap
     interval, per presence pattern) and the fusion gain, copied to bench/results/real-<name>/ and
     summarised in bench/results/real-<name>.json (the transcript: real-<name>-transcript.txt, named
     after --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO), str(REPO / "bench")]

from transcript import CommandFailed, Transcript  # noqa: E402

from mmfusion.project import copy_project, project_env  # noqa: E402

# name -> its builder, the builder's --label choices (the first is the default; none: no --label) and the
# params the data needs besides `ingest` (merged into params.yaml; `featurize.encoders` is replaced whole)
DATASETS = {
    "gimp_help": {"script": REPO / "bench" / "datasets" / "gimp_help.py", "labels": ("filter-category", "chapter"),
                  "params": {}},
    "drumkits": {"script": REPO / "bench" / "datasets" / "drumkits.py", "labels": (),
                 "params": {"featurize": {"encoders": {"audio": "resemblyzer", "text": "minilm_l6"}}}},
}  # fmt: skip


def merge(params: dict, extra: dict, replace: tuple[str, ...] = ("featurize.encoders",), at: str = "") -> dict:
    """`params` with `extra` merged in, mapping by mapping; the mappings named in `replace` are replaced."""
    for key, value in extra.items():
        path = f"{at}.{key}" if at else key
        if isinstance(value, dict) and isinstance(params.get(key), dict) and path not in replace:
            merge(params[key], value, replace, path)
        else:
            params[key] = value
    return params


def follow_encoders(strategies: list[str], modalities: list[str]) -> list[str]:
    """train.strategies for the data's `modalities`: the `<modality>_only` baselines of modalities the
    encoders lack are dropped, those of the ones they have are put first (in the encoders' order)."""
    from mmfusion.fusion.registry import UNIMODAL_SUFFIX, unimodal_name

    baselines = [unimodal_name(m) for m in modalities]
    kept = [s for s in strategies if not s.endswith(UNIMODAL_SUFFIX) or s in baselines]
    return [b for b in baselines if b not in kept] + kept


def summarise(proj: Path, dataset: dict) -> dict:
    """The numbers a reader wants, from the project's own reports (nothing recomputed here)."""
    metrics = json.loads((proj / "reports" / "evaluate" / "metrics.json").read_text())
    package = json.loads((proj / "reports" / "package.json").read_text())
    return {
        "dataset": dataset,
        "selection": metrics["selection"],
        "winner": metrics["winner"],
        "best_unimodal": metrics["best_unimodal"],
        "winner_vs_best_unimodal": metrics["winner_vs_best_unimodal"],  # paired bootstrap: test and held-out
        "strategies": metrics["strategies"],  # CV mean/spread (cv), val, test (+ by presence pattern), CI
        "raw_check": metrics.get("raw_check"),
        "bento_tag": package.get("bento_tag"),
        "reports": {k: json.loads((proj / "reports" / f"{k}.json").read_text()) for k in ("ingest", "clean", "split")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/real_data.py", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="gimp_help")
    parser.add_argument("--label", default=None,
                        help="the dataset script's --label (gimp_help: filter-category (default) | chapter; drumkits: none)")
    parser.add_argument("--deb", default="", help="the dataset's Debian package, already downloaded (the script's --deb)")
    parser.add_argument("--cache", default="/tmp/mmfusion-datasets", help="where datasets are downloaded and built")
    parser.add_argument("--work", default="", help="folder for the project copy (default: a new temp dir)")
    parser.add_argument("--out", default="", help="result JSON (default bench/results/real-<dataset>[-<label>].json)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="params for the run, as `dvc exp run -S` takes them (validate.max_imbalance=60)")
    args = parser.parse_args(argv)

    import yaml

    spec = DATASETS[args.dataset]
    if args.label is not None and args.label not in spec["labels"]:
        choices = " | ".join(spec["labels"]) or "none: it has one label"
        parser.error(f"--label {args.label!r} does not apply to --dataset {args.dataset} ({choices})")
    label = args.label or (spec["labels"][0] if spec["labels"] else None)
    name = args.dataset if label is None or label == spec["labels"][0] else f"{args.dataset}-{label}"
    data_dir = Path(args.cache) / name.replace("-", "_")
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"real-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix=f"mmfusion-{name}-"))
    work.mkdir(parents=True, exist_ok=True)
    tr = Transcript(out.with_name(f"{out.stem}-transcript.txt"))
    log = tr.path

    py = sys.executable
    if not (data_dir / "manifest.csv").exists():
        build = [py, str(spec["script"]), "--cache", args.cache, "--out", str(data_dir)]
        build += ["--label", label] if label is not None else []
        build += ["--deb", str(Path(args.deb).resolve())] if args.deb else []
        tr.run("build_manifest", build, REPO, dict(os.environ), timeout=7200)
    dataset = json.loads((data_dir / "summary.json").read_text())

    proj = work / "proj"
    if proj.exists():
        shutil.rmtree(proj)
    copy_project(REPO, proj)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["ingest"]["source"] = "manifest"
    params["ingest"]["manifest"].update({"path": str(data_dir / "manifest.csv"), "files_root": str(data_dir),
                                         "id_column": "", "group_column": "group"})  # fmt: skip
    merge(params, spec["params"])
    params["train"]["strategies"] = follow_encoders(params["train"]["strategies"], list(params["featurize"]["encoders"]))
    from mmfusion.config import ParamsError, apply_overrides, parse_params

    try:
        params = apply_overrides(params, list(args.set))
        parse_params(params)
    except ParamsError as exc:
        print(f"bench/real_data.py: error: {exc}", file=sys.stderr)
        return 2
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    env = project_env(proj, BENTOML_HOME=work / "bentoml",
                      PATH=f"{Path(py).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # dvc.yaml says `python`
    for key in ("MMFUSION_MODEL", "MMFUSION_INFERENCE_LOG", "MMFUSION_PARAMS", "PREFECT_API_URL"):
        env.pop(key, None)
    print(f"{name}: {dataset['rows']} rows, {dataset['classes']} classes; project {proj}; log {log}", flush=True)
    tr.run("dvc_repro", [py, "-m", "flows.server", "--", str(Path(py).with_name("dvc")), "repro"], proj, env, timeout=7200)
    seconds = tr.seconds

    result = {"benchmark": "real_data", "command": " ".join([Path(py).name, *sys.argv]), "work": str(work), "set": args.set,
              "params_changed": {"featurize.encoders": params["featurize"]["encoders"], "train.strategies": params["train"]["strategies"]},
              "seconds": seconds, "cpu_count": os.cpu_count(), **summarise(proj, dataset)}  # fmt: skip
    folder = out.with_suffix("")
    folder.mkdir(exist_ok=True)
    for rel in ("leaderboard.md", "metrics.json", "per_class.json"):
        src = proj / "reports" / "evaluate" / rel
        if src.exists():
            shutil.copy2(src, folder / rel)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print((proj / "reports" / "evaluate" / "leaderboard.md").read_text())
    print(f"wrote {out} and {folder}/ in {sum(seconds.values()):.0f} s")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except CommandFailed as exc:  # the command's own output is the message (and in the transcript)
        print(f"bench/real_data.py: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
