"""A self-describing model directory: weights + everything needed to rebuild and feed the head.

    model.safetensors   the head's state dict
    config.json         {"strategy", "head": create_head kwargs, "labels", "modalities",
                         "encoders": {modality: {encoder, dim, fingerprint, preprocessing}},
                         "inputs": {modality: preprocessing settings (modalities/)}, "train": {...}}
    calibration.json    {"temperature"}            (models/best only, written by evaluate)
    metrics.json        the winner's val/test/ablation metrics (models/best only)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmfusion.fusion import FusionHead, create_head

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CALIBRATION = "calibration.json"
METRICS = "metrics.json"


def save_checkpoint(model_dir: Path, head: FusionHead, config: dict[str, Any]) -> Path:
    """Write the head's weights and `config` (plus the head's own build config) into `model_dir`."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(model_dir / WEIGHTS))
    full = {"strategy": head.name, "head": head.config, "modalities": list(head.modalities), **config}
    (model_dir / CONFIG).write_text(json.dumps(full, indent=2) + "\n")
    return model_dir


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json of a model directory; FileNotFoundError naming the folder when it is not one."""
    path = Path(model_dir) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"not a model directory (no {CONFIG}): {model_dir}")
    return json.loads(path.read_text())


def load_checkpoint(model_dir: Path, device: torch.device | str = "cpu") -> tuple[FusionHead, dict[str, Any]]:
    """Rebuild the head by name from config.json, load its weights, eval mode; returns (head, config)."""
    config = read_config(model_dir)
    head = create_head(**config["head"])
    head.load_state_dict(load_file(str(Path(model_dir) / WEIGHTS)))
    return head.to(device).eval(), config


def read_temperature(model_dir: Path) -> float:
    """The calibration temperature evaluate fitted (calibration.json), 1.0 for an uncalibrated model."""
    path = Path(model_dir) / CALIBRATION
    return float(json.loads(path.read_text())["temperature"]) if path.exists() else 1.0


def read_metrics(model_dir: Path) -> dict[str, Any]:
    """The winner's metrics evaluate wrote (metrics.json), {} where there are none."""
    path = Path(model_dir) / METRICS
    return json.loads(path.read_text()) if path.exists() else {}


def weights_hash(model_dir: Path) -> str:
    """sha256 of the weights file, and of fine-tuned encoder weights (tuned/*.safetensors) where there are any:
    names a model version."""
    digest = hashlib.sha256((Path(model_dir) / WEIGHTS).read_bytes())
    for path in sorted((Path(model_dir) / "tuned").glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def model_version(model_dir: Path, config: dict[str, Any] | None = None) -> str:
    """The version a model is served, logged and monitored under: `<strategy>-<first 12 hex of weights_hash>`."""
    config = read_config(model_dir) if config is None else config
    return f"{config['strategy']}-{weights_hash(model_dir)[:12]}"
