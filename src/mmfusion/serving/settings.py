"""The settings a served Bento runs with, resolved once when the service module is imported.

A Bento built by the `package` stage carries its settings as Bento arguments (`model`: the
exact BentoML model tag, `package`: the `package:` params section at build time; written by
`mmfusion.bentos.build_bento_args`), so a Bento is an immutable artifact. Serving the source
directly (`bentoml serve mmfusion.serving.service:MMFusion`) reads `params.yaml` instead (or the
file named by MMFUSION_PARAMS). Environment variables override at serve time, for one deployment:
MMFUSION_MODEL (a model tag), MMFUSION_INFERENCE_LOG (the log: a SQLAlchemy URL, which may hold the
password, or a SQLite file) and MMFUSION_WORKERS (worker processes: a replica per pod often wants one per core).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL

from mmfusion.config import PackageParams, ParamsError, load_params, parse_params
from mmfusion import logdb

MODEL_ENV = "MMFUSION_MODEL"
PARAMS_ENV = "MMFUSION_PARAMS"
LOG_ENV = logdb.URL_ENV
WORKERS_ENV = "MMFUSION_WORKERS"


@dataclass(frozen=True)
class ServeSettings:
    params: PackageParams
    model_tag: str
    log_url: URL
    batching: bool
    workers: int


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
    try:
        log_url = logdb.resolve_url(os.environ.get(LOG_ENV) or params.log.url)
    except ValueError as exc:
        raise ParamsError(f"{LOG_ENV if os.environ.get(LOG_ENV) else 'package.log.url'}: {exc}") from exc
    workers = os.environ.get(WORKERS_ENV, "").strip() or params.workers
    try:
        workers = int(workers)
        if workers < 1:
            raise ValueError
    except ValueError:
        raise ParamsError(f"{WORKERS_ENV}: expected a positive integer, got {workers!r}") from None
    return ServeSettings(
        params=params,
        workers=workers,
        model_tag=str(model_tag),
        log_url=log_url,
        batching=resolve_batching(params.batching.enabled, params.device),
    )
