"""The settings a served Bento runs with, resolved once when the service module is imported.

A Bento built by the `package` stage carries its settings as Bento arguments (`model`: the
exact BentoML model tag, `package`: the `package:` params section at build time; written by
`mmfusion.bentos.build_bento_args`), so a Bento is an immutable artifact. Serving the source
directly (`bentoml serve mmfusion.serving.service:MMFusion`) reads `params.yaml` instead (or the
file named by MMFUSION_PARAMS). Two environment variables override at serve time: MMFUSION_MODEL
(a model tag) and MMFUSION_INFERENCE_LOG (the log path).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from mmfusion.config import PackageParams, ParamsError, load_params, parse_params

MODEL_ENV = "MMFUSION_MODEL"
PARAMS_ENV = "MMFUSION_PARAMS"
LOG_ENV = "MMFUSION_INFERENCE_LOG"


@dataclass(frozen=True)
class ServeSettings:
    params: PackageParams
    model_tag: str
    log_path: Path
    batching: bool


def resolve_batching(value: str, device: str) -> bool:
    """`auto` turns adaptive batching on with CUDA and off on CPU (where one image at a time is fastest)."""
    value = str(value).strip().lower()
    if value in ("true", "on", "1", "yes"):
        return True
    if value in ("false", "off", "0", "no"):
        return False
    if value != "auto":
        raise ParamsError(f"package.batching.enabled: expected auto, true or false, got {value!r}")
    if device == "cpu":
        return False
    import torch

    return bool(torch.cuda.is_available())


def load_settings(arguments: dict | None = None) -> ServeSettings:
    """Settings from Bento arguments (a built Bento), else params.yaml; env overrides last."""
    if arguments is None:
        import bentoml

        arguments = vars(bentoml.use_arguments())
    package = arguments.get("package")
    if isinstance(package, str):  # `--arg package='{...}'` on the command line
        package = json.loads(package)
    if package is not None:
        params = parse_params({"package": package}).package
    else:
        path = Path(os.environ.get(PARAMS_ENV, "params.yaml"))
        params = load_params(path).package if path.exists() else PackageParams()
    model_tag = os.environ.get(MODEL_ENV) or arguments.get("model") or f"{params.model_name}:latest"
    log_path = Path(os.environ.get(LOG_ENV) or params.log.path)
    return ServeSettings(
        params=params,
        model_tag=str(model_tag),
        log_path=log_path,
        batching=resolve_batching(params.batching.enabled, params.device),
    )
