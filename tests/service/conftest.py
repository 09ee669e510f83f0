"""A real `bentoml serve` of a small trained model, on a free port on 127.0.0.1.

The model is trained here with the project's own code (the offline encoders, `fit_strategy`)
on a tiny three-class image+text set, packaged by the `package` stage into a throwaway
BENTOML_HOME, and the built Bento is served. Every wait has a timeout; the server is stopped
by its PID (its process group: BentoML starts one process per service).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from mmfusion.procs import free_port, start_until_ready, stop_process_group
from tests.conftest import CLASSES, REPO, draw_sample

START_TIMEOUT_S = 180
PACKAGE_TIMEOUT_S = 300

# Small limits so that the 413 / 400 cases need only small requests.
TEST_LIMITS = {"max_upload_bytes": 300_000, "max_pixels": 4_000_000, "max_text_chars": 200, "max_batch_items": 16}
# A small explanation bound, so that a text of 48 words is already too costly (413) within max_text_chars.
TEST_EXPLAIN = {"max_evaluations": 48, "max_pending": 1}
# Short body timeout and drain so that the slow-client and shutdown cases take seconds.
TEST_SERVICE = {"body_timeout_s": 3, "graceful_shutdown_s": 15}


def sample_texts(label: str) -> list[str]:
    return CLASSES[label][1]


def png_bytes(label: str, seed: int, size: int = 64) -> bytes:
    buf = io.BytesIO()
    draw_sample(CLASSES[label][0], seed=seed, size=size).save(buf, format="PNG")
    return buf.getvalue()


def build_tiny_model(out_dir: Path, per_class: int = 8) -> Path:
    """Train a `concat` head on real encoder embeddings of a tiny synthetic set; writes a models/best-like dir."""
    import torch
    from PIL import Image

    from mmfusion.config import parse_params
    from mmfusion.modalities.text import normalize_text
    from mmfusion.encoders import create_encoder
    from mmfusion.training.data import FeatureSet
    from mmfusion.training.strategies import fit_strategy

    labels = sorted(CLASSES)
    rows = []
    for c, label in enumerate(labels):
        for i in range(per_class):
            img = draw_sample(CLASSES[label][0], seed=1000 + 37 * c + i, size=64)
            rgb = Image.new("RGB", img.size, (255, 255, 255))
            rgb.paste(img, mask=img.getchannel("A"))
            rows.append((rgb, normalize_text(f"{sample_texts(label)[i % 5]} {i}"), c))
    encoders = {"image": create_encoder("efficientnet_lite0", device="cpu"), "text": create_encoder("minilm_l6", device="cpu")}
    x = {
        "image": encoders["image"].encode([r[0] for r in rows]),
        "text": encoders["text"].encode([r[1] for r in rows]),
    }
    y = torch.tensor([r[2] for r in rows])
    ids = [f"s{i}" for i in range(len(rows))]
    val_idx = [i for i in range(len(rows)) if i % 4 == 0]
    train_idx = [i for i in range(len(rows)) if i % 4 != 0]

    def subset(idx: list[int]) -> FeatureSet:
        return FeatureSet(x={m: a[idx] for m, a in x.items()}, y=y[idx], ids=[ids[i] for i in idx])

    params = parse_params({"train": {"strategies": ["concat"], "epochs": 30, "patience": 30, "batch_size": 16, "hidden_dim": 32}})
    meta = {m: enc.describe() for m, enc in encoders.items()}
    summary = fit_strategy("concat", subset(train_idx), subset(val_idx), labels, meta, params, out_dir, torch.device("cpu"))
    (out_dir / "metrics.json").write_text(json.dumps({"val": {"macro_f1": summary["val_macro_f1"]}, "test": {}}) + "\n")
    return out_dir


def service_env(bentoml_home: Path) -> dict[str, str]:
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("MMFUSION_MODEL", None)
    env.pop("MMFUSION_INFERENCE_LOG", None)
    return env


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path
    output: Path
    package_report: dict

    def stop(self) -> None:
        stop_process_group(self.proc)


def start_server(target: str, env: dict, cwd: Path, output: Path, timeout: float = START_TIMEOUT_S, args=()) -> tuple:
    """`bentoml serve target` on a free port; returns (proc, url) once /readyz answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port), *args]
    url = f"http://127.0.0.1:{port}"
    return start_until_ready(cmd, f"{url}/readyz", output, timeout, cwd=cwd, env=env), url


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "best")


@pytest.fixture(scope="session")
def packaged(tmp_path_factory, tiny_model_dir) -> dict:
    """A project root with the tiny model as models/best, packaged into its own BENTOML_HOME."""
    import shutil

    root = tmp_path_factory.mktemp("project")
    shutil.copytree(tiny_model_dir, root / "models" / "best")
    (root / "bentofile.yaml").symlink_to(REPO / "bentofile.yaml")
    (root / "src").symlink_to(REPO / "src")
    params = {"package": {**TEST_SERVICE, "limits": TEST_LIMITS, "batching": {"enabled": "true", "max_batch_size": 16},
                          "explain": TEST_EXPLAIN}}  # fmt: skip
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = service_env(root / "bentoml")
    proc = subprocess.run(
        [sys.executable, "-m", "mmfusion.stages.package", "--params", str(root / "params.yaml"), "--root", str(root)],
        cwd=root, env=env, capture_output=True, text=True, timeout=PACKAGE_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((root / "reports" / "package.json").read_text())
    return {"root": root, "env": env, "report": report}


@pytest.fixture(scope="session")
def server(packaged) -> Server:
    """The built Bento served on 127.0.0.1 (batching on, test limits); stopped by PID at the end."""
    root, env = packaged["root"], packaged["env"]
    output = root / "serve.log"
    proc, url = start_server(packaged["report"]["bento_tag"], env, cwd=root, output=output)
    srv = Server(url, proc, root / "logs" / "inference.sqlite", output, packaged["report"])
    yield srv
    srv.stop()
